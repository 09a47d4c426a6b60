"""Where the time to ready goes: the kernel's own timeline (tracefs) of each variant of
device_ready.py, from spawning the command to the device's first accept4.

    .venv/bin/python benchmarks/ready_timeline.py [--runs 15] [--identity root|unprivileged] [--profile P]

Needs root (tracefs; mounted on /sys/kernel/tracing if it is not). For each variant (jailer,
zero, bwrap, bare; started exactly as device_ready.py starts them, interleaved) it records
sched_process_exec, sched_process_fork and accept4 and prints the medians of:

  launch      spawn -> the launcher's first fork: jailer's interpreter start, imports, cached
              plan, sockets and cgroup (zero-exec: only the cached plan, then the preloader
              forks); setpriv's and bwrap's start for bwrap
  preload     (zero) the preloader's start (the sandbox's process, made by the launcher's
              first fork) -> its first unshare: the program.preload imports, in parallel
              with the launcher's sockets, cgroups and records and the builder's namespaces
              and root, then jailer's set-up modules, the launcher's request, the cgroup
              join and entering the built namespaces (jailer.zero_exec.preloader)
  set-up      the fork (zero: that unshare) -> the device's exec (zero-exec: the sandbox's
              process renaming itself to the interpreter's name, jailer.zero_exec): the
              sandbox built in the child(ren)
  device      the device's exec (or that rename) -> its first accept4 (it is serving): the device's own start-up
              inside the sandbox, with jailer's notified syscalls and hand-over included
  stall       (jailer) the device's exec -> jailer-monitor's exec, the window in which the
              device's notified syscalls wait for the hand-over
  ready       spawn -> a VERSION handshake completed, as device_ready.py measures it
"""

import argparse
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import device_ready  # noqa: E402

TRACEFS = "/sys/kernel/tracing"
EVENTS = ("sched/sched_process_exec", "sched/sched_process_fork", "task/task_rename", "syscalls/sys_enter_accept4",
          "syscalls/sys_enter_unshare")
LINE = re.compile(r"-(\d+)\s+\[\d+\]\s+\S+\s+(\d+\.\d+): (\w+)[:(] ?(.*)")
PHASES = ("launch", "preload", "set-up", "device", "stall", "ready")


def tracefs(path, value):
    with open(os.path.join(TRACEFS, path), "w") as handle:
        handle.write(value)


def mount_tracefs():
    if not os.path.exists(os.path.join(TRACEFS, "trace_marker")):
        if os.system(f"mount -t tracefs nodev {TRACEFS}") != 0:
            raise SystemExit(f"cannot mount tracefs on {TRACEFS}")


def record(events: bool):
    for event in EVENTS:
        tracefs(f"events/{event}/enable", "1" if events else "0")


def timeline(text: str, launcher_pid: int, preloads: bool = False) -> dict:
    """Phase durations in ms from one trace of one start (see the module docstring); preloads:
    the launcher's first fork is the zero-exec preloader, the sandbox's process, whose set-up
    begins with its first unshare."""
    spawn = first_fork = preloader = unshared = device_exec = device_pid = monitor_exec = accept = None
    for line in text.splitlines():
        match = LINE.search(line)
        if not match:
            continue
        pid, stamp, event, fields = int(match.group(1)), float(match.group(2)) * 1000, match.group(3), match.group(4)
        if event == "tracing_mark_write" and "spawn" in fields:
            spawn = stamp
        elif spawn is None:
            continue
        elif event == "sched_process_fork" and first_fork is None and f" pid={launcher_pid} " in f" {fields} ":
            first_fork, preloader = stamp, int(fields.split("child_pid=")[1].split()[0])
        elif event == "sys_unshare" and preloads and unshared is None and pid == preloader:
            unshared = stamp
        elif event == "sched_process_exec" and "jailer-monitor" in fields:
            monitor_exec = stamp
        elif event == "sched_process_exec" and "python" in fields.split("filename=")[1].split()[0]:
            if pid != launcher_pid or first_fork is None:   # bare: the launcher is the device
                device_exec, device_pid = stamp, pid
        elif event == "task_rename" and device_exec is None and pid != launcher_pid and "newcomm=python" in fields:
            device_exec, device_pid = stamp, pid      # zero-exec: the sandbox's process becomes the device
        elif event == "sys_accept4" and pid == device_pid and accept is None:
            accept = stamp
    first_fork = first_fork if first_fork is not None and first_fork < device_exec else device_exec
    started = unshared if preloads and unshared is not None else first_fork
    return {"launch": first_fork - spawn, "preload": started - first_fork if preloads else None,
            "set-up": device_exec - started, "device": accept - device_exec,
            "stall": monitor_exec - device_exec if monitor_exec is not None else None}


def once(runner, variant, scratch) -> dict:
    path = os.path.join(scratch, f"{variant}.sock")
    tracefs("trace", "")
    record(True)
    tracefs("trace_marker", "spawn")
    start = time.perf_counter()
    try:
        with runner.serving(variant, path) as proc:
            ready = (time.perf_counter() - start) * 1000
            record(False)
            with open(os.path.join(TRACEFS, "trace")) as handle:
                phases = timeline(handle.read(), proc.pid, preloads=variant == "zero")
    finally:
        record(False)
    return dict(phases, ready=ready)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--identity", choices=("root", "unprivileged"), default="root")
    parser.add_argument("--profile", default=device_ready.PROFILE,
                        help="another profile of the IDIO-16 device (to see what a layer costs)")
    options = parser.parse_args(argv)
    device_ready.PROFILE = os.path.abspath(options.profile)
    if os.geteuid() != 0:
        raise SystemExit("ready_timeline.py reads the kernel's trace: run it as root")
    mount_tracefs()
    for package in device_ready.PROJECT_PACKAGES:
        device_ready.precompile(os.path.join(device_ready.REPO, package))
    samples = {variant: [] for variant in device_ready.VARIANTS}
    with tempfile.TemporaryDirectory(prefix="jailer-bench-") as scratch:
        os.chmod(scratch, 0o777)
        who = device_ready.identity(options.identity, options.identity == "unprivileged", scratch)
        bwrap_who = device_ready.identity("unprivileged", True, scratch)
        runner = device_ready.Runner(who, bwrap_who, scratch)
        for index in range(options.runs + 1):          # the first round warms the caches
            for variant in device_ready.VARIANTS:
                sample = once(runner, variant, scratch)
                if index:
                    samples[variant].append(sample)
        os.close(runner.seccomp_fd)
    print(f"IDIO-16 device as {options.identity}, {options.runs} runs per variant, interleaved; "
          "medians in ms (kernel timestamps)")
    print(f"  {'variant':8}" + "".join(f"{phase:>9}" for phase in PHASES))
    for variant, rows in samples.items():
        cells = []
        for phase in PHASES:
            values = [row[phase] for row in rows if row[phase] is not None]
            cells.append(f"{statistics.median(values):9.1f}" if values else f"{'-':>9}")
        print(f"  {variant:8}" + "".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
