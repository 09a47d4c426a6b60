"""cgroups, best-effort layers and fail-closed refusals, for real."""

import os
from engine_sandbox import plan_for, run, run_with_status
from jailer.plan import CgroupPlan, LimitsPlan, NamespacesPlan

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
