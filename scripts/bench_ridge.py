#!/usr/bin/env python
"""The ridge engine against himalaya, scikit-learn and the paper's own algorithm, in one run.

Same data for every method: BOLD5000 shape (n = 4916 images, p = 2048 features with a
power-law spectrum over ~7.5 decades and non-zero means), voxels with planted signal of
log-uniform SNR plus 40% pure-noise voxels, raw-BOLD-like means; the same seeded test split,
the same 7 folds, the paper's grid of 100 alphas.

Methods (each in a fresh process, so that its peak RSS is its own):
- ``neurotask``: ``ridge.prepare`` + ``ridge.ridge_cv`` (certified search, numpy backend);
- ``neurotask-exhaustive``: the same, every alpha evaluated;
- ``neurotask-torch``: certified search on the torch CPU backend;
- ``himalaya``: ``himalaya.ridge.solve_ridge_cv_svd`` (numpy backend, float32, the same folds,
  negative MSE, intercept), best batch sizes we found;
- ``sklearn``: ``RidgeCV(alphas, alpha_per_target=True)`` in float64 (efficient leave-one-out:
  another protocol; time and agreement reported, not a target), on ``--sklearn-voxels``;
- ``paper``: a re-implementation of the authors' ``RidgeCVEstimator`` (torch float64, Woodbury
  form, a Python loop over voxels and, inside, over alphas), on ``--paper-voxels``;
- ``truth``: neurotask exhaustive in float64, on ``--truth-voxels`` (agreement reference).
The GEMM peak (numpy float32/float64, torch float32) is measured in the same run, before and
after the methods; the larger is the in-run peak.

Output: one table (seconds, seconds per 1000 voxels, GFLOP/s per phase and as a fraction of the
in-run float32 peak, peak RSS, agreement with himalaya, the exhaustive search and the float64
truth, ratios) on stdout, and every number in ``--out`` (JSON). Medians over ``--repeats``.

    python scripts/bench_ridge.py --quick              # small shapes, seconds: a smoke test
    python scripts/bench_ridge.py --voxels 10000 --repeats 3 --out bench.json
    python scripts/bench_ridge.py --memory             # peak RSS against voxel-chunk size
    python scripts/bench_ridge.py --engine --voxels 55000 [--project 5500]  # engine alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import pickle
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


from neurotask.pipeline import ridge  # noqa: E402

# --------------------------------------------------------------------------- data


def make_problem(n: int, p: int, v: int, seed: int = 0, noise_fraction: float = 0.4,
                 block: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic (X (n, p) float32, Y (n, v) float32) shaped like BOLD5000 x Taskonomy.

    Features: Gaussian rows with singular values ~ 1/k in a random rotation (eigenvalues of
    XᵀX over ~7.5 decades at p = 2048) and ReLU-like positive column means. Voxels: a signal
    in the feature space with weights decaying over the principal directions, scaled to a
    log-uniform SNR in [0.03, 3], on 1 - noise_fraction of voxels; unit Gaussian noise; means
    ~ N(100, 20) as in raw BOLD.
    """
    rng = np.random.default_rng(seed)
    sv = np.arange(1, p + 1, dtype=np.float64) ** -1.0
    rot, _ = np.linalg.qr(rng.standard_normal((p, p)))
    X = (rng.standard_normal((n, p)) * sv) @ rot.T
    X = (3.0 * X + 2.0 * rng.random(p)).astype(np.float32)
    Xc = (X - X.mean(0)).astype(np.float32)
    Y = np.empty((n, v), dtype=np.float32)
    decay = np.arange(1, p + 1) ** -0.5
    for s in range(0, v, block):
        b = min(block, v - s)
        weights = (rot @ (rng.standard_normal((p, b)) * decay[:, None])).astype(np.float32)
        sig = Xc @ weights
        sig /= sig.std(0)
        snr = 10 ** rng.uniform(-1.5, 0.5, b)
        snr[rng.random(b) < noise_fraction] = 0.0
        Y[:, s:s + b] = sig * np.sqrt(snr) + rng.standard_normal((n, b)) + rng.normal(100, 20, b)
    return X, Y


