"""Client and server in separate processes over real AF_UNIX sockets: every command."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import socket
import struct

import pytest

from vfio_helpers import wait_for
from devices.vfio_user import codec
from devices.vfio_user import protocol as P
from devices.vfio_user.client import Client, ClientError

SCRATCH = 0x000
DMA_SRC, DMA_DST, DMA_LEN, DOORBELL = 0x100, 0x108, 0x110, 0x114
INTX_LEVEL, MSI_FIRE, MSIX_FIRE, ERR_FIRE, REQ_FIRE = 0x120, 0x124, 0x128, 0x12C, 0x130
WRITES, COPIES = 0x140, 0x144


def u32(client, offset) -> int:
    return struct.unpack("<I", client.region_read(0, offset, 4))[0]


def fired(fd: int, timeout: float = 1.0) -> int:
    """Counter of an eventfd after waiting for it, 0 if it stayed quiet."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.eventfd_read(fd) if ready else 0


def make_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


@contextlib.contextmanager
def guest_ram(size: int):
    """A memfd as a VMM's shared guest RAM, and the client's own mapping of it."""
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(memfd, size)
    mapping = mmap.mmap(memfd, size)
    try:
        yield memfd, mapping
    finally:
        mapping.close()
        os.close(memfd)


def test_version_negotiation(server):
    qemu_caps = {"migration": {"pgsize": 4096, "max_bitmap_size": 268435456}, "max_msg_fds": 16,
                 "max_data_xfer_size": 1048576, "pgsizes": 4096, "max_dma_maps": 65535, "write_multiple": True}
    with Client.connect(server.path, minor=0, capabilities=qemu_caps) as client:
        assert client.server_version == (0, 0)          # QEMU offers 0.0 and needs 0 back
        caps = client.server_capabilities
        assert caps["max_msg_fds"] == P.MAX_MSG_FDS and caps["max_data_xfer_size"] == 1 << 20
        assert caps["write_multiple"] is True and caps["pgsizes"] == 4096 and caps["max_dma_maps"] == 65535
    with Client.connect(server.path, minor=7, capabilities={}) as client:
        assert client.server_version == (0, P.VERSION_MINOR)
        assert "write_multiple" not in client.server_capabilities   # never more than the client speaks
    # QEMU's reply buffer is as big as its request: optional keys go before the reply outgrows it.
    with Client.connect(server.path, negotiate=False) as client:
        request = P.VERSION_HDR.pack(0, 0) + b'{"capabilities":{"write_multiple":true}}\0'
        reply = client.request(P.VERSION, request)
        assert b"write_multiple" not in reply.payload and reply.payload.endswith(b"}}\0")


def test_command_before_version_and_bad_versions(server):
    with Client.connect(server.path, negotiate=False) as client:
        with pytest.raises(ClientError) as exc:
            client.device_info()
        assert exc.value.errno == errno.EINVAL
        bad = P.VERSION_HDR.pack(1, 0) + b'{"capabilities":{}}\0'
        with pytest.raises(ClientError) as exc:
            client.request(P.VERSION, bad)
        assert exc.value.errno == errno.ENOTSUP
        for payload in (P.VERSION_HDR.pack(0, 0) + b'{"capabilities":[]}\0',
                        P.VERSION_HDR.pack(0, 0) + b'{"capabilities":{}}',          # no NUL
                        P.VERSION_HDR.pack(0, 0) + b'{"capabilities":{"max_msg_fds":-1}}\0',
                        P.VERSION_HDR.pack(0, 0) + b'not json\0'):
            with pytest.raises(ClientError) as exc:
                client.request(P.VERSION, payload)
            assert exc.value.errno == errno.EINVAL
        client.negotiate()
        assert client.device_info().num_regions == 9
        with pytest.raises(ClientError) as exc:
            client.negotiate()
        assert exc.value.errno == errno.EINVAL


