"""Fit orchestration: every (subject, task, voxel chunk) as a Dask task.

Per (subject, task), one task builds the design matrix and its fold decompositions
(``ridge.prepare``); it stays on the cluster as a future that every voxel-chunk task of that
pair takes as input, so it is computed once and never goes through the client. Subjects who
saw the same images share it: the design's rows are the images sorted by name and the split is
drawn by name (fit.test_set), so their design matrices, splits and decompositions are equal,
and one decomposition per (task, image set) serves all of them. Each chunk task
reads its own voxel chunk from the store, runs the ridge CV, computes its statistics, writes
its region of ``results/<subject>`` and then marks itself done. Responses never travel through
the client. When all chunks of a pair are done, the driver computes the FDR q-values across the
pair's voxels (they need every voxel's p). Every task gets the fit's parameters as one
the frozen ``fit:`` section (:class:`~pipeline.config.FitSection`), built once on the driver.

Resume: units with a valid progress marker are skipped; a rerun after a crash or a kill does
only the rest. Few pairs are in flight at once, so decompositions do not pile up in memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from distributed import Client, Future, as_completed

from neurotask.pipeline import ridge
from neurotask.pipeline.config import Config, FitSection
from neurotask.pipeline.console import ProgressBar
from neurotask.cluster.watch import ReturnFailures, TaskFailure, WorkerWatch
from neurotask.pipeline.errors import ConfigError, DataError, FitError, StoreError
from neurotask.pipeline.ridge import design
from neurotask.pipeline.stats import noise_ceiling
from neurotask.pipeline.stats import scores as stats
from neurotask.pipeline.stages.status import FitRunState
from neurotask.pipeline.stages.verify import CHUNKS, marker_damage, responses_damage
from neurotask.pipeline.tasks import task_label
from neurotask.storage import (CEILING_VARS, ChunkPlan, Progress, Stage, StudyStore, chunk_key, features_group,
                               results_group)

logger = logging.getLogger(__name__)

# Test hook: "SUBJECT/TASK/CHUNK" makes that unit raise, to exercise retries and failure reports.
FAULT_ENV = "NEUROTASK_FAULT_UNIT"


@dataclass(frozen=True)
class Unit:
    subject: str
    task: str
    task_index: int
    chunk: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.subject}/{self.task}/chunk {self.chunk} (voxels {self.start}-{self.stop - 1})"

    @property
    def voxels(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def marker(self) -> tuple[str, str, str, str]:
        return (Stage.FIT, self.subject, self.task, chunk_key(self.chunk))


@dataclass
class FitReport:
    computed: int = 0
    skipped: int = 0
    found_done: int = 0  # submitted, but a worker found the unit's marker (a re-execution)
    failed: list[str] = field(default_factory=list)
    finalized: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def alpha_grid(spec: FitSection, n_features: int) -> np.ndarray:
    if spec.alphas == "paper":
        return ridge.paper_alphas(n_features, spec.n_alphas)
    return np.sort(np.asarray(spec.alphas, dtype=np.float64))


def test_set_kind(spec: FitSection, shared: np.ndarray | None) -> str:
    """fit.test_set with 'auto' resolved: 'shared' when the data mark a common test set."""
    if spec.test_set == "auto":
        return "shared" if shared is not None else "random"
    return spec.test_set


def splits_for(spec: FitSection, images, shared: np.ndarray | None = None) -> ridge.Splits:
    """The test set and CV folds of a subject's rows (fit.test_set).

    images: (n,) the rows' image names, in the responses' order; or an int n for rows without
    names, which only test_set 'position' can split. shared: (n,) bool, the responses'
    ``shared`` coordinate (NSD's common test set), None where the data have none.
    """
    kind = test_set_kind(spec, shared)
    folds = {"cv": spec.cv, "n_folds": spec.n_folds, "validation_fraction": spec.validation_fraction,
             "seed": spec.seed}
    if kind == "position":
        n = images if isinstance(images, (int, np.integer)) else len(images)
        return ridge.make_splits(int(n), test_fraction=spec.test_fraction, **folds)
    if isinstance(images, (int, np.integer)):
        raise ValueError(f"fit.test_set {spec.test_set!r} splits by image name: pass the names, not a count")
    names = [str(x) for x in images]
    if kind == "shared":
        if shared is None:
            raise DataError("fit.test_set 'shared' needs the common test set that the NSD ingest marks (the "
                            "responses' 'shared' coordinate); these responses have none: use 'random'")
        if not 0 < int(np.sum(shared)) < len(names) - spec.n_folds:
            raise DataError(f"fit.test_set 'shared': {int(np.sum(shared))} of the {len(names)} images are shared, "
                            "which leaves no test set or too few training images for the folds")
        return ridge.splits_by_name(names, test=np.asarray(shared, dtype=bool), **folds)
    return ridge.splits_by_name(names, test_fraction=spec.test_fraction, **folds)


def subject_splits(spec: FitSection, store: StudyStore, subject: str) -> ridge.Splits:
    """The split of a subject's ingested rows (images in the responses' order)."""
    resp = store.responses(subject)
    shared = resp["shared"].values if "shared" in resp.coords else None
    return splits_for(spec, resp["image"].values, shared)


@dataclass(frozen=True)
class DesignRows:
    """The rows of a subject's design matrix: ``order`` (n,) indexes the responses' rows (None:
    their own order), and ``key`` names the design; subjects with equal keys have equal design
    matrices for every task, so they share its decompositions."""

    order: np.ndarray | None
    key: str


def design_rows(spec: FitSection, store: StudyStore, subject: str) -> DesignRows:
    """Split by image name (fit.test_set other than 'position'): the design's rows are the
    subject's images sorted by name, so that subjects who saw the same images (with the same
    shared set) have the same design, splits and decompositions, whatever their presentation
    order. 'position' keeps the responses' order, and the first versions' results bit for bit."""
    resp = store.responses(subject)
    if spec.test_set == "position":
        return DesignRows(None, f"subject:{subject}")
    names = np.asarray([str(x) for x in resp["image"].values])
    order = np.argsort(names, kind="stable")
    digest = hashlib.sha256("\n".join(names[order]).encode())
    if "shared" in resp.coords:
        digest.update(np.asarray(resp["shared"].values, dtype=bool)[order].tobytes())
    return DesignRows(order, f"images:{digest.hexdigest()[:16]}")


def design_splits(spec: FitSection, store: StudyStore, subject: str, rows: DesignRows) -> ridge.Splits:
    """The splits of the design's rows (:func:`design_rows`)."""
    if rows.order is None:
        return subject_splits(spec, store, subject)
    resp = store.responses(subject)
    shared = resp["shared"].values[rows.order] if "shared" in resp.coords else None
    return splits_for(spec, resp["image"].values[rows.order], shared)


