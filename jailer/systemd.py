"""Generate systemd units that run `jailer run` under systemd's own sandboxing.

Two sandboxes nest here: systemd's around the launcher, and jailer's around the device.
The outer one may only use directives that leave jailer able to build the inner one
(user/mount/pid/net namespaces, a fresh /proc, cgroups, uid maps), so every directive
carries the reason it is set, or deliberately switched off, and that reason is written
into the generated unit next to it. The same directive list renders a .service, a
drop-in for an existing unit, or a `systemd-run` command line.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from jailer.errors import JailerError, UsageError
from jailer.plan import FdSpec, Plan
from jailer.sdnotify import SD_LISTEN_FDS_START

UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+$")
DROP_IN_BASENAME = "50-jailer.conf"
VFIO_USER_FD_NAME = "vfio-user"

# Memory and tasks of the launcher itself, which shares the unit's cgroup with the device:
# the profile's limits bound the device (jailer enforces them in its own sub-cgroup), the
# unit's limits bound both, so they get this much on top.
LAUNCHER_MEMORY_HEADROOM = 64 * 1024 * 1024
LAUNCHER_TASKS_HEADROOM = 16

# Device nodes DevicePolicy=closed (implied by PrivateDevices=yes) already allows.
PSEUDO_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
                            "/dev/tty", "/dev/ptmx"})

HOME_DIRS = ("/home", "/root", "/run/user")

# Syscalls neither jailer nor a device emulator has any use for. Not all of @debug: jailer
# takes the device's seccomp listener with pidfd_getfd, which is in that group.
DENIED_SYSCALLS = ("@clock", "@cpu-emulation", "@module", "@obsolete", "@raw-io", "@reboot", "@swap",
                   "ptrace", "perf_event_open", "lookup_dcookie")


@dataclass(frozen=True)
class Directive:
    key: str
    value: str
    why: str
    list_valued: bool = False   # a drop-in must clear the base unit's value before setting it


@dataclass(frozen=True)
class UnitRequest:
    """What the user asked for, resolved: every path absolute."""

    name: str                   # unit name without suffix
    profile: str
    jailer: str
    socket_path: str
    socket_activation: bool = False
    socket_group: str | None = None
    explicit_socket_path: bool = True   # pass --socket-path (else the profile's own path is used)
    listener_name: str = VFIO_USER_FD_NAME   # the profile's unix-listener fd for the vfio-user socket
    restarts: bool = False      # the profile restarts the program: systemd does it instead (Restart=)


def listener_spec(plan: Plan) -> FdSpec:
    """The profile's vfio-user socket: its only unix-listener fd, or the one named 'vfio-user'
    when there are several (a device may also listen on a control socket)."""
    listeners = [spec for spec in plan.fds if spec.kind == "unix-listener"]
    if len(listeners) > 1:
        listeners = [spec for spec in listeners if spec.name == VFIO_USER_FD_NAME]
    if len(listeners) != 1:
        found = ", ".join(spec.name for spec in plan.fds if spec.kind == "unix-listener") or "none"
        raise UsageError(f"{plan.source}: a systemd unit needs one 'unix-listener' fd for the vfio-user socket "
                         f"(named '{VFIO_USER_FD_NAME}' if there are several), found {found}")
    return listeners[0]


def make_request(plan: Plan, profile: str, jailer: str, name: str | None = None,
                 socket_path: str | None = None, socket_activation: bool = False,
                 socket_group: str | None = None) -> UnitRequest:
    """Resolve defaults: unit name from the profile, socket path from the profile or /run/jailer."""
    name = name or f"jailer-{plan.name}"
    if not UNIT_NAME.match(name) or name.endswith((".service", ".socket")):
        raise UsageError(f"--name {name!r}: expected a unit name without suffix, made of "
                         "letters, digits and ':_.\\-'")
    if not os.path.isabs(jailer):
        raise UsageError(f"--jailer {jailer!r}: systemd needs an absolute path to the jailer executable")
    listener = listener_spec(plan)
    path = socket_path or listener.path or f"/run/jailer/{name}/vfio-user.sock"
    if not os.path.isabs(path):
        raise UsageError(f"--socket-path {path!r}: expected an absolute path")
    return UnitRequest(name=name, profile=os.path.abspath(profile), jailer=jailer, socket_path=path,
                       socket_activation=socket_activation, socket_group=socket_group,
                       explicit_socket_path=not (listener.path and socket_path in (None, listener.path)),
                       listener_name=listener.name, restarts=plan.restart.policy != "no")


def exec_argv(request: UnitRequest) -> list[str]:
    """`jailer run`; socket-activated, with the one socket systemd passes (always fd 3) named
    explicitly, so the unit does not depend on LISTEN_FDS handling and says what it hands over."""
    argv = [request.jailer, "run", request.profile]
    if request.restarts:
        argv.append("--no-restart")   # systemd applies the profile's policy (Restart=): one restarter only
    if request.socket_activation:
        argv += ["--fd", f"{request.listener_name}={SD_LISTEN_FDS_START}"]
    else:
        if request.explicit_socket_path:
            argv += ["--socket-path", request.socket_path]
        if request.socket_group:
            argv += ["--socket-group", request.socket_group]
    return argv


def exec_line(request: UnitRequest) -> str:
    command, *args = exec_argv(request)
    return " ".join([unit_quote(command), *(unit_quote(a, variables=True) for a in args)])


def _capabilities(plan: Plan, request: UnitRequest) -> list[tuple[str, str]]:
    """What jailer needs on the host. Inside a user namespace it creates, it holds every
    capability whatever the bounding set says, so namespaces, mounts, pivot_root and
    dropping the device's capabilities need nothing here when the profile has one."""
    caps = [
        ("CAP_SETUID", "write a uid_map for ids other than its own, switch to the sandbox uid"),
        ("CAP_SETGID", "write a gid_map, switch to the sandbox groups"),
    ]
    if _created_sockets(plan, request):
        caps.append(("CAP_CHOWN", "hand the sockets it creates to the device's uid"))
    if plan.seccomp.enabled and plan.seccomp.report:
        caps.append(("CAP_SYS_PTRACE", "take the device's seccomp listener with pidfd_getfd (the device is "
                     "not dumpable) to name refused syscalls; the ptrace syscall itself stays denied"))
    if not plan.namespaces.user:
        caps += [
            ("CAP_SYS_ADMIN", "no user namespace: unshare the other namespaces, mount, pivot_root"),
            ("CAP_SETPCAP", "no user namespace: drop the device's bounding set, lock securebits"),
            ("CAP_SYS_CHROOT", "no user namespace: chroot into the new root"),
            ("CAP_KILL", "no user namespace: signal the device under its own uid"),
        ]
    if plan.limits.rlimits:
        caps.append(("CAP_SYS_RESOURCE", "set the profile's rlimits, which may exceed the current hard limits"))
    if plan.network.mode != "none":
        caps.append(("CAP_NET_ADMIN", f"configure the device's '{plan.network.mode}' network from the host"))
    return caps


