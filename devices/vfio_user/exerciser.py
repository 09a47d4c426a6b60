"""A conformance walk: one client session that sends every message a vfio-user device supports.

    report = exercise(socket_path, control_path=None, terminate=None)
    report.check()          # raises ConformanceError naming every step that failed

The walk checks every reply (so it doubles as a conformance test) and keeps going after a
failing step, reconnecting when a step broke the connection, so one bug does not hide the
rest. It is what `jailer learn` runs while it records the device's syscalls: whatever code
path a device can take for a well-behaved or misbehaving client is taken at least once.

Steps: VERSION; DEVICE_GET_INFO; GET_REGION_INFO of every region (small argsz first, the
retry taken when the server asks for more); GET_IRQ_INFO of every index; config space
reads of every width and BAR sizing writes; every BAR byte read and written (the IDIO-16's
registers checked one by one when the device is one); REGION_WRITE_MULTI when advertised;
SET_IRQS (INTx trigger and resample eventfds, software trigger, mask/unmask, ERR/REQ,
disable); DMA_MAP/UNMAP with memfds and without (message-based), dirty logging
start/report/stop, UNMAP_ALL; DEVICE_RESET; migration (feature probes, flags, PRE_COPY,
STOP_COPY with MIG_DATA_READ, RESUMING with MIG_DATA_WRITE on a new connection, a refused
stream); error replies (bad region, bad argsz, unknown and obsolete commands, VERSION
twice, the largest message a server accepts); a malformed frame (the server must close
the connection); reconnection (state kept, eventfds redone); the control socket when
given (set-inputs raises an interrupt delivered on the eventfd, an over-long line is
refused); and finally `terminate()` (e.g. SIGTERM), which must exit 0.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

from . import codec
from . import protocol as P
from .client import Client, ClientError
from .device import BAR2, CONFIG, IRQ_ERR, IRQ_INTX, IRQ_REQ
from .migration import wrap_state

IDIO16_IDS = (0x494F, 0x0DC8)
CAPABILITIES = {"max_msg_fds": P.MAX_MSG_FDS, "max_data_xfer_size": P.MAX_DATA_XFER_SIZE,
                "pgsizes": P.PAGE_SIZE, "max_dma_maps": P.MAX_DMA_MAPS, "write_multiple": True}
IRQ_WAIT = 2.0
CONTROL_LINE_LIMIT = 64 * 1024   # the control protocol's longest line; longer ones close the connection
MAX_WALKED_REGION = 1 << 16     # bytes of a BAR read byte by byte; bigger ones are sampled


class ConformanceError(AssertionError):
    """A reply was not what the protocol (or the device's documented ABI) requires."""


@dataclass
class Step:
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0


@dataclass
class ExerciseReport:
    steps: list = field(default_factory=list)
    commands: Counter = field(default_factory=Counter)   # command name -> times sent
    interrupts: int = 0                                   # eventfd signals observed
    exit_status: int | None = None                        # what terminate() returned

    @property
    def failures(self) -> list:
        return [step for step in self.steps if not step.ok]

    @property
    def ok(self) -> bool:
        return bool(self.steps) and not self.failures

    def check(self) -> "ExerciseReport":
        if not self.ok:
            raise ConformanceError("; ".join(f"{s.name}: {s.detail}" for s in self.failures) or "no step ran")
        return self

    def to_dict(self) -> dict:
        return {"ok": self.ok, "steps": [vars(s) for s in self.steps], "commands": dict(sorted(self.commands.items())),
                "interrupts": self.interrupts, "exit_status": self.exit_status}


def expect(condition, what: str) -> None:
    if not condition:
        raise ConformanceError(what)


def expect_error(call, err: int | tuple, what: str) -> None:
    """`call` must fail with a vfio-user error reply carrying `err`."""
    errs = err if isinstance(err, tuple) else (err,)
    try:
        call()
    except ClientError as exc:
        expect(exc.errno in errs, f"{what}: errno {exc.errno}, expected {'/'.join(map(str, errs))}")
        return
    raise ConformanceError(f"{what}: succeeded, expected an error reply")


class _CountingClient(Client):
    """A Client that counts the commands it sends (the report says what was covered)."""

    counter: Counter

    def send(self, cmd: int, payload: bytes = b"", fds=None, no_reply: bool = False) -> int:
        self.counter[P.command_name(cmd)] += 1
        return super().send(cmd, payload, fds, no_reply)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _fired(fd: int, timeout: float = IRQ_WAIT) -> int:
    """The eventfd's count once it is signalled (0 when nothing comes within `timeout`)."""
    if not select.select([fd], [], [], timeout)[0]:
        return 0
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _memfd(size: int) -> int:
    fd = os.memfd_create("exerciser-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


class Control:
    """The device's JSON-lines control socket (devices.gpio_pci_idio16.control)."""

    def __init__(self, path: str, timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.pending = b""

    def call(self, request: dict) -> dict:
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while b"\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConformanceError("control socket closed without a reply")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)

    def ok(self, cmd: str, **arguments) -> dict:
        reply = self.call({"cmd": cmd, **arguments})
        expect("return" in reply, f"control {cmd}: {reply.get('error')}")
        return reply["return"]

    def close(self) -> None:
        self.sock.close()


class Walk:
    """One exercise run: the connection in use, what the device said about itself, the report."""

    def __init__(self, socket_path: str, control_path: str | None, timeout: float, alive=None):
        self.alive = alive or (lambda: True)
        self.path = socket_path
        self.control_path = control_path
        self.timeout = timeout
        self.report = ExerciseReport()
        self.client: _CountingClient | None = None
        self.info = None
        self.regions: dict = {}
        self.irq_counts: dict = {}
        self.ids = (0, 0)

    # --- plumbing -----------------------------------------------------------------------------

    def connect(self) -> _CountingClient:
        self.disconnect()
        _CountingClient.counter = self.report.commands
        deadline = time.monotonic() + self.timeout
        while True:   # the server takes its next client once it has noticed the last one leave
            try:
                self.client = _CountingClient.connect(self.path, capabilities=CAPABILITIES, timeout=self.timeout)
                return self.client
            except ClientError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN) or time.monotonic() > deadline \
                        or not self.alive():
                    raise
                time.sleep(0.02)

    def disconnect(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def step(self, name: str, function) -> None:
        started = time.monotonic()
        try:
            if self.client is None:
                self.connect()
                if self.report.failures:
                    self.client.reset()   # a failed step may have left migration or IRQ state behind
            function()
            ok, detail = True, ""
        except (ConformanceError, ClientError, OSError, ValueError, struct.error, codec.DecodeError) as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
            self.disconnect()   # the next step starts on a new connection, after a DEVICE_RESET
        self.report.steps.append(Step(name, ok, detail, round(time.monotonic() - started, 4)))

    @property
    def idio16(self) -> bool:
        return self.ids == IDIO16_IDS

    # --- steps --------------------------------------------------------------------------------

    def version(self) -> None:
        client = self.client
        expect(client.server_version[0] == P.VERSION_MAJOR and client.server_version[1] <= P.VERSION_MINOR,
               f"server version {client.server_version}")
        caps = client.server_capabilities
        for key in ("max_msg_fds", "max_data_xfer_size"):
            expect(isinstance(caps.get(key), int) and caps[key] > 0, f"capability {key} = {caps.get(key)!r}")
        expect(set(caps) <= set(CAPABILITIES) | {"migration", "twin_socket"},
               f"capabilities {sorted(caps)} include keys the client did not offer")

    def device_info(self) -> None:
        info = self.client.device_info()
        expect(info.flags & P.DEVICE_FLAG_PCI and info.flags & P.DEVICE_FLAG_RESET, f"device flags {info.flags:#x}")
        expect(info.num_regions >= P.NUM_PCI_REGIONS and info.num_irqs >= P.NUM_PCI_IRQS,
               f"{info.num_regions} regions, {info.num_irqs} irqs")
        self.info = info

    def region_infos(self) -> None:
        client = self.client
        known = P.REGION_FLAG_READ | P.REGION_FLAG_WRITE | P.REGION_FLAG_MMAP | P.REGION_FLAG_CAPS
        for index in range(self.info.num_regions):
            info, fd = client.region_info(index, argsz=P.REGION_INFO.size)   # retries if caps need more
            if fd is not None:
                expect(info.flags & P.REGION_FLAG_MMAP, f"region {index}: an fd without the MMAP flag")
                os.close(fd)
            expect(info.index == index and not info.flags & ~known, f"region {index}: {info}")
            roomy, fd = client.region_info(index, argsz=4096)
            if fd is not None:
                os.close(fd)
            expect((roomy.flags, roomy.size) == (info.flags, info.size), f"region {index} differs by argsz")
            self.regions[index] = info
        config = self.regions[CONFIG]
        expect(config.size in (256, 4096) and config.flags & P.REGION_FLAG_READ and config.flags & P.REGION_FLAG_WRITE,
               f"config region {config}")
        expect_error(lambda: client.region_info(self.info.num_regions), errno.EINVAL, "region index out of range")
        expect_error(lambda: client.region_info(CONFIG, argsz=16), errno.EINVAL, "region info argsz 16")

    def irq_infos(self) -> None:
        client = self.client
        for index in range(self.info.num_irqs):
            info = client.irq_info(index)
            expect(info.index == index and info.flags & P.IRQ_INFO_EVENTFD, f"irq {index}: {info}")
            if index == IRQ_INTX and info.count:
                expect(info.flags & P.IRQ_INFO_AUTOMASKED, "INTx is not automasked")
            self.irq_counts[index] = info.count
        expect_error(lambda: client.irq_info(self.info.num_irqs), errno.EINVAL, "irq index out of range")

    def config_space(self) -> None:
        client = self.client
        size = self.regions[CONFIG].size
        whole = client.region_read(CONFIG, 0, size)
        self.ids = struct.unpack_from("<HH", whole)
        expect(self.ids[0] not in (0, 0xFFFF), f"vendor id {self.ids[0]:#x}")
        expect(whole[0x0E] & 0x7F == 0, f"header type {whole[0x0E]:#x} is not type 0")
        for width in (1, 2, 4):
            for offset in range(0, 0x40, width):
                expect(client.region_read(CONFIG, offset, width) == whole[offset:offset + width],
                       f"config read of {width} at {offset:#x} differs from the whole read")
        client.region_write(CONFIG, 0, b"\xff\xff\xff\xff")          # vendor/device ids are read-only
        expect(client.region_read(CONFIG, 0, 4) == whole[:4], "vendor/device id changed by a write")
        for bar in range(6):
            offset = 0x10 + 4 * bar
            saved = client.region_read(CONFIG, offset, 4)
            client.region_write(CONFIG, offset, b"\xff\xff\xff\xff")
            sized = struct.unpack("<I", client.region_read(CONFIG, offset, 4))[0]
            region = self.regions.get(bar)
            if region is not None and region.size and not (bar and self.bar_is_high_half(bar, whole)):
                mask = sized & (~0xF if not sized & 1 else ~0x3) & 0xFFFFFFFF
                expect(mask and (-mask) & 0xFFFFFFFF == region.size, f"BAR{bar} sizes to {sized:#x}, "
                       f"region size {region.size:#x}")
            client.region_write(CONFIG, offset, saved)
        client.region_write(CONFIG, 0x04, struct.pack("<H", 0x0001))   # COMMAND: I/O decode on
        expect(client.region_read(CONFIG, 0x04, 2)[0] & 1, "COMMAND.IO does not stick")
        expect_error(lambda: client.region_read(CONFIG, size - 2, 4), errno.EINVAL, "config read past the end")

    @staticmethod
    def bar_is_high_half(bar: int, config: bytes) -> bool:
        below = struct.unpack_from("<I", config, 0x10 + 4 * (bar - 1))[0]
        return not below & 1 and (below >> 1) & 3 == 2     # the upper dword of a 64-bit BAR

    def bars(self) -> None:
        client = self.client
        for index in range(6):
            region = self.regions.get(index)
            if region is None or not region.size or not region.flags & P.REGION_FLAG_READ:
                continue
            count = min(region.size, MAX_WALKED_REGION)
            whole = client.region_read(index, 0, count)
            expect(len(whole) == count, f"BAR{index} read length")
            if index == BAR2 and self.idio16:
                self.idio16_registers()
            expect_error(lambda: client.region_read(index, region.size, 1), errno.EINVAL, f"BAR{index} past the end")
        expect_error(lambda: client.region_read(99, 0, 1), errno.EINVAL, "read of region 99")
        expect_error(lambda: client.region_write(99, 0, b"\0"), errno.EINVAL, "write of region 99")

    def idio16_registers(self) -> None:
        """Every BAR2 register of the IDIO-16, read and written byte by byte (digest 6.2)."""
        client = self.client
        read = lambda offset: client.region_read(BAR2, offset, 1)[0]   # noqa: E731
        write = lambda offset, value: client.region_write(BAR2, offset, bytes([value]))   # noqa: E731
        write(0x0, 0xA5)
        write(0x4, 0x3C)
        expect((read(0x0), read(0x4)) == (0xA5, 0x3C), "output latches do not read back")
        expect(client.region_read(BAR2, 0x0, 8)[0] == 0xA5, "an 8-byte access does not split into bytes")
        write(0x2, 0)                              # IRQ off
        read(0x3)                                  # filters on
        write(0x3, 0)                              # filters off
        for offset in range(0x7, 0x100):
            write(offset, 0xFF)
            expect(read(offset) == 0, f"unused register {offset:#x} reads back non-zero")
        write(0x5, 0xFF)
        write(0x6, 0xFF)
        write(0x1, 0)                              # clear status
        expect(read(0x6) == 0, "interrupt status not cleared")

    def write_multi(self) -> None:
        client = self.client
        if not client.server_capabilities.get("write_multiple"):
            expect_error(lambda: client.region_write_multi([(CONFIG, 0x3C, b"\x0b")]), (errno.EINVAL, errno.ENOTSUP),
                         "REGION_WRITE_MULTI without the capability")
            return
        entries = [(CONFIG, 0x3C, b"\x0b")]
        if self.idio16:
            entries += [(BAR2, 0x0, b"\x11"), (BAR2, 0x4, b"\x22")]
        expect(client.region_write_multi(entries) == len(entries), "REGION_WRITE_MULTI count")
        expect(client.region_read(CONFIG, 0x3C, 1) == b"\x0b", "interrupt line not written by WRITE_MULTI")
        if self.idio16:
            expect(client.region_read(BAR2, 0, 1) + client.region_read(BAR2, 4, 1) == b"\x11\x22",
                   "outputs not written by WRITE_MULTI")
        client.region_write_multi([(CONFIG, 0x3C, b"\x0a")], no_reply=True)
        expect(client.region_read(CONFIG, 0x3C, 1) == b"\x0a", "NO_REPLY WRITE_MULTI not applied")

    def interrupts(self) -> None:
        client = self.client
        if self.irq_counts.get(IRQ_INTX):
            self.intx(client)
        for index in (IRQ_ERR, IRQ_REQ):
            if not self.irq_counts.get(index):
                continue
            fd = _eventfd()
            try:
                client.enable_irq_eventfds(index, [fd])
                client.set_irqs(index, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, 0, 1)
                expect(_fired(fd) == 1, f"{P.IRQ_NAMES[index]} software trigger not delivered")
                self.report.interrupts += 1
                expect_error(lambda: client.set_irqs(index, P.IRQ_DATA_NONE | P.IRQ_ACTION_MASK, 0, 1),
                             errno.EINVAL, f"{P.IRQ_NAMES[index]} mask")
                client.disable_irqs(index)
            finally:
                os.close(fd)
        expect_error(lambda: client.set_irqs(IRQ_INTX, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, 0, 5), errno.EINVAL,
                     "SET_IRQS beyond the vectors")

    def intx(self, client) -> None:
        trigger, resample = _eventfd(), _eventfd()
        try:
            client.enable_irq_eventfds(IRQ_INTX, [trigger])
            client.set_irqs(IRQ_INTX, P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_UNMASK, 0, 1, [resample])
            client.set_irqs(IRQ_INTX, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, 0, 1)
            expect(_fired(trigger) == 1, "INTx software trigger not delivered")
            self.report.interrupts += 1
            client.set_irqs(IRQ_INTX, P.IRQ_DATA_NONE | P.IRQ_ACTION_UNMASK, 0, 1)
            client.set_irqs(IRQ_INTX, P.IRQ_DATA_NONE | P.IRQ_ACTION_MASK, 0, 1)
            client.set_irqs(IRQ_INTX, P.IRQ_DATA_BOOL | P.IRQ_ACTION_UNMASK, 0, 1, data=b"\x01")
            if self.idio16 and self.control_path:
                self.change_of_state(client, trigger, resample)
            client.disable_irqs(IRQ_INTX)
        finally:
            os.close(trigger)
            os.close(resample)

    def change_of_state(self, client, trigger: int, resample: int) -> None:
        """Host drives an input with IRQs enabled: the INTx eventfd fires, the status says why."""
        control = Control(self.control_path, self.timeout)
        try:
            client.region_write(CONFIG, 0x04, struct.pack("<H", 0x0001))   # INTx not disabled
            client.region_read(BAR2, 0x2, 1)                                 # enable the IRQ
            before = control.ok("get-inputs")["inputs"]
            control.ok("set-inputs", value=before ^ 0x0101)
            expect(_fired(trigger) == 1, "change-of-state interrupt not delivered")
            self.report.interrupts += 1
            expect(client.region_read(BAR2, 0x6, 1)[0] == 0x7, "status after both banks changed")
            expect(client.region_read(BAR2, 0x1, 1)[0] == (before ^ 0x0101) & 0xFF, "inputs 0-7 read back")
            os.eventfd_write(resample, 1)                                  # end of interrupt, level still high
            expect(_fired(trigger) == 1, "INTx not re-signalled after a resample with the level high")
            self.report.interrupts += 1
            client.region_write(BAR2, 0x1, b"\0")                            # clear: line drops
            client.set_irqs(IRQ_INTX, P.IRQ_DATA_NONE | P.IRQ_ACTION_UNMASK, 0, 1)
            expect(_fired(trigger, 0.05) == 0, "INTx signalled with the line low")
            expect(control.ok("query-status")["intx"] is False, "control says INTx is still asserted")
            client.region_write(BAR2, 0x2, b"\0")                            # disable the IRQ again
        finally:
            control.close()

    def dma(self) -> None:
        client = self.client
        size = 4 * P.PAGE_SIZE
        fd = _memfd(size)
        try:
            client.dma_map(0x100000, size, fd=fd)
            client.dma_map(0x200000, P.PAGE_SIZE, memory=bytearray(P.PAGE_SIZE))   # message-based
            client.dma_map(0x300000, size, fd=fd, flags=P.DMA_MAP_FLAG_READ)
        finally:
            os.close(fd)
        client.dma_logging_start(P.PAGE_SIZE, [(0x100000, size)])
        bitmap = client.dma_logging_report(0x100000, size)
        expect(len(bitmap) == codec.bitmap_size(size, P.PAGE_SIZE), f"dirty bitmap of {len(bitmap)} bytes")
        expect(not any(bitmap) or not self.idio16, "the IDIO-16 does no DMA, yet pages are dirty")
        client.dma_logging_stop()
        expect_error(lambda: client.dma_logging_report(0x100000, size), errno.EINVAL, "report after logging stopped")
        expect_error(lambda: client.dma_unmap(0x100000 + P.PAGE_SIZE, P.PAGE_SIZE), errno.EINVAL,
                     "unmap cutting a mapping")
        expect_error(lambda: client.dma_map(0x400000, P.PAGE_SIZE, flags=0x80), errno.EINVAL, "DMA_MAP unknown flag")
        reply = client.dma_unmap(0x200000, P.PAGE_SIZE)
        expect((reply.iova, reply.size) == (0x200000, P.PAGE_SIZE), f"DMA_UNMAP echo {reply}")
        client.dma_unmap(unmap_all=True)

    def reset(self) -> None:
        client = self.client
        if self.idio16:
            client.region_write(BAR2, 0x0, b"\x5a")
        client.reset()
        command = struct.unpack("<H", client.region_read(CONFIG, 0x04, 2))[0]
        expect(command == 0, f"COMMAND {command:#x} after DEVICE_RESET")
        if self.idio16:
            expect(client.region_read(BAR2, 0x0, 1) == b"\0", "outputs survive DEVICE_RESET")

    def migration(self) -> None:
        client = self.client
        expect(client.probe_feature(P.FEATURE_MIGRATION), "migration feature probe refused")
        expect(client.probe_feature(P.FEATURE_MIG_DEVICE_STATE, P.FEATURE_GET | P.FEATURE_SET),
               "device state feature probe refused")
        expect(not client.probe_feature(P.FEATURE_MIGRATION, P.FEATURE_SET), "migration flags are settable")
        expect_error(lambda: client.feature(5 | P.FEATURE_GET), errno.ENOTSUP, "unknown device feature")
        flags = client.migration_flags()
        expect(flags & P.MIGRATION_STOP_COPY, f"migration flags {flags:#x} lack STOP_COPY")
        expect(client.migration_state() == P.MIG_STATE_RUNNING, "not RUNNING before migrating")
        if flags & P.MIGRATION_PRE_COPY:
            client.set_migration_state(P.MIG_STATE_PRE_COPY)
            client.set_migration_state(P.MIG_STATE_RUNNING)
        if self.idio16:
            client.region_write(BAR2, 0x0, b"\xc3")
        client.set_migration_state(P.MIG_STATE_STOP)
        client.set_migration_state(P.MIG_STATE_STOP_COPY)
        expect_error(lambda: client.region_write(CONFIG, 0x3C, b"\x01"), errno.EBUSY, "region write in STOP_COPY")
        chunks = []
        while data := client.mig_data_read(16):
            chunks.append(data)
        blob = b"".join(chunks)
        expect(blob[:4] == b"VFUS", "migration stream without the VFUS envelope")
        client.set_migration_state(P.MIG_STATE_STOP)
        client.set_migration_state(P.MIG_STATE_RUNNING)
        if self.idio16:
            client.region_write(BAR2, 0x0, b"\x00")
        expect_error(lambda: client.mig_data_write(blob), errno.EINVAL, "MIG_DATA_WRITE while RUNNING")
        client = self.connect()                      # the destination's side: a new connection
        client.set_migration_state(P.MIG_STATE_RESUMING)
        foreign = wrap_state("another-device", 1, b"state")
        expect_error(lambda: client.mig_data_write(foreign), errno.EINVAL, "the stream of another device type")
        for pos in range(0, len(blob), 24):
            client.mig_data_write(blob[pos:pos + 24])
        client.set_migration_state(P.MIG_STATE_RUNNING)
        if self.idio16:
            expect(client.region_read(BAR2, 0x0, 1) == b"\xc3", "outputs not restored by RESUMING")
        client.set_migration_state(P.MIG_STATE_RESUMING)    # a destination that gives up: reset leaves it
        client.reset()
        expect(client.migration_state() == P.MIG_STATE_RUNNING, "DEVICE_RESET does not leave RESUMING")

    def errors(self) -> None:
        client = self.client
        for cmd in (99, P.DIRTY_PAGES, P.DMA_READ):
            def call(cmd=cmd):
                client.request(cmd, b"\0" * 8)
            expect_error(call, (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP), f"command {cmd}")
        expect_error(lambda: client.negotiate(CAPABILITIES), errno.EINVAL, "VERSION twice")
        expect_error(lambda: client.request(P.DEVICE_GET_INFO, P.DEVICE_INFO.pack(8, 0, 0, 0)), errno.EINVAL,
                     "DEVICE_GET_INFO argsz 8")
        expect_error(lambda: client.request(P.REGION_READ, b"\0" * 4), errno.EINVAL, "a truncated REGION_READ")
        largest = client.server_capabilities.get("max_data_xfer_size", P.DEFAULT_MAX_DATA_XFER_SIZE)
        expect_error(lambda: client.region_write(CONFIG, 0, bytes(largest)), errno.EINVAL,
                     f"a {largest}-byte write to config space")       # the largest message a server takes

    def malformed_frame(self) -> None:
        """A header whose size is below 16: the stream cannot be trusted, the server hangs up."""
        client = self.client
        client.sock.sendall(P.HEADER.pack(0x7777, P.DEVICE_GET_INFO, 8, 0, 0))
        client.sock.settimeout(self.timeout)
        try:
            data = client.sock.recv(64)
        except ConnectionResetError:
            data = b""
        expect(data == b"", f"server answered {data!r} to a malformed frame instead of closing")
        self.disconnect()

    def reconnection(self) -> None:
        client = self.connect()
        client.device_info()
        if self.idio16:
            client.region_write(BAR2, 0x4, b"\x99")
        self.disconnect()
        client = self.connect()
        if self.idio16:
            expect(client.region_read(BAR2, 0x4, 1) == b"\x99", "device state lost across reconnection")
        fd = _memfd(P.PAGE_SIZE)
        try:
            client.dma_map(0x100000, P.PAGE_SIZE, fd=fd)
        finally:
            os.close(fd)
        if self.irq_counts.get(IRQ_INTX):
            trigger = _eventfd()
            try:
                client.enable_irq_eventfds(IRQ_INTX, [trigger])
                client.set_irqs(IRQ_INTX, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, 0, 1)
                expect(_fired(trigger) == 1, "INTx not delivered after reconnecting")
                self.report.interrupts += 1
            finally:
                os.close(trigger)
        client.dma_unmap(unmap_all=True)

    def control(self) -> None:
        control = Control(self.control_path, self.timeout)
        try:
            commands = control.ok("query-commands")["commands"]
            expect({"set-inputs", "get-outputs", "query-status"} <= set(commands), f"control commands {commands}")
            control.ok("set-inputs", value=0xBEEF)
            expect(control.ok("get-inputs")["inputs"] == 0xBEEF, "inputs do not read back")
            control.ok("set-input", line=0, value=0)
            if self.idio16:
                expect(self.client.region_read(BAR2, 0x1, 1) == b"\xee", "BAR2 inputs differ from the control's")
                self.client.region_write(BAR2, 0x0, b"\x42")
                expect(control.ok("get-outputs")["outputs"] & 0xFF == 0x42, "outputs differ from BAR2's")
            saved = control.ok("save-state")
            control.ok("load-state", data=saved["data"])
            expect(control.call({"cmd": "no-such-command"})["error"]["class"] == "CommandNotFound",
                   "unknown control command")
            expect("error" in control.call({"cmd": "set-inputs", "value": 1 << 16}), "out-of-range input accepted")
            reply = control.call({"cmd": "query-status", "padding": "x" * CONTROL_LINE_LIMIT})
            expect("error" in reply, "an over-long control line accepted")
        finally:
            control.close()


def exercise(socket_path: str, control_path: str | None = None, *, terminate=None, alive=None,
             timeout: float = 5.0) -> ExerciseReport:
    """Walk every message the device at `socket_path` supports; see the module docstring.

    `control_path` adds the control-socket steps; `terminate()` (e.g. send SIGTERM and wait)
    ends the walk and must return the device's exit status, which must be 0. `alive()`, when
    given, returns False once the device process is gone: the walk then stops at once
    instead of waiting out a timeout per step."""
    walk = Walk(socket_path, control_path, timeout, alive)
    steps = [("VERSION", walk.version), ("DEVICE_GET_INFO", walk.device_info),
             ("GET_REGION_INFO", walk.region_infos), ("GET_IRQ_INFO", walk.irq_infos),
             ("config space", walk.config_space), ("BARs", walk.bars), ("REGION_WRITE_MULTI", walk.write_multi),
             ("SET_IRQS", walk.interrupts), ("DMA", walk.dma), ("DEVICE_RESET", walk.reset),
             ("migration", walk.migration), ("error replies", walk.errors),
             ("malformed frame", walk.malformed_frame), ("reconnection", walk.reconnection)]
    if control_path:
        steps.append(("control socket", walk.control))
    for name, function in steps:
        if not walk.alive():
            walk.report.steps.append(Step(name, False, "the device is gone"))
            break
        walk.step(name, function)
        if walk.info is None and name == "DEVICE_GET_INFO":
            break   # nothing to walk: every later step would repeat the same failure
    walk.disconnect()
    if terminate is not None:
        started = time.monotonic()
        status = terminate()
        walk.report.exit_status = status
        walk.report.steps.append(Step("SIGTERM", status == 0, "" if status == 0 else f"exit status {status}",
                                      round(time.monotonic() - started, 4)))
    return walk.report
