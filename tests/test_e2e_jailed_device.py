"""The bundled IDIO-16 device run by `jailer run profiles/gpio-pci-idio-16.toml`, driven
end to end through the sockets jailer hands in, as root and as an unprivileged user (65534).

Every test starts the real launcher, which builds the real sandbox (namespaces, pivot_root,
Landlock, seccomp, rlimits, cgroups as root) and execs the device inside it; the client is
the project's vfio-user client in this process, the host operator the control socket.
"""

from __future__ import annotations

import glob
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import toml

from devices.gpio_pci_idio16.ctl import request as control
from jailer.profile import build_plan
from devices.vfio_user import protocol as P
from devices.vfio_user.client import Client, ClientError
from guest import whole_file
from devices.vfio_user.device import BAR2, CONFIG
from engine_sandbox import nobody_python

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "profiles" / "gpio-pci-idio-16.toml"
NOBODY = 65534
IS_ROOT = os.geteuid() == 0
READY_TIMEOUT = 15.0
SIGSYS_STATUS = 128 + signal.SIGSYS
GUEST_RAM = 4 << 30


class _Jailer:
    """The command that runs `jailer` as root or as nobody; nobody gets a readable copy of
    the packages (and the system interpreter) when the checkout sits under a private directory."""

    def __init__(self):
        self.user_command = None

    def command(self, invocation):
        if invocation == "root":
            return [sys.executable, "-m", "jailer"], {}
        if not IS_ROOT:
            return [sys.executable, "-m", "jailer"], {}
        if self.user_command is None:
            self.user_command = self._user_command()
        return self.user_command

    def _user_command(self):
        import click

        python, env, _ = nobody_python("jailer.run_cli, devices, toml, click, pyseccomp", (
            "jailer", "devices", os.path.dirname(toml.__file__), os.path.dirname(click.__file__)))
        return python + ["-m", "jailer"], env


JAILER = _Jailer()
INVOCATIONS = [pytest.param("root", marks=pytest.mark.skipif(not IS_ROOT, reason="needs root")), "user"]


@pytest.fixture
def scratch():
    """A directory both invocations can create sockets in and read profiles from."""
    path = tempfile.mkdtemp(prefix="jailer-e2e-")
    os.chmod(path, 0o1777)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


# How the shipped profile starts its program here (None: as it ships, zero-exec);
# tests/test_e2e_exec_start.py runs every test of this module again with "exec".
START = {"mode": None}


def profile_variant(scratch: Path, name: str, change) -> Path:
    """A copy of the shipped profile with `change(data)` applied, readable by nobody."""
    data = toml.load(PROFILE)
    if START["mode"] is not None:
        data["program"]["start"] = START["mode"]
        if START["mode"] != "zero-exec":
            data["program"].pop("preload", None)   # (only a zero-exec start preloads)
        name = f"{name}-{START['mode']}"
    change(data)
    path = scratch / f"{name}.toml"
    path.write_text(toml.dumps(data))
    path.chmod(0o644)
    return path


def listener(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.listen(8)
    return sock


class JailedDevice:
    """`jailer run PROFILE OPTIONS...` with its status events and stderr kept in files."""

    def __init__(self, invocation, scratch: Path, *options, profile=PROFILE, pass_fds=(), program_args=(),
                 extra_env=None):
        command, env = JAILER.command(invocation)
        # O_APPEND: jailer writes through the same open file, whose offset events() and
        # errors() move while they read; without it a line could land over an earlier one
        self.status = tempfile.TemporaryFile("a+")
        self.stderr = tempfile.TemporaryFile("a+")
        cache = scratch / f"cache-{invocation}"
        environment = {"PATH": "/usr/bin:/bin", "JAILER_CACHE_DIR": str(cache), **env, **(extra_env or {})}
        if profile == PROFILE and (invocation == "user" or START["mode"] is not None):
            profile = profile_variant(scratch, "shipped", lambda data: None)   # the checkout may be private
        argv = [*command, "run", "--status-fd", str(self.status.fileno()), *options, str(profile)]
        if program_args:
            argv += ["--", *program_args]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     pass_fds=[self.status.fileno(), *pass_fds], env=environment, cwd="/")
        self.code = None

    def events(self) -> list[dict]:
        return [json.loads(line) for line in whole_file(self.status).splitlines() if line.strip()]

    def errors(self) -> str:
        return whole_file(self.stderr)

    def connect(self, path: str, timeout: float = READY_TIMEOUT) -> Client:
        """Ready = a VERSION handshake succeeds on the socket (the path may not exist yet)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return Client.connect(path)
            except ClientError:
                assert self.proc.poll() is None, f"jailer exited {self.proc.returncode}: {self.errors()}"
                assert time.monotonic() < deadline, f"{path} not ready: {self.errors()}"
                time.sleep(0.01)

    def device_pid(self) -> int:
        """The host pid of the device: the launcher's descendant running the device module."""
        children = {}
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
        pending = [self.proc.pid]
        while pending:
            pid = pending.pop()
            try:
                if b"devices.gpio_pci_idio16" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                pass
            pending += children.get(pid, [])
        raise AssertionError("no device process under the launcher")

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.code = self.proc.wait()
        return self.code

    def close(self):
        self.stop(signal.SIGKILL)
        self.status.close()
        self.stderr.close()


