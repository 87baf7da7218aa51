"""Variance partitioning and banded ridge on the cluster: for every configured analysis
(``partition.analyses``: 2-4 named groups of feature spaces), every union of its groups is
fitted with the fit's protocol (the same split, folds, z-scoring and alpha grid, per-voxel CV
alpha) and its test R² split by inclusion-exclusion into each group's unique variance and the
groups' shared variance (:mod:`neurotask.pipeline.stats.partition`); banded ridge (one
regularisation per feature space, :mod:`neurotask.pipeline.ridge.banded`) on the full union or
on every union, with the split of its R² between the spaces.

Units. One Dask task per (analysis, subject, voxel block): it reads its block of responses and
the analysis's features, and fits the unions one after the other (each union's decomposition is
computed, used and freed in turn), then the regions, the unique-variance sign-flip tests and the
banded fits; it writes its region of ``partition/<analysis>/<subject>``, seals it and marks
itself done. A unit computes the decompositions of its block itself, and a worker holds one
decomposition at a time instead of one per union. The decompositions are most of the cost (87%
of a whole-study BOLD5000 partition in 4000-voxel blocks, docs/performance.md), so blocks are
large: ``partition.block_size`` voxels, 16000 by default (one block for the demo's subjects, 4
for a BOLD5000 subject). Peak memory per unit: the block's responses (n x block,
float32), the analysis's features (n x p_total, float64), one union's decomposition, and the
unions' test predictions (sets x n_test x block, float64).

Resume: units with a valid marker (its chunks' checksums intact) are skipped; a rerun after a
crash or a kill does only the rest. When every block of (analysis, subject) is done, the driver
writes the unique variance's BH q-values across the subject's voxels and a final marker.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
from distributed import Client, as_completed

from neurotask.cluster.watch import ReturnFailures, TaskFailure, WorkerWatch
from neurotask.pipeline import ridge
from neurotask.pipeline.config import Config, FitSection, PartitionSection
from neurotask.pipeline.console import ProgressBar
from neurotask.pipeline.errors import ConfigError, DataError, FitError
from neurotask.pipeline.ridge import design
from neurotask.pipeline.stages.fit import (alpha_grid, check_feature_values, design_rows, design_splits,
                                           lost_with_its_worker)
from neurotask.pipeline.stats import partition as vp
from neurotask.pipeline.stats import scores as stats
from neurotask.storage import ChunkPlan, Stage, StudyStore, chunk_key, partition_group
from neurotask.storage.checksums import CHUNKS
from neurotask.storage.schema import PARTITION_BLOCK_VARS

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16000


@dataclass(frozen=True)
class Analysis:
    """One configured partition: its groups (ordered) and what is fitted.

    sets: every union, in :func:`neurotask.pipeline.stats.partition.subsets` order.
    banded: the unions fitted by banded ridge (those of >= 2 feature spaces the config asks for).
    """

    name: str
    groups: dict[str, list[str]]
    sets: tuple[tuple[str, ...], ...]
    banded: tuple[tuple[str, ...], ...]

    @property
    def spaces(self) -> list[str]:
        return [s for g in self.groups.values() for s in g]

    def set_spaces(self, members: tuple[str, ...]) -> list[str]:
        return [s for g in members for s in self.groups[g]]

    @property
    def set_names(self) -> list[str]:
        return [vp.set_name(s) for s in self.sets]

    @classmethod
    def from_config(cls, cfg: Config, name: str) -> Analysis:
        groups = cfg.partition_groups(name)
        sets = tuple(vp.subsets(list(groups)))
        mode = cfg.partition.banded
        many = [s for s in sets if sum(len(groups[g]) for g in s) >= 2]
        banded = () if mode == "none" else tuple(many) if mode == "all" else tuple(s for s in many if len(s) == len(groups))
        return cls(name, groups, sets, banded)


@dataclass(frozen=True)
class Unit:
    analysis: str
    subject: str
    block: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.analysis}/{self.subject}/block {self.block} (voxels {self.start}-{self.stop - 1})"

    @property
    def voxels(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def marker(self) -> tuple[str, str, str, str]:
        return (Stage.PARTITION, self.analysis, self.subject, chunk_key(self.block))


@dataclass
class PartitionReport:
    computed: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    finalized: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def block_size(part: PartitionSection) -> int:
    return part.block_size or DEFAULT_BLOCK_SIZE


def params(cfg: Config, analysis: Analysis) -> dict:
    """What determines a stored partition: the groups, the fit's protocol, the partition's settings."""
    return {"groups": analysis.groups, "fit": cfg.fit.fingerprint(), **cfg.partition.fingerprint(),
            "banded_sets": [vp.set_name(s) for s in analysis.banded], "block_size": block_size(cfg.partition)}


# --------------------------------------------------------------------------- worker side (pure)


def _design(fit: FitSection, X: np.ndarray, splits: ridge.Splits) -> np.ndarray:
    return design.standardize(X, splits.train) if fit.zscore_features else X


def partition_voxels(fit: FitSection, part: PartitionSection, analysis: Analysis, features: dict[str, np.ndarray],
                     Y: np.ndarray, splits: ridge.Splits) -> dict[str, np.ndarray]:
    """The partition of one voxel block.

    features: space -> (n, p_space) in Y's row order; Y (n, v) responses;
    splits: the design's, as the fit's (fit.design_splits; Y and features in fit.design_rows' order).
    Returns name -> array with the voxel axis last, as the variables of
    ``partition/<analysis>/<subject>`` (storage.schema.PARTITION_VARIABLES), except the q-values.
    """
    n, v = Y.shape
    y_test = np.asarray(Y[splits.test], dtype=np.float64)
    names, groups = analysis.set_names, list(analysis.groups)
    out = {k: np.full((len(names), v), np.nan, dtype=np.float32) for k in ("r2", "r", "alpha")}
    predictions: dict[tuple[str, ...], np.ndarray] = {}
    r2: dict[tuple[str, ...], np.ndarray] = {}
    for i, members in enumerate(analysis.sets):
        X = np.concatenate([features[s] for s in analysis.set_spaces(members)], axis=1)
        dec = ridge.prepare(_design(fit, X, splits), splits, dtype=np.dtype(fit.dtype), backend=fit.backend,
                            device=fit.device)
        result = ridge.ridge_cv(dec, Y, alpha_grid(fit, X.shape[1]), search=fit.search, backend=fit.backend,
                                device=fit.device)
        del dec
        sc = stats.test_scores(y_test, result.test_prediction)
        out["r2"][i], out["r"][i], out["alpha"][i] = sc["r2"], sc["r"], result.alpha
        predictions[members], r2[members] = result.test_prediction, sc["r2"]
    regions = vp.regions(r2, groups)
    out["region_r2"] = np.stack([regions[s] for s in analysis.sets]).astype(np.float32)
    out["unique_r2"] = np.stack([regions[(g,)] for g in groups]).astype(np.float32)
    full = tuple(groups)
    # The model without any group is the intercept: the training mean of each voxel.
    intercept = np.broadcast_to(np.asarray(Y[splits.train], dtype=np.float64).mean(axis=0), y_test.shape)
    out["unique_pvalue"] = np.stack([
        vp.unique_pvalues(y_test, predictions[full],
                          predictions.get(tuple(h for h in groups if h != g), intercept),
                          n_permutations=part.n_permutations, seed=part.permutation_seed)
        for g in groups])
    out.update(_banded(fit, part, analysis, features, Y, splits, y_test))
    return out


def _banded(fit: FitSection, part: PartitionSection, analysis: Analysis, features: dict[str, np.ndarray],
            Y: np.ndarray, splits: ridge.Splits, y_test: np.ndarray) -> dict[str, np.ndarray]:
    """Banded ridge (one regularisation per feature space) on the analysis's banded unions."""
    spaces, v = analysis.spaces, Y.shape[1]
    r2 = np.full((len(analysis.sets), v), np.nan, dtype=np.float32)
    split = np.full((len(analysis.sets), len(spaces), v), np.nan, dtype=np.float32)
    band_alpha = np.full_like(split, np.nan)
    for members in analysis.banded:
        i = analysis.sets.index(members)
        names = analysis.set_spaces(members)
        blocks = [_design(fit, features[s], splits) for s in names]
        candidates = ridge.simplex_candidates(len(names), part.n_candidates, part.candidate_seed)
        alphas = alpha_grid(fit, sum(b.shape[1] for b in blocks))
        result = ridge.banded_ridge_cv(blocks, splits, Y, alphas, candidates, dtype=np.dtype(fit.dtype),
                                       search=fit.search, backend=fit.backend, device=fit.device)
        r2[i] = stats.r2_score(y_test, result.test_prediction)
        rows = [spaces.index(s) for s in names]
        # shares of the model's own R² (its intercept, the training mean), see split_r2
        split[i, rows] = ridge.split_r2(y_test, result.band_prediction, intercept=Y[splits.train].mean(axis=0))
        band_alpha[i, rows] = result.band_alpha
    return {"banded_r2": r2, "banded_split_r2": split, "banded_alpha": band_alpha}


def read_features(store: StudyStore, subject: str, spaces: list[str]) -> dict[str, np.ndarray]:
    """Each space's features (n, p) in the subject's image order."""
    images = store.responses(subject)["image"].values
    out = {}
    for space in spaces:
        feats = store.read_features(space)
        out[space] = np.asarray(feats.values[design.align_rows(feats["image"].values, images, space)], dtype=np.float64)
    return out


def partition_unit(fit: FitSection, part: PartitionSection, analysis: Analysis, unit: Unit, store: StudyStore) -> dict:
    """Partition one voxel block, write its region, seal it, then mark it done."""
    progress = store.progress()
    if progress.is_done(*unit.marker):  # a re-execution after its worker died: nothing twice
        return {"unit": unit.name, "found_done": True}
    # the fit's design: its row order and splits (fit.design_rows)
    rows = design_rows(fit, store, unit.subject)
    Y = store.read_response_chunk(unit.subject, unit.voxels)
    features = read_features(store, unit.subject, analysis.spaces)
    if rows.order is not None:
        Y, features = Y[rows.order], {k: x[rows.order] for k, x in features.items()}
    values = partition_voxels(fit, part, analysis, features, Y, design_splits(fit, store, unit.subject, rows))
    store.write_partition(unit.analysis, unit.subject, unit.voxels, values)
    chunks = store.seal_partition(unit.analysis, unit.subject, list(values), unit.voxels)
    progress.mark_done(*unit.marker, info={"voxels": unit.stop - unit.start,
                                           "slurm_job": os.environ.get("SLURM_JOB_ID"), CHUNKS: chunks})
    return {"unit": unit.name, "found_done": False}


# --------------------------------------------------------------------------- driver side


def analyses(cfg: Config) -> list[Analysis]:
    if cfg.partition is None:
        raise ConfigError(f"{cfg.path}: no partition: section; add partition.analyses (groups of feature spaces) "
                          "to run variance partitioning")
    return [Analysis.from_config(cfg, name) for name in cfg.partition.analyses]


def _damaged(store: StudyStore, unit: Unit, record: dict | None) -> bool:
    if record is None or CHUNKS not in record:
        return record is None
    return bool(store.check_partition(unit.analysis, unit.subject, "/".join(unit.marker), record[CHUNKS]))


def plan(cfg: Config, store: StudyStore, *, overwrite: bool) -> tuple[list[tuple[Analysis, Unit]], list[tuple[Analysis, str]], int]:
    """The units still to do, every (analysis, subject) to finalize, and how many units are done.
    Creates (or checks) each partition group; a done unit whose chunks no longer match its
    marker is unmarked and redone."""
    progress = store.progress()
    size = block_size(cfg.partition)
    todo, pairs, done = [], [], 0
    for analysis in analyses(cfg):
        for subject in cfg.study.subjects:
            store.responses(subject)  # clear error if not ingested
            if overwrite:
                store.remove(partition_group(analysis.name, subject))
                progress.clear(Stage.PARTITION, analysis.name, subject)
                progress.unmark(Stage.PARTITION_FINAL, analysis.name, subject)
            if not store.has(partition_group(analysis.name, subject)):
                progress.clear(Stage.PARTITION, analysis.name, subject)  # markers of a removed group
                progress.unmark(Stage.PARTITION_FINAL, analysis.name, subject)
            store.ensure_partition(analysis.name, subject, sets=analysis.set_names, groups=list(analysis.groups),
                                   spaces=analysis.spaces, params=params(cfg, analysis), block_size=size)
            blocks = ChunkPlan(store.responses(subject).sizes["voxel"], size)
            for k in range(blocks.n_chunks):
                unit = Unit(analysis.name, subject, k, *blocks.bounds(k))
                if progress.is_done(*unit.marker):
                    if not _damaged(store, unit, progress.read(*unit.marker)):
                        done += 1
                        continue
                    logger.warning(f"recomputing the damaged partition unit {unit.name}")
                    progress.unmark(*unit.marker)
                    progress.unmark(Stage.PARTITION_FINAL, analysis.name, subject)
                todo.append((analysis, unit))
            pairs.append((analysis, subject))
    return todo, pairs, done


def finalize(cfg: Config, store: StudyStore, analysis: Analysis, subject: str) -> None:
    """BH-FDR of each group's unique-variance p across the subject's voxels; a final marker."""
    ds = store.partition(analysis.name, subject)
    q = np.empty(ds["unique_pvalue"].shape, dtype=np.float32)
    significant = np.zeros(q.shape, dtype=bool)
    for i in range(q.shape[0]):
        qi, si = stats.fdr_bh(ds["unique_pvalue"].values[i], cfg.partition.fdr)
        q[i], significant[i] = qi, si
    v = ds.sizes["voxel"]
    # The sign-flip p is at least 1/(B+1): BH passes nothing unless that many voxels reach it.
    k_min = int(np.ceil(v / (cfg.partition.fdr * (cfg.partition.n_permutations + 1))))
    if k_min > 0.01 * v:
        logger.warning(f"{partition_group(analysis.name, subject)}: with partition.n_permutations = "
                       f"{cfg.partition.n_permutations}, no voxel's unique variance can be significant unless "
                       f"{k_min} of its {v} voxels reach the smallest p; raise n_permutations")
    store.write_partition(analysis.name, subject, slice(0, v), {"unique_qvalue": q, "unique_significant": significant})
    chunks = store.seal_partition(analysis.name, subject, ["unique_qvalue", "unique_significant"], slice(0, v))
    store.progress().mark_done(Stage.PARTITION_FINAL, analysis.name, subject,
                               info={CHUNKS: chunks, "significant": dict(zip(analysis.groups, map(int, significant.sum(axis=1))))})


def check_partition_features(cfg: Config, store: StudyStore) -> None:
    spaces = sorted({s for a in analyses(cfg) for s in a.spaces})
    missing = [s for s in spaces if s not in store.feature_tasks()]
    if missing:
        raise FitError(f"{cfg.store_path}: no features for partition space(s) {', '.join(missing)}; "
                       "run `neurotask featurize` (or `simulate`) first")
    for space in spaces:
        check_feature_values(cfg, store, space)


def partition(cfg: Config, client: Client, *, overwrite: bool = False) -> PartitionReport:
    """Run every configured analysis's partition not done yet. Raises FitError naming the units
    that failed after their retries (a DataError at once); every finished unit stays stored."""
    t0 = time.perf_counter()
    store = StudyStore(cfg.store_path)
    report = PartitionReport()
    check_partition_features(cfg, store)
    todo, pairs, report.skipped = plan(cfg, store, overwrite=overwrite)
    if report.skipped:
        logger.info(f"partition: resuming, {report.skipped} unit(s) already done, {len(todo)} to do")
    task = ReturnFailures(partition_unit, (DataError,))
    futures, failed_pairs = {}, set()
    ac = as_completed()
    for analysis, unit in todo:
        f = client.submit(task, cfg.fit, cfg.partition, analysis, unit, store, retries=cfg.fit.retries,
                          key=f"partition-{unit.analysis}-{unit.subject}-{unit.block}-{time.time_ns()}", pure=False)
        futures[f] = unit
        ac.add(f)
    bar = ProgressBar(len(todo), "partition")
    with WorkerWatch(client) as watch:
        for f in ac:
            if lost_with_its_worker(f):  # its result was lost with its worker: Dask recomputes it
                ac.add(f)
                continue
            unit = futures.pop(f)
            result = f.result() if f.status == "finished" else None
            if f.status == "finished" and not isinstance(result, TaskFailure):
                report.computed += 0 if result.get("found_done") else 1
                bar.update(1)
            else:
                why = (f"{result.error} (not retried: the input is wrong)" if isinstance(result, TaskFailure)
                       else watch.explain(f.exception()))
                report.failed.append(f"{unit.name}: {why}")
                failed_pairs.add((unit.analysis, unit.subject))
                logger.warning(f"partition: {unit.name} failed: {why}")
            f.release()
    bar.close()
    progress = store.progress()
    for analysis, subject in pairs:
        if (analysis.name, subject) not in failed_pairs and not progress.is_done(Stage.PARTITION_FINAL, analysis.name, subject):
            finalize(cfg, store, analysis, subject)
            report.finalized.append((analysis.name, subject))
    report.seconds = time.perf_counter() - t0
    if report.failed:
        raise FitError(f"{len(report.failed)} partition unit(s) failed after {cfg.fit.retries} retries (a DataError "
                       "at once: it would fail again); every other unit is kept; rerun to retry:\n  "
                       + "\n  ".join(report.failed))
    return report


def summary_lines(cfg: Config, store: StudyStore) -> list[str]:
    """Per analysis and subject: the median unique R² of each group over its significant voxels."""
    lines = []
    for analysis in analyses(cfg):
        for subject in cfg.study.subjects:
            ds = store.partition(analysis.name, subject)
            parts = []
            for i, g in enumerate(analysis.groups):
                sig = ds["unique_significant"].values[i]
                median = float(np.median(ds["unique_r2"].values[i][sig])) if sig.any() else float("nan")
                parts.append(f"{g}: {int(sig.sum())} voxels unique (median R² {median:.3f})")
            lines.append(f"partition {analysis.name} {subject}: " + "; ".join(parts))
    return lines

