"""The analysis stage: fitted (or imported) results in the store -> ``analysis/`` in the store.

Reads ``results/<subject>`` (and, where an import stored them, the separate ROI-only models
``roi_results/<subject>``) for the study's subjects, runs :func:`pipeline.stats.task_structure.analyse`
with the config's ``analysis:`` settings and writes the Dataset it returns to the group
``analysis/task_structure`` (dims subject, subject2, task, task2, roi, roi_group, contrast,
...; see ``pipeline.stats.task_structure``) and, with two or more subjects, the group level
across subjects (subject-mean similarity with a bootstrap over subjects, leave-one-subject-out
consistency, clade supports, the group test against Taskonomy; ``pipeline.stats.group``) to
``analysis/group``. It never fits anything: it refuses to start while a
subject's fit is unfinished, and it touches neither the results nor the fit's progress
markers.

Resumable like every stage: the stored analysis carries a fingerprint of its inputs (the
settings, the analysis version and the bytes of every r, p, significance and noise-ceiling
array it read). A rerun on the same inputs finds it and does nothing; changed settings or
results, or a newer analysis version, recompute it. Randomness
comes from ``analysis.seed`` only, so a recomputation gives identical numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import xarray as xr

from neurotask.pipeline.stats import partition_summary
from neurotask.pipeline.stats.group import GROUP_VERSION, group_analysis, group_summary_lines
from neurotask.pipeline.stats.task_structure import AnalysisError, analyse, significance_mask, str_labels
from neurotask.pipeline.config import Config
from neurotask.pipeline.errors import NeurotaskError
from neurotask.pipeline.tasks import task_names
from neurotask.storage import staging
from neurotask.storage import ChunkPlan, Progress, Stage, StudyStore, analysis_group, results_group, roi_results_group

logger = logging.getLogger(__name__)

ANALYSIS_GROUP = analysis_group("task_structure")
GROUP_GROUP = analysis_group("group")  # the group level across subjects (pipeline.stats.group)

# the result variables whose values determine the analysis
_INPUT_VARS = ("r", "pvalue", "pvalue_perm", "significant", "noise_ceiling_r")

# Bumped when the analysis gains or changes variables: part of the fingerprint, so a stored
# analysis made by an older version is recomputed rather than reused without them
# (2: Figure 1's ROI-level test and ROI noise ceiling).
ANALYSIS_VERSION = 2


class AnalysisStageError(NeurotaskError):
    """The store does not (yet) hold what the analysis needs."""


# --------------------------------------------------------------------------- inputs


def fit_complete(store: StudyStore, progress: Progress, subject: str, tasks: list[str]) -> dict[str, str]:
    """Tasks of ``subject`` whose results are not finished -> why ('3/7 chunks fitted').

    Imported results (attrs ``imported``) are complete by construction; fitted ones are
    complete when every voxel chunk of the task has its progress marker.
    """
    ds = store.results(subject)
    if ds.attrs.get("imported"):
        return {}
    chunks = ChunkPlan(ds.sizes["voxel"], int(ds.attrs.get("chunk_size", ds.sizes["voxel"])))
    n_units = chunks.n_chunks
    out = {}
    for task in tasks:
        done = len(progress.done_units(Stage.FIT, subject, task))
        if done < n_units:
            out[task] = f"{done}/{n_units} chunks fitted"
    return out


def study_tasks(cfg: Config, results: dict[str, xr.Dataset]) -> list[str]:
    """The tasks to analyse: the configured list, or with ``tasks: all`` every known task
    present in all subjects' results (in the authors' order; others are reported)."""
    present = [set(str(t) for t in ds["task"].values) for ds in results.values()]
    if cfg.study.tasks != "all":
        for subject, have in zip(results, present):
            missing = [t for t in cfg.tasks if t not in have]
            if missing:
                raise AnalysisStageError(
                    f"{cfg.store_path}: {results_group(subject)} lack task(s) {', '.join(missing)} listed in "
                    f"study.tasks of {cfg.path}; run `neurotask fit` (or import them) first")
        return cfg.tasks
    common = set.intersection(*present)
    tasks = [t for t in task_names() if t in common]
    left_out = sorted(set.union(*present) - set(tasks))
    if left_out:
        logger.info(f"analysis: left out task(s) not in every subject's results: {', '.join(left_out)}")
    return tasks


def load_inputs(cfg: Config
                ) -> tuple[dict[str, xr.Dataset], dict[str, xr.Dataset] | None, list[str]]:
    """(results per subject, ROI-only results per subject or None, tasks), checked complete."""
    store = StudyStore(cfg.store_path)
    if not store.exists():
        raise AnalysisStageError(f"no study store at {cfg.store_path}; run `neurotask run` or `import-published` first")
    progress = store.progress()
    missing = [s for s in cfg.study.subjects if not store.has(results_group(s))]
    if missing:
        raise AnalysisStageError(
            f"{cfg.store_path}: no results for subject(s) {', '.join(missing)}; run `neurotask fit` first")
    results = {s: store.results(s) for s in cfg.study.subjects}
    tasks = study_tasks(cfg, results)
    unfinished = {s: fit_complete(store, progress, s, tasks) for s in cfg.study.subjects}
    unfinished = {s: u for s, u in unfinished.items() if u}
    if unfinished:
        lines = [f"{s}/{t}: {why}" for s, u in unfinished.items() for t, why in u.items()]
        raise AnalysisStageError(
            f"{cfg.store_path}: the fit is not finished for {len(lines)} (subject, task) pair(s); "
            f"run `neurotask fit` to finish it first:\n  " + "\n  ".join(lines[:20])
            + ("\n  ..." if len(lines) > 20 else ""))
    results = {s: ds.sel(task=tasks) for s, ds in results.items()}
    rois = None
    with_roi = [s for s in cfg.study.subjects if store.has(roi_results_group(s))]
    if with_roi:
        if len(with_roi) != len(cfg.study.subjects):
            raise AnalysisStageError(
                f"{cfg.store_path}: ROI-only results exist for {', '.join(with_roi)} but not for "
                f"{', '.join(s for s in cfg.study.subjects if s not in with_roi)}")
        rois = {s: store.read_dataset(roi_results_group(s)) for s in cfg.study.subjects}
    return results, rois, tasks


def settings(cfg: Config) -> dict:
    """The analysis keyword arguments of :func:`pipeline.stats.task_structure.analyse` from the config."""
    return cfg.analysis.model_dump()


def input_fingerprint(results: dict[str, xr.Dataset], rois: dict[str, xr.Dataset] | None, kwargs: dict) -> str:
    """sha256 of the analysis settings and of every array the analysis reads."""
    h = hashlib.sha256(json.dumps({**kwargs, "analysis_version": ANALYSIS_VERSION}, sort_keys=True).encode())
    for kind, group in (("results", results), ("roi_results", rois or {})):
        for subject, ds in group.items():
            h.update(f"{kind}/{subject}:{[str(t) for t in ds['task'].values]}".encode())
            for name in _INPUT_VARS + ("roi",):
                if name in ds.variables:
                    values = ds[name].values
                    h.update(name.encode())
                    if values.dtype.kind in "OTU":  # strings, whichever numpy string type
                        values = str_labels(values)
                    h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- storage


def _storable(ds: xr.Dataset) -> xr.Dataset:
    """Fixed-width unicode arrays -> object str (Zarr v3's specified variable-length strings)."""
    ds = ds.copy()
    for name in list(ds.coords):
        c = ds.coords[name]
        if c.dtype.kind == "U":
            ds = ds.assign_coords({name: (c.dims, c.values.astype(object), c.attrs)})
    for name in list(ds.data_vars):
        if ds[name].dtype.kind == "U":
            ds[name] = ds[name].astype(object)
    return ds


def read_analysis(cfg: Config) -> xr.Dataset:
    """The stored analysis of the study (raises if the analysis has not run)."""
    store = StudyStore(cfg.store_path)
    if not store.exists() or not store.has(ANALYSIS_GROUP):
        raise AnalysisStageError(f"{cfg.store_path}: no analysis yet ({ANALYSIS_GROUP}); run `neurotask analyse` first")
    return store.read_dataset(ANALYSIS_GROUP)


def run_analysis(cfg: Config, *, overwrite: bool = False) -> xr.Dataset:
    """Analyse the study's stored results unless an analysis of the same inputs is stored.

    Returns the stored analysis Dataset (read back from the store). With ``overwrite``, the new
    analysis is computed and written beside the old one, which is replaced only when it is
    complete (``storage.staging``).
    """
    staging.recover(StudyStore(cfg.store_path))  # a swap interrupted by a crash is finished first
    results, rois, tasks = load_inputs(cfg)
    run_partition_summaries(cfg, list(results), overwrite=overwrite)
    if len(tasks) < 2:
        raise AnalysisStageError(f"task similarity needs at least 2 tasks; the study has {tasks}")
    kwargs = settings(cfg)
    if kwargs["n_clusters"] == "auto":  # 4, or fewer tasks (a number is checked by config and analyse)
        kwargs["n_clusters"] = min(4, len(tasks))
    fingerprint = input_fingerprint(results, rois, kwargs)
    store = StudyStore(cfg.store_path)
    if store.has(ANALYSIS_GROUP) and not overwrite:
        stored = store.read_dataset(ANALYSIS_GROUP)
        if stored.attrs.get("input_fingerprint") == fingerprint:
            logger.info(f"analysis of these results and settings already in {cfg.store_path} ({ANALYSIS_GROUP}), skipped")
            run_group(store, stored, overwrite=overwrite)
            return stored
    t0 = time.perf_counter()
    logger.info(f"analysis: {len(results)} subject(s) x {len(tasks)} tasks"
                + (" (+ ROI-only models)" if rois else ""))
    try:
        out = analyse(results, roi_results=rois, **kwargs)
    except AnalysisError as e:
        raise AnalysisStageError(f"analysis of {cfg.store_path} with the settings of {cfg.path}: {e}") from None
    for line in permutation_floor_note(results, out, kwargs):
        logger.info(line)
    out.attrs.update(
        input_fingerprint=fingerprint,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        subjects_source={s: str(ds.attrs.get("source", "fit")) for s, ds in results.items()},
    )
    # Written beside the old analysis and swapped in once complete: a failure keeps the old one.
    try:
        staging.staging_store(store).write_dataset(ANALYSIS_GROUP, _storable(out))
        staging.replace(store, ANALYSIS_GROUP)
    finally:
        staging.discard(store)
    logger.info(f"analysis: written to {cfg.store_path}/{ANALYSIS_GROUP} in {time.perf_counter() - t0:.1f} s")
    stored = store.read_dataset(ANALYSIS_GROUP)
    run_group(store, stored, overwrite=overwrite)
    return stored


def run_group(store: StudyStore, analysis: xr.Dataset, *, overwrite: bool = False) -> xr.Dataset | None:
    """Write ``analysis/group`` (:func:`pipeline.stats.group.group_analysis`) from the stored
    analysis unless the group of this analysis is stored; None (and nothing written) for one
    subject. Its fingerprint is the analysis' and the group version: the group changes only
    with the analysis."""
    if analysis.sizes["subject"] < 2:
        logger.info("group analysis: skipped, it needs at least 2 subjects")
        return None
    fingerprint = f"{analysis.attrs['input_fingerprint']}+group{GROUP_VERSION}"
    if store.has(GROUP_GROUP) and not overwrite:
        stored = store.read_dataset(GROUP_GROUP)
        if stored.attrs.get("input_fingerprint") == fingerprint:
            return stored
    out = group_analysis(analysis)
    out.attrs["input_fingerprint"] = fingerprint
    try:
        staging.staging_store(store).write_dataset(GROUP_GROUP, _storable(out))
        staging.replace(store, GROUP_GROUP)
    finally:
        staging.discard(store)
    for line in group_summary_lines(out):
        logger.info(line)
    return store.read_dataset(GROUP_GROUP)


def read_group(cfg: Config) -> xr.Dataset | None:
    """The stored group analysis of the study, or None (one subject, or not analysed yet)."""
    store = StudyStore(cfg.store_path)
    return store.read_dataset(GROUP_GROUP) if store.exists() and store.has(GROUP_GROUP) else None


# --------------------------------------------------------------------------- variance partition

PARTITION = "partition"
# Bumped when the partition summary changes: part of its fingerprint
PARTITION_SUMMARY_VERSION = 1


def partition_summary_group(analysis: str) -> str:
    return analysis_group(f"partition_{analysis}")


def contrast_spaces(partition: xr.Dataset, results: xr.Dataset) -> tuple[str, str] | None:
    """The two feature spaces of a two-group partition whose groups are single spaces that the
    fit also fitted on their own (tasks of ``results``), 3D first for a Figure-3 pair; else None."""
    groups = json.loads(partition.attrs.get("groups", "{}"))
    spaces = [v[0] if len(v) == 1 else None for v in groups.values()]
    tasks = {str(t) for t in results["task"].values}
    if len(spaces) != 2 or None in spaces or not set(spaces) <= tasks:
        return None
    from neurotask.pipeline.stats.task_structure import CONTRASTS

    flipped = tuple(reversed(spaces)) in CONTRASTS.values()
    return tuple(reversed(spaces)) if flipped else tuple(spaces)  # type: ignore[return-value]


def summarise_partition(cfg: Config, analysis: str, partitions: dict[str, xr.Dataset],
                      results: dict[str, xr.Dataset]) -> xr.Dataset:
    """``analysis/partition_<analysis>``: :func:`partition_summary.study_summary` of every
    subject's partition, with the noise-ceiling-normalised regions where the results carry
    ``noise_ceiling_r2`` and, for two single-space groups fitted separately, Figure 3's
    contrast per ROI (``contrast_*``, among the voxels significant for either space by the
    analysis' significance and FDR)."""
    a = cfg.analysis
    rois = sorted({str(x) for ds in partitions.values() for x in str_labels(ds["roi"].values)} - {""})
    per_subject, pair = {}, None
    for subject, part in partitions.items():
        res = results[subject].sel(voxel=part["voxel"].values) if "voxel" in part.coords else results[subject]
        if res.sizes["voxel"] != part.sizes["voxel"] or not (str_labels(res["roi"].values)
                                                           == str_labels(part["roi"].values)).all():
            raise AnalysisStageError(f"{cfg.store_path}: {PARTITION}/{analysis}/{subject} has voxels other than "
                                     f"{results_group(subject)}'s; rerun the partition fit")
        ceiling = res["noise_ceiling_r2"].values if "noise_ceiling_r2" in res else None
        summary = partition_summary.subject_summary(part, rois, ceiling, n_bootstrap=a.n_bootstrap, seed=a.seed)
        pair = contrast_spaces(part, res)
        if pair is not None:
            sig = significance_mask(res.sel(task=list(pair)), a.significance, a.fdr)
            r = res["r"].sel(task=list(pair)).transpose("task", "voxel").values
            index = partition_summary.roi_index(str_labels(part["roi"].values), rois)
            c = partition_summary.roi_contrast(r[0], r[1], sig[0] | sig[1], index, len(rois))
            for key, value in c.items():
                summary[f"contrast_{key}"] = (("roi",), value)
        per_subject[subject] = summary
    out = partition_summary.study_summary(per_subject)
    first = next(iter(partitions.values()))
    out.attrs.update(analysis=analysis, groups=first.attrs.get("groups", "{}"), ci=a.ci,
                     n_bootstrap=a.n_bootstrap, seed=a.seed, ceiling_floor=partition_summary.CEILING_FLOOR,
                     significance=a.significance, fdr=a.fdr,
                     contrast_spaces=json.dumps(list(pair) if pair else []))
    return out


def _partition_fingerprint(cfg: Config, partitions: dict[str, xr.Dataset], results: dict[str, xr.Dataset]) -> str:
    h = hashlib.sha256(json.dumps({**settings(cfg), "version": PARTITION_SUMMARY_VERSION,
                                   "floor": partition_summary.CEILING_FLOOR}, sort_keys=True).encode())
    for subject, part in partitions.items():
        h.update(f"{subject}:{part.attrs.get('groups', '')}".encode())
        for name in ("region_r2", "unique_significant"):
            h.update(np.ascontiguousarray(part[name].values).tobytes())
        h.update("|".join(str_labels(part["roi"].values)).encode())
        for name in _INPUT_VARS + ("noise_ceiling_r2",):
            if name in results[subject]:
                h.update(name.encode() + np.ascontiguousarray(results[subject][name].values).tobytes())
    return h.hexdigest()


def run_partition_summaries(cfg: Config, subjects: list[str], *, overwrite: bool = False) -> dict[str, xr.Dataset]:
    """Summarise every ``partition/<analysis>`` group of the store (for the study's ``subjects``)
    into ``analysis/partition_<analysis>``, skipped when stored for the same inputs. Nothing
    when the store holds no partition. -> analysis name -> stored summary."""
    store = StudyStore(cfg.store_path)
    out: dict[str, xr.Dataset] = {}
    results: dict[str, xr.Dataset] = {}
    for analysis in store.members(PARTITION):
        here = [s for s in subjects if s in store.members(f"{PARTITION}/{analysis}")]
        if not here:
            continue
        results.update({s: store.results(s) for s in here if s not in results})
        partitions = {s: store.read_dataset(f"{PARTITION}/{analysis}/{s}") for s in here}
        fingerprint = _partition_fingerprint(cfg, partitions, results)
        group = partition_summary_group(analysis)
        if store.has(group) and not overwrite:
            stored = store.read_dataset(group)
            if stored.attrs.get("input_fingerprint") == fingerprint:
                out[analysis] = stored
                continue
        summary = summarise_partition(cfg, analysis, partitions, results)
        summary.attrs.update(input_fingerprint=fingerprint, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        store.write_dataset(group, _storable(summary))
        logger.info(f"analysis: variance partition {analysis!r} of {len(here)} subject(s) summarised in {group}")
        out[analysis] = store.read_dataset(group)
    return out


def permutation_floor_note(results: dict[str, xr.Dataset], analysis: xr.Dataset, kwargs: dict) -> list[str]:
    """Why tasks may have no significant voxel under permutation p-values: with N
    permutations no p is below 1/(N+1), and BH at q over m voxels rejects nothing unless at
    least ceil(p_min m / q) voxels reach that floor. -> lines to log (none if not the case)."""
    if kwargs["significance"] != "permutation":
        return []
    lines = []
    for subject, ds in results.items():
        floor = float(np.nanmin(ds["pvalue_perm"].values)) if ds.sizes["voxel"] else np.nan
        needed = int(np.ceil(floor * ds.sizes["voxel"] / kwargs["fdr"] - 1e-9)) if np.isfinite(floor) else 0
        empty = [str(t) for t in analysis["task"].values
                 if int(analysis["n_significant"].sel(subject=subject, task=t)) == 0]
        if needed > 1 and empty:
            lines.append(
                f"note: {subject}: permutation p-values are >= {floor:.3g}, so BH at q < {kwargs['fdr']:g} over "
                f"{ds.sizes['voxel']} voxels finds a task's voxels only if >= {needed} of them reach that floor; "
                f"none for {', '.join(empty)}. More permutations (fit.n_permutations) lower the floor.")
    return lines


def summary_lines(analysis: xr.Dataset) -> list[str]:
    """A few lines of the headline comparison with Taskonomy, for the terminal."""
    a = analysis
    if not np.isfinite(float(a.spearman_taskonomy_mean)):
        return ["no comparison with Taskonomy: it needs at least 3 tasks with Taskonomy affinities"]
    lines = [f"brain vs Taskonomy task similarity: Spearman r {float(a.spearman_taskonomy_mean):.3f} "
             f"(Mantel p {float(a.mantel_p_mean):.3g}, {a.attrs['ci']:.0%} CI "
             f"[{float(a.spearman_taskonomy_mean_ci[0]):.3f}, {float(a.spearman_taskonomy_mean_ci[1]):.3f}])",
             f"tree cut at {a.attrs['n_clusters']} ({a.attrs['linkage']} linkage): ARI vs Taskonomy clusters "
             f"{float(a.ari_taskonomy_mean):.3f}, vs Taskonomy's tree {float(a.ari_taskonomy_tree_mean):.3f}"]
    none = [str(t) for t in a.task.values if bool(a.no_significant_voxel.sel(task=t).all())]
    if none:
        lines.append(f"no significant voxel in any subject: {', '.join(none)}")
    return lines
