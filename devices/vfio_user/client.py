"""A blocking vfio-user client: every command wrapped, server DMA requests served.

Used by the tests, the benchmark and `jailer probe`. While it waits for a reply it
answers the server's DMA_READ/DMA_WRITE from the memory given to dma_map(memory=...)
(a bytearray, mmap or anything with the buffer protocol covering the mapping).

    with Client.connect(path) as client:        # connects and negotiates VERSION
        info = client.device_info()
        data = client.region_read(7, 0, 64)
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import termios
import time

from . import codec
from . import protocol as P
from .connection import ClientConnection, ProtocolViolation, Reply, close_fds
from .transport import SocketTransport, TransportError

DEFAULT_CAPABILITIES = {"max_msg_fds": P.MAX_MSG_FDS, "max_data_xfer_size": P.MAX_DATA_XFER_SIZE}


class ClientError(Exception):
    """A command failed: `errno` is the server's error (or ours for local failures).

    `reply` is True when the server answered with an error reply, False when the command
    failed on our side (connection lost, timeout, a reply that breaks the protocol)."""

    def __init__(self, message: str, err: int = errno.EIO, *, reply: bool = False):
        super().__init__(message)
        self.errno = err
        self.reply = reply


class Client:
    def __init__(self, sock: socket.socket, *, timeout: float = 5.0,
                 max_data_xfer_size: int = P.MAX_DATA_XFER_SIZE):
        sock.setblocking(True)
        self.sock = sock
        self.timeout = timeout
        self.transport = SocketTransport(sock, max_fds=P.MAX_MSG_FDS)
        self.conn = ClientConnection(max_data_xfer_size)
        self.server_version: tuple[int, int] | None = None
        self.server_capabilities: dict = {}
        self._memory: list = []         # (iova, size, buffer) served to server DMA requests
        self._replies: dict = {}
        self.dma_requests_served = 0

    @classmethod
    def connect(cls, path: str, *, negotiate: bool = True, capabilities: dict | None = None,
                minor: int = P.VERSION_MINOR, **kwargs) -> "Client":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(kwargs.get("timeout", 5.0))
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise ClientError(f"cannot connect to {path}: {exc.strerror or exc}", exc.errno or errno.EIO) from None
        client = cls(sock, **kwargs)
        if negotiate:
            try:
                client.negotiate(capabilities, minor)
            except BaseException:
                client.close()
                raise
        return client

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.conn.close()
        self.transport.close()

    # --- request/reply core -------------------------------------------------------------

    def send(self, cmd: int, payload: bytes = b"", fds=None, no_reply: bool = False) -> int:
        msg_id = self.conn.send_request(cmd, payload, fds, no_reply)
        try:
            self.transport.flush(self.conn.outgoing)
        except TransportError as exc:
            raise ClientError(str(exc), errno.EPIPE) from None
        return msg_id

    def wait(self, msg_id: int) -> Reply:
        deadline = time.monotonic() + self.timeout
        while msg_id not in self._replies:
            self._pump(deadline)
        return self._replies.pop(msg_id)

    def _pump(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([self.sock], [], [], max(remaining, 0))
        if not ready:
            raise ClientError("timed out waiting for the server", errno.ETIMEDOUT)
        self._receive()
        if self.conn.outgoing:
            self.transport.flush(self.conn.outgoing)

    def _receive(self) -> None:
        """One receive from a readable socket: replies are kept, server DMA requests served
        (their replies are queued in conn.outgoing, not sent)."""
        try:
            nbytes, fds = self.transport.receive(self.conn)
        except TransportError as exc:
            raise ClientError(str(exc), errno.EPIPE) from None
        if not nbytes:
            close_fds(fds)
            raise ClientError("server closed the connection", errno.ECONNRESET)
        self.conn.received(nbytes, fds)
        try:
            events = self.conn.events()
        except ProtocolViolation as exc:
            raise ClientError(f"protocol violation by the server: {exc}", errno.EPROTO) from None
        for event in events:
            if isinstance(event, Reply):
                self._replies[event.msg_id] = event
            else:
                self._serve_dma(event)

    def request(self, cmd: int, payload: bytes = b"", fds=None) -> Reply:
        """Send a command and return its successful reply; raises ClientError on an error reply."""
        return self._checked(cmd, self.wait(self.send(cmd, payload, fds)))

    @staticmethod
    def _checked(cmd: int, reply: Reply) -> Reply:
        if reply.error:
            close_fds(reply.fds)
            raise ClientError(f"{P.command_name(cmd)} failed: {os.strerror(reply.error)}", reply.error, reply=True)
        return reply

    def request_large(self, cmd: int, payload: bytes, *, split_at: int = 0) -> Reply:
        """request() for a message bigger than the socket buffer.

        Whatever the server sends while the message is still going out (an early reply,
        DMA requests) is read meanwhile, so a server that answers before it has read the
        whole message cannot block both sides; replies to server requests go out once the
        message is complete, never inside it. With `split_at`, the rest of the message goes
        out only once the server has read the first split_at bytes: the message reaches it
        in two pieces, as a stream socket may always deliver one."""
        msg_id = self.conn.send_request(cmd, payload)
        data, _fds = self.conn.outgoing.pop()
        view = memoryview(data)
        pieces = [view[:split_at], view[split_at:]] if 0 < split_at < len(view) else [view]
        deadline = time.monotonic() + self.timeout
        for number, piece in enumerate(pieces):
            while number and self._unread() and time.monotonic() < deadline:
                if select.select([self.sock], [], [], 0.005)[0]:
                    self._receive()
            while piece:
                readable, writable, _ = select.select([self.sock], [self.sock], [],
                                                      max(deadline - time.monotonic(), 0))
                if not readable and not writable:
                    raise ClientError("timed out sending to the server", errno.ETIMEDOUT)
                if readable:
                    self._receive()
                if writable:
                    try:
                        piece = piece[self.sock.send(piece[:1 << 16], socket.MSG_DONTWAIT):]
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        raise ClientError(f"send failed: {exc.strerror or exc}", errno.EPIPE) from None
        if self.conn.outgoing:
            self.transport.flush(self.conn.outgoing)
        return self._checked(cmd, self.wait(msg_id))

    def _unread(self) -> int:
        """Bytes sent that the server has not read yet (SIOCOUTQ)."""
        return struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, bytes(4)))[0]

    def _decoded(self, cmd: int, payload: bytes = b"", fds=None, *, keep_fds: bool = False):
        reply = self.request(cmd, payload, fds)
        try:
            message = codec.decode_reply(cmd, reply.payload, len(reply.fds))
        except codec.DecodeError as exc:
            close_fds(reply.fds)
            raise ClientError(f"bad {P.command_name(cmd)} reply: {exc}", errno.EPROTO) from None
        if keep_fds:
            return message, reply.fds
        close_fds(reply.fds)
        return message

    # --- server -> client DMA -----------------------------------------------------------

    def _serve_dma(self, event) -> None:
        access = event.message
        try:
            if event.cmd == P.DMA_READ:
                data = self._memory_read(access.iova, access.count)
                payload = codec.encode_dma_access(codec.DmaAccess(access.iova, access.count, data))
            else:
                self._memory_write(access.iova, access.data)
                payload = codec.encode_dma_access(codec.DmaAccess(access.iova, access.count))
        except ClientError as exc:
            if not event.no_reply:
                self.conn.send_error(event.msg_id, event.cmd, exc.errno)
            return
        self.dma_requests_served += 1
        if not event.no_reply:
            self.conn.send_reply(event.msg_id, event.cmd, payload)

    def _locate(self, iova: int, count: int):
        for start, size, buffer in self._memory:
            if start <= iova and iova + count <= start + size:
                return buffer, iova - start
        raise ClientError(f"server DMA to {iova:#x}+{count} outside client memory", errno.EFAULT)

    def _memory_read(self, iova: int, count: int) -> bytes:
        buffer, off = self._locate(iova, count)
        return bytes(memoryview(buffer)[off:off + count])

    def _memory_write(self, iova: int, data: bytes) -> None:
        buffer, off = self._locate(iova, len(data))
        memoryview(buffer)[off:off + len(data)] = data

    # --- commands -----------------------------------------------------------------------

    def negotiate(self, capabilities: dict | None = None, minor: int = P.VERSION_MINOR) -> dict:
        caps = DEFAULT_CAPABILITIES if capabilities is None else capabilities
        reply = self._decoded(P.VERSION, codec.encode_version(codec.Version(P.VERSION_MAJOR, minor, caps)))
        if reply.major != P.VERSION_MAJOR or reply.minor > minor:
            raise ClientError(f"server answered version {reply.major}.{reply.minor} to {P.VERSION_MAJOR}.{minor}",
                              errno.EPROTO)
        self.server_version = (reply.major, reply.minor)
        self.server_capabilities = reply.capabilities
        return reply.capabilities

    def device_info(self) -> codec.DeviceInfo:
        return self._decoded(P.DEVICE_GET_INFO, P.DEVICE_INFO.pack(P.DEVICE_INFO.size, 0, 0, 0))

    def region_info(self, index: int, argsz: int = P.REGION_INFO.size) -> tuple[codec.RegionInfo, int | None]:
        """Region info and its mmap fd (caller closes it); retries when the caps did not fit."""
        for _attempt in range(3):
            info, fds = self._decoded(P.DEVICE_GET_REGION_INFO,
                                      codec.encode_region_info_request(codec.RegionInfoRequest(index, argsz)),
                                      keep_fds=True)
            if info.argsz <= argsz:
                return info, (fds[0] if fds else None)
            close_fds(fds)
            argsz = info.argsz
        raise ClientError(f"region {index}: the server keeps asking for a bigger argsz", errno.EPROTO)

    def region_io_fds(self, index: int) -> codec.RegionIoFds:
        return self._decoded(P.DEVICE_GET_REGION_IO_FDS,
                             codec.encode_region_io_fds_request(codec.RegionIoFdsRequest(index, argsz=4096)))

    def irq_info(self, index: int) -> codec.IrqInfo:
        return self._decoded(P.DEVICE_GET_IRQ_INFO, codec.encode_irq_info_request(codec.IrqInfoRequest(index)))

    def set_irqs(self, index: int, flags: int, start: int = 0, count: int = 0, fds=(), data: bytes = b"") -> None:
        self.request(P.DEVICE_SET_IRQS, codec.encode_set_irqs(codec.SetIrqs(flags, index, start, count, data)),
                     list(fds) or None)

    def enable_irq_eventfds(self, index: int, fds, start: int = 0) -> None:
        fds = list(fds)
        self.set_irqs(index, P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_TRIGGER, start, len(fds), fds)

    def disable_irqs(self, index: int) -> None:
        self.set_irqs(index, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, 0, 0)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        access = self._decoded(P.REGION_READ, P.REGION_ACCESS.pack(offset, region, count))
        if access.count != count:
            raise ClientError(f"REGION_READ returned {access.count} bytes, asked {count}", errno.EPROTO)
        return access.data

    def region_write(self, region: int, offset: int, data: bytes, *, no_reply: bool = False) -> None:
        payload = P.REGION_ACCESS.pack(offset, region, len(data)) + bytes(data)
        if no_reply:
            self.send(P.REGION_WRITE, payload, no_reply=True)
        else:
            self.request(P.REGION_WRITE, payload)

    def region_write_multi(self, entries, *, no_reply: bool = False) -> int | None:
        """entries: ((region, offset, data<=8 bytes), ...); returns the completed count."""
        payload = codec.encode_write_multi(codec.WriteMulti(tuple(entries)))
        if no_reply:
            self.send(P.REGION_WRITE_MULTI, payload, no_reply=True)
            return None
        return self._decoded(P.REGION_WRITE_MULTI, payload)

    def reset(self) -> None:
        self.request(P.DEVICE_RESET)

    def dma_map(self, iova: int, size: int, *, fd: int | None = None, offset: int = 0,
                flags: int = P.DMA_MAP_FLAG_READ | P.DMA_MAP_FLAG_WRITE, memory=None) -> None:
        """Map [iova, iova+size); `memory` serves the server's DMA messages for that range."""
        self.request(P.DMA_MAP, codec.encode_dma_map(codec.DmaMap(flags, offset, iova, size)),
                     [fd] if fd is not None else None)
        if memory is not None:
            self._memory = [m for m in self._memory if m[0] + m[1] <= iova or m[0] >= iova + size]
            self._memory.append((iova, size, memory))

    def dma_unmap(self, iova: int = 0, size: int = 0, *, unmap_all: bool = False) -> codec.DmaUnmap:
        flags = P.DMA_UNMAP_FLAG_ALL if unmap_all else 0
        reply = self._decoded(P.DMA_UNMAP, codec.encode_dma_unmap(codec.DmaUnmap(flags, iova, size)))
        self._memory = [] if unmap_all else [m for m in self._memory if not (iova <= m[0] and m[0] + m[1] <= iova + size)]
        return reply

    # --- device features and migration --------------------------------------------------

    def feature(self, flags: int, data: bytes = b"", argsz: int | None = None) -> codec.Feature:
        argsz = argsz if argsz is not None else P.FEATURE.size + max(len(data), 64)
        return self._decoded(P.DEVICE_FEATURE, codec.encode_feature(codec.Feature(flags, data, argsz)))

    def probe_feature(self, feature: int, ops: int = P.FEATURE_GET) -> bool:
        try:
            self.feature(feature | ops | P.FEATURE_PROBE)
        except ClientError:
            return False
        return True

    def migration_flags(self) -> int:
        return P.MIGRATION_FLAGS.unpack_from(self.feature(P.FEATURE_MIGRATION | P.FEATURE_GET).data)[0]

    def migration_state(self) -> int:
        return P.MIG_STATE.unpack_from(self.feature(P.FEATURE_MIG_DEVICE_STATE | P.FEATURE_GET).data)[0]

    def set_migration_state(self, state: int) -> None:
        self.feature(P.FEATURE_MIG_DEVICE_STATE | P.FEATURE_SET, P.MIG_STATE.pack(state, 0xFFFFFFFF))

    def mig_data_read(self, size: int) -> bytes:
        reply = self._decoded(P.MIG_DATA_READ, codec.encode_mig_data(codec.MigData(size, b"", P.MIG_DATA.size + size)))
        return reply.data

    def mig_data_write(self, data: bytes) -> None:
        self.request(P.MIG_DATA_WRITE, codec.encode_mig_data(codec.MigData(len(data), data)))

    def save_device_state(self, chunk: int = 65536) -> bytes:
        """Source side: STOP_COPY, read the stream to its end, then STOP."""
        self.set_migration_state(P.MIG_STATE_STOP_COPY)
        parts = []
        while data := self.mig_data_read(chunk):
            parts.append(data)
        self.set_migration_state(P.MIG_STATE_STOP)
        return b"".join(parts)

    def load_device_state(self, blob: bytes, chunk: int = 65536) -> None:
        """Destination side: RESUMING, write the stream, STOP (validation), RUNNING."""
        self.set_migration_state(P.MIG_STATE_RESUMING)
        for pos in range(0, len(blob), chunk):
            self.mig_data_write(blob[pos:pos + chunk])
        self.set_migration_state(P.MIG_STATE_RUNNING)

    def dma_logging_start(self, page_size: int = P.PAGE_SIZE, ranges=()) -> None:
        self.feature(P.FEATURE_DMA_LOGGING_START | P.FEATURE_SET, codec.encode_logging_start(page_size, ranges))

    def dma_logging_stop(self) -> None:
        self.feature(P.FEATURE_DMA_LOGGING_STOP | P.FEATURE_SET, codec.encode_logging_start(P.PAGE_SIZE))

    def dma_logging_report(self, iova: int, length: int, page_size: int = P.PAGE_SIZE) -> bytes:
        argsz = P.FEATURE.size + P.LOGGING_REPORT.size + codec.bitmap_size(length, page_size)
        reply = self.feature(P.FEATURE_DMA_LOGGING_REPORT | P.FEATURE_GET,
                             P.LOGGING_REPORT.pack(iova, length, page_size), argsz)
        return reply.data[P.LOGGING_REPORT.size:]
