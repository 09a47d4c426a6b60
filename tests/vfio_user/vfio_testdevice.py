"""A small PCI device for exercising the vfio-user library end to end.

Run as a backend program: python tests/vfio_user/vfio_testdevice.py --socket-path PATH
[--device-type T] [--abi N] (the latter two make incompatible migration peers).

BAR0 (0x1000 bytes, message access only):
    0x000-0x0ff  scratch bytes (read/write)
    0x100 u64    DMA source IOVA        0x108 u64  DMA destination IOVA
    0x110 u32    DMA length             0x114      doorbell: any write copies src -> dst
    0x120        INTx level (byte: nonzero asserts, 0 de-asserts)
    0x124 u32    write n: signal MSI vector n       0x128 u32  MSI-X vector n
    0x12c        write: signal ERR                  0x130      write: signal REQ
    0x140 u32    number of writes to BAR0 so far (read only)
    0x144 u32    number of DMA copies done (read only)
BAR1 (0x1000 bytes): backed by a memfd the client may mmap; region accesses hit it too.
Config space (0x100 bytes): vendor 0x1b36, device 0x0005 at 0, the rest plain bytes.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from devices.vfio_user.device import (  # noqa: E402
    BAR0, BAR1, CONFIG, IRQ_ERR, IRQ_INTX, IRQ_MSI, IRQ_MSIX, IRQ_REQ, Device, DeviceError, Region,
)

BAR_SIZE = 0x1000
IRQ_COUNTS = {IRQ_INTX: 1, IRQ_MSI: 4, IRQ_MSIX: 8, IRQ_ERR: 1, IRQ_REQ: 1}
_STATE = struct.Struct("<QQIII")


class TestDevice(Device):
    __test__ = False         # a device, not a pytest test class
    device_type = "test-device"
    abi_version = 1
    pci_ids = (0x1B36, 0x0005)

    def __init__(self, device_type: str | None = None, abi_version: int | None = None):
        if device_type:
            self.device_type = device_type
        if abi_version is not None:
            self.abi_version = abi_version
        self.config = bytearray(256)
        self.config[0:4] = struct.pack("<HH", *self.pci_ids)
        self.config[0x3D] = 1
        self.memfd = os.memfd_create("testdevice-bar1", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, BAR_SIZE)
        self.bar1 = mmap.mmap(self.memfd, BAR_SIZE)
        self._regions = {
            CONFIG: Region(256),
            BAR0: Region(BAR_SIZE),
            BAR1: Region(BAR_SIZE, mmap_fd=self.memfd),
        }
        self.reset()

    def reset(self) -> None:
        self.scratch = bytearray(0x100)
        self.dma_src = self.dma_dst = self.dma_len = 0
        self.writes = self.copies = 0
        self.intx = False
        if self.host is not None:
            self.host.set_intx(False)

    def regions(self):
        return self._regions

    def irq_count(self, index: int) -> int:
        return IRQ_COUNTS.get(index, 0)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == BAR0 and offset + count <= 0x100:
            return bytes(self.scratch[offset:offset + count])
        if index == CONFIG:
            return bytes(self.config[offset:offset + count])
        if index == BAR1:
            return self.bar1[offset:offset + count]
        regs = struct.pack("<QQIIIIIIIIIIII", self.dma_src, self.dma_dst, self.dma_len, 0, 0, 0,
                           int(self.intx), 0, 0, 0, 0, 0, 0, 0) + struct.pack("<II", self.writes, self.copies)
        block = self.scratch + regs + bytes(BAR_SIZE - 0x100 - len(regs))
        return bytes(block[offset:offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == CONFIG:
            if offset < 4:
                raise DeviceError("vendor/device ids are read-only", errno.EPERM)
            self.config[offset:offset + len(data)] = data
            return
        if index == BAR1:
            self.bar1[offset:offset + len(data)] = data
            return
        self.writes += 1
        if offset + len(data) <= 0x100:
            self.scratch[offset:offset + len(data)] = data
            return
        value = int.from_bytes(data, "little")
        if offset == 0x100:
            self.dma_src = value
        elif offset == 0x108:
            self.dma_dst = value
        elif offset == 0x110:
            self.dma_len = value
        elif offset == 0x114:
            self.host.dma_write(self.dma_dst, self.host.dma_read(self.dma_src, self.dma_len))
            self.copies += 1
        elif offset == 0x120:
            self.intx = bool(value)
            self.host.set_intx(self.intx)
        elif offset in (0x124, 0x128, 0x12C, 0x130):
            index = {0x124: IRQ_MSI, 0x128: IRQ_MSIX, 0x12C: IRQ_ERR, 0x130: IRQ_REQ}[offset]
            self.host.signal_irq(index, value if index in (IRQ_MSI, IRQ_MSIX) else 0)
        else:
            raise DeviceError(f"BAR0 offset {offset:#x} is not writable")

    def save_state(self) -> bytes:
        return (_STATE.pack(self.dma_src, self.dma_dst, self.dma_len, self.writes, self.copies)
                + bytes(self.scratch) + self.bar1[:] + bytes(self.config))

    def load_state(self, data: bytes, abi_version: int) -> None:
        if len(data) != _STATE.size + 0x100 + BAR_SIZE + 256:
            raise DeviceError(f"test-device state has {len(data)} bytes")
        self.dma_src, self.dma_dst, self.dma_len, self.writes, self.copies = _STATE.unpack_from(data)
        pos = _STATE.size
        self.scratch[:] = data[pos:pos + 0x100]
        self.bar1[:] = data[pos + 0x100:pos + 0x100 + BAR_SIZE]
        self.config[:] = data[pos + 0x100 + BAR_SIZE:]


def main(argv=None) -> None:
    from devices.vfio_user.backend import run_backend

    def options(parser):
        parser.add_argument("--device-type", default=None)
        parser.add_argument("--abi", type=int, default=None)

    run_backend(lambda o: TestDevice(o.device_type, o.abi), argv, description="vfio-user test device",
                device_type="test-device", extra_options=options)


if __name__ == "__main__":
    main()
