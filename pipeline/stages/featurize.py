"""Featurize orchestration: the study's images -> ``features/<space>`` for every feature space.

One Dask task per batch of images (``features.batch_size``; the store's chunk along images):
it decodes the batch's images once, runs every configured feature space still missing for
that batch on them (``feature_spaces.extract_batch``: one crop/resize per input size, shared by
all encoders), writes each space's rows as a region write of exactly one chunk, and only then
marks (space, batch) done. Workers keep their loaded models between tasks, so each worker
loads each encoder once. A rerun after a crash or a kill does only the (space, batch) pairs
without a marker; a feature space added to the config later is computed alone.

The study's images (``study_images``) and where they are read from (``image_source``,
``pipeline.features.image_source``):

- BOLD5000 (``data.format`` glmsingle, release1_rois): the images of the subjects' stimulus
  lists, one file each under ``features.images_dir``;
- NSD (``data.format: nsd``): the 73k ids the configured subjects' trials show (the design's
  masterordering and subjectim over the sessions whose betas files are there: the same names,
  ``nsd73k_<id>``, that ingest stores), read straight from ``data.nsd.stimuli``'s ``imgBrick``
  (nsd_stimuli.hdf5): each batch task opens the HDF5 itself and reads only its rows, so the
  73,000 images are never extracted and memory stays that of one batch.

Before any work, every problem is gathered and reported at once: images missing from
``features.images_dir``, missing or corrupt checkpoints (with their download URLs), other
misconfigured spaces, unusable images (unreadable, unsupported or too small; greyscale,
palette and CMYK images are converted as the task bank did), for NSD a design or betas file
missing, a stimulus file missing or without ``imgBrick``, of another dtype or shape than
(N, H, W, 3) uint8, too few rows for the study's ids or images too small, a device the workers
lack, and stored features made otherwise (simulated, other weights, images or brick) that only
--overwrite replaces. An image that fails only when decoded fails its batch, which is reported
by name at the end while every other batch is kept.

Device: ``features.device`` (auto = CUDA on workers that have it, else CPU) is resolved on
each worker. Torch's CPU threads per task are the cores a worker may use divided by the Dask
threads sharing them (``features.torch_threads: auto``), so tasks do not oversubscribe cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from distributed import Client, Future, as_completed, get_worker

from neurotask.pipeline.config import Config, FeaturesSection
from neurotask.pipeline.console import ProgressBar
from neurotask.pipeline.errors import DataError, NeurotaskError
from neurotask.pipeline.features.spaces import (Extractor, FeatureSpace, FeatureSpaceError, TaskonomyFeatureSpace,
                                     check_feature_spaces, extract_batch, feature_spaces_from_config,
                                     resolve_device)
from neurotask.pipeline.features import images as image_files
from neurotask.pipeline.features.image_source import (ImageBatch, ImageBrick, ImageFiles, ImageSource,
                                                      brick_header, check_brick)
from neurotask.pipeline.features.images import find_images, images_dir
from neurotask.pipeline.features.preprocess import BadImagesError, check_images
from neurotask.pipeline.features.weights import WeightsError, find_checkpoint
from neurotask.pipeline.formats import nsd
from neurotask.pipeline.stages.ingest import _contiguous
from neurotask.pipeline.stages.ingest_nsd import nsd_path
from neurotask.storage import staging
from neurotask.storage import ChunkPlan, Progress, Stage, StudyStore, chunk_key, features_group

logger = logging.getLogger(__name__)

# Test hook: a batch index; that batch writes its first space's rows, then raises (a crash
# between the data and the markers).
FAULT_ENV = "NEUROTASK_FAULT_BATCH"


class FeaturizeError(NeurotaskError):
    """Featurizing cannot start, or some batches failed; the message lists every problem."""


@dataclass(frozen=True)
class Batch:
    index: int
    start: int
    stop: int

    @property
    def key(self) -> str:
        return chunk_key(self.index)

    @property
    def name(self) -> str:
        return f"batch {self.index} (images {self.start}-{self.stop - 1})"


@dataclass
class FeaturizeReport:
    spaces: list[str] = field(default_factory=list)
    images: int = 0
    batches: int = 0  # batch tasks run
    computed: int = 0  # (space, batch) pairs computed
    skipped: int = 0  # (space, batch) pairs already done
    devices: set[str] = field(default_factory=set)
    bad_images: dict[str, str] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def make_batches(n_images: int, batch_size: int) -> list[Batch]:
    """The store's chunks of ``features/<space>`` along images, one Dask task each."""
    chunks = ChunkPlan(n_images, batch_size)
    return [Batch(k, *chunks.bounds(k)) for k in range(chunks.n_chunks)]


