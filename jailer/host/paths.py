"""Host paths a caller names, where another user may own part of the path.

jailer often runs as root and acts on paths a caller hands it: a socket in a user's
$XDG_RUNTIME_DIR, a pid file in a per-VM directory, a bind source under a tenant's home.
Whoever can write such a directory can swap any entry in it (for a symlink, a hard link,
another directory) between two system calls of jailer's, so nothing here acts twice on
the same path string:

- A path is resolved one component at a time with O_PATH|O_NOFOLLOW. A symlink is
  followed, unless that would lead out of a directory or link owned by an untrusted user
  into something another user owns (systemd's CHASE_SAFE rule): an untrusted user's
  directory can then only ever lead to what that user owns. Trusted owners are root and
  the caller. A hard link a tenant made to someone else's file fails the same test.
- The directory is then pinned as a descriptor and every later step is relative to it
  (openat, mkdirat, renameat2, unlinkat), so swapping a parent directory changes nothing.
- What jailer creates there gets its owner and mode inside a private directory only
  root (or the caller) can write, then is moved into place with RENAME_NOREPLACE.
- What jailer removes is removed only while it is still the inode jailer made, through
  the pinned directory. Anyone able to swap that entry in between could remove what
  they swapped in themselves, so the unlink grants nothing.

docs/security.md lists every path jailer touches and why each is safe.
"""

from __future__ import annotations

import errno
import os
import stat

from jailer.errors import UsageError

_SYMLINK_LIMIT = 40   # what the kernel allows (MAXSYMLINKS)


def trusted_owners() -> frozenset[int]:
    return frozenset((0, os.geteuid()))


class Refused(UsageError):
    """A path leads through something an untrusted user controls into what they do not own."""


def _unsafe(before: os.stat_result, after: os.stat_result, trusted: frozenset[int]) -> bool:
    return before.st_uid not in trusted and after.st_uid != before.st_uid


def _planted_link(directory: os.stat_result, entry: os.stat_result) -> bool:
    """A file with several names in a directory others may write: a hard link anyone could
    have made there to a file they do not own (where fs.protected_hardlinks is off), which
    the owner rule cannot see when the directory is root's (/tmp, say)."""
    return not stat.S_ISDIR(entry.st_mode) and entry.st_nlink > 1 and bool(directory.st_mode & 0o022)


def _check_step(path: str, part: str, before: os.stat_result, after: os.stat_result, trusted, last: bool):
    if _unsafe(before, after, trusted):
        raise Refused(f"{path}: refusing to follow '{part}': it leads from what uid {before.st_uid} "
                      f"controls to what uid {after.st_uid} owns")
    if last and _planted_link(before, after):
        raise Refused(f"{path}: refusing a file with {after.st_nlink} hard links in a directory others may write")


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def walk(path: str, *, make_dirs: int | None = None, cache: dict | None = None,
         want_fd: bool = True) -> tuple[int, os.stat_result]:
    """(O_PATH fd, stat) of `path` with every symlink followed under the rule above, the
    last component's too. make_dirs: create missing directories with this mode. cache:
    {absolute prefix: (fd, stat)} of directories reached without a symlink, shared by
    walks of many paths (a runtime's sixty binds share a few directories); the caller
    closes its fds. want_fd=False: only the stat is wanted (the fd returned is -1), which
    spares opening the last component."""
    trusted = trusted_owners()
    todo = _components(path)
    fd, owned, prefix = -1, True, None
    if cache is not None and path.startswith("/"):
        prefix = ""
        for depth in range(len(todo) - 1, 0, -1):
            key = "/" + "/".join(todo[:depth])
            if key in cache:
                (fd, before), owned, prefix, todo = cache[key], False, key, todo[depth:]
                break
    if fd < 0:
        fd = os.open("/" if path.startswith("/") else ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        before = os.fstat(fd)
    try:
        links = 0
        while todo:
            part = todo.pop(0)
            if not todo and not want_fd:
                after = os.stat(part, dir_fd=fd, follow_symlinks=False)
                _check_step(path, part, before, after, trusted, last=True)
                if not stat.S_ISLNK(after.st_mode):
                    if owned:
                        os.close(fd)
                    return -1, after
            child = _open_component(fd, part, make_dirs)
            try:
                after = os.fstat(child)
                _check_step(path, part, before, after, trusted, last=not todo)
                target = os.readlink("", dir_fd=child) if stat.S_ISLNK(after.st_mode) else None
                if target is None and todo and not stat.S_ISDIR(after.st_mode):
                    raise UsageError(f"{path}: '{part}' is not a directory")
            except BaseException:
                os.close(child)
                raise
            if target is None:
                if owned:
                    os.close(fd)
                fd, before, owned = child, after, True
                if prefix is not None and todo:
                    prefix = f"{prefix}/{part}"
                    cache[prefix] = (fd, before)
                    owned = False
                continue
            os.close(child)
            prefix = None   # past a symlink the literal prefix no longer names where we are
            links += 1
            if links > _SYMLINK_LIMIT:
                raise UsageError(f"{path}: too many levels of symbolic links")
            todo[:0] = _components(target)
            before = after   # the link: what it leads to must pass the rule from its owner
            if target.startswith("/"):   # a relative one goes on from the directory holding it
                root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                if owned:
                    os.close(fd)
                fd, owned = root, True
                root_stat = os.fstat(fd)
                if _unsafe(before, root_stat, trusted):
                    raise Refused(f"{path}: refusing to follow the symlink '{part}' owned by uid "
                                  f"{before.st_uid} to '{target}'")
                before = root_stat
        if not want_fd:   # the last component changed from a symlink to something else meanwhile
            if owned:
                os.close(fd)
            return -1, before
        return (fd if owned else os.dup(fd)), before
    except BaseException:
        if owned:
            os.close(fd)
        raise


def _open_component(fd: int, part: str, make_dir: int | None) -> int:
    try:
        return os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except FileNotFoundError:
        if make_dir is None:
            raise
    try:
        os.mkdir(part, make_dir, dir_fd=fd)
    except FileExistsError:
        pass
    return os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)


