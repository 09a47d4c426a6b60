"""Seccomp: compile Plan.seccomp to classic BPF, load it last, and name refused syscalls.

Compiling uses pyseccomp (libseccomp) and happens in the launcher, never on the hot path
when the profile's cache is warm: the exported BPF bytes are cached per profile. Loading
is one seccomp(2) call in the process about to exec.

Reporting (SeccompPlan.report): the deny actions (kill, kill_thread, errno, including the
default action) compile to SECCOMP_RET_USER_NOTIF instead. The filter's listener fd goes
to the launcher, which takes it from the child with pidfd_getfd (the child cannot send it:
once the filter is loaded, sendmsg may itself be refused and would wait for a listener
nobody holds yet; the child only waits in one read() for the launcher's go-ahead, which,
if the filter refuses read, is the first notification and is answered silently). The
launcher then receives each notification, names the syscall, re-evaluates the
plan's rules for the syscall's arguments, and answers: errno rules fail the call with
their errno; kill and kill_thread kill the whole sandbox (its status then reads SIGSYS,
as the kernel's own action would). The launcher never answers CONTINUE, checks that a
notification is still valid before acting on its pid, and if the launcher disappears the
kernel fails every pending and future notified syscall (ENOSYS). trap and log stay
native actions. Without reporting, actions map one to one onto the kernel's.
"""

from __future__ import annotations

import os

from jailer.errors import LayerError

DENY_ACTIONS = ("kill", "kill_thread", "errno")
SEVERITY = {"kill": 5, "kill_thread": 4, "trap": 3, "errno": 2, "log": 1, "allow": 0}
EPERM = 1
SIGSYS = 31


def _action_value(pyseccomp, action, errno, report):
    if report and action in DENY_ACTIONS:
        return pyseccomp.NOTIFY
    if action == "errno":
        return pyseccomp.ERRNO(EPERM if errno is None else errno)
    return {"kill": pyseccomp.KILL_PROCESS, "kill_thread": pyseccomp.KILL_THREAD, "trap": pyseccomp.TRAP,
            "log": pyseccomp.LOG, "allow": pyseccomp.ALLOW}[action]


def _op_value(pyseccomp, op):
    return {"eq": pyseccomp.EQ, "ne": pyseccomp.NE, "lt": pyseccomp.LT, "le": pyseccomp.LE,
            "gt": pyseccomp.GT, "ge": pyseccomp.GE, "masked_eq": pyseccomp.MASKED_EQ}[op]


def compile_bpf(seccomp) -> bytes:
    """The plan's filter as classic BPF for this machine's native ABI (other ABIs are killed)."""
    import pyseccomp

    default = _action_value(pyseccomp, seccomp.default_action, seccomp.default_errno, seccomp.report)
    syscall_filter = pyseccomp.SyscallFilter(default)
    for rule in seccomp.rules:
        action = _action_value(pyseccomp, rule.action, rule.errno, seccomp.report)
        if action == default:
            continue
        if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, rule.syscall) < 0:
            raise LayerError("seccomp", f"unknown syscall '{rule.syscall}' in a rule",
                             "check the spelling (names as in syscalls(2))")
        args = [pyseccomp.Arg(a.index, _op_value(pyseccomp, a.op), a.mask, a.value) if a.op == "masked_eq"
                else pyseccomp.Arg(a.index, _op_value(pyseccomp, a.op), a.value) for a in rule.args]
        try:
            syscall_filter.add_rule(action, rule.syscall, *args)
        except OSError as exc:
            raise LayerError("seccomp", f"libseccomp refused the rule for {rule.syscall}: {exc.strerror}",
                             "rules for one syscall must not contradict each other") from None
    memfd = os.memfd_create("jailer-bpf", os.MFD_CLOEXEC)
    with open(memfd, "w+b") as buffer:
        syscall_filter.export_bpf(buffer)
        buffer.seek(0)
        return buffer.read()


def syscall_names() -> dict[int, str]:
    """nr -> name for the native ABI, to name the syscalls a notification reports."""
    import pyseccomp

    names = {}
    for nr in range(1024):
        try:
            names[nr] = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, nr).decode()
        except ValueError:
            continue
    return names


def load(bpf: bytes, report: bool) -> int:
    """Install the filter on this process; returns the listener fd when reporting (else -1)."""
    from jailer import syscalls

    listener = syscalls.seccomp_load(bpf, new_listener=report)
    return listener if report else -1


def _condition_holds(condition, value: int) -> bool:
    target = condition.value
    if condition.op == "masked_eq":
        return value & condition.mask == target
    return {"eq": value == target, "ne": value != target, "lt": value < target, "le": value <= target,
            "gt": value > target, "ge": value >= target}[condition.op]


def decide(seccomp, name: str, args) -> tuple[str, int | None]:
    """(action, errno) the plan gives this syscall with these arguments: the most severe
    of the matching rules, or the default action when none matches."""
    matching = [rule for rule in seccomp.rules if rule.syscall == name
                and all(_condition_holds(c, args[c.index]) for c in rule.args)]
    if not matching:
        return seccomp.default_action, seccomp.default_errno
    rule = max(matching, key=lambda r: SEVERITY[r.action])
    return rule.action, rule.errno


class Notifications:
    """The launcher's side of the listener: answer each notified syscall and describe it."""

    def __init__(self, listener: int, seccomp, names: dict[int, str], kill_sandbox):
        self.listener = listener
        self.seccomp = seccomp
        self.names = names
        self.kill_sandbox = kill_sandbox   # called with the notifying pid when a kill action fires
        self.killed = False

    def receive(self):
        from jailer import syscalls

        return syscalls.seccomp_notif_recv(self.listener)

    def answer(self, notif) -> dict:
        """Answer one notification; returns the status event fields for it."""
        from jailer import syscalls

        nr = notif.data.nr
        name = self.names.get(nr, f"syscall {nr}")
        action, errno = decide(self.seccomp, name, list(notif.data.args))
        if action not in DENY_ACTIONS:
            action, errno = "errno", EPERM   # the filter and the plan disagree: refuse, never continue
        if action == "errno":
            errno = EPERM if errno is None else errno
            try:
                syscalls.seccomp_notif_fail(self.listener, notif.id, errno)
            except OSError:
                pass   # the caller was interrupted or killed meanwhile: nothing left to answer
            return {"syscall": name, "nr": nr, "action": "errno", "errno": errno, "pid": notif.pid}
        if syscalls.seccomp_notif_id_valid(self.listener, notif.id):
            self.killed = True
            self.kill_sandbox(notif.pid)
        try:
            syscalls.seccomp_notif_fail(self.listener, notif.id, EPERM)
        except OSError:
            pass
        return {"syscall": name, "nr": nr, "action": action, "pid": notif.pid}
