"""The escape probe, first unconfined (it must see every escape), then inside real sandboxes."""

import errno
import json
import os
import socket
import subprocess
import sys
import uuid

import pytest

from jailer import escape_probe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def host_targets(tmp_path_factory):
    """What a sandboxed probe must not reach: a marker file, a sleeping pid, a TCP listener."""
    marker = tmp_path_factory.mktemp("host") / f"marker-{uuid.uuid4().hex}"
    marker.write_text("host secret\n")
    sleeper = subprocess.Popen(["sleep", "120"])
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        yield {"marker": str(marker), "host_pid": sleeper.pid, "tcp_port": listener.getsockname()[1]}
    finally:
        listener.close()
        sleeper.kill()
        sleeper.wait()


def probe_argv(targets, *extra):
    return ["--marker", targets["marker"], "--host-pid", str(targets["host_pid"]),
            "--tcp-port", str(targets["tcp_port"]), *extra]


def run_unconfined(argv, prefix=(), stdin=subprocess.DEVNULL, pass_fds=()):
    result = subprocess.run([*prefix, sys.executable, "-m", "jailer.escape_probe", *argv],
                            cwd=REPO, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=pass_fds, timeout=60, text=True)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def by_name(report):
    return {check["name"]: check for check in report["checks"]}


@pytest.fixture(scope="module")
def unconfined_report(host_targets):
    """One unconfined run with a terminal on stdin, an extra fd and a wrong rlimit expectation."""
    master, slave = os.openpty()
    extra_read, extra_write = os.pipe()
    try:
        code, report = run_unconfined(
            probe_argv(host_targets, "--rlimit", "nofile=7:7", "--memory-hog", str(32 << 20)),
            stdin=slave, pass_fds=(extra_read,))
    finally:
        for fd in (master, slave, extra_read, extra_write):
            os.close(fd)
    return code, by_name(report)


# Escapes an unconfined process achieves whatever its privilege.
ALWAYS_ESCAPED = ["host_file_read", "host_processes", "signal_host_pid", "ptrace_traceme",
                  "perf_event_open", "keyctl", "add_key", "seccomp_mode", "no_new_privs", "fds",
                  "rlimits", "memory_limit"]
# Escapes that need root's privileges on the host.
ROOT_ESCAPED = ["readonly_write", "mount_tmpfs", "clone3", "bpf", "proc_sys_write", "capabilities",
                "tiocsti", "tiocsti_high_bits", "user_namespace", "clone_new_user"]


@pytest.mark.parametrize("name", ALWAYS_ESCAPED + ROOT_ESCAPED)
def test_unconfined_probe_reports_escape(unconfined_report, name):
    if name in ROOT_ESCAPED and not IS_ROOT:
        pytest.skip("this escape needs root outside a sandbox")
    code, checks = unconfined_report
    assert checks[name]["verdict"] == "escaped", checks[name]
    assert code == 1


def test_unconfined_probe_reports_reachable_listener(unconfined_report):
    checks = unconfined_report[1]
    assert checks["tcp_loopback"]["verdict"] == "escaped", checks["tcp_loopback"]
    assert checks["tcp_loopback"]["outcome"] == "ok"


def test_unconfined_probe_names_unexpected_fd(unconfined_report):
    fds = unconfined_report[1]["fds"]
    assert set(map(int, fds["held"])) - {0, 1, 2}, fds
    assert fds["outcome"].startswith("unexpected fds")


def test_ptrace_of_pid1_is_an_escape_when_pid1_is_traceable(host_targets):
    """In a bare pid namespace the probe's own parent is pid 1 and traceable."""
    if not IS_ROOT:
        pytest.skip("unshare --pid needs root")
    code, report = run_unconfined(["--only", "ptrace_attach_pid1,host_processes"],
                                  prefix=("unshare", "--pid", "--fork", "--mount-proc"))
    checks = by_name(report)
    assert checks["ptrace_attach_pid1"]["verdict"] == "escaped", checks["ptrace_attach_pid1"]
    assert checks["host_processes"]["verdict"] == "blocked", checks["host_processes"]


def test_probe_refuses_unknown_check():
    result = subprocess.run([sys.executable, "-m", "jailer.escape_probe", "--only", "nope"],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unknown checks ['nope']" in result.stderr


def test_seccomp_kill_of_a_child_is_blocked_outcome():
    """A child killed by a signal (here SIGSYS raised by itself) counts as blocked."""
    outcome = escape_probe.in_child(lambda: os.kill(os.getpid(), 31))
    assert outcome == {"outcome": "signal:SIGSYS", "signal": "SIGSYS"}
    assert escape_probe.verdict_for(outcome, set()) == "blocked"


def test_errno_outside_the_denials_counts_as_escape():
    """init_module answering ENOEXEC means the permission check let it through."""
    outcome = escape_probe.attempt(lambda: (_ for _ in ()).throw(OSError(errno.ENOEXEC, "x")))
    assert outcome == {"outcome": "ENOEXEC", "errno": errno.ENOEXEC}
    assert escape_probe.verdict_for(outcome, escape_probe.SECCOMP_DENIALS) == "escaped"


def test_child_that_hangs_is_killed_within_bound():
    outcome = escape_probe.in_child(lambda: __import__("time").sleep(30), timeout=0.2)
    assert outcome["signal"] == "SIGKILL"

