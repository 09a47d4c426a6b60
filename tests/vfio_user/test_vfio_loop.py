"""The Server's loop API that device programs use: readers, timers, stop."""

from __future__ import annotations

import os
import socket
import time

from devices.vfio_user.server import Server
from vfio_testdevice import TestDevice


def listening_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "loop.sock"))
    sock.listen(1)
    return sock


def test_readers_timers_and_stop(tmp_path):
    sock = listening_socket(tmp_path)
    server = Server(TestDevice(), sock)
    r, w = os.pipe()
    events = []

    def on_pipe():
        events.append(("pipe", os.read(r, 10)))
        server.remove_reader(r)
        server.call_later(0.01, lambda: (events.append(("timer", None)), server.stop()))

    cancelled = server.call_later(0.0, lambda: events.append(("cancelled", None)))
    cancelled.cancel()
    server.add_reader(r, on_pipe)
    server.call_later(0.02, lambda: os.write(w, b"ping"))
    server.call_later(0.005, lambda: 1 / 0)              # a failing callback is logged, not fatal
    start = time.monotonic()
    server.serve_forever()
    assert events == [("pipe", b"ping"), ("timer", None)]
    assert time.monotonic() - start < 2
    server.close()
    sock.close()
    os.close(r)
    os.close(w)


def test_stop_from_another_place_wakes_the_loop(tmp_path):
    sock = listening_socket(tmp_path)
    server = Server(TestDevice(), sock)
    server.call_later(0.05, server.stop)
    server.serve_forever()                                # returns: the eventfd woke epoll
    server.close()
    sock.close()
