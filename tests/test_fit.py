"""End to end: simulate -> ingest -> fit on Dask, the planted structure recovered, resume after
a kill, and the fit's refusals of inconsistent input."""

import pickle
import shutil
import warnings

import numpy as np
import pydantic
import pytest
import xarray as xr

from conftest import SMALL_TASKS, small_config_dict, write_config
from fault_support import kill_after_markers
from neurotask.pipeline import cli
from neurotask.pipeline.stages import fit
from neurotask.pipeline import ridge
from neurotask.pipeline.stats import scores as stats
from neurotask.pipeline.config import load_config
from neurotask.pipeline.errors import FitError
from neurotask.pipeline.stages.simulate import ROI_DRIVER
from neurotask.pipeline.tasks import task_cluster, task_info
from neurotask.pipeline.stages.ingest import ingest
from neurotask.pipeline.stages.simulate import simulate_study
from neurotask.storage import StoreError, StudyStore
from neurotask.cluster import open_client

pytestmark = pytest.mark.slow  # every test uses small_study, one whole `neurotask run`


def test_results_are_labelled_and_complete(small_study):
    cfg = load_config(small_study)
    store = StudyStore(cfg.store_path)
    for subject in cfg.study.subjects:
        res = store.results(subject)
        assert list(res["task"].values) == SMALL_TASKS
        assert set(res.data_vars) >= {"r", "r2", "alpha", "pvalue", "qvalue", "significant"}
        assert {"voxel_i", "voxel_j", "voxel_k", "roi"} <= set(res.coords)
        assert res.attrs["volume_shape"] == cfg.simulate.volume_shape
        assert list(res["task_label"].values) == [task_info(t).label for t in SMALL_TASKS]
        assert all(res[name].attrs["units"] and res[name].attrs["long_name"] for name in res.data_vars)
        with warnings.catch_warnings():  # consolidated metadata: opened as any xarray user would
            warnings.simplefilter("error")
            xr.open_zarr(str(cfg.store_path), group=f"results/{subject}").load()
        # every voxel fitted: only the constant voxel has an undefined r
        assert int(np.isnan(res["r"].values).any(0).sum()) == 1
        grid = fit.alpha_grid(cfg.fit, cfg.simulate.n_features)
        assert np.isin(res["alpha"].values, grid).all()
        q, sig = stats.fdr_bh(res["pvalue"].values[0], cfg.fit.fdr)
        np.testing.assert_allclose(res["qvalue"].values[0], q)
        np.testing.assert_array_equal(res["significant"].values[0], sig)


def test_fit_spec_fingerprint_is_what_existing_stores_hold(tmp_path):
    """The fingerprint stored with results keeps its keys and values, so stores fitted before
    the spec existed still match the config that asks for what they were computed with (keys
    added later: storage.store.LEGACY_FIT_PARAMS); the spec is immutable and travels to workers
    as it is."""
    spec = load_config(write_config(tmp_path / "a.yaml", small_config_dict(tmp_path))).fit
    assert spec.fingerprint() == {"test_set": "auto", "test_fraction": 0.15, "cv": "kfold", "n_folds": 5, "alphas": "paper",
                                  "n_alphas": 20, "seed": 2019, "dtype": "float32", "zscore_features": True,
                                  "n_permutations": 200, "permutation_seed": 0, "backend": "numpy"}
    other = small_config_dict(tmp_path, fit={"cv": "single_split", "alphas": [10, 1.5], "n_permutations": 0})
    single = load_config(write_config(tmp_path / "b.yaml", other)).fit
    assert single.fingerprint() == {"test_set": "auto", "test_fraction": 0.15, "cv": "single_split", "n_folds": 5,
                                    "validation_fraction": 0.15, "alphas": [10.0, 1.5], "n_alphas": 20, "seed": 2019,
                                    "dtype": "float32", "zscore_features": True, "n_permutations": 0,
                                    "permutation_seed": 0, "backend": "numpy"}
    assert not single.permutation and spec.permutation
    np.testing.assert_array_equal(fit.alpha_grid(single, 48), [1.5, 10.0])
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        spec.seed = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(spec)) == spec
    torch_spec = small_config_dict(tmp_path, fit={"backend": "torch", "device": "cuda:1"})
    assert load_config(write_config(tmp_path / "c.yaml", torch_spec)).fit.fingerprint()["backend"] == "torch:cuda"


