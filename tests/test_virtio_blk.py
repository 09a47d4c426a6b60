"""The bundled virtio-blk device: the split virtqueue, the virtio-pci transport and the block
requests, driven the way Linux's virtio_pci and virtio_blk drive them; hostile rings fuzzed;
the same walk over vfio-user, bare and jailed (root and user), read-write and read-only.

In-process tests attach the device to LocalHost, a DeviceHost over the server's own
DmaSpace (guest RAM mmapped from a memfd, or reached by message callbacks) with MSI-X
eventfds, so the driver in devices.virtio.driver runs against it without a socket.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.vfio_user import protocol as P
from devices.vfio_user.device import CONFIG, IRQ_MSIX, DeviceError, DeviceHost
from devices.vfio_user.client import Client, ClientError
from devices.vfio_user.dma import DmaSpace
from devices.vfio_user.exerciser import exercise
from devices.vfio_user.migration import unwrap_state, wrap_state
from devices.virtio import pci as V
from devices.virtio.driver import GuestRam
from devices.virtio.queue import (DESC, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_INDIRECT, QueueError,
                                  SplitQueue, need_event)
from devices.virtio_blk.device import (F_DISCARD, F_RO, F_WRITE_ZEROES, HEADER, S_IOERR, S_OK, S_UNSUPP, SECTOR,
                                       T_FLUSH, T_IN, T_OUT, Disk, VirtioBlk)
from devices.virtio_blk.driver import BlockDriver
from test_e2e_jailed_device import INVOCATIONS, jailed, scratch  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "profiles" / "virtio-blk.toml"
DISK_SIZE = 4 << 20


# --- an in-process host ------------------------------------------------------------------------

class LocalHost(DeviceHost):
    """The server's DMA space and MSI-X eventfds, without the socket."""

    def __init__(self, device):
        self.device = device
        self.dma = DmaSpace(self._message_read, self._message_write)
        self.dma.before_change = device.dma_changing
        self.eventfds: list[int] = []
        self.messages = {}                  # iova -> bytearray of fd-less mappings
        self.intx = False
        device.attach(self)

    def _locate(self, iova, length):
        for base, memory in self.messages.items():
            if base <= iova and iova + length <= base + len(memory):
                return memory, iova - base
        raise DeviceError("unmapped", 14)

    def _message_read(self, iova, length):
        memory, offset = self._locate(iova, length)
        return bytes(memory[offset:offset + length])

    def _message_write(self, iova, data):
        memory, offset = self._locate(iova, len(data))
        memory[offset:offset + len(data)] = data

    def set_intx(self, asserted):
        self.intx = asserted

    def signal_irq(self, index, vector):
        assert index == IRQ_MSIX
        if vector < len(self.eventfds):
            os.eventfd_write(self.eventfds[vector], 1)

    def dma_read(self, iova, length):
        return self.dma.read(iova, length)

    def dma_write(self, iova, data):
        self.dma.write(iova, data)

    def dma_views(self, segments, writable):
        return self.dma.views(segments, writable)

    def close(self):
        self.device.attach(None)
        self.dma.close()


class LocalClient:
    """The vfio-user client calls devices.virtio.driver makes, straight into the device."""

    def __init__(self, host: LocalHost):
        self.host, self.device = host, host.device

    def region_read(self, region, offset, count):
        return self.device.region_read(region, offset, count)

    def region_write(self, region, offset, data, *, no_reply=False):
        self.device.region_write(region, offset, bytes(data))

    def dma_map(self, iova, size, *, fd=None, offset=0, flags=P.DMA_MAP_FLAG_READ | P.DMA_MAP_FLAG_WRITE,
                memory=None):
        if fd is not None:
            fd = os.dup(fd)
        else:
            self.host.messages[iova] = memory
        self.host.dma.map(iova, size, flags, fd, offset)

    def dma_unmap(self, iova=0, size=0, *, unmap_all=False):
        self.host.dma.unmap_all()
        self.host.messages.clear()

    def enable_irq_eventfds(self, index, fds, start=0):
        assert index == IRQ_MSIX and start == 0
        self.host.eventfds = list(fds)

    def reset(self):
        self.device.reset()


