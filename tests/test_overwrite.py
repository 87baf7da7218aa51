"""--overwrite never loses good data to bad input: a failing overwrite leaves the workdir
byte-identical (every file but logs), a successful one equals a fresh run, and a swap
interrupted by a crash is rolled forward by ``storage.staging.recover``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from neurotask.pipeline.errors import DataError
from neurotask.pipeline.stages.ingest import ingest
from neurotask.storage import StudyStore
from neurotask.storage import staging
from bold5000_files import write_glmsingle_subject, write_stim_list
from test_ingest import make_cfg


def workdir_hashes(workdir: Path) -> dict[str, str]:
    """sha256 of every file under ``workdir`` except logs."""
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file() and "logs" not in p.relative_to(workdir).parts}


def _ingested_with_results(tmp_path: Path):
    cfg = make_cfg(tmp_path)
    s = write_glmsingle_subject(cfg, "CSI1")
    ingest(cfg)
    store = StudyStore(cfg.store_path)
    store.ensure_results("CSI1", cfg.tasks[:1], cfg.fit.fingerprint(), task_labels=cfg.tasks[:1])
    store.progress().mark_done("fit", "CSI1", cfg.tasks[0], "00000")
    return cfg, s, store


def test_ingest_overwrite_with_a_duplicated_plain_line_leaves_the_workdir_byte_identical(tmp_path):
    cfg, s, store = _ingested_with_results(tmp_path)
    before = workdir_hashes(cfg.workdir)
    plain = [i for i, line in enumerate(s.lines) if not line.startswith("rep_")]
    lines = list(s.lines)
    lines[plain[1]] = lines[plain[0]]  # same trial count: only the duplicate check can refuse it
    write_stim_list(s.paths["stim"], lines)
    with pytest.raises(DataError, match="showings without"):
        ingest(cfg, overwrite=True)
    assert workdir_hashes(cfg.workdir) == before


def test_ingest_overwrite_failing_while_writing_leaves_the_workdir_byte_identical(tmp_path, monkeypatch):
    cfg, s, store = _ingested_with_results(tmp_path)
    before = workdir_hashes(cfg.workdir)
    original = StudyStore.write_responses

    def failing(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(StudyStore, "write_responses", failing)
    with pytest.raises(OSError, match="No space left"):
        ingest(cfg, overwrite=True)
    monkeypatch.setattr(StudyStore, "write_responses", original)
    assert workdir_hashes(cfg.workdir) == before


def test_ingest_overwrite_equals_a_fresh_run_and_clears_the_old_results(tmp_path):
    cfg, s, store = _ingested_with_results(tmp_path)
    ingest(cfg, overwrite=True)
    assert not store.has("results/CSI1")
    assert not store.progress().is_done("fit", "CSI1", cfg.tasks[0], "00000")
    assert store.progress().is_done("ingest", "CSI1")
    assert not (cfg.workdir / staging.STAGING_STORE).exists()
    assert not (cfg.workdir / staging.JOURNAL).exists()
    fresh_cfg = make_cfg(tmp_path / "fresh")
    write_glmsingle_subject(fresh_cfg, "CSI1")
    ingest(fresh_cfg)
    fresh = StudyStore(fresh_cfg.store_path).responses("CSI1").load()
    new = store.responses("CSI1").load()
    skip = {"stim_list", "voxel_selection"}  # the input files' paths differ between the two workdirs
    xr.testing.assert_identical(new.drop_attrs(), fresh.drop_attrs())
    assert {k: v for k, v in new.attrs.items() if k not in skip} == \
        {k: v for k, v in fresh.attrs.items() if k not in skip}
    # Opening through the consolidated metadata works: they were refreshed after the swap.
    assert xr.open_zarr(str(cfg.store_path), group="responses/CSI1", consolidated=True).sizes == new.sizes


def test_a_swap_interrupted_after_the_first_rename_is_rolled_forward(tmp_path, monkeypatch):
    cfg, s, store = _ingested_with_results(tmp_path)
    old = store.responses("CSI1").load()
    real_rename = os.rename
    calls = []

    def crash_after_first(src, dst):
        real_rename(src, dst)
        calls.append((src, dst))
        raise KeyboardInterrupt("killed mid-swap")

    monkeypatch.setattr(staging.os, "rename", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        ingest(make_cfg(tmp_path, repeats="average"), overwrite=True)
    monkeypatch.setattr(staging.os, "rename", real_rename)
    assert len(calls) == 1 and (cfg.workdir / staging.JOURNAL).is_file()
    assert not store.has("responses/CSI1")  # moved to the trash, the new one not yet in place
    # ingest's cleanup kept the staging store: the journal still needs its staged group.
    assert staging.recover(store) is True
    assert staging.recover(store) is False  # idempotent: nothing left to do
    new = store.responses("CSI1").load()
    assert new.attrs["repeats"] == "average" and old.attrs["repeats"] == "exclude"
    assert not store.has("results/CSI1")
    assert not store.progress().is_done("fit", "CSI1", cfg.tasks[0], "00000")
    assert not (cfg.workdir / staging.TRASH).exists()


# --------------------------------------------------------------------------- import-published, analyse

from neurotask.pipeline.config import load_config  # noqa: E402
from neurotask.pipeline.stages import analyse as analyse_stage  # noqa: E402
from neurotask.pipeline.stages.import_published import import_published  # noqa: E402
from neurotask.pipeline.stats.task_structure import AnalysisError  # noqa: E402
from analysis_fixtures import reference_path, write_config  # noqa: E402

PUBLISHED = reference_path() / "published"


def published_study(tmp_path: Path):
    """A one-subject study with the authors' CSI1 results imported (the npz: 21 tasks)."""
    config = write_config(tmp_path / "study.yaml", {
        "study": {"name": "published", "workdir": str(tmp_path / "work"), "subjects": ["CSI1"]},
        "analysis": {"n_bootstrap": 20, "n_permutations": 50, "n_clusters": 2}})
    cfg = load_config(config)
    import_published(cfg, PUBLISHED)
    return cfg


