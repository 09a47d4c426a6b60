"""A cgroup per sandbox: memory (and swap), pids and cpu limits.

Each controller is taken from the unified (v2) hierarchy when it is enabled there for
the launcher's own cgroup, else from its v1 hierarchy (hybrid hosts). The sandbox's
cgroup is <launcher's cgroup>/<CgroupPlan.parent>/<name>.<pid> in each hierarchy used.
The launcher creates it and writes the limits; the forked child joins it before it
unshares the cgroup namespace (so the program sees its own cgroup as "/"); the launcher
removes it when the program is gone, on error paths too. On v2 the launcher's cgroup must
enable the controllers for its children, which v2 allows only while it holds no process:
the launcher moves itself into the leaf LAUNCHER_LEAF below it first when it would be the
one in the way (a systemd unit with Delegate=yes).
"""

from __future__ import annotations

import errno
import os
import time

from jailer.errors import LayerError

# What a cgroup name component may hold (not `re`: importing it costs ~6 ms on the start-up path).
_SAFE_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_FIX = ("run as root, or delegate a cgroup subtree to this user, or list cgroup in the profile's "
        "enforcement.best_effort")


def _controllers_needed(plan_cgroup) -> list[str]:
    needed = []
    if plan_cgroup.memory_max is not None:
        needed.append("memory")
    if plan_cgroup.pids_max is not None:
        needed.append("pids")
    if plan_cgroup.cpu_quota_us is not None:
        needed.append("cpu")
    return needed


