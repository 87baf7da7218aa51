"""Feature spaces: the registry of ways to turn an image batch into (image, feature) arrays.

A *feature space* is a configured, named featurizer; downstream it is a task like any other
(``features/<name>`` in the store, one ridge model per subject). Kinds:

- ``taskonomy``: one of the 21 Taskonomy encoders (``pipeline.features.encoders``), its input made by
  the task bank's rules (``pipeline.features.preprocess``), weights from ``features.weights_dir``.
  2048 features: the (8, 16, 16) map flattened channels-last as the task bank stored it;
  ``output: taskbank`` (the paper's, relu(BN(compress))) or ``normalized`` (the port's GroupNorm).
- ``torch_module``: any ``nn.Module`` built by an importable ``"package.module:callable"``
  factory (with keyword arguments), optionally loaded from a local state dict; features are
  the output of a named sub-module (forward hook; the forward pass stops there), adaptively
  average-pooled to a configured spatial size and flattened.
- ``torchvision``: a ``torch_module`` whose factory is ``torchvision.models.get_model`` (import
  deferred until used; a clear error if torchvision is not importable). Weights come only
  from a local file: nothing is downloaded.

More kinds can be registered with ``register_feature_space_kind``. Configured spaces are
cheap descriptions; ``FeatureSpace.load`` builds an ``Extractor`` holding the model on a
device. ``extract_batch`` runs every extractor on one batch of decoded images, resizing each
image once per input size, and returns {name: (B, n_features) float32}.
"""

from __future__ import annotations

import importlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from neurotask.pipeline.features.encoders import INPUT_SIZE, N_FEATURES, TASKONOMY_OUTPUTS, taskbank_layout
from neurotask.pipeline.features.preprocess import (IMAGENET_MEAN, IMAGENET_STD, PREPROCESSING_PROFILES, TaskonomyInputSpec,
                                 crop_and_resize, noise_seed, normalize, taskonomy_input, taskonomy_input_spec)
from neurotask.pipeline.tasks import task_info, task_names
from neurotask.pipeline.features.weights import WeightsError, check_weights, find_checkpoint, load_state_dict, load_taskonomy_encoder


class FeatureSpaceError(ValueError):
    """A feature space is misconfigured or cannot be built; the message names the config key."""


# ---------------------------------------------------------------- devices


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA if available, else CPU; 'cuda[:i]' must be available; 'cpu' always is."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise FeatureSpaceError(f"features.device: unknown device {device!r} (use auto, cpu or cuda[:i])") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatureSpaceError(f"features.device is {device!r} but CUDA is not available here "
                                f"(torch {torch.__version__}); use 'auto' or 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise FeatureSpaceError(f"features.device: unsupported device type {dev.type!r} (use auto, cpu or cuda[:i])")
    return dev


def exact_float32(device: torch.device) -> None:
    """On CUDA, run convolutions and matrix products in true float32: cuDNN's default TF32
    (Ampere and later) rounds inputs to 10-bit mantissas, which changes features by ~1e-3
    relative, so that features would depend on the card they were computed on."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


# ---------------------------------------------------------------- extractors and spaces


class Extractor(ABC):
    """A loaded feature space: model on a device, ready to featurize batches."""

    name: str
    image_size: int  # side of the square [0, 1] RGB batch it takes
    n_features: int
    device: torch.device

    space: FeatureSpace

    @abstractmethod
    def __call__(self, base: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """base: (B, 3, image_size, image_size) RGB in [0, 1] on ``device``; keys: B image
        names (seed any randomness). Returns (B, n_features) float32 on ``device``."""

    def describe(self) -> dict[str, Any]:
        """Provenance to store beside the features: the space's options and what was loaded."""
        return {"name": self.name, **self.space.describe(), "n_features": self.n_features}


