"""The ``neurotask`` command: argparse sub-commands, one small function each.

Every command loads and validates the study config once, then calls its stage; errors a
user can cause print one line and exit with status 2, without a traceback; Ctrl-C exits
with 130 and keeps every finished unit.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# Everything of ours is imported when a command runs, not here: the config and the errors
# pull in Dask and xarray, and `neurotask --help` should answer at once.
if TYPE_CHECKING:
    from distributed import Client

    from neurotask.pipeline.config import Config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

DESCRIPTION = """\
Neural Taskonomy at cluster scale: predict fMRI responses to images from the latent
features of the Taskonomy task networks (and any other feature space) with voxelwise ridge
regression on Dask, infer how similar the tasks are from where in the brain each one
predicts well, and compare that brain-derived task structure with Taskonomy's.

A study is one YAML config; its stages talk through one Zarr store and resume after a
crash or a kill without redoing what finished. In the order `neurotask run` takes them:

  simulate    a synthetic study in BOLD5000's file formats (if the config has simulate:)
  featurize   the study's images -> features of every feature space (if it has features:)
  ingest      betas, masks and stimulus list -> responses in the store
  fit         ridge cross-validation of every (subject, task, voxel chunk); a summary
  partition   variance partitioning and banded ridge of groups of feature spaces (if it has partition:)
  analyse     task similarity, trees, graphs and the comparison with Taskonomy
  report      figures, NIfTI maps and one HTML page

The README (README.md at the top of the neurotask source tree) explains every command and
configuration option; `neurotask COMMAND --help` shows a command's options."""

EPILOG = "`neurotask run` with no arguments runs the demo study (configs/demo.yaml)."

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

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            # The reader closed the pipe (`neurotask status | head`): the rest of our output
            # goes to /dev/null instead of a "Logging error" traceback per line.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return
        super().handleError(record)


def configure_logging(level: int) -> None:
    """Our messages as plain lines on stdout (the progress bar has stderr). Dask's own loggers
    are left as Dask's config sets them."""
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    # Replace only our own handler of an earlier call (in-process callers, tests), not
    # handlers others attached to the logger.
    for old in [h for h in logger.handlers if isinstance(h, _StdoutHandler)]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)


# --------------------------------------------------------------------------- commands
# Each takes the validated config and the parsed arguments.


def simulate_command(cfg: Config, args: argparse.Namespace) -> None:
    if cfg.data.format == "nsd":  # the Natural Scenes Dataset's file formats
        from neurotask.pipeline.stages.simulate_nsd import simulate_nsd_study

        simulate_nsd_study(cfg)
        return
    from neurotask.pipeline.stages.simulate import simulate_study

    simulate_study(cfg)


def featurize_command(cfg: Config, args: argparse.Namespace, cluster: SharedCluster | None = None) -> None:
    from neurotask.pipeline.stages.featurize import all_done, featurize, preflight

    if not args.overwrite and all_done(cfg):
        logger.info("features already computed for every feature space and image, skipped")
        return
    plan = preflight(cfg)  # missing images or weights fail here, before a cluster is started
    with _cluster_for(cfg, cluster) as shared:
        report = featurize(cfg, shared.client(), overwrite=args.overwrite, plan=plan)
    devices = ", ".join(sorted(report.devices)) or "-"
    logger.info(f"featurize: {report.batches} batch(es) run, {report.computed} (space, batch) pair(s) computed, "
        f"{report.skipped} already done, device {devices}, {report.seconds:.1f} s")


def ingest_command(cfg: Config, args: argparse.Namespace) -> None:
    from neurotask.pipeline.stages.ingest import ingest

    ingest(cfg, overwrite=args.overwrite)


def fit_command(cfg: Config, args: argparse.Namespace, cluster: SharedCluster | None = None) -> None:
    from neurotask.pipeline.stages.fit import check_splits, fit
    from neurotask.pipeline.stages.summary import summary_table
    from neurotask.storage import StudyStore

    check_splits(cfg)
    with _cluster_for(cfg, cluster) as shared:
        report = fit(cfg, shared.client(), overwrite=args.overwrite)
    done = report.skipped + report.found_done
    logger.info(f"fit: {report.computed} unit(s) computed, {done} already done, {report.seconds:.1f} s")
    store = StudyStore(cfg.store_path)
    results = {s: store.results(s).sel(task=cfg.tasks) for s in cfg.study.subjects}
    logger.info("")
    logger.info(summary_table(results))
    logger.info(f"\nresults: {cfg.store_path} (groups results/<subject>)")


