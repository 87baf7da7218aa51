#!/usr/bin/env python
"""One (subject, task) at full scale through the fit stage against the ridge engine alone.

The same data both ways: BOLD5000 shape (4916 images, 2048 features, ``--voxels`` voxels, the
paper's 100 alphas, 7 folds), built by ``bench_ridge.make_problem`` and written into a study
store (features/<task>, responses/<subject> in chunks of ``--chunk`` voxels).

- ``engine``: in this process, with as many BLAS threads as the cluster has cores in all,
  from arrays already in memory: ``fit.decompose_design`` (z-scoring, ``ridge.prepare``), then
  ``fit.fit_voxels`` for each chunk (the arithmetic a fit task does, and no more);
- ``fit``: ``pipeline.stages.fit.fit`` (what ``neurotask fit`` runs) on a LocalCluster of
  ``--workers`` x ``--threads-per-worker``: the decomposition task, one task per chunk reading
  its chunk from Zarr and writing its results region and progress marker, the FDR pass.

The difference is the cost of Dask and Zarr (target <= 15%). The cluster's start is timed
apart (once per session, not per fit). Peak RSS of each worker process is reported.
Repeats are interleaved (engine, fit, engine, fit, ...) and medians quoted.

    python scripts/bench_fit.py --voxels 55000 --repeats 3 --out fit.json
    python scripts/bench_fit.py --voxels 55000 --backend torch --device cuda --workers 1 --chunk 5000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_ridge's problem generator

from bench_ridge import _device_name, make_problem  # noqa: E402
from neurotask.pipeline import ridge  # noqa: E402
from neurotask.storage import ChunkPlan  # noqa: E402

TASK, SUBJECT = "rgb2depth", "CSI1"


def build_study(workdir: Path, args) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write the synthetic study; returns (config path, X (n, p) float32, Y (n, v) float32)."""
    from neurotask.pipeline.config import load_config
    from neurotask.storage import StudyStore

    X, Y = make_problem(args.n, args.p, args.voxels, seed=args.seed)
    cfg_dict = {
        "study": {"name": "benchfit", "workdir": str(workdir), "subjects": [SUBJECT], "tasks": [TASK]},
        "data": {"chunk_size": args.chunk},
        "fit": {"n_permutations": args.n_permutations, "search": args.search, "backend": args.backend,
                "device": args.device},
        "cluster": {"kind": "local", "n_workers": args.workers, "threads_per_worker": args.threads_per_worker,
                    "dashboard_address": "127.0.0.1:0"},
    }
    path = workdir / "benchfit.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    cfg = load_config(path)
    store = StudyStore(cfg.store_path)
    store.create()
    images = [f"img{i:05d}.jpg" for i in range(args.n)]
    store.write_features(TASK, X, images)
    v = args.voxels
    ijk = np.stack([np.arange(v) % 100, (np.arange(v) // 100) % 100, np.arange(v) // 10000], axis=1)
    store.init_responses(SUBJECT, images, ijk, ["other"] * v, args.chunk, {"voxel_space": "volume"})
    for voxels in ChunkPlan(v, args.chunk):
        store.write_responses(SUBJECT, voxels, Y[:, voxels])
    return path, X, Y


def run_engine(cfg, X: np.ndarray, Y: np.ndarray) -> dict:
    """The fit's arithmetic alone, in this process (BLAS threads set by the caller): the same
    decomposition and engine options as ``neurotask fit``, no store, no Dask. Also returns the
    first chunk's alphas and test r, to check the stored results against."""
    from neurotask.pipeline.stages.fit import alpha_grid, decompose_design, fit_voxels

    spec = cfg.fit
    t0, c0 = time.perf_counter(), time.process_time()
    dec = decompose_design(spec, X)
    alphas = alpha_grid(spec, X.shape[1])
    prep = time.perf_counter() - t0
    first = None
    for voxels in ChunkPlan(Y.shape[1], cfg.data.chunk_size):
        values = fit_voxels(spec, dec, Y[:, voxels], alphas)
        if first is None:
            first = {"alpha": values["alpha"], "r": values["r"]}
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "prepare_seconds": prep,
            "first_chunk": first}


def _worker_usage() -> dict:
    return {"cpu": time.process_time(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _warm_up(device: str | None) -> None:
    """CUDA context, cuBLAS handle and kernels loaded before timing (once per process)."""
    if device and device.startswith("cuda"):
        import torch

        a = torch.ones((256, 256), device=device)
        float((a @ a).sum())


def run_fit(cfg, client) -> dict:
    from neurotask.pipeline.stages.fit import fit

    before = client.run(_worker_usage)
    t0, c0 = time.perf_counter(), time.process_time()
    report = fit(cfg, client, overwrite=True)
    seconds = time.perf_counter() - t0
    after = client.run(_worker_usage)
    worker_cpu = sum(after[w]["cpu"] - before[w]["cpu"] for w in after)
    if report.failed or report.computed == 0:
        raise RuntimeError(f"fit did not complete: {report}")
    return {"seconds": seconds, "cpu_seconds": time.process_time() - c0 + worker_cpu,
            "worker_peak_rss_mb": sorted(a["peak_rss_mb"] for a in after.values()), "units": report.computed}


def check_results(cfg, first_chunk: dict) -> dict:
    """The stored alphas and test r of the first chunk against the engine's."""
    from neurotask.storage import StudyStore

    store = StudyStore(cfg.store_path)
    n = first_chunk["alpha"].size
    stored_alpha = store.read_result(SUBJECT, "alpha", 0)[:n]
    stored_r = store.read_result(SUBJECT, "r", 0)[:n]
    return {"same_alpha": float(np.mean(stored_alpha == first_chunk["alpha"])),
            "max_abs_dr": float(np.nanmax(np.abs(stored_r - first_chunk["r"])))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voxels", type=int, default=55000)
    ap.add_argument("--n", type=int, default=4916)
    ap.add_argument("--p", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=1000, help="data.chunk_size: voxels per fit task")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--backend", choices=("numpy", "torch"), default="numpy")
    ap.add_argument("--device", default=None)
    ap.add_argument("--search", choices=ridge.SEARCHES, default="certified")
    ap.add_argument("--n-permutations", type=int, default=0,
                    help="fit.n_permutations (0: the ridge fit alone; the test adds ~3%% when on)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the study here (default: a temporary directory)")
    ap.add_argument("--out", help="write every number as JSON here")
    args = ap.parse_args()

    from threadpoolctl import threadpool_limits

    from neurotask.cluster import open_client
    from neurotask.pipeline.config import load_config

    cores = args.workers * args.threads_per_worker
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        workdir = Path(args.workdir or tmp)
        t0 = time.perf_counter()
        path, X, Y = build_study(workdir, args)
        cfg = load_config(path)
        print(f"[fit-bench] study of {args.voxels} voxels x {args.n} images x {args.p} features written in "
              f"{time.perf_counter() - t0:.0f} s; chunks of {args.chunk}; {args.workers} worker(s) x "
              f"{args.threads_per_worker} thread(s); engine alone with {cores} BLAS thread(s)", flush=True)
        runs: dict[str, list[dict]] = {"engine": [], "fit": []}
        t0 = time.perf_counter()
        with open_client(cfg.cluster) as client:
            start_s = time.perf_counter() - t0
            _warm_up(args.device)
            client.run(_warm_up, args.device)
            for i in range(args.repeats):
                order = ("engine", "fit") if i % 2 == 0 else ("fit", "engine")
                for name in order:
                    if name == "engine":
                        with threadpool_limits(cores):
                            r = run_engine(cfg, X, Y)
                    else:
                        r = run_fit(cfg, client)
                    runs[name].append(r)
                    print(f"[fit-bench] round {i + 1}: {name} {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
        agreement = check_results(cfg, runs["engine"][0].pop("first_chunk"))
        for r in runs["engine"][1:]:
            r.pop("first_chunk")

    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(r["cpu_seconds"] for r in v) for k, v in runs.items()}
    rss = max(max(r["worker_peak_rss_mb"]) for r in runs["fit"])
    out = {
        "voxels": args.voxels, "chunk": args.chunk, "workers": args.workers,
        "threads_per_worker": args.threads_per_worker, "backend": args.backend, "device": args.device or "cpu",
        "device_name": _device_name(args.device), "search": args.search, "n_permutations": args.n_permutations, "repeats": args.repeats,
        "cluster_start_seconds": start_s, "seconds": med, "cpu_seconds": med_cpu,
        "overhead_wall": med["fit"] / med["engine"] - 1, "overhead_cpu": med_cpu["fit"] / med_cpu["engine"] - 1,
        "worker_peak_rss_mb": rss, "engine_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "agreement_first_chunk": agreement, "runs": runs, "load": os.getloadavg(),
    }
    print(f"\none (subject, task), {args.voxels} voxels, paper grid, 7 folds, {args.search} search, "
          f"{args.backend} on {args.device or 'cpu'} ({out['device_name']}); medians of {args.repeats}")
    print(f"  engine alone   {med['engine']:8.1f} s wall  {med_cpu['engine']:8.1f} s CPU")
    print(f"  neurotask fit  {med['fit']:8.1f} s wall  {med_cpu['fit']:8.1f} s CPU   "
          f"(cluster start {start_s:.1f} s, once per session, not included)")
    print(f"  Dask + Zarr overhead: wall {100 * out['overhead_wall']:+.1f}%, CPU {100 * out['overhead_cpu']:+.1f}% "
          f"(target <= +15%)")
    print(f"  peak RSS per worker {rss:.0f} MB; stored results vs engine on the first chunk: same alpha "
          f"{agreement['same_alpha']:.2%}, max |dr| {agreement['max_abs_dr']:.1e}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
