"""The Python API: a study's labelled results as xarray, for notebooks and scripts.

>>> import neurotask
>>> study = neurotask.open_study("configs/demo.yaml")      # or a workdir, or its store.zarr
>>> study.results("CSI1")                                   # Dataset (task, voxel)
>>> study.analysis()                                        # the task-structure analysis

Read-only: a :class:`Study` never takes the workdir's driver lock and never writes, so it can be
opened while ``neurotask run`` works on the same study (it then sees the units finished so
far). Every result carries its labels: tasks, voxel (i, j, k) indices and ROI names, units and
long names (``storage.schema``), so a selection such as ``results.sel(task="edge2d")`` or
``results.where(results.roi == "LHPPA", drop=True)`` needs no bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from neurotask.pipeline.errors import NeurotaskError

if TYPE_CHECKING:
    import xarray as xr

    from neurotask.pipeline.config import Config
    from neurotask.storage import StudyStore

STORE_NAME = "store.zarr"  # a study's store inside its workdir (pipeline.config: Config.store_path)


class StudyNotFoundError(NeurotaskError):
    """The path given to :func:`open_study` is neither a study config nor a study's store."""


class ResultNotFoundError(NeurotaskError):
    """The study has no such result yet (a subject not fitted, no analysis): the message says
    which command makes it."""


@dataclass(frozen=True)
class StudyPaths:
    """Where a study keeps its things."""

    workdir: Path  # everything the study writes
    store: Path  # the Zarr store (<workdir>/store.zarr)
    progress: Path  # the progress markers (<workdir>/progress)
    report: Path  # the report page (<workdir>/report/index.html), whether written yet or not
    config: Path | None  # the study config, when the study was opened from one


