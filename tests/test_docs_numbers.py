"""The numbers the docs quote are the numbers the report shows.

The tables of docs/published_reproduction.md (the authors' published results) and of
docs/analysis_and_report.md (the demo study) are parsed and every number in them compared
with the report's statistics.json (and, for the few numbers the page shows from the stored
analysis, with that analysis), after building the report through the CLI as a user would. A
table or row the test does not know fails the test too, so a number added to the docs gets a
check or is noticed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from analysis_fixtures import ROOT, reference_path
from neurotask.pipeline import cli
from neurotask.pipeline.config import load_config
from neurotask.pipeline.report.page import format_number
from neurotask.pipeline.stages.analyse import read_analysis
from neurotask.pipeline.stats.task_structure import analyse
from neurotask.storage import StudyStore

DOCS = ROOT / "docs"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


def markdown_tables(text: str) -> list[Table]:
    """Every pipe table of a markdown text: header cells and body rows (separator row dropped),
    cells stripped of ``**`` and backticks."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2 and re.fullmatch(r"\|?(\s*:?-{3,}:?\s*\|)+\s*:?-*:?\s*", block[1].strip()):
            cells = [[c.strip().replace("**", "").replace("`", "") for c in row.strip().strip("|").split("|")]
                     for row in block]
            tables.append(Table(cells[0], cells[2:]))
        block = []
    return tables


def numbers(cell: str) -> list[float]:
    """The numbers of a cell, in order: ``"742 / 746 (99 %)"`` -> [742, 746, 99]."""
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", cell)]


def r3(x: float) -> float:
    """The number as the report's page prints it (3 decimals, 3 significant digits below 1e-3)."""
    return float(format_number(float(x)))


class Mismatches(list):
    def check(self, where: str, quoted: list[float], actual: list[float]) -> None:
        if len(quoted) != len(actual) or any(abs(q - a) > 1e-9 for q, a in zip(quoted, actual)):
            self.append(f"{where}: docs {quoted}, report {actual}")


def _pct(w: int, n: int) -> float:
    return float(round(100 * w / n))


def published_mismatches(text: str, stats: dict, analysis) -> list[str]:
    """Every number of docs/published_reproduction.md's tables against the report."""
    subjects = list(stats["n_voxels"])
    labels = {str(t): str(x) for t, x in zip(analysis["task"].values, analysis["label"].values)}
    out = Mismatches()
    for table in markdown_tables(text):
        h = table.header
        if h[:3] == ["task", "label", "Taskonomy cluster"]:
            assert h[3:] == subjects, h
            for row in table.rows:
                if row[0] == "cortical voxels":
                    out.check("cortical voxels", numbers(" ".join(row[3:])), [stats["n_voxels"][s] for s in subjects])
                    continue
                task = row[0]
                if task not in labels:
                    out.append(f"unknown task {task!r}")
                    continue
                if row[1] != labels[task] or row[2] != str(analysis["taskonomy_cluster"].sel(task=task).values):
                    out.append(f"{task}: label/cluster {row[1:3]}")
                out.check(f"significant voxels {task}", numbers(" ".join(row[3:])),
                          [stats["n_significant"][s][task] for s in subjects])
        elif h[1:] == [f"{x}-{y}" for i, x in enumerate(subjects) for y in subjects[i + 1:]]:
            for row in table.rows:
                pairs = h[1:]
                if row[0].startswith("upper triangles"):
                    actual = [r3(stats["subject_correlation"][p]) for p in pairs]
                elif row[0].startswith("whole 21x21"):  # the authors' cross_subject_corrs: whole matrices
                    sim = analysis["similarity"]
                    actual = [r3(np.corrcoef(sim.sel(subject=p.split("-")[0]).values.ravel(),
                                             sim.sel(subject=p.split("-")[1]).values.ravel())[0, 1]) for p in pairs]
                else:
                    out.append(f"unknown subject-correlation row {row[0]!r}")
                    continue
                out.check(row[0], [x for c in row[1:] for x in numbers(c)], actual)
        elif h[:2] == ["subject", "pair"]:  # Figure 3 by ROI group
            assert h[2:] == ["scene ROIs (OPA, PPA, RSC)", "early visual"], h
            pair_of = {"3D vs 2D Keypoint": "keypoint", "Occlusion vs 2D Edges": "edge"}
            for row in table.rows:
                s, c = row[0], pair_of[row[1]]
                actual = []
                for g in ("scene", "early_visual"):
                    w = int(analysis["contrast_n_3d_wins"].sel(subject=s, contrast=c, roi_group=g))
                    n = int(analysis["contrast_n_voxels"].sel(subject=s, contrast=c, roi_group=g))
                    actual += [w, n, _pct(w, n)]
                out.check(f"Figure 3 {s} {c}", [x for cell in row[2:] for x in numbers(cell)], actual)
        elif h[1:] == ["Spearman r", "Mantel p", "bootstrap 95 % CI"]:
            for row in table.rows:
                key = "mean" if row[0] == "subject mean" else row[0]
                v = stats["taskonomy_comparison"][key]
                out.check(f"Spearman {key}", [x for c in row[1:] for x in numbers(c)],
                          [r3(v["spearman_taskonomy"]), r3(v["mantel_p"]), *map(r3, v["spearman_ci"])])
        elif h[1:] == [*subjects, "subject mean"]:
            field = {"ARI vs Taskonomy clusters": "ari_taskonomy",
                     f"ARI vs Taskonomy's tree cut at {stats['settings']['n_clusters']}": "ari_taskonomy_tree",
                     "cophenetic correlation with Taskonomy's tree": "cophenetic_correlation"}
            for row in table.rows:
                if row[0] not in field:
                    out.append(f"unknown tree row {row[0]!r}")
                    continue
                out.check(row[0], [x for c in row[1:] for x in numbers(c)],
                          [r3(stats["taskonomy_comparison"][k][field[row[0]]]) for k in [*subjects, "mean"]])
        else:
            out.append(f"a table the test does not know: {h}")
    return out


