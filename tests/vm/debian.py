"""A Debian 12 guest with systemd as pid 1 and the unified cgroup v2 hierarchy, with jailer
installed, for tests that need a real init: systemd-run, systemctl and jailer under systemd, on a
kernel and a cgroup tree of their own.

image() builds, once, a raw ext4 root disk: `debootstrap --variant=minbase bookworm` with what
systemd needs to boot, then the project's own ./setup.sh run in a chroot on a copy of the
checkout at /opt/jailer (so /opt/jailer/.venv exists as on any host). The disk is cached under
$JAILER_TEST_VM_CACHE (default /var/cache/jailer-test-vm), keyed by a hash of this file,
setup.sh, pyproject.toml and the kernel version.

Guest boots it under QEMU (TCG is enough) with the newest kernel of ../shared/peers/guest whose
virtio_console is built in (6.12): a busybox initramfs loads virtio_blk and ext4, mounts the disk
and switch_roots into systemd. Each boot attaches the current checkout on a second, read-only
disk, which the guest copies over /opt/jailer (keeping .venv) before the agent starts, and
builds jailer-monitor from with setup.sh's own commands when its monitor.c is not the image's:
the tests run the code under test, not the copy baked into the image.

The agent (jailer-test-agent.service, after multi-user.target) serves a virtio-serial port, so
the console stays a log. Every message is one line, MARKER and a JSON object: the host sends
{"id", "command", "timeout", "stdin"}, the agent runs `bash -c command` and answers {"id",
"status", "stdout", "stderr", "timed_out"}, byte strings in base64; it says {"ready": true}
when it starts. Lines without the marker are ignored on both sides.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from test_qemu_guest import (
    ACCEL,
    BUSYBOX,
    DATADIRS,
    KERNELS,
    QEMU,
    _modules_directory,
    newc_archive,
)

PROJECT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
# what systemd needs to boot and the agent to run; setup.sh installs the project's own packages
# libpam-systemd and dbus-user-session: a user manager (user@.service) with its bus, for the
# tests of an unprivileged caller in a delegated subtree (systemd-run --user)
BOOT_PACKAGES = ("systemd", "systemd-sysv", "udev", "dbus", "kmod", "python3", "python3-venv", "libpam-systemd",
                 "dbus-user-session")
BUILD_TOOLS = {"debootstrap": "debootstrap", "unshare": "util-linux", "chroot": "coreutils",
               "mkfs.ext4": "e2fsprogs"}
CHECKOUT_ENTRIES = ("jailer", "devices", "profiles", "tests", "man", "share", "docs", "README.md",
                    "pyproject.toml", "setup.py", "setup.sh")
NOT_COPIED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis",
                                    "jailer-monitor", "jailer-monitor.new")
INSTALL_DIRECTORY = "opt/jailer"
# a build step's own mount and pid namespaces: its mounts vanish with it, and its whole process
# tree dies with it when it is killed (a timeout)
ISOLATED = ["unshare", "--mount", "--pid", "--fork", "--kill-child"]
IMAGE_SIZE = "3G"                 # sparse: the installed system takes a fraction of it
INITRAMFS_MODULES = ("virtio_blk", "crc32c_generic", "ext4")   # ext4's checksums need crc32c
AGENT_PORT = "org.jailer.test-agent"
MARKER = b"JAILER-TEST-AGENT "
KERNEL_ARGUMENTS = "root=/dev/vda rw console=ttyS0 panic=-1 systemd.unified_cgroup_hierarchy=1 quiet"
GUEST_MEMORY = "1024M"
GUEST_CPUS = 2
# Nothing that logs in, keeps time, updates or scrubs: the guest lives for one test module.
MASKED_UNITS = (
    "getty.target", "getty@tty1.service", "serial-getty@ttyS0.service", "console-getty.service",
    "systemd-timesyncd.service", "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
    "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer", "man-db.timer",
    "systemd-hwdb-update.service", "ldconfig.service", "systemd-journal-catalog-update.service",
    "systemd-update-done.service",
)
BUILD_STEP_TIMEOUT = 1800         # debootstrap or setup.sh on a slow mirror
LOCK_TIMEOUT = 3600               # another process's build: two steps and mkfs
BOOT_TIMEOUT = 240                # QEMU start to agent ready, under TCG on a busy machine
ANSWER_GRACE = 30                 # beyond a command's timeout: the agent's kill and the transfer
SHUTDOWN_TIMEOUT = 60


class VMUnavailable(Exception):
    """This host cannot build or boot the guest (not root, a tool, the kernel or the network
    missing): a reason for a test to skip."""


def skip_or_fail(reason: VMUnavailable) -> None:
    """Skip the guest's tests where it cannot be had; in CI ($CI set) fail them instead: the
    real-guest tests must run there, and a guest image that setup.sh can no longer build is a
    failure of the project's, not of the host's."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"the guest is unavailable in CI: {reason}")
    pytest.skip(str(reason))


