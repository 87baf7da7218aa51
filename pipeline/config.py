"""Study configuration: YAML validated on load into typed dataclasses.

Unknown keys and wrong types are errors naming the key and the file. Relative paths are
resolved against the directory of the config file. The ``cluster`` section is kept as a
mapping: its options pass through to Dask/dask-jobqueue (see ``cluster/``), which validates them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from neurotask.pipeline.errors import ConfigError
from neurotask.pipeline.tasks import task_names


@dataclass
class StudySection:
    name: str = "study"
    workdir: str = "study"  # holds store.zarr, progress/, raw/ (simulated data), report/
    subjects: list[str] = field(default_factory=lambda: ["CSI1"])
    tasks: list[str] | Literal["all"] = "all"


@dataclass
class SimulateSection:
    """A synthetic study written in the real BOLD5000 file formats (pipeline.stages.simulate)."""

    seed: int = 0
    n_images: int = 1000
    n_repeated: int = 60  # images shown more than once (BOLD5000: 113)
    n_showings: int = 4  # showings of each repeated image
    n_sessions: int = 3
    n_features: int = 256
    n_latents: int = 8  # per Taskonomy cluster, per task and shared
    volume_shape: list[int] = field(default_factory=lambda: [22, 24, 14])
    noise_voxel_fraction: float = 0.4  # of non-ROI brain voxels: pure noise
    signal_variance: list[float] = field(default_factory=lambda: [0.05, 0.6])  # noise var = 1
    # For the real featurizer on a synthetic study (pipeline.features.images, pipeline.features.weights): synthetic
    # image files named like the study's images under features.images_dir, and randomly
    # initialised encoders in the official checkpoint format for features.tasks in weights_dir.
    write_images: bool = False
    write_weights: bool = False


@dataclass
class DataSection:
    """Where the subjects' files are and how they become ``responses/<subject>``.

    Path templates take {subject} (e.g. CSI1) and {n} (1); betas and events also {session}
    (1-based; {session:02d} pads), events {run}, roi_masks {roi}, roi_mat {tr}. Relative paths
    are under ``root`` (itself relative to the config file) or, without a root, under
    study.workdir. configs/bold5000.yaml documents the released dataset's layout."""

    format: Literal["glmsingle", "release1_rois"] = "glmsingle"  # release 2.0 betas / 1.0 ROI .mat
    root: str | None = None  # the downloaded dataset's directory
    betas: str = "raw/{subject}/{subject}_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_ses-{session:02d}.nii.gz"
    sessions: int | Literal["auto"] = "auto"
    brain_mask: str | None = "raw/{subject}/{subject}_brainmask.nii.gz"  # None: voxels finite in every session
    voxel_mask: str | None = None  # a user NIfTI (whole-brain or cortical) for voxels: mask
    roi_masks: str = "raw/{subject}/sub-{subject}_mask-{roi}.nii.gz"
    rois: list[str] = field(
        default_factory=lambda: [f"{h}{r}" for h in ("LH", "RH") for r in ("EarlyVis", "LOC", "OPA", "PPA", "RSC")]
    )
    voxels: Literal["brain", "rois", "mask"] = "brain"  # which voxels enter the store
    roi_mat: str = "ROIs/CSI{n}/mat/CSI{n}_ROIs_TR{tr}.mat"  # format release1_rois
    trs: list[int] = field(default_factory=lambda: [3, 4])  # release1_rois: TR files averaged
    stim_list: str = "raw/{subject}/CSI0{n}_stim_lists.txt"
    events: str | None = None  # per-run events files, cross-checked against the stimulus list
    repeats: Literal["exclude", "average"] = "exclude"
    zscore_sessions: bool = True
    voxel_order: Literal["ijk", "authors_zyx"] = "ijk"
    # voxels per store chunk = one fit task. At BOLD5000's shape a worker peaks at ~0.5 GB +
    # 0.33 GB per 1000 voxels (1.2 GB at 2000), and 1000-voxel chunks cost ~4% more per voxel,
    # 500-voxel ones ~11% (docs/performance.md, memory table).
    chunk_size: int = 2000


@dataclass
class FitSection:
    test_fraction: float = 0.15
    cv: Literal["kfold", "single_split"] = "kfold"
    n_folds: int = 7
    validation_fraction: float = 0.15  # only for cv: single_split (the authors' released code)
    alphas: Literal["paper"] | list[float] = "paper"
    n_alphas: int = 100
    seed: int = 2019
    dtype: Literal["float32", "float64"] = "float32"
    zscore_features: bool = True
    fdr: float = 0.05
    retries: int = 2  # per chunk, before the run fails naming it
    search: Literal["certified", "exhaustive"] = "certified"  # certified: the exhaustive grid's alphas, faster
    backend: Literal["numpy", "torch"] = "numpy"
    device: str | None = None  # torch backend: "cpu", "cuda", "cuda:1"; None = cuda if torch has it, else cpu
    n_permutations: int = 5000  # permutation test of test r (the authors' protocol); 0 = off
    permutation_seed: int = 0


