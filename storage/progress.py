"""Progress markers: which units of work are finished, beside the store.

A marker is a small JSON file written atomically and durably (``storage.atomic``) *after* the unit's
data are in the store, so a unit killed half-way is never marked done. Each marker carries the
id of the store it refers to: markers left over from a deleted or recreated store are ignored.
Layout: ``<progress dir>/<stage>/<part>/.../<unit>.json``. The markers of fit units, the noise
ceiling and finalized pairs also list the size and crc32 of every chunk they vouch for
(``storage.checksums``), so that damage to the data after the marker is found, not trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from neurotask.storage.atomic import write_json_atomic


class Progress:
    """The markers under ``directory`` that vouch for units of the store ``store_id``."""

    def __init__(self, directory: str | Path, store_id: str):
        self.directory = Path(directory)
        self.store_id = store_id

    def _path(self, *parts: str) -> Path:
        return self.directory.joinpath(*parts[:-1], f"{parts[-1]}.json")

    def mark_done(self, *parts: str, info: dict[str, Any] | None = None) -> None:
        record = {"store_id": self.store_id, "finished": time.time(), "host": socket.gethostname(),
                  "pid": os.getpid(), **(info or {})}
        write_json_atomic(self._path(*parts), record)

    def read(self, *parts: str) -> dict[str, Any] | None:
        """The marker's record, or None when the unit is not (validly) finished."""
        try:
            record = json.loads(self._path(*parts).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return record if record.get("store_id") == self.store_id else None

    def is_done(self, *parts: str) -> bool:
        return self.read(*parts) is not None

    def done_units(self, *parts: str) -> set[str]:
        """Names of the finished units directly under ``parts``."""
        d = self.directory.joinpath(*parts)
        if not d.is_dir():
            return set()
        return {p.stem for p in d.glob("*.json") if self.read(*parts, p.stem) is not None}

    def unmark(self, *parts: str) -> None:
        self._path(*parts).unlink(missing_ok=True)

    def clear(self, *parts: str) -> None:
        shutil.rmtree(self.directory.joinpath(*parts), ignore_errors=True)
