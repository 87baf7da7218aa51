"""Flatmaps drawn with pycortex, as in Neural Taskonomy: Figures 2 and 4 as ``cortex.Volume``
flatmaps, Figure 3 in the 2-D colour map of :mod:`report.colormaps` (a ``cortex.VolumeRGB``
whose colours and opacity are that map's; pycortex's own 2-D colour maps are image files with
other hues).

Headless: the data layer needs neither an X server nor inkscape. pycortex rasterises its ROI,
label and sulcus overlays (``overlays.svg``) with inkscape, so those are drawn only when
inkscape is on PATH. The first flatmap of a subject builds pycortex's flatmap cache in its
filestore (about a minute); later ones take well under a second.

Volumes cross into pycortex in its own axis order: pycortex arrays are (z, y, x), the
reverse of the NIfTI (i, j, k) order of our volumes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure

from neurotask.pipeline.errors import ConfigError
from neurotask.pipeline.report.colormaps import contrast_rgba, legend_square, significant_r_cmap


def _cortex():
    try:
        import cortex
    except ImportError as e:
        raise ConfigError("report.pycortex: flatmaps need pycortex (pip install 'neurotask[flatmaps]')") from e
    return cortex


@dataclass
class FlatmapTarget:
    """A pycortex subject and transform; ``shape`` is the transform's functional volume (i, j, k)."""

    subject: str
    transform: str
    filestore: str
    shape: tuple[int, int, int]

    @classmethod
    def open(cls, subject: str, transform: str, filestore: Path | None = None) -> FlatmapTarget:
        """Check that pycortex knows ``subject`` and its ``transform`` (in ``filestore``, or
        pycortex's configured database); ConfigError naming what is missing otherwise."""
        cortex = _cortex()
        if filestore is not None:
            if not Path(filestore).is_dir():
                raise ConfigError(f"report.pycortex.filestore: no such folder {filestore}")
            # one Database object is shared by every pycortex module: point it at this store
            cortex.db.filestore = str(filestore)
            cortex.db._subjects = None
        store = Path(cortex.db.filestore)
        subjects = sorted(p.name for p in store.iterdir() if (p / "surfaces").is_dir()) if store.is_dir() else []
        if subject not in subjects:
            raise ConfigError(f"report.pycortex.subject {subject!r} is not in the pycortex database {store} "
                              f"(subjects there: {', '.join(subjects) or 'none'})")
        transforms = sorted(p.name for p in (store / subject / "transforms").iterdir()
                            if (p / "matrices.xfm").is_file()) if (store / subject / "transforms").is_dir() else []
        if transform not in transforms:
            raise ConfigError(f"report.pycortex.transform {transform!r} is not a transform of pycortex subject "
                              f"{subject} in {store} (transforms: {', '.join(transforms) or 'none'})")
        zyx = tuple(int(x) for x in cortex.db.get_xfm(subject, transform).shape)
        return cls(subject, transform, str(store), zyx[::-1])

    def check(self, subject: str, shape: tuple[int, ...]) -> None:
        """ConfigError unless a subject's results (volume ``shape``, i, j, k) fit this transform."""
        if tuple(shape) != self.shape:
            raise ConfigError(f"report.pycortex: transform {self.transform!r} of pycortex subject {self.subject} "
                              f"maps a volume of shape {self.shape}, but {subject}'s results have volume_shape "
                              f"{tuple(shape)}")

    def zyx(self, volume: np.ndarray) -> np.ndarray:
        """(i, j, k) -> pycortex's (z, y, x) order."""
        return np.ascontiguousarray(np.asarray(volume).transpose(2, 1, 0))


def _overlays() -> dict[str, bool]:
    ink = shutil.which("inkscape") is not None
    return {"with_rois": ink, "with_labels": ink, "with_sulci": False}


def _finish(fig: Figure, title: str, height: float) -> Figure:
    fig.set_facecolor("white")
    fig.suptitle(title, fontsize=11, y=0.99)
    return fig


def flatmap(volume: np.ndarray, target: FlatmapTarget, *, title: str, cmap, vmin: float, vmax: float,
            colorbar_label: str, height: int = 1024) -> Figure:
    """``volume`` (i, j, k; NaN: not drawn) on the subject's flattened cortex, over its curvature,
    with a labelled colour bar."""
    cortex = _cortex()
    cmap = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    # pycortex resolves colour maps by name: register ours under a private one
    name = f"neurotask_{cmap.name}"
    if name not in matplotlib.colormaps:
        matplotlib.colormaps.register(cmap.copy(), name=name)
    vol = cortex.Volume(target.zyx(volume).astype(np.float32), target.subject, target.transform,
                        vmin=vmin, vmax=vmax, cmap=name)
    fig = cortex.quickflat.make_figure(vol, with_colorbar=False, with_curvature=True, height=height,
                                       **_overlays())
    cax = fig.add_axes((0.4, 0.9, 0.2, 0.022))  # top centre: the one place no hemisphere reaches
    cb = fig.colorbar(matplotlib.cm.ScalarMappable(colors.Normalize(vmin, vmax), cmap), cax=cax,
                      orientation="horizontal")
    cb.set_label(colorbar_label, fontsize=9)
    cb.ax.tick_params(labelsize=8)
    return _finish(fig, title, height)


