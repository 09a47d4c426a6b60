"""The IDIO-16 register model, and the three Linux driver generations replayed against it."""

import struct

import pytest

from devices.gpio_pci_idio16 import Idio16
from devices.vfio_user.device import BAR2, CONFIG, DeviceError
from test_pci import RecordingHost


class Guest:
    """8-bit port I/O on BAR2, as ioread8/iowrite8 (and regmap's 8-bit MMIO bus) issue it."""

    def __init__(self, device):
        self.device = device

    def inb(self, offset):
        return self.device.region_read(BAR2, offset, 1)[0]

    def outb(self, offset, value):
        self.device.region_write(BAR2, offset, bytes([value]))


@pytest.fixture
def device():
    device = Idio16()
    device.attach(RecordingHost())
    return device


@pytest.fixture
def guest(device):
    return Guest(device)


def test_config_space_identity(device):
    config = device.region_read(CONFIG, 0, 64)
    vendor, device_id, command, status, revision = struct.unpack_from("<HHHHB", config)
    assert (vendor, device_id) == (0x494F, 0x0DC8) and device.pci_ids == (0x494F, 0x0DC8)
    assert config[0x09:0x0C] == bytes([0x00, 0x00, 0x11])          # DPIO module
    assert struct.unpack_from("<HH", config, 0x2C) == (0, 0)
    assert struct.unpack_from("<I", config, 0x18)[0] == 0x1        # BAR2: I/O
    assert config[0x3D] == 1 and status & 0x10 == 0 and config[0x34] == 0
    assert {i: r.size for i, r in device.regions().items()} == {CONFIG: 256, BAR2: 256}
    assert device.irq_count(0) == 1 and device.irq_count(1) == device.irq_count(2) == 0
    device.region_write(CONFIG, 0x18, b"\xff\xff\xff\xff")
    assert device.region_read(CONFIG, 0x18, 4) == struct.pack("<I", 0xFFFFFF01)


def test_output_latches_read_back(device, guest):
    guest.outb(0x0, 0xA5)
    guest.outb(0x4, 0x3C)
    assert (guest.inb(0x0), guest.inb(0x4), device.outputs) == (0xA5, 0x3C, 0x3CA5)


def test_inputs_read_per_bank(device, guest):
    device.set_inputs(0xBEEF)
    assert (guest.inb(0x1), guest.inb(0x5)) == (0xEF, 0xBE)
    device.set_input(0, False)
    device.set_input(12, True)
    assert device.inputs == 0xBEEE | 0x1000
    for bad in (lambda: device.set_inputs(0x10000), lambda: device.set_inputs(-1),
                lambda: device.set_input(16, True)):
        with pytest.raises(DeviceError):
            bad()


def test_irq_enable_by_read_disable_by_write(device, guest):
    assert guest.inb(0x2) == 0 and device.irq_enabled
    guest.outb(0x2, 0x55)
    assert not device.irq_enabled


def test_change_of_state_interrupt_and_clear(device, guest):
    host = device.host
    device.set_inputs(0x0001)                      # IRQ disabled: no interrupt, no status
    assert guest.inb(0x6) == 0 and not host.asserted
    guest.inb(0x2)
    device.set_inputs(0x0001)                      # no change: nothing
    assert guest.inb(0x6) == 0
    device.set_inputs(0x0101)
    assert guest.inb(0x6) == 0x6 and host.asserted
    device.set_inputs(0x0100)
    assert guest.inb(0x6) == 0x7                   # banks accumulate until cleared
    guest.outb(0x1, 0x00)
    assert guest.inb(0x6) == 0 and not host.asserted
    assert device.region_read(CONFIG, 0x06, 1)[0] & 0x08 == 0


def test_disable_gates_line_but_keeps_status(device, guest):
    host = device.host
    guest.inb(0x2)
    device.set_inputs(0x0010)
    assert host.asserted
    guest.outb(0x2, 0)
    assert not host.asserted and guest.inb(0x6) == 0x5
    guest.inb(0x2)
    assert host.asserted
    guest.outb(0x1, 0)
    assert not host.asserted


