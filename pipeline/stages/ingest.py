"""Ingest: a subject's BOLD5000 files as downloaded -> ``responses/<subject>`` in the store.

Two readers produce the same thing for the store (``data.format``):

- 'glmsingle' (release 2.0): one 4D NIfTI of betas per session, concatenated in session order;
  voxels from the brain mask (a NIfTI, or derived as the voxels finite in every session), the
  union of the ROI masks, or a user's whole-brain or cortical mask; voxel coordinates (i, j, k)
  in the betas' grid, in 'ijk' order or the Neural Taskonomy authors' (z, y, x) order.
- 'release1_rois' (release 1.0): the ten ROI variables of ``CSI{n}_ROIs_TR{tr}.mat``, one TR or
  the average of several (the paper: TR3 and TR4). These files hold no volume geometry: a
  voxel's coordinates are (i = its ROI's position in data.rois, j = its column in that ROI's
  variable, k = -1), its ``roi`` label is kept, and attrs ``voxel_space`` is 'roi_index'
  without ``volume_shape``, so the report draws no volume maps and exports no NIfTI.

A third, 'nsd', reads the Natural Scenes Dataset (``pipeline.stages.ingest_nsd``: its design
file, int16 HDF5 or NIfTI betas, ROI label volumes, ncsnr) into the same store layout, plus the
``shared`` image coordinate (the common test set) and NSD's ``ncsnr`` per voxel.

All: each voxel z-scored within each session (the dataset README's advice), one row per image
(data.repeats: the one unprefixed showing, or the mean of all showings) plus the single trials
of the repeated images; optional events files cross-checked against the stimulus list.

Order of work, so that bad input never touches the store and memory stays ~ one session:
1. every subject's layout (every missing file listed at once), then headers only: trial counts,
   grids, ROI variables, events against the stimulus list;
2. per subject, read its data one session at a time (one trial volume at a time from each
   NIfTI), keep the selected voxels, z-score them within the session and write the trials to a
   staging file on disk; a voxel non-finite anywhere is dropped and reported;
3. per voxel chunk, the image rows and repeated trials are written into the staging store
   beside the study store (``storage.staging``); only when they are complete are they swapped
   in, and only then (with --overwrite) are the subject's old marker, fit markers, ceiling
   marker and results cleared, in the same journaled step; the subject is marked done.
A failure before the swap leaves the store and the progress markers byte-identical.
A subject already ingested with the same parameters is skipped; with other parameters the run
is refused (use --overwrite).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from neurotask.pipeline.formats import bold5000
from neurotask.pipeline.config import Config
from neurotask.pipeline.errors import DataError
from neurotask.pipeline.formats.anatomy import AnatomyFileError, anatomy_in_grid, check_anatomy_header
from neurotask.storage import (ChunkPlan, Stage, StudyStore, anatomy_group, mask_to_ijk, responses_group,
                               results_group, to_volume)
from neurotask.storage.checksums import ANATOMY_CHUNKS, CHUNKS
from neurotask.storage import staging as staging_area

logger = logging.getLogger(__name__)

_MAX_GAP = 40  # how far past a missing session/run we look for stray later files
_ZSCORE_ELEMENTS = 1 << 16  # values z-scored at once: bounds the float64 temporary (512 KiB)


# --------------------------------------------------------------------------- file layout


def data_file(cfg: Config, key: str, subject: str, **extra: Any) -> Path:
    """The path that template ``data.<key>`` gives for one subject (and session/run/roi/tr)."""
    return cfg.data_path(getattr(cfg.data, key), subject, key=key, **extra)


@dataclass
class SubjectFiles:
    subject: str
    stim_list: Path
    sessions: list[Path] = field(default_factory=list)  # glmsingle betas, in session order
    roi_mats: dict[int, Path] = field(default_factory=dict)  # release1_rois: TR -> file
    brain_mask: Path | None = None
    voxel_mask: Path | None = None
    anatomy: Path | None = None  # data.anatomy: the report's underlay
    roi_masks: dict[str, Path] = field(default_factory=dict)  # ROI -> existing file (any spelling)
    events: list[list[Path]] = field(default_factory=list)  # per session, its runs
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _contiguous(path_of: Callable[[int], Path], count: int | str) -> tuple[list[Path], list[Path]]:
    """(existing files 1..count in order, missing ones). 'auto': 1..N contiguously; a gap before
    later files reports the first absent one as missing."""
    if count != "auto":
        paths = [path_of(k) for k in range(1, int(count) + 1)]
        return [p for p in paths if p.is_file()], [p for p in paths if not p.is_file()]
    found, k = [], 1
    while path_of(k).is_file():
        found.append(path_of(k))
        k += 1
    if any(path_of(j).is_file() for j in range(k + 1, k + _MAX_GAP)) or not found:
        return found, [path_of(k)]
    return found, []


def _roi_mask_file(cfg: Config, subject: str, roi: str) -> tuple[Path, Path | None]:
    """(canonical path, the existing file: canonical or a released spelling variant, or None)."""
    canonical = data_file(cfg, "roi_masks", subject, roi=roi)
    for spelling in (roi, *bold5000.ROI_MASK_SPELLINGS.get(roi, ())):
        p = data_file(cfg, "roi_masks", subject, roi=spelling)
        if p.is_file():
            return canonical, p
    return canonical, None


def _events_files(cfg: Config, subject: str, n_sessions: int | str, files: SubjectFiles) -> None:
    """Per session, its runs 1..R (R found contiguously). n_sessions 'auto' (release1_rois):
    sessions found contiguously by their first run."""
    def run_path(s: int, r: int) -> Path:
        return data_file(cfg, "events", subject, session=s, run=r)

    found_sessions, missing = _contiguous(lambda s: run_path(s, 1), n_sessions)
    files.missing += [f"{p} (events of run 1)" for p in missing]
    for s in range(1, len(found_sessions) + len(missing) + 1):
        if not run_path(s, 1).is_file():
            files.events.append([])
            continue
        runs, gaps = _contiguous(lambda r: run_path(s, r), "auto")
        files.missing += [str(p) for p in gaps]
        files.events.append(runs)


def locate_files(cfg: Config, subject: str) -> SubjectFiles:
    d = cfg.data
    files = SubjectFiles(subject, data_file(cfg, "stim_list", subject))
    if not files.stim_list.is_file():
        files.missing.append(str(files.stim_list))
    if d.format == "glmsingle":
        files.sessions, gaps = _contiguous(lambda s: data_file(cfg, "betas", subject, session=s), d.sessions)
        files.missing += [str(p) for p in gaps]
        if d.voxels == "brain" and d.brain_mask:
            files.brain_mask = data_file(cfg, "brain_mask", subject)
        if d.voxels == "mask":
            files.voxel_mask = data_file(cfg, "voxel_mask", subject)
        if d.anatomy:
            files.anatomy = data_file(cfg, "anatomy", subject)
        for p in (files.brain_mask, files.voxel_mask, files.anatomy):
            if p is not None and not p.is_file():
                files.missing.append(str(p))
        for roi in d.rois:
            canonical, found = _roi_mask_file(cfg, subject, roi)
            if found is None:
                variants = bold5000.ROI_MASK_SPELLINGS.get(roi, ())
                also = f" (also looked for the spelling{'s' if len(variants) > 1 else ''} {', '.join(variants)})" \
                    if variants else ""
                files.missing.append(f"{canonical}{also}")
            else:
                files.roi_masks[roi] = found
                if found != canonical:
                    files.notes.append(f"ROI {roi}: using {found.name} (the released spelling)")
        n_sessions: int | str = len(files.sessions) + len(gaps)
    else:
        for tr in d.trs:
            p = data_file(cfg, "roi_mat", subject, tr=tr)
            files.roi_mats[tr] = p
            if not p.is_file():
                files.missing.append(str(p))
        n_sessions = "auto"
    if d.events:
        _events_files(cfg, subject, n_sessions, files)
    return files


def validate_layout(cfg: Config) -> dict[str, SubjectFiles]:
    """Every subject's files; raises DataError listing every missing file at once."""
    if cfg.data.format == "nsd":
        from neurotask.pipeline.stages import ingest_nsd

        return ingest_nsd.validate_layout(cfg)
    files = {s: locate_files(cfg, s) for s in cfg.study.subjects}
    missing = [p for f in files.values() for p in f.missing]
    if missing:
        listing = "\n  ".join(missing)
        raise DataError(f"{len(missing)} input file(s) missing (config {cfg.path}; format "
                        f"'{cfg.data.format}'; see configs/bold5000.yaml for the expected layout):\n  {listing}")
    return files


