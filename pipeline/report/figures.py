"""The report's figures, drawn from the stored analysis and per-voxel maps.

Numbers as in Neural Taskonomy: 1, mean r per ROI and task (one panel per ROI, every task
named, grouped by Taskonomy cluster; open bars where the ROI-level test finds nothing; the
ROI's noise ceiling), and 1b the same as r / noise ceiling; 2-3, the brain maps (drawn in
:mod:`.volumes`; ``figure_mosaic`` here is their axial mosaic); 5, the task similarity
matrix in the order of its tree; 6, the brain's task tree facing Taskonomy's as a
tanglegram (:mod:`.tanglegram`); 7, the brain's task graph and Taskonomy's in one shared
layout, labels placed clear of each other (:mod:`.label_placement`). Figures are drawn on
``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot state), so they draw headless;
saving them is the report page's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import numpy as np
import xarray as xr
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy.cluster import hierarchy

from neurotask.pipeline.report.label_placement import place_labels
from neurotask.pipeline.report.tanglegram import untangle
from neurotask.pipeline.stats import similarity as sim
from neurotask.pipeline.tasks import CLUSTERS

# Okabe-Ito colours, one per Taskonomy cluster (colour-blind safe)
CLUSTER_COLOURS = {"3D": "#0072B2", "2D": "#E69F00", "semantic": "#009E73",
                   "lowdim_geometric": "#CC79A7", "outlier": "#7F7F7F", "": "#000000"}
CLUSTER_LABELS = {"3D": "3D", "2D": "2D", "semantic": "semantic", "lowdim_geometric": "low-dim. geometric",
                  "outlier": "Denoising (alone)", "": "not in Taskonomy"}
ROI_COLOURS = {"EarlyVis": "#00FFFF", "LOC": "#7CFC00", "OPA": "#FF00FF", "PPA": "#1E90FF", "RSC": "#FFFFFF"}


# --------------------------------------------------------------------------- helpers


def task_labels(analysis: xr.Dataset) -> list[str]:
    return [str(x) for x in analysis["label"].values]


def task_clusters(analysis: xr.Dataset) -> list[str]:
    return [str(x) for x in analysis["taskonomy_cluster"].values]


def _roi_base(roi: str) -> str:
    for prefix in ("LH", "RH"):
        if roi.startswith(prefix):
            return roi[len(prefix):]
    return roi


def _roi_rank(roi: str) -> tuple[int, int, str]:
    """Sort key: left hemisphere first, then early visual, LOC, and the scene ROIs."""
    base = _roi_base(roi)
    order = list(ROI_COLOURS)
    return (0 if roi.startswith("LH") else 1 if roi.startswith("RH") else 2,
            order.index(base) if base in order else len(order), roi)


def cluster_order(clusters: Sequence[str]) -> list[int]:
    """Task indices grouped by Taskonomy cluster (3D, 2D, semantic, low-dim, outlier, other)."""
    rank = {c: i for i, c in enumerate(("3D", "2D", "semantic", "lowdim_geometric", "outlier"))}
    return sorted(range(len(clusters)), key=lambda i: (rank.get(clusters[i], len(rank)), i))


def _cluster_legend(clusters: Sequence[str]) -> list[Patch]:
    present = [c for c in (*CLUSTERS, "") if c in set(clusters)]
    return [Patch(facecolor=CLUSTER_COLOURS[c], label=CLUSTER_LABELS[c]) for c in present]


def _colour_ticklabels(labels, colour_of: dict[str, str]) -> None:
    for t in labels:
        t.set_color(colour_of.get(t.get_text(), "#000000"))


def freeze_layout(fig: Figure) -> Figure:
    """Run the figure's (constrained) layout once and keep it: saving PNG and SVG then does
    not lay out a many-panel figure again each time (the layout is in inches, so it holds at
    any dpi)."""
    engine = fig.get_layout_engine()
    if engine is not None:
        if not hasattr(fig.canvas, "get_renderer"):
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            FigureCanvasAgg(fig)
        engine.execute(fig)
        fig.set_layout_engine("none")
    return fig


# --------------------------------------------------------------------------- figures


def roi_grid(rois: Sequence[str]) -> list[list[str | None]]:
    """Panel grid of Figure 1: rows LH, RH and columns the ROI kinds when every ROI has a
    hemisphere prefix (so a column compares the two hemispheres), else rows of up to 5."""
    ordered = sorted(rois, key=_roi_rank)
    if ordered and all(r.startswith(("LH", "RH")) for r in ordered):
        bases = list(dict.fromkeys(_roi_base(r) for r in ordered))
        return [[f"{h}{b}" if f"{h}{b}" in rois else None for b in bases] for h in ("LH", "RH")
                if any(r.startswith(h) for r in ordered)]
    cols = min(5, len(ordered))
    return [ordered[i:i + cols] + [None] * (cols - len(ordered[i:i + cols])) for i in range(0, len(ordered), cols)]


def task_positions(clusters: Sequence[str], gap: float = 0.8) -> tuple[list[int], np.ndarray]:
    """Task indices in cluster order and their x positions, a ``gap`` between clusters."""
    order = cluster_order(clusters)
    x, pos, last = 0.0, [], None
    for i in order:
        if last is not None and clusters[i] != last:
            x += gap
        pos.append(x)
        x += 1.0
        last = clusters[i]
    return order, np.array(pos)


def has_roi_test(analysis: xr.Dataset) -> bool:
    """Whether the analysis carries Figure 1's ROI-level test (older stored analyses do not)."""
    return "roi_p" in analysis and bool(np.isfinite(analysis["roi_p"].values).any())


