"""The report's group-level section (``analysis/group``, :mod:`neurotask.pipeline.stats.group`).

Two figures, section "group":

* ``group_tree``: the tree of the subject-mean similarity with each clade's support (share
  of the subject-bootstrap replicate trees that have the clade), beside the mean matrix and
  the width of its bootstrap-over-subjects interval, rows aligned with the tree's leaves;
* ``group_consistency``: each subject's leave-one-subject-out consistency, and each subject's
  Spearman r with Taskonomy beside the group estimate (back-transformed mean Fisher z with
  its t interval) and the group tests.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from scipy.cluster import hierarchy

from neurotask.pipeline.report.figures import CLUSTER_COLOURS, _cluster_legend, freeze_layout
from neurotask.pipeline.report.label_placement import place_labels
from neurotask.pipeline.report.page import ReportPage

_ZERO_COLOUR = "#8C8C8C"
_ZERO_SUFFIX = " (0 sig. voxels)"

# supports at or above this are drawn dark, below it grey: the usual "well supported" line
STRONG_SUPPORT = 0.95


def _labels(group: xr.Dataset) -> list[str]:
    if "label" in group.coords:
        return [str(x) for x in group["label"].values]
    return [str(x) for x in group["task"].values]


def _clusters(group: xr.Dataset) -> list[str]:
    if "taskonomy_cluster" in group.coords:
        return [str(x) for x in group["taskonomy_cluster"].values]
    return [""] * group.sizes["task"]


def zero_tasks(group: xr.Dataset) -> set[int]:
    """Indices of the tasks without a significant voxel in any subject (a similarity row of 0)."""
    if "no_significant_voxel" not in group:
        return set()
    return {int(i) for i in np.flatnonzero(group["no_significant_voxel"].all("subject").values)}


def node_positions(z: np.ndarray, leaves: list[int]) -> np.ndarray:
    """(t - 1, 4) linkage and the dendrogram's leaf order -> (t - 1,) position of each merge's
    node along the leaf axis, in scipy's dendrogram units (leaf k at 10 k + 5; a node midway
    between its two children, as scipy draws it)."""
    n = z.shape[0] + 1
    pos = np.empty(2 * n - 1)
    pos[np.asarray(leaves)] = 10.0 * np.arange(n) + 5.0
    for i, (left, right, _, _) in enumerate(z):
        pos[n + i] = (pos[int(left)] + pos[int(right)]) / 2.0
    return pos[n:]


def figure_group_tree(group: xr.Dataset) -> Figure:
    """The mean tree with clade supports (%), the mean matrix and its interval width."""
    labels, clusters = _labels(group), _clusters(group)
    z = group["linkage_mean"].values
    support = group["clade_support"].values
    t = len(labels)
    fig = Figure(figsize=(13.5, 0.26 * t + 2.6), layout="constrained")
    ax_tree, ax_mean, ax_width = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3.0, 2.6, 2.6]})
    d = hierarchy.dendrogram(z, labels=labels, orientation="left", ax=ax_tree, leaf_font_size=8,
                             link_color_func=lambda _: "#333333")
    leaves = [int(i) for i in d["leaves"]]
    ax_tree.set_ylim(0, 10 * t)
    for side in ("top", "right", "left"):
        ax_tree.spines[side].set_visible(False)
    zero = zero_tasks(group)
    ax_tree.set_yticks(ax_tree.get_yticks(), [labels[i] + (_ZERO_SUFFIX if i in zero else "") for i in leaves])
    for tick, i in zip(ax_tree.get_yticklabels(), leaves):
        tick.set_color(_ZERO_COLOUR if i in zero else CLUSTER_COLOURS.get(clusters[i], "#000000"))
        tick.set_fontstyle("italic" if i in zero else "normal")
    distance = "distance (1 - similarity)" if group.attrs["linkage"] != "ward" else "ward distance"
    ax_tree.set_xlabel(distance, fontsize=8)
    ax_tree.tick_params(axis="x", labelsize=7)
    ax_tree.set_title(f"Tree of the subject-mean similarity ({group.attrs['linkage']} linkage);\n"
                      f"numbers: % of {group.attrs['n_bootstrap']} subject resamples with the clade", fontsize=9)

    # rows in the tree's leaf order, bottom to top, aligned with its leaves (scipy's 10 units a leaf)
    extent = (-0.5, t - 0.5, 0, 10 * t)
    mean = group["similarity_mean"].values[np.ix_(leaves, leaves)]
    ci = group["similarity_mean_ci"].values[np.ix_(leaves, leaves)]
    width = ci[..., 1] - ci[..., 0]
    np.fill_diagonal(width, np.nan)  # a task's similarity to itself: nothing to estimate
    rows = [k for k, i in enumerate(leaves) if i in zero]
    width[rows, :] = np.nan  # 0 in every resample because nothing was found, not because it is certain
    width[:, rows] = np.nan
    im = ax_mean.imshow(mean, cmap="viridis", vmin=0, vmax=1, origin="lower", extent=extent, aspect="auto",
                        interpolation="nearest")
    fig.colorbar(im, ax=ax_mean, shrink=0.6, label=f"{group.attrs['metric']} similarity")
    ax_mean.set_title(f"Mean of {group.attrs['n_subjects']} subjects", fontsize=9)
    vmax = max(float(np.nanmax(width)) if np.isfinite(width).any() else 0.0, 1e-6)
    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="#7F7F7F")
    im = ax_width.imshow(width, cmap=cmap, vmin=0, vmax=vmax, origin="lower", extent=extent, aspect="auto",
                         interpolation="nearest")
    fig.colorbar(im, ax=ax_width, shrink=0.6, label=f"{group.attrs['ci']:.0%} interval width (similarity units)")
    ax_width.set_title("Width of its bootstrap-over-subjects interval\n(grey: self-similarity, or a task without "
                       "significant voxels)", fontsize=9)
    for ax in (ax_mean, ax_width):
        ax.set_xticks(range(t), [labels[i] for i in leaves], rotation=90, fontsize=7)
        ax.set_yticks([])
        for tick, i in zip(ax.get_xticklabels(), leaves):
            tick.set_color(_ZERO_COLOUR if i in zero else CLUSTER_COLOURS.get(clusters[i], "#000000"))
            tick.set_fontstyle("italic" if i in zero else "normal")
    handles = _cluster_legend(clusters)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=7, frameon=False)
    # supports placed once the layout is fixed, clear of each other where merges crowd
    freeze_layout(fig)
    pos = node_positions(z, leaves)
    inner = range(len(z) - 1)  # not the root: it holds every task in every replicate
    texts = place_labels(ax_tree, {k: (z[k, 2], pos[k]) for k in inner}, {k: f"{100 * support[k]:.0f}" for k in inner},
                         node_radius_pt=1.0, fontsize=6.5, rings=5,
                         text_kw={"bbox": {"facecolor": "white", "edgecolor": "none", "pad": 0.4, "alpha": 0.85}})
    for k, text in texts.items():
        text.set_color("#000000" if support[k] >= STRONG_SUPPORT else "#8C8C8C")
        text.set_gid(f"support:{k}")
    return fig


def figure_group_consistency(group: xr.Dataset) -> Figure:
    """Left: LOSO Spearman and Pearson r per subject. Right: each subject's Spearman r with
    Taskonomy, the group estimate with its t interval, and the subject-mean matrix's r."""
    subjects = [str(s) for s in group["subject"].values]
    s = len(subjects)
    fig = Figure(figsize=(max(10.0, 5.0 + 1.1 * s), 3.8), layout="constrained")
    ax_loso, ax_tax = fig.subplots(1, 2)
    x = np.arange(s)
    for offset, name, colour, label in ((-0.2, "loso_spearman", "#0072B2", "Spearman"),
                                        (0.2, "loso_pearson", "#E69F00", "Pearson")):
        bars = ax_loso.bar(x + offset, group[name].values, width=0.38, color=colour, label=label)
        ax_loso.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax_loso.set_xticks(x, subjects, fontsize=8, rotation=30 if s > 6 else 0)
    both = np.concatenate([group["loso_spearman"].values, group["loso_pearson"].values])
    lo = min(0.0, float(both[np.isfinite(both)].min())) if np.isfinite(both).any() else 0.0
    ax_loso.set_ylim(lo, 1.1)  # r <= 1; room for the values above the bars
    ax_loso.axhline(0, color="#555555", lw=0.6)
    ax_loso.set_ylabel("r with the mean of the other subjects", fontsize=8)
    ax_loso.set_title("Leave-one-subject-out consistency\n(upper triangles of the similarity matrices)", fontsize=9)
    ax_loso.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))

    r = group["spearman_taskonomy"].values
    if not np.isfinite(r).any():
        ax_tax.set_axis_off()
        ax_tax.text(0.5, 0.5, "no comparison with Taskonomy:\nfewer than 3 tasks with its affinities",
                    ha="center", va="center", fontsize=9)
        return freeze_layout(fig)
    sub_ci = group["spearman_taskonomy_ci"].values if "spearman_taskonomy_ci" in group else np.full((s, 2), np.nan)
    if np.isfinite(sub_ci).all():
        # A percentile interval need not contain its estimate (a skewed bootstrap, e.g. a task
        # without significant voxels), so each is drawn as its own segment, not as error bars
        # around r (which cannot reach below or above it).
        ax_tax.vlines(x, sub_ci[:, 0], sub_ci[:, 1], color="#333333", lw=1.0, zorder=3)
        ax_tax.scatter(x, r, color="#333333", zorder=4,
                       label=f"subject ({group.attrs['ci']:.0%} CI, bootstrap over its voxels)")
    else:
        ax_tax.scatter(x, r, color="#333333", zorder=3, label="subject")
    mean_r, ci = float(group["group_mean_r"]), group["group_mean_r_ci"].values
    ax_tax.axhline(mean_r, color="#009E73", lw=1.5, label="group: tanh(mean Fisher z)")
    if np.isfinite(ci).all():
        ax_tax.axhspan(ci[0], ci[1], color="#009E73", alpha=0.18, lw=0,
                       label=f"{group.attrs['ci']:.0%} t interval over subjects")
    mean_matrix = float(group["spearman_taskonomy_mean"])
    if np.isfinite(mean_matrix):
        ax_tax.axhline(mean_matrix, color="#CC79A7", lw=1.2, ls="--", label="r of the subject-mean matrix")
    ax_tax.axhline(0, color="#555555", lw=0.6)
    ax_tax.set_xticks(x, subjects, fontsize=8, rotation=30 if s > 6 else 0)
    ax_tax.set_xlim(-0.6, s - 0.4)
    ax_tax.set_ylabel("Spearman r, brain vs Taskonomy similarity", fontsize=8)
    tp, flip, tval = float(group["group_t_p"]), float(group["group_sign_flip_p"]), float(group["group_t"])
    t_text = f"t({s - 1}) = {tval:.2f}, p = {tp:.3g}" if np.isfinite(tp) else "t: no spread over subjects"
    ax_tax.set_title(f"Brain vs Taskonomy per subject ({group.attrs['n_taskonomy_tasks']} tasks)\n"
                     f"{t_text}; sign-flip p = {flip:.3g}", fontsize=9)
    ax_tax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return freeze_layout(fig)


