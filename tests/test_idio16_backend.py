"""The gpio-pci-idio-16 backend as a separate process, driven by the vfio-user client and
the control socket, as a VMM and a host operator would."""

import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from devices.gpio_pci_idio16.ctl import request as control
from devices.vfio_user import protocol as P
from devices.vfio_user.client import Client, ClientError
from devices.vfio_user.device import BAR2, CONFIG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(predicate, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Backend:
    def __init__(self, *args, pass_fds=()):
        self.proc = subprocess.Popen([sys.executable, "-m", "devices.gpio_pci_idio16", *args], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=pass_fds)

    def wait_path(self, path):
        wait_for(lambda: os.path.exists(path) or self.proc.poll() is not None, f"{path}")
        assert self.proc.poll() is None, self.proc.stderr.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc.stdout.close()
        stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        return code, stderr


@pytest.fixture
def backend(tmp_path):
    sock, ctl = str(tmp_path / "idio16.sock"), str(tmp_path / "idio16.ctl")
    process = Backend(f"--socket-path={sock}", f"--control-socket={ctl}")
    process.wait_path(sock)
    yield process, sock, ctl
    process.stop()


def wait_irq(fd, timeout=5.0):
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable) and os.eventfd_read(fd) > 0


def test_config_identity_over_vfio_user(backend):
    _, sock, _ = backend
    with Client.connect(sock) as client:
        info = client.device_info()
        assert info.num_regions == 9 and info.flags & 0x3 == 0x3
        config_info, fd = client.region_info(CONFIG)
        assert fd is None and config_info.size == 256
        bar_info, _ = client.region_info(BAR2)
        assert bar_info.size == 0x100 and bar_info.flags & 0x3 == 0x3
        assert client.region_info(0)[0].size == 0
        config = client.region_read(CONFIG, 0, 256)
        assert struct.unpack_from("<HH", config) == (0x494F, 0x0DC8)
        assert config[0x09:0x0C] == b"\x00\x00\x11" and config[0x3D] == 1 and config[0x06] & 0x10 == 0
        assert struct.unpack_from("<I", config, 0x18)[0] == 1
        client.region_write(CONFIG, 0x30, struct.pack("<I", 0xFFFFF800))     # QEMU's ROM probe
        assert client.region_read(CONFIG, 0x30, 4) == bytes(4)
        assert client.irq_info(0).count == 1 and client.irq_info(1).count == 0


def test_intx_delivery_when_the_host_sets_inputs(backend):
    _, sock, ctl = backend
    trigger = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with Client.connect(sock) as client:
            client.enable_irq_eventfds(0, [trigger])

            def unmask():                                             # what QEMU sends at INTx EOI
                client.set_irqs(0, P.IRQ_DATA_NONE | P.IRQ_ACTION_UNMASK, 0, 1)
            assert client.region_read(BAR2, 0x2, 1) == b"\x00"        # guest enables the IRQ
            control(ctl, {"cmd": "set-inputs", "value": 0xBEEF})
            assert wait_irq(trigger)
            assert client.region_read(BAR2, 0x6, 1) == b"\x07"
            assert client.region_read(BAR2, 0x1, 1) + client.region_read(BAR2, 0x5, 1) == b"\xef\xbe"
            unmask()                                                  # EOI before the ack: still pending
            assert wait_irq(trigger)
            client.region_write(BAR2, 0x1, b"\x00")                   # acknowledge, then EOI
            unmask()
            assert control(ctl, {"cmd": "query-status"})["intx"] is False
            assert not wait_irq(trigger, timeout=0.1)
            control(ctl, {"cmd": "set-input", "line": 15, "value": 0})
            assert wait_irq(trigger)
            assert client.region_read(BAR2, 0x6, 1) == b"\x06"
            client.region_write(BAR2, 0x1, b"\x00")
            unmask()
            client.region_write(BAR2, 0x2, b"\x00")                   # guest disables the IRQ
            control(ctl, {"cmd": "set-inputs", "value": 0})
            assert not wait_irq(trigger, timeout=0.2)
    finally:
        os.close(trigger)


def test_outputs_reset_and_reconnection(backend):
    _, sock, ctl = backend
    with Client.connect(sock) as client:
        client.region_write(BAR2, 0x0, b"\x5a")
        client.region_write(BAR2, 0x4, b"\xa5", no_reply=True)        # posted, then a control read
        client.region_read(BAR2, 0x7, 1)
        assert control(ctl, {"cmd": "get-outputs"}) == {"outputs": 0xA55A}
        client.region_write(CONFIG, 0x18, struct.pack("<I", 0xC000))
        control(ctl, {"cmd": "set-inputs", "value": 0x00F0})
    with Client.connect(sock) as client:                                # a new client: state kept
        assert client.region_read(BAR2, 0x0, 1) == b"\x5a"
        assert client.region_read(CONFIG, 0x18, 4) == struct.pack("<I", 0xC001)
        client.reset()
        assert client.region_read(BAR2, 0x0, 8) == b"\x00\xf0\x00\x00\x00\x00\x00\x00"
        assert client.region_read(CONFIG, 0x18, 4) == struct.pack("<I", 0x1)
    status = control(ctl, {"cmd": "query-status"})
    assert (status["outputs"], status["inputs"]) == (0, 0x00F0)


