"""The fit survives what happens on clusters, on a small simulated study (2 subjects x 4 tasks x
7 voxel chunks = 56 units), every result compared bit for bit with an undisturbed local fit:

- the fit through SLURM worker jobs gives the local results (and names its jobs);
- a worker job scancel'd mid-fit is replaced, and every chunk is written exactly once;
- the driver SIGKILLed mid-fit (LocalCluster and SLURM): a rerun computes exactly the units
  without a marker, and the units done before are not touched;
- a chunk that always raises is retried fit.retries times, then the run fails naming it and
  every other chunk stays in the store; a rerun does only that chunk;
- subjects and tasks added to the config: a rerun fits only the new pairs, and
  `neurotask status` shows per subject and task what is done, running and missing.

The SLURM tests need the local SLURM (scripts/slurm start) and skip only when `sinfo` is
missing or no node is up; the others run anywhere.
"""

from __future__ import annotations

import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import dask
import pytest
from distributed import Event

import fault_support as fs
import neurotask.pipeline.stages.fit
from neurotask.cluster import open_client
from neurotask.cluster.slurm import connect_client, start_slurm_cluster, validate_section, worker_job_ids
from neurotask.pipeline.config import load_config
from neurotask.pipeline.errors import FitError
from neurotask.pipeline.stages.fit import fit
from neurotask.pipeline.stages.status import status_lines
from slurm_support import (ship_to_workers, slurm_skip_reason, small_section, squeue_ids,
                           unique_job_name, wait_until_gone)



# Decided once, at collection, so that skipped SLURM tests do not build the study first.
_NO_SLURM = slurm_skip_reason()
needs_slurm = [pytest.mark.slurm, pytest.mark.skipif(_NO_SLURM is not None, reason=str(_NO_SLURM))]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The simulated, ingested study; tests fit copies of it."""
    return fs.prepare_study(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def units_per_pair(prepared) -> int:
    counts = {fs.chunk_count(prepared, s) for s in fs.SUBJECTS}
    assert len(counts) == 1 and counts.pop() >= 5  # several chunks per (subject, task)
    return fs.chunk_count(prepared, fs.SUBJECTS[0])


@pytest.fixture(scope="module")
def local_client():
    """One LocalCluster (2 worker processes) for the in-process fits: workers import the
    pipeline once for the whole module."""
    with open_client(dict(fs.LOCAL)) as client:
        yield client


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory, units_per_pair, local_client) -> dict:
    """Results of an undisturbed fit on a LocalCluster of 2 worker processes."""
    return fs.fit_reference(prepared, tmp_path_factory.mktemp("reference"), local_client)


@pytest.fixture
def study(prepared, tmp_path) -> Path:
    return fs.copy_study(prepared, tmp_path / "study")


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return value


def _pair_line(lines: list[str], subject: str, task: str) -> str:
    """The status line of (subject, task): task lines follow their subject's line."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{subject}: "))
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        if line.split()[0] == task:
            return line
    raise AssertionError(f"no status line for {subject} {task} in:\n" + "\n".join(lines))


def _cancel_jobs(job_name: str) -> None:
    left = wait_until_gone(job_name, timeout=60)
    if left:
        subprocess.run(["scancel", "-n", job_name], check=False)
        pytest.fail(f"SLURM jobs {left} of {job_name} outlived their driver")


# ------------------------------------------------------------------ example configs


@pytest.mark.parametrize("name", ["slurm.yaml", "slurm-local.yaml"])
def test_example_slurm_configs_are_valid(name):
    cfg = load_config(fs.REPO / "configs" / name)
    section = validate_section(cfg.cluster)  # raises naming any option SLURMCluster lacks
    assert section["kind"] == "slurm" and section["tls"] is True
    assert section["slurm"]["cores"] >= 1 and section["slurm"]["walltime"]


def test_docs_show_the_example_cluster_section():
    import yaml

    docs = (fs.REPO / "README.md").read_text()
    block = docs[docs.index("```yaml\ncluster:") + len("```yaml\n"):]
    block = block[:block.index("```")]
    assert yaml.safe_load(block)["cluster"] == load_config(fs.REPO / "configs" / "slurm.yaml").cluster


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.skipif(_NO_SLURM is not None, reason=str(_NO_SLURM))
def test_log_directory_expands_home_and_variables(
        tmp_path, monkeypatch):
    monkeypatch.setenv("NT_TEST_LOG_ROOT", str(tmp_path))
    job_name = unique_job_name()
    section = small_section(tmp_path, job_name, minimum_jobs=0,
                            slurm={"log_directory": "$NT_TEST_LOG_ROOT/worker-logs"})
    cluster, _ = start_slurm_cluster(section)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert f"#SBATCH -e {tmp_path}/worker-logs/{job_name}-%J.err" in script
    assert (tmp_path / "worker-logs").is_dir() and not Path("$NT_TEST_LOG_ROOT").exists()
    assert squeue_ids(job_name) == []