# --------------------------------------------------------------------------- worker side


def decompose_design(spec: FitSection, X: np.ndarray, splits: ridge.Splits | None = None) -> ridge.Decomposition:
    """X (n_images, p) in the subject's image order -> its per-fold decompositions, after the
    configured z-scoring (with the training part's statistics). splits: the subject's
    (:func:`subject_splits`); None: rows without names, split by position."""
    splits = splits if splits is not None else ridge.make_splits(
        X.shape[0], test_fraction=spec.test_fraction, cv=spec.cv, n_folds=spec.n_folds,
        validation_fraction=spec.validation_fraction, seed=spec.seed)
    if spec.zscore_features:
        X = design.standardize(X, splits.train)
    return ridge.prepare(X, splits, dtype=np.dtype(spec.dtype), backend=spec.backend, device=spec.device)


def build_decomposition(spec: FitSection, store: StudyStore, subject: str, task: str) -> ridge.Decomposition:
    """Design matrix of (subject, task) in the design's row order (:func:`design_rows`),
    decomposed per fold."""
    rows = design_rows(spec, store, subject)
    feats = store.read_features(task)
    images = store.responses(subject)["image"].values
    if rows.order is not None:
        images = images[rows.order]
    X = feats.values[design.align_rows(feats["image"].values, images, task)]
    return decompose_design(spec, X, design_splits(spec, store, subject, rows))


