"""jailer.lockdown for real: every lockdown in a process of its own (a locked-down process
cannot be undone), as root and as an unprivileged user (65534), checked from inside (what
the process can no longer do, and what it still can) and from outside (/proc)."""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devices.vfio_user.client import Client, ClientError
from engine_sandbox import DEVICE_PROFILE, NOBODY, nobody_python, readable_tempdir
from jailer import lockdown
from jailer.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "locked_down_idio16.py"
IS_ROOT = os.geteuid() == 0
INVOCATIONS = [pytest.param("root", marks=pytest.mark.skipif(not IS_ROOT, reason="needs root")), "user"]
DEVICE_SKIP = ["pid_namespace", "pivot_root", "fds", "program", "readiness", "host_ids"]
NAMESPACES = ("user", "mnt", "net", "ipc", "uts", "cgroup")
TIMEOUT = 30

# A profile whose seccomp default fails calls (ENOTRECOVERABLE) instead of killing, so one
# process can try every escape; it allows what those tries need, so that the layer under
# test (Landlock, rlimits, capabilities, namespaces) is the one that refuses.
PROBE_PROFILE = """
name = "lockdown-probe"

[program]
runtime = "python"
argv = ["-c", "pass"]

[namespaces]
pid = false
hostname = "lockdown-probe"

[identity]
unprivileged_uid = 1000
unprivileged_gid = 1000
host_ids = "shared"

[[filesystem.bind]]
source = "{read_only}"

[[filesystem.bind]]
source = "{writable}"
writable = true

[seccomp]
default_action = "errno"
default_errno = "ENOTRECOVERABLE"
allow = ["@default", "@basic-io", "@file-read", "@memory", "@signal", "write", "socket", "connect", "socketpair",
         "capget", "capset", "setuid", "ptrace", "getuid", "getppid", "uname"]
steady_deny = ["execve", "socketpair"]
steady_action = "errno"
steady_errno = "EXFULL"

[limits]
nofile = 32
"""

# Runs in the process that locks itself down: tries, prints one JSON line, waits on stdin.
PROBE = r"""
import ctypes, errno, json, os, resource, socket, sys, threading

from jailer import lockdown
from jailer.errors import LayerError

config = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
status_fd = os.open("/proc/self/status", os.O_RDONLY)    # opened before: Landlock will hide /proc
kept_fd = os.open(config["kept"], os.O_RDONLY)


def attempt(action):
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, exc.errno)
    except ValueError as exc:    # resource.setrlimit's EPERM
        return f"ValueError: {exc}"
    return "ok"


def libc_call(function, *args):
    def call():
        if function(*args) == -1:
            raise OSError(ctypes.get_errno(), "")
    return call


def connect_host_tcp():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.connect(("127.0.0.1", config["tcp_port"]))


def write_file(path):
    with open(path, "w") as f:
        f.write("written")


def status():
    text = os.pread(status_fd, 65536, 0).decode()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


def tries():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)            # _LINUX_CAPABILITY_VERSION_3, this thread
    every_capability = (ctypes.c_uint32 * 6)(*[0xFFFFFFFF] * 6)
    return {
        "read_host_file": attempt(lambda: open("/etc/passwd").read()),
        "read_bound_file": attempt(lambda: open(config["read_only_file"]).read()),
        "write_read_only_bind": attempt(lambda: write_file(config["read_only_file"])),
        "write_writable_bind": attempt(lambda: write_file(os.path.join(config["writable"], "new"))),
        "execve_host_file": attempt(lambda: os.execv(config["executable"], ["executable"])),
        "connect_host_tcp": attempt(connect_host_tcp),
        "inet_socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
        "socketpair": attempt(lambda: [s.close() for s in socket.socketpair()]),
        "raise_hard_nofile": attempt(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard + 1))),
        "capset_every_capability": attempt(libc_call(libc.capset, header, every_capability)),
        "setuid_0": attempt(lambda: os.setuid(0)),
        "ptrace_host_process": attempt(libc_call(libc.ptrace, 16, config["host_pid"], None, None)),   # PTRACE_ATTACH
        "denied_syscall": attempt(lambda: os.getpriority(os.PRIO_PROCESS, 0)),
        "kept_fd": os.pread(kept_fd, 100, 0).decode(),
        "nofile": [soft, hard],
        "uid": os.getuid(),
        "hostname": os.uname().nodename,
        "status": {key: status()[key] for key in ("NoNewPrivs", "Seccomp", "Seccomp_filters", "CapEff", "CapPrm",
                                                   "CapInh", "CapBnd", "CapAmb")},
    }


if config.get("thread"):
    release = threading.Event()
    threading.Thread(target=release.wait, daemon=True).start()
result = {}
try:
    result["report"] = lockdown.lockdown(config["profile"], stage=config["stage"], skip=config["skip"])
except LayerError as exc:
    result["refused"] = {"layer": exc.layer, "message": str(exc)}
if config.get("then_kill"):   # the shipped profile kills what it does not allow: one try, then the kill
    os.write(1, (json.dumps({"openat": attempt(lambda: open(config["read_only_file"]))}) + "\n").encode())
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    os.write(1, b"still alive\n")
    os._exit(0)
result["tries"] = tries()
os.write(1, (json.dumps(result) + "\n").encode())
sys.stdin.buffer.read()
"""


