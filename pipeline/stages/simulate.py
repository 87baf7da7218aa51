"""A synthetic study written in the real BOLD5000 file formats, with known ground truth.

Everything downstream (ingest, fit, analysis) runs on it exactly as on real data:

- per subject, a release-1.0 style stimulus list (presentation order; every showing of a
  repeated image but one prefixed ``rep_``), GLMsingle-style betas (one 4D NIfTI per session,
  float32, NaN outside the brain, a per-session offset and gain per voxel; the offsets share
  a smooth EPI-like mean intensity, so the mean beta looks like an anatomy), a brain mask and
  ROI masks ``sub-CSI{n}_mask-{LH,RH}{EarlyVis,LOC,OPA,PPA,RSC}.nii.gz``;
- a feature bank for the 21 Taskonomy tasks in the study store, as the featurizer stores it,
  except for the feature spaces that the config's ``features`` section computes;
- on request (``write_images``, ``write_weights``), synthetic image files named like the
  study's images and randomly initialised encoders in the official checkpoint format, so
  that ``neurotask featurize`` runs on the study for real.

Generative model. Each image has latent factors: one block per Taskonomy cluster (3D, 2D,
low-dimensional geometric, semantic, and denoise's "outlier"), a weak block shared by all tasks
and a private block per task. A task's features are a random linear map of its cluster's block,
the shared block and its private block, plus isotropic noise: tasks of one cluster carry
correlated information. A driven voxel's response is a random direction in one cluster's block
(plus a little of the shared block), scaled to a drawn signal variance, plus unit-variance noise
on each trial: EarlyVis is driven by the 2D block, LOC by the semantic one, OPA/PPA/RSC by the 3D
one; brain voxels outside ROIs are pure noise or driven by a random cluster. A voxel's
single-trial noise ceiling is therefore ``sqrt(s2 / (s2 + 1))``; it is written to the ground truth.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from neurotask.pipeline.formats.bold5000 import REP_PREFIX
from neurotask.pipeline.config import Config, SimulateSection
from neurotask.pipeline.errors import NeurotaskError
from neurotask.pipeline.features.images import images_dir, write_synthetic_images
from neurotask.pipeline.tasks import CLUSTERS, task_names, taskonomy_tasks
from neurotask.storage import Stage, StudyStore, features_group

logger = logging.getLogger(__name__)

ROI_DRIVER = {"EarlyVis": "2D", "LOC": "semantic", "OPA": "3D", "PPA": "3D", "RSC": "3D"}
# ROI centres as fractions of the volume (i within a hemisphere from the midline, j, k) and radii.
_ROI_PLACE = {
    "EarlyVis": ((0.15, 0.12, 0.45), 2.6),
    "LOC": ((0.70, 0.28, 0.40), 2.2),
    "OPA": ((0.60, 0.25, 0.70), 2.0),
    "PPA": ((0.35, 0.40, 0.25), 2.0),
    "RSC": ((0.12, 0.45, 0.60), 1.8),
}
_SHARED_WEIGHT = 0.3  # of the all-task block in a driven voxel's signal
_FEATURE_NOISE = 0.5
_SCENE_CATEGORIES = ("airport", "bedroom", "kitchen", "forest", "beach", "library", "street", "office")


def image_names(n: int, rng: np.random.Generator) -> list[str]:
    """Names in BOLD5000's three styles: COCO, ImageNet and Scene images."""
    n_coco, n_imagenet = int(0.45 * n), int(0.45 * n)
    coco = rng.choice(600_000, size=n_coco, replace=False)
    names = [f"COCO_train2014_{i:012d}.jpg" for i in coco]
    synsets = rng.choice(10_000_000, size=n_imagenet, replace=False)
    names += [f"n{s:08d}_{rng.integers(1, 40000)}.JPEG" for s in synsets]
    names += [f"{_SCENE_CATEGORIES[i % len(_SCENE_CATEGORIES)]}{i // len(_SCENE_CATEGORIES) + 1}.jpg"
              for i in range(n - len(names))]
    return [names[i] for i in rng.permutation(n)]


