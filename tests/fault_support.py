"""Helpers for tests/test_fault_tolerance.py: a small simulated study, configs for it, reading
its results and progress markers, a `neurotask` driver process the tests can SIGKILL, and a
journaling wrapper of ``neurotask.pipeline.stages.fit.fit_unit`` that records every execution of a unit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import yaml

from neurotask.pipeline.stages.fit import Unit
from neurotask.pipeline.stages.fit import fit_unit as _real_fit_unit
from neurotask.storage import RESULT_VARS, Progress, StudyStore

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ["CSI1", "CSI2"]
TASKS = ["edge2d", "rgb2sfnorm", "class_1000", "autoencoder"]

# A small study: 300 images, ~630 brain voxels per subject in chunks of 100 -> 7 chunks per
# (subject, task), 56 fit units for 2 subjects x 4 tasks; a unit takes a fraction of a second.
SIMULATE = {"seed": 11, "n_images": 300, "n_repeated": 20, "n_sessions": 2, "n_features": 48,
            "volume_shape": [12, 12, 10]}
DATA = {"chunk_size": 100}
FIT = {"n_alphas": 20, "n_folds": 3}
LOCAL = {"kind": "local", "n_workers": 2, "dashboard_address": "127.0.0.1:0"}


def write_config(path: Path, workdir: Path, *, subjects=SUBJECTS, tasks=TASKS,
                 cluster: dict | None = None, simulate: bool = False, fit: dict | None = None) -> Path:
    """A study config at ``path`` for the study in ``workdir``."""
    raw: dict[str, Any] = {
        "study": {"name": "fault", "workdir": str(workdir), "subjects": list(subjects),
                  "tasks": list(tasks)},
        "data": dict(DATA),
        "fit": {**FIT, **(fit or {})},
        "cluster": dict(cluster or LOCAL),
    }
    if simulate:
        raw["simulate"] = dict(SIMULATE)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def prepare_study(root: Path) -> Path:
    """Simulate and ingest the study (both subjects, all four tasks) under root/study."""
    from neurotask.pipeline.cli import main

    workdir = root / "study"
    cfg = write_config(root / "prepare.yaml", workdir, simulate=True)
    for command in ("simulate", "ingest"):
        assert main([command, "--config", str(cfg)]) == 0
    return workdir


def copy_study(prepared: Path, dest: Path) -> Path:
    """A copy of an ingested, unfitted study (same store id: the markers stay meaningful)."""
    shutil.copytree(prepared, dest, ignore=shutil.ignore_patterns("staging"))
    return dest


def fit_reference(prepared: Path, root: Path, client) -> dict[str, Any]:
    """Results of an undisturbed in-process fit of a copy of the prepared study on ``client``
    (a LocalCluster), the reference every other fit is compared with bit for bit."""
    from neurotask.pipeline.config import load_config
    from neurotask.pipeline.stages.fit import fit

    workdir = copy_study(prepared, root / "study")
    report = fit(load_config(write_config(root / "reference.yaml", workdir)), client)
    total = sum(chunk_count(workdir, s) for s in SUBJECTS) * len(TASKS)
    assert (report.computed, report.failed) == (total, []), report
    return results(workdir)


def chunk_count(workdir: Path, subject: str) -> int:
    resp = StudyStore(workdir / "store.zarr").responses(subject)
    return -(-resp.sizes["voxel"] // int(resp.attrs["chunk_size"]))


def results(workdir: Path, subjects=SUBJECTS, tasks=TASKS) -> dict[str, Any]:
    """subject -> Dataset (task, voxel) of every result variable, tasks in the given order."""
    store = StudyStore(workdir / "store.zarr")
    return {s: store.results(s).sel(task=list(tasks))[list(RESULT_VARS)] for s in subjects}


def assert_same_results(got: dict, want: dict, tasks=TASKS) -> None:
    """Bit-identical results (NaN where the reference has NaN) for every subject and task."""
    for subject, ds in got.items():
        ref = want[subject].sel(task=list(tasks))
        for name in RESULT_VARS:
            a, b = ds[name].values, ref[name].values
            assert a.shape == b.shape, (subject, name)
            same = (a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else a == b
            assert same.all(), (f"{subject} {name}: {int((~same).sum())} value(s) differ from the "
                                f"reference, first at (task, voxel) {np.argwhere(~same)[0].tolist()}")


def markers(workdir: Path) -> dict[tuple[str, str, int], dict]:
    """Every valid fit marker: (subject, task, chunk) -> its record."""
    store = StudyStore(workdir / "store.zarr")
    progress = Progress(workdir / "progress", store.store_id)
    out = {}
    for path in (workdir / "progress" / "fit").glob("*/*/[0-9]*.json"):
        subject, task, chunk = path.parent.parent.name, path.parent.name, path.stem
        record = progress.read("fit", subject, task, chunk)
        if record is not None:
            out[(subject, task, int(chunk))] = record
    return out


def marker_count(workdir: Path) -> int:
    return sum(1 for _ in (workdir / "progress" / "fit").glob("*/*/[0-9]*.json"))


def check_marker_records(workdir: Path, found: dict, jobs: set | None) -> None:
    """Each marker names this store, its chunk's voxel count and the SLURM job that wrote it
    (one of ``jobs``; None outside SLURM)."""
    for (subject, task, chunk), record in found.items():
        resp = StudyStore(workdir / "store.zarr").responses(subject)
        size = int(resp.attrs["chunk_size"])
        expected = min(size, resp.sizes["voxel"] - chunk * size)
        assert record["voxels"] == expected, (subject, task, chunk, record)
        if jobs is None:
            assert record["slurm_job"] is None, record
        else:
            assert record["slurm_job"] in jobs, (record, jobs)


# ------------------------------------------------------------------ a driver process to kill

def neurotask_env(extra: dict | None = None) -> dict[str, str]:
    """This process's environment as a user's shell has it: no PYTHONPATH (the installed
    neurotask is found by itself), no injected fault; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NEUROTASK_FAULT_UNIT")}
    env.update(extra or {})
    return env


