"""jailer under a real systemd, in the Debian 12 guest of tests/vm/debian.py (systemd 252 as
pid 1, the unified cgroup v2 hierarchy): the documented `systemd-run` line starts the jailed
IDIO-16, the unit is active only once the device serves, the device's cgroup is made under
the unit's delegated subtree with the profile's limits and is the root of the device's cgroup
namespace, systemd restarts a killed device and hands the checkpoint back from its file
descriptor store, and `systemctl stop` leaves no cgroup and no socket behind; socket
activation, a drop-in over an existing unit, the memory and pids limits in a delegated scope,
`jailer selftest` as root and as a user, `systemd-analyze security` of the running unit, and
an unprivileged user's cgroup limits in its own delegated subtree.

One guest for the module (about 25 s to boot once the image is cached; see test_vm_boot.py).
"""

from __future__ import annotations

import json
import shlex

import pytest
from vm.debian import Guest, VMUnavailable, skip_or_fail

CHECKOUT = "/opt/jailer"
JAILER = f"{CHECKOUT}/.venv/bin/jailer"
PYTHON = f"{CHECKOUT}/.venv/bin/python"
PROFILE = f"{CHECKOUT}/profiles/gpio-pci-idio-16.toml"
UNIT = "idio16"
SOCKET = f"/run/jailer/{UNIT}/vfio-user.sock"
SERVICE_CGROUP = f"/sys/fs/cgroup/system.slice/{UNIT}.service"

# The project's vfio-user client, in the guest: set the outputs (BAR2 0x0 and 0x4) if asked,
# then print them.
OUTPUTS = """
import sys
from devices.vfio_user.client import Client
from devices.vfio_user.device import BAR2
with Client.connect(sys.argv[1], timeout=60) as client:   # socket-activated: the first connection waits for the start
    if len(sys.argv) > 2:
        value = int(sys.argv[2], 0)
        client.region_write(BAR2, 0x0, bytes([value & 0xFF]))
        client.region_write(BAR2, 0x4, bytes([value >> 8]))
    print(client.region_read(BAR2, 0x0, 1)[0] | client.region_read(BAR2, 0x4, 1)[0] << 8)
"""


@pytest.fixture(scope="module")
def guest():
    booted = Guest()
    try:
        booted.boot()
    except VMUnavailable as reason:
        skip_or_fail(reason)
    yield booted
    booted.close()


def run(guest, command, timeout=60):
    status, stdout, stderr = guest.run(command, timeout=timeout)
    assert status == 0, f"{command}: exit status {status}\n{stdout}{stderr}"
    return stdout.strip()


def unit_property(guest, name):
    return run(guest, f"systemctl show {UNIT} -p {name} --value")


def outputs(guest, value=None):
    extra = f" {value:#x}" if value is not None else ""
    return int(run(guest, f"cd {CHECKOUT} && {PYTHON} -c {shlex.quote(OUTPUTS)} {SOCKET}{extra}"))


def device_pid(guest):
    """The host pid of the device: the process in the unit running the device module."""
    pids = run(guest, f"cat {SERVICE_CGROUP}/jailer/*/cgroup.procs").split()
    for pid in pids:
        if "devices.gpio_pci_idio16" in run(guest, f"tr '\\0' ' ' < /proc/{pid}/cmdline"):
            return int(pid)
    raise AssertionError(f"no device among {pids}")


@pytest.fixture(scope="module")
def started(guest):
    """The unit started by the systemd-run line `jailer systemd --print-systemd-run` prints."""
    line = run(guest, f"{JAILER} systemd {PROFILE} --name {UNIT} --print-systemd-run")
    assert line.startswith("systemd-run ") and f" -- {JAILER} run {PROFILE} --no-restart " in line, line
    run(guest, line, timeout=120)   # Type=notify: returns once jailer has said READY=1
    yield line
    guest.run(f"systemctl stop {UNIT}; systemctl reset-failed {UNIT}", timeout=60)