def make_disk(path: Path, size: int = DISK_SIZE, read_only: bool = False) -> int:
    data = bytes(range(256)) * (size // 256)
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY if read_only else os.O_RDWR)


@pytest.fixture
def disk_path(tmp_path):
    return tmp_path / "disk.img"


@pytest.fixture
def local(disk_path):
    """(device, driver) in process: a VirtioBlk on a 4 MiB image, brought up as Linux does."""
    made = []

    def start(read_only=False, shared=True, **driver_options):
        fd = make_disk(disk_path, read_only=read_only)
        device = VirtioBlk(Disk(fd))
        host = LocalHost(device)
        ram = GuestRam(8 << 20, shared=shared)
        driver = BlockDriver(LocalClient(host), ram, **driver_options)
        made.append((fd, host, ram, driver))
        return device, driver
    yield start
    for fd, host, ram, driver in made:
        driver.close()
        host.close()
        ram.close()
        os.close(fd)


# --- the ring -----------------------------------------------------------------------------------

class FlatMemory:
    """Guest memory as one bytearray at IOVA 0 (what the ring code sees, no DMA space)."""

    def __init__(self, size=1 << 16):
        self.data = bytearray(size)

    def read(self, iova, length):
        if iova < 0 or iova + length > len(self.data):
            raise DeviceError("unmapped", 14)
        return bytes(self.data[iova:iova + length])

    def write(self, iova, data):
        if iova < 0 or iova + len(data) > len(self.data):
            raise DeviceError("unmapped", 14)
        self.data[iova:iova + len(data)] = data

    def views(self, segments, writable):
        return None


def ring(size=8, indirect=True):
    queue = SplitQueue(0, size)
    queue.desc, queue.avail, queue.used = 0x1000, 0x2000, 0x3000
    queue.enabled, queue.indirect = True, indirect
    return queue, FlatMemory()


def put_desc(memory, table, index, addr, length, flags, next_index=0):
    memory.write(table + 16 * index, DESC.pack(addr, length, flags, next_index))


def make_available(queue, memory, *heads):
    for head in heads:
        idx = struct.unpack_from("<H", memory.data, queue.avail + 2)[0]
        memory.write(queue.avail + 4 + 2 * (idx % queue.size), struct.pack("<H", head))
        memory.write(queue.avail + 2, struct.pack("<H", (idx + 1) & 0xFFFF))


def test_a_chain_splits_into_readable_then_writable_buffers():
    queue, memory = ring()
    put_desc(memory, queue.desc, 0, 0x5000, 16, DESC_F_NEXT, 3)
    put_desc(memory, queue.desc, 3, 0x6000, 512, DESC_F_NEXT | DESC_F_WRITE, 5)
    put_desc(memory, queue.desc, 5, 0x7000, 1, DESC_F_WRITE)
    make_available(queue, memory, 0)
    assert queue.pending(memory) == 1
    chain = queue.pop(memory)
    assert (chain.head, chain.readable, chain.writable) == (0, [(0x5000, 16)], [(0x6000, 512), (0x7000, 1)])
    queue.push(memory, chain.head, 513)
    assert queue.publish(memory)                     # no EVENT_IDX, no NO_INTERRUPT: interrupt
    assert struct.unpack_from("<HHII", memory.data, queue.used) == (0, 1, 0, 513)


def test_an_indirect_table_is_read_in_one_piece():
    queue, memory = ring()
    for i in range(3):
        put_desc(memory, 0x8000, i, 0x9000 + 0x100 * i, 0x100, (DESC_F_WRITE if i else 0) | (DESC_F_NEXT if i < 2 else 0),
                 i + 1)
    put_desc(memory, queue.desc, 2, 0x8000, 48, DESC_F_INDIRECT)
    make_available(queue, memory, 2)
    chain = queue.pop(memory)
    assert chain.readable == [(0x9000, 0x100)] and chain.writable == [(0x9100, 0x100), (0x9200, 0x100)]


