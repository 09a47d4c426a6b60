"""Handing a running sandbox over to jailer-monitor (jailer/monitor.c).

Once the program has exec'd, all the launcher still does is answer seccomp
notifications, watch the notify socket for READY=1 and STATUS=, forward signals, and clean
up when the program ends. A Python process doing that stays ~8 MiB resident beside every
device and takes ~50 us per notified syscall (a Python program's start-up notifies a
hundred or more openat calls when the steady stage denies openat); the native monitor
does the same in 160 kB (900 kB against glibc: setup.py) and a few us. The launcher
execs it (at once when the program starts up under a notifying filter, else after
launcher.HAND_OVER_AFTER) in its own process, so the pid a
service manager or --pidfile knows stays right, the program stays its child and the
program's parent-death signal does not fire. The state goes over in a memfd (format in
monitor.c); signals are blocked across the exec, so one that arrives meanwhile waits for
the monitor instead of killing the launcher.

Only `jailer run` hands its process over (launcher.Options.hand_over); a program that
embeds the launcher keeps its own, with the Python launcher in it.

setup.sh builds the monitor next to this file. Without it, or with JAILER_MONITOR=off in
the environment, the Python launcher stays resident and does the same work.
"""

from __future__ import annotations

import os

MONITOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jailer-monitor")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "monitor.c")


def available() -> bool:
    return os.environ.get("JAILER_MONITOR", "") != "off" and built()


def built() -> bool:
    """Built and not older than its source (a stale monitor would answer with old rules)."""
    try:
        binary = os.stat(MONITOR)
        if not os.access(MONITOR, os.X_OK):
            return False
        return not os.path.exists(SOURCE) or binary.st_mtime >= os.stat(SOURCE).st_mtime
    except OSError:
        return False


def state(*, program_pid, pidfd, listener, notify_fd, status_fd, cgroup_dirs=(), made=(), rules=(),
          reported=(), stage="steady", guard=False) -> str:
    """The monitor's state file. made: what to remove at the end (jailer.host.paths.Made,
    jailer.host.sockets.ProgramSocket; their descriptors must be inherited); rules: rule_lines()
    of the plan's filter; reported the (syscall, action) refusals already told on stderr; stage
    "setup" until the program is ready; guard: a signal before ready kills the sandbox (its
    program is a pid 1 that may have no handler yet)."""
    from jailer.layers.seccomp import SEVERITY   # the monitor's severities are these numbers

    def fd(number):
        return -1 if number is None else number

    lines = [f"pid {program_pid}", f"pidfd {pidfd}", f"listener {fd(listener)}", f"notify {fd(notify_fd)}",
             f"status {fd(status_fd)}", f"stage {stage}", f"guard {int(guard)}"]
    lines += [f"cgroup {directory}" for directory in cgroup_dirs]
    lines += [line for entry in made for line in entry.monitor_lines()]
    lines += rules
    lines += [f"reported {SEVERITY[action]} {name}" for name, action in sorted(reported)]
    return "\n".join(lines) + "\n"


def rule_lines(seccomp, names) -> list[str]:
    """The part of the state that only the plan decides: the syscall names, the filter's
    rules and which of them are staged (seccomp is the plan's SeccompPlan or its cached view,
    names {nr: name}). The launcher renders it before the program starts (it is most of the
    state)."""
    from jailer.layers.seccomp import KERNEL_32BIT_ARGS, SEVERITY

    lines = [f"staging {int(bool(seccomp is not None and seccomp.steady))}"]
    if seccomp is None or not names:
        return lines
    numbers = {name: nr for nr, name in names.items()}
    lines += [f"name {nr} {name}" for nr, name in sorted(names.items())]
    errno = -1 if seccomp.default_errno is None else seccomp.default_errno
    lines.append(f"default {SEVERITY[seccomp.default_action]} {errno}")
    for kind, rules in (("plain", seccomp.rules), ("steady", seccomp.steady)):
        for rule in rules:
            if rule.syscall not in numbers:
                continue   # not on this architecture: never notified
            conditions = "".join(
                f" {c.index} {c.op} {c.value} {c.mask or 0} {int(c.index in KERNEL_32BIT_ARGS.get(rule.syscall, ()))}"
                for c in rule.args)
            errno = -1 if rule.errno is None else rule.errno
            lines.append(f"rule {kind} {numbers[rule.syscall]} {SEVERITY[rule.action]} {errno} "
                         f"{len(rule.args)}{conditions}")
    lines += [f"staged {numbers[name]}" for name in sorted({r.syscall for r in seccomp.steady}) if name in numbers]
    return lines


def state_fd(text: str) -> int:
    fd = os.memfd_create("jailer-monitor-state", 0)
    os.write(fd, text.encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def exec_monitor(text: str, inherited) -> OSError:
    """Replace this process with the monitor; returns only with the exec's error."""
    fd = state_fd(text)
    for number in inherited:
        if number is not None and number >= 0:
            os.set_inheritable(number, True)
    try:
        os.execv(MONITOR, [MONITOR, str(fd)])
    except OSError as exc:
        os.close(fd)
        return exc