@dataclass
class AnalysisSection:
    """Brain task structure from the fitted results (pipeline.stats.task_structure); never refits."""

    significance: Literal["parametric", "permutation", "stored", "none"] = "parametric"
    fdr: float = 0.05
    metric: Literal["cosine", "pearson", "jaccard"] = "cosine"
    linkage: Literal["average", "complete", "single", "weighted", "ward"] = "average"
    n_clusters: int = 4
    n_permutations: int = 1000  # Mantel test
    n_bootstrap: int = 200  # voxel resamples for the confidence intervals
    seed: int = 0
    taskonomy_affinities: Literal["16k", "1k"] = "16k"
    ci: float = 0.95


@dataclass
class ReportSection:
    """Figures, NIfTI maps and the HTML page (pipeline.stages.report)."""

    task: str | None = None  # task of the whole-brain r map (Figure 2); None: most significant voxels
    n_slices: int = 16  # axial slices per mosaic
    graph_neighbours: int = 2  # Figure 7: edges from each task to its most similar tasks


@dataclass
class FeaturesSection:
    """``neurotask featurize``: the feature spaces computed from the study's images.

    tasks, weights_dir, output, preprocessing, noise_seed and extra are read by
    ``pipeline.features.spaces.feature_spaces_from_config``; ``extra`` entries are
    ``{name, kind, ...options}`` and their names are tasks like the Taskonomy ones downstream.
    Relative paths (weights_dir, an extra space's state_dict/weights) are relative to the config
    file; images_dir, like data paths, is under data.root or else the workdir."""

    weights_dir: str | None = None  # the encoder checkpoints <task>_encoder-<sha256>.pth
    tasks: list[str] | Literal["all"] = "all"  # Taskonomy tasks to featurize
    output: Literal["taskbank", "normalized"] = "taskbank"
    preprocessing: Literal["task_config", "run_img_task"] = "task_config"
    noise_seed: int = 0  # denoise's input noise, drawn per image from (seed, image name)
    extra: list[dict] = field(default_factory=list)  # more feature spaces (torch_module, ...)
    images_dir: str = "Scene_Stimuli/Presented_Stimuli"  # holds {COCO,ImageNet,Scene}/<image>
    device: str = "auto"  # auto: CUDA where a worker has it, else CPU
    channels_last: bool | Literal["auto"] = "auto"  # NHWC convolutions; auto: on CPU (measured faster)
    batch_size: int = 16  # images per Dask task (and per store chunk)
    min_image_side: int = 32
    torch_threads: int | Literal["auto"] = "auto"  # auto: cores / Dask threads on the host
    retries: int = 2  # per batch, before the run fails naming it

    @property
    def extra_names(self) -> list[str]:
        return [str(e.get("name")) for e in self.extra if isinstance(e, dict)]

    @property
    def space_names(self) -> list[str]:
        """Names of every feature space featurize computes: the Taskonomy tasks, then extra."""
        return (task_names() if self.tasks == "all" else list(self.tasks)) + self.extra_names

    def spaces_mapping(self, resolve: Any) -> dict[str, Any]:
        """The section as ``feature_spaces_from_config`` reads it, with paths resolved."""
        extra = []
        for e in self.extra:
            e = dict(e)
            for key in ("state_dict", "weights"):
                if isinstance(e.get(key), str):
                    e[key] = str(resolve(e[key]))
            extra.append(e)
        out: dict[str, Any] = {"tasks": self.tasks, "output": self.output, "preprocessing": self.preprocessing,
                               "noise_seed": self.noise_seed, "extra": extra}
        if self.weights_dir is not None:
            out["weights_dir"] = str(resolve(self.weights_dir))
        return out


