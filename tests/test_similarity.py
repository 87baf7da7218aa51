"""Task similarity, trees, graph, comparison statistics and the analysis Dataset.

Small cases are computed by hand; larger ones against scipy / sklearn / networkx.
"""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest
import xarray as xr
from scipy import stats
from scipy.cluster import hierarchy
from scipy.spatial.distance import pdist, squareform
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

from neurotask.pipeline.stats import similarity as S
from neurotask.pipeline.stats.task_structure import AnalysisError, analyse, roi_group_of, significance_mask, voxel_contrasts
from neurotask.pipeline.tasks import task_names
from tree_support import is_clade

# --------------------------------------------------------------------------- matrices


def test_performance_matrix_zeroes_non_significant_and_nan():
    r = np.array([[0.5, 0.2, np.nan], [0.1, -0.3, 0.4]])
    sig = np.array([[True, False, True], [False, True, True]])
    np.testing.assert_array_equal(S.performance_matrix(r, sig), [[0.5, 0, 0], [0, -0.3, 0.4]])


def test_performance_matrix_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        S.performance_matrix(np.zeros((2, 3)), np.zeros((2, 4), bool))


def test_cosine_hand_case_and_empty_task_is_zero_not_nan():
    m = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    s = S.cosine_similarity(m)
    expected = np.array([[1, 1 / np.sqrt(2), 0], [1 / np.sqrt(2), 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(s, expected, atol=1e-15)
    assert np.isfinite(s).all()


def test_cosine_matches_sklearn_including_zero_rows():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(7, 50)) * (rng.random((7, 50)) < 0.3)
    m[3] = 0.0
    np.testing.assert_allclose(S.cosine_similarity(m), sk_cosine(m), atol=1e-12)


def test_pearson_matches_numpy_and_constant_rows_are_zero():
    rng = np.random.default_rng(2)
    m = rng.normal(size=(5, 40))
    np.testing.assert_allclose(S.pearson_similarity(m), np.corrcoef(m), atol=1e-12)
    m[2] = 0.7  # constant
    s = S.pearson_similarity(m)
    assert np.all(s[2] == 0) and np.all(s[:, 2] == 0)
    keep = [0, 1, 3, 4]
    np.testing.assert_allclose(s[np.ix_(keep, keep)], np.corrcoef(m[keep]), atol=1e-12)


def test_jaccard_hand_case():
    sig = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)
    s = S.jaccard_similarity(sig)
    np.testing.assert_allclose(s, [[1, 1 / 3, 0], [1 / 3, 1, 0], [0, 0, 0]])


def test_jaccard_matches_scipy_distance():
    rng = np.random.default_rng(3)
    sig = rng.random((6, 30)) < 0.4
    expected = 1 - squareform(pdist(sig, "jaccard"))
    np.testing.assert_allclose(S.jaccard_similarity(sig), expected, atol=1e-12)


def test_task_similarity_dispatch_and_bad_metric():
    rng = np.random.default_rng(4)
    r = rng.normal(size=(4, 20))
    sig = rng.random((4, 20)) < 0.5
    m = S.performance_matrix(r, sig)
    np.testing.assert_allclose(S.task_similarity(r, sig, "cosine"), sk_cosine(m), atol=1e-12)
    np.testing.assert_allclose(S.task_similarity(r, sig, "pearson"), np.corrcoef(m), atol=1e-12)
    np.testing.assert_allclose(S.task_similarity(r, sig, "jaccard"), S.jaccard_similarity(sig))
    with pytest.raises(ValueError, match="metric must be one of"):
        S.task_similarity(r, sig, "euclid")


def test_upper_triangle_is_squareform_order():
    a = squareform(np.arange(1.0, 11.0))
    np.testing.assert_array_equal(S.upper_triangle(a), np.arange(1.0, 11.0))


# --------------------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("metric", S.METRICS)
def test_bootstrap_similarity_equals_explicit_resamples(metric):
    """Each resample equals the similarity of its voxels drawn explicitly, duplicates and
    voxels that are zero everywhere included (the bootstrap leaves those out of its sums)."""
    rng = np.random.default_rng(5)
    r = rng.normal(0.1, 0.2, size=(5, 80))
    sig = rng.random((5, 80)) < 0.2
    sig[4] = False  # an empty task
    boot = S.bootstrap_similarity(r, sig, 7, np.random.default_rng(0), metric, batch=3)
    # the same draws, made the same way (a batch of 3, 3, then 1 resamples of 80 voxels)
    draws = np.random.default_rng(0)
    idx = np.concatenate([draws.integers(0, 80, size=(n, 80)) for n in (3, 3, 1)])
    for k in range(7):
        expected = S.task_similarity(r[:, idx[k]], sig[:, idx[k]], metric)
        np.testing.assert_allclose(boot[k], expected, atol=1e-10)


def test_bootstrap_counts_rows_sum_and_seed():
    a = S.bootstrap_counts(100, 4, np.random.default_rng(9))
    b = S.bootstrap_counts(100, 4, np.random.default_rng(9))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a.sum(axis=1), 100)
    assert a.shape == (4, 100) and (a >= 0).all()
    np.testing.assert_array_equal(S.bootstrap_counts(100, 4, np.random.default_rng(9), columns=[3, 5]), a[:, [3, 5]])


