"""StudyStore's feature region writes: whole chunks only, shapes checked, values read back
through xarray exactly as written."""

from __future__ import annotations

import numpy as np
import pytest

from neurotask.storage import StudyStore
from neurotask.storage.store import StoreError


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