class FeatureSpace(ABC):
    """A configured feature space (cheap; nothing loaded until ``load``)."""

    name: str
    kind: str
    image_size: int

    @abstractmethod
    def problems(self) -> list[str]:
        """Pre-flight: everything that would make ``load`` fail, each naming what and where."""

    @abstractmethod
    def load(self, device: torch.device, channels_last: bool = False) -> Extractor:
        """Build the model on ``device`` (``channels_last``: NHWC memory format, faster on CPU)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able provenance for the store (kind and options)."""


# ---------------------------------------------------------------- Taskonomy


@dataclass(frozen=True)
class TaskonomyFeatureSpace(FeatureSpace):
    task: str
    weights_dir: Path
    output: str = "taskbank"
    preprocessing: str = "task_config"
    noise_seed: int = 0
    name: str = ""
    kind: str = field(default="taskonomy", init=False)
    image_size: int = field(default=INPUT_SIZE, init=False)

    def __post_init__(self) -> None:
        task_info(self.task)
        if not self.name:
            object.__setattr__(self, "name", self.task)
        object.__setattr__(self, "weights_dir", Path(self.weights_dir))

    @property
    def input_spec(self) -> TaskonomyInputSpec:
        return taskonomy_input_spec(self.task, self.preprocessing)

    def problems(self) -> list[str]:
        try:
            check_weights(self.weights_dir, [self.task])
        except WeightsError as e:
            return [str(e)]
        return []

    def load(self, device: torch.device, channels_last: bool = False) -> Extractor:
        path = find_checkpoint(self.weights_dir, self.task)
        encoder = load_taskonomy_encoder(self.task, path, self.output)  # verifies the sha256
        return TaskonomyExtractor(self, encoder, device, channels_last, path.name)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "task": self.task, "output": self.output,
                "preprocessing": self.preprocessing, "noise_seed": self.noise_seed,
                "visualpriors": task_info(self.task).visualpriors}


class TaskonomyExtractor(Extractor):
    def __init__(self, space: TaskonomyFeatureSpace, encoder: nn.Module, device: torch.device,
                 channels_last: bool, checkpoint: str) -> None:
        self.space = space
        self.name = space.name
        self.image_size = space.image_size
        self.n_features = N_FEATURES
        self.device = device
        self.spec = space.input_spec
        self.seed = space.noise_seed
        self.checkpoint = checkpoint
        self.channels_last = channels_last
        exact_float32(device)
        self.encoder = encoder.to(device)
        if channels_last:
            self.encoder = self.encoder.to(memory_format=torch.channels_last)

    def __call__(self, base: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        seeds = [noise_seed(self.seed, k) for k in keys] if self.spec.noise_var > 0 else None
        x = taskonomy_input(base, self.spec, seeds)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return taskbank_layout(self.encoder(x))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "checkpoint": self.checkpoint}  # its name carries the sha256


# ---------------------------------------------------------------- generic torch modules


