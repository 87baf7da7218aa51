"""Features the fit cannot use are refused on the driver, before any unit is submitted, with
one message naming the store group, the task and the first bad rows (issue 15)."""

import logging

import numpy as np
import pytest

from conftest import small_config_dict, write_config
from neurotask.pipeline import cli
from neurotask.pipeline.config import load_config
from neurotask.pipeline.errors import FitError
from neurotask.pipeline.stages import fit
from neurotask.storage import StudyStore


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A simulated, ingested (not fitted) one-subject, one-task study."""
    d = tmp_path_factory.mktemp("tiny")
    path = write_config(d / "study.yaml", small_config_dict(
        d / "work", study={"subjects": ["CSI1"], "tasks": ["edge2d"]},
        simulate={"n_images": 120, "n_repeated": 12, "volume_shape": [8, 8, 8]}))
    assert cli.main(["simulate", "--config", str(path)]) == 0
    assert cli.main(["ingest", "--config", str(path)]) == 0
    return load_config(path)


@pytest.fixture
def study(tiny):
    """The tiny study; its features are restored after the test."""
    store = StudyStore(tiny.store_path)
    feats = store.read_features("edge2d")
    yield tiny, store, feats
    store.write_features("edge2d", feats.values, [str(x) for x in feats["image"].values])


class _NoClient:
    """A client that fails the test if anything is submitted or asked."""

    def __getattr__(self, name):
        raise AssertionError(f"client.{name} used before the features were checked")


def _write(store, feats, values):
    store.write_features("edge2d", values, [str(x) for x in feats["image"].values])


def test_nan_rows_are_refused_before_any_unit_runs(study):
    cfg, store, feats = study
    values = feats.values.copy()
    values[[3, 10], 5] = np.nan
    values[20, 0] = np.inf
    _write(store, feats, values)
    with pytest.raises(FitError) as e:
        fit.fit(cfg, _NoClient())
    message = str(e.value)
    names = [str(x) for x in feats["image"].values[[3, 10, 20]]]
    assert "features/edge2d" in message and "task edge2d" in message and "NaN" in message
    assert all(name in message for name in names)
    assert not store.progress().done_units("fit", "CSI1", "edge2d")


def test_all_constant_features_are_refused(study):
    cfg, store, feats = study
    _write(store, feats, np.ones_like(feats.values))
    with pytest.raises(FitError, match=r"features/edge2d \(task edge2d\): every one of its \d+ features is constant"):
        fit.check_features(cfg, store, store.progress())


def test_constant_columns_are_warned_about(study, caplog):
    cfg, store, feats = study
    values = feats.values.copy()
    values[:, [0, 2]] = 7.0
    _write(store, feats, values)
    with caplog.at_level(logging.WARNING, logger="neurotask"):
        fit.check_features(cfg, store, store.progress())
    assert any("features/edge2d" in r.message and "2 of" in r.message and "constant" in r.message
               for r in caplog.records)


def test_features_lacking_images_are_refused_naming_them(study):
    cfg, store, feats = study
    names = [str(x) for x in feats["image"].values]
    store.write_features("edge2d", feats.values[2:], names[2:])
    with pytest.raises(FitError, match=r"features/edge2d lacks 2 of the subject's \d+ images") as e:
        fit.check_features(cfg, store, store.progress())
    assert names[0] in str(e.value) and names[1] in str(e.value)
