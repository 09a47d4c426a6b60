"""Soak of the bundled IDIO-16 device under a fuzzing client: does its memory stay flat,
does it leak fds, and does it keep serving?

    .venv/bin/python benchmarks/soak.py                       # 100,000 messages, >= 10,000 connections
    .venv/bin/python benchmarks/soak.py --messages 20000 --variants jailer,bare --json /tmp/soak.json

A seeded fuzzing client sends valid vfio-user messages and broken ones (bit-flipped valid
messages, truncated frames, huge declared sizes, too many fds in one message, fds on
messages that take none, random bytes) and reconnects whenever the device drops it, or
whenever a message stays unanswered for REPLY_WAIT (a flipped size bit leaves the device
waiting for bytes that never come). Every --messages/--samples messages it reads VmRSS,
VmData (/proc/PID/status) and the number of open fds (/proc/PID/fd) of the device process
(the launcher's descendant running devices.gpio_pci_idio16), and checks that a valid
client (connect, VERSION, a config-space read) is answered.

Variants, run one after another on the same message sequence (same seed):

  jailer  jailer run profiles/gpio-pci-idio-16.toml --socket-path S   (64M RLIMIT_DATA)
  bare    python -m devices.gpio_pci_idio16 --socket-path S           (no limits)

Verdict per variant: after the warm-up (the first --warmup fraction of the messages) VmData
and RSS grow by less than 1 MiB, the fd count is back to its baseline at every sample
(no session is open while the device is checked), every check was answered and the device
is still alive. Exit status 1 if any variant fails.
"""

from __future__ import annotations

import argparse
import array
import errno
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import device_ready  # noqa: E402  (benchmarks/ is on sys.path as the script's directory)
from devices.vfio_user import codec  # noqa: E402
from devices.vfio_user import protocol as P  # noqa: E402
from devices.vfio_user.client import Client, ClientError  # noqa: E402

PROFILE = os.path.join(REPO, "profiles", "gpio-pci-idio-16.toml")
DEVICE_MODULE = "devices.gpio_pci_idio16"
READY_TIMEOUT = 20.0
REPLY_WAIT = 0.01           # a message unanswered for this long: the stream is stalled, reconnect
GROWTH_LIMIT_KB = 1024      # "flat": less than 1 MiB over the run after warm-up
VENDOR_DEVICE = struct.pack("<HH", 0x494F, 0x0DC8)
BAR2, CONFIG = 2, 7
VARIANTS = ("jailer", "bare")


# --- the device under test --------------------------------------------------------------

def jailer_command() -> list:
    script = os.path.join(REPO, ".venv", "bin", "jailer")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "jailer"]


class Device:
    """The device as `variant` runs it, its stderr in a file (a chatty device must never
    block on a pipe nobody reads)."""

    def __init__(self, variant: str, socket_path: str):
        self.variant = variant
        self.socket_path = socket_path
        self.stderr = tempfile.TemporaryFile("w+")
        if variant == "jailer":
            argv = [*jailer_command(), "run", PROFILE, "--socket-path", socket_path]
            env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
                   "JAILER_CACHE_DIR": os.path.join(os.path.dirname(socket_path), "cache")}
        else:
            argv = [sys.executable, "-m", DEVICE_MODULE, "--socket-path", socket_path]
            env = {"PATH": "/usr/bin:/bin"}
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr, env=env, cwd=REPO if variant == "bare" else "/")
        self.pid = None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                Client.connect(self.socket_path, timeout=2.0).close()
                break
            except ClientError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.variant} exited {self.proc.returncode}: {self.errors()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.variant} not ready: {self.errors()[-2000:]}")
                time.sleep(0.01)
        self.pid = device_pid(self.proc.pid)

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self) -> int:
        return device_ready.stop(self.proc)

    def close(self) -> None:
        self.stop()
        self.stderr.close()


