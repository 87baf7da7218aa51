"""Readers of BOLD5000's files as users download them.

Stimulus lists (release 1.0 ``CSI0{n}_stim_lists.txt``): one image file name per trial in
presentation order; every showing of a repeated image but one carries a ``rep_`` prefix.
GLMsingle betas (release 2.0): one 4D NIfTI per session, (x, y, z, trial) float32, NaN outside
the brain; ROI masks ``sub-CSI{n}_mask-{LH,RH}{ROI}.nii.gz``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.errors import DataError

REP_PREFIX = "rep_"


@dataclass(frozen=True)
class StimList:
    """images (n_trials,) image names without prefix; is_rep (n_trials,) bool: a ``rep_`` line."""

    images: np.ndarray
    is_rep: np.ndarray
    path: Path

    @property
    def n_trials(self) -> int:
        return int(self.images.size)


def read_stim_list(path: str | Path) -> StimList:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"stimulus list not found: {path}")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DataError(f"stimulus list is empty: {path}")
    is_rep = np.array([ln.startswith(REP_PREFIX) for ln in lines])
    images = np.array([ln[len(REP_PREFIX):] if r else ln for ln, r in zip(lines, is_rep)], dtype=object)
    return StimList(images=images, is_rep=is_rep, path=path)


def image_trials(stim: StimList, policy: str) -> tuple[list[str], list[np.ndarray]]:
    """Which trials make each image's response.

    policy 'exclude' (the paper's): the one unprefixed showing of each image, in presentation
    order. 'average': all showings of each image, images in order of first showing.
    Returns (image names (m,), trial indices per image (m,) of (k_i,) int arrays).
    """
    if policy == "exclude":
        keep = np.flatnonzero(~stim.is_rep)
        names = stim.images[keep]
        uniq, counts = np.unique(names, return_counts=True)
        if (counts > 1).any():
            raise DataError(f"{stim.path}: image {uniq[counts > 1][0]!r} has {counts.max()} showings without the "
                            f"'{REP_PREFIX}' prefix; exactly one is expected")
        missing = sorted(set(stim.images[stim.is_rep]) - set(names))
        if missing:
            raise DataError(f"{stim.path}: image {missing[0]!r} appears only with the '{REP_PREFIX}' prefix")
        return [str(n) for n in names], [np.array([t]) for t in keep]
    if policy == "average":
        order: dict[str, list[int]] = {}
        for t, name in enumerate(stim.images):
            order.setdefault(str(name), []).append(t)
        return list(order), [np.array(ts) for ts in order.values()]
    raise ValueError(f"unknown repeats policy {policy!r}; use 'exclude' or 'average'")


def repeated_trials(stim: StimList) -> tuple[list[str], np.ndarray]:
    """Images shown more than once and their trials, padded with -1.

    -> (names (r,), trials (max_showings, r) int, -1 where an image had fewer showings).
    """
    groups: dict[str, list[int]] = {}
    for t, name in enumerate(stim.images):
        groups.setdefault(str(name), []).append(t)
    reps = {k: v for k, v in groups.items() if len(v) > 1}
    k = max((len(v) for v in reps.values()), default=0)
    trials = np.full((k, len(reps)), -1, dtype=np.int64)
    for j, ts in enumerate(reps.values()):
        trials[: len(ts), j] = ts
    return list(reps), trials


def nifti_shape(path: str | Path) -> tuple[int, ...]:
    """Shape from the header only (no data read)."""
    try:
        return tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as e:  # nibabel raises several types for corrupt files
        raise DataError(f"cannot read NIfTI header of {path}: {e}") from None


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI image's data (as stored, float32 for betas) and affine."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:
        raise DataError(f"cannot read NIfTI {path}: {e}") from None
    return data, img.affine


def load_mask(path: str | Path, shape: tuple[int, int, int]) -> np.ndarray:
    """A binary mask volume; its grid must be ``shape``."""
    data, _ = load_volume(path)
    if data.shape[:3] != tuple(shape) or (data.ndim == 4 and data.shape[3] != 1) or data.ndim > 4:
        raise DataError(f"mask {path} has shape {data.shape}, the betas' grid is {tuple(shape)}")
    data = data.reshape(shape)
    if not np.isfinite(data).all():
        raise DataError(f"mask {path} contains NaN values")
    return data > 0
