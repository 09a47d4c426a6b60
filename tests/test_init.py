"""jailer init: a starting profile that already builds, for a program that binds its own
socket or takes a listening fd."""

from __future__ import annotations

import subprocess
import sys

from jailer.profile import build_plan

JAILER = [sys.executable, "-m", "jailer"]


def init(tmp_path, *argv, output="device.toml"):
    return subprocess.run([*JAILER, "init", "-o", str(tmp_path / output), "--", *argv], capture_output=True,
                          text=True, timeout=60)


def test_a_program_that_binds_its_own_socket_gets_sockets_and_socket_readiness(tmp_path):
    result = init(tmp_path, "/bin/true", "--listen", "{socket:vfio-user}")
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"jailer init: wrote {tmp_path / 'device.toml'}; next: jailer learn " \
                            f"{tmp_path / 'device.toml'} --in-place\n"
    plan = build_plan(str(tmp_path / "device.toml"))
    assert plan.name == "true" and plan.program.ready == "socket"
    assert [(s.name, s.path) for s in plan.sockets] == [("vfio-user", "/run/vfio-user/vfio-user.sock")]
    assert plan.program.argv[1:] == ("--listen", "/run/vfio-user/vfio-user.sock")
    assert all((plan.namespaces.user, plan.namespaces.mount, plan.namespaces.pid, plan.namespaces.net))
    assert plan.seccomp.default_action == "kill" and plan.limits.cgroup.memory_max == 256 << 20
    assert "jailer learn" in (tmp_path / "device.toml").read_text()


def test_a_program_that_takes_a_listening_fd_gets_an_fd(tmp_path):
    assert init(tmp_path, "/bin/true", "--fd={fd:vfio-user}").returncode == 0
    plan = build_plan(str(tmp_path / "device.toml"))
    assert [(f.name, f.kind, f.number) for f in plan.fds] == [("vfio-user", "unix-listener", 3)]
    assert plan.program.ready == "exec" and not plan.sockets


def test_mistakes_are_one_line_and_nothing_is_written_or_overwritten(tmp_path):
    result = init(tmp_path, "/bin/true")
    assert result.returncode == 2 and result.stderr.startswith("jailer: say where the program takes its socket")
    assert list(tmp_path.iterdir()) == []
    result = init(tmp_path, "/no/such/program", "{socket:vfio-user}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "program.argv[0]" in result.stderr
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "device.toml").write_text("mine")
    result = init(tmp_path, "/bin/true", "{socket:vfio-user}")
    assert result.returncode == 2 and "exists" in result.stderr and (tmp_path / "device.toml").read_text() == "mine"