def study_feature_spaces(cfg: Config) -> list[FeatureSpace]:
    """The feature spaces of the config's ``features`` section (validated, nothing loaded)."""
    if cfg.features is None:
        raise FeaturizeError(f"{cfg.path}: no 'features' section; nothing to featurize")
    try:
        return feature_spaces_from_config(cfg.features.spaces_mapping(cfg.resolve))
    except FeatureSpaceError as e:
        raise FeaturizeError(f"{cfg.path}: {e}") from None


# --------------------------------------------------------------------------- provenance


def space_provenance(space: FeatureSpace) -> dict[str, Any]:
    """What determines a space's features, without loading it: its options and, for a
    Taskonomy encoder, the checkpoint's file name (which carries its sha256)."""
    out = {"name": space.name, **space.describe()}
    if isinstance(space, TaskonomyFeatureSpace):
        out["checkpoint"] = find_checkpoint(space.weights_dir, space.task).name
    return _jsonable(out)


def images_digest(images: list[str]) -> str:
    return hashlib.sha256("\n".join(images).encode()).hexdigest()[:16]


def fingerprint(provenance: dict[str, Any], images: list[str], batch_size: int,
                source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stored with the features; a rerun resumes only into features with the same one.
    ``source``: the image source's fingerprint (an image brick's); image files have none, their
    names identify them (so features made before image sources existed keep theirs)."""
    out = {"space": provenance, "images": len(images), "images_sha256": images_digest(images),
           "batch_size": batch_size}
    if source is not None:
        out["source"] = source
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))  # as it reads back from the store's attributes


def _describe_stored(attrs: dict[str, Any]) -> str:
    if attrs.get("source") == "simulated":
        return "simulated features"
    stored = attrs.get("featurize")
    if not isinstance(stored, dict):
        return "features of unknown origin"
    source = f", read from {json.dumps(stored['source'], sort_keys=True)}" if stored.get("source") else ""
    return (f"features of {stored.get('images')} images (batch size {stored.get('batch_size')}{source}) "
            f"from {json.dumps(stored.get('space'), sort_keys=True)}")


# --------------------------------------------------------------------------- the study's images


def study_images(cfg: Config) -> list[str]:
    """The study's image names, in the store's order: BOLD5000's stimulus-list images
    (``features.images.study_images``) or, with data.format nsd, ``nsd_study_images``."""
    if cfg.data.format == "nsd":
        return nsd_study_images(cfg)
    return image_files.study_images(cfg)


def nsd_sessions(cfg: Config, subject: str) -> int:
    """How many sessions of ``subject`` ingest reads: data.sessions, or with 'auto' the betas
    files found 1, 2, ... (ingest's rule, from the file names alone). Raises DataError listing
    the missing betas files."""
    template = cfg.data.nsd.betas
    found, missing = _contiguous(lambda s: nsd_path(cfg, template, subject, "nsd.betas", session=s), cfg.data.sessions)
    if missing:
        raise DataError(f"{subject}: betas file(s) missing, so the images of its trials are unknown: "
                        + ", ".join(str(p) for p in missing))
    return len(found)


def nsd_study_images(cfg: Config) -> list[str]:
    """The 73k ids the configured subjects' trials show, as ingest names them (``nsd73k_<id>``),
    once, in order of first showing, subject by subject: each subject's first
    sessions x data.nsd.trials_per_session trials of the design (ingest checks every session
    holds that many). Reads the design and looks for the betas files; reads no betas.
    Raises DataError listing every subject's problem."""
    subjects = cfg.study.subjects
    design = nsd.read_design(nsd_path(cfg, cfg.data.nsd.design, subjects[0], "nsd.design"))
    seen: dict[str, None] = {}
    problems = []
    for subject in subjects:
        try:
            n_trials = nsd_sessions(cfg, subject) * cfg.data.nsd.trials_per_session
            ids = design.trial_ids(subject, n_trials)
        except DataError as e:
            problems.append(str(e))
            continue
        seen.update(dict.fromkeys(nsd.image_name(i) for i in ids))
    if problems:
        raise DataError("the study's NSD images:\n  " + "\n  ".join(problems))
    return list(seen)


def stimuli_path(cfg: Config) -> Path:
    """NSD's stimulus file (data.nsd.stimuli, under data.root)."""
    return nsd_path(cfg, cfg.data.nsd.stimuli, cfg.study.subjects[0], "nsd.stimuli")


def image_source(cfg: Config, images: list[str]) -> tuple[ImageSource | None, list[str]]:
    """Where the study's images are read from, checked: (the source, []) or (None or a source
    of the images found, every problem). Image files: each present and usable (headers only);
    NSD: the brick's header (``image_source.check_brick``)."""
    feat: FeaturesSection = cfg.features  # type: ignore[assignment]
    if cfg.data.format == "nsd":
        return check_brick(stimuli_path(cfg), images, feat.min_image_side)
    problems: list[str] = []
    found, missing = find_images(images_dir(cfg), images)
    if missing:
        problems.append(missing)
    paths = {k: str(v) for k, v in found.items()}
    names = [n for n in images if n in paths]
    bad = check_images([paths[n] for n in names], names, feat.min_image_side)
    if bad:
        problems.append(str(BadImagesError(bad)))
    return ImageFiles(paths), problems


def source_fingerprint(cfg: Config) -> dict[str, Any] | None:
    """The image source's fingerprint from headers only (cheap: for ``all_done``); raises
    DataError when the NSD stimulus file cannot be read."""
    if cfg.data.format != "nsd":
        return None
    path = stimuli_path(cfg)
    header = brick_header(path)
    if isinstance(header, str):
        raise DataError(header)
    return ImageBrick(str(path), *header).fingerprint()


# --------------------------------------------------------------------------- worker side

_EXTRACTORS: dict[str, Extractor] = {}
_EXTRACTORS_LOCK = threading.Lock()


def _seed_for(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)


def load_space(space: FeatureSpace, device: torch.device, channels_last: bool) -> Extractor:
    """``space.load`` with torch's RNG seeded from the space's name (and restored after), so a
    module without a state dict is randomly initialised alike on every worker."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_for(space.name))
        return space.load(device, channels_last)


def use_channels_last(setting: bool | str, device: torch.device) -> bool:
    """``features.channels_last``: 'auto' is on for CPU, where NHWC convolutions were measured
    1.3x faster for the Taskonomy encoders (scripts/bench_featurize.py), off elsewhere."""
    return device.type == "cpu" if setting == "auto" else bool(setting)


def cached_extractor(space: FeatureSpace, provenance: dict[str, Any], device: str,
                     channels_last: bool | str) -> Extractor:
    """This process's loaded extractor of ``space`` (loaded on first use, then kept)."""
    dev = resolve_device(device)
    channels_last = use_channels_last(channels_last, dev)
    key = json.dumps([provenance, str(dev), channels_last], sort_keys=True)
    with _EXTRACTORS_LOCK:  # one load per process even when Dask runs several tasks at once
        if key not in _EXTRACTORS:
            extractor = load_space(space, dev, channels_last)
            loaded = getattr(extractor, "checkpoint", None)
            if loaded is not None and loaded != provenance.get("checkpoint"):
                raise WeightsError(f"{space.name}: the checkpoint changed while featurizing "
                                   f"({provenance.get('checkpoint')} -> {loaded}); rerun")
            _EXTRACTORS[key] = extractor
        return _EXTRACTORS[key]


_MALLOC_TUNED = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_malloc() -> bool:
    """Undo Dask's ``MALLOC_TRIM_THRESHOLD_=65536`` for this worker process (once).

    Dask's nanny sets it so workers hand freed memory back to the OS; it also switches off
    glibc's dynamic mmap threshold, so every large tensor of a forward pass is mmap'ed,
    page-faulted and unmapped again: measured +45% CPU time per encoder pass. Large blocks
    (<= 32 MiB) then come from the heap again, and up to 64 MiB of free heap is kept for reuse.
    Returns whether glibc accepted the settings (False elsewhere: nothing to undo there)."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20))
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = ok
    return ok


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a SLURM job's cgroup, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_set() -> tuple[int, ...]:
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:
        return tuple(range(os.cpu_count() or 1))


def torch_threads_per_worker(client: Client) -> dict[str, int]:
    """{worker address: torch threads per task} so that threads x concurrent tasks <= cores:
    workers on one host with the same CPU set share its cores among all their Dask threads."""
    info = client.scheduler_info()["workers"]
    cpus = client.run(_cpu_set)
    groups: dict[tuple[str, tuple[int, ...]], int] = {}
    for addr, w in info.items():
        key = (w["host"], tuple(cpus.get(addr, ())))
        groups[key] = groups.get(key, 0) + int(w["nthreads"])
    return {addr: max(1, len(cpus.get(addr, ())) // groups[(w["host"], tuple(cpus.get(addr, ())))])
            for addr, w in info.items()}


def _threads_here(setting: int | str, per_worker: dict[str, int]) -> int:
    if setting != "auto":
        return int(setting)
    try:
        worker = get_worker()
    except ValueError:  # called outside a Dask worker (tests)
        return usable_cores()
    return per_worker.get(worker.address) or max(1, usable_cores() // max(1, worker.state.nthreads))


def featurize_batch(store: StudyStore, batch: Batch, source: ImageBatch, names: list[str], spaces: list[FeatureSpace],
                    provenances: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    """Read one batch of images once (``source``: its files, or its rows of an image brick,
    opened here), run every given feature space on it, write each space's rows (one store
    chunk) and then mark (space, batch) done.

    Returns {"batch", "device", "bad"}; bad images are returned by name rather than raised, so
    they are reported together and not retried."""
    tune_malloc()
    threads = _threads_here(options["torch_threads"], options["threads_per_worker"])
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    extractors = [cached_extractor(s, p, options["device"], options["channels_last"])
                  for s, p in zip(spaces, provenances)]
    try:
        images = source.read(names, options["min_image_side"])
    except BadImagesError as e:
        return {"batch": batch.index, "device": None, "bad": e.failures}
    features = extract_batch(images, names, extractors)
    progress = store.progress()
    for i, space in enumerate(spaces):
        store.write_feature_rows(space.name, slice(batch.start, batch.stop), features[space.name])
        if i == 0 and os.environ.get(FAULT_ENV) == str(batch.index):
            raise RuntimeError(f"injected fault ({FAULT_ENV}) in {batch.name}")
    device = str(extractors[0].device) if extractors else "none"
    for space in spaces:  # only after every space's rows are in the store
        progress.mark_done(Stage.FEATURIZE, space.name, batch.key, info={"images": batch.stop - batch.start, "device": device})
    return {"batch": batch.index, "device": device, "bad": {}}


def _device_problem(device: str) -> str:
    try:
        return f"{resolve_device(device)}"
    except FeatureSpaceError as e:
        return f"error: {e}"


# --------------------------------------------------------------------------- driver side


@dataclass
class _Space:
    space: FeatureSpace
    provenance: dict[str, Any]
    fingerprint: dict[str, Any]
    todo: set[int] = field(default_factory=set)  # batch indices still to compute


def _n_features(space: FeatureSpace) -> tuple[int, dict[str, Any]]:
    """Width of a space's features and the loaded extractor's description (loads non-Taskonomy
    spaces once on the CPU: their width is known only from a forward pass)."""
    if isinstance(space, TaskonomyFeatureSpace):
        from neurotask.pipeline.features.encoders import N_FEATURES

        return N_FEATURES, {"n_features": N_FEATURES}
    extractor = load_space(space, torch.device("cpu"), False)
    return extractor.n_features, _jsonable(extractor.describe())


@dataclass
class Plan:
    """What the pre-flight found: the study's images, where they are read from, the spaces."""

    images: list[str]
    source: ImageSource
    spaces: list[FeatureSpace]
    provenances: list[dict[str, Any]]

    @property
    def source_fingerprint(self) -> dict[str, Any] | None:
        return _jsonable(self.source.fingerprint())


