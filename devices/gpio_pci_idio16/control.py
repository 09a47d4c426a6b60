"""The IDIO-16 control socket: the host drives the input lines and reads the output lines.

Protocol (QMP-like): an AF_UNIX stream socket; the client sends one JSON object per line
(UTF-8, terminated by "\\n"), the device answers each with one JSON object per line, in order.
There is no greeting. A request is

    {"cmd": NAME, ...arguments..., "id": ANY}      ("id" is optional and echoed back)

and the reply is either {"return": {...}} or
{"error": {"class": "GenericError" | "CommandNotFound", "desc": "human-readable reason"}}
(plus "id" when the request had one). Commands:

    query-status              -> {"outputs": N, "inputs": N, "irq_enabled": B, "filters": B,
                                  "status": N, "intx": B, "pci_command": N}
                                 status: interrupt status register (bit 2 pending, bits 0/1
                                 inputs 0-7 / 8-15 changed); intx: the INTx line level now
    get-outputs               -> {"outputs": N}        bit i = output line OUT<i> (0..15)
    get-inputs                -> {"inputs": N}         bit i = input line IIN<i> (0..15)
    set-inputs  value=N       -> {}    all 16 input lines at once (0..65535)
    set-input   line=L value=V-> {}    one input line (L 0..15, V 0/1/false/true)
    save-state                -> {"device_type": "gpio-pci-idio-16", "abi_version": 1,
                                  "data": BASE64}      the device's versioned state blob
    load-state  data=BASE64 [device_type=S] [abi_version=N] -> {}   restore such a blob
    query-commands            -> {"commands": [NAME, ...]}

Changing inputs while the guest has the interrupt enabled raises the card's change-of-state
interrupt, exactly as a real input transition would. Numbers are JSON integers. Unknown
arguments are errors. Malformed JSON or a bad request gets an error reply and the connection
stays open; a line longer than 64 KiB gets an error reply and the connection is closed, as is
a client that does not read its replies (the device never blocks on a client). Any number of
clients may be connected at once; each is served from the device's single event loop.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Callable

from devices.gpio_pci_idio16.device import LINES, Idio16
from devices.vfio_user.device import DeviceError
from devices.vfio_user.transport import unix_listener

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
MAX_CLIENTS = 64
_RECV_SIZE = 16 * 1024


class ControlError(Exception):
    """A request the control socket refuses; becomes an {"error": ...} reply."""

    def __init__(self, desc: str, error_class: str = "GenericError"):
        super().__init__(desc)
        self.error_class = error_class


def _integer(args: dict, name: str, low: int, high: int) -> int:
    if name not in args:
        raise ControlError(f"parameter '{name}' is missing")
    value = args[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ControlError(f"parameter '{name}' must be an integer in {low}..{high}, not {value!r}")
    return value


def _level(args: dict) -> bool:
    value = args.get("value")
    if not isinstance(value, int) or value not in (0, 1):
        raise ControlError(f"parameter 'value' must be 0, 1, false or true, not {value!r}")
    return bool(value)


@dataclass
class _Command:
    handler: Callable[[Idio16, dict], dict]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


def _set_inputs(device: Idio16, args: dict) -> dict:
    device.set_inputs(_integer(args, "value", 0, (1 << LINES) - 1))
    return {}


def _set_input(device: Idio16, args: dict) -> dict:
    device.set_input(_integer(args, "line", 0, LINES - 1), _level(args))
    return {}


def _save_state(device: Idio16, args: dict) -> dict:
    return {"device_type": device.device_type, "abi_version": device.abi_version,
            "data": base64.b64encode(device.save_state()).decode("ascii")}


def _load_state(device: Idio16, args: dict) -> dict:
    if args.get("device_type", device.device_type) != device.device_type:
        raise ControlError(f"state is for device type {args['device_type']!r}, this is {device.device_type!r}")
    abi_version = _integer(args, "abi_version", 0, 0xFFFF) if "abi_version" in args else device.abi_version
    if not isinstance(args["data"], str):
        raise ControlError("parameter 'data' must be a base64 string")
    try:
        data = base64.b64decode(args["data"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise ControlError(f"parameter 'data' is not base64: {error}") from None
    device.load_state(data, abi_version)
    return {}


COMMANDS: dict[str, _Command] = {
    "query-status": _Command(lambda device, args: device.describe()),
    "get-outputs": _Command(lambda device, args: {"outputs": device.outputs}),
    "get-inputs": _Command(lambda device, args: {"inputs": device.inputs}),
    "set-inputs": _Command(_set_inputs, ("value",)),
    "set-input": _Command(_set_input, ("line", "value")),
    "save-state": _Command(_save_state),
    "load-state": _Command(_load_state, ("data",), ("device_type", "abi_version")),
    "query-commands": _Command(lambda device, args: {"commands": sorted(COMMANDS)}),
}


def execute(device: Idio16, line: bytes) -> dict:
    """One request line -> one reply object (never raises for a bad request)."""
    request_id = None
    try:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as error:     # bad UTF-8/JSON, 5000-digit numbers, deep nesting
            raise ControlError(f"malformed JSON: {error}") from None
        if not isinstance(request, dict):
            raise ControlError("a request must be a JSON object")
        request_id = request.pop("id", None)
        name = request.pop("cmd", None)
        if not isinstance(name, str):
            raise ControlError("a request needs a string 'cmd'")
        command = COMMANDS.get(name)
        if command is None:
            raise ControlError(f"the command {name} has not been found", "CommandNotFound")
        for argument in request:
            if argument not in command.required + command.optional:
                raise ControlError(f"parameter '{argument}' is unexpected for {name}")
        for argument in command.required:
            if argument not in request:
                raise ControlError(f"parameter '{argument}' is missing for {name}")
        reply = {"return": command.handler(device, request)}
    except (ControlError, DeviceError) as error:
        error_class = error.error_class if isinstance(error, ControlError) else "GenericError"
        reply = {"error": {"class": error_class, "desc": str(error)}}
    if request_id is not None:
        reply["id"] = request_id
    return reply


@dataclass
class _Client:
    sock: socket.socket
    pending: bytearray = field(default_factory=bytearray)


class ControlServer:
    """Serves the control socket from the device's event loop (anything with add_reader/remove_reader).

    `after_request` runs after each request, before its reply: the backend saves a checkpoint
    there, since set-inputs and load-state change the device state."""

    def __init__(self, device: Idio16, listener: socket.socket, loop,
                 after_request: Callable[[], None] | None = None):
        self.device = device
        self.listener = listener
        self.loop = loop
        self.after_request = after_request or (lambda: None)
        self.clients: dict[int, _Client] = {}
        self._accepting = True
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), self._accept)

    def close(self) -> None:
        if self._accepting:
            self.loop.remove_reader(self.listener.fileno())
        self._accepting = True              # so that dropping clients does not re-arm the listener
        for fd in list(self.clients):
            self._drop(fd)
        self.listener.close()

    def _accept(self) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:            # e.g. EMFILE: pause accepting until a client leaves
                log.warning("control socket: accept failed: %s", error)
                self.loop.remove_reader(self.listener.fileno())
                self._accepting = False
                return
            if len(self.clients) >= MAX_CLIENTS:
                log.warning("control socket: refusing a client beyond %d", MAX_CLIENTS)
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock)
            self.clients[sock.fileno()] = client
            self.loop.add_reader(sock.fileno(), lambda fd=sock.fileno(): self._readable(fd))

    def _readable(self, fd: int) -> None:
        client = self.clients.get(fd)
        if client is None:
            return
        try:
            data = client.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            log.info("control client: %s", error)
            data = b""
        if not data:
            self._drop(fd)
            return
        client.pending += data
        while fd in self.clients and b"\n" in client.pending:
            line, _, rest = bytes(client.pending).partition(b"\n")
            client.pending[:] = rest
            if len(line) > MAX_LINE:
                self._overlong(fd)
            elif line.strip():
                reply = execute(self.device, line)
                self.after_request()
                self._send(fd, reply)
        if fd in self.clients and len(client.pending) > MAX_LINE:
            self._overlong(fd)

    def _overlong(self, fd: int) -> None:
        self._send(fd, {"error": {"class": "GenericError",
                                  "desc": f"request line longer than {MAX_LINE} bytes; closing"}})
        self._drop(fd)

    def _send(self, fd: int, reply: dict) -> None:
        if fd not in self.clients:
            return
        data = json.dumps(reply).encode() + b"\n"
        try:
            sent = self.clients[fd].sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            log.info("control client: %s", error)
            self._drop(fd)
            return
        if sent != len(data):
            log.warning("control client does not read its replies; disconnecting it")
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        client = self.clients.pop(fd)
        self.loop.remove_reader(fd)
        try:
            client.sock.close()
        except InterruptedError:
            pass   # a signal interrupted close(2): on Linux the descriptor is released all the same
        if not self._accepting:
            self._accepting = True
            self.loop.add_reader(self.listener.fileno(), self._accept)


def open_listener(path: str | None = None, fd: int | None = None) -> tuple[socket.socket, Callable[[], None]]:
    """The control socket from --control-socket PATH or an inherited --control-fd; returns it and
    a cleanup that removes the socket file we created."""
    if fd is not None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as error:
            raise DeviceError(f"--control-fd {fd}: {error.strerror or error}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM \
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise DeviceError(f"--control-fd {fd} is not a listening AF_UNIX stream socket")
        return sock, lambda: None
    if path is None:
        raise DeviceError("a control socket needs a path or an fd")
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)                         # stale socket of an earlier run
    except FileNotFoundError:
        pass
    try:
        sock = unix_listener(path, 8)
    except OSError as error:
        raise DeviceError(f"control socket {path}: {error.strerror or error}") from None
    identity = os.stat(path)

    def remove() -> None:
        try:
            now = os.stat(path)
            if (now.st_dev, now.st_ino) == (identity.st_dev, identity.st_ino):
                os.unlink(path)
        except FileNotFoundError:
            pass
    return sock, remove