def pearson(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Column-wise Pearson r in float64; NaN where a column is constant."""
    y = np.asarray(y, np.float64) - np.mean(y, 0)
    pred = np.asarray(pred, np.float64) - np.mean(pred, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (y * pred).sum(0) / np.sqrt((y * y).sum(0) * (pred * pred).sum(0))


# --------------------------------------------------------------------------- GEMM peak


def gemm_peak(repeats: int = 7, size: int = 2048) -> dict:
    """Best-of-``repeats`` GFLOP/s (per CPU second of the process) of square GEMMs: numpy
    float32/float64, torch float32. With one BLAS thread this is one core's peak whatever the
    load; with two it is the 2-core peak only on an otherwise idle machine."""
    import torch

    rng = np.random.default_rng(0)
    out = {}
    for name, dt in (("numpy_float32", np.float32), ("numpy_float64", np.float64), ("torch_float32", np.float32)):
        a = rng.standard_normal((size, size)).astype(dt)
        b = rng.standard_normal((size, size)).astype(dt)
        if name.startswith("torch"):
            a, b = torch.from_numpy(a), torch.from_numpy(b)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        out[name] = 2 * size**3 / best / 1e9
    return out


def _timed(fn) -> float:
    """CPU seconds of ``fn()`` (the process's threads): robust to other processes' load."""
    t = time.process_time()
    fn()
    return time.process_time() - t


class Clock:
    """Wall and CPU seconds since creation (or the last ``lap``)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        out = (w - self.wall, c - self.cpu)
        self.wall, self.cpu = w, c
        return out


class Meter:
    """An observer of the ridge engine (``ridge.Observer``): per-phase wall time, CPU time and
    floating-point operation counts, and the engine's scalars.

    ``stats``: phase name -> {"seconds", "cpu_seconds", "flops"}; scalars "rank" (total, the
    largest over folds and batches), "groups" (likewise) and "exact_pairs" (certified search).
    The engine enters and leaves each phase with the device's work done (CUDA runs
    asynchronously). CPU time is the process's (all its threads): on a shared machine, with one
    BLAS thread, it is the work done whatever the load.
    """

    def __init__(self):
        self.stats: dict = {}

    @contextlib.contextmanager
    def phase(self, name: str, flops: float):
        start, cpu = time.perf_counter(), time.process_time()
        yield
        entry = self.stats.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0, "flops": 0.0})
        entry["seconds"] += time.perf_counter() - start
        entry["cpu_seconds"] += time.process_time() - cpu
        entry["flops"] += float(flops)

    def count(self, name: str, value: float) -> None:
        self.stats[name] = self.stats.get(name, 0) + value

    def maximum(self, name: str, value: float) -> None:
        self.stats[name] = max(self.stats.get(name, 0), value)


# --------------------------------------------------------------------------- methods


def _decomposition_flops(n_fit: int, n_eval: int, p: int, fit_projection: bool) -> float:
    """Gram, eigh (evd: ~4/3 p³ reduction + 2 p³ back-transform), the evaluation rows'
    projection, the fit rows' projection (direct form only), the bound's norm."""
    projections = (n_fit + n_eval) if fit_projection else n_eval
    return 2 * n_fit * p * p + (4 / 3 + 2) * p**3 + 2 * projections * p * p + 2 * n_eval**2 * p