# ------------------------------------------------------------------ growing a study; status


@pytest.mark.slow
def test_added_subject_and_task_fit_only_new_pairs_and_status_shows_them(
        study, reference, units_per_pair, local_client, tmp_path):
    first = load_config(fs.write_config(tmp_path / "first.yaml", study, subjects=["CSI1"],
                                        tasks=["edge2d", "rgb2sfnorm"]))
    report = fit(first, local_client)
    assert (report.computed, report.skipped) == (2 * units_per_pair, 0)
    before = fs.markers(study)

    # One subject and one task more: 6 pairs, 2 of them done.
    grown_tasks = ["edge2d", "rgb2sfnorm", "class_1000"]
    grown = load_config(fs.write_config(tmp_path / "grown.yaml", study, tasks=grown_tasks))
    lines = status_lines(grown)
    assert "fit run: finished" in "\n".join(lines)
    n = units_per_pair
    assert re.search(rf"done +{n}/{n} chunks, \d+ significant voxels", _pair_line(lines, "CSI1", "edge2d"))
    for subject, task in [("CSI1", "class_1000"), ("CSI2", "edge2d"), ("CSI2", "class_1000")]:
        assert re.search(rf"missing +0/{n} chunks done, {n} missing", _pair_line(lines, subject, task))

    # Refit with one new pair held at a gate, to see it as running in `status`.
    gate = ("CSI2", "class_1000")
    journal = tmp_path / "journal"
    journal.mkdir()
    neurotask.pipeline.stages.fit.fit_unit, real = partial(fs.journaled_fit_unit, str(journal), gate), neurotask.pipeline.stages.fit.fit_unit
    try:
        client = local_client
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(fit, grown, client)
            try:
                _wait_for(lambda: any(k[:2] == gate for k in fs.read_journal(journal)), 120,
                          "a unit of the gated pair to start")
                time.sleep(2.5)  # > the run file's heartbeat (1 s)

                lines = status_lines(grown)
                text = "\n".join(lines)
                assert "fit run: running (pid" in text and "dashboard http://127.0.0.1:" in text
                line = _pair_line(lines, *gate)
                m = re.search(rf"running +0/{n} chunks done, (\d+) running(?:, (\d+) queued)?$", line)
                assert m, line
                assert int(m[1]) >= 1 and int(m[1]) + int(m[2] or 0) == n  # all in flight, none missing
                assert re.search(rf"done +{n}/{n} chunks", _pair_line(lines, "CSI1", "edge2d"))
            finally:
                Event(fs.GATE_EVENT, client=client).set()
            report = running.result(timeout=180)
    finally:
        neurotask.pipeline.stages.fit.fit_unit = real

    assert (report.computed, report.skipped) == (4 * n, 2 * n)
    assert fs.marker_count(study) == 6 * n
    after = fs.markers(study)
    assert all(after[k] == record for k, record in before.items())  # done units untouched
    executed = fs.read_journal(journal)
    assert {k[:2] for k in executed} == {(s, t) for s in fs.SUBJECTS for t in grown_tasks} - {
        ("CSI1", "edge2d"), ("CSI1", "rgb2sfnorm")}
    fs.assert_same_results(fs.results(study, tasks=grown_tasks), reference, tasks=grown_tasks)

    lines = status_lines(grown)
    assert "fit run: finished" in "\n".join(lines)
    for subject in fs.SUBJECTS:
        for task in grown_tasks:
            assert re.search(rf"done +{n}/{n} chunks, \d+ significant", _pair_line(lines, subject, task))


