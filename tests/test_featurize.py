"""neurotask featurize: images located by name, every feature space per decoded batch on Dask,
region writes then markers, resume, bad images and missing weights reported before any work,
extra feature spaces as study tasks, and the featurize demo config end to end."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml
from distributed import Client, LocalCluster
from PIL import Image

from conftest import ROOT, write_config
from fault_support import kill_after_markers
from neurotask.pipeline import cli
from neurotask.pipeline.config import load_config
from neurotask.pipeline.errors import ConfigError, DataError
from neurotask.pipeline.features.spaces import extract_batch
from neurotask.pipeline.stages.featurize import (FAULT_ENV, FeaturizeError, featurize, load_space,
                                make_batches, study_feature_spaces, torch_threads_per_worker,
                                use_channels_last)
from neurotask.pipeline.features.images import find_images, locate_images, study_images, subfolder_for, write_synthetic_images
from neurotask.pipeline.features.preprocess import decode_images
from neurotask.pipeline.stages.simulate import image_names
from neurotask.pipeline.stages.status import status_lines
from neurotask.pipeline.features.weights import write_random_checkpoints
from neurotask.storage import Stage, StudyStore

TASK = "colorization"  # one channel (L of Lab): the input rule that differs most
TINY = {"name": "tiny_conv", "kind": "torch_module", "factory": "torch.nn:Conv2d",
        "kwargs": {"in_channels": 3, "out_channels": 4, "kernel_size": 5, "stride": 8},
        "image_size": 64, "pool": 2}  # a second input size; randomly initialised (seeded by name)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("weights")
    write_random_checkpoints(d, [TASK, "edge2d"], seed=5)
    return d


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        yield c


def image_study(tmp: Path, weights: Path, n_images: int = 10, *, tasks: list[str] = (TASK,),
                extra: list[dict] = (TINY,), batch_size: int = 4, write: bool = True, **features) -> Path:
    """A one-subject study whose stimulus list names ``n_images`` synthetic images (one shown
    twice, with BOLD5000's rep_ prefix); no responses (featurize reads only the images)."""
    names = image_names(n_images, np.random.default_rng(n_images))
    lines = names[:3] + ["rep_" + names[1]] + names[3:]
    (tmp / "stim.txt").parent.mkdir(parents=True, exist_ok=True)
    (tmp / "stim.txt").write_text("\n".join(lines) + "\n")
    if write:
        write_synthetic_images(tmp / "images", names, seed=1)
    cfg = {
        "study": {"name": "img", "workdir": str(tmp / "work"), "subjects": ["CSI1"],
                  "tasks": list(tasks) + [e["name"] for e in extra]},
        "data": {"stim_list": str(tmp / "stim.txt")},
        "features": {"weights_dir": str(weights), "tasks": list(tasks), "extra": list(extra),
                     "images_dir": str(tmp / "images"), "batch_size": batch_size,
                     # CPU with one torch thread, as this test process (conftest): the same sums
                     # in the workers on any machine; cuda is opt-in
                     "device": "cpu", "torch_threads": 1, **features},
        "cluster": {"kind": "local", "n_workers": 1, "dashboard_address": "127.0.0.1:0"},
    }
    return write_config(tmp / "study.yaml", cfg)


def direct_features(cfg, batch_size: int) -> dict[str, np.ndarray]:
    """The same features by extract_batch alone, in this process, batch by batch."""
    spaces = study_feature_spaces(cfg)
    cpu = torch.device("cpu")
    extractors = [load_space(s, cpu, use_channels_last(cfg.features.channels_last, cpu)) for s in spaces]
    images = study_images(cfg)
    paths = locate_images(cfg.features.images_dir, images)
    out: dict[str, list[np.ndarray]] = {s.name: [] for s in spaces}
    for b in make_batches(len(images), batch_size):
        names = images[b.start:b.stop]
        feats = extract_batch(decode_images([paths[n] for n in names], names), names, extractors)
        for k, v in feats.items():
            out[k].append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def stored(cfg) -> dict[str, np.ndarray]:
    store = StudyStore(cfg.store_path)
    return {name: store.read_features(name).values for name in cfg.features.space_names}


def marker_times(cfg) -> dict[tuple[str, str], int]:
    d = cfg.workdir / "progress" / Stage.FEATURIZE
    return {(p.parent.name, p.stem): p.stat().st_mtime_ns for p in d.rglob("*.json")}


@pytest.fixture(scope="module")
def featurized(tmp_path_factory, weights, client) -> Path:
    """A small image study featurized once (10 images, batches of 4: the last one partial)."""
    path = image_study(tmp_path_factory.mktemp("featurized"), weights)
    report = featurize(load_config(path), client)
    assert report.batches == 3 and report.computed == 6 and report.skipped == 0
    assert report.devices == {"cpu"}
    return path


# ---------------------------------------------------------------- images


def test_bold5000_image_names_map_to_their_subfolders(reference_dir):
    from neurotask.pipeline.formats.bold5000 import read_stim_list

    names = {str(x) for x in read_stim_list(reference_dir / "bold5000/stim_lists/CSI01_stim_lists.txt").images}
    # BOLD5000's 4916 images: 2000 COCO, 1916 ImageNet and 1000 Scene images
    assert Counter(subfolder_for(n) for n in names) == {"COCO": 2000, "ImageNet": 1916, "Scene": 1000}


def test_images_are_found_in_any_subfolder_and_all_missing_are_listed(tmp_path):
    (tmp_path / "COCO").mkdir()
    (tmp_path / "Scene").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "Scene" / "COCO_train2014_000000000001.jpg")  # wrong folder: fine
    Image.new("RGB", (40, 40)).save(tmp_path / "COCO" / "Beach1.JPG")  # other case: fine
    Image.new("RGB", (40, 40)).save(tmp_path / "top.jpg")
    found = locate_images(tmp_path, ["COCO_train2014_000000000001.jpg", "beach1.jpg", "top.jpg"])
    assert found["beach1.jpg"] == tmp_path / "COCO" / "Beach1.JPG"
    with pytest.raises(DataError) as e:
        locate_images(tmp_path, ["top.jpg", "gone1.jpg", "n01440764_10026.JPEG"])
    assert "2 of the study's 3 images" in str(e.value)
    assert "gone1.jpg" in str(e.value) and "n01440764_10026.JPEG" in str(e.value)
    Image.new("RGB", (40, 40)).save(tmp_path / "Scene" / "top.jpg")
    assert "match several files" in find_images(tmp_path, ["top.jpg"])[1]


