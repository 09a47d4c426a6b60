"""Readiness (exec / notify fd), the ready and stage status events, sd_notify to a real
NOTIFY_SOCKET, and the staged seccomp policy (steady rules that apply once ready)."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import pytest

from engine_sandbox import plan_for, run, run_with_status
from jailer.plan import ArgCondition, FdSpec, ProgramPlan, SeccompPlan, SeccompRule

NOTIFY = FdSpec(name="notify", kind="notify", number=3)
CLONE_NEWUSER = 0x10000000
SIGSYS = 31


def notify_plan(script, seccomp=None, **fields):
    plan = plan_for("root", script, fds=(NOTIFY,), **fields)
    plan = replace(plan, program=replace(plan.program, ready="notify"))
    return replace(plan, seccomp=seccomp) if seccomp else plan


def steady(*rules, default="allow", report=True):
    return SeccompPlan(default_action=default, rules=(), steady=tuple(rules), report=report)


def kinds(events):
    return [e["event"] for e in events]


def test_exec_readiness_is_reported_right_after_the_start_and_told_to_notify_socket(tmp_path):
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(address)
        manager.settimeout(10)
        with tempfile.TemporaryFile("w+") as status:
            popen = run(plan_for("root", "exit 0"), "--status-fd", str(status.fileno()), pass_fds=[status.fileno()],
                        env={"NOTIFY_SOCKET": address}, wait=False)
            launcher_pid = popen.pid
            assert popen.wait(timeout=30) == 0
            message = manager.recv(4096).decode()
            status.seek(0)
            events = [__import__("json").loads(line) for line in status.read().splitlines()]
    assert message == f"READY=1\nMAINPID={launcher_pid}"   # the launcher is the process a manager supervises
    assert kinds(events) == ["started", "enforced", "ready", "exited"]
    assert events[2] == {"event": "ready", "pid": events[0]["pid"]}


def test_notify_readiness_waits_for_ready_1_and_passes_status_on():
    script = 'test "$JAILER_NOTIFY_FD" = 3 || exit 9; sleep 0.2; printf "STATUS=warming up\\nREADY=1" >&3; exit 0'
    result, events = run_with_status(notify_plan(script))
    assert result.returncode == 0, result.stderr
    assert kinds(events) == ["started", "enforced", "status", "ready", "exited"]
    assert events[2] == {"event": "status", "text": "warming up"}
    assert events[3]["pid"] == events[0]["pid"]


def test_a_program_that_never_reports_ready_is_never_ready():
    result, events = run_with_status(notify_plan("exit 3"))
    assert result.returncode == 3
    assert kinds(events) == ["started", "enforced", "exited"]


def test_steady_rule_allows_before_ready_and_refuses_after_it_with_its_errno():
    # mkdir works while setting up, READY=1 is immediately followed by a refused mkdir: the
    # launcher counts the datagram before answering the next notification, whatever the timing.
    script = 'mkdir /tmp/before || exit 7; printf READY=1 >&3; mkdir /tmp/after; echo "after: $?"'
    plan = notify_plan(script, steady(SeccompRule("mkdir", "errno", errno=13)),
                       filesystem=replace(plan_for("root", "").filesystem,
                                          tmpfs=(__import__("jailer.plan").plan.Tmpfs("/tmp", 1 << 20),)))
    result, events = run_with_status(plan)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "after: 1"
    assert "Permission denied" in result.stderr
    assert "jailer: seccomp: the program called mkdir after it was ready, refused by action 'errno'" in result.stderr
    assert kinds(events) == ["started", "enforced", "ready", "stage", "seccomp", "exited"]
    assert events[3] == {"event": "stage", "stage": "steady"}
    assert events[4]["syscall"] == "mkdir" and events[4]["stage"] == "steady" and events[4]["errno"] == 13


@pytest.mark.parametrize("report", [True, False])
def test_steady_kill_is_named_and_ends_the_sandbox_like_the_kernels_kill(report):
    # with ready = "exec" the steady stage starts at the exec: the shell's own uname is killed
    result, events = run_with_status(replace(plan_for("root", "uname -s; echo survived"),
                                             seccomp=steady(SeccompRule("uname", "kill"), report=report)))
    assert result.returncode == 128 + SIGSYS
    assert "survived" not in result.stdout
    assert "the program called uname after it was ready, refused by action 'kill': sandbox killed" in result.stderr
    assert kinds(events)[-2:] == ["seccomp", "exited"] and events[-1] == {"event": "exited", "signal": SIGSYS}


def test_steady_rule_with_argument_conditions_only_refuses_matching_calls():
    # after ready: unshare(CLONE_NEWNET) reaches the kernel (EPERM: no capability), while
    # unshare(CLONE_NEWUSER) matches the steady rule's masked_eq and kills the sandbox.
    rule = SeccompRule("unshare", "kill", args=(ArgCondition(0, "masked_eq", CLONE_NEWUSER, CLONE_NEWUSER),))
    script = "unshare -n true; echo net: $?; unshare -U true; echo user: $?"
    result, events = run_with_status(replace(plan_for("root", script), seccomp=steady(rule)))
    assert result.returncode == 128 + SIGSYS
    assert result.stdout.split("\n")[0] == "net: 1"
    assert "user:" not in result.stdout
    refused = [e for e in events if e["event"] == "seccomp"]
    assert [(e["syscall"], e["action"]) for e in refused] == [("unshare", "kill")]


def test_steady_rules_do_not_apply_while_the_program_sets_up():
    script = "uname -s >/dev/null || exit 5; printf READY=1 >&3; exec uname -s"
    result, events = run_with_status(notify_plan(script, steady(SeccompRule("uname", "kill"))))
    assert result.returncode == 128 + SIGSYS
    assert [e["stage"] for e in events if e["event"] == "seccomp"] == ["steady"]


RECORDING_LAUNCH = """
import sys
from jailer.launch import launcher
from jailer.layers import seccomp
from jailer.plan import Plan
import json