def test_resume_with_another_backend_is_refused_naming_it_and_legacy_stores_still_match(tmp_path):
    """Results store their backend; one stored before the key existed counts as numpy."""
    cfg = load_config(write_config(tmp_path / "a.yaml", small_config_dict(tmp_path)))
    simulate_study(cfg)
    ingest(cfg)
    store = StudyStore(cfg.store_path)
    legacy = {k: v for k, v in cfg.fit.fingerprint().items() if k != "backend"}
    store.ensure_results("CSI1", cfg.tasks, legacy, task_labels=cfg.tasks)
    store.ensure_results("CSI1", cfg.tasks, cfg.fit.fingerprint(), task_labels=cfg.tasks)  # numpy: matches
    torch_params = dict(cfg.fit.fingerprint(), backend="torch")
    with pytest.raises(StoreError, match=r"other parameters \(backend: stored 'numpy', config 'torch'\)"):
        store.ensure_results("CSI1", cfg.tasks, torch_params, task_labels=cfg.tasks)


def test_orchestrated_fit_equals_the_engine_alone(small_study):
    """The Dask fit over chunks gives what one call of the engine on all voxels gives."""
    cfg = load_config(small_study)
    store = StudyStore(cfg.store_path)
    task = "keypoint3d"
    spec = cfg.fit
    dec = fit.build_decomposition(spec, store, "CSI2", task)
    # the design's rows are the images sorted by name (shared by subjects who saw them)
    Y = store.responses("CSI2")["responses"].values[fit.design_rows(spec, store, "CSI2").order]
    res = ridge.ridge_cv(dec, Y, fit.alpha_grid(spec, cfg.simulate.n_features))
    scores = stats.test_scores(Y[dec.final.eval_rows], res.test_prediction)
    stored = store.results("CSI2").sel(task=task)
    np.testing.assert_array_equal(stored["alpha"].values, res.alpha)
    np.testing.assert_allclose(stored["r"].values, scores["r"], rtol=1e-5, atol=1e-6)


def test_planted_structure_is_recovered(small_study):
    """Each ROI is best predicted by the Taskonomy cluster that drives it in the simulation;
    pure-noise voxels are (almost) never significant."""
    cfg = load_config(small_study)
    store = StudyStore(cfg.store_path)
    for subject in cfg.study.subjects:
        res = store.results(subject)
        truth = np.load(cfg.workdir / f"raw/ground_truth/{subject}.npz")
        clusters = np.array([task_cluster(t) for t in res["task"].values])
        for roi in np.unique(res["roi"].values):
            if not roi:
                continue
            r = res["r"].values[:, res["roi"].values == roi]
            by_cluster = {c: np.nanmean(r[clusters == c]) for c in set(clusters)}
            assert max(by_cluster, key=by_cluster.get) == ROI_DRIVER[roi[2:]], (subject, roi, by_cluster)
        # noise voxels: map ground truth to stored voxels by coordinates
        ijk = np.stack([res[c].values for c in ("voxel_i", "voxel_j", "voxel_k")], 1)
        key = {tuple(x): d for x, d in zip(truth["voxel_ijk"], truth["driver"])}
        noise = np.array([key[tuple(x)] == "" for x in ijk])
        assert noise.sum() > 50
        assert res["significant"].values[:, noise].mean() < 0.02
        # Driven ROI voxels: their signal is spread over unique, pair-shared, all-task and private
        # parts (the planted partition), so one task predicts only part of it, and with 45 test
        # images few reach FDR significance (0.004-0.07 of them in some task, depending on which
        # images are tested); their uncorrected p < 0.01 is still several times as frequent as
        # the noise voxels' (which is ~0.01, as a valid test's must be).
        driven_roi = ~noise & (res["roi"].values != "")
        p = res["pvalue"].values
        assert (p[:, noise] < 0.01).mean() < 0.02
        assert (p[:, driven_roi] < 0.01).mean() > 3 * max((p[:, noise] < 0.01).mean(), 0.01)


