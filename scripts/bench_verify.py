#!/usr/bin/env python
"""The cost of verified chunks: sealing (fsync + crc32 + marker) per fit unit, and `verify`
over a whole subject's results.

Builds ``results/S1`` of ``--voxels`` voxels x ``--tasks`` tasks in chunks of ``--chunk`` voxels
(random values, so chunks compress as little as real results), the fit, finalize and ceiling
variables with the dtypes of ``storage.schema``; seals every fit unit, finalize pair and the
ceiling as the fit does, then times ``verify_store`` (``--repeats`` times; the page cache is warm after
the first).

    python scripts/bench_verify.py DIR --voxels 55000 --tasks 21
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import zarr

from neurotask.pipeline.stages.verify import CHUNKS, verify_store
from neurotask.storage import Stage, StudyStore, chunk_key
from neurotask.storage.checksums import seal_region

FIT_VARS = {"r": "f4", "r2": "f4", "alpha": "f8", "pvalue": "f8", "pvalue_perm": "f8"}
FINAL_VARS = {"qvalue": "f8", "significant": "bool", "qvalue_perm": "f8", "significant_perm": "bool"}
CEILING_VARS = ("ncsnr", "noise_ceiling_r", "noise_ceiling_r2")  # (voxel,) float64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path, help="an empty directory for the store and its markers")
    ap.add_argument("--voxels", type=int, default=55000)
    ap.add_argument("--tasks", type=int, default=21)
    ap.add_argument("--chunk", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    store = StudyStore(a.workdir / "store.zarr")
    store.create()
    group = zarr.open_group(str(store.path), mode="a", zarr_format=3).require_group("results/S1")
    rng = np.random.default_rng(0)
    for name, dtype in {**FIT_VARS, **FINAL_VARS}.items():
        arr = group.create_array(name, shape=(a.tasks, a.voxels), chunks=(1, a.chunk), dtype=dtype,
                                 fill_value=False if dtype == "bool" else np.nan)
        arr[:] = rng.random((a.tasks, a.voxels)) > 0.5 if dtype == "bool" else rng.random((a.tasks, a.voxels))
    for name in CEILING_VARS:
        group.create_array(name, shape=(a.voxels,), chunks=(a.chunk,), dtype="f8", fill_value=np.nan)[:] = \
            rng.random(a.voxels)
    progress, tasks = store.progress(), [f"t{i}" for i in range(a.tasks)]
    n_chunks = -(-a.voxels // a.chunk)

    t0 = time.perf_counter()
    progress.mark_done(Stage.CEILING, "S1",
                       info={CHUNKS: seal_region(store.path, "results/S1", CEILING_VARS, (slice(None),))})
    for ti, task in enumerate(tasks):
        for k in range(n_chunks):
            records = seal_region(store.path, "results/S1", list(FIT_VARS),
                                  (slice(ti, ti + 1), slice(k * a.chunk, (k + 1) * a.chunk)))
            progress.mark_done(Stage.FIT, "S1", task, chunk_key(k), info={CHUNKS: records})
        records = seal_region(store.path, "results/S1", list(FINAL_VARS), (slice(ti, ti + 1), slice(None)))
        progress.mark_done(Stage.FINALIZE, "S1", task, info={CHUNKS: records})
    seal = time.perf_counter() - t0
    units = a.tasks * n_chunks
    print(f"seal: {seal:.2f} s for {units} fit units + {a.tasks} finalize markers "
          f"({seal / (units + a.tasks) * 1e3:.1f} ms per marker, fsync included)")

    size = sum(f.stat().st_size for f in (store.path / "results/S1").rglob("*")
               if f.is_file() and f.name != "zarr.json")
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        report = verify_store(store, ["S1"], tasks)
        dt = time.perf_counter() - t0
        print(f"verify: {report.chunks} chunks, {size / 1e6:.1f} MB, {len(report.damage)} damaged: "
              f"{dt:.2f} s ({dt / report.chunks * 1e6:.0f} us per chunk)")


if __name__ == "__main__":
    main()