def preflight(cfg: Config) -> Plan:
    """Everything that can be checked before any work, without a cluster: the study's images
    (which they are; present and usable, files or brick), every feature space (checkpoints
    present and verified, factories).

    Raises one FeaturizeError listing every problem found."""
    spaces = study_feature_spaces(cfg)
    problems: list[str] = []
    source: ImageSource | None = None
    try:
        images, known = study_images(cfg), True
    except DataError as e:
        images, known = [], False
        problems.append(str(e))
    if known or cfg.data.format == "nsd":  # a brick's own problems show without the study's ids
        source, found = image_source(cfg, images)
        problems += found
    provenances: list[dict[str, Any]] = []
    try:
        check_feature_spaces(spaces)
        provenances = [space_provenance(s) for s in spaces]
    except (FeatureSpaceError, WeightsError) as e:
        problems.append(str(e))
    if problems or source is None:
        raise FeaturizeError(f"{cfg.path}: cannot featurize; nothing was done:\n" + "\n".join(problems))
    return Plan(images, source, spaces, provenances)


def check_workers(cfg: Config, client: Client) -> None:
    """The configured device exists on every worker (before any work)."""
    device = cfg.features.device  # type: ignore[union-attr]
    found = client.run(_device_problem, device)
    errors = sorted({v[len("error: "):] for v in found.values() if v.startswith("error: ")})
    if errors:
        raise FeaturizeError(f"{cfg.path}: cannot featurize; nothing was done:\n"
                             f"features.device {device!r} on the workers: " + "; ".join(errors))


