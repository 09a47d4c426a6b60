"""Sans-I/O vfio-user connections: framing and the per-side state machines, no sockets.

A transport writes received bytes into `recv_views()` and reports them with
`receive(nbytes, fds)`; whatever the connection wants to send accumulates in `outgoing`
as (bytes, fds) pairs for the transport to write in order. Nothing here blocks or
touches a file descriptor except to close fds nobody took.

Server side (ServerConnection): VERSION must come first; commands are handled strictly
in arrival order by a handler object; NO_REPLY commands never get a reply, even on
error; replies never exceed what the request's argsz allows; fds that came with a
command and that the handler did not take are closed. While the handler is inside a
command and waits for a reply to a server->client request (message-based DMA), later
commands are parked and run afterwards, so ordering holds.

Client side (ClientConnection): assigns message ids, matches replies to requests and
hands server->client commands (DMA_READ/DMA_WRITE) to the caller as events.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

from . import codec
from . import protocol as P
from .codec import DecodeError, FramingError
from .device import DeviceError

log = logging.getLogger("vfio_user")

_HEADER = P.HEADER
_HDR_ACCESS = struct.Struct("<HHIIIQII")      # header + region access, one pack for hot replies
_REPLY = P.TYPE_REPLY
_NO_REPLY = P.FLAG_NO_REPLY
_REGION_READ = P.REGION_READ
_REGION_WRITE = P.REGION_WRITE
_ACCESS_SIZE = P.HEADER_SIZE + P.REGION_ACCESS.size
_MAX_XFER = P.MAX_DATA_XFER_SIZE
# Receive buffer of a connection; larger frames get one of their own size while they last.
RECV_BUFFER_SIZE = 64 * 1024
# What a client may send while a command waits for the reply to our DMA request: beyond
# that it is not waiting for us, and the connection ends instead of the queue growing.
MAX_PARKED_COMMANDS = 256
MAX_PARKED_BYTES = 2 * P.MAX_MESSAGE_SIZE


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass(slots=True)
class Frame:
    msg_id: int
    cmd: int
    flags: int
    error: int
    payload: bytes
    fds: list


class FrameReader:
    """Reassembles frames from a byte stream and attaches fds to the frame they came with.

    Memory a peer can make the reader hold is bounded by what was negotiated and released
    as soon as it is not needed: the buffer usual traffic goes through is RECV_BUFFER_SIZE
    bytes; a frame whose header declares more (up to max_message_size) gets a buffer of
    exactly its size, an anonymous mmap unmapped as soon as the frame has been consumed
    (never a heap block, which the allocator could keep after a burst of large frames).
    At most max_fds received fds wait for the frame they belong to; a peer that sends
    more before that frame is complete breaks the stream (FramingError).
    """

    def __init__(self, max_message_size: int = P.MAX_MESSAGE_SIZE, max_fds: int = P.MAX_MSG_FDS):
        self.max_message_size = max_message_size
        self.max_fds = max_fds
        self.buf = bytearray(min(RECV_BUFFER_SIZE, max_message_size))
        self._view = memoryview(self.buf)
        self._small = (self.buf, self._view)    # what buf and _view return to after a large frame
        self.empty_views = [self._view]      # recv_views() whenever nothing is buffered (end == 0)
        self.start = 0              # first unconsumed byte
        self.end = 0                # one past the last received byte
        self._base = 0              # stream position of buf[0]
        self._fds: deque = deque()  # (stream start, end, [fds]) of reads whose fds no frame took yet

    def recv_views(self) -> list:
        """Buffers for recvmsg_into; the list is reused when the buffer is empty."""
        if self.start == self.end:
            self._rewind()
            return self.empty_views
        if self.end == len(self.buf):
            self._compact()
        return [self._view[self.end:]]

    def _rewind(self) -> None:
        """Everything received is consumed: start over at buf[0] of the small buffer."""
        self._base += self.end
        self.start = self.end = 0
        if self.buf is not self._small[0]:
            self._release_large()

    def _release_large(self) -> None:
        large, view = self.buf, self._view
        self.buf, self._view = self._small
        self._unmap(large, view)

    @staticmethod
    def _unmap(large: mmap.mmap, view: memoryview) -> None:
        view.release()
        try:
            large.close()           # munmap now; a buffer still exported elsewhere goes with it
        except BufferError:
            pass

    def _compact(self) -> None:
        pending = self.end - self.start
        self.buf[:pending] = self.buf[self.start:self.end]
        self._base += self.start
        self.start, self.end = 0, pending

    def _make_room(self, size: int) -> None:
        """Room for `size` bytes from buf[start]: compact, or move the pending bytes into
        a buffer of exactly `size` bytes (the previous large one, if any, is unmapped)."""
        if size <= len(self.buf):
            self._compact()
            return
        pending = self.end - self.start
        try:
            large = mmap.mmap(-1, size)
        except OSError as exc:
            if exc.errno == errno.ENOMEM:
                raise MemoryError(f"no memory for a frame of {size} bytes") from None
            raise
        large[:pending] = self.buf[self.start:self.end]
        self._base += self.start
        self.start, self.end = 0, pending
        if self.buf is not self._small[0]:
            self._unmap(self.buf, self._view)
        self.buf, self._view = large, memoryview(large)

    def feed(self, data: bytes, fds=()) -> None:
        """Copying variant of recv_views()/received() for tests and tools; the buffer
        grows to hold whatever was fed and not consumed yet."""
        data = memoryview(data)
        while data:
            view = self.recv_views()[0]
            if not view:
                self._make_room(self.end - self.start + len(data))
                view = self.recv_views()[0]
            n = min(len(view), len(data))
            view[:n] = data[:n]
            self.received(n, fds)
            fds = ()
            data = data[n:]

    def received(self, nbytes: int, fds) -> None:
        if fds:
            self._hold_fds(nbytes, fds)
        self.end += nbytes

    def _hold_fds(self, nbytes: int, fds) -> None:
        """Keep the fds of a read until their frame is complete; no more than max_fds of them."""
        at = self._base + self.end
        self._fds.append((at, at + nbytes, list(fds)))
        if sum(len(entry[2]) for entry in self._fds) > self.max_fds:
            self.close()
            raise FramingError(f"more than {self.max_fds} file descriptors arrived for one message")

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None; FramingError if the stream is broken."""
        avail = self.end - self.start
        if avail < P.HEADER_SIZE:
            return None
        msg_id, cmd, size, flags, err = _HEADER.unpack_from(self.buf, self.start)
        codec.check_header(msg_id, cmd, size, flags, self.max_message_size)
        if avail < size:
            if len(self.buf) - self.start < size:
                self._make_room(size)
            return None
        pos = self.start
        self.start = pos + size
        return Frame(msg_id, cmd, flags, err, bytes(self._view[pos + P.HEADER_SIZE:pos + size]),
                     self._take_fds(pos, size))

    def _take_fds(self, pos: int, size: int) -> list:
        """The fds that came with the frame at buf[pos:pos+size].

        A UNIX stream recvmsg may return several messages but ends with the one whose
        first bytes carried fds, so a read's fds belong to the last frame that starts
        inside that read. Fds of a read in which no frame starts belong to nobody and
        are closed.
        """
        first = self._base + pos
        last = first + size
        taken = []
        while self._fds:
            start, end, fds = self._fds[0]
            if start <= first < end:
                if last < end:
                    break               # a later frame starts inside that read: its fds
                taken.extend(fds)
            elif end <= last:
                close_fds(fds)
            else:
                break                   # that read reaches past this frame
            self._fds.popleft()
        return taken

    def close(self) -> None:
        """Close every fd received but not handed out and drop what was buffered."""
        while self._fds:
            close_fds(self._fds.popleft()[2])
        self.start = self.end = 0
        if self.buf is not self._small[0]:
            self._release_large()


