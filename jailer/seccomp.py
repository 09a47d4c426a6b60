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
LOW32 = 0xFFFFFFFF
MAX_EXPANDED_RULES = 4096
# Arguments the kernel declares int/unsigned int: it reads only their low 32 bits, so a rule
# must compare only those (else ioctl(fd, TIOCSTI | 1 << 32) slips past "kill if request ==
# TIOCSTI", CVE-2019-10063). Indices count from 0; everything else is compared at 64 bits.
KERNEL_32BIT_ARGS = {
    "ioctl": (0, 1), "fcntl": (0, 1), "socket": (0, 1, 2), "socketpair": (0, 1, 2),
    "setsockopt": (0, 1, 2), "getsockopt": (0, 1, 2), "prctl": (0,), "personality": (0,),
    "kill": (0, 1), "tkill": (0, 1), "tgkill": (0, 1, 2), "open": (1, 2), "openat": (0, 2, 3),
    "setns": (0, 1), "madvise": (2,), "bpf": (0,), "keyctl": (0,), "perf_event_open": (1, 2, 3),
    "read": (0,), "write": (0,), "close": (0,), "dup3": (0, 1, 2), "accept4": (0, 3),
    "sendto": (0, 3), "recvfrom": (0, 3), "sendmsg": (0, 2), "recvmsg": (0, 2), "seccomp": (0, 1),
    "memfd_create": (1,), "eventfd2": (0, 1), "setuid": (0,), "setgid": (0,),
    "setresuid": (0, 1, 2), "setresgid": (0, 1, 2), "io_uring_setup": (0,), "clone3": (1,),
}
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
        for conditions in _expanded_conditions(rule):
            args = [pyseccomp.Arg(index, _op_value(pyseccomp, op), *operands) for index, op, operands in conditions]
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


def _expanded_conditions(rule) -> list[list[tuple]]:
    """The rule's conditions as libseccomp (index, op, operands) lists, one list per rule to add.

    A 64-bit argument keeps its condition. A 32-bit one becomes masked_eq tests on the low
    32 bits: eq and masked_eq stay one test; ne, lt, le, gt and ge become the alternatives
    (one rule each) whose union is exactly the condition on the low 32 bits."""
    import itertools

    choices = []
    for condition in rule.args:
        if condition.index not in KERNEL_32BIT_ARGS.get(rule.syscall, ()):
            operands = (condition.mask, condition.value) if condition.op == "masked_eq" else (condition.value,)
            choices.append([(condition.index, condition.op, operands)])
            continue
        choices.append([None if mask is None else (condition.index, "masked_eq", (mask, value))
                        for mask, value in _low32_alternatives(condition)])
    count = 1
    for alternatives in choices:
        count *= len(alternatives)
    if count > MAX_EXPANDED_RULES:
        raise LayerError("seccomp", f"the rule for {rule.syscall} needs {count} filter rules at the kernel's "
                         "32-bit argument width", "split it, or use eq/masked_eq on 32-bit arguments")
    return [[c for c in combination if c is not None] for combination in itertools.product(*choices)]


def _low32_alternatives(condition) -> list[tuple]:
    """(mask, value) pairs, any of which matching means the condition holds on the low 32 bits;
    (None, None) means it always holds, an empty list that it never does."""
    value = condition.value & LOW32
    op = condition.op
    if op == "eq":
        return [(LOW32, value)]
    if op == "masked_eq":
        return [(condition.mask & LOW32, value)]
    if op == "ne":   # some bit differs
        return [(1 << bit, ~value & (1 << bit)) for bit in range(32)]
    if op == "le":
        op, value = ("lt", value + 1) if value < LOW32 else ("always", value)
    if op == "ge":
        op, value = ("gt", value - 1) if value > 0 else ("always", value)
    if op == "always":
        return [(None, None)]
    alternatives = []
    for bit in range(32):
        higher = LOW32 & ~((1 << (bit + 1)) - 1)
        mask = higher | (1 << bit)
        if op == "lt" and value & (1 << bit):     # equal above `bit`, 0 where value has 1
            alternatives.append((mask, value & higher))
        elif op == "gt" and not value & (1 << bit):   # equal above `bit`, 1 where value has 0
            alternatives.append((mask, (value & higher) | (1 << bit)))
    return alternatives


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


def _condition_holds(syscall: str, condition, value: int) -> bool:
    """The condition as the compiled filter applies it (32-bit arguments on their low 32 bits)."""
    target = condition.value
    mask = condition.mask
    if condition.index in KERNEL_32BIT_ARGS.get(syscall, ()):
        value, target, mask = value & LOW32, target & LOW32, (mask or 0) & LOW32
    if condition.op == "masked_eq":
        return value & mask == target
    return {"eq": value == target, "ne": value != target, "lt": value < target, "le": value <= target,
            "gt": value > target, "ge": value >= target}[condition.op]


def decide(seccomp, name: str, args) -> tuple[str, int | None]:
    """(action, errno) the plan gives this syscall with these arguments: the most severe
    of the matching rules, or the default action when none matches."""
    matching = [rule for rule in seccomp.rules if rule.syscall == name
                and all(_condition_holds(name, c, args[c.index]) for c in rule.args)]
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
