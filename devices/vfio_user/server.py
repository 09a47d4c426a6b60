"""The vfio-user server: one device, one client at a time, a single-threaded epoll loop.

API used by device programs (see also devices.vfio_user.backend):

    server = Server(device, sock)      # sock: a listening AF_UNIX socket (clients are
                                       # accepted one after another) or an already
                                       # connected one (served until it disconnects)
    server.add_reader(fd, callback)    # callback() runs in the loop when fd is readable
    server.remove_reader(fd)           # (e.g. a device's control socket and its clients)
    handle = server.call_later(delay, callback)   # one-shot timer; handle.cancel()
    server.serve_forever()             # returns after stop(), or when a connected-socket
                                       # client goes away
    server.stop()                      # from a callback or a signal handler
    server.save_checkpoint()           # after state changed outside a client's request
                                       # (a control socket, a timer)

With a checkpoint (Server(..., checkpoint=CheckpointArea), see devices.vfio_user.checkpoint)
the device state is written there whenever it may have changed, before the client hears back:
after each region access (reads change state too), DEVICE_RESET and migration state
changes. Only a state that differs from the last one written is written. Without one, the
region access hot path is the same as ever.

The device sees the server only through DeviceHost (device.attach(host) while a client is
connected, device.attach(None) between clients): set_intx(level), signal_irq(index,
vector), dma_read(iova, length), dma_write(iova, data), dma_views(segments,
writable) for zero-copy access to fd-backed guest memory. Device state and the migration
state survive client reconnections; DMA mappings and interrupt eventfds do not.

Message-based DMA (mappings without an fd) sends DMA_READ/DMA_WRITE to the client and
waits for the reply (bounded by `dma_timeout`) while later client commands are parked,
so ordering holds. A client that waits for our reply to the command that triggered the
DMA before serving DMA requests (QEMU does) would deadlock that way: with QEMU, give
guest RAM a shared fd, or let the device do its DMA from a call_later() callback.

Crash-only: what a client sends can cost it its connection, never the server its ability
to serve. Whatever a session holds (receive buffers, DMA maps and their mmaps, eventfds)
is released when it ends, at once (no reference cycles left for the garbage collector).
When the process itself can no longer serve (MemoryError, or accept() failing for lack of
fds or memory), serve_forever() raises instead of living on without serving: a device
bug is logged and survived, those are not.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import select
import socket
import time

from . import codec
from . import protocol as P
from .checkpoint import CheckpointError
from .connection import ServerConnection, close_fds
from .device import NUM_PCI_IRQS, NUM_PCI_REGIONS, Device, DeviceError, DeviceHost
from .dma import DmaSpace
from .irq import IrqTable, irq_info_flags
from .migration import SUPPORTED_FLAGS, Migration, wrap_state
from .transport import SocketTransport, TransportError

log = logging.getLogger("vfio_user")

CAPABILITIES = {
    "max_msg_fds": P.MAX_MSG_FDS,
    "max_data_xfer_size": P.MAX_DATA_XFER_SIZE,
    "pgsizes": P.PAGE_SIZE,
    "max_dma_maps": P.MAX_DMA_MAPS,
    "write_multiple": True,
}
_EPOLLIN = select.EPOLLIN
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)          # plain ints: IntFlag arithmetic is slow
_TRUNCATED = int(socket.MSG_CTRUNC | socket.MSG_TRUNC)  # (the kernel echoes MSG_CMSG_CLOEXEC in msg_flags)
# While a client keeps sending, its session reads on (a blocking read bounded by
# HOT_WAIT seconds) instead of going back to epoll after every message: one system call
# less per round trip. After HOT_READS messages, a due timer, or a quiet HOT_WAIT, the
# loop goes back to epoll so other readers and timers get their turn.
HOT_READS = 64
HOT_WAIT = 0.002
_READ_FLAGS = P.REGION_FLAG_READ
_WRITE_FLAGS = P.REGION_FLAG_WRITE
# accept() errors that mean this process cannot serve anyone any more.
_FATAL_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ServerFailure(Exception):
    """The server cannot serve any more (not a client's or a device's error): the program
    must exit rather than stay alive without serving."""


# Never caught by the loop's "a device bug must not stop the loop" handlers.
FATAL_ERRORS = (MemoryError, ServerFailure)


class TimerHandle:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "TimerHandle") -> bool:
        return self.when < other.when


class Server:
    def __init__(self, device: Device, sock: socket.socket, *, dma_timeout: float = 5.0, checkpoint=None):
        self.device = device
        self.dma_timeout = dma_timeout
        self.checkpoint = checkpoint
        self._checkpointed_state = device.save_state() if checkpoint is not None else None
        self._checkpoint_failing = False
        self._sock = sock
        self._listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        self._epoll = select.epoll()
        self._readers: dict = {}
        self._timers: list = []
        self._running = False
        self._stop_requested = False
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.session: Session | None = None
        self._was_running = True
        self.migration = Migration(device, self._migration_changed)
        self.add_reader(self._stop_fd, self._drain_stop)
        if self._listening:
            self.add_reader(sock.fileno(), self._accept)
        self._attach(None)

    # --- loop ---------------------------------------------------------------------------

    def add_reader(self, fd: int, callback) -> None:
        if fd in self._readers:
            self._epoll.modify(fd, _EPOLLIN)
        else:
            self._epoll.register(fd, _EPOLLIN)
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def call_later(self, delay: float, callback) -> TimerHandle:
        handle = TimerHandle(time.monotonic() + max(delay, 0.0), callback)
        heapq.heappush(self._timers, handle)
        return handle

    def stop(self) -> None:
        self._stop_requested = True         # sticky: a stop before serve_forever() counts too
        self._running = False
        try:
            os.eventfd_write(self._stop_fd, 1)
        except OSError:
            pass

    def _drain_stop(self) -> None:
        try:
            os.eventfd_read(self._stop_fd)
        except BlockingIOError:
            pass

    def serve_forever(self) -> None:
        if self._stop_requested:
            return
        self._running = True
        if not self._listening:
            self._start_session(self._sock)
        poll = self._epoll.poll
        readers = self._readers
        timers = self._timers
        try:
            while self._running:
                timeout = -1
                if timers:
                    timeout = self._run_timers()
                    if not self._running:
                        break
                for fd, _events in poll(timeout):
                    callback = readers.get(fd)
                    if callback is not None:
                        try:
                            callback()
                        except FATAL_ERRORS:
                            raise
                        except Exception:       # noqa: BLE001 - a device bug must not stop the loop
                            log.exception("reader callback for fd %d failed", fd)
        finally:
            self._running = False
            if self.session is not None:
                self._end_session("server stopping")

    def _run_timers(self) -> float:
        timers = self._timers
        now = time.monotonic()
        while timers and (timers[0].cancelled or timers[0].when <= now):
            handle = heapq.heappop(timers)
            if not handle.cancelled:
                try:
                    handle.callback()
                except FATAL_ERRORS:
                    raise
                except Exception:               # noqa: BLE001 - a device bug must not stop the loop
                    log.exception("timer callback failed")
        return max(timers[0].when - time.monotonic(), 0.0) if timers else -1

    def close(self) -> None:
        """Release the loop's own resources (not the socket it was given)."""
        self._epoll.close()
        close_fds([self._stop_fd])

    # --- sessions -----------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in _FATAL_ACCEPT_ERRORS:
                raise ServerFailure(f"cannot accept a client: {exc.strerror}") from None
            log.warning("accept failed: %s", exc)
            return
        self.remove_reader(self._sock.fileno())     # one client at a time; others wait in the backlog
        self._start_session(conn)

    def _start_session(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        try:
            session = Session(self, conn)
        except FATAL_ERRORS:
            conn.close()
            raise
        except Exception:                       # noqa: BLE001 - e.g. the device's regions() failed
            log.exception("cannot serve the client")
            conn.close()
            if self._listening:
                self.add_reader(self._sock.fileno(), self._accept)
            else:
                self._running = False
            return
        self.session = session
        log.info("client connected")
        self._attach(self.session)
        self.add_reader(conn.fileno(), self.session.on_readable)

    def _end_session(self, reason: str) -> None:
        session = self.session
        self.session = None
        self.remove_reader(session.transport.fileno())
        session.close()
        self._attach(None)
        log.info("client disconnected: %s", reason)
        if self._listening:
            if self._running:
                self.add_reader(self._sock.fileno(), self._accept)
        else:
            self._running = False

    def _attach(self, host) -> None:
        try:
            self.device.attach(host)
        except FATAL_ERRORS:
            raise
        except Exception:                       # noqa: BLE001 - a device bug must not stop the loop
            log.exception("device.attach(%s) failed", "host" if host else "None")

    def _migration_changed(self) -> None:
        if self.session is not None:
            self.session.migration_changed()
        running = self.migration.running
        if running and not self._was_running:
            try:
                self.device.resumed()
            except FATAL_ERRORS:
                raise
            except Exception:                   # noqa: BLE001 - a device bug must not stop the loop
                log.exception("device.resumed() failed")
        self._was_running = running
        self.save_checkpoint()

    # --- checkpoint ---------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write the device state to the checkpoint, if there is one and the state changed."""
        if self.checkpoint is None:
            return
        device = self.device
        state = device.save_state()
        if state == self._checkpointed_state:
            return
        self._checkpointed_state = state
        try:
            self.checkpoint.write(wrap_state(device.device_type, device.abi_version, state))
        except CheckpointError as exc:
            if not self._checkpoint_failing:        # once, not on every access of a guest
                log.error("checkpoint not written, a restart would bring back an older state: %s", exc)
            self._checkpoint_failing = True
        else:
            self._checkpoint_failing = False

    def checkpointed(self, access):
        """`access` (a device's region_read or region_write), then a checkpoint of what it changed."""
        save = self.save_checkpoint

        def access_then_save(*args):
            try:
                return access(*args)
            finally:
                save()
        return access_then_save


class Session(DeviceHost):
    """One connected client: its connection, DMA space and interrupt eventfds."""

    def __init__(self, server: Server, conn: socket.socket):
        self.server = server
        device = server.device
        self.device = device
        self.migration = server.migration
        self.transport = SocketTransport(conn, recv_timeout=HOT_WAIT)
        self.conn = ServerConnection(self, CAPABILITIES)
        self.dma = DmaSpace(self._message_dma_read, self._message_dma_write)
        self.dma.before_change = device.dma_changing
        self.irqs = IrqTable([device.irq_count(i) for i in range(NUM_PCI_IRQS)],
                             server.add_reader, server.remove_reader)
        self.region_table = [device.regions().get(i) for i in range(NUM_PCI_REGIONS)]
        # Readable/writable byte limits per region: -1 refuses any access (cheap hot-path check).
        self.read_limits = [r.size if r and r.size and r.readable else -1 for r in self.region_table]
        self._open_write_limits = [r.size if r and r.size and r.writable else -1 for r in self.region_table]
        self.write_limits = list(self._open_write_limits)
        self.device_read = device.region_read
        self.device_write = device.region_write
        if server.checkpoint is not None:
            self.device_read = server.checkpointed(device.region_read)
            self.device_write = server.checkpointed(device.region_write)
        self._closed = False
        self.migration_changed()

    # --- transport glue -----------------------------------------------------------------

    def on_readable(self) -> None:
        """Serve the client while it keeps sending (see HOT_READS); the common case of a
        plain read without fds takes no detour through helper calls."""
        conn = self.conn
        transport = self.transport
        recvmsg_into = transport.sock.recvmsg_into
        send = transport.sock.send
        space = transport.ancillary_space
        empty_views = conn.empty_views
        hot_reply = conn.hot_reply
        out = conn.outgoing
        timers = self.server._timers
        budget = HOT_READS
        try:
            while True:
                try:
                    nbytes, ancdata, msg_flags, _ = recvmsg_into(
                        conn.recv_views() if conn.end else empty_views, space, _CLOEXEC)
                except BlockingIOError:
                    break                               # quiet for HOT_WAIT: back to epoll
                except InterruptedError:
                    continue
                except OSError as exc:
                    raise TransportError(f"receive failed: {exc.strerror or exc}") from None
                if ancdata or msg_flags & _TRUNCATED:
                    conn.receive(nbytes, transport.ancillary_fds(ancdata, msg_flags))
                    if not nbytes:
                        raise TransportError("end of stream")
                elif not nbytes:
                    raise TransportError("end of stream")
                else:
                    reply = hot_reply(nbytes)
                    if reply is None:
                        conn.receive(0)
                    else:
                        if reply:
                            sent = send(reply)
                            if sent != len(reply):
                                transport.flush([(reply[sent:], None)])
                        if conn.end or conn.parked:
                            conn.receive(0)
                if out:
                    transport.flush(out)
                budget -= 1
                if not budget or self._closed or (timers and timers[0].when <= time.monotonic()):
                    break
        except codec.FramingError as exc:
            log.warning("closing connection: malformed frame: %s", exc)
            self.server._end_session(f"malformed frame: {exc}")
        except TransportError as exc:
            self.server._end_session(str(exc))
        except OSError as exc:
            self.server._end_session(f"send failed: {exc.strerror or exc}")
        else:
            if self._closed:
                self.server._end_session("connection lost during DMA")

    def close(self) -> None:
        """Release all the client made us hold; the parts that point back at this session
        (the connection's handler, the DMA space's message channel) let go of it."""
        self._closed = True
        self.conn.close()
        self.dma.close()
        self.irqs.close()
        self.transport.close()

    def migration_changed(self) -> None:
        self.irqs.set_running(self.migration.running)
        self.write_limits[:] = [-1] * NUM_PCI_REGIONS if self.migration.frozen else self._open_write_limits

    # --- region access (the hot path calls device_read/device_write directly) ------------

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        try:
            limit = self.read_limits[region]
        except IndexError:
            limit = -1
        if offset + count > limit:
            raise self._access_error(region, offset, count, "read")
        return self.device_read(region, offset, count)

    def region_write(self, region: int, offset: int, data: bytes) -> None:
        try:
            limit = self.write_limits[region]
        except IndexError:
            limit = -1
        if offset + len(data) > limit:
            raise self._access_error(region, offset, len(data), "write")
        if data:
            self.device_write(region, offset, data)

    def _access_error(self, region: int, offset: int, count: int, what: str) -> DeviceError:
        if not 0 <= region < NUM_PCI_REGIONS:
            return DeviceError(f"region {region} does not exist")
        r = self.region_table[region]
        if r is None or not r.size:
            return DeviceError(f"region {P.REGION_NAMES[region]} is not implemented")
        if what == "write" and self.migration.frozen:
            return DeviceError(f"region writes are refused while migration is in "
                               f"{P.MIG_STATE_NAMES[self.migration.state]}", errno.EBUSY)
        if not (r.readable if what == "read" else r.writable):
            return DeviceError(f"region {P.REGION_NAMES[region]} is not {what}able")
        return DeviceError(f"{what} of {count} bytes at {offset:#x} is outside region "
                           f"{P.REGION_NAMES[region]} ({r.size:#x} bytes)")

    # --- everything else ----------------------------------------------------------------

    def handle(self, cmd: int, message, fds: list):
        if cmd == P.DMA_MAP:
            self.dma.map(message.iova, message.size, message.flags, fds.pop() if fds else None, message.offset)
            return b""
        if cmd == P.DMA_UNMAP:
            if message.flags & P.DMA_UNMAP_FLAG_ALL:
                self.dma.unmap_all()
            else:
                self.dma.unmap(message.iova, message.size)
            return codec.encode_dma_unmap(message)          # the request, echoed
        if cmd == P.DEVICE_GET_INFO:
            return codec.encode_device_info(codec.DeviceInfo(P.DEVICE_FLAG_RESET | P.DEVICE_FLAG_PCI,
                                                             NUM_PCI_REGIONS, NUM_PCI_IRQS))
        if cmd == P.DEVICE_GET_REGION_INFO:
            return self._region_info(message.index)
        if cmd == P.DEVICE_GET_REGION_IO_FDS:
            self._check_region(message.index)
            return codec.encode_region_io_fds(codec.RegionIoFds(message.index))
        if cmd == P.DEVICE_GET_IRQ_INFO:
            if message.index >= NUM_PCI_IRQS:
                raise DeviceError(f"irq index {message.index} does not exist")
            return codec.encode_irq_info(codec.IrqInfo(message.index, irq_info_flags(message.index),
                                                       self.device.irq_count(message.index)))
        if cmd == P.DEVICE_SET_IRQS:
            self.irqs.set_irqs(message, fds)
            return b""
        if cmd == P.DEVICE_RESET:
            self.device.reset()
            self.migration.reset()
            self.server.save_checkpoint()
            return b""
        if cmd == P.REGION_WRITE_MULTI:
            for region, offset, data in message.entries:
                self.region_write(region, offset, data)
            return codec.encode_write_multi_reply(len(message.entries))
        if cmd == P.DEVICE_FEATURE:
            return self._feature(message)
        if cmd == P.MIG_DATA_READ:
            if message.size > P.MAX_DATA_XFER_SIZE:
                raise DeviceError(f"MIG_DATA_READ of {message.size} bytes exceeds {P.MAX_DATA_XFER_SIZE}")
            data = self.migration.read_data(message.size)
            return codec.encode_mig_data(codec.MigData(len(data), data, P.MIG_DATA.size + len(data)))
        if cmd == P.MIG_DATA_WRITE:
            self.migration.write_data(message.data)
            return b""
        raise DeviceError(f"{P.command_name(cmd)} is not handled", errno.ENOSYS)

    def _check_region(self, index: int) -> None:
        if index >= NUM_PCI_REGIONS:
            raise DeviceError(f"region index {index} does not exist (a PCI device has {NUM_PCI_REGIONS})")

    def _region_info(self, index: int):
        self._check_region(index)
        region = self.region_table[index]
        if region is None or not region.size:
            return codec.RegionInfo(index, 0, 0), None
        flags = (_READ_FLAGS if region.readable else 0) | (_WRITE_FLAGS if region.writable else 0)
        if region.mmap_fd is None:
            return codec.RegionInfo(index, flags, region.size), None
        return codec.RegionInfo(index, flags | P.REGION_FLAG_MMAP, region.size, 0,
                                sparse_areas=((0, region.size),)), region.mmap_fd

    def _feature(self, message) -> bytes:
        feature, flags = message.feature, message.flags
        ops = flags & (P.FEATURE_GET | P.FEATURE_SET)
        allowed = {
            P.FEATURE_MIGRATION: P.FEATURE_GET,
            P.FEATURE_MIG_DEVICE_STATE: P.FEATURE_GET | P.FEATURE_SET,
            P.FEATURE_DMA_LOGGING_START: P.FEATURE_SET,
            P.FEATURE_DMA_LOGGING_STOP: P.FEATURE_SET,
            P.FEATURE_DMA_LOGGING_REPORT: P.FEATURE_GET,
        }.get(feature)
        if allowed is None:
            raise DeviceError(f"device feature {feature} is not supported", errno.ENOTSUP)
        if ops & ~allowed:
            raise DeviceError(f"device feature {feature} does not support that operation", errno.ENOTSUP)
        echo = codec.encode_feature(message)           # SET and PROBE replies repeat the request
        if flags & P.FEATURE_PROBE:
            return echo
        if feature == P.FEATURE_MIGRATION:
            return self._feature_reply(flags, P.MIGRATION_FLAGS.pack(SUPPORTED_FLAGS))
        if feature == P.FEATURE_MIG_DEVICE_STATE:
            if ops == P.FEATURE_GET:
                return self._feature_reply(flags, P.MIG_STATE.pack(self.migration.state, 0xFFFFFFFF))
            target, _data_fd = codec.decode_mig_state(message.data)
            self.migration.set_state(target)
            return echo
        if feature == P.FEATURE_DMA_LOGGING_START:
            page_size, ranges = codec.decode_logging_start(message.data)
            self.dma.start_logging(page_size, ranges)
            return echo
        if feature == P.FEATURE_DMA_LOGGING_STOP:
            self.dma.stop_logging()
            return echo
        iova, length, page_size = codec.decode_logging_report(message.data)
        size = P.FEATURE.size + P.LOGGING_REPORT.size + codec.bitmap_size(length, page_size)
        if size > message.argsz:
            raise DeviceError(f"DMA_LOGGING_REPORT needs argsz {size}, got {message.argsz}", errno.E2BIG)
        limit = min(P.MAX_DATA_XFER_SIZE, self.conn.client_max_xfer)
        if size - P.FEATURE.size > limit:
            raise DeviceError(f"DMA_LOGGING_REPORT of {size - P.FEATURE.size} bytes exceeds max_data_xfer_size "
                              f"{limit}: ask for a shorter range or larger pages", errno.E2BIG)
        bitmap = self.dma.report(iova, length, page_size)
        return self._feature_reply(flags, message.data[:P.LOGGING_REPORT.size] + bitmap)

    @staticmethod
    def _feature_reply(flags: int, data: bytes) -> bytes:
        return codec.encode_feature(codec.Feature(flags, data, P.FEATURE.size + len(data)))

    # --- DeviceHost ---------------------------------------------------------------------

    def set_intx(self, asserted: bool) -> None:
        self.irqs.set_intx(asserted)

    def signal_irq(self, index: int, vector: int) -> None:
        self.irqs.signal(index, vector)

    def dma_read(self, iova: int, length: int) -> bytes:
        return self.dma.read(iova, length)

    def dma_write(self, iova: int, data: bytes) -> None:
        self.dma.write(iova, data)

    def dma_views(self, segments, writable: bool) -> list[memoryview] | None:
        return self.dma.views(segments, writable)

    # --- message-based DMA --------------------------------------------------------------

    def _message_dma_read(self, iova: int, length: int) -> bytes:
        parts = []
        step = max(self.conn.client_max_xfer, 1)
        for pos in range(iova, iova + length, step):
            count = min(step, iova + length - pos)
            reply = self._server_request(P.DMA_READ, codec.encode_dma_access(codec.DmaAccess(pos, count)))
            access = codec.decode_dma_read_reply(reply.payload)
            if access.iova != pos or access.count != count:
                raise DeviceError(f"DMA_READ reply for {access.iova:#x}+{access.count} does not match the "
                                  f"request {pos:#x}+{count}", errno.EIO)
            parts.append(access.data)
        return b"".join(parts)

    def _message_dma_write(self, iova: int, data: bytes) -> None:
        step = max(self.conn.client_max_xfer, 1)
        for pos in range(0, len(data), step):
            chunk = data[pos:pos + step]
            reply = self._server_request(P.DMA_WRITE, codec.encode_dma_access(
                codec.DmaAccess(iova + pos, len(chunk), chunk)))
            access = codec.decode_dma_write_reply(reply.payload)
            if access.iova != iova + pos or access.count != len(chunk):
                raise DeviceError("DMA_WRITE reply does not match the request", errno.EIO)

    def _server_request(self, cmd: int, payload: bytes):
        if self._closed:
            raise DeviceError("no client connected for message-based DMA", errno.ENODEV)
        conn = self.conn
        msg_id = conn.start_request(cmd, payload)
        deadline = time.monotonic() + self.server.dma_timeout
        poller = select.poll()
        poller.register(self.transport.fileno(), select.POLLIN)
        try:
            self.transport.flush(conn.outgoing)
            while (reply := conn.take_reply(msg_id)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not poller.poll(remaining * 1000):
                    raise DeviceError(f"client did not answer {P.command_name(cmd)} in time", errno.ETIMEDOUT)
                nbytes, fds = self.transport.receive(conn)
                if not nbytes:
                    close_fds(fds)
                    raise TransportError("end of stream")
                conn.receive_replies(nbytes, fds)
        except (TransportError, codec.FramingError) as exc:
            self._closed = True
            raise DeviceError(f"{P.command_name(cmd)} failed: {exc}", errno.EIO) from None
        finally:
            conn.abandon_request(msg_id)
        if reply.error or reply.flags & P.FLAG_ERROR:
            raise DeviceError(f"client refused {P.command_name(cmd)} (errno {reply.error})", reply.error or errno.EIO)
        return reply
