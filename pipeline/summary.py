"""The run summary printed at the end of a fit: best tasks per ROI, significant voxels per task."""

from __future__ import annotations

import numpy as np
import xarray as xr


def roi_task_means(results: xr.Dataset) -> xr.DataArray:
    """Mean test r per (roi, task) over a subject's voxels with a defined r. -> (roi, task)."""
    r = results["r"].where(results["roi"] != "")
    return r.groupby("roi").mean("voxel", skipna=True).transpose("roi", "task")


def summary_table(results: dict[str, xr.Dataset], top: int = 3) -> str:
    """Text tables: per subject and ROI the best-predicted tasks; per task the significant voxels."""
    lines = []
    subjects = list(results)
    if not subjects:
        return "no results"
    lines.append("Best-predicted tasks per ROI (mean test r over the ROI's voxels)")
    for subject in subjects:
        means = roi_task_means(results[subject])
        for roi in means["roi"].values:
            if roi == "":
                continue
            row = means.sel(roi=roi)
            order = np.argsort(-np.nan_to_num(row.values, nan=-np.inf))[:top]
            best = ", ".join(f"{row['task'].values[i]} {row.values[i]:.3f}" for i in order)
            lines.append(f"  {subject:<6} {roi:<11} {best}")
    lines.append("")
    tasks = [str(t) for t in results[subjects[0]]["task"].values]
    width = max(len(t) for t in tasks)
    head = f"  {'task':<{width}} " + " ".join(f"{s:>8}" for s in subjects)
    lines.append("Significant voxels per task (FDR q < level; voxel count per subject)")
    lines.append(head)
    for t in tasks:
        counts = [int(results[s]["significant"].sel(task=t).sum()) if t in results[s]["task"] else 0 for s in subjects]
        lines.append(f"  {t:<{width}} " + " ".join(f"{c:>8d}" for c in counts))
    nan_r = [int(np.isnan(results[s]["r"].values).any(axis=0).sum()) for s in subjects]
    lines.append(f"  {'voxels with undefined r':<{width}} " + " ".join(f"{c:>8d}" for c in nan_r)
                 + "   (constant responses or predictions: p = 1, never significant)")
    totals = [results[s].sizes["voxel"] for s in subjects]
    lines.append(f"  {'voxels':<{width}} " + " ".join(f"{c:>8d}" for c in totals))
    return "\n".join(lines)