def test_filters_flag(device, guest):
    assert guest.inb(0x3) == 0 and device.filters
    guest.outb(0x3, 0)
    assert not device.filters


def test_unused_registers(device, guest):
    device.set_inputs(0x1234)
    guest.inb(0x2)
    guest.outb(0x5, 0xFF)
    guest.outb(0x6, 0xFF)
    guest.outb(0x7, 0xFF)
    for offset in range(0x8, 0x100, 0x11):
        guest.outb(offset, 0xFF)
    assert device.inputs == 0x1234 and device.outputs == 0 and guest.inb(0x6) == 0
    assert device.region_read(BAR2, 0x7, 1) == b"\x00"
    assert device.region_read(BAR2, 0x8, 0xF8) == bytes(0xF8)
    with pytest.raises(DeviceError):
        device.region_read(BAR2, 0xFF, 2)


def test_wide_accesses_are_split_into_bytes(device):
    device.region_write(BAR2, 0x0, struct.pack("<I", 0x44332211))   # 0x0 out, 0x1 clear, 0x2 disable, 0x3 filters off
    assert device.outputs == 0x11 and not device.irq_enabled
    device.region_write(BAR2, 0x4, b"\x99\x00")
    device.set_inputs(0xA0B0)
    assert device.region_read(BAR2, 0x0, 2) == b"\x11\xb0"
    assert device.region_read(BAR2, 0x4, 4) == b"\x99\xa0\x00\x00"
    assert not device.irq_enabled and not device.filters
    assert device.region_read(BAR2, 0x0, 8) == b"\x11\xb0\x00\x00\x99\xa0\x00\x00"
    assert device.irq_enabled and device.filters                    # reads of 0x2 and 0x3 inside it


def test_reset_restores_power_on_but_keeps_input_lines(device, guest):
    host = device.host
    device.region_write(CONFIG, 0x04, b"\x01\x00")
    device.region_write(CONFIG, 0x18, struct.pack("<I", 0xC000))
    guest.outb(0x0, 0xFF)
    guest.inb(0x2)
    guest.inb(0x3)
    device.set_inputs(0x00F0)
    assert host.asserted
    device.reset()
    assert not host.asserted
    assert (device.outputs, device.irq_enabled, device.filters, device.status) == (0, False, False, 0)
    assert device.inputs == 0x00F0
    assert device.region_read(CONFIG, 0x04, 2) == b"\x00\x00"
    assert device.region_read(CONFIG, 0x18, 4) == struct.pack("<I", 1)


# The driver generations, as the register accesses each one issues (see the digest, §6.3).

def legacy_probe(guest):
    guest.outb(0x3, 0)          # filters off
    guest.outb(0x2, 0)          # IRQ off
    guest.outb(0x1, 0)          # clear pending


def legacy_irq_handler(guest):
    """IRQ_HANDLED only for this card's change of state; acknowledges it."""
    status = guest.inb(0x6)
    if not (status & 0x3 and status & 0x4):
        return False
    guest.outb(0x1, 0)
    return True


def test_legacy_driver(device, guest):
    host = device.host
    legacy_probe(guest)
    device.set_inputs(0x8001)
    assert not host.asserted
    # gpio get: outputs read back from the latches, inputs from 0x1/0x5.
    assert (guest.inb(0x1) | guest.inb(0x5) << 8) == 0x8001
    # gpio set OUT9 = 1: read-modify-write of 0x4.
    guest.outb(0x4, guest.inb(0x4) | 1 << 1)
    assert (guest.inb(0x0) | guest.inb(0x4) << 8) == 1 << 9
    # request_irq + first unmask: read 0x2.
    guest.inb(0x2)
    device.set_inputs(0x8003)
    assert host.asserted
    assert legacy_irq_handler(guest) and not host.asserted
    assert not legacy_irq_handler(guest)        # shared line, not ours now
    device.set_inputs(0x0003)                   # bank 1 change
    assert guest.inb(0x6) == 0x6 and legacy_irq_handler(guest)
    guest.outb(0x2, 0)                          # last mask
    device.set_inputs(0xFFFF)
    assert not host.asserted and guest.inb(0x6) == 0