def test_synthetic_images_follow_the_study_names_with_grey_and_cmyk(tmp_path):
    names = image_names(20, np.random.default_rng(0))
    paths = write_synthetic_images(tmp_path, names, seed=0)
    modes = Counter()
    for name, p in paths.items():
        assert p == tmp_path / subfolder_for(name) / name
        with Image.open(p) as img:
            modes[img.mode] += 1
            assert img.format == "JPEG" and min(img.size) >= 256
    assert modes == {"RGB": 17, "L": 2, "CMYK": 1}


def test_study_images_are_the_stimulus_list_images_once_in_order(tmp_path, weights):
    cfg = load_config(image_study(tmp_path, weights, write=False))
    names = image_names(10, np.random.default_rng(10))
    assert study_images(cfg) == names  # rep_ line dropped, first-showing order


# ---------------------------------------------------------------- the orchestrated run


@pytest.mark.slow
def test_stored_features_equal_extract_batch_run_directly(featurized):
    cfg = load_config(featurized)
    got, want = stored(cfg), direct_features(cfg, batch_size=4)
    for name in cfg.features.space_names:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert got[TASK].shape == (10, 2048) and got["tiny_conv"].shape == (10, 16)
    store = StudyStore(cfg.store_path)
    feats = store.read_features(TASK)
    assert list(feats["image"].values) == study_images(cfg)
    attrs = store.feature_attrs(TASK)
    checkpoint = next(p.name for p in Path(cfg.features.weights_dir).glob("colorization_encoder-*.pth"))
    assert attrs["checkpoint"] == checkpoint and attrs["kind"] == "taskonomy" and attrs["n_features"] == 2048
    assert attrs["featurize"]["images"] == 10 and attrs["featurize"]["batch_size"] == 4
    assert store.feature_attrs("tiny_conv")["factory"] == "torch.nn:Conv2d"
    progress = store.progress()
    for name in cfg.features.space_names:
        assert progress.done_units(Stage.FEATURIZE, name) == {"00000", "00001", "00002"}
        assert progress.is_done(Stage.FEATURIZED, name)