def test_percentile_interval_matches_numpy():
    x = np.random.default_rng(10).normal(size=(200, 3, 3))
    got = S.percentile_interval(x, 0.9)
    np.testing.assert_allclose(got[..., 0], np.percentile(x, 5, axis=0))
    np.testing.assert_allclose(got[..., 1], np.percentile(x, 95, axis=0))
    with pytest.raises(ValueError):
        S.percentile_interval(x, 1.5)


# --------------------------------------------------------------------------- trees


def test_average_linkage_hand_case():
    s = np.array([[1, 0.9, 0.1], [0.9, 1, 0.3], [0.1, 0.3, 1]])
    z = S.task_linkage(s, "average")
    np.testing.assert_allclose(z, [[0, 1, 0.1, 2], [2, 3, 0.8, 3]])


def test_ward_equals_ward_on_normalised_profiles():
    m = np.random.default_rng(11).normal(size=(6, 25))
    z = S.task_linkage(S.cosine_similarity(m), "ward")
    unit = m / np.linalg.norm(m, axis=1, keepdims=True)
    np.testing.assert_allclose(z, hierarchy.linkage(unit, "ward"), atol=1e-10)


def test_average_linkage_equals_scipy_cosine_on_profiles():
    m = np.random.default_rng(12).normal(size=(8, 30))
    z = S.task_linkage(S.cosine_similarity(m), "average")
    np.testing.assert_allclose(z, hierarchy.linkage(m, "average", metric="cosine"), atol=1e-10)


def test_bad_linkage_and_nan_similarity():
    with pytest.raises(ValueError, match="linkage must be one of"):
        S.task_linkage(np.eye(3), "centroid")
    with pytest.raises(ValueError, match="NaN"):
        S.task_linkage(np.full((3, 3), np.nan))


def test_cut_tree_matches_fcluster_partition():
    m = np.random.default_rng(13).normal(size=(10, 20))
    z = S.task_linkage(S.cosine_similarity(m))
    for k in (2, 3, 5):
        labels = S.cut_tree(z, k)
        ref = hierarchy.fcluster(z, k, criterion="maxclust")
        assert adjusted_rand_score(labels, ref) == 1.0
        assert sorted(set(labels)) == list(range(k))
        assert labels[0] == 0  # numbered in order of first appearance
        assert adjusted_rand_score(labels, hierarchy.cut_tree(z, n_clusters=k).ravel()) == 1.0
    with pytest.raises(ValueError):
        S.cut_tree(z, 11)


def test_cut_tree_gives_exactly_k_groups_even_with_tied_heights():
    s = np.full((5, 5), 0.5) + 0.5 * np.eye(5)  # every pair equally similar
    z = S.task_linkage(s)
    for k in range(1, 6):
        assert len(set(S.cut_tree(z, k))) == k