def test_device_region_and_irq_info(client):
    info = client.device_info()
    assert (info.flags, info.num_regions, info.num_irqs) == (P.DEVICE_FLAG_PCI | P.DEVICE_FLAG_RESET, 9, 5)
    config, fd = client.region_info(7)
    assert (config.size, config.flags, fd) == (256, P.REGION_FLAG_READ | P.REGION_FLAG_WRITE, None)
    absent, fd = client.region_info(2)
    assert (absent.size, absent.flags, fd) == (0, 0, None)
    with pytest.raises(ClientError) as exc:
        client.region_info(9)
    assert exc.value.errno == errno.EINVAL
    counts = [client.irq_info(i).count for i in range(5)]
    assert counts == [1, 4, 8, 1, 1]
    assert client.irq_info(0).flags == P.IRQ_INFO_EVENTFD | P.IRQ_INFO_MASKABLE | P.IRQ_INFO_AUTOMASKED
    with pytest.raises(ClientError):
        client.irq_info(5)
    assert client.region_io_fds(0).entries == ()
    with pytest.raises(ClientError):
        client.region_io_fds(12)


def test_region_info_argsz_retry_and_mmap_fd(client):
    # First ask with the bare 32 bytes: the reply must not carry caps or the fd.
    reply = client.request(P.DEVICE_GET_REGION_INFO,
                           codec.encode_region_info_request(codec.RegionInfoRequest(1, 32)))
    assert len(reply.payload) == 32 and reply.fds == []
    first = codec.decode_region_info(reply.payload)
    assert first.argsz == 32 + 8 + 8 + 16 and not first.flags & P.REGION_FLAG_CAPS
    info, fd = client.region_info(1)               # the client retries with the size asked for
    assert info.flags & P.REGION_FLAG_MMAP and info.flags & P.REGION_FLAG_CAPS
    assert info.sparse_areas == ((0, 0x1000),) and fd is not None
    try:
        shared = mmap.mmap(fd, 0x1000)
        shared[0:5] = b"mmap!"
        assert client.region_read(1, 0, 5) == b"mmap!"          # message access sees the mmap
        client.region_write(1, 8, b"msg")
        assert shared[8:11] == b"msg"
        shared.close()
    finally:
        os.close(fd)


def test_region_read_write_and_errors(client):
    client.region_write(0, SCRATCH, b"abcdefgh")
    assert client.region_read(0, SCRATCH, 8) == b"abcdefgh"
    assert client.region_read(0, SCRATCH + 2, 3) == b"cde"
    assert client.region_read(7, 0, 4) == struct.pack("<HH", 0x1B36, 0x0005)
    assert client.region_read(0, 0, 0) == b""
    cases = [
        lambda: client.region_read(0xDEADBEEF, 0, 4),      # the libvfio-user client's first check
        lambda: client.region_read(2, 0, 1),               # not implemented
        lambda: client.region_read(0, 0xFFF, 2),           # past the end
        lambda: client.region_write(0, 0x1000, b"x"),
        lambda: client.region_write(7, 0, b"\0\0"),        # the device refuses (EPERM)
    ]
    errors = []
    for case in cases:
        with pytest.raises(ClientError) as exc:
            case()
        errors.append(exc.value.errno)
    assert errors == [errno.EINVAL] * 4 + [errno.EPERM]
    # A REGION_WRITE whose count disagrees with its payload is refused, not half applied.
    bad = P.REGION_ACCESS.pack(0, 0, 4) + b"xy"
    with pytest.raises(ClientError) as exc:
        client.request(P.REGION_WRITE, bad)
    assert exc.value.errno == errno.EINVAL
    assert client.region_read(0, 0, 2) == b"ab"


def test_no_reply_write_then_read(client):
    before = u32(client, WRITES)
    for i in range(50):
        client.region_write(0, SCRATCH + i, bytes([i]), no_reply=True)
    client.region_write(0, 0x1000, b"x", no_reply=True)          # an error: still no reply at all
    assert client.region_read(0, SCRATCH, 50) == bytes(range(50))
    assert u32(client, WRITES) == before + 50
    assert client.conn.pending == {}


def test_region_write_multi(client):
    entries = [(0, SCRATCH + 8 * i, bytes([i]) * 8) for i in range(10)] + [(0, SCRATCH + 100, b"\x7f")]
    assert client.region_write_multi(entries) == 11
    client.region_write_multi([(0, SCRATCH + 200, b"posted")], no_reply=True)
    data = client.region_read(0, SCRATCH, 256)
    assert data[:80] == b"".join(bytes([i]) * 8 for i in range(10))
    assert data[100] == 0x7F and data[200:206] == b"posted"
    with pytest.raises(ClientError):
        client.request(P.REGION_WRITE_MULTI, P.WRITE_MULTI_COUNT.pack(201) + bytes(24 * 201))


