#!/usr/bin/env python
"""The cost of TLS on a local cluster (cluster.tls: true, the default, against false).

For each setting, interleaved ``--repeats`` times: start a LocalCluster as ``open_client``
does (``neurotask.cluster.local_cluster``: 2 worker processes x 1 thread on 127.0.0.1) and
run a fixed workload:

- ``tasks``: ``--tasks`` tiny tasks (``client.map``), results gathered;
- ``transfers``: ``--transfers`` arrays of ``--mb`` MB, each made on one worker, summed on the
  other (a worker-to-worker transfer) and brought back to the client (a scheduler/client one).

Reported per phase (start, tasks, transfers): wall time and CPU time (this process plus the
workers, from psutil), medians over the repeats, and TLS / plain ratios.

    python scripts/bench_tls.py --repeats 5 --out tls.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import psutil
from distributed import Client

from neurotask.cluster import local_cluster
from neurotask.cluster.options import LocalOptions


def _cpu(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (children included: the nanny's worker)."""
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _make(mb: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(mb * 2**20 // 8)


def _total(x: np.ndarray) -> np.ndarray:
    return x * 1.0  # as big as its input: comes back to the client


def one_run(tls: bool, n_tasks: int, n_transfers: int, mb: int) -> dict[str, dict[str, float]]:
    options = LocalOptions(n_workers=2, tls=tls, dashboard_address=None)
    me = os.getpid()
    out: dict[str, dict[str, float]] = {}
    t0, c0 = time.perf_counter(), _cpu([me])
    with local_cluster(options) as cluster, Client(cluster, security=cluster.security) as client:
        client.wait_for_workers(2)
        worker_pids = list(client.run(os.getpid).values())
        out["start"] = {"wall": time.perf_counter() - t0, "cpu": _cpu([me]) - c0}  # workers' own start: not seen
        a, b = list(client.scheduler_info()["workers"])

        pids = [me, *worker_pids]
        t0, c0 = time.perf_counter(), _cpu(pids)
        futures = client.map(lambda i: i + 1, range(n_tasks), pure=False)
        assert sum(client.gather(futures)) == sum(range(1, n_tasks + 1))
        out["tasks"] = {"wall": time.perf_counter() - t0, "cpu": _cpu(pids) - c0}
        del futures

        t0, c0 = time.perf_counter(), _cpu(pids)
        for k in range(n_transfers):
            x = client.submit(_make, mb, k, workers=[a], pure=False)
            y = client.submit(_total, x, workers=[b], pure=False)
            assert y.result().nbytes == mb * 2**20
            del x, y
        out["transfers"] = {"wall": time.perf_counter() - t0, "cpu": _cpu(pids) - c0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--transfers", type=int, default=5)
    parser.add_argument("--mb", type=int, default=10)
    parser.add_argument("--out", help="write the raw and median numbers here (JSON)")
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {"tls": [], "tcp": []}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
        for name in ("tcp", "tls"):
            runs[name].append(one_run(name == "tls", args.tasks, args.transfers, args.mb))
    medians = {name: {phase: {m: statistics.median(r[phase][m] for r in rs) for m in ("wall", "cpu")}
                      for phase in ("start", "tasks", "transfers")} for name, rs in runs.items()}
    print(f"{'phase':<10} {'metric':<5} {'tcp (s)':>9} {'tls (s)':>9} {'tls/tcp':>8}   "
          f"(medians of {args.repeats}; {args.tasks} tasks, {args.transfers} x {args.mb} MB)")
    for phase in ("start", "tasks", "transfers"):
        for m in ("wall", "cpu"):
            tcp, tls = medians["tcp"][phase][m], medians["tls"][phase][m]
            print(f"{phase:<10} {m:<5} {tcp:9.3f} {tls:9.3f} {tls / tcp if tcp else float('nan'):8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "medians": medians, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
