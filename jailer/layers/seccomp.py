"""Seccomp: compile Plan.seccomp to classic BPF, load it last, name refused syscalls, stage rules.

Compiling uses pyseccomp (libseccomp) and happens in the launcher, never on the hot path
when the profile's cache is warm: the exported BPF bytes are cached per profile. Loading
is one seccomp(2) call in the process about to exec.

Notification (SECCOMP_RET_USER_NOTIF). Three things route a syscall to the launcher
instead of letting the kernel act alone:
  - reporting (SeccompPlan.report): the deny actions (kill, kill_thread, errno, including
    the default action) notify, so the launcher can name the refused syscall;
  - staging (SeccompPlan.steady): every syscall a steady rule names notifies, whatever
    its arguments, because the kernel's filter cannot change once loaded (a second,
    stricter filter would have to be installed by the program itself);
  - learning (compile_bpf(..., route_all_to_notify=True)): every syscall notifies.
The filter's listener fd goes to the launcher, which takes it from the child with
pidfd_getfd (the child cannot send it: once the filter is loaded, sendmsg may itself be
refused and would wait for a listener nobody holds yet; the child only waits in one
read() for the launcher's go-ahead, which, if the filter notifies read, is the first
notification and is answered silently). The launcher then receives each notification
and asks its decision policy (NotificationPolicy: decide(name, nr, args, stage) ->
(action, errno)) what to do: "errno" fails the call, "kill" kills the whole sandbox
(its status then reads SIGSYS, as the kernel's own action would), "continue" lets the
syscall run (SECCOMP_USER_NOTIF_FLAG_CONTINUE).

Why CONTINUE is safe here. seccomp_unotify(2) warns that a supervisor must not base a
security decision on memory the caller can change between the check and the syscall
(time-of-check/time-of-use). jailer's decisions read only the syscall number and the
six argument registers copied into the notification, the same values a kernel filter
compares; no pointer is ever dereferenced (a path, a sockaddr), so there is nothing the
program can swap after the decision, and a CONTINUE'd call runs with exactly the values
decided on. CONTINUE is answered only where the plan allows the syscall with those
arguments (the "setup" stage before the program is ready, or a steady syscall whose
steady rules do not match); refusals never depend on it. The launcher checks that a
notification is still valid before killing on its behalf, and if the launcher
disappears the kernel fails every pending and future notified syscall (ENOSYS).
trap and log stay native actions. Without any notification, actions map one to one onto
the kernel's.

In-process (jailer.lockdown) there is no launcher to answer notifications: the process
loads filters that notify nothing, for the stage it chooses (compile_stage_filters).
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
SEVERITY = {"kill": 5, "kill_thread": 4, "trap": 3, "errno": 2, "log": 1, "allow": 0}   # also jailer-monitor's numbers
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


def needs_listener(seccomp, route_all_to_notify: bool = False) -> bool:
    """Whether the filter notifies (the launcher then takes its listener)."""
    return seccomp.enabled and bool(seccomp.report or seccomp.steady or route_all_to_notify)


def compile_bpf(seccomp, route_all_to_notify: bool = False) -> bytes:
    """The plan's filter as classic BPF for this machine's native ABI (other ABIs are killed).

    A syscall named by a steady rule notifies unconditionally (its plain rules are then
    applied by the launcher's policy, see StagedPolicy). route_all_to_notify=True makes
    every syscall notify (for learning a profile with a recording policy)."""
    import pyseccomp

    if route_all_to_notify:
        return _export(pyseccomp.SyscallFilter(pyseccomp.NOTIFY))
    default = _action_value(pyseccomp, seccomp.default_action, seccomp.default_errno, seccomp.report)
    syscall_filter = pyseccomp.SyscallFilter(default)

    def add(action, rule):
        if action == default:
            return
        _check_known(pyseccomp, rule.syscall)
        for conditions in _expanded_conditions(rule):
            args = [pyseccomp.Arg(index, _op_value(pyseccomp, op), *operands) for index, op, operands in conditions]
            try:
                syscall_filter.add_rule(action, rule.syscall, *args)
            except OSError as exc:
                raise LayerError("seccomp", f"libseccomp refused the rule for {rule.syscall}: {exc.strerror}",
                                 "rules for one syscall must not contradict each other") from None

    staged = steady_syscalls(seccomp)
    routed_whole = set()
    for name in sorted(staged):
        _check_known(pyseccomp, name)
        carved = _carve_staged(name, seccomp)
        if carved is None:
            routed_whole.add(name)
            if default != pyseccomp.NOTIFY:
                syscall_filter.add_rule(pyseccomp.NOTIFY, name)
            continue
        notified, kept = carved
        for rule in notified:
            add(pyseccomp.NOTIFY, rule)
        for rule in kept:
            add(_action_value(pyseccomp, rule.action, rule.errno, seccomp.report), rule)
    for rule in seccomp.rules:
        if rule.syscall not in staged:
            add(_action_value(pyseccomp, rule.action, rule.errno, seccomp.report), rule)
    return _export(syscall_filter)


def compile_stage_filters(seccomp, stage: str) -> tuple[bytes, ...]:
    """Filters, in loading order, that give one stage of the plan with no listener, for a
    process locking itself down: "setup" is the plain rules; "steady" adds, loaded first,
    a filter of the steady rules alone (everything else allowed). The kernel runs every
    filter and takes the most severe action, and of equally severe ones that of the filter
    loaded last: the plain rules win a tie, exactly StagedPolicy's rule, so the pair acts
    as the launcher would answer, without notifying anything."""
    import dataclasses

    plain = compile_bpf(dataclasses.replace(seccomp, report=False, steady=()))
    if stage == "setup" or not seccomp.steady:
        return (plain,)
    if "seccomp" in steady_syscalls(seccomp):
        raise LayerError("seccomp", "a steady rule names seccomp, which loading the profile's own filter after the "
                         "steady one needs", "refuse seccomp in the plain rules instead")
    steady = compile_bpf(dataclasses.replace(seccomp, default_action="allow", default_errno=None,
                                             rules=seccomp.steady, steady=(), report=False))
    return steady, plain


def _carve_staged(name, seccomp):
    """(rules to notify, plain rules to keep in the kernel) for a staged syscall whose steady
    rules all have argument conditions, so that only the calls a steady rule could change
    reach the launcher (a Python start-up maps memory ~60 times; only a few mappings are
    executable); None when that cannot be proven, and every call of it must notify.

    libseccomp cannot be left to order overlapping rules (an unconditional allow silently
    swallows a conditional notify for the same syscall), so every plain rule kept must be
    disjoint from every steady rule: provably so (some argument both test can never match
    both), or made so by adding the complement of a steady rule's single-bit test; a plain
    rule inside a steady rule is left to the launcher, which applies it before ready."""
    import dataclasses

    from jailer.plan import ArgCondition   # compiling only: jailer.plan is slow to import on a warm start

    steady = [rule for rule in seccomp.steady if rule.syscall == name]
    steady_regions = [_region(rule) for rule in steady]
    if any(not region for region in steady_regions):
        return None
    kept = []
    for rule in seccomp.rules:
        if rule.syscall != name:
            continue
        region = _region(rule)
        if region is None:
            return None
        for steady_region in steady_regions:
            if _disjoint(region, steady_region):
                continue
            if _within(region, steady_region):   # all of the rule's calls notify
                region = None
                break
            complement = _complement(steady_region)
            if complement is None:
                return None
            index, (mask, value) = complement
            held_mask, held_value = region.get(index, (0, 0))
            if held_mask & mask:   # fixed to the steady value: all of the rule's calls notify
                region = None
                break
            region[index] = (held_mask | mask, held_value | value)
        if region is None:
            continue
        if not all(_disjoint(region, steady_region) for steady_region in steady_regions):
            return None
        kept.append(dataclasses.replace(rule, args=tuple(ArgCondition(index, "masked_eq", value, mask)
                                                         for index, (mask, value) in sorted(region.items()))))
    return steady, kept


def _region(rule):
    """{argument index: (mask, value)} the rule's conditions require, at the width the kernel
    compares; None when a condition is not eq or masked_eq ({} for an unconditional rule)."""
    region = {}
    for condition in rule.args:
        if condition.op not in ("eq", "masked_eq") or condition.index in region:
            return None
        width = LOW32 if condition.index in KERNEL_32BIT_ARGS.get(rule.syscall, ()) else (1 << 64) - 1
        mask = width if condition.op == "eq" else condition.mask & width
        if condition.value & width & ~mask:
            return None   # a masked_eq that can never match: not worth reasoning about
        region[condition.index] = (mask, condition.value & mask)
    return region


def _disjoint(a, b) -> bool:
    return any((a[i][1] ^ b[i][1]) & a[i][0] & b[i][0] for i in a.keys() & b.keys())


def _within(a, b) -> bool:
    """Every call region a matches, region b matches too."""
    return all(i in a and a[i][0] & b[i][0] == b[i][0] and a[i][1] & b[i][0] == b[i][1] for i in b)


def _complement(region):
    """(index, (mask, value)) matching exactly the calls outside a one-bit, one-argument region."""
    if len(region) != 1:
        return None
    (index, (mask, value)), = region.items()
    if mask == 0 or mask & (mask - 1):
        return None
    return index, (mask, value ^ mask)


def steady_syscalls(seccomp) -> set[str]:
    return {rule.syscall for rule in seccomp.steady}


def _check_known(pyseccomp, name):
    if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) < 0:
        raise LayerError("seccomp", f"unknown syscall '{name}' in a rule", "check the spelling (names as in syscalls(2))")


def _export(syscall_filter) -> bytes:
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
    from jailer.layers import syscalls

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
    """(action, errno) the plan's plain rules give this syscall with these arguments: the most
    severe of the matching rules, or the default action when none matches."""
    rule = _most_severe(seccomp.rules, name, args)
    if rule is None:
        return seccomp.default_action, seccomp.default_errno
    return rule.action, rule.errno


def _most_severe(rules, name, args):
    matching = [rule for rule in rules if rule.syscall == name
                and all(_condition_holds(name, c, args[c.index]) for c in rule.args)]
    return max(matching, key=lambda r: SEVERITY[r.action], default=None)


STAGES = ("setup", "steady")
_ANSWERS_KEPT = 4096
POLICY_ACTIONS = ("continue", "errno", "kill")


class StagedPolicy:
    """The default NotificationPolicy: the plan's rules, plus its steady rules once the
    program is ready (the more severe action wins, so steady rules only take away).

    decide(name, nr, args, stage) -> (action, errno): name is the syscall's name (or
    "syscall N"), nr its number, args its six argument registers as ints, stage "setup"
    or "steady"; action is one of POLICY_ACTIONS, errno an int for "errno" (else None).
    "continue" is only answered for syscalls routed to the launcher while the plan allows
    them (steady syscalls, or everything when the filter routes all); any other allowed
    syscall reaching the launcher means the filter and the plan disagree: it is refused."""

    def __init__(self, seccomp, route_all_to_notify: bool = False):
        self.seccomp = seccomp
        self.continuable = steady_syscalls(seccomp)
        self.route_all = route_all_to_notify
        # Answers depend only on the stage, the syscall and the arguments some rule looks at:
        # remembered per such key, since a start-up repeats the same few calls hundreds of times.
        self.examined = {}
        for rule in (*seccomp.rules, *seccomp.steady):
            self.examined.setdefault(rule.syscall, set()).update(c.index for c in rule.args)
        self.examined = {name: tuple(sorted(indexes)) for name, indexes in self.examined.items()}
        self.answers = {}

    def decide(self, name: str, nr: int, args, stage: str) -> tuple[str, int | None]:
        key = (stage, name, *(args[i] for i in self.examined.get(name, ())))
        answer = self.answers.get(key)
        if answer is None:
            if len(self.answers) >= _ANSWERS_KEPT:
                self.answers.clear()   # a program cycling through argument values gains nothing
            answer = self.answers[key] = self._decide(name, args, stage)
        return answer

    def _decide(self, name: str, args, stage: str) -> tuple[str, int | None]:
        action, errno = decide(self.seccomp, name, args)
        if stage == "steady":
            steady = _most_severe(self.seccomp.steady, name, args)
            if steady is not None and SEVERITY[steady.action] > SEVERITY[action]:
                action, errno = steady.action, steady.errno
        if action in ("allow", "log"):
            if self.route_all or name in self.continuable:
                return "continue", None
            return "errno", EPERM
        if action == "errno":
            return "errno", EPERM if errno is None else errno
        return "kill", None   # kill, kill_thread, and trap (its SIGSYS cannot be raised from outside)


class Notifications:
    """The launcher's side of the listener: answer each notified syscall as the policy says."""

    def __init__(self, listener: int, policy, names: dict[int, str], kill_sandbox):
        self.listener = listener
        self.policy = policy
        self.names = names
        self.kill_sandbox = kill_sandbox   # called with the notifying pid when a kill action fires
        self.killed = False

    def receive(self):
        from jailer.layers import syscalls

        return syscalls.seccomp_notif_recv(self.listener)

    def answer(self, notif, stage: str) -> dict | None:
        """Answer one notification; returns the status event fields for a refusal (None when continued)."""
        from jailer.layers import syscalls

        nr = notif.nr
        name = self.names.get(nr, f"syscall {nr}")
        action, errno = self.policy.decide(name, nr, notif.args, stage)
        if action == "continue":
            try:
                syscalls.seccomp_notif_continue(self.listener, notif.id)
            except OSError:
                pass   # the caller was interrupted or killed meanwhile: nothing left to answer
            return None
        if action == "errno":
            errno = EPERM if errno is None else errno
            try:
                syscalls.seccomp_notif_fail(self.listener, notif.id, errno)
            except OSError:
                pass
            return {"syscall": name, "nr": nr, "action": "errno", "errno": errno, "pid": notif.pid, "stage": stage}
        if action != "kill":
            raise ValueError(f"notification policy answered {action!r}, expected one of {POLICY_ACTIONS}")
        if syscalls.seccomp_notif_id_valid(self.listener, notif.id):
            self.killed = True
            self.kill_sandbox(notif.pid)
        try:
            syscalls.seccomp_notif_fail(self.listener, notif.id, EPERM)
        except OSError:
            pass
        return {"syscall": name, "nr": nr, "action": "kill", "pid": notif.pid, "stage": stage}
