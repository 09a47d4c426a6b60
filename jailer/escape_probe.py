"""Try to break out of the sandbox this runs in, and report each attempt as JSON.

Run inside a sandbox (`jailer selftest` does it for a profile) or anywhere else:
outside a sandbox the probe must report the escapes, which is how it is tested.
Standalone on purpose: stdlib + ctypes only, no other jailer module, so it runs in
a minimal Python runtime.

Every attempt runs in a forked child, so a seccomp kill ends only the child; the child's
fate (errno, exit code, or the signal that killed it) is the outcome. A check's
verdict is "blocked" when the attempt was refused (one of the check's denial
errnos, or the child was killed), "escaped" when it worked or got past the
permission checks, "skipped" when its input was not given, "error" when the
probe itself could not run it.

Output: one JSON report, or with --stream JSON lines as the checks run (for launchers
that kill the whole sandbox on a seccomp violation: the last "starting" line names the
check that was in progress).

Exit status: 0 every check blocked or skipped, 1 something escaped, 2 a check errored.
"""

import argparse
import ctypes
import errno
import json
import os
import resource
import signal
import socket
import sys
import time

BLOCKED, ESCAPED, SKIPPED, ERROR = "blocked", "escaped", "skipped", "error"

# Syscall numbers per architecture (asm/unistd.h), only those the probe calls raw.
SYSCALL_NUMBERS = {
    "x86_64": {"ioctl": 16, "clone": 56, "ptrace": 101, "mount": 165, "umount2": 166, "init_module": 175,
               "add_key": 248, "keyctl": 250, "unshare": 272, "perf_event_open": 298, "bpf": 321,
               "io_uring_setup": 425, "clone3": 435},
    "aarch64": {"ioctl": 29, "clone": 220, "ptrace": 117, "mount": 40, "umount2": 39, "init_module": 105,
                "add_key": 217, "keyctl": 219, "unshare": 97, "perf_event_open": 241, "bpf": 280,
                "io_uring_setup": 425, "clone3": 435},
}

TIOCSTI = 0x5412
TIOCSTI_HIGH_BITS = 0x1_0000_5412    # the kernel truncates ioctl's cmd to 32 bits: still TIOCSTI
PTRACE_TRACEME, PTRACE_SEIZE = 0, 0x4206
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
PR_SET_NO_NEW_PRIVS = 38
MNT_DETACH = 2
KEY_SPEC_PROCESS_KEYRING, KEY_SPEC_SESSION_KEYRING = -2, -3
KEYCTL_GET_KEYRING_ID = 0
BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY = 0, 2
PERF_TYPE_SOFTWARE = 1
PERF_EXCLUDE_KERNEL, PERF_EXCLUDE_HV = 1 << 5, 1 << 6   # perf_event_attr flag bits
CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")

# Refusals a sandbox layer can produce (seccomp's errno is the profile's choice, so
# ENOSYS/EPERM/EACCES are always accepted); anything else means the call went through.
SECCOMP_DENIALS = {errno.EPERM, errno.EACCES, errno.ENOSYS}

CHILD_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
MEMORY_HOG_TIMEOUT = 30.0
MEMORY_HOG_STEP = 4 << 20
MEMORY_HOG_REPORTS = 256

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class ProbeError(Exception):
    """The probe could not carry out a check (not a verdict about the sandbox)."""


