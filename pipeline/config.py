"""Study configuration: a YAML file validated once, on load, by the pydantic models below.

Unknown keys, wrong types and out-of-range values are errors: :func:`load_config` raises one
:class:`ConfigError` listing every problem of the file, each line naming the file and the key.
Relative paths are resolved against the directory of the config file. The ``cluster`` section
is validated by ``neurotask.cluster.options`` (the cluster package owns it) and kept as the
mapping written, since its options pass through to Dask/dask-jobqueue. :func:`json_schema` is
the schema of the file for editors (``configs/study.schema.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PrivateAttr,
                      ValidationError, field_validator, model_validator)

from neurotask.cluster import ClusterConfigError
from neurotask.cluster.options import broken, cluster_options, error_lines, expecting
from neurotask.cluster.options import json_schema as cluster_schema
from neurotask.pipeline.errors import ConfigError
from neurotask.pipeline.ridge.splits import n_training
from neurotask.pipeline.tasks import CLUSTERS, task_cluster, task_names

Fraction = Annotated[float, Field(gt=0, lt=1)]  # an open interval: fdr, test sizes, confidence
Seed = Annotated[int, Field(ge=0)]  # numpy's generators take no negative seeds
Count = Annotated[int, Field(ge=1)]


class _Section(BaseModel):
    # strict: YAML gives typed values, and "7" or true where a number goes is a mistake
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _check(rules: list[tuple[bool, str]]) -> None:
    """Raise the broken rules (each message names its keys) as one validation error."""
    problems = [message for ok, message in rules if not ok]
    if problems:
        raise broken(*problems)


def _distinct(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError("has duplicates")
    return values


class StudySection(_Section):
    name: str = "study"
    workdir: str = "study"  # holds store.zarr, progress/, raw/ (simulated data), report/
    subjects: Annotated[list[str], Field(min_length=1)] = ["CSI1"]
    tasks: Annotated[Annotated[list[str], Field(min_length=1)] | Literal["all"],
                     expecting("'all' or a list of task names")] = "all"

    _subjects_distinct = field_validator("subjects")(_distinct)


class SimulateSection(_Section):
    """A synthetic study written in the real BOLD5000 file formats (pipeline.stages.simulate)."""

    seed: Seed = 0
    n_images: Annotated[int, Field(ge=100)] = 1000
    n_repeated: NonNegativeInt = 60  # images shown more than once (BOLD5000: 113)
    n_showings: Annotated[int, Field(ge=2)] = 4  # showings of each repeated image
    n_sessions: Annotated[int, Field(ge=1, le=20)] = 3
    n_features: Annotated[int, Field(ge=8)] = 256
    n_latents: Count = 8  # per Taskonomy cluster, per task and shared
    volume_shape: Annotated[list[Annotated[int, Field(ge=8)]], Field(min_length=3, max_length=3)] = [22, 24, 14]
    noise_voxel_fraction: Annotated[float, Field(ge=0, le=1)] = 0.4  # of non-ROI brain voxels: pure noise
    signal_variance: Annotated[list[PositiveFloat], Field(min_length=2, max_length=2)] = [0.05, 0.6]  # noise var = 1
    # For the real featurizer on a synthetic study (pipeline.features.images, pipeline.features.weights): synthetic
    # image files named like the study's images under features.images_dir, and randomly
    # initialised encoders in the official checkpoint format for features.tasks in weights_dir.
    write_images: bool = False
    write_weights: bool = False
    # data.format nsd (pipeline.stages.simulate_nsd): of each subject's n_images, those shown to
    # every subject (NSD: 1000 of 10,000); every image is scheduled 3 times, as in NSD
    # (left out of model_dump, so that BOLD5000 studies simulated before this key keep their fingerprint)
    n_shared: Annotated[NonNegativeInt, Field(exclude=True)] = 100

    @model_validator(mode="after")
    def _consistent(self) -> SimulateSection:
        rules = [(self.n_repeated <= self.n_images, "simulate.n_repeated must be in [0, n_images]"),
                 (self.n_shared <= self.n_images, "simulate.n_shared must be in [0, n_images]"),
                 (self.signal_variance[0] <= self.signal_variance[1],
                  "simulate.signal_variance must be [low, high] with 0 < low <= high")]
        _check(rules)
        return self


_TRS = (1, 2, 3, 4, 5, 34)


class NsdSection(_Section):
    """The Natural Scenes Dataset's files (data.format nsd; pipeline.formats.nsd reads them).

    Templates are relative to data.root (the NSD download's top directory) and take {subject}
    (subj01 .. subj08), {space} and {version} (the keys below), {session} (1-based; NSD pads to
    2 digits) and {ext} for betas, {roi_file} for ROI volumes and their label tables. Defaults
    are the released layout (NSD data manual, cvnlab.slite.page: "Functional data (NSD)",
    "ROIs"); configs/nsd.yaml documents it."""

    design: str = "nsddata/experiments/nsd/nsd_expdesign.mat"
    space: Literal["func1pt8mm", "func1mm"] = "func1pt8mm"
    version: Literal["betas_fithrf_GLMdenoise_RR", "betas_fithrf", "betas_assumehrf"] = "betas_fithrf_GLMdenoise_RR"
    betas_file: Literal["hdf5", "nifti"] = "hdf5"  # hdf5: chunked per voxel, read by z-slab; nifti: .nii.gz
    betas: str = "nsddata_betas/ppdata/{subject}/{space}/{version}/betas_session{session:02d}.{ext}"
    trials_per_session: Count = 750  # NSD: 750 in every session; each file is checked against it
    ncsnr: str | None = "nsddata_betas/ppdata/{subject}/{space}/{version}/ncsnr.nii.gz"  # None: not stored
    roi_file: str = "nsddata/ppdata/{subject}/{space}/roi/{roi_file}.nii.gz"
    label_table: str = "nsddata/freesurfer/{subject}/label/{roi_file}.mgz.ctab"
    # the ROI volumes data.rois' labels are looked up in (each label once among them, or
    # written 'file:label', e.g. 'streams:ventral')
    roi_files: Annotated[list[str], Field(min_length=1)] = ["prf-visualrois", "floc-places", "floc-faces",
                                                            "floc-bodies", "floc-words"]
    brain_mask: str = "nsddata/ppdata/{subject}/{space}/brainmask.nii.gz"  # for data.voxels brain
    stimuli: str = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"  # imgBrick (73000, 425, 425, 3) uint8

    _roi_files_distinct = field_validator("roi_files")(_distinct)

    @model_validator(mode="after")
    def _templates(self) -> NsdSection:
        _check([("{session" in self.betas, "data.nsd.betas must contain {session}"),
                ("{roi_file" in self.roi_file, "data.nsd.roi_file must contain {roi_file}"),
                ("{roi_file" in self.label_table, "data.nsd.label_table must contain {roi_file}")])
        return self


class DataSection(_Section):
    """Where the subjects' files are and how they become ``responses/<subject>``.

    Path templates take {subject} (e.g. CSI1) and {n} (1); betas and events also {session}
    (1-based; {session:02d} pads), events {run}, roi_masks {roi}, roi_mat {tr}. Relative paths
    are under ``root`` (itself relative to the config file) or, without a root, under
    study.workdir. configs/bold5000.yaml documents the released dataset's layout."""

    # BOLD5000 release 2.0 betas / BOLD5000 1.0 ROI .mat / the Natural Scenes Dataset (data.nsd)
    format: Literal["glmsingle", "release1_rois", "nsd"] = "glmsingle"
    root: str | None = None  # the downloaded dataset's directory
    betas: str = "raw/{subject}/{subject}_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_ses-{session:02d}.nii.gz"
    sessions: Annotated[Count | Literal["auto"], expecting("an integer >= 1 or 'auto'")] = "auto"
    brain_mask: str | None = "raw/{subject}/{subject}_brainmask.nii.gz"  # None: voxels finite in every session
    voxel_mask: str | None = None  # a user NIfTI (whole-brain or cortical) for voxels: mask
    roi_masks: str = "raw/{subject}/sub-{subject}_mask-{roi}.nii.gz"
    rois: list[str] = [f"{h}{r}" for h in ("LH", "RH") for r in ("EarlyVis", "LOC", "OPA", "PPA", "RSC")]
    voxels: Literal["brain", "rois", "mask"] = "brain"  # which voxels enter the store
    roi_mat: str = "ROIs/CSI{n}/mat/CSI{n}_ROIs_TR{tr}.mat"  # format release1_rois
    trs: list[int] = [3, 4]  # release1_rois: TR files averaged
    # the subject's anatomy (a T1w or a mean EPI, 3-D or 4-D) drawn under the report's maps; any
    # grid: resampled to the betas' grid at ingest (or at report for imported results). None:
    # the mean of the raw betas, kept at ingest (imported results: the analysed voxels' silhouette)
    anatomy: str | None = None
    stim_list: str = "raw/{subject}/CSI0{n}_stim_lists.txt"
    events: str | None = None  # per-run events files, cross-checked against the stimulus list
    repeats: Literal["exclude", "average"] = "exclude"
    zscore_sessions: bool = True
    voxel_order: Literal["ijk", "authors_zyx"] = "ijk"
    # voxels per store chunk = one fit task. At BOLD5000's shape a worker peaks at ~0.5 GB +
    # 0.33 GB per 1000 voxels (1.2 GB at 2000), and 1000-voxel chunks cost ~4% more per voxel,
    # 500-voxel ones ~11% (docs/performance.md, memory table).
    chunk_size: Count = 2000
    nsd: NsdSection = NsdSection()  # format nsd: where NSD's files are (betas, stim_list, roi_masks unused)

    @field_validator("nsd", mode="before")
    @classmethod
    def _empty_nsd_is_default(cls, value: Any) -> Any:
        return {} if value is None else value

    _rois_distinct = field_validator("rois")(_distinct)

    @field_validator("trs")
    @classmethod
    def _known_trs(cls, trs: list[int]) -> list[int]:
        if not trs or any(t not in _TRS for t in trs) or len(set(trs)) != len(trs):
            raise ValueError(f"must be distinct TRs among {', '.join(map(str, _TRS))} "
                             f"(34: the released TR3/TR4 average), got {trs}")
        return trs

    @model_validator(mode="after")
    def _consistent(self) -> DataSection:
        rois1 = self.format == "release1_rois"
        nsd = self.format == "nsd"
        bold5000_rois = [f"{h}{r}" for h in ("LH", "RH") for r in ("EarlyVis", "LOC", "OPA", "PPA", "RSC")]
        _check([
            (not nsd or self.rois != bold5000_rois,
             "data.rois holds BOLD5000's ROI names; with data.format 'nsd' list labels of NSD's ROI tables "
             "(e.g. V1v, V1d, hV4, OPA, PPA, RSC, FFA-1; see configs/nsd.yaml)"),
            (not nsd or self.voxels != "rois" or bool(self.rois), "data.rois is empty but data.voxels is 'rois'"),
            (not nsd or self.events is None, "data.events is BOLD5000's; NSD's design comes from data.nsd.design"),
        ])
        if nsd:
            _check([(self.voxels != "mask" or self.voxel_mask is not None,
                     "data.voxels is 'mask' but data.voxel_mask is not set (NSD: e.g. "
                     "nsddata/ppdata/{subject}/func1pt8mm/roi/nsdgeneral.nii.gz)")])
            return self
        _check([
            (self.voxels != "rois" or bool(self.rois), "data.rois is empty but data.voxels is 'rois'"),
            (self.voxels != "mask" or self.voxel_mask is not None,
             "data.voxels is 'mask' but data.voxel_mask is not set"),
            (not rois1 or self.voxels == "rois",
             "data.voxels must be 'rois' with data.format 'release1_rois' (those files hold ROI voxels only)"),
            (not rois1 or self.voxel_order == "ijk",
             "data.voxel_order 'authors_zyx' needs volumes; data.format 'release1_rois' has none"),
            (not rois1 or "{tr" in self.roi_mat, "data.roi_mat must contain {tr}"),
            (rois1 or "{session" in self.betas, "data.betas must contain {session}"),
            (not self.rois or rois1 or "{roi" in self.roi_masks, "data.roi_masks must contain {roi}"),
            (self.events is None or ("{session" in self.events and "{run" in self.events),
             "data.events must contain {session} and {run}"),
        ])
        return self


class FitSection(_Section):
    # Which images are held out for testing, the same ones for every task:
    #   auto: 'shared' when the ingest marked a common test set (data.format nsd), else 'random';
    #   random: test_fraction of the images, drawn by image name (seeded), so that subjects who
    #     saw the same images test on the same ones, whatever their presentation order;
    #   shared: the images marked shared (NSD's shared images that every subject saw in all
    #     their showings); test_fraction is not used;
    #   position: test_fraction of the rows drawn by position (the first versions; subjects whose
    #     images come in another order test on other images).
    # The CV folds cut the remaining images the same way (by name, or by position).
    test_set: Literal["auto", "random", "shared", "position"] = "auto"
    test_fraction: Fraction = 0.15
    cv: Literal["kfold", "single_split"] = "kfold"
    n_folds: Annotated[int, Field(ge=2)] = 7  # against the number of images: checked with the data
    validation_fraction: Fraction = 0.15  # only for cv: single_split (the authors' released code)
    alphas: Annotated[Literal["paper"] | Annotated[list[PositiveFloat], Field(min_length=1)],
                      expecting("'paper' or a list of positive numbers")] = "paper"
    n_alphas: Count = 100
    seed: Seed = 2019
    dtype: Literal["float32", "float64"] = "float32"
    zscore_features: bool = True
    fdr: Fraction = 0.05
    retries: NonNegativeInt = 2  # per chunk, before the run fails naming it
    search: Literal["certified", "exhaustive"] = "certified"  # certified: the exhaustive grid's alphas, faster
    backend: Literal["numpy", "torch"] = "numpy"
    device: str | None = None  # torch backend: "cpu", "cuda", "cuda:1"; None = cuda if torch has it, else cpu
    n_permutations: NonNegativeInt = 5000  # permutation test of test r (the authors' protocol); 0 = off
    permutation_seed: Seed = 0

    # Frozen and picklable, this section is the fit's specification: built once on the driver
    # and handed to every worker task (decompositions and voxel chunks alike).

    @property
    def permutation(self) -> bool:
        return self.n_permutations > 0

    def fingerprint(self) -> dict[str, Any]:
        """The parameters that determine a fit's results; stored with them so that a rerun with
        different ones is refused rather than mixed into the same store. (Its keys and values
        are those stored by every earlier version, plus ``backend`` and ``test_set``: existing stores
        still match a config asking for what they were computed with.)"""
        keys = ("test_set", "test_fraction", "cv", "n_folds", "validation_fraction", "alphas", "n_alphas", "seed",
                "dtype", "zscore_features", "n_permutations", "permutation_seed")
        out = {k: getattr(self, k) for k in keys}
        if self.test_set == "shared":
            out.pop("test_fraction")  # not used
        # The backend changes the results' last bits (another BLAS, another summation order):
        # a resume with another backend is refused, not mixed. Stores written before this key
        # were all numpy (storage.store.LEGACY_FIT_PARAMS). A torch device is recorded when
        # configured; device None picks CUDA per worker, which the docs tell users to pin.
        out["backend"] = self.backend if self.backend == "numpy" or self.device is None \
            else f"torch:{self.device.split(':')[0]}"
        if self.alphas != "paper":
            out["alphas"] = list(self.alphas)  # as the attribute reads back from the store
        if self.cv != "single_split":
            out.pop("validation_fraction")
        return out


class AnalysisSection(_Section):
    """Brain task structure from the fitted results (pipeline.stats.task_structure); never refits."""

    significance: Literal["parametric", "permutation", "stored", "none"] = "parametric"
    fdr: Fraction = 0.05
    metric: Literal["cosine", "pearson", "jaccard"] = "cosine"
    linkage: Literal["average", "complete", "single", "weighted", "ward"] = "average"
    # Groups the trees are cut into: 2 .. the number of tasks (checked against study.tasks);
    # auto: 4 (the paper's), or the number of tasks analysed when fewer.
    n_clusters: Annotated[Annotated[int, Field(ge=2)] | Literal["auto"], expecting("an integer >= 2 or 'auto'")] = "auto"
    n_permutations: Count = 1000  # Mantel test
    n_bootstrap: Count = 200  # voxel resamples for the confidence intervals
    seed: Seed = 0
    taskonomy_affinities: Literal["16k", "1k"] = "16k"
    ci: Fraction = 0.95


class PycortexSection(_Section):
    """A pycortex subject and transform: Figures 2-4 are drawn as flatmaps, as in the paper."""

    subject: str  # a subject in pycortex's database (e.g. the example subject S1)
    transform: str  # its transform from the functional volume to the surface (e.g. fullhead)
    filestore: str | None = None  # the pycortex database folder; None: pycortex's configured one


class ReportSection(_Section):
    """Figures, NIfTI maps and the HTML page (pipeline.stages.report)."""

    task: str | None = None  # task of the whole-brain r map (Figure 2); None: most significant voxels
    n_slices: Count = 16  # slices per map
    graph_neighbours: Count = 2  # Figure 7: edges from each task to its most similar tasks
    dpi: Annotated[int, Field(ge=72, le=1200)] = 200  # PNG resolution (every figure is also SVG)
    pycortex: PycortexSection | None = None  # flatmaps; None: volume maps only
    alpha_edge_warning: Fraction = 0.2  # warn when more voxels than this chose an end of the alpha grid

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str | None) -> str | None:
        if task is not None and task not in task_names():
            raise ValueError(f"is not a Taskonomy task: {task!r}; known: {', '.join(task_names())}")
        return task


