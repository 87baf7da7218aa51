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
low-dimensional geometric, semantic, and denoise's "outlier"), one block per cluster pair of
``PAIR_BLOCKS`` (carried by the tasks of both clusters), a weak block shared by all tasks and a
private block per task. A task's features are a random linear map of its cluster's block (each
task weighting the block's dimensions its own way), its clusters' pair blocks, the shared block
and its private block, plus isotropic noise: tasks of one cluster carry correlated but unequal
information, and tasks of a pair of clusters share one component.

A driven voxel belongs to a *population*: a cluster (its signal is mostly variance unique to that
cluster) or a cluster pair (mostly the pair's shared block). Its signal is a sum of independent
components, each a random direction in one latent block normalised to unit variance, weighted by
drawn fractions of the voxel's signal variance s2: the population's block, the all-task block,
the private blocks of the tasks of the voxel's clusters, and for a pair voxel some variance unique
to one of the two clusters. ``ROI_POPULATIONS`` gives each ROI's mix of populations (PPA mostly
unique 3D with a 3D+2D population, EarlyVis unique 2D, LOC semantic, ...); brain voxels outside
ROIs are pure noise or unique to a random cluster. Trials add unit-variance noise, so a voxel's
single-trial noise ceiling is ``sqrt(s2 / (s2 + 1))``.

Subjects differ as real ones do: each has its own mix of populations in every ROI (a Dirichlet
draw around ``ROI_POPULATIONS``), its own SNR scale and SNR per cluster, all-task weight and
private fraction, its own per-task weights on the private blocks, and its own tuning over each
cluster's latent dimensions (its voxels' signal favours some of them, hence the tasks of the
cluster that carry them best). Their task-similarity matrices therefore agree about as well as
the real subjects' do (the demo's three: Pearson r 0.85-0.95 between subjects, the authors'
results 0.85-0.89) instead of exactly, and tasks of one cluster are similar, not identical.

Ground truth per subject (``raw/ground_truth/<subject>.npz``, voxels in ``voxel_ijk`` order): the
driving cluster and population, the signal variance, the noise ceiling, and the planted variance
of each component: ``unique_variance`` (v, clusters) in ``truth_clusters`` order,
``shared_variance`` (v, pairs) in ``truth_pairs`` order (named ``a+b``), ``all_task_variance``
(v,), ``private_variance`` (v, tasks) in ``truth_tasks`` order, and ``planted_region``: the
largest planted component (a cluster, a pair, ``all`` or ``private``; '' for noise voxels).
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
# Cluster pairs with a latent block that the features of both clusters carry.
PAIR_BLOCKS = (("3D", "2D"), ("3D", "semantic"))
# Each ROI's mix of voxel populations (a cluster: unique variance; "a+b": a pair's shared block),
# the mean over subjects; each ROI's main cluster (ROI_DRIVER) drives most of its voxels.
ROI_POPULATIONS = {
    "EarlyVis": {"2D": 0.8, "3D+2D": 0.2},
    "LOC": {"semantic": 0.75, "3D+semantic": 0.25},
    "OPA": {"3D": 0.6, "3D+2D": 0.4},
    "PPA": {"3D": 0.7, "3D+2D": 0.3},
    "RSC": {"3D": 0.8, "3D+semantic": 0.2},
}
# ROI centres as fractions of the volume (i within a hemisphere from the midline, j, k) and radii.
_ROI_PLACE = {
    "EarlyVis": ((0.15, 0.12, 0.45), 2.6),
    "LOC": ((0.70, 0.28, 0.40), 2.2),
    "OPA": ((0.60, 0.25, 0.70), 2.0),
    "PPA": ((0.35, 0.40, 0.25), 2.0),
    "RSC": ((0.12, 0.45, 0.60), 1.8),
}
_FEATURE_NOISE = 0.5
_PAIR_FEATURE_WEIGHT = 1.0  # of a pair block in its tasks' features (the cluster's own: 1)
_OUTSIDE_PAIR_FRACTION = 0.15  # of driven brain voxels outside ROIs: a pair population
_DIRICHLET = 12.0  # concentration of a subject's population mix around ROI_POPULATIONS
# Spread (log-normal sigma) of a subject's SNR per cluster: a subject's regions differ in how
# well they are measured, so the clusters' voxels weigh differently in its task similarity.
_CLUSTER_SNR_SIGMA = 0.5
# Spread (log-normal sigma) of the weight that a task's features give each latent dimension of
# its cluster's block: tasks of one cluster carry its information unequally.
_TASK_EMPHASIS_SIGMA = 0.5
# Spread (log-normal sigma) of a subject's tuning over the latent dimensions of each cluster's
# block: its voxels' signal directions favour some dimensions, hence the tasks that carry them.
_TUNING_SIGMA = 1.2
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
    """Latent blocks per image: one per cluster, 'shared', one per task ('task:<name>') and one
    per cluster pair of PAIR_BLOCKS ('pair:<a>+<b>'). -> name: (n, k)."""
    k = sim.n_latents
    out = {c: rng.standard_normal((n_images, k)) for c in CLUSTERS}
    out["shared"] = rng.standard_normal((n_images, k))
    for t in taskonomy_tasks():
        out[f"task:{t.name}"] = rng.standard_normal((n_images, k))
    for a, b in PAIR_BLOCKS:
        out[_pair_key(a, b)] = rng.standard_normal((n_images, k))
    return out


