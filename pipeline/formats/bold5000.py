"""Readers of BOLD5000's files exactly as users download them.

- Stimulus lists: release 1.0 ``CSI0{n}_stim_lists.txt`` (one image file name per trial in
  presentation order session -> run -> trial; every showing of a repeated image but one carries a
  ``rep_`` prefix, and the unprefixed one is not always the first) and release 2.0
  ``CSI{n}_imgnames.txt`` (the same order, no prefix: repeats are only recognisable by name).
- Events: the scanning script's ``*_events.tsv`` (one file per run). Its header is malformed: it
  ends with a tab and names 11 columns while every data row carries a 12th field, the RT; the
  OpenNeuro copies add a 13th, ``stim_file``. They are read with explicit column names.
- Release 1.0 ROI data ``CSI{n}_ROIs_TR{1..5,34}.mat``: MATLAB 5 files holding ten variables
  (``LHPPA RHLOC LHLOC RHEarlyVis RHRSC RHOPA RHPPA LHEarlyVis LHRSC LHOPA``), each
  (trials, voxels), trials in stimulus-list order. They carry no volume geometry.
- Release 2.0 GLMsingle betas: one 4D NIfTI per session, (x, y, z, trial) float32 percent signal
  change, NaN outside the brain, affine unreliable (arrays are indexed directly). Streamed one
  trial volume at a time (:func:`iter_volumes`), so memory never holds more than one volume of a
  file. ROI masks ``sub-CSI{n}_mask-{LH,RH}{ROI}.nii.gz``, some spelt differently
  (:data:`ROI_MASK_SPELLINGS`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
from nibabel.openers import ImageOpener
import numpy as np
import scipy.io

from neurotask.pipeline.errors import DataError

REP_PREFIX = "rep_"

# The ten ROI variables of a release-1.0 ROI file (and the default data.rois).
ROI_NAMES = tuple(f"{h}{r}" for h in ("LH", "RH") for r in ("EarlyVis", "LOC", "OPA", "PPA", "RSC"))

# Other spellings of ROI mask files in the released data (OpenNeuro ds001499 derivatives/spm):
# sub-CSI2 and sub-CSI3 have mask-LHLO / mask-RHLO for LOC, sub-CSI2 has mask-RHRRSC for RSC.
ROI_MASK_SPELLINGS: dict[str, tuple[str, ...]] = {
    "LHLOC": ("LHLO",),
    "RHLOC": ("RHLO",),
    "RHRSC": ("RHRRSC",),
}

# Runs per session of each BOLD5000 subject (37 trials a run), from the authors' per-run scanning
# lists (github.com/nchang430/BOLD5000-Scripts @ e6217992): session boundaries for data whose
# files do not carry them (release-1.0 ROI files), when no events files are given.
RUNS_PER_SESSION: dict[str, tuple[int, ...]] = {
    "CSI1": (10, 10, 10, 9, 10, 9, 10, 9, 9, 10, 9, 9, 9, 9, 10),
    "CSI2": (10, 9, 10, 10, 10, 9, 9, 9, 9, 9, 10, 10, 9, 10, 9),
    "CSI3": (10, 9, 10, 9, 10, 10, 10, 9, 9, 9, 10, 9, 9, 9, 10),
    "CSI4": (10, 9, 9, 10, 9, 9, 9, 9, 10),
}
TRIALS_PER_RUN = 37
RELEASE1_TRS = (1, 2, 3, 4, 5, 34)  # TR34: the released average of TR3 and TR4


# --------------------------------------------------------------------------- stimulus lists


@dataclass(frozen=True)
class StimList:
    """images (n_trials,) image names without prefix; is_rep (n_trials,) bool: a ``rep_`` line."""

    images: np.ndarray
    is_rep: np.ndarray
    path: Path

    @property
    def n_trials(self) -> int:
        return int(self.images.size)

    @property
    def has_rep_prefix(self) -> bool:
        """True for release-1.0 lists (repeats marked); False for release-2.0 ``imgnames``."""
        return bool(self.is_rep.any())


def read_stim_list(path: str | Path) -> StimList:
    """Either list format: one image name a line, blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"stimulus list not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise DataError(f"stimulus list {path} is not a text file: {e}") from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DataError(f"stimulus list is empty: {path}")
    bad = [ln for ln in lines if "\t" in ln or " " in ln]
    if bad:
        raise DataError(f"stimulus list {path}: line {lines.index(bad[0]) + 1} is {bad[0]!r}; "
                        "expected one image file name per line")
    is_rep = np.array([ln.startswith(REP_PREFIX) for ln in lines])
    images = np.array([ln[len(REP_PREFIX):] if r else ln for ln, r in zip(lines, is_rep)], dtype=object)
    return StimList(images=images, is_rep=is_rep, path=path)