def prepare_store(cfg: Config, store: StudyStore, progress: Progress, spaces: list[FeatureSpace],
                  provenances: list[dict[str, Any]], images: list[str], *, overwrite: bool,
                  target: StudyStore | None = None, source: dict[str, Any] | None = None) -> list[_Space]:
    """Create ``features/<space>`` where missing (or replaced with ``overwrite``); keep features
    made with the same fingerprint (to resume into); refuse other stored features.

    ``target``: the store the new groups are created in (with ``overwrite``, the staging store
    beside ``store``: ``store`` and its markers are then left as they are, to be replaced by
    ``storage.staging.replace`` once every batch is written); ``source``: the image source's
    fingerprint (``Plan.source_fingerprint``)."""
    target = target or store
    bs = cfg.features.batch_size  # type: ignore[union-attr]
    out = [_Space(s, p, _jsonable(fingerprint(p, images, bs, source))) for s, p in zip(spaces, provenances)]
    conflicts = []
    for sp in out:
        name = sp.space.name
        if store.has(features_group(name)) and not overwrite:
            attrs = store.feature_attrs(name)
            if attrs.get("featurize") != sp.fingerprint:
                conflicts.append(f"  features/{name} holds {_describe_stored(attrs)}")
    if conflicts:
        raise FeaturizeError(
            f"{cfg.store_path}: stored features were made otherwise than the config {cfg.path} asks:\n"
            + "\n".join(conflicts) + "\nUse `neurotask featurize --overwrite` to replace them (the fits of those "
            "tasks are then redone), or a new study.workdir")
    for sp in out:
        name = sp.space.name
        if overwrite or not store.has(features_group(name)):
            if store.has(features_group(name)):
                logger.info(f"{features_group(name)}: to be replaced (--overwrite)")
            if target is store:
                # Unmark before creating, so that a kill in between never leaves stale markers.
                progress.unmark(Stage.FEATURIZED, name)
                progress.clear(Stage.FEATURIZE, name)
            n_features, described = _n_features(sp.space)
            attrs = {**sp.provenance, **described, "featurize": sp.fingerprint}
            target.init_features(name, images, n_features, bs, attrs=attrs)
    return out


