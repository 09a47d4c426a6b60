"""Device state checkpoints (devices.vfio_user.checkpoint): the two-slot format, a reader that
never trips over what it finds, and a device program that is SIGKILLed and comes back with
its state from the same memfd."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.gpio_pci_idio16 import Idio16
from devices.gpio_pci_idio16.ctl import request as control
from devices.vfio_user.backend import restore_checkpoint
from devices.vfio_user.checkpoint import (
    HEADER, MIN_AREA_SIZE, Checkpoint, CheckpointArea, CheckpointError, decode_area, encode_header,
)
from devices.vfio_user.client import Client
from devices.vfio_user.device import BAR2
from devices.vfio_user.migration import unwrap_state, wrap_state
from devices.vfio_user.server import Server

REPO = Path(__file__).resolve().parent.parent
SIZE = 64 * 1024
FUZZ = settings(max_examples=300, deadline=None)


def sealed_memfd(size: int = SIZE, seals: int = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK) -> int:
    """What jailer keeps across restarts: a memfd the device can neither grow nor shrink."""
    fd = os.memfd_create("checkpoint", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.fixture
def memfd():
    fd = sealed_memfd()
    yield fd
    os.close(fd)


def area_with(*records) -> bytearray:
    """An area holding (slot, generation, payload) records."""
    area = bytearray(SIZE)
    for slot, generation, payload in records:
        start = slot * (SIZE // 2)
        area[start:start + HEADER.size + len(payload)] = encode_header(generation, payload) + payload
    return area


# --- the format -----------------------------------------------------------------------------

def test_round_trip_alternates_slots_and_counts_generations():
    buffer = bytearray(SIZE)
    area = CheckpointArea(buffer)
    assert area.read() is None
    area.write(b"first")
    assert area.read() == Checkpoint(0, 1, b"first")
    area.write(b"second")
    assert area.read() == Checkpoint(1, 2, b"second")
    restarted = CheckpointArea(buffer)          # a new process picks up where the last one was
    restarted.write(b"third")
    assert restarted.read() == Checkpoint(0, 3, b"third")


@pytest.mark.parametrize("newer_slot", [0, 1])
def test_the_newest_generation_wins(newer_slot):
    area = area_with((newer_slot, 7, b"newer"), (1 - newer_slot, 6, b"older"))
    assert decode_area(area) == Checkpoint(newer_slot, 7, b"newer")
    CheckpointArea(area).write(b"next")         # goes over the older one
    assert decode_area(area) == Checkpoint(1 - newer_slot, 8, b"next")


@pytest.mark.parametrize("where", ["payload", "generation", "length", "crc"])
def test_a_torn_newer_slot_falls_back_to_the_older_one(where):
    buffer = bytearray(SIZE)
    area = CheckpointArea(buffer)
    area.write(b"older state")
    area.write(b"newer state")
    offset = SIZE // 2 + {"payload": HEADER.size + 3, "generation": 8, "length": 16, "crc": 20}[where]
    buffer[offset] ^= 0x01
    assert decode_area(buffer) == Checkpoint(0, 1, b"older state")


class Killed(Exception):
    pass


class DyingBuffer(bytearray):
    """A mapping whose writer is killed: `completed` slice assignments land whole; of the
    next one only the bytes at `survivors` do (a memcpy stores in no guaranteed order)."""

    completed = 0
    survivors: frozenset = frozenset()

    def __setitem__(self, key, value):
        if not self.completed:
            for index in self.survivors:
                if index < len(value):
                    super().__setitem__(key.start + index, value[index])
            raise Killed
        self.completed -= 1
        super().__setitem__(key, value)


@FUZZ
@given(completed=st.integers(0, 1), survivors=st.frozensets(st.integers(0, 40)),
       new=st.sampled_from([b"state one", b"state two", b"a different, longer state"]))
def test_a_writer_killed_at_any_instant_leaves_the_previous_checkpoint(completed, survivors, new):
    written = bytearray(MIN_AREA_SIZE)
    writer = CheckpointArea(written)
    writer.write(b"state one")
    writer.write(b"state two")
    buffer = DyingBuffer(written)
    buffer.completed, buffer.survivors = completed, survivors
    with pytest.raises(Killed):
        CheckpointArea(buffer).write(new)
    assert decode_area(buffer) in (Checkpoint(1, 2, b"state two"), Checkpoint(0, 3, new))


def test_an_empty_area_holds_no_checkpoint_yet():
    assert decode_area(bytes(SIZE)) is None
    interrupted_first_write = area_with()       # payload written, header not yet
    interrupted_first_write[HEADER.size:HEADER.size + 5] = b"state"
    assert decode_area(interrupted_first_write) is None


@pytest.mark.parametrize("field, value, reason", [
    (slice(0, 4), b"XXXX", "slot A: bad magic b'XXXX'"),
    (slice(4, 6), b"\x02\x00", "slot A: checkpoint format version 2, this device reads 1"),
    (slice(6, 8), b"\x01\x00", "slot A: reserved field is 0x1, not 0"),
    (slice(16, 20), b"\xff\xff\x00\x00", "slot A: payload length 65535 exceeds the slot"),
])
def test_a_foreign_slot_is_ignored_and_named_when_nothing_else_is_valid(field, value, reason):
    area = area_with((0, 5, b"state"))
    area[field] = value
    with pytest.raises(CheckpointError, match=re.escape(reason)):
        decode_area(area)
    area[SIZE // 2:SIZE // 2 + HEADER.size + 5] = encode_header(4, b"other") + b"other"
    assert decode_area(area) == Checkpoint(1, 4, b"other")


def test_a_payload_larger_than_a_slot_is_refused_before_anything_is_written():
    buffer = bytearray(MIN_AREA_SIZE)
    area = CheckpointArea(buffer)
    with pytest.raises(CheckpointError, match=f"takes {area.capacity + 1} bytes, a slot of this "
                                              f"{MIN_AREA_SIZE}-byte checkpoint area holds {area.capacity}"):
        area.write(bytes(area.capacity + 1))
    assert not any(buffer)
    area.write(b"\x01" * area.capacity)
    assert area.read() == Checkpoint(0, 1, b"\x01" * area.capacity)


def test_open_takes_a_mappable_regular_file_of_a_useful_size(tmp_path):
    read_end, write_end = os.pipe()
    small = sealed_memfd(MIN_AREA_SIZE - 1)
    write_sealed = sealed_memfd(seals=fcntl.F_SEAL_WRITE)
    (tmp_path / "area").write_bytes(bytes(SIZE))
    read_only = os.open(tmp_path / "area", os.O_RDONLY)
    try:
        for fd, reason in [(read_end, "not a regular file or memfd"),
                           (small, f"{MIN_AREA_SIZE - 1} bytes, a checkpoint area needs at least {MIN_AREA_SIZE}"),
                           (write_sealed, "cannot be mapped read-write"),
                           (read_only, "cannot be mapped read-write")]:
            with pytest.raises(CheckpointError, match=re.escape(reason)):
                CheckpointArea.open(fd)
    finally:
        for fd in (read_end, write_end, small, write_sealed, read_only):
            os.close(fd)
    with pytest.raises(CheckpointError, match="Bad file descriptor"):
        CheckpointArea.open(read_end)


# --- the reader never trips -----------------------------------------------------------------

def decoded(area) -> Checkpoint | None | str:
    try:
        return decode_area(area)
    except CheckpointError as reason:
        return str(reason)


@FUZZ
@given(st.binary(max_size=2 * MIN_AREA_SIZE))
def test_any_bytes_decode_to_a_checkpoint_none_or_a_reason(data):
    result = decoded(data)
    assert result is None or isinstance(result, (Checkpoint, str))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, MIN_AREA_SIZE - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_a_damaged_area_yields_a_written_checkpoint_or_a_reason(damage):
    buffer = bytearray(MIN_AREA_SIZE)
    area = CheckpointArea(buffer)
    area.write(b"older state")
    area.write(b"newer state")
    for offset, value in damage:
        buffer[offset] = value
    result = decoded(buffer)
    assert result is None or isinstance(result, str) or result in (
        Checkpoint(0, 1, b"older state"), Checkpoint(1, 2, b"newer state"))


# --- the server and the backend -------------------------------------------------------------

def test_the_server_writes_only_a_state_that_changed():
    area = CheckpointArea(bytearray(SIZE))
    device = Idio16()
    ours, theirs = socket.socketpair()
    server = Server(device, ours, checkpoint=area)
    try:
        server.save_checkpoint()
        assert area.read() is None              # power-on state: nothing to keep yet
        device.set_inputs(0x1234)
        server.save_checkpoint()
        server.save_checkpoint()
        checkpoint = area.read()
        assert checkpoint.generation == 1
        kind, abi, state = unwrap_state(checkpoint.payload)
        assert (kind, abi, state) == (device.device_type, device.abi_version, device.save_state())
    finally:
        server.close()
        ours.close()
        theirs.close()


@pytest.mark.parametrize("payload, reason", [
    (wrap_state("test-device", 1, b"state"), "state of a 'test-device' device offered to a 'gpio-pci-idio-16' device"),
    (wrap_state("gpio-pci-idio-16", 1, b"garbage"),
     "refusing gpio-pci-idio-16 state: 7 bytes, shorter than its header"),
    (b"VFUS" + bytes(30), "migration data uses envelope format 0, this server reads 1"),
], ids=["other device type", "state the device cannot load", "other envelope format"])
def test_a_refused_checkpoint_leaves_the_device_fresh_and_says_why_in_one_line(caplog, payload, reason):
    area = CheckpointArea(bytearray(SIZE))
    area.write(payload)
    device = Idio16()
    device.set_inputs(0x8001)                   # the host's lines survive a refused checkpoint
    with caplog.at_level(logging.INFO, logger="vfio_user"):
        restore_checkpoint(device, area, 6)
    assert [record.getMessage() for record in caplog.records] == [
        f"refusing the checkpoint on fd 6: {reason}; starting fresh"]
    assert device.describe() == {**Idio16().describe(), "inputs": 0x8001}


# --- end to end: the bare device program, SIGKILLed ------------------------------------------

class Idio16Process:
    """python -m devices.gpio_pci_idio16 with a control socket and --checkpoint-fd."""

    def __init__(self, tmp_path, checkpoint_fd: int):
        self.path = str(tmp_path / "idio16.sock")
        self.control = str(tmp_path / "idio16.ctl")
        if os.path.exists(self.path):
            os.unlink(self.path)                # left behind by a SIGKILLed predecessor
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devices.gpio_pci_idio16", f"--socket-path={self.path}",
             f"--control-socket={self.control}", f"--checkpoint-fd={checkpoint_fd}"],
            cwd=REPO, pass_fds=(checkpoint_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.log)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.path):
            assert self.proc.poll() is None, f"device exited: {self.stderr()}"
            assert time.monotonic() < deadline, "device did not start"
            time.sleep(0.01)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> str:
        self.proc.terminate()
        assert self.proc.wait(10) == 0
        return self.stderr()


def checkpoint_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"\bcheckpoint (on fd|\(generation)", line)]


def test_a_sigkilled_device_comes_back_with_its_state(tmp_path, memfd):
    first = Idio16Process(tmp_path, memfd)
    try:
        with Client.connect(first.path) as client:
            client.region_write(BAR2, 0x0, b"\x5a")
            client.region_write(BAR2, 0x4, b"\xa5")
            assert client.region_read(BAR2, 0x2, 1) == b"\x00"      # the guest enables the IRQ
        control(first.control, {"cmd": "set-inputs", "value": 0x0102})
    finally:
        first.kill()                                # right after the last reply
    assert not checkpoint_lines(first.stderr())

    second = Idio16Process(tmp_path, memfd)
    try:
        with Client.connect(second.path) as client:
            assert client.region_read(BAR2, 0x0, 1) + client.region_read(BAR2, 0x4, 1) == b"\x5a\xa5"
            assert client.region_read(BAR2, 0x6, 1) == b"\x07"      # the input change still pending
        status = control(second.control, {"cmd": "query-status"})
    finally:
        log = second.stop()
    assert (status["outputs"], status["inputs"], status["irq_enabled"]) == (0xA55A, 0x0102, True)
    restored = checkpoint_lines(log)
    assert len(restored) == 1 and re.fullmatch(
        r"gpio-pci-idio-16\[\d+\]: restored state from checkpoint \(generation 4, \d+ bytes\)", restored[0]), log


def test_a_checkpoint_of_another_abi_version_is_refused_and_the_device_starts_fresh(tmp_path, memfd):
    newer = Idio16()
    newer.outputs = 0xFFFF
    CheckpointArea.open(memfd).write(wrap_state(newer.device_type, newer.abi_version + 1, newer.save_state()))
    device = Idio16Process(tmp_path, memfd)
    try:
        with Client.connect(device.path) as client:
            assert client.region_read(BAR2, 0x0, 1) + client.region_read(BAR2, 0x4, 1) == b"\x00\x00"
            client.region_write(BAR2, 0x0, b"\x01")                 # the next change overwrites it
    finally:
        log = device.stop()
    assert checkpoint_lines(log) == [f"gpio-pci-idio-16[{device.proc.pid}]: refusing the checkpoint on fd {memfd}: "
                     "gpio-pci-idio-16 state abi_version 2 is not accepted (device is at 1); starting fresh"], log
    checkpoint = CheckpointArea.open(memfd).read()
    assert checkpoint.generation == 2 and unwrap_state(checkpoint.payload)[1] == 1


def test_a_descriptor_that_cannot_hold_the_state_is_a_usage_error(tmp_path):
    too_small = sealed_memfd(MIN_AREA_SIZE)
    read_end, write_end = os.pipe()
    try:
        for fd, reason in [(too_small, rf"the device state takes (\d+) bytes, a slot of this {MIN_AREA_SIZE}-byte "
                                       rf"checkpoint area holds {MIN_AREA_SIZE // 2 - HEADER.size}"),
                           (read_end, "not a regular file or memfd")]:
            result = subprocess.run(
                [sys.executable, "-m", "devices.gpio_pci_idio16", f"--socket-path={tmp_path / 'dev.sock'}",
                 f"--checkpoint-fd={fd}"], cwd=REPO, pass_fds=(fd,), capture_output=True, text=True, timeout=20)
            assert result.returncode == 2, result.stderr
            assert re.fullmatch(rf"gpio-pci-idio-16: --checkpoint-fd={fd}: {reason}\n", result.stderr)
            assert not os.listdir(tmp_path)
    finally:
        for fd in (too_small, read_end, write_end):
            os.close(fd)


def test_capabilities_name_the_checkpoint_fd():
    result = subprocess.run([sys.executable, "-m", "devices.gpio_pci_idio16", "--print-capabilities"],
                            cwd=REPO, capture_output=True, text=True, timeout=20)
    assert "checkpoint-fd" in result.stdout