def partition_command(cfg: Config, args: argparse.Namespace, cluster: SharedCluster | None = None) -> None:
    from neurotask.pipeline.errors import ConfigError
    from neurotask.pipeline.stages.fit import check_splits
    from neurotask.pipeline.stages.partition import check_partition_features, partition, summary_lines
    from neurotask.storage import StudyStore

    check_splits(cfg)
    if cfg.partition is None:
        raise ConfigError(f"{cfg.path}: no partition: section; add partition.analyses (named groups of feature "
                          "spaces) to run variance partitioning")
    check_partition_features(cfg, StudyStore(cfg.store_path))  # before a cluster starts
    with _cluster_for(cfg, cluster) as shared:
        report = partition(cfg, shared.client(), overwrite=args.overwrite)
    logger.info(f"partition: {report.computed} unit(s) computed, {report.skipped} already done, {report.seconds:.1f} s")
    for line in summary_lines(cfg, StudyStore(cfg.store_path)):
        logger.info(line)


def analyse_command(cfg: Config, args: argparse.Namespace) -> None:
    from neurotask.pipeline.stages.analyse import run_analysis, summary_lines

    analysis = run_analysis(cfg, overwrite=args.overwrite)
    for line in summary_lines(analysis):
        logger.info(line)


def report_command(cfg: Config, args: argparse.Namespace) -> Path:
    from neurotask.pipeline.stages.report import write_report

    return write_report(cfg)


def import_published_command(cfg: Config, args: argparse.Namespace) -> None:
    from neurotask.pipeline.stages.import_published import import_published

    import_published(cfg, args.directory, masks=args.masks, overwrite=args.overwrite, upstream=args.upstream)
    logger.info(f"results: {cfg.store_path}; next: `neurotask analyse --config {cfg.path}` "
                f"and `neurotask report --config {cfg.path}`")


def verify_command(cfg: Config, args: argparse.Namespace) -> None:
    from neurotask.pipeline.stages.verify import verify_command as verify

    verify(cfg, args)


def status_command(cfg: Config, args: argparse.Namespace) -> None:
    from neurotask.pipeline.stages.status import status_lines

    for line in status_lines(cfg):
        logger.info(line)


def schema_command(cfg: None, args: argparse.Namespace) -> None:
    """The JSON schema of a study config, on stdout or into ``--output``."""
    import json

    from neurotask.pipeline.config import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
        logger.info(f"wrote {args.output}")


def run_command(cfg: Config, args: argparse.Namespace) -> None:
    """Every stage the config asks for, in order; each skips what the store already holds.

    One Dask cluster serves the whole run: started when the first stage needs it (a rerun
    with nothing to featurize or fit starts none early), kept through featurize, fit and the
    analysis, so its dashboard link, printed once, stays valid for the run."""
    t0 = time.perf_counter()
    with SharedCluster(cfg) as cluster:
        if cfg.simulate is not None:
            simulate_command(cfg, args)
        if cfg.features is not None and cfg.features.space_names:
            featurize_command(cfg, args, cluster)
        ingest_command(cfg, args)
        fit_command(cfg, args, cluster)
        if cfg.partition is not None:
            partition_command(cfg, args, cluster)
        if len(cfg.tasks) < 2:
            logger.info(f"done in {time.perf_counter() - t0:.1f} s (one task: no task similarity to analyse or report)")
            return
        analyse_command(cfg, args)
    index = report_command(cfg, args)
    logger.info(f"done in {time.perf_counter() - t0:.1f} s; report: {index}")