@pytest.mark.parametrize("case, message", [
    ("loop", "longer than 8 descriptors"),
    ("head", "outside the ring"),
    ("next", "outside the ring"),
    ("nested", "inside an indirect table"),
    ("indirect-not-negotiated", "was not negotiated"),
    ("indirect-with-next", "the chain's only one"),
    ("indirect-size", "multiple of 16"),
    ("readable-after-writable", "after a writable one"),
    ("runaway", "made 9 buffers available"),
    ("unmapped", "cannot read ring memory"),
])
def test_a_broken_ring_is_the_drivers_fault_never_a_crash(case, message):
    queue, memory = ring(indirect=case != "indirect-not-negotiated")
    table = queue.desc
    head = 0
    if case == "loop":
        put_desc(memory, table, 0, 0x5000, 16, DESC_F_NEXT, 1)
        put_desc(memory, table, 1, 0x5000, 16, DESC_F_NEXT, 0)
    elif case == "head":
        head = 8
    elif case == "next":
        put_desc(memory, table, 0, 0x5000, 16, DESC_F_NEXT, 8)
    elif case == "nested":
        put_desc(memory, table, 0, 0x8000, 16, DESC_F_INDIRECT)
        put_desc(memory, 0x8000, 0, 0x8000, 16, DESC_F_INDIRECT)
    elif case in ("indirect-not-negotiated", "indirect-size"):
        put_desc(memory, table, 0, 0x8000, 17 if case == "indirect-size" else 16, DESC_F_INDIRECT)
    elif case == "indirect-with-next":
        put_desc(memory, table, 0, 0x8000, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    elif case == "readable-after-writable":
        put_desc(memory, table, 0, 0x5000, 16, DESC_F_WRITE | DESC_F_NEXT, 1)
        put_desc(memory, table, 1, 0x5000, 16, 0)
    elif case == "runaway":
        memory.write(queue.avail + 2, struct.pack("<H", 9))
    elif case == "unmapped":
        queue.desc = 1 << 40
    if case != "runaway":
        make_available(queue, memory, head)
    with pytest.raises(QueueError, match=message):
        queue.pop(memory) if queue.pending(memory) else None


def test_event_idx_interrupts_only_when_the_driver_asked():
    assert need_event(0, 1, 0) and not need_event(5, 3, 2) and need_event(0xFFFF, 0, 0xFFFF)
    queue, memory = ring()
    queue.event_idx = True
    for head in range(3):
        put_desc(memory, queue.desc, head, 0x5000, 1, DESC_F_WRITE)
    make_available(queue, memory, 0, 1, 2)
    memory.write(queue.avail + 4 + 2 * queue.size, struct.pack("<H", 2))     # used_event: after the 3rd
    for expected in (False, False, True):
        queue.push(memory, queue.pop(memory).head, 1)
        assert queue.publish(memory) is expected
    queue.ask_for_notification(memory)
    assert struct.unpack_from("<H", memory.data, queue.used + 4 + 8 * queue.size)[0] == 3


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=st.binary(min_size=16 * 8, max_size=16 * 8), indirect=st.binary(max_size=16 * 20),
       heads=st.lists(st.integers(0, 12), min_size=1, max_size=4), negotiated=st.booleans())
def test_any_descriptor_table_yields_a_bounded_chain_or_a_queue_error(table, indirect, heads, negotiated):
    queue, memory = ring(indirect=negotiated)
    memory.write(queue.desc, table)
    memory.write(0x8000, indirect)
    # point every indirect descriptor at the fuzzed indirect table
    for index in range(8):
        addr, length, flags, nxt = DESC.unpack_from(memory.data, queue.desc + 16 * index)
        if flags & DESC_F_INDIRECT:
            put_desc(memory, queue.desc, index, 0x8000, length % (len(indirect) + 1), flags, nxt)
    make_available(queue, memory, *heads)
    for _ in heads:
        try:
            chain = queue.pop(memory)
        except QueueError:
            continue
        assert len(chain.readable) + len(chain.writable) <= max(queue.size, MAX_INDIRECT)


# --- the device in process ----------------------------------------------------------------------

def test_linux_bring_up_offers_what_the_image_allows(local):
    device, driver = local()
    features = driver.features
    assert features & V.F_VERSION_1 and features & V.F_EVENT_IDX and features & V.F_INDIRECT_DESC
    assert features & F_WRITE_ZEROES and not features & F_RO
    assert driver.capacity == DISK_SIZE // SECTOR
    assert device.config.get(0, 4) == 0x10421AF4 and device.config.get(0x08, 1) == 1    # modern, revision 1
    assert driver.virtio.status == V.S_ACKNOWLEDGE | V.S_DRIVER | V.S_FEATURES_OK | V.S_DRIVER_OK