def syscall(name, *args):
    """Call a syscall by name with integer/pointer args passed at full register width."""
    numbers = SYSCALL_NUMBERS.get(os.uname().machine)
    if numbers is None:
        raise ProbeError(f"no syscall table for architecture {os.uname().machine}")
    wide = [ctypes.c_long(a) if isinstance(a, int) and a < 0 else
            ctypes.c_ulong(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    result = _libc.syscall(ctypes.c_long(numbers[name]), *wide)
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, f"{name}: {os.strerror(code)}")
    return result


def errno_name(code):
    return errno.errorcode.get(code, str(code))


def signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def verdict_for(outcome, denials):
    """Map an attempt's outcome to a verdict: refused (errno in denials, or killed) is blocked."""
    if outcome.get("signal"):
        return BLOCKED
    if outcome.get("errno") is not None:
        return BLOCKED if outcome["errno"] in denials else ESCAPED
    return ESCAPED


def attempt(action, *args):
    """Run action(*args) here; its result is the outcome, an OSError its errno."""
    try:
        return {"outcome": "ok", "value": action(*args)}
    except OSError as exc:
        return {"outcome": errno_name(exc.errno), "errno": exc.errno}


def in_child(action, *args, timeout=CHILD_TIMEOUT):
    """Run action(*args) in a forked child so a seccomp kill ends only the child.

    Returns the outcome dict of attempt(), or {"outcome": "signal:SIGSYS", "signal": ...}
    when the child was killed, or an exit code if it died without reporting. An action
    may call progress(value) first (see report_progress); the last value reported is
    kept as "progress", so a killed child still says how far it got.
    """
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        raise ProbeError(f"cannot fork a child for the attempt: {exc.strerror}") from exc
    if pid == 0:
        os.close(read_end)
        status = 0
        global _progress_fd
        _progress_fd = write_end
        try:
            os.write(write_end, json.dumps(attempt(action, *args)).encode() + b"\n")
        except BaseException:
            status = 70
        os._exit(status)
    os.close(write_end)
    try:
        status = _wait_bounded(pid, timeout)
        lines = [json.loads(line) for line in _read_all(read_end).splitlines()]
    finally:
        os.close(read_end)
    progress = [line["progress"] for line in lines if "progress" in line]
    result = [line for line in lines if "outcome" in line]
    if os.WIFSIGNALED(status):
        name = signal_name(os.WTERMSIG(status))
        outcome = {"outcome": f"signal:{name}", "signal": name}
    elif result:
        outcome = result[-1]
    else:
        outcome = {"outcome": f"exit:{os.WEXITSTATUS(status)}", "exit_code": os.WEXITSTATUS(status)}
    return outcome | ({"progress": progress[-1]} if progress else {})


_progress_fd = None


def report_progress(value):
    """Called by an action running under in_child: how far it got, in case it is killed."""
    os.write(_progress_fd, json.dumps({"progress": value}).encode() + b"\n")


def _wait_bounded(pid, timeout):
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _read_all(fd):
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def proc_status():
    with open("/proc/self/status") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


# --- the attempts -----------------------------------------------------------------------

def read_file(path):
    with open(path, "rb") as handle:
        return len(handle.read(4096))


def open_for_writing(path):
    """Open a file for writing (creating a fresh one in a directory); writes nothing."""
    if os.path.isdir(path):
        name = os.path.join(path, f".jailer-probe-{os.getpid()}")
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(name)
        return name
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    return path


def ptrace_traceme():
    return syscall("ptrace", PTRACE_TRACEME, 0, 0, 0)


def ptrace_seize(pid):
    """PTRACE_SEIZE does not stop the tracee; the child's exit detaches it again."""
    return syscall("ptrace", PTRACE_SEIZE, pid, 0, 0)


def mount_tmpfs(target):
    syscall("mount", b"jailer-probe", target.encode(), b"tmpfs", 0, None)
    syscall("umount2", target.encode(), MNT_DETACH)
    return target


def unshare_user():
    return syscall("unshare", CLONE_NEWUSER)


def clone_new_user():
    """The same escape through clone(2), whose flags a filter can see (unlike clone3's)."""
    pid = syscall("clone", CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return "created a process in a new user namespace"


def tiocsti(fd, request):
    """Push one byte into the terminal's input queue (a NUL: harmless if it lands)."""
    byte = ctypes.c_char(b"\0")
    return syscall("ioctl", fd, request, ctypes.byref(byte))


class CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size", "tls")]


def clone3_new_namespaces():
    args = CloneArgs(flags=CLONE_NEWUSER | CLONE_NEWNS, exit_signal=signal.SIGCHLD)
    pid = syscall("clone3", ctypes.byref(args), ctypes.sizeof(args))
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return "created a process in new user+mount namespaces"


def io_uring_setup():
    params = (ctypes.c_uint8 * 120)()
    os.close(syscall("io_uring_setup", 1, ctypes.byref(params)))
    return "io_uring instance created"


def bpf_map_create():
    attr = (ctypes.c_uint32 * 32)(BPF_MAP_TYPE_ARRAY, 4, 4, 1)
    os.close(syscall("bpf", BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr)))
    return "bpf array map created"


class PerfEventAttr(ctypes.Structure):
    """The head of struct perf_event_attr; `size` tells the kernel the rest is zero."""
    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
                ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64), ("rest", ctypes.c_uint8 * 80)]