def open_directory(path: str, *, make_dirs: int | None = None) -> int:
    """An O_PATH descriptor pinning directory `path` (see walk)."""
    fd, st = walk(path, make_dirs=make_dirs)
    if not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise UsageError(f"{path}: not a directory")
    return fd


def split(path: str) -> tuple[str, str]:
    """(directory, name) of a path naming an entry jailer creates or opens; refuses '.', '..' and a trailing /."""
    directory, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise UsageError(f"{path}: expected a path naming a file, not a directory")
    if "\n" in name:
        raise UsageError(f"{path!r}: a file name with a newline is refused")
    return directory or ".", name


def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """open(2) of a caller-named file, safely: the directory is walked as above, the file
    opened without following a symlink, and refused when a directory an untrusted user
    controls holds a file someone else owns (a hard link to a victim, say). A symlink as
    the last component is followed under the same rule when the file is not created here."""
    directory, name = split(path)
    dirfd = open_directory(directory)
    try:
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY, mode, dir_fd=dirfd)
        except OSError as exc:
            if exc.errno != errno.ELOOP:   # the last component is a symlink: follow it under the rule
                raise
            return _reopen(path, flags & ~(os.O_CREAT | os.O_EXCL))
        try:
            _check_step(path, name, os.fstat(dirfd), os.fstat(fd), trusted_owners(), last=True)
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        os.close(dirfd)


def _reopen(path: str, flags: int) -> int:
    fd, _ = walk(path)
    try:
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(fd)


class Made:
    """An entry jailer made in a pinned directory, removed only while it is still that inode.
    An O_PATH descriptor of the entry is held meanwhile: while it is open the inode cannot be
    freed, so its number cannot be reused by a file someone else makes at the same name."""

    def __init__(self, dirfd: int, name: str, fd: int):
        self.dirfd, self.name, self.fd = dirfd, name, fd

    def remove(self) -> None:
        """Remove the entry if it is still ours, and let go of it and its directory."""
        if self.dirfd < 0:
            return
        unlink_if_same(self.dirfd, self.name, self.fd)
        self.close()

    def close(self) -> None:
        if self.dirfd >= 0:
            os.close(self.dirfd)
            os.close(self.fd)
            self.dirfd = self.fd = -1

    def descriptors(self) -> list[int]:
        return [self.dirfd, self.fd]

    def monitor_lines(self) -> list[str]:
        """How jailer-monitor (monitor.c) is told to remove it: `made FD DIRFD NAME`."""
        return [f"made {self.fd} {self.dirfd} {self.name}"]


