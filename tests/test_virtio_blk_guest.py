"""The bundled virtio-blk device (devices/virtio_blk), jailed by profiles/virtio-blk.toml, under
a real QEMU (vfio-user-pci) with a real Linux guest whose own virtio_blk driver binds it and
puts an ext4 file system on it (issue 12). The image is checked on the host afterwards with
e2fsprogs (e2fsck, debugfs), never through the device:

- round trip: a fresh sparse image; boot 1 formats it in the guest (busybox mke2fs), mounts
  it as ext4, writes files of known content, discards the free space (fstrim), reports the
  files' sha256, syncs and unmounts; on the host e2fsck -fn finds the file system clean and
  debugfs reads the same contents; boot 2, on a new jailed device, mounts it again and reads
  the same checksums.
- SIGKILL: the guest writes a file to a journaled ext4 (made on the host), syncs (the disk
  is write-back, VIRTIO_BLK_F_FLUSH, so the journal commit flushes), reports SYNCED and keeps
  writing; the device is SIGKILLed from outside in the middle of that traffic. Once the
  journal is replayed on the host (e2fsck -p, as the next mount would) the file system is
  clean and the synced file is all there. jailer restarts the killed device (the profile's
  on-failure policy); that one is stopped with SIGTERM.
- read-only: `jailer run ... --read-only`; the guest sees a read-only disk (VIRTIO_BLK_F_RO:
  /sys/block/vda/ro is 1), raw writes fail (the guest kernel refuses them with EPERM, also
  after `blockdev --setrw`, so no write request reaches the device), `mount -o ro` reads the
  file the host put there, and the image stays byte for byte what it was.

Every device ends without a refused syscall (no seccomp event) and exits 0 on SIGTERM (but
for the killed one). Needs root (jailer opens the image with the caller's rights and builds
the sandbox as root), the QEMU and kernels of tests/guest.py (the peers' QEMU 10.2.2, TCG;
Debian 12's 6.1 and 6.12) and e2fsprogs; each is skipped, saying what is missing.

The round trip runs on both kernels (virtio_pci is a module on 6.1, built into 6.12), the
other two on 6.12 only: six boots in all, 65-75 s under TCG on 2 cores (about 90 s with
another TCG guest running beside).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from guest import (APPEND, KERNELS, VDA_INIT_PRELUDE, Console, _stop_qemu, initramfs, kernel_problem, qemu_command, qemu_problem,
                   vfio_user_device)
from test_e2e_jailed_device import jailed, scratch  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "profiles" / "virtio-blk.toml"
DRIVERS = ["virtio_pci", "virtio_blk", "ext4"]   # virtio_pci is built into 6.12, a module on 6.1
IMAGE_SIZE = 64 << 20
PCI_ID = "0x1af4:0x1042"                          # a modern (virtio 1.x) block device
READY_TIMEOUT = 30.0
STEP_TIMEOUT = 60.0

# What the guest writes in the round trip, each generated there by busybox; the host makes the
# same bytes to compare with.
FILES = {
    "small.txt": b"jailer virtio-blk round trip\n",
    "seq.txt": "".join(f"{i}\n" for i in range(1, 150001)).encode(),                 # seq 1 150000
    "big.bin": (b"0123456789abcdef jailer\n" * (3_000_000 // 24 + 1))[:3_000_000],    # yes ... | head -c
    "dir/nested.txt": "".join(f"{i}\n" for i in range(7, 70001, 7)).encode(),         # seq 7 7 70000
}
SYNCED_FILE = "synced.bin"          # the SIGKILL case: 2 MB of `yes "synced before the kill"`
SYNCED_CONTENT = (b"synced before the kill\n" * (2_000_000 // 23 + 1))[:2_000_000]
READ_ONLY_FILE = "host.bin"         # the read-only case: put there by the host
READ_ONLY_CONTENT = bytes(range(256)) * 4096 + b"written on the host\n"

# /init: load the modules, wait for /dev/vda, report what the guest sees of it (its PCI ids and
# driver, size, read-only flag, cache mode) and the kernel's lines about it, then do the step
# the kernel command line names (jailer_step=...).
GUEST_INIT = VDA_INIT_PRELUDE + r"""mkdir -p /mnt /tmp
say "DISK pci=$(cat $pci/vendor):$(cat $pci/device) pci_driver=$(basename $(readlink $pci/driver))" \
    "driver=$(basename $(readlink /sys/block/vda/device/driver)) sectors=$(cat /sys/block/vda/size)" \
    "ro=$(cat /sys/block/vda/ro) cache=$(tr ' ' _ < /sys/block/vda/queue/write_cache)"
