"""The published study's claims beside the reproduced numbers.

Neural Taskonomy (Wang, Tarr & Wehbe, NeurIPS 2019) states a few facts that the authors' own
per-voxel results (imported with ``neurotask import-published``) must show again when the
analysis is right. :func:`paper_claims` checks each against the analysis and the report's
statistics and returns the rows of the report's "Paper vs reproduction" table: the claim,
what the paper says, what this analysis finds, and whether they agree. The paper's words are
data here (``PAPER_*``); the reproduced values are always computed.

The table is shown only for imported published results (:func:`is_published_import`: every
subject's results carry ``imported`` and a ``source`` naming the published files), never
for a study that was fitted, whatever its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import xarray as xr

PAPER = "Neural Taskonomy (Wang, Tarr & Wehbe, NeurIPS 2019)"
PAPER_CODE = "github.com/ariaaay/NeuralTaskonomy"

# The paper's statements the table quotes (its text and figures)
PAPER_CURVATURE = "Curvature: \u201cless than 10 significant voxels\u201d"
PAPER_OTHERS = "Curvature the one task singled out (< 10 voxels)"
PAPER_3D_WHOLE_BRAIN = "3D features explain more variance than 2D \u201cacross the whole brain\u201d (abstract; Fig. 3)"
PAPER_3D_SCENE = "the 3D advantage is strongest in scene-selective cortex (OPA, PPA, RSC) (Fig. 3)"
PAPER_TASKONOMY = ("\u201ctasks with higher transferability make similar predictions for brain responses\u201d "
                   "(abstract; no coefficient reported)")

CURVATURE_LIMIT = 10  # the paper's "less than 10"
SIGNIFICANCE_LEVEL = 0.05  # for the Mantel test of brain vs Taskonomy


@dataclass(frozen=True)
class Claim:
    """One row: the claim, the paper's statement, the reproduced value, and whether they agree."""

    claim: str
    paper: str
    reproduced: str
    agrees: bool


def is_published_import(results: Mapping[str, xr.Dataset]) -> bool:
    """True when every subject's results were imported from the authors' published files.

    ``import-published`` marks its results ``imported`` with a ``source`` starting with
    ``published`` (the npz) or ``authors' layout`` (the pickles)."""
    if not results:
        return False
    return all(bool(ds.attrs.get("imported")) and
               str(ds.attrs.get("source", "")).startswith(("published", "authors' layout"))
               for ds in results.values())


def _subjects(analysis: xr.Dataset) -> list[str]:
    return [str(s) for s in analysis["subject"].values]


def _label(analysis: xr.Dataset, task: str) -> str:
    return str(analysis["label"].sel(task=task).values)


def _pct(wins: int, n: int) -> str:
    return f"{wins}/{n} ({wins / n:.0%})" if n else "0/0"


def curvature_claim(analysis: xr.Dataset, statistics: dict) -> Claim | None:
    """Curvature's significant voxels in every subject below the paper's 10."""
    if "curvature" not in [str(t) for t in analysis["task"].values]:
        return None
    counts = [statistics["n_significant"][s]["curvature"] for s in _subjects(analysis)]
    return Claim("Significant voxels of Curvature", PAPER_CURVATURE,
                 ", ".join(f"{s} {n}" for s, n in zip(_subjects(analysis), counts)),
                 all(n < CURVATURE_LIMIT for n in counts))


def other_tasks_claim(analysis: xr.Dataset, statistics: dict) -> Claim:
    """Every task but Curvature reaches 10 significant voxels over the subjects together;
    the reproduced cell names the tasks below 10 in single subjects."""
    subjects = _subjects(analysis)
    tasks = [str(t) for t in analysis["task"].values if str(t) != "curvature"]
    counts = statistics["n_significant"]
    pooled = {t: sum(counts[s][t] for s in subjects) for t in tasks}
    below_pooled = [t for t in tasks if pooled[t] < CURVATURE_LIMIT]
    below = [f"{_label(analysis, t)} in {s} ({counts[s][t]})" for s in subjects for t in tasks
             if counts[s][t] < CURVATURE_LIMIT]
    text = (f"all {len(tasks)} other tasks reach {CURVATURE_LIMIT} over the subjects"
            if not below_pooled else "below 10 over the subjects: " + ", ".join(_label(analysis, t) for t in below_pooled))
    if below:
        text += "; below 10 in one subject: " + ", ".join(below)
    return Claim("Significant voxels of the other tasks", PAPER_OTHERS, text, not below_pooled)


