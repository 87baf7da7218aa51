"""The report: figures, NIfTI maps, statistics and the HTML page's content and structure
(the page opened in headless Chromium: tests/test_report_browser.py)."""

from __future__ import annotations

import io
import json
import re
from markupsafe import escape as html_escape

import nibabel as nib
import numpy as np
import xarray as xr
import pytest
from PIL import Image
from scipy import stats as sps
from scipy.cluster import hierarchy
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics.pairwise import cosine_similarity as sk_cosine
from statsmodels.stats.multitest import multipletests

from analysis_fixtures import ROOT, analysis_study  # noqa: F401
from neurotask.pipeline import cli
from neurotask.pipeline.stats.task_structure import significance_mask
from neurotask.pipeline.stages.analyse import read_analysis
from neurotask.pipeline.config import load_config
from neurotask.pipeline.report.claims import is_published_import, paper_claims, upstream
from neurotask.pipeline.report.figures import montage, slice_indices
from neurotask.pipeline.report.page import PageFigure, ReportPage, embedded_image, page_sections, render_page
from neurotask.pipeline.stages.report import chosen_task
from neurotask.pipeline.stats.taskonomy import transfer_out_affinities
from neurotask.pipeline.tasks import task_info, task_names
from neurotask.storage import StudyStore

@pytest.mark.slow
def test_run_ends_with_the_report(analysis_study):
    index = analysis_study.workdir / "report" / "index.html"
    assert index.is_file()
    assert analysis_study.output.rstrip().splitlines()[-1].endswith(f"report: {index}")


def _upper(m: np.ndarray) -> np.ndarray:
    return m[np.triu_indices(m.shape[0], k=1)]


@pytest.mark.slow
def test_statistics_agree_with_an_independent_computation_from_the_results(analysis_study):
    """statistics.json against the stored per-voxel results, recomputed here with
    statsmodels, scikit-learn and scipy rather than the analysis code."""
    cfg = load_config(analysis_study.config)
    got = json.loads((analysis_study.workdir / "report" / "statistics.json").read_text())
    settings = got["settings"]
    assert (settings["significance"], settings["fdr"], settings["metric"], settings["linkage"],
            settings["n_clusters"], settings["taskonomy_affinities"]) == ("parametric", 0.05, "cosine", "average", 5, "16k")
    store = StudyStore(cfg.store_path)
    tasks = task_names()
    subjects = ["CSI1", "CSI2"]
    similarity = {}
    for s in subjects:
        res = store.results(s).sel(task=tasks)
        r = res["r"].transpose("task", "voxel").values.astype(np.float64)
        p = res["pvalue"].transpose("task", "voxel").values
        sig = np.stack([multipletests(row, alpha=0.05, method="fdr_bh")[0] for row in p])
        assert got["n_voxels"][s] == r.shape[1]
        assert got["n_significant"][s] == dict(zip(tasks, sig.sum(axis=1).tolist()))
        assert sum(got["n_significant"][s].values()) > 0
        similarity[s] = sk_cosine(np.where(sig & np.isfinite(r), r, 0.0))
        # Figure 3, whole brain: voxels significant for either task, and those where the 3D task wins
        for name, (three_d, two_d) in {"keypoint": ("keypoint3d", "keypoint2d"), "edge": ("edge3d", "edge2d")}.items():
            a, b = tasks.index(three_d), tasks.index(two_d)
            either = (sig[a] | sig[b]) & np.isfinite(r[a] - r[b])
            assert got["contrasts_whole_brain"][s][name] == [int(((r[a] - r[b])[either] > 0).sum()),
                                                                int(either.sum())]
    assert got["subject_correlation"]["CSI1-CSI2"] == pytest.approx(
        np.corrcoef(_upper(similarity["CSI1"]), _upper(similarity["CSI2"]))[0, 1], abs=1e-9)

    # Taskonomy's similarity from its transfer-out table: z-scored target columns, cosine of the rows
    affinities = transfer_out_affinities("16k").sel(task=tasks).values
    taskonomy = sk_cosine(sps.zscore(affinities, axis=0))
    mean = (similarity["CSI1"] + similarity["CSI2"]) / 2
    comparison = got["taskonomy_comparison"]
    for name, brain in [*similarity.items(), ("mean", mean)]:
        assert comparison[name]["spearman_taskonomy"] == pytest.approx(
            sps.spearmanr(_upper(brain), _upper(taskonomy)).statistic, abs=1e-9)
        lo, hi = comparison[name]["spearman_ci"]
        assert -1 <= lo <= hi <= 1
    # the subject-mean tree (average linkage on 1 - similarity) cut into 5 groups, and its ARI
    # against Taskonomy's clusters
    tree = hierarchy.linkage(np.clip(1 - _upper(mean), 0, None), "average")
    groups = hierarchy.cut_tree(tree, n_clusters=5).ravel()
    assert adjusted_rand_score(groups, [got["clusters_mean_tree"][t] for t in tasks]) == 1.0
    assert comparison["mean"]["ari_taskonomy"] == pytest.approx(
        adjusted_rand_score([task_info(t).cluster for t in tasks], groups), abs=1e-12)


