"""The sandbox plan: everything `jailer run` will do, as pure data.

A profile (TOML) is validated and resolved into a Plan (see jailer.profile.build_plan);
the launcher applies a Plan and nothing else. Keeping the plan inert and printable
(`jailer show`) means what a user inspects is exactly what gets enforced, and a plan
can be cached as JSON between runs (it round-trips through to_dict/from_dict).

Conventions: paths are absolute; sizes are bytes; ids are integers as seen from
inside the sandbox unless a field says "outside"; a value of None means "not set".
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

# Layer names, used by `best_effort`, the status stream and error messages.
LAYERS = (
    "user_namespace",
    "mount_namespace",
    "pid_namespace",
    "net_namespace",
    "ipc_namespace",
    "uts_namespace",
    "cgroup_namespace",
    "pivot_root",
    "landlock",
    "rlimits",
    "cgroup",
    "network",
    "capabilities",
    "no_new_privs",
    "securebits",
    "seccomp",
)

RUNTIMES = ("native", "python")
SECCOMP_ACTIONS = ("allow", "errno", "kill", "kill_thread", "trap", "log")
ARG_OPS = ("eq", "ne", "lt", "le", "gt", "ge", "masked_eq")
FD_KINDS = ("unix-listener", "unix-stream", "memfd", "eventfd", "file", "notify", "checkpoint")
READY_MODES = ("exec", "notify", "socket")
START_MODES = ("exec", "zero-exec")
NETWORK_MODES = ("none", "loopback", "veth")
PID1_MODES = ("reaper", "program")
RESTART_POLICIES = ("no", "on-failure", "always")
HOST_ID_MODES = ("per-device", "stable", "shared")


@dataclass(frozen=True)
class ProgramPlan:
    argv: tuple[str, ...]           # argv as the program sees it
    executable: str                 # absolute path exec'd (visible at the same path inside)
    runtime: str = "native"         # one of RUNTIMES
    cwd: str = "/"
    ready: str = "exec"             # one of READY_MODES: "notify" = when it writes READY=1 to its notify fd,
                                    # "socket" = when every socket of Plan.sockets listens
    ready_timeout: float = 10.0     # ready = "socket": seconds the program has to listen
    start: str = "exec"             # one of START_MODES: "zero-exec" = a Python program run by the sandbox's
                                    # process in the launcher's interpreter (jailer.zero_exec), no execve
    preload: tuple[str, ...] = ()   # zero-exec: standard-library modules imported while the launcher prepares
                                    # (jailer.zero_exec.preloader)


@dataclass(frozen=True)
class NamespacesPlan:
    user: bool = True
    mount: bool = True
    pid: bool = True
    net: bool = True
    ipc: bool = True
    uts: bool = True
    cgroup: bool = True
    hostname: str = "jailer"
    pid1: str = "reaper"            # one of PID1_MODES: who is pid 1 in the new pid namespace


@dataclass(frozen=True)
class IdMap:
    inside: int
    outside: int
    count: int = 1


@dataclass(frozen=True)
class IdentityPlan:
    uid: int                        # uid the program runs as (inside the user namespace)
    gid: int
    uid_map: tuple[IdMap, ...] = ()  # empty when no user namespace
    gid_map: tuple[IdMap, ...] = ()
    # As root: "shared" runs the sandbox as the host ids the maps name; "per-device" and
    # "stable" give it a host id of its own from host_id_range (start, count), chosen when
    # it starts (jailer.host.host_ids), which replaces the maps' outside ids (or uid/gid
    # without a user namespace).
    host_ids: str = "shared"
    host_id_range: tuple[int, int] = (0x6A000000, 0x10000)


@dataclass(frozen=True)
class Bind:
    source: str                     # host path
    target: str                     # path inside the new root
    writable: bool = False
    optional: bool = False          # skip silently if the source is missing
    origin: str = "profile"         # "profile", "runtime", "device", "fd": why it is there


@dataclass(frozen=True)
class Tmpfs:
    target: str
    size: int
    mode: int = 0o755


@dataclass(frozen=True)
class Symlink:
    target: str                     # path of the link inside the new root
    points_to: str                  # link contents


@dataclass(frozen=True)
class FilesystemPlan:
    root_size: int = 8 * 1024 * 1024   # the fresh tmpfs that becomes "/"
    binds: tuple[Bind, ...] = ()       # in mount order; includes runtime binds
    tmpfs: tuple[Tmpfs, ...] = ()
    symlinks: tuple[Symlink, ...] = ()
    devices: tuple[str, ...] = ()      # host device nodes bound at the same path, e.g. "/dev/null"
    proc: bool = True                  # mount a fresh /proc (read-only /proc/sys)
    readonly_root: bool = True         # remount "/" read-only once the tree is built


@dataclass(frozen=True)
class LandlockPlan:
    enabled: bool = True            # restrict file access to the binds/tmpfs of the plan


@dataclass(frozen=True)
class ArgCondition:
    index: int                      # 0..5
    op: str                         # one of ARG_OPS
    value: int
    mask: int | None = None         # only for masked_eq


@dataclass(frozen=True)
class SeccompRule:
    syscall: str
    action: str = "allow"           # one of SECCOMP_ACTIONS
    errno: int | None = None        # for action "errno"
    args: tuple[ArgCondition, ...] = ()


@dataclass(frozen=True)
class SeccompPlan:
    enabled: bool = True
    default_action: str = "kill"    # one of SECCOMP_ACTIONS except "allow" is allowed too
    default_errno: int | None = None
    rules: tuple[SeccompRule, ...] = ()   # groups already expanded
    report: bool = True             # tell the user the name of a refused/killed syscall
    # Rules added once the program is ready (staged policy): evaluated on top of `rules`,
    # the more severe action wins, so they can only take permissions away.
    steady: tuple[SeccompRule, ...] = ()


@dataclass(frozen=True)
class Rlimit:
    name: str                       # "nofile", "nproc", "as", "core", "fsize", "memlock", "stack", "cpu", ...
    soft: int                       # -1 = unlimited
    hard: int


@dataclass(frozen=True)
class CgroupPlan:
    memory_max: int | None = None   # bytes
    pids_max: int | None = None
    cpu_quota_us: int | None = None
    cpu_period_us: int = 100000
    parent: str = "jailer"          # created below the launcher's own cgroup, per controller


@dataclass(frozen=True)
class LimitsPlan:
    rlimits: tuple[Rlimit, ...] = ()
    cgroup: CgroupPlan | None = None


@dataclass(frozen=True)
class FdSpec:
    name: str
    kind: str                       # one of FD_KINDS
    number: int                     # fd number in the program (>= 3)
    path: str | None = None         # unix-listener: socket to create; file: file to open
    size: int | None = None         # memfd, checkpoint: size to create
    mode: str = "r"                 # file: "r", "w" or "rw"
    # notify: one end of a datagram socketpair the launcher creates; the program writes
    # sd_notify-style "READY=1" to it (its number is also in $JAILER_NOTIFY_FD).
    # checkpoint: a memfd sealed at its size that jailer keeps across restarts of the program
    # (and stores with systemd), where the program saves the state it must come back with.
    required: bool = True           # must be provided (by --fd, --socket-path or creation)


@dataclass(frozen=True)
class ProgramSocket:
    """A socket the program binds itself (libvfio-user devices do): jailer binds a private
    host directory, writable, at the path's directory and makes the socket reachable at the
    caller's --socket-path / --socket NAME=PATH once it listens."""
    name: str
    path: str                       # where the program binds it, inside the sandbox