def test_reset(client):
    client.region_write(0, SCRATCH, b"dirty")
    client.reset()
    assert client.region_read(0, SCRATCH, 5) == bytes(5)


def test_dma_through_shared_memfd(client):
    with guest_ram(0x4000) as (memfd, guest):
        client.dma_map(0x100000, 0x4000, fd=memfd)
        guest[0x10:0x20] = b"0123456789abcdef"
        client.region_write(0, DMA_SRC, struct.pack("<Q", 0x100010))
        client.region_write(0, DMA_DST, struct.pack("<Q", 0x102000))
        client.region_write(0, DMA_LEN, struct.pack("<I", 16))
        client.region_write(0, DOORBELL, b"\1")
        assert guest[0x2000:0x2010] == b"0123456789abcdef"          # device wrote, client sees it
        assert client.dma_requests_served == 0                        # no messages for fd memory
        # Copy to an unmapped address fails with EFAULT.
        client.region_write(0, DMA_DST, struct.pack("<Q", 0x900000))
        with pytest.raises(ClientError) as exc:
            client.region_write(0, DOORBELL, b"\1")
        assert exc.value.errno == errno.EFAULT
        # Dirty logging sees the device's writes.
        client.dma_logging_start(4096)
        client.region_write(0, DMA_DST, struct.pack("<Q", 0x103000))
        client.region_write(0, DOORBELL, b"\1")
        assert client.dma_logging_report(0x100000, 0x4000) == b"\x08" + bytes(7)
        assert client.dma_logging_report(0x100000, 0x4000) == bytes(8)   # read and clear
        client.dma_logging_stop()
        assert client.dma_unmap(0x100000, 0x4000).size == 0x4000
        with pytest.raises(ClientError):
            client.region_write(0, DOORBELL, b"\1")                   # gone


def test_message_based_dma(client):
    source = bytearray(b"S" * 0x1000)
    source[100:110] = b"message-io"
    target = bytearray(0x1000)
    client.dma_map(0x10000, 0x1000, memory=source)
    client.dma_map(0x20000, 0x1000, memory=target)
    client.region_write(0, DMA_SRC, struct.pack("<Q", 0x10000 + 100))
    client.region_write(0, DMA_DST, struct.pack("<Q", 0x20000 + 5))
    client.region_write(0, DMA_LEN, struct.pack("<I", 10))
    client.region_write(0, DOORBELL, b"\1")
    assert target[5:15] == b"message-io"
    assert client.dma_requests_served == 2
    assert u32(client, COPIES) == 1


def test_commands_behind_a_dma_wait_run_afterwards_in_order(client):
    """The doorbell is posted; the read behind it is parked while the server waits for
    the client's DMA replies, then answered with the copy already done."""
    client.dma_map(0x10000, 0x1000, memory=bytearray(b"x" * 0x1000))
    target = bytearray(0x1000)
    client.dma_map(0x20000, 0x1000, memory=target)
    client.region_write(0, DMA_SRC, struct.pack("<Q", 0x10000))
    client.region_write(0, DMA_DST, struct.pack("<Q", 0x20000))
    client.region_write(0, DMA_LEN, struct.pack("<I", 0x100))
    client.region_write(0, DOORBELL, b"\1", no_reply=True)
    client.region_write(0, SCRATCH, b"after", no_reply=True)
    assert u32(client, COPIES) == 1
    assert target[:0x100] == b"x" * 0x100 and client.region_read(0, SCRATCH, 5) == b"after"


