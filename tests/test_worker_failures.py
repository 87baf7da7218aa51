"""Worker failures explained (issue 15): the SLURM worker log parser, KilledWorker in words,
DataError not retried, and a run whose workers all die stopping early with one message."""

import shutil
import sys
import time
from functools import partial
from pathlib import Path

import cloudpickle
import dask
import pytest
from distributed.scheduler import KilledWorker

from conftest import small_config_dict, write_config
from neurotask.cluster import open_client
from neurotask.cluster.watch import (ReturnFailures, TaskFailure, describe_failure, first_error_line,
                                     job_err_log, log_error, removal_cause)
from neurotask.pipeline import cli
from neurotask.pipeline.config import load_config
from neurotask.pipeline.errors import DataError, FitError
from neurotask.pipeline.stages import fit

SAMPLE = Path(__file__).parent / "data" / "slurm-worker-sample.err"
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # worker processes cannot import tests/


# --------------------------------------------------------------------------- pure functions


def test_first_error_line_of_a_worker_log():
    assert first_error_line(SAMPLE.read_text()) == \
        "ssl.SSLError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed (_ssl.c:1006)"
    assert first_error_line("slurmstepd: error: Detected 1 oom_kill event in StepId=7.batch\n") == \
        "slurmstepd: error: Detected 1 oom_kill event in StepId=7.batch"
    assert first_error_line("2026 - distributed.worker - INFO - all fine\n\n") is None
    assert first_error_line("") is None


def test_job_err_log_follows_dask_jobqueue_names(tmp_path):
    assert job_err_log(None, "dask-worker", "7") is None
    assert job_err_log(tmp_path, None, "7") == tmp_path / "worker-7.err"
    shutil.copy(SAMPLE, tmp_path / "dask-worker-4242.err")
    path = job_err_log(tmp_path, "dask-worker", "4242")
    assert log_error(path) == f"{path}: ssl.SSLError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify " \
                              "failed (_ssl.c:1006)"
    assert log_error(tmp_path / "absent.err") is None


def test_killed_worker_is_named_and_explained():
    text = describe_failure(KilledWorker("fit-x", "tcp://127.0.0.1:1", 3))
    assert text.startswith("KilledWorker: the workers running it died 4 times")
    assert describe_failure(RuntimeError("boom")) == "RuntimeError('boom')"
    assert "connection to the scheduler closed" in removal_cause({"stimulus_id": "handle-worker-cleanup-17.5"})


class _FakeJob:
    def __init__(self, directory):
        self.job_id, self.job_name, self.log_directory = "4242", "dask-worker", str(directory)


class _FakeSlurmCluster:
    """What WorkerWatch reads of a SLURMCluster: its jobs by spec name."""

    job_cls = object

    def __init__(self, directory):
        self.workers, self.worker_spec = {"SLURMCluster-0": _FakeJob(directory)}, {}


class _FakeClient:
    def __init__(self, cluster):
        self.cluster = cluster


def test_slurm_worker_failures_name_the_job_log_and_its_error(tmp_path):
    from neurotask.cluster.watch import WorkerWatch

    shutil.copy(SAMPLE, tmp_path / "dask-worker-4242.err")
    watch = WorkerWatch(_FakeClient(_FakeSlurmCluster(tmp_path)))
    expected = f"SLURM job 4242, {tmp_path / 'dask-worker-4242.err'}: ssl.SSLError: [SSL: CERTIFICATE_VERIFY_FAILED]"
    assert watch.slurm_log("SLURMCluster-0").startswith(expected)
    assert watch.slurm_log("someone-else") is None

    class Worker:
        name, address = "SLURMCluster-0", "tls://10.0.0.7:38811"

    text = watch.explain(KilledWorker("fit-x", Worker(), 3))
    assert text.startswith("KilledWorker: the workers running it died 4 times") and expected in text

    watch._event((0.0, {"action": "remove-worker", "worker": "tls://10.0.0.7:38811", "expected": False,
                        "stimulus_id": "handle-worker-cleanup-1.5", "processing-tasks": ["fit-x"]}))
    assert watch.live == 0 and watch.none_since is not None
    assert "connection to the scheduler closed" in watch.left[0] and "running 1 task(s)" in watch.left[0]


