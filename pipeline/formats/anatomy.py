"""A subject's anatomical image (T1w, or a mean EPI) brought into its functional grid.

BOLD5000 ships T1w images at 1 mm; the betas are at 2 mm in another field of view. The report
draws its maps over the anatomy *in the functional grid*, so the image is resampled (nilearn,
continuous interpolation) whenever its affine or shape differ from the betas'. A 4-D image
(an EPI run) is averaged over time first. Paths in, arrays out.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


class AnatomyFileError(ValueError):
    """The anatomy file cannot be read or is not a 3-D/4-D image."""


def check_anatomy_header(path: Path) -> tuple[int, ...]:
    """The image's shape from its header alone; raises AnatomyFileError naming the file."""
    try:
        shape = tuple(int(x) for x in nib.load(str(path)).shape)
    except Exception as e:  # nibabel raises many types for a file that is not an image
        raise AnatomyFileError(f"{path}: not a readable NIfTI image ({e})") from e
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] < 1):
        raise AnatomyFileError(f"{path}: an anatomy must be a 3-D image (or a 4-D EPI to average), "
                               f"its shape is {shape}")
    return shape


def anatomy_in_grid(path: Path, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """The image at ``path`` in the functional grid. -> (i, j, k) float32 of ``shape``.

    Resampled with nilearn (continuous) when the image's affine or shape differ from
    ``affine`` (4, 4) / ``shape``; voxels outside the image's field of view are NaN."""
    check_anatomy_header(path)
    img = nib.load(str(path))
    if len(img.shape) == 4:
        from nilearn.image import mean_img

        img = mean_img(img, copy_header=True)
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(x) for x in shape)
    if tuple(img.shape[:3]) == shape and np.allclose(img.affine, affine, atol=1e-4):
        return np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    from nilearn.image import resample_img

    data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    # NaN-aware: a field of view that does not cover the grid leaves NaN, not a fake 0.
    filled = nib.Nifti1Image(np.nan_to_num(data), img.affine)
    inside = nib.Nifti1Image(np.isfinite(data).astype(np.float32), img.affine)
    kw = dict(target_affine=affine, target_shape=shape, force_resample=True, copy_header=True)
    out = resample_img(filled, interpolation="continuous", fill_value=0.0, **kw).get_fdata(dtype=np.float32)
    cover = resample_img(inside, interpolation="nearest", fill_value=0.0, **kw).get_fdata(dtype=np.float32)
    return np.where(cover > 0.5, out, np.nan).astype(np.float32)
