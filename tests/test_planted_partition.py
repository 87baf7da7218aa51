"""The variance partition recovers the unique and shared variance that the simulation plants.

A small simulated study (the generative model of pipeline.stages.simulate, without its files):
three groups of Taskonomy tasks (3D, 2D, semantic), every union fitted with the engine as the
fit stage does (features z-scored on the training rows, ridge.prepare + ridge.ridge_cv, the
splits of fit.splits_for), the Venn regions by inclusion-exclusion, and the estimates compared
with the planted truth per voxel.
"""

from __future__ import annotations

import numpy as np
import pytest

from neurotask.pipeline import ridge
from neurotask.pipeline.ridge import design
from neurotask.pipeline.config import FitSection, SimulateSection
from neurotask.pipeline.stages import fit, simulate
from neurotask.pipeline.stats import partition

GROUPS = {"3D": ["keypoint3d", "edge3d"], "2D": ["keypoint2d", "edge2d"], "semantic": ["class_1000", "class_places"]}
pytestmark = pytest.mark.slow  # ~10 s: 7 ridge fits of 700 images

ROIS = {"LHPPA": 90, "LHEarlyVis": 90, "LHLOC": 90, "LHOPA": 60}


@pytest.fixture(scope="module")
def planted():
    sim = SimulateSection(seed=3, n_images=700, n_features=32, signal_variance=[0.6, 2.0])
    rng = np.random.default_rng(sim.seed)
    latents = simulate.latent_factors(sim.n_images, sim, rng)
    features = simulate.task_features(latents, sim.n_features, rng)
    roi_of_voxel = [roi for roi, n in ROIS.items() for _ in range(n)]
    population, s2, signal, components = simulate.voxel_signals(latents, roi_of_voxel, sim, rng)
    truth = simulate.planted_truth(population, components)
    Y = signal + rng.standard_normal(signal.shape)  # one unit-variance noisy trial per image

    spec = FitSection(test_fraction=0.2, n_folds=4, alphas=list(np.logspace(-1, 5, 13)), dtype="float64")
    splits = fit.splits_for(spec, [f"image{i}" for i in range(sim.n_images)])
    r2 = {}
    for members in partition.subsets(list(GROUPS)):
        X = np.hstack([features[t] for g in members for t in GROUPS[g]]).astype(np.float64)
        X = design.standardize(X, splits.train)
        dec = ridge.prepare(X, splits, dtype=np.dtype("float64"))
        r2[members] = fit.fit_voxels(spec, dec, Y, np.asarray(spec.alphas))["r2"].astype(np.float64)
    regions = partition.regions(r2, list(GROUPS))
    return truth, s2, regions


def planted_regions(truth: dict, s2: np.ndarray) -> dict[tuple[str, ...], np.ndarray]:
    """The planted R² of each Venn region of GROUPS: a group's unique variance is its cluster's
    block plus its tasks' private blocks; a pair block is shared by exactly its two groups; the
    all-task block by all three; R² = variance / (s2 + noise variance 1)."""
    clusters = list(truth["truth_clusters"])
    tasks = list(truth["truth_tasks"])
    out = {}
    for g, spaces in GROUPS.items():
        own = truth["unique_variance"][:, clusters.index(g)]
        own = own + truth["private_variance"][:, [tasks.index(t) for t in spaces]].sum(1)
        out[(g,)] = own
    for k, name in enumerate(truth["truth_pairs"]):
        out[tuple(name.split("+"))] = truth["shared_variance"][:, k]
    out[tuple(GROUPS)] = truth["all_task_variance"]
    keys = partition.subsets(list(GROUPS))
    return {k: out.get(k, np.zeros_like(s2)) / (s2 + 1.0) for k in keys}


def test_truth_is_consistent(planted):
    truth, s2, _ = planted
    total = (truth["unique_variance"].sum(1) + truth["shared_variance"].sum(1) + truth["all_task_variance"]
             + truth["private_variance"].sum(1))
    np.testing.assert_allclose(total, s2, rtol=1e-9, atol=1e-12)
    # every ROI holds both unique and pair-shared populations
    assert {"3D", "3D+2D", "2D", "semantic", "3D+semantic"} <= set(truth["population"])


def test_unique_and_shared_variance_are_recovered(planted):
    truth, s2, est = planted
    true = planted_regions(truth, s2)
    corr = {}
    for key in [(g,) for g in GROUPS] + [("3D", "2D")]:
        corr["+".join(key)] = np.corrcoef(est[key], true[key])[0, 1]
    print("estimated vs planted region R², Pearson r per voxel:", {k: round(v, 3) for k, v in corr.items()})
    assert all(corr[g] > 0.7 for g in GROUPS), corr  # unique variance
    assert corr["3D+2D"] > 0.3, corr  # shared variance: a difference of three noisy R², noisier
    # the full model's R² follows the variance the three groups can explain (ridge on noisy
    # features explains less than planted: compare across voxels, not in level)
    full, explainable = sum(est.values()), sum(true.values())
    print(f"full-model R² vs planted explainable R²: r = {np.corrcoef(full, explainable)[0, 1]:.3f}")
    assert np.corrcoef(full, explainable)[0, 1] > 0.7


def test_dominant_region_is_recovered(planted):
    truth, s2, est = planted
    true = planted_regions(truth, s2)
    keys, index = partition.dominant_region(est)
    true_keys, true_index = partition.dominant_region(true)
    assert keys == true_keys
    # voxels whose largest planted component is one of the partition's regions (not a cluster
    # outside the analysis or the private blocks of its other tasks)
    names = {"+".join(k) for k in keys}
    ok = np.isin(truth["planted_region"], list(names - {"+".join(GROUPS)}))
    accuracy = float(np.mean(index[ok] == true_index[ok]))
    print(f"dominant region accuracy on {ok.sum()} driven voxels: {accuracy:.3f}")
    assert ok.sum() > 200 and accuracy > 0.6
