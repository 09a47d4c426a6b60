"""jailer selftest: what the profile's rules call for, the derived profile, the report, the command."""

import json
import os
import subprocess
import sys

import pytest

from jailer import escape_probe as probe
from jailer import selftest
from jailer.plan import ArgCondition, SeccompPlan, SeccompRule

TIOCSTI_DENIED = SeccompPlan(default_action="errno", default_errno=38, rules=(
    SeccompRule("ioctl", action="kill", args=(ArgCondition(1, "eq", probe.TIOCSTI),)),
    SeccompRule("ioctl", action="allow", args=(ArgCondition(1, "ne", probe.TIOCSTI),)),
    SeccompRule("ptrace", action="errno", errno=1),
    SeccompRule("read"),
))


def test_tiocsti_rule_applies_to_high_bit_request_at_kernel_width():
    assert selftest.seccomp_action(TIOCSTI_DENIED, "ioctl", (0, probe.TIOCSTI_HIGH_BITS)) == ("kill", None)
    assert selftest.seccomp_action(TIOCSTI_DENIED, "ioctl", (0, 0x5401)) == ("allow", None)


def test_width_applies_only_to_truncated_arguments():
    plan = SeccompPlan(rules=(SeccompRule("lseek", action="errno", errno=1,
                                          args=(ArgCondition(1, "eq", 5),)),   # off_t: all 64 bits
                              SeccompRule("kill", action="errno", errno=1,
                                          args=(ArgCondition(0, "eq", 5),))))  # pid_t: low 32 bits
    assert selftest.seccomp_action(plan, "lseek", (0, 1 << 32 | 5)) == ("kill", None)   # default action
    assert selftest.seccomp_action(plan, "lseek", (0, 5)) == ("errno", 1)
    assert selftest.seccomp_action(plan, "kill", (1 << 32 | 5,)) == ("errno", 1)


def test_rule_on_an_unfixed_argument_has_no_expectation():
    plan = SeccompPlan(rules=(SeccompRule("ioctl", args=(ArgCondition(0, "eq", 0),)),))
    assert selftest.seccomp_action(plan, "ioctl", (None, probe.TIOCSTI)) is None
    assert selftest.expected_outcome(None) is None


def test_masked_eq_and_orderings():
    plan = SeccompPlan(default_action="allow", rules=(
        SeccompRule("unshare", action="errno", errno=1,
                    args=(ArgCondition(0, "masked_eq", probe.CLONE_NEWUSER, mask=probe.CLONE_NEWUSER),)),
        SeccompRule("ptrace", action="trap", args=(ArgCondition(0, "ge", 16),)),
    ))
    assert selftest.seccomp_action(plan, "unshare", (probe.CLONE_NEWUSER | probe.CLONE_NEWNS,)) == ("errno", 1)
    assert selftest.seccomp_action(plan, "unshare", (probe.CLONE_NEWNS,)) == ("allow", None)
    assert selftest.seccomp_action(plan, "ptrace", (probe.PTRACE_SEIZE,)) == ("trap", None)
    assert selftest.seccomp_action(plan, "ptrace", (probe.PTRACE_TRACEME,)) == ("allow", None)


def test_outcomes_named_as_the_probe_reports_them():
    assert selftest.expected_outcome(("kill", None)) == "signal:SIGSYS"
    assert selftest.expected_outcome(("trap", None)) == "signal:SIGSYS"
    assert selftest.expected_outcome(("errno", 38)) == "ENOSYS"
    assert selftest.expected_outcome(("allow", None)) is None
    assert selftest.seccomp_action(SeccompPlan(enabled=False), "bpf", ()) == ("allow", None)