def run_neurotask(X, Y, splits, alphas, search="certified", backend="numpy", dtype=np.float32,
                  voxel_batch=1000) -> dict:
    clock = Clock()
    dec = ridge.prepare(X, splits, dtype=dtype)
    prep = clock.lap()
    p = X.shape[1]
    prep_flops = sum(_decomposition_flops(b.fit_rows.size, b.eval_rows.size, p, b.proj_fit is not None)
                     for b in dec.folds + (dec.final,))
    meter = Meter()
    res = ridge.ridge_cv(dec, Y, alphas, search=search, backend=backend, voxel_batch=voxel_batch, observer=meter)
    fit = clock.lap()
    stats = meter.stats
    phases = {"decomposition": {"seconds": prep[0], "cpu_seconds": prep[1], "flops": prep_flops}}
    phases.update({k: v for k, v in stats.items() if isinstance(v, dict)})
    extra = {k: v for k, v in stats.items() if not isinstance(v, dict)}
    return dict(seconds=prep[0] + fit[0], cpu_seconds=prep[1] + fit[1], fixed_seconds=prep[0],
                fixed_cpu_seconds=prep[1], voxel_seconds=fit[0], voxel_cpu_seconds=fit[1], phases=phases,
                extra=extra, alpha_index=res.alpha_index, test_prediction=res.test_prediction)


def _timing(clock: Clock, fixed: tuple[float, float] = (0.0, 0.0)) -> dict:
    wall, cpu = clock.lap()
    return dict(seconds=fixed[0] + wall, cpu_seconds=fixed[1] + cpu, fixed_seconds=fixed[0],
                fixed_cpu_seconds=fixed[1], voxel_seconds=wall, voxel_cpu_seconds=cpu, phases={})


def run_himalaya(X, Y, splits, alphas, dtype=np.float32) -> dict:
    from himalaya.backend import set_backend
    from himalaya.ridge import solve_ridge_cv_svd

    set_backend("numpy", on_error="raise")
    train = splits.train
    pos = {r: i for i, r in enumerate(train)}
    folds = [(np.array([pos[r] for r in fit]), np.array([pos[r] for r in val])) for fit, val in splits.folds]
    Xt, Yt = X[train].astype(dtype), Y[train].astype(dtype)
    clock = Clock()
    best, coefs, _, intercept = solve_ridge_cv_svd(
        Xt, Yt, alphas=alphas.astype(dtype), fit_intercept=True, cv=folds, local_alpha=True,
        n_targets_batch=2000, n_alphas_batch=len(alphas), warn=False)
    pred = X[splits.test].astype(dtype) @ np.asarray(coefs) + np.asarray(intercept)
    out = _timing(clock)
    index = np.abs(np.log(np.asarray(best, np.float64))[:, None] - np.log(alphas)[None, :]).argmin(1)
    return out | dict(alpha_index=index, test_prediction=pred.astype(np.float64))


def run_sklearn(X, Y, splits, alphas) -> dict:
    from sklearn.linear_model import RidgeCV

    clock = Clock()
    model = RidgeCV(alphas=alphas, alpha_per_target=True, fit_intercept=True)
    model.fit(X[splits.train].astype(np.float64), Y[splits.train].astype(np.float64))
    pred = model.predict(X[splits.test].astype(np.float64))
    out = _timing(clock)
    index = np.abs(np.log(np.atleast_1d(model.alpha_))[:, None] - np.log(alphas)[None, :]).argmin(1)
    return out | dict(alpha_index=index, test_prediction=pred)


