"""ROI summaries of a variance partition (``partition/<analysis>/<subject>``, see
:mod:`neurotask.pipeline.stats.partition`): what the report draws and ``analysis/partition_<name>``
stores.

Pure array code. Per subject and ROI:

* ``region_mean`` (region, roi): the mean over the ROI's voxels of each Venn region's **raw**
  R² estimate (negative voxels kept: a floor at zero would bias the mean upwards, see
  :mod:`.partition`), with a 95% percentile interval from a bootstrap over the ROI's voxels
  (``region_ci``);
* ``fraction_unique_significant`` (group, roi): the fraction of the ROI's voxels whose unique
  variance of the group is significant (the partition's BH-FDR mask);
* ``region_mean_normalized`` (region, roi): the noise-ceiling-normalised region, as a ratio
  of means over the ROI's voxels whose R² noise ceiling exceeds ``CEILING_FLOOR``:
  ``mean(region R²) / mean(noise_ceiling_r2)`` over those voxels, the fraction of the ROI's
  explainable variance that the region explains. A ratio of means rather than a mean of
  per-voxel ratios because a voxel's ratio is unbounded where its ceiling is small and the
  region estimate noisy; the floor leaves out voxels with next to no repeatable signal.
  With its bootstrap interval too (the same resampled voxels for numerator and denominator).

and over subjects the mean of the subjects' ROI values (``*_mean``) with its SEM
(``*_sem``). The Figure-3 contrast (:func:`roi_contrast`) counts, among the voxels significant
for either of two separately fitted feature spaces, those better predicted by the first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

# R² noise ceiling below which a voxel is left out of the normalised summaries (R² units; a
# correlation ceiling of about 0.22)
CEILING_FLOOR = 0.05
CI = 0.95


def roi_index(labels: np.ndarray, rois: Sequence[str]) -> np.ndarray:
    """(v,) int: each voxel's index into ``rois``, -1 for a voxel in none. labels (v,) str."""
    lookup = {r: i for i, r in enumerate(rois)}
    return np.array([lookup.get(str(x), -1) for x in labels], dtype=np.int64)


