"""Ingest for ``data.format: nsd``: the Natural Scenes Dataset's files -> ``responses/<subject>``.

The same store layout as the BOLD5000 readers (``pipeline.stages.ingest`` drives both: layout,
checks, staging, the swap into the store), from NSD's own files (``pipeline.formats.nsd``):

- trials: the first (sessions found) x data.nsd.trials_per_session entries of the design's
  masterordering, each the 1-based index into the subject's row of subjectim, itself 1-based
  73k ids; images are named by their 73k id (``nsd73k_02951``), so that every subject's
  responses and the feature bank share names, and featurize can read imgBrick row id - 1;
- betas: one session at a time (NIfTI: one trial volume at a time; HDF5: one z-slab at a time),
  int16 / 300 -> percent signal change, each voxel z-scored within each session (NSD's
  convention, as data.zscore_sessions), then an image's showings averaged (data.repeats
  'average', NSD's convention; 'exclude' keeps the first showing) and the single trials of
  repeated images kept for our noise ceiling;
- voxels: data.voxels 'rois' (the union of data.rois, labels of NSD's ROI tables), 'mask'
  (data.voxel_mask, e.g. nsdgeneral) or 'brain' (data.nsd.brain_mask); a voxel's ``roi`` is
  the first of data.rois holding it;
- coordinates beyond BOLD5000's: ``shared`` on ``image`` (True for the common test set: the
  design's sharedix images with all 3 showings in every subject of study.subjects, within the
  sessions found; NSD's 8 subjects: 515 of 1000), and ``ncsnr`` on ``voxel`` (NSD's file,
  data.nsd.ncsnr; stored as read).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neurotask.pipeline.config import Config
from neurotask.pipeline.errors import DataError
from neurotask.pipeline.formats import bold5000, nsd
from neurotask.pipeline.formats.anatomy import AnatomyFileError, check_anatomy_header
from neurotask.pipeline.stages.ingest import (Staged, SubjectFiles, SubjectPlan, _contiguous, _roi_labels,
                                              zscore_columns)
from neurotask.storage import mask_to_ijk

logger = logging.getLogger(__name__)

SHOWINGS = 3  # NSD schedules every image 3 times


@dataclass
class NsdFiles(SubjectFiles):
    design: Path | None = None
    roi_files: dict[str, Path] = field(default_factory=dict)  # ROI file name -> label volume
    label_tables: dict[str, Path] = field(default_factory=dict)  # ROI file name -> .ctab
    ncsnr: Path | None = None


@dataclass
class NsdPlan(SubjectPlan):
    shared_images: set[str] = field(default_factory=set)  # the common test set's names
    rois: dict[str, np.ndarray] = field(default_factory=dict)  # data.rois label -> (x, y, z) bool
    affine: np.ndarray | None = None  # from a NIfTI on the grid (HDF5 betas carry none)


def nsd_path(cfg: Config, template: str, subject: str, key: str, **extra: Any) -> Path:
    """A data.nsd template (or a data template such as voxel_mask) filled for one subject."""
    n = cfg.data.nsd
    ext = "hdf5" if n.betas_file == "hdf5" else "nii.gz"
    return cfg.data_path(template, subject, key=key, space=n.space, version=n.version, ext=ext, **extra)


def locate_files(cfg: Config, subject: str) -> NsdFiles:
    d, n = cfg.data, cfg.data.nsd
    design = nsd_path(cfg, n.design, subject, "nsd.design")
    files = NsdFiles(subject, stim_list=design, design=design)
    if not design.is_file():
        files.missing.append(f"{design} (the design file, data.nsd.design)")
    files.sessions, gaps = _contiguous(lambda s: nsd_path(cfg, n.betas, subject, "nsd.betas", session=s), d.sessions)
    files.missing += [str(p) for p in gaps]
    if d.rois:
        for name in n.roi_files:
            files.roi_files[name] = nsd_path(cfg, n.roi_file, subject, "nsd.roi_file", roi_file=name)
            files.label_tables[name] = nsd_path(cfg, n.label_table, subject, "nsd.label_table", roi_file=name)
    if d.voxels == "mask":
        files.voxel_mask = nsd_path(cfg, d.voxel_mask, subject, "voxel_mask")
    if d.voxels == "brain":
        files.brain_mask = nsd_path(cfg, n.brain_mask, subject, "nsd.brain_mask")
    if n.ncsnr:
        files.ncsnr = nsd_path(cfg, n.ncsnr, subject, "nsd.ncsnr")
    if d.anatomy:
        files.anatomy = nsd_path(cfg, d.anatomy, subject, "anatomy")
    for p in [*files.roi_files.values(), *files.label_tables.values(), files.voxel_mask, files.brain_mask,
              files.ncsnr, files.anatomy]:
        if p is not None and not p.is_file():
            files.missing.append(str(p))
    return files


def validate_layout(cfg: Config) -> dict[str, SubjectFiles]:
    """Every subject's files; raises DataError listing every missing file at once (the shared
    design file once)."""
    files = {s: locate_files(cfg, s) for s in cfg.study.subjects}
    missing = list(dict.fromkeys(p for f in files.values() for p in f.missing))
    if missing:
        listing = "\n  ".join(missing)
        raise DataError(f"{len(missing)} input file(s) missing (config {cfg.path}; format 'nsd'; see "
                        f"configs/nsd.yaml for the expected layout):\n  {listing}")
    return files


def ingest_params(cfg: Config) -> dict[str, Any]:
    """NSD's settings that determine a subject's stored responses (beyond ingest's own): the
    subjects are among them, as they define the common test set."""
    n = cfg.data.nsd
    return {"nsd": {"space": n.space, "version": n.version, "roi_files": list(n.roi_files),
                    "trials_per_session": n.trials_per_session, "ncsnr": n.ncsnr is not None,
                    "shared_over": list(cfg.study.subjects)}}


def _session_counts(cfg: Config, files: NsdFiles) -> tuple[tuple[int, int, int], list[int]]:
    """The betas' grid and trials per session, from the headers; each session must hold
    data.nsd.trials_per_session trials on one grid."""
    expected = cfg.data.nsd.trials_per_session
    grid, counts = None, []
    for s, p in enumerate(files.sessions, start=1):
        g, t = nsd.betas_grid_and_trials(p)
        if grid is None:
            grid = g
        elif g != grid:
            raise DataError(f"{files.subject}: session {s} ({p}) has the grid {g}, session 1 {grid}")
        if t != expected:
            raise DataError(f"{files.subject}: session {s} ({p}) holds {t} trials; NSD sessions hold {expected} "
                            "(data.nsd.trials_per_session)")
        counts.append(t)
    if grid is None:
        raise DataError(f"{files.subject}: no betas files found ({cfg.data.nsd.betas})")
    return grid, counts


def _grid_file(files: NsdFiles, path: Path, grid: tuple[int, int, int], what: str) -> np.ndarray:
    shape = bold5000.nifti_shape(path)
    if shape[:3] != grid or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
        raise DataError(f"{files.subject}: {what} {path} has shape {shape}, the betas' grid is {grid} "
                        "(data.nsd.space must match the betas)")
    return bold5000.nifti_affine(path)


def shared_test_images(design: nsd.Design, sessions: dict[str, int], trials_per_session: int,
                       showings: int = SHOWINGS) -> set[str]:
    """The common test set: sharedix images shown ``showings`` times to every subject within
    its sessions. sessions: subject -> sessions found. -> image names."""
    common = set(int(i) for i in design.sharedix)
    for subject, n_sessions in sessions.items():
        ids, counts = np.unique(design.trial_ids(subject, n_sessions * trials_per_session), return_counts=True)
        common &= set(ids[counts >= showings].tolist())
    return {nsd.image_name(i) for i in common}


def check_subjects(cfg: Config, todo: list[SubjectFiles], every: dict[str, SubjectFiles]) -> list[NsdPlan]:
    """Everything that can be checked without reading the betas, for the subjects to ingest;
    the common test set over every subject of the study. Raises DataError."""
    design = nsd.read_design(next(iter(every.values())).design)
    tps = cfg.data.nsd.trials_per_session
    counts = {s: _session_counts(cfg, f) for s, f in every.items()}
    shared = shared_test_images(design, {s: len(c[1]) for s, c in counts.items()}, tps)
    plans = []
    for files in todo:
        grid, per_session = counts[files.subject]
        ids = design.trial_ids(files.subject, sum(per_session))
        stim = bold5000.StimList(images=np.array([nsd.image_name(i) for i in ids], dtype=object),
                                 is_rep=np.zeros(ids.size, dtype=bool), path=design.path)
        bold5000.image_trials(stim, cfg.data.repeats)
        affine = None
        volumes, tables = {}, {}
        for name, p in files.roi_files.items():
            affine = _grid_file(files, p, grid, "ROI volume")
            volumes[name] = nsd.load_label_volume(p, grid)
            tables[name] = nsd.read_label_table(files.label_tables[name])
        try:
            rois = nsd.roi_masks(volumes, tables, list(cfg.data.rois)) if cfg.data.rois else {}
        except DataError as e:
            raise DataError(f"{files.subject}: {e}") from None
        for what, p in (("voxel mask", files.voxel_mask), ("brain mask", files.brain_mask), ("ncsnr", files.ncsnr)):
            if p is not None:
                affine = _grid_file(files, p, grid, what)
        if files.anatomy is not None:
            try:
                check_anatomy_header(files.anatomy)
            except AnatomyFileError as e:
                raise DataError(f"{files.subject}: data.anatomy {e}") from e
        if affine is None and files.sessions[0].suffix != ".hdf5":
            affine = bold5000.nifti_affine(files.sessions[0])
        plans.append(NsdPlan(files, stim, per_session, None, grid, None, shared_images=shared, rois=rois,
                             affine=affine))
        logger.info(f"  {files.subject}: {len(per_session)} sessions, {ids.size} trials, "
                    f"{np.unique(ids).size} images, {len(shared & set(stim.images))} in the common test set")
    return plans


def stage(cfg: Config, plan: NsdPlan, staging: Path) -> Staged:
    """Read the subject's betas session by session into a (trials, voxels) float32 staging
    file on disk, z-scored within each session."""
    files, subject, grid = plan.files, plan.subject, plan.grid
    d = cfg.data
    if d.voxels == "rois":
        selected = np.zeros(grid, dtype=bool)
        for m in plan.rois.values():
            selected |= m
        source = "union of the ROI labels " + ", ".join(d.rois)
    else:
        mask_file = files.voxel_mask if d.voxels == "mask" else files.brain_mask
        selected, source = bold5000.load_mask(mask_file, grid), str(mask_file)
    ijk = mask_to_ijk(selected, d.voxel_order)
    if len(ijk) == 0:
        raise DataError(f"{subject}: the voxel selection ({source}) is empty")
    roi, overlap = _roi_labels(plan.rois, ijk, grid)
    v, n_trials = len(ijk), plan.stim.n_trials
    trials = np.lib.format.open_memmap(staging, mode="w+", dtype=np.float32, shape=(n_trials, v))
    finite = np.ones(v, dtype=bool)
    constant = np.zeros(v, dtype=bool)
    raw_sum = np.zeros(v, dtype=np.float64)
    start = 0
    for s, (path, count) in enumerate(zip(files.sessions, plan.session_trials), start=1):
        block = nsd.read_session(path, ijk)  # (count, v) percent signal change
        if block.shape[0] != count:
            raise DataError(f"{subject}: session {s} ({path}) read {block.shape[0]} trials, the header says {count}")
        ok = np.isfinite(block).all(axis=0)
        finite &= ok
        block[:, ~ok] = 0.0
        raw_sum += block.sum(axis=0, dtype=np.float64)
        if d.zscore_sessions:
            constant |= zscore_columns(block) & ok
        trials[start : start + count] = block
        start += count
        del block
        logger.info(f"  {subject}: session {s}/{len(files.sessions)} read ({count} trials)")
    trials.flush()
    extra = {}
    if files.ncsnr is not None:
        vol = nsd.load_ncsnr(files.ncsnr, grid)
        extra["ncsnr"] = vol[ijk[:, 0], ijk[:, 1], ijk[:, 2]].astype(np.float32)
    affine = plan.affine if plan.affine is not None else np.eye(4)
    attrs = {
        "voxel_space": "volume", "volume_shape": list(grid), "affine": affine.tolist(),
        "affine_source": "NSD NIfTI on the betas' grid" if plan.affine is not None else "none (identity)",
        "voxel_selection": source, "roi_overlap_voxels": overlap,
        "nsd_space": d.nsd.space, "nsd_version": d.nsd.version, "nsd_betas_file": d.nsd.betas_file,
        "image_names": f"{nsd.IMAGE_PREFIX}<1-based 73k id> (imgBrick row id - 1)",
        "ncsnr_file": str(files.ncsnr) if files.ncsnr is not None else None,
        "shared_over": list(cfg.study.subjects),
    }
    return Staged(trials, ijk, roi, finite, constant, attrs, mean_beta=raw_sum / max(n_trials, 1),
                  voxel_extra=extra)
