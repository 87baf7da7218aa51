"""Reader of the Neural Taskonomy authors' released per-voxel results.

Two sources:

* the authors' own layout (github.com/ariaaay/NeuralTaskonomy ``outputs/encoding_results/
  subj<N>/``): pickles ``corr_whole_brain_taskrepr_<task>__TRavg.p`` (a list of (r, p) per
  cortical voxel), ``rsq_whole_brain_taskrepr_<task>__TRavg.p`` (R² per voxel) and
  ``corr_taskrepr_<task>__TRavg.p`` (ROI-only models: a list of 10 ROI lists of (r, p)).
  These are read with a restricted unpickler that admits exactly the two numpy globals the
  files use and builds only plain numeric scalars from them; anything else is refused.
* the reference npz (``../shared/reference/published/CSI<N>.npz``): the same numbers for
  all 21 tasks, with the cortical mask that places each voxel in the volume.

Both become results Datasets of one layout, the layout of ``results/<subject>`` in the
study store, so the same analysis runs on them:

    dims (task, voxel); data r (float32), pvalue (float64), r2 (float32, NaN if absent);
    coords task (str), voxel (int 0..v-1), roi (str per voxel, '' for none), i, j, k (int
    per voxel, NIfTI array indices; -1 where unknown); attrs subject, source, model
    ("whole_brain" or "roi").

The files hold what the authors computed and nothing more: the FDR step (q-values and the
significance mask) is the caller's, :func:`neurotask.pipeline.stats.scores.with_fdr`.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from neurotask.pipeline.errors import DataError
from neurotask.pipeline.tasks import task_names

# The ROI order of the authors' ROI pickles and of the npz ``roi_names``.
ROI_NAMES = ("LHOPA", "LHPPA", "LHLOC", "LHEarlyVis", "LHRSC", "RHOPA", "RHPPA", "RHLOC", "RHEarlyVis", "RHRSC")

_WHOLE_BRAIN = re.compile(r"^corr_whole_brain_taskrepr_(?P<task>.+)__TRavg\.p$")
_RSQ = "rsq_whole_brain_taskrepr_{task}__TRavg.p"
_ROI = re.compile(r"^corr_taskrepr_(?P<task>.+)__TRavg\.p$")


class PublishedResultsError(ValueError):
    """A published-results file or folder is missing, malformed or of an unexpected shape."""


class UnsafePickleError(PublishedResultsError):
    """A pickle asked for something the restricted unpickler does not admit."""


# --------------------------------------------------------------------------- unpickler


def _safe_dtype(obj: object, align: object = False, copy: object = False) -> np.dtype:
    """Stand-in for ``numpy.dtype`` in a pickle: a plain numeric dtype from its code only."""
    if not isinstance(obj, str):
        raise UnsafePickleError(f"numpy.dtype called with a {type(obj).__name__}, not a type code")
    dt = np.dtype(obj)
    if dt.hasobject or dt.kind not in "biufc" or dt.names is not None or dt.subdtype is not None:
        raise UnsafePickleError(f"numpy.dtype {obj!r} is not a plain numeric type")
    return dt


def _safe_scalar(dtype: object, data: object = None) -> np.generic:
    """Stand-in for numpy's scalar reconstructor: a numeric scalar from its raw bytes only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.kind not in "biufc":
        raise UnsafePickleError(f"numpy scalar of a non-numeric type {dtype!r}")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError(f"numpy scalar of type {dtype} without its {dtype.itemsize} raw bytes")
    return np.frombuffer(data, dtype=dtype)[0]


# (module, name) as written in the authors' pickles -> the harmless callable used instead
_ALLOWED_GLOBALS = {
    ("numpy.core._multiarray_umath", "scalar"): _safe_scalar,
    ("numpy", "dtype"): _safe_dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy.dtype and numpy's scalar reconstructor."""

    def __init__(self, file, *, source: str = "<pickle>"):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle API
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to load global {module}.{name}; only "
                f"{', '.join(f'{m}.{n}' for m, n in _ALLOWED_GLOBALS)} are allowed"
            ) from None

    def persistent_load(self, pid):  # noqa: D102 - pickle API
        raise UnsafePickleError(f"{self._source}: refusing a persistent id {pid!r}")


