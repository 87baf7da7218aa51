#!/usr/bin/env python
"""One (subject, task) at the Natural Scenes Dataset's shape, and the 8-subject x 21-task study
projected from it (issue 18, "Scale").

Shape: n_train = 9,000 training images and the 515 shared test images (``--n-train``,
``--n-test``), p = 2048 features (a Taskonomy encoder's (8, 16, 16) output,
pipeline/features/encoders.py), 7 folds on the training part, the paper's 100 alphas, the
certified search, chunks of 2000 voxels (configs/nsd.yaml ``data.chunk_size``). Features and
responses are synthetic, from ``bench_ridge.make_problem`` (a power-law spectrum, 60% of voxels
with planted signal).

The arithmetic is the fit stage's: ``design.standardize`` + ``ridge.prepare`` as in
``pipeline.stages.fit.decompose_design`` but with explicit splits (the 515 test images given,
not ``make_splits``'s seeded draw: :func:`nsd_splits`), then ``fit_voxels`` per chunk with
``fit.n_permutations`` (default 5000) on; the permutation test inside it is timed apart by
wrapping ``stats.scores.permutation_test``. Every measurement runs in a fresh worker process
(this script with ``--worker``) with one BLAS thread, doing what a fit worker does: load the
float32 features, decompose once, then fit the chunks one after another (one chunk in memory at
a time). CPU seconds are the worker's ``time.process_time``; its peak RSS is the child's
``ru_maxrss`` (``os.wait4``), which sees BLAS's buffers too. Linux starts an exec'd child's
ru_maxrss at its parent's high-water mark, so the data are written by a child of their own and
this process stays small (~0.1 GB); the worker reports its mark at start (imports and that
floor), after the decomposition and after each chunk. Repeats are interleaved
(float32, float64, float32, ...) and medians quoted.

From the medians: one (subject, task) at nsdgeneral's 15,724 voxels (measured in full by
default) and at a whole brain's 200,000 (projected linearly: decomposition + voxels x per-voxel
cost), the decompositions' analytic size, and the wall time of the 8 x 21 study on this machine
and on N SLURM nodes, from a simulation of the fit's scheduling (:func:`simulate_wall`).

    OMP_NUM_THREADS=1 python scripts/bench_nsd.py --repeats 3 --out nsd.json
    python scripts/bench_nsd.py --n-train 300 --n-test 40 --p 64 --voxels 300 --chunk 100 \\
        --voxels-float64 100 --n-permutations 100 --repeats 1      # a toy run, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_ridge's problem generator

# NSD's design (Allen et al. 2022; configs/nsd.yaml): distinct images seen per subject
# (sessions completed 40, 40, 32, 30, 40, 32, 40, 30), the 1000 images every subject was
# shown (sharedix), the 515 of them with all 3 showings in all 8 subjects (the test set).
NSD_IMAGES = {"subj01": 10000, "subj02": 10000, "subj03": 9411, "subj04": 9209,
              "subj05": 10000, "subj06": 9411, "subj07": 10000, "subj08": 9209}
NSD_SHARED, NSD_TEST = 1000, 515
NSDGENERAL, WHOLE_BRAIN, N_TASKS = 15724, 200000, 21
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# --------------------------------------------------------------------------- the protocol


def nsd_splits(n_train: int, n_test: int, n_folds: int = 7, seed: int = 2019):
    """Splits with a given test set: ``n_test`` seeded rows of ``n_train + n_test`` (NSD's shared
    images, wherever they fall in a subject's image order), then K folds of the rest drawn as
    ``ridge.make_splits`` draws them (a seeded shuffle cut into K near-equal parts).

    Returns
    -------
    ridge.Splits
        train (n_train,), test (n_test,), K folds; indices into the (n_train + n_test) rows.
    """
    from neurotask.pipeline import ridge

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_train + n_test)
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    parts = np.array_split(train[rng.permutation(train.size)], n_folds)
    folds = tuple(ridge.Fold(np.sort(np.concatenate(parts[:i] + parts[i + 1:])), np.sort(parts[i]))
                  for i in range(n_folds))
    return ridge.Splits(train=train, test=test, folds=folds)


def decompose(spec, X: np.ndarray, splits):
    """``fit.decompose_design`` with explicit splits: the same z-scoring (training rows'
    statistics) and ``ridge.prepare`` call. X (n, p) -> ridge.Decomposition."""
    from neurotask.pipeline import ridge
    from neurotask.pipeline.ridge import design

    if spec.zscore_features:
        X = design.standardize(X, splits.train)
    return ridge.prepare(X, splits, dtype=np.dtype(spec.dtype), backend=spec.backend, device=spec.device)


def decomposition_bytes(p: int, n_train: int, fit_sizes: list[int], eval_sizes: list[int], ks: list[int],
                        itemsize: int, cross: bool) -> int:
    """Analytic size of a Decomposition (pipeline/ridge/decomposition.py), bytes.

    One Basis per fold and the final one: eigvals (k,) float64 and proj_eval (n_eval, k); the
    cross-product form adds rotation V (p, k) and fit_shift (p,) float64 per basis and the shared
    centred training features (n_train, p) with their order (n_train,) int64; the direct form
    adds proj_fit (k, n_fit) per basis. ``fit_sizes``, ``eval_sizes``, ``ks``: per basis (folds,
    then final); ``itemsize`` that of fit.dtype.
    """
    total = 0
    for n_fit, n_eval, k in zip(fit_sizes, eval_sizes, ks):
        total += 8 * k + itemsize * n_eval * k
        total += itemsize * p * k + 8 * p if cross else itemsize * k * n_fit
    if cross:
        total += itemsize * n_train * p + 8 * n_train
    return total


# --------------------------------------------------------------------------- the worker process


def worker(task: dict) -> dict:
    """One fit worker's work, measured: decompose once, then ``fit_voxels`` each chunk in turn.

    task: {"dir": data folder (X.npy, Y_<i>.npy, splits.npz), "dtype", "n_permutations",
    "chunks": [chunk indices], "threads"}. Returns CPU seconds (process_time) of the
    decomposition, and per chunk of the whole ``fit_voxels`` and of its permutation test; the
    decomposition's size, measured (``nbytes``) and analytic (:func:`decomposition_bytes`).
    """
    from threadpoolctl import threadpool_limits

    from neurotask.pipeline import ridge
    from neurotask.pipeline.config import FitSection
    from neurotask.pipeline.stages.fit import alpha_grid, fit_voxels
    from neurotask.pipeline.stats import scores

    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports (and the parent's mark)
    d = Path(task["dir"])
    with np.load(d / "splits.npz") as z:
        k = int(z["n_folds"])
        splits = ridge.Splits(train=z["train"], test=z["test"],
                              folds=tuple(ridge.Fold(z[f"fit{i}"], z[f"val{i}"]) for i in range(k)))
    spec = FitSection(n_folds=k, dtype=task["dtype"], n_permutations=task["n_permutations"])
    perm_cpu = [0.0]
    timed = scores.permutation_test

    def permutation_test(*a, **kw):  # fit_voxels calls it as stats.permutation_test: timed here
        c = time.process_time()
        try:
            return timed(*a, **kw)
        finally:
            perm_cpu[0] += time.process_time() - c

    scores.permutation_test = permutation_test
    try:
        with threadpool_limits(task["threads"]):
            X = np.load(d / "X.npy")  # float32, as the store holds it
            p = X.shape[1]
            alphas = alpha_grid(spec, p)
            c0 = time.process_time()
            dec = decompose(spec, X, splits)
            dec_cpu = time.process_time() - c0
            dec_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            del X
            chunks = []
            for i in task["chunks"]:
                Y = np.load(d / f"Y_{i}.npy")  # one chunk in memory at a time, as a worker
                perm_cpu[0] = 0.0
                c = time.process_time()
                values = fit_voxels(spec, dec, Y, alphas)
                chunks.append({"chunk": i, "voxels": int(Y.shape[1]), "cpu_seconds": time.process_time() - c,
                               "permutation_cpu_seconds": perm_cpu[0],
                               "median_r": float(np.nanmedian(values["r"])),
                               "has_pvalue_perm": "pvalue_perm" in values,
                               # this process's peak so far (ru_maxrss sees BLAS's buffers too)
                               "peak_rss_mb_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
                del Y, values
            phases = _phases(spec, dec, np.load(d / "Y_0.npy")[:, :task["diagnose"]], alphas) \
                if task.get("diagnose") else None
    finally:
        scores.permutation_test = timed  # this process may go on (a test calls worker in-process)
    bases = list(dec.folds) + [dec.final]
    cross = dec.centred is not None
    analytic = decomposition_bytes(p, int(splits.train.size), [b.fit_rows.size for b in bases],
                                   [b.eval_rows.size for b in bases], [b.eigvals.size for b in bases],
                                   np.dtype(task["dtype"]).itemsize, cross)
    return {"dtype": task["dtype"], "decomposition_cpu_seconds": dec_cpu, "chunks": chunks,
            "peak_rss_mb_at_start": start_rss, "peak_rss_mb_after_decomposition": dec_rss,
            "decomposition_bytes": dec.nbytes, "decomposition_bytes_analytic": analytic,
            "form": "cross-product" if cross else "direct", "ks": [int(b.eigvals.size) for b in bases],
            "from_rows": any(b.from_rows for b in bases), "phases": phases}


class PhaseMeter:
    """An engine observer (pipeline/ridge/observer.py) that sums CPU s and flops per phase and
    keeps the certified search's largest expansion rank and its count of exact pairs."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.flops: dict[str, float] = {}
        self.scalars: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, flops: float):
        c = time.process_time()
        yield
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
        self.flops[name] = self.flops.get(name, 0.0) + flops

    def count(self, name: str, value: float) -> None:
        self.scalars[name] = self.scalars.get(name, 0.0) + value

    def maximum(self, name: str, value: float) -> None:
        self.scalars[name] = max(self.scalars.get(name, value), value)


