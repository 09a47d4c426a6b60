"""`jailer run` end to end: a real profile, the plan cache, the light plan view, veth networking."""

import os
import socket
import subprocess
import sys
import threading
from dataclasses import fields, is_dataclass

import pytest

from engine_sandbox import plan_for, run
from jailer.plan import ArgCondition, CgroupPlan, FdSpec, LimitsPlan, NetworkPlan, Rlimit, SeccompPlan, SeccompRule
from jailer.run_cli import PlanView

PROFILE = """\
name = "clitest"

[program]
runtime = "native"
argv = ["/bin/sh", "-c", "echo {word} from $$; exit 5"]

[seccomp]
default_action = "allow"
steady_rule = [{{ syscall = "ptrace" }}]   # staged: the warm path also answers notifications

[limits.cgroup]
pids = 16
"""


def _jailer(profile, cache_dir, *options, importtime=False):
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "jailer", "run", *options,
               str(profile)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "JAILER_CACHE_DIR": str(cache_dir)})


def _imported(stderr):
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_run_resolves_a_profile_then_uses_its_cache(tmp_path):
    profile = tmp_path / "clitest.toml"
    profile.write_text(PROFILE.format(word="hello"))
    cache = tmp_path / "cache"
    first = _jailer(profile, cache, importtime=True)
    assert first.returncode == 5, first.stderr
    assert first.stdout == "hello from 2\n"
    assert "jailer.profile" in _imported(first.stderr) and "pyseccomp" in _imported(first.stderr)
    assert len(os.listdir(cache)) == 1 and (cache.stat().st_mode & 0o777) == 0o700

    second = _jailer(profile, cache, importtime=True)
    assert second.returncode == 5 and second.stdout == "hello from 2\n"
    heavy = {"jailer.profile", "jailer.plan", "pyseccomp", "toml", "click", "pyroute2", "json", "re", "enum"}
    assert not heavy & _imported(second.stderr)

    profile.write_text(PROFILE.format(word="changed"))   # a changed profile is resolved again
    third = _jailer(profile, cache)
    assert third.stdout == "changed from 2\n"


def test_run_reports_profile_and_usage_errors_in_one_line(tmp_path):
    profile = tmp_path / "bad.toml"
    profile.write_text('name = "bad"\n[program]\nruntime = "native"\nargv = []\n')
    result = _jailer(profile, tmp_path / "cache")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("jailer: ")
    missing = _jailer(tmp_path / "nope.toml", tmp_path / "cache")
    assert missing.returncode == 2 and missing.stderr.startswith("jailer: ") and "Traceback" not in missing.stderr


def _same(view, value):
    if is_dataclass(value):
        return all(_same(getattr(view, f.name), getattr(value, f.name)) for f in fields(value))
    if isinstance(value, frozenset):
        return set(view) == value
    if isinstance(value, tuple):
        return len(view) == len(value) and all(_same(v, x) for v, x in zip(view, value))
    return view == value


def test_plan_view_reads_like_the_plan():
    plan = plan_for("user", "true", fds=(FdSpec("vfio", "unix-listener", 3, path="/run/x.sock"),),
                    limits=LimitsPlan(rlimits=(Rlimit("nofile", 8, 8),), cgroup=CgroupPlan(memory_max=1 << 20)),
                    seccomp=SeccompPlan(rules=(SeccompRule("ioctl", "errno", 25, (ArgCondition(1, "masked_eq", 1, 3),)),)),
                    best_effort=frozenset({"cgroup", "landlock"}))
    view = PlanView(plan.to_dict())
    assert _same(view, plan)
    assert view.program.argv + ("x",) == plan.program.argv + ("x",)
    with pytest.raises(AttributeError, match="read-only"):
        view.program = None
    with pytest.raises(AttributeError, match="no 'typo'"):
        view.typo   # noqa: B018
    assert getattr(view.identity, "host_ids", "shared") == plan.identity.host_ids


def test_veth_network_reaches_the_host_end():
    network = NetworkPlan(mode="veth", host_ifname="jlrtest0", sandbox_ifname="eth0",
                          host_address="10.231.7.1/30", sandbox_address="10.231.7.2/30")
    client = ("cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' ' | tr '\\n' ' '; echo; "
              "exec python3 -c \"import socket; print(socket.create_connection(('10.231.7.1', 18181), 5).recv(20))\"")
    def serve():
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(200):   # the address exists once the launcher has made the pair
            try:
                server.bind(("10.231.7.1", 18181))
                break
            except OSError:
                threading.Event().wait(0.02)
        server.listen(1)
        server.settimeout(10)
        connection, _ = server.accept()
        connection.sendall(b"veth ok")
        connection.close()
        server.close()

    thread = threading.Thread(target=serve)
    thread.start()
    result = run(plan_for("root", client, network=network))
    thread.join(15)
    assert result.returncode == 0, result.stderr
    interfaces, answer = result.stdout.splitlines()
    assert sorted(interfaces.split()) == ["eth0", "lo"] and answer == "b'veth ok'"
    assert subprocess.run(["ip", "link", "show", "jlrtest0"], capture_output=True).returncode != 0