@pytest.fixture
def jailed():
    started = []

    def start(*args, **kwargs):
        device = JailedDevice(*args, **kwargs)
        started.append(device)
        return device
    yield start
    for device in started:
        device.close()


def start_with_control(jailed, invocation, scratch: Path, name: str):
    """The device with the shipped profile's optional control socket: two listeners of ours,
    passed by name (the profile's argv then carries --control-fd={fd:control})."""
    sock, ctl = str(scratch / f"{name}.sock"), str(scratch / f"{name}.ctl")
    vfio_user, control_listener = listener(sock), listener(ctl)
    device = jailed(invocation, scratch, f"--fd=vfio-user={vfio_user.fileno()}",
                    f"--fd=control={control_listener.fileno()}",
                    pass_fds=[vfio_user.fileno(), control_listener.fileno()])
    vfio_user.close()
    control_listener.close()
    return device, sock, ctl


def wait_irq(fd, timeout=5.0):
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable) and os.eventfd_read(fd) > 0


def memfd_mapped(pid: int, name: str) -> bool:
    return f"/memfd:{name}" in Path(f"/proc/{pid}/maps").read_text()


# --- the protocol through the jail --------------------------------------------------------

@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_protocol_walk_through_the_jail(invocation, scratch, jailed):
    sock = str(scratch / "idio16.sock")
    device = jailed(invocation, scratch, "--socket-path", sock)
    with device.connect(sock) as client:
        assert client.server_version == (P.VERSION_MAJOR, P.VERSION_MINOR)
        info = client.device_info()
        assert info.num_regions == 9 and info.num_irqs == 5 and info.flags & 0x3 == 0x3
        config_info, fd = client.region_info(CONFIG)
        assert fd is None and config_info.size == 256
        bar_info, fd = client.region_info(BAR2)
        assert fd is None and bar_info.size == 0x100 and bar_info.flags & 0x3 == 0x3
        config = client.region_read(CONFIG, 0, 256)
        assert struct.unpack_from("<HH", config) == (0x494F, 0x0DC8)            # ACCES, PCI-IDIO-16
        assert config[0x09:0x0C] == b"\x00\x00\x11"                             # class: other signal processing
        client.region_write(BAR2, 0x0, b"\x5a")
        client.region_write(BAR2, 0x4, b"\xa5")
        assert client.region_read(BAR2, 0x0, 1) + client.region_read(BAR2, 0x4, 1) == b"\x5a\xa5"

        # DMA: the device has no bus master, but a VMM maps all guest RAM into every device
        # (4 GiB here, sparse: the profile's address-space limit must leave room for it)
        ram = os.memfd_create("guest-ram-e2e", os.MFD_CLOEXEC)
        try:
            os.ftruncate(ram, GUEST_RAM)
            client.dma_map(0x100000000, GUEST_RAM, fd=ram)
            pid = device.device_pid() if IS_ROOT else None
            if pid:
                assert memfd_mapped(pid, "guest-ram-e2e")
            client.dma_unmap(0x100000000, GUEST_RAM)
            if pid:
                assert not memfd_mapped(pid, "guest-ram-e2e")
        finally:
            os.close(ram)
        client.dma_map(0x0, 0x1000, fd=None)                                    # no fd: message-based
        client.dma_unmap(unmap_all=True)
    with device.connect(sock) as client:                                        # reconnection keeps state
        assert client.region_read(BAR2, 0x0, 1) + client.region_read(BAR2, 0x4, 1) == b"\x5a\xa5"
        client.reset()
        assert client.region_read(BAR2, 0x0, 1) + client.region_read(BAR2, 0x4, 1) == b"\x00\x00"
    assert device.stop() == 0, device.errors()
    assert not os.path.exists(sock)


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_host_inputs_raise_intx_through_the_jail(invocation, scratch, jailed):
    device, sock, ctl = start_with_control(jailed, invocation, scratch, "idio16")
    trigger = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with device.connect(sock) as client:
            client.enable_irq_eventfds(0, [trigger])
            client.region_read(BAR2, 0x2, 1)                                    # the guest enables the IRQ
            control(ctl, {"cmd": "set-inputs", "value": 0xBEEF})
            assert wait_irq(trigger)
            assert client.region_read(BAR2, 0x1, 1) + client.region_read(BAR2, 0x5, 1) == b"\xef\xbe"
            client.region_write(BAR2, 0x1, b"\x00")                             # acknowledge, then EOI
            client.set_irqs(0, P.IRQ_DATA_NONE | P.IRQ_ACTION_UNMASK, 0, 1)
            assert not wait_irq(trigger, timeout=0.1)
            client.region_write(BAR2, 0x0, b"\x42")
            assert control(ctl, {"cmd": "get-outputs"}) == {"outputs": 0x42}
    finally:
        os.close(trigger)
    assert device.stop() == 0, device.errors()


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_migration_between_two_jailed_devices(invocation, scratch, jailed):
    source, source_sock, source_ctl = start_with_control(jailed, invocation, scratch, "source")
    destination, destination_sock, destination_ctl = start_with_control(jailed, invocation, scratch, "destination")
    with source.connect(source_sock) as client:
        client.region_write(BAR2, 0x0, b"\x11")
        client.region_read(BAR2, 0x2, 1)
        control(source_ctl, {"cmd": "set-inputs", "value": 0x0100})
        blob = client.save_device_state()                                       # STOP_COPY .. STOP
        with destination.connect(destination_sock) as target:
            with pytest.raises(ClientError):                                    # a corrupted stream is refused
                target.load_device_state(blob[:-1] + bytes([blob[-1] ^ 1]))
            client.set_migration_state(P.MIG_STATE_RUNNING)                     # the source keeps running
            assert client.region_read(BAR2, 0x0, 1) == b"\x11"
            target.reset()
            client.set_migration_state(P.MIG_STATE_STOP)
            target.load_device_state(blob)                                      # RESUMING .. RUNNING
            assert target.region_read(BAR2, 0x0, 1) == b"\x11"
    assert control(destination_ctl, {"cmd": "query-status"}) == control(source_ctl, {"cmd": "query-status"})
    assert source.stop() == 0 and destination.stop() == 0