def image_trials(stim: StimList, policy: str) -> tuple[list[str], list[np.ndarray]]:
    """Which trials make each image's response.

    policy 'exclude' (the paper's): one showing per image, images in presentation order of that
    showing. With ``rep_`` prefixes (release 1.0) it is the unprefixed showing, and an image
    shown only with the prefix is left out (CSI4 has 48: 2904 rows of 2952 images; CSI1-3 4916).
    Without prefixes (release 2.0 ``imgnames``) it is the FIRST showing of each image.
    'average': all showings of each image, images in order of first showing (4916 images for
    CSI1-3, 2952 for CSI4).
    Returns (image names (m,), trial indices per image (m,) of (k_i,) int arrays).
    """
    if policy == "exclude":
        if not stim.has_rep_prefix:
            first: dict[str, int] = {}
            for t, name in enumerate(stim.images):
                first.setdefault(str(name), t)
            return list(first), [np.array([t]) for t in first.values()]
        keep = np.flatnonzero(~stim.is_rep)
        names = stim.images[keep]
        uniq, counts = np.unique(names, return_counts=True)
        if (counts > 1).any():
            dup = uniq[counts > 1][0]
            lines = np.flatnonzero(names == dup)
            raise DataError(f"{stim.path}: image {dup!r} has {counts.max()} showings without the "
                            f"'{REP_PREFIX}' prefix (lines {', '.join(str(keep[i] + 1) for i in lines)}); "
                            "exactly one is expected")
        return [str(n) for n in names], [np.array([t]) for t in keep]
    if policy == "average":
        order: dict[str, list[int]] = {}
        for t, name in enumerate(stim.images):
            order.setdefault(str(name), []).append(t)
        return list(order), [np.array(ts) for ts in order.values()]
    raise ValueError(f"unknown repeats policy {policy!r}; use 'exclude' or 'average'")


def repeated_trials(stim: StimList) -> tuple[list[str], np.ndarray]:
    """Images shown more than once and their trials, padded with -1.

    -> (names (r,), trials (max_showings, r) int, -1 where an image had fewer showings).
    """
    groups: dict[str, list[int]] = {}
    for t, name in enumerate(stim.images):
        groups.setdefault(str(name), []).append(t)
    reps = {k: v for k, v in groups.items() if len(v) > 1}
    k = max((len(v) for v in reps.values()), default=0)
    trials = np.full((k, len(reps)), -1, dtype=np.int64)
    for j, ts in enumerate(reps.values()):
        trials[: len(ts), j] = ts
    return list(reps), trials


def known_session_trials(subject: str, n_trials: int) -> list[int] | None:
    """Trials per session of a BOLD5000 subject, if ``n_trials`` is its full count, else None."""
    runs = RUNS_PER_SESSION.get(subject)
    if runs is None or sum(runs) * TRIALS_PER_RUN != n_trials:
        return None
    return [r * TRIALS_PER_RUN for r in runs]


# --------------------------------------------------------------------------- events

# The scanning script's columns; the header names only the first 11 (then a trailing tab), the
# data rows carry RT as a 12th field; OpenNeuro's copies add stim_file.
EVENT_COLUMNS = ("onset", "duration", "Subj", "Sess", "Run", "Trial", "ImgName", "ImgType",
                 "StimOn(s)", "StimOff(s)", "Response", "RT", "stim_file")
