"""Import the Neural Taskonomy authors' published per-voxel results into a study store.

``neurotask import-published DIR --config FILE`` writes, for each of the study's subjects,
``results/<subject>`` (task, voxel) from the results template the fit uses (``storage.schema``:
r, r2, alpha, pvalue, qvalue, significant; coords task_label, voxel_i/j/k, roi) and, where the source has them, the separate
ROI-only models as ``roi_results/<subject>``. The analysis stage and the report then run on
them exactly as on a fitted study; nothing is fitted.

``DIR`` may hold, per subject (``CSI<N>``):

* ``subj<N>/``: a folder in the authors' released layout (``outputs/encoding_results/
  subj<N>/`` of github.com/ariaaay/NeuralTaskonomy): ``corr_whole_brain_taskrepr_<task>__TRavg.p``,
  ``rsq_whole_brain_taskrepr_<task>__TRavg.p``, ``corr_taskrepr_<task>__TRavg.p``; read with
  the restricted unpickler of :mod:`pipeline.formats.published`. If the study has one subject, ``DIR``
  may also be that folder itself.
* ``CSI<N>.npz``: the same results converted into one npz (the reference data's format:
  ``tasks``, ``r``, ``p``, ``r2``, ``cortical_mask_zyx``, ``roi_names``, ``roi_r_<ROI>``,
  ``roi_p_<ROI>``).

The cortical mask places each whole-brain voxel in the subject's functional grid (voxel j
of the results is voxel j of ``vol_zyx[mask_zyx]``), so the maps become NIfTI volumes. The
npz carries its mask; for the pickle layout pass ``masks`` (a folder of ``CSI<N>.npz`` with
``cortical_mask_zyx``); without one the voxels have no position (voxel_i/j/k = -1) and the
report draws no maps. The authors' affine is not published: the volumes get 2 mm isotropic
voxels centred on the grid (BOLD5000's resolution), noted in the results' attrs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from neurotask.pipeline.config import Config
from neurotask.pipeline.errors import DataError
from neurotask.pipeline.formats.published import (
    PublishedResultsError,
    load_reference_npz,
    load_reference_roi_npz,
    published_subject_datasets,
)
from neurotask.pipeline.stats.scores import with_fdr
from neurotask.pipeline.tasks import task_label
from neurotask.storage import staging
from neurotask.storage import Stage, StudyStore, results_group, roi_results_group
from neurotask.storage.schema import results_template, voxel_coords, with_values

logger = logging.getLogger(__name__)

VOXEL_SIZE_MM = 2.0
_SUBJECT_DIR = re.compile(r"^subj(\d+)$")
_LAYOUT_FILE = re.compile(r"^(corr_whole_brain_taskrepr|corr_taskrepr)_.+__TRavg\.p$")


class PublishedImportError(DataError):
    """The published results cannot be imported as asked (names the folder or file)."""


@dataclass(frozen=True)
class PublishedSource:
    subject: str
    kind: str  # "layout" (the authors' pickles) or "npz"
    path: Path
    mask: Path | None  # an npz holding cortical_mask_zyx (for "npz": the file itself)


def subject_number(subject: str) -> int:
    """'CSI1' -> 1 (the authors number subjects subj1, subj2, ...)."""
    digits = "".join(c for c in subject if c.isdigit())
    if not digits:
        raise PublishedImportError(f"subject name {subject!r} has no number; published results are per subj<N>")
    return int(digits)


def _has_layout_files(d: Path) -> bool:
    return any(_LAYOUT_FILE.match(p.name) for p in d.iterdir())


def locate_sources(directory: str | Path, subjects: Sequence[str], masks: str | Path | None = None
                   ) -> dict[str, PublishedSource]:
    """Where each subject's published results are under ``directory`` (module docstring)."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise PublishedImportError(f"published results folder {d} does not exist")
    mask_dir = Path(masks).expanduser() if masks is not None else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise PublishedImportError(f"cortical masks folder {mask_dir} does not exist")
    out: dict[str, PublishedSource] = {}
    missing: list[str] = []
    for subject in subjects:
        n = subject_number(subject)
        npz, folder = d / f"{subject}.npz", d / f"subj{n}"
        mask = None
        if mask_dir is not None:
            mask = mask_dir / f"{subject}.npz"
            if not mask.is_file():
                raise PublishedImportError(f"no cortical mask for {subject}: {mask} does not exist")
        if folder.is_dir() and _has_layout_files(folder):
            out[subject] = PublishedSource(subject, "layout", folder, mask)
        elif npz.is_file():
            out[subject] = PublishedSource(subject, "npz", npz, mask or npz)
        elif len(subjects) == 1 and _has_layout_files(d):
            out[subject] = PublishedSource(subject, "layout", d, mask)
        else:
            missing.append(f"{subject} (looked for {folder}/ and {npz})")
    if missing:
        found = sorted(p.name for p in d.iterdir() if _SUBJECT_DIR.match(p.name) or p.suffix == ".npz")
        raise PublishedImportError(
            f"{d}: no published results for " + "; ".join(missing)
            + f". Found: {', '.join(found) or 'nothing of the expected layout'}")
    return out


