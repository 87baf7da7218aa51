"""Noise ceiling from repeated showings: recovery of a simulated known ceiling, the ANOVA
identities, the m-trial formula against a perfect model's sample r, and the helpers."""

import numpy as np
import pytest
from scipy import stats as sps

from neurotask.pipeline.stats import noise_ceiling as nc


def _simulate(rng, s2, n2, n_images, showings):
    """Repeats (k, g, v): offset + signal (var s2) + noise (var n2); NaN past each image's
    number of showings (an int, or (g,) ints)."""
    v = s2.size
    k = np.broadcast_to(showings, (n_images,))
    offset = rng.normal(0.0, 5.0, v)
    signal = rng.normal(0.0, np.sqrt(s2), (n_images, v))
    y = offset + signal + rng.normal(0.0, np.sqrt(n2), (int(k.max()), n_images, v))
    y[np.arange(k.max())[:, None] >= k[None, :]] = np.nan
    return y


def _true_r(s2, n2, m):
    return np.sqrt(s2 / (s2 + n2 * np.mean(1.0 / np.asarray(m, dtype=float))))


def test_recovers_true_ceiling_at_bold5000_design():
    # 113 images x 4 showings, per-voxel signal and noise variances in [0.2, 2].
    # Stated tolerance: |mean error| <= 0.01, mean |error| <= 0.04, 95% of voxels within 0.1.
    rng = np.random.default_rng(0)
    v = 2000
    s2, n2 = rng.uniform(0.2, 2.0, v), rng.uniform(0.2, 2.0, v)
    sn = nc.signal_noise(_simulate(rng, s2, n2, 113, 4))
    np.testing.assert_allclose(sn.ncsnr, np.sqrt(sn.signal_var / sn.noise_var))
    for m in (1, 4):
        err = nc.noise_ceiling(sn.ncsnr, m).r - _true_r(s2, n2, m)
        assert abs(err.mean()) <= 0.01
        assert np.abs(err).mean() <= 0.04
        assert np.quantile(np.abs(err), 0.95) <= 0.1
    # The variance components themselves are unbiased.
    for est, true in ((sn.signal_var, s2), (sn.noise_var, n2)):
        ratio = est / true
        assert abs(ratio.mean() - 1) <= 4 * ratio.std() / np.sqrt(v)


def test_converges_with_many_images_and_unequal_showings():
    # 3000 images shown 2-5 times (NaN padding): every voxel within 0.05 of its ceiling.
    rng = np.random.default_rng(1)
    v = 200
    s2, n2 = rng.uniform(0.2, 2.0, v), rng.uniform(0.2, 2.0, v)
    showings = rng.integers(2, 6, 3000)
    sn = nc.signal_noise(_simulate(rng, s2, n2, 3000, showings))
    for m in (1, 3):
        assert np.max(np.abs(nc.noise_ceiling(sn.ncsnr, m).r - _true_r(s2, n2, m))) <= 0.05
    for est, true in ((sn.signal_var, s2), (sn.noise_var, n2)):
        ratio = est / true
        assert abs(ratio.mean() - 1) <= 4 * ratio.std() / np.sqrt(v)


def test_anova_identities():
    rng = np.random.default_rng(2)
    # Equal showings: the noise variance is NSD's mean of per-image variances (ddof 1).
    y = _simulate(rng, np.full(3, 0.7), np.full(3, 1.3), 30, 4)
    sn = nc.signal_noise(y)
    np.testing.assert_allclose(sn.noise_var, y.var(axis=0, ddof=1).mean(axis=0), rtol=1e-12)
    # Unequal showings: the F of scipy's one-way ANOVA gives s2 = MSW (F - 1) / k0.
    showings = rng.integers(2, 7, 25)
    y = _simulate(rng, np.full(4, 0.5), np.full(4, 1.0), 25, showings)
    sn = nc.signal_noise(y)
    n_obs = showings.sum()
    k0 = (n_obs - (showings**2).sum() / n_obs) / (25 - 1)
    for j in range(4):
        groups = [y[:k, i, j] for i, k in enumerate(showings)]
        f = sps.f_oneway(*groups).statistic
        msw = sum(((g - g.mean()) ** 2).sum() for g in groups) / (n_obs - 25)
        assert sn.noise_var[j] == pytest.approx(msw, rel=1e-10)
        assert sn.signal_var[j] == pytest.approx(max(msw * (f - 1) / k0, 0.0), rel=1e-9)


