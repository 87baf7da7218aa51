"""The 2-D colour map of Figure 3 (as in Neural Taskonomy's flatmaps): one colour per voxel from
two correlations, r of a 3D task (x) and r of its 2D partner (y).

Hue says which task predicts better, brightness and opacity how well the better one does:

* red where the 3D task predicts well and the 2D task does not, blue the reverse;
* white where both predict equally well (grey where both predict equally, moderately);
* transparent where neither predicts (r <= 0): the anatomy below shows through; opacity rises
  as the square root of the better r, so that moderately predicted voxels stand out.

The hue follows the *relative* difference ``(a - b) / max(a, b)`` of the two normalised r,
so a voxel with r 0.30 against 0.20 is clearly pink even though the difference is small
against the map's range: a plain diverging map of ``r3d - r2d`` leaves it a pale dot.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.axes import Axes

RED = np.array([1.0, 0.12, 0.08])  # 3D better
BLUE = np.array([0.10, 0.45, 1.0])  # 2D better (lighter than pure blue: visible over a dark underlay)
WHITE = np.array([1.0, 1.0, 1.0])


def contrast_rgba(r3d: np.ndarray, r2d: np.ndarray, vmax: float) -> np.ndarray:
    """The colour of each voxel. r3d, r2d (...) same shape; vmax > 0: r drawn at full
    brightness. -> (..., 4) float RGBA in [0, 1]; alpha 0 where both r are NaN or <= 0.

    With a = clip(r3d / vmax, 0, 1), b = clip(r2d / vmax, 0, 1), v = max(a, b) and
    s = (a - b) / v: colour = (1 - |s|) WHITE + max(s, 0) RED + max(-s, 0) BLUE,
    alpha = sqrt(v) (NaN counts as 0). Not premultiplied: over black the voxel shows as v * colour."""
    if not vmax > 0:
        raise ValueError(f"vmax must be > 0, got {vmax!r}")
    x = np.nan_to_num(np.asarray(r3d, dtype=np.float64), nan=0.0)
    y = np.nan_to_num(np.asarray(r2d, dtype=np.float64), nan=0.0)
    if x.shape != y.shape:
        raise ValueError(f"r3d and r2d must have one shape, got {x.shape} and {y.shape}")
    a, b = np.clip(x / vmax, 0, 1), np.clip(y / vmax, 0, 1)
    v = np.maximum(a, b)
    s = np.divide(a - b, v, out=np.zeros_like(v), where=v > 0)
    rgb = ((1 - np.abs(s))[..., None] * WHITE + np.maximum(s, 0)[..., None] * RED
           + np.maximum(-s, 0)[..., None] * BLUE)
    return np.concatenate([rgb, np.sqrt(v)[..., None]], axis=-1)


def legend_square(ax: Axes, vmax: float, xlabel: str, ylabel: str, *, n: int = 64,
                  background: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
    """The colour square: every (r3d, r2d) in [0, vmax]^2 as :func:`contrast_rgba` draws it,
    composited over ``background`` (the underlay's darkest grey), with labelled axes."""
    g = np.linspace(0, vmax, n)
    x, y = np.meshgrid(g, g)  # x: r3d (columns), y: r2d (rows, bottom up with origin lower)
    rgba = contrast_rgba(x, y, vmax)
    rgb = rgba[..., 3:] * rgba[..., :3] + (1 - rgba[..., 3:]) * np.asarray(background)
    ax.imshow(np.clip(rgb, 0, 1), origin="lower", extent=(0, vmax, 0, vmax), interpolation="bilinear")
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.set_xticks([0, vmax])
    ax.set_yticks([0, vmax])
    ax.set_xticklabels(["0", f"{vmax:.2f}"], fontsize=6)
    ax.set_yticklabels(["0", f"{vmax:.2f}"], fontsize=6)
    ax.plot([0, vmax], [0, vmax], color="0.5", lw=0.5, ls=":")
    ax.set_aspect("equal")


def significant_r_cmap() -> colors.Colormap:
    """Figure 2's colour map: matplotlib's 'hot' without its black end (dark red at r = 0 up to
    pale yellow), so that weak significant voxels stay visible over a grey underlay."""
    return colors.ListedColormap(colormaps["hot"](np.linspace(0.22, 0.92, 256)), name="hot_visible")