def _hierarchies() -> tuple[str | None, dict[str, str]]:
    """(cgroup2 mount point or None, {v1 controller: its mount point}) from mountinfo."""
    unified, v1 = None, {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            fstype, _, options = (rest.split() + ["", "", ""])[:3]
            mount_point = fields.split()[4]
            if fstype == "cgroup2" and unified is None:
                unified = mount_point
            elif fstype == "cgroup":
                for option in options.split(","):
                    v1.setdefault(option, mount_point)
    return unified, v1


def _own_paths() -> tuple[str | None, dict[str, str]]:
    """(own v2 path, {v1 controller: own path}) from /proc/self/cgroup."""
    unified, v1 = None, {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == "":
                unified = path
            for controller in controllers.split(","):
                v1[controller] = path
    return unified, v1


def _write(path: str, value) -> None:
    """One write(2), as cgroup files want, without a buffered file object on the start-up path."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


class Cgroup:
    """The directories created for one sandbox, one per hierarchy used."""

    def __init__(self, directories: dict[str, str], versions: dict[str, int], joined=()):
        self.directories = directories   # controller -> directory
        self.versions = versions         # controller -> 1 or 2
        self.joined = list(joined)       # directories the sandbox's process was moved into already (move)

    @classmethod
    def create(cls, plan_cgroup, name: str, companions=()) -> "Cgroup":
        parent_parts = [p for p in plan_cgroup.parent.split("/") if p]
        for part in parent_parts + [name]:
            if not part or not _SAFE_CHARACTERS.issuperset(part) or part in (".", ".."):
                raise LayerError("cgroup", f"unsafe cgroup name component '{part}'",
                                 "use letters, digits, '_', '-' and '.' only")
        unified_mount, v1_mounts = _hierarchies()
        unified_path, v1_paths = _own_paths()
        unified_controllers = []
        if unified_mount and unified_path is not None:
            try:
                with open(f"{unified_mount}{unified_path}/cgroup.controllers") as f:
                    unified_controllers = f.read().split()
            except OSError:
                unified_controllers = []
        leaf = "/".join(parent_parts + [f"{name}.{os.getpid()}"])
        directories, versions = {}, {}
        group = cls(directories, versions)
        try:
            for controller in _controllers_needed(plan_cgroup):
                if controller in unified_controllers:
                    base = f"{unified_mount}{unified_path}".rstrip("/")
                    versions[controller] = 2
                elif controller in v1_mounts and controller in v1_paths:
                    base = f"{v1_mounts[controller]}{v1_paths[controller]}".rstrip("/")
                    versions[controller] = 1
                else:
                    raise LayerError("cgroup", f"the {controller} controller is not available",
                                     f"mount the cgroup v1 {controller} hierarchy or enable it in cgroup v2")
                directory = f"{base}/{leaf}"
                if versions[controller] == 2:   # every v2 controller, into the one directory they share
                    _enable_v2(base, parent_parts, controller, companions)
                if directory not in directories.values():
                    from jailer.host import leftovers

                    leftovers.sweep_cgroups(os.path.dirname(directory))
                    os.makedirs(os.path.dirname(directory), exist_ok=True)
                    os.mkdir(directory, 0o755)
                directories[controller] = directory
            group._set_limits(plan_cgroup)
        except OSError as exc:
            group.remove()
            raise LayerError("cgroup", f"{exc.filename or 'cgroup'}: {exc.strerror}", _FIX) from None
        except LayerError:
            group.remove()
            raise
        return group

    def _set_limits(self, plan_cgroup) -> None:
        d, v = self.directories, self.versions
        if plan_cgroup.memory_max is not None:
            if v["memory"] == 2:
                _write(f"{d['memory']}/memory.max", plan_cgroup.memory_max)
                if os.path.exists(f"{d['memory']}/memory.swap.max"):
                    _write(f"{d['memory']}/memory.swap.max", 0)
            else:
                _write(f"{d['memory']}/memory.limit_in_bytes", plan_cgroup.memory_max)
                if os.path.exists(f"{d['memory']}/memory.memsw.limit_in_bytes"):
                    _write(f"{d['memory']}/memory.memsw.limit_in_bytes", plan_cgroup.memory_max)
        if plan_cgroup.pids_max is not None:
            _write(f"{d['pids']}/pids.max", plan_cgroup.pids_max)
        if plan_cgroup.cpu_quota_us is not None:
            if v["cpu"] == 2:
                _write(f"{d['cpu']}/cpu.max", f"{plan_cgroup.cpu_quota_us} {plan_cgroup.cpu_period_us}")
            else:
                _write(f"{d['cpu']}/cpu.cfs_period_us", plan_cgroup.cpu_period_us)
                _write(f"{d['cpu']}/cpu.cfs_quota_us", plan_cgroup.cpu_quota_us)

    def describe(self) -> dict:
        return {controller: f"v{self.versions[controller]}:{path}" for controller, path in self.directories.items()}

    def join(self) -> None:
        """Move the calling process into every directory (run by the single-threaded child,
        before it unshares). Moving a whole process (cgroup.procs) takes a global lock whose
        writer waits for an RCU grace period, 5 to 20 ms on a VM; on v1, writing 0 to
        `tasks` moves just the calling thread, which is the whole child, without that lock.
        v2 has no such file: there the move pays the wait (14 ms measured here for the first
        move by cgroup.procs in a while). Directories the launcher moved it into (move) are
        skipped."""
        for directory in sorted(set(self.directories.values()) - set(self.joined)):
            version = next(self.versions[c] for c, d in self.directories.items() if d == directory)
            _write(f"{directory}/{'tasks' if version == 1 else 'cgroup.procs'}", 0)

    def move(self, pid: int) -> None:
        """Move process `pid` into the v2 directory from outside, which join() then skips: the
        launcher moves the zero-exec preloader while it still imports, so that the grace
        period the move waits for (join) is spent beside the sandbox's start-up chain rather
        than on it. v1 directories stay join()'s, which does without that wait: moved early,
        the preloader would import inside the limited cgroup, which made the zero-exec IDIO-16
        ready 6% later here (30 interleaved runs); on v2 that is still less than the wait."""
        for directory in sorted({d for c, d in self.directories.items() if self.versions[c] == 2}):
            _write(f"{directory}/cgroup.procs", pid)
            self.joined.append(directory)

    def remove(self, timeout: float = 2.0) -> None:
        """rmdir every directory, waiting briefly for exiting tasks to leave."""
        deadline = time.monotonic() + timeout
        for directory in sorted(set(self.directories.values())):
            while True:
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        from jailer.status import warn

                        warn(f"could not remove cgroup {directory}: still busy")
                        break
                    _kill_remaining(directory)
                    time.sleep(0.005)
        self.directories = {}


def _kill_remaining(directory: str) -> None:
    """SIGKILL whatever is still in the sandbox's cgroup (the sandbox is over)."""
    try:
        with open(f"{directory}/cgroup.procs") as f:
            pids = [int(line) for line in f if line.strip()]
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


# Where the launcher moves itself when its own cgroup must enable controllers for the
# sandbox's: cgroup v2 lets only a cgroup without processes of its own do that (the "no
# internal processes" rule), and a delegated service cgroup (systemd's Delegate=yes) holds
# just the launcher. One shared leaf for every launcher there, so none leaves a directory.
LAUNCHER_LEAF = "jailer-launchers"


def _enable_v2(base: str, parent_parts: list[str], controller: str, companions=()) -> None:
    """Enable `controller` in subtree_control from the launcher's cgroup down to the parent;
    companions: the launcher's own children that move with it (the zero-exec preloader)."""
    path = base
    for part in [None] + parent_parts:
        if part is not None:
            path = f"{path}/{part}"
            os.makedirs(path, exist_ok=True)
        with open(f"{path}/cgroup.subtree_control") as f:
            if controller in f.read().split():
                continue
        try:
            _write(f"{path}/cgroup.subtree_control", f"+{controller}")
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            if path == base and _leave_for_leaf(base, companions):
                _write(f"{path}/cgroup.subtree_control", f"+{controller}")
                continue
            raise LayerError("cgroup", f"cannot enable the {controller} controller below {path}: it holds "
                             "processes (cgroup v2 allows controllers only above leaves)",
                             f"start jailer in a delegated cgroup whose cgroup.subtree_control already enables "
                             f"{controller} (e.g. systemd-run --scope -p Delegate=yes), or list cgroup in "
                             "enforcement.best_effort") from None


def _leave_for_leaf(base: str, companions=()) -> bool:
    """Move this process and its companions from `base` into its launcher leaf; True if `base`
    then holds no process of its own (others in it, as in a login session's cgroup, keep it busy)."""
    leaf = f"{base}/{LAUNCHER_LEAF}"
    try:
        os.makedirs(leaf, exist_ok=True)
        _write(f"{leaf}/cgroup.procs", os.getpid())
        for pid in companions:
            try:
                _write(f"{leaf}/cgroup.procs", pid)
            except ProcessLookupError:
                pass   # (it has ended)
        with open(f"{base}/cgroup.procs") as f:
            return not f.read().split()
    except OSError:
        return False
