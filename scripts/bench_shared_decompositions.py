#!/usr/bin/env python
"""What sharing decompositions across subjects saves in a fitted study (issue 18).

Subjects who saw the same images share one decomposition per task (``fit.design_rows``). On a
study that has been ingested (and fitted or not), this times, in this process with one BLAS
thread, one (subject, task)'s decomposition (``fit.build_decomposition``) and its voxels
(``fit.fit_voxels`` on every voxel, with the configured permutations), CPU seconds, median over
``--tasks`` x ``--repeats``, and prints the share of the fit that sharing saves for the
subjects that share a design:

    python scripts/bench_shared_decompositions.py --config runs/demo_copy/demo.yaml
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import statistics  # noqa: E402
import time  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--tasks", nargs="+", default=["keypoint3d", "class_places", "edge2d"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from neurotask.pipeline.config import load_config
    from neurotask.pipeline.stages import fit
    from neurotask.storage import StudyStore

    cfg = load_config(args.config)
    store = StudyStore(cfg.store_path)
    subjects = cfg.study.subjects
    keys = {s: fit.design_rows(cfg.fit, store, s).key for s in subjects}
    subject = subjects[0]
    sharing = [s for s in subjects if keys[s] == keys[subject]]
    rows = fit.design_rows(cfg.fit, store, subject)
    Y = store.responses(subject)["responses"].values
    Y = Y if rows.order is None else Y[rows.order]
    dec_s, vox_s = [], []
    for task in args.tasks:
        alphas = fit.alpha_grid(cfg.fit, store.feature_count(task))
        for _ in range(args.repeats):
            t = time.process_time()
            dec = fit.build_decomposition(cfg.fit, store, subject, task)
            dec_s.append(time.process_time() - t)
            t = time.process_time()
            fit.fit_voxels(cfg.fit, dec, Y, alphas)
            vox_s.append(time.process_time() - t)
    d, v, k = statistics.median(dec_s), statistics.median(vox_s), len(sharing)
    print(f"{subject}: {Y.shape[0]} images x {Y.shape[1]} voxels; per (subject, task): decomposition "
          f"{d:.3f} CPU s, voxels {v:.3f} CPU s (medians of {len(dec_s)})")
    print(f"{k} subject(s) share {subject}'s design ({', '.join(sharing)}): per task {k * (d + v):.3f} CPU s "
          f"unshared, {d + k * v:.3f} shared; sharing saves {(k - 1) * d / (k * (d + v)):.1%} of their fit")


if __name__ == "__main__":
    main()