def fit_voxels(spec: FitSection, decomposition: ridge.Decomposition, Y: np.ndarray, alphas: np.ndarray) -> dict:
    """The ridge CV and its statistics on responses Y (n_images, v) -> name: (v,) result values."""
    result = ridge.ridge_cv(decomposition, Y, alphas, search=spec.search, backend=spec.backend, device=spec.device)
    y_test = Y[decomposition.final.eval_rows]
    scores = stats.test_scores(y_test, result.test_prediction)
    values = {"r": scores["r"].astype(np.float32), "r2": scores["r2"].astype(np.float32),
              "alpha": result.alpha, "pvalue": scores["pvalue"]}
    if spec.permutation:
        # The same permutations for every chunk (a function of seed and n_test only), so a
        # voxel's p does not depend on the chunking.
        perm = stats.permutation_test(y_test, result.test_prediction, spec.n_permutations, spec.permutation_seed)
        values["pvalue_perm"] = perm.pvalue
    return values


def fit_unit(spec: FitSection, unit: Unit, store: StudyStore, decomposition: ridge.Decomposition,
             alphas: np.ndarray) -> dict:
    """Fit one voxel chunk, write its results region, then mark it done. The chunk's rows are
    put in the design's order (:func:`design_rows`), the decomposition's."""
    if os.environ.get(FAULT_ENV) == f"{unit.subject}/{unit.task}/{unit.chunk}":
        raise RuntimeError(f"injected fault ({FAULT_ENV}) in {unit.name}")
    progress = store.progress()
    if progress.is_done(*unit.marker):
        # Dask runs this again when the worker holding the finished result died before the
        # client collected it: the chunk is in the store already, so write nothing twice.
        return {"unit": unit.name, "nan_r": None}
    order = design_rows(spec, store, unit.subject).order
    Y = store.read_response_chunk(unit.subject, unit.voxels)
    values = fit_voxels(spec, decomposition, Y if order is None else Y[order], alphas)
    store.write_result_chunk(unit.subject, unit.task_index, unit.voxels, values)
    # Durable chunks and their checksums before the marker that vouches for them.
    chunks = store.seal_results(unit.subject, list(values), (slice(unit.task_index, unit.task_index + 1), unit.voxels))
    # The SLURM job in the marker says which worker job wrote the chunk (None outside SLURM).
    progress.mark_done(*unit.marker, info={"voxels": unit.stop - unit.start,
                                           "slurm_job": os.environ.get("SLURM_JOB_ID"), CHUNKS: chunks})
    return {"unit": unit.name, "nan_r": int(np.isnan(values["r"]).sum())}


# --------------------------------------------------------------------------- driver side


def plan_units(store: StudyStore, progress: Progress, subject: str, tasks: list[str],
               task_order: list[str]) -> dict[tuple[str, str], tuple[list[Unit], int]]:
    """Per (subject, task): the units still to do, and how many are already done.

    A done unit whose chunks no longer match its marker's checksums is unmarked and redone."""
    chunks = store.voxel_chunks(subject)
    out = {}
    for task in tasks:
        done = progress.done_units(Stage.FIT, subject, task)
        damaged = []
        for key in sorted(done):
            parts = (Stage.FIT, subject, task, key)
            record = progress.read(*parts)
            if record is None or marker_damage(store, subject, parts, record):
                damaged.append(key)
        if damaged:
            logger.warning(f"recomputing {len(damaged)} damaged unit(s): "
                           + ", ".join(f"{subject}/{task}/chunk {int(k)}" for k in damaged))
            for key in damaged:
                progress.unmark(Stage.FIT, subject, task, key)
            done -= set(damaged)
        units = [Unit(subject, task, task_order.index(task), k, *chunks.bounds(k)) for k in range(chunks.n_chunks)]
        todo = [u for u in units if chunk_key(u.chunk) not in done]
        out[(subject, task)] = (todo, len(units) - len(todo))
    return out


def finalize_pair(spec: FitSection, store: StudyStore, subject: str, task_index: int) -> None:
    """BH-FDR across all voxels of (subject, task), for the parametric and, if computed, the
    permutation p-values: writes their q-values and significance, then a finalize marker with
    their chunks' checksums."""
    values = {}
    for suffix in ("", "_perm") if spec.permutation else ("",):
        q, significant = stats.fdr_bh(store.read_result(subject, "pvalue" + suffix, task_index), spec.fdr)
        values.update({"qvalue" + suffix: q, "significant" + suffix: significant})
    store.write_result_chunk(subject, task_index, slice(None), values)
    chunks = store.seal_results(subject, list(values), (slice(task_index, task_index + 1), slice(None)))
    task = store.result_tasks(subject)[task_index]
    # the count, for `neurotask status` (which reads markers, never the results arrays)
    store.progress().mark_done(Stage.FINALIZE, subject, task,
                               info={CHUNKS: chunks, "significant": int(np.sum(values["significant"]))})


