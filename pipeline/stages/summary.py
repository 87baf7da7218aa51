"""The run summary printed at the end of a fit: per ROI the best-predicted tasks, with the
fraction of significant voxels under each criterion and the median noise-normalised r; per
task the significant-voxel counts."""

from __future__ import annotations

import numpy as np
import xarray as xr

from neurotask.pipeline.stats.noise_ceiling import noise_normalized


def roi_table(results: xr.Dataset) -> xr.Dataset:
    """Per (roi, task) of one subject: mean r, fraction of significant voxels (parametric and,
    if present, permutation q), and median noise-normalised r (if a ceiling exists)."""
    in_roi = results["roi"] != ""
    res = results.where(in_roi, drop=True)
    out = {"mean_r": res["r"].groupby("roi").mean("voxel", skipna=True),
           "fraction_significant": res["significant"].astype(float).groupby("roi").mean("voxel")}
    if "significant_perm" in res:
        out["fraction_significant_perm"] = res["significant_perm"].astype(float).groupby("roi").mean("voxel")
    if "noise_ceiling_r" in res and np.isfinite(res["noise_ceiling_r"].values).any():
        nnr = xr.apply_ufunc(noise_normalized, res["r"], res["noise_ceiling_r"].broadcast_like(res["r"]))
        out["median_noise_normalized_r"] = nnr.groupby("roi").median("voxel", skipna=True)
    return xr.Dataset(out).transpose("roi", "task")


def summary_table(results: dict[str, xr.Dataset], top: int = 3) -> str:
    """Text tables for the terminal."""
    subjects = list(results)
    if not subjects:
        return "no results"
    lines = ["Best-predicted tasks per ROI: mean test r over the ROI's voxels "
             "[significant % parametric/permutation, median r / noise ceiling] of the best task"]
    for subject in subjects:
        table = roi_table(results[subject])
        for roi in table["roi"].values:
            row = table["mean_r"].sel(roi=roi)
            order = np.argsort(-np.nan_to_num(row.values, nan=-np.inf))[:top]
            best = ", ".join(f"{row['task'].values[i]} {row.values[i]:.3f}" for i in order)
            first = table.sel(roi=roi).isel(task=order[0])
            extra = f"{100 * float(first['fraction_significant']):.0f}%"
            if "fraction_significant_perm" in first:
                extra += f"/{100 * float(first['fraction_significant_perm']):.0f}%"
            if "median_noise_normalized_r" in first:
                extra += f", {float(first['median_noise_normalized_r']):.2f}"
            lines.append(f"  {subject:<6} {roi:<11} {best}  [{extra}]")
    lines.append("")
    tasks = [str(t) for t in results[subjects[0]]["task"].values]
    width = max(max(len(t) for t in tasks), 24)
    perm = all("significant_perm" in results[s] for s in subjects)
    lines.append("Significant voxels per task (BH-FDR across each subject's voxels"
                 + ("; parametric / permutation)" if perm else ")"))
    lines.append(f"  {'task':<{width}} " + " ".join(f"{s:>13}" for s in subjects))
    for t in tasks:
        cells = []
        for s in subjects:
            n = int(results[s]["significant"].sel(task=t).sum())
            cells.append(f"{n} / {int(results[s]['significant_perm'].sel(task=t).sum())}" if perm else str(n))
        lines.append(f"  {t:<{width}} " + " ".join(f"{c:>13}" for c in cells))
    nan_r = [int(np.isnan(results[s]["r"].values).any(axis=0).sum()) for s in subjects]
    lines.append(f"  {'voxels with undefined r':<{width}} " + " ".join(f"{c:>13d}" for c in nan_r)
                 + "   (constant responses or predictions: p = 1, never significant)")
    lines.append(f"  {'voxels':<{width}} " + " ".join(f"{results[s].sizes['voxel']:>13d}" for s in subjects))
    return "\n".join(lines)
