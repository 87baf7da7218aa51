"""How a Dask client is obtained, from the config's ``cluster:`` section.

Kinds:
- ``local``: a ``distributed.LocalCluster`` on this machine, bound to 127.0.0.1;
- ``slurm``: a ``dask_jobqueue.SLURMCluster`` (see ``cluster.slurm``);
- ``address``: an existing scheduler, e.g. ``tcp://127.0.0.1:8786`` or ``tls://...``.

The dashboard link is always printed. Imports nothing else of neurotask.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

from distributed import Client, LocalCluster

from neurotask.cluster.errors import ClusterConfigError

logger = logging.getLogger(__name__)


_LOCAL_KEYS = {"kind", "n_workers", "threads_per_worker", "memory_limit", "dashboard_address", "processes"}
_ADDRESS_KEYS = {"kind", "address", "tls_ca_file", "tls_client_cert", "tls_client_key"}


def _check_keys(section: dict[str, Any], allowed: set[str], kind: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ClusterConfigError(
            f"cluster: unknown option(s) {', '.join(unknown)} for kind '{kind}'; valid: {', '.join(sorted(allowed))}"
        )


def local_cluster(section: dict[str, Any]) -> LocalCluster:
    """A LocalCluster on loopback. Defaults: one single-threaded worker process per core
    (the ridge sweep is BLAS-bound; distributed pins each worker's BLAS to one thread)."""
    _check_keys(section, _LOCAL_KEYS, "local")
    n_workers = section.get("n_workers", min(os.cpu_count() or 1, 4))
    if not isinstance(n_workers, int) or n_workers < 1:
        raise ClusterConfigError(f"cluster.n_workers must be a positive integer, got {n_workers!r}")
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=section.get("threads_per_worker", 1),
        processes=section.get("processes", True),
        memory_limit=section.get("memory_limit", "auto"),
        host="127.0.0.1",
        dashboard_address=section.get("dashboard_address", "127.0.0.1:8787"),
    )


@contextlib.contextmanager
def open_client(section: dict[str, Any] | None) -> Iterator[Client]:
    """Start (or connect to) the configured cluster; yield a Client; shut down what we started."""
    section = dict(section or {"kind": "local"})
    kind = section.get("kind", "local")
    with contextlib.ExitStack() as stack:
        if kind == "local":
            cluster = stack.enter_context(local_cluster(section))
            client = stack.enter_context(Client(cluster))
        elif kind == "slurm":
            from neurotask.cluster.slurm import connect_client, start_slurm_cluster

            cluster, security = start_slurm_cluster(section)
            stack.callback(cluster.close)
            client = stack.enter_context(connect_client(cluster, security))
        elif kind == "address":
            _check_keys(section, _ADDRESS_KEYS, "address")
            if "address" not in section:
                raise ClusterConfigError("cluster.address is required for kind 'address'")
            security = None
            if section["address"].startswith("tls://"):
                from distributed.security import Security

                security = Security(
                    tls_ca_file=section.get("tls_ca_file"),
                    tls_client_cert=section.get("tls_client_cert"),
                    tls_client_key=section.get("tls_client_key"),
                    require_encryption=True,
                )
            client = stack.enter_context(Client(section["address"], security=security, timeout="30s"))
        else:
            raise ClusterConfigError(f"cluster.kind must be 'local', 'slurm' or 'address', got {kind!r}")
        logger.info(f"Dask dashboard: {client.dashboard_link}")
        yield client
