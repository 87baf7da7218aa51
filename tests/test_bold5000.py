"""The BOLD5000 readers on the real stimulus lists, trial table and events samples, and on
synthetic files in the exact released formats."""

from __future__ import annotations

import csv
import gzip
import struct
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neurotask.pipeline.formats import bold5000 as b5
from neurotask.pipeline.errors import DataError
from bold5000_files import BOLD5000_REF, write_events, write_nifti, write_roi_mat, write_stim_list

SUBJECTS = ("CSI1", "CSI2", "CSI3", "CSI4")


def stim_path(subject: str) -> Path:
    return BOLD5000_REF / "stim_lists" / f"CSI0{subject[-1]}_stim_lists.txt"


@pytest.fixture(scope="module")
def trial_table() -> list[dict]:
    with open(BOLD5000_REF / "trial_table.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


# --------------------------------------------------------------------------- stimulus lists


@pytest.mark.parametrize("subject, n_trials, n_exclude, n_average",
                         [("CSI1", 5254, 4916, 4916), ("CSI2", 5254, 4916, 4916),
                          ("CSI3", 5254, 4916, 4916), ("CSI4", 3108, 2904, 2952)])
def test_real_stim_lists_give_the_papers_counts(subject, n_trials, n_exclude, n_average):
    stim = b5.read_stim_list(stim_path(subject))
    assert stim.n_trials == n_trials and stim.has_rep_prefix
    names, groups = b5.image_trials(stim, "exclude")
    assert len(names) == len(set(names)) == n_exclude
    kept = np.concatenate(groups)
    assert not stim.is_rep[kept].any()  # the unprefixed showing, never a rep_ line
    assert np.all(np.diff(kept) > 0)  # presentation order
    assert list(stim.images[kept]) == names
    names_avg, groups_avg = b5.image_trials(stim, "average")
    assert len(names_avg) == len(set(names_avg)) == n_average
    assert sum(g.size for g in groups_avg) == n_trials
    for name, g in zip(names_avg, groups_avg):
        assert set(stim.images[g]) == {name}


def test_exclude_keeps_the_unprefixed_showing_even_when_it_is_not_the_first():
    stim = b5.read_stim_list(stim_path("CSI1"))
    names, groups = b5.image_trials(stim, "exclude")
    kept = dict(zip(names, (int(g[0]) for g in groups)))
    later = [n for n in names if int(np.flatnonzero(stim.images == n)[0]) != kept[n]]
    assert len(later) == 77  # repeated images of CSI1 whose first showing carries rep_
    for n in later:
        assert stim.is_rep[np.flatnonzero(stim.images == n)[0]] and not stim.is_rep[kept[n]]


def test_csi4_images_shown_only_with_rep_prefix_are_left_out_by_exclude():
    stim = b5.read_stim_list(stim_path("CSI4"))
    only_rep = set(stim.images[stim.is_rep]) - set(stim.images[~stim.is_rep])
    assert len(only_rep) == 48
    names, _ = b5.image_trials(stim, "exclude")
    assert not only_rep & set(names)
    avg, _ = b5.image_trials(stim, "average")
    assert only_rep <= set(avg)


def test_repeated_images_are_the_113_of_the_dataset():
    listed = {ln.strip() for ln in (BOLD5000_REF / "repeated_stimuli_113_list.txt").read_text().splitlines() if ln.strip()}
    assert len(listed) == 113
    for subject in ("CSI1", "CSI2", "CSI3"):
        stim = b5.read_stim_list(stim_path(subject))
        names, trials = b5.repeated_trials(stim)
        assert set(names) == listed
        for j, name in enumerate(names):
            t = trials[:, j][trials[:, j] >= 0]
            assert t.size >= 2 and (stim.images[t] == name).all()
            assert np.count_nonzero(stim.images == name) == t.size
    names, trials = b5.repeated_trials(b5.read_stim_list(stim_path("CSI4")))
    assert len(names) == 90 and set(names) <= listed and trials.shape[0] == 5


@pytest.mark.parametrize("subject, n_exclude", [("CSI1", 4916), ("CSI4", 2952)])
def test_release2_list_without_prefix_keeps_first_showing(tmp_path, subject, n_exclude):
    """CSI{n}_imgnames.txt: the same order without rep_; 'exclude' keeps each first showing."""
    real = b5.read_stim_list(stim_path(subject))
    path = write_stim_list(tmp_path / f"{subject}_imgnames.txt", [str(x) for x in real.images])
    stim = b5.read_stim_list(path)
    assert not stim.has_rep_prefix and stim.n_trials == real.n_trials
    names, groups = b5.image_trials(stim, "exclude")
    assert len(names) == n_exclude
    first = {}
    for t, name in enumerate(stim.images):
        first.setdefault(name, t)
    assert [int(g[0]) for g in groups] == [first[n] for n in names]
    assert b5.image_trials(stim, "average")[0] == b5.image_trials(real, "average")[0]
    assert b5.repeated_trials(stim)[0] == b5.repeated_trials(real)[0]


def test_stim_list_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        b5.read_stim_list(tmp_path / "none.txt")
    with pytest.raises(DataError, match="empty"):
        b5.read_stim_list(write_stim_list(tmp_path / "empty.txt", [""]))
    two = write_stim_list(tmp_path / "two.txt", ["a.jpg", "b.jpg", "rep_a.jpg", "b.jpg", "rep_b.jpg"])
    with pytest.raises(DataError, match=r"'b.jpg' has 2 showings without the 'rep_' prefix \(lines 2, 4\)"):
        b5.image_trials(b5.read_stim_list(two), "exclude")
    tabs = write_stim_list(tmp_path / "tabs.txt", ["a.jpg", "1\tb.jpg"])
    with pytest.raises(DataError, match="line 2"):
        b5.read_stim_list(tabs)
    with pytest.raises(ValueError, match="unknown repeats policy"):
        b5.image_trials(b5.read_stim_list(two), "median")


# --------------------------------------------------------------------------- trial table, sessions


def test_trial_table_agrees_with_stim_lists_and_known_sessions(trial_table):
    for subject in SUBJECTS:
        rows = [r for r in trial_table if r["subject"] == subject]
        lines = [ln.strip() for ln in stim_path(subject).read_text().splitlines() if ln.strip()]
        assert [r["stim_list_name"] for r in rows] == lines
        runs = Counter(r["session"] for r in rows)
        n_runs = [len({r["run"] for r in rows if r["session"] == s}) for s in sorted(runs, key=int)]
        assert tuple(n_runs) == b5.RUNS_PER_SESSION[subject]
        per_session = [runs[s] for s in sorted(runs, key=int)]
        assert b5.known_session_trials(subject, len(lines)) == per_session
    assert b5.known_session_trials("CSI1", 5000) is None
    assert b5.known_session_trials("CSI9", 5254) is None


# --------------------------------------------------------------------------- events


def test_sample_events_with_the_malformed_header(trial_table):
    """The scanner's files: header of 11 names ending in a tab, RT as an unnamed 12th field."""
    for run in (1, 2):
        path = BOLD5000_REF / "events_sample" / f"sub-1_ses-1_run{run}_5000scenes.tsv"
        header = path.read_text().splitlines()[0]
        assert header.endswith("\t") and len(header.rstrip("\t").split("\t")) == 11
        ev = b5.read_events(path)
        rows = [r for r in trial_table if r["subject"] == "CSI1" and r["session"] == "1" and r["run"] == str(run)]
        assert ev.n_trials == 37
        assert list(ev.image) == [r["image_name"] for r in rows]
        assert list(ev.is_rep) == [r["stim_list_name"].startswith("rep_") for r in rows]
        assert (ev.session == 1).all() and (ev.run == run).all()
        assert list(ev.trial) == list(range(1, 38))
        assert set(ev.response) <= {1.0, 2.0, 3.0, 4.0}
        assert np.isfinite(ev.rt).all() and (ev.rt > 0).all() and (ev.rt < 10).all()
        assert np.all(np.diff(ev.onset) > 9)
    ev = b5.read_events(BOLD5000_REF / "events_sample" / "sub-1_ses-1_run1_5000scenes.tsv")
    assert ev.image[30] == "COCO_train2014_000000113449.jpg" and ev.is_rep[30]
    assert ev.rt[0] == pytest.approx(3.6309) and ev.response[0] == 2


def _write_subject_events(directory: Path, subject: str, trial_table, openneuro=False) -> list[Path]:
    rng = np.random.default_rng(0)
    rows = [r for r in trial_table if r["subject"] == subject]
    paths = []
    for (s, run) in dict.fromkeys((int(r["session"]), int(r["run"])) for r in rows):
        lines = [r["stim_list_name"] for r in rows if int(r["session"]) == s and int(r["run"]) == run]
        paths.append(write_events(directory / f"ses-{s:02d}" / f"run-{run:02d}_events.tsv",
                                  int(subject[-1]), s, run, lines, rng, openneuro=openneuro))
    return paths


def test_events_of_a_whole_subject_check_against_the_real_list(tmp_path, trial_table):
    paths = _write_subject_events(tmp_path, "CSI1", trial_table)
    assert len(paths) == 142
    stim = b5.read_stim_list(stim_path("CSI1"))
    events = b5.concat_events([b5.read_events(p) for p in paths])
    b5.check_events(events, stim, "CSI1")  # no error
    assert events.n_trials == 5254
    assert (events.is_rep == stim.is_rep).all()
    counts = Counter(events.session.tolist())
    assert [counts[s] for s in range(1, 16)] == b5.known_session_trials("CSI1", 5254)

    # One image changed in session 7, run 3, trial 12: named as the first difference.
    target = tmp_path / "ses-07" / "run-03_events.tsv"
    original = target.read_text()
    lines = original.splitlines()
    fields = lines[12].split("\t")
    fields[6] = "COCO_train2014_000000000001.jpg"
    lines[12] = "\t".join(fields)
    target.write_text("\n".join(lines) + "\n")
    global_trial = next(i for i, r in enumerate(r for r in trial_table if r["subject"] == "CSI1")
                        if r["session"] == "7" and r["run"] == "3" and r["trial"] == "12") + 1
    bad = b5.concat_events([b5.read_events(p) for p in paths])
    with pytest.raises(DataError) as e:
        b5.check_events(bad, stim, "CSI1")
    msg = str(e.value)
    assert f"differ first at trial {global_trial}" in msg
    assert "session 7, run 3, trial 12" in msg and "run-03_events.tsv line 13" in msg
    assert "COCO_train2014_000000000001.jpg" in msg

    # A run left out: the first trial without an event is named.
    target.write_text(original)
    fewer = b5.concat_events([b5.read_events(p) for p in paths[:-1]])
    with pytest.raises(DataError, match=r"hold 5217 trials, the stimulus list .* 5254: trial 5218"):
        b5.check_events(fewer, stim, "CSI1")


def test_openneuro_events_with_named_rt_and_stim_file(tmp_path):
    rng = np.random.default_rng(1)
    lines = ["a.jpg", "rep_b.JPEG", "COCO_train2014_000000000007.jpg"]
    path = write_events(tmp_path / "e.tsv", 1, 2, 3, lines, rng, openneuro=True)
    assert path.read_text().splitlines()[0].split("\t")[-2:] == ["RT", "stim_file"]
    ev = b5.read_events(path)
    assert list(ev.image) == ["a.jpg", "b.JPEG", "COCO_train2014_000000000007.jpg"]
    assert list(ev.is_rep) == [False, True, False]
    assert (ev.session == 2).all() and (ev.run == 3).all()
    raw = [ln.split("\t") for ln in path.read_text().splitlines()[1:]]
    assert ev.rt.tolist() == [float(r[11]) for r in raw]


def test_events_errors(tmp_path):
    good = (BOLD5000_REF / "events_sample" / "sub-1_ses-1_run1_5000scenes.tsv").read_text().splitlines()
    bad_header = tmp_path / "h.tsv"
    bad_header.write_text("\n".join(["onset\tduration\tSubject"] + good[1:]) + "\n")
    with pytest.raises(DataError, match="header .* is not BOLD5000's"):
        b5.read_events(bad_header)
    short = tmp_path / "s.tsv"
    short.write_text("\n".join(good[:3] + ["\t".join(good[3].split("\t")[:11])]) + "\n")
    with pytest.raises(DataError, match=r"s.tsv line 4: 11 tab-separated fields, expected at least 12"):
        b5.read_events(short)
    text = tmp_path / "t.tsv"
    fields = good[1].split("\t")
    fields[5] = "first"
    text.write_text("\n".join([good[0], "\t".join(fields)]) + "\n")
    with pytest.raises(DataError, match="line 2: column Trial is 'first'"):
        b5.read_events(text)
    noresp = tmp_path / "n.tsv"
    fields = good[1].split("\t")
    fields[10], fields[11] = "", "n/a"
    noresp.write_text("\n".join([good[0], "\t".join(fields)]) + "\n")
    ev = b5.read_events(noresp)
    assert np.isnan(ev.response[0]) and np.isnan(ev.rt[0])
    with pytest.raises(DataError, match="not found"):
        b5.read_events(tmp_path / "missing.tsv")


# --------------------------------------------------------------------------- release-1.0 ROI files


def test_roi_mat_with_the_ten_variables(tmp_path):
    rng = np.random.default_rng(0)
    released = ("LHPPA", "RHLOC", "LHLOC", "RHEarlyVis", "RHRSC", "RHOPA", "RHPPA", "LHEarlyVis", "LHRSC", "LHOPA")
    assert set(released) == set(b5.ROI_NAMES)
    data = {r: rng.standard_normal((40, 5 + i)) for i, r in enumerate(released)}
    path = write_roi_mat(tmp_path / "CSI1_ROIs_TR3.mat", data)
    assert path.read_bytes()[:10] == b"MATLAB 5.0"
    sizes = b5.check_roi_mat(path, list(b5.ROI_NAMES), 40)
    assert sizes == {r: 5 + released.index(r) for r in b5.ROI_NAMES}
    read = b5.read_roi_mat(path, list(b5.ROI_NAMES))
    for r in b5.ROI_NAMES:
        np.testing.assert_array_equal(read[r], data[r])
    with pytest.raises(DataError, match=r"LHEarlyVis has shape \(40, 12\); expected \(trials, voxels\) with 41 trials"):
        b5.check_roi_mat(path, list(b5.ROI_NAMES), 41)
    nine = write_roi_mat(tmp_path / "nine.mat", {k: v for k, v in data.items() if k != "RHRSC"})
    with pytest.raises(DataError, match="ROI variable.s. RHRSC missing"):
        b5.check_roi_mat(nine, list(b5.ROI_NAMES), 40)


def test_roi_mat_errors_name_the_problem(tmp_path):
    path = write_roi_mat(tmp_path / "good.mat", {r: np.ones((30, 4)) for r in b5.ROI_NAMES})
    truncated = tmp_path / "truncated.mat"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated.mat"):
        b5.read_roi_mat(truncated, list(b5.ROI_NAMES))
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"not a matlab file at all" * 4)
    with pytest.raises(DataError, match="cannot read MATLAB file .*garbage.mat"):
        b5.roi_mat_shapes(garbage)
    # A MATLAB 7.3 file (HDF5 inside, header version 0x0200).
    v73 = tmp_path / "v73.mat"
    head = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116, b" ")
    v73.write_bytes(head + b"\0" * 8 + struct.pack("<H", 0x0200) + b"IM" + b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(DataError, match="MATLAB v7.3 .HDF5. file; BOLD5000's release-1.0 ROI files are MATLAB 5"):
        b5.roi_mat_shapes(v73)
    with pytest.raises(DataError, match="not found"):
        b5.read_roi_mat(tmp_path / "none.mat", ["LHPPA"])


# --------------------------------------------------------------------------- NIfTI


def test_iter_volumes_streams_the_same_data_as_nibabel(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((5, 6, 7, 4)).astype(np.float32)
    vol[0, 0, 0] = np.nan
    path = write_nifti(tmp_path / "betas.nii.gz", vol)
    got = np.stack(list(b5.iter_volumes(path)), axis=-1)
    np.testing.assert_array_equal(got, vol)
    assert b5.nifti_shape(path) == (5, 6, 7, 4)
    # Scaled integers (scl_slope/scl_inter) come out as the scaled values.
    ints = rng.integers(-1000, 1000, (4, 3, 2, 3)).astype(np.int16)
    img = nib.Nifti1Image(ints, np.eye(4))
    img.header.set_slope_inter(0.5, 2.0)
    nib.save(img, str(tmp_path / "scaled.nii"))
    got = np.stack(list(b5.iter_volumes(tmp_path / "scaled.nii")), axis=-1)
    np.testing.assert_allclose(got, ints * 0.5 + 2.0)
    np.testing.assert_allclose(got, np.asarray(nib.load(str(tmp_path / "scaled.nii")).dataobj))


def test_corrupt_or_truncated_nifti_gives_a_clear_error(tmp_path):
    vol = np.random.default_rng(0).standard_normal((8, 8, 8, 6)).astype(np.float32)
    path = write_nifti(tmp_path / "betas.nii.gz", vol)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    assert b5.nifti_shape(truncated) == (8, 8, 8, 6)  # the header still reads
    with pytest.raises(DataError, match=r"truncated.nii.gz.*(corrupt or truncated|truncated download)"):
        list(b5.iter_volumes(truncated))
    raw = tmp_path / "short.nii"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(raw))
    raw.write_bytes(raw.read_bytes()[:-1000])
    with pytest.raises(DataError, match="file ends inside trial volume 6 of 6"):
        list(b5.iter_volumes(raw))
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"this is no nifti header" * 30))
    with pytest.raises(DataError, match="cannot read NIfTI header of .*garbage.nii.gz"):
        b5.nifti_shape(garbage)
    three_d = write_nifti(tmp_path / "mask.nii.gz", np.ones((8, 8, 8), np.uint8))
    with pytest.raises(DataError, match="expected a 4D NIfTI"):
        list(b5.iter_volumes(three_d))


def test_masks(tmp_path):
    m = np.zeros((4, 5, 6), dtype=np.uint8)
    m[1, 2, 3] = 1
    path = write_nifti(tmp_path / "m.nii.gz", m)
    assert b5.load_mask(path, (4, 5, 6)).sum() == 1
    with pytest.raises(DataError, match=r"has shape \(4, 5, 6\), the betas' grid is \(4, 5, 7\)"):
        b5.load_mask(path, (4, 5, 7))
    nan = write_nifti(tmp_path / "nan.nii.gz", np.full((4, 5, 6), np.nan, np.float32))
    with pytest.raises(DataError, match="NaN"):
        b5.load_mask(nan, (4, 5, 6))
    assert b5.ROI_MASK_SPELLINGS == {"LHLOC": ("LHLO",), "RHLOC": ("RHLO",), "RHRSC": ("RHRRSC",)}
