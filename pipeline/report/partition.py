"""The report's variance-partition figures, from ``analysis/partition_<name>`` (the ROI summary
of :mod:`neurotask.pipeline.stats.partition_summary`) and ``partition/<name>/<subject>`` (the
per-voxel partition):

* ROI bars of every Venn region (unique to a group, shared by groups) per ROI: the subject
  mean of the subjects' ROI means with each subject as a point; raw R² and, where the results
  carry a noise ceiling, as a fraction of the ROI's explainable variance;
* maps of each group's unique variance in its significant voxels (the report's map machinery,
  :mod:`.volumes`, :mod:`.brain_maps`);
* for a partition of two single feature spaces that the fit also fitted on their own (the
  paper's Figure-3 pairs), per ROI the paper's contrast (the share of the voxels significant
  for either space where the first predicts better) next to each space's unique variance.

Figures are drawn on ``matplotlib.figure.Figure`` (no pyplot state); :func:`partition_figures`
adds them to the page in the section ``partition``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from neurotask.pipeline.report import brain_maps
from neurotask.pipeline.report.colormaps import significant_r_cmap
from neurotask.pipeline.report.figures import CLUSTER_COLOURS, _roi_rank, freeze_layout
from neurotask.pipeline.report.page import ReportPage
from neurotask.pipeline.report.volumes import MapOptions, subject_maps, subject_underlay
from neurotask.pipeline.stats.partition import SEPARATOR
from neurotask.pipeline.stats.task_structure import str_labels
from neurotask.storage import save_nifti

SECTION = "partition"
# Okabe-Ito, for groups not named after a Taskonomy cluster
_PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00"]
_SHARED = ["#4D4D4D", "#7F7F7F", "#A6A6A6", "#CCCCCC"]


@dataclass
class Partition:
    """One variance partition as the report draws it: its name, the stored ROI summary and each
    subject's per-voxel partition."""

    name: str
    summary: xr.Dataset
    subjects: dict[str, xr.Dataset]


def groups_of(summary: xr.Dataset) -> dict[str, list[str]]:
    return json.loads(summary.attrs.get("groups", "{}")) or {g: [g] for g in str_labels(summary["group"].values)}


def group_colours(groups: Sequence[str]) -> dict[str, str]:
    """A group named after a Taskonomy cluster takes its colour (as in Figure 1), others the palette."""
    free = iter(c for c in _PALETTE if c not in {CLUSTER_COLOURS.get(g) for g in groups})
    return {g: CLUSTER_COLOURS[g] if g in CLUSTER_COLOURS and g else next(free) for g in groups}


def region_styles(regions: Sequence[str], groups: Sequence[str]) -> dict[str, dict]:
    """Bar style per region: a unique region filled in its group's colour; a region shared by two
    groups in the first one's colour striped with the second's (so each pair is told apart); one
    shared by three or more grey, cross-hatched (darker the fewer groups)."""
    colours = group_colours(groups)
    out = {}
    for name in regions:
        members = name.split(SEPARATOR)
        if len(members) == 1:
            out[name] = {"color": colours[name], "edge": colours[name], "hatch": None, "label": f"unique {name}"}
        elif len(members) == 2:
            out[name] = {"color": colours[members[0]], "edge": colours[members[1]], "hatch": "//",
                         "label": f"shared {' & '.join(members)}"}
        else:
            out[name] = {"color": _SHARED[min(len(members) - 3, len(_SHARED) - 1)], "edge": "white", "hatch": "xx",
                         "label": f"shared {' & '.join(members)}"}
    return out


def ordered_rois(summary: xr.Dataset) -> list[str]:
    """The summary's ROIs in the report's order (LH before RH; early visual, LOC, scene ROIs)."""
    return sorted(str_labels(summary["roi"].values), key=_roi_rank)


def _style_axes(ax) -> None:
    ax.grid(axis="y", color="#DDDDDD", lw=0.5)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.axhline(0, color="k", lw=0.5)


