"""The escape probe, first unconfined (it must see every escape), then inside real sandboxes."""

import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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


# --- inside real sandboxes: `jailer run` on tests/profiles/escape-tight.toml --------------------

TIGHT_PROFILE = os.path.join(REPO, "tests", "profiles", "escape-tight.toml")
START_MODES = ("exec", "zero-exec")   # the probe exec'd, or started in the launcher's interpreter (jailer.zero_exec)
UNPRIVILEGED = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all")

# The exact outcome each check must have in that profile; a tuple lists the acceptable ones.
TIGHT_OUTCOMES = {
    "host_file_read": "ENOENT",
    "readonly_write": "EROFS",
    "host_processes": "only own pids visible",
    "signal_host_pid": "ESRCH",
    "ptrace_traceme": "EPERM",
    "ptrace_attach_pid1": "EPERM",
    "mount_tmpfs": "EPERM",
    "user_namespace": "EPERM",
    "clone_new_user": "signal:SIGSYS",
    "tiocsti": "signal:SIGSYS",
    "tiocsti_high_bits": "signal:SIGSYS",
    "clone3": "ENOSYS",
    "io_uring_setup": "signal:SIGSYS",
    "bpf": "EPERM",
    "perf_event_open": "signal:SIGSYS",
    "keyctl": "signal:SIGSYS",
    "add_key": "signal:SIGSYS",
    "init_module": "signal:SIGSYS",
    # Landlock (ABI >= 4) refuses TCP connect first; else lo is down, or up with nobody listening
    "tcp_loopback": ("EACCES", "ENETUNREACH", "ECONNREFUSED"),
    # /proc/sys files are root's 0644: permission is refused before the read-only mount is consulted
    "proc_sys_write": ("EACCES", "EROFS"),
    "capabilities": "CapInh=0000000000000000, CapPrm=0000000000000000, CapEff=0000000000000000, "
                    "CapBnd=0000000000000000, CapAmb=0000000000000000",
    "no_new_privs": "NoNewPrivs=1",
    "no_new_privs_unset": "EINVAL",
    "seccomp_mode": "Seccomp=2",
    "fds": "fds [0, 1, 2]",
    "rlimits": "as configured",
    "memory_limit": "signal:SIGKILL",                  # OOM-killed at the cgroup's limit
}


def base_environment():
    return {key: value for key, value in os.environ.items() if not key.startswith("PYTEST")}


@contextlib.contextmanager
def copied_packages_runner():
    """(argv prefix, environment) running jailer as uid 65534 from a world-readable copy of the
    project packages and the venv's site-packages, with /usr/bin/python3."""
    from benchmarks.startup import SYSTEM_PYTHON, world_readable_copy

    scratch = tempfile.mkdtemp(prefix="jailer-unprivileged-")   # pytest's own tmp is 0700
    try:
        os.chmod(scratch, 0o755)
        env = base_environment()
        env["PYTHONPATH"] = world_readable_copy(os.path.join(scratch, "tree"))
        yield (*UNPRIVILEGED, SYSTEM_PYTHON), env
    finally:
        shutil.rmtree(scratch)


@pytest.fixture(scope="session")
def unprivileged_runner():
    """(argv prefix, environment) running jailer as uid 65534: straight from the checkout when
    65534 can read it and the venv, else from a copy (a clone under 0700 /root)."""
    from benchmarks.startup import readable_by_others

    if readable_by_others(os.path.join(REPO, "jailer", "selftest.py")) and readable_by_others(sys.executable):
        yield (*UNPRIVILEGED, sys.executable), base_environment()
        return
    with copied_packages_runner() as runner:
        yield runner


