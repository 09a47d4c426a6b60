"""What a SIGKILLed launcher leaves behind (its sandbox's cgroups, the private directories its
sockets are bound in, the socket at the caller's path) is removed by the next launcher, which
says so, and nothing still in use is touched (issue 15)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jailer.host import leftovers
from test_e2e_jailed_device import jailed, scratch  # noqa: F401  (fixtures)

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups of its own)")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_private_directories_of_dead_launchers_go_and_nothing_else(tmp_path):
    gone, alive = dead_pid(), os.getppid()
    stale = tmp_path / f".jailer-{gone}-0a1b2c"
    stale.mkdir(mode=0o700)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale / "device.sock"))
    sock.close()
    kept = {
        "a live launcher's": tmp_path / f".jailer-{alive}-0a1b2c",
        "not made by jailer (mode 0755)": tmp_path / f".jailer-{gone}-0755",
        "not a directory": tmp_path / f".jailer-{gone}-file",
        "a symlink": tmp_path / f".jailer-{gone}-link",
    }
    kept["a live launcher's"].mkdir(mode=0o700)
    kept["not made by jailer (mode 0755)"].mkdir(mode=0o755)
    kept["not a directory"].write_text("x")
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (target / "precious").write_text("x")
    kept["a symlink"].symlink_to(target)
    dirfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        removed = leftovers.sweep_private_directories(dirfd, str(tmp_path))
    finally:
        os.close(dirfd)
    assert removed == [str(stale)] and not stale.exists()
    for why, path in kept.items():
        assert os.path.lexists(path), why
    assert (target / "precious").exists()


def test_cgroups_of_dead_launchers_go_but_never_one_in_use(tmp_path):
    """(A plain directory tree stands in for a cgroup hierarchy: rmdir is what guards both.)"""
    gone, alive = dead_pid(), os.getppid()
    (tmp_path / f"device.{gone}").mkdir()
    (tmp_path / f"device.{alive}").mkdir()
    (tmp_path / f"busy.{gone}").mkdir()
    (tmp_path / f"busy.{gone}" / "cgroup.procs").write_text("1234\n")   # rmdir refuses: in use
    (tmp_path / "jailer-launchers").mkdir()
    assert leftovers.sweep_cgroups(str(tmp_path)) == [str(tmp_path / f"device.{gone}")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"device.{alive}", f"busy.{gone}",
                                                                 "jailer-launchers"])


def _cgroups(device) -> list[str]:
    for _ in range(500):
        enforced = [e for e in device.events() if e["event"] == "enforced"]
        if enforced:
            return [path.split(":", 1)[1] for path in enforced[0]["layers"]["cgroup"].values()]
        time.sleep(0.01)
    raise AssertionError(f"no enforced event: {device.errors()}")


def _wait_empty(directories, timeout=10.0):
    deadline = time.monotonic() + timeout
    for directory in directories:
        while os.path.exists(directory) and Path(directory, "cgroup.procs").read_text().strip():
            assert time.monotonic() < deadline, f"{directory} still holds processes"
            time.sleep(0.01)


@NEEDS_ROOT
def test_a_sigkilled_launcher_leaves_nothing_after_the_next_start(scratch, jailed):
    sock = str(scratch / "idio16.sock")
    first = jailed("root", scratch, "--socket-path", sock)
    first.connect(sock).close()
    left = _cgroups(first)
    first.proc.send_signal(signal.SIGKILL)          # jailer-monitor, the device's parent
    first.proc.wait()
    _wait_empty(left)
    assert all(os.path.isdir(d) for d in left) and os.path.exists(sock)     # what the issue measured
    second = jailed("root", scratch, "--socket-path", sock)
    second.connect(sock).close()                     # the stale socket at the same path was replaced
    for directory in left:
        assert not os.path.exists(directory)
        assert f"removed the cgroup {directory} that a killed launcher (pid {first.proc.pid}) left behind" \
            in second.errors()
    assert second.stop() == 0
    assert not os.path.exists(sock) and not list(scratch.glob(".jailer-*"))


@NEEDS_ROOT
def test_sigkill_at_any_moment_of_start_up_leaves_nothing_once_a_run_ends_cleanly(scratch, jailed):
    sock = str(scratch / "idio16.sock")
    killed = []
    for delay in (0.0, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.2):
        device = jailed("root", scratch, "--socket-path", sock)
        time.sleep(delay)
        device.proc.send_signal(signal.SIGKILL)
        device.proc.wait()
        killed.append(device.proc.pid)
    time.sleep(0.2)                                  # the killed sandboxes' last processes exit
    last = jailed("root", scratch, "--socket-path", sock)
    last.connect(sock).close()
    hierarchies = {os.path.dirname(d) for d in _cgroups(last)}
    assert last.stop() == 0
    names = {entry for parent in hierarchies for entry in os.listdir(parent)}
    assert not [name for name in names if name.rpartition(".")[2] in map(str, killed + [last.proc.pid])]
    assert not os.path.exists(sock) and not list(scratch.glob(".jailer-*"))
