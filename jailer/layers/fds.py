"""The fd manifest: which descriptors the program gets, checked, at fixed numbers.

The launcher gathers each FdSpec's descriptor (given with --fd or by socket activation, a
listening socket made for --socket-path or --socket, a memfd/eventfd/file or the notify
socketpair it creates), checks that its type is the one the manifest declares, and
refuses a mismatch. In the child, every manifest fd is moved
to its FdSpec.number and every other descriptor except stdio is closed (close_range).
"""

from __future__ import annotations

import _socket
import fcntl
import os
import stat

from jailer.errors import UsageError

KIND_DESCRIPTIONS = {
    "unix-listener": "a listening AF_UNIX stream socket",
    "unix-stream": "a connected AF_UNIX stream socket",
    "memfd": "a memfd",
    "eventfd": "an eventfd",
    "file": "a regular file",
    "notify": "a connected AF_UNIX datagram socket",
    "checkpoint": "a memfd",
}
_SEALED = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK   # a checkpoint cannot be grown by the program
VFIO_USER_FD = "vfio-user"   # the unix-listener --socket-path and plain --fd N mean when there are several


def describe_fd(fd: int) -> str:
    """What an open descriptor is, in words, for mismatch messages."""
    try:
        st = os.fstat(fd)
    except OSError:
        return "not an open descriptor"
    if stat.S_ISSOCK(st.st_mode):
        family, kind, state = _socket_info(fd)
        names = {_socket.AF_UNIX: "AF_UNIX", _socket.AF_INET: "AF_INET", _socket.AF_INET6: "AF_INET6"}
        kinds = {_socket.SOCK_STREAM: "stream", _socket.SOCK_DGRAM: "datagram", _socket.SOCK_SEQPACKET: "seqpacket"}
        return f"a {state} {names.get(family, f'family {family}')} {kinds.get(kind, f'type {kind}')} socket"
    if stat.S_ISREG(st.st_mode):
        return "a memfd" if _link(fd).startswith("/memfd:") else "a regular file"
    if stat.S_ISFIFO(st.st_mode):
        return "a pipe"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    if stat.S_ISCHR(st.st_mode):
        return "a character device"
    link = _link(fd)
    return "an eventfd" if link == "anon_inode:[eventfd]" else f"'{link}'"


def _link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _socket_info(fd: int) -> tuple[int, int, str]:
    """(SO_DOMAIN, SO_TYPE, 'listening' / 'connected' / 'unconnected')."""
    sock = _socket.socket(fileno=os.dup(fd))
    try:
        if sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN):
            state = "listening"
        else:
            try:
                sock.getpeername()
                state = "connected"
            except OSError:
                state = "unconnected"
        return sock.family, sock.type, state
    finally:
        sock.close()


def check_kind(fd: int, spec, mode: str | None = None) -> None:
    """Refuse a descriptor whose type is not the one the manifest declares for it (a file
    fd: opened in the profile's mode, or in `mode`, which --read-only makes "r")."""
    expected = KIND_DESCRIPTIONS[spec.kind]
    mode = mode or spec.mode
    actual = describe_fd(fd)
    ok = actual == expected or (spec.kind == "file" and actual == "a regular file")
    if ok and spec.kind == "file":
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        needs_read, needs_write = "r" in mode, "w" in mode
        ok = (not needs_read or access in (os.O_RDONLY, os.O_RDWR)) and \
             (not needs_write or access in (os.O_WRONLY, os.O_RDWR))
        actual += f" opened {({os.O_RDONLY: 'r', os.O_WRONLY: 'w', os.O_RDWR: 'rw'}).get(access, '?')}"
        expected += f" opened {mode}"
    if not ok:
        raise UsageError(f"fd {fd} given for '{spec.name}' is {actual}; the profile expects {expected}")


