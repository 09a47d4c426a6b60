"""The IDIO-16 control socket and its CLI, over real UNIX sockets and a real event loop."""

import base64
import json
import selectors
import socket
import subprocess
import sys
import time

import pytest

from devices.gpio_pci_idio16 import Idio16
from devices.gpio_pci_idio16.control import MAX_LINE, ControlServer, execute, open_listener
from devices.vfio_user.device import BAR2, DeviceError
from test_pci import RecordingHost


class Loop:
    """The add_reader/remove_reader part of an event loop, pumped by the test itself."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()

    def add_reader(self, fd, callback):
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd):
        self.selector.unregister(fd)

    def pump(self, timeout=0.05):
        for key, _ in self.selector.select(timeout=timeout):
            key.data()

    def run_until(self, done, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "timed out"
            self.pump()


@pytest.fixture
def rig(tmp_path):
    device = Idio16()
    device.attach(RecordingHost())
    loop = Loop()
    listener, remove = open_listener(str(tmp_path / "control.sock"))
    server = ControlServer(device, listener, loop)
    yield device, loop, server, str(tmp_path / "control.sock")
    server.close()
    remove()
    loop.selector.close()


class Client:
    def __init__(self, loop, path):
        self.loop = loop
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.received = b""
        loop.pump(timeout=0)            # let the device accept before the backlog fills

    def _pump(self):
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return False
        if not chunk:
            self.closed = True
        self.received += chunk
        return True

    def replies(self, count):
        self.closed = False
        self.loop.run_until(lambda: self._pump() and (self.received.count(b"\n") >= count or self.closed))
        lines = self.received.split(b"\n")
        self.received = b"\n".join(lines[count:])
        return [json.loads(line) for line in lines[:count]]

    def ask(self, request):
        self.sock.sendall(request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n")
        return self.replies(1)[0]


def test_query_and_set_inputs_raise_the_interrupt(rig):
    device, loop, _, path = rig
    client = Client(loop, path)
    status = client.ask({"cmd": "query-status"})["return"]
    assert status == {"outputs": 0, "inputs": 0, "irq_enabled": False, "filters": False,
                      "status": 0, "intx": False, "pci_command": 0}
    device.region_read(BAR2, 0x2, 1)                    # guest enables the IRQ
    assert client.ask({"cmd": "set-inputs", "value": 0xBEEF, "id": 7}) == {"return": {}, "id": 7}
    assert device.host.asserted and device.inputs == 0xBEEF
    assert client.ask({"cmd": "set-input", "line": 0, "value": False}) == {"return": {}}
    assert client.ask({"cmd": "set-input", "line": 15, "value": 0})["return"] == {}
    assert client.ask({"cmd": "get-inputs"}) == {"return": {"inputs": 0x3EEE}}
    status = client.ask({"cmd": "query-status"})["return"]
    assert status["intx"] and status["status"] == 0x7 and status["irq_enabled"]


def test_get_outputs_sees_guest_writes(rig):
    device, loop, _, path = rig
    device.region_write(BAR2, 0x0, b"\x01")
    device.region_write(BAR2, 0x4, b"\x80")
    assert Client(loop, path).ask({"cmd": "get-outputs"}) == {"return": {"outputs": 0x8001}}


def test_save_and_load_state(rig):
    device, loop, _, path = rig
    client = Client(loop, path)
    device.region_write(BAR2, 0x0, b"\x42")
    saved = client.ask({"cmd": "save-state"})["return"]
    assert saved["device_type"] == "gpio-pci-idio-16" and saved["abi_version"] == 1
    assert base64.b64decode(saved["data"]) == device.save_state()
    device.region_write(BAR2, 0x0, b"\x00")
    assert client.ask({"cmd": "load-state", **saved}) == {"return": {}}
    assert device.outputs == 0x42
    assert client.ask({"cmd": "load-state", "data": saved["data"]}) == {"return": {}}


@pytest.mark.parametrize("request_line, error_class, words", [
    (b"{not json\n", "GenericError", "malformed JSON"),
    (b"\xff\xfe\n", "GenericError", "malformed JSON"),
    (b"[1, 2]\n", "GenericError", "JSON object"),
    (b"[" * 50000 + b"\n", "GenericError", "malformed JSON"),
    (b'{"cmd": "set-inputs", "value": ' + b"9" * 5000 + b"}\n", "GenericError", "malformed JSON"),
    (b'{"value": 1}\n', "GenericError", "'cmd'"),
    (b'{"cmd": "launch-missiles"}\n', "CommandNotFound", "launch-missiles"),
    (b'{"cmd": "set-inputs"}\n', "GenericError", "'value' is missing"),
    (b'{"cmd": "set-inputs", "value": 65536}\n', "GenericError", "0..65535"),
    (b'{"cmd": "set-inputs", "value": true}\n', "GenericError", "integer"),
    (b'{"cmd": "set-inputs", "value": "0xBEEF"}\n', "GenericError", "integer"),
    (b'{"cmd": "set-inputs", "value": 1, "force": 1}\n', "GenericError", "'force' is unexpected"),
    (b'{"cmd": "set-input", "line": 16, "value": 1}\n', "GenericError", "'line'"),
    (b'{"cmd": "set-input", "line": 1, "value": 2}\n', "GenericError", "'value'"),
    (b'{"cmd": "load-state", "data": "!!"}\n', "GenericError", "base64"),
    (b'{"cmd": "load-state", "data": 5}\n', "GenericError", "base64"),
    (b'{"cmd": "load-state", "data": "AAAA"}\n', "GenericError", "refusing"),
    (b'{"cmd": "load-state", "data": "", "device_type": "nvme"}\n', "GenericError", "nvme"),
    (b'{"cmd": "load-state", "data": "", "abi_version": 9}\n', "GenericError", "ABI version 9"),
])
def test_bad_requests_get_errors_and_the_connection_survives(rig, request_line, error_class, words):
    _, loop, _, path = rig
    client = Client(loop, path)
    reply = client.ask(request_line)
    assert reply["error"]["class"] == error_class and words in reply["error"]["desc"]
    assert "return" in client.ask({"cmd": "query-status"})


def test_partial_lines_pipelining_and_many_clients(rig):
    device, loop, server, path = rig
    clients = [Client(loop, path) for _ in range(10)]
    first = clients[0]
    first.sock.sendall(b'{"cmd": "set-in')
    loop.run_until(lambda: len(server.clients) == 10)
    first.sock.sendall(b'puts", "value": 5}\r\n\n  \n{"cmd": "get-inputs"}\n{"cmd": "query-commands"}\n')
    replies = first.replies(3)
    assert replies[0] == {"return": {}} and replies[1] == {"return": {"inputs": 5}}
    assert "load-state" in replies[2]["return"]["commands"]
    for client in clients[1:]:
        assert client.ask({"cmd": "get-inputs"}) == {"return": {"inputs": 5}}
    for client in clients:
        client.sock.close()
    loop.run_until(lambda: not server.clients)


def test_overlong_line_closes_only_that_client(rig):
    _, loop, server, path = rig
    hog, polite = Client(loop, path), Client(loop, path)
    hog.sock.setblocking(True)
    hog.sock.sendall(b"x" * (MAX_LINE + 10))
    hog.sock.setblocking(False)
    reply = hog.replies(1)[0]
    assert "longer than" in reply["error"]["desc"]
    hog.replies(0)
    assert hog.closed
    assert polite.ask({"cmd": "get-outputs"}) == {"return": {"outputs": 0}}


def test_client_that_never_reads_is_dropped_not_waited_for(rig):
    _, loop, server, path = rig
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.connect(path)
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.setblocking(False)
    request = b'{"cmd": "query-commands"}\n' * 200
    loop.run_until(lambda: len(server.clients) == 1)
    deadline = time.monotonic() + 5
    while server.clients:
        assert time.monotonic() < deadline, "the deaf client was never dropped"
        try:
            deaf.send(request)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass
        loop.pump(timeout=0.01)
    deaf.close()
    assert Client(loop, path).ask({"cmd": "get-outputs"})["return"] == {"outputs": 0}


def test_execute_never_raises_for_state_errors():
    device = Idio16()
    assert execute(device, b'{"cmd": "load-state", "data": ""}')["error"]["class"] == "GenericError"


def test_open_listener_refuses_what_it_cannot_serve(tmp_path):
    with pytest.raises(DeviceError, match="not a listening"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
            open_listener(fd=unbound.fileno())
    with pytest.raises(DeviceError, match="control socket"):
        open_listener(str(tmp_path / "missing-dir" / "c.sock"))
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(stale))
    sock, remove = open_listener(str(stale))
    sock.close()
    remove()
    assert not stale.exists()


def run_ctl(loop, path, *args):
    """Run the CLI as a separate process while the test pumps the device's loop."""
    process = subprocess.Popen([sys.executable, "-m", "devices.gpio_pci_idio16.ctl", "--control-socket", path,
                                *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    loop.run_until(lambda: process.poll() is not None, timeout=20)
    stdout, stderr = process.communicate()
    return process.returncode, stdout, stderr


def test_cli(rig, tmp_path):
    device, loop, _, path = rig
    assert run_ctl(loop, path, "set-inputs", "0xBEEF")[0] == 0
    assert device.inputs == 0xBEEF
    assert run_ctl(loop, path, "set-input", "0", "0")[0] == 0
    assert run_ctl(loop, path, "get-inputs")[1] == "0xbeee\n"
    device.region_write(BAR2, 0x4, b"\x12")
    assert run_ctl(loop, path, "get-outputs")[1] == "0x1200\n"
    code, stdout, _ = run_ctl(loop, path, "query-status")
    assert code == 0 and json.loads(stdout)["inputs"] == 0xBEEE
    state_file = tmp_path / "state.json"
    assert run_ctl(loop, path, "save-state", str(state_file))[0] == 0
    device.region_write(BAR2, 0x4, b"\x00")
    assert run_ctl(loop, path, "load-state", str(state_file))[0] == 0
    assert device.outputs == 0x1200
    code, _, stderr = run_ctl(loop, path, "set-inputs", "0x10000")
    assert code == 1 and stderr.startswith("error: ") and "Traceback" not in stderr
    state_file.write_text("[]")
    assert run_ctl(loop, path, "load-state", str(state_file))[0] == 1
    assert run_ctl(loop, path, "set-input", "1", "7")[0] == 2
    code, _, stderr = run_ctl(loop, str(tmp_path / "nobody.sock"), "get-outputs")
    assert code == 1 and stderr.count("\n") == 1


def test_overlong_socket_path_is_one_clear_error(tmp_path):
    with pytest.raises(DeviceError, match="too long"):
        open_listener(str(tmp_path / ("x" * 120)))