def import_factory(spec: str, where: str) -> Callable[..., Any]:
    """Resolve ``"package.module:attr.path"`` to a callable."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise FeatureSpaceError(f"{where}: expected 'package.module:callable', got {spec!r}")
    module_name, attr_path = spec.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise FeatureSpaceError(f"{where}: cannot import module {module_name!r} ({e})") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FeatureSpaceError(f"{where}: module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(obj):
        raise FeatureSpaceError(f"{where}: {spec!r} is not callable")
    return obj


class _StopForward(Exception):
    """Raised by the layer hook: nothing after the chosen layer needs computing."""


@dataclass(frozen=True)
class TorchModuleFeatureSpace(FeatureSpace):
    name: str
    factory: str  # "package.module:callable" returning an nn.Module
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    state_dict: Path | None = None  # local file; {'state_dict': ...} or a bare state dict
    sha256: str | None = None  # expected digest (prefix) of state_dict; else a hub-style name's
    strict: bool = True
    layer: str = ""  # named sub-module whose output is the feature; "" = the model's output
    pool: tuple[int, int] | None = None  # adaptive average pooling of a (B, C, H, W) output
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    where: str = "features.extra"  # config location, for messages
    kind: str = "torch_module"

    def _factory(self) -> Callable[..., Any]:
        return import_factory(self.factory, f"{self.where}.factory")

    def problems(self) -> list[str]:
        found: list[str] = []
        try:
            self._factory()
        except FeatureSpaceError as e:
            found.append(str(e))
        if self.state_dict is not None and not Path(self.state_dict).is_file():
            found.append(f"{self.where}.state_dict: file {self.state_dict} does not exist")
        return found

    def build_module(self) -> nn.Module:
        where = self.where
        try:
            module = self._factory()(**dict(self.kwargs))
        except FeatureSpaceError:
            raise
        except Exception as e:  # the user's factory: report whatever it raised, with where
            raise FeatureSpaceError(f"{where}.factory {self.factory!r} failed: {type(e).__name__}: {e}") from None
        if not isinstance(module, nn.Module):
            raise FeatureSpaceError(f"{where}.factory {self.factory!r} returned a "
                                    f"{type(module).__name__}, not an nn.Module")
        if self.state_dict is not None:
            state = load_state_dict(self.state_dict, expected_sha256=self.sha256)
            try:
                module.load_state_dict(state, strict=self.strict)
            except RuntimeError as e:
                raise FeatureSpaceError(f"{where}.state_dict {self.state_dict} does not fit the module: "
                                        + str(e).splitlines()[0]) from None
        return module

    def load(self, device: torch.device, channels_last: bool = False) -> Extractor:
        return TorchModuleExtractor(self, self.build_module(), device, channels_last)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "factory": self.factory, "kwargs": dict(self.kwargs),
                "state_dict": None if self.state_dict is None else str(self.state_dict),
                "layer": self.layer, "pool": None if self.pool is None else list(self.pool),
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


class TorchModuleExtractor(Extractor):
    def __init__(self, space: TorchModuleFeatureSpace, module: nn.Module, device: torch.device,
                 channels_last: bool) -> None:
        self.space = space
        self.name = space.name
        self.image_size = space.image_size
        self.device = device
        self.mean, self.std, self.pool = space.mean, space.std, space.pool
        self.channels_last = channels_last
        exact_float32(device)
        module = module.eval().requires_grad_(False).to(device)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self._local = threading.local()  # the hook's capture, per thread: Dask may share an extractor
        if space.layer:
            layers = dict(module.named_modules())
            if space.layer not in layers:
                names = [n for n in layers if n]
                shown = ", ".join(names[:30]) + (" ..." if len(names) > 30 else "")
                raise FeatureSpaceError(f"{space.where}.layer: {space.layer!r} is not a sub-module of "
                                        f"{space.factory}; its sub-modules: {shown}")
            layers[space.layer].register_forward_hook(self._hook)
        self.layer = space.layer
        self.where = space.where
        with torch.inference_mode():
            probe = torch.zeros((1, 3, self.image_size, self.image_size), device=device)
            self.n_features = int(self(probe, ["probe"]).shape[1])

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._local.captured = output
        raise _StopForward

    def __call__(self, base: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        x = normalize(base, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self._local.captured = None
        try:
            out = self.module(x)
        except _StopForward:
            out = self._local.captured
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise FeatureSpaceError(f"{self.where}: layer {self.layer or '<output>'} gave a "
                                    f"{type(out).__name__}, not a tensor")
        if self.pool is not None:
            if out.ndim != 4:
                raise FeatureSpaceError(f"{self.where}.pool: layer {self.layer or '<output>'} gives shape "
                                        f"{tuple(out.shape)}, not (B, C, H, W); remove 'pool'")
            out = F.adaptive_avg_pool2d(out, self.pool)
        return out.reshape(out.shape[0], -1).to(torch.float32)


# ---------------------------------------------------------------- registry and config


Builder = Callable[[str, Mapping[str, Any], str], FeatureSpace]
_KINDS: dict[str, Builder] = {}


def register_feature_space_kind(kind: str, builder: Builder) -> None:
    """Make ``kind`` usable in ``features.extra`` entries; builder(name, options, where)."""
    _KINDS[kind] = builder


def feature_space_kinds() -> tuple[str, ...]:
    return tuple(sorted(_KINDS))


def _take(options: Mapping[str, Any], allowed: Mapping[str, tuple[type, ...]], where: str) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise FeatureSpaceError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    out = {}
    for key, value in options.items():
        types = allowed[key]
        if value is not None and not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            names = " or ".join(t.__name__ for t in types)
            raise FeatureSpaceError(f"{where}.{key}: expected {names}, got {type(value).__name__} {value!r}")
        out[key] = value
    return out


def _pool(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    sizes = [value, value] if isinstance(value, int) else list(value)
    if len(sizes) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise FeatureSpaceError(f"{where}.pool: expected a positive int or [height, width], got {value!r}")
    return sizes[0], sizes[1]


def _triple(value: Any, default: tuple[float, ...], where: str) -> tuple[float, ...]:
    if value is None:
        return default
    if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise FeatureSpaceError(f"{where}: expected 3 numbers (R, G, B), got {value!r}")
    return tuple(float(v) for v in value)


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise FeatureSpaceError(f"{where}: expected a positive integer, got {value!r}")
    return value


_MODULE_KEYS: dict[str, tuple[type, ...]] = {
    "kwargs": (dict,), "state_dict": (str, os.PathLike), "sha256": (str,), "strict": (bool,),
    "layer": (str,), "pool": (int, list, tuple), "image_size": (int,), "mean": (list, tuple),
    "std": (list, tuple)}


def _module_fields(o: dict[str, Any], where: str) -> dict[str, Any]:
    return dict(
        kwargs=dict(o.get("kwargs") or {}),
        state_dict=None if o.get("state_dict") is None else Path(o["state_dict"]).expanduser(),
        sha256=o.get("sha256"), strict=o.get("strict", True), layer=o.get("layer") or "",
        pool=_pool(o.get("pool"), where),
        image_size=_positive_int(o.get("image_size", 224), f"{where}.image_size"),
        mean=_triple(o.get("mean"), IMAGENET_MEAN, f"{where}.mean"),
        std=_triple(o.get("std"), IMAGENET_STD, f"{where}.std"), where=where)


def _build_torch_module(name: str, options: Mapping[str, Any], where: str) -> FeatureSpace:
    o = _take(options, {"factory": (str,), **_MODULE_KEYS}, where)
    if "factory" not in o:
        raise FeatureSpaceError(f"{where}: a torch_module feature space needs 'factory: package.module:callable'")
    import_factory(o["factory"], f"{where}.factory")  # fail at configuration time, not mid-run
    return TorchModuleFeatureSpace(name=name, factory=o["factory"], **_module_fields(o, where))


def torchvision_get_model(model: str, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(model, weights=None, **kwargs)``, imported only now."""
    try:
        tv_models = importlib.import_module("torchvision.models")
    except Exception as e:  # ImportError, or a torchvision built for another torch failing on import
        raise FeatureSpaceError(
            f"the torchvision feature space needs torchvision, which does not import here "
            f"({type(e).__name__}: {e}); install the torchvision release matching torch "
            f"{torch.__version__}, or use kind 'torch_module' with your own factory") from None
    return tv_models.get_model(model, weights=None, **kwargs)


