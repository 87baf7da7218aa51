"""Fit orchestration: every (subject, task, voxel chunk) as a Dask task.

Per (subject, task), one task builds the design matrix and its fold decompositions
(``ridge.prepare``); it stays on the cluster as a future that every voxel-chunk task of that
pair takes as input, so it is computed once and never goes through the client. Each chunk task
reads its own voxel chunk from the store, runs the ridge CV, computes its statistics, writes
its region of ``results/<subject>`` and then marks itself done. Responses never travel through
the client. When all chunks of a pair are done, the driver computes the FDR q-values across the
pair's voxels (they need every voxel's p).

Resume: units with a valid progress marker are skipped; a rerun after a crash or a kill does
only the rest. Few pairs are in flight at once, so decompositions do not pile up in memory.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from distributed import Client, Future, as_completed

from neurotask.pipeline.ridge import design
from neurotask.pipeline.stats import noise_ceiling
from neurotask.pipeline import ridge
from neurotask.pipeline.stats import scores as stats
from neurotask.pipeline.config import Config, fit_fingerprint
from neurotask.pipeline.console import ProgressBar
from neurotask.pipeline.errors import FitError
from neurotask.pipeline.stages.status import FitRunState
from neurotask.storage import Progress, StudyStore

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
    def marker(self) -> tuple[str, str, str, str]:
        return ("fit", self.subject, self.task, f"{self.chunk:05d}")


@dataclass
class FitReport:
    computed: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    finalized: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def alpha_grid(cfg: Config, n_features: int) -> np.ndarray:
    if cfg.fit.alphas == "paper":
        return ridge.paper_alphas(n_features, cfg.fit.n_alphas)
    return np.sort(np.asarray(cfg.fit.alphas, dtype=np.float64))


def splits_for(cfg: Config, n_images: int) -> ridge.Splits:
    f = cfg.fit
    return ridge.make_splits(n_images, test_fraction=f.test_fraction, cv=f.cv, n_folds=f.n_folds,
                             validation_fraction=f.validation_fraction, seed=f.seed)


# --------------------------------------------------------------------------- worker side


def engine_options(cfg: Config) -> dict:
    """The ridge engine's keyword arguments from ``fit:`` (search, backend, device)."""
    return {"search": cfg.fit.search, "backend": cfg.fit.backend, "device": cfg.fit.device}


def decompose_design(X: np.ndarray, cfg: Config) -> ridge.Decomposition:
    """X (n_images, p) in the subject's image order -> its per-fold decompositions, after the
    configured z-scoring (with the training part's statistics)."""
    splits = splits_for(cfg, X.shape[0])
    if cfg.fit.zscore_features:
        X = design.standardize(X, splits.train)
    return ridge.prepare(X, splits, dtype=np.dtype(cfg.fit.dtype), backend=cfg.fit.backend, device=cfg.fit.device)


def build_decomposition(store_path: str, subject: str, task: str, cfg: Config) -> ridge.Decomposition:
    """Design matrix of (subject, task) in the subject's image order, decomposed per fold."""
    store = StudyStore(store_path)
    feats = store.read_features(task)
    images = store.responses(subject)["image"].values
    return decompose_design(feats.values[design.align_rows(feats["image"].values, images, task)], cfg)


