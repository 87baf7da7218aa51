"""Fixtures of the analysis, report and import tests (imported by their test files).

``analysis_study``: ONE small simulated study shared by every demo-based test of the session
(2 subjects, 400 images, all 21 tasks so that the five planted Taskonomy clusters are there
to recover, a 16x18x12 volume, a 20-alpha grid), simulated, ingested, fitted, analysed and
reported once through the CLI. Its fit progress markers are recorded right after the run so
tests can check that nothing later touched them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


from conftest import reference_path  # noqa: E402,F401  (re-exported for the analysis tests)


def analysis_config_dict(workdir: Path) -> dict:
    return {
        "study": {"name": "analysis-test", "workdir": str(workdir), "subjects": ["CSI1", "CSI2"], "tasks": "all"},
        # signal variance higher than the demo's so that 60 test images give significant voxels
        # in both subjects (each has its own SNR per cluster and tuning, as the demo's do)
        "simulate": {"seed": 11, "n_images": 400, "n_repeated": 30, "n_showings": 3, "n_sessions": 2,
                     "n_features": 64, "volume_shape": [16, 18, 12], "signal_variance": [0.5, 1.5]},
        "data": {"chunk_size": 1000},
        # 1000 permutations: p >= 1/1001, so BH at q < 0.05 over ~1500 voxels can pass a task
        # with >= ~30 voxels at that floor (200 needed 150: a weaker subject passed none)
        "fit": {"n_alphas": 20, "n_folds": 5, "n_permutations": 1000},
        "analysis": {"n_clusters": 5, "n_permutations": 200, "n_bootstrap": 50},
        "report": {"n_slices": 8},
        "cluster": {"kind": "local", "n_workers": 2, "dashboard_address": "127.0.0.1:0"},
    }


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """relative path -> (mtime_ns, content) of every file under ``directory``."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


@dataclass
class Study:
    config: Path
    workdir: Path
    fit_markers: dict[str, tuple[int, bytes]]
    output: str


# Several test modules import the fixture; pytest then holds one definition per module, so
# the study itself is cached here, in this module, to be made once per session.
_CACHE: dict[str, Study] = {}


@pytest.fixture(scope="session")
def analysis_study(tmp_path_factory) -> Study:
    """The small study after one `neurotask run` (simulate, ingest, fit, analyse, report)."""
    if "study" not in _CACHE:
        _CACHE["study"] = _run_study(tmp_path_factory)
    return _CACHE["study"]


def _run_study(tmp_path_factory) -> Study:
    import contextlib
    import io

    from neurotask.pipeline import cli

    os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "warning")
    d = tmp_path_factory.mktemp("analysis_study")
    path = write_config(d / "study.yaml", analysis_config_dict(d / "work"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["run", "--config", str(path)])
    assert code == 0, out.getvalue()
    workdir = d / "work"
    return Study(path, workdir, snapshot(workdir / "progress" / "fit"), out.getvalue())
