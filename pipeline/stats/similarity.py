"""Brain-derived task similarity, task trees and their comparison. Pure array code: no I/O.

Conventions: ``t`` tasks, ``v`` voxels, ``b`` bootstrap resamples, ``m = t (t - 1) / 2``
task pairs. A *performance matrix* (t, v) holds each task's test r per voxel with the
voxels that are not significant for that task set to 0 (Neural Taskonomy §2.4). Similarity
matrices are (t, t), symmetric. Condensed vectors (m,) list the upper triangle row by row,
the order of ``scipy.spatial.distance.squareform``.

A task with no significant voxel has a zero row: its similarity to every task, itself
included, is 0 (as ``sklearn.metrics.pairwise.cosine_similarity`` gives), never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import numpy as np
from scipy import stats
from scipy.cluster import hierarchy

from sklearn.metrics import adjusted_rand_score

METRICS = ("cosine", "pearson", "jaccard")
LINKAGES = ("average", "complete", "single", "weighted", "ward")


# --------------------------------------------------------------------------- matrices


def performance_matrix(r: np.ndarray, significant: np.ndarray) -> np.ndarray:
    """(t, v) r and (t, v) bool -> (t, v) float64 r with non-significant (or NaN) voxels 0."""
    r = np.asarray(r, dtype=np.float64)
    significant = np.asarray(significant, dtype=bool)
    if r.shape != significant.shape or r.ndim != 2:
        raise ValueError(
            f"r and significant must be (tasks, voxels) of one shape, got {r.shape} and "
            f"{significant.shape}"
        )
    return np.where(significant & np.isfinite(r), r, 0.0)


def _normalised_gram(gram: np.ndarray) -> np.ndarray:
    """(..., t, t) Gram matrices -> (..., t, t) G_ij / sqrt(G_ii G_jj); 0 where G_ii = 0."""
    d = np.sqrt(np.clip(np.diagonal(gram, axis1=-2, axis2=-1), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d > 0, 1.0 / d, 0.0)
    sim = gram * inv[..., :, None] * inv[..., None, :]
    return np.clip(sim, -1.0, 1.0)


def cosine_similarity(m: np.ndarray) -> np.ndarray:
    """(t, v) -> (t, t) cosine similarity between rows; zero rows give 0 everywhere."""
    m = np.asarray(m, dtype=np.float64)
    return _normalised_gram(m @ m.T)


def pearson_similarity(m: np.ndarray) -> np.ndarray:
    """(t, v) -> (t, t) Pearson correlation between rows; constant rows give 0 everywhere."""
    m = np.asarray(m, dtype=np.float64)
    c = m - m.mean(axis=1, keepdims=True)
    # A row that is constant up to rounding has no correlation with anything.
    scale = np.abs(m).max(axis=1, initial=0.0) * np.sqrt(m.shape[1])
    c[np.sqrt((c * c).sum(axis=1)) <= 1e-12 * np.maximum(scale, 1e-300)] = 0.0
    return _normalised_gram(c @ c.T)


def jaccard_similarity(significant: np.ndarray) -> np.ndarray:
    """(t, v) bool -> (t, t) |A ∩ B| / |A ∪ B| of the significant-voxel sets; empty union 0."""
    s = np.asarray(significant, dtype=np.float64)
    inter = s @ s.T
    n = s.sum(axis=1)
    union = n[:, None] + n[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def task_similarity(r: np.ndarray, significant: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """(t, v) r and (t, v) bool significance -> (t, t) task similarity under ``metric``."""
    _check_metric(metric)
    if metric == "jaccard":
        return jaccard_similarity(significant)
    m = performance_matrix(r, significant)
    return cosine_similarity(m) if metric == "cosine" else pearson_similarity(m)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")


def upper_triangle(mat: np.ndarray) -> np.ndarray:
    """(..., t, t) -> (..., m) entries above the diagonal, in squareform order."""
    mat = np.asarray(mat)
    iu = np.triu_indices(mat.shape[-1], k=1)
    return mat[..., iu[0], iu[1]]


# --------------------------------------------------------------------------- bootstrap


def bootstrap_counts(
    n_voxels: int, n_bootstrap: int, rng: np.random.Generator, columns: np.ndarray | None = None
) -> np.ndarray:
    """How often each voxel is drawn in ``n_bootstrap`` resamples of ``n_voxels`` voxels.

    Returns (b, v) float64 counts (each row sums to ``n_voxels``), or (b, len(columns)) when
    only ``columns`` (indices) are wanted: voxels that are zero in every task need no weight.
    """
    draws = rng.integers(0, n_voxels, size=(n_bootstrap, n_voxels))
    flat = draws + (np.arange(n_bootstrap) * n_voxels)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_bootstrap * n_voxels)
    counts = counts.reshape(n_bootstrap, n_voxels)
    if columns is not None:
        counts = counts[:, columns]
    return counts.astype(np.float64)


def _profiles(r: np.ndarray, significant: np.ndarray, metric: str) -> np.ndarray:
    """(t, v) task profiles the metric compares: masked r, or the 0/1 significance."""
    if metric == "jaccard":
        return np.asarray(significant, dtype=np.float64)
    return performance_matrix(r, significant)


def _pair_products(x: np.ndarray) -> np.ndarray:
    """(t, v) -> (t(t+1)/2, v): x_i * x_j per voxel for each task pair i <= j."""
    iu, ju = np.triu_indices(x.shape[0])
    return x[iu] * x[ju]


def _weighted(x: np.ndarray, products: np.ndarray, w: np.ndarray, metric: str, n_voxels: int) -> np.ndarray:
    """(t, v) profiles, their (p, v) pair products, (b, v) weights -> (b, t, t) similarity.

    Row k equals the similarity of a resample in which voxel v is drawn ``w[k, v]`` times,
    in one matrix product: the weighted Gram matrix is W @ P with P[v] the outer product of
    voxel v's task profile (upper triangle). ``n_voxels``: size of each resample, needed by
    ``pearson`` because the columns given are only the voxels that are non-zero somewhere.
    """
    t = x.shape[0]
    iu, ju = np.triu_indices(t)
    gram = np.empty((w.shape[0], t, t))
    flat = w @ products.T  # (b, t(t+1)/2)
    gram[:, iu, ju] = flat
    gram[:, ju, iu] = flat
    if metric == "cosine":
        return _normalised_gram(gram)
    if metric == "jaccard":
        n = np.diagonal(gram, axis1=1, axis2=2)
        union = n[:, :, None] + n[:, None, :] - gram
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, gram / union, 0.0)
    # pearson: weighted covariance from weighted sums and products
    sums = w @ x.T  # (b, t)
    cov = gram - sums[:, :, None] * sums[:, None, :] / float(n_voxels)
    var = np.diagonal(cov, axis1=1, axis2=2)
    sq = np.diagonal(gram, axis1=1, axis2=2)
    constant = var <= 1e-12 * np.maximum(sq, 1e-300)
    cov = np.where(constant[:, :, None] | constant[:, None, :], 0.0, cov)
    return _normalised_gram(cov)


def bootstrap_similarity(
    r: np.ndarray,
    significant: np.ndarray,
    n_bootstrap: int,
    rng: np.random.Generator,
    metric: str = "cosine",
    batch: int = 25,
) -> np.ndarray:
    """Similarity of voxel-resampled data. (t, v), (t, v) -> (b, t, t).

    Voxels are resampled with replacement (the significance mask travels with its voxel),
    ``batch`` resamples at a time. Only voxels significant for some task carry weight, so
    the cost beyond drawing the resamples scales with those.
    """
    _check_metric(metric)
    significant = np.asarray(significant, dtype=bool)
    n_voxels = significant.shape[1]
    active = np.flatnonzero(significant.any(axis=0))
    x = _profiles(np.asarray(r)[:, active], significant[:, active], metric)
    products = _pair_products(x)
    out = np.empty((n_bootstrap, significant.shape[0], significant.shape[0]))
    for start in range(0, n_bootstrap, batch):
        stop = min(start + batch, n_bootstrap)
        w = bootstrap_counts(n_voxels, stop - start, rng, columns=active)
        out[start:stop] = _weighted(x, products, w, metric, n_voxels)
    return out


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> np.ndarray:
    """(b, ...) samples -> (..., 2) lower and upper percentile bounds (NaN samples ignored)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    q = 100.0 * np.array([(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    samples = np.asarray(samples)
    percentile = np.nanpercentile if np.isnan(samples).any() else np.percentile
    return np.moveaxis(percentile(samples, q, axis=0), 0, -1)


# --------------------------------------------------------------------------- trees


def similarity_to_distance(similarity: np.ndarray, linkage: str = "average") -> np.ndarray:
    """(t, t) similarity -> (m,) condensed distance for ``linkage``.

    ``1 - s`` (cosine distance) for average/complete/single/weighted. For ward,
    ``sqrt(2 (1 - s))``: for cosine similarity that is the Euclidean distance between the
    L2-normalised task profiles, the space where ward's variance criterion is defined.
    """
    _check_linkage(linkage)
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be a square (tasks, tasks) matrix, got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("similarity contains NaN or infinite entries")
    s = (s + s.T) / 2.0
    d = np.clip(1.0 - upper_triangle(s), 0.0, None)
    return np.sqrt(2.0 * d) if linkage == "ward" else d


def _check_linkage(linkage: str) -> None:
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {', '.join(LINKAGES)}; got {linkage!r}")


def task_linkage(similarity: np.ndarray, linkage: str = "average") -> np.ndarray:
    """(t, t) similarity -> (t - 1, 4) scipy linkage matrix (left, right, distance, size)."""
    d = similarity_to_distance(similarity, linkage)
    return hierarchy.linkage(d, method=linkage)


def cut_tree(linkage_matrix: np.ndarray, n_clusters: int) -> np.ndarray:
    """(t - 1, 4) linkage -> (t,) int cluster labels 0..k-1 of the tree cut into k groups.

    The groups are the clusters present after the first t - k merges (exactly k, whatever
    the merge heights). Labels are numbered in order of first appearance along the tasks.
    """
    n = linkage_matrix.shape[0] + 1
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be between 1 and the number of tasks ({n}), got {n_clusters}")
    cluster_of = np.arange(n)  # current cluster id of each task
    for step, (left, right, _, _) in enumerate(linkage_matrix[: n - n_clusters]):
        cluster_of[np.isin(cluster_of, (int(left), int(right)))] = n + step
    _, first, inverse = np.unique(cluster_of, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]


def dendrogram_leaves(linkage_matrix: np.ndarray) -> np.ndarray:
    """(t - 1, 4) linkage -> (t,) task indices in the dendrogram's left-to-right leaf order."""
    return np.asarray(hierarchy.dendrogram(linkage_matrix, no_plot=True)["leaves"])


def cophenetic_distances(linkage_matrix: np.ndarray) -> np.ndarray:
    """(t - 1, 4) linkage -> (m,) condensed cophenetic distances (merge height of each pair)."""
    return hierarchy.cophenet(linkage_matrix)


def cophenetic_correlation(linkage_a: np.ndarray, linkage_b: np.ndarray) -> float:
    """Pearson correlation between the cophenetic distances of two trees on the same tasks."""
    a, b = cophenetic_distances(linkage_a), cophenetic_distances(linkage_b)
    if a.shape != b.shape:
        raise ValueError(f"trees differ in size: {a.size} vs {b.size} task pairs")
    return _pearson(a, b)


def task_graph(
    similarity: np.ndarray,
    tasks: Sequence[str],
    neighbours: int,
    node_attributes: dict[str, dict] | None = None,
) -> nx.Graph:
    """(t, t) similarity -> undirected graph: one node per task, each joined to its
    ``neighbours`` most similar other tasks (positive, finite similarity only; ties in task
    order); edge weight = similarity.

    ``node_attributes``: per task name, a dict of attributes for its node (label, cluster).
    """
    s = np.array(similarity, dtype=np.float64)
    if s.shape != (len(tasks), len(tasks)):
        raise ValueError(f"similarity is {s.shape} but {len(tasks)} task names were given")
    np.fill_diagonal(s, -np.inf)
    g = nx.Graph()
    for name in tasks:
        g.add_node(name, **(node_attributes or {}).get(name, {}))
    for i, name in enumerate(tasks):
        for j in np.argsort(-s[i], kind="stable")[:neighbours]:
            if np.isfinite(s[i, j]) and s[i, j] > 0:
                g.add_edge(name, tasks[j], weight=float(s[i, j]))
    return g


# --------------------------------------------------------------------------- comparison


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(k, m), (m,) -> (k,) Pearson r of each row of ``a`` with ``b``; NaN for constant rows."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean()
    den = np.sqrt((a * a).sum(axis=-1) * (b * b).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (a @ b) / den, np.nan)


def batch_spearman(samples: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(b, t, t) matrices and a (t, t) reference -> (b,) Spearman of upper triangles."""
    ranks = stats.rankdata(upper_triangle(samples), axis=-1)
    return _row_pearson(ranks, stats.rankdata(upper_triangle(reference)))


def mantel_test(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_permutations: int = 1000,
    seed: int | np.random.Generator = 0,
    method: str = "spearman",
    alternative: str = "greater",
) -> tuple[float, float]:
    """Mantel test between two (t, t) symmetric matrices -> (statistic, p-value).

    The statistic is the Spearman (or Pearson) correlation of the upper triangles; the null
    distribution permutes the task labels of ``a`` (rows and columns together). p counts the
    observed statistic as one of the permutations: (1 + #{null >= obs}) / (1 + n).
    ``alternative``: "greater" (association is positive) or "two-sided" (|null| >= |obs|).
    """
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    if alternative not in ("greater", "two-sided"):
        raise ValueError(f"alternative must be 'greater' or 'two-sided', got {alternative!r}")
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 3:
        raise ValueError(f"Mantel test needs two square matrices of >= 3 tasks, got {a.shape}, {b.shape}")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    t = a.shape[0]
    va, vb = upper_triangle(a), upper_triangle(b)
    if method == "spearman":
        # Permuting labels only rearranges a's entries, so their ranks travel with them.
        va, vb = stats.rankdata(va), stats.rankdata(vb)
    observed = _pearson(va, vb)
    full = np.zeros((t, t))
    iu, ju = np.triu_indices(t, k=1)
    full[iu, ju] = va
    full[ju, iu] = va
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    perms = rng.permuted(np.tile(np.arange(t), (n_permutations, 1)), axis=1)
    null = _row_pearson(full[perms[:, iu], perms[:, ju]], vb)
    if alternative == "greater":
        extreme = np.sum(null >= observed - 1e-12)
    else:
        extreme = np.sum(np.abs(null) >= abs(observed) - 1e-12)
    return observed, float((1 + extreme) / (1 + n_permutations))


def adjusted_rand_index(labels_a: Sequence, labels_b: Sequence) -> float:
    """Adjusted Rand index between two partitions of the same tasks (labels of any type)."""
    if len(labels_a) != len(labels_b):
        raise ValueError(f"partitions differ in length: {len(labels_a)} vs {len(labels_b)}")
    return float(adjusted_rand_score(np.asarray(labels_a), np.asarray(labels_b)))


def subject_correlations(similarities: np.ndarray) -> np.ndarray:
    """(s, t, t) per-subject similarity -> (s, s) Pearson r between their upper triangles."""
    tri = upper_triangle(np.asarray(similarities, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.corrcoef(tri) if tri.shape[0] > 1 else np.ones((1, 1))


# --------------------------------------------------------------------------- ROIs


def roi_summary(
    r: np.ndarray, significant: np.ndarray, roi_labels: np.ndarray, rois: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per-ROI statistics of each task's voxels (Figure 1).

    (t, v) r, (t, v) bool, (v,) str labels, R names -> dict of ``mean_r`` (t, R),
    ``sem_r`` (t, R) (standard error of the mean), ``fraction_significant`` (t, R) and
    ``n_voxels`` (R,). NaN r are left out of the mean; an ROI without voxels gives NaN.
    """
    r = np.asarray(r, dtype=np.float64)
    significant = np.asarray(significant, dtype=bool)
    labels = np.asarray(roi_labels)
    t = r.shape[0]
    out = {
        "mean_r": np.full((t, len(rois)), np.nan),
        "sem_r": np.full((t, len(rois)), np.nan),
        "fraction_significant": np.full((t, len(rois)), np.nan),
        "n_voxels": np.zeros(len(rois), dtype=np.int64),
    }
    for k, roi in enumerate(rois):
        sel = labels == roi
        n = int(sel.sum())
        out["n_voxels"][k] = n
        if n == 0:
            continue
        x = r[:, sel]
        finite = np.isfinite(x)
        cnt = finite.sum(axis=1)
        xs = np.where(finite, x, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = xs.sum(axis=1) / cnt
            var = np.where(finite, (x - mean[:, None]) ** 2, 0.0).sum(axis=1) / (cnt - 1)
            out["mean_r"][:, k] = mean
            out["sem_r"][:, k] = np.sqrt(var / cnt)
        out["fraction_significant"][:, k] = significant[:, sel].mean(axis=1)
    return out


def contrast_wins(
    r_a: np.ndarray, r_b: np.ndarray, considered: np.ndarray, group: np.ndarray, n_groups: int
) -> dict[str, np.ndarray]:
    """Where task a predicts better than task b, counted per voxel group.

    (v,) r of a, (v,) r of b, (v,) bool voxels to count, (v,) int group per voxel (-1 for
    none) -> dict of ``n_wins`` (G,) voxels with r_a > r_b, ``n_voxels`` (G,) voxels
    counted, ``mean_difference`` (G,) mean of r_a - r_b (NaN for an empty group).
    """
    diff = np.asarray(r_a, dtype=np.float64) - np.asarray(r_b, dtype=np.float64)
    keep = np.asarray(considered, dtype=bool) & np.isfinite(diff) & (np.asarray(group) >= 0)
    g = np.asarray(group)[keep]
    d = diff[keep]
    n = np.bincount(g, minlength=n_groups)[:n_groups]
    wins = np.bincount(g, weights=(d > 0).astype(np.float64), minlength=n_groups)[:n_groups]
    total = np.bincount(g, weights=d, minlength=n_groups)[:n_groups]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, total / n, np.nan)
    return {"n_wins": wins.astype(np.int64), "n_voxels": n.astype(np.int64), "mean_difference": mean}