@pytest.mark.parametrize("shared, indirect", [(True, False), (True, True), (False, False)])
def test_reads_and_writes_reach_the_image(local, disk_path, shared, indirect):
    device, driver = local(shared=shared, indirect=indirect)
    status, data = driver.read(3, 8)
    assert status == S_OK and data == disk_path.read_bytes()[3 * SECTOR:11 * SECTOR]
    payload = os.urandom(3 * SECTOR)
    assert driver.write(100, payload) == S_OK
    assert disk_path.read_bytes()[100 * SECTOR:103 * SECTOR] == payload
    assert driver.flush() == S_OK
    assert driver.get_id() == (S_OK, b"jailer-virtio-blk".ljust(20, b"\0"))


def test_discard_and_write_zeroes_leave_zeroes(local, disk_path):
    device, driver = local()
    if driver.features & F_DISCARD:
        assert driver.discard(8, 8) == S_OK
        assert disk_path.read_bytes()[8 * SECTOR:16 * SECTOR] == bytes(8 * SECTOR)
    for unmap in (False, True):
        assert driver.write_zeroes(32, 16, unmap) == S_OK
        assert disk_path.read_bytes()[32 * SECTOR:48 * SECTOR] == bytes(16 * SECTOR)
    assert os.path.getsize(disk_path) == DISK_SIZE


@pytest.mark.parametrize("request_, expected", [
    ("past-the-end", S_IOERR),
    ("straddling-the-end", S_IOERR),
    ("not-whole-sectors", S_IOERR),
    ("unknown-type", S_UNSUPP),
    ("short-header", S_UNSUPP),
    ("unmapped-buffer", S_IOERR),
    ("huge-sector", S_IOERR),
])
def test_bad_requests_get_an_error_status_and_change_nothing(local, disk_path, request_, expected):
    device, driver = local()
    before = disk_path.read_bytes()
    buffer = driver.ram.alloc(4096, 4096)
    capacity = driver.capacity
    if request_ == "past-the-end":
        status, _ = driver.run(T_OUT, capacity, [(buffer, SECTOR, False)])
    elif request_ == "straddling-the-end":
        status, _ = driver.run(T_OUT, capacity - 1, [(buffer, 2 * SECTOR, False)])
    elif request_ == "not-whole-sectors":
        status, _ = driver.run(T_OUT, 0, [(buffer, 100, False)])
    elif request_ == "unknown-type":
        status, _ = driver.run(0x7777, 0, [(buffer, SECTOR, False)])
    elif request_ == "huge-sector":
        status, _ = driver.run(T_IN, (1 << 64) - 1, [(buffer, SECTOR, True)])
    elif request_ == "unmapped-buffer":
        status, _ = driver.run(T_OUT, 0, [(1 << 45, SECTOR, False)])
    else:
        status_byte = driver.ram.alloc(1)
        driver.ram.write(status_byte, b"\xff")
        head = driver.queue.add([(driver.header, 8, False), (status_byte, 1, True)])
        driver.virtio.notify(driver.queue)
        assert [h for h, _ in driver.virtio.wait_used(driver.queue, 1)] == [head]
        status = driver.ram.read(status_byte, 1)[0]
    assert status == expected
    assert disk_path.read_bytes() == before
    assert driver.read(0, 1)[0] == S_OK                     # and it serves on


def test_a_read_only_image_refuses_writes_and_stays_unchanged(local, disk_path):
    device, driver = local(read_only=True)
    before = disk_path.read_bytes()
    assert driver.features & F_RO and not driver.features & (F_WRITE_ZEROES | F_DISCARD)
    assert driver.write(0, bytes(SECTOR)) == S_IOERR
    assert driver.write_zeroes(0, 8) == S_IOERR
    assert driver.read(0, 8) == (S_OK, before[:8 * SECTOR])
    assert disk_path.read_bytes() == before


