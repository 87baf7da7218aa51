"""What is done, running and missing in a study's store.

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
from typing import Any

import numpy as np
import psutil

from neurotask.pipeline.config import Config
from neurotask.storage import ChunkPlan, Progress, Stage, StudyStore, responses_group, results_group, write_json_atomic

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


def _featurize_lines(store: StudyStore, progress: Progress) -> list[str]:
    """Feature spaces that `neurotask featurize` started but has not finished: batches done."""
    lines = []
    for task in store.feature_tasks():
        attrs = store.feature_attrs(task)
        if "featurize" not in attrs or progress.is_done(Stage.FEATURIZED, task):
            continue  # simulated or written features, or a finished featurize
        n_images = store.read_features(task).sizes["image"]
        n_batches = ChunkPlan(n_images, int(attrs["batch_size"])).n_chunks
        done = len(progress.done_units(Stage.FEATURIZE, task))
        lines.append(f"  featurize {task}: {done}/{n_batches} batches done (incomplete: fit refuses it; "
                     "rerun `neurotask featurize` to finish)")
    return lines


def status_lines(cfg: Config) -> list[str]:
    """Per subject: ingested or not; per (subject, task): chunks done, running, queued, missing."""
    store = StudyStore(cfg.store_path)
    if not store.exists():
        return [f"{cfg.store_path}: no store yet (nothing done)"]
    progress = store.progress()
    lines = [f"store: {cfg.store_path}",
             f"features: {', '.join(store.feature_tasks()) or 'none'}"]
    lines += _featurize_lines(store, progress)
    run = read_fit_run(progress)
    if run is not None:
        lines.append(_run_line(run))
    for subject in cfg.study.subjects:
        if not (progress.is_done(Stage.INGEST, subject) and store.has(responses_group(subject))):
            lines.append(f"{subject}: not ingested")
            continue
        chunks = store.voxel_chunks(subject)
        n_units = chunks.n_chunks
        lines.append(f"{subject}: {store.responses(subject).sizes['image']} images x {chunks.length} voxels "
                     f"({n_units} chunks)")
        results = store.results(subject) if store.has(results_group(subject)) else None
        for task in cfg.tasks:
            done_names = progress.done_units(Stage.FIT, subject, task) & chunks.keys()
            done = {int(n) for n in done_names}
            running = run.chunks(subject, task, "running") - done if run else set()
            queued = run.chunks(subject, task, "queued") - done - running if run else set()
            missing = n_units - len(done) - len(running) - len(queued)
            active = run is not None and run.state == "running"
            lines.append(f"  {task:<17} " + _pair_state(len(done), len(running), len(queued), missing,
                                                       n_units, results, task, active))
    return lines


def _pair_state(done: int, running: int, queued: int, missing: int, n_units: int, results, task: str,
                run_active: bool) -> str:
    if done == n_units:
        if results is None or task not in results["task"].values:
            return f"{'done':<8} {done}/{n_units} chunks"
        pair = results.sel(task=task)
        if np.isnan(pair["qvalue"].values).all():
            # q-values need every chunk's p; the driver computes them once all units are done.
            when = "at the end of the run" if run_active else "by a rerun of `neurotask fit`"
            return f"{'done':<8} {done}/{n_units} chunks, FDR q-values not computed yet ({when})"
        return f"{'done':<8} {done}/{n_units} chunks, {int(pair['significant'].sum())} significant voxels"
    state = "running" if running or queued else ("missing" if done == 0 else "partial")
    parts = [f"{done}/{n_units} chunks done"]
    parts += [f"{n} {what}" for n, what in ((running, "running"), (queued, "queued"), (missing, "missing")) if n]
    return f"{state:<8} " + ", ".join(parts)