def perf_event_open():
    """Count this process's CPU clock in user space only: what perf_event_paranoid 2 grants anyone."""
    attr = PerfEventAttr(type=PERF_TYPE_SOFTWARE, size=ctypes.sizeof(PerfEventAttr),
                         flags=PERF_EXCLUDE_KERNEL | PERF_EXCLUDE_HV)
    os.close(syscall("perf_event_open", ctypes.byref(attr), 0, -1, -1, 0))
    return "perf event opened"


def keyctl_session_keyring():
    return syscall("keyctl", KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0)


def add_key():
    return syscall("add_key", b"user", b"jailer-probe", b"x", 1, KEY_SPEC_PROCESS_KEYRING)


def init_module():
    """An empty image: past the permission check the loader answers ENOEXEC."""
    return syscall("init_module", None, 0, b"")


def connect_tcp(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect((host, port))
        except TimeoutError as exc:   # Python's own timeout carries no errno: nothing answered
            raise OSError(errno.ETIMEDOUT, f"no answer within {CONNECT_TIMEOUT} s") from exc
        return f"connected to {host}:{port}"


def memory_hog(limit):
    """Allocate and touch up to limit bytes, reporting the total after each step.

    At most MEMORY_HOG_REPORTS reports, so they always fit the result pipe's buffer."""
    step = max(MEMORY_HOG_STEP, -(-limit // MEMORY_HOG_REPORTS))
    chunks = []
    while len(chunks) * step < limit:
        chunks.append(b"\x5a" * step)    # touched pages, not just reserved
        report_progress(len(chunks) * step)
    return len(chunks) * step


# --- the checks ----------------------------------------------------------------------------

def check(name, verdict, outcome, **detail):
    return {"name": name, "verdict": verdict, **outcome, **detail}


def syscall_check(name, action, *args, denials=SECCOMP_DENIALS, timeout=CHILD_TIMEOUT):
    outcome = in_child(action, *args, timeout=timeout)
    return check(name, verdict_for(outcome, denials), outcome)


def skipped(name, why):
    return check(name, SKIPPED, {"outcome": "skipped"}, detail=why)


def check_host_file_read(options):
    if not options.marker:
        return skipped("host_file_read", "no --marker given")
    return syscall_check("host_file_read", read_file, options.marker,
                         denials=SECCOMP_DENIALS | {errno.ENOENT, errno.ENOTDIR}) | {"path": options.marker}


def check_readonly_write(options):
    path = options.readonly_path or os.path.abspath(__file__)
    return syscall_check("readonly_write", open_for_writing, path,
                         denials=SECCOMP_DENIALS | {errno.EROFS}) | {"path": path}


def visible_pids():
    fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        return sorted(int(entry) for entry in os.listdir(fd) if entry.isdigit())
    finally:
        os.close(fd)


def ancestors_and_self():
    chain, pid = [], os.getpid()
    while pid > 0:
        chain.append(pid)
        with open(f"/proc/{pid}/status") as status:
            pid = int(next(line for line in status if line.startswith("PPid:")).split()[1])
    return chain


def check_host_processes(options):
    try:
        visible = visible_pids()
        own = ancestors_and_self()
    except OSError as exc:
        outcome = {"outcome": errno_name(exc.errno), "errno": exc.errno}
        return check("host_processes", verdict_for(outcome, {errno.ENOENT, errno.EACCES}), outcome)
    foreign = [pid for pid in visible if pid not in own]
    seen_host_pid = options.host_pid in visible if options.host_pid else False
    verdict = ESCAPED if foreign or seen_host_pid else BLOCKED
    outcome = f"{len(foreign)} foreign pids visible" if foreign else "only own pids visible"
    return check("host_processes", verdict, {"outcome": outcome}, visible=visible[:64],
                 own=own, foreign_count=len(foreign))


def check_signal_host_pid(options):
    if not options.host_pid:
        return skipped("signal_host_pid", "no --host-pid given")
    return syscall_check("signal_host_pid", os.kill, options.host_pid, 0,
                         denials=SECCOMP_DENIALS | {errno.ESRCH}) | {"pid": options.host_pid}


def check_mount(options):
    """Mount onto the probe's own (regular) file: refused without privilege, and with it the
    kernel answers ENOTDIR after the permission checks, so nothing is ever attached."""
    target = os.path.abspath(__file__)
    return syscall_check("mount_tmpfs", mount_tmpfs, target) | {"target": target}


def check_tiocsti(name, request):
    def terminal_fd():
        if os.isatty(0):
            return 0, "stdin"
        try:
            return os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY), "/dev/tty"
        except OSError:
            return 0, "stdin (not a terminal)"
    fd, which = terminal_fd()
    try:
        result = syscall_check(name, tiocsti, fd, request,
                               denials=SECCOMP_DENIALS | {errno.EIO, errno.ENOTTY, errno.EBADF})
    finally:
        if fd != 0:
            os.close(fd)
    return result | {"fd": which, "request": hex(request)}


def check_connect(options):
    if not options.tcp_port:
        return skipped("tcp_loopback", "no --tcp-port given")
    result = syscall_check("tcp_loopback", connect_tcp, options.tcp_host, options.tcp_port,
                           denials=SECCOMP_DENIALS | {errno.ENETUNREACH, errno.ECONNREFUSED, errno.ETIMEDOUT,
                                                      errno.EAFNOSUPPORT, errno.EHOSTUNREACH})
    return result | {"address": f"{options.tcp_host}:{options.tcp_port}"}


def check_proc_sys_write(options):
    path = "/proc/sys/kernel/hostname"
    return syscall_check("proc_sys_write", open_for_writing, path,
                         denials=SECCOMP_DENIALS | {errno.EROFS, errno.ENOENT}) | {"path": path}


def status_field_check(name, wanted):
    """A check on /proc/self/status fields: blocked iff every field has the wanted value."""
    try:
        status = proc_status()
    except OSError as exc:
        return check(name, ERROR, {"outcome": errno_name(exc.errno), "errno": exc.errno})
    found = {field: status.get(field, "missing") for field in wanted}
    differs = {field: value for field, value in found.items() if value != wanted[field]}
    outcome = ", ".join(f"{field}={value}" for field, value in found.items())
    return check(name, ESCAPED if differs else BLOCKED, {"outcome": outcome}, fields=found)


def check_capabilities(options):
    return status_field_check("capabilities", {field: "0" * 16 for field in CAP_FIELDS})


def check_seccomp_mode(options):
    return status_field_check("seccomp_mode", {"Seccomp": "2"})


def check_no_new_privs(options):
    return status_field_check("no_new_privs", {"NoNewPrivs": "1"})


def unset_no_new_privs():
    """prctl(PR_SET_NO_NEW_PRIVS, 0): the kernel only ever accepts 1 (EINVAL); a filter may refuse first."""
    ctypes.set_errno(0)
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0),
                   ctypes.c_ulong(0)) == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return f"NoNewPrivs={proc_status().get('NoNewPrivs')} after the call"


