"""`neurotask verify`: check every chunk that a progress marker vouches for against the
checksums the marker recorded (``storage.checksums``), without changing anything.

Markers checked: ingest/<subject> (the responses), fit/<subject>/<task>/<chunk>,
ceiling/<subject> and finalize/<subject>/<task> of the configured subjects and tasks, and the
partition's partition/<analysis>/<subject>/<block> and partition_final/<analysis>/<subject>. Markers written before checksums were recorded are
reported as unverifiable and do not fail the check. `neurotask fit` runs the same check on the
markers it would trust, and recomputes the damaged units (``stages.fit.plan_units``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from neurotask.pipeline.config import Config
from neurotask.pipeline.errors import DataError
from neurotask.storage import Progress, Stage, StudyStore, results_group
from neurotask.storage.checksums import ANATOMY_CHUNKS, CHUNKS, Damage

logger = logging.getLogger(__name__)



@dataclass
class VerifyReport:
    chunks: int = 0  # chunks checked
    damage: list[Damage] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)  # markers without checksums


def marker_damage(store: StudyStore, subject: str, parts: Sequence[str],
                  record: dict[str, Any]) -> list[Damage] | None:
    """The damaged chunks a marker (``parts``, its ``record``) vouches for; None when the
    marker has no checksums (written by an older version)."""
    if CHUNKS not in record:
        return None
    return store.check_results(subject, "/".join(parts), record[CHUNKS])


def responses_damage(store: StudyStore, subject: str) -> list[Damage] | None:
    """The damaged chunks of ``responses/<subject>`` its ingest marker vouches for; None when
    it is not ingested or its marker has no checksums. Damaged responses cannot be recomputed
    by the fit: they need `neurotask ingest --overwrite`."""
    record = store.progress().read(Stage.INGEST, subject) if store.exists() else None
    if record is None or CHUNKS not in record:
        return None
    return store.check_responses(subject, f"{Stage.INGEST}/{subject}", record[CHUNKS])


def anatomy_damage(store: StudyStore, subject: str) -> list[Damage]:
    """The damaged chunks of ``anatomy/<subject>`` (the maps' underlay) its ingest marker vouches
    for. The fit does not read it; the report would draw a wrong underlay; a re-ingest repairs it."""
    record = store.progress().read(Stage.INGEST, subject) if store.exists() else None
    if not record or not record.get(ANATOMY_CHUNKS):
        return []
    return store.check_anatomy(subject, f"{Stage.INGEST}/{subject}", record[ANATOMY_CHUNKS])


def subject_markers(progress: Progress, subject: str, tasks: Sequence[str]) -> list[tuple[str, ...]]:
    """The names of every valid fit, ceiling and finalize marker of ``subject`` and ``tasks``."""
    out: list[tuple[str, ...]] = []
    if progress.is_done(Stage.CEILING, subject):
        out.append((Stage.CEILING, subject))
    for task in tasks:
        out += [(Stage.FIT, subject, task, key) for key in sorted(progress.done_units(Stage.FIT, subject, task))]
        if progress.is_done(Stage.FINALIZE, subject, task):
            out.append((Stage.FINALIZE, subject, task))
    return out


def verify_store(store: StudyStore, subjects: Sequence[str], tasks: Sequence[str], *,
                 permutation: bool = False) -> VerifyReport:
    """Check the array metadata of every expected results variable (with ``permutation``, the
    permutation test's too) of ``subjects``, and every chunk the markers of ``subjects`` x
    ``tasks`` vouch for. Each damaged path is reported once."""
    progress = store.progress()
    report = VerifyReport()
    for subject in subjects:
        responses = responses_damage(store, subject)
        if responses is not None:
            ingested = store.progress().read(Stage.INGEST, subject)
            report.chunks += len(ingested[CHUNKS]) + len(ingested.get(ANATOMY_CHUNKS) or [])
            report.damage += responses + anatomy_damage(store, subject)
        group = results_group(subject)
        if not store.has(group):
            continue  # nothing fitted yet (its markers, if any, belong to another store)
        for name in store.broken_results_metadata(subject, permutation):
            report.damage.append(Damage(f"{group}/{name}/zarr.json", group, "array metadata missing or unreadable"))
        for parts in subject_markers(progress, subject, tasks):
            record = progress.read(*parts)
            if record is None:  # removed since it was listed
                continue
            damage = marker_damage(store, subject, parts, record)
            if damage is None:
                report.unverifiable.append("/".join(parts))
                continue
            report.chunks += len(record[CHUNKS])
            reported = {d.path for d in report.damage}
            report.damage += [d for d in damage if d.path not in reported]  # lost metadata: once per array
    return report


def partition_markers(store: StudyStore, subjects: Sequence[str]) -> list[tuple[str, ...]]:
    """Every partition block and final marker of ``subjects``, over the stored analyses."""
    progress, out = store.progress(), []
    for analysis in store.members("partition"):
        for subject in subjects:
            out += [(Stage.PARTITION, analysis, subject, key)
                    for key in sorted(progress.done_units(Stage.PARTITION, analysis, subject))]
            if progress.is_done(Stage.PARTITION_FINAL, analysis, subject):
                out.append((Stage.PARTITION_FINAL, analysis, subject))
    return out


def verify_partitions(store: StudyStore, subjects: Sequence[str], report: VerifyReport) -> None:
    """Add the partition markers' chunks to ``report`` (``partition/<analysis>/<subject>``)."""
    progress = store.progress()
    for parts in partition_markers(store, subjects):
        record = progress.read(*parts)
        if record is None:
            continue
        if CHUNKS not in record:
            report.unverifiable.append("/".join(parts))
            continue
        report.chunks += len(record[CHUNKS])
        reported = {d.path for d in report.damage}
        damage = store.check_partition(parts[1], parts[2], "/".join(parts), record[CHUNKS])
        report.damage += [d for d in damage if d.path not in reported]


def verify_command(cfg: Config, args: argparse.Namespace | None = None) -> None:
    """Verify the configured subjects' and tasks' results; raise DataError naming every
    damaged chunk, else log how many chunks were verified."""
    store = StudyStore(cfg.store_path)
    report = verify_store(store, cfg.study.subjects, cfg.tasks, permutation=cfg.fit.permutation)
    if store.exists():
        verify_partitions(store, cfg.study.subjects, report)
    if report.unverifiable:
        logger.warning(f"{len(report.unverifiable)} marker(s) unverifiable (written before checksums): "
                       + ", ".join(report.unverifiable[:10]) + (" ..." if len(report.unverifiable) > 10 else ""))
    if report.damage:
        raise DataError(f"{cfg.store_path}: {len(report.damage)} damaged chunk(s) or array metadata, "
                        f"{report.chunks} chunks checked "
                        "(`neurotask fit` and `neurotask partition` recompute them):\n  " + "\n  ".join(map(str, report.damage)))
    logger.info(f"{report.chunks} chunks verified, all intact")
