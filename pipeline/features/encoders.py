"""The Taskonomy encoder, in torch, state-dict compatible with the ``visualpriors`` checkpoints.

Architecture (facts in ``../shared/reference/README.md``): a ResNet-50-style trunk whose first
two stages downsample at their *last* block (by a 1x1 max-pool on the shortcut), so a
(B, C, 256, 256) input leaves the trunk as (B, 2048, 16, 16); then ``compress1`` (3x3 conv to
8 channels), ``compress_bn`` and a ReLU give the (B, 8, 16, 16) representation. The port adds
a GroupNorm(8, 8) without affine parameters on top ("normalized" output); the TensorFlow task
bank, whose representations the paper used, stored relu(BN(compress1)) channels-last
(16, 16, 8) and flattened it to 2048 ("taskbank" output).

Parameter and buffer names follow the port exactly (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ..., ``compress1``, ``compress_bn``), so its checkpoints load with
``load_state_dict(strict=True)``. The colorization encoder takes one (lightness) channel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from neurotask.pipeline.tasks import task_info

TaskonomyOutput = Literal["taskbank", "normalized"]
TASKONOMY_OUTPUTS: tuple[str, ...] = ("taskbank", "normalized")

INPUT_SIZE = 256  # square input side every Taskonomy encoder was trained on
MAP_SHAPE = (8, 16, 16)  # (channels, height, width) of the representation
N_FEATURES = 8 * 16 * 16

# (bottleneck width, number of blocks, stride of the stage's last block)
_STAGES = ((64, 3, 2), (128, 4, 2), (256, 6, 1), (512, 3, 1))
_EXPANSION = 4


class WeightsMismatchError(ValueError):
    """A state dict does not fit the Taskonomy encoder (missing/unexpected keys, wrong shapes)."""


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride) -> 1x1 residual block with post-activation."""

    def __init__(self, in_channels: int, width: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_channels = width * _EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # The attribute name is part of the checkpoint format ("layerK.i.downsample.0.weight").
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


def _stage(in_channels: int, width: int, n_blocks: int, last_stride: int) -> nn.Sequential:
    """One trunk stage; only the first block changes the width, only the last one the size."""
    out_channels = width * _EXPANSION
    blocks: list[nn.Module] = []
    projection = None
    if in_channels != out_channels:
        projection = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    blocks.append(Bottleneck(in_channels, width, downsample=projection))
    blocks.extend(Bottleneck(out_channels, width) for _ in range(n_blocks - 2))
    # TF-slim's resnet_v1 subsamples the identity shortcut of a strided unit with a 1x1
    # max-pool; the port keeps it as a parameter-free Sequential, so no state-dict keys.
    subsample = nn.Sequential(nn.MaxPool2d(kernel_size=1, stride=last_stride)) if last_stride != 1 else None
    blocks.append(Bottleneck(out_channels, width, stride=last_stride, downsample=subsample))
    return nn.Sequential(*blocks)


class TaskonomyEncoder(nn.Module):
    """Taskonomy encoder: (B, in_channels, 256, 256) in [-1, 1] -> (B, 8, 16, 16).

    ``normalize_outputs=False`` returns relu(BN(compress1)), the task bank's representation;
    ``True`` adds the port's GroupNorm(8, 8, affine=False). Always in eval mode: BatchNorm
    uses the checkpoint's running statistics.
    """

    def __init__(self, in_channels: int = 3, normalize_outputs: bool = False) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (colorization) or 3, got {in_channels}")
        self.in_channels = in_channels
        self.normalize_outputs = normalize_outputs
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        channels = 64
        for k, (width, n_blocks, stride) in enumerate(_STAGES, start=1):
            setattr(self, f"layer{k}", _stage(channels, width, n_blocks, stride))
            channels = width * _EXPANSION
        self.compress1 = nn.Conv2d(channels, 8, kernel_size=3, stride=1, padding=1, bias=False)
        self.compress_bn = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU(inplace=True)
        self.groupnorm = nn.GroupNorm(8, 8, affine=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TaskonomyEncoder:
        # Feature extraction only: BatchNorm must keep using the checkpoint's statistics.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        # TF 'SAME' padding of the 7x7/2 conv on an even-sized input = 3 on every side.
        x = F.pad(x, (3, 3, 3, 3))
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu1(self.compress_bn(self.compress1(x)))
        if self.normalize_outputs:
            x = self.groupnorm(x)
        return x


def taskbank_layout(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) representation -> (B, H*W*C): channels-last, flattened, as the task bank stored it."""
    return maps.permute(0, 2, 3, 1).reshape(maps.shape[0], -1)


def task_in_channels(task: str) -> int:
    """Input channels of a task's encoder: 1 for colorization (lightness), else 3 (RGB)."""
    task_info(task)  # raises KeyError naming the known tasks
    return 1 if task == "colorization" else 3


def build_encoder(task: str, output: TaskonomyOutput = "taskbank") -> TaskonomyEncoder:
    """An (untrained) encoder shaped for ``task`` whose forward gives the ``output`` variant."""
    if output not in TASKONOMY_OUTPUTS:
        raise ValueError(f"unknown Taskonomy output {output!r}; expected one of {TASKONOMY_OUTPUTS}")
    return TaskonomyEncoder(task_in_channels(task), normalize_outputs=(output == "normalized"))


def expected_state_shapes(task: str) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of ``task``'s encoder (the checkpoint format)."""
    return {k: tuple(v.shape) for k, v in build_encoder(task).state_dict().items()}


def check_state_dict(task: str, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise WeightsMismatchError naming every missing/unexpected key and wrong shape."""
    expected = expected_state_shapes(task)
    problems: list[str] = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:5])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:5])})")
    for k, shape in expected.items():
        v = state_dict.get(k)
        if v is None:
            continue
        if not isinstance(v, torch.Tensor):
            problems.append(f"{k} is a {type(v).__name__}, not a tensor")
        elif tuple(v.shape) != shape:
            problems.append(f"{k} has shape {tuple(v.shape)}, expected {shape}")
    if problems:
        hint = ""
        if task == "colorization" and tuple(getattr(state_dict.get("conv1.weight"), "shape", ())) == (64, 3, 7, 7):
            hint = " (a 3-channel conv1: this is not a colorization encoder)"
        raise WeightsMismatchError(
            f"weights for task {task!r} from {where} do not fit the Taskonomy encoder{hint}: "
            + "; ".join(problems))


def encoder_from_state_dict(task: str, state_dict: Mapping[str, torch.Tensor],
                            output: TaskonomyOutput = "taskbank", where: str = "state dict") -> TaskonomyEncoder:
    """An encoder for ``task`` holding ``state_dict`` (checked first, then loaded strictly)."""
    check_state_dict(task, state_dict, where)
    encoder = build_encoder(task, output)
    encoder.load_state_dict(dict(state_dict), strict=True)
    return encoder


def randomize_encoder(encoder: TaskonomyEncoder, generator: torch.Generator) -> TaskonomyEncoder:
    """Fill every parameter and BatchNorm statistic with random values (in place).

    Convolutions get He-normal weights; BatchNorm gets random affine parameters and running
    statistics, and the last BN of each residual block a small scale so that the untrained
    trunk keeps activations in a sane range over its 16 blocks. For tests and the demo.
    """
    with torch.no_grad():
        for name, module in encoder.named_modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                scale = 0.2 if name.endswith("bn3") else 1.0
                module.weight.copy_(scale * (0.5 + torch.rand(n, generator=generator)))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return encoder


def random_encoder(task: str, seed: int, output: TaskonomyOutput = "taskbank") -> TaskonomyEncoder:
    """A randomly initialised encoder for ``task``, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return randomize_encoder(build_encoder(task, output), generator)


__all__ = [
    "INPUT_SIZE", "MAP_SHAPE", "N_FEATURES", "TASKONOMY_OUTPUTS", "TaskonomyEncoder", "TaskonomyOutput",
    "WeightsMismatchError", "build_encoder", "check_state_dict", "encoder_from_state_dict",
    "expected_state_shapes", "random_encoder", "randomize_encoder", "task_in_channels",
    "taskbank_layout",
]
