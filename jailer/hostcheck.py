"""`jailer check`: validate a profile and say, layer by layer, whether this host will enforce it.

Capabilities are probed, not guessed from version numbers: namespaces are tried with
unshare() in throw-away child processes running with the invocation's ids (so
`--as-user 1000` run by root answers for uid 1000), Landlock's ABI is asked with
landlock_create_ruleset(VERSION), and seccomp's actions are read from the kernel's own
list (/proc/sys/kernel/seccomp/actions_avail). Sysctls and mounts are only read to explain
a refusal and name the fix.
"""

from __future__ import annotations

import errno
import json
import os

import click

from jailer import monitor
from jailer.layers import syscalls
from jailer.errors import UsageError
from jailer.inspect import profile_command

CLONE_FLAGS = {
    "user_namespace": syscalls.CLONE_NEWUSER,
    "mount_namespace": syscalls.CLONE_NEWNS,
    "pid_namespace": syscalls.CLONE_NEWPID,
    "net_namespace": syscalls.CLONE_NEWNET,
    "ipc_namespace": syscalls.CLONE_NEWIPC,
    "uts_namespace": syscalls.CLONE_NEWUTS,
    "cgroup_namespace": syscalls.CLONE_NEWCGROUP,
}
SECCOMP_ACTIONS_AVAIL = "/proc/sys/kernel/seccomp/actions_avail"
PLAN_ACTIONS = {"kill": "kill_process", "kill_thread": "kill_thread", "trap": "trap", "errno": "errno",
                "log": "log", "allow": "allow"}
CGROUP_CONTROLLERS = {"memory_max": "memory", "pids_max": "pids", "cpu_quota_us": "cpu"}
USERNS_SYSCTLS = ("user/max_user_namespaces", "kernel/unprivileged_userns_clone",
                  "kernel/apparmor_restrict_unprivileged_userns")


@profile_command("check", "Validate PROFILE and report what this host can enforce of it.",
                 "Print the report as JSON.")
def check_command(plan, as_json, ids):
    uid, gid = ids
    host = host_facts(plan, uid, gid)
    layers = assess(plan, host)
    refused = [layer for layer in layers if layer["required"] and not layer["available"]]
    if as_json:
        click.echo(json.dumps({"profile": plan.source, "invocation": plan.invocation, "uid": uid, "host": host,
                               "layers": layers, "ok": not refused}, indent=2))
    else:
        click.echo(format_report(plan, host, layers, refused))
    if refused:
        raise SystemExit(3)


def host_facts(plan, uid, gid):
    """What this kernel offers `plan`, probed as uid/gid (an unprivileged caller's namespaces are tried
    inside a new user namespace when the plan has one, as the launcher does)."""
    release = os.uname()
    user_namespace = plan.namespaces.user
    paths = [b.source for b in plan.filesystem.binds if not b.optional or os.path.lexists(b.source)]
    paths += list(plan.filesystem.devices)
    return {
        "kernel": release.release,
        "machine": release.machine,
        "sysctls": {name.replace("/", "."): _read_int(f"/proc/sys/{name}") for name in USERNS_SYSCTLS},
        "unshare": _probe_as(uid, gid, lambda: _probe_namespaces(user_namespace)),
        "seccomp": _seccomp_facts(),
        "landlock_abi": _landlock_abi(),
        "cgroup": _cgroup_facts(uid, gid),
        "unreachable_paths": _probe_as(uid, gid, lambda: _unreachable(paths)),
        "monitor": {"path": monitor.MONITOR, "built": monitor.built()},
    }


