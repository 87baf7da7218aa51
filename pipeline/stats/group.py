"""Group level across subjects: subjects, not voxels, as the unit of replication.

The per-subject analysis (``pipeline.stats.task_structure``) bootstraps voxels within a
subject; with several subjects (NSD has 8, the BOLD5000 demo 3) the question a reader asks
is whether the task structure holds *across people*. Here every statistic treats the
subjects as the random effect:

* the subject-mean similarity with a bootstrap over subjects (resample subjects with
  replacement, percentile interval per cell);
* leave-one-subject-out (LOSO) consistency: each subject's matrix against the mean of the
  others (Spearman and Pearson of the upper triangles);
* clade supports of the consensus tree. We report the tree of the subject-mean matrix (the
  tree Figure 6 draws, with its merge heights) and, for each of its clades, the share of the
  subject-bootstrap replicates whose tree (same linkage) has exactly that clade. A
  majority-rule consensus of the replicate trees would have no heights and may leave nodes
  unresolved; the mean tree is always a full tree and is the one the other figures use, so
  its supports say directly which of its branches rest on all subjects;
* the group brain-vs-Taskonomy test: each subject's Spearman r with Taskonomy's similarity,
  Fisher z, then a one-sample t-test and an exact sign-flip test of the mean z over subjects.

Pure array code, no I/O; :func:`group_analysis` only labels the arrays. Conventions: ``s``
subjects, ``t`` tasks, ``b`` bootstrap replicates, ``m = t (t - 1) / 2`` task pairs.

With few subjects the bootstrap over subjects is coarse: s subjects have only
C(2s - 1, s) distinct resamples (3 for 2 subjects, 10 for 3), and the sign-flip test's
smallest p is 2^-s (1/8 for 3 subjects). The intervals and p-values are exact for what the
subjects can show, not a promise of more.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import xarray as xr
from scipy import stats

from neurotask.pipeline.stats import similarity as sim

# Bumped when the group analysis gains or changes variables (part of its fingerprint).
GROUP_VERSION = 1

# Exact sign-flip enumeration up to this many subjects (2^16 sign patterns); random beyond.
EXACT_SIGN_FLIP_MAX = 16

# Fisher z of |r| = 1 is infinite: clip so that a perfect subject still counts, finitely.
_R_CLIP = 1.0 - 1e-12


class GroupError(ValueError):
    """The per-subject matrices cannot make a group analysis."""


def _check_stack(similarities: np.ndarray, min_subjects: int = 2) -> np.ndarray:
    a = np.asarray(similarities, dtype=np.float64)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise GroupError(f"similarities must be (subjects, tasks, tasks), got shape {a.shape}")
    if a.shape[0] < min_subjects:
        raise GroupError(f"a group analysis needs at least {min_subjects} subjects, got {a.shape[0]}")
    if a.shape[1] < 2:
        raise GroupError(f"a group analysis needs at least 2 tasks, got {a.shape[1]}")
    return a


# --------------------------------------------------------------------------- mean and bootstrap


def subject_resamples(n_subjects: int, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """(b, s) int: subject indices of ``n_bootstrap`` resamples with replacement."""
    if n_bootstrap < 1:
        raise GroupError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    return rng.integers(0, n_subjects, size=(n_bootstrap, n_subjects))


def bootstrap_mean(similarities: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """(s, t, t) per-subject similarity and (b, s) resampled subject indices -> (b, t, t)
    subject-mean similarity of each resample."""
    a = _check_stack(similarities, 1)
    return a[np.asarray(resamples)].mean(axis=1)


def mean_with_interval(similarities: np.ndarray, n_bootstrap: int, rng: np.random.Generator,
                       level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subject-mean similarity and its bootstrap-over-subjects percentile interval.

    (s, t, t) -> (mean (t, t), interval (t, t, 2) lower/upper, replicates (b, t, t)).
    """
    a = _check_stack(similarities)
    boots = bootstrap_mean(a, subject_resamples(a.shape[0], n_bootstrap, rng))
    return a.mean(axis=0), sim.percentile_interval(boots, level), boots


# --------------------------------------------------------------------------- consistency


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return sim._pearson(stats.rankdata(a), stats.rankdata(b))