def test_status_reports_done_units(small_study, capsys):
    assert cli.main(["status", "--config", str(small_study)]) == 0
    out = capsys.readouterr().out
    assert "CSI1: 300 images" in out and "keypoint3d" in out and "done" in out and "missing" not in out


def test_rerun_with_other_fit_parameters_is_refused(small_study, tmp_path):
    cfg = load_config(small_study)
    other = small_config_dict(cfg.workdir, fit={"n_alphas": 10})
    path = write_config(tmp_path / "other.yaml", other)
    code = cli.main(["fit", "--config", str(path)])
    assert code == 2
    # nothing was touched: the stored results still carry the original parameters
    assert StudyStore(cfg.store_path).results("CSI1").attrs["fit"]["n_alphas"] == 20


def test_features_missing_images_is_an_error(small_study, tmp_path):
    cfg0 = load_config(small_study)
    work = tmp_path / "w"
    shutil.copytree(cfg0.workdir, work)
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config_dict(work, study={"subjects": ["CSI1"], "tasks": ["edge2d"]})))
    store = StudyStore(cfg.store_path)
    feats = store.read_features("edge2d")
    store.write_features("edge2d", feats.values[:-7], list(feats["image"].values[:-7]))
    store.progress().clear("fit")
    store.remove("results/CSI1")
    with open_client(cfg.cluster) as client:
        with pytest.raises(FitError, match=r"features/edge2d lacks 7 of the subject's 300 images"):
            fit.fit(cfg, client)


def test_failing_unit_is_retried_then_named_and_others_kept(small_study, tmp_path, monkeypatch):
    cfg0 = load_config(small_study)
    work = tmp_path / "w"
    shutil.copytree(cfg0.workdir, work)
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config_dict(
        work, study={"subjects": ["CSI1"], "tasks": ["edge2d", "class_1000"]}, fit={"retries": 1})))
    store = StudyStore(cfg.store_path)
    store.progress().clear("fit")
    store.remove("results/CSI1")
    monkeypatch.setenv(fit.FAULT_ENV, "CSI1/class_1000/2")  # inherited by the local workers
    with open_client(cfg.cluster) as client:
        with pytest.raises(FitError, match=r"CSI1/class_1000/chunk 2 .*injected fault"):
            fit.fit(cfg, client)
    progress = store.progress()
    n_chunks = store.voxel_chunks("CSI1").n_chunks
    assert len(progress.done_units("fit", "CSI1", "edge2d")) == n_chunks
    assert progress.done_units("fit", "CSI1", "class_1000") == {f"{c:05d}" for c in range(n_chunks)} - {"00002"}
    ref = StudyStore(cfg0.store_path).results("CSI1")
    got = store.results("CSI1")
    np.testing.assert_array_equal(got["r"].sel(task="edge2d").values, ref["r"].sel(task="edge2d").values)


def test_killed_fit_resumes_with_only_missing_units(small_study, tmp_path):
    """SIGKILL the whole fit (driver and its local workers) mid-way; the rerun computes only
    the units without a marker, leaves finished ones untouched, and ends identical."""
    cfg0 = load_config(small_study)
    work = tmp_path / "w"
    shutil.copytree(cfg0.workdir / "raw", work / "raw")
    cfg_dict = small_config_dict(work, cluster={"n_workers": 1})
    path = write_config(tmp_path / "k.yaml", cfg_dict)
    assert cli.main(["simulate", "--config", str(path)]) == 0
    assert cli.main(["ingest", "--config", str(path)]) == 0
    cfg = load_config(path)
    store = StudyStore(cfg.store_path)
    progress = store.progress()
    n_chunks = store.voxel_chunks("CSI1").n_chunks
    total = 2 * len(SMALL_TASKS) * n_chunks

    kill_after_markers(["fit", "--config", str(path)], cfg.workdir / "progress" / "fit", 4, tmp_path / "fit.log")
    done_before = {(s, t, u): (cfg.workdir / "progress/fit" / s / t / f"{u}.json").stat().st_mtime_ns
                   for s in cfg.study.subjects for t in SMALL_TASKS for u in progress.done_units("fit", s, t)}
    assert 4 <= len(done_before) < total

    with open_client(cfg.cluster) as client:
        report = fit.fit(cfg, client)
    assert report.skipped == len(done_before)
    assert report.computed == total - len(done_before)
    for (subject, task, unit), mtime in done_before.items():  # finished units were not redone
        assert (cfg.workdir / "progress/fit" / subject / task / f"{unit}.json").stat().st_mtime_ns == mtime
    ref = StudyStore(cfg0.store_path)
    for subject in cfg.study.subjects:
        a, b = store.results(subject), ref.results(subject)
        for var in ("r", "r2", "alpha", "pvalue", "qvalue", "significant"):
            np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=f"{subject} {var}")


