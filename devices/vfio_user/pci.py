"""A generic PCI type-0 function: config space register file and region dispatch.

QEMU's vfio-user client forwards every guest config write, of any size at any offset,
and only logs a refusal (the write is then silently lost). So config space is a
byte-granular register file: each byte has a write mask and a write-1-to-clear mask,
an access of any length is applied byte by byte, and nothing in range is ever refused.
BAR and ROM sizing fall out of the masks: the address bits below the size are read-only
zeros and the type bits read-only, so writing all-ones reads back the size mask.

`PciDevice` turns a `ConfigSpace` into a vfio-user `Device`: region 7 is config space,
BARs and the ROM map to regions 0-6, and INTx goes through `set_intx_pending` so that
STATUS.INTERRUPT and COMMAND.INTX_DISABLE behave as the PCI spec says.
"""

from __future__ import annotations

import abc
import errno
import struct
from dataclasses import dataclass

from devices.vfio_user.device import (BAR0, BAR5, CONFIG, IRQ_ERR, IRQ_INTX, IRQ_MSI, IRQ_MSIX,
                                      IRQ_REQ, ROM, Device, DeviceError, DeviceHost, Region)

# Type-0 header offsets.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG_IF = 0x09            # class code: prog-if 0x09, subclass 0x0a, base class 0x0b
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR_REGISTERS = 0x10            # six 32-bit registers 0x10..0x27
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
HEADER_END = 0x40               # capabilities live in 0x40..0xff

CONFIG_SIZE = 256               # conventional PCI
CONFIG_SIZE_EXPRESS = 4096      # PCI Express extended config space

# COMMAND bits.
COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_SERR | COMMAND_INTX_DISABLE

# STATUS bits.
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
STATUS_ERRORS_RW1C = (1 << 8) | (0x1F << 11)    # parity, target/master aborts, SERR, parity detected

# BAR low bits.
BAR_IO = 0x1
BAR_MEM_64 = 0x4
BAR_MEM_PREFETCH = 0x8
ROM_ENABLE = 0x1
ROM_ADDRESS_MASK = 0xFFFFF800

# Capability ids.
CAP_ID_MSI = 0x05
CAP_ID_EXPRESS = 0x10
CAP_ID_MSIX = 0x11

# MSI capability flags (at +2).
MSI_FLAGS_ENABLE = 1 << 0
MSI_FLAGS_MME_MASK = 0x7 << 4
MSI_FLAGS_64BIT = 1 << 7
MSI_FLAGS_MASKBIT = 1 << 8

# MSI-X capability flags (at +2).
MSIX_FLAGS_MASKALL = 1 << 14
MSIX_FLAGS_ENABLE = 1 << 15
MSIX_MAX_TABLE_SIZE = 2048

# PCI Express capability (version 2 layout, 0x3c bytes).
EXPRESS_CAP_SIZE = 0x3C
EXPRESS_TYPE_ENDPOINT = 0x0
EXPRESS_TYPE_LEGACY_ENDPOINT = 0x1
EXPRESS_TYPE_INTEGRATED_ENDPOINT = 0x9
EXPRESS_DEVCTL_WRITABLE = 0x79FF    # error enables, relaxed ordering, payload, ext tag, no snoop, read request
EXPRESS_DEVSTA_RW1C = 0x000F        # correctable/non-fatal/fatal/unsupported request detected
EXPRESS_LNKCTL_WRITABLE = 0x00CB    # ASPM, RCB, common clock, extended synch


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class Bar:
    """A base address register: `kind` is "io", "mem32" or "mem64"."""

    size: int
    kind: str = "mem32"
    prefetchable: bool = False

    def __post_init__(self):
        if self.kind not in ("io", "mem32", "mem64"):
            raise ValueError(f"BAR kind must be io, mem32 or mem64, not {self.kind!r}")
        minimum, maximum = {"io": (4, 1 << 16), "mem32": (16, 1 << 31), "mem64": (16, 1 << 63)}[self.kind]
        if not _is_power_of_two(self.size) or not minimum <= self.size <= maximum:
            raise ValueError(f"{self.kind} BAR size {self.size:#x} must be a power of two "
                             f"in [{minimum:#x}, {maximum:#x}] (QEMU asserts power-of-two sizes)")
        if self.prefetchable and self.kind == "io":
            raise ValueError("an I/O BAR cannot be prefetchable")

    @property
    def type_bits(self) -> int:
        if self.kind == "io":
            return BAR_IO
        return (BAR_MEM_64 if self.kind == "mem64" else 0) | (BAR_MEM_PREFETCH if self.prefetchable else 0)

    @property
    def address_mask(self) -> int:
        """Writable bits of the BAR register pair (64 bits wide for mem64)."""
        width = 64 if self.kind == "mem64" else 32
        return ((1 << width) - 1) & ~(self.size - 1)


