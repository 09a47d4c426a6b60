"""Property tests: arbitrary guest and host access sequences keep the models consistent."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from devices.gpio_pci_idio16 import Idio16
from devices.gpio_pci_idio16.control import execute
from devices.vfio_user.device import BAR2, CONFIG
from devices.vfio_user.pci import STATUS, STATUS_INTERRUPT, Bar, ConfigSpace
from test_pci import RecordingHost

FUZZ = settings(max_examples=300, deadline=None)


def _access(size):
    """(offset, length) inside a region of `size` bytes, any alignment, lengths 0..8."""
    return st.integers(0, size - 1).flatmap(
        lambda offset: st.tuples(st.just(offset), st.integers(0, min(8, size - offset))))


writes = st.lists(st.tuples(_access(256), st.binary(min_size=8, max_size=8)), max_size=40)


@FUZZ
@given(writes)
def test_config_writes_never_touch_read_only_bits(sequence):
    config = ConfigSpace(vendor_id=0x494F, device_id=0x0DC8, class_code=0x110000, interrupt_pin=1,
                         bars={0: Bar(0x1000, "mem64", prefetchable=True), 2: Bar(0x100, "io")}, rom_size=0x800)
    config.add_msi(2)
    for (offset, length), data in sequence:
        config.write(offset, data[:length])
        for i, (old, new) in enumerate(zip(config.power_on, config.data)):
            fixed = ~(config.wmask[i] | config.w1cmask[i]) & 0xFF
            if i == STATUS:
                fixed &= ~STATUS_INTERRUPT
            assert (old ^ new) & fixed == 0, f"read-only bits of byte {i:#x} changed"
        assert config.read(offset, length) == bytes(config.data[offset:offset + length])


guest_ops = st.one_of(
    st.tuples(st.just("read"), _access(256)),
    st.tuples(st.just("write"), _access(256), st.binary(min_size=8, max_size=8)),
    st.tuples(st.just("inputs"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("command"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("reset")),
)


@FUZZ
@given(st.lists(guest_ops, max_size=60))
def test_idio16_invariants_under_any_access_sequence(ops):
    device = Idio16()
    host = RecordingHost()
    device.attach(host)
    for op in ops:
        if op[0] == "read":
            (offset, length), = op[1:]
            assert len(device.region_read(BAR2, offset, length)) == length
        elif op[0] == "write":
            (offset, length), data = op[1:]
            device.region_write(BAR2, offset, data[:length])
        elif op[0] == "inputs":
            device.set_inputs(op[1])
        elif op[0] == "command":
            device.region_write(CONFIG, 0x04, op[1].to_bytes(2, "little"))
        else:
            device.reset()
        pending = bool(device.status & 0x4)
        assert pending == bool(device.status & 0x3) and device.status & ~0x7 == 0
        assert host.asserted == (pending and device.irq_enabled and not device.config.get(0x04, 2) & 0x400)
        assert bool(device.config.get(STATUS, 2) & STATUS_INTERRUPT) == (pending and device.irq_enabled)
    copy = Idio16()
    copy.load_state(device.save_state(), 1)
    assert copy.describe() == device.describe() and copy.save_state() == device.save_state()


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 st.dictionaries(st.sampled_from(["cmd", "value", "line", "data", "id", "abi_version", "x"]),
                                 st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
                                           st.sampled_from(["set-inputs", "set-input", "load-state",
                                                            "query-status", "get-outputs"])),
                                 max_size=5).map(lambda d: json.dumps(d).encode())))
def test_control_requests_always_get_exactly_one_reply(line):
    reply = execute(Idio16(), line)
    assert ("return" in reply) != ("error" in reply)
    json.dumps(reply)
