"""How a Dask client is obtained, from the config's ``cluster:`` section.

Kinds:
- ``local``: a ``distributed.LocalCluster`` on this machine, bound to 127.0.0.1;
- ``slurm``: a ``dask_jobqueue.SLURMCluster`` (see ``cluster.slurm``);
- ``address``: an existing scheduler, e.g. ``tcp://127.0.0.1:8786`` or ``tls://...``.

The section's keys, defaults and checks are in ``cluster.options``. The dashboard link is
always printed. Imports nothing else of neurotask.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from distributed import Client, LocalCluster

from neurotask.cluster.errors import ClusterConfigError  # noqa: F401  (raised here; imported from here)
from neurotask.cluster.options import LocalOptions, SlurmOptions, cluster_options

logger = logging.getLogger(__name__)


def local_cluster(options: LocalOptions) -> LocalCluster:
    """A LocalCluster on loopback. Defaults: one single-threaded worker process per core, at
    most 4 (the ridge sweep is BLAS-bound; distributed pins each worker's BLAS to one thread)."""
    return LocalCluster(
        n_workers=options.n_workers or min(os.cpu_count() or 1, 4),
        threads_per_worker=options.threads_per_worker,
        processes=options.processes,
        memory_limit=options.memory_limit,
        host="127.0.0.1",
        dashboard_address=options.dashboard_address,
    )


@contextlib.contextmanager
def open_client(section: Mapping[str, Any] | None) -> Iterator[Client]:
    """Start (or connect to) the configured cluster; yield a Client; shut down what we started.

    ``section`` is the config's ``cluster:`` mapping (``neurotask.cluster.options``)."""
    options = cluster_options(section or None)  # raises ClusterConfigError naming each bad key
    with contextlib.ExitStack() as stack:
        if isinstance(options, LocalOptions):
            cluster = stack.enter_context(local_cluster(options))
            client = stack.enter_context(Client(cluster))
        elif isinstance(options, SlurmOptions):
            from neurotask.cluster.slurm import connect_client, start_slurm_cluster

            cluster, security = start_slurm_cluster(options)
            stack.callback(cluster.close)
            client = stack.enter_context(connect_client(cluster, security))
        else:
            security = None
            if options.address.startswith("tls://"):
                from distributed.security import Security

                security = Security(
                    tls_ca_file=options.tls_ca_file,
                    tls_client_cert=options.tls_client_cert,
                    tls_client_key=options.tls_client_key,
                    require_encryption=True,
                )
            client = stack.enter_context(Client(options.address, security=security, timeout="30s"))
        logger.info(f"Dask dashboard: {client.dashboard_link}")
        yield client
