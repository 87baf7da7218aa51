"""The report's HTML page: one self-contained file rendered from ``templates/report.html.j2``.

Each figure is embedded as a base64 data URI of the figure at full ``report.dpi`` resolution,
losslessly re-encoded as WebP (a third of the PNG's size: the published study's page is
~0.8 MB instead of 2.6 MB; PNG where Pillow lacks WebP); its PNG and SVG are the files beside the
page, linked from the figure. So ``index.html`` works alone and with its folder copied anywhere. The page is one section per
paper figure (``PageFigure.section``: ``fig1`` .. ``fig7``, ``diagnostics``), a table of
contents, a summary with the headline numbers and warnings, and the provenance. The template
is rendered with autoescaping on, so text from configs, results and task names cannot inject
markup. This module only arranges what the report stage computed into rows for the template.
"""

from __future__ import annotations

import base64
import io
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from PIL import Image, features

from neurotask.pipeline.report.claims import PAPER, PAPER_CODE
from neurotask.pipeline.report.figures import CLUSTER_COLOURS, CLUSTER_LABELS, task_clusters, task_labels

TEMPLATES = Path(__file__).resolve().parent / "templates"

# The page's sections in reading order: key -> (title, what the section shows). Figures with
# a section not listed here follow, under their own key; figures without one go last.
SECTIONS: dict[str, tuple[str, str]] = {
    "fig1": ("Figure 1. Prediction per ROI", "How well each task's features predict each region of interest."),
    "fig2": ("Figure 2. Whole-brain maps", "One task's test-set r in its significant voxels, per subject."),
    "fig3": ("Figure 3. 3D versus 2D features", "Where the 3D task of a 3D/2D pair predicts better, per subject."),
    "fig4": ("Figure 4. Noise-ceiling-normalised maps", "Test-set r divided by each voxel's noise ceiling."),
    "fig5": ("Figure 5. Task similarity", "The brain-derived similarity of the tasks."),
    "fig6": ("Figure 6. Task trees", "The brain's task tree beside Taskonomy's."),
    "fig7": ("Figure 7. Task graphs", "Each task joined to its most similar tasks, brain and Taskonomy."),
    "partition": ("Variance partition", "What groups of feature spaces explain uniquely and jointly, per ROI and voxel."),
    "group": ("Group level across subjects", "Subjects as the unit of replication: the mean tree's support, "
              "leave-one-subject-out consistency and the group test against Taskonomy."),
    "diagnostics": ("Diagnostics", "Checks of the fit: the chosen ridge penalties and the like."),
}
OTHER_SECTION = "other"



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
    embedded: tuple[str, bytes] | None = None  # (MIME type, bytes) the page embeds; None: not yet encoded
    dpi: int = 0  # of ``png``; 0: unknown

    @property
    def css_width(self) -> int | None:
        """The figure's width on the page at its drawn size (96 CSS px per inch), or None."""
        if not self.dpi:
            return None
        with Image.open(io.BytesIO(self.png)) as im:
            return round(im.width * 96 / self.dpi)

    def data_uri(self) -> str:
        """The image as the page embeds it, ``data:<mime>;base64,...``."""
        if self.embedded is None:
            self.embedded = embedded_image(self.png)
        mime, data = self.embedded
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass
class ReportPage:
    """What the page will show, gathered while the report stage writes the files.

    ``add`` saves a figure under ``figures/`` (PNG at ``dpi``, and SVG when asked) and keeps it
    for the page; ``section`` names the page section it goes in, ``links`` the files beside the
    page it refers to (label, relative path)."""

    outdir: Path
    dpi: int = 200
    figures: list[PageFigure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nifti_rows: list[tuple[str, list[str]]] = field(default_factory=list)

    def add(self, key: str, title: str, caption: str, fig: Figure, svg: bool = False, *,
            section: str = "", links: Sequence[tuple[str, str]] = ()) -> None:
        if any(f.key == key for f in self.figures):
            raise ValueError(f"report figure {key!r} added twice")  # its files would be overwritten
        png, files = save_figure(fig, self.outdir, key, svg, self.dpi)
        self.figures.append(PageFigure(key, title, caption, png, files, section, list(links), dpi=self.dpi))


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


def embedded_image(png: bytes) -> tuple[str, bytes]:
    """``png`` as the page embeds it: lossless WebP, pixel for pixel the same image, when Pillow
    has WebP and it is smaller (matplotlib's flat fills and anti-aliased text compress to about a
    third); else the PNG itself. -> (MIME type, bytes)."""
    if not features.check("webp"):
        return "image/png", png
    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
    buf = io.BytesIO()
    # quality/method: the effort of the lossless encoder (50/2: 2.5x faster than 100/4, 1% larger)
    im.save(buf, format="WEBP", lossless=True, quality=50, method=2)
    webp = buf.getvalue()
    return ("image/webp", webp) if len(webp) < len(png) else ("image/png", png)


@dataclass
class RoiCriteria:
    """Per ROI and task, averaged over subjects: cells like ``"12% / 10%; 0.35"``."""

    rois: list[str]
    rows: list[list[str]]  # task, then one cell per ROI
    has_permutation: bool
    has_noise_ceiling: bool


def format_number(x: object, digits: int = 3) -> str:
    """A table cell: reals to ``digits`` decimals (significant digits below 1e-3), None, NaN and
    inf as n/a; integers, strings and the rest as they print."""
    if x is None:
        return "n/a"
    if isinstance(x, numbers.Real) and not isinstance(x, (bool, numbers.Integral, np.integer)):
        x = float(x)
        if not math.isfinite(x):
            return "n/a"
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


@dataclass
class PageSection:
    """A section of the page: anchor id, heading, one-line description, its figures, and the
    same figures in rows: the figures of one kind for each subject side by side."""

    id: str
    title: str
    description: str
    figures: list[PageFigure]
    rows: list[list[PageFigure]] = field(default_factory=list)


def figure_rows(figures: Sequence[PageFigure], subjects: Sequence[str]) -> list[list[PageFigure]]:
    """Figures whose keys differ only by a trailing ``_<subject>`` share a row, in subject
    order; rows in the order their first figure was added. Other figures get a row each."""
    rows: dict[str, list[PageFigure]] = {}
    pattern = re.compile("^(.*)_(" + "|".join(re.escape(s) for s in subjects) + ")$") if subjects else None
    for i, f in enumerate(figures):
        m = pattern.match(f.key) if pattern else None
        rows.setdefault(m.group(1) if m else f"\0{i}", []).append(f)
    rank = {s: i for i, s in enumerate(subjects)}
    return [sorted(row, key=lambda f: rank.get(f.key.rsplit("_", 1)[-1], -1)) for row in rows.values()]


def page_sections(figures: Sequence[PageFigure], subjects: Sequence[str] = (),
                  always: Sequence[str] = ()) -> list[PageSection]:
    """Figures grouped by ``section`` in the order of :data:`SECTIONS` (unknown sections after,
    in order of appearance; figures without one last), each section's figures in the order
    added. Sections in ``always`` are kept without figures (they hold a table)."""
    order = list(SECTIONS)
    for f in figures:
        key = f.section or OTHER_SECTION
        if key not in order:
            order.append(key)
    if OTHER_SECTION in order:  # last
        order.remove(OTHER_SECTION)
        order.append(OTHER_SECTION)
    out = []
    for key in order:
        members = [f for f in figures if (f.section or OTHER_SECTION) == key]
        if members or key in always:
            title, description = SECTIONS.get(key, ("Other figures" if key == OTHER_SECTION else key, ""))
            out.append(PageSection(key, title, description, members, figure_rows(members, subjects)))
    return out


@dataclass
class NiftiListing:
    """A subject's NIfTI files beside the page: the per-task r maps, and the other files."""

    subject: str
    r_maps: list[tuple[str, str]]  # (task label, relative path)
    others: list[str]  # relative paths


def nifti_listing(outdir: Path | None, subjects: Sequence[str], labels: dict[str, str]) -> list[NiftiListing]:
    """What ``nifti/<subject>/`` beside the page holds, per subject (those with a folder)."""
    if outdir is None:
        return []
    out = []
    for s in subjects:
        d = outdir / "nifti" / s
        if not d.is_dir():
            continue
        files = sorted(p for p in d.iterdir() if p.is_file())
        r_maps = [(labels.get(p.name[2:-7], p.name[2:-7]), f"nifti/{s}/{p.name}") for p in files
                  if p.name.startswith("r_") and p.name.endswith(".nii.gz")]
        r_maps.sort(key=lambda x: list(labels.values()).index(x[0]) if x[0] in labels.values() else len(labels))
        others = [f"nifti/{s}/{p.name}" for p in files if not (p.name.startswith("r_") and p.name.endswith(".nii.gz"))]
        out.append(NiftiListing(s, r_maps, others))
    return out


def existing_files(outdir: Path | None, paths: Sequence[str]) -> list[str]:
    """The ``paths`` (relative to ``outdir``) that exist; all of them when ``outdir`` is None."""
    return list(paths) if outdir is None else [f for f in paths if (outdir / f).is_file()]


def _results_rows(provenance: dict) -> list[list[str]]:
    rows = []
    for s, v in provenance.get("results", {}).items():
        parameters = v.get("parameters") or ("none: imported, not fitted here" if v.get("imported") else "")
        rows.append([s, v["source"], parameters])
    return rows


def render_page(
    analysis: xr.Dataset,
    statistics: dict,
    figures: Sequence[PageFigure],
    notes: Sequence[str],
    nifti_rows: Sequence[tuple[str, list[str]]],
    provenance: dict,
    task: str,
    roi_criteria: RoiCriteria | None = None,
    *,
    warnings: Sequence[str] = (),
    claims: Sequence = (),
    outdir: Path | None = None,
) -> str:
    """The page's HTML. ``statistics``: the report's statistics.json; ``nifti_rows``: per subject
    the NIfTI files written (the page links what ``outdir/nifti/<subject>/`` holds); ``task``:
    the task of Figure 2; ``warnings``: shown at the top of the summary; ``claims``: the
    published study's :class:`~neurotask.pipeline.report.claims.Claim` rows (none: no table);
    ``outdir``: the page's folder, to link only files that exist there."""
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
    contrasts = _contrast_table(a, statistics, subjects)
    sections = page_sections(figures, subjects, always=[k for k, table in (("fig1", roi_criteria),
                                                                           ("fig3", contrasts)) if table])
    mean = statistics["taskonomy_comparison"]["mean"]
    nifti_subjects = [s for s, _ in nifti_rows]
    hidden = ("config_text", "packages", "results", "upstream")
    env = _environment()
    env.filters["existing"] = lambda paths: existing_files(outdir, paths)
    return env.get_template("report.html.j2").render(
        title=provenance.get("study", "neurotask study"),
        created=provenance.get("created", ""),
        n_subjects=len(subjects),
        n_tasks=len(tasks),
        s=a.attrs,
        subjects=subjects,
        mean=mean,
        warnings=list(warnings),
        claims=list(claims),
        paper=PAPER,
        paper_code=PAPER_CODE,
        n_claims_agree=sum(bool(c.agrees) for c in claims),
        upstream=provenance.get("upstream", []),
        comparison_rows=comparison_rows,
        subject_pairs=list(statistics["subject_correlation"].items()) if len(subjects) > 1 else [],
        significant_rows=significant_rows,
        n_voxels=[statistics["n_voxels"][s] for s in subjects],
        without_significant=[labels[i] for i, t in enumerate(tasks) if all(counts[s][t] == 0 for s in subjects)],
        contrasts=contrasts,
        roi_criteria=roi_criteria,
        notes=notes,
        sections=sections,
        nifti=nifti_listing(outdir, nifti_subjects, dict(zip(tasks, labels))),
        nifti_rows=nifti_rows,
        figure_2_task=labels[tasks.index(task)],
        provenance_rows=[[k, str(v)] for k, v in provenance.items() if k not in hidden],
        results_rows=_results_rows(provenance),
        packages=list(provenance.get("packages", {}).items()),
        config_text=provenance.get("config_text", ""),
    )
