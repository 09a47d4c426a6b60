"""Round trips per second of the vfio-user server against the raw socket floor.

Builds the independent C client vfu_bench and the raw pingpong from the shared tools
($JAILER_SHARED_TOOLS, default ../shared/tools beside the repository), starts the device
server (the IDIO-16 emulator when it is present, else the test device) and runs
vfu_bench against it with both pinned to one CPU (taskset -c 0), then pingpong with the
same message sizes (32 -> 33 bytes for a one-byte read, 33 -> 32 for a write) pinned the
same way. Rounds alternate server and pingpong runs; the best figure of each is kept,
since on a shared VM noise only ever slows a run down. Prints reads/s, writes/s,
pingpong/s and the ratios (target: >= 0.65 of raw ping-pong).

    .venv/bin/python benchmarks/vfio_user_rtt.py [--count 200000] [--rounds 3]
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


def server_command(sock: str) -> tuple[str, list, int, int]:
    """(name, argv, region, offset) of the device to measure."""
    if os.path.exists(os.path.join(REPO, "devices", "gpio_pci_idio16", "__main__.py")):
        return "gpio_pci_idio16 BAR2", [sys.executable, "-m", "devices.gpio_pci_idio16", "--socket-path", sock], 2, 0
    return ("test device BAR0", [sys.executable, os.path.join(REPO, "tests", "vfio_user", "vfio_testdevice.py"),
                                 "--socket-path", sock], 0, 0)


def rate(pattern: str, text: str) -> float:
    match = re.search(pattern + r".*?= (\d+) rt/s", text)
    if not match:
        sys.exit(f"unexpected output:\n{text}")
    return float(match.group(1))


def run_server_bench(vfu_bench: str, workdir: str, count: int) -> tuple[float, float]:
    sock = os.path.join(workdir, "bench.sock")
    _name, argv, region, offset = server_command(sock)
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


def run_pingpong(pingpong: str, count: int, req: int, rep: int) -> float:
    env = dict(os.environ, PING_CPU="0", PONG_CPU="0")
    out = subprocess.run([pingpong, str(count), str(req), str(rep)], check=True, capture_output=True,
                         text=True, env=env).stdout
    return rate("pingpong", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not shutil.which("gcc") or not shutil.which("taskset"):
        sys.exit("needs gcc and taskset")
    tools = shared_tools()
    with tempfile.TemporaryDirectory() as workdir:
        vfu_bench = build(tools, workdir, "vfu_bench")
        pingpong = build(tools, workdir, "pingpong")
        reads = writes = ping_read = ping_write = 0.0
        for _ in range(args.rounds):
            r, w = run_server_bench(vfu_bench, workdir, args.count)
            reads, writes = max(reads, r), max(writes, w)
            ping_read = max(ping_read, run_pingpong(pingpong, args.count, 32, 33))
            ping_write = max(ping_write, run_pingpong(pingpong, args.count, 33, 32))
    device = server_command("")[0]
    print(f"device: {device}; {args.count} round trips, best of {args.rounds}, all pinned to CPU 0")
    print(f"REGION_READ  1 byte : {reads:9.0f} rt/s   raw pingpong 32->33: {ping_read:9.0f} rt/s   "
          f"ratio {reads / ping_read:.2f}")
    print(f"REGION_WRITE 1 byte : {writes:9.0f} rt/s   raw pingpong 33->32: {ping_write:9.0f} rt/s   "
          f"ratio {writes / ping_write:.2f}")


if __name__ == "__main__":
    main()
