"""What is done, running, missing and stale in a study's store, stage by stage: simulate,
featurize, ingest (or imported results), fit, analysis and report.

Read from markers and metadata only (progress markers, the ``zarr.json`` of groups and arrays,
the driver's lock file and the fit run file), never from the results arrays, so ``neurotask
status`` answers at once on a study of any size and never waits on a running driver.

*Done* comes from the progress markers: a worker writes a fit unit's marker after that unit's
results region is in the store, so a marker is proof of a finished chunk.

*Running* comes from the fit run file ``<workdir>/progress/fit-run.json``. The fit driver
(``pipeline.stages.fit.fit``) keeps it current through ``FitRunState`` (rewritten every second): the
units in flight in that run, split into those the Dask scheduler has handed to a worker
("running") and those submitted but still waiting ("queued"). The file names the driver's
host and pid; when ``status`` runs on that host it checks that the process still exists, so
a run that was killed shows as interrupted and its unfinished units as missing. From another
host the liveness cannot be checked and the age of the last update is shown instead.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from neurotask.pipeline.config import Config
from neurotask.storage import ChunkPlan, Progress, Stage, responses_group, results_group, write_json_atomic
from neurotask.storage.lock import LOCK_NAME, lock_holder
from neurotask.storage.schema import PROGRESS_DIR, analysis_group, features_group

RUN_FILE = "fit-run.json"


# --------------------------------------------------------------------------- driver side


class FitRunState:
    """The fit driver's record of its units in flight, for ``neurotask status``.

    ``client`` is the driver's ``distributed.Client``. A daemon thread rewrites the run file
    every ``interval`` seconds (a heartbeat: ``updated`` tells a reader on another host how
    fresh it is), asking the scheduler which keys are processing on workers; it stops at
    ``close`` or when the client is closed. Writes are atomic (``storage.atomic``).
    """

    def __init__(self, progress: Progress, client: Any, *, interval: float = 1.0):
        self.path = progress.directory / RUN_FILE
        self.client = client
        self.interval = interval
        self.units: dict[str, tuple[str, str, int]] = {}  # Dask key -> (subject, task, chunk)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.record: dict[str, Any] = {
            "store_id": progress.store_id, "state": "running", "host": socket.gethostname(),
            "pid": os.getpid(), "pid_started": psutil.Process().create_time(),
            "started": time.time(), "dashboard": getattr(client, "dashboard_link", None),
        }
        self.save()
        self._thread = threading.Thread(target=self._beat, name="neurotask-fit-run-state", daemon=True)
        self._thread.start()

    def add(self, key: str, subject: str, task: str, chunk: int) -> None:
        with self._lock:
            self.units[key] = (subject, task, chunk)

    def done(self, key: str) -> None:
        with self._lock:
            self.units.pop(key, None)

    def close(self, failed: bool = False) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self.record["state"] = "failed" if failed else "finished"
            self.units.clear()
        self.save()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if getattr(self.client, "status", "running") in ("closing", "closed"):
                return
            self.save()

    def save(self) -> None:
        with self._lock:
            units = dict(self.units)
            record = dict(self.record)
        processing: set[str] = set()
        if units:
            try:
                processing = {str(k) for keys in self.client.processing().values() for k in keys}
            except Exception:  # a scheduler that does not answer: report everything as queued
                processing = set()
        in_flight: dict[str, dict[str, dict[str, list[int]]]] = {}
        for key, (subject, task, chunk) in sorted(units.items(), key=lambda kv: kv[1]):
            where = "running" if key in processing else "queued"
            entry = in_flight.setdefault(subject, {}).setdefault(task, {"running": [], "queued": []})
            entry[where].append(chunk)
        write_json_atomic(self.path, {**record, "updated": time.time(), "in_flight": in_flight})


# --------------------------------------------------------------------------- reading side


@dataclass
class FitRun:
    """The last fit run recorded in a study's progress directory."""

    state: str  # "running", "interrupted", "finished" or "failed"
    host: str
    pid: int
    started: float
    updated: float
    dashboard: str | None
    in_flight: dict[str, dict[str, dict[str, list[int]]]]  # subject -> task -> running/queued chunks
    checkable: bool  # whether this host could check that the driver process exists

    def chunks(self, subject: str, task: str, which: str) -> set[int]:
        if self.state != "running":
            return set()
        return set(self.in_flight.get(subject, {}).get(task, {}).get(which, []))


