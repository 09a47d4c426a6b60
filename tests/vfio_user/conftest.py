"""Fixtures: the test device as a real server process on a real socket."""

from __future__ import annotations

import pytest

from vfio_helpers import ServerProcess


@pytest.fixture
def start_server(tmp_path):
    servers = []

    def start(*args, name: str = "dev.sock", **kwargs) -> ServerProcess:
        server = ServerProcess(str(tmp_path / name) if name else "", *args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server) -> ServerProcess:
    return start_server()


@pytest.fixture
def client(server):
    from devices.vfio_user.client import Client

    with Client.connect(server.path) as c:
        yield c
