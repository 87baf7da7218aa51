"""Dask workers as SLURM jobs, through dask-jobqueue's ``SLURMCluster``.

The config's ``cluster:`` section (kind ``slurm``) holds a few keys of ours and a ``slurm:``
mapping that is passed straight through as ``SLURMCluster`` keyword arguments, so the
options and their meaning are dask-jobqueue's own and Dask's config files
(``~/.config/dask/jobqueue.yaml``, ``jobqueue.slurm.*``) fill in whatever the section leaves
out. Everything is checked before a job is submitted: option names against the signatures
of ``SLURMCluster``/``SLURMJob``, value types, and finally the generated job script with
``sbatch --test-only`` (which catches a wrong partition, account or an impossible request).

Defaults for a shared cluster: TLS with a temporary certificate, scheduler on the configured
network interface, dashboard bound to 127.0.0.1 (reach it through an SSH tunnel), workers
scaled adaptively between ``minimum_jobs`` and ``maximum_jobs``. Adaptivity is also what
replaces a worker whose job died: once Dask gives the lost worker up
(``distributed.deploy.lost-worker-timeout``), the cluster submits a new job for it.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from typing import Any

import dask
import psutil
from dask_jobqueue import SLURMCluster
from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.security import Security
from tornado.ioloop import PeriodicCallback

from neurotask.cluster.errors import ClusterConfigError
from neurotask.cluster.options import SlurmOptions, cluster_options, dashboard_problem
from neurotask.cluster.security import cert_directory, temporary_security

logger = logging.getLogger(__name__)


# Words in sbatch's refusal -> the options that most likely caused it.
_SBATCH_HINTS = {
    "partition": ("queue",),
    "account": ("account",),
    "time limit": ("walltime",),
    "node configuration is not available": ("cores", "memory", "job_cpu", "job_mem",
                                            "job_extra_directives"),
    "memory": ("memory", "job_mem"),
    "qos": ("job_extra_directives",),
}


def slurm_options(section: Mapping[str, Any] | SlurmOptions) -> SlurmOptions:
    """The `cluster:` section (kind slurm) validated; ClusterConfigError names every bad key."""
    if isinstance(section, SlurmOptions):
        return section
    if not isinstance(section, Mapping):
        raise ClusterConfigError(f"cluster: expected a mapping, got {type(section).__name__}")
    options = cluster_options({"kind": "slurm", **section})
    if not isinstance(options, SlurmOptions):
        raise ClusterConfigError(f"cluster.kind: expected 'slurm', got {options.kind!r}")
    return options


def validate_section(section: Mapping[str, Any] | SlurmOptions) -> dict[str, Any]:
    """Check the `cluster:` section (kind slurm); return it with defaults filled in, and under
    ``slurm`` only the SLURMCluster options given. Raises ClusterConfigError naming the bad
    key(s) or value, before anything is started."""
    s = slurm_options(section)
    return {**s.model_dump(exclude={"slurm"}), "slurm": s.slurm.given()}


def _scheduler_options(s: Mapping[str, Any], config_name: str,
                       dashboard_given: bool) -> dict[str, Any]:
    """Dask's configured scheduler options, updated by ours; dashboard on localhost by default.

    dask-jobqueue ignores its config's scheduler-options once any are passed, so merge here.
    """
    opts = dict(dask.config.get(f"jobqueue.{config_name}.scheduler-options", {}) or {})
    opts.update(s["slurm"].get("scheduler_options") or {})
    if dashboard_given or "dashboard_address" not in opts:
        opts["dashboard_address"] = s["dashboard_address"]
    return opts


def _check_interface(kwargs: Mapping[str, Any], config_name: str) -> None:
    """The scheduler binds here, so its interface must exist on this machine."""
    sched = kwargs["scheduler_options"]
    if "host" in sched:
        return
    if sched.get("interface"):
        iface, where = sched["interface"], "scheduler_options.interface"
    elif kwargs.get("interface"):
        iface, where = kwargs["interface"], "cluster.interface (or cluster.slurm.interface)"
    else:
        iface = dask.config.get(f"jobqueue.{config_name}.interface", None)
        where = f"Dask config jobqueue.{config_name}.interface"
    present = psutil.net_if_addrs()
    if iface and iface not in present:
        raise ClusterConfigError(
            f"{where}: network interface {iface!r} does not exist on {socket.gethostname()}; "
            f"its interfaces are {', '.join(sorted(present))}")


def _check_with_sbatch(cluster: SLURMCluster, slurm: Mapping[str, Any]) -> None:
    """Let SLURM judge the job script without submitting it (``sbatch --test-only``)."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="neurotask-job-") as f:
        f.write(cluster.job_script())
        f.flush()
        proc = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True,
                              text=True, timeout=60)
    if proc.returncode == 0:
        return
    message = (proc.stderr or proc.stdout).strip()
    suspects = sorted({o for word, opts in _SBATCH_HINTS.items() if word in message.lower()
                       for o in opts})
    given = [o for o in suspects if o in slurm]
    if given:
        where = (f" Check cluster.slurm option(s) {', '.join(given)}: "
                 + ", ".join(f"{o}={slurm[o]!r}" for o in given) + ".")
    elif suspects:
        where = (" Likely culprits (from Dask's jobqueue config or dask-jobqueue's defaults): "
                 + ", ".join(suspects) + ".")
    else:
        where = ""
    raise ClusterConfigError(
        f"cluster.slurm: SLURM refused the worker job script: {message}.{where}\n"
        f"Job script:\n{cluster.job_script()}")


