"""The report's brain maps: a subject's voxels placed in its volume, the NIfTI maps written
beside the page and Figures 2-4 drawn over the subject's anatomy (nilearn; pycortex flatmaps
when configured).

* Figure 2: one task's test r in the voxels significant for it (FDR), axial slices in mm,
  ROI outlines, and a maximum-intensity projection overview in the subject's own space;
* Figure 3: each 3D/2D pair in the paper's 2-D colour map (:mod:`report.colormaps`);
* Figure 4: Figure 2's task as a fraction of the noise ceiling, when the results carry one.

Each map has an interactive viewer (nilearn's, one self-contained HTML file under
``interactive/<subject>/``) and its NIfTI file linked from the figure.

The underlay, in order of preference: the anatomy stored at ingest (``data.anatomy``
resampled to the functional grid, or else the mean of the raw betas), ``data.anatomy`` read
now (results imported without ingest), else the analysed voxels as a grey silhouette.

``subject_maps`` turns a subject's results into volume geometry; ``map_figures`` (called by
the report stage) writes every subject's files and figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from neurotask.pipeline.config import Config
from neurotask.pipeline.errors import DataError
from neurotask.pipeline.formats.anatomy import AnatomyFileError, anatomy_in_grid
from neurotask.pipeline.report import brain_maps
from neurotask.pipeline.report.colormaps import significant_r_cmap
from neurotask.pipeline.report.figures import task_labels
from neurotask.pipeline.report.page import ReportPage
from neurotask.pipeline.stats.noise_ceiling import noise_normalized
from neurotask.pipeline.stats.task_structure import CONTRASTS, significance_mask, str_labels
from neurotask.storage import StudyStore, save_nifti, to_volume

logger = logging.getLogger(__name__)

SVG_LIMIT = 3_000_000  # bytes: a bigger SVG of a map (embedded rasters, contours) is dropped, PNG kept


@dataclass
class SubjectMaps:
    """A subject's voxels in its volume: background mask, ROI masks, and maps by name."""

    subject: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    ijk: np.ndarray  # (v, 3)
    background: np.ndarray  # (i, j, k) bool: the analysed voxels
    rois: dict[str, np.ndarray] = field(default_factory=dict)

    def volume(self, values: np.ndarray) -> np.ndarray:
        return to_volume(np.asarray(values, dtype=np.float32), self.ijk, self.shape)