def device_pid(root: int) -> int:
    """The process running the device module: `root` itself or its descendant."""
    for pid in device_ready.descendants(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if DEVICE_MODULE.encode() in cmdline.read():
                    return pid
        except OSError:
            pass
    raise RuntimeError(f"no process runs {DEVICE_MODULE} under pid {root}")


def usage(pid: int) -> dict:
    """VmRSS and VmData in KiB and the open fd count of `pid`."""
    figures = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmData"):
                figures[key] = int(value.split()[0])
    return {"rss_kb": figures["VmRSS"], "data_kb": figures["VmData"], "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def settled_usage(pid: int, baseline_fds: int | None, patience: float = 1.0) -> dict:
    """usage() once the device has let go of the last client (closing a session takes it a
    moment after our close): the first reading at or below the baseline fd count, or the
    last one after `patience` seconds, which then shows a leak."""
    deadline = time.monotonic() + patience
    while True:
        figures = usage(pid)
        if baseline_fds is None or figures["fds"] <= baseline_fds or time.monotonic() > deadline:
            return figures
        time.sleep(0.01)


def answered(path: str) -> str | None:
    """None if a valid client is served (VERSION, then the vendor/device ids); else why not."""
    try:
        with Client.connect(path, timeout=5.0) as client:
            ids = client.region_read(CONFIG, 0, 4)
    except (ClientError, OSError) as exc:
        return str(exc)
    return None if ids == VENDOR_DEVICE else f"config read returned {ids.hex()}"


# --- the fuzzing client -----------------------------------------------------------------

def message(cmd: int, payload: bytes = b"", flags: int = P.TYPE_COMMAND, msg_id: int = 1) -> bytes:
    return codec.encode_message(msg_id, cmd, flags, payload)


def version_message(rng: random.Random) -> bytes:
    caps = {"max_msg_fds": rng.choice((1, 8, 16)), "max_data_xfer_size": 1 << 20}
    if rng.random() < 0.3:
        caps["max_dma_maps"] = rng.choice((16, 65535))
    return message(P.VERSION, codec.encode_version(codec.Version(P.VERSION_MAJOR, P.VERSION_MINOR, caps)))


def valid_message(rng: random.Random) -> tuple[bytes, str, bool]:
    """(frame, the fds it should carry: "" / "eventfd" / "memfd", whether a reply comes)."""
    pick = rng.randrange(14)
    if pick == 0:
        return message(P.REGION_READ, P.REGION_ACCESS.pack(rng.randrange(256), CONFIG, rng.randrange(1, 9))), "", True
    if pick == 1:
        count = rng.randrange(1, 9)
        return message(P.REGION_READ, P.REGION_ACCESS.pack(rng.randrange(0x100 - count), BAR2, count)), "", True
    if pick == 2:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5)))
        no_reply = rng.random() < 0.3
        return (message(P.REGION_WRITE, P.REGION_ACCESS.pack(rng.randrange(8), BAR2, len(data)) + data,
                        P.FLAG_NO_REPLY if no_reply else 0), "", not no_reply)
    if pick == 3:
        return message(P.DEVICE_GET_INFO, P.DEVICE_INFO.pack(P.DEVICE_INFO.size, 0, 0, 0)), "", True
    if pick == 4:
        return message(P.DEVICE_GET_REGION_INFO, codec.encode_region_info_request(
            codec.RegionInfoRequest(rng.randrange(9), rng.choice((32, 64, 4096))))), "", True
    if pick == 5:
        return message(P.DEVICE_GET_IRQ_INFO, codec.encode_irq_info_request(
            codec.IrqInfoRequest(rng.randrange(5)))), "", True
    if pick == 6:
        return message(P.DEVICE_SET_IRQS, codec.encode_set_irqs(codec.SetIrqs(
            P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_TRIGGER, rng.choice((0, 3, 4)), 0, 1))), "eventfd", True
    if pick == 7:
        iova = rng.randrange(64) << 16
        return message(P.DMA_MAP, codec.encode_dma_map(codec.DmaMap(
            P.DMA_MAP_FLAG_READ | P.DMA_MAP_FLAG_WRITE, 0, iova, 1 << 16))), "memfd", True
    if pick == 8:
        iova = rng.randrange(64) << 16
        return message(P.DMA_MAP, codec.encode_dma_map(codec.DmaMap(P.DMA_MAP_FLAG_READ, 0, iova, 1 << 16))), "", True
    if pick == 9:
        unmap_all = rng.random() < 0.5
        return message(P.DMA_UNMAP, codec.encode_dma_unmap(codec.DmaUnmap(
            P.DMA_UNMAP_FLAG_ALL if unmap_all else 0, 0 if unmap_all else rng.randrange(64) << 16,
            0 if unmap_all else 1 << 16))), "", True
    if pick == 10:
        feature = rng.choice((P.FEATURE_MIGRATION, P.FEATURE_MIG_DEVICE_STATE))
        return message(P.DEVICE_FEATURE, codec.encode_feature(codec.Feature(feature | P.FEATURE_GET, b"", 64))), "", True
    if pick == 11:
        entries = tuple((BAR2, rng.randrange(8), bytes([rng.randrange(256)])) for _ in range(rng.randrange(1, 5)))
        return message(P.REGION_WRITE_MULTI, codec.encode_write_multi(codec.WriteMulti(entries))), "", True
    if pick == 12:
        return message(P.DEVICE_FEATURE, codec.encode_feature(codec.Feature(
            P.FEATURE_DMA_LOGGING_START | P.FEATURE_SET, codec.encode_logging_start(P.PAGE_SIZE, ((0, 1 << 20),)),
            64))), "", True
    return message(P.DEVICE_RESET), "", True


