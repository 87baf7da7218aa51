"""Ingest: a subject's per-session NIfTI betas + masks + stimulus list -> ``responses/<subject>``.

Order of work, so that bad input never touches the store and memory stays ~ one session:
1. validate the layout (every missing file listed at once) and the trial counts (headers only);
2. read one session at a time: keep the selected voxels, note non-finite ones, z-score each
   voxel within the session, and write the trials to a staging file on disk;
3. per voxel chunk: build one row per image (the unprefixed showing, or the mean of all
   showings), write it to the store, plus the repeated images' single trials;
4. mark the subject done. A subject already ingested is skipped.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import bold5000
from pipeline.config import Config
from pipeline.errors import DataError
from storage import Progress, StudyStore, mask_to_ijk


@dataclass
class SubjectFiles:
    subject: str
    stim_list: Path
    sessions: list[Path]
    brain_mask: Path | None
    roi_masks: dict[str, Path]
    missing: list[Path] = field(default_factory=list)


def _session_paths(cfg: Config, subject: str) -> tuple[list[Path], list[Path]]:
    """(existing session files in order, missing ones). 'auto' finds 1..N contiguously."""
    template = cfg.data.betas
    if cfg.data.sessions == "auto":
        found, s = [], 1
        while cfg.data_path(template, subject, session=s).is_file():
            found.append(cfg.data_path(template, subject, session=s))
            s += 1
        later = [cfg.data_path(template, subject, session=k) for k in range(s + 1, s + 40)]
        stray = [p for p in later if p.is_file()]
        if stray:  # a gap: session s is missing but later ones exist
            return found, [cfg.data_path(template, subject, session=s)]
        return found, ([] if found else [cfg.data_path(template, subject, session=1)])
    paths = [cfg.data_path(template, subject, session=s) for s in range(1, cfg.data.sessions + 1)]
    return [p for p in paths if p.is_file()], [p for p in paths if not p.is_file()]


def locate_files(cfg: Config, subject: str) -> SubjectFiles:
    sessions, missing = _session_paths(cfg, subject)
    stim = cfg.data_path(cfg.data.stim_list, subject)
    brain = cfg.data_path(cfg.data.brain_mask, subject) if cfg.data.brain_mask else None
    rois = {r: cfg.data_path(cfg.data.roi_masks, subject, roi=r) for r in cfg.data.rois}
    for p in [stim, brain, *rois.values()]:
        if p is not None and not p.is_file():
            missing.append(p)
    return SubjectFiles(subject, stim, sessions, brain, rois, missing)


def validate_layout(cfg: Config) -> dict[str, SubjectFiles]:
    """Every subject's files; raises DataError listing every missing file at once."""
    files = {s: locate_files(cfg, s) for s in cfg.study.subjects}
    missing = [p for f in files.values() for p in f.missing]
    if missing:
        listing = "\n  ".join(str(p) for p in missing)
        raise DataError(f"{len(missing)} input file(s) missing (config {cfg.path}):\n  {listing}")
    return files


def _voxel_selection(cfg: Config, files: SubjectFiles, shape) -> tuple[np.ndarray, list[str], dict]:
    """Voxel indices (v, 3) and ROI label per voxel, in the configured order."""
    rois = {name: bold5000.load_mask(p, shape) for name, p in files.roi_masks.items()}
    any_roi = np.zeros(shape, dtype=bool)
    overlap = 0
    for m in rois.values():
        overlap += int((any_roi & m).sum())
        any_roi |= m
    if cfg.data.voxels == "rois":
        selected = any_roi
    elif files.brain_mask is not None:
        selected = bold5000.load_mask(files.brain_mask, shape)
    else:  # derived later from the data: voxels finite in every session
        selected = np.ones(shape, dtype=bool)
    ijk = mask_to_ijk(selected, cfg.data.voxel_order)
    label = np.full(shape, "", dtype=object)
    for name, m in reversed(list(rois.items())):  # the first listed ROI wins on overlaps
        label[m] = name
    roi = [str(x) for x in label[ijk[:, 0], ijk[:, 1], ijk[:, 2]]]
    return ijk, roi, {"roi_overlap_voxels": overlap}


