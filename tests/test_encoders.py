"""Our Taskonomy encoder against the official PyTorch port (visualpriors 0.3.5, a test extra)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from neurotask.pipeline.features.encoders import (MAP_SHAPE, N_FEATURES, TaskonomyEncoder, WeightsMismatchError, build_encoder,
                               check_state_dict, encoder_from_state_dict, random_encoder, task_in_channels,
                               taskbank_layout)
from neurotask.pipeline.tasks import task_names

visualpriors_network = pytest.importorskip("visualpriors.taskonomy_network")
PortEncoder = visualpriors_network.TaskonomyEncoder


@pytest.fixture(scope="module")
def rgb_encoder() -> TaskonomyEncoder:
    return random_encoder("rgb2sfnorm", seed=1)


@pytest.fixture(scope="module")
def colorization_encoder() -> TaskonomyEncoder:
    return random_encoder("colorization", seed=2)


def _inputs(channels: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, channels, 256, 256), generator=g) * 2 - 1


def test_state_dict_keys_and_shapes_equal_the_ports():
    port = PortEncoder().state_dict()
    ours = build_encoder("rgb2sfnorm").state_dict()
    assert len(ours) == 324
    assert list(ours) == list(port)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in port.items()}


def test_colorization_differs_only_in_conv1():
    rgb = build_encoder("rgb2sfnorm").state_dict()
    col = build_encoder("colorization").state_dict()
    assert list(col) == list(rgb)
    assert col["conv1.weight"].shape == (64, 1, 7, 7)
    assert [k for k in rgb if rgb[k].shape != col[k].shape] == ["conv1.weight"]
    assert [t for t in task_names() if task_in_channels(t) == 1] == ["colorization"]


def test_port_cannot_load_colorization_weights(colorization_encoder):
    with pytest.raises(RuntimeError, match="conv1.weight"):
        PortEncoder().load_state_dict(colorization_encoder.state_dict())


def test_rgb_outputs_equal_the_ports(rgb_encoder):
    port = PortEncoder(normalize_outputs=False)
    port.load_state_dict(rgb_encoder.state_dict(), strict=True)
    x = _inputs(3, batch=2, seed=0)
    with torch.inference_mode():
        a, b = rgb_encoder(x), port(x)
    assert a.shape == (2, *MAP_SHAPE)
    assert a.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_one_channel_outputs_equal_the_ports_with_a_one_channel_conv1(colorization_encoder):
    port = PortEncoder(normalize_outputs=False)
    port.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=0, bias=False)
    port.load_state_dict(colorization_encoder.state_dict(), strict=True)
    x = _inputs(1, batch=1, seed=3)
    with torch.inference_mode():
        a, b = colorization_encoder(x), port(x)
    assert a.shape == (1, *MAP_SHAPE)
    assert a.abs().max() > 0.1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# The trunk is fully convolutional: smaller inputs test the normalized path at 1/16 of the cost.
@pytest.mark.parametrize("task", ["rgb2sfnorm", "colorization"])
def test_normalized_outputs_equal_the_ports(rgb_encoder, colorization_encoder, task):
    ours = rgb_encoder if task == "rgb2sfnorm" else colorization_encoder
    normalized = encoder_from_state_dict(task, ours.state_dict(), output="normalized")
    port = PortEncoder(normalize_outputs=True)
    port.conv1 = nn.Conv2d(ours.in_channels, 64, kernel_size=7, stride=2, padding=0, bias=False)
    port.load_state_dict(ours.state_dict(), strict=True)
    x = _inputs(ours.in_channels, batch=2, seed=9)[:, :, :64, :64]
    with torch.inference_mode():
        a, b = normalized(x), port(x)
    assert a.shape == (2, 8, 4, 4)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_normalized_output_is_groupnorm_of_taskbank_output(rgb_encoder):
    x = _inputs(3, batch=1, seed=4)[:, :, :128, :128]
    normalized = encoder_from_state_dict("rgb2sfnorm", rgb_encoder.state_dict(), output="normalized")
    with torch.inference_mode():
        raw, norm = rgb_encoder(x), normalized(x)
    assert (raw >= 0).all()  # relu(BN(compress1)), no GroupNorm
    # GroupNorm(8 groups, 8 channels): every channel standardised over its spatial map
    mean = raw.mean(dim=(2, 3), keepdim=True)
    var = raw.var(dim=(2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(norm, (raw - mean) / torch.sqrt(var + 1e-5), rtol=0, atol=1e-4)


def test_taskbank_layout_is_channels_last_flattened():
    maps = torch.arange(2 * 8 * 16 * 16, dtype=torch.float32).reshape(2, 8, 16, 16)
    flat = taskbank_layout(maps)
    assert flat.shape == (2, N_FEATURES)
    b, c, h, w = 1, 5, 3, 11
    assert flat[b, (h * 16 + w) * 8 + c] == maps[b, c, h, w]
    assert torch.equal(flat[0, :8], maps[0, :, 0, 0])  # the 8 channels of pixel (0, 0) first


def test_train_mode_is_refused_so_batchnorm_keeps_checkpoint_statistics():
    enc = random_encoder("autoencoder", seed=5)
    before = enc.bn1.running_mean.clone()
    enc.train()
    assert not enc.training and not enc.bn1.training
    with torch.no_grad():
        enc(_inputs(3, batch=1, seed=6)[:, :, :64, :64])
    assert torch.equal(enc.bn1.running_mean, before)


def test_wrong_input_channels_are_reported():
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        build_encoder("colorization")(torch.zeros(1, 3, 64, 64))


def test_check_state_dict_names_every_problem():
    state = build_encoder("rgb2sfnorm").state_dict()
    del state["layer2.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["compress1.weight"] = torch.zeros(8, 2048, 1, 1)
    with pytest.raises(WeightsMismatchError) as e:
        check_state_dict("rgb2sfnorm", state, "ckpt.pth")
    msg = str(e.value)
    for part in ("ckpt.pth", "layer2.0.conv1.weight", "extra.weight", "compress1.weight", "(8, 2048, 3, 3)"):
        assert part in msg


def test_three_channel_weights_for_colorization_get_a_hint():
    with pytest.raises(WeightsMismatchError, match="not a colorization encoder"):
        encoder_from_state_dict("colorization", build_encoder("rgb2sfnorm").state_dict())


def test_unknown_task_and_output_are_errors():
    with pytest.raises(KeyError, match="rgb2sfnorm"):
        build_encoder("rgb2normal")
    with pytest.raises(ValueError, match="taskbank"):
        build_encoder("rgb2sfnorm", output="raw")  # type: ignore[arg-type]


def test_random_encoders_are_reproducible_and_seed_dependent():
    a = random_encoder("edge2d", seed=7).state_dict()
    b = random_encoder("edge2d", seed=7).state_dict()
    c = random_encoder("edge2d", seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    assert not torch.equal(a["bn1.running_var"], torch.ones(64))  # statistics randomised too