def run_selftest(profile, prefix=(sys.executable,), env=None, cwd=REPO):
    """`jailer selftest --json PROFILE` in a fresh process; returns (exit status, report or stderr)."""
    result = subprocess.run([*prefix, "-m", "jailer", "selftest", "--json", profile], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    if not result.stdout:
        return result.returncode, result.stderr
    return result.returncode, json.loads(result.stdout)


def selftest_readable_copy(prefix, env, start="exec"):
    """The tight profile's self-test from a copy of the profile that any user can read, its
    program started as `start` says (program.start)."""
    with tempfile.TemporaryDirectory(prefix="jailer-escape-") as readable:   # pytest's own tmp is 0700
        os.chmod(readable, 0o755)
        copy = os.path.join(readable, os.path.basename(TIGHT_PROFILE))
        with open(TIGHT_PROFILE) as source, open(copy, "w") as target:
            target.write(source.read().replace('[program]\n', f'[program]\nstart = "{start}"\n', 1))
        os.chmod(copy, 0o644)
        return run_selftest(copy, prefix, env, cwd="/")


@pytest.fixture(scope="module", params=START_MODES)
def tight_reports(request, unprivileged_runner):
    reports = {}
    if IS_ROOT:
        reports["root"] = selftest_readable_copy((sys.executable,), None, request.param)
    reports["unprivileged"] = selftest_readable_copy(*(unprivileged_runner if IS_ROOT else ((sys.executable,), None)),
                                                     request.param)
    return reports


def not_blocked(report, invocation):
    """Checks that did not hold; an unprivileged caller's memory limit is best effort in the profile."""
    return [check for check in report["checks"] if check["verdict"] != "blocked"
            and not (check["name"] == "memory_limit" and invocation == "unprivileged")]


@pytest.mark.parametrize("invocation", ["root", "unprivileged"])
@pytest.mark.parametrize("name", list(TIGHT_OUTCOMES))
def test_sandbox_blocks_escape(tight_reports, invocation, name):
    if invocation not in tight_reports:
        pytest.skip("the root invocation needs root")
    if name == "memory_limit" and invocation == "unprivileged":
        pytest.skip("an unprivileged caller cannot create cgroup v1 groups (best effort in the profile)")
    status, report = tight_reports[invocation]
    assert isinstance(report, dict), f"selftest gave no report (exit {status}): {report}"
    check = by_name(report)[name]
    wanted = TIGHT_OUTCOMES[name]
    wanted = wanted if isinstance(wanted, tuple) else (wanted,)
    assert check["outcome"] in wanted, f"{invocation}: {name}: expected {' or '.join(wanted)}, got {check}"
    assert check["verdict"] == "blocked", check
    if "expected" in check:
        assert check["as_expected"], check


@pytest.mark.parametrize("invocation", ["root", "unprivileged"])
def test_sandbox_selftest_passes_overall(tight_reports, invocation):
    if invocation not in tight_reports:
        pytest.skip("the root invocation needs root")
    status, report = tight_reports[invocation]
    assert isinstance(report, dict), f"selftest gave no report (exit {status}): {report}"
    assert not not_blocked(report, invocation)
    if invocation == "root":
        assert status == 0 and report["overall"] == "blocked"


def test_memory_hog_is_stopped_below_the_cgroup_limit(tight_reports):
    """OOM-killed while the sandbox as a whole reached limits.cgroup.memory (64M), not before it started."""
    if "root" not in tight_reports:
        pytest.skip("cgroup v1 limits need root")
    check = by_name(tight_reports["root"][1])["memory_limit"]
    assert check["outcome"] == "signal:SIGKILL", check
    assert 0 < check["allocated_before_end"] < 64 << 20, check


@pytest.mark.skipif(not IS_ROOT, reason="setpriv to uid 65534 needs root")
def test_unprivileged_sandbox_from_copied_packages():
    """The path CI takes when the checkout sits under 0700 /root, exercised even when it does not."""
    with copied_packages_runner() as (prefix, env):
        status, report = selftest_readable_copy(prefix, env)
    assert isinstance(report, dict), f"selftest gave no report (exit {status}): {report}"
    assert report["uid"] == 65534 and report["invocation"] == "unprivileged"
    assert not not_blocked(report, "unprivileged")