class Recording:
    def __init__(self):
        self.seen = []
    def decide(self, name, nr, args, stage):
        self.seen.append((name, stage))
        return ("errno", 38) if name == "uname" else ("continue", None)

plan = Plan.from_dict(json.load(open(sys.argv[1])))
policy = Recording()
code = launcher.run(plan, launcher.Options(notification_policy=policy, route_all_to_notify=True))
names = {name for name, _ in policy.seen}
print(json.dumps({"code": code, "names": sorted(names), "stages": sorted({s for _, s in policy.seen})}))
"""


def test_a_custom_policy_sees_every_syscall_when_the_filter_routes_all(tmp_path):
    import json

    plan = replace(plan_for("root", "uname || echo refused; exit 4"), seccomp=SeccompPlan(report=False))
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan.to_dict()))
    result = subprocess.run([sys.executable, "-c", RECORDING_LAUNCH, str(plan_file)], capture_output=True,
                            text=True, timeout=30, cwd=os.path.dirname(os.path.dirname(__file__)))
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["code"] == 4
    assert "refused" in result.stdout
    assert {"execve", "uname", "exit_group", "wait4"} <= set(outcome["names"])
    assert outcome["stages"] == ["setup", "steady"]


def test_profile_steady_keys_become_the_plans_steady_rules(tmp_path):
    from jailer.profile import build_plan

    profile = tmp_path / "p.toml"
    profile.write_text("""