class FeaturesSection(_Section):
    """``neurotask featurize``: the feature spaces computed from the study's images.

    tasks, weights_dir, output, preprocessing, noise_seed and extra are read by
    ``pipeline.features.spaces.feature_spaces_from_config``; ``extra`` entries are
    ``{name, kind, ...options}`` and their names are tasks like the Taskonomy ones downstream.
    Relative paths (weights_dir, an extra space's state_dict/weights) are relative to the config
    file; images_dir, like data paths, is under data.root or else the workdir."""

    weights_dir: str | None = None  # the encoder checkpoints <task>_encoder-<sha256>.pth
    tasks: Annotated[list[str] | Literal["all"], expecting("'all' or a list of task names")] = "all"
    output: Literal["taskbank", "normalized"] = "taskbank"
    preprocessing: Literal["task_config", "run_img_task"] = "task_config"
    noise_seed: Seed = 0  # denoise's input noise, drawn per image from (seed, image name)
    # more feature spaces (torch_module, ...); their options are checked by feature_spaces_from_config
    extra: list[dict[str, Any]] = []
    images_dir: str = "Scene_Stimuli/Presented_Stimuli"  # holds {COCO,ImageNet,Scene}/<image>
    device: str = "auto"  # auto: CUDA where a worker has it, else CPU
    channels_last: Annotated[bool | Literal["auto"], expecting("true, false or 'auto'")] = "auto"  # NHWC convolutions; auto: on CPU (measured faster)
    batch_size: Count = 16  # images per Dask task (and per store chunk)
    min_image_side: Count = 32
    torch_threads: Annotated[Count | Literal["auto"],
                             expecting("an integer >= 1 or 'auto'")] = "auto"  # auto: cores / Dask threads on the host
    retries: NonNegativeInt = 2  # per batch, before the run fails naming it

    @field_validator("extra")
    @classmethod
    def _not_taskonomy_names(cls, extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
        _check([(e.get("name") not in task_names(),
                 f"features.extra[{i}].name {e.get('name')!r} is a Taskonomy task name; list Taskonomy tasks "
                 "in features.tasks, or give this feature space another name") for i, e in enumerate(extra)])
        return extra

    @property
    def extra_names(self) -> list[str]:
        return [str(e.get("name")) for e in self.extra]

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


class PartitionSection(_Section):
    """Variance partitioning and banded ridge on unions of feature-space groups
    (pipeline.stages.partition): every union of an analysis's groups is fitted with the fit's
    protocol (its split, folds, alphas and z-scoring), its test R² split by inclusion-exclusion
    into what each group explains uniquely and what groups share."""

    # name -> {group -> its feature spaces}; a group may also be written "taskonomy:<cluster>"
    # (every study task of that Taskonomy cluster: 3D, 2D, lowdim_geometric, semantic, outlier)
    analyses: Annotated[dict[str, dict[str, list[str] | str]], Field(min_length=1)]
    banded: Literal["full", "all", "none"] = "full"  # banded ridge on the full union, every union of >= 2 spaces, none
    n_candidates: Annotated[int, Field(ge=1, le=1000)] = 12  # band weightings on the simplex (banded ridge)
    candidate_seed: Seed = 0
    # sign-flip test of each group's unique variance. Its p is at least 1/(n_permutations + 1), and
    # BH across V voxels needs p <= fdr k / V: with too few permutations nothing can pass.
    n_permutations: Count = 10000
    permutation_seed: Seed = 0
    fdr: Fraction = 0.05
    # voxels per unit (and per stored chunk); None: 16000. A unit decomposes each union once.
    block_size: Count | None = None

    @field_validator("analyses")
    @classmethod
    def _analyses_shape(cls, analyses: dict[str, dict[str, list[str] | str]]) -> dict[str, dict[str, list[str] | str]]:
        problems = []
        for name, groups in analyses.items():
            if not name or "/" in name or name.startswith("."):
                problems.append(f"partition.analyses: {name!r} is not a usable name (no '/', not empty)")
            if not 2 <= len(groups) <= 4:
                problems.append(f"partition.analyses.{name}: needs 2 to 4 groups, got {len(groups)}")
            for group, spaces in groups.items():
                if "+" in group or "/" in group or not group:
                    problems.append(f"partition.analyses.{name}: group name {group!r} may not be empty or "
                                    "contain '+' or '/'")
                if isinstance(spaces, str):
                    cluster = spaces.removeprefix("taskonomy:")
                    if not spaces.startswith("taskonomy:") or cluster not in CLUSTERS:
                        problems.append(f"partition.analyses.{name}.{group}: {spaces!r} is neither a list of "
                                        f"feature spaces nor 'taskonomy:<cluster>' ({', '.join(CLUSTERS)})")
                elif not spaces:
                    problems.append(f"partition.analyses.{name}.{group}: is empty")
                elif len(set(spaces)) != len(spaces):
                    problems.append(f"partition.analyses.{name}.{group}: has duplicates")
        _check([(False, m) for m in problems])
        return analyses

    def fingerprint(self) -> dict[str, Any]:
        """The settings that determine the stored partitions besides the groups and the fit's."""
        return {k: getattr(self, k) for k in ("n_candidates", "candidate_seed", "n_permutations", "permutation_seed")}


class Config(_Section):
    """A validated study config file, and where it is (``path``: relative paths resolve
    against its directory). Build it with :func:`load_config`."""

    study: StudySection = StudySection()
    data: DataSection = DataSection()
    fit: FitSection = FitSection()
    simulate: SimulateSection | None = None
    analysis: AnalysisSection = AnalysisSection()
    report: ReportSection = ReportSection()
    features: FeaturesSection | None = None
    partition: PartitionSection | None = None
    # the mapping as written: validated by neurotask.cluster.options, passed to open_client
    cluster: dict[str, Any] = {"kind": "local"}
    _path: Path = PrivateAttr()

    @field_validator("study", "data", "fit", "simulate", "analysis", "report", "features", "partition", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        return {} if value is None else value  # `fit:` with nothing under it

    @field_validator("cluster", mode="before")
    @classmethod
    def _no_cluster_is_local(cls, value: Any) -> Any:
        return value or {"kind": "local"}

    @model_validator(mode="after")
    def _across_sections(self) -> Config:
        known = task_names() + (self.features.extra_names if self.features else [])
        bad = [t for t in self.tasks if t not in known]
        n = self.analysis.n_clusters
        # A simulated study has at most simulate.n_images images, so a bound on the folds that
        # needs no data (the fit checks the ingested count again).
        sim, fit = self.simulate, self.fit
        n_train = None if sim is None else n_training(sim.n_images, fit.test_fraction)
        _check(self._partition_problems(known) + [
            (n_train is None or fit.cv != "kfold" or fit.n_folds <= n_train,
             f"fit.n_folds must be <= the training images ({n_train}: simulate.n_images less the "
             f"fit.test_fraction held out), got {fit.n_folds}"),
            (not bad, f"study.tasks: unknown task(s) {', '.join(bad)}; known: {', '.join(known)} "
                      "(a feature space of features.extra is a task too)"),
            (n == "auto" or n <= len(self.tasks),
             f"analysis.n_clusters must be <= the number of tasks ({len(self.tasks)}, study.tasks), got {n}"),
            (self.simulate is None or not self.simulate.write_weights
             or (self.features is not None and self.features.weights_dir is not None),
             "simulate.write_weights needs features.weights_dir (where the random encoders go)"),
        ])
        return self

    def _partition_problems(self, known: list[str]) -> list[tuple[bool, str]]:
        """Every partition group names known feature spaces, and no space is in two groups."""
        if self.partition is None:
            return []
        rules = []
        for name in self.partition.analyses:
            groups = self.partition_groups(name)
            for group, spaces in groups.items():
                key = f"partition.analyses.{name}.{group}"
                unknown = [s for s in spaces if s not in known]
                rules.append((not unknown, f"{key}: unknown feature space(s) {', '.join(unknown)}; known: "
                                           f"{', '.join(known)}"))
                rules.append((bool(spaces), f"{key}: no study task is in that Taskonomy cluster (study.tasks)"))
            seen: dict[str, str] = {}
            for group, spaces in groups.items():
                for s in spaces:
                    rules.append((s not in seen, f"partition.analyses.{name}: feature space {s} is in groups "
                                                 f"{seen.get(s)} and {group}; a space belongs to one group"))
                    seen.setdefault(s, group)
        return rules

    def partition_groups(self, analysis: str) -> dict[str, list[str]]:
        """An analysis's groups with ``taskonomy:<cluster>`` resolved to the study's tasks of
        that cluster (in study.tasks order)."""
        if self.partition is None or analysis not in self.partition.analyses:
            raise KeyError(analysis)
        out = {}
        for group, spaces in self.partition.analyses[analysis].items():
            if isinstance(spaces, str):
                cluster = spaces.removeprefix("taskonomy:")
                spaces = [t for t in self.tasks if t in task_names() and task_cluster(t) == cluster]
            out[group] = list(spaces)
        return out

    @property
    def path(self) -> Path:
        return self._path

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


def _read(path: Path) -> dict[str, Any]:
    """The file's top-level mapping; ConfigError for anything that is not a YAML mapping."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except PermissionError:
        raise ConfigError(f"{path}: cannot read the config file (permission denied)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text (UTF-8) file, so not a YAML config (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _feature_space_problems(cfg: Config) -> list[str]:
    """The features section's spaces built (nothing loaded), so that a misconfigured space is
    reported at load time; their options are the feature-space code's to check."""
    if cfg.features is None:
        return []
    from neurotask.pipeline.features.spaces import FeatureSpaceError, feature_spaces_from_config  # imports torch

    try:
        feature_spaces_from_config(cfg.features.spaces_mapping(cfg.resolve))
    except FeatureSpaceError as e:
        return [str(e)]
    return []


def load_config(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read and validate a study config. ``overrides`` maps section -> key -> value.

    Raises ConfigError listing every problem of the file, one line each: the file, the key,
    what was expected and what was given."""
    path = Path(path).expanduser().resolve()
    raw = _read(path)
    for section, values in (overrides or {}).items():
        current = raw.get(section) or {}
        raw[section] = {**current, **values} if isinstance(current, dict) else current
    problems: list[str] = []
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        problems += error_lines(e, Config)
    try:
        if isinstance(raw.get("cluster"), (dict, type(None))):  # else Config reports it is no mapping
            cluster_options(raw.get("cluster"))
    except ClusterConfigError as e:
        problems += e.problems
    if not problems:
        cfg._path = path
        problems += _feature_space_problems(cfg)
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems))
    return cfg


def json_schema() -> dict[str, Any]:
    """JSON schema of a study config file, for editors (``configs/study.schema.json``)."""
    schema = Config.model_json_schema()
    cluster = cluster_schema()
    schema["$defs"].update(cluster.pop("$defs"))
    schema["properties"]["cluster"] = {**cluster, "description": "how a Dask client is obtained"}
    schema["title"] = "neurotask study config"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
