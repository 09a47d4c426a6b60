"""Encode and decode every vfio-user message; pure functions, no I/O.

Decoding validates what a message can say about itself: header size and type bits, each
command's fixed size, argsz, flag bits, counts against payload length and the number of
fds that came with it. Anything wrong raises DecodeError carrying the errno an error
reply should use; nothing else escapes a decoder (the fuzz tests hold it to that).
Semantic checks that need device knowledge (region index in range, ...) belong to the
server.
"""

from __future__ import annotations

import errno
import json
import struct
from dataclasses import dataclass, field

from . import protocol as P


class DecodeError(Exception):
    """A message that cannot be accepted; `errno` is what the error reply carries."""

    def __init__(self, message: str, err: int = errno.EINVAL):
        super().__init__(message)
        self.errno = err


class FramingError(DecodeError):
    """The byte stream itself is broken (bad size or type): the connection must close."""


# --- messages -------------------------------------------------------------------------

@dataclass(slots=True)
class Version:
    major: int
    minor: int
    capabilities: dict = field(default_factory=dict)


@dataclass(slots=True)
class DmaMap:
    flags: int
    offset: int
    iova: int
    size: int
    argsz: int = P.DMA_MAP_STRUCT.size


@dataclass(slots=True)
class DmaUnmap:
    flags: int
    iova: int
    size: int
    argsz: int = P.DMA_UNMAP_STRUCT.size


@dataclass(slots=True)
class DeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int
    argsz: int = P.DEVICE_INFO.size


@dataclass(slots=True)
class RegionInfoRequest:
    index: int
    argsz: int = P.REGION_INFO.size


