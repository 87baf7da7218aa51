"""The feature-space registry and the batch featurizer."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import neurotask.pipeline.features.spaces as fs
from neurotask.pipeline.features.encoders import taskbank_layout
from neurotask.pipeline.features.spaces import (FeatureSpaceError, TaskonomyFeatureSpace, build_feature_space,
                                     check_feature_spaces, extract_batch, feature_space_kinds,
                                     feature_spaces_from_config, load_extractors, register_feature_space_kind,
                                     resolve_device)
from neurotask.pipeline.features.preprocess import (crop_and_resize, decode_images, noise_seed, normalize, taskonomy_input,
                                 taskonomy_input_spec)
from neurotask.pipeline.features.weights import WeightsError, find_checkpoint, load_taskonomy_encoder, write_random_checkpoints

CPU = torch.device("cpu")
TASKONOMY = ["colorization", "denoise"]  # the two tasks with special input rules that need the batch


# ---------------------------------------------------------------- a small module defined here


class Explodes(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the forward pass went past the chosen layer")


class TinyNet(nn.Module):
    def __init__(self, width: int = 4, explode: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU())
        self.block = nn.Conv2d(width, 6, 3, padding=1)
        self.head = Explodes() if explode else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def make_tiny(width: int = 4, explode: bool = False, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(width, explode)


@pytest.fixture
def models_module(monkeypatch) -> str:
    """An importable module 'nt_test_models' holding the factories, as a user's package would."""
    mod = types.ModuleType("nt_test_models")
    mod.make_tiny = make_tiny
    mod.not_a_module = lambda: "nope"
    mod.CONSTANT = 3
    monkeypatch.setitem(sys.modules, "nt_test_models", mod)
    return "nt_test_models"


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(375, 500), (300, 300), (480, 360), (256, 320)]
    return [rng.integers(0, 256, (*shapes[i % 4], 3), dtype=np.uint8) for i in range(n)]


# ---------------------------------------------------------------- torch_module