dmesg | grep -E 'virtio|vda' | while read -r line; do say "DMESG $line"; done
say "DMESG-DONE"
sums() {
    out=
    for f in "$@"; do set -- $(sha256sum /mnt/$f) || fail "sha256sum $f"; out="$out $f=$1"; done
    say "SUMS$out"
}
files="small.txt seq.txt big.bin dir/nested.txt"
step=$(sed -n 's/.*jailer_step=\([a-z-]*\).*/\1/p' /proc/cmdline)
case "$step" in
format)
    mke2fs -F -b 4096 -L jailer /dev/vda > /dev/null || fail "mke2fs"
    mount -t ext4 /dev/vda /mnt || fail "mount"
    mkdir /mnt/dir
    echo "jailer virtio-blk round trip" > /mnt/small.txt || fail "write small.txt"
    seq 1 150000 > /mnt/seq.txt || fail "write seq.txt"
    yes "0123456789abcdef jailer" | head -c 3000000 > /mnt/big.bin || fail "write big.bin"
    seq 7 7 70000 > /mnt/dir/nested.txt || fail "write dir/nested.txt"
    # a file written and deleted, then the free space discarded (VIRTIO_BLK_T_DISCARD)
    yes "discarded" | head -c 1000000 > /mnt/gone.bin && sync && rm /mnt/gone.bin || fail "gone.bin"
    say "FSTRIM $(fstrim -v /mnt 2>&1)"
    sync || fail "sync"
    sums $files
    umount /mnt || fail "umount"
    say "UNMOUNTED"
    ;;
verify)
    mount -t ext4 /dev/vda /mnt || fail "mount"
    sums $files
    umount /mnt || fail "umount"
    say "UNMOUNTED"
    ;;
crash)
    mount -t ext4 /dev/vda /mnt || fail "mount"
    yes "synced before the kill" | head -c 2000000 > /mnt/synced.bin || fail "write synced.bin"
    sync || fail "sync"
    sums synced.bin
    say "SYNCED"
    # traffic until the device dies under it: nothing of it was flushed before SYNCED
    i=0
    while :; do
        i=$((i + 1))
        dd if=/dev/zero of=/mnt/noise.$((i % 4)) bs=64k count=8 conv=fsync 2>/dev/null
        say "NOISE $i $?"
    done
    ;;
read-only)
    dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/tmp/err
    say "RAW-WRITE $? $(tr '\n' ' ' < /tmp/err)"
    blockdev --setrw /dev/vda 2>/tmp/err
    say "SETRW $? ro=$(cat /sys/block/vda/ro) $(tr '\n' ' ' < /tmp/err)"
    dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/tmp/err
    say "RAW-WRITE-AFTER-SETRW $? $(tr '\n' ' ' < /tmp/err)"
    dmesg | grep -E 'vda' | while read -r line; do say "DMESG $line"; done
    say "DMESG-DONE"
    mount -t ext4 -o ro /dev/vda /mnt || fail "mount -o ro"
    sums host.bin
    umount /mnt || fail "umount"
    say "UNMOUNTED"
    ;;
*)
    fail "no jailer_step on the kernel command line"
    ;;