def test_message_dma_is_chunked_by_client_limit(server):
    with Client.connect(server.path, capabilities={"max_msg_fds": 8, "max_data_xfer_size": 1024},
                        max_data_xfer_size=1024) as client:
        source = bytearray(os.urandom(0x3000))
        target = bytearray(0x3000)
        client.dma_map(0x0, 0x3000, memory=source)
        client.dma_map(0x10000, 0x3000, memory=target)
        client.region_write(0, DMA_SRC, struct.pack("<Q", 0))
        client.region_write(0, DMA_DST, struct.pack("<Q", 0x10000))
        client.region_write(0, DMA_LEN, struct.pack("<I", 0x2800))
        client.region_write(0, DOORBELL, b"\1")
        assert target[:0x2800] == source[:0x2800]
        assert client.dma_requests_served == 20            # 10 reads + 10 writes of 1 KiB


def test_dma_map_tolerance_and_unmap_rules(client):
    memfd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 0x10000)
    try:
        client.dma_map(0x0, 0x10000, fd=os.dup(memfd))
        client.dma_map(0x0, 0x10000, fd=os.dup(memfd))           # identical re-map: fine
        client.dma_map(0x4000, 0x1000, memory=bytearray(0x1000))  # overlap: the new one wins
        with pytest.raises(ClientError) as exc:
            client.dma_unmap(0x2000, 0x1000)                      # would cut a mapping
        assert exc.value.errno == errno.EINVAL
        client.dma_unmap(0x4000, 0x1000)
        client.dma_unmap(0x50000, 0x1000)                         # nothing there: tolerated
        with pytest.raises(ClientError) as exc:                   # offset past the end of the file
            client.dma_map(0x100000, 0x1000, fd=os.dup(memfd), offset=0x10000)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(ClientError) as exc:
            client.request(P.DMA_UNMAP, codec.encode_dma_unmap(codec.DmaUnmap(
                P.DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 0, 0x1000)))
        assert exc.value.errno == errno.ENOTSUP                   # migration v1 is gone
        client.dma_unmap(unmap_all=True)
    finally:
        os.close(memfd)


def test_obsolete_and_unknown_commands(client):
    with pytest.raises(ClientError) as exc:
        client.request(P.DIRTY_PAGES, P.DIRTY_PAGES_STRUCT.pack(8, 1))
    assert exc.value.errno == errno.ENOTSUP
    with pytest.raises(ClientError) as exc:
        client.request(99, b"")
    assert exc.value.errno == errno.ENOSYS
    with pytest.raises(ClientError) as exc:
        client.request(P.DMA_READ, P.DMA_ACCESS.pack(0, 1))
    assert exc.value.errno == errno.EINVAL
    assert client.region_read(7, 0, 2) == b"\x36\x1b"


def test_intx_level_mask_unmask_and_resample(client):
    trigger, resample = make_eventfd(), make_eventfd()
    try:
        client.enable_irq_eventfds(0, [trigger])
        client.region_write(0, INTX_LEVEL, b"\1")
        assert fired(trigger) == 1
        client.set_irqs(0, P.IRQ_DATA_NONE | P.IRQ_ACTION_UNMASK, 0, 1)     # EOI, level still high
        assert fired(trigger) == 1
        client.region_write(0, INTX_LEVEL, b"\0")
        client.set_irqs(0, P.IRQ_DATA_NONE | P.IRQ_ACTION_UNMASK, 0, 1)     # EOI, level low: quiet
        assert fired(trigger, 0.1) == 0
        client.set_irqs(0, P.IRQ_DATA_NONE | P.IRQ_ACTION_MASK, 0, 1)
        client.region_write(0, INTX_LEVEL, b"\1")
        assert fired(trigger, 0.1) == 0                                     # masked
        client.set_irqs(0, P.IRQ_DATA_BOOL | P.IRQ_ACTION_UNMASK, 0, 1, data=b"\1")
        assert fired(trigger) == 1                                          # pending level delivered
        # KVM-style resample eventfd: signalling it is an unmask.
        client.set_irqs(0, P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_UNMASK, 0, 1, fds=[resample])
        os.eventfd_write(resample, 1)
        assert fired(trigger) == 1
        client.region_write(0, INTX_LEVEL, b"\0")
        client.disable_irqs(0)
        client.region_write(0, INTX_LEVEL, b"\1")
        assert fired(trigger, 0.1) == 0
        with pytest.raises(ClientError):                                    # a pipe is not an eventfd
            r, w = os.pipe()
            try:
                client.enable_irq_eventfds(0, [w])
            finally:
                os.close(r)
                os.close(w)
    finally:
        os.close(trigger)
        os.close(resample)


