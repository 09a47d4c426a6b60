"""How fast a crashed jailed device serves again, and whether it comes back with its state.

    .venv/bin/python benchmarks/restart.py [--runs 20] [--json FILE]

One `jailer run` of profiles/gpio-pci-idio-16.toml (--socket-path, control socket) with the
profile's [restart] policy at delay 0 and a limit the runs cannot reach, so the figure is
the restart itself. Each round sets the outputs to a new value through the project's
vfio-user client, SIGKILLs the device process from outside and times, from the kill, until
a new client completes a VERSION handshake on the same socket path (the connect succeeds
at once: the kept socket queues it; the handshake waits for the restarted device), then
reads the outputs back (they must be the ones set: the checkpoint) and checks the socket is
still the same inode.

Peers, measured in the same run and interleaved with the rounds:
  cold    a fresh `jailer run` of the same profile, from spawn to a served handshake
          (what a restart without jailer's own policy costs: a service manager's restart
          of the whole command, without a kept socket, whose clients meanwhile get
          ECONNREFUSED)
  bare    the bare device (`python -S -m devices.gpio_pci_idio16 --socket-path S`), spawn to
          a served handshake: the device's own start-up, with no sandbox
Printed: medians and the ratios restart/cold and restart/bare. As root only (the kill
reaches the device whoever runs it, but the comparison is kept to one identity).
"""

import argparse
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from device_ready import stop, wait_ready  # noqa: E402

import toml  # noqa: E402

from devices.gpio_pci_idio16.ctl import request as control  # noqa: E402
from devices.vfio_user.client import Client  # noqa: E402
from devices.vfio_user.device import BAR2  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILE = os.path.join(REPO, "profiles", "gpio-pci-idio-16.toml")
JAILER = [os.path.join(REPO, ".venv", "bin", "jailer")] if os.path.exists(
    os.path.join(REPO, ".venv", "bin", "jailer")) else [sys.executable, "-m", "jailer"]


def restarting_profile(scratch):
    data = toml.load(PROFILE)
    data["restart"] = {"policy": "on-failure", "delay": 0, "max_delay": 0, "limit": 1000, "interval": 1}
    path = os.path.join(scratch, "restart-now.toml")
    with open(path, "w") as f:
        toml.dump(data, f)
    return path


def device_pid(root):
    """The process running the device module under `root` (jailer's launcher or monitor)."""
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                if b"devices.gpio_pci_idio16" not in f.read():
                    continue
            pid = int(cmdline.split("/")[2])
            with open(f"/proc/{pid}/status") as f:
                nspid = next(line for line in f if line.startswith("NSpid:"))
            if len(nspid.split()) > 2 and _descends(pid, root):
                return pid
        except (OSError, StopIteration, ValueError):
            continue
    raise RuntimeError("no jailed device process")


def _descends(pid, root):
    while pid > 1:
        if pid == root:
            return True
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return False


def timed_start(argv, path, env=None):
    """(seconds from spawn to a served handshake, the process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", env=env)
    wait_ready(path, proc)
    return time.perf_counter() - start, proc


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", metavar="FILE")
    options = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (see the docstring)")
    scratch = tempfile.mkdtemp(prefix="jailer-restart-bench-")
    profile = restarting_profile(scratch)
    path, ctl = os.path.join(scratch, "dev.sock"), os.path.join(scratch, "dev.ctl")
    env = {**os.environ, "JAILER_CACHE_DIR": os.path.join(scratch, "cache")}
    plan = json.loads(subprocess.run([*JAILER, "show", "--json", PROFILE], capture_output=True, text=True,
                                     check=True, env=env).stdout)
    bare_env = dict(os.environ, **dict(plan["environment"]))
    bare_argv = [*[arg for arg in plan["program"]["argv"] if "{fd:" not in arg],
                 f"--socket-path={os.path.join(scratch, 'bare.sock')}"]
    figures = {"restart": [], "cold": [], "bare": []}
    _, jailed = timed_start([*JAILER, "run", profile, "--socket-path", path, "--socket", f"control={ctl}"], path,
                            env)
    inode = os.stat(path).st_ino
    try:
        for run in range(options.runs):
            outputs = (run * 0x1357 + 1) & 0xFFFF
            with Client.connect(path) as client:
                client.region_write(BAR2, 0x0, bytes([outputs & 0xFF]))
                client.region_write(BAR2, 0x4, bytes([outputs >> 8]))
            victim = device_pid(jailed.pid)
            start = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            with Client.connect(path, timeout=20) as client:
                figures["restart"].append(time.perf_counter() - start)
            restored = control(ctl, {"cmd": "get-outputs"})["outputs"]
            if restored != outputs or os.stat(path).st_ino != inode:
                raise SystemExit(f"run {run}: outputs {restored:#x}, expected {outputs:#x}; socket inode "
                                 f"{os.stat(path).st_ino} (was {inode})")
            cold_path = os.path.join(scratch, "cold.sock")
            seconds, cold = timed_start([*JAILER, "run", PROFILE, "--socket-path", cold_path], cold_path, env)
            figures["cold"].append(seconds)
            stop(cold)
            bare_path = os.path.join(scratch, "bare.sock")
            seconds, bare = timed_start(bare_argv, bare_path, bare_env)
            figures["bare"].append(seconds)
            stop(bare)
    finally:
        stop(jailed)
    medians = {name: statistics.median(values) * 1000 for name, values in figures.items()}
    print(f"{options.runs} SIGKILLs of the jailed IDIO-16, each served again with its outputs restored:")
    for name in ("restart", "cold", "bare"):
        print(f"  {name:8} median {medians[name]:7.1f} ms   (min {min(figures[name]) * 1000:.1f}, "
              f"max {max(figures[name]) * 1000:.1f})")
    print(f"  restart/cold {medians['restart'] / medians['cold']:.2f}   restart/bare "
          f"{medians['restart'] / medians['bare']:.2f}")
    if options.json:
        with open(options.json, "w") as f:
            json.dump({"seconds": figures, "median_ms": medians}, f, indent=1)


if __name__ == "__main__":
    main()
