"""The vfio-user backend program conventions, shared by every bundled device program.

    run_backend(make_device, argv=None, *, description, device_type,
                extra_options=None, setup=None, features=()) -> never returns (sys.exit)

Command line it implements:
    --socket-path=PATH        create, bind and listen on PATH; the path appears only once
                              the server is ready (a stale socket there is replaced, any
                              other file is refused); it is removed again on exit
    --fd=N                    use inherited fd N: a listening socket, or one connected
                              socket (served until the client disconnects)
    --checkpoint-fd=N         keep the device state in inherited fd N (a memfd or regular
                              file of a fixed size, kept by whoever restarts the device; see
                              devices.vfio_user.checkpoint): a valid checkpoint of this
                              device type and an accepted abi_version is loaded before
                              serving (one INFO line says so; any other is refused in one
                              line and the device starts fresh), and the state is written
                              back whenever it changes. A descriptor that cannot hold the
                              device's state exits 2
    --print-capabilities      print {"type": device_type, "features": [...]} and exit 0
    -v/--verbose              debug logging (logs go to stderr; never daemonizes)
Neither --socket-path nor --fd: socket activation (LISTEN_PID == getpid(), LISTEN_FDS >= 1,
first fd 3). Once it serves, READY=1 goes to the fd in $JAILER_NOTIFY_FD (jailer's notify
socket; profile ready = "notify") or else to $NOTIFY_SOCKET (plain systemd Type=notify);
everything steady serving needs is imported and open by then, so a jailer steady policy
can deny open/openat/execve/socket afterwards. SIGTERM/SIGINT end the loop (it wakes through signal.set_wakeup_fd) and the
program exits 0. Usage errors exit 2, runtime errors exit 1, each with one line on stderr.
Crash-only: when the program cannot serve any more (out of memory, no fds left to accept
a client, any error the server loop does not recover from) it exits 1 with one line on
stderr saying why, never a traceback, and never stays alive without serving.

Hooks for a device program:
    extra_options(parser)            add device options to the argparse parser,
                                     e.g. parser.add_argument("--control-socket")
    make_device(options) -> Device   build the model from the parsed argparse.Namespace
    setup(server, device, options)   after the Server exists, before serving: register
                                     readers/timers (server.add_reader, call_later); may
                                     return a callable run once after the loop ends
    features                         extra strings for --print-capabilities
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import stat
import sys

from .checkpoint import CheckpointArea, CheckpointError
from .device import DeviceError
from .migration import check_compatible, unwrap_state, wrap_state
from .server import Server, ServerFailure
from .transport import socket_from_fd, unix_listener

BASE_FEATURES = ("socket-path", "fd", "listen-fds", "reconnect", "migration", "dma", "dma-logging",
                 "checkpoint-fd")
LISTEN_FDS_START = 3


class BackendError(Exception):
    """Something the user must fix; printed as one line."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def build_parser(description: str, extra_options=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen for a vfio-user client on this UNIX socket")
    where.add_argument("--fd", type=int, metavar="N",
                       help="use inherited fd N (a listening or an already connected UNIX socket)")
    parser.add_argument("--checkpoint-fd", type=int, metavar="N",
                        help="restore the device state from inherited fd N (a memfd) and keep it there")
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the backend's type and features as JSON and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log protocol details on stderr")
    if extra_options is not None:
        extra_options(parser)
    return parser


def staging_path(path: str) -> str:
    return f"{path}.{os.getpid()}.tmp"


