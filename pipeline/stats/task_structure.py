"""The analysis stage: per-subject voxelwise results -> brain task structure, as xarray.

``analyse`` takes fitted results (it never fits anything) and returns one Dataset holding
the paper's analyses and our comparison with Taskonomy. The maths lives in
``pipeline.stats.similarity`` (pure) and ``pipeline.stats.taskonomy``; this module only labels arrays.

Input, per subject: an ``xr.Dataset`` with dims (task, voxel), variables ``r`` and
``pvalue`` (plus ``pvalue_perm`` for ``significance="permutation"``, ``significant`` for
``significance="stored"``) and a coordinate ``roi``
(str per voxel, '' for none) on voxel. Every subject must have the same tasks.

Output dims: subject, subject2, task, task2, roi, roi_group, contrast, bound
("lower", "upper"), merge (t - 1 merges of a tree), linkage_field (left, right,
distance, size), leaf (dendrogram order). Variables:

====================================  =====================================================
n_voxels (subject)                     voxels in each subject's results
n_significant (subject, task)          voxels significant for the task
no_significant_voxel (subject, task)   the task has none: its similarity row is all 0
similarity (subject, task, task2)      per-subject task similarity (``metric``)
similarity_mean (task, task2)          mean over subjects
similarity_ci (subject, task, task2,   bootstrap-over-voxels percentile interval
  bound), similarity_mean_ci
subject_correlation (subject,          Pearson r between subjects' similarity upper
  subject2)                              triangles (the authors' cross-subject check)
linkage (subject, merge,               scipy linkage matrix of each subject's tree
  linkage_field), linkage_mean
cluster (subject, task), cluster_mean  tree cut into ``n_clusters`` groups (0..k-1)
leaves (subject, leaf), leaves_mean    task index at each dendrogram leaf position
cophenetic_mean (task, task2)          merge height of each task pair in the mean tree
taskonomy_similarity (task, task2)     Taskonomy similarity (NaN for tasks it lacks)
taskonomy_cluster (task) str coord     the task's branch of Taskonomy's tree ('' if none)
taskonomy_tree_cluster (task)          Taskonomy's tree (same linkage) cut at k (-1 if none)
spearman_taskonomy (subject), _mean    Spearman r, brain vs Taskonomy upper triangles
mantel_p (subject), mantel_p_mean      its Mantel permutation p (one-sided, r > 0)
spearman_taskonomy_ci (subject,        its bootstrap-over-voxels percentile interval
  bound), spearman_taskonomy_mean_ci
ari_taskonomy (subject), _mean         ARI: brain tree cut at k vs Taskonomy's clusters
ari_taskonomy_tree (subject), _mean    ARI: brain tree cut at k vs Taskonomy's tree cut at k
cophenetic_correlation_taskonomy       Pearson r of the cophenetic distances of the brain
  (subject), _mean                       and Taskonomy trees
roi_mean_r, roi_sem_r,                 Figure 1: mean r (and its SEM) and the fraction of
  roi_fraction_significant (subject,     significant voxels per ROI
  task, roi); roi_n_voxels (subject,
  roi)
roi_p, roi_q, roi_significant          Figure 1's ROI-level test: Simes combination of the
  (subject, task, roi)                   ROI's voxel p-values (the ``significance`` setting's
                                         p), BH-corrected over the subject's (task, ROI)
                                         cells, significant at q < ``fdr``
roi_noise_ceiling (subject, roi)       mean over the ROI's voxels of the correlation noise
                                         ceiling (NaN without one)
roi_noise_normalized_r (subject,       median over the ROI's voxels of r / noise ceiling
  task, roi)                             (the run summary's convention)
contrast_n_3d_wins, contrast_n_voxels, Figure 3: among voxels significant for either task
  contrast_mean_difference (subject,     of a 3D/2D pair, how many predict better with the
  contrast, roi_group)                   3D task, per ROI group; and over all voxels
  + ``*_whole_brain`` (subject,
  contrast)
====================================  =====================================================

Without ROI labels the roi and roi_group statistics are empty or NaN; with fewer than
three Taskonomy tasks the comparison variables are NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from neurotask.pipeline.stats import similarity as sim
from neurotask.pipeline.stats.noise_ceiling import noise_normalized
from neurotask.pipeline.stats.scores import fdr_bh
from neurotask.pipeline.stats.taskonomy import has_affinities, taskonomy_similarity
from neurotask.pipeline.tasks import task_info

SIGNIFICANCE = ("parametric", "permutation", "stored", "none")

# Figure 3's 3D-vs-2D pairs: contrast name -> (3D task, 2D task)
CONTRASTS = {"keypoint": ("keypoint3d", "keypoint2d"), "edge": ("edge3d", "edge2d")}

# ROI groups of Figure 3, by ROI name without its hemisphere prefix
ROI_GROUPS = {"scene": ("OPA", "PPA", "RSC"), "early_visual": ("EarlyVis",)}

LINKAGE_FIELDS = ["left", "right", "distance", "size"]


class AnalysisError(ValueError):
    """The results given to the analysis are inconsistent or lack what it needs."""


# units and long_name of every output variable and coordinate (the module docstring's table).
# Variants: ``<name>_mean`` over subjects, ``<name>_ci`` its percentile interval, ``<name>_whole_brain``
# over all voxels instead of per ROI group; they take the base name's entry.
_VARIABLES: dict[str, tuple[str, str]] = {
    "n_voxels": ("voxels", "voxels in the subject's results"),
    "n_significant": ("voxels", "voxels significant for the task"),
    "no_significant_voxel": ("1", "the task has no significant voxel (its similarity row is 0)"),
    "similarity": ("1", "brain-derived task similarity"),
    "subject_correlation": ("1", "Pearson r between two subjects' task similarity matrices"),
    "linkage": ("1", "scipy linkage matrix of the task tree"),
    "cluster": ("1", "cluster index of the task in the tree cut into n_clusters groups"),
    "leaves": ("1", "task index at each dendrogram leaf position"),
    "linkage_mean": ("1", "scipy linkage matrix of the tree of the subject-mean similarity"),
    "cluster_mean": ("1", "cluster index of the task in the mean tree cut into n_clusters groups"),
    "leaves_mean": ("1", "task index at each leaf position of the mean tree's dendrogram"),
    "cophenetic_mean": ("1", "merge height of the task pair in the mean tree"),
    "taskonomy_similarity": ("1", "Taskonomy transfer-learning task similarity"),
    "taskonomy_tree_cluster": ("1", "cluster index of the task in Taskonomy's tree cut into n_clusters groups"),
    "spearman_taskonomy": ("1", "Spearman r between brain and Taskonomy task similarities"),
    "mantel_p": ("1", "one-sided Mantel permutation p-value of spearman_taskonomy"),
    "ari_taskonomy": ("1", "adjusted Rand index: brain tree clusters vs Taskonomy's task clusters"),
    "ari_taskonomy_tree": ("1", "adjusted Rand index: brain tree clusters vs Taskonomy's tree clusters"),
    "cophenetic_correlation_taskonomy": ("1", "Pearson r of the brain and Taskonomy trees' cophenetic distances"),
    "roi_mean_r": ("1", "mean test-set Pearson r over the ROI's voxels"),
    "roi_sem_r": ("1", "standard error of the mean test-set r over the ROI's voxels"),
    "roi_fraction_significant": ("1", "fraction of the ROI's voxels significant for the task"),
    "roi_n_voxels": ("voxels", "voxels in the ROI"),
    "roi_p": ("1", "Simes combined p-value of the ROI's voxels (any voxel predicted)"),
    "roi_q": ("1", "Benjamini-Hochberg q of roi_p over the subject's (task, ROI) cells"),
    "roi_significant": ("1", "the task predicts the ROI: roi_q below the analysis' fdr"),
    "roi_noise_ceiling": ("1", "mean correlation noise ceiling over the ROI's voxels"),
    "roi_noise_normalized_r": ("1", "median over the ROI's voxels of test r / noise ceiling"),
    "contrast_n_3d_wins": ("voxels", "voxels better predicted by the 3D task of the pair"),
    "contrast_n_voxels": ("voxels", "voxels significant for either task of the 3D/2D pair"),
    "contrast_mean_difference": ("1", "mean r(3D task) - r(2D task) over those voxels"),
    # coordinates
    "subject": ("", "subject"), "subject2": ("", "subject (second axis)"),
    "task": ("", "feature space (Taskonomy task)"), "task2": ("", "feature space (second axis)"),
    "label": ("", "task label"), "taskonomy_cluster": ("", "the task's branch of Taskonomy's tree"),
    "bound": ("", "interval bound"), "linkage_field": ("", "linkage matrix column"),
    "merge": ("1", "merge step of the tree"), "leaf": ("1", "dendrogram leaf position"),
    "roi": ("", "region of interest"), "roi_group": ("", "group of ROIs (Figure 3)"),
    "contrast": ("", "3D/2D task pair (Figure 3)"),
}
_VARIANTS = (("_mean_ci", ", mean over subjects: percentile interval"), ("_ci", ": percentile interval"),
             ("_mean", ", mean over subjects"), ("_whole_brain", ", over all voxels"))


def _attrs_of(name: str) -> tuple[str, str]:
    if name in _VARIABLES:
        return _VARIABLES[name]
    for suffix, note in _VARIANTS:
        base = name.removesuffix(suffix)
        if base != name and base in _VARIABLES:
            units, long_name = _VARIABLES[base]
            return units, long_name + note
    raise KeyError(f"analysis variable {name!r} has no units and long_name in _VARIABLES")


def _with_variable_attrs(out: xr.Dataset) -> xr.Dataset:
    """Every variable and coordinate gets ``units`` (empty for labels) and ``long_name``."""
    for name in [*out.data_vars, *out.coords]:
        units, long_name = _attrs_of(str(name))
        out[name].attrs.update(long_name=long_name, **({"units": units} if units else {}))
    return out


# --------------------------------------------------------------------------- inputs


def significance_mask(result: xr.Dataset, significance: str = "parametric", fdr: float = 0.05) -> np.ndarray:
    """(task, voxel) bool: which voxels count as predicted for each task.

    "parametric": Benjamini-Hochberg at ``fdr`` on ``pvalue``, per task across all the
    subject's voxels; "permutation": the same on the permutation-test ``pvalue_perm`` (the
    authors' protocol); "stored": the results' own ``significant``; "none": every voxel
    with a finite r (no masking).
    """
    if significance not in SIGNIFICANCE:
        raise AnalysisError(f"significance must be one of {', '.join(SIGNIFICANCE)}; got {significance!r}")
    if significance == "none":
        return np.isfinite(result["r"].transpose("task", "voxel").values)
    name = {"parametric": "pvalue", "permutation": "pvalue_perm", "stored": "significant"}[significance]
    if name not in result:
        hint = " (fit with fit.n_permutations > 0)" if significance == "permutation" else ""
        raise AnalysisError(f"significance={significance!r} needs variable {name!r} in the results{hint}")
    values = result[name].transpose("task", "voxel").values
    if significance == "stored":
        return values.astype(bool)
    if not 0.0 < fdr < 1.0:
        raise AnalysisError(f"fdr must be in (0, 1), got {fdr}")
    return np.stack([fdr_bh(p, fdr)[1] for p in values]) if values.size else values.astype(bool)


def _check_results(results: Mapping[str, xr.Dataset]) -> list[str]:
    if not results:
        raise AnalysisError("no subjects' results given")
    tasks: list[str] | None = None
    for subject, ds in results.items():
        if not isinstance(ds, xr.Dataset):
            raise AnalysisError(f"results of subject {subject!r} must be an xarray Dataset, got {type(ds).__name__}")
        if "r" not in ds or set(ds["r"].dims) != {"task", "voxel"}:
            raise AnalysisError(f"results of subject {subject!r} need variable 'r' with dims (task, voxel)")
        names = [str(t) for t in ds["task"].values]
        if tasks is None:
            tasks = names
        elif sorted(names) != sorted(tasks):
            raise AnalysisError(
                f"subject {subject!r} has tasks {names}, but {next(iter(results))!r} has {tasks}"
            )
    if len(tasks) < 2:
        raise AnalysisError(f"task similarity needs at least 2 tasks, got {tasks}")
    return tasks


def str_labels(values) -> np.ndarray:
    """Any array of strings (fixed-width, object, or numpy's StringDType as Zarr v3 strings
    read back) -> fixed-width unicode array."""
    return np.array([str(x) for x in np.asarray(values).ravel().tolist()], dtype=str).reshape(np.shape(values))


def _roi_labels(ds: xr.Dataset) -> np.ndarray:
    if "roi" not in ds.coords:
        return np.full(ds.sizes["voxel"], "")
    return str_labels(ds["roi"].values)


def roi_group_of(roi: str, groups: Mapping[str, Sequence[str]] = ROI_GROUPS) -> str | None:
    """The group of an ROI name ('LHPPA' -> 'scene'), ignoring an LH/RH/lh-/rh- prefix."""
    base = roi
    for prefix in ("LH", "RH", "lh-", "rh-", "lh_", "rh_", "lh", "rh", "L_", "R_", "L", "R"):
        if base.startswith(prefix) and len(base) > len(prefix):
            base = base[len(prefix):]
            break
    for group, members in groups.items():
        if base in members or roi in members:
            return group
    return None


# --------------------------------------------------------------------------- analysis


def analyse(
    results: Mapping[str, xr.Dataset],
    *,
    significance: str = "parametric",
    fdr: float = 0.05,
    metric: str = "cosine",
    linkage: str = "average",
    n_clusters: int = 4,
    n_permutations: int = 1000,
    n_bootstrap: int = 200,
    seed: int = 0,
    roi_results: Mapping[str, xr.Dataset] | None = None,
    taskonomy_affinities: str = "16k",
    ci: float = 0.95,
    roi_groups: Mapping[str, Sequence[str]] = ROI_GROUPS,
) -> xr.Dataset:
    """Brain task similarity, trees, Taskonomy comparison and ROI summaries of ``results``.

    ``results``: subject -> results Dataset (module docstring). ``roi_results``: optional
    subject -> results of separate ROI-only models (the authors' Figure 1 models); when
    given, the ROI statistics come from them instead of ``results``' ROI labels.
    Randomness (bootstrap, Mantel) comes from ``seed`` only: the same call gives the same
    numbers. Returns the Dataset described in the module docstring.
    """
    # Every matrix product here is (tasks x tasks)-sized: BLAS threads only add overhead.
    with threadpool_limits(limits=1, user_api="blas"):
        return _analyse(
            results, significance=significance, fdr=fdr, metric=metric, linkage=linkage,
            n_clusters=n_clusters, n_permutations=n_permutations, n_bootstrap=n_bootstrap,
            seed=seed, roi_results=roi_results, taskonomy_affinities=taskonomy_affinities,
            ci=ci, roi_groups=roi_groups,
        )


def _analyse(
    results: Mapping[str, xr.Dataset],
    *,
    significance: str,
    fdr: float,
    metric: str,
    linkage: str,
    n_clusters: int,
    n_permutations: int,
    n_bootstrap: int,
    seed: int,
    roi_results: Mapping[str, xr.Dataset] | None,
    taskonomy_affinities: str,
    ci: float,
    roi_groups: Mapping[str, Sequence[str]],
) -> xr.Dataset:
    tasks = _check_results(results)
    if metric not in sim.METRICS:
        raise AnalysisError(f"metric must be one of {', '.join(sim.METRICS)}; got {metric!r}")
    if linkage not in sim.LINKAGES:
        raise AnalysisError(f"linkage must be one of {', '.join(sim.LINKAGES)}; got {linkage!r}")
    if not 2 <= n_clusters <= len(tasks):
        raise AnalysisError(f"n_clusters must be between 2 and the number of tasks ({len(tasks)}), got {n_clusters}")
    if n_bootstrap < 1 or n_permutations < 1:
        raise AnalysisError(f"n_bootstrap and n_permutations must be >= 1, got {n_bootstrap}, {n_permutations}")
    subjects = [str(s) for s in results]
    streams = np.random.SeedSequence(seed).spawn(2 * len(subjects) + 1)
    boot_rngs = [np.random.default_rng(s) for s in streams[: len(subjects)]]
    mantel_rngs = [np.random.default_rng(s) for s in streams[len(subjects):]]

    per_subject = [_subject_similarity(results[s].sel(task=tasks).transpose("task", "voxel", ...),
                                       significance, fdr, metric, n_bootstrap, rng)
                   for s, rng in zip(subjects, boot_rngs)]
    masks, rs = [p.significant for p in per_subject], [p.r for p in per_subject]
    sims_a = np.stack([p.similarity for p in per_subject])  # (s, t, t)
    boots_a = np.stack([p.bootstrap for p in per_subject])  # (s, b, t, t)
    mean = sims_a.mean(axis=0)
    boot_mean = boots_a.mean(axis=0)  # subjects resampled independently

    out = _empty_dataset(subjects, tasks, attrs={
        "significance": significance, "fdr": fdr, "metric": metric, "linkage": linkage,
        "n_clusters": n_clusters, "n_permutations": n_permutations, "n_bootstrap": n_bootstrap,
        "seed": seed, "ci": ci, "taskonomy_affinities": taskonomy_affinities,
        "roi_source": "roi_results" if roi_results is not None else "results",
    })
    out["n_voxels"] = ("subject", np.array([r.shape[1] for r in rs], dtype=np.int64))
    out["n_significant"] = (("subject", "task"), np.stack([m.sum(axis=1) for m in masks]).astype(np.int64))
    out["no_significant_voxel"] = out["n_significant"] == 0
    out["similarity"] = (("subject", "task", "task2"), sims_a)
    out["similarity_mean"] = (("task", "task2"), mean)
    out["similarity_ci"] = (("subject", "task", "task2", "bound"), sim.percentile_interval(np.moveaxis(boots_a, 1, 0), ci))
    out["similarity_mean_ci"] = (("task", "task2", "bound"), sim.percentile_interval(boot_mean, ci))
    out["subject_correlation"] = (("subject", "subject2"), sim.subject_correlations(sims_a))
    _trees(out, sims_a, mean, linkage, n_clusters)
    _compare_with_taskonomy(
        out, tasks, sims_a, mean, boots_a, boot_mean, linkage=linkage, n_clusters=n_clusters,
        n_permutations=n_permutations, rngs=mantel_rngs, size=taskonomy_affinities, ci=ci,
    )
    _roi_statistics(out, subjects, tasks, results, roi_results, significance, fdr, roi_groups, masks, rs)
    return _with_variable_attrs(out)


@dataclass(frozen=True)
class _SubjectSimilarity:
    r: np.ndarray            # (t, v) test r, float64
    significant: np.ndarray  # (t, v) bool
    similarity: np.ndarray   # (t, t)
    bootstrap: np.ndarray    # (b, t, t) bootstrap over voxels


def _subject_similarity(ds: xr.Dataset, significance: str, fdr: float, metric: str, n_bootstrap: int,
                        rng: np.random.Generator) -> _SubjectSimilarity:
    """One subject's task similarity and its bootstrap; ``ds``: (task, voxel) results."""
    r = ds["r"].values.astype(np.float64)
    sig = significance_mask(ds, significance, fdr)
    return _SubjectSimilarity(r, sig, sim.task_similarity(r, sig, metric),
                              sim.bootstrap_similarity(r, sig, n_bootstrap, rng, metric))


def _empty_dataset(subjects: list[str], tasks: list[str], attrs: dict) -> xr.Dataset:
    """The output's coordinates (module docstring) and the analysis settings as attributes."""
    t = len(tasks)
    return xr.Dataset(
        coords={
            "subject": subjects,
            "subject2": subjects,
            "task": tasks,
            "task2": tasks,
            "bound": ["lower", "upper"],
            "linkage_field": LINKAGE_FIELDS,
            "merge": np.arange(t - 1),
            "leaf": np.arange(t),
            "label": ("task", [_label(x) for x in tasks]),
            "taskonomy_cluster": ("task", [_taskonomy_cluster(x) for x in tasks]),
        },
        attrs=attrs,
    )


def _trees(out: xr.Dataset, sims_a: np.ndarray, mean: np.ndarray, linkage: str, n_clusters: int) -> None:
    """Each subject's tree and the mean tree: linkage, cut into ``n_clusters``, leaf order,
    cophenetic distances. ``sims_a``: (s, t, t); ``mean``: (t, t)."""
    links = [sim.task_linkage(s, linkage) for s in sims_a]
    link_mean = sim.task_linkage(mean, linkage)
    out["linkage"] = (("subject", "merge", "linkage_field"), np.stack(links))
    out["linkage_mean"] = (("merge", "linkage_field"), link_mean)
    out["cluster"] = (("subject", "task"), np.stack([sim.cut_tree(z, n_clusters) for z in links]))
    out["cluster_mean"] = ("task", sim.cut_tree(link_mean, n_clusters))
    out["leaves"] = (("subject", "leaf"), np.stack([sim.dendrogram_leaves(z) for z in links]))
    out["leaves_mean"] = ("leaf", sim.dendrogram_leaves(link_mean))
    out["cophenetic_mean"] = (("task", "task2"), _square(sim.cophenetic_distances(link_mean), mean.shape[0]))


def _label(task: str) -> str:
    try:
        return task_info(task).label
    except KeyError:
        return task


def _taskonomy_cluster(task: str) -> str:
    try:
        return task_info(task).cluster
    except KeyError:
        return ""


def _square(condensed: np.ndarray, t: int) -> np.ndarray:
    full = np.zeros((t, t))
    iu, ju = np.triu_indices(t, k=1)
    full[iu, ju] = condensed
    full[ju, iu] = condensed
    return full


def _compare_with_taskonomy(
    out: xr.Dataset,
    tasks: list[str],
    sims: np.ndarray,
    mean: np.ndarray,
    boots: np.ndarray,
    boot_mean: np.ndarray,
    *,
    linkage: str,
    n_clusters: int,
    n_permutations: int,
    rngs: list[np.random.Generator],
    size: str,
    ci: float,
) -> None:
    """Fill the Taskonomy comparison variables of ``out`` (NaN where it cannot be made)."""
    s, t = sims.shape[0], len(tasks)
    known = [i for i, x in enumerate(tasks) if has_affinities(x, size)]
    tsim_full = np.full((t, t), np.nan)
    tree_cluster = np.full(t, -1, dtype=np.int64)
    per = {k: np.full(s, np.nan) for k in ("spearman", "mantel", "ari", "ari_tree", "coph")}
    mean_stats = {k: np.nan for k in per}
    sp_ci = np.full((s, 2), np.nan)
    sp_mean_ci = np.full(2, np.nan)
    if len(known) >= 3:
        names = [tasks[i] for i in known]
        tsim = taskonomy_similarity(names, size).values
        tsim_full[np.ix_(known, known)] = tsim
        t_link = sim.task_linkage(tsim, linkage)
        k = min(n_clusters, len(known))
        t_cut = sim.cut_tree(t_link, k)
        tree_cluster[known] = t_cut
        fig14 = [task_info(x).cluster for x in names]
        idx = np.ix_(known, known)

        def compare(brain: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
            b_link = sim.task_linkage(brain, linkage)
            b_cut = sim.cut_tree(b_link, k)
            rho, p = sim.mantel_test(brain, tsim, n_permutations=n_permutations, seed=rng)
            return {
                "spearman": rho,
                "mantel": p,
                "ari": sim.adjusted_rand_index(b_cut, fig14),
                "ari_tree": sim.adjusted_rand_index(b_cut, t_cut),
                "coph": sim.cophenetic_correlation(b_link, t_link),
            }

        for i in range(s):
            for key, value in compare(sims[i][idx], rngs[i]).items():
                per[key][i] = value
            sp_ci[i] = sim.percentile_interval(sim.batch_spearman(boots[i][:, known][:, :, known], tsim), ci)
        mean_stats = compare(mean[idx], rngs[s])
        sp_mean_ci = sim.percentile_interval(sim.batch_spearman(boot_mean[:, known][:, :, known], tsim), ci)

    out["taskonomy_similarity"] = (("task", "task2"), tsim_full)
    out["taskonomy_tree_cluster"] = ("task", tree_cluster)
    for key, name in (
        ("spearman", "spearman_taskonomy"),
        ("mantel", "mantel_p"),
        ("ari", "ari_taskonomy"),
        ("ari_tree", "ari_taskonomy_tree"),
        ("coph", "cophenetic_correlation_taskonomy"),
    ):
        out[name] = ("subject", per[key])
        out[f"{name}_mean"] = ((), float(mean_stats[key]))
    out["spearman_taskonomy_ci"] = (("subject", "bound"), sp_ci)
    out["spearman_taskonomy_mean_ci"] = ("bound", sp_mean_ci)


def simes_p(p: np.ndarray) -> float:
    """Simes' combined p-value of one family: min over i of n p_(i) / i. (n,) -> float.

    Tests the global null "no voxel of the ROI is predicted". Valid when the p-values are
    independent or positively dependent (PRDS), the assumption BH over voxels already makes
    and the one neighbouring voxels' positively correlated test r meet; a binomial count of
    significant voxels or a t-test over voxels would instead treat dependent voxels as
    independent samples and overstate the evidence. Simes' p <= q exactly when BH at q
    within the ROI rejects at least one voxel. NaN p are left out; NaN if none is finite.
    """
    p = np.sort(np.asarray(p, dtype=np.float64)[np.isfinite(p)])
    if p.size == 0:
        return float("nan")
    return float(min(1.0, np.min(p.size * p / np.arange(1, p.size + 1))))


def roi_tests(p: np.ndarray, roi_labels: np.ndarray, rois: Sequence[str], fdr: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """Figure 1's ROI-level test of every (task, ROI) cell of one subject.

    p (t, v) voxel p-values, roi_labels (v,), R ROI names -> (simes p (t, R), BH q (t, R)),
    BH over the t * R cells with a finite p (NaN elsewhere: an ROI without voxels).
    """
    p = np.asarray(p, dtype=np.float64)
    labels = np.asarray(roi_labels)
    combined = np.full((p.shape[0], len(rois)), np.nan)
    for k, roi in enumerate(rois):
        sel = labels == roi
        if sel.any():
            combined[:, k] = [simes_p(row) for row in p[:, sel]]
    q = np.full(combined.shape, np.nan)
    ok = np.isfinite(combined)
    if ok.any():
        q[ok] = fdr_bh(combined[ok], fdr)[0]
    return combined, q


def roi_noise_summary(r: np.ndarray, ceiling: np.ndarray, roi_labels: np.ndarray, rois: Sequence[str]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(t, v) r, (v,) correlation noise ceiling, (v,) labels, R names -> (mean ceiling (R,),
    median r / ceiling (t, R)) over each ROI's voxels; NaN where the ROI has no finite
    ceiling (``noise_normalized``: voxels with a ceiling <= 0 are left out)."""
    r = np.asarray(r, dtype=np.float64)
    ceiling = np.asarray(ceiling, dtype=np.float64)
    labels = np.asarray(roi_labels)
    mean_c = np.full(len(rois), np.nan)
    norm = np.full((r.shape[0], len(rois)), np.nan)
    for k, roi in enumerate(rois):
        sel = (labels == roi) & np.isfinite(ceiling)
        if not sel.any():
            continue
        mean_c[k] = ceiling[sel].mean()
        nn = noise_normalized(r[:, sel], np.broadcast_to(ceiling[sel], r[:, sel].shape))
        finite = np.isfinite(nn).any(axis=1)
        norm[finite, k] = np.nanmedian(nn[finite], axis=1)
    return mean_c, norm


def _test_pvalues(ds: xr.Dataset, significance: str) -> np.ndarray | None:
    """(task, voxel) p-values behind the significance setting (the parametric p for
    "stored" and "none", which have none of their own), or None if the results lack them."""
    name = "pvalue_perm" if significance == "permutation" else "pvalue"
    return ds[name].transpose("task", "voxel").values.astype(np.float64) if name in ds else None


def _noise_ceiling_of(ds: xr.Dataset) -> np.ndarray:
    if "noise_ceiling_r" not in ds:
        return np.full(ds.sizes["voxel"], np.nan)
    return ds["noise_ceiling_r"].values.astype(np.float64)


def _roi_statistics(
    out: xr.Dataset,
    subjects: list[str],
    tasks: list[str],
    results: Mapping[str, xr.Dataset],
    roi_results: Mapping[str, xr.Dataset] | None,
    significance: str,
    fdr: float,
    roi_groups: Mapping[str, Sequence[str]],
    masks: list[np.ndarray],
    rs: list[np.ndarray],
) -> None:
    """Fill the Figure 1 (ROI) and Figure 3 (3D vs 2D) variables of ``out``."""
    if roi_results is not None:
        missing = [s for s in subjects if s not in roi_results]
        if missing:
            raise AnalysisError(f"roi_results lack subject(s) {missing}")
    per_subject = []  # (r, significant, roi labels) used for ROI statistics
    extras = []  # (voxel p-values or None, noise ceiling) of the same voxels
    for i, subject in enumerate(subjects):
        if roi_results is None:
            ds = results[subject].sel(task=tasks).transpose("task", "voxel", ...)
            per_subject.append((rs[i], masks[i], _roi_labels(results[subject])))
            extras.append((_test_pvalues(ds, significance), _noise_ceiling_of(ds)))
            continue
        ds = roi_results[subject]
        absent = [x for x in tasks if x not in ds["task"].values]
        if absent:
            raise AnalysisError(f"roi_results of subject {subject!r} lack task(s) {absent}")
        ds = ds.sel(task=tasks).transpose("task", "voxel", ...)
        per_subject.append(
            (ds["r"].values.astype(np.float64), significance_mask(ds, significance, fdr), _roi_labels(ds))
        )
        extras.append((_test_pvalues(ds, significance), _noise_ceiling_of(ds)))
    rois: list[str] = []
    for _, _, labels in per_subject:
        rois += [x for x in dict.fromkeys(labels.tolist()) if x and x not in rois]
    s, t, nr = len(subjects), len(tasks), len(rois)
    stats_ = {k: np.full((s, t, nr), np.nan) for k in ("mean_r", "sem_r", "fraction_significant")}
    n_roi = np.zeros((s, nr), dtype=np.int64)
    for i, (r, sig, labels) in enumerate(per_subject):
        summary = sim.roi_summary(r, sig, labels, rois)
        for key in stats_:
            stats_[key][i] = summary[key]
        n_roi[i] = summary["n_voxels"]
    out.coords["roi"] = rois
    out["roi_mean_r"] = (("subject", "task", "roi"), stats_["mean_r"])
    out["roi_sem_r"] = (("subject", "task", "roi"), stats_["sem_r"])
    out["roi_fraction_significant"] = (("subject", "task", "roi"), stats_["fraction_significant"])
    out["roi_n_voxels"] = (("subject", "roi"), n_roi)
    roi_p, roi_q = np.full((s, t, nr), np.nan), np.full((s, t, nr), np.nan)
    ceiling, normalized = np.full((s, nr), np.nan), np.full((s, t, nr), np.nan)
    for i, ((r, _, labels), (p, c)) in enumerate(zip(per_subject, extras)):
        if p is not None:
            roi_p[i], roi_q[i] = roi_tests(p, labels, rois, fdr)
        ceiling[i], normalized[i] = roi_noise_summary(r, c, labels, rois)
    out["roi_p"] = (("subject", "task", "roi"), roi_p)
    out["roi_q"] = (("subject", "task", "roi"), roi_q)
    out["roi_significant"] = (("subject", "task", "roi"), roi_q < fdr)
    out["roi_noise_ceiling"] = (("subject", "roi"), ceiling)
    out["roi_noise_normalized_r"] = (("subject", "task", "roi"), normalized)

    contrasts = [c for c, (a, b) in CONTRASTS.items() if a in tasks and b in tasks]
    groups = list(roi_groups)
    out.coords["contrast"] = contrasts
    out.coords["roi_group"] = groups
    shape = (s, len(contrasts), len(groups))
    wins, counts, diffs = np.zeros(shape, np.int64), np.zeros(shape, np.int64), np.full(shape, np.nan)
    wb_shape = (s, len(contrasts))
    wb_wins, wb_counts, wb_diffs = np.zeros(wb_shape, np.int64), np.zeros(wb_shape, np.int64), np.full(wb_shape, np.nan)
    for i, (r, sig, labels) in enumerate(per_subject):
        lookup = {x: roi_group_of(x, roi_groups) for x in set(labels.tolist())}
        group = np.array([groups.index(g) if (g := lookup[x]) is not None else -1 for x in labels], dtype=np.int64)
        for c, name in enumerate(contrasts):
            a, b = (tasks.index(x) for x in CONTRASTS[name])
            res = sim.contrast_wins(r[a], r[b], sig[a] | sig[b], group, len(groups))
            wins[i, c], counts[i, c], diffs[i, c] = res["n_wins"], res["n_voxels"], res["mean_difference"]
            # the same over all whole-brain voxels
            everywhere = np.zeros(rs[i].shape[1], dtype=np.int64)
            res = sim.contrast_wins(rs[i][a], rs[i][b], masks[i][a] | masks[i][b], everywhere, 1)
            wb_wins[i, c], wb_counts[i, c], wb_diffs[i, c] = res["n_wins"][0], res["n_voxels"][0], res["mean_difference"][0]
    out["contrast_n_3d_wins"] = (("subject", "contrast", "roi_group"), wins)
    out["contrast_n_voxels"] = (("subject", "contrast", "roi_group"), counts)
    out["contrast_mean_difference"] = (("subject", "contrast", "roi_group"), diffs)
    out["contrast_n_3d_wins_whole_brain"] = (("subject", "contrast"), wb_wins)
    out["contrast_n_voxels_whole_brain"] = (("subject", "contrast"), wb_counts)
    out["contrast_mean_difference_whole_brain"] = (("subject", "contrast"), wb_diffs)


def voxel_contrasts(result: xr.Dataset) -> xr.DataArray:
    """Per-voxel r(3D) - r(2D) for each Figure 3 pair present, dims (contrast, voxel).

    Carries the results' voxel coordinates (roi, i, j, k) so it can be put in a volume.
    """
    tasks = [str(x) for x in result["task"].values]
    names = [c for c, (a, b) in CONTRASTS.items() if a in tasks and b in tasks]
    if not names:
        raise AnalysisError(f"no 3D/2D task pair of {list(CONTRASTS.values())} among tasks {tasks}")
    r = result["r"]
    diffs = [r.sel(task=CONTRASTS[n][0]) - r.sel(task=CONTRASTS[n][1]) for n in names]
    da = xr.concat(diffs, dim="contrast").drop_vars("task", errors="ignore")
    return da.assign_coords(contrast=names).rename("r_difference")
