"""Encoder checkpoints on disk: discovery, sha256 verification, safe loading, random stand-ins.

``features.weights_dir`` holds the PyTorch port's encoder checkpoints, downloaded beforehand
(nothing is downloaded at run time). Their names follow torch hub's convention
``<visualpriors task>_encoder-<sha256 of the file, or a prefix of it>.pth``; the digest is
checked against the file before it is loaded, and loading uses ``torch.load(...,
weights_only=True)`` so a checkpoint can hold tensors but never code.

The official files and their URL pattern come from visualpriors 0.3.5
(``taskonomy_network.TASKONOMY_PRETRAINED_WEIGHT_FILES`` and ``..._URL_TEMPLATE``).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from neurotask.pipeline.features.encoders import TaskonomyEncoder, TaskonomyOutput, encoder_from_state_dict, random_encoder
from neurotask.pipeline.tasks import task_info, task_names

WEIGHTS_URL_TEMPLATE = "https://github.com/alexsax/visual-prior/raw/networks/assets/pytorch/{filename}"

# sha256 of the official encoder checkpoint of each of the 21 tasks, by visualpriors name.
OFFICIAL_ENCODER_SHA256: dict[str, str] = {
    "autoencoding": "e35146c09253720e97c0a7f8ee4e896ac931f5faa1449df003d81e6089ac6307",
    "denoising": "b64cab95af4a2c565066a7e8effaf37d6586c3b9389b47fff9376478d849db38",
    "colorization": "5ed817acdd28d13e443d98ad15ebe1c3059a3252396a2dff6a2090f6f86616a5",
    "curvature": "3767cf5d06d9c6bca859631eb5a3c368d66abeb15542171b94188ffbe47d7571",
    "edge_texture": "be2d686a6a4dfebe968d16146a17176eba37e29f736d5cd9a714317c93718810",
    "edge_occlusion": "5ac3f3e918131f61e01fe95e49f462ae2fc56aa463f8d353ca84cd4e248b9c08",
    "keypoints2d": "6b77695acff4c84091c484a7b128a1e28a7e9c36243eda278598f582cf667fe0",
    "keypoints3d": "7e3f1ec97b82ae30030b7ea4fec2dc606b71497d8c0335d05f0be3dc909d000d",
    "segment_unsup2d": "b679053a920e8bcabf0cd454606098ae85341e054080f2be29473971d4265964",
    "segment_unsup25d": "7d12d2500c18c003ffc23943214f5dfd74932f0e3d03dde2c3a81ebc406e31a0",
    "segment_semantic": "bb3007244520fc89cd111e099744a22b1e5c98cd83ed3f116fbff6376d220127",
    "depth_zbuffer": "cc343a8ed622fd7ee3ce54398be8682bbbbfb5d11fa80e8d03a56a5ae4e11b09",
    "depth_euclidean": "88f18d41313de7dbc88314a7f0feec3023047303d94d73eb8622dc40334ef149",
    "reshading": "de456246e171dc8407fb2951539aa60d75925ae0f1dbb43f110b7768398b36a6",
    "normal": "f5e2c7737e4948e3b2a822f584892c342eaabbe66661576ba50db7cdd40561c5",
    "room_layout": "1e1662f43b834261464b1825227a04efba59b50cc8883bee9adc3ddafd4796c1",
    "vanishing_point": "afd2ae9b71d46a54efc5231b3e38ebc3e35bfab78cb0a78d9b75863a240b19a8",
    "class_object": "4a4e42dad58066039a0d2f9d128bb32e93a7e4aa52edb2d2a07bcdd1a6536c18",
    "class_scene": "ad85764467cddafd98211313ceddebb98adf2a6bee2cedfe0b922a37ae65eaf8",
    "jigsaw": "0c2b342c9080f8713c178b04aa6c581ed3a0112fecaf78edc4c04e0a90516e39",
    "inpainting": "bf96fbaaea9268a820a19a1d13dbf6af31798f8983c6d9203c00fab2d236a142",
}

MIN_DIGEST_CHARS = 8  # a shorter name digest would verify next to nothing
_ENCODER_NAME = re.compile(r"^(?P<task>[a-z0-9_]+)_encoder-(?P<digest>[0-9a-f]+)\.pth$")
_HUB_DIGEST = re.compile(rf"-(?P<digest>[0-9a-f]{{{MIN_DIGEST_CHARS},64}})\.[A-Za-z0-9]+$")


class WeightsError(RuntimeError):
    """Checkpoints are missing, corrupt or unusable; ``problems`` maps each task (or file) to why."""

    def __init__(self, message: str, problems: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.problems = dict(problems or {})


def checkpoint_filename(task: str, digest: str) -> str:
    """File name of ``task``'s encoder checkpoint whose sha256 is (or starts with) ``digest``."""
    return f"{task_info(task).visualpriors}_encoder-{digest}.pth"


