"""`jailer show`: print the plan a profile resolves to, exactly as `jailer run` would apply it."""

from __future__ import annotations

import json
import os

import click

from jailer.profile import build_plan


def profile_command(name, help, json_help):
    """A click command taking PROFILE, --json and --as-user/--as-group; the callback gets the resolved
    Plan, whether JSON was asked for, and the caller's (uid, gid) the plan was resolved for."""
    def decorate(function):
        def callback(profile, as_json, as_user, as_group):
            uid = os.geteuid() if as_user is None else as_user
            gid = (os.getegid() if as_user is None else as_user) if as_group is None else as_group
            return function(build_plan(profile, euid=uid, egid=gid), as_json, (uid, gid))

        command = click.Command(name, callback=callback, help=help, params=[
            click.Argument(["profile"], type=click.Path(dir_okay=False)),
            click.Option(["--json", "as_json"], is_flag=True, help=json_help),
            click.Option(["--as-user"], type=click.IntRange(0), metavar="UID",
                         help="Resolve for a caller with this effective uid (0 = root) instead of the current one."),
            click.Option(["--as-group"], type=click.IntRange(0), metavar="GID",
                         help="Group id of that caller (default: the same number as --as-user)."),
        ])
        return command
    return decorate


@profile_command("show", "Print the sandbox plan PROFILE resolves to for this invocation.",
                 "Print the plan as JSON (Plan.to_dict()).")
def show_command(plan, as_json, ids):
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2))
    else:
        click.echo(format_plan(plan))


