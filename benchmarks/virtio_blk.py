"""Block I/O of a real Linux guest on a virtio-blk PCI disk: QEMU's own in-process
virtio-blk-pci against the bundled virtio-blk device served over vfio-user, jailed and bare.

    .venv/bin/python benchmarks/virtio_blk.py [--boots 2] [--runs 3] [--seconds 2] [--variants qemu,jailed,bare]
                                              [--size 512M] [--ram 256M] [--kernel PATH] [--json FILE]

One raw disk image (--size, filled with blkbench's pattern: real data, no holes) is made in a
temporary directory, and benchmarks/blkbench.c is compiled there with `gcc -O2 -static`. The
guest is the QEMU and kernel of tests/guest.py (the peers' QEMU 10.2.2, TCG, and 6.12, or
--kernel / JAILER_GUEST_KERNEL) with an initramfs holding busybox, the virtio_pci and
virtio_blk modules and blkbench; its /init finds /dev/vda, reports its size, runs --runs
rounds of

    blkbench /dev/vda seqread              1 MiB requests, one in flight
    blkbench /dev/vda seqwrite             1 MiB requests, one in flight
    blkbench /dev/vda randread --depth 1   4 KiB at random offsets, one in flight
    blkbench /dev/vda randread --depth 16  4 KiB at random offsets, 16 in flight (native AIO)

each for --seconds, O_DIRECT, then reads the whole disk back once checking the pattern
(blkbench verify: a device that loses or misplaces data fails the variant), and powers off.
Every figure is timed in the guest. The variants boot in turn, --boots times (qemu, jailed,
bare, qemu, ...: one guest's figures stay within a few per cent of each other, while two
boots of the same variant can differ by a third at queue depth 16). Each boots the same guest
with the same QEMU options: one vCPU, --ram of guest RAM from a shared memfd backend (vfio-user needs it; every
variant gets it so that they compare), the same accelerator.

  qemu    QEMU's own device: -drive file=IMG,format=raw,if=none,id=d0,cache=writeback,aio=threads
          -device virtio-blk-pci,drive=d0
  jailed  the bundled device jailed by its profile:
          .venv/bin/jailer run profiles/virtio-blk.toml --socket-path SOCK --disk IMG --status-fd N
          (QEMU starts once {"event": "ready"} is on the status fd), and QEMU gets
          -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":SOCK}}'
  bare    the same device without a sandbox, the image opened read-write by this harness and
          passed as fd N: .venv/bin/python -m devices.virtio_blk --socket-path SOCK --disk-fd N
          (QEMU starts once a vfio-user VERSION handshake succeeds on SOCK), QEMU as for jailed

A variant whose device or profile is missing is skipped, saying so. Printed: per variant the
medians over all rounds of all its boots of seq read MB/s, seq write MB/s (10^6 bytes/s), randread IOPS at
queue depth 1 and 16, then each figure's ratio to qemu's and whether it meets the target,
0.5x qemu. A variant that fails (the guest reports an I/O error or a wrong block, the device
exits) is reported and the others still run; the exit status is then 1.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from device_ready import stop, wait_ready  # noqa: E402
from guest import (ACCEL, BOOT_TIMEOUT, KERNELS, VDA_INIT_PRELUDE, Console, _stop_qemu, initramfs,  # noqa: E402
                   kernel_problem, qemu_command, qemu_problem, vfio_user_device, whole_file)

PROFILE = os.path.join(REPO, "profiles", "virtio-blk.toml")
DEVICE_MAIN = os.path.join(REPO, "devices", "virtio_blk", "__main__.py")
BLKBENCH_SOURCE = os.path.join(REPO, "benchmarks", "blkbench.c")
VENV = os.path.join(REPO, ".venv", "bin")
JAILER = [os.path.join(VENV, "jailer")] if os.path.exists(os.path.join(VENV, "jailer")) else [sys.executable, "-m", "jailer"]
PYTHON = os.path.join(VENV, "python") if os.path.exists(os.path.join(VENV, "python")) else sys.executable
DRIVERS = ["virtio_pci", "virtio_blk"]       # virtio_pci is built into 6.12, a module on 6.1
VARIANTS = ("qemu", "jailed", "bare")
TARGET = 0.5                                 # each figure at least half of QEMU's own device
READY_TIMEOUT = 30.0
PATTERN_BLOCK = 4096
# (key, blkbench arguments, the figure taken from its line, the unit printed)
TESTS = [("seqread", "seqread", "MBps", "MB/s"),
         ("seqwrite", "seqwrite", "MBps", "MB/s"),
         ("randread-qd1", "randread --depth 1", "iops", "IOPS"),
         ("randread-qd16", "randread --depth 16", "iops", "IOPS")]
TITLES = {"seqread": "seq read", "seqwrite": "seq write", "randread-qd1": "randread QD1",
          "randread-qd16": "randread QD16"}

GUEST_INIT = VDA_INIT_PRELUDE + r"""say "DISK sectors=$(cat /sys/block/vda/size) lbs=$(cat /sys/block/vda/queue/logical_block_size) pci=$(cat $pci/vendor):$(cat $pci/device) driver=$(basename $(readlink /sys/block/vda/device/driver))"
run=1
while [ $run -le @RUNS@ ]; do
    for test in @TESTS@; do
        out=$(blkbench /dev/vda $test --seconds @SECONDS@) || fail "blkbench $test exited $?"
        say "RESULT $run $out"
    done
    run=$((run + 1))