# --------------------------------------------------------------------------- checks (headers only)


@dataclass
class SubjectPlan:
    files: SubjectFiles
    stim: bold5000.StimList
    session_trials: list[int] | None  # trials per session, in order; None if unknown
    events: bold5000.Events | None
    grid: tuple[int, int, int] | None  # glmsingle: the betas' (x, y, z)
    roi_voxels: dict[str, int] | None  # release1_rois: voxels per ROI

    @property
    def subject(self) -> str:
        return self.files.subject


def _check_glmsingle(cfg: Config, files: SubjectFiles, stim: bold5000.StimList) -> tuple[list[int], tuple]:
    shapes = [bold5000.nifti_shape(p) for p in files.sessions]
    for p, shp in zip(files.sessions, shapes):
        if len(shp) != 4 or shp[:3] != shapes[0][:3]:
            raise DataError(f"{p}: shape {shp}; expected 4D (x, y, z, trials) on the grid {shapes[0][:3]} "
                            f"of {files.sessions[0].name}")
    counts = [int(s[3]) for s in shapes]
    if sum(counts) != stim.n_trials:
        hint = ""
        if cfg.data.sessions == "auto":
            hint = (f". With data.sessions 'auto', sessions 1-{len(counts)} were found; BOLD5000 has 15 "
                    "sessions for CSI1-3 and 9 for CSI4: is a session file missing (set data.sessions "
                    "to have it named) or the wrong stimulus list configured?")
        raise DataError(
            f"{files.subject}: the betas hold {sum(counts)} trials ({' + '.join(map(str, counts))} in "
            f"{len(counts)} sessions) but the stimulus list {files.stim_list} has {stim.n_trials} lines{hint}")
    grid = tuple(shapes[0][:3])
    for p in [files.brain_mask, files.voxel_mask, *files.roi_masks.values()]:
        if p is not None:
            shp = bold5000.nifti_shape(p)
            if shp[:3] != grid or len(shp) not in (3, 4) or (len(shp) == 4 and shp[3] != 1):
                raise DataError(f"mask {p} has shape {shp}, the betas' grid is {grid}")
    if files.anatomy is not None:  # any grid: resampled to the betas' at ingest
        try:
            check_anatomy_header(files.anatomy)
        except AnatomyFileError as e:
            raise DataError(f"{files.subject}: data.anatomy {e}") from e
    return counts, grid


