"""data.format nsd: the readers on files written in NSD's real formats (HDF5 by h5py, NIfTI by
nibabel, the design by scipy.io.savemat), the ingest of a small simulated NSD study, bad input
at the command line, and (slow) the demo end to end through the installed command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io
import yaml

from neurotask.pipeline.config import load_config
from neurotask.pipeline.errors import DataError
from neurotask.pipeline.formats import nsd
from neurotask.pipeline.stages.ingest import ingest
from neurotask.pipeline.stages.ingest_nsd import shared_test_images
from neurotask.pipeline.stages.simulate_nsd import simulate_nsd_study
from neurotask.pipeline.stats.noise_ceiling import signal_noise
from neurotask.storage import StudyStore

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "nsd_demo.yaml"


def write_design(path: Path, masterordering, subjectim, sharedix) -> Path:
    # MATLAB saves doubles, row vectors (1, n)
    scipy.io.savemat(str(path), {"masterordering": np.asarray(masterordering, float)[None, :],
                                 "subjectim": np.asarray(subjectim, float),
                                 "sharedix": np.asarray(sharedix, float)[None, :]})
    return path


# --------------------------------------------------------------------------- design


def test_design_is_read_with_its_1_based_indices(tmp_path):
    subjectim = np.array([[7, 9, 11, 500], [7, 9, 20, 73000]])
    p = write_design(tmp_path / "d.mat", [4, 1, 2, 1, 3, 4], subjectim, [7, 9])
    d = nsd.read_design(p)
    assert d.masterordering.tolist() == [4, 1, 2, 1, 3, 4]
    # trial -> 1-based index into the subject's images -> 1-based 73k id
    assert d.trial_ids("subj01", 6).tolist() == [500, 7, 9, 7, 11, 500]
    assert d.trial_ids("subj02", 5).tolist() == [73000, 7, 9, 7, 20]
    assert nsd.image_name(73000) == "nsd73k_73000" and nsd.image_id("nsd73k_00007") == 7


def test_design_with_0_based_or_out_of_range_indices_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"masterordering trial 3 \(session 1, trial 3\) is 0.*0-based"):
        nsd.read_design(write_design(tmp_path / "a.mat", [1, 2, 0], [[5, 6, 7]], [5]))
    with pytest.raises(DataError, match=r"masterordering trial 2 .* is 4; expected a 1-based index .* \(1 \.\. 3\)"):
        nsd.read_design(write_design(tmp_path / "b.mat", [1, 4], [[5, 6, 7]], [5]))
    with pytest.raises(DataError, match=r"subjectim element 1 is 0.*0-based"):
        nsd.read_design(write_design(tmp_path / "c.mat", [1], [[0, 6, 7]], [6]))
    scipy.io.savemat(str(tmp_path / "e.mat"), {"masterordering": np.ones((1, 3))})
    with pytest.raises(DataError, match="subjectim, sharedix missing"):
        nsd.read_design(tmp_path / "e.mat")
    with pytest.raises(DataError, match="design file not found"):
        nsd.read_design(tmp_path / "none.mat")


def test_shared_test_set_needs_all_showings_in_every_subject(tmp_path):
    # 2 sessions of 3 trials; images 1..3 of each subject; shared ids 7 and 9.
    order = [1, 2, 1, 3, 2, 1]  # trials 1-6; image 1 x3, 2 x2, 3 x1
    d = nsd.read_design(write_design(tmp_path / "d.mat", order, [[7, 9, 11], [9, 7, 12]], [7, 9]))
    assert shared_test_images(d, {"subj01": 2}, 3, showings=3) == {"nsd73k_00007"}
    # subj02's image 1 is id 9: 7 (its image 2) has 2 showings there -> nothing common
    assert shared_test_images(d, {"subj01": 2, "subj02": 2}, 3, showings=3) == set()
    assert shared_test_images(d, {"subj01": 2, "subj02": 2}, 3, showings=2) == {"nsd73k_00007", "nsd73k_00009"}


# --------------------------------------------------------------------------- betas


def _session(tmp_path: Path, shape=(5, 4, 6), n=7, seed=0) -> tuple[np.ndarray, Path, Path]:
    rng = np.random.default_rng(seed)
    vol = rng.integers(-3000, 3000, shape + (n,)).astype(np.int16)
    nii = tmp_path / "betas_session01.nii.gz"
    img = nib.Nifti1Image(vol, np.eye(4))
    img.header.set_data_dtype(np.int16)
    nib.save(img, str(nii))
    h5 = tmp_path / "betas_session01.hdf5"
    with h5py.File(h5, "w") as f:  # MATLAB's X x Y x Z x 750 as h5py sees it
        f.create_dataset("betas", data=vol.transpose(3, 2, 1, 0), chunks=(n, 1, 1, 1))
    return vol, nii, h5


def test_nifti_and_hdf5_betas_read_the_same_percent_signal_change(tmp_path, monkeypatch):
    vol, nii, h5 = _session(tmp_path)
    assert nsd.betas_grid_and_trials(nii) == ((5, 4, 6), 7)
    assert nsd.betas_grid_and_trials(h5) == ((5, 4, 6), 7)  # (trial, z, y, x) reported as (x, y, z)
    ijk = np.array([[0, 0, 0], [4, 3, 5], [2, 1, 3], [1, 3, 0], [4, 0, 2]])
    expected = vol[ijk[:, 0], ijk[:, 1], ijk[:, 2], :].T.astype(np.float32) / np.float32(300)
    a, b = nsd.read_session(nii, ijk), nsd.read_session(h5, ijk)
    assert a.shape == (7, 5) and a.dtype == np.float32
    np.testing.assert_allclose(a, expected, rtol=1e-6)
    np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(nsd, "_SLAB_BYTES", 1)  # one z-slice per slab
    np.testing.assert_array_equal(nsd.read_session(h5, ijk), b)


def test_float_betas_are_refused_instead_of_divided(tmp_path):
    with h5py.File(tmp_path / "b.hdf5", "w") as f:
        f.create_dataset("betas", data=np.zeros((3, 2, 2, 2), np.float32))
    with pytest.raises(DataError, match="float32; NSD's are int16"):
        nsd.betas_grid_and_trials(tmp_path / "b.hdf5")
    with h5py.File(tmp_path / "c.hdf5", "w") as f:
        f.create_dataset("other", data=np.zeros(3))
    with pytest.raises(DataError, match="no dataset 'betas' \\(it holds other\\)"):
        nsd.betas_grid_and_trials(tmp_path / "c.hdf5")


def test_images_by_1_based_73k_id(tmp_path):
    p = tmp_path / "nsd_stimuli.hdf5"
    with h5py.File(p, "w") as f:
        brick = f.create_dataset("imgBrick", shape=(73000, 4, 4, 3), dtype=np.uint8, chunks=(1, 4, 4, 3))
        brick[0] = 1
        brick[72999] = 9
        brick[41] = 5
    out = nsd.read_images(p, [73000, 1, 42, 1])
    assert out.shape == (4, 4, 4, 3) and out[:, 0, 0, 0].tolist() == [9, 1, 5, 1]
    with pytest.raises(DataError, match="73k id 0 outside"):
        nsd.read_images(p, [0])


# --------------------------------------------------------------------------- ROIs


def test_rois_by_label_name_via_the_colour_tables(tmp_path):
    (tmp_path / "a.ctab").write_text("0 Unknown 0 0 0 0\n1 V1v 1 2 3 0\n2 hV4 1 2 3 0\n")
    (tmp_path / "b.ctab").write_text("# places\n0 Unknown\n1 OPA\n2 PPA\n3 hV4\n")
    tables = {"prf": nsd.read_label_table(tmp_path / "a.ctab"), "places": nsd.read_label_table(tmp_path / "b.ctab")}
    assert tables["prf"] == {0: "Unknown", 1: "V1v", 2: "hV4"}
    vol_a = np.array([[[-1, 0, 1, 2]]], dtype=np.int16)
    vol_b = np.array([[[-1, 2, 1, 3]]], dtype=np.int16)
    path = tmp_path / "prf.nii.gz"
    nib.save(nib.Nifti1Image(vol_a, np.eye(4)), str(path))
    vols = {"prf": nsd.load_label_volume(path, (1, 1, 4)), "places": vol_b}
    m = nsd.roi_masks(vols, tables, ["V1v", "PPA", "prf:hV4"])
    assert m["V1v"].ravel().tolist() == [False, False, True, False]
    assert m["PPA"].ravel().tolist() == [False, True, False, False]
    assert m["prf:hV4"].ravel().tolist() == [False, False, False, True]
    with pytest.raises(DataError) as e:
        nsd.roi_masks(vols, tables, ["hV4", "FFA-1"])
    assert "'hV4' is in several ROI files (prf, places); write it 'file:hV4'" in str(e.value)
    assert "'FFA-1' is not in any label table" in str(e.value) and "places: OPA, PPA, hV4" in str(e.value)
    (tmp_path / "bad.ctab").write_text("V1v 1\n")
    with pytest.raises(DataError, match=r"bad.ctab line 1: 'V1v 1'; expected 'index name"):
        nsd.read_label_table(tmp_path / "bad.ctab")
    with pytest.raises(DataError, match=r"has shape \(1, 1, 4\), the betas' grid is \(2, 2, 2\)"):
        nsd.load_label_volume(path, (2, 2, 2))


# --------------------------------------------------------------------------- ingest of a simulated study


def small_config(tmp_path: Path, betas_file: str = "hdf5", subjects=("subj01", "subj02"), name="work") -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    raw.pop("features")  # the feature bank simulated (the brick tests below add their own)
    raw["simulate"].pop("write_weights")
    raw["study"].update(workdir=str(tmp_path / name), subjects=list(subjects), tasks=["rgb2depth", "class_1000"])
    raw["simulate"].update(n_images=100, n_shared=30, n_features=16, volume_shape=[12, 12, 8])
    raw["data"].update(root=str(tmp_path / "nsd"), chunk_size=200)
    raw["data"]["nsd"].update(trials_per_session=100, betas_file=betas_file)
    raw["analysis"]["n_clusters"] = 2
    raw.pop("report", None)
    path = tmp_path / f"{name}_{betas_file}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nsd")
    cfg = load_config(small_config(tmp))
    simulate_nsd_study(cfg)
    ingest(cfg)
    return tmp, cfg


def test_ingest_z_scores_per_session_then_averages_showings(simulated):
    tmp, cfg = simulated
    resp = StudyStore(cfg.store_path).responses("subj02")
    design = nsd.read_design(tmp / "nsd" / cfg.data.nsd.design)
    n_sessions = 2  # even subjects stop a session early: 300 trials -> 3 sessions, subj02 2
    ids = design.trial_ids("subj02", n_sessions * 100)
    v = 17
    i, j, k = (int(resp[c].values[v]) for c in ("voxel_i", "voxel_j", "voxel_k"))
    trials = []
    for s in range(1, n_sessions + 1):
        p = tmp / "nsd" / f"nsddata_betas/ppdata/subj02/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session{s:02d}.nii.gz"
        x = np.asarray(nib.load(str(p)).dataobj)[i, j, k, :].astype(np.float64) / 300  # int16 / 300
        trials.append((x - x.mean()) / x.std())
    trials = np.concatenate(trials)
    names = [nsd.image_name(t) for t in ids]
    assert resp.sizes["image"] == len(set(names))
    got = resp["responses"].values[:, v]
    for row, name in enumerate(resp["image"].values[:25]):
        want = trials[[t for t, nm in enumerate(names) if nm == name]].mean()
        assert got[row] == pytest.approx(want, abs=1e-5)
        assert resp["n_showings"].values[row] == names.count(name)
    assert resp.attrs["ingest"]["repeats"] == "average" and resp["responses"].attrs["units"] == "1"


def test_shared_coordinate_is_the_common_test_set(simulated):
    tmp, cfg = simulated
    design = nsd.read_design(tmp / "nsd" / cfg.data.nsd.design)
    store = StudyStore(cfg.store_path)
    expected = set(int(x) for x in design.sharedix)
    for subject, sessions in (("subj01", 3), ("subj02", 2)):
        ids, counts = np.unique(design.trial_ids(subject, sessions * 100), return_counts=True)
        expected &= set(ids[counts == 3].tolist())
    assert 0 < len(expected) < 30
    for subject in ("subj01", "subj02"):
        resp = store.responses(subject)
        shared = {str(n) for n, s in zip(resp["image"].values, resp["shared"].values) if s}
        assert shared == {nsd.image_name(i) for i in expected}


def test_ncsnr_is_stored_and_agrees_with_ours_from_the_repeats(simulated):
    tmp, cfg = simulated
    resp = StudyStore(cfg.store_path).responses("subj01")
    truth = np.load(cfg.workdir / "raw" / "ground_truth" / "subj01.npz")
    ijk = np.stack([resp[c].values for c in ("voxel_i", "voxel_j", "voxel_k")], axis=1)
    index = {tuple(x): n for n, x in enumerate(truth["voxel_ijk"])}
    rows = [index[tuple(x)] for x in ijk]
    np.testing.assert_allclose(resp["ncsnr"].values, np.sqrt(truth["signal_variance"][rows]), rtol=1e-6)
    ours = signal_noise(resp["repeat_responses"].values).ncsnr
    theirs = resp["ncsnr"].values
    # ours from 100 images x 3 showings: it follows NSD's across all voxels (noise voxels at 0
    # included); on the driven ones, whose true ncsnr spans only ~0.4-0.65 here, it is unbiased
    # and within its sampling error (~0.1), which a correlation over that narrow range cannot show
    assert np.corrcoef(ours, theirs)[0, 1] > 0.7
    driven = theirs > 0.4
    assert driven.sum() > 50
    assert np.median(ours[driven] / theirs[driven]) == pytest.approx(1.0, abs=0.2)
    assert np.sqrt(np.mean((ours[driven] - theirs[driven]) ** 2)) < 0.15


def test_nifti_and_hdf5_ingests_store_the_same_responses(simulated, tmp_path):
    tmp, cfg_h5 = simulated
    raw = yaml.safe_load(Path(cfg_h5.path).read_text())
    raw["study"]["workdir"] = str(tmp_path / "nifti")
    raw["data"]["nsd"]["betas_file"] = "nifti"
    p = tmp_path / "nifti.yaml"
    p.write_text(yaml.safe_dump(raw))
    cfg = load_config(p)
    ingest(cfg)
    a = StudyStore(cfg.store_path).responses("subj01")
    b = StudyStore(cfg_h5.store_path).responses("subj01")
    np.testing.assert_array_equal(a["responses"].values, b["responses"].values)
    assert a.attrs["nsd_betas_file"] == "nifti" and b.attrs["nsd_betas_file"] == "hdf5"


# --------------------------------------------------------------------------- bad input, at the command line


def test_missing_files_are_listed_at_once_exit_2(simulated, tmp_path, capsys):
    tmp, cfg = simulated
    raw = yaml.safe_load(Path(cfg.path).read_text())
    raw["study"].update(workdir=str(tmp_path / "w"), subjects=["subj01", "subj02", "subj05"])
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    from neurotask.pipeline.cli import main

    assert main(["ingest", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "input file(s) missing" in err and "configs/nsd.yaml" in err
    for want in ("subj05/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session01.hdf5",
                 "subj05/func1pt8mm/roi/prf-visualrois.nii.gz", "freesurfer/subj05/label/floc-places.mgz.ctab",
                 "subj05/func1pt8mm/roi/nsdgeneral.nii.gz", "subj05/func1pt8mm/betas_fithrf_GLMdenoise_RR/ncsnr.nii.gz"):
        assert want in err
    assert not (tmp_path / "w" / "store.zarr").exists()


def test_a_session_of_the_wrong_length_is_named_exit_2(simulated, tmp_path, capsys):
    tmp, cfg = simulated
    raw = yaml.safe_load(Path(cfg.path).read_text())
    raw["study"]["workdir"] = str(tmp_path / "w")
    raw["data"]["nsd"]["trials_per_session"] = 750
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    from neurotask.pipeline.cli import main

    assert main(["ingest", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "subj01: session 1 (" in err and "betas_session01.hdf5) holds 100 trials; NSD sessions hold 750" in err


def test_unknown_roi_label_is_named_exit_2(simulated, tmp_path, capsys):
    tmp, cfg = simulated
    raw = yaml.safe_load(Path(cfg.path).read_text())
    raw["study"]["workdir"] = str(tmp_path / "w")
    raw["data"]["rois"] = ["V1v", "FFA-1"]
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    from neurotask.pipeline.cli import main

    assert main(["ingest", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "subj01: ROI label 'FFA-1' is not in any label table" in err


def test_config_rules_for_nsd(tmp_path):
    from neurotask.pipeline.errors import ConfigError

    for key, value, message in (("rois", None, "data.rois holds BOLD5000's ROI names"),
                                ("betas", "betas.hdf5", "data.nsd.betas must contain {session}"),
                                ("voxel_mask", None, "data.voxels is 'mask' but data.voxel_mask is not set")):
        raw = yaml.safe_load(DEMO.read_text())
        section = raw["data"]["nsd"] if key == "betas" else raw["data"]
        if value is None:
            section.pop(key)
        else:
            section[key] = value
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=message.replace("{", "\\{").replace("}", "\\}")):
            load_config(p)


def test_shipped_nsd_configs_load():
    real = load_config(REPO / "configs" / "nsd.yaml")
    assert real.data.format == "nsd" and real.study.subjects == [f"subj{n:02d}" for n in range(1, 9)]
    demo = load_config(DEMO)
    assert demo.data.nsd.betas_file == "hdf5"
    # featurize reads NSD's imgBrick: a features section is accepted with data.format nsd
    assert demo.features.space_names == ["rgb2depth"] and demo.simulate.write_weights
    assert real.features is not None and real.features.tasks == "all"


# --------------------------------------------------------------------------- featurize from imgBrick


TINY = {"name": "tiny_conv", "kind": "torch_module", "factory": "torch.nn:Conv2d",
        "kwargs": {"in_channels": 3, "out_channels": 4, "kernel_size": 5, "stride": 8},
        "image_size": 64, "pool": 2}


def brick_config(simulated, tmp_path: Path, name: str = "brick", **changes) -> Path:
    """The simulated study (subj01, subj02) with a features section reading its imgBrick: a
    small torch module on the 64 x 64 images, batches of 64 (the last one partial)."""
    _, cfg = simulated
    raw = yaml.safe_load(Path(cfg.path).read_text())
    raw["study"]["workdir"] = str(tmp_path / name)
    raw["study"]["tasks"] = ["rgb2depth", "tiny_conv"]
    raw["features"] = {"tasks": [], "extra": [TINY], "batch_size": 64, "device": "cpu", "torch_threads": 1}
    for key, value in changes.items():
        section, _, leaf = key.rpartition("__")
        node = raw
        for part in section.split("__") if section else []:
            node = node[part]
        node[leaf] = value
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_nsd_study_images_are_the_ingested_images_without_reading_betas(simulated, tmp_path, monkeypatch):
    from neurotask.pipeline.stages.featurize import nsd_study_images

    _, ingested = simulated
    cfg = load_config(brick_config(simulated, tmp_path))

    def no(*args, **kwargs):
        raise AssertionError("betas read")

    monkeypatch.setattr(nsd, "read_session", no)
    monkeypatch.setattr(nsd, "betas_grid_and_trials", no)
    names = nsd_study_images(cfg)
    store = StudyStore(ingested.store_path)
    per_subject = [[str(x) for x in store.responses(s)["image"].values] for s in ("subj01", "subj02")]
    assert len(names) == len(set(names)) == len(set(per_subject[0]) | set(per_subject[1]))
    assert set(names) == set(per_subject[0]) | set(per_subject[1])
    assert names[:len(per_subject[0])] == per_subject[0]  # subject by subject, in order of first showing
    # subj02 stops a session early: images it never saw come from no one's trials
    design = nsd.read_design(ingested.resolve(ingested.data.root) / ingested.data.nsd.design)
    never = set(design.subjectim[1]) - set(design.trial_ids("subj02", 200))
    assert never and not {nsd.image_name(i) for i in never} & set(per_subject[1])


def test_featurize_lists_every_brick_and_design_problem_exit_2(simulated, tmp_path, capsys):
    from neurotask.pipeline.cli import main

    tmp, _ = simulated
    bad = tmp_path / "stimuli.hdf5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("imgBrick", shape=(50, 64, 64, 3), dtype=np.float32)
    p = brick_config(simulated, tmp_path, data__nsd__stimuli=str(bad), features__tasks=["edge2d"],
                     features__weights_dir=str(tmp_path / "no_weights"))
    assert main(["featurize", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot featurize; nothing was done" in err
    assert f"{bad}: imgBrick holds float32 values; expected uint8" in err
    assert f"{bad}: imgBrick has 50 rows (73k ids 1 .. 50);" in err
    from neurotask.pipeline.stages.featurize import nsd_study_images

    n = len(nsd_study_images(load_config(p)))
    assert f"{n} of the study's {n} images are beyond them" in err
    assert f"features.weights_dir {tmp_path / 'no_weights'} does not exist" in err and "edge_texture_encoder-" in err
    assert not (tmp_path / "brick" / "store.zarr").exists()

    # the design and a subject's betas missing, and no stimulus file: all in one message
    p = brick_config(simulated, tmp_path, study__subjects=["subj01", "subj05"])
    assert main(["featurize", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "subj05: betas file(s) missing, so the images of its trials are unknown" in err
    assert "betas_session01.hdf5" in err
    p = brick_config(simulated, tmp_path, data__nsd__design="none.mat", data__nsd__stimuli="none.hdf5")
    assert main(["featurize", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "NSD design file not found" in err and "stimulus file not found" in err and "none.hdf5" in err


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        yield c


@pytest.mark.slow
def test_featurize_from_the_brick_resumes_after_a_fault_and_equals_the_direct_features(simulated, tmp_path, client):
    import torch

    from neurotask.pipeline.features.image_source import read_brick_images
    from neurotask.pipeline.features.spaces import extract_batch
    from neurotask.pipeline.stages.featurize import (FAULT_ENV, FeaturizeError, all_done, featurize, load_space,
                                                     make_batches, nsd_study_images, stimuli_path, study_feature_spaces)
    from neurotask.storage import Stage

    cfg = load_config(brick_config(simulated, tmp_path))
    names = nsd_study_images(cfg)
    batches = make_batches(len(names), 64)
    assert len(batches) == 3 and batches[-1].stop - batches[-1].start < 64
    client.run(lambda: os.environ.__setitem__(FAULT_ENV, "1"))  # batch 1 writes its rows, then fails
    try:
        with pytest.raises(FeaturizeError, match=r"batch 1 \(images 64-127\).*injected fault"):
            featurize(cfg, client)
    finally:
        client.run(lambda: os.environ.pop(FAULT_ENV, None))
    progress = StudyStore(cfg.store_path).progress()
    assert progress.done_units(Stage.FEATURIZE, "tiny_conv") == {"00000", "00002"}
    assert not all_done(cfg)
    report = featurize(cfg, client)
    assert (report.batches, report.computed, report.skipped) == (1, 1, 2)
    assert all_done(cfg)

    store = StudyStore(cfg.store_path)
    feats = store.read_features("tiny_conv")
    assert [str(x) for x in feats["image"].values] == names
    attrs = store.feature_attrs("tiny_conv")["featurize"]
    assert attrs["images"] == len(names)
    assert attrs["source"] == {"kind": "hdf5_brick", "file": "nsd_stimuli.hdf5", "dataset": "imgBrick",
                               "shape": [73000, 64, 64, 3], "dtype": "uint8"}
    extractor = load_space(study_feature_spaces(cfg)[0], torch.device("cpu"), True)
    for b in batches:  # the same rows read here and fed to the same module
        batch_names = names[b.start:b.stop]
        rows = [nsd.image_id(n) - 1 for n in batch_names]
        want = extract_batch(read_brick_images(stimuli_path(cfg), rows, batch_names), batch_names, [extractor])
        np.testing.assert_array_equal(feats.values[b.start:b.stop], want["tiny_conv"])


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_demo_runs_end_to_end_through_the_installed_command(tmp_path):
    """simulate -> featurize (rgb2depth, from the simulated imgBrick, random encoder) ->
    ingest -> fit -> analyse -> report."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["study"]["workdir"] = str(tmp_path / "run")
    raw["data"]["root"] = str(tmp_path / "run" / "raw" / "nsd")
    raw["features"]["weights_dir"] = str(tmp_path / "run" / "weights")
    raw["cluster"]["dashboard_address"] = "127.0.0.1:0"
    p = tmp_path / "nsd_demo.yaml"
    p.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "neurotask", "run", "--config", str(p)], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "report" / "index.html").is_file()
    store = StudyStore(tmp_path / "run" / "store.zarr")
    images: set[str] = set()
    for s in raw["study"]["subjects"]:
        resp = store.responses(s)
        assert 0 < int(resp["shared"].sum()) < 100
        images |= {str(x) for x in resp["image"].values}
    assert "brain vs Taskonomy task similarity" in out.stdout + out.stderr
    featurized = raw["features"]["tasks"]
    for task in featurized:  # from the brick: exactly the images some subject's trials show
        attrs = store.feature_attrs(task)
        assert attrs["kind"] == "taskonomy" and attrs["featurize"]["source"]["kind"] == "hdf5_brick"
        feats = store.read_features(task)
        assert {str(x) for x in feats["image"].values} == images and np.isfinite(feats.values).all()
        assert np.isfinite(store.results("subj01")["r"].sel(task=task).values).mean() > 0.99
    simulated = [t for t in store.feature_tasks() if t not in featurized]
    assert simulated and all(store.feature_attrs(t)["source"] == "simulated" for t in simulated)