def _pair_key(a: str, b: str) -> str:
    return f"pair:{a}+{b}"


def task_features(latents: dict[str, np.ndarray], n_features: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each task's features (n, p): a random map of [cluster, the cluster's pair blocks, shared,
    private] latents + noise."""
    out = {}
    for t in taskonomy_tasks():
        pairs = [_PAIR_FEATURE_WEIGHT * latents[_pair_key(a, b)] for a, b in PAIR_BLOCKS if t.cluster in (a, b)]
        # the task's own weights on its cluster's latent dimensions (mean square 1)
        emph = rng.lognormal(0.0, _TASK_EMPHASIS_SIGMA, latents[t.cluster].shape[1])
        emph /= np.sqrt(np.mean(emph ** 2))
        blocks = np.hstack([latents[t.cluster] * emph, *pairs, 0.5 * latents["shared"], latents[f"task:{t.name}"]])
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


def subject_profile(rng: np.random.Generator, n_latents: int) -> dict:
    """A subject's own variation: population mix per ROI, affinity between clusters (a voxel's
    secondary cluster), SNR scale and SNR per cluster, all-task and private fractions, per-task
    private weights, and its tuning over each cluster's ``n_latents`` latent dimensions."""
    mix = {}
    for roi, base in ROI_POPULATIONS.items():
        names = list(base)
        p = rng.dirichlet(_DIRICHLET * np.array([base[n] for n in names]))
        mix[roi] = dict(zip(names, p))
    # a subject's own affinity between clusters: where a voxel's secondary cluster comes from
    secondary = {c: dict(zip([o for o in CLUSTERS if o != c], rng.dirichlet(0.4 * np.ones(len(CLUSTERS) - 1))))
                 for c in CLUSTERS}
    return {
        "mix": mix,
        "secondary": secondary,
        "secondary_fraction": float(rng.uniform(0.3, 0.5)),
        "snr_scale": float(np.exp(rng.normal(0.0, 0.2))),
        "all_task_fraction": float(rng.uniform(0.1, 0.25)),
        "private_fraction": float(rng.uniform(0.1, 0.3)),
        "task_weight": {t.name: float(rng.lognormal(-0.5, 1.0)) for t in taskonomy_tasks()},
        "tuning": {c: rng.lognormal(0.0, _TUNING_SIGMA, n_latents) for c in CLUSTERS},
        # no cluster below half the subject's SNR, so that every ROI keeps significant voxels
        "cluster_snr": {c: float(np.exp(max(rng.normal(0.0, _CLUSTER_SNR_SIGMA), -0.7))) for c in CLUSTERS},
    }