def _check_events(cfg: Config, files: SubjectFiles, stim, counts: list[int] | None) -> tuple[bold5000.Events, list[int]]:
    per_session = [bold5000.concat_events([bold5000.read_events(p) for p in runs]) if runs else None
                   for runs in files.events]
    events = bold5000.concat_events([e for e in per_session if e is not None])
    bold5000.check_events(events, stim, files.subject)
    n_events = [0 if e is None else e.n_trials for e in per_session]
    if counts is not None:
        for s, (a, b) in enumerate(zip(n_events, counts), start=1):
            if a != b:
                raise DataError(f"{files.subject}: session {s}: the events files ({len(files.events[s - 1])} "
                                f"runs) hold {a} trials, the betas {files.sessions[s - 1]} hold {b}")
    return events, n_events


def check_subject(cfg: Config, files: SubjectFiles) -> SubjectPlan:
    """Everything that can be checked without reading the data; raises DataError."""
    stim = bold5000.read_stim_list(files.stim_list)
    # The image grouping is checked here, not first when writing (a duplicated plain line is
    # refused by image_trials): by then an --overwrite would have cleared the old subject.
    bold5000.image_trials(stim, cfg.data.repeats)
    bold5000.repeated_trials(stim)
    counts: list[int] | None = None
    grid = roi_voxels = None
    if cfg.data.format == "glmsingle":
        counts, grid = _check_glmsingle(cfg, files, stim)
    else:
        for tr, p in files.roi_mats.items():
            n = bold5000.check_roi_mat(p, cfg.data.rois, stim.n_trials)
            if roi_voxels is not None and n != roi_voxels:
                first = next(iter(files.roi_mats.values()))
                raise DataError(f"{p}: voxels per ROI {n} differ from {first}'s {roi_voxels}; the TR "
                                "files of one subject must hold the same voxels")
            roi_voxels = n
    events = None
    if cfg.data.events:
        events, n_events = _check_events(cfg, files, stim, counts)
        counts = counts or n_events
    if counts is None:
        counts = bold5000.known_session_trials(files.subject, stim.n_trials)
    if counts is None and cfg.data.zscore_sessions:
        raise DataError(f"{files.subject}: data.zscore_sessions needs the session boundaries; the ROI files "
                        f"do not carry them and {stim.n_trials} trials is not a full BOLD5000 subject's count. "
                        "Set data.events to the events files, or data.zscore_sessions: false")
    return SubjectPlan(files, stim, counts, events, grid, roi_voxels)


