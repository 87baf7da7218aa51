"""Ingest of BOLD5000 as downloaded, on synthetic files in the exact released formats, laid out
as configs/bold5000.yaml documents: values, voxel sets and orders, both formats, every error
path leaving the store as it was, and peak memory about one session."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml

from neurotask.pipeline.formats import bold5000 as b5
from neurotask.pipeline.config import load_config
from neurotask.pipeline.errors import ConfigError, DataError
from neurotask.pipeline.stages.ingest import ingest, validate_layout
from neurotask.pipeline.report.volumes import subject_maps
from neurotask.storage import StudyStore, mask_to_ijk
from bold5000_files import (REFERENCE, write_events_for, write_glmsingle_subject, write_nifti,
                                  write_release1_subject, write_roi_mat, write_stim_list)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bold5000.yaml"
EVENTS = "ds001499/sub-{subject}/ses-{session:02d}/func/sub-{subject}_ses-{session:02d}_task-5000scenes_run-{run:02d}_events.tsv"


def make_cfg(tmp_path: Path, subjects=("CSI1",), **data):
    return load_config(CONFIG, overrides={
        "study": {"workdir": str(tmp_path / "work"), "subjects": list(subjects)},
        "data": {"root": str(tmp_path / "data"), **data}})


def zscore(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.mean(0)) / a.std(0)


def expected_trials(s, ijk: np.ndarray, zscored: bool = True) -> np.ndarray:
    """(n_trials, v) from the written sessions, each session z-scored per voxel."""
    parts = [vol[ijk[:, 0], ijk[:, 1], ijk[:, 2], :].T for vol in s.sessions]
    return np.concatenate([zscore(p) if zscored else p for p in parts])


def snapshot(cfg, subject: str) -> tuple[dict[str, str], bytes]:
    """Hashes of every file of responses/<subject> and the ingest marker's bytes."""
    root = cfg.store_path / "responses" / subject
    files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file()}
    assert files
    return files, (cfg.workdir / "progress" / "ingest" / f"{subject}.json").read_bytes()


def marker_valid(cfg, subject: str) -> bool:
    store = StudyStore(cfg.store_path)
    return store.progress().is_done("ingest", subject)


# --------------------------------------------------------------------------- layout