@pytest.mark.slow
def test_report_page_holds_the_statistics_and_provenance(analysis_study):
    cfg = load_config(analysis_study.config)
    report = analysis_study.workdir / "report"
    text = (report / "index.html").read_text()
    stats = json.loads((report / "statistics.json").read_text())
    mean = stats["taskonomy_comparison"]["mean"]
    assert f"{mean['spearman_taskonomy']:.3f}" in text and f"{mean['mantel_p']:.3f}" in text
    counts = "".join(f"<td>{stats['n_significant'][s]['edge3d']}</td>" for s in ("CSI1", "CSI2"))
    assert re.search(f"<tr><td>{re.escape(task_info('edge3d').label)}</td>.*?{counts}</tr>", text)
    # per ROI and task: both significance criteria and the median noise-normalised r
    from neurotask.pipeline.stages.summary import roi_table
    tables = [roi_table(StudyStore(cfg.store_path).results(s)) for s in cfg.study.subjects]
    cell = xr.concat(tables, dim="subject", join="inner").mean("subject").sel(task="edge2d", roi="LHEarlyVis")
    assert "by the permutation p" in text and "noise ceiling" in text
    assert (f"<td>{100 * float(cell['fraction_significant']):.0f}% / "
            f"{100 * float(cell['fraction_significant_perm']):.0f}%; "
            f"{float(cell['median_noise_normalized_r']):.2f}</td>") in text
    # provenance: config text, versions, dates, under named columns
    assert "n_clusters: 5" in text and "Package versions" in text
    assert "<th>item</th><th>value</th>" in text and "<th></th>" not in text
    assert f"<td>numpy</td><td>{np.__version__}</td>" in text
    assert re.search(r"Created \d{4}-\d{2}-\d{2} \d{2}:\d{2}", text)
    for fig in ("fig1_roi_bars", "fig5_similarity", "fig6_trees", "fig7_graphs"):
        assert f"id='{fig}'" in text
        png = Image.open(report / "figures" / f"{fig}.png")
        assert len(np.unique(np.asarray(png.convert("L")))) > 10  # drawn, not blank
    for svg in ("fig5_similarity", "fig6_trees", "fig7_graphs"):
        assert (report / "figures" / f"{svg}.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.slow
def test_nifti_maps_put_every_voxel_back_in_its_place(analysis_study):
    cfg = load_config(analysis_study.config)
    a = read_analysis(cfg)
    store = StudyStore(cfg.store_path)
    task = chosen_task(a, cfg.report.task)
    assert task == task_names()[int(np.argmax(a["n_significant"].sum("subject").values))]
    for subject in ("CSI1", "CSI2"):
        res = store.results(subject)
        ijk = np.stack([res[c].values for c in ("voxel_i", "voxel_j", "voxel_k")], axis=1)
        d = analysis_study.workdir / "report" / "nifti" / subject
        img = nib.load(d / "r_keypoint3d.nii.gz")
        assert img.shape == tuple(res.attrs["volume_shape"])
        np.testing.assert_array_equal(img.affine, np.asarray(res.attrs["affine"]))
        vol = np.asarray(img.dataobj)
        r = res["r"].sel(task="keypoint3d").values
        np.testing.assert_array_equal(vol[ijk[:, 0], ijk[:, 1], ijk[:, 2]], r)
        outside = np.ones(vol.shape, bool)
        outside[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = False
        assert np.isnan(vol[outside]).all()
        # the significance masks of all tasks, in the order of tasks.txt
        order = (d / "tasks.txt").read_text().split()
        sig = np.asarray(nib.load(d / "significant.nii.gz").dataobj)
        expected = significance_mask(res.sel(task=order), "parametric", 0.05)
        np.testing.assert_array_equal(sig[ijk[:, 0], ijk[:, 1], ijk[:, 2]].T, expected)
        # Figure 3's map: r(3D) - r(2D) where either is significant, NaN elsewhere
        contrast = np.asarray(nib.load(d / "fig3_contrast_keypoint.nii.gz").dataobj)[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
        k3, k2 = order.index("keypoint3d"), order.index("keypoint2d")
        either = expected[k3] | expected[k2]
        diff = res["r"].sel(task="keypoint3d").values - res["r"].sel(task="keypoint2d").values
        np.testing.assert_allclose(contrast[either], diff[either], rtol=1e-6)
        assert np.isnan(contrast[~either]).all()
        assert (d / f"fig2_r_significant_{task}.nii.gz").is_file()


def test_report_without_analysis_is_a_clear_error(tmp_path, capsys):
    from analysis_fixtures import analysis_config_dict, write_config

    path = write_config(tmp_path / "study.yaml", analysis_config_dict(tmp_path / "work"))
    assert cli.main(["report", "--config", str(path)]) == 2
    assert "run `neurotask analyse` first" in capsys.readouterr().err


def test_montage_and_slice_choice():
    vol = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)  # (i, j, k)
    m = montage(vol, [1, 3], cols=2)
    assert m.shape == (3, 4)
    # tile 0 is slice k=1 with j upwards: the top row is j = 2
    np.testing.assert_array_equal(m[:, :2], vol[:, :, 1].T[::-1])
    np.testing.assert_array_equal(m[:, 2:], vol[:, :, 3].T[::-1])
    three = montage(vol, [0, 1, 2], cols=2)
    assert three.shape == (6, 4) and np.isnan(three[3:, 2:]).all()
    bg = np.zeros((2, 3, 10), bool)
    bg[:, :, 2:8] = True
    np.testing.assert_array_equal(slice_indices(bg, 20), np.arange(2, 8))
    np.testing.assert_array_equal(slice_indices(bg, 3), [2, 4, 7])


# --------------------------------------------------------------------------- the page


def _figure(key: str, section: str) -> PageFigure:
    return PageFigure(key, key, "", b"", [f"figures/{key}.png"], section)


def test_page_sections_in_paper_order_with_subjects_side_by_side():
    figs = [_figure(k, s) for k, s in [("fig5_similarity", "fig5"), ("fig2_r_edge3d_CSI2", "fig2"),
                                       ("fig2_r_edge3d_CSI1", "fig2"), ("fig3_keypoint_CSI1", "fig3"),
                                       ("fig3_edge_CSI1", "fig3"), ("fig3_keypoint_CSI2", "fig3"),
                                       ("fig3_edge_CSI2", "fig3"), ("alphas", "diagnostics"), ("extra", ""),
                                       ("fig1_roi_bars", "fig1"), ("views", "interactive")]]
    sections = page_sections(figs, ["CSI1", "CSI2"], always=["fig4"])
    assert [s.id for s in sections] == ["fig1", "fig2", "fig3", "fig4", "fig5", "diagnostics",
                                         "interactive", "other"]
    by_id = {s.id: s for s in sections}
    assert by_id["fig4"].figures == [] and by_id["fig4"].title.startswith("Figure 4")
    # one row per kind of figure, its subjects side by side in subject order
    assert [[f.key for f in row] for row in by_id["fig2"].rows] == [["fig2_r_edge3d_CSI1", "fig2_r_edge3d_CSI2"]]
    assert [[f.key for f in row] for row in by_id["fig3"].rows] == [
        ["fig3_keypoint_CSI1", "fig3_keypoint_CSI2"], ["fig3_edge_CSI1", "fig3_edge_CSI2"]]
    assert by_id["other"].title == "Other figures" and by_id["interactive"].title == "interactive"


def test_embedded_image_is_the_same_pixels_and_smaller():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6))
    ax = fig.add_subplot()
    x = np.linspace(0, 10, 400)
    for i in range(12):  # anti-aliased lines and text, as the report's figures
        ax.plot(x, np.sin(x + i / 3) * (1 + i / 10), lw=1.5, label=f"task {i}")
    ax.legend(ncols=4)
    ax.set_title("a title")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=200)
    png = buf.getvalue()
    mime, data = embedded_image(png)
    assert mime == "image/webp" and len(data) < len(png) / 2
    with Image.open(io.BytesIO(data)) as webp, Image.open(io.BytesIO(png)) as original:
        assert webp.size == original.size == (2400, 1200)
        np.testing.assert_array_equal(np.asarray(webp.convert("RGBA")), np.asarray(original.convert("RGBA")))
    f = PageFigure("k", "t", "c", png, [])
    assert f.data_uri().startswith("data:image/webp;base64,UklGR")  # RIFF


