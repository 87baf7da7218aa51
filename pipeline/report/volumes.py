"""The report's brain maps: a subject's voxels placed in its volume, the NIfTI maps written
beside the page and Figures 2-3 (one task's significant r, the 3D minus 2D contrasts).

``subject_maps`` turns a subject's results into volume geometry (voxel positions, affine, ROI
masks); ``subject_map_figures`` writes the subject's NIfTI files and adds its map figures to
the page. The report stage (:mod:`neurotask.pipeline.stages.report`) calls both per subject.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from neurotask.pipeline.report.figures import figure_mosaic, task_labels
from neurotask.pipeline.report.page import ReportPage
from neurotask.pipeline.stats.task_structure import CONTRASTS, significance_mask, str_labels, voxel_contrasts
from neurotask.pipeline.config import Config
from neurotask.storage import StudyStore, save_nifti, to_volume



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
class MapOptions:
    """How the maps are drawn: slices per map (more options to come with the anatomy)."""

    n_slices: int = 16

    @classmethod
    def from_config(cls, cfg: Config, store: StudyStore) -> MapOptions:
        return cls(n_slices=cfg.report.n_slices)


def subject_map_figures(page: ReportPage, analysis: xr.Dataset, ds: xr.Dataset, maps: SubjectMaps, task: str,
                        options: MapOptions) -> list[str]:
    """One subject's NIfTI maps (r of every task, significance masks, Figures 2-3) and its
    Figures 2 and 3. -> the NIfTI files written, as the page lists them."""
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
    written.append("r_<task>.nii.gz (21 files)" if len(tasks) == 21 else f"r_<task>.nii.gz ({len(tasks)} files)")
    save_nifti(ndir / "significant.nii.gz", np.moveaxis(np.stack([maps.volume(s) for s in sig]), 0, -1),
               maps.affine)
    (ndir / "tasks.txt").write_text("\n".join(tasks) + "\n")
    written += ["significant.nii.gz", "tasks.txt"]
    ti = tasks.index(task)
    r_sig = maps.volume(np.where(sig[ti], r[ti], np.nan))
    save_nifti(ndir / f"fig2_r_significant_{task}.nii.gz", r_sig, maps.affine)
    written.append(f"fig2_r_significant_{task}.nii.gz")
    vmax = float(np.nanmax(np.abs(r[sig]))) if sig.any() else 0.1
    page.add(f"fig2_r_{task}_{subject}", f"Figure 2. {labels[task]}: whole-brain r, {subject}",
             f"Test-set r of the {labels[task]} model in the voxels significant for it "
             f"({significance}, FDR q < {fdr:g}: {int(sig[ti].sum())} of {sig.shape[1]} voxels); axial slices, "
             "analysed voxels in grey, ROI outlines in colour.",
             figure_mosaic(r_sig, maps.background, maps.rois, n_slices=options.n_slices,
                           title=f"{subject}: {labels[task]} r (significant voxels)", cmap="hot",
                           vmin=0.0, vmax=max(vmax, 1e-3), colorbar_label="test r"), section="fig2")
    try:
        diffs = voxel_contrasts(ds)
    except ValueError:
        diffs = None
    for name in ([] if diffs is None else [str(c) for c in diffs["contrast"].values]):
        a, b = (tasks.index(x) for x in CONTRASTS[name])
        either = sig[a] | sig[b]
        d = np.where(either, diffs.sel(contrast=name).values, np.nan)
        vol = maps.volume(d)
        save_nifti(ndir / f"fig3_contrast_{name}.nii.gz", vol, maps.affine)
        written.append(f"fig3_contrast_{name}.nii.gz")
        lim = float(np.nanmax(np.abs(d))) if either.any() else 0.1
        wins = int((d[either] > 0).sum())
        three_d, two_d = (labels[x] for x in CONTRASTS[name])
        page.add(f"fig3_{name}_{subject}", f"Figure 3. {three_d} minus {two_d}, {subject}",
                 f"r({three_d}) - r({two_d}) in the {int(either.sum())} voxels "
                 f"significant for either task; red: the 3D task predicts better ({wins} voxels).",
                 figure_mosaic(vol, maps.background, maps.rois, n_slices=options.n_slices,
                               title=f"{subject}: {three_d} - {two_d}",
                               cmap="RdBu_r", vmin=-max(lim, 1e-3), vmax=max(lim, 1e-3), colorbar_label="r difference"), section="fig3")
    return written


def map_figures(page: ReportPage, analysis: xr.Dataset, results: dict[str, xr.Dataset], task: str,
                options: MapOptions) -> None:
    """Every subject's NIfTI maps and map figures (Figures 2-3); notes for subjects without them."""
    for subject, ds in results.items():
        maps = subject_maps(subject, ds)
        if maps is None:
            page.notes.append(f"{subject}: voxels have no position in a volume; no maps or NIfTI files.")
            continue
        if ds.attrs.get("affine_note"):
            page.notes.append(f"{subject}: voxel positions are exact; the affine is {ds.attrs['affine_note']}.")
        written = subject_map_figures(page, analysis, ds, maps, task, options)
        page.nifti_rows.append((subject, written))

