"""Landlock: file access limited to the plan's paths, with the rights the plan gives them.

The ruleset handles every file-system right the running kernel's ABI knows, so anything
a later kernel adds is not silently left open. After pivot_root the rules name the paths
inside the new root ("/" readable, or writable when readonly_root is off; binds read-only
or writable; tmpfs writable; device nodes read/write/ioctl). Without a mount namespace
the rules name the bind sources on the host instead, which makes Landlock the only thing
keeping the program to the plan's paths (jailer.lockdown's case too: it opens them before
the process changes ids, and enforces them later). With ABI >= 4 and network mode "none",
TCP bind and connect are denied; with ABI >= 6, abstract unix sockets and signals are
scoped to the sandbox.
"""

from __future__ import annotations

import os
import stat

from jailer.layers import syscalls

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_FILE, MAKE_SOCK = 1 << 5, 1 << 9
MAKE_CHAR, MAKE_BLOCK = 1 << 6, 1 << 11
TRUNCATE, IOCTL_DEV = 1 << 14, 1 << 15
FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
NET_TCP = (1 << 0) | (1 << 1)
SCOPE_ALL = (1 << 0) | (1 << 1)

READ = EXECUTE | READ_FILE | READ_DIR
DEVICE = READ_FILE | WRITE_FILE | IOCTL_DEV
FIX = ("boot with Landlock enabled (CONFIG_SECURITY_LANDLOCK=y and 'landlock' in the lsm= list), "
       "or list landlock in the profile's enforcement.best_effort")


def handled_fs_rights(abi: int) -> int:
    """All file-system rights of this ABI: 13 in ABI 1, REFER in 2, TRUNCATE in 3, IOCTL_DEV in 5."""
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= 1 << 13
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def path_rules(plan, pivoted: bool) -> list[tuple[str, int, bool]]:
    """(path, rights, optional) for every path the program may reach; writable = all but mknod."""
    fs = plan.filesystem
    writable = ~(MAKE_CHAR | MAKE_BLOCK)
    rules = []
    if pivoted:
        rules.append(("/", READ if fs.readonly_root else writable, False))
        rules += [(b.target, writable if b.writable else READ, True) for b in fs.binds]
        rules += [(t.target, writable, False) for t in fs.tmpfs]
        # a program's own socket directory: it may make its socket there and remove it, nothing else
        rules += [(os.path.dirname(s.path), MAKE_SOCK | REMOVE_FILE, False) for s in plan.sockets]
    else:
        rules += [(b.source, writable if b.writable else READ, b.optional) for b in fs.binds]
    rules += [(d, DEVICE, False) for d in fs.devices]
    return rules


def restrict(plan, pivoted: bool) -> dict:
    """Create, fill and enforce the ruleset on this process (inherited by its children)."""
    return enforce(plan, open_paths(plan, pivoted))


def open_paths(plan, pivoted: bool) -> list[tuple[int, int]]:
    """(O_PATH fd, rights) for every rule's path that exists (only an optional one may not),
    opened with this process's current rights; enforce() closes them."""
    opened = []
    try:
        for path, rights, optional in path_rules(plan, pivoted):
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                if optional:
                    continue
                raise
            opened.append((fd, rights))
    except OSError:
        _close(opened)
        raise
    return opened


def enforce(plan, opened) -> dict:
    """Enforce a ruleset of the opened paths on this process; closes them."""
    try:
        abi = syscalls.landlock_abi()
        handled = handled_fs_rights(abi)
        handled_net = NET_TCP if abi >= 4 and plan.network.mode == "none" else 0
        scoped = SCOPE_ALL if abi >= 6 else 0
        ruleset = syscalls.landlock_create_ruleset(handled, handled_net, scoped)
        try:
            for fd, rights in opened:
                allowed = rights & handled
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    allowed &= FILE_ONLY
                syscalls.landlock_add_path_rule(ruleset, allowed, fd)
            syscalls.landlock_restrict_self(ruleset)
        finally:
            os.close(ruleset)
    finally:
        _close(opened)
    return {"abi": abi, "rules": len(opened), "tcp": "denied" if handled_net else "not handled",
            "scoped": "signals, abstract unix sockets" if scoped else "no"}


def _close(opened):
    for fd, _ in opened:
        os.close(fd)