def open_fds():
    """fd -> what it refers to. Listing /proc/self/fd opens a descriptor of its own, which is
    closed again by the time its link is read: only the fds still open afterwards count."""
    targets = {}
    for entry in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            targets[int(entry)] = os.readlink(f"/proc/self/fd/{entry}")
        except FileNotFoundError:
            continue
    return targets


def check_fds(options):
    try:
        held = open_fds()
    except OSError as exc:
        return check("fds", ERROR, {"outcome": errno_name(exc.errno), "errno": exc.errno})
    expected = set(options.expect_fds)
    extra = sorted(set(held) - expected)
    verdict = ESCAPED if extra else BLOCKED
    outcome = f"unexpected fds {extra}" if extra else f"fds {sorted(held)}"
    return check("fds", verdict, {"outcome": outcome}, held={str(k): v for k, v in held.items()},
                 manifest=sorted(expected))


RLIMIT_NAMES = {name[len("RLIMIT_"):].lower(): getattr(resource, name)
                for name in dir(resource) if name.startswith("RLIMIT_")}
RLIMIT_NAMES.setdefault("locks", 10)   # Python's resource module lacks RLIMIT_LOCKS (asm-generic: 10)


def check_rlimits(options):
    if not options.rlimit:
        return skipped("rlimits", "no --rlimit given")
    found, differs = {}, []
    for name, (soft, hard) in options.rlimit.items():
        actual = resource.getrlimit(RLIMIT_NAMES[name])
        found[name] = [-1 if v == resource.RLIM_INFINITY else v for v in actual]
        if found[name] != [soft, hard]:
            differs.append(name)
    outcome = f"differ: {differs}" if differs else "as configured"
    return check("rlimits", ESCAPED if differs else BLOCKED, {"outcome": outcome}, found=found,
                 configured={name: list(v) for name, v in options.rlimit.items()})