@dataclass(slots=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int = 0
    sparse_areas: tuple = ()            # ((offset, size), ...) from CAP_SPARSE_MMAP
    region_type: tuple | None = None    # (type, subtype) from CAP_TYPE
    argsz: int = 0                      # on decode: what the server said it needs
    cap_offset: int = 0


@dataclass(slots=True)
class RegionIoFdsRequest:
    index: int
    flags: int = 0
    count: int = 0
    argsz: int = P.REGION_IO_FDS.size


@dataclass(slots=True)
class RegionIoFds:
    index: int
    entries: tuple = ()                 # raw IO_FD_ENTRY tuples
    argsz: int = P.REGION_IO_FDS.size
    flags: int = 0


@dataclass(slots=True)
class IrqInfoRequest:
    index: int
    argsz: int = P.IRQ_INFO.size


@dataclass(slots=True)
class IrqInfo:
    index: int
    flags: int
    count: int
    argsz: int = P.IRQ_INFO.size


@dataclass(slots=True)
class SetIrqs:
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""                   # DATA_BOOL: one byte per vector
    argsz: int = 0

    @property
    def data_type(self) -> int:
        return self.flags & P.IRQ_DATA_MASK

    @property
    def action(self) -> int:
        return self.flags & P.IRQ_ACTION_MASK_BITS


@dataclass(slots=True)
class RegionAccess:
    region: int
    offset: int
    count: int
    data: bytes = b""


@dataclass(slots=True)
class WriteMulti:
    entries: tuple                      # ((region, offset, data), ...)


@dataclass(slots=True)
class DmaAccess:
    iova: int
    count: int
    data: bytes = b""


@dataclass(slots=True)
class Feature:
    flags: int
    data: bytes = b""
    argsz: int = 0

    @property
    def feature(self) -> int:
        return self.flags & P.FEATURE_MASK


@dataclass(slots=True)
class MigData:
    size: int
    data: bytes = b""
    argsz: int = 0


@dataclass(slots=True)
class Empty:
    """DEVICE_RESET, and replies without a payload."""


# --- framing ---------------------------------------------------------------------------

def encode_message(msg_id: int, cmd: int, flags: int, payload: bytes = b"", error: int = 0) -> bytes:
    return P.HEADER.pack(msg_id, cmd, P.HEADER_SIZE + len(payload), flags, error) + payload


def encode_error_reply(msg_id: int, cmd: int, err: int) -> bytes:
    return P.HEADER.pack(msg_id, cmd, P.HEADER_SIZE, P.REPLY_ERROR_FLAGS, err)


def check_header(msg_id: int, cmd: int, size: int, flags: int, max_size: int = P.MAX_MESSAGE_SIZE) -> None:
    """Framing checks: failures mean the stream cannot be trusted any further."""
    if size < P.HEADER_SIZE:
        raise FramingError(f"message size {size} is smaller than the 16-byte header")
    if size > max_size:
        raise FramingError(f"message size {size} exceeds the limit of {max_size} bytes")
    if flags & P.FLAG_TYPE_MASK not in (P.TYPE_COMMAND, P.TYPE_REPLY):
        raise FramingError(f"message type {flags & P.FLAG_TYPE_MASK} is neither command nor reply")


def decode_frame(buf: bytes, nfds: int = 0):
    """(msg_id, cmd, flags, error, message) of one whole frame; for fuzzing and tools."""
    if len(buf) < P.HEADER_SIZE:
        raise FramingError(f"frame of {len(buf)} bytes is shorter than a header")
    msg_id, cmd, size, flags, err = P.HEADER.unpack_from(buf)
    check_header(msg_id, cmd, size, flags)
    if size != len(buf):
        raise FramingError(f"header says {size} bytes, frame has {len(buf)}")
    payload = bytes(buf[P.HEADER_SIZE:])
    if flags & P.FLAG_TYPE_MASK == P.TYPE_REPLY:
        if flags & P.FLAG_ERROR:
            return msg_id, cmd, flags, err, Empty()
        return msg_id, cmd, flags, err, decode_reply(cmd, payload, nfds)
    return msg_id, cmd, flags, err, decode_request(cmd, payload, nfds)


# --- helpers ---------------------------------------------------------------------------

def _need(payload, size: int, what: str, exact: bool = False) -> None:
    if len(payload) < size or (exact and len(payload) != size):
        rel = "exactly" if exact else "at least"
        raise DecodeError(f"{what}: payload is {len(payload)} bytes, expected {rel} {size}")


def _no_fds(nfds: int, what: str) -> None:
    if nfds:
        raise DecodeError(f"{what} carries {nfds} unexpected file descriptor(s)")


def _argsz_at_least(argsz: int, size: int, what: str) -> None:
    if argsz < size:
        raise DecodeError(f"{what}: argsz {argsz} is smaller than {size}")


# --- VERSION ---------------------------------------------------------------------------

def encode_version(msg: Version) -> bytes:
    text = json.dumps({"capabilities": msg.capabilities}, separators=(",", ":")) if msg.capabilities else "{}"
    return P.VERSION_HDR.pack(msg.major, msg.minor) + text.encode() + b"\0"


def decode_version(payload, nfds: int = 0) -> Version:
    _no_fds(nfds, "VERSION")
    _need(payload, P.VERSION_HDR.size, "VERSION")
    major, minor = P.VERSION_HDR.unpack_from(payload)
    text = bytes(payload[P.VERSION_HDR.size:])
    if not text:
        return Version(major, minor, {})
    if not text.endswith(b"\0") or b"\0" in text[:-1]:
        raise DecodeError("VERSION capabilities must be one NUL-terminated JSON string")
    try:
        doc = json.loads(text[:-1].decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(f"VERSION capabilities are not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DecodeError("VERSION capabilities JSON must be an object")
    caps = doc.get("capabilities", {})
    if not isinstance(caps, dict):
        raise DecodeError("VERSION 'capabilities' must be an object")
    for key in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"):
        if key in caps and (type(caps[key]) is not int or caps[key] < 0):
            raise DecodeError(f"VERSION capability {key} must be a non-negative integer")
    if caps.get("max_msg_fds", 0) > P.MAX_CLIENT_MSG_FDS:
        raise DecodeError(f"VERSION max_msg_fds {caps['max_msg_fds']} exceeds {P.MAX_CLIENT_MSG_FDS}")
    if "write_multiple" in caps and not isinstance(caps["write_multiple"], bool):
        raise DecodeError("VERSION capability write_multiple must be a boolean")
    for key in ("twin_socket", "migration"):
        if key in caps and not isinstance(caps[key], dict):
            raise DecodeError(f"VERSION capability {key} must be an object")
    return Version(major, minor, caps)


# --- DMA_MAP / DMA_UNMAP ---------------------------------------------------------------

def encode_dma_map(msg: DmaMap) -> bytes:
    return P.DMA_MAP_STRUCT.pack(msg.argsz, msg.flags, msg.offset, msg.iova, msg.size)


def decode_dma_map(payload, nfds: int = 0) -> DmaMap:
    _need(payload, P.DMA_MAP_STRUCT.size, "DMA_MAP", exact=True)
    argsz, flags, offset, iova, size = P.DMA_MAP_STRUCT.unpack_from(payload)
    if argsz != P.DMA_MAP_STRUCT.size:
        raise DecodeError(f"DMA_MAP: argsz {argsz} must be {P.DMA_MAP_STRUCT.size}")
    if flags & ~P.DMA_MAP_FLAGS_KNOWN:
        raise DecodeError(f"DMA_MAP: unknown flags {flags:#x}")
    if nfds > 1:
        raise DecodeError(f"DMA_MAP carries {nfds} fds, at most 1 is allowed")
    if size == 0 or iova + size > 1 << 64:
        raise DecodeError(f"DMA_MAP: bad range iova {iova:#x} size {size:#x}")
    if nfds == 0 and offset:
        raise DecodeError("DMA_MAP: an offset without a file descriptor")
    return DmaMap(flags, offset, iova, size, argsz)


def encode_dma_unmap(msg: DmaUnmap) -> bytes:
    return P.DMA_UNMAP_STRUCT.pack(msg.argsz, msg.flags, msg.iova, msg.size)


def decode_dma_unmap(payload, nfds: int = 0) -> DmaUnmap:
    _no_fds(nfds, "DMA_UNMAP")
    _need(payload, P.DMA_UNMAP_STRUCT.size, "DMA_UNMAP")
    argsz, flags, iova, size = P.DMA_UNMAP_STRUCT.unpack_from(payload)
    if flags & P.DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
        raise DecodeError("DMA_UNMAP: GET_DIRTY_BITMAP belongs to the removed migration v1; "
                          "use DEVICE_FEATURE DMA_LOGGING_REPORT", errno.ENOTSUP)
    if flags & ~P.DMA_UNMAP_FLAGS_KNOWN:
        raise DecodeError(f"DMA_UNMAP: unknown flags {flags:#x}")
    if len(payload) != P.DMA_UNMAP_STRUCT.size:
        raise DecodeError(f"DMA_UNMAP: payload is {len(payload)} bytes, expected {P.DMA_UNMAP_STRUCT.size}")
    _argsz_at_least(argsz, P.DMA_UNMAP_STRUCT.size, "DMA_UNMAP")
    if flags & P.DMA_UNMAP_FLAG_ALL:
        if iova or size:
            raise DecodeError("DMA_UNMAP: UNMAP_ALL requires address and size 0")
    elif size == 0 or iova + size > 1 << 64:
        raise DecodeError(f"DMA_UNMAP: bad range iova {iova:#x} size {size:#x}")
    return DmaUnmap(flags, iova, size, argsz)


# --- DEVICE_GET_INFO -------------------------------------------------------------------

def encode_device_info(msg: DeviceInfo) -> bytes:
    return P.DEVICE_INFO.pack(msg.argsz, msg.flags, msg.num_regions, msg.num_irqs)


def decode_device_info_request(payload, nfds: int = 0) -> int:
    """Returns the argsz the client can accept."""
    _no_fds(nfds, "DEVICE_GET_INFO")
    _need(payload, P.DEVICE_INFO.size, "DEVICE_GET_INFO", exact=True)
    argsz = P.DEVICE_INFO.unpack_from(payload)[0]
    _argsz_at_least(argsz, P.DEVICE_INFO.size, "DEVICE_GET_INFO")
    return argsz


def decode_device_info(payload, nfds: int = 0) -> DeviceInfo:
    _no_fds(nfds, "DEVICE_GET_INFO reply")
    _need(payload, P.DEVICE_INFO.size, "DEVICE_GET_INFO reply", exact=True)
    argsz, flags, num_regions, num_irqs = P.DEVICE_INFO.unpack_from(payload)
    return DeviceInfo(flags, num_regions, num_irqs, argsz)


# --- DEVICE_GET_REGION_INFO ------------------------------------------------------------

def encode_region_info_request(msg: RegionInfoRequest) -> bytes:
    return P.REGION_INFO.pack(msg.argsz, 0, msg.index, 0, 0, 0)


def decode_region_info_request(payload, nfds: int = 0) -> RegionInfoRequest:
    _no_fds(nfds, "DEVICE_GET_REGION_INFO")
    _need(payload, P.REGION_INFO.size, "DEVICE_GET_REGION_INFO", exact=True)
    argsz, _flags, index, _cap, _size, _offset = P.REGION_INFO.unpack_from(payload)
    _argsz_at_least(argsz, P.REGION_INFO.size, "DEVICE_GET_REGION_INFO")
    return RegionInfoRequest(index, argsz)


def encode_region_info(msg: RegionInfo, client_argsz: int) -> tuple[bytes, bool]:
    """The reply payload and whether it is complete (caps included, the fd may go along).

    If the caps do not fit the client's argsz, only the fixed part goes out, with the
    argsz needed and without the CAPS flag, so the client retries with a bigger buffer.
    """
    caps = b""
    if msg.sparse_areas:
        caps += P.CAP_SPARSE_MMAP_HDR.pack(P.CAP_SPARSE_MMAP, 1, 0, len(msg.sparse_areas), 0)
        caps += b"".join(P.SPARSE_AREA.pack(off, size) for off, size in msg.sparse_areas)
    if msg.region_type is not None:
        if caps:   # chain: the sparse cap's `next` points at the type cap
            caps = caps[:4] + struct.pack("<I", P.REGION_INFO.size + len(caps)) + caps[8:]
        caps += P.CAP_TYPE_STRUCT.pack(P.CAP_TYPE, 1, 0, *msg.region_type)
    full = P.REGION_INFO.size + len(caps)
    flags = msg.flags & ~P.REGION_FLAG_CAPS
    if caps and client_argsz >= full:
        return P.REGION_INFO.pack(full, flags | P.REGION_FLAG_CAPS, msg.index, P.REGION_INFO.size,
                                  msg.size, msg.offset) + caps, True
    return P.REGION_INFO.pack(full, flags, msg.index, 0, msg.size, msg.offset), not caps


def decode_region_info(payload, nfds: int = 0) -> RegionInfo:
    _need(payload, P.REGION_INFO.size, "DEVICE_GET_REGION_INFO reply")
    argsz, flags, index, cap_offset, size, offset = P.REGION_INFO.unpack_from(payload)
    if nfds > 1:
        raise DecodeError(f"DEVICE_GET_REGION_INFO reply carries {nfds} fds, at most 1 is allowed")
    info = RegionInfo(index, flags, size, offset, argsz=argsz, cap_offset=cap_offset)
    if not flags & P.REGION_FLAG_CAPS:
        return info
    seen = 0
    pos = cap_offset
    while pos:
        if pos < P.REGION_INFO.size or pos + P.CAP_HEADER.size > len(payload) or seen >= 16:
            raise DecodeError(f"DEVICE_GET_REGION_INFO reply: capability offset {pos} out of bounds")
        cap_id, _version, nxt = P.CAP_HEADER.unpack_from(payload, pos)
        if cap_id == P.CAP_SPARSE_MMAP:
            _need(payload, pos + P.CAP_SPARSE_MMAP_HDR.size, "sparse mmap capability")
            nr_areas = P.CAP_SPARSE_MMAP_HDR.unpack_from(payload, pos)[3]
            start = pos + P.CAP_SPARSE_MMAP_HDR.size
            _need(payload, start + nr_areas * P.SPARSE_AREA.size, "sparse mmap areas")
            info.sparse_areas = tuple(P.SPARSE_AREA.unpack_from(payload, start + i * P.SPARSE_AREA.size)
                                      for i in range(nr_areas))
        elif cap_id == P.CAP_TYPE:
            _need(payload, pos + P.CAP_TYPE_STRUCT.size, "region type capability")
            info.region_type = P.CAP_TYPE_STRUCT.unpack_from(payload, pos)[3:5]
        pos = nxt
        seen += 1
    return info


# --- DEVICE_GET_REGION_IO_FDS ----------------------------------------------------------

def encode_region_io_fds_request(msg: RegionIoFdsRequest) -> bytes:
    return P.REGION_IO_FDS.pack(msg.argsz, msg.flags, msg.index, msg.count)


def decode_region_io_fds_request(payload, nfds: int = 0) -> RegionIoFdsRequest:
    _no_fds(nfds, "DEVICE_GET_REGION_IO_FDS")
    _need(payload, P.REGION_IO_FDS.size, "DEVICE_GET_REGION_IO_FDS", exact=True)
    argsz, flags, index, count = P.REGION_IO_FDS.unpack_from(payload)
    _argsz_at_least(argsz, P.REGION_IO_FDS.size, "DEVICE_GET_REGION_IO_FDS")
    if flags or count:
        raise DecodeError("DEVICE_GET_REGION_IO_FDS: flags and count must be 0 in a request")
    return RegionIoFdsRequest(index, flags, count, argsz)


def encode_region_io_fds(msg: RegionIoFds) -> bytes:
    body = b"".join(P.IO_FD_ENTRY.pack(*e) for e in msg.entries)
    return P.REGION_IO_FDS.pack(P.REGION_IO_FDS.size + len(body), msg.flags, msg.index, len(msg.entries)) + body


def decode_region_io_fds(payload, nfds: int = 0) -> RegionIoFds:
    _need(payload, P.REGION_IO_FDS.size, "DEVICE_GET_REGION_IO_FDS reply")
    argsz, flags, index, count = P.REGION_IO_FDS.unpack_from(payload)
    _need(payload, P.REGION_IO_FDS.size + count * P.IO_FD_ENTRY.size, "DEVICE_GET_REGION_IO_FDS entries")
    entries = tuple(P.IO_FD_ENTRY.unpack_from(payload, P.REGION_IO_FDS.size + i * P.IO_FD_ENTRY.size)
                    for i in range(count))
    if any(e[2] >= nfds for e in entries):
        raise DecodeError("DEVICE_GET_REGION_IO_FDS reply: fd_index beyond the fds received")
    return RegionIoFds(index, entries, argsz, flags)


# --- DEVICE_GET_IRQ_INFO / DEVICE_SET_IRQS ---------------------------------------------

def encode_irq_info(msg: IrqInfo) -> bytes:
    return P.IRQ_INFO.pack(msg.argsz, msg.flags, msg.index, msg.count)


def encode_irq_info_request(msg: IrqInfoRequest) -> bytes:
    return P.IRQ_INFO.pack(msg.argsz, 0, msg.index, 0)


def decode_irq_info_request(payload, nfds: int = 0) -> IrqInfoRequest:
    _no_fds(nfds, "DEVICE_GET_IRQ_INFO")
    _need(payload, P.IRQ_INFO.size, "DEVICE_GET_IRQ_INFO", exact=True)
    argsz, _flags, index, _count = P.IRQ_INFO.unpack_from(payload)
    _argsz_at_least(argsz, P.IRQ_INFO.size, "DEVICE_GET_IRQ_INFO")
    return IrqInfoRequest(index, argsz)


def decode_irq_info(payload, nfds: int = 0) -> IrqInfo:
    _no_fds(nfds, "DEVICE_GET_IRQ_INFO reply")
    _need(payload, P.IRQ_INFO.size, "DEVICE_GET_IRQ_INFO reply", exact=True)
    argsz, flags, index, count = P.IRQ_INFO.unpack_from(payload)
    return IrqInfo(index, flags, count, argsz)


def encode_set_irqs(msg: SetIrqs) -> bytes:
    argsz = msg.argsz or P.IRQ_SET.size + len(msg.data)
    return P.IRQ_SET.pack(argsz, msg.flags, msg.index, msg.start, msg.count) + msg.data


def decode_set_irqs(payload, nfds: int = 0) -> SetIrqs:
    _need(payload, P.IRQ_SET.size, "DEVICE_SET_IRQS")
    argsz, flags, index, start, count = P.IRQ_SET.unpack_from(payload)
    data = bytes(payload[P.IRQ_SET.size:])
    data_type = flags & P.IRQ_DATA_MASK
    action = flags & P.IRQ_ACTION_MASK_BITS
    if flags & ~(P.IRQ_DATA_MASK | P.IRQ_ACTION_MASK_BITS):
        raise DecodeError(f"DEVICE_SET_IRQS: unknown flags {flags:#x}")
    if data_type not in (P.IRQ_DATA_NONE, P.IRQ_DATA_BOOL, P.IRQ_DATA_EVENTFD):
        raise DecodeError(f"DEVICE_SET_IRQS: flags {flags:#x} must carry exactly one DATA bit")
    if action not in (P.IRQ_ACTION_MASK, P.IRQ_ACTION_UNMASK, P.IRQ_ACTION_TRIGGER):
        raise DecodeError(f"DEVICE_SET_IRQS: flags {flags:#x} must carry exactly one ACTION bit")
    if start + count > 0xFFFFFFFF:
        raise DecodeError("DEVICE_SET_IRQS: start + count overflows")
    if data_type == P.IRQ_DATA_BOOL:
        if len(data) != count:
            raise DecodeError(f"DEVICE_SET_IRQS: DATA_BOOL needs {count} bytes, got {len(data)}")
    elif data:
        raise DecodeError(f"DEVICE_SET_IRQS: {len(data)} unexpected data bytes")
    if argsz != len(payload):
        raise DecodeError(f"DEVICE_SET_IRQS: argsz {argsz} differs from the request size {len(payload)}")
    if data_type == P.IRQ_DATA_EVENTFD:
        if nfds not in (0, count):
            raise DecodeError(f"DEVICE_SET_IRQS: {nfds} fds for {count} vectors (0 de-assigns)")
    elif nfds:
        raise DecodeError("DEVICE_SET_IRQS: file descriptors without DATA_EVENTFD")
    if count == 0 and (flags != P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER or start != 0):
        raise DecodeError("DEVICE_SET_IRQS: count 0 only with DATA_NONE|ACTION_TRIGGER and start 0")
    return SetIrqs(flags, index, start, count, data, argsz)


# --- REGION_READ / REGION_WRITE / REGION_WRITE_MULTI ----------------------------------

def encode_region_access(msg: RegionAccess) -> bytes:
    return P.REGION_ACCESS.pack(msg.offset, msg.region, msg.count) + msg.data


def _decode_access(payload, nfds, what, with_data: bool, limit: int) -> RegionAccess:
    _no_fds(nfds, what)
    _need(payload, P.REGION_ACCESS.size, what)
    offset, region, count = P.REGION_ACCESS.unpack_from(payload)
    if count > limit:
        raise DecodeError(f"{what}: count {count} exceeds max_data_xfer_size {limit}")
    expected = P.REGION_ACCESS.size + (count if with_data else 0)
    if len(payload) != expected:
        raise DecodeError(f"{what}: payload is {len(payload)} bytes, count {count} needs {expected}")
    data = bytes(payload[P.REGION_ACCESS.size:]) if with_data else b""
    return RegionAccess(region, offset, count, data)


def decode_region_read(payload, nfds: int = 0, limit: int = P.MAX_DATA_XFER_SIZE) -> RegionAccess:
    return _decode_access(payload, nfds, "REGION_READ", False, limit)


def decode_region_write(payload, nfds: int = 0, limit: int = P.MAX_DATA_XFER_SIZE) -> RegionAccess:
    return _decode_access(payload, nfds, "REGION_WRITE", True, limit)


def decode_region_read_reply(payload, nfds: int = 0) -> RegionAccess:
    return _decode_access(payload, nfds, "REGION_READ reply", True, 1 << 32)


def decode_region_write_reply(payload, nfds: int = 0) -> RegionAccess:
    return _decode_access(payload, nfds, "REGION_WRITE reply", False, 1 << 32)


def encode_write_multi(msg: WriteMulti) -> bytes:
    parts = [P.WRITE_MULTI_COUNT.pack(len(msg.entries))]
    parts += [P.WRITE_MULTI_ENTRY.pack(off, region, len(data), data) for region, off, data in msg.entries]
    return b"".join(parts)


def decode_write_multi(payload, nfds: int = 0) -> WriteMulti:
    _no_fds(nfds, "REGION_WRITE_MULTI")
    _need(payload, P.WRITE_MULTI_COUNT.size, "REGION_WRITE_MULTI")
    (wr_cnt,) = P.WRITE_MULTI_COUNT.unpack_from(payload)
    if not 1 <= wr_cnt <= P.WRITE_MULTI_MAX_ENTRIES:
        raise DecodeError(f"REGION_WRITE_MULTI: {wr_cnt} entries, allowed 1..{P.WRITE_MULTI_MAX_ENTRIES}")
    _need(payload, P.WRITE_MULTI_COUNT.size + wr_cnt * P.WRITE_MULTI_ENTRY.size, "REGION_WRITE_MULTI", exact=True)
    entries = []
    for i in range(wr_cnt):
        off, region, count, data = P.WRITE_MULTI_ENTRY.unpack_from(payload, 8 + i * P.WRITE_MULTI_ENTRY.size)
        if not 1 <= count <= P.WRITE_MULTI_MAX_DATA:
            raise DecodeError(f"REGION_WRITE_MULTI: entry {i} count {count}, allowed 1..8")
        entries.append((region, off, data[:count]))
    return WriteMulti(tuple(entries))


def encode_write_multi_reply(completed: int) -> bytes:
    return P.WRITE_MULTI_COUNT.pack(completed)


# --- DMA_READ / DMA_WRITE (server -> client, spec layout) ------------------------------

def encode_dma_access(msg: DmaAccess) -> bytes:
    return P.DMA_ACCESS.pack(msg.iova, msg.count) + msg.data


def _decode_dma(payload, nfds, what, with_data: bool, limit: int) -> DmaAccess:
    _no_fds(nfds, what)
    _need(payload, P.DMA_ACCESS.size, what)
    iova, count = P.DMA_ACCESS.unpack_from(payload)
    if count > limit:
        raise DecodeError(f"{what}: count {count} exceeds the transfer limit {limit}")
    expected = P.DMA_ACCESS.size + (count if with_data else 0)
    if len(payload) != expected:
        raise DecodeError(f"{what}: payload is {len(payload)} bytes, count {count} needs {expected}")
    if iova + count > 1 << 64:
        raise DecodeError(f"{what}: range overflows")
    return DmaAccess(iova, count, bytes(payload[P.DMA_ACCESS.size:]) if with_data else b"")


def decode_dma_read(payload, nfds: int = 0, limit: int = P.MAX_DATA_XFER_SIZE) -> DmaAccess:
    return _decode_dma(payload, nfds, "DMA_READ", False, limit)


def decode_dma_write(payload, nfds: int = 0, limit: int = P.MAX_DATA_XFER_SIZE) -> DmaAccess:
    return _decode_dma(payload, nfds, "DMA_WRITE", True, limit)


def decode_dma_read_reply(payload, nfds: int = 0) -> DmaAccess:
    return _decode_dma(payload, nfds, "DMA_READ reply", True, 1 << 64)


def decode_dma_write_reply(payload, nfds: int = 0) -> DmaAccess:
    return _decode_dma(payload, nfds, "DMA_WRITE reply", False, 1 << 64)


# --- DEVICE_FEATURE --------------------------------------------------------------------

def encode_feature(msg: Feature) -> bytes:
    argsz = msg.argsz or P.FEATURE.size + len(msg.data)
    return P.FEATURE.pack(argsz, msg.flags) + msg.data


def decode_feature(payload, nfds: int = 0) -> Feature:
    _no_fds(nfds, "DEVICE_FEATURE")
    _need(payload, P.FEATURE.size, "DEVICE_FEATURE")
    argsz, flags = P.FEATURE.unpack_from(payload)
    if flags & ~P.FEATURE_FLAGS_KNOWN:
        raise DecodeError(f"DEVICE_FEATURE: unknown flags {flags:#x}")
    if flags & P.FEATURE_GET and flags & P.FEATURE_SET and not flags & P.FEATURE_PROBE:
        raise DecodeError("DEVICE_FEATURE: GET and SET together need PROBE")
    if not flags & (P.FEATURE_GET | P.FEATURE_SET | P.FEATURE_PROBE):
        raise DecodeError("DEVICE_FEATURE: none of GET, SET, PROBE")
    _argsz_at_least(argsz, P.FEATURE.size, "DEVICE_FEATURE")
    return Feature(flags, bytes(payload[P.FEATURE.size:]), argsz)


def decode_feature_reply(payload, nfds: int = 0) -> Feature:
    _no_fds(nfds, "DEVICE_FEATURE reply")
    _need(payload, P.FEATURE.size, "DEVICE_FEATURE reply")
    argsz, flags = P.FEATURE.unpack_from(payload)
    return Feature(flags, bytes(payload[P.FEATURE.size:]), argsz)


def decode_mig_state(data) -> tuple[int, int]:
    _need(data, P.MIG_STATE.size, "MIG_DEVICE_STATE data")
    return P.MIG_STATE.unpack_from(data)


def decode_logging_start(data) -> tuple[int, tuple]:
    """(page_size, ((iova, length), ...)) of DMA_LOGGING_START."""
    _need(data, P.LOGGING_CONTROL.size, "DMA_LOGGING_START data")
    page_size, num_ranges, _reserved = P.LOGGING_CONTROL.unpack_from(data)
    _need(data, P.LOGGING_CONTROL.size + num_ranges * P.LOGGING_RANGE.size, "DMA_LOGGING_START ranges")
    if page_size == 0 or page_size & (page_size - 1):
        raise DecodeError(f"DMA_LOGGING_START: page size {page_size} is not a power of two")
    ranges = tuple(P.LOGGING_RANGE.unpack_from(data, P.LOGGING_CONTROL.size + i * P.LOGGING_RANGE.size)
                   for i in range(num_ranges))
    if any(length == 0 or iova + length > 1 << 64 for iova, length in ranges):
        raise DecodeError("DMA_LOGGING_START: empty or overflowing range")
    return page_size, ranges


def encode_logging_start(page_size: int, ranges=()) -> bytes:
    return P.LOGGING_CONTROL.pack(page_size, len(ranges), 0) + b"".join(P.LOGGING_RANGE.pack(*r) for r in ranges)


def decode_logging_report(data) -> tuple[int, int, int]:
    _need(data, P.LOGGING_REPORT.size, "DMA_LOGGING_REPORT data")
    iova, length, page_size = P.LOGGING_REPORT.unpack_from(data)
    if page_size == 0 or page_size & (page_size - 1):
        raise DecodeError(f"DMA_LOGGING_REPORT: page size {page_size} is not a power of two")
    if length < page_size or iova + length > 1 << 64:
        raise DecodeError(f"DMA_LOGGING_REPORT: bad range iova {iova:#x} length {length:#x}")
    return iova, length, page_size


def bitmap_size(length: int, page_size: int) -> int:
    """Bytes of a dirty bitmap: one bit per page, in whole u64 words."""
    pages = -(-length // page_size)
    return -(-pages // 64) * 8


# --- MIG_DATA_READ / MIG_DATA_WRITE ----------------------------------------------------

def encode_mig_data(msg: MigData) -> bytes:
    argsz = msg.argsz or P.MIG_DATA.size + max(msg.size, len(msg.data))
    return P.MIG_DATA.pack(argsz, msg.size) + msg.data


def decode_mig_data_read(payload, nfds: int = 0) -> MigData:
    _no_fds(nfds, "MIG_DATA_READ")
    _need(payload, P.MIG_DATA.size, "MIG_DATA_READ", exact=True)
    argsz, size = P.MIG_DATA.unpack_from(payload)
    _argsz_at_least(argsz, P.MIG_DATA.size + size, "MIG_DATA_READ")
    return MigData(size, b"", argsz)


def decode_mig_data_write(payload, nfds: int = 0) -> MigData:
    _no_fds(nfds, "MIG_DATA_WRITE")
    _need(payload, P.MIG_DATA.size, "MIG_DATA_WRITE")
    argsz, size = P.MIG_DATA.unpack_from(payload)
    if len(payload) != P.MIG_DATA.size + size:
        raise DecodeError(f"MIG_DATA_WRITE: payload is {len(payload)} bytes, size {size} needs {8 + size}")
    _argsz_at_least(argsz, P.MIG_DATA.size + size, "MIG_DATA_WRITE")
    return MigData(size, bytes(payload[P.MIG_DATA.size:]), argsz)


def decode_mig_data_reply(payload, nfds: int = 0) -> MigData:
    """Trusts `size`, not the message length (libvfio-user pads its replies)."""
    _no_fds(nfds, "MIG_DATA reply")
    _need(payload, P.MIG_DATA.size, "MIG_DATA reply")
    argsz, size = P.MIG_DATA.unpack_from(payload)
    _need(payload, P.MIG_DATA.size + size, "MIG_DATA reply data")
    return MigData(size, bytes(payload[P.MIG_DATA.size:P.MIG_DATA.size + size]), argsz)


# --- DEVICE_RESET, obsolete DIRTY_PAGES ------------------------------------------------

def decode_reset(payload, nfds: int = 0) -> Empty:
    _no_fds(nfds, "DEVICE_RESET")
    if payload:
        raise DecodeError(f"DEVICE_RESET takes no payload, got {len(payload)} bytes")
    return Empty()


def decode_obsolete(cmd: int):
    def refuse(payload, nfds: int = 0):
        raise DecodeError(f"{P.command_name(cmd)} belongs to the removed migration v1 protocol; "
                          "use DEVICE_FEATURE (migration v2)", errno.ENOTSUP)
    return refuse


def _decode_empty_reply(what):
    def decode(payload, nfds: int = 0):
        _no_fds(nfds, what)
        if payload:
            raise DecodeError(f"{what} reply carries {len(payload)} unexpected bytes")
        return Empty()
    return decode


def _decode_unmap_reply(payload, nfds: int = 0):
    _no_fds(nfds, "DMA_UNMAP reply")
    _need(payload, P.DMA_UNMAP_STRUCT.size, "DMA_UNMAP reply", exact=True)
    argsz, flags, iova, size = P.DMA_UNMAP_STRUCT.unpack_from(payload)
    return DmaUnmap(flags, iova, size, argsz)


def _decode_write_multi_reply(payload, nfds: int = 0):
    _no_fds(nfds, "REGION_WRITE_MULTI reply")
    _need(payload, P.WRITE_MULTI_COUNT.size, "REGION_WRITE_MULTI reply", exact=True)
    return P.WRITE_MULTI_COUNT.unpack_from(payload)[0]


def _decode_mig_write_reply(payload, nfds: int = 0):
    _no_fds(nfds, "MIG_DATA_WRITE reply")
    if payload and len(payload) != P.MIG_DATA.size:
        raise DecodeError(f"MIG_DATA_WRITE reply is {len(payload)} bytes")
    return Empty()


REQUEST_DECODERS = {
    P.VERSION: decode_version,
    P.DMA_MAP: decode_dma_map,
    P.DMA_UNMAP: decode_dma_unmap,
    P.DEVICE_GET_INFO: decode_device_info_request,
    P.DEVICE_GET_REGION_INFO: decode_region_info_request,
    P.DEVICE_GET_REGION_IO_FDS: decode_region_io_fds_request,
    P.DEVICE_GET_IRQ_INFO: decode_irq_info_request,
    P.DEVICE_SET_IRQS: decode_set_irqs,
    P.REGION_READ: decode_region_read,
    P.REGION_WRITE: decode_region_write,
    P.DMA_READ: decode_dma_read,
    P.DMA_WRITE: decode_dma_write,
    P.DEVICE_RESET: decode_reset,
    P.DIRTY_PAGES: decode_obsolete(P.DIRTY_PAGES),
    P.REGION_WRITE_MULTI: decode_write_multi,
    P.DEVICE_FEATURE: decode_feature,
    P.MIG_DATA_READ: decode_mig_data_read,
    P.MIG_DATA_WRITE: decode_mig_data_write,
}

REPLY_DECODERS = {
    P.VERSION: decode_version,
    P.DMA_MAP: _decode_empty_reply("DMA_MAP"),
    P.DMA_UNMAP: _decode_unmap_reply,
    P.DEVICE_GET_INFO: decode_device_info,
    P.DEVICE_GET_REGION_INFO: decode_region_info,
    P.DEVICE_GET_REGION_IO_FDS: decode_region_io_fds,
    P.DEVICE_GET_IRQ_INFO: decode_irq_info,
    P.DEVICE_SET_IRQS: _decode_empty_reply("DEVICE_SET_IRQS"),
    P.REGION_READ: decode_region_read_reply,
    P.REGION_WRITE: decode_region_write_reply,
    P.DMA_READ: decode_dma_read_reply,
    P.DMA_WRITE: decode_dma_write_reply,
    P.DEVICE_RESET: _decode_empty_reply("DEVICE_RESET"),
    P.DIRTY_PAGES: decode_obsolete(P.DIRTY_PAGES),
    P.REGION_WRITE_MULTI: _decode_write_multi_reply,
    P.DEVICE_FEATURE: decode_feature_reply,
    P.MIG_DATA_READ: decode_mig_data_reply,
    P.MIG_DATA_WRITE: _decode_mig_write_reply,
}


def decode_request(cmd: int, payload, nfds: int = 0):
    decoder = REQUEST_DECODERS.get(cmd)
    if decoder is None:
        raise DecodeError(f"unknown command {cmd}", errno.ENOSYS)
    return decoder(payload, nfds)


def decode_reply(cmd: int, payload, nfds: int = 0):
    decoder = REPLY_DECODERS.get(cmd)
    if decoder is None:
        raise DecodeError(f"reply to unknown command {cmd}", errno.ENOSYS)
    return decoder(payload, nfds)