class PrivateDirectory:
    """A fresh directory only this user can write, inside a pinned directory: where an entry
    gets its owner and mode before it is moved into place."""

    def __init__(self, dirfd: int, path: str):
        from jailer.host import leftovers

        leftovers.sweep_private_directories(dirfd, os.path.dirname(path))
        self.parent, self.path = dirfd, path
        self.name = f".jailer-{os.getpid()}-{os.urandom(6).hex()}"
        os.mkdir(self.name, 0o700, dir_fd=dirfd)
        try:
            self.fd = os.open(self.name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            st = os.fstat(self.fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                os.close(self.fd)
                raise OSError(errno.EEXIST, "replaced")
        except OSError:
            try:
                os.rmdir(self.name, dir_fd=dirfd)   # ours, or an empty one swapped in: costs no one anything
            except OSError:
                pass
            raise Refused(f"{path}: the private directory jailer made there was replaced") from None

    def bind(self, sock, name: str) -> None:
        """Bind `sock` to NAME in this directory, with no path a rename of its parent could
        redirect: from inside it, so that /proc/net/unix and `ss -x` show NAME (the name it
        will have) rather than a /proc/self/fd path. That borrows the working directory,
        which only a single-threaded process (jailer run, not every program embedding the
        launcher) may do."""
        try:
            here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            here = None
        if here is None or len(os.listdir("/proc/self/task")) > 1:
            if here is not None:
                os.close(here)
            sock.bind(f"/proc/self/fd/{self.fd}/{name}")
            return
        try:
            os.fchdir(self.fd)
            sock.bind(name)
        finally:
            os.fchdir(here)
            os.close(here)

    def close(self, leftover: str) -> None:
        """Remove `leftover` if it is still here, then the directory (a directory swapped in
        for it is removed only if empty, which costs its owner nothing)."""
        try:
            os.unlink(leftover, dir_fd=self.fd)
        except OSError:
            pass
        os.close(self.fd)
        try:
            os.rmdir(self.name, dir_fd=self.parent)
        except OSError:
            pass


def place(private: PrivateDirectory, name: str, dirfd: int, target: str, path: str, replace_socket: bool) -> None:
    """Move `name` from the private directory to `target` in `dirfd` without replacing anything,
    or, with replace_socket, atomically exchanging it with a socket already there (the stale
    one of an earlier run), which is then removed from the private directory."""
    from jailer.layers import syscalls

    try:
        syscalls.renameat2(private.fd, name, dirfd, target, syscalls.RENAME_NOREPLACE)
        return
    except OSError as exc:
        if exc.errno != errno.EEXIST or not replace_socket:
            raise
    syscalls.renameat2(private.fd, name, dirfd, target, syscalls.RENAME_EXCHANGE)
    displaced = os.stat(name, dir_fd=private.fd, follow_symlinks=False)
    if stat.S_ISSOCK(displaced.st_mode):
        os.unlink(name, dir_fd=private.fd)
        return
    try:   # something else was swapped in meanwhile: put it back, remove ours
        syscalls.renameat2(private.fd, name, dirfd, target, syscalls.RENAME_EXCHANGE)
        os.unlink(name, dir_fd=private.fd)
    except OSError:
        pass
    raise UsageError(f"{path} exists and is not a socket; refusing to replace it")


def list_directory(dirfd: int) -> list[str]:
    """The entries of a pinned directory (which may be an O_PATH descriptor, which cannot be listed)."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def unlink_if_same(dirfd: int, name: str, fd: int) -> None:
    try:
        if os.path.samestat(os.stat(name, dir_fd=dirfd, follow_symlinks=False), os.fstat(fd)):
            os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass


def remove_flat_directory(dirfd: int, name: str, held: int) -> bool:
    """Remove directory NAME, if it is still the one `held` holds, with every entry in it
    that is not a directory (jailer-monitor's `tidy` does the same); False if something was
    left. Made for the directory a program binds its socket in, where Landlock lets it make
    sockets and nothing else."""
    return remove_directory_if(dirfd, name, lambda st: os.path.samestat(st, os.fstat(held)))


def remove_directory_if(dirfd: int, name: str, ours, entry_removable=lambda fd, entry: True) -> bool:
    """Remove directory NAME (opened without following a link) when ours(its stat) says so,
    first unlinking the entries in it that entry_removable(its fd, entry) allows; False if it
    was not ours or something was left."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return False
    try:
        if not ours(os.fstat(fd)):
            return False
        for entry in os.listdir(fd):
            try:
                if entry_removable(fd, entry):
                    os.unlink(entry, dir_fd=fd)
            except OSError:
                pass
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dirfd)
    except OSError:
        return False
    return True


def hold(dirfd: int, name: str) -> int:
    """An O_PATH descriptor of NAME in a directory only jailer writes (see Made)."""
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)


def write_file(path: str, data: bytes, mode: int, *, keep_mode: bool = False, make_dirs: int | None = None) -> Made:
    """Write `path` atomically (a reader sees the old file or the whole new one), in its
    pinned directory (see write_in). keep_mode: an existing file's permission bits win over
    `mode`. Returns what was made (the caller closes or removes it)."""
    directory, name = split(path)
    dirfd = open_directory(directory, make_dirs=make_dirs)
    try:
        if keep_mode:
            try:
                mode = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode & 0o7777
            except FileNotFoundError:
                pass
        held = write_in(dirfd, name, data, mode)
    except BaseException:
        os.close(dirfd)
        raise
    return Made(dirfd, name, held)


def write_in(dirfd: int, name: str, data: bytes, mode: int) -> int:
    """Write NAME in the pinned directory atomically: a new file created O_EXCL under a fresh
    name, given exactly `mode`, then renamed over NAME; returns an O_PATH descriptor of it."""
    temporary = f".{name}.{os.getpid()}-{os.urandom(4).hex()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)
    try:
        os.fchmod(fd, mode)   # exactly `mode`, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        held = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
    finally:
        os.close(fd)
    try:
        os.rename(temporary, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except OSError:
        unlink_if_same(dirfd, temporary, held)
        os.close(held)
        raise
    return held