class ServerHandler(Protocol):
    """What ServerConnection asks of the server application (server.Session is one).

    Commands are handed over already decoded; `fds` is a list the handler removes the
    fds it keeps from (the rest are closed). Raise DecodeError or DeviceError to reply
    with that errno.

    For the REGION_READ/WRITE hot path the handler also exposes `read_limits` and
    `write_limits` (per region index: bytes accessible, -1 = refused; updated in place)
    and `device_read`/`device_write` (the device model's own methods, called only for
    accesses within those limits). Anything outside them goes through region_read/
    region_write, which explain the refusal.
    """

    read_limits: list
    write_limits: list
    device_read: Callable[[int, int, int], bytes]
    device_write: Callable[[int, int, bytes], None]

    def region_read(self, region: int, offset: int, count: int) -> bytes: ...

    def region_write(self, region: int, offset: int, data: bytes) -> None: ...

    def handle(self, cmd: int, message, fds: list):
        """Reply payload (bytes), or (RegionInfo, fd|None) for DEVICE_GET_REGION_INFO."""


# Commands whose request argsz bounds the reply payload.
_ARGSZ_BOUNDED = frozenset({P.DEVICE_GET_INFO, P.DEVICE_GET_IRQ_INFO, P.DEVICE_GET_REGION_IO_FDS,
                            P.DMA_UNMAP, P.DEVICE_FEATURE, P.MIG_DATA_READ})