def test_dendrogram_leaves_and_clades():
    s = np.array([[1, 0.9, 0.1, 0.1], [0.9, 1, 0.1, 0.1], [0.1, 0.1, 1, 0.8], [0.1, 0.1, 0.8, 1]])
    z = S.task_linkage(s)
    leaves = S.dendrogram_leaves(z)
    assert sorted(leaves) == [0, 1, 2, 3]
    assert {frozenset(leaves[:2]), frozenset(leaves[2:])} == {frozenset({0, 1}), frozenset({2, 3})}
    assert is_clade(z, [0, 1]) and is_clade(z, [3, 2]) and not is_clade(z, [1, 2])
    assert is_clade(z, [0, 1, 2, 3]) and is_clade(z, [2]) and not is_clade(z, [0, 1, 2])


def test_cophenetic_correlation_matches_scipy():
    rng = np.random.default_rng(14)
    za = S.task_linkage(S.cosine_similarity(rng.normal(size=(7, 20))))
    zb = S.task_linkage(S.cosine_similarity(rng.normal(size=(7, 20))))
    expected = stats.pearsonr(hierarchy.cophenet(za), hierarchy.cophenet(zb))[0]
    assert S.cophenetic_correlation(za, zb) == pytest.approx(expected)
    assert S.cophenetic_correlation(za, za) == pytest.approx(1.0)


def test_task_graph_joins_each_task_to_its_most_similar():
    s = np.array([[1, 0.5, 0.1, -0.2], [0.5, 1, 0.3, 0.0], [0.1, 0.3, 1, 0.2], [-0.2, 0.0, 0.2, 1]])
    g = S.task_graph(s, list("abcd"), 1, {"a": {"cluster": "3D"}})
    # nearest: a-b, b-a, c-b, d-c
    assert isinstance(g, nx.Graph) and list(g.nodes) == list("abcd")
    assert set(map(frozenset, g.edges)) == {frozenset("ab"), frozenset("bc"), frozenset("cd")}
    assert g["a"]["b"]["weight"] == 0.5 and g["c"]["d"]["weight"] == 0.2
    assert g.nodes["a"]["cluster"] == "3D" and g.nodes["b"] == {}
    # every other task a neighbour: only the pairs of positive similarity are joined
    everyone = S.task_graph(s, list("abcd"), 3)
    np.testing.assert_allclose(nx.to_numpy_array(everyone, nodelist=list("abcd")), np.where(s > 0, s, 0) - np.eye(4))
    # a NaN similarity (a task pair without a value) is never an edge
    with_nan = S.task_graph(np.array([[1, 0.4, 0.4], [0.4, 1, np.nan], [0.4, np.nan, 1]]), list("abc"), 2)
    assert set(map(frozenset, with_nan.edges)) == {frozenset("ab"), frozenset("ac")}
    with pytest.raises(ValueError):
        S.task_graph(s, ["a", "b"], 1)


# --------------------------------------------------------------------------- comparison


def test_batch_spearman_matches_scipy():
    rng = np.random.default_rng(15)
    a, b, c = (x + x.T for x in rng.normal(size=(3, 9, 9)))
    batch = S.batch_spearman(np.stack([a, c, b]), b)
    for got, x in zip(batch, (a, c)):
        assert got == pytest.approx(stats.spearmanr(S.upper_triangle(x), S.upper_triangle(b))[0])
    assert batch[2] == pytest.approx(1.0)


def _symmetric(rng, t):
    x = rng.normal(size=(t, t))
    return x + x.T


def test_mantel_exhaustive_small_case():
    """4 tasks: 24 label permutations; compare against all of them, brute force."""
    rng = np.random.default_rng(16)
    a, b = _symmetric(rng, 4), _symmetric(rng, 4)
    obs = stats.spearmanr(S.upper_triangle(a), S.upper_triangle(b))[0]
    null = [
        stats.spearmanr(S.upper_triangle(a[np.ix_(p, p)]), S.upper_triangle(b))[0]
        for p in itertools.permutations(range(4))
    ]
    stat, p = S.mantel_test(a, b, n_permutations=20000, seed=3)
    assert stat == pytest.approx(obs)
    exact = np.mean(np.array(null) >= obs - 1e-12)
    assert p == pytest.approx(exact, abs=0.01)