@dataclass
class Config:
    path: Path
    study: StudySection
    data: DataSection
    fit: FitSection
    simulate: SimulateSection | None = None
    analysis: AnalysisSection = field(default_factory=AnalysisSection)
    report: ReportSection = field(default_factory=ReportSection)
    features: FeaturesSection | None = None
    cluster: dict[str, Any] = field(default_factory=lambda: {"kind": "local"})

    @property
    def root(self) -> Path:
        return self.path.parent

    def resolve(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.root / p).resolve()

    @property
    def workdir(self) -> Path:
        return self.resolve(self.study.workdir)

    @property
    def store_path(self) -> Path:
        return self.workdir / "store.zarr"

    @property
    def tasks(self) -> list[str]:
        """study.tasks; 'all' is the 21 Taskonomy tasks and the features.extra spaces."""
        if self.study.tasks != "all":
            return list(self.study.tasks)
        return task_names() + (self.features.extra_names if self.features else [])

    def data_path(self, template: str, subject: str, *, key: str = "", **extra: Any) -> Path:
        """Fill a data path template for one subject; relative paths are under ``data.root``
        (relative to the config file) when set, else under the workdir."""
        n = int("".join(c for c in subject if c.isdigit()) or 0)
        try:
            filled = template.format(subject=subject, n=n, **extra)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"{self.path}: data.{key or 'path'} {template!r}: cannot fill the template ({e!r}); "
                              f"placeholders here: subject, n{''.join(', ' + k for k in extra)}") from None
        p = Path(filled).expanduser()
        if p.is_absolute():
            return p
        return (self.resolve(self.data.root) if self.data.root else self.workdir) / p


# --------------------------------------------------------------------------- validation

_SECTIONS = {"study": StudySection, "simulate": SimulateSection, "data": DataSection, "fit": FitSection,
             "analysis": AnalysisSection, "report": ReportSection,
             "features": FeaturesSection}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp``; return it (ints accepted where floats are)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, where)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is Any:
        return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _section(cls: type, raw: Any, name: str, file: Path) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: section '{name}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{file}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
            f"valid keys of '{name}': {', '.join(sorted(known))}"
        )
    values = {k: _convert(v, hints[k], f"{file}: {name}.{k}") for k, v in raw.items()}
    return cls(**values)


