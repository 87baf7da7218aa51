#!/usr/bin/env python
"""Banded ridge: ours (banded_ridge_cv: prepare + certified ridge_cv per candidate) against
himalaya's banded ridge (``solve_group_ridge_random_search``) at the same candidates, alphas,
folds and intercept handling. Ours in ``--dtype`` (default float32, the engine's default: the
decompositions in float64, the voxel products in float32); himalaya in its own default (the
inputs' dtype, float64).

Each side runs in its own process with one BLAS thread; CPU seconds (time.process_time) of the
fit alone (data generation excluded), median over ``--repeats``. Agreement: the share of voxels
with the same chosen (candidate, alpha) and the largest |ΔR²| on the test set.

Default: BOLD5000 shape (n = 4916, 7 folds, 15% test, two groups of 3 feature spaces x 1024
features = 6 bands, p = 6144, 10,000 voxels). Smaller: ``--samples``, ``--features``,
``--voxels``, ``--candidates``. The corners of the simplex are left out of the candidates
(himalaya cannot scale a band by sqrt(0), see tests/test_banded.py).

    python scripts/bench_banded.py --samples 1500 --features 256 --voxels 2000 --candidates 4

Extrapolating to another shape: ``--breakdown`` also times (outside the measured fit) one
candidate's ``prepare`` (voxel-independent) and its ``ridge_cv`` voxel pass; ``--keep DIR``
keeps each side's result so that runs of one side (``--only``) can be compared afterwards with
``--compare OURS.npz HIMALAYA.npz``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def _data(args):
    """Standardised bands (n, p) x b and responses (n, v) driven by a random mix of bands."""
    rng = np.random.default_rng(args.seed)
    blocks = [rng.normal(size=(args.samples, args.features)) for _ in range(args.bands)]
    blocks = [(X - X.mean(0)) / X.std(0) for X in blocks]
    Y = rng.normal(size=(args.samples, args.voxels))
    mix = rng.dirichlet(np.full(args.bands, 0.3), size=args.voxels).T  # (b, v) each voxel's bands
    for b, X in enumerate(blocks):
        W = rng.normal(size=(args.features, args.voxels)) / np.sqrt(args.features)
        Y += (X @ W) * np.sqrt(mix[b])
    return blocks, Y


def _setup(args):
    from neurotask.pipeline import ridge
    blocks, Y = _data(args)
    splits = ridge.make_splits(args.samples, n_folds=7, test_fraction=0.15, seed=0)
    alphas = ridge.paper_alphas(args.bands * args.features, args.alphas)
    cand = ridge.simplex_candidates(args.bands, args.candidates + args.bands, seed=0)
    cand = cand[(cand > 0).all(1)][: args.candidates]
    return ridge, blocks, Y, splits, alphas, cand


def _worker(args) -> None:
    ridge, blocks, Y, splits, alphas, cand = _setup(args)
    tr, te = splits.train, splits.test
    if args.worker == "ours":
        t0 = time.process_time()
        res = ridge.banded_ridge_cv(blocks, splits, Y, alphas, cand, dtype=np.dtype(args.dtype),
                                    voxel_batch=args.voxel_batch)
        cpu = time.process_time() - t0
        deltas, pred = np.log(res.weights / res.alpha[None]), res.test_prediction
        if args.breakdown:  # after the timed fit: one candidate's decomposition and voxel pass
            union = np.concatenate([np.sqrt(g) * X for g, X in zip(cand[0], blocks)], 1)
            t1 = time.process_time()
            dec = ridge.prepare(union, splits, dtype=np.dtype(args.dtype))
            t2 = time.process_time()
            ridge.ridge_cv(dec, Y, alphas, voxel_batch=args.voxel_batch)
            t3 = time.process_time()
            extra = {"prepare_cpu": t2 - t1, "voxel_pass_cpu": t3 - t2}
    else:
        from himalaya.backend import set_backend
        from himalaya.ridge import solve_group_ridge_random_search
        set_backend("numpy")
        pos = np.empty(Y.shape[0], dtype=np.int64)
        pos[tr] = np.arange(tr.size)
        cv = [(pos[f.fit], pos[f.validation]) for f in splits.folds]
        t0 = time.process_time()
        deltas, w, _, intercept = solve_group_ridge_random_search(
            [X[tr] for X in blocks], Y[tr], n_iter=cand, alphas=alphas, fit_intercept=True, cv=cv,
            return_weights=True, local_alpha=True, progress_bar=False, warn=False,
            n_targets_batch=args.voxel_batch, n_alphas_batch=min(args.alphas, 20))  # (20, p, n_fit) float64 at a time
        pred = np.concatenate([X[te] for X in blocks], 1) @ w + intercept
        cpu = time.process_time() - t0
    y = Y[te]
    r2 = 1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    np.savez(args.out, deltas=np.asarray(deltas), r2=r2, cpu=cpu, **(extra if args.worker == "ours" and args.breakdown else {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4916)
    ap.add_argument("--features", type=int, default=1024, help="features per band")
    ap.add_argument("--bands", type=int, default=6)
    ap.add_argument("--voxels", type=int, default=10_000)
    ap.add_argument("--candidates", type=int, default=12, help="band weightings (corners excluded)")
    ap.add_argument("--alphas", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--voxel-batch", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float32",
                    help="our voxel products (himalaya: float64 always)")
    ap.add_argument("--only", choices=("ours", "himalaya"), help="run one side only")
    ap.add_argument("--breakdown", action="store_true",
                    help="ours: also time one candidate's prepare and voxel pass (after the timed fit)")
    ap.add_argument("--keep", help="directory to keep each side's last result (ours-<dtype>.npz, himalaya.npz)")
    ap.add_argument("--compare", nargs=2, metavar=("OURS_NPZ", "HIMALAYA_NPZ"),
                    help="only compare two kept results (agreement and CPU ratio), run nothing")
    ap.add_argument("--worker", choices=("ours", "himalaya"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args)
    if args.compare:
        last = {}
        for side, path in zip(("ours", "himalaya"), args.compare):
            with np.load(path) as f:
                last[side] = {k: f[k] for k in f.files}
        rep = {"cpu_s": {s: float(last[s]["cpu"]) for s in last}, **_agreement(last)}
        print(json.dumps(rep, indent=1))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    sides = [args.only] if args.only else ["ours", "himalaya"]
    cpu, last = {s: [] for s in sides}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for side in sides:
                out = os.path.join(tmp, f"{side}.npz")
                cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", side, "--out", out]
                subprocess.run(cmd, env=env, check=True)
                with np.load(out) as f:
                    last[side] = {k: f[k] for k in f.files}
                cpu[side].append(float(last[side]["cpu"]))
                print(f"{side}: {cpu[side][-1]:.1f} CPU s", flush=True)
                if args.keep:
                    os.makedirs(args.keep, exist_ok=True)
                    name = f"ours-{args.dtype}" if side == "ours" else side  # himalaya ignores --dtype
                    np.savez(os.path.join(args.keep, f"{name}.npz"), **last[side])
    report = {"shape": {k: getattr(args, k) for k in ("samples", "features", "bands", "voxels", "candidates", "alphas", "dtype")},
              "cpu_s_median": {s: statistics.median(v) for s, v in cpu.items()},
              "cpu_s_per_1000_voxels": {s: 1000 * statistics.median(v) / args.voxels for s, v in cpu.items()}}
    if "ours" in last and "prepare_cpu" in last["ours"]:
        report["ours_one_candidate_cpu_s"] = {k: float(last["ours"][k]) for k in ("prepare_cpu", "voxel_pass_cpu")}
    if len(sides) == 2:
        report.update(_agreement(last))
        # after the agreement's (the last run's ratio): the ratio of the medians
        report["ratio_himalaya_over_ours"] = report["cpu_s_median"]["himalaya"] / report["cpu_s_median"]["ours"]
    print(json.dumps(report, indent=1))


def _agreement(last) -> dict:
    """Share of voxels with the same (candidate, alpha) (log band-alphas within 1e-5: far below the
    grid's spacing, above float32 round-off) and the largest test |ΔR²|, overall and where the
    choice agrees."""
    d_o, d_h = last["ours"]["deltas"], last["himalaya"]["deltas"]
    same = np.isclose(d_o, d_h, rtol=0, atol=1e-5).all(0)
    dr2 = np.abs(last["ours"]["r2"] - last["himalaya"]["r2"])
    out = {"same_choice_pct": 100 * float(same.mean()), "max_abs_delta_r2": float(dr2.max()),
           "max_abs_delta_r2_same_choice": float(dr2[same].max(initial=0))}
    if "cpu" in last["ours"] and "cpu" in last["himalaya"]:
        out["ratio_himalaya_over_ours"] = float(last["himalaya"]["cpu"]) / float(last["ours"]["cpu"])
    return out


if __name__ == "__main__":
    main()
