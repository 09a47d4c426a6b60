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

A socket file a killed launcher had moved into place is replaced by the next run that
listens at the same path (jailer.fds.create_listener). Each removal is said in one line.
"""

from __future__ import annotations

import os
import stat

from jailer.status import warn


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
    removed = []
    try:   # (dirfd may be an O_PATH descriptor, which cannot be listed)
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            entries = os.listdir(listing)
        finally:
            os.close(listing)
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
