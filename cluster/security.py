"""TLS for the scheduler <-> worker <-> client traffic of a Dask cluster.

On a shared cluster anyone who can reach the scheduler's port could submit work that runs as
the user, so the SLURM mode encrypts and authenticates every connection with a temporary
self-signed certificate (``distributed.security.Security.temporary``): the scheduler, the
workers and the client all hold the same certificate and key, and a peer without them fails
the TLS handshake.

The certificate lives in memory in this process; workers started by SLURM on other nodes
read it from files that dask-jobqueue writes into its ``shared_temp_directory`` (mode 0600,
deleted when the cluster object goes away). That directory must be visible from the compute
nodes (a home directory usually is) and private to the user, which ``cert_directory`` ensures.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import dask
from distributed.security import Security

# Default place for the worker copies of the temporary certificate: in the home directory,
# which HPC sites mount on the compute nodes.
DEFAULT_CERT_DIRECTORY = "~/.neurotask/tls"


def temporary_security() -> Security:
    """A new self-signed certificate and key for every role, with encryption required.

    ``require_encryption`` (set by ``Security.temporary``) makes the client and workers
    refuse plain-TCP addresses instead of silently falling back to them.
    """
    try:
        security = Security.temporary()
    except ImportError as exc:  # cryptography missing
        raise ImportError(
            "TLS for the Dask cluster needs the 'cryptography' package: "
            "pip install cryptography (or set cluster.tls: false on a trusted network)"
        ) from exc
    assert security.require_encryption
    return security


def cert_directory(config_name: str = "slurm", configured: str | None = None) -> str:
    """Directory where the workers' copies of the temporary certificate are written.

    Order: ``configured`` (the ``shared_temp_directory`` given in our config), then Dask's
    ``jobqueue.<config_name>.shared-temp-directory``, then ``DEFAULT_CERT_DIRECTORY``. The
    directory is created if missing; one we create is mode 0700. An existing directory that
    others can write to is refused, since they could replace the key files.

    Returns the path as given (unexpanded ``~``/``$VAR`` kept, so job scripts expand it on
    the compute node), after checking its expansion here.
    """
    path = configured or dask.config.get(f"jobqueue.{config_name}.shared-temp-directory", None)
    path = path or DEFAULT_CERT_DIRECTORY
    local = Path(os.path.expandvars(os.path.expanduser(str(path))))
    if not local.exists():
        local.mkdir(parents=True, mode=0o700)
    if not local.is_dir():
        raise NotADirectoryError(f"shared_temp_directory {str(path)!r} is not a directory")
    mode = local.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        raise PermissionError(
            f"shared_temp_directory {str(path)!r} ({local}) is writable by other users; "
            "use a private directory for the TLS key files"
        )
    return str(path)