def _population_of(roi: str, profile: dict, sim: SimulateSection, rng) -> str:
    if roi:
        mix = profile["mix"][roi[2:]]
        names = list(mix)
        return names[rng.choice(len(names), p=np.array([mix[n] for n in names]))]
    if rng.random() < sim.noise_voxel_fraction:
        return ""
    if rng.random() < _OUTSIDE_PAIR_FRACTION:
        return "+".join(PAIR_BLOCKS[rng.integers(len(PAIR_BLOCKS))])
    return CLUSTERS[rng.integers(len(CLUSTERS))]


def voxel_signals(latents, roi_of_voxel: list[str], sim: SimulateSection, rng, profile: dict | None = None):
    """Per voxel: its population, signal variance, noiseless signal and planted components.

    -> (population (v,) object: a cluster, 'a+b' for a pair, '' for noise; s2 (v,); signal
    (n_images, v) of variance ~s2; components: name -> (v,) planted variance, names 'cluster:c',
    'pair:a+b', 'all', 'task:t', summing to s2). Components are unit-variance projections of
    independent latent blocks, so their variances add up (to sampling error in the images).
    """
    profile = profile if profile is not None else subject_profile(rng, sim.n_latents)
    v = len(roi_of_voxel)
    population = np.array([_population_of(roi, profile, sim, rng) for roi in roi_of_voxel], dtype=object)
    lo, hi = sim.signal_variance
    s2 = np.where(population != "", profile["snr_scale"] * np.exp(rng.uniform(np.log(lo), np.log(hi), v)), 0.0)
    # the subject's SNR of the voxel's cluster(s): a pair voxel takes the mean of its two
    snr = profile["cluster_snr"]
    s2 = s2 * np.array([np.mean([snr[c] for c in p.split("+")]) if p else 1.0 for p in population])
    tasks = taskonomy_tasks()
    weight = np.array([profile["task_weight"][t.name] for t in tasks])
    # Fractions of s2 per component (rows: components, columns: voxels).
    names = [f"cluster:{c}" for c in CLUSTERS] + [_pair_key(a, b) for a, b in PAIR_BLOCKS] + ["all"] \
        + [f"task:{t.name}" for t in tasks]
    frac = np.zeros((len(names), v))
    row = {n: i for i, n in enumerate(names)}
    for j in np.flatnonzero(population != ""):
        pop = population[j]
        clusters = pop.split("+")
        frac[row["all"], j] = profile["all_task_fraction"] * rng.uniform(0.5, 1.5)
        private = profile["private_fraction"] * rng.uniform(0.5, 1.5)
        if len(clusters) == 1:
            main = f"cluster:{pop}"
            # some variance unique to a secondary cluster, drawn from the subject's affinities
            others = profile["secondary"][pop]
            second = list(others)[rng.choice(len(others), p=np.array(list(others.values())))]
            frac[row[f"cluster:{second}"], j] = profile["secondary_fraction"] * rng.uniform(0.0, 2.0)
        else:
            main = _pair_key(*clusters)
            # some variance unique to one of the pair's clusters
            frac[row[f"cluster:{clusters[rng.integers(2)]}"], j] = rng.uniform(0.05, 0.3)
        own = np.array([t.cluster in clusters for t in tasks])
        w = weight * own * rng.uniform(0.5, 1.5, len(tasks))
        frac[len(names) - len(tasks):, j] = private * w / w.sum()
        frac[row[main], j] = max(1.0 - frac[:, j].sum(), 0.2)
    frac /= np.where(frac.sum(0) > 0, frac.sum(0), 1.0)
    n = latents["shared"].shape[0]
    signal = np.zeros((n, v))
    driven = np.flatnonzero(population != "")
    for i, name in enumerate(names):
        idx = driven[frac[i, driven] > 0]
        if not idx.size:
            continue
        block = latents[name.removeprefix("cluster:") if name.startswith("cluster:") else
                        "shared" if name == "all" else name]
        direction = rng.standard_normal((block.shape[1], idx.size))
        if name.startswith("cluster:"):
            direction *= profile["tuning"][name.removeprefix("cluster:")][:, None]  # the subject's tuning
        part = block @ direction
        part = (part - part.mean(0)) / part.std(0)
        signal[:, idx] += part * np.sqrt(frac[i, idx] * s2[idx])
    components = {name: frac[i] * s2 for i, name in enumerate(names)}
    return population, s2, signal, components


