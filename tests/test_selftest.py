"""jailer selftest: what the profile's rules call for, the derived profile, the report."""

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
    plan = SeccompPlan(rules=(SeccompRule("kill", action="errno", errno=1,
                                          args=(ArgCondition(0, "eq", 5),)),))
    assert selftest.seccomp_action(plan, "kill", (1 << 32 | 5,)) == ("kill", None)   # default action
    assert selftest.seccomp_action(plan, "kill", (5,)) == ("errno", 1)


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
    assert "(allowed for the probe's own forks: wait4)" in text
    assert text.endswith("overall: escaped (1 blocked, 1 escaped, 1 skipped)")


def test_probe_machinery_added_only_where_the_filter_has_no_rule():
    plan = SeccompPlan(default_action="kill", rules=(SeccompRule("wait4"), SeccompRule("clone", action="errno",
                                                                                        errno=1)))
    assert selftest.machinery_missing(plan) == ["pipe2"]
    assert selftest.machinery_missing(SeccompPlan(default_action="allow")) == []
    derived = selftest.probe_profile({"seccomp": {"rule": [{"syscall": "read"}]}}, [], "/tmp", ["clone"])
    assert derived["seccomp"]["rule"] == [{"syscall": "read"}, selftest.PROBE_MACHINERY["clone"]]


def test_fork_for_the_probe_never_allows_namespace_flags():
    clone = selftest.PROBE_MACHINERY["clone"]["args"][0]
    plan = SeccompPlan(rules=(SeccompRule("clone", args=(ArgCondition(0, clone["op"], clone["value"],
                                                                      mask=clone["mask"]),)),))
    fork_flags = 0x01200000 | 17        # CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD, as glibc forks
    assert selftest.seccomp_action(plan, "clone", (fork_flags,)) == ("allow", None)
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert selftest.seccomp_action(plan, "clone", (fork_flags | flag,)) == ("kill", None)