class GuestError(Exception):
    """The guest was built but misbehaved: a failure; the message has the console's tail."""


def cache_directory() -> Path:
    return Path(os.environ.get("JAILER_TEST_VM_CACHE") or "/var/cache/jailer-test-vm")


def _version(kernel: str) -> list[int]:
    return [int(number) for number in re.findall(r"\d+", Path(kernel).name)]


def guest_kernel() -> tuple[Path, Path]:
    """The newest peer kernel with virtio_console built in (the agent's port) and virtio_blk,
    crc32c_generic and ext4 among its modules, and its module directory."""
    usable = []
    for kernel in KERNELS:
        modules = _modules_directory(kernel)
        try:
            builtin = (modules / "modules.builtin").read_text()
            dependencies = (modules / "modules.dep").read_text()
        except OSError:
            continue
        if (os.path.exists(kernel) and "/virtio_console.ko" in builtin
                and all(f"/{name}.ko:" in dependencies for name in INITRAMFS_MODULES)):
            usable.append(kernel)
    if not usable:
        raise VMUnavailable(f"no guest kernel with virtio_console built in and {', '.join(INITRAMFS_MODULES)} "
                            f"modules among {KERNELS} (../shared/peers/guest, or JAILER_GUEST_KERNEL)")
    kernel = max(usable, key=_version)
    return Path(kernel), _modules_directory(kernel)


def debian_mirror() -> str:
    """The bookworm archive this host's apt uses, read from its configuration at run time."""
    try:
        text = DEBIAN_SOURCES.read_text()
    except OSError as error:
        raise VMUnavailable(f"no Debian mirror to debootstrap from: {error}") from None
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            key, colon, value = line.partition(":")
            if colon and not line.startswith(("#", " ", "\t")):
                fields[key.strip().lower()] = value.split()
        if SUITE in fields.get("suites", []) and "deb" in fields.get("types", []) and fields.get("uris"):
            return fields["uris"][0]
    raise VMUnavailable(f"{DEBIAN_SOURCES} has no deb source for {SUITE}")


def _redacted(text: str) -> str:
    """TEXT without the mirror's host name: build logs and messages must not carry it."""
    host = urlsplit(debian_mirror()).hostname
    return text.replace(host, "<debian mirror>") if host else text


def image_key(kernel_version: str) -> str:
    """A hash of everything that goes into the image: this builder (its package list, units and
    agent), the project's setup.sh, setup.py and pyproject.toml, and the kernel whose modules it holds."""
    digest = hashlib.sha256()
    for part in (Path(__file__).read_bytes(), (PROJECT / "setup.sh").read_bytes(), (PROJECT / "setup.py").read_bytes(),
                 (PROJECT / "pyproject.toml").read_bytes(), kernel_version.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def image() -> Path:
    """The cached root disk, built first if missing: under a lock, so that two test processes do
    not build at once, into a temporary file renamed when complete, so that an interrupted build
    is never used."""
    _, modules = guest_kernel()
    cache = cache_directory()
    path = cache / f"debian-{SUITE}-{image_key(modules.name)}.img"
    if path.exists():
        return path
    _check_can_build()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / "lock") as lock:
        if not path.exists():
            for interrupted in cache.glob("*.build"):
                _remove_tree(interrupted)
            _build(path, modules, lock)
            _prune(cache, keep=path)
    return path


def _check_can_build() -> None:
    if os.geteuid() != 0:
        raise VMUnavailable("building the guest image needs root (debootstrap, chroot); "
                            f"none is cached in {cache_directory()}")
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        raise VMUnavailable(f"building the guest image needs {', '.join(missing)}: "
                            f"apt-get install {' '.join(sorted({BUILD_TOOLS[tool] for tool in missing}))}")


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VMUnavailable(f"{path} stayed locked by another image build for {LOCK_TIMEOUT} s") from None
                time.sleep(1)
        yield lock