def test_import_overwrite_with_a_bad_published_file_leaves_the_workdir_byte_identical(tmp_path):
    cfg = published_study(tmp_path)
    before = workdir_hashes(cfg.workdir)
    bad = tmp_path / "bad"
    bad.mkdir()
    good = (PUBLISHED / "CSI1.npz").read_bytes()
    (bad / "CSI1.npz").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DataError, match="CSI1.npz: File is not a zip file"):
        import_published(cfg, bad, overwrite=True)
    assert workdir_hashes(cfg.workdir) == before


def test_import_overwrite_failing_while_writing_leaves_the_workdir_byte_identical(tmp_path, monkeypatch):
    cfg = published_study(tmp_path)
    before = workdir_hashes(cfg.workdir)
    original = StudyStore.write_dataset
    calls = []

    def failing(self, group, ds):
        calls.append(group)
        if len(calls) == 2:  # the ROI results, after the whole-brain ones were written
            raise OSError("No space left on device")
        return original(self, group, ds)

    monkeypatch.setattr(StudyStore, "write_dataset", failing)
    with pytest.raises(OSError, match="No space left"):
        import_published(cfg, PUBLISHED, overwrite=True)
    assert workdir_hashes(cfg.workdir) == before


def test_import_overwrite_equals_a_fresh_import(tmp_path):
    cfg = published_study(tmp_path / "a")
    store = StudyStore(cfg.store_path)
    store.progress().mark_done("fit", "CSI1", "curvature", "00000")  # a fit's marker, now stale
    import_published(cfg, PUBLISHED, overwrite=True)
    fresh = StudyStore(published_study(tmp_path / "b").store_path)
    for group in ("results/CSI1", "roi_results/CSI1"):
        xr.testing.assert_identical(store.read_dataset(group), fresh.read_dataset(group))
    assert not store.progress().is_done("fit", "CSI1", "curvature", "00000")
    assert store.progress().read("import", "CSI1")["fingerprint"] == \
        fresh.progress().read("import", "CSI1")["fingerprint"]
    assert not (cfg.workdir / staging.STAGING_STORE).exists()


