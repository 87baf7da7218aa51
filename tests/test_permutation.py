"""The permutation test of a voxel's test r: its permutation set, against a slow reference
loop, against the parametric p and i.i.d. shuffles, its calibration under the null, seeding
and independence from voxel chunking."""

import numpy as np
import pytest

from neurotask.pipeline.stats import scores as stats


def _voxels(n=30, v=12, seed=0):
    """Responses and predictions with correlations from 0 to ~0.7, one voxel anticorrelated."""
    rng = np.random.default_rng(seed)
    rho = np.linspace(0.0, 0.7, v)
    rho[1] = -0.5
    y = rng.standard_normal((n, v))
    pred = rho * y + np.sqrt(1 - rho**2) * rng.standard_normal((n, v))
    return y, pred


def _reference(y, pred, perms, alternative):
    """Slow loop: every voxel, every permutation, r by np.corrcoef in float64."""
    n, v = y.shape
    null = np.empty((v, perms.shape[0]))
    for j in range(v):
        for k, pi in enumerate(perms):
            null[j, k] = np.corrcoef(y[pi, j], pred[:, j])[0, 1]
    r = np.array([np.corrcoef(y[:, j], pred[:, j])[0, 1] for j in range(v)])
    if alternative == "greater":
        count = (null >= r[:, None] - stats._TIE_ATOL).sum(axis=1)
    else:
        count = (np.abs(null) >= np.abs(r)[:, None] - stats._TIE_ATOL).sum(axis=1)
    return r, count, null


def test_permutation_set_is_a_seeded_product_design():
    ps = stats.permutation_set(25, 99, seed=7)
    n_rows, n_cols = ps.rows.shape[0], ps.cols.shape[0]
    assert ps.n_test == 25 and ps.n_permutations == 99
    assert n_rows * n_cols >= 100 and abs(n_rows - n_cols) <= 1
    np.testing.assert_array_equal(ps.rows[0], np.arange(25))
    np.testing.assert_array_equal(ps.cols[0], np.arange(25))
    for perm in np.vstack([ps.rows, ps.cols, ps.explicit()]):
        np.testing.assert_array_equal(np.sort(perm), np.arange(25))
    assert np.unique(ps.counted).size == 99 and ps.counted.min() >= 1
    assert ps.counted.max() < n_rows * n_cols
    again = stats.permutation_set(25, 99, seed=7)
    np.testing.assert_array_equal(again.explicit(), ps.explicit())
    other = stats.permutation_set(25, 99, seed=8)
    assert not np.array_equal(other.explicit(), ps.explicit())
    # The paper's default: 5000 permutations from a 71 x 71 design.
    big = stats.permutation_set(738, 5000, seed=0)
    assert big.rows.shape == (71, 738) and big.cols.shape == (71, 738)
    assert big.n_permutations == 5000


def test_explicit_permutations_are_distinct_random_pairings():
    ps = stats.permutation_set(40, 500, seed=3)
    pi = ps.explicit()
    assert np.unique(pi, axis=0).shape[0] == 500  # no repeats, identity not among them
    assert not np.any(np.all(pi == np.arange(40), axis=1))
    # Uniform pairings: every row lands on every position about equally often.
    hits = np.zeros((40, 40))
    np.add.at(hits, (np.arange(40)[None, :].repeat(500, 0), pi), 1)
    assert hits.mean() == pytest.approx(500 / 40)
    assert hits.std() < 2 * np.sqrt(500 / 40)


@pytest.mark.parametrize("alternative", ["greater", "two-sided"])
def test_matches_slow_reference_loop(alternative):
    y, pred = _voxels()
    res = stats.permutation_test(y, pred, 199, seed=11, alternative=alternative,
                                 null_quantiles=[0.05, 0.5, 0.95, 0.99])
    r, count, null = _reference(y, pred, stats.permutation_set(30, 199, 11).explicit(), alternative)
    np.testing.assert_allclose(res.r, r, atol=1e-12)
    np.testing.assert_array_equal(res.n_exceed, count)
    np.testing.assert_allclose(res.pvalue, (1 + count) / 200)
    expected_q = np.quantile(null, [0.05, 0.5, 0.95, 0.99], axis=1)
    np.testing.assert_allclose(res.null_quantiles, expected_q, atol=1e-6)
    assert res.pvalue.min() == pytest.approx(1 / 200)  # the strongest voxels beat every permutation


def test_empirical_p_tracks_parametric_p_on_gaussian_data():
    n, v, n_perm = 80, 300, 4000
    rng = np.random.default_rng(5)
    rho = np.linspace(0, 0.45, v)
    y = rng.standard_normal((n, v))
    pred = rho * y + np.sqrt(1 - rho**2) * rng.standard_normal((n, v))
    for alternative in ("greater", "two-sided"):
        res = stats.permutation_test(y, pred, n_perm, seed=1, alternative=alternative)
        parametric = stats.pearson_pvalue(res.r, n, alternative=alternative)
        # Monte Carlo error of an empirical p, plus the +1 of the estimator.
        se = np.sqrt(parametric * (1 - parametric) / n_perm)
        bound = 4.5 * np.maximum(se, 1 / n_perm) + 1 / (n_perm + 1)
        assert np.all(np.abs(res.pvalue - parametric) <= bound)