@pytest.mark.slow
def test_rerun_does_nothing_and_an_added_space_is_computed_alone(featurized, tmp_path, client):
    shutil.copytree(featurized.parent, tmp_path, dirs_exist_ok=True)
    raw = yaml.safe_load(featurized.read_text())
    raw["study"]["workdir"] = str(tmp_path / "work")
    path = write_config(tmp_path / "study.yaml", raw)
    cfg = load_config(path)
    before = marker_times(cfg)
    report = featurize(cfg, client)
    assert (report.batches, report.computed, report.skipped) == (0, 0, 6)

    wider = dict(TINY, name="wider_conv", kwargs=dict(TINY["kwargs"], out_channels=6))
    raw["features"]["extra"].append(wider)
    raw["study"]["tasks"].append("wider_conv")
    cfg = load_config(write_config(path, raw))
    report = featurize(cfg, client)
    assert (report.batches, report.computed, report.skipped) == (3, 3, 6)
    after = marker_times(cfg)
    assert {k: after[k] for k in before} == before  # nothing done before was redone
    assert StudyStore(cfg.store_path).read_features("wider_conv").shape == (10, 24)


@pytest.mark.slow
def test_failed_batch_is_named_and_the_rerun_does_only_it(tmp_path, weights, client, featurized):
    cfg = load_config(image_study(tmp_path, weights))
    client.run(lambda: os.environ.__setitem__(FAULT_ENV, "1"))  # batch 1 writes its first space, then fails
    try:
        with pytest.raises(FeaturizeError, match=r"batch 1 \(images 4-7\).*injected fault"):
            featurize(cfg, client)
    finally:
        client.run(lambda: os.environ.pop(FAULT_ENV, None))
    progress = StudyStore(cfg.store_path).progress()
    for name in cfg.features.space_names:
        assert progress.done_units(Stage.FEATURIZE, name) == {"00000", "00002"}
        assert not progress.is_done(Stage.FEATURIZED, name)
    before = marker_times(cfg)
    report = featurize(cfg, client)
    assert (report.batches, report.computed, report.skipped) == (1, 2, 4)
    after = marker_times(cfg)
    assert {k: after[k] for k in before} == before
    assert "featurize " not in "\n".join(status_lines(cfg))  # finished: no incomplete lines
    ref = stored(load_config(featurized))  # the same images, featurized without interruption
    for name, values in stored(cfg).items():
        np.testing.assert_array_equal(values, ref[name], err_msg=name)


@pytest.mark.slow
def test_killed_featurize_resumes_with_only_missing_batches(tmp_path, weights, client, featurized):
    """SIGKILL `neurotask featurize` (driver and its local worker) once a batch is done; the
    rerun computes only unmarked (space, batch) pairs, and the features equal an
    uninterrupted run's."""
    path = image_study(tmp_path, weights)
    cfg = load_config(path)
    kill_after_markers(["featurize", "--config", str(path)], cfg.workdir / "progress" / Stage.FEATURIZE, 2,
                       tmp_path / "featurize.log")
    before = marker_times(cfg)
    done_pairs = len(before)
    assert 2 <= done_pairs < 6  # 3 batches x 2 spaces
    shown = "\n".join(status_lines(cfg))
    for name in cfg.features.space_names:
        n_done = sum(1 for (space, _) in before if space == name)
        if n_done < 3:
            assert f"featurize {name}: {n_done}/3 batches done (incomplete" in shown, shown
    report = featurize(cfg, client)
    assert report.skipped == done_pairs and report.computed == 6 - done_pairs
    after = marker_times(cfg)
    assert {k: after[k] for k in before} == before
    assert "featurize " not in "\n".join(status_lines(cfg))  # finished: no incomplete lines
    ref = stored(load_config(featurized))
    for name, values in stored(cfg).items():
        np.testing.assert_array_equal(values, ref[name], err_msg=name)