def test_mantel_matches_brute_force_loop_with_same_permutations():
    rng = np.random.default_rng(17)
    a = _symmetric(rng, 8)
    b = a + 0.5 * _symmetric(rng, 8)
    stat, p = S.mantel_test(a, b, n_permutations=300, seed=5)
    perms = np.random.default_rng(5).permuted(np.tile(np.arange(8), (300, 1)), axis=1)
    null = np.array([stats.spearmanr(S.upper_triangle(a[np.ix_(q, q)]), S.upper_triangle(b))[0] for q in perms])
    assert stat == pytest.approx(stats.spearmanr(S.upper_triangle(a), S.upper_triangle(b))[0])
    assert p == pytest.approx((1 + np.sum(null >= stat - 1e-12)) / 301)
    assert p < 0.05  # b is a plus noise: associated
    _, p2 = S.mantel_test(a, b, n_permutations=300, seed=5)
    assert p2 == p  # seeded
    _, p_two = S.mantel_test(a, b, n_permutations=300, seed=5, alternative="two-sided")
    assert p_two == pytest.approx((1 + np.sum(np.abs(null) >= abs(stat) - 1e-12)) / 301)


def test_mantel_pearson_and_bad_arguments():
    rng = np.random.default_rng(18)
    a, b = _symmetric(rng, 5), _symmetric(rng, 5)
    stat, _ = S.mantel_test(a, b, method="pearson", n_permutations=10)
    assert stat == pytest.approx(stats.pearsonr(S.upper_triangle(a), S.upper_triangle(b))[0])
    with pytest.raises(ValueError):
        S.mantel_test(a, b[:4, :4])
    with pytest.raises(ValueError):
        S.mantel_test(a, b, method="kendall")


def test_adjusted_rand_index_hand_case():
    # contingency n_ij: 2, 1, 1 -> index 1; rows 2+2 -> 2; cols 2,1,1 -> 1; C(4,2) = 6
    # expected 2*1/6 = 1/3; max (2+1)/2 = 3/2; ARI = (1 - 1/3) / (3/2 - 1/3) = 4/7
    assert S.adjusted_rand_index([0, 0, 1, 1], ["x", "x", "y", "z"]) == pytest.approx(4 / 7)
    assert S.adjusted_rand_index([0, 0, 1, 1], [5, 5, 2, 2]) == 1.0
    with pytest.raises(ValueError):
        S.adjusted_rand_index([0, 1], [0])


def test_subject_correlations_match_pearson():
    rng = np.random.default_rng(19)
    sims = np.stack([_symmetric(rng, 6) for _ in range(3)])
    c = S.subject_correlations(sims)
    assert c[0, 2] == pytest.approx(stats.pearsonr(S.upper_triangle(sims[0]), S.upper_triangle(sims[2]))[0])
    np.testing.assert_allclose(np.diag(c), 1.0)


# --------------------------------------------------------------------------- ROIs


def test_roi_summary_hand_case():
    r = np.array([[0.1, 0.3, 0.5, np.nan, 0.2], [0.0, 0.0, 0.4, 0.2, 0.1]])
    sig = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=bool)
    labels = np.array(["A", "A", "B", "B", ""])
    out = S.roi_summary(r, sig, labels, ["A", "B", "C"])
    np.testing.assert_allclose(out["mean_r"][:, :2], [[0.2, 0.5], [0.0, 0.3]])
    np.testing.assert_allclose(out["fraction_significant"][:, :2], [[0.5, 0.5], [0.0, 0.5]])
    np.testing.assert_array_equal(out["n_voxels"], [2, 2, 0])
    assert np.isnan(out["mean_r"][:, 2]).all()
    assert out["sem_r"][0, 0] == pytest.approx(stats.sem([0.1, 0.3]))


