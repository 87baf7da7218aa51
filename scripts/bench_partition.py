#!/usr/bin/env python
"""The variance partition's cost at BOLD5000's shape, and the engine's memory on wide unions.

``partition`` (default): n = 4916 images, 7 folds, 15% test, two groups A and B of 3 feature
spaces x 1024 features (the union A∪B has p = 6144 > n_fit: the kernel form), ``--voxels``
voxels. It times, in CPU seconds (time.process_time, all threads), medians over ``--repeats``:
- ``fits``: three independent fits with the engine (prepare + ridge_cv of A, B and A∪B);
- ``partition``: the same fits, then the inclusion-exclusion (stats.partition.regions) and the
  unique-variance sign-flip test (stats.partition.unique_pvalues, ``--permutations``) of A and B;
and reports per-voxel and per-decomposition costs and the process's peak RSS.

``memory``: one process per width ``--widths`` (fresh peak RSS each): features generated in
blocks of 1024 (float32), ``prepare`` + ``ridge_cv`` on ``--voxels`` voxels; prints CPU seconds
of each and the peak RSS (ru_maxrss).

``project``: a whole-study partition from those two outputs (``--partition-json``,
``--memory-json``), no fitting. With S subjects of V voxels in blocks of ``--block`` voxels
(B = ceil(V / block) units per subject, each decomposing every union once, as
pipeline/stages/partition.py does), G groups (U = 2^G - 1 unions of widths ``--union-widths``),
prepare's CPU s fitted as P(p) = a + b p on the kernel-form widths, c_v the per-voxel ridge_cv
CPU s of one union and c_t the per-voxel CPU s of one group's unique-variance test:

    CPU = S B Σ_u P(p_u) + S V (U c_v + G c_t)
    wall(C one-thread workers) = ceil(S B / C) x [Σ_u P(p_u) + block (U c_v + G c_t)]

    python scripts/bench_partition.py --voxels 2000 --repeats 1 --out partition.json
    python scripts/bench_partition.py memory --widths 6144 12288 --voxels 200 --out memory.json
    python scripts/bench_partition.py project --partition-json partition.json --memory-json memory.json
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from neurotask.pipeline import ridge
from neurotask.pipeline.stats.partition import regions, subsets, unique_pvalues

N, SPACE = 4916, 1024


def features(n: int, p: int, seed: int) -> np.ndarray:
    """(n, p) float32: blocks of SPACE features, each with singular values ~ 1/k in its own
    random rotation and positive column means (CNN-like), generated block by block."""
    rng = np.random.default_rng(seed)
    X = np.empty((n, p), dtype=np.float32)
    for c in range(0, p, SPACE):
        w = min(SPACE, p - c)
        rot, _ = np.linalg.qr(rng.standard_normal((w, w)))
        sv = np.arange(1, w + 1, dtype=np.float64) ** -1.0
        X[:, c : c + w] = (3.0 * (rng.standard_normal((n, w)) * sv) @ rot.T + 2.0 * rng.random(w)).astype(np.float32)
    return X


def responses(X: np.ndarray, v: int, seed: int) -> np.ndarray:
    """(n, v) float32: a signal in the first half's and in the second half's features (each voxel
    a mix), unit noise, raw-BOLD-like means."""
    rng = np.random.default_rng(seed)
    half = X.shape[1] // 2
    Xc = X - X.mean(0)
    mix = rng.random(v)
    sig = np.zeros((X.shape[0], v))
    for part, w in ((slice(0, half), mix), (slice(half, None), 1 - mix)):
        s = Xc[:, part] @ rng.standard_normal((half, v)).astype(np.float32)
        sig += (s / s.std(0)) * np.sqrt(w)
    snr = 10 ** rng.uniform(-1.5, 0.0, v)
    return (sig * np.sqrt(snr) + rng.standard_normal(sig.shape) + rng.normal(100, 20, v)).astype(np.float32)


def r2(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return 1.0 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def fit(X, Y, splits, alphas):
    t = time.process_time()
    dec = ridge.prepare(X, splits)
    t_prep = time.process_time() - t
    res = ridge.ridge_cv(dec, Y, alphas)
    return res, t_prep, time.process_time() - t - t_prep


def run_partition(args) -> dict:
    p = 2 * 3 * SPACE
    X = features(N, p, args.seed)
    Y = responses(X, args.voxels, args.seed + 1)
    splits = ridge.make_splits(N, n_folds=7, test_fraction=0.15, seed=args.seed)
    cols = {("A",): slice(0, p // 2), ("B",): slice(p // 2, p), ("A", "B"): slice(0, p)}
    yt = np.asarray(Y[splits.test], dtype=np.float64)
    rows = []
    for rep in range(args.repeats):
        t0 = time.process_time()
        preds, prep, sweep = {}, {}, {}
        for s in subsets(["A", "B"]):
            alphas = ridge.paper_alphas(cols[s].stop - cols[s].start)
            res, prep[s], sweep[s] = fit(np.ascontiguousarray(X[:, cols[s]]), Y, splits, alphas)
            preds[s] = res.test_prediction
        t_fits = time.process_time() - t0
        reg = regions({s: r2(yt, preds[s]) for s in preds}, ["A", "B"])
        pvals = {g: unique_pvalues(yt, preds[("A", "B")], preds[(h,)], n_permutations=args.permutations)
                 for g, h in (("A", "B"), ("B", "A"))}
        t_all = time.process_time() - t0
        rows.append({"fits_s": t_fits, "partition_s": t_all, "stats_s": t_all - t_fits,
                     **{f"prepare_{'+'.join(s)}_s": prep[s] for s in prep},
                     **{f"ridge_cv_{'+'.join(s)}_s": sweep[s] for s in sweep}})
        print(json.dumps(rows[-1]), flush=True)
        assert all(np.isfinite(reg[k]).all() for k in reg) and all((0 < pvals[g]).all() for g in pvals)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    v = args.voxels
    return {"n": N, "p_union": p, "voxels": v, "repeats": args.repeats, "permutations": args.permutations,
            "median": med, "per_voxel_fits_s": sum(med[f"ridge_cv_{k}_s"] for k in ("A", "B", "A+B")) / v,
            "per_voxel_stats_s": med["stats_s"] / v,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_memory_one(p: int, v: int, seed: int) -> dict:
    X = features(N, p, seed)
    Y = np.random.default_rng(seed).standard_normal((N, v)).astype(np.float32)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    splits = ridge.make_splits(N, n_folds=7, test_fraction=0.15, seed=seed)
    res, t_prep, t_cv = fit(X, Y, splits, ridge.paper_alphas(p))
    return {"p": p, "voxels": v, "prepare_s": t_prep, "ridge_cv_s": t_cv, "features_gb": X.nbytes / 2**30,
            "rss_before_gb": base, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def prepare_line(memory: list[dict]) -> tuple[float, float]:
    """Least-squares (a, b) of prepare's CPU s = a + b p over the measured widths (kernel form:
    a is the 8 eigh of n_fit ~ 3600-4200, b the kernels' per-feature cost)."""
    p = np.array([m["p"] for m in memory], dtype=float)
    t = np.array([m["prepare_s"] for m in memory], dtype=float)
    if p.size == 1:  # one width: all of it proportional to nothing, the line is flat
        return float(t[0]), 0.0
    b, a = np.polyfit(p, t, 1)
    return float(a), float(b)


