"""cgroups, best-effort layers and fail-closed refusals, for real."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import pytest

from engine_sandbox import INVOCATIONS, plan_for, run, run_with_status, status_events
from jailer.plan import Bind, CgroupPlan, LimitsPlan, NamespacesPlan, NetworkPlan

HOG = "exec python3 -c 'blocks = []\nwhile True: blocks.append(b\"x\" * (8 << 20))'"


def test_cgroup_memory_limit_stops_a_memory_hog_and_the_cgroup_is_removed():
    limits = LimitsPlan(cgroup=CgroupPlan(memory_max=48 << 20, pids_max=32))
    result, events = run_with_status(plan_for("root", HOG, limits=limits))
    assert result.returncode == 128 + 9, result.stderr   # the OOM killer, inside the cgroup only
    layers = events[1]["layers"]
    assert set(layers["cgroup"]) == {"memory", "pids"}
    for controller, where in layers["cgroup"].items():
        path = where.split(":", 1)[1]
        assert path.endswith(f"/jailer/enginetest.{events[0]['pid']}") or "/jailer/enginetest." in path
        assert not os.path.exists(path), f"{controller} cgroup left behind: {path}"


def test_cgroup_limits_are_written_and_the_program_sees_its_own_cgroup_as_root():
    limits = LimitsPlan(cgroup=CgroupPlan(pids_max=7, memory_max=64 << 20, cpu_quota_us=50000))
    script = "cat /proc/self/cgroup | grep -E ':(pids|memory|cpu):'"
    result, events = run_with_status(plan_for("root", script, limits=limits))
    assert result.returncode == 0, result.stderr
    assert sorted(line.split(":", 1)[1] for line in result.stdout.split()) == ["cpu:/", "memory:/", "pids:/"]
    assert set(events[1]["layers"]["cgroup"]) == {"memory", "pids", "cpu"}


def test_pids_limit_stops_a_fork_bomb():
    limits = LimitsPlan(cgroup=CgroupPlan(pids_max=8))
    script = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 1 & done; wait; echo done"
    result = run(plan_for("root", script, limits=limits))
    assert result.returncode != 0 and "done" not in result.stdout
    assert "fork" in result.stderr.lower()


def test_required_layer_that_cannot_be_applied_is_refused():
    # an unprivileged caller cannot create cgroups on this host: without best_effort, no start
    limits = LimitsPlan(cgroup=CgroupPlan(memory_max=64 << 20))
    result = run(plan_for("user", "echo should-not-run", limits=limits), invocation="user")
    assert result.returncode == 3
    assert "should-not-run" not in result.stdout
    assert result.stderr.startswith("jailer: cannot apply layer 'cgroup': ")
    assert "(to fix: " in result.stderr and "Traceback" not in result.stderr


def test_best_effort_layer_is_skipped_and_reported():
    limits = LimitsPlan(cgroup=CgroupPlan(memory_max=64 << 20))
    plan = plan_for("user", "echo ran", limits=limits, best_effort=frozenset({"cgroup"}))
    result, events = run_with_status(plan, invocation="user")
    assert result.returncode == 0 and result.stdout.strip() == "ran"
    assert "jailer: layer 'cgroup' skipped (best effort): " in result.stderr
    assert "cgroup" in events[1]["skipped"] and "cgroup" not in events[1]["layers"]


def test_namespace_refused_for_an_unprivileged_caller_without_a_user_namespace():
    plan = plan_for("user", "echo should-not-run", namespaces=NamespacesPlan(user=False))
    result = run(plan, invocation="user")
    assert result.returncode == 3
    assert result.stderr.startswith("jailer: cannot apply layer 'mount_namespace'")


def test_a_proc_without_its_own_pid_namespace_is_refused_with_the_way_out():
    plan = plan_for("root", "echo should-not-run", namespaces=NamespacesPlan(pid=False))
    result = run(plan)
    assert result.returncode == 3 and "should-not-run" not in result.stdout
    assert result.stderr.startswith("jailer: cannot apply layer 'pivot_root': proc /proc: Operation not "
                                    "permitted")
    assert "keep namespaces.pid = true" in result.stderr and "filesystem.proc = false" in result.stderr


def test_cgroup_is_removed_when_a_later_layer_refuses_to_start():
    limits = LimitsPlan(cgroup=CgroupPlan(pids_max=16))
    plan = plan_for("root", "true", limits=limits)
    plan = replace(plan, filesystem=replace(plan.filesystem, binds=plan.filesystem.binds + (
        Bind("/nonexistent/source", "/data"),)))
    before = _sandbox_cgroups()
    result = run(plan)
    assert result.returncode == 3 and "cannot apply layer 'pivot_root'" in result.stderr
    assert _sandbox_cgroups() == before


def _sandbox_cgroups():
    found = set()
    for root, directories, _ in os.walk("/sys/fs/cgroup/pids"):
        found.update(os.path.join(root, d) for d in directories if d.startswith("enginetest."))
    return found


def test_loopback_is_up_only_when_the_plan_asks():
    bind = "exec python3 -c \"import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); print('bound')\""
    assert run(plan_for("root", bind, network=NetworkPlan(mode="loopback"))).stdout.strip() == "bound"
    refused = run(plan_for("root", bind))
    assert refused.returncode != 0 and "bound" not in refused.stdout


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_sandbox_dies_with_the_launcher(invocation):
    with tempfile.TemporaryFile("w+") as status:
        popen = run(plan_for(invocation, "echo ready; exec sleep 30"), "--status-fd", str(status.fileno()),
                    pass_fds=[status.fileno()], wait=False, invocation=invocation)
        try:
            assert popen.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 10
            while not os.fstat(status.fileno()).st_size and time.monotonic() < deadline:
                time.sleep(0.01)   # "started" is written once the launcher sees the exec
            status.seek(0)
            program = status_events(status.readline())[0]["pid"]
            os.kill(popen.pid, signal.SIGKILL)
            popen.wait(timeout=10)
            deadline = time.monotonic() + 5
            while os.path.exists(f"/proc/{program}") and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not os.path.exists(f"/proc/{program}")
        finally:
            popen.kill()
            popen.wait()


@pytest.fixture
def cgroup2_hierarchy(tmp_path):
    """A cgroup v2 hierarchy of this host's (mounted here when the host shows it nowhere else)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a cgroup v2 hierarchy needs root")
    mounts = [line.split() for line in open("/proc/self/mounts")]
    existing = next((fields[1] for fields in mounts if fields[2] == "cgroup2"), None)
    mounted = None
    if existing is None:
        mounted = tmp_path / "cgroup2"
        mounted.mkdir()
        if subprocess.run(["mount", "-t", "cgroup2", "none", str(mounted)], capture_output=True).returncode != 0:
            pytest.skip("this kernel cannot mount a cgroup v2 hierarchy here")
    root = str(mounted or existing)
    own = open("/proc/self/cgroup").read().split("0::", 1)[1].split("\n", 1)[0].rstrip("/")
    directory = f"{root}{own}/jailer-move-test.{os.getpid()}"
    os.mkdir(directory)
    try:
        yield root, own, directory
    finally:
        for pid in open(f"{directory}/cgroup.procs").read().split():
            with open(f"{root}{own}/cgroup.procs", "w") as back:
                back.write(pid)
        os.rmdir(directory)
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=True)