done
out=$(blkbench /dev/vda verify) || fail "blkbench verify exited $?"
say "VERIFY $out"
say "DONE"
poweroff -f
"""


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    match = re.fullmatch(r"(\d+)([KMG]?)", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text} (e.g. 512M)")
    return int(match[1]) * units.get(match[2], 1)


def make_image(path, size):
    """size bytes of blkbench's pattern: the 4 KiB block at offset OFF holds OFF (u64 LE),
    b"BLKBENCH", then byte i = i % 256 (see blkbench.c), written out (no holes)."""
    fill = (bytes(range(256)) * (PATTERN_BLOCK // 256))[16:]
    per_mib = (1 << 20) // PATTERN_BLOCK
    with open(path, "wb") as f:
        for mib in range(size >> 20):
            base = mib << 20
            f.write(b"".join(struct.pack("<Q", base + i * PATTERN_BLOCK) + b"BLKBENCH" + fill for i in range(per_mib)))
    os.chmod(path, 0o600)


def build_blkbench(scratch):
    binary = os.path.join(scratch, "blkbench")
    subprocess.run(["gcc", "-O2", "-static", "-Wall", "-o", binary, BLKBENCH_SOURCE], check=True)
    return binary


def guest_init(runs, seconds):
    tests = " ".join(f'"{arguments}"' for _, arguments, _, _ in TESTS)
    return GUEST_INIT.replace("@RUNS@", str(runs)).replace("@TESTS@", tests).replace("@SECONDS@", str(seconds))


def skip_reason(variant, vfio_user_missing):
    """Why a variant cannot run here (QEMU's own device always can, once a guest can)."""
    if variant == "qemu":
        return None
    if vfio_user_missing:
        return vfio_user_missing
    if not os.path.exists(DEVICE_MAIN):
        return f"no {os.path.relpath(DEVICE_MAIN, REPO)}: the bundled virtio-blk device is not there yet"
    if variant == "jailed" and not os.path.exists(PROFILE):
        return f"no {os.path.relpath(PROFILE, REPO)}: the virtio-blk profile is not there yet"
    return None


class Device:
    """The vfio-user device of the jailed or bare variant, running until stop()."""

    def __init__(self, variant, scratch, image):
        self.variant = variant
        self.socket = os.path.join(scratch, f"{variant}.sock")
        self.stderr = open(os.path.join(scratch, f"{variant}.stderr"), "w+")
        self.status = None
        disk_fd = None
        if variant == "jailed":
            # O_APPEND: jailer writes through the same open file that events() reads
            self.status = tempfile.TemporaryFile("a+")
            argv = [*JAILER, "run", PROFILE, "--socket-path", self.socket, "--disk", image,
                    "--status-fd", str(self.status.fileno())]
            pass_fds = [self.status.fileno()]
        else:
            disk_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
            argv = [PYTHON, "-m", "devices.virtio_blk", "--socket-path", self.socket, "--disk-fd", str(disk_fd)]
            pass_fds = [disk_fd]
        self.argv = argv
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=self.stderr, pass_fds=pass_fds, cwd=REPO)
        finally:
            if disk_fd is not None:
                os.close(disk_fd)           # the device holds its own copy

    def events(self):
        return [json.loads(line) for line in whole_file(self.status).splitlines() if line.strip()]

    def errors(self, lines=15):
        return "\n".join(whole_file(self.stderr).splitlines()[-lines:])

    def wait_ready(self):
        """jailed: the {"event": "ready"} status line; bare: a served VERSION handshake."""
        if self.variant == "bare":
            try:
                wait_ready(self.socket, self.proc)
            except RuntimeError as error:
                raise RuntimeError(f"{error}\n{self.errors()}") from None
            return
        deadline = time.monotonic() + READY_TIMEOUT
        while not any(event.get("event") == "ready" for event in self.events()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"jailer exited {self.proc.returncode} before ready:\n{self.errors()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no ready event within {READY_TIMEOUT} s:\n{self.errors()}")
            time.sleep(0.01)

    def stop(self):
        """The exit status (SIGTERM, SIGKILL after 10 s); None when it had already exited."""
        gone = self.proc.poll()
        status = stop(self.proc)
        self.stderr.close()
        if self.status is not None:
            self.status.close()
        return None if gone is not None else status


