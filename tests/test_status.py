"""`neurotask status`: every stage (simulate, featurize, ingest or imported results, fit,
analysis, report) from markers and metadata only; imported stores; the running driver's
command from the lock; pairs a running fit has not submitted yet are waiting, not missing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from conftest import small_config_dict, write_config
from neurotask.pipeline import cli
from neurotask.pipeline.config import load_config
from neurotask.pipeline.stages import status
from neurotask.pipeline.stages.status import status_lines
from neurotask.storage import Stage, StudyStore
from neurotask.storage.lock import driver_lock

TASKS = ["edge2d", "keypoint3d", "class_places"]


def tiny_published(folder: Path, seed: int = 0) -> Path:
    """A CSI1.npz in the reference layout (pipeline.formats.published): 3 tasks, 40 voxels in a
    6 x 5 x 4 grid, two ROIs of 5 voxels; the first 10 voxels strongly significant."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((4, 5, 6), bool)  # (z, y, x)
    mask.reshape(-1)[rng.choice(mask.size, 40, replace=False)] = True
    p = rng.uniform(0.2, 1.0, (3, 40)).astype(np.float32)
    p[:, :10] = 1e-9
    r = rng.uniform(0, 0.3, (3, 40)).astype(np.float32)
    arrays = {"tasks": np.array(TASKS), "r": r, "p": p, "r2": r ** 2, "cortical_mask_zyx": mask,
              "roi_names": np.array(["LHPPA", "RHPPA"])}
    for name in ("LHPPA", "RHPPA"):
        arrays[f"roi_r_{name}"] = rng.uniform(0, 0.3, (3, 5)).astype(np.float32)
        arrays[f"roi_p_{name}"] = rng.uniform(0, 1, (3, 5)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "CSI1.npz", **arrays)
    return folder


@pytest.fixture
def imported(tmp_path) -> Path:
    """The config of a study whose results were imported (no responses, no fit)."""
    source = tiny_published(tmp_path / "published")
    config = write_config(tmp_path / "study.yaml", {
        "study": {"name": "imported", "workdir": str(tmp_path / "work"), "subjects": ["CSI1"], "tasks": TASKS}})
    assert cli.main(["import-published", str(source), "--config", str(config)]) == 0
    return config


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """A small simulated study, ingested, nothing fitted."""
    d = tmp_path_factory.mktemp("ingested")
    config = write_config(d / "study.yaml", small_config_dict(d / "work", study={"subjects": ["CSI1"],
                                                                                 "tasks": TASKS}))
    assert cli.main(["simulate", "--config", str(config)]) == 0
    assert cli.main(["ingest", "--config", str(config)]) == 0
    return config


def test_an_imported_store_shows_its_source_and_significant_voxels_not_ingestion(imported, tmp_path):
    lines = status_lines(load_config(imported))
    text = "\n".join(lines)
    assert "not ingested" not in text
    src = (tmp_path / "published" / "CSI1.npz").resolve()
    assert f"CSI1: imported results (source published (npz) {src}), 3 task(s) x 40 voxels" in text
    for task in TASKS:
        line = next(x for x in lines if x.split()[:1] == [task])
        assert line.split()[1:] == ["imported", "10", "significant", "voxels"]
    assert "driver: none" in lines[0]
    assert "simulate: not configured" in text and "featurize: not configured" in text
    assert "analysis: missing (run `neurotask analyse`)" in text
    assert "report: missing (run `neurotask report`)" in text


def test_analysis_and_report_done_then_stale_when_their_inputs_change(imported):
    cfg = load_config(imported)
    store = StudyStore(cfg.store_path)
    store.write_dataset(status.ANALYSIS, xr.Dataset({"x": ("task", np.arange(3.0))}))
    (cfg.workdir / "report").mkdir()
    index = cfg.workdir / "report" / "index.html"
    index.write_text("<html></html>")
    # the import marker older than the analysis, the analysis older than the report
    marker = cfg.workdir / "progress" / Stage.IMPORT / "CSI1.json"
    analysis_meta = cfg.store_path / status.ANALYSIS / "zarr.json"
    now = time.time()
    os.utime(marker, (now - 30, now - 30))
    os.utime(analysis_meta, (now - 20, now - 20))
    os.utime(index, (now - 10, now - 10))
    text = "\n".join(status_lines(cfg))
    assert "analysis: done (written" in text and f"report: done ({index}" in text

    os.utime(marker, (now, now))  # results re-imported after the analysis
    os.utime(analysis_meta, (now - 20, now - 20))
    text = "\n".join(status_lines(cfg))
    assert "analysis: stale" in text and "rerun `neurotask analyse`" in text

    os.utime(analysis_meta, (now + 5, now + 5))  # analysis redone after the report
    text = "\n".join(status_lines(cfg))
    assert "analysis: done" in text
    assert "report: stale" in text and "rerun `neurotask report`" in text


