"""The backend program conventions, run as real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from vfio_helpers import REPO, TESTDEVICE, ServerProcess, wait_for
from devices.vfio_user.client import Client


def run(*args, **kwargs):
    return subprocess.run([sys.executable, TESTDEVICE, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=20, **kwargs)


def test_print_capabilities():
    result = run("--print-capabilities")
    assert result.returncode == 0
    caps = json.loads(result.stdout)
    assert caps["type"] == "test-device"
    assert {"socket-path", "fd", "migration", "reconnect"} <= set(caps["features"])


def test_usage_errors_are_one_line_exit_2(tmp_path):
    both = run("--socket-path", str(tmp_path / "s"), "--fd", "3")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    neither = run()
    assert neither.returncode == 2
    assert neither.stderr.strip().count("\n") == 0 and "--socket-path" in neither.stderr
    not_socket = run("--fd", "0", stdin=subprocess.DEVNULL)
    assert not_socket.returncode == 2 and "not a socket" in not_socket.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero_and_removes_socket(start_server, signum):
    server = start_server()
    with Client.connect(server.path) as client:
        assert client.device_info().num_regions == 9
        server.proc.send_signal(signum)
        assert server.proc.wait(10) == 0
    assert not os.path.exists(server.path)


def test_stale_socket_is_replaced(tmp_path, start_server):
    path = tmp_path / "dev.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    stale_inode = os.stat(path).st_ino
    server = start_server()
    wait_for(lambda: os.stat(path).st_ino != stale_inode, what="the new socket published")
    with Client.connect(server.path) as client:
        assert client.device_info().num_irqs == 5


def test_refuses_to_replace_a_regular_file(tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    result = run("--socket-path", str(path))
    assert result.returncode == 1 and "is not a socket" in result.stderr
    assert path.read_text() == "precious"


def test_fd_listening_socket(tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "inherited.sock"))
    listener.listen(1)
    server = ServerProcess("", "--fd", str(listener.fileno()), pass_fds=(listener.fileno(),))
    try:
        for _ in range(2):              # a listening fd serves client after client
            with Client.connect(str(tmp_path / "inherited.sock")) as client:
                assert client.region_read(7, 0, 2) == b"\x36\x1b"
    finally:
        listener.close()
        rc, _ = server.stop()
    assert rc == 0


def test_fd_connected_socket_served_until_disconnect():
    ours, theirs = socket.socketpair()
    server = ServerProcess("", "--fd", str(theirs.fileno()), pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        client = Client(ours)
        client.negotiate()
        client.region_write(0, 0, b"conn")
        assert client.region_read(0, 0, 4) == b"conn"
        client.close()
        assert server.proc.wait(10) == 0        # nobody else can connect: the program ends
    finally:
        server.stop()


def test_socket_activation(tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "activated.sock"))
    listener.listen(1)
    fd = listener.fileno()
    command = f'LISTEN_PID=$$ LISTEN_FDS=1 exec "{sys.executable}" "{TESTDEVICE}"'
    proc = subprocess.Popen(["sh", "-c", command], cwd=REPO, pass_fds=(3,), preexec_fn=lambda: os.dup2(fd, 3),
                            stderr=subprocess.PIPE, text=True)
    try:
        with Client.connect(str(tmp_path / "activated.sock")) as client:
            assert client.device_info().num_regions == 9
    finally:
        listener.close()
        proc.terminate()
        rc = proc.wait(10)
        assert rc == 0, proc.stderr.read()


def test_server_keeps_listening_while_a_client_is_connected(server):
    """A second client waits in the backlog and is served once the first leaves."""
    first = Client.connect(server.path)
    second_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    second_sock.connect(server.path)
    first.close()
    second = Client(second_sock)
    second.negotiate()
    assert second.device_info().num_regions == 9
    second.close()
    wait_for(lambda: server.proc.poll() is None, what="server still running")
