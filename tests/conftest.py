"""Shared fixtures: small simulated studies written in BOLD5000's formats, and the reference
data shipped beside the checkout (../shared/reference)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# A compact study: 2 subjects, 300 images, tasks from four Taskonomy clusters, the paper's
# protocol with a shorter alpha grid so the whole suite stays fast on 2 cores.
SMALL_TASKS = ["edge2d", "keypoint2d", "keypoint3d", "rgb2depth", "class_1000", "class_places"]


def small_config_dict(workdir: Path, **sections) -> dict:
    cfg = {
        "study": {"name": "small", "workdir": str(workdir), "subjects": ["CSI1", "CSI2"], "tasks": SMALL_TASKS},
        "simulate": {"seed": 3, "n_images": 300, "n_repeated": 30, "n_showings": 3, "n_sessions": 2,
                     "n_features": 48, "volume_shape": [16, 16, 10], "signal_variance": [0.3, 1.0]},
        "data": {"chunk_size": 250},
        "fit": {"n_alphas": 20, "n_folds": 5, "n_permutations": 200},
        "cluster": {"kind": "local", "n_workers": 2, "dashboard_address": "127.0.0.1:0"},
    }
    for name, values in sections.items():
        if values is None:
            cfg.pop(name, None)
        else:
            cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def small_study(tmp_path_factory) -> Path:
    """Config path of a small study that has been simulated, ingested and fitted once."""
    from neurotask.pipeline import cli

    d = tmp_path_factory.mktemp("small")
    path = write_config(d / "study.yaml", small_config_dict(d / "work"))
    assert cli.main(["run", "--config", str(path)]) == 0
    return path


class _ListHandler(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(logging.INFO)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def collect_logs() -> Iterator[list[str]]:
    """The messages of the ``neurotask`` logger (INFO and up) while the block runs, in order."""
    messages: list[str] = []
    logger = logging.getLogger("neurotask")
    handler, level = _ListHandler(messages), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """The ``neurotask`` logger's messages during the test."""
    with collect_logs() as messages:
        yield messages


def reference_path() -> Path:
    """The real reference data: ../shared/reference beside the checkout (CI lays it there)."""
    path = ROOT.parent / "shared" / "reference"
    if not path.is_dir():
        raise RuntimeError(f"{path} is missing: the tests need ../shared/reference beside the checkout")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return reference_path()


@pytest.fixture(autouse=True, scope="session")
def _quiet_dask():
    os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "warning")
    yield


def pytest_configure(config):
    # One torch thread: the encoder tests' tiny batches gain nothing from more, and on a shared
    # 2-core machine oversubscribed torch threads slow them down several-fold.
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.set_num_threads(1)
