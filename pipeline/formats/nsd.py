"""Readers of the Natural Scenes Dataset's files (Allen et al. 2022, Nat. Neurosci. 25:116-126)
exactly as users download them. Paths in, arrays out; no config.

Sources checked: the NSD data manual (cvnlab.slite.page, pages "Functional data (NSD)",
"ROIs", "Technical notes") and the reader of the ``nsd_access`` package
(github.com/tknapen/nsd_access, nsd_access/nsda.py @ 65563f45: ``read_betas``,
``read_atlas_results``, ``read_images``).

- Design ``nsddata/experiments/nsd/nsd_expdesign.mat`` (MATLAB 5, scipy reads it):
  ``masterordering`` (1, 30000): per trial, the 1-based index into the subject's 10,000 images;
  ``subjectim`` (8, 10000): per subject, the 1-based 73k ids of those images; ``sharedix``
  (1, 1000): the 1-based 73k ids shown to every subject. A subject's trials are the first
  sessions x 750 of masterordering (subjects 3, 4, 6, 8 stopped early: 32, 30, 32, 30 sessions).
- Betas ``betas_sessionNN.{nii.gz,hdf5}``, 750 trials each, int16 holding percent signal change
  x 300 (the manual: "cast to decimal and divide by 300"), zero outside a liberal brain mask.
  NIfTI: (x, y, z, trial). HDF5 dataset ``betas``: MATLAB's X x Y x Z x 750 with chunks
  [1 1 1 750], which h5py (C order) shows reversed, (trial, z, y, x); the ``nsd_access``-era
  readers index it ``betas[trial, ...]`` the same way. It is read one z-slab at a time (a whole
  number of chunks), so memory holds one slab and the selected voxels of one session.
- ROI volumes ``roi/<name>.nii.gz``: integer labels in the betas' grid, 0 = in no ROI of the
  file, -1 = outside the cortex/brain; names of the positive labels in FreeSurfer colour tables
  ``freesurfer/subjAA/label/<name>.mgz.ctab`` (lines ``index name [r g b a]``, as
  ``nsd_access`` reads them).
- ``ncsnr.nii.gz``: per-voxel noise-ceiling SNR beside the betas (float, the grid's shape).
- Stimuli ``nsd_stimuli.hdf5``, dataset ``imgBrick`` (73000, 425, 425, 3) uint8, row = 73k id - 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import numpy as np
import scipy.io

from neurotask.pipeline.errors import DataError
from neurotask.pipeline.formats import bold5000

BETA_SCALE = 300.0  # int16 betas are percent signal change x 300
TRIALS_PER_SESSION = 750
N_IMAGES_73K = 73000
SESSIONS = {f"subj{n:02d}": s for n, s in enumerate((40, 40, 32, 30, 40, 32, 40, 30), start=1)}
IMAGE_PREFIX = "nsd73k_"  # image names: the 1-based 73k id, e.g. nsd73k_02951
_SLAB_BYTES = 64 << 20  # HDF5 betas read in z-slabs of at most this many bytes


def image_name(id73k: int) -> str:
    """The store's name of a 1-based 73k id."""
    return f"{IMAGE_PREFIX}{int(id73k):05d}"


def image_id(name: str) -> int:
    """The 1-based 73k id of a name from :func:`image_name`."""
    if not name.startswith(IMAGE_PREFIX) or not name[len(IMAGE_PREFIX):].isdigit():
        raise ValueError(f"{name!r} is not an NSD image name ({IMAGE_PREFIX}<73k id>)")
    return int(name[len(IMAGE_PREFIX):])


def subject_number(subject: str) -> int:
    """subj01 -> 1 (the row of subjectim)."""
    digits = "".join(c for c in subject if c.isdigit())
    if not subject.startswith("subj") or not digits:
        raise DataError(f"subject {subject!r} is not an NSD subject name (subj01 .. subj08)")
    return int(digits)


# --------------------------------------------------------------------------- design


