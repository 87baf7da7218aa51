"""The report's figure sections that are drawn from the analysis: Figure 1 (per ROI),
Figures 5-7 (task similarity, trees, graphs) and the fit's diagnostics (alpha). The brain
maps (Figures 2-3) are in :mod:`neurotask.pipeline.report.volumes`; the drawing itself in
:mod:`.figures` and :mod:`.diagnostics`.

Each function adds its figures to the page (PNG at the page's dpi and SVG) with their
captions, and notes on the page why a figure is missing.
"""

from __future__ import annotations

from collections.abc import Mapping

import xarray as xr

from neurotask.pipeline.report import diagnostics
from neurotask.pipeline.report.figures import (
    cluster_order,
    figure_graphs,
    figure_roi_bars,
    figure_similarity,
    figure_similarity_subjects,
    figure_trees,
    has_roi_noise_ceiling,
    has_roi_test,
    task_clusters,
    zero_significant_tasks,
)
from neurotask.pipeline.report.page import ReportPage


# --------------------------------------------------------------------------- captions


def roi_source_caption(analysis: xr.Dataset) -> str:
    return ("the separate ROI-only models" if analysis.attrs.get("roi_source") == "roi_results"
            else "the whole-brain models' voxels in each ROI")


def roi_test_caption(analysis: xr.Dataset, every_subject: bool = False) -> str:
    """What Figure 1's filled and open bars mean (the ROI-level test), or why there are none.
    ``every_subject``: the subject-mean figure, filled where every subject's test is."""
    if not has_roi_test(analysis):
        return ("No ROI-level test: " + ("this stored analysis predates it (rerun `neurotask analyse`)."
                                         if "roi_p" not in analysis else "the results carry no p-values."))
    p = "permutation" if analysis.attrs.get("significance") == "permutation" else "parametric"
    where = " in every subject" if every_subject else ""
    return (f"Filled bars: the task predicts the ROI{where}; open bars: it does not. Test per task and ROI: Simes' "
            f"combination of the ROI's voxel {p} p-values (null: no voxel of the ROI is predicted; valid "
            "under the positive dependence between neighbouring voxels that BH over voxels already assumes, "
            "where counting voxels as independent samples would not be), Benjamini-Hochberg over the subject's "
            f"task x ROI cells at q < {analysis.attrs['fdr']:g}.")


def roi_ceiling_caption(analysis: xr.Dataset) -> str:
    if has_roi_noise_ceiling(analysis):
        return ("Dashed line: the ROI's noise ceiling (mean over its voxels of the correlation ceiling "
                "estimated from the repeated images).")
    return "No noise ceiling: the results carry none (no repeated images, or imported results)."


# --------------------------------------------------------------------------- sections


def roi_figures(page: ReportPage, analysis: xr.Dataset) -> None:
    """Figure 1 (ROI bars): the subject mean (``fig1_roi_bars``) and each subject
    (``fig1_roi_bars_<subject>``); with a noise ceiling also the noise-normalised bars
    (``fig1_roi_noise_normalized``, ``fig1_roi_noise_normalized_<subject>``)."""
    if not analysis.sizes.get("roi", 0):
        page.notes.append("Figure 1 is not drawn: the results carry no ROI labels.")
        return
    subjects = [str(s) for s in analysis["subject"].values]
    test, ceiling = roi_test_caption(analysis), roi_ceiling_caption(analysis)
    source = roi_source_caption(analysis)
    mean = len(subjects) > 1
    page.add("fig1_roi_bars", "Figure 1. Prediction per ROI and task" + (" (subject mean)" if mean else ""),
             f"Mean test-set r of each task in each ROI, from {source}; tasks grouped and coloured by their "
             "Taskonomy cluster. "
             + (f"Bars: the mean over the {len(subjects)} subjects of each subject's ROI mean (error bars: SEM over "
                "subjects). " if mean else "Error bars: SEM over the ROI's voxels. ")
             + f"{roi_test_caption(analysis, mean)} {ceiling}", figure_roi_bars(analysis), svg=True, section="fig1")
    if mean:
        for s in subjects:
            page.add(f"fig1_roi_bars_{s}", f"Figure 1 ({s})", f"As Figure 1, subject {s} (error bars: SEM over the "
                     f"ROI's voxels). {test}", figure_roi_bars(analysis, s), svg=True, section="fig1")
    if not has_roi_noise_ceiling(analysis):
        page.notes.append("Noise-normalised ROI bars are not drawn: " + ceiling[len("No noise ceiling: "):])
        return
    normalised = ("Median over the ROI's voxels of test r / noise ceiling (each voxel's r divided by its "
                  "correlation ceiling; voxels with a ceiling <= 0 left out, the run summary's convention); "
                  "1 (dashed) is the ceiling. Values can exceed 1: a finite test set's r scatters around the "
                  "population ceiling.")
    page.add("fig1_roi_noise_normalized", "Figure 1b. Noise-normalised prediction per ROI and task"
             + (" (subject mean)" if mean else ""), normalised
             + (" Bars: mean over subjects (error bars: SEM over subjects)." if mean else "")
             + f" {roi_test_caption(analysis, mean)}",
             figure_roi_bars(analysis, normalized=True), svg=True, section="fig1")
    if mean:
        for s in subjects:
            page.add(f"fig1_roi_noise_normalized_{s}", f"Figure 1b ({s})", f"As Figure 1b, subject {s}. {normalised}",
                     figure_roi_bars(analysis, s, normalized=True), svg=True, section="fig1")


