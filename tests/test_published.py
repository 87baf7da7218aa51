"""The authors' published results: restricted unpickler, layout reader, reference npz, and
the paper's facts reproduced by the full analysis of all three subjects."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics.pairwise import cosine_similarity as sk_cosine
from statsmodels.stats.multitest import multipletests

from neurotask.pipeline.stats import similarity as S
from tree_support import is_clade
from neurotask.pipeline.stats.task_structure import analyse
from neurotask.pipeline.formats.published import (
    ROI_NAMES,
    PublishedResultsError,
    UnsafePickleError,
    load_reference_npz,
    load_reference_roi_npz,
    published_subject_datasets,
    read_published_roi,
    read_published_subject,
    restricted_load,
    restricted_loads,
    voxel_ijk,
)
from neurotask.pipeline.stats.scores import with_fdr
from neurotask.pipeline.tasks import task_names


from conftest import reference_path as _reference  # noqa: E402


PUBLISHED = _reference() / "published"
PICKLES = PUBLISHED / "original_pickles" / "subj1"
SUBJECTS = ("CSI1", "CSI2", "CSI3")
N_VOXELS = {"CSI1": 54894, "CSI2": 59182, "CSI3": 57015}


# --------------------------------------------------------------------------- unpickler


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_rejects_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "corr_whole_brain_taskrepr_evil__TRavg.p"
    evil.write_bytes(pickle.dumps([(_Evil(marker), 0.5)]))
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|os|nt)\.system"):
        restricted_load(evil)
    assert not marker.exists()
    # and through the folder reader, naming the file
    with pytest.raises(UnsafePickleError, match="corr_whole_brain_taskrepr_evil__TRavg.p"):
        read_published_subject(tmp_path)
    assert not marker.exists()


def test_restricted_unpickler_rejects_other_globals_and_object_payloads():
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        restricted_loads(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafePickleError, match="numpy._core.multiarray._reconstruct"):
        restricted_loads(pickle.dumps(np.arange(3), protocol=3))
    # the admitted globals cannot be turned into object dtypes or arbitrary payloads
    with pytest.raises(UnsafePickleError, match="not a plain numeric type"):
        restricted_loads(b"\x80\x03cnumpy\ndtype\nX\x01\x00\x00\x00O\x85R.")
    scalar_of_list = (
        b"\x80\x03cnumpy.core._multiarray_umath\nscalar\n"
        b"cnumpy\ndtype\nX\x02\x00\x00\x00f8\x85R]\x86R."
    )
    with pytest.raises(UnsafePickleError, match="raw bytes"):
        restricted_loads(scalar_of_list)


def test_restricted_unpickler_reads_a_numeric_scalar_and_reports_corrupt_files(tmp_path):
    ok = (
        b"\x80\x03cnumpy.core._multiarray_umath\nscalar\n"
        b"cnumpy\ndtype\nX\x02\x00\x00\x00f8\x85RC\x08" + np.float64(0.25).tobytes() + b"\x86R."
    )
    value = restricted_loads(ok)
    assert isinstance(value, np.float64) and value == 0.25
    broken = tmp_path / "broken.p"
    broken.write_bytes((PICKLES / "rsq_whole_brain_taskrepr_curvature__TRavg.p").read_bytes()[:500])
    with pytest.raises(PublishedResultsError, match="broken.p"):
        restricted_load(broken)
    with pytest.raises(PublishedResultsError, match="cannot read"):
        restricted_load(tmp_path / "missing.p")


# --------------------------------------------------------------------------- layout reader


@pytest.fixture(scope="module")
def npz1():
    return load_reference_npz(PUBLISHED / "CSI1.npz"), load_reference_roi_npz(PUBLISHED / "CSI1.npz")


def test_layout_reader_matches_the_reference_npz(npz1):
    whole, roi = npz1
    wb = read_published_subject(PICKLES)
    assert sorted(wb) == ["class_places", "curvature"]
    for task, entry in wb.items():
        assert entry["r"].dtype == np.float64 and entry["r"].shape == (N_VOXELS["CSI1"],)
        np.testing.assert_array_equal(entry["r"].astype(np.float32), whole.r.sel(task=task).values)
        np.testing.assert_array_equal(entry["r2"].astype(np.float32), whole.r2.sel(task=task).values)
        # the npz holds p as float32
        np.testing.assert_array_equal(entry["p"].astype(np.float32), whole.pvalue.sel(task=task).values.astype(np.float32))
    rois = read_published_roi(PICKLES)
    assert set(rois) == set(task_names()) | {"depth"}
    for task in task_names():
        np.testing.assert_array_equal(rois[task]["r"].astype(np.float32), roi.r.sel(task=task).values)
        np.testing.assert_array_equal(rois[task]["p"].astype(np.float32), roi.pvalue.sel(task=task).values.astype(np.float32))
        np.testing.assert_array_equal(rois[task]["roi"], roi.roi.values)


def test_layout_datasets(npz1):
    whole, _ = npz1
    with np.load(PUBLISHED / "CSI1.npz") as z:
        mask = z["cortical_mask_zyx"]
    wb, rd = published_subject_datasets(PICKLES, mask_zyx=mask, subject="CSI1")
    assert list(wb.task.values) == ["curvature", "class_places"]  # model_config order
    for name in ("r", "r2", "i", "j", "k"):
        np.testing.assert_array_equal(wb[name].values, whole[name].sel(task=wb.task).values if "task" in whole[name].dims else whole[name].values)
    assert "depth" not in rd.task.values and rd.sizes["task"] == 21
    assert wb.attrs["subject"] == "CSI1" and rd.attrs["model"] == "roi"
    assert not {"qvalue", "significant"} & set(rd.data_vars)  # the reader computes no statistics
    rd = with_fdr(rd, 0.05)
    np.testing.assert_array_equal(rd.significant.values, rd.qvalue.values < 0.05)
    with pytest.raises(PublishedResultsError, match="depth"):
        published_subject_datasets(PICKLES, tasks=["depth"])
    smaller = mask.copy()
    smaller[tuple(np.argwhere(mask)[0])] = False
    with pytest.raises(PublishedResultsError, match="cortical mask has 54893 voxels"):
        published_subject_datasets(PICKLES, mask_zyx=smaller)
    with pytest.raises(PublishedResultsError, match="does not exist"):
        read_published_subject(PICKLES / "nope")


def test_layout_reader_rejects_mismatched_files(tmp_path):
    shutil.copy(PICKLES / "corr_whole_brain_taskrepr_curvature__TRavg.p", tmp_path)
    (tmp_path / "rsq_whole_brain_taskrepr_curvature__TRavg.p").write_bytes(pickle.dumps([1.0, 2.0], protocol=3))
    with pytest.raises(PublishedResultsError, match="2 voxels"):
        read_published_subject(tmp_path)
    (tmp_path / "corr_taskrepr_x__TRavg.p").write_bytes(pickle.dumps([[(0.1, 0.2)]], protocol=3))
    with pytest.raises(PublishedResultsError, match="10 ROI lists"):
        read_published_roi(tmp_path)


# --------------------------------------------------------------------------- reference npz


def test_reference_npz_layout_and_voxel_coordinates(npz1):
    whole, roi = npz1
    assert whole.r.dims == ("task", "voxel") and whole.sizes["voxel"] == N_VOXELS["CSI1"]
    assert list(whole.task.values) == task_names()
    assert set(whole.roi.values.tolist()) == {""}
    with np.load(PUBLISHED / "CSI1.npz") as z:
        mask = z["cortical_mask_zyx"]
        r = z["r"]
    vol = np.zeros(mask.shape[::-1], dtype=bool)  # NIfTI (i, j, k) order
    vol[whole.i.values, whole.j.values, whole.k.values] = True
    np.testing.assert_array_equal(vol, mask.transpose(2, 1, 0))
    # voxel j of r is voxel j of vol_zyx[mask_zyx]: a volume filled through (i, j, k) gives r back
    vol_r = np.zeros(mask.shape[::-1], dtype=np.float32)
    vol_r[whole.i.values, whole.j.values, whole.k.values] = r[5]
    np.testing.assert_array_equal(vol_r.transpose(2, 1, 0)[mask], r[5])
    assert whole.attrs["volume_shape_ijk"] == [71, 89, 72]
    np.testing.assert_array_equal(voxel_ijk(mask), np.stack([whole.i, whole.j, whole.k], axis=1))
    assert list(dict.fromkeys(roi.roi.values.tolist())) == list(ROI_NAMES)
    assert (roi.i.values == -1).all()


# --------------------------------------------------------------------------- the paper, reproduced


@pytest.fixture(scope="module")
def published_analysis():
    results = {s: load_reference_npz(PUBLISHED / f"{s}.npz") for s in SUBJECTS}
    rois = {s: load_reference_roi_npz(PUBLISHED / f"{s}.npz") for s in SUBJECTS}
    return results, analyse(results, roi_results=rois)


def test_curvature_has_no_significant_voxel_in_any_subject(published_analysis):
    _, out = published_analysis
    assert (out.n_significant.sel(task="curvature").values == 0).all()
    assert bool(out.no_significant_voxel.sel(task="curvature").all())
    # every other task has significant voxels in at least one subject
    assert (out.n_significant.drop_sel(task="curvature").max("subject").values > 0).all()
    assert np.isfinite(out.similarity.values).all()
    assert (out.similarity.sel(task="curvature").values == 0).all()


def test_similarity_is_cosine_of_the_fdr_masked_r(published_analysis):
    """The reference README's statement, computed independently with statsmodels and sklearn."""
    results, out = published_analysis
    ds = results["CSI2"]
    sig = np.stack([multipletests(p, alpha=0.05, method="fdr_bh")[0] for p in ds.pvalue.values])
    masked = np.where(sig, ds.r.values.astype(np.float64), 0.0)
    np.testing.assert_allclose(out.similarity.sel(subject="CSI2").values, sk_cosine(masked), atol=1e-12)
    np.testing.assert_array_equal(out.n_significant.sel(subject="CSI2").values, sig.sum(axis=1))