def start_slurm_cluster(
    section: Mapping[str, Any] | SlurmOptions,
    *,
    check_with_sbatch: bool = True,
) -> tuple[SLURMCluster, Security | None]:
    """Start a Dask scheduler here and SLURM worker jobs scaled adaptively.

    ``section`` is the config's ``cluster:`` mapping with kind 'slurm', or those options
    validated (keys and defaults: ``neurotask.cluster.options.SlurmOptions``); its ``slurm``
    mapping is passed through as SLURMCluster keyword arguments, and only the keys given
    there are passed, so Dask's jobqueue config supplies the rest. Every option is validated, and with ``check_with_sbatch`` the job script is
    checked by ``sbatch --test-only``, before any job is submitted; problems raise
    ClusterConfigError naming the option.

    Returns the cluster (scaling between minimum_jobs and maximum_jobs) and the Security
    object the client must use (None when cluster.tls is false). It logs the
    dashboard link and, as jobs are submitted, connect and leave, their SLURM job ids.
    """
    options = slurm_options(section)
    s = validate_section(options)
    slurm = dict(s["slurm"])
    config_name = slurm.get("config_name") or "slurm"
    scheduler_options = _scheduler_options(s, config_name,
                                           dashboard_given="dashboard_address" in options.model_fields_set)
    # Dask's jobqueue config may set the dashboard too, which the section's check did not see.
    problem = dashboard_problem(scheduler_options.get("dashboard_address"), options.dashboard_public)
    if problem:
        raise ClusterConfigError(f"{problem} (from Dask's config jobqueue.{config_name}.scheduler-options)")
    if shutil.which("sbatch") is None:
        raise ClusterConfigError(
            "cluster.kind is 'slurm' but 'sbatch' is not on PATH: run on a SLURM login node "
            "(or start the local test SLURM with scripts/slurm start)")

    kwargs: dict[str, Any] = dict(slurm)
    if kwargs.get("log_directory"):
        # dask-jobqueue creates it here and writes it into #SBATCH lines, neither of which
        # expands '~' or '$VAR' (a literal './~' directory would appear instead).
        kwargs["log_directory"] = os.path.expandvars(os.path.expanduser(kwargs["log_directory"]))
    kwargs["scheduler_options"] = scheduler_options
    if s["interface"] is not None:
        kwargs["interface"] = s["interface"]
    _check_interface(kwargs, config_name)
    security = None
    if s["tls"]:
        security = temporary_security()
        kwargs["security"] = security
        kwargs["shared_temp_directory"] = cert_directory(
            config_name, slurm.get("shared_temp_directory"))
    else:
        logger.info("cluster.tls is false: scheduler, worker and client traffic is NOT encrypted and "
                    "anyone who can reach the scheduler's port can run code as you")

    try:
        cluster = SLURMCluster(**kwargs)
    except ValueError as exc:  # dask-jobqueue's own checks, e.g. no cores/memory anywhere
        raise ClusterConfigError(f"cluster.slurm: {exc}") from exc
    try:
        if check_with_sbatch:
            _check_with_sbatch(cluster, slurm)
        _watch_jobs(cluster)
        cluster.adapt(minimum_jobs=s["minimum_jobs"], maximum_jobs=s["maximum_jobs"])
    except BaseException:
        cluster.close()
        raise
    logger.info(f"Dask scheduler {cluster.scheduler_address}; SLURM workers scale between "
                f"{s['minimum_jobs']} and {s['maximum_jobs']} jobs")
    logger.info(dashboard_message(cluster))
    return cluster, cluster.security if s["tls"] else None