def project(part: dict, memory: list[dict], subjects: int, voxels: int, block: int,
            widths: list[int], cores: list[int]) -> dict:
    """The formula of the module docstring; every input a measured CPU figure."""
    a, b = prepare_line(memory)
    groups = int(round(math.log2(len(widths) + 1)))
    med, v = part["median"], part["voxels"]
    c_v = med["ridge_cv_A+B_s"] / v  # the union's sweep: the kernel form's per-voxel cost
    c_t = med["stats_s"] / (2 * v)  # two groups' tests (and the regions) in the benchmark
    decomp = sum(a + b * p for p in widths)  # one unit's decompositions
    blocks = math.ceil(voxels / block)
    unit = decomp + block * (len(widths) * c_v + groups * c_t)
    cpu = subjects * blocks * decomp + subjects * voxels * (len(widths) * c_v + groups * c_t)
    units = subjects * blocks
    return {"prepare_a_s": a, "prepare_b_s_per_feature": b, "c_v_s": c_v, "c_t_s": c_t,
            "unit_decompositions_s": decomp, "unit_s": unit, "units": units, "cpu_s": cpu,
            "cpu_decompositions_s": subjects * blocks * decomp,
            "cpu_if_shared_decompositions_s": subjects * decomp + subjects * voxels * (len(widths) * c_v + groups * c_t),
            "wall_s": {str(c): math.ceil(units / c) * unit for c in cores}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="partition", choices=("partition", "memory", "memory-one", "project"))
    ap.add_argument("--voxels", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--widths", type=int, nargs="+", default=[6144, 12288, 24576, 43008])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--partition-json", help="project: the partition mode's --out")
    ap.add_argument("--memory-json", help="project: the memory mode's --out (kernel-form widths)")
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--subject-voxels", type=int, default=55_000)
    ap.add_argument("--block", type=int, default=4000, help="partition.block_size")
    ap.add_argument("--union-widths", type=int, nargs="+",
                    default=[10752] * 4 + [21504] * 6 + [32256] * 4 + [43008],
                    help="the unions' feature counts (default: 4 Taskonomy groups, 15 unions)")
    ap.add_argument("--cores", type=int, nargs="+", default=[2, 32, 128, 512])
    args = ap.parse_args()
    if args.mode == "project":
        with open(args.partition_json) as fh, open(args.memory_json) as gh:
            out = project(json.load(fh), json.load(gh), args.subjects, args.subject_voxels, args.block,
                          args.union_widths, args.cores)
    elif args.mode == "partition":
        out = run_partition(args)
    elif args.mode == "memory-one":
        out = run_memory_one(args.widths[0], args.voxels, args.seed)
    else:
        out = []
        for p in args.widths:  # a fresh process per width: ru_maxrss is the process's peak
            cmd = [sys.executable, __file__, "memory-one", "--widths", str(p), "--voxels", str(args.voxels)]
            out.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
            print(json.dumps(out[-1]), flush=True)
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
