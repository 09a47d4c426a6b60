"""The profile's [restart] policy, applied by `jailer run` itself: a program that ends is
started again in a fresh sandbox in the same process, keeping the sockets jailer made and
the pid file, backing off, and giving up past the rate limit; and the same policy written
as systemd's own Restart= in generated units.

Every run here is the real `jailer run` command (a restart execs it again), as root and as
an unprivileged user, with the program as pid 1 (jailer-monitor restarts it, monitor.c)
and behind a reaper (the Python launcher stays resident and restarts it itself).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from jailer.host import restart
from jailer.plan import RestartPlan
from jailer.profile import build_plan
from jailer.systemd import make_request, render_drop_in, render_service, systemd_run_argv
from test_e2e_jailed_device import INVOCATIONS, JailedDevice, jailed, scratch  # noqa: F401 (fixtures)

SYSTEM_BINDS = ", ".join(f'{{ source = "{p}", target = "{p}" }}'
                         for p in ("/usr", "/lib", "/lib64", "/bin") if os.path.exists(p))


def crash_profile(scratch: Path, script: str, *, pid1="program", policy="on-failure", limit=3, delay=0.1,
                  max_delay=0.3, interval=30, extra="") -> Path:
    """A shell program in a sandbox (no seccomp, so the shell may do what it likes) with a restart policy."""
    path = scratch / f"crash-{pid1}-{policy}.toml"
    path.write_text(f"""