@dataclass(frozen=True)
class TorchvisionFeatureSpace(TorchModuleFeatureSpace):
    kind: str = "torchvision"

    def problems(self) -> list[str]:
        found = []
        try:
            importlib.import_module("torchvision.models")
        except Exception as e:
            found.append(f"{self.where}: torchvision does not import here ({type(e).__name__}: {e})")
        if self.state_dict is not None and not Path(self.state_dict).is_file():
            found.append(f"{self.where}.weights: file {self.state_dict} does not exist")
        return found


def _build_torchvision(name: str, options: Mapping[str, Any], where: str) -> FeatureSpace:
    keys = {k: v for k, v in _MODULE_KEYS.items() if k != "state_dict"}
    o = _take(options, {"model": (str,), "weights": (str, os.PathLike), **keys}, where)
    if "model" not in o:
        raise FeatureSpaceError(f"{where}: a torchvision feature space needs 'model' (e.g. resnet50)")
    if "weights" in o:
        o["state_dict"] = o.pop("weights")
    fields = _module_fields(o, where)
    fields["kwargs"] = {"model": o["model"], **fields["kwargs"]}
    return TorchvisionFeatureSpace(name=name, factory=f"{__name__}:torchvision_get_model", **fields)


def _build_taskonomy(name: str, options: Mapping[str, Any], where: str) -> FeatureSpace:
    o = _take(options, {"task": (str,), "weights_dir": (str, os.PathLike), "output": (str,),
                        "preprocessing": (str,), "noise_seed": (int,)}, where)
    task = o.get("task", name)
    if task not in task_names():
        raise FeatureSpaceError(f"{where}.task: unknown Taskonomy task {task!r}; known: {', '.join(task_names())}")
    if "weights_dir" not in o:
        raise FeatureSpaceError(f"{where}: a taskonomy feature space needs 'weights_dir'")
    return TaskonomyFeatureSpace(task=task, weights_dir=Path(o["weights_dir"]).expanduser(), name=name,
                                 **_taskonomy_options(o, where))


