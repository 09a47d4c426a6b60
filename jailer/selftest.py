"""`jailer selftest PROFILE`: prove from inside that a profile's sandbox holds.

The profile is copied with only its [program] replaced by the escape probe
(jailer.escape_probe, on the python runtime with the jailer package bound read-only),
and run with `jailer run`: same namespaces, mounts, seccomp filter, limits and fds.
The host side sets up what the probe must not reach (a marker file outside every bind,
a sleeping host process, a TCP listener on 127.0.0.1, a terminal on stdin), then reads
the probe's JSON report and prints one verdict per check.

For each check decided by the seccomp filter, the outcome the profile's rules call for
is computed from the plan (argument rules compared at the kernel's width: ioctl's
request is 32 bits) and shown next to the observed one.

The probe runs each attempt in a forked child. When the profile's filter has no rule
for the syscalls that takes (clone without namespace flags, pipe2, wait4, and getuid,
getgid, uname, clock_nanosleep around the attempts), the derived
profile allows exactly those and the report lists them under "added_for_probe". The
probe is a Python program: a profile for a native program (a C device on libvfio-user,
say) allows what its program calls, not what CPython's start-up does, so for such a
profile the start-up calls its filter has no rule for are added too (ioctl only for the
terminal queries CPython makes, never TIOCSTI) and listed the same way. None of them is
a call an escape check tries.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import uuid

from jailer import escape_probe as probe
from jailer.errors import JailerError
from jailer.layers.seccomp import KERNEL_32BIT_ARGS

SANDBOX_TIMEOUT = 120
CANARY_NAME = "readonly-canary"
CANARY_TARGET = "/run/jailer-selftest/readonly-canary"
MARKER_DIRS = ("/tmp", "/var/tmp", "/root", "/home")
ACTION_SEVERITY = ("allow", "log", "errno", "trap", "kill_thread", "kill")

# check name -> (syscall, its arguments as the probe passes them, None = not compared)
SECCOMP_DECIDED = {
    "ptrace_traceme": ("ptrace", (probe.PTRACE_TRACEME,)),
    "ptrace_attach_pid1": ("ptrace", (probe.PTRACE_SEIZE, 1)),
    "mount_tmpfs": ("mount", ()),
    "user_namespace": ("unshare", (probe.CLONE_NEWUSER,)),
    "clone_new_user": ("clone", (probe.CLONE_NEWUSER | signal.SIGCHLD,)),
    "tiocsti": ("ioctl", (None, probe.TIOCSTI)),
    "tiocsti_high_bits": ("ioctl", (None, probe.TIOCSTI_HIGH_BITS)),
    "clone3": ("clone3", ()),
    "io_uring_setup": ("io_uring_setup", ()),
    "bpf": ("bpf", (probe.BPF_MAP_CREATE,)),
    "perf_event_open": ("perf_event_open", ()),
    "keyctl": ("keyctl", (probe.KEYCTL_GET_KEYRING_ID,)),
    "add_key": ("add_key", ()),
    "init_module": ("init_module", ()),
}


# CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET: a fork for the probe never needs them.
CLONE_NAMESPACE_FLAGS = 0x7E020000
PROBE_MACHINERY = {
    "clone": {"syscall": "clone", "args": [{"index": 0, "op": "masked_eq", "mask": CLONE_NAMESPACE_FLAGS,
                                            "value": 0}]},
    "pipe2": {"syscall": "pipe2"},
    "wait4": {"syscall": "wait4"},
    # read between attempts (its own namespace's ids and hostname) and the pause before a re-check
    "getuid": {"syscall": "getuid"},
    "getgid": {"syscall": "getgid"},
    "uname": {"syscall": "uname"},
    "clock_nanosleep": {"syscall": "clock_nanosleep"},
}


class SelftestError(JailerError):
    """The probe could not be run inside the sandbox, so nothing was proven."""


# --- what the profile's seccomp rules call for ---------------------------------------------

def _condition_holds(syscall, condition, args):
    if condition.index >= len(args) or args[condition.index] is None:
        return None
    width = 32 if condition.index in KERNEL_32BIT_ARGS.get(syscall, ()) else 64
    mask = (1 << width) - 1
    value, wanted = args[condition.index] & mask, condition.value & mask
    if condition.op == "masked_eq":
        return value & (condition.mask & mask) == wanted
    return {"eq": value == wanted, "ne": value != wanted, "lt": value < wanted, "le": value <= wanted,
            "gt": value > wanted, "ge": value >= wanted}[condition.op]


def seccomp_action(seccomp, syscall, args):
    """(action, errno) the filter should apply to syscall(args); the most severe matching rule wins.

    Returns None when a rule depends on an argument the probe does not fix (a fd number).
    Independent of the launcher's own rule evaluation on purpose: this is the oracle the
    compiled filter is checked against, and it compares at the kernel's argument width.
    """
    if not seccomp.enabled:
        return "allow", None
    matching = []
    for rule in seccomp.rules:
        if rule.syscall != syscall:
            continue
        holds = [_condition_holds(syscall, condition, args) for condition in rule.args]
        if None in holds:
            return None
        if all(holds):
            matching.append(rule)
    if not matching:
        return seccomp.default_action, seccomp.default_errno
    rule = max(matching, key=lambda r: ACTION_SEVERITY.index(r.action))
    return rule.action, rule.errno


def expected_outcome(action):
    """The probe outcome an action produces; None when the kernel decides (allow, log)."""
    if action is None:
        return None
    name, code = action
    if name in ("kill", "kill_thread", "trap"):
        return "signal:SIGSYS"
    if name == "errno":
        return probe.errno_name(code)
    return None


def expectations(plan):
    return {check: expected_outcome(seccomp_action(plan.seccomp, syscall, args))
            for check, (syscall, args) in SECCOMP_DECIDED.items()}


# --- the probe's run ----------------------------------------------------------------------

def probe_arguments(plan, targets):
    """Probe options that make it check the plan's own fds, limits and the host targets."""
    args = ["--marker", targets.marker, "--host-pid", str(targets.host_pid), "--readonly-path", CANARY_TARGET,
            "--tcp-port", str(targets.tcp_port),
            "--expect-fds", ",".join(str(n) for n in sorted({0, 1, 2, *(fd.number for fd in plan.fds)}))]
    for limit in plan.limits.rlimits:
        args += ["--rlimit", f"{limit.name}={limit.soft}:{limit.hard}"]
    if plan.limits.cgroup and plan.limits.cgroup.memory_max:
        args += ["--memory-hog", str(2 * plan.limits.cgroup.memory_max)]
    return args


