"""What a launcher killed with SIGKILL (or the OOM killer) leaves behind, found and removed
by the next launcher that works in the same place.

Two kinds of leftovers carry their launcher's pid in their name, so they can be told
apart from what a running launcher still uses, and are swept where jailer makes new ones:

- the sandbox's cgroup directories, `<parent>/<name>.<pid>` in each hierarchy (swept
  before a new one is made beside them). rmdir(2) itself refuses a cgroup that holds a
  process, so nothing in use can go; the pid only spares one a live launcher has made
  and not joined yet;
- the private directories sockets are bound in, `.jailer-<pid>-<random>`, in the directory
  of a socket path (swept before a new socket is made in that directory): removed only
  when they belong to this user with mode 0700, as jailer makes them, with the sockets
  inside; the entry is opened without following links, and only what is in that very
  directory is unlinked.

What a launcher makes at the caller's paths (sockets, the pid file) and its cgroups are
also written down, in a record of this user's (record_directory(): one file per launcher,
named by its pid, holding its start time and boot id, and for each entry its path, device,
inode and ctime), so that a socket at a path no later run uses is found too: the next
`jailer run` of this user, or `jailer clean`, goes through the records of launchers that
no longer run and removes each entry that is still the very file recorded (the same
device, inode and ctime: a file someone made there since is left alone), reached through
jailer.host.paths' race-safe walk, then the record. A socket file a killed launcher had
moved into place is also replaced by the next run that listens at the same path
(jailer.layers.fds.create_listener). Each removal is said in one line.
"""

from __future__ import annotations

import os
import stat

from jailer.status import warn

RECORDS_AS_ROOT = "/var/lib/jailer/launchers"   # (a systemd unit gets it as StateDirectory=jailer/launchers)


def started(pid: int) -> str | None:
    """The pid's start time and this boot's id: what tells a launcher from a later one with its
    pid; None once it is gone (a zombie included: what it made is no longer in use)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X"):
            return None
        start_time = fields[19].decode()
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{start_time}@{f.read().strip()}"
    except (OSError, IndexError):
        return None


def launcher_gone(pid_text: str) -> bool:
    """Whether the launcher whose pid is in a name is gone (not: unknown or alive)."""
    if not pid_text.isdigit() or int(pid_text) in (0, os.getpid()):
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False            # alive, as another user
    return False


def sweep_cgroups(parent: str) -> list[str]:
    """rmdir the `<name>.<pid>` cgroups in `parent` whose launcher is gone."""
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        _, dot, pid = entry.rpartition(".")
        if not dot or not launcher_gone(pid):
            continue
        directory = os.path.join(parent, entry)
        try:
            os.rmdir(directory)
        except OSError:
            continue            # still holds a process (or is not a cgroup of ours): left alone
        removed.append(directory)
        warn(f"removed the cgroup {directory} that a killed launcher (pid {pid}) left behind")
    return removed


def sweep_private_directories(dirfd: int, directory: str) -> list[str]:
    """Remove the `.jailer-<pid>-*` directories in `dirfd` whose launcher is gone."""
    from jailer.host import paths

    removed = []
    try:
        entries = paths.list_directory(dirfd)
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith(".jailer-"):
            continue
        pid = entry[len(".jailer-"):].partition("-")[0]
        if launcher_gone(pid) and _remove_private(dirfd, entry):
            path = os.path.join(directory, entry)
            removed.append(path)
            warn(f"removed {path}, which a killed launcher (pid {pid}) left behind")
    return removed


def _remove_private(dirfd: int, name: str) -> bool:
    from jailer.host import paths

    return paths.remove_directory_if(
        dirfd, name, lambda st: st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700,
        lambda fd, entry: stat.S_ISSOCK(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode))


def record_directory() -> str | None:
    """Where this user's launchers record what they make: root's in /var/lib/jailer, another
    user's in their XDG state directory (none without $XDG_STATE_HOME or $HOME)."""
    if os.geteuid() == 0:
        return RECORDS_AS_ROOT
    state = os.environ.get("XDG_STATE_HOME") or (os.path.join(os.environ["HOME"], ".local", "state")
                                                 if os.environ.get("HOME") else None)
    return os.path.join(state, "jailer", "launchers") if state and os.path.isabs(state) else None


