"""The brain maps (Figures 2-4): the underlay (data.anatomy resampled to the functional grid,
else the mean raw beta stored at ingest), cuts labelled in mm, ROI contours only when voxels
have ROI labels, the 2-D colour map, and self-contained interactive views linked from the
figures."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from matplotlib.contour import ContourSet

from conftest import small_config_dict, write_config
from neurotask.pipeline import cli
from neurotask.pipeline.config import load_config
from neurotask.pipeline.errors import DataError
from neurotask.pipeline.formats.anatomy import AnatomyFileError, anatomy_in_grid
from neurotask.pipeline.report import brain_maps
from neurotask.pipeline.report.colormaps import BLUE, RED, contrast_rgba
from neurotask.pipeline.report.page import ReportPage
from neurotask.pipeline.report.volumes import MapOptions, StoredUnderlay, subject_map_figures, subject_maps
from neurotask.storage import StudyStore

AFFINE = np.array([[3.0, 0, 0, -18.0], [0, 3.0, 0, -21.0], [0, 0, 3.0, -12.0], [0, 0, 0, 1]])
SHAPE = (12, 14, 10)
TASKS = ["keypoint3d", "keypoint2d", "class_places"]


# --------------------------------------------------------------------------- 2-D colour map


def test_contrast_colours_at_known_points():
    r3 = np.array([0.4, 0.0, 0.4, 0.0, 0.2, np.nan, -0.3, 0.8])
    r2 = np.array([0.0, 0.4, 0.4, 0.0, 0.1, np.nan, -0.1, 0.0])
    c = contrast_rgba(r3, r2, vmax=0.4)
    np.testing.assert_allclose(c[0], [*RED, 1.0])  # 3D only: red, opaque
    np.testing.assert_allclose(c[1], [*BLUE, 1.0])  # 2D only: blue
    np.testing.assert_allclose(c[2], [1, 1, 1, 1.0])  # both well: white
    assert c[3, 3] == 0 and c[5, 3] == 0 and c[6, 3] == 0  # neither, NaN, negative: transparent
    # r 0.2 vs 0.1: relative difference 0.5 -> half red, half white; opacity sqrt(0.5)
    np.testing.assert_allclose(c[4], [*(0.5 * RED + 0.5), np.sqrt(0.5)])
    np.testing.assert_allclose(c[7], c[0])  # beyond vmax: saturates
    with pytest.raises(ValueError, match="vmax must be > 0"):
        contrast_rgba(r3, r2, 0.0)


# --------------------------------------------------------------------------- anatomy file


def test_anatomy_is_resampled_to_the_functional_grid(tmp_path):
    # a 1.5 mm image, another field of view, whose value is the world x coordinate
    fine_aff = np.array([[1.5, 0, 0, -30.0], [0, 1.5, 0, -30.0], [0, 0, 1.5, -20.0], [0, 0, 0, 1]])
    ijk = np.indices((40, 44, 30)).reshape(3, -1)
    x = (fine_aff[:3, :3] @ ijk + fine_aff[:3, 3:4])[0].reshape(40, 44, 30)
    nib.save(nib.Nifti1Image(x.astype(np.float32), fine_aff), tmp_path / "t1.nii.gz")
    out = anatomy_in_grid(tmp_path / "t1.nii.gz", SHAPE, AFFINE)
    assert out.shape == SHAPE
    grid_x = (AFFINE[:3, :3] @ np.indices(SHAPE).reshape(3, -1) + AFFINE[:3, 3:4])[0].reshape(SHAPE)
    inside = np.isfinite(out)
    assert inside.sum() > 0.5 * out.size
    np.testing.assert_allclose(out[inside], grid_x[inside], atol=0.05)
    # the grid reaches beyond the image's field of view in z (up to 15 mm; the image: 23.5): NaN there
    world_z = (AFFINE @ np.r_[0, 0, 9, 1])[2]
    assert world_z == 15.0 and np.isfinite(out[..., 9]).any()

    # same grid: taken as is; a 4-D EPI: averaged over time
    vol = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(np.stack([vol, vol + 2], -1), AFFINE), tmp_path / "epi.nii.gz")
    np.testing.assert_allclose(anatomy_in_grid(tmp_path / "epi.nii.gz", SHAPE, AFFINE), vol + 1, atol=1e-6)

    (tmp_path / "bad.nii.gz").write_bytes(b"not an image")
    with pytest.raises(AnatomyFileError, match=r"bad\.nii\.gz: not a readable NIfTI image"):
        anatomy_in_grid(tmp_path / "bad.nii.gz", SHAPE, AFFINE)


def test_out_of_view_is_nan(tmp_path):
    small = np.array([[3.0, 0, 0, -18.0], [0, 3.0, 0, -21.0], [0, 0, 3.0, -12.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.arange(12 * 14 * 4, dtype=np.float32).reshape(12, 14, 4), small), tmp_path / "slab.nii.gz")
    out = anatomy_in_grid(tmp_path / "slab.nii.gz", SHAPE, AFFINE)  # same affine, other shape
    assert np.isfinite(out[..., :3]).all() and np.isnan(out[..., 5:]).all()


# --------------------------------------------------------------------------- drawing


def _study(rois: bool, ceiling: bool = False) -> tuple[xr.Dataset, xr.Dataset]:
    """A synthetic analysis and a subject's results on SHAPE/AFFINE: a brain ellipsoid; a
    planted blob significant for every task (keypoint3d stronger in it)."""
    g = np.indices(SHAPE).transpose(1, 2, 3, 0)
    brain = (((g - (np.array(SHAPE) - 1) / 2) / (np.array(SHAPE) / 2.2)) ** 2).sum(-1) <= 1
    ijk = np.argwhere(brain)
    v = len(ijk)
    blob = (((ijk - [4, 5, 5]) / 2.5) ** 2).sum(1) <= 1
    rng = np.random.default_rng(1)
    r = rng.normal(0, 0.02, (3, v))
    r[:, blob] += np.array([[0.5], [0.3], [0.4]])
    p = np.where(blob, 1e-8, 0.5)[None].repeat(3, 0)
    roi = np.where(blob, "LHPPA", "") if rois else np.full(v, "")
    data = {"r": (("task", "voxel"), r), "pvalue": (("task", "voxel"), p)}
    if ceiling:
        data["noise_ceiling_r"] = ("voxel", np.full(v, 0.8))
    ds = xr.Dataset(data, coords={"task": TASKS, "voxel": np.arange(v), "voxel_i": ("voxel", ijk[:, 0]),
                                  "voxel_j": ("voxel", ijk[:, 1]), "voxel_k": ("voxel", ijk[:, 2]),
                                  "roi": ("voxel", roi)},
                    attrs={"volume_shape": list(SHAPE), "affine": AFFINE.tolist()})
    analysis = xr.Dataset({"label": ("task", ["3D Keypoint", "2D Keypoint", "Scene Class"])},
                          coords={"task": TASKS}, attrs={"significance": "parametric", "fdr": 0.05})
    return analysis, ds


def test_cuts_are_labelled_in_mm_with_orientation():
    _, ds = _study(rois=True)
    maps = subject_maps("CSI1", ds)
    cuts = brain_maps.axial_cuts(maps.background, maps.affine, 6)
    ks = np.unique(np.argwhere(maps.background)[:, 2])
    z_mm = AFFINE[2, 2] * ks + AFFINE[2, 3]
    assert set(cuts) <= set(z_mm.tolist()) and len(cuts) >= 4
    vol = maps.volume(ds["r"].values[0])
    fig = brain_maps.stat_mosaic(vol, brain_maps.underlay_volume(None, maps.background), maps.affine, maps.rois,
                                 cuts=cuts, title="t", cmap="hot", vmin=0, vmax=0.6, threshold=1e-6,
                                 colorbar_label="r", mask=maps.background)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert {f"z={c:g}" for c in cuts} <= set(texts), texts
    assert not any(re.match(r"k\s*=", t) for t in texts)
    assert texts.count("L") == texts.count("R") == len(cuts)


def _contours(fig) -> int:
    return sum(isinstance(c, ContourSet) for ax in fig.axes for c in ax.collections)


def test_roi_contours_only_when_voxels_have_roi_labels(tmp_path):
    for rois in (True, False):
        analysis, ds = _study(rois=rois)
        maps = subject_maps("CSI1", ds)
        assert bool(maps.rois) is rois
        fig = brain_maps.stat_mosaic(maps.volume(ds["r"].values[0]), brain_maps.underlay_volume(None, maps.background),
                                     maps.affine, maps.rois, cuts=[-3.0, 0.0], title="t", cmap="hot", vmin=0,
                                     vmax=0.6, threshold=1e-6, colorbar_label="r", mask=maps.background)
        assert (_contours(fig) > 0) is rois
        assert bool(fig.legends) is rois
        page = ReportPage(tmp_path / str(rois), dpi=50)
        subject_map_figures(page, analysis, ds, maps, "class_places", MapOptions(n_slices=4))
        caption = page.figures[0].caption
        assert ("ROI outlines in colour (LHPPA)" in caption) is rois
        assert ("No ROI outlines: these voxels carry no ROI labels" in caption) is not rois


def test_figures_views_and_nifti_written_and_linked(tmp_path):
    analysis, ds = _study(rois=True, ceiling=True)
    maps = subject_maps("CSI1", ds)
    page = ReportPage(tmp_path, dpi=50)
    written = subject_map_figures(page, analysis, ds, maps, "class_places", MapOptions(n_slices=4))
    keys = [f.key for f in page.figures]
    assert keys == ["fig2_r_class_places_CSI1", "fig2_projections_class_places_CSI1", "fig3_keypoint_CSI1",
                    "fig4_class_places_CSI1"]
    assert [f.section for f in page.figures] == ["fig2", "fig2", "fig3", "fig4"]
    assert "fig4_noise_normalized_r_class_places.nii.gz" in written
    for f in page.figures:
        assert all((tmp_path / p).is_file() for p in f.files) and any(p.endswith(".svg") for p in f.files)
        labels = dict(f.links)
        assert any(k.startswith("NIfTI") for k in labels)
        for label, rel in f.links:
            assert (tmp_path / rel).is_file(), rel
        if f.key != "fig2_projections_class_places_CSI1":
            html = (tmp_path / labels["interactive view"]).read_text()
            assert brain_maps.external_references(html) == []
            assert not re.search(r"(src|href)=\S*https?:", html.replace("&quot;", '"'))
            assert "brainsprite" in html.lower()  # the viewer's script is inline
    # Figure 4: r / ceiling in the significant voxels
    nnr = np.asarray(nib.load(tmp_path / "nifti/CSI1/fig4_noise_normalized_r_class_places.nii.gz").dataobj)
    ijk = np.stack([ds[c].values for c in ("voxel_i", "voxel_j", "voxel_k")], 1)
    vals = nnr[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    blob = ds["pvalue"].values[2] < 0.01
    np.testing.assert_allclose(vals[blob], ds["r"].values[2, blob] / 0.8, rtol=1e-5)
    assert np.isnan(vals[~blob]).all()
    # without a ceiling there is no Figure 4
    analysis, ds = _study(rois=False)
    page = ReportPage(tmp_path / "nc", dpi=50)
    subject_map_figures(page, analysis, ds, subject_maps("CSI1", ds), "class_places",
                        MapOptions(n_slices=4, interactive=False))
    assert not any(f.section == "fig4" for f in page.figures)
    assert all(dict(f.links).keys() == {"NIfTI"} or "NIfTI (r difference)" in dict(f.links) for f in page.figures)


def test_underlay_caption_follows_the_stored_anatomy(tmp_path):
    analysis, ds = _study(rois=False)
    maps = subject_maps("CSI1", ds)
    mean_beta = np.where(maps.background, np.random.default_rng(2).normal(5, 1, SHAPE), np.nan)
    opts = MapOptions(n_slices=4, interactive=False,
                      stored={"CSI1": StoredUnderlay(mean_beta, AFFINE, "mean of the raw betas over every trial")})
    page = ReportPage(tmp_path, dpi=50)
    subject_map_figures(page, analysis, ds, maps, "class_places", opts)
    assert "Underlay: mean of the raw betas over every trial" in page.figures[0].caption
    page = ReportPage(tmp_path / "none", dpi=50)
    subject_map_figures(page, analysis, ds, maps, "class_places", MapOptions(n_slices=4, interactive=False))
    assert "grey silhouette" in page.figures[0].caption


# --------------------------------------------------------------------------- ingest and report config


def _simulated(tmp_path: Path, **data) -> Path:
    cfg = small_config_dict(tmp_path / "work", study={"subjects": ["CSI1"]}, data=data or None,
                            simulate={"n_images": 100, "n_repeated": 10, "volume_shape": [10, 12, 8]})
    cfg["data"] = {"chunk_size": 250, **data}
    path = write_config(tmp_path / "study.yaml", cfg)
    assert cli.main(["simulate", "--config", str(path)]) == 0
    return path


def test_ingest_stores_the_mean_beta_underlay(tmp_path):
    path = _simulated(tmp_path)
    assert cli.main(["ingest", "--config", str(path)]) == 0
    cfg = load_config(path)
    store = StudyStore(cfg.store_path)
    anat = store.anatomy("CSI1")
    resp = store.responses("CSI1")
    ijk = np.stack([resp[c].values for c in ("voxel_i", "voxel_j", "voxel_k")], 1)
    betas = [np.asarray(nib.load(cfg.data_path(cfg.data.betas, "CSI1", session=s)).dataobj, dtype=np.float64)
             for s in (1, 2)]
    mean = np.concatenate(betas, axis=-1).mean(-1)
    under = anat["underlay"].values
    np.testing.assert_allclose(under[ijk[:, 0], ijk[:, 1], ijk[:, 2]], mean[ijk[:, 0], ijk[:, 1], ijk[:, 2]],
                               rtol=1e-5, atol=1e-5)
    outside = np.ones(under.shape, bool)
    outside[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = False
    assert np.isnan(under[outside]).all()
    assert anat.attrs["source"].startswith("mean of the raw betas")
    np.testing.assert_array_equal(anat.attrs["affine"], resp.attrs["affine"])
    marker = store.progress().read("ingest", "CSI1")
    assert store.check_anatomy("CSI1", "ingest/CSI1", marker["anatomy_chunks"]) == []
    opts = MapOptions.from_config(cfg, store)
    assert "CSI1" in opts.stored and opts.stored["CSI1"].volume.shape == tuple(resp.attrs["volume_shape"])
    # verify vouches for the underlay too: a flipped bit in one of its chunks is named
    assert cli.main(["verify", "--config", str(path)]) == 0
    record = marker["anatomy_chunks"][0]
    target = cfg.store_path / "anatomy" / "CSI1" / record["variable"] / record["key"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    assert cli.main(["verify", "--config", str(path)]) == 2


def test_data_anatomy_at_ingest_and_report(tmp_path, capsys):
    path = _simulated(tmp_path, anatomy="anat/{subject}_T1w.nii.gz")
    cfg = load_config(path)
    missing = cfg.data_path(cfg.data.anatomy, "CSI1", key="anatomy")
    assert cli.main(["ingest", "--config", str(path)]) == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(DataError, match=re.escape(f"data.anatomy for CSI1: no such file {missing}")):
        MapOptions.from_config(cfg, StudyStore(cfg.store_path))
    # a 1 mm anatomy over the betas' field of view, in another grid: resampled at ingest
    betas = nib.load(cfg.data_path(cfg.data.betas, "CSI1", session=1))
    fine = betas.affine @ np.diag([0.5, 0.5, 0.5, 1.0])
    shape = tuple(2 * s for s in betas.shape[:3])
    values = np.random.default_rng(0).uniform(100, 200, shape).astype(np.float32)
    missing.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(values, fine), missing)
    assert cli.main(["ingest", "--config", str(path)]) == 0
    store = StudyStore(cfg.store_path)
    anat = store.anatomy("CSI1")
    expected = anatomy_in_grid(missing, betas.shape[:3], np.asarray(store.responses("CSI1").attrs["affine"]))
    np.testing.assert_allclose(anat["underlay"].values, expected, rtol=1e-6)
    assert "data.anatomy" in anat.attrs["source"] and np.isfinite(expected).mean() > 0.9