def parse_result(text):
    """"RUN BLKBENCH mode=... k=v ..." -> (run, {k: v})."""
    run, tag, *fields = text.split()
    if tag != "BLKBENCH":
        raise RuntimeError(f"not a blkbench line: {text}")
    values = dict(field.split("=", 1) for field in fields)
    return int(run), {key: (value if key == "mode" else float(value)) for key, value in values.items()}


def run_variant(variant, scratch, image, image_size, kernel, initrd, options):
    """One boot: {"figures": {test: [per run]}, "boot_s", "bench_s", "guest_s", ...}; RuntimeError
    on a failure."""
    device = None
    if variant == "qemu":
        extra = ["-drive", f"file={image},format=raw,if=none,id=d0,cache=writeback,aio=threads",
                 "-device", "virtio-blk-pci,drive=d0"]
    else:
        device = Device(variant, scratch, image)
        extra = vfio_user_device(device.socket)
    qemu = None
    try:
        if device:
            device.wait_ready()
        command = qemu_command(initrd, kernel, extra, ram=options.ram)
        start = time.monotonic()
        qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        console = Console(qemu)
        per_test = options.seconds * 5 + 60           # a generous bound, whatever the device's speed
        try:
            disk = dict(field.split("=", 1) for field in console.expect("DISK", BOOT_TIMEOUT).split())
            booted = time.monotonic()
            if int(disk["sectors"]) * 512 != image_size:
                raise RuntimeError(f"the guest sees {int(disk['sectors']) * 512} bytes, the image has {image_size}")
            figures = {key: [] for key, _, _, _ in TESTS}
            guest_seconds = 0.0
            for run in range(1, options.runs + 1):
                for key, _, figure, _ in TESTS:
                    got_run, values = parse_result(console.expect("RESULT", per_test))
                    expected_depth = 16 if key == "randread-qd16" else 1
                    if got_run != run or values["mode"] != key.split("-")[0] or values["depth"] != expected_depth:
                        raise RuntimeError(f"unexpected result for run {run} {key}: {values}")
                    figures[key].append(values[figure])
                    guest_seconds += values["seconds"]
            _, verify = parse_result("0 " + console.expect("VERIFY", 600))
            console.expect("DONE", 60)
            code = qemu.wait(60)
        except AssertionError as failure:          # Console's: a FAIL report, QEMU gone, a timeout
            raise RuntimeError(str(failure)) from None
        if code != 0:
            raise RuntimeError(f"QEMU exited {code}:\n{console.transcript()}")
        finished = time.monotonic()
        return {"figures": figures, "disk": disk, "verify": verify, "boot_s": booted - start,
                "bench_s": finished - booted, "guest_s": guest_seconds, "wall_s": finished - start}
    finally:
        if qemu is not None:
            _stop_qemu(qemu)
        if device:
            errors = device.errors()
            status = device.stop()
            if status not in (None, 0):
                print(f"  {variant}: the device exited {status} on SIGTERM:\n{errors}", file=sys.stderr)


