"""Worker failures explained to the driver.

- :class:`WorkerWatch` follows the scheduler's worker events (topic ``all``) and logs each
  worker that leaves, as it happens, with the cause Dask gives (the remove-worker stimulus) and,
  for SLURM workers, the first error line of the job's ``.err`` log; it also tells the driver
  how many workers are alive and since when there have been none.
- :func:`describe_failure` words a task's exception, naming ``KilledWorker`` as what it means.
- :func:`first_error_line` reads a dask-jobqueue worker log (a pure function, tested on a
  sample file); :func:`job_err_log` says where that log is.
- :class:`ReturnFailures` wraps a worker function so that deterministic errors (wrong input
  data) come back as a :class:`TaskFailure` record instead of being raised: Dask retries raised
  errors, and retrying a bad input only repeats the same traceback.

Imports nothing else of neurotask (the error classes are passed in).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import Client
from distributed.scheduler import KilledWorker

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- deterministic errors


@dataclass(frozen=True)
class TaskFailure:
    """What a wrapped task returns instead of raising a deterministic error."""

    error: str  # "DataError: message"
    traceback: str
    function: str


class ReturnFailures:
    """``fn`` with the exceptions of ``errors`` returned as :class:`TaskFailure` (not retried).

    A TaskFailure among the arguments (an upstream task's) is returned as it is, so a
    deterministic failure of a shared input fails its dependants once each, without running them."""

    def __init__(self, fn: Callable[..., Any], errors: tuple[type[BaseException], ...]):
        self.fn, self.errors = fn, errors
        self.__name__ = getattr(fn, "__name__", "task")  # Dask's task names read it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if isinstance(value, TaskFailure):
                return value
        try:
            return self.fn(*args, **kwargs)
        except self.errors as exc:
            return TaskFailure(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                               function=self.__name__)


# --------------------------------------------------------------------------- worker logs

# What starts the interesting line of a worker job's stderr: slurmstepd's own errors (memory,
# time limit, cancellation), a Python exception line, a kill, or a plain "error:".
_ERROR_LINE = re.compile(
    r"slurmstepd: error|\bCANCELLED\b|oom[-_ ]kill|Out Of Memory|^\s*[\w.]*(Error|Exception|Exit)\b.*:"
    r"|\bKilled\b|^\s*(error|fatal)\b|\berror:",
    re.IGNORECASE,
)
# distributed's own log lines ("2026-... - distributed.worker - INFO - ...") at these levels are
# not errors, even when they quote one.
_QUIET = re.compile(r" - (DEBUG|INFO) - ")


def first_error_line(text: str) -> str | None:
    """The first line of a worker job's ``.err`` log that says what went wrong, stripped; None
    when there is none. A ``Traceback`` header is skipped for the exception line it leads to."""
    for line in text.splitlines():
        if not line.strip() or _QUIET.search(line) or line.lstrip().startswith(("Traceback", "File ")):
            continue
        if _ERROR_LINE.search(line):
            return line.strip()
    return None


def job_err_log(log_directory: str | Path | None, job_name: str | None, job_id: str) -> Path | None:
    """Where dask-jobqueue's SLURM job writes its stderr (``#SBATCH -e <dir>/<name>-%J.err``);
    None without a log directory."""
    if not log_directory:
        return None
    directory = Path(log_directory)
    path = directory / f"{job_name or 'worker'}-{job_id}.err"
    if not path.exists():  # %J may render as <jobid>.<step>
        matches = sorted(directory.glob(f"{job_name or 'worker'}-{job_id}.*err"))
        path = matches[0] if matches else path
    return path


def log_error(path: Path | None) -> str | None:
    """'<path>: <first error line>' for a worker log, or None when unreadable or clean."""
    if path is None:
        return None
    try:
        line = first_error_line(path.read_text(errors="replace"))
    except OSError:
        return None
    return f"{path}: {line}" if line else None


# --------------------------------------------------------------------------- failures worded


def allowed_failures(exc: KilledWorker) -> int:
    return int(exc.allowed_failures)


def describe_failure(exc: BaseException | None) -> str:
    """One line for a task's exception; KilledWorker named as what it means."""
    if isinstance(exc, KilledWorker):
        last = getattr(exc.last_worker, "address", exc.last_worker)
        return (f"KilledWorker: the workers running it died {allowed_failures(exc) + 1} times "
                f"(distributed.scheduler.allowed-failures is {allowed_failures(exc)}; the last was {last})")
    return repr(exc)


# Remove-worker stimulus prefixes -> what they mean.
_CAUSES = {
    "handle-worker-cleanup": "its connection to the scheduler closed (the process died, was killed or its job ended)",
    "check-worker-ttl": "it sent no heartbeat for distributed.scheduler.worker-ttl (hung or unreachable)",
    "worker-close": "it was closed",
    "retire-workers": "it was retired (scaled down)",
    "worker-status-change": "it was closed",
}


def removal_cause(event: dict[str, Any]) -> str:
    """The cause of a remove-worker event as Dask reports it (its stimulus), in words."""
    stimulus = str(event.get("stimulus_id", "?"))
    prefix = re.sub(r"-[\d.]+$", "", stimulus)
    words = _CAUSES.get(prefix, "")
    expected = " (expected)" if event.get("expected") else ""
    return f"{words}{expected} [{stimulus}]" if words else f"{stimulus}{expected}"


# --------------------------------------------------------------------------- the watch


class WorkerWatch:
    """Logs workers leaving as it happens and keeps count of the live ones.

    Use as a context manager around the driver's loop; ``live`` and ``none_since`` are read by
    the loop (the events arrive on the client's thread)."""

    def __init__(self, client: Client):
        self.client = client
        self.cluster = getattr(client, "cluster", None)  # a Cluster object, or None for an address
        self._lock = threading.Lock()
        self.names: dict[str, str] = {}
        self.left: list[str] = []  # one line per worker that left unexpectedly
        self.live = 0
        self.none_since: float | None = None  # when the last live worker left

    def __enter__(self) -> WorkerWatch:
        workers = self.client.scheduler_info().get("workers", {})
        self.names = {address: str(w.get("name", address)) for address, w in workers.items()}
        self.live = len(workers)
        self.client.subscribe_topic("all", self._event)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.client.unsubscribe_topic("all")
        except Exception:  # the client may be closing; nothing left to watch
            pass

    def _scheduler_name(self, address: str) -> str | None:
        """The worker's name from a scheduler in this process (local and SLURM clusters)."""
        ws = getattr(getattr(self.cluster, "scheduler", None), "workers", {}).get(address)
        return str(ws.name) if ws is not None else None

    def _event(self, event: tuple[float, dict[str, Any]]) -> None:
        _, msg = event
        if not isinstance(msg, dict):
            return
        action, address = msg.get("action"), str(msg.get("worker", "?"))
        with self._lock:
            if action == "add-worker":
                self.live += 1
                self.none_since = None
                self.names[address] = self._scheduler_name(address) or address
            elif action == "remove-worker":
                self.live = max(0, self.live - 1)
                if self.live == 0:
                    self.none_since = time.monotonic()
                name = self.names.pop(address, address)
                if msg.get("expected"):
                    return
                running = len(msg.get("processing-tasks") or ())
                line = f"Dask worker {name} ({address}) left: {removal_cause(msg)}; it was running {running} task(s)"
                job = self.slurm_log(name)
                if job:
                    line += f"; its job's log {job}"
                self.left.append(line)
                logger.warning(line)

    def slurm_log(self, worker_name: str) -> str | None:
        """'SLURM job N, <path>: <first error line>' for a SLURM worker, or None."""
        jobs = getattr(self.cluster, "workers", None)
        if not jobs or not hasattr(self.cluster, "job_cls"):
            return None
        for spec_name, job in list(jobs.items()):
            group = self.cluster.worker_spec.get(spec_name, {}).get("group")
            names = [f"{spec_name}{suffix}" for suffix in group] if group else [str(spec_name)]
            job_id = getattr(job, "job_id", None)
            if job_id and worker_name in names:
                path = job_err_log(getattr(job, "log_directory", None), getattr(job, "job_name", None), str(job_id))
                error = log_error(path)
                return f"SLURM job {job_id}, {error or f'{path} (no error line yet)' if path else 'no log_directory'}"
        return None

    def explain(self, exc: BaseException | None) -> str:
        """:func:`describe_failure`, plus the SLURM job's log line of the last worker for a
        KilledWorker."""
        text = describe_failure(exc)
        if isinstance(exc, KilledWorker):
            name = getattr(exc.last_worker, "name", None)
            job = self.slurm_log(str(name)) if name is not None else None
            if job:
                text += f"; {job}"
        return text