def test_the_unit_is_active_once_the_device_serves_and_its_main_pid_is_jailers(guest, started):
    assert unit_property(guest, "ActiveState") == "active"
    main = int(unit_property(guest, "MainPID"))
    assert run(guest, f"readlink /proc/{main}/exe").endswith(("/jailer-monitor", "/python3", "/python3.11"))
    assert run(guest, f"cat /proc/{device_pid(guest)}/status | grep PPid").split()[1] == str(main)
    probe = json.loads(run(guest, f"{JAILER} probe --json {SOCKET}"))
    assert (probe["pci"]["vendor"], probe["pci"]["device"]) == (0x494F, 0x0DC8)


def test_the_device_cgroup_is_under_the_units_delegated_subtree_with_the_profiles_limits(guest, started):
    pid = device_pid(guest)
    cgroup = run(guest, f"cat /proc/{pid}/cgroup")
    assert cgroup.startswith(f"0::/system.slice/{UNIT}.service/jailer/gpio-pci-idio-16."), cgroup
    directory = "/sys/fs/cgroup" + cgroup[3:]
    assert run(guest, f"cat {directory}/memory.max") == str(64 << 20)
    assert run(guest, f"cat {directory}/pids.max") == "8"
    assert run(guest, f"cat {directory}/cpu.max") == "100000 100000"
    # the launcher moved itself out of the unit's own cgroup so that it could enable the controllers
    launchers = run(guest, f"cat {SERVICE_CGROUP}/jailer-launchers/cgroup.procs").split()
    assert unit_property(guest, "MainPID") in launchers
    assert run(guest, f"cat {SERVICE_CGROUP}/cgroup.procs") == ""
    # inside, the device's cgroup namespace is rooted at its own cgroup
    assert run(guest, f"nsenter --cgroup --target {pid} cat /proc/{pid}/cgroup") == "0::/"


def test_systemd_restarts_a_killed_device_with_its_checkpoint_from_the_store(guest, started):
    assert outputs(guest, 0xA55A) == 0xA55A
    first_main = unit_property(guest, "MainPID")
    run(guest, f"kill -KILL {device_pid(guest)}")
    run(guest, f"for i in $(seq 1 300); do [ \"$(systemctl show {UNIT} -p NRestarts --value)\" = 1 ] && "
               f"[ \"$(systemctl show {UNIT} -p ActiveState --value)\" = active ] && exit 0; sleep 0.1; done; "
               "exit 1", timeout=60)
    assert unit_property(guest, "MainPID") != first_main
    assert outputs(guest) == 0xA55A
    journal = run(guest, f"journalctl -u {UNIT} -o cat --no-pager")
    assert "restored state from checkpoint" in journal, journal


def test_stop_leaves_no_cgroup_and_no_socket(guest, started):
    run(guest, f"systemctl stop {UNIT}", timeout=60)
    assert unit_property(guest, "ActiveState") in ("inactive", "failed")
    assert run(guest, "find /sys/fs/cgroup -name 'gpio-pci-idio-16.*'") == ""
    assert run(guest, f"test -e {SOCKET} && echo present || echo absent") == "absent"


