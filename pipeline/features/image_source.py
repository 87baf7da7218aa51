"""Where featurize reads the study's images: image files (BOLD5000) or NSD's ``imgBrick``.

A source is built and checked once, on the driver, before any work; it hands each Dask batch
task a small picklable batch object, and the task's ``read`` gives what
``preprocess.decode_images`` gives: a list of (H, W, 3) uint8 RGB arrays, C-contiguous and
writable, in the batch's order, or a ``BadImagesError`` naming every image that cannot be used.

- ``ImageFiles``: one file per image (``images.find_images``); a batch carries its paths and
  is decoded by ``decode_images`` (greyscale, palette, CMYK converted as the task bank did).
- ``ImageBrick``: NSD's ``nsd_stimuli.hdf5``, dataset ``imgBrick`` (73000, 425, 425, 3) uint8,
  row = 1-based 73k id - 1 (image names ``nsd73k_<id>``, ``formats.nsd``). A batch carries the
  file's path and its rows, never an h5py handle (it does not pickle, and each worker process
  opens the file itself, read-only); it reads only its rows (h5py's fancy indexing wants
  increasing, distinct indices: sorted, read, put back in the batch's order), so memory is
  bounded by the batch and the 73,000 images are never extracted to files.

``check_brick`` is the up-front check of a brick (every problem at once): the file exists and
is HDF5, holds ``imgBrick``, uint8 of shape (N, H, W, 3), every study id within its N rows, and
H, W at least ``features.min_image_side`` (the rule image files are held to).

Fingerprints: image files are identified by the images' names alone (the stored features'
``featurize`` attribute, as before); a brick adds its file name, dataset, shape and dtype
(``source``), so features made from another brick (say a downsampled one) are not resumed into.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from neurotask.pipeline.features.preprocess import BadImagesError, decode_images
from neurotask.pipeline.formats import nsd

BRICK_DATASET = "imgBrick"
_SHOWN = 10  # ids listed in a message before "... and N more"


class ImageBatch(Protocol):
    """What one Dask batch task gets: small, picklable; ``read`` does the I/O on the worker."""

    def read(self, names: Sequence[str], min_side: int) -> list[np.ndarray]:
        """The batch's images (B, each (H, W, 3) uint8); BadImagesError lists every bad one."""
        ...


class ImageSource(Protocol):
    """The study's images, checked: hands out one ``ImageBatch`` per batch of names. (Not
    ``preprocess.ImageSource``, which is one image's path or bytes.)"""

    def batch(self, names: Sequence[str]) -> ImageBatch: ...

    def fingerprint(self) -> dict[str, Any] | None:
        """What identifies the source in the stored features' attributes (None: the names)."""
        ...


# --------------------------------------------------------------------------- image files


@dataclass(frozen=True)
class FileBatch:
    """One batch's image files, decoded on the worker."""

    paths: tuple[str, ...]

    def read(self, names: Sequence[str], min_side: int) -> list[np.ndarray]:
        return decode_images(self.paths, names, min_side)


@dataclass(frozen=True)
class ImageFiles:
    """Image files by name (BOLD5000's Presented_Stimuli)."""

    paths: dict[str, str]

    def batch(self, names: Sequence[str]) -> FileBatch:
        return FileBatch(tuple(self.paths[n] for n in names))

    def fingerprint(self) -> None:
        return None


# --------------------------------------------------------------------------- NSD's imgBrick


def brick_rows(names: Sequence[str]) -> np.ndarray:
    """imgBrick rows (0-based) of NSD image names (``nsd73k_<1-based id>``). -> (n,) int64."""
    return np.array([nsd.image_id(n) - 1 for n in names], dtype=np.int64)


def read_brick_rows(path: str | Path, rows: Sequence[int], dataset: str = BRICK_DATASET) -> np.ndarray:
    """Rows of an HDF5 image brick, in the order asked (repeats allowed).

    rows: (n,) 0-based row indices. Returns (n, H, W, 3) uint8. Reads each distinct row once,
    in increasing order (what h5py's fancy indexing accepts), and nothing else."""
    h5py = nsd._h5py()
    rows = np.asarray(rows, dtype=np.int64)
    uniq, inverse = np.unique(rows, return_inverse=True)
    with h5py.File(str(path), "r") as f:
        block = f[dataset][uniq] if uniq.size else np.zeros((0, *f[dataset].shape[1:]), f[dataset].dtype)
    return block[inverse.reshape(-1)]