esac
poweroff -f
"""

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (jailer opens the image and builds the "
                                                             "sandbox as root)")


def _tool(name: str) -> str | None:
    """e2fsprogs' tools live in /sbin, which a user's PATH may lack."""
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _host_problem() -> str | None:
    if not PROFILE.exists():
        return f"no {PROFILE}"
    for tool in ("e2fsck", "debugfs", "mkfs.ext4"):
        if _tool(tool) is None:
            return f"no {tool} on the host (Debian: e2fsprogs)"
    return qemu_problem()


HOST_PROBLEM = _host_problem()
pytestmark = [pytest.mark.skipif(HOST_PROBLEM is not None, reason=str(HOST_PROBLEM)), NEEDS_ROOT]


def _kernel_param(kernel: str):
    problem = kernel_problem(kernel, DRIVERS, "CONFIG_VIRTIO_BLK and CONFIG_EXT4_FS")
    return pytest.param(kernel, id=Path(kernel).name.removeprefix("vmlinuz-"),
                        marks=pytest.mark.skipif(problem is not None, reason=str(problem)))


ALL_KERNELS = [_kernel_param(kernel) for kernel in KERNELS]
# the newest kernel only, for the cases whose driver path is the same on both
NEWEST_KERNEL = [_kernel_param(kernel) for kernel in
                 ([k for k in KERNELS if Path(k).name.startswith("vmlinuz-6.12")] or KERNELS)[-1:]]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def e2fsck(image: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("e2fsck"), *options, str(image)], check=False, capture_output=True, text=True,
                          timeout=120)


def debugfs_cat(image: Path, name: str) -> bytes:
    """The file's contents as debugfs reads them from the image (no kernel, no device)."""
    done = subprocess.run([_tool("debugfs"), "-R", f"cat /{name}", str(image)], check=False, capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"not found" not in done.stderr, f"/{name} is not in the image: {done.stderr.decode(errors='replace')}"
    return done.stdout


def host_image(scratch: Path, files: dict[str, bytes]) -> Path:
    """A journaled ext4 (the host's mkfs.ext4 defaults: metadata_csum, 64bit...) holding files."""
    image = scratch / "host.img"
    subprocess.run([_tool("mkfs.ext4"), "-q", "-F", "-L", "jailer-host", str(image), f"{IMAGE_SIZE >> 20}M"],
                   check=True, capture_output=True, timeout=120)
    for name, data in files.items():
        source = scratch / f"source-{name}"
        source.write_bytes(data)
        done = subprocess.run([_tool("debugfs"), "-w", "-R", f"write {source} /{name}", str(image)],
                              check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "rror" not in done.stderr, done.stderr
    assert e2fsck(image, "-fn").returncode == 0
    os.chmod(image, 0o600)
    return image


def of_kind(device, kind: str) -> list[dict]:
    return [event for event in device.events() if event["event"] == kind]


def wait_events(device, predicate, what: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate(device.events()):
        assert device.proc.poll() is None, f"jailer exited {device.proc.returncode} before {what}: {device.errors()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s: {device.events()}\n{device.errors()}"
        time.sleep(0.02)


def start_disk(jailed, scratch: Path, image: Path, name: str, *options: str):
    """The jailed device serving image on scratch/NAME.sock, once ready."""
    sock = scratch / f"{name}.sock"
    device = jailed("root", scratch, "--socket-path", str(sock), "--disk", str(image), *options, profile=PROFILE)
    wait_events(device, lambda events: any(e["event"] == "ready" for e in events), "ready event")
    return device, sock


def boot(kernel: str, initrd: Path, sock: Path, step: str):
    command = qemu_command(initrd, kernel, vfio_user_device(str(sock)), append=f"{APPEND} jailer_step={step}")
    qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return qemu, Console(qemu)


def fields(report: str) -> dict[str, str]:
    return dict(field.split("=", 1) for field in report.split())


def check_disk(console: Console, read_only: bool) -> dict[str, str]:
    """The guest's DISK report: the guest's own virtio_blk driver on a 1af4:1042 PCI function,
    and the kernel's line about the disk it found."""
    disk = fields(console.expect("DISK"))
    assert disk["pci"] == PCI_ID, disk
    assert disk["pci_driver"] == "virtio-pci" and disk["driver"] == "virtio_blk", disk
    assert int(disk["sectors"]) * 512 == IMAGE_SIZE, disk
    assert disk["ro"] == ("1" if read_only else "0"), disk
    assert disk["cache"] == "write_back", disk      # VIRTIO_BLK_F_FLUSH: the guest sends flushes
    print(f"DISK {disk}")
    assert any("virtio_blk" in line and "[vda]" in line for line in dmesg(console)), console.transcript()
    return disk


def dmesg(console: Console) -> list[str]:
    """The guest's kernel lines it reported (DMESG ... up to its next DMESG-DONE), printed."""
    console.expect("DMESG-DONE")
    lines = [report[len("DMESG "):] for report in console.reports if report.startswith("DMESG ")]
    console.reports = [report for report in console.reports if not report.startswith("DMESG ")]
    for line in lines:
        print(f"guest dmesg: {line}")
    return lines


def finish(device) -> None:
    """No refused syscall, and a clean exit on SIGTERM."""
    refused = of_kind(device, "seccomp")
    assert not refused, f"the profile's allowlist refused the device: {refused}"
    assert device.stop() == 0, device.errors()


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_ext4_written_by_the_guest_is_on_the_image_and_reads_back_in_a_new_boot(kernel, scratch, jailed):
    expected = {name: sha256(data) for name, data in FILES.items()}
    image = scratch / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)                      # sparse
    os.chmod(image, 0o600)
    initrd = initramfs(scratch, kernel, GUEST_INIT, DRIVERS)

    # --- boot 1: mke2fs, mount -t ext4, write, fstrim, sync, umount ----------------------------------
    def trimmed(console):
        report = console.expect("FSTRIM", STEP_TIMEOUT)
        print(f"fstrim: {report}")
        assert report.startswith("/mnt:") and "bytes trimmed" in report, report

    boot_on_a_new_device(jailed, scratch, image, kernel, initrd, "format", expected, before_sums=trimmed)

    # --- the host reads the image: a clean file system with the same files ------------------------
    checked = e2fsck(image, "-fn")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for name in FILES:
        assert sha256(debugfs_cat(image, name)) == expected[name], name

    # --- boot 2, a new jailed device on the same image: the same checksums -------------------------
    boot_on_a_new_device(jailed, scratch, image, kernel, initrd, "verify", expected)
    checked = e2fsck(image, "-fn")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def boot_on_a_new_device(jailed, scratch: Path, image: Path, kernel: str, initrd: Path, step: str, expected: dict,
                         before_sums=lambda console: None) -> None:
    """A guest boot against a new jailed device on `image`: its disk checks, what the step adds
    (before_sums), the checksums it reports, then a clean unmount and exit, and the device stopped."""
    device, sock = start_disk(jailed, scratch, image, step)
    qemu, console = boot(kernel, initrd, sock, step)
    try:
        check_disk(console, read_only=False)
        before_sums(console)
        assert fields(console.expect("SUMS", STEP_TIMEOUT)) == expected
        console.expect("UNMOUNTED", STEP_TIMEOUT)
        assert qemu.wait(STEP_TIMEOUT) == 0, console.transcript()
    finally:
        _stop_qemu(qemu)
    finish(device)


def _device_pid(device) -> int:
    """The device's host pid: the sandbox's pid 1 (pid1 = "program"), from the started event."""
    pid = of_kind(device, "started")[-1]["pid"]
    assert b"devices.virtio_blk" in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
    return pid


@pytest.mark.parametrize("kernel", NEWEST_KERNEL)
def test_a_sigkill_after_a_flush_loses_nothing_flushed(kernel, scratch, jailed):
    image = host_image(scratch, {})
    initrd = initramfs(scratch, kernel, GUEST_INIT, DRIVERS)
    device, sock = start_disk(jailed, scratch, image, "crash")
    qemu, console = boot(kernel, initrd, sock, "crash")
    try:
        check_disk(console, read_only=False)
        assert fields(console.expect("SUMS", STEP_TIMEOUT)) == {SYNCED_FILE: sha256(SYNCED_CONTENT)}
        console.expect("SYNCED", STEP_TIMEOUT)
        console.expect("NOISE", STEP_TIMEOUT)       # the guest is writing (and flushing) again
        os.kill(_device_pid(device), signal.SIGKILL)
        print(f"SIGKILL after {sum('GUEST: NOISE' in line for line in console.seen)} rounds of noise")
        # jailer sees it killed and restarts it (on-failure) with the same disk fd
        wait_events(device, lambda events: [e["event"] for e in events if e["event"] in ("ready", "exited")]
                    == ["ready", "exited", "ready"], "restart")
    finally:
        _stop_qemu(qemu)
    assert of_kind(device, "exited")[0] == {"event": "exited", "signal": signal.SIGKILL}
    finish(device)                                  # the restarted device: no refusal, exit 0

    # the journal holds what sync committed: replay it (as the next mount would), then check
    replayed = e2fsck(image, "-fp")
    print(f"e2fsck -fp after the kill: exit {replayed.returncode}: {replayed.stdout.strip()} {replayed.stderr.strip()}")
    assert replayed.returncode in (0, 1), replayed.stdout + replayed.stderr      # 1: replayed, fixed
    checked = e2fsck(image, "-fn")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert debugfs_cat(image, SYNCED_FILE) == SYNCED_CONTENT


@pytest.mark.parametrize("kernel", NEWEST_KERNEL)
def test_a_read_only_image_is_read_only_to_the_guest_and_unchanged(kernel, scratch, jailed):
    image = host_image(scratch, {READ_ONLY_FILE: READ_ONLY_CONTENT})
    before = sha256(image.read_bytes())
    initrd = initramfs(scratch, kernel, GUEST_INIT, DRIVERS)
    device, sock = start_disk(jailed, scratch, image, "read-only", "--read-only")
    qemu, console = boot(kernel, initrd, sock, "read-only")
    try:
        check_disk(console, read_only=True)
        code, _, error = console.expect("RAW-WRITE", STEP_TIMEOUT).partition(" ")
        print(f"raw write: exit {code}: {error}")
        assert code != "0", f"a raw write to the read-only disk succeeded:\n{console.transcript()}"
        setrw = console.expect("SETRW", STEP_TIMEOUT)
        code, _, error = console.expect("RAW-WRITE-AFTER-SETRW", STEP_TIMEOUT).partition(" ")
        print(f"blockdev --setrw: {setrw}; raw write then: exit {code}: {error}")
        assert code != "0", f"a raw write after blockdev --setrw succeeded:\n{console.transcript()}"
        dmesg(console)
        assert fields(console.expect("SUMS", STEP_TIMEOUT)) == {READ_ONLY_FILE: sha256(READ_ONLY_CONTENT)}
        console.expect("UNMOUNTED", STEP_TIMEOUT)
        assert qemu.wait(STEP_TIMEOUT) == 0, console.transcript()
    finally:
        _stop_qemu(qemu)
    finish(device)
    assert sha256(image.read_bytes()) == before, "the read-only image changed"
