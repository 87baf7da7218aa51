"""The fit's diagnostics in the report: where on its grid each voxel's ridge penalty fell.

Each voxel's alpha is chosen by cross-validation among a fixed grid (``fit.alphas``: the
paper's ``logspace(-8, 0.5 log10(n_features) + 8, fit.n_alphas)``, or a given list). A voxel
at an end of the grid may have wanted a value beyond it: many voxels at the top end means
the grid stops short (their predictions are over-fitted relative to the best the model could
do), at the bottom end that the penalty could go lower. Voxels without signal rightly pick
the largest alpha (the model shrinks to a constant), so the share at the top is also given
among the significant voxels, which is what a clipped grid actually costs. As himalaya's
``plot_alphas_diagnostic``, but per subject and task, with the ends counted.

Imported results (the authors' published ones) carry no chosen alphas (``alpha`` all NaN):
no diagnostic then, and no warning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import PercentFormatter

from neurotask.pipeline.report.figures import freeze_layout
from neurotask.pipeline.ridge import paper_alphas
from neurotask.storage import StudyStore

NO_ALPHA_NOTE = ("Alpha diagnostic not drawn: the results carry no chosen alphas (alpha is NaN, as in "
                 "imported results such as the authors' published ones).")


class GridUnknown(ValueError):
    """The alpha grid of a fit cannot be rebuilt from what was given."""


def alpha_grid(fit: Mapping, n_features: int | None) -> np.ndarray:
    """The fit's alpha grid (a,) ascending, from the results' ``fit`` attribute (the fit
    section's fingerprint: ``alphas`` 'paper' or a list, ``n_alphas``) and, for the paper's
    grid, the task's number of features (the grid's top depends on it)."""
    alphas = fit.get("alphas", "paper")
    if alphas != "paper":
        return np.sort(np.asarray(alphas, dtype=np.float64))
    if n_features is None:
        raise GridUnknown("fit.alphas is 'paper', whose grid depends on the task's number of features")
    return paper_alphas(int(n_features), int(fit.get("n_alphas", 100)))


def feature_counts(store: StudyStore, tasks: Sequence[str]) -> dict[str, int]:
    """task -> number of features, for the tasks whose features are in the store."""
    stored = set(store.feature_tasks())
    return {t: store.feature_count(t) for t in tasks if t in stored}


def grid_positions(alpha: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Index of each chosen alpha on the grid (nearest in log), -1 for NaN. (v,), (a,) -> (v,)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    out = np.full(alpha.shape, -1, dtype=np.int64)
    ok = np.isfinite(alpha) & (alpha > 0)
    if ok.any():
        out[ok] = np.abs(np.log(alpha[ok])[:, None] - np.log(grid)[None, :]).argmin(axis=1)
    return out


def alpha_shares(positions: np.ndarray, n_grid: int, among: np.ndarray | None = None) -> np.ndarray:
    """Fraction of the voxels (those with a position >= 0, and ``among`` if given) at each grid
    position. (v,) int, a -> (a,); NaN when no voxel counts."""
    keep = positions >= 0
    if among is not None:
        keep &= np.asarray(among, dtype=bool)
    n = int(keep.sum())
    if n == 0:
        return np.full(n_grid, np.nan)
    return np.bincount(positions[keep], minlength=n_grid)[:n_grid] / n


def alpha_summary(results: Mapping[str, xr.Dataset], n_features: Mapping[str, int] | None = None
                  ) -> xr.Dataset | None:
    """Per subject and task, the distribution of the chosen alphas on the grid.

    ``results``: subject -> results (task, voxel) with ``alpha`` (and ``significant``) and the
    attribute ``fit``; ``n_features``: task -> feature count, needed for the paper's grid.
    -> Dataset, dims (subject, task, grid_position): ``share`` (fraction of the voxels with
    an alpha at each grid value), ``share_lowest``/``share_highest`` (subject, task),
    ``share_lowest_significant``/``share_highest_significant`` (the same among the
    significant voxels), ``n_voxels`` (subject, task), ``grid`` (subject, task,
    grid_position) the alpha values. None when no subject's results have a chosen alpha.
    Raises :class:`GridUnknown` when the grid cannot be rebuilt.
    """
    subjects = [s for s, ds in results.items() if "alpha" in ds and np.isfinite(ds["alpha"].values).any()]
    if not subjects:
        return None
    tasks = [str(t) for t in results[subjects[0]]["task"].values]
    grids = {}
    for s in subjects:
        fit = results[s].attrs.get("fit", {})
        for t in tasks:
            grids[s, t] = alpha_grid(fit, (n_features or {}).get(t))
    a = max(g.size for g in grids.values())
    shape = (len(subjects), len(tasks))
    share, share_sig = np.full((*shape, a), np.nan), np.full((*shape, a), np.nan)
    grid = np.full((*shape, a), np.nan)
    n_vox = np.zeros(shape, dtype=np.int64)
    for i, s in enumerate(subjects):
        ds = results[s].transpose("task", "voxel", ...)
        alpha = ds["alpha"].sel(task=tasks).values
        sig = ds["significant"].sel(task=tasks).values if "significant" in ds else None
        for j, t in enumerate(tasks):
            g = grids[s, t]
            pos = grid_positions(alpha[j], g)
            grid[i, j, :g.size] = g
            n_vox[i, j] = int((pos >= 0).sum())
            # an end is the grid's last value, wherever a shorter grid stops in the padded axis
            share[i, j, :g.size] = alpha_shares(pos, g.size)
            if sig is not None:
                share_sig[i, j, :g.size] = alpha_shares(pos, g.size, sig[j])
    last = np.array([[grids[s, t].size - 1 for t in tasks] for s in subjects])
    take = np.take_along_axis
    out = xr.Dataset(
        {
            "share": (("subject", "task", "grid_position"), share),
            "share_lowest": (("subject", "task"), share[:, :, 0]),
            "share_highest": (("subject", "task"), take(share, last[:, :, None], axis=2)[:, :, 0]),
            "share_lowest_significant": (("subject", "task"), share_sig[:, :, 0]),
            "share_highest_significant": (("subject", "task"), take(share_sig, last[:, :, None], axis=2)[:, :, 0]),
            "n_voxels": (("subject", "task"), n_vox),
            "grid": (("subject", "task", "grid_position"), grid),
        },
        coords={"subject": subjects, "task": tasks, "grid_position": np.arange(a)},
        attrs={"alphas": "paper" if results[subjects[0]].attrs.get("fit", {}).get("alphas", "paper") == "paper"
               else "list"},
    )
    if "task_label" in results[subjects[0]].coords:
        out = out.assign_coords(label=("task", [str(x) for x in results[subjects[0]]["task_label"].values]))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def alpha_warnings(summary: xr.Dataset | None, threshold: float) -> list[str]:
    """One line per subject and end of the grid where more than ``threshold`` (a fraction)
    of a task's voxels chose that end, naming the tasks, the share among significant voxels
    and the config keys that widen the grid. [] for no summary (imported results)."""
    if summary is None:
        return []
    lines = []
    for s in summary["subject"].values:
        for end, word, beyond in (("highest", "largest", "above"), ("lowest", "smallest", "below")):
            share = summary[f"share_{end}"].sel(subject=s)
            over = share.where(share > threshold, drop=True)
            if over.sizes["task"] == 0:
                continue
            over = over.sortby(over, ascending=False)
            tasks = [str(t) for t in over["task"].values]
            listed = ", ".join(f"{t} {_pct(float(over.sel(task=t)))}" for t in tasks[:4])
            if len(tasks) > 4:
                listed += f" and {len(tasks) - 4} more"
            g = summary["grid"].sel(subject=s, task=tasks)
            value = float(g.max()) if end == "highest" else float(g.min())
            sig = summary[f"share_{end}_significant"].sel(subject=s, task=tasks).values
            sig_note = (f"; among the significant voxels of these tasks at most {_pct(float(np.nanmax(sig)))} did"
                        if np.isfinite(sig).any() else "")
            n_tasks = summary.sizes["task"]
            what = tasks[0] if len(tasks) == 1 else f"{len(tasks)} of {n_tasks} tasks"
            widen = (f"set fit.alphas to a list reaching {beyond} {value:.3g}"
                     + (" (fit.alphas: paper spans 1e-8 to sqrt(n_features)·1e8; fit.n_alphas only makes it finer)"
                        if summary.attrs.get("alphas") == "paper" else ""))
            clipped = np.isfinite(sig).any() and float(np.nanmax(sig)) > threshold
            if end == "highest" and np.isfinite(sig).any() and not clipped:
                remedy = f"mostly voxels without signal, which rightly shrink to the top; to be sure, {widen}"
            else:
                remedy = f"the grid is too narrow: {widen}"
            lines.append(f"{_pct(float(over.max()))} of {s}'s voxels chose the {word} alpha of the grid ({value:.3g}) "
                         f"for {what} (more than {_pct(threshold)}: {listed}){sig_note}: {remedy}.")
    return lines


def figure_alpha_diagnostic(summary: xr.Dataset, threshold: float, task_order: Sequence[int] | None = None) -> Figure:
    """Per subject, a heat map task x grid position of the share of voxels that chose each
    alpha; the grid's two ends outlined, and each task's shares at the ends written beside
    it (red above ``threshold``). ``task_order``: row order (task indices), e.g. by cluster."""
    subjects = [str(s) for s in summary["subject"].values]
    tasks = [str(t) for t in summary["task"].values]
    names = [str(x) for x in summary["label"].values] if "label" in summary.coords else tasks
    order = list(task_order) if task_order is not None else list(range(len(tasks)))
    a = summary.sizes["grid_position"]
    ncols = min(len(subjects), 4)  # NSD's 8 subjects: two rows of 4
    nrows = -(-len(subjects) // ncols)
    width = 4.6 * ncols + 1.6
    fig = Figure(figsize=(width, (0.24 * len(tasks) + 1.3) * nrows + 0.6), layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for ax in grid.ravel()[len(subjects):]:
        ax.set_axis_off()
    axes = grid.ravel()[:len(subjects)]
    vmax = float(np.nanmax(summary["share"].values)) or 1.0
    norm = PowerNorm(0.5, vmin=0.0, vmax=vmax)  # the ends can hold half the voxels: keep the middle visible
    one_grid = bool(np.allclose(summary["grid"].values, summary["grid"].values[:1, :1], equal_nan=True))
    for ax, s in zip(axes, subjects):
        share = summary["share"].sel(subject=s).values[order]  # (t, a)
        im = ax.imshow(share, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        for col in (0, a - 1):
            ax.add_patch(Rectangle((col - 0.5, -0.5), 1, len(order), fill=False, ec="#D62728", lw=1.5))
        ax.set_yticks(range(len(order)), [names[i] for i in order], fontsize=7)
        if one_grid:
            g = summary["grid"].values[0, 0]
            ticks = sorted({0, a - 1, *np.linspace(0, a - 1, 5).round().astype(int).tolist()})
            ax.set_xticks(ticks, [f"{g[k]:.0e}" for k in ticks], fontsize=7, rotation=45)
            ax.set_xlabel("alpha (grid values, log-spaced)", fontsize=8)
        else:
            ax.set_xticks([0, a - 1], ["lowest", "highest"], fontsize=7)
            ax.set_xlabel("position on the task's alpha grid (log-spaced)", fontsize=8)
        low = summary["share_lowest"].sel(subject=s).values[order]
        high = summary["share_highest"].sel(subject=s).values[order]
        for row, (lo, hi) in enumerate(zip(low, high)):
            for x, v, ha in ((-0.7, lo, "right"), (a - 0.3, hi, "left")):
                if np.isfinite(v):
                    ax.text(x, row, f"{100 * v:.0f}%", fontsize=6, va="center", ha=ha,
                            color="#D62728" if v > threshold else "#444444", clip_on=False)
        ax.set_title(s, fontsize=9, pad=4)
        ax.tick_params(axis="y", pad=18)  # room for the lowest-end shares left of the map
    cb = fig.colorbar(im, ax=axes.tolist(), shrink=0.6, format=PercentFormatter(1.0, decimals=0))
    cb.set_label("share of the task's voxels", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    fig.suptitle(f"Chosen ridge alpha per task: share of voxels at each grid value (red outline: the grid's ends; "
                 f"red numbers: more than {100 * threshold:.0f}% at an end)", fontsize=9)
    return freeze_layout(fig)
