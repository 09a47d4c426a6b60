"""The generic PCI config space: masks, sizing, capabilities, odd-sized accesses."""

import struct

import pytest

from devices.vfio_user.device import BAR0, BAR2, BAR4, CONFIG, ROM, DeviceError, DeviceHost
from devices.vfio_user.pci import (CAP_ID_EXPRESS, CAP_ID_MSI, CAP_ID_MSIX, Bar, ConfigSpace,
                                   PciDevice)


def read32(config, offset):
    return struct.unpack("<I", config.read(offset, 4))[0]


def write32(config, offset, value):
    config.write(offset, struct.pack("<I", value))


def make(**kwargs):
    args = dict(vendor_id=0x1234, device_id=0xABCD, class_code=0x118000, revision=3,
                subsystem_vendor_id=0x5555, subsystem_id=0x6666, interrupt_pin=1)
    return ConfigSpace(**{**args, **kwargs})


def test_identity_registers_are_read_only():
    config = make()
    before = config.read(0, 64)
    for offset in (0x00, 0x08, 0x0E, 0x2C, 0x34, 0x3D):
        write32(config, offset & ~3, 0xFFFFFFFF)
        write32(config, offset & ~3, 0)
    after = config.read(0, 64)
    assert after[0:4] == bytes.fromhex("3412cdab")
    assert after[8:12] == bytes([3, 0x00, 0x80, 0x11])
    assert after[0x2C:0x30] == bytes.fromhex("55556666")
    assert after[0x3D] == 1 and after[0x0E] == 0
    assert before[0:4] == after[0:4] and before[8:12] == after[8:12]


def test_command_keeps_only_writable_bits_and_status_errors_clear_on_one():
    config = make()
    config.write(0x04, b"\xff\xff")
    assert struct.unpack("<H", config.read(0x04, 2))[0] == 0x0507      # IO MEM MASTER SERR INTX_DISABLE
    config.data[0x07] = 0xF9                                              # device latched error bits 8, 11-15
    config.write(0x06, struct.pack("<H", 1 << 13))                        # guest clears master abort only
    assert struct.unpack("<H", config.read(0x06, 2))[0] == 0xD900
    config.write(0x06, b"\xff\xff")
    assert config.read(0x06, 2) == b"\x00\x00"


def test_status_has_no_cap_list_bit_without_capabilities():
    config = make()
    assert config.read(0x06, 2) == b"\x00\x00" and config.read(0x34, 1) == b"\x00"
    assert config.capabilities() == []


@pytest.mark.parametrize("bar, type_bits", [
    (Bar(0x100, "io"), 0x1),
    (Bar(0x1000, "mem32"), 0x0),
    (Bar(0x1000, "mem32", prefetchable=True), 0x8),
])
def test_32bit_bar_sizing_returns_size_mask(bar, type_bits):
    config = make(bars={BAR2: bar})
    assert read32(config, 0x18) == type_bits
    write32(config, 0x18, 0xFFFFFFFF)
    assert read32(config, 0x18) == (~(bar.size - 1) & 0xFFFFFFFF) | type_bits
    write32(config, 0x18, 0xC000)
    assert read32(config, 0x18) == 0xC000 | type_bits
    for unused in (0x10, 0x14, 0x1C, 0x20, 0x24):
        write32(config, unused, 0xFFFFFFFF)
        assert read32(config, unused) == 0


def test_64bit_prefetchable_bar_sizes_over_both_registers():
    config = make(bars={BAR4: Bar(1 << 33, "mem64", prefetchable=True)})
    assert read32(config, 0x20) == 0xC
    write32(config, 0x20, 0xFFFFFFFF)
    write32(config, 0x24, 0xFFFFFFFF)
    assert read32(config, 0x20) == 0xC and read32(config, 0x24) == 0xFFFFFFFE
    config.write(0x20, struct.pack("<Q", 0x0000_0004_0000_0000))
    assert struct.unpack("<Q", config.read(0x20, 8))[0] == 0x0000_0004_0000_000C


@pytest.mark.parametrize("bad", [
    lambda: Bar(0x300, "io"),
    lambda: Bar(2, "io"),
    lambda: Bar(8, "mem32"),
    lambda: Bar(0x100, "io", prefetchable=True),
    lambda: Bar(0x100, "rom"),
    lambda: make(bars={5: Bar(0x1000, "mem64")}),
    lambda: make(bars={0: Bar(0x1000, "mem64"), 1: Bar(0x100, "io")}),
    lambda: make(rom_size=0x1000 + 1),
    lambda: make(interrupt_pin=5),
    lambda: make(size=512),
])
def test_invalid_layouts_are_refused(bad):
    with pytest.raises(ValueError):
        bad()