def test_on_cgroup_v2_the_launcher_moves_the_preloader_and_its_own_join_skips_that_directory(cgroup2_hierarchy):
    """The move by pid (cgroup.procs) waits for an RCU grace period, so the launcher makes it
    for the zero-exec preloader while it imports, off the start-up chain (Cgroup.move); the
    sandbox's process then joins only the directories left (Cgroup.join)."""
    from jailer.layers.cgroups import Cgroup

    root, own, directory = cgroup2_hierarchy
    group = Cgroup({"pids": directory, "memory": directory}, {"pids": 2, "memory": 2})
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        group.move(sleeper.pid)
        assert group.joined == [directory]
        leaf = directory[len(root):]
        assert open(f"/proc/{sleeper.pid}/cgroup").read().endswith(f"0::{leaf}\n")
        joiner = subprocess.run([sys.executable, "-c", f"""
import sys
sys.path[:0] = {sys.path!r}
from jailer.layers.cgroups import Cgroup
Cgroup({{"pids": {directory!r}}}, {{"pids": 2}}, joined=[{directory!r}]).join()
print(open("/proc/self/cgroup").read().split("0::", 1)[1].split(chr(10))[0])
"""], capture_output=True, text=True, timeout=30)
        assert joiner.returncode == 0, joiner.stderr
        assert joiner.stdout.strip() == (own or "/")   # joined already: not moved again
    finally:
        sleeper.kill()
        sleeper.wait()


def test_on_cgroup_v1_the_preloader_is_left_to_join_after_it_imported():
    """On v1 the zero-exec preloader joins the cgroup itself once it has imported (by tasks,
    without cgroup.procs' grace period): moved in early, it would import inside the limited
    cgroup, which is slower. Cgroup.move leaves v1 directories alone."""
    from jailer.layers.cgroups import Cgroup

    group = Cgroup({"pids": "/sys/fs/cgroup/pids/never-written", "memory": "/sys/fs/cgroup/memory/never-written"},
                   {"pids": 1, "memory": 1})
    group.move(os.getpid())   # (writes nothing: no v2 directory)
    assert group.joined == []