def assess(plan, host):
    """One entry per layer the plan asks for: available or not, why, and the host fix."""
    root = plan.invocation == "root"
    ns = plan.namespaces
    unshare = host["unshare"]
    layers = []

    def add(layer, available, reason="", fix=""):
        layers.append({"layer": layer, "available": bool(available), "required": layer not in plan.best_effort,
                       "reason": reason, "fix": fix if not available else ""})

    for layer, flag in CLONE_FLAGS.items():
        if not getattr(ns, layer.split("_")[0]):
            continue
        result = unshare[layer]
        add(layer, result == 0, _unshare_reason(layer, result, host, root, ns.user),
            _unshare_fix(layer, host, root, ns.user))
    if ns.mount:
        unreachable = host["unreachable_paths"]
        if unshare["mount_namespace"] != 0:
            add("pivot_root", False, "needs the new mount namespace",
                "make the mount namespace available (see mount_namespace)")
        else:
            add("pivot_root", not unreachable, "cannot open bind sources as this caller: " + "; ".join(
                f"{path} ({error})" for path, error in unreachable[:3]) + (" ..." if len(unreachable) > 3 else "")
                if unreachable else "", "make them and their parent directories searchable by the caller, or start jailer as root")
    if plan.landlock.enabled:
        abi = host["landlock_abi"]
        add("landlock", isinstance(abi, int), f"ABI {abi}" if isinstance(abi, int) else abi,
            "boot a kernel >= 5.13 with CONFIG_SECURITY_LANDLOCK=y and 'landlock' in the lsm= list")
    if plan.limits.rlimits:
        import resource

        too_high = [r.name for r in plan.limits.rlimits if not root and _above_hard(resource, r)]
        add("rlimits", not too_high, "raising a hard limit needs CAP_SYS_RESOURCE: " + ", ".join(too_high)
            if too_high else "", "lower these limits in the profile or raise the caller's hard limits "
            "(ulimit -H / limits.conf)")
    if plan.limits.cgroup:
        cg = plan.limits.cgroup
        wanted = [c for field, c in CGROUP_CONTROLLERS.items() if getattr(cg, field) is not None]
        facts = host["cgroup"]
        missing = [c for c in wanted if c not in facts["controllers"]]
        unwritable = [c for c in wanted if c in facts["controllers"] and not facts["controllers"][c]["writable"]]
        reason = "; ".join(filter(None, [
            "controller not mounted: " + ", ".join(missing) if missing else "",
            "own cgroup not writable for this caller: " + ", ".join(unwritable) if unwritable else ""]))
        add("cgroup", not missing and not unwritable, reason,
            "mount the missing controllers (v1) or enable them in cgroup.subtree_control (v2); run as root or in "
            "a delegated cgroup (systemd-run --scope -p Delegate=yes); or add \"cgroup\" to "
            "enforcement.best_effort")
    if plan.network.mode != "none":
        if unshare["net_namespace"] != 0:
            add("network", False, "needs the new net namespace", "make the net namespace available (see "
                "net_namespace)")
        else:
            veth_refused = plan.network.mode == "veth" and not root
            add("network", not veth_refused, "a veth pair needs CAP_NET_ADMIN in the host network namespace"
                if veth_refused else "", 'run as root or use network.mode = "loopback"')
    for layer in ("capabilities", "no_new_privs"):
        add(layer, True)
    add("securebits", root or ns.user, "" if root or ns.user else "setting securebits needs CAP_SETPCAP",
        "run as root or enable namespaces.user")
    if plan.seccomp.enabled:
        sc = host["seccomp"]
        wanted = {PLAN_ACTIONS[plan.seccomp.default_action]} | {PLAN_ACTIONS[r.action] for r in plan.seccomp.rules}
        missing = sorted(a for a in wanted if not sc["actions"].get(a))
        add("seccomp", sc["filter"] and not missing,
            "seccomp filters unsupported" if not sc["filter"] else
            "kernel lacks actions: " + ", ".join(missing) if missing else "",
            "use a kernel built with CONFIG_SECCOMP_FILTER=y (>= 4.14 for every action)")
    return layers


def format_report(plan, host, layers, refused):
    sc = host["seccomp"]
    cg = host["cgroup"]
    abi = host["landlock_abi"]
    lines = [f"host        Linux {host['kernel']} {host['machine']}",
             "  sysctls   " + ", ".join(f"{k}={'-' if v is None else v}" for k, v in host["sysctls"].items()),
             "  seccomp   " + ("filters; actions " + " ".join(a for a, ok in sc["actions"].items() if ok)
                               if sc["filter"] else "unavailable"),
             "  landlock  " + (f"ABI {abi}" if isinstance(abi, int) else abi),
             "  cgroup    " + (", ".join(f"{name} (v{c['version']}{', writable' if c['writable'] else ''})"
                                         for name, c in sorted(cg["controllers"].items())) or "no controllers")
             + (f"; v2 at {cg['v2_mount']}" if cg["v2_mount"] else ""),
             "  monitor   " + ("jailer-monitor (what stays once a program is ready)" if host["monitor"]["built"]
                               else f"{host['monitor']['path']} not built or older than its source: the Python "
                               "launcher stays resident (~8 MiB); run ./setup.sh"),
             f"profile     {plan.source} ({plan.invocation} invocation)"]
    for layer in layers:
        status = "ok" if layer["available"] else ("REFUSED" if layer["required"] else "skipped")
        detail = layer["reason"] if layer["reason"] or layer["available"] else ""
        text = f"  {status:<9} {layer['layer']}" + (f": {detail}" if detail else "")
        if layer["fix"]:
            text += f" (fix: {layer['fix']})"
        lines.append(text)
    lines.append(f"result      {len(refused)} required layer(s) cannot be applied" if refused
                 else "result      every required layer can be applied")
    return "\n".join(lines)


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _above_hard(resource, rlimit):
    number = getattr(resource, f"RLIMIT_{rlimit.name.upper()}", None)
    if number is None:
        return False
    current = resource.getrlimit(number)[1]
    wanted = resource.RLIM_INFINITY if rlimit.hard == -1 else rlimit.hard
    return current != resource.RLIM_INFINITY and (wanted == resource.RLIM_INFINITY or wanted > current)


