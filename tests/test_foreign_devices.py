"""Third-party devices jailed: libvfio-user's own gpio-pci-idio-16 sample (a C program that
binds its own socket) under the shipped profiles/libvfio-user-gpio-pci-idio-16.toml, from
../shared/peers (see its README). tests/test_qemu_guest.py drives it from a real guest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devices.vfio_user import protocol as P
from devices.vfio_user.device import BAR2, CONFIG
from test_e2e_jailed_device import INVOCATIONS, JAILER, REPO, jailed, scratch  # noqa: F401  (fixtures)
from test_program_sockets import _wait_event

SAMPLES = REPO.parent / "shared" / "peers" / "libvfio-user" / "samples"
PROFILE = REPO / "profiles" / "libvfio-user-gpio-pci-idio-16.toml"
ENVIRONMENT = {"LIBVFIO_USER_SAMPLES": str(SAMPLES)}

pytestmark = pytest.mark.skipif(not (SAMPLES / "gpio-pci-idio-16").exists(),
                                reason=f"no libvfio-user samples at {SAMPLES} (../shared/peers)")


def _readable_profile(scratch: Path) -> Path:
    copy = scratch / PROFILE.name   # uid 65534 may not read a checkout under /root
    copy.write_text(PROFILE.read_text())
    copy.chmod(0o644)
    return copy


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_the_jailed_sample_serves_through_its_own_socket_and_leaves_nothing(jailed, scratch, invocation):
    path = scratch / "gpio.sock"
    device = jailed(invocation, scratch, "--socket-path", str(path), profile=_readable_profile(scratch),
                    extra_env=ENVIRONMENT)
    _wait_event(device, "ready")
    client = device.connect(str(path))
    config = client.region_read(CONFIG, 0, 4)
    assert int.from_bytes(config, "little") == 0x0DC8494F   # ACCES PCI-IDIO-16, as the sample declares
    assert client.region_info(BAR2)[0].size == 0x100
    client.close()
    device.stop()
    assert not any(e["event"] == "seccomp" for e in device.events()), device.events()
    assert not any(p.name.startswith(".jailer") or p.suffix == ".sock" for p in scratch.iterdir())


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_a_killed_sample_is_restarted_and_its_socket_placed_again(jailed, scratch, invocation):
    """The shipped profile's restart policy for a program that binds its own socket: SIGKILL
    the sample, and jailer starts it again and makes its new socket reachable at the same
    path once it listens; in the end nothing of either run is left."""
    import signal

    path = scratch / "gpio.sock"
    device = jailed(invocation, scratch, "--socket-path", str(path), profile=_readable_profile(scratch),
                    extra_env=ENVIRONMENT)
    _wait_event(device, "ready")
    first = next(e["pid"] for e in device.events() if e["event"] == "started")
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while sum(e["event"] == "listening" for e in device.events()) < 2:
        assert time.monotonic() < deadline and device.proc.poll() is None, device.errors()
        time.sleep(0.02)
    assert [e["event"] for e in device.events() if e["event"] in ("exited", "restarting", "listening")] == \
        ["listening", "exited", "restarting", "listening"]
    client = device.connect(str(path))
    assert int.from_bytes(client.region_read(CONFIG, 0, 4), "little") == 0x0DC8494F
    client.close()
    device.stop()
    assert not any(p.name.startswith(".jailer") or p.suffix == ".sock" for p in scratch.iterdir())


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_the_shipped_profile_passes_selftest(scratch, invocation):
    command, env = JAILER.command(invocation)
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(scratch), **env, **ENVIRONMENT}
    result = subprocess.run([*command, "selftest", str(_readable_profile(scratch))], capture_output=True, text=True,
                            timeout=300, env=environment, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("overall: blocked")


DRIVER = """\
import os, sys
sys.path.insert(0, {repo!r})
from devices.vfio_user.client import Client
from devices.vfio_user import protocol as P
from devices.vfio_user.device import BAR2, CONFIG
client = Client.connect(os.environ["JAILER_SOCKET"])
assert client.region_read(CONFIG, 0, 4) == bytes.fromhex("4f49c80d")
client.region_write(BAR2, 0, b"\\x01")
client.close()
"""


def test_learning_under_the_callers_own_driver(tmp_path):
    """jailer learn --drive: the user's own driver (here a small client; a VM in real life)
    drives the device, once per run and again to validate the learned filter."""
    profile = tmp_path / "gpio.toml"
    profile.write_text(PROFILE.read_text())
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    command, env = JAILER.command("root" if os.geteuid() == 0 else "user")
    result = subprocess.run([*command, "learn", str(profile), "--in-place", "--json", "--runs", "2",
                             "--drive", f"{sys.executable} {driver}"], capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env, **ENVIRONMENT}, cwd="/")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["validation"]["refused"] == 0
    assert [step["name"] for step in summary["learning_runs"][0]["exerciser"]["steps"]] == ["command"]
    assert all(run["exerciser"]["ok"] for run in summary["learning_runs"])
    assert "# Learned by `jailer learn --drive COMMAND`" in profile.read_text()
    assert {"recvmsg", "sendmsg", "accept"} <= set(summary["syscalls"])


SERVER_PROFILE = REPO / "profiles" / "libvfio-user-server.toml"


def test_dma_and_migration_between_two_jailed_libvfio_user_servers(jailed, scratch):
    """libvfio-user's `server` sample, jailed twice: guest memory reaches each through a
    memfd (DMA_MAP with its descriptor), and the device state migrates from one to the other
    (migration v2: STOP_COPY read to its end, RESUMING, STOP, RUNNING)."""
    invocation = "root" if os.geteuid() == 0 else "user"
    profile = scratch / SERVER_PROFILE.name
    profile.write_text(SERVER_PROFILE.read_text())
    profile.chmod(0o644)
    devices = {name: jailed(invocation, scratch, "--socket-path", str(scratch / f"{name}.sock"), profile=profile,
                            extra_env=ENVIRONMENT) for name in ("source", "destination")}
    for device in devices.values():
        _wait_event(device, "ready")
    source = devices["source"].connect(str(scratch / "source.sock"))
    destination = devices["destination"].connect(str(scratch / "destination.sock"))
    guest_ram = os.memfd_create("guest-ram")
    os.ftruncate(guest_ram, 1 << 20)
    for client in (source, destination):   # each jailed sample maps guest RAM (mmap of the memfd, kcmp)
        client.dma_map(0x1000_0000, 1 << 20, fd=guest_ram)
    # BAR0 holds the time its timer fires: the sample refuses to run again with none (it
    # arms a timer of 0: "failed to arm timer: Invalid argument"), so the source sets one
    source.region_write(0, 0, int(time.time() + 3600).to_bytes(8, "little"))
    offsets = (0, 4096, 8192)                                  # BAR1: mmap areas and the page between
    for offset in offsets:
        source.region_write(1, offset, b"jailed!!")
    state = source.save_device_state()
    assert len(state) == 16384 + 8                              # BAR1 and BAR0
    destination.set_migration_state(P.MIG_STATE_RESUMING)
    for position in range(0, len(state), 4096):
        destination.mig_data_write(state[position:position + 4096])
    destination.set_migration_state(P.MIG_STATE_STOP)
    destination.set_migration_state(P.MIG_STATE_RUNNING)
    assert [destination.region_read(1, offset, 8) for offset in offsets] == [b"jailed!!"] * 3
    for client in (source, destination):
        client.close()
    for device in devices.values():   # the sample serves one client, then exits
        assert device.proc.wait(20) == 0, device.errors()
        assert not any(e["event"] == "seccomp" for e in device.events()), device.events()
    os.close(guest_ram)
    assert not any(p.name.startswith(".jailer") or p.suffix == ".sock" for p in scratch.iterdir())