def _namespace_types(plan: Plan) -> list[str]:
    ns = plan.namespaces
    wanted = [("user", ns.user), ("mnt", ns.mount), ("pid", ns.pid), ("net", ns.net), ("ipc", ns.ipc),
              ("uts", ns.uts), ("cgroup", ns.cgroup)]
    return [name for name, on in wanted if on]


def _under_tmp(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in ("/tmp", "/var/tmp"))


def _host_paths(plan: Plan) -> list[str]:
    return [b.source for b in plan.filesystem.binds] + [spec.path for spec in plan.fds if spec.path]


def _created_sockets(plan: Plan, request: UnitRequest) -> list[str]:
    """Sockets jailer creates itself: all its listeners but one systemd passes in."""
    sockets = [spec.path for spec in plan.fds if spec.kind == "unix-listener" and spec.path
               and spec.name != listener_spec(plan).name]
    if not request.socket_activation:
        sockets.append(request.socket_path)
    return sockets


def _writable_places(plan: Plan, request: UnitRequest) -> tuple[list[str], list[str]]:
    """(RuntimeDirectory= entries, ReadWritePaths= entries) for what jailer writes on the host:
    sockets it creates (in /run: a runtime directory systemd makes), writable binds and files."""
    sockets = _created_sockets(plan, request)
    runtime_dirs, writable = [], [b.source for b in plan.filesystem.binds if b.writable]
    writable += [spec.path for spec in plan.fds if spec.kind == "file" and "w" in spec.mode]
    for path in sockets:
        runtime_dir = _runtime_directory(path)
        if runtime_dir:
            runtime_dirs.append(runtime_dir)
        else:
            writable.append(os.path.dirname(path))
    return sorted(set(runtime_dirs)), sorted(set(writable))