class Study:
    """One study, read-only. Made by :func:`open_study`."""

    def __init__(self, store_path: Path, config: Config | None):
        from neurotask.storage import StudyStore

        self.config = config  # the validated study config (None when opened from a store path)
        self._store: StudyStore = StudyStore(store_path)
        workdir = store_path.parent
        self.paths = StudyPaths(workdir=workdir, store=store_path, progress=self._store.progress_dir,
                                report=workdir / "report" / "index.html",
                                config=config.path if config is not None else None)

    def __repr__(self) -> str:
        name = self.config.study.name if self.config is not None else self.paths.workdir.name
        return (f"<neurotask.Study {name!r}: {len(self.subjects)} subject(s) with results, "
                f"{len(self.tasks)} task(s); store {self.paths.store}>")

    # ------------------------------------------------------------------ what there is

    @property
    def subjects(self) -> list[str]:
        """The subjects with results in the store (fitted or imported), in the config's order
        when there is a config."""
        have = self._store.members("results")
        if self.config is None:
            return have
        return [s for s in self.config.study.subjects if s in have] + [s for s in have if s not in
                                                                        self.config.study.subjects]

    @property
    def tasks(self) -> list[str]:
        """The config's tasks (feature spaces), or without a config those of the first subject's results."""
        if self.config is not None:
            return list(self.config.tasks)
        subjects = self.subjects
        return self._store.result_tasks(subjects[0]) if subjects else []

    # ------------------------------------------------------------------ results

    def results(self, subject: str) -> xr.Dataset:
        """A subject's results, loaded: (task, voxel) variables r, r2, alpha, pvalue, qvalue,
        significant (and the permutation test's where run), per-voxel noise ceiling, with
        coordinates task, task_label, voxel_i/j/k and roi; attrs hold the fit parameters (or
        the source of imported results), volume_shape and affine."""
        from neurotask.storage import results_group

        if not self._store.has(results_group(subject)):
            known = ", ".join(self.subjects) or "none"
            raise ResultNotFoundError(f"{self.paths.store}: no results for subject {subject!r} (subjects with "
                                      f"results: {known}); run `neurotask fit` (or `neurotask import-published`)")
        return self._store.results(subject)

    def all_results(self) -> dict[str, xr.Dataset]:
        """Every subject's results, subject -> Dataset (task, voxel) as :meth:`results`."""
        return {s: self.results(s) for s in self.subjects}

    def roi_results(self, subject: str) -> xr.Dataset:
        """The ROI-only models of a subject (imported from the authors' published results)."""
        from neurotask.storage.schema import roi_results_group

        group = roi_results_group(subject)
        if not self._store.has(group):
            raise ResultNotFoundError(f"{self.paths.store}: no ROI-only results for {subject!r} (only imports "
                                      "of the authors' published results have them)")
        return self._store.read_dataset(group)

    def analysis(self) -> xr.Dataset:
        """The task-structure analysis (``neurotask analyse``): similarity matrices, trees,
        graphs, the comparison with Taskonomy and the ROI summaries."""
        from neurotask.storage.schema import analysis_group

        group = analysis_group("task_structure")
        if not self._store.has(group):
            raise ResultNotFoundError(f"{self.paths.store}: no analysis yet; run `neurotask analyse`")
        return self._store.read_dataset(group)

    def volume(self, subject: str, name: str = "r", task: str | None = None):
        """One per-voxel result of a subject put back into its volume, as a ``nibabel``
        Nifti1Image with the store's affine (NaN outside the fitted voxels): ready for nilearn
        (``nilearn.plotting.plot_stat_map(study.volume("CSI1", "r", "edge2d"))``) or ``.to_filename``.
        ``task`` is required for (task, voxel) variables, not for per-voxel ones (noise ceiling)."""
        import nibabel as nib
        import numpy as np

        from neurotask.storage import to_volume

        res = self.results(subject)
        if name not in res.data_vars:
            raise ResultNotFoundError(f"{subject}: no result {name!r}; there are {', '.join(sorted(res.data_vars))}")
        values = res[name]
        if "task" in values.dims:
            if task is None or task not in res["task"].values:
                raise ResultNotFoundError(f"{subject}: {name!r} is per task; pass task= one of "
                                          f"{', '.join(str(t) for t in res['task'].values)}")
            values = values.sel(task=task)
        if "volume_shape" not in res.attrs or "affine" not in res.attrs:
            raise ResultNotFoundError(f"{subject}: its results have no voxel grid (volume_shape, affine), e.g. "
                                      "published results imported without their cortical mask")
        ijk = np.stack([res[c].values for c in ("voxel_i", "voxel_j", "voxel_k")], axis=1)
        volume = to_volume(values.values.astype(np.float32), ijk, tuple(res.attrs["volume_shape"]))
        return nib.Nifti1Image(volume.astype(np.float32), np.asarray(res.attrs["affine"], dtype=np.float64))

    def features(self, space: str) -> xr.DataArray:
        """A feature space's features (image, feature), loaded."""
        from neurotask.storage import StoreError

        try:
            return self._store.read_features(space)
        except StoreError as e:
            raise ResultNotFoundError(str(e)) from None

    def status(self) -> list[str]:
        """What ``neurotask status`` prints (needs the config)."""
        if self.config is None:
            raise StudyNotFoundError(f"{self.paths.store}: opened without a config; open the study from its "
                                     "config file to see its status")
        from neurotask.pipeline.stages.status import status_lines

        return status_lines(self.config)


def _store_of(path: Path) -> Path | None:
    """``path`` itself when it is a study store, or the store inside a workdir."""
    for candidate in (path, path / STORE_NAME):
        if (candidate / "zarr.json").is_file() and candidate.suffix == ".zarr":
            return candidate
    return None


def open_study(config_or_path: str | Path | Config) -> Study:
    """Open a study read-only, from its config (a YAML file or a loaded ``Config``), its workdir
    or its store (``<workdir>/store.zarr``).

    Raises :class:`StudyNotFoundError` when the path does not exist or is none of these (a
    config is validated as ``neurotask`` does: ``ConfigError`` names the file and key), or when
    the config's study has no store yet."""
    from neurotask.pipeline.config import Config, load_config

    if isinstance(config_or_path, Config):
        cfg = config_or_path
    else:
        path = Path(config_or_path).expanduser()
        if not path.exists():
            raise StudyNotFoundError(f"{path}: no such file or directory (expected a study config, a study's "
                                     f"workdir or its {STORE_NAME})")
        if path.is_dir():
            store = _store_of(path)
            if store is None:
                raise StudyNotFoundError(f"{path}: not a study: no {STORE_NAME} in it and not a study store "
                                         "itself (pass the study config, its workdir or its store)")
            return Study(store.resolve(), None)
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise StudyNotFoundError(f"{path}: not a study config (a .yaml file), workdir or store")
        cfg = load_config(path)
    store = Path(cfg.store_path)
    if not (store / "zarr.json").is_file():
        raise StudyNotFoundError(f"{cfg.path}: its study has no store yet ({store}); run `neurotask run "
                                 f"--config {cfg.path}` first")
    return Study(store, cfg)