class SharedCluster:
    """The Dask client of a command, opened (``cluster.open_client``) on the first
    :meth:`client` call and shut down when the ``with`` block ends, so the stages of one
    ``neurotask run`` share one cluster and one dashboard."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._stack = contextlib.ExitStack()
        self._client: Client | None = None

    def client(self) -> Client:
        if self._client is None:
            from neurotask.cluster import open_client

            self._client = self._stack.enter_context(open_client(self.cfg.cluster))
        return self._client

    def __enter__(self) -> SharedCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client = None
        self._stack.close()


@contextlib.contextmanager
def _cluster_for(cfg: Config, shared: SharedCluster | None):
    """``shared`` as it is (the run closes it), or a cluster of this command alone."""
    if shared is not None:
        yield shared
        return
    with SharedCluster(cfg) as own:
        yield own


# --------------------------------------------------------------------------- parser


def _add_command(sub, name: str, func: Callable[[Config, argparse.Namespace], object], help_: str,
                 description: str, *, overwrite: bool) -> argparse.ArgumentParser:
    """A sub-command whose ``--config`` is required (``run`` gives it a default) and,
    when ``overwrite``, takes ``--overwrite``."""
    p = sub.add_parser(name, help=help_, description=description)
    if name == "run":
        p.add_argument("--config", type=Path, default=DEMO_CONFIG,
                       help="study config (YAML); default: the demo study, configs/demo.yaml")
    else:
        p.add_argument("--config", type=Path, required=True, help="study config (YAML)")
    if overwrite:
        what = "the stages" if name == "run" else "this stage"
        p.add_argument("--overwrite", action="store_true", help=f"discard what {what} stored before and redo it")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neurotask", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    volume = parser.add_mutually_exclusive_group()
    volume.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")
    volume.add_argument("-v", "--verbose", action="store_true", help="print debugging messages too")
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    # name, function, one-line help (the command list), description (the command's --help), --overwrite
    commands = [
        ("run", run_command,
         "every stage: simulate (if configured) -> featurize (if configured) -> ingest -> fit -> summary "
         "-> partition (if configured) -> analyse -> report",
         "Run the whole study: simulate (if the config has simulate:) -> featurize (if it has features:) "
         "-> ingest -> fit -> summary table -> partition (if it has partition:) -> analyse -> report. Each stage skips what the store already "
         "holds, so a rerun resumes. With one task there is no task similarity: the run stops after the fit.",
         True),
        ("simulate", simulate_command, "write a synthetic study in BOLD5000's formats",
         "Write a synthetic study (betas, masks, stimulus lists, images) in BOLD5000's own file formats, "
         "as the config's simulate: section describes.", False),
        ("featurize", featurize_command, "the study's images -> features of every feature space, on Dask",
         "Compute the features of every configured feature space (Taskonomy encoders and others) for the "
         "study's images, in image batches on Dask, into features/<space> in the store.", True),
        ("ingest", ingest_command, "betas + masks + stimulus list -> responses in the store",
         "Read each subject's betas, masks and stimulus list and write its responses (image, voxel) into "
         "responses/<subject> in the store.", True),
        ("fit", fit_command, "ridge CV of every (subject, task, voxel chunk) on Dask",
         "Fit voxelwise ridge regression with cross-validated alphas for every (subject, task, voxel chunk) "
         "on Dask, test it on held-out images, write results/<subject> and print a summary table.", True),
        ("partition", partition_command, "variance partitioning and banded ridge of feature-space groups, on Dask",
         "For every analysis of the config's partition: section, fit every union of its groups of feature "
         "spaces with the fit's protocol, split each voxel's test R² into what each group explains uniquely "
         "and what groups share, test the unique variance (sign-flip, BH-FDR), fit banded ridge, and write "
         "partition/<analysis>/<subject>. Resumable by voxel block.", True),
        ("analyse", analyse_command, "task similarity, trees and the comparison with Taskonomy",
         "From the FDR-masked test r: task similarity, task trees and graphs, ROI and 3D-vs-2D summaries "
         "and the comparison with Taskonomy's task structure, into analysis/ in the store.", True),
        ("report", report_command, "figures, NIfTI maps and one HTML page",
         "Draw the figures, write NIfTI maps and statistics.json, and assemble <workdir>/report/index.html "
         "from the stored analysis and results.", False),
        ("import-published", import_published_command, "the authors' published per-voxel results into the store",
         "Read the Neural Taskonomy authors' published per-voxel results into results/<subject> of the "
         "study's store, to analyse and report them like a fit of our own.", True),
        ("verify", verify_command, "check every finished unit's chunks against its marker's checksums",
         "Check that every chunk a progress marker vouches for (fit units, noise ceilings, q-values) is in "
         "the store with the size and checksum recorded when it was written, and every results array's "
         "metadata is readable. Lists each damaged or missing chunk and exits with status 2; the next "
         "`neurotask fit` (or `run`) recomputes exactly those units.", False),
        ("status", status_command, "what is done in the study's store",
         "Show what is done, running and missing in the study's store.", False),
    ]
    for name, func, help_, description, overwrite in commands:
        p = _add_command(sub, name, func, help_, description, overwrite=overwrite)
        if name == "import-published":
            p.add_argument("directory", type=Path, help="folder with subj<N>/ (the authors' layout) or CSI<N>.npz")
            p.add_argument("--masks", type=Path, default=None,
                           help="folder of CSI<N>.npz holding cortical_mask_zyx (for the authors' pickle layout)")
            p.add_argument("--upstream", default=None, metavar="REPOSITORY@COMMIT",
                           help="where the files were released (kept for the report's provenance), e.g. "
                                "github.com/ariaaay/NeuralTaskonomy@5400d0e8d671e3078918f846f18508b012299795")
    p = sub.add_parser("schema", help="the JSON schema of a study config, for editors",
                       description="Print the JSON schema of a study config file (or write it to --output). "
                                   "Editors with a YAML language server validate and complete a config that "
                                   "starts with: # yaml-language-server: $schema=study.schema.json")
    p.add_argument("--output", type=Path, default=None, help="write the schema to this file instead")
    p.set_defaults(func=schema_command, config=None)  # needs no study config
    return parser


# Commands that only read the study: they take no driver lock and need no writable workdir
# (report writes only under <workdir>/report, which a running driver never touches).
READ_ONLY_COMMANDS = frozenset({"status", "report", "schema"})


def _check_writable(workdir: Path) -> None:
    """Refuse a workdir (or, when missing, its nearest existing parent) we cannot write,
    before any work is done and before the lock file is created."""
    from neurotask.pipeline.errors import WorkdirError

    existing = workdir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise WorkdirError(f"study.workdir {workdir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the workdir" if existing == workdir else f"its parent {existing}"
        raise WorkdirError(f"study.workdir {workdir}: {what} is not writable by this user; make it writable "
                           "(chmod/chown) or set study.workdir to a writable directory")


def _os_error_line(e: OSError) -> str | None:
    """One line for an OSError a user can fix (permissions, read-only or full filesystem), else None."""
    where = e.filename if e.filename is not None else "a file of the study"
    if isinstance(e, PermissionError):
        return (f"permission denied: {where}; make it writable by this user (chmod/chown), "
                "or set study.workdir to a writable directory")
    if e.errno == errno.EROFS:
        return f"read-only filesystem: {where}; set study.workdir to a directory on a writable filesystem"
    if e.errno == errno.ENOSPC:
        return f"no space left on device: {where}; free space there or set study.workdir elsewhere, then rerun"
    return None


def _run(args: argparse.Namespace) -> None:
    """Load the config, then run the command: a writing command holding the workdir's lock."""
    from neurotask.pipeline.config import load_config
    from neurotask.storage.lock import driver_lock

    if args.config is None:
        args.func(None, args)
        return
    cfg = load_config(args.config)
    if args.command in READ_ONLY_COMMANDS:
        args.func(cfg, args)
        return
    _check_writable(cfg.workdir)
    # The command as `neurotask status` shows it, --overwrite included (a stage being redone
    # is running, not unfinished).
    command = ["neurotask", args.command, "--config", str(cfg.path)] + (["--overwrite"] if getattr(args, "overwrite", False) else [])
    with driver_lock(cfg.workdir, " ".join(command)):
        _finish_interrupted_replacement(cfg)
        args.func(cfg, args)


def _finish_interrupted_replacement(cfg: Config) -> None:
    """An --overwrite killed while it swapped new data in left a journal: roll it forward
    (under the lock, before any stage reads the store), so no stage sees half a swap."""
    from neurotask.storage import StudyStore
    from neurotask.storage.staging import recover

    store = StudyStore(cfg.store_path)
    if store.exists() and recover(store):
        logger.info(f"{cfg.store_path}: finished the replacement an interrupted --overwrite had begun")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    from neurotask.cluster import ClusterConfigError
    from neurotask.pipeline.errors import NeurotaskError, StoreError
    from neurotask.storage.lock import LockedError

    try:
        _run(args)
    except (NeurotaskError, StoreError, ClusterConfigError, LockedError) as e:
        print(f"neurotask: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        line = _os_error_line(e)
        if line is None:
            raise  # not a user's mistake we can name: keep the traceback
        print(f"neurotask: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurotask: interrupted; finished units are kept, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