def test_probe_profile_replaces_only_the_program_and_moves_sockets(tmp_path):
    data = {"name": "dev", "program": {"runtime": "native", "argv": ["/usr/bin/dev", "--fd={fd:sock}"]},
            "seccomp": {"allow": ["@python"]}, "limits": {"nofile": 8},
            "fds": [{"name": "sock", "kind": "unix-listener", "number": 3, "path": "/run/dev.sock"},
                    {"name": "mem", "kind": "memfd", "number": 4, "size": 4096}]}
    derived = selftest.probe_profile(data, ["--marker", "/x"], str(tmp_path))
    assert derived["program"] == {"runtime": "python", "modules": ["jailer"],
                                  "argv": ["-m", "jailer.escape_probe", "--stream", "--marker", "/x"]}
    assert derived["fds"][0]["path"] == str(tmp_path / "sock.sock")
    assert derived["fds"][1] == data["fds"][1]
    assert derived["filesystem"]["bind"] == [{"source": str(tmp_path / selftest.CANARY_NAME),
                                              "target": selftest.CANARY_TARGET}]
    assert {k: v for k, v in derived.items() if k not in ("program", "fds", "filesystem")} == \
        {k: v for k, v in data.items() if k not in ("program", "fds")}
    assert data["fds"][0]["path"] == "/run/dev.sock"


def test_report_names_unexpected_outcomes():
    report = {"profile": "p.toml", "invocation": "root", "uid": 65534, "seccomp": "2", "overall": "escaped",
              "added_for_probe": ["wait4"],
              "checks": [
                  {"name": "clone3", "verdict": "blocked", "outcome": "EPERM", "expected": "ENOSYS",
                   "as_expected": False},
                  {"name": "fds", "verdict": "escaped", "outcome": "unexpected fds [5]"},
                  {"name": "rlimits", "verdict": "skipped", "outcome": "skipped", "detail": "no --rlimit given"}]}
    text = selftest.format_report(report)
    assert "  blocked  clone3   EPERM  (profile calls for ENOSYS)" in text
    assert "  ESCAPED  fds      unexpected fds [5]" in text
    assert "[no --rlimit given]" in text
    assert "(allowed for the probe's own start-up and forks: wait4)" in text
    assert text.endswith("overall: escaped (1 blocked, 1 escaped, 1 skipped)")


def test_probe_machinery_added_only_where_the_filter_has_no_rule():
    plan = SeccompPlan(default_action="kill", rules=(SeccompRule("wait4"), SeccompRule("clone", action="errno",
                                                                                        errno=1)))
    assert list(selftest.machinery_missing(plan)) == ["pipe2", "getuid", "getgid", "uname", "clock_nanosleep"]
    assert selftest.machinery_missing(SeccompPlan(default_action="allow")) == {}
    derived = selftest.probe_profile({"seccomp": {"rule": [{"syscall": "read"}]}}, [], "/tmp",
                                     {"clone": [selftest.PROBE_MACHINERY["clone"]]})
    assert derived["seccomp"]["rule"] == [{"syscall": "read"}, selftest.PROBE_MACHINERY["clone"]]


def test_a_native_programs_profile_gets_the_probes_python_start_up_but_never_tiocsti():
    plan = SeccompPlan(default_action="kill", rules=(SeccompRule("read"),))
    added = selftest.machinery_missing(plan, "native")
    assert "read" not in added and {"openat", "mmap", "rt_sigaction", "sysinfo"} <= set(added)
    assert {rule["args"][0]["value"] for rule in added["ioctl"]} == {0x5401, 0x5413, 0x5451}
    assert 0x5412 not in {rule["args"][0]["value"] for rule in added["ioctl"]}   # TIOCSTI
    assert not {"ptrace", "mount", "unshare", "socket", "connect", "bpf", "keyctl"} & set(added)


def test_fork_for_the_probe_never_allows_namespace_flags():
    clone = selftest.PROBE_MACHINERY["clone"]["args"][0]
    plan = SeccompPlan(rules=(SeccompRule("clone", args=(ArgCondition(0, clone["op"], clone["value"],
                                                                      mask=clone["mask"]),)),))
    fork_flags = 0x01200000 | 17        # CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD, as glibc forks
    assert selftest.seccomp_action(plan, "clone", (fork_flags,)) == ("allow", None)
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert selftest.seccomp_action(plan, "clone", (fork_flags | flag,)) == ("kill", None)


# --- the command, on real sandboxes --------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILES = os.path.join(REPO, "tests", "profiles")


