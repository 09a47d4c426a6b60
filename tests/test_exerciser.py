"""The conformance walk against the bundled IDIO-16 device, run as a real, unsandboxed process."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devices.vfio_user.exerciser import ConformanceError, exercise

REPO = Path(__file__).resolve().parent.parent


class Device:
    def __init__(self, tmp_path, control=True):
        self.socket_path = str(tmp_path / "idio16.sock")
        self.control_path = str(tmp_path / "control.sock") if control else None
        argv = [sys.executable, "-m", "devices.gpio_pci_idio16", f"--socket-path={self.socket_path}"]
        if control:
            argv.append(f"--control-socket={self.control_path}")
        self.log = open(tmp_path / "device.log", "w+")
        self.proc = subprocess.Popen(argv, cwd=REPO, stderr=self.log)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket_path):
            assert self.proc.poll() is None and time.monotonic() < deadline, "device did not start"
            time.sleep(0.01)

    def terminate(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def device(tmp_path):
    device = Device(tmp_path)
    yield device
    device.stop()


def test_full_walk_passes_and_covers_every_command(device):
    report = exercise(device.socket_path, device.control_path, terminate=device.terminate).check()
    names = [step.name for step in report.steps]
    assert names[0] == "VERSION" and names[-2:] == ["control socket", "SIGTERM"] and len(names) == 16
    for command in ("VERSION", "DEVICE_GET_INFO", "DEVICE_GET_REGION_INFO", "DEVICE_GET_IRQ_INFO", "DEVICE_SET_IRQS",
                    "REGION_READ", "REGION_WRITE", "REGION_WRITE_MULTI", "DMA_MAP", "DMA_UNMAP", "DEVICE_RESET",
                    "DEVICE_FEATURE", "MIG_DATA_READ", "MIG_DATA_WRITE", "DIRTY_PAGES", "command 99"):
        assert report.commands[command] >= 1, command
    assert report.interrupts >= 5 and report.exit_status == 0
    assert not os.path.exists(device.socket_path)      # the device removed its socket on SIGTERM


def test_walk_without_control_socket(tmp_path):
    device = Device(tmp_path, control=False)
    try:
        report = exercise(device.socket_path).check()
        assert "control socket" not in [s.name for s in report.steps] and report.exit_status is None
        assert device.proc.poll() is None                  # no terminate given: the device keeps running
    finally:
        device.stop()


def test_a_peer_that_is_no_device_fails_in_one_step(tmp_path):
    path = str(tmp_path / "mute.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    try:
        started = time.monotonic()
        report = exercise(path, timeout=0.3)
        assert time.monotonic() - started < 5
        assert [s.name for s in report.failures] == ["VERSION", "DEVICE_GET_INFO"] and not report.ok
        with pytest.raises(ConformanceError, match="VERSION"):
            report.check()
    finally:
        listener.close()