AWAIT_VERSION, READY, CLOSED = "await-version", "ready", "closed"


class ServerConnection(FrameReader):
    """Server side of one client connection."""

    def __init__(self, handler: ServerHandler, capabilities: dict, version_minor: int = P.VERSION_MINOR):
        super().__init__()
        self.handler = handler
        self.capabilities = capabilities
        self.version_minor = version_minor
        self.state = AWAIT_VERSION
        self.client_max_fds = P.DEFAULT_MAX_MSG_FDS
        self.client_max_xfer = P.DEFAULT_MAX_DATA_XFER_SIZE
        self.client_capabilities: dict = {}
        self.outgoing: list = []            # (bytes, fds) for the transport, in order
        self.parked: deque = deque()        # commands that arrived while one was running
        self._parked_bytes = 0              # their payload bytes (bounded, see MAX_PARKED_BYTES)
        self._replies: dict = {}            # msg_id -> Frame, replies to our requests
        self._waiting: set = set()          # msg_ids of our requests not yet answered
        self._next_id = 1

    # --- input --------------------------------------------------------------------------

    def receive(self, nbytes: int, fds=()) -> None:
        """Account for bytes written into recv_views() and run every complete command.

        Raises FramingError when the stream is broken; the caller closes the connection.
        """
        if fds:
            self._hold_fds(nbytes, fds)
        self.end += nbytes
        if self.parked:
            self._run_parked()
        fast = self.state is READY and not self._fds
        out = self.outgoing
        while True:
            pos = self.start
            avail = self.end - pos
            if avail < 16:
                if not avail:                   # all consumed: rewind (recv_views() not needed)
                    self._rewind()
                return
            if fast:
                reply = self._hot(pos, avail)
                if reply is not None:
                    if reply:
                        out.append((reply, None))
                    if self.parked:             # commands that came in during its DMA
                        self._run_parked()
                    continue
            frame = self.next_frame()
            if frame is None:
                return
            self._dispatch(frame)
            if self.parked:
                self._run_parked()

    def hot_reply(self, nbytes: int) -> bytes | None:
        """receive() for the usual case, without its bookkeeping: `nbytes` arrived (no fds)
        in an empty buffer and start with a plain in-bounds REGION_READ or REGION_WRITE.
        Runs it and returns its reply (b"" for a posted write). Returns None when the
        case does not apply, with nothing run. Either way, when `end` or `parked` is left
        non-zero afterwards, receive(0) must run what remains; replies of those come
        after the one returned here."""
        if self.end or self.parked or self._fds or self.state is not READY:
            self.end += nbytes
            return None
        self.end = nbytes
        reply = self._hot(0, nbytes)
        if self.start == nbytes:
            self._base += nbytes
            self.start = self.end = 0
        return reply

    def _hot(self, pos: int, avail: int) -> bytes | None:
        """Run the REGION_READ/WRITE at buf[pos:] if it is a plain, complete, in-bounds one
        (consuming it first, so DMA the device does meanwhile can receive behind it) and
        return its reply bytes; None, with nothing done, for anything else."""
        if avail < _ACCESS_SIZE:
            return None
        msg_id, cmd, size, flags, _err, offset, region, count = _HDR_ACCESS.unpack_from(self.buf, pos)
        handler = self.handler
        if cmd == _REGION_READ:
            if size != _ACCESS_SIZE or flags or count > _MAX_XFER:
                return None
            try:
                if offset + count > handler.read_limits[region]:
                    return None
            except IndexError:
                return None
            self.start = pos + _ACCESS_SIZE
            try:
                data = handler.device_read(region, offset, count)
            except MemoryError:
                raise
            except Exception as exc:                       # noqa: BLE001 - turned into an error reply
                return self._error_reply(msg_id, cmd, flags, exc)
            if len(data) != count:
                return self._error_reply(msg_id, cmd, flags, DeviceError(
                    f"region {region} read returned {len(data)} bytes instead of {count}", errno.EIO))
            return _HDR_ACCESS.pack(msg_id, cmd, _ACCESS_SIZE + count, _REPLY, 0, offset, region, count) + data
        if cmd == _REGION_WRITE:
            if size != _ACCESS_SIZE + count or flags & ~_NO_REPLY or size > avail or not count:
                return None
            try:
                if offset + count > handler.write_limits[region]:
                    return None
            except IndexError:
                return None
            self.start = pos + size
            try:
                handler.device_write(region, offset, bytes(self.buf[pos + _ACCESS_SIZE:pos + size]))
            except MemoryError:
                raise
            except Exception as exc:                       # noqa: BLE001 - turned into an error reply
                return self._error_reply(msg_id, cmd, flags, exc)
            if flags:
                return b""
            return _HDR_ACCESS.pack(msg_id, cmd, _ACCESS_SIZE, _REPLY, 0, offset, region, count)
        return None

    def receive_replies(self, nbytes: int, fds=()) -> None:
        """Variant of receive() while a command waits for a reply to start_request():
        replies are collected, commands parked until the running one has finished."""
        self.received(nbytes, fds)
        while (frame := self.next_frame()) is not None:
            if frame.flags & P.FLAG_TYPE_MASK == P.TYPE_REPLY:
                self._accept_reply(frame)
                continue
            self.parked.append(frame)
            self._parked_bytes += len(frame.payload)
            if len(self.parked) > MAX_PARKED_COMMANDS or self._parked_bytes > MAX_PARKED_BYTES:
                raise FramingError(f"{len(self.parked)} commands ({self._parked_bytes} bytes) arrived while "
                                   "a DMA request was waiting for its reply")

    def _run_parked(self) -> None:
        while self.parked:
            frame = self.parked.popleft()
            self._parked_bytes -= len(frame.payload)
            self._dispatch(frame)

    def _accept_reply(self, frame: Frame) -> None:
        close_fds(frame.fds)
        if frame.msg_id in self._waiting:
            self._waiting.discard(frame.msg_id)
            self._replies[frame.msg_id] = frame
        else:
            log.warning("dropping an unsolicited %s reply (id %d)", P.command_name(frame.cmd), frame.msg_id)

    def _dispatch(self, frame: Frame) -> None:
        if frame.flags & P.FLAG_TYPE_MASK == P.TYPE_REPLY:
            self._accept_reply(frame)
            return
        fds = frame.fds
        log.debug("%s id %d flags %#x, %d payload bytes, %d fds", P.command_name(frame.cmd), frame.msg_id,
                  frame.flags, len(frame.payload), len(fds))
        try:
            if frame.flags & ~(P.FLAG_TYPE_MASK | P.FLAG_NO_REPLY):
                raise DecodeError(f"command flags {frame.flags:#x} carry bits a command may not set")
            if self.state is AWAIT_VERSION and frame.cmd != P.VERSION:
                raise DecodeError(f"{P.command_name(frame.cmd)} before VERSION negotiation")
            if frame.cmd == P.VERSION:
                self._negotiate(frame, fds)
                return
            if frame.cmd in P.SERVER_COMMANDS:
                raise DecodeError(f"{P.command_name(frame.cmd)} is a server-to-client command")
            limit = P.MAX_DATA_XFER_SIZE
            if frame.cmd == P.REGION_READ:
                message = codec.decode_region_read(frame.payload, len(fds), limit)
            elif frame.cmd == P.REGION_WRITE:
                message = codec.decode_region_write(frame.payload, len(fds), limit)
            else:
                message = codec.decode_request(frame.cmd, frame.payload, len(fds))
            self._run(frame, message, fds)
        except MemoryError:
            raise                                   # the process cannot serve: see backend.run_backend
        except Exception as exc:                    # noqa: BLE001 - turned into an error reply
            self._error(frame.msg_id, frame.cmd, frame.flags, exc)
        finally:
            close_fds(fds)

    def _run(self, frame: Frame, message, fds: list) -> None:
        cmd = frame.cmd
        if cmd == P.REGION_READ:
            data = self.handler.region_read(message.region, message.offset, message.count)
            if len(data) != message.count:
                raise DeviceError(f"region {message.region} read returned {len(data)} bytes, "
                                  f"expected {message.count}", errno.EIO)
            self._reply(frame, codec.encode_region_access(codec.RegionAccess(
                message.region, message.offset, message.count, data)))
            return
        if cmd == P.REGION_WRITE:
            self.handler.region_write(message.region, message.offset, message.data)
            self._reply(frame, codec.encode_region_access(codec.RegionAccess(
                message.region, message.offset, message.count)))
            return
        result = self.handler.handle(cmd, message, fds)
        if cmd == P.DEVICE_GET_REGION_INFO:
            info, region_fd = result
            payload, complete = codec.encode_region_info(info, message.argsz)
            send_fd = region_fd is not None and complete and self.client_max_fds >= 1
            self._reply(frame, payload, [region_fd] if send_fd else None)
            return
        # argsz bounds what the client can take; an echo of its own request always fits.
        if cmd in _ARGSZ_BOUNDED and len(result) > message_argsz(message) and len(result) > len(frame.payload):
            raise DecodeError(f"{P.command_name(cmd)}: reply of {len(result)} bytes exceeds argsz "
                              f"{message_argsz(message)}", errno.E2BIG)
        self._reply(frame, result)

    def _negotiate(self, frame: Frame, fds: list) -> None:
        if self.state is READY:
            raise DecodeError("VERSION was already negotiated on this connection")
        request = codec.decode_version(frame.payload, len(fds))
        if request.major != P.VERSION_MAJOR:
            raise DecodeError(f"client proposes major version {request.major}, only "
                              f"{P.VERSION_MAJOR} is supported", errno.ENOTSUP)
        caps = request.capabilities
        self.client_capabilities = caps
        self.client_max_fds = caps.get("max_msg_fds", P.DEFAULT_MAX_MSG_FDS)
        self.client_max_xfer = caps.get("max_data_xfer_size", P.DEFAULT_MAX_DATA_XFER_SIZE)
        reply = codec.Version(P.VERSION_MAJOR, min(request.minor, self.version_minor),
                              reply_capabilities(self.capabilities, caps))
        payload = codec.encode_version(reply)
        # Clients size the reply buffer from their own request: drop optional keys until it fits.
        for key in ("max_dma_maps", "pgsizes", "write_multiple"):
            if len(payload) <= len(frame.payload):
                break
            reply.capabilities.pop(key, None)
            payload = codec.encode_version(reply)
        self.state = READY
        log.info("negotiated vfio-user %d.%d; client capabilities %.300s", reply.major, reply.minor, caps)
        self._reply(frame, payload)

    # --- output -------------------------------------------------------------------------

    def _reply(self, frame: Frame, payload: bytes, fds=None) -> None:
        if frame.flags & P.FLAG_NO_REPLY:
            return
        self.outgoing.append((codec.encode_message(frame.msg_id, frame.cmd, P.TYPE_REPLY, payload), fds))

    def _error(self, msg_id: int, cmd: int, flags: int, exc: Exception) -> None:
        reply = self._error_reply(msg_id, cmd, flags, exc)
        if reply:
            self.outgoing.append((reply, None))

    @staticmethod
    def _error_reply(msg_id: int, cmd: int, flags: int, exc: Exception) -> bytes:
        """Log why a command failed; its error reply, or b"" under NO_REPLY."""
        if isinstance(exc, (DecodeError, DeviceError)):
            err = exc.errno
            log.info("%s (id %d) refused: %s", P.command_name(cmd), msg_id, exc)
        else:
            err = errno.EIO
            log.error("%s (id %d) failed", P.command_name(cmd), msg_id, exc_info=exc)
        return b"" if flags & P.FLAG_NO_REPLY else codec.encode_error_reply(msg_id, cmd, err)

    # --- server -> client requests ------------------------------------------------------

    def start_request(self, cmd: int, payload: bytes) -> int:
        """Queue a server->client command; returns its id for take_reply()."""
        msg_id = self._next_id
        self._next_id = msg_id % 0xFFFF + 1
        self._waiting.add(msg_id)
        self.outgoing.append((codec.encode_message(msg_id, cmd, P.TYPE_COMMAND, payload), None))
        return msg_id

    def take_reply(self, msg_id: int) -> Frame | None:
        return self._replies.pop(msg_id, None)

    def abandon_request(self, msg_id: int) -> None:
        self._waiting.discard(msg_id)
        self._replies.pop(msg_id, None)

    def close(self) -> None:
        """Release everything the client made us hold; the handler (which holds this
        connection) is let go too, so a closed session is freed at once, not whenever
        the cyclic garbage collector next runs a full collection."""
        super().close()
        while self.parked:
            close_fds(self.parked.popleft().fds)
        self._parked_bytes = 0
        self._replies.clear()
        self._waiting.clear()
        self.client_capabilities = {}
        self.handler = None
        self.state = CLOSED


