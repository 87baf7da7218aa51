"""The simulated study is written in BOLD5000's formats, and ingest reads it back correctly."""


import nibabel as nib
import numpy as np
import pytest

from conftest import small_config_dict, write_config
from neurotask.pipeline.formats import bold5000
from neurotask.pipeline import cli
from neurotask.pipeline.config import load_config
from neurotask.pipeline.errors import DataError
from neurotask.pipeline.stages.ingest import ingest
from neurotask.pipeline.stages.simulate import simulate_study
from neurotask.storage import Progress, StudyStore


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    cfg = load_config(write_config(d / "s.yaml", small_config_dict(d / "w", study={"subjects": ["CSI1"]})))
    simulate_study(cfg)
    return cfg


def test_files_follow_bold5000_formats(simulated):
    cfg = simulated
    stim = bold5000.read_stim_list(cfg.data_path(cfg.data.stim_list, "CSI1"))
    sim = cfg.simulate
    assert stim.n_trials == sim.n_images + sim.n_repeated * (sim.n_showings - 1)
    # every repeated image has exactly one unprefixed showing, the others carry rep_
    names, counts = np.unique(stim.images, return_counts=True)
    assert (counts > 1).sum() == sim.n_repeated
    assert set(np.unique(stim.images[~stim.is_rep])) == set(names)
    assert stim.is_rep.sum() == sim.n_repeated * (sim.n_showings - 1)
    # ... and the unprefixed showing is not always the first one, as in the real lists
    first_is_kept = [not stim.is_rep[np.flatnonzero(stim.images == n)[0]] for n in names[counts > 1]]
    assert 0 < np.mean(first_is_kept) < 1
    sessions = [cfg.data_path(cfg.data.betas, "CSI1", session=s) for s in (1, 2)]
    imgs = [nib.load(str(p)) for p in sessions]
    assert all(i.ndim == 4 and i.get_data_dtype() == np.float32 for i in imgs)
    assert sum(i.shape[3] for i in imgs) == stim.n_trials
    brain = nib.load(str(cfg.data_path(cfg.data.brain_mask, "CSI1"))).get_fdata() > 0
    vol = np.asarray(imgs[0].dataobj)
    assert np.isnan(vol[~brain]).all()
    for roi in cfg.data.rois:
        m = nib.load(str(cfg.data_path(cfg.data.roi_masks, "CSI1", roi=roi))).get_fdata() > 0
        assert m.any() and not (m & ~brain).any()


def test_ingest_exclude_and_average(simulated, tmp_path):
    cfg = simulated
    ingest(cfg)
    store = StudyStore(cfg.store_path)
    resp = store.responses("CSI1")
    truth = np.load(cfg.workdir / "raw/ground_truth/CSI1.npz")
    assert resp.sizes["image"] == cfg.simulate.n_images
    # one NaN voxel dropped and reported, the constant one kept
    assert resp.sizes["voxel"] == len(truth["voxel_ijk"]) - 1
    assert resp.attrs["dropped_nonfinite_voxels"] == 1 and resp.attrs["constant_voxels"] == 1
    ijk = np.stack([resp[c].values for c in ("voxel_i", "voxel_j", "voxel_k")], 1)
    assert not (ijk == truth["nan_voxel"]).all(1).any()
    # ROI labels match the masks
    for roi in ("LHPPA", "RHEarlyVis"):
        m = nib.load(str(cfg.data_path(cfg.data.roi_masks, "CSI1", roi=roi))).get_fdata() > 0
        labelled = ijk[resp["roi"].values == roi]
        assert m[tuple(labelled.T)].all() and len(labelled) == m.sum()
    # z-scored within session: the trial-level data of each session have mean 0, sd 1; with
    # 'exclude' the image rows are a subset of trials, so their per-session mean is near 0
    Y = resp["responses"].values
    sess = resp["session"].values
    for s in (1, 2):
        assert abs(np.nanmean(Y[sess == s], 0)).max() < 0.35
    # the repeated images' single trials are kept for noise ceilings
    reps = resp["repeat_responses"].values
    assert reps.shape == (cfg.simulate.n_showings, cfg.simulate.n_repeated, resp.sizes["voxel"])
    # 'average': same images, repeated ones averaged over their showings
    cfg_avg = load_config(write_config(tmp_path / "a.yaml", small_config_dict(
        tmp_path / "avg", study={"subjects": ["CSI1"]}, data={"repeats": "average"})))
    import shutil
    shutil.copytree(cfg.workdir / "raw", tmp_path / "avg" / "raw")
    ingest(cfg_avg)
    avg = StudyStore(cfg_avg.store_path).responses("CSI1")
    assert sorted(avg["image"].values) == sorted(resp["image"].values)
    name = str(avg["repeated_image"].values[0])
    row = avg["responses"].sel(image=name).values
    np.testing.assert_allclose(row, np.nanmean(avg["repeat_responses"].values[:, 0], 0), rtol=1e-5, atol=1e-6)
    assert int(avg["n_showings"].sel(image=name)) == cfg.simulate.n_showings


def test_ingest_is_skipped_when_done(simulated, logs):
    ingest(simulated)
    assert any("already ingested" in m for m in logs)


def test_missing_files_are_listed_at_once(simulated, tmp_path, capsys):
    cfg = small_config_dict(tmp_path / "w", study={"subjects": ["CSI1", "CSI2"]})
    path = write_config(tmp_path / "m.yaml", cfg)
    code = cli.main(["ingest", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for s in ("CSI1", "CSI2"):
        assert f"raw/{s}/CSI0{s[-1]}_stim_lists.txt" in err and f"sub-{s}_mask-LHPPA" in err


def test_trial_count_mismatch_is_an_error_and_store_untouched(simulated, tmp_path):
    import shutil
    work = tmp_path / "w"
    shutil.copytree(simulated.workdir / "raw", work / "raw")
    stim = work / "raw/CSI1/CSI01_stim_lists.txt"
    stim.write_text("\n".join(stim.read_text().splitlines()[:-5]) + "\n")
    cfg = load_config(write_config(tmp_path / "t.yaml", small_config_dict(work, study={"subjects": ["CSI1"]})))
    with pytest.raises(DataError, match=r"betas hold \d+ trials .* stimulus list .* has \d+ lines"):
        ingest(cfg)
    assert not StudyStore(cfg.store_path).has("responses/CSI1")


def test_session_gap_is_reported(simulated, tmp_path):
    import shutil
    work = tmp_path / "w"
    shutil.copytree(simulated.workdir / "raw", work / "raw")
    # three sessions with the middle one missing
    s2 = work / "raw/CSI1/CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_ses-02.nii.gz"
    s2.rename(work / "raw/CSI1/CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_ses-03.nii.gz")
    cfg = load_config(write_config(tmp_path / "g.yaml", small_config_dict(work, study={"subjects": ["CSI1"]})))
    with pytest.raises(DataError, match="ses-02"):
        ingest(cfg)


def test_progress_markers_ignore_other_stores(tmp_path):
    p = Progress(tmp_path / "progress", "store-a")
    p.mark_done("fit", "CSI1", "edge2d", "00001", info={"voxels": 3})
    assert p.is_done("fit", "CSI1", "edge2d", "00001")
    assert Progress(tmp_path / "progress", "store-b").done_units("fit", "CSI1", "edge2d") == set()
    (tmp_path / "progress/fit/CSI1/edge2d/00002.json").write_text("{trunc")  # a torn write
    assert p.done_units("fit", "CSI1", "edge2d") == {"00001"}
