"""Seccomp in real sandboxes: errno rules, kills reported by name, native actions without reporting."""

import pytest

from engine_sandbox import INVOCATIONS, plan_for, run, run_with_status
from jailer.plan import ArgCondition, SeccompPlan, SeccompRule
from jailer.layers.seccomp import decide

PTRACE = "exec python3 -c 'import ctypes; ctypes.CDLL(None).ptrace(0, 0, 0, 0); print(\"survived\")'"


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_errno_rule_returns_that_errno_and_is_reported(invocation):
    seccomp = SeccompPlan(default_action="allow", rules=(SeccompRule("mkdir", "errno", errno=13),))
    result, events = run_with_status(plan_for(invocation, "mkdir /proc/x; echo $?", seccomp=seccomp), invocation=invocation)
    assert result.stdout.strip() == "1"
    assert "Permission denied" in result.stderr   # EACCES, not the EROFS the read-only /proc would give
    assert "jailer: seccomp: the program called mkdir, refused by action 'errno': failed with errno 13" \
        in result.stderr
    assert {"event": "seccomp", "syscall": "mkdir", "action": "errno", "errno": 13} \
        .items() <= next(e for e in events if e["event"] == "seccomp").items()
    assert events[1]["layers"]["seccomp"]["report"] == "user-notify"


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_killed_syscall_is_named_on_stderr_and_in_status(invocation):
    seccomp = SeccompPlan(default_action="allow", rules=(SeccompRule("ptrace", "kill"),))
    result, events = run_with_status(plan_for(invocation, PTRACE, seccomp=seccomp), invocation=invocation)
    assert result.returncode == 128 + 31
    assert "survived" not in result.stdout
    assert "jailer: seccomp: the program called ptrace, refused by action 'kill': sandbox killed" in result.stderr
    assert [e["event"] for e in events] == ["started", "enforced", "ready", "seccomp", "exited"]
    assert events[3]["syscall"] == "ptrace" and events[3]["action"] == "kill"
    assert events[4] == {"event": "exited", "signal": 31}


def test_default_action_applies_to_unlisted_syscalls_and_argument_rules_match():
    # allow-list style: everything the shell needs is allowed by default except uname with a
    # specific (impossible) argument, plus a deny-by-default for one syscall family via rules
    seccomp = SeccompPlan(default_action="allow", rules=(
        SeccompRule("getpriority", "errno", errno=38, args=(ArgCondition(0, "eq", 0),)),))
    script = "exec python3 -c 'import os; print(os.getpriority(os.PRIO_PROCESS, 0))'"
    result, events = run_with_status(plan_for("root", script, seccomp=seccomp))
    assert "Function not implemented" in result.stderr
    seccomp_events = [e for e in events if e["event"] == "seccomp"]
    assert seccomp_events and all(e["syscall"] == "getpriority" for e in seccomp_events)
    other_which = "exec python3 -c 'import os; print(os.getpriority(os.PRIO_PGRP, 0))'"
    result, _ = run_with_status(plan_for("root", other_which, seccomp=seccomp))
    assert result.returncode == 0, result.stderr


def test_without_reporting_actions_are_the_kernels_own():
    seccomp = SeccompPlan(default_action="allow", report=False, rules=(
        SeccompRule("mkdir", "errno", errno=13), SeccompRule("ptrace", "kill")))
    result, events = run_with_status(plan_for("root", "mkdir /proc/x; echo $?; " + PTRACE, seccomp=seccomp))
    assert result.stdout.strip() == "1" and "Permission denied" in result.stderr
    assert result.returncode == 128 + 31
    assert not [e for e in events if e["event"] == "seccomp"]
    assert events[1]["layers"]["seccomp"]["report"] == "no"


def test_decide_picks_the_most_severe_matching_rule_or_the_default():
    seccomp = SeccompPlan(default_action="kill", rules=(
        SeccompRule("ioctl", "allow", args=(ArgCondition(1, "masked_eq", 0x5401, 0xFFFFFFFF),)),
        SeccompRule("ioctl", "errno", errno=25, args=(ArgCondition(1, "ge", 0x5400),)),
        SeccompRule("read"),
    ))
    assert decide(seccomp, "ioctl", [3, 0x5401, 0, 0, 0, 0]) == ("errno", 25)
    assert decide(seccomp, "ioctl", [3, 0x1, 0, 0, 0, 0]) == ("kill", None)
    assert decide(seccomp, "read", [0] * 6) == ("allow", None)
    assert decide(seccomp, "ptrace", [0] * 6) == ("kill", None)


def test_launchers_own_wait_after_loading_is_not_mistaken_for_the_programs():
    # read is refused; the child's one read() between loading the filter and exec is the
    # launcher's handshake: it must be released silently, and only the program's reads count.
    seccomp = SeccompPlan(default_action="allow", rules=(SeccompRule("read", "kill"),))
    result, events = run_with_status(plan_for("root", "true", seccomp=seccomp))
    assert result.returncode == 128 + 31
    kinds = [e["event"] for e in events]
    assert kinds[:3] == ["started", "enforced", "ready"]   # the program was exec'd
    assert events[3]["syscall"] == "read" and events[3]["pid"] == events[0]["pid"]


@pytest.mark.parametrize("report", [True, False])
def test_32_bit_arguments_are_compared_as_the_kernel_reads_them(report):
    # ioctl's request is an unsigned int: TIOCSTI with bit 32 set is TIOCSTI to the kernel
    seccomp = SeccompPlan(default_action="log", report=report, rules=(
        SeccompRule("ioctl", "kill", args=(ArgCondition(1, "eq", 0x5412),)),
        SeccompRule("ioctl", "allow", args=(ArgCondition(1, "ne", 0x5412),))))
    probe = ("exec python3 -c 'import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
             "r = libc.syscall(16, 0, ctypes.c_ulong(int(sys.argv[1], 0)), ctypes.create_string_buffer(64)); "
             "print(r, os.strerror(ctypes.get_errno())); sys.exit(1)' {}")
    high_bits = run(plan_for("root", probe.format("0x100005412"), seccomp=seccomp))
    assert high_bits.returncode == 128 + 31, high_bits.stderr
    other = run(plan_for("root", probe.format("0x5401"), seccomp=seccomp))   # TCGETS: allowed, not a tty
    assert other.returncode in (0, 1), other.stderr   # 1: ENOTTY when stdin is not a terminal