def test_documented_layout_lists_every_missing_file_at_once(tmp_path, capsys):
    cfg = make_cfg(tmp_path, ("CSI1", "CSI2"), sessions=3, events=EVENTS)
    write_glmsingle_subject(cfg, "CSI1", events=True)
    s2 = write_glmsingle_subject(cfg, "CSI2", seed=1, spelling="released", events=True)
    assert set(validate_layout(cfg)) == {"CSI1", "CSI2"}  # released spellings are found
    gone = [s2.paths["ses2"], s2.paths["roi:LHPPA"], s2.paths["stim"],
            Path(str(s2.paths["ses3"]).replace("CSI2_", "CSI1_"))]
    gone.append(tmp_path / "data" / EVENTS.format(subject="CSI1", session=2, run=1))
    for p in gone:
        p.unlink()
    with pytest.raises(DataError) as e:
        validate_layout(cfg)
    msg = str(e.value)
    assert msg.startswith("5 input file(s) missing")
    for p in gone:
        assert str(p) in msg
    # The same from the command line, without a traceback, exit status 2.
    raw = yaml.safe_load(CONFIG.read_text())
    raw["study"].update(workdir=str(tmp_path / "work"), subjects=["CSI1", "CSI2"])
    raw["data"].update(root=str(tmp_path / "data"), sessions=3, events=EVENTS)
    path = tmp_path / "bold5000.yaml"
    path.write_text(yaml.safe_dump(raw))
    from neurotask.pipeline.cli import main
    assert main(["ingest", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(str(p) in err for p in gone)
    assert not (tmp_path / "work" / "store.zarr").exists()


def test_missing_variant_spelling_is_named(tmp_path):
    cfg = make_cfg(tmp_path)
    s = write_glmsingle_subject(cfg, "CSI1", spelling="released")
    s.paths["roi:RHRSC"].unlink()
    with pytest.raises(DataError, match=r"sub-CSI1_mask-RHRSC.nii.gz \(also looked for the spelling RHRRSC\)"):
        validate_layout(cfg)


def test_shipped_config_loads_and_names_its_placeholder_root(tmp_path):
    cfg = load_config(CONFIG)
    assert cfg.data.format == "glmsingle" and cfg.data.repeats == "exclude" and cfg.data.trs == [3, 4]
    with pytest.raises(DataError) as e:
        validate_layout(cfg)
    assert "/path/to/BOLD5000/CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_ses-01.nii.gz" in str(e.value)
    assert "/path/to/BOLD5000/spm/sub-CSI3/sub-CSI3_mask-RHLOC.nii.gz (also looked for the spelling RHLO)" in str(e.value)


@pytest.mark.parametrize("data, message", [
    ({"voxels": "mask"}, "data.voxels is 'mask' but data.voxel_mask is not set"),
    ({"format": "release1_rois"}, "data.voxels must be 'rois' with data.format 'release1_rois'"),
    ({"format": "release1_rois", "voxels": "rois", "voxel_order": "authors_zyx"}, "'authors_zyx' needs volumes"),
    ({"trs": [3, 6]}, r"data.trs must be distinct TRs among 1, 2, 3, 4, 5, 34"),
    ({"trs": []}, r"data.trs must be distinct TRs"),
    ({"events": "sub-{subject}_ses-{session}_events.tsv"}, r"data.events must contain \{session\} and \{run\}"),
    ({"betas": "CSI{n}_betas.nii.gz"}, r"data.betas must contain \{session\}"),
    ({"voxels": "rois", "rois": []}, "data.rois is empty"),
    ({"rois": ["LHPPA", "LHPPA"]}, "data.rois has duplicates"),
    ({"format": "nifti"}, r"data.format: expected 'glmsingle', 'release1_rois' or 'nsd'"),
])
def test_data_config_checks(tmp_path, data, message):
    from neurotask.pipeline.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        make_cfg(tmp_path, **data)


def test_unknown_template_placeholder_is_named(tmp_path):
    cfg = make_cfg(tmp_path, stim_list="CSI{n}_{session}_imgnames.txt")
    with pytest.raises(ConfigError, match=r"data.stim_list 'CSI\{n\}_\{session\}_imgnames.txt': cannot fill"):
        validate_layout(cfg)


def test_relative_root_is_relative_to_the_config_file(tmp_path):
    raw = yaml.safe_load(CONFIG.read_text())
    raw["data"]["root"] = "downloads/BOLD5000"
    raw["study"]["subjects"] = ["CSI1"]
    path = tmp_path / "configs" / "b.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    write_glmsingle_subject(cfg, "CSI1")
    assert (tmp_path / "configs" / "downloads" / "BOLD5000" / "CSI1_brainmask.nii.gz").is_file()
    assert set(validate_layout(cfg)) == {"CSI1"}


# --------------------------------------------------------------------------- glmsingle values


@pytest.mark.parametrize("repeats", ["exclude", "average"])
def test_glmsingle_responses_are_zscored_sessions_of_the_betas(tmp_path, repeats):
    cfg = make_cfg(tmp_path, repeats=repeats, events=EVENTS, chunk_size=64)
    s = write_glmsingle_subject(cfg, "CSI1", events=True)
    summary = ingest(cfg)["CSI1"]
    ds = StudyStore(cfg.store_path).responses("CSI1").load()
    ijk = np.stack([ds.voxel_i.values, ds.voxel_j.values, ds.voxel_k.values], axis=1)
    # Brain voxels in ijk order, less the one NaN in a trial of session 2.
    brain_ijk = mask_to_ijk(s.brain, "ijk")
    nan = np.array(s.paths["nan_voxel"])
    np.testing.assert_array_equal(ijk, brain_ijk[~(brain_ijk == nan).all(1)])
    assert ds.attrs["dropped_nonfinite_voxels"] == 1 and ds.attrs["dropped_nonfinite_ijk"] == [nan.tolist()]
    assert summary["voxels"] == len(ijk) and summary["dropped_nonfinite_voxels"] == 1
    trials = expected_trials(s, ijk)
    stim = b5.read_stim_list(s.paths["stim"])
    names, groups = b5.image_trials(stim, repeats)
    assert list(ds.image.values) == names
    expect = np.stack([trials[g].mean(0) for g in groups])
    np.testing.assert_allclose(ds.responses.values, expect, atol=2e-5)
    if repeats == "exclude":  # the unprefixed showing of each repeated image
        assert len(names) == 60 and all(not stim.is_rep[g[0]] for g in groups)
    assert list(ds.n_showings.values) == [g.size for g in groups]
    sess = np.repeat([1, 2, 3], s.session_trials)
    assert list(ds.session.values) == [sess[g[0]] for g in groups]
    # Single trials of the repeated images, NaN-padded.
    rep_names, rep_trials = b5.repeated_trials(stim)
    assert list(ds.repeated_image.values) == rep_names
    for j in range(len(rep_names)):
        for k, t in enumerate(rep_trials[:, j]):
            got = ds.repeat_responses.values[k, j]
            if t < 0:
                assert np.isnan(got).all()
            else:
                np.testing.assert_allclose(got, trials[t], atol=2e-5)
    # ROI labels from the masks (first listed wins on overlaps), geometry from the brain mask.
    for v in range(0, len(ijk), 7):
        inside = [r for r in cfg.data.rois if s.rois[r][tuple(ijk[v])]]
        assert ds.roi.values[v] == (inside[0] if inside else "")
    assert ds.attrs["volume_shape"] == [10, 12, 9] and ds.attrs["affine"][0][0] == -2.0
    assert ds.attrs["affine_source"] == "mask file"
    assert ds.attrs["events_checked"] and ds.attrs["trials_per_session"] == s.session_trials
    assert not (cfg.workdir / "staging").exists()


def test_derived_brain_mask_is_the_voxels_finite_in_every_session(tmp_path):
    cfg = make_cfg(tmp_path, brain_mask=None, voxel_order="authors_zyx")
    s = write_glmsingle_subject(cfg, "CSI1")
    assert "brain_mask" not in s.paths
    ingest(cfg)
    ds = StudyStore(cfg.store_path).responses("CSI1").load()
    finite = np.all([np.isfinite(v).all(-1) for v in s.sessions], axis=0)
    ijk = np.stack([ds.voxel_i.values, ds.voxel_j.values, ds.voxel_k.values], axis=1)
    np.testing.assert_array_equal(ijk, mask_to_ijk(finite, "authors_zyx"))
    np.testing.assert_allclose(ds.responses.values, expected_trials(s, ijk)[np.concatenate(
        b5.image_trials(b5.read_stim_list(s.paths["stim"]), "exclude")[1])], atol=2e-5)
    assert ds.attrs["voxel_selection"].startswith("derived") and "unreliable" in ds.attrs["affine_source"]


def test_roi_voxels_with_the_released_mask_spellings(tmp_path, logs):
    cfg = make_cfg(tmp_path, ("CSI2",), voxels="rois", zscore_sessions=False)
    s = write_glmsingle_subject(cfg, "CSI2", seed=3, spelling="released")
    assert s.paths["roi:RHRSC"].name == "sub-CSI2_mask-RHRRSC.nii.gz"
    logs.clear()
    ingest(cfg)
    assert any("sub-CSI2_mask-RHRRSC.nii.gz (the released spelling)" in m for m in logs)
    ds = StudyStore(cfg.store_path).responses("CSI2").load()
    union = np.any(list(s.rois.values()), axis=0)
    ijk = np.stack([ds.voxel_i.values, ds.voxel_j.values, ds.voxel_k.values], axis=1)
    np.testing.assert_array_equal(ijk, mask_to_ijk(union, "ijk"))
    assert set(ds.roi.values) == set(cfg.data.rois)  # canonical names, whatever the file spelling
    for v, x in enumerate(ijk):
        assert ds.roi.values[v] == next(r for r in cfg.data.rois if s.rois[r][tuple(x)])
    np.testing.assert_allclose(ds.responses.values, expected_trials(s, ijk, zscored=False)[np.concatenate(
        b5.image_trials(b5.read_stim_list(s.paths["stim"]), "exclude")[1])], atol=1e-6)


def test_release2_imgnames_list_keeps_the_first_showing_and_says_so(tmp_path, logs):
    cfg = make_cfg(tmp_path, stim_list="CSI{n}_imgnames.txt")
    s = write_glmsingle_subject(cfg, "CSI1", rep_prefix=False)
    logs.clear()
    ingest(cfg)
    assert any("keeps the FIRST showing" in m for m in logs)
    ds = StudyStore(cfg.store_path).responses("CSI1")
    first = {}
    for t, i in enumerate(s.trial_image):
        first.setdefault(s.names[i], t)
    assert list(ds.image.values) == sorted(first, key=first.get)
    assert ds.attrs["stim_list_rep_prefix"] is False


def test_authors_voxel_order_equals_the_published_cortical_order(tmp_path):
    """The CSI1 cortical mask of the authors' results, written as a NIfTI on the betas' grid:
    voxel j of the store is column j of their r."""
    mask_zyx = np.load(REFERENCE / "published" / "CSI1.npz")["cortical_mask_zyx"].astype(bool)
    mask = mask_zyx.transpose(2, 1, 0)
    assert mask.shape == (71, 89, 72)
    cfg = make_cfg(tmp_path, voxels="mask", voxel_mask="cortex/CSI{n}_cortical_mask.nii.gz",
                   voxel_order="authors_zyx", zscore_sessions=False, rois=[])
    write_nifti(tmp_path / "data" / "cortex" / "CSI1_cortical_mask.nii.gz", mask.astype(np.uint8))
    # Each voxel's beta is its linear index in (z, y, x) C order, plus the trial number.
    zyx_index = np.arange(mask.size, dtype=np.float32).reshape(mask_zyx.shape).transpose(2, 1, 0)
    for session in (1, 2):
        vol = np.stack([zyx_index + t for t in (2 * session - 2, 2 * session - 1)], axis=-1)
        write_nifti(tmp_path / "data" / cfg.data.betas.format(n=1, session=session), vol.astype(np.float32))
    write_stim_list(tmp_path / "data" / cfg.data.stim_list.format(n=1), [f"scene{i}.jpg" for i in range(4)])
    ingest(cfg)
    ds = StudyStore(cfg.store_path).responses("CSI1")
    assert ds.sizes["voxel"] == 54894 == int(mask.sum())
    authors = np.flatnonzero(mask_zyx)  # position j of vol_zyx[mask_zyx]
    got = ds.responses.values
    for t in range(4):
        np.testing.assert_array_equal(got[t], authors + t)
    vol_zyx = np.arange(mask.size).reshape(mask_zyx.shape)
    ijk = np.stack([ds.voxel_i.values, ds.voxel_j.values, ds.voxel_k.values], axis=1)
    np.testing.assert_array_equal(vol_zyx[ijk[:, 2], ijk[:, 1], ijk[:, 0]], vol_zyx[mask_zyx])


# --------------------------------------------------------------------------- release-1.0 ROI files


def test_release1_rois_average_of_tr3_and_tr4(tmp_path):
    cfg = make_cfg(tmp_path, format="release1_rois", voxels="rois", events=EVENTS, chunk_size=16)
    s = write_release1_subject(cfg, "CSI1")
    s.session_trials = [30, 26, 20]
    write_events_for(cfg, s, np.random.default_rng(5))
    ingest(cfg)
    ds = StudyStore(cfg.store_path).responses("CSI1").load()
    rois = cfg.data.rois
    raw = np.concatenate([(s.roi_data[3][r] + s.roi_data[4][r]) / 2 for r in rois], axis=1)
    bounds = np.cumsum([0] + s.session_trials)
    trials = np.concatenate([zscore(raw[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
    names, groups = b5.image_trials(b5.read_stim_list(s.paths["stim"]), "exclude")
    np.testing.assert_allclose(ds.responses.values, trials[np.concatenate(groups)], atol=2e-5)
    # Coordinates: (ROI index, column within the ROI, -1), the ROI label kept.
    sizes = [s.roi_data[3][r].shape[1] for r in rois]
    assert list(ds.roi.values) == [r for r, n in zip(rois, sizes) for _ in range(n)]
    assert list(ds.voxel_i.values) == [a for a, n in enumerate(sizes) for _ in range(n)]
    assert list(ds.voxel_j.values) == [j for n in sizes for j in range(n)]
    assert (ds.voxel_k.values == -1).all()
    assert ds.attrs["voxel_space"] == "roi_index" and ds.attrs["trs"] == [3, 4]
    assert "volume_shape" not in ds.attrs and "affine" not in ds.attrs  # no volume: no maps, no NIfTI


def test_release1_rois_are_usable_by_fit(tmp_path):
    """A real subject's stimulus list (5254 trials, sessions from BOLD5000's run table), the
    released TR34 file, and a fit unit run on the stored chunk."""
    from neurotask.pipeline.stages.fit import Unit, alpha_grid, build_decomposition, fit_unit

    cfg = make_cfg(tmp_path, format="release1_rois", voxels="rois", trs=[34], chunk_size=40)
    lines = (REFERENCE / "bold5000" / "stim_lists" / "CSI01_stim_lists.txt").read_text().split()
    write_stim_list(tmp_path / "data" / cfg.data.stim_list.format(n=1), lines)
    rng = np.random.default_rng(0)
    images = sorted({ln.removeprefix("rep_") for ln in lines})
    latent = {name: rng.standard_normal(4) for name in images}
    X = np.stack([latent[ln.removeprefix("rep_")] for ln in lines])
    data = {r: X @ rng.standard_normal((4, 6)) + 0.5 * rng.standard_normal((len(lines), 6)) for r in b5.ROI_NAMES}
    write_roi_mat(tmp_path / "data" / cfg.data.roi_mat.format(n=1, tr=34), data)
    ingest(cfg)
    store = StudyStore(cfg.store_path)
    ds = store.responses("CSI1")
    assert ds.sizes["image"] == 4916 and ds.sizes["voxel"] == 60
    assert ds.attrs["trials_per_session"] == b5.known_session_trials("CSI1", 5254)
    task = cfg.tasks[0]
    store.write_features(task, np.stack([latent[n] for n in images]) + 0.1 * rng.standard_normal((len(images), 4)), images)
    spec = cfg.fit
    order = store.ensure_results("CSI1", [task], spec.fingerprint(), task_labels=[task], permutation=spec.permutation)
    dec = build_decomposition(spec, store, "CSI1", task)
    unit = Unit("CSI1", task, order.index(task), 0, 0, 40)
    fit_unit(spec, unit, store, dec, alpha_grid(spec, 4))
    r = store.read_result("CSI1", "r", 0)[:40]
    assert np.isfinite(r).all() and (r > 0.5).all()  # responses are driven by the features
    assert subject_maps("CSI1", store.results("CSI1")) is None  # ROI-index voxels: no volume maps


def test_release1_zscoring_without_session_boundaries_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, format="release1_rois", voxels="rois")
    write_release1_subject(cfg, "CSI1", trs=(3, 4))
    with pytest.raises(DataError, match="zscore_sessions needs the session boundaries.*data.events"):
        ingest(cfg)
    assert not (tmp_path / "work" / "store.zarr").exists()


# --------------------------------------------------------------------------- errors leave the store as it was


def _break(kind: str, cfg, s) -> str:
    """Damage subject ``s``'s files; -> a regex the error message must match."""
    if kind == "missing session":
        s.paths["ses3"].unlink()
        return r"1 input file\(s\) missing.*CSI2_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_ses-03.nii.gz"
    if kind == "wrong trial count":
        write_stim_list(s.paths["stim"], s.lines + ["rep_" + s.lines[0].removeprefix("rep_")])
        return r"CSI2: the betas hold 76 trials \(26 \+ 25 \+ 25 in 3 sessions\) but the stimulus list .* has 77 lines"
    if kind == "mismatched events":
        path = Path(cfg.data.root) / EVENTS.format(subject="CSI2", session=2, run=2)
        lines = path.read_text().splitlines()
        fields = lines[4].split("\t")
        fields[6] = "kitchen99.jpg"
        lines[4] = "\t".join(fields)
        path.write_text("\n".join(lines) + "\n")
        t = 26 + 9 + 4  # session 1, run 1 of session 2, then trial 4
        return rf"CSI2: events and stimulus list differ first at trial {t} .*session 2, run 2, trial 4.*'kitchen99.jpg'"
    if kind == "corrupt nifti":
        p = s.paths["ses2"]
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return r"cannot read trial volume \d+ of NIfTI .*CSI2_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_ses-02.nii.gz \(corrupt or truncated\?\)"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing session", "wrong trial count", "mismatched events", "corrupt nifti"])
def test_a_failing_subject_leaves_the_store_as_it_was(tmp_path, kind):
    cfg_a = make_cfg(tmp_path, ("CSI1",), events=EVENTS, sessions=3)
    write_glmsingle_subject(cfg_a, "CSI1", events=True)
    ingest(cfg_a)
    before = snapshot(cfg_a, "CSI1")
    cfg_ab = make_cfg(tmp_path, ("CSI1", "CSI2"), events=EVENTS, sessions=3)
    s2 = write_glmsingle_subject(cfg_ab, "CSI2", seed=2, events=True)
    pattern = _break(kind, cfg_ab, s2)
    with pytest.raises(DataError, match="(?s)" + pattern):
        ingest(cfg_ab)
    assert snapshot(cfg_a, "CSI1") == before and marker_valid(cfg_a, "CSI1")
    store = StudyStore(cfg_a.store_path)
    assert store.subjects() == ["CSI1"]
    assert not store.progress().is_done("ingest", "CSI2")
    assert not (cfg_a.workdir / "staging").exists()


def test_a_failing_reingest_keeps_the_subject_and_its_results(tmp_path, logs):

    cfg = make_cfg(tmp_path)
    s = write_glmsingle_subject(cfg, "CSI1")
    ingest(cfg)
    store = StudyStore(cfg.store_path)
    progress = store.progress()
    store.ensure_results("CSI1", cfg.tasks[:1], cfg.fit.fingerprint(), task_labels=cfg.tasks[:1])
    progress.mark_done("fit", "CSI1", cfg.tasks[0], "00000")
    before = snapshot(cfg, "CSI1")
    good = s.paths["ses3"].read_bytes()
    s.paths["ses3"].write_bytes(good[: len(good) * 3 // 4])
    with pytest.raises(DataError, match="ses-03.nii.gz .corrupt or truncated"):
        ingest(cfg, overwrite=True)
    assert snapshot(cfg, "CSI1") == before and marker_valid(cfg, "CSI1")
    assert store.has("results/CSI1") and progress.is_done("fit", "CSI1", cfg.tasks[0], "00000")
    # Other settings without --overwrite are refused; the same ones are skipped.
    with pytest.raises(DataError, match="CSI1 was ingested with data.repeats='exclude'; the config .* asks for data.repeats='average'. Use `neurotask ingest --overwrite`"):
        ingest(make_cfg(tmp_path, repeats="average"))
    logs.clear()
    ingest(cfg)
    assert logs == ["CSI1: already ingested, skipped"] and snapshot(cfg, "CSI1") == before
    # Repaired, --overwrite replaces the subject and discards its results.
    s.paths["ses3"].write_bytes(good)
    ingest(make_cfg(tmp_path, repeats="average"), overwrite=True)
    assert marker_valid(cfg, "CSI1") and not store.has("results/CSI1")
    assert not progress.is_done("fit", "CSI1", cfg.tasks[0], "00000")
    assert store.responses("CSI1").attrs["repeats"] == "average"


def test_a_write_failing_half_way_keeps_the_old_subject(tmp_path, monkeypatch, logs):
    """A failure while the new responses are written (disk full, a kill) happens beside the
    old ones (staged overwrite): the old subject, its marker and its results stay as they
    were; a rerun of the overwrite then replaces it."""
    cfg = make_cfg(tmp_path, chunk_size=64)
    write_glmsingle_subject(cfg, "CSI1")
    ingest(cfg)
    before = snapshot(cfg, "CSI1")
    calls = []
    original = StudyStore.write_responses

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StudyStore, "write_responses", failing)
    with pytest.raises(OSError, match="No space left"):
        ingest(cfg, overwrite=True)
    assert snapshot(cfg, "CSI1") == before and marker_valid(cfg, "CSI1")
    monkeypatch.setattr(StudyStore, "write_responses", original)
    logs.clear()
    ingest(cfg, overwrite=True)
    assert logs[0].startswith("CSI1: ingesting") and marker_valid(cfg, "CSI1")
    assert snapshot(cfg, "CSI1")[0] == before[0]  # the same inputs: the same responses


# --------------------------------------------------------------------------- memory


def test_peak_memory_is_about_one_session_not_the_dataset(tmp_path):
    """Six sessions: the traced peak (NumPy and Python allocations; the staging file is on
    disk) stays below one session's size while the dataset is six."""
    warm = make_cfg(tmp_path / "warm")
    write_glmsingle_subject(warm, "CSI1")
    ingest(warm)  # imports and first-use caches outside the measurement
    # Chunks of 500 voxels are to this 6 MB session what bold5000.yaml's 2000 are to a real one
    # (~0.6 GB): small beside it.
    cfg = make_cfg(tmp_path / "big", brain_mask=None, chunk_size=500)
    s = write_glmsingle_subject(cfg, "CSI1", n_images=276, n_repeated=12, showings=2, n_sessions=6, grid=(32, 32, 32))
    session_bytes = s.sessions[0].nbytes
    dataset_bytes = sum(v.nbytes for v in s.sessions)
    assert dataset_bytes == 6 * session_bytes
    del s
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        ingest(cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert StudyStore(cfg.store_path).responses("CSI1").sizes["image"] == 276
    assert peak < 1.0 * session_bytes, (peak, session_bytes)
    assert peak < dataset_bytes / 6