def test_a_figure_key_is_used_once(tmp_path):
    from matplotlib.figure import Figure

    page = ReportPage(tmp_path, dpi=50)
    page.add("fig5_similarity", "t", "c", Figure(figsize=(2, 2)), svg=True, section="fig5")
    assert page.figures[0].files == ["figures/fig5_similarity.png", "figures/fig5_similarity.svg"]
    with pytest.raises(ValueError, match="added twice"):
        page.add("fig5_similarity", "t", "c", Figure(figsize=(2, 2)))


# --------------------------------------------------------------------------- the paper's claims


def _claims_inputs(curvature=(0, 3), whole=((90, 100), (80, 100)), scene=((95, 100), (90, 100)),
                   early=((70, 100), (60, 100)), spearman=0.26, mantel=0.003):
    subjects = ["CSI1", "CSI2"]
    tasks = ["curvature", "keypoint3d", "keypoint2d"]
    a = xr.Dataset(
        {"contrast_n_3d_wins": (("subject", "contrast", "roi_group"),
                                [[[scene[i][0], early[i][0]]] for i in range(2)]),
         "contrast_n_voxels": (("subject", "contrast", "roi_group"), [[[scene[i][1], early[i][1]]] for i in range(2)]),
         "roi_mean_r": (("roi",), [0.1])},
        coords={"subject": subjects, "task": tasks, "label": ("task", ["Curvature", "3D Keypoint", "2D Keypoint"]),
                "contrast": ["keypoint"], "roi_group": ["scene", "early_visual"], "roi": ["LHOPA"]})
    stats = {"n_significant": {s: {"curvature": curvature[i], "keypoint3d": 500, "keypoint2d": 40}
                               for i, s in enumerate(subjects)},
             "contrasts_whole_brain": {s: {"keypoint": list(whole[i])} for i, s in enumerate(subjects)},
             "taskonomy_comparison": {"mean": {"spearman_taskonomy": spearman, "spearman_ci": [0.2, 0.3],
                                               "mantel_p": mantel}}}
    return a, stats


