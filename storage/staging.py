"""Write a group beside the old one and swap it in only when the new one is complete.

An ``--overwrite`` must never lose good data to bad input. So a stage writes its new group
into a *staging store*, ``<workdir>/staging-area/store.zarr`` (an ordinary :class:`StudyStore`
with the study store's id, so every write method works there unchanged, Dask workers
included, and its progress markers, in ``<workdir>/staging-area/progress``, stay valid once
moved beside the study store), and calls :func:`replace` only once the new group is complete.
Until then ``store.zarr`` and ``progress/`` are untouched: a failure leaves them
byte-identical, and :func:`discard` removes the staging area.

:func:`replace` swaps by renaming directories (same file system, so each ``os.rename`` of a
directory is atomic). Its plan is first written atomically to a journal,
``<workdir>/staging-journal.json``:

1. the old group (if any; so for each of the groups swapped together) is renamed into
   ``<workdir>/staging-trash/<token>/``;
2. the staged group is renamed into the store at the group's path, and staged marker
   directories (``move_markers``, e.g. featurize's per-batch markers) likewise into ``progress/``;
3. the groups to drop with it (e.g. the subject's results when its responses change) are
   moved to the trash, and the progress markers to clear (its fit and ceiling markers) are
   deleted; these describe the old data, so they go only after the new data are in place;
4. the store's metadata are consolidated, the trash and the journal deleted.

Crash semantics: a crash before the journal exists leaves the old data in place (the staged
group is garbage that the next :func:`discard` removes). A crash after it is *rolled forward*
by :func:`recover` (idempotent: every step checks what is already done), which every stage
calls before it reads the store; while a journal exists :func:`discard` keeps the staging
area, whose staged groups the roll forward needs. Between the two renames of steps 1-2 the
group is briefly absent, never half-written. New markers of the new data (e.g. ``ingest/<s>``)
are written by the caller after :func:`replace`: a crash before that leaves the unit "not done",
which a rerun redoes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zarr

from neurotask.storage.atomic import fsync_path, write_json_atomic
from neurotask.storage.schema import PROGRESS_DIR
from neurotask.storage.store import StudyStore

STAGING_DIR = "staging-area"
STAGING_STORE = f"{STAGING_DIR}/store.zarr"
JOURNAL = "staging-journal.json"
TRASH = "staging-trash"


def staging_store(store: StudyStore) -> StudyStore:
    """The staging store beside ``store`` (created if missing): write new groups here."""
    path = store.path.parent / STAGING_STORE
    if not (path / "zarr.json").is_file():
        root = zarr.open_group(str(path), mode="a", zarr_format=3)
        # The study store's id, so that markers written here stay valid once moved there.
        root.attrs["store_id"] = store.store_id if store.exists() else uuid.uuid4().hex
        root.attrs["layout"] = "neurotask-1"
        StudyStore(path).consolidate()
    return StudyStore(path)


def discard(store: StudyStore) -> None:
    """Remove the staging store beside ``store`` (after a failed or finished overwrite).

    Kept while a journal exists: an interrupted swap still needs its staged group to roll forward."""
    if _journal_path(store).is_file():
        return
    shutil.rmtree(store.path.parent / STAGING_DIR, ignore_errors=True)


def _journal_path(store: StudyStore) -> Path:
    return store.path.parent / JOURNAL


def replace(store: StudyStore, groups: str | Sequence[str], *, drop_groups: Sequence[str] = (),
            clear_markers: Sequence[Sequence[str]] = (), move_markers: Sequence[Sequence[str]] = ()) -> None:
    """Swap the complete staged ``groups`` (in :func:`staging_store`) into ``store``, in one
    journaled step.

    ``drop_groups``: other groups of ``store`` that describe the old data (removed after the swap).
    ``clear_markers``: progress marker paths, as ``Progress`` parts (e.g. ``("fit", "CSI1")`` for a
    directory or ``("ingest", "CSI1")`` for one marker), deleted after the swap.
    ``move_markers``: marker directories written in the staging area (``staging_store(...).progress()``)
    that replace those of ``store`` with the groups.
    """
    groups = [groups] if isinstance(groups, str) else list(groups)
    staging_root = store.path.parent / STAGING_STORE
    for group in groups:
        if not (staging_root / group / "zarr.json").is_file():
            raise FileNotFoundError(f"no staged group {group} in {staging_root}")
    store.create()
    journal = {"groups": groups, "staging": str(staging_root),
               "trash": str(store.path.parent / TRASH / uuid.uuid4().hex),
               "drop_groups": list(drop_groups), "clear_markers": [list(m) for m in clear_markers],
               "move_markers": [list(m) for m in move_markers]}
    write_json_atomic(_journal_path(store), journal)
    _apply(store, journal)


def recover(store: StudyStore) -> bool:
    """Roll forward a swap interrupted by a crash; -> whether there was one. Idempotent."""
    path = _journal_path(store)
    if not path.is_file():
        return False
    _apply(store, json.loads(path.read_text()))
    return True


def _apply(store: StudyStore, journal: dict[str, Any]) -> None:
    """Carry out the journal's steps; each one skipped when already done."""
    staging_root, trash = Path(journal["staging"]), Path(journal["trash"])
    for i, group in enumerate(journal["groups"]):
        _ensure_parents(store, group)
        _swap_in(staging_root / group, store.path / group, trash / f"old-{i}")
    staged_progress = staging_root.parent / PROGRESS_DIR
    for i, parts in enumerate(journal.get("move_markers", [])):
        target = store.progress_dir.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        _swap_in(staged_progress.joinpath(*parts), target, trash / f"markers-{i}")
    for i, group in enumerate(journal["drop_groups"]):  # step 3
        d = store.path / group
        if d.is_dir():
            trash.mkdir(parents=True, exist_ok=True)
            os.rename(d, trash / f"drop-{i}")
            fsync_path(d.parent)
    progress = store.progress()
    for parts in journal["clear_markers"]:  # a marker directory, or one marker
        progress.clear(*parts)
        progress.unmark(*parts)
    store.consolidate()  # step 4
    shutil.rmtree(trash, ignore_errors=True)
    trash_root = trash.parent
    if trash_root.is_dir() and not any(trash_root.iterdir()):
        trash_root.rmdir()
    _journal_path(store).unlink(missing_ok=True)


def _swap_in(staged: Path, target: Path, old: Path) -> None:
    """Move ``target`` (if any) to ``old`` and ``staged`` to ``target``; each rename skipped
    when done already (a rolled-forward journal), and made durable before the journal goes."""
    if not staged.is_dir():
        return
    if target.is_dir() and not old.exists():  # step 1
        old.parent.mkdir(parents=True, exist_ok=True)
        os.rename(target, old)
    os.rename(staged, target)  # step 2
    fsync_path(target.parent)


def _ensure_parents(store: StudyStore, group: str) -> None:
    """The group's parent groups (e.g. ``responses``) exist in the store, as Zarr groups."""
    parent = group.rpartition("/")[0]
    if parent and not (store.path / parent / "zarr.json").is_file():
        zarr.open_group(str(store.path), path=parent, mode="a", zarr_format=3)