def run_paper(X, Y, splits, alphas) -> dict:
    """The authors' RidgeCVEstimator re-implemented (not copied): per fold, an SVD of the
    centred training features in float64 (torch), then per voxel and per alpha the Woodbury
    form ``(1/l)(X_e Xᵀy - M (r / (e + l)))`` and its validation MSE; mean over folds, the best
    alpha (first on ties); refit on the whole training part. Returns its fixed (SVD) and
    per-voxel seconds separately."""
    import torch

    ls = torch.from_numpy(np.asarray(alphas, np.float64))

    def basis(fit_rows, eval_rows):
        Xf = torch.from_numpy(X[fit_rows].astype(np.float64))
        m = Xf.mean(0, keepdim=True)
        Xt = (Xf - m).T  # (p, n_fit)
        _, S, Vh = torch.linalg.svd(Xt, full_matrices=False)
        Q = Xt @ Vh.T  # = U S
        Xe = torch.from_numpy(X[eval_rows].astype(np.float64)) - m
        return Xt, S**2, Xe, Xe @ Q, Q

    def interms(Xt, Q, Xe, y):
        pj = Xt @ (y - y.mean())
        return y.mean(), Q.T @ pj, Xe @ pj

    clock = Clock()
    fold_bases = [basis(fit, val) for fit, val in splits.folds]
    final = basis(splits.train, splits.test)
    fixed = clock.lap()
    v = Y.shape[1]
    scores = torch.zeros(len(fold_bases), v, len(ls), dtype=torch.float64)
    for f, ((Xt, e, Xe, M, Q), (fit, val)) in enumerate(zip(fold_bases, splits.folds)):
        Yf = torch.from_numpy(Y[fit].astype(np.float64))
        Yv = torch.from_numpy(Y[val].astype(np.float64))
        for j in range(v):
            ym, r, N = interms(Xt, Q, Xe, Yf[:, j])
            for k, l in enumerate(ls):
                yhat = (1 / l) * (N - M @ (r / (e + l))) + ym
                scores[f, j, k] = -torch.nn.functional.mse_loss(yhat, Yv[:, j]).item()
    best = scores.mean(0).max(1).indices.numpy()
    Xt, e, Xe, M, Q = final
    Ytr = torch.from_numpy(Y[splits.train].astype(np.float64))
    pred = np.empty((splits.test.size, v))
    for j in range(v):
        ym, r, N = interms(Xt, Q, Xe, Ytr[:, j])
        l = ls[best[j]]
        pred[:, j] = ((1 / l) * (N - M @ (r / (e + l))) + ym).numpy()
    return _timing(clock, fixed) | dict(alpha_index=best, test_prediction=pred)


METHODS = {
    "neurotask": lambda X, Y, s, a: run_neurotask(X, Y, s, a),
    "neurotask-exhaustive": lambda X, Y, s, a: run_neurotask(X, Y, s, a, search="exhaustive"),
    "neurotask-torch": lambda X, Y, s, a: run_neurotask(X, Y, s, a, backend="torch"),
    "himalaya": run_himalaya,
    "himalaya-f64": lambda X, Y, s, a: run_himalaya(X, Y, s, a, dtype=np.float64),
    "sklearn": run_sklearn,
    "paper": run_paper,
    "truth": lambda X, Y, s, a: run_neurotask(X, Y, s, a, search="exhaustive", dtype=np.float64),
}


def _set_threads(n: int) -> None:
    """BLAS and torch intra-op threads of this process. torch is not imported here (its import
    alone adds ~300 MB of RSS): OMP_NUM_THREADS sets its threads when a method imports it."""
    from threadpoolctl import threadpool_limits

    os.environ["OMP_NUM_THREADS"] = str(n)
    threadpool_limits(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def _child(method: str, data_dir: str, n_voxels: int, out_path: str, threads: int) -> None:
    _set_threads(threads)
    X = np.load(Path(data_dir) / "X.npy")
    Y = np.load(Path(data_dir) / "Y.npy", mmap_mode="r")[:, :n_voxels].copy()
    with open(Path(data_dir) / "splits.pkl", "rb") as f:  # written by this script's parent
        splits = pickle.load(f)
    alphas = np.load(Path(data_dir) / "alphas.npy")
    out = METHODS[method](X, Y, splits, alphas)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["test_r"] = pearson(Y[splits.test], out.pop("test_prediction"))
    with open(out_path, "wb") as f:
        pickle.dump(out, f)


def run_isolated(method: str, data_dir: str, n_voxels: int, threads: int) -> dict:
    """Run one method in a fresh process (spawned: no inherited memory) and return its dict."""
    ctx = mp.get_context("spawn")
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        out_path = f.name
    proc = ctx.Process(target=_child, args=(method, data_dir, n_voxels, out_path, threads))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"method {method} failed (exit code {proc.exitcode})")
    with open(out_path, "rb") as f:
        out = pickle.load(f)
    os.unlink(out_path)
    return out


# --------------------------------------------------------------------------- report