name = "crash"
[program]
runtime = "native"
argv = ["/bin/sh", "-c", {json.dumps(script)}]
[namespaces]
pid1 = "{pid1}"
[filesystem]
bind = [{SYSTEM_BINDS}]
devices = ["/dev/null"]
[seccomp]
enabled = false
[restart]
policy = "{policy}"
limit = {limit}
interval = {interval}
delay = {delay}
max_delay = {max_delay}
{extra}""")
    path.chmod(0o644)
    return path


def wait_for(device, predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate(device.events()):
        assert device.proc.poll() is None or predicate(device.events()), device.errors()
        assert time.monotonic() < deadline, f"timed out; events: {[e['event'] for e in device.events()]}"
        time.sleep(0.02)


def of_kind(events, kind):
    return [event for event in events if event["event"] == kind]


# --- when to restart: jailer.host.restart.decide ------------------------------------------------

ON_FAILURE = RestartPlan(policy="on-failure", limit=3, interval=10.0, delay=0.5, max_delay=1.5)
EXIT_0, EXIT_3, KILLED = 0, 3 << 8, signal.SIGKILL


@pytest.mark.parametrize("plan, status, stop, history, expected", [
    (ON_FAILURE, EXIT_3, False, [], ("restart", 0.5)),
    (ON_FAILURE, KILLED, False, [], ("restart", 0.5)),
    (ON_FAILURE, EXIT_0, False, [], ("exit", None)),
    (ON_FAILURE, EXIT_3, True, [], ("exit", None)),                       # a stop was asked for
    (ON_FAILURE, EXIT_3, False, [99.0], ("restart", 1.0)),                # doubles within the interval
    (ON_FAILURE, EXIT_3, False, [98.0, 99.0], ("restart", 1.5)),          # up to max_delay
    (ON_FAILURE, EXIT_3, False, [97.0, 98.0, 99.0], ("give-up", 3)),      # limit restarts in the interval
    (ON_FAILURE, EXIT_3, False, [50.0, 60.0, 99.0], ("restart", 1.0)),    # old ones no longer count
    (RestartPlan(policy="always"), EXIT_0, False, [], ("restart", 0.1)),
    (RestartPlan(policy="no"), KILLED, False, [], ("exit", None)),
])
def test_decide(plan, status, stop, history, expected):
    assert restart.decide(plan, status, stop, history, 100.0) == expected


# --- jailer-monitor's own decision (monitor.c), driven directly -------------------------------------

MONITOR_DRIVER = """
import os, sys
from jailer import monitor
exit_code, extra = int(sys.argv[1]), sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execv("/bin/sh", ["sh", "-c", f"exit {exit_code}"])
pidfd = os.pidfd_open(pid)
restart_state = os.memfd_create("restart", 0)
text = monitor.state(program_pid=pid, pidfd=pidfd, listener=None, notify_fd=None, status_fd=1)
text += f"restart on-failure 2 60.0 0.05 0.2 {restart_state}\\n" + "".join(line + "\\n" for line in extra)
text += "exec /bin/sh\\nexec -c\\nexec echo restarted with $JAILER_RESTART_FD; cat /proc/self/fd/$JAILER_RESTART_FD\\n"
error = monitor.exec_monitor(text, (pidfd, restart_state))
raise SystemExit(f"exec: {error}")
"""


@pytest.mark.parametrize("code, extra, expected", [
    (3, [], "restart"),
    (0, [], "exit"),                                                   # on-failure: a clean exit ends
    (3, ["stopping"], "exit"),                                         # a stop passed on before the hand-over
    (3, ["restarted 1.0"], "restart"),                                 # long ago: outside the interval
])
def test_the_monitor_restarts_as_decide_says(code, extra, expected):
    import subprocess
    import sys

    from jailer import monitor

    if not monitor.built():
        pytest.skip("jailer-monitor is not built (setup.sh builds it)")
    done = subprocess.run([sys.executable, "-c", MONITOR_DRIVER, str(code), *extra], capture_output=True, text=True,
                          timeout=20, cwd=str(Path(__file__).resolve().parent.parent))
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert events[0] == {"event": "exited", "code": code}
    if expected == "exit":
        assert done.returncode == code and len(events) == 1, done
    else:
        assert events[1] == {"event": "restarting", "restart": len(extra) + 1, "delay": 0.05}
        assert "restarted with" in done.stdout and done.stdout.count("restarted ") >= len(extra) + 1, done.stdout


def test_the_monitor_gives_up_past_the_limit():
    import subprocess
    import sys
    import time as clock

    now = clock.monotonic()
    done = subprocess.run([sys.executable, "-c", MONITOR_DRIVER, "3", f"restarted {now - 2}", f"restarted {now - 1}"],
                          capture_output=True, text=True, timeout=20, cwd=str(Path(__file__).resolve().parent.parent))
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events] == ["exited", "gave-up"] and events[1]["restarts"] == 2
    assert done.returncode == 3 and "not restarting it" in done.stderr


# --- the profile ----------------------------------------------------------------------------------

def problems(tmp_path, text):
    from jailer.errors import ProfileError

    path = tmp_path / "p.toml"
    path.write_text('[program]\nargv = ["/bin/true"]\n' + text)
    with pytest.raises(ProfileError) as raised:
        build_plan(str(path), euid=0)
    return str(raised.value)


@pytest.mark.parametrize("text, expected", [
    ('[restart]\npolicy = "on-failur"', 'restart.policy: found "on-failur", expected one of no, on-failure, always'),
    ('[restart]\npolicy = "always"\nlimit = 0', "restart.limit: found 0, expected an integer from 1 to 1000"),
    ('[restart]\npolicy = "always"\ndelay = 2\nmax_delay = 1', "restart.max_delay: found 1, expected at least "
     "restart.delay (2)"),
    ('[restart]\nlimit = 3', 'restart.policy: missing or "no" while restart limits are set'),
    ('[restart]\npolicy = "always"\nretries = 3', "restart.retries"),
    ('[[fds]]\nname = "state"\nkind = "checkpoint"\nnumber = 3', "fds[0].size: missing, expected the size of the "
     "checkpoint memfd"),
    ('[[fds]]\nname = "state"\nkind = "checkpoint"\nnumber = 3\nsize = "1K"', 'fds[0].size: found "1K", expected at '
     "least 4096 bytes"),
])
def test_profile_mistakes_in_restart_are_named(tmp_path, text, expected):
    assert expected in problems(tmp_path, text)


def test_shipped_device_profile_restarts_and_keeps_a_checkpoint():
    plan = build_plan(str(Path(__file__).resolve().parent.parent / "profiles" / "gpio-pci-idio-16.toml"), euid=0)
    assert plan.restart.policy == "on-failure"
    assert [spec.kind for spec in plan.fds if spec.name == "checkpoint"] == ["checkpoint"]
    assert any("{fd:checkpoint}" in arg for arg in plan.program.argv)


# --- jailer run restarts the program ----------------------------------------------------------------

@pytest.mark.parametrize("pid1", ["program", "reaper"])
@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_a_crash_loop_backs_off_and_gives_up_keeping_the_pid(invocation, pid1, scratch, jailed):
    profile = crash_profile(scratch, "sleep 0.3; exit 3", pid1=pid1)
    pidfile = scratch / f"crash-{invocation}-{pid1}.pid"
    device = jailed(invocation, scratch, "--pidfile", str(pidfile), profile=profile)
    pids = set()
    while device.proc.poll() is None:
        try:
            pids.add(int(pidfile.read_text()))
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    assert device.proc.wait(30) == 3, device.errors()
    events = device.events()
    assert [e["event"] for e in events if e["event"] in ("started", "exited", "restarting", "gave-up")] == \
        ["started", "exited", "restarting"] * 3 + ["started", "exited", "gave-up"]
    assert [e["delay"] for e in of_kind(events, "restarting")] == [0.1, 0.2, 0.3]
    assert [e["restart"] for e in of_kind(events, "restarting")] == [1, 2, 3]
    assert of_kind(events, "gave-up")[0]["restarts"] == 3
    assert len({e["pid"] for e in of_kind(events, "started")}) == 4            # a fresh sandbox each time
    assert pids == {device.proc.pid}                                           # one launcher pid throughout
    assert not pidfile.exists()
    assert "not restarting it" in device.errors().splitlines()[-1]


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_on_failure_leaves_a_clean_exit_alone_and_always_restarts_it(invocation, scratch, jailed):
    clean = jailed(invocation, scratch, profile=crash_profile(scratch, "exit 0"))
    assert clean.proc.wait(15) == 0
    assert not of_kind(clean.events(), "restarting")
    always = jailed(invocation, scratch, profile=crash_profile(scratch, "exit 0", policy="always", limit=1))
    assert always.proc.wait(15) == 0
    assert [e["event"] for e in always.events() if e["event"] in ("exited", "restarting", "gave-up")] == \
        ["exited", "restarting", "exited", "gave-up"]


def test_no_restart_option_leaves_restarting_to_a_service_manager(scratch, jailed):
    device = jailed("user", scratch, "--no-restart", profile=crash_profile(scratch, "exit 4"))
    assert device.proc.wait(15) == 4
    assert not of_kind(device.events(), "restarting")


@pytest.mark.parametrize("pid1", ["program", "reaper"])
def test_a_stop_during_the_back_off_cancels_the_restart_and_removes_what_jailer_made(pid1, scratch, jailed):
    profile = crash_profile(scratch, "exec sleep 60", pid1=pid1, delay=30, max_delay=30)
    sock, pidfile = scratch / "held.sock", scratch / "held.pid"
    listener_profile = profile.read_text() + '[[fds]]\nname = "vfio-user"\nkind = "unix-listener"\nnumber = 3\n'
    profile.write_text(listener_profile)
    device = jailed("user", scratch, "--socket-path", str(sock), "--pidfile", str(pidfile), profile=profile)
    wait_for(device, lambda events: of_kind(events, "started"))
    time.sleep(0.3)   # (long enough for the monitor to take over when the shell is pid 1)
    os.kill(of_kind(device.events(), "started")[0]["pid"], signal.SIGKILL)
    wait_for(device, lambda events: of_kind(events, "restarting"))
    assert sock.exists() and pidfile.exists()
    device.proc.send_signal(signal.SIGTERM)
    assert device.proc.wait(10) == 128 + signal.SIGTERM
    assert of_kind(device.events(), "restart-cancelled") == [{"event": "restart-cancelled", "signal": 15}]
    assert not sock.exists() and not pidfile.exists()


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_a_stop_signal_is_not_a_failure(invocation, scratch, jailed):
    device = jailed(invocation, scratch, profile=crash_profile(scratch, "trap 'exit 7' TERM; sleep 60 & wait",
                                                               pid1="reaper"))
    wait_for(device, lambda events: of_kind(events, "started"))
    time.sleep(0.2)
    device.proc.send_signal(signal.SIGTERM)
    assert device.proc.wait(10) == 7
    assert not of_kind(device.events(), "restarting")


def test_a_stop_at_any_moment_of_the_start_is_never_taken_for_a_crash(scratch, jailed):
    """SIGTERM at every moment of the shipped device's start: before its READY=1 jailer kills it
    (it may have no handler yet), which must not count as a failure to restart from, whether
    the launcher or jailer-monitor (told by the launcher at its hand-over) sees the end."""
    path = str(scratch / "early.sock")
    for step in range(24):
        device = jailed("root" if os.geteuid() == 0 else "user", scratch, "--socket-path", path)
        time.sleep(0.02 * step)
        device.proc.send_signal(signal.SIGTERM)
        try:
            device.proc.wait(10)
        except Exception:
            raise AssertionError(f"jailer run still running 10 s after SIGTERM at {0.02 * step:.2f} s: "
                                 f"{[e['event'] for e in device.events()]}") from None
        assert not of_kind(device.events(), "restarting"), (0.02 * step, device.events())


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_the_socket_stays_across_a_restart_and_a_waiting_client_is_served(invocation, scratch, jailed):
    """SIGKILL the jailed device from outside: the socket path keeps the same listening socket
    (same inode), a client that connects during the back-off waits in its backlog and is served
    by the restarted device, and the restart shows in the status stream."""
    from devices.vfio_user.client import Client

    from test_e2e_jailed_device import profile_variant

    def restarting(data):
        data["restart"] = {"policy": "on-failure", "delay": 1.0, "max_delay": 1.0}
    profile = profile_variant(scratch, f"restarting-{invocation}", restarting)
    path = str(scratch / f"restart-{invocation}.sock")
    device = jailed(invocation, scratch, "--socket-path", path, profile=profile)
    device.connect(path).close()
    inode = os.stat(path).st_ino
    os.kill(device.device_pid(), signal.SIGKILL)
    wait_for(device, lambda events: of_kind(events, "restarting"))
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting.connect(path)          # during the back-off: accepted into the kept socket's backlog
    client = Client(waiting)
    client.negotiate()
    client.close()
    events = device.events()
    assert [e["event"] for e in events if e["event"] in ("exited", "restarting", "ready")] == \
        ["ready", "exited", "restarting", "ready"]
    assert of_kind(events, "exited")[0] == {"event": "exited", "signal": signal.SIGKILL}
    assert stat.S_ISSOCK(os.stat(path).st_mode) and os.stat(path).st_ino == inode
    assert device.stop() == 0
    assert not os.path.exists(path)


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_the_device_comes_back_with_its_state_after_sigkill(invocation, scratch, jailed):
    """The issue's end-to-end case: a client sets outputs and enables the interrupt, the jailed
    device is SIGKILLed from outside, jailer restarts it, and a new client finds the same outputs
    (registers) and the same input configuration (control socket), from the checkpoint fd."""
    from devices.gpio_pci_idio16.ctl import request as control
    from devices.vfio_user.device import BAR2

    from test_e2e_jailed_device import profile_variant

    profile = profile_variant(scratch, f"state-{invocation}", lambda data: None)
    path, ctl = str(scratch / f"state-{invocation}.sock"), str(scratch / f"state-{invocation}.ctl")
    device = jailed(invocation, scratch, "--socket-path", path, "--socket", f"control={ctl}", profile=profile)
    with device.connect(path) as client:
        client.region_write(BAR2, 0x0, b"\x5a")
        client.region_write(BAR2, 0x4, b"\xc3")
        client.region_read(BAR2, 0x2, 1)             # a read of 0x2 enables the change-of-state IRQ
    control(ctl, {"cmd": "set-inputs", "value": 0x1234})
    before = control(ctl, {"cmd": "query-status"})
    first = device.device_pid()
    os.kill(first, signal.SIGKILL)
    wait_for(device, lambda events: len(of_kind(events, "ready")) == 2)
    assert device.device_pid() != first
    with device.connect(path) as client:
        assert client.region_read(BAR2, 0x0, 1) == b"\x5a" and client.region_read(BAR2, 0x4, 1) == b"\xc3"
    after = control(ctl, {"cmd": "query-status"})
    assert (after["outputs"], after["inputs"], after["irq_enabled"]) == (0xC35A, 0x1234, True)
    assert after == before
    assert "restored state from checkpoint" in device.errors()
    assert device.stop() == 0


def crafted_checkpoint(abi_version: int) -> int:
    """A sealed 64K memfd holding an idio-16 checkpoint at `abi_version` with outputs 0x00ff."""
    import fcntl

    from devices.gpio_pci_idio16.device import Idio16
    from devices.vfio_user.checkpoint import CheckpointArea
    from devices.vfio_user.migration import wrap_state

    device = Idio16()
    device.outputs = 0x00FF
    fd = os.memfd_create("checkpoint", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 64 << 10)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    CheckpointArea.open(fd).write(wrap_state(device.device_type, abi_version, device.save_state()))
    return fd


@pytest.mark.parametrize("abi_version, outputs", [(1, 0x00FF), (2, 0)])
def test_a_given_checkpoint_is_loaded_or_refused_by_version(abi_version, outputs, scratch, jailed):
    """A checkpoint passed in (--fd checkpoint=N, as a service manager's store passes it): the
    device starts from one of its own ABI version, and refuses one it does not accept, saying
    so, and starts fresh."""
    from devices.gpio_pci_idio16.ctl import request as control

    fd = crafted_checkpoint(abi_version)
    path, ctl = str(scratch / f"given-{abi_version}.sock"), str(scratch / f"given-{abi_version}.ctl")
    device = jailed("user", scratch, "--socket-path", path, "--socket", f"control={ctl}", f"--fd=checkpoint={fd}",
                    pass_fds=[fd])
    os.close(fd)
    device.connect(path).close()
    assert control(ctl, {"cmd": "query-status"})["outputs"] == outputs
    if abi_version == 2:
        refusal = [line for line in device.errors().splitlines() if "refusing the checkpoint" in line]
        assert len(refusal) == 1 and "abi_version 2" in refusal[0] and "starting fresh" in refusal[0]
    assert device.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the launcher as root")
def test_under_a_service_manager_the_checkpoint_goes_to_its_store_and_comes_back(scratch):
    """`jailer run` with $NOTIFY_SOCKET hands the checkpoint memfd it creates to the store
    (FDSTORE=1, FDNAME=checkpoint, the fd attached), and a later start that gets it back through
    LISTEN_FDS/LISTEN_FDNAMES (how systemd restarts a unit) starts the device from it."""
    import array
    import fcntl
    import subprocess
    import sys

    from devices.gpio_pci_idio16.ctl import request as control

    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(scratch / "notify"))
    environment = {"PATH": "/usr/bin:/bin", "JAILER_CACHE_DIR": str(scratch / "cache"),
                   "NOTIFY_SOCKET": str(scratch / "notify")}
    path, ctl = str(scratch / "stored.sock"), str(scratch / "stored.ctl")
    command = [sys.executable, "-m", "jailer", "run", "--no-restart", "--socket-path", path, "--socket",
               f"control={ctl}", str(Path(__file__).resolve().parent.parent / "profiles" / "gpio-pci-idio-16.toml")]
    first = subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stored = None
    while stored is None:
        manager.settimeout(15)
        data, ancillary, _, _ = manager.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
        if data.startswith(b"FDSTORE=1"):
            assert data == b"FDSTORE=1\nFDNAME=checkpoint"
            (level, kind, payload), = ancillary
            stored = array.array("i", payload[:4])[0]
    assert os.readlink(f"/proc/self/fd/{stored}").startswith("/memfd:checkpoint")
    assert os.fstat(stored).st_size == 64 << 10
    seals = fcntl.fcntl(stored, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SHRINK
    connect_until(path, first)
    control(ctl, {"cmd": "set-inputs", "value": 0x0F0F})
    first.send_signal(signal.SIGTERM)
    assert first.wait(10) == 0

    # what systemd does for the restarted unit: the stored fd at 3, named, for that very process
    hand_back = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
                 "os.execv(sys.argv[2], sys.argv[2:])")
    second = subprocess.Popen([sys.executable, "-c", hand_back, str(stored), *command],
                              env={**environment, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "checkpoint"},
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=[stored])
    connect_until(path, second)
    assert control(ctl, {"cmd": "query-status"})["inputs"] == 0x0F0F
    second.send_signal(signal.SIGTERM)
    assert second.wait(10) == 0
    assert b"restored state from checkpoint" in second.stderr.read()
    os.close(stored)
    manager.close()


def connect_until(path, proc, timeout=15.0):
    from devices.vfio_user.client import Client, ClientError

    deadline = time.monotonic() + timeout
    while True:
        try:
            Client.connect(path).close()
            return
        except ClientError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.02)


# --- systemd applies the same policy --------------------------------------------------------------

def unit_plan(tmp_path, restart_text):
    path = tmp_path / "dev.toml"
    path.write_text('name = "dev"\n[program]\nargv = ["/bin/true"]\n[seccomp]\nenabled = false\n'
                    '[[fds]]\nname = "vfio-user"\nkind = "unix-listener"\nnumber = 3\n'
                    '[[fds]]\nname = "checkpoint"\nkind = "checkpoint"\nnumber = 4\nsize = "64K"\n' + restart_text)
    return build_plan(str(path), euid=0), str(path)


def test_generated_units_carry_the_profiles_restart_policy(tmp_path):
    plan, path = unit_plan(tmp_path, '[restart]\npolicy = "on-failure"\nlimit = 5\ninterval = 60\ndelay = 0.25\n')
    request = make_request(plan, path, "/usr/bin/jailer", socket_activation=True)
    service = render_service(plan, request)
    for line in ("Restart=on-failure", "RestartSec=250ms", "StartLimitIntervalSec=60s", "StartLimitBurst=6",
                 "FileDescriptorStoreMax=1"):
        assert f"\n{line}\n" in service
    assert service.index("StartLimitBurst=") < service.index("[Service]")          # a [Unit] setting
    assert "--no-restart" in service.split("\nExecStart=")[1].split("\n")[0]      # one restarter: systemd
    drop_in = render_drop_in(plan, request)
    assert drop_in.index("[Unit]") < drop_in.index("StartLimitBurst=6") < drop_in.index("[Service]")
    assert "--property=StartLimitBurst=6" in systemd_run_argv(plan, request)


def test_a_profile_without_restart_gets_restart_no(tmp_path):
    plan, path = unit_plan(tmp_path, "")
    service = render_service(plan, make_request(plan, path, "/usr/bin/jailer"))
    assert "\nRestart=no\n" in service and "StartLimitBurst" not in service and "--no-restart" not in service
