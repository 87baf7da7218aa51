"""`neurotask import-published`: the authors' results into a study store, then the same
analysis and report as on a fitted study; the paper reproduced on all three subjects."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import xarray as xr

from analysis_fixtures import reference_path, write_config
from tree_support import is_clade
from neurotask.pipeline import cli
from neurotask.pipeline.stats.task_structure import analyse
from neurotask.pipeline.stages.analyse import AnalysisStageError, read_analysis, run_analysis
from neurotask.pipeline.config import load_config
from neurotask.pipeline.stages.import_published import (PublishedImportError, grid_affine, import_published,
                                                        locate_sources, to_store_layout)
from neurotask.pipeline.formats.published import load_reference_npz, load_reference_roi_npz, read_published_roi, read_published_subject
from neurotask.pipeline.tasks import task_info, task_names
from neurotask.storage import StudyStore

PUBLISHED = reference_path() / "published"
PICKLES = PUBLISHED / "original_pickles" / "subj1"
SUBJECTS = ["CSI1", "CSI2", "CSI3"]
GRIDS = {"CSI1": (71, 89, 72), "CSI2": (72, 92, 70), "CSI3": (72, 88, 67)}


def study(tmp_path: Path, subjects: list[str], **analysis) -> Path:
    cfg = {"study": {"name": "published", "workdir": str(tmp_path / "work"), "subjects": subjects},
           "analysis": {"n_bootstrap": 50, "n_permutations": 200, **analysis}}
    return write_config(tmp_path / "study.yaml", cfg)


@pytest.fixture()
def layout_dir(tmp_path) -> tuple[Path, Path]:
    """The authors' layout (outputs/encoding_results/subj1) and a masks folder, as links."""
    results = tmp_path / "encoding_results"
    results.mkdir()
    (results / "subj1").symlink_to(PICKLES, target_is_directory=True)
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "CSI1.npz").symlink_to(PUBLISHED / "CSI1.npz")
    return results, masks


def test_locate_sources_understands_both_layouts_and_names_what_is_missing(layout_dir, tmp_path):
    results, masks = layout_dir
    src = locate_sources(results, ["CSI1"], masks)["CSI1"]
    assert (src.kind, src.path, src.mask) == ("layout", results / "subj1", masks / "CSI1.npz")
    assert locate_sources(PICKLES, ["CSI1"])["CSI1"].kind == "layout"  # the subject folder itself
    npz = locate_sources(PUBLISHED, SUBJECTS)
    assert all(npz[s].kind == "npz" and npz[s].mask == PUBLISHED / f"{s}.npz" for s in SUBJECTS)
    with pytest.raises(PublishedImportError, match=r"CSI2 \(looked for .*subj2/ and .*CSI2.npz\).*Found: subj1"):
        locate_sources(results, ["CSI1", "CSI2"])
    with pytest.raises(PublishedImportError, match="no cortical mask for CSI1"):
        locate_sources(results, ["CSI1"], tmp_path)
    with pytest.raises(PublishedImportError, match="does not exist"):
        locate_sources(tmp_path / "nope", ["CSI1"])


