"""Per-voxel test statistics against scipy, scikit-learn and statsmodels."""

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import r2_score as sk_r2
from statsmodels.stats.multitest import multipletests

from neurotask.pipeline.stats import scores as stats


def _data(n=40, v=25, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((n, v))
    pred = 0.4 * y + rng.standard_normal((n, v))
    return y.astype(dtype), pred.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pearson_r_and_pvalue_equal_scipy(dtype):
    y, pred = _data(dtype=dtype)
    r = stats.pearson_r(y, pred)
    p = stats.pearson_pvalue(r, y.shape[0])
    p_greater = stats.pearson_pvalue(r, y.shape[0], alternative="greater")
    for j in range(y.shape[1]):
        a, b = y[:, j].astype(np.float64), pred[:, j].astype(np.float64)
        ref = sps.pearsonr(a, b)
        assert r[j] == pytest.approx(ref.statistic, abs=1e-12)
        assert p[j] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)
        assert p_greater[j] == pytest.approx(sps.pearsonr(a, b, alternative="greater").pvalue,
                                             rel=1e-9, abs=1e-300)


def test_pearson_r_keeps_tiny_variations_of_float32_predictions():
    # Heavily regularised voxels: predictions vary by ~1e-6 around an O(1) mean.
    rng = np.random.default_rng(1)
    y = rng.standard_normal((200, 3))
    signal = y + rng.standard_normal((200, 3))
    pred = (5.0 + 1e-4 * signal).astype(np.float32)
    r = stats.pearson_r(y, pred)
    for j in range(3):
        assert r[j] == pytest.approx(sps.pearsonr(y[:, j], pred[:, j].astype(np.float64)).statistic,
                                     abs=1e-12)
    assert np.all(r > 0.5)


def test_constant_or_nonfinite_columns_give_nan_r_and_p_one():
    y, pred = _data(v=5)
    y[:, 1] = 3.0
    pred[:, 2] = -1.0
    y[4, 3] = np.nan
    r = stats.pearson_r(y, pred)
    assert np.isnan(r[[1, 2, 3]]).all() and np.isfinite(r[[0, 4]]).all()
    p = stats.pearson_pvalue(r, y.shape[0])
    assert np.all(p[[1, 2, 3]] == 1.0)
    assert np.all(stats.pearson_pvalue(r, y.shape[0], alternative="greater")[[1, 2, 3]] == 1.0)
    scores = stats.test_scores(y, pred)
    assert np.isnan(scores["r2"][1])
    assert np.all(scores["pvalue"][[1, 2, 3]] == 1.0)


def test_r2_equals_sklearn():
    y, pred = _data(v=10)
    ref = sk_r2(y, pred, multioutput="raw_values")
    np.testing.assert_allclose(stats.r2_score(y, pred), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.test_scores(y, pred)["r2"], ref, rtol=1e-12, atol=1e-12)


def test_pvalue_input_checks():
    with pytest.raises(ValueError, match="n=2"):
        stats.pearson_pvalue(np.array([0.5]), 2)
    with pytest.raises(ValueError, match="alternative"):
        stats.pearson_pvalue(np.array([0.5]), 10, alternative="less")


def test_fdr_bh_equals_statsmodels_and_the_definition():
    rng = np.random.default_rng(2)
    p = np.concatenate([rng.uniform(0, 1, 300), rng.uniform(0, 1e-3, 40)])
    q, sig = stats.fdr_bh(p, 0.05)
    reject, q_ref, _, _ = multipletests(p, alpha=0.05, method="fdr_bh")
    np.testing.assert_allclose(q, q_ref, rtol=1e-12)
    np.testing.assert_array_equal(sig, reject)
    # The definition: reject the k smallest, k the largest rank with p_(k) <= k/m * alpha.
    order = np.sort(p)
    ranks = np.arange(1, p.size + 1)
    k = ranks[order <= ranks / p.size * 0.05].max()
    assert sig.sum() == k and np.all(p[sig] <= order[k - 1])


def test_fdr_bh_counts_nan_as_one_and_handles_empty():
    p = np.array([1e-4, np.nan, 0.01, 0.04])
    q, sig = stats.fdr_bh(p, 0.05)
    _, q_ref, _, _ = multipletests([1e-4, 1.0, 0.01, 0.04], method="fdr_bh")
    np.testing.assert_allclose(q, q_ref)
    assert not sig[1]
    q0, s0 = stats.fdr_bh(np.array([]))
    assert q0.size == 0 and s0.size == 0