def demo_mismatches(text: str, stats: dict, ari_by_linkage) -> list[str]:
    """Every number of the demo tables of docs/analysis_and_report.md against the report;
    ``ari_by_linkage(linkage, k)``: the subject-mean tree's ARI against Taskonomy's clusters."""
    subjects = list(stats["n_voxels"])
    k = stats["settings"]["n_clusters"]
    cmp = stats["taskonomy_comparison"]
    out = Mismatches()
    section = text[text.index("## Numbers on the demo study"):]
    for table in markdown_tables(section):
        h = table.header
        if h[1:] == [*subjects, "mean"]:
            for row in table.rows:
                quoted = [x for c in row[1:] for x in numbers(c)]
                if row[0] == f"ARI, tree cut at {k} vs the planted clusters":
                    actual = [r3(cmp[s]["ari_taskonomy"]) for s in [*subjects, "mean"]]
                elif row[0] == f"ARI vs Taskonomy's own tree cut at {k}":
                    actual = [r3(cmp[s]["ari_taskonomy_tree"]) for s in [*subjects, "mean"]]
                elif row[0] == "Spearman r with Taskonomy similarity":
                    actual = [r3(cmp[s]["spearman_taskonomy"]) for s in [*subjects, "mean"]] + [r3(cmp["mean"]["mantel_p"])]
                else:
                    out.append(f"unknown demo row {row[0]!r}")
                    continue
                out.check(row[0], quoted, actual)
        elif h[0] == "k":
            for row in table.rows:
                kk = int(row[0])
                out.check(f"ARI k={kk}", [x for c in row[1:] for x in numbers(c)],
                          [r3(ari_by_linkage(link, kk)) for link in h[1:]])
        else:
            out.append(f"a table the test does not know: {h}")
    return out


# --------------------------------------------------------------------------- the parser