# --- descriptors handed in ----------------------------------------------------------------

@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_listening_socket_passed_as_fd(invocation, scratch, jailed):
    path = str(scratch / "mine.sock")
    mine = listener(path)
    device = jailed(invocation, scratch, "--fd", str(mine.fileno()), pass_fds=[mine.fileno()])
    mine.close()
    with device.connect(path) as client:
        assert client.device_info().num_regions == 9
    assert device.stop() == 0, device.errors()
    assert os.path.exists(path)                                                 # the caller's socket stays


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_connected_socket_passed_as_fd_is_served_until_the_client_leaves(invocation, scratch, jailed):
    def connected(data):
        data["fds"][0]["kind"] = "unix-stream"
    profile = profile_variant(scratch, "connected", connected)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    device = jailed(invocation, scratch, f"--fd=vfio-user={theirs.fileno()}", profile=profile,
                    pass_fds=[theirs.fileno()])
    theirs.close()
    with Client(ours, timeout=READY_TIMEOUT) as client:
        client.negotiate()
        client.region_write(BAR2, 0x4, b"\x99")
        assert client.region_read(BAR2, 0x4, 1) == b"\x99"
    assert device.proc.wait(10) == 0, device.errors()                          # the device ends with its client


# --- the sandbox's own behaviour ------------------------------------------------------------

