"""Become the plan's uid/gid with no capabilities in any of the five sets.

Order matters: the bounding set, the ambient set and the securebits need CAP_SETPCAP, so
they go first; securebits then forbid the kernel from ever granting capabilities back to
uid 0 (NOROOT) or on uid changes (NO_SETUIDFIXUP), all locked; then the ids change; then
effective/permitted/inheritable are emptied with capset (always allowed, since it only
drops); then no_new_privs. Everything is read back and checked, because a silently kept
capability is exactly what the sandbox promises not to leave.
"""

from __future__ import annotations

import os

from jailer.layers import syscalls
from jailer.errors import LayerError

SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUIDFIXUP = 1 << 2
SECBIT_NO_SETUIDFIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7
LOCKED_SECUREBITS = (SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUIDFIXUP | SECBIT_NO_SETUIDFIXUP_LOCKED
                     | SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)

FIX = "jailer must start with CAP_SETPCAP, CAP_SETUID and CAP_SETGID (as root, or inside its user namespace)"

# capability numbers (linux/capability.h) that decide what a process may still do to itself
CAP_SETGID, CAP_SETUID, CAP_SETPCAP, CAP_SYS_ADMIN, CAP_SYS_RESOURCE = 6, 7, 8, 21, 24


def holds(capability: int) -> bool:
    """Whether this thread has `capability` in its effective set (in its own user namespace)."""
    return bool(syscalls.capget()[0] & (1 << capability))


def last_capability() -> int:
    fd = os.open("/proc/sys/kernel/cap_last_cap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return int(os.read(fd, 32))
    finally:
        os.close(fd)


def drop_bounding_set(last_cap: int) -> dict:
    for cap in range(last_cap + 1):
        syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)   # dropping a dropped one is no error
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    return {"bounding": "empty", "ambient": "empty"}


def lock_securebits() -> dict:
    syscalls.prctl(syscalls.PR_SET_SECUREBITS, LOCKED_SECUREBITS)
    return {"securebits": hex(syscalls.prctl(syscalls.PR_GET_SECUREBITS))}


def become(uid: int, gid: int, drop_groups: bool) -> dict:
    """setgroups([]) when allowed, then setresgid/setresuid; verify every id took."""
    if drop_groups:
        os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise LayerError("capabilities", f"ids are {os.getresuid()}/{os.getresgid()} after switching to "
                         f"{uid}/{gid}", FIX)
    return {"uid": uid, "gid": gid}


def clear_capabilities(last_cap: int) -> dict:
    syscalls.capset_clear()
    effective, permitted, inheritable = syscalls.capget()
    kept_bounding = [cap for cap in range(last_cap + 1) if syscalls.prctl(syscalls.PR_CAPBSET_READ, cap) == 1]
    kept_ambient = [cap for cap in range(last_cap + 1)
                    if syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_IS_SET, cap) == 1]
    if effective or permitted or inheritable or kept_bounding or kept_ambient:
        raise LayerError("capabilities", f"capabilities remain (effective {effective:#x}, permitted {permitted:#x}, "
                         f"inheritable {inheritable:#x}, bounding {kept_bounding}, ambient {kept_ambient})", FIX)
    return {"effective": 0, "permitted": 0, "inheritable": 0, "bounding": 0, "ambient": 0}


def set_no_new_privs() -> bool:
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    if syscalls.prctl(syscalls.PR_GET_NO_NEW_PRIVS) != 1:
        raise LayerError("no_new_privs", "the flag did not stick", "use a kernel >= 3.5")
    return True