def _check_values(cfg: Config) -> None:
    f = cfg.path
    if cfg.features is not None:
        _check_features(cfg)
    known = task_names() + (cfg.features.extra_names if cfg.features else [])
    bad = [t for t in cfg.tasks if t not in known]
    if bad:
        raise ConfigError(f"{f}: study.tasks: unknown task(s) {', '.join(bad)}; known: {', '.join(known)} "
                          "(a feature space of features.extra is a task too)")
    if not cfg.study.subjects:
        raise ConfigError(f"{f}: study.subjects is empty")
    if len(set(cfg.study.subjects)) != len(cfg.study.subjects):
        raise ConfigError(f"{f}: study.subjects has duplicates")
    checks = [
        (0 < cfg.fit.test_fraction < 1, "fit.test_fraction must be in (0, 1)"),
        (0 < cfg.fit.validation_fraction < 1, "fit.validation_fraction must be in (0, 1)"),
        (cfg.fit.n_folds >= 2, "fit.n_folds must be >= 2"),
        (cfg.fit.n_alphas >= 1, "fit.n_alphas must be >= 1"),
        (0 < cfg.fit.fdr < 1, "fit.fdr must be in (0, 1)"),
        (cfg.fit.retries >= 0, "fit.retries must be >= 0"),
        (cfg.fit.n_permutations >= 0, "fit.n_permutations must be >= 0 (0 turns the test off)"),
        (cfg.data.chunk_size >= 1, "data.chunk_size must be >= 1"),
        (cfg.fit.alphas == "paper" or all(a > 0 for a in cfg.fit.alphas), "fit.alphas must be positive"),
        (cfg.data.sessions == "auto" or cfg.data.sessions >= 1, "data.sessions must be >= 1 or 'auto'"),
        (0 < cfg.analysis.fdr < 1, "analysis.fdr must be in (0, 1)"),
        (cfg.analysis.n_clusters >= 2, "analysis.n_clusters must be >= 2"),
        (cfg.analysis.n_permutations >= 1, "analysis.n_permutations must be >= 1"),
        (cfg.analysis.n_bootstrap >= 1, "analysis.n_bootstrap must be >= 1"),
        (0 < cfg.analysis.ci < 1, "analysis.ci must be in (0, 1)"),
        (cfg.report.task is None or cfg.report.task in task_names(),
         f"report.task: unknown task {cfg.report.task!r}; known: {', '.join(task_names())}"),
        (cfg.report.n_slices >= 1, "report.n_slices must be >= 1"),
        (cfg.report.graph_neighbours >= 1, "report.graph_neighbours must be >= 1"),
    ]
    d = cfg.data
    checks += [
        (len(set(d.rois)) == len(d.rois), "data.rois has duplicates"),
        (d.voxels != "rois" or bool(d.rois), "data.rois is empty but data.voxels is 'rois'"),
        (d.voxels != "mask" or d.voxel_mask is not None, "data.voxels is 'mask' but data.voxel_mask is not set"),
        (bool(d.trs) and all(t in (1, 2, 3, 4, 5, 34) for t in d.trs) and len(set(d.trs)) == len(d.trs),
         f"data.trs must be distinct TRs among 1, 2, 3, 4, 5, 34 (34: the released TR3/TR4 average), got {d.trs}"),
        (d.format != "release1_rois" or d.voxels == "rois",
         "data.voxels must be 'rois' with data.format 'release1_rois' (those files hold ROI voxels only)"),
        (d.format != "release1_rois" or d.voxel_order == "ijk",
         "data.voxel_order 'authors_zyx' needs volumes; data.format 'release1_rois' has none"),
        (d.format != "release1_rois" or "{tr" in d.roi_mat, "data.roi_mat must contain {tr}"),
        (d.format != "glmsingle" or "{session" in d.betas, "data.betas must contain {session}"),
        (not d.rois or d.format != "glmsingle" or "{roi" in d.roi_masks, "data.roi_masks must contain {roi}"),
        (d.events is None or ("{session" in d.events and "{run" in d.events),
         "data.events must contain {session} and {run}"),
    ]
    if cfg.simulate is not None:
        s = cfg.simulate
        checks += [
            (len(s.volume_shape) == 3 and min(s.volume_shape) >= 8, "simulate.volume_shape must be 3 sizes >= 8"),
            (s.n_images >= 100, "simulate.n_images must be >= 100"),
            (0 <= s.n_repeated <= s.n_images, "simulate.n_repeated must be in [0, n_images]"),
            (s.n_showings >= 2, "simulate.n_showings must be >= 2"),
            (1 <= s.n_sessions <= 20, "simulate.n_sessions must be in [1, 20]"),
            (s.n_features >= 8, "simulate.n_features must be >= 8"),
            (0 <= s.noise_voxel_fraction <= 1, "simulate.noise_voxel_fraction must be in [0, 1]"),
            (len(s.signal_variance) == 2 and 0 < s.signal_variance[0] <= s.signal_variance[1],
             "simulate.signal_variance must be [low, high] with 0 < low <= high"),
            (not s.write_weights or (cfg.features is not None and cfg.features.weights_dir is not None),
             "simulate.write_weights needs features.weights_dir (where the random encoders go)"),
        ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{f}: {message}")


def _check_features(cfg: Config) -> None:
    """The features section's values, and its feature spaces built (nothing loaded) so that
    a misconfigured space is reported at load time, naming the file and the key."""
    f, feat = cfg.path, cfg.features
    checks = [
        (feat.batch_size >= 1, "features.batch_size must be >= 1"),
        (feat.min_image_side >= 1, "features.min_image_side must be >= 1"),
        (feat.retries >= 0, "features.retries must be >= 0"),
        (feat.torch_threads == "auto" or feat.torch_threads >= 1, "features.torch_threads must be >= 1 or 'auto'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{f}: {message}")
    for i, e in enumerate(feat.extra):
        if e.get("name") in task_names():
            raise ConfigError(f"{f}: features.extra[{i}].name {e.get('name')!r} is a Taskonomy task name; "
                              "list Taskonomy tasks in features.tasks, or give this feature space another name")
    from neurotask.pipeline.features.spaces import FeatureSpaceError, feature_spaces_from_config  # imports torch

    try:
        feature_spaces_from_config(feat.spaces_mapping(cfg.resolve))
    except FeatureSpaceError as e:
        raise ConfigError(f"{f}: {e}") from None


def load_config(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read and validate a study config. ``overrides`` maps section -> key -> value."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {})
        raw[section] = {**(raw[section] or {}), **values}
    known = set(_SECTIONS) | {"cluster"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    cluster = raw.get("cluster") or {"kind": "local"}
    if not isinstance(cluster, dict):
        raise ConfigError(f"{path}: section 'cluster' must be a mapping")
    cfg = Config(
        path=path,
        study=_section(StudySection, raw.get("study"), "study", path),
        data=_section(DataSection, raw.get("data"), "data", path),
        fit=_section(FitSection, raw.get("fit"), "fit", path),
        simulate=_section(SimulateSection, raw["simulate"], "simulate", path) if "simulate" in raw else None,
        features=_section(FeaturesSection, raw["features"], "features", path) if "features" in raw else None,
        cluster=dict(cluster),
        analysis=_section(AnalysisSection, raw.get("analysis"), "analysis", path),
        report=_section(ReportSection, raw.get("report"), "report", path),
    )
    _check_values(cfg)
    return cfg


def fit_fingerprint(fit: FitSection, data: DataSection) -> dict[str, Any]:
    """The parameters that determine a fit's results; stored with them so that a rerun with
    different ones is refused rather than mixed into the same store."""
    keys = ("test_fraction", "cv", "n_folds", "validation_fraction", "alphas", "n_alphas", "seed", "dtype",
            "zscore_features", "n_permutations", "permutation_seed")
    out = {k: getattr(fit, k) for k in keys}
    if fit.cv != "single_split":
        out.pop("validation_fraction")
    return out
