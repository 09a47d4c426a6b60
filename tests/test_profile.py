"""Profile format: valid profiles resolve to the expected Plan, every class of mistake gives its exact line."""

import json
import os
import pathlib

import pytest

from jailer.errors import ProfileError
from jailer.plan import (ArgCondition, Bind, CgroupPlan, FdSpec, IdentityPlan, IdMap, NetworkPlan, Plan, Rlimit,
                         SeccompRule, Symlink, Tmpfs)
from jailer.profile import build_plan, parse_size
from jailer.syscall_groups import GROUPS, expand

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "profiles" / "examples"

BASE = """
[program]
argv = ["/bin/true"]
[seccomp]
allow = ["@default"]
"""
PER_DEVICE = dict(host_ids="per-device", host_id_range=(0x6A000000, 0x10000))   # the [identity] defaults


def write(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems(tmp_path, text):
    """The problem lines for profile `text`, with the file name shortened to P."""
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as caught:
        build_plan(path, euid=0)
    return [line.replace(path, "P") for line in caught.value.problems]


def test_minimal_profile_uses_the_documented_defaults(tmp_path):
    plan = build_plan(write(tmp_path, BASE), euid=0, environ={})
    assert plan.name == "p" and plan.invocation == "root"
    assert plan.program.argv == ("/bin/true",) and plan.program.executable == "/bin/true"
    assert plan.namespaces.user and plan.namespaces.net and plan.namespaces.pid1 == "reaper"
    assert plan.identity == IdentityPlan(65534, 65534, (IdMap(65534, 65534),), (IdMap(65534, 65534),), **PER_DEVICE)
    assert plan.seccomp.default_action == "kill" and plan.seccomp.report
    assert {r.syscall for r in plan.seccomp.rules} <= set(expand("@default"))
    assert all(r.action == "allow" and not r.args for r in plan.seccomp.rules)
    assert plan.environment == () and plan.die_with_parent and plan.best_effort == frozenset()
    assert plan.filesystem.root_size == 8 << 20 and plan.filesystem.proc and plan.filesystem.readonly_root
    assert {b.origin for b in plan.filesystem.binds} == {"runtime"}


FULL = """
name = "full-device"
die_with_parent = false

[program]
argv = ["true", "--socket-fd", "{fd:socket}", "--dma={fd:dma}"]
cwd = "/tmp"

[namespaces]
ipc = false
hostname = "dev0"
pid1 = "program"

[identity]
uid = 1000
gid = 1001
unprivileged_uid = 0
unprivileged_gid = 0

[filesystem]
root_size = "2M"
readonly_root = false
proc = false
devices = ["/dev/null"]

[[filesystem.bind]]
source = "/etc/passwd"
target = "/etc/users"

[[filesystem.bind]]
source = "/nonexistent/state"
target = "/state"
writable = true
optional = true

[[filesystem.tmpfs]]
target = "/tmp"
size = "16M"
mode = 0o1777

[[filesystem.symlink]]
target = "/etc/mtab"
points_to = "/proc/self/mounts"

[landlock]
enabled = false

[seccomp]
default_action = "errno"
default_errno = "ENOSYS"
allow = ["execve", "read", "write", "@time"]
report = false

[[seccomp.rule]]
syscall = "ioctl"
args = [{ index = 1, op = "eq", value = 0x5401 }]

[[seccomp.rule]]
syscall = "mmap"
action = "errno"
errno = "EACCES"
args = [{ index = 2, op = "masked_eq", value = 4, mask = 4 }]

[[seccomp.rule]]
syscall = "ptrace"
action = "kill"

[limits]
nofile = { soft = 64, hard = 128 }
as = "1G"
core = 0
cpu = "unlimited"

[limits.cgroup]
memory = "64M"
pids = 32
cpu = "50%"

[[fds]]
name = "socket"
kind = "unix-listener"
number = 3
path = "/run/dev0.sock"

[[fds]]
name = "dma"
kind = "memfd"
number = 4
size = "1M"
required = false

[network]
mode = "veth"
host_ifname = "jl-dev0"
host_address = "10.200.0.1/30"
sandbox_address = "10.200.0.2/30"

[environment]
set = { LANG = "C.UTF-8" }
pass = ["TERM", "NOT_IN_CALLER_ENV"]

[enforcement]
best_effort = ["cgroup", "landlock"]
"""


def test_every_section_maps_onto_the_plan(tmp_path):
    plan = build_plan(write(tmp_path, FULL), euid=0, environ={"TERM": "xterm", "HOME": "/root"})
    assert plan.name == "full-device" and not plan.die_with_parent
    assert plan.program.argv == ("true", "--socket-fd", "{fd:socket}", "--dma={fd:dma}")
    assert plan.program.executable == "/usr/bin/true" and plan.program.cwd == "/tmp"
    assert not plan.namespaces.ipc and plan.namespaces.hostname == "dev0" and plan.namespaces.pid1 == "program"
    assert plan.identity == IdentityPlan(1000, 1001, (IdMap(1000, 1000),), (IdMap(1001, 1001),), **PER_DEVICE)
    fs = plan.filesystem
    assert fs.root_size == 2 << 20 and not fs.readonly_root and not fs.proc and fs.devices == ("/dev/null",)
    assert fs.binds[-2:] == (Bind("/etc/passwd", "/etc/users"),
                             Bind("/nonexistent/state", "/state", writable=True, optional=True))
    assert fs.tmpfs == (Tmpfs("/tmp", 16 << 20, 0o1777),)
    assert fs.symlinks[-1] == Symlink("/etc/mtab", "/proc/self/mounts")
    assert not plan.landlock.enabled
    sc = plan.seccomp
    assert (sc.default_action, sc.default_errno, sc.report) == ("errno", 38, False)
    assert sc.rules[:3] == (SeccompRule("execve"), SeccompRule("read"), SeccompRule("write"))
    assert SeccompRule("nanosleep") in sc.rules
    assert sc.rules[-3:] == (
        SeccompRule("ioctl", args=(ArgCondition(1, "eq", 0x5401),)),
        SeccompRule("mmap", action="errno", errno=13, args=(ArgCondition(2, "masked_eq", 4, 4),)),
        SeccompRule("ptrace", action="kill"))
    assert plan.limits.rlimits == (Rlimit("as", 1 << 30, 1 << 30), Rlimit("core", 0, 0), Rlimit("cpu", -1, -1),
                                   Rlimit("nofile", 64, 128))
    assert plan.limits.cgroup == CgroupPlan(memory_max=64 << 20, pids_max=32, cpu_quota_us=50000)
    assert plan.fds == (FdSpec("socket", "unix-listener", 3, path="/run/dev0.sock"),
                        FdSpec("dma", "memfd", 4, size=1 << 20, required=False))
    assert plan.network == NetworkPlan("veth", "jl-dev0", "eth0", "10.200.0.1/30", "10.200.0.2/30")
    assert plan.environment == (("LANG", "C.UTF-8"), ("TERM", "xterm"))
    assert plan.best_effort == frozenset({"cgroup", "landlock"})
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_identity_binds_cover_runtime_paths_and_cwd_may_lie_inside_binds(tmp_path):
    text = (BASE.replace('argv = ["/bin/true"]', 'argv = ["/bin/true"]\ncwd = "/usr/share"')
            + "[[filesystem.bind]]\nsource = \"/usr\"\n")
    plan = build_plan(write(tmp_path, text), euid=0)
    assert [b.target for b in plan.filesystem.binds] == ["/usr"]
    assert {s.target for s in plan.filesystem.symlinks} == {"/bin", "/lib", "/lib64"}


def test_cpu_quota_as_a_table(tmp_path):
    plan = build_plan(write(tmp_path, BASE + "[limits.cgroup]\ncpu = { quota_us = 20000, period_us = 50000 }\n"),
                      euid=0)
    assert plan.limits.cgroup == CgroupPlan(cpu_quota_us=20000, cpu_period_us=50000)


def test_unprivileged_invocation_maps_the_inside_ids_to_the_caller(tmp_path):
    path = write(tmp_path, FULL)
    plan = build_plan(path, euid=1234, egid=2345, environ={})
    assert plan.invocation == "unprivileged"
    assert plan.identity == IdentityPlan(0, 0, (IdMap(0, 1234),), (IdMap(0, 2345),), **PER_DEVICE)
    no_userns = write(tmp_path, BASE + "[namespaces]\nuser = false\n", "nouser.toml")
    assert build_plan(no_userns, euid=1234, egid=2345).identity == IdentityPlan(1234, 2345, **PER_DEVICE)
    assert build_plan(no_userns, euid=0).identity == IdentityPlan(65534, 65534, **PER_DEVICE)


def test_example_profiles_are_valid():
    examples = sorted(EXAMPLES.glob("*.toml"))
    assert {p.name for p in examples} >= {"true.toml", "python-hello.toml"}
    for path in examples:
        plan = build_plan(str(path), environ={})
        assert plan.name == path.stem


@pytest.mark.parametrize("text, expected", [
    (BASE + "[namespaces]\nusr = true\n",
     "P: namespaces.usr: found unknown key, expected one of user, mount, pid, net, ipc, uts, cgroup, hostname, "
     "pid1 (did you mean 'user'?)"),
    ("[program]\nargv = [\"/bin/true\"]\nruntme = \"native\"\n[seccomp]\nallow = [\"@default\"]\n",
     "P: program.runtme: found unknown key, expected one of runtime, argv, executable, cwd, modules, site, ready, "
     "ready_timeout, start, preload (did you mean 'runtime'?)"),
    (BASE + "[namespaces]\nuser = \"yes\"\n", 'P: namespaces.user: found "yes", expected true or false'),
    (BASE + "[namespaces]\npid1 = \"reapr\"\n",
     "P: namespaces.pid1: found \"reapr\", expected one of reaper, program (did you mean 'reaper'?)"),
    (BASE + "[filesystem]\nroot_size = \"64X\"\n",
     'P: filesystem.root_size: found "64X", expected a size: an integer of bytes or a string like "64M" '
     "(suffix K, M, G or T)"),
    (BASE + "[limits.cgroup]\nmemory = -5\n",
     'P: limits.cgroup.memory: found -5, expected a size: an integer of bytes or a string like "64M" '
     "(suffix K, M, G or T)"),
    (BASE + "[[fds]]\nname = \"a\"\nkind = \"memfd\"\nnumber = 3\n[[fds]]\nname = \"b\"\nkind = \"eventfd\"\n"
     "number = 3\n", "P: fds[1].number: found 3, expected a number not already used by fds[0]"),
    (BASE + "[[fds]]\nname = \"a\"\nkind = \"memfd\"\nnumber = 2\n",
     "P: fds[0].number: found 2, expected an integer from 3 to 1023"),
    (BASE + "[[fds]]\nname = \"a\"\nkind = \"socket\"\nnumber = 3\n",
     'P: fds[0].kind: found "socket", expected one of unix-listener, unix-stream, memfd, eventfd, file, notify, checkpoint'),
    (BASE + "[[fds]]\nname = \"a\"\nkind = \"eventfd\"\nnumber = 3\npath = \"/x\"\n",
     "P: fds[0].path: found \"/x\", expected no path for kind 'eventfd' (only for unix-listener and file)"),
    ("[program]\nargv = [\"/bin/true\", \"{fd:sock}\"]\n[seccomp]\nallow = [\"@default\"]\n[[fds]]\n"
     "name = \"socket\"\nkind = \"unix-listener\"\nnumber = 3\n",
     "P: program.argv[1]: found unknown fd 'sock' in \"{fd:sock}\", expected one of the [[fds]] names: socket "
     "(did you mean 'socket'?)"),
    ("[program]\nargv = [\"/bin/true\"]\n[seccomp]\nallow = [\"@default\", \"opennat\"]\n",
     "P: seccomp.allow[1]: found \"opennat\", expected a syscall name of this architecture (did you mean 'openat'?)"),
    ("[program]\nargv = [\"/bin/true\"]\n[seccomp]\nallow = [\"@pyhton\"]\n",
     "P: seccomp.allow[0]: found \"@pyhton\", expected a syscall group: one of " + ", ".join(GROUPS)
     + " (did you mean '@python'?)"),
    (BASE + "[[seccomp.rule]]\nsyscall = \"ioctl\"\nargs = [{ index = 1, op = \"equal\", value = 1 }]\n",
     "P: seccomp.rule[0].args[0].op: found \"equal\", expected one of eq, ne, lt, le, gt, ge, masked_eq"),
    (BASE + "[[seccomp.rule]]\nsyscall = \"ioctl\"\nargs = [{ index = 6, op = \"eq\", value = 1 }]\n",
     "P: seccomp.rule[0].args[0].index: found 6, expected an integer from 0 to 5"),
    (BASE + "[[seccomp.rule]]\nsyscall = \"ioctl\"\nargs = [{ index = 1, op = \"masked_eq\", value = 1 }]\n",
     'P: seccomp.rule[0].args[0].mask: missing, expected an integer from 0 to 18446744073709551615 '
     '(op "masked_eq" needs a mask)'),
    (BASE + "[[seccomp.rule]]\nsyscall = \"kill\"\naction = \"errno\"\nerrno = \"EPREM\"\n",
     "P: seccomp.rule[0].errno: found \"EPREM\", expected an errno name like \"EPERM\" or a number from 1 to 4095 "
     "(did you mean 'EPERM'?)"),
    ("[program]\nargv = [\"/bin/true\"]\n[seccomp]\nallow = [\"read\"]\n",
     'P: seccomp.allow: found no rule allowing execve, expected "execve" or "@default" (the program is started '
     "by execve after the filter is installed)"),
    (BASE + "[limits]\nnofile = { soft = 10, hard = 5 }\n",
     "P: limits.nofile: found soft limit 10 above hard limit 5, expected soft <= hard"),
    (BASE + "[limits]\nnofiles = 5\n",
     "P: limits.nofiles: found unknown key, expected one of as, core, cpu, data, fsize, locks, memlock, msgqueue, "
     "nice, nofile, nproc, rss, rtprio, rttime, sigpending, stack, cgroup (did you mean 'nofile'?)"),
    (BASE + "[limits.cgroup]\ncpu = \"fast\"\n",
     'P: limits.cgroup.cpu: found "fast", expected a share of one CPU like "50%" (above 100% for several CPUs) '
     "or a table like { quota_us = 50000, period_us = 100000 }"),
    (BASE + "[limits.cgroup]\ncpu = { period_us = 50000 }\n",
     "P: limits.cgroup.cpu.quota_us: missing, expected an integer >= 1000"),
    (BASE + "[network]\nmode = \"bridge\"\n",
     'P: network.mode: found "bridge", expected one of none, loopback, veth'),
    (BASE + "[network]\nmode = \"veth\"\nhost_address = \"10.0.0.1/30\"\nsandbox_address = \"10.9.0.2/30\"\n",
     "P: network.sandbox_address: found 10.9.0.2/30, expected an address in the host side's network 10.0.0.0/30"),
    (BASE + "[namespaces]\nnet = false\n[network]\nmode = \"loopback\"\n",
     'P: network.mode: found "loopback" with namespaces.net = false, expected namespaces.net = true (the sandbox '
     "network is set up in a new net namespace)"),
    (BASE + "[filesystem]\n[[filesystem.bind]]\nsource = \"etc\"\n",
     'P: filesystem.bind[0].source: found "etc", expected an absolute path'),
    (BASE + "[filesystem]\n[[filesystem.bind]]\nsource = \"/nonexistent/x\"\n",
     'P: filesystem.bind[0].source: found "/nonexistent/x", which does not exist, expected an existing path '
     "(or optional = true)"),
    (BASE + "[environment]\npass = [\"TERM\"]\nset = { TERM = \"dumb\" }\n",
     'P: environment.pass[0]: found "TERM", expected a variable not also given a value in environment.set'),
    (BASE + "[enforcement]\nbest_effort = [\"cgroups\"]\n",
     'P: enforcement.best_effort[0]: found "cgroups", expected a layer name: one of ' + ", ".join(
         __import__("jailer.plan").plan.LAYERS) + " (did you mean 'cgroup'?)"),
    (BASE + "[filesystem]\ndevices = [\"/dev/no-such-device\"]\n",
     'P: filesystem.devices[0]: found "/dev/no-such-device", which is not a device node on this host, expected an '
     "existing character or block device"),
    (BASE + "[filesystem]\ndevices = [\"/dev/null\"]\n[[filesystem.bind]]\nsource = \"/dev/null\"\n",
     'P: filesystem.devices[0]: found "/dev/null", expected a target not already used by '
     "filesystem.bind[0].target"),
    ("[program]\nargv = [\"/bin/true\"]\ncwd = \"/work\"\n[seccomp]\nallow = [\"@default\"]\n",
     'P: program.cwd: found "/work", expected "/" or a directory the sandbox has: a tmpfs or directory bind target, '
     "a directory inside such a bind, or a parent of a target"),
    (BASE + "[[filesystem.bind]]\nsource = \"/etc\"\ntarget = \"/usr/lib\"\n",
     'P: filesystem.bind[0].target: found "/usr/lib", expected a target that does not hide the runtime\'s '
     "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
    (BASE + "[[filesystem.symlink]]\ntarget = \"/lib64\"\npoints_to = \"/elsewhere\"\n",
     'P: filesystem.symlink[0].target: found "/lib64", expected a target that does not hide the runtime\'s '
     "/lib64"),
    ("[seccomp]\nallow = [\"@default\"]\n", "P: program: missing, expected a [program] table with at least argv"),
    ("[program]\nargv = \"/bin/true\"\n[seccomp]\nallow = [\"@default\"]\n",
     'P: program.argv: found "/bin/true", expected an array of non-empty strings'),
    ("[program]\nargv = []\n[seccomp]\nallow = [\"@default\"]\n",
     "P: program.argv: found an array, expected at least one element (the program)"),
    ("[program]\nargv = [\"no-such-program-anywhere\"]\n[seccomp]\nallow = [\"@default\"]\n",
     'P: program.argv[0]: found "no-such-program-anywhere", expected an absolute path or a program in '
     "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("[program]\nargv = [\"-c\", \"pass\"]\nruntime = \"python\"\nmodules = [\"no_such_module_xyz\"]\n"
     "[seccomp]\nallow = [\"@python\"]\n",
     'P: program.modules[0]: found "no_such_module_xyz", expected a module that {python} can import (not found '
     "on its sys.path)"),
    ("[program]\nargv = [\"/bin/true\"]\nready = \"socket\"\n[seccomp]\nallow = [\"@default\"]\n",
     'P: program.ready: found "socket" without a [[sockets]] entry, expected the socket the program binds itself '
     'declared in [[sockets]], or ready = "exec" or "notify"'),
    ("[program]\nargv = [\"/bin/true\"]\nready_timeout = 5\n[seccomp]\nallow = [\"@default\"]\n",
     'P: program.ready_timeout: found 5, expected no ready_timeout (only used with ready = "socket")'),
    (BASE + "[[sockets]]\nname = \"s\"\npath = \"/s.sock\"\n",
     'P: sockets[0].path: found "/s.sock", expected a socket in a directory of its own like '
     '"/run/vfio-user/device.sock" (jailer binds a private directory there)'),
    (BASE + "[[sockets]]\nname = \"a\"\npath = \"/run/a.sock\"\n[[sockets]]\nname = \"b\"\npath = \"/run/b.sock\"\n",
     'P: sockets[1].path: found "/run/b.sock", expected a directory not already used by sockets[0]'),
    (BASE + "[[fds]]\nname = \"s\"\nkind = \"eventfd\"\nnumber = 3\n[[sockets]]\nname = \"s\"\npath = \"/run/s/s.sock\"\n",
     'P: sockets[0].name: found "s", expected a name not already used by an [[fds]] entry'),
    (BASE + "[namespaces]\nmount = false\n[[sockets]]\nname = \"s\"\npath = \"/run/s/s.sock\"\n",
     "P: sockets: found sockets the program binds itself with namespaces.mount = false, expected "
     "namespaces.mount = true (jailer binds a private directory at each socket's directory)"),
    ("[program]\nargv = [\"/bin/true\", \"{socket:vfio}\"]\n[seccomp]\nallow = [\"@default\"]\n"
     "[[sockets]]\nname = \"vfio-user\"\npath = \"/run/v/s.sock\"\n",
     'P: program.argv[1]: found unknown socket \'vfio\' in "{socket:vfio}", expected one of the [[sockets]] names: '
     "vfio-user (did you mean 'vfio-user'?)"),
    ("[program]\nargv = [\"{env:JAILER_NO_SUCH_DIR}/prog\"]\n[seccomp]\nallow = [\"@default\"]\n",
     'P: program.argv[0]: found "{env:JAILER_NO_SUCH_DIR}/prog" with $JAILER_NO_SUCH_DIR not set, expected '
     "$JAILER_NO_SUCH_DIR to name where the program is (e.g. JAILER_NO_SUCH_DIR=/opt/... jailer run ...)"),
])
def test_each_mistake_gives_its_exact_line(tmp_path, text, expected):
    import sys

    assert problems(tmp_path, text) == [expected.replace("{python}", sys.executable)]


def test_duplicate_tables_and_duplicate_targets(tmp_path):
    text = BASE + "[[filesystem.tmpfs]]\ntarget = \"/tmp\"\n[[filesystem.tmpfs]]\ntarget = \"/tmp\"\nmode = \"9\"\n"
    assert problems(tmp_path, text) == [
        'P: filesystem.tmpfs[1].target: found "/tmp", expected a target not already used by filesystem.tmpfs[0].target',
        'P: filesystem.tmpfs[1].mode: found "9", expected a file mode: an integer like 0o755 or a string like "755"',
    ]
    assert problems(tmp_path, BASE + "[program]\n") == ["P:6:1: TOML syntax error: table [program] is defined twice"]


def test_syscall_in_allow_and_in_a_rule_is_refused(tmp_path):
    text = ("[program]\nargv = [\"/bin/true\"]\n[seccomp]\nallow = [\"@default\", \"ioctl\"]\n[[seccomp.rule]]\n"
            "syscall = \"ioctl\"\nargs = [{ index = 1, op = \"eq\", value = 1 }]\n")
    assert problems(tmp_path, text) == [
        'P: seccomp.allow[1]: found "ioctl", expected it either in seccomp.allow or in [[seccomp.rule]], not both '
        "(an unconditional allow would void the rule)"]
    # A group member that has its own rules is governed by the rules alone.
    plan = build_plan(write(tmp_path, text.replace(', "ioctl"', ', "@python"')), euid=0)
    assert [r for r in plan.seccomp.rules if r.syscall == "ioctl"] == [
        SeccompRule("ioctl", args=(ArgCondition(1, "eq", 1),))]


def test_all_problems_are_collected_at_once(tmp_path):
    text = ("[program]\nargv = [\"/bin/true\"]\ncwd = \"relative\"\n[namespaces]\nusr = true\nuts = 1\n"
            "[seccomp]\nallow = [\"@default\", \"reed\"]\n[limits]\nas = \"1Q\"\n")
    lines = problems(tmp_path, text)
    assert sorted(line.split(": ")[1] for line in lines) == [
        "limits.as", "namespaces.usr", "namespaces.uts", "program.cwd", "seccomp.allow[1]"]


@pytest.mark.parametrize("text, expected", [
    ("[program]\nargv = [\"/bin/true]\n", "P:2:20: TOML syntax error: Unbalanced quotes"),
    ("[program]\nargv = [\"/bin/true\"]\n[seccomp\n", "P:3:1: TOML syntax error: Key group not on a line by itself."),
    ("name = \"x\"\nname = \"y\"\n", "P:2:1: TOML syntax error: Duplicate keys!"),
    ("[program]\nargv = [\"/bin/true\"]\n[namespaces]\nuser = tru\n",
     "P:4:1: TOML syntax error: invalid value 'tru'"),
    ("[program]\nargv = [\"/bin/true\"]\nruntime = [ \"/bin/true\", false,]\n",
     "P:3:1: TOML syntax error: cannot parse this line (the parser failed with IndexError; check for mixed-type "
     "arrays and unbalanced quotes or brackets)"),
])
def test_toml_syntax_errors_name_the_file_line_and_column(tmp_path, text, expected):
    assert problems(tmp_path, text) == [expected]


def test_unreadable_profile_is_one_line(tmp_path):
    with pytest.raises(ProfileError) as caught:
        build_plan(str(tmp_path / "missing.toml"))
    assert caught.value.problems == [f"{tmp_path / 'missing.toml'}: cannot read the profile: No such file or "
                                     "directory"]


def test_sizes():
    assert [parse_size(v) for v in (0, 4096, "4096", "64K", "64M", "1G", "2t", "8 M")] == [
        0, 4096, 4096, 64 << 10, 64 << 20, 1 << 30, 2 << 40, 8 << 20]
    for bad in ("", "M", "1.5G", "64MB", -1, True, 1.0):
        with pytest.raises(Exception):
            parse_size(bad)


def test_every_group_member_is_known_to_libseccomp_on_some_architecture():
    import pyseccomp

    for group in GROUPS:
        for name in expand(group):
            assert pyseccomp.resolve_syscall(pyseccomp.Arch.X86_64, name) >= 0 or \
                pyseccomp.resolve_syscall(pyseccomp.Arch.AARCH64, name) >= 0, (group, name)


def test_profile_module_import_stays_cheap():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, jailer.profile; print(sorted(m for m in sys.modules "
                          "if m in ('toml', 'pyseccomp', 'click', 'difflib', 'jailer.runtime')))"],
                         capture_output=True, text=True, check=True, cwd=REPO, env={**os.environ})
    assert out.stdout.strip() == "[]"


def allow_only(plan):
    """A preexec function loading a kill-by-default filter that allows exactly the plan's syscalls."""
    import pyseccomp

    def confine():
        confined = pyseccomp.SyscallFilter(defaction=pyseccomp.KILL_PROCESS)
        for rule in plan.seccomp.rules:
            confined.add_rule(pyseccomp.ALLOW, rule.syscall)
        confined.load()
    return confine


def test_python_group_is_enough_to_start_python_and_import_the_devices(tmp_path):
    """The "@python" group, loaded as a kill-by-default filter right before exec, runs the python runtime."""
    import subprocess

    profile = write(tmp_path, '[program]\nruntime = "python"\nmodules = ["devices"]\nargv = ["-c", '
                    '"import devices, click, toml, json, selectors, socket, struct; print(\'ok\')"]\n'
                    '[seccomp]\nallow = ["@python"]\n')
    plan = build_plan(profile, environ={})

    done = subprocess.run(plan.program.argv, env=dict(plan.environment), preexec_fn=allow_only(plan), capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr


def test_the_man_page_example_is_a_valid_profile(tmp_path):
    page = (REPO / "man" / "jailer-profile.5").read_text()
    example = page.split(".SH EXAMPLE\n.EX\n", 1)[1].split("\n.EE\n", 1)[0].replace("\\-", "-")
    plan = build_plan(write(tmp_path, example), euid=0, environ={})
    assert plan.name == "gpio0" and plan.fds[0].number == 3 and plan.program.runtime == "python"
    assert SeccompRule("socket", action="errno", errno=13) in plan.seccomp.rules


DEVICE_SERVER = """
import mmap, os, selectors, signal, socket, struct, sys
signal.signal(signal.SIGTERM, lambda *_: None)
listener = socket.socket(fileno=int(sys.argv[1]))
client, _ = listener.accept()
selector = selectors.DefaultSelector()
selector.register(client, selectors.EVENT_READ)
selector.select(timeout=10)
message, ancillary, _, _ = client.recvmsg(64, socket.CMSG_SPACE(2 * 4))
dma_fd, irq_fd = struct.unpack("2i", ancillary[0][2])
dma = mmap.mmap(dma_fd, 4096)
dma[:len(message)] = message.upper()
os.eventfd_write(irq_fd, 1)
client.sendall(b"done")
"""


def test_vfio_user_group_serves_a_client_passing_dma_and_irq_descriptors(tmp_path):
    """The descriptor traffic of a vfio-user server, under a kill-by-default filter built from "@vfio-user"."""
    import socket
    import struct
    import subprocess

    profile = write(tmp_path, '[program]\nruntime = "python"\nargv = ["-c", ' + json.dumps(DEVICE_SERVER)
                    + ', "{fd:listener}"]\n[seccomp]\nallow = ["@vfio-user"]\n[[fds]]\nname = "listener"\nkind = "unix-listener"\n'
                    'number = 3\n')
    plan = build_plan(profile, environ={})

    path = str(tmp_path / "dev.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        argv = [arg.replace("{fd:listener}", str(listener.fileno())) for arg in plan.program.argv]
        server = subprocess.Popen(argv, env=dict(plan.environment), preexec_fn=allow_only(plan),
                                  pass_fds=(listener.fileno(),), stderr=subprocess.PIPE, text=True)
        dma_fd, irq_fd = os.memfd_create("dma"), os.eventfd(0)
        os.ftruncate(dma_fd, 4096)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(20)
                client.connect(path)
                client.sendmsg([b"dma-write"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                 struct.pack("2i", dma_fd, irq_fd))])
                assert client.recv(4) == b"done"
            assert server.wait(timeout=20) == 0, server.stderr.read()
            assert os.pread(dma_fd, 9, 0) == b"DMA-WRITE" and os.eventfd_read(irq_fd) == 1
        finally:
            server.kill()
            server.wait()
            server.stderr.close()
            os.close(dma_fd)
            os.close(irq_fd)


@pytest.mark.parametrize("name", ["true.toml", "python-hello.toml"])
def test_example_programs_run_under_their_own_seccomp_rules(name):
    import subprocess

    plan = build_plan(str(EXAMPLES / name), environ={})
    assert all(rule.action == "allow" and not rule.args for rule in plan.seccomp.rules)
    # close_fds=False: after the filter is loaded the harness must do nothing but execve, like the launcher.
    done = subprocess.run(plan.program.argv, executable=plan.program.executable, env=dict(plan.environment),
                          preexec_fn=allow_only(plan), close_fds=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_env_placeholders_name_where_the_program_is(tmp_path):
    """A shipped profile for a program each user installs elsewhere: {env:NAME} in argv and executable."""
    profile = tmp_path / "p.toml"
    profile.write_text('[program]\nargv = ["{env:TOOLS}/true", "--flag={env:TOOLS}"]\n'
                       '[seccomp]\nallow = ["@default"]\n')
    plan = build_plan(str(profile), environ={"TOOLS": "/usr/bin"})
    assert plan.program.executable == "/usr/bin/true" and plan.program.argv[1:] == ("--flag=/usr/bin",)
