"""The report: the paper's figures, NIfTI maps and one self-contained HTML page.

``neurotask report --config FILE`` reads the stored analysis (``analysis/task_structure``)
and the per-voxel results of the study and writes, under ``<workdir>/report/``:

* ``index.html``: every figure (PNG embedded as base64 data URIs, so the page works alone
  or with its folder copied anywhere), the comparison statistics and the run's provenance;
* ``figures/``: the same figures as PNG, and as SVG for the matrix, trees and graphs;
* ``nifti/<subject>/``: per task the whole-brain r map (``r_<task>.nii.gz``, every analysed
  voxel, NaN elsewhere), the significance masks of all tasks (``significant.nii.gz``, one
  volume per task in the order of ``tasks.txt``) and the thresholded maps drawn in Figures
  2-3, to open in any NIfTI viewer;
* ``statistics.json``: the comparison statistics.

Figures (numbers as in Neural Taskonomy): 1, mean r per ROI and task, per subject, bars
coloured by Taskonomy cluster; 2, the whole-brain map of one task's r (significant voxels)
as an axial slice mosaic with ROI outlines; 3, the 3D minus 2D contrasts (Keypoint, Edges)
in the voxels significant for either task; 5, the task similarity matrix in the order of its
tree; 6, the brain's task tree beside Taskonomy's, leaves coloured by Taskonomy cluster; 7,
the brain's task graph beside Taskonomy's. Figures are drawn on ``matplotlib.figure.Figure``
objects (Agg canvas, no pyplot state), so the report runs headless.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import networkx as nx
import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy.cluster import hierarchy

from neurotask.pipeline.stats import similarity as sim
from neurotask.pipeline.stats.task_structure import CONTRASTS, significance_mask, str_labels, voxel_contrasts
from neurotask.pipeline.config import Config
from neurotask.pipeline.errors import NeurotaskError
from neurotask.pipeline.stages.summary import roi_table
from neurotask.pipeline.tasks import CLUSTERS
from neurotask.storage import StudyStore, results_group, save_nifti, to_volume

logger = logging.getLogger(__name__)

# Okabe-Ito colours, one per Taskonomy cluster (colour-blind safe)
CLUSTER_COLOURS = {"3D": "#0072B2", "2D": "#E69F00", "semantic": "#009E73",
                   "lowdim_geometric": "#CC79A7", "outlier": "#7F7F7F", "": "#000000"}
CLUSTER_LABELS = {"3D": "3D", "2D": "2D", "semantic": "semantic", "lowdim_geometric": "low-dim. geometric",
                  "outlier": "Denoising (alone)", "": "not in Taskonomy"}
ROI_COLOURS = {"EarlyVis": "#00FFFF", "LOC": "#7CFC00", "OPA": "#FF00FF", "PPA": "#1E90FF", "RSC": "#FFFFFF"}
PACKAGES = ("numpy", "scipy", "xarray", "zarr", "dask", "distributed", "scikit-learn", "networkx",
            "matplotlib", "nibabel", "torch", "himalaya", "pyyaml")
PNG_DPI = 110


class ReportError(NeurotaskError):
    """The report cannot be made from what the store holds."""


# --------------------------------------------------------------------------- helpers


def _labels(analysis: xr.Dataset) -> list[str]:
    return [str(x) for x in analysis["label"].values]


def _clusters(analysis: xr.Dataset) -> list[str]:
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
    labels, clusters = _labels(analysis), _clusters(analysis)
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
    labels, clusters = _labels(analysis), _clusters(analysis)
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
    labels = _labels(analysis)
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
    labels, clusters = _labels(analysis), _clusters(analysis)
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


def neighbour_graph(similarity: np.ndarray, names: list[str], neighbours: int, attributes: dict[str, dict]) -> nx.Graph:
    """Each task joined to its ``neighbours`` most similar tasks (positive similarity only)."""
    s = np.array(similarity, dtype=np.float64)
    np.fill_diagonal(s, -np.inf)
    g = nx.Graph()
    g.add_nodes_from((name, attributes.get(name, {})) for name in names)
    for i, name in enumerate(names):
        for j in np.argsort(-s[i], kind="stable")[:neighbours]:
            if np.isfinite(s[i, j]) and s[i, j] > 0:
                g.add_edge(name, names[j], weight=float(s[i, j]))
    return g


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
    labels, clusters = _labels(analysis), _clusters(analysis)
    colour_of = {labels[i]: CLUSTER_COLOURS[clusters[i]] for i in range(len(labels))}
    attrs = {labels[i]: {"cluster": clusters[i]} for i in range(len(labels))}
    fig = Figure(figsize=(13, 6.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    brain = neighbour_graph(analysis["similarity_mean"].values, labels, neighbours, attrs)
    _draw_graph(ax1, brain, colour_of, f"Brain task graph ({neighbours} nearest tasks each)", seed)
    t = analysis["taskonomy_similarity"].values
    known = [i for i in range(t.shape[0]) if np.isfinite(t[i]).sum() > 1]
    if len(known) >= 3:
        names = [labels[i] for i in known]
        tax = neighbour_graph(t[np.ix_(known, known)], names, neighbours, {n: attrs[n] for n in names})
        _draw_graph(ax2, tax, colour_of, f"Taskonomy task graph ({neighbours} nearest tasks each)", seed)
    else:
        ax2.set_axis_off()
    fig.legend(handles=_cluster_legend(clusters), loc="outside lower center", ncols=5, fontsize=8, frameon=False)
    return fig


# --------------------------------------------------------------------------- maps


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


# --------------------------------------------------------------------------- report


@dataclass
class Image:
    """A figure written to disk and embedded in the page."""

    key: str
    title: str
    caption: str
    png: bytes
    files: list[str]


@dataclass
class ReportOptions:
    task: str | None = None
    n_slices: int = 16
    graph_neighbours: int = 2


def _save(fig: Figure, outdir: Path, name: str, svg: bool) -> tuple[bytes, list[str]]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, facecolor=fig.get_facecolor())
    png = buf.getvalue()
    (outdir / "figures").mkdir(parents=True, exist_ok=True)
    (outdir / "figures" / f"{name}.png").write_bytes(png)
    files = [f"figures/{name}.png"]
    if svg:
        fig.savefig(outdir / "figures" / f"{name}.svg", format="svg", facecolor=fig.get_facecolor())
        files.append(f"figures/{name}.svg")
    return png, files


def chosen_task(analysis: xr.Dataset, task: str | None) -> str:
    """The task of Figure 2: ``task``, or the one with the most significant voxels overall."""
    tasks = [str(t) for t in analysis["task"].values]
    if task is not None:
        if task not in tasks:
            raise ReportError(f"report.task {task!r} is not among the analysed tasks ({', '.join(tasks)})")
        return task
    return tasks[int(np.argmax(analysis["n_significant"].sum("subject").values))]


def build_report(
    analysis: xr.Dataset,
    results: dict[str, xr.Dataset],
    outdir: str | Path,
    *,
    options: ReportOptions | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write figures, NIfTI maps, statistics.json and index.html into ``outdir``. -> index.html.

    ``analysis``: the Dataset of :func:`pipeline.stats.task_structure.analyse`; ``results``: subject ->
    results (task, voxel) with voxel_i/j/k, roi and attrs volume_shape, affine (maps are
    drawn only for subjects whose voxels have positions).
    """
    options = options or ReportOptions()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    tasks = [str(t) for t in analysis["task"].values]
    labels = dict(zip(tasks, _labels(analysis)))
    images: list[Image] = []
    notes: list[str] = []

    def add(key: str, title: str, caption: str, fig: Figure, svg: bool = False) -> None:
        png, files = _save(fig, outdir, key, svg)
        images.append(Image(key, title, caption, png, files))

    # Figure 1
    if analysis.sizes.get("roi", 0):
        source = ("the separate ROI-only models" if analysis.attrs.get("roi_source") == "roi_results"
                  else "the whole-brain models' voxels in each ROI")
        add("fig1_roi_bars", "Figure 1. Prediction per ROI and task",
            f"Mean test-set r (error bars: SEM over voxels) of each task in each ROI, from {source}; "
            "bars coloured by the task's Taskonomy cluster.", figure_roi_bars(analysis))
    else:
        notes.append("Figure 1 is not drawn: the results carry no ROI labels.")

    # Figures 2-3 and NIfTI maps
    task = chosen_task(analysis, options.task)
    significance, fdr = analysis.attrs["significance"], float(analysis.attrs["fdr"])
    nifti_rows: list[tuple[str, list[str]]] = []
    for subject, ds in results.items():
        maps = subject_maps(subject, ds)
        if maps is None:
            notes.append(f"{subject}: voxels have no position in a volume; no maps or NIfTI files.")
            continue
        if ds.attrs.get("affine_note"):
            notes.append(f"{subject}: voxel positions are exact; the affine is {ds.attrs['affine_note']}.")
        ds = ds.sel(task=tasks)
        sig = significance_mask(ds, significance, fdr)  # (task, voxel)
        r = ds["r"].transpose("task", "voxel").values
        ndir = outdir / "nifti" / subject
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
        add(f"fig2_r_{task}_{subject}", f"Figure 2. {labels[task]}: whole-brain r, {subject}",
            f"Test-set r of the {labels[task]} model in the voxels significant for it "
            f"({significance}, FDR q < {fdr:g}: {int(sig[ti].sum())} of {sig.shape[1]} voxels); axial slices, "
            "analysed voxels in grey, ROI outlines in colour.",
            figure_mosaic(r_sig, maps.background, maps.rois, n_slices=options.n_slices,
                          title=f"{subject}: {labels[task]} r (significant voxels)", cmap="hot",
                          vmin=0.0, vmax=max(vmax, 1e-3), colorbar_label="test r"))
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
            add(f"fig3_{name}_{subject}",
                f"Figure 3. {labels[CONTRASTS[name][0]]} minus {labels[CONTRASTS[name][1]]}, {subject}",
                f"r({labels[CONTRASTS[name][0]]}) - r({labels[CONTRASTS[name][1]]}) in the {int(either.sum())} voxels "
                f"significant for either task; red: the 3D task predicts better ({wins} voxels).",
                figure_mosaic(vol, maps.background, maps.rois, n_slices=options.n_slices,
                              title=f"{subject}: {labels[CONTRASTS[name][0]]} - {labels[CONTRASTS[name][1]]}",
                              cmap="RdBu_r", vmin=-max(lim, 1e-3), vmax=max(lim, 1e-3), colorbar_label="r difference"))
        nifti_rows.append((subject, written))
    logger.info("report: figures 1-3 and NIfTI maps written")

    # Figures 5-7
    add("fig5_similarity", "Figure 5. Task similarity", "Brain-derived task similarity "
        f"({analysis.attrs['metric']} of the FDR-masked r), subject mean, tasks in the leaf order of its "
        f"{analysis.attrs['linkage']}-linkage tree; labels coloured by Taskonomy cluster.",
        figure_similarity(analysis), svg=True)
    if analysis.sizes["subject"] > 1:
        add("fig5_similarity_subjects", "Figure 5 (per subject)", "Each subject's similarity matrix in the order "
            "of the subject-mean tree.", figure_similarity_subjects(analysis))
    add("fig6_trees", "Figure 6. Task trees", "Left: the brain's task tree (subject-mean similarity). Right: "
        "Taskonomy's tree from its transfer-out affinities, same linkage. Leaves coloured by the task's cluster "
        "in Taskonomy's task tree.", figure_trees(analysis), svg=True)
    add("fig7_graphs", "Figure 7. Task graphs", f"Each task joined to its {options.graph_neighbours} most "
        "similar tasks (edge width ~ similarity), spring layout; left brain, right Taskonomy.",
        figure_graphs(analysis, options.graph_neighbours), svg=True)

    statistics = comparison_statistics(analysis)
    (outdir / "statistics.json").write_text(json.dumps(statistics, indent=1))
    page = render_html(analysis, statistics, images, notes, nifti_rows, provenance or {}, task,
                       roi_criteria_table(results))
    index = outdir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