def _zscore(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z-score columns of (t, v) in float64; constant columns become 0. -> (z, constant (v,))."""
    b = block.astype(np.float64)
    mean, sd = b.mean(axis=0), b.std(axis=0)
    constant = ~(sd > 1e-12 * np.maximum(np.abs(mean), 1.0))
    z = (b - mean) / np.where(constant, 1.0, sd)
    z[:, constant] = 0.0
    return z.astype(np.float32), constant


def ingest_subject(cfg: Config, files: SubjectFiles, store: StudyStore, log=print) -> dict:
    subject = files.subject
    stim = bold5000.read_stim_list(files.stim_list)
    shapes = [bold5000.nifti_shape(p) for p in files.sessions]
    for p, shp in zip(files.sessions, shapes):
        if len(shp) != 4 or shp[:3] != shapes[0][:3]:
            raise DataError(f"{p}: shape {shp}; expected 4D (x, y, z, trials) on the grid {shapes[0][:3]}")
    counts = [s[3] for s in shapes]
    if sum(counts) != stim.n_trials:
        raise DataError(
            f"{subject}: the betas hold {sum(counts)} trials ({' + '.join(map(str, counts))} in "
            f"{len(counts)} sessions) but the stimulus list {files.stim_list} has {stim.n_trials} lines"
        )
    shape = shapes[0][:3]
    ijk, roi, info = _voxel_selection(cfg, files, shape)
    images, groups = bold5000.image_trials(stim, cfg.data.repeats)
    rep_names, rep_trials = bold5000.repeated_trials(stim)
    v = len(ijk)

    staging = cfg.workdir / "staging" / f"{subject}.f32"
    staging.parent.mkdir(parents=True, exist_ok=True)
    trials = np.lib.format.open_memmap(staging, mode="w+", dtype=np.float32, shape=(stim.n_trials, v))
    finite = np.ones(v, dtype=bool)
    constant = np.zeros(v, dtype=bool)
    session_of_trial = np.repeat(np.arange(1, len(counts) + 1), counts)
    start, affine = 0, None
    try:
        for s, path in enumerate(files.sessions, start=1):
            data, affine_s = bold5000.load_volume(path)
            affine = affine_s if affine is None else affine
            block = data[ijk[:, 0], ijk[:, 1], ijk[:, 2], :].T  # (t, v)
            del data
            ok = np.isfinite(block).all(axis=0)
            finite &= ok
            block[:, ~ok] = 0.0
            if cfg.data.zscore_sessions:
                block, const = _zscore(block)
                constant |= const & ok
            trials[start : start + block.shape[0]] = block
            start += block.shape[0]
            log(f"  {subject}: session {s}/{len(files.sessions)} read ({block.shape[0]} trials)")
        keep = np.flatnonzero(finite)
        if keep.size == 0:
            raise DataError(f"{subject}: no voxel is finite in every session")
        chunk = cfg.data.chunk_size
        image_session = np.array([session_of_trial[g[0]] for g in groups], dtype=np.int16)
        n_showings = np.array([g.size for g in groups], dtype=np.int16)
        attrs = {
            "volume_shape": list(shape), "affine": np.asarray(affine).tolist(),
            "voxel_order": cfg.data.voxel_order, "repeats": cfg.data.repeats,
            "zscore_sessions": cfg.data.zscore_sessions, "n_sessions": len(counts),
            "trials_per_session": counts, "stim_list": str(files.stim_list),
            "dropped_nonfinite_voxels": int((~finite).sum()),
            "dropped_nonfinite_ijk": ijk[~finite].tolist()[:100],
            "constant_voxels": int(constant[keep].sum()), **info,
        }
        store.init_responses(subject, images, ijk[keep], [roi[i] for i in keep], chunk, attrs,
                             image_coords={"session": image_session, "n_showings": n_showings},
                             repeated_images=rep_names, n_showings=rep_trials.shape[0])
        for a in range(0, keep.size, chunk):
            cols = keep[a : a + chunk]
            block = np.asarray(trials[:, cols])  # (n_trials, chunk)
            rows = np.stack([block[g].mean(axis=0) for g in groups])
            # Single trials of the repeated images (showing, repeated image, voxel), NaN-padded:
            # what noise ceilings are estimated from.
            reps = np.where((rep_trials >= 0)[..., None], block[np.maximum(rep_trials, 0)], np.nan)
            store.write_responses(subject, slice(a, a + cols.size), rows, reps if rep_names else None)
    finally:
        del trials
        shutil.rmtree(staging.parent, ignore_errors=True)
    return {"images": len(images), "voxels": int(keep.size), "dropped_nonfinite_voxels": int((~finite).sum()),
            "constant_voxels": int(constant[keep].sum()), "repeated_images": len(rep_names)}


def ingest(cfg: Config, *, overwrite: bool = False, log=print) -> dict[str, dict]:
    """Ingest every subject of the config that is not ingested yet."""
    files = validate_layout(cfg)
    store = StudyStore(cfg.store_path)
    store.create()
    progress = Progress(cfg.workdir / "progress", store.store_id)
    done = {}
    for subject, f in files.items():
        if progress.is_done("ingest", subject) and store.has(f"responses/{subject}") and not overwrite:
            log(f"{subject}: already ingested, skipped")
            done[subject] = progress.read("ingest", subject)
            continue
        if overwrite:  # results of the old responses would no longer match
            progress.clear("ingest", subject)
            progress.clear("fit", subject)
            progress.unmark("ceiling", subject)
            store.remove(f"results/{subject}")
        log(f"{subject}: ingesting {len(f.sessions)} session(s)")
        summary = ingest_subject(cfg, f, store, log=log)
        progress.mark_done("ingest", subject, info=summary)
        msg = f"{subject}: {summary['images']} images x {summary['voxels']} voxels"
        if summary["dropped_nonfinite_voxels"]:
            msg += f"; dropped {summary['dropped_nonfinite_voxels']} voxel(s) with NaN/inf values"
        if summary["constant_voxels"]:
            msg += f"; {summary['constant_voxels']} constant voxel(s) kept (their r is undefined)"
        log(msg)
        done[subject] = summary
    return done