def test_agrees_with_iid_shuffles():
    # The authors shuffled i.i.d.; the product design must estimate the same p.
    n, v, n_perm = 50, 60, 3000
    y, pred = _voxels(n, v, seed=4)
    res = stats.permutation_test(y, pred, n_perm, seed=2)
    rng = np.random.default_rng(9)
    perms = np.argsort(rng.random((n_perm, n)), axis=1)
    yz = (y - y.mean(0)) / np.linalg.norm(y - y.mean(0), axis=0)
    pz = (pred - pred.mean(0)) / np.linalg.norm(pred - pred.mean(0), axis=0)
    null = np.einsum("knv,nv->kv", yz[perms], pz)
    p_iid = (1 + (null >= res.r - stats._TIE_ATOL).sum(0)) / (1 + n_perm)
    se = np.sqrt(2 * p_iid * (1 - p_iid) / n_perm)  # difference of two independent estimates
    assert np.all(np.abs(res.pvalue - p_iid) <= 4.5 * np.maximum(se, 1 / n_perm) + 1 / n_perm)


@pytest.mark.parametrize("alternative", ["greater", "two-sided"])
def test_calibrated_under_the_null(alternative):
    # No correlation at all: P(p <= a) must be a (exact test; p on the grid k / 100).
    n, v = 20, 4000
    rng = np.random.default_rng(6)
    y, pred = rng.standard_normal((n, v)), rng.standard_normal((n, v))
    p = np.concatenate([stats.permutation_test(y[:, s::4], pred[:, s::4], 99, seed=s,
                                               alternative=alternative).pvalue for s in range(4)])
    for a in (0.01, 0.05, 0.1, 0.2, 0.5):
        assert abs(np.mean(p <= a) - a) <= 4 * np.sqrt(a * (1 - a) / v), a


def test_seeded_reproducibility():
    y, pred = _voxels(n=60, v=40, seed=1)
    a = stats.permutation_test(y, pred, 500, seed=3, null_quantiles=[0.95])
    b = stats.permutation_test(y, pred, 500, seed=3, null_quantiles=[0.95])
    c = stats.permutation_test(y, pred, 500, seed=4, null_quantiles=[0.95])
    np.testing.assert_array_equal(a.n_exceed, b.n_exceed)
    np.testing.assert_array_equal(a.null_quantiles, b.null_quantiles)
    assert not np.array_equal(a.null_quantiles, c.null_quantiles)
    assert not np.array_equal(a.n_exceed, c.n_exceed)


def test_p_does_not_depend_on_voxel_chunking():
    y, pred = _voxels(n=70, v=53, seed=2)
    y[:, 7] = 1.0  # a constant voxel among them
    full = stats.permutation_test(y, pred, 1000, seed=5, null_quantiles=[0.5, 0.99])
    bounds = [0, 1, 2, 9, 10, 31, 53]
    for batch in (1, 5, 16, 64):
        parts = [stats.permutation_test(y[:, a:b], pred[:, a:b], 1000, seed=5,
                                        null_quantiles=[0.5, 0.99], voxel_batch=batch)
                 for a, b in zip(bounds[:-1], bounds[1:])]
        np.testing.assert_array_equal(np.concatenate([p.n_exceed for p in parts]), full.n_exceed)
        np.testing.assert_array_equal(np.concatenate([p.r for p in parts]), full.r)
        np.testing.assert_array_equal(np.hstack([p.null_quantiles for p in parts]),
                                      full.null_quantiles)


def test_constant_and_nonfinite_voxels_get_p_one():
    y, pred = _voxels(v=6)
    y[:, 2] = 4.0
    pred[:, 3] = 0.0
    y[5, 4] = np.inf
    res = stats.permutation_test(y, pred, 99, seed=0, null_quantiles=[0.5])
    bad = [2, 3, 4]
    assert np.all(res.pvalue[bad] == 1.0) and np.isnan(res.r[bad]).all()
    assert np.isnan(res.null_quantiles[:, bad]).all()
    good = [0, 1, 5]
    alone = stats.permutation_test(y[:, good], pred[:, good], 99, seed=0)
    np.testing.assert_array_equal(res.n_exceed[good], alone.n_exceed)


def test_invariant_to_affine_predictions_with_tiny_variation():
    # A heavily regularised voxel: predictions vary by 1e-7 around 5. Centring in float64
    # keeps its p equal to that of the unscaled predictions.
    y, pred = _voxels(n=100, v=20, seed=3)
    base = stats.permutation_test(y, pred, 999, seed=1)
    tiny = stats.permutation_test(y.astype(np.float32), 5.0 + 1e-7 * pred, 999, seed=1)
    np.testing.assert_allclose(tiny.r, base.r, atol=1e-6)
    assert np.max(np.abs(tiny.n_exceed - base.n_exceed)) <= 1


def test_input_errors_name_the_problem():
    y, pred = _voxels()
    with pytest.raises(ValueError, match="one shape"):
        stats.permutation_test(y, pred[:, :3])
    with pytest.raises(ValueError, match="one shape"):
        stats.permutation_test(y[:, 0], pred[:, 0])
    with pytest.raises(ValueError, match="n_test"):
        stats.permutation_test(y[:2], pred[:2])
    with pytest.raises(ValueError, match="n_permutations"):
        stats.permutation_test(y, pred, 0)
    with pytest.raises(ValueError, match="seed"):
        stats.permutation_test(y, pred, 10, seed=-1)
    with pytest.raises(ValueError, match="alternative"):
        stats.permutation_test(y, pred, 10, alternative="less")
    with pytest.raises(ValueError, match="null_quantiles"):
        stats.permutation_test(y, pred, 10, null_quantiles=[1.5])
    with pytest.raises(ValueError, match="voxel_batch"):
        stats.permutation_test(y, pred, 10, voxel_batch=0)