def neurotask_command() -> list[str]:
    """The installed `neurotask` console script of this environment."""
    script = Path(sys.executable).parent / "neurotask"
    found = str(script) if script.is_file() else shutil.which("neurotask")
    assert found, f"no installed `neurotask` command beside {sys.executable} or on PATH"
    return [found]


def start_neurotask(args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None,
                    command: list[str] | None = None) -> subprocess.Popen:
    """`neurotask ARGS` in a new session (its own process group), output to ``log``, started as
    a user starts it: the installed command (or ``command``), from ``cwd`` (default: the log's
    folder), which must lie outside the checkout."""
    cwd = Path(cwd or log.parent).resolve()
    assert cwd != REPO and REPO not in cwd.parents, f"{cwd} is inside the checkout {REPO}"
    out = open(log, "w")
    try:
        return subprocess.Popen([*(command or neurotask_command()), *args], cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, env=env or neurotask_env(),
                                start_new_session=True)
    finally:
        out.close()


def wait_for_count(count: Callable[[], int], k: int, proc: subprocess.Popen, log: Path,
                   timeout: float = 120.0) -> int:
    """Poll until ``count()`` reaches k; fail if the driver exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while (n := count()) < k:
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) after {n} markers:\n"
                                 + log.read_text()[-3000:])
        if time.monotonic() > deadline:
            raise AssertionError(f"only {n} of {k} markers after {timeout} s:\n" + log.read_text()[-3000:])
        time.sleep(0.02)
    return n


def wait_for_markers(workdir: Path, k: int, proc: subprocess.Popen, log: Path,
                     timeout: float = 120.0) -> int:
    """Poll until at least k fit markers exist; fail if the driver exits first."""
    return wait_for_count(lambda: marker_count(workdir), k, proc, log, timeout)


def kill_after_markers(args: list[str], marker_dir: Path, k: int, log: Path, timeout: float = 240.0) -> int:
    """Run `neurotask ARGS`, SIGKILL its process group once ``marker_dir`` holds k markers
    (any depth); returns how many there were when the kill was sent."""
    proc = start_neurotask(args, log)
    try:
        return wait_for_count(lambda: sum(1 for _ in marker_dir.rglob("*.json")), k, proc, log, timeout)
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL the process group we started (driver and its local workers); wait until every
    member is gone and return them."""
    try:
        members = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        members = []
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(members, timeout=30)
    assert not alive, f"processes {alive} outlived the SIGKILL of their group"
    return members


def set_env(name: str, value: str | None) -> None:
    """Set (or with None, remove) an environment variable; run on workers by client.run
    (LocalCluster workers here: see the note on the journal below)."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


# ------------------------------------------------------------------ a journal of unit executions
# Run by the workers: LocalCluster workers import this module by name (a spawned worker gets the
# test process's sys.path, tests/ included); SLURM workers, which start as users' do, only once
# it is shipped to them (slurm_support.ship_to_workers).

GATE_EVENT = "neurotask-test-gate"


def journaled_fit_unit(journal_dir: str, gate_pair: tuple[str, str] | None, *args, **kwargs) -> dict:
    """``neurotask.pipeline.stages.fit.fit_unit(*args, **kwargs)`` with a record of each execution in
    journal_dir/<unit>.log: "begin JOB" before, "end JOB wrote|skipped" after (wrote: this
    execution wrote the unit's marker). Units of ``gate_pair`` first wait for the distributed
    Event GATE_EVENT, so the test decides when the end of the fit may run. Only fit_unit's
    Unit and StudyStore arguments are relied on (found by type, wherever they are)."""
    unit = next(a for a in [*args, *kwargs.values()] if isinstance(a, Unit))
    progress = next(a for a in [*args, *kwargs.values()] if isinstance(a, StudyStore)).progress()
    job = os.environ.get("SLURM_JOB_ID", "local")
    journal = Path(journal_dir) / f"{unit.subject}_{unit.task}_{unit.chunk:05d}.log"
    _append(journal, f"begin {job} {time.time():.3f}")
    if gate_pair is not None and (unit.subject, unit.task) == tuple(gate_pair):
        from distributed import Event

        Event(GATE_EVENT).wait(timeout=180)
    before = progress.read(*unit.marker)
    out = _real_fit_unit(*args, **kwargs)
    wrote = progress.read(*unit.marker) != before
    _append(journal, f"end {job} {'wrote' if wrote else 'skipped'} {time.time():.3f}")
    return out


def _append(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def read_journal(journal_dir: Path) -> dict[tuple[str, str, int], list[list[str]]]:
    """(subject, task, chunk) -> its journal lines, split into words."""
    out = {}
    for path in journal_dir.glob("*.log"):
        parts = path.stem.split("_")
        subject, chunk = parts[0], int(parts[-1])
        task = "_".join(parts[1:-1])
        out[(subject, task, chunk)] = [line.split() for line in path.read_text().splitlines()]
    return out