def create_listener(path: str, uid: int, gid: int, group: int | None = None):
    """(fd, paths.Made) of a listening AF_UNIX socket at `path`; a stale socket there is
    replaced, anything else refused. As root it belongs to the sandbox's uid/gid. With
    `group` (--socket-group) it is mode 0660 and belongs to that group, so that a client
    running as another user in it (QEMU as its own user, say) can connect: connecting needs
    write permission on the socket file.

    The directory may be one a client or tenant controls, so the socket is bound in a
    private directory jailer makes there, given its owner and mode inside it, and then
    moved into place (jailer.host.paths): nothing is ever changed by a path that an
    untrusted user could have swapped."""
    from jailer.host import paths

    directory, name = paths.split(path)
    try:
        dirfd = paths.open_directory(directory)
    except OSError as exc:
        raise UsageError(f"cannot listen on {path}: {exc.strerror}") from None
    try:
        stale = existing_socket(dirfd, name, path)
        try:
            private = paths.PrivateDirectory(dirfd, path)
        except OSError as exc:
            raise UsageError(f"cannot listen on {path}: {exc.strerror}") from None
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            _bind_in(private, name, sock, uid, gid, group)
            sock.listen(16)
            held = paths.hold(private.fd, name)
            try:
                paths.place(private, name, dirfd, name, path, replace_socket=stale)
            except BaseException:
                os.close(held)
                raise
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        except BaseException:
            sock.close()
            raise
        finally:
            private.close(name)
    except BaseException:
        os.close(dirfd)
        raise
    return sock.detach(), paths.Made(dirfd, name, held)


def _bind_in(private, name: str, sock, uid: int, gid: int, group: int | None) -> None:
    """Bind `sock` to `name` in the private directory with its final mode (through the umask) and owner."""
    mask = os.umask(0o117) if group is not None else None
    try:
        private.bind(sock, name)
    finally:
        if mask is not None:
            os.umask(mask)
    if group is not None:
        give_to_group(private, name, uid, group)
    elif os.geteuid() == 0 and (uid, gid) != (0, 0):
        os.chown(name, uid, gid, dir_fd=private.fd, follow_symlinks=False)


def existing_socket(dirfd: int, name: str, path: str) -> bool:
    """Whether a (stale) socket is at `name` to be replaced; anything else there is refused."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket; refusing to replace it")
    return True


def give_to_group(private, name: str, uid: int, group: int) -> None:
    """--socket-group: the socket `name` in a private directory (jailer.host.paths) goes to
    `group`, and as root to the sandbox's `uid`."""
    try:
        os.chown(name, uid if os.geteuid() == 0 else -1, group, dir_fd=private.fd, follow_symlinks=False)
    except PermissionError:
        raise UsageError(f"--socket-group: cannot give {private.path} to group {group}: only root may name a "
                         "group the caller is not in") from None