def test_a_descriptor_loop_asks_for_a_reset_and_a_reset_recovers(local):
    device, driver = local()
    queue = driver.queue
    slot = queue.free.pop(0)
    driver.ram.write(queue.desc + 16 * slot, DESC.pack(driver.header, 16, DESC_F_NEXT, slot))
    driver.ram.write(queue.avail + 4 + 2 * (queue.avail_idx % queue.size), struct.pack("<H", slot))
    queue.avail_idx += 1
    driver.ram.write(queue.avail + 2, struct.pack("<H", queue.avail_idx))
    driver.virtio.notify(queue)
    assert driver.virtio.status & V.S_NEEDS_RESET
    assert os.eventfd_read(driver.virtio.eventfds[0]) == 1      # the config vector told the driver
    again = BlockDriver(driver.virtio.client, driver.ram)       # a driver resets and starts over
    assert again.read(0, 1)[0] == S_OK
    again.close()


def test_refused_features_leave_features_ok_clear(local):
    device, driver = local()
    virtio = driver.virtio
    virtio.reset()
    virtio.set_status(V.S_ACKNOWLEDGE | V.S_DRIVER)
    virtio._common(V.C_GFSELECT, 4, 0)
    virtio._common(V.C_GF, 4, 1 << 20)          # not offered, and no VERSION_1
    virtio.set_status(V.S_ACKNOWLEDGE | V.S_DRIVER | V.S_FEATURES_OK)
    assert not virtio.status & V.S_FEATURES_OK


def test_intx_and_the_isr_when_msix_is_off(local):
    device, driver = local()
    host = driver.virtio.client.host
    offset = driver.virtio.caps["msix"][0] + 2
    device.region_write(CONFIG, offset, b"\0\0")                 # MSI-X off: INTx and the ISR
    head = driver.submit(T_FLUSH, 0, [])
    driver.virtio.notify(driver.queue)
    assert host.intx and driver.virtio.isr() == V.ISR_QUEUE
    assert not host.intx and driver.virtio.isr() == 0           # reading the ISR cleared it
    assert [h for h, _ in driver.queue.take_used()] == [head]