def figure_region_bars(summary: xr.Dataset, *, normalized: bool = False) -> Figure:
    """Per ROI, one bar per Venn region (grouped): the mean over subjects of each subject's ROI
    mean of the region's raw R² (``normalized``: as a fraction of the ROI's explainable
    variance), each subject a black point; error bars: SEM over subjects, or with one subject
    the bootstrap-over-voxels interval. Raw bars: above each unique region, the (subject-mean)
    percentage of the ROI's voxels where that unique variance is significant."""
    key = "region_mean_normalized" if normalized else "region_mean"
    rois = ordered_rois(summary)
    regions, groups = str_labels(summary["region"].values).tolist(), str_labels(summary["group"].values).tolist()
    styles = region_styles(regions, groups)
    per = summary[key].sel(roi=rois).transpose("subject", "region", "roi").values  # (S, R, roi)
    mean = summary[f"{key}_mean"].sel(roi=rois).transpose("region", "roi").values
    n_sub = summary.sizes["subject"]
    if n_sub > 1:
        err = summary[f"{key}_sem"].sel(roi=rois).transpose("region", "roi").values
        yerr = np.stack([err, err])  # (2, R, roi)
    else:
        ci = summary[key.replace("mean", "ci")].isel(subject=0).sel(roi=rois).transpose("bound", "region", "roi").values
        yerr = np.abs(ci - mean[None])
    frac = summary["fraction_unique_significant_mean"].sel(roi=rois)
    n_r = len(regions)
    width = 0.8 / n_r
    fig = Figure(figsize=(max(6.5, 0.22 * n_r * len(rois) + 2.0), 3.9), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(rois), dtype=float)
    rng = np.random.default_rng(0)  # fixed horizontal jitter of the subjects' points
    for k, name in enumerate(regions):
        xs = x - 0.4 + width * (k + 0.5)
        st = styles[name]
        bars = ax.bar(xs, np.nan_to_num(mean[k]), width * 0.92, color=st["color"], hatch=st["hatch"],
                      edgecolor=st["edge"], linewidth=0.0, label=st["label"])
        for bar in bars:
            bar.set_hatch_linewidth(2.4)  # wide stripes: the second group's colour must read at a glance
        ax.errorbar(xs, mean[k], yerr=yerr[:, k], fmt="none", ecolor="#222222", elinewidth=0.7, capsize=1.5)
        if not normalized and name in groups:  # the share of the ROI's voxels where this unique variance is significant
            top = np.fmax(np.nan_to_num(mean[k] + yerr[1, k]), np.nanmax(np.nan_to_num(per[:, k]), axis=0))
            for xi, yi, f in zip(xs, top, frac.sel(group=name).values):
                if np.isfinite(f):
                    ax.text(xi, max(yi, 0) + 0.004, f"{100 * f:.0f}%", ha="center", va="bottom", fontsize=6,
                            color=st["color"], rotation=90 if n_r * len(rois) > 24 else 0)
        if n_sub > 1:
            jitter = (rng.random((n_sub, len(rois))) - 0.5) * width * 0.5
            ax.scatter((xs[None, :] + jitter).ravel(), per[:, k].ravel(), s=6, color="black", zorder=3,
                       linewidths=0)
    _style_axes(ax)
    ax.margins(y=0.1)  # room for the percentages above the tallest bars
    if normalized:
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
    n_vox = summary["n_voxels_normalized" if normalized else "n_voxels"].sel(roi=rois).min("subject").values
    ax.set_xticks(x, [f"{r}\n({n} vox.)" for r, n in zip(rois, n_vox)], fontsize=7.5)
    ax.set_xlim(-0.6, len(rois) - 0.4)
    ax.set_ylabel("fraction of the noise ceiling (R²)" if normalized else "variance explained (test R²)",
                  fontsize=8.5)
    ax.tick_params(axis="y", labelsize=7.5)
    who = f"mean of {n_sub} subjects" if n_sub > 1 else str(summary["subject"].values[0])
    what = "as a fraction of the noise ceiling" if normalized else "raw test R²"
    fig.suptitle(f"Variance partition '{summary.attrs.get('analysis', '')}' per ROI ({who}; {what})", fontsize=10)
    handles, _ = ax.get_legend_handles_labels()
    if n_sub > 1:
        handles.append(Line2D([], [], marker="o", ls="", color="black", markersize=3, label="one subject"))
    if normalized:
        handles.append(Line2D([], [], color="k", lw=0.8, ls="--", label="noise ceiling (= 1)"))
    else:
        handles.append(Line2D([], [], ls="", label="n%: voxels with significant unique variance"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles) if len(handles) <= 4 else 3,
               fontsize=7.5, frameon=False)
    return freeze_layout(fig)