[program]
argv = ["/bin/true"]
ready = "notify"
[[fds]]
name = "ready"
kind = "notify"
number = 3
[seccomp]
allow = ["@default", "clone", "openat"]
steady_deny = ["openat", "execve"]
steady_action = "errno"
steady_errno = "EACCES"
[[seccomp.steady_rule]]
syscall = "clone"
args = [{ index = 0, op = "masked_eq", mask = 0x10000000, value = 0x10000000 }]
""")
    plan = build_plan(str(profile), euid=0)
    assert plan.program.ready == "notify"
    assert [(r.syscall, r.action, r.errno) for r in plan.seccomp.steady] == [
        ("openat", "errno", 13), ("execve", "errno", 13), ("clone", "kill", None)]
    assert plan.seccomp.steady[2].args[0].mask == CLONE_NEWUSER


@pytest.mark.parametrize("text, problem", [
    ('[program]\nargv = ["/bin/true"]\nready = "notify"\n[seccomp]\nallow = ["@default"]\n',
     'program.ready: found "notify" without a notify fd'),
    ('[program]\nargv = ["/bin/true"]\n[[fds]]\nname = "a"\nkind = "notify"\nnumber = 3\n'
     '[[fds]]\nname = "b"\nkind = "notify"\nnumber = 4\n[seccomp]\nallow = ["@default"]\n',
     "fds: found 2 notify fds (a, b), expected at most one"),
    ('[program]\nargv = ["/bin/true"]\n[seccomp]\nallow = ["@default"]\nsteady_action = "allow"\n',
     'seccomp.steady_action: found "allow", expected one of'),
    ('[program]\nargv = ["/bin/true"]\n[seccomp]\nenabled = false\nsteady_deny = ["open"]\n',
     "seccomp.steady_deny: found steady rules with enabled = false"),
    ('[program]\nargv = ["/bin/true"]\n[seccomp]\nallow = ["@default"]\nsteady_deny = ["mkdir"]\n'
     '[[seccomp.rule]]\nsyscall = "mkdir"\naction = "trap"\n',
     "seccomp.steady_deny: found steady rules for \"mkdir\", whose plain action is trap or log"),
])
def test_profile_refuses_inconsistent_readiness_and_steady_keys(tmp_path, text, problem):
    from jailer.errors import ProfileError
    from jailer.profile import build_plan

    profile = tmp_path / "p.toml"
    profile.write_text(text)
    with pytest.raises(ProfileError) as failure:
        build_plan(str(profile), euid=0)
    assert problem in str(failure.value)


def test_program_plan_default_readiness_is_exec():
    assert ProgramPlan(argv=("x",), executable="/x").ready == "exec"


def test_the_vfio_user_device_serves_a_whole_session_under_steady_rules_denying_open_and_exec(tmp_path):
    """The backend says READY=1 only once everything serving needs is imported and open: a
    protocol walk after ready meets no steady refusal (open, openat, execve, socket...)."""
    import json
    import signal
    import struct
    import time

    from devices.vfio_user.client import Client, ClientError
    from devices.vfio_user.device import BAR2, CONFIG
    from engine_sandbox import staged_device_profile

    jailer = os.path.join(os.path.dirname(sys.executable), "jailer")
    sock = str(tmp_path / "idio16.sock")
    with tempfile.TemporaryFile("w+") as status:
        device = subprocess.Popen([jailer, "run", str(staged_device_profile(tmp_path)), "--socket-path", sock,
                                   "--status-fd", str(status.fileno())], pass_fds=[status.fileno()],
                                  stderr=subprocess.PIPE, text=True, env={**os.environ,
                                                                          "JAILER_CACHE_DIR": str(tmp_path)})
        try:
            deadline = time.monotonic() + 20
            while '"ready"' not in open(f"/proc/self/fd/{status.fileno()}").read():
                assert device.poll() is None and time.monotonic() < deadline, device.stderr.read()
                time.sleep(0.01)
            for _ in range(2):   # a second session: accepting a client again after ready
                with Client.connect(sock) as client:
                    client.device_info()
                    client.region_info(CONFIG)
                    assert struct.unpack_from("<HH", client.region_read(CONFIG, 0, 4)) == (0x494F, 0x0DC8)
                    client.region_write(BAR2, 0x0, b"\x5a")
                    assert client.region_read(BAR2, 0x0, 1) == b"\x5a"
                    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
                    os.ftruncate(ram, 1 << 16)
                    client.dma_map(0x10000, 1 << 16, fd=ram)
                    os.close(ram)
                    client.dma_unmap(unmap_all=True)
                    client.reset()
            device.send_signal(signal.SIGTERM)
            assert device.wait(20) == 0, device.stderr.read()
        except ClientError as exc:
            raise AssertionError(f"{exc}: {device.stderr.read() if device.poll() is not None else ''}") from None
        finally:
            if device.poll() is None:
                device.kill()
                device.wait()
        status.seek(0)
        events = [json.loads(line) for line in status.read().splitlines()]
    assert [e["event"] for e in events if e["event"] != "enforced"] == ["started", "ready", "stage", "exited"]


def test_the_vfio_user_backend_without_jailer_tells_notify_socket_it_is_ready(tmp_path):
    import signal

    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(address)
        manager.settimeout(20)
        device = subprocess.Popen([sys.executable, "-m", "devices.gpio_pci_idio16", "--socket-path",
                                   str(tmp_path / "idio16.sock")], env={**os.environ, "NOTIFY_SOCKET": address},
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  stderr=subprocess.DEVNULL)
        try:
            assert manager.recv(64) == b"READY=1"
            assert os.path.exists(tmp_path / "idio16.sock")   # it listens before it says so
        finally:
            device.send_signal(signal.SIGTERM)
            device.wait(20)


def start_pid1_program(tmp_path, script, wait_for):
    """Run `script` as pid 1 with notify readiness; return (launcher, status file) once the
    status stream shows `wait_for`."""
    plan = notify_plan(script)
    plan = replace(plan, namespaces=replace(plan.namespaces, pid1="program"))
    status_path = tmp_path / "status"
    with open(status_path, "w") as status:
        popen = run(plan, "--status-fd", str(status.fileno()), pass_fds=[status.fileno()], wait=False)
    for _ in range(300):
        if f'"{wait_for}"' in status_path.read_text():
            break
        time.sleep(0.02)
    return popen, status_path


def test_a_signal_before_ready_ends_a_pid1_program_that_may_not_handle_it_yet(tmp_path):
    """pid1 = "program" with ready = "notify": sh as pid 1 has no SIGTERM handler and would
    ignore the signal; before its READY=1 jailer SIGKILLs it rather than wait forever."""
    popen, status_path = start_pid1_program(tmp_path, "sleep 30", "started")
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=10) == 128 + signal.SIGKILL
    events = [json.loads(line) for line in status_path.read_text().splitlines()]
    assert "ready" not in kinds(events) and events[-1] == {"event": "exited", "signal": signal.SIGKILL}


def test_after_ready_a_pid1_program_gets_the_signal_itself(tmp_path):
    script = 'trap "exit 7" TERM; printf READY=1 >&3; while :; do sleep 0.05; done'
    popen, _ = start_pid1_program(tmp_path, script, "ready")
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=10) == 7