def test_a_held_lock_names_the_running_command_and_unsubmitted_pairs_wait(ingested):
    cfg = load_config(ingested)
    lines = status_lines(cfg)
    text = "\n".join(lines)
    assert "driver: none" in text and "simulate: done (1 subject(s))" in text
    pairs = [line.split() for line in lines if line.startswith("  ") and line.split()[0] in TASKS]
    assert len(pairs) == 3 and all(p[1] == "missing" for p in pairs)

    command = f"neurotask fit --config {ingested} --overwrite"
    with driver_lock(cfg.workdir, command):
        lines = status_lines(cfg)
    text = "\n".join(lines)
    assert f"driver: pid {os.getpid()}" in text and repr(command) in text
    pairs = [line for line in lines if line.startswith("  ") and line.split()[0] in TASKS]
    # no fit run file yet (the driver is still preparing): every unit waits for this run
    assert pairs and all(line.split()[1] == "running" and "waiting to be submitted by this run" in line
                         and "missing" not in line for line in pairs)
    assert "driver: none" in status_lines(cfg)[0]  # released


def test_a_running_featurize_overwrite_is_not_told_to_rerun_featurize(tmp_path):
    images = [f"img{i}.jpg" for i in range(10)]
    config = write_config(tmp_path / "study.yaml", {
        "study": {"name": "feat", "workdir": str(tmp_path / "work"), "subjects": ["CSI1"], "tasks": ["tiny"]},
        "features": {"tasks": [], "batch_size": 4, "images_dir": str(tmp_path / "images"),
                     "extra": [{"name": "tiny", "kind": "torch_module", "factory": "torch.nn:Conv2d",
                                "kwargs": {"in_channels": 3, "out_channels": 4, "kernel_size": 5, "stride": 8},
                                "image_size": 64, "pool": 2}]}})
    cfg = load_config(config)
    store = StudyStore(cfg.store_path)
    store.create()
    store.init_features("tiny", images, 16, 4, attrs={"featurize": "test"})
    store.progress().mark_done(Stage.FEATURIZE, "tiny", "00000")
    text = "\n".join(status_lines(cfg))
    assert "featurize tiny: 1/3 batches done (incomplete: fit refuses it; rerun `neurotask featurize`" in text

    command = f"neurotask featurize --config {config} --overwrite"
    with driver_lock(cfg.workdir, command):
        text = "\n".join(status_lines(cfg))
    assert f"featurize tiny: 1/3 batches done (running: `{command}`)" in text
    assert "rerun" not in text

    # finished, then redone with --overwrite: the stored features look done, but are being redone
    for batch in ("00001", "00002"):
        store.progress().mark_done(Stage.FEATURIZE, "tiny", batch)
    store.progress().mark_done(Stage.FEATURIZED, "tiny")
    assert "featurize: 1/1 feature space(s) done\n" in "\n".join(status_lines(cfg)) + "\n"
    with driver_lock(cfg.workdir, command):
        text = "\n".join(status_lines(cfg))
    assert "featurize: 1/1 feature space(s) done (running)" in text
    assert f"featurize tiny: being recomputed (running: `{command}`)" in text


def test_status_reads_markers_and_metadata_never_the_arrays(imported, ingested, monkeypatch):
    """Every way to open a dataset or array (xarray, zarr) raises: status still answers."""

    def refused(*args, **kwargs):
        raise AssertionError(f"status opened the store's data: {args} {kwargs}")

    for module, name in [(xr, "open_zarr"), (xr, "open_dataset"), (xr, "open_datatree"), (zarr, "open_group"),
                         (zarr, "open_array"), (zarr, "open"), (zarr, "open_consolidated")]:
        monkeypatch.setattr(module, name, refused)
    monkeypatch.setattr(StudyStore, "_open", refused)
    for config in (imported, ingested):
        lines = status_lines(load_config(config))
        assert any(line.startswith("CSI1: ") for line in lines)


def test_the_status_command_prints_every_stage(imported, capsys):
    assert cli.main(["status", "--config", str(imported)]) == 0
    out = capsys.readouterr().out
    for head in ("driver:", "store:", "simulate:", "featurize:", "CSI1: imported results", "analysis:", "report:"):
        assert head in out, out
