"""Moves bytes and fds between an AF_UNIX stream socket and a sans-I/O connection.

Sockets stay in blocking mode (no Python-level timeout: that would add a poll() before
every call); the server only reads after epoll reported the socket readable, and
SO_SNDTIMEO bounds how long a send to a client that stopped reading may block.
Received fds are close-on-exec. A control-message truncation (the peer sent more fds
than we accept) closes whatever arrived and fails the connection, since the fds that
the kernel dropped can never be recovered. Outgoing fds are borrowed, never closed here.
"""

from __future__ import annotations

import array
import os
import socket
import struct

from . import protocol as P
from .connection import close_fds


class TransportError(Exception):
    """The connection cannot continue (peer gone, truncated fds, send timeout)."""


_FD_SIZE = array.array("i").itemsize
_TRUNCATED = int(socket.MSG_CTRUNC | socket.MSG_TRUNC)


def fds_from_ancillary(ancdata) -> list:
    fds = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[:len(data) - len(data) % _FD_SIZE])
            fds.extend(arr)
    return fds


class SocketTransport:
    def __init__(self, sock: socket.socket, max_fds: int = P.MAX_MSG_FDS, send_timeout: float = 5.0,
                 recv_timeout: float = 0.0):
        """recv_timeout (SO_RCVTIMEO): a receive that waits longer returns None."""
        self.sock = sock
        self.ancillary_space = socket.CMSG_SPACE(max_fds * _FD_SIZE)
        for option, seconds in ((socket.SO_SNDTIMEO, send_timeout), (socket.SO_RCVTIMEO, recv_timeout)):
            if seconds:
                sock.setsockopt(socket.SOL_SOCKET, option,
                                struct.pack("ll", int(seconds), int((seconds - int(seconds)) * 1e6)))
        self._recvmsg_into = sock.recvmsg_into
        self._send = sock.send

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, reader) -> tuple[int, list] | None:
        """One recvmsg into the reader's buffer: (nbytes, fds); nbytes 0 means EOF;
        None if the receive timeout passed. The caller passes the result on to
        reader.receive()/received()."""
        try:
            nbytes, ancdata, msg_flags, _ = self._recvmsg_into(reader.recv_views(), self.ancillary_space,
                                                               socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return None
        except InterruptedError:
            return self.receive(reader)
        except OSError as exc:
            raise TransportError(f"receive failed: {exc.strerror or exc}") from None
        if not ancdata and not msg_flags & _TRUNCATED:
            return nbytes, ()
        return nbytes, self.ancillary_fds(ancdata, msg_flags)

    @staticmethod
    def ancillary_fds(ancdata, msg_flags: int) -> list:
        """The fds of one recvmsg; TransportError (fds closed) if the kernel truncated them."""
        fds = fds_from_ancillary(ancdata)
        if msg_flags & _TRUNCATED:
            close_fds(fds)
            raise TransportError("peer sent more file descriptors than allowed in one message")
        return fds

    def send(self, data: bytes, fds=None) -> None:
        """Send all of `data`; fds ride on the first chunk only."""
        self.flush([(data, fds)])

    def flush(self, outgoing: list) -> None:
        """Send and clear a connection's outgoing (bytes, fds) list, looping on short sends."""
        send = self._send
        try:
            for data, fds in outgoing:
                if fds:
                    sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    sent = send(data)
                while sent < len(data):
                    sent += send(memoryview(data)[sent:])
        except BlockingIOError:
            raise TransportError("peer stopped reading (send timed out)") from None
        except OSError as exc:
            raise TransportError(f"send failed: {exc.strerror or exc}") from None
        finally:
            outgoing.clear()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def socket_from_fd(fd: int) -> tuple[socket.socket, bool]:
    """Wrap an inherited fd: (socket, is_listening). Raises ValueError if it is no AF_UNIX stream."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"fd {fd} is not a socket ({exc.strerror})") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError(f"fd {fd} is not an AF_UNIX stream socket")
    listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    os.set_inheritable(fd, False)
    return sock, listening


def unix_listener(path: str, backlog: int) -> socket.socket:
    """A listening AF_UNIX stream socket bound at path; raises OSError (nothing left open)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