def test_the_pci_config_access_window_reaches_the_bar(local):
    device, driver = local()
    cap = device._pci_cfg
    device.region_write(CONFIG, cap + 4, bytes([V.VIRTIO_BAR]))
    device.region_write(CONFIG, cap + 8, struct.pack("<II", V.DEVICE_OFFSET, 4))
    assert device.region_read(CONFIG, cap + 16, 4) == struct.pack("<I", (DISK_SIZE // SECTOR) & 0xFFFFFFFF)


def test_state_moves_to_a_new_device_mid_stream_and_a_foreign_state_is_refused(local, disk_path, tmp_path):
    device, driver = local()
    driver.write(0, b"x" * SECTOR)
    state = device.save_state()
    fd = os.open(disk_path, os.O_RDWR)
    try:
        twin = VirtioBlk(Disk(fd))
        twin.load_state(state, twin.abi_version)
        assert twin.save_state() == state
        assert twin.queues[0].last_avail == device.queues[0].last_avail > 0
        host = LocalHost(twin)
        driver.virtio.client = LocalClient(host)               # the same guest, a new device
        host.dma.map(driver.ram.iova, driver.ram.size, P.DMA_MAP_FLAG_READ | P.DMA_MAP_FLAG_WRITE,
                     os.dup(driver.ram.fd))
        host.eventfds = driver.virtio.eventfds
        assert driver.read(0, 1) == (S_OK, b"x" * SECTOR)       # its queue position came along
        host.dma.close()
        broken = bytearray(state)
        broken[0:4] = b"NOPE"
        with pytest.raises(DeviceError, match="bad magic"):
            twin.load_state(bytes(broken), twin.abi_version)
        with pytest.raises(DeviceError, match="ABI version 2"):
            twin.load_state(state, 2)
        kind, version, _ = unwrap_state(wrap_state(twin.device_type, twin.abi_version, state))
        assert (kind, version) == ("virtio-blk", 1)
    finally:
        os.close(fd)


# --- hostile guests, fuzzed ----------------------------------------------------------------------

descriptor = st.tuples(st.sampled_from(["header", "data", "status", "wild", "indirect"]),
                       st.integers(0, 9000), st.sampled_from([0, DESC_F_WRITE]), st.integers(0, 300))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from([T_IN, T_OUT, T_FLUSH, 8, 11, 13, 3, 0xFFFFFFFF]),
       sector=st.one_of(st.integers(0, DISK_SIZE // SECTOR + 4), st.integers(0, (1 << 64) - 1)),
       chain=st.lists(descriptor, min_size=1, max_size=6), link=st.booleans(), data=st.binary(max_size=64))
def test_fuzzed_requests_never_crash_the_device_or_touch_anything_but_the_image(local, disk_path, kind, sector,
                                                                                 chain, link, data):
    device, driver = local()
    ram, queue = driver.ram, driver.queue
    ram.write(driver.header, HEADER.pack(kind, 0, sector))
    buffer = ram.alloc(16384, 4096)
    ram.write(buffer, data)
    places = {"header": driver.header, "data": buffer, "status": driver.status, "wild": 1 << 44,
              "indirect": buffer}
    slots = list(range(len(chain)))
    for position, (place, length, flags, next_index) in enumerate(chain):
        nxt = next_index if link else (position + 1 if position + 1 < len(chain) else 0)
        more = DESC_F_NEXT if (link or position + 1 < len(chain)) else 0
        extra = DESC_F_INDIRECT if place == "indirect" else 0
        ram.write(queue.desc + 16 * slots[position], DESC.pack(places[place], length, flags | more | extra, nxt))
    ram.write(queue.avail + 4 + 2 * (queue.avail_idx % queue.size), struct.pack("<H", 0))
    queue.avail_idx += 1
    ram.write(queue.avail + 2, struct.pack("<H", queue.avail_idx))
    driver.virtio.notify(queue)
    assert os.path.getsize(disk_path) == DISK_SIZE
    status = driver.virtio.status
    assert status & V.S_DRIVER_OK
    if not status & V.S_NEEDS_RESET:
        assert device.queues[0].used_idx == queue.avail_idx     # answered, not dropped
    again = BlockDriver(driver.virtio.client, ram)              # whatever happened, a reset serves again
    assert again.read(0, 1)[0] == S_OK
    again.close()


# --- over vfio-user: bare and jailed ------------------------------------------------------------------

def _walk(sock: str, terminate):
    report = exercise(sock, terminate=terminate, strict=False, timeout=5.0)
    failed = [f"{step.name}: {step.detail}" for step in report.steps if not step.ok]
    assert not failed, failed
    assert "virtio-blk" in [step.name for step in report.steps]
    return report


def test_the_learning_walk_with_a_guest_drivers_walk_passes_bare(tmp_path):
    image = tmp_path / "walk.img"
    fd = make_disk(image)
    sock = str(tmp_path / "blk.sock")
    device = subprocess.Popen([sys.executable, "-m", "devices.virtio_blk", "--socket-path", sock, f"--disk-fd={fd}"],
                              pass_fds=[fd], cwd=ROOT, stderr=subprocess.DEVNULL)
    os.close(fd)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert device.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)

        def terminate():
            device.terminate()
            return device.wait(10)
        _walk(sock, terminate)
    finally:
        if device.poll() is None:
            device.kill()
            device.wait()


def test_a_disk_fd_that_is_not_a_disk_is_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "devices.virtio_blk", "--socket-path", str(tmp_path / "s"),
                             "--disk-fd=0"], stdin=subprocess.PIPE, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "virtio-blk: --disk-fd=0: disk fd 0 is neither a regular file nor a block device"]