def _read_mask(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "cortical_mask_zyx" not in z.files:
                raise PublishedImportError(f"{path}: no array 'cortical_mask_zyx'")
            return np.asarray(z["cortical_mask_zyx"], dtype=bool)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # BadZipFile: a truncated or corrupt npz
        raise PublishedImportError(f"cannot read cortical mask {path}: {exc}") from exc


def grid_affine(shape_ijk: Sequence[int], voxel_size: float = VOXEL_SIZE_MM) -> np.ndarray:
    """(4, 4) affine of isotropic voxels with the grid centred on the origin."""
    affine = np.diag([voxel_size] * 3 + [1.0])
    affine[:3, 3] = -voxel_size * (np.asarray(shape_ijk, dtype=float) - 1.0) / 2.0
    return affine


def parse_upstream(text: str | None) -> dict[str, str]:
    """``REPOSITORY@COMMIT`` (where the released files come from, e.g.
    ``github.com/ariaaay/NeuralTaskonomy@5400d0e8...``) -> the results attrs ``source_repository``
    and ``source_commit``; None -> {}. PublishedImportError naming what is wrong otherwise."""
    if text is None:
        return {}
    repository, _, commit = text.rpartition("@")
    if not repository or not re.fullmatch(r"[0-9a-fA-F]{7,40}", commit):
        raise PublishedImportError(f"--upstream {text!r}: expected REPOSITORY@COMMIT with a 7-40 digit hex commit, "
                                   "e.g. github.com/ariaaay/NeuralTaskonomy@5400d0e8d671e3078918f846f18508b012299795")
    return {"source_repository": repository, "source_commit": commit.lower()}


def to_store_layout(ds: xr.Dataset, subject: str, *, shape_ijk: Sequence[int] | None, source: str,
                    upstream: dict[str, str] | None = None) -> xr.Dataset:
    """A :mod:`pipeline.formats.published` results Dataset -> ``results/<subject>``: the fit's
    results template (without noise ceiling and permutation test) holding the published values;
    ``upstream``: the attrs of :func:`parse_upstream`."""
    tasks = [str(x) for x in ds["task"].values]
    ijk = np.stack([ds[c].values for c in ("i", "j", "k")], axis=1)
    voxels = voxel_coords(ijk, [str(x) for x in ds["roi"].values])
    attrs = {"subject": subject, "imported": True, "source": source, "model": ds.attrs.get("model", "whole_brain"),
             "fdr_alpha": float(ds.attrs.get("fdr_alpha", 0.05)), **(upstream or {})}
    template = results_template(tasks, [task_label(t) for t in tasks], voxels, permutation=False, ceiling=False,
                                attrs=attrs)
    # alpha stays NaN: the authors' chosen ridge penalties are not in the released files
    out = with_values(template, {name: ds[name].transpose("task", "voxel").values
                                 for name in ("r", "r2", "pvalue", "qvalue", "significant")})
    if shape_ijk is not None:
        out.attrs.update(
            volume_shape=[int(x) for x in shape_ijk],
            affine=grid_affine(shape_ijk).tolist(),
            affine_note=f"not published by the authors: {VOXEL_SIZE_MM:g} mm isotropic voxels centred on the grid",
        )
    return out


def read_source(src: PublishedSource, tasks: Sequence[str] | None, fdr: float
                ) -> tuple[xr.Dataset, xr.Dataset | None, tuple[int, int, int] | None]:
    """(whole-brain results, ROI-only results or None, grid shape (i, j, k) or None)."""
    mask = _read_mask(src.mask) if src.mask is not None else None
    try:
        if src.kind == "npz":
            whole = load_reference_npz(src.path)
            roi = load_reference_roi_npz(src.path)
            available = [str(x) for x in whole["task"].values]
            if tasks is not None:
                absent = [x for x in tasks if x not in available]
                if absent:
                    raise PublishedImportError(f"{src.path}: no results for task(s) {absent}")
                whole, roi = whole.sel(task=list(tasks)), roi.sel(task=list(tasks))
        else:
            whole, roi = published_subject_datasets(src.path, tasks=tasks, mask_zyx=mask, subject=src.subject)
    except PublishedResultsError as e:
        raise PublishedImportError(str(e)) from None
    if whole is None:
        raise PublishedImportError(f"{src.path}: no whole-brain results (corr_whole_brain_taskrepr_<task>__TRavg.p)")
    shape = tuple(int(x) for x in mask.shape[::-1]) if mask is not None else None
    return with_fdr(whole, fdr), (with_fdr(roi, fdr) if roi is not None else None), shape


def _fingerprint(src: PublishedSource, tasks: Sequence[str] | None, fdr: float,
                 upstream: dict[str, str] | None = None) -> str:
    """Identifies the imported files (name, size, mtime) and the settings of the import."""
    files = sorted(src.path.iterdir()) if src.path.is_dir() else [src.path]
    files = [p for p in files if p.is_file()] + ([src.mask] if src.mask else [])
    record = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    settings = [record, list(tasks or []), fdr] + ([upstream] if upstream else [])  # old stores keep their print
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]