# ---------------------------------------------------------------- failing before any work


def _nothing_done(cfg) -> None:
    store = StudyStore(cfg.store_path)
    assert not store.exists() or store.feature_tasks() == []
    assert not (cfg.workdir / "progress" / Stage.FEATURIZE).exists()


@pytest.mark.slow
def test_missing_weights_fail_before_any_work_listing_every_task(tmp_path, weights, client, capsys):
    partial = tmp_path / "weights"
    partial.mkdir()
    for p in weights.glob("edge_texture_encoder-*.pth"):
        shutil.copy(p, partial / p.name)
    path = image_study(tmp_path, partial, tasks=["edge2d", TASK, "rgb2depth"])
    cfg = load_config(path)
    with pytest.raises(FeaturizeError) as e:
        featurize(cfg, client)
    msg = str(e.value)
    assert "2 Taskonomy encoder checkpoint(s) missing" in msg
    assert "colorization (colorization): missing" in msg and "rgb2depth (depth_zbuffer): missing" in msg
    assert "edge2d (" not in msg
    assert "https://github.com/alexsax/visual-prior/raw/networks/assets/pytorch/depth_zbuffer_encoder-" in msg
    _nothing_done(cfg)
    assert cli.main(["featurize", "--config", str(path)]) == 2  # the CLI: one message, no traceback
    err = capsys.readouterr().err
    assert err.startswith("neurotask: error:") and "rgb2depth" in err and "Traceback" not in err


