"""Taskonomy transfer-out affinities shipped as project data, and Taskonomy task similarity."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

from neurotask.pipeline.stats import similarity as S
from neurotask.pipeline.stats.taskonomy import (
    affinity_similarity,
    has_affinities,
    taskonomy_clusters,
    taskonomy_similarity,
    transfer_out_affinities,
    zscore_columns,
)
from neurotask.pipeline.tasks import task_names


from conftest import reference_path as _reference  # noqa: E402


@pytest.mark.parametrize("size", ["16k", "1k"])
def test_shipped_affinities_equal_the_reference_table(size):
    path = _reference() / "taskonomy" / "csv" / f"transfer_out_nt21_all_affinities_{size}.csv"
    rows = list(csv.reader(path.open()))
    targets = rows[0][1:]
    ref = {r[0]: [float(x) for x in r[1:]] for r in rows[1:]}
    a = transfer_out_affinities(size)
    assert a.dims == ("task", "target")
    assert list(a.task.values) == task_names()
    assert list(a.target.values) == targets and len(targets) == 22
    for task in task_names():
        np.testing.assert_array_equal(a.sel(task=task).values, ref[task])


def test_task_subset_and_unknown_task():
    a = transfer_out_affinities("16k", ["jigsaw", "denoise"])
    np.testing.assert_array_equal(a.values, transfer_out_affinities("16k").sel(task=["jigsaw", "denoise"]).values)
    with pytest.raises(KeyError, match="no_such_task"):
        transfer_out_affinities("16k", ["no_such_task"])
    with pytest.raises(ValueError, match="affinity set"):
        transfer_out_affinities("4k")
    assert has_affinities("rgb2sfnorm") and not has_affinities("depth")


def test_zscore_columns_matches_scipy_and_handles_constant_columns():
    x = np.random.default_rng(0).normal(size=(6, 4))
    x[:, 2] = 3.0
    z = zscore_columns(x)
    np.testing.assert_allclose(z[:, [0, 1, 3]], stats.zscore(x[:, [0, 1, 3]], axis=0))
    np.testing.assert_array_equal(z[:, 2], 0.0)


def test_affinity_similarity_is_cosine_of_zscored_columns():
    a = transfer_out_affinities("16k").values
    expected = sk_cosine(stats.zscore(a, axis=0, ddof=1))  # scale of z-scores does not matter
    np.testing.assert_allclose(affinity_similarity(a), expected, atol=1e-12)


def test_taskonomy_similarity_subset_is_submatrix_of_the_full_one():
    full = taskonomy_similarity()
    sub = taskonomy_similarity(["rgb2depth", "class_places", "edge2d"])
    np.testing.assert_allclose(sub.values, full.sel(task=sub.task.values, task2=sub.task.values).values)
    np.testing.assert_allclose(full.values, full.values.T)
    np.testing.assert_allclose(np.diag(full.values), 1.0)
    assert full.dims == ("task", "task2")


def _groups(labels, tasks):
    out = {}
    for label, task in zip(labels, tasks):
        out.setdefault(label, set()).add(task)
    return sorted(map(frozenset, out.values()), key=sorted)


def test_the_recipe_recovers_taskonomys_tree_branches():
    """Z-score columns, cosine, average linkage, 4 clusters -> Taskonomy's Fig. 14 groups.

    With the 1k affinities the only difference is Denoising (alone in Fig. 14) joining the
    2D branch; with 16k, Jigsaw (low-dimensional in Fig. 14) joins the 2D branch as well.
    """
    tasks = task_names()
    fig14 = dict(zip(tasks, taskonomy_clusters(tasks)))
    two_d = {t for t in tasks if fig14[t] == "2D"}
    three_d = {t for t in tasks if fig14[t] == "3D"}
    semantic = {t for t in tasks if fig14[t] == "semantic"}
    lowdim = {t for t in tasks if fig14[t] == "lowdim_geometric"}
    assert len(three_d) == 8 and len(two_d) == 6 and len(semantic) == 3 and len(lowdim) == 3
    for size, moved in (("1k", {"denoise"}), ("16k", {"denoise", "jigsaw"})):
        labels = S.cut_tree(S.task_linkage(taskonomy_similarity(size=size).values, "average"), 4)
        expected = [two_d | moved, three_d, semantic, lowdim - moved]
        assert _groups(labels, tasks) == sorted(map(frozenset, expected), key=sorted)


def test_taskonomy_clusters_come_from_the_task_table():
    assert list(taskonomy_clusters(["rgb2sfnorm", "class_1000", "denoise"])) == ["3D", "semantic", "outlier"]