def test_socket_activation_starts_the_device_on_the_first_connection(guest):
    """`jailer systemd --socket`: systemd owns the socket; the first client starts the service,
    which gets the listener through LISTEN_FDS, and stopping both leaves nothing."""
    name, path = "idio16-activated", "/run/jailer/idio16-activated/vfio-user.sock"
    run(guest, f"{JAILER} systemd {PROFILE} --name {name} --socket --output-dir /etc/systemd/system && "
               f"systemctl daemon-reload && systemctl start {name}.socket")
    try:
        assert run(guest, f"systemctl show {name}.service -p ActiveState --value") == "inactive"
        assert run(guest, f"test -S {path} && echo socket") == "socket"
        first = int(run(guest, f"cd {CHECKOUT} && {PYTHON} -c {shlex.quote(OUTPUTS)} {path} 0x0102", timeout=120))
        assert first == 0x0102
        assert run(guest, f"systemctl show {name}.service -p ActiveState --value") == "active"
        journal = run(guest, f"journalctl -u {name}.service -o cat --no-pager")
        assert "serving gpio-pci-idio-16 on fd 3" in journal, journal
    finally:
        guest.run(f"systemctl stop {name}.socket {name}.service", timeout=60)
    assert run(guest, "find /sys/fs/cgroup -name 'gpio-pci-idio-16.*'") == ""
    assert run(guest, f"test -e {path} && echo present || echo absent") == "absent"


def test_jailer_check_and_selftest_pass_in_the_guest_as_root_and_as_a_user(guest):
    check = run(guest, f"{JAILER} check {PROFILE}", timeout=120)
    assert "v2" in check and "cgroup" in check, check
    run(guest, f"{JAILER} selftest {PROFILE}", timeout=300)
    status, stdout, stderr = guest.run(f"cd / && setpriv --reuid=65534 --regid=65534 --clear-groups "
                                       f"env HOME=/tmp {JAILER} selftest {PROFILE}", timeout=300)
    assert status == 0, stdout + stderr


def test_systemd_analyze_security_rates_the_running_unit(guest):
    line = run(guest, f"{JAILER} systemd {PROFILE} --name idio16-rated --print-systemd-run")
    run(guest, line, timeout=120)
    try:
        rating = run(guest, "systemd-analyze security idio16-rated.service --no-pager | tail -1")
        print(f"\nsystemd-analyze security, running unit: {rating}")
        assert "Overall exposure level for idio16-rated.service:" in rating
        score = float(rating.split(":")[1].split()[0])
        assert score < 5, rating
    finally:
        guest.run("systemctl stop idio16-rated", timeout=60)


LIMITED = """name = "limited"
[program]
runtime = "native"
argv = ["/usr/bin/python3", "-c", "{code}"]
[filesystem]
bind = [{{ source = "/usr", target = "/usr" }}, {{ source = "/lib", target = "/lib" }},
        {{ source = "/lib64", target = "/lib64" }}, {{ source = "/bin", target = "/bin" }}]
[seccomp]
enabled = false
[limits.cgroup]
memory = "32M"
pids = 8
"""
HOG = "blocks = [b'x' * (1 << 20) for _ in range(200)]"   # 200 MiB written, against 32M
BOMB = ("import os, time\\n"
        "children = []\\n"
        "try:\\n"
        "    for _ in range(50):\\n"
        "        pid = os.fork()\\n"
        "        if pid == 0:\\n"
        "            time.sleep(5); os._exit(0)\\n"
        "        children.append(pid)\\n"
        "except BlockingIOError:\\n"
        "    print('refused after', len(children), flush=True)\\n"
        "for pid in children:\\n"
        "    os.kill(pid, 9)")


def jailed_in_a_delegated_scope(guest, name, code, timeout=120):
    """`jailer run` as root in a transient scope with Delegate=yes (what `systemd-run --scope`
    gives a shell): the launcher alone in its cgroup, which it hands to the sandbox's."""
    guest.put(f"/tmp/{name}.toml", LIMITED.format(code=code.replace('"', '\\"')).encode(), 0o644)
    return guest.run(f"systemd-run --quiet --scope -p Delegate=yes {JAILER} run --status-fd 1 /tmp/{name}.toml",
                     timeout=timeout)


def test_the_memory_limit_oom_kills_a_program_that_outgrows_it(guest):
    status, stdout, stderr = jailed_in_a_delegated_scope(guest, "hog", HOG)
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    enforced = next(e for e in events if e["event"] == "enforced")
    assert enforced["layers"]["cgroup"]["memory"].startswith("v2:/sys/fs/cgroup/"), enforced
    assert events[-1] == {"event": "exited", "signal": 9} and status == 137, (status, stdout, stderr)
    assert "oom" in run(guest, "journalctl -k -o cat --no-pager | tail -40").lower()


