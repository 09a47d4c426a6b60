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
from test_e2e_jailed_device import IS_ROOT, JAILER, NOBODY, jailed, scratch  # noqa: F401  (fixtures)

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
    assert _running_with(sock, within=2.0) == []     # zero-exec's preloader too: it exits once it has imported
    last = jailed("root", scratch, "--socket-path", sock)
    last.connect(sock).close()
    hierarchies = {os.path.dirname(d) for d in _cgroups(last)}
    assert last.stop() == 0
    names = {entry for parent in hierarchies for entry in os.listdir(parent)}
    assert not [name for name in names if name.rpartition(".")[2] in map(str, killed + [last.proc.pid])]
    assert not os.path.exists(sock) and not list(scratch.glob(".jailer-*"))


def _running_with(text: str, within: float) -> list[int]:
    """Pids of live processes whose command line holds `text`, once none does or `within` s passed."""
    deadline = time.monotonic() + within
    while True:
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                with open(f"/proc/{entry}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if text.encode() in cmdline and state != b"Z" and int(entry) != os.getpid():
                found.append(int(entry))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# --- sockets at paths no later run uses: the launchers' records, `jailer clean` ---------

def _kill(device):
    """SIGKILL jailer-monitor (the device's parent) and reap it: a zombie still holds its pid."""
    device.connect(device.socket).close()
    device.proc.send_signal(signal.SIGKILL)
    device.proc.wait()


def _clean(invocation, *options, env=None):
    command, base = JAILER.command(invocation)
    return subprocess.run([*command, "clean", *options], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", **base, **(env or {})}, cwd="/")


def _start(jailed, invocation, scratch, name, env=None):
    sock, pidfile = str(scratch / f"{name}.sock"), str(scratch / f"{name}.pid")
    device = jailed(invocation, scratch, "--socket-path", sock, "--pidfile", pidfile, extra_env=env)
    device.socket, device.pidfile = sock, pidfile
    device.connect(sock).close()
    return device


@NEEDS_ROOT
def test_the_next_run_removes_what_a_killed_launcher_made_at_paths_it_does_not_use(scratch, jailed):
    first = _start(jailed, "root", scratch, "first")
    left = _cgroups(first)
    _kill(first)
    _wait_empty(left)
    assert os.path.exists(first.socket) and os.path.exists(first.pidfile)
    second = _start(jailed, "root", scratch, "second")      # another path, the same user
    for path in (first.socket, first.pidfile):
        assert not os.path.exists(path)
        assert f"removed {path}, which a killed launcher (pid {first.proc.pid}) left behind" in second.errors()
    assert second.stop() == 0
    assert not os.path.exists(second.socket) and not os.path.exists(f"/var/lib/jailer/launchers/{second.proc.pid}")


@NEEDS_ROOT
def test_jailer_clean_removes_only_what_a_killed_launcher_made(scratch, jailed):
    killed, replaced, running = (_start(jailed, "root", scratch, name) for name in ("killed", "replaced", "running"))
    left = _cgroups(killed)
    for device in (killed, replaced):
        _kill(device)
    _wait_empty(left)
    os.unlink(replaced.socket)                      # someone made a socket at that path since: theirs
    theirs = socket.socket(socket.AF_UNIX)
    theirs.bind(replaced.socket)

    dry = _clean("root", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {killed.socket}, which a killed launcher (pid {killed.proc.pid}) left behind" \
        in dry.stdout.splitlines()
    assert os.path.exists(killed.socket) and all(os.path.isdir(d) for d in left)

    done = _clean("root")
    assert done.returncode == 0 and done.stderr == ""
    said = done.stdout.splitlines()
    for path in (killed.socket, killed.pidfile, *left, replaced.pidfile):
        assert not os.path.exists(path)
        assert any(line.startswith(f"removed {path}, ") for line in said), (path, said)
    assert os.path.exists(replaced.socket) and not any(replaced.socket in line for line in said)
    for device in (killed, replaced):
        assert not os.path.exists(f"/var/lib/jailer/launchers/{device.proc.pid}")
    # the running launcher's sockets, pid file and record are untouched, and it still serves
    assert os.path.exists(running.pidfile) and os.path.exists(f"/var/lib/jailer/launchers/{running.proc.pid}")
    running.connect(running.socket).close()
    assert running.stop() == 0
    theirs.close()


def test_an_unprivileged_users_record_and_clean_up_live_in_their_state_directory(scratch, jailed):
    state = scratch / "state-of-the-user"
    state.mkdir()
    if IS_ROOT:
        os.chown(state, NOBODY, NOBODY)
    env = {"XDG_STATE_HOME": str(state)}
    device = _start(jailed, "user", scratch, "user-killed", env=env)
    record = state / "jailer" / "launchers" / str(device.proc.pid)
    deadline = time.monotonic() + 10
    while not record.exists():
        assert time.monotonic() < deadline, device.errors()
        time.sleep(0.01)
    assert record.stat().st_mode & 0o777 == 0o600
    _kill(device)
    done = _clean("user", env=env)
    assert done.returncode == 0, done.stderr
    assert f"removed {device.socket}, which a killed launcher (pid {device.proc.pid}) left behind" \
        in done.stdout.splitlines()
    assert not os.path.exists(device.socket) and not os.path.exists(device.pidfile) and not record.exists()
    again = _clean("user", env=env)
    assert again.stdout == f"nothing left behind by a killed launcher ({state}/jailer/launchers)\n"
