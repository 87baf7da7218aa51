"""Image decoding and per-task preprocessing, as the Taskonomy task bank fed its encoders.

Every image is decoded once, centre-cropped to a square and resized once per input size; the
per-task rules then work on that shared (B, 3, S, S) tensor of [0, 1] RGB values:

- all tasks: ``tools/run_img_task.py`` crops the central square of side 2 * (min(H, W) // 2);
  ``resize_image`` is a bilinear resize without anti-aliasing (scikit-image 0.12); values are
  scaled from [0, 1] to [-1, 1] (``rescale_image``).
- colorization (``load_ops.to_light``): the L channel of CIE Lab (sRGB, D65) of the resized
  image, scaled from [0, 100] to [-1, 1]; one input channel.
- denoise (``load_ops.random_noise_image``): Gaussian noise of variance 0.01 added to the [0, 1]
  image, clipped to [0, 1] (``skimage.util.random_noise``), then scaled. The noise is drawn from
  a generator seeded from (seed, image key), so a feature does not depend on batch or worker.
- inpainting_whole (``load_ops.context_encoder_input``): after scaling, the centre
  [H/4, 3H/4) x [W/4, 3W/4) is set to 0.

Two profiles: ``task_config`` applies the input function of each task's training config (the
rules above; the default). ``run_img_task`` reproduces what the task bank's
``tools/run_img_task.py`` (the script Neural Taskonomy ran) actually fed: for 14 tasks it
replaces the config's function by ``resize_rescale_image_low_sat``, which clips [0, 1] pixel
values to [0.1, 0.9] before scaling -- including denoise, which therefore gets no noise.
Source: StanfordVL/taskonomy @ 9f814867, taskbank/tools/run_img_task.py, lib/data/load_ops.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from neurotask.pipeline.tasks import task_info

ImageSource = bytes | str | os.PathLike
DEFAULT_MIN_SIDE = 32
PREPROCESSING_PROFILES: tuple[str, ...] = ("task_config", "run_img_task")

# Tasks whose input run_img_task.py clips to [0.1, 0.9] ("low_sat_tasks" in that script).
_RUN_IMG_TASK_LOW_SAT = frozenset(
    "autoencoder curvature denoise edge2d edge3d keypoint2d keypoint3d reshade rgb2depth "
    "rgb2mist rgb2sfnorm segment25d segment2d room_layout".split())
_LOW_SAT_CLIP = (0.1, 0.9)
_DENOISE_VAR = 0.01

# Pillow modes that convert to RGB the way the task bank's loader did (grey tiled to 3
# channels, alpha dropped, palette expanded, CMYK/YCbCr converted).
_CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
_SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageError(ValueError):
    """One image cannot be used; ``name`` says which and ``reason`` why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"image {name!r}: {reason}")
        self.name = name
        self.reason = reason


class BadImagesError(ValueError):
    """Several images cannot be used; ``failures`` maps each name to its reason."""

    def __init__(self, failures: dict[str, str]) -> None:
        lines = [f"  {name}: {reason}" for name, reason in failures.items()]
        super().__init__(f"{len(failures)} image(s) cannot be used:\n" + "\n".join(lines))
        self.failures = dict(failures)