def agreement(a: dict, b: dict) -> dict:
    """Share of common voxels with the same alpha; max |Δ test r| over them."""
    v = min(a["alpha_index"].size, b["alpha_index"].size)
    same = float(np.mean(a["alpha_index"][:v] == b["alpha_index"][:v]))
    dr = np.abs(a["test_r"][:v] - b["test_r"][:v])
    return {"voxels": v, "same_alpha": same, "max_abs_dr": float(np.nanmax(dr))}


def summarize(runs: list[dict], n_voxels: int) -> dict:
    """Median over repeats of times and phase rates; the first run's result arrays."""
    med = lambda key: statistics.median(r.get(key, 0.0) for r in runs)  # noqa: E731
    out = {k: runs[0][k] for k in ("alpha_index", "test_r")}
    for key in ("seconds", "cpu_seconds", "fixed_seconds", "fixed_cpu_seconds", "voxel_seconds", "voxel_cpu_seconds"):
        out[key] = med(key)
    out.update(peak_rss_mb=max(r["peak_rss_mb"] for r in runs), voxels=n_voxels,
               extra=runs[0].get("extra", {}), all_cpu_seconds=[r["cpu_seconds"] for r in runs],
               all_seconds=[r["seconds"] for r in runs])
    phases = {}
    for name in runs[0]["phases"]:
        cpu = statistics.median(r["phases"][name]["cpu_seconds"] for r in runs)
        wall = statistics.median(r["phases"][name]["seconds"] for r in runs)
        phases[name] = {"seconds": wall, "cpu_seconds": cpu, "flops": runs[0]["phases"][name]["flops"],
                        "gflops_per_cpu_second": runs[0]["phases"][name]["flops"] / cpu / 1e9}
    out["phases"] = phases
    return out


def print_table(results: dict, peak: dict, threads: int) -> None:
    f32 = peak["numpy_float32"]
    print(f"\n{threads} BLAS thread(s). Times are CPU seconds of the method's process (its work, "
          f"robust to other processes' load); wall seconds in brackets.")
    print(f"in-run GEMM peak (GFLOP per CPU second): numpy float32 {peak['numpy_float32']:.0f}, "
          f"float64 {peak['numpy_float64']:.0f}; torch float32 {peak['torch_float32']:.0f}")
    print(f"{'method':22s} {'voxels':>7s} {'CPU s':>9s} {'[wall s]':>9s} {'CPU s/1000 vox':>14s} "
          f"{'fixed CPU s':>11s} {'peak RSS MB':>11s}")
    for name, r in results.items():
        print(f"{name:22s} {r['voxels']:7d} {r['cpu_seconds']:9.1f} {r['seconds']:9.1f} "
              f"{1000 * r['cpu_seconds'] / r['voxels']:14.2f} {r['fixed_cpu_seconds']:11.1f} {r['peak_rss_mb']:11.0f}")
    print("\nphases: CPU seconds, GFLOP per CPU second, fraction of the in-run numpy float32 peak")
    for name, r in results.items():
        for ph, d in r["phases"].items():
            g = d["gflops_per_cpu_second"]
            print(f"  {name:22s} {ph:14s} {d['cpu_seconds']:8.1f} s {g:8.1f} GFLOP/s {g / f32:6.1%}")
        if r["extra"]:
            print(f"  {name:22s} {r['extra']}")
    ref = results.get("neurotask")
    if ref is None:
        return
    print("\nagainst neurotask (certified, numpy): CPU seconds per voxel, each method on its own voxel "
          "count, fixed costs included (per-voxel loops alone in brackets)")
    for name, r in results.items():
        if name == "neurotask":
            continue
        ratio = (r["cpu_seconds"] / r["voxels"]) / (ref["cpu_seconds"] / ref["voxels"])
        per = (r["voxel_cpu_seconds"] / r["voxels"]) / (ref["voxel_cpu_seconds"] / ref["voxels"])
        ag = agreement(ref, r)
        print(f"  {name:22s} {ratio:8.2f}x [{per:8.2f}x]  same alpha {ag['same_alpha']:.4%} of "
              f"{ag['voxels']}  max|Δr| {ag['max_abs_dr']:.2e}")
    pairs = [(a, b) for a in results for b in ("himalaya-f64", "truth", "neurotask-exhaustive") if a != b]
    for a, b in pairs:
        if a in results and b in results:
            ag = agreement(results[a], results[b])
            print(f"  {a} vs {b}: same alpha {ag['same_alpha']:.4%} of {ag['voxels']}  max|Δr| {ag['max_abs_dr']:.2e}")


