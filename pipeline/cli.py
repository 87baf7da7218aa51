"""The ``neurotask`` command.

    neurotask run      [--config FILE]   simulate, featurize (if configured) -> ingest -> fit -> analyse -> report
    neurotask simulate  --config FILE    write a synthetic study in BOLD5000's formats
    neurotask featurize --config FILE    the study's images -> features of every feature space, on Dask
    neurotask ingest    --config FILE    betas + masks + stimulus list -> responses in the store
    neurotask fit       --config FILE    ridge CV of every (subject, task, voxel chunk) on Dask
    neurotask analyse   --config FILE    task similarity, trees, Taskonomy comparison -> analysis/
    neurotask report    --config FILE    figures, NIfTI maps and report/index.html
    neurotask import-published DIR --config FILE [--masks DIR]
                                         the authors' published results -> results/ in the store
    neurotask status    --config FILE    what is done in the study's store

Errors a user can cause print one message and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from neurotask.cluster import ClusterConfigError, open_client
from neurotask.pipeline.config import Config, load_config
from neurotask.pipeline.errors import NeurotaskError, StoreError

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


logger = logging.getLogger("neurotask")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a message is emitted (not when the handler
    was made), so a redirected or captured stdout gets the messages."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: int) -> None:
    """Our messages as plain lines on stdout (the progress bar has stderr). Dask's own loggers
    are left as Dask's config sets them."""
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)


def _simulate(cfg: Config) -> None:
    from neurotask.pipeline.stages.simulate import simulate_study

    simulate_study(cfg)


def _featurize(cfg: Config, overwrite: bool) -> None:
    from neurotask.pipeline.stages.featurize import all_done, featurize, preflight

    if not overwrite and all_done(cfg):
        logger.info("features already computed for every feature space and image, skipped")
        return
    plan = preflight(cfg)  # missing images or weights fail here, before a cluster is started
    with open_client(cfg.cluster) as client:
        report = featurize(cfg, client, overwrite=overwrite, plan=plan)
    devices = ", ".join(sorted(report.devices)) or "-"
    logger.info(f"featurize: {report.batches} batch(es) run, {report.computed} (space, batch) pair(s) computed, "
        f"{report.skipped} already done, device {devices}, {report.seconds:.1f} s")


def _ingest(cfg: Config, overwrite: bool) -> None:
    from neurotask.pipeline.stages.ingest import ingest

    ingest(cfg, overwrite=overwrite)


def _fit(cfg: Config, overwrite: bool) -> None:
    from neurotask.pipeline.stages.fit import fit
    from neurotask.pipeline.stages.summary import summary_table
    from neurotask.storage import StudyStore

    with open_client(cfg.cluster) as client:
        report = fit(cfg, client, overwrite=overwrite)
    logger.info(f"fit: {report.computed} unit(s) computed, {report.skipped} already done, {report.seconds:.1f} s")
    store = StudyStore(cfg.store_path)
    results = {s: store.results(s).sel(task=cfg.tasks) for s in cfg.study.subjects}
    logger.info("")
    logger.info(summary_table(results))
    logger.info(f"\nresults: {cfg.store_path} (groups results/<subject>)")


def _analyse(cfg: Config, overwrite: bool) -> None:
    from neurotask.pipeline.stages.analyse import run_analysis, summary_lines

    analysis = run_analysis(cfg, overwrite=overwrite)
    for line in summary_lines(analysis):
        logger.info(line)


def _report(cfg: Config) -> Path:
    from neurotask.pipeline.stages.report import write_report

    return write_report(cfg)


def _import_published(cfg: Config, directory: Path, masks: Path | None, overwrite: bool) -> None:
    from neurotask.pipeline.stages.import_published import import_published

    import_published(cfg, directory, masks=masks, overwrite=overwrite)
    logger.info(f"results: {cfg.store_path}; next: `neurotask analyse --config {cfg.path}` and `neurotask report`")


def _status(cfg: Config) -> None:
    from neurotask.pipeline.stages.status import status_lines

    for line in status_lines(cfg):
        logger.info(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neurotask", description=__doc__.split("\n")[0])
    volume = parser.add_mutually_exclusive_group()
    volume.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")
    volume.add_argument("-v", "--verbose", action="store_true", help="print debugging messages too")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("run", "simulate and featurize (if configured), ingest, fit and summarise"),
                        ("simulate", "write a synthetic study in BOLD5000's formats"),
                        ("featurize", "the study's images -> features of every feature space, on Dask"),
                        ("ingest", "betas + masks + stimulus list -> responses in the store"),
                        ("fit", "ridge CV of every (subject, task, voxel chunk) on Dask"),
                        ("analyse", "task similarity, trees and the comparison with Taskonomy"),
                        ("report", "figures, NIfTI maps and one HTML page"),
                        ("import-published", "the authors' published per-voxel results into the store"),
                        ("status", "what is done in the study's store")]:
        p = sub.add_parser(name, help=help_)
        if name == "import-published":
            p.add_argument("directory", type=Path, help="folder with subj<N>/ (the authors' layout) or CSI<N>.npz")
            p.add_argument("--masks", type=Path, default=None,
                           help="folder of CSI<N>.npz holding cortical_mask_zyx (for the authors' pickle layout)")
        p.add_argument("--config", type=Path, default=DEMO_CONFIG if name == "run" else None,
                       required=name != "run", help="study config (YAML)")
        if name in ("run", "featurize", "ingest", "fit", "analyse", "import-published"):
            p.add_argument("--overwrite", action="store_true",
                           help="discard what this stage stored before and redo it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
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
        elif args.command == "analyse":
            _analyse(cfg, args.overwrite)
        elif args.command == "report":
            _report(cfg)
        elif args.command == "import-published":
            _import_published(cfg, args.directory, args.masks, args.overwrite)
        elif args.command == "status":
            _status(cfg)
        elif args.command == "run":
            if cfg.simulate is not None:
                _simulate(cfg)
            if cfg.features is not None and cfg.features.space_names:
                _featurize(cfg, args.overwrite)
            _ingest(cfg, args.overwrite)
            _fit(cfg, args.overwrite)
            if len(cfg.tasks) < 2:
                logger.info(f"done in {time.perf_counter() - t0:.1f} s (one task: no task similarity to analyse or report)")
            else:
                _analyse(cfg, args.overwrite)
                index = _report(cfg)
                logger.info(f"done in {time.perf_counter() - t0:.1f} s; report: {index}")
    except (NeurotaskError, StoreError, ClusterConfigError) as e:
        print(f"neurotask: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurotask: interrupted; finished units are kept, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
