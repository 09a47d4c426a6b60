"""jailer-monitor, the native process the launcher becomes once its program runs: it
decides exactly as the launcher's policy would, and the program sees no difference."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_sandbox import plan_for, run_with_status
from jailer import monitor
from jailer.layers import seccomp
from jailer.plan import ArgCondition, FdSpec, SeccompPlan, SeccompRule

pytestmark = pytest.mark.skipif(not monitor.available(), reason="jailer-monitor is not built (run ./setup.sh)")

NAMES = seccomp.syscall_names()
SYSCALLS = ("ioctl", "mmap", "openat", "uname")
ACTIONS = ("allow", "log", "errno", "kill_thread", "kill")


def monitor_decides(plan, name, args, stage):
    text = monitor.state(program_pid=1, pidfd=-1, listener=None, notify_fd=None, status_fd=None,
                         rules=monitor.rule_lines(plan, NAMES), stage=stage)
    fd = monitor.state_fd(text)
    try:
        nr = next(nr for nr, known in NAMES.items() if known == name)
        out = subprocess.run([monitor.MONITOR, "--decide", str(fd), str(nr), *map(str, args)], pass_fds=[fd],
                             capture_output=True, text=True, check=True).stdout.split()
    finally:
        os.close(fd)
    return ("continue", None) if out == ["continue"] else ("kill", None) if out == ["kill"] else ("errno", int(out[1]))


conditions = st.builds(
    lambda index, op, value, mask: ArgCondition(index, op, value, mask if op == "masked_eq" else None),
    st.integers(0, 2), st.sampled_from(("eq", "ne", "lt", "le", "gt", "ge", "masked_eq")),
    st.integers(0, 9).map(lambda v: v | (1 << 32 if v > 7 else 0)), st.integers(0, 7))
rules = st.builds(lambda name, action, errno, args: SeccompRule(name, action, errno if action == "errno" else None,
                                                                tuple(args)),
                  st.sampled_from(SYSCALLS), st.sampled_from(ACTIONS), st.sampled_from((None, 13)),
                  st.lists(conditions, max_size=2))
steady_rules = rules.filter(lambda rule: rule.action in ("errno", "kill", "kill_thread"))
argument = st.one_of(st.integers(0, 9), st.integers(0, 9).map(lambda v: v | 1 << 32))


@settings(max_examples=120, deadline=None)
@given(st.lists(rules, max_size=4), st.lists(steady_rules, min_size=1, max_size=3),
       st.sampled_from(("allow", "errno", "kill")), st.sampled_from(SYSCALLS), st.tuples(argument, argument, argument),
       st.sampled_from(seccomp.STAGES))
def test_monitor_answers_as_the_launchers_policy(plain, steady, default, name, args, stage):
    plan = SeccompPlan(default_action=default, rules=tuple(plain), steady=tuple(steady))
    args = (*args, 0, 0, 0)
    assert monitor_decides(plan, name, args, stage) == seccomp.StagedPolicy(plan)._decide(name, args, stage)


NOTIFY = FdSpec(name="notify", kind="notify", number=3)
# STATUS= carries a quote, a backslash, a tab, a byte that is not UTF-8 (octal 377) and a NUL
SCRIPT = ("printf READY=1 >&3; sleep 0.3; printf 'STATUS=serving \"q\" \\\\ \\t\\377\\000!' >&3; "
          "uname >/dev/null; echo uname: $?; sleep 0.1; exit 7")


@pytest.mark.parametrize("use_monitor", [True, False], ids=["monitor", "python"])
def test_the_program_sees_no_difference(use_monitor):
    # pid 1 is the program and this process's child: the launcher hands over once it runs,
    # and the monitor sees READY=1 and takes the steady stage
    plan = plan_for("root", SCRIPT, fds=(NOTIFY,))
    plan = replace(plan, program=replace(plan.program, ready="notify"),
                   namespaces=replace(plan.namespaces, pid1="program"),
                   seccomp=SeccompPlan(default_action="allow", steady=(SeccompRule("uname", "errno", errno=13),)))
    result, events = run_with_status(plan, env=None if use_monitor else {"JAILER_MONITOR": "off"})
    assert result.returncode == 7, result.stderr
    assert result.stdout == "uname: 1\n"   # the shell's uname failed: EACCES
    assert [e["event"] for e in events] == ["started", "enforced", "ready", "stage", "status", "seccomp", "exited"]
    assert events[4] == {"event": "status", "text": 'serving "q" \\ \t\ufffd\x00!'}
    assert {k: events[5][k] for k in ("syscall", "action", "errno", "stage")} == {
        "syscall": "uname", "action": "errno", "errno": 13, "stage": "steady"}
    assert events[6] == {"event": "exited", "code": 7}
    assert "jailer: seccomp: the program called uname after it was ready, refused by action 'errno': " \
           "failed with errno 13" in result.stderr


def test_a_monitor_older_than_its_source_is_not_used(tmp_path, monkeypatch):
    binary, source = tmp_path / "jailer-monitor", tmp_path / "monitor.c"
    source.write_text("/* newer */")
    binary.write_bytes(b"")
    binary.chmod(0o755)
    monkeypatch.setattr(monitor, "MONITOR", str(binary))
    monkeypatch.setattr(monitor, "SOURCE", str(source))
    os.utime(source, (2_000_000_000, 2_000_000_000))
    assert not monitor.built()
    os.utime(binary, (2_000_000_001, 2_000_000_001))
    assert monitor.built() and monitor.available()
    monkeypatch.setenv("JAILER_MONITOR", "off")
    assert not monitor.available()
    binary.chmod(0o644)
    assert not monitor.built()


EMBEDDED = """
import json, os, sys
from jailer.launch import launcher
from jailer.plan import Plan

plan = Plan.from_dict(json.load(open(sys.argv[1])))
code = launcher.run(plan, launcher.Options())
print(json.dumps({"code": code, "exe": os.readlink("/proc/self/exe")}))
"""


def test_a_program_embedding_the_launcher_keeps_its_own_process(tmp_path):
    # only `jailer run` hands its process over; launcher.run() in a daemon returns as before
    plan = plan_for("root", "printf READY=1 >&3; sleep 0.3; exit 7", fds=(NOTIFY,))
    plan = replace(plan, program=replace(plan.program, ready="notify"),
                   namespaces=replace(plan.namespaces, pid1="program"))
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan.to_dict()))
    result = subprocess.run([sys.executable, "-c", EMBEDDED, str(plan_file)], capture_output=True, text=True,
                            timeout=30, cwd=os.path.dirname(os.path.dirname(__file__)))
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["code"] == 7 and "jailer-monitor" not in outcome["exe"], result.stderr