def _fitted_subjects(cfg: Config, store: StudyStore, progress: Progress) -> list[str]:
    fit_dir = progress.directory / Stage.FIT
    found = [p.name for p in fit_dir.iterdir() if p.is_dir()] if fit_dir.is_dir() else []
    return list(dict.fromkeys([*cfg.study.subjects, *store.subjects(), *found]))


def featurize(cfg: Config, client: Client, *, overwrite: bool = False, plan: Plan | None = None) -> FeaturizeReport:
    """Compute every configured feature space for every image of the study that is not done.

    Raises FeaturizeError before any work if anything is missing or wrong (listing it all),
    and after the run if some batches failed or held bad images (the rest is kept).
    ``plan``: the result of ``preflight(cfg)`` if the caller already ran it (before starting
    the cluster, say)."""
    t0 = time.perf_counter()
    feat: FeaturesSection = cfg.features  # type: ignore[assignment]
    if not study_feature_spaces(cfg):
        logger.info("featurize: the features section names no feature space; nothing to do")
        return FeaturizeReport()
    if not overwrite and all_done(cfg):
        logger.info("featurize: every feature space is already computed for every image; nothing to do")
        n_images = len(study_images(cfg))
        names = cfg.features.space_names
        return FeaturizeReport(spaces=names, images=n_images,
                               skipped=len(names) * len(make_batches(n_images, feat.batch_size)))
    plan = plan or preflight(cfg)
    check_workers(cfg, client)
    images, spaces = plan.images, plan.spaces
    report = FeaturizeReport(spaces=[s.name for s in spaces], images=len(images))
    store = StudyStore(cfg.store_path)
    staging.recover(store)  # a swap interrupted by a crash is finished first
    store.create()
    progress = store.progress()
    if overwrite:
        # Every space is written beside the old one, batches and their markers too, and
        # swapped in only when all are complete (storage.staging); a failure keeps the old.
        staging.discard(store)  # an earlier failed overwrite's leftovers: not resumed
        target = staging.staging_store(store)
        try:
            report = _featurize_into(cfg, client, store, target, plan, report, overwrite=True, t0=t0)
            names = report.spaces
            fitted = _fitted_subjects(cfg, store, progress)
            staging.replace(store, [features_group(n) for n in names],
                            move_markers=[(Stage.FEATURIZE, n) for n in names],
                            clear_markers=[(Stage.FEATURIZED, n) for n in names]
                            + [(Stage.FIT, subject, n) for subject in fitted for n in names])
            for sp in plan_fingerprints(cfg, plan):
                progress.mark_done(Stage.FEATURIZED, sp[0], info={"fingerprint": sp[1]})
        finally:
            staging.discard(store)
        return report
    return _featurize_into(cfg, client, store, store, plan, report, overwrite=False, t0=t0)


