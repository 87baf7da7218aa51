"""The group level across subjects (pipeline.stats.group): against direct loops, on planted
cases, and as the analysis stage stores it for the shared simulated study."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from neurotask.pipeline.stats import group as G
from neurotask.pipeline.stats import similarity as S
from analysis_fixtures import analysis_study  # noqa: F401


def _symmetric(rng: np.random.Generator, t: int) -> np.ndarray:
    x = rng.normal(size=(t, 3 * t))
    return S.cosine_similarity(x)


def _stack(rng: np.random.Generator, s: int, t: int, noise: float, base: np.ndarray | None = None) -> np.ndarray:
    """s subjects' (t, t) matrices: ``base`` plus symmetric noise (diagonal 1)."""
    base = _symmetric(rng, t) if base is None else base
    out = []
    for _ in range(s):
        e = rng.normal(scale=noise, size=(t, t))
        m = base + (e + e.T) / 2
        np.fill_diagonal(m, 1.0)
        out.append(m)
    return np.stack(out)


def _planted(rng: np.random.Generator, t: int = 8) -> np.ndarray:
    """A (t, t) similarity with two clear blocks of tasks: 0..t/2-1 and t/2..t-1."""
    labels = np.repeat([0, 1], t // 2)
    m = np.where(labels[:, None] == labels[None, :], 0.8, 0.1) + rng.uniform(0, 0.05, size=(t, t))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_over_subjects_equals_a_hand_rolled_loop():
    sims = _stack(np.random.default_rng(0), 5, 6, 0.2)
    mean, interval, boots = G.mean_with_interval(sims, 40, np.random.default_rng(3), 0.9)
    rng = np.random.default_rng(3)
    by_hand = []
    for _ in range(40):
        pick = rng.integers(0, 5, size=5)
        by_hand.append(sum(sims[i] for i in pick) / 5)
    by_hand = np.stack(by_hand)
    np.testing.assert_allclose(boots, by_hand, rtol=0, atol=1e-14)
    np.testing.assert_allclose(mean, sims.mean(axis=0))
    for i, j in itertools.product(range(6), repeat=2):
        np.testing.assert_allclose(interval[i, j], np.percentile(by_hand[:, i, j], [5, 95]))


def test_the_bootstrap_is_seeded():
    sims = _stack(np.random.default_rng(1), 3, 5, 0.3)
    a = G.mean_with_interval(sims, 30, np.random.default_rng(9))[1]
    b = G.mean_with_interval(sims, 30, np.random.default_rng(9))[1]
    c = G.mean_with_interval(sims, 30, np.random.default_rng(10))[1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_identical_subjects_have_zero_width_intervals():
    one = _symmetric(np.random.default_rng(2), 5)
    interval = G.mean_with_interval(np.stack([one] * 4), 50, np.random.default_rng(0))[1]
    np.testing.assert_allclose(interval[..., 0], one, atol=1e-12)
    np.testing.assert_allclose(interval[..., 1], one, atol=1e-12)


# --------------------------------------------------------------------------- LOSO


def test_loso_equals_explicit_loops():
    sims = _stack(np.random.default_rng(4), 4, 7, 0.5)
    spearman, pearson = G.loso_consistency(sims)
    iu = np.triu_indices(7, k=1)
    for i in range(4):
        rest = np.mean([sims[j] for j in range(4) if j != i], axis=0)
        assert spearman[i] == pytest.approx(stats.spearmanr(sims[i][iu], rest[iu]).statistic, abs=1e-12)
        assert pearson[i] == pytest.approx(stats.pearsonr(sims[i][iu], rest[iu]).statistic, abs=1e-12)


def test_loso_is_one_for_identical_subjects_and_low_for_unrelated_ones():
    rng = np.random.default_rng(5)
    one = _symmetric(rng, 8)
    spearman, pearson = G.loso_consistency(np.stack([one] * 3))
    np.testing.assert_allclose(spearman, 1.0)
    np.testing.assert_allclose(pearson, 1.0)
    unrelated = np.stack([_symmetric(rng, 12) for _ in range(6)])
    spearman, _ = G.loso_consistency(unrelated)
    assert np.all(np.abs(spearman) < 0.5), spearman


def test_group_needs_two_subjects():
    with pytest.raises(G.GroupError, match="at least 2 subjects"):
        G.loso_consistency(np.ones((1, 3, 3)))


# --------------------------------------------------------------------------- clade supports


def test_clades_follow_the_linkage_matrix():
    z = S.task_linkage(_planted(np.random.default_rng(6)), "average")
    cl = G.clades(z)
    assert len(cl) == 7 and cl[-1] == frozenset(range(8))
    assert frozenset(range(4)) in cl and frozenset(range(4, 8)) in cl
    for (left, right, _, size), c in zip(z, cl):
        assert len(c) == int(size)


def test_clade_support_equals_an_explicit_count():
    rng = np.random.default_rng(7)
    sims = _stack(rng, 5, 6, 0.4)
    _, _, boots = G.mean_with_interval(sims, 25, np.random.default_rng(1))
    z = S.task_linkage(sims.mean(axis=0), "average")
    support = G.clade_support(z, boots, "average")
    from tree_support import is_clade
    for k, c in enumerate(G.clades(z)):
        count = sum(is_clade(S.task_linkage(b, "average"), sorted(c)) for b in boots)
        assert support[k] == pytest.approx(count / 25)


def test_identical_subjects_support_every_clade_fully_and_unrelated_ones_do_not():
    rng = np.random.default_rng(8)
    one = _planted(rng)
    _, _, boots = G.mean_with_interval(np.stack([one] * 3), 30, np.random.default_rng(0))
    np.testing.assert_array_equal(G.clade_support(S.task_linkage(one), boots), 1.0)
    unrelated = np.stack([_symmetric(rng, 8) for _ in range(6)])
    _, _, boots = G.mean_with_interval(unrelated, 100, np.random.default_rng(0))
    support = G.clade_support(S.task_linkage(unrelated.mean(axis=0)), boots)
    assert support[-1] == 1.0  # the root holds every task
    assert np.mean(support[:-1]) < 0.6, support


def test_planted_blocks_are_supported_across_noisy_subjects():
    rng = np.random.default_rng(9)
    sims = _stack(rng, 6, 8, 0.1, base=_planted(rng))
    _, _, boots = G.mean_with_interval(sims, 100, np.random.default_rng(0))
    z = S.task_linkage(sims.mean(axis=0))
    support = dict(zip(G.clades(z), G.clade_support(z, boots)))
    assert support[frozenset(range(4))] >= 0.95 and support[frozenset(range(4, 8))] >= 0.95


# --------------------------------------------------------------------------- Taskonomy test


def test_sign_flip_p_is_the_exact_enumeration():
    z = np.array([0.3, -0.1, 0.5, 0.2])
    observed = z.mean()
    count = sum(np.mean(np.array(signs) * z) >= observed - 1e-12
                for signs in itertools.product((1, -1), repeat=4))
    assert G.sign_flip_p(z, 100, np.random.default_rng(0)) == pytest.approx(count / 16)
    # all positive: only the identity reaches the observed mean, p = 2^-s
    assert G.sign_flip_p(np.array([0.2, 0.4, 0.1]), 100, np.random.default_rng(0)) == pytest.approx(1 / 8)


def test_sign_flip_beyond_exact_is_random_and_seeded():
    z = np.random.default_rng(0).normal(0.5, 1.0, size=G.EXACT_SIGN_FLIP_MAX + 2)
    p = G.sign_flip_p(z, 500, np.random.default_rng(1))
    assert p == G.sign_flip_p(z, 500, np.random.default_rng(1))
    assert 1 / 501 <= p <= 1


def test_taskonomy_group_test_against_direct_computation():
    rng = np.random.default_rng(10)
    tsim = _symmetric(rng, 7)
    sims = _stack(rng, 5, 7, 0.3, base=tsim)
    out = G.taskonomy_group_test(sims, tsim, 100, np.random.default_rng(0), 0.95)
    iu = np.triu_indices(7, k=1)
    rho = np.array([stats.spearmanr(m[iu], tsim[iu]).statistic for m in sims])
    np.testing.assert_allclose(out["spearman"], rho, atol=1e-12)
    z = np.arctanh(rho)
    t = stats.ttest_1samp(z, 0.0, alternative="greater")
    assert out["t"] == pytest.approx(t.statistic) and out["t_p"] == pytest.approx(t.pvalue)
    ci = t.confidence_interval(0.95)  # one-sided; the two-sided interval by hand:
    half = stats.t.ppf(0.975, 4) * z.std(ddof=1) / np.sqrt(5)
    np.testing.assert_allclose(out["mean_r_ci"], np.tanh([z.mean() - half, z.mean() + half]))
    assert ci.low < z.mean()
    assert out["mean_r"] == pytest.approx(np.tanh(z.mean()))
    assert out["sign_flip_p"] == pytest.approx(1 / 32)  # every subject resembles Taskonomy


def test_unrelated_subjects_give_no_group_effect():
    rng = np.random.default_rng(11)
    tsim = _symmetric(rng, 10)
    sims = np.stack([_symmetric(rng, 10) for _ in range(8)])
    out = G.taskonomy_group_test(sims, tsim, 100, np.random.default_rng(0))
    assert out["t_p"] > 0.05 and out["sign_flip_p"] > 0.05
    assert out["mean_r_ci"][0] < 0 < out["mean_r_ci"][1]


def test_identical_subjects_have_no_spread_to_test():
    rng = np.random.default_rng(12)
    tsim = _symmetric(rng, 6)
    out = G.taskonomy_group_test(np.stack([tsim] * 3), tsim, 100, np.random.default_rng(0))
    assert np.isnan(out["t"]) and np.isnan(out["t_p"])
    assert np.isfinite(out["z"]).all() and out["mean_r"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- the stage


@pytest.mark.slow
def test_the_stage_stores_the_group_of_the_stored_analysis(analysis_study):
    from neurotask.pipeline.config import load_config
    from neurotask.pipeline.stages.analyse import GROUP_GROUP, read_analysis, read_group, run_analysis

    cfg = load_config(analysis_study.config)
    a, g = read_analysis(cfg), read_group(cfg)
    assert g is not None and g.attrs["input_fingerprint"].startswith(a.attrs["input_fingerprint"])
    assert g["similarity"].dims == ("subject", "task", "task2")
    assert list(g["subject"].values) == ["CSI1", "CSI2"]
    assert g["similarity_mean_ci"].dims == ("task", "task2", "bound")
    # the numbers are those of the pure function of the stored analysis
    direct = G.group_analysis(a)
    for name in ("similarity_mean", "similarity_mean_ci", "loso_spearman", "clade_support", "fisher_z",
                 "group_sign_flip_p"):
        np.testing.assert_array_equal(g[name].values, direct[name].values, err_msg=name)
    # consistent with the per-subject analysis
    np.testing.assert_allclose(g["similarity_mean"].values, a["similarity_mean"].values)
    np.testing.assert_allclose(g["linkage_mean"].values, a["linkage_mean"].values)
    np.testing.assert_allclose(g["spearman_taskonomy"].values, a["spearman_taskonomy"].values, atol=1e-12)
    assert float(g["mantel_p_mean"]) == float(a["mantel_p_mean"])
    # with 2 subjects, leaving one out compares it with the other: the analysis' subject correlation
    r12 = float(a["subject_correlation"].sel(subject="CSI1", subject2="CSI2"))
    np.testing.assert_allclose(g["loso_pearson"].values, [r12, r12], atol=1e-12)
    lower, upper = g["similarity_mean_ci"].sel(bound="lower"), g["similarity_mean_ci"].sel(bound="upper")
    assert bool((lower <= g["similarity_mean"] + 1e-12).all()) and bool((g["similarity_mean"] <= upper + 1e-12).all())
    # the two simulated subjects share the planted structure but each has its own variation:
    # each resembles the other (Spearman lower: it ranks the many near-zero similarities too)
    assert (g["loso_pearson"].values > 0.7).all() and (g["loso_spearman"].values > 0.3).all(), \
        (g["loso_pearson"].values, g["loso_spearman"].values)
    assert float(g["group_sign_flip_p"]) == pytest.approx(0.25)  # 2 subjects, both positive: 1/4
    # a rerun finds it stored and keeps it
    store_group = cfg.store_path / GROUP_GROUP
    before = sorted((p.name, p.stat().st_mtime_ns) for p in store_group.rglob("*") if p.is_file())
    run_analysis(cfg)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in store_group.rglob("*") if p.is_file()) == before


# --------------------------------------------------------------------------- the report


def _small_analysis(s: int, rng: np.random.Generator):
    """A per-subject analysis as far as the group needs it: s subjects near Taskonomy's similarity."""
    import xarray as xr

    from neurotask.pipeline.stats.taskonomy import taskonomy_similarity
    from neurotask.pipeline.tasks import task_info, task_names

    tasks = task_names()[:9]
    ts = taskonomy_similarity(tasks).values
    sims = _stack(rng, s, len(tasks), 0.2, base=ts)
    a = xr.Dataset(
        coords={"subject": [f"S{i}" for i in range(s)], "task": tasks, "task2": tasks,
                "linkage_field": ["left", "right", "distance", "size"],
                "label": ("task", [task_info(t).label for t in tasks]),
                "taskonomy_cluster": ("task", [task_info(t).cluster for t in tasks])},
        attrs={"linkage": "average", "ci": 0.95, "n_bootstrap": 30, "n_permutations": 50, "seed": 3, "metric": "cosine"})
    a["similarity"] = (("subject", "task", "task2"), sims)
    a["taskonomy_similarity"] = (("task", "task2"), ts)
    a["spearman_taskonomy_mean"] = ((), 0.5)
    a["mantel_p_mean"] = ((), 0.01)
    return a


def test_node_positions_are_where_scipy_draws_the_merges():
    from scipy.cluster import hierarchy

    from neurotask.pipeline.report.group import node_positions

    z = S.task_linkage(_stack(np.random.default_rng(13), 1, 9, 0.3)[0])
    d = hierarchy.dendrogram(z, no_plot=True)
    drawn = {(round(h, 12), round((ic[1] + ic[2]) / 2, 9)) for ic, dc in zip(d["icoord"], d["dcoord"]) for h in [dc[1]]}
    pos = node_positions(z, d["leaves"])
    assert {(round(h, 12), round(p, 9)) for h, p in zip(z[:, 2], pos)} == drawn


def test_group_figures_are_added_with_their_numbers(tmp_path):
    from neurotask.pipeline.report.group import group_figures, group_statistics
    from neurotask.pipeline.report.page import ReportPage

    g = G.group_analysis(_small_analysis(3, np.random.default_rng(14)))
    assert g.attrs["n_taskonomy_tasks"] == 9 and np.isfinite(g["clade_support"]).all()
    page = ReportPage(tmp_path, dpi=40)
    group_figures(page, g)
    assert [f.key for f in page.figures] == ["group_tree", "group_consistency"]
    assert all(f.section == "group" for f in page.figures)
    assert "mean over 3 subjects" in page.figures[0].caption and "30 bootstrap resamples" in page.figures[0].caption
    assert f"p = {float(g['group_sign_flip_p']):.3g}" in page.figures[1].caption
    assert "smallest possible p = 0.125" in page.figures[1].caption
    assert (tmp_path / "figures" / "group_tree.svg").is_file()
    stats_ = group_statistics(g)
    assert stats_["n_subjects"] == 3 and stats_["group_sign_flip_p"] == float(g["group_sign_flip_p"])
    empty = ReportPage(tmp_path / "none", dpi=40)
    group_figures(empty, None)
    assert not empty.figures and "at least 2 subjects" in empty.notes[0]


def test_clade_supports_are_drawn_at_their_merges_without_overlapping():
    from neurotask.pipeline.report.group import figure_group_tree
    from neurotask.pipeline.report.label_placement import overlapping_labels

    g = G.group_analysis(_small_analysis(4, np.random.default_rng(16)))
    fig = figure_group_tree(g)
    texts = {t.get_gid(): t for t in fig.axes[0].texts if (t.get_gid() or "").startswith("support:")}
    assert len(texts) == g.sizes["merge"] - 1  # every clade but the root
    for k in range(g.sizes["merge"] - 1):
        assert texts[f"support:{k}"].get_text() == f"{100 * float(g['clade_support'][k]):.0f}"
    assert overlapping_labels(texts) == []


def test_the_group_analysis_is_seeded_by_the_analysis_seed():
    a = _small_analysis(4, np.random.default_rng(15))
    first, again = G.group_analysis(a), G.group_analysis(a)
    np.testing.assert_array_equal(first["similarity_mean_ci"].values, again["similarity_mean_ci"].values)
    other = G.group_analysis(a.assign_attrs(seed=4))
    assert not np.array_equal(first["similarity_mean_ci"].values, other["similarity_mean_ci"].values)


@pytest.mark.slow
def test_the_report_shows_the_group_section_in_chromium(analysis_study, tmp_path):
    from analysis_fixtures import ROOT
    from browser import Browser, ensure_chromium

    report = analysis_study.workdir / "report"
    ensure_chromium(ROOT)
    with Browser(tmp_path / "profile") as b:
        found = b.load((report / "index.html").as_uri())
    assert found.errors == [], found.errors
    assert "group" in found.sections and "#group" in found.toc
    assert {"group_tree", "group_consistency"} <= set(found.ids)
    for key in ("group_tree", "group_consistency"):
        assert (report / "figures" / f"{key}.png").is_file() and (report / "figures" / f"{key}.svg").is_file()
    assert all(i["ok"] for i in found.images)
    stats_ = __import__("json").loads((report / "statistics.json").read_text())
    assert stats_["group"]["n_subjects"] == 2 and set(stats_["group"]["loso_spearman"]) == {"CSI1", "CSI2"}


def test_the_consistency_figure_draws_an_interval_that_excludes_its_estimate():
    """A subject's bootstrap interval may lie wholly above its r (seen in the NSD demo with a
    task without significant voxels): drawn as the interval, not refused by errorbar."""
    import xarray as xr

    from neurotask.pipeline.report.group import figure_group_consistency

    subjects = ["subj01", "subj02", "subj03"]
    r = np.array([0.31, 0.292, 0.35])
    ci = np.array([[0.27, 0.40], [0.293, 0.47], [0.34, 0.46]])  # subj02's r below its interval
    group = xr.Dataset({"loso_spearman": ("subject", [0.8, 0.9, 0.85]), "loso_pearson": ("subject", [0.8, 0.9, 0.85]),
                        "spearman_taskonomy": ("subject", r), "spearman_taskonomy_ci": (("subject", "bound"), ci),
                        "group_mean_r": ((), 0.32), "group_mean_r_ci": ("bound", [0.25, 0.39]),
                        "spearman_taskonomy_mean": ((), 0.3), "group_t": ((), 9.0), "group_t_p": ((), 0.006),
                        "group_sign_flip_p": ((), 0.125)},
                       coords={"subject": subjects, "bound": ["low", "high"]},
                       attrs={"ci": 0.95, "n_taskonomy_tasks": 21})
    fig = figure_group_consistency(group)
    ax = fig.axes[1]
    lines = [c for c in ax.collections if hasattr(c, "get_segments") and c.get_segments()]
    drawn = np.array([[seg[0][1], seg[1][1]] for c in lines for seg in c.get_segments()])
    np.testing.assert_allclose(drawn, ci)  # each subject's interval, as computed
    points = [c for c in ax.collections if c not in lines and len(c.get_offsets()) == 3]
    np.testing.assert_allclose(points[0].get_offsets()[:, 1], r)
