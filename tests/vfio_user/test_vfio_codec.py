"""The codec and the sans-I/O connections, without sockets; hypothesis fuzzing of the codec."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.vfio_user import codec
from devices.vfio_user import protocol as P
from devices.vfio_user.codec import DecodeError, FramingError
from devices.vfio_user.connection import (
    READY, ClientConnection, FrameReader, ProtocolViolation, Reply, ServerConnection, ServerRequest,
)
from devices.vfio_user.device import DeviceError


def frame(cmd, payload=b"", msg_id=7, flags=0):
    return codec.encode_message(msg_id, cmd, flags, payload)


VALID_REQUESTS = [
    frame(P.VERSION, codec.encode_version(codec.Version(0, 2, {"max_msg_fds": 8}))),
    frame(P.DMA_MAP, codec.encode_dma_map(codec.DmaMap(3, 0, 0x1000, 0x1000))),
    frame(P.DMA_UNMAP, codec.encode_dma_unmap(codec.DmaUnmap(0, 0x1000, 0x1000))),
    frame(P.DMA_UNMAP, codec.encode_dma_unmap(codec.DmaUnmap(P.DMA_UNMAP_FLAG_ALL, 0, 0))),
    frame(P.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0)),
    frame(P.DEVICE_GET_REGION_INFO, codec.encode_region_info_request(codec.RegionInfoRequest(7))),
    frame(P.DEVICE_GET_REGION_IO_FDS, codec.encode_region_io_fds_request(codec.RegionIoFdsRequest(0))),
    frame(P.DEVICE_GET_IRQ_INFO, codec.encode_irq_info_request(codec.IrqInfoRequest(0))),
    frame(P.DEVICE_SET_IRQS, codec.encode_set_irqs(codec.SetIrqs(0x21, 0, 0, 0))),
    frame(P.DEVICE_SET_IRQS, codec.encode_set_irqs(codec.SetIrqs(0x12, 1, 0, 2, b"\1\0"))),
    frame(P.REGION_READ, P.REGION_ACCESS.pack(0, 0, 4)),
    frame(P.REGION_WRITE, P.REGION_ACCESS.pack(0, 0, 2) + b"hi"),
    frame(P.REGION_WRITE_MULTI, codec.encode_write_multi(codec.WriteMulti(((0, 0, b"abc"),)))),
    frame(P.DEVICE_RESET),
    frame(P.DEVICE_FEATURE, codec.encode_feature(codec.Feature(P.FEATURE_MIGRATION | P.FEATURE_GET, b"", 64))),
    frame(P.DEVICE_FEATURE, codec.encode_feature(codec.Feature(
        P.FEATURE_MIG_DEVICE_STATE | P.FEATURE_SET, P.MIG_STATE.pack(P.MIG_STATE_STOP, 0)))),
    frame(P.DEVICE_FEATURE, codec.encode_feature(codec.Feature(
        P.FEATURE_DMA_LOGGING_START | P.FEATURE_SET, codec.encode_logging_start(4096, ((0, 0x10000),))))),
    frame(P.DEVICE_FEATURE, codec.encode_feature(codec.Feature(
        P.FEATURE_DMA_LOGGING_REPORT | P.FEATURE_GET, P.LOGGING_REPORT.pack(0, 0x10000, 4096), 64))),
    frame(P.MIG_DATA_READ, codec.encode_mig_data(codec.MigData(64))),
    frame(P.MIG_DATA_WRITE, codec.encode_mig_data(codec.MigData(3, b"abc"))),
    frame(P.DIRTY_PAGES, P.DIRTY_PAGES_STRUCT.pack(8, 1)),
    frame(P.DMA_READ, P.DMA_ACCESS.pack(0x1000, 8)),
    frame(P.DMA_WRITE, P.DMA_ACCESS.pack(0x1000, 2) + b"ok"),
]


# --- exact layouts ---------------------------------------------------------------------

def test_struct_sizes_match_the_spec():
    sizes = {P.HEADER: 16, P.DMA_MAP_STRUCT: 32, P.DMA_UNMAP_STRUCT: 24, P.DEVICE_INFO: 16, P.REGION_INFO: 32,
             P.CAP_HEADER: 8, P.SPARSE_AREA: 16, P.CAP_TYPE_STRUCT: 16, P.IRQ_INFO: 16, P.IRQ_SET: 20,
             P.REGION_ACCESS: 16, P.DMA_ACCESS: 16, P.FEATURE: 8, P.MIG_STATE: 8, P.MIGRATION_FLAGS: 8,
             P.LOGGING_CONTROL: 16, P.LOGGING_RANGE: 16, P.LOGGING_REPORT: 24, P.MIG_DATA: 8,
             P.WRITE_MULTI_ENTRY: 24, P.IO_FD_ENTRY: 40}
    assert {s.format: s.size for s in sizes} == {s.format: n for s, n in sizes.items()}


def test_every_valid_request_decodes():
    for raw in VALID_REQUESTS:
        cmd = struct.unpack_from("<H", raw, 2)[0]
        if cmd == P.DIRTY_PAGES:
            with pytest.raises(DecodeError) as exc:
                codec.decode_frame(raw)
            assert exc.value.errno == errno.ENOTSUP
        else:
            codec.decode_frame(raw)


def test_header_framing_errors():
    with pytest.raises(FramingError):
        codec.check_header(1, 1, 15, 0)
    with pytest.raises(FramingError):
        codec.check_header(1, 1, P.MAX_MESSAGE_SIZE + 1, 0)
    with pytest.raises(FramingError):
        codec.check_header(1, 1, 16, 2)
    codec.check_header(1, 1, 16, P.TYPE_REPLY | P.FLAG_ERROR)


def test_region_info_truncated_unless_caps_fit():
    info = codec.RegionInfo(1, P.REGION_FLAG_READ | P.REGION_FLAG_MMAP, 0x1000, sparse_areas=((0, 0x1000),),
                            region_type=(3, 1))
    short, complete = codec.encode_region_info(info, 32)
    assert len(short) == 32 and not complete
    argsz, flags, _, cap_offset, _, _ = P.REGION_INFO.unpack_from(short)
    assert argsz == 32 + 8 + 8 + 16 + 16 and cap_offset == 0 and not flags & P.REGION_FLAG_CAPS
    full, complete = codec.encode_region_info(info, argsz)
    assert complete and len(full) == argsz
    decoded = codec.decode_region_info(full, 1)
    assert decoded.sparse_areas == ((0, 0x1000),) and decoded.region_type == (3, 1)


def test_set_irqs_validation():
    ok = codec.encode_set_irqs(codec.SetIrqs(P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_TRIGGER, 1, 0, 2))
    assert codec.decode_set_irqs(ok, 2).count == 2
    assert codec.decode_set_irqs(ok, 0).count == 2            # 0 fds = de-assign
    for payload, nfds in ((ok, 1),                             # neither 0 nor count fds
                          (P.IRQ_SET.pack(20, 0x03 | 0x20, 0, 0, 1), 0),      # two DATA bits
                          (P.IRQ_SET.pack(20, 0x01 | 0x28, 0, 0, 1), 0),      # two ACTION bits
                          (P.IRQ_SET.pack(20, 0x01 | 0x08, 0, 0, 0), 0),      # count 0 with MASK
                          (P.IRQ_SET.pack(21, 0x02 | 0x20, 0, 0, 2) + b"\1", 0),  # short BOOL data
                          (P.IRQ_SET.pack(20, 0x21, 0, 0, 1), 1)):            # fds without EVENTFD
        with pytest.raises(DecodeError):
            codec.decode_set_irqs(payload, nfds)


def test_version_requires_nul_terminated_json_object():
    assert codec.decode_version(P.VERSION_HDR.pack(0, 1)).capabilities == {}
    for text in (b"{}", b"[]\0", b"{}\0{}\0", b'{"capabilities":{"max_msg_fds":2000}}\0',
                 b'{"capabilities":{"write_multiple":1}}\0', b"\xff\0"):
        with pytest.raises(DecodeError):
            codec.decode_version(P.VERSION_HDR.pack(0, 1) + text)


# --- fuzzing: nothing but DecodeError escapes ------------------------------------------

def _decode_any(data: bytes, nfds: int) -> None:
    try:
        codec.decode_frame(data, nfds)
    except DecodeError:
        pass
    if len(data) >= 16:
        cmd = struct.unpack_from("<H", data, 2)[0]
        for decoder in (codec.decode_request, codec.decode_reply):
            try:
                decoder(cmd, data[16:], nfds)
            except DecodeError:
                pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 3))
def test_fuzz_random_bytes(data, nfds):
    _decode_any(data, nfds)


@st.composite
def mutated_frames(draw):
    data = bytearray(draw(st.sampled_from(VALID_REQUESTS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "extend", "field"]))
        if kind == "flip" and data:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "extend":
            data += draw(st.binary(max_size=40))
        elif kind == "field" and len(data) >= 24:
            pos = draw(st.integers(0, len(data) - 4))
            data[pos:pos + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 16, 32])))
    if draw(st.booleans()) and len(data) >= 16:
        data[4:8] = struct.pack("<I", len(data))        # keep the frame size consistent half the time
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(mutated_frames(), st.integers(0, 3))
def test_fuzz_mutated_valid_messages(data, nfds):
    _decode_any(data, nfds)


# --- sans-I/O server connection ----------------------------------------------------------

class FakeHandler:
    def __init__(self):
        self.memory = bytearray(256)
        self.read_limits = [-1] * 9
        self.read_limits[0] = 256
        self.write_limits = list(self.read_limits)
        self.device_read = self.region_read
        self.device_write = self.region_write
        self.kept_fds = []

    def region_read(self, region, offset, count):
        if region != 0 or offset + count > 256:
            raise DeviceError("out of range")
        return bytes(self.memory[offset:offset + count])

    def region_write(self, region, offset, data):
        if region != 0 or offset + len(data) > 256:
            raise DeviceError("out of range")
        self.memory[offset:offset + len(data)] = data

    def handle(self, cmd, message, fds):
        if cmd == P.DMA_MAP and fds:
            self.kept_fds.append(fds.pop())
        if cmd == P.DEVICE_RESET:
            raise DeviceError("busy", errno.EBUSY)
        return b""


def negotiated():
    conn = ServerConnection(FakeHandler(), {"max_msg_fds": 8})
    conn.feed(VALID_REQUESTS[0])
    conn.receive(0)
    conn.outgoing.clear()
    assert conn.state is READY
    return conn


def replies(conn):
    reader = FrameReader()
    for data, _fds in conn.outgoing:
        reader.feed(data)
    conn.outgoing.clear()
    out = []
    while (f := reader.next_frame()) is not None:
        out.append((f.msg_id, f.cmd, f.flags, f.error, f.payload))
    return out


def test_server_connection_requires_version_first():
    conn = ServerConnection(FakeHandler(), {})
    conn.feed(frame(P.REGION_READ, P.REGION_ACCESS.pack(0, 0, 1)))
    conn.receive(0)
    assert replies(conn) == [(7, P.REGION_READ, P.REPLY_ERROR_FLAGS, errno.EINVAL, b"")]


def test_no_reply_is_never_answered_even_on_error():
    conn = negotiated()
    conn.feed(frame(P.REGION_WRITE, P.REGION_ACCESS.pack(0, 0, 1) + b"x", flags=P.FLAG_NO_REPLY)
              + frame(P.REGION_WRITE, P.REGION_ACCESS.pack(999, 0, 1) + b"x", flags=P.FLAG_NO_REPLY)
              + frame(P.DEVICE_RESET, flags=P.FLAG_NO_REPLY)
              + frame(P.REGION_READ, P.REGION_ACCESS.pack(0, 0, 1), msg_id=9))
    conn.receive(0)
    assert replies(conn) == [(9, P.REGION_READ, P.TYPE_REPLY, 0, P.REGION_ACCESS.pack(0, 0, 1) + b"x")]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 64), min_size=1, max_size=30))
def test_any_split_of_the_stream_gives_the_same_replies(chunks):
    stream = b"".join(frame(P.REGION_WRITE, P.REGION_ACCESS.pack(i, 0, 2) + bytes([i, i]), msg_id=i)
                      + frame(P.REGION_READ, P.REGION_ACCESS.pack(i, 0, 2), msg_id=100 + i) for i in range(8))
    conn = negotiated()
    pos = 0
    for size in chunks * (len(stream) // sum(chunks) + 1):
        if pos >= len(stream):
            break
        piece = stream[pos:pos + size]
        view = conn.recv_views()[0]
        view[:len(piece)] = piece
        conn.receive(len(piece))
        pos += len(piece)
    got = replies(conn)
    assert [r[0] for r in got] == [x for i in range(8) for x in (i, 100 + i)]
    assert all(r[3] == 0 for r in got)
    assert got[-1][4] == P.REGION_ACCESS.pack(7, 0, 2) + b"\7\7"


def is_open(fd):
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
        return True
    except OSError:
        return False


def test_fds_go_to_their_frame_and_unclaimed_ones_are_closed():
    conn = negotiated()
    kept, stray = os.eventfd(0), os.eventfd(0)
    conn.feed(frame(P.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0)))
    conn.feed(frame(P.DMA_MAP, codec.encode_dma_map(codec.DmaMap(3, 0, 0, 0x1000)), msg_id=8), [kept])
    conn.feed(frame(P.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0), msg_id=9), [stray])
    conn.receive(0)
    assert conn.handler.kept_fds == [kept] and is_open(kept)
    assert not is_open(stray)
    assert [r[3] for r in replies(conn)] == [0, 0, errno.EINVAL]
    os.close(kept)
    # One recvmsg may return earlier messages too; it ends with the one that carried fds.
    second = os.eventfd(0)
    conn.feed(frame(P.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0), msg_id=10)
              + frame(P.DMA_MAP, codec.encode_dma_map(codec.DmaMap(3, 0, 0, 0x1000)), msg_id=11), [second])
    conn.receive(0)
    assert conn.handler.kept_fds[-1] == second and [r[3] for r in replies(conn)] == [0, 0]
    os.close(second)


def test_framing_error_raises_and_close_releases_fds():
    conn = negotiated()
    fd = os.eventfd(0)
    conn.feed(P.HEADER.pack(1, 1, 8, 0, 0), [fd])
    with pytest.raises(FramingError):
        conn.receive(0)
    conn.close()
    assert not is_open(fd)


# --- sans-I/O client connection ----------------------------------------------------------

def test_client_connection_matches_replies_and_serves_requests():
    conn = ClientConnection()
    msg_id = conn.send_request(P.DEVICE_RESET)
    conn.feed(codec.encode_message(msg_id, P.DEVICE_RESET, P.TYPE_REPLY)
              + codec.encode_message(5, P.DMA_READ, P.TYPE_COMMAND, P.DMA_ACCESS.pack(0x10, 4))
              + codec.encode_message(6, P.REGION_READ, P.TYPE_COMMAND, b""))
    events = conn.events()
    assert isinstance(events[0], Reply) and events[0].error == 0
    assert isinstance(events[1], ServerRequest) and events[1].message.count == 4
    assert len(events) == 2
    refused = FrameReader()
    refused.feed(conn.outgoing[-1][0])
    f = refused.next_frame()
    assert (f.msg_id, f.error) == (6, errno.ENOSYS)
    conn.feed(codec.encode_message(77, P.DEVICE_RESET, P.TYPE_REPLY))
    with pytest.raises(ProtocolViolation):
        conn.events()