def test_msi_msix_err_req_vectors(client):
    fds = [make_eventfd() for _ in range(4)]
    msix = [make_eventfd() for _ in range(8)]
    err, req = make_eventfd(), make_eventfd()
    try:
        client.enable_irq_eventfds(1, fds)
        for vector in (0, 3):
            client.region_write(0, MSI_FIRE, struct.pack("<I", vector))
        assert [fired(fd, 0.2) for fd in fds] == [1, 0, 0, 1]
        client.set_irqs(1, P.IRQ_DATA_NONE | P.IRQ_ACTION_MASK, 2, 1)
        client.region_write(0, MSI_FIRE, struct.pack("<I", 2))
        assert fired(fds[2], 0.1) == 0
        client.set_irqs(1, P.IRQ_DATA_NONE | P.IRQ_ACTION_UNMASK, 2, 1)
        assert fired(fds[2]) == 1                                           # pending, then delivered
        with pytest.raises(ClientError):                                    # MSI-X while MSI is on
            client.enable_irq_eventfds(2, msix)
        client.set_irqs(1, P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_TRIGGER, 0, 4)  # no fds: de-assign
        client.enable_irq_eventfds(2, msix[:4])
        client.enable_irq_eventfds(2, msix[4:], start=4)                    # grow without disable
        client.region_write(0, MSIX_FIRE, struct.pack("<I", 6))
        assert fired(msix[6]) == 1
        client.set_irqs(2, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, 5, 1)    # loopback trigger
        assert fired(msix[5]) == 1
        client.enable_irq_eventfds(3, [err])
        client.enable_irq_eventfds(4, [req])
        client.region_write(0, ERR_FIRE, b"\1")
        client.region_write(0, REQ_FIRE, b"\1")
        assert (fired(err), fired(req)) == (1, 1)
        with pytest.raises(ClientError):
            client.set_irqs(3, P.IRQ_DATA_NONE | P.IRQ_ACTION_MASK, 0, 1)   # ERR: trigger only
        with pytest.raises(ClientError):
            client.set_irqs(1, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, 3, 2)  # beyond 4 vectors
        for index in range(5):
            client.disable_irqs(index)
    finally:
        for fd in fds + msix + [err, req]:
            os.close(fd)


def test_reconnect_keeps_state_but_not_dma_or_irqs(server):
    memfd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 0x1000)
    trigger = make_eventfd()
    baseline = server.fd_count()
    try:
        with Client.connect(server.path) as first:
            first.region_write(0, SCRATCH, b"persist")
            first.dma_map(0x0, 0x1000, fd=memfd)
            first.enable_irq_eventfds(1, [trigger])
            assert server.fd_count() > baseline
        wait_for(lambda: server.fd_count() == baseline, what="server dropping the client's fds")
        with Client.connect(server.path) as second:
            assert second.region_read(0, SCRATCH, 7) == b"persist"
            second.region_write(0, DMA_SRC, struct.pack("<Q", 0))
            second.region_write(0, DMA_DST, struct.pack("<Q", 0x10))
            second.region_write(0, DMA_LEN, struct.pack("<I", 4))
            with pytest.raises(ClientError) as exc:
                second.region_write(0, DOORBELL, b"\1")
            assert exc.value.errno == errno.EFAULT                           # mappings are gone
            second.region_write(0, MSI_FIRE, struct.pack("<I", 0))
            assert fired(trigger, 0.1) == 0                                 # so are the eventfds
            second.dma_map(0x0, 0x1000, fd=memfd)
            second.region_write(0, DOORBELL, b"\1")                          # fresh map works
    finally:
        os.close(memfd)
        os.close(trigger)