# ------------------------------------------------------------------ driver killed mid-fit


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", pytest.param("slurm", marks=needs_slurm)])
def test_killed_driver_rerun_does_only_missing_units(kind, study, reference, units_per_pair, local_client,
                                                     tmp_path):
    """`neurotask fit` SIGKILLed (its process group) after 6 of 56 chunks; the rerun, on the
    module's LocalCluster (resuming depends only on the store), does exactly the rest."""
    total = len(fs.SUBJECTS) * len(fs.TASKS) * units_per_pair
    if kind == "slurm":
        job_name = unique_job_name()
        cluster = small_section(tmp_path, job_name, minimum_jobs=2, maximum_jobs=2)
    else:
        cluster = {"kind": "local", "n_workers": 1, "dashboard_address": "127.0.0.1:0"}
    cfg_path = fs.write_config(tmp_path / "study.yaml", study, cluster=cluster)
    cfg = load_config(cfg_path)
    log = tmp_path / "driver.log"
    driver = fs.start_neurotask(["fit", "--config", str(cfg_path)], log)
    try:
        seen = fs.wait_for_markers(study, 6, driver, log, timeout=180)
        assert "fit run: running (pid" in "\n".join(status_lines(cfg))
        fs.kill_group(driver)
    finally:
        if driver.poll() is None:
            fs.kill_group(driver)
    if kind == "slurm":
        # The workers outlive the driver by a few seconds and may finish the unit they hold.
        _cancel_jobs(job_name)
        assert re.search(r"SLURM job \d+ submitted for Dask worker", log.read_text())

    done_before = fs.markers(study)
    assert seen <= len(done_before) < total, f"the kill did not land mid-fit ({len(done_before)}/{total})"
    lines = status_lines(cfg)
    text = "\n".join(lines)
    pairs = [line.split() for line in lines if line.startswith("  ")]
    assert "fit run: interrupted" in text and not any(p[1] == "running" for p in pairs)
    assert sum(int(p[2].split("/")[0]) for p in pairs) == len(done_before)

    report = fit(cfg, local_client)
    assert report.computed == total - len(done_before)
    assert report.skipped == len(done_before) and not report.failed
    after = fs.markers(study)
    assert len(after) == total
    assert all(after[k] == record for k, record in done_before.items())  # not recomputed
    if kind == "slurm":
        jobs = set(re.findall(r"SLURM job (\d+) submitted", log.read_text()))
        fs.check_marker_records(study, done_before, jobs)
    fs.check_marker_records(study, {k: v for k, v in after.items() if k not in done_before}, None)
    fs.assert_same_results(fs.results(study), reference)
    assert "fit run: finished" in "\n".join(status_lines(cfg))


