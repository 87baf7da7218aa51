"""The driver lock per workdir (neurotask.storage.lock): a second driver is refused naming
the first, a stale lock of a dead driver is taken over, and the reading commands still work."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import collect_logs, small_config_dict, write_config
from fault_support import neurotask_command, neurotask_env
from neurotask.pipeline import cli
from neurotask.storage.lock import LOCK_NAME, LockedError, driver_lock, mount_fstype

HOLD = """
import sys, time
from pathlib import Path
from neurotask.storage.lock import driver_lock
with driver_lock(Path(sys.argv[1]), "holder-test"):
    print("locked", flush=True)
    time.sleep(120)
"""


def _tree(d: Path) -> dict[str, bytes]:
    """Every file under d (but the lock file) and its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock of tmp_path/work; yields (workdir, pid)."""
    workdir = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True,
                            env=neurotask_env(), cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield workdir, proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_second_driver_is_refused_naming_the_holder_and_the_store_is_untouched(tmp_path, holder):
    workdir, pid = holder
    (workdir / "marker.txt").write_text("before")
    before = _tree(workdir)
    cfg = write_config(tmp_path / "study.yaml", small_config_dict(workdir))
    done = subprocess.run([*neurotask_command(), "fit", "--config", str(cfg)], cwd=tmp_path, env=neurotask_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    err = done.stderr
    assert err.startswith("neurotask: error: ")
    assert f"pid {pid}" in err and socket.gethostname() in err and "holder-test" in err and "since" in err
    assert "neurotask status" in err and "report" in err
    assert _tree(workdir) == before
    assert not (workdir / "store.zarr").exists()


def test_status_works_while_locked_and_names_the_driver(tmp_path, holder):
    workdir, pid = holder
    cfg = write_config(tmp_path / "study.yaml", small_config_dict(workdir))
    with collect_logs() as messages:
        assert cli.main(["status", "--config", str(cfg)]) == 0
    assert any(m.startswith(f"driver: pid {pid} on host") and "holder-test" in m for m in messages), messages


def test_in_process_refusal_is_exit_2(tmp_path, holder, capsys):
    workdir, pid = holder
    cfg = write_config(tmp_path / "study.yaml", small_config_dict(workdir))
    assert cli.main(["ingest", "--config", str(cfg)]) == 2
    assert f"pid {pid}" in capsys.readouterr().err


def test_a_stale_lock_of_a_dead_pid_is_taken_over_with_a_message(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid of this host that no longer runs
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                 "command": "neurotask fit", "since": time.time() - 60}))
    with collect_logs() as messages, driver_lock(workdir, "neurotask ingest") as path:
        held = json.loads(path.read_text())
    assert any("stale lock" in m and f"pid {dead.pid}" in m for m in messages), messages
    assert held["pid"] == os.getpid() and held["command"] == "neurotask ingest"


def test_the_lock_is_exclusive_in_process_and_released_after(tmp_path):
    workdir = tmp_path / "new" / "work"  # created when missing
    with driver_lock(workdir, "first"):
        # flock is per open file: a second open of the same file in this process conflicts too
        with pytest.raises(LockedError, match="first"):
            with driver_lock(workdir, "second"):
                pass
    with driver_lock(workdir, "third"):
        pass


def test_network_filesystems_are_detected(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\nserver:/export /scratch nfs4 rw 0 0\n")
    assert mount_fstype(Path("/scratch/study/work"), str(mounts)) == "nfs4"
    assert mount_fstype(Path("/scratchy"), str(mounts)) == "ext4"
    assert mount_fstype(tmp_path) is not None  # this machine's /proc/mounts


def _as_unprivileged_user(cmd: list[str]) -> list[str]:
    """``cmd`` run as an ordinary user: root writes anywhere, so as root the command runs as
    ``nobody`` (setpriv), for whom a mode-555 folder is read-only as for any user."""
    if os.geteuid() != 0:
        return cmd
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]


def test_a_read_only_workdir_is_refused_before_any_work():
    """The installed command on a workdir its user cannot write: one line, exit 2, nothing
    written (the folder lives outside root's private tmp so that `nobody` can reach it)."""
    base = Path(tempfile.mkdtemp(prefix="neurotask-ro-", dir="/tmp"))
    try:
        base.chmod(0o755)
        workdir = base / "work"
        workdir.mkdir()
        cfg = write_config(base / "study.yaml", small_config_dict(workdir))
        cfg.chmod(0o644)
        workdir.chmod(0o555)
        for command in ("simulate", "ingest", "fit"):
            run = subprocess.run(_as_unprivileged_user([*neurotask_command(), command, "--config", str(cfg)]),
                                 cwd=base, env=neurotask_env(), capture_output=True, text=True, timeout=120)
            assert run.returncode == 2, run.stdout + run.stderr
            assert "not writable" in run.stderr and str(workdir) in run.stderr, run.stderr
            assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
            assert list(workdir.iterdir()) == []
    finally:
        (base / "work").chmod(0o755)
        shutil.rmtree(base)


@pytest.mark.parametrize("error, words", [
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only filesystem"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
])
def test_an_os_error_a_user_can_fix_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch, error, words):
    import neurotask.pipeline.stages.ingest as ingest_stage

    error.filename = str(tmp_path / "work" / "store.zarr")

    def failing(cfg, overwrite=False):
        raise error

    monkeypatch.setattr(ingest_stage, "ingest", failing)
    cfg = write_config(tmp_path / "study.yaml", small_config_dict(tmp_path / "work"))
    assert cli.main(["ingest", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "store.zarr" in err and "Traceback" not in err


def test_an_unwritable_workdir_is_named_before_the_lock(tmp_path, capsys, monkeypatch):
    """(As root every directory is writable: the access check is simulated.)"""
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    cfg = write_config(tmp_path / "study.yaml", small_config_dict(tmp_path / "work"))
    assert cli.main(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"study.workdir {tmp_path / 'work'}: its parent {tmp_path} is not writable" in err
    assert not (tmp_path / "work").exists()


def test_report_does_not_take_the_lock(tmp_path, holder, capsys):
    workdir, _ = holder
    cfg = write_config(tmp_path / "study.yaml", small_config_dict(workdir))
    cli.main(["report", "--config", str(cfg)])  # nothing to report yet: any error but the lock's
    assert "in use by another neurotask driver" not in capsys.readouterr().err


def test_a_network_workdir_warns_that_hosts_may_not_see_the_lock(tmp_path, monkeypatch):
    import neurotask.storage.lock as lock

    monkeypatch.setattr(lock, "mount_fstype", lambda path: "nfs4")
    with collect_logs() as messages, driver_lock(tmp_path / "work", "neurotask fit"):
        pass
    assert any("nfs4" in m and "different hosts" in m for m in messages), messages


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    import neurotask.storage.lock as lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    ran = False
    with collect_logs() as messages, driver_lock(tmp_path / "work", "neurotask fit"):
        ran = True
    assert ran and any("does not support file locks" in m for m in messages), messages