def _phases(spec, dec, Y: np.ndarray, alphas: np.ndarray) -> dict:
    """``ridge.ridge_cv`` of Y (n, v) as fit_voxels calls it, with a :class:`PhaseMeter`: where
    a chunk's CPU goes (why float64 costs what it does)."""
    from neurotask.pipeline import ridge

    meter = PhaseMeter()
    ridge.ridge_cv(dec, Y, alphas, search=spec.search, backend=spec.backend, device=spec.device, observer=meter)
    return {"voxels": int(Y.shape[1]), "cpu_seconds": meter.cpu, "gflop": {k: v / 1e9 for k, v in meter.flops.items()},
            **meter.scalars}


def run_worker(task: dict, workdir: Path, threads: int) -> dict:
    """Run :func:`worker` in a fresh process with ``threads`` BLAS threads; adds the child's
    peak RSS (ru_maxrss of that child alone, from os.wait4) and its user + system CPU s."""
    spec_path, out_path = workdir / "task.json", workdir / "result.json"
    spec_path.write_text(json.dumps(task))
    out_path.unlink(missing_ok=True)
    env = {**os.environ, **{k: str(threads) for k in THREAD_VARS}}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), str(out_path)],
                            env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {task['dtype']} exited with status {proc.returncode}")
    result = json.loads(out_path.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    result["child_cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return result


def write_data(d: Path, args) -> dict:
    """Synthetic features (n, p) float32 and responses in chunk files (n, chunk) float32, as a
    worker reads them from the store; the splits. Returns the chunks' voxel counts."""
    from bench_ridge import make_problem

    n = args.n_train + args.n_test
    X, Y = make_problem(n, args.p, args.voxels, seed=args.seed)
    np.save(d / "X.npy", X)
    sizes = []
    for i, s in enumerate(range(0, args.voxels, args.chunk)):
        np.save(d / f"Y_{i}.npy", np.ascontiguousarray(Y[:, s:s + args.chunk]))
        sizes.append(min(args.chunk, args.voxels - s))
    splits = nsd_splits(args.n_train, args.n_test, args.n_folds, args.seed)
    np.savez(d / "splits.npz", train=splits.train, test=splits.test, n_folds=len(splits.folds),
             **{f"fit{i}": f.fit for i, f in enumerate(splits.folds)},
             **{f"val{i}": f.validation for i, f in enumerate(splits.folds)})
    return {"chunk_voxels": sizes}


# --------------------------------------------------------------------------- projection


def simulate_wall(pairs: list[tuple[float, list[float]]], workers: int, in_flight: int | None = None) -> float:
    """Wall seconds of the fit's schedule on ``workers`` one-thread workers (no transfers, no
    queue wait): as ``pipeline.stages.fit.fit`` submits them, ``max(2, workers)`` (subject, task)
    pairs in flight, each a decomposition then its chunks, the next pair submitted when a pair's
    last chunk ends; a free worker takes the earliest-submitted ready task (Dask's default
    priority).

    pairs: per pair (decomposition CPU s, [CPU s of each chunk]).
    """
    limit = in_flight or max(2, workers)
    pending = deque(range(len(pairs)))
    ready: list[tuple[int, str, int, float]] = []  # (submission order, kind, pair, cost)
    running: list[tuple[float, int, str, int]] = []  # (end time, submission order, kind, pair)
    left: dict[int, int] = {}
    order = 0
    t, free = 0.0, workers

    def submit() -> None:
        nonlocal order
        i = pending.popleft()
        left[i] = len(pairs[i][1])
        heapq.heappush(ready, (order, "dec", i, pairs[i][0]))
        order += 1 + len(pairs[i][1])  # its chunks take the next numbers when the decomposition ends

    while pending and len(left) < limit:
        submit()
    while ready or running:
        while free and ready:
            seq, kind, i, cost = heapq.heappop(ready)
            heapq.heappush(running, (t + cost, seq, kind, i))
            free -= 1
        t, seq, kind, i = heapq.heappop(running)
        free += 1
        if kind == "dec":
            for j, c in enumerate(pairs[i][1]):
                heapq.heappush(ready, (seq + 1 + j, "chunk", i, c))
        else:
            left[i] -= 1
            if left[i] == 0:
                del left[i]
                if pending:
                    submit()
    return t


def chunk_sizes(voxels: int, chunk: int) -> list[int]:
    return [min(chunk, voxels - s) for s in range(0, voxels, chunk)]


def pair_cost(costs: dict, voxels: int, chunk: int, permutation: bool, decompose: bool = True
              ) -> tuple[float, list[float]]:
    """(decomposition CPU s, [chunk CPU s]) of one (subject, task) from the per-voxel medians."""
    per_voxel = costs["ridge_cpu_per_voxel"] + (costs["permutation_cpu_per_voxel"] if permutation else 0.0)
    return (costs["decomposition_cpu_seconds"] if decompose else 0.0,
            [v * per_voxel for v in chunk_sizes(voxels, chunk)])


def project(costs: dict, args) -> dict:
    """The 8-subject x 21-task study: CPU, and wall on this machine and on N SLURM nodes."""
    out = {}
    subjects = len(NSD_IMAGES)
    for space, voxels in (("nsdgeneral", args.nsdgeneral), ("whole_brain", args.whole_brain)):
        for permutation in (False, True):
            pair = pair_cost(costs, voxels, args.chunk, permutation)
            pairs = [pair] * (subjects * N_TASKS)
            cpu = sum(d + sum(c) for d, c in pairs)
            decomp = sum(d for d, _ in pairs)
            # BOLD5000-like design (every subject saw the same images, same split): one
            # decomposition per task, the other subjects' pairs reuse it.
            shared = [pair_cost(costs, voxels, args.chunk, permutation, decompose=(s == 0))
                      for s in range(subjects) for _ in range(N_TASKS)]
            cpu_shared = sum(d + sum(c) for d, c in shared)
            walls = {"this machine": simulate_wall(pairs, args.local_workers)}
            for n in args.nodes:
                walls[f"{n} node{'s' if n > 1 else ''}"] = simulate_wall(pairs, n * args.node_cores)
            out[f"{space}{' + permutations' if permutation else ''}"] = {
                "voxels": voxels, "permutation": permutation, "pair_cpu_seconds": pair[0] + sum(pair[1]),
                "chunks_per_pair": len(pair[1]), "study_cpu_seconds": cpu, "decomposition_share": decomp / cpu,
                "study_cpu_seconds_shared_decompositions": cpu_shared, "sharing_saving": 1 - cpu_shared / cpu,
                "wall_seconds": walls}
    return out


def nsd_overlap() -> dict:
    """What two NSD subjects' training sets have in common (from the design's facts): only the
    shared images outside the test set. A decomposition depends on every training row, so
    training sets that differ in any image cannot share one."""
    n_train = {s: n - NSD_TEST for s, n in NSD_IMAGES.items()}
    common = NSD_SHARED - NSD_TEST  # the most any two subjects' training sets can share
    return {"training_images": n_train, "max_common_training_images": common,
            "max_common_fraction": common / min(n_train.values()),
            "own_images_at_least": {s: n - NSD_SHARED for s, n in NSD_IMAGES.items()}}


# --------------------------------------------------------------------------- summary


def medians(runs: list[dict]) -> dict:
    """Per-dtype medians over repeats: decomposition CPU s, ridge and permutation CPU s per
    voxel (each run's totals over its chunks), peak RSS."""
    def per_voxel(r: dict, key: str) -> float:
        return sum(c[key] for c in r["chunks"]) / sum(c["voxels"] for c in r["chunks"])

    return {
        "decomposition_cpu_seconds": statistics.median(r["decomposition_cpu_seconds"] for r in runs),
        "fit_voxels_cpu_per_voxel": statistics.median(per_voxel(r, "cpu_seconds") for r in runs),
        "permutation_cpu_per_voxel": statistics.median(per_voxel(r, "permutation_cpu_seconds") for r in runs),
        "ridge_cpu_per_voxel": statistics.median(
            (sum(c["cpu_seconds"] - c["permutation_cpu_seconds"] for c in r["chunks"])
             / sum(c["voxels"] for c in r["chunks"])) for r in runs),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
        # the high-water mark after the decomposition and after the first chunk (one of each)
        "peak_rss_mb_at_start": statistics.median(r["peak_rss_mb_at_start"] for r in runs),
        "peak_rss_mb_after_decomposition": statistics.median(r["peak_rss_mb_after_decomposition"] for r in runs),
        "peak_rss_mb_after_first_chunk": statistics.median(r["chunks"][0]["peak_rss_mb_after"] for r in runs),
        "decomposition_cpu_runs": [r["decomposition_cpu_seconds"] for r in runs],
        "voxels_measured": sum(c["voxels"] for c in runs[0]["chunks"]),
        "decomposition_bytes": runs[0]["decomposition_bytes"],
        "decomposition_bytes_analytic": runs[0]["decomposition_bytes_analytic"],
        "form": runs[0]["form"], "from_rows": runs[0]["from_rows"],
        "phases": next((r["phases"] for r in runs if r.get("phases")), None),
    }


def _h(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def print_summary(out: dict) -> None:
    a = out["args"]
    print(f"\nNSD shape: n_train {a['n_train']}, n_test {a['n_test']}, p {a['p']}, {a['n_folds']} folds, paper grid, "
          f"certified search, chunks of {a['chunk']}, {a['threads']} BLAS thread(s) per worker; medians of "
          f"{a['repeats']} ({out['cpu']})")
    print("\n| dtype | voxels measured | decomposition CPU s | fit_voxels CPU s / 1000 voxels | of which permutations "
          f"({a['n_permutations']}) | peak RSS (worker) | decomposition size (measured / analytic) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dt, m in out["costs"].items():
        print(f"| {dt} | {m['voxels_measured']:,} | {m['decomposition_cpu_seconds']:.1f} | "
              f"{1000 * m['fit_voxels_cpu_per_voxel']:.2f} | {1000 * m['permutation_cpu_per_voxel']:.2f} | "
              f"{m['peak_rss_mb'] / 1024:.2f} GB | {m['decomposition_bytes'] / 1e6:.0f} / "
              f"{m['decomposition_bytes_analytic'] / 1e6:.0f} MB ({m['form']}) |")
    for dt, m in out["costs"].items():
        print(f"{dt} worker peak RSS: {m['peak_rss_mb_at_start']:.0f} MB at start (imports), "
              f"{m['peak_rss_mb_after_decomposition']:.0f} MB after the decomposition, "
              f"{m['peak_rss_mb_after_first_chunk']:.0f} MB after its first chunk, {m['peak_rss_mb']:.0f} MB after "
              f"{m['voxels_measured']:,} voxels")
    print("\n| one (subject, task), one thread | " + " | ".join(out["costs"]) + " |")
    print("|---|" + "---:|" * len(out["costs"]))
    for key in ("nsdgeneral", "nsdgeneral + permutations", "whole_brain", "whole_brain + permutations"):
        cells = [f"{p[key]['pair_cpu_seconds']:.0f} CPU s"
                 for p in out["projection"].values()]
        print(f"| {key} ({out['projection']['float32'][key]['voxels']:,} voxels) | " + " | ".join(cells) + " |")
    for dt, proj in out["projection"].items():
        cols = list(next(iter(proj.values()))["wall_seconds"])
        print(f"\nthe 8 x 21 study, {dt}: study CPU, wall by simulation of the fit's schedule")
        print("| | CPU | decompositions | saved by sharing them (BOLD5000-like) | " + " | ".join(cols) + " |")
        print("|---|---:|---:|---:|" + "---:|" * len(cols))
        for key, p in proj.items():
            print(f"| {key} | {_h(p['study_cpu_seconds'])} | {100 * p['decomposition_share']:.1f}% | "
                  f"{100 * p['sharing_saving']:.1f}% | " + " | ".join(_h(w) for w in p["wall_seconds"].values()) + " |")
    for dt, m in out["costs"].items():
        ph = m.get("phases")
        if ph:
            parts = ", ".join(f"{k} {1000 * v / ph['voxels']:.2f} ms ({ph['gflop'][k] * 1000 / ph['voxels']:.0f} MFLOP)"
                              for k, v in ph["cpu_seconds"].items())
            print(f"\n{dt} phases per voxel ({ph['voxels']} voxels of chunk 0): {parts}; expansion rank "
                  f"{ph.get('rank', 'none: exhaustive sweep')}, exact pairs {ph.get('exact_pairs', 0):.0f}")
    o = out["nsd_overlap"]
    print(f"\nNSD subjects' training sets share at most {o['max_common_training_images']} images "
          f"({100 * o['max_common_fraction']:.1f}% of the smallest): no decomposition can be shared across them.")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        Path(sys.argv[3]).write_text(json.dumps(worker(json.loads(Path(sys.argv[2]).read_text()))))
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--write-data":
        d = Path(sys.argv[2])
        (d / "data.json").write_text(json.dumps(write_data(d, argparse.Namespace(**json.loads(sys.argv[3])))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=9000)
    ap.add_argument("--n-test", type=int, default=NSD_TEST)
    ap.add_argument("--p", type=int, default=2048, help="features per task (a Taskonomy encoder: 2048)")
    ap.add_argument("--n-folds", type=int, default=7)
    ap.add_argument("--voxels", type=int, default=NSDGENERAL, help="voxels measured in float32")
    ap.add_argument("--voxels-float64", type=int, default=4000,
                    help="voxels measured in float64 (the first chunks of the same data; 0: skip float64)")
    ap.add_argument("--chunk", type=int, default=2000, help="data.chunk_size of configs/nsd.yaml")
    ap.add_argument("--n-permutations", type=int, default=5000, help="fit.n_permutations (the default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads per worker process")
    ap.add_argument("--seed", type=int, default=2019)
    ap.add_argument("--nsdgeneral", type=int, default=NSDGENERAL, help="voxels of one (subject, task), projected")
    ap.add_argument("--whole-brain", type=int, default=WHOLE_BRAIN, help="voxels of a whole-brain (subject, task)")
    ap.add_argument("--local-workers", type=int, default=2, help="one-thread workers on this machine")
    ap.add_argument("--node-cores", type=int, default=32, help="cores (one-thread workers) per SLURM node")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--diagnose", type=int, default=0,
                    help="after the timed chunks, this many voxels of chunk 0 again with the engine's phase "
                         "meter (CPU s and flops per phase, expansion rank), once per dtype; 0: off")
    ap.add_argument("--out", help="write every number as JSON here")
    args = ap.parse_args()

    from bench_ridge import _device_name

    runs: dict[str, list[dict]] = {"float32": [], "float64": []}
    with tempfile.TemporaryDirectory(prefix="bench_nsd_") as tmp:
        d = Path(tmp)
        c0, t0 = time.process_time(), time.perf_counter()
        # In a child of its own: a worker's ru_maxrss starts at its parent's high-water mark (Linux
        # carries the pre-exec address space's peak into the exec'd child), so this process
        # never holds the data.
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--write-data", str(d), json.dumps(vars(args))],
                       check=True, env={**os.environ, **{k: str(args.threads) for k in THREAD_VARS}})
        data = json.loads((d / "data.json").read_text())
        print(f"[nsd-bench] {args.n_train + args.n_test} images x {args.p} features, {args.voxels} voxels in "
              f"{len(data['chunk_voxels'])} chunks written in {time.perf_counter() - t0:.0f} s "
              f"({time.process_time() - c0:.0f} CPU s)", flush=True)
        n64 = math.ceil(args.voxels_float64 / args.chunk) if args.voxels_float64 else 0
        plan = {"float32": list(range(len(data["chunk_voxels"]))), "float64": list(range(n64))}
        for i in range(args.repeats):
            for dtype in (("float32", "float64") if i % 2 == 0 else ("float64", "float32")):
                if not plan[dtype]:
                    continue
                task = {"dir": str(d), "dtype": dtype, "n_permutations": args.n_permutations,
                        "chunks": plan[dtype], "threads": args.threads, "diagnose": args.diagnose if i == 0 else 0}
                t = time.perf_counter()
                r = run_worker(task, d, args.threads)
                runs[dtype].append(r)
                voxels = sum(c["voxels"] for c in r["chunks"])
                cpu = sum(c["cpu_seconds"] for c in r["chunks"])
                perm = sum(c["permutation_cpu_seconds"] for c in r["chunks"])
                print(f"[nsd-bench] round {i + 1} {dtype}: decomposition {r['decomposition_cpu_seconds']:.1f} CPU s, "
                      f"{voxels} voxels {cpu:.1f} CPU s (permutations {perm:.1f}), peak RSS {r['peak_rss_mb']:.0f} MB, "
                      f"{time.perf_counter() - t:.0f} s wall (load {os.getloadavg()[0]:.1f})", flush=True)
    costs = {dt: medians(rs) for dt, rs in runs.items() if rs}
    out = {"args": vars(args), "cpu": _device_name(None), "costs": costs,
           "projection": {dt: project(c, args) for dt, c in costs.items()},
           "nsd_overlap": nsd_overlap(), "runs": runs, "load": os.getloadavg()}
    print_summary(out)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