def _source_name(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    return "<bytes>" if isinstance(source, bytes) else str(source)


def _open(source: ImageSource, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(name, f"unreadable ({type(e).__name__}: {e})") from None


def _check_size(img: Image.Image, name: str, min_side: int) -> None:
    w, h = img.size
    if min(w, h) < min_side:
        raise ImageError(name, f"too small: {w}x{h} pixels, the minimum side is {min_side}")


def check_image(source: ImageSource, name: str | None = None, min_side: int = DEFAULT_MIN_SIDE) -> None:
    """Cheap pre-flight check from the header only: readable format, known mode, large enough."""
    name = _source_name(source, name)
    with _open(source, name) as img:
        _check_size(img, name, min_side)
        if img.mode != "RGB" and img.mode not in _CONVERTIBLE_MODES | _SIXTEEN_BIT_GREY:
            raise ImageError(name, f"unsupported pixel mode {img.mode!r}")


def check_images(sources: Sequence[ImageSource], names: Sequence[str],
                 min_side: int = DEFAULT_MIN_SIDE) -> dict[str, str]:
    """Pre-flight check of many images; returns {name: reason} for every bad one (empty if none)."""
    failures: dict[str, str] = {}
    for source, name in zip(sources, names, strict=True):
        try:
            check_image(source, name, min_side)
        except ImageError as e:
            failures[name] = e.reason
    return failures


def _to_rgb_array(img: Image.Image, name: str) -> np.ndarray:
    if img.mode == "RGB":
        return np.asarray(img)
    if img.mode in _SIXTEEN_BIT_GREY:
        grey = np.asarray(img).astype(np.float64)
        grey = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)  # 16-bit -> 8-bit range
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode not in _CONVERTIBLE_MODES:
        raise ImageError(name, f"unsupported pixel mode {img.mode!r}")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # avoids Pillow's warning for palettes with transparency
    return np.asarray(img.convert("RGB"))


def decode_image(source: ImageSource, name: str | None = None, min_side: int = DEFAULT_MIN_SIDE) -> np.ndarray:
    """Decode an image file (path or bytes) to (H, W, 3) uint8 RGB.

    Grayscale, palette, CMYK, YCbCr and alpha images are converted to RGB as the task bank
    did (alpha dropped, no compositing); EXIF orientation is ignored, as it was there.
    Raises ImageError (naming the image) if it is unreadable, truncated, of an unsupported
    mode, or has a side shorter than ``min_side``.
    """
    name = _source_name(source, name)
    with _open(source, name) as img:
        _check_size(img, name, min_side)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
            rgb = _to_rgb_array(img, name)
        except ImageError:
            raise
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(name, f"unreadable ({type(e).__name__}: {e})") from None
    return np.array(rgb, dtype=np.uint8, order="C")  # a writable copy: torch warns on read-only arrays


def decode_images(sources: Sequence[ImageSource], names: Sequence[str],
                  min_side: int = DEFAULT_MIN_SIDE) -> list[np.ndarray]:
    """Decode a batch; raises BadImagesError listing every bad image, not just the first."""
    images: list[np.ndarray] = []
    failures: dict[str, str] = {}
    for source, name in zip(sources, names, strict=True):
        try:
            images.append(decode_image(source, name, min_side))
        except ImageError as e:
            failures[name] = e.reason
    if failures:
        raise BadImagesError(failures)
    return images


def centre_square(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the task bank's centre crop: side 2 * (min(H, W) // 2)."""
    half = min(height, width) // 2
    return height // 2 - half, width // 2 - half, 2 * half


def crop_and_resize(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Centre-crop each (H, W, 3) uint8 image to a square and resize it bilinearly.

    Returns (B, 3, size, size) float32 RGB in [0, 1]. Bilinear with half-pixel centres and
    no anti-aliasing, like scikit-image 0.12's ``resize(order=1)`` that the task bank used.
    """
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32)
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image {i}: expected (H, W, 3) uint8, got {img.shape} {img.dtype}")
        top, left, side = centre_square(img.shape[0], img.shape[1])
        square = torch.from_numpy(np.ascontiguousarray(img[top:top + side, left:left + side]))
        x = square.permute(2, 0, 1).unsqueeze(0).to(torch.float32).div_(255.0)
        if side != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        out[i] = x[0]
    return out


# sRGB (D65) -> XYZ, the matrix and white point scikit-image's rgb2lab uses.
_XYZ_FROM_RGB = torch.tensor([[0.412453, 0.357580, 0.180423],
                              [0.212671, 0.715160, 0.072169],
                              [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_D65_WHITE = (0.95047, 1.0, 1.08883)


def _srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0.008856, torch.pow(t.clamp_min(0.008856), 1.0 / 3.0), 7.787 * t + 16.0 / 116.0)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> (B, 3, H, W) CIE Lab (D65, 2 deg): L in [0, 100]."""
    lin = _srgb_to_linear(rgb)
    m = _XYZ_FROM_RGB.to(device=rgb.device, dtype=rgb.dtype)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)
    white = torch.tensor(_D65_WHITE, device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    fx, fy, fz = _lab_f(xyz / white).unbind(1)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


def lab_lightness(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> (B, 1, H, W) CIE L* in [0, 100] (only Y is needed)."""
    lin = _srgb_to_linear(rgb)
    w = _XYZ_FROM_RGB[1].to(device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    y = (lin * w).sum(dim=1, keepdim=True)  # white Y is 1
    return 116.0 * _lab_f(y) - 16.0


@dataclass(frozen=True)
class TaskonomyInputSpec:
    """How one Taskonomy encoder's input is made from the shared [0, 1] RGB image."""

    lightness: bool = False  # colorization: L of Lab (one channel) instead of RGB
    clip: tuple[float, float] | None = None  # clip [0, 1] values before scaling (run_img_task)
    noise_var: float = 0.0  # denoise: Gaussian noise variance on the [0, 1] image
    mask_centre: bool = False  # inpainting: zero the centre quarter after scaling

    @property
    def channels(self) -> int:
        return 1 if self.lightness else 3


def taskonomy_input_spec(task: str, profile: str = "task_config") -> TaskonomyInputSpec:
    """The input rule of ``task`` under a preprocessing ``profile`` (see module docstring)."""
    task_info(task)  # raises KeyError naming the known tasks
    if profile not in PREPROCESSING_PROFILES:
        raise ValueError(f"unknown preprocessing profile {profile!r}; expected one of {PREPROCESSING_PROFILES}")
    if task == "colorization":
        return TaskonomyInputSpec(lightness=True)
    if task == "inpainting_whole":
        return TaskonomyInputSpec(mask_centre=True)
    if profile == "run_img_task":
        return TaskonomyInputSpec(clip=_LOW_SAT_CLIP) if task in _RUN_IMG_TASK_LOW_SAT else TaskonomyInputSpec()
    if task == "denoise":
        return TaskonomyInputSpec(noise_var=_DENOISE_VAR)
    return TaskonomyInputSpec()


def noise_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed for one image, stable across runs, batches and machines."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def gaussian_noise(shape: Sequence[int], seeds: Sequence[int], std: float) -> torch.Tensor:
    """(B, *shape) float32 N(0, std^2) noise, image b drawn from a CPU generator seeded seeds[b]."""
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for b, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        out[b] = torch.randn(tuple(shape), generator=g) * std
    return out


def taskonomy_input(base: torch.Tensor, spec: TaskonomyInputSpec,
                    seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Apply one task's input rule to the shared image batch.

    base: (B, 3, S, S) RGB in [0, 1] (from ``crop_and_resize``); seeds: one noise seed per
    image (``noise_seed``), required when ``spec.noise_var > 0``.
    Returns (B, spec.channels, S, S) float32 in [-1, 1] on base's device.
    """
    if base.ndim != 4 or base.shape[1] != 3:
        raise ValueError(f"expected base images (B, 3, S, S), got {tuple(base.shape)}")
    x = base
    if spec.lightness:
        x = lab_lightness(x).clamp(0.0, 100.0) / 100.0
    if spec.noise_var > 0:
        if seeds is None or len(seeds) != x.shape[0]:
            raise ValueError("denoise input needs one noise seed per image")
        noise = gaussian_noise(x.shape[1:], seeds, spec.noise_var ** 0.5).to(x.device)
        x = (x + noise).clamp(0.0, 1.0)
    if spec.clip is not None:
        x = x.clamp(*spec.clip)
    x = x * 2.0 - 1.0
    if spec.mask_centre:
        h, w = x.shape[-2:]
        x = x.clone()
        x[..., h // 4:3 * h // 4, w // 4:3 * w // 4] = 0.0
    return x


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(base: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> (base - mean) / std per channel (e.g. torchvision models)."""
    m = torch.as_tensor(mean, dtype=base.dtype, device=base.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=base.dtype, device=base.device).view(1, -1, 1, 1)
    return (base - m) / s


__all__ = [
    "BadImagesError", "DEFAULT_MIN_SIDE", "IMAGENET_MEAN", "IMAGENET_STD", "ImageError", "ImageSource",
    "PREPROCESSING_PROFILES", "TaskonomyInputSpec", "centre_square", "check_image", "check_images",
    "crop_and_resize", "decode_image", "decode_images", "gaussian_noise", "lab_lightness", "noise_seed",
    "normalize", "rgb_to_lab", "taskonomy_input", "taskonomy_input_spec",
]
