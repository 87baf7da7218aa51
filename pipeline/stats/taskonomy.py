"""Taskonomy's own task structure: transfer-out affinities, task similarity, task clusters.

Project data: ``pipeline/data/taskonomy_transfer_out_{16k,1k}.csv`` (the 21 Neural
Taskonomy tasks as transfer sources x the 22 Taskonomy targets; source cited in the file
header). Taskonomy builds its task tree from these transfer-out vectors; we follow the
same recipe: z-score each target column across the sources, then cosine similarity of the
sources' rows.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import numpy as np
import xarray as xr

from neurotask.pipeline.stats.similarity import cosine_similarity
from neurotask.pipeline.tasks import task_info, task_names

AFFINITY_SETS = ("16k", "1k")


@lru_cache(maxsize=len(AFFINITY_SETS))
def _read_transfer_out(size: str) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
    if size not in AFFINITY_SETS:
        raise ValueError(f"Taskonomy affinity set must be one of {', '.join(AFFINITY_SETS)}; got {size!r}")
    name = f"data/taskonomy_transfer_out_{size}.csv"
    text = resources.files("neurotask.pipeline").joinpath(name).read_text()
    rows = [row for row in csv.reader(io.StringIO(text)) if row and not row[0].startswith("#")]
    header, body = rows[0], rows[1:]
    sources = tuple(r[0] for r in body)
    values = np.array([[float(x) for x in r[1:]] for r in body])
    if values.shape != (len(sources), len(header) - 1):
        raise ValueError(f"pipeline/{name}: ragged table")
    values.setflags(write=False)
    return sources, tuple(header[1:]), values


def transfer_out_affinities(size: str = "16k", tasks: Sequence[str] | None = None) -> xr.DataArray:
    """Transfer-out affinities, dims (task, target): row = a task as source, column = target.

    ``tasks``: the sources wanted, in that order (default the 21 tasks in
    ``task_names()`` order). Unknown names raise KeyError naming them.
    """
    sources, targets, values = _read_transfer_out(size)
    tasks = list(task_names() if tasks is None else tasks)
    missing = [t for t in tasks if t not in sources]
    if missing:
        raise KeyError(f"no Taskonomy transfer-out affinities for task(s) {missing}; known: {', '.join(sources)}")
    index = [sources.index(t) for t in tasks]
    return xr.DataArray(
        values[index],
        dims=("task", "target"),
        coords={"task": tasks, "target": list(targets)},
        name="affinity",
        attrs={"affinity_set": size, "source": f"pipeline/data/taskonomy_transfer_out_{size}.csv"},
    )


def has_affinities(task: str, size: str = "16k") -> bool:
    """Whether Taskonomy's transfer-out affinities cover ``task`` (a task-bank name)."""
    return task in _read_transfer_out(size)[0]


def zscore_columns(a: np.ndarray) -> np.ndarray:
    """(sources, targets) -> same, each column centred and scaled to unit SD (constant -> 0)."""
    a = np.asarray(a, dtype=np.float64)
    c = a - a.mean(axis=0)
    sd = c.std(axis=0)
    return np.divide(c, sd, out=np.zeros_like(c), where=sd > 0)


def affinity_similarity(affinities: np.ndarray) -> np.ndarray:
    """(sources, targets) transfer-out affinities -> (sources, sources) task similarity.

    Cosine similarity of the sources' rows after z-scoring each target column across the
    sources, so that every target weighs the same whatever its affinity scale.
    """
    return cosine_similarity(zscore_columns(affinities))


def taskonomy_similarity(tasks: Sequence[str] | None = None, size: str = "16k") -> xr.DataArray:
    """Taskonomy task similarity, dims (task, task2), for ``tasks`` (default all 21).

    The z-scoring uses all 21 sources, so a task pair's similarity does not depend on which
    other tasks are asked for.
    """
    full = transfer_out_affinities(size)
    sim = affinity_similarity(full.values)
    names = list(full.task.values)
    tasks = names if tasks is None else list(tasks)
    missing = [t for t in tasks if t not in names]
    if missing:
        raise KeyError(f"no Taskonomy transfer-out affinities for task(s) {missing}")
    idx = [names.index(t) for t in tasks]
    return xr.DataArray(
        sim[np.ix_(idx, idx)],
        dims=("task", "task2"),
        coords={"task": tasks, "task2": tasks},
        name="taskonomy_similarity",
        attrs={"affinity_set": size, "recipe": "z-score target columns across 21 sources; cosine"},
    )


def taskonomy_clusters(tasks: Sequence[str]) -> np.ndarray:
    """(t,) str: each task's branch of Taskonomy's task tree (Taskonomy Fig. 14)."""
    return np.array([task_info(t).cluster for t in tasks])