@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_seccomp_violation_is_named(invocation, scratch, jailed):
    """A profile that forgot accept4: the device starts, and dies naming it when a client comes."""
    def without_accept(data):
        data["seccomp"]["allow"].remove("accept4")
    sock = str(scratch / "idio16.sock")
    device = jailed(invocation, scratch, "--socket-path", sock, profile=profile_variant(scratch, "no-accept",
                                                                                        without_accept))
    deadline = time.monotonic() + READY_TIMEOUT
    while "serving" not in device.errors():                                    # its start-up is allowed
        assert device.proc.poll() is None and time.monotonic() < deadline, device.errors()
        time.sleep(0.01)
    with pytest.raises(ClientError):
        Client.connect(sock)
    assert device.proc.wait(10) == SIGSYS_STATUS, device.errors()
    violations = [e for e in device.events() if e["event"] == "seccomp"]
    assert violations and violations[0]["syscall"] == "accept4" and violations[0]["action"] == "kill"
    assert "jailer: seccomp: the program called accept4 after it was ready, refused by action 'kill'" \
        in device.errors()
    assert not os.path.exists(sock)


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_sigterm_shuts_the_device_down_cleanly(invocation, scratch, jailed):
    sock = str(scratch / "idio16.sock")
    device = jailed(invocation, scratch, "--socket-path", sock)
    device.connect(sock).close()
    pid = device.device_pid() if IS_ROOT else None
    assert device.stop() == 0, device.errors()
    assert [e["code"] for e in device.events() if e["event"] == "exited"] == [0]
    assert "serving gpio-pci-idio-16 on fd 3" in device.errors()
    assert not os.path.exists(sock)
    if pid:
        assert not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_once_running_only_the_native_monitor_stays_beside_the_device(invocation, scratch, jailed):
    sock = str(scratch / "idio16.sock")
    device = jailed(invocation, scratch, "--socket-path", sock)
    device.connect(sock).close()
    launcher = device.proc.pid
    deadline = time.monotonic() + 5
    while not os.readlink(f"/proc/{launcher}/exe").endswith("/jailer-monitor"):
        assert time.monotonic() < deadline, "the launcher did not hand over to jailer-monitor"
        time.sleep(0.01)
    resident = int(next(line.split()[1] for line in Path(f"/proc/{launcher}/status").read_text().splitlines()
                        if line.startswith("VmRSS:")))
    assert resident < 4096, f"jailer-monitor holds {resident} KiB"
    device.connect(sock).close()   # still served, the same sandbox
    assert device.stop() == 0, device.errors()
    assert [e["event"] for e in device.events()][-1:] == ["exited"] and device.events()[-1]["code"] == 0
    assert not os.path.exists(sock)


def test_enforced_layers_are_the_profile_s(scratch, jailed):
    """What the launcher reports applying is the whole sandbox the profile describes."""
    invocation = "root" if IS_ROOT else "user"
    sock = str(scratch / "idio16.sock")
    device = jailed(invocation, scratch, "--socket-path", sock)
    device.connect(sock).close()
    enforced = next(e for e in device.events() if e["event"] == "enforced")
    assert enforced["skipped"] == ({} if IS_ROOT else {"cgroup": enforced["skipped"]["cgroup"]})
    layers = enforced["layers"]
    for layer in ("user_namespace", "mount_namespace", "pid_namespace", "net_namespace", "ipc_namespace",
                  "cgroup_namespace", "landlock", "no_new_privs"):
        assert layers[layer], layer
    assert layers["network"] == {"mode": "none"}
    assert set(layers["capabilities"].values()) == {0}
    assert layers["seccomp"]["default"] == "kill"
    ran = PROFILE if START["mode"] is None else profile_variant(scratch, "ran", lambda data: None)
    assert layers["seccomp"]["steady_rules"] == len(build_plan(str(ran)).seccomp.steady)
    stages = [e["event"] for e in device.events() if e["event"] in ("ready", "stage")]
    assert stages == ["ready", "stage"]                        # the steady rules apply once it runs
    assert layers["rlimits"]["nofile"] == [64, 64] and layers["rlimits"]["core"] == [0, 0]
    if IS_ROOT:
        assert set(layers["cgroup"]) == {"memory", "pids", "cpu"}
    assert device.stop() == 0


SHIPPED = sorted(glob.glob(str(REPO / "profiles" / "*.toml")))


@pytest.mark.parametrize("invocation", INVOCATIONS)
@pytest.mark.parametrize("profile", SHIPPED, ids=os.path.basename)
def test_shipped_profile_passes_its_selftest(profile, invocation, scratch):
    """As root with every layer; as a user on cgroup v1 without the cgroup, which the
    profile's rlimits must make up for (the memory check included)."""
    command, env = JAILER.command(invocation)
    readable = scratch / os.path.basename(profile)
    shutil.copy(profile, readable)
    readable.chmod(0o644)
    samples = REPO.parent / "shared" / "peers" / "libvfio-user" / "samples"   # where the reference devices are
    if "{env:LIBVFIO_USER_SAMPLES}" in readable.read_text() and not samples.is_dir():
        pytest.skip(f"no libvfio-user samples at {samples} (../shared/peers)")
    result = subprocess.run([*command, "selftest", "--json", str(readable)], cwd="/", stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=180,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(scratch), "LIBVFIO_USER_SAMPLES": str(samples),
                                 **env})
    report = json.loads(result.stdout) if result.stdout else result.stderr
    assert isinstance(report, dict), report
    assert report["overall"] == "blocked" and result.returncode == 0, \
        [c for c in report["checks"] if c["verdict"] != "blocked"]
    checks = {check["name"]: check for check in report["checks"]}
    assert all(check["as_expected"] for check in checks.values() if "expected" in check), checks
    # These only open files for reading: a SIGSYS here would be the probe dying in its own
    # machinery, not the mount and pid namespaces holding.
    for name in ("host_file_read", "host_processes"):
        assert not checks[name]["outcome"].startswith("signal:"), checks[name]