def format_size(size):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def format_plan(plan):
    """The plan as grouped, aligned text for a human reviewing what will be enforced."""
    lines = []

    def row(label, value=""):
        lines.append(f"  {label:<14}{value}".rstrip())

    def section(title, value=""):
        lines.append(f"{title:<16}{value}".rstrip())

    section("profile", f"{plan.source} (name {plan.name!r})")
    section("invocation", plan.invocation)
    program = plan.program
    section("program", f"{program.runtime} runtime")
    row("executable", program.executable)
    row("argv", " ".join(json.dumps(a) if not a or " " in a or '"' in a else a for a in program.argv))
    row("cwd", program.cwd)
    row("start", "zero-exec: run by the sandbox's process in the launcher's interpreter, execve refused"
        if program.start == "zero-exec" else "exec")
    if program.preload:
        row("preload", ", ".join(program.preload) + " (imported while the launcher prepares)")
    row("ready", plan.program.ready + (f" (within {plan.program.ready_timeout:g} s)"
                                        if plan.program.ready == "socket" else ""))
    ns = plan.namespaces
    flags = [name for name in ("user", "mount", "pid", "net", "ipc", "uts", "cgroup") if getattr(ns, name)]
    section("namespaces", " ".join(flags) or "none")
    if ns.uts:
        row("hostname", ns.hostname)
    if ns.pid:
        row("pid 1", ns.pid1)
    ident = plan.identity
    section("identity", f"uid {ident.uid}, gid {ident.gid}")
    for label, maps in (("uid map", ident.uid_map), ("gid map", ident.gid_map)):
        if maps:
            row(label, ", ".join(f"{m.inside} -> {m.outside} (x{m.count})" for m in maps))
    host_ids = getattr(ident, "host_ids", "shared")
    if host_ids != "shared":
        first, count = ident.host_id_range
        row("host ids", f"{host_ids}: one host uid/gid of its own from [{first}, {first + count}) per "
                        "running sandbox, replacing the outside ids above")
    fs = plan.filesystem
    section("filesystem", f"tmpfs root {format_size(fs.root_size)}, "
            + ("read-only" if fs.readonly_root else "writable") + " once built, /proc " + ("yes" if fs.proc else "no"))
    for bind in fs.binds:
        notes = [bind.origin] + (["optional"] if bind.optional else [])
        where = bind.source if bind.source == bind.target else f"{bind.source} -> {bind.target}"
        row("bind " + ("rw" if bind.writable else "ro"), f"{where}  [{', '.join(notes)}]")
    for tmpfs in fs.tmpfs:
        row("tmpfs", f"{tmpfs.target} {format_size(tmpfs.size)} mode {tmpfs.mode:04o}")
    for link in fs.symlinks:
        row("symlink", f"{link.target} -> {link.points_to}")
    for device in fs.devices:
        row("device", device)
    section("landlock", "enabled" if plan.landlock.enabled else "disabled")
    sc = plan.seccomp
    if not sc.enabled:
        section("seccomp", "disabled")
    else:
        default = sc.default_action + (f" {_errno_name(sc.default_errno)}" if sc.default_errno else "")
        section("seccomp", f"default {default}, {len(sc.rules)} rules, report " + ("on" if sc.report else "off"))
        import textwrap

        plain = [r.syscall for r in sc.rules if r.action == "allow" and not r.args]
        for index, chunk in enumerate(textwrap.wrap(" ".join(plain), 80)):
            row("" if index else "allow", chunk)
        for rule in sc.rules:
            if rule.action == "allow" and not rule.args:
                continue
            action = rule.action + (f" {_errno_name(rule.errno)}" if rule.errno else "")
            conditions = " and ".join(_format_condition(c) for c in rule.args)
            row(rule.syscall, action + (f" if {conditions}" if conditions else ""))
    limits = plan.limits
    section("limits", "" if limits.rlimits or limits.cgroup else "none")
    for rlimit in limits.rlimits:
        row(f"rlimit {rlimit.name}", f"{_format_limit(rlimit.name, rlimit.soft)} / "
            f"{_format_limit(rlimit.name, rlimit.hard)}")
    if limits.cgroup:
        cg = limits.cgroup
        parts = [f"memory {format_size(cg.memory_max)}" if cg.memory_max is not None else None,
                 f"pids {cg.pids_max}" if cg.pids_max is not None else None,
                 f"cpu {cg.cpu_quota_us}/{cg.cpu_period_us} us" if cg.cpu_quota_us is not None else None]
        row("cgroup", ", ".join(p for p in parts if p) + f" (below {cg.parent!r})")
    section("fds", "" if plan.fds else "none")
    for fd in plan.fds:
        extra = [f"path {fd.path}" if fd.path else "", f"size {format_size(fd.size)}" if fd.size is not None else "",
                 f"mode {fd.mode}" if fd.kind == "file" else "", "required" if fd.required else "optional"]
        row(f"{fd.number} {fd.name}", " ".join([fd.kind, *filter(None, extra)]))
    if plan.sockets:
        section("sockets", "the program binds them itself; ready once it listens"
                if plan.program.ready == "socket" else "the program binds them itself")
        for entry in plan.sockets:
            row(entry.name, f"{entry.path}  (its directory: a private writable bind, sockets only)")
    restart = plan.restart
    if restart.policy == "no":
        section("restart", "no (the program ends, jailer run ends)")
    else:
        checkpoint = [fd.name for fd in plan.fds if fd.kind == "checkpoint"]
        section("restart", f"{restart.policy}, after {restart.delay:g} s doubling to {restart.max_delay:g} s; "
                f"gives up after {restart.limit} restarts within {restart.interval:g} s")
        row("kept", "the sockets jailer listens on" + (f", checkpoint fd '{checkpoint[0]}'" if checkpoint else ""))
    net = plan.network
    section("network", net.mode)
    if net.mode == "veth":
        row("host", f"{net.host_ifname or '(chosen at run time)'} {net.host_address or ''}")
        row("sandbox", f"{net.sandbox_ifname} {net.sandbox_address or ''}")
    section("environment", "" if plan.environment else "empty")
    for name, value in plan.environment:
        row("", f"{name}={value}")
    section("die w/ parent", "yes" if plan.die_with_parent else "no")
    section("best effort", " ".join(sorted(plan.best_effort)) or "none (every layer is required)")
    return "\n".join(lines)


def _errno_name(number):
    import errno

    return errno.errorcode.get(number, str(number))


def _format_condition(condition):
    symbol = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}.get(condition.op)
    if symbol:
        return f"arg{condition.index} {symbol} {condition.value:#x}"
    return f"arg{condition.index} & {condition.mask:#x} == {condition.value:#x}"


def _format_limit(name, value):
    from jailer.profile import SIZE_RLIMITS

    if value == -1:
        return "unlimited"
    return format_size(value) if name in SIZE_RLIMITS else str(value)
