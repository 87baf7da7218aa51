"""What the engine's wide-spectrum path costs and what it recovers (issue 17, engine hardening).

Features whose centred singular values span 1..1e-8 log-uniformly, with signal spread over every
direction (the adversarial case of the issue), against features of the same shape with a
BOLD5000-like spectrum. For each: CPU seconds of ``ridge.prepare`` (median of --repeats) with the
Gram-matrix path forced (``_GRAM_RELIABLE = 0``: what the engine did before) and with the default,
the test r of 200 voxels at each path's own CV-chosen alphas (and the r the Gram-only path
loses), and each path's distance from a float64 SVD reference at the alphas it chose.

    python scripts/bench_wide_spectrum.py --n 3000 --p 2048 --repeats 3 [--noise 0.01 --wide-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from neurotask.pipeline import ridge
from neurotask.pipeline.ridge import decomposition as dec


def features(n: int, p: int, decades: float, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, p) features with centred singular values logspace(0, -decades) and (n, 200)
    responses with equal signal variance in every direction (1 in all) plus noise of sd ``noise``."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((n, p)) - 0.0)
    U -= U.mean(0)
    U, _ = np.linalg.qr(U)
    V, _ = np.linalg.qr(rng.standard_normal((p, p)))
    S = np.logspace(0, -decades, p) * np.sqrt(n)
    X = (U * S) @ V.T
    Y = U @ rng.standard_normal((p, 200)) * np.sqrt(n / p) + noise * rng.standard_normal((n, 200))
    return X, Y


def reference_r(X, Y, splits, alphas) -> np.ndarray:
    tr, te = splits.train, splits.test
    mx, my = X[tr].mean(0), Y[tr].mean(0)
    U, S, Vt = np.linalg.svd(X[tr] - mx, full_matrices=False)
    E = (X[te] - mx) @ Vt.T
    UtY = U.T @ (Y[tr] - my)
    pred = np.stack([E @ (S / (S * S + a) * UtY[:, j]) + my[j] for j, a in enumerate(alphas)], 1)
    return _r(pred, Y[te])


def _r(pred, y) -> np.ndarray:
    pc, yc = pred - pred.mean(0), y - y.mean(0)
    return (pc * yc).sum(0) / np.sqrt((pc * pc).sum(0) * (yc * yc).sum(0))


def measure(X, Y, splits, repeats: int, dtype) -> dict:
    """Per path: prepare's CPU seconds (median), directions kept, the test r of its own CV-chosen
    alphas, and how far its predictions are from the float64 SVD reference at those alphas."""
    out, rs = {}, {}
    alphas = np.logspace(-14, 4, 37)
    for label, reliable in (("gram only (before)", 0.0), ("default", dec._GRAM_RELIABLE)):
        saved = dec._GRAM_RELIABLE
        dec._GRAM_RELIABLE = reliable
        try:
            cpu = []
            for _ in range(repeats):
                t0 = time.process_time()
                d = ridge.prepare(X, splits, dtype=dtype)
                cpu.append(time.process_time() - t0)
        finally:
            dec._GRAM_RELIABLE = saved
        res = ridge.ridge_cv(d, Y, alphas)
        rs[label] = _r(res.test_prediction, Y[splits.test])
        off = np.abs(reference_r(X, Y, splits, res.alpha) - rs[label])
        out[label] = {"prepare_cpu_s": statistics.median(cpu), "directions_kept": int(d.final.eigvals.size),
                      "median_test_r": float(np.median(rs[label])),
                      "max_abs_r_vs_reference_at_same_alphas": float(off.max())}
    loss = rs["default"] - rs["gram only (before)"]
    out["r lost by the gram-only path"] = {"max": float(loss.max()), "median": float(np.median(loss))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--p", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--noise", type=float, default=0.3, help="noise sd (the signal's variance is 1)")
    ap.add_argument("--wide-only", action="store_true", help="skip the BOLD5000-like spectrum")
    args = ap.parse_args()
    splits = ridge.make_splits(args.n, n_folds=7, seed=0)
    report = {}
    with threadpool_limits(args.threads):
        spectra = (("wide (1..1e-8)", 8.0),) + (() if args.wide_only else (("BOLD5000-like (1..1e-2)", 2.0),))
        for name, decades in spectra:
            X, Y = features(args.n, args.p, decades, seed=1, noise=args.noise)
            for dtype in (np.float32, np.float64):
                report[f"{name}, {np.dtype(dtype).name}"] = measure(X, Y, splits, args.repeats, dtype)
                print(json.dumps({f"{name}, {np.dtype(dtype).name}": report[f"{name}, {np.dtype(dtype).name}"]}),
                      flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