MIN_CONTRAST_VOXELS = 3  # a subject's ROI share is drawn from at least this many significant voxels


def figure_contrast(summary: xr.Dataset, spaces: tuple[str, str], labels: Mapping[str, str]) -> Figure:
    """The Figure-3 question per ROI: left, the share of the voxels significant for either
    space where the first space's separate fit predicts better (subject mean, subjects as
    points, 0.5 dashed: no preference); right, each space's unique variance (mean ROI R²)."""
    rois = ordered_rois(summary)
    a, b = spaces
    groups = str_labels(summary["group"].values).tolist()
    group_of = {v[0]: g for g, v in groups_of(summary).items()}
    ga, gb = group_of.get(a, groups[0]), group_of.get(b, groups[1])
    colours = group_colours(groups)
    x = np.arange(len(rois), dtype=float)
    n_sub = summary.sizes["subject"]
    fig = Figure(figsize=(max(8.0, 0.75 * len(rois) * 2 + 2.0), 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    frac = summary["contrast_fraction_wins"].sel(roi=rois).transpose("subject", "roi").values
    n = summary["contrast_n_voxels"].sel(roi=rois).transpose("subject", "roi").values
    # a share of one or two voxels is noise, not a preference: not drawn
    frac = np.where(n >= MIN_CONTRAST_VOXELS, frac, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an ROI without a voxel significant for either: NaN
        m = np.nanmean(frac, axis=0)
        sem = np.nanstd(frac, axis=0, ddof=1) / np.sqrt(np.isfinite(frac).sum(axis=0).clip(1))
    left.bar(x, np.nan_to_num(m), 0.6, color=colours[ga], alpha=0.85)
    for xi, mi in zip(x, m):
        if not np.isfinite(mi):
            left.text(xi, 0.02, "no voxel", rotation=90, ha="center", va="bottom", fontsize=6.5, color="#666666")
    if n_sub > 1:
        left.errorbar(x, m, yerr=sem, fmt="none", ecolor="#222222", elinewidth=0.7, capsize=2)
        for s in range(n_sub):
            left.scatter(x + (s - (n_sub - 1) / 2) * 0.08, frac[s], s=7, color="black", zorder=3, linewidths=0)
    left.axhline(0.5, color="k", lw=0.8, ls="--")
    left.set_ylim(0, 1)
    left.set_xticks(x, [f"{r}\n(n={int(k)})" for r, k in zip(rois, np.nansum(n, axis=0))], fontsize=7)
    left.set_ylabel(f"fraction of voxels with r({labels[a]}) > r({labels[b]})", fontsize=8)
    left.set_title(f"Separate fits: {labels[a]} versus {labels[b]}", fontsize=9)
    _style_axes(left)
    width = 0.38
    for k, (g, space) in enumerate(((ga, a), (gb, b))):
        mean = summary["region_mean_mean"].sel(region=g, roi=rois).values
        per = summary["region_mean"].sel(region=g, roi=rois).transpose("subject", "roi").values
        xs = x + (k - 0.5) * width
        right.bar(xs, np.nan_to_num(mean), width * 0.92, color=colours[g], label=f"unique {labels[space]}")
        if n_sub > 1:
            sem = summary["region_mean_sem"].sel(region=g, roi=rois).values
            right.errorbar(xs, mean, yerr=sem, fmt="none", ecolor="#222222", elinewidth=0.7, capsize=1.5)
            right.scatter(np.repeat(xs[None], n_sub, 0).ravel(), per.ravel(), s=6, color="black", zorder=3,
                          linewidths=0)
        else:
            ci = summary["region_ci"].isel(subject=0).sel(region=g, roi=rois).transpose("bound", "roi").values
            right.errorbar(xs, mean, yerr=np.abs(ci - mean[None]), fmt="none", ecolor="#222222", elinewidth=0.7,
                           capsize=1.5)
    right.set_xticks(x, rois, fontsize=7)
    right.set_ylabel("unique variance (test R²)", fontsize=8)
    right.set_title("Variance partition: unique to each space", fontsize=9)
    right.legend(fontsize=7, frameon=False)
    _style_axes(right)
    for ax in (left, right):
        ax.tick_params(axis="y", labelsize=7.5)
    who = f"mean of {n_sub} subjects" if n_sub > 1 else str(summary["subject"].values[0])
    fig.suptitle(f"{labels[a]} versus {labels[b]} per ROI ({who})", fontsize=10)
    return freeze_layout(fig)


# --------------------------------------------------------------------------- page


def _subjects_text(summary: xr.Dataset) -> str:
    n = summary.sizes["subject"]
    return (f"Bars: the mean over the {n} subjects of each subject's ROI mean; points: the subjects; error bars: "
            "SEM over subjects." if n > 1 else
            f"Bars: the ROI mean of {summary['subject'].values[0]}; error bars: "
            f"{100 * float(summary.attrs.get('ci', 0.95)):.0f}% interval of a bootstrap over the ROI's voxels "
            f"({summary.attrs.get('n_bootstrap', '')} resamples).")


def _groups_text(summary: xr.Dataset) -> str:
    return "; ".join(f"{g}: {', '.join(v)}" for g, v in groups_of(summary).items())


def bar_figures(page: ReportPage, p: Partition) -> None:
    s = p.summary
    groups = _groups_text(s)
    page.add(f"partition_{p.name}_bars", f"Variance partition '{p.name}': unique and shared variance per ROI",
             f"Groups of feature spaces ({groups}). For each ROI, the variance (test-set R²) explained uniquely by "
             "each group (solid, the group's colour) and shared by exactly the groups named (striped in the two "
             "groups' colours; grey, cross-hatched for three or more groups), by "
             "inclusion-exclusion over joint ridge fits of every union of the groups. Each subject's value is the "
             "mean over the ROI's voxels of the raw per-voxel estimates, negative ones included (a floor at zero "
             f"would bias the mean upwards). Above each unique bar: the percentage of the ROI's voxels where that "
             "group's unique variance is significant (one-sided sign-flip permutation test, Benjamini-Hochberg FDR "
             f"over the subject's voxels; mean over subjects). {_subjects_text(s)} Under each ROI: its voxel count "
             "(smallest over subjects).", figure_region_bars(s), svg=True, section=SECTION)
    if "region_mean_normalized" not in s or not np.isfinite(s["region_mean_normalized"].values).any():
        page.notes.append(f"Variance partition '{p.name}': no noise-ceiling-normalised bars (the results carry no "
                          "R² noise ceiling).")
        return
    page.add(f"partition_{p.name}_bars_normalized",
             f"Variance partition '{p.name}': as a fraction of the noise ceiling",
             "As the previous figure, each region divided by the ROI's explainable variance: per subject and ROI, "
             "the mean region R² over the ROI's voxels whose R² noise ceiling (from the repeated images) exceeds "
             f"{float(s.attrs.get('ceiling_floor', 0)):g}, divided by the mean ceiling of those voxels (a ratio of "
             "means: a voxel's own ratio is unbounded where its ceiling is small). 1 (dashed): the ceiling. "
             f"{_subjects_text(s)} Under each ROI: the voxels above the floor (smallest over subjects).",
             figure_region_bars(s, normalized=True), svg=True, section=SECTION)


def map_figures(page: ReportPage, p: Partition, results: Mapping[str, xr.Dataset], options: MapOptions) -> None:
    """Per subject and group: the unique variance in the voxels where it is significant (sign-flip
    permutation test, BH-FDR), over the subject's anatomy, and its NIfTI map."""
    for subject, part in p.subjects.items():
        res = results.get(subject)
        maps = subject_maps(subject, res) if res is not None else None
        if maps is None:
            page.notes.append(f"Variance partition '{p.name}', {subject}: voxels have no position; no maps.")
            continue
        if part.sizes["voxel"] != res.sizes["voxel"]:  # the analysis stage checked they are the same voxels
            page.notes.append(f"Variance partition '{p.name}', {subject}: its voxels are not the results'; no maps.")
            continue
        underlay, underlay_text = subject_underlay(maps, options)
        cuts = brain_maps.axial_cuts(maps.background, maps.affine, options.n_slices)
        n = part.sizes["voxel"]
        for group in str_labels(part["group"].values):
            u = part["unique_r2"].sel(group=group).values.astype(np.float64)
            sig = part["unique_significant"].sel(group=group).values.astype(bool)
            vals = np.where(sig & (u > 0), u, np.nan)
            if not np.isfinite(vals).any():
                page.notes.append(f"Variance partition '{p.name}', {subject}: no voxel with significant positive "
                                  f"unique {group} variance; its map is not drawn.")
                continue
            vol = maps.volume(vals)
            stem = f"partition_{p.name}_unique_{group}"
            rel = f"nifti/{subject}/{stem}.nii.gz"
            save_nifti(page.outdir / rel, vol, maps.affine)
            finite = vals[np.isfinite(vals)]
            vmax = max(float(np.percentile(finite, 99)), 1e-3) if finite.size else 0.05
            title = f"Variance partition '{p.name}': unique {group} variance, {subject}"
            page.add(f"{stem}_{subject}", title,
                     f"Test R² explained only by {group} ({', '.join(groups_of(p.summary).get(group, [group]))}): the "
                     f"full model's R² minus that of the model without {group}, drawn in the {int(np.isfinite(vals).sum())} "
                     f"of {n} voxels where it is significant (one-sided sign-flip permutation test of the two models' "
                     "test errors, Benjamini-Hochberg FDR over the subject's voxels) and positive; colours saturate at "
                     f"R² = {vmax:.3f} (99th percentile). Underlay: {underlay_text}. Axial slices, z in mm.",
                     brain_maps.stat_mosaic(vol, underlay, maps.affine, maps.rois, cuts=cuts,
                                            title=f"{subject}: unique {group} variance (significant voxels)",
                                            cmap=significant_r_cmap(), vmin=0.0, vmax=vmax, threshold=1e-9,
                                            colorbar_label="unique R²", mask=maps.background),
                     svg=False, section=SECTION, links=[("NIfTI", rel)])


def contrast_figures(page: ReportPage, p: Partition, labels: Mapping[str, str]) -> None:
    s = p.summary
    spaces = json.loads(s.attrs.get("contrast_spaces", "[]"))
    if len(spaces) != 2 or "contrast_fraction_wins" not in s:
        return
    a, b = spaces
    la, lb = labels.get(a, a), labels.get(b, b)
    sig = f"{s.attrs.get('significance', '')} p, BH-FDR q < {s.attrs.get('fdr', '')}"
    page.add(f"partition_{p.name}_contrast", f"Variance partition '{p.name}': {la} versus {lb} per ROI",
             f"The paper's Figure-3 question per ROI. Left: among the ROI's voxels significant for either of the "
             f"separate {la} and {lb} fits ({sig}; n under each ROI: their count summed over subjects; a subject's share from fewer than "
             f"{MIN_CONTRAST_VOXELS} voxels is not drawn), the "
             f"fraction where {la}'s test r exceeds {lb}'s (0.5, dashed: no preference). Right: the variance "
             f"(test R²) each space explains that the other does not, from the partition's joint fits (ROI mean of "
             f"the raw per-voxel estimates). A space can win the contrast on shared variance alone; the unique "
             f"variance says whether it also carries information the other lacks. {_subjects_text(s)}",
             figure_contrast(s, (a, b), {a: la, b: lb}), svg=True, section=SECTION)


def partition_figures(page: ReportPage, partitions: Sequence[Partition], results: Mapping[str, xr.Dataset],
                      options: MapOptions, labels: Mapping[str, str] | None = None) -> None:
    """Every partition's ROI bars, Figure-3 contrast (where it applies) and unique-variance maps."""
    for p in partitions:
        bar_figures(page, p)
        contrast_figures(page, p, labels or {})
        map_figures(page, p, results, options)