# --------------------------------------------------------------------------- modes


def prepare_data(args, data_dir: Path) -> None:
    X, Y = make_problem(args.n, args.p, args.voxels, seed=args.seed)
    np.save(data_dir / "X.npy", X)
    np.save(data_dir / "Y.npy", Y)
    splits = ridge.make_splits(args.n, test_fraction=0.15, n_folds=7, seed=args.seed)
    with open(data_dir / "splits.pkl", "wb") as f:
        pickle.dump(splits, f)
    np.save(data_dir / "alphas.npy", ridge.paper_alphas(args.p, args.alphas))


REPEATED = ("neurotask", "neurotask-exhaustive", "neurotask-torch", "himalaya")


def main_compare(args, data_dir: Path) -> dict:
    """Every method on the same data; the timed ones ``--repeats`` times, interleaved (one round
    of every method, then the next round), so that a change in the machine's load affects all
    methods alike."""
    sizes = {"sklearn": args.sklearn_voxels, "paper": args.paper_voxels, "truth": args.truth_voxels,
             "himalaya-f64": args.himalaya_f64_voxels}
    load_before = os.getloadavg()
    _set_threads(args.threads)
    peak_before = gemm_peak()
    runs: dict[str, list] = {m: [] for m in args.methods}
    todo = [(i, m, min(sizes.get(m, args.voxels), args.voxels))
            for i in range(args.repeats) for m in args.methods if i == 0 or m in REPEATED]

    def one(job: tuple[int, str, int]) -> tuple[tuple[int, str, int], dict]:
        i, method, v = job
        r = run_isolated(method, str(data_dir), v, args.threads)
        print(f"[bench] round {i + 1}: {method} {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU "
              f"on {v} voxels (load {os.getloadavg()[0]:.1f})", flush=True)
        return job, r

    # --jobs > 1 runs that many method processes side by side (one BLAS thread each by
    # default): wall time halves on 2 cores while each process's CPU seconds stay its own work.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(one, todo))
    for (i, method, v), r in sorted(done, key=lambda d: d[0][0]):
        runs[method].append(r)
    results = {m: summarize(r, min(sizes.get(m, args.voxels), args.voxels)) for m, r in runs.items()}
    peak_after = gemm_peak()
    peak = {k: max(peak_before[k], peak_after[k]) for k in peak_before}
    print_table(results, peak, args.threads)
    print(f"load average (1 min) before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    return {"peak": peak, "peak_before": peak_before, "peak_after": peak_after,
            "load_before": load_before, "load_after": os.getloadavg(), "results": {
        name: {k: v for k, v in r.items() if k not in ("alpha_index", "test_r")} | {
            "agreement_vs_neurotask": agreement(results["neurotask"], r) if "neurotask" in results else None,
            "agreement_vs_himalaya_f64": agreement(results["himalaya-f64"], r) if "himalaya-f64" in results else None,
            "agreement_vs_truth": agreement(results["truth"], r) if "truth" in results else None}
        for name, r in results.items()}}


def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(data_dir: str, chunk: int, n_chunks: int, out_path: str, threads: int) -> None:
    _set_threads(threads)
    with open(Path(data_dir) / "decomposition.pkl", "rb") as f:  # written by this script's parent
        dec = pickle.load(f)
    Y = np.load(Path(data_dir) / "Y.npy", mmap_mode="r")
    alphas = np.load(Path(data_dir) / "alphas.npy")
    ridge.ridge_cv(dec, np.asarray(Y[:, :2]), alphas)  # warm-up: caches, lazy imports, BLAS buffers
    base = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    clock = Clock()
    for c in range(n_chunks):  # as a worker does: one chunk task after another
        ridge.ridge_cv(dec, np.asarray(Y[:, c * chunk:(c + 1) * chunk]), alphas, voxel_batch=chunk)
    seconds, cpu = clock.lap()
    peak = _rss_mb("VmHWM")
    with open(out_path, "wb") as f:
        pickle.dump({"base_mb": base, "peak_mb": peak, "seconds": seconds, "cpu_seconds": cpu,
                     "voxels": chunk * n_chunks}, f)


