"""Volume maps drawn with nilearn: axial slices over the subject's anatomy, ROI contours,
maximum-intensity projections and nilearn's interactive slice viewer.

Everything here takes volumes in the subject's functional grid (i, j, k) with its affine
(4, 4) and returns a matplotlib Figure (or writes an HTML file). Slices are placed and labelled
in mm (nilearn's cut coordinates, world space of the affine); nilearn's displays draw the
L/R marker. The overview is a maximum-intensity projection in the subject's own space and
*not* nilearn's glass brain: ``plot_glass_brain`` draws an MNI152 outline, which would be a
false landmark on native-space BOLD5000 grids (and on the published study's made-up affine).
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report never opens a window

import nibabel as nib
import numpy as np
from matplotlib import colormaps, colors
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from neurotask.pipeline.report.colormaps import contrast_rgba, legend_square

# no yellow, orange or red: those are the r maps' own colours
ROI_COLOURS = ["#00e5ff", "#76ff03", "#e040fb", "#2979ff", "#ffffff", "#1de9b6", "#ff80ab", "#b0bec5",
               "#40c4ff", "#eeff41"]
_ROW = 6  # axial cuts per row
_BG = 0.55  # brightest underlay grey: coloured voxels stay brighter than any anatomy


def nifti(volume: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A float32 image of volume (i, j, k), affine (4, 4)."""
    return nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=np.float64))


