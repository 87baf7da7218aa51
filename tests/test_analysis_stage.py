"""The analysis stage on a fitted study: stored as xarray under analysis/, never refits,
reruns identical, refuses unfinished fits, and recovers the simulation's planted clusters."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr

from neurotask.pipeline import cli
from neurotask.pipeline.stats import similarity as S
from neurotask.pipeline.stats.task_structure import analyse
from neurotask.pipeline.stages.analyse import ANALYSIS_GROUP, AnalysisStageError, read_analysis, run_analysis
from neurotask.pipeline.config import load_config
from neurotask.pipeline.tasks import task_names
from neurotask.storage import StudyStore
from analysis_fixtures import analysis_config_dict, analysis_study, snapshot, write_config  # noqa: F401

pytestmark = pytest.mark.slow  # every test uses analysis_study, one whole `neurotask run`


@pytest.fixture()
def study_copy(analysis_study, tmp_path):
    """A private copy of the shared study, for tests that change its store or markers."""
    work = tmp_path / "work"
    shutil.copytree(analysis_study.workdir, work)
    return write_config(tmp_path / "study.yaml", analysis_config_dict(work))


def test_analysis_is_stored_as_labelled_xarray(analysis_study):
    cfg = load_config(analysis_study.config)
    store = StudyStore(cfg.store_path)
    assert store.has(ANALYSIS_GROUP)
    a = read_analysis(cfg)
    assert list(a["subject"].values) == ["CSI1", "CSI2"]
    assert list(a["task"].values) == task_names() == list(a["task2"].values)
    assert a["similarity"].dims == ("subject", "task", "task2")
    assert a["roi_mean_r"].dims == ("subject", "task", "roi")
    assert sorted(str(r) for r in a["roi"].values) == sorted(f"{h}{r}" for h in ("LH", "RH")
                                                             for r in ("EarlyVis", "LOC", "OPA", "PPA", "RSC"))
    assert a.attrs["n_clusters"] == 5 and a.attrs["significance"] == "parametric"
    assert len(a.attrs["input_fingerprint"]) == 64
    # the stored numbers are exactly those of the pure analysis of the stored results
    results = {s: store.results(s) for s in cfg.study.subjects}
    direct = analyse(results, significance="parametric", fdr=0.05, metric="cosine", linkage="average",
                     n_clusters=5, n_permutations=200, n_bootstrap=50, seed=0)
    for name in ("similarity", "similarity_ci", "linkage_mean", "cluster", "spearman_taskonomy", "mantel_p",
                 "n_significant", "roi_mean_r", "contrast_n_3d_wins"):
        np.testing.assert_array_equal(a[name].values, direct[name].transpose(*a[name].dims).values, err_msg=name)


def test_rerun_never_refits_and_is_identical(study_copy, logs):
    cfg = load_config(study_copy)
    fit_before = snapshot(cfg.workdir / "progress" / "fit")
    results_before = snapshot(cfg.store_path / "results")
    first = read_analysis(cfg)
    # forced recomputation: same numbers, fit markers and results untouched
    assert cli.main(["analyse", "--config", str(study_copy), "--overwrite"]) == 0
    again = read_analysis(cfg)
    xr.testing.assert_identical(first.drop_attrs(), again.drop_attrs())
    assert again.attrs["input_fingerprint"] == first.attrs["input_fingerprint"]
    assert snapshot(cfg.workdir / "progress" / "fit") == fit_before
    assert snapshot(cfg.store_path / "results") == results_before
    # without --overwrite the stored analysis is found and not rewritten
    stored = snapshot(cfg.store_path / "analysis")
    logs.clear()
    run_analysis(cfg)
    assert any("skipped" in line for line in logs)
    assert snapshot(cfg.store_path / "analysis") == stored


def test_changed_settings_recompute(study_copy):
    cfg = load_config(study_copy, overrides={"analysis": {"linkage": "ward", "n_clusters": 4}})
    before = read_analysis(cfg)
    out = run_analysis(cfg)
    assert out.attrs["linkage"] == "ward" and out.attrs["n_clusters"] == 4
    assert out.attrs["input_fingerprint"] != before.attrs["input_fingerprint"]
    np.testing.assert_array_equal(out["similarity"].values, before["similarity"].values)  # same inputs
    assert read_analysis(cfg).attrs["linkage"] == "ward"


def test_analysis_refuses_an_unfinished_fit(study_copy):
    cfg = load_config(study_copy)
    marker = cfg.workdir / "progress" / "fit" / "CSI2" / "edge3d" / "00001.json"
    assert marker.is_file()
    marker.unlink()
    with pytest.raises(AnalysisStageError, match=r"(?s)not finished.*neurotask fit.*CSI2/edge3d: 1/2 chunks fitted"):
        run_analysis(cfg, overwrite=True)
    assert cli.main(["analyse", "--config", str(study_copy)]) == 2


def test_analysis_names_missing_subjects_and_stores(study_copy, tmp_path):
    cfg = load_config(study_copy, overrides={"study": {"subjects": ["CSI1", "CSI3"]}})
    with pytest.raises(AnalysisStageError, match="no results for subject.*CSI3"):
        run_analysis(cfg)
    empty = load_config(write_config(tmp_path / "empty.yaml", analysis_config_dict(tmp_path / "nothing")))
    with pytest.raises(AnalysisStageError, match="no study store"):
        run_analysis(empty)
    with pytest.raises(AnalysisStageError, match="run `neurotask analyse` first"):
        read_analysis(empty)


def test_the_recovered_tree_finds_the_planted_taskonomy_clusters(analysis_study):
    """The simulation drives voxels by one of five latent blocks, one per Taskonomy cluster
    (3D, 2D, low-dim., semantic, Denoising), and every task's features carry its cluster's
    block: tasks of one cluster predict the same voxels. Cut into five groups, the brain
    tree should give back exactly those clusters. On the 3-subject demo (1000 images) every
    linkage gives ARI 1.0 at k = 5, in every subject; this study is smaller (400 images, 60
    test images), so we allow a little noise: moving any one task to another cluster gives
    ARI 0.83-0.96, so ARI >= 0.8 tolerates about one misplaced task and no more (it measures
    1.000 here)."""
    a = read_analysis(load_config(analysis_study.config))
    assert float(a["ari_taskonomy_mean"]) >= 0.8
    assert (a["ari_taskonomy"].values >= 0.8).all()
    truth = [str(c) for c in a["taskonomy_cluster"].values]
    assert S.adjusted_rand_index(a["cluster_mean"].values, truth) == pytest.approx(float(a["ari_taskonomy_mean"]))
    # every task predicts some voxels, and the brain's similarity follows Taskonomy's
    assert (a["n_significant"].values > 0).all()
    assert float(a["spearman_taskonomy_mean"]) > 0 and float(a["mantel_p_mean"]) < 0.05


def test_permutation_significance_uses_the_stored_permutation_p_values(study_copy, logs):
    from statsmodels.stats.multitest import multipletests

    cfg = load_config(study_copy, overrides={"analysis": {"significance": "permutation"}})
    logs.clear()
    out = run_analysis(cfg)
    assert out.attrs["significance"] == "permutation"
    res = StudyStore(cfg.store_path).results("CSI1")
    p = res["pvalue_perm"].sel(task=list(out["task"].values)).values
    expected = np.array([multipletests(row, alpha=0.05, method="fdr_bh")[0].sum() for row in p])
    np.testing.assert_array_equal(out["n_significant"].sel(subject="CSI1").values, expected)
    # B permutations: no p below 1/(B + 1), so BH at q over m voxels needs >= m / (q (B + 1))
    # voxels at that floor (1000 and 1479 voxels: 30); tasks with fewer driven voxels (the small
    # clusters') get none, and the log says why
    m, b = res.sizes["voxel"], cfg.fit.n_permutations
    needed = int(np.ceil(m / (cfg.analysis.fdr * (b + 1)) - 1e-9))
    empty = [str(t) for t, n in zip(out["task"].values, expected) if n == 0]
    assert empty and len(empty) < len(expected)
    note = next(line for line in logs if line.startswith("note: CSI1"))
    assert f">= {needed} of them" in note and all(t in note for t in empty)


def test_permutation_significance_needs_permutation_p_values(study_copy):
    cfg = load_config(study_copy, overrides={"analysis": {"significance": "permutation"}})
    store = StudyStore(cfg.store_path)
    results = {s: store.results(s).drop_vars("pvalue_perm") for s in cfg.study.subjects}
    with pytest.raises(Exception, match=r"pvalue_perm.*fit.n_permutations > 0"):
        analyse(results, significance="permutation")


def test_stored_analysis_has_the_roi_test_and_ceiling_and_an_older_version_is_recomputed(study_copy, monkeypatch,
                                                                                           logs):
    from neurotask.pipeline.stages import analyse as stage

    cfg = load_config(study_copy)
    a = read_analysis(cfg)
    # the demo-like study has repeated images: a noise ceiling per ROI, and the ROI-level test
    assert a["roi_noise_ceiling"].dims == ("subject", "roi") and np.isfinite(a["roi_noise_ceiling"].values).all()
    assert a["roi_p"].dims == ("subject", "task", "roi") and np.isfinite(a["roi_p"].values).all()
    assert a["roi_significant"].values.any() and not a["roi_significant"].values.all()
    # an analysis stored by another analysis version is not reused
    monkeypatch.setattr(stage, "ANALYSIS_VERSION", stage.ANALYSIS_VERSION - 1)
    logs.clear()
    old = run_analysis(cfg)
    assert not any("skipped" in line for line in logs)
    assert old.attrs["input_fingerprint"] != a.attrs["input_fingerprint"]