def test_contrast_wins_hand_case():
    r3 = np.array([0.3, 0.1, 0.5, 0.2, 0.4])
    r2 = np.array([0.1, 0.2, 0.1, 0.1, 0.0])
    considered = np.array([True, True, True, False, True])
    group = np.array([0, 0, 1, 1, -1])
    out = S.contrast_wins(r3, r2, considered, group, 2)
    np.testing.assert_array_equal(out["n_wins"], [1, 1])
    np.testing.assert_array_equal(out["n_voxels"], [2, 1])
    np.testing.assert_allclose(out["mean_difference"], [0.05, 0.4])


# --------------------------------------------------------------------------- analyse


def _synthetic(seed: int, tasks: list[str], n_voxels: int = 400) -> xr.Dataset:
    """Two blocks of tasks sharing voxel patterns, an empty task, ROI labels."""
    rng = np.random.default_rng(seed)
    t = len(tasks)
    base = rng.normal(size=(2, n_voxels))
    group = np.arange(t) % 2
    r = 0.3 * np.abs(base[group] + 0.3 * rng.normal(size=(t, n_voxels)))
    r[-1] = 0.0  # this task predicts nothing
    p = np.where(r > 0.25, 1e-8, 0.5)
    roi = np.array(["", "LHPPA", "RHEarlyVis", "LHOPA"])[rng.integers(0, 4, n_voxels)]
    return xr.Dataset(
        {
            "r": (("task", "voxel"), r),
            "pvalue": (("task", "voxel"), p),
            "qvalue": (("task", "voxel"), p),
            "significant": (("task", "voxel"), p < 0.05),
        },
        coords={"task": tasks, "voxel": np.arange(n_voxels), "roi": ("voxel", roi)},
    )


TASKS = ["keypoint2d", "keypoint3d", "edge2d", "edge3d", "class_1000", "rgb2depth", "curvature"]


@pytest.fixture(scope="module")
def synthetic_analysis():
    results = {f"s{i}": _synthetic(i, TASKS) for i in range(3)}
    return results, analyse(results, n_permutations=200, n_bootstrap=50, seed=1)


def test_analyse_layout_and_similarity(synthetic_analysis):
    results, out = synthetic_analysis
    assert out.sizes["subject"] == 3 and out.sizes["task"] == len(TASKS)
    assert list(out.task.values) == TASKS
    for s, ds in results.items():
        sig = significance_mask(ds, "parametric", 0.05)
        expected = sk_cosine(np.where(sig, ds.r.values, 0.0))
        np.testing.assert_allclose(out.similarity.sel(subject=s).values, expected, atol=1e-12)
        np.testing.assert_array_equal(out.n_significant.sel(subject=s).values, sig.sum(axis=1))
    np.testing.assert_allclose(out.similarity_mean.values, out.similarity.values.mean(axis=0))
    assert bool(out.no_significant_voxel.sel(task="curvature").all())
    assert not bool(out.no_significant_voxel.sel(task="keypoint3d").any())
    assert np.isfinite(out.similarity.values).all()
    assert (out.similarity.sel(task="curvature").values == 0).all()
    lo, hi = out.similarity_mean_ci.sel(bound="lower"), out.similarity_mean_ci.sel(bound="upper")
    assert bool((lo <= hi + 1e-12).all())
    assert out.linkage_mean.shape == (len(TASKS) - 1, 4)
    assert sorted(out.leaves_mean.values) == list(range(len(TASKS)))


def test_analyse_taskonomy_comparison_and_rois(synthetic_analysis):
    results, out = synthetic_analysis
    rho, p = S.mantel_test(
        out.similarity_mean.values, out.taskonomy_similarity.values, n_permutations=10
    )
    assert float(out.spearman_taskonomy_mean) == pytest.approx(rho)
    assert 0 < float(out.mantel_p_mean) <= 1
    assert out.spearman_taskonomy_ci.shape == (3, 2)
    assert -1 <= float(out.ari_taskonomy_mean) <= 1
    assert list(out.taskonomy_cluster.values) == ["2D", "3D", "2D", "3D", "semantic", "3D", "3D"]
    assert sorted(out.roi.values) == ["LHOPA", "LHPPA", "RHEarlyVis"]
    ds = results["s0"]
    in_ppa = ds.roi.values == "LHPPA"
    expected = ds.r.sel(task="edge3d").values[in_ppa].mean()
    assert float(out.roi_mean_r.sel(subject="s0", task="edge3d", roi="LHPPA")) == pytest.approx(expected)
    # Figure 3 counts: scene = OPA + PPA voxels significant for edge3d or edge2d
    sig = significance_mask(ds, "parametric", 0.05)
    t3, t2 = TASKS.index("edge3d"), TASKS.index("edge2d")
    scene = np.isin(ds.roi.values, ["LHPPA", "LHOPA"]) & (sig[t3] | sig[t2])
    r = ds.r.values
    assert int(out.contrast_n_voxels.sel(subject="s0", contrast="edge", roi_group="scene")) == scene.sum()
    assert int(out.contrast_n_3d_wins.sel(subject="s0", contrast="edge", roi_group="scene")) == (r[t3] > r[t2])[scene].sum()