def _p(x: float) -> str:
    return f"{x:.3g}" if np.isfinite(x) else "n/a"


def group_figures(page: ReportPage, group: xr.Dataset | None) -> None:
    """Add the group section's two figures to ``page`` (a note instead with fewer than 2 subjects)."""
    if group is None:
        page.notes.append("Group-level figures are not drawn: they need at least 2 subjects.")
        return
    s, nb = int(group.attrs["n_subjects"]), int(group.attrs["n_bootstrap"])
    ci = f"{group.attrs['ci']:.0%}"
    names = _labels(group)
    zero = [names[i] for i in sorted(zero_tasks(group))]
    zero_note = (f" Grey italic: {', '.join(zero)}, without a significant voxel in any subject (a row of 0), so it "
                 "joins the tree at its root for that reason alone." if zero else "")
    coarse = (f" With {s} subjects only a few distinct resamples exist, so the supports and intervals are coarse."
              if s < 5 else "")
    page.add("group_tree", "Group: consensus tree and subject-mean similarity",
             f"Left: the {group.attrs['linkage']}-linkage tree of the mean over {s} subjects of their task similarity "
             f"matrices ({group.attrs['metric']}); at each branch the % of {nb} bootstrap resamples of the subjects "
             "(drawn with replacement, mean recomputed, tree rebuilt with the same linkage) whose tree has exactly "
             f"that branch's set of tasks (black: >= {100 * STRONG_SUPPORT:.0f}%, grey: less; the root, all tasks, is always "
             "100% and unlabelled). Middle: the mean matrix, rows and columns in the tree's leaf order (rows "
             f"aligned with its leaves). Right: the width (upper - lower, similarity units) of each cell's {ci} "
             f"percentile interval over the same subject resamples (grey: the diagonal, and tasks without a significant "
             "voxel in any subject, whose similarity is 0 in every resample because nothing was found). Task labels "
             f"coloured by Taskonomy cluster.{zero_note}{coarse}",
             figure_group_tree(group), svg=True, section="group")
    m = group.sizes["task"] * (group.sizes["task"] - 1) // 2
    flip = ("exact over all 2^n sign patterns, smallest possible p = "
            f"{2.0 ** -s:.3g}" if group.attrs["sign_flip"] == "exact" else group.attrs["sign_flip"])
    page.add("group_consistency", "Group: consistency across subjects and the group test against Taskonomy",
             f"Left: for each of the {s} subjects, the Spearman (blue) and Pearson (orange) r between the {m} "
             "task pairs of its similarity matrix and those of the mean of the other subjects' matrices "
             "(leave-one-subject-out); value above each bar. Right: dots, each subject's Spearman r between its similarity "
             f"and Taskonomy's over the {group.attrs['n_taskonomy_tasks']} tasks Taskonomy covers (error bars: its "
             f"{ci} percentile interval over bootstrap resamples of the subject's voxels, from the per-subject "
             "analysis); green line, the group estimate "
             f"(tanh of the mean Fisher z over subjects) and band, its {ci} t interval (df = {s - 1}); dashed, the "
             f"r of the subject-mean matrix (its Mantel p = {_p(float(group['mantel_p_mean']))}, tasks permuted, a "
             "test that treats the subjects as fixed). Group tests, subjects the random effect, one-sided (r > 0): "
             f"one-sample t on the Fisher z, p = {_p(float(group['group_t_p']))}; sign flip ({flip}), "
             f"p = {_p(float(group['group_sign_flip_p']))}. With few subjects the t-test leans on normally distributed "
             "z; the sign flip assumes only symmetry but cannot go below its smallest p.",
             figure_group_consistency(group), svg=True, section="group")


def group_statistics(group: xr.Dataset | None) -> dict | None:
    """The group numbers for statistics.json (None without a group analysis)."""
    if group is None:
        return None

    def f(x) -> float | None:
        x = float(x)
        return x if np.isfinite(x) else None

    subjects = [str(s) for s in group["subject"].values]
    return {
        "n_subjects": int(group.attrs["n_subjects"]),
        "loso_spearman": dict(zip(subjects, map(f, group["loso_spearman"].values))),
        "loso_pearson": dict(zip(subjects, map(f, group["loso_pearson"].values))),
        "spearman_taskonomy": dict(zip(subjects, map(f, group["spearman_taskonomy"].values))),
        "group_mean_r": f(group["group_mean_r"]),
        "group_mean_r_ci": [f(x) for x in group["group_mean_r_ci"].values],
        "group_t": f(group["group_t"]),
        "group_t_p": f(group["group_t_p"]),
        "group_sign_flip_p": f(group["group_sign_flip_p"]),
        "clade_support": [f(x) for x in group["clade_support"].values],
    }
