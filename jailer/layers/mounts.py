"""Build the sandbox's file system: a fresh tmpfs as "/", holding only what the plan lists.

Runs in the child, inside its new mount (and pid) namespace, in this order:
  1. make every mount private (MS_REC|MS_PRIVATE on "/") so nothing propagates back;
  2. open every bind source as an O_PATH fd *before* the root changes, and later bind that
     very fd (through /proc/self/fd), so a path cannot be swapped between check and mount;
  3. mount a tmpfs of Plan.filesystem.root_size over /tmp and pivot_root into it, keeping
     the old root at /.oldroot only while the tree is built;
  4. mount binds, tmpfs, device binds, symlinks and /proc (parents before children);
     binds are MS_REC|MS_BIND, then nosuid+nodev (devices keep dev) and read-only unless
     writable, applied recursively with mount_setattr; tmpfs are nosuid,nodev,noexec;
     /proc is nosuid,nodev,noexec with /proc/sys and friends read-only;
  5. detach the old root (umount2 MNT_DETACH), chdir "/", and remount "/" read-only when
     readonly_root.
"""

from __future__ import annotations

import os
import stat

from jailer.layers import syscalls
from jailer.errors import LayerError

NEW_ROOT_MOUNTPOINT = "/tmp"
OLD_ROOT = "/.oldroot"
READ_ONLY_PROC_PATHS = ("sys", "sysrq-trigger", "irq", "bus")
_FIX = "check the paths in the profile's [filesystem] section (`jailer show` prints the resolved plan)"
_FIX_PROC = ("keep namespaces.pid = true (from a new user namespace, /proc can be mounted only for a pid namespace "
             "that namespace owns), or set filesystem.proc = false")


class _SocketDirectory:
    """The writable bind of a program's own socket directory: not in the plan, its host
    directory is made for each run (jailer.host.sockets)."""

    writable = True

    def __init__(self, source: str, target: str):
        self.source, self.target = source, target


def build_root(fs, uid: int, gid: int, sources: dict[str, int], socket_binds=()) -> dict:
    """Pivot into a new root built from `fs`, binding `sources` (see open_sources, whose fds
    this closes) and, writable, the (source, target) directories of the program's own
    sockets; returns what was mounted, for the status."""
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    try:
        _pivot_into_tmpfs(fs.root_size)
        binds = list(fs.binds) + [_SocketDirectory(source, target) for source, target in socket_binds]
        entries = [(b.target, "bind", b) for b in binds if b.source in sources]
        entries += [(t.target, "tmpfs", t) for t in fs.tmpfs]
        entries += [(d, "device", d) for d in fs.devices]
        entries += [(s.target, "symlink", s) for s in fs.symlinks]
        if fs.proc:
            entries.append(("/proc", "proc", None))
        entries.sort(key=lambda entry: entry[0].rstrip("/").count("/"))
        tree = _Tree()
        for target, kind, item in entries:
            _mount_entry(target, kind, item, sources, uid, gid, tree)
            tree.foreign.add(target.rstrip("/") or "/")
    finally:
        for fd in sources.values():
            os.close(fd)
    syscalls.umount2(OLD_ROOT, syscalls.MNT_DETACH)
    os.rmdir(OLD_ROOT)
    os.chdir("/")
    if fs.readonly_root:
        syscalls.mount_setattr("/", syscalls.MOUNT_ATTR_RDONLY, recursive=False)
    return {"binds": len([e for e in entries if e[1] == "bind"]), "tmpfs": len(fs.tmpfs),
            "devices": len(fs.devices), "readonly_root": fs.readonly_root, "proc": fs.proc}


def check_sources(fs) -> dict[str, tuple[int, int] | None]:
    """source path -> (st_dev, st_ino) of every bind and device source, None for an optional
    one that does not exist. Run by the launcher, with the invoker's own file-system ids and
    in the host's view of owners: the profile's author (root, or the user running jailer)
    decides what is bound, so a runtime under a 0700 directory such as /root is reachable,
    and a source under a directory another user controls is resolved by
    jailer.host.paths.walk, so that user cannot swap in a symlink to what they do not own
    (/etc/shadow, say) and have it bound."""
    from jailer.host import paths

    checked = {}
    directories = {}
    try:
        for path, optional in [(b.source, b.optional) for b in fs.binds] + [(d, False) for d in fs.devices]:
            if path in checked:
                continue
            try:
                _, st = paths.walk(path, cache=directories, want_fd=False)
                checked[path] = (st.st_dev, st.st_ino)
            except paths.Refused as exc:
                raise LayerError("pivot_root", f"bind source {exc}",
                                 "bind a path that only root or you can redirect") from None
            except FileNotFoundError:
                if not optional:
                    raise LayerError("pivot_root", f"bind source {path} does not exist",
                                     "create it, or mark the bind optional in the profile") from None
                checked[path] = None
            except OSError as exc:
                raise LayerError("pivot_root", f"cannot open bind source {path}: {exc.strerror}",
                                 "make the path reachable (search permission) by the sandbox's uid") from None
    finally:
        for fd, _ in directories.values():
            os.close(fd)
    return checked


