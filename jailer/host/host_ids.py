"""One host uid/gid per running sandbox (as root), as systemd's DynamicUser and Firecracker's
jailer give each service or microVM its own identity.

Namespaces keep sandboxes apart; distinct host ids are the fence behind them: a program that
escaped its namespaces still cannot signal, ptrace or read the /proc entries of another
sandbox's processes, nor connect to sockets jailer made for another sandbox (they belong to
that sandbox's uid, mode 0600, or 0660 for --socket-group).

The ids come from the profile's identity.host_id_range (default 0x6A000000, 65536 ids:
above every range useradd and subuid hand out by default), skipping ids that have a passwd
or group entry or fall in /etc/subuid or /etc/subgid. The same number is used for the uid
and the gid. An id is taken by a record file, /var/lib/jailer/host-ids/ID, created under a
lock and holding the launcher's pid, start time and boot id; it is free again once the file is gone
(removed when the sandbox ends, by the launcher or jailer-monitor, as every file jailer
makes) or names a launcher that no longer runs (one killed with SIGKILL: its sandbox died
with it). A restarted launcher (the same pid, exec'd again) finds its own record and keeps
its id. "per-device" takes the lowest free id; "stable" starts from a hash of the profile's
name, so one device comes back with the same id while nothing else took it.
"""

from __future__ import annotations

import fcntl
import os
import zlib

from jailer.errors import JailerError
from jailer.host.leftovers import started

STATE_DIRECTORY = "/var/lib/jailer/host-ids"   # (a systemd unit gets it as StateDirectory=jailer/host-ids)


def _owned_ranges(path: str) -> list[tuple[int, int]]:
    ranges = []
    try:
        with open(path) as f:
            for line in f:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                    ranges.append((int(fields[1]), int(fields[2])))
    except OSError:
        pass
    return ranges


def _someone_owns(number: int, owned: list) -> bool:
    import grp
    import pwd

    if any(start <= number < start + count for start, count in owned):
        return True
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(number)
            return True
        except KeyError:
            pass
    return False


def _holder(dirfd: int, number: int) -> tuple[int, str, str] | None:
    """(pid, start time, name) of the launcher whose record takes `number`, if it still runs."""
    try:
        fd = os.open(str(number), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:                 # gone, or not a record of ours: holds nothing
        return None
    try:
        fields = os.read(fd, 4096).decode(errors="replace").split(" ", 2)
    finally:
        os.close(fd)
    if len(fields) == 3 and fields[0].isdigit() and started(int(fields[0])) == fields[1]:
        return int(fields[0]), fields[1], fields[2].strip()
    return None


def _records(dirfd: int) -> tuple[dict[str, tuple], list[str]]:
    """({record: its running launcher (_holder)}, the records of a killed launcher: their ids are free)."""
    from jailer.host import paths

    live, dead = {}, []
    for entry in paths.list_directory(dirfd):
        if entry.isdigit():
            holder = _holder(dirfd, int(entry))
            if holder is not None:
                live[entry] = holder
            else:
                dead.append(entry)
    return live, dead


def _remove(dirfd: int, entries) -> None:
    for entry in entries:
        try:
            os.unlink(entry, dir_fd=dirfd)
        except OSError:
            pass


def release_dead(dry_run: bool = False) -> list[str]:
    """Free the host ids that killed launchers still hold in their records (one line each,
    said; with dry_run only said). allocate() frees them too, when it needs an id."""
    from jailer.host import paths

    try:
        dirfd = paths.open_directory(STATE_DIRECTORY)
    except OSError:
        return []
    try:
        lock = os.open(".lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        os.close(dirfd)
        return []
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        dead = _records(dirfd)[1]
        if not dry_run:
            _remove(dirfd, dead)
        verb = "would free" if dry_run else "freed"
        return [f"{verb} host id {entry} ({STATE_DIRECTORY}/{entry}), which a killed launcher held" for entry in dead]
    finally:
        os.close(lock)
        os.close(dirfd)


def allocate(mode: str, id_range, name: str):
    """(host id, paths.Made of its record or None when this launcher already holds it)."""
    from jailer.host import paths

    start, count = id_range
    try:
        dirfd = paths.open_directory(STATE_DIRECTORY, make_dirs=0o700)
    except OSError as exc:
        raise JailerError(f"cannot keep track of per-sandbox host ids in {STATE_DIRECTORY}: {exc.strerror} (a "
                          "systemd unit with ProtectSystem=strict needs StateDirectory=jailer/host-ids, which "
                          "`jailer systemd` writes; or set identity.host_ids = \"shared\")") from None
    keep_dirfd = False
    try:
        lock = os.open(".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            me, my_start = os.getpid(), started(os.getpid())
            live, dead = _records(dirfd)
            _remove(dirfd, dead)                      # their launchers were killed: the ids are free again
            taken = set()
            for entry, holder in live.items():
                if holder[:2] == (me, my_start):
                    return int(entry), None           # restarted: the id this launcher holds
                taken.add(int(entry))
            first = zlib.crc32(name.encode()) % count if mode == "stable" else 0
            owned = _owned_ranges("/etc/subuid") + _owned_ranges("/etc/subgid")
            free = None
            for step in range(count):
                number = start + (first + step) % count
                if number not in taken and not _someone_owns(number, owned):
                    free = number
                    break
            if free is None:
                raise JailerError(f"no free host id in identity.host_id_range [{start}, {start + count}): "
                                  f"{count} sandboxes run already, or the ids belong to users")
            held = paths.write_in(dirfd, str(free), f"{me} {my_start} {name}\n".encode(), 0o644)
            keep_dirfd = True
            return free, paths.Made(dirfd, str(free), held)
        finally:
            os.close(lock)
    finally:
        if not keep_dirfd:
            os.close(dirfd)