def _protect_home(plan: Plan, request: UnitRequest) -> Directive:
    used = [request.profile, request.jailer, request.socket_path, *_host_paths(plan)]
    in_home = [p for p in used if any(p == d or p.startswith(d + "/") for d in HOME_DIRS)]
    if in_home:
        return Directive("ProtectHome", "read-only", f"{in_home[0]} is below a home directory")
    return Directive("ProtectHome", "yes", "the launcher, its profile and the binds are outside home directories")


def _runtime_directory(path: str) -> str | None:
    """The RuntimeDirectory= that holds the socket when it lives below /run (systemd creates it)."""
    parent = os.path.dirname(path)
    if parent.startswith("/run/") and parent != "/run":
        return parent[len("/run/"):]
    return None


def lifecycle_directives(plan: Plan, request: UnitRequest) -> list[Directive]:
    d = [
        Directive("Type", "notify", "jailer sends READY=1 once the device listens, so dependants start "
                  "only when the vfio-user socket is usable"),
        Directive("NotifyAccess", "main", "only the launcher may report readiness, never the device"),
        Directive("ExecStart", exec_line(request),
                  "the launcher, by absolute path; it builds the device's sandbox from the profile",
                  list_valued=True),
        Directive("KillSignal", "SIGTERM", "vfio-user backends exit quickly and cleanly on SIGTERM"),
        Directive("KillMode", "control-group", "SIGTERM reaches the launcher and the device alike"),
        Directive("TimeoutStopSec", "5s", "backends may be SIGKILLed a few seconds after SIGTERM"),
        *restart_directives(plan),
    ]
    return d


def restart_directives(plan: Plan) -> list[Directive]:
    """The profile's [restart] as systemd's own: systemd restarts the whole `jailer run`
    (which runs with --no-restart), a socket unit keeps the listening socket meanwhile,
    and the file descriptor store keeps the checkpoint fd (jailer stores it: FDSTORE=1)."""
    restart = plan.restart
    if restart.policy == "no":
        return [Directive("Restart", "no", 'the profile\'s restart.policy is "no"')]
    d = [Directive("Restart", restart.policy, "the profile's restart.policy; vfio-user clients reconnect to the "
                   "socket, which a .socket unit keeps while the device restarts"),
         Directive("RestartSec", _seconds(restart.delay),
                   "the profile's restart.delay (its doubling up to restart.max_delay needs systemd 254's "
                   "RestartSteps= and RestartMaxDelaySec=; older systemd waits this long every time)")]
    checkpoints = [spec.name for spec in plan.fds if spec.kind == "checkpoint"]
    if checkpoints:
        d.append(Directive("FileDescriptorStoreMax", str(len(checkpoints)),
                           f"jailer stores the checkpoint fd '{checkpoints[0]}' here, so the restarted device gets "
                           "back the state the crashed one saved"))
    return d


def start_limit_directives(plan: Plan) -> list[Directive]:
    """[Unit] settings: more than restart.limit restarts within restart.interval give up."""
    restart = plan.restart
    if restart.policy == "no":
        return []
    return [Directive("StartLimitIntervalSec", _seconds(restart.interval), "the profile's restart.interval"),
            Directive("StartLimitBurst", str(restart.limit + 1),
                      "the first start and restart.limit restarts within that interval; one more gives up")]