def test_migration_to_second_server_process(start_server):
    source = start_server(name="src.sock")
    destination = start_server(name="dst.sock")
    with Client.connect(source.path) as src, Client.connect(destination.path) as dst:
        assert src.migration_flags() == P.MIGRATION_STOP_COPY | P.MIGRATION_PRE_COPY
        src.region_write(0, SCRATCH, b"live state")
        src.region_write(1, 0x800, b"bar1 contents")
        src.region_write(0, DMA_LEN, struct.pack("<I", 77))
        expected = [src.region_read(0, 0, 0x148), src.region_read(1, 0, 0x1000), src.region_read(7, 0, 256)]
        src.set_migration_state(P.MIG_STATE_PRE_COPY)
        assert src.mig_data_read(4096) == b""                              # nothing before stop-copy
        src.set_migration_state(P.MIG_STATE_STOP_COPY)
        with pytest.raises(ClientError) as exc:
            src.region_write(0, SCRATCH, b"late")                           # frozen while saving
        assert exc.value.errno == errno.EBUSY
        chunks = []
        while data := src.mig_data_read(1000):
            chunks.append(data)
        blob = b"".join(chunks)
        assert len(chunks) > 1 and blob[:4] == b"VFUS"
        src.set_migration_state(P.MIG_STATE_STOP)
        with pytest.raises(ClientError):
            src.mig_data_read(16)                                           # no stream in STOP
        dst.set_migration_state(P.MIG_STATE_RESUMING)
        assert dst.migration_state() == P.MIG_STATE_RESUMING
        for pos in range(0, len(blob), 999):
            dst.mig_data_write(blob[pos:pos + 999])
        dst.set_migration_state(P.MIG_STATE_RUNNING)                        # via STOP: validation
        assert [dst.region_read(0, 0, 0x148), dst.region_read(1, 0, 0x1000), dst.region_read(7, 0, 256)] == expected
        with pytest.raises(ClientError):
            src.set_migration_state(P.MIG_STATE_ERROR)                      # ERROR can't be requested


def test_incompatible_state_refused_and_source_keeps_running(start_server):
    source = start_server(name="src.sock")
    other_type = start_server("--device-type", "other-device", name="other.sock")
    newer = start_server("--abi", "2", name="newer.sock")
    with Client.connect(source.path) as src:
        src.region_write(0, SCRATCH, b"keep")
        blob = src.save_device_state()
        for target in (other_type, newer):
            with Client.connect(target.path) as dst:
                dst.set_migration_state(P.MIG_STATE_RESUMING)
                with pytest.raises(ClientError) as exc:
                    dst.mig_data_write(blob)
                assert exc.value.errno == errno.EINVAL
                with pytest.raises(ClientError):
                    dst.set_migration_state(P.MIG_STATE_RUNNING)             # nothing valid to load
                assert dst.migration_state() == P.MIG_STATE_RESUMING
        src.set_migration_state(P.MIG_STATE_RUNNING)                        # the source carries on
        src.region_write(0, SCRATCH + 4, b"!")
        assert src.region_read(0, SCRATCH, 5) == b"keep!"
    _, log_other = other_type.stop()
    _, log_newer = newer.stop()
    assert "'test-device' device offered to a 'other-device' device" in log_other
    assert "abi_version 1" in log_newer and "does not accept" in log_newer


def test_truncated_or_corrupt_state_refused(start_server):
    source = start_server(name="src.sock")
    destination = start_server(name="dst.sock")
    with Client.connect(source.path) as src, Client.connect(destination.path) as dst:
        blob = src.save_device_state()
        src.set_migration_state(P.MIG_STATE_RUNNING)
        corrupt = blob[:-6] + bytes([blob[-6] ^ 0xFF]) + blob[-5:]
        dst.set_migration_state(P.MIG_STATE_RESUMING)
        for bad in (blob[:-10], corrupt):
            dst.mig_data_write(bad)
            with pytest.raises(ClientError):
                dst.set_migration_state(P.MIG_STATE_STOP)
            assert dst.migration_state() == P.MIG_STATE_RESUMING    # stream discarded, try again
        dst.load_device_state(blob)
        assert dst.migration_state() == P.MIG_STATE_RUNNING


def test_device_feature_probe_and_errors(client):
    assert client.probe_feature(P.FEATURE_MIGRATION)
    assert client.probe_feature(P.FEATURE_MIG_DEVICE_STATE, P.FEATURE_GET | P.FEATURE_SET)
    assert not client.probe_feature(P.FEATURE_MIGRATION, P.FEATURE_SET)
    assert not client.probe_feature(9)                                      # MIG_DATA_SIZE: kernel only
    with pytest.raises(ClientError) as exc:
        client.feature(P.FEATURE_MIGRATION | P.FEATURE_GET, argsz=8)        # reply would not fit
    assert exc.value.errno == errno.E2BIG
    with pytest.raises(ClientError):
        client.set_migration_state(P.MIG_STATE_RUNNING_P2P)
    assert client.migration_state() == P.MIG_STATE_RUNNING


