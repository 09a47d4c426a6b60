"""Entering new namespaces (in the child) and writing its uid/gid maps (in the parent).

The user namespace is created first and alone, so every other namespace is owned by it
and the child holds all capabilities inside it before any map exists; the maps are then
written from outside by the launcher, which is the only process allowed to write the
maps of an unprivileged user (setgroups is denied first, as the kernel requires).
jailer.lockdown enters them in a running process, which writes its own maps (its own ids only).
"""

from __future__ import annotations

import os

from jailer.layers import syscalls

# layer name -> (clone flag, NamespacesPlan attribute)
NAMESPACE_LAYERS = {
    "mount_namespace": (syscalls.CLONE_NEWNS, "mount"),
    "pid_namespace": (syscalls.CLONE_NEWPID, "pid"),
    "net_namespace": (syscalls.CLONE_NEWNET, "net"),
    "ipc_namespace": (syscalls.CLONE_NEWIPC, "ipc"),
    "uts_namespace": (syscalls.CLONE_NEWUTS, "uts"),
    "cgroup_namespace": (syscalls.CLONE_NEWCGROUP, "cgroup"),
}

_FIX_USERNS = ("check that user namespaces are enabled (sysctl user.max_user_namespaces > 0) and not "
               "restricted by AppArmor (sysctl kernel.apparmor_restrict_unprivileged_userns=0)")
FIX_OTHER = "run as root, or enable the user namespace in the profile so the other namespaces can be created"


def enter_user_namespace(namespaces, enforcement) -> bool:
    """unshare(CLONE_NEWUSER) when the plan asks; True when the child is now in a new one."""
    if not namespaces.user:
        return False
    enforcement.attempt("user_namespace", lambda: syscalls.unshare(syscalls.CLONE_NEWUSER), _FIX_USERNS)
    return "user_namespace" in enforcement.applied


def enter_namespaces(namespaces, enforcement, exclude=()) -> set[str]:
    """Unshare every other requested namespace (but those in `exclude`) at once, or one by one
    to find which fails; returns every namespace layer the process is in (those it was cloned
    into or entered included)."""
    wanted = {layer: flag for layer, (flag, attr) in NAMESPACE_LAYERS.items()
              if getattr(namespaces, attr) and layer not in enforcement.applied and layer not in exclude}
    if not wanted:
        return {layer for layer in NAMESPACE_LAYERS if layer in enforcement.applied}
    combined = 0
    for flag in wanted.values():
        combined |= flag
    try:
        syscalls.unshare(combined)
    except OSError:
        for layer, flag in wanted.items():
            enforcement.attempt(layer, lambda flag=flag: syscalls.unshare(flag), FIX_OTHER)
    else:
        for layer in wanted:
            enforcement.applied[layer] = True
    entered = {layer for layer in NAMESPACE_LAYERS if layer in enforcement.applied}
    if "uts_namespace" in wanted and "uts_namespace" in entered:
        def set_hostname():
            syscalls.sethostname(namespaces.hostname)
            return {"hostname": namespaces.hostname}

        enforcement.attempt("uts_namespace", set_hostname)
    return entered


def write_id_maps(pid: int, identity) -> None:
    """Write /proc/PID/{setgroups,uid_map,gid_map} from the plan's maps (run by the parent)."""
    try:
        for name, text in (("setgroups", "deny"),
                           *((name, "".join(f"{m.inside} {m.outside} {m.count}\n" for m in entries))
                             for name, entries in (("uid_map", identity.uid_map), ("gid_map", identity.gid_map)))):
            fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())   # one write each, as the kernel requires
            finally:
                os.close(fd)
    except OSError as exc:
        from jailer.errors import LayerError

        raise LayerError("user_namespace", f"writing the id maps of pid {pid}: {exc.strerror}",
                         "an unprivileged caller may map only its own uid and gid (one entry each); "
                         "check identity.uid_map/gid_map in the plan (`jailer show`)") from None


def take_host_ids(uid: int, gid: int) -> None:
    """As root, before a running process unshares its user namespace: take the host ids it
    will map, the only ones a process may map for itself. Changing the euid made the process
    undumpable and its /proc files root's, so fsuid stays 0 (the saved uid allows it) until
    map_own_ids has written the maps."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, 0)
    syscalls.setfsuid(0)


def map_own_ids(identity) -> dict:
    """In the process's new user namespace: write its maps itself, then settle every uid on
    the identity's (which ends take_host_ids's saved uid and fsuid 0)."""
    write_id_maps(os.getpid(), identity)
    os.setresuid(identity.uid, identity.uid, identity.uid)
    return {"uid": identity.uid, "gid": identity.gid,
            "host_uid": outside_id(identity.uid, identity.uid_map), "host_gid": outside_id(identity.gid, identity.gid_map)}


def outside_id(inside: int, id_map) -> int:
    """The host id an id inside the user namespace stands for (itself without a map)."""
    for entry in id_map:
        if entry.inside <= inside < entry.inside + entry.count:
            return entry.outside + inside - entry.inside
    return inside


def start_child(namespaces_plan) -> tuple[int, int]:
    """(pid, clone flags it was created with) of the sandbox's first process. With a pid
    namespace the child is cloned straight into it (and into the user namespace, which must
    own it) as its pid 1, which saves the fork a child that unshared would need; when that
    clone is refused, a plain fork takes the unshare path, which tells exactly which layer
    failed (or skips it)."""
    if not namespaces_plan.pid or len(os.listdir("/proc/self/task")) > 1:
        # a raw clone skips glibc's fork handlers (its malloc locks), which another
        # thread of a process embedding the launcher might hold: fork there
        return os.fork(), 0
    flags = syscalls.CLONE_NEWPID | (syscalls.CLONE_NEWUSER if namespaces_plan.user else 0)
    groups = None
    if namespaces_plan.user and os.geteuid() == 0:
        groups = os.getgroups()   # root's supplementary groups cannot be dropped inside the new userns
        os.setgroups([])
    try:
        pid = syscalls.clone_process(flags)
    except OSError:
        pid, flags = os.fork(), 0
    if pid != 0 and groups is not None:
        os.setgroups(groups)
    return pid, flags