def read_brick_images(path: str | Path, rows: Sequence[int], names: Sequence[str],
                      dataset: str = BRICK_DATASET) -> list[np.ndarray]:
    """The named images of a brick as ``decode_images`` returns images: a list of (H, W, 3)
    uint8 C-contiguous writable arrays. A read error (a corrupt chunk) is retried row by row,
    and the rows that still fail are raised together as BadImagesError by name."""
    if len(rows) != len(names):
        raise ValueError(f"{len(rows)} rows but {len(names)} names")
    try:
        block = read_brick_rows(path, rows, dataset)
        return [np.array(img, dtype=np.uint8, order="C") for img in block]
    except OSError:
        pass  # find which rows: one at a time
    images: list[np.ndarray] = []
    failures: dict[str, str] = {}
    for row, name in zip(rows, names):
        try:
            images.append(np.array(read_brick_rows(path, [row], dataset)[0], dtype=np.uint8, order="C"))
        except OSError as e:
            failures[name] = f"unreadable row {int(row)} of {dataset} in {path} ({type(e).__name__}: {e})"
    if failures:
        raise BadImagesError(failures)
    return images


@dataclass(frozen=True)
class BrickBatch:
    """One batch's rows of the brick: the path travels, the worker opens the file."""

    path: str
    rows: tuple[int, ...]
    dataset: str = BRICK_DATASET

    def read(self, names: Sequence[str], min_side: int) -> list[np.ndarray]:
        # min_side: every row has the brick's shape, checked once by check_brick
        return read_brick_images(self.path, self.rows, names, self.dataset)


@dataclass(frozen=True)
class ImageBrick:
    """A checked image brick: NSD's nsd_stimuli.hdf5 (see the module docstring)."""

    path: str
    shape: tuple[int, ...]  # (N, H, W, 3)
    dtype: str
    dataset: str = BRICK_DATASET

    def batch(self, names: Sequence[str]) -> BrickBatch:
        return BrickBatch(self.path, tuple(int(r) for r in brick_rows(names)), self.dataset)

    def fingerprint(self) -> dict[str, Any]:
        # The file's name, not its directory: a moved download resumes; another brick does not.
        return {"kind": "hdf5_brick", "file": Path(self.path).name, "dataset": self.dataset,
                "shape": list(self.shape), "dtype": self.dtype}


def _ids_listing(ids: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:_SHOWN])
    return shown + (f" ... and {ids.size - _SHOWN} more" if ids.size > _SHOWN else "")


def brick_header(path: str | Path, dataset: str = BRICK_DATASET) -> tuple[tuple[int, ...], str] | str:
    """(shape, dtype) of the brick's dataset from the file's header, or a message saying why
    it cannot be read (missing file, not HDF5, no such dataset)."""
    path = Path(path)
    if not path.is_file():
        return f"stimulus file not found: {path} (data.nsd.stimuli; NSD's nsd_stimuli.hdf5)"
    try:
        h5py = nsd._h5py()
    except Exception as e:  # DataError: h5py missing
        return str(e)
    try:
        with h5py.File(str(path), "r") as f:
            if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
                held = ", ".join(f.keys()) or "nothing"
                return f"{path}: no dataset '{dataset}' (it holds {held}); NSD's stimuli are in '{dataset}'"
            ds = f[dataset]
            return tuple(int(s) for s in ds.shape), str(ds.dtype)
    except OSError as e:
        return f"cannot open {path} as HDF5 (corrupt or truncated?): {e}"


def check_brick(path: str | Path, names: Sequence[str], min_side: int,
                dataset: str = BRICK_DATASET) -> tuple[ImageBrick | None, list[str]]:
    """The brick the named images are read from, checked from its header only.

    names: the study's image names (``nsd73k_<1-based 73k id>``); min_side: the smallest image
    side the encoders accept (features.min_image_side). Returns (the brick, []) or (None, every
    problem found)."""
    header = brick_header(path, dataset)
    if isinstance(header, str):
        return None, [header]
    shape, dtype = header
    where = f"{path}: {dataset}"
    problems = []
    if dtype != "uint8":
        problems.append(f"{where} holds {dtype} values; expected uint8 RGB (NSD: (73000, 425, 425, 3) uint8)")
    if len(shape) != 4 or shape[3] != 3:
        problems.append(f"{where} has shape {shape}; expected (images, height, width, 3) "
                        "(NSD: (73000, 425, 425, 3))")
    else:
        if min(shape[1], shape[2]) < min_side:
            problems.append(f"{where}: its images are {shape[2]}x{shape[1]} pixels, too small: the minimum side "
                            f"is {min_side} (features.min_image_side)")
    if len(shape) >= 1:
        rows = brick_rows(names)
        beyond = np.unique(rows[(rows < 0) | (rows >= shape[0])]) + 1
        if beyond.size:
            problems.append(f"{where} has {shape[0]} rows (73k ids 1 .. {shape[0]}); {beyond.size} of the study's "
                            f"{len(names)} images are beyond them, 73k ids: {_ids_listing(beyond)}")
    if problems:
        return None, problems
    return ImageBrick(str(path), shape, dtype, dataset), []


__all__ = ["BRICK_DATASET", "BrickBatch", "FileBatch", "ImageBatch", "ImageBrick", "ImageFiles", "ImageSource",
           "brick_header", "brick_rows", "check_brick", "read_brick_images", "read_brick_rows"]