def flatmap_contrast(r3d: np.ndarray, r2d: np.ndarray, target: FlatmapTarget, *, title: str, vmax: float,
                     labels: tuple[str, str], height: int = 1024) -> Figure:
    """Figure 3 on the flatmap: r3d and r2d (i, j, k; NaN: not drawn) in the 2-D colour map
    (:func:`colormaps.contrast_rgba`), with the colour square as legend."""
    cortex = _cortex()
    rgba = contrast_rgba(target.zyx(r3d), target.zyx(r2d), vmax)
    u8 = np.round(rgba * 255).astype(np.uint8)
    vol = cortex.VolumeRGB(u8[..., 0], u8[..., 1], u8[..., 2], target.subject, target.transform,
                           alpha=u8[..., 3])
    fig = cortex.quickflat.make_figure(vol, with_colorbar=False, with_curvature=True, height=height,
                                       **_overlays())
    w, h = fig.get_size_inches()
    side = 1.1
    sq = fig.add_axes((0.5 - side / w / 2, 0.94 - side / h, side / w, side / h))  # top centre, between the hemispheres
    legend_square(sq, vmax, f"r {labels[0]}", f"r {labels[1]}", background=(0.5, 0.5, 0.5))
    return _finish(fig, title, height)


def close(fig: Figure) -> None:
    """pycortex draws on pyplot figures: release them once saved."""
    import matplotlib.pyplot as plt

    plt.close(fig)


def flatmap_figures(page, target: FlatmapTarget, maps, labels: dict[str, str], r: np.ndarray, sig: np.ndarray,
                    tasks: list[str], task: str, ds, threshold: str) -> None:
    """Figures 2-4 of one subject as flatmaps on ``target`` (page sections fig2, fig3, fig4).
    r, sig (task, voxel); ``maps``: the subject's :class:`volumes.SubjectMaps`; ``ds``: its results."""
    from neurotask.pipeline.stats.noise_ceiling import noise_normalized
    from neurotask.pipeline.stats.task_structure import CONTRASTS

    target.check(maps.subject, maps.shape)
    subject, ti = maps.subject, tasks.index(task)
    where = f"pycortex subject {target.subject}, transform {target.transform}"
    overlays = "ROI and label overlays drawn" if _overlays()["with_rois"] else \
        "no ROI or label overlays (pycortex draws them with inkscape, which is not installed)"
    vals = np.where(sig[ti] & (r[ti] > 0), r[ti], np.nan)
    vmax = max(float(np.nanpercentile(vals, 99)), 1e-3) if np.isfinite(vals).any() else 0.1
    fig = flatmap(maps.volume(vals), target, title=f"{subject}: {labels[task]} r (FDR-significant voxels), flatmap",
                  cmap=significant_r_cmap(), vmin=0.0, vmax=vmax, colorbar_label="test r")
    page.add(f"fig2_flatmap_{task}_{subject}", f"Figure 2 (flatmap). {labels[task]}: r on the cortical surface, "
             f"{subject}", f"Figure 2's map ({threshold}; {int(np.isfinite(vals).sum())} voxels with r > 0) sampled "
             f"onto the flattened cortex ({where}) over its curvature (light: gyri, dark: sulci); left hemisphere "
             f"on the left; {overlays}.", fig, section="fig2")
    close(fig)
    for name, (t3, t2) in CONTRASTS.items():
        if t3 not in tasks or t2 not in tasks:
            continue
        a, b = tasks.index(t3), tasks.index(t2)
        either = sig[a] | sig[b]
        r3, r2 = np.where(either, r[a], np.nan), np.where(either, r[b], np.nan)
        best = np.fmax(r3, r2)
        cmax = max(float(np.nanpercentile(best, 99)), 1e-3) if np.isfinite(best).any() else 0.1
        fig = flatmap_contrast(maps.volume(r3), maps.volume(r2), target, vmax=cmax, labels=(labels[t3], labels[t2]),
                               title=f"{subject}: {labels[t3]} (red) versus {labels[t2]} (blue), flatmap")
        page.add(f"fig3_flatmap_{name}_{subject}", f"Figure 3 (flatmap). {labels[t3]} versus {labels[t2]}, {subject}",
                 f"The 2-D colour map of Figure 3 (red: {labels[t3]} better, blue: {labels[t2]} better, white: both "
                 f"predict well; {int(either.sum())} voxels significant for either task, {threshold}; full brightness "
                 f"at r = {cmax:.2f}) on the flattened cortex ({where}); {overlays}.", fig, section="fig3")
        close(fig)
    if "noise_ceiling_r" in ds:
        nnr = np.where(sig[ti] & (r[ti] > 0), noise_normalized(r[ti], ds["noise_ceiling_r"].values), np.nan)
        fig = flatmap(maps.volume(nnr), target, title=f"{subject}: {labels[task]} r / noise ceiling, flatmap",
                      cmap=significant_r_cmap(), vmin=0.0, vmax=1.0, colorbar_label="r / noise ceiling")
        page.add(f"fig4_flatmap_{task}_{subject}", f"Figure 4 (flatmap). {labels[task]}: r / noise ceiling, {subject}",
                 f"Figure 4's map ({int(np.isfinite(nnr).sum())} significant voxels with a positive ceiling; "
                 f"values above 1 drawn at 1) on the flattened cortex ({where}); {overlays}.", fig, section="fig4")
        close(fig)
