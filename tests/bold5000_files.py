"""Synthetic BOLD5000 files written in the exact released formats, for tests, and the lookup of
the shared reference data.

Formats: stimulus lists (one name a line, ``rep_`` on every showing of a repeated image but one,
not always the first); GLMsingle betas (one 4D float32 NIfTI per session, NaN outside the brain);
masks (uint8 NIfTI) with the released spelling variants; release-1.0 ROI files (MATLAB 5 via
scipy.io.savemat, the ten ROI variables, trials x voxels); events files as the scanning script
writes them (header of 11 names and a trailing tab, rows with a 12th field, RT).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.io

from neurotask.pipeline.formats.bold5000 import REP_PREFIX, ROI_NAMES
from neurotask.pipeline.config import Config
from neurotask.pipeline.stages.ingest import data_file


from conftest import reference_path as reference_dir  # noqa: E402,F401


REFERENCE = reference_dir()
BOLD5000_REF = REFERENCE / "bold5000"

SCANNER_HEADER = ["onset", "duration", "Subj", "Sess", "Run", "Trial", "ImgName", "ImgType",
                  "StimOn(s)", "StimOff(s)", "Response"]
# The released spellings of some ROI mask files (sub-CSI2).
RELEASED_SPELLING = {"LHLOC": "LHLO", "RHLOC": "RHLO", "RHRSC": "RHRRSC"}


def write_stim_list(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def write_roi_mat(path: Path, rois: dict[str, np.ndarray]) -> Path:
    """A MATLAB 5 file with one (trials, voxels) double variable per ROI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {k: np.asarray(v, dtype=np.float64) for k, v in rois.items()}, format="5")
    return path


def _image_type(name: str) -> str:
    if name.startswith("COCO_"):
        return "coco"
    return "imagenet" if name.endswith(".JPEG") else "scenes"