def subject_noise_ceiling(store: StudyStore, subject: str, test_rows: np.ndarray) -> list[dict] | None:
    """Per-voxel noise ceiling of the test-set r from the subject's repeated images (NCSNR),
    for test responses averaging as many showings as each test image had. Written to
    ``results/<subject>`` once; returns the checksum records of its chunks (durable), None
    when the subject has no repeated images."""
    resp = store.responses(subject)
    if "repeat_responses" not in resp:
        return None
    m_test = resp["n_showings"].values[test_rows] if "n_showings" in resp else 1
    for sl in ChunkPlan(resp.sizes["voxel"], int(resp.attrs["chunk_size"])):
        sn = noise_ceiling.signal_noise(resp["repeat_responses"][:, :, sl].values.astype(np.float64))
        nc = noise_ceiling.noise_ceiling(sn.ncsnr, m_test)
        store.write_voxel_results(subject, sl, {"ncsnr": sn.ncsnr, "noise_ceiling_r": nc.r, "noise_ceiling_r2": nc.r2})
    return store.seal_results(subject, list(CEILING_VARS), (slice(None),))


def _first(names: list[str], n: int = 5) -> str:
    """The first ``n`` names, and how many more, for one line of an error message."""
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_feature_values(cfg: Config, store: StudyStore, task: str) -> None:
    """Refuse features the fit cannot use, before any task is submitted (on a worker they
    would fail every chunk, and every retry, with a traceback that names neither the group nor
    the rows): images of a subject without features, NaN/Inf rows, every feature constant.
    Constant columns are only warned about: z-scoring centres them, the ridge ignores them.

    Raises FitError naming the store group, the task and the first bad rows (image names)."""
    group = features_group(task)
    feats = store.read_features(task)
    names = [str(x) for x in feats["image"].values]
    position = {name: i for i, name in enumerate(names)}
    used: set[int] = set()
    for subject in cfg.study.subjects:
        images = [str(x) for x in store.responses(subject)["image"].values]
        missing = [x for x in images if x not in position]
        if missing:
            raise FitError(f"{cfg.store_path}: {group} lacks {len(missing)} of the subject's {len(images)} images "
                           f"(subject {subject}, task {task}): {_first(missing)}; features and responses must "
                           "cover the same images")
        used.update(position[x] for x in images)
    rows = np.array(sorted(used), dtype=np.int64)  # only the rows some subject's design uses
    X = np.asarray(feats.values[rows], dtype=np.float64)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        bad_names = [names[i] for i in rows[bad]]
        raise FitError(f"{cfg.store_path}: {group} (task {task}) has NaN or infinite values in {int(bad.sum())} "
                       f"of its {len(rows)} used rows: {_first(bad_names)}; rerun `neurotask featurize` "
                       "(an interrupted run leaves NaN rows)")
    constant = np.ptp(X, axis=0) == 0 if len(rows) else np.ones(X.shape[1], dtype=bool)
    if constant.all():
        raise FitError(f"{cfg.store_path}: {group} (task {task}): every one of its {X.shape[1]} features is "
                       f"constant over the {len(rows)} used images (e.g. {_first([names[i] for i in rows], 3)}); "
                       "nothing can be fitted on them")
    if constant.any():
        labels = [str(x) for x in feats["feature"].values] if "feature" in feats.coords else \
            [str(i) for i in range(X.shape[1])]
        logger.warning(f"{group} (task {task}): {int(constant.sum())} of {X.shape[1]} features are constant "
                       f"over the used images and carry no information: {_first([labels[i] for i in np.flatnonzero(constant)])}")


def check_features(cfg: Config, store: StudyStore, progress: Progress) -> None:
    """Refuse tasks without features, or with the features of an interrupted featurize
    (their unwritten rows are NaN), or with values the fit cannot use
    (:func:`check_feature_values`): never fit on them."""
    missing = [t for t in cfg.tasks if t not in store.feature_tasks()]
    if missing:
        raise FitError(f"{cfg.store_path}: no features for task(s) {', '.join(missing)}; "
                       "run `neurotask featurize` (or `simulate` for a synthetic study) first")
    incomplete = [t for t in cfg.tasks
                  if "featurize" in store.feature_attrs(t) and not progress.is_done(Stage.FEATURIZED, t)]
    if incomplete:
        raise FitError(f"{cfg.store_path}: features of {', '.join(incomplete)} are incomplete (featurize was "
                       "interrupted); rerun `neurotask featurize`")
    for task in cfg.tasks:
        check_feature_values(cfg, store, task)