def contrast_claims(analysis: xr.Dataset, statistics: dict) -> list[Claim]:
    """Figure 3: the 3D task wins in most voxels over the whole brain, and more often in the
    scene ROIs than in early visual cortex, for each 3D/2D pair and subject."""
    a = analysis
    if not a.sizes.get("contrast", 0):
        return []
    subjects = _subjects(a)
    contrasts = [str(c) for c in a["contrast"].values]
    whole = statistics["contrasts_whole_brain"]
    cells, agree = [], True
    for c in contrasts:
        parts = []
        for s in subjects:
            wins, n = whole[s][c]
            parts.append(f"{s} {_pct(wins, n)}")
            agree &= n > 0 and wins / n > 0.5
        cells.append(f"{c}: " + ", ".join(parts))
    out = [Claim("3D task better than its 2D pair, whole brain (voxels significant for either)",
                 PAPER_3D_WHOLE_BRAIN, "; ".join(cells), agree)]
    groups = [str(g) for g in a["roi_group"].values]
    if {"scene", "early_visual"} <= set(groups) and a.sizes.get("roi", 0):
        wins = a["contrast_n_3d_wins"].sel(subject=subjects, contrast=contrasts)
        n = a["contrast_n_voxels"].sel(subject=subjects, contrast=contrasts)
        cells, agree = [], True
        for c in contrasts:
            parts = []
            for s in subjects:
                w_scene, n_scene = (int(x.sel(subject=s, contrast=c, roi_group="scene")) for x in (wins, n))
                w_early, n_early = (int(x.sel(subject=s, contrast=c, roi_group="early_visual")) for x in (wins, n))
                ok = n_scene > 0 and n_early > 0 and w_scene / n_scene > w_early / n_early
                agree &= ok
                parts.append(f"{s} {w_scene / n_scene:.0%} vs {w_early / n_early:.0%}" if n_scene and n_early
                             else f"{s} n/a")
            cells.append(f"{c}: " + ", ".join(parts))
        out.append(Claim("3D advantage larger in scene ROIs than in early visual cortex "
                         "(share of voxels where the 3D task wins, scene vs early visual)",
                         PAPER_3D_SCENE, "; ".join(cells), agree))
    return out


def taskonomy_claim(statistics: dict) -> Claim:
    """Brain vs Taskonomy: the subject-mean Spearman r is positive and the Mantel test significant."""
    mean = statistics["taskonomy_comparison"]["mean"]
    r, p, (lo, hi) = mean["spearman_taskonomy"], mean["mantel_p"], mean["spearman_ci"]
    if r is None or p is None:
        return Claim("Brain task similarity related to Taskonomy's", PAPER_TASKONOMY, "n/a", False)
    ci = f", CI [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    return Claim("Brain task similarity related to Taskonomy's (subject mean)", PAPER_TASKONOMY,
                 f"Spearman r {r:.3f}{ci}, Mantel p {p:.3f}", bool(r > 0 and p < SIGNIFICANCE_LEVEL))


def paper_claims(analysis: xr.Dataset, statistics: dict) -> list[Claim]:
    """Every claim the analysis can check, in the paper's order (Figure 2, 3, then 6-7)."""
    rows = [curvature_claim(analysis, statistics), other_tasks_claim(analysis, statistics),
            *contrast_claims(analysis, statistics), taskonomy_claim(statistics)]
    return [c for c in rows if c is not None]


def upstream(results: Mapping[str, xr.Dataset]) -> list[tuple[str, str]]:
    """(item, value) rows of where imported results came from: the attrs ``source``,
    ``source_repository`` and ``source_commit`` of each subject's results, merged when equal."""
    rows: list[tuple[str, str]] = []
    for key, name in (("source_repository", "upstream repository"), ("source_commit", "upstream commit")):
        values = sorted({str(ds.attrs[key]) for ds in results.values() if ds.attrs.get(key)})
        if values:
            rows.append((name, ", ".join(values)))
    return rows


def agreement(claims: list[Claim]) -> tuple[int, int]:
    """(claims that agree, claims)."""
    return int(np.sum([c.agrees for c in claims])), len(claims)