def _seconds(value: float) -> str:
    return f"{value:g}s" if value >= 1 or value == 0 else f"{value * 1000:g}ms"


def sandbox_directives(plan: Plan, request: UnitRequest) -> list[Directive]:
    d = [
        Directive("NoNewPrivileges", "yes", "jailer sets no_new_privs on the device anyway and never "
                  "executes setuid helpers (it writes id maps itself)"),
    ]
    caps = _capabilities(plan, request)
    d.append(Directive("CapabilityBoundingSet", " ".join(c for c, _ in caps),
                       "what jailer needs as root: " + "; ".join(f"{c}: {why}" for c, why in caps),
                       list_valued=True))
    d.append(Directive("AmbientCapabilities", "", "nothing is handed to executed programs", list_valued=True))
    d.append(Directive("ProtectSystem", "strict", "the launcher writes nothing on the host but its "
                       "socket and cgroups (/sys stays writable for them)"))
    runtime_dirs, writable = _writable_places(plan, request)
    if runtime_dirs:
        d.append(Directive("RuntimeDirectory", " ".join(unit_quote(p) for p in runtime_dirs),
                           "created writable for the sockets jailer creates, removed when the unit stops",
                           list_valued=True))
        d.append(Directive("RuntimeDirectoryMode", "0755", "the vfio-user client must reach the socket"))
    if writable:
        d.append(Directive("ReadWritePaths", " ".join(unit_quote(p) for p in writable),
                           "where jailer creates sockets and writes files for the profile", list_valued=True))
    d.append(Directive("CacheDirectory", "jailer", "`jailer run` caches resolved plans and compiled filters "
                       "in /var/cache/jailer, read-only otherwise under ProtectSystem=strict"))
    d.append(Directive("CacheDirectoryMode", "0700", "jailer only trusts a private cache"))
    if getattr(plan.identity, "host_ids", "shared") != "shared":
        d.append(Directive("StateDirectory", "jailer/launchers jailer/host-ids",
                           "where `jailer run` records what it makes (for `jailer clean` after a kill) and the "
                           "host uid/gid it took for this sandbox, shared by every jailed device (identity.host_ids)",
                           list_valued=True))
    else:
        d.append(Directive("StateDirectory", "jailer/launchers",
                           "where `jailer run` records what it makes, for `jailer clean` after a kill"))
    d.append(Directive("StateDirectoryMode", "0700", "only root reads and writes the records"))
    tmp_paths = [p for p in [request.profile, request.jailer, request.socket_path, *_host_paths(plan)]
                 if _under_tmp(p)]
    if tmp_paths:
        d.append(Directive("PrivateTmp", "no", f"{tmp_paths[0]} must be the host's, not a private /tmp"))
    else:
        d.append(Directive("PrivateTmp", "yes", "nothing of the host's /tmp is needed"))
    d += [
        _protect_home(plan, request),
        Directive("PrivateMounts", "yes", "mounts jailer makes stay out of the host's mount table"),
        Directive("PrivateDevices", "yes", "a minimal /dev; also drops CAP_MKNOD and CAP_SYS_RAWIO"),
        Directive("DevicePolicy", "closed", "only pseudo devices and the profile's device nodes"),
    ]
    nodes = [n for n in plan.filesystem.devices if n not in PSEUDO_DEVICES]
    if nodes:
        d.append(Directive("BindPaths", " ".join(unit_quote(n) for n in nodes),
                           "the profile's device nodes, into the private /dev", list_valued=True))
        d.append(Directive("DeviceAllow", " ".join(f"{unit_quote(n)} rw" for n in nodes),
                           "the profile's device nodes", list_valued=True))
    d += [
        Directive("ProtectKernelModules", "yes", "no module loading"),
        Directive("ProtectKernelLogs", "yes", "no kernel log access"),
        Directive("ProtectClock", "yes", "no clock changes"),
        Directive("ProtectKernelTunables", "no", "its read-only /proc/sys overmount makes the kernel refuse "
                  "a fresh /proc inside a user namespace (EPERM); jailer's /proc/sys is read-only anyway"),
        Directive("ProtectControlGroups", "no", "jailer creates the device's cgroup and writes its limits"),
        Directive("Delegate", "yes", "hand the unit's cgroup subtree to jailer for the device's cgroup"),
        Directive("PrivateUsers", "no", "jailer must be real root to map ids and write cgroups"),
    ]
    if plan.namespaces.uts:
        d.append(Directive("ProtectHostname", "no", "its seccomp filter blocks sethostname, which "
                           "jailer calls in the device's own UTS namespace"))
    else:
        d.append(Directive("ProtectHostname", "yes", "the profile does not set a hostname"))
    d.append(Directive("RestrictNamespaces", " ".join(_namespace_types(plan)) or "yes",
                       "only the namespace types the profile creates", list_valued=True))
    families = ["AF_UNIX", "AF_NETLINK"]
    if plan.network.mode != "none":
        families += ["AF_INET", "AF_INET6"]
    d.append(Directive("RestrictAddressFamilies", " ".join(families),
                       "AF_UNIX for vfio-user and sd_notify, AF_NETLINK for interface setup"
                       + ("; IP for the device's network" if plan.network.mode != "none" else ""),
                       list_valued=True))
    if plan.network.mode == "veth":
        d.append(Directive("PrivateNetwork", "no", "the veth pair's host end lives in the host network"))
    else:
        d.append(Directive("PrivateNetwork", "yes", "the launcher needs no network; path sockets "
                           "(vfio-user, NOTIFY_SOCKET) work across network namespaces"))
        d.append(Directive("IPAddressDeny", "any", "no IP traffic at all"))
    d += [
        Directive("RestrictRealtime", "yes", "no realtime scheduling"),
        Directive("RestrictSUIDSGID", "yes", "no setuid/setgid files can be created"),
        Directive("LockPersonality", "yes", "no execution-domain changes"),
        Directive("MemoryDenyWriteExecute", "yes", "neither the launcher (Python, libffi falls back to "
                  "double mapping) nor the device JITs; inherited by the device"),
        Directive("SystemCallArchitectures", "native", "no syscalls through a second ABI"),
        Directive("SystemCallFilter", "~" + " ".join(DENIED_SYSCALLS),
                  "calls neither jailer nor the device uses; jailer adds the device's allow-list",
                  list_valued=True),
        Directive("SystemCallErrorNumber", "EPERM", "a refused call fails instead of killing the launcher"),
        Directive("KeyringMode", "private", "no access to other services' keys"),
        Directive("UMask", "0077", "files and sockets jailer creates are its own (for a client that is not "
                  "root, let systemd own the socket: jailer systemd --socket --socket-group)"),
    ]
    d += _resource_directives(plan)
    return d


