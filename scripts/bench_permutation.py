#!/usr/bin/env python
"""Cost of the permutation test of test r for one voxel chunk, at BOLD5000 shape.

Times ``pipeline.stats.scores.permutation_test`` (product design: one (A, n) @ (n, C) float32 GEMM per
voxel) on a chunk of synthetic test responses and predictions, and in the same run two
references: the straightforward batched i.i.d. shuffle (gather + einsum, float32) on a
subset of the voxels, and a large float32 GEMM (the machine's BLAS peak). Reports wall and
CPU seconds (CPU time is the cost on an otherwise idle core when the machine is shared),
GFLOP/s of the GEMM part, and the ratio to the ridge fit of the same chunk *assuming* the
fit costs of /work/shared/PERFORMANCE-FACTS.md (measured there with 2 BLAS threads; not
measured here).

    python scripts/bench_permutation.py [--voxels 10000] [--n-test 738] [--permutations 5000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from neurotask.pipeline.stats import scores as stats

# Fit cost per voxel of the shared-decomposition ridge CV at BOLD5000 shape (n = 4916,
# p = 2048, 7 folds), from PERFORMANCE-FACTS.md: 2 threads, 20 and 100 alphas.
FIT_MS_PER_VOXEL = {"20 alphas": 1.75, "100 alphas": 9.0}


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (wall, cpu) seconds of ``fn()`` over ``repeats`` runs, after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def iid_reference(y: np.ndarray, pred: np.ndarray, n_permutations: int, seed: int,
                  batch: int = 8) -> np.ndarray:
    """Exceedance counts from i.i.d. shuffles, vectorised as gather + einsum (float32)."""
    n = y.shape[0]
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(np.arange(n), (n_permutations, 1)), axis=1)
    yz = (y - y.mean(0)) / np.linalg.norm(y - y.mean(0), axis=0)
    pz = (pred - pred.mean(0)) / np.linalg.norm(pred - pred.mean(0), axis=0)
    r = (yz * pz).sum(0)
    yz, pz = yz.astype(np.float32), pz.astype(np.float32)
    count = np.zeros(y.shape[1], dtype=np.int64)
    for s in range(0, n_permutations, batch):
        null = np.einsum("knv,nv->kv", yz[perms[s:s + batch]], pz)
        count += (null >= r).sum(0)
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--voxels", type=int, default=10000)
    ap.add_argument("--n-test", type=int, default=738, help="15%% of 4916 images")
    ap.add_argument("--permutations", type=int, default=5000)
    ap.add_argument("--reference-voxels", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS threads (Dask workers run with 1 per worker thread)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n, v = args.n_test, args.voxels
    y = rng.standard_normal((n, v)).astype(np.float32)
    rho = rng.uniform(0.0, 0.5, v).astype(np.float32)
    pred = (rho * y + np.sqrt(1 - rho**2) * rng.standard_normal((n, v))).astype(np.float32)
    perms = stats.permutation_set(n, args.permutations, 0)
    a, c = perms.rows.shape[0], perms.cols.shape[0]
    gemm_flop = 2.0 * a * c * n * v

    with threadpool_limits(args.threads):
        wall, cpu = timed(lambda: stats.permutation_test(y, pred, args.permutations, 0),
                          args.repeats)
        wall_q, cpu_q = timed(lambda: stats.permutation_test(
            y, pred, args.permutations, 0, null_quantiles=[0.95, 0.99, 0.999]), args.repeats)
        k = min(args.reference_voxels, v)
        iid_wall, iid_cpu = timed(
            lambda: iid_reference(y[:, :k], pred[:, :k], args.permutations, 0), 1)
        big = rng.standard_normal((2048, 2048)).astype(np.float32)
        peak_wall, peak_cpu = timed(lambda: big @ big, args.repeats)
    # On a shared machine wall time includes waiting for the core: with one thread, rates are
    # per CPU-second (the cost on an idle core); with more, per wall-second.
    basis = "cpu" if args.threads == 1 else "wall"
    t_perm, t_peak = (cpu, peak_cpu) if basis == "cpu" else (wall, peak_wall)
    peak = 2.0 * 2048**3 / t_peak

    # Agreement of the two schemes' p on the reference voxels (Monte Carlo error only).
    res = stats.permutation_test(y[:, :k], pred[:, :k], args.permutations, 0)
    count_iid = iid_reference(y[:, :k], pred[:, :k], args.permutations, 1)
    p_iid = (1 + count_iid) / (1 + args.permutations)

    figures = {
        "shape": {"n_test": n, "voxels": v, "permutations": args.permutations, "design": [a, c],
                  "blas_threads": args.threads},
        "permutation_test_s": {"wall": wall, "cpu": cpu},
        "with_3_null_quantiles_s": {"wall": wall_q, "cpu": cpu_q},
        "ms_per_voxel_cpu": 1e3 * cpu / v,
        "gemm_gflop": gemm_flop / 1e9,
        "rate_basis": basis,
        "gemm_gflops_rate": gemm_flop / t_perm / 1e9,
        "blas_peak_gflops": peak / 1e9,
        "iid_gather_reference_ms_per_voxel_cpu": 1e3 * iid_cpu / k,
        "speedup_over_iid_gather_cpu": (iid_cpu / k) / (cpu / v),
        "max_abs_p_difference_vs_iid": float(np.max(np.abs(res.pvalue - p_iid))),
        "ratio_to_fit_assumed": {name: (cpu / v) / (ms / 1e3)
                                 for name, ms in FIT_MS_PER_VOXEL.items()},
    }
    print(f"permutation test: {v} voxels x {args.permutations} permutations, n_test {n}, "
          f"design {a} x {c}, {args.threads} BLAS thread(s)")
    print(f"  wall {wall:.2f} s, cpu {cpu:.2f} s  ({1e3 * cpu / v:.3f} ms/voxel cpu); "
          f"with 3 null quantiles: wall {wall_q:.2f} s, cpu {cpu_q:.2f} s")
    print(f"  GEMM part {gemm_flop / 1e9:.1f} GFLOP -> "
          f"{gemm_flop / t_perm / 1e9:.1f} GFLOP/s overall (per {basis} second; "
          f"BLAS peak here, 2048^3 sgemm: {peak / 1e9:.1f} GFLOP/s)")
    print(f"  reference, i.i.d. shuffles by gather + einsum: {1e3 * iid_cpu / k:.3f} ms/voxel cpu "
          f"-> product design {figures['speedup_over_iid_gather_cpu']:.1f}x faster; "
          f"max |p difference| {figures['max_abs_p_difference_vs_iid']:.4f} over {k} voxels")
    for name, ms in FIT_MS_PER_VOXEL.items():
        print(f"  ratio to the fit ({name}, {ms} ms/voxel assumed from PERFORMANCE-FACTS.md, "
              f"2 threads): {figures['ratio_to_fit_assumed'][name]:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