def test_with_fdr_is_benjamini_hochberg_per_task():
    import xarray as xr
    from statsmodels.stats.multitest import multipletests

    from neurotask.pipeline.stats.scores import with_fdr

    rng = np.random.default_rng(4)
    p = np.concatenate([rng.uniform(0, 1e-3, (2, 20)), rng.uniform(0, 1, (2, 80))], axis=1)
    p[1, 3] = np.nan  # counts as 1, never significant
    ds = with_fdr(xr.Dataset({"pvalue": (("task", "voxel"), p)}, coords={"task": ["a", "b"]}), 0.1)
    for i in range(2):
        want = np.where(np.isfinite(p[i]), p[i], 1.0)
        reject, q, _, _ = multipletests(want, alpha=0.1, method="fdr_bh")
        np.testing.assert_array_equal(ds["qvalue"].values[i], q)
        np.testing.assert_array_equal(ds["significant"].values[i], reject)
    assert not ds["significant"].values[1, 3] and ds.attrs["fdr_alpha"] == 0.1


# --------------------------------------------------------------------------- Figure 1's ROI test


def test_simes_p_is_the_definition_and_rejects_exactly_when_bh_rejects_anything():
    from neurotask.pipeline.stats.task_structure import simes_p

    assert simes_p(np.array([0.01, 0.04, 0.03])) == pytest.approx(min(3 * 0.01, 3 / 2 * 0.03, 0.04))
    assert simes_p(np.array([0.5, np.nan])) == 0.5  # NaN left out
    assert np.isnan(simes_p(np.array([np.nan])))
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.uniform(size=rng.integers(1, 30)) ** rng.uniform(0.5, 4)
        assert (simes_p(p) <= 0.05) == bool(stats.fdr_bh(p, 0.05)[1].any())


def test_roi_tests_find_the_planted_roi_and_correct_over_cells():
    from neurotask.pipeline.stats.task_structure import roi_tests

    rng = np.random.default_rng(1)
    labels = np.repeat(["A", "B", ""], 50)
    p = rng.uniform(size=(2, 150))
    p[0, :10] = 1e-6  # task 0 predicts 10 voxels of A
    combined, q = roi_tests(p, labels, ["A", "B", "C"], 0.05)
    assert combined.shape == q.shape == (2, 3)
    assert q[0, 0] < 0.05 and (q[:, 1] > 0.05).all() and q[1, 0] > 0.05
    assert np.isnan(combined[:, 2]).all() and np.isnan(q[:, 2]).all()  # C has no voxel
    expected = multipletests(combined[:, :2].ravel(), method="fdr_bh")[1].reshape(2, 2)
    np.testing.assert_allclose(q[:, :2], expected)


def test_roi_noise_summary_means_the_ceiling_and_takes_the_median_normalised_r():
    from neurotask.pipeline.stats.task_structure import roi_noise_summary

    labels = np.array(["A", "A", "A", "B", "B", ""])
    ceiling = np.array([0.5, 0.25, np.nan, 0.0, 0.0, 0.9])
    r = np.array([[0.25, 0.25, 0.3, 0.1, 0.1, 0.5]])
    mean_c, norm = roi_noise_summary(r, ceiling, labels, ["A", "B"])
    np.testing.assert_allclose(mean_c, [0.375, 0.0])
    assert norm[0, 0] == pytest.approx(np.median([0.5, 1.0]))
    assert np.isnan(norm[0, 1])  # a ceiling of 0: nothing to normalise by


def test_analysis_carries_the_roi_test_and_ceiling_with_units():
    import xarray as xr

    from neurotask.pipeline.stats.task_structure import analyse

    rng = np.random.default_rng(2)
    labels = np.repeat(["LHPPA", "RHPPA", ""], 40)
    r = rng.normal(0, 0.05, (3, 120))
    r[0, :40] += 0.4
    p = 2 * sps.norm.sf(np.abs(r) * np.sqrt(200))
    ds = xr.Dataset({"r": (("task", "voxel"), r), "pvalue": (("task", "voxel"), p),
                     "noise_ceiling_r": ("voxel", np.full(120, 0.5))},
                    coords={"task": ["edge2d", "rgb2depth", "class_1000"], "roi": ("voxel", labels)})
    out = analyse({"S1": ds}, n_clusters=2, n_bootstrap=3, n_permutations=5)
    assert bool(out.roi_significant.sel(subject="S1", task="edge2d", roi="LHPPA"))
    assert not bool(out.roi_significant.sel(subject="S1", task="edge2d", roi="RHPPA"))
    np.testing.assert_allclose(out.roi_noise_ceiling.values, 0.5)
    for name in ("roi_p", "roi_q", "roi_significant", "roi_noise_ceiling", "roi_noise_normalized_r"):
        assert out[name].attrs["long_name"] and out[name].attrs["units"] == "1"
    # without p-values or ceiling (e.g. significance 'stored' on results without pvalue): NaN, no error
    bare = ds.drop_vars(["pvalue", "noise_ceiling_r"]).assign(significant=(("task", "voxel"), p < 0.001))
    out = analyse({"S1": bare}, significance="stored", n_clusters=2, n_bootstrap=3, n_permutations=5)
    assert np.isnan(out.roi_p.values).all() and np.isnan(out.roi_noise_ceiling.values).all()
    assert not out.roi_significant.values.any()
