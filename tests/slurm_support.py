"""Helpers for the tests that run Dask workers as jobs of the local SLURM (scripts/slurm)."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import ModuleType

from distributed import Client
from distributed.diagnostics.plugin import UploadFile

_names = itertools.count()


def slurm_skip_reason() -> str | None:
    """Why the SLURM tests cannot run here, or None when the local node is up."""
    if shutil.which("sinfo") is None:
        return "sinfo not on PATH (start the local SLURM with: scripts/slurm start)"
    try:  # a stopped controller makes sinfo retry for ~10 s; don't wait for that
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              timeout=5)
    except subprocess.TimeoutExpired:
        return "no SLURM controller answered sinfo within 5 s"
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(
            s in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no SLURM node up (sinfo: {(proc.stdout + proc.stderr).strip()!r})"
    return None


def unique_job_name() -> str:
    """A SLURM job name no other test (or test run) uses, to find our jobs in squeue."""
    return f"nt-test-{os.getpid()}-{next(_names)}"


def squeue_ids(job_name: str) -> list[str]:
    """Ids of the jobs with this name that SLURM still lists (pending, running, completing)."""
    out = subprocess.run(["squeue", "-h", "-n", job_name, "-o", "%i"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return out.split()


def squeue_state(job_id: str) -> str:
    """SLURM state of one job, '' once it has left the queue."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                         text=True, timeout=30).stdout
    return out.strip()


def wait_until_gone(job_name: str, timeout: float = 30.0) -> list[str]:
    """Wait until SLURM lists no job with this name; return those still listed at timeout."""
    deadline = time.monotonic() + timeout
    while (left := squeue_ids(job_name)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def small_section(tmp_path: Path, job_name: str, **overrides) -> dict:
    """A cluster section for tests: 1-core, 2 GB, short jobs; scheduler and workers on lo."""
    certs = tmp_path / "tls"
    certs.mkdir(mode=0o700, exist_ok=True)
    section = {
        "kind": "slurm",
        "interface": "lo",
        "minimum_jobs": 1,
        "maximum_jobs": 2,
        "slurm": {
            "cores": 1,
            "processes": 1,
            "memory": "2GB",
            "walltime": "00:10:00",
            "job_name": job_name,
            "death_timeout": 30,
            "log_directory": str(tmp_path / "slurm-logs"),
            "shared_temp_directory": str(certs),
        },
    }
    slurm = {**section["slurm"], **overrides.pop("slurm", {})}
    section.update(overrides)
    section["slurm"] = slurm
    return section


def ship_to_workers(client: Client, module: ModuleType) -> None:
    """Make a test module importable on every worker of ``client``, present and future.

    A SLURM worker runs the installed neurotask with no PYTHONPATH (as users run it), so it
    cannot import the test-only task functions of tests/ by module name. Dask's UploadFile
    worker plugin copies the module's file into each worker's local directory (which the worker
    puts first on sys.path) and, being a registered plugin, into each worker that joins later
    (a replacement job). Not cloudpickle.register_pickle_by_value: distributed pickles a
    submitted task as a whole with plain pickle, which ignores that registry (only an object
    defined in the registered module itself, as in ``client.run(f)``, goes by value).
    ``load=False``: nothing imports (or, in this process, reloads) the module until a task
    needs it."""
    client.register_plugin(UploadFile(module.__file__, load=False), name=f"ship-{module.__name__}")


# ------------------------------------------------ task functions run by the SLURM workers
# (shipped to the workers with ship_to_workers)

def job_id_here() -> str:
    """The SLURM job this worker process runs in."""
    return os.environ["SLURM_JOB_ID"]


def square_after_replacement(x: int) -> tuple[int, str]:
    """x*x and the SLURM job that computed it; x >= 20 first waits for the test's signal
    (the distributed Event 'replacement-connected'), so the computation spans a worker's
    replacement."""
    from distributed import Event

    time.sleep(0.2)
    if x >= 20:
        Event("replacement-connected").wait(timeout=120)
    return x * x, os.environ["SLURM_JOB_ID"]


def fail_and_count(attempts_file: str) -> None:
    """Append one line to attempts_file, then fail: a chunk that always raises."""
    with open(attempts_file, "a") as f:
        f.write(f"{os.environ['SLURM_JOB_ID']}\n")
    raise RuntimeError("this chunk always fails")


# ------------------------------------------------ a driver process the tests can SIGKILL

def _drive(section_json: str) -> None:
    """Start a SLURM cluster from a JSON section, print READY and the job ids, then idle.
    Run as a script (``python slurm_support.py SECTION``): it needs only the installed
    neurotask, no PYTHONPATH."""
    import json

    from neurotask.cluster.slurm import connect_client, start_slurm_cluster, worker_job_ids

    section = json.loads(section_json)
    cluster, security = start_slurm_cluster(section)
    client = connect_client(cluster, security)
    client.wait_for_workers(section["minimum_jobs"], timeout=90)
    print("READY", " ".join(sorted(set(worker_job_ids(cluster).values()))), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    import sys

    _drive(sys.argv[1])