def selftest_command(*args):
    return subprocess.run([sys.executable, "-m", "jailer", "selftest", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(os.geteuid() != 0, reason="the tight profile's memory limit needs root (cgroup v1)")
def test_tight_profile_passes_with_a_verdict_per_check():
    result = selftest_command(os.path.join(PROFILES, "escape-tight.toml"))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("jailer selftest ") and "Seccomp 2" in lines[0]
    verdicts = {line.split()[1]: line.split()[0] for line in lines[1:-1]}
    assert verdicts == {name: "blocked" for name in probe.CHECKS}
    assert lines[-1] == f"overall: blocked ({len(probe.CHECKS)} blocked)"


def test_leaky_profile_fails_naming_each_open_door():
    result = selftest_command("--json", os.path.join(PROFILES, "escape-leaky.toml"))
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["overall"] == "escaped"
    assert {"host_processes", "tcp_loopback", "ptrace_traceme", "user_namespace", "clone_new_user", "clone3",
            "keyctl", "add_key", "perf_event_open", "io_uring_setup"} <= set(report["escaped"]), report["escaped"]
    assert report["added_for_probe"] == []          # an allow-all filter needs nothing added
    checks = {check["name"]: check for check in report["checks"]}
    assert checks["seccomp_mode"]["verdict"] == "blocked"   # a filter is loaded, it just allows everything
    assert checks["capabilities"]["verdict"] == "blocked"


def test_a_native_programs_profile_is_self_tested_with_the_probes_start_up_added():
    """true.toml allows what /bin/true calls, not CPython's start-up: that is added (and said),
    and what the profile leaves out is reported, not hidden: without /proc the checks that
    read the probe's own /proc/self/status cannot decide."""
    result = selftest_command(os.path.join(REPO, "profiles", "examples", "true.toml"))
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("  (allowed for the probe's own start-up and forks: ") and "sysinfo" in line
               and "ioctl" in line for line in lines)
    verdicts = {line.split()[1]: line.split()[0] for line in lines[1:] if line.startswith("  ") and "(" not in line[:4]}
    assert {name for name, verdict in verdicts.items() if verdict == "ERROR"} == {
        "capabilities", "no_new_privs", "seccomp_mode", "fds"}
    assert verdicts["tiocsti"] == verdicts["ptrace_traceme"] == verdicts["mount_tmpfs"] == "blocked"


def test_missing_profile_is_a_profile_error():
    result = selftest_command("/nonexistent/profile.toml")
    assert result.returncode == 2
    assert result.stderr.strip() == ("jailer: /nonexistent/profile.toml: cannot read the profile: "
                                     "No such file or directory")


def python_examples():
    import glob

    import toml

    paths = sorted(glob.glob(os.path.join(REPO, "profiles", "examples", "*.toml")))
    return [path for path in paths if toml.load(path).get("program", {}).get("runtime") == "python"]


@pytest.mark.skipif(os.geteuid() != 0, reason="example profiles' cgroup limits need root (cgroup v1)")
@pytest.mark.parametrize("profile", python_examples(), ids=os.path.basename)
def test_shipped_python_examples_hold(profile):
    """Every example a user may copy must pass its own self-test."""
    result = selftest_command("--json", profile)
    report = json.loads(result.stdout) if result.stdout else result.stderr
    assert isinstance(report, dict), report
    assert report["escaped"] == [] and result.returncode == 0, [c for c in report["checks"]
                                                                 if c["verdict"] != "blocked"]


def test_fd_manifest_is_supplied_and_is_all_the_probe_holds():
    """The caller's stream fd is handed over, the profile's socket path is not touched, and the
    probe holds exactly 0-2 plus the manifest; an errno-by-default filter answers ENOSYS everywhere."""
    profile = os.path.join(PROFILES, "escape-fds.toml")
    result = selftest_command("--json", profile)
    report = json.loads(result.stdout)
    assert result.returncode == 0, [c for c in report["checks"] if c["verdict"] != "blocked"]
    checks = {check["name"]: check for check in report["checks"]}
    held = checks["fds"]["held"]
    assert sorted(map(int, held)) == [0, 1, 2, 3, 4, 5, 6]
    assert held["3"].startswith("socket:") and held["4"].startswith("socket:")
    assert held["5"].startswith("/memfd:guest-ram") and held["6"] == "anon_inode:[eventfd]"
    assert not os.path.exists("/run/jailer-escape-fds.sock")
    decided = [c for c in report["checks"] if "expected" in c]
    assert decided and all(c["as_expected"] and c["outcome"] == "ENOSYS" for c in decided), decided