@pytest.mark.slow
def test_bad_images_are_reported_by_name(tmp_path, weights, client):
    path = image_study(tmp_path, weights, n_images=12, min_image_side=64)
    cfg = load_config(path)
    names = study_images(cfg)
    paths = locate_images(cfg.features.images_dir, names)
    Image.new("RGB", (48, 300)).save(paths[names[2]], format="JPEG")  # too small
    paths[names[5]].write_bytes(b"not an image at all")  # unreadable
    paths[names[7]].unlink()  # missing
    Image.new("F", (80, 80)).save(paths[names[3]].with_suffix(".tif"))
    paths[names[3]].unlink()
    paths[names[3]].with_suffix(".tif").rename(paths[names[3]])  # 32-bit float pixels
    with pytest.raises(FeaturizeError) as e:
        featurize(cfg, client)
    msg = str(e.value)
    assert "1 of the study's 12 images are not in" in msg and names[7] in msg
    assert f"{names[2]}: too small: 48x300 pixels, the minimum side is 64" in msg
    assert f"{names[5]}: unreadable" in msg
    assert f"{names[3]}: unsupported pixel mode 'F'" in msg
    assert "3 image(s) cannot be used" in msg
    _nothing_done(cfg)

    # Fixed, but one JPEG truncated: its header passes, decoding fails in its batch only.
    write_synthetic_images(cfg.features.images_dir, names, seed=1)
    data = paths[names[6]].read_bytes()
    paths[names[6]].write_bytes(data[: len(data) // 2])
    with pytest.raises(FeaturizeError, match=rf"1 image\(s\) cannot be used:\n  {names[6]}: unreadable"):
        featurize(cfg, client)
    progress = StudyStore(cfg.store_path).progress()
    assert progress.done_units(Stage.FEATURIZE, TASK) == {"00000", "00002"}  # batch 1 (images 4-7) not done
    # The CMYK image (batch 0) and the greyscale one (batch 2) were converted, as the task bank did.
    with Image.open(paths[names[1]]) as cmyk, Image.open(paths[names[9]]) as grey:
        assert (cmyk.mode, grey.mode) == ("CMYK", "L")


@pytest.mark.slow
def test_unavailable_device_fails_before_any_work(tmp_path, weights, client):
    if torch.cuda.is_available():
        pytest.skip("this check needs a machine without CUDA")
    cfg = load_config(image_study(tmp_path, weights, device="cuda"))
    with pytest.raises(FeaturizeError, match=r"features.device 'cuda' on the workers: .*CUDA is not available"):
        featurize(cfg, client)
    _nothing_done(cfg)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_features_equal_the_cpu_features(featurized, tmp_path, weights, client):
    # Runs where a GPU is (scripts/gpu_check): true float32 on the card, so the features agree
    # with the CPU's to float32 round-off, not TF32's ~1e-3.
    cfg = load_config(image_study(tmp_path, weights, device="cuda"))
    report = featurize(cfg, client)
    assert report.devices == {"cuda"}
    got, want = stored(cfg), stored(load_config(featurized))
    for name in cfg.features.space_names:
        scale = float(np.abs(want[name]).max())
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@pytest.mark.slow
def test_other_stored_features_are_refused_and_overwrite_replaces_them(tmp_path, weights, client):
    cfg = load_config(image_study(tmp_path, weights, tasks=[]))
    store = StudyStore(cfg.store_path)
    store.create()
    images = study_images(cfg)
    store.write_features("tiny_conv", np.zeros((len(images), 3)), images, attrs={"source": "simulated"})
    progress = store.progress()
    progress.mark_done("fit", "CSI1", "tiny_conv", "00000")  # a fit made with the old features
    with pytest.raises(FeaturizeError, match=r"(?s)features/tiny_conv holds simulated features.*--overwrite"):
        featurize(cfg, client)
    report = featurize(cfg, client, overwrite=True)
    assert report.computed == 3
    assert store.read_features("tiny_conv").shape == (10, 16)
    assert not progress.done_units("fit", "CSI1", "tiny_conv")  # that fit is redone next time


# ---------------------------------------------------------------- threads and config


@pytest.mark.slow
def test_torch_threads_times_tasks_fit_the_cores(client):
    threads = torch_threads_per_worker(client)
    info = client.scheduler_info()["workers"]
    cores = len(os.sched_getaffinity(0))
    assert set(threads) == set(info)
    assert sum(threads[a] * info[a]["nthreads"] for a in info) <= max(cores, len(info))
    assert all(t >= 1 for t in threads.values())


def test_extra_feature_spaces_are_study_tasks(tmp_path, weights):
    path = image_study(tmp_path, weights, write=False)
    raw = yaml.safe_load(path.read_text())
    raw["study"]["tasks"] = "all"
    cfg = load_config(write_config(path, raw))
    assert cfg.tasks[-1] == "tiny_conv" and len(cfg.tasks) == 22
    raw["study"]["tasks"] = ["edge2d", "nonexistent"]
    with pytest.raises(ConfigError, match=r"study.tasks: unknown task\(s\) nonexistent.*tiny_conv"):
        load_config(write_config(path, raw))
    raw["study"]["tasks"] = ["edge2d"]
    raw["features"]["extra"] = [dict(TINY, name="edge2d")]
    with pytest.raises(ConfigError, match=r"features.extra\[0\].name 'edge2d' is a Taskonomy task name"):
        load_config(write_config(path, raw))
    raw["features"]["extra"] = [dict(TINY, factory="torch.nn:NoSuchModule")]
    with pytest.raises(ConfigError, match=r"study.yaml: features.extra\[0\].factory.*NoSuchModule"):
        load_config(write_config(path, raw))
    raw["features"] = {"weights_dir": "w", "tasks": ["edge2d"], "extra": [dict(TINY, state_dict="sd/tiny.pt")]}
    cfg = load_config(write_config(path, raw))  # relative paths: to the config file
    mapping = cfg.features.spaces_mapping(cfg.resolve)
    assert mapping["weights_dir"] == str(path.parent / "w")
    assert mapping["extra"][0]["state_dict"] == str(path.parent / "sd" / "tiny.pt")
    raw["features"] = {"tasks": ["edge2d"], "batch_size": 0}
    with pytest.raises(ConfigError, match="features.batch_size must be >= 1"):
        load_config(write_config(path, raw))
    raw["features"] = {"tasks": ["edge2d"]}
    with pytest.raises(ConfigError, match="features.weights_dir"):
        load_config(write_config(path, raw))
    raw["features"] = {"weights_dir": "w", "colour": True}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) features.colour"):
        load_config(write_config(path, raw))


# ---------------------------------------------------------------- the demo config, end to end


@pytest.mark.slow
def test_featurize_demo_config_runs_end_to_end(tmp_path, capsys):
    """configs/featurize_demo.yaml: simulate (images and random encoders in the official
    format) -> featurize with the real encoders -> ingest -> fit, results for every task."""
    raw = yaml.safe_load((ROOT / "configs" / "featurize_demo.yaml").read_text())
    raw["study"]["workdir"] = str(tmp_path / "work")
    raw["features"]["weights_dir"] = str(tmp_path / "work" / "weights")
    raw["cluster"]["dashboard_address"] = "127.0.0.1:0"
    path = write_config(tmp_path / "featurize_demo.yaml", raw)
    assert cli.main(["run", "--config", str(path)]) == 0
    cfg = load_config(path)
    store = StudyStore(cfg.store_path)
    assert sorted(store.feature_tasks()) == sorted(cfg.tasks)  # featurized, none simulated
    files = {p.name for p in (cfg.workdir / "weights").glob("*.pth")}
    for task in cfg.features.tasks:
        attrs = store.feature_attrs(task)
        assert attrs["checkpoint"] in files and attrs["featurize"]["images"] == raw["simulate"]["n_images"]
    for name in cfg.tasks:
        assert not np.isnan(store.read_features(name).values).any()
    results = store.results("CSI1")
    assert list(results["task"].values) == cfg.tasks
    assert np.isfinite(results["r"].values).mean() > 0.99
    progress = store.progress()
    assert all(progress.is_done(Stage.FEATURIZED, name) for name in cfg.tasks)
    capsys.readouterr()
    assert cli.main(["featurize", "--config", str(path)]) == 0  # finished: no cluster, no hashing
    assert "features already computed for every feature space and image, skipped" in capsys.readouterr().out


def test_analysis_accepts_an_extra_feature_space_beside_taskonomy_tasks():
    """Downstream of fit, an extra space is one more task: labelled by its name, in no
    Taskonomy cluster, left out of the Taskonomy comparison, which the others still get."""
    from neurotask.pipeline.stats.task_structure import analyse

    tasks = ["edge2d", "keypoint2d", "rgb2depth", "class_1000", "random_conv"]
    rng = np.random.default_rng(0)
    results = {}
    for subject in ("CSI1", "CSI2"):
        r = rng.uniform(0.0, 0.4, (len(tasks), 300))
        results[subject] = xr.Dataset(
            {"r": (("task", "voxel"), r), "pvalue": (("task", "voxel"), 10 ** (-20 * r))},
            coords={"task": tasks, "voxel": np.arange(300), "roi": ("voxel", np.repeat(["LHPPA", "LHLOC", ""], 100))})
    out = analyse(results, n_permutations=20, n_bootstrap=10)
    assert list(out["task"].values) == tasks
    assert out["taskonomy_cluster"].sel(task="random_conv").item() == ""
    assert np.isnan(out["taskonomy_similarity"].sel(task="random_conv").values).all()
    assert np.isfinite(out["taskonomy_similarity"].sel(task="edge2d", task2="rgb2depth").item())
    assert np.isfinite(out["spearman_taskonomy_mean"].item())
    assert np.isfinite(out["similarity_mean"].sel(task="random_conv").values).all()