def test_malformed_frames_close_only_that_connection(server):
    baseline = server.fd_count()
    for frame in (P.HEADER.pack(1, 1, 8, 0, 0),                   # size < 16
                  P.HEADER.pack(1, 1, 1 << 30, 0, 0),             # oversize
                  P.HEADER.pack(1, 1, 16, 0x7, 0)):               # bad type
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(server.path)
        sock.sendall(frame)
        assert sock.recv(100) == b""                                # closed, nothing sent back
        sock.close()
    with Client.connect(server.path) as client:
        assert client.device_info().num_regions == 9
    wait_for(lambda: server.fd_count() == baseline, what="fd count back to baseline")


def test_unexpected_fds_are_closed(server, client):
    baseline = server.fd_count()
    extra = [make_eventfd() for _ in range(3)]
    try:
        with pytest.raises(ClientError):
            client.request(P.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0), extra)
        assert client.device_info().num_regions == 9
        assert server.fd_count() == baseline
    finally:
        for fd in extra:
            os.close(fd)


def test_too_many_fds_drop_the_connection(server):
    baseline = server.fd_count()
    fds = [make_eventfd() for _ in range(P.MAX_MSG_FDS + 4)]
    try:
        with Client.connect(server.path) as client:
            with pytest.raises(ClientError):
                client.request(P.DEVICE_SET_IRQS, codec.encode_set_irqs(codec.SetIrqs(
                    P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_TRIGGER, 2, 0, len(fds))), fds)
        wait_for(lambda: server.fd_count() == baseline, what="fds closed after MSG_CTRUNC")
        with Client.connect(server.path) as client:
            assert client.device_info().num_irqs == 5
    finally:
        for fd in fds:
            os.close(fd)


def test_migration_data_reads_honour_argsz(client):
    client.set_migration_state(P.MIG_STATE_STOP_COPY)
    reply = client.request(P.MIG_DATA_READ, P.MIG_DATA.pack(8 + 4, 4))
    argsz, size = P.MIG_DATA.unpack_from(reply.payload)
    assert (argsz, size, len(reply.payload)) == (12, 4, 12)
    with pytest.raises(ClientError):
        client.request(P.MIG_DATA_READ, P.MIG_DATA.pack(8, 4))            # argsz too small for size
    client.set_migration_state(P.MIG_STATE_RUNNING)


def test_failed_load_enters_error_until_reset(client):
    from devices.vfio_user.migration import wrap_state

    client.region_write(0, SCRATCH, b"before")
    client.set_migration_state(P.MIG_STATE_RESUMING)
    client.mig_data_write(wrap_state("test-device", 1, b"not a test-device state"))
    with pytest.raises(ClientError):
        client.set_migration_state(P.MIG_STATE_STOP)                 # load_state raised
    assert client.migration_state() == P.MIG_STATE_ERROR
    with pytest.raises(ClientError):
        client.set_migration_state(P.MIG_STATE_RUNNING)              # ERROR is left only by reset
    client.reset()
    assert client.migration_state() == P.MIG_STATE_RUNNING
    assert client.region_read(0, SCRATCH, 6) == bytes(6)


def test_megabyte_messages_cross_the_socket_in_pieces(client):
    """1 MiB DMA messages each way: partial sends and reads on both sides of the socket."""
    size = 1 << 20
    source = bytearray(os.urandom(size))
    target = bytearray(size)
    client.dma_map(0x1000_0000, size, memory=source)
    client.dma_map(0x2000_0000, size, memory=target)
    client.region_write(0, DMA_SRC, struct.pack("<Q", 0x1000_0000))
    client.region_write(0, DMA_DST, struct.pack("<Q", 0x2000_0000))
    client.region_write(0, DMA_LEN, struct.pack("<I", size))
    client.region_write(0, DOORBELL, b"\1")
    assert target == source and client.dma_requests_served == 2


