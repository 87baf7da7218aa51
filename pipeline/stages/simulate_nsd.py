"""A synthetic study written in the Natural Scenes Dataset's own file formats, with known truth.

For ``data.format: nsd`` configs with a ``simulate`` section (``neurotask simulate`` dispatches
here). Under data.root (else the workdir), in NSD's layout (the data.nsd templates):

- one design ``nsd_expdesign.mat`` (MATLAB 5, doubles as MATLAB writes them): ``subjectim``
  (max(8, subjects), n_images) 1-based 73k ids, the n_shared shared images first as in NSD,
  then images unique to each subject; ``sharedix`` (1, n_shared); ``masterordering``
  (1, 3 x n_images): every image 3 times in a random order, 1-based indices into a subject's
  images. Odd-numbered subjects complete all sessions, even-numbered ones stop one session
  early (as NSD's subjects 3, 4, 6 and 8 did), so some shared images miss showings and the
  common test set is smaller than n_shared;
- per subject and session, int16 betas (percent signal change x 300, zero outside the brain)
  both as ``.nii.gz`` (x, y, z, trial) and as HDF5 ``betas`` (trial, z, y, x), chunks of one
  voxel's trials like NSD's [1 1 1 750];
- ``brainmask.nii.gz``; ROI label volumes (0 in no ROI, -1 outside the brain) with their
  colour tables: ``prf-visualrois`` (V1v .. hV4 in the early visual region), ``floc-places``
  (OPA, PPA, RSC), ``streams`` (early, lateral: the object region), ``nsdgeneral``;
  ``ncsnr.nii.gz`` (the true sqrt(signal variance / noise variance));
- a tiny ``nsd_stimuli.hdf5``: ``imgBrick`` (73000, 64, 64, 3) uint8, chunked per image so
  only the rows of the study's images take space;
- the feature bank of every image (pipeline.stages.simulate's generative model, imported:
  latent blocks per Taskonomy cluster, task features as random maps of them, voxels driven by
  one cluster's block: early visual by 2D, the object region by semantic, OPA/PPA/RSC by 3D),
  except for the feature spaces of a ``features`` section, which featurize computes from the
  brick's images (as pipeline.stages.simulate leaves them out);
- with ``simulate.write_weights``, randomly initialised Taskonomy encoders for features.tasks in
  features.weights_dir, in the official checkpoint format (pipeline.features.weights), as the
  BOLD5000 simulator writes them: featurize's real path on the brick without downloading.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.io

from neurotask.pipeline.config import Config
from neurotask.pipeline.errors import NeurotaskError
from neurotask.pipeline.features.images import synthetic_image
from neurotask.pipeline.formats import nsd
from neurotask.pipeline.stages.ingest_nsd import SHOWINGS, nsd_path
from neurotask.pipeline.stages.simulate import (latent_factors, mean_intensity, subject_voxels, task_features,
                                                voxel_signals, write_simulated_weights)
from neurotask.storage import Stage, StudyStore, features_group

logger = logging.getLogger(__name__)

IMAGE_SIDE = 64
PRF_LABELS = ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4")
PLACE_LABELS = ("OPA", "PPA", "RSC")
STREAM_LABELS = ("early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal")


def design_rows(subjects: list[str]) -> int:
    return max([8] + [nsd.subject_number(s) for s in subjects])


def make_design(n_rows: int, n_images: int, n_shared: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """subjectim (n_rows, n_images), sharedix (n_shared,), masterordering (3 n_images,): 1-based."""
    n_unique = n_images - n_shared
    ids = rng.choice(nsd.N_IMAGES_73K, size=n_shared + n_rows * n_unique, replace=False) + 1
    shared = np.sort(ids[:n_shared])
    rows = [np.concatenate([shared, ids[n_shared + r * n_unique : n_shared + (r + 1) * n_unique]])
            for r in range(n_rows)]
    order = rng.permutation(np.repeat(np.arange(1, n_images + 1), SHOWINGS))
    return {"subjectim": np.stack(rows), "sharedix": shared, "masterordering": order}


def subject_sessions(subject: str, full: int) -> int:
    return full if nsd.subject_number(subject) % 2 else max(1, full - 1)


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    nib.save(img, str(path))


def _write_table(path: Path, labels: tuple[str, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("0 Unknown\n" + "".join(f"{i} {name}\n" for i, name in enumerate(labels, start=1)))


def write_stimuli(path: Path, ids73k: np.ndarray, seed: int) -> None:
    """imgBrick (73000, side, side, 3) uint8 with the given rows drawn, the rest unallocated."""
    h5py = nsd._h5py()
    rng = np.random.default_rng(seed)
    ids = np.sort(np.asarray(ids73k))
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(str(path), "w") as f:
        brick = f.create_dataset("imgBrick", shape=(nsd.N_IMAGES_73K, IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8,
                                 chunks=(1, IMAGE_SIDE, IMAGE_SIDE, 3), compression="gzip")
        for i in ids:
            brick[i - 1] = np.asarray(synthetic_image(rng, IMAGE_SIDE, IMAGE_SIDE))


def simulate_nsd_study(cfg: Config) -> dict:
    """Write what is missing of the simulated NSD study (deterministic given simulate.seed; a
    subject's data depend on the seed and its number only); refuse a workdir simulated with
    other settings."""
    sim = cfg.simulate
    if sim is None:
        raise NeurotaskError(f"{cfg.path}: no 'simulate' section; nothing to simulate")
    n = cfg.data.nsd
    tps = n.trials_per_session
    if (SHOWINGS * sim.n_images) % tps:
        raise NeurotaskError(f"{cfg.path}: simulate.n_images ({sim.n_images}) x {SHOWINGS} showings must be a "
                             f"multiple of data.nsd.trials_per_session ({tps}): NSD's design fills whole sessions")
    for s in cfg.study.subjects:
        try:
            nsd.subject_number(s)
        except Exception as e:
            raise NeurotaskError(f"{cfg.path}: study.subjects: {e}") from None
    store = StudyStore(cfg.store_path)
    store.create()
    progress = store.progress()
    fingerprint = hashlib.sha256(json.dumps([sim.model_dump(), sim.n_shared, cfg.data.nsd.model_dump(), cfg.data.root,
                                             "nsd"], sort_keys=True).encode()).hexdigest()[:16]
    record = progress.read(Stage.SIMULATE, "settings")
    if record and record.get("fingerprint") != fingerprint:
        raise NeurotaskError(f"{cfg.workdir} holds a study simulated with other settings; use a new "
                             "study.workdir (or delete that directory) to simulate again")
    progress.mark_done(Stage.SIMULATE, "settings", info={"fingerprint": fingerprint})

    rng = np.random.default_rng(sim.seed)
    design = make_design(design_rows(cfg.study.subjects), sim.n_images, sim.n_shared, rng)
    all_ids = np.unique(design["subjectim"])
    names = [nsd.image_name(i) for i in all_ids]
    latents = latent_factors(all_ids.size, sim, rng)
    features = task_features(latents, sim.n_features, rng)
    featurized = set(cfg.features.space_names) if cfg.features else set()
    new_tasks = [t for t in cfg.tasks if t in features and t not in featurized and not store.has(features_group(t))]
    for task in new_tasks:
        store.write_features(task, features[task], names, attrs={"source": "simulated", "seed": sim.seed})
    first = cfg.study.subjects[0]
    design_file = nsd_path(cfg, n.design, first, "nsd.design")
    if not progress.is_done(Stage.SIMULATE, "design"):
        design_file.parent.mkdir(parents=True, exist_ok=True)
        # As MATLAB saves them: doubles, row vectors (1, n).
        scipy.io.savemat(str(design_file), {"subjectim": design["subjectim"].astype(np.float64),
                                            "sharedix": design["sharedix"][None, :].astype(np.float64),
                                            "masterordering": design["masterordering"][None, :].astype(np.float64)})
        write_stimuli(nsd_path(cfg, n.stimuli, first, "nsd.stimuli"), all_ids, sim.seed)
        progress.mark_done(Stage.SIMULATE, "design")
    # as the BOLD5000 simulator: featurize runs its real path on the brick above
    write_simulated_weights(cfg, progress)
    truth_dir = cfg.workdir / "raw" / "ground_truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    full = SHOWINGS * sim.n_images // tps
    summary = {"images": int(all_ids.size), "features": sim.n_features, "new_tasks": new_tasks, "subjects": {}}
    index_of = {int(i): k for k, i in enumerate(all_ids)}
    for subject in cfg.study.subjects:
        if progress.is_done(Stage.SIMULATE, subject):
            continue
        number = nsd.subject_number(subject)
        srng = np.random.default_rng([sim.seed, number, sum(map(ord, subject)), 73])
        rows = np.array([index_of[int(i)] for i in design["subjectim"][number - 1]])
        sub_latents = {k: v[rows] for k, v in latents.items()}
        info = _simulate_subject(cfg, subject, sub_latents, design, subject_sessions(subject, full), srng, truth_dir)
        progress.mark_done(Stage.SIMULATE, subject, info=info)
        summary["subjects"][subject] = info
        logger.info(f"simulated {subject} (NSD format): {info['voxels']} brain voxels, {info['trials']} trials "
                    f"in {info['sessions']} sessions")
    if not summary["subjects"] and not new_tasks:
        logger.info(f"simulated study already in {cfg.workdir}, skipped")
    return summary


def _label_volumes(shape, brain: np.ndarray, rois: dict[str, np.ndarray], rng) -> dict[str, tuple[np.ndarray, tuple]]:
    """NSD-style label volumes from the BOLD5000-style ROI masks (-1 outside the brain)."""
    def empty() -> np.ndarray:
        v = np.zeros(shape, dtype=np.int16)
        v[~brain] = -1
        return v

    early = rois["LHEarlyVis"] | rois["RHEarlyVis"]
    prf = empty()
    ijk = np.argwhere(early)
    bins = np.array_split(np.argsort(ijk[:, 2] * 1000 + ijk[:, 1], kind="stable"), len(PRF_LABELS))
    for label, idx in enumerate(bins, start=1):
        prf[tuple(ijk[idx].T)] = label
    places = empty()
    for label, name in enumerate(PLACE_LABELS, start=1):
        places[rois[f"LH{name}"] | rois[f"RH{name}"]] = label
    streams = empty()
    streams[early] = STREAM_LABELS.index("early") + 1
    streams[rois["LHLOC"] | rois["RHLOC"]] = STREAM_LABELS.index("lateral") + 1
    general = empty()
    any_roi = np.zeros(shape, dtype=bool)
    for m in rois.values():
        any_roi |= m
    general[brain & (any_roi | (rng.random(shape) < 0.5))] = 1
    return {"prf-visualrois": (prf, PRF_LABELS), "floc-places": (places, PLACE_LABELS),
            "streams": (streams, STREAM_LABELS), "nsdgeneral": (general, ("nsdgeneral",))}


def _simulate_subject(cfg: Config, subject: str, latents, design, n_sessions: int, rng, truth_dir: Path) -> dict:
    sim, n = cfg.simulate, cfg.data.nsd
    tps = n.trials_per_session
    shape = tuple(sim.volume_shape)
    brain, rois, ijk, roi_of_voxel = subject_voxels(shape, rng)
    population, s2, signal, components = voxel_signals(latents, roi_of_voxel, sim, rng)
    # a pair population ("3D+2D") is driven first by its first cluster, as the BOLD5000 truth says
    driver = np.array([p.split("+")[0] for p in population], dtype=object)

    n_trials = n_sessions * tps
    trial_image = design["masterordering"][:n_trials] - 1  # 0-based row of this subject's images
    v = len(ijk)
    betas = signal[trial_image] + rng.standard_normal((n_trials, v))
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = -0.9 * (np.array(shape) - 1)
    intensity = 30.0 * mean_intensity(shape)[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    h5py = nsd._h5py()
    for s in range(1, n_sessions + 1):
        rows = slice((s - 1) * tps, s * tps)
        gain = rng.uniform(0.5, 2.0, v)
        offset = 0.1 * intensity + rng.normal(0.0, 0.3, v)
        vals = betas[rows] * gain + offset
        vol = np.zeros(shape + (tps,), dtype=np.int16)  # NSD: zero outside the brain mask
        vol[ijk[:, 0], ijk[:, 1], ijk[:, 2], :] = np.clip(np.round(vals.T * nsd.BETA_SCALE), -32768, 32767)
        for ext in ("nii.gz", "hdf5"):
            path = cfg.data_path(n.betas, subject, key="nsd.betas", space=n.space, version=n.version, ext=ext,
                                 session=s)
            path.parent.mkdir(parents=True, exist_ok=True)
            if ext == "nii.gz":
                _save_nifti(vol, affine, path)
            else:
                with h5py.File(str(path), "w") as f:
                    f.create_dataset("betas", data=vol.transpose(3, 2, 1, 0), chunks=(tps, 1, 1, 1))
    _save_nifti(brain.astype(np.int16), affine, nsd_path(cfg, n.brain_mask, subject, "nsd.brain_mask"))
    labels = _label_volumes(shape, brain, rois, rng)
    for name, (vol, table) in labels.items():
        _save_nifti(vol, affine, nsd_path(cfg, n.roi_file, subject, "nsd.roi_file", roi_file=name))
        _write_table(nsd_path(cfg, n.label_table, subject, "nsd.label_table", roi_file=name), table)
    if n.ncsnr:
        ncsnr = np.zeros(shape, dtype=np.float32)
        ncsnr[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = np.sqrt(s2)  # noise variance 1
        _save_nifti(ncsnr, affine, nsd_path(cfg, n.ncsnr, subject, "nsd.ncsnr"))
    np.savez_compressed(
        truth_dir / f"{subject}.npz",
        voxel_ijk=ijk, roi=np.array(roi_of_voxel), driver=driver.astype(str), signal_variance=s2,
        noise_variance=np.ones(v), noise_ceiling_single_trial=np.sqrt(s2 / (s2 + 1.0)),
        trial_ids=design["subjectim"][nsd.subject_number(subject) - 1][trial_image],
    )
    return {"voxels": v, "trials": n_trials, "sessions": n_sessions,
            "roi_voxels": int(sum(m.sum() for m in rois.values()))}