def check_memory_limit(options):
    if not options.memory_hog:
        return skipped("memory_limit", "no --memory-hog given")
    outcome = in_child(memory_hog, options.memory_hog, timeout=MEMORY_HOG_TIMEOUT)
    if outcome.get("signal") or outcome.get("errno") or outcome.get("exit_code"):
        verdict = BLOCKED
    else:
        verdict = ESCAPED
    return check("memory_limit", verdict, outcome, bytes=options.memory_hog,
                 allocated_before_end=outcome.pop("progress", 0))


def check_syscall(name, action):
    return lambda options: syscall_check(name, action)


CHECKS = {
    "host_file_read": check_host_file_read,
    "readonly_write": check_readonly_write,
    "host_processes": check_host_processes,
    "signal_host_pid": check_signal_host_pid,
    "ptrace_traceme": check_syscall("ptrace_traceme", ptrace_traceme),
    "ptrace_attach_pid1": lambda options: syscall_check("ptrace_attach_pid1", ptrace_seize, 1),
    "mount_tmpfs": check_mount,
    "user_namespace": lambda options: syscall_check(
        "user_namespace", unshare_user, denials=SECCOMP_DENIALS | {errno.ENOSPC, errno.EUSERS}),
    "clone_new_user": lambda options: syscall_check(
        "clone_new_user", clone_new_user, denials=SECCOMP_DENIALS | {errno.ENOSPC, errno.EUSERS}),
    "tiocsti": lambda options: check_tiocsti("tiocsti", TIOCSTI),
    "tiocsti_high_bits": lambda options: check_tiocsti("tiocsti_high_bits", TIOCSTI_HIGH_BITS),
    "clone3": check_syscall("clone3", clone3_new_namespaces),
    "io_uring_setup": check_syscall("io_uring_setup", io_uring_setup),
    "bpf": check_syscall("bpf", bpf_map_create),
    "perf_event_open": check_syscall("perf_event_open", perf_event_open),
    "keyctl": check_syscall("keyctl", keyctl_session_keyring),
    "add_key": check_syscall("add_key", add_key),
    "init_module": check_syscall("init_module", init_module),
    "tcp_loopback": check_connect,
    "proc_sys_write": check_proc_sys_write,
    "capabilities": check_capabilities,
    "no_new_privs": check_no_new_privs,
    "no_new_privs_unset": lambda options: syscall_check(
        "no_new_privs_unset", unset_no_new_privs, denials=SECCOMP_DENIALS | {errno.EINVAL}),
    "seccomp_mode": check_seccomp_mode,
    "fds": check_fds,
    "rlimits": check_rlimits,
    "memory_limit": check_memory_limit,
}