def test_return_failures_returns_data_errors_and_passes_them_on():
    def bad(x):
        raise DataError(f"bad {x}")

    failure = ReturnFailures(bad, (DataError,))(1)
    assert isinstance(failure, TaskFailure) and failure.error == "DataError: bad 1"
    assert ReturnFailures(lambda x: x + 1, (DataError,))(failure) is failure  # upstream failure passed on
    with pytest.raises(ValueError):
        ReturnFailures(lambda: int("x"), (DataError,))()  # anything else is raised: Dask retries it


# --------------------------------------------------------------------------- in a fit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A simulated, ingested (not fitted) one-subject study with two tasks."""
    d = tmp_path_factory.mktemp("tiny")
    path = write_config(d / "study.yaml", small_config_dict(
        d / "work", study={"subjects": ["CSI1"], "tasks": ["edge2d", "class_1000"]},
        simulate={"n_images": 120, "n_repeated": 12, "volume_shape": [8, 8, 8]},
        fit={"retries": 2, "n_permutations": 0},
        cluster={"n_workers": 1}))
    assert cli.main(["simulate", "--config", str(path)]) == 0
    assert cli.main(["ingest", "--config", str(path)]) == 0
    return load_config(path)


def _journaled(journal: str, bad_chunk: int, spec, unit, *args):
    """fit_unit that notes each call, raising DataError for chunk ``bad_chunk`` of edge2d."""
    with open(journal, "a") as f:
        f.write(f"{unit.task}/{unit.chunk}\n")
    if unit.task == "edge2d" and unit.chunk == bad_chunk:
        raise DataError(f"injected bad data in {unit.name}")
    return {"unit": unit.name, "nan_r": 0}


def test_data_error_in_a_unit_is_reported_once_not_retried(tiny, tmp_path, monkeypatch, logs):
    journal = tmp_path / "journal"
    journal.touch()
    monkeypatch.setattr(fit, "fit_unit", partial(_journaled, str(journal), 0))
    with open_client({**tiny.cluster, "processes": False}) as client:
        with pytest.raises(FitError) as e:
            fit.fit(tiny, client, overwrite=True)
    calls = journal.read_text().split()
    assert calls.count("edge2d/0") == 1  # retries is 2: a transient error would run 3 times
    message = str(e.value)
    assert message.startswith("1 fit unit(s) failed")
    assert "DataError: injected bad data in CSI1/edge2d/chunk 0" in message and "not retried" in message
    n_units = len(set(calls))
    assert f"fit: {n_units - 1}/{n_units} done, 1 failed" in logs  # the bar counts finished units only


def _die(spec, unit, *args):
    import os

    os._exit(3)  # the worker process dies, as on an out-of-memory kill


def test_workers_dying_at_start_stop_the_run_early(tiny, monkeypatch, logs):
    monkeypatch.setattr(fit, "fit_unit", _die)
    monkeypatch.setattr(fit, "STOP_AFTER_KILLED", 2)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with open_client({**tiny.cluster, "processes": True, "n_workers": 1}) as client:
            with pytest.raises(FitError) as e:
                fit.fit(tiny, client, overwrite=True)
    message = str(e.value)
    assert message.startswith("fit stopped early: 2 units in a row failed with KilledWorker")
    assert "KilledWorker: the workers running it died 1 times" in message
    assert any("left:" in m and "Dask worker" in m for m in logs)  # logged as it happened


def _kill_this_worker():
    import os

    os._exit(1)


def _slow_sum(values):
    import time

    time.sleep(1.5)  # the recomputation lasts long enough for the driver to see the key lost
    return sum(values)


def test_a_result_lost_with_its_worker_is_waited_for_not_failed(tiny):
    """The race CI hit in the scancel drill: as_completed yields a finished unit, then the worker
    holding its result dies before the driver reads it. The future reads "lost" or "pending"
    (not an error, and exception() is None); fit waits for Dask's recomputation instead."""
    from distributed import as_completed

    with open_client({**tiny.cluster, "processes": True, "n_workers": 2}) as client:
        client.wait_for_workers(2)
        f = client.submit(_slow_sum, [1, 2, 3], pure=False)
        ac = as_completed([f])
        f.result()
        holder = next(iter(client.who_has([f])[f.key]))
        try:
            client.run(_kill_this_worker, workers=[holder])
        except Exception:
            pass  # the comm dies with the worker
        deadline = time.monotonic() + 30
        while f.status == "finished" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fit.lost_with_its_worker(f), f.status
        yielded = next(ac)
        assert yielded is f
        if fit.lost_with_its_worker(f):
            ac.add(f)
            yielded = next(ac)
        assert yielded.status == "finished" and yielded.result() == 6
