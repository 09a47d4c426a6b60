"""A virtio PCI driver over a vfio-user client: what a guest's driver does, from a host process.

Used by the exerciser (`jailer learn`), the tests and the benchmarks to drive a virtio
device the way Linux's virtio_pci and virtio_blk do: find the vendor capabilities, reset,
negotiate features, set up split queues in "guest RAM" (a memfd DMA-mapped to the device,
or plain memory the client serves through DMA messages), take MSI-X interrupts on
eventfds, and submit descriptor chains. It trusts nothing it reads back from the device
beyond what it checks.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import time

from devices.vfio_user import protocol as P
from devices.vfio_user.device import CONFIG, IRQ_MSIX
from devices.vfio_user.pci import CAPABILITY_POINTER, MSIX_FLAGS_ENABLE

from . import pci as V
from .queue import DESC, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, USED_ELEM

RAM_IOVA = 0x1000_0000


class DriverError(Exception):
    pass


class GuestRam:
    """Memory the device reaches by DMA, with a bump allocator for rings and buffers."""

    def __init__(self, size: int, iova: int = RAM_IOVA, shared: bool = True):
        self.size, self.iova, self.shared = size, iova, shared
        if shared:
            self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
        else:
            self.fd = None
            self.mm = bytearray(size)
        self._next = 0

    def alloc(self, size: int, align: int = 16) -> int:
        start = -(-self._next // align) * align
        if start + size > self.size:
            raise DriverError(f"guest RAM of {self.size} bytes is full")
        self._next = start + size
        return self.iova + start

    def read(self, iova: int, length: int) -> bytes:
        return bytes(self.mm[iova - self.iova:iova - self.iova + length])

    def write(self, iova: int, data: bytes) -> None:
        self.mm[iova - self.iova:iova - self.iova + len(data)] = data

    def close(self) -> None:
        if self.shared:
            self.mm.close()
            os.close(self.fd)


class DriverQueue:
    def __init__(self, ram: GuestRam, index: int, size: int):
        self.index, self.size, self.ram = index, size, ram
        self.desc = ram.alloc(16 * size, 16)
        self.avail = ram.alloc(6 + 2 * size, 2)
        self.used = ram.alloc(6 + 8 * size, 4)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0

    def add(self, buffers, indirect: bool = False) -> int:
        """Make a chain of (iova, length, device_writable) available; returns its head."""
        if indirect:
            table = self.ram.alloc(16 * len(buffers), 16)
            self._fill(table, list(range(len(buffers))), buffers)
            head = self.free.pop(0)
            self.ram.write(self.desc + 16 * head, DESC.pack(table, 16 * len(buffers), DESC_F_INDIRECT, 0))
        else:
            if len(buffers) > len(self.free):
                raise DriverError(f"queue {self.index} has {len(self.free)} free descriptors, "
                                  f"{len(buffers)} needed")
            slots = [self.free.pop(0) for _ in buffers]
            self._fill(self.desc, slots, buffers)
            head = slots[0]
        self.ram.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        return head

    def _fill(self, table: int, slots: list, buffers) -> None:
        for position, (slot, (iova, length, writable)) in enumerate(zip(slots, buffers)):
            last = position == len(buffers) - 1
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            self.ram.write(table + 16 * slot, DESC.pack(iova, length, flags, 0 if last else slots[position + 1]))

    def take_used(self) -> list[tuple[int, int]]:
        """(head, written length) of each chain the device returned since last time."""
        used_idx = struct.unpack("<H", self.ram.read(self.used + 2, 2))[0]
        done = []
        while self.last_used != used_idx:
            slot = self.last_used % self.size
            head, length = USED_ELEM.unpack(self.ram.read(self.used + 4 + 8 * slot, 8))
            done.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
            self._free_chain(head)
        # used_event (EVENT_IDX): interrupt me for the next chain returned after these
        self.ram.write(self.avail + 4 + 2 * self.size, struct.pack("<H", self.last_used))
        return done

    def _free_chain(self, head: int) -> None:
        index = head
        for _ in range(self.size):
            _, _, flags, next_index = DESC.unpack(self.ram.read(self.desc + 16 * index, 16))
            self.free.append(index)
            if flags & DESC_F_INDIRECT or not flags & DESC_F_NEXT:
                return
            index = next_index


class VirtioDriver:
    """Bring a virtio PCI device up through `client` (a devices.vfio_user.client.Client)."""

    def __init__(self, client, ram: GuestRam, *, posted_notify: bool = True):
        self.client, self.ram = client, ram
        self.posted_notify = posted_notify and ram.shared
        flags = P.DMA_MAP_FLAG_READ | P.DMA_MAP_FLAG_WRITE
        if ram.shared:
            client.dma_map(ram.iova, ram.size, fd=ram.fd, flags=flags)
        else:
            client.dma_map(ram.iova, ram.size, flags=flags, memory=ram.mm)
        self.caps = self._find_capabilities()
        self.queues: dict[int, DriverQueue] = {}
        self.eventfds: list[int] = []

    def _find_capabilities(self) -> dict:
        config = self.client.region_read(CONFIG, 0, 256)
        caps, offset, seen = {}, config[CAPABILITY_POINTER], 0
        while offset and seen < 48:
            cap_id = config[offset]
            if cap_id == V.CAP_ID_VENDOR:
                cfg_type, bar = config[offset + 3], config[offset + 4]
                bar_offset, length = struct.unpack_from("<II", config, offset + 8)
                extra = struct.unpack_from("<I", config, offset + 16)[0] if cfg_type == V.CAP_NOTIFY else 0
                caps.setdefault(cfg_type, (bar, bar_offset, length, extra, offset))
            elif cap_id == 0x11:
                caps["msix"] = (offset, (struct.unpack_from("<H", config, offset + 2)[0] & 0x7FF) + 1)
            offset, seen = config[offset + 1], seen + 1
        for needed in (V.CAP_COMMON, V.CAP_NOTIFY, V.CAP_ISR, V.CAP_DEVICE):
            if needed not in caps:
                raise DriverError(f"no virtio capability of type {needed}")
        return caps

    # --- registers ---------------------------------------------------------------------------

    def _common(self, offset: int, width: int, value: int | None = None) -> int | None:
        bar, base = self.caps[V.CAP_COMMON][:2]
        if value is None:
            return int.from_bytes(self.client.region_read(bar, base + offset, width), "little")
        self.client.region_write(bar, base + offset, value.to_bytes(width, "little"))
        return None

    def device_config(self, offset: int, width: int) -> int:
        bar, base = self.caps[V.CAP_DEVICE][:2]
        return int.from_bytes(self.client.region_read(bar, base + offset, width), "little")

    @property
    def status(self) -> int:
        return self._common(V.C_STATUS, 1)

    def set_status(self, value: int) -> None:
        self._common(V.C_STATUS, 1, value)

    def isr(self) -> int:
        bar, base = self.caps[V.CAP_ISR][:2]
        return self.client.region_read(bar, base, 1)[0]

    # --- bring-up ------------------------------------------------------------------------------

    def reset(self) -> None:
        self.set_status(0)
        self.queues = {}

    def device_features(self) -> int:
        features = 0
        for select_ in (0, 1):
            self._common(V.C_DFSELECT, 4, select_)
            features |= self._common(V.C_DF, 4) << (32 * select_)
        return features

    def negotiate(self, wanted: int) -> int:
        """ACKNOWLEDGE, DRIVER, features, FEATURES_OK (checked); returns the features agreed."""
        self.reset()
        self.set_status(V.S_ACKNOWLEDGE)
        self.set_status(V.S_ACKNOWLEDGE | V.S_DRIVER)
        features = self.device_features() & wanted
        for select_ in (0, 1):
            self._common(V.C_GFSELECT, 4, select_)
            self._common(V.C_GF, 4, (features >> (32 * select_)) & 0xFFFFFFFF)
        self.set_status(V.S_ACKNOWLEDGE | V.S_DRIVER | V.S_FEATURES_OK)
        if not self.status & V.S_FEATURES_OK:
            raise DriverError(f"the device refused features {features:#x}")
        return features

    def setup_queue(self, index: int, size: int | None = None, vector: int = V.NO_VECTOR) -> DriverQueue:
        self._common(V.C_QSELECT, 2, index)
        max_size = self._common(V.C_QSIZE, 2)
        if not max_size:
            raise DriverError(f"queue {index} does not exist")
        size = min(size or max_size, max_size)
        queue = DriverQueue(self.ram, index, size)
        self._common(V.C_QSIZE, 2, size)
        for field, address in ((V.C_QDESC, queue.desc), (V.C_QDRIVER, queue.avail), (V.C_QDEVICE, queue.used)):
            self._common(field, 4, address & 0xFFFFFFFF)
            self._common(field + 4, 4, address >> 32)
        self._common(V.C_QVECTOR, 2, vector)
        self._common(V.C_QENABLE, 2, 1)
        self.queues[index] = queue
        return queue

    def enable_msix(self, vectors: int) -> list[int]:
        """Eventfds for the first `vectors` MSI-X vectors, and MSI-X on in config space."""
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]
        self.client.enable_irq_eventfds(IRQ_MSIX, self.eventfds)
        offset = self.caps["msix"][0] + 2
        flags = int.from_bytes(self.client.region_read(CONFIG, offset, 2), "little")
        self.client.region_write(CONFIG, offset, (flags | MSIX_FLAGS_ENABLE).to_bytes(2, "little"))
        self._common(V.C_MSIX_CONFIG, 2, 0)
        return self.eventfds

    def driver_ok(self) -> None:
        self.set_status(self.status | V.S_DRIVER_OK)

    # --- I/O -------------------------------------------------------------------------------------

    def notify(self, queue: DriverQueue) -> None:
        bar, base, _, multiplier, _ = self.caps[V.CAP_NOTIFY]
        self.client.region_write(bar, base + multiplier * queue.index, struct.pack("<H", queue.index),
                                 no_reply=self.posted_notify)

    def wait_used(self, queue: DriverQueue, vector: int | None = None, timeout: float = 5.0) -> list:
        """Chains the device returned, waiting for its interrupt on `vector` if none is there yet
        (an interrupt may be left over from chains taken without waiting)."""
        deadline = time.monotonic() + timeout
        while True:
            done = queue.take_used()
            if done or vector is None:
                return done
            fd = self.eventfds[vector]
            if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
                raise DriverError(f"no interrupt on vector {vector} within {timeout} s")
            os.eventfd_read(fd)

    def close(self) -> None:
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []
