"""Decoding and the task bank's per-task input rules."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from neurotask.pipeline.features.preprocess import (BadImagesError, ImageError, TaskonomyInputSpec, centre_square, check_image,
                                 check_images, crop_and_resize, decode_image, decode_images, lab_lightness,
                                 noise_seed, normalize, rgb_to_lab, taskonomy_input, taskonomy_input_spec)
from neurotask.pipeline.tasks import task_names


def _encode(arr: np.ndarray, mode: str | None = None, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if mode is not None and img.mode != mode:
        img = img.convert(mode)
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- colour


@pytest.mark.parametrize("rgb, lab", [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),
    ((0.0, 1.0, 0.0), (87.73, -86.18, 83.18)),
    ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86)),
    ((128 / 255,) * 3, (53.59, 0.0, 0.0)),
    ((0.01, 0.01, 0.01), (0.7001, 0.0, 0.0)),  # the linear segment near black: 903.3 * Y
])
def test_rgb_to_lab_known_values(rgb, lab):
    x = torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1)
    got = rgb_to_lab(x).flatten().tolist()
    assert got == pytest.approx(lab, abs=0.01)
    assert lab_lightness(x).item() == pytest.approx(lab[0], abs=0.01)


def test_lightness_equals_the_l_of_full_lab():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(lab_lightness(x), rgb_to_lab(x)[:, :1])


# ---------------------------------------------------------------- crop and resize


@pytest.mark.parametrize("hw, box", [
    ((375, 500), (0, 63, 374)),  # run_img_task.py: side 2 * (min // 2)
    ((500, 375), (63, 0, 374)),
    ((300, 400), (0, 50, 300)),
    ((256, 256), (0, 0, 256)),
])
def test_centre_square(hw, box):
    assert centre_square(*hw) == box


def test_crop_keeps_exactly_the_centre_square():
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, :50] = 255  # margins that must be cut away
    img[:, 350:] = 255
    centre = _rgb(300, 300, seed=1)
    img[:, 50:350] = centre
    out = crop_and_resize([img], 300)
    assert out.shape == (1, 3, 300, 300) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.from_numpy(centre).permute(2, 0, 1).float() / 255)


def test_resize_is_bilinear_with_half_pixel_centres_and_no_antialiasing():
    # Halving with half-pixel centres samples between 2x2 pixels: each output is their mean.
    img = _rgb(512, 512, seed=2)
    out = crop_and_resize([img], 256)[0]
    x = torch.from_numpy(img).permute(2, 0, 1).double() / 255
    expected = x.reshape(3, 256, 2, 256, 2).mean(dim=(2, 4)).float()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_batch_of_different_sizes_is_stacked():
    out = crop_and_resize([_rgb(375, 500), _rgb(40, 90), _rgb(1024, 700)], 256)
    assert out.shape == (3, 3, 256, 256)
    assert 0.0 <= out.min() and out.max() <= 1.0


# ---------------------------------------------------------------- task input rules


def _const(value: float, size: int = 16, batch: int = 1) -> torch.Tensor:
    return torch.full((batch, 3, size, size), value)


def test_rgb_tasks_scale_to_minus_one_one():
    spec = taskonomy_input_spec("rgb2sfnorm")
    assert spec == TaskonomyInputSpec()
    base = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(taskonomy_input(base, spec), base * 2 - 1)
    assert taskonomy_input(_const(0.0), spec).unique().tolist() == [-1.0]
    assert taskonomy_input(_const(1.0), spec).unique().tolist() == [1.0]


def test_colorization_takes_lightness_scaled_to_minus_one_one():
    spec = taskonomy_input_spec("colorization")
    assert spec.lightness and spec.channels == 1
    assert taskonomy_input(_const(1.0), spec).shape == (1, 1, 16, 16)
    assert taskonomy_input(_const(1.0), spec).unique().tolist() == pytest.approx([1.0])
    assert taskonomy_input(_const(0.0), spec).unique().tolist() == pytest.approx([-1.0])
    grey = taskonomy_input(_const(128 / 255), spec)
    assert grey.unique().tolist() == pytest.approx([53.585 / 50 - 1], abs=1e-4)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    assert taskonomy_input(red, spec).mean().item() == pytest.approx(53.2406 / 50 - 1, abs=1e-4)


def test_denoise_adds_seeded_gaussian_noise_of_variance_0_01():
    spec = taskonomy_input_spec("denoise")
    assert spec.noise_var == 0.01
    base = _const(0.5, size=256, batch=2)
    seeds = [noise_seed(0, "a.jpg"), noise_seed(0, "b.jpg")]
    x = taskonomy_input(base, spec, seeds)
    noise = (x + 1) / 2 - 0.5  # back on the [0, 1] scale of the noise
    assert noise.std().item() == pytest.approx(0.1, rel=0.01)
    assert abs(noise.mean().item()) < 0.002
    assert not torch.equal(x[0], x[1])  # different images, different noise
    # reproducible, and independent of the batch an image is in
    again = taskonomy_input(base[1:], spec, seeds[1:])
    assert torch.equal(again[0], x[1])
    assert noise_seed(0, "a.jpg") == noise_seed(0, "a.jpg") != noise_seed(1, "a.jpg")


def test_denoise_clips_to_the_valid_range_like_skimage_random_noise():
    spec = taskonomy_input_spec("denoise")
    x = taskonomy_input(_const(1.0, size=64), spec, [noise_seed(0, "white")])
    assert x.max().item() == 1.0 and x.min().item() >= -1.0
    assert (x == 1.0).float().mean().item() == pytest.approx(0.5, abs=0.05)  # upper half of the noise clipped


def test_denoise_without_seeds_is_an_error():
    with pytest.raises(ValueError, match="seed"):
        taskonomy_input(_const(0.5), taskonomy_input_spec("denoise"))


def test_inpainting_zeroes_the_centre_quarter():
    spec = taskonomy_input_spec("inpainting_whole")
    assert spec.mask_centre
    base = torch.rand(1, 3, 256, 256) * 0.5 + 0.5  # never maps to 0 outside the hole
    x = taskonomy_input(base, spec)
    hole = torch.zeros(256, 256, dtype=torch.bool)
    hole[64:192, 64:192] = True
    assert hole.float().mean().item() == 0.25
    assert (x[0][:, hole] == 0).all()
    torch.testing.assert_close(x[0][:, ~hole], (base * 2 - 1)[0][:, ~hole])


def test_inpainting_does_not_modify_the_shared_batch():
    base = torch.rand(1, 3, 32, 32)
    copy = base.clone()
    taskonomy_input(base, taskonomy_input_spec("inpainting_whole"))
    assert torch.equal(base, copy)


def test_run_img_task_profile_clips_low_saturation_tasks_and_drops_denoise_noise():
    low = ["autoencoder", "curvature", "denoise", "edge2d", "edge3d", "keypoint2d", "keypoint3d", "reshade",
           "rgb2depth", "rgb2mist", "rgb2sfnorm", "segment25d", "segment2d", "room_layout"]
    for task in task_names():
        spec = taskonomy_input_spec(task, "run_img_task")
        if task in low:
            assert spec == TaskonomyInputSpec(clip=(0.1, 0.9)), task
        elif task == "colorization":
            assert spec == TaskonomyInputSpec(lightness=True)
        elif task == "inpainting_whole":
            assert spec == TaskonomyInputSpec(mask_centre=True)
        else:
            assert spec == TaskonomyInputSpec(), task
    spec = taskonomy_input_spec("rgb2sfnorm", "run_img_task")
    assert taskonomy_input(_const(0.0), spec).unique().tolist() == pytest.approx([-0.8])
    assert taskonomy_input(_const(1.0), spec).unique().tolist() == pytest.approx([0.8])
    assert taskonomy_input(_const(0.5), spec).unique().tolist() == pytest.approx([0.0])


def test_task_config_profile_applies_special_rules_only_to_their_tasks():
    special = {"colorization", "denoise", "inpainting_whole"}
    for task in task_names():
        assert (taskonomy_input_spec(task) != TaskonomyInputSpec()) == (task in special), task


def test_unknown_task_or_profile_is_an_error():
    with pytest.raises(KeyError):
        taskonomy_input_spec("rgb2normal")
    with pytest.raises(ValueError, match="task_config"):
        taskonomy_input_spec("rgb2sfnorm", "tf")


def test_normalize_per_channel():
    base = torch.ones(1, 3, 2, 2)
    out = normalize(base, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert out[0, :, 0, 0].tolist() == [1.0, 3.0, 0.5]


# ---------------------------------------------------------------- decoding


def test_decode_rgb_png_is_lossless():
    img = _rgb(40, 50)
    out = decode_image(_encode(img), "a.png")
    assert out.dtype == np.uint8 and np.array_equal(out, img)


def test_grayscale_is_tiled_to_three_equal_channels():
    grey = np.random.default_rng(3).integers(0, 256, (40, 50), dtype=np.uint8)
    out = decode_image(_encode(grey, fmt="JPEG", quality=95), "grey.jpg")
    assert out.shape == (40, 50, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert np.abs(out[..., 0].astype(int) - grey).mean() < 3  # JPEG, nearly lossless at q95


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (48, 40), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=100)
    out = decode_image(buf.getvalue(), "cmyk.jpg")
    assert out.shape == (40, 48, 3)
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15


def test_rgba_drops_alpha_without_compositing():
    rgba = np.dstack([_rgb(40, 40), np.zeros((40, 40), np.uint8)])  # fully transparent
    out = decode_image(_encode(rgba, mode="RGBA"), "rgba.png")
    assert np.array_equal(out, rgba[..., :3])


def test_palette_and_sixteen_bit_grey_images():
    pal = Image.fromarray(_rgb(40, 40)).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert decode_image(buf.getvalue(), "p.png").shape == (40, 40, 3)
    grey16 = np.full((40, 40), 65535, np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), "g16.png").min() == 255


def test_unreadable_truncated_tiny_and_missing_images_are_named(tmp_path):
    with pytest.raises(ImageError, match=r"'junk.jpg': unreadable"):
        decode_image(b"not an image at all", "junk.jpg")
    jpeg = _encode(_rgb(64, 64), fmt="JPEG")
    with pytest.raises(ImageError, match="'cut.jpg': unreadable"):
        decode_image(jpeg[: len(jpeg) // 2], "cut.jpg")
    with pytest.raises(ImageError, match=r"'tiny.png': too small: 20x10 pixels, the minimum side is 32"):
        decode_image(_encode(_rgb(10, 20)), "tiny.png")
    assert decode_image(_encode(_rgb(10, 20)), "tiny.png", min_side=8).shape == (10, 20, 3)
    with pytest.raises(ImageError, match="file not found"):
        decode_image(tmp_path / "nope.jpg")


def test_decode_from_path(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(_encode(_rgb(33, 35)))
    assert decode_image(path).shape == (33, 35, 3)
    assert decode_image(str(path)).shape == (33, 35, 3)


def test_decode_images_reports_every_bad_image():
    sources = [_encode(_rgb(40, 40)), b"junk", _encode(_rgb(8, 8)), _encode(_rgb(50, 40))]
    names = ["ok1.png", "junk.jpg", "small.png", "ok2.png"]
    with pytest.raises(BadImagesError) as e:
        decode_images(sources, names)
    assert set(e.value.failures) == {"junk.jpg", "small.png"}
    assert "junk.jpg" in str(e.value) and "small.png" in str(e.value) and "2 image(s)" in str(e.value)
    good = decode_images([sources[0], sources[3]], ["ok1.png", "ok2.png"])
    assert [g.shape for g in good] == [(40, 40, 3), (50, 40, 3)]


def test_check_images_from_headers():
    sources = [_encode(_rgb(40, 40)), b"junk", _encode(_rgb(8, 8))]
    failures = check_images(sources, ["a", "b", "c"])
    assert list(failures) == ["b", "c"] and "too small" in failures["c"]
    check_image(sources[0], "a")
    floating = io.BytesIO()
    Image.fromarray(np.zeros((40, 40), np.float32), mode="F").save(floating, format="TIFF")
    with pytest.raises(ImageError, match="unsupported pixel mode 'F'"):
        check_image(floating.getvalue(), "f.tif")
    with pytest.raises(ImageError, match="unsupported pixel mode 'F'"):
        decode_image(floating.getvalue(), "f.tif")
