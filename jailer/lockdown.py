"""In-process lockdown: a running device applies its profile's sandbox to itself.

vfio-user's designers list in-process sandboxing beside launchers: a device opens what it
needs, then locks itself down, as OpenBSD's pledge and unveil or Capsicum do. This module
takes the same profile as `jailer run` (resolved by jailer.profile.build_plan for the
calling process's ids, as `jailer run` and `jailer show` do) and applies to the CALLING
process the layers a running process can take on, through the modules the launcher uses.

    from jailer import lockdown

    prepared = lockdown.prepare("profiles/gpio-pci-idio-16.toml", stage="steady",
                                skip={"pid_namespace", "pivot_root", "fds", "program", "readiness", "host_ids"})
    ...                               # open sockets and files, import every module still needed
    report = prepared.apply()         # {"applied": {layer: detail}, "skipped": {layer: why}}

prepare(profile, *, stage="steady", skip=()) -> Lockdown
    profile   a profile path, or a jailer.plan.Plan built from one.
    stage     the seccomp stage to lock down for, the caller's choice since no launcher
              watches for readiness: "setup" applies the profile's rules; "steady" its rules
              and its steady rules, with their own actions (jailer.layers.seccomp.compile_stage_filters):
              nothing is routed to a listener (no SECCOMP_RET_USER_NOTIF), so a refused
              syscall is not named; the kernel's action stands (kill: SIGSYS).
    skip      layer names to leave out knowingly: any of jailer.plan.LAYERS (ORDER lists
              those a running process can take on) or of LAUNCHER_ONLY.
    Changes nothing. Checks everything that can be known beforehand and raises LayerError
    (exit_code 3) naming the first layer it cannot apply, else UsageError (an unknown
    stage or layer name); compiles the filters; reads what /proc will not show later.
Lockdown.apply() -> dict
    Applies the layers in the order below and returns the report: "applied" maps each layer
    to what was done (as the launcher's "enforced" status event), "skipped" each layer left
    out to why. A failure the checks could not foresee (the kernel refused) raises
    LayerError naming the layer and what was already applied: the process is then partly
    locked down and should exit. Once only.
lockdown(profile, *, stage="steady", skip=()) -> dict
    prepare(...).apply() at once.

The order, each layer when the plan asks for it and the caller does not skip it:
  1. user namespace (unshare): the process's own uid/gid mapped to the identity's, maps
     written by the process itself, which the kernel allows for its own ids only: as root
     the process first takes the identity's host ids (setgroups/setresgid/setresuid). Its
     capabilities then count only in that namespace (and go in step 6);
  2. mount, net, ipc, uts, cgroup namespaces, in one unshare (jailer.layers.namespaces), what
     each means for a running process:
       mount   a private copy of the mount table; nothing is hidden (no pivot_root), host
               mounts still propagate in, and with its capabilities gone it makes none,
       net     a fresh network stack: only lo (up with network mode "loopback"), no route
               to the host's; sockets already open (a listening vfio-user socket, its
               clients) keep working; unix sockets by path still connect (Landlock does
               not cover that: seccomp must refuse socket or connect), abstract unix
               socket names are the namespace's own,
       ipc     System V IPC and POSIX message queues of its own,
       uts     the profile's hostname,
       cgroup  its cgroup is the root of what /proc/self/cgroup shows; it stays in it;
  3. no_new_privs, first of the rest: it lets a process without capabilities install
     Landlock and seccomp;
  4. Landlock (jailer.layers.landlock) with no pivot_root: the rules name the plan's binds at
     their HOST paths (source, read-only or writable as the profile gives them) and its
     device nodes, opened at the start of apply() with the caller's rights; nothing else
     of the host tree can be opened, listed, written or executed (stat still works);
  5. rlimits (jailer.layers.limits);
  6. capabilities: bounding and ambient sets emptied, securebits locked (the securebits
     layer), setresgid/setresuid to the identity, all sets emptied and checked
     (jailer.layers.capabilities);
  7. seccomp, last: the stage's filters (nothing runs between it and the return).
A layer the profile lists in enforcement.best_effort is skipped (and reported) when the
kernel refuses it, as under `jailer run`.

What only `jailer run` gives (LAUNCHER_ONLY) is refused when the plan asks for it, before
anything is applied, unless the caller skips it or the profile lists it as best effort:
a process cannot enter a pid namespace itself, build and pivot into a minimal root, join
a cgroup the launcher made, have a veth pair made for it, take a per-device host id the
launcher allocates and releases, get its fds created and every other fd closed, run the
profile's program with its argv, cwd and environment, or have its readiness watched and
its restarts made. Skipping them is knowingly accepting what docs/lockdown.md lists: the
host tree stays visible (Landlock limits access), host pids stay visible, memory the
process holds and fds it has open stay.

Threads: every layer but rlimits applies to the calling thread only (the kernel refuses
the user and mount namespaces outright), so a process with more than one thread (counted
in /proc/self/task) is refused, unless only rlimits remain.
"""

