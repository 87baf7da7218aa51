"""What gets installed: the built wheel holds one top-level package, ``neurotask`` (every module
of the checkout's cluster/, pipeline/, storage/ under it, and its data files), and no generic
name (``pipeline``, ``storage``, ``cluster``) can be imported where neurotask is installed.

Run as users run: subprocesses from a folder outside the checkout, with no PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder in the checkout -> the package it installs as (pyproject's package-dir).
PACKAGE_DIRS = {"neurotask": "neurotask", "cluster": "neurotask/cluster",
                "pipeline": "neurotask/pipeline", "storage": "neurotask/storage"}
GENERIC_NAMES = ["pipeline", "storage", "cluster"]


def _user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _python(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_user_env(), capture_output=True,
                          text=True, timeout=timeout)


def _checkout_files() -> dict[str, Path]:
    """Wheel path -> checkout file, for every file under the package folders (not caches)."""
    out = {}
    for source, target in PACKAGE_DIRS.items():
        for path in (REPO / source).rglob("*"):
            rel = path.relative_to(REPO / source)
            if path.is_file() and path.suffix != ".pyc" and "__pycache__" not in rel.parts:
                out[f"{target}/{rel.as_posix()}"] = path
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from a copy of the checkout (the build writes build/ and egg-info into
    its source tree; the copy keeps them out of the checkout other tests read)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs"))
    proc = _python(["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist"), str(source)], cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    built = list((root / "dist").glob("neurotask-*.whl"))
    assert len(built) == 1, built
    with zipfile.ZipFile(built[0]) as whl:
        yield whl


@pytest.mark.slow
def test_wheel_top_level_is_neurotask_only(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = [t for t in top if t.endswith(".dist-info")]
    assert len(dist_info) == 1 and dist_info[0].startswith("neurotask-"), top
    assert top == {"neurotask", dist_info[0]}, f"top level of the wheel: {sorted(top)}"
    entry_points = wheel.read(f"{dist_info[0]}/entry_points.txt").decode()
    assert "neurotask = neurotask.pipeline.cli:main" in entry_points


@pytest.mark.slow
def test_wheel_holds_every_module_and_the_package_data(wheel):
    names = set(wheel.namelist())
    files = _checkout_files()
    modules = {k for k in files if k.endswith(".py")}
    assert {"neurotask/__main__.py", "neurotask/pipeline/cli.py", "neurotask/pipeline/stages/fit.py",
            "neurotask/pipeline/ridge/__init__.py", "neurotask/storage/__init__.py",
            "neurotask/cluster/slurm.py"} <= modules
    missing = sorted(modules - names)
    assert not missing, f"modules of the checkout missing from the wheel: {missing}"
    # Every other file under the package folders is package data (the Taskonomy tables, ...).
    data = {k: files[k] for k in files if k not in modules}
    assert {"neurotask/pipeline/data/taskonomy_tasks.json",
            "neurotask/pipeline/data/taskonomy_transfer_out_1k.csv"} <= set(data)
    missing = sorted(set(data) - names)
    assert not missing, f"package data missing from the wheel: {missing}"
    for wheel_path, path in data.items():
        assert wheel.read(wheel_path) == path.read_bytes(), wheel_path


# Run with `python -S`: no site-packages .pth files, so not the editable install of this
# checkout; sys.path is the unpacked wheel, then the environment's packages (the dependencies).
_ALONE = """
import importlib, runpy, sys
site, purelib, modules = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
sys.path[:0] = [site, purelib]
import neurotask
assert neurotask.__file__.startswith(site), neurotask.__file__
for name in modules:
    importlib.import_module(name)
for name in {generic}:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(f"import {{name}} works beside the wheel's neurotask")
sys.argv = ["neurotask", "--help"]
runpy.run_module("neurotask", run_name="__main__")
"""


@pytest.mark.slow
def test_wheel_installed_alone_imports_every_module_and_no_generic_name(wheel, tmp_path):
    site = tmp_path / "site"
    wheel.extractall(site)
    modules = [p.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
               for p in wheel.namelist() if p.endswith(".py") and not p.endswith("__main__.py")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _python(["-S", "-c", _ALONE.format(generic=GENERIC_NAMES), str(site),
                    sysconfig.get_paths()["purelib"], ",".join(modules)], cwd=elsewhere)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("usage: neurotask"), proc.stdout


@pytest.mark.parametrize("name", GENERIC_NAMES)
def test_generic_names_do_not_import_outside_the_checkout(name, tmp_path):
    proc = _python(["-c", f"import {name}"], cwd=tmp_path, timeout=60)
    assert proc.returncode != 0
    assert f"ModuleNotFoundError: No module named '{name}'" in proc.stderr, proc.stderr


def test_python_m_neurotask_works_outside_the_checkout(tmp_path):
    proc = _python(["-m", "neurotask", "--help"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: neurotask")
    for command in ("run", "fit", "status"):
        assert command in proc.stdout