def _driver_alive(record: dict[str, Any]) -> bool:
    try:
        proc = psutil.Process(int(record["pid"]))
        # A recycled pid belongs to a process started after ours.
        return abs(proc.create_time() - float(record.get("pid_started", 0))) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError, TypeError):
        return False


def read_fit_run(progress: Progress) -> FitRun | None:
    """The run file as a FitRun, None when absent, unreadable or about another store."""
    try:
        record = json.loads((progress.directory / RUN_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("store_id") != progress.store_id:
        return None
    state = str(record.get("state", "running"))
    checkable = record.get("host") == socket.gethostname()
    if state == "running" and checkable and not _driver_alive(record):
        state = "interrupted"
    return FitRun(state=state, host=str(record.get("host")), pid=int(record.get("pid", -1)),
                  started=float(record.get("started", 0)), updated=float(record.get("updated", 0)),
                  dashboard=record.get("dashboard"), in_flight=record.get("in_flight") or {},
                  checkable=checkable)


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _run_line(run: FitRun) -> str:
    where = f"pid {run.pid} on {run.host}, started {_clock(run.started)}"
    age = f"last update {max(0.0, time.time() - run.updated):.0f} s ago"
    if run.state == "running":
        check = "" if run.checkable else " (on another host: cannot check it still runs)"
        dash = f"; dashboard {run.dashboard}" if run.dashboard else ""
        return f"fit run: running ({where}, {age}){check}{dash}"
    if run.state == "interrupted":
        return (f"fit run: interrupted ({where}: that process no longer exists); its unfinished "
                "units are missing, run `neurotask fit` again to do only those")
    return f"fit run: {run.state} ({where}, ended {_clock(run.updated)})"


# --------------------------------------------------------------------------- metadata only

ANALYSIS = analysis_group("task_structure")  # the group the analysis stage writes


def _node(store_path: Path, path: str) -> dict[str, Any] | None:
    """The ``zarr.json`` of a group or array (``path`` relative to the store), None if absent."""
    try:
        return json.loads((store_path / path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None


def _attrs(store_path: Path, group: str) -> dict[str, Any]:
    node = _node(store_path, group)
    return dict(node.get("attributes") or {}) if node else {}


def _shape(store_path: Path, array: str) -> list[int] | None:
    node = _node(store_path, array)
    return list(node["shape"]) if node and "shape" in node else None


def _members(store_path: Path, parent: str) -> list[str]:
    d = store_path / parent
    return sorted(p.name for p in d.iterdir() if (p / "zarr.json").is_file()) if d.is_dir() else []


def driver_command(workdir: Path) -> tuple[str | None, str | None]:
    """(who holds the workdir's driver lock, in words; the command it runs), both None when no
    live driver holds it. Reads the lock file only (``storage.lock.lock_holder``)."""
    holder = lock_holder(workdir)
    if holder is None:
        return None, None
    try:
        command = json.loads((Path(workdir) / LOCK_NAME).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        command = None
    return holder, command if isinstance(command, str) else None


def _running(command: str | None, *stages: str) -> bool:
    """Whether the driver's command (``neurotask <stage> --config ...``) runs one of ``stages``
    (``run`` runs them all)."""
    words = (command or "").split()
    return len(words) > 1 and words[1] in ("run", *stages)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


# --------------------------------------------------------------------------- the stages


def _simulate_lines(cfg: Config, progress: Progress, command: str | None) -> list[str]:
    if cfg.simulate is None:
        return ["simulate: not configured (no simulate: section)"]
    sim = cfg.simulate
    parts = ["settings", *(["images"] if sim.write_images else []), *(["weights"] if sim.write_weights else []),
             *cfg.study.subjects]
    done = [p for p in parts if progress.is_done(Stage.SIMULATE, p)]
    if len(done) == len(parts):
        return [f"simulate: done ({len(cfg.study.subjects)} subject(s))"]
    state = "running" if _running(command, "simulate") else "missing"
    return [f"simulate: {state} ({len(done)}/{len(parts)} parts written: {', '.join(done) or 'none'})"]


def _featurize_lines(cfg: Config, store_path: Path, progress: Progress, command: str | None) -> list[str]:
    """The configured feature spaces: done, running (batches done) or incomplete."""
    spaces = _members(store_path, "features")
    configured = list(cfg.features.space_names) if cfg.features is not None else []
    if not configured:
        if not spaces:
            return ["featurize: not configured (no features: section)"]
        return [f"featurize: not configured ({len(spaces)} feature space(s) in the store, written by "
                "simulate or an earlier featurize)"]
    running = _running(command, "featurize")
    # --overwrite computes beside the stored features and swaps them in at the end: the stored
    # ones look done meanwhile, yet are being redone
    redoing = running and "--overwrite" in (command or "").split()
    lines = []
    done = [sp for sp in configured if progress.is_done(Stage.FEATURIZED, sp)]
    for space in configured:
        if space in done:
            if redoing:
                lines.append(f"  featurize {space}: being recomputed (running: `{command}`); the stored "
                             "features stay until the new ones are complete")
            continue
        attrs = _attrs(store_path, features_group(space))
        shape = _shape(store_path, f"{features_group(space)}/features")
        n_done = len(progress.done_units(Stage.FEATURIZE, space))
        if shape and "batch_size" in attrs:
            of = f"{n_done}/{ChunkPlan(shape[0], int(attrs['batch_size'])).n_chunks} batches done"
        else:
            of = f"{n_done} batches done"
        if running:
            lines.append(f"  featurize {space}: {of} (running: `{command}`)")
        elif space in spaces or n_done:
            lines.append(f"  featurize {space}: {of} (incomplete: fit refuses it; rerun `neurotask featurize` to finish)")
        else:
            lines.append(f"  featurize {space}: missing (run `neurotask featurize`)")
    head = f"featurize: {len(done)}/{len(configured)} feature space(s) done"
    return [head + (" (running)" if running and (lines or redoing) else "")] + lines


def _pair_state(done: int, running: int, queued: int, waiting: int, missing: int, n_units: int,
                finalized: dict[str, Any] | None, run_active: bool) -> str:
    if done == n_units:
        if finalized is not None:
            n = finalized.get("significant")  # recorded since issue 16
            what = f"{n} significant voxels" if n is not None else "FDR q-values computed"
            return f"{'done':<8} {done}/{n_units} chunks, {what}"
        # q-values need every chunk's p; the driver computes them once all units are done.
        when = "at the end of the run" if run_active else "by a rerun of `neurotask fit`"
        return f"{'done':<8} {done}/{n_units} chunks, FDR q-values not computed yet ({when})"
    state = "running" if running or queued or waiting else ("missing" if done == 0 else "partial")
    parts = [f"{done}/{n_units} chunks done"]
    parts += [f"{n} {what}" for n, what in ((running, "running"), (queued, "queued"),
                                             (waiting, "waiting to be submitted by this run"),
                                             (missing, "missing")) if n]
    return f"{state:<8} " + ", ".join(parts)


def _subject_lines(cfg: Config, store_path: Path, progress: Progress, subject: str, run: FitRun | None,
                   command: str | None) -> list[str]:
    imported = progress.read(Stage.IMPORT, subject)
    if imported is not None and (store_path / results_group(subject) / "zarr.json").is_file():
        tasks = imported.get("tasks") or []
        line = (f"{subject}: imported results (source {imported.get('source', '?')}), "
                f"{len(tasks)} task(s) x {imported.get('voxels', '?')} voxels")
        significant = imported.get("significant") or {}
        lines = [line]
        if significant:  # recorded by imports since issue 16
            for task in [t for t in cfg.tasks if t in significant]:
                lines.append(f"  {task:<17} {'imported':<8} {significant[task]} significant voxels")
        missing = [t for t in cfg.tasks if t not in tasks]
        if missing:
            lines.append(f"  not in the imported results: {', '.join(missing)}")
        return lines
    resp = _attrs(store_path, responses_group(subject))
    shape = _shape(store_path, f"{responses_group(subject)}/responses")
    if not (progress.is_done(Stage.INGEST, subject) and shape and "chunk_size" in resp):
        state = "running" if _running(command, "ingest") else "not ingested"
        return [f"{subject}: {state} (no responses yet: run `neurotask ingest`, or `neurotask import-published`)"]
    chunks = ChunkPlan(shape[1], int(resp["chunk_size"]))
    n_units = chunks.n_chunks
    lines = [f"{subject}: {shape[0]} images x {shape[1]} voxels ({n_units} chunks)"]
    active = run is not None and run.state == "running"
    fitting = active or _running(command, "fit")
    for task in cfg.tasks:
        done = {int(n) for n in progress.done_units(Stage.FIT, subject, task) & chunks.keys()}
        running = run.chunks(subject, task, "running") - done if run else set()
        queued = run.chunks(subject, task, "queued") - done - running if run else set()
        rest = n_units - len(done) - len(running) - len(queued)
        # A running fit submits a few pairs at a time: the others wait in its queue, not missing.
        waiting, missing = (rest, 0) if fitting else (0, rest)
        finalized = progress.read(Stage.FINALIZE, subject, task)
        lines.append(f"  {task:<17} " + _pair_state(len(done), len(running), len(queued), waiting, missing,
                                                   n_units, finalized, fitting))
    return lines


def _newest_marker(progress: Progress, *stages: Stage) -> float:
    newest = 0.0
    for stage in stages:
        d = progress.directory / stage
        if d.is_dir():
            for p in d.rglob("*.json"):
                newest = max(newest, _mtime(p) or 0.0)
    return newest


def _analysis_line(cfg: Config, store_path: Path, progress: Progress, command: str | None) -> tuple[str, float | None]:
    """The analysis: done, stale (results newer than it), running or missing; and when it was written."""
    if len(cfg.tasks) < 2:
        return "analysis: not applicable (one task: no task similarity)", None
    written = _mtime(store_path / ANALYSIS / "zarr.json")
    if _running(command, "analyse"):
        return "analysis: running", written
    if written is None:
        return "analysis: missing (run `neurotask analyse`)", None
    results_changed = _newest_marker(progress, Stage.FINALIZE, Stage.IMPORT)
    if results_changed > written:
        return (f"analysis: stale (written {_clock(written)}; results changed since: rerun `neurotask analyse`)",
                written)
    return f"analysis: done (written {_clock(written)}, {store_path / ANALYSIS})", written


def _report_line(cfg: Config, analysis_written: float | None, command: str | None) -> str:
    index = cfg.workdir / "report" / "index.html"
    written = _mtime(index)
    if written is None:
        state = "running" if _running(command, "report") else "missing (run `neurotask report`)"
        return f"report: {state}"
    if analysis_written is not None and analysis_written > written:
        return f"report: stale (written {_clock(written)}, before the analysis: rerun `neurotask report`)"
    return f"report: done ({index}, written {_clock(written)})"


def status_lines(cfg: Config) -> list[str]:
    """Every stage of the study, from markers and metadata only: the driver holding the lock
    (and its command), simulate, featurize, ingest or imported results, fit per (subject, task)
    (chunks done, running, queued, waiting, missing), analysis and report (done, stale, missing)."""
    store_path = Path(cfg.store_path)
    holder, command = driver_command(cfg.workdir)
    lines = [f"driver: {holder}" if holder else "driver: none (no neurotask command holds this workdir)"]
    root = _attrs(store_path, "")
    if "store_id" not in root:
        return lines + [f"{store_path}: no store yet (nothing done)"]
    progress = Progress(store_path.parent / PROGRESS_DIR, str(root["store_id"]))
    lines.append(f"store: {store_path}")
    lines += _simulate_lines(cfg, progress, command)
    lines += _featurize_lines(cfg, store_path, progress, command)
    run = read_fit_run(progress)
    if run is not None:
        lines.append(_run_line(run))
    lines.append("ingest / fit, per subject and task:")
    for subject in cfg.study.subjects:
        lines += _subject_lines(cfg, store_path, progress, subject, run, command)
    analysis, written = _analysis_line(cfg, store_path, progress, command)
    lines.append(analysis)
    lines.append(_report_line(cfg, written, command))
    return lines