def check_splits(cfg: Config) -> dict[str, ridge.Splits]:
    """Refuse fit settings the ingested data cannot take (fit.n_folds above a subject's training
    images, fit.test_set 'shared' without a shared set) before a cluster starts or the fit writes
    its results groups, and log how the subjects' test sets compare; subjects not ingested yet
    are left to the stage's own error. -> subject: its splits."""
    store = StudyStore(cfg.store_path)
    if not store.exists():
        return {}
    out, test_images, kinds = {}, {}, set()
    for subject in cfg.study.subjects:
        try:
            resp = store.responses(subject)
        except StoreError:
            continue
        n_images = resp.sizes["image"]
        n_train = ridge.n_training(n_images, cfg.fit.test_fraction)
        if cfg.fit.cv == "kfold" and cfg.fit.n_folds > n_train:
            raise ConfigError(f"{cfg.path}: fit.n_folds must be <= the training images of {subject} ({n_train} of "
                              f"its {n_images}, fit.test_fraction held out), got {cfg.fit.n_folds}")
        try:
            out[subject] = subject_splits(cfg.fit, store, subject)
        except (DataError, ValueError) as e:
            raise ConfigError(f"{cfg.path}: {subject}: {e}") from None
        test_images[subject] = set(resp["image"].values[out[subject].test].tolist())
        kinds.add(test_set_kind(cfg.fit, resp["shared"].values if "shared" in resp.coords else None))
    if test_images:
        kind = "/".join(sorted(kinds))
        sizes = sorted({len(t) for t in test_images.values()})
        common = set.intersection(*test_images.values())
        same = all(t == common for t in test_images.values())
        logger.info(f"test set ({kind}): {'/'.join(map(str, sizes))} images per subject"
                    + (f", the same for all {len(test_images)} subjects" if same and len(test_images) > 1 else
                       f", {len(common)} of them common to all {len(test_images)} subjects" if len(test_images) > 1
                       else ""))
    return out


def prepare_subjects(cfg: Config, store: StudyStore, progress: Progress, *, overwrite: bool
                     ) -> tuple[deque[tuple[str, str, list[Unit]]], list[tuple[str, str, int]], int]:
    """Per subject: the results group (made or checked against the fit's parameters), the
    noise ceiling, and the units still to do. Returns (pending (subject, task, units) pairs,
    every (subject, task, task index) to finalize, units already done)."""
    spec = cfg.fit
    params, labels = spec.fingerprint(), [task_label(t) for t in cfg.tasks]
    pending: deque[tuple[str, str, list[Unit]]] = deque()
    complete_pairs: list[tuple[str, str, int]] = []
    skipped = 0
    # Responses are the fit's input: damaged ones are refused before anything is written (the
    # fit cannot recompute them; a re-ingest can).
    damaged = [d for subject in cfg.study.subjects for d in (responses_damage(store, subject) or [])]
    if damaged:
        raise FitError(f"{cfg.store_path}: {len(damaged)} damaged response chunk(s); re-ingest with "
                       "`neurotask ingest --overwrite`:\n  " + "\n  ".join(map(str, damaged)))
    for subject in cfg.study.subjects:
        store.responses(subject)  # clear error if not ingested
        if overwrite:
            store.remove(results_group(subject))
            progress.clear(Stage.FIT, subject)
            progress.unmark(Stage.CEILING, subject)
        if not store.has(results_group(subject)):
            # Finalize markers of removed results (e.g. a re-ingest) vouch for chunks now gone.
            progress.clear(Stage.FINALIZE, subject)
        order = store.ensure_results(subject, cfg.tasks, params, task_labels=labels, permutation=spec.permutation)
        repaired = store.repair_results_metadata(subject, spec.permutation)
        if repaired:
            logger.warning(f"{results_group(subject)}: rewrote the missing array metadata of "
                           f"{', '.join(repaired)} (from the consolidated metadata, or the results template)")
        ceiling = progress.read(Stage.CEILING, subject)
        if ceiling is not None and marker_damage(store, subject, (Stage.CEILING, subject), ceiling):
            logger.warning(f"recomputing the damaged noise ceiling of {subject}")
            progress.unmark(Stage.CEILING, subject)
        if not progress.is_done(Stage.CEILING, subject):
            chunks = subject_noise_ceiling(store, subject, subject_splits(spec, store, subject).test)
            if chunks is not None:
                progress.mark_done(Stage.CEILING, subject, info={CHUNKS: chunks})
        for (subj, task), (todo, n_done) in plan_units(store, progress, subject, cfg.tasks, order).items():
            skipped += n_done
            if todo:
                pending.append((subj, task, todo))
            complete_pairs.append((subj, task, order.index(task)))
    return pending, complete_pairs, skipped