_NAMED_IN_HEADER = 11
_REQUIRED_FIELDS = 12  # up to RT


@dataclass(frozen=True)
class Events:
    """Per trial (n,): session, run, trial (int); image (str, no prefix); is_rep (bool, a
    ``rep_`` image name or type); response, rt, onset (float, NaN when absent); file and line
    (where each trial was read, for error messages)."""

    session: np.ndarray
    run: np.ndarray
    trial: np.ndarray
    image: np.ndarray
    is_rep: np.ndarray
    response: np.ndarray
    rt: np.ndarray
    onset: np.ndarray
    file: np.ndarray
    line: np.ndarray

    @property
    def n_trials(self) -> int:
        return int(self.image.size)

    def where(self, t: int) -> str:
        return (f"session {self.session[t]}, run {self.run[t]}, trial {self.trial[t]} "
                f"({self.file[t]} line {self.line[t]})")


def _number(text: str, kind, path: Path, line: int, column: str):
    text = text.strip()
    if kind is float and text.lower() in ("", "n/a", "nan", "na"):
        return np.nan
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path} line {line}: column {column} is {text!r}, not a number") from None
    if kind is int:
        if not value.is_integer():
            raise DataError(f"{path} line {line}: column {column} is {text!r}, not a whole number")
        return int(value)
    return value


