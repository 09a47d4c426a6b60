"""Leave nothing behind: 50 start/stop (SIGTERM) cycles of the jailed IDIO-16 device, driven by
one long-lived process that calls the launcher in-process the way a management daemon
embedding jailer would; afterwards that process holds exactly the fds it started with, and
the host has the same mounts, no extra cgroups, no socket files, no more cache files and
no leftover processes. (Other tests may run jailer at the same time: mounts are the host's
own table, which a sandbox never adds to, and cgroups are matched by the driver's pid.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

from engine_sandbox import REPO, staged_device_profile

CYCLES = 50

DRIVER = r"""
import json, os, signal, sys, threading
from jailer import run_cli
from jailer.launch import launcher

profile, socket_path, cycles = sys.argv[1], sys.argv[2], int(sys.argv[3])

def snapshot():
    fds = []
    for fd in sorted(map(int, os.listdir("/proc/self/fd"))):
        try:
            fds.append((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except FileNotFoundError:   # the listing's own fd, closed by now
            pass
    return fds

def stop_when_ready(status_r, seen):
    with os.fdopen(status_r) as stream:
        for line in stream:
            event = json.loads(line)
            seen.append(event["event"])
            if event["event"] == "ready":
                os.kill(os.getpid(), signal.SIGTERM)   # what a manager sends; the launcher forwards it

plan, bpf, names = run_cli.resolve(profile)
before = None
codes, events = [], []
for cycle in range(cycles):
    if cycle == 1:   # after the first run: imports, caches and the syscall-name table are warm
        before = snapshot()
    status_r, status_w = os.pipe()
    seen = []
    watcher = threading.Thread(target=stop_when_ready, args=(status_r, seen))
    watcher.start()
    options = launcher.Options(socket_path=socket_path, status_fd=status_w, bpf=bpf,
                               syscall_names=(lambda: names) if names else None)
    codes.append(launcher.run(plan, options))
    os.close(status_w)
    watcher.join(10)
    events.append(seen)
children = open(f"/proc/self/task/{os.getpid()}/children").read().split()
print(json.dumps({"codes": codes, "events": events, "before": before, "after": snapshot(), "children": children,
                  "pid": os.getpid()}))
"""


def _mounts():
    return sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())


def _device_cgroups(launcher_pid):
    """The cgroups a launcher with this pid made for the device (<name>.<launcher pid>), in any hierarchy."""
    found = []
    for controller in ("memory", "pids", "cpu,cpuacct", "cpu"):
        root = Path("/sys/fs/cgroup") / controller
        if root.is_dir():
            found += [str(p) for p in root.rglob(f"gpio-pci-idio-16*.{launcher_pid}") if p.is_dir()]
    return sorted(found)


def _cache_files(directory):
    return sorted((p.name, p.stat().st_size) for p in Path(directory).iterdir())


def test_fifty_start_stop_cycles_leave_nothing_behind(tmp_path):
    cache = tmp_path / "cache"
    sockets = tmp_path / "run"
    sockets.mkdir()
    profile = staged_device_profile(tmp_path)
    environment = {**os.environ, "JAILER_CACHE_DIR": str(cache)}
    subprocess.run([sys.executable, "-m", "jailer", "check", str(profile)], capture_output=True,
                   env=environment, timeout=60)
    warm = subprocess.run([sys.executable, "-c", DRIVER, str(profile), str(sockets / "idio16.sock"), "1"],
                          capture_output=True, text=True, env=environment, timeout=60, cwd=str(REPO))
    assert warm.returncode == 0, warm.stderr
    cache_before, mounts_before = _cache_files(cache), _mounts()

    result = subprocess.run([sys.executable, "-c", DRIVER, str(profile), str(sockets / "idio16.sock"),
                             str(CYCLES)], capture_output=True, text=True, env=environment, timeout=300,
                            cwd=str(REPO))
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["codes"] == [0] * CYCLES   # the device exits 0 on SIGTERM
    assert all(seen[:3] == ["started", "enforced", "ready"] and seen[-1] == "exited" for seen in outcome["events"])
    assert outcome["after"] == outcome["before"]   # the launcher's process holds no fd more
    assert outcome["children"] == []
    assert _mounts() == mounts_before
    assert _device_cgroups(outcome["pid"]) == []
    assert list(sockets.iterdir()) == []
    assert _cache_files(cache) == cache_before