def plan_fingerprints(cfg: Config, plan: Plan) -> list[tuple[str, Any]]:
    """(space name, fingerprint) of every planned space."""
    bs = cfg.features.batch_size  # type: ignore[union-attr]
    return [(s.name, _jsonable(fingerprint(p, plan.images, bs, plan.source_fingerprint)))
            for s, p in zip(plan.spaces, plan.provenances)]


def _featurize_into(cfg: Config, client: Client, store: StudyStore, target: StudyStore, plan: Plan,
                    report: FeaturizeReport, *, overwrite: bool, t0: float) -> FeaturizeReport:
    """Featurize the plan's batches not done into ``target`` (the study store, or with
    ``overwrite`` the staging store beside it); -> the report; raises FeaturizeError when
    batches failed or images were bad (those written are kept, in ``target``). ``t0``: when the
    stage started (for the report's seconds)."""
    feat: FeaturesSection = cfg.features  # type: ignore[assignment]
    images, spaces, provenances = plan.images, plan.spaces, plan.provenances
    planned = prepare_store(cfg, store, store.progress(), spaces, provenances, images, overwrite=overwrite,
                            target=target, source=plan.source_fingerprint)
    progress = target.progress()  # where the workers mark their batches

    batches = make_batches(len(images), feat.batch_size)
    for sp in planned:
        done = progress.done_units(Stage.FEATURIZE, sp.space.name)
        sp.todo = {b.index for b in batches if b.key not in done}
        report.skipped += len(batches) - len(sp.todo)
    work = [(b, [sp for sp in planned if b.index in sp.todo]) for b in batches]
    work = [(b, sps) for b, sps in work if sps]
    if report.skipped:
        logger.info(f"resuming: {report.skipped} (feature space, batch) pair(s) already done, "
                    f"{sum(len(s) for _, s in work)} to do")
    if work:
        logger.info(f"featurizing {len(images)} images with {len(spaces)} feature space(s) "
                    f"({', '.join(report.spaces)}) in {len(work)} batch(es) of <= {feat.batch_size}")
    options = {"device": feat.device, "channels_last": feat.channels_last, "min_image_side": feat.min_image_side,
               "torch_threads": feat.torch_threads,
               "threads_per_worker": torch_threads_per_worker(client) if work else {}}
    futures: dict[Future, tuple[Batch, list[_Space]]] = {}
    for b, sps in work:
        names = images[b.start:b.stop]
        f = client.submit(featurize_batch, target, b, plan.source.batch(names), names, [sp.space for sp in sps],
                          [sp.provenance for sp in sps], options,
                          key=f"featurize-{b.index}-{time.time_ns()}", retries=feat.retries, pure=False)
        futures[f] = (b, sps)
    bar = ProgressBar(len(futures), "featurize")
    for f in as_completed(futures):
        b, sps = futures.pop(f)
        if f.status == "finished":
            result = f.result()
            if result["bad"]:
                report.bad_images.update(result["bad"])
            else:
                report.batches += 1
                report.computed += len(sps)
                report.devices.add(result["device"])
        else:
            report.failed.append(f"{b.name}: {f.exception()!r}")
        bar.update(1)
        f.release()
    bar.close()

    if target is store:  # staged spaces are marked complete after their swap (featurize)
        for sp in planned:
            name = sp.space.name
            if progress.done_units(Stage.FEATURIZE, name) >= {b.key for b in batches} and not progress.is_done(Stage.FEATURIZED, name):
                progress.mark_done(Stage.FEATURIZED, name, info={"fingerprint": sp.fingerprint})
    report.seconds = time.perf_counter() - t0
    problems = []
    if report.bad_images:
        problems.append(str(BadImagesError(report.bad_images)))
    if report.failed:
        problems.append(f"{len(report.failed)} batch(es) failed after {feat.retries} retries:\n  "
                        + "\n  ".join(report.failed))
    if problems:
        raise FeaturizeError("featurize did not finish (every other batch is kept; rerun to resume):\n"
                             + "\n".join(problems))
    return report