def _image_for(invocation, scratch) -> Path:
    image = scratch / "disk.img"
    image.write_bytes(bytes(range(256)) * (DISK_SIZE // 256))
    image.chmod(0o600)          # the caller's file: jailer opens it before the sandbox's identity applies
    if invocation == "user" and os.geteuid() == 0:
        os.chown(image, 65534, 65534)
    return image


@pytest.mark.parametrize("read_only", [False, True], ids=["read-write", "read-only"])
@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_the_jailed_device_serves_a_guest_drivers_walk(invocation, read_only, scratch, jailed):
    image = _image_for(invocation, scratch)
    before = image.read_bytes()
    sock = str(scratch / "blk.sock")
    device = jailed(invocation, scratch, "--socket-path", sock, "--disk", str(image),
                    *(["--read-only"] if read_only else []), profile=_readable_profile(invocation, scratch))
    device.connect(sock).close()
    _walk(sock, device.stop)
    refused = [event for event in device.events() if event["event"] == "seccomp"]
    assert not refused, refused
    assert device.code == 0, device.errors()
    if read_only:
        assert image.read_bytes() == before


def _readable_profile(invocation, scratch) -> Path:
    if invocation != "user":
        return PROFILE
    copy = scratch / "virtio-blk.toml"
    copy.write_text(PROFILE.read_text())
    copy.chmod(0o644)
    return copy


def test_a_missing_disk_is_a_usage_error_naming_the_option(scratch, jailed):
    device = jailed("root" if os.geteuid() == 0 else "user", scratch, "--socket-path", str(scratch / "s.sock"),
                    profile=_readable_profile("user", scratch))
    assert device.proc.wait(10) == 2
    assert "--file disk=PATH (--disk PATH for 'disk')" in device.errors()


def test_the_sandbox_holds_no_path_to_the_image(scratch, jailed):
    """The device sees its image only as fd 4; the path is nowhere in its mount namespace."""
    if os.geteuid() != 0:
        pytest.skip("needs root to look into the sandbox")
    image = _image_for("root", scratch)
    sock = str(scratch / "blk.sock")
    device = jailed("root", scratch, "--socket-path", sock, "--disk", str(image), profile=PROFILE)
    device.connect(sock).close()
    pid = _device_pid(device)
    assert os.readlink(f"/proc/{pid}/fd/4") == str(image)       # the host's name of what it holds
    mounts = Path(f"/proc/{pid}/mountinfo").read_text()
    assert str(scratch) not in mounts and "disk.img" not in mounts
    assert device.stop() == 0


def _device_pid(device) -> int:
    for pid in _descendants(device.proc.pid):
        try:
            if b"devices.virtio_blk" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            pass
    raise AssertionError("no device process")


def _descendants(root: int) -> list[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending += children.get(pid, [])
    return found



def _bare_device(tmp_path: Path, name: str, image: Path):
    fd = os.open(image, os.O_RDWR)
    sock = str(tmp_path / f"{name}.sock")
    device = subprocess.Popen([sys.executable, "-m", "devices.virtio_blk", "--socket-path", sock, f"--disk-fd={fd}"],
                              pass_fds=[fd], cwd=ROOT, stderr=subprocess.DEVNULL)
    os.close(fd)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        assert device.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    return device, sock


def test_live_migration_carries_the_queues_and_the_destination_serves_what_the_source_left(tmp_path):
    """Both devices serve the same image (shared storage) and the same guest RAM: the source
    stops with a read made available but never notified; the destination, once RUNNING,
    finds it on the ring and completes it, and the guest's next request just works."""
    image = tmp_path / "shared.img"
    os.close(make_disk(image))
    source, source_sock = _bare_device(tmp_path, "source", image)
    destination, destination_sock = _bare_device(tmp_path, "destination", image)
    ram = GuestRam(8 << 20)
    try:
        with Client.connect(source_sock) as client:
            driver = BlockDriver(client, ram)
            assert driver.write(0, b"m" * SECTOR) == S_OK
            buffer = ram.alloc(SECTOR, 4096)
            head = driver.submit(T_IN, 0, [(buffer, SECTOR, True)])     # left on the ring
            blob = client.save_device_state()                             # STOP_COPY .. STOP
            with Client.connect(destination_sock) as target:
                with pytest.raises(ClientError):                          # a corrupted stream is refused
                    target.load_device_state(blob[:-1] + bytes([blob[-1] ^ 1]))
                target.reset()
                target.dma_map(ram.iova, ram.size, fd=ram.fd)
                target.enable_irq_eventfds(IRQ_MSIX, driver.virtio.eventfds)
                target.load_device_state(blob)                            # RESUMING .. RUNNING
                assert [h for h, _ in driver.virtio.wait_used(driver.queue, 1)] == [head]
                assert ram.read(buffer, SECTOR) == b"m" * SECTOR
                driver.virtio.client = target
                assert driver.read(0, 1) == (S_OK, b"m" * SECTOR)
                assert driver.write(1, b"n" * SECTOR) == S_OK
        assert image.read_bytes()[SECTOR:2 * SECTOR] == b"n" * SECTOR
    finally:
        ram.close()
        for device in (source, destination):
            device.terminate()
            assert device.wait(10) == 0