def test_voxels_by_roi_labels_carry_their_labels(simulated, tmp_path):
    tmp, cfg_h5 = simulated
    raw = yaml.safe_load(Path(cfg_h5.path).read_text())
    raw["study"].update(workdir=str(tmp_path / "rois"), subjects=["subj01", "subj02"])
    raw["data"].update(voxels="rois", rois=["PPA", "OPA", "prf-visualrois:V1v", "streams:lateral"])
    raw["data"].pop("voxel_mask")
    raw["data"]["nsd"].update(roi_files=["prf-visualrois", "floc-places", "streams"], ncsnr=None)
    p = tmp_path / "rois.yaml"
    p.write_text(yaml.safe_dump(raw))
    cfg = load_config(p)
    ingest(cfg)
    resp = StudyStore(cfg.store_path).responses("subj01")
    truth = np.load(cfg_h5.workdir / "raw" / "ground_truth" / "subj01.npz")
    roi_of = {tuple(x): str(r) for x, r in zip(truth["voxel_ijk"], truth["roi"])}
    ijk = np.stack([resp[c].values for c in ("voxel_i", "voxel_j", "voxel_k")], axis=1)
    labels = [str(r) for r in resp["roi"].values]
    assert set(labels) == {"PPA", "OPA", "prf-visualrois:V1v", "streams:lateral"}
    for x, label in zip(ijk, labels):  # the simulator's regions behind NSD's labels
        want = {"PPA": "PPA", "OPA": "OPA", "prf-visualrois:V1v": "EarlyVis", "streams:lateral": "LOC"}[label]
        assert roi_of[tuple(x)][2:] == want
    assert "ncsnr" not in resp.coords