class Probe:
    """One probe process; its JSON line, then its /proc entry while it waits on stdin."""

    def __init__(self, invocation, **config):
        command, env = python_for(invocation)
        self.process = subprocess.Popen([*command, "-c", PROBE, json.dumps(config)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
                                        env={"PATH": "/usr/bin:/bin", **env})

    def result(self) -> dict:
        line = self.line()
        assert line, f"the probe said nothing (status {self.process.wait(TIMEOUT)}): {self.process.stderr.read()}"
        return json.loads(line)

    def line(self) -> bytes:
        ready, _, _ = select.select([self.process.stdout], [], [], TIMEOUT)
        assert ready, "the probe did not answer"
        return self.process.stdout.readline()

    def namespaces(self) -> dict:
        return {name: os.readlink(f"/proc/{self.process.pid}/ns/{name}") for name in (*NAMESPACES, "pid")}

    def status(self) -> dict:
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return {key: value.split() for key, _, value in (line.partition(":") for line in text.splitlines())}

    def finish(self) -> int:
        self.process.stdin.close()
        return self.process.wait(TIMEOUT)

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            stream.close()


_PYTHON = {}


def python_for(invocation) -> tuple[list, dict]:
    """The interpreter command as root, or as 65534 (a readable copy of the packages if it needs one)."""
    if invocation == "root" or not IS_ROOT:
        return [sys.executable], {}
    if invocation not in _PYTHON:
        python, env, _ = nobody_python("jailer.lockdown, pyseccomp, devices", ("jailer", "devices"))
        _PYTHON[invocation] = (python, env)
    return _PYTHON[invocation]


def own_namespaces() -> dict:
    return {name: os.readlink(f"/proc/self/ns/{name}") for name in (*NAMESPACES, "pid")}


@pytest.fixture
def targets():
    """Files for the probe profile's binds (readable by 65534), a host file outside them, a host
    TCP listener, a root process to try ptrace on (a probe with nothing locked down may attach)."""
    directory = Path(readable_tempdir())
    read_only, writable = directory / "read-only", directory / "writable"
    read_only.mkdir(mode=0o755)
    writable.mkdir()
    writable.chmod(0o777)
    (read_only / "file").write_text("bound read-only\n")
    (read_only / "file").chmod(0o666)           # only Landlock stands between the probe and a write
    (directory / "outside").write_text("opened before the lockdown\n")
    (directory / "outside").chmod(0o644)
    (directory / "executable").write_bytes(b"\0 no format the kernel runs: ENOEXEC unless refused before")
    (directory / "executable").chmod(0o755)
    profile = directory / "probe.toml"
    profile.write_text(PROBE_PROFILE.format(read_only=read_only, writable=writable))
    device_profile = directory / "device.toml"
    shutil.copy(DEVICE_PROFILE, device_profile)
    for path in (profile, device_profile):
        path.chmod(0o644)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        yield {"profile": str(profile), "device_profile": str(device_profile), "read_only_file": str(read_only / "file"),
               "writable": str(writable), "kept": str(directory / "outside"),
               "executable": str(directory / "executable"), "tcp_port": listener.getsockname()[1], "host_pid": sleeper.pid,
               "listener": listener}
    finally:
        listener.close()
        sleeper.kill()
        sleeper.wait()


def probe_config(targets, **config) -> dict:
    return {**{key: value for key, value in targets.items() if key not in ("listener", "device_profile")}, **config}


@pytest.fixture
def probes():
    started = []

    def start(invocation, **config):
        started.append(Probe(invocation, **config))
        return started[-1]

    yield start
    for probe in started:
        probe.close()


def assert_no_connection(listener):
    with pytest.raises(BlockingIOError):
        listener.accept()


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_a_locked_down_process_cannot_do_what_the_profile_forbids(invocation, targets, probes):
    probe = probes(invocation, **probe_config(targets, stage="steady", skip=["pivot_root", "program"]))
    result = probe.result()
    assert "refused" not in result, result
    tries = result["tries"]
    # Landlock, from the binds' host paths: nothing else of the host tree, read-only stays read-only
    assert tries["read_host_file"] == "EACCES"
    assert tries["write_read_only_bind"] == "EACCES"
    assert tries["read_bound_file"] == "ok" and tries["write_writable_bind"] == "ok"
    assert Path(targets["writable"], "new").read_text() == "written"
    # the steady rules, with the profile's own errno; and the profile's default errno
    assert tries["execve_host_file"] == "EXFULL" and tries["socketpair"] == "EXFULL"
    assert tries["denied_syscall"] == "ENOTRECOVERABLE"
    # a fresh net namespace (and Landlock's TCP rule): the host's listener is out of reach
    assert tries["inet_socket"] == "ok" and tries["connect_host_tcp"] in ("EACCES", "ENETUNREACH")
    assert_no_connection(targets["listener"])
    # rlimits, capabilities, ids, no_new_privs (read back from /proc/self/status)
    assert tries["nofile"] == [32, 32] and tries["raise_hard_nofile"].startswith("ValueError")
    assert tries["capset_every_capability"] == "EPERM" and tries["setuid_0"] in ("EPERM", "EINVAL")
    assert tries["ptrace_host_process"] == "EPERM"
    assert tries["status"] == {"NoNewPrivs": "1", "Seccomp": "2", "Seccomp_filters": "2", "CapEff": "0" * 16,
                               "CapPrm": "0" * 16, "CapInh": "0" * 16, "CapBnd": "0" * 16, "CapAmb": "0" * 16}
    assert tries["uid"] == (65534 if invocation == "root" else 1000) and tries["hostname"] == "lockdown-probe"
    # what it keeps: fds opened before the lockdown stay usable, outside the rules too
    assert tries["kept_fd"] == "opened before the lockdown\n"
    # from outside: new namespaces but the pid one, the host ids the maps name
    theirs, ours = probe.namespaces(), own_namespaces()
    assert all(theirs[name] != ours[name] for name in NAMESPACES) and theirs["pid"] == ours["pid"]
    assert probe.status()["Uid"] == [str(NOBODY)] * 4
    applied = result["report"]["applied"]
    assert list(applied) == ["user_namespace", "mount_namespace", "net_namespace", "ipc_namespace", "uts_namespace",
                             "cgroup_namespace", "network", "no_new_privs", "landlock", "rlimits", "capabilities",
                             "securebits", "seccomp"]
    assert applied["seccomp"]["stage"] == "steady" and applied["seccomp"]["filters"] == 2
    assert set(result["report"]["skipped"]) == {"pivot_root", "program"}
    assert probe.finish() == 0


def test_the_setup_stage_leaves_the_steady_rules_out(targets, probes):
    invocation = "root" if IS_ROOT else "user"
    result = probes(invocation, **probe_config(targets, stage="setup", skip=["pivot_root", "program"])).result()
    tries = result["tries"]
    assert tries["socketpair"] == "ok"
    assert tries["execve_host_file"] == "EACCES"     # Landlock: it is not in a bind
    assert tries["status"]["Seccomp_filters"] == "1" and result["report"]["applied"]["seccomp"]["stage"] == "setup"


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_the_shipped_profile_kills_what_it_does_not_allow(invocation, targets, probes):
    probe = probes(invocation, **probe_config(targets, profile=targets["device_profile"], stage="steady",
                                              skip=DEVICE_SKIP, then_kill=True))
    assert json.loads(probe.line()) == {"openat": "EACCES"}     # the profile's steady_errno
    assert probe.process.wait(TIMEOUT) == -signal.SIGSYS        # socket is not in its allowlist: killed
    assert b"still alive" not in probe.process.stdout.read()


def assert_nothing_applied(tries, probe, invocation):
    """Everything a refused lockdown must have left as it was."""
    assert tries["read_host_file"] == "ok" and tries["write_read_only_bind"] == "ok"
    assert tries["inet_socket"] == "ok" and tries["socketpair"] == "ok" and tries["execve_host_file"] == "ENOEXEC"
    assert tries["denied_syscall"] == "ok"
    assert tries["status"]["NoNewPrivs"] == "0" and tries["status"]["Seccomp"] == "0"
    assert tries["hostname"] == os.uname().nodename
    assert tries["uid"] == (0 if invocation == "root" else NOBODY if IS_ROOT else os.getuid())
    assert tries["nofile"] != [32, 32]
    assert probe.namespaces() == own_namespaces()


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_a_pid_namespace_is_refused_with_the_layer_named_and_nothing_applied(invocation, targets, probes):
    probe = probes(invocation, **probe_config(targets, profile=targets["device_profile"], stage="steady", skip=[]))
    result = probe.result()
    assert result["refused"]["layer"] == "pid_namespace"
    message = result["refused"]["message"]
    assert message.startswith("cannot apply layer 'pid_namespace': a running process cannot enter a new pid "
                              "namespace") and "nothing was applied" in message and "\n" not in message
    needed = ["'pid_namespace'", "'pivot_root'", "'fds'", "'program'", "'readiness'"]
    assert all(name in message for name in needed)                     # the whole skip set in the fix
    assert ("'host_ids'" in message) == (invocation == "root")         # a host id of its own: root only
    assert_nothing_applied(result["tries"], probe, invocation)
    assert probe.finish() == 0


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_a_threaded_process_is_refused_unless_only_rlimits_remain(invocation, targets, probes):
    refused = probes(invocation, **probe_config(targets, stage="steady", skip=["pivot_root", "program"], thread=True))
    result = refused.result()
    assert result["refused"]["layer"] == "user_namespace"
    assert "the process has 2 threads (/proc/self/task)" in result["refused"]["message"]
    assert_nothing_applied(result["tries"], refused, invocation)
    assert refused.finish() == 0

    all_but_rlimits = [layer for layer in lockdown.ORDER if layer != "rlimits"] + ["pivot_root", "program"]
    limited = probes(invocation, **probe_config(targets, stage="steady", skip=all_but_rlimits, thread=True)).result()
    assert list(limited["report"]["applied"]) == ["rlimits"] and limited["tries"]["nofile"] == [32, 32]
    assert limited["tries"]["status"]["Seccomp"] == "0"


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_landlock_paths_are_opened_as_the_caller_before_its_ids_change(targets, tmp_path):
    """As root the process becomes 65534 before Landlock: a bind under a directory only root
    may enter is still a rule (and the ids it took still keep the process out of it)."""
    private = tmp_path / "root-only"      # pytest's tmp_path is 0700 root
    private.mkdir()
    profile = tmp_path / "private.toml"
    profile.write_text(PROBE_PROFILE.format(read_only=private, writable=Path(targets["writable"])))
    script = ("import json, os, sys; from jailer import lockdown\n"
              "report = lockdown.lockdown(sys.argv[1], skip={'pivot_root', 'program'})\n"
              "try:\n    os.listdir(sys.argv[2]); listing = 'ok'\nexcept OSError as exc:\n    listing = exc.strerror\n"
              "os.write(1, json.dumps([report['applied']['landlock']['rules'], listing]).encode())\n")
    result = subprocess.run([sys.executable, "-c", script, str(profile), str(private)], capture_output=True, text=True,
                            timeout=TIMEOUT, cwd="/")
    assert result.returncode == 0, result.stderr
    rules, listing = json.loads(result.stdout)
    assert rules > 2 and listing == "Permission denied"


def test_unknown_names_are_refused_before_anything_happens():
    with pytest.raises(UsageError, match=r"unknown layer 'pid_namespaces' in skip \(did you mean 'pid_namespace'\?\)"):
        lockdown.prepare(DEVICE_PROFILE, skip={"pid_namespaces"})
    with pytest.raises(UsageError, match="unknown stage 'ready', expected one of setup, steady"):
        lockdown.prepare(DEVICE_PROFILE, stage="ready")


class LockedDownDevice:
    """examples/locked_down_idio16.py serving on a socket in a directory both invocations may use."""

    def __init__(self, invocation, directory: Path):
        command, env = python_for(invocation)
        if env:
            pytest.skip("65534 cannot read this checkout, which the example loads its profile from")
        self.socket_path = str(directory / "idio16.sock")
        self.process = subprocess.Popen([*command, str(EXAMPLE), "--socket-path", self.socket_path],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd="/",
                                        env={"PATH": "/usr/bin:/bin"})

    def connect(self) -> Client:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                return Client.connect(self.socket_path)
            except (ClientError, OSError):
                assert self.process.poll() is None and time.monotonic() < deadline, self.process.stderr.read()
                time.sleep(0.02)

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=TIMEOUT)
        return self.process.returncode, stderr


