"""Programs that bind their own socket ([[sockets]], ready = "socket"), as libvfio-user devices
do: the bundled device started with --socket-path inside the sandbox stands in for them here
(tests/test_foreign_devices.py runs libvfio-user's own samples)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import toml

from test_e2e_jailed_device import INVOCATIONS, JAILER, jailed, scratch  # noqa: F401  (fixtures)

INSIDE = "/run/vfio-user/idio16.sock"


def own_socket_profile(scratch: Path, name: str, **program) -> Path:
    """The bundled device binding its socket itself, in every namespace, seccomp off (what it
    may call once it binds its own socket is another profile's business)."""
    data = {
        "name": name,
        "program": {"runtime": "python", "argv": ["-m", "devices.gpio_pci_idio16", "--socket-path={socket:vfio-user}"],
                    "modules": ["devices"], "ready": "socket", **program},
        "sockets": [{"name": "vfio-user", "path": INSIDE}],
        "seccomp": {"enabled": False},
        "limits": {"cgroup": {"memory": "64M"}},
        "enforcement": {"best_effort": ["cgroup"]},
    }
    path = scratch / f"{name}.toml"
    path.write_text(toml.dumps(data))
    path.chmod(0o644)
    return path


def _wait_event(device, kind, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in device.events():
            if event["event"] == kind:
                return event
        assert device.proc.poll() is None, f"jailer exited {device.proc.returncode}: {device.errors()}"
        time.sleep(0.02)
    raise AssertionError(f"no {kind} event: {device.events()} {device.errors()}")


@pytest.mark.parametrize("monitor", ["on", "off"])
@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_a_program_that_binds_its_socket_is_ready_once_it_listens_and_leaves_nothing(
        jailed, scratch, invocation, monitor):
    path = scratch / f"{invocation}.sock"
    device = jailed(invocation, scratch, "--socket-path", str(path), profile=own_socket_profile(scratch, "own"),
                    extra_env={"JAILER_MONITOR": monitor})
    listening = _wait_event(device, "listening")
    _wait_event(device, "ready")
    assert listening == {"event": "listening", "socket": "vfio-user", "path": str(path)}
    names = [e["event"] for e in device.events()]
    assert names.index("listening") < names.index("ready")
    client = device.connect(str(path))          # the program's own socket, reached at the caller's path
    assert client.device_info().num_regions >= 9   # the PCI regions: BARs, ROM, config space, VGA
    client.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert device.stop() == 0
    assert sorted(p.name for p in scratch.iterdir() if p.suffix == ".sock" or p.name.startswith(".jailer")) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to name another group")
def test_socket_group_gives_the_programs_socket_mode_0660_in_that_group(jailed, scratch):
    path = scratch / "group.sock"
    device = jailed("root", scratch, "--socket-path", str(path), "--socket-group", "65533",
                    profile=own_socket_profile(scratch, "group"))
    _wait_event(device, "ready")
    st = os.lstat(path)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, 65533)
    device.stop()


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_a_program_that_never_listens_fails_after_its_timeout_and_leaves_nothing(jailed, scratch, invocation):
    data = toml.loads(own_socket_profile(scratch, "silent", ready_timeout=0.5).read_text())
    data["program"]["argv"] = ["-c", "import time; time.sleep(30)"]
    profile = scratch / "silent.toml"
    profile.write_text(toml.dumps(data))
    started = time.monotonic()
    device = jailed(invocation, scratch, "--socket-path", str(scratch / "silent.sock"), profile=profile)
    code = device.proc.wait(20)
    assert time.monotonic() - started < 10
    assert code == 1
    assert device.errors().strip().splitlines()[-1] == (
        f"jailer: the program did not listen on its socket 'vfio-user' ({INSIDE}) within 0.5 s "
        "(program.ready_timeout)")
    assert not any(p.name.startswith(".jailer") or p.suffix == ".sock" for p in scratch.iterdir())


def test_landlock_lets_the_program_make_only_sockets_in_its_socket_directory(jailed, scratch):
    data = toml.loads(own_socket_profile(scratch, "landlocked").read_text())
    data["program"]["argv"] = ["-c", (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
        "for attempt in (lambda: open('/run/vfio-user/file', 'w'), lambda: os.mkdir('/run/vfio-user/dir'),\n"
        "                lambda: os.symlink('/', '/run/vfio-user/link')):\n"
        "    try:\n"
        "        attempt(); print('allowed', file=sys.stderr)\n"
        "    except PermissionError:\n"
        "        print('refused', file=sys.stderr)\n"
        "import time; time.sleep(30)\n"), "{socket:vfio-user}"]
    profile = scratch / "landlocked.toml"
    profile.write_text(toml.dumps(data))
    device = jailed("root" if os.geteuid() == 0 else "user", scratch, "--socket-path", str(scratch / "ll.sock"),
                    profile=profile)
    _wait_event(device, "ready")
    deadline = time.monotonic() + 10
    while device.errors().count("refused") + device.errors().count("allowed") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    device.stop()
    assert device.errors().count("refused") == 3, device.errors()


def test_without_a_socket_path_the_run_is_refused_in_one_line(scratch):
    command, env = JAILER.command("root" if os.geteuid() == 0 else "user")
    result = subprocess.run([*command, "run", str(own_socket_profile(scratch, "nopath"))], capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env}, cwd="/")
    assert result.returncode == 2
    assert result.stderr == ("jailer: the program binds its socket 'vfio-user' itself: say where to make it "
                             "reachable with --socket-path PATH\n")