def test_idio16_library_driver(device, guest):
    host = device.host
    legacy_probe(guest)
    cached = 0
    for line in (0, 7, 8, 15):                  # outputs written from the driver's cache
        cached |= 1 << line
        guest.outb(0x0, cached & 0xFF)
        guest.outb(0x4, cached >> 8)
    assert device.outputs == 0x8181
    guest.inb(0x2)
    device.set_inputs(0x0100)
    assert host.asserted and legacy_irq_handler(guest) and not host.asserted


def test_regmap_driver(device, guest):
    host = device.host
    device.set_inputs(0x00FF)
    # probe: IRQ off; regmap-irq masks everything and acks whatever is pending; filters off.
    guest.outb(0x2, 0)
    guest.outb(0x2, 0)
    if guest.inb(0x6) & 0x4:
        guest.outb(0x1, 0)
    guest.outb(0x3, 0)
    # gpio-regmap: outputs only written (flat cache), inputs read from volatile 0x1/0x5.
    guest.outb(0x0, 0x01)
    guest.outb(0x4, 0x80)
    assert device.outputs == 0x8001
    assert (guest.inb(0x1), guest.inb(0x5)) == (0xFF, 0x00)
    # first unmask: clear then enable.
    guest.outb(0x1, 0)
    guest.inb(0x2)
    assert not host.asserted
    device.set_inputs(0x01FF)
    assert host.asserted
    # IRQ thread: status bit 2 is the only one it maps; ack through 0x1.
    assert guest.inb(0x6) & 0x4
    guest.outb(0x1, 0)
    assert not host.asserted and guest.inb(0x6) & 0x4 == 0
    # last mask.
    guest.outb(0x2, 0)
    device.set_inputs(0x0000)
    assert not host.asserted


# Saved state.

def test_save_load_round_trip_including_config(device, guest):
    device.region_write(CONFIG, 0x04, b"\x01\x00")
    device.region_write(CONFIG, 0x18, struct.pack("<I", 0xC040))
    device.region_write(CONFIG, 0x3C, b"\x0b")
    guest.outb(0x0, 0x12)
    guest.outb(0x4, 0x34)
    guest.inb(0x2)
    guest.inb(0x3)
    device.set_inputs(0x5500)
    blob = device.save_state()

    other = Idio16()
    host = RecordingHost()
    other.attach(host)
    other.load_state(blob, 1)
    assert other.describe() == device.describe()
    assert other.region_read(CONFIG, 0, 256) == device.region_read(CONFIG, 0, 256)
    assert host.asserted and other.save_state() == blob
    assert Guest(other).inb(0x6) == 0x6


@pytest.mark.parametrize("mutate", [
    lambda b: b"",
    lambda b: b[:10],
    lambda b: b"XXXX" + b[4:],
    lambda b: b[:4] + b"\x02\x00" + b[6:],                  # unknown layout
    lambda b: b[:10] + b"\x04" + b[11:],                     # unknown flag
    lambda b: b[:11] + b"\x08" + b[12:],                     # status bit beyond 2
    lambda b: b[:11] + b"\x04" + b[12:],                     # pending without a bank
    lambda b: b[:12] + b"\x00\x02" + b[14:],                 # config length mismatch
    lambda b: b[:-1],
    lambda b: b[:14] + b"\x00\x00" + b[16:],                 # vendor id of another device
    lambda b: b + b"\x00",
])
def test_garbage_state_is_refused(device, mutate):
    blob = device.save_state()
    before = device.save_state()
    with pytest.raises(DeviceError):
        device.load_state(mutate(blob), 1)
    assert device.save_state() == before


def test_other_abi_version_is_refused(device):
    with pytest.raises(DeviceError, match="ABI version 2"):
        device.load_state(device.save_state(), 2)