@pytest.mark.slow
def test_import_of_the_authors_layout_then_analysis_and_report(layout_dir, tmp_path, capsys):
    results, masks = layout_dir
    config = study(tmp_path, ["CSI1"], n_clusters=2)
    assert cli.main(["import-published", str(results), "--masks", str(masks), "--config", str(config)]) == 0
    cfg = load_config(config)
    store = StudyStore(cfg.store_path)
    wb = store.results("CSI1")
    raw = read_published_subject(PICKLES)
    assert list(wb["task"].values) == ["curvature", "class_places"]  # the authors' task order
    with np.load(PUBLISHED / "CSI1.npz") as z:
        mask = z["cortical_mask_zyx"]
    for task in ("curvature", "class_places"):
        np.testing.assert_array_equal(wb["r"].sel(task=task).values, raw[task]["r"].astype(np.float32))
        np.testing.assert_array_equal(wb["pvalue"].sel(task=task).values, raw[task]["p"])
        np.testing.assert_array_equal(wb["r2"].sel(task=task).values, raw[task]["r2"].astype(np.float32))
    assert wb.attrs["volume_shape"] == [71, 89, 72] and wb.attrs["imported"]
    assert list(wb["task_label"].values) == [task_info(t).label for t in ("curvature", "class_places")]
    roi = store.read_dataset("roi_results/CSI1")
    assert roi.sizes["task"] == 21 and "depth" not in roi["task"].values  # the extra ROI file is left out
    np.testing.assert_array_equal(roi["r"].sel(task="edge3d").values,
                                  read_published_roi(PICKLES)["edge3d"]["r"].astype(np.float32))
    # importing again finds it; other files for the same subject are refused without --overwrite
    assert cli.main(["import-published", str(results), "--masks", str(masks), "--config", str(config)]) == 0
    assert "already imported, skipped" in capsys.readouterr().out
    assert cli.main(["import-published", str(PUBLISHED), "--config", str(config)]) == 2
    assert "results/CSI1 already exist" in capsys.readouterr().err

    # the same analysis and report as on a fitted study; nothing is fitted
    assert cli.main(["analyse", "--config", str(config)]) == 0
    a = read_analysis(cfg)
    assert a.attrs["roi_source"] == "roi_results"  # Figure 1 from the authors' ROI models
    assert int(a["n_significant"].sel(subject="CSI1", task="curvature")) == 0
    assert int(a["n_significant"].sel(subject="CSI1", task="class_places")) == 1066
    assert not (cfg.workdir / "progress" / "fit").exists()
    assert cli.main(["report", "--config", str(config)]) == 0
    # the whole-brain maps as NIfTI volumes in the subject's grid
    img = nib.load(cfg.workdir / "report" / "nifti" / "CSI1" / "r_class_places.nii.gz")
    assert img.shape == GRIDS["CSI1"]
    np.testing.assert_array_equal(img.affine, grid_affine(GRIDS["CSI1"]))
    vol_zyx = np.asarray(img.dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(vol_zyx[mask], raw["class_places"]["r"].astype(np.float32))
    assert np.isnan(vol_zyx[~mask]).all()
    page = (cfg.workdir / "report" / "index.html").read_text()
    assert "affine is not published by the authors" in page
    # a task the configured list asks for but the store lacks is named
    with pytest.raises(AnalysisStageError, match=r"results/CSI1 lack task\(s\) edge3d"):
        run_analysis(load_config(config, overrides={"study": {"tasks": ["curvature", "class_places", "edge3d"]}}))
    # --overwrite replaces the subject's results with those of other files (here the npz: 21 tasks)
    assert cli.main(["import-published", str(PUBLISHED), "--config", str(config), "--overwrite"]) == 0
    assert store.results("CSI1").sizes["task"] == 21
    assert cli.main(["analyse", "--config", str(config)]) == 0
    assert read_analysis(cfg).sizes["task"] == 21


def test_import_refuses_unsafe_pickles(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    folder = tmp_path / "results" / "subj1"
    folder.mkdir(parents=True)
    shutil.copy(PICKLES / "corr_whole_brain_taskrepr_curvature__TRavg.p", folder)
    (folder / "corr_whole_brain_taskrepr_class_places__TRavg.p").write_bytes(pickle.dumps([(Evil(), 0.5)]))
    config = study(tmp_path, ["CSI1"])
    assert cli.main(["import-published", str(tmp_path / "results"), "--config", str(config)]) == 2
    assert "refusing to load global" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
    assert not StudyStore(load_config(config).store_path).has("results/CSI1")


@pytest.mark.slow
def test_the_paper_reproduced_through_the_store_on_all_three_subjects(tmp_path):
    """Import the three subjects' published results, run the analysis stage: curvature has no
    significant voxel in any subject; the 3D tasks and the two classification tasks form
    their own branches; the stored analysis equals the analysis of the npz themselves."""
    cfg = load_config(study(tmp_path, SUBJECTS))
    summary = import_published(cfg, PUBLISHED)
    assert {s: summary[s]["volume_shape"] for s in SUBJECTS} == {s: list(g) for s, g in GRIDS.items()}
    a = run_analysis(cfg)
    assert list(a["task"].values) == task_names()
    assert (a["n_significant"].sel(task="curvature").values == 0).all()
    assert (a["n_significant"].drop_sel(task="curvature").max("subject").values > 0).all()
    names = list(a["task"].values)
    three_d = [names.index(t) for t in ("edge3d", "keypoint3d", "segment25d", "rgb2depth", "rgb2mist", "reshade",
                                        "rgb2sfnorm")]
    semantic = [names.index(t) for t in ("class_1000", "class_places")]
    assert is_clade(a["linkage_mean"].values, three_d) and is_clade(a["linkage_mean"].values, semantic)
    for s in SUBJECTS:
        assert is_clade(a["linkage"].sel(subject=s).values, semantic)
    # the numbers of docs/published_reproduction.md (its settings but 50 bootstraps, 200 permutations)
    assert a["n_significant"].sel(subject="CSI1", task="vanishing_point").item() == 1825
    assert a["n_voxels"].values.tolist() == [54894, 59182, 57015]
    assert float(a["spearman_taskonomy_mean"]) == pytest.approx(0.261, abs=5e-4)
    direct = analyse({s: load_reference_npz(PUBLISHED / f"{s}.npz") for s in SUBJECTS},
                     roi_results={s: load_reference_roi_npz(PUBLISHED / f"{s}.npz") for s in SUBJECTS},
                     n_bootstrap=50, n_permutations=200)
    for name in ("similarity", "similarity_mean_ci", "linkage_mean", "mantel_p", "roi_mean_r", "contrast_n_3d_wins"):
        np.testing.assert_array_equal(a[name].values, direct[name].transpose(*a[name].dims).values, err_msg=name)


def test_imported_results_have_the_layout_of_fitted_ones(tmp_path):
    """Import and fit build results/<subject> from one template: the same variables, dims,
    dtypes and attrs (imports lack only the noise ceiling and the permutation test)."""
    rng = np.random.default_rng(0)
    tasks, v = ["curvature", "class_places"], 4
    ijk = np.array([[0, 1, 2], [1, 1, 2], [2, 0, 1], [3, 2, 0]])
    published = xr.Dataset(
        {"r": (("task", "voxel"), rng.random((2, v))), "r2": (("task", "voxel"), rng.random((2, v))),
         "pvalue": (("task", "voxel"), rng.random((2, v))), "qvalue": (("task", "voxel"), rng.random((2, v))),
         "significant": (("task", "voxel"), rng.random((2, v)) > 0.5)},
        coords={"task": tasks, "i": ("voxel", ijk[:, 0]), "j": ("voxel", ijk[:, 1]), "k": ("voxel", ijk[:, 2]),
                "roi": ("voxel", ["LHPPA", "", "", "RHLOC"])})
    store = StudyStore(tmp_path / "store.zarr")
    store.create()
    store.write_dataset("results/CSI2", to_store_layout(published, "CSI2", shape_ijk=(4, 3, 3), source="test"))
    imported = store.results("CSI2")
    store.init_responses("CSI1", ["a.jpg", "b.jpg"], ijk, ["LHPPA", "", "", "RHLOC"], 2, {})
    store.ensure_results("CSI1", tasks, {}, task_labels=[task_info(t).label for t in tasks], permutation=True)
    fitted = store.results("CSI1")
    assert set(fitted.data_vars) - set(imported.data_vars) == {"pvalue_perm", "qvalue_perm", "significant_perm",
                                                                 "ncsnr", "noise_ceiling_r", "noise_ceiling_r2"}
    assert set(imported.variables) <= set(fitted.variables)
    for name in imported.variables:
        assert imported[name].dims == fitted[name].dims, name
        assert imported[name].dtype == fitted[name].dtype, name
        assert imported[name].attrs == fitted[name].attrs, name
    for name in imported.coords:
        np.testing.assert_array_equal(imported[name].values, fitted[name].values, err_msg=name)
    np.testing.assert_array_equal(imported["r"].values, published["r"].values.astype(np.float32))
    assert np.isnan(imported["alpha"].values).all()  # not published


def test_upstream_is_kept_in_the_results_attrs_and_a_malformed_one_is_refused(tmp_path, capsys):
    config = write_config(tmp_path / "study.yaml", {"study": {"name": "pub", "workdir": str(tmp_path / "work"),
                                                               "subjects": ["CSI1"], "tasks": ["curvature"]}})
    assert cli.main(["import-published", str(PUBLISHED), "--config", str(config),
                     "--upstream", "github.com/ariaaay/NeuralTaskonomy"]) == 2
    assert "expected REPOSITORY@COMMIT" in capsys.readouterr().err
    assert not (tmp_path / "work" / "store.zarr").exists()  # refused before anything is written
    assert cli.main(["import-published", str(PUBLISHED), "--config", str(config),
                     "--upstream", "github.com/ariaaay/NeuralTaskonomy@5400D0E8"]) == 0
    attrs = StudyStore(load_config(config).store_path).results("CSI1").attrs
    assert attrs["source_repository"] == "github.com/ariaaay/NeuralTaskonomy"
    assert attrs["source_commit"] == "5400d0e8"
