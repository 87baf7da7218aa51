"""One way to write a small file so that readers see the old content or the new, never a part.

The data go to a temporary file in the target's directory (so the rename stays on one file
system), are flushed and fsynced, the file is renamed over the target, and the directory is
fsynced so that the rename itself survives a crash of the machine.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# Not "*.json": a reader globbing for records never sees a half-written one.
TEMPORARY_SUFFIX = ".partial"


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably (creating parent directories)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_json_atomic(path: str | Path, record: Any) -> None:
    """``record`` as JSON into ``path``, atomically and durably (:func:`write_atomic`)."""
    write_atomic(path, json.dumps(record).encode())


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