# A run whose workers all fail at start stops early, before any unit finished: after this many
# KilledWorker failures in a row, or once the cluster has had no worker for this many seconds
# after losing its last one (not counted before: SLURM jobs may wait in the queue for long).
STOP_AFTER_KILLED = 3
STOP_WITHOUT_WORKERS_S = 120.0


def lost_with_its_worker(future: Future) -> bool:
    """True if a future that as_completed yielded is no longer done: its key finished but its
    result was lost with the worker holding it ("lost"), or is being recomputed ("pending")."""
    return future.status in ("lost", "pending")


def _failure_text(result: object, future: Future, watch: WorkerWatch) -> str | None:
    """Why a unit failed (None if it did not): a deterministic error returned by the task, or
    the exception Dask reports after the retries, KilledWorker in words."""
    if future.status == "finished":
        return f"{result.error} (not retried: the input is wrong)" if isinstance(result, TaskFailure) else None
    return watch.explain(future.exception())


def share_decompositions(pending, design_keys: dict[str, str]) -> deque[tuple[str, str, list[tuple[str, list[Unit]]]]]:
    """(subject, task, units) pairs -> (task, design key, [(subject, units), ...]) groups, one
    per decomposition, in the order of each group's first pair."""
    groups: dict[tuple[str, str], list[tuple[str, list[Unit]]]] = {}
    for subject, task, units in pending:
        groups.setdefault((task, design_keys[subject]), []).append((subject, units))
    return deque((task, key, members) for (task, key), members in groups.items())


