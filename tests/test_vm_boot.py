"""The Debian 12 guest of tests/vm/debian.py boots systemd as pid 1 on the unified cgroup v2
hierarchy and runs the checkout under test from /opt/jailer: the ground that tests of jailer
under a real systemd (systemd-run, systemctl, jailer systemd) stand on.

The first run builds the image (debootstrap and setup.sh, as root, from the network) and caches
it; later runs boot it. Skipped, saying why, where the image can be neither found nor built.
"""

from __future__ import annotations

import time

import pytest
from vm.debian import Guest, VMUnavailable, skip_or_fail

VENV = "/opt/jailer/.venv"


@pytest.fixture(scope="module")
def guest():
    started = time.monotonic()
    booted = Guest()
    try:
        booted.boot()
    except VMUnavailable as reason:
        skip_or_fail(reason)
    print(f"\nguest agent ready {booted.ready_seconds:.1f} s after QEMU started, "
          f"{time.monotonic() - started:.1f} s after the fixture did")
    yield booted
    booted.close()


def test_pid_1_is_systemd(guest):
    status, executable, stderr = guest.run("readlink /proc/1/exe")
    assert status == 0, stderr
    assert executable.strip().endswith("/lib/systemd/systemd"), executable


def test_the_cgroup_hierarchy_is_unified_v2(guest):
    status, filesystem, stderr = guest.run("stat -fc %T /sys/fs/cgroup")
    assert (status, filesystem.strip()) == (0, "cgroup2fs"), stderr


def test_the_system_is_running(guest):
    _, state, _ = guest.run("systemctl is-system-running --wait", timeout=120)
    _, failed, _ = guest.run("systemctl list-units --failed --no-legend --plain")
    print(f"\nsystem state {state.strip()}; failed units: {failed.strip() or 'none'}")
    assert state.strip() in ("running", "degraded"), f"{state.strip()}; failed units:\n{failed}"


def test_jailer_check_runs(guest):
    status, stdout, stderr = guest.run(f"{VENV}/bin/jailer check /opt/jailer/profiles/gpio-pci-idio-16.toml",
                                       timeout=120)
    print(f"\njailer check: exit status {status}\n{stdout}{stderr}")
    assert "Traceback" not in stderr, stderr
    assert status in (0, 3), f"jailer check: 0 when every required layer is available, 3 when one is not\n{stderr}"


def test_pytest_runs_in_the_guest(guest):
    status, stdout, stderr = guest.run(f"{VENV}/bin/python -m pytest --version", timeout=120)
    assert status == 0, stderr
    assert (stdout + stderr).startswith("pytest "), stdout + stderr