def read_events(path: str | Path) -> Events:
    """One run's events file (scanner or OpenNeuro version), read with explicit column names."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"events file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"events file {path} is not text: {e}") from None
    rows = text.splitlines()
    if not rows:
        raise DataError(f"events file is empty: {path}")
    header = [h.strip() for h in rows[0].split("\t")]
    while header and not header[-1]:
        header.pop()  # the scanner's trailing tab
    expected = EVENT_COLUMNS[: max(_NAMED_IN_HEADER, min(len(header), len(EVENT_COLUMNS)))]
    if len(header) < _NAMED_IN_HEADER or len(header) > len(EVENT_COLUMNS) or \
            [h.lower() for h in header] != [e.lower() for e in expected[: len(header)]]:
        raise DataError(f"events file {path}: header {header} is not BOLD5000's; expected the columns "
                        f"{', '.join(EVENT_COLUMNS[:_NAMED_IN_HEADER])} (then RT and, in OpenNeuro's "
                        "copies, stim_file)")
    col = {name: i for i, name in enumerate(EVENT_COLUMNS)}
    out: dict[str, list] = {k: [] for k in ("session", "run", "trial", "image", "is_rep", "response",
                                             "rt", "onset", "line")}
    for n, row in enumerate(rows[1:], start=2):
        if not row.strip():
            continue
        fields = row.split("\t")
        if len(fields) < _REQUIRED_FIELDS:
            raise DataError(f"{path} line {n}: {len(fields)} tab-separated fields, expected at least "
                            f"{_REQUIRED_FIELDS} ({', '.join(EVENT_COLUMNS[:_REQUIRED_FIELDS])})")
        name = fields[col["ImgName"]].strip()
        kind = fields[col["ImgType"]].strip()
        if not name:
            raise DataError(f"{path} line {n}: ImgName is empty")
        rep = name.startswith(REP_PREFIX) or kind.startswith(REP_PREFIX)
        out["image"].append(name[len(REP_PREFIX):] if name.startswith(REP_PREFIX) else name)
        out["is_rep"].append(rep)
        out["session"].append(_number(fields[col["Sess"]], int, path, n, "Sess"))
        out["run"].append(_number(fields[col["Run"]], int, path, n, "Run"))
        out["trial"].append(_number(fields[col["Trial"]], int, path, n, "Trial"))
        out["response"].append(_number(fields[col["Response"]], float, path, n, "Response"))
        out["rt"].append(_number(fields[col["RT"]], float, path, n, "RT"))
        out["onset"].append(_number(fields[col["onset"]], float, path, n, "onset"))
        out["line"].append(n)
    if not out["image"]:
        raise DataError(f"events file {path} has a header but no trials")
    m = len(out["image"])
    return Events(
        session=np.array(out["session"], dtype=np.int64), run=np.array(out["run"], dtype=np.int64),
        trial=np.array(out["trial"], dtype=np.int64), image=np.array(out["image"], dtype=object),
        is_rep=np.array(out["is_rep"], dtype=bool), response=np.array(out["response"], dtype=np.float64),
        rt=np.array(out["rt"], dtype=np.float64), onset=np.array(out["onset"], dtype=np.float64),
        file=np.array([str(path)] * m, dtype=object), line=np.array(out["line"], dtype=np.int64),
    )


def concat_events(parts: list[Events]) -> Events:
    """Runs in the order given, as one table."""
    if not parts:
        raise ValueError("no events to concatenate")
    return Events(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in Events.__dataclass_fields__})


def check_events(events: Events, stim: StimList, subject: str) -> None:
    """The events' images must be the stimulus list's, trial by trial (names without ``rep_``).

    Raises DataError naming the first differing trial, or the first trial one of them lacks.
    """
    n = min(events.n_trials, stim.n_trials)
    differ = np.flatnonzero(events.image[:n] != stim.images[:n])
    if differ.size:
        t = int(differ[0])
        raise DataError(
            f"{subject}: events and stimulus list differ first at trial {t + 1} (of the whole "
            f"presentation order): events {events.where(t)} show {events.image[t]!r}, the stimulus "
            f"list {stim.path} line {t + 1} has {stim.images[t]!r}")
    if events.n_trials != stim.n_trials:
        if events.n_trials < stim.n_trials:
            raise DataError(
                f"{subject}: the events files hold {events.n_trials} trials, the stimulus list {stim.path} "
                f"{stim.n_trials}: trial {n + 1} ({stim.images[n]!r}, line {n + 1}) has no event "
                f"(last event read: {events.where(n - 1)})")
        raise DataError(
            f"{subject}: the events files hold {events.n_trials} trials, the stimulus list {stim.path} "
            f"only {stim.n_trials}: event trial {n + 1} ({events.where(n)}) is beyond the list")


# --------------------------------------------------------------------------- release-1.0 ROI files


def _mat_error(path: Path, e: Exception) -> DataError:
    if isinstance(e, NotImplementedError):  # scipy's message for HDF5-based files
        return DataError(f"{path} is a MATLAB v7.3 (HDF5) file; BOLD5000's release-1.0 ROI files are "
                         "MATLAB 5 files (scipy.io.loadmat reads them). Was the file re-saved?")
    if isinstance(e, FileNotFoundError):
        return DataError(f"ROI file not found: {path}")
    return DataError(f"cannot read MATLAB file {path} (corrupt or truncated?): {type(e).__name__}: {e}")


def roi_mat_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Variable name -> shape, from the file's headers only (no data read)."""
    path = Path(path)
    try:
        return {name: tuple(int(s) for s in shape) for name, shape, _ in scipy.io.whosmat(str(path))}
    except Exception as e:  # scipy raises several types for corrupt files
        raise _mat_error(path, e) from None


def check_roi_mat(path: str | Path, rois: list[str], n_trials: int) -> dict[str, int]:
    """The ROI variables are present and (n_trials, voxels). -> voxels per ROI."""
    shapes = roi_mat_shapes(path)
    missing = [r for r in rois if r not in shapes]
    if missing:
        raise DataError(f"{path}: ROI variable(s) {', '.join(missing)} missing; the file holds "
                        f"{', '.join(sorted(shapes)) or 'no variables'}")
    for r in rois:
        s = shapes[r]
        if len(s) != 2 or s[0] != n_trials:
            raise DataError(f"{path}: {r} has shape {s}; expected (trials, voxels) with {n_trials} "
                            "trials, one per line of the stimulus list")
    return {r: shapes[r][1] for r in rois}