def write_events(path: Path, subj: int, session: int, run: int, lines: list[str], rng: np.random.Generator,
                 openneuro: bool = False) -> Path:
    """One run's events: the scanner's file (malformed header) or OpenNeuro's (13 named columns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = SCANNER_HEADER + (["RT", "stim_file"] if openneuro else [])
    out = ["\t".join(header) + ("" if openneuro else "\t")]
    for t, line in enumerate(lines, start=1):
        rep = line.startswith(REP_PREFIX)
        name = line[len(REP_PREFIX):] if rep else line
        onset = 6.0 + 10.0 * (t - 1) + rng.uniform(0, 0.03)
        dur = rng.uniform(0.96, 1.01)
        kind = (REP_PREFIX if rep else "") + _image_type(name)
        fields = [f"{onset:.4f}", f"{dur:.4f}", str(subj), str(session), str(run), str(t), name, kind,
                  f"{onset:.4f}", f"{onset + dur:.4f}", str(int(rng.integers(1, 4))), f"{rng.uniform(0.5, 5):.4f}"]
        if openneuro:
            fields.append(line)
        out.append("\t".join(fields))
    path.write_text("\n".join(out) + "\n")
    return path


# --------------------------------------------------------------------------- a whole subject


def presentation(n_images: int, n_repeated: int, showings: int, rng: np.random.Generator,
                 rep_prefix: bool = True) -> tuple[list[str], np.ndarray, list[str]]:
    """(stim-list lines, image index per trial, image names). The kept showing is random."""
    names = [f"COCO_train2014_{i:012d}.jpg" for i in rng.choice(10**6, n_images // 2, replace=False)]
    names += [f"n{s:08d}_{i}.JPEG" for i, s in enumerate(rng.choice(10**7, n_images - len(names) - 3, replace=False))]
    names += ["airport1.jpg", "kitchen7.jpeg", "street2.jpg"]
    repeated = rng.choice(n_images, n_repeated, replace=False)
    trial_image = np.concatenate([np.arange(n_images), np.repeat(repeated, showings - 1)])
    trial_image = trial_image[rng.permutation(trial_image.size)]
    lines = [names[i] for i in trial_image]
    if rep_prefix:
        for i in repeated:
            showings_i = np.flatnonzero(trial_image == i)
            keep = rng.choice(showings_i)
            for t in showings_i:
                if t != keep:
                    lines[t] = REP_PREFIX + names[i]
    return lines, trial_image, names


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


@dataclass
class Subject:
    """What was written, for the tests to compare with: lines, trial_image, per-session betas
    (x, y, z, t) float32, brain (x, y, z) bool, rois name -> mask, session_trials, paths."""

    subject: str
    lines: list[str]
    trial_image: np.ndarray
    names: list[str]
    sessions: list[np.ndarray] = field(default_factory=list)
    brain: np.ndarray | None = None
    rois: dict[str, np.ndarray] = field(default_factory=dict)
    session_trials: list[int] = field(default_factory=list)
    roi_data: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def split_sessions(n_trials: int, n_sessions: int) -> list[int]:
    return [len(a) for a in np.array_split(np.arange(n_trials), n_sessions)]


def write_events_for(cfg: Config, s: Subject, rng, run_size: int = 9, openneuro: bool = False) -> None:
    """Events files of every session, runs of ``run_size`` trials, where data.events says."""
    start = 0
    n = int("".join(c for c in s.subject if c.isdigit()))
    for session, count in enumerate(s.session_trials, start=1):
        lines = s.lines[start : start + count]
        for run, a in enumerate(range(0, count, run_size), start=1):
            write_events(data_file(cfg, "events", s.subject, session=session, run=run), n, session, run,
                         lines[a : a + run_size], rng, openneuro=openneuro)
        start += count


def write_glmsingle_subject(cfg: Config, subject: str = "CSI1", *, n_images: int = 60, n_repeated: int = 8,
                            showings: int = 3, n_sessions: int = 3, grid=(10, 12, 9), seed: int = 0,
                            spelling: str = "canonical", rep_prefix: bool = True, events: bool = False,
                            trials_override: list[int] | None = None) -> Subject:
    """A subject in the release-2.0 formats, where ``cfg``'s data templates say.

    Betas: per voxel an image signal plus trial noise, then a per-session gain and offset (so the
    within-session z-scoring matters), NaN outside an ellipsoid brain; one brain voxel is NaN
    in one trial of session 2 and must be dropped.
    """
    rng = np.random.default_rng(seed)
    lines, trial_image, names = presentation(n_images, n_repeated, showings, rng, rep_prefix)
    s = Subject(subject, lines, trial_image, names)
    centre = [(g - 1) / 2 for g in grid]
    s.brain = _ellipsoid(grid, centre, [0.45 * g for g in grid])
    for a, name in enumerate(cfg.data.rois or ROI_NAMES):
        c = [centre[0] + (-2 if name.startswith("LH") else 2), 2 + (a % 5) * 1.6, centre[2]]
        s.rois[name] = _ellipsoid(grid, c, [1.2, 1.2, 1.5]) & s.brain
    n_trials = len(lines)
    s.session_trials = trials_override or split_sessions(n_trials, min(n_sessions, n_trials))
    signal = rng.standard_normal((n_images,) + tuple(grid)).astype(np.float32)
    start = 0
    nan_voxel = tuple(np.argwhere(s.brain)[len(np.argwhere(s.brain)) // 2])
    for k, count in enumerate(s.session_trials, start=1):
        idx = trial_image[start : start + count]
        vol = signal[idx] + 0.5 * rng.standard_normal((count,) + tuple(grid)).astype(np.float32)
        vol = vol * rng.uniform(0.5, 2.0, grid).astype(np.float32) + rng.normal(0, 3, grid).astype(np.float32)
        vol = np.moveaxis(vol, 0, -1).astype(np.float32)
        vol[~s.brain] = np.nan
        if k == 2:
            vol[nan_voxel + (0,)] = np.nan
        s.sessions.append(vol)
        s.paths[f"ses{k}"] = write_nifti(data_file(cfg, "betas", subject, session=k), vol)
        start += count
    s.paths["nan_voxel"] = nan_voxel  # type: ignore[assignment]
    if cfg.data.brain_mask:
        s.paths["brain_mask"] = write_nifti(data_file(cfg, "brain_mask", subject), s.brain.astype(np.uint8),
                                            np.diag([-2.0, 2.0, 2.0, 1.0]))
    for name, m in s.rois.items():
        spelt = RELEASED_SPELLING.get(name, name) if spelling == "released" else name
        s.paths[f"roi:{name}"] = write_nifti(data_file(cfg, "roi_masks", subject, roi=spelt), m.astype(np.uint8))
    s.paths["stim"] = write_stim_list(data_file(cfg, "stim_list", subject),
                                      lines if rep_prefix else [ln.removeprefix(REP_PREFIX) for ln in lines])
    if events:
        write_events_for(cfg, s, rng)
    return s


def write_release1_subject(cfg: Config, subject: str = "CSI1", *, n_images: int = 60, n_repeated: int = 8,
                           showings: int = 3, seed: int = 0, roi_sizes: dict[str, int] | None = None,
                           trs=(1, 2, 3, 4, 5, 34)) -> Subject:
    """A subject in the release-1.0 ROI format: ``CSI{n}_ROIs_TR{tr}.mat`` with the ten variables
    (written in the released variable order) and the stimulus list."""
    rng = np.random.default_rng(seed)
    lines, trial_image, names = presentation(n_images, n_repeated, showings, rng)
    s = Subject(subject, lines, trial_image, names)
    released_order = ("LHPPA", "RHLOC", "LHLOC", "RHEarlyVis", "RHRSC", "RHOPA", "RHPPA", "LHEarlyVis", "LHRSC", "LHOPA")
    sizes = roi_sizes or {r: 3 + i for i, r in enumerate(released_order)}
    for tr in trs:
        data = {r: rng.normal(tr, 1.0, (len(lines), sizes[r])) for r in released_order}
        s.roi_data[tr] = data
        s.paths[f"TR{tr}"] = write_roi_mat(data_file(cfg, "roi_mat", subject, tr=tr), data)
    s.paths["stim"] = write_stim_list(data_file(cfg, "stim_list", subject), lines)
    return s
