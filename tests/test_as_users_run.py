"""The fit as users run it, on fault_support's small study: the installed `neurotask` command,
started by subprocess from a study folder outside the checkout with no PYTHONPATH, its Dask
workers under a memory limit. With a memory limit each worker creates its spill directory
``storage/`` in its local directory, which Dask puts first on the worker's sys.path: that empty
folder once shadowed our top-level ``storage`` package and every SLURM worker died on import.

- a LocalCluster with ``memory_limit`` (the spill directories are seen while the fit runs);
- the same from a folder holding a ``pipeline.py``, a ``storage/`` and a ``cluster/`` of the
  user's own that raise when imported, through the console script and ``python -m neurotask``
  (which puts the folder first on the driver's and its local workers' sys.path);
- on the local SLURM (skipped without it), from such a folder: the worker jobs start in the
  folder they were submitted from, and ``python -m distributed.cli.dask_worker`` puts it first
  on their sys.path.

Each fit bit-identical to the in-process local fit.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import fault_support as fs
from neurotask.cluster import open_client
from slurm_support import slurm_skip_reason, small_section, unique_job_name, wait_until_gone

pytestmark = pytest.mark.slow

_NO_SLURM = slurm_skip_reason()  # decided at collection, so a skip builds no study first

# The user's own modules with our former top-level names; importing any of them is an error.
SHADOWS = {name: f'raise RuntimeError("the user\'s own {name} was imported")\n'
           for name in ("pipeline.py", "storage/__init__.py", "cluster/__init__.py")}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The simulated, ingested study; tests fit copies of it."""
    return fs.prepare_study(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> dict:
    with open_client(dict(fs.LOCAL)) as client:
        return fs.fit_reference(prepared, tmp_path_factory.mktemp("reference"), client)


@pytest.fixture
def study(prepared, tmp_path) -> Path:
    return fs.copy_study(prepared, tmp_path / "study")


def user_folder(root: Path, shadowed: bool) -> Path:
    """The folder a user runs `neurotask` from, outside the checkout; ``shadowed``: with the
    user's own pipeline.py, storage/ and cluster/, checked to be what ``import NAME`` finds there."""
    folder = root / "my-study"
    folder.mkdir()
    if shadowed:
        for name, text in SHADOWS.items():
            (folder / name).parent.mkdir(exist_ok=True)
            (folder / name).write_text(text)
        for name in ("pipeline", "storage", "cluster"):
            proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=folder,
                                  env=fs.neurotask_env(), capture_output=True, text=True, timeout=60)
            assert f"the user's own {name}" in proc.stderr, proc.stderr
    return folder


def spill_dirs(root: Path) -> list[Path]:
    """Dask's spill directories (``<worker local directory>/storage``) under root."""
    return [p for p in root.rglob("storage") if p.is_dir() and p.parent.name.startswith("worker-")]


def fit_as_user(study: Path, folder: Path, cluster: dict, *, spill_root: Path, n_spill: int,
                env: dict | None = None, command: list[str] | None = None,
                timeout: float = 300) -> str:
    """`neurotask fit --config study.yaml` run in ``folder``; waits until ``n_spill`` workers'
    spill directories exist under ``spill_root`` while it runs, then for exit status 0.
    Returns the driver's output."""
    fs.write_config(folder / "study.yaml", study, cluster=cluster)
    log = folder.parent / "fit.log"
    proc = fs.start_neurotask(["fit", "--config", "study.yaml"], log, env=env or fs.neurotask_env(),
                              cwd=folder, command=command)
    try:
        fs.wait_for_count(lambda: len(spill_dirs(spill_root)), n_spill, proc, log, timeout)
        status = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            fs.kill_group(proc)
    output = log.read_text()
    assert status == 0, f"`neurotask fit` exited with {status}:\n{output[-3000:]}"
    return output


def local_section(memory_limit: str = "2GiB") -> dict:
    return {**fs.LOCAL, "memory_limit": memory_limit}


# ------------------------------------------------------------------ LocalCluster


def test_fit_from_a_folder_outside_the_checkout_with_spilling_workers(study, reference, tmp_path):
    scratch = tmp_path / "dask-scratch"  # the workers' local directories (temporary-directory)
    fit_as_user(study, user_folder(tmp_path, shadowed=False), local_section(), spill_root=scratch,
                n_spill=fs.LOCAL["n_workers"], env=fs.neurotask_env({"DASK_TEMPORARY_DIRECTORY": str(scratch)}))
    fs.assert_same_results(fs.results(study), reference)
    fs.check_marker_records(study, fs.markers(study), None)