def structure_figures(page: ReportPage, analysis: xr.Dataset, graph_neighbours: int) -> None:
    """Figures 5-7: the task similarity matrix, the trees (a tanglegram) and the graphs."""
    zero = sorted(zero_significant_tasks(analysis))
    page.add("fig5_similarity", "Figure 5. Task similarity", "Brain-derived task similarity "
             f"({analysis.attrs['metric']} of the FDR-masked r), subject mean, tasks in the leaf order of its "
             f"{analysis.attrs['linkage']}-linkage tree; labels coloured by Taskonomy cluster."
             + (f" Grey italic: {', '.join(zero)}, without a significant voxel in any subject (a row of 0)."
                if zero else ""), figure_similarity(analysis), svg=True, section="fig5")
    if analysis.sizes["subject"] > 1:
        page.add("fig5_similarity_subjects", "Figure 5 (per subject)", "Each subject's similarity matrix in the "
                 "order of the subject-mean tree.", figure_similarity_subjects(analysis), svg=True, section="fig5")
    zero_note = ""
    if zero:
        one = len(zero) == 1
        zero_note = (f" {', '.join(zero)} {'has' if one else 'have'} no significant voxel in any subject: a "
                     f"similarity row of 0, so {'it joins' if one else 'they join'} the brain's tree at its root "
                     "height for that reason alone (grey italic label, dashed link).")
    page.add("fig6_trees", "Figure 6. Task trees", "Tanglegram: left, the brain's task tree (subject-mean "
             f"similarity, {analysis.attrs['linkage']} linkage); right, Taskonomy's tree from its transfer-out "
             "affinities, same linkage. Lines join each task's two leaves, coloured by the task's cluster in "
             "Taskonomy's task tree; both trees are rotated (children swapped, clusters and heights unchanged) "
             "to reduce crossing lines, whose number is shown." + zero_note,
             figure_trees(analysis), svg=True, section="fig6")
    page.add("fig7_graphs", "Figure 7. Task graphs", f"Each task joined to its {graph_neighbours} most "
             "similar tasks (edge width ~ similarity); left brain (subject mean), right Taskonomy. One layout for "
             "both (Kamada-Kawai on the two graphs' mean path lengths), so a task sits at the same place in both "
             "panels; nodes coloured by Taskonomy cluster."
             + (f" Open dashed nodes: {', '.join(zero)} (no significant voxel in any subject)." if zero else ""),
             figure_graphs(analysis, graph_neighbours), svg=True, section="fig7")


def diagnostic_figures(page: ReportPage, results: Mapping[str, xr.Dataset], threshold: float,
                       n_features: Mapping[str, int] | None = None, analysis: xr.Dataset | None = None
                       ) -> list[str]:
    """The alpha diagnostic (``diagnostics_alpha``, section "diagnostics"). -> the warnings
    for the report's summary (``diagnostics.alpha_warnings``: more than ``threshold`` of a
    task's voxels at an end of the alpha grid); [] with a page note when the results carry
    no chosen alphas (imported) or the grid cannot be rebuilt.

    ``n_features``: task -> feature count (``diagnostics.feature_counts(store, tasks)``), needed
    for the paper's grid (``fit.alphas: paper``); ``analysis``: to order tasks by cluster.
    """
    try:
        summary = diagnostics.alpha_summary(results, n_features)
    except diagnostics.GridUnknown as e:
        page.notes.append(f"Alpha diagnostic not drawn: {e}, which the report was not given.")
        return []
    if summary is None:
        page.notes.append(diagnostics.NO_ALPHA_NOTE)
        return []
    order = None
    if analysis is not None and [str(t) for t in analysis["task"].values] == [str(t) for t in summary["task"].values]:
        order = cluster_order(task_clusters(analysis))
    warnings = diagnostics.alpha_warnings(summary, threshold)
    page.add("diagnostics_alpha", "Diagnostic: chosen ridge penalties",
             "Per subject and task, the share of voxels whose cross-validated alpha is each value of the fit's grid "
             "(colour, square-root scale); the grid's two ends outlined in red, and beside each row the share at "
             f"the lowest (left) and highest (right) value, in red above {100 * threshold:.0f}% "
             "(report.alpha_edge_warning). Voxels without signal rightly take the largest alpha; significant voxels "
             "at an end mean the grid is too narrow (widen fit.alphas).",
             diagnostics.figure_alpha_diagnostic(summary, threshold, order), svg=True, section="diagnostics")
    return warnings