def test_markdown_tables_and_a_mismatch_is_reported():
    text = "x\n\n| | CSI1 | CSI2 | mean |\n|---|---:|---:|---:|\n| Spearman r with Taskonomy similarity | **0.5** | " \
           "0.25 | 0.4 (Mantel p 0.001) |\n\ntext | not a table\n"
    (table,) = markdown_tables(text)
    assert table.header == ["", "CSI1", "CSI2", "mean"]
    assert table.rows == [["Spearman r with Taskonomy similarity", "0.5", "0.25", "0.4 (Mantel p 0.001)"]]
    assert numbers("742 / 746 (99 %)") == [742, 746, 99] and numbers("[-0.053, 0.2]") == [-0.053, 0.2]
    stats = {"n_voxels": {"CSI1": 1, "CSI2": 1}, "settings": {"n_clusters": 5},
             "taskonomy_comparison": {s: {"spearman_taskonomy": r, "mantel_p": 0.001, "ari_taskonomy": 1.0,
                                          "ari_taskonomy_tree": 1.0} for s, r in
                                      (("CSI1", 0.5), ("CSI2", 0.25), ("mean", 0.4))}}
    section = "## Numbers on the demo study\n" + text
    assert demo_mismatches(section, stats, lambda link, k: 1.0) == []
    stats["taskonomy_comparison"]["CSI2"]["spearman_taskonomy"] = 0.2504  # printed 0.250: still equal
    assert demo_mismatches(section, stats, lambda link, k: 1.0) == []
    stats["taskonomy_comparison"]["CSI2"]["spearman_taskonomy"] = 0.26
    (m,) = demo_mismatches(section, stats, lambda link, k: 1.0)
    assert "Spearman r" in m and "0.26" in m
    assert demo_mismatches(section.replace("Spearman r with", "Pearson r with"), stats, lambda link, k: 1.0) == [
        "unknown demo row 'Pearson r with Taskonomy similarity'"]


# --------------------------------------------------------------------------- the studies


def _config_copy(source: Path, dest: Path, workdir: Path) -> Path:
    """A copy of the config ``source`` at ``dest``, writing under ``workdir``."""
    cfg = yaml.safe_load(source.read_text())
    cfg["study"]["workdir"] = str(workdir)
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


@pytest.mark.slow
def test_published_reproduction_doc_quotes_the_report(tmp_path):
    config = _config_copy(ROOT / "configs" / "published.yaml", tmp_path / "published.yaml", tmp_path / "work")
    assert cli.main(["import-published", str(reference_path() / "published"), "--config", str(config)]) == 0
    assert cli.main(["analyse", "--config", str(config)]) == 0
    assert cli.main(["report", "--config", str(config)]) == 0
    stats = json.loads((tmp_path / "work" / "report" / "statistics.json").read_text())
    analysis = read_analysis(load_config(config))
    text = (DOCS / "published_reproduction.md").read_text()
    assert len(markdown_tables(text)) >= 5
    assert published_mismatches(text, stats, analysis) == []


@pytest.mark.slow
def test_demo_numbers_in_the_docs_are_the_demo_reports(tmp_path):
    """The demo run end to end (about 3 minutes on 2 cores), then its numbers."""
    config = _config_copy(ROOT / "configs" / "demo.yaml", tmp_path / "demo.yaml", tmp_path / "work")
    cfg = yaml.safe_load(config.read_text())
    cfg["cluster"] = {**cfg.get("cluster", {}), "dashboard_address": "127.0.0.1:0"}
    cfg.pop("partition", None)  # its numbers are not in these tables (tests/test_partition_stage.py covers it)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert cli.main(["run", "--config", str(config)]) == 0
    stats = json.loads((tmp_path / "work" / "report" / "statistics.json").read_text())
    loaded = load_config(config)
    store = StudyStore(loaded.store_path)
    results = {s: store.results(s) for s in loaded.study.subjects}

    def ari_by_linkage(linkage: str, k: int) -> float:
        return float(analyse(results, linkage=linkage, n_clusters=k, n_permutations=1, n_bootstrap=1,
                             significance=loaded.analysis.significance, fdr=loaded.analysis.fdr,
                             metric=loaded.analysis.metric).ari_taskonomy_mean)

    assert demo_mismatches((DOCS / "analysis_and_report.md").read_text(), stats, ari_by_linkage) == []