@pytest.mark.parametrize("launcher", ["console script", "python -m neurotask"])
def test_fit_from_a_folder_with_its_own_pipeline_and_storage(launcher, study, reference, tmp_path):
    scratch = tmp_path / "dask-scratch"
    command = None if launcher == "console script" else [sys.executable, "-m", "neurotask"]
    fit_as_user(study, user_folder(tmp_path, shadowed=True), local_section(), spill_root=scratch,
                n_spill=fs.LOCAL["n_workers"], command=command,
                env=fs.neurotask_env({"DASK_TEMPORARY_DIRECTORY": str(scratch)}))
    fs.assert_same_results(fs.results(study), reference)
    fs.check_marker_records(study, fs.markers(study), None)


# ------------------------------------------------------------------ SLURM


@pytest.mark.slurm
@pytest.mark.skipif(_NO_SLURM is not None, reason=str(_NO_SLURM))
def test_fit_on_slurm_from_a_folder_with_its_own_pipeline_and_storage(study, reference, tmp_path):
    job_name = unique_job_name()
    scratch = tmp_path / "worker-scratch"
    # 2GB per job: dask-jobqueue gives each worker that memory limit, so each spills.
    section = small_section(tmp_path, job_name, minimum_jobs=2, maximum_jobs=2,
                            slurm={"memory": "2GB", "local_directory": str(scratch)})
    try:
        try:
            output = fit_as_user(study, user_folder(tmp_path, shadowed=True), section,
                                 spill_root=scratch, n_spill=1)
        except AssertionError as failure:  # what the worker jobs said, to see why
            logs = "".join(p.read_text() for p in sorted((tmp_path / "slurm-logs").glob("*.err")))
            raise AssertionError(f"{failure}\nworker job logs (last 3000 characters):\n{logs[-3000:]}") from None
    finally:
        left = wait_until_gone(job_name, timeout=60)
        if left:  # a leak: clean up, then fail below
            subprocess.run(["scancel", "-n", job_name], check=False)
    assert not left, f"SLURM jobs {left} of {job_name} outlived their driver"
    fs.assert_same_results(fs.results(study), reference)
    jobs = set(re.findall(r"SLURM job (\d+) submitted for Dask worker", output))
    assert jobs, output
    fs.check_marker_records(study, fs.markers(study), jobs)  # the worker jobs did the fit


# ------------------------------------------------------------------ the whole run, status, the API


def test_run_status_and_the_python_api_as_a_user_runs_them(study, tmp_path):
    """`neurotask run` from a folder outside the checkout: one cluster, so one dashboard link;
    then `neurotask status` (every stage done) and `neurotask.open_study` from that folder."""
    folder = user_folder(tmp_path, shadowed=False)
    fs.write_config(folder / "study.yaml", study)
    log = folder.parent / "run.log"
    proc = fs.start_neurotask(["run", "--config", "study.yaml"], log, cwd=folder)
    try:
        status = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            fs.kill_group(proc)
    output = log.read_text()
    assert status == 0, output[-3000:]
    assert len(re.findall(r"^Dask dashboard: http://127\.0\.0\.1:\d+/status$", output, re.M)) == 1, output
    assert "Traceback" not in output

    done = subprocess.run([*fs.neurotask_command(), "status", "--config", "study.yaml"], cwd=folder,
                          env=fs.neurotask_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "driver: none" in text and "analysis: done" in text and "report: done" in text
    pairs = [line.split() for line in text.splitlines() if line.startswith("  ") and line.split()[0] in fs.TASKS]
    assert len(pairs) == len(fs.SUBJECTS) * len(fs.TASKS) and all(p[1] == "done" for p in pairs)
    assert all("significant" in " ".join(p) for p in pairs)

    code = ("import neurotask; s = neurotask.open_study('study.yaml'); r = s.results('CSI1'); "
            "print(s.subjects, dict(r.sizes), sorted(s.analysis().attrs)[:1])")
    api = subprocess.run([sys.executable, "-c", code], cwd=folder, env=fs.neurotask_env(),
                         capture_output=True, text=True, timeout=120)
    assert api.returncode == 0, api.stderr
    assert api.stdout.startswith("['CSI1', 'CSI2'] {'task': 4, 'voxel': ")