class ConfigSpace:
    """A type-0 config space: bytes plus per-byte write and write-1-to-clear masks."""

    def __init__(self, *, vendor_id: int, device_id: int, class_code: int, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, interrupt_pin: int = 0,
                 bars: dict[int, Bar] | None = None, rom_size: int = 0, size: int = CONFIG_SIZE):
        if size not in (CONFIG_SIZE, CONFIG_SIZE_EXPRESS):
            raise ValueError(f"config space size must be {CONFIG_SIZE} or {CONFIG_SIZE_EXPRESS}, not {size}")
        if not 0 <= interrupt_pin <= 4:
            raise ValueError(f"interrupt pin must be 0 (none) or 1..4 (INTA..INTD), not {interrupt_pin}")
        if rom_size and not (_is_power_of_two(rom_size) and rom_size >= 2048):
            raise ValueError(f"ROM size {rom_size:#x} must be a power of two >= 2 KiB")
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self.bars: dict[int, Bar] = dict(bars or {})
        self.rom_size = rom_size
        self.msi_vectors = 0
        self.msix_vectors = 0
        self._next_capability = HEADER_END
        self._last_capability_next: int | None = None   # offset of the last `next` pointer

        self._set(VENDOR_ID, 2, vendor_id)
        self._set(DEVICE_ID, 2, device_id)
        self._set(REVISION_ID, 1, revision)
        self._set(CLASS_PROG_IF, 3, class_code)
        self._set(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._set(SUBSYSTEM_ID, 2, subsystem_id)
        self._set(INTERRUPT_PIN, 1, interrupt_pin)
        self._set_masks(COMMAND, 2, COMMAND_WRITABLE)
        self._set_masks(STATUS, 2, 0, w1c=STATUS_ERRORS_RW1C)
        self._set_masks(CACHE_LINE_SIZE, 1, 0xFF)
        self._set_masks(LATENCY_TIMER, 1, 0xFF)
        self._set_masks(INTERRUPT_LINE, 1, 0xFF)
        self._layout_bars()
        if rom_size:
            self._set_masks(ROM_ADDRESS, 4, (ROM_ADDRESS_MASK & ~(rom_size - 1)) | ROM_ENABLE)
        self.power_on = bytes(self.data)

    def _layout_bars(self) -> None:
        occupied: set[int] = set()
        for index, bar in sorted(self.bars.items()):
            span = 2 if bar.kind == "mem64" else 1
            slots = set(range(index, index + span))
            if not slots <= set(range(BAR0, BAR5 + 1)) or slots & occupied:
                raise ValueError(f"BAR{index} ({bar.kind}) does not fit: BARs 0-5, a 64-bit BAR takes two slots")
            occupied |= slots
            offset = BAR_REGISTERS + 4 * index
            self._set(offset, 4 * span, bar.type_bits)
            self._set_masks(offset, 4 * span, bar.address_mask)

    def _set(self, offset: int, width: int, value: int) -> None:
        self.data[offset:offset + width] = value.to_bytes(width, "little")

    def _set_masks(self, offset: int, width: int, writable: int, w1c: int = 0) -> None:
        self.wmask[offset:offset + width] = writable.to_bytes(width, "little")
        self.w1cmask[offset:offset + width] = w1c.to_bytes(width, "little")

    def get(self, offset: int, width: int) -> int:
        return int.from_bytes(self.data[offset:offset + width], "little")

    def set_status_bits(self, bits: int, on: bool) -> None:
        """Device-driven STATUS bits (read-only to the guest)."""
        status = self.get(STATUS, 2)
        self._set(STATUS, 2, status | bits if on else status & ~bits)

    def _check(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise DeviceError(f"config access [{offset:#x}, +{count}) outside the {self.size}-byte config space",
                              errno.EINVAL)

    def read(self, offset: int, count: int) -> bytes:
        self._check(offset, count)
        return bytes(self.data[offset:offset + count])

    def write(self, offset: int, data: bytes) -> None:
        """Apply a write of any length at any offset; read-only bits keep their value."""
        self._check(offset, len(data))
        for i, value in enumerate(data, offset):
            kept = self.data[i] & ~self.wmask[i]
            self.data[i] = (kept | (value & self.wmask[i])) & ~(value & self.w1cmask[i]) & 0xFF

    def reset(self) -> None:
        """Back to power-on contents (a function-level reset clears COMMAND, BARs, line, errors)."""
        self.data[:] = self.power_on

    # Capabilities -----------------------------------------------------------------------------

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes = b"", w1cmask: bytes = b"") -> int:
        """Append a capability while building the device (`body` excludes the 2-byte id/next
        header); returns its offset."""
        length = 2 + len(body)
        offset = self._next_capability
        if offset + length > CONFIG_SIZE:
            raise ValueError(f"capability {cap_id:#x} ({length} bytes) does not fit below 0x100")
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        self.data[offset + 2:offset + length] = body
        self.wmask[offset + 2:offset + 2 + len(wmask)] = wmask
        self.w1cmask[offset + 2:offset + 2 + len(w1cmask)] = w1cmask
        if self._last_capability_next is None:
            self.data[CAPABILITY_POINTER] = offset
        else:
            self.data[self._last_capability_next] = offset
        self._last_capability_next = offset + 1
        self._next_capability = (offset + length + 3) & ~3
        self.set_status_bits(STATUS_CAP_LIST, True)
        self.power_on = bytes(self.data)
        return offset

    def add_msi(self, vectors: int = 1, *, address_64: bool = True, per_vector_mask: bool = False) -> int:
        """MSI capability with `vectors` (1..32, a power of two) messages."""
        if not (_is_power_of_two(vectors) and vectors <= 32):
            raise ValueError(f"MSI vector count must be a power of two up to 32, not {vectors}")
        multiple_message_capable = vectors.bit_length() - 1
        flags = (multiple_message_capable << 1) | (MSI_FLAGS_64BIT if address_64 else 0) \
            | (MSI_FLAGS_MASKBIT if per_vector_mask else 0)
        fields = [(flags, 2, MSI_FLAGS_ENABLE | MSI_FLAGS_MME_MASK), (0, 4, 0xFFFFFFFC)]
        if address_64:
            fields.append((0, 4, 0xFFFFFFFF))
        fields.append((0, 2, 0xFFFF))                                   # message data
        if per_vector_mask:
            fields += [(0, 2, 0), (0, 4, (1 << vectors) - 1), (0, 4, 0)]  # reserved, mask, pending
        body = b"".join(value.to_bytes(width, "little") for value, width, _ in fields)
        wmask = b"".join(mask.to_bytes(width, "little") for _, width, mask in fields)
        self.msi_vectors = vectors
        return self.add_capability(CAP_ID_MSI, body, wmask)

    def add_msix(self, table_size: int, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int) -> int:
        """MSI-X capability; table and PBA must lie inside their (memory) BARs."""
        if not 1 <= table_size <= MSIX_MAX_TABLE_SIZE:
            raise ValueError(f"MSI-X table size must be 1..{MSIX_MAX_TABLE_SIZE}, not {table_size}")
        table_length, pba_length = 16 * table_size, 8 * ((table_size + 63) // 64)
        for what, bar_index, offset, length in (("table", table_bar, table_offset, table_length),
                                                ("PBA", pba_bar, pba_offset, pba_length)):
            bar = self.bars.get(bar_index)
            if bar is None or bar.kind == "io" or offset % 8 or offset + length > bar.size:
                raise ValueError(f"MSI-X {what} [{offset:#x}, +{length:#x}) must be 8-byte aligned "
                                 f"inside memory BAR{bar_index}")
        if table_bar == pba_bar and table_offset < pba_offset + pba_length and pba_offset < table_offset + table_length:
            raise ValueError("MSI-X table and PBA overlap")
        body = struct.pack("<HII", table_size - 1, table_offset | table_bar, pba_offset | pba_bar)
        wmask = struct.pack("<H", MSIX_FLAGS_ENABLE | MSIX_FLAGS_MASKALL)
        self.msix_vectors = table_size
        return self.add_capability(CAP_ID_MSIX, body, wmask)

    def add_express(self, device_type: int = EXPRESS_TYPE_ENDPOINT) -> int:
        """PCI Express capability (version 2), x1 link at 2.5 GT/s, no slot."""
        capabilities = 0x2 | (device_type << 4)
        link_caps = 0x1 | (0x1 << 4)                    # max speed 2.5 GT/s, max width x1
        link_status = 0x1 | (0x1 << 4)                  # current speed 2.5 GT/s, width x1
        device_caps = 1 << 5                            # extended tag field supported, 128-byte payload
        body = struct.pack("<HIHHIHH", capabilities, device_caps, 0, 0, link_caps, 0, link_status)
        body += bytes(EXPRESS_CAP_SIZE - 2 - len(body))
        wmask = struct.pack("<HIHHIH", 0, 0, EXPRESS_DEVCTL_WRITABLE, 0, 0, EXPRESS_LNKCTL_WRITABLE)
        w1cmask = struct.pack("<HIHH", 0, 0, 0, EXPRESS_DEVSTA_RW1C)
        return self.add_capability(CAP_ID_EXPRESS, body, wmask, w1cmask)

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, id) of each capability, walking the list as a guest would."""
        found = []
        offset = self.data[CAPABILITY_POINTER] if self.get(STATUS, 2) & STATUS_CAP_LIST else 0
        while offset and len(found) < 48:
            found.append((offset, self.data[offset]))
            offset = self.data[offset + 1]
        return found

    # Saved state ------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        return bytes(self.data)

    def restore(self, saved: bytes) -> None:
        """Load a snapshot; refuse one whose read-only contents differ (another device, or garbage)."""
        if len(saved) != self.size:
            raise DeviceError(f"saved config space is {len(saved)} bytes, this device has {self.size}")
        for i, (old, new) in enumerate(zip(self.power_on, saved)):
            fixed = ~(self.wmask[i] | self.w1cmask[i]) & 0xFF
            if i == STATUS:
                fixed &= ~STATUS_INTERRUPT       # device-driven, recomputed from device state
            if (old ^ new) & fixed:
                raise DeviceError(f"saved config space differs in read-only byte {i:#x} "
                                  f"({new:#04x}, expected {old:#04x}): not state of this device")
        self.data[:] = saved


class PciDevice(Device):
    """A PCI function model: config space plus BAR/ROM regions handled by the subclass.

    Subclasses build `self.config` in __init__ and implement `bar_read`/`bar_write`; INTx
    is driven with `set_intx_pending`, which keeps STATUS.INTERRUPT and the host's line
    level consistent with COMMAND.INTX_DISABLE.
    """

    config: ConfigSpace
    rom: bytes = b""
    _intx_pending = False
    _intx_driven: bool | None = None     # last level told to the host (None: tell it next time)

    _regions: dict[int, Region] | None = None

    def regions(self) -> dict[int, Region]:
        if self._regions is None:          # fixed once config space is built; looked up per access
            regions = {CONFIG: Region(self.config.size)}
            for index, bar in self.config.bars.items():
                regions[index] = Region(bar.size)
            if self.config.rom_size:
                regions[ROM] = Region(self.config.rom_size, writable=False)
            self._regions = regions
        return self._regions

    def irq_count(self, index: int) -> int:
        counts = {IRQ_INTX: 1 if self.config.data[INTERRUPT_PIN] else 0,
                  IRQ_MSI: self.config.msi_vectors,
                  IRQ_MSIX: self.config.msix_vectors,
                  IRQ_ERR: 1, IRQ_REQ: 1}
        return counts.get(index, 0)

    def _region(self, index: int, offset: int, count: int) -> Region:
        region = self.regions().get(index)
        if region is None or offset < 0 or count < 0 or offset + count > region.size:
            size = region.size if region else 0
            raise DeviceError(f"access [{offset:#x}, +{count}) outside region {index} (size {size:#x})",
                              errno.EINVAL)
        return region

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self._region(index, offset, count)
        if index == CONFIG:
            return self.config.read(offset, count)
        if index == ROM:
            return self.rom[offset:offset + count].ljust(count, b"\xff")
        return self.bar_read(index, offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        region = self._region(index, offset, len(data))
        if not region.writable:
            raise DeviceError(f"region {index} is read-only", errno.EINVAL)
        if index == CONFIG:
            self.config.write(offset, data)
            self._drive_intx()
        else:
            self.bar_write(index, offset, data)

    @abc.abstractmethod
    def bar_read(self, index: int, offset: int, count: int) -> bytes:
        """`count` bytes of BAR `index` at `offset` (already bounds-checked)."""

    @abc.abstractmethod
    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        """Apply a write to BAR `index` at `offset` (already bounds-checked)."""

    # INTx -------------------------------------------------------------------------------------

    @property
    def intx_asserted(self) -> bool:
        """The line level the host sees: pending and not disabled through COMMAND."""
        return self._intx_pending and not self.config.get(COMMAND, 2) & COMMAND_INTX_DISABLE

    def set_intx_pending(self, pending: bool) -> None:
        self._intx_pending = pending
        self._drive_intx()

    def _drive_intx(self) -> None:
        self.config.set_status_bits(STATUS_INTERRUPT, self._intx_pending)
        level = self.intx_asserted
        if self.host is not None and level != self._intx_driven:
            self._intx_driven = level
            self.host.set_intx(level)

    def attach(self, host: DeviceHost | None) -> None:
        """A newly attached host learns the current line level (state survives reconnects)."""
        super().attach(host)
        self._intx_driven = None
        self._drive_intx()

    def reset_config(self) -> None:
        self.config.reset()
        self._intx_pending = False
        self._drive_intx()
