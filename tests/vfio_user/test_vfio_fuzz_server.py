"""Hypothesis against the live server: random and mutated frames, with and without fds.

After every example the server must still answer a fresh client's VERSION, and its fd
count (/proc/PID/fd) must come back to the baseline: no exception, no hang, no leak.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfio_helpers import ServerProcess, wait_for
from devices.vfio_user import protocol as P
from devices.vfio_user.client import Client
from test_vfio_codec import VALID_REQUESTS, mutated_frames

NEGOTIATE = VALID_REQUESTS[0]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    server = ServerProcess(str(tmp_path_factory.mktemp("fuzz") / "fuzz.sock"))
    server.baseline = server.fd_count()          # listening, no client: what must remain
    yield server
    rc, log = server.stop()
    assert rc == 0, log
    assert "Traceback" not in log, log


def make_fds(kinds):
    fds = []
    for kind in kinds:
        if kind == "eventfd":
            fds.append(os.eventfd(0, os.EFD_CLOEXEC))
        elif kind == "memfd":
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            os.ftruncate(fd, 0x2000)
            fds.append(fd)
        else:
            r, w = os.pipe()
            os.close(r)
            fds.append(w)
    return fds


frames = st.one_of(mutated_frames(), st.binary(min_size=0, max_size=64), st.sampled_from(VALID_REQUESTS))
fd_kinds = st.lists(st.sampled_from(["eventfd", "memfd", "pipe"]), max_size=3)


def exchange(path: str, negotiate: bool, items) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    try:
        if negotiate:
            sock.sendall(NEGOTIATE)
        for data, kinds in items:
            fds = make_fds(kinds)
            try:
                if fds and data:
                    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                elif data:
                    sock.sendall(data)
            except OSError:
                break                       # the server already hung up on a malformed frame
            finally:
                for fd in fds:
                    os.close(fd)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:   # drain until the server closes its side
            ready, _, _ = select.select([sock], [], [], deadline - time.monotonic())
            if not ready:
                raise AssertionError("server neither answered nor closed the connection")
            try:
                chunk, _, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            except ConnectionResetError:
                break
            if not chunk:
                break
    finally:
        sock.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(negotiate=st.booleans(), items=st.lists(st.tuples(frames, fd_kinds), min_size=1, max_size=5))
def test_fuzz_live_server(live_server, negotiate, items):
    exchange(live_server.path, negotiate, items)
    with Client.connect(live_server.path, timeout=5) as client:
        assert client.server_version == (0, P.VERSION_MINOR)
    wait_for(lambda: live_server.fd_count() == live_server.baseline, timeout=5,
             what=f"fd count back to {live_server.baseline}")
    assert live_server.proc.poll() is None


def test_fuzz_dma_map_with_random_fds_then_disconnect(live_server):
    """Every fd kind a client may pass to DMA_MAP is either mapped and later closed, or closed now."""
    items = []
    for kind in ("eventfd", "memfd", "pipe"):
        payload = struct.pack("<IIQQQ", 32, 3, 0, 0x100000 * (1 + len(items)), 0x1000)
        items.append((P.HEADER.pack(len(items) + 1, P.DMA_MAP, 48, 0, 0) + payload, [kind]))
    exchange(live_server.path, True, items)
    wait_for(lambda: live_server.fd_count() == live_server.baseline, what="all DMA fds released")