def _indices(out, tasks):
    names = list(out.task.values)
    return [names.index(t) for t in tasks]


THREE_D = ["edge3d", "keypoint3d", "segment25d", "rgb2depth", "rgb2mist", "reshade", "rgb2sfnorm"]
SEMANTIC = ["class_1000", "class_places"]


def test_3d_and_semantic_tasks_form_their_own_branches(published_analysis):
    results, out = published_analysis
    # the subject-averaged tree: the 3D tasks (curvature has no voxels) are one branch,
    # object and scene classification another
    z = out.linkage_mean.values
    assert is_clade(z, _indices(out, THREE_D))
    assert is_clade(z, _indices(out, SEMANTIC))
    # the same with ward linkage
    zw = S.task_linkage(out.similarity_mean.values, "ward")
    assert is_clade(zw, _indices(out, THREE_D)) and is_clade(zw, _indices(out, SEMANTIC))
    # object + scene classification pair up in every subject's tree
    for s in SUBJECTS:
        assert is_clade(out.linkage.sel(subject=s).values, _indices(out, SEMANTIC))


def test_structure_is_reliable_across_subjects_and_related_to_taskonomy(published_analysis):
    _, out = published_analysis
    c = out.subject_correlation.values
    assert (c[np.triu_indices(3, 1)] > 0.8).all()
    rho, p = float(out.spearman_taskonomy_mean), float(out.mantel_p_mean)
    assert rho > 0 and p < 0.01
    lo, hi = out.spearman_taskonomy_mean_ci.values
    assert 0 < lo <= rho <= hi
    # the similarity interval holds the point estimate off the diagonal
    ci = out.similarity_mean_ci.values
    tri = np.triu_indices(out.sizes["task"], 1)
    m = out.similarity_mean.values[tri]
    inside = (ci[..., 0][tri] <= m + 1e-9) & (m <= ci[..., 1][tri] + 1e-9)
    assert inside.mean() > 0.95
    assert np.isfinite(float(out.ari_taskonomy_mean)) and np.isfinite(float(out.cophenetic_correlation_taskonomy_mean))


def test_3d_features_win_in_scene_regions_more_than_in_early_visual_cortex(published_analysis):
    """Figure 3: r(3D) > r(2D) more often in scene-selective ROIs than in early visual cortex."""
    _, out = published_analysis
    frac = out.contrast_n_3d_wins / out.contrast_n_voxels
    assert (frac.sel(roi_group="scene") > frac.sel(roi_group="early_visual")).all()
    for s in SUBJECTS:
        with np.load(PUBLISHED / f"{s}.npz") as z:
            sizes = [z[f"roi_r_{name}"].shape[1] for name in ROI_NAMES]
        np.testing.assert_array_equal(out.roi_n_voxels.sel(subject=s, roi=list(ROI_NAMES)).values, sizes)