from __future__ import annotations

import dataclasses
import os
import resource

from jailer import status
from jailer.layers import capabilities, landlock, limits, namespaces, network, seccomp, syscalls
from jailer.errors import LayerError, UsageError
from jailer.plan import LAYERS

# What only the launcher can give, and why a running process cannot have it.
LAUNCHER_ONLY = {
    "pid_namespace": "a running process cannot enter a new pid namespace (unshare puts only its children there), "
                     "so host pids stay visible",
    "pivot_root": "the minimal root (binds, tmpfs, symlinks, /proc) needs a process that has not started yet; "
                  "in-process the host tree stays and only Landlock keeps the process to the binds' host paths",
    "cgroup": "cgroup limits are set by the launcher on a cgroup it creates and removes",
    "network": "a veth pair is made by the launcher from outside the net namespace",
    "host_ids": "a per-device or stable host id is allocated and released by the launcher; in-process the "
                "identity maps' outside ids are used",
    "fds": "the fd manifest: the launcher creates and numbers the program's fds and closes every other; "
           "in-process every open fd stays open",
    "program": "the program, its argv, cwd and environment are what the launcher execs; in-process the caller "
               "runs with its own",
    "readiness": "readiness and restarts are watched and made by the launcher; in-process the caller chooses "
                 "the seccomp stage",
}

# The layers a running process can take on, in the order they are applied.
ORDER = ("user_namespace", "mount_namespace", "net_namespace", "ipc_namespace", "uts_namespace", "cgroup_namespace",
         "network", "no_new_privs", "landlock", "rlimits", "capabilities", "securebits", "seccomp")
_PROCESS_WIDE = ("rlimits",)   # every other layer binds the calling thread only
_THREADS_FIX = "lock down before starting any thread (or a library that starts one), or skip every layer but rlimits"


def prepare(profile, *, stage: str = "steady", skip=()) -> "Lockdown":
    """Resolve, check and compile; changes nothing (see the module docstring)."""
    if stage not in seccomp.STAGES:
        raise UsageError(f"lockdown: unknown stage '{stage}', expected one of {', '.join(seccomp.STAGES)}")
    skip = frozenset(skip)
    for name in sorted(skip):
        if name not in LAYERS and name not in LAUNCHER_ONLY:
            from jailer.profile import did_you_mean

            raise UsageError(f"lockdown: unknown layer '{name}' in skip{did_you_mean(name, (*LAYERS, *LAUNCHER_ONLY))}")
    if isinstance(profile, (str, os.PathLike)):
        from jailer.profile import build_plan

        profile = build_plan(os.fspath(profile))
    return Lockdown(profile, stage, skip)


def lockdown(profile, *, stage: str = "steady", skip=()) -> dict:
    """Lock the calling process down now; returns the report."""
    return prepare(profile, stage=stage, skip=skip).apply()


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