def dashboard_message(cluster: SLURMCluster) -> str:
    """The dashboard link, with the SSH tunnel command when it is bound to localhost."""
    from neurotask.cluster import bound_dashboard  # the bound socket, not the config

    link = bound_dashboard(getattr(cluster, "scheduler", None)) or cluster.dashboard_link
    host, _, port = link.split("://", 1)[-1].split("/", 1)[0].rpartition(":")
    if host in ("127.0.0.1", "localhost"):
        here = socket.gethostname()
        return (f"Dask dashboard: {link} (bound to localhost on {here}; from your computer: "
                f"ssh -N -L {port}:127.0.0.1:{port} {getpass.getuser()}@{here} "
                f"then open http://localhost:{port}/status)")
    return f"Dask dashboard: {link}"


def worker_job_ids(cluster: SLURMCluster) -> dict[str, str]:
    """Dask worker name -> SLURM job id, for every job the cluster has submitted."""
    out: dict[str, str] = {}
    for name, job in list(cluster.workers.items()):
        job_id = getattr(job, "job_id", None)
        if job_id is None:
            continue
        group = cluster.worker_spec.get(name, {}).get("group")
        for worker in ([f"{name}{suffix}" for suffix in group] if group else [name]):
            out[str(worker)] = str(job_id)
    return out


class _JobLog(SchedulerPlugin):
    """Logs SLURM job ids: of each job as it is submitted (polled, as sbatch answers
    asynchronously) and of each worker as it connects and leaves (scheduler events, so a
    worker that lives for less than a polling interval is logged too)."""

    name = "neurotask-slurm-job-log"

    def __init__(self, cluster: SLURMCluster):
        self.cluster = cluster
        self.submitted: set[str] = set()
        self.connected: dict[str, tuple[str, str]] = {}  # worker address -> (name, job id)

    def note_submissions(self) -> dict[str, str]:
        ids = worker_job_ids(self.cluster)
        for worker, job_id in ids.items():
            if job_id not in self.submitted:
                self.submitted.add(job_id)
                logger.info(f"SLURM job {job_id} submitted for Dask worker {worker}")
        return ids

    def add_worker(self, scheduler: Any, worker: str) -> None:
        ids = self.note_submissions()
        ws = scheduler.workers.get(worker)
        name = str(ws.name) if ws is not None else "?"
        self.connected[worker] = (name, ids.get(name, "?"))
        logger.info(f"Dask worker {name} connected from SLURM job {self.connected[worker][1]} ({worker})")

    def remove_worker(self, scheduler: Any, worker: str, *, stimulus_id: str, **kwargs: Any) -> None:
        name, job_id = self.connected.pop(worker, ("?", "?"))
        logger.info(f"Dask worker {name} (SLURM job {job_id}) left the cluster")


def _watch_jobs(cluster: SLURMCluster) -> None:
    """Log SLURM job ids as jobs are submitted, and as their workers connect and leave."""
    plugin = _JobLog(cluster)
    cluster.scheduler.add_plugin(plugin)  # before any job exists: adapt() comes after

    def check() -> None:
        if cluster.status.name in ("closing", "closed"):
            pc.stop()
            return
        plugin.note_submissions()

    pc = PeriodicCallback(check, 500)
    cluster._neurotask_job_watcher = pc  # keep it alive with the cluster
    cluster.loop.add_callback(pc.start)


def connect_client(cluster: SLURMCluster, security: Security | None) -> Client:
    """A client of the cluster's scheduler, using the cluster's certificate when TLS is on."""
    return Client(cluster, security=security)
