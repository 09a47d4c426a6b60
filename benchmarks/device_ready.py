"""Time to ready and resident memory of the bundled IDIO-16 device: jailed by `jailer run`,
in the equivalent bubblewrap sandbox, and bare, all measured in one run.

    .venv/bin/python benchmarks/device_ready.py [--runs 20] [--warmup 3] [--json FILE]

Ready is from spawning the command until the project's vfio-user client completes a
VERSION handshake on the device's socket (connect polled every 0.5 ms); its ratios to bwrap
are also given paired (the median of the per-round ratios, with a 95% bootstrap interval
over the rounds), and the time targets are judged on that interval. The CPU time of
the process tree is read at that moment; 0.3 s later the RSS and PSS
(/proc/PID/smaps_rollup) of every process the command left running are summed (by then
jailer's launcher has handed over to jailer-monitor); then the device is stopped with
SIGTERM. The variants run interleaved, one of
each per round, as root and as uid 65534 (setpriv).

  jailer  jailer run P --socket-path S, P a copy of profiles/gpio-pci-idio-16.toml with
          program.start = "exec": a second interpreter starts in the sandbox
          (and no program.preload)
  zero    the same with program.start = "zero-exec" (as the profile ships): the sandbox's
          process runs the device in the launcher's interpreter (jailer.zero_exec), and
          comes from a fork that imports program.preload while the launcher prepares
  bwrap   bwrap with the same sandbox as far as bwrap expresses it: --unshare-all,
          --die-with-parent, --new-session, a read-only tmpfs root holding exactly the
          binds and symlinks `jailer show --json` lists, /proc, --clearenv plus the plan's
          environment, the listening socket passed as a descriptor, and the profile's
          seccomp filter compiled by jailer.layers.seccomp.compile_bpf (killing instead of
          reporting, plus wait4 for bwrap's own pid 1, which runs under the filter too) on
          --seccomp. Not expressible in bwrap: Landlock, rlimits, cgroups, and the steady
          rule that denies execve once the device runs (jailer answers it from a seccomp
          notification listener).
          bwrap always runs as uid 65534: as root it cannot drop the device to another
          host uid itself, so in the root row it is started through setpriv (which execs).
  bare    the interpreter, flags and environment the plan runs the device with, i.e.
          python -S -m devices.gpio_pci_idio16 --socket-path S, without any sandbox
"""

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from startup import (PROJECT_PACKAGES, SYSTEM_PYTHON, UNPRIVILEGED, UNPRIVILEGED_UID, own_home,  # noqa: E402
                     precompile, readable_by_others, world_readable_copy)

from devices.vfio_user.client import Client, ClientError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILE = os.path.join(REPO, "profiles", "gpio-pci-idio-16.toml")
READY_TIMEOUT = 20.0
SETTLE = 0.3            # seconds after ready before the memory is read
QUIESCE = 0.2           # seconds after a stop before the next start: the kernel tears a sandbox's
                        # namespaces down after its last process ends (a net namespace in a workqueue)
TARGET_READY = 1.15     # jailer's time to ready at most 1.15x bwrap's
TARGET_ZERO_EXEC_READY = 1.0   # zero-exec: at most bwrap's
TARGET_MEMORY = 1.2     # jailer's resident memory at most 1.2x bwrap's
VARIANTS = ("jailer", "zero", "bwrap", "bare")


@dataclasses.dataclass
class Identity:
    name: str
    prefix: tuple            # setpriv for uid 65534, else empty
    jailer: list             # the jailer command as this identity runs it
    env: dict


def identity(name, unprivileged, scratch):
    env = {key: value for key, value in os.environ.items() if key not in ("XDG_CACHE_HOME", "PYTHONPATH")}
    script = os.path.join(REPO, ".venv", "bin", "jailer")      # setup.sh's -IS entry point
    jailer = [script] if os.path.exists(script) else [sys.executable, "-m", "jailer"]
    if unprivileged:
        env["HOME"] = own_home(scratch, UNPRIVILEGED_UID)
        if not (readable_by_others(sys.executable) and readable_by_others(os.path.join(REPO, "jailer"))):
            env["PYTHONPATH"] = world_readable_copy(os.path.join(scratch, "tree"))
            jailer = [SYSTEM_PYTHON, "-m", "jailer"]
    return Identity(name, UNPRIVILEGED if unprivileged else (), jailer, env)