@dataclass(frozen=True)
class RestartPlan:
    """What `jailer run` does when the program ends (systemd's Restart= and its rate limit)."""
    policy: str = "no"              # one of RESTART_POLICIES
    limit: int = 5                  # restarts allowed within `interval` seconds; one more gives up
    interval: float = 60.0
    delay: float = 0.1              # seconds before the first restart of a run of failures
    max_delay: float = 5.0          # the delay doubles with each restart within `interval`, up to this


@dataclass(frozen=True)
class NetworkPlan:
    mode: str = "none"              # one of NETWORK_MODES
    host_ifname: str | None = None  # veth only
    sandbox_ifname: str = "eth0"
    host_address: str | None = None      # CIDR, e.g. "10.200.0.1/30"
    sandbox_address: str | None = None   # CIDR


@dataclass(frozen=True)
class Plan:
    source: str                     # profile path, as given
    name: str
    invocation: str                 # "root" or "unprivileged"
    program: ProgramPlan
    namespaces: NamespacesPlan = field(default_factory=NamespacesPlan)
    identity: IdentityPlan = field(default_factory=lambda: IdentityPlan(uid=65534, gid=65534))
    filesystem: FilesystemPlan = field(default_factory=FilesystemPlan)
    landlock: LandlockPlan = field(default_factory=LandlockPlan)
    seccomp: SeccompPlan = field(default_factory=SeccompPlan)
    limits: LimitsPlan = field(default_factory=LimitsPlan)
    fds: tuple[FdSpec, ...] = ()
    sockets: tuple[ProgramSocket, ...] = ()
    network: NetworkPlan = field(default_factory=NetworkPlan)
    restart: RestartPlan = field(default_factory=RestartPlan)
    environment: tuple[tuple[str, str], ...] = ()   # the program's whole environment
    die_with_parent: bool = True
    best_effort: frozenset[str] = frozenset()       # layers that may be skipped (reported)

    def to_dict(self) -> dict:
        return _to_data(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return _from_data(cls, data)


def _to_data(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return [_to_data(v) for v in value]
    return value


def _from_data(kind, data):
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{name: _from_data(hints[name], v) for name, v in data.items()})
    if origin is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_data(args[0], v) for v in data)
        return tuple(_from_data(a, v) for a, v in zip(args, data))
    if origin is frozenset:
        return frozenset(data)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if data is None:
            return None
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        return _from_data(inner[0], data)
    return data