@pytest.fixture
def locked_down_device():
    directory = Path(readable_tempdir())
    directory.chmod(0o1777)
    started = []

    def start(invocation):
        started.append(LockedDownDevice(invocation, directory))
        return started[-1]

    yield start
    for device in started:
        if device.process.poll() is None:
            device.process.kill()
            device.process.wait()


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_the_example_device_locks_itself_down_and_serves_a_vfio_user_client(invocation, locked_down_device):
    device = locked_down_device(invocation)
    client = device.connect()
    try:
        assert client.region_read(7, 0, 4) == bytes.fromhex("4f49c80d")     # vendor 0x494f, device 0x0dc8
    finally:
        client.close()
    client = device.connect()   # served again: the steady stage holds what a reconnection needs
    try:
        assert client.region_read(7, 0, 4) == bytes.fromhex("4f49c80d")
    finally:
        client.close()
    status = Path(f"/proc/{device.process.pid}/status").read_text()
    for line in ("NoNewPrivs:\t1", "Seccomp:\t2", "Seccomp_filters:\t2", f"Uid:\t{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}",
                 "CapEff:\t0000000000000000", "CapBnd:\t0000000000000000"):
        assert line in status
    assert os.readlink(f"/proc/{device.process.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    code, stderr = device.stop()
    assert code == 0, stderr
    assert "locked down: user_namespace, mount_namespace, net_namespace" in stderr and "seccomp; without: " in stderr


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_the_example_device_answers_an_independent_c_client(locked_down_device, tmp_path):
    source = Path(os.environ.get("JAILER_SHARED_TOOLS") or REPO.parent / "shared" / "tools") / "vfu_bench.c"
    if not source.exists():
        pytest.skip(f"no {source}")
    binary = tmp_path / "vfu_bench"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True, timeout=120)
    device = locked_down_device("root" if IS_ROOT else "user")
    device.connect().close()   # it serves
    result = subprocess.run([str(binary), device.socket_path, "2", "0", "200"], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, VFU_BENCH_WARMUP="0"))
    assert result.returncode == 0, result.stderr
    assert "config: vendor 494f device 0dc8" in result.stdout
    assert "region 2: size 0x100 flags 0x3" in result.stdout
    code, stderr = device.stop()
    assert code == 0, stderr