def has_roi_noise_ceiling(analysis: xr.Dataset) -> bool:
    return "roi_noise_ceiling" in analysis and bool(np.isfinite(analysis["roi_noise_ceiling"].values).any())


def roi_panel_values(analysis: xr.Dataset, subject: str | None, normalized: bool) -> dict[str, xr.DataArray | None]:
    """What Figure 1 draws, (task, roi) each: ``value``, ``err`` (or None), ``significant``
    (or None without the ROI-level test), ``ceiling`` (roi,) (or None), ``n_voxels`` (roi,).

    For one ``subject``: its ROI means +- SEM over voxels, its test. For ``subject=None`` the
    subject mean: the mean of the subjects' ROI means +- SEM over subjects (none for one
    subject), significant when the test finds the ROI predicted in every subject
    (conjunction), the subjects' mean ceiling, the smallest voxel count.
    """
    a = analysis if subject is None else analysis.sel(subject=[subject])
    n = a.sizes["subject"]
    value = a["roi_noise_normalized_r" if normalized else "roi_mean_r"]
    out: dict[str, xr.DataArray | None] = {"value": value.mean("subject")}
    if normalized:
        out["err"] = value.std("subject", ddof=1) / np.sqrt(n) if n > 1 else None
    else:
        out["err"] = a["roi_sem_r"].isel(subject=0) if n == 1 else a["roi_mean_r"].std("subject", ddof=1) / np.sqrt(n)
    out["significant"] = a["roi_significant"].all("subject") if has_roi_test(analysis) else None
    out["ceiling"] = a["roi_noise_ceiling"].mean("subject") if has_roi_noise_ceiling(analysis) else None
    out["n_voxels"] = a["roi_n_voxels"].min("subject")
    return out