def test_migration_between_two_processes(backend, tmp_path):
    _, sock, ctl = backend
    with Client.connect(sock) as client:
        client.region_write(BAR2, 0x0, b"\x11")
        client.region_read(BAR2, 0x2, 1)
        control(ctl, {"cmd": "set-inputs", "value": 0x0100})
        blob = client.save_device_state()
    destination = Backend(f"--socket-path={tmp_path / 'dst.sock'}", f"--control-socket={tmp_path / 'dst.ctl'}")
    try:
        destination.wait_path(str(tmp_path / "dst.sock"))
        with Client.connect(str(tmp_path / "dst.sock")) as client:
            with pytest.raises(ClientError):
                client.load_device_state(blob[:-1] + bytes([blob[-1] ^ 1]))
            client.reset()
            client.load_device_state(blob)
            assert client.region_read(BAR2, 0x6, 1) == b"\x06"
        assert control(str(tmp_path / "dst.ctl"), {"cmd": "query-status"}) == \
            control(ctl, {"cmd": "query-status"})
    finally:
        assert destination.stop()[0] == 0


def test_sigterm_exits_zero_and_removes_sockets(tmp_path):
    sock, ctl = str(tmp_path / "s"), str(tmp_path / "c")
    process = Backend(f"--socket-path={sock}", f"--control-socket={ctl}")
    process.wait_path(sock)
    assert os.path.exists(ctl)
    code, stderr = process.stop()
    assert code == 0, stderr
    assert not os.path.exists(sock) and not os.path.exists(ctl)


def test_control_fd_inherited(tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "pre.ctl"))
    listener.listen(4)
    sock = str(tmp_path / "s")
    process = Backend(f"--socket-path={sock}", f"--control-fd={listener.fileno()}", pass_fds=[listener.fileno()])
    try:
        process.wait_path(sock)
        listener.close()
        assert control(str(tmp_path / "pre.ctl"), {"cmd": "get-inputs"}) == {"inputs": 0}
    finally:
        assert process.stop()[0] == 0


def test_print_capabilities_and_usage_errors(tmp_path):
    process = Backend("--print-capabilities")
    code = process.proc.wait(10)
    capabilities = json.loads(process.proc.stdout.read())
    process.stop()
    assert code == 0 and capabilities["type"] == "gpio-pci-idio-16"
    assert "control-socket" in capabilities["features"]
    process = Backend(f"--socket-path={tmp_path / 's'}", f"--control-socket={tmp_path / 'nodir' / 'c'}")
    process.proc.wait(10)
    code, stderr = process.stop()
    assert code == 1 and stderr.strip().count("\n") == 0 and "control socket" in stderr
    assert not os.path.exists(tmp_path / "s")
    process = Backend(f"--socket-path={tmp_path / 's'}", "--control-socket=a", "--control-fd=3")
    assert process.proc.wait(10) == 2
    process.stop()


def test_ctl_cli_against_the_running_backend(backend):
    _, sock, ctl = backend
    run = [sys.executable, "-m", "devices.gpio_pci_idio16.ctl", "--control-socket", ctl]
    assert subprocess.run([*run, "set-inputs", "0xBEEF"], cwd=REPO, timeout=20).returncode == 0
    with Client.connect(sock) as client:
        assert client.region_read(BAR2, 0x1, 1) == b"\xef"
        client.region_write(BAR2, 0x4, b"\x80")
    out = subprocess.run([*run, "get-outputs"], cwd=REPO, timeout=20, capture_output=True, text=True)
    assert out.stdout == "0x8000\n"


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_control_socket_survives_running_out_of_fds(tmp_path):
    sock, ctl = str(tmp_path / "s"), str(tmp_path / "c")
    process = Backend(f"--socket-path={sock}", f"--control-socket={ctl}")
    process.wait_path(sock)
    try:
        fds = len(os.listdir(f"/proc/{process.proc.pid}/fd"))
        subprocess.run(["prlimit", f"--pid={process.proc.pid}", f"--nofile={fds + 2}"], check=True)
        crowd = []
        for _ in range(6):                      # more clients than the device has fds for
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(ctl)
            crowd.append(client)
        time.sleep(0.1)
        before = cpu_seconds(process.proc.pid)
        time.sleep(0.5)
        assert cpu_seconds(process.proc.pid) - before < 0.2         # accepting paused, not spinning
        for client in crowd:
            client.close()
        assert control(ctl, {"cmd": "get-inputs"}) == {"inputs": 0}
    finally:
        code, stderr = process.stop()
    assert code == 0 and "accept failed" in stderr


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_independent_c_client(backend, tmp_path):
    """The shared C client (written from the spec, not from our code) against the backend."""
    _, sock, ctl = backend
    source = os.path.join(os.environ.get("JAILER_SHARED_TOOLS") or os.path.join(REPO, "..", "shared", "tools"),
                          "vfu_bench.c")
    if not os.path.exists(source):
        pytest.skip(f"no {source}")
    binary = str(tmp_path / "vfu_bench")
    subprocess.run(["gcc", "-O2", "-o", binary, source], check=True, timeout=120)
    result = subprocess.run([binary, sock, "2", "0", "2000"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, VFU_BENCH_WARMUP="0"))
    assert result.returncode == 0, result.stderr
    assert "config: vendor 494f device 0dc8" in result.stdout
    assert "region 2: size 0x100 flags 0x3" in result.stdout
    assert control(ctl, {"cmd": "get-outputs"}) == {"outputs": 1999 & 0xFF}    # its last write to 0x0
