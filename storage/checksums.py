"""Checksums of stored chunks: what a progress marker vouches for, and how to check it.

After a unit writes its region, :func:`seal_region` fsyncs the chunk files it wrote (and their
directories, so a crash cannot lose a file a marker vouches for) and returns one record per
chunk: ``{"variable", "key", "crc32", "size"}``, with ``key`` the chunk file's path inside the
array as the array's own metadata (``chunk_key_encoding``) names it. The marker carries these
records; :func:`check_records` later tells which chunks no longer match them.

A chunk that holds only the array's fill value is not stored by zarr (``write_empty_chunks``
is off): its record has ``size`` 0 and ``crc32`` None, and its file must stay absent.
The store is a local directory.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from neurotask.storage.atomic import fsync_path

# The marker key under which markers list the checksums of the chunks they vouch for.
CHUNKS = "chunks"
ANATOMY_CHUNKS = "anatomy_chunks"  # the ingest marker's checksum records of anatomy/<subject>


@dataclass(frozen=True)
class Damage:
    """One damaged chunk (or array metadata): where, which marker vouched for it, what is wrong."""

    path: str  # group/variable/chunk key (or group/variable/zarr.json)
    unit: str  # the marker's name, e.g. fit/CSI1/edge2d/00003
    problem: str

    def __str__(self) -> str:
        return f"{self.path} ({self.unit}): {self.problem}"


def read_array_metadata(store: Path, array: str) -> dict[str, Any]:
    """The parsed ``zarr.json`` of ``array`` (path inside the store); raises OSError or
    ValueError when it is missing or does not parse as array metadata."""
    meta = json.loads((store / array / "zarr.json").read_text())
    if meta.get("node_type") != "array":
        raise ValueError(f"{array}/zarr.json is not array metadata")
    return meta


def chunk_file_key(meta: dict[str, Any], coords: Sequence[int]) -> str:
    """The key (relative path inside the array) of the chunk at ``coords``, by the array's
    ``chunk_key_encoding`` (zarr v3: "default" -> c/i/j, "v2" -> i.j)."""
    encoding = meta["chunk_key_encoding"]
    name = encoding["name"]
    separator = encoding.get("configuration", {}).get("separator", "/" if name == "default" else ".")
    if name == "default":
        return separator.join(["c", *map(str, coords)])
    if name == "v2":
        return separator.join(map(str, coords)) if coords else "0"
    raise ValueError(f"unknown chunk key encoding {name!r}")


def region_chunk_coords(meta: dict[str, Any], region: Sequence[slice]) -> list[tuple[int, ...]]:
    """Coordinates of every chunk that ``region`` (one slice per dimension) touches."""
    shape = meta["shape"]
    chunk_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    ranges = []
    for sl, n, c in zip(region, shape, chunk_shape):
        start, stop, _ = sl.indices(n)
        ranges.append(range(start // c, -(-stop // c)) if stop > start else range(0))
    return list(product(*ranges))


def chunk_record(store: Path, array: str, variable: str, key: str) -> dict[str, Any]:
    """fsync the chunk file ``array/key`` and its directories up to the array; its record."""
    path = store / array / key
    if not path.is_file():
        return {"variable": variable, "key": key, "crc32": None, "size": 0}  # only fill value
    data = path.read_bytes()
    fsync_path(path)
    # New directories (c/1/) must be durable too, or the file can vanish with its parent.
    d = path.parent
    while True:
        fsync_path(d)
        if d == store / array:
            break
        d = d.parent
    return {"variable": variable, "key": key, "crc32": zlib.crc32(data), "size": len(data)}


def seal_region(store: Path, group: str, variables: Iterable[str], region: Sequence[slice]) -> list[dict[str, Any]]:
    """fsync and checksum the chunks of ``variables`` (arrays of ``group``) that ``region``
    (slices over each variable's dimensions; extra slices are ignored) covers."""
    records = []
    for variable in variables:
        array = f"{group}/{variable}"
        meta = read_array_metadata(store, array)
        for coords in region_chunk_coords(meta, region[-len(meta["shape"]):]):
            records.append(chunk_record(store, array, variable, chunk_file_key(meta, coords)))
    return records


def check_records(store: Path, group: str, unit: str, records: Iterable[dict[str, Any]]) -> list[Damage]:
    """The chunks of ``records`` (of a marker named ``unit``) that do not match: array
    metadata missing or unreadable, chunk file missing, of another size, or another checksum."""
    damage = []
    bad_metadata: set[str] = set()
    for rec in records:
        variable, key = rec["variable"], rec["key"]
        array = f"{group}/{variable}"
        if variable in bad_metadata:
            continue
        try:
            read_array_metadata(store, array)
        except (OSError, ValueError) as e:
            bad_metadata.add(variable)
            damage.append(Damage(f"{array}/zarr.json", unit, f"array metadata missing or unreadable ({e})"))
            continue
        path = store / array / key
        where = f"{array}/{key}"
        if not path.is_file():
            if rec["size"]:
                damage.append(Damage(where, unit, "chunk file missing"))
            continue
        data = path.read_bytes()
        if not rec["size"]:
            damage.append(Damage(where, unit, "chunk file present where only fill values were written"))
        elif len(data) != rec["size"]:
            damage.append(Damage(where, unit, f"size {len(data)} bytes, recorded {rec['size']} (truncated?)"))
        elif zlib.crc32(data) != rec["crc32"]:
            damage.append(Damage(where, unit, "checksum mismatch"))
    return damage