def test_sigterm_before_ready_removes_the_socket_directory(jailed, scratch):
    data = toml.loads(own_socket_profile(scratch, "slow", ready_timeout=30).read_text())
    data["program"]["argv"] = ["-c", "import time; time.sleep(30)"]
    profile = scratch / "slow.toml"
    profile.write_text(toml.dumps(data))
    device = jailed("root" if os.geteuid() == 0 else "user", scratch, "--socket-path", str(scratch / "slow.sock"),
                    profile=profile)
    _wait_event(device, "started")
    assert any(p.name.startswith(".jailer") for p in scratch.iterdir())
    device.stop(signal.SIGTERM)
    assert not any(p.name.startswith(".jailer") or p.suffix == ".sock" for p in scratch.iterdir())


@pytest.mark.skipif(os.geteuid() != 0, reason="the caller's private directory is root's")
def test_a_socket_path_in_the_callers_private_directory(jailed, scratch, tmp_path):
    """The directory jailer binds for the socket lies in a 0700 directory of root's (pytest's
    tmp_path, or /root): the set-up opens it with root's ids before it takes the sandbox's."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    device = jailed("root", scratch, "--socket-path", str(private / "dev.sock"),
                    profile=own_socket_profile(scratch, "private"))
    _wait_event(device, "ready")
    device.connect(str(private / "dev.sock")).close()
    assert device.stop() == 0
    assert list(private.iterdir()) == []


def test_learn_then_selftest_a_device_that_binds_its_own_socket(tmp_path):
    """jailer learn drives the program through the socket it binds itself (reached at a path
    of learn's own), and the learned profile holds under jailer selftest."""
    profile = tmp_path / "own.toml"
    profile.write_text(toml.dumps({
        "name": "idio16-own-socket",
        "program": {"runtime": "python", "argv": ["-m", "devices.gpio_pci_idio16", "--socket-path={socket:vfio-user}"],
                    "modules": ["devices"], "ready": "socket"},
        "sockets": [{"name": "vfio-user", "path": INSIDE}],
        "seccomp": {"default_action": "kill", "allow": ["@python"]},
    }))
    command, env = JAILER.command("root" if os.geteuid() == 0 else "user")
    environment = {"PATH": "/usr/bin:/bin", "JAILER_CACHE_DIR": str(tmp_path / "cache"), **env}
    learned = subprocess.run([*command, "learn", str(profile), "--in-place", "--json"], capture_output=True, text=True,
                             timeout=300, env=environment, cwd="/")
    assert learned.returncode == 0, learned.stderr
    summary = json.loads(learned.stdout)
    assert summary["validation"]["refused"] == 0 and all(run["exerciser"]["ok"] for run in summary["learning_runs"])
    assert {"socket", "bind", "listen"} <= set(summary["syscalls"])   # it makes its own socket
    checked = subprocess.run([*command, "selftest", str(profile)], capture_output=True, text=True, timeout=300,
                             env=environment, cwd="/")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.splitlines()[-1].startswith("overall: blocked")