def bwrap_argv(plan_json, socket_fd, seccomp_fd):
    """bwrap reproducing the plan jailer shows: binds, symlinks, /proc, environment, fds, seccomp."""
    argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
            "--hostname", plan_json["namespaces"]["hostname"], "--chdir", plan_json["program"]["cwd"],
            "--cap-drop", "ALL"]
    filesystem = plan_json["filesystem"]
    for bind in filesystem["binds"]:
        argv += ["--bind" if bind["writable"] else "--ro-bind", bind["source"], bind["target"]]
    for link in filesystem["symlinks"]:
        argv += ["--symlink", link["points_to"], link["target"]]
    if filesystem["proc"]:
        argv += ["--proc", "/proc"]
    if filesystem["readonly_root"]:
        argv += ["--remount-ro", "/"]
    for name, value in plan_json["environment"]:
        argv += ["--setenv", name, value]
    argv += ["--seccomp", str(seccomp_fd), "--"]
    program = [arg.replace("{fd:vfio-user}", str(socket_fd)) for arg in plan_json["program"]["argv"]
               if "{fd:" not in arg or "{fd:vfio-user}" in arg]   # the optional control fd is not passed
    return argv + program


def seccomp_memfd(profile: str):
    """The profile's filter as BPF in a memfd, for bwrap: kill actions kill (bwrap has no one
    to report to), no steady rules (they need jailer's notification listener), and wait4 is
    allowed, because bwrap loads the filter in its own pid 1 too, which reaps with it."""
    from jailer.layers import seccomp
    from jailer.plan import SeccompRule
    from jailer.profile import build_plan

    filter_plan = build_plan(profile, euid=os.geteuid()).seccomp
    filter_plan = dataclasses.replace(filter_plan, report=False, steady=(),
                                      rules=(*filter_plan.rules, SeccompRule("wait4")))
    bpf = seccomp.compile_bpf(filter_plan)
    fd = os.memfd_create("idio16-seccomp", 0)
    os.write(fd, bpf)
    return fd