def run_checks(options, emit=lambda event: None):
    """Run the chosen checks in order; emit({"starting": name}) before each, {"result": ...} after."""
    results = []
    for name in options.only or CHECKS:
        emit({"starting": name})
        try:
            result = CHECKS[name](options)
        except (ProbeError, OSError) as exc:
            result = check(name, ERROR, {"outcome": "probe error"}, detail=str(exc))
        emit({"result": result})
        results.append(result)
    return results


def overall(results):
    verdicts = {result["verdict"] for result in results}
    if ESCAPED in verdicts:
        return ESCAPED
    if ERROR in verdicts:
        return ERROR
    return BLOCKED


def context():
    """Who and where the probe is: what every report starts with."""
    try:
        seccomp = proc_status().get("Seccomp")
    except OSError:
        seccomp = None
    return {"probe": "jailer.escape_probe", "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(),
            "seccomp": seccomp}


def report(results):
    return {**context(), "overall": overall(results),
            "escaped": [r["name"] for r in results if r["verdict"] == ESCAPED], "checks": results}


def emit_line(event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def parse_rlimit(text):
    try:
        name, limits = text.split("=", 1)
        soft, hard = (int(v) for v in limits.split(":", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SOFT:HARD (-1 = unlimited)")
    if name not in RLIMIT_NAMES:
        raise argparse.ArgumentTypeError(f"{name!r}: unknown rlimit, one of {sorted(RLIMIT_NAMES)}")
    return name, (soft, hard)


def parse_fds(text):
    try:
        return sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated fd numbers")


def parse_checks(text):
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [name for name in names if name not in CHECKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    return names


def argument_parser():
    parser = argparse.ArgumentParser(
        prog="escape_probe", description="Attempt sandbox escapes and report each outcome as JSON.")
    parser.add_argument("--marker", help="host file that must not be readable")
    parser.add_argument("--readonly-path", help="file or directory on a read-only bind "
                        "(default: this probe's own source file)")
    parser.add_argument("--host-pid", type=int, help="host pid that must be neither visible nor signalable")
    parser.add_argument("--tcp-host", default="127.0.0.1")
    parser.add_argument("--tcp-port", type=int, help="host TCP listener that must be unreachable")
    parser.add_argument("--expect-fds", type=parse_fds, default=[0, 1, 2],
                        help="the only fds the probe may hold (default 0,1,2)")
    parser.add_argument("--rlimit", type=parse_rlimit, action="append", default=[],
                        help="expected limit NAME=SOFT:HARD, repeatable")
    parser.add_argument("--memory-hog", type=int, metavar="BYTES",
                        help="allocate this much in a child: the memory limit must stop it")
    parser.add_argument("--only", type=parse_checks, help="comma-separated subset of checks")
    parser.add_argument("--stream", action="store_true",
                        help="JSON lines instead of one report: context, then starting/result per check, "
                        "then overall; a sandbox killed mid-check leaves the check it was in named")
    parser.add_argument("--list", action="store_true", help="print the check names and exit")
    return parser


def main(argv=None):
    options = argument_parser().parse_args(argv)
    if options.list:
        print("\n".join(CHECKS))
        return 0
    options.rlimit = dict(options.rlimit)
    if options.stream:
        emit_line({"context": context()})
        result = report(run_checks(options, emit_line))
        emit_line({"overall": result["overall"]})
    else:
        result = report(run_checks(options))
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return {BLOCKED: 0, ESCAPED: 1, ERROR: 2}[result["overall"]]


if __name__ == "__main__":
    sys.exit(main())
