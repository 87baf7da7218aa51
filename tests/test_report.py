"""The report: figures, NIfTI maps and the HTML page, opened in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

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
from neurotask.pipeline.report.figures import montage, slice_indices
from neurotask.pipeline.stages.report import chosen_task
from neurotask.pipeline.stats.taskonomy import transfer_out_affinities
from neurotask.pipeline.tasks import task_info, task_names
from neurotask.storage import StudyStore

CHROMIUM = Path("/usr/bin/chromium")

# Appended to a copy of the page: once everything has loaded, record for every <img> whether
# it decoded (complete, with a natural size) and the page's size, in an element --dump-dom shows.
_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images).map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,
                                                      w: i.naturalWidth, h: i.naturalHeight}));
  const out = document.createElement('pre');
  out.id = 'neurotask-check';
  out.textContent = JSON.stringify({images: imgs, height: document.body.scrollHeight,
                                    title: document.title});
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's chromium, installed by scripts/ensure_chromium when missing."""
    if not CHROMIUM.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "ensure_chromium")], check=False, timeout=900)
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing and scripts/ensure_chromium could not install it")
    return CHROMIUM


def open_in_chromium(chromium: Path, page: Path, profile: Path) -> dict:
    """Load ``page`` in headless Chromium; -> what the check script found after the load event."""
    cmd = [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
           "--dump-dom", page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="neurotask-check">(.*?)</pre>', done.stdout, re.S)
    assert m, f"chromium did not render the page (exit {done.returncode}):\n{done.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"'))


@pytest.mark.slow
def test_run_ends_with_the_report(analysis_study):
    index = analysis_study.workdir / "report" / "index.html"
    assert index.is_file()
    assert analysis_study.output.rstrip().splitlines()[-1].endswith(f"report: {index}")


@pytest.mark.slow
def test_report_renders_in_chromium_with_every_image_loaded(analysis_study, chromium, tmp_path):
    # self-contained: the folder copied elsewhere works (the page itself needs nothing beside it)
    copy = tmp_path / "copied_report"
    shutil.copytree(analysis_study.workdir / "report", copy)
    page = copy / "index.html"
    text = page.read_text()
    assert re.findall(r"<img [^>]*src='(?!data:image/png;base64,)", text) == []
    page.write_text(text.replace("</body>", _CHECK + "</body>"))
    found = open_in_chromium(chromium, page, tmp_path / "profile")
    images = found["images"]
    # Figure 1; per subject Figure 2 (slices, projections), 3 (two contrasts), 4 (noise ceiling);
    # 5, 5 per subject, 6, 7
    assert len(images) == 1 + 2 * (2 + 2 + 1) + 4, images
    assert all(i["ok"] for i in images), [i for i in images if not i["ok"]]
    assert all(i["w"] > 300 and i["h"] > 200 for i in images)
    assert found["height"] > 3000 and "neurotask report" in found["title"]


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
