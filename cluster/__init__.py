"""How a Dask client is obtained, from the config's ``cluster:`` section.

Kinds:
- ``local``: a ``distributed.LocalCluster`` on this machine, bound to 127.0.0.1, with TLS and a
  temporary certificate unless ``tls: false`` (other users of the machine can reach a
  loopback port too, and a scheduler runs whatever it is sent);
- ``slurm``: a ``dask_jobqueue.SLURMCluster`` (see ``cluster.slurm``);
- ``address``: an existing scheduler, e.g. ``tcp://127.0.0.1:8786`` or ``tls://...``.

The dashboard's Groups page fails on our task graphs (a distributed bug, harmless to the run):
``cluster.dashboard`` keeps that traceback off the terminal.

The section's keys, defaults and checks are in ``cluster.options`` (a dashboard reachable from
other hosts is refused unless ``dashboard_public: true``). The dashboard link printed is the
address the scheduler actually bound. Imports nothing else of neurotask.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from neurotask.cluster.errors import ClusterConfigError  # noqa: F401  (raised here; imported from here)
from neurotask.cluster.options import LocalOptions, SlurmOptions, cluster_options

# distributed is imported when a cluster is started, not here: the config imports this package
# for its options, and `neurotask status` (or `--help`) should not pay ~0.7 s for it.
if TYPE_CHECKING:
    from distributed import Client, LocalCluster, Scheduler

logger = logging.getLogger(__name__)


def local_cluster(options: LocalOptions) -> LocalCluster:
    """A LocalCluster on loopback. Defaults: one single-threaded worker process per core, at
    most 4 (the ridge sweep is BLAS-bound; distributed pins each worker's BLAS to one thread);
    TLS with a temporary certificate (``options.tls``)."""
    from distributed import LocalCluster
    if options.tls:
        from neurotask.cluster.security import temporary_security

        tls: dict[str, Any] = {"protocol": "tls://", "security": temporary_security()}
    else:
        logger.info("cluster.tls is false: plain tcp:// on 127.0.0.1, which any user of this machine "
                    "can connect to (for debugging only)")
        tls = {"protocol": "tcp://"}
    return LocalCluster(
        **tls,
        n_workers=options.n_workers or min(os.cpu_count() or 1, 4),
        threads_per_worker=options.threads_per_worker,
        processes=options.processes,
        memory_limit=options.memory_limit,
        host="127.0.0.1",
        dashboard_address=options.dashboard_address,
    )


def bound_dashboard(scheduler: Scheduler | None) -> str | None:
    """The dashboard link from the socket the scheduler's HTTP server actually listens on (the
    configured address may say port 0 or a name). None when there is no dashboard or the
    scheduler is not in this process."""
    server = getattr(scheduler, "http_server", None)
    sockets = list(getattr(server, "_sockets", {}).values()) if server is not None else []
    if not sockets or "dashboard" not in getattr(scheduler, "services", {}):
        return None
    host, port = sockets[0].getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/status"


@contextlib.contextmanager
def open_client(section: Mapping[str, Any] | None) -> Iterator[Client]:
    """Start (or connect to) the configured cluster; yield a Client; shut down what we started.

    ``section`` is the config's ``cluster:`` mapping (``neurotask.cluster.options``)."""
    from distributed import Client

    from neurotask.cluster.dashboard import quiet_groups_page_failures

    options = cluster_options(section or None)  # raises ClusterConfigError naming each bad key
    quiet_groups_page_failures()  # the dashboard's one known, harmless failure (cluster.dashboard)
    with contextlib.ExitStack() as stack:
        cluster = None
        if isinstance(options, LocalOptions):
            cluster = stack.enter_context(local_cluster(options))
            client = stack.enter_context(Client(cluster, security=cluster.security))
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
        if isinstance(options, SlurmOptions):
            pass  # start_slurm_cluster logged it, with the SSH tunnel command
        elif options.kind == "local" and options.dashboard_address is None:
            logger.info("Dask dashboard: none (cluster.dashboard_address is null)")
        else:
            scheduler = getattr(cluster, "scheduler", None) if options.kind == "local" else None
            logger.info(f"Dask dashboard: {bound_dashboard(scheduler) or client.dashboard_link}")
        yield client
