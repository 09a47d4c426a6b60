"""Block requests through a VirtioDriver: what Linux's virtio_blk puts on the queue."""

from __future__ import annotations

from devices.virtio.driver import DriverQueue, GuestRam, VirtioDriver
from devices.virtio.pci import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1

from .device import (F_BLK_SIZE, F_DISCARD, F_FLUSH, F_RO, F_SEG_MAX, F_TOPOLOGY, F_WRITE_ZEROES, HEADER,
                     SECTOR, SEGMENT, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES)

ALL_FEATURES = (F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH
                | F_TOPOLOGY | F_DISCARD | F_WRITE_ZEROES)


class BlockDriver:
    """A virtio-blk driver with one queue and MSI-X (vector 0: config, vector 1: the queue)."""

    def __init__(self, client, ram: GuestRam, features: int = ALL_FEATURES, queue_size: int | None = None,
                 indirect: bool = False):
        self.virtio = VirtioDriver(client, ram)
        self.ram = ram
        self.features = self.virtio.negotiate(features)
        self.virtio.enable_msix(2)
        self.queue: DriverQueue = self.virtio.setup_queue(0, queue_size, vector=1)
        self.virtio.driver_ok()
        self.capacity = self.virtio.device_config(0, 8)
        self.indirect = indirect and bool(self.features & F_INDIRECT_DESC)
        self.header = ram.alloc(HEADER.size * self.queue.size)
        self.status = ram.alloc(self.queue.size)

    def submit(self, kind: int, sector: int, data: list, slot: int = 0) -> int:
        """Queue one request whose data is [(iova, length, device_writable)]; returns its head."""
        header, status = self.header + HEADER.size * slot, self.status + slot
        self.ram.write(header, HEADER.pack(kind, 0, sector))
        self.ram.write(status, b"\xff")
        chain = [(header, HEADER.size, False), *data, (status, 1, True)]
        return self.queue.add(chain, indirect=self.indirect)

    def run(self, kind: int, sector: int, data: list) -> tuple[int, int]:
        """One request, waited for: (status byte, written length)."""
        head = self.submit(kind, sector, data)
        self.virtio.notify(self.queue)
        done = self.virtio.wait_used(self.queue, 1)
        if [h for h, _ in done] != [head]:
            raise AssertionError(f"expected head {head} back, got {done}")
        return self.ram.read(self.status, 1)[0], done[0][1]

    def read(self, sector: int, count: int) -> tuple[int, bytes]:
        buffer = self.ram.alloc(count * SECTOR, 4096)
        status, _ = self.run(T_IN, sector, [(buffer, count * SECTOR, True)])
        return status, self.ram.read(buffer, count * SECTOR)

    def write(self, sector: int, data: bytes) -> int:
        buffer = self.ram.alloc(len(data), 4096)
        self.ram.write(buffer, data)
        return self.run(T_OUT, sector, [(buffer, len(data), False)])[0]

    def flush(self) -> int:
        return self.run(T_FLUSH, 0, [])[0]

    def get_id(self) -> tuple[int, bytes]:
        buffer = self.ram.alloc(20)
        status, _ = self.run(T_GET_ID, 0, [(buffer, 20, True)])
        return status, self.ram.read(buffer, 20)

    def ranges(self, kind: int, segments: list[tuple[int, int, int]]) -> int:
        """T_DISCARD or T_WRITE_ZEROES over (sector, count, flags) segments."""
        data = b"".join(SEGMENT.pack(*segment) for segment in segments)
        buffer = self.ram.alloc(len(data))
        self.ram.write(buffer, data)
        return self.run(kind, 0, [(buffer, len(data), False)])[0]

    def discard(self, sector: int, count: int) -> int:
        return self.ranges(T_DISCARD, [(sector, count, 0)])

    def write_zeroes(self, sector: int, count: int, unmap: bool = False) -> int:
        return self.ranges(T_WRITE_ZEROES, [(sector, count, int(unmap))])

    def close(self) -> None:
        self.virtio.close()


def config_field(driver: BlockDriver, name: str) -> int:
    offsets = {"capacity": (0, 8), "seg_max": (12, 4), "blk_size": (20, 4), "num_queues": (34, 2),
               "max_discard_sectors": (36, 4), "max_write_zeroes_sectors": (48, 4)}
    offset, width = offsets[name]
    return driver.virtio.device_config(offset, width)
