"""Per-voxel noise ceiling of the test-set correlation, from images shown more than once.
Pure array code: no I/O, no Dask.

Estimator: the noise-ceiling signal-to-noise ratio (NCSNR) of the Natural Scenes Dataset
(Allen et al. 2022, Nat. Neurosci. 25:116-126), with its two variances estimated by the
one-way random-effects ANOVA (method of moments), which stays unbiased when images were
shown different numbers of times.

Model and assumptions, per voxel: the response to showing k of image i is
``b_ik = mu + s_i + e_ik`` with signal s_i (variance s2 across images) and noise e_ik
(variance n2), e independent of s, of other showings and of the image (homoscedastic; no
repetition suppression or drift across showings), and the repeated images representative of
the test images (the same s2). Then, for a test response that is the mean of m showings, the
best possible prediction (s_i itself) reaches

    NC = ncsnr^2 / (ncsnr^2 + 1/m),   ncsnr^2 = s2 / n2

as the fraction of variance explained (the R2 ceiling; NSD reports 100 * NC in %), and
sqrt(NC) as the correlation ceiling. These are population values: a finite test set's sample
r scatters around them, so noise-normalised r can exceed 1.

Which m: with the repeat policy "exclude" every test response is one showing (m = 1); with
"average", an image's response is the mean of its showings. For a test set mixing images
averaged over different numbers of showings m_i, the noise variance of the test responses is
n2 * mean(1 / m_i), so ``noise_ceiling`` takes either one m or the m_i of every test image.

Input convention: repeats as an array (k, g, v): showing, repeated image, voxel; NaN where an
image was shown fewer than k times (``stack_repeats`` builds it from (n_trials, v) responses
and the trials' image ids).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SignalNoise:
    """Per-voxel variance components, each (v,) float64.

    signal_var: s2 (clipped at 0); noise_var: n2; ncsnr: sqrt(s2 / n2) (inf where n2 = 0 < s2,
    NaN where both are 0 or the voxel has no usable repeats).
    """

    signal_var: np.ndarray
    noise_var: np.ndarray
    ncsnr: np.ndarray


@dataclass(frozen=True)
class NoiseCeiling:
    """Ceiling of a model's test performance, each (v,) float64 in [0, 1] or NaN.

    r2: fraction of variance explainable (NC / 100 in NSD's notation); r: sqrt(r2), the
    correlation ceiling.
    """

    r2: np.ndarray
    r: np.ndarray


def signal_noise(repeats: np.ndarray) -> SignalNoise:
    """Signal and noise variance and NCSNR per voxel from repeated showings.

    repeats (k, g, v): response to showing k of repeated image g in voxel v; NaN for showings
    that did not happen (any non-finite value counts as missing, e.g. a voxel lost in one
    session).
    One-way random-effects ANOVA per voxel over the images with >= 1 finite showing:
    n2 = MSW, s2 = max(0, (MSB - MSW) / k0) with k0 = (N - sum k_i^2 / N) / (g - 1). With equal
    showings, n2 is the mean over images of the showings' variance (ddof 1), NSD's sigma_noise^2.
    A voxel needs >= 2 images and at least one image shown twice, else its values are NaN.
    """
    y = np.asarray(repeats, dtype=np.float64)
    if y.ndim != 3:
        raise ValueError(f"repeats must be a (showings, images, voxels) array, got shape {y.shape}")
    if y.shape[0] < 2:
        raise ValueError(f"repeats needs at least 2 showings (axis 0), got {y.shape[0]}")
    finite = np.isfinite(y)
    k = finite.sum(axis=0).astype(np.float64)  # (g, v) showings per image and voxel
    y0 = np.where(finite, y, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        image_mean = y0.sum(axis=0) / k  # (g, v); NaN where k = 0
        ssw = (np.where(finite, y - image_mean, 0.0) ** 2).sum(axis=0).sum(axis=0)  # (v,)
        n_obs = k.sum(axis=0)  # N
        g = (k > 0).sum(axis=0).astype(np.float64)
        grand = y0.sum(axis=(0, 1)) / n_obs
        ssb = np.where(k > 0, k * (np.nan_to_num(image_mean) - grand) ** 2, 0.0).sum(axis=0)
        df_w, df_b = n_obs - g, g - 1.0
        msw, msb = ssw / df_w, ssb / df_b
        k0 = (n_obs - (k**2).sum(axis=0) / n_obs) / df_b
        signal = np.maximum((msb - msw) / k0, 0.0)
    usable = (df_w > 0) & (df_b > 0)  # >= 2 images, >= 1 of them shown twice
    noise = np.where(usable, msw, np.nan)
    signal = np.where(usable, signal, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        ncsnr = np.sqrt(signal / noise)  # s2 > 0 = n2 -> inf; 0 / 0 -> NaN
    return SignalNoise(signal_var=signal, noise_var=noise, ncsnr=ncsnr)


def noise_ceiling(ncsnr: np.ndarray, n_trials_averaged: float | np.ndarray = 1) -> NoiseCeiling:
    """Correlation and R2 ceiling of predicting responses that average m showings.

    ncsnr (v,) from ``signal_noise``. n_trials_averaged: one m for every test image, or an
    array (n_test,) of the m_i of each test image (the ceiling then uses mean(1 / m_i)).
    NC = ncsnr^2 / (ncsnr^2 + mean(1/m)); r = sqrt(NC). NaN ncsnr -> NaN; inf -> 1.
    """
    m = np.asarray(n_trials_averaged, dtype=np.float64)
    if m.ndim > 1 or m.size == 0 or not np.all(np.isfinite(m)) or np.any(m < 1):
        raise ValueError(f"n_trials_averaged must be a number >= 1 or a 1-D array of them, "
                         f"got {n_trials_averaged!r}")
    inv_m = float(np.mean(1.0 / m))
    snr2 = np.asarray(ncsnr, dtype=np.float64) ** 2
    with np.errstate(invalid="ignore"):
        r2 = np.where(np.isinf(snr2), 1.0, snr2 / (snr2 + inv_m))
    return NoiseCeiling(r2=r2, r=np.sqrt(r2))


def noise_normalized(r: np.ndarray, ceiling_r: np.ndarray) -> np.ndarray:
    """Test r as a fraction of its correlation ceiling. (v,), (v,) -> (v,).

    NaN where the ceiling is 0, negative or NaN (no reliable signal: nothing to normalise by)
    or r is NaN. Not clipped: sample r can exceed an estimated ceiling.
    """
    r = np.asarray(r, dtype=np.float64)
    c = np.asarray(ceiling_r, dtype=np.float64)
    if r.shape != c.shape:
        raise ValueError(f"r and ceiling_r must have one shape, got {r.shape} and {c.shape}")
    ok = np.isfinite(c) & (c > 0)
    out = np.full(r.shape, np.nan)
    np.divide(r, c, out=out, where=ok)
    return out


def stack_repeats(trials: np.ndarray, image_ids: np.ndarray,
                  min_showings: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Arrange single-trial responses by image and showing.

    trials (n_trials, v), image_ids (n_trials,) -> (repeats (k, g, v) float64 with NaN
    padding, ids (g,)): the g images shown at least ``min_showings`` times, in sorted id
    order, their showings in trial order; k is the most showings of any of them.
    """
    t = np.asarray(trials)
    ids = np.asarray(image_ids)
    if t.ndim != 2:
        raise ValueError(f"trials must be an (n_trials, voxels) array, got shape {t.shape}")
    if ids.shape != (t.shape[0],):
        raise ValueError(f"image_ids must have one id per trial ({t.shape[0]}), "
                         f"got shape {ids.shape}")
    if min_showings < 1:
        raise ValueError(f"min_showings must be >= 1, got {min_showings}")
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    keep = counts >= min_showings
    if not keep.any():
        return np.empty((0, 0, t.shape[1])), uniq[:0]
    new_index = np.cumsum(keep) - 1  # image index among the kept
    order = np.argsort(inverse, kind="stable")  # trials grouped by image, in trial order
    sorted_img = inverse[order]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    showing = np.arange(order.size) - starts[sorted_img]
    sel = keep[sorted_img]
    out = np.full((int(counts[keep].max()), int(keep.sum()), t.shape[1]), np.nan)
    out[showing[sel], new_index[sorted_img[sel]]] = t[order[sel]]
    return out, uniq[keep]