def fit_unit(store_path: str, progress_dir: str, store_id: str, unit: Unit,
             decomposition: ridge.Decomposition, alphas: np.ndarray,
             n_permutations: int = 0, permutation_seed: int = 0,
             engine: dict | None = None) -> dict:
    """Fit one voxel chunk, write its results region, then mark it done."""
    if os.environ.get(FAULT_ENV) == f"{unit.subject}/{unit.task}/{unit.chunk}":
        raise RuntimeError(f"injected fault ({FAULT_ENV}) in {unit.name}")
    progress = Progress(progress_dir, store_id)
    if progress.is_done(*unit.marker):
        # Dask runs this again when the worker holding the finished result died before the
        # client collected it: the chunk is in the store already, so write nothing twice.
        return {"unit": unit.name, "nan_r": None}
    store = StudyStore(store_path)
    Y = store.read_response_chunk(unit.subject, slice(unit.start, unit.stop))
    result = ridge.ridge_cv(decomposition, Y, alphas, **(engine or {}))
    y_test = Y[decomposition.final.eval_rows]
    scores = stats.test_scores(y_test, result.test_prediction)
    values = {"r": scores["r"].astype(np.float32), "r2": scores["r2"].astype(np.float32),
              "alpha": result.alpha, "pvalue": scores["pvalue"]}
    if n_permutations:
        # The same permutations for every chunk (a function of seed and n_test only), so a
        # voxel's p does not depend on the chunking.
        perm = stats.permutation_test(y_test, result.test_prediction, n_permutations, permutation_seed)
        values["pvalue_perm"] = perm.pvalue
    store.write_result_chunk(unit.subject, unit.task_index, slice(unit.start, unit.stop), values)
    # The SLURM job in the marker says which worker job wrote the chunk (None outside SLURM).
    progress.mark_done(*unit.marker, info={"voxels": unit.stop - unit.start,
                                           "slurm_job": os.environ.get("SLURM_JOB_ID")})
    return {"unit": unit.name, "nan_r": int(np.isnan(scores["r"]).sum())}


# --------------------------------------------------------------------------- driver side


def plan_units(cfg: Config, store: StudyStore, progress: Progress, subject: str, tasks: list[str],
               task_order: list[str]) -> dict[tuple[str, str], tuple[list[Unit], int]]:
    """Per (subject, task): the units still to do, and how many are already done."""
    resp = store.responses(subject)
    v, chunk = resp.sizes["voxel"], int(resp.attrs["chunk_size"])
    out = {}
    for task in tasks:
        done = progress.done_units("fit", subject, task)
        units = [Unit(subject, task, task_order.index(task), c, a, min(a + chunk, v))
                 for c, a in enumerate(range(0, v, chunk))]
        todo = [u for u in units if f"{u.chunk:05d}" not in done]
        out[(subject, task)] = (todo, len(units) - len(todo))
    return out


def finalize_pair(store: StudyStore, subject: str, task_index: int, fdr: float, permutation: bool) -> None:
    """BH-FDR across all voxels of (subject, task), for the parametric and, if computed, the
    permutation p-values: writes their q-values and significance."""
    values = {}
    for suffix in ("", "_perm") if permutation else ("",):
        q, significant = stats.fdr_bh(store.read_result(subject, "pvalue" + suffix, task_index), fdr)
        values.update({"qvalue" + suffix: q, "significant" + suffix: significant})
    store.write_result_chunk(subject, task_index, slice(None), values)


def subject_noise_ceiling(store: StudyStore, subject: str, test_rows: np.ndarray) -> bool:
    """Per-voxel noise ceiling of the test-set r from the subject's repeated images (NCSNR),
    for test responses averaging as many showings as each test image had. Written to
    ``results/<subject>`` once; False when the subject has no repeated images."""
    resp = store.responses(subject)
    if "repeat_responses" not in resp:
        return False
    m_test = resp["n_showings"].values[test_rows] if "n_showings" in resp else 1
    chunk = int(resp.attrs["chunk_size"])
    for a in range(0, resp.sizes["voxel"], chunk):
        sl = slice(a, min(a + chunk, resp.sizes["voxel"]))
        sn = noise_ceiling.signal_noise(resp["repeat_responses"][:, :, sl].values.astype(np.float64))
        nc = noise_ceiling.noise_ceiling(sn.ncsnr, m_test)
        store.write_voxel_results(subject, sl, {"ncsnr": sn.ncsnr, "noise_ceiling_r": nc.r, "noise_ceiling_r2": nc.r2})
    return True


