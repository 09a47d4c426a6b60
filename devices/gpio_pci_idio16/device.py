"""The ACCES PCI-IDIO-16 register model, written to satisfy all three Linux driver generations.

BAR2 is a 256-byte I/O window of 8-bit registers (the drivers only do 8-bit I/O; wider
accesses are split into bytes, lowest address first):

    off  read                                   write
    0x0  output latch, lines 0-7                set output lines 0-7
    0x1  inputs 0-7                             clear interrupt status (any value), de-assert INTx
    0x2  enable the change-of-state IRQ (0)     disable it
    0x3  enable input filters (0)               disable input filters
    0x4  output latch, lines 8-15               set output lines 8-15
    0x5  inputs 8-15                            ignored
    0x6  interrupt status                       ignored
    0x7..0xff  0                                ignored

Interrupt status: bit 2 = a change of state is pending, bit 0 / bit 1 = inputs 0-7 / 8-15
changed. The legacy driver's handler wants both `status & 0x3` and `status & 0x4`; the
regmap driver only looks at bit 2. INTx is asserted while a change is pending and the IRQ is
enabled (disabling gates the line; the pending status stays until cleared through 0x1).

The input lines belong to the outside world: the host sets them (control socket), and a
device reset leaves them as they are.
"""

from __future__ import annotations

import struct

from devices.vfio_user.device import BAR2, DeviceError
from devices.vfio_user.pci import COMMAND, Bar, ConfigSpace, PciDevice

VENDOR_ACCES = 0x494F
DEVICE_PCI_IDIO_16 = 0x0DC8
# Base class 0x11 "data acquisition and signal processing controller", subclass 0x00
# "DPIO module" (digital parallel I/O), prog-if 0: what an isolated-input/FET-output card
# is. libvfio-user's sample leaves the class at 0x000000 ("unclassified, pre-2.0"), which
# cannot be hot-added; the Linux driver matches on vendor/device only, so the class is free.
CLASS_DPIO_MODULE = 0x110000
BAR2_SIZE = 0x100

OUTPUTS_0_7 = 0x0
INPUTS_0_7 = 0x1                # write: clear interrupt
IRQ_CONTROL = 0x2               # read: enable, write: disable
FILTER_CONTROL = 0x3            # read: enable, write: disable
OUTPUTS_8_15 = 0x4
INPUTS_8_15 = 0x5
IRQ_STATUS = 0x6

STATUS_BANK0 = 0x1
STATUS_BANK1 = 0x2
STATUS_PENDING = 0x4
LINES = 16

# Saved state, layout 1: magic, layout, outputs, inputs, flags (bit0 irq enabled, bit1
# filters), status, config space length, then the config space bytes.
STATE_MAGIC = b"ID16"
STATE_LAYOUT = 1
_STATE = struct.Struct("<4sHHHBBH")
_FLAG_IRQ_ENABLED = 0x1
_FLAG_FILTERS = 0x2
_BYTE = [bytes([value]) for value in range(256)]


