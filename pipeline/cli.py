"""The ``neurotask`` command.

    neurotask run      [--config FILE]   simulate, featurize (if configured) -> ingest -> fit -> summary
    neurotask simulate  --config FILE    write a synthetic study in BOLD5000's formats
    neurotask featurize --config FILE    the study's images -> features of every feature space, on Dask
    neurotask ingest    --config FILE    betas + masks + stimulus list -> responses in the store
    neurotask fit       --config FILE    ridge CV of every (subject, task, voxel chunk) on Dask
    neurotask status    --config FILE    what is done in the study's store

Errors a user can cause print one message and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from cluster import ClusterConfigError, open_client
from pipeline.config import Config, load_config
from pipeline.errors import NeurotaskError, StoreError

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def log(msg: str) -> None:
    print(msg, flush=True)


def _simulate(cfg: Config) -> None:
    from dataclasses import asdict

    from pipeline.simulate import simulate_study
    from storage import Progress, StudyStore

    if cfg.simulate is None:
        raise NeurotaskError(f"{cfg.path}: no 'simulate' section; nothing to simulate")
    store = StudyStore(cfg.store_path)
    store.create()
    progress = Progress(cfg.workdir / "progress", store.store_id)
    files = {k: getattr(cfg.data, k) for k in ("root", "betas", "brain_mask", "roi_masks", "stim_list", "rois")}
    fingerprint = hashlib.sha256(json.dumps([asdict(cfg.simulate), cfg.study.subjects, cfg.tasks, files],
                                            sort_keys=True).encode()).hexdigest()[:16]
    record = progress.read("simulate", "study")
    if record and record.get("fingerprint") == fingerprint:
        log(f"simulated study already in {cfg.workdir}, skipped")
        return
    if record:
        raise NeurotaskError(
            f"{cfg.workdir} holds a study simulated with other settings; use a new study.workdir "
            "(or delete that directory) to simulate again")
    log(f"simulating a study in {cfg.workdir}")
    simulate_study(cfg, log=log)
    progress.mark_done("simulate", "study", info={"fingerprint": fingerprint})


def _featurize(cfg: Config, overwrite: bool) -> None:
    from pipeline.featurize import all_done, featurize, preflight

    if not overwrite and all_done(cfg):
        log("features already computed for every feature space and image, skipped")
        return
    plan = preflight(cfg)  # missing images or weights fail here, before a cluster is started
    with open_client(cfg.cluster, log=log) as client:
        report = featurize(cfg, client, overwrite=overwrite, plan=plan, log=log)
    devices = ", ".join(sorted(report.devices)) or "-"
    log(f"featurize: {report.batches} batch(es) run, {report.computed} (space, batch) pair(s) computed, "
        f"{report.skipped} already done, device {devices}, {report.seconds:.1f} s")


def _ingest(cfg: Config, overwrite: bool) -> None:
    from pipeline.ingest import ingest

    ingest(cfg, overwrite=overwrite, log=log)


def _fit(cfg: Config, overwrite: bool) -> None:
    from pipeline.fit import fit
    from pipeline.summary import summary_table
    from storage import StudyStore

    with open_client(cfg.cluster, log=log) as client:
        report = fit(cfg, client, overwrite=overwrite, log=log)
    log(f"fit: {report.computed} unit(s) computed, {report.skipped} already done, {report.seconds:.1f} s")
    store = StudyStore(cfg.store_path)
    results = {s: store.results(s).sel(task=cfg.tasks) for s in cfg.study.subjects}
    log("")
    log(summary_table(results))
    log(f"\nresults: {cfg.store_path} (groups results/<subject>)")


def _status(cfg: Config) -> None:
    from pipeline.status import status_lines

    for line in status_lines(cfg):
        log(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neurotask", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("run", "simulate and featurize (if configured), ingest, fit and summarise"),
                        ("simulate", "write a synthetic study in BOLD5000's formats"),
                        ("featurize", "the study's images -> features of every feature space, on Dask"),
                        ("ingest", "betas + masks + stimulus list -> responses in the store"),
                        ("fit", "ridge CV of every (subject, task, voxel chunk) on Dask"),
                        ("status", "what is done in the study's store")]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", type=Path, default=DEMO_CONFIG if name == "run" else None,
                       required=name != "run", help="study config (YAML)")
        if name in ("run", "featurize", "ingest", "fit"):
            p.add_argument("--overwrite", action="store_true",
                           help="discard what this stage stored before and redo it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = load_config(args.config)
        if args.command == "simulate":
            _simulate(cfg)
        elif args.command == "featurize":
            _featurize(cfg, args.overwrite)
        elif args.command == "ingest":
            _ingest(cfg, args.overwrite)
        elif args.command == "fit":
            _fit(cfg, args.overwrite)
        elif args.command == "status":
            _status(cfg)
        elif args.command == "run":
            if cfg.simulate is not None:
                _simulate(cfg)
            if cfg.features is not None and cfg.features.space_names:
                _featurize(cfg, args.overwrite)
            _ingest(cfg, args.overwrite)
            _fit(cfg, args.overwrite)
            log(f"done in {time.perf_counter() - t0:.1f} s")
    except (NeurotaskError, StoreError, ClusterConfigError) as e:
        print(f"neurotask: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurotask: interrupted; finished units are kept, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