@dataclass(frozen=True)
class Design:
    """masterordering (n_trials,) 1-based indices into a subject's images; subjectim
    (n_subjects, n_images) 1-based 73k ids; sharedix (n_shared,) 1-based 73k ids."""

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray
    path: Path

    def trial_ids(self, subject: str, n_trials: int) -> np.ndarray:
        """73k ids (1-based) of the subject's first n_trials trials. -> (n_trials,) int64."""
        n = subject_number(subject)
        if n > self.subjectim.shape[0]:
            raise DataError(f"{self.path}: subjectim has {self.subjectim.shape[0]} rows, no row for {subject}")
        if n_trials > self.masterordering.size:
            raise DataError(f"{subject}: the betas hold {n_trials} trials, masterordering in {self.path} "
                            f"only {self.masterordering.size}")
        return self.subjectim[n - 1, self.masterordering[:n_trials] - 1]


def _integers(a: np.ndarray, name: str, path: Path) -> np.ndarray:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.number) or a.size == 0:
        raise DataError(f"{path}: {name} is a {a.dtype} array of shape {a.shape}, expected numbers")
    if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
        bad = np.flatnonzero(~(np.isfinite(a.ravel()) & (a.ravel() == np.round(a.ravel()))))[0]
        raise DataError(f"{path}: {name} element {bad + 1} is {a.ravel()[bad]!r}, not a whole number")
    return a.astype(np.int64)


def read_design(path: str | Path) -> Design:
    """The experimental design, checked: 1-based indices in range, shapes consistent."""
    path = Path(path)
    try:
        m = scipy.io.loadmat(str(path), variable_names=["masterordering", "subjectim", "sharedix"])
    except FileNotFoundError:
        raise DataError(f"NSD design file not found: {path}") from None
    except NotImplementedError:
        raise DataError(f"{path} is a MATLAB v7.3 (HDF5) file; NSD's nsd_expdesign.mat is a MATLAB 5 file "
                        "(scipy.io.loadmat reads it). Was it re-saved?") from None
    except Exception as e:  # scipy raises several types for corrupt files
        raise DataError(f"cannot read MATLAB file {path} (corrupt or truncated?): {type(e).__name__}: {e}") from None
    missing = [k for k in ("masterordering", "subjectim", "sharedix") if k not in m]
    if missing:
        raise DataError(f"{path}: variable(s) {', '.join(missing)} missing; NSD's design file holds "
                        "masterordering, subjectim and sharedix")
    order = _integers(m["masterordering"], "masterordering", path).ravel()
    subjectim = _integers(m["subjectim"], "subjectim", path)
    shared = _integers(m["sharedix"], "sharedix", path).ravel()
    if subjectim.ndim != 2:
        raise DataError(f"{path}: subjectim has shape {subjectim.shape}, expected (subjects, images)")
    n_images = subjectim.shape[1]
    bad = np.flatnonzero((order < 1) | (order > n_images))
    if bad.size:
        t = int(bad[0])
        raise DataError(f"{path}: masterordering trial {t + 1} (session {t // TRIALS_PER_SESSION + 1}, trial "
                        f"{t % TRIALS_PER_SESSION + 1}) is {order[t]}; expected a 1-based index into the subject's "
                        f"{n_images} images (1 .. {n_images})" + (" -- 0-based indices?" if order[t] == 0 else ""))
    for name, a in (("subjectim", subjectim), ("sharedix", shared)):
        bad = np.flatnonzero((a.ravel() < 1) | (a.ravel() > N_IMAGES_73K))
        if bad.size:
            raise DataError(f"{path}: {name} element {bad[0] + 1} is {a.ravel()[bad[0]]}; expected a 1-based 73k "
                            f"image id (1 .. {N_IMAGES_73K})" + (" -- 0-based ids?" if a.ravel()[bad[0]] == 0 else ""))
    return Design(order, subjectim, shared, path)


# --------------------------------------------------------------------------- label tables and ROIs


