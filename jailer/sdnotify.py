"""The two halves of systemd's daemon protocol a launcher needs, without libsystemd.

`notify` tells the service manager about state changes (READY=1 once the device listens,
so `Type=notify` units and `systemctl start` wait for a usable socket). `socket_activated_listener`
takes over a listening socket systemd opened for a `.socket` unit (LISTEN_FDS), which is how
a jailed device keeps its socket across restarts. Both are no-ops outside systemd.
"""

from __future__ import annotations

import array
import os
import socket
import stat

from jailer.errors import JailerError, UsageError

SD_LISTEN_FDS_START = 3    # systemd passes activated sockets from fd 3 upward


def notify(state: str, environ=None, fds=()) -> bool:
    """Send `state` ("READY=1", "STATUS=...", "MAINPID=N", newline-separated) to $NOTIFY_SOCKET,
    with `fds` attached (for "FDSTORE=1": systemd keeps them and passes them to the next start).

    Returns False when not started by a service manager (variable unset or empty).
    """
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]          # abstract namespace
    elif address.startswith("/"):
        target = address
    else:
        raise JailerError(f"NOTIFY_SOCKET={address!r} is neither an absolute path nor an abstract "
                          "'@name' socket; jailer supports only those two forms")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            if fds:
                sock.sendmsg([state.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                             0, target)
            else:
                sock.sendto(state.encode(), target)
        except OSError as exc:
            raise JailerError(f"cannot notify the service manager at {address}: {exc.strerror}") from exc
    return True


def listen_fds(environ=None) -> list[tuple[int, str]]:
    """The (fd, name) pairs systemd passed to this very process, in order; [] if none.

    Follows sd_listen_fds(3): honoured only when LISTEN_PID is our pid (the variables are
    inherited by children that must not take the sockets). The fds are made close-on-exec
    so that only the descriptors the launcher passes on explicitly reach the device.
    """
    environ = os.environ if environ is None else environ
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        raise UsageError(f"LISTEN_FDS={environ['LISTEN_FDS']!r} is not a number") from None
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    if len(names) != count:
        names = ["unknown"] * count
    fds = []
    for offset, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + offset
        try:
            os.set_inheritable(fd, False)
        except OSError:
            raise UsageError(f"LISTEN_FDS={count} but fd {fd} is not open") from None
        fds.append((fd, name))
    return fds


def socket_activated_listener(fd_name: str, environ=None) -> int | None:
    """The socket-activated fd to use as the profile's unix-listener `fd_name`, or None.

    The fd named `fd_name` (the .socket unit's FileDescriptorName=) is chosen; a single fd
    is taken whatever its name (systemd names it after the .socket unit by default), so a
    plain `ListenStream=` unit works. It must be a
    listening AF_UNIX stream socket, since that is what the device will accept() on.
    """
    fds = listen_fds(environ)
    chosen = [fd for fd, name in fds if name == fd_name]
    if not chosen and len(fds) == 1:
        chosen = [fds[0][0]]
    if not chosen:
        if fds:
            offered = ", ".join(f"{name} (fd {fd})" for fd, name in fds)
            raise UsageError(f"systemd passed {offered} but none is named '{fd_name}'; "
                             f"set FileDescriptorName={fd_name} in the .socket unit")
        return None
    if len(chosen) > 1:
        raise UsageError(f"systemd passed {len(chosen)} sockets named '{fd_name}'; expected one")
    _require_unix_listener(chosen[0], fd_name)
    return chosen[0]


def _require_unix_listener(fd: int, fd_name: str) -> None:
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise UsageError(f"socket-activated fd {fd} for '{fd_name}' is not a socket")
    sock = socket.socket(fileno=os.dup(fd))
    try:
        kind = (sock.family, sock.type, sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    finally:
        sock.close()
    if kind != (socket.AF_UNIX, socket.SOCK_STREAM, 1):
        raise UsageError(f"socket-activated fd {fd} for '{fd_name}' is not a listening AF_UNIX stream "
                         "socket; use ListenStream=/path with Accept=no in the .socket unit")