def _taskonomy_options(o: Mapping[str, Any], where: str) -> dict[str, Any]:
    output = o.get("output") or "taskbank"
    if output not in TASKONOMY_OUTPUTS:
        raise FeatureSpaceError(f"{where}.output: expected one of {', '.join(TASKONOMY_OUTPUTS)}, got {output!r}")
    profile = o.get("preprocessing") or "task_config"
    if profile not in PREPROCESSING_PROFILES:
        raise FeatureSpaceError(f"{where}.preprocessing: expected one of {', '.join(PREPROCESSING_PROFILES)}, "
                                f"got {profile!r}")
    seed = o.get("noise_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise FeatureSpaceError(f"{where}.noise_seed: expected an integer, got {seed!r}")
    return {"output": output, "preprocessing": profile, "noise_seed": seed}


register_feature_space_kind("taskonomy", _build_taskonomy)
register_feature_space_kind("torch_module", _build_torch_module)
register_feature_space_kind("torchvision", _build_torchvision)


def build_feature_space(entry: Mapping[str, Any], where: str = "features.extra[0]") -> FeatureSpace:
    """One ``features.extra`` entry ``{name, kind, **options}`` -> a FeatureSpace."""
    if not isinstance(entry, Mapping):
        raise FeatureSpaceError(f"{where}: expected a mapping with 'name' and 'kind', got {type(entry).__name__}")
    name, kind = entry.get("name"), entry.get("kind")
    if not isinstance(name, str) or not name or "/" in name:
        raise FeatureSpaceError(f"{where}.name: expected a non-empty name without '/', got {name!r}")
    if kind not in _KINDS:
        raise FeatureSpaceError(f"{where}.kind: expected one of {', '.join(feature_space_kinds())}, got {kind!r}")
    options = {k: v for k, v in entry.items() if k not in ("name", "kind")}
    return _KINDS[kind](name, options, where)


FEATURES_KEYS = ("weights_dir", "tasks", "output", "preprocessing", "noise_seed", "extra")


def feature_spaces_from_config(section: Mapping[str, Any], where: str = "features") -> list[FeatureSpace]:
    """All feature spaces of a ``features:`` config section, Taskonomy tasks first.

    Reads the keys in FEATURES_KEYS (the rest of the section -- device, batch size, ... -- is
    the caller's): ``tasks`` ('all' or a list of task names; default all 21), ``weights_dir``,
    ``output``, ``preprocessing``, ``noise_seed`` and ``extra`` (a list of entries, see
    build_feature_space). Names must be unique. Validates; loads nothing.
    """
    tasks = section.get("tasks", "all")
    if tasks == "all":
        tasks = task_names()
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
        raise FeatureSpaceError(f"{where}.tasks: expected 'all' or a list of task names, got {tasks!r}")
    unknown = [t for t in tasks if t not in task_names()]
    if unknown:
        raise FeatureSpaceError(f"{where}.tasks: unknown Taskonomy task(s) {', '.join(unknown)}; "
                                f"known: {', '.join(task_names())}")
    spaces: list[FeatureSpace] = []
    if tasks:
        weights_dir = section.get("weights_dir")
        if not isinstance(weights_dir, (str, os.PathLike)):
            raise FeatureSpaceError(f"{where}.weights_dir: the directory of the Taskonomy encoder checkpoints "
                                    f"is required when {where}.tasks is not empty")
        opts = _taskonomy_options(section, where)
        spaces += [TaskonomyFeatureSpace(task=t, weights_dir=Path(weights_dir).expanduser(), **opts) for t in tasks]
    extra = section.get("extra") or []
    if not isinstance(extra, list):
        raise FeatureSpaceError(f"{where}.extra: expected a list of feature spaces, got {type(extra).__name__}")
    spaces += [build_feature_space(e, f"{where}.extra[{i}]") for i, e in enumerate(extra)]
    seen: set[str] = set()
    for s in spaces:
        if s.name in seen:
            raise FeatureSpaceError(f"{where}: feature space name {s.name!r} is used twice")
        seen.add(s.name)
    return spaces


def check_feature_spaces(spaces: Sequence[FeatureSpace]) -> None:
    """Pre-flight: raise one FeatureSpaceError listing every problem of every space.

    Taskonomy spaces are checked together so a missing-weights message lists all tasks once.
    """
    problems: list[str] = []
    tk = [s for s in spaces if isinstance(s, TaskonomyFeatureSpace)]
    for weights_dir in dict.fromkeys(s.weights_dir for s in tk):
        try:
            check_weights(weights_dir, [s.task for s in tk if s.weights_dir == weights_dir])
        except WeightsError as e:
            problems.append(str(e))
    for s in spaces:
        if not isinstance(s, TaskonomyFeatureSpace):
            problems += s.problems()
    if problems:
        raise FeatureSpaceError("feature spaces cannot be loaded:\n" + "\n".join(problems))


def load_extractors(spaces: Sequence[FeatureSpace], device: str | torch.device = "auto",
                    channels_last: bool = False) -> list[Extractor]:
    """Load every feature space onto one device (resolved with ``resolve_device``)."""
    dev = resolve_device(device)
    return [s.load(dev, channels_last) for s in spaces]


def extract_batch(images: Sequence[np.ndarray], keys: Sequence[str],
                  extractors: Sequence[Extractor]) -> dict[str, np.ndarray]:
    """Features of one batch of decoded images for every extractor.

    images: B decoded (H, W, 3) uint8 RGB images (``preprocess.decode_images``), each
    cropped and resized once per distinct input size and moved to the device once; keys: B
    unique image names (they seed per-image noise, so features do not depend on batching).
    Returns {extractor name: (B, n_features) float32 numpy array}, rows in image order.
    """
    if len(images) != len(keys):
        raise ValueError(f"{len(images)} images but {len(keys)} keys")
    if not images:
        return {e.name: np.zeros((0, e.n_features), np.float32) for e in extractors}
    bases: dict[tuple[int, torch.device], torch.Tensor] = {}
    out: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for e in extractors:
            key = (e.image_size, e.device)
            if key not in bases:
                bases[key] = crop_and_resize(images, e.image_size).to(e.device)
            out[e.name] = e(bases[key], keys).to("cpu", torch.float32).numpy()
    return out


__all__ = [
    "Extractor", "FEATURES_KEYS", "exact_float32", "FeatureSpace", "FeatureSpaceError", "TaskonomyExtractor",
    "TaskonomyFeatureSpace", "TorchModuleExtractor", "TorchModuleFeatureSpace", "TorchvisionFeatureSpace",
    "build_feature_space", "check_feature_spaces", "extract_batch", "feature_space_kinds",
    "feature_spaces_from_config", "import_factory", "load_extractors", "register_feature_space_kind",
    "resolve_device", "torchvision_get_model",
]
