"""The 21 Taskonomy tasks of Neural Taskonomy: names, labels and Taskonomy clusters.

Project data in ``pipeline/data/taskonomy_tasks.json`` (sources cited in its ``_source``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

CLUSTERS = ("3D", "2D", "lowdim_geometric", "semantic", "outlier")


@dataclass(frozen=True)
class TaskInfo:
    name: str  # task-bank name, used everywhere in neurotask (e.g. "rgb2sfnorm")
    results_key: str  # name in Taskonomy's affinity/win-rate files
    visualpriors: str  # name in the PyTorch port's checkpoints (e.g. "normal")
    label: str  # display label used in the Neural Taskonomy figures
    taskonomy_label: str  # display label in Taskonomy's Fig. 14
    cluster: str  # one of CLUSTERS: the task's branch of Taskonomy's task tree
    is_affinity_target: bool


@lru_cache(maxsize=1)
def taskonomy_tasks() -> tuple[TaskInfo, ...]:
    """The 21 tasks, in the authors' model_config order."""
    text = resources.files("neurotask.pipeline").joinpath("data/taskonomy_tasks.json").read_text()
    return tuple(TaskInfo(**t) for t in json.loads(text)["tasks"])


def task_names() -> list[str]:
    return [t.name for t in taskonomy_tasks()]


def task_info(name: str) -> TaskInfo:
    for t in taskonomy_tasks():
        if t.name == name:
            return t
    raise KeyError(f"unknown Taskonomy task {name!r}; known: {', '.join(task_names())}")


def task_label(name: str) -> str:
    """A task's display label; another feature space (features.extra) is labelled by its name."""
    return task_info(name).label if name in task_names() else name


def task_cluster(name: str) -> str:
    return task_info(name).cluster