def choose_kernel(given):
    if given:
        return given
    newest = [kernel for kernel in KERNELS if os.path.basename(kernel).startswith("vmlinuz-6.12")]
    return (newest or KERNELS or [None])[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=2, help="boots of each variant, interleaved")
    parser.add_argument("--runs", type=int, default=3, help="rounds of the four measurements in each boot")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each measurement (in the guest)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of qemu,jailed,bare")
    parser.add_argument("--size", type=parse_size, default=512 << 20, help="disk image size (default 512M)")
    parser.add_argument("--ram", default="256M", help="guest RAM, as QEMU's -m takes it (default 256M)")
    parser.add_argument("--kernel", help="guest kernel (default: 6.12 from the peers, or JAILER_GUEST_KERNEL)")
    parser.add_argument("--json", metavar="FILE")
    options = parser.parse_args()
    variants = [name for name in options.variants.split(",") if name]
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        parser.error(f"--variants takes a comma-separated list of {', '.join(VARIANTS)}")
    if options.size < 1 << 20 or options.size % (1 << 20):
        parser.error("--size must be a whole number of MiB")
    if options.boots < 1 or options.runs < 1 or options.seconds <= 0:
        parser.error("--boots, --runs and --seconds must be positive")
    kernel = choose_kernel(options.kernel)
    missing = qemu_problem(["virtio-blk-pci"]) or (kernel is None and "no guest kernel") or \
        kernel_problem(kernel, DRIVERS) or (not shutil.which("gcc") and "no gcc to build blkbench")
    if missing:
        sys.exit(f"cannot run a guest here: {missing}")
    vfio_user_missing = qemu_problem(["vfio-user-pci"])

    scratch = tempfile.mkdtemp(prefix="jailer-virtio-blk-bench-")
    os.chmod(scratch, 0o755)
    boots, skipped, failed = {}, {}, {}       # variant -> [one boot's result]; -> why
    began = time.monotonic()
    try:
        image = os.path.join(scratch, "disk.img")
        make_image(image, options.size)
        binary = build_blkbench(scratch)
        with open(binary, "rb") as f:
            blkbench = f.read()
        initrd = initramfs(scratch, kernel, guest_init(options.runs, options.seconds), DRIVERS,
                           {"bin/blkbench": (0o755, blkbench)})
        print(f"guest {os.path.basename(kernel)}, accel {ACCEL}, 1 vCPU, {options.ram} RAM (shared memfd), "
              f"{options.size >> 20} MiB raw image; {options.boots} boots per variant, each {options.runs} rounds "
              f"of {options.seconds:g} s measurements")
        for variant in variants:
            if reason := skip_reason(variant, vfio_user_missing):
                skipped[variant] = reason
                print(f"{variant}: skipped: {reason}")
        for number in range(1, options.boots + 1):
            for variant in (name for name in variants if name not in skipped and name not in failed):
                try:
                    result = run_variant(variant, scratch, image, options.size, kernel, initrd, options)
                except RuntimeError as error:
                    failed[variant] = str(error)
                    print(f"{variant} boot {number}: FAILED: {error}")
                    continue
                boots.setdefault(variant, []).append(result)
                disk = result["disk"]
                print(f"{variant} boot {number}: {result['boot_s']:.1f} s to the disk, benchmark "
                      f"{result['bench_s']:.1f} s (guest-timed {result['guest_s']:.1f} s), disk pci {disk['pci']} "
                      f"driver {disk['driver']}, verify of {result['verify']['bytes'] / 2**20:.0f} MiB: "
                      f"{result['verify']['bad']:.0f} bad blocks")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    results = {}
    for variant, runs in boots.items():
        if variant in failed:
            continue
        figures = {key: [value for boot in runs for value in boot["figures"][key]] for key, _, _, _ in TESTS}
        results[variant] = {"figures": figures, "boots": runs,
                            "medians": {key: statistics.median(values) for key, values in figures.items()}}

    if results:
        print()
        print(f"{'variant':8}" + "".join(f"{TITLES[key] + ' ' + unit:>20}" for key, _, _, unit in TESTS))
        for variant, result in results.items():
            print(f"{variant:8}" + "".join(f"{result['medians'][key]:20.1f}" for key, _, _, _ in TESTS))
            if len(result["figures"]["seqread"]) > 1:
                spans = [f"{min(result['figures'][key]):.1f}-{max(result['figures'][key]):.1f}"
                         for key, _, _, _ in TESTS]
                print(f"{'  range':8}" + "".join(f"{span:>20}" for span in spans))
    ratios = {}
    if "qemu" in results:
        for variant in (name for name in results if name != "qemu"):
            ratios[variant] = {key: results[variant]["medians"][key] / results["qemu"]["medians"][key]
                               for key, _, _, _ in TESTS}
            print(f"{variant + '/qemu':8}" + "".join(f"{ratios[variant][key]:20.2f}" for key, _, _, _ in TESTS))
        for variant, figures in ratios.items():
            for key, ratio in figures.items():
                verdict = "meets" if ratio >= TARGET else "MISSES"
                print(f"{variant:8} {TITLES[key]:14} {ratio:5.2f}x qemu: {verdict} the {TARGET}x target")
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    if options.json:
        with open(options.json, "w") as f:
            json.dump({"kernel": kernel, "accel": ACCEL, "ram": options.ram, "size": options.size,
                       "boots": options.boots, "runs": options.runs, "seconds": options.seconds, "results": results, "ratios": ratios,
                       "target": TARGET, "skipped": skipped, "failed": failed}, f, indent=1)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