def bootstrap_indices(n: int, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """(n_bootstrap, n) int: voxel indices drawn with replacement."""
    return rng.integers(0, n, size=(n_bootstrap, n))


def roi_region_means(region: np.ndarray, index: np.ndarray, n_rois: int, *, n_bootstrap: int = 1000,
                     seed: int = 0, ci: float = CI) -> dict[str, np.ndarray]:
    """Mean of each region over each ROI's voxels and its bootstrap-over-voxels interval.

    region (R, v) raw region R²; index (v,) int ROI of each voxel (-1 none). Non-finite
    values are left out voxel by voxel. -> ``mean`` (R, n_rois), ``ci`` (R, n_rois, 2)
    percentile interval at level ``ci``, ``n_voxels`` (n_rois,) voxels with finite values
    in every region. NaN for an ROI without voxels.
    """
    region = np.asarray(region, dtype=np.float64)
    rng = np.random.default_rng(seed)
    mean = np.full((region.shape[0], n_rois), np.nan)
    bounds = np.full((region.shape[0], n_rois, 2), np.nan)
    counts = np.zeros(n_rois, dtype=np.int64)
    q = [100 * (1 - ci) / 2, 100 * (1 + ci) / 2]
    for k in range(n_rois):
        vals = region[:, (index == k) & np.isfinite(region).all(axis=0)]
        counts[k] = vals.shape[1]
        if not counts[k]:
            continue
        mean[:, k] = vals.mean(axis=1)
        boot = vals[:, bootstrap_indices(counts[k], n_bootstrap, rng)].mean(axis=2)  # (R, B)
        bounds[:, k] = np.percentile(boot, q, axis=1).T
    return {"mean": mean, "ci": bounds, "n_voxels": counts}


def roi_normalized_means(region: np.ndarray, ceiling_r2: np.ndarray, index: np.ndarray, n_rois: int, *,
                         floor: float = CEILING_FLOOR, n_bootstrap: int = 1000, seed: int = 0,
                         ci: float = CI) -> dict[str, np.ndarray]:
    """Regions as a fraction of the ROI's explainable variance: ``mean(region) / mean(ceiling)``
    over the ROI's voxels with ``ceiling_r2 > floor`` (and finite regions).

    region (R, v); ceiling_r2 (v,). -> ``mean`` (R, n_rois), ``ci`` (R, n_rois, 2) bootstrap
    over those voxels (ratio of resampled means), ``n_voxels`` (n_rois,) voxels kept.
    """
    region = np.asarray(region, dtype=np.float64)
    ceiling = np.asarray(ceiling_r2, dtype=np.float64)
    rng = np.random.default_rng(seed)
    mean = np.full((region.shape[0], n_rois), np.nan)
    bounds = np.full((region.shape[0], n_rois, 2), np.nan)
    counts = np.zeros(n_rois, dtype=np.int64)
    q = [100 * (1 - ci) / 2, 100 * (1 + ci) / 2]
    keep = np.isfinite(region).all(axis=0) & np.isfinite(ceiling) & (ceiling > floor)
    for k in range(n_rois):
        sel = (index == k) & keep
        counts[k] = int(sel.sum())
        if not counts[k]:
            continue
        vals, c = region[:, sel], ceiling[sel]
        mean[:, k] = vals.mean(axis=1) / c.mean()
        draw = bootstrap_indices(counts[k], n_bootstrap, rng)
        boot = vals[:, draw].mean(axis=2) / c[draw].mean(axis=1)[None, :]
        bounds[:, k] = np.percentile(boot, q, axis=1).T
    return {"mean": mean, "ci": bounds, "n_voxels": counts}


def roi_fraction(mask: np.ndarray, index: np.ndarray, n_rois: int) -> np.ndarray:
    """mask (G, v) bool -> (G, n_rois) fraction of each ROI's voxels where it holds (NaN: no voxel)."""
    mask = np.asarray(mask, dtype=bool)
    n = np.bincount(index[index >= 0], minlength=n_rois)[:n_rois]
    out = np.full((mask.shape[0], n_rois), np.nan)
    for g in range(mask.shape[0]):
        hits = np.bincount(index[index >= 0], weights=mask[g][index >= 0].astype(np.float64),
                           minlength=n_rois)[:n_rois]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[g] = np.where(n > 0, hits / n, np.nan)
    return out


def roi_contrast(r_a: np.ndarray, r_b: np.ndarray, considered: np.ndarray, index: np.ndarray,
                 n_rois: int) -> dict[str, np.ndarray]:
    """Figure 3 per ROI: among the ``considered`` voxels (significant for either space), the
    count where space a's test r exceeds b's and the mean r_a - r_b.

    (v,) each -> ``n_wins``, ``n_voxels`` (n_rois,) int, ``fraction_wins``, ``mean_difference``
    (n_rois,) (NaN where no voxel is considered).
    """
    diff = np.asarray(r_a, dtype=np.float64) - np.asarray(r_b, dtype=np.float64)
    keep = np.asarray(considered, dtype=bool) & np.isfinite(diff) & (index >= 0)
    g, d = index[keep], diff[keep]
    n = np.bincount(g, minlength=n_rois)[:n_rois]
    wins = np.bincount(g, weights=(d > 0).astype(np.float64), minlength=n_rois)[:n_rois]
    total = np.bincount(g, weights=d, minlength=n_rois)[:n_rois]
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"n_wins": wins.astype(np.int64), "n_voxels": n.astype(np.int64),
                "fraction_wins": np.where(n > 0, wins / n, np.nan),
                "mean_difference": np.where(n > 0, total / n, np.nan)}


def _labels(values) -> list[str]:
    return [str(x) for x in np.asarray(values).tolist()]