def test_analyse_overwrite_failing_leaves_the_workdir_byte_identical(tmp_path, monkeypatch):
    cfg = published_study(tmp_path)
    analyse_stage.run_analysis(cfg)
    before = workdir_hashes(cfg.workdir)

    def failing(*args, **kwargs):
        raise AnalysisError("planted failure")

    monkeypatch.setattr(analyse_stage, "analyse", failing)
    with pytest.raises(analyse_stage.AnalysisStageError, match="planted failure"):
        analyse_stage.run_analysis(cfg, overwrite=True)
    assert workdir_hashes(cfg.workdir) == before
    monkeypatch.undo()

    def failing_write(self, group, ds):
        raise OSError("No space left on device")

    monkeypatch.setattr(StudyStore, "write_dataset", failing_write)
    with pytest.raises(OSError, match="No space left"):
        analyse_stage.run_analysis(cfg, overwrite=True)
    assert workdir_hashes(cfg.workdir) == before


def test_analyse_overwrite_equals_the_first_run(tmp_path):
    cfg = published_study(tmp_path)
    first = analyse_stage.run_analysis(cfg)
    again = analyse_stage.run_analysis(cfg, overwrite=True)
    first.attrs.pop("created"), again.attrs.pop("created")
    xr.testing.assert_identical(first, again)
    assert not (cfg.workdir / staging.STAGING_STORE).exists()
    assert not (cfg.workdir / staging.JOURNAL).exists()


# --------------------------------------------------------------------------- featurize

from neurotask.pipeline.stages.featurize import FAULT_ENV, FeaturizeError, featurize  # noqa: E402
from test_featurize import client, image_study, weights  # noqa: E402,F401  (module fixtures)


@pytest.mark.slow
def test_featurize_overwrite_failing_a_batch_leaves_the_workdir_byte_identical(tmp_path, weights, client):
    cfg = load_config(image_study(tmp_path, weights))
    featurize(cfg, client)
    StudyStore(cfg.store_path).progress().mark_done("fit", "CSI1", cfg.features.space_names[0], "00000")
    before = workdir_hashes(cfg.workdir)
    client.run(lambda: os.environ.__setitem__(FAULT_ENV, "1"))  # batch 1 writes its first space, then fails
    try:
        with pytest.raises(FeaturizeError, match="injected fault"):
            featurize(cfg, client, overwrite=True)
    finally:
        client.run(lambda: os.environ.pop(FAULT_ENV, None))
    assert workdir_hashes(cfg.workdir) == before


@pytest.mark.slow
def test_featurize_overwrite_equals_a_fresh_run(tmp_path, weights, client):
    cfg = load_config(image_study(tmp_path / "a", weights))
    featurize(cfg, client)
    store = StudyStore(cfg.store_path)
    space = cfg.features.space_names[0]
    store.progress().mark_done("fit", "CSI1", space, "00000")  # a fit made with the old features
    featurize(cfg, client, overwrite=True)
    fresh_cfg = load_config(image_study(tmp_path / "b", weights))
    featurize(fresh_cfg, client)
    fresh = StudyStore(fresh_cfg.store_path)
    for name in cfg.features.space_names:
        np.testing.assert_array_equal(store.read_features(name).values, fresh.read_features(name).values)
        assert store.progress().done_units("featurize", name) == fresh.progress().done_units("featurize", name)
        assert store.progress().is_done("featurized", name)
    assert not store.progress().done_units("fit", "CSI1", space)
    assert not (cfg.workdir / staging.STAGING_DIR).exists()