def import_published(cfg: Config, directory: str | Path, *, masks: str | Path | None = None,
                     overwrite: bool = False, upstream: str | None = None) -> dict[str, dict]:
    """Import every study subject's published results into the store. -> per-subject summary.

    ``upstream``: ``REPOSITORY@COMMIT`` the files were released from, kept in the results' attrs
    for the report's provenance.

    A subject already imported from the same files is skipped; one whose results came from
    elsewhere (a fit, other files) is refused unless ``overwrite``.
    """
    origin = parse_upstream(upstream)
    sources = locate_sources(directory, cfg.study.subjects, masks)
    tasks = None if cfg.study.tasks == "all" else cfg.tasks
    fdr = cfg.analysis.fdr
    store = StudyStore(cfg.store_path)
    staging.recover(store)  # a swap interrupted by a crash is finished first
    progress = store.progress() if store.exists() else None
    summary = {}
    todo = []
    for subject, src in sources.items():
        fingerprint = _fingerprint(src, tasks, fdr, origin)
        record = progress.read(Stage.IMPORT, subject) if progress else None
        if store.has(results_group(subject)) and not overwrite:
            if record and record.get("fingerprint") == fingerprint:
                logger.info(f"{subject}: published results from {src.path} already imported, skipped")
                summary[subject] = record
                continue
            raise PublishedImportError(
                f"{cfg.store_path}: {results_group(subject)} already exist (from {record['source'] if record else 'a fit'}); "
                "use --overwrite to replace them, or a new study.workdir")
        todo.append((subject, src, fingerprint))
    # Every subject's files are read (and so checked) before the store is touched.
    read = [(subject, src, fingerprint, *read_source(src, tasks, fdr)) for subject, src, fingerprint in todo]
    for subject, src, fingerprint, whole, roi, shape in read:
        if shape is None:
            logger.info(f"{subject}: no cortical mask given: voxels have no position, the report will draw no maps")
        label = f"published ({src.kind}) {src.path.resolve()}"
        # Written beside the old results, swapped in together once complete; only then are the
        # subject's fit markers (which no longer describe its results) and import marker cleared.
        try:
            beside = staging.staging_store(store)
            beside.write_dataset(results_group(subject), to_store_layout(whole, subject, shape_ijk=shape, source=label,
                                                                        upstream=origin))
            groups = [results_group(subject)]
            if roi is not None:
                beside.write_dataset(roi_results_group(subject),
                                     to_store_layout(roi, subject, shape_ijk=None, source=label, upstream=origin))
                groups.append(roi_results_group(subject))
            staging.replace(store, groups, drop_groups=[] if roi is not None else [roi_results_group(subject)],
                            clear_markers=[(Stage.FIT, subject), (Stage.IMPORT, subject)])
        finally:
            staging.discard(store)
        info = {"fingerprint": fingerprint, "source": label, "tasks": [str(x) for x in whole["task"].values],
                "voxels": int(whole.sizes["voxel"]), "roi_voxels": int(roi.sizes["voxel"]) if roi is not None else 0,
                "volume_shape": list(shape) if shape else None,
                # per task, for `neurotask status` (which reads markers, never the results arrays)
                "significant": {str(t): int(whole["significant"].sel(task=t).sum()) for t in whole["task"].values}}
        store.progress().mark_done(Stage.IMPORT, subject, info=info)
        logger.info(f"{subject}: imported {len(info['tasks'])} task(s) x {info['voxels']} voxels"
                    + (f" (+ ROI models, {info['roi_voxels']} voxels)" if roi is not None else "") + f" from {src.path}")
        summary[subject] = info
    return summary
