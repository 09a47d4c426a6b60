"""The virtio-blk walk: what a guest's driver does to the device, over one vfio-user client.

The exerciser runs it when the device is a modern virtio block device (1af4:1042), so that
`jailer learn` records every system call serving a guest takes: feature negotiation,
queue set-up, reads and writes (direct and indirect chains, a 1 MiB scatter list, guest
RAM with and without an fd), flush, GET_ID, discard, write zeroes, requests the device
must refuse, a descriptor loop (the device must ask for a reset and keep serving), a
driver reset and a DEVICE_RESET. The walk writes only into the disk it was given.
"""

from __future__ import annotations

import os

from devices.virtio.driver import GuestRam, RAM_IOVA
from devices.virtio.pci import S_NEEDS_RESET
from devices.virtio.queue import DESC, DESC_F_NEXT

from .device import F_DISCARD, F_RO, F_WRITE_ZEROES, S_IOERR, S_OK, S_UNSUPP, SECTOR, T_IN
from .driver import BlockDriver

VIRTIO_BLK_IDS = (0x1AF4, 0x1042)
RAM_SIZE = 8 << 20


class WalkError(AssertionError):
    pass


def check(condition, what: str) -> None:
    if not condition:
        raise WalkError(what)


def walk(client) -> list[str]:
    """Drive the device; returns notes of what it offered. Raises WalkError on a wrong answer."""
    notes = []
    ram = GuestRam(RAM_SIZE)
    try:
        driver = BlockDriver(client, ram)
        try:
            notes.append(f"capacity {driver.capacity} sectors, features {driver.features:#x}")
            _requests(driver, notes)
            _scatter(driver)
            _descriptor_loop(driver)
        finally:
            driver.close()
        client.dma_unmap(unmap_all=True)
    finally:
        ram.close()
    _message_based(client)
    client.reset()
    return notes


def _requests(driver: BlockDriver, notes: list) -> None:
    status, original = driver.read(0, 8)
    check(status == S_OK, f"read of sectors 0-7: status {status}")
    read_only = bool(driver.features & F_RO)
    pattern = os.urandom(8 * SECTOR)
    status = driver.write(0, pattern)
    if read_only:
        check(status == S_IOERR, f"write to a read-only disk: status {status}, expected IOERR")
    else:
        check(status == S_OK, f"write of sectors 0-7: status {status}")
        check(driver.read(0, 8) == (S_OK, pattern), "sectors 0-7 do not read back as written")
        check(driver.write(0, original) == S_OK, "writing sectors 0-7 back failed")
    check(driver.flush() == S_OK, "flush failed")
    status, identity = driver.get_id()
    check(status == S_OK, f"GET_ID: status {status}")
    notes.append(f"serial {identity.rstrip(bytes(1)).decode(errors='replace')!r}")
    if driver.features & F_WRITE_ZEROES:
        last = driver.capacity - 8
        _, kept = driver.read(last, 8)
        check(driver.write_zeroes(last, 8) == S_OK, "write zeroes failed")
        check(driver.read(last, 8) == (S_OK, bytes(8 * SECTOR)), "write zeroes left data behind")
        check(driver.write_zeroes(last, 8, unmap=True) == S_OK, "write zeroes with unmap failed")
        check(driver.write(last, kept) == S_OK, "restoring the last sectors failed")
    if driver.features & F_DISCARD:
        last = driver.capacity - 8
        _, kept = driver.read(last, 8)
        check(driver.discard(last, 8) == S_OK, "discard failed")
        check(driver.write(last, kept) == S_OK, "restoring the discarded sectors failed")
    check(driver.read(driver.capacity, 1)[0] == S_IOERR, "a read past the end was not refused with IOERR")
    check(driver.run(99, 0, [])[0] == S_UNSUPP, "an unknown request type was not refused with UNSUPP")


def _scatter(driver: BlockDriver) -> None:
    """1 MiB in 256 pages out of order, through one indirect descriptor (as Linux sends it)."""
    pages = [driver.ram.alloc(4096, 4096) for _ in range(256)]
    pages.reverse()
    driver.indirect = True
    try:
        status, _ = driver.run(T_IN, 0, [(page, 4096, True) for page in pages])
    finally:
        driver.indirect = False
    check(status == S_OK, f"a 1 MiB scattered read: status {status}")


def _descriptor_loop(driver: BlockDriver) -> None:
    """A chain whose descriptor points at itself: the device must flag DEVICE_NEEDS_RESET,
    not spin, and serve again after the driver resets it."""
    queue = driver.queue
    slot = queue.free.pop(0)
    driver.ram.write(queue.desc + 16 * slot, DESC.pack(driver.header, 16, DESC_F_NEXT, slot))
    driver.ram.write(queue.avail + 4 + 2 * (queue.avail_idx % queue.size), slot.to_bytes(2, "little"))
    queue.avail_idx = (queue.avail_idx + 1) & 0xFFFF
    driver.ram.write(queue.avail + 2, queue.avail_idx.to_bytes(2, "little"))
    driver.virtio.notify(queue)
    check(driver.virtio.status & S_NEEDS_RESET, "a descriptor loop did not set DEVICE_NEEDS_RESET")
    driver.virtio.reset()
    check(driver.virtio.status == 0, "the device status is not 0 after a reset")


def _message_based(client) -> None:
    """Guest RAM without an fd: every ring and data access becomes a DMA_READ/DMA_WRITE."""
    ram = GuestRam(1 << 20, RAM_IOVA, shared=False)
    driver = BlockDriver(client, ram, queue_size=16)
    try:
        status, data = driver.read(0, 8)
        check(status == S_OK, f"a read into message-based guest RAM: status {status}")
        if not driver.features & F_RO:
            check(driver.write(0, data) == S_OK, "a write from message-based guest RAM failed")
    finally:
        driver.close()
        client.dma_unmap(unmap_all=True)