def bit_flipped(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randrange(1, 4)):
        bit = rng.randrange(len(data) * 8)
        data[bit >> 3] ^= 1 << (bit & 7)
    return bytes(data)


class Fuzzer:
    """A seeded client that never stops: it reconnects whenever the device drops it."""

    def __init__(self, path: str, seed: int):
        self.path = path
        self.rng = random.Random(seed)
        self.sock: socket.socket | None = None
        self.received = bytearray()
        self.messages = 0
        self.connections = 0
        self.drops = 0          # connections the device closed
        self.stalls = 0         # connections abandoned because a message stayed unanswered
        self.kinds: dict = {}

    # --- connection ---------------------------------------------------------------------

    def connect(self) -> None:
        deadline = time.monotonic() + 10.0
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.path)
                break
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.ECONNREFUSED, errno.EAGAIN, errno.ENOENT) or time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
        self.sock = sock
        self.received.clear()
        self.connections += 1

    def disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, data: bytes, fds=()) -> bool:
        """False if the device already dropped us."""
        try:
            if fds:
                sent = socket.send_fds(self.sock, [data], list(fds))
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except OSError:
            return False
        self.messages += 1
        return True

    def await_reply(self, wait: float = REPLY_WAIT) -> str:
        """"reply" once a whole frame arrived, "closed" if the device dropped us, "stalled"
        if nothing complete came within `wait`."""
        deadline = time.monotonic() + wait
        while True:
            if len(self.received) >= P.HEADER_SIZE:
                size = P.HEADER.unpack_from(self.received)[2]
                if size < P.HEADER_SIZE:
                    return "closed"
                if len(self.received) >= size:
                    del self.received[:size]
                    return "reply"
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                return "stalled"
            try:
                data, ancdata, _flags, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4))
            except OSError:
                return "closed"
            for level, kind, fds in ancdata:          # the device sends none today; never keep any
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    for fd in array.array("i", fds[:len(fds) - len(fds) % 4]):
                        os.close(fd)
            if not data:
                return "closed"
            self.received += data

    # --- one connection's traffic -------------------------------------------------------

    def session(self, budget: int) -> None:
        """Connect, negotiate (or not), then up to `budget` messages; ends when the device
        drops us, a message stalls, or the budget is spent."""
        rng = self.rng
        self.connect()
        try:
            start = self.messages
            frame = version_message(rng)
            if rng.random() < 0.1:
                frame = bit_flipped(frame, rng)
                self._count("bitflip-version")
            if not self.send(frame) or not self._settle(self.await_reply()):
                return
            while self.messages - start < budget:
                if not self._one(rng):
                    return
        finally:
            self.disconnect()

    def _settle(self, outcome: str) -> bool:
        if outcome == "closed":
            self.drops += 1
        elif outcome == "stalled":
            self.stalls += 1
        return outcome == "reply"

    def _count(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def _one(self, rng: random.Random) -> bool:
        """One message of a random kind; False once the connection is over."""
        roll = rng.random()
        frame, fd_kind, replies = valid_message(rng)
        fds = []
        try:
            if fd_kind == "eventfd":
                fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            elif fd_kind == "memfd":
                fd = os.memfd_create("soak-guest-ram", os.MFD_CLOEXEC)
                os.ftruncate(fd, 1 << 16)
                fds.append(fd)
            if roll < 0.45:
                self._count("valid")
                if not self.send(frame, fds):
                    return self._settle("closed")
                return self._settle(self.await_reply()) if replies else True
            if roll < 0.80:
                self._count("bitflip")
                if not self.send(bit_flipped(frame, rng), fds):
                    return self._settle("closed")
                return self._settle(self.await_reply())
            if roll < 0.86:
                self._count("truncated")
                self.send(frame[:rng.randrange(1, len(frame))], fds)
                return False                        # the rest never comes: hang up
            if roll < 0.90:
                self._count("huge-size")
                return self._huge(rng)
            if roll < 0.94:
                self._count("too-many-fds")
                extra = os.eventfd(0, os.EFD_CLOEXEC)
                try:
                    sent = self.send(frame, [extra] * rng.randrange(P.MAX_MSG_FDS + 1, 250))
                finally:
                    os.close(extra)
                return self._settle(self.await_reply() if sent else "closed")
            if roll < 0.97:
                self._count("unexpected-fds")
                extra = os.eventfd(0, os.EFD_CLOEXEC)
                try:
                    sent = self.send(frame, [extra] * rng.randrange(1, P.MAX_MSG_FDS + 1))
                finally:
                    os.close(extra)
                return self._settle(self.await_reply() if sent else "closed")
            self._count("random-bytes")
            if not self.send(rng.randbytes(rng.randrange(1, 256))):
                return self._settle("closed")
            return self._settle(self.await_reply())
        finally:
            for fd in fds:
                os.close(fd)

    def _huge(self, rng: random.Random) -> bool:
        """A declared size past the limit, or a maximal frame that is sent only partly or whole."""
        style = rng.randrange(4)
        if style == 0:                                  # beyond the limit: must be refused at once
            size = rng.choice((P.MAX_MESSAGE_SIZE + 1, 0x7FFFFFFF, 0xFFFFFFFF))
            self.send(P.HEADER.pack(1, P.REGION_WRITE, size, 0, 0) + bytes(rng.randrange(0, 64)))
            return self._settle(self.await_reply(0.2))
        count = P.MAX_MESSAGE_SIZE - P.HEADER_SIZE - P.REGION_ACCESS.size
        head = P.HEADER.pack(1, P.REGION_WRITE, P.MAX_MESSAGE_SIZE, 0, 0) + P.REGION_ACCESS.pack(0, BAR2, count)
        if style == 1:                                  # the header alone, then hang up
            self.send(head)
            return False
        if style == 2:                                  # part of the body, then hang up
            self.send(head + bytes(rng.randrange(1, count)))
            return False
        self.send(head + bytes(count))                  # whole: refused (BAR2 is 256 bytes)
        return self._settle(self.await_reply(1.0))

    def run(self, messages: int, min_connections: int) -> None:
        """Send about `messages` messages over at least `min_connections` connections."""
        per_connection = max(messages // max(min_connections, 1), 1)
        target = self.messages + messages
        while self.messages < target:
            self.session(min(self.rng.randrange(1, 2 * per_connection), target - self.messages))


# --- the soak ---------------------------------------------------------------------------

def soak(variant: str, messages: int, connections: int, samples: int, warmup: float, seed: int,
         report=print) -> dict:
    """Run the fuzzer against one device; its samples and verdict."""
    scratch = tempfile.mkdtemp(prefix="soak-")
    path = os.path.join(scratch, "idio16.sock")
    device = Device(variant, path)
    curve = []
    failures = []
    started = time.monotonic()
    try:
        device.wait_ready()
        fuzzer = Fuzzer(path, seed)
        step = max(messages // samples, 1)
        step_connections = max(connections // samples, 1)

        def sample(sent: int) -> None:
            why = answered(path)
            point = {"messages": fuzzer.messages, "connections": fuzzer.connections, "seconds":
                     round(time.monotonic() - started, 1), "answered": why is None}
            if device.alive():
                point.update(settled_usage(device.pid, curve[0]["fds"] if curve else None))
            else:
                why = why or "device exited"
                point["answered"] = False
            if why is not None:
                failures.append(f"not answered after {fuzzer.messages} messages: {why}")
            curve.append(point)
            report(f"  {variant:6} {point['messages']:>8} msgs {point['connections']:>7} conns  "
                   f"RSS {point.get('rss_kb', 0) / 1024:6.1f} MiB  VmData {point.get('data_kb', 0) / 1024:6.1f} MiB  "
                   f"fds {point.get('fds', '-'):>3}  {'answered' if point['answered'] else 'NOT ANSWERED: ' + why}")

        sample(0)
        for _ in range(samples):
            if not device.alive():
                break
            fuzzer.run(step, step_connections)
            sample(fuzzer.messages)
        elapsed = time.monotonic() - started
        stats = {"messages": fuzzer.messages, "connections": fuzzer.connections, "drops": fuzzer.drops,
                 "stalls": fuzzer.stalls, "kinds": fuzzer.kinds, "seconds": round(elapsed, 1)}
    except (RuntimeError, OSError) as exc:
        failures.append(f"soak aborted: {exc}")
        stats = {}
    finally:
        alive = device.pid is not None and device.alive()
        code = device.stop()
        errors = device.errors()
        device.close()
    return {"variant": variant, "curve": curve, **stats, **verdict(curve, warmup, failures, alive),
            "exit_status": code, "tracebacks": errors.count("Traceback"),
            "memory_errors": errors.count("MemoryError")}


def verdict(curve: list, warmup: float, failures: list, alive: bool) -> dict:
    measured = [point for point in curve if "data_kb" in point]
    if len(measured) < 3:
        return {"flat": False, "fds_leaked": None, "answered_all": False, "alive": alive,
                "failures": failures + ["too few samples"], "ok": False}
    after = [point for point in measured[1:] if point["messages"] >= warmup * measured[-1]["messages"]] or measured[-2:]
    base = after[0]
    data_growth = max(point["data_kb"] for point in after) - base["data_kb"]
    rss_growth = max(point["rss_kb"] for point in after) - base["rss_kb"]
    fds_leaked = max(point["fds"] for point in measured) - measured[0]["fds"]
    answered_all = all(point["answered"] for point in curve)
    flat = data_growth < GROWTH_LIMIT_KB and rss_growth < GROWTH_LIMIT_KB
    return {"data_growth_kb": data_growth, "rss_growth_kb": rss_growth, "fds_leaked": fds_leaked,
            "flat": flat, "answered_all": answered_all, "alive": alive, "failures": failures,
            "ok": flat and fds_leaked == 0 and answered_all and alive and not failures}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="messages per variant (default 100,000)")
    parser.add_argument("--connections", type=int, default=10_000, help="at least this many connections")
    parser.add_argument("--samples", type=int, default=20, help="memory/fd samples and service checks")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the run before growth is judged")
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: jailer, bare")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures here")
    options = parser.parse_args(argv)
    variants = [v for v in options.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    results = []
    for variant in variants:
        print(f"{variant}: {options.messages} messages, >= {options.connections} connections, "
              f"{options.samples} samples (seed {options.seed})")
        results.append(soak(variant, options.messages, options.connections, options.samples,
                            options.warmup, options.seed))
    print()
    print("| variant | messages | connections | dropped | stalled | msgs/s | VmData growth | RSS growth "
          "| fds leaked | answered | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rate = r.get("messages", 0) / r["seconds"] if r.get("seconds") else 0
        print(f"| {r['variant']} | {r.get('messages', 0)} | {r.get('connections', 0)} | {r.get('drops', 0)} "
              f"| {r.get('stalls', 0)} | {rate:.0f} | {r.get('data_growth_kb', 0) / 1024:.2f} MiB "
              f"| {r.get('rss_growth_kb', 0) / 1024:.2f} MiB | {r['fds_leaked']} "
              f"| {'every check' if r['answered_all'] else 'NO'} | {'flat' if r['ok'] else 'FAIL'} |")
        for failure in r["failures"][:5]:
            print(f"    {r['variant']}: {failure}")
    rates = {r["variant"]: r.get("messages", 0) / r["seconds"] for r in results if r.get("seconds")}
    if "jailer" in rates and "bare" in rates and rates["bare"]:
        print(f"\nmessages/s jailer/bare: {rates['jailer'] / rates['bare']:.2f}")
    if options.json:
        with open(options.json, "w") as out:
            json.dump({"options": vars(options), "results": results}, out, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