def subject_summary(partition: xr.Dataset, rois: Sequence[str], ceiling_r2: np.ndarray | None = None, *,
                    n_bootstrap: int = 1000, seed: int = 0, floor: float = CEILING_FLOOR) -> xr.Dataset:
    """One subject's ROI summary of its partition Dataset (region, group, voxel; the stored
    format). ``ceiling_r2`` (v,): the results' ``noise_ceiling_r2`` on the partition's voxels,
    or None (no normalised variables). -> Dataset (region, group, roi, bound)."""
    regions, groups = _labels(partition["region"].values), _labels(partition["group"].values)
    index = roi_index(_labels(partition["roi"].values), rois)
    region = partition["region_r2"].transpose("region", "voxel").values
    raw = roi_region_means(region, index, len(rois), n_bootstrap=n_bootstrap, seed=seed)
    sig = partition["unique_significant"].transpose("group", "voxel").values
    out = xr.Dataset(coords={"region": regions, "group": groups, "roi": list(rois), "bound": ["low", "high"]})
    out["region_mean"] = (("region", "roi"), raw["mean"],
                          {"units": "R²", "long_name": "mean over the ROI's voxels of the region's raw R²"})
    out["region_ci"] = (("region", "roi", "bound"), raw["ci"],
                        {"units": "R²", "long_name": f"{CI:.0%} bootstrap-over-voxels interval of region_mean"})
    out["n_voxels"] = (("roi",), raw["n_voxels"], {"units": "voxels", "long_name": "voxels of the ROI"})
    out["fraction_unique_significant"] = (("group", "roi"), roi_fraction(sig, index, len(rois)),
                                          {"units": "1", "long_name": "fraction of the ROI's voxels with "
                                           "significant unique variance of the group (BH-FDR)"})
    if ceiling_r2 is not None and np.isfinite(ceiling_r2).any():
        norm = roi_normalized_means(region, ceiling_r2, index, len(rois), floor=floor, n_bootstrap=n_bootstrap,
                                    seed=seed + 1)
        out["region_mean_normalized"] = (("region", "roi"), norm["mean"],
                                         {"units": "1", "long_name": "mean region R² / mean R² noise ceiling over "
                                          f"the ROI's voxels with a ceiling > {floor:g}"})
        out["region_ci_normalized"] = (("region", "roi", "bound"), norm["ci"],
                                       {"units": "1", "long_name": f"{CI:.0%} bootstrap interval of "
                                        "region_mean_normalized"})
        out["n_voxels_normalized"] = (("roi",), norm["n_voxels"],
                                      {"units": "voxels", "long_name": f"voxels of the ROI with a ceiling > {floor:g}"})
    return out


def study_summary(per_subject: Mapping[str, xr.Dataset]) -> xr.Dataset:
    """The subjects' summaries (:func:`subject_summary`, same regions, groups and ROIs) stacked
    on ``subject``, with ``<name>_mean`` and ``<name>_sem`` (SEM over subjects; NaN for one) of
    each ROI value. A variable missing for a subject (no noise ceiling) is NaN there."""
    names = ["region_mean", "region_mean_normalized", "fraction_unique_significant"]
    out = xr.concat(list(per_subject.values()), dim="subject", join="outer", data_vars="all", coords="minimal",
                    compat="override")
    out = out.assign_coords(subject=list(per_subject))
    n = out.sizes["subject"]
    for name in names:
        if name not in out:
            continue
        out[f"{name}_mean"] = out[name].mean("subject", skipna=True)
        count = out[name].notnull().sum("subject")
        out[f"{name}_sem"] = (out[name].std("subject", ddof=1, skipna=True) / np.sqrt(count)) if n > 1 \
            else xr.full_like(out[f"{name}_mean"], np.nan)
        out[f"{name}_mean"].attrs = {**out[name].attrs, "long_name": f"subject mean of {name}"}
        out[f"{name}_sem"].attrs = {**out[name].attrs, "long_name": f"SEM over subjects of {name}"}
    return out
