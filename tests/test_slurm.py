"""cluster.slurm against a real single-node SLURM (scripts/slurm start): option checking before
any job exists, Dask work in SLURM jobs over TLS, refusal of clients without the certificate,
replacement of a scancel'd worker job by adaptive scaling, bounded retries of a failing task,
no worker job outliving a SIGKILLed driver, and the dashboard on localhost.

The first tests need no SLURM; the others skip only when `sinfo` is missing or no node is up.
Every cluster is closed by a finalizer that also checks no job of the test is left in squeue.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import dask
import dask.array as da
import psutil
import pytest
from distributed import Client, Event
from distributed.security import Security

from neurotask.cluster.slurm import (ClusterConfigError, connect_client, start_slurm_cluster,
                           validate_section, worker_job_ids)
import slurm_support
from conftest import collect_logs
from slurm_support import (fail_and_count, job_id_here, ship_to_workers, slurm_skip_reason,
                           small_section, square_after_replacement, squeue_ids, squeue_state,
                           unique_job_name, wait_until_gone)


# ---------------------------------------------------------------- checks needing no SLURM

@pytest.mark.parametrize("slurm, named", [
    ({"cores": 1, "memory": "2GB", "walltim": "00:10:00"}, ["cluster.slurm.walltim", "'walltime'"]),
    ({"cores": 1, "memory": "2GB", "security": True}, ["cluster.slurm.security", "cluster.tls"]),
    ({"cores": 1, "memory": "2GB", "env_extra": ["module load x"]},
     ["cluster.slurm.env_extra", "'job_script_prologue'"]),
    ({"cores": 1, "memory": "2GB", "job_extra_directives": "--exclusive"},
     ["cluster.slurm.job_extra_directives", "list of strings"]),
    ({"cores": "two", "memory": "2GB"}, ["cluster.slurm.cores", "positive integer"]),
    ({"cores": 1, "memory": "lots"}, ["cluster.slurm.memory"]),
])
def test_bad_slurm_options_are_named(slurm, named):
    with pytest.raises(ClusterConfigError) as err:
        validate_section({"kind": "slurm", "slurm": slurm})
    for text in named:
        assert text in str(err.value)


@pytest.mark.parametrize("section, named", [
    ({"kind": "slurm", "maximum_job": 3}, "cluster.maximum_job "),
    ({"kind": "slurm", "tls": "yes"}, "cluster.tls"),
    ({"kind": "slurm", "minimum_jobs": 3, "maximum_jobs": 2}, "cluster.maximum_jobs"),
    ({"kind": "slurm", "interface": "lo", "slurm": {"interface": "ib0"}}, "cluster.interface"),
    ({"kind": "slurm", "slurm": ["cores", 1]}, "cluster.slurm"),
])
def test_bad_section_keys_are_named(section, named):
    with pytest.raises(ClusterConfigError, match=named.replace(".", r"\.")):
        validate_section(section)


def test_section_defaults():
    s = validate_section({"kind": "slurm", "slurm": {"queue": "short"}})
    assert (s["tls"], s["minimum_jobs"], s["maximum_jobs"]) == (True, 1, 4)
    assert s["dashboard_address"] == "127.0.0.1:0"
    assert s["slurm"] == {"queue": "short"}


# ---------------------------------------------------------------- against the local SLURM

@pytest.fixture(scope="module")
def slurm_node():
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)


def _close(cluster, client, job_name):
    """Close the client and cluster; no job of this test may outlive it."""
    if client is not None:
        client.close()
    cluster.close()
    left = wait_until_gone(job_name, timeout=30)
    if left:  # a leak: clean up, then fail
        subprocess.run(["scancel", "-n", job_name], check=False)
        pytest.fail(f"SLURM jobs {left} of {job_name} outlived their cluster")


@pytest.fixture(scope="module")
def tls_cluster(slurm_node, tmp_path_factory):
    """One TLS cluster on loopback, 1 to 2 single-core jobs, shared by the tests below."""
    job_name = unique_job_name()
    section = small_section(tmp_path_factory.mktemp("tls-cluster"), job_name)
    t0 = time.monotonic()
    with collect_logs() as logs:  # the job log's messages, for the whole module
        cluster, security = start_slurm_cluster(section)
        client = None
        try:
            client = connect_client(cluster, security)
            ship_to_workers(client, slurm_support)  # job_id_here, fail_and_count
            client.wait_for_workers(1, timeout=90)
            print(f"\n[slurm] first worker connected {time.monotonic() - t0:.1f} s after start")
            yield cluster, security, client, logs, job_name
        finally:
            _close(cluster, client, job_name)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.slurm
def test_unknown_option_fails_before_any_job(slurm_node, tmp_path):
    job_name = unique_job_name()
    section = small_section(tmp_path, job_name, minimum_jobs=2,
                            slurm={"walltim": "00:05:00"})
    with pytest.raises(ClusterConfigError, match="cluster.slurm.walltim: unknown option .did you mean 'walltime'"):
        start_slurm_cluster(section)
    time.sleep(1.5)  # longer than an adaptive interval: a started cluster would have submitted
    assert squeue_ids(job_name) == []


@pytest.mark.slow
@pytest.mark.slurm
def test_option_refused_by_slurm_fails_before_any_job(slurm_node, tmp_path):
    job_name = unique_job_name()
    section = small_section(tmp_path, job_name, minimum_jobs=2,
                            slurm={"queue": "no-such-partition"})
    with pytest.raises(ClusterConfigError) as err:
        start_slurm_cluster(section)
    message = str(err.value)
    assert "queue='no-such-partition'" in message and "partition" in message
    time.sleep(1.5)
    assert squeue_ids(job_name) == []


@pytest.mark.slow
@pytest.mark.slurm
def test_missing_network_interface_is_named(slurm_node, tmp_path):
    section = small_section(tmp_path, unique_job_name(), interface="no-such-nic0")
    with pytest.raises(ClusterConfigError, match="cluster.interface.*'no-such-nic0'"):
        start_slurm_cluster(section)


@pytest.mark.slow
@pytest.mark.slurm
def test_dask_jobqueue_config_supplies_options_not_given(slurm_node, tmp_path):
    job_name = unique_job_name()
    section = small_section(tmp_path, job_name, minimum_jobs=0)
    for key in ("cores", "memory", "walltime"):
        del section["slurm"][key]
    with dask.config.set({"jobqueue.slurm.cores": 1, "jobqueue.slurm.memory": "1GiB",
                          "jobqueue.slurm.walltime": "00:07:00"}):
        cluster, _ = start_slurm_cluster(section)
        try:
            script = cluster.job_script()
        finally:
            _close(cluster, None, job_name)
    assert "#SBATCH --cpus-per-task=1\n" in script
    assert "#SBATCH --mem=1G\n" in script
    assert "#SBATCH -t 00:07:00\n" in script
    # Neither the section nor Dask's config gives cores: dask-jobqueue's error, as ours.
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        with pytest.raises(ClusterConfigError, match="cores"):
            start_slurm_cluster(section)


@pytest.mark.slow
@pytest.mark.slurm
def test_computation_runs_in_slurm_jobs_over_tls(tls_cluster):
    cluster, security, client, logs, job_name = tls_cluster
    assert security is not None and security.require_encryption
    assert cluster.scheduler_address.startswith("tls://127.0.0.1:")

    x = da.arange(20_000, chunks=1_000, dtype="int64")
    assert int((x * x).sum().compute()) == sum(i * i for i in range(20_000))

    # Each worker reports the SLURM job it runs in; the cluster and the log name the same job.
    here = client.run(job_id_here)
    assert here and all(addr.startswith("tls://127.0.0.1:") for addr in here)
    ids = worker_job_ids(cluster)
    names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
    running = squeue_ids(job_name)
    for addr, job_id in here.items():
        assert ids[names[addr]] == job_id
        assert job_id in running
        assert f"SLURM job {job_id} submitted for Dask worker {names[addr]}" in logs
        _wait_for(lambda: any(f"connected from SLURM job {job_id} ({addr})" in m for m in logs),
                  5, f"the log line of job {job_id} connecting")
    assert any(m.startswith("Dask dashboard: http://127.0.0.1:") for m in logs)


@pytest.mark.slow
@pytest.mark.slurm
def test_client_without_the_certificate_cannot_connect(tls_cluster):
    cluster, security, client, logs, job_name = tls_cluster
    address = cluster.scheduler_address
    # Plain TCP to the TLS port: the handshake never happens.
    with pytest.raises((OSError, TimeoutError)):
        Client(address.replace("tls://", "tcp://"), timeout="3s")
    # TLS with another (self-signed) certificate: the scheduler does not trust it.
    with pytest.raises(OSError, match="certificate"):
        Client(address, security=Security.temporary(), timeout="3s")
    # The same call with the cluster's certificate works, so the refusals are about the cert.
    with Client(address, security=security, timeout="10s") as ok:
        assert ok.submit(sum, [1, 2, 3]).result(timeout=30) == 6


def _listening_ips(port: int) -> set[str]:
    me = psutil.Process()
    return {c.laddr.ip for c in me.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


@pytest.mark.slow
@pytest.mark.slurm
def test_dashboard_binds_to_localhost_only(tls_cluster):
    cluster, *_ = tls_cluster
    link = cluster.dashboard_link
    assert link.startswith("http://127.0.0.1:")
    port = int(link.split(":")[2].split("/")[0])
    assert _listening_ips(port) == {"127.0.0.1"}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as page:
        assert page.status == 200
    # From this machine's other addresses the port is closed.
    others = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")}
    for ip in others:
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=3).close()


@pytest.mark.slow
@pytest.mark.slurm
def test_scancelled_worker_job_is_replaced_and_computation_completes(slurm_node, tmp_path, logs):
    job_name = unique_job_name()
    section = small_section(tmp_path, job_name, minimum_jobs=2, maximum_jobs=2)
    # Dask gives a lost worker up after lost-worker-timeout (15 s by default), then adaptive
    # scaling submits its replacement; shortened here to keep the test quick.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "2s"}):
        cluster, security = start_slurm_cluster(section)
        client = None
        try:
            client = connect_client(cluster, security)
            ship_to_workers(client, slurm_support)  # to the replacement too
            futures = client.map(square_after_replacement, range(40))
            client.wait_for_workers(2, timeout=90)
            _wait_for(lambda: sum(f.done() for f in futures) >= 4, 60, "the first results")
            original = set(worker_job_ids(cluster).values())
            assert len(original) == 2
            victim = sorted(original, key=int)[0]

            t_kill = time.monotonic()
            subprocess.run(["scancel", victim], check=True)

            def replacement() -> set[str]:
                ids = worker_job_ids(cluster)
                names = [w["name"] for w in client.scheduler_info()["workers"].values()]
                return {ids[n] for n in names if n in ids} - original

            _wait_for(lambda: bool(replacement()), 90, "a replacement worker job")
            new = replacement()
            print(f"\n[slurm] replacement worker (job {sorted(new)}) connected "
                  f"{time.monotonic() - t_kill:.1f} s after scancel {victim}")
            assert squeue_state(victim) in ("", "COMPLETING")
            assert not any(f.done() for f in futures[20:])  # the computation is still going
            Event("replacement-connected", client=client).set()

            results = client.gather(futures)
            assert [r[0] for r in results] == [x * x for x in range(40)]
            # The replacement did part of the remaining work; the killed job none of it.
            assert {r[1] for r in results[20:]} & new
            assert victim not in {r[1] for r in results[20:]}
            assert any(f"(SLURM job {victim}) left the cluster" in m for m in logs)
        finally:
            _close(cluster, client, job_name)


@pytest.mark.slow
@pytest.mark.slurm
def test_failing_chunk_is_retried_a_bounded_number_of_times(tls_cluster, tmp_path):
    cluster, security, client, logs, job_name = tls_cluster
    attempts = tmp_path / "attempts.txt"
    future = client.submit(fail_and_count, str(attempts), key="chunk-7", retries=2, pure=False)
    with pytest.raises(RuntimeError, match="this chunk always fails"):
        future.result(timeout=60)
    assert future.key == "chunk-7"  # the name a caller reports
    lines = attempts.read_text().split()
    assert len(lines) == 3  # the first try and 2 retries, then no more
    assert set(lines) <= set(squeue_ids(job_name))


@pytest.mark.slow
@pytest.mark.slurm
def test_killed_driver_leaves_no_worker_jobs_behind(slurm_node, tmp_path):
    """SIGKILL of the process running the scheduler: its workers lose the scheduler, close,
    and their SLURM jobs end by themselves (nothing keeps holding the allocation)."""
    job_name = unique_job_name()
    section = small_section(tmp_path, job_name, minimum_jobs=1, maximum_jobs=1)
    # As a user's script runs: the installed neurotask only, started outside the checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    driver = subprocess.Popen([sys.executable, slurm_support.__file__, json.dumps(section)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, cwd=tmp_path, start_new_session=True)
    try:
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(driver.stdout), daemon=True)
        reader.start()
        _wait_for(lambda: any(line.startswith("READY") for line in output)
                  or driver.poll() is not None, 120, "the driver's READY line")
        ready = [line for line in output if line.startswith("READY")]
        assert ready, "".join(output)
        job_ids = ready[0].split()[1:]
        assert job_ids and set(job_ids) <= set(squeue_ids(job_name))

        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        t_kill = time.monotonic()
        left = wait_until_gone(job_name, timeout=90)
        assert left == [], f"worker jobs {left} still in the queue 90 s after the driver died"
        print(f"\n[slurm] worker jobs ended {time.monotonic() - t_kill:.1f} s after the "
              "driver's SIGKILL")
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        subprocess.run(["scancel", "-n", job_name], check=False)