def planted_truth(population: np.ndarray, components: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ground-truth arrays of the partition (see the module docstring)."""
    tasks = [t.name for t in taskonomy_tasks()]
    pairs = [f"{a}+{b}" for a, b in PAIR_BLOCKS]
    unique = np.stack([components[f"cluster:{c}"] for c in CLUSTERS], 1)
    shared = np.stack([components[_pair_key(a, b)] for a, b in PAIR_BLOCKS], 1)
    private = np.stack([components[f"task:{t}"] for t in tasks], 1)
    allt = components["all"]
    # the largest planted component; a task's private block counts once, as 'private'
    labels = list(CLUSTERS) + pairs + ["all", "private"]
    stack = np.hstack([unique, shared, allt[:, None], private.sum(1, keepdims=True)])
    planted = np.where(population != "", np.array(labels)[np.argmax(stack, 1)], "")
    driver = np.array([p.split("+")[0] for p in population], dtype=object)  # a pair's first cluster
    return {"truth_clusters": np.array(CLUSTERS), "truth_pairs": np.array(pairs), "truth_tasks": np.array(tasks),
            "unique_variance": unique, "shared_variance": shared, "all_task_variance": allt,
            "private_variance": private, "planted_region": planted.astype(str), "population": population.astype(str),
            "driver": driver.astype(str)}


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
    write_simulated_weights(cfg, progress)
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


def write_simulated_weights(cfg: Config, progress) -> None:
    """With simulate.write_weights, once: randomly initialised encoders in the official
    checkpoint format for the Taskonomy tasks that featurize computes, so that featurize runs
    its real path on the simulated images (nothing is downloaded)."""
    if not cfg.simulate.write_weights or progress.is_done(Stage.SIMULATE, "weights"):
        return
    from neurotask.pipeline.features.weights import write_random_checkpoints  # imports torch

    weights = cfg.resolve(cfg.features.weights_dir)
    tasks = [t for t in cfg.features.space_names if t in task_names()]
    write_random_checkpoints(weights, tasks, seed=cfg.simulate.seed)
    progress.mark_done(Stage.SIMULATE, "weights")
    logger.info(f"wrote randomly initialised encoders for {', '.join(tasks)} in {weights}")


def subject_voxels(shape: tuple[int, ...], rng: np.random.Generator):
    """A subject's brain and ROI masks, its brain voxels' (i, j, k) (v, 3) and each voxel's ROI
    name ('' outside every ROI), (v,) list."""
    brain, rois = brain_and_rois(shape, rng)
    ijk = np.argwhere(brain)
    roi_of_voxel = [""] * len(ijk)
    index_of = {tuple(x): j for j, x in enumerate(ijk)}
    for name, m in rois.items():
        for x in np.argwhere(m):
            roi_of_voxel[index_of[tuple(x)]] = name
    return brain, rois, ijk, roi_of_voxel


def _simulate_subject(cfg: Config, subject: str, images, latents, rng, truth_dir: Path) -> dict:
    sim = cfg.simulate
    shape = tuple(sim.volume_shape)
    brain, rois, ijk, roi_of_voxel = subject_voxels(shape, rng)
    profile = subject_profile(rng, sim.n_latents)
    population, s2, signal, components = voxel_signals(latents, roi_of_voxel, sim, rng, profile)

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
        voxel_ijk=ijk, roi=np.array(roi_of_voxel), signal_variance=s2, **planted_truth(population, components),
        noise_variance=np.ones(v), noise_ceiling_single_trial=np.sqrt(s2 / (s2 + 1.0)),
        nan_voxel=ijk[nan_voxel], constant_voxel=ijk[const_voxel],
    )
    return {"voxels": v, "trials": n_trials, "roi_voxels": int(sum(m.sum() for m in rois.values()))}