def official_filename(task: str) -> str:
    return checkpoint_filename(task, OFFICIAL_ENCODER_SHA256[task_info(task).visualpriors])


def official_url(task: str) -> str:
    return WEIGHTS_URL_TEMPLATE.format(filename=official_filename(task))


def download_instructions(tasks: Iterable[str], weights_dir: str | os.PathLike) -> str:
    """Where to get the encoders of ``tasks`` (nothing is downloaded at run time)."""
    lines = [f"Download these checkpoints into {weights_dir} (e.g. with curl -LO), then run again:"]
    lines += [f"  {official_url(t)}" for t in tasks]
    lines.append(f"URL pattern: {WEIGHTS_URL_TEMPLATE.format(filename='<visualpriors task>_encoder-<sha256>.pth')}")
    return "\n".join(lines)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def name_digest(path: str | os.PathLike) -> str | None:
    """The sha256 (prefix) a torch-hub style file name ``<stem>-<hex>.<ext>`` claims, if any."""
    m = _HUB_DIGEST.search(Path(path).name)
    return m.group("digest") if m else None


def verify_digest(data_digest: str, claimed: str, path: str | os.PathLike) -> None:
    if len(claimed) < MIN_DIGEST_CHARS:
        raise WeightsError(f"{path}: the name's sha256 prefix {claimed!r} is shorter than "
                           f"{MIN_DIGEST_CHARS} characters")
    if not data_digest.startswith(claimed.lower()):
        raise WeightsError(
            f"{path} is corrupt or incomplete: its sha256 is {data_digest[:16]}..., "
            f"the file name says {claimed[:16]}...")


def find_checkpoint(weights_dir: str | os.PathLike, task: str) -> Path:
    """The one ``<visualpriors>_encoder-<hex>.pth`` file of ``task`` in ``weights_dir``.

    Raises WeightsError if there is none or more than one (an ambiguous directory).
    """
    vp = task_info(task).visualpriors
    directory = Path(weights_dir)
    if not directory.is_dir():
        raise WeightsError(f"weights directory {directory} does not exist")
    found = sorted(p for p in directory.iterdir()
                   if (m := _ENCODER_NAME.match(p.name)) and m.group("task") == vp and p.is_file())
    if not found:
        raise WeightsError(f"no {vp}_encoder-<sha256>.pth in {directory}", {task: "missing"})
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise WeightsError(f"several checkpoints for {task} ({vp}) in {directory}: {names}; keep one",
                           {task: f"ambiguous: {names}"})
    return found[0]


def verify_checkpoint(path: str | os.PathLike) -> str:
    """Check the file's sha256 against the digest in its name; returns the full sha256."""
    claimed = name_digest(path)
    if claimed is None:
        raise WeightsError(f"{path}: the file name carries no '-<sha256>' digest to verify")
    digest = sha256_file(path)
    verify_digest(digest, claimed, path)
    return digest