def open_sources(checked: dict) -> dict[str, int]:
    """source path -> O_PATH fd, opened in the sandbox's new mount namespace (a bind takes
    its source from the caller's own namespace), of each source check_sources found, and
    only if it is still the inode it checked: a path swapped in between is refused."""
    sources = {}
    try:
        for path, identity in checked.items():
            if identity is None:
                continue
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError as exc:
                raise LayerError("pivot_root", f"cannot open bind source {path}: {exc.strerror}",
                                 "make the path reachable (search permission) by the sandbox's uid") from None
            sources[path] = fd
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != identity:
                raise LayerError("pivot_root", f"bind source {path} was replaced while jailer started",
                                 "bind a path that only root or you can change")
    except BaseException:
        for fd in sources.values():
            os.close(fd)
        raise
    return sources


def _pivot_into_tmpfs(size: int) -> None:
    syscalls.mount("tmpfs", NEW_ROOT_MOUNTPOINT, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV,
                   f"size={size},mode=755")
    os.chdir(NEW_ROOT_MOUNTPOINT)
    os.mkdir(OLD_ROOT.lstrip("/"), 0o700)
    syscalls.pivot_root(".", OLD_ROOT.lstrip("/"))
    os.chdir("/")


class _Tree:
    """What the build knows of the new root, so that it asks the kernel only what it cannot
    know (a Python runtime binds and links some sixty paths; every stat counts):

      foreign: targets whose content is not jailer's own (binds of host files and
               directories, symlinks, and the tmpfs, device and /proc mounts). Only a path
               through one of them can lead out of the new root or exist without jailer
               having made it, so only such a path pays for os.path.realpath and lstat.
      made:    the paths jailer created on the tmpfs (directories among them)."""

    def __init__(self):
        self.foreign = set()
        self.made = {"/"}

    def reaches(self, path: str) -> bool:
        path = path.rstrip("/") or "/"
        while True:
            if path in self.foreign:
                return True
            if path == "/":
                return False
            path = os.path.dirname(path)

    def exists(self, path: str) -> bool:
        path = path.rstrip("/") or "/"
        return path in self.made or (self.reaches(path) and os.path.lexists(path))


def _mount_entry(target, kind, item, sources, uid, gid, tree) -> None:
    try:
        if kind == "symlink":
            _make_parents(target, tree)
            os.symlink(item.points_to, target)
            tree.made.add(target.rstrip("/"))
        elif kind == "tmpfs":
            _make_mountpoint(target, True, tree)
            syscalls.mount("tmpfs", target, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC,
                           f"size={item.size},mode={item.mode:o},uid={uid},gid={gid}")
        elif kind == "proc":
            _mount_proc(tree)
        else:
            source = item.source if kind == "bind" else item
            _bind(sources[source], target, kind == "bind" and item.writable, kind == "device", tree)
    except OSError as exc:
        fix = _FIX_PROC if kind == "proc" else _FIX
        raise LayerError("pivot_root", f"{kind} {target}: {exc.strerror}", fix) from None


def _bind(source_fd: int, target: str, writable: bool, device: bool, tree) -> None:
    directory = stat.S_ISDIR(os.fstat(source_fd).st_mode)
    _make_mountpoint(target, directory, tree)
    syscalls.mount(f"{OLD_ROOT}/proc/self/fd/{source_fd}", target, None, syscalls.MS_BIND | syscalls.MS_REC)
    flags = syscalls.MOUNT_ATTR_NOSUID
    if device:
        flags |= syscalls.MOUNT_ATTR_NOEXEC
    else:
        flags |= syscalls.MOUNT_ATTR_NODEV
        if not writable:
            flags |= syscalls.MOUNT_ATTR_RDONLY
    syscalls.mount_setattr(target, flags, recursive=True)


def _mount_proc(tree) -> None:
    _make_mountpoint("/proc", True, tree)
    syscalls.mount("proc", "/proc", "proc", syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC)
    for name in READ_ONLY_PROC_PATHS:
        path = f"/proc/{name}"
        if os.path.lexists(path):
            syscalls.mount(path, path, None, syscalls.MS_BIND | syscalls.MS_REC)
            syscalls.mount_setattr(path, syscalls.MOUNT_ATTR_RDONLY | syscalls.MOUNT_ATTR_NOSUID
                                   | syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOEXEC, recursive=True)


def _make_parents(path: str, tree) -> None:
    if tree.reaches(path):
        _refuse_escape(path)
    parent = os.path.dirname(path.rstrip("/"))
    if parent and parent not in tree.made and not os.path.isdir(parent):
        os.makedirs(parent, 0o755, exist_ok=True)
    while parent and parent not in tree.made and not tree.reaches(parent):
        tree.made.add(parent)
        parent = os.path.dirname(parent)


def _refuse_escape(path: str) -> None:
    """A target must stay in the new root: a symlink in a writable bind's host directory must
    not lead the build (mkdir, mount) into the old root."""
    real = os.path.realpath(path)
    if real == OLD_ROOT or real.startswith(OLD_ROOT + "/"):
        raise LayerError("pivot_root", f"{path} leads out of the sandbox's root through a symlink",
                         "remove the symlink from the bound host directory, or bind somewhere else")


def _make_mountpoint(path: str, directory: bool, tree) -> None:
    _make_parents(path, tree)
    if tree.exists(path):
        if tree.reaches(path):
            _refuse_escape(path)
        return
    if directory:
        os.mkdir(path, 0o755)
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    tree.made.add(path.rstrip("/"))
