"""The IDIO-16 device under a fuzzing client stays flat, keeps its fds and keeps serving;
when it cannot serve any more it exits with one line instead of living on (crash-only).

A short version of benchmarks/soak.py against the jailed device, the device pushed past
its data limit, and the bounds that keep a session's memory from outliving it.
"""

from __future__ import annotations

import gc
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import soak  # noqa: E402

from devices.gpio_pci_idio16.device import Idio16  # noqa: E402
from devices.vfio_user import codec  # noqa: E402
from devices.vfio_user import protocol as P  # noqa: E402
from devices.vfio_user.client import Client  # noqa: E402
from devices.vfio_user.codec import FramingError  # noqa: E402
from devices.vfio_user.connection import RECV_BUFFER_SIZE, FrameReader  # noqa: E402
from devices.vfio_user.server import Server  # noqa: E402


def test_jailed_device_soak_is_flat_and_always_answers():
    result = soak.soak("jailer", messages=5000, connections=500, samples=5, warmup=0.2, seed=7, report=lambda line: None)
    curve = "\n".join(str(point) for point in result["curve"])
    assert result["connections"] >= 500 and result["messages"] >= 5000, result
    assert result["answered_all"] and result["alive"], f"{result['failures']}\n{curve}"
    assert result["fds_leaked"] == 0, curve
    assert result["flat"], f"VmData +{result['data_growth_kb']} KiB, RSS +{result['rss_growth_kb']} KiB\n{curve}"
    assert result["memory_errors"] == 0 and result["tracebacks"] == 0


def test_out_of_memory_exits_with_one_line_and_no_traceback(tmp_path):
    """The data limit lowered to what the device uses once it serves: a 1 MiB message (within
    what it negotiated) cannot be buffered, and the device must exit, not linger."""
    path = str(tmp_path / "idio16.sock")
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "devices.gpio_pci_idio16", "--socket-path", path],
                                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(path):
                assert proc.poll() is None and time.monotonic() < deadline, "device did not start"
                time.sleep(0.01)
            with Client.connect(path) as client:
                assert client.region_read(7, 0, 2) == b"\x4f\x49"
            in_use = soak.usage(proc.pid)["data_kb"] * 1024
            resource.prlimit(proc.pid, resource.RLIMIT_DATA, (in_use + (256 << 10), resource.RLIM_INFINITY))
            count = P.MAX_DATA_XFER_SIZE
            frame = codec.encode_message(1, P.REGION_WRITE, 0, P.REGION_ACCESS.pack(0, 2, count) + bytes(count))
            with Client.connect(path) as client:
                try:
                    client.sock.sendall(frame)
                except OSError:
                    pass                        # it may die before reading it all
                code = proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr.seek(0)
        errors = stderr.read()
    assert code != 0, errors
    assert "Traceback" not in errors, errors
    lines = errors.splitlines()
    assert lines[-1] == ("gpio-pci-idio-16: out of memory, cannot serve any more "
                         "(the process reached its memory limit)"), errors
    assert not any("MemoryError" in line for line in lines[:-1]), errors


def test_closed_sessions_are_freed_without_the_garbage_collector(tmp_path):
    """A session held in a reference cycle lives until a full collection, which the
    interpreter runs rarely: with its receive buffer, hundreds of them piled up."""
    path = str(tmp_path / "dev.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    server = Server(Idio16(), listener)
    sessions = []
    start_session = server._start_session

    def remember(conn):
        start_session(conn)
        sessions.append(weakref.ref(server.session))
    server._start_session = remember
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    gc.disable()
    try:
        loop.start()
        for _ in range(5):
            with Client.connect(path) as client:
                client.region_read(7, 0, 4)
                with pytest.raises(Exception):
                    client.request(P.DEVICE_GET_INFO, b"short")
        with Client.connect(path) as client:            # by now the previous five have ended
            client.region_read(7, 0, 4)
            alive = [ref() is not None for ref in sessions[:5]]
    finally:
        gc.enable()
        server.stop()
        loop.join(5)
        server.close()
        listener.close()
    assert alive == [False] * 5


def test_a_large_frame_gets_a_buffer_of_its_own_released_once_consumed():
    reader = FrameReader()
    small = reader.buf
    count = 200_000
    message = codec.encode_message(3, P.REGION_WRITE, 0, P.REGION_ACCESS.pack(0, 2, count) + bytes(count))
    reader.feed(message[:RECV_BUFFER_SIZE])
    assert reader.next_frame() is None                  # header seen: room made for the whole frame
    assert len(reader.buf) == len(message)
    reader.feed(message[RECV_BUFFER_SIZE:])
    frame = reader.next_frame()
    assert frame.msg_id == 3 and len(frame.payload) == len(message) - P.HEADER_SIZE
    reader.recv_views()
    assert reader.buf is small


def test_fds_waiting_for_their_frame_are_bounded():
    reader = FrameReader(max_fds=P.MAX_MSG_FDS)
    head = codec.encode_message(1, P.DEVICE_SET_IRQS, 0, bytes(64))[:20]
    fds = [os.eventfd(0) for _ in range(P.MAX_MSG_FDS + 1)]
    reader.feed(head, fds[:P.MAX_MSG_FDS])              # one message's worth: kept for its frame
    with pytest.raises(FramingError):
        reader.feed(b"\0", fds[P.MAX_MSG_FDS:])         # more before the frame is complete
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)                                # all closed by the reader
