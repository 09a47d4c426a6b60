"""The learning walk (exercise(strict=False)) against libvfio-user's own sample devices.

The samples run unjailed, straight from the shared peers folder, each on a socket in the
test's temporary directory. They are foreign devices: every step must pass unless the
device's answer breaks the vfio-user spec, and where libvfio-user does break it the step
must fail with exactly the departure docs/libvfio-user-notes.md records, nothing else.
"""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from devices.vfio_user.exerciser import exercise

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO.parent / "shared" / "peers" / "libvfio-user" / "samples"

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"no libvfio-user samples at {SAMPLES}: the shared "
                                "peers folder (REPO/../shared/peers) is absent")

# The steps a device can take within its first session, in the learning walk's order.
ONE_SESSION = ["VERSION", "DEVICE_GET_INFO", "GET_REGION_INFO", "GET_REGION_IO_FDS", "GET_IRQ_INFO", "config space",
               "BARs", "REGION_WRITE_MULTI", "SET_IRQS", "DMA", "DEVICE_RESET", "error replies"]
ALL_STEPS = ONE_SESSION + ["migration", "malformed frame", "largest message", "reconnection"]

# The departures of docs/libvfio-user-notes.md as the walk reports them.
LOST_BOUNDARY = "lost the message boundary"                          # libvfio-user: a body split across reads
MIGRATION_ABORT = "closed the connection instead of replying to MIG_DATA_READ"       # gpio sample: assert(size == 64)
ONE_CLIENT = "not reached: the device stopped accepting connections after its first client"


class Sample:
    """A libvfio-user sample serving on its own socket; stop() leaves no process or socket file behind."""

    def __init__(self, tmp_path, program: str, *flags: str):
        self.socket_path = str(tmp_path / f"{program}.sock")
        self.log_path = tmp_path / f"{program}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([str(SAMPLES / program), *flags, self.socket_path], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket_path):
            if self.proc.poll() is not None:
                if "error while loading shared libraries" in self.log():
                    pytest.skip(f"{program} cannot start: {self.log().strip()} (apt-get install libjson-c5)")
                pytest.fail(f"{program} exited with {self.proc.returncode} before binding its socket: {self.log()}")
            assert time.monotonic() < deadline, f"{program} did not bind {self.socket_path}"
            time.sleep(0.01)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def walk(self):
        return exercise(self.socket_path, strict=False, alive=self.alive, timeout=5.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(FileNotFoundError):      # SIGTERM leaves the socket file behind
            os.unlink(self.socket_path)


@pytest.fixture
def start_sample(tmp_path):
    samples = []

    def start(program: str, *flags: str) -> Sample:
        sample = Sample(tmp_path, program, *flags)
        samples.append(sample)
        return sample

    yield start
    for sample in samples:
        sample.stop()


def outcomes(report) -> dict:
    return {step.name: "passed" if step.ok else "failed" if step.reached else "not reached" for step in report.steps}


def detail(report, name: str) -> str:
    return next(step.detail for step in report.steps if step.name == name)


def test_gpio_sample_passes_every_step_until_its_migration_read_aborts(start_sample):
    sample = start_sample("gpio-pci-idio-16")
    report = sample.walk()
    assert [step.name for step in report.steps] == ALL_STEPS
    assert outcomes(report) == {**dict.fromkeys(ONE_SESSION, "passed"), "migration": "failed",
                                "malformed frame": "not reached", "largest message": "not reached",
                                "reconnection": "not reached"}, report.to_dict()
    assert MIGRATION_ABORT in detail(report, "migration")
    assert "migration_read_data: Assertion" in sample.log()      # the sample's own assert(), size 4096 != 64
    assert sample.proc.wait(5) == -signal.SIGABRT
    for name in ("malformed frame", "largest message", "reconnection"):
        assert detail(report, name).startswith("not reached: the device is gone: it closed the connection during "
                                               "'migration'")
    for command in ("VERSION", "DEVICE_GET_REGION_INFO", "DEVICE_GET_REGION_IO_FDS", "DEVICE_SET_IRQS", "REGION_READ",
                    "REGION_WRITE", "REGION_WRITE_MULTI", "DMA_MAP", "DMA_UNMAP", "DEVICE_RESET", "DEVICE_FEATURE",
                    "MIG_DATA_READ", "command 99"):
        assert report.commands[command] >= 1, command
    assert report.interrupts >= 3                                # INTx, ERR and REQ software triggers


def test_gpio_sample_without_migration_passes_all_but_the_message_boundary(start_sample):
    sample = start_sample("gpio-pci-idio-16", "-M")
    report = sample.walk()
    assert outcomes(report) == {**dict.fromkeys(ALL_STEPS, "passed"), "largest message": "failed"}, report.to_dict()
    assert LOST_BOUNDARY in detail(report, "largest message")
    assert "no migration" in detail(report, "migration")
    assert "error reply, errno 22" in detail(report, "malformed frame")    # an error reply, not a hang-up: allowed
    assert sample.alive()                                                     # it keeps serving new clients


def test_gpio_sample_that_serves_one_more_client_is_reported_not_reached(start_sample):
    """-R: after its first client the sample accepts one connection, answers VERSION, exits."""
    sample = start_sample("gpio-pci-idio-16", "-M", "-R")
    report = sample.walk()
    assert outcomes(report) == {**dict.fromkeys(ALL_STEPS, "passed"), "largest message": "failed",
                                "reconnection": "not reached"}, report.to_dict()
    assert LOST_BOUNDARY in detail(report, "largest message")
    assert detail(report, "reconnection") == f"{ONE_CLIENT} (it answered VERSION on connection 2, then closed it)"
    assert report.failures == [step for step in report.steps if step.name == "largest message"]
    assert sample.proc.wait(5) == 0 and not os.path.exists(sample.socket_path)


def test_server_sample_serves_one_client_and_the_rest_is_not_reached(start_sample):
    """`server` (DMA, migration v2) exits when its only client leaves: every path runs in one session."""
    sample = start_sample("server")
    report = sample.walk()
    assert outcomes(report) == {**dict.fromkeys(ALL_STEPS, "passed"), "largest message": "failed",
                                "reconnection": "not reached"}, report.to_dict()
    assert LOST_BOUNDARY in detail(report, "largest message")
    assert detail(report, "reconnection") == ONE_CLIENT
    assert [step.name for step in report.not_reached] == ["reconnection"]
    migration = detail(report, "migration")
    assert "migration flags 0x5" in migration                    # STOP_COPY and PRE_COPY
    assert "stream of 32776 bytes in 10 reads" in migration      # BAR1 in PRE_COPY, BAR1 and BAR0 in STOP_COPY
    assert "BAR1 0x4000/0xf" in detail(report, "GET_REGION_INFO")             # sparse mmap areas mmap()ed
    for command in ("DMA_MAP", "DMA_UNMAP", "MIG_DATA_READ", "MIG_DATA_WRITE", "DEVICE_FEATURE"):
        assert report.commands[command] >= 1, command
    assert sample.proc.wait(5) == 0 and not os.path.exists(sample.socket_path)