def record(made: list, cgroup_directories) -> "object | None":
    """Record what this launcher made (paths.Made entries at the caller's paths, cgroup
    directories) for the clean-up after a kill, having first cleaned up after the killed
    launchers recorded there; returns the record's paths.Made, or None when this user has no
    record directory or it cannot be written (said once, with why)."""
    from jailer.errors import UsageError
    from jailer.host import paths

    directory = record_directory()
    if directory is None:
        return None
    dirfd = None
    try:
        dirfd = paths.open_directory(directory, make_dirs=0o700)
        for line in sweep_records(dirfd, directory):
            warn(line)
        me = os.getpid()
        lines = [f"launcher {me} {started(me)}"]
        for entry in made:
            st = os.fstat(entry.fd)
            path = os.path.join(os.readlink(f"/proc/self/fd/{entry.dirfd}"), entry.name)
            if "\n" not in path:
                lines.append(f"made {st.st_dev} {st.st_ino} {st.st_ctime_ns} {path}")
        lines += [f"cgroup {path}" for path in cgroup_directories if "\n" not in path]
        held = paths.write_in(dirfd, str(me), "".join(line + "\n" for line in lines).encode(), 0o600)
    except (OSError, UsageError) as exc:
        if dirfd is not None:
            os.close(dirfd)
        warn(f"cannot record what this run makes in {directory} ({getattr(exc, 'strerror', None) or exc}): "
             "after a kill, `jailer clean` will not find its sockets")
        return None
    return paths.Made(dirfd, str(me), held)


def sweep_records(dirfd: int, directory: str, dry_run: bool = False) -> list[str]:
    """Remove what the launchers recorded in `dirfd` left behind, for those that no longer
    run, and their records once nothing of theirs is left; returns one line per removal
    (with dry_run: per removal it would make, removing nothing)."""
    from jailer.host import paths

    said = []
    try:
        entries = paths.list_directory(dirfd)
    except OSError:
        return said
    for name in entries:
        if not name.isdigit():
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        except OSError:
            continue
        try:
            lines = os.read(fd, 1 << 20).decode(errors="replace").splitlines()
            head = lines[0].split(" ") if lines else []
            if len(head) != 3 or head[0] != "launcher" or started(int(head[1])) == head[2]:
                continue        # not a record, or its launcher still runs
            left = False
            for line in lines[1:]:
                removed, kept = _remove_recorded(line, dry_run)
                said += [f"{'would remove' if dry_run else 'removed'} {path}, which a killed launcher "
                         f"(pid {head[1]}) left behind" for path in removed]
                left = left or kept
            if not left and not dry_run:
                paths.unlink_if_same(dirfd, name, fd)
        finally:
            os.close(fd)
    return said


def _remove_recorded(line: str, dry_run: bool) -> tuple[list[str], bool]:
    """(the paths removed for one line of a record, whether something of it must stay)."""
    kind, _, rest = line.partition(" ")
    if kind == "cgroup":
        if not os.path.isdir(rest):
            return [], False
        if dry_run:
            return [rest], False
        try:
            os.rmdir(rest)
        except OSError:
            return [], True     # still holds a process (its last ones are exiting): kept for later
        return [rest], False
    fields = rest.split(" ", 3)
    if kind != "made" or len(fields) != 4 or not all(f.isdigit() for f in fields[:3]):
        return [], False
    from jailer.errors import UsageError
    from jailer.host import paths

    path = fields[3]
    directory, name = os.path.split(path)
    try:
        dirfd = paths.open_directory(directory)
    except (OSError, UsageError):
        return [], False        # gone, or no longer reached safely: nothing of ours to remove there
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if not (stat.S_ISSOCK(st.st_mode) or stat.S_ISREG(st.st_mode)) \
                or [str(st.st_dev), str(st.st_ino), str(st.st_ctime_ns)] != fields[:3]:
            return [], False    # made there since by someone else: theirs
        if not dry_run:
            os.unlink(name, dir_fd=dirfd)
        return [path], False
    except OSError:
        return [], False
    finally:
        os.close(dirfd)
