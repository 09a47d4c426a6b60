"""A conformance walk: one client session that sends every message a vfio-user device supports.

    report = exercise(socket_path, control_path=None, terminate=None)
    report.check()          # raises ConformanceError naming every step that failed

    report = exercise(socket_path, strict=False)     # learning a foreign device

Two modes. strict=True (the default) is the conformance test of the project's own device:
the exact errnos, the IDIO-16's registers and ABI, the shape of its migration stream.
strict=False is the learning walk for any other vfio-user device (libvfio-user's samples,
say): it drives every path the device offers and accepts every answer the protocol spec
allows, so a step fails only when an answer breaks the spec, and its detail names the spec
section (QEMU's docs/interop/vfio-user.rst, and the section of the shared protocol digest).
What the device chose where the spec leaves the choice open (an errno, a refused access, a
transition it refused) goes into the detail of a passing step. Nothing IDIO-16-specific
runs in that mode. Its steps are ordered for devices that serve a single client: every
path that fits in one session first; then the steps that may end a session (a malformed
frame, the largest message); reconnection last. When the device stops accepting
connections, the steps left are reported as not reached (Step.reached False, no failure)
rather than failed one by one.

The walk checks every reply (so it doubles as a conformance test) and keeps going after a
failing step, reconnecting when a step broke the connection, so one bug does not hide the
rest. It is what `jailer learn` runs while it records the device's syscalls: whatever code
path a device can take for a well-behaved or misbehaving client is taken at least once.

Strict steps: VERSION; DEVICE_GET_INFO; GET_REGION_INFO of every region (small argsz first, the
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

Learning steps, in this order: VERSION (proposing what QEMU proposes); DEVICE_GET_INFO;
GET_REGION_INFO of every region (mmap areas mapped); GET_REGION_IO_FDS; GET_IRQ_INFO; config
space (every width over the header, BAR and ROM sizing, the capability lists); BARs (every
region but config space: a bulk read, every width at sampled offsets, written back as read);
REGION_WRITE_MULTI; SET_IRQS on every index that has vectors; DMA (memfd and message-based
maps, dirty logging, maps over a mapping, the unmap forms); DEVICE_RESET; error replies;
migration on the one connection (PRE_COPY, STOP_COPY, STOP, RESUMING with the stream written
back, RUNNING); a malformed frame; the largest message, its first page sent alone;
reconnection (the old client's mappings and eventfds gone); the control socket when given.
A modern virtio block device (1af4:1042) also gets a guest driver's walk after DMA
(devices.virtio_blk.walk: queues, I/O of every kind, a descriptor loop, resets).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import select
import signal
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

from . import codec
from . import protocol as P
from .client import Client, ClientError
from .connection import close_fds
from .device import BAR2, CONFIG, IRQ_ERR, IRQ_INTX, IRQ_REQ, ROM
from .migration import wrap_state

IDIO16_IDS = (0x494F, 0x0DC8)
VIRTIO_BLK_IDS = (0x1AF4, 0x1042)
CAPABILITIES = {"max_msg_fds": P.MAX_MSG_FDS, "max_data_xfer_size": P.MAX_DATA_XFER_SIZE,
                "pgsizes": P.PAGE_SIZE, "max_dma_maps": P.MAX_DMA_MAPS, "write_multiple": True}
IRQ_WAIT = 2.0
CONTROL_LINE_LIMIT = 64 * 1024   # the control protocol's longest line; longer ones close the connection
MAX_WALKED_REGION = 1 << 16     # bytes of a BAR read byte by byte; bigger ones are sampled

# The learning walk proposes what QEMU proposes, the legacy `migration` object included, so
# a server may answer with everything it knows without leaving the proposed set.
LEARNING_CAPABILITIES = {**CAPABILITIES, "migration": {"pgsize": mmap.PAGESIZE, "max_bitmap_size": 256 << 20}}
MIGRATION_READ_SIZE = 4096          # a page per MIG_DATA_READ, as a VMM buffer would take it
MIGRATION_STREAM_LIMIT = 64 << 20   # stop reading a stream that never ends
MAX_DRIVEN_VECTORS = 64             # eventfds set up per IRQ index
LOST_CONNECTION = (errno.ECONNRESET, errno.EPIPE)
MIG_STATES = frozenset(P.MIG_STATE_NAMES)

# Where the learning walk's checks come from: the upstream spec's section, the digest's.
SPEC_HEADER = "spec 'Header': every command is answered unless No_reply, error replies carry only the header " \
              "(digest §1.2-1.3)"
SPEC_FRAMING = "spec 'Header': the message size covers the entire message, a reply acknowledges a previous " \
               "command with the same message ID (digest §1.2, §1.9)"
SPEC_NO_REPLY = "spec 'Header': a command with No_reply needs no reply (digest §1.3: none at all, even on error)"
SPEC_VERSION = "spec 'VFIO_USER_VERSION' (digest §2.1)"
SPEC_DMA_UNMAP = "spec 'VFIO_USER_DMA_UNMAP': address and size must match a mapping exactly, the reply echoes " \
                 "the request (digest §2.3)"
SPEC_DEVICE_INFO = "spec 'VFIO_USER_DEVICE_GET_INFO' (digest §2.4)"
SPEC_REGION_INFO = "spec 'VFIO_USER_DEVICE_GET_REGION_INFO' (digest §2.5)"
SPEC_IO_FDS = "spec 'VFIO_USER_DEVICE_GET_REGION_IO_FDS' (digest §2.6)"
SPEC_IRQ_INFO = "spec 'VFIO_USER_DEVICE_GET_IRQ_INFO' (digest §2.7)"
SPEC_SET_IRQS = "spec 'VFIO_USER_DEVICE_SET_IRQS' (digest §2.8)"
SPEC_REGION_ACCESS = "spec 'VFIO_USER_REGION_READ'/'VFIO_USER_REGION_WRITE': an access is to data of the region " \
                     "(digest §2.9)"
SPEC_TRANSFER_SIZE = "spec 'Read and Write Operations': count may be up to the peer's max_data_xfer_size " \
                     "(digest §1.7, §2.1)"
SPEC_RESET = "spec 'VFIO_USER_DEVICE_GET_INFO': VFIO_DEVICE_FLAGS_RESET means the device supports " \
             "VFIO_USER_DEVICE_RESET (digest §2.4, §2.11)"
SPEC_WRITE_MULTI = "spec 'VFIO_USER_REGION_WRITE_MULTI' (digest §2.12)"
SPEC_FEATURE = "spec 'VFIO_USER_DEVICE_FEATURE' (digest §2.13)"
SPEC_LOGGING = "spec 'VFIO_DEVICE_FEATURE_DMA_LOGGING_START/STOP/REPORT' (digest §2.13)"
SPEC_MIGRATION = "spec 'VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE' and its state transitions (digest §3)"
SPEC_MIG_DATA = "spec 'VFIO_USER_MIG_DATA_READ'/'VFIO_USER_MIG_DATA_WRITE' (digest §2.14)"
SPEC_MALFORMED = "a frame that cannot be parsed gets an error reply or a closed connection (digest §1.9)"
SPEC_DISCONNECT = "spec 'Client Disconnection': the previous client's memory regions are unmapped and its IRQ " \
                  "file descriptors closed (digest §7)"


class ConformanceError(AssertionError):
    """A reply was not what the protocol (or the device's documented ABI) requires."""


@dataclass
class Step:
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0
    reached: bool = True      # False: the walk never got to run it (the device stopped serving)


@dataclass
class ExerciseReport:
    steps: list = field(default_factory=list)
    commands: Counter = field(default_factory=Counter)   # command name -> times sent
    interrupts: int = 0                                   # eventfd signals observed
    exit_status: int | None = None                        # what terminate() returned

    @property
    def failures(self) -> list:
        return [step for step in self.steps if not step.ok and step.reached]

    @property
    def not_reached(self) -> list:
        return [step for step in self.steps if not step.reached]

    @property
    def ok(self) -> bool:
        return bool(self.steps) and not self.failures

    def check(self) -> "ExerciseReport":
        if not self.ok:
            raise ConformanceError("; ".join(f"{s.name}: {s.detail}" for s in self.failures) or "no step ran")
        return self

    def to_dict(self) -> dict:
        return {"ok": self.ok, "steps": [self._step_dict(s) for s in self.steps],
                "commands": dict(sorted(self.commands.items())), "interrupts": self.interrupts,
                "exit_status": self.exit_status}

    @staticmethod
    def _step_dict(step: Step) -> dict:
        record = {"name": step.name, "ok": step.ok, "detail": step.detail, "seconds": step.seconds}
        if not step.reached:
            record["reached"] = False
        return record


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


def _errno_text(err: int) -> str:
    return f"errno {err} ({errno.errorcode.get(err, '?')})"


def require(condition, what: str, section: str) -> None:
    """A learning-walk check: `what` says what the device did, `section` which spec text it breaks."""
    if not condition:
        raise ConformanceError(f"{what} (violates {section})")


def answer(call, /, *args, **kwargs):
    """(result, None) when the device accepts call(*args), (None, errno) when it sends an error reply.

    Anything else (no reply, a lost connection, a reply that breaks the protocol) propagates."""
    try:
        return call(*args, **kwargs), None
    except ClientError as exc:
        if not exc.reply:
            raise
        return None, exc.errno


def answered(err: int | None) -> str:
    return "accepted" if err is None else _errno_text(err)


def accepted(what: str, section: str, call, /, *args, **kwargs):
    """The result of call(*args), which the spec requires the device to accept."""
    result, err = answer(call, *args, **kwargs)
    require(err is None, f"{what}: refused with {_errno_text(err or 0)}", section)
    return result


def refused(what: str, section: str, call, /, *args, **kwargs) -> int:
    """The errno of the error reply the spec requires for call(*args) (any errno: the spec fixes none)."""
    _result, err = answer(call, *args, **kwargs)
    require(err is not None, f"{what}: accepted, where the device must answer with an error reply", section)
    return err


def sampled_offsets(size: int, width: int) -> list:
    """Aligned offsets of a `width`-byte access: all of them for a small region; for a big one
    the first and last 256 bytes and every page start."""
    last = size - width
    if size <= 256:
        return list(range(0, last + 1, width))
    chosen = set(range(0, 256, width)) | set(range(size - 256, last + 1, width)) | \
        set(range(0, last + 1, P.PAGE_SIZE))
    return sorted(chosen)


class DeviceStopped(Exception):
    """The device refuses new connections after serving at least one (learning walk only)."""


class BrokenStream(ConformanceError):
    """A violation after which the connection cannot be trusted: the next step starts a new one."""


class _CountingClient(Client):
    """A Client that counts the commands it sends (the report says what was covered), the
    replies it got on this connection and the last command sent (what a hang-up interrupted)."""

    counter: Counter

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies = 0
        self.last_command = ""

    def send(self, cmd: int, payload: bytes = b"", fds=None, no_reply: bool = False) -> int:
        self.counter[P.command_name(cmd)] += 1
        self.last_command = P.command_name(cmd)
        return super().send(cmd, payload, fds, no_reply)

    def request_large(self, cmd: int, payload: bytes, **kwargs):
        self.counter[P.command_name(cmd)] += 1
        self.last_command = P.command_name(cmd)
        return super().request_large(cmd, payload, **kwargs)

    def wait(self, msg_id: int):
        reply = super().wait(msg_id)
        self.replies += 1
        return reply


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

    def __init__(self, socket_path: str, control_path: str | None, timeout: float, alive=None, strict: bool = True):
        self.alive = alive or (lambda: True)
        self.path = socket_path
        self.control_path = control_path
        self.timeout = timeout
        self.strict = strict
        self.capabilities = CAPABILITIES if strict else LEARNING_CAPABILITIES
        self.report = ExerciseReport()
        self.client: _CountingClient | None = None
        self.info = None
        self.regions: dict = {}
        self.irq_counts: dict = {}
        self.irq_flags: dict = {}
        self.ids = (0, 0)
        self.connections = 0        # connections the device answered VERSION on
        self.served = 0             # ... and at least one command after it
        self.dropped_in = ""        # the step during which the device hung up unasked
        self.stopped = ""           # why the learning walk cannot go on
        self.needs_reset = False    # a learning step failed: reset the device on the next connection
        self.notes: list = []       # what the device chose where the spec leaves it open (this step)
        self.violations: list = []  # what broke the spec without stopping the step (this step)

    # --- plumbing -----------------------------------------------------------------------------

    def connect(self) -> _CountingClient:
        """A new connection, VERSION negotiated. In the learning walk a device that served a
        client and now refuses connections (or hangs up during VERSION) raises DeviceStopped."""
        self.disconnect()
        _CountingClient.counter = self.report.commands
        deadline = time.monotonic() + self.timeout
        retried = (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN)
        if not self.strict:      # a server that exits after its client may still have taken our connection
            retried += LOST_CONNECTION
        while True:   # the server takes its next client once it has noticed the last one leave
            try:
                self.client = _CountingClient.connect(self.path, capabilities=self.capabilities, timeout=self.timeout)
                self.connections += 1
                return self.client
            except ClientError as exc:
                if exc.errno not in retried or time.monotonic() > deadline or not self.alive():
                    if not self.strict and self.connections and exc.errno in retried:
                        raise DeviceStopped(f"cannot connect: {exc}") from None
                    raise
                time.sleep(0.02)

    def disconnect(self) -> None:
        if self.client is not None:
            if self.client.replies > 1:
                self.served += 1
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
        """The project's own device, whose registers the strict walk checks (never in learning)."""
        return self.strict and self.ids == IDIO16_IDS

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


    # --- the learning walk (strict=False): plumbing -----------------------------------------------

    def note(self, text: str) -> None:
        self.notes.append(text)

    def later(self, condition, what: str, section: str) -> None:
        """A check whose failure does not stop the step: the rest of it still runs (and is
        learned), the step fails when it ends."""
        if not condition:
            self.violations.append(f"{what} (violates {section})")

    def stop_reason(self) -> str:
        if self.dropped_in:
            return f"the device is gone: it closed the connection during '{self.dropped_in}' and accepts no new one"
        if self.served <= 1:
            return "the device stopped accepting connections after its first client"
        return f"the device stopped accepting connections after {self.served} clients"

    def learning_step(self, name: str, function) -> None:
        started = time.monotonic()
        self.notes, self.violations = [], []
        ok, reached, problem = True, True, ""
        try:
            if self.client is None:
                self.connect()
                if self.needs_reset:    # a failed step may have left migration or IRQ state behind
                    answer(self.client.reset)
                    self.needs_reset = False
            function()
        except DeviceStopped:
            self.stopped = self.stop_reason()
            ok, reached, problem = False, False, f"not reached: {self.stopped}"
        except ConnectionError as exc:
            ok, reached, problem = self.connection_lost(name) if self.client else (False, True, str(exc))
        except ClientError as exc:
            if not exc.reply and exc.errno in LOST_CONNECTION and self.client is not None:
                ok, reached, problem = self.connection_lost(name)
            else:
                ok, problem = False, f"ClientError: {exc}"
                if not exc.reply:       # no reply, or one that breaks the protocol
                    self.abandon_connection()
        except BrokenStream as exc:
            ok, problem = False, f"ConformanceError: {exc}"
            self.abandon_connection()
        except (ConformanceError, ValueError, struct.error, codec.DecodeError) as exc:
            # The device answered in good order, just not as the spec says: a device that serves
            # one client keeps its session for the steps after this one.
            ok, problem = False, f"{type(exc).__name__}: {exc}"
        except OSError as exc:
            ok, problem = False, f"{type(exc).__name__}: {exc}"
            self.abandon_connection()
        if not reached:
            detail = problem
        elif self.violations or not ok:
            ok, detail = False, "; ".join(self.violations + ([problem] if problem else []))
        else:
            detail = "; ".join(self.notes)
        self.report.steps.append(Step(name, ok, detail, round(time.monotonic() - started, 4), reached))

    def abandon_connection(self) -> None:
        """The next step starts on a new connection, after a DEVICE_RESET."""
        self.needs_reset = True
        self.disconnect()

    def connection_lost(self, name: str) -> tuple:
        """The device hung up during step `name`: (ok, reached, detail) of the step.

        A device that answered VERSION on a later connection and hung up before any command
        serves a single client (libvfio-user's samples without their restart loop do so);
        anywhere else a hang-up leaves a command without its reply."""
        client = self.client
        interrupted = client.last_command or "a command"
        right_after_version = client.replies <= 1 and self.connections > 1
        self.disconnect()
        failure = f"the device closed the connection instead of replying to {interrupted} (violates {SPEC_HEADER})"
        try:
            self.connect()
        except DeviceStopped:
            if right_after_version:
                self.stopped = (f"{self.stop_reason()} (it answered VERSION on connection {self.connections}, "
                                "then closed it)")
                return False, False, f"not reached: {self.stopped}"
            self.dropped_in = name
            self.stopped = self.stop_reason()
            return False, True, f"{failure}; it accepts no new connection since"
        except ClientError as exc:
            return False, True, f"{failure}; reconnecting failed: {exc}"
        self.needs_reset = True
        return False, True, failure

    def capability(self, key: str, default: int) -> int:
        value = self.client.server_capabilities.get(key, default)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default

    def transfer_limit(self) -> int:
        return min(self.capability("max_data_xfer_size", P.DEFAULT_MAX_DATA_XFER_SIZE), P.MAX_DATA_XFER_SIZE)

    def read_region(self, client, index: int, length: int) -> bytes:
        """`length` bytes from the start of a region, in transfers the device takes."""
        chunk = self.transfer_limit()
        return b"".join(client.region_read(index, offset, min(chunk, length - offset))
                        for offset in range(0, length, chunk))

    @staticmethod
    def region_name(index: int) -> str:
        return P.REGION_NAMES[index] if index < len(P.REGION_NAMES) else f"region {index}"

    @staticmethod
    def irq_name(index: int) -> str:
        return P.IRQ_NAMES[index] if index < len(P.IRQ_NAMES) else f"IRQ index {index}"

    @staticmethod
    def probe(client, feature: int, ops: int) -> bool:
        return answer(client.feature, feature | ops | P.FEATURE_PROBE)[1] is None

    @staticmethod
    def in_step(client, what: str, section: str = SPEC_FRAMING) -> None:
        """The connection is still in step: a request gets its own reply (success or error)."""
        try:
            answer(client.device_info)
        except ClientError as exc:
            if exc.errno != errno.EPROTO:
                raise
            raise BrokenStream(f"{what}, the device sent a reply no request was waiting for ({exc}) "
                               f"(violates {section})") from None

    # --- the learning walk: steps -----------------------------------------------------------------

    def learning_version(self) -> None:
        client = self.client
        major, minor = client.server_version
        require(major == P.VERSION_MAJOR, f"server major version {major}, proposed {P.VERSION_MAJOR}", SPEC_VERSION)
        require(minor <= P.VERSION_MINOR, f"server minor version {minor}, proposed {P.VERSION_MINOR}", SPEC_VERSION)
        caps = client.server_capabilities
        unproposed = sorted(set(caps) - set(LEARNING_CAPABILITIES))
        require(not unproposed, f"capabilities {unproposed} were not proposed by the client", SPEC_VERSION)
        for key in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"):
            if key in caps:
                require(isinstance(caps[key], int) and not isinstance(caps[key], bool) and caps[key] >= 0,
                        f"capability {key} = {caps[key]!r} is not a number", SPEC_VERSION)
        if "write_multiple" in caps:
            require(isinstance(caps["write_multiple"], bool), f"write_multiple = {caps['write_multiple']!r}",
                    SPEC_VERSION)
        self.note(f"version {major}.{minor}, capabilities {json.dumps(caps, sort_keys=True)}")

    def learning_device_info(self) -> None:
        info = self.client.device_info()
        require(info.flags & P.DEVICE_FLAG_PCI, f"device flags {info.flags:#x} lack VFIO_DEVICE_FLAGS_PCI (this "
                "protocol version only supports PCI devices)", SPEC_DEVICE_INFO)
        require(info.num_regions >= P.NUM_PCI_REGIONS, f"{info.num_regions} regions, a PCI device has at least "
                f"{P.NUM_PCI_REGIONS}", SPEC_DEVICE_INFO)
        self.info = info
        self.note(f"flags {info.flags:#x}, {info.num_regions} regions, {info.num_irqs} IRQ types")

    def learning_region_infos(self) -> None:
        client = self.client
        for index in range(self.info.num_regions):
            name = self.region_name(index)
            result, err = answer(client.region_info, index)
            if err is not None:
                self.later(False, f"GET_REGION_INFO of {name}, one of num_regions: {_errno_text(err)}",
                           SPEC_REGION_INFO)
                continue
            info, fd = result
            try:
                self.later(info.index == index, f"{name}: reply for region {info.index}", SPEC_REGION_INFO)
                if fd is not None:
                    self.later(info.flags & P.REGION_FLAG_MMAP, f"{name}: a file descriptor without the MMAP flag",
                               SPEC_REGION_INFO)
                if info.flags & P.REGION_FLAG_MMAP:
                    self.later(fd is not None, f"{name}: the MMAP flag without a file descriptor", SPEC_REGION_INFO)
                    problem = self.mmap_problem(info, fd) if fd is not None else None
                    self.later(problem is None, f"{name}: {problem}", SPEC_REGION_INFO)
            finally:
                if fd is not None:
                    os.close(fd)
            if index >= P.NUM_PCI_REGIONS and info.size:
                self.later(info.region_type is not None, f"{name}: a device-specific region without "
                           "VFIO_REGION_INFO_CAP_TYPE", SPEC_REGION_INFO)
            roomy, fd = accepted(f"GET_REGION_INFO of {name}", SPEC_REGION_INFO, client.region_info, index, 4096)
            if fd is not None:
                os.close(fd)
            if (roomy.flags, roomy.size) != (info.flags, info.size):
                self.note(f"{name} differs by argsz: {info.flags:#x}/{info.size:#x}, then "
                          f"{roomy.flags:#x}/{roomy.size:#x}")
            self.regions[index] = info
        config = self.regions.get(CONFIG)
        self.later(config is not None and config.size >= 0x40 and config.flags & P.REGION_FLAG_READ,
                   f"PCI config space region {config}",
                   f"{SPEC_DEVICE_INFO}: region 7 of a PCI device is its config space (digest §4.1)")
        refused("GET_REGION_INFO of a region beyond num_regions", SPEC_REGION_INFO,
                client.region_info, self.info.num_regions)
        self.note(f"GET_REGION_INFO with argsz 16: {answered(answer(client.region_info, CONFIG, 16)[1])}")
        self.note("regions " + ", ".join(f"{self.region_name(i)} {r.size:#x}/{r.flags:#x}"
                                         for i, r in self.regions.items() if r.size))

    @staticmethod
    def mmap_problem(info, fd: int) -> str | None:
        """Why the client cannot mmap() the region (or its sparse areas) with this fd, as the MMAP
        flag says it can; None when it can."""
        prot = (mmap.PROT_READ if info.flags & P.REGION_FLAG_READ else 0) | \
            (mmap.PROT_WRITE if info.flags & P.REGION_FLAG_WRITE else 0)
        for offset, length in info.sparse_areas or ((0, info.size),):
            if not length:
                continue
            try:
                mmap.mmap(fd, length, mmap.MAP_SHARED, prot or mmap.PROT_READ, offset=info.offset + offset).close()
            except (OSError, ValueError) as exc:
                return f"mmap() of {length:#x} bytes at offset {info.offset + offset:#x} fails: {exc}"
        return None

    def learning_region_io_fds(self) -> None:
        client = self.client
        for index, region in sorted(self.regions.items()):
            if region.size:
                self.region_io_fds(client, index)

    def region_io_fds(self, client, index: int) -> None:
        name = self.region_name(index)
        request = codec.encode_region_io_fds_request(codec.RegionIoFdsRequest(index, argsz=4096))
        reply, err = answer(client.request, P.DEVICE_GET_REGION_IO_FDS, request)
        if err is not None:
            self.note(f"{name}: {_errno_text(err)}")
            return
        try:
            require(len(reply.payload) >= P.REGION_IO_FDS.size, f"{name}: a {len(reply.payload)}-byte reply",
                    SPEC_IO_FDS)
            argsz, _flags, replied_index, count = P.REGION_IO_FDS.unpack_from(reply.payload)
            require(replied_index == index, f"{name}: reply for region {replied_index}", SPEC_IO_FDS)
            # No sub-regions and no fd is the minimal answer the digest allows (§2.6: "count 0").
            if count and argsz <= 4096:      # the entries came along; argsz says how big each one is
                stride = (argsz - P.REGION_IO_FDS.size) // count
                require(stride >= 24 and len(reply.payload) >= P.REGION_IO_FDS.size + stride * count,
                        f"{name}: {count} sub-regions in {len(reply.payload)} bytes", SPEC_IO_FDS)
                require(reply.fds, f"{name}: {count} sub-regions and no file descriptor", SPEC_IO_FDS)
                for entry in range(count):
                    at = P.REGION_IO_FDS.size + entry * stride + 16
                    fd_index = struct.unpack_from("<I", reply.payload, at)[0]
                    require(fd_index < len(reply.fds), f"{name}: sub-region {entry} names fd {fd_index} of "
                            f"{len(reply.fds)}", SPEC_IO_FDS)
            self.note(f"{name}: {count} sub-regions, {len(reply.fds)} fds")
        finally:
            close_fds(reply.fds)

    def learning_irq_infos(self) -> None:
        client = self.client
        for index in range(self.info.num_irqs):
            info = accepted(f"GET_IRQ_INFO of index {index}", SPEC_IRQ_INFO, client.irq_info, index)
            require(info.index == index, f"GET_IRQ_INFO of index {index} answered for index {info.index}",
                    SPEC_IRQ_INFO)
            self.irq_counts[index] = info.count
            self.irq_flags[index] = info.flags
        refused("GET_IRQ_INFO of an index beyond num_irqs", SPEC_IRQ_INFO, client.irq_info, self.info.num_irqs)
        self.note("irqs " + ", ".join(f"{self.irq_name(i)} {c}/{self.irq_flags[i]:#x}"
                                      for i, c in self.irq_counts.items()))

    def learning_config_space(self) -> None:
        """Every read width over the standard header and the writes QEMU forwards (BAR and ROM
        sizing, COMMAND, interrupt line), each writing back what was there; capabilities walked."""
        client = self.client
        config = self.regions.get(CONFIG)
        require(config is not None and config.size >= 0x40, f"PCI config space region {config}",
                f"{SPEC_DEVICE_INFO}: region 7 of a PCI device is its config space (digest §4.1)")
        size = config.size
        whole = accepted("reading the whole config space", SPEC_REGION_ACCESS, self.read_region, client, CONFIG, size)
        self.ids = struct.unpack_from("<HH", whole)
        refusals = Counter()
        for width in (1, 2, 4):
            for offset in range(0, 0x40, width):
                data, err = answer(client.region_read, CONFIG, offset, width)
                if err is not None:
                    refusals[f"{width}-byte reads"] += 1
                elif offset < 4 and data != whole[offset:offset + width]:
                    self.note(f"id bytes at {offset:#x} read {data.hex()}, {whole[offset:offset + width].hex()} before")
        err = answer(client.region_write, CONFIG, 0, b"\xff\xff\xff\xff")[1]
        if err is not None:
            self.note(f"a write to the vendor/device ids: {_errno_text(err)}")
        elif answer(client.region_read, CONFIG, 0, 4)[0] not in (None, whole[:4]):
            self.note("the vendor/device ids changed by a write")
            answer(client.region_write, CONFIG, 0, whole[:4])
        answer(client.region_write, CONFIG, 0x04, whole[0x04:0x06])
        for bar in range(6):
            self.size_bar(client, bar, 0x10 + 4 * bar, b"\xff\xff\xff\xff", whole)
        self.size_bar(client, ROM, 0x30, struct.pack("<I", 0xFFFFF800), whole)
        answer(client.region_write, CONFIG, 0x3C, whole[0x3C:0x3D])
        self.walk_capabilities(client, whole, size)
        refused("a config space read past its end", SPEC_REGION_ACCESS, client.region_read, CONFIG, size - 2, 4)
        if refusals:
            self.note("config space refused " + ", ".join(f"{n} {kind}" for kind, n in sorted(refusals.items())))
        self.note(f"device {self.ids[0]:04x}:{self.ids[1]:04x}")

    def size_bar(self, client, index: int, offset: int, probe: bytes, whole: bytes) -> None:
        """The sizing sequence a guest runs on a BAR register: write the probe, read, restore."""
        err = answer(client.region_write, CONFIG, offset, probe)[1]
        sized = answer(client.region_read, CONFIG, offset, 4)[0]
        answer(client.region_write, CONFIG, offset, whole[offset:offset + 4])
        region = self.regions.get(index)
        if err is not None or sized is None or index == ROM or region is None or not region.size \
                or region.size > 0xFFFFFFFF or (index and self.bar_is_high_half(index, whole)):
            return
        value = struct.unpack("<I", sized)[0]
        mask = value & (~0xF if not value & 1 else ~0x3) & 0xFFFFFFFF
        if not mask or (-mask) & 0xFFFFFFFF != region.size:
            self.note(f"BAR{index} sizes to {value:#x} for a region of {region.size:#x} bytes")

    def walk_capabilities(self, client, whole: bytes, size: int) -> None:
        """Read every capability header the lists point to (the device's capability code paths)."""
        seen = set()
        pointer = whole[0x34] & 0xFC if struct.unpack_from("<H", whole, 0x06)[0] & 0x10 else 0
        while 0x40 <= pointer <= size - 4 and pointer not in seen and len(seen) < 48:
            seen.add(pointer)
            header, err = answer(client.region_read, CONFIG, pointer, 4)
            if err is not None:
                break
            pointer = header[1] & 0xFC
        pointer = 0x100 if size > 0x100 else 0
        while 0x100 <= pointer <= size - 4 and pointer not in seen and len(seen) < 96:
            seen.add(pointer)
            header, err = answer(client.region_read, CONFIG, pointer, 4)
            if err is not None or header == b"\0\0\0\0":
                break
            pointer = (struct.unpack("<I", header)[0] >> 20) & 0xFFC
        if seen:
            self.note(f"{len(seen)} capability headers read")

    def learning_regions(self) -> None:
        """Every region but config space: a bulk read, then reads of every width at sampled
        offsets, each written back as it was read when the region is writable."""
        client = self.client
        for index, region in sorted(self.regions.items()):
            if index != CONFIG and region.size:
                self.walk_region(client, index, region)
        missing = self.info.num_regions
        refused(f"a read of region {missing}, beyond num_regions", SPEC_REGION_ACCESS,
                client.region_read, missing, 0, 1)
        refused(f"a write of region {missing}, beyond num_regions", SPEC_REGION_ACCESS,
                client.region_write, missing, 0, b"\0")

    def walk_region(self, client, index: int, region) -> None:
        name = self.region_name(index)
        if not region.flags & P.REGION_FLAG_READ:
            self.note(f"{name} has no READ flag; a read: {answered(answer(client.region_read, index, 0, 1)[1])}")
            return
        writable = region.flags & P.REGION_FLAG_WRITE
        refusals = Counter()
        reads = answer(self.read_region, client, index, min(region.size, MAX_WALKED_REGION))[1] is None
        for width in (1, 2, 4, 8):
            for offset in sampled_offsets(region.size, width):
                data, err = answer(client.region_read, index, offset, width)
                if err is not None:
                    refusals[f"{width}-byte reads"] += 1
                    continue
                reads += 1
                if writable and answer(client.region_write, index, offset, data)[1] is not None:
                    refusals[f"{width}-byte writes"] += 1
        self.later(reads, f"{name} has the READ flag yet refuses every read", SPEC_REGION_INFO)
        if refusals:
            self.note(f"{name} refused " + ", ".join(f"{n} {kind}" for kind, n in sorted(refusals.items())))
        refused(f"a read past the end of {name}", SPEC_REGION_ACCESS, client.region_read, index, region.size, 1)
        if writable:
            refused(f"a write past the end of {name}", SPEC_REGION_ACCESS,
                    client.region_write, index, region.size, b"\0")

    def learning_write_multi(self) -> None:
        client = self.client
        line = accepted("reading the interrupt line", SPEC_REGION_ACCESS, client.region_read, CONFIG, 0x3C, 1)
        entries = [(CONFIG, 0x3C, line)]
        if client.server_capabilities.get("write_multiple") is not True:
            self.note(f"not advertised; sent anyway: {answered(answer(client.region_write_multi, entries)[1])}")
            return
        completed = accepted("REGION_WRITE_MULTI", SPEC_WRITE_MULTI, client.region_write_multi, entries)
        require(completed <= len(entries), f"{completed} writes completed of {len(entries)} sent", SPEC_WRITE_MULTI)
        client.region_write_multi(entries, no_reply=True)
        self.in_step(client, "after a No_reply REGION_WRITE_MULTI", SPEC_NO_REPLY)

    def learning_interrupts(self) -> None:
        client = self.client
        max_fds = self.capability("max_msg_fds", 1)     # the spec's default when the server does not say
        driven = [index for index, count in sorted(self.irq_counts.items()) if count]
        for index in driven:
            self.drive_irq_index(client, index, self.irq_counts[index], max_fds)
        if driven:
            index, count = driven[0], self.irq_counts[driven[0]]
            refused(f"SET_IRQS of {self.irq_name(index)} vector {count}, which has {count}",
                    f"{SPEC_SET_IRQS} and {SPEC_IRQ_INFO}: count is the number of interrupts of the type",
                    client.set_irqs, index, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, count, 1)
            refused("SET_IRQS with two DATA flags", f"{SPEC_SET_IRQS}: the flags are mutually exclusive",
                    client.set_irqs, index, P.IRQ_DATA_NONE | P.IRQ_DATA_BOOL | P.IRQ_ACTION_TRIGGER, 0, 1,
                    data=b"\x01")
        refused("SET_IRQS of an index beyond num_irqs", SPEC_SET_IRQS,
                client.set_irqs, self.info.num_irqs, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, 0, 1)

    def drive_irq_index(self, client, index: int, count: int, max_fds: int) -> None:
        """Trigger eventfds (in messages of at most max_msg_fds), a software trigger that must
        reach them, mask/unmask in every form, mask/unmask eventfds, de-assign, disable."""
        name = self.irq_name(index)
        flags = self.irq_flags.get(index, 0)
        vectors = min(count, MAX_DRIVEN_VECTORS)
        triggers = [_eventfd() for _ in range(vectors)]
        notifiers = [_eventfd(), _eventfd()]
        try:
            for start in range(0, vectors, max_fds):
                err = answer(client.enable_irq_eventfds, index, triggers[start:start + max_fds], start)[1]
                if err is not None:
                    require(not flags & P.IRQ_INFO_EVENTFD, f"{name}: trigger eventfds refused with "
                            f"{_errno_text(err)}, though GET_IRQ_INFO sets VFIO_IRQ_INFO_EVENTFD", SPEC_IRQ_INFO)
                    self.note(f"{name}: trigger eventfds {_errno_text(err)}")
                    return
            err = answer(client.set_irqs, index, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, 0, 1)[1]
            if err is None:
                fired = _fired(triggers[0])
                self.later(fired, f"{name}: a software trigger was accepted, its eventfd never signalled",
                           SPEC_SET_IRQS)
                self.report.interrupts += bool(fired)
            else:
                self.note(f"{name}: software trigger {_errno_text(err)}")
            refusals = []
            for action in (P.IRQ_ACTION_MASK, P.IRQ_ACTION_UNMASK):
                for data_flag, data in ((P.IRQ_DATA_NONE, b""), (P.IRQ_DATA_BOOL, b"\x01")):
                    err = answer(client.set_irqs, index, data_flag | action, 0, 1, data=data)[1]
                    if err is not None:
                        refusals.append(f"{data_flag | action:#x} ({errno.errorcode.get(err, err)})")
            self.later(not (refusals and flags & P.IRQ_INFO_MASKABLE), f"{name}: mask/unmask flags "
                       f"{', '.join(refusals)} refused, though GET_IRQ_INFO sets VFIO_IRQ_INFO_MASKABLE", SPEC_IRQ_INFO)
            boolean = P.IRQ_DATA_BOOL | P.IRQ_ACTION_TRIGGER
            if answer(client.set_irqs, index, boolean, 0, 1, data=b"\x01")[1] is None and _fired(triggers[0], 0.2):
                self.report.interrupts += 1
            for action, fd in zip((P.IRQ_ACTION_UNMASK, P.IRQ_ACTION_MASK), notifiers, strict=True):
                if answer(client.set_irqs, index, P.IRQ_DATA_EVENTFD | action, 0, 1, [fd])[1] is not None:
                    refusals.append(f"{P.IRQ_DATA_EVENTFD | action:#x}")
            if answer(client.set_irqs, index, P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_TRIGGER, 0, vectors)[1] is not None:
                refusals.append("de-assign")
            if answer(client.disable_irqs, index)[1] is not None:
                refusals.append("disable")
            if refusals:
                self.note(f"{name} refused " + ", ".join(refusals))
        finally:
            close_fds(triggers + notifiers)

    def learning_dma(self) -> None:
        """Maps backed by a memfd (read-write and read-only) and one without an fd (served by
        DMA_READ/DMA_WRITE messages), dirty logging when offered, maps over an existing
        mapping, the unmap forms."""
        client = self.client
        size = 4 * P.PAGE_SIZE
        mapped = {}
        fd = _memfd(size)
        try:
            for iova, length, how in ((0x100000, size, {"fd": fd}),
                                      (0x200000, P.PAGE_SIZE, {"memory": bytearray(P.PAGE_SIZE)}),
                                      (0x300000, size, {"fd": fd, "flags": P.DMA_MAP_FLAG_READ})):
                err = answer(client.dma_map, iova, length, **how)[1]
                if err is None:
                    mapped[iova] = length
                else:
                    self.note(f"DMA_MAP at {iova:#x}: {_errno_text(err)}")
            if answer(client.dma_map, 0x400000, P.PAGE_SIZE, flags=0x80)[1] is None:
                mapped[0x400000] = P.PAGE_SIZE
                self.note("DMA_MAP with an unknown flag accepted")
            if 0x100000 in mapped:
                self.dirty_logging(client, 0x100000, size, 0x200000 if 0x200000 in mapped else None)
                err = refused("an unmap cutting a mapping", SPEC_DMA_UNMAP,
                              client.dma_unmap, 0x100000 + P.PAGE_SIZE, P.PAGE_SIZE)
                self.note(f"an unmap cutting a mapping: {_errno_text(err)}")
                self.map_over_existing(client, fd, size, mapped)
        finally:
            os.close(fd)
        for iova in (0x200000, 0x300000):
            if iova in mapped:
                length = mapped.pop(iova)
                reply = accepted(f"DMA_UNMAP of the mapping at {iova:#x}", SPEC_DMA_UNMAP,
                                 client.dma_unmap, iova, length)
                self.later((reply.iova, reply.size) == (iova, length), f"DMA_UNMAP echoes {reply}", SPEC_DMA_UNMAP)
        err = answer(client.dma_unmap, unmap_all=True)[1]
        if err is not None:    # UNMAP_ALL is QEMU's and libvfio-user's; the spec leaves the flags unused
            self.note(f"DMA_UNMAP_FLAG_ALL: {_errno_text(err)}")
            for iova, length in mapped.items():
                accepted(f"DMA_UNMAP of the mapping at {iova:#x}", SPEC_DMA_UNMAP, client.dma_unmap, iova, length)

    def map_over_existing(self, client, fd: int, size: int, mapped: dict) -> None:
        """Maps over an existing mapping: the same one again, and one overlapping it.

        The spec wants EEXIST for both, but QEMU aborts when a DMA_MAP fails at run time, so
        servers take an identical re-map (libvfio-user, this project's device) and some take
        overlaps too (digest §8.2 item 9, §8.7): the answer is recorded, not judged."""
        answers = []
        for what, iova, length in (("the same mapping again", 0x100000, size),
                                   ("an overlapping mapping", 0x100000 + P.PAGE_SIZE, P.PAGE_SIZE)):
            err = answer(client.dma_map, iova, length, fd=fd)[1]
            if err is None and iova not in mapped:
                mapped[iova] = length
            answers.append(f"{what} {answered(err)}")
        self.note("DMA_MAP over an existing mapping (the spec says EEXIST): " + ", ".join(answers))

    def dirty_logging(self, client, iova: int, size: int, message_based: int | None) -> None:
        if not self.probe(client, P.FEATURE_DMA_LOGGING_START, P.FEATURE_SET):
            self.note("no dirty logging (DMA_LOGGING_START probe refused)")
            return
        request = codec.encode_logging_start(P.PAGE_SIZE, [(iova, size)])
        reply = accepted("DMA_LOGGING_START", SPEC_LOGGING,
                         client.feature, P.FEATURE_DMA_LOGGING_START | P.FEATURE_SET, request)
        require(len(reply.data) >= P.LOGGING_CONTROL.size, f"DMA_LOGGING_START answered {reply.data.hex()}",
                f"{SPEC_FEATURE}: a SET reply carries the request payload")
        page_size = P.LOGGING_CONTROL.unpack_from(reply.data)[0]
        require(page_size and not page_size & (page_size - 1), f"DMA_LOGGING_START chose page size {page_size}",
                SPEC_LOGGING)
        reporting = self.probe(client, P.FEATURE_DMA_LOGGING_REPORT, P.FEATURE_GET)
        if reporting:
            bitmap = accepted("DMA_LOGGING_REPORT while logging", SPEC_LOGGING, client.dma_logging_report, iova, size)
            pages = size // P.PAGE_SIZE
            require(len(bitmap) * 8 >= pages, f"a {len(bitmap)}-byte bitmap for {pages} pages", SPEC_LOGGING)
            require(not int.from_bytes(bitmap, "little") >> pages, "bits set outside of the requested range",
                    SPEC_LOGGING)
            if message_based is not None:
                err = answer(client.dma_logging_report, message_based, P.PAGE_SIZE)[1]
                self.note(f"DMA_LOGGING_REPORT of a message-based mapping: {answered(err)}")
        accepted("DMA_LOGGING_STOP", SPEC_LOGGING, client.dma_logging_stop)
        if reporting:
            refused("DMA_LOGGING_REPORT after logging stopped", f"{SPEC_LOGGING}: a report is only valid while logging",
                    client.dma_logging_report, iova, size)

    def learning_virtio_blk(self) -> None:
        """What a guest's virtio_blk driver does (devices.virtio_blk.walk)."""
        from devices.virtio_blk.walk import WalkError, walk

        try:
            for note in walk(self.client):
                self.note(note)
        except WalkError as exc:
            raise ConformanceError(f"virtio-blk: {exc}") from None

    def learning_reset(self) -> None:
        client = self.client
        if self.info.flags & P.DEVICE_FLAG_RESET:
            accepted("DEVICE_RESET", SPEC_RESET, client.reset)
        else:
            self.note(f"DEVICE_RESET without VFIO_DEVICE_FLAGS_RESET: {answered(answer(client.reset)[1])}")
        self.in_step(client, "after DEVICE_RESET")

    def learning_errors(self) -> None:
        """Requests the device must refuse (any errno), and some whose answer is its choice."""
        client = self.client
        for cmd, section in ((99, "spec 'Commands': there is no command 99 (digest §2.0)"),
                             (P.DMA_READ, "spec 'Commands': DMA_READ goes from server to client (digest §2.0)")):
            err = refused(f"{P.command_name(cmd)} sent to the device", section, client.request, cmd, b"\0" * 16)
            self.note(f"{P.command_name(cmd)}: {_errno_text(err)}")
        for what, call, args in (("DIRTY_PAGES (migration v1, removed)", client.request, (P.DIRTY_PAGES, b"\0" * 8)),
                                 ("VERSION twice", client.negotiate, (self.capabilities,)),
                                 ("DEVICE_GET_INFO argsz 8", client.request,
                                  (P.DEVICE_GET_INFO, P.DEVICE_INFO.pack(8, 0, 0, 0)))):
            self.note(f"{what}: {answered(answer(call, *args)[1])}")
        refused("a REGION_READ of 4 payload bytes", f"{SPEC_REGION_ACCESS}: the request is 16 bytes",
                client.request, P.REGION_READ, b"\0" * 4)
        refused("a REGION_WRITE whose count says 8 bytes and carries 4", SPEC_REGION_ACCESS,
                client.request, P.REGION_WRITE, P.REGION_ACCESS.pack(0x3C, CONFIG, 8) + b"\0" * 4)
        client.send(P.REGION_WRITE, P.REGION_ACCESS.pack(0, self.info.num_regions, 1) + b"\0", no_reply=True)
        self.in_step(client, "after a failing No_reply REGION_WRITE", SPEC_NO_REPLY)
        line = accepted("reading the interrupt line", SPEC_REGION_ACCESS, client.region_read, CONFIG, 0x3C, 1)
        client.region_write(CONFIG, 0x3C, line, no_reply=True)
        self.in_step(client, "after a No_reply REGION_WRITE", SPEC_NO_REPLY)

    def learning_migration(self) -> None:
        """Feature probes and refusals, then a round trip on this one connection: the saving
        states read to their end (PRE_COPY first when offered), an illegal STOP_COPY ->
        PRE_COPY, STOP, RESUMING with the stream written back, RUNNING."""
        client = self.client
        refused("DEVICE_FEATURE of feature 5", f"{SPEC_FEATURE}: vfio-user supports only features 1, 2, 6, 7 and 8",
                client.feature, 5 | P.FEATURE_GET)
        refused("DEVICE_FEATURE with GET and SET", f"{SPEC_FEATURE}: GET and SET are exclusive except with PROBE",
                client.feature, P.FEATURE_MIG_DEVICE_STATE | P.FEATURE_GET | P.FEATURE_SET)
        if not self.probe(client, P.FEATURE_MIGRATION, P.FEATURE_GET):
            err = answer(client.mig_data_read, MIGRATION_READ_SIZE)[1]
            self.note(f"no migration (MIGRATION probe refused); MIG_DATA_READ: {answered(err)}")
            return
        require(self.probe(client, P.FEATURE_MIG_DEVICE_STATE, P.FEATURE_GET | P.FEATURE_SET),
                "MIGRATION is offered without MIG_DEVICE_STATE GET and SET", SPEC_FEATURE)
        flags = accepted("DEVICE_FEATURE GET MIGRATION", SPEC_FEATURE, client.migration_flags)
        require(flags & P.MIGRATION_STOP_COPY, f"migration flags {flags:#x} lack VFIO_MIGRATION_STOP_COPY",
                SPEC_FEATURE)
        state = self.migration_state(client)
        self.note(f"migration flags {flags:#x}, state {P.MIG_STATE_NAMES[state]}")
        refused("a SET of the ERROR state", f"{SPEC_MIGRATION}: ERROR cannot be specified as a device state",
                client.set_migration_state, P.MIG_STATE_ERROR)
        if not flags & P.MIGRATION_P2P:
            refused("a SET of RUNNING_P2P without VFIO_MIGRATION_P2P",
                    f"{SPEC_MIGRATION}: the flags say which states besides RUNNING and ERROR exist",
                    client.set_migration_state, P.MIG_STATE_RUNNING_P2P)
        self.note(f"MIG_DATA_READ while RUNNING: {answered(answer(client.mig_data_read, MIGRATION_READ_SIZE)[1])}")
        self.note(f"MIG_DATA_WRITE while RUNNING: {answered(answer(client.mig_data_write, bytes(8))[1])}")
        if state != P.MIG_STATE_RUNNING:
            self.transition(client, P.MIG_STATE_RUNNING)
        stream = []
        if flags & P.MIGRATION_PRE_COPY:
            self.transition(client, P.MIG_STATE_PRE_COPY)
            stream += self.read_migration_stream(client)
        self.transition(client, P.MIG_STATE_STOP_COPY)
        stream += self.read_migration_stream(client)
        if flags & P.MIGRATION_PRE_COPY:
            refused("STOP_COPY -> PRE_COPY", f"{SPEC_MIGRATION}: the transition is explicitly not allowed",
                    client.set_migration_state, P.MIG_STATE_PRE_COPY)
        self.transition(client, P.MIG_STATE_STOP)
        self.transition(client, P.MIG_STATE_RESUMING)
        self.write_migration_stream(client, stream)
        err = answer(client.set_migration_state, P.MIG_STATE_RUNNING)[1]
        final = self.migration_state(client)
        if err is None:
            require(final == P.MIG_STATE_RUNNING, f"state {P.MIG_STATE_NAMES[final]} after a SET of RUNNING "
                    "succeeded", f"{SPEC_MIGRATION}: the transition completes before the reply")
            return
        self.note(f"RESUMING -> RUNNING: {_errno_text(err)}, the device stays in {P.MIG_STATE_NAMES[final]}")
        if final == P.MIG_STATE_ERROR:
            accepted("DEVICE_RESET in the ERROR state", SPEC_MIGRATION, client.reset)
            require(self.migration_state(client) == P.MIG_STATE_RUNNING, "DEVICE_RESET does not leave ERROR",
                    f"{SPEC_MIGRATION}: DEVICE_RESET returns from ERROR to RUNNING")

    def migration_state(self, client) -> int:
        state = accepted("DEVICE_FEATURE GET MIG_DEVICE_STATE", SPEC_MIGRATION, client.migration_state)
        require(state in MIG_STATES, f"device state {state}", SPEC_MIGRATION)
        return state

    @staticmethod
    def transition(client, state: int) -> None:
        name = P.MIG_STATE_NAMES[state]
        request = P.MIG_STATE.pack(state, 0xFFFFFFFF)
        flags = P.FEATURE_MIG_DEVICE_STATE | P.FEATURE_SET
        reply = accepted(f"a SET of {name}", f"{SPEC_MIGRATION}: the arcs to it must be supported",
                         client.feature, flags, request)
        require((reply.flags, reply.data) == (flags, request), f"a SET of {name} answered {reply}",
                f"{SPEC_FEATURE}: the reply to a SET carries the request payload")

    @staticmethod
    def read_migration_stream(client) -> list:
        """Reads of MIGRATION_READ_SIZE until a short one, which ends the data."""
        chunks, total = [], 0
        while total < MIGRATION_STREAM_LIMIT:
            data = accepted("MIG_DATA_READ in a saving state", SPEC_MIG_DATA, client.mig_data_read, MIGRATION_READ_SIZE)
            require(len(data) <= MIGRATION_READ_SIZE, f"MIG_DATA_READ of {MIGRATION_READ_SIZE} bytes returned "
                    f"{len(data)}", SPEC_MIG_DATA)
            chunks.append(data)
            total += len(data)
            if len(data) < MIGRATION_READ_SIZE:
                return chunks
        raise ConformanceError(f"the migration stream goes on past {MIGRATION_STREAM_LIMIT} bytes")

    def write_migration_stream(self, client, stream: list) -> None:
        """The stream in the pieces it was read in; a refused piece ends it (the device's call)."""
        written, total = 0, sum(map(len, stream))
        for chunk in filter(None, stream):
            err = answer(client.mig_data_write, chunk)[1]
            if err is not None:
                self.note(f"MIG_DATA_WRITE after {written} of {total} bytes: {_errno_text(err)}")
                break
            written += len(chunk)
        self.note(f"stream of {total} bytes in {len(stream)} reads")

    def learning_malformed_frame(self) -> None:
        """A header whose size is below 16: an error reply or a closed connection, either will do."""
        client = self.client
        client.sock.sendall(P.HEADER.pack(0x7777, P.DEVICE_GET_INFO, 8, 0, 0))
        header = self.receive_exactly(client, P.HEADER_SIZE)
        if header is None:
            self.note("the device closed the connection")
            self.disconnect()
            return
        _msg_id, _cmd, size, flags, err = P.HEADER.unpack(header)
        if not (flags & P.FLAG_TYPE_MASK == P.TYPE_REPLY and flags & P.FLAG_ERROR):
            raise BrokenStream(f"the device answered {header.hex()}, neither an error reply nor a closed connection "
                               f"(violates {SPEC_MALFORMED})")
        if size != P.HEADER_SIZE:
            raise BrokenStream(f"an error reply of {size} bytes (violates {SPEC_HEADER})")
        self.note(f"error reply, {_errno_text(err)}")
        try:
            self.in_step(client, "after a malformed frame")
        except ClientError as exc:
            if exc.errno not in LOST_CONNECTION:
                raise
            self.note("then the device closed the connection")
            self.disconnect()

    def receive_exactly(self, client, count: int) -> bytes | None:
        """`count` raw bytes from the device, or None when it closes the connection first."""
        data = b""
        deadline = time.monotonic() + self.timeout
        while len(data) < count:
            if not select.select([client.sock], [], [], max(deadline - time.monotonic(), 0))[0]:
                raise BrokenStream(f"neither a reply nor a closed connection within {self.timeout}s "
                                   f"(violates {SPEC_MALFORMED})")
            try:
                chunk = client.sock.recv(count - len(data))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def learning_largest_message(self) -> None:
        """A REGION_WRITE with count = the device's max_data_xfer_size, to config space (so it
        must be refused), its first page sent alone: a stream socket may deliver any message
        in pieces, and one bigger than the socket buffer always arrives so."""
        client = self.client
        largest = self.transfer_limit()
        payload = P.REGION_ACCESS.pack(0, CONFIG, largest) + bytes(largest)
        what = f"a {largest}-byte REGION_WRITE to config space (count = max_data_xfer_size), sent in two pieces"
        try:
            err = answer(client.request_large, P.REGION_WRITE, payload, split_at=P.PAGE_SIZE)[1]
        except ClientError as exc:
            if exc.errno != errno.EPROTO:
                raise
            raise BrokenStream(f"{what}: the device answered messages that were never sent, it lost the message "
                               f"boundary ({exc}) (violates {SPEC_FRAMING}; {SPEC_TRANSFER_SIZE})") from None
        require(err is not None, f"{what}: accepted", SPEC_REGION_ACCESS)
        self.note(f"{what}: {_errno_text(err)}")
        try:
            self.in_step(client, f"after {what}")
        except BrokenStream as exc:
            raise BrokenStream(f"{exc}; {SPEC_TRANSFER_SIZE}") from None

    def learning_reconnection(self) -> None:
        """A new client finds the device state kept, the old client's DMA mappings and IRQ
        eventfds gone, and sets both up again."""
        client = self.connect()
        accepted("DEVICE_GET_INFO", SPEC_DEVICE_INFO, client.device_info)
        line = answer(client.region_read, CONFIG, 0x3C, 1)[0]
        marker = None
        if line is not None and answer(client.region_write, CONFIG, 0x3C, bytes([line[0] ^ 0x5A]))[1] is None:
            marker = answer(client.region_read, CONFIG, 0x3C, 1)[0]
        index = next((i for i, count in sorted(self.irq_counts.items()) if count), None)
        fd, old_trigger = _memfd(2 * P.PAGE_SIZE), _eventfd()
        try:
            mapped = answer(client.dma_map, 0x100000, 2 * P.PAGE_SIZE, fd=fd)[1] is None
            registered = index is not None and answer(client.enable_irq_eventfds, index, [old_trigger])[1] is None
            self.disconnect()
            client = self.connect()
            accepted("DEVICE_GET_INFO", SPEC_DEVICE_INFO, client.device_info)
            if marker is not None:
                after = answer(client.region_read, CONFIG, 0x3C, 1)[0]
                self.note("the interrupt line written before reconnecting " + (
                    "kept" if after == marker else f"reads {after!r}, not {marker!r} (device state should be kept)"))
                answer(client.region_write, CONFIG, 0x3C, line)
            trigger = P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER
            if registered and answer(client.set_irqs, index, trigger, 0, 1)[1] is None:
                require(not _fired(old_trigger, 0.2), f"a trigger of {self.irq_name(index)} signalled the previous "
                        "client's eventfd", SPEC_DISCONNECT)
            if mapped:    # refused only while the previous client's mapping is still there
                accepted("a DMA_MAP of part of the previous client's mapping", SPEC_DISCONNECT,
                         client.dma_map, 0x100000, P.PAGE_SIZE, fd=fd)
            if registered:
                self.irq_after_reconnecting(client, index)
            if mapped and answer(client.dma_unmap, unmap_all=True)[1] is not None:
                answer(client.dma_unmap, 0x100000, P.PAGE_SIZE)
        finally:
            os.close(fd)
            os.close(old_trigger)

    def irq_after_reconnecting(self, client, index: int) -> None:
        trigger = _eventfd()
        try:
            accepted("a new trigger eventfd", SPEC_SET_IRQS, client.enable_irq_eventfds, index, [trigger])
            if answer(client.set_irqs, index, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, 0, 1)[1] is None:
                require(_fired(trigger), f"{self.irq_name(index)}: a software trigger was accepted, its eventfd "
                        "never signalled", SPEC_SET_IRQS)
                self.report.interrupts += 1
            answer(client.disable_irqs, index)
        finally:
            os.close(trigger)

    def learning_steps(self) -> list:
        steps = [("VERSION", self.learning_version), ("DEVICE_GET_INFO", self.learning_device_info),
                 ("GET_REGION_INFO", self.learning_region_infos), ("GET_REGION_IO_FDS", self.learning_region_io_fds),
                 ("GET_IRQ_INFO", self.learning_irq_infos), ("config space", self.learning_config_space),
                 ("BARs", self.learning_regions), ("REGION_WRITE_MULTI", self.learning_write_multi),
                 ("SET_IRQS", self.learning_interrupts), ("DMA", self.learning_dma),
                 ("virtio-blk", self.learning_virtio_blk), ("DEVICE_RESET", self.learning_reset), ("error replies", self.learning_errors),
                 ("migration", self.learning_migration), ("malformed frame", self.learning_malformed_frame),
                 ("largest message", self.learning_largest_message), ("reconnection", self.learning_reconnection)]
        if self.control_path:
            steps.append(("control socket", self.control))
        return steps

    def run_learning(self) -> None:
        for name, function in self.learning_steps():
            if name == "virtio-blk" and self.ids != VIRTIO_BLK_IDS:
                continue                # a guest driver's walk, for that device only
            if not self.stopped and not self.alive():
                if not self.connections:
                    self.report.steps.append(Step(name, False, "the device is gone"))
                    self.stopped = "the device is gone"
                    continue
                self.stopped = self.stop_reason()
            if self.stopped:
                self.report.steps.append(Step(name, False, f"not reached: {self.stopped}", reached=False))
                continue
            self.learning_step(name, function)
            if name == "DEVICE_GET_INFO" and self.info is None and not self.stopped:
                self.stopped = "DEVICE_GET_INFO failed, so there is nothing to walk"


def exercise(socket_path: str, control_path: str | None = None, *, terminate=None, alive=None,
             timeout: float = 5.0, strict: bool = True) -> ExerciseReport:
    """Walk every message the device at `socket_path` supports; see the module docstring.

    `control_path` adds the control-socket steps; `terminate()` (e.g. send SIGTERM and wait)
    ends the walk and must return the device's exit status, which must be 0. `alive()`, when
    given, returns False once the device process is gone: the walk then stops at once
    instead of waiting out a timeout per step. `strict=False` walks a foreign device: every
    answer the spec allows passes, and steps after the device stops serving are not reached."""
    walk = Walk(socket_path, control_path, timeout, alive, strict)
    if not strict:
        walk.run_learning()
        return _finish(walk, terminate)
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
    return _finish(walk, terminate)


def _finish(walk: Walk, terminate) -> ExerciseReport:
    walk.disconnect()
    if terminate is not None:
        started = time.monotonic()
        status = terminate()
        walk.report.exit_status = status
        # strict: the project's devices handle SIGTERM and exit 0; any other device may also
        # just die of it (SIGTERM's default action), which stops it as well
        stopped = status == 0 or (not walk.strict and status == 128 + signal.SIGTERM)
        walk.report.steps.append(Step("SIGTERM", stopped, "" if status == 0 else f"exit status {status}",
                                      round(time.monotonic() - started, 4)))
    return walk.report