def loso_consistency(similarities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each subject's matrix vs the mean of the other subjects' matrices.

    (s, t, t) -> (Spearman (s,), Pearson (s,)) of the upper triangles; NaN where either
    triangle is constant (e.g. a subject without any significant voxel).
    """
    a = _check_stack(similarities)
    s = a.shape[0]
    tri = sim.upper_triangle(a)  # (s, m)
    others = (tri.sum(axis=0, keepdims=True) - tri) / (s - 1)  # (s, m): mean of the rest
    spearman = np.array([_spearman(tri[i], others[i]) for i in range(s)])
    pearson = np.array([sim._pearson(tri[i], others[i]) for i in range(s)])
    return spearman, pearson


# --------------------------------------------------------------------------- trees


def clades(linkage_matrix: np.ndarray) -> list[frozenset[int]]:
    """(t - 1, 4) scipy linkage -> the leaf set (task indices) formed at each merge, in merge order."""
    z = np.asarray(linkage_matrix)
    n = z.shape[0] + 1
    members: list[frozenset[int]] = [frozenset([i]) for i in range(n)]
    for left, right, _, _ in z:
        members.append(members[int(left)] | members[int(right)])
    return members[n:]


def clade_support(reference_linkage: np.ndarray, replicates: np.ndarray, linkage: str = "average") -> np.ndarray:
    """Share of replicate trees containing each clade of the reference tree.

    (t - 1, 4) linkage of the reference (mean) tree and (b, t, t) replicate similarity
    matrices -> (t - 1,) support in [0, 1] of the clade formed at each merge of the
    reference tree (the root, every task, has support 1).
    """
    wanted = clades(reference_linkage)
    counts = np.zeros(len(wanted))
    for rep in np.asarray(replicates, dtype=np.float64):
        have = set(clades(sim.task_linkage(rep, linkage)))
        counts += [c in have for c in wanted]
    return counts / len(replicates)


# --------------------------------------------------------------------------- Taskonomy


def fisher_z(r: np.ndarray) -> np.ndarray:
    """(...,) correlations -> (...,) arctanh(r), |r| clipped just below 1 to stay finite."""
    return np.arctanh(np.clip(np.asarray(r, dtype=np.float64), -_R_CLIP, _R_CLIP))


def sign_flip_p(z: np.ndarray, n_permutations: int, rng: np.random.Generator) -> float:
    """One-sided sign-flip p of mean(z) > 0 over subjects. (s,) -> float.

    Under the null (subjects' z symmetric about 0) each sign pattern is equally likely. Up
    to :data:`EXACT_SIGN_FLIP_MAX` subjects all 2^s patterns are enumerated (the identity
    included: p = #{mean >= observed} / 2^s, exact); beyond, ``n_permutations`` random
    patterns, p = (1 + #) / (1 + n).
    """
    z = np.asarray(z, dtype=np.float64)
    observed = z.mean()
    if z.size <= EXACT_SIGN_FLIP_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=z.size)))
        null = signs @ z / z.size
        return float(np.mean(null >= observed - 1e-12))
    signs = rng.choice((-1.0, 1.0), size=(n_permutations, z.size))
    null = signs @ z / z.size
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + n_permutations))


def taskonomy_group_test(similarities: np.ndarray, taskonomy: np.ndarray, n_permutations: int,
                         rng: np.random.Generator, level: float = 0.95) -> dict[str, np.ndarray | float]:
    """Brain vs Taskonomy with subjects as the random effect.

    (s, k, k) per-subject similarity of the k tasks Taskonomy covers and their (k, k)
    Taskonomy similarity -> dict of ``spearman`` (s,) each subject's Spearman r of the upper
    triangles, ``z`` (s,) its Fisher z, ``mean_r`` tanh of the mean z, ``mean_r_ci`` (2,)
    tanh of the t-based ``level`` interval of the mean z, ``t`` and ``t_p`` the one-sample
    t-test of mean z > 0 (df s - 1; NaN when the z do not vary), ``sign_flip_p``
    (:func:`sign_flip_p`).
    """
    a = _check_stack(similarities)
    tsim = np.asarray(taskonomy, dtype=np.float64)
    if tsim.shape != a.shape[1:] or a.shape[1] < 3:
        raise GroupError(f"Taskonomy similarity must be ({a.shape[1]}, {a.shape[1]}) with >= 3 tasks, got {tsim.shape}")
    rho = sim.batch_spearman(a, tsim)
    z = fisher_z(rho)
    n = z.size
    mean, sd = float(z.mean()), float(z.std(ddof=1))
    if sd > 0:
        se = sd / np.sqrt(n)
        t = mean / se
        p = float(stats.t.sf(t, n - 1))
        half = float(stats.t.ppf((1 + level) / 2, n - 1)) * se
        ci = np.tanh([mean - half, mean + half])
    else:  # every subject the same z: no spread to test against
        t, p, ci = np.nan, np.nan, np.full(2, np.nan)
    return {"spearman": rho, "z": z, "mean_r": float(np.tanh(mean)), "mean_r_ci": np.asarray(ci, dtype=np.float64),
            "t": float(t), "t_p": p, "sign_flip_p": sign_flip_p(z, n_permutations, rng)}


# --------------------------------------------------------------------------- labelled


_VARIABLES: dict[str, tuple[str, str]] = {
    "similarity": ("1", "per-subject task similarity (the analysis' metric)"),
    "similarity_mean": ("1", "subject-mean task similarity"),
    "similarity_mean_ci": ("1", "bootstrap-over-subjects percentile interval of the subject-mean similarity"),
    "loso_spearman": ("1", "Spearman r: the subject's similarity vs the mean of the other subjects'"),
    "loso_pearson": ("1", "Pearson r: the subject's similarity vs the mean of the other subjects'"),
    "linkage_mean": ("1", "scipy linkage matrix of the tree of the subject-mean similarity"),
    "clade_support": ("1", "share of subject-bootstrap replicate trees with the clade formed at this merge"),
    "clade_size": ("tasks", "tasks in the clade formed at this merge"),
    "spearman_taskonomy": ("1", "Spearman r between the subject's and Taskonomy's task similarity"),
    "spearman_taskonomy_ci": ("1", "bootstrap-over-voxels percentile interval of spearman_taskonomy"),
    "fisher_z": ("1", "Fisher z of spearman_taskonomy"),
    "no_significant_voxel": ("1", "the task has no significant voxel in the subject (its similarity row is 0)"),
    "group_mean_r": ("1", "tanh of the mean Fisher z over subjects"),
    "group_mean_r_ci": ("1", "tanh of the t-based interval of the mean Fisher z"),
    "group_t": ("1", "one-sample t of the subjects' Fisher z (df = subjects - 1)"),
    "group_t_p": ("1", "one-sided p of group_t (mean z > 0)"),
    "group_sign_flip_p": ("1", "one-sided sign-flip p of the mean Fisher z over subjects"),
    "spearman_taskonomy_mean": ("1", "Spearman r between the subject-mean and Taskonomy's similarity"),
    "mantel_p_mean": ("1", "one-sided Mantel permutation p of spearman_taskonomy_mean"),
    "subject": ("", "subject"), "task": ("", "feature space (Taskonomy task)"),
    "task2": ("", "feature space (second axis)"), "bound": ("", "interval bound"),
    "merge": ("1", "merge step of the tree"), "linkage_field": ("", "linkage matrix column"),
    "label": ("", "task label"), "taskonomy_cluster": ("", "the task's branch of Taskonomy's tree"),
}


def group_analysis(analysis: xr.Dataset) -> xr.Dataset:
    """The group Dataset from a per-subject analysis (``pipeline.stats.task_structure.analyse``).

    Dims subject, task, task2, bound, merge, linkage_field (the analysis' names). Settings
    from the analysis' attrs: ``n_bootstrap`` replicates, ``ci`` level, ``linkage``,
    ``n_permutations`` (random sign flips beyond :data:`EXACT_SIGN_FLIP_MAX` subjects);
    randomness from its ``seed`` through a stream of its own, so the same analysis gives the
    same group numbers. The Taskonomy variables are NaN with fewer than 3 Taskonomy tasks.
    """
    a = analysis
    subjects = [str(x) for x in a["subject"].values]
    tasks = [str(x) for x in a["task"].values]
    sims = a["similarity"].transpose("subject", "task", "task2").values.astype(np.float64)
    _check_stack(sims)
    linkage, level = str(a.attrs["linkage"]), float(a.attrs["ci"])
    n_bootstrap, n_permutations = int(a.attrs["n_bootstrap"]), int(a.attrs["n_permutations"])
    # a stream apart from the analysis' own (which spawns from SeedSequence(seed))
    boot_rng, flip_rng = (np.random.default_rng(x) for x in np.random.SeedSequence([int(a.attrs["seed"]), 7]).spawn(2))
    mean, interval, boots = mean_with_interval(sims, n_bootstrap, boot_rng, level)
    link = sim.task_linkage(mean, linkage)
    spearman, pearson = loso_consistency(sims)

    s = len(subjects)
    tsim_full = a["taskonomy_similarity"].values.astype(np.float64)
    known = [i for i in range(len(tasks)) if np.isfinite(tsim_full[i, i])]
    test = {"spearman": np.full(s, np.nan), "z": np.full(s, np.nan), "mean_r": np.nan,
            "mean_r_ci": np.full(2, np.nan), "t": np.nan, "t_p": np.nan, "sign_flip_p": np.nan}
    if len(known) >= 3:
        idx = np.ix_(known, known)
        test = taskonomy_group_test(sims[:, known][:, :, known], tsim_full[idx], n_permutations, flip_rng, level)

    out = xr.Dataset(
        coords={"subject": subjects, "task": tasks, "task2": tasks, "bound": ["lower", "upper"],
                "merge": np.arange(len(tasks) - 1), "linkage_field": list(a["linkage_field"].values)},
        attrs={"n_subjects": s, "n_bootstrap": n_bootstrap, "ci": level, "linkage": linkage,
               "metric": str(a.attrs.get("metric", "")), "seed": int(a.attrs["seed"]),
               "n_taskonomy_tasks": len(known),
               "sign_flip": "exact" if s <= EXACT_SIGN_FLIP_MAX else f"{n_permutations} random sign patterns",
               "consensus": "tree of the subject-mean similarity; support = share of subject-bootstrap "
                            "replicate trees (same linkage) with the clade",
               "group_version": GROUP_VERSION},
    )
    for name in ("label", "taskonomy_cluster"):
        if name in a.coords:
            out.coords[name] = ("task", [str(x) for x in a[name].values])
    out["similarity"] = (("subject", "task", "task2"), sims)
    out["similarity_mean"] = (("task", "task2"), mean)
    out["similarity_mean_ci"] = (("task", "task2", "bound"), interval)
    out["loso_spearman"] = ("subject", spearman)
    out["loso_pearson"] = ("subject", pearson)
    out["linkage_mean"] = (("merge", "linkage_field"), link)
    out["clade_support"] = ("merge", clade_support(link, boots, linkage))
    out["clade_size"] = ("merge", link[:, 3].astype(np.int64))
    out["spearman_taskonomy"] = ("subject", np.asarray(test["spearman"], dtype=np.float64))
    out["fisher_z"] = ("subject", np.asarray(test["z"], dtype=np.float64))
    out["group_mean_r"] = ((), float(test["mean_r"]))
    out["group_mean_r_ci"] = ("bound", np.asarray(test["mean_r_ci"], dtype=np.float64))
    out["group_t"] = ((), float(test["t"]))
    out["group_t_p"] = ((), float(test["t_p"]))
    out["group_sign_flip_p"] = ((), float(test["sign_flip_p"]))
    # from the per-subject analysis: which tasks have no significant voxel, each subject's
    # voxel-bootstrap interval of its r, and the group-mean matrix's own Mantel test
    if "no_significant_voxel" in a:
        out["no_significant_voxel"] = (("subject", "task"),
                                       a["no_significant_voxel"].transpose("subject", "task").values.astype(bool))
    if "spearman_taskonomy_ci" in a:
        out["spearman_taskonomy_ci"] = (("subject", "bound"),
                                        a["spearman_taskonomy_ci"].transpose("subject", "bound").values.astype(np.float64))
    for name in ("spearman_taskonomy_mean", "mantel_p_mean"):
        out[name] = ((), float(a[name]) if name in a else np.nan)
    for name in [*out.data_vars, *out.coords]:
        units, long_name = _VARIABLES[str(name)]
        out[name].attrs.update(long_name=long_name, **({"units": units} if units else {}))
    return out


def group_summary_lines(group: xr.Dataset) -> list[str]:
    """A few lines for the terminal: LOSO consistency and the group Taskonomy test."""
    g = group
    lo = g["loso_spearman"].values
    lo = lo[np.isfinite(lo)]
    lines = [f"group ({g.attrs['n_subjects']} subjects): leave-one-subject-out Spearman r "
             + (f"{lo.min():.3f} to {lo.max():.3f} (median {np.median(lo):.3f})" if lo.size else
                "undefined (every subject's similarity, or the others' mean, is constant: too few significant voxels)")]
    if np.isfinite(float(g["group_mean_r"])):
        ci = g["group_mean_r_ci"].values
        lines.append(f"group brain vs Taskonomy: mean Spearman r {float(g['group_mean_r']):.3f} "
                     f"(back-transformed mean Fisher z, {g.attrs['ci']:.0%} CI [{ci[0]:.3f}, {ci[1]:.3f}]), "
                     f"t({g.attrs['n_subjects'] - 1}) = {float(g['group_t']):.2f}, p = {float(g['group_t_p']):.3g}; "
                     f"sign-flip p = {float(g['group_sign_flip_p']):.3g}")
    return lines


def clade_members(group: xr.Dataset) -> list[list[str]]:
    """The task names of the clade formed at each merge of the group's mean tree."""
    tasks: Sequence[str] = [str(x) for x in group["task"].values]
    return [[tasks[i] for i in sorted(c)] for c in clades(group["linkage_mean"].values)]