def restricted_loads(data: bytes, *, source: str = "<bytes>") -> object:
    """Unpickle ``data`` admitting only numeric numpy scalars and dtypes (UnsafePickleError else)."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # a truncated or corrupt file: say which
        raise PublishedResultsError(f"{source}: not a readable pickle ({exc})") from exc


def restricted_load(path: str | Path) -> object:
    """Read one of the authors' pickles with :class:`RestrictedUnpickler`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PublishedResultsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return restricted_loads(data, source=str(path))


# --------------------------------------------------------------------------- layout reader


def _pairs(obj: object, source: str) -> tuple[np.ndarray, np.ndarray]:
    """A list of (r, p) pairs -> (r (v,), p (v,)) float64."""
    try:
        a = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PublishedResultsError(f"{source}: expected a list of (r, p) pairs ({exc})") from exc
    if a.ndim != 2 or a.shape[1] != 2:
        raise PublishedResultsError(f"{source}: expected a list of (r, p) pairs, got shape {a.shape}")
    return a[:, 0], a[:, 1]


def _vector(obj: object, source: str) -> np.ndarray:
    try:
        a = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PublishedResultsError(f"{source}: expected a list of numbers ({exc})") from exc
    if a.ndim != 1:
        raise PublishedResultsError(f"{source}: expected a list of numbers, got shape {a.shape}")
    return a


def _check_dir(directory: str | Path) -> Path:
    d = Path(directory)
    if not d.is_dir():
        raise PublishedResultsError(f"published results folder {d} does not exist")
    return d