def test_absent_rom_reads_zero_after_qemu_sizing_write():
    config = make()
    for probe in (0xFFFFF800, 0xFFFFFFFE, 0xFFFFFFFF):
        write32(config, 0x30, probe)
        assert read32(config, 0x30) == 0


def test_present_rom_sizes_and_keeps_enable_bit():
    config = make(rom_size=0x8000)
    write32(config, 0x30, 0xFFFFF800)
    assert read32(config, 0x30) == 0xFFFF8000
    write32(config, 0x30, 0xFEB00001)
    assert read32(config, 0x30) == 0xFEB00001


def test_interrupt_line_and_latency_are_writable_bytes():
    config = make()
    write32(config, 0x3C, 0xFFFFFFFF)
    assert config.read(0x3C, 4) == bytes([0xFF, 0x01, 0, 0])
    config.write(0x0C, b"\x10\x40")
    assert config.read(0x0C, 2) == b"\x10\x40"


def test_unaligned_and_straddling_accesses_apply_byte_masks():
    config = make(bars={BAR0: Bar(0x1000, "mem32")})
    config.write(0x03, b"\xff\xff\xff")                # device id high byte, COMMAND low byte + high byte
    assert config.read(0x02, 4) == bytes([0xCD, 0xAB, 0x07, 0x05])
    config.write(0x0F, b"\xff\xff\xff\xff\xff")        # BIST, then BAR0 bytes 0-3
    assert config.read(0x0F, 5) == b"\x00\x00\xf0\xff\xff"
    assert config.read(0x05, 3) == bytes([0x05, 0, 0])  # odd offset, odd length
    config.write(0x3B, struct.pack("<Q", 0xFFFFFFFFFFFFFFFF))   # 8 bytes across the header end
    assert config.read(0x3C, 2) == b"\xff\x01"


def test_accesses_outside_config_space_are_refused():
    config = make()
    with pytest.raises(DeviceError):
        config.read(0xFE, 4)
    with pytest.raises(DeviceError):
        config.write(0x100, b"\x00")
    assert config.read(0x100, 0) == b""


def test_capability_chain_msi_msix_express():
    config = make(bars={BAR0: Bar(0x4000, "mem32")}, size=4096)
    msi = config.add_msi(4, address_64=True, per_vector_mask=True)
    msix = config.add_msix(8, BAR0, 0x2000, BAR0, 0x3000)
    express = config.add_express()
    assert config.capabilities() == [(msi, CAP_ID_MSI), (msix, CAP_ID_MSIX), (express, CAP_ID_EXPRESS)]
    assert config.read(0x06, 2)[0] & 0x10 and config.read(0x34, 1)[0] == msi == 0x40
    assert msix == 0x58 and express == 0x64 and express + 0x3C <= 0x100

    flags = struct.unpack("<H", config.read(msi + 2, 2))[0]
    assert flags == (2 << 1) | 0x80 | 0x100                        # MMC=4 vectors, 64-bit, per-vector mask
    config.write(msi + 2, b"\xff\xff")
    assert struct.unpack("<H", config.read(msi + 2, 2))[0] == flags | 0x71
    write32(config, msi + 4, 0xFEE00003)
    assert read32(config, msi + 4) == 0xFEE00000
    write32(config, msi + 0x10, 0xFFFFFFFF)                       # mask bits: one per vector
    assert read32(config, msi + 0x10) == 0xF

    assert config.read(msix + 2, 10) == struct.pack("<HII", 7, 0x2000, 0x3000)
    config.write(msix + 3, b"\xff")                                 # 1-byte write to the flags' high byte
    assert struct.unpack("<H", config.read(msix + 2, 2))[0] == 0xC007
    config.write(msix + 4, b"\xff" * 8)                            # table/PBA offsets are read-only
    assert config.read(msix + 4, 8) == struct.pack("<II", 0x2000, 0x3000)

    assert config.read(express + 2, 2) == b"\x02\x00"             # version 2, endpoint
    config.write(express + 8, b"\xff\xff\xff\xff")                  # device control + status
    assert struct.unpack("<HH", config.read(express + 8, 4)) == (0x79FF, 0)
    config.data[express + 0xA] = 0x05                              # device reports errors
    config.write(express + 0xA, b"\x01")
    assert config.read(express + 0xA, 1) == b"\x04"


