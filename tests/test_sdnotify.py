"""sd_notify and socket activation against real sockets and a real child process."""

import os
import socket
import subprocess
import sys
import uuid

import pytest

from jailer.errors import JailerError, UsageError
from jailer.sdnotify import listen_fds, notify, socket_activated_listener


def receive(sock):
    sock.settimeout(5)
    return sock.recv(4096).decode()


def test_notify_to_a_path_socket(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        assert notify("READY=1\nMAINPID=4242", environ={"NOTIFY_SOCKET": path}) is True
        assert receive(manager) == "READY=1\nMAINPID=4242"


def test_notify_to_an_abstract_socket():
    name = f"jailer-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name)
        assert notify("STATUS=device listening", environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert receive(manager) == "STATUS=device listening"


def test_notify_without_a_manager_does_nothing():
    assert notify("READY=1", environ={}) is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False


def test_notify_reads_the_process_environment(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        notify("READY=1")
        assert receive(manager) == "READY=1"


def test_notify_errors_are_one_actionable_line(tmp_path):
    with pytest.raises(JailerError, match="cannot notify the service manager at .*/gone"):
        notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with pytest.raises(JailerError, match="neither an absolute path nor an abstract"):
        notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:999"})


# A child started the way systemd starts a socket-activated service: the listener at fd 3,
# LISTEN_PID set to the child's own pid (bash's $$ survives exec), LISTEN_FDS/FDNAMES.
CHILD = r"""
import os, socket, sys
from jailer.errors import JailerError
from jailer.sdnotify import socket_activated_listener
try:
    fd = socket_activated_listener(sys.argv[1])
except JailerError as exc:
    print("error:", exc)
    raise SystemExit(0)
print("fd", fd, "inheritable", os.get_inheritable(fd), flush=True)
if fd is not None:
    conn, _ = socket.socket(fileno=fd).accept()
    conn.sendall(b"accepted")
"""


def run_activated(socks, env, wanted="vfio-user", connect_to=None):
    """Start CHILD with `socks` at fds 3, 4, ...; return its first line and what a client got."""
    redirects = " ".join(f'{3 + i}<&"${3 + i}"' for i in range(len(socks)))
    shell = f'LISTEN_PID=$$ exec "$0" -c "$1" "$2" {redirects}'
    fds = [str(s.fileno()) for s in socks]
    child = subprocess.Popen(
        ["bash", "-c", shell, sys.executable, CHILD, wanted, *fds],
        pass_fds=[s.fileno() for s in socks], stdout=subprocess.PIPE, text=True,
        env={**os.environ, **env, "PYTHONPATH": os.getcwd()})
    try:
        first = child.stdout.readline().strip()
        reply = None
        if connect_to and first.startswith("fd "):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(5)
                client.connect(connect_to)
                reply = client.recv(64)
        child.wait(timeout=10)
    finally:
        child.kill()
        child.wait()
    return first, reply


@pytest.fixture
def listener(tmp_path):
    path = str(tmp_path / "vfio-user.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    yield sock, path
    sock.close()


def test_activated_listener_is_taken_and_accepts(listener):
    sock, path = listener
    first, reply = run_activated([sock], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "vfio-user"}, connect_to=path)
    assert first == "fd 3 inheritable False"
    assert reply == b"accepted"


def test_single_fd_is_taken_whatever_its_name(listener):
    env = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "jailer-idio16.socket"}
    first, reply = run_activated([listener[0]], env, connect_to=listener[1])
    assert (first, reply) == ("fd 3 inheritable False", b"accepted")


def test_listener_is_chosen_by_name_among_several(listener, tmp_path):
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(tmp_path / "other.sock"))
    other.listen(1)
    with other:
        env = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "control:vfio-user"}
        first, reply = run_activated([other, listener[0]], env, connect_to=listener[1])
        assert (first, reply) == ("fd 4 inheritable False", b"accepted")
        first, _ = run_activated([other, listener[0]], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"})
    assert first == ("error: systemd passed a (fd 3), b (fd 4) but none is named 'vfio-user'; "
                     "set FileDescriptorName=vfio-user in the .socket unit")


def test_missing_fd_is_refused(listener):
    first, _ = run_activated([listener[0]], {"LISTEN_FDS": "2"})
    assert first == "error: LISTEN_FDS=2 but fd 4 is not open"


def test_non_listening_socket_is_refused():
    a, b = socket.socketpair()
    with a, b:
        first, _ = run_activated([a], {"LISTEN_FDS": "1"})
    assert first.startswith("error: socket-activated fd 3 for 'vfio-user' is not a listening AF_UNIX stream")


def test_variables_for_another_process_are_ignored():
    assert listen_fds({"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}) == []
    assert socket_activated_listener("vfio-user", {}) is None
    with pytest.raises(UsageError, match="LISTEN_FDS='x' is not a number"):
        listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"})
