"""The report's figures, drawn from the stored analysis and per-voxel maps.

Numbers as in Neural Taskonomy: 1, mean r per ROI and task, per subject, bars coloured by
Taskonomy cluster; 2, the whole-brain map of one task's r (significant voxels) as an axial
slice mosaic with ROI outlines; 3, the 3D minus 2D contrasts (Keypoint, Edges) in the voxels
significant for either task; 5, the task similarity matrix in the order of its tree; 6, the
brain's task tree beside Taskonomy's, leaves coloured by Taskonomy cluster; 7, the brain's
task graph beside Taskonomy's. Figures are drawn on ``matplotlib.figure.Figure`` objects
(Agg canvas, no pyplot state), so they draw headless; saving them is the report stage's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy.cluster import hierarchy

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


# --------------------------------------------------------------------------- figures


def figure_roi_bars(analysis: xr.Dataset) -> Figure:
    """Figure 1: mean r (+- SEM) per ROI and task, one panel per subject."""
    subjects = [str(s) for s in analysis["subject"].values]
    rois = sorted((str(r) for r in analysis["roi"].values), key=_roi_rank)
    labels, clusters = task_labels(analysis), task_clusters(analysis)
    order = cluster_order(clusters)
    t = len(order)
    # about 1.3 inch per ROI: 21 bars a group stay readable without a page-wide figure
    fig = Figure(figsize=(min(max(8.0, 1.3 * len(rois) + 1.5), 16.0), 2.4 * len(subjects) + 0.8), layout="constrained")
    axes = fig.subplots(len(subjects), 1, squeeze=False)[:, 0]
    width = 0.8 / t
    for ax, subject in zip(axes, subjects):
        mean = analysis["roi_mean_r"].sel(subject=subject, roi=rois).values  # (task, roi)
        sem = analysis["roi_sem_r"].sel(subject=subject, roi=rois).values
        for pos, i in enumerate(order):
            x = np.arange(len(rois)) - 0.4 + (pos + 0.5) * width
            ax.bar(x, mean[i], width, yerr=sem[i], color=CLUSTER_COLOURS[clusters[i]],
                   error_kw={"elinewidth": 0.5, "capsize": 0}, label=labels[i])
        ax.set_xticks(np.arange(len(rois)), rois, fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel("mean test r")
        ax.set_title(subject, loc="left", fontsize=10)
        ax.set_xlim(-0.5, len(rois) - 0.5)
    fig.legend(handles=_cluster_legend(clusters), loc="outside upper center", ncols=6, fontsize=8, frameon=False)
    return fig


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
    """Figure 5: the subject-mean similarity matrix, tasks in the dendrogram order of its tree."""
    order = [int(i) for i in analysis["leaves_mean"].values]
    labels, clusters = task_labels(analysis), task_clusters(analysis)
    names = [labels[i] for i in order]
    s = analysis["similarity_mean"].values[np.ix_(order, order)]
    fig = Figure(figsize=(7.5, 6.8), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(s, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    colour_of = {labels[i]: CLUSTER_COLOURS[clusters[i]] for i in range(len(labels))}
    _colour_ticklabels(ax.get_xticklabels(), colour_of)
    _colour_ticklabels(ax.get_yticklabels(), colour_of)
    fig.colorbar(im, ax=ax, shrink=0.7, label=f"{analysis.attrs['metric']} similarity")
    n_sub = analysis.sizes["subject"]
    ax.set_title(f"Brain task similarity (mean of {n_sub} subject{'s' if n_sub > 1 else ''}), tree order", fontsize=10)
    fig.legend(handles=_cluster_legend(clusters), loc="outside lower center", ncols=5, fontsize=7, frameon=False)
    return fig


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


def _dendrogram(ax, z: np.ndarray, names: list[str], colour_of: dict[str, str], title: str) -> None:
    hierarchy.dendrogram(z, labels=names, orientation="left", ax=ax, link_color_func=lambda _: "#333333",
                         leaf_font_size=8)
    _colour_ticklabels(ax.get_yticklabels(), colour_of)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("distance (1 - similarity)" if "ward" not in title else "ward distance")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def figure_trees(analysis: xr.Dataset) -> Figure:
    """Figure 6: the brain's task tree (subject mean) beside Taskonomy's, leaves coloured by cluster."""
    labels, clusters = task_labels(analysis), task_clusters(analysis)
    colour_of = {labels[i]: CLUSTER_COLOURS[clusters[i]] for i in range(len(labels))}
    z_tax, known = taskonomy_linkage(analysis)
    fig = Figure(figsize=(11, 0.28 * len(labels) + 1.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    link = analysis.attrs["linkage"]
    _dendrogram(ax1, analysis["linkage_mean"].values, labels, colour_of,
                f"Brain ({link} linkage); ARI vs Taskonomy clusters at k={analysis.attrs['n_clusters']}: "
                f"{float(analysis['ari_taskonomy_mean']):.2f}")
    if z_tax is not None:
        _dendrogram(ax2, z_tax, [labels[i] for i in known], colour_of,
                    f"Taskonomy transfer ({analysis.attrs['taskonomy_affinities']} affinities, {link} linkage)")
    else:
        ax2.set_axis_off()
        ax2.text(0.5, 0.5, "fewer than 3 tasks with Taskonomy affinities", ha="center")
    fig.legend(handles=_cluster_legend(clusters), loc="outside lower center", ncols=5, fontsize=8, frameon=False)
    return fig


def _draw_graph(ax, g: nx.Graph, colour_of: dict[str, str], title: str, seed: int) -> None:
    # k: node spacing a little wider than networkx's default 1/sqrt(n), so labels overlap less
    pos = nx.spring_layout(g, weight="weight", seed=seed, k=2.0 / np.sqrt(max(g.number_of_nodes(), 1)))
    weights = np.array([d["weight"] for _, _, d in g.edges(data=True)]) if g.number_of_edges() else np.array([])
    widths = 0.5 + 3.0 * (weights - weights.min()) / (np.ptp(weights) or 1.0) if weights.size else 1.0
    nx.draw_networkx_edges(g, pos, ax=ax, width=widths, edge_color="#999999")
    nx.draw_networkx_nodes(g, pos, ax=ax, node_size=160, node_color=[colour_of[n] for n in g.nodes])
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=7, verticalalignment="bottom")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    ax.margins(0.12)


def figure_graphs(analysis: xr.Dataset, neighbours: int = 2, seed: int = 0) -> Figure:
    """Figure 7: brain task graph (subject mean) beside Taskonomy's, each task joined to its
    ``neighbours`` most similar tasks; edge width ~ similarity."""
    labels, clusters = task_labels(analysis), task_clusters(analysis)
    colour_of = {labels[i]: CLUSTER_COLOURS[clusters[i]] for i in range(len(labels))}
    attrs = {labels[i]: {"cluster": clusters[i]} for i in range(len(labels))}
    fig = Figure(figsize=(13, 6.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    brain = sim.task_graph(analysis["similarity_mean"].values, labels, neighbours, attrs)
    _draw_graph(ax1, brain, colour_of, f"Brain task graph ({neighbours} nearest tasks each)", seed)
    t = analysis["taskonomy_similarity"].values
    known = [i for i in range(t.shape[0]) if np.isfinite(t[i]).sum() > 1]
    if len(known) >= 3:
        names = [labels[i] for i in known]
        tax = sim.task_graph(t[np.ix_(known, known)], names, neighbours, {n: attrs[n] for n in names})
        _draw_graph(ax2, tax, colour_of, f"Taskonomy task graph ({neighbours} nearest tasks each)", seed)
    else:
        ax2.set_axis_off()
    fig.legend(handles=_cluster_legend(clusters), loc="outside lower center", ncols=5, fontsize=8, frameon=False)
    return fig