def test_capability_builders_validate():
    config = make(bars={BAR0: Bar(0x1000, "mem32"), BAR2: Bar(0x100, "io")})
    with pytest.raises(ValueError):
        config.add_msi(3)
    with pytest.raises(ValueError):
        config.add_msix(8, BAR2, 0, BAR2, 0x80)                   # I/O BAR
    with pytest.raises(ValueError):
        config.add_msix(256, BAR0, 0, BAR0, 0x800)                # PBA inside the table
    with pytest.raises(ValueError):
        config.add_msix(512, BAR0, 0, BAR0, 0x800)                # table runs past the BAR


def test_reset_and_snapshot_restore():
    config = make(bars={BAR2: Bar(0x100, "io")})
    write32(config, 0x18, 0xC001)
    config.write(0x04, b"\x01\x00")
    saved = config.snapshot()
    config.reset()
    assert read32(config, 0x18) == 0x1 and config.read(0x04, 2) == b"\x00\x00"
    config.restore(saved)
    assert read32(config, 0x18) == 0xC001 and config.read(0x04, 2) == b"\x01\x00"
    other = make(device_id=0x1111, bars={BAR2: Bar(0x100, "io")}).snapshot()
    with pytest.raises(DeviceError, match="read-only byte 0x2"):
        config.restore(other)
    with pytest.raises(DeviceError, match="bytes"):
        config.restore(saved[:-1])


class RecordingHost(DeviceHost):
    """A device's view of a vfio-user server, reduced to the INTx levels it was told."""

    def __init__(self):
        self.levels = []

    @property
    def asserted(self):
        return bool(self.levels) and self.levels[-1]

    def set_intx(self, asserted):
        self.levels.append(asserted)

    def signal_irq(self, index, vector):
        raise AssertionError("only INTx expected")

    def dma_read(self, iova, length):
        raise AssertionError("no DMA expected")

    def dma_write(self, iova, data):
        raise AssertionError("no DMA expected")


class Scratch(PciDevice):
    """A minimal function: a 16-byte memory BAR of plain storage, INTx, and a ROM."""

    device_type = "scratch"
    rom = b"\x55\xaa" + bytes(14)

    def __init__(self):
        self.config = make(bars={BAR0: Bar(16, "mem32")}, rom_size=2048)
        self.storage = bytearray(16)

    def bar_read(self, index, offset, count):
        return bytes(self.storage[offset:offset + count])

    def bar_write(self, index, offset, data):
        self.storage[offset:offset + len(data)] = data

    def reset(self):
        self.reset_config()

    def save_state(self):
        return self.config.snapshot()

    def load_state(self, data, abi_version):
        self.config.restore(data)


def test_pci_device_regions_and_dispatch():
    device = Scratch()
    assert {index: region.size for index, region in device.regions().items()} == {CONFIG: 256, BAR0: 16, ROM: 2048}
    assert not device.regions()[ROM].writable
    assert [device.irq_count(i) for i in range(5)] == [1, 0, 0, 1, 1]
    device.region_write(BAR0, 4, b"abcd")
    assert device.region_read(BAR0, 3, 6) == b"\x00abcd\x00"
    assert device.region_read(ROM, 0, 4) == b"\x55\xaa\x00\x00"
    assert device.region_read(ROM, 2044, 4) == b"\xff" * 4
    assert device.region_read(CONFIG, 0, 2) == b"\x34\x12"
    for bad in (lambda: device.region_read(BAR0, 15, 2), lambda: device.region_read(BAR2, 0, 1),
                lambda: device.region_write(ROM, 0, b"x"), lambda: device.region_read(CONFIG, 256, 1)):
        with pytest.raises(DeviceError):
            bad()


def test_intx_follows_pending_and_intx_disable_and_reattach():
    device = Scratch()
    device.set_intx_pending(True)                    # no host yet: remembered
    host = RecordingHost()
    device.attach(host)
    assert host.levels == [True]
    assert device.region_read(CONFIG, 0x06, 1)[0] & 0x08     # STATUS.INTERRUPT
    device.region_write(CONFIG, 0x05, b"\x04")                # COMMAND.INTX_DISABLE
    assert host.levels == [True, False]
    assert device.region_read(CONFIG, 0x06, 1)[0] & 0x08     # still pending inside the function
    device.region_write(CONFIG, 0x04, b"\x00\x00")
    assert host.levels == [True, False, True]
    device.set_intx_pending(True)                    # unchanged level: not re-signalled
    assert host.levels == [True, False, True]
    device.attach(None)
    device.set_intx_pending(False)
    device.attach(host)
    assert host.levels == [True, False, True, False]
    device.set_intx_pending(True)
    device.reset()
    assert host.levels[-2:] == [True, False]
    assert device.region_read(CONFIG, 0x06, 1) == b"\x00"