class Manifest:
    """The descriptors the launcher holds for the program, and what it created (to clean up)."""

    def __init__(self):
        self.entries: list[tuple[object, int]] = []   # (FdSpec, fd in the launcher)
        self.created_fds: list[int] = []
        self.made: list = []                           # jailer.host.paths.Made: the sockets jailer created
        self.notify_fd: int | None = None              # the launcher's end of the notify socketpair
        self.notify_name: str | None = None
        self.kept: dict[str, int] = {}                 # what a restart gives the program again (jailer.host.restart)
        self.new_checkpoints: dict[str, int] = {}      # checkpoint memfds created here (for a service manager's store)
        self.files: dict[str, str] = {}                # file fd name -> the caller's path (--file, --disk)
        self.read_only = False

    @classmethod
    def gather(cls, specs, given: dict, socket_path, owner: tuple[int, int], sockets=None,
               socket_group: int | None = None, program_sockets: bool = False, made=(), files=None,
               read_only: bool = False) -> "Manifest":
        """given: {name or None: fd}; None stands for the profile's unix-listener (plain --fd N);
        socket_path: where to listen for that unix-listener; sockets: {name: path} to listen on;
        socket_group: the group of every socket jailer creates (see create_listener), which
        the program's own sockets get too (program_sockets: there are some); made: what an
        earlier run of a restarted program made, removed with what this one makes; files:
        {name: path} of existing files to open for file fds (read-only with read_only)."""
        manifest = cls()
        manifest.made = list(made)
        given = dict(given)
        paths = dict(sockets or {})
        try:
            if None in given and socket_path is not None:
                raise UsageError("--fd N and --socket-path are exclusive")
            if None in given:
                given[main_listener(specs, "--fd N").name] = given.pop(None)
            if socket_path is not None:
                name = main_listener(specs, "--socket-path").name
                if name in paths:
                    raise UsageError(f"--socket-path and --socket {name}=PATH name the same fd")
                paths[name] = socket_path
            _refuse_unknown(specs, given, "--fd")
            _refuse_unknown(specs, paths, "--socket")
            _refuse_unknown(specs, files or {}, "--file" if set(files or {}) != {"disk"} else "--disk")
            for name, path in (files or {}).items():
                spec = _spec(specs, name)
                if spec.kind != "file":
                    raise UsageError(f"--file {name}={path}: fd '{name}' is a {spec.kind} fd, expected a file")
                if name in given:
                    raise UsageError(f"fd '{name}' is given both as an open fd and as a file path")
            manifest.files, manifest.read_only = dict(files or {}), read_only
            for name in paths:
                if name in given:
                    raise UsageError(f"fd '{name}' is given both as an open fd and as a socket path")
                if _spec(specs, name).kind != "unix-listener":
                    raise UsageError(f"--socket {name}=PATH: fd '{name}' is a {_spec(specs, name).kind} fd, "
                                     "expected a unix-listener")
            for spec in specs:
                fd = manifest._descriptor(spec, given, paths, owner, socket_group)
                if fd is not None:
                    manifest.entries.append((spec, fd))
            if socket_group is not None and not manifest.made and not program_sockets:
                raise UsageError("--socket-group: jailer creates no socket here "
                                 "(it applies to --socket-path and --socket NAME=PATH)")
        except BaseException:
            manifest.close()
            raise
        return manifest

    def _descriptor(self, spec, given, paths, owner, socket_group):
        if spec.name in given:
            if spec.kind == "notify":
                raise UsageError(f"fd '{spec.name}' is the program's notify socket, which jailer creates; "
                                 "it cannot be given")
            fd = given[spec.name]
            check_kind(fd, spec)
            if spec.kind == "checkpoint":
                _seal(fd, spec)
            self.kept[spec.name] = fd
            return fd
        path = paths.get(spec.name, spec.path)
        if spec.kind == "notify":
            ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
            ours.setblocking(False)
            self.notify_fd, self.notify_name = ours.detach(), spec.name
            self.created_fds.append(self.notify_fd)
            fd = theirs.detach()
        elif spec.kind == "unix-listener" and path:
            fd, made = create_listener(path, *owner, group=socket_group)
            self.made.append(made)
            self.kept[spec.name] = fd
        elif spec.kind == "memfd" and spec.size is not None:
            fd = os.memfd_create(spec.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, spec.size)
        elif spec.kind == "checkpoint":
            fd = os.memfd_create(spec.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, spec.size)
            _seal(fd, spec)
            self.kept[spec.name] = self.new_checkpoints[spec.name] = fd
        elif spec.kind == "eventfd":
            fd = os.eventfd(0, os.EFD_CLOEXEC)
        elif spec.kind == "file" and (spec.path or spec.name in self.files):
            from jailer.host import paths

            flags = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT, "rw": os.O_RDWR | os.O_CREAT}[spec.mode]
            path = self.files.get(spec.name, spec.path)
            if spec.name in self.files:              # the caller's file: it must exist
                flags = os.O_RDONLY if self.read_only else flags & ~os.O_CREAT
            try:
                fd = paths.open_file(path, flags)
            except OSError as exc:
                raise UsageError(f"fd '{spec.name}': cannot open {path}: {exc.strerror}") from None
        elif spec.required:
            option = {"unix-listener": "--fd N or --socket-path PATH",
                      "file": f"--file {spec.name}=PATH (--disk PATH for 'disk') or --fd {spec.name}=N"}.get(
                spec.kind, f"--fd {spec.name}=N")
            raise UsageError(f"the profile needs fd '{spec.name}' ({KIND_DESCRIPTIONS[spec.kind]}): pass it with "
                             f"{option}")
        else:
            return None
        self.created_fds.append(fd)
        check_kind(fd, spec, mode="r" if spec.name in self.files and self.read_only else None)
        return fd

    def numbers(self) -> dict[str, int]:
        return {spec.name: spec.number for spec, _ in self.entries}

    def listen_numbers(self) -> dict[str, int]:
        """The fds LISTEN_FDS describes: all but the notify socket, which has its own variable."""
        return {spec.name: spec.number for spec, _ in self.entries if spec.kind != "notify"}

    def close(self) -> None:
        """Close what jailer created and remove the sockets it made (still the same inode)."""
        for fd in self.created_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.created_fds = []
        for made in self.made:
            made.remove()
        self.made = []