def test_permutation_pvalues_and_noise_ceiling_are_stored(small_study):
    cfg = load_config(small_study)
    store = StudyStore(cfg.store_path)
    res = store.results("CSI1")
    n_test = int(round(cfg.fit.test_fraction * 300))
    # permutation p: one-sided (null r >= observed), on the grid 1/(1+N), tracks the parametric p
    p_perm, r = res["pvalue_perm"].values, res["r"].values
    ok = np.isfinite(r)
    k = p_perm[ok] * (1 + cfg.fit.n_permutations)
    np.testing.assert_allclose(k, np.round(k), atol=1e-6)
    p_one_sided = stats.pearson_pvalue(r[ok], n_test, alternative="greater")
    strong = p_one_sided < 1e-3
    assert (p_perm[ok][strong] <= 2 / (1 + cfg.fit.n_permutations) + 1e-12).mean() > 0.95
    mid = (p_one_sided > 0.05) & (p_one_sided < 0.95)
    assert np.median(np.abs(p_perm[ok][mid] - p_one_sided[mid])) < 0.05
    q, sig = stats.fdr_bh(p_perm[1], cfg.fit.fdr)
    np.testing.assert_array_equal(res["significant_perm"].values[1], sig)
    # noise ceiling from the 30 images shown 3 times, against the simulation's truth
    truth = np.load(cfg.workdir / "raw/ground_truth/CSI1.npz")
    key = {tuple(x): c for x, c in zip(truth["voxel_ijk"], truth["noise_ceiling_single_trial"])}
    ijk = np.stack([res[c].values for c in ("voxel_i", "voxel_j", "voxel_k")], 1)
    true_ceiling = np.array([key[tuple(x)] for x in ijk])
    est = res["noise_ceiling_r"].values
    driven = true_ceiling > 0.4
    # 30 repeated images give a noisy per-voxel estimate (sd ~0.1 at these SNRs): check bias
    # and spread, not single voxels.
    assert abs(np.nanmedian(est[driven] - true_ceiling[driven])) < 0.06
    assert np.nanmedian(np.abs(est[driven] - true_ceiling[driven])) < 0.12
    assert np.corrcoef(np.nan_to_num(est), true_ceiling)[0, 1] > 0.7


def test_certified_search_equals_exhaustive_on_the_simulated_study(small_study):
    """The default alpha search returns the exhaustive grid search's alphas on the simulated
    study (paper grid of 100 alphas, every voxel of a subject, tasks of three clusters)."""
    cfg = load_config(small_study)
    store = StudyStore(cfg.store_path)
    Y = store.responses("CSI1")["responses"].values[fit.design_rows(cfg.fit, store, "CSI1").order]
    alphas = ridge.paper_alphas(cfg.simulate.n_features, 100)
    for task in ("edge2d", "rgb2depth", "class_places"):
        dec = fit.build_decomposition(cfg.fit, store, "CSI1", task)
        a = ridge.ridge_cv(dec, Y, alphas, search="certified")
        b = ridge.ridge_cv(dec, Y, alphas, search="exhaustive")
        assert (a.alpha == b.alpha).mean() >= 0.999, task
        np.testing.assert_allclose(a.test_prediction, b.test_prediction, rtol=1e-4, atol=1e-5)