def _remove_tree(path: Path) -> None:
    """rm -rf PATH, refused while anything is mounted below it (a chroot's bound /dev would go too)."""
    if not path.exists():
        return
    mounted = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    inside = [point for point in mounted if point == str(path) or point.startswith(f"{path}/")]
    if inside:
        raise VMUnavailable(f"refusing to remove {path}: {', '.join(inside)} still mounted")
    shutil.rmtree(path)


def _prune(cache: Path, keep: Path) -> None:
    """Images of earlier builders, setup.sh or kernels, except one a guest is booted from (each
    running Guest holds a shared lock on its image), and the logs of images no longer there."""
    for old in cache.glob("debian-*.img"):
        if old == keep:
            continue
        with open(old, "rb") as held:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            old.unlink()
    for log in cache.glob("debian-*.log"):
        if not log.with_suffix(".img").exists():
            log.unlink()


def copy_checkout(checkout: Path, destination: Path) -> None:
    """What the project needs to install and test itself, without caches or a built monitor."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in CHECKOUT_ENTRIES:
        source = checkout / name
        if source.is_dir():
            shutil.copytree(source, destination / name, symlinks=True, ignore=NOT_COPIED)
        elif source.exists():
            shutil.copy2(source, destination / name)


def _mkfs_command(tree: Path, disk: Path, size: str, label: str) -> list[str]:
    return ["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(tree), str(disk), size]


def _isolated_environment() -> dict[str, str]:
    """A chroot's environment: nothing of the test run's (its venv, PYTHONPATH), but its proxies."""
    proxies = {name: value for name, value in os.environ.items()
               if name.lower() in ("http_proxy", "https_proxy", "no_proxy")}
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
            "LANG": "C.UTF-8", **proxies}


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def _step(log: Path, what: str, command: list[str], lock) -> None:
    """Run one build step with its output appended to LOG (host name redacted) and its duration.
    The step inherits the build's LOCK: were this process killed, the lock would stay held until
    the step's processes end, and no other build would remove the tree they still write to."""
    started = time.monotonic()
    try:
        result = subprocess.run(command, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=_isolated_environment(), pass_fds=(lock.fileno(),),
                                timeout=BUILD_STEP_TIMEOUT)
        output, outcome = result.stdout, f"exit status {result.returncode}"
    except subprocess.TimeoutExpired as expired:
        result, output, outcome = None, expired.output or b"", f"timed out after {BUILD_STEP_TIMEOUT} s"
    with open(log, "a") as record:
        record.write(_redacted(f"== {what}: {shlex.join(command)}\n{output.decode(errors='replace')}"
                               f"== {what}: {outcome}, {time.monotonic() - started:.0f} s\n"))
    if result is None or result.returncode != 0:
        raise VMUnavailable(f"building the guest image failed at {what} ({outcome}); the end of {log}:\n{_tail(log)}")


# setup.sh in the image's chroot, ISOLATED: its /proc, /sys and /dev mounts vanish with it,
# whatever happens to the build. pip trusts what the host trusts (a
# network may intercept TLS with a CA of its own), read-only and only for the build.
CHROOT_SETUP = """
root=$1
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
mkdir -p "$root/etc/ssl/certs"
mount --bind /etc/ssl/certs "$root/etc/ssl/certs"
mount -o remount,bind,ro "$root/etc/ssl/certs"
chroot "$root" /opt/jailer/setup.sh
chroot "$root" apt-get clean
"""


def _build(destination: Path, modules: Path, lock) -> None:
    workspace = destination.with_suffix(".build")
    root, log = workspace / "root", destination.with_suffix(".log")
    root.mkdir(parents=True)
    log.write_text(f"== building {destination.name} with the modules of {modules.name}\n")
    try:
        _step(log, "debootstrap", [*ISOLATED, "debootstrap", "--variant=minbase",
                                   "--include=" + ",".join(BOOT_PACKAGES), SUITE, str(root), debian_mirror()], lock)
        copy_checkout(PROJECT, root / INSTALL_DIRECTORY)
        if os.path.exists("/etc/resolv.conf"):      # the chroot resolves names as the host does
            shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")
        _step(log, "setup.sh in the chroot", [*ISOLATED, "sh", "-euc", CHROOT_SETUP, "sh", str(root)], lock)
        _strip(root)
        _configure(root, modules)
        _step(log, "mkfs.ext4", _mkfs_command(root, workspace / "image", IMAGE_SIZE, "jailer-root"), lock)
        os.rename(workspace / "image", destination)
    finally:
        _remove_tree(workspace)