# What the escape checks call: never allowed for the probe's start-up, so their verdicts stay the profile's.
PROBED = frozenset(("ioctl", "ptrace", "mount", "umount2", "unshare", "clone", "clone3", "io_uring_setup", "bpf",
                    "perf_event_open", "keyctl", "add_key", "init_module", "socket", "connect", "prctl", "kill"))


def python_start_up() -> dict:
    """What CPython's start-up calls ("@python"), as rules: ioctl only for the requests it
    makes (isatty, the terminal size, close-on-exec), so the TIOCSTI check stays the profile's."""
    from jailer.syscall_groups import expand

    rules = {name: [{"syscall": name}] for name in expand("@python") if name not in PROBED}
    rules["ioctl"] = [{"syscall": "ioctl", "args": [{"index": 1, "op": "eq", "value": request}]}
                      for request in (0x5401, 0x5413, 0x5451)]   # TCGETS, TIOCGWINSZ, FIOCLEX
    return rules


def machinery_missing(seccomp, runtime: str = "python") -> dict:
    """{syscall: rules} of the probe's own calls (fork, pipe, wait, ids, uname, sleep, and for
    a native program's profile CPython's start-up) on which the filter has no rule, so its
    default would apply."""
    if not seccomp.enabled or seccomp.default_action in ("allow", "log"):
        return {}
    ruled = {rule.syscall for rule in seccomp.rules}
    added = {name: [rule] for name, rule in PROBE_MACHINERY.items() if name not in ruled}
    if runtime != "python":   # on top of the profile's own conditions (an fcntl of F_GETFL only, say)
        allowed = {rule.syscall for rule in seccomp.rules if rule.action == "allow" and not rule.args}
        added.update({name: rules for name, rules in python_start_up().items() if name not in allowed})
    return added


def probe_profile(data, probe_args, scratch, machinery=()):
    """The profile's TOML data with the program replaced by the probe.

    `machinery` holds the rules to add for the probe (machinery_missing). unix-listener sockets
    move to scratch, so a self-test never replaces the socket of a device that is
    running from the same profile. One read-only bind is added: a world-writable canary
    file (see readonly_canary), so a write to it can only be refused by the mount itself.
    """
    derived = dict(data)
    filesystem = dict(data.get("filesystem", {}))
    filesystem["bind"] = [*filesystem.get("bind", []), {"source": os.path.join(scratch, CANARY_NAME),
                                                         "target": CANARY_TARGET}]
    derived["filesystem"] = filesystem
    if machinery:
        seccomp = dict(data.get("seccomp", {}))
        seccomp["rule"] = [*seccomp.get("rule", []), *(rule for rules in machinery.values() for rule in rules)]
        derived["seccomp"] = seccomp
    derived["program"] = {"runtime": "python", "argv": ["-m", "jailer.escape_probe", "--stream", *probe_args],
                          "modules": ["jailer"]}
    if data.get("program", {}).get("start") == "zero-exec":
        derived["program"]["start"] = "zero-exec"    # the probe starts as the program would
    if "ready" in data.get("program", {}):
        # The probe never says READY=1 nor listens: a staged profile is tested in its set-up
        # stage, the weaker one (steady rules only take permissions away), so what it blocks
        # holds later too. A program's own socket directory is bound as for the device.
        derived["program"]["ready"] = data["program"]["ready"]
        if data["program"]["ready"] == "socket":
            derived["program"]["ready_timeout"] = 3600
    derived["fds"] = [dict(fd, path=os.path.join(scratch, f"{fd['name']}.sock"))
                      if fd.get("kind") == "unix-listener" and "path" in fd else fd
                      for fd in data.get("fds", []) if isinstance(fd, dict)]
    return derived