def subject_maps(subject: str, results: xr.Dataset) -> SubjectMaps | None:
    """The volume geometry of a subject's results, or None when voxels have no position."""
    shape = results.attrs.get("volume_shape")
    if shape is None or not all(c in results.coords for c in ("voxel_i", "voxel_j", "voxel_k")):
        return None
    ijk = np.stack([results[c].values for c in ("voxel_i", "voxel_j", "voxel_k")], axis=1).astype(np.int64)
    if ijk.size == 0 or (ijk < 0).any():
        return None
    shape = tuple(int(x) for x in shape)
    affine = np.asarray(results.attrs.get("affine", np.eye(4)), dtype=np.float64)
    background = np.zeros(shape, dtype=bool)
    background[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = True
    maps = SubjectMaps(subject, shape, affine, ijk, background)
    if "roi" in results.coords:
        labels = str_labels(results["roi"].values)
        for name in dict.fromkeys(labels.tolist()):
            if name:
                m = np.zeros(shape, dtype=bool)
                sel = labels == name
                m[ijk[sel, 0], ijk[sel, 1], ijk[sel, 2]] = True
                maps.rois[name] = m
    return maps


@dataclass
class StoredUnderlay:
    """An underlay kept in the store (``anatomy/<subject>``): volume (i, j, k), affine, source."""

    volume: np.ndarray
    affine: np.ndarray
    source: str


@dataclass
class MapOptions:
    """How the maps are drawn: slices per map, the subjects' underlays (stored ones, and
    data.anatomy files to resample now), pycortex flatmaps, interactive viewers."""

    n_slices: int = 16
    stored: dict[str, StoredUnderlay] = field(default_factory=dict)
    anatomy_files: dict[str, Path] = field(default_factory=dict)
    pycortex: object | None = None  # flatmaps.FlatmapTarget, when report.pycortex is set
    interactive: bool = True

    @classmethod
    def from_config(cls, cfg: Config, store: StudyStore) -> MapOptions:
        """Options from the config; a configured data.anatomy file that is missing, or a
        report.pycortex subject/transform pycortex does not know, is an error naming it."""
        stored, files = {}, {}
        for subject in cfg.study.subjects:
            if cfg.data.anatomy:
                path = cfg.data_path(cfg.data.anatomy, subject, key="anatomy")
                if not path.is_file():
                    raise DataError(f"{cfg.path}: data.anatomy for {subject}: no such file {path}")
                files[subject] = path
            if store.exists():
                ds = store.anatomy(subject)
                if ds is not None:
                    stored[subject] = StoredUnderlay(ds["underlay"].values, np.asarray(ds.attrs["affine"]),
                                                     str(ds.attrs.get("source", "stored anatomy")))
        target = None
        if cfg.report.pycortex is not None:
            from neurotask.pipeline.report.flatmaps import FlatmapTarget

            p = cfg.report.pycortex
            target = FlatmapTarget.open(p.subject, p.transform, cfg.resolve(p.filestore) if p.filestore else None)
        return cls(n_slices=cfg.report.n_slices, stored=stored, anatomy_files=files, pycortex=target)


def subject_underlay(maps: SubjectMaps, options: MapOptions) -> tuple[np.ndarray, str]:
    """The grey underlay (i, j, k in [0, 1]) for a subject's maps and what it is (captions)."""
    s = options.stored.get(maps.subject)
    configured = options.anatomy_files.get(maps.subject)
    if s is not None and s.volume.shape == maps.shape and (configured is None or "data.anatomy" in s.source):
        return brain_maps.underlay_volume(s.volume, maps.background), s.source
    if configured is not None:
        try:
            raw = anatomy_in_grid(configured, maps.shape, maps.affine)
        except AnatomyFileError as e:
            raise DataError(f"{maps.subject}: data.anatomy {e}") from e
        return brain_maps.underlay_volume(raw, maps.background), f"anatomy {configured.name} (data.anatomy)"
    return (brain_maps.underlay_volume(None, maps.background),
            "the analysed voxels as a grey silhouette (no anatomy: set data.anatomy)")


def _add(page: ReportPage, key: str, title: str, caption: str, fig: Figure, section: str,
         links: list[tuple[str, str]]) -> None:
    """page.add with an SVG unless it exceeds SVG_LIMIT (then PNG only)."""
    page.add(key, title, caption, fig, True, section=section, links=links)
    svg = page.outdir / "figures" / f"{key}.svg"
    if svg.is_file() and svg.stat().st_size > SVG_LIMIT:
        svg.unlink()
        page.figures[-1].files = [f for f in page.figures[-1].files if not f.endswith(".svg")]


def _percentile(values: np.ndarray, q: float, floor: float = 1e-3) -> float:
    v = values[np.isfinite(values)]
    return max(float(np.percentile(v, q)), floor) if v.size else 0.1


@dataclass
class _Context:
    """What every figure of one subject shares."""

    page: ReportPage
    maps: SubjectMaps
    underlay: np.ndarray
    underlay_text: str
    cuts: list[float]
    options: MapOptions
    orientation: str

    @property
    def subject(self) -> str:
        return self.maps.subject

    def rois_text(self) -> str:
        if self.maps.rois:
            return f"ROI outlines in colour ({', '.join(self.maps.rois)})."
        return "No ROI outlines: these voxels carry no ROI labels."

    def view(self, name: str, stat: np.ndarray, *, title: str, cmap, vmax: float, threshold: float,
             symmetric: bool) -> list[tuple[str, str]]:
        if not self.options.interactive:
            return []
        rel = f"interactive/{self.subject}/{name}.html"
        brain_maps.interactive_view(stat, self.underlay, self.maps.affine, self.page.outdir / rel, title=title,
                                    cmap=cmap, vmax=vmax, threshold=threshold, symmetric=symmetric)
        return [("interactive view", rel)]


def _orientation(maps: SubjectMaps, ds: xr.Dataset) -> str:
    text = ("Axial slices at z in mm (the affine's world coordinates), viewed from above, left of the "
            "subject on the left (nilearn's L/R marker)")
    note = ds.attrs.get("affine_note")
    return text + (f"; the affine is {note}, so mm are relative, not scanner coordinates." if note else ".")


def subject_map_figures(page: ReportPage, analysis: xr.Dataset, ds: xr.Dataset, maps: SubjectMaps, task: str,
                        options: MapOptions) -> list[str]:
    """One subject's NIfTI maps (r of every task, significance masks, Figures 2-4) and its
    Figures 2-4. -> the NIfTI files written, as the page lists them."""
    subject = maps.subject
    tasks = [str(t) for t in analysis["task"].values]
    labels = dict(zip(tasks, task_labels(analysis)))
    significance, fdr = analysis.attrs["significance"], float(analysis.attrs["fdr"])
    ds = ds.sel(task=tasks)
    sig = significance_mask(ds, significance, fdr)  # (task, voxel)
    r = ds["r"].transpose("task", "voxel").values
    ndir = page.outdir / "nifti" / subject
    written = []
    for i, t in enumerate(tasks):
        save_nifti(ndir / f"r_{t}.nii.gz", maps.volume(r[i]), maps.affine)
    written.append(f"r_<task>.nii.gz ({len(tasks)} files)")
    save_nifti(ndir / "significant.nii.gz", np.moveaxis(np.stack([maps.volume(s) for s in sig]), 0, -1),
               maps.affine)
    (ndir / "tasks.txt").write_text("\n".join(tasks) + "\n")
    written += ["significant.nii.gz", "tasks.txt"]
    underlay, underlay_text = subject_underlay(maps, options)
    ctx = _Context(page, maps, underlay, underlay_text, brain_maps.axial_cuts(maps.background, maps.affine,
                                                                                options.n_slices),
                   options, _orientation(maps, ds))
    threshold = f"{significance} p, Benjamini-Hochberg FDR q < {fdr:g}"
    written += _figure_2(ctx, labels, r, sig, tasks.index(task), task, threshold)
    written += _figure_3(ctx, labels, r, sig, tasks, threshold)
    written += _figure_4(ctx, labels, ds, r, sig, tasks.index(task), task, threshold)
    if options.pycortex is not None:
        from neurotask.pipeline.report.flatmaps import flatmap_figures

        flatmap_figures(page, options.pycortex, maps, labels, r, sig, tasks, task, ds, threshold)
    return written


def _figure_2(ctx: _Context, labels, r, sig, ti: int, task: str, threshold: str) -> list[str]:
    maps, subject = ctx.maps, ctx.subject
    # a negative significant r (two-sided tests) is not a prediction: counted, not drawn
    vals = np.where(sig[ti] & (r[ti] > 0), r[ti], np.nan)
    vol = maps.volume(vals)
    name = f"fig2_r_significant_{task}"
    save_nifti(ctx.page.outdir / "nifti" / subject / f"{name}.nii.gz", vol, maps.affine)
    n_sig, n = int(sig[ti].sum()), sig.shape[1]
    vmax = _percentile(vals, 99) if n_sig else 0.1
    cmap = significant_r_cmap()
    links = ctx.view(name, vol, title=f"{subject} {labels[task]} r", cmap=cmap, vmax=vmax,
                     threshold=1e-6, symmetric=False)
    links.append(("NIfTI", f"nifti/{subject}/{name}.nii.gz"))
    n_neg = int((sig[ti] & (r[ti] <= 0)).sum())
    smallest = f"; the smallest drawn r is {np.nanmin(vals):.3f}" if np.isfinite(vals).any() else ""
    if n_neg:
        smallest += f"; {n_neg} significant voxels with r <= 0 are not drawn"
    _add(ctx.page, f"fig2_r_{task}_{subject}", f"Figure 2. {labels[task]}: whole-brain r, {subject}",
         f"Test-set r of the {labels[task]} model, drawn only in the voxels significant for it ({threshold}: "
         f"{n_sig} of {n} analysed voxels{smallest}); colours saturate at r = {vmax:.2f} (99th percentile). "
         f"Underlay: {ctx.underlay_text}. {ctx.orientation} {ctx.rois_text()}",
         brain_maps.stat_mosaic(vol, ctx.underlay, maps.affine, maps.rois, cuts=ctx.cuts,
                                title=f"{subject}: {labels[task]} r (FDR-significant voxels)", cmap=cmap,
                                vmin=0.0, vmax=vmax, threshold=1e-6, colorbar_label="test r", mask=maps.background),
         "fig2", links)
    _add(ctx.page, f"fig2_projections_{task}_{subject}",
         f"Figure 2 (overview). {labels[task]}: maximum-intensity projections, {subject}",
         f"The map of Figure 2 projected along each axis (the largest significant r on each line of sight), in "
         f"the subject's own space over the analysed voxels' silhouette. Not nilearn's glass brain: its MNI152 "
         f"outline would not match a native-space grid. Axes in mm; L/R and A/P marked.",
         brain_maps.projections(vol, maps.background, maps.affine,
                                title=f"{subject}: {labels[task]} r, maximum-intensity projections", cmap=cmap,
                                vmin=0.0, vmax=vmax, colorbar_label="test r"),
         "fig2", [("NIfTI", f"nifti/{subject}/{name}.nii.gz")])
    return [f"{name}.nii.gz"]


def _figure_3(ctx: _Context, labels, r, sig, tasks: list[str], threshold: str) -> list[str]:
    maps, subject = ctx.maps, ctx.subject
    written = []
    for name, (t3, t2) in CONTRASTS.items():
        if t3 not in tasks or t2 not in tasks:
            continue
        a, b = tasks.index(t3), tasks.index(t2)
        either = sig[a] | sig[b]
        r3 = np.where(either, r[a], np.nan)
        r2 = np.where(either, r[b], np.nan)
        diff = maps.volume(r3 - r2)
        stem = f"fig3_contrast_{name}"
        save_nifti(ctx.page.outdir / "nifti" / subject / f"{stem}.nii.gz", diff, maps.affine)
        written.append(f"{stem}.nii.gz")
        n_either = int(either.sum())
        vmax = _percentile(np.fmax(r3, r2), 99) if n_either else 0.1
        lim = _percentile(np.abs(r3 - r2), 99) if n_either else 0.1
        wins = int(((r3 - r2) > 0).sum())
        three_d, two_d = labels[t3], labels[t2]
        links = ctx.view(stem, diff, title=f"{subject} {three_d} - {two_d}", cmap="RdBu_r", vmax=lim,
                         threshold=1e-6, symmetric=True)
        links.append(("NIfTI (r difference)", f"nifti/{subject}/{stem}.nii.gz"))
        _add(ctx.page, f"fig3_{name}_{subject}", f"Figure 3. {three_d} versus {two_d}, {subject}",
             f"The paper's 2-D colour map of r({three_d}) (x) against r({two_d}) (y) in the {n_either} voxels "
             f"significant for either task ({threshold}): red where {three_d} predicts better ({wins} voxels), "
             f"blue where {two_d} does ({n_either - wins}), white where both predict well; opacity grows with the "
             f"better r, so voxels neither task predicts show the underlay. Hue follows the relative difference, "
             f"so small differences stay visible; full brightness at r = {vmax:.2f} (99th percentile). The "
             f"interactive view and the NIfTI file hold r({three_d}) - r({two_d}). Underlay: {ctx.underlay_text}. "
             f"{ctx.orientation} {ctx.rois_text()}",
             brain_maps.contrast_mosaic(maps.volume(r3), maps.volume(r2), ctx.underlay, maps.affine, maps.rois,
                                        cuts=ctx.cuts, title=f"{subject}: {three_d} (red) versus {two_d} (blue)",
                                        vmax=vmax, labels=(three_d, two_d), mask=maps.background),
             "fig3", links)
    return written


def _figure_4(ctx: _Context, labels, ds: xr.Dataset, r, sig, ti: int, task: str, threshold: str) -> list[str]:
    if "noise_ceiling_r" not in ds:
        return []
    maps, subject = ctx.maps, ctx.subject
    ceiling = ds["noise_ceiling_r"].values
    nnr = np.where(sig[ti] & (r[ti] > 0), noise_normalized(r[ti], ceiling), np.nan)
    n_drawn, n_sig = int(np.isfinite(nnr).sum()), int(sig[ti].sum())
    vol = maps.volume(nnr)
    stem = f"fig4_noise_normalized_r_{task}"
    save_nifti(ctx.page.outdir / "nifti" / subject / f"{stem}.nii.gz", vol, maps.affine)
    vmax = 1.0
    above = int((nnr > 1).sum())
    cmap = significant_r_cmap()
    links = ctx.view(stem, vol, title=f"{subject} {labels[task]} r/ceiling", cmap=cmap, vmax=vmax,
                     threshold=1e-6, symmetric=False)
    links.append(("NIfTI", f"nifti/{subject}/{stem}.nii.gz"))
    median = f"median {np.nanmedian(nnr):.2f}" if n_drawn else "none drawn"
    _add(ctx.page, f"fig4_{task}_{subject}", f"Figure 4. {labels[task]}: r as a fraction of the noise ceiling, {subject}",
         f"Test-set r of the {labels[task]} model divided by each voxel's noise ceiling (from the repeated images), "
         f"in the {n_drawn} of its {n_sig} significant voxels ({threshold}) whose ceiling is positive ({median}; "
         f"{above} voxels exceed 1, drawn at 1: a sample r can exceed an estimated ceiling). "
         f"Underlay: {ctx.underlay_text}. {ctx.orientation} {ctx.rois_text()}",
         brain_maps.stat_mosaic(vol, ctx.underlay, maps.affine, maps.rois, cuts=ctx.cuts,
                                title=f"{subject}: {labels[task]} r / noise ceiling (FDR-significant voxels)",
                                cmap=cmap, vmin=0.0, vmax=vmax, threshold=1e-6,
                                colorbar_label="r / noise ceiling", mask=maps.background),
         "fig4", links)
    return [f"{stem}.nii.gz"]


def map_figures(page: ReportPage, analysis: xr.Dataset, results: dict[str, xr.Dataset], task: str,
                options: MapOptions) -> None:
    """Every subject's NIfTI maps and map figures (Figures 2-4); notes for subjects without them."""
    for subject, ds in results.items():
        maps = subject_maps(subject, ds)
        if maps is None:
            page.notes.append(f"{subject}: voxels have no position in a volume; no maps or NIfTI files.")
            continue
        if ds.attrs.get("affine_note"):
            page.notes.append(f"{subject}: voxel positions are exact; the affine is {ds.attrs['affine_note']}.")
        written = subject_map_figures(page, analysis, ds, maps, task, options)
        page.nifti_rows.append((subject, written))