def test_paper_claims_agree_and_disagree_with_the_numbers():
    claims = paper_claims(*_claims_inputs())
    assert [c.agrees for c in claims] == [True, True, True, True, True]
    assert claims[0].reproduced == "CSI1 0, CSI2 3"
    assert "keypoint: CSI1 90/100 (90%), CSI2 80/100 (80%)" == claims[2].reproduced
    assert "CSI1 95% vs 70%" in claims[3].reproduced and "0.260" in claims[4].reproduced
    # each claim turns to "no" when its numbers go against the paper
    assert not paper_claims(*_claims_inputs(curvature=(0, 10)))[0].agrees
    assert not paper_claims(*_claims_inputs(whole=((90, 100), (50, 100))))[2].agrees
    assert not paper_claims(*_claims_inputs(early=((70, 100), (95, 100))))[3].agrees
    assert not paper_claims(*_claims_inputs(mantel=0.2))[4].agrees
    assert not paper_claims(*_claims_inputs(spearman=-0.1))[4].agrees
    a, stats = _claims_inputs()
    stats["n_significant"]["CSI2"]["keypoint2d"] = 0
    stats["n_significant"]["CSI1"]["keypoint2d"] = 9
    other = paper_claims(a, stats)[1]
    assert not other.agrees and "2D Keypoint in CSI2 (0)" in other.reproduced