@pytest.mark.parametrize("m", [1, 4, "mixed"])
def test_ceiling_is_the_sample_r_of_a_perfect_model(m):
    # A model predicting the signal exactly, scored on test responses that average m
    # showings, reaches the ceiling computed from the true ncsnr.
    rng = np.random.default_rng(3)
    n_test, v = 20000, 40
    s2, n2 = rng.uniform(0.1, 2.0, v), rng.uniform(0.2, 2.0, v)
    m_i = rng.choice([1, 4], n_test, p=[0.9, 0.1]) if m == "mixed" else np.full(n_test, m)
    signal = rng.normal(0.0, np.sqrt(s2), (n_test, v))
    response = 2.0 + signal + rng.normal(0.0, 1.0, (n_test, v)) * np.sqrt(n2 / m_i[:, None])
    sample_r = np.array([np.corrcoef(signal[:, j], response[:, j])[0, 1] for j in range(v)])
    ceiling = nc.noise_ceiling(np.sqrt(s2 / n2), m_i if m == "mixed" else m)
    np.testing.assert_allclose(ceiling.r2, ceiling.r**2)
    # Sampling error of r at n = 20000 is <= 1/sqrt(n) ~ 0.007.
    assert np.max(np.abs(sample_r - ceiling.r)) <= 0.03
    assert abs(np.mean(sample_r - ceiling.r)) <= 0.005


def test_degenerate_voxels():
    rng = np.random.default_rng(4)
    y = _simulate(rng, np.ones(5), np.ones(5), 20, 3)
    y[:, :, 0] = 7.0                            # constant: no signal, no noise -> NaN
    y[:, :, 1] = rng.integers(-5, 6, 20)         # identical showings: noise-free -> ceiling 1
    y[1:, :, 2] = np.nan                         # one showing of each image: no noise estimate
    y[:, 1:, 3] = np.nan                         # a single image: no signal estimate
    y[:, :, 4] = rng.normal(size=(3, 20))        # pure noise: signal clipped at 0 -> ceiling 0
    y[:, :, 4] -= y[:, :, 4].mean(axis=0) - y[:, :, 4].mean()  # image means exactly equal
    sn = nc.signal_noise(y)
    ceil = nc.noise_ceiling(sn.ncsnr, 1)
    assert np.isnan(ceil.r[[0, 2, 3]]).all()
    assert ceil.r[1] == 1.0 and np.isinf(sn.ncsnr[1])
    assert ceil.r[4] == 0.0 and sn.signal_var[4] == 0.0


def test_input_errors():
    with pytest.raises(ValueError, match="showings, images, voxels"):
        nc.signal_noise(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="at least 2 showings"):
        nc.signal_noise(np.zeros((1, 4, 2)))
    for bad in (0.5, [[1, 2]], [], np.nan):
        with pytest.raises(ValueError, match="n_trials_averaged"):
            nc.noise_ceiling(np.ones(3), bad)


def test_stack_repeats_groups_showings_by_image():
    trials = np.arange(14, dtype=float)[:, None] * np.array([1.0, -1.0])
    ids = np.array(["b", "a", "c", "b", "d", "a", "b", "e", "a", "f", "b", "c", "g", "h"])
    repeats, kept = nc.stack_repeats(trials, ids)
    np.testing.assert_array_equal(kept, ["a", "b", "c"])
    assert repeats.shape == (4, 3, 2)
    np.testing.assert_array_equal(repeats[:, 0, 0], [1, 5, 8, np.nan])   # a: trials 1, 5, 8
    np.testing.assert_array_equal(repeats[:, 1, 0], [0, 3, 6, 10])       # b, in trial order
    np.testing.assert_array_equal(repeats[:, 2, 1], [-2, -11, np.nan, np.nan])
    everything, all_ids = nc.stack_repeats(trials, ids, min_showings=1)
    assert all_ids.size == 8 and np.isfinite(everything).sum() == trials.size
    none, none_ids = nc.stack_repeats(trials[:3], ids[:3])
    assert none.shape == (0, 0, 2) and none_ids.size == 0
    with pytest.raises(ValueError, match="one id per trial"):
        nc.stack_repeats(trials, ids[:-1])
    with pytest.raises(ValueError, match=r"\(n_trials, voxels\)"):
        nc.stack_repeats(trials[:, 0], ids)


def test_stack_repeats_feeds_signal_noise():
    rng = np.random.default_rng(5)
    y = _simulate(rng, np.full(3, 1.0), np.full(3, 0.5), 12, 3)
    ids = np.tile(np.arange(12), 3)
    trials = y.reshape(36, 3)  # showing-major: trial t is image t % 12
    repeats, kept = nc.stack_repeats(trials, ids)
    np.testing.assert_array_equal(kept, np.arange(12))
    np.testing.assert_array_equal(repeats, y)


def test_noise_normalized():
    r = np.array([0.2, 0.3, -0.1, 0.4, np.nan, 0.5])
    c = np.array([0.4, 0.0, 0.5, np.nan, 0.5, 0.25])
    out = nc.noise_normalized(r, c)
    np.testing.assert_allclose(out, [0.5, np.nan, -0.2, np.nan, np.nan, 2.0])
    with pytest.raises(ValueError, match="one shape"):
        nc.noise_normalized(r, c[:2])
