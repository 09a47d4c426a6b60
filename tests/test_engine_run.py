"""Real sandboxes, as root and as an unprivileged user: the mechanics of `jailer run`."""

import os
import signal
import subprocess
import time
from dataclasses import replace

import pytest

from engine_sandbox import INVOCATIONS, SYSTEM_DIRS, plan_for, readable_tempdir, run, run_with_status
from jailer.plan import (Bind, FilesystemPlan, LimitsPlan, NamespacesPlan, Rlimit, Tmpfs)


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_exit_status_propagates(invocation):
    result = run(plan_for(invocation, "exit 7"), invocation=invocation)
    assert result.returncode == 7, result.stderr


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_identity_capabilities_and_session(invocation):
    script = "id -u; id -g; grep -E '^(Cap|NoNewPrivs)' /proc/self/status; ps -o sid=,pid= -p $$ || true"
    result = run(plan_for(invocation, script), invocation=invocation)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    expected = "65534" if invocation == "root" else "1000"
    assert lines[0] == expected and lines[1] == expected
    fields = dict(line.split(":\t") for line in lines[2:8])
    assert {fields[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == {"0000000000000000"}
    assert fields["NoNewPrivs"] == "1"


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_pid_namespace_reaper_and_program_modes(invocation):
    reaper = run(plan_for(invocation, "echo $$"), invocation=invocation)
    assert reaper.stdout.strip() == "2", reaper.stderr
    as_pid1 = plan_for(invocation, "echo $$", namespaces=NamespacesPlan(pid1="program"))
    assert run(as_pid1, invocation=invocation).stdout.strip() == "1"


def test_hostname_is_the_plans():
    result = run(plan_for("root", "hostname", namespaces=NamespacesPlan(hostname="devbox")))
    assert result.stdout.strip() == "devbox"


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_only_the_plans_mounts_are_visible(invocation):
    result = run(plan_for(invocation, "cut -d' ' -f5 /proc/self/mountinfo"), invocation=invocation)
    assert result.returncode == 0, result.stderr
    targets = set(result.stdout.split())
    allowed = {"/", "/proc", "/dev/null", "/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", *SYSTEM_DIRS}
    assert "/" in targets and "/proc" in targets and "/usr" in targets
    assert targets <= allowed, targets - allowed
    root_listing = run(plan_for(invocation, "ls -A /"), invocation=invocation).stdout.split()
    assert set(root_listing) == {"dev", "proc", *(p.strip("/") for p in SYSTEM_DIRS)}


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_read_only_bind_refuses_writes_and_writable_bind_accepts(invocation):
    shared = readable_tempdir()
    os.chown(shared, 65534, 65534)
    filesystem = FilesystemPlan(binds=tuple(Bind(p, p) for p in SYSTEM_DIRS) + (
        Bind(shared, "/data", writable=True), Bind(shared, "/data-ro")))
    script = "echo ok > /data/f && cat /data-ro/f; echo x > /data-ro/g; echo x > /usr/g; echo x > /newfile"
    result = run(plan_for(invocation, script, filesystem=filesystem), invocation=invocation)
    assert result.stdout.strip() == "ok"
    assert result.stderr.count("Read-only file system") == 3, result.stderr
    assert open(os.path.join(shared, "f")).read() == "ok\n"


def test_tmpfs_has_the_plans_size_and_mode():
    filesystem = FilesystemPlan(binds=tuple(Bind(p, p) for p in SYSTEM_DIRS),
                                tmpfs=(Tmpfs("/scratch", 1 << 20, 0o1777),))
    script = "stat -c %a /scratch; df -k /scratch | tail -1; head -c 2097152 /dev/zero > /scratch/big; echo $?"
    result = run(plan_for("root", script, filesystem=replace(filesystem, devices=("/dev/zero",))))
    mode, df_line, status = result.stdout.splitlines()
    assert mode == "1777" and df_line.split()[1] == "1024" and status == "1"
    assert "No space left" in result.stderr


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_rlimits_are_in_force(invocation):
    limits = LimitsPlan(rlimits=(Rlimit("nofile", 64, 64), Rlimit("core", 0, 0)))
    result = run(plan_for(invocation, "ulimit -n; ulimit -c", limits=limits), invocation=invocation)
    assert result.stdout.split() == ["64", "0"], result.stderr


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_sigterm_reaches_a_program_that_traps_it(invocation):
    script = "trap 'echo trapped; exit 3' TERM; echo ready; while :; do sleep 0.05; done"
    popen = run(plan_for(invocation, script), invocation=invocation, wait=False)
    try:
        assert popen.stdout.readline().strip() == "ready"
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(timeout=10) == 3
        assert popen.stdout.read().strip() == "trapped"
    finally:
        popen.kill()
        popen.wait()


@pytest.mark.parametrize("pid1", ["reaper", "program"])
def test_sigterm_kills_a_plain_sleep(pid1):
    plan = plan_for("root", "echo ready; exec sleep 30", namespaces=NamespacesPlan(pid1=pid1))
    popen = run(plan, wait=False)
    try:
        assert popen.stdout.readline().strip() == "ready"
        time.sleep(0.1)
        popen.send_signal(signal.SIGTERM)
        if pid1 == "reaper":
            assert popen.wait(timeout=10) == 128 + signal.SIGTERM
        else:
            # documented: a program that is pid 1 ignores signals it has no handler for
            with pytest.raises(subprocess.TimeoutExpired):
                popen.wait(timeout=0.5)
    finally:
        popen.kill()
        popen.wait()


def test_status_fd_reports_started_enforced_and_exited():
    result, events = run_with_status(plan_for("root", "exit 4"))
    assert result.returncode == 4
    assert [e["event"] for e in events] == ["started", "enforced", "ready", "exited"]
    assert isinstance(events[0]["pid"], int) and events[0]["pid"] > 1
    layers = events[1]["layers"]
    for layer in ("user_namespace", "mount_namespace", "pid_namespace", "net_namespace", "pivot_root", "landlock",
                  "capabilities", "no_new_privs", "securebits"):
        assert layer in layers
    assert events[1]["skipped"] == {}
    assert events[2] == {"event": "ready", "pid": events[0]["pid"]}
    assert events[3] == {"event": "exited", "code": 4}


def test_killed_program_exits_like_a_shell():
    result, events = run_with_status(plan_for("root", "kill -KILL $$"))
    assert result.returncode == 128 + 9
    assert events[-1] == {"event": "exited", "signal": 9}


def test_landlock_without_mount_namespace_limits_reads_to_the_plans_paths():
    filesystem = FilesystemPlan(binds=tuple(Bind(p, p) for p in SYSTEM_DIRS), devices=("/dev/null",))
    plan = plan_for("root", "cat /etc/hostname", filesystem=filesystem,
                    namespaces=NamespacesPlan(mount=False))
    result = run(plan)
    assert result.returncode == 1 and "Permission denied" in result.stderr


def test_missing_executable_is_an_error_not_a_crash():
    plan = plan_for("root", "true")
    plan = replace(plan, program=replace(plan.program, executable="/opt/nope"))
    result = run(plan)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("jailer: cannot execute /opt/nope")
    assert "Traceback" not in result.stderr


def test_a_symlink_in_a_writable_bind_cannot_lead_mounts_out_of_the_new_root():
    shared = readable_tempdir()
    os.symlink("/.oldroot/etc", os.path.join(shared, "sub"))   # planted by whoever else writes there
    filesystem = FilesystemPlan(binds=tuple(Bind(p, p) for p in SYSTEM_DIRS) + (
        Bind(shared, "/data", writable=True), Bind("/usr/share", "/data/sub/planted")))
    result = run(plan_for("root", "true", filesystem=filesystem))
    assert result.returncode == 3
    assert "leads out of the sandbox's root through a symlink" in result.stderr
    assert not os.path.exists("/etc/planted")
