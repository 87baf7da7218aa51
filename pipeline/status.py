"""What is done in a study's store: per subject, ingestion; per (subject, task), fit units."""

from __future__ import annotations

from pipeline.config import Config
from storage import Progress, StudyStore


def status_lines(cfg: Config) -> list[str]:
    store = StudyStore(cfg.store_path)
    if not store.exists():
        return [f"{cfg.store_path}: no store yet (nothing done)"]
    progress = Progress(cfg.workdir / "progress", store.store_id)
    lines = [f"store: {cfg.store_path}",
             f"features: {', '.join(store.feature_tasks()) or 'none'}"]
    for subject in cfg.study.subjects:
        if not (progress.is_done("ingest", subject) and store.has(f"responses/{subject}")):
            lines.append(f"{subject}: not ingested")
            continue
        resp = store.responses(subject)
        v, chunk = resp.sizes["voxel"], int(resp.attrs["chunk_size"])
        n_units = -(-v // chunk)
        lines.append(f"{subject}: {resp.sizes['image']} images x {v} voxels ({n_units} chunks)")
        results = store.results(subject) if store.has(f"results/{subject}") else None
        for task in cfg.tasks:
            done = len(progress.done_units("fit", subject, task))
            state = "done" if done == n_units else ("missing" if done == 0 else "partial")
            extra = ""
            if results is not None and task in results["task"].values and done == n_units:
                sig = int(results["significant"].sel(task=task).sum())
                extra = f", {sig} significant voxels"
            lines.append(f"  {task:<17} {state:<8} {done}/{n_units} chunks{extra}")
    return lines
