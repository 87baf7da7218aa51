"""Checkpoint discovery, sha256 verification, safe loading and random stand-ins."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from neurotask.pipeline.features.encoders import build_encoder, task_in_channels
from neurotask.pipeline.tasks import task_info, task_names
from neurotask.pipeline.features.weights import (OFFICIAL_ENCODER_SHA256, WEIGHTS_URL_TEMPLATE, WeightsError, check_weights,
                              checkpoint_filename, find_checkpoint, load_state_dict, load_taskonomy_encoder,
                              name_digest, official_filename, official_url, verify_checkpoint, write_random_checkpoints)

TASKS = ["colorization", "rgb2sfnorm"]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    return write_random_checkpoints(tmp_path_factory.mktemp("weights"), TASKS, seed=0)


@pytest.fixture
def weights_dir(written, tmp_path) -> Path:
    """A private view of the written checkpoints: hard links (cheap); a test that damages a
    file must replace it (``_overwrite``), never write into the shared inode."""
    d = tmp_path / "w"
    d.mkdir()
    for p in written.values():
        try:
            os.link(p, d / p.name)
        except OSError:
            shutil.copy(p, d / p.name)
    return d


def _overwrite(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_random_checkpoints_use_the_official_format(written):
    assert list(written) == TASKS
    for task, path in written.items():
        m = re.fullmatch(r"(.+)_encoder-([0-9a-f]{64})\.pth", path.name)
        assert m and m.group(1) == task_info(task).visualpriors
        assert m.group(2) == _sha256(path)  # the full digest of the bytes
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert set(ckpt) == {"state_dict"}
        assert {k: v.shape for k, v in ckpt["state_dict"].items()} == \
               {k: v.shape for k, v in build_encoder(task).state_dict().items()}
        umask = os.umask(0)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any written file, not mkstemp's 0600


@pytest.mark.slow  # 20 checkpoints of 95 MB
def test_random_checkpoints_load_into_the_port_for_rgb_tasks(written, tmp_path):
    """Every RGB task's random checkpoint (every task but colorization) has the file name the
    visualpriors port gives that task's weights and loads into the port's encoder strictly,
    every tensor as written; colorization's (one input channel) does not fit it."""
    port_module = pytest.importorskip("visualpriors.taskonomy_network")
    rgb = [t for t in task_names() if task_in_channels(t) == 3]
    assert "colorization" not in rgb and len(rgb) == len(task_names()) - 1 == 20
    port_files = set(port_module.TASKONOMY_PRETRAINED_WEIGHT_FILES)
    for task in rgb:
        path = write_random_checkpoints(tmp_path, [task], seed=0)[task]
        assert official_filename(task) in port_files, task
        assert path.name.split("-")[0] == official_filename(task).split("-")[0], (task, path.name)
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        port = port_module.TaskonomyEncoder()
        incompatible = port.load_state_dict(state, strict=True)
        assert (incompatible.missing_keys, incompatible.unexpected_keys) == ([], []), task
        loaded = port.state_dict()
        assert set(loaded) == set(state), task
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), task
        path.unlink()  # keep one at a time on disk
    gray = torch.load(written["colorization"], map_location="cpu", weights_only=True)["state_dict"]
    with pytest.raises(RuntimeError, match="conv1.weight"):
        port_module.TaskonomyEncoder().load_state_dict(gray, strict=True)


def test_writing_again_keeps_verified_files_and_is_reproducible(written, weights_dir, tmp_path):
    again = write_random_checkpoints(weights_dir, TASKS, seed=0)
    assert [p.name for p in again.values()] == [p.name for p in written.values()]
    fresh = write_random_checkpoints(tmp_path / "fresh", ["rgb2sfnorm"], seed=0)
    assert fresh["rgb2sfnorm"].name == written["rgb2sfnorm"].name  # same seed, same bytes


def test_writing_replaces_a_corrupt_checkpoint(weights_dir):
    path = find_checkpoint(weights_dir, "rgb2sfnorm")
    _overwrite(path, path.read_bytes()[:1000])
    new = write_random_checkpoints(weights_dir, ["rgb2sfnorm"], seed=0)["rgb2sfnorm"]
    verify_checkpoint(new)
    assert sorted(p.name for p in weights_dir.glob("normal_encoder-*")) == [new.name]


def test_check_weights_finds_and_verifies(weights_dir, written):
    found = check_weights(weights_dir, TASKS, load=True)
    assert {t: p.name for t, p in found.items()} == {t: p.name for t, p in written.items()}