class Lockdown:
    """A plan checked against this process, ready to apply (once)."""

    def __init__(self, plan, stage: str, skip: frozenset):
        self.plan = plan
        self.stage = stage
        self.skipped = {}
        self._refuse_launcher_only(skip)
        self.layers = [layer for layer in ORDER if self._asks_for(layer) and layer not in skip]
        self.skipped.update((layer, "skipped by the caller") for layer in ORDER
                            if self._asks_for(layer) and layer in skip)
        self._check_threads()
        identity = plan.identity
        self.host_ids = (namespaces.outside_id(identity.uid, identity.uid_map),
                         namespaces.outside_id(identity.gid, identity.gid_map))
        self.last_cap = capabilities.last_capability()
        self._check_privileges()
        self.filters = seccomp.compile_stage_filters(plan.seccomp, stage) if "seccomp" in self.layers else ()
        self.used = False

    def _asks_for(self, layer: str) -> bool:
        plan = self.plan
        if layer.endswith("_namespace"):
            return getattr(plan.namespaces, layer.removesuffix("_namespace"))
        if layer == "network":
            return plan.namespaces.net and plan.network.mode != "veth"
        if layer == "landlock":
            return plan.landlock.enabled
        if layer == "rlimits":
            return bool(plan.limits.rlimits)
        if layer == "seccomp":
            return plan.seccomp.enabled
        return True   # no_new_privs, capabilities, securebits: always, as under `jailer run`

    def _launcher_only_asked(self) -> list[str]:
        plan = self.plan
        cgroup = plan.limits.cgroup
        asked = {
            "pid_namespace": plan.namespaces.pid,
            "pivot_root": plan.namespaces.mount,
            "cgroup": cgroup is not None and any(value is not None for value in
                                                 (cgroup.memory_max, cgroup.pids_max, cgroup.cpu_quota_us)),
            "network": plan.network.mode == "veth",
            "host_ids": os.geteuid() == 0 and plan.identity.host_ids != "shared",
            "fds": bool(plan.fds or plan.sockets),
            "program": True,
            "readiness": plan.program.ready != "exec" or plan.restart.policy != "no",
        }
        return [name for name in LAUNCHER_ONLY if asked[name]]

    def _refuse_launcher_only(self, skip):
        refused = []
        for name in self._launcher_only_asked():
            if name in skip:
                self.skipped[name] = f"skipped by the caller: {LAUNCHER_ONLY[name]}"
            elif name in self.plan.best_effort:
                self.skipped[name] = f"best effort in the profile: {LAUNCHER_ONLY[name]}"
            else:
                refused.append(name)
        if refused:
            accepted = ", ".join(f"'{name}'" for name in refused)
            raise LayerError(refused[0], LAUNCHER_ONLY[refused[0]] + " (nothing was applied)",
                             f"use `jailer run`, or lock down without it knowingly: skip={{{accepted}}} "
                             "(see docs/lockdown.md)")

    def _check_threads(self):
        threads = _thread_count()
        per_thread = [layer for layer in self.layers if layer not in _PROCESS_WIDE]
        if threads > 1 and per_thread:
            self._refuse(per_thread[0], f"the process has {threads} threads (/proc/self/task) and {per_thread[0]} "
                         "would bind the calling thread only (the kernel refuses the user and mount namespaces)",
                         _THREADS_FIX)

    def _refuse(self, layer, reason, fix=""):
        """Refuse a layer the plan requires before anything is applied (a best-effort one is left to try)."""
        if layer not in self.plan.best_effort:
            raise LayerError(layer, reason + " (nothing was applied)", fix)

    def _check_privileges(self):
        """What the kernel would refuse this process, known before changing anything."""
        layers = self.layers
        user_namespace = "user_namespace" in layers
        if user_namespace:
            self._check_own_maps()
        elif not capabilities.holds(capabilities.CAP_SYS_ADMIN):
            for layer in layers:
                if layer in namespaces.NAMESPACE_LAYERS:
                    self._refuse(layer, "a new namespace needs CAP_SYS_ADMIN", namespaces.FIX_OTHER)
        if "landlock" in layers:
            try:
                syscalls.landlock_abi()
            except OSError as exc:
                self._refuse("landlock", f"the kernel offers no Landlock ({exc.strerror})", landlock.FIX)
            if "no_new_privs" not in layers and not user_namespace and not capabilities.holds(capabilities.CAP_SYS_ADMIN):
                self._refuse("landlock", "without no_new_privs only CAP_SYS_ADMIN may restrict itself",
                             "do not skip no_new_privs")
        if "rlimits" in layers:
            self._check_rlimits(user_namespace)
        if "capabilities" in layers or "securebits" in layers:
            if not user_namespace and not capabilities.holds(capabilities.CAP_SETPCAP):
                self._refuse("capabilities" if "capabilities" in layers else "securebits",
                             "emptying the bounding set and locking securebits need CAP_SETPCAP",
                             "run as root, or do not skip the user namespace")
        if "capabilities" in layers and not user_namespace:
            identity = self.plan.identity
            if ((os.getresuid() != (identity.uid,) * 3 and not capabilities.holds(capabilities.CAP_SETUID))
                    or (os.getresgid() != (identity.gid,) * 3 and not capabilities.holds(capabilities.CAP_SETGID))):
                self._refuse("capabilities", f"becoming uid {identity.uid} gid {identity.gid} needs CAP_SETUID and "
                             "CAP_SETGID", "run as root, or build the plan for this process's own ids")
        if "seccomp" in layers and "no_new_privs" not in layers and "capabilities" in layers:
            self._refuse("seccomp", "without no_new_privs only CAP_SYS_ADMIN may load a filter, and the capabilities "
                         "layer drops it first", "do not skip no_new_privs, or skip capabilities too")

    def _check_own_maps(self):
        identity = self.plan.identity
        if any(len(id_map) != 1 or id_map[0].count != 1 for id_map in (identity.uid_map, identity.gid_map)):
            self._refuse("user_namespace", "a process writes its own id maps, which the kernel allows for one uid "
                         "and one gid: its own", "map one id each (identity.uid_map/gid_map in `jailer show`)")
        own = (os.geteuid(), os.getegid())
        if self.host_ids != own and not (capabilities.holds(capabilities.CAP_SETUID)
                                         and capabilities.holds(capabilities.CAP_SETGID)):
            self._refuse("user_namespace", f"the maps name host uid/gid {self.host_ids[0]}/{self.host_ids[1]}, "
                         f"this process is {own[0]}/{own[1]} and cannot become them",
                         "build the plan for this process's own ids, or run as root")

    def _check_rlimits(self, user_namespace):
        """A hard limit is raised only with CAP_SYS_RESOURCE on the host, which a user namespace does not give."""
        may_raise = capabilities.holds(capabilities.CAP_SYS_RESOURCE) and not user_namespace
        for limit in self.plan.limits.rlimits:
            if limit.name not in limits.RLIMITS:
                continue   # apply_rlimits names it
            _, hard = resource.getrlimit(limits.RLIMITS[limit.name])
            if _raises(limit.hard, hard) and not may_raise:
                self._refuse("rlimits", f"the hard limit of {limit.name} would rise from {hard} to {limit.hard}",
                             "lower it in the profile, or run as root without a user namespace")

    def apply(self) -> dict:
        """Apply the layers to the calling process, in order; returns the report."""
        if self.used:
            raise UsageError("lockdown: this plan was already applied to the process")
        self.used = True
        self._check_threads()
        enforcement = status.Enforcement(self.plan.best_effort)
        enforcement.skipped.update(self.skipped)
        landlock_paths = self._open_landlock_paths(enforcement) if "landlock" in self.layers else None
        try:
            self._apply(enforcement, landlock_paths)
        except LayerError as exc:
            applied = ", ".join(enforcement.applied)
            state = f"the process is partly locked down (applied: {applied})" if applied else "nothing was applied"
            raise LayerError(exc.layer, f"{exc.reason}; {state}", exc.fix) from None
        return {"applied": enforcement.applied, "skipped": enforcement.skipped}

    def _open_landlock_paths(self, enforcement):
        """The rules' paths, opened first: with the caller's own rights, and before anything is applied."""
        try:
            return landlock.open_paths(self.plan, pivoted=False)
        except OSError as exc:
            reason = f"cannot open {exc.filename}: {exc.strerror}"
            if "landlock" not in self.plan.best_effort:
                raise LayerError("landlock", reason + " (nothing was applied)",
                                 "make it reachable by this process, or mark its bind optional") from None
            enforcement.skipped["landlock"] = reason
            return None

    def _apply(self, enforcement, landlock_paths):
        plan, layers, attempt = self.plan, self.layers, enforcement.attempt
        if "user_namespace" in layers:
            self._enter_user_namespace(enforcement)
        wanted = {attribute: layer in layers for layer, (_, attribute) in namespaces.NAMESPACE_LAYERS.items()}
        namespaces.enter_namespaces(dataclasses.replace(plan.namespaces, **wanted), enforcement)
        if "network" in layers and "net_namespace" in enforcement.applied:
            if plan.network.mode == "none":
                enforcement.applied["network"] = {"mode": "none"}
            else:
                attempt("network", lambda: network.setup_inside(plan.network))
        if "no_new_privs" in layers:
            attempt("no_new_privs", capabilities.set_no_new_privs)
        if landlock_paths is not None:
            attempt("landlock", lambda: landlock.enforce(plan, landlock_paths), landlock.FIX)
        if "rlimits" in layers:
            attempt("rlimits", lambda: limits.apply_rlimits(plan.limits.rlimits))
        last_cap = self.last_cap
        if "capabilities" in layers:
            attempt("capabilities", lambda: capabilities.drop_bounding_set(last_cap), capabilities.FIX)
        if "securebits" in layers:
            attempt("securebits", capabilities.lock_securebits, capabilities.FIX)
        if "capabilities" in layers:
            in_user_namespace = "user_namespace" in enforcement.applied
            ids = capabilities.become(plan.identity.uid, plan.identity.gid,
                                      drop_groups=not in_user_namespace and os.geteuid() == 0)
            attempt("capabilities", lambda: {**ids, **capabilities.clear_capabilities(last_cap)}, capabilities.FIX)
        if "seccomp" in layers:
            self._load_filters(enforcement)

    def _enter_user_namespace(self, enforcement):
        """unshare(CLONE_NEWUSER), then the maps from inside; as root, the host ids first."""
        took_host_ids = (os.geteuid(), os.getegid()) != self.host_ids
        if took_host_ids:
            namespaces.take_host_ids(*self.host_ids)
        namespaces.enter_user_namespace(self.plan.namespaces, enforcement)
        if "user_namespace" in enforcement.applied:
            enforcement.attempt("user_namespace", lambda: namespaces.map_own_ids(self.plan.identity))
        elif took_host_ids:   # skipped as best effort: keep no saved uid 0 nor fsuid 0
            os.setresuid(self.host_ids[0], self.host_ids[0], self.host_ids[0])

    def _load_filters(self, enforcement):
        plain = self.plan.seccomp
        detail = {"stage": self.stage, "default": plain.default_action, "rules": len(plain.rules),
                  "steady_rules": len(plain.steady) if self.stage == "steady" else 0,
                  "filters": len(self.filters), "report": "no (in-process: nothing names a refused syscall)"}
        filters = self.filters

        def load():
            for bpf in filters:
                seccomp.load(bpf, report=False)
            return detail

        enforcement.attempt("seccomp", load, "use a kernel with seccomp filters")


def _raises(new: int, current: int) -> bool:
    """Whether hard limit `new` (-1: unlimited) is above `current` (resource's RLIM_INFINITY: unlimited)."""
    if current == resource.RLIM_INFINITY:
        return False
    return new == -1 or new > current