def _resource_directives(plan: Plan) -> list[Directive]:
    cgroup = plan.limits.cgroup
    if cgroup is None:
        return []
    d = []
    if cgroup.memory_max is not None:
        d.append(Directive("MemoryMax", str(cgroup.memory_max + LAUNCHER_MEMORY_HEADROOM),
                           f"the profile's {cgroup.memory_max} bytes plus "
                           f"{LAUNCHER_MEMORY_HEADROOM >> 20} MiB for the launcher"))
    if cgroup.pids_max is not None:
        d.append(Directive("TasksMax", str(cgroup.pids_max + LAUNCHER_TASKS_HEADROOM),
                           f"the profile's {cgroup.pids_max} plus {LAUNCHER_TASKS_HEADROOM} for the launcher"))
    if cgroup.cpu_quota_us is not None:
        percent = max(1, round(100 * cgroup.cpu_quota_us / cgroup.cpu_period_us))
        d.append(Directive("CPUQuota", f"{percent}%", "the profile's CPU quota"))
        d.append(Directive("CPUQuotaPeriodSec", f"{cgroup.cpu_period_us}us", "the profile's CPU period"))
    return d


def service_directives(plan: Plan, request: UnitRequest) -> list[Directive]:
    return lifecycle_directives(plan, request) + sandbox_directives(plan, request)


