"""Migration v2: the device state machine (digest 3) and the versioned state envelope.

The saved stream is one envelope, so a destination can refuse state that is not its
own before touching the device:

    offset  size  field
    0       4     magic b"VFUS"
    4       2     envelope format version (1)
    6       2     length of device_type in bytes (n)
    8       4     abi_version of the device that saved it
    12      8     length of the device's own state (m)
    20      n     device_type, UTF-8
    20+n    m     Device.save_state()
    20+n+m  4     CRC-32 of everything before it

PRE_COPY carries no data (the state of the devices served here is small, so all of it
is sent in STOP_COPY); its arcs exist so clients that use them work. The header is
checked as soon as it has arrived (MIG_DATA_WRITE fails on another device type or an
abi_version the device does not accept); RESUMING -> STOP checks the length and CRC,
and only then calls Device.load_state. A refused stream is discarded and the device
stays in RESUMING, untouched, ready for the whole stream again. A device that fails while loading leaves the
machine in ERROR, which DEVICE_RESET clears (back to RUNNING, device reset); a reset
also abandons RESUMING.
"""

from __future__ import annotations

import errno
import logging
import struct
import zlib
from collections import deque

from . import protocol as P
from .device import Device, DeviceError

log = logging.getLogger("vfio_user")

MAGIC = b"VFUS"
ENVELOPE_VERSION = 1
ENVELOPE_HEADER = struct.Struct("<4sHHIQ")
_CRC = struct.Struct("<I")

ERROR, STOP, RUNNING, STOP_COPY, RESUMING = (P.MIG_STATE_ERROR, P.MIG_STATE_STOP, P.MIG_STATE_RUNNING,
                                             P.MIG_STATE_STOP_COPY, P.MIG_STATE_RESUMING)
PRE_COPY = P.MIG_STATE_PRE_COPY
SUPPORTED_FLAGS = P.MIGRATION_STOP_COPY | P.MIGRATION_PRE_COPY
STATES = (STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY)
ARCS = frozenset({
    (RUNNING, STOP), (STOP_COPY, STOP), (RESUMING, STOP), (PRE_COPY, RUNNING), (STOP, RUNNING),
    (RUNNING, PRE_COPY), (STOP, STOP_COPY), (PRE_COPY, STOP_COPY), (STOP, RESUMING),
})
_NO_TRANSIT = frozenset({PRE_COPY, STOP_COPY, RESUMING})     # never an interior node of a path


def _next_hops() -> dict:
    """(current, target) -> first arc of the shortest path not passing through a saving state."""
    table = {}
    for source in STATES:
        frontier = deque([(source, None)])
        seen = {source}
        while frontier:
            node, first = frontier.popleft()
            if node != source and node in _NO_TRANSIT:
                continue
            for a, b in ARCS:
                if a == node and b not in seen:
                    seen.add(b)
                    hop = first if first is not None else b
                    table[(source, b)] = hop
                    frontier.append((b, hop))
    table.pop((STOP_COPY, PRE_COPY), None)       # explicitly illegal in the spec
    return table


NEXT_HOP = _next_hops()


def state_name(state: int) -> str:
    return P.MIG_STATE_NAMES.get(state, f"state {state}")


def wrap_state(device_type: str, abi_version: int, state: bytes) -> bytes:
    kind = device_type.encode()
    body = ENVELOPE_HEADER.pack(MAGIC, ENVELOPE_VERSION, len(kind), abi_version, len(state)) + kind + state
    return body + _CRC.pack(zlib.crc32(body))


def check_compatible(device, kind: str, abi: int) -> None:
    """Refuse state saved by another device type, or at an abi_version `device` does not accept."""
    if kind != device.device_type:
        raise DeviceError(f"state of a {kind!r} device offered to a {device.device_type!r} device")
    if not device.accepts_abi(abi):
        raise DeviceError(f"{kind} state abi_version {abi} is not accepted (device is at {device.abi_version})")


def parse_header(data: bytes) -> tuple[str, int, int] | None:
    """(device_type, abi_version, total envelope length) once enough bytes are there."""
    if len(data) < ENVELOPE_HEADER.size:
        return None
    magic, version, kind_len, abi, state_len = ENVELOPE_HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DeviceError("migration data is not a vfio-user device state (bad magic)")
    if version != ENVELOPE_VERSION:
        raise DeviceError(f"migration data uses envelope format {version}, this server reads {ENVELOPE_VERSION}")
    if len(data) < ENVELOPE_HEADER.size + kind_len:
        return None
    kind = bytes(data[ENVELOPE_HEADER.size:ENVELOPE_HEADER.size + kind_len]).decode("utf-8", "replace")
    return kind, abi, ENVELOPE_HEADER.size + kind_len + state_len + _CRC.size