def readonly_canary(path):
    """A file anyone may write by its mode (whoever owns it), bound read-only into the sandbox."""
    with open(path, "w") as canary:
        canary.write("the sandbox must not be able to write this\n")
    os.chmod(path, 0o666)


class HostTargets(contextlib.ExitStack):
    """What the sandboxed probe must not reach; everything is removed on exit."""

    def __init__(self, binds):
        super().__init__()
        self.binds = [os.path.realpath(bind.source) for bind in binds]

    def __enter__(self):
        super().__enter__()
        self.marker = self._marker_file()
        sleeper = subprocess.Popen(["sleep", str(SANDBOX_TIMEOUT)], stdin=subprocess.DEVNULL)
        self.callback(sleeper.wait)
        self.callback(sleeper.kill)
        self.host_pid = sleeper.pid
        listener = self.enter_context(socket.create_server(("127.0.0.1", 0)))
        self.tcp_port = listener.getsockname()[1]
        self.terminal, self.terminal_slave = os.openpty()
        self.callback(os.close, self.terminal)
        self.callback(os.close, self.terminal_slave)
        self.scratch = self.enter_context(tempfile.TemporaryDirectory(prefix="jailer-selftest-"))
        readonly_canary(os.path.join(self.scratch, CANARY_NAME))
        return self

    def _marker_file(self):
        for directory in MARKER_DIRS:
            if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
                continue
            if any(directory == b or directory.startswith(b.rstrip("/") + "/") for b in self.binds):
                continue
            folder = self.enter_context(tempfile.TemporaryDirectory(prefix="jailer-marker-", dir=directory))
            os.chmod(folder, 0o755)
            path = os.path.join(folder, f"marker-{uuid.uuid4().hex}")
            with open(path, "w") as marker:
                marker.write("host file: the sandbox must not read this\n")
            os.chmod(path, 0o644)
            return path
        raise SelftestError(f"no writable host directory outside the profile's binds for the marker file "
                            f"(tried {', '.join(MARKER_DIRS)})")


def supplied_fds(fds, scratch, stack):
    """(--fd options, fd numbers) for the required fds the launcher does not create itself."""
    options, numbers = [], []
    for spec in fds:
        if not spec.required or spec.kind in ("eventfd", "notify") or (spec.kind in ("unix-listener", "file") and spec.path) \
                or (spec.kind == "memfd" and spec.size is not None) or spec.kind == "checkpoint":
            continue
        if spec.kind == "unix-stream":
            _own_end, their_end = (stack.enter_context(end) for end in socket.socketpair())
            fd = their_end.fileno()
        elif spec.kind == "unix-listener":
            listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            listener.bind(os.path.join(scratch, f"{spec.name}.sock"))
            listener.listen()
            fd = listener.fileno()
        elif spec.kind == "memfd":
            fd = os.memfd_create(spec.name)
            os.ftruncate(fd, 4096)
            stack.callback(os.close, fd)
        else:
            fd = os.open(os.path.join(scratch, f"{spec.name}.file"), os.O_RDWR | os.O_CREAT, 0o600)
            stack.callback(os.close, fd)
        options += ["--fd", f"{spec.name}={fd}"]
        numbers.append(fd)
    return options, numbers