def test_feature_set_reply_repeats_the_request_byte_for_byte(client):
    request = codec.encode_feature(codec.Feature(P.FEATURE_MIG_DEVICE_STATE | P.FEATURE_SET,
                                                 P.MIG_STATE.pack(P.MIG_STATE_PRE_COPY, 0), 16))
    assert client.request(P.DEVICE_FEATURE, request).payload == request
    client.set_migration_state(P.MIG_STATE_RUNNING)


def test_migration_state_machine_paths(client):
    S = P
    walk = [S.MIG_STATE_STOP, S.MIG_STATE_PRE_COPY, S.MIG_STATE_STOP_COPY, S.MIG_STATE_RUNNING,
            S.MIG_STATE_RESUMING]
    for state in walk:                      # indirect requests take the spec's shortest paths
        client.set_migration_state(state)
        assert client.migration_state() == state
    with pytest.raises(ClientError):
        client.set_migration_state(S.MIG_STATE_RUNNING)           # nothing was resumed
    client.reset()                                                # a reset abandons RESUMING
    for state in (S.MIG_STATE_PRE_COPY, S.MIG_STATE_STOP, S.MIG_STATE_STOP_COPY):
        client.set_migration_state(state)
        assert client.migration_state() == state
    with pytest.raises(ClientError):
        client.set_migration_state(S.MIG_STATE_PRE_COPY)          # STOP_COPY -> PRE_COPY is illegal
    assert client.migration_state() == S.MIG_STATE_STOP_COPY
    client.set_migration_state(S.MIG_STATE_RUNNING)


def test_interrupts_held_while_stopped(client):
    msi = [make_eventfd() for _ in range(4)]
    try:
        client.enable_irq_eventfds(1, msi)
        client.set_migration_state(P.MIG_STATE_STOP)
        client.region_write(0, MSI_FIRE, struct.pack("<I", 1))
        assert fired(msi[1], 0.1) == 0                           # a stopped device stays quiet
        client.set_migration_state(P.MIG_STATE_RUNNING)
        assert fired(msi[1]) == 1                                # and delivers once running
        client.disable_irqs(1)
    finally:
        for fd in msi:
            os.close(fd)


def test_dma_logging_ranges_and_report_page_sizes(client):
    with guest_ram(0x10000) as (memfd, _guest):
        client.dma_map(0, 0x10000, fd=memfd)
        client.dma_logging_start(4096, ranges=[(0x8000, 0x8000)])   # only the upper half is logged
        client.region_write(0, DMA_LEN, struct.pack("<I", 16))
        for dst in (0x1000, 0x9000, 0xF000):
            client.region_write(0, DMA_DST, struct.pack("<Q", dst))
            client.region_write(0, DOORBELL, b"\1")
        bitmap = int.from_bytes(client.dma_logging_report(0, 0x10000), "little")
        assert bitmap == (1 << 9) | (1 << 15)
        client.region_write(0, DOORBELL, b"\1")                      # 0xF000 once more
        assert client.dma_logging_report(0, 0x10000, 0x8000) == b"\x02" + bytes(7)   # 32 KiB pages
        with pytest.raises(ClientError):
            client.dma_logging_start(8192)                            # another page size while on
        client.dma_logging_stop()
        with pytest.raises(ClientError):
            client.dma_logging_report(0, 0x10000)                     # not logging any more


def test_a_refused_stream_is_discarded_and_the_whole_stream_can_follow(client):
    client.region_write(0, SCRATCH, b"saved!")
    blob = client.save_device_state()
    client.set_migration_state(P.MIG_STATE_RUNNING)
    client.region_write(0, SCRATCH, b"later!")
    client.set_migration_state(P.MIG_STATE_RESUMING)
    with pytest.raises(ClientError):
        client.mig_data_write(b"XXXX" + blob[4:])                     # bad magic: refused
    assert client.migration_state() == P.MIG_STATE_RESUMING
    client.mig_data_write(blob)                                       # no leftovers in front of it
    client.set_migration_state(P.MIG_STATE_RUNNING)
    assert client.region_read(0, SCRATCH, 6) == b"saved!"