def read_published_subject(directory: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Whole-brain results of one subject folder in the authors' layout.

    Returns {task: {"r": (v,), "p": (v,), "r2": (v,)}} (float64), one entry per
    ``corr_whole_brain_taskrepr_<task>__TRavg.p``; "r2" only where the matching
    ``rsq_whole_brain_...`` file exists. All tasks must have the same number of voxels.
    """
    d = _check_dir(directory)
    out: dict[str, dict[str, np.ndarray]] = {}
    for path in sorted(d.iterdir()):
        m = _WHOLE_BRAIN.match(path.name)
        if not m:
            continue
        task = m["task"]
        r, p = _pairs(restricted_load(path), str(path))
        entry = {"r": r, "p": p}
        rsq = d / _RSQ.format(task=task)
        if rsq.exists():
            entry["r2"] = _vector(restricted_load(rsq), str(rsq))
            if entry["r2"].shape != r.shape:
                raise PublishedResultsError(f"{rsq}: {entry['r2'].size} voxels but {path.name} has {r.size}")
        out[task] = entry
    sizes = {t: e["r"].size for t, e in out.items()}
    if len(set(sizes.values())) > 1:
        raise PublishedResultsError(f"{d}: whole-brain files differ in voxel count: {sizes}")
    return out


def read_published_roi(directory: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """ROI-model results of one subject folder in the authors' layout.

    Returns {task: {"r": (n,), "p": (n,), "roi": (n,) str}}: the 10 ROIs' voxels one after
    another in ``ROI_NAMES`` order, one entry per ``corr_taskrepr_<task>__TRavg.p``.
    """
    d = _check_dir(directory)
    out: dict[str, dict[str, np.ndarray]] = {}
    for path in sorted(d.iterdir()):
        m = _ROI.match(path.name)
        if not m:
            continue
        obj = restricted_load(path)
        if not isinstance(obj, list) or len(obj) != len(ROI_NAMES):
            raise PublishedResultsError(f"{path}: expected a list of {len(ROI_NAMES)} ROI lists")
        rs, ps, labels = [], [], []
        for roi, voxels in zip(ROI_NAMES, obj):
            r, p = _pairs(voxels, f"{path} ROI {roi}")
            rs.append(r)
            ps.append(p)
            labels.append(np.full(r.size, roi))
        out[m["task"]] = {"r": np.concatenate(rs), "p": np.concatenate(ps), "roi": np.concatenate(labels)}
    return out


# --------------------------------------------------------------------------- Datasets


def voxel_ijk(mask_zyx: np.ndarray) -> np.ndarray:
    """(z, y, x) bool cortical mask -> (v, 3) int NIfTI indices (i, j, k) of its voxels.

    Voxel order is ``vol_zyx[mask_zyx]`` (C order over z, y, x); the NIfTI array is
    ``mask_zyx.transpose(2, 1, 0)``, so (i, j, k) = (x, y, z).
    """
    z, y, x = np.nonzero(np.asarray(mask_zyx, dtype=bool))
    return np.stack([x, y, z], axis=1).astype(np.int64)


def _ordered_tasks(available: Sequence[str], tasks: Sequence[str] | None, where: str) -> list[str]:
    if tasks is None:  # the 21 known tasks present, in the model_config order
        return [t for t in task_names() if t in available]
    missing = [t for t in tasks if t not in available]
    if missing:
        raise PublishedResultsError(f"{where}: no results for task(s) {missing}; found {sorted(available)}")
    return list(tasks)


def results_dataset(
    tasks: Sequence[str],
    r: np.ndarray,
    p: np.ndarray,
    *,
    r2: np.ndarray | None = None,
    roi: np.ndarray | None = None,
    ijk: np.ndarray | None = None,
    attrs: dict | None = None,
) -> xr.Dataset:
    """(t, v) r and p (and r2) -> results Dataset of the layout in the module docstring."""
    r = np.asarray(r)
    t, v = r.shape
    ijk = np.full((v, 3), -1, dtype=np.int64) if ijk is None else np.asarray(ijk, dtype=np.int64)
    if ijk.shape != (v, 3):
        raise PublishedResultsError(f"voxel coordinates are {ijk.shape}, expected ({v}, 3)")
    return xr.Dataset(
        {
            "r": (("task", "voxel"), r.astype(np.float32)),
            "pvalue": (("task", "voxel"), np.asarray(p, dtype=np.float64)),
            "r2": (("task", "voxel"), np.full((t, v), np.nan, np.float32) if r2 is None else np.asarray(r2, np.float32)),
        },
        coords={
            "task": list(tasks),
            "voxel": np.arange(v),
            "roi": ("voxel", np.full(v, "", dtype="<U16") if roi is None else np.asarray(roi, dtype="<U16")),
            "i": ("voxel", ijk[:, 0]),
            "j": ("voxel", ijk[:, 1]),
            "k": ("voxel", ijk[:, 2]),
        },
        attrs=dict(attrs or {}),
    )


def published_subject_datasets(
    directory: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    mask_zyx: np.ndarray | None = None,
    subject: str | None = None,
) -> tuple[xr.Dataset | None, xr.Dataset | None]:
    """One subject folder in the authors' layout -> (whole-brain, ROI) results Datasets.

    ``tasks`` default: the 21 Neural Taskonomy tasks found (extra files such as ``depth``
    are left out). ``mask_zyx``: the subject's cortical mask, for voxel (i, j, k); without
    it those are -1. Either Dataset is None where the folder has no file of that kind.
    """
    d = _check_dir(directory)
    attrs = {"subject": subject or d.name, "source": f"authors' layout {d}"}
    whole = read_published_subject(d)
    wb = None
    if whole:
        names = _ordered_tasks(list(whole), tasks, str(d))
        v = whole[names[0]]["r"].size
        ijk = None
        if mask_zyx is not None:
            ijk = voxel_ijk(mask_zyx)
            if ijk.shape[0] != v:
                raise PublishedResultsError(f"{d}: cortical mask has {ijk.shape[0]} voxels, the results {v}")
        r2 = np.stack([whole[t].get("r2", np.full(v, np.nan)) for t in names])
        wb = results_dataset(
            names,
            np.stack([whole[t]["r"] for t in names]),
            np.stack([whole[t]["p"] for t in names]),
            r2=r2,
            ijk=ijk,
            attrs={**attrs, "model": "whole_brain"},
        )
    roi = read_published_roi(d)
    rd = None
    if roi:
        names = _ordered_tasks(list(roi), tasks, str(d))
        rd = results_dataset(
            names,
            np.stack([roi[t]["r"] for t in names]),
            np.stack([roi[t]["p"] for t in names]),
            roi=roi[names[0]]["roi"],
            attrs={**attrs, "model": "roi"},
        )
    return wb, rd


class _SafeNpz:
    """An ``np.load(..., allow_pickle=False)`` npz whose object (pickled) arrays raise a
    DataError naming the file and the key, not numpy's bare ValueError (arrays load lazily, on
    indexing, so that is where the check has to be)."""

    def __init__(self, path: Path):
        self.path = path
        self._z = np.load(path, allow_pickle=False)
        self.files = self._z.files

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._z[key]
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:  # a damaged member
            raise PublishedResultsError(f"{self.path}: cannot read array {key!r}: {exc}") from exc
        except ValueError as exc:
            if "Object arrays cannot be loaded" in str(exc):
                raise DataError(f"{self.path}: array {key!r} holds Python objects (a pickle), which neurotask "
                                "does not load (they can run code); save it as a plain numeric or string array") from None
            raise PublishedResultsError(f"{self.path}: cannot read array {key!r}: {exc}") from exc

    def __enter__(self) -> _SafeNpz:
        return self

    def __exit__(self, *exc: object) -> None:
        self._z.close()


def _npz(path: str | Path) -> _SafeNpz:
    path = Path(path)
    try:
        # allow_pickle=False: the npz holds plain arrays only; anything else is an error
        return _SafeNpz(path)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # BadZipFile: a truncated or corrupt npz
        raise PublishedResultsError(f"cannot read reference npz {path}: {exc}") from exc


def load_reference_npz(path: str | Path) -> xr.Dataset:
    """Whole-brain results of one subject from the reference npz, dims (task, voxel).

    Voxels carry (i, j, k) from ``cortical_mask_zyx``; ROI labels are '' (the npz does not
    label whole-brain voxels; the ROI models are in :func:`load_reference_roi_npz`).
    """
    path = Path(path)
    with _npz(path) as z:
        for key in ("tasks", "r", "p", "r2", "cortical_mask_zyx"):
            if key not in z.files:
                raise PublishedResultsError(f"{path}: missing array {key!r}")
        tasks = [str(t) for t in z["tasks"]]
        r, p, r2, mask = z["r"], z["p"], z["r2"], z["cortical_mask_zyx"]
    ijk = voxel_ijk(mask)
    if r.shape != (len(tasks), ijk.shape[0]):
        raise PublishedResultsError(f"{path}: r is {r.shape}, expected ({len(tasks)}, {ijk.shape[0]} mask voxels)")
    return results_dataset(
        tasks, r, p, r2=r2, ijk=ijk,
        attrs={"subject": path.stem, "source": str(path), "model": "whole_brain",
               "volume_shape_ijk": list(mask.shape[::-1])},
    )


def load_reference_roi_npz(path: str | Path) -> xr.Dataset:
    """ROI-model results of one subject from the reference npz, dims (task, voxel).

    The 10 ROIs' voxels one after another (``roi_names`` order), each labelled in ``roi``;
    their positions are not in the npz, so i, j, k are -1.
    """
    path = Path(path)
    with _npz(path) as z:
        tasks = [str(t) for t in z["tasks"]]
        names = [str(n) for n in z["roi_names"]]
        missing = [f"roi_{w}_{n}" for n in names for w in "rp" if f"roi_{w}_{n}" not in z.files]
        if missing:
            raise PublishedResultsError(f"{path}: missing arrays {missing}")
        r = np.concatenate([z[f"roi_r_{n}"] for n in names], axis=1)
        p = np.concatenate([z[f"roi_p_{n}"] for n in names], axis=1)
        roi = np.concatenate([np.full(z[f"roi_r_{n}"].shape[1], n) for n in names])
    return results_dataset(
        tasks, r, p, roi=roi,
        attrs={"subject": path.stem, "source": str(path), "model": "roi"},
    )