def check_weights(weights_dir: str | os.PathLike, tasks: Iterable[str] | None = None,
                  load: bool = False) -> dict[str, Path]:
    """Pre-flight check before any work: every task's checkpoint present and verified.

    Returns {task: path}. Raises one WeightsError listing every missing, ambiguous or corrupt
    checkpoint, with the URLs to download the missing ones. ``load=True`` also loads each
    checkpoint and checks its keys and shapes (slower: reads every file twice).
    """
    tasks = list(task_names() if tasks is None else tasks)
    directory = Path(weights_dir)
    if not directory.is_dir():
        raise WeightsError(f"features.weights_dir {directory} does not exist.\n"
                           + download_instructions(tasks, directory), {t: "missing" for t in tasks})
    paths: dict[str, Path] = {}
    problems: dict[str, str] = {}
    for task in tasks:
        try:
            path = find_checkpoint(directory, task)
            verify_checkpoint(path)
            if load:
                load_taskonomy_encoder(task, path, verify=False)
            paths[task] = path
        except WeightsError as e:
            problems[task] = e.problems.get(task, str(e))
    if problems:
        vp = {t: task_info(t).visualpriors for t in problems}
        lines = [f"  {t} ({vp[t]}): {why}" for t, why in problems.items()]
        to_get = [t for t, why in problems.items() if why == "missing" or "corrupt" in why]
        msg = (f"{len(problems)} Taskonomy encoder checkpoint(s) missing or unusable in {directory}:\n"
               + "\n".join(lines))
        if to_get:
            msg += "\n" + download_instructions(to_get, directory)
        raise WeightsError(msg, problems)
    return paths


def state_dict_from(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: ``{'state_dict': {...}}`` or a bare state dict."""
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{where} holds no state dict (expected {{'state_dict': {{name: tensor}}}})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{where}: state dict entries that are not named tensors: {bad[:5]}")
    return dict(obj)


def load_state_dict(path: str | os.PathLike, expected_sha256: str | None = None,
                    verify: bool = True) -> dict[str, torch.Tensor]:
    """Read a checkpoint once, verify its sha256, and unpickle it with ``weights_only=True``.

    The digest checked is ``expected_sha256`` if given, else the one in a torch-hub style
    file name (``...-<hex>.pth``) if present; ``verify=False`` skips the check (already done).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"cannot read checkpoint {path}: {e}") from None
    claimed = expected_sha256 or name_digest(path)
    if verify and claimed:
        verify_digest(hashlib.sha256(data).hexdigest(), claimed, path)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        raise WeightsError(f"cannot load checkpoint {path} safely (weights_only=True): "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return state_dict_from(obj, str(path))


def load_taskonomy_encoder(task: str, path: str | os.PathLike, output: TaskonomyOutput = "taskbank",
                           verify: bool = True) -> TaskonomyEncoder:
    """``task``'s encoder with the weights of checkpoint ``path`` (verified, safely loaded)."""
    state = load_state_dict(path, verify=verify)
    try:
        return encoder_from_state_dict(task, state, output, where=str(path))
    except ValueError as e:
        raise WeightsError(str(e), {task: str(e)}) from None


def _task_seed(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{int(seed)}\x00{task}".encode()).digest()[:8], "little") & (2**63 - 1)


def write_random_checkpoints(weights_dir: str | os.PathLike, tasks: Iterable[str] | None = None,
                             seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write randomly initialised encoders in the official format, for the demo and CI.

    Each file is ``{'state_dict': ...}`` named ``<visualpriors>_encoder-<sha256>.pth`` (the
    full digest of its bytes), reproducible from ``seed``. A task that already has a verified
    checkpoint in ``weights_dir`` keeps it unless ``overwrite``. About 95 MB per task.
    Returns {task: path}.
    """
    directory = Path(weights_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for task in list(task_names() if tasks is None else tasks):
        if not overwrite:
            try:
                existing = find_checkpoint(directory, task)
                verify_checkpoint(existing)
                paths[task] = existing
                continue
            except WeightsError:
                pass
        for old in directory.glob(f"{task_info(task).visualpriors}_encoder-*.pth"):
            old.unlink()
        encoder = random_encoder(task, _task_seed(seed, task))
        tmp = directory / f".{task}-{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "xb") as f:  # plain open: the umask's permissions, unlike mkstemp's 0600
                torch.save({"state_dict": encoder.state_dict()}, f)
            final = directory / checkpoint_filename(task, sha256_file(tmp))
            os.replace(tmp, final)  # atomic: a killed writer never leaves a valid-looking file
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paths[task] = final
    return paths


__all__ = [
    "MIN_DIGEST_CHARS", "OFFICIAL_ENCODER_SHA256", "WEIGHTS_URL_TEMPLATE", "WeightsError", "check_weights",
    "checkpoint_filename", "download_instructions", "find_checkpoint", "load_state_dict",
    "load_taskonomy_encoder", "name_digest", "official_filename", "official_url", "sha256_file",
    "state_dict_from", "verify_checkpoint", "write_random_checkpoints",
]