def unwrap_state(data: bytes) -> tuple[str, int, bytes]:
    header = parse_header(data)
    if header is None:
        raise DeviceError(f"migration data is truncated ({len(data)} bytes)")
    kind, abi, total = header
    if len(data) != total:
        raise DeviceError(f"migration data has {len(data)} bytes, the envelope says {total}")
    (crc,) = _CRC.unpack_from(data, total - _CRC.size)
    if zlib.crc32(data[:total - _CRC.size]) != crc:
        raise DeviceError("migration data is corrupt (CRC mismatch)")
    start = ENVELOPE_HEADER.size + len(kind.encode())
    return kind, abi, bytes(data[start:total - _CRC.size])


class Migration:
    """The migration state of one device; outlives client connections like device state."""

    def __init__(self, device, on_change=None):
        self.device = device
        self.state = RUNNING
        self.on_change = on_change or (lambda: None)    # after every state change: irq gating, freezing
        self._out = bytearray()             # save stream not yet read
        self._in = bytearray()              # resume stream received so far
        self._expected = None               # total envelope length once the header is in
        self.max_state_size = getattr(device, "max_state_size", Device.max_state_size)

    @property
    def running(self) -> bool:
        return self.state in (RUNNING, PRE_COPY)

    def set_state(self, target: int) -> None:
        """Walk the arcs towards `target`; stops at the first failing arc and raises."""
        if self.state == ERROR:
            raise DeviceError("device is in migration state ERROR: DEVICE_RESET first")
        if target == self.state:
            return
        if target not in STATES:
            raise DeviceError(f"migration state {state_name(target)} cannot be requested")
        while self.state != target:
            hop = NEXT_HOP.get((self.state, target))
            if hop is None:
                raise DeviceError(f"no migration path from {state_name(self.state)} to {state_name(target)}")
            self._arc(self.state, hop)

    def _arc(self, current: int, nxt: int) -> None:
        if (current, nxt) == (RESUMING, STOP):
            self._finish_load()
        elif nxt == STOP_COPY:
            self._out += self._save()
        elif nxt == PRE_COPY:
            self._out.clear()
        elif nxt == RESUMING:
            self._in = bytearray()
            self._expected = None
        if current in (PRE_COPY, STOP_COPY) and nxt in (STOP, RUNNING):
            self._out.clear()               # the save session ends
        self.state = nxt
        self.on_change()
        log.info("migration: %s -> %s", state_name(current), state_name(nxt))

    def _save(self) -> bytes:
        device = self.device
        return wrap_state(device.device_type, device.abi_version, device.save_state())

    @property
    def frozen(self) -> bool:
        """Region writes would change state that is being saved or about to be replaced."""
        return self.state in (STOP_COPY, RESUMING)

    # --- data stream --------------------------------------------------------------------

    def read_data(self, size: int) -> bytes:
        if self.state not in (PRE_COPY, STOP_COPY):
            raise DeviceError(f"MIG_DATA_READ in migration state {state_name(self.state)}")
        chunk = bytes(self._out[:size])
        del self._out[:size]
        return chunk

    def write_data(self, data: bytes) -> None:
        if self.state != RESUMING:
            raise DeviceError(f"MIG_DATA_WRITE in migration state {state_name(self.state)}")
        self._in += data
        try:
            if self._expected is None:
                header = parse_header(self._in)
                if header is None:
                    return
                kind, abi, total = header
                self._check_compatible(kind, abi)
                limit = ENVELOPE_HEADER.size + len(kind.encode()) + self.max_state_size + _CRC.size
                if total > limit:
                    raise DeviceError(f"migration data of {total} bytes exceeds the {kind} state limit "
                                      f"({self.max_state_size} bytes)", errno.EFBIG)
                self._expected = total
            if len(self._in) > self._expected:
                raise DeviceError(f"migration data runs past the end of the envelope ({self._expected} bytes)")
        except DeviceError:
            self._discard_incoming()
            raise

    def _discard_incoming(self) -> None:
        """Forget a refused stream: the device stays in RESUMING, ready for the whole stream again."""
        self._in = bytearray()
        self._expected = None

    def _check_compatible(self, kind: str, abi: int) -> None:
        try:
            check_compatible(self.device, kind, abi)
        except DeviceError as refusal:
            log.error("migration refused, the device does not accept that state: %s", refusal)
            raise

    def _finish_load(self) -> None:
        try:
            kind, abi, state = unwrap_state(self._in)
            self._check_compatible(kind, abi)
        except DeviceError:
            self._discard_incoming()
            raise
        try:
            self.device.load_state(state, abi)
        except MemoryError:
            raise
        except Exception as exc:
            self.state = ERROR
            self.on_change()
            log.error("migration: loading %s state failed, device now in ERROR: %s", kind, exc)
            if isinstance(exc, DeviceError):
                raise
            raise DeviceError(f"loading device state failed: {exc}", errno.EIO) from None
        self._in = bytearray()

    def reset(self) -> None:
        """DEVICE_RESET leaves ERROR (spec) and RESUMING (a reset device has nothing left to
        resume into; otherwise a destination whose stream was refused could never leave it).
        The source-side states stay: the client drives those."""
        if self.state in (ERROR, RESUMING):
            log.info("migration: %s -> RUNNING (device reset)", state_name(self.state))
            self.state = RUNNING
            self._in = bytearray()
            self._expected = None
            self.on_change()