def main_memory(args, data_dir: Path) -> dict:
    """Peak RSS of a worker process (decomposition loaded, chunks fitted one after another)
    against the chunk size; the fixed cost is the RSS with the decomposition loaded."""
    X = np.load(data_dir / "X.npy")
    with open(data_dir / "splits.pkl", "rb") as f:
        splits = pickle.load(f)
    dec = ridge.prepare(X, splits)
    with open(data_dir / "decomposition.pkl", "wb") as f:
        pickle.dump(dec, f)
    rows = []
    ctx = mp.get_context("spawn")
    for chunk in args.chunks:
        n_chunks = max(1, min(args.voxels // chunk, 2))
        out_path = str(data_dir / f"mem_{chunk}.pkl")
        proc = ctx.Process(target=_memory_child, args=(str(data_dir), chunk, n_chunks, out_path, args.threads))
        proc.start()
        proc.join()
        with open(out_path, "rb") as f:
            row = pickle.load(f)
        row["chunk"] = chunk
        rows.append(row)
        print(f"[memory] chunk {chunk:5d}: base {row['base_mb']:.0f} MB, peak {row['peak_mb']:.0f} MB, "
              f"+{row['peak_mb'] - row['base_mb']:.0f} MB, {1000 * row['cpu_seconds'] / row['voxels']:.2f} CPU s "
              f"({1000 * row['seconds'] / row['voxels']:.2f} wall s) per 1000 voxels",
              flush=True)
    c = np.array([r["chunk"] for r in rows], float)
    d = np.array([r["peak_mb"] - r["base_mb"] for r in rows])
    slope, intercept = np.polyfit(c, d, 1)
    print(f"\ndecomposition: {dec.nbytes / 1e6:.0f} MB; peak RSS above it ~ {intercept:.0f} MB + "
          f"{1000 * slope:.0f} MB per 1000 voxels of chunk")
    return {"decomposition_mb": dec.nbytes / 1e6, "rows": rows, "fit_mb_per_1000": 1000 * slope, "fit_intercept_mb": intercept}


def main_engine(args, data_dir: Path) -> dict:
    """The engine alone in one process on ``--project`` voxels (or all): prepare once, then
    ridge_cv chunk after chunk as the fit tasks do; projected linearly to ``--voxels``."""
    _set_threads(args.threads)
    X = np.load(data_dir / "X.npy")
    Y = np.load(data_dir / "Y.npy", mmap_mode="r")
    with open(data_dir / "splits.pkl", "rb") as f:
        splits = pickle.load(f)
    alphas = np.load(data_dir / "alphas.npy")
    v_run = args.project or args.voxels
    engine = {"backend": args.backend, "device": args.device, "search": args.search}
    if args.device and args.device.startswith("cuda"):
        # warm-up outside the timing: CUDA context, cuBLAS handles, kernel loading
        ridge.ridge_cv(ridge.prepare(X[:, :64], splits, backend=args.backend, device=args.device),
                       np.asarray(Y[:, :8]), alphas, **engine)
    clock = Clock()
    dec = ridge.prepare(X, splits, backend=args.backend, device=args.device)
    prep = clock.lap()
    for s in range(0, v_run, args.chunk):
        ridge.ridge_cv(dec, np.asarray(Y[:, s:min(s + args.chunk, v_run)]), alphas, voxel_batch=args.chunk, **engine)
    fit = clock.lap()
    scale = args.voxels / v_run
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kind = "projected" if v_run < args.voxels else "measured"
    where = f"{args.backend} on {args.device or 'cpu'}" + (f" ({_device_name(args.device)})" if args.device else "")
    print(f"[engine] {where}, {args.search} search, {args.threads} CPU thread(s); prepare {prep[0]:.1f} s wall / {prep[1]:.1f} s CPU; ridge_cv "
          f"{fit[0]:.1f} s wall / {fit[1]:.1f} s CPU on {v_run} voxels in chunks of {args.chunk}; one (subject, "
          f"task) at {args.voxels} voxels ({kind}): {prep[0] + scale * fit[0]:.0f} s wall, "
          f"{prep[1] + scale * fit[1]:.0f} s CPU; peak RSS {rss:.0f} MB")
    return {"backend": args.backend, "device": args.device or "cpu", "device_name": _device_name(args.device),
            "search": args.search, "threads": args.threads, "prepare_seconds": prep[0], "prepare_cpu_seconds": prep[1],
            "fit_seconds": fit[0], "fit_cpu_seconds": fit[1], "voxels_run": v_run, "voxels": args.voxels,
            "total_seconds": prep[0] + scale * fit[0], "total_cpu_seconds": prep[1] + scale * fit[1],
            "peak_rss_mb": rss, "chunk": args.chunk, "load": os.getloadavg()}


def _device_name(device: str | None) -> str:
    """The card's name for a CUDA device, else the CPU's model name."""
    if device and device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (n=1200, p=256, 1000 voxels)")
    ap.add_argument("--memory", action="store_true", help="peak RSS against voxel-chunk size")
    ap.add_argument("--engine", action="store_true", help="the engine alone at --voxels in one process")
    ap.add_argument("--n", type=int, default=4916)
    ap.add_argument("--p", type=int, default=2048)
    ap.add_argument("--voxels", type=int, default=10000)
    ap.add_argument("--alphas", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS/torch threads per method process (1: CPU times are robust to load)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--sklearn-voxels", type=int, default=2000)
    ap.add_argument("--paper-voxels", type=int, default=50)
    ap.add_argument("--truth-voxels", type=int, default=2000)
    ap.add_argument("--himalaya-f64-voxels", type=int, default=2000,
                    help="himalaya in float64 (the agreement reference; ~2x its float32 time)")
    ap.add_argument("--chunks", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    ap.add_argument("--chunk", type=int, default=1000, help="--engine: voxels per ridge_cv call")
    ap.add_argument("--backend", choices=("numpy", "torch"), default="numpy", help="--engine: ridge backend")
    ap.add_argument("--device", default=None, help="--engine: torch device (cpu, cuda, cuda:1)")
    ap.add_argument("--search", choices=ridge.SEARCHES, default="certified", help="--engine: alpha search")
    ap.add_argument("--jobs", type=int, default=1,
                    help="method processes at once (each with --threads BLAS threads; CPU seconds stay comparable)")
    ap.add_argument("--project", type=int, default=0, help="--engine: run this many voxels, project to --voxels")
    ap.add_argument("--data-dir", help="keep the generated data here (default: a temporary directory)")
    ap.add_argument("--out", help="write every number as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.n, args.p, args.repeats = 1200, 256, 1
        args.voxels = 1000 if args.voxels == ap.get_default("voxels") else args.voxels
        args.sklearn_voxels, args.paper_voxels, args.truth_voxels, args.himalaya_f64_voxels = 500, 20, 1000, 1000
        args.chunks = [125, 250, 500]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir or tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        v_total = args.voxels
        if args.engine and args.project:
            args.voxels = args.project  # only the voxels that run are generated
        prepare_data(args, data_dir)
        args.voxels = v_total
        print(f"[bench] data n={args.n} p={args.p} v={args.voxels} generated in {time.perf_counter() - t:.0f} s",
              flush=True)
        if args.memory:
            out = main_memory(args, data_dir)
        elif args.engine:
            out = main_engine(args, data_dir)
        else:
            out = main_compare(args, data_dir)
    out["args"] = {k: v for k, v in vars(args).items()}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