def listening_socket(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    return sock


def wait_ready(path, proc):
    """Seconds spent until a VERSION handshake succeeds (connect retried while the path is absent)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            Client.connect(path, timeout=READY_TIMEOUT).close()
            return
        except ClientError as exc:
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED) or proc.poll() is not None:
                raise RuntimeError(f"not ready: {exc} (exit status {proc.poll()})") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready within {READY_TIMEOUT} s") from None
            time.sleep(0.0005)


def stop(proc) -> int:
    """SIGTERM (unless it has ended), and SIGKILL after 10 s; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def descendants(root_pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending += children.get(pid, [])
    return found


def process_figures(pid):
    """(name, RSS KiB, PSS KiB, CPU ms) of one process; CPU counts its reaped children too."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = {line.split(":")[0]: line.split()[1] for line in f if ":" in line and line.split()[1].isdigit()}
    with open(f"/proc/{pid}/stat") as f:
        times = f.read().rsplit(")", 1)[1].split()[11:15]          # utime stime cutime cstime
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [arg.decode() for arg in f.read().split(b"\0") if arg]
    name = os.path.basename(argv[0]) if argv else "(in exec)"
    if name.startswith("python"):                                  # the module or script it runs
        program = argv[argv.index("-m") + 1] if "-m" in argv else next(a for a in argv[1:] if a[0] != "-")
        name = os.path.basename(program)
    cpu_ms = sum(map(int, times)) * 1000 / os.sysconf("SC_CLK_TCK")
    return name, int(fields["Rss"]), int(fields["Pss"]), cpu_ms


def shown_plan(who: Identity, profile: str) -> dict:
    show = subprocess.run([*who.prefix, *who.jailer, "show", "--json", profile],
                          env=who.env, capture_output=True, text=True, check=True, cwd="/")
    return json.loads(show.stdout)


def started_as(scratch, start: str) -> str:
    """A copy of PROFILE, readable by uid 65534, whose program starts as `start` says."""
    import toml

    data = toml.load(PROFILE)
    data["program"]["start"] = start
    if start != "zero-exec":
        data["program"].pop("preload", None)   # (only a zero-exec start preloads)
    path = os.path.join(scratch, f"{start}.toml")
    with open(path, "w") as target:
        toml.dump(data, target)
    os.chmod(path, 0o644)
    return path


class Runner:
    """Starts each variant for one identity; bwrap always as `bwrap_who` (uid 65534, see above)."""

    def __init__(self, who: Identity, bwrap_who: Identity, scratch):
        self.who = who
        self.bwrap_who = bwrap_who
        self.profiles = {variant: started_as(scratch, start) for variant, start in (("jailer", "exec"),
                                                                                   ("zero", "zero-exec"))}
        exec_profile = self.profiles["jailer"]     # what bwrap and bare reproduce: the device exec'd
        self.bwrap_plan = shown_plan(bwrap_who, exec_profile)
        self.plan = shown_plan(who, exec_profile)
        self.scratch = scratch
        self.count = 0
        self.seccomp_fd = seccomp_memfd(exec_profile)

    def spawn(self, variant, path):
        who = self.who
        if variant in ("jailer", "zero"):
            profile = self.profiles[variant]
            argv = [*who.prefix, *who.jailer, "run", profile, "--socket-path", path]
            return subprocess.Popen(argv, env=who.env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    cwd="/"), None
        if variant == "bare":
            program = [arg for arg in self.plan["program"]["argv"] if "{fd:" not in arg]
            argv = [*who.prefix, *program, "--socket-path", path]
            env = dict(who.env, **dict(self.plan["environment"]))
            return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    cwd="/"), None
        sock = listening_socket(path)
        os.lseek(self.seccomp_fd, 0, os.SEEK_SET)
        argv = [*self.bwrap_who.prefix, *bwrap_argv(self.bwrap_plan, sock.fileno(), self.seccomp_fd)]
        proc = subprocess.Popen(argv, env=self.bwrap_who.env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                pass_fds=[sock.fileno(), self.seccomp_fd], cwd="/")
        return proc, sock

    @contextlib.contextmanager
    def serving(self, variant, path):
        """The device started as `variant` and serving on `path` (a VERSION handshake answered);
        stopped with SIGTERM and its socket file removed on leaving."""
        proc, sock = self.spawn(variant, path)
        try:
            if sock is not None:
                sock.close()
            wait_ready(path, proc)
            yield proc
        finally:
            stop(proc)
            if os.path.exists(path):
                os.unlink(path)

    def once(self, variant):
        """(seconds to ready, [(name, rss, pss, cpu) per process left running])."""
        self.count += 1
        path = os.path.join(self.scratch, f"{variant}-{self.count}.sock")
        start = time.perf_counter()
        with self.serving(variant, path) as proc:
            ready = time.perf_counter() - start
            cpu = {pid: process_figures(pid)[3] for pid in descendants(proc.pid)}
            time.sleep(SETTLE)   # memory as it stays: jailer's launcher hands over to jailer-monitor
            processes = [(*process_figures(pid)[:3], cpu.get(pid, 0.0)) for pid in descendants(proc.pid)]
        return ready, processes


def measure(who, bwrap_who, runs, warmup, scratch):
    """Rounds of one start of each variant, in an order shuffled per round (seeded), each start
    after the previous one's teardown has settled: no variant inherits another's."""
    import random

    runner = Runner(who, bwrap_who, scratch)
    ready = {variant: [] for variant in VARIANTS}
    memory = {variant: [] for variant in VARIANTS}
    order = random.Random(20261204)
    for index in range(warmup + runs):
        for variant in order.sample(VARIANTS, len(VARIANTS)):
            seconds, processes = runner.once(variant)
            time.sleep(QUIESCE)
            if index >= warmup:
                ready[variant].append(seconds * 1000)
                memory[variant].append(processes)
    os.close(runner.seccomp_fd)
    return ready, memory


def median_breakdown(samples):
    """The sample with the median PSS total, as {"rss": total, "pss": total, "processes": [...]}."""
    ordered = sorted(samples, key=lambda processes: sum(p[2] for p in processes))
    chosen = ordered[len(ordered) // 2]
    return {"rss": sum(p[1] for p in chosen), "pss": sum(p[2] for p in chosen), "processes": chosen}


def ratio(a, b):
    return f"{a / b:.2f}" if b else "-"


def paired_ratio(mine, theirs, resamples=2000):
    """The median of the per-round ratios (each round runs every variant back to back, so a
    ratio within a round cancels the machine's drift between rounds) and its 95% interval
    by bootstrap over the rounds (fixed seed: the same samples give the same interval)."""
    import random

    ratios = [a / b for a, b in zip(mine, theirs)]
    rng = random.Random(20261203)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def report(results, runs):
    print(f"IDIO-16 device, {runs} runs per variant, interleaved; medians")
    print("time to ready (spawn -> VERSION handshake), ms")
    header = (f"  {'identity':13} {'jailer':>8} {'zero':>8} {'bwrap':>8} {'bare':>8} {'jailer/bwrap':>13} "
              f"{'zero/bwrap':>11} {'zero/bare':>10}")

    def row(name, m):
        print(f"  {name:13} {m['jailer']:8.1f} {m['zero']:8.1f} {m['bwrap']:8.1f} {m['bare']:8.1f} "
              f"{ratio(m['jailer'], m['bwrap']):>13} {ratio(m['zero'], m['bwrap']):>11} "
              f"{ratio(m['zero'], m['bare']):>10}")

    print(header)
    verdicts = []
    paired = []
    for name, (ready, _) in results.items():
        m = {variant: statistics.median(values) for variant, values in ready.items()}
        row(name, m)
        for variant in ("jailer", "zero"):
            target = TARGET_READY if variant == "jailer" else TARGET_ZERO_EXEC_READY
            middle, low, high = paired_ratio(ready[variant], ready["bwrap"])
            paired.append(f"  {name:13} {variant}/bwrap {middle:.2f} ({low:.2f}-{high:.2f})")
            verdict = "within" if high <= target else "OVER" if low > target else "indistinguishable from"
            verdicts.append(f"{name}: ready {variant}/bwrap {middle:.2f}, 95% interval {low:.2f}-{high:.2f} "
                            f"({verdict} the {target}x target)")
    print("time to ready, paired: median of the per-round ratios (95% bootstrap interval)")
    for line in paired:
        print(line)
    print("CPU time to ready (user + system of the process tree, clock ticks), ms: steadier on a busy machine")
    print(header)
    for name, (_, samples) in results.items():
        row(name, {variant: statistics.median(sum(p[3] for p in processes) for processes in runs)
                   for variant, runs in samples.items()})
    print("resident memory once ready, sum over the processes left running, KiB")
    print(f"  {'identity':13} {'variant':7} {'RSS':>7} {'PSS':>7}  processes (name RSS/PSS)")
    for name, (_, memory) in results.items():
        rows = {variant: median_breakdown(samples) for variant, samples in memory.items()}
        for variant, row in rows.items():
            processes = ", ".join(f"{p[0]} {p[1]}/{p[2]}" for p in row["processes"])
            print(f"  {name:13} {variant:7} {row['rss']:7} {row['pss']:7}  {processes}")
        bwrap, bare = rows["bwrap"], rows["bare"]
        for variant in ("jailer", "zero"):
            mine = rows[variant]
            print(f"  {name:13} ratios  RSS {variant}/bwrap {ratio(mine['rss'], bwrap['rss'])}, {variant}/bare "
                  f"{ratio(mine['rss'], bare['rss'])}; PSS {variant}/bwrap {ratio(mine['pss'], bwrap['pss'])}, "
                  f"{variant}/bare {ratio(mine['pss'], bare['pss'])}")
            for measure in ("rss", "pss"):
                verdicts.append(f"{name}: {measure.upper()} {variant}/bwrap {mine[measure] / bwrap[measure]:.2f} "
                                f"({'within' if mine[measure] <= TARGET_MEMORY * bwrap[measure] else 'OVER'} the "
                                f"{TARGET_MEMORY}x target)")
    for line in verdicts:
        print(line)


def main(argv=None):
    global PROFILE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    parser.add_argument("--profile", default=PROFILE,
                        help="another profile of the IDIO-16 device (to see what a layer costs)")
    parser.add_argument("--identity", choices=("root", "unprivileged"), action="append",
                        help="measure only this identity (repeatable; default: both as root)")
    options = parser.parse_args(argv)
    PROFILE = os.path.abspath(options.profile)
    for package in PROJECT_PACKAGES:
        precompile(os.path.join(REPO, package))
    identities = {"root": False, "unprivileged": True} if os.geteuid() == 0 else {"unprivileged": False}
    measured = [name for name in identities if not options.identity or name in options.identity]
    results = {}
    with tempfile.TemporaryDirectory(prefix="jailer-bench-") as scratch:
        os.chmod(scratch, 0o777)
        who = {name: identity(name, unprivileged, scratch) for name, unprivileged in identities.items()}
        for name in measured:
            results[name] = measure(who[name], who["unprivileged"], options.runs, options.warmup, scratch)
    report(results, options.runs)
    if options.json:
        with open(options.json, "w") as handle:
            json.dump({"runs": options.runs, "ready_ms": {n: r for n, (r, _) in results.items()},
                       "processes_name_rss_kib_pss_kib_cpu_ms": {n: m for n, (_, m) in results.items()}},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