def fit(cfg: Config, client: Client, *, overwrite: bool = False,
        max_pairs_in_flight: int | None = None) -> FitReport:
    """Fit every configured (subject, task) not fitted yet. Raises FitError if units failed
    after their retries; every other finished unit stays in the store."""
    t0 = time.perf_counter()
    store = StudyStore(cfg.store_path)
    progress = Progress(cfg.workdir / "progress", store.store_id)
    params = fit_fingerprint(cfg.fit, cfg.data)
    report = FitReport()

    missing = [t for t in cfg.tasks if t not in store.feature_tasks()]
    if missing:  # checked before anything is written
        raise FitError(f"{cfg.store_path}: no features for task(s) {', '.join(missing)}; "
                       "run `neurotask featurize` (or `simulate` for a synthetic study) first")
    # Features of an interrupted featurize have unwritten (NaN) rows: never fit on them.
    incomplete = [t for t in cfg.tasks if "featurize" in store.feature_attrs(t) and not progress.is_done("featurized", t)]
    if incomplete:
        raise FitError(f"{cfg.store_path}: features of {', '.join(incomplete)} are incomplete (featurize was "
                       "interrupted); rerun `neurotask featurize`")
    pending: deque[tuple[str, str, list[Unit]]] = deque()
    complete_pairs: list[tuple[str, str, int]] = []
    for subject in cfg.study.subjects:
        store.responses(subject)  # clear error if not ingested
        if overwrite:
            store.remove(f"results/{subject}")
            progress.clear("fit", subject)
            progress.unmark("ceiling", subject)
        permutation = cfg.fit.n_permutations > 0
        order = store.ensure_results(subject, cfg.tasks, params, permutation=permutation)
        if not progress.is_done("ceiling", subject):
            n_images = store.responses(subject).sizes["image"]
            if subject_noise_ceiling(store, subject, splits_for(cfg, n_images).test):
                progress.mark_done("ceiling", subject)
        for (subj, task), (todo, n_done) in plan_units(cfg, store, progress, subject, cfg.tasks, order).items():
            report.skipped += n_done
            if todo:
                pending.append((subj, task, todo))
            complete_pairs.append((subj, task, order.index(task)))

    total = sum(len(u) for _, _, u in pending)
    if report.skipped:
        logger.info(f"resuming: {report.skipped} unit(s) already done, {total} to do")
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    limit = max_pairs_in_flight or max(2, n_workers)
    bar = ProgressBar(total, "fit")
    run_state = FitRunState(progress.directory, progress.store_id, client)  # for `neurotask status`
    futures: dict[Future, tuple[Unit, tuple[str, str]]] = {}
    remaining: dict[tuple[str, str], int] = {}
    decompositions: dict[tuple[str, str], Future] = {}
    ac = as_completed()
    failed_pairs: set[tuple[str, str]] = set()

    def submit_next_pair() -> None:
        subject, task, units = pending.popleft()
        key = (subject, task)
        dec = client.submit(build_decomposition, str(store.path), subject, task, cfg,
                            key=f"decompose-{subject}-{task}-{time.time_ns()}", retries=cfg.fit.retries)
        alphas = alpha_grid(cfg, store.feature_count(task))
        engine = engine_options(cfg)
        decompositions[key] = dec
        remaining[key] = len(units)
        for u in units:
            f = client.submit(fit_unit, str(store.path), str(progress.directory), progress.store_id, u, dec, alphas,
                              cfg.fit.n_permutations, cfg.fit.permutation_seed,
                              engine, key=f"fit-{subject}-{task}-{u.chunk}-{time.time_ns()}", retries=cfg.fit.retries,
                              pure=False)
            futures[f] = (u, key)
            run_state.add(f.key, u.subject, u.task, u.chunk)
            ac.add(f)

    while pending and len(decompositions) < limit:
        submit_next_pair()
    for f in ac:
        unit, key = futures.pop(f)
        if f.status == "finished":
            report.computed += 1
        else:
            report.failed.append(f"{unit.name}: {f.exception()!r}")
            failed_pairs.add(key)
        bar.update(1)
        run_state.done(f.key)
        f.release()
        remaining[key] -= 1
        if remaining[key] == 0:
            decompositions.pop(key).release()
            if pending:
                submit_next_pair()
    bar.close()
    run_state.close(failed=bool(report.failed))

    for subject, task, index in complete_pairs:
        if (subject, task) not in failed_pairs:
            finalize_pair(store, subject, index, cfg.fit.fdr, cfg.fit.n_permutations > 0)
            report.finalized.append((subject, task))
    report.seconds = time.perf_counter() - t0
    if report.failed:
        raise FitError(f"{len(report.failed)} fit unit(s) failed after {cfg.fit.retries} retries "
                       f"(every other unit's results are kept; rerun to retry):\n  " + "\n  ".join(report.failed))
    return report

