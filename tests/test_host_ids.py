"""As root, every running sandbox gets a host uid/gid of its own (identity.host_ids, issue 15):
two devices at once differ, neither can signal, ptrace, read the /proc entries of or connect
to the other, and the id is released when the sandbox ends (or its launcher is killed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jailer.errors import ProfileError
from jailer.host import host_ids
from jailer.profile import build_plan
from test_e2e_jailed_device import jailed, profile_variant, scratch  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="host ids of their own are given by root")

# Run as the first device's host uid: what an escaped device could do to its neighbour.
NEIGHBOUR = r"""
import ctypes, errno, json, os, socket, sys
pid, path = int(sys.argv[1]), sys.argv[2]
seen = {}
try:
    os.kill(pid, 0); seen["signal"] = "allowed"
except PermissionError:
    seen["signal"] = "EPERM"
for entry in ("environ", "mem", "fd"):
    try:
        (os.listdir if entry == "fd" else lambda p: open(p, "rb").read(1))(f"/proc/{pid}/{entry}")
        seen[entry] = "allowed"
    except PermissionError:
        seen[entry] = "EACCES"
libc = ctypes.CDLL(None, use_errno=True)
seen["ptrace"] = "allowed" if libc.ptrace(16, pid, 0, 0) == 0 else errno.errorcode[ctypes.get_errno()]
try:
    socket.socket(socket.AF_UNIX).connect(path); seen["connect"] = "allowed"
except PermissionError:
    seen["connect"] = "EACCES"
print(json.dumps(seen))
"""


def _host_ids(device) -> dict:
    for _ in range(1000):
        enforced = [e for e in device.events() if e["event"] == "enforced"]
        if enforced:
            return enforced[0]["layers"]["host_ids"]
        assert device.proc.poll() is None, device.errors()
        time.sleep(0.01)
    raise AssertionError(f"no enforced event: {device.errors()}")


def _device_pid(device) -> int:
    for _ in range(500):
        try:
            return device.device_pid()
        except AssertionError:
            time.sleep(0.01)
    return device.device_pid()


def _record_pid(number: int) -> int | None:
    try:
        return int(Path(f"{host_ids.STATE_DIRECTORY}/{number}").read_text().split()[0])
    except FileNotFoundError:
        return None


def _status_ids(pid: int) -> tuple[int, int]:
    fields = {line.split(":")[0]: line.split()[1:] for line in Path(f"/proc/{pid}/status").read_text().splitlines()}
    return int(fields["Uid"][1]), int(fields["Gid"][1])


def test_two_devices_at_once_have_their_own_host_ids_and_cannot_reach_each_other(scratch, jailed):
    sockets = [str(scratch / f"{name}.sock") for name in ("a", "b")]
    devices = [jailed("root", scratch, "--socket-path", sock) for sock in sockets]
    for device, sock in zip(devices, sockets):
        device.connect(sock).close()
    ids = [_host_ids(device) for device in devices]
    assert ids[0]["mode"] == "per-device" and ids[0]["uid"] != ids[1]["uid"]
    pids = [_device_pid(device) for device in devices]
    for pid, own in zip(pids, ids):
        assert _status_ids(pid) == (own["uid"], own["gid"])           # effective ids, seen from the host
        assert os.stat(f"/proc/{pid}").st_uid == own["uid"]
    for sock, own in zip(sockets, ids):
        assert os.stat(sock).st_uid == own["uid"]
    probe = subprocess.run(["setpriv", f"--reuid={ids[0]['uid']}", f"--regid={ids[0]['gid']}", "--clear-groups",
                            sys.executable, "-S", "-c", NEIGHBOUR, str(pids[1]), sockets[1]],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == {"signal": "EPERM", "environ": "EACCES", "mem": "EACCES", "fd": "EACCES",
                                        "ptrace": "EPERM", "connect": "EACCES"}
    for device in devices:
        assert device.stop() == 0
    for device, own in zip(devices, ids):                               # released (another sandbox may hold it now)
        assert _record_pid(own["uid"]) != device.proc.pid


def test_stable_ids_come_back_for_the_same_name_and_a_killed_launchers_id_is_free_again(scratch, jailed):
    def stable(data):
        data.setdefault("identity", {})["host_ids"] = "stable"
    profile = profile_variant(scratch, "stable", stable)
    sock = str(scratch / "s.sock")
    seen = []
    for how in ("sigterm", "sigkill", "sigterm"):
        device = jailed("root", scratch, "--socket-path", sock, profile=profile)
        device.connect(sock).close()
        seen.append(_host_ids(device)["uid"])
        if how == "sigkill":
            device.proc.send_signal(signal.SIGKILL)
            device.proc.wait()
            time.sleep(0.2)
        else:
            assert device.stop() == 0
    assert len(set(seen)) == 1 and 0x6A000000 <= seen[0] < 0x6A000000 + 0x10000


def test_shared_keeps_the_profiles_ids(scratch, jailed):
    def shared(data):
        data.setdefault("identity", {})["host_ids"] = "shared"
    sock = str(scratch / "shared.sock")
    device = jailed("root", scratch, "--socket-path", sock, profile=profile_variant(scratch, "shared", shared))
    device.connect(sock).close()
    assert _status_ids(_device_pid(device)) == (65534, 65534)
    assert "host_ids" not in [e for e in device.events() if e["event"] == "enforced"][0]["layers"]
    assert device.stop() == 0


@pytest.mark.parametrize("identity, message", [
    ({"host_ids": "per-devic"}, 'identity.host_ids: found "per-devic", expected one of per-device, stable, shared'),
    ({"host_id_range": [5, 10]}, "identity.host_id_range: found an array, expected [first id, count]"),
    ({"host_id_range": [4294967000, 1000]}, "identity.host_id_range: found an array, expected [first id, count]"),
])
def test_a_wrong_host_id_setting_names_the_key(tmp_path, identity, message):
    profile = tmp_path / "p.toml"
    profile.write_text("[program]\nargv = [\"/bin/true\"]\n[identity]\n"
                       + "".join(f"{key} = {json.dumps(value)}\n" for key, value in identity.items()))
    with pytest.raises(ProfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_plan(str(profile), euid=0)