def test_torch_module_layer_is_pooled_and_flattened(models_module):
    space = build_feature_space({"name": "tiny_block", "kind": "torch_module", "factory": "nt_test_models:make_tiny",
                                 "kwargs": {"width": 5}, "layer": "block", "pool": 2, "image_size": 32})
    assert space.name == "tiny_block" and space.image_size == 32
    ex = space.load(CPU)
    assert ex.n_features == 6 * 2 * 2
    assert ex.describe()["layer"] == "block" and ex.describe()["pool"] == [2, 2]
    images = _images(3)
    out = extract_batch(images, ["a", "b", "c"], [ex])["tiny_block"]
    # the same computation by hand
    ref = make_tiny(width=5).eval()
    with torch.no_grad():
        x = normalize(crop_and_resize(images, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        expected = F.adaptive_avg_pool2d(ref.block(ref.stem(x)), 2).flatten(1).numpy()
    assert out.shape == (3, 24) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_forward_stops_at_the_chosen_layer(models_module):
    space = build_feature_space({"name": "t", "kind": "torch_module", "factory": "nt_test_models:make_tiny",
                                 "kwargs": {"explode": True}, "layer": "stem.1", "pool": [1, 3], "image_size": 16})
    ex = space.load(CPU)
    assert ex.n_features == 4 * 1 * 3
    assert extract_batch(_images(1), ["a"], [ex])["t"].shape == (1, 12)


def test_whole_model_output_without_layer_or_pool(models_module):
    space = build_feature_space({"name": "t", "kind": "torch_module", "factory": "nt_test_models:make_tiny",
                                 "image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    ex = space.load(CPU)
    assert ex.n_features == 5
    with torch.no_grad():
        expected = make_tiny()(crop_and_resize(_images(2), 16) * 2 - 1).numpy()
    np.testing.assert_allclose(extract_batch(_images(2), ["a", "b"], [ex])["t"], expected, rtol=1e-5, atol=1e-6)


def test_a_shared_extractor_is_thread_safe(models_module):
    ex = build_feature_space({"name": "t", "kind": "torch_module", "factory": "nt_test_models:make_tiny",
                              "layer": "block", "pool": 2, "image_size": 24}).load(CPU)
    batches = [crop_and_resize(_images(2, seed=s), 24) for s in range(8)]
    with torch.inference_mode():
        expected = [ex(b, ["a", "b"]) for b in batches]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda b: ex(b, ["a", "b"]), batches * 4))
    for i, g in enumerate(got):
        torch.testing.assert_close(g, expected[i % 8])


def test_local_state_dict_is_loaded_and_verified(models_module, tmp_path):
    trained = make_tiny(seed=42)
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": trained.state_dict()}, path)
    entry = {"name": "t", "kind": "torch_module", "factory": "nt_test_models:make_tiny", "state_dict": str(path),
             "image_size": 16}
    ex = build_feature_space(entry).load(CPU)
    x = crop_and_resize(_images(1), 16)
    with torch.no_grad():
        expected = trained(normalize(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))).numpy()
    np.testing.assert_allclose(extract_batch(_images(1), ["a"], [ex])["t"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(WeightsError, match="corrupt"):
        build_feature_space({**entry, "sha256": "deadbeef00"}).load(CPU)
    torch.save({"other.weight": torch.zeros(1)}, path)
    with pytest.raises(FeatureSpaceError, match="does not fit the module"):
        build_feature_space(entry).load(CPU)


def test_unknown_layer_lists_the_sub_modules(models_module):
    space = build_feature_space({"name": "t", "kind": "torch_module", "factory": "nt_test_models:make_tiny",
                                 "layer": "blok"})
    with pytest.raises(FeatureSpaceError, match=r"features.extra\[0\].layer: 'blok'.*stem, stem.0, stem.1, block"):
        space.load(CPU)


def test_pool_on_a_flat_output_is_an_error(models_module):
    space = build_feature_space({"name": "t", "kind": "torch_module", "factory": "nt_test_models:make_tiny",
                                 "pool": 2, "image_size": 16})
    with pytest.raises(FeatureSpaceError, match=r"pool: layer <output> gives shape \(1, 5\)"):
        space.load(CPU)


@pytest.mark.parametrize("entry, message", [
    ({"kind": "torch_module", "factory": "nt_test_models:make_tiny"}, r"\.name: expected a non-empty name"),
    ({"name": "a/b", "kind": "torch_module"}, r"\.name"),
    ({"name": "t", "kind": "keras"}, r"\.kind: expected one of taskonomy, torch_module, torchvision"),
    ({"name": "t", "kind": "torch_module"}, "needs 'factory"),
    ({"name": "t", "kind": "torch_module", "factory": "nt_test_models.make_tiny"}, "package.module:callable"),
    ({"name": "t", "kind": "torch_module", "factory": "no_such_pkg_xyz:f"}, "cannot import module 'no_such_pkg_xyz'"),
    ({"name": "t", "kind": "torch_module", "factory": "nt_test_models:missing"}, "has no attribute 'missing'"),
    ({"name": "t", "kind": "torch_module", "factory": "nt_test_models:CONSTANT"}, "is not callable"),
    ({"name": "t", "kind": "torch_module", "factory": "nt_test_models:make_tiny", "layers": "x"},
     r"unknown key\(s\) layers"),
    ({"name": "t", "kind": "torch_module", "factory": "nt_test_models:make_tiny", "pool": [0, 2]}, r"\.pool"),
    ({"name": "t", "kind": "torch_module", "factory": "nt_test_models:make_tiny", "pool": True}, r"\.pool"),
    ({"name": "t", "kind": "torch_module", "factory": "nt_test_models:make_tiny", "image_size": "224"},
     r"\.image_size: expected int"),
    ({"name": "t", "kind": "torch_module", "factory": "nt_test_models:make_tiny", "mean": [0.5, 0.5]}, r"\.mean"),
    ({"name": "t", "kind": "taskonomy", "weights_dir": "/w", "task": "rgb2normal"}, r"\.task: unknown"),
    ({"name": "t", "kind": "taskonomy", "task": "denoise"}, "needs 'weights_dir'"),
])
def test_config_errors_name_the_key(models_module, entry, message):
    with pytest.raises(FeatureSpaceError, match=message):
        build_feature_space(entry, "features.extra[0]")


def test_factory_returning_a_non_module_or_failing_is_reported(models_module):
    space = build_feature_space({"name": "t", "kind": "torch_module", "factory": "nt_test_models:not_a_module"})
    with pytest.raises(FeatureSpaceError, match="returned a str, not an nn.Module"):
        space.load(CPU)
    space = build_feature_space({"name": "t", "kind": "torch_module", "factory": "nt_test_models:make_tiny",
                                 "kwargs": {"depth": 3}})
    with pytest.raises(FeatureSpaceError, match="failed: TypeError"):
        space.load(CPU)


# ---------------------------------------------------------------- torchvision and custom kinds


def test_torchvision_kind_reports_a_missing_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes 'import torchvision' fail
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    space = build_feature_space({"name": "r18", "kind": "torchvision", "model": "resnet18", "layer": "layer3",
                                 "pool": 4})  # configuring does not import torchvision
    assert any("torchvision does not import" in p for p in space.problems())
    with pytest.raises(FeatureSpaceError, match="needs torchvision.*torch_module"):
        space.load(CPU)


def test_torchvision_kind_builds_through_get_model_without_downloading(monkeypatch, tmp_path):
    calls = []

    def get_model(name, weights="DEFAULT-would-download", **kwargs):
        calls.append((name, weights, kwargs))
        return make_tiny(**kwargs)

    tv = types.ModuleType("torchvision")
    tv_models = types.ModuleType("torchvision.models")
    tv_models.get_model = get_model
    tv.models = tv_models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tv_models)
    path = tmp_path / "tiny-weights.pth"
    torch.save(make_tiny(width=3, seed=7).state_dict(), path)
    space = build_feature_space({"name": "tv", "kind": "torchvision", "model": "tinynet", "kwargs": {"width": 3},
                                 "weights": str(path), "layer": "block", "pool": 1, "image_size": 24})
    assert space.problems() == []
    ex = space.load(CPU)
    assert calls == [("tinynet", None, {"width": 3})]
    assert ex.n_features == 6
    assert space.describe()["kind"] == "torchvision"


def test_registering_a_new_kind_makes_it_configurable(monkeypatch, models_module):
    monkeypatch.setattr(fs, "_KINDS", dict(fs._KINDS))

    def build_grey(name, options, where):
        return fs.TorchModuleFeatureSpace(name=name, factory="nt_test_models:make_tiny", image_size=options["size"],
                                          mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), where=where)

    register_feature_space_kind("tiny", build_grey)
    assert "tiny" in feature_space_kinds()
    spaces = feature_spaces_from_config({"tasks": [], "extra": [{"name": "g", "kind": "tiny", "size": 8}]})
    assert [s.name for s in spaces] == ["g"]
    assert extract_batch(_images(2), ["a", "b"], load_extractors(spaces, "cpu"))["g"].shape == (2, 5)


# ---------------------------------------------------------------- Taskonomy spaces and the batch


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("weights")
    write_random_checkpoints(d, TASKONOMY, seed=3)
    return d


@pytest.fixture(scope="module")
def extractors(weights_dir):
    spaces = feature_spaces_from_config({"weights_dir": str(weights_dir), "tasks": TASKONOMY})
    return load_extractors(spaces, "cpu")


def test_config_builds_taskonomy_spaces_first_then_extra(models_module, weights_dir):
    spaces = feature_spaces_from_config({
        "weights_dir": str(weights_dir), "tasks": ["denoise", "rgb2sfnorm"], "output": "normalized",
        "preprocessing": "run_img_task", "noise_seed": 5,
        "extra": [{"name": "tiny", "kind": "torch_module", "factory": "nt_test_models:make_tiny"}]})
    assert [s.name for s in spaces] == ["denoise", "rgb2sfnorm", "tiny"]
    assert all(isinstance(s, TaskonomyFeatureSpace) and s.output == "normalized" and s.noise_seed == 5
               and s.preprocessing == "run_img_task" for s in spaces[:2])
    assert spaces[0].describe() == {"kind": "taskonomy", "task": "denoise", "output": "normalized",
                                    "preprocessing": "run_img_task", "noise_seed": 5, "visualpriors": "denoising"}
    assert len(feature_spaces_from_config({"weights_dir": "/w"})) == 21  # tasks default to all 21


@pytest.mark.parametrize("section, message", [
    ({"tasks": ["denoise", "rgb2normal"], "weights_dir": "/w"},
     r"features.tasks: unknown Taskonomy task\(s\) rgb2normal"),
    ({"tasks": "denoise", "weights_dir": "/w"}, "expected 'all' or a list"),
    ({"tasks": ["denoise"]}, "features.weights_dir"),
    ({"weights_dir": "/w", "output": "raw"}, "features.output: expected one of taskbank, normalized"),
    ({"weights_dir": "/w", "preprocessing": "tf"}, "features.preprocessing"),
    ({"weights_dir": "/w", "noise_seed": "1"}, "features.noise_seed"),
    ({"weights_dir": "/w", "extra": {"name": "x"}}, "features.extra: expected a list"),
    ({"weights_dir": "/w", "tasks": ["denoise"], "extra": [{"name": "denoise", "kind": "taskonomy",
                                                            "weights_dir": "/w"}]}, "'denoise' is used twice"),
])
def test_features_section_errors(section, message):
    with pytest.raises(FeatureSpaceError, match=message):
        feature_spaces_from_config(section)


def test_preflight_lists_every_missing_task_and_other_problems(weights_dir, models_module):
    spaces = feature_spaces_from_config({
        "weights_dir": str(weights_dir), "tasks": ["denoise", "rgb2sfnorm", "class_places"],
        "extra": [{"name": "t", "kind": "torch_module", "factory": "nt_test_models:make_tiny",
                   "state_dict": str(weights_dir / "missing.pth")}]})
    with pytest.raises(FeatureSpaceError) as e:
        check_feature_spaces(spaces)
    msg = str(e.value)
    assert "rgb2sfnorm (normal): missing" in msg and "class_places (class_scene): missing" in msg
    assert "denoise" not in msg.split("missing or unusable")[1].split("Download")[0]
    assert "https://github.com/alexsax/visual-prior/raw/networks/assets/pytorch/" in msg
    assert "features.extra[0].state_dict" in msg
    check_feature_spaces(spaces[:1])  # denoise alone is fine


KEYS = ["COCO_train2014_000000000001.jpg", "n01440764_10.JPEG", "airport1.jpg"]


@pytest.fixture(scope="module")
def batch(extractors) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    images = _images(3)
    return images, extract_batch(images, KEYS, extractors)


def test_taskonomy_features_equal_the_encoder_on_its_task_input(weights_dir, extractors, batch):
    images, out = batch
    assert list(out) == TASKONOMY
    base = crop_and_resize(images, 256)
    for task in TASKONOMY:
        encoder = load_taskonomy_encoder(task, find_checkpoint(weights_dir, task))
        x = taskonomy_input(base, taskonomy_input_spec(task), [noise_seed(0, k) for k in KEYS])
        with torch.no_grad():
            expected = taskbank_layout(encoder(x)).numpy()
        assert out[task].shape == (3, 2048) and out[task].dtype == np.float32
        described = next(e for e in extractors if e.name == task).describe()
        assert described["checkpoint"] == find_checkpoint(weights_dir, task).name
        assert described["n_features"] == 2048 and described["task"] == task
        np.testing.assert_allclose(out[task], expected, rtol=1e-5, atol=1e-5)


def test_features_do_not_depend_on_the_batch(extractors, batch):
    images, together = batch
    alone = extract_batch(images[2:], KEYS[2:], extractors)
    for task in TASKONOMY:
        np.testing.assert_allclose(together[task][2], alone[task][0], rtol=1e-5, atol=1e-5)
    # denoise noise follows the image key
    denoise = [e for e in extractors if e.name == "denoise"]
    renamed = extract_batch(images[2:], ["other.jpg"], denoise)
    assert not np.allclose(renamed["denoise"], alone["denoise"])


def test_channels_last_gives_the_same_features(weights_dir, extractors):
    spaces = feature_spaces_from_config({"weights_dir": str(weights_dir), "tasks": ["colorization"]})
    cl = load_extractors(spaces, "cpu", channels_last=True)
    images = _images(1, seed=2)
    a = extract_batch(images, ["a"], cl)["colorization"]
    b = extract_batch(images, ["a"], extractors[:1])["colorization"]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_images_are_resized_once_per_size(extractors, models_module, monkeypatch):
    tiny = build_feature_space({"name": "tiny", "kind": "torch_module", "factory": "nt_test_models:make_tiny",
                                "image_size": 32}).load(CPU)
    calls = []
    original = fs.crop_and_resize

    def counting(images, size):
        calls.append(size)
        return original(images, size)

    monkeypatch.setattr(fs, "crop_and_resize", counting)
    out = extract_batch(_images(1), ["a"], [*extractors, tiny])
    assert sorted(calls) == [32, 256]  # once for both Taskonomy encoders, once for tiny
    assert set(out) == {*TASKONOMY, "tiny"}


def test_empty_batch_and_mismatched_keys(extractors):
    out = extract_batch([], [], extractors)
    assert all(v.shape == (0, 2048) for v in out.values())
    with pytest.raises(ValueError, match="2 images but 1 keys"):
        extract_batch(_images(2), ["a"], extractors)


def test_end_to_end_from_files_with_grey_and_cmyk(tmp_path, extractors):
    rng = np.random.default_rng(4)
    files = {
        "rgb.jpg": Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)),
        "grey.jpg": Image.fromarray(rng.integers(0, 256, (300, 400), dtype=np.uint8)),
        "cmyk.jpg": Image.new("CMYK", (400, 300), (10, 200, 30, 5)),
    }
    for name, img in files.items():
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        (tmp_path / name).write_bytes(buf.getvalue())
    names = list(files)
    images = decode_images([tmp_path / n for n in names], names)
    assert all(img.shape == (300, 400, 3) for img in images)
    out = extract_batch(images, names, extractors[:1])
    assert out["colorization"].shape == (3, 2048) and np.isfinite(out["colorization"]).all()


def test_devices(monkeypatch):
    assert resolve_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    with pytest.raises(FeatureSpaceError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(FeatureSpaceError, match="unknown device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