# --------------------------------------------------------------------------- statistics


def _f(x) -> float | None:
    x = float(x)
    return None if not np.isfinite(x) else x


def comparison_statistics(analysis: xr.Dataset) -> dict:
    """The headline numbers as plain JSON-able values."""
    a = analysis
    subjects = [str(s) for s in a["subject"].values]
    rows = {}
    for s in subjects:
        rows[s] = {
            "spearman_taskonomy": _f(a.spearman_taskonomy.sel(subject=s)),
            "spearman_ci": [_f(x) for x in a.spearman_taskonomy_ci.sel(subject=s).values],
            "mantel_p": _f(a.mantel_p.sel(subject=s)),
            "ari_taskonomy": _f(a.ari_taskonomy.sel(subject=s)),
            "ari_taskonomy_tree": _f(a.ari_taskonomy_tree.sel(subject=s)),
            "cophenetic_correlation": _f(a.cophenetic_correlation_taskonomy.sel(subject=s)),
        }
    rows["mean"] = {
        "spearman_taskonomy": _f(a.spearman_taskonomy_mean),
        "spearman_ci": [_f(x) for x in a.spearman_taskonomy_mean_ci.values],
        "mantel_p": _f(a.mantel_p_mean),
        "ari_taskonomy": _f(a.ari_taskonomy_mean),
        "ari_taskonomy_tree": _f(a.ari_taskonomy_tree_mean),
        "cophenetic_correlation": _f(a.cophenetic_correlation_taskonomy_mean),
    }
    tasks = [str(t) for t in a["task"].values]
    return {
        "settings": {k: a.attrs[k] for k in ("significance", "fdr", "metric", "linkage", "n_clusters",
                                              "n_permutations", "n_bootstrap", "seed", "ci", "taskonomy_affinities")},
        "taskonomy_comparison": rows,
        "n_significant": {s: dict(zip(tasks, map(int, a.n_significant.sel(subject=s).values))) for s in subjects},
        "n_voxels": dict(zip(subjects, map(int, a.n_voxels.values))),
        "subject_correlation": {f"{x}-{y}": _f(a.subject_correlation.sel(subject=x, subject2=y))
                                for i, x in enumerate(subjects) for y in subjects[i + 1:]},
        "clusters_mean_tree": dict(zip(tasks, map(int, a.cluster_mean.values))),
        "contrasts_whole_brain": {s: {str(c): [int(a.contrast_n_3d_wins_whole_brain.sel(subject=s, contrast=c)),
                                               int(a.contrast_n_voxels_whole_brain.sel(subject=s, contrast=c))]
                                      for c in a["contrast"].values} for s in subjects},
    }


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.4}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}
td,th{border:1px solid #ccc;padding:0.2em 0.6em;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}
figure{margin:1.5em 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:0.9em;color:#444}pre{background:#f6f6f6;padding:0.8em;overflow-x:auto;font-size:0.8em}
.note{color:#8a4b00}.files{font-size:0.85em}
"""


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return html.escape(str(x))


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, str) else _fmt(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def roi_criteria_table(results: dict[str, xr.Dataset]) -> str:
    """ROI x task, averaged over subjects: % significant voxels by parametric and permutation
    q, and the median noise-normalised r (r / noise ceiling), as one HTML table."""
    tables = [roi_table(r) for r in results.values() if r.sizes.get("voxel", 0) and (r["roi"] != "").any()]
    if not tables:
        return ""
    mean = xr.concat(tables, dim="subject", join="inner").mean("subject", skipna=True)
    rois = [str(x) for x in mean["roi"].values]
    rows = []
    for t in mean["task"].values:
        row = [html.escape(str(t))]
        for roi in rois:
            c = mean.sel(task=t, roi=roi)
            cell = f"{100 * float(c['fraction_significant']):.0f}%"
            if "fraction_significant_perm" in c:
                cell += f" / {100 * float(c['fraction_significant_perm']):.0f}%"
            if "median_noise_normalized_r" in c:
                cell += f"; {float(c['median_noise_normalized_r']):.2f}"
            row.append(cell)
        rows.append(row)
    has_perm = "fraction_significant_perm" in mean
    has_nc = "median_noise_normalized_r" in mean
    return ("<h2>ROIs: significance criteria and noise ceiling</h2><p>Per ROI and task, averaged over subjects: "
            "% of the ROI's voxels significant (BH-FDR) by the parametric p"
            + (" / by the permutation p" if has_perm else "")
            + ("; median noise-normalised r (test r divided by the voxel's NCSNR noise ceiling from the repeated "
               "images)" if has_nc else "") + ".</p>" + _table(["task"] + rois, rows))


def render_html(analysis: xr.Dataset, statistics: dict, images: list[Image], notes: list[str],
                nifti_rows: list[tuple[str, list[str]]], provenance: dict, task: str,
                roi_criteria: str = "") -> str:
    """One self-contained page: images embedded as data URIs; links to the files beside it."""
    a = analysis
    e = html.escape
    subjects = [str(s) for s in a["subject"].values]
    tasks = [str(t) for t in a["task"].values]
    labels = _labels(a)
    clusters = _clusters(a)
    title = provenance.get("study", "neurotask study")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}: neurotask report</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{e(title)}: brain-derived task structure</h1>",
             f"<p>{len(subjects)} subject(s), {len(tasks)} Taskonomy tasks. Created {e(provenance.get('created', ''))}."
             f" Settings: {e(a.attrs['significance'])} significance, FDR q &lt; {a.attrs['fdr']:g}; "
             f"{e(a.attrs['metric'])} similarity; {e(a.attrs['linkage'])} linkage; tree cut at "
             f"k = {a.attrs['n_clusters']}; Taskonomy {e(a.attrs['taskonomy_affinities'])} affinities; "
             f"{a.attrs['n_permutations']} Mantel permutations; {a.attrs['n_bootstrap']} voxel bootstraps "
             f"({a.attrs['ci']:.0%} intervals); seed {a.attrs['seed']}.</p>"]
    # statistics
    cmp = statistics["taskonomy_comparison"]
    rows = [[name if name != "mean" else "subject mean", v["spearman_taskonomy"],
             f"[{_fmt(v['spearman_ci'][0])}, {_fmt(v['spearman_ci'][1])}]", v["mantel_p"], v["ari_taskonomy"],
             v["ari_taskonomy_tree"], v["cophenetic_correlation"]] for name, v in cmp.items()]
    parts += ["<h2>Brain vs Taskonomy</h2>",
              "<p>Spearman r between the upper triangles of the brain's and Taskonomy's task similarity, its "
              "one-sided Mantel permutation p and bootstrap-over-voxels interval; adjusted Rand index of the brain "
              f"tree cut at k = {a.attrs['n_clusters']} against Taskonomy's clusters (3D, 2D, low-dim., semantic, "
              "Denoising) and against Taskonomy's own tree cut at the same k; correlation of the two trees' "
              "cophenetic distances.</p>",
              _table(["", "Spearman r", f"{a.attrs['ci']:.0%} CI", "Mantel p", "ARI clusters", "ARI tree",
                      "cophenetic r"], rows)]
    if len(subjects) > 1:
        parts += ["<p>Consistency across subjects (Pearson r of the similarity matrices' upper triangles):</p>",
                  _table(["pair", "r"], [[k, v] for k, v in statistics["subject_correlation"].items()])]
    sig_rows = [[e(labels[i]), f"<span style='color:{CLUSTER_COLOURS[clusters[i]]}'>"
                 f"{e(CLUSTER_LABELS[clusters[i]])}</span>", int(a.cluster_mean.values[i])]
                + [str(statistics["n_significant"][s][t]) for s in subjects] for i, t in enumerate(tasks)]
    sig_rows.append(["voxels analysed", "", ""] + [str(statistics["n_voxels"][s]) for s in subjects])
    parts += ["<h2>Significant voxels per task</h2>",
              f"<p>Voxels with FDR q &lt; {a.attrs['fdr']:g}; 'tree group': the task's group in the subject-mean "
              f"tree cut at k = {a.attrs['n_clusters']}.</p>",
              _table(["task", "Taskonomy cluster", "tree group"] + subjects, sig_rows)]
    none = [labels[i] for i, t in enumerate(tasks) if all(statistics["n_significant"][s][t] == 0 for s in subjects)]
    if none:
        parts.append(f"<p class='note'>No significant voxel in any subject: {e(', '.join(none))} "
                     "(its similarity to every task is 0).</p>")
    if a.sizes.get("contrast", 0):
        crow = []
        for s in subjects:
            for c in a["contrast"].values:
                row = [f"{s} {c}"]
                for g in a["roi_group"].values:
                    w = int(a.contrast_n_3d_wins.sel(subject=s, contrast=c, roi_group=g))
                    n = int(a.contrast_n_voxels.sel(subject=s, contrast=c, roi_group=g))
                    row.append(f"{w} / {n}" + (f" ({w / n:.0%})" if n else ""))
                w, n = statistics["contrasts_whole_brain"][s][str(c)]
                row.append(f"{w} / {n}" + (f" ({w / n:.0%})" if n else ""))
                crow.append(row)
        parts += ["<h2>3D vs 2D features (Figure 3)</h2>",
                  "<p>Voxels significant for either task of the pair in which the 3D task predicts better.</p>",
                  _table(["subject, pair"] + [str(g) for g in a["roi_group"].values] + ["whole brain"], crow)]
    if roi_criteria:
        parts.append(roi_criteria)
    # figures
    parts.append("<h2>Figures</h2>")
    for note in notes:
        parts.append(f"<p class='note'>{e(note)}</p>")
    for im in images:
        data = base64.b64encode(im.png).decode("ascii")
        links = " ".join(f"<a href='{e(f)}'>{e(Path(f).suffix[1:].upper())}</a>" for f in im.files)
        parts.append(f"<figure id='{e(im.key)}'><img alt='{e(im.title)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption><b>{e(im.title)}.</b> {e(im.caption)} <span class='files'>{links}</span>"
                     "</figcaption></figure>")
    if nifti_rows:
        parts.append("<h2>NIfTI maps</h2><p>In <code>nifti/&lt;subject&gt;/</code> beside this page, in each "
                     "subject's functional grid: " + e(f"r of every task (unthresholded), the significance masks, "
                                                        f"and the maps of Figures 2 ({labels[tasks.index(task)]}) "
                                                        "and 3.") + "</p><ul>")
        for subject, files in nifti_rows:
            parts.append(f"<li>{e(subject)}: " + ", ".join(f"<code>{e(f)}</code>" for f in files) + "</li>")
        parts.append("</ul>")
    # provenance
    parts.append("<h2>Provenance</h2>")
    prov_rows = [[e(k), e(str(v))] for k, v in provenance.items() if k not in ("config_text", "packages", "results")]
    parts.append(_table(["", ""], prov_rows))
    if provenance.get("results"):
        parts.append("<p>Results per subject:</p>" + _table(
            ["subject", "source", "parameters"], [[e(s), e(v["source"]), e(v["parameters"])]
                                                  for s, v in provenance["results"].items()]))
    if provenance.get("packages"):
        parts.append("<p>Package versions:</p>" + _table(["package", "version"],
                                                         [[e(k), e(v)] for k, v in provenance["packages"].items()]))
    if provenance.get("config_text"):
        parts.append(f"<p>Configuration:</p><pre>{e(provenance['config_text'])}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- orchestration


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("neurotask", *PACKAGES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]  # the checkout, for an editable install
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def provenance(cfg: Config, analysis: xr.Dataset, results: dict[str, xr.Dataset]) -> dict:
    """Config, versions, dates and where the results came from."""
    prov = {
        "study": cfg.study.name,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "analysis computed": analysis.attrs.get("created", ""),
        "config file": str(cfg.path),
        "store": str(cfg.store_path),
        "host": platform.node(),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    commit = _git_commit()
    if commit:
        prov["neurotask commit"] = commit
    prov["results"] = {
        s: {"source": str(ds.attrs.get("source", "fitted by neurotask")),
            "parameters": json.dumps(ds.attrs.get("fit", {}), sort_keys=True) if "fit" in ds.attrs else ""}
        for s, ds in results.items()}
    prov["packages"] = package_versions()
    try:
        prov["config_text"] = cfg.path.read_text()
    except OSError:
        pass
    return prov


def report_dir(cfg: Config) -> Path:
    return cfg.workdir / "report"


def write_report(cfg: Config) -> Path:
    """The study's report from the stored analysis and results. -> path of index.html."""
    from neurotask.pipeline.stages.analyse import read_analysis

    analysis = read_analysis(cfg)
    store = StudyStore(cfg.store_path)
    subjects = [str(s) for s in analysis["subject"].values]
    missing = [s for s in subjects if not store.has(results_group(s))]
    if missing:
        raise ReportError(f"{cfg.store_path}: the analysis covers {', '.join(missing)} but their results are gone")
    results = {s: store.results(s) for s in subjects}
    options = ReportOptions(task=cfg.report.task, n_slices=cfg.report.n_slices,
                            graph_neighbours=cfg.report.graph_neighbours)
    t0 = time.perf_counter()
    index = build_report(analysis, results, report_dir(cfg), options=options,
                         provenance=provenance(cfg, analysis, results))
    logger.info(f"report: {index} ({time.perf_counter() - t0:.1f} s)")
    return index
