"""The report's figure sections that are drawn from the analysis: Figure 1 (per ROI) and
Figures 5-7 (task similarity, trees, graphs). The brain maps (Figures 2-3) are in
:mod:`neurotask.pipeline.report.volumes`; the drawing itself in :mod:`.figures`.
"""

from __future__ import annotations

import xarray as xr

from neurotask.pipeline.report.figures import (
    figure_graphs,
    figure_roi_bars,
    figure_similarity,
    figure_similarity_subjects,
    figure_trees,
)
from neurotask.pipeline.report.page import ReportPage


def roi_figures(page: ReportPage, analysis: xr.Dataset) -> None:
    """Figure 1 (ROI bars)."""
    if analysis.sizes.get("roi", 0):
        source = ("the separate ROI-only models" if analysis.attrs.get("roi_source") == "roi_results"
                  else "the whole-brain models' voxels in each ROI")
        page.add("fig1_roi_bars", "Figure 1. Prediction per ROI and task",
                 f"Mean test-set r (error bars: SEM over voxels) of each task in each ROI, from {source}; "
                 "bars coloured by the task's Taskonomy cluster.", figure_roi_bars(analysis), section="fig1")
    else:
        page.notes.append("Figure 1 is not drawn: the results carry no ROI labels.")



def structure_figures(page: ReportPage, analysis: xr.Dataset, graph_neighbours: int) -> None:
    """Figures 5-7: the task similarity matrix, the trees and the graphs."""
    page.add("fig5_similarity", "Figure 5. Task similarity", "Brain-derived task similarity "
             f"({analysis.attrs['metric']} of the FDR-masked r), subject mean, tasks in the leaf order of its "
             f"{analysis.attrs['linkage']}-linkage tree; labels coloured by Taskonomy cluster.",
             figure_similarity(analysis), svg=True, section="fig5")
    if analysis.sizes["subject"] > 1:
        page.add("fig5_similarity_subjects", "Figure 5 (per subject)", "Each subject's similarity matrix in the "
                 "order of the subject-mean tree.", figure_similarity_subjects(analysis), section="fig5")
    page.add("fig6_trees", "Figure 6. Task trees", "Left: the brain's task tree (subject-mean similarity). Right: "
             "Taskonomy's tree from its transfer-out affinities, same linkage. Leaves coloured by the task's "
             "cluster in Taskonomy's task tree.", figure_trees(analysis), svg=True, section="fig6")
    page.add("fig7_graphs", "Figure 7. Task graphs", f"Each task joined to its {graph_neighbours} most "
             "similar tasks (edge width ~ similarity), spring layout; left brain, right Taskonomy.",
             figure_graphs(analysis, graph_neighbours), svg=True, section="fig7")