def message_argsz(message) -> int:
    return message if isinstance(message, int) else message.argsz


def reply_capabilities(ours: dict, client: dict) -> dict:
    """Our capabilities, limited to what the client also speaks (the reply must be a subset).

    Our own receive limits (max_msg_fds, max_data_xfer_size) always go out, so clients
    that assume other defaults (QEMU assumes 8 fds) learn the real ones.
    """
    reply = {}
    for key, value in ours.items():
        if key in ("max_msg_fds", "max_data_xfer_size"):
            reply[key] = value
        elif key == "write_multiple":
            if value and client.get("write_multiple") is True:
                reply[key] = True
        elif key == "max_dma_maps" and key in client:
            reply[key] = min(value, client[key])
        elif key == "pgsizes" and key in client:
            reply[key] = value & client[key]
    return reply


# --- client side ----------------------------------------------------------------------

@dataclass(slots=True)
class Reply:
    msg_id: int
    cmd: int
    error: int              # 0 = success
    payload: bytes
    fds: list


@dataclass(slots=True)
class ServerRequest:
    msg_id: int
    cmd: int
    message: object         # codec.DmaAccess
    no_reply: bool


class ProtocolViolation(Exception):
    """The server broke the protocol; the client must drop the connection."""


class ClientConnection(FrameReader):
    """Client side of one connection: ids, reply matching, server-request events."""

    def __init__(self, max_data_xfer_size: int = P.MAX_DATA_XFER_SIZE):
        super().__init__()
        self.outgoing: list = []
        self.pending: dict = {}         # msg_id -> cmd
        self.max_data_xfer_size = max_data_xfer_size
        self._next_id = 1

    def send_request(self, cmd: int, payload: bytes = b"", fds=None, no_reply: bool = False) -> int:
        msg_id = self._next_id
        self._next_id = msg_id % 0xFFFF + 1
        flags = P.TYPE_COMMAND | (P.FLAG_NO_REPLY if no_reply else 0)
        if not no_reply:
            self.pending[msg_id] = cmd
        self.outgoing.append((codec.encode_message(msg_id, cmd, flags, payload), list(fds) if fds else None))
        return msg_id

    def send_reply(self, msg_id: int, cmd: int, payload: bytes) -> None:
        self.outgoing.append((codec.encode_message(msg_id, cmd, P.TYPE_REPLY, payload), None))

    def send_error(self, msg_id: int, cmd: int, err: int) -> None:
        self.outgoing.append((codec.encode_error_reply(msg_id, cmd, err), None))

    def events(self) -> list:
        """Replies and server requests from the frames received so far.

        ServerRequest messages that fail to decode are answered with an error here and
        not reported; a reply nobody waits for raises ProtocolViolation.
        """
        result = []
        while True:
            try:
                frame = self.next_frame()
            except FramingError as exc:
                raise ProtocolViolation(str(exc)) from None
            if frame is None:
                return result
            if frame.flags & P.FLAG_TYPE_MASK == P.TYPE_REPLY:
                cmd = self.pending.pop(frame.msg_id, None)
                if cmd != frame.cmd:
                    close_fds(frame.fds)
                    raise ProtocolViolation(f"reply id {frame.msg_id} ({P.command_name(frame.cmd)}) "
                                            "matches no request in flight")
                error = frame.error or errno.EIO if frame.flags & P.FLAG_ERROR else 0
                result.append(Reply(frame.msg_id, frame.cmd, error, frame.payload, frame.fds))
                continue
            no_reply = bool(frame.flags & P.FLAG_NO_REPLY)
            try:
                if frame.fds:
                    raise DecodeError(f"{P.command_name(frame.cmd)} from the server carries fds")
                if frame.cmd == P.DMA_READ:
                    message = codec.decode_dma_read(frame.payload, 0, self.max_data_xfer_size)
                elif frame.cmd == P.DMA_WRITE:
                    message = codec.decode_dma_write(frame.payload, 0, self.max_data_xfer_size)
                else:
                    raise DecodeError(f"{P.command_name(frame.cmd)} is not a server-to-client command",
                                      errno.ENOSYS)
            except DecodeError as exc:
                close_fds(frame.fds)
                if not no_reply:
                    self.send_error(frame.msg_id, frame.cmd, exc.errno)
                continue
            result.append(ServerRequest(frame.msg_id, frame.cmd, message, no_reply))
