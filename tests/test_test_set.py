"""The split by image identity (fit.test_set): the same test images and folds for every
subject that saw them, whatever their presentation order; NSD's shared images as the common
test set; the first versions' draw by position kept for the stores it made."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from neurotask.pipeline import cli, ridge
from neurotask.pipeline.config import FitSection, load_config
from neurotask.pipeline.errors import ConfigError
from neurotask.pipeline.stages import fit
from neurotask.storage import StudyStore

from conftest import ROOT, small_config_dict, write_config


def names(n: int) -> list[str]:
    return [f"COCO_train2014_{i:012d}.jpg" for i in range(n)]


def by_name(images: list[str], splits: ridge.Splits) -> tuple[set, list[tuple[frozenset, frozenset]]]:
    arr = np.array(images)
    return set(arr[splits.test]), [(frozenset(arr[f.fit]), frozenset(arr[f.validation])) for f in splits.folds]


def test_split_by_name_ignores_the_order_of_the_rows():
    images = names(500)
    perm = [images[i] for i in np.random.default_rng(0).permutation(500)]
    a = ridge.splits_by_name(images, test_fraction=0.15, n_folds=7, seed=3)
    b = ridge.splits_by_name(perm, test_fraction=0.15, n_folds=7, seed=3)
    assert by_name(images, a) == by_name(perm, b)
    assert len(a.test) == 500 - ridge.n_training(500, 0.15) == 75
    # a partition of the rows: test + train; each fold's validation rows partition train
    assert np.array_equal(np.sort(np.concatenate([a.test, a.train])), np.arange(500))
    assert np.array_equal(np.sort(np.concatenate([f.validation for f in a.folds])), a.train)
    for f in a.folds:
        assert np.array_equal(np.sort(np.concatenate([f.fit, f.validation])), a.train)
    # another seed draws other images
    c = ridge.splits_by_name(images, test_fraction=0.15, n_folds=7, seed=4)
    assert by_name(images, c)[0] != by_name(images, a)[0]


def test_a_subject_with_other_images_tests_on_the_common_ones_it_saw():
    # subject 2 saw 450 of subject 1's images and 50 of its own: the common images it saw are
    # in the test set exactly when they are in subject 1's (the draw is a function of the name)
    images = names(500)
    other = images[:450] + [f"n{i:08d}_1.JPEG" for i in range(50)]
    a, b = ridge.splits_by_name(images, n_folds=5, seed=0), ridge.splits_by_name(other, n_folds=5, seed=0)
    common = set(images) & set(other)
    test_a = set(np.array(images)[a.test]) & common
    test_b = set(np.array(other)[b.test]) & common
    assert abs(len(test_a ^ test_b)) <= 15  # only the ranks near the cut-off may differ
    assert len(test_a & test_b) >= 0.9 * min(len(test_a), len(test_b))


def test_explicit_test_set_and_its_errors():
    images = names(60)
    mask = np.zeros(60, dtype=bool)
    mask[[3, 10, 59]] = True
    s = ridge.splits_by_name(images, test=mask, n_folds=4)
    assert s.test.tolist() == [3, 10, 59] and s.train.size == 57
    with pytest.raises(ValueError, match="some but not all"):
        ridge.splits_by_name(images, test=np.zeros(60, bool), n_folds=4)
    with pytest.raises(ValueError, match=r"\(60,\) boolean mask"):
        ridge.splits_by_name(images, test=mask[:10], n_folds=4)
    with pytest.raises(ValueError, match="unique"):
        ridge.splits_by_name(images[:-1] + images[:1], n_folds=4)


def test_test_set_kinds():
    images = np.array(names(200))
    shared = np.zeros(200, dtype=bool)
    shared[:40] = True
    auto = FitSection(n_folds=5)
    assert fit.test_set_kind(auto, shared) == "shared" and fit.test_set_kind(auto, None) == "random"
    assert fit.splits_for(auto, images, shared).test.tolist() == list(range(40))
    # position: the first versions' split, bit for bit (stores made with it still resume)
    pos = FitSection(n_folds=5, test_set="position")
    old = ridge.make_splits(200, test_fraction=0.15, n_folds=5, seed=pos.seed)
    new = fit.splits_for(pos, images)
    assert np.array_equal(old.test, new.test) and all(
        np.array_equal(x.validation, y.validation) for x, y in zip(old.folds, new.folds))
    with pytest.raises(ValueError, match="pass the names"):
        fit.splits_for(auto, 200)
    with pytest.raises(Exception, match="'shared' needs the common test set"):
        fit.splits_for(FitSection(n_folds=5, test_set="shared"), images, None)
    # fingerprint: test_set is stored; test_fraction is not where it is not used
    assert auto.fingerprint()["test_set"] == "auto"
    assert "test_fraction" not in FitSection(test_set="shared").fingerprint()


def test_bold5000_subjects_test_on_the_same_images(small_study):
    cfg = load_config(small_study)
    store = StudyStore(cfg.store_path)
    tests = {}
    for subject in cfg.study.subjects:
        images = store.responses(subject)["image"].values
        tests[subject] = (list(images), set(images[fit.subject_splits(cfg.fit, store, subject).test]))
    (o1, t1), (o2, t2) = tests.values()
    assert o1 != o2  # presentation orders differ ...
    assert t1 == t2 and len(t1) == 45  # ... the test images do not


def test_a_store_of_the_first_versions_resumes_only_with_test_set_position(small_study, tmp_path, capsys):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(load_config(small_study).workdir, work)
    store = StudyStore(work / "store.zarr")
    import zarr

    for subject in ("CSI1", "CSI2"):
        group = zarr.open_group(str(store.path / "results" / subject), mode="r+")
        params = dict(group.attrs["fit"])
        params.pop("test_set")  # as the first versions stored it
        group.attrs["fit"] = params
    store.consolidate()
    raw = small_config_dict(work)
    path = write_config(tmp_path / "study.yaml", raw)
    assert cli.main(["fit", "--config", str(path)]) == 2
    assert "fit.test_set 'position' resumes them" in capsys.readouterr().err
    raw["fit"]["test_set"] = "position"
    path = write_config(tmp_path / "study.yaml", raw)
    assert cli.main(["fit", "--config", str(path)]) == 0


def test_nsd_subjects_test_on_the_shared_images(tmp_path, logs):
    from neurotask.pipeline.stages.ingest import ingest
    from neurotask.pipeline.stages.simulate_nsd import simulate_nsd_study

    raw = yaml.safe_load((ROOT / "configs" / "nsd_demo.yaml").read_text())
    raw["study"].update(workdir=str(tmp_path / "work"), subjects=["subj01", "subj02"], tasks=["edge2d", "class_places"])
    raw["simulate"].update(n_images=100, n_shared=30, n_features=16, volume_shape=[12, 12, 8])
    raw["data"]["root"] = str(tmp_path / "work" / "raw" / "nsd")
    raw.pop("features", None)
    raw["simulate"].pop("write_weights", None)  # the demo's random encoders are for its features section
    raw["analysis"]["n_clusters"] = 2
    cfg = load_config(write_config(tmp_path / "nsd.yaml", raw))
    simulate_nsd_study(cfg)
    ingest(cfg)
    store = StudyStore(cfg.store_path)
    tests = []
    for subject in cfg.study.subjects:
        resp = store.responses(subject)
        splits = fit.subject_splits(cfg.fit, store, subject)
        assert np.array_equal(splits.test, np.flatnonzero(resp["shared"].values))
        tests.append(set(resp["image"].values[splits.test]))
    assert tests[0] == tests[1] and len(tests[0]) > 0
    fit.check_splits(cfg)
    assert any("test set (shared)" in m and "the same for all 2 subjects" in m for m in logs)
    # 'shared' where the data mark none is a config error before any work
    bold = load_config(write_config(tmp_path / "b.yaml", small_config_dict(tmp_path / "b", fit={"test_set": "shared"})))
    from neurotask.pipeline.stages.simulate import simulate_study

    simulate_study(bold)
    ingest(bold)
    with pytest.raises(ConfigError, match="CSI1: fit.test_set 'shared' needs the common test set"):
        fit.check_splits(bold)


def test_subjects_who_saw_the_same_images_share_decompositions_bit_for_bit(small_study, tmp_path, logs):
    """The small study's two subjects saw the same 300 images in other orders: one design (rows
    sorted by name), one decomposition per task for both, and each subject's results equal, bit
    for bit, those of a fit of that subject alone."""
    import shutil

    cfg = load_config(small_study)
    store = StudyStore(cfg.store_path)
    r1, r2 = (fit.design_rows(cfg.fit, store, s) for s in ("CSI1", "CSI2"))
    images = {s: store.responses(s)["image"].values for s in ("CSI1", "CSI2")}
    assert r1.key == r2.key and not np.array_equal(images["CSI1"], images["CSI2"])
    assert np.array_equal(images["CSI1"][r1.order], images["CSI2"][r2.order])
    # grouping: one decomposition per task, its pairs in order
    groups = fit.share_decompositions([("CSI1", "a", [1]), ("CSI1", "b", [2]), ("CSI2", "a", [3])],
                                      {"CSI1": "k", "CSI2": "k"})
    assert list(groups) == [("a", "k", [("CSI1", [1]), ("CSI2", [3])]), ("b", "k", [("CSI1", [2])])]
    assert len(fit.share_decompositions([("CSI1", "a", [1]), ("CSI2", "a", [3])], {"CSI1": "k", "CSI2": "j"})) == 2
    # 'position' keeps each subject's own order and design
    pos = FitSection(test_set="position", n_folds=5)
    assert fit.design_rows(pos, store, "CSI1").order is None
    assert fit.design_rows(pos, store, "CSI1").key != fit.design_rows(pos, store, "CSI2").key

    # CSI2 fitted alone, in a copy of the study
    work = tmp_path / "work"
    shutil.copytree(cfg.workdir, work)
    raw = small_config_dict(work)
    raw["study"]["subjects"] = ["CSI2"]
    path = write_config(tmp_path / "alone.yaml", raw)
    logs.clear()
    assert cli.main(["fit", "--config", str(path), "--overwrite"]) == 0
    assert not any("decompositions for" in m for m in logs)  # one subject: nothing shared
    alone, shared = StudyStore(work / "store.zarr").results("CSI2"), store.results("CSI2")
    for name in ("r", "r2", "alpha", "pvalue", "pvalue_perm", "significant"):
        np.testing.assert_array_equal(alone[name].values, shared[name].values, err_msg=name)


def test_the_shared_fit_logs_its_decompositions(tmp_path, logs):
    raw = small_config_dict(tmp_path / "w", study={"tasks": ["edge2d", "keypoint3d"]}, fit={"n_permutations": 0})
    path = write_config(tmp_path / "s.yaml", raw)
    for stage in ("simulate", "ingest", "fit"):
        assert cli.main([stage, "--config", str(path)]) == 0
    assert any("fit: 2 decompositions for 4 (subject, task) pairs" in m for m in logs)