def _seal(fd: int, spec) -> None:
    """A checkpoint keeps its size: the program must not grow the memory jailer holds for it."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALED)
    except OSError:
        pass   # already sealed against more seals: what counts is checked below
    if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALED != _SEALED:
        raise UsageError(f"fd '{spec.name}' is a memfd that cannot be sealed against growing and shrinking; "
                         "create it with MFD_ALLOW_SEALING (or let jailer create it)")


def _spec(specs, name):
    return next(s for s in specs if s.name == name)


def _refuse_unknown(specs, named: dict, option: str) -> None:
    unknown = set(named) - {s.name for s in specs}
    if unknown:
        raise UsageError(f"{option}: the profile has no fd named {', '.join(sorted(unknown))} "
                         f"(it has: {', '.join(s.name for s in specs) or 'none'})")


def main_listener(specs, option: str):
    """The unix-listener --socket-path / --fd N stand for: the only one, or the one named "vfio-user"."""
    listeners = [s for s in specs if s.kind == "unix-listener"]
    if len(listeners) == 1:
        return listeners[0]
    named = [s for s in listeners if s.name == VFIO_USER_FD]
    if named:
        return named[0]
    raise UsageError(f"{option} needs one unix-listener fd in the profile, or one named '{VFIO_USER_FD}' "
                     f"(it has {len(listeners)}: {', '.join(s.name for s in listeners) or 'none'}); "
                     "use --fd NAME=N or --socket NAME=PATH")


def activated_fds(specs, given: dict, sockets: dict, socket_path) -> dict:
    """`given` plus the sockets a service manager passed to this process (LISTEN_FDS, LISTEN_PID
    = our pid): each is taken as the manifest fd LISTEN_FDNAMES names it, or, when there is a
    single one, as the profile's only (or "vfio-user") unix-listener. Fds named on the command
    line win."""
    from jailer import sdnotify

    passed = sdnotify.listen_fds()
    if not passed:
        return given
    given = dict(given)
    names = {s.name for s in specs}
    explicit = set(given) | set(sockets) | ({None} if socket_path is not None else set())
    if len(passed) == 1 and passed[0][1] not in names:
        if explicit & {None, main_listener(specs, "socket activation").name}:
            return given
        given[None] = passed[0][0]
        return given
    for fd, name in passed:
        if name not in names:
            raise UsageError(f"the service manager passed fd {fd} named '{name}', which the profile does not "
                             f"declare (it has: {', '.join(sorted(names)) or 'none'}); set FileDescriptorName= "
                             "in the .socket unit to one of those")
        if name not in explicit:
            given[name] = fd
    return given


def install(entries, carried: list[int]) -> list[int]:
    """In the child: put each fd at its number and close every other fd but stdio and `carried`
    (the launcher's own channels, moved above the manifest and left close-on-exec); returns
    the new numbers of `carried`."""
    top = max([spec.number for spec, _ in entries] + carried + [2]) + 1
    staged = [(spec, fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top)) for spec, fd in entries]
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in carried]
    for spec, fd in staged:
        os.dup2(fd, spec.number, inheritable=True)
    close_all_but({0, 1, 2} | set(moved) | {spec.number for spec, _ in entries})
    return moved


def close_all_but(keep: set[int]) -> None:
    from jailer.layers import syscalls

    first = 0
    for fd in sorted(keep):
        if fd > first:
            syscalls.close_range(first, fd - 1)
        first = fd + 1
    syscalls.close_range(first)


def expand_argv(argv, numbers: dict[str, int], optional=()) -> list[str]:
    """Replace every {fd:NAME} with the number the program will find that fd at. An argument
    naming an optional fd that was not provided is left out (e.g. `--control-fd={fd:control}`)."""
    expanded = []
    for arg in argv:
        for name, number in numbers.items():
            arg = arg.replace("{fd:" + name + "}", str(number))
        if any("{fd:" + name + "}" in arg for name in optional):
            continue
        if "{fd:" in arg:
            raise UsageError(f"program argument '{arg}' names an fd that was not provided")
        expanded.append(arg)
    return expanded


def listen_environment(numbers: dict[str, int]) -> dict[str, str]:
    """LISTEN_FDS/LISTEN_FDNAMES (LISTEN_PID is set by the process that execs), systemd-style:
    only when the fds are exactly 3, 4, ... as sd_listen_fds(3) requires."""
    ordered = sorted(numbers.items(), key=lambda item: item[1])
    if not ordered or [n for _, n in ordered] != list(range(3, 3 + len(ordered))):
        return {}
    return {"LISTEN_FDS": str(len(ordered)), "LISTEN_FDNAMES": ":".join(name for name, _ in ordered)}