def _strip(root: Path) -> None:
    """What only the build needed: apt's sources and lists and debootstrap's log (they name the
    mirror), caches, DNS."""
    for name in ("etc/apt/sources.list", "var/log/bootstrap.log", "etc/resolv.conf"):
        (root / name).unlink(missing_ok=True)
    for directory in ("var/lib/apt/lists", "root/.cache"):
        shutil.rmtree(root / directory, ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    for cache in (root / "var/cache/apt").glob("*.bin"):
        cache.unlink()


FSTAB = """/dev/vda / ext4 rw,noatime 0 0
LABEL=jailer-checkout /mnt/jailer-checkout ext4 ro,nofail,x-systemd.device-timeout=30s 0 0
"""

SYNC_UNIT = """[Unit]
Description=Put the checkout under test over /opt/jailer
RequiresMountsFor=/mnt/jailer-checkout

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/jailer-test-sync

[Install]
WantedBy=multi-user.target
"""

SYNC_SCRIPT = r"""#!/bin/sh
# Replace the project copy baked into the image by the checkout under test (.venv and the
# metadata pip wrote stay), then build jailer-monitor with setup.sh's own commands. setup.sh is
# part of the image's key, so the monitor it built here is that build's output for the same
# monitor.c: kept when the checkout's monitor.c is the same (a static build takes ~15 s under TCG).
set -eu
checkout=/mnt/jailer-checkout/checkout
baked=$(mktemp -d)
cd /opt/jailer
cp jailer/monitor.c jailer/jailer-monitor "$baked"/
for entry in "$checkout"/*; do
    [ -e "$entry" ] && rm -rf "./${entry##*/}"
done
cp -a "$checkout"/. .
if cmp -s "$baked/monitor.c" jailer/monitor.c; then
    cp -a "$baked/jailer-monitor" jailer/jailer-monitor
else
    build=$(grep -E '^[^#]*build_monitor.*jailer-monitor' setup.sh) ||
        { echo "setup.sh has no build_monitor line for jailer-monitor" >&2; exit 1; }
    sh -eu -c "$build"
fi
rm -rf "$baked"
"""

AGENT_UNIT = f"""[Unit]
Description=Run the test host's commands, over virtio-serial port {AGENT_PORT}
After=multi-user.target jailer-test-sync.service
StartLimitIntervalSec=0

[Service]
ExecStart=/usr/bin/python3 -I /usr/local/sbin/jailer-test-agent {AGENT_PORT} {MARKER.decode().strip()}
Restart=on-failure
RestartSec=1
WorkingDirectory=/root
Environment=HOME=/root LANG=C.UTF-8

[Install]
WantedBy=multi-user.target
"""

AGENT_SCRIPT = r'''#!/usr/bin/python3 -I
"""Run the test host's shell commands, one at a time, and answer over a virtio-serial port.

Usage: jailer-test-agent PORT-NAME MARKER. Each message is one line, MARKER, a space and JSON:
the host sends {"id", "command", "timeout", "stdin"}, this answers {"id", "status", "stdout",
"stderr", "timed_out"} (byte strings in base64), and says {"ready": true} when it starts.
"""
import base64
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys

PORT_NAME, MARKER = sys.argv[1], sys.argv[2].encode() + b" "


def port_path():
    for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
        with open(name_file) as name:
            if name.read().strip() == PORT_NAME:
                return "/dev/" + name_file.split("/")[-2]
    sys.exit("no virtio-serial port named " + PORT_NAME)


def send(port, message):
    data = MARKER + json.dumps(message).encode() + b"\n"
    while data:
        data = data[os.write(port, data):]


def execute(request):
    """bash -c COMMAND in a session of its own, so that a timeout kills all it started there."""
    process = subprocess.Popen(["/bin/bash", "-c", request["command"]], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = process.communicate(base64.b64decode(request["stdin"]), timeout=request["timeout"])
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        try:
            stdout, stderr = process.communicate(timeout=5)
        except subprocess.TimeoutExpired as held:     # something outside the session holds the pipes
            stdout, stderr = held.output or b"", held.stderr or b""
    return {"id": request["id"], "status": process.wait(), "timed_out": timed_out,
            "stdout": base64.b64encode(stdout).decode(), "stderr": base64.b64encode(stderr).decode()}


def main():
    port = os.open(port_path(), os.O_RDWR)
    send(port, {"ready": True})
    pending = b""
    while True:
        chunk = os.read(port, 1 << 16)
        if not chunk:
            sys.exit("the host closed the port")
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.startswith(MARKER):
                send(port, execute(json.loads(line[len(MARKER):])))


main()
'''


def _configure(root: Path, modules: Path) -> None:
    """No login, no network, no timers: systemd boots to multi-user, mounts the checkout, puts it
    over /opt/jailer and starts the agent; the kernel's modules for udev and modprobe."""
    files = {
        "etc/hostname": ("jailer-test-vm\n", 0o644),
        "etc/hosts": ("127.0.0.1 localhost\n127.0.1.1 jailer-test-vm\n::1 localhost\n", 0o644),
        "etc/machine-id": (uuid.uuid4().hex + "\n", 0o444),   # set: no first-boot units
        "etc/fstab": (FSTAB, 0o644),
        "etc/systemd/system/jailer-test-sync.service": (SYNC_UNIT, 0o644),
        "etc/systemd/system/jailer-test-agent.service": (AGENT_UNIT, 0o644),
        "usr/local/sbin/jailer-test-sync": (SYNC_SCRIPT, 0o755),
        "usr/local/sbin/jailer-test-agent": (AGENT_SCRIPT, 0o755),
    }
    for name, (text, mode) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.write_text(text)
        path.chmod(mode)
    links = {f"etc/systemd/system/multi-user.target.wants/{unit}": f"/etc/systemd/system/{unit}"
             for unit in ("jailer-test-sync.service", "jailer-test-agent.service")}
    links["etc/systemd/system/default.target"] = "/lib/systemd/system/multi-user.target"
    links.update({f"etc/systemd/system/{unit}": "/dev/null" for unit in MASKED_UNITS})
    for name, target in links.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.symlink_to(target)
    (root / "mnt/jailer-checkout").mkdir(parents=True, exist_ok=True)
    shutil.copytree(modules, root / "lib/modules" / modules.name, symlinks=True, dirs_exist_ok=True)


INIT = r"""#!/bin/busybox sh
# Load what the root disk needs, mount it read-write and hand over to systemd.
/bin/busybox --install -s
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
root=/dev/vda
for argument in $(cat /proc/cmdline); do
    case "$argument" in root=*) root=${argument#root=} ;; esac
done
for module in $(cat /etc/initramfs-modules); do
    modprobe "$module" || echo "initramfs: modprobe $module failed"
done
tries=0
while [ ! -b "$root" ] && [ $tries -lt 100 ]; do sleep 0.1; tries=$((tries + 1)); done
mount -t ext4 -o rw "$root" /newroot || { echo "initramfs: cannot mount $root"; poweroff -f; }
mount --move /dev /newroot/dev
umount /proc
exec switch_root /newroot /sbin/init
"""


def initramfs(path: Path, modules: Path) -> Path:
    """The host's static busybox, INIT, and the kernel's module subset for busybox modprobe."""
    directory, regular = stat.S_IFDIR | 0o755, stat.S_IFREG
    entries = [(name, directory, b"") for name in
               ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "newroot", "etc", "lib", "lib/modules")]
    entries += [("bin/busybox", regular | 0o755, Path(BUSYBOX).read_bytes()),
                ("init", regular | 0o755, INIT.encode()),
                ("etc/initramfs-modules", regular | 0o644, "\n".join(INITRAMFS_MODULES).encode() + b"\n")]
    for source in sorted([modules, *modules.rglob("*")]):
        name = f"lib/modules/{source.relative_to(modules.parent)}"
        entries.append((name, directory, b"") if source.is_dir() else (name, regular | 0o644, source.read_bytes()))
    path.write_bytes(newc_archive(entries))
    return path