def test_analyse_is_seeded_and_deterministic(synthetic_analysis):
    results, out = synthetic_analysis
    again = analyse(results, n_permutations=200, n_bootstrap=50, seed=1)
    xr.testing.assert_identical(out, again)
    other = analyse(results, n_permutations=200, n_bootstrap=50, seed=2)
    assert not np.array_equal(other.similarity_ci.values, out.similarity_ci.values)
    np.testing.assert_array_equal(other.similarity.values, out.similarity.values)


def test_analyse_options_and_errors():
    results = {f"s{i}": _synthetic(i, TASKS) for i in range(2)}
    out = analyse(results, metric="jaccard", linkage="ward", n_permutations=10, n_bootstrap=5, significance="stored")
    ds = results["s0"]
    np.testing.assert_allclose(out.similarity.sel(subject="s0").values, S.jaccard_similarity(ds.significant.values))
    assert out.attrs["linkage"] == "ward"
    with pytest.raises(AnalysisError, match="significance"):
        analyse(results, significance="bogus")
    with pytest.raises(AnalysisError, match="n_clusters"):
        analyse(results, n_clusters=20)
    with pytest.raises(AnalysisError, match="tasks"):
        analyse({"a": results["s0"], "b": results["s1"].isel(task=slice(0, 3))})
    with pytest.raises(AnalysisError, match="no subjects"):
        analyse({})
    with pytest.raises(AnalysisError, match="'pvalue'"):
        analyse({"a": results["s0"].drop_vars("pvalue")})


def test_analyse_non_taskonomy_tasks_gives_nan_comparison():
    ds = _synthetic(0, ["mine_a", "mine_b", "keypoint2d", "keypoint3d"])
    out = analyse({"s": ds}, n_permutations=10, n_bootstrap=5, n_clusters=2)
    assert np.isnan(float(out.spearman_taskonomy_mean))
    assert list(out.taskonomy_cluster.values) == ["", "", "2D", "3D"]


def test_voxel_contrasts_and_roi_groups():
    ds = _synthetic(0, TASKS)
    d = voxel_contrasts(ds)
    assert list(d.contrast.values) == ["keypoint", "edge"]
    np.testing.assert_allclose(d.sel(contrast="edge").values, ds.r.sel(task="edge3d").values - ds.r.sel(task="edge2d").values)
    assert "roi" in d.coords
    assert roi_group_of("LHPPA") == "scene" and roi_group_of("RHEarlyVis") == "early_visual"
    assert roi_group_of("LHLOC") is None
    assert set(task_names()) >= set(TASKS)


def test_every_analysis_variable_and_coordinate_is_described(synthetic_analysis):
    """units and long_name on every variable (units also on numeric coordinates), as stored."""
    _, out = synthetic_analysis
    for name in out.data_vars:
        attrs = out[name].attrs
        assert attrs.get("long_name") and "units" in attrs, name
    for name in out.coords:
        attrs = out[name].attrs
        assert attrs.get("long_name"), name
        assert ("units" in attrs) == (out[name].dtype.kind in "iuf"), name
    assert out["similarity_mean"].attrs["long_name"] == "brain-derived task similarity, mean over subjects"
    assert out["n_significant"].attrs["units"] == "voxels"
