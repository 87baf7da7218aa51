"""The report's HTML page: one self-contained file rendered from ``templates/report.html.j2``.

Figures are embedded as base64 PNG data URIs, so the page works alone or with its folder
copied anywhere; the files beside it (PNG, SVG, NIfTI) are linked. The template is rendered
with autoescaping on, so text from configs, results and task names cannot inject markup.
This module only arranges what the report stage computed into rows for the template.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import xarray as xr
from matplotlib.figure import Figure

from neurotask.pipeline.report.figures import CLUSTER_COLOURS, CLUSTER_LABELS, task_clusters, task_labels

TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass
class PageFigure:
    """A figure as the page shows it: anchor, title, caption, PNG bytes, files beside the page
    (its PNG/SVG, then ``links``: other files such as NIfTI maps or interactive views), and the
    page section it belongs to."""

    key: str
    title: str
    caption: str
    png: bytes
    files: list[str]
    section: str = ""
    links: list[tuple[str, str]] = field(default_factory=list)  # (label, path relative to the page)


@dataclass
class ReportPage:
    """What the page will show, gathered while the report stage writes the files.

    ``add`` saves a figure under ``figures/`` (PNG at ``dpi``, and SVG when asked) and keeps it
    for the page; ``section`` names the page section it goes in, ``links`` the files beside the
    page it refers to (label, relative path)."""

    outdir: Path
    dpi: int = 110
    figures: list[PageFigure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nifti_rows: list[tuple[str, list[str]]] = field(default_factory=list)

    def add(self, key: str, title: str, caption: str, fig: Figure, svg: bool = False, *,
            section: str = "", links: Sequence[tuple[str, str]] = ()) -> None:
        png, files = save_figure(fig, self.outdir, key, svg, self.dpi)
        self.figures.append(PageFigure(key, title, caption, png, files, section, list(links)))


def save_figure(fig: Figure, outdir: Path, name: str, svg: bool, dpi: int) -> tuple[bytes, list[str]]:
    """Write ``figures/<name>.png`` (and ``.svg``) under ``outdir``. -> (PNG bytes, relative paths)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    png = buf.getvalue()
    (outdir / "figures").mkdir(parents=True, exist_ok=True)
    (outdir / "figures" / f"{name}.png").write_bytes(png)
    files = [f"figures/{name}.png"]
    if svg:
        fig.savefig(outdir / "figures" / f"{name}.svg", format="svg", facecolor=fig.get_facecolor())
        files.append(f"figures/{name}.svg")
    return png, files


@dataclass
class RoiCriteria:
    """Per ROI and task, averaged over subjects: cells like ``"12% / 10%; 0.35"``."""

    rois: list[str]
    rows: list[list[str]]  # task, then one cell per ROI
    has_permutation: bool
    has_noise_ceiling: bool


def format_number(x: object, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` decimals (significant digits below 1e-3), None as n/a."""
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update({
        "num": format_number,
        "g": lambda x: f"{x:g}",
        "percent": lambda x: f"{x:.0%}",
        "base64": lambda data: base64.b64encode(data).decode("ascii"),
        "suffix": lambda f: Path(f).suffix[1:].upper(),
    })
    return env


def _wins(w: int, n: int) -> str:
    return f"{w} / {n}" + (f" ({w / n:.0%})" if n else "")


def _contrast_table(analysis: xr.Dataset, statistics: dict, subjects: list[str]) -> dict | None:
    """Figure 3's counts: per subject and 3D/2D pair, voxels where the 3D task wins, per ROI group."""
    a = analysis
    if not a.sizes.get("contrast", 0):
        return None
    rows = []
    for s in subjects:
        for c in a["contrast"].values:
            row = [f"{s} {c}"]
            for g in a["roi_group"].values:
                row.append(_wins(int(a.contrast_n_3d_wins.sel(subject=s, contrast=c, roi_group=g)),
                                 int(a.contrast_n_voxels.sel(subject=s, contrast=c, roi_group=g))))
            row.append(_wins(*statistics["contrasts_whole_brain"][s][str(c)]))
            rows.append(row)
    return {"groups": [str(g) for g in a["roi_group"].values], "rows": rows}


def render_page(
    analysis: xr.Dataset,
    statistics: dict,
    figures: Sequence[PageFigure],
    notes: Sequence[str],
    nifti_rows: Sequence[tuple[str, list[str]]],
    provenance: dict,
    task: str,
    roi_criteria: RoiCriteria | None = None,
) -> str:
    """The page's HTML. ``statistics``: the report's statistics.json; ``nifti_rows``: per subject
    the NIfTI files written; ``task``: the task of Figure 2."""
    a = analysis
    subjects = [str(s) for s in a["subject"].values]
    tasks = [str(t) for t in a["task"].values]
    labels, clusters = task_labels(a), task_clusters(a)
    counts = statistics["n_significant"]
    comparison_rows = [[name if name != "mean" else "subject mean", v["spearman_taskonomy"],
                        f"[{format_number(v['spearman_ci'][0])}, {format_number(v['spearman_ci'][1])}]",
                        v["mantel_p"], v["ari_taskonomy"], v["ari_taskonomy_tree"], v["cophenetic_correlation"]]
                       for name, v in statistics["taskonomy_comparison"].items()]
    significant_rows = [{"label": labels[i], "colour": CLUSTER_COLOURS[clusters[i]],
                         "cluster": CLUSTER_LABELS[clusters[i]], "group": int(a.cluster_mean.values[i]),
                         "counts": [counts[s][t] for s in subjects]} for i, t in enumerate(tasks)]
    hidden = ("config_text", "packages", "results")
    return _environment().get_template("report.html.j2").render(
        title=provenance.get("study", "neurotask study"),
        created=provenance.get("created", ""),
        n_subjects=len(subjects),
        n_tasks=len(tasks),
        s=a.attrs,
        subjects=subjects,
        comparison_rows=comparison_rows,
        subject_pairs=list(statistics["subject_correlation"].items()) if len(subjects) > 1 else [],
        significant_rows=significant_rows,
        n_voxels=[statistics["n_voxels"][s] for s in subjects],
        without_significant=[labels[i] for i, t in enumerate(tasks) if all(counts[s][t] == 0 for s in subjects)],
        contrasts=_contrast_table(a, statistics, subjects),
        roi_criteria=roi_criteria,
        notes=notes,
        images=figures,
        nifti_rows=nifti_rows,
        figure_2_task=labels[tasks.index(task)],
        provenance_rows=[[k, str(v)] for k, v in provenance.items() if k not in hidden],
        results_rows=[[s, v["source"], v["parameters"]] for s, v in provenance.get("results", {}).items()],
        packages=list(provenance.get("packages", {}).items()),
        config_text=provenance.get("config_text", ""),
    )
