"""The alpha diagnostic: where on the fit's grid each voxel's alpha fell, the shares at the
grid's ends, the warnings above a threshold, and nothing for imported results."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from neurotask.pipeline.report import diagnostics as D
from neurotask.pipeline.report.page import ReportPage
from neurotask.pipeline.report.sections import diagnostic_figures
from neurotask.pipeline.ridge import paper_alphas

FIT = {"alphas": "paper", "n_alphas": 10, "test_fraction": 0.15}
N_FEATURES = {"edge2d": 64, "rgb2depth": 100}


def planted(top: dict[str, float], bottom: dict[str, float], n: int = 200, seed: int = 0,
            significant_top: bool = False) -> xr.Dataset:
    """Results whose alphas are grid values: per task the given shares at the top and the
    bottom of its paper grid, the rest spread over the inner values. The significant voxels
    are the first half; with ``significant_top`` the top-end voxels are among them."""
    rng = np.random.default_rng(seed)
    tasks = list(N_FEATURES)
    alpha = np.empty((len(tasks), n))
    sig = np.zeros((len(tasks), n), bool)
    for t, task in enumerate(tasks):
        grid = paper_alphas(N_FEATURES[task], FIT["n_alphas"])
        n_top, n_bottom = round(top[task] * n), round(bottom[task] * n)
        values = np.concatenate([np.full(n_top, grid[-1]), np.full(n_bottom, grid[0]),
                                 rng.choice(grid[1:-1], n - n_top - n_bottom)])
        alpha[t] = values
        sig[t, : n // 2] = True
        if not significant_top:  # top-end voxels are the unpredicted ones
            sig[t] = False
            sig[t, n_top: n_top + n // 2] = True
    return xr.Dataset({"alpha": (("task", "voxel"), alpha), "significant": (("task", "voxel"), sig)},
                      coords={"task": tasks, "voxel": np.arange(n)}, attrs={"fit": dict(FIT)})


def test_grid_is_rebuilt_from_the_fit_attributes():
    np.testing.assert_array_equal(D.alpha_grid(FIT, 64), paper_alphas(64, 10))
    np.testing.assert_array_equal(D.alpha_grid({"alphas": [10.0, 0.1, 1.0]}, None), [0.1, 1.0, 10.0])
    with pytest.raises(D.GridUnknown, match="number of features"):
        D.alpha_grid(FIT, None)


def test_shares_at_the_grid_ends_on_a_planted_example():
    results = {"CSI1": planted({"edge2d": 0.435, "rgb2depth": 0.05}, {"edge2d": 0.0, "rgb2depth": 0.3})}
    s = D.alpha_summary(results, N_FEATURES)
    assert s["share_highest"].sel(subject="CSI1", task="edge2d") == pytest.approx(0.435)
    assert s["share_lowest"].sel(subject="CSI1", task="edge2d") == 0.0
    assert s["share_highest"].sel(subject="CSI1", task="rgb2depth") == pytest.approx(0.05)
    assert s["share_lowest"].sel(subject="CSI1", task="rgb2depth") == pytest.approx(0.3)
    # shares over the grid sum to 1; the grid is each task's own
    np.testing.assert_allclose(s["share"].sum("grid_position").values, 1.0)
    np.testing.assert_array_equal(s["grid"].sel(subject="CSI1", task="rgb2depth").values, paper_alphas(100, 10))
    # among the significant voxels (none at the top here)
    assert s["share_highest_significant"].sel(subject="CSI1", task="edge2d") == 0.0
    assert int(s["n_voxels"].sel(subject="CSI1", task="edge2d")) == 200


def test_grid_positions_are_the_nearest_grid_value_and_skip_nan():
    grid = np.logspace(-2, 2, 5)
    pos = D.grid_positions(np.array([0.01, 1.0001, np.nan, 100.0, 9.0]), grid)
    np.testing.assert_array_equal(pos, [0, 2, -1, 4, 3])


def test_warnings_above_the_threshold_only_and_naming_the_config_key():
    results = {"CSI1": planted({"edge2d": 0.435, "rgb2depth": 0.05}, {"edge2d": 0.0, "rgb2depth": 0.3}),
               "CSI2": planted({"edge2d": 0.1, "rgb2depth": 0.1}, {"edge2d": 0.1, "rgb2depth": 0.1}, seed=1)}
    s = D.alpha_summary(results, N_FEATURES)
    lines = D.alpha_warnings(s, 0.2)
    assert len(lines) == 2  # CSI1 top (edge2d), CSI1 bottom (rgb2depth); nothing for CSI2
    top = next(x for x in lines if "largest" in x)
    assert top.startswith("43.5% of CSI1's voxels chose the largest alpha of the grid")
    assert "for edge2d" in top and "rgb2depth" not in top and "fit.alphas" in top
    assert f"{paper_alphas(64, 10)[-1]:.3g}" in top
    assert "mostly voxels without signal" in top  # none of the significant voxels are at the top
    bottom = next(x for x in lines if "smallest" in x)
    assert "CSI1" in bottom and "rgb2depth" in bottom and "below" in bottom and "too narrow" in bottom
    assert D.alpha_warnings(s, 0.5) == []
    # significant voxels at the top: the grid is too narrow
    clipped = D.alpha_summary({"CSI1": planted({"edge2d": 0.45, "rgb2depth": 0.0}, {"edge2d": 0.0, "rgb2depth": 0.0},
                                               significant_top=True)}, N_FEATURES)
    (line,) = D.alpha_warnings(clipped, 0.2)
    assert "too narrow" in line and "among the significant voxels of these tasks at most 90.0% did" in line


def test_imported_results_have_no_diagnostic_and_no_warning(tmp_path):
    imported = planted({"edge2d": 0.5, "rgb2depth": 0.5}, {"edge2d": 0.0, "rgb2depth": 0.0})
    imported["alpha"][:] = np.nan
    assert D.alpha_summary({"CSI1": imported}) is None
    assert D.alpha_warnings(None, 0.2) == []
    page = ReportPage(tmp_path, dpi=50)
    assert diagnostic_figures(page, {"CSI1": imported}, 0.2) == []
    assert page.figures == [] and page.notes == [D.NO_ALPHA_NOTE]


def test_diagnostic_figures_add_the_figure_and_return_the_warnings(tmp_path):
    results = {"CSI1": planted({"edge2d": 0.435, "rgb2depth": 0.05}, {"edge2d": 0.0, "rgb2depth": 0.0}),
               "CSI2": planted({"edge2d": 0.3, "rgb2depth": 0.05}, {"edge2d": 0.0, "rgb2depth": 0.0}, seed=2)}
    page = ReportPage(tmp_path, dpi=50)
    warnings = diagnostic_figures(page, results, 0.2, N_FEATURES)
    assert [w.split("'s")[0].split(" of ")[1] for w in warnings] == ["CSI1", "CSI2"]
    (fig,) = page.figures
    assert fig.key == "diagnostics_alpha" and fig.section == "diagnostics"
    assert fig.files == ["figures/diagnostics_alpha.png", "figures/diagnostics_alpha.svg"]
    assert "report.alpha_edge_warning" in fig.caption
    # without the feature counts the paper's grid is unknown: a note, no figure, no warning
    page = ReportPage(tmp_path, dpi=50)
    assert diagnostic_figures(page, results, 0.2) == []
    assert page.figures == [] and "number of features" in page.notes[0]


def test_the_figure_writes_the_end_shares_and_flags_those_above_the_threshold():
    s = D.alpha_summary({"CSI1": planted({"edge2d": 0.435, "rgb2depth": 0.05}, {"edge2d": 0.0, "rgb2depth": 0.3})},
                        N_FEATURES)
    fig = D.figure_alpha_diagnostic(s, 0.2)
    texts = {t.get_text(): t.get_color() for t in fig.axes[0].texts}
    assert {"44%", "5%", "0%", "30%"} <= set(texts)
    assert texts["44%"] == texts["30%"] == "#D62728" and texts["5%"] != "#D62728"


def test_many_subjects_wrap_into_rows():
    base = planted({"edge2d": 0.1, "rgb2depth": 0.1}, {"edge2d": 0.1, "rgb2depth": 0.1})
    s = D.alpha_summary({f"subj{i:02d}": base for i in range(1, 7)}, N_FEATURES)
    fig = D.figure_alpha_diagnostic(s, 0.2)
    maps = [ax for ax in fig.axes if ax.images]
    assert len(maps) == 6
    assert len({round(ax.get_position().y0, 3) for ax in maps}) == 2  # 4 + 2
    assert fig.get_size_inches()[0] < 22
