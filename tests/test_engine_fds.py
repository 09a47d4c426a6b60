"""The fd manifest: renumbering, type checks, created fds, --socket-path and LISTEN_* variables."""

import os
import socket
import time

import pytest

from engine_sandbox import INVOCATIONS, plan_for, readable_tempdir, run
from jailer.plan import FdSpec

LIST_FDS = "ls /proc/self/fd | sort -n | tr '\\n' ' '; echo; echo $LISTEN_FDS $LISTEN_PID $LISTEN_FDNAMES"


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_given_fd_is_renumbered_and_everything_else_closed(invocation):
    ours, theirs = socket.socketpair()
    stray_r, stray_w = os.pipe()   # open in the caller, not in the manifest: must not reach the program
    try:
        plan = plan_for(invocation, f"echo hello >&3; {LIST_FDS}",
                        fds=(FdSpec("control", "unix-stream", 3),))
        result = run(plan, "--fd", f"control={theirs.fileno()}", invocation=invocation,
                     pass_fds=[theirs.fileno(), stray_w])
        assert result.returncode == 0, result.stderr
        assert ours.recv(100) == b"hello\n"
        fd_line, listen_line = result.stdout.splitlines()
        # 0-2, fd 3, and the descriptor ls opens to read the directory
        assert fd_line.split()[:4] == ["0", "1", "2", "3"] and len(fd_line.split()) == 5
        assert listen_line.split() == ["1", "2", "control"]   # LISTEN_PID: the program is pid 2
    finally:
        for fd in (stray_r, stray_w):
            os.close(fd)
        ours.close()
        theirs.close()


def test_fd_of_the_wrong_kind_is_refused():
    read_end, write_end = os.pipe()
    try:
        plan = plan_for("root", "true", fds=(FdSpec("control", "unix-stream", 3),))
        result = run(plan, "--fd", f"control={write_end}", pass_fds=[write_end])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"jailer: fd {write_end} given for 'control' is a pipe; the profile expects "
                                     "a connected AF_UNIX stream socket")


def test_missing_required_fd_is_refused_with_the_option_to_use():
    plan = plan_for("root", "true", fds=(FdSpec("vfio", "unix-listener", 3),))
    result = run(plan)
    assert result.returncode == 2
    assert "pass it with --fd N or --socket-path PATH" in result.stderr


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_created_memfd_eventfd_and_placeholders(invocation):
    fds = (FdSpec("shm", "memfd", 3, size=8192), FdSpec("irq", "eventfd", 4))
    script = ('echo "$0 $1"; stat -L -c %s /proc/self/fd/3; readlink /proc/self/fd/4; echo $LISTEN_FDNAMES')
    plan = plan_for(invocation, script, fds=fds)
    plan = plan.__class__(**{**plan.__dict__, "program": plan.program.__class__(
        argv=("sh", "-c", script, "{fd:shm}", "--irq={fd:irq}"), executable="/bin/sh")})
    result = run(plan, invocation=invocation)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["3 --irq=4", "8192", "anon_inode:[eventfd]", "shm:irq"]


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_socket_path_listener_is_passed_and_removed_afterwards(invocation):
    directory = readable_tempdir()
    os.chown(directory, 65534, 65534)
    path = os.path.join(directory, "dev.sock")
    with open(path, "w"):
        pass
    plan = plan_for(invocation, "true", fds=(FdSpec("vfio", "unix-listener", 3),))
    refused = run(plan, "--socket-path", path, invocation=invocation)
    assert refused.returncode == 2 and "exists and is not a socket" in refused.stderr
    os.unlink(path)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()   # a stale socket file: replaced
    accept_once = ("exec python3 -c \"import socket; s = socket.socket(fileno=3); c, _ = s.accept(); "
                   "c.sendall(b'hi from the sandbox')\"")
    popen = run(plan_for(invocation, accept_once, fds=(FdSpec("vfio", "unix-listener", 3),)),
                "--socket-path", path, invocation=invocation, wait=False)
    try:
        client = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < deadline
                time.sleep(0.02)
        client.settimeout(10)
        assert os.stat(path).st_uid == 65534   # as root: given to the sandbox's uid; as nobody: its own
        assert client.recv(100) == b"hi from the sandbox"
        client.close()
        assert popen.wait(timeout=10) == 0, popen.stderr.read()
    finally:
        popen.kill()
        popen.wait()
    assert not os.path.exists(path)


def test_plain_fd_is_the_profiles_unix_listener():
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("")   # autobind: an abstract address
    listener.listen(1)
    try:
        plan = plan_for("root", "readlink /proc/self/fd/5", fds=(FdSpec("vfio", "unix-listener", 5),))
        result = run(plan, "--fd", str(listener.fileno()), pass_fds=[listener.fileno()])
    finally:
        listener.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("socket:[")


def test_file_fds_are_opened_with_their_mode_and_a_given_one_is_checked():
    directory = readable_tempdir()
    log = os.path.join(directory, "device.log")
    plan = plan_for("root", "echo logged >&3; cat <&4", fds=(FdSpec("log", "file", 3, path=log, mode="w"),
                                                             FdSpec("config", "file", 4, mode="r")))
    with open(os.path.join(directory, "config"), "w+") as config:
        config.write("from the caller\n")
        config.seek(0)
        result = run(plan, "--fd", f"config={config.fileno()}", pass_fds=[config.fileno()])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from the caller\n"
    assert open(log).read() == "logged\n"
    with open(os.path.join(directory, "config"), "a") as write_only:
        refused = run(plan, "--fd", f"config={write_only.fileno()}", pass_fds=[write_only.fileno()])
    assert refused.returncode == 2
    assert "is a regular file opened w; the profile expects a regular file opened r" in refused.stderr