def underlay_volume(raw: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """The grey underlay in [0, 1]. raw (i, j, k) anatomy or mean betas (NaN: not measured), or
    None: the analysed-voxel ``mask`` (i, j, k) bool as a flat grey silhouette.

    Robust contrast (2nd-98th percentile); where raw is NaN outside the brain, measured voxels
    start at 0.25 so that the brain's outline stays visible against the black background."""
    if raw is None:
        return np.where(mask, 0.55, 0.0).astype(np.float32)
    raw = np.asarray(raw, dtype=np.float64)
    finite = np.isfinite(raw)
    if not finite.any():
        return np.where(mask, 0.55, 0.0).astype(np.float32)
    lo, hi = np.percentile(raw[finite], [2, 98])
    scaled = np.clip((np.nan_to_num(raw, nan=lo) - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    if not finite.all():
        scaled = 0.25 + 0.75 * scaled
    return np.where(finite, scaled, 0.0).astype(np.float32)


def canonical(volume: np.ndarray, affine: np.ndarray, resample: str = "nearest") -> tuple[np.ndarray, np.ndarray]:
    """The volume reordered so that its affine is diagonal and positive (i: left->right,
    j: posterior->anterior, k: inferior->superior). -> (volume, affine)."""
    img = nilearn_image().reorder_img(nifti(volume, affine), resample=resample, copy_header=True)
    return np.asarray(img.get_fdata(dtype=np.float32)), img.affine


def nilearn_image():
    from nilearn import image

    return image


def axial_cuts(mask: np.ndarray, affine: np.ndarray, n: int) -> list[float]:
    """n axial positions (z, mm) spread evenly through the mask's extent, inner 90%: the end
    slices of a brain hold few voxels. mask (i, j, k) bool."""
    ijk = np.argwhere(mask)
    if ijk.size == 0:
        return [float((affine @ np.r_[np.array(mask.shape) / 2, 1])[2])]
    z = (affine[:3, :3] @ ijk.T + affine[:3, 3:4])[2]
    lo, hi = np.percentile(z, [5, 95])
    step = abs(np.linalg.norm(affine[:3, 2])) or 1.0
    cuts = np.unique(np.round(np.linspace(lo, hi, max(1, n)) / step) * step)
    return [float(c) + 0.0 for c in cuts]  # + 0.0: no "z=-0" label


def _roi_legend(fig: Figure, rois: dict[str, np.ndarray], y: float) -> None:
    colours = roi_colours(rois)
    handles = [Line2D([], [], color=c, lw=1.6) for c in colours.values()]
    fig.legend(handles, list(colours), loc="lower center", bbox_to_anchor=(0.45, y), ncol=min(len(colours), 10),
               fontsize=7, frameon=False, labelcolor="white", handlelength=1.4, columnspacing=1.0,
               title="ROI outlines (both hemispheres)", title_fontsize=7).get_title().set_color("white")


def roi_colours(rois: dict[str, np.ndarray]) -> dict[str, str]:
    """One colour per ROI name without its hemisphere prefix (LHPPA and RHPPA alike)."""
    bases = list(dict.fromkeys(_base(n) for n in rois))
    return {b: ROI_COLOURS[i % len(ROI_COLOURS)] for i, b in enumerate(bases)}


def _base(name: str) -> str:
    return name[2:] if name[:2] in ("LH", "RH") and len(name) > 2 else name


def _contours(display, rois: dict[str, np.ndarray], affine: np.ndarray) -> None:
    colours = roi_colours(rois)
    for name, m in rois.items():
        if m.any():
            display.add_contours(nifti(m.astype(np.float32), affine), levels=[0.5],
                                 colors=[colours[_base(name)]], linewidths=0.9)


def _rows(cuts: list[float]) -> list[list[float]]:
    n_rows = -(-len(cuts) // _ROW)
    per = -(-len(cuts) // n_rows)
    return [cuts[i:i + per] for i in range(0, len(cuts), per)]


def _figure(n_rows: int, per_row: int, aspect: float, extra_bottom: float) -> tuple[Figure, float, float]:
    """A black figure for n_rows of per_row axial cuts; aspect: slice height / width.
    -> (figure, height of a row, bottom margin) in inches."""
    width = 11.0
    row_h = min(3.0, 0.86 * width / per_row * aspect + 0.2)
    bottom = 0.55 + extra_bottom
    fig = Figure(figsize=(width, n_rows * row_h + 0.45 + bottom), facecolor="black")
    return fig, row_h, bottom


def _axes_rows(fig: Figure, rows: list[list[float]], row_h: float, bottom: float, right: float = 0.88):
    """One axes per row; a shorter last row gets a proportionally narrower axes (same scale)."""
    h, n_rows, per = fig.get_figheight(), len(rows), len(rows[0])
    return [fig.add_axes((0.01, (bottom + (n_rows - 1 - r) * row_h) / h, (right - 0.01) * len(row) / per, row_h / h))
            for r, row in enumerate(rows)]


def _title(fig: Figure, title: str) -> None:
    fig.suptitle(title, color="white", fontsize=11, y=1 - 0.08 / fig.get_figheight(), va="top")


def _cmap(cmap: str | colors.Colormap) -> colors.Colormap:
    return colormaps[cmap] if isinstance(cmap, str) else cmap


def _colorbar(fig: Figure, cmap, vmin: float, vmax: float, label: str, bottom: float) -> None:
    h = fig.get_figheight()
    cax = fig.add_axes((0.905, bottom / h, 0.015, 1 - (bottom + 0.5) / h))
    cb = fig.colorbar(matplotlib.cm.ScalarMappable(colors.Normalize(vmin, vmax), _cmap(cmap)), cax=cax)
    cb.set_label(label, color="white", fontsize=8)
    cb.ax.tick_params(colors="white", labelsize=7)
    cb.outline.set_edgecolor("0.6")


def _slice_aspect(mask: np.ndarray, affine: np.ndarray) -> float:
    vox = np.sqrt((affine[:3, :3] ** 2).sum(0))
    ijk = np.argwhere(mask)
    ext = (ijk.max(0) - ijk.min(0) + 1) * vox if ijk.size else np.array(mask.shape) * vox
    return float(ext[1] / ext[0])


def stat_mosaic(stat: np.ndarray, underlay: np.ndarray, affine: np.ndarray, rois: dict[str, np.ndarray], *,
                cuts: list[float], title: str, cmap: str, vmin: float, vmax: float, threshold: float,
                colorbar_label: str, mask: np.ndarray) -> Figure:
    """Axial slices (z in mm, ``cuts``) of ``stat`` (i, j, k; NaN or |value| < threshold not
    drawn) over ``underlay`` (i, j, k in [0, 1]), ROI contours of ``rois`` (name -> bool
    (i, j, k)) with a legend. Diverging maps: vmin = -vmax."""
    from nilearn import plotting

    rows = _rows(cuts)
    fig, row_h, bottom = _figure(len(rows), len(rows[0]), _slice_aspect(mask, affine), 0.3 if rois else 0.0)
    stat_img = nifti(np.nan_to_num(stat, nan=0.0), affine)
    bg = nifti(underlay, affine)
    symmetric = vmin < 0
    for ax, row in zip(_axes_rows(fig, rows, row_h, bottom), rows):
        display = plotting.plot_stat_map(
            stat_img, bg_img=bg, cut_coords=row, display_mode="z", figure=fig, axes=ax, colorbar=False,
            threshold=threshold, cmap=cmap, vmin=vmin if not symmetric else None, vmax=vmax,
            symmetric_cbar=symmetric, black_bg=True, draw_cross=False, annotate=True, dim=0.0,
            resampling_interpolation="nearest")
        _bg_range(display)
        _contours(display, rois, affine)
    _title(fig, title)
    _colorbar(fig, cmap, vmin, vmax, colorbar_label, bottom)
    if rois:
        _roi_legend(fig, rois, 0.02 / fig.get_figheight())
    return fig


def _bg_range(display) -> None:
    """Fix the underlay's grey scale to [0, 1 / _BG] so the brightest anatomy is _BG grey."""
    for cut in display.axes.values():
        for im in cut.ax.get_images():
            if im.get_cmap().name == "gray":  # nilearn's underlay (the first image is a placeholder)
                im.set_clim(0.0, 1.0 / _BG)
                break


def contrast_mosaic(r3d: np.ndarray, r2d: np.ndarray, underlay: np.ndarray, affine: np.ndarray,
                    rois: dict[str, np.ndarray], *, cuts: list[float], title: str, vmax: float,
                    labels: tuple[str, str], mask: np.ndarray) -> Figure:
    """Figure 3 in the paper's 2-D colour map: axial slices (z in mm) of r3d and r2d (i, j, k;
    NaN: not drawn) coloured by :func:`colormaps.contrast_rgba` over the underlay, ROI
    contours, and the colour square as legend. The underlay and the cuts are nilearn's; the
    RGBA layer is drawn on nilearn's axes in their mm coordinates (nilearn has no RGB overlay)."""
    from nilearn import plotting

    rows = _rows(cuts)
    fig, row_h, bottom = _figure(len(rows), len(rows[0]), _slice_aspect(mask, affine), 0.3 if rois else 0.0)
    c3, aff = canonical(np.nan_to_num(r3d, nan=0.0), affine)
    c2, _ = canonical(np.nan_to_num(r2d, nan=0.0), affine)
    rgba = contrast_rgba(c3, c2, vmax)
    step = np.diag(aff)[:3]
    bg = nifti(underlay, affine)
    for ax, row in zip(_axes_rows(fig, rows, row_h, bottom, right=0.86), rows):
        display = plotting.plot_img(bg, cut_coords=row, display_mode="z", figure=fig, axes=ax, colorbar=False,
                                    cmap="gray", black_bg=True, draw_cross=False, annotate=True,
                                    resampling_interpolation="nearest", vmin=0.0, vmax=1.0 / _BG)
        for z, cut in display.axes.items():
            k = int(round((z - aff[2, 3]) / step[2]))
            if not 0 <= k < rgba.shape[2]:
                continue
            x0, y0 = aff[0, 3] - step[0] / 2, aff[1, 3] - step[1] / 2
            extent = (x0, x0 + step[0] * rgba.shape[0], y0, y0 + step[1] * rgba.shape[1])
            # imshow rows are y, columns x: the slice (i=x, j=y) transposed, origin at the bottom
            limits = cut.ax.get_xlim(), cut.ax.get_ylim()
            cut.ax.imshow(rgba[:, :, k].transpose(1, 0, 2), origin="lower", extent=extent,
                          interpolation="nearest", zorder=5)
            cut.ax.set_xlim(limits[0])  # imshow would widen the view to the whole grid
            cut.ax.set_ylim(limits[1])
        _contours(display, rois, affine)
    _title(fig, title)
    h = fig.get_figheight()
    side = min(1.1, 0.8 * (h - bottom - 0.5))
    sq = fig.add_axes((0.885, (bottom + 0.35) / h, side / fig.get_figwidth(), side / h))
    legend_square(sq, vmax, f"r {labels[0]}", f"r {labels[1]}")
    sq.tick_params(colors="white")
    sq.xaxis.label.set_color("white")
    sq.yaxis.label.set_color("white")
    if rois:
        _roi_legend(fig, rois, 0.02 / h)
    return fig


def projections(stat: np.ndarray, mask: np.ndarray, affine: np.ndarray, *, title: str, cmap: str,
                vmin: float, vmax: float, colorbar_label: str) -> Figure:
    """Maximum-intensity projections (largest |value| along each axis) of ``stat`` (i, j, k;
    NaN: not drawn) in the subject's own space: sagittal, coronal and axial views in mm, the
    analysed voxels' projection as a grey silhouette, L/R and A/P marked."""
    data, aff = canonical(np.nan_to_num(stat, nan=0.0), affine)
    sil, _ = canonical(mask.astype(np.float32), affine)
    step, origin = np.diag(aff)[:3], aff[:3, 3]
    lo, hi = origin - step / 2, origin + step * (np.array(data.shape) - 0.5)
    views = [("sagittal", 0, (1, 2), ("P", "A")), ("coronal", 1, (0, 2), ("L", "R")),
             ("axial", 2, (0, 1), ("L", "R"))]
    widths = [hi[a] - lo[a] for _, _, (a, _b), _ in views]
    heights = [hi[b] - lo[b] for _, _, (_a, b), _ in views]
    fig = Figure(figsize=(11.0, 11.0 * max(heights) / sum(widths) * 1.05 + 0.9), facecolor="black")
    gs = fig.add_gridspec(1, 4, width_ratios=[*widths, 0.025 * sum(widths)], left=0.04, right=0.93, bottom=0.08,
                          top=0.86, wspace=0.3)
    norm = colors.Normalize(vmin, vmax)
    for n, (name, axis, (a, b), (neg, pos)) in enumerate(views):
        ax = fig.add_subplot(gs[0, n])
        idx = np.argmax(np.abs(data), axis=axis)
        mip = np.take_along_axis(data, np.expand_dims(idx, axis), axis).squeeze(axis)
        shown = np.ma.masked_where(np.abs(mip) == 0, mip)
        ax.imshow(sil.max(axis=axis).T, origin="lower", cmap="gray", vmin=0, vmax=2.2,
                  extent=(lo[a], hi[a], lo[b], hi[b]), interpolation="nearest")
        ax.imshow(shown.T, origin="lower", cmap=_cmap(cmap), norm=norm, extent=(lo[a], hi[a], lo[b], hi[b]),
                  interpolation="nearest")
        ax.set_title(name, color="white", fontsize=9)
        ax.set_facecolor("black")
        ax.tick_params(colors="0.8", labelsize=7)
        for sp in ax.spines.values():
            sp.set_color("0.4")
        ax.set_xlabel(f"{'yxx'[n]} (mm)", color="0.8", fontsize=8)
        ax.set_ylabel(f"{'zzy'[n]} (mm)", color="0.8", fontsize=8)
        for side, text in ((0.02, neg), (0.98, pos)):
            ax.text(side, 0.97, text, transform=ax.transAxes, color="white", fontsize=10, fontweight="bold",
                    ha="left" if side < 0.5 else "right", va="top")
    cax = fig.add_subplot(gs[0, 3])
    cb = fig.colorbar(matplotlib.cm.ScalarMappable(norm, _cmap(cmap)), cax=cax)
    cb.set_label(colorbar_label, color="white", fontsize=8)
    cb.ax.tick_params(colors="white", labelsize=7)
    fig.suptitle(title, color="white", fontsize=11)
    return fig


_EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


def external_references(html: str) -> list[str]:
    """Attributes of ``html`` that load from the network (src/href to http(s):// or //)."""
    unescaped = html.replace("&quot;", '"').replace("&#x27;", "'")
    return [unescaped[m.start():m.end() + 60] for m in _EXTERNAL.finditer(unescaped)]


def interactive_view(stat: np.ndarray, underlay: np.ndarray, affine: np.ndarray, path: Path, *, title: str,
                     cmap: str, vmax: float, threshold: float, symmetric: bool) -> Path:
    """nilearn's slice viewer (``view_img``) of ``stat`` (i, j, k; NaN not drawn) over
    ``underlay``, written as one self-contained HTML page at ``path``.

    nilearn inlines its JavaScript (jQuery, brainsprite) and the images as data URIs; its page
    template's only network reference is a favicon on GitHub, removed here so that the page
    loads nothing from the network (checked: ValueError otherwise)."""
    from nilearn import plotting

    # nilearn stretches the underlay to its own range (a flat silhouette turns white or, dimmed,
    # black): one corner voxel at full scale pins the range, so the brain shows at most _BG grey
    bg = np.asarray(underlay, dtype=np.float32) * _BG
    bg[0, 0, 0] = 1.0
    view = plotting.view_img(
        nifti(np.nan_to_num(stat, nan=0.0), affine), bg_img=nifti(bg, affine), threshold=threshold,
        cmap=cmap, vmax=vmax, symmetric_cmap=symmetric, title=title, black_bg=True, draw_cross=False,
        resampling_interpolation="nearest", dim=0, vmin=None if symmetric else 0.0)
    html = re.sub(r"<link[^>]*rel=\"icon\"[^>]*>", "", view.get_standalone(), flags=re.S)
    remaining = external_references(html)
    if remaining:
        raise ValueError(f"nilearn's viewer refers to the network: {remaining[:3]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