# ------------------------------------------------------------------ a chunk that always fails


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", pytest.param("slurm", marks=needs_slurm)])
def test_failing_chunk_is_retried_then_named_and_others_kept(kind, study, reference, units_per_pair,
                                                             local_client, tmp_path):
    """NEUROTASK_FAULT_UNIT makes one chunk raise in the workers: on SLURM set by the config's
    job_script_prologue and run through `neurotask fit` (exit status 2, the message on stderr);
    locally set in the module's workers and run through fit() (FitError)."""
    subjects, tasks, bad = ["CSI1"], ["edge2d", "rgb2sfnorm"], ("CSI1", "rgb2sfnorm", 1)
    fault = "/".join(map(str, bad))
    retries = 2
    if kind == "slurm":
        job_name = unique_job_name()
        # Only the worker jobs get the fault, through the job script.
        prologue = [f"export {neurotask.pipeline.stages.fit.FAULT_ENV}={fault}"]
        cluster = small_section(tmp_path, job_name, minimum_jobs=2, maximum_jobs=2,
                                slurm={"job_script_prologue": prologue})
        cfg_path = fs.write_config(tmp_path / "study.yaml", study, subjects=subjects, tasks=tasks,
                                   cluster=cluster, fit={"retries": retries})
        log = tmp_path / "driver.log"
        driver = fs.start_neurotask(["fit", "--config", str(cfg_path)], log)
        try:
            assert driver.wait(timeout=240) == 2
        finally:
            if driver.poll() is None:
                fs.kill_group(driver)
        _cancel_jobs(job_name)
        output = log.read_text()
        message = output.split("neurotask: error: ", 1)[1]
        assert "Traceback" not in message
        # Each attempt is logged by the worker that ran it ("Compute Failed" and the task key).
        worker_logs = "".join(p.read_text() for p in (tmp_path / "slurm-logs").glob("*.err"))
        keys = re.findall(r"Compute Failed\nKey: +(\S+)", worker_logs)
        assert {k.rsplit("-", 1)[0] for k in keys} == {"fit-CSI1-rgb2sfnorm-1"}
        attempts = len(keys)
    else:
        cfg_path = fs.write_config(tmp_path / "study.yaml", study, subjects=subjects, tasks=tasks,
                                   fit={"retries": retries})
        journal = tmp_path / "journal"
        journal.mkdir()
        neurotask.pipeline.stages.fit.fit_unit, real = partial(fs.journaled_fit_unit, str(journal), None), neurotask.pipeline.stages.fit.fit_unit
        local_client.run(fs.set_env, neurotask.pipeline.stages.fit.FAULT_ENV, fault)
        try:
            with pytest.raises(FitError) as err:
                fit(load_config(cfg_path), local_client)
        finally:
            local_client.run(fs.set_env, neurotask.pipeline.stages.fit.FAULT_ENV, None)
            neurotask.pipeline.stages.fit.fit_unit = real
        message = str(err.value)
        attempts = sum(line[0] == "begin" for line in fs.read_journal(journal)[bad])
    assert attempts == retries + 1
    assert message.startswith("1 fit unit(s) failed after 2 retries")
    assert re.search(r"CSI1/rgb2sfnorm/chunk 1 \(voxels 100-199\): RuntimeError\('injected fault", message)

    n = units_per_pair
    found = fs.markers(study)
    assert set(found) == {(s, t, c) for s in subjects for t in tasks for c in range(n)} - {bad}
    lines = status_lines(load_config(cfg_path))
    assert any("fit run: failed" in line for line in lines), lines
    assert re.search(rf"partial +{n - 1}/{n} chunks done, 1 missing", _pair_line(lines, "CSI1", "rgb2sfnorm"))
    # The finished chunks are in the store as the reference has them (q-values wait for the pair).
    got, want = fs.results(study, subjects, tasks)["CSI1"], reference["CSI1"]
    for task in tasks:
        for chunk in range(n):
            if (task, chunk) == bad[1:]:
                continue
            size = fs.DATA["chunk_size"]
            voxels = slice(chunk * size, (chunk + 1) * size)
            for name in ("r", "r2", "alpha", "pvalue"):
                a = got[name].sel(task=task).values[voxels]
                b = want[name].sel(task=task).values[voxels]
                assert ((a == b) | ((a != a) & (b != b))).all(), (task, chunk, name)

    # The cause removed, a rerun does that chunk only.
    rerun = load_config(fs.write_config(tmp_path / "rerun.yaml", study, subjects=subjects, tasks=tasks))
    report = fit(rerun, local_client)
    assert (report.computed, report.skipped) == (1, 2 * n - 1)
    fs.assert_same_results(fs.results(study, subjects, tasks), reference, tasks=tasks)


