"""The partition stage on Dask: every union fitted with the fit's protocol, the Venn regions,
the unique variance's tests, resume by voxel block, repair of damaged blocks, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import small_config_dict, write_config
from fault_support import kill_after_markers
from neurotask.cluster import open_client
from neurotask.pipeline import cli
from neurotask.pipeline.config import load_config
from neurotask.pipeline.stages import partition as stage
from neurotask.pipeline.stats import partition as vp
from neurotask.storage import StoreError, StudyStore, partition_group

pytestmark = pytest.mark.slow  # a copy of small_study (one whole `neurotask run`) and a partition run

GROUPS = {"3D": ["keypoint3d", "rgb2depth"], "2D": ["edge2d", "keypoint2d"], "semantic": ["class_1000", "class_places"]}
PAIR = {"k3": ["keypoint3d"], "k2": ["keypoint2d"]}


def partition_section(**extra) -> dict:
    return {"analyses": {"clusters": GROUPS, "keypoint": PAIR}, "n_permutations": 5000, "block_size": 200,
            "banded": "full", "n_candidates": 4, **extra}


@pytest.fixture(scope="module")
def partitioned(small_study, tmp_path_factory) -> Path:
    """A copy of small_study with both analyses partitioned once."""
    d = tmp_path_factory.mktemp("partition")
    shutil.copytree(load_config(small_study).workdir, d / "work")
    path = write_config(d / "study.yaml", small_config_dict(d / "work", partition=partition_section()))
    assert cli.main(["partition", "--config", str(path)]) == 0
    return path


def test_every_union_is_fitted_and_regions_add_up(partitioned):
    cfg = load_config(partitioned)
    store = StudyStore(cfg.store_path)
    for subject in cfg.study.subjects:
        ds = store.partition("clusters", subject)
        assert list(ds["set"].values) == [vp.set_name(s) for s in vp.subsets(list(GROUPS))]
        assert list(ds["group"].values) == list(GROUPS)
        assert ds.sizes["voxel"] == store.responses(subject).sizes["voxel"]
        # every voxel the fit could score (constant test responses have no r)
        scored = np.isfinite(store.results(subject)["r2"].values).all(axis=0)
        assert scored.mean() > 0.95
        for name in ("r2", "r", "alpha", "region_r2", "unique_r2", "unique_pvalue", "unique_qvalue"):
            assert np.isfinite(ds[name].values[..., scored]).all(), name
        # the regions add up to the full union's R² (inclusion-exclusion is an identity)
        np.testing.assert_allclose(ds["region_r2"].sum("region").values[scored],
                                   ds["r2"].sel(set="3D+2D+semantic").values[scored], atol=2e-5)
        np.testing.assert_array_equal(ds["unique_r2"].values, ds["region_r2"].sel(region=list(GROUPS)).values)
        assert ((ds["unique_pvalue"] > 0) & (ds["unique_pvalue"] <= 1)).all()
        assert ds["voxel_i"].size == ds.sizes["voxel"] and "roi" in ds.coords


def test_a_single_space_union_is_the_fit_of_that_task(partitioned):
    """The keypoint analysis's single-space sets are the fit's own models: same alpha, same R²."""
    cfg = load_config(partitioned)
    store = StudyStore(cfg.store_path)
    for subject in cfg.study.subjects:
        ds, results = store.partition("keypoint", subject), store.results(subject)
        for group, (task,) in PAIR.items():
            np.testing.assert_array_equal(ds["alpha"].sel(set=group).values,
                                          results["alpha"].sel(task=task).values.astype(np.float32))
            np.testing.assert_allclose(ds["r2"].sel(set=group).values, results["r2"].sel(task=task).values, atol=1e-5)


def test_planted_3d_voxels_have_unique_3d_variance(partitioned):
    """The simulation drives PPA/OPA/RSC mostly by the 3D cluster and EarlyVis by the 2D one:
    their unique variance and its tests say so."""
    cfg = load_config(partitioned)
    ds = StudyStore(cfg.store_path).partition("clusters", "CSI1")
    roi = np.array([str(r)[2:] for r in ds["roi"].values])  # LH/RH prefix
    scene = np.isin(roi, ["PPA", "OPA", "RSC"])
    early = roi == "EarlyVis"
    u = ds["unique_r2"]
    assert float(u.sel(group="3D").values[scene].mean()) > float(u.sel(group="2D").values[scene].mean())
    assert float(u.sel(group="2D").values[early].mean()) > float(u.sel(group="3D").values[early].mean())
    # 45 test images give the sign-flip test little power here; its p still ranks the groups
    p = ds["unique_pvalue"]
    assert np.median(p.sel(group="3D").values[scene]) < np.median(p.sel(group="semantic").values[scene])
    assert np.median(p.sel(group="2D").values[early]) < np.median(p.sel(group="semantic").values[early])


def test_banded_ridge_is_stored_for_the_full_union(partitioned):
    cfg = load_config(partitioned)
    ds = StudyStore(cfg.store_path).partition("clusters", "CSI1")
    full = "3D+2D+semantic"
    assert np.isfinite(ds["banded_r2"].sel(set=full).values).mean() > 0.95
    assert np.isnan(ds["banded_r2"].sel(set="3D").values).all()  # banded: full only
    # the spaces' shares add up to the banded R² less the intercept's (its training mean's misfit)
    cfg_ = load_config(partitioned)
    store = StudyStore(cfg_.store_path)
    rows = stage.design_rows(cfg_.fit, store, "CSI1")  # the fit's design: rows sorted by image name
    Y = store.responses("CSI1")["responses"].values.astype(np.float64)[rows.order]
    splits = stage.design_splits(cfg_.fit, store, "CSI1", rows)
    d = Y[splits.train].mean(0) - Y[splits.test].mean(0)
    sst = ((Y[splits.test] - Y[splits.test].mean(0)) ** 2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        intercept_share = -len(splits.test) * d**2 / sst
    np.testing.assert_allclose(ds["banded_split_r2"].sel(set=full).sum("space").values + intercept_share,
                               ds["banded_r2"].sel(set=full).values, atol=1e-4)  # NaN where unscored, on both sides
    assert np.isnan(ds["banded_split_r2"].sel(set="3D").values).all()


def test_rerun_skips_done_blocks_and_redoes_a_damaged_one(partitioned):
    cfg = load_config(partitioned)
    store = StudyStore(cfg.store_path)
    before = store.partition("clusters", "CSI2")
    chunk = cfg.store_path / partition_group("clusters", "CSI2") / "r2" / "c" / "0" / "1"
    chunk.write_bytes(b"damaged")
    with open_client(cfg.cluster) as client:
        report = stage.partition(cfg, client)
    n_blocks = sum(-(-store.responses(s).sizes["voxel"] // 200) for s in cfg.study.subjects) * 2
    assert report.computed == 1 and report.skipped == n_blocks - 1
    after = store.partition("clusters", "CSI2")
    for name in ("r2", "region_r2", "unique_pvalue", "unique_qvalue", "banded_r2"):
        np.testing.assert_array_equal(after[name].values, before[name].values, err_msg=name)  # bit for bit; NaN == NaN


def test_verify_names_a_damaged_partition_chunk(partitioned, capsys):
    cfg = load_config(partitioned)
    assert cli.main(["verify", "--config", str(partitioned)]) == 0
    chunk = cfg.store_path / partition_group("keypoint", "CSI1") / "unique_r2" / "c" / "0" / "0"
    good = chunk.read_bytes()
    try:
        chunk.write_bytes(good[:-3])
        capsys.readouterr()
        assert cli.main(["verify", "--config", str(partitioned)]) == 2
        assert "partition/keypoint/CSI1/unique_r2" in capsys.readouterr().err
    finally:
        chunk.write_bytes(good)


def test_killed_partition_resumes_with_only_missing_blocks_bit_for_bit(partitioned, tmp_path):
    """SIGKILL the whole partition (driver and local workers) after a few blocks; the rerun
    computes only the blocks without a marker and ends identical to the undisturbed run."""
    ref = load_config(partitioned)
    work = tmp_path / "work"
    shutil.copytree(ref.workdir, work, ignore=shutil.ignore_patterns("partition", "partition_final"))
    path = write_config(tmp_path / "k.yaml", small_config_dict(work, partition=partition_section(),
                                                              cluster={"n_workers": 1}))
    cfg = load_config(path)
    store = StudyStore(cfg.store_path)
    for analysis in ("clusters", "keypoint"):
        for subject in cfg.study.subjects:
            store.remove(partition_group(analysis, subject))
    markers = cfg.workdir / "progress" / "partition"
    kill_after_markers(["partition", "--config", str(path)], markers, 3, tmp_path / "partition.log")
    done = sum(1 for _ in markers.rglob("*.json"))
    with open_client(cfg.cluster) as client:
        report = stage.partition(cfg, client)
    assert report.skipped == done and report.computed > 0
    for analysis in ("clusters", "keypoint"):
        for subject in cfg.study.subjects:
            a, b = store.partition(analysis, subject), StudyStore(ref.store_path).partition(analysis, subject)
            for name in a.data_vars:
                np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{analysis} {subject} {name}")


def test_other_settings_are_refused_naming_them(partitioned, tmp_path):
    cfg = load_config(partitioned)
    path = write_config(tmp_path / "other.yaml", small_config_dict(cfg.workdir, partition=partition_section(n_permutations=300)))
    with open_client(load_config(path).cluster) as client, pytest.raises(StoreError, match="n_permutations"):
        stage.partition(load_config(path), client)


def test_unknown_space_and_missing_section_are_config_errors(small_study, tmp_path, capsys):
    work = load_config(small_study).workdir
    bad = write_config(tmp_path / "bad.yaml", small_config_dict(work, partition={"analyses": {"x": {"a": ["edge2d"], "b": ["nope"]}}}))
    assert cli.main(["partition", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "partition.analyses.x.b: unknown feature space(s) nope" in err and "Traceback" not in err
    dup = write_config(tmp_path / "dup.yaml", small_config_dict(work, partition={"analyses": {"x": {"a": ["edge2d"], "b": ["edge2d"]}}}))
    assert cli.main(["partition", "--config", str(dup)]) == 2
    assert "feature space edge2d is in groups a and b" in capsys.readouterr().err
    none = write_config(tmp_path / "none.yaml", small_config_dict(work))
    assert cli.main(["partition", "--config", str(none)]) == 2
    assert "no partition: section" in capsys.readouterr().err
