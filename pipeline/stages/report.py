"""The report stage: the paper's figures, NIfTI maps and one self-contained HTML page.

``neurotask report --config FILE`` reads the stored analysis (``analysis/task_structure``)
and the per-voxel results of the study and writes, under ``<workdir>/report/``:

* ``index.html``: a table of contents, a summary (headline numbers, warnings), one section
  per paper figure (each PNG embedded as a downscaled base64 data URI, so the page works
  alone or with its folder copied anywhere, and linked to its files), the comparison
  statistics, for the authors' published results the paper's claims beside the reproduced
  numbers, and the run's provenance;
* ``figures/``: the figures as PNG at ``report.dpi`` and as SVG where drawn so;
* ``nifti/<subject>/``: per task the whole-brain r map (``r_<task>.nii.gz``, every analysed
  voxel, NaN elsewhere), the significance masks of all tasks (``significant.nii.gz``, one
  volume per task in the order of ``tasks.txt``) and the thresholded maps drawn in Figures
  2-3, to open in any NIfTI viewer;
* ``statistics.json``: the comparison statistics.

This module is the orchestration: what to draw and write, in which files. The figures are
drawn by :mod:`neurotask.pipeline.report.figures`; the page is rendered from a template by
:mod:`neurotask.pipeline.report.page`.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import xarray as xr

from neurotask.pipeline.config import Config
from neurotask.pipeline.errors import NeurotaskError
from neurotask.pipeline.report.claims import is_published_import, paper_claims, upstream
from neurotask.pipeline.report.page import ReportPage, RoiCriteria, render_page
from neurotask.pipeline.report.partition import Partition, partition_figures
from neurotask.pipeline.report.diagnostics import feature_counts
from neurotask.pipeline.report.group import group_figures, group_statistics
from neurotask.pipeline.stats.group import group_analysis
from neurotask.pipeline.report.sections import diagnostic_figures, roi_figures, structure_figures
from neurotask.pipeline.report.volumes import MapOptions, map_figures
from neurotask.pipeline.stages.summary import roi_table
from neurotask.storage import StudyStore, results_group

logger = logging.getLogger(__name__)

PACKAGES = ("numpy", "scipy", "xarray", "zarr", "dask", "distributed", "scikit-learn", "networkx",
            "matplotlib", "nibabel", "torch", "himalaya", "pyyaml")


class ReportError(NeurotaskError):
    """The report cannot be made from what the store holds."""


# --------------------------------------------------------------------------- report


@dataclass
class ReportOptions:
    task: str | None = None
    graph_neighbours: int = 2
    dpi: int = 200
    alpha_edge_warning: float = 0.2  # warn when more of a task's voxels chose an end of the alpha grid
    maps: MapOptions = field(default_factory=MapOptions)
    n_features: dict[str, int] | None = None  # task -> feature count: rebuilds the paper's alpha grid


def chosen_task(analysis: xr.Dataset, task: str | None) -> str:
    """The task of Figure 2: ``task``, or the one with the most significant voxels overall."""
    tasks = [str(t) for t in analysis["task"].values]
    if task is not None:
        if task not in tasks:
            raise ReportError(f"report.task {task!r} is not among the analysed tasks ({', '.join(tasks)})")
        return task
    return tasks[int(np.argmax(analysis["n_significant"].sum("subject").values))]


def build_report(
    analysis: xr.Dataset,
    results: dict[str, xr.Dataset],
    outdir: str | Path,
    *,
    options: ReportOptions | None = None,
    provenance: dict | None = None,
    partitions: list[Partition] | None = None,
    group: xr.Dataset | None = None,
) -> Path:
    """Write figures, NIfTI maps, statistics.json and index.html into ``outdir``. -> index.html.

    ``analysis``: the Dataset of :func:`pipeline.stats.task_structure.analyse`; ``results``: subject ->
    results (task, voxel) with voxel_i/j/k, roi and attrs volume_shape, affine (maps are
    drawn only for subjects whose voxels have positions). The paper-vs-reproduction table is
    drawn when ``results`` are the authors' published results (:func:`is_published_import`).
    ``partitions``: the study's variance partitions (:func:`read_partitions`), drawn in their section.
    ``group``: the stored group analysis (``analysis/group``, :mod:`pipeline.stats.group`); None:
    computed here from ``analysis`` when it has two or more subjects.
    """
    options = options or ReportOptions()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    page = ReportPage(outdir, dpi=options.dpi)

    roi_figures(page, analysis)
    task = chosen_task(analysis, options.task)
    map_figures(page, analysis, results, task, options.maps)
    logger.info("report: figures 1-3 and NIfTI maps written")
    structure_figures(page, analysis, options.graph_neighbours)
    if partitions:
        partition_figures(page, partitions, results, options.maps, space_labels(analysis))
    if group is None and analysis.sizes["subject"] > 1:  # not stored (an older store, or called directly)
        group = group_analysis(analysis)
    group_figures(page, group)
    warnings = diagnostic_figures(page, results, options.alpha_edge_warning, options.n_features, analysis)

    statistics = comparison_statistics(analysis)
    if group is not None:
        statistics["group"] = group_statistics(group)
    (outdir / "statistics.json").write_text(json.dumps(statistics, indent=1))
    claims = paper_claims(analysis, statistics) if is_published_import(results) else []
    html = render_page(analysis, statistics, page.figures, page.notes, page.nifti_rows, provenance or {}, task,
                       roi_criteria(results), warnings=warnings, claims=claims, outdir=outdir)
    index = outdir / "index.html"
    index.write_text(html, encoding="utf-8")
    return index


# --------------------------------------------------------------------------- statistics


def _f(x) -> float | None:
    x = float(x)
    return None if not np.isfinite(x) else x


def comparison_statistics(analysis: xr.Dataset) -> dict:
    """The headline numbers as plain JSON-able values."""
    a = analysis
    subjects = [str(s) for s in a["subject"].values]
    rows = {}
    for s in subjects:
        rows[s] = {
            "spearman_taskonomy": _f(a.spearman_taskonomy.sel(subject=s)),
            "spearman_ci": [_f(x) for x in a.spearman_taskonomy_ci.sel(subject=s).values],
            "mantel_p": _f(a.mantel_p.sel(subject=s)),
            "ari_taskonomy": _f(a.ari_taskonomy.sel(subject=s)),
            "ari_taskonomy_tree": _f(a.ari_taskonomy_tree.sel(subject=s)),
            "cophenetic_correlation": _f(a.cophenetic_correlation_taskonomy.sel(subject=s)),
        }
    rows["mean"] = {
        "spearman_taskonomy": _f(a.spearman_taskonomy_mean),
        "spearman_ci": [_f(x) for x in a.spearman_taskonomy_mean_ci.values],
        "mantel_p": _f(a.mantel_p_mean),
        "ari_taskonomy": _f(a.ari_taskonomy_mean),
        "ari_taskonomy_tree": _f(a.ari_taskonomy_tree_mean),
        "cophenetic_correlation": _f(a.cophenetic_correlation_taskonomy_mean),
    }
    tasks = [str(t) for t in a["task"].values]
    return {
        "settings": {k: a.attrs[k] for k in ("significance", "fdr", "metric", "linkage", "n_clusters",
                                              "n_permutations", "n_bootstrap", "seed", "ci", "taskonomy_affinities")},
        "taskonomy_comparison": rows,
        "n_significant": {s: dict(zip(tasks, map(int, a.n_significant.sel(subject=s).values))) for s in subjects},
        "n_voxels": dict(zip(subjects, map(int, a.n_voxels.values))),
        "subject_correlation": {f"{x}-{y}": _f(a.subject_correlation.sel(subject=x, subject2=y))
                                for i, x in enumerate(subjects) for y in subjects[i + 1:]},
        "clusters_mean_tree": dict(zip(tasks, map(int, a.cluster_mean.values))),
        "contrasts_whole_brain": {s: {str(c): [int(a.contrast_n_3d_wins_whole_brain.sel(subject=s, contrast=c)),
                                               int(a.contrast_n_voxels_whole_brain.sel(subject=s, contrast=c))]
                                      for c in a["contrast"].values} for s in subjects},
    }


def roi_criteria(results: dict[str, xr.Dataset]) -> RoiCriteria | None:
    """ROI x task, averaged over subjects: % significant voxels by parametric and permutation
    q, and the median noise-normalised r (r / noise ceiling); None without ROI labels."""
    tables = [roi_table(r) for r in results.values() if r.sizes.get("voxel", 0) and (r["roi"] != "").any()]
    if not tables:
        return None
    mean = xr.concat(tables, dim="subject", join="inner").mean("subject", skipna=True)
    rois = [str(x) for x in mean["roi"].values]
    rows = []
    for t in mean["task"].values:
        row = [str(t)]
        for roi in rois:
            c = mean.sel(task=t, roi=roi)
            cell = f"{100 * float(c['fraction_significant']):.0f}%"
            if "fraction_significant_perm" in c:
                cell += f" / {100 * float(c['fraction_significant_perm']):.0f}%"
            if "median_noise_normalized_r" in c:
                cell += f"; {float(c['median_noise_normalized_r']):.2f}"
            row.append(cell)
        rows.append(row)
    return RoiCriteria(rois, rows, has_permutation="fraction_significant_perm" in mean,
                       has_noise_ceiling="median_noise_normalized_r" in mean)


# --------------------------------------------------------------------------- provenance


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("neurotask", *PACKAGES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]  # the checkout, for an editable install
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def provenance(cfg: Config, analysis: xr.Dataset, results: dict[str, xr.Dataset]) -> dict:
    """Config, versions, dates and where the results came from."""
    prov = {
        "study": cfg.study.name,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "analysis computed": analysis.attrs.get("created", ""),
        "config file": str(cfg.path),
        "store": str(cfg.store_path),
        "host": platform.node(),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    commit = _git_commit()
    if commit:
        prov["neurotask commit"] = commit
    prov["results"] = {
        s: {"source": str(ds.attrs.get("source", "fitted by neurotask")), "imported": bool(ds.attrs.get("imported")),
            "parameters": json.dumps(ds.attrs.get("fit", {}), sort_keys=True) if "fit" in ds.attrs else ""}
        for s, ds in results.items()}
    # where imported results came from upstream (repository, commit), as the import recorded it
    prov["upstream"] = upstream(results)
    if is_published_import(results) and not any(k == "upstream commit" for k, _ in prov["upstream"]):
        prov["upstream"].append(("upstream commit", "not recorded by the import"))
    prov["packages"] = package_versions()
    try:
        prov["config_text"] = cfg.path.read_text()
    except OSError:
        pass
    return prov


def space_labels(analysis: xr.Dataset) -> dict[str, str]:
    """Feature space -> display label: the analysis' task labels, else the task bank's, else the name."""
    from neurotask.pipeline.tasks import task_info, task_names

    out = {t: task_info(t).label for t in task_names()}
    out.update(zip((str(t) for t in analysis["task"].values), (str(x) for x in analysis["label"].values)))
    return out


def read_partitions(store: StudyStore, subjects: list[str]) -> list[Partition]:
    """The variance partitions the analysis stage summarised (``analysis/partition_<name>``) with
    their per-voxel groups ``partition/<name>/<subject>``; [] when the store has none."""
    from neurotask.pipeline.stages.analyse import PARTITION, partition_summary_group

    out = []
    for name in store.members(PARTITION):
        group = partition_summary_group(name)
        if not store.has(group):
            raise ReportError(f"{store.path}: {PARTITION}/{name} is not summarised yet ({group}); "
                              "run `neurotask analyse` first")
        here = [s for s in subjects if store.has(f"{PARTITION}/{name}/{s}")]
        out.append(Partition(name, store.read_dataset(group),
                             {s: store.read_dataset(f"{PARTITION}/{name}/{s}") for s in here}))
    return out


def report_dir(cfg: Config) -> Path:
    return cfg.workdir / "report"


def write_report(cfg: Config) -> Path:
    """The study's report from the stored analysis and results. -> path of index.html."""
    from neurotask.pipeline.stages.analyse import read_analysis, read_group

    analysis = read_analysis(cfg)
    store = StudyStore(cfg.store_path)
    subjects = [str(s) for s in analysis["subject"].values]
    missing = [s for s in subjects if not store.has(results_group(s))]
    if missing:
        raise ReportError(f"{cfg.store_path}: the analysis covers {', '.join(missing)} but their results are gone")
    results = {s: store.results(s) for s in subjects}
    options = ReportOptions(task=cfg.report.task, graph_neighbours=cfg.report.graph_neighbours,
                            dpi=cfg.report.dpi, alpha_edge_warning=cfg.report.alpha_edge_warning,
                            maps=MapOptions.from_config(cfg, store),
                            n_features=feature_counts(store, [str(t) for t in analysis["task"].values]))
    t0 = time.perf_counter()
    index = build_report(analysis, results, report_dir(cfg), options=options,
                         provenance=provenance(cfg, analysis, results), partitions=read_partitions(store, subjects),
                         group=read_group(cfg))
    logger.info(f"report: {index} ({time.perf_counter() - t0:.1f} s)")
    return index