def socket_directives(plan: Plan, request: UnitRequest) -> list[Directive]:
    mode = "0660" if request.socket_group else "0600"
    d = [
        Directive("ListenStream", unit_quote(request.socket_path), "the vfio-user socket the client connects to"),
        Directive("Accept", "no", "one device serves the socket; it accepts connections itself"),
        Directive("SocketMode", mode, "only the owner" + (" and the client's group" if request.socket_group
                                                          else "") + " may connect"),
        Directive("FileDescriptorName", listener_spec(plan).name,
                  "names the fd after the profile's unix-listener, which `jailer run` matches"),
        Directive("RemoveOnStop", "yes", "no stale socket once the device is gone"),
        Directive("DirectoryMode", "0755", "the client must reach the socket's directory"),
    ]
    if request.socket_group:
        d.append(Directive("SocketGroup", request.socket_group, "the vfio-user client's group"))
    return d


def unit_quote(word: str, variables: bool = False) -> str:
    """Quote one word for a unit file, escaping specifiers (%) and, where systemd expands
    them (ExecStart= arguments, not the command itself), variables ($)."""
    escaped = word.replace("%", "%%")
    if variables:
        escaped = escaped.replace("$", "$$")
    if escaped and not re.search(r"[\s\"'\\;]", escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_section(title: str, directives: list[Directive], reset_lists: bool = False) -> list[str]:
    lines = [f"[{title}]"]
    for directive in directives:
        lines.append(f"# {directive.why}")
        if reset_lists and directive.list_valued and directive.value:
            lines.append(f"{directive.key}=")
        lines.append(f"{directive.key}={directive.value}")
    return lines


def _header(request: UnitRequest) -> list[str]:
    return [f"# Generated by `jailer systemd` from {request.profile}.",
            "# Each directive is preceded by the reason it is set (see docs/systemd.md)."]


def _unit_section(plan: Plan, request: UnitRequest, *extra: Directive) -> list[str]:
    return _render_section("Unit", [
        Directive("Description", f"jailed vfio-user device {plan.name}", "shown by systemctl status"),
        Directive("Documentation", "man:jailer(1)", "how the sandbox is built"),
        *start_limit_directives(plan),
        *extra,
    ])


def render_service(plan: Plan, request: UnitRequest) -> str:
    extra = []
    if request.socket_activation:
        socket_unit = f"{request.name}.socket"
        extra = [Directive("Requires", socket_unit, "the device always gets its listener from the socket unit"),
                 Directive("After", socket_unit, "the socket exists before the device starts")]
    install = [] if request.socket_activation else [
        "", "[Install]", "WantedBy=multi-user.target"]
    lines = (_header(request) + _unit_section(plan, request, *extra) + [""]
             + _render_section("Service", service_directives(plan, request)) + install)
    return "\n".join(lines) + "\n"


def render_socket(plan: Plan, request: UnitRequest) -> str:
    lines = (_header(request) + _unit_section(plan, request) + [""]
             + _render_section("Socket", socket_directives(plan, request))
             + ["", "[Install]", "WantedBy=sockets.target"])
    return "\n".join(lines) + "\n"


def render_drop_in(plan: Plan, request: UnitRequest) -> str:
    """[Service] settings for an existing unit: list-valued settings are cleared first so the
    base unit cannot widen them, and conflicting protections are switched off explicitly."""
    limits = start_limit_directives(plan)
    unit = _render_section("Unit", limits) + [""] if limits else []
    lines = _header(request) + unit + _render_section("Service", service_directives(plan, request), reset_lists=True)
    return "\n".join(lines) + "\n"


def systemd_run_argv(plan: Plan, request: UnitRequest) -> list[str]:
    """The same service as a transient unit, e.g. for a one-off run or a libvirt hook."""
    argv = ["systemd-run", f"--unit={request.name}", f"--description=jailed vfio-user device {plan.name}"]
    for directive in start_limit_directives(plan) + service_directives(plan, request):
        if directive.key != "ExecStart":
            argv.append(f"--property={directive.key}={directive.value}")
    if request.socket_activation:
        for directive in socket_directives(plan, request):
            argv.append(f"--socket-property={directive.key}={directive.value}")
    return argv + ["--", *exec_argv(request)]


def write_units(plan: Plan, request: UnitRequest, output_dir: str, drop_in: str | None = None) -> list[Path]:
    """Write the .service (+ .socket), or UNIT.d/50-jailer.conf; return the paths written."""
    out = Path(output_dir)
    if drop_in:
        if not UNIT_NAME.match(drop_in) or "." not in drop_in:
            raise UsageError(f"--drop-in {drop_in!r}: expected a full unit name such as qemu-idio16.service")
        files = {out / f"{drop_in}.d" / DROP_IN_BASENAME: render_drop_in(plan, request)}
    else:
        files = {out / f"{request.name}.service": render_service(plan, request)}
        if request.socket_activation:
            files[out / f"{request.name}.socket"] = render_socket(plan, request)
    from jailer.host import paths

    for path, text in files.items():
        try:
            paths.write_file(str(path), text.encode(), 0o644, make_dirs=0o755).close()
        except OSError as exc:
            raise JailerError(f"cannot write {path}: {exc.strerror}") from None
    return list(files)


def _load_plan(profile: str) -> Plan:
    from jailer.profile import build_plan

    # System units run the launcher as root, whoever generates them.
    return build_plan(profile, euid=0)


def _click_command():
    import click

    @click.command("systemd", help="Write a systemd service (and socket) or a drop-in that runs a profile "
                   "under `jailer run` inside systemd's own sandboxing.")
    @click.argument("profile", type=click.Path(exists=True, dir_okay=False))
    @click.option("--name", help="Unit name without suffix [default: jailer-<profile name>].")
    @click.option("--socket-path",
                  help="vfio-user socket [default: the profile's, else /run/jailer/NAME/vfio-user.sock].")
    @click.option("--socket", "socket_activation", is_flag=True,
                  help="Also write NAME.socket: systemd owns the socket and passes it in LISTEN_FDS.")
    @click.option("--socket-group", help="Group allowed to connect to the socket (SocketGroup= with --socket, "
                                         "else jailer run --socket-group).")
    @click.option("--drop-in", metavar="UNIT", help="Write UNIT.d/50-jailer.conf for an existing unit instead.")
    @click.option("--output-dir", default=".", show_default=True, type=click.Path(file_okay=False),
                  help="Where to write the units.")
    @click.option("--jailer", "jailer_path", help="Absolute path of the jailer executable [default: this one].")
    @click.option("--print-systemd-run", is_flag=True, help="Print the equivalent systemd-run command instead.")
    def systemd_command(profile, name, socket_path, socket_activation, socket_group, drop_in, output_dir,
                        jailer_path, print_systemd_run):
        if drop_in and socket_activation:
            raise UsageError("--drop-in and --socket are exclusive: add a socket unit for the existing unit by hand")
        plan = _load_plan(profile)
        request = make_request(plan, profile, jailer_path or _this_jailer(), name=name, socket_path=socket_path,
                               socket_activation=socket_activation, socket_group=socket_group)
        if print_systemd_run:
            click.echo(shlex.join(systemd_run_argv(plan, request)))
            return
        for path in write_units(plan, request, output_dir, drop_in=drop_in):
            click.echo(str(path))

    return systemd_command


def _this_jailer() -> str:
    import shutil
    import sys

    found = shutil.which("jailer", path=os.path.dirname(sys.executable)) or shutil.which("jailer")
    if not found:
        raise UsageError("cannot find the jailer executable; pass --jailer /absolute/path/to/jailer")
    return os.path.abspath(found)


systemd_command = _click_command()
