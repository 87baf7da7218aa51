"""StudyStore: feature region writes (whole chunks only, shapes checked, values read back
through xarray exactly as written); the schema (chunk plan, group paths, marker names, results
template, attrs, task labels, consolidated metadata); the atomic writer."""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from neurotask.storage import (CEILING_VARS, PERMUTATION_VARS, RESULT_VARS, ChunkPlan, Progress, Stage, StoreError,
                               StudyStore, analysis_group, chunk_key, features_group, responses_group, results_group,
                               roi_results_group, write_json_atomic)


@pytest.fixture()
def store(tmp_path) -> StudyStore:
    s = StudyStore(tmp_path / "s.zarr")
    s.create()
    s.init_features("edge2d", [f"img{i}.jpg" for i in range(10)], n_features=6, batch_size=4)
    return s


def test_feature_rows_round_trip_and_unwritten_rows_stay_nan(store):
    rng = np.random.default_rng(0)
    first, last = rng.random((4, 6)), rng.random((2, 6))
    store.write_feature_rows("edge2d", slice(0, 4), first)
    store.write_feature_rows("edge2d", slice(8, 10), last)  # the last, partial chunk
    got = store.read_features("edge2d")
    assert list(got["image"].values[:2]) == ["img0.jpg", "img1.jpg"]
    np.testing.assert_array_equal(got.values[:4], first.astype(np.float32))
    np.testing.assert_array_equal(got.values[8:], last.astype(np.float32))
    assert np.isnan(got.values[4:8]).all()


def test_misaligned_or_misshapen_rows_are_refused_and_nothing_is_written(store):
    with pytest.raises(StoreError, match="do not align with chunks of 4"):
        store.write_feature_rows("edge2d", slice(2, 6), np.ones((4, 6)))
    with pytest.raises(StoreError, match=r"shape \(4, 5\)"):
        store.write_feature_rows("edge2d", slice(0, 4), np.ones((4, 5)))
    with pytest.raises(StoreError, match="not initialised"):
        store.write_feature_rows("rgb2depth", slice(0, 4), np.ones((4, 6)))
    assert np.isnan(store.read_features("edge2d").values).all()


# --------------------------------------------------------------------------- the schema


def test_chunk_plan_covers_every_position_once_in_chunk_order():
    plan = ChunkPlan(10, 4)
    assert plan.n_chunks == 3
    assert [plan.bounds(k) for k in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert [plan.size(k) for k in range(3)] == [4, 4, 2]
    assert list(plan) == [slice(0, 4), slice(4, 8), slice(8, 10)] and plan.chunk(2) == slice(8, 10)
    assert plan.keys() == {"00000", "00001", "00002"} and chunk_key(12) == "00012"
    assert ChunkPlan(8, 4).n_chunks == 2 and ChunkPlan(0, 4).n_chunks == 0 and ChunkPlan(3, 5).bounds(0) == (0, 3)
    with pytest.raises(IndexError):
        plan.bounds(3)
    with pytest.raises(ValueError):
        ChunkPlan(10, 0)


def test_group_paths_and_marker_names():
    assert (features_group("edge2d"), responses_group("CSI1"), results_group("CSI1"),
            roi_results_group("CSI1"), analysis_group("task_structure")) == (
        "features/edge2d", "responses/CSI1", "results/CSI1", "roi_results/CSI1", "analysis/task_structure")
    # marker names are part of every existing study's progress directory: they must not change
    assert [s.value for s in Stage] == ["simulate", "ingest", "featurize", "featurized", "fit", "ceiling", "finalize", "import",
                                        "partition", "partition_final"]


def _study(tmp_path, chunk: int = 3) -> StudyStore:
    """A store with features, responses (with repeated images) and results of two tasks."""
    s = StudyStore(tmp_path / "work" / "store.zarr")
    s.create()
    images = [f"img{i}.jpg" for i in range(6)]
    s.write_features("edge2d", np.ones((6, 2)), images, attrs={"source": "test"})
    ijk = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 1], [2, 0, 1]])
    s.init_responses("CSI1", images, ijk, ["", "LHPPA", "LHPPA", "", "RHLOC"], chunk, {"volume_shape": [3, 2, 2]},
                     image_coords={"session": np.ones(6, dtype=np.int16), "n_showings": np.ones(6, dtype=np.int16)},
                     repeated_images=images[:2], n_showings=2)
    for voxels in s.voxel_chunks("CSI1"):
        n = voxels.stop - voxels.start
        s.write_responses("CSI1", voxels, np.zeros((6, n)), np.zeros((2, 2, n)))
    s.ensure_results("CSI1", ["edge2d", "rgb2depth"], {"n_alphas": 3}, task_labels=["2D Edges", "Depth"],
                     permutation=True)
    return s


