"""One driver per workdir: an exclusive ``fcntl.flock`` on ``<workdir>/.neurotask.lock``.

Every command that writes the study (run, simulate, featurize, ingest, fit, analyse,
import-published, verify) holds the lock for its whole run; ``status``, ``report`` and ``schema``
do not take it. The lock file holds the holder's pid, host, command and start time (JSON),
so a second driver is told who holds it.

The kernel releases a flock when its holder dies, so a file naming a dead pid with the lock
free is stale: it is taken over, with a message saying so.

Network filesystems: on NFS, CIFS/SMB, Lustre, GPFS, BeeGFS, sshfs and the like, flock may
be local to each client host (or a no-op), so two drivers on *different hosts* may not see
each other's lock. :func:`driver_lock` logs a warning when the workdir is on such a mount;
run one driver per study there by convention. Where the filesystem has no locks at all
(flock fails with ENOLCK or EOPNOTSUPP), the command runs unlocked with a warning.

``neurotask status`` names the holder from the file (:func:`lock_holder`) without taking the
lock. The file stays after a driver ends (emptied): deleting it could race with a driver that
has just opened it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".neurotask.lock"

# Filesystem types on which flock between hosts is unreliable or absent.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "fuse.sshfs",
                       "ceph", "fuse.ceph", "glusterfs", "fuse.glusterfs", "9p", "afs")

logger = logging.getLogger("neurotask")


class LockedError(Exception):
    """Another driver holds the workdir's lock; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def mount_fstype(path: Path, mounts: str = "/proc/mounts") -> str | None:
    """The filesystem type of the mount holding ``path`` (the longest matching mount point in
    /proc/mounts), or None where /proc/mounts cannot be read."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    target = str(Path(path).resolve())
    best, fstype = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        holder = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"command {holder.get('command', '?')!r}, since {when}")


def lock_holder(workdir: Path) -> str | None:
    """Who holds (or, after a crash, last held) the workdir's lock, for ``neurotask status``;
    None when no driver has it. Reads the file only: taking the lock, even to test it, could
    refuse a driver that starts at the same moment."""
    try:
        text = (Path(workdir) / LOCK_NAME).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        holder = json.loads(text) if text.strip() else None
    except ValueError:
        return None
    if not isinstance(holder, dict):
        return None
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        return None  # a driver of this host that died: its lock is stale
    return _describe(holder)


@contextlib.contextmanager
def driver_lock(workdir: Path, command: str) -> Iterator[Path]:
    """Hold ``<workdir>/.neurotask.lock`` while the block runs (creating the workdir if missing).

    Raises :class:`LockedError` naming the holder when another driver holds it."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fstype = mount_fstype(workdir)
    if fstype in NETWORK_FILESYSTEMS:
        logger.warning(f"warning: {workdir} is on a {fstype} filesystem, where file locks may not work across "
                       "hosts: two neurotask drivers on different hosts may not see each other's lock; "
                       "run one driver per study")
    path = workdir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        unsupported = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                unsupported = e.strerror
            elif e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _read_holder(fd)
                raise LockedError(
                    f"{workdir} is in use by another neurotask driver: {_describe(holder)} (lock file {path}); "
                    "wait for it to finish or stop it; `neurotask status` and `neurotask report` still work "
                    "meanwhile") from None
            else:
                raise
        if unsupported is not None:
            # Some network mounts have no locks at all: refusing to run there would make the
            # study unusable, so run unlocked and say so.
            logger.warning(f"warning: {workdir}: this filesystem does not support file locks ({unsupported}); "
                           "running without the driver lock: make sure no other neurotask driver uses "
                           "this workdir")
            yield path
            return
        # The lock is ours. A file naming a dead pid of this host is a driver that died.
        previous = _read_holder(fd)
        host = socket.gethostname()
        old_pid = previous.get("pid")
        if isinstance(old_pid, int) and previous.get("host") == host and not _pid_alive(old_pid):
            logger.info(f"taking over a stale lock of {workdir}: {_describe(previous)} is no longer running")
        info = {"pid": os.getpid(), "host": host, "command": command, "since": time.time(),
                "since_text": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        os.fsync(fd)
        try:
            yield path
        finally:
            # Leave the file (unlinking would race with a driver about to lock it); empty it
            # so that it names no holder.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the flock
