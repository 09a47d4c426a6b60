"""Round trips per second of the vfio-user server against the raw socket floor.

Builds the independent C client vfu_bench and the raw pingpong from the shared tools
($JAILER_SHARED_TOOLS, default ../shared/tools beside the repository), starts the device
server (the IDIO-16 emulator when it is present, else the test device) and runs
vfu_bench against it with both pinned to one CPU (taskset -c 0), then pingpong with the
same message sizes (32 -> 33 bytes for a one-byte read, 33 -> 32 for a write) pinned the
same way. The IDIO-16 is also measured sandboxed, to see what a request costs inside a
sandbox (namespaces, the seccomp filter on every syscall, cgroup accounting): jailed by
`jailer run` with its shipped profile and, as root, in the equivalent bubblewrap sandbox
that benchmarks/device_ready.py builds (both pinned to CPU 0 once they serve).
Rounds alternate the runs; the best figure of each is kept, since on a shared VM noise
only ever slows a run down. Prints reads/s, writes/s, pingpong/s and the ratios (target:
>= 0.65 of raw ping-pong), and sandboxed/bare.

    .venv/bin/python benchmarks/vfio_user_rtt.py [--count 200000] [--rounds 3] [--profile P]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_tools() -> str:
    path = os.environ.get("JAILER_SHARED_TOOLS") or os.path.join(REPO, "..", "shared", "tools")
    if not os.path.exists(os.path.join(path, "vfu_bench.c")):
        sys.exit(f"vfu_bench.c not found in {path}: set JAILER_SHARED_TOOLS")
    return path


def build(tools: str, workdir: str, name: str) -> str:
    out = os.path.join(workdir, name)
    subprocess.run(["gcc", "-O2", "-o", out, os.path.join(tools, f"{name}.c")], check=True)
    return out


PROFILE = os.path.join(REPO, "profiles", "gpio-pci-idio-16.toml")


def idio16_present() -> bool:
    return os.path.exists(os.path.join(REPO, "devices", "gpio_pci_idio16", "__main__.py"))


def server_command(sock: str, jailed: bool = False) -> tuple[str, list, int, int]:
    """(name, argv, region, offset) of the device to measure."""
    if jailed:
        script = os.path.join(REPO, ".venv", "bin", "jailer")
        jailer = [script] if os.path.exists(script) else [sys.executable, "-m", "jailer"]
        return "gpio_pci_idio16 BAR2, jailed", [*jailer, "run", PROFILE, "--socket-path", sock], 2, 0
    if idio16_present():
        return "gpio_pci_idio16 BAR2", [sys.executable, "-m", "devices.gpio_pci_idio16", "--socket-path", sock], 2, 0
    return ("test device BAR0", [sys.executable, os.path.join(REPO, "tests", "vfio_user", "vfio_testdevice.py"),
                                 "--socket-path", sock], 0, 0)


def rate(pattern: str, text: str) -> float:
    match = re.search(pattern + r".*?= (\d+) rt/s", text)
    if not match:
        sys.exit(f"unexpected output:\n{text}")
    return float(match.group(1))


def run_server_bench(vfu_bench: str, workdir: str, count: int, jailed: bool = False) -> tuple[float, float]:
    sock = os.path.join(workdir, "bench.sock")
    _name, argv, region, offset = server_command(sock, jailed)
    server = subprocess.Popen(["taskset", "-c", "0", *argv], cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit("the device server did not start")
            time.sleep(0.02)
        out = subprocess.run(["taskset", "-c", "0", vfu_bench, sock, str(region), str(offset), str(count)],
                             check=True, capture_output=True, text=True).stdout
    finally:
        server.terminate()
        server.wait(10)
    return rate("REGION_READ", out), rate("REGION_WRITE", out)


def sandboxes(workdir: str):
    """(device_ready module, its Runner) for the jailer and bwrap variants as root, else None
    (then the jailed run is `jailer run` as the caller, and there is no bwrap peer)."""
    if os.geteuid() != 0 or not idio16_present() or not shutil.which("bwrap"):
        return None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import device_ready

    device_ready.PROFILE = PROFILE
    os.chmod(workdir, 0o777)   # bwrap's device runs as uid 65534
    return device_ready, device_ready.Runner(device_ready.identity("root", False, workdir),
                                             device_ready.identity("unprivileged", True, workdir), workdir)


def run_sandboxed_bench(vfu_bench: str, workdir: str, count: int, sandbox, variant: str) -> tuple[float, float]:
    """vfu_bench against the device started as device_ready.py starts `variant`."""
    module, runner = sandbox
    path = os.path.join(workdir, f"{variant}.sock")
    with runner.serving(variant, path) as proc:
        for pid in module.descendants(proc.pid):
            try:
                os.sched_setaffinity(pid, {0})
            except OSError:
                pass
        out = subprocess.run(["taskset", "-c", "0", vfu_bench, path, "2", "0", str(count)],
                             check=True, capture_output=True, text=True).stdout
    return rate("REGION_READ", out), rate("REGION_WRITE", out)


def run_pingpong(pingpong: str, count: int, req: int, rep: int) -> float:
    env = dict(os.environ, PING_CPU="0", PONG_CPU="0")
    out = subprocess.run([pingpong, str(count), str(req), str(rep)], check=True, capture_output=True,
                         text=True, env=env).stdout
    return rate("pingpong", out)


def main() -> None:
    global PROFILE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default=PROFILE,
                        help="the profile the jailed run uses (a variant of the shipped one, to see what a layer costs)")
    args = parser.parse_args()
    PROFILE = os.path.abspath(args.profile)
    if not shutil.which("gcc") or not shutil.which("taskset"):
        sys.exit("needs gcc and taskset")
    tools = shared_tools()
    with tempfile.TemporaryDirectory() as workdir:
        vfu_bench = build(tools, workdir, "vfu_bench")
        pingpong = build(tools, workdir, "pingpong")
        sandbox = sandboxes(workdir)
        reads = writes = ping_read = ping_write = 0.0
        sandboxed = {}   # variant -> [best reads/s, best writes/s]
        for _ in range(args.rounds):
            r, w = run_server_bench(vfu_bench, workdir, args.count)
            reads, writes = max(reads, r), max(writes, w)
            for variant in ("jailer", "bwrap") if sandbox else ("jailer",) if idio16_present() else ():
                if sandbox:
                    r, w = run_sandboxed_bench(vfu_bench, workdir, args.count, sandbox, variant)
                else:
                    r, w = run_server_bench(vfu_bench, workdir, args.count, jailed=True)
                best = sandboxed.setdefault(variant, [0.0, 0.0])
                best[0], best[1] = max(best[0], r), max(best[1], w)
            ping_read = max(ping_read, run_pingpong(pingpong, args.count, 32, 33))
            ping_write = max(ping_write, run_pingpong(pingpong, args.count, 33, 32))
        if sandbox:
            os.close(sandbox[1].seccomp_fd)
    device = server_command("")[0]
    print(f"device: {device}; {args.count} round trips, best of {args.rounds}, all pinned to CPU 0")
    print(f"REGION_READ  1 byte : {reads:9.0f} rt/s   raw pingpong 32->33: {ping_read:9.0f} rt/s   "
          f"ratio {reads / ping_read:.2f}")
    print(f"REGION_WRITE 1 byte : {writes:9.0f} rt/s   raw pingpong 33->32: {ping_write:9.0f} rt/s   "
          f"ratio {writes / ping_write:.2f}")
    names = {"jailer": f"jailed by {os.path.relpath(PROFILE, REPO)}", "bwrap": "in the equivalent bwrap sandbox"}
    for variant, (r, w) in sandboxed.items():
        print(f"{names[variant]}: REGION_READ {r:9.0f} rt/s ({r / reads:.2f} of bare), "
              f"REGION_WRITE {w:9.0f} rt/s ({w / writes:.2f} of bare)")
    if len(sandboxed) == 2:
        (jr, jw), (br, bw) = sandboxed["jailer"], sandboxed["bwrap"]
        print(f"jailer/bwrap: REGION_READ {jr / br:.2f}, REGION_WRITE {jw / bw:.2f}")


if __name__ == "__main__":
    main()
