"""The command line: help texts, dispatch, exit codes, and the installed ``neurotask`` command
run as a user runs it (from a folder outside the checkout, no PYTHONPATH)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import reference_path
from neurotask.pipeline import cli

COMMANDS = {
    "run": cli.run_command,
    "simulate": cli.simulate_command,
    "featurize": cli.featurize_command,
    "ingest": cli.ingest_command,
    "fit": cli.fit_command,
    "analyse": cli.analyse_command,
    "report": cli.report_command,
    "import-published": cli.import_published_command,
    "status": cli.status_command,
}


def neurotask_command() -> str:
    found = shutil.which("neurotask")
    return found or str(Path(sys.executable).parent / "neurotask")


def run_neurotask(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed command, as a user starts it: no PYTHONPATH, the venv's bin on PATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run([neurotask_command(), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def write_study(folder: Path, subjects: list[str]) -> Path:
    """A study config with nothing but its name, workdir (relative to the file) and subjects."""
    path = folder / "study.yaml"
    path.write_text(f"study: {{name: cli-test, workdir: work, subjects: [{', '.join(subjects)}]}}\n")
    return path


def test_help_describes_the_tool_its_stages_and_the_readme(tmp_path):
    done = run_neurotask("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    description = text.split("\n\n", 1)[1]  # after the usage line
    assert not description.startswith("The ``neurotask`` command")
    assert description.startswith("Neural Taskonomy at cluster scale")
    assert "README" in text and "-q, --quiet" in text and "-v, --verbose" in text
    # the stages in the order `neurotask run` takes them, then every sub-command listed
    stages = ["simulate", "featurize", "ingest", "fit", "analyse", "report"]
    positions = [description.index(f"\n  {s} ") for s in stages]
    assert positions == sorted(positions)
    commands = text.split("commands:", 1)[1]
    for name in COMMANDS:
        assert f"\n    {name}" in commands


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert text.startswith(f"usage: neurotask {name} ")
    assert "--config" in text
    assert ("--overwrite" in text) == (name in ("run", "featurize", "ingest", "fit", "analyse", "import-published"))
    description = text.split("options:")[0]
    assert len(description.split()) > 12  # a sentence that says what it does, beyond the usage line
    if name == "run":
        assert ("simulate (if the config has simulate:) -> featurize (if it has features:) -> ingest -> fit "
                "-> summary table -> partition (if it has partition:) -> analyse -> report") in description
        assert "default: the demo study" in text
    if name == "import-published":
        assert "directory" in description and "--masks" in text


def test_each_command_dispatches_to_its_function():
    parser = cli.build_parser()
    for name, func in COMMANDS.items():
        extra = ["published"] if name == "import-published" else []
        args = parser.parse_args([name, *extra, "--config", "study.yaml"])
        assert args.func is func and args.config == Path("study.yaml")
    assert parser.parse_args(["run"]).config == cli.DEMO_CONFIG and cli.DEMO_CONFIG.is_file()
    args = parser.parse_args(["import-published", "d", "--masks", "m", "--config", "c", "--overwrite"])
    assert (args.directory, args.masks, args.overwrite) == (Path("d"), Path("m"), True)


def test_our_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    done = run_neurotask("report", "--config", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("neurotask: error: ") and "missing.yaml" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    # usage errors are argparse's, with the same status
    config = write_study(tmp_path, ["CSI1"])
    assert run_neurotask("fit", cwd=tmp_path).returncode == 2
    assert run_neurotask("-q", "-v", "status", "--config", str(config), cwd=tmp_path).returncode == 2


def test_ctrl_c_exits_130_and_quiet_silences_info(tmp_path, monkeypatch, capsys):
    config = write_study(tmp_path, ["CSI1"])

    def interrupted(cfg, args) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "status_command", interrupted)
    assert cli.main(["status", "--config", str(config)]) == 130
    assert "interrupted; finished units are kept" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli.main(["status", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["-q", "status", "--config", str(config)]) == 0
    assert capsys.readouterr().out == ""


def test_import_published_hint_names_the_config_of_both_next_commands(tmp_path):
    published = tmp_path / "published"
    published.mkdir()
    (published / "CSI1.npz").symlink_to(reference_path() / "published" / "CSI1.npz")
    config = write_study(tmp_path, ["CSI1"])
    done = run_neurotask("import-published", "published", "--config", "study.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    hint = done.stdout.strip().splitlines()[-1]
    config, store = config.resolve(), (tmp_path / "work" / "store.zarr").resolve()
    assert hint == (f"results: {store}; next: `neurotask analyse --config {config}` "
                    f"and `neurotask report --config {config}`")


def test_schema_command_prints_the_config_schema_the_checkout_ships(tmp_path):
    import json

    from neurotask.pipeline.config import json_schema

    done = run_neurotask("schema", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json_schema()
    out = tmp_path / "study.schema.json"
    assert cli.main(["schema", "--output", str(out)]) == 0
    shipped = Path(cli.__file__).resolve().parents[1] / "configs" / "study.schema.json"
    assert out.read_text() == shipped.read_text()


def test_an_npz_with_object_arrays_is_a_data_error_naming_file_and_key(tmp_path):
    import numpy as np

    from neurotask.pipeline.errors import DataError
    from neurotask.pipeline.formats.published import load_reference_npz

    path = tmp_path / "CSI1.npz"
    np.savez(path, tasks=np.array([{"not": "an array"}], dtype=object), r=np.zeros((1, 2)), p=np.zeros((1, 2)),
             r2=np.zeros((1, 2)), cortical_mask_zyx=np.ones((1, 1, 2), dtype=bool))
    with pytest.raises(DataError, match=rf"{path}: array 'tasks' holds Python objects"):
        load_reference_npz(path)


def test_fit_n_folds_above_the_ingested_images_is_refused_before_anything_is_written(tmp_path, capsys):
    from conftest import small_config_dict, write_config
    from neurotask.storage import StudyStore, results_group

    workdir = tmp_path / "work"
    raw = small_config_dict(workdir, study={"subjects": ["CSI1"]},
                            simulate={"n_images": 100, "n_repeated": 10, "volume_shape": [8, 8, 8]})
    prepared = write_config(tmp_path / "prepare.yaml", raw)
    assert cli.main(["simulate", "--config", str(prepared)]) == 0
    assert cli.main(["ingest", "--config", str(prepared)]) == 0
    raw.pop("simulate")  # without it the config cannot bound n_folds: the data does
    raw["fit"]["n_folds"] = 90  # 100 images, 15 held out
    path = write_config(tmp_path / "study.yaml", raw)
    capsys.readouterr()
    assert cli.main(["fit", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: fit.n_folds must be <= the training images of CSI1 (85 of its 100" in err and "got 90" in err
    assert not StudyStore(workdir / "store.zarr").has(results_group("CSI1"))


def test_a_reader_closing_the_pipe_ends_our_output_quietly(tmp_path, monkeypatch, capfd):
    """`neurotask status | head`: once head has gone, every further line used to print a
    "--- Logging error ---" traceback; now the rest of the output is dropped."""
    out = open(tmp_path / "out", "w")

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

        def fileno(self) -> int:
            return out.fileno()

    import logging as _logging

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    cli.configure_logging(_logging.INFO)
    try:
        for k in range(3):
            _logging.getLogger("neurotask").info(f"line {k}")
    finally:
        monkeypatch.undo()
        out.close()
    err = capfd.readouterr().err
    assert "Logging error" not in err and "BrokenPipeError" not in err


class _FakeResults:
    def sel(self, **kwargs):
        return self


def test_run_shares_one_cluster_between_featurize_fit_and_the_analysis(tmp_path, monkeypatch):
    """`neurotask run` opens one cluster (so one dashboard, one link) for featurize, the fit and
    the analysis, and closes it before the report; `fit` alone opens its own."""
    import contextlib

    import neurotask.cluster
    import neurotask.pipeline.stages.featurize as featurize_stage
    import neurotask.pipeline.stages.fit as fit_stage
    import neurotask.pipeline.stages.summary as summary
    import neurotask.storage

    events: list[str] = []

    @contextlib.contextmanager
    def open_client(section):
        client = f"client{sum(e.startswith('open') for e in events)}"
        events.append(f"open {client}")
        yield client
        events.append(f"close {client}")

    class Report:
        batches = computed = skipped = found_done = 0
        devices: set = set()
        seconds = 0.0

    monkeypatch.setattr(neurotask.cluster, "open_client", open_client)
    monkeypatch.setattr(featurize_stage, "all_done", lambda cfg: False)
    monkeypatch.setattr(featurize_stage, "preflight", lambda cfg: None)
    monkeypatch.setattr(featurize_stage, "featurize",
                        lambda cfg, client, **kw: events.append(f"featurize on {client}") or Report())
    monkeypatch.setattr(fit_stage, "check_splits", lambda cfg: None)
    monkeypatch.setattr(fit_stage, "fit", lambda cfg, client, **kw: events.append(f"fit on {client}") or Report())
    monkeypatch.setattr(summary, "summary_table", lambda results: "")
    monkeypatch.setattr(neurotask.storage.StudyStore, "results", lambda self, subject: _FakeResults())
    for name in ("simulate_command", "ingest_command"):
        monkeypatch.setattr(cli, name, lambda cfg, args: None)
    monkeypatch.setattr(cli, "analyse_command", lambda cfg, args: events.append("analyse"))
    monkeypatch.setattr(cli, "report_command", lambda cfg, args: events.append("report") or tmp_path / "index.html")

    config = tmp_path / "study.yaml"
    config.write_text(f"study: {{name: one-cluster, workdir: {tmp_path / 'work'}, subjects: [CSI1], "
                      "tasks: [tiny, edge2d]}\n"
                      "features: {tasks: [], extra: [{name: tiny, kind: torch_module, "
                      "factory: 'torch.nn:Conv2d', kwargs: {in_channels: 3, out_channels: 4, kernel_size: 5}, "
                      "image_size: 64}]}\n")
    assert cli.main(["run", "--config", str(config)]) == 0
    assert events == ["open client0", "featurize on client0", "fit on client0", "analyse", "close client0",
                      "report"]

    events.clear()
    assert cli.main(["fit", "--config", str(config)]) == 0
    assert events == ["open client0", "fit on client0", "close client0"]
