import numpy as np
import pytest

from neurotask.pipeline.ridge import expansion
from neurotask.pipeline import ridge


def test_expansion_plan_groups_the_spectrum():
    # A BOLD5000-like spectrum (7.5 decades) and the paper's grid: the planned groups tile the
    # eigen-directions, meet the tolerance row by row, and need far fewer products than one
    # expansion of the same accuracy over the whole spectrum.
    k = 1024
    s = 3e4 * np.arange(1, k + 1, dtype=np.float64) ** -2.5
    s = np.sort(s)
    alphas = ridge.paper_alphas(k)
    tol = 4e-4
    ex = expansion.expand(s, alphas, expansion.plan_groups(s, alphas, tol))
    starts = [g.start for g in ex.groups]
    stops = [g.stop for g in ex.groups]
    assert starts[0] == 0 and stops[-1] == k and starts[1:] == stops[:-1]
    assert [g.rank for g in ex.groups] == [b.shape[0] for b in ex.B_over_s]
    assert [g.offset for g in ex.groups] == list(np.cumsum([0] + [g.rank for g in ex.groups])[:-1])
    F = s[None, :] / (s[None, :] + alphas[:, None])
    assert (np.sqrt(ex.residual_sq.astype(np.float64).sum(1)) / F.max(1)).max() <= tol * 1.001
    # the expansion reproduces F up to that residual
    approx = np.zeros_like(F)
    for g, B in zip(ex.groups, ex.B_over_s):
        approx[:, g.start : g.stop] = ex.A[:, g.offset : g.offset + g.rank] @ (B * s[g.start : g.stop])
    assert np.all(np.abs(np.abs(F - approx) - np.sqrt(ex.residual_sq)) <= 1e-6 * tol * F.max(1, keepdims=True))
    def row_error(e):
        return (np.sqrt(e.residual_sq.astype(np.float64).sum(1)) / F.max(1)).max()

    single = next(r for r in range(1, 60) if row_error(expansion.expand(s, alphas, ((0, s.size, r),))) <= tol)
    assert ex.products + ex.rank**2 < 0.5 * single * k


def test_any_plan_is_a_valid_expansion():
    # The bound uses the residual the expansion reports: it must be the expansion's own, for
    # planned groups and for arbitrary ones (a rank-0 group, a full-rank group).
    s = np.sort(10.0 ** np.linspace(-3, 4, 300))
    alphas = ridge.paper_alphas(300, 40)
    F = s[None, :] / (s[None, :] + alphas[:, None])
    for plan in (((0, 100, 0), (100, 290, 5), (290, 300, 10)), ((0, 300, 3),), expansion.plan_groups(s, alphas, 1e-2)):
        ex = expansion.expand(s, alphas, plan)
        assert ex.rank == sum(r for _, _, r in plan) and len(ex.groups) == len(plan)
        assert [(g.start, g.stop, g.rank) for g in ex.groups] == [tuple(g) for g in plan]
        approx = np.zeros_like(F)
        for g, B in zip(ex.groups, ex.B_over_s):
            approx[:, g.start : g.stop] = ex.A[:, g.offset : g.offset + g.rank] @ (B * s[g.start : g.stop])
        assert np.all(np.abs(np.abs(F - approx) - np.sqrt(ex.residual_sq)) <= 1e-6 * F.max(1, keepdims=True))
    # a full-rank group is exact; a rank-0 group leaves its columns whole in the residual
    ex = expansion.expand(s, alphas, ((0, 100, 0), (100, 300, 40)))
    np.testing.assert_allclose(np.sqrt(ex.residual_sq[:, :100]), F[:, :100], rtol=1e-6)
    assert np.sqrt(ex.residual_sq[:, 100:]).max() <= 1e-6 * F.max()


def test_plan_is_deterministic_and_follows_the_tolerance():
    s = np.sort(10.0 ** np.linspace(-2, 5, 512))
    alphas = ridge.paper_alphas(512)
    a = expansion.plan_groups(s, alphas, 1e-3)
    b = expansion.plan_groups(s.copy(), alphas.copy(), 1e-3)
    assert a == b and a[0].start == 0 and a[-1].stop == 512
    assert all(isinstance(g, expansion.GroupPlan) for g in a)
    assert sum(g.rank for g in expansion.plan_groups(s, alphas, 1e-1)) < sum(g.rank for g in a)  # looser: lower ranks


def test_per_alpha_tolerances_are_met_row_by_row():
    # A profile loose for the small alphas: every row meets its own tolerance, the expansion is
    # still exactly what it reports, and it is cheaper than the uniform one.
    k = 512
    s = np.sort(3e4 * np.arange(1, k + 1, dtype=np.float64) ** -2.0)
    alphas = ridge.paper_alphas(k)
    tol = expansion.tolerance_profile(s, alphas, 1e-3, tight_df=0.05 * k)
    ex = expansion.expand(s, alphas, expansion.plan_groups(s, alphas, tol), tol)
    F = s[None, :] / (s[None, :] + alphas[:, None])
    row = np.sqrt(ex.residual_sq.astype(np.float64).sum(1)) / F.max(1)
    assert np.all(row <= tol * 1.001)
    approx = np.zeros_like(F)
    for g, B in zip(ex.groups, ex.B_over_s):
        approx[:, g.start : g.stop] = ex.A[:, g.offset : g.offset + g.rank] @ (B * s[g.start : g.stop])
    assert np.all(np.abs(np.abs(F - approx) - np.sqrt(ex.residual_sq)) <= 1e-6 * F.max(1, keepdims=True))
    uniform = expansion.expand(s, alphas, expansion.plan_groups(s, alphas, 1e-3))
    assert ex.products + ex.rank**2 < 0.8 * (uniform.products + uniform.rank**2)
    with pytest.raises(ValueError, match="tolerances"):
        expansion.plan_groups(s, alphas, np.zeros(alphas.size))


def test_tolerance_profile_is_tight_where_the_ridge_is_strong():
    s = np.sort(10.0 ** np.linspace(-3, 4, 400))
    alphas = ridge.paper_alphas(400)
    df = expansion.degrees_of_freedom(s, alphas)
    assert np.all(np.diff(df) < 0) and df[0] == pytest.approx(400, rel=1e-3)
    tol = expansion.tolerance_profile(s, alphas, 1e-3, tight_df=20.0)
    assert np.all(tol[df <= 20.0] == 1e-3)
    loose = df > 20.0
    np.testing.assert_allclose(tol[loose], np.minimum(1e-3 * (df[loose] / 20.0) ** expansion.LOOSEN_POWER, 1.0))
    assert np.all(np.diff(tol) <= 0) and tol[0] == 1.0  # looser towards least squares, at most 1