def test_missing_weights_list_every_task_with_download_urls(weights_dir):
    tasks = ["rgb2sfnorm", "denoise", "class_places", "colorization"]
    with pytest.raises(WeightsError) as e:
        check_weights(weights_dir, tasks)
    msg = str(e.value)
    assert set(e.value.problems) == {"denoise", "class_places"}
    assert "denoise (denoising): missing" in msg and "class_places (class_scene): missing" in msg
    assert official_url("denoise") in msg and official_url("class_places") in msg
    assert "https://github.com/alexsax/visual-prior/raw/networks/assets/pytorch/" in msg
    assert official_url("rgb2sfnorm") not in msg


def test_missing_directory_lists_all_tasks(tmp_path):
    with pytest.raises(WeightsError, match="does not exist") as e:
        check_weights(tmp_path / "nowhere", TASKS)
    assert set(e.value.problems) == set(TASKS)


def test_corrupt_checkpoint_is_detected_before_loading(weights_dir):
    path = find_checkpoint(weights_dir, "colorization")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    _overwrite(path, bytes(data))
    with pytest.raises(WeightsError) as e:
        check_weights(weights_dir, TASKS)
    assert list(e.value.problems) == ["colorization"]
    assert "corrupt or incomplete" in str(e.value) and official_url("colorization") in str(e.value)
    with pytest.raises(WeightsError, match="corrupt"):
        load_state_dict(path)


def test_two_checkpoints_for_one_task_are_ambiguous(weights_dir):
    src = find_checkpoint(weights_dir, "rgb2sfnorm")
    shutil.copy(src, weights_dir / checkpoint_filename("rgb2sfnorm", _sha256(src)[:10]))
    with pytest.raises(WeightsError, match="several checkpoints for rgb2sfnorm"):
        find_checkpoint(weights_dir, "rgb2sfnorm")


def test_a_sha256_prefix_in_the_name_is_enough_like_torch_hub(weights_dir):
    src = find_checkpoint(weights_dir, "rgb2sfnorm")
    short = src.with_name(checkpoint_filename("rgb2sfnorm", _sha256(src)[:8]))
    src.rename(short)
    assert verify_checkpoint(short) == _sha256(short)
    assert find_checkpoint(weights_dir, "rgb2sfnorm") == short
    too_short = short.with_name(checkpoint_filename("rgb2sfnorm", _sha256(short)[:4]))
    short.rename(too_short)
    with pytest.raises(WeightsError):
        verify_checkpoint(too_short)


def test_name_digest():
    assert name_digest("normal_encoder-f5e2c7737e49.pth") == "f5e2c7737e49"
    assert name_digest("resnet18-f37072fd.pth") == "f37072fd"
    assert name_digest("model.pth") is None
    assert name_digest("model-v2.pth") is None


class _Evil:
    ran = False

    def __reduce__(self):
        return (_Evil._trigger, ())

    @staticmethod
    def _trigger():
        _Evil.ran = True
        return {}


def test_loading_never_runs_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_state_dict(path)
    assert not _Evil.ran


def test_checkpoints_that_are_not_state_dicts_are_errors(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="no state dict"):
        load_state_dict(path)
    path = tmp_path / "junk.pth"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match="cannot load checkpoint"):
        load_state_dict(path)
    path = tmp_path / "nested.pth"
    torch.save({"state_dict": {"a": [1]}}, path)
    with pytest.raises(WeightsError, match="not named tensors"):
        load_state_dict(path)


def test_bare_state_dicts_are_accepted(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))


def test_expected_sha256_is_checked(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save({"w": torch.ones(2)}, path)
    load_state_dict(path, expected_sha256=_sha256(path)[:12])
    with pytest.raises(WeightsError, match="corrupt"):
        load_state_dict(path, expected_sha256="0" * 12)


def test_a_three_channel_checkpoint_named_colorization_is_refused(tmp_path, written):
    src = written["rgb2sfnorm"]
    dst = tmp_path / checkpoint_filename("colorization", _sha256(src))
    shutil.copy(src, dst)
    with pytest.raises(WeightsError, match="not a colorization encoder"):
        load_taskonomy_encoder("colorization", dst)
    with pytest.raises(WeightsError, match="colorization"):
        check_weights(tmp_path, ["colorization"], load=True)


def test_official_file_table_matches_visualpriors():
    vp = pytest.importorskip("visualpriors.taskonomy_network")
    for task in task_names():
        name = task_info(task).visualpriors
        assert vp.TASKONOMY_PRETRAINED_URLS[f"{name}_encoder"] == official_url(task)
    assert vp.TASKONOMY_PRETRAINED_WEIGHT_URL_TEMPLATE == WEIGHTS_URL_TEMPLATE
    assert len(OFFICIAL_ENCODER_SHA256) == 21