def latent_factors(n_images: int, sim: SimulateSection, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Latent blocks per image: one per cluster, 'shared', and one per task. -> name: (n, k)."""
    k = sim.n_latents
    out = {c: rng.standard_normal((n_images, k)) for c in CLUSTERS}
    out["shared"] = rng.standard_normal((n_images, k))
    for t in taskonomy_tasks():
        out[f"task:{t.name}"] = rng.standard_normal((n_images, k))
    return out


def task_features(latents: dict[str, np.ndarray], n_features: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each task's features (n, p): a random map of [cluster, shared, private] latents + noise."""
    out = {}
    for t in taskonomy_tasks():
        blocks = np.hstack([latents[t.cluster], 0.5 * latents["shared"], latents[f"task:{t.name}"]])
        spectrum = np.logspace(0, -1, blocks.shape[1])[:, None]  # unequal latent scales
        mixing = rng.standard_normal((blocks.shape[1], n_features)) * spectrum / np.sqrt(blocks.shape[1])
        f = blocks @ mixing + _FEATURE_NOISE * rng.standard_normal((blocks.shape[0], n_features))
        out[t.name] = f.astype(np.float32)
    return out


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    return d <= 1.0


def mean_intensity(shape: tuple[int, int, int]) -> np.ndarray:
    """A smooth, EPI-like mean intensity (i, j, k) in [0.3, 1]: a bright folded shell (the
    cortex) over a darker core. Added to every session's offset, so that the mean of a voxel's
    raw betas, the report's default underlay, shows a plausible anatomy instead of noise; the
    per-session z-scoring removes it from the responses."""
    grid = np.indices(shape, dtype=float)
    centre = [(n - 1) / 2 for n in shape]
    d = np.sqrt(sum(((g - c) / (0.47 * n)) ** 2 for g, c, n in zip(grid, centre, shape)))
    shell = np.exp(-(((d - 0.82) / 0.16) ** 2))
    i, j, k = grid
    folds = 0.65 + 0.35 * np.cos(1.3 * i + 0.7 * j) * np.cos(0.9 * j - 1.1 * k)
    return 0.3 + 0.7 * shell * folds


def brain_and_rois(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A brain-shaped ellipsoid mask and 10 ROI masks (LH in low i, RH mirrored), jittered."""
    shape = tuple(shape)
    centre = [(s - 1) / 2 for s in shape]
    brain = _ellipsoid(shape, centre, [0.47 * s for s in shape])
    rois = {}
    taken = np.zeros(shape, dtype=bool)
    half = shape[0] / 2
    for name, ((fi, fj, fk), radius) in _ROI_PLACE.items():
        for hemi, sign in (("LH", -1), ("RH", 1)):
            ci = half + sign * fi * (half - 2) + rng.uniform(-0.5, 0.5)
            c = (ci, fj * shape[1] + rng.uniform(-0.5, 0.5), fk * shape[2] + rng.uniform(-0.5, 0.5))
            m = _ellipsoid(shape, c, (radius, radius, radius * 0.8)) & brain & ~taken
            taken |= m
            rois[f"{hemi}{name}"] = m
    return brain, rois


def voxel_signals(latents, roi_of_voxel: list[str], sim: SimulateSection, rng):
    """Per voxel: its driving cluster ('' for noise), signal variance, and noiseless signal.

    -> (driver (v,), s2 (v,), signal (n_images, v)) with each driven signal of variance s2.
    """
    v = len(roi_of_voxel)
    driver = np.empty(v, dtype=object)
    for j, roi in enumerate(roi_of_voxel):
        if roi:
            driver[j] = ROI_DRIVER[roi[2:]]
        else:
            driver[j] = "" if rng.random() < sim.noise_voxel_fraction else CLUSTERS[rng.integers(len(CLUSTERS))]
    lo, hi = sim.signal_variance
    s2 = np.where(driver != "", np.exp(rng.uniform(np.log(lo), np.log(hi), v)), 0.0)
    n = latents["shared"].shape[0]
    signal = np.zeros((n, v))
    for c in CLUSTERS:
        idx = np.flatnonzero(driver == c)
        if idx.size:
            w = rng.standard_normal((latents[c].shape[1], idx.size))
            ws = rng.standard_normal((latents["shared"].shape[1], idx.size))
            sig = latents[c] @ w + _SHARED_WEIGHT * (latents["shared"] @ ws)
            sig = (sig - sig.mean(0)) / sig.std(0)
            signal[:, idx] = sig * np.sqrt(s2[idx])
    return driver, s2, signal


def presentation(images: list[str], sim: SimulateSection, rng) -> tuple[list[str], np.ndarray]:
    """Stim-list lines (with rep_ prefixes) and image index per trial, in presentation order."""
    n_rep = sim.n_repeated
    repeated = rng.choice(len(images), size=n_rep, replace=False)
    trial_image = np.concatenate([np.arange(len(images)), np.repeat(repeated, sim.n_showings - 1)])
    trial_image = trial_image[rng.permutation(trial_image.size)]
    # Each repeated image keeps its name on one random showing (not always the first, as in BOLD5000).
    lines = [images[i] for i in trial_image]
    for i in repeated:
        showings = np.flatnonzero(trial_image == i)
        keep = rng.choice(showings)
        for t in showings:
            if t != keep:
                lines[t] = REP_PREFIX + images[i]
    return lines, trial_image


def simulate_study(cfg: Config) -> dict:
    """Write what is missing of the simulated study: the raw files of each subject not simulated
    yet (under ``workdir/raw``) and the feature bank of each task not in the store yet.

    Deterministic given ``simulate.seed``: a subject's data depend on the seed and the subject's
    number only, so subjects and tasks added to the config later are simulated alone, exactly
    as they would have been in a first run. A workdir simulated with other settings is refused.
    """
    sim = cfg.simulate
    if sim is None:
        raise NeurotaskError(f"{cfg.path}: no 'simulate' section; nothing to simulate")
    store = StudyStore(cfg.store_path)
    store.create()
    progress = store.progress()
    files = {k: getattr(cfg.data, k) for k in ("root", "betas", "brain_mask", "roi_masks", "stim_list", "rois")}
    fingerprint = hashlib.sha256(json.dumps([sim.model_dump(), files], sort_keys=True).encode()).hexdigest()[:16]
    record = progress.read(Stage.SIMULATE, "settings")
    if record and record.get("fingerprint") != fingerprint:
        raise NeurotaskError(f"{cfg.workdir} holds a study simulated with other settings; use a new "
                             "study.workdir (or delete that directory) to simulate again")
    progress.mark_done(Stage.SIMULATE, "settings", info={"fingerprint": fingerprint})

    rng = np.random.default_rng(sim.seed)
    images = image_names(sim.n_images, rng)
    latents = latent_factors(sim.n_images, sim, rng)
    features = task_features(latents, sim.n_features, rng)
    # Tasks that `neurotask featurize` computes from the images get no simulated features.
    featurized = set(cfg.features.space_names) if cfg.features else set()
    new_tasks = [t for t in cfg.tasks if t in features and t not in featurized and not store.has(features_group(t))]
    for task in new_tasks:
        store.write_features(task, features[task], images, attrs={"source": "simulated", "seed": sim.seed})
    if sim.write_images and not progress.is_done(Stage.SIMULATE, "images"):
        root = images_dir(cfg)
        write_synthetic_images(root, images, seed=sim.seed)
        progress.mark_done(Stage.SIMULATE, "images")
        logger.info(f"wrote {len(images)} synthetic images under {root}")
    if sim.write_weights and not progress.is_done(Stage.SIMULATE, "weights"):
        from neurotask.pipeline.features.weights import write_random_checkpoints  # imports torch

        weights = cfg.resolve(cfg.features.weights_dir)
        tasks = [t for t in cfg.features.space_names if t in task_names()]
        write_random_checkpoints(weights, tasks, seed=sim.seed)
        progress.mark_done(Stage.SIMULATE, "weights")
        logger.info(f"wrote randomly initialised encoders for {', '.join(tasks)} in {weights}")
    truth_dir = cfg.workdir / "raw" / "ground_truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    summary = {"images": sim.n_images, "features": sim.n_features, "new_tasks": new_tasks, "subjects": {}}
    for subject in cfg.study.subjects:
        if progress.is_done(Stage.SIMULATE, subject):
            continue
        number = int("".join(c for c in subject if c.isdigit()) or 0)
        srng = np.random.default_rng([sim.seed, number, sum(map(ord, subject))])
        info = _simulate_subject(cfg, subject, images, latents, srng, truth_dir)
        progress.mark_done(Stage.SIMULATE, subject, info=info)
        summary["subjects"][subject] = info
        logger.info(f"simulated {subject}: {info['voxels']} brain voxels, {info['trials']} trials in {sim.n_sessions} sessions")
    if not summary["subjects"] and not new_tasks:
        logger.info(f"simulated study already in {cfg.workdir}, skipped")
    return summary


def _simulate_subject(cfg: Config, subject: str, images, latents, rng, truth_dir: Path) -> dict:
    sim = cfg.simulate
    shape = tuple(sim.volume_shape)
    brain, rois = brain_and_rois(shape, rng)
    ijk = np.argwhere(brain)
    roi_of_voxel = [""] * len(ijk)
    index_of = {tuple(x): j for j, x in enumerate(ijk)}
    for name, m in rois.items():
        for x in np.argwhere(m):
            roi_of_voxel[index_of[tuple(x)]] = name
    driver, s2, signal = voxel_signals(latents, roi_of_voxel, sim, rng)

    lines, trial_image = presentation(images, sim, rng)
    n_trials, v = len(lines), len(ijk)
    betas = signal[trial_image] + rng.standard_normal((n_trials, v))
    # Two pathological voxels outside the ROIs, as real data have: one with NaN in a session
    # (the ingest drops and reports it), one constant (kept; its r is undefined).
    outside = np.flatnonzero(np.array(roi_of_voxel) == "")
    nan_voxel, const_voxel = int(outside[0]), int(outside[-1])
    betas[:, const_voxel] = 0.0

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -np.array(shape) + 1.0
    sessions = np.array_split(np.arange(n_trials), sim.n_sessions)
    intensity = 30.0 * mean_intensity(shape)[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    for s, trials in enumerate(sessions, start=1):
        gain = rng.uniform(0.5, 2.0, v)
        offset = intensity + rng.normal(0.0, 3.0, v)
        vals = betas[trials] * gain + offset
        vals[:, const_voxel] = 5.0
        if s == min(2, sim.n_sessions):
            vals[:, nan_voxel] = np.nan
        vol = np.full(shape + (trials.size,), np.nan, dtype=np.float32)
        vol[ijk[:, 0], ijk[:, 1], ijk[:, 2], :] = vals.T
        path = cfg.data_path(cfg.data.betas, subject, session=s)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(vol, affine), str(path))
    if cfg.data.brain_mask:
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), str(cfg.data_path(cfg.data.brain_mask, subject)))
    for name, m in rois.items():
        p = cfg.data_path(cfg.data.roi_masks, subject, roi=name)
        p.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(m.astype(np.uint8), affine), str(p))
    stim = cfg.data_path(cfg.data.stim_list, subject)
    stim.parent.mkdir(parents=True, exist_ok=True)
    stim.write_text("\n".join(lines) + "\n")

    np.savez_compressed(
        truth_dir / f"{subject}.npz",
        voxel_ijk=ijk, roi=np.array(roi_of_voxel), driver=driver.astype(str), signal_variance=s2,
        noise_variance=np.ones(v), noise_ceiling_single_trial=np.sqrt(s2 / (s2 + 1.0)),
        nan_voxel=ijk[nan_voxel], constant_voxel=ijk[const_voxel],
    )
    return {"voxels": v, "trials": n_trials, "roi_voxels": int(sum(m.sum() for m in rois.values()))}