# ------------------------------------------------------------------ SLURM workers


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.skipif(_NO_SLURM is not None, reason=str(_NO_SLURM))
def test_fit_on_slurm_equals_local_fit(
        study, reference, units_per_pair, tmp_path, logs):
    job_name = unique_job_name()
    section = small_section(tmp_path, job_name, minimum_jobs=2, maximum_jobs=2)
    cfg = load_config(fs.write_config(tmp_path / "study.yaml", study, cluster=section))
    t0 = time.monotonic()
    with open_client(cfg.cluster) as client:
        client.wait_for_workers(2, timeout=120)
        t_ready = time.monotonic()
        report = fit(cfg, client)
        t_fit = time.monotonic()
    print(f"\n[slurm fit] both workers {t_ready - t0:.1f} s after start; fit {t_fit - t_ready:.1f} s; "
          f"fit report {report.seconds:.1f} s")
    _cancel_jobs(job_name)
    assert report.computed == len(fs.SUBJECTS) * len(fs.TASKS) * units_per_pair and not report.failed
    fs.assert_same_results(fs.results(study), reference)
    submitted = set(re.findall(r"SLURM job (\d+) submitted for Dask worker", "\n".join(logs)))
    assert submitted and any("Dask dashboard: http://127.0.0.1:" in m for m in logs)
    found = fs.markers(study)
    fs.check_marker_records(study, found, submitted)  # each chunk names the job that wrote it


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.skipif(_NO_SLURM is not None, reason=str(_NO_SLURM))
def test_scancelled_worker_mid_fit_is_replaced_and_chunks_written_once(
        study, reference, units_per_pair, tmp_path, logs):
    total = len(fs.SUBJECTS) * len(fs.TASKS) * units_per_pair
    job_name = unique_job_name()
    section = small_section(tmp_path, job_name, minimum_jobs=2, maximum_jobs=2)
    cfg = load_config(fs.write_config(tmp_path / "study.yaml", study, cluster=section))
    journal = tmp_path / "journal"
    journal.mkdir()
    gate = (fs.SUBJECTS[-1], fs.TASKS[-1])  # the last pair waits until the replacement is there
    neurotask.pipeline.stages.fit.fit_unit, real = partial(fs.journaled_fit_unit, str(journal), gate), neurotask.pipeline.stages.fit.fit_unit
    # Dask gives a lost worker up after lost-worker-timeout (15 s by default); then adaptive
    # scaling submits its replacement. Shortened to keep the test quick.
    try:
        with dask.config.set({"distributed.deploy.lost-worker-timeout": "2s"}):
            cluster, security = start_slurm_cluster(section)
            try:
                client = connect_client(cluster, security)
                ship_to_workers(client, fs)  # journaled_fit_unit, to the replacement too
                client.wait_for_workers(2, timeout=120)
                with ThreadPoolExecutor(1) as pool:
                    running = pool.submit(fit, cfg, client)
                    try:
                        _wait_for(lambda: fs.marker_count(study) >= 6 or running.done(), 120, "6 markers")
                        assert not running.done()
                        original = set(worker_job_ids(cluster).values())
                        assert len(original) == 2
                        begun = {line[1] for lines in fs.read_journal(journal).values() for line in lines}
                        victim = sorted(original & begun, key=int)[0]
                        t_kill = time.time()
                        subprocess.run(["scancel", victim], check=True)

                        def replacement() -> set[str]:
                            ids = worker_job_ids(cluster)
                            names = [w["name"] for w in client.scheduler_info()["workers"].values()]
                            return {ids[n] for n in names if n in ids} - original

                        new = _wait_for(replacement, 120, "a replacement worker job")
                        print(f"\n[slurm fit] replacement worker (job {sorted(new)}) connected "
                              f"{time.time() - t_kill:.1f} s after scancel {victim}")
                        assert not running.done()  # the gated pair is still to do
                    finally:
                        Event(fs.GATE_EVENT, client=client).set()
                    report = running.result(timeout=240)
                client.close()
            finally:
                cluster.close()
    finally:
        neurotask.pipeline.stages.fit.fit_unit = real
    _cancel_jobs(job_name)

    # A unit whose result died with the cancelled worker is run again by Dask; that run finds
    # the unit's marker and writes nothing (found_done), so every unit is written once.
    assert (report.computed + report.found_done, report.skipped, report.failed) == (total, 0, [])
    fs.assert_same_results(fs.results(study), reference)
    found = fs.markers(study)
    assert len(found) == total
    fs.check_marker_records(study, found, original | new)
    executions = fs.read_journal(journal)
    assert set(executions) == set(found)
    for unit, lines in executions.items():
        # Exactly one execution wrote the chunk, the one its marker names; or (a kill between
        # the marker and the journal line) none that lived to say so, and that was the victim's.
        writes = [line for line in lines if line[0] == "end" and line[2] == "wrote"]
        assert len(writes) <= 1, (unit, lines)
        writer = writes[0][1] if writes else victim
        assert writer == found[unit]["slurm_job"], (unit, lines, found[unit])
    # What the victim was doing: units it began, units it began and never ended (their
    # region write may have been cut: another worker wrote them again), and executions that
    # found the chunk marked already (a result lost with the victim) and wrote nothing.
    began = [u for u, lines in executions.items() if ["begin", victim] in [w[:2] for w in lines]]
    cut = [u for u in began if sum(w[:2] == ["begin", victim] for w in executions[u])
           > sum(w[0] == "end" and w[1] == victim for w in executions[u])]
    skipped = [u for u, lines in executions.items() if any(w[0] == "end" and w[2] == "skipped" for w in lines)]
    assert began, "the cancelled job had not started any unit"
    print(f"[slurm fit] job {victim}: began {len(began)} unit(s); cut short: {cut}; "
          f"re-executions that found the chunk done and wrote nothing: {skipped}; units written "
          f"by the replacement: {sum(r['slurm_job'] in new for r in found.values())}")
    text = "\n".join(logs)
    assert f"(SLURM job {victim}) left the cluster" in text
    assert re.search(rf"connected from SLURM job ({'|'.join(new)}) ", text)