def read_label_table(path: str | Path) -> dict[int, str]:
    """A FreeSurfer colour table: label index -> name ('index name [r g b a]' lines; '#' comments)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"ROI label table not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"ROI label table {path} is not text: {e}") from None
    out: dict[int, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 2 or not fields[0].lstrip("-").isdigit():
            raise DataError(f"{path} line {n}: {line.strip()!r}; expected 'index name [r g b a]'")
        index = int(fields[0])
        if index in out:
            raise DataError(f"{path} line {n}: label index {index} is listed twice ({out[index]!r}, {fields[1]!r})")
        out[index] = fields[1]
    if not out:
        raise DataError(f"ROI label table is empty: {path}")
    return out


def load_label_volume(path: str | Path, grid: tuple[int, int, int] | None = None) -> np.ndarray:
    """An ROI volume's integer labels (x, y, z) int32; its grid must be ``grid`` when given."""
    data, _ = bold5000.load_volume(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3 or (grid is not None and data.shape != tuple(grid)):
        raise DataError(f"ROI volume {path} has shape {data.shape}, the betas' grid is {tuple(grid or ())}")
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all() or not np.all(data == np.round(data)):
            raise DataError(f"ROI volume {path} holds non-integer values; expected integer labels")
    return data.astype(np.int32)


def roi_masks(volumes: dict[str, np.ndarray], tables: dict[str, dict[int, str]],
              labels: list[str]) -> dict[str, np.ndarray]:
    """Boolean masks (x, y, z) of ROI labels by name, looked up in the tables of the ROI files.

    volumes, tables: ROI file name (e.g. 'floc-places') -> label volume / label table. A label
    is 'name' (found in exactly one file) or 'file:name'. Raises DataError listing every label
    not found (with what the files hold) or found in several files."""
    where: dict[str, list[tuple[str, int]]] = {}
    for file, table in tables.items():
        for index, name in table.items():
            if index > 0:
                where.setdefault(name, []).append((file, index))
    out, problems = {}, []
    for label in labels:
        file, _, name = label.rpartition(":")
        hits = [h for h in where.get(name, []) if not file or h[0] == file]
        if len(hits) != 1:
            problems.append(f"ROI label {label!r} " + ("is in several ROI files (" + ", ".join(h[0] for h in hits)
                                                         + f"); write it 'file:{name}'" if hits else "is not in any label table"))
            continue
        f, index = hits[0]
        out[label] = volumes[f] == index
    if problems:
        held = "; ".join(f"{f}: {', '.join(n for i, n in sorted(t.items()) if i > 0)}" for f, t in tables.items())
        raise DataError("\n  ".join(problems) + f"\n  the label tables hold: {held}")
    return out


def load_ncsnr(path: str | Path, grid: tuple[int, int, int]) -> np.ndarray:
    """NSD's per-voxel noise-ceiling SNR (x, y, z) float32 on the betas' grid."""
    data, _ = bold5000.load_volume(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != tuple(grid):
        raise DataError(f"ncsnr {path} has shape {data.shape}, the betas' grid is {tuple(grid)}")
    return np.asarray(data, dtype=np.float32)


# --------------------------------------------------------------------------- betas


def _h5py():
    try:
        import h5py
    except ImportError:
        raise DataError("reading NSD's HDF5 files needs the h5py package (pip install h5py), or set "
                        "data.nsd.betas_file: nifti") from None
    return h5py


def _open_h5(path: Path, dataset: str):
    h5py = _h5py()
    try:
        f = h5py.File(str(path), "r")
    except FileNotFoundError:
        raise DataError(f"HDF5 file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot open HDF5 file {path} (corrupt or truncated?): {e}") from None
    if dataset not in f:
        names = ", ".join(f.keys()) or "nothing"
        f.close()
        raise DataError(f"{path}: no dataset '{dataset}' (it holds {names})")
    return f


def betas_grid_and_trials(path: str | Path) -> tuple[tuple[int, int, int], int]:
    """((x, y, z), trials) of one session's betas file from its header, NIfTI or HDF5; the HDF5
    dataset's (trial, z, y, x) reported in the NIfTI's order."""
    path = Path(path)
    if path.suffix == ".hdf5" or path.suffix == ".h5":
        with _open_h5(path, "betas") as f:
            shape, dtype = f["betas"].shape, f["betas"].dtype
        if len(shape) != 4:
            raise DataError(f"{path}: 'betas' has shape {shape}; expected (trials, z, y, x) (MATLAB's X x Y x Z x 750)")
        _check_integer(dtype, path)
        return (int(shape[3]), int(shape[2]), int(shape[1])), int(shape[0])
    shape = bold5000.nifti_shape(path)
    if len(shape) != 4:
        raise DataError(f"{path}: expected a 4D NIfTI (x, y, z, trials), got shape {shape}")
    return tuple(shape[:3]), int(shape[3])


def _check_integer(dtype, path: Path) -> None:
    if not np.issubdtype(np.dtype(dtype), np.integer):
        raise DataError(f"{path}: betas are {np.dtype(dtype)}; NSD's are int16 (percent signal change x "
                        f"{BETA_SCALE:g}), which this reader divides by {BETA_SCALE:g}")


def read_session(path: str | Path, ijk: np.ndarray) -> np.ndarray:
    """One session's betas at the voxels ijk (v, 3), in percent signal change. -> (trials, v)
    float32. Memory: the output plus one trial volume (NIfTI) or one z-slab (HDF5)."""
    path = Path(path)
    ijk = np.asarray(ijk, dtype=np.int64)
    if path.suffix in (".hdf5", ".h5"):
        return _read_session_h5(path, ijk)
    img = bold5000._nifti(path)  # DataError for a missing or unreadable file
    _check_integer(img.get_data_dtype(), path)
    n = int(img.shape[3])
    out = np.empty((n, len(ijk)), dtype=np.float32)
    i, j, k = ijk.T
    t = -1
    for t, vol in enumerate(bold5000.iter_volumes(path)):  # header slope/intercept applied, if any
        out[t] = vol[i, j, k]
    if t + 1 != n:
        raise DataError(f"{path}: read {t + 1} trial volumes, the header says {n}")
    out /= BETA_SCALE
    return out


def _read_session_h5(path: Path, ijk: np.ndarray) -> np.ndarray:
    with _open_h5(path, "betas") as f:
        ds = f["betas"]
        if ds.ndim != 4:
            raise DataError(f"{path}: 'betas' has shape {ds.shape}; expected (trials, z, y, x)")
        _check_integer(ds.dtype, path)
        n, nz, ny, nx = (int(s) for s in ds.shape)
        out = np.empty((n, len(ijk)), dtype=np.float32)
        step = max(1, _SLAB_BYTES // max(1, n * ny * nx * ds.dtype.itemsize))
        for z0 in range(0, nz, step):
            sel = np.flatnonzero((ijk[:, 2] >= z0) & (ijk[:, 2] < z0 + step))
            if sel.size == 0:
                continue
            try:
                slab = ds[:, z0 : z0 + step]  # (trials, slab, y, x): whole chunks of [1 1 1 750]
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read z-slices {z0 + 1}-{min(nz, z0 + step)} of {path} (corrupt or "
                                f"truncated?): {type(e).__name__}: {e}") from None
            out[:, sel] = slab[:, ijk[sel, 2] - z0, ijk[sel, 1], ijk[sel, 0]]
    out /= BETA_SCALE
    return out


# --------------------------------------------------------------------------- stimuli


def read_images(path: str | Path, ids73k: np.ndarray) -> np.ndarray:
    """Images by 1-based 73k id from imgBrick. -> (n, h, w, 3) uint8, in the order asked."""
    ids = np.asarray(ids73k, dtype=np.int64)
    with _open_h5(Path(path), "imgBrick") as f:
        brick = f["imgBrick"]
        if brick.ndim != 4 or brick.shape[3] != 3:
            raise DataError(f"{path}: imgBrick has shape {brick.shape}; expected (73000, 425, 425, 3)")
        bad = ids[(ids < 1) | (ids > brick.shape[0])]
        if bad.size:
            raise DataError(f"{path}: 73k id {bad[0]} outside imgBrick's 1 .. {brick.shape[0]}")
        uniq, inverse = np.unique(ids - 1, return_inverse=True)  # h5py reads increasing, distinct rows
        return brick[uniq][inverse]