def figure_roi_bars(analysis: xr.Dataset, subject: str | None = None, *, normalized: bool = False) -> Figure:
    """Figure 1: per ROI (one panel each; LH above RH) the mean test r of every task, tasks
    grouped and coloured by Taskonomy cluster and named on the axis; the ROI's mean noise
    ceiling as a dashed line when the results have one. ``subject``: one subject (error
    bars: SEM over the ROI's voxels) or None for the subject mean (``roi_panel_values``).

    Significance (when the analysis has ``roi_q``): filled bars are tasks that predict the ROI,
    open bars tasks that do not. The test, per (task, ROI): Simes' combination of the ROI's
    voxel p-values (the global null "no voxel of the ROI is predicted"; valid under the
    positive dependence of neighbouring voxels that BH over voxels already assumes, and not
    inflated by counting dependent voxels as independent samples), then BH at the analysis'
    ``fdr`` over the subject's task x ROI cells; the subject mean marks a bar when every
    subject's test does.

    ``normalized``: bars are the median over the ROI's voxels of r / noise ceiling
    (``roi_noise_normalized_r``, the run summary's convention) with 1 (the ceiling) marked.
    """
    labels, clusters = task_labels(analysis), task_clusters(analysis)
    order, x = task_positions(clusters)
    grid = roi_grid([str(r) for r in analysis["roi"].values])
    nrows, ncols = len(grid), len(grid[0])
    vals = roi_panel_values(analysis, subject, normalized)
    value, err, ceiling = vals["value"], vals["err"], vals["ceiling"]
    tested = vals["significant"] is not None
    n_sub = analysis.sizes["subject"]
    fig = Figure(figsize=(2.75 * ncols + 0.6, 2.1 * nrows + 1.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    width = 0.8
    for row, names in enumerate(grid):
        for col, roi in enumerate(names):
            ax = axes[row, col]
            if roi is None:
                ax.set_axis_off()
                continue
            v = value.sel(roi=roi).values[order]
            sig = vals["significant"].sel(roi=roi).values[order] if tested else np.ones(len(order), bool)
            colours = [CLUSTER_COLOURS[clusters[i]] for i in order]
            faces = [c if s else "white" for c, s in zip(colours, sig)]
            bars = ax.bar(x, np.nan_to_num(v), width, color=faces, edgecolor=colours, linewidth=0.8)
            for bar, i in zip(bars, order):
                bar.set_gid(f"{roi}:{analysis['task'].values[i]}")
            if err is not None:
                ax.errorbar(x, v, yerr=err.sel(roi=roi).values[order], fmt="none", ecolor="#333333",
                            elinewidth=0.6, capsize=0)
            ax.axhline(0, color="k", lw=0.5)
            if normalized:
                ax.axhline(1.0, color="k", lw=1.0, ls="--")
            elif ceiling is not None and np.isfinite(float(ceiling.sel(roi=roi))):
                ax.axhline(float(ceiling.sel(roi=roi)), color="k", lw=1.0, ls="--")
            n = int(vals["n_voxels"].sel(roi=roi))
            ax.set_title(f"{roi} ({'>= ' if subject is None and n_sub > 1 else ''}{n} voxels)", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(axis="y", color="#DDDDDD", lw=0.5)
            ax.set_axisbelow(True)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
            if col == 0:
                ax.set_ylabel("median r / noise ceiling" if normalized else "mean test r", fontsize=8)
    for ax in axes[-1]:
        if ax.axison:
            ax.set_xticks(x, [labels[i] for i in order], rotation=90, fontsize=6.5)
            _colour_ticklabels(ax.get_xticklabels(), {labels[i]: CLUSTER_COLOURS[clusters[i]] for i in order})
    for row in range(nrows - 1):  # a missing panel below: its column's labels go on this row
        for col in range(ncols):
            if axes[row, col].axison and not axes[row + 1, col].axison:
                axes[row, col].tick_params(labelbottom=True)
                axes[row, col].set_xticks(x, [labels[i] for i in order], rotation=90, fontsize=6.5)
    axes[0, 0].set_xlim(x[0] - 0.7, x[-1] + 0.7)
    handles = _cluster_legend(clusters)
    if tested:
        every = " in every subject" if subject is None and n_sub > 1 else ""
        handles += [Patch(facecolor="#999999", edgecolor="#999999", label=f"predicts the ROI{every} (q < "
                          f"{analysis.attrs['fdr']:g})"),
                    Patch(facecolor="white", edgecolor="#999999", label="not significant")]
    if normalized or ceiling is not None:
        handles.append(Line2D([0], [0], color="k", lw=1.0, ls="--", label="noise ceiling (ROI mean)"
                              if not normalized else "noise ceiling (= 1)"))
    what = "median r / noise ceiling" if normalized else "mean test r"
    who = subject if subject is not None else (f"mean of {n_sub} subjects" if n_sub > 1 else str(analysis["subject"].values[0]))
    fig.suptitle(f"{who}: {what} per ROI and task", fontsize=10)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2 * ncols), fontsize=7.5,
               frameon=False)
    return freeze_layout(fig)


def slice_indices(background: np.ndarray, n_slices: int) -> np.ndarray:
    """Up to ``n_slices`` evenly spaced axial (k) slices that contain background voxels."""
    ks = np.flatnonzero(background.any(axis=(0, 1)))
    if ks.size <= n_slices:
        return ks
    return ks[np.round(np.linspace(0, ks.size - 1, n_slices)).astype(int)]


def montage(volume: np.ndarray, ks: Sequence[int], cols: int, fill: float = np.nan) -> np.ndarray:
    """Axial slices k of an (i, j, k) volume tiled row by row into one 2D image
    (rows * j, cols * i), each tile with i to the right and j upwards."""
    ni, nj = volume.shape[:2]
    rows = -(-len(ks) // cols)
    out = np.full((rows * nj, cols * ni), fill, dtype=np.result_type(volume.dtype, np.float32))
    for n, k in enumerate(ks):
        r, c = divmod(n, cols)
        out[r * nj:(r + 1) * nj, c * ni:(c + 1) * ni] = volume[:, :, k].T[::-1]
    return out


def figure_mosaic(
    volume: np.ndarray,
    background: np.ndarray,
    outlines: dict[str, np.ndarray],
    *,
    n_slices: int,
    title: str,
    cmap: str,
    vmin: float,
    vmax: float,
    colorbar_label: str,
) -> Figure:
    """Axial slices of ``volume`` (i, j, k; NaN transparent) over the ``background`` mask,
    with the ROI masks in ``outlines`` (name -> (i, j, k) bool) drawn as contours.

    The slices are tiled into one image drawn in a single axes (one image, one contour per
    ROI), which keeps the figure fast to draw whatever the number of slices.
    """
    ks = slice_indices(background, n_slices)
    if ks.size == 0:
        ks = np.array([volume.shape[2] // 2])
    ni, nj = volume.shape[:2]
    cols = max(1, int(round(np.sqrt(len(ks) * nj / ni * 1.6))))
    cols = min(cols, len(ks))
    rows = -(-len(ks) // cols)
    height, width = rows * nj, cols * ni
    # the axes hold the tiled image at its aspect ratio; 0.4 inch above (title), 0.35 below (legend)
    fig_w, top, bottom = float(np.clip(width / 35.0, 8.0, 14.0)), 0.4, 0.35  # ~3 px per voxel on real grids
    ax_w = 0.84 * fig_w
    ax_h = min(ax_w * height / width, 12.0)
    fig_h = ax_h + top + bottom
    fig = Figure(figsize=(fig_w, fig_h), facecolor="black")
    ax = fig.add_axes((0.01, bottom / fig_h, 0.84, ax_h / fig_h))
    ax.set_axis_off()
    ax.imshow(np.where(montage(background.astype(float), ks, cols, 0.0) > 0, 0.25, 0.0), cmap="gray",
              vmin=0, vmax=1, interpolation="nearest")
    image = ax.imshow(np.ma.masked_invalid(montage(volume, ks, cols)), cmap=cmap, vmin=vmin, vmax=vmax,
                      interpolation="nearest")
    x, y = np.arange(width), np.arange(height)
    for name, m in outlines.items():
        tiled = montage(m.astype(float), ks, cols, 0.0)
        if tiled.any():
            ax.contour(x, y, tiled, levels=[0.5], colors=[ROI_COLOURS.get(_roi_base(name), "#FFFFFF")],
                       linewidths=0.7)
    for n, k in enumerate(ks):
        r, c = divmod(n, cols)
        ax.text(c * ni + 0.5, r * nj + 0.5, f"k={k}", color="#BBBBBB", fontsize=6, va="top", ha="left")
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    fig.suptitle(title, color="white", fontsize=10, y=1 - 0.08 / fig_h, va="top")
    cax = fig.add_axes((0.87, (bottom + 0.2 * ax_h) / fig_h, 0.025, 0.6 * ax_h / fig_h))
    cb = fig.colorbar(image, cax=cax)
    cb.set_label(colorbar_label, color="white")
    cb.ax.tick_params(colors="white")
    bases = sorted({_roi_base(n) for n in outlines})
    if bases:
        fig.legend(handles=[Line2D([0], [0], color=ROI_COLOURS.get(b, "#FFFFFF"), lw=1.5, label=b) for b in bases],
                   loc="lower center", ncols=len(bases), fontsize=7, frameon=False, labelcolor="white")
    return fig


def figure_similarity(analysis: xr.Dataset) -> Figure:
    """Figure 5: the subject-mean similarity matrix, tasks in the dendrogram order of its tree
    (viridis: perceptually uniform and colour-blind safe). Tasks without a significant voxel
    in any subject (a row of 0) have grey italic labels, "(0 sig. voxels)" on the rows."""
    order = [int(i) for i in analysis["leaves_mean"].values]
    labels, clusters = task_labels(analysis), task_clusters(analysis)
    names = [labels[i] for i in order]
    zero = zero_significant_tasks(analysis)
    s = analysis["similarity_mean"].values[np.ix_(order, order)]
    fig = Figure(figsize=(7.5, 6.8), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(s, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), [f"{n}{_ZERO_SUFFIX}" if n in zero else n for n in names], fontsize=8)
    colour_of = {labels[i]: CLUSTER_COLOURS[clusters[i]] for i in range(len(labels))}
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for t, name in zip(ticks, names):
            t.set_color(_ZERO_COLOUR if name in zero else colour_of.get(name, "#000000"))
            t.set_fontstyle("italic" if name in zero else "normal")
    fig.colorbar(im, ax=ax, shrink=0.7, label=f"{analysis.attrs['metric']} similarity")
    n_sub = analysis.sizes["subject"]
    ax.set_title(f"Brain task similarity (mean of {n_sub} subject{'s' if n_sub > 1 else ''}), tree order", fontsize=10)
    fig.legend(handles=_cluster_legend(clusters), loc="outside lower center", ncols=5, fontsize=7, frameon=False)
    return freeze_layout(fig)


def figure_similarity_subjects(analysis: xr.Dataset) -> Figure:
    """Figure 5, per subject, in the order of the subject-mean tree."""
    order = [int(i) for i in analysis["leaves_mean"].values]
    labels = task_labels(analysis)
    subjects = [str(s) for s in analysis["subject"].values]
    width = 4.0 * len(subjects) + 1.4
    fig = Figure(figsize=(width, 4.4))
    axes = fig.subplots(1, len(subjects), squeeze=False)[0]
    # fixed margins in inches for the tick labels (constrained layout is slow with many labels)
    fig.subplots_adjust(left=0.9 / width, right=1 - 1.0 / width, bottom=0.2, top=0.93, wspace=0.3)
    for ax, subject in zip(axes, subjects):
        s = analysis["similarity"].sel(subject=subject).values[np.ix_(order, order)]
        im = ax.imshow(s, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(order)), [labels[i] for i in order], rotation=90, fontsize=5)
        ax.set_yticks(range(len(order)), [labels[i] for i in order], fontsize=5)
        ax.set_title(subject, fontsize=9)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.7)
    return fig


def taskonomy_linkage(analysis: xr.Dataset) -> tuple[np.ndarray | None, list[int]]:
    """Taskonomy's tree over the tasks it covers (same linkage as the brain's) and their indices."""
    t = analysis["taskonomy_similarity"].values
    known = [i for i in range(t.shape[0]) if np.isfinite(t[i]).sum() > 1]
    if len(known) < 3:
        return None, known
    return sim.task_linkage(t[np.ix_(known, known)], analysis.attrs["linkage"]), known


def zero_significant_tasks(analysis: xr.Dataset) -> set[str]:
    """Labels of the tasks without a significant voxel in any subject (similarity row 0)."""
    none = analysis["no_significant_voxel"].all("subject").values
    return {lab for lab, n in zip(task_labels(analysis), none) if n}


_ZERO_COLOUR = "#8C8C8C"
_ZERO_SUFFIX = " (0 sig. voxels)"


def _dendrogram(ax, z: np.ndarray, names: list[str], orientation: str) -> dict[str, float]:
    """Draw one tree with its leaves on the inner side. -> leaf name -> y (axes fraction)."""
    d = hierarchy.dendrogram(z, labels=names, orientation=orientation, ax=ax, link_color_func=lambda _: "#333333",
                             leaf_font_size=8)
    n = len(d["ivl"])
    ax.set_ylim(0, 10 * n)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="x", labelsize=7)
    return {name: (10 * k + 5) / (10 * n) for k, name in enumerate(d["ivl"])}


def _style_leaves(ax, colour_of: dict[str, str], zero: set[str]) -> None:
    """Leaf labels in their cluster's colour; tasks without significant voxels grey italic."""
    ticks = ax.get_yticklabels()
    names = [t.get_text() for t in ticks]
    ax.set_yticks(ax.get_yticks(), [f"{n}{_ZERO_SUFFIX}" if n in zero else n for n in names])
    for t, name in zip(ax.get_yticklabels(), names):
        t.set_color(_ZERO_COLOUR if name in zero else colour_of.get(name, "#000000"))
        t.set_fontstyle("italic" if name in zero else "normal")


def figure_trees(analysis: xr.Dataset) -> Figure:
    """Figure 6 as a tanglegram: the brain's task tree (subject-mean similarity, left) facing
    Taskonomy's (transfer affinities, same linkage, right), each task's two leaves joined by
    a line in its Taskonomy cluster's colour. Both trees are rotated (children swapped, the
    trees unchanged) to reduce crossing lines (``tanglegram.untangle``). Tasks with no
    significant voxel in any subject have an all-0 similarity row, so they join the brain's
    tree at its root only for that reason: their label is grey italic with "(0 sig. voxels)"
    and their line dashed."""
    labels, clusters = task_labels(analysis), task_clusters(analysis)
    colour_of = {labels[i]: CLUSTER_COLOURS[clusters[i]] for i in range(len(labels))}
    zero = zero_significant_tasks(analysis)
    z_tax, known = taskonomy_linkage(analysis)
    link = analysis.attrs["linkage"]
    distance = "distance (1 - similarity)" if link != "ward" else "ward distance"
    z_brain = analysis["linkage_mean"].values
    fig = Figure(figsize=(11, 0.3 * len(labels) + 2.0), layout="constrained")
    ax1, axm, ax2 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3.2, 1.0, 3.2]})
    names_tax = [labels[i] for i in known]
    n_cross = None
    if z_tax is not None:
        z_brain, z_tax, n_cross = untangle(z_brain, labels, z_tax, names_tax)
    y_brain = _dendrogram(ax1, z_brain, labels, "left")
    _style_leaves(ax1, colour_of, zero)
    ax1.set_xlabel(distance, fontsize=8)
    ax1.set_title(f"Brain ({link} linkage, subject mean)\nARI vs Taskonomy clusters at "
                  f"k={analysis.attrs['n_clusters']}: {float(analysis['ari_taskonomy_mean']):.2f}", fontsize=9)
    axm.set_xlim(0, 1)
    axm.set_ylim(0, 1)
    axm.set_axis_off()
    if z_tax is not None:
        y_tax = _dendrogram(ax2, z_tax, names_tax, "right")
        _style_leaves(ax2, colour_of, set())
        ax2.set_xlabel(distance, fontsize=8)
        ax2.set_title(f"Taskonomy transfer ({analysis.attrs['taskonomy_affinities']} affinities, {link} linkage)"
                      f"\ncophenetic r with the brain's tree: "
                      f"{float(analysis['cophenetic_correlation_taskonomy_mean']):.2f}", fontsize=9)
        for name, yl in y_brain.items():
            if name not in y_tax:
                continue
            line, = axm.plot([0, 1], [yl, y_tax[name]], color=_ZERO_COLOUR if name in zero else colour_of[name],
                             lw=1.1, ls="--" if name in zero else "-", solid_capstyle="butt")
            line.set_gid(f"link:{name}")
        axm.set_title(f"{n_cross} crossing{'s' if n_cross != 1 else ''}", fontsize=8, color="#555555")
    else:
        ax2.set_axis_off()
        ax2.text(0.5, 0.5, "fewer than 3 tasks with Taskonomy affinities", ha="center")
    handles = _cluster_legend(clusters)
    if zero:
        handles.append(Line2D([0], [0], color=_ZERO_COLOUR, lw=1.1, ls="--",
                              label="no significant voxel in any subject (similarity 0 to every task)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    return freeze_layout(fig)


def hop_distances(graphs: Sequence[nx.Graph], nodes: Sequence[str]) -> np.ndarray:
    """(n, n) mean over ``graphs`` of the shortest-path length (edges counted, not weighted)
    between each pair of ``nodes``. A graph in which the pair is unconnected (or that lacks
    a node) does not count for it, so one graph's isolated task is placed by the other; a
    pair unconnected in every graph gets one more than the longest mean path."""
    n = len(nodes)
    total, count = np.zeros((n, n)), np.zeros((n, n))
    for g in graphs:
        lengths = dict(nx.all_pairs_shortest_path_length(g))
        for i, a in enumerate(nodes):
            for j, b in enumerate(nodes):
                if a in g and b in g and b in lengths[a]:
                    total[i, j] += lengths[a][b]
                    count[i, j] += 1
    out = np.full((n, n), np.nan)
    np.divide(total, count, out=out, where=count > 0)
    finite = np.isfinite(out)
    out[~finite] = (out[finite].max() if finite.any() else 0.0) + 1.0
    np.fill_diagonal(out, 0.0)
    return out


def shared_layout(graphs: Sequence[nx.Graph]) -> dict[str, np.ndarray]:
    """One node layout for several graphs over (mostly) the same tasks, scaled to [-1, 1]:
    Kamada-Kawai (positions whose distances match path lengths) on the graphs' mean
    path-length distances (``hop_distances``). A task then sits at the same place in every
    panel; unlike a spring layout, disconnected parts stay at a readable distance instead of
    being pushed to the edges. Deterministic (circular start)."""
    nodes = list(dict.fromkeys(v for g in graphs for v in g.nodes))
    if not nodes:
        return {}
    if len(nodes) == 1:
        return {nodes[0]: np.zeros(2)}
    d = hop_distances(graphs, nodes)
    union = nx.Graph()
    union.add_nodes_from(nodes)
    dist = {a: {b: float(d[i, j]) for j, b in enumerate(nodes)} for i, a in enumerate(nodes)}
    pos = nx.kamada_kawai_layout(union, dist=dist)
    xy = np.array([pos[v] for v in nodes])
    xy = xy - xy.mean(axis=0)
    xy = xy / (np.abs(xy).max() or 1.0)
    return {v: xy[i] for i, v in enumerate(nodes)}


_NODE_SIZE = 140.0  # points^2, networkx's node_size


def _draw_graph(ax, g: nx.Graph, pos: dict[str, np.ndarray], colour_of: dict[str, str], zero: set[str],
                title: str) -> None:
    weights = np.array([d["weight"] for _, _, d in g.edges(data=True)]) if g.number_of_edges() else np.array([])
    widths = 0.5 + 3.0 * (weights - weights.min()) / (np.ptp(weights) or 1.0) if weights.size else 1.0
    nx.draw_networkx_edges(g, pos, ax=ax, width=widths, edge_color="#A0A0A0")
    filled = [v for v in g.nodes if v not in zero]
    nx.draw_networkx_nodes(g, pos, nodelist=filled, ax=ax, node_size=_NODE_SIZE, node_color=[colour_of[v] for v in filled],
                           edgecolors="white", linewidths=0.8)
    hollow = [v for v in g.nodes if v in zero]
    if hollow:
        nodes = nx.draw_networkx_nodes(g, pos, nodelist=hollow, ax=ax, node_size=_NODE_SIZE, node_color="white",
                                       edgecolors=_ZERO_COLOUR, linewidths=1.2)
        nodes.set_linestyle("--")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


def figure_graphs(analysis: xr.Dataset, neighbours: int = 2) -> Figure:
    """Figure 7: the brain's task graph (subject mean, left) and Taskonomy's (right), each
    task joined to its ``neighbours`` most similar tasks (edge width ~ similarity), drawn in
    ONE layout (``shared_layout``: Kamada-Kawai on both graphs' mean path lengths) so a task
    sits at the same place in both panels. Labels are placed beside their nodes where they
    overlap no other label or node (``label_placement``), with a white halo over edges; the
    same label positions in both panels. Tasks without a significant voxel in any subject:
    open dashed nodes, grey italic labels."""
    labels, clusters = task_labels(analysis), task_clusters(analysis)
    colour_of = {labels[i]: CLUSTER_COLOURS[clusters[i]] for i in range(len(labels))}
    zero = zero_significant_tasks(analysis)
    attrs = {labels[i]: {"cluster": clusters[i]} for i in range(len(labels))}
    brain = sim.task_graph(analysis["similarity_mean"].values, labels, neighbours, attrs)
    t = analysis["taskonomy_similarity"].values
    known = [i for i in range(t.shape[0]) if np.isfinite(t[i]).sum() > 1]
    tax = None
    if len(known) >= 3:
        names = [labels[i] for i in known]
        tax = sim.task_graph(t[np.ix_(known, known)], names, neighbours, {n: attrs[n] for n in names})
    pos = shared_layout([g for g in (brain, tax) if g is not None])
    # fixed axes (no constrained layout): label boxes are measured in display space, so the
    # axes must not move after placement
    fig = Figure(figsize=(14, 7.2))
    rects = ((0.01, 0.1, 0.48, 0.82), (0.51, 0.1, 0.48, 0.82))
    ax1, ax2 = (fig.add_axes(r) for r in rects)
    xy = np.array(list(pos.values()))
    pad = 0.08
    for ax in (ax1, ax2):
        ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
        ax.set_ylim(xy[:, 1].min() - pad, xy[:, 1].max() + pad)
    _draw_graph(ax1, brain, pos, colour_of, zero, f"Brain task graph ({neighbours} nearest tasks each)")
    halo = [patheffects.withStroke(linewidth=2.5, foreground="white")]
    radius = np.sqrt(_NODE_SIZE) / 2
    shown = {v: f"{v}{_ZERO_SUFFIX}" if v in zero else v for v in pos}
    texts = place_labels(ax1, {v: pos[v] for v in brain.nodes}, shown, node_radius_pt=radius,
                         text_kw={"path_effects": halo})
    _style_graph_labels(texts, colour_of, zero)
    # for tests and callers: the layout and the placed labels of each panel
    fig.node_positions = pos
    fig.label_texts = {"brain": texts}
    if tax is not None:
        _draw_graph(ax2, tax, pos, colour_of, set(), f"Taskonomy task graph ({neighbours} nearest tasks each)")
        # the brain panel's label places, so labels sit alike in both panels
        texts2 = {}
        for v in tax.nodes:
            ref = texts.get(v)
            if ref is None:
                continue
            texts2[v] = ax2.text(*ref.get_position(), v, fontsize=ref.get_fontsize(), ha=ref.get_ha(),
                                 va=ref.get_va(), zorder=5, path_effects=halo)
        missing = [v for v in tax.nodes if v not in texts2]
        if missing:
            texts2.update(place_labels(ax2, {v: pos[v] for v in missing}, {v: v for v in missing},
                                       node_radius_pt=radius, text_kw={"path_effects": halo}))
        _style_graph_labels(texts2, colour_of, set())
        fig.label_texts["taskonomy"] = texts2
    else:
        ax2.set_axis_off()
        ax2.text(0.5, 0.5, "fewer than 3 tasks with Taskonomy affinities", ha="center", transform=ax2.transAxes)
    handles = _cluster_legend(clusters)
    if zero:
        handles.append(Line2D([0], [0], marker="o", ls="none", markerfacecolor="white", markeredgecolor=_ZERO_COLOUR,
                              label="no significant voxel in any subject"))
    handles.append(Line2D([0], [0], color="#A0A0A0", lw=2.0, label="edge width ~ similarity"))
    fig.legend(handles=handles, loc="lower center", ncols=len(handles), fontsize=8, frameon=False)
    return fig


def _style_graph_labels(texts: dict, colour_of: dict[str, str], zero: set[str]) -> None:
    for name, t in texts.items():
        # labels in near-black: cluster colours at 7.5 pt on white are hard to read; the node
        # carries the colour
        t.set_color(_ZERO_COLOUR if name in zero else "#222222")
        t.set_fontstyle("italic" if name in zero else "normal")