# --------------------------------------------------------------------------- staging (data read)


@dataclass
class Staged:
    """A subject's trials (n_trials, v) float32 (a memmap on disk for glmsingle), the voxels'
    ijk (v, 3) and roi (v,), finite (v,) bool, constant (v,) bool, and attrs for the store."""

    trials: np.ndarray
    ijk: np.ndarray
    roi: list[str]
    finite: np.ndarray
    constant: np.ndarray
    attrs: dict[str, Any]
    mean_beta: np.ndarray | None = None  # (v,) float64: each voxel's mean raw beta over every trial
    voxel_extra: dict[str, np.ndarray] = field(default_factory=dict)  # more (v,) voxel coordinates (NSD: ncsnr)


def zscore_columns(block: np.ndarray) -> np.ndarray:
    """z-score each column of (t, v) float32 in place, in float64 a few columns at a time (so
    the temporaries stay small); constant columns become 0. -> constant (v,) bool."""
    constant = np.zeros(block.shape[1], dtype=bool)
    step = max(1, _ZSCORE_ELEMENTS // max(1, block.shape[0]))
    for a in range(0, block.shape[1], step):
        b = block[:, a : a + step].astype(np.float64)
        mean, sd = b.mean(axis=0), b.std(axis=0)
        const = ~(sd > 1e-12 * np.maximum(np.abs(mean), 1.0))
        b -= mean
        b /= np.where(const, 1.0, sd)
        b[:, const] = 0.0
        block[:, a : a + step] = b
        constant[a : a + step] = const
    return constant


def _roi_labels(masks: dict[str, np.ndarray], ijk: np.ndarray, shape) -> tuple[list[str], int]:
    """ROI label per voxel ('' outside all), the first listed ROI winning on overlaps."""
    label = np.full(shape, "", dtype=object)
    seen = np.zeros(shape, dtype=bool)
    overlap = 0
    for name, m in masks.items():
        overlap += int((seen & m).sum())
        seen |= m
    for name, m in reversed(list(masks.items())):
        label[m] = name
    return [str(x) for x in label[ijk[:, 0], ijk[:, 1], ijk[:, 2]]], overlap


def _selection(cfg: Config, plan: SubjectPlan) -> tuple[np.ndarray, str, np.ndarray | None, dict]:
    """The selected voxels (x, y, z) bool, how they were chosen, the affine of the mask file
    used (None: none), and the ROI masks."""
    files, grid = plan.files, plan.grid
    rois = {name: bold5000.load_mask(p, grid) for name, p in files.roi_masks.items()}
    d = cfg.data
    if d.voxels == "rois":
        selected = np.zeros(grid, dtype=bool)
        for m in rois.values():
            selected |= m
        return selected, "union of the ROI masks", None, rois
    mask_file = files.voxel_mask if d.voxels == "mask" else files.brain_mask
    if mask_file is not None:
        return bold5000.load_mask(mask_file, grid), str(mask_file), bold5000.nifti_affine(mask_file), rois
    # Derived brain mask: finite in the first trial volume here; voxels non-finite in any later
    # trial are dropped while reading, which leaves exactly those finite in every session.
    first = next(bold5000.iter_volumes(files.sessions[0]))
    return np.isfinite(first), "derived: finite in every trial of every session", None, rois


def _stage_glmsingle(cfg: Config, plan: SubjectPlan, staging: Path) -> Staged:
    files, subject = plan.files, plan.subject
    selected, source, mask_affine, rois = _selection(cfg, plan)
    ijk = mask_to_ijk(selected, cfg.data.voxel_order)
    if len(ijk) == 0:
        raise DataError(f"{subject}: the voxel selection ({source}) is empty")
    roi, overlap = _roi_labels(rois, ijk, plan.grid)
    v, n_trials = len(ijk), plan.stim.n_trials
    trials = np.lib.format.open_memmap(staging, mode="w+", dtype=np.float32, shape=(n_trials, v))
    finite = np.ones(v, dtype=bool)
    constant = np.zeros(v, dtype=bool)
    raw_sum = np.zeros(v, dtype=np.float64)  # before z-scoring: the mean-beta underlay
    start = 0
    i, j, k = ijk[:, 0], ijk[:, 1], ijk[:, 2]
    for s, (path, count) in enumerate(zip(files.sessions, plan.session_trials), start=1):
        block = np.empty((count, v), dtype=np.float32)  # this session's selected voxels only
        t = -1
        for t, vol in enumerate(bold5000.iter_volumes(path)):
            block[t] = vol[i, j, k]
        if t + 1 != count:
            raise DataError(f"{path}: read {t + 1} trial volumes, the header says {count}")
        ok = np.isfinite(block).all(axis=0)
        finite &= ok
        block[:, ~ok] = 0.0
        raw_sum += block.sum(axis=0, dtype=np.float64)
        if cfg.data.zscore_sessions:
            constant |= zscore_columns(block) & ok
        trials[start : start + count] = block
        start += count
        del block
        logger.info(f"  {subject}: session {s}/{len(files.sessions)} read ({count} trials)")
    trials.flush()
    affine = mask_affine if mask_affine is not None else bold5000.nifti_affine(files.sessions[0])
    attrs = {
        "voxel_space": "volume", "volume_shape": list(plan.grid), "affine": affine.tolist(),
        # The betas' own affine is unreliable (release 2.0 note); a mask file's is preferred.
        "affine_source": "mask file" if mask_affine is not None else "betas (unreliable in release 2.0)",
        "voxel_selection": source, "roi_overlap_voxels": overlap,
    }
    return Staged(trials, ijk, roi, finite, constant, attrs, mean_beta=raw_sum / max(n_trials, 1))


def _stage_release1(cfg: Config, plan: SubjectPlan) -> Staged:
    rois = cfg.data.rois
    total = None
    for tr, path in plan.files.roi_mats.items():
        data = bold5000.read_roi_mat(path, rois)
        block = np.concatenate([data[r] for r in rois], axis=1)
        total = block if total is None else total + block
        logger.info(f"  {plan.subject}: {path.name} read ({block.shape[0]} trials x {block.shape[1]} ROI voxels)")
    trials = total / len(plan.files.roi_mats)
    ijk = np.concatenate([np.stack([np.full(plan.roi_voxels[r], a), np.arange(plan.roi_voxels[r]),
                                    np.full(plan.roi_voxels[r], -1)], axis=1) for a, r in enumerate(rois)])
    roi = [r for r in rois for _ in range(plan.roi_voxels[r])]
    finite = np.isfinite(trials).all(axis=0)
    trials = trials.astype(np.float32)
    trials[:, ~finite] = 0.0
    constant = np.zeros(trials.shape[1], dtype=bool)
    if cfg.data.zscore_sessions:
        start = 0
        for count in plan.session_trials:
            constant |= zscore_columns(trials[start : start + count]) & finite
            start += count
    attrs = {"voxel_space": "roi_index", "trs": list(cfg.data.trs),
             "voxel_selection": "release-1.0 ROI files (i: ROI index in roi_order, j: column in that ROI)",
             "roi_order": list(rois), "roi_files": [str(p) for p in plan.files.roi_mats.values()]}
    return Staged(trials, ijk, roi, finite, constant, attrs)


# --------------------------------------------------------------------------- store


def _image_rows(block: np.ndarray, order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Mean over each image's trials. block (n_trials, c) -> (n_images, c) float32."""
    if (sizes == 1).all():
        return block[order]
    sums = np.add.reduceat(block[order].astype(np.float64), starts, axis=0)
    return (sums / sizes[:, None]).astype(np.float32)


def ingest_params(cfg: Config) -> dict[str, Any]:
    """The settings that determine a subject's stored responses."""
    d = cfg.data
    out = {"format": d.format, "voxels": d.voxels, "rois": list(d.rois), "repeats": d.repeats,
           "zscore_sessions": d.zscore_sessions, "voxel_order": d.voxel_order, "chunk_size": d.chunk_size}
    if d.format == "nsd":
        from neurotask.pipeline.stages import ingest_nsd

        out.update(ingest_nsd.ingest_params(cfg))
    elif d.format == "release1_rois":
        out["trs"] = list(d.trs)
    elif d.voxels == "brain":
        out["brain_mask"] = "file" if d.brain_mask else "derived"
    return out


def response_units(cfg: Config) -> str:
    """Units of the stored responses: z-scored ones are dimensionless; GLMsingle's betas are
    in percent signal change; the release-1.0 ROI files do not say."""
    if cfg.data.zscore_sessions:
        return "1"
    return "percent signal change" if cfg.data.format in ("glmsingle", "nsd") else "unknown"


def _write(cfg: Config, store: StudyStore, plan: SubjectPlan, staged: Staged) -> dict:
    subject, stim = plan.subject, plan.stim
    keep = np.flatnonzero(staged.finite)
    images, groups = bold5000.image_trials(stim, cfg.data.repeats)
    rep_names, rep_trials = bold5000.repeated_trials(stim)
    sizes = np.array([g.size for g in groups])
    order = np.concatenate(groups)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    counts = plan.session_trials
    session_of_trial = (np.repeat(np.arange(1, len(counts) + 1), counts) if counts
                        else np.zeros(stim.n_trials, dtype=np.int64))
    dropped = np.flatnonzero(~staged.finite)
    attrs = {
        **staged.attrs, "format": cfg.data.format, "voxel_order": cfg.data.voxel_order,
        "repeats": cfg.data.repeats, "zscore_sessions": cfg.data.zscore_sessions,
        "n_sessions": len(counts) if counts else None, "trials_per_session": counts,
        "stim_list": str(plan.files.stim_list), "stim_list_rep_prefix": stim.has_rep_prefix,
        "dropped_nonfinite_voxels": int(dropped.size),
        "dropped_nonfinite_ijk": staged.ijk[dropped[:100]].tolist(),
        "constant_voxels": int(staged.constant[keep].sum()),
        "events_checked": plan.events is not None, "ingest": ingest_params(cfg),
    }
    image_coords = {"session": np.array([session_of_trial[g[0]] for g in groups], dtype=np.int16),
                    "n_showings": sizes.astype(np.int16)}
    shared = getattr(plan, "shared_images", None)  # NSD: the common test set
    if shared is not None:
        image_coords["shared"] = np.array([name in shared for name in images], dtype=bool)
        attrs["shared_images"] = int(image_coords["shared"].sum())
    chunks = ChunkPlan(keep.size, cfg.data.chunk_size)
    store.init_responses(
        subject, images, staged.ijk[keep], [staged.roi[i] for i in keep], chunks.chunk_size, attrs,
        image_coords=image_coords, repeated_images=rep_names, n_showings=rep_trials.shape[0],
        units=response_units(cfg), voxel_extra={k: v[keep] for k, v in staged.voxel_extra.items()})
    for voxels in chunks:
        cols = keep[voxels]
        block = np.asarray(staged.trials[:, cols], dtype=np.float32)  # (n_trials, chunk)
        rows = _image_rows(block, order, starts, sizes)
        # Single trials of the repeated images (showing, repeated image, voxel), NaN-padded:
        # what noise ceilings are estimated from.
        reps = np.where((rep_trials >= 0)[..., None], block[np.maximum(rep_trials, 0)], np.nan) if rep_names else None
        store.write_responses(subject, voxels, rows, reps)
    return {"images": len(images), "voxels": int(keep.size), "dropped_nonfinite_voxels": int(dropped.size),
            "constant_voxels": int(staged.constant[keep].sum()), "repeated_images": len(rep_names),
            "params": ingest_params(cfg)}


def _describe_policy(cfg: Config, plan: SubjectPlan) -> None:
    stim = plan.stim
    for note in plan.files.notes:
        logger.info(f"  {plan.subject}: {note}")
    if cfg.data.repeats != "exclude" or cfg.data.format == "nsd":
        return
    if not stim.has_rep_prefix:
        logger.info(f"  {plan.subject}: {stim.path.name} has no '{bold5000.REP_PREFIX}' prefixes (release 2.0 list): "
                    "repeats 'exclude' keeps the FIRST showing of each repeated image")
    else:
        only_rep = set(stim.images[stim.is_rep]) - set(stim.images[~stim.is_rep])
        if only_rep:
            logger.info(f"  {plan.subject}: {len(only_rep)} image(s) appear only with the '{bold5000.REP_PREFIX}' "
                        "prefix and are left out by repeats 'exclude' (use 'average' to keep them)")


def subject_underlay(plan: SubjectPlan, staged: Staged) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The report's underlay for a subject in its functional grid: data.anatomy resampled to
    the betas' grid, else each kept voxel's mean raw beta (NaN elsewhere). -> (volume (i, j, k),
    affine (4, 4), what it is), or None when the voxels have no volume (release-1.0 ROI files)."""
    if staged.attrs.get("voxel_space") != "volume":
        return None
    shape = tuple(int(x) for x in staged.attrs["volume_shape"])
    affine = np.asarray(staged.attrs["affine"], dtype=np.float64)
    if plan.files.anatomy is not None:
        try:
            volume = anatomy_in_grid(plan.files.anatomy, shape, affine)
        except AnatomyFileError as e:
            raise DataError(f"{plan.subject}: data.anatomy {e}") from e
        if not np.isfinite(volume).any():
            raise DataError(f"{plan.subject}: data.anatomy {plan.files.anatomy} does not overlap the betas' grid "
                            "(check its affine)")
        return volume, affine, f"anatomy {plan.files.anatomy.name} (data.anatomy, in the functional grid)"
    keep = staged.finite
    volume = to_volume(np.asarray(staged.mean_beta, dtype=np.float32)[keep], staged.ijk[keep], shape)
    return volume, affine, "mean of the raw betas over every trial (analysed voxels only)"


def ingest(cfg: Config, *, overwrite: bool = False) -> dict[str, dict]:
    """Ingest every subject of the config that is not ingested yet (all with ``overwrite``).

    All subjects' layouts and headers are checked before any data are read; a subject's old
    responses, markers and results are replaced only once its new data were read in full."""
    files = validate_layout(cfg)
    store = StudyStore(cfg.store_path)
    staging_area.recover(store)  # a swap interrupted by a crash is finished first
    progress = store.progress() if store.exists() else None
    params = ingest_params(cfg)
    done: dict[str, dict] = {}
    todo = []
    for subject, f in files.items():
        record = progress.read(Stage.INGEST, subject) if progress else None
        if record is not None and store.has(responses_group(subject)) and not overwrite:
            stored = record.get("params")
            if stored is not None and stored != params:
                keys = [k for k in dict.fromkeys([*stored, *params]) if stored.get(k) != params.get(k)]
                was = ", ".join(f"data.{k}={stored.get(k)!r}" for k in keys)
                now = ", ".join(f"data.{k}={params.get(k)!r}" for k in keys)
                raise DataError(f"{subject} was ingested with {was}; the config {cfg.path} asks for {now}. "
                                "Use `neurotask ingest --overwrite` to re-ingest it (its fit results are "
                                "then discarded), or a new study.workdir")
            logger.info(f"{subject}: already ingested, skipped")
            done[subject] = record
            continue
        todo.append(f)
    # every subject checked before any data are read
    if cfg.data.format == "nsd":
        from neurotask.pipeline.stages import ingest_nsd

        plans = ingest_nsd.check_subjects(cfg, todo, files)
    else:
        plans = [check_subject(cfg, f) for f in todo]

    staging_dir = cfg.workdir / "staging"
    for plan in plans:
        subject = plan.subject
        logger.info(f"{subject}: ingesting ({cfg.data.format}: "
                    f"{len(plan.files.roi_mats) if cfg.data.format == 'release1_rois' else len(plan.files.sessions)} file(s))")
        _describe_policy(cfg, plan)
        staging = staging_dir / f"{subject}.npy"
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            if cfg.data.format == "nsd":
                staged = ingest_nsd.stage(cfg, plan, staging)
            elif cfg.data.format == "glmsingle":
                staged = _stage_glmsingle(cfg, plan, staging)
            else:
                staged = _stage_release1(cfg, plan)
            if not staged.finite.any():
                raise DataError(f"{subject}: no voxel is finite in every session")
            # Written beside the old subject; swapped in only once complete.
            staged_store = staging_area.staging_store(store)
            summary = _write(cfg, staged_store, plan, staged)
            underlay = subject_underlay(plan, staged)
            groups, drop = [responses_group(subject)], [results_group(subject)]
            # Durable, with checksums for `neurotask verify`, before the swap and the marker.
            chunks = staged_store.seal_responses(subject)
            info: dict[str, Any] = {}
            if underlay is not None:
                staged_store.write_anatomy(subject, *underlay)
                info = {"anatomy": underlay[2], ANATOMY_CHUNKS: staged_store.seal_anatomy(subject)}
                groups.append(anatomy_group(subject))
            else:
                drop.append(anatomy_group(subject))  # an old underlay would not match the new voxels
            staging_area.replace(store, groups, drop_groups=drop,
                                 clear_markers=[(Stage.INGEST, subject), (Stage.FIT, subject),
                                                (Stage.CEILING, subject), (Stage.FINALIZE, subject)])
            store.progress().mark_done(Stage.INGEST, subject, info={**summary, **info, CHUNKS: chunks})
        finally:
            staged = None
            staging_area.discard(store)
            staging.unlink(missing_ok=True)
            if staging_dir.is_dir() and not any(staging_dir.iterdir()):
                staging_dir.rmdir()
        msg = f"{subject}: {summary['images']} images x {summary['voxels']} voxels"
        if summary["dropped_nonfinite_voxels"]:
            msg += f"; dropped {summary['dropped_nonfinite_voxels']} voxel(s) with NaN/inf values"
        if summary["constant_voxels"]:
            msg += f"; {summary['constant_voxels']} constant voxel(s) kept (their r is undefined)"
        logger.info(msg)
        done[subject] = summary
    return done