def fit(cfg: Config, client: Client, *, overwrite: bool = False,
        max_pairs_in_flight: int | None = None) -> FitReport:
    """Fit every configured (subject, task) not fitted yet. Raises FitError if units failed
    after their retries (DataError: at once, it would fail again), or at the first sign that
    every worker dies at start; every other finished unit stays in the store."""
    t0 = time.perf_counter()
    store = StudyStore(cfg.store_path)
    progress = store.progress()
    spec = cfg.fit
    report = FitReport()

    check_features(cfg, store, progress)  # before anything is written or submitted
    pending, complete_pairs, report.skipped = prepare_subjects(cfg, store, progress, overwrite=overwrite)

    total = sum(len(u) for _, _, u in pending)
    if report.skipped:
        logger.info(f"resuming: {report.skipped} unit(s) already done, {total} to do")
    # One decomposition per (task, design): subjects who saw the same images share it.
    keys = {subject: design_rows(spec, store, subject).key for subject in dict.fromkeys(p[0] for p in pending)}
    groups = share_decompositions(pending, keys)
    if len(groups) < len(pending):
        logger.info(f"fit: {len(groups)} decompositions for {len(pending)} (subject, task) pairs (subjects who "
                    "saw the same images share them)")
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    limit = max_pairs_in_flight or max(2, n_workers)
    bar = ProgressBar(total, "fit")  # finished units only; failures are logged and counted apart
    run_state = FitRunState(progress, client)  # for `neurotask status`
    futures: dict[Future, tuple[Unit, tuple[str, str], tuple[str, str]]] = {}
    remaining: dict[tuple[str, str], int] = {}
    decompositions: dict[tuple[str, str], Future] = {}
    ac = as_completed()
    failed_pairs: set[tuple[str, str]] = set()
    # DataError (bad input) comes back as a TaskFailure record: Dask would retry a raised one
    decompose_task = ReturnFailures(build_decomposition, (DataError,))
    unit_task = ReturnFailures(fit_unit, (DataError,))

    def submit_next_pair() -> None:
        task, design_key, members = groups.popleft()
        first = members[0][0]
        gkey = (task, design_key)
        dec = client.submit(decompose_task, spec, store, first, task,
                            key=f"decompose-{first}-{task}-{time.time_ns()}", retries=spec.retries)
        alphas = alpha_grid(spec, store.feature_count(task))
        decompositions[gkey] = dec
        remaining[gkey] = sum(len(units) for _, units in members)
        for subject, units in members:
            for u in units:
                f = client.submit(unit_task, spec, u, store, dec, alphas,
                                  key=f"fit-{subject}-{task}-{u.chunk}-{time.time_ns()}", retries=spec.retries,
                                  pure=False)
                futures[f] = (u, (subject, task), gkey)
                run_state.add(f.key, u.subject, u.task, u.chunk)
                ac.add(f)

    def stop_reason(watch: WorkerWatch, killed_in_a_row: int) -> str | None:
        if report.computed:
            return None
        if killed_in_a_row >= STOP_AFTER_KILLED:
            return f"{killed_in_a_row} units in a row failed with KilledWorker and none finished"
        if watch.none_since is not None and time.monotonic() - watch.none_since > STOP_WITHOUT_WORKERS_S:
            return f"no worker has been alive for {STOP_WITHOUT_WORKERS_S:.0f} s and no unit finished"
        return None

    with WorkerWatch(client) as watch:
        while groups and len(decompositions) < limit:
            submit_next_pair()
        killed_in_a_row = 0
        while not ac.is_empty():
            if not ac.has_ready():  # poll, so that a cluster without workers is noticed
                reason = stop_reason(watch, killed_in_a_row)
                if reason:
                    break
                time.sleep(0.1)
                continue
            f = next(ac)
            if lost_with_its_worker(f):
                # It finished, then the worker holding its (small) result died before we read
                # it: Dask recomputes it since we still hold the future, and the rerun finds the
                # unit's marker. Wait for that instead of calling it failed.
                ac.add(f)
                continue
            unit, key, gkey = futures.pop(f)
            result = f.result() if f.status == "finished" else None
            failure = _failure_text(result, f, watch)
            if failure is None:
                # A rerun of a unit whose marker a worker found (fit_unit returns nan_r None)
                # computed nothing: not counted as computed.
                if isinstance(result, dict) and result.get("nan_r", 0) is None:
                    report.found_done += 1
                else:
                    report.computed += 1
                killed_in_a_row = 0
                bar.update(1)
            else:
                report.failed.append(f"{unit.name}: {failure}")
                failed_pairs.add(key)
                killed_in_a_row = killed_in_a_row + 1 if failure.startswith("KilledWorker") else 0
                logger.warning(f"fit: {unit.name} failed: {failure}")
            run_state.done(f.key)
            f.release()
            remaining[gkey] -= 1
            if remaining[gkey] == 0:
                decompositions.pop(gkey).release()
                if groups:
                    submit_next_pair()
            reason = stop_reason(watch, killed_in_a_row)
            if reason:
                break
        else:
            reason = None
        if reason:
            client.cancel(list(futures))
            bar.close()
            run_state.close(failed=True)
            left = "".join(f"\n  {line}" for line in watch.left[-3:])
            first = report.failed[0] if report.failed else "no unit finished or failed"
            raise FitError(f"fit stopped early: {reason}; the workers seem to fail at start, so the other "
                           f"{len(futures) + sum(len(u) for _, _, m in groups for _, u in m)} unit(s) were not tried.\n"
                           f"  first failure: {first}" + (f"\n  workers that left:{left}" if left else ""))
    bar.close()
    run_state.close(failed=bool(report.failed))
    logger.info(f"fit: {report.computed}/{total} done, {len(report.failed)} failed")

    for subject, task, index in complete_pairs:
        if (subject, task) not in failed_pairs:
            finalize_pair(spec, store, subject, index)
            report.finalized.append((subject, task))
    report.seconds = time.perf_counter() - t0
    if report.failed:
        raise FitError(f"{len(report.failed)} fit unit(s) failed after {spec.retries} retries (a DataError at once: "
                       "it would fail again); every other unit's results are kept; rerun to retry:\n  "
                       + "\n  ".join(report.failed))
    return report