def _unshare_reason(layer, result, host, root, user_namespace):
    if result == 0:
        return ""
    why = f"unshare refused: {errno.errorcode.get(result, result)}"
    sysctls = host["sysctls"]
    if layer == "user_namespace" or (not root and user_namespace):
        if sysctls["user.max_user_namespaces"] == 0:
            why += " (user.max_user_namespaces = 0)"
        elif not root and sysctls["kernel.unprivileged_userns_clone"] == 0:
            why += " (kernel.unprivileged_userns_clone = 0)"
        elif not root and sysctls["kernel.apparmor_restrict_unprivileged_userns"] == 1:
            why += " (AppArmor restricts unprivileged user namespaces)"
    elif not root:
        why += " (an unprivileged caller needs namespaces.user = true)"
    return why


def _unshare_fix(layer, host, root, user_namespace):
    sysctls = host["sysctls"]
    if layer == "user_namespace" or (not root and user_namespace):
        if sysctls["user.max_user_namespaces"] == 0:
            return "sysctl -w user.max_user_namespaces=10000"
        if not root and sysctls["kernel.unprivileged_userns_clone"] == 0:
            return "sysctl -w kernel.unprivileged_userns_clone=1"
        if not root and sysctls["kernel.apparmor_restrict_unprivileged_userns"] == 1:
            return ("sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile granting "
                    "'userns,' to the interpreter")
        return "use a kernel built with CONFIG_USER_NS=y"
    if not root and not user_namespace:
        return "set namespaces.user = true in the profile, or run as root"
    return f"use a kernel built with support for the {layer.replace('_', ' ')}"


def _probe_as(uid, gid, probe):
    """Run `probe()` in a child process with the given ids; returns its JSON-able result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            if (uid, gid) != (os.geteuid(), os.getegid()):
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            result = {"result": probe()}
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            os.write(write_end, json.dumps(result).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    answer = json.loads(data) if data else {"error": "the probe process died"}
    if "error" in answer:
        raise UsageError(f"cannot probe the host as uid {uid}, gid {gid}: {answer['error']} (answering for "
                         "another user with --as-user needs root)")
    return answer["result"]


def _probe_namespaces(user_namespace):
    """errno of unshare() for each namespace (0 = works)."""
    user = CLONE_FLAGS["user_namespace"] if user_namespace and os.geteuid() != 0 else 0
    results = {}
    for layer, flag in CLONE_FLAGS.items():
        pid = os.fork()
        if pid == 0:
            try:
                syscalls.unshare(flag | (user if layer != "user_namespace" else 0))
                os._exit(0)
            except OSError as exc:
                os._exit(exc.errno or 255)
        _, status = os.waitpid(pid, 0)
        results[layer] = os.waitstatus_to_exitcode(status)
    return results


def _unreachable(paths):
    """[path, errno name] for each path the current ids cannot open (O_PATH, as the launcher does)."""
    failed = []
    for path in dict.fromkeys(paths):
        try:
            os.close(os.open(path, os.O_PATH | os.O_CLOEXEC))
        except OSError as exc:
            failed.append([path, errno.errorcode.get(exc.errno, str(exc.errno))])
    return failed


def _seccomp_facts():
    """Which seccomp return actions this kernel implements (the file exists with CONFIG_SECCOMP_FILTER)."""
    try:
        with open(SECCOMP_ACTIONS_AVAIL) as f:
            available = set(f.read().split())
    except OSError:
        return {"filter": False, "actions": {}}
    names = ("kill_process", "kill_thread", "trap", "errno", "user_notif", "trace", "log", "allow")
    return {"filter": True, "actions": {name: name in available for name in names}}


def _landlock_abi():
    """The Landlock ABI version, or why there is none."""
    try:
        return syscalls.landlock_abi()
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            return "unavailable: Landlock is built in but disabled at boot"
        return f"unavailable: {errno.errorcode.get(exc.errno, exc.errno)}"


def _cgroup_facts(uid, gid):
    """Mounted controllers (v1 and v2) and whether the caller's own cgroup in each is writable by uid/gid."""
    mounts = {}
    v2_mount = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
            if fstype == "cgroup":
                for controller in options:
                    if controller in CGROUP_CONTROLLERS.values():
                        mounts.setdefault(controller, (1, fields[4]))
            elif fstype == "cgroup2" and v2_mount is None:
                v2_mount = fields[4]
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else ["(v2)"]:
                own[controller] = path
    if v2_mount:
        try:
            with open(os.path.join(v2_mount, "cgroup.controllers")) as f:
                for controller in f.read().split():
                    if controller in CGROUP_CONTROLLERS.values():
                        mounts.setdefault(controller, (2, v2_mount))
        except OSError:
            pass
    directories = {c: os.path.join(mount, (own.get(c if version == 1 else "(v2)") or "/").lstrip("/"))
                   for c, (version, mount) in mounts.items()}
    writable = _probe_as(uid, gid, lambda: {c: os.access(d, os.W_OK) for c, d in directories.items()})
    return {"v2_mount": v2_mount,
            "controllers": {c: {"version": version, "directory": directories[c], "writable": writable.get(c, False)}
                            for c, (version, mount) in mounts.items()}}