def run_in_sandbox(profile_path, targets, fd_options, fds, checks):
    """One `jailer run` of the derived profile on `checks`; returns (exit status, events, stderr)."""
    # --no-cache: the derived profile is used once, its cache entry would only be left behind.
    # --no-restart: a probe that fails says so once, it is not started again.
    argv = [sys.executable, "-m", "jailer", "run", "--no-cache", "--no-restart", *fd_options, profile_path,
            "--", "--only", ",".join(checks)]
    try:
        result = subprocess.run(argv, stdin=targets.terminal_slave, capture_output=True, text=True,
                                pass_fds=fds, timeout=SANDBOX_TIMEOUT, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        raise SelftestError(f"the sandboxed probe did not finish within {SANDBOX_TIMEOUT} s") from exc
    events = []
    for line in result.stdout.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return result.returncode, events, result.stderr


def run_probe(profile_path, targets, fd_options, fds):
    """(probe context, results of every check), re-running the probe on the remaining checks
    whenever the sandbox ends inside one (a launcher may kill the whole sandbox on a seccomp
    violation): that check's outcome is the signal that ended the sandbox."""
    results, context, remaining = {}, None, list(probe.CHECKS)
    while remaining:
        status, events, stderr = run_in_sandbox(profile_path, targets, fd_options, fds, remaining)
        started = None
        for event in events:
            context = event.get("context", context)
            if "starting" in event:
                started = event["starting"]
            elif "result" in event:
                results[event["result"]["name"]] = event["result"]
                started = None
        remaining = [name for name in remaining if name not in results]
        if not remaining:
            break
        if started is None or status <= 128:
            detail = (stderr.strip().splitlines() or ["no output"])[-1]
            hint = (". The profile's seccomp filter must allow the probe's Python start-up"
                    if status > 128 and not results else "")
            raise SelftestError(f"the probe did not run inside the sandbox ({decode_status(status)}): "
                                f"{detail}{hint}")
        name = probe.signal_name(status - 128)
        results[started] = probe.check(started, probe.BLOCKED, {"outcome": f"signal:{name}", "signal": name},
                                       detail="the sandbox was ended")
        remaining.remove(started)
    return context, [results[name] for name in probe.CHECKS]


def decode_status(status):
    if status < 0:
        return f"killed by {probe.signal_name(-status)}"
    if status > 128:
        return f"exit status {status} (signal {probe.signal_name(status - 128)})"
    return f"exit status {status}"


def selftest(profile_path, euid=None):
    """Run the probe inside the profile's sandbox; returns the report with verdicts and expectations."""
    import toml

    from jailer.profile import build_plan, load_profile

    plan = build_plan(profile_path, euid=euid)
    data = load_profile(profile_path)
    added = machinery_missing(plan.seccomp, plan.program.runtime)
    with HostTargets(plan.filesystem.binds) as targets:
        derived_path = os.path.join(targets.scratch, f"selftest-{plan.name}.toml")
        with open(derived_path, "w") as derived:
            toml.dump(probe_profile(data, probe_arguments(plan, targets), targets.scratch, added), derived)
        os.chmod(targets.scratch, 0o755)
        os.chmod(derived_path, 0o644)
        probe_plan = build_plan(derived_path, euid=euid)
        fd_options, fds = supplied_fds(probe_plan.fds, targets.scratch, targets)
        fd_options += [f"--socket={entry.name}={os.path.join(targets.scratch, entry.name + '.sock')}"
                       for entry in probe_plan.sockets]
        context, checks = run_probe(derived_path, targets, fd_options, fds)
    wanted = expectations(probe_plan)
    for check in checks:
        if wanted.get(check["name"]) is not None:
            check["expected"] = wanted[check["name"]]
            check["as_expected"] = check["outcome"] == check["expected"]
    return {"profile": str(profile_path), "name": plan.name, "invocation": plan.invocation,
            "overall": probe.overall(checks), "added_for_probe": sorted(added),
            "uid": context["uid"], "gid": context["gid"], "seccomp": context["seccomp"],
            "escaped": [check["name"] for check in checks if check["verdict"] == probe.ESCAPED], "checks": checks}


def format_report(report):
    lines = [f"jailer selftest {report['profile']} ({report['invocation']} invocation, probe uid "
             f"{report['uid']}, Seccomp {report['seccomp']})"]
    width = max(len(check["name"]) for check in report["checks"])
    for check in report["checks"]:
        verdict = check["verdict"].upper() if check["verdict"] != probe.BLOCKED else check["verdict"]
        line = f"  {verdict:<8} {check['name']:<{width}}  {check['outcome']}"
        if "expected" in check and not check["as_expected"]:
            line += f"  (profile calls for {check['expected']})"
        if check.get("detail"):
            line += f"  [{check['detail']}]"
        lines.append(line)
    if report["added_for_probe"]:
        lines.append(f"  (allowed for the probe's own start-up and forks: {', '.join(report['added_for_probe'])})")
    counts = {}
    for check in report["checks"]:
        counts[check["verdict"]] = counts.get(check["verdict"], 0) + 1
    summary = ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items()))
    lines.append(f"overall: {report['overall']} ({summary})")
    return "\n".join(lines)


def _command():
    import click

    @click.command("selftest", help="Run the escape probe inside PROFILE's sandbox and print a verdict per "
                   "check. Exit status 0 when every escape was blocked, 1 otherwise.")
    @click.argument("profile", type=click.Path(dir_okay=False))
    @click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
    def selftest_command(profile, as_json):
        report = selftest(profile)
        click.echo(json.dumps(report, indent=1) if as_json else format_report(report))
        sys.exit(0 if report["overall"] == probe.BLOCKED else 1)

    return selftest_command


selftest_command = _command()