def test_consolidated_metadata_open_every_group_without_a_warning(tmp_path):
    s = _study(tmp_path)
    s.write_result_chunk("CSI1", 1, slice(3, 5), {"r": np.array([0.5, 0.25], dtype=np.float32)})  # a worker's write
    assert s.ensure_results("CSI1", ["edge2d", "keypoint2d"], {"n_alphas": 3}, task_labels=["2D Edges", "2D Keypoints"],
                            permutation=True) == ["edge2d", "rgb2depth", "keypoint2d"]  # an append
    s.write_dataset(analysis_group("test"), xr.Dataset({"x": ("task", np.arange(3.0))}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for group in ("features/edge2d", "responses/CSI1", "results/CSI1", "analysis/test"):
            xr.open_zarr(str(s.path), group=group).load()
        res = xr.open_zarr(str(s.path), group="results/CSI1", consolidated=True)  # metadata read from the root only
        assert res.sizes == {"task": 3, "voxel": 5}
        np.testing.assert_array_equal(res["r"].values[1], [np.nan, np.nan, np.nan, 0.5, 0.25])
    s.remove("analysis/test")  # the root's consolidated metadata forget a removed group
    consolidated = zarr.open_consolidated(str(s.path), zarr_format=3).metadata.consolidated_metadata
    assert "analysis/test" not in consolidated.flattened_metadata and "results/CSI1" in consolidated.flattened_metadata


def test_a_store_written_before_consolidation_still_opens_quietly(tmp_path):
    path = tmp_path / "store.zarr"
    zarr.open_group(str(path), mode="a", zarr_format=3).attrs["store_id"] = "old"
    old = xr.Dataset({"features": (("image", "feature"), np.ones((3, 2), np.float32))},
                     coords={"image": np.array(["a", "b", "c"], dtype=object)})
    old.to_zarr(str(path), group="features/edge2d", consolidated=False, zarr_format=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(StudyStore(path).read_features("edge2d").values, np.ones((3, 2)))


def test_every_stored_variable_says_what_it_is(tmp_path):
    s = _study(tmp_path)
    for group in ("features/edge2d", "responses/CSI1", "results/CSI1"):
        ds = xr.open_zarr(str(s.path), group=group)
        assert ds.data_vars
        for name, var in ds.data_vars.items():
            assert var.attrs.get("units") and var.attrs.get("long_name"), (group, name)
        for name, coord in ds.coords.items():
            assert coord.attrs.get("long_name"), (group, name)
            assert coord.dtype.kind in "OTU" or coord.attrs.get("units"), (group, name)  # numbers have units
    res = s.results("CSI1")
    assert res["r"].attrs == {"units": "1", "long_name": "Pearson correlation of test-set predictions"}
    assert res["r"].dtype == np.float32 and res["alpha"].dtype == np.float64 and res["significant"].dtype == bool


def test_results_carry_the_task_labels_they_were_given(tmp_path):
    s = _study(tmp_path)
    s.ensure_results("CSI1", ["keypoint2d"], {"n_alphas": 3}, task_labels=["2D Keypoints"], permutation=True)
    res = s.results("CSI1")
    assert list(res["task"].values) == ["edge2d", "rgb2depth", "keypoint2d"]
    assert list(res["task_label"].values) == ["2D Edges", "Depth", "2D Keypoints"]
    assert list(res.sel(task="rgb2depth")["task_label"].values.ravel()) == ["Depth"]


def test_results_template_is_filled_with_the_variables_fill_values(tmp_path):
    s = _study(tmp_path)
    res = s.results("CSI1")
    assert set(res.data_vars) == set(RESULT_VARS + PERMUTATION_VARS + CEILING_VARS)
    for name in RESULT_VARS + PERMUTATION_VARS:
        assert res[name].dims == ("task", "voxel")
        assert (~res[name].values).all() if name.startswith("significant") else np.isnan(res[name].values).all()
    assert all(res[name].dims == ("voxel",) for name in CEILING_VARS)
    assert list(res["roi"].values) == ["", "LHPPA", "LHPPA", "", "RHLOC"]
    assert list(res["voxel_k"].values) == [0, 0, 0, 1, 1]
    assert res.attrs["fit"] == {"n_alphas": 3} and res.attrs["chunk_size"] == 3


def test_the_store_knows_its_progress_directory(tmp_path):
    s = _study(tmp_path)
    progress = s.progress()
    assert progress.directory == tmp_path / "work" / "progress" and progress.store_id == s.store_id
    progress.mark_done(Stage.FIT, "CSI1", "edge2d", chunk_key(1))
    assert StudyStore(s.path).progress().done_units("fit", "CSI1", "edge2d") == {"00001"}
    with pytest.raises(StoreError, match="no study store"):
        StudyStore(tmp_path / "none.zarr").progress()


# --------------------------------------------------------------------------- the atomic writer


def test_atomic_write_fsyncs_the_data_then_renames_then_fsyncs_the_directory(tmp_path, monkeypatch):
    calls: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", Path(src).parent == Path(dst).parent, Path(src).read_text()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "a" / "marker.json"
    write_json_atomic(target, {"x": 1})
    # the data are on disk before the rename makes them visible, and the rename before we return
    assert calls == [("fsync", False), ("replace", True, '{"x": 1}'), ("fsync", True)]
    assert json.loads(target.read_text()) == {"x": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["marker.json"]


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    write_json_atomic(target, {"state": "running"})

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(target, {"state": "finished"})
    assert json.loads(target.read_text()) == {"state": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_progress_markers_are_written_by_the_atomic_writer(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr("neurotask.storage.progress.write_json_atomic", lambda path, record: written.append(path))
    Progress(tmp_path, "id").mark_done(Stage.INGEST, "CSI1")
    assert written == [tmp_path / "ingest" / "CSI1.json"]