def checkout_disk(path: Path, checkout: Path) -> Path:
    """An ext4 disk whose checkout/ holds CHECKOUT's project files, for the guest to sync."""
    with tempfile.TemporaryDirectory(prefix="jailer-test-checkout-") as tree:
        copy_checkout(checkout, Path(tree) / "checkout")
        size = sum(file.stat().st_size for file in Path(tree).rglob("*") if file.is_file())
        made = subprocess.run(_mkfs_command(Path(tree), path, f"{2 * size // 2**20 + 64}M", "jailer-checkout"),
                              check=False, capture_output=True, text=True, timeout=120)
    if made.returncode != 0:
        raise VMUnavailable(f"mkfs.ext4 could not make the checkout disk: {made.stderr.strip()}")
    return path


def _check_can_boot() -> None:
    if not os.access(QEMU, os.X_OK):
        raise VMUnavailable(f"no QEMU at {QEMU} (set JAILER_QEMU)")
    if not os.access(BUSYBOX, os.X_OK):
        raise VMUnavailable("no busybox for the guest's initramfs (Debian: busybox-static)")
    if shutil.which("mkfs.ext4") is None:
        raise VMUnavailable("no mkfs.ext4 for the checkout disk (Debian: e2fsprogs)")


class Guest:
    """The guest, booted, as a context manager: `with Guest() as guest: guest.run("systemctl ...")`.

    ready_seconds is how long it took from QEMU's start until the agent answered."""

    def __init__(self, checkout: Path = PROJECT, boot_timeout: float = BOOT_TIMEOUT):
        self.checkout = Path(checkout)
        self.boot_timeout = boot_timeout
        self.ready_seconds: float | None = None
        self._qemu: subprocess.Popen | None = None
        self._agent: socket.socket | None = None
        self._image_lock = None
        self._workdir: Path | None = None
        self._pending = bytearray()
        self._requests = 0

    def __enter__(self) -> Guest:
        self.boot()
        return self

    def __exit__(self, *exception) -> None:
        self.close()

    def boot(self) -> None:
        """Build or find the image, boot it, wait for the agent and the checkout's sync; on any
        failure nothing is left running."""
        try:
            self._boot()
        except BaseException:
            self.close()
            raise

    def _boot(self) -> None:
        _check_can_boot()
        disk = image()
        kernel, modules = guest_kernel()
        self._image_lock = open(disk, "rb")
        fcntl.flock(self._image_lock, fcntl.LOCK_SH)
        self._workdir = Path(tempfile.mkdtemp(prefix="jailer-test-vm-"))
        agent_socket = self._workdir / "agent.sock"
        command = [QEMU, "-accel", ACCEL, "-machine", "q35", "-m", GUEST_MEMORY, "-smp", str(GUEST_CPUS),
                   "-nodefaults", "-nographic", "-no-reboot",
                   "-kernel", str(kernel), "-initrd", str(initramfs(self._workdir / "initramfs.cpio", modules)),
                   "-append", KERNEL_ARGUMENTS, "-serial", f"file:{self._workdir / 'console.log'}",
                   "-drive", f"file={disk},format=raw,if=none,id=root,snapshot=on,cache=unsafe",
                   "-device", "virtio-blk-pci,drive=root",
                   "-drive", (f"file={checkout_disk(self._workdir / 'checkout.img', self.checkout)},"
                              "format=raw,if=none,id=checkout,readonly=on"),
                   "-device", "virtio-blk-pci,drive=checkout",
                   "-device", "virtio-serial-pci,id=ports",
                   "-chardev", f"socket,id=agent,path={agent_socket},server=on,wait=on",
                   "-device", f"virtserialport,bus=ports.0,chardev=agent,name={AGENT_PORT}"]
        for directory in DATADIRS:
            command += ["-L", directory]
        started = time.monotonic()
        with open(self._workdir / "qemu.log", "wb") as qemu_log:
            self._qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT)
        deadline = started + self.boot_timeout
        self._agent = self._connect(agent_socket, deadline)     # QEMU starts the guest only then
        self._receive(lambda message: message.get("ready"), deadline, "the agent to start")
        self.ready_seconds = time.monotonic() - started
        status, _, _ = self.run("systemctl is-active --quiet jailer-test-sync.service")
        if status != 0:
            _, report, _ = self.run("systemctl status --no-pager jailer-test-sync.service; "
                                    "journalctl -b --no-pager -u jailer-test-sync.service")
            raise GuestError(f"the guest could not put the checkout over /{INSTALL_DIRECTORY}:\n{report}")

    def _connect(self, path: Path, deadline: float) -> socket.socket:
        while True:
            if self._qemu.poll() is not None:
                raise GuestError(f"QEMU exited with status {self._qemu.returncode} before it listened on {path}"
                                 + self.diagnostics())
            agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                agent.connect(str(path))
                return agent
            except (FileNotFoundError, ConnectionRefusedError):
                agent.close()
            if time.monotonic() > deadline:
                raise GuestError(f"QEMU did not listen on {path}" + self.diagnostics())
            time.sleep(0.05)

    def _receive(self, wanted, deadline: float, waiting_for: str) -> dict:
        """The next agent message WANTED accepts; those it does not (a restarted agent's second
        ready, an answer to a request given up on) are dropped."""
        while True:
            end = self._pending.find(b"\n")
            if end >= 0:
                line = bytes(self._pending[:end])
                del self._pending[:end + 1]
                if line.startswith(MARKER) and wanted(message := json.loads(line[len(MARKER):])):
                    return message
                continue
            if self._qemu.poll() is not None:
                raise GuestError(f"QEMU exited with status {self._qemu.returncode} while waiting for {waiting_for}"
                                 + self.diagnostics())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestError(f"timed out waiting for {waiting_for}" + self.diagnostics())
            readable, _, _ = select.select([self._agent], [], [], min(remaining, 1.0))
            if readable:
                chunk = self._agent.recv(1 << 20)
                if not chunk:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self._qemu.wait(5)
                    closed = ("the agent's connection closed" if self._qemu.returncode is None
                              else f"QEMU exited with status {self._qemu.returncode}")
                    raise GuestError(f"{closed} while waiting for {waiting_for}" + self.diagnostics())
                self._pending += chunk

    def run(self, command: str, timeout: float = 60, stdin: bytes = b"") -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of `bash -c COMMAND` as root in the guest (status -N: killed
        by signal N). A command still running after TIMEOUT is killed with its session and raises
        GuestError; so does one whose background processes keep its stdout or stderr open."""
        self._requests += 1
        request = {"id": self._requests, "command": command, "timeout": timeout,
                   "stdin": base64.b64encode(stdin).decode()}
        deadline = time.monotonic() + timeout + ANSWER_GRACE
        self._agent.settimeout(timeout + ANSWER_GRACE)
        self._agent.sendall(MARKER + json.dumps(request).encode() + b"\n")
        answer = self._receive(lambda message: message.get("id") == request["id"], deadline, repr(command))
        stdout, stderr = (base64.b64decode(answer[name]).decode(errors="replace") for name in ("stdout", "stderr"))
        if answer["timed_out"]:
            raise GuestError(f"{command!r} was still running after {timeout} s in the guest and was killed; "
                             f"its stdout: {stdout[-2000:]!r}, stderr: {stderr[-2000:]!r}")
        return answer["status"], stdout, stderr

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write DATA to PATH in the guest, through the agent: for small files."""
        quoted = shlex.quote(path)
        status, _, stderr = self.run(f"cat > {quoted} && chmod {mode:o} {quoted}", stdin=data)
        if status != 0:
            raise GuestError(f"cannot write {path} in the guest: {stderr.strip()}")

    def diagnostics(self) -> str:
        """The tail of the guest's console and of QEMU's own output, for an error message."""
        if self._workdir is None:
            return ""
        return (f"\n--- guest console (end) ---\n{_tail(self._workdir / 'console.log', 60)}"
                f"\n--- QEMU ---\n{_tail(self._workdir / 'qemu.log', 20)}")

    def close(self) -> None:
        """systemctl poweroff when the agent is up, else or after SHUTDOWN_TIMEOUT kill QEMU."""
        if self._qemu is not None and self._qemu.poll() is None:
            if self.ready_seconds is not None:
                with contextlib.suppress(GuestError, OSError):
                    self.run("systemctl poweroff --no-block", timeout=15)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._qemu.wait(SHUTDOWN_TIMEOUT)
            if self._qemu.poll() is None:
                self._qemu.kill()
                self._qemu.wait()
        for held in (self._agent, self._image_lock):
            if held is not None:
                held.close()
        self._agent = self._image_lock = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