def test_the_claims_are_shown_only_for_published_results():
    def ds(**attrs):
        return xr.Dataset(attrs=attrs)

    npz = ds(imported=True, source="published (npz) /x/CSI1.npz")
    layout = ds(imported=True, source="authors' layout /x/subj1")
    assert is_published_import({"CSI1": npz, "CSI2": layout})
    assert not is_published_import({"CSI1": npz, "CSI2": ds(source="published but fitted")})
    assert not is_published_import({"CSI1": ds(imported=True, source="test")})
    assert not is_published_import({"CSI1": ds()}) and not is_published_import({})
    assert upstream({"CSI1": ds(source_repository="github.com/a/b", source_commit="abc"),
                     "CSI2": ds(source_repository="github.com/a/b", source_commit="abc")}) == [
        ("upstream repository", "github.com/a/b"), ("upstream commit", "abc")]


@pytest.mark.slow
def test_page_shows_warnings_escaped_and_no_claims_for_a_fitted_study(analysis_study):
    from neurotask.pipeline.stages.report import comparison_statistics

    cfg = load_config(analysis_study.config)
    a = read_analysis(cfg)
    stats = comparison_statistics(a)
    html = render_page(a, stats, [], [], [], {"study": "x"}, chosen_task(a, None),
                       warnings=["43% of voxels chose the largest alpha <b>"])
    summary = html[html.index("<section id='summary'>"):html.index("<section id='comparison'>")]
    assert "role='alert'" in summary and "largest alpha &lt;b&gt;" in summary
    assert "id='claims'" not in html and "Paper vs reproduction" not in html
    text = (analysis_study.workdir / "report" / "index.html").read_text()
    assert "id='claims'" not in text
    # the stage's summary warnings are the alpha diagnostic's, every one shown (escaped), no other
    from neurotask.pipeline.report import diagnostics

    store = StudyStore(cfg.store_path)
    tasks = [str(t) for t in a["task"].values]
    results = {str(s_): store.results(str(s_)) for s_ in a["subject"].values}
    expected = diagnostics.alpha_warnings(diagnostics.alpha_summary(results, diagnostics.feature_counts(store, tasks)),
                                          cfg.report.alpha_edge_warning)
    assert ("role='alert'" in text) == bool(expected)
    assert not expected or f"<b>Warnings ({len(expected)})</b>" in text
    for w in expected:
        assert str(html_escape(w)) in text  # as jinja2 autoescapes it
    # the NIfTI files are links, the r maps under their task labels
    assert "<a href='nifti/CSI1/significant.nii.gz'>" in text
    assert f"<a href='nifti/CSI2/r_edge3d.nii.gz'>{task_info('edge3d').label}</a>" in text


def test_format_number_cells():
    from neurotask.pipeline.report.page import format_number

    cells = [None, float("nan"), float("inf"), np.float32(0.12345), 0.5, 3, np.int64(4), 0.0001234, -0.0526, "CSI1"]
    assert [format_number(x) for x in cells] == ["n/a", "n/a", "n/a", "0.123", "0.500", "3", "4", "0.000123",
                                                 "-0.053", "CSI1"]