def all_done(cfg: Config) -> bool:
    """Whether every configured space was featurized in full, as the config now asks (same
    checkpoint names, images and batch size). Cheap: reads names and markers, hashes nothing,
    so a rerun of a finished study starts no cluster and verifies no checkpoint."""
    store = StudyStore(cfg.store_path)
    if cfg.features is None or not store.exists():
        return False
    progress = store.progress()
    try:
        images = study_images(cfg)
        source = _jsonable(source_fingerprint(cfg))
    except DataError:
        return False  # preflight says what is wrong
    for space in study_feature_spaces(cfg):
        try:
            expected = _jsonable(fingerprint(space_provenance(space), images, cfg.features.batch_size, source))
        except WeightsError:
            return False
        record = progress.read(Stage.FEATURIZED, space.name)
        if record is None or record.get("fingerprint") != expected or not store.has(features_group(space.name)):
            return False
    return True


__all__ = ["Batch", "FAULT_ENV", "FeaturizeError", "FeaturizeReport", "Plan", "all_done", "cached_extractor",
           "check_workers",
           "featurize", "featurize_batch", "fingerprint", "image_source", "load_space", "make_batches",
           "nsd_sessions", "nsd_study_images", "preflight", "prepare_store", "source_fingerprint",
           "space_provenance", "stimuli_path", "study_feature_spaces", "study_images",
           "torch_threads_per_worker", "tune_malloc", "use_channels_last"]
