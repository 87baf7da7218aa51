"""Voxel <-> volume mapping and NIfTI export of per-voxel values (nibabel)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def to_volume(values: np.ndarray, ijk: np.ndarray, shape: tuple[int, int, int], fill: float = np.nan) -> np.ndarray:
    """Scatter per-voxel values into a volume. values (v,) or (v, t); ijk (v, 3) -> shape (+ (t,))."""
    values = np.asarray(values)
    ijk = np.asarray(ijk, dtype=np.int64)
    out = np.full(tuple(shape) + values.shape[1:], fill, dtype=np.result_type(values.dtype, np.float32))
    out[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = values
    return out


def mask_to_ijk(mask: np.ndarray, order: str = "ijk") -> np.ndarray:
    """Indices (v, 3) of a boolean volume's voxels.

    order 'ijk': C order over the NIfTI array axes (i slowest). 'authors_zyx': the Neural Taskonomy
    authors' cortical order, ``vol_zyx[mask_zyx]`` with vol_zyx = vol.transpose(2, 1, 0), i.e. C
    order over (z, y, x) with x fastest.
    """
    mask = np.asarray(mask, dtype=bool)
    if order == "ijk":
        return np.argwhere(mask)
    if order == "authors_zyx":
        kji = np.argwhere(mask.transpose(2, 1, 0))
        return kji[:, ::-1].copy()
    raise ValueError(f"unknown voxel order {order!r}; use 'ijk' or 'authors_zyx'")


def save_nifti(path: str | Path, volume: np.ndarray, affine: np.ndarray) -> Path:
    """Write a volume as NIfTI-1 (float32), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    nib.save(img, str(path))
    return path
