"""The report's non-map figures: Figure 1's ROI test marks and noise ceiling, Figure 6's
tanglegram, Figure 7's shared layout and non-overlapping labels, and the page sections.

A small planted study (analysed in-process, no fit) for the checks of what is drawn; the
authors' published results for Figure 7's labels on real data."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from scipy.cluster import hierarchy
from scipy.stats import norm

from conftest import reference_path
from neurotask.pipeline.formats.published import load_reference_npz, load_reference_roi_npz, results_dataset
from neurotask.pipeline.report import figures as F
from neurotask.pipeline.report.label_placement import boxes_overlap, overlapping_labels
from neurotask.pipeline.report.page import ReportPage
from neurotask.pipeline.report.sections import roi_figures, structure_figures
from neurotask.pipeline.report.tanglegram import crossings, leaf_names, rotate, untangle
from neurotask.pipeline.stats.task_structure import analyse
from neurotask.pipeline.tasks import task_info

TASKS = ["edge2d", "keypoint2d", "keypoint3d", "rgb2depth", "rgb2sfnorm", "class_1000", "class_places", "curvature"]
ROIS = ["LHEarlyVis", "RHEarlyVis", "LHPPA", "RHPPA"]
N_ROI, N_OTHER, N_TEST = 40, 240, 200
CEILING = {"LHEarlyVis": 0.6, "RHEarlyVis": 0.5, "LHPPA": 0.7, "RHPPA": 0.8}


def planted_results(seed: int) -> xr.Dataset:
    """8 tasks x 400 voxels: 2D tasks predict EarlyVis, 3D tasks PPA, semantic tasks the
    unlabelled voxels; curvature predicts nothing (p = 1). A noise ceiling per ROI."""
    rng = np.random.default_rng(seed)
    roi = np.concatenate([np.repeat(ROIS, N_ROI), np.full(N_OTHER, "")])
    v = roi.size
    r = rng.normal(0.0, 0.03, (len(TASKS), v))
    where = {"2D": np.isin(roi, ROIS[:2]), "3D": np.isin(roi, ROIS[2:]), "semantic": roi == ""}
    for t, task in enumerate(TASKS):
        cluster = task_info(task).cluster
        if cluster in where:
            r[t, where[cluster]] += 0.35 + rng.normal(0, 0.05, where[cluster].sum())
    p = 2 * norm.sf(np.abs(r) * np.sqrt(N_TEST))
    p[TASKS.index("curvature")] = 1.0
    ds = results_dataset(TASKS, r, p, roi=roi)
    ceiling = np.array([CEILING.get(x, np.nan) for x in roi])
    ceiling[:3] = np.nan  # a few voxels without a ceiling estimate: left out of the ROI mean
    return ds.assign(noise_ceiling_r=("voxel", ceiling))


@pytest.fixture(scope="module")
def planted():
    results = {"CSI1": planted_results(1), "CSI2": planted_results(2)}
    return results, analyse(results, n_clusters=3, n_bootstrap=5, n_permutations=20)


def _bar_faces(fig) -> dict[str, tuple]:
    """gid 'roi:task' -> face colour of every Figure 1 bar."""
    return {p.get_gid(): tuple(p.get_facecolor()) for ax in fig.axes for p in ax.patches if p.get_gid()}


# --------------------------------------------------------------------------- Figure 1


def test_figure1_marks_the_significant_roi_task_cells(planted):
    _, a = planted
    sig = a["roi_significant"]
    # the planted truth: 2D tasks predict EarlyVis and not PPA, 3D tasks the reverse
    assert bool(sig.sel(task="edge2d", roi="LHEarlyVis").all()) and not bool(sig.sel(task="edge2d", roi="LHPPA").any())
    assert bool(sig.sel(task="rgb2depth", roi="RHPPA").all()) and not bool(sig.sel(task="rgb2depth", roi="RHEarlyVis").any())
    assert not bool(sig.sel(task="curvature").any())
    for subject in (None, "CSI1"):
        faces = _bar_faces(F.figure_roi_bars(a, subject))
        assert len(faces) == len(ROIS) * len(TASKS)
        white = (1.0, 1.0, 1.0, 1.0)
        assert faces["LHEarlyVis:edge2d"] != white and faces["LHPPA:edge2d"] == white
        assert faces["RHPPA:rgb2depth"] != white and faces["RHEarlyVis:rgb2depth"] == white
        assert faces["LHEarlyVis:curvature"] == white
        # a filled bar is its cluster's colour
        from matplotlib.colors import to_rgba
        assert faces["LHEarlyVis:edge2d"] == to_rgba(F.CLUSTER_COLOURS["2D"])


def test_figure1_names_every_task_and_draws_the_roi_noise_ceiling(planted):
    _, a = planted
    fig = F.figure_roi_bars(a, "CSI2")
    labels = {task_info(t).label for t in TASKS}
    bottom = [ax for ax in fig.axes if ax.axison and ax.get_xticklabels() and ax.get_xticklabels()[0].get_text()]
    assert bottom and all({t.get_text() for t in ax.get_xticklabels()} == labels for ax in bottom)
    for ax in fig.axes:
        if not ax.axison:
            continue
        roi = ax.get_title().split(" ")[0]
        dashed = [ln.get_ydata()[0] for ln in ax.lines if ln.get_linestyle() == "--"]
        assert dashed == [pytest.approx(CEILING[roi])], roi
    # the normalised variant: r / ceiling, the ceiling at 1
    n = a["roi_noise_normalized_r"].sel(subject="CSI2", task="edge2d", roi="LHEarlyVis")
    r = a["roi_mean_r"].sel(subject="CSI2", task="edge2d", roi="LHEarlyVis")
    assert float(n) == pytest.approx(float(r) / CEILING["LHEarlyVis"], rel=0.15)  # median vs mean
    fig = F.figure_roi_bars(a, "CSI2", normalized=True)
    assert all([ln.get_ydata()[0] for ln in ax.lines if ln.get_linestyle() == "--"] == [1.0]
               for ax in fig.axes if ax.axison)


def test_figure1_of_an_older_analysis_without_the_roi_test_or_ceiling(planted, tmp_path):
    _, a = planted
    old = a.drop_vars(["roi_p", "roi_q", "roi_significant", "roi_noise_ceiling", "roi_noise_normalized_r"])
    faces = _bar_faces(F.figure_roi_bars(old))
    assert (1.0, 1.0, 1.0, 1.0) not in faces.values()  # no test: nothing drawn as not significant
    page = ReportPage(tmp_path, dpi=50)
    roi_figures(page, old)
    keys = [f.key for f in page.figures]
    assert keys == ["fig1_roi_bars", "fig1_roi_bars_CSI1", "fig1_roi_bars_CSI2"]
    assert "predates it" in page.figures[0].caption
    assert any("Noise-normalised ROI bars are not drawn" in n for n in page.notes)


def test_roi_figures_add_normalised_bars_and_svgs_with_the_test_in_the_caption(planted, tmp_path):
    _, a = planted
    page = ReportPage(tmp_path, dpi=50)
    roi_figures(page, a)
    keys = [f.key for f in page.figures]
    assert keys == ["fig1_roi_bars", "fig1_roi_bars_CSI1", "fig1_roi_bars_CSI2", "fig1_roi_noise_normalized",
                    "fig1_roi_noise_normalized_CSI1", "fig1_roi_noise_normalized_CSI2"]
    for f in page.figures:
        assert f.section == "fig1" and f.files == [f"figures/{f.key}.png", f"figures/{f.key}.svg"]
        assert (tmp_path / f"figures/{f.key}.svg").is_file()
    assert "Simes" in page.figures[0].caption and "in every subject" in page.figures[0].caption
    assert "Dashed line: the ROI's noise ceiling" in page.figures[0].caption


# --------------------------------------------------------------------------- Figure 6


def test_crossings_and_untangling_a_rotated_copy():
    assert crossings(["a", "b", "c"], ["a", "b", "c"]) == 0
    assert crossings(["a", "b", "c"], ["c", "b", "a"]) == 3
    assert crossings(["a", "b", "x"], ["b", "a"]) == 1  # names on one side only have no link
    rng = np.random.default_rng(0)
    names = [f"t{i}" for i in range(12)]
    z = hierarchy.linkage(rng.normal(size=(12, 3)), "average")
    twisted = z
    for merge in (10, 7, 3):
        twisted = rotate(twisted, merge)
    assert crossings(leaf_names(z, names), leaf_names(twisted, names)) > 0
    left, right, n = untangle(z, names, twisted, names)
    assert n == 0 == crossings(leaf_names(left, names), leaf_names(right, names))
    # rotations only: the same trees
    for a, b in ((z, left), (twisted, right)):
        np.testing.assert_allclose(hierarchy.cophenet(a), hierarchy.cophenet(b))


def test_tanglegram_links_join_each_task_and_mark_tasks_without_significant_voxels(planted):
    _, a = planted
    fig = F.figure_trees(a)
    brain_ax, mid, tax_ax = fig.axes[:3]

    def leaf_y(ax) -> dict[str, float]:
        lo, hi = ax.get_ylim()
        return {t.get_text().removesuffix(" (0 sig. voxels)"): (y - lo) / (hi - lo)
                for t, y in zip(ax.get_yticklabels(), ax.get_yticks())}

    yb, yt = leaf_y(brain_ax), leaf_y(tax_ax)
    links = {ln.get_gid().removeprefix("link:"): ln for ln in mid.lines if (ln.get_gid() or "").startswith("link:")}
    assert set(links) == {task_info(t).label for t in TASKS}
    for name, ln in links.items():
        (x0, x1), (y0, y1) = ln.get_xdata(), ln.get_ydata()
        assert (x0, x1) == (0, 1)
        assert y0 == pytest.approx(yb[name]) and y1 == pytest.approx(yt[name])
    # curvature has no significant voxel: grey italic label with the note, dashed link
    curv = task_info("curvature").label
    label = next(t for t in brain_ax.get_yticklabels() if t.get_text().startswith(curv))
    assert label.get_text() == f"{curv} (0 sig. voxels)" and label.get_fontstyle() == "italic"
    assert links[curv].get_linestyle() == "--"
    assert all(ln.get_linestyle() == "-" for n, ln in links.items() if n != curv)
    assert any("no significant voxel" in t.get_text() for t in fig.legends[0].get_texts())
    # the crossings shown are those of the drawn orders
    order_b = [n for n, _ in sorted(yb.items(), key=lambda kv: kv[1])]
    order_t = [n for n, _ in sorted(yt.items(), key=lambda kv: kv[1])]
    n = crossings(order_b, order_t)
    assert mid.get_title() == f"{n} crossing{'s' if n != 1 else ''}"


# --------------------------------------------------------------------------- Figure 7


def _node_offsets(ax) -> set[tuple[float, float]]:
    return {tuple(np.round(xy, 9)) for c in ax.collections if isinstance(c, PathCollection) for xy in c.get_offsets()}


def _check_graph_figure(fig) -> None:
    ax1, ax2 = fig.axes[:2]
    # one layout: every node of the Taskonomy panel sits where the same task sits in the brain panel
    assert ax1.get_xlim() == ax2.get_xlim() and ax1.get_ylim() == ax2.get_ylim()
    assert _node_offsets(ax2) <= _node_offsets(ax1)
    brain, tax = fig.label_texts["brain"], fig.label_texts["taskonomy"]
    for name in tax:
        assert tax[name].get_position() == brain[name].get_position()
    FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    for texts, ax in ((brain, ax1), (tax, ax2)):
        assert overlapping_labels(texts) == []
        # and no label covers a node other than its own
        to_px = ax.transData.transform
        radius = np.sqrt(F._NODE_SIZE) / 2 * fig.dpi / 72
        for name, t in texts.items():
            box = t.get_window_extent(renderer)
            for other in texts:
                if other == name:
                    continue
                x, y = to_px(fig.node_positions[other])
                node = type(box).from_extents(x - radius, y - radius, x + radius, y + radius)
                assert not boxes_overlap(box, node), (name, other)


def test_label_placement_moves_labels_apart_that_would_overlap():
    from matplotlib.figure import Figure

    from neurotask.pipeline.report.label_placement import place_labels

    fig = Figure(figsize=(4, 3))
    ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    pos = {"a": (0.0, 0.0), "b": (0.02, 0.0), "c": (0.0, 0.03)}  # nearly one point
    stacked = {n: ax.text(*xy, f"label {n}") for n, xy in pos.items()}
    assert overlapping_labels(stacked)  # the check sees overlaps
    for t in stacked.values():
        t.remove()
    placed = place_labels(ax, pos, {n: f"label {n}" for n in pos}, node_radius_pt=3)
    assert overlapping_labels(placed) == []


def test_graphs_share_one_layout_and_labels_do_not_overlap(planted):
    _, a = planted
    fig = F.figure_graphs(a, 2)
    _check_graph_figure(fig)
    curv = task_info("curvature").label
    assert fig.label_texts["brain"][curv].get_text() == f"{curv} (0 sig. voxels)"


@pytest.fixture(scope="module")
def published_analysis():
    published = reference_path() / "published"
    subjects = ("CSI1", "CSI2", "CSI3")
    results = {s: load_reference_npz(published / f"{s}.npz") for s in subjects}
    rois = {s: load_reference_roi_npz(published / f"{s}.npz") for s in subjects}
    # the similarity (what the figures draw) does not depend on the bootstrap or Mantel sizes
    return analyse(results, roi_results=rois, n_bootstrap=2, n_permutations=10)


def test_published_figure7_labels_do_not_overlap_and_figure6_marks_curvature(published_analysis, tmp_path):
    a = published_analysis
    _check_graph_figure(F.figure_graphs(a, 2))
    assert F.zero_significant_tasks(a) == {"Curvature"}
    page = ReportPage(tmp_path, dpi=50)
    structure_figures(page, a, 2)
    captions = {f.key: f.caption for f in page.figures}
    assert "Curvature has no significant voxel in any subject" in captions["fig6_trees"]
    assert all(f.files[-1].endswith(".svg") for f in page.figures)


def test_roi_grid_puts_hemispheres_in_rows_and_wraps_other_names():
    assert F.roi_grid(["RHPPA", "LHEarlyVis", "LHPPA", "RHEarlyVis"]) == [["LHEarlyVis", "LHPPA"],
                                                                          ["RHEarlyVis", "RHPPA"]]
    assert F.roi_grid(["LHPPA", "LHEarlyVis", "RHPPA"]) == [["LHEarlyVis", "LHPPA"], [None, "RHPPA"]]
    names = ["V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"]
    grid = F.roi_grid(names)
    assert [len(row) for row in grid] == [5, 5] and sorted(x for row in grid for x in row if x) == sorted(names)


def test_figure1_names_the_tasks_above_a_missing_panel(planted):
    _, a = planted
    fig = F.figure_roi_bars(a.sel(roi=["LHEarlyVis", "RHEarlyVis", "LHPPA"]), "CSI1")
    panels = {ax.get_title().split(" ")[0]: ax for ax in fig.axes if ax.axison}
    assert set(panels) == {"LHEarlyVis", "RHEarlyVis", "LHPPA"}
    FigureCanvasAgg(fig).draw()
    for roi in ("RHEarlyVis", "LHPPA"):  # the bottom of each column
        shown = {t.get_text() for t in panels[roi].get_xticklabels() if t.get_visible()}
        assert shown == {task_info(t).label for t in TASKS}, roi
    assert not any(t.get_visible() for t in panels["LHEarlyVis"].get_xticklabels())