def read_roi_mat(path: str | Path, rois: list[str]) -> dict[str, np.ndarray]:
    """ROI name -> (trials, voxels) float64 array, for the requested ROIs."""
    path = Path(path)
    try:
        data = scipy.io.loadmat(str(path), variable_names=list(rois))
    except Exception as e:
        raise _mat_error(path, e) from None
    missing = [r for r in rois if r not in data]
    if missing:
        raise DataError(f"{path}: ROI variable(s) {', '.join(missing)} missing")
    out = {}
    for r in rois:
        a = np.asarray(data[r])
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
            raise DataError(f"{path}: {r} is a {a.dtype} array of shape {a.shape}, expected numbers "
                            "(trials, voxels)")
        out[r] = a.astype(np.float64, copy=False)
    return out


# --------------------------------------------------------------------------- NIfTI


def _nifti(path: str | Path):
    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise DataError(f"NIfTI file not found: {path}") from None
    except Exception as e:  # nibabel raises several types for corrupt files
        raise DataError(f"cannot read NIfTI header of {path}: {type(e).__name__}: {e}") from None


def nifti_shape(path: str | Path) -> tuple[int, ...]:
    """Shape from the header only (no data read)."""
    return tuple(int(s) for s in _nifti(path).shape)


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI image's whole data (as stored) and affine; for masks and small files."""
    img = _nifti(path)
    try:
        data = np.asarray(img.dataobj)
    except Exception as e:
        raise DataError(f"cannot read the data of NIfTI {path} (corrupt or truncated?): {type(e).__name__}: {e}") from None
    return data, img.affine


def iter_volumes(path: str | Path) -> Iterator[np.ndarray]:
    """The 3D volumes of a 4D NIfTI file, in order, read one at a time from the (decompressed)
    stream: memory holds one volume, never the file. Each is (x, y, z), float32 (scaled by the
    header's slope and intercept when it has them)."""
    img = _nifti(path)
    shape = tuple(int(s) for s in img.shape)
    proxy = img.dataobj
    if len(shape) != 4 or not hasattr(proxy, "offset") or getattr(proxy, "order", "F") != "F":
        raise DataError(f"{path}: expected a 4D NIfTI (x, y, z, trials), got shape {shape}")
    dtype = np.dtype(proxy.dtype)
    slope, inter = float(proxy.slope), float(proxy.inter)
    scaled = (slope != 1.0 or inter != 0.0) and np.isfinite(slope) and np.isfinite(inter) and slope != 0
    n_bytes = int(np.prod(shape[:3])) * dtype.itemsize
    t = 0
    try:
        with ImageOpener(str(path)) as f:
            f.seek(int(proxy.offset))
            for t in range(shape[3]):
                buf = f.read(n_bytes)
                if len(buf) != n_bytes:
                    raise DataError(f"{path}: file ends inside trial volume {t + 1} of {shape[3]} "
                                    "(truncated download?)")
                vol = np.frombuffer(buf, dtype=dtype).reshape(shape[:3], order="F")
                vol = vol.astype(np.float32) if not scaled else (vol * slope + inter).astype(np.float32)
                yield vol
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(f"cannot read trial volume {t + 1} of NIfTI {path} (corrupt or truncated?): "
                        f"{type(e).__name__}: {e}") from None


def load_mask(path: str | Path, shape: tuple[int, int, int]) -> np.ndarray:
    """A binary mask volume (non-zero = in); its grid must be ``shape``."""
    data, _ = load_volume(path)
    if data.shape[:3] != tuple(shape) or (data.ndim == 4 and data.shape[3] != 1) or data.ndim not in (3, 4):
        raise DataError(f"mask {path} has shape {data.shape}, the betas' grid is {tuple(shape)}")
    data = data.reshape(shape)
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise DataError(f"mask {path} contains NaN values")
    return data > 0


def nifti_affine(path: str | Path) -> np.ndarray:
    return np.asarray(_nifti(path).affine, dtype=np.float64)
