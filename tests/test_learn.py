"""jailer learn: rules from a trace, the seccomp section rewritten alone, and real learning runs."""

import json
import re
import signal
import subprocess
import time
import sys
from collections import Counter
from pathlib import Path

import pytest
import toml

from jailer import learn
from jailer.plan import SeccompPlan, SeccompRule
from jailer.profile import build_plan

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "profiles" / "examples" / "python-threads.toml"
def jailer(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "jailer", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


TRACE = Counter({
    ("read", (), "setup"): 10, ("read", (), "steady"): 50, ("execve", (), "setup"): 1,
    ("ioctl", (0x5401,), "setup"): 2, ("ioctl", (0x5421,), "steady"): 3, ("ioctl", (0x8912,), "setup"): 1,
    ("mmap", (learn.PROT_EXEC,), "setup"): 5, ("mmap", (0,), "setup"): 20, ("mmap", (0,), "steady"): 7,
    ("mprotect", (0,), "steady"): 4, ("openat", (0,), "setup"): 100, ("fcntl", (3,), "steady"): 4,
    ("socket", (1, 0x80001), "setup"): 1, ("socket", ("errno", 13), "steady"): 2,
})


def test_rules_from_a_trace():
    learned = learn.Learned(TRACE)
    assert sorted(learned.allow) == ["execve", "mmap", "read"]     # mmap: both prot values seen
    assert learned.allow["read"] == Counter(setup=10, steady=50)
    rules = {(name, conditions) for name, conditions, _ in learned.rules}
    assert rules == {("ioctl", ((1, "eq", 0x5401, None),)), ("ioctl", ((1, "eq", 0x5421, None),)),
                     ("ioctl", ((1, "eq", 0x8912, None),)),
                     ("fcntl", ((1, "eq", 3, None),)), ("mprotect", ((2, "masked_eq", 0, learn.PROT_EXEC),)),
                     ("openat", ((2, "masked_eq", 0, learn.OPEN_WRITING),)),
                     ("socket", ((0, "eq", 1, None), (1, "eq", 0x80001, None)))}
    steady = {(name, conditions) for name, conditions, _ in learned.steady}   # TCGETS only queries: kept
    assert steady == {("execve", ()), ("openat", ((2, "masked_eq", 0, learn.OPEN_WRITING),)),
                      ("ioctl", ((1, "eq", 0x8912, None),)),
                      ("socket", ((0, "eq", 1, None), (1, "eq", 0x80001, None))),
                      ("mmap", ((2, "masked_eq", learn.PROT_EXEC, learn.PROT_EXEC),))}
    assert learned.refused == Counter({("socket", 13): 2}) and learned.calls() == 208


def test_too_many_values_leave_the_argument_free():
    trace = Counter({("ioctl", (request,), "steady"): 1 for request in range(learn.MAX_VALUES + 1)})
    trace[("socket", (1, 1), "steady")] = 1
    trace.update({("setsockopt", (1, name), "steady"): 1 for name in range(learn.MAX_VALUES + 3)})
    learned = learn.Learned(trace)
    assert "ioctl" in learned.allow and not any(name == "ioctl" for name, _, _ in learned.rules)
    setsockopt = [conditions for name, conditions, _ in learned.rules if name == "setsockopt"]
    assert setsockopt == [((1, "eq", 1, None),)]        # the level stays, the wide optname goes


def test_selector_values_narrow_32_bit_arguments():
    from jailer.layers.seccomp import KERNEL_32BIT_ARGS

    args = (3, 0x5401 | 1 << 32, 0, 0, 0, 0)
    assert learn.selector_values("ioctl", args, KERNEL_32BIT_ARGS) == (0x5401,)
    assert learn.selector_values("mmap", (0, 4096, 7, 0x22, -1, 0)) == (learn.PROT_EXEC,)
    assert learn.selector_values("clone", (0x10000000 | 0x3D0F00, 0, 0, 0, 0, 0)) == (0x10000000,)


SCATTERED = '''\
# Hand-written profile: this comment and every byte outside [seccomp] must survive.
name = "scattered"   # trailing comment

[program]
runtime = "python"
argv = ["-c", """
[seccomp]
not a header: inside a string
""", 'x']
modules = []

[seccomp]   # old section
default_action = "kill"
allow = ["read"]
nested = [
  ["not", "a header"],
]

# the rule for clone
[[seccomp.rule]]
syscall = "clone"

[limits]
nofile = 64
# about the next seccomp table, which goes too
[[ seccomp . "rule" ]]
syscall = "clone3"
action = "errno"

# kept: it describes [environment]
[environment]
set = { LANG = "C.UTF-8" }
'''


def test_section_rewrite_keeps_every_other_byte():
    section = '[seccomp]\nallow = ["read"]\n'
    new = learn.replace_seccomp_section(SCATTERED, section)
    assert new == SCATTERED.replace(SCATTERED[SCATTERED.index("[seccomp]   #"):SCATTERED.index("[limits]")],
                                    section + "\n").replace(
        '# about the next seccomp table, which goes too\n[[ seccomp . "rule" ]]\nsyscall = "clone3"\n'
        'action = "errno"\n\n', "")
    before, after = toml.loads(SCATTERED), toml.loads(new)
    assert after.pop("seccomp") == {"allow": ["read"]}
    before.pop("seccomp")
    assert before == after


def test_section_is_appended_when_missing_and_dotted_keys_are_refused():
    assert learn.replace_seccomp_section('name = "x"\n', "[seccomp]\n") == 'name = "x"\n\n[seccomp]\n'
    assert learn.replace_seccomp_section('name = "x"', "[seccomp]\n") == 'name = "x"\n\n[seccomp]\n'
    with pytest.raises(learn.UsageError, match="not written as a \\[seccomp\\] table"):
        learn.replace_seccomp_section('seccomp.enabled = true\n', "[seccomp]\n")


def test_rendered_section_builds_a_plan_and_keeps_deny_rules(tmp_path):
    kept = SeccompRule("socket", action="errno", errno=13)
    learned = learn.Learned(TRACE)
    section = learn.render_section(learned, SeccompPlan(rules=(kept,)), "vfio-user", [kept])
    lines = section.splitlines()
    allow = lines[lines.index("allow = [") + 1:lines.index("]")]
    assert allow == sorted(allow) and all(line.count('"') == 2 and "#" in line for line in allow)
    assert '"read",    # 10 setup + 50 steady' in section and "TCGETS; 2 setup" in section
    assert 'errno = "EACCES" },' in section and "kept from the profile; refused 2 calls" in section
    profile = tmp_path / "p.toml"
    profile.write_text(learn.replace_seccomp_section(EXAMPLE.read_text(), section))
    plan = build_plan(str(profile))
    assert plan.seccomp.default_action == "kill"
    by_name = Counter(rule.syscall for rule in plan.seccomp.rules)
    assert by_name["ioctl"] == 3 and by_name["socket"] == 2 and by_name["read"] == 1 and by_name["openat"] == 1
    assert "read-only; 100 setup" in section
    assert any(r.syscall == "socket" and r.action == "errno" and r.errno == 13 for r in plan.seccomp.rules)
    if learn.staging_supported():
        assert {r.syscall for r in plan.seccomp.steady} == {"execve", "openat", "ioctl", "socket", "mmap"}


def test_reviewed_keeps_survive_relearning():
    old = ('[seccomp]\nallow = [\n    "read",  # 3 steady\n    "uname",   # keep: jailer selftest\'s probe\n'
           '    "ioctl",  # keep: not a plain allow once learned with rules\n]\n[limits]\n')
    kept = learn.kept_by_review(learn.seccomp_section_text(old))
    assert kept == {"uname": "keep: jailer selftest's probe", "ioctl": "keep: not a plain allow once learned with rules"}
    section = learn.render_section(learn.Learned(TRACE), SeccompPlan(), "none", kept_names=kept)
    assert re.search(r'\n    "uname", +# keep: jailer selftest\'s probe\n', section)
    assert '    "ioctl",' not in section            # ioctl has learned rules: a plain allow would void them


def test_syntax_error_fails_in_one_line(tmp_path):
    profile = tmp_path / "broken.toml"
    profile.write_text('name = "broken"\n[program\nargv = ["x"]\n')
    result = jailer("learn", str(profile))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "TOML syntax error" in result.stderr, result.stderr
    result = jailer("learn", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# --- real learning runs: the IDIO-16 device, its sandbox, the exerciser -------------------------

DEVICE_PROFILE = '''\
# The IDIO-16 with its control socket, for jailer learn's tests. Comments stay.
name = "idio16-learn"

[program]
runtime = "python"
argv = ["-m", "devices.gpio_pci_idio16", "--fd={fd:vfio-user}", "--control-fd={fd:control}"]
modules = ["devices"]

[filesystem]
root_size = "1M"   # nothing is written

[seccomp]
# a wide start, to be narrowed
default_action = "kill"
allow = ["@vfio-user"]

[[seccomp.rule]]        # no new sockets
syscall = "socket"
action = "errno"
errno = "EACCES"

# the limits are hand-tuned
[limits]
nofile = 64
core = 0

[[fds]]
name = "vfio-user"
kind = "unix-listener"
number = 3

[[fds]]
name = "control"
kind = "unix-listener"
number = 4
'''
# Syscalls whose removal must break the device: start-up, the event loop, client I/O, DMA, exit.
MINIMALITY_SAMPLE = ("rt_sigaction", "epoll_wait", "accept4", "recvmsg", "mmap")


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    directory = tmp_path_factory.mktemp("learn")
    profile = directory / "idio16.toml"
    profile.write_text(DEVICE_PROFILE)
    result = jailer("learn", str(profile), "--in-place", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    return profile, json.loads(result.stdout)


def run_device(profile):
    plan = build_plan(str(profile))
    code, report, events, _ = learn.run_sandboxed(plan, "vfio-user", timeout=5.0)
    return code, report, [e for e in events if e["event"] == "seccomp"]


def test_learned_profile_validates_and_keeps_the_rest(learned):
    profile, summary = learned
    text = profile.read_text()
    assert summary["validation"] == {"exit": 0, "refused": 0, "steps_passed": 18}
    assert summary["written"] == str(profile) and all(run["exerciser"]["ok"] for run in summary["learning_runs"])
    head, tail = DEVICE_PROFILE.split("[seccomp]\n")[0], DEVICE_PROFILE[DEVICE_PROFILE.index("# the limits"):]
    assert text.startswith(head + "[seccomp]\n# Learned by `jailer learn --exerciser vfio-user`")
    assert text.endswith(tail) and "@vfio-user" not in text and "[[seccomp.rule]]" not in text
    plan = build_plan(str(profile))
    assert plan.seccomp.default_action == "kill" and plan.fds[1].name == "control"
    rules = {rule.syscall: rule for rule in plan.seccomp.rules}
    assert rules["socket"].action == "errno" and rules["socket"].errno == 13     # the profile's own rule stays
    assert {"accept4", "recvmsg", "epoll_wait", "execve"} <= set(summary["syscalls"])
    assert "clone" not in summary["syscalls"] and "connect" not in summary["syscalls"]
    if learn.staging_supported():
        assert "execve" in summary["steady"] and "execve" in {r.syscall for r in plan.seccomp.steady}


def test_device_passes_the_walk_under_the_learned_filter(learned):
    profile, _ = learned
    code, report, refused = run_device(profile)
    assert code == 0 and report.ok and refused == [], (report.failures, refused)


@pytest.mark.parametrize("syscall", MINIMALITY_SAMPLE)
def test_every_sampled_syscall_is_needed(learned, tmp_path, syscall):
    profile, summary = learned
    assert syscall in summary["syscalls"]
    lines = profile.read_text().splitlines(keepends=True)
    kept = [line for line in lines if f'"{syscall}"' not in line]
    assert len(kept) < len(lines)
    smaller = tmp_path / "smaller.toml"
    smaller.write_text("".join(kept))
    assert syscall not in {rule.syscall for rule in build_plan(str(smaller)).seccomp.rules}
    code, report, refused = run_device(smaller)
    assert code != 0 or not report.ok or refused
    assert any(event["syscall"] == syscall for event in refused) or code != 0


def test_learning_a_program_that_exits_by_itself(tmp_path):
    profile = tmp_path / "true.toml"
    profile.write_text((REPO / "profiles" / "examples" / "true.toml").read_text())
    output = tmp_path / "out.toml"
    result = jailer("learn", str(profile), "--exerciser", "none", "--runs", "2", "-o", str(output), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["validation"] == {"exit": 0, "refused": 0, "steps_passed": None}
    assert [run["exerciser"] for run in summary["learning_runs"]] == [None, None]
    names = {rule.syscall for rule in build_plan(str(output)).seccomp.rules}
    assert {"execve", "exit_group", "mmap", "openat"} <= names and "socket" not in names and len(names) < 25


def test_the_vfio_user_exerciser_needs_a_listening_device(tmp_path):
    profile = tmp_path / "true.toml"
    profile.write_text((REPO / "profiles" / "examples" / "true.toml").read_text())
    result = jailer("learn", str(profile))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "needs exactly one socket for the device" in result.stderr


def test_a_device_that_reports_ready_loses_its_start_up_powers(tmp_path):
    """With ready = "notify" the imports count as set-up: learned steady rules kill executable
    mappings once ready, a reviewer's steady_deny (opening files, exec, ...) is kept as
    written, and the walk still passes."""
    text = DEVICE_PROFILE.replace('modules = ["devices"]\n', 'modules = ["devices"]\nready = "notify"\n')
    text = text.replace('allow = ["@vfio-user"]\n', 'allow = ["@vfio-user"]\nsteady_deny = ["openat", "execve", "socket"]\n'
                        'steady_action = "errno"\nsteady_errno = "EACCES"\n')
    profile = tmp_path / "notify.toml"
    profile.write_text(text + '\n[[fds]]\nname = "ready"\nkind = "notify"\nnumber = 5\n')
    result = jailer("learn", str(profile), "--in-place", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["validation"]["refused"] == 0
    steady = build_plan(str(profile)).seccomp.steady
    reviewed = {rule.syscall: rule for rule in steady if rule.action == "errno"}
    assert {"execve", "openat", "socket"} <= set(reviewed)
    learned = [rule for rule in steady if rule.action == "kill"]
    mmap = next(rule for rule in learned if rule.syscall == "mmap")
    assert [(c.op, c.mask, c.value) for c in mmap.args] == [("masked_eq", learn.PROT_EXEC, learn.PROT_EXEC)]
    assert "accept4" not in {rule.syscall for rule in steady}


def test_exerciser_none_stopped_by_hand_writes_what_it_recorded_unvalidated(tmp_path):
    """A device driven by hand (or by a VM) while learning runs until jailer learn is stopped:
    nothing can drive it the same way again, so the recording is written and says so."""
    profile = tmp_path / "serving.toml"
    profile.write_text('[program]\nruntime = "python"\nargv = ["-c", "import time; time.sleep(60)"]\n'
                       '[seccomp]\ndefault_action = "kill"\nallow = ["@python"]\n')
    learning = subprocess.Popen([sys.executable, "-m", "jailer", "learn", str(profile), "--exerciser", "none",
                                 "--runs", "1", "--in-place"], stderr=subprocess.PIPE, text=True, cwd=REPO)
    time.sleep(3)
    learning.send_signal(signal.SIGINT)
    _, stderr = learning.communicate(timeout=60)
    assert learning.returncode == 0, stderr
    assert stderr.endswith("; the program ran until stopped (--exerciser none): run it under the learned profile "
                           "with its driver to check it\n")
    assert "# Learned by `jailer learn --exerciser none`" in profile.read_text()