def test_the_pids_limit_stops_a_fork_bomb(guest):
    status, stdout, stderr = jailed_in_a_delegated_scope(guest, "bomb", BOMB)
    refused = [line for line in stdout.splitlines() if line.startswith("refused after")]
    assert status == 0 and refused, (status, stdout, stderr)
    assert int(refused[0].split()[-1]) < 8      # the reaper and the program count too
    assert run(guest, "find /sys/fs/cgroup -name 'limited.*'") == ""


def test_a_drop_in_jails_an_existing_unit(guest):
    """`jailer systemd --drop-in UNIT` over a unit the user already has: its ExecStart= is
    replaced (cleared first) by `jailer run`, with the sandboxing directives."""
    base = "[Unit]\nDescription=an existing device unit\n[Service]\nExecStart=/bin/sleep infinity\n"
    guest.put("/etc/systemd/system/existing-idio16.service", base.encode(), 0o644)
    run(guest, f"{JAILER} systemd {PROFILE} --name existing-idio16 --drop-in existing-idio16.service "
               "--output-dir /etc/systemd/system && systemctl daemon-reload")
    drop_in = run(guest, "cat /etc/systemd/system/existing-idio16.service.d/50-jailer.conf")
    path = shlex.split(next(line for line in drop_in.splitlines() if line.startswith("ExecStart=/")))
    path = path[path.index("--socket-path") + 1]
    run(guest, "systemctl start existing-idio16.service", timeout=120)
    try:
        assert run(guest, "systemctl show existing-idio16 -p ActiveState --value") == "active"
        assert run(guest, "systemctl show existing-idio16 -p Type --value") == "notify"
        assert int(run(guest, f"cd {CHECKOUT} && {PYTHON} -c {shlex.quote(OUTPUTS)} {path} 0x0304")) == 0x0304
        assert "sleep" not in run(guest, "systemctl show existing-idio16 -p ExecStart --value")
    finally:
        guest.run("systemctl stop existing-idio16.service", timeout=60)
    assert run(guest, "find /sys/fs/cgroup -name 'gpio-pci-idio-16.*'") == ""


def test_an_unprivileged_user_gets_cgroup_limits_in_its_delegated_subtree(guest):
    """What the cgroup v1 host never could: a normal user (its user manager, user@.service,
    delegates memory and pids to it) runs `jailer run` in a `systemd-run --user --scope -p
    Delegate=yes`, and the sandbox gets its own cgroup with the limits: 32M OOM-kills the
    program that writes 200 MiB."""
    run(guest, "id tenant >/dev/null 2>&1 || useradd -m -u 1000 tenant; loginctl enable-linger tenant; "
               "for i in $(seq 1 150); do systemctl is-active --quiet user@1000.service && exit 0; sleep 0.2; done; "
               "systemctl status user@1000.service --no-pager; exit 1", timeout=60)
    guest.put("/tmp/tenant-hog.toml", LIMITED.format(code=HOG).encode(), 0o644)
    status, stdout, stderr = guest.run(
        "cd /tmp && runuser -u tenant -- env XDG_RUNTIME_DIR=/run/user/1000 "
        "DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/1000/bus systemd-run --user --quiet --scope -p Delegate=yes "
        f"{JAILER} run --status-fd 1 /tmp/tenant-hog.toml", timeout=120)
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    enforced = next(e for e in events if e["event"] == "enforced")
    memory = enforced["layers"]["cgroup"]["memory"]
    assert memory.startswith("v2:/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/"), enforced
    assert not enforced["skipped"], enforced
    assert events[-1] == {"event": "exited", "signal": 9} and status == 137, (status, stdout, stderr)
