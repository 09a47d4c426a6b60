"""Device state checkpoints in a descriptor, so that a restarted device comes back with its state.

Whoever restarts the device keeps a file (a sealed memfd) across its lifetimes and passes it
in (backend option --checkpoint-fd). The whole file is the checkpoint area: two slots of
size // 2 bytes, A at 0 and B at size // 2, each holding one record:

    offset  size  field
    0       4     magic b"JCKP"
    4       2     checkpoint format version (1)
    6       2     reserved, 0
    8       8     generation (the writer counts up from the newest valid one it found)
    16      4     payload length (n)
    20      4     CRC-32 of generation, length and payload
    24      n     payload: the device's migration envelope (migration.wrap_state)

The writer fills the slot that does not hold the newest valid checkpoint, payload first and
header last: a device killed at any instant leaves a slot that fails its CRC (or still holds
its older record) next to the newest checkpoint, intact. The reader takes the valid slot with
the highest generation. A slot whose header is all zero was never completed and counts as
empty, so a fresh (all-zero) area holds no checkpoint yet.

Sans-I/O: decode_slot/decode_area/encode_header work on bytes; CheckpointArea writes into any
writable buffer, which CheckpointArea.open makes a shared mapping of the descriptor, so that a
checkpoint costs a memory copy and no system call (a sandboxed device in steady state may
not be allowed pwrite64).
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"JCKP"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHQII")
_CRC_FIELDS = struct.Struct("<QI")
# An area too small for any device state is a mistake worth naming at once; whether a given
# device's state fits is checked against that state (CheckpointArea.check_fits).
MIN_PAYLOAD_SIZE = 256
MIN_AREA_SIZE = 2 * (HEADER.size + MIN_PAYLOAD_SIZE)
SLOT_NAMES = "AB"


class CheckpointError(Exception):
    """The checkpoint area cannot be used, or holds no valid checkpoint: the message says why."""


@dataclass(frozen=True)
class Checkpoint:
    slot: int               # 0 = A, 1 = B
    generation: int
    payload: bytes


def _check_size(size: int) -> None:
    if size < MIN_AREA_SIZE:
        raise CheckpointError(f"{size} bytes, a checkpoint area needs at least {MIN_AREA_SIZE}")


def _crc(generation: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_CRC_FIELDS.pack(generation, len(payload))))


def encode_header(generation: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION, 0, generation, len(payload), _crc(generation, payload))


def decode_slot(slot: bytes) -> tuple[int, bytes] | None:
    """(generation, payload) of one slot; None if it was never completed (header all zero)."""
    header = bytes(slot[:HEADER.size])
    if not any(header):
        return None
    if len(header) < HEADER.size:
        raise CheckpointError(f"{len(slot)} bytes, shorter than a header")
    magic, version, reserved, generation, length, crc = HEADER.unpack(header)
    if magic != MAGIC:
        raise CheckpointError(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {version}, this device reads {FORMAT_VERSION}")
    if reserved:
        raise CheckpointError(f"reserved field is {reserved:#x}, not 0")
    if length > len(slot) - HEADER.size:
        raise CheckpointError(f"payload length {length} exceeds the slot ({len(slot) - HEADER.size} bytes)")
    payload = bytes(slot[HEADER.size:HEADER.size + length])
    if _crc(generation, payload) != crc:
        raise CheckpointError(f"generation {generation} is torn or corrupt (CRC mismatch)")
    return generation, payload


def decode_area(area: bytes) -> Checkpoint | None:
    """The newest valid checkpoint; None if the area holds none yet. Raises CheckpointError
    (naming each slot's fault) if no slot is valid and not both are empty."""
    slot_size = len(area) // 2
    found, faults = [], []
    for index in (0, 1):
        try:
            record = decode_slot(area[index * slot_size:(index + 1) * slot_size])
        except CheckpointError as fault:
            faults.append(f"slot {SLOT_NAMES[index]}: {fault}")
            continue
        if record is not None:
            found.append(Checkpoint(index, *record))
    if found:
        return max(found, key=lambda checkpoint: checkpoint.generation)
    if faults:
        raise CheckpointError(f"no valid checkpoint ({'; '.join(faults)})")
    return None


class CheckpointArea:
    """One writer's view of a checkpoint area; the position of the next write lives here,
    so only one device may write an area at a time."""

    def __init__(self, buffer):
        """`buffer`: a writable buffer, the whole area (an mmap of the descriptor, or a bytearray)."""
        _check_size(len(buffer))
        self._buffer = buffer
        self.size = len(buffer)
        self.slot_size = self.size // 2
        self.capacity = self.slot_size - HEADER.size
        try:
            newest = decode_area(buffer)
        except CheckpointError:
            newest = None
        self._slot = 0 if newest is None else 1 - newest.slot     # where the next checkpoint goes
        self._generation = 0 if newest is None else newest.generation

    @classmethod
    def open(cls, fd: int) -> "CheckpointArea":
        """The area of descriptor `fd` (its whole size), mapped shared and read-write. Nobody
        may shrink the file while it is mapped (seal a memfd with F_SEAL_SHRINK): touching a
        mapping past the end of its file is SIGBUS."""
        try:
            info = os.fstat(fd)
        except OSError as error:
            raise CheckpointError(error.strerror) from None
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError("not a regular file or memfd")
        _check_size(info.st_size)
        try:
            mapping = mmap.mmap(fd, info.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as error:
            raise CheckpointError(f"cannot be mapped read-write: {error.strerror}") from None
        return cls(mapping)

    def read(self) -> Checkpoint | None:
        """decode_area of the area as it is now."""
        return decode_area(self._buffer)

    def check_fits(self, length: int) -> None:
        if length > self.capacity:
            raise CheckpointError(f"the device state takes {length} bytes, a slot of this {self.size}-byte "
                                  f"checkpoint area holds {self.capacity}")

    def write(self, payload: bytes) -> None:
        """A new checkpoint, into the slot not holding the newest one: payload first, header last."""
        self.check_fits(len(payload))
        self._generation += 1
        start = self._slot * self.slot_size + HEADER.size
        self._buffer[start:start + len(payload)] = payload
        self._buffer[start - HEADER.size:start] = encode_header(self._generation, payload)
        self._slot = 1 - self._slot