def listen_on_path(path: str) -> socket.socket:
    """Listen under a temporary name; publish() renames it once the server is ready, so
    whoever waits for the path to appear can connect and be served at once."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise BackendError(f"{path} exists and is not a socket: refusing to replace it")
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise BackendError(f"cannot use {path}: {exc.strerror}") from None
    staging = staging_path(path)
    try:
        return unix_listener(staging, 1)
    except OSError as exc:
        _unlink(staging)
        raise BackendError(f"cannot listen on {path}: {exc.strerror}") from None


def publish(path: str) -> None:
    """Move the listening socket to its real name (atomically replacing a stale one)."""
    try:
        os.rename(staging_path(path), path)
    except OSError as exc:
        raise BackendError(f"cannot create {path}: {exc.strerror}") from None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def activation_fd(environ=os.environ) -> int | None:
    """The first socket-activation fd meant for this process, if any."""
    try:
        if int(environ.get("LISTEN_PID", "0")) != os.getpid() or int(environ.get("LISTEN_FDS", "0")) < 1:
            return None
    except ValueError:
        return None
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return LISTEN_FDS_START


def open_socket(options) -> tuple[socket.socket, str | None]:
    """(socket, path to unlink on exit)."""
    if options.socket_path:
        return listen_on_path(options.socket_path), options.socket_path
    fd = options.fd if options.fd is not None else activation_fd()
    if fd is None:
        raise BackendError("give --socket-path=PATH or --fd=N (or start it socket-activated)", 2)
    try:
        sock, _listening = socket_from_fd(fd)
    except ValueError as exc:
        raise BackendError(str(exc), 2) from None
    return sock, None


def run_backend(make_device, argv=None, *, description: str, device_type: str, extra_options=None,
                setup=None, features=()) -> None:
    parser = build_parser(description, extra_options)
    options = parser.parse_args(argv)
    if options.print_capabilities:
        print(json.dumps({"type": device_type, "features": [*BASE_FEATURES, *features]}))
        sys.exit(0)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if options.verbose else logging.INFO,
                        format=f"{device_type}[%(process)d]: %(message)s")
    logging.raiseExceptions = False         # a log line that fails (out of memory) is lost, not a traceback
    try:
        sys.exit(_serve(make_device, options, setup))
    except (BackendError, DeviceError) as exc:
        print(f"{device_type}: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
    except MemoryError:
        die(f"{device_type}: out of memory, cannot serve any more (the process reached its memory limit)")
    except ServerFailure as exc:
        die(f"{device_type}: cannot serve any more: {exc}")
    except Exception as exc:                # noqa: BLE001 - crash-only: one line, then exit
        die(f"{device_type}: internal error, cannot serve any more: {type(exc).__name__}: {one_line(exc)}")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500]


def die(reason: str) -> None:
    """Exit 1 with `reason` as the only line on stderr: written with one write(2), since
    a process out of memory may not manage much more, and without interpreter teardown."""
    try:
        sys.stderr.flush()
    except Exception:                       # noqa: BLE001 - the reason matters more than buffered logs
        pass
    try:
        os.write(2, reason.encode("utf-8", "replace") + b"\n")
    finally:
        os._exit(1)


def open_checkpoint(fd: int, device) -> CheckpointArea:
    """The checkpoint area of --checkpoint-fd, its state loaded into `device` if it holds one
    the device accepts; exit 2 if the area cannot hold the device's state."""
    try:
        area = CheckpointArea.open(fd)
    except CheckpointError as exc:
        raise BackendError(f"--checkpoint-fd={fd}: {exc}", 2) from None
    restore_checkpoint(device, area, fd)
    try:
        area.check_fits(len(wrap_state(device.device_type, device.abi_version, device.save_state())))
    except CheckpointError as exc:
        raise BackendError(f"--checkpoint-fd={fd}: {exc}", 2) from None
    return area


def restore_checkpoint(device, area: CheckpointArea, fd: int) -> None:
    """Load the newest checkpoint, or say in one line why not and leave the device at power-on
    state (the next change overwrites the refused checkpoint)."""
    log = logging.getLogger("vfio_user")
    refusal = "refusing the checkpoint on fd %d: %s; starting fresh"
    try:
        checkpoint = area.read()
        if checkpoint is None:
            return
        kind, abi, state = unwrap_state(checkpoint.payload)
        check_compatible(device, kind, abi)
    except (CheckpointError, DeviceError) as exc:
        log.warning(refusal, fd, one_line(exc))
        return
    try:
        device.load_state(state, abi)
    except MemoryError:
        raise
    except Exception as exc:                # noqa: BLE001 - a state the device cannot load must not stop it
        device.reset()                      # whatever load_state changed before it gave up
        log.warning(refusal, fd, one_line(exc))
        return
    log.info("restored state from checkpoint (generation %d, %d bytes)", checkpoint.generation, len(state))


def _serve(make_device, options, setup) -> int:
    device = make_device(options)
    checkpoint = None if options.checkpoint_fd is None else open_checkpoint(options.checkpoint_fd, device)
    sock, path = open_socket(options)
    wake_r, wake_w = socket.socketpair()
    for s in (wake_r, wake_w):
        s.setblocking(False)
    server = Server(device, sock, checkpoint=checkpoint)
    cleanup = None
    previous = {}
    try:
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda signum, frame: server.stop())
        server.add_reader(wake_r.fileno(), lambda: _drain(wake_r))
        if setup is not None:
            cleanup = setup(server, server.device, options)
        if path:
            publish(path)
        logging.getLogger("vfio_user").info("serving %s on %s", server.device.device_type,
                                            path or f"fd {sock.fileno()}")
        announce_ready()
        server.serve_forever()
        _drain(wake_r)   # every stop ends the same way, so a learned filter sees the same calls
    finally:
        signal.set_wakeup_fd(-1)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if cleanup is not None:
            cleanup()
        server.close()
        sock.close()
        wake_r.close()
        wake_w.close()
        if path:
            _unlink(path)
            _unlink(staging_path(path))
    return 0


def announce_ready(environ=os.environ) -> None:
    """READY=1 to jailer's notify fd (closed afterwards), else to a service manager's socket."""
    notify_fd = environ.pop("JAILER_NOTIFY_FD", None)
    address = environ.pop("NOTIFY_SOCKET", None)
    if notify_fd is not None:
        try:
            fd = int(notify_fd)
        except ValueError:
            raise BackendError(f"JAILER_NOTIFY_FD={notify_fd!r} is not an fd number") from None
        try:
            os.write(fd, b"READY=1")
        except OSError as exc:
            raise BackendError(f"cannot report readiness on fd {fd}: {exc.strerror}") from None
        finally:
            os.close(fd)
    elif address:
        target = "\0" + address[1:] if address.startswith("@") else address
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
            try:
                notify.sendto(b"READY=1", target)
            except OSError as exc:
                raise BackendError(f"cannot notify the service manager at {address}: {exc.strerror}") from None


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(64):
            pass
    except BlockingIOError:
        pass