class Idio16(PciDevice):
    device_type = "gpio-pci-idio-16"
    abi_version = 1
    pci_ids = (VENDOR_ACCES, DEVICE_PCI_IDIO_16)

    def __init__(self):
        self.config = ConfigSpace(vendor_id=VENDOR_ACCES, device_id=DEVICE_PCI_IDIO_16,
                                  class_code=CLASS_DPIO_MODULE, subsystem_vendor_id=0,
                                  subsystem_id=0, interrupt_pin=1, bars={BAR2: Bar(BAR2_SIZE, "io")})
        self.inputs = 0
        self._power_on_registers()

    def _power_on_registers(self) -> None:
        self.outputs = 0
        self.irq_enabled = False
        self.filters = False
        self.status = 0
        self._update_intx()

    def _update_intx(self) -> None:
        self.set_intx_pending(bool(self.status & STATUS_PENDING) and self.irq_enabled)

    # Guest side -------------------------------------------------------------------------------

    def bar_read(self, index: int, offset: int, count: int) -> bytes:
        if count == 1:                      # what every driver does: keep it cheap
            return _BYTE[self._read_register(offset)]
        return bytes([self._read_register(offset + i) for i in range(count)])

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        for i, value in enumerate(data, offset):
            self._write_register(i, value)

    def _read_register(self, offset: int) -> int:
        if offset == OUTPUTS_0_7:
            return self.outputs & 0xFF
        if offset == OUTPUTS_8_15:
            return self.outputs >> 8
        if offset == INPUTS_0_7:
            return self.inputs & 0xFF
        if offset == INPUTS_8_15:
            return self.inputs >> 8
        if offset == IRQ_STATUS:
            return self.status
        if offset == IRQ_CONTROL:
            self.irq_enabled = True
            self._update_intx()
        elif offset == FILTER_CONTROL:
            self.filters = True
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == OUTPUTS_0_7:
            self.outputs = (self.outputs & 0xFF00) | value
        elif offset == OUTPUTS_8_15:
            self.outputs = (self.outputs & 0x00FF) | (value << 8)
        elif offset == INPUTS_0_7:
            self.status = 0
            self._update_intx()
        elif offset == IRQ_CONTROL:
            self.irq_enabled = False
            self._update_intx()
        elif offset == FILTER_CONTROL:
            self.filters = False

    def reset(self) -> None:
        self.reset_config()
        self._power_on_registers()

    # Host side --------------------------------------------------------------------------------

    def set_inputs(self, value: int) -> None:
        """Drive all 16 input lines; a change while the IRQ is enabled raises a change-of-state interrupt."""
        if not 0 <= value <= 0xFFFF:
            raise DeviceError(f"input value {value:#x} does not fit 16 lines (0..0xffff)")
        changed = self.inputs ^ value
        self.inputs = value
        if changed and self.irq_enabled:
            self.status |= STATUS_PENDING | (STATUS_BANK0 if changed & 0xFF else 0) \
                | (STATUS_BANK1 if changed & 0xFF00 else 0)
            self._update_intx()

    def set_input(self, line: int, level: bool) -> None:
        if not 0 <= line < LINES:
            raise DeviceError(f"input line {line} does not exist (0..{LINES - 1})")
        bit = 1 << line
        self.set_inputs(self.inputs | bit if level else self.inputs & ~bit)

    def describe(self) -> dict:
        """The state a host operator wants to see (control socket `query-status`)."""
        return {"outputs": self.outputs, "inputs": self.inputs, "irq_enabled": self.irq_enabled,
                "filters": self.filters, "status": self.status, "intx": self.intx_asserted,
                "pci_command": self.config.get(COMMAND, 2)}

    # Saved state ------------------------------------------------------------------------------

    def save_state(self) -> bytes:
        flags = (_FLAG_IRQ_ENABLED if self.irq_enabled else 0) | (_FLAG_FILTERS if self.filters else 0)
        config = self.config.snapshot()
        return _STATE.pack(STATE_MAGIC, STATE_LAYOUT, self.outputs, self.inputs, flags, self.status,
                           len(config)) + config

    def load_state(self, data: bytes, abi_version: int) -> None:
        self.check_loadable(data, abi_version, _STATE.size)
        magic, layout, outputs, inputs, flags, status, config_length = _STATE.unpack_from(data)
        config = data[_STATE.size:]
        problems = [(magic != STATE_MAGIC, f"bad magic {magic!r}"),
                    (layout != STATE_LAYOUT, f"unknown layout {layout}"),
                    (flags & ~(_FLAG_IRQ_ENABLED | _FLAG_FILTERS), f"unknown flags {flags:#x}"),
                    (status & ~(STATUS_PENDING | STATUS_BANK0 | STATUS_BANK1), f"bad status {status:#x}"),
                    (bool(status & STATUS_PENDING) != bool(status & (STATUS_BANK0 | STATUS_BANK1)),
                     f"inconsistent status {status:#x}"),
                    (config_length != len(config), f"config length {config_length} != {len(config)} bytes present")]
        for bad, problem in problems:
            if bad:
                raise DeviceError(f"refusing {self.device_type} state: {problem}")
        self.config.restore(config)
        self.outputs, self.inputs, self.status = outputs, inputs, status
        self.irq_enabled = bool(flags & _FLAG_IRQ_ENABLED)
        self.filters = bool(flags & _FLAG_FILTERS)
        self._update_intx()
