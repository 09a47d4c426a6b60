"""A real QEMU with a real Linux guest, for the tests and benchmarks that drive a device from
a guest's own driver (tests/test_qemu_guest.py, tests/test_qemu_restart.py,
benchmarks/virtio_blk.py). No pytest in here: the benchmarks import it as a plain module
(tests/ is on sys.path, as for every test file).

By default the prebuilt peers beside the checkout are used (../shared/peers: QEMU 10.2.2,
TCG only, and Debian 12's two kernels, 6.1 and 6.12, with their module subsets); each can be
overridden:

    JAILER_QEMU=/path/to/qemu-system-x86_64     a QEMU whose `-device help` lists vfio-user-pci
    JAILER_GUEST_KERNEL=/boot/vmlinuz-VERSION    the one kernel to use; its modules come from
                                                 ../../lib/modules/VERSION
    JAILER_QEMU_DATADIR=DIR[:DIR...]             where QEMU finds its BIOS (-L)
    JAILER_QEMU_ACCEL=kvm                        the accelerator (default tcg, which works
                                                 everywhere, nested guests included)

The guest is that kernel plus an initramfs made here (`initramfs`) from the host's static
busybox, the modules the named drivers need (`modules_for`, in load order: busybox insmod
resolves nothing), an /init script and any extra files; /init reports over the serial
console in `GUEST: ` lines, which `Console` reads.
"""

from __future__ import annotations

import json
import lzma
import os
import select
import shutil
import stat
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

PEERS = Path(__file__).resolve().parent.parent.parent / "shared" / "peers"
QEMU = os.environ.get("JAILER_QEMU") or str(PEERS / "qemu" / "bin" / "qemu-system-x86_64")
KERNELS = ([os.environ["JAILER_GUEST_KERNEL"]] if os.environ.get("JAILER_GUEST_KERNEL")
           else sorted(str(path) for path in (PEERS / "guest" / "boot").glob("vmlinuz-*")))
UNPACK = {".ko": bytes, ".xz": lzma.decompress}   # a module file's last suffix: how to get its .ko
DATADIRS = [d for d in (os.environ.get("JAILER_QEMU_DATADIR")
                        or (str(PEERS / "qemu" / "share") if not os.environ.get("JAILER_QEMU") else "")).split(":") if d]
ACCEL = os.environ.get("JAILER_QEMU_ACCEL", "tcg")
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
BOOT_TIMEOUT = 120.0          # TCG without KVM takes a while
GUEST_RAM = "256M"
APPEND = "console=ttyS0 panic=-1 quiet"


def qemu_problem(devices: Iterable[str] = ("vfio-user-pci",)) -> str | None:
    """Why no guest can be run here (None when one can): no QEMU, a QEMU without one of the
    devices named, no guest kernel, no busybox."""
    if not os.access(QEMU, os.X_OK):
        return f"no QEMU at {QEMU} (set JAILER_QEMU; Debian 12's QEMU 7.2 has no vfio-user-pci)"
    listed = subprocess.run([QEMU, "-device", "help"], capture_output=True, text=True, timeout=30).stdout
    for device in devices:
        if f'"{device}"' not in listed:
            needs = " (needs QEMU 10.1 or newer)" if device == "vfio-user-pci" else ""
            return f"{QEMU} has no {device} device{needs}"
    if not KERNELS:
        return f"no guest kernel in {PEERS / 'guest' / 'boot'} (set JAILER_GUEST_KERNEL)"
    if not os.access(BUSYBOX, os.X_OK):
        return "no busybox for the guest's initramfs (Debian: busybox-static)"
    return None


def modules_directory(kernel: str) -> Path:
    """../lib/modules/VERSION beside the kernel's boot/, as in a Debian linux-image package."""
    return Path(kernel).parent.parent / "lib" / "modules" / Path(kernel).name.removeprefix("vmlinuz-")


def module_name(path: str) -> str:
    """kernel/drivers/gpio/gpio-pci-idio-16.ko.xz -> gpio_pci_idio_16 (as the kernel names it)."""
    return Path(path).name.split(".ko")[0].replace("-", "_")


class _Modules:
    """What the kernel's module directory says: modules.dep, modules.builtin, modules.softdep
    and modules.alias (the files depmod writes)."""

    def __init__(self, kernel: str):
        self.directory = modules_directory(kernel)
        self.needs: dict[str, list[str]] = {}            # module path -> the paths it needs
        self.paths: dict[str, str] = {}                  # module name -> its path
        for line in (self.directory / "modules.dep").read_text().splitlines():
            module, _, dependencies = line.partition(":")
            self.needs[module] = dependencies.split()
            self.paths[module_name(module)] = module
        self.builtin = {module_name(line) for line in self._lines("modules.builtin")}
        self.softdeps: dict[str, tuple[list[str], list[str]]] = {}   # name -> (pre, post)
        for line in self._lines("modules.softdep"):
            words = line.split()
            if len(words) < 2 or words[0] != "softdep":
                continue
            pre, post, into = [], [], None
            for word in words[2:]:
                if word in ("pre:", "post:"):
                    into = pre if word == "pre:" else post
                elif into is not None:
                    into.append(word)
            self.softdeps[module_name(words[1])] = (pre, post)
        self.aliases: dict[str, list[str]] = {}          # exact alias -> module names
        self.cpu_specific: set[str] = set()              # modules loaded only on CPUs with a feature
        for line in self._lines("modules.alias"):
            words = line.split()
            if len(words) == 3 and words[0] == "alias":
                if words[1].startswith("cpu:"):
                    self.cpu_specific.add(module_name(words[2]))
                else:
                    self.aliases.setdefault(words[1], []).append(module_name(words[2]))

    def _lines(self, name: str) -> list[str]:
        path = self.directory / name
        if not path.exists():
            return []
        return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]

    def soft(self, name: str) -> list[str]:
        """The module paths a soft dependency NAME (a module's name or an alias such as
        crypto-crc32c) stands for: none when it is built in or absent (it is optional), and
        none that only some CPUs can load (crc32c-intel needs SSE4.2, which TCG's default CPU
        model lacks: busybox insmod would fail on it)."""
        if module_name(name) in self.paths:
            return [self.paths[module_name(name)]]
        return [self.paths[module] for module in self.aliases.get(name, [])
                if module in self.paths and module not in self.cpu_specific]


def modules_for(kernel: str, drivers: Sequence[str]) -> list[Path]:
    """Every module the named drivers need, each after its dependencies (modules.dep) and after
    the soft dependencies it names to load first (modules.softdep, such as ext4's and jbd2's
    crypto-crc32c, which modules.dep does not list), deduplicated: busybox insmod loads one
    file and resolves nothing. A driver built into the kernel (virtio_pci on 6.12) needs none.
    LookupError names a driver the kernel has neither as a module nor built in."""
    modules = _Modules(kernel)
    order: list[str] = []

    def add(module: str, visiting: frozenset = frozenset()):
        if module in order or module in visiting:
            return
        visiting |= {module}
        pre, post = modules.softdeps.get(module_name(module), ([], []))
        for dependency in [path for name in pre for path in modules.soft(name)] + modules.needs[module]:
            add(dependency, visiting)
        order.append(module)
        for dependency in [path for name in post for path in modules.soft(name)]:
            add(dependency, visiting)

    for driver in drivers:
        name = module_name(driver)
        if name in modules.paths:
            add(modules.paths[name])
        elif name not in modules.builtin:
            raise LookupError(f"{kernel} has no {driver} module (in {modules.directory / 'modules.dep'}) "
                              f"and does not build it in")
    return [modules.directory / module for module in order]


def kernel_problem(kernel: str, drivers: Sequence[str], hint: str = "") -> str | None:
    """Why this kernel cannot run a guest with these drivers (None when it can)."""
    if not os.path.exists(kernel):
        return f"no guest kernel at {kernel}"
    if not (modules_directory(kernel) / "modules.dep").exists():
        return f"no {modules_directory(kernel) / 'modules.dep'} for {kernel}"
    try:
        modules = modules_for(kernel, drivers)
    except LookupError as missing:
        return f"{missing}{f' ({hint})' if hint else ''}"
    for module in modules:
        if not module.exists() or module.suffix not in UNPACK:
            return f"no loadable {module} (plain or .xz) for {kernel}"
    return None


def newc_archive(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio "newc" archive (the initramfs format) of (path, mode, content) entries."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, inode: int):
        encoded = name.encode() + b"\0"
        fields = (inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out.extend(b"070701" + b"".join(b"%08X" % value for value in fields) + encoded)
        out.extend(b"\0" * (-len(out) % 4) + data)
        out.extend(b"\0" * (-len(out) % 4))
    for inode, (name, mode, data) in enumerate(entries, start=1):
        add(name, mode, data, inode)
    add("TRAILER!!!", 0, b"", 0)
    return bytes(out)


def initramfs(directory: Path, kernel: str, init: str, drivers: Sequence[str],
              extra_files: dict[str, tuple[int, bytes]] | None = None) -> Path:
    """directory/initramfs.cpio: busybox, the /init script, in modules/ the modules the drivers
    need (unpacked, with their load order in modules/order) and extra_files, path -> (mode,
    content) (e.g. {"bin/blkbench": (0o755, ...)}; a mode without a file type is a regular
    file's; missing parent directories are added). The kernel's built-in initramfs already
    has /dev and /dev/console."""
    modules = {module.name.split(".ko")[0] + ".ko": UNPACK[module.suffix](module.read_bytes())
               for module in modules_for(kernel, drivers)}
    entries = [(name, stat.S_IFDIR | 0o755, b"") for name in ("bin", "proc", "sys", "modules")]
    entries += [("bin/busybox", stat.S_IFREG | 0o755, Path(BUSYBOX).read_bytes()),
                ("init", stat.S_IFREG | 0o755, init.encode()),
                ("modules/order", stat.S_IFREG | 0o644, "".join(f"{name}\n" for name in modules).encode())]
    entries += [(f"modules/{name}", stat.S_IFREG | 0o644, data) for name, data in modules.items()]
    made = {name for name, _, _ in entries}
    for path, (mode, data) in (extra_files or {}).items():
        path = path.strip("/")
        parents = list(Path(path).parents)[-2::-1]         # a, a/b, ... (not "." nor the path)
        for parent in map(str, parents):
            if parent not in made:
                entries.append((parent, stat.S_IFDIR | 0o755, b""))
                made.add(parent)
        entries.append((path, mode if stat.S_IFMT(mode) else stat.S_IFREG | mode, data))
        made.add(path)
    path = Path(directory) / "initramfs.cpio"
    path.write_bytes(newc_archive(entries))
    return path


def vfio_user_device(socket_path: str, properties: dict | None = None) -> list[str]:
    """QEMU's arguments for a vfio-user-pci device on socket_path: only the JSON form of
    -device can set its socket property. Guest RAM must be shareable (qemu_command's is)."""
    device = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": socket_path}, **(properties or {})}
    return ["-device", json.dumps(device)]


def qemu_command(initramfs: Path, kernel: str, extra_args: Sequence[str] = (), ram: str = GUEST_RAM,
                 append: str = APPEND) -> list[str]:
    """QEMU booting kernel with initramfs, the serial console on stdio and nothing else, with
    guest RAM (ram, as -m takes it: "256M") from a shared memfd backend, which vfio-user
    devices need (and every other variant gets too, so that they compare), and extra_args
    (devices: vfio_user_device(...), or a -drive/-device pair) before -kernel."""
    command = [QEMU, "-machine", f"q35,accel={ACCEL},memory-backend=mem", "-m", ram,
               "-object", f"memory-backend-memfd,id=mem,size={ram},share=on",
               *extra_args, "-kernel", kernel, "-initrd", str(initramfs),
               "-append", append, "-nographic", "-nodefaults", "-serial", "stdio"]
    for directory in DATADIRS:
        command += ["-L", directory]
    return command


def _stop_qemu(qemu) -> None:
    """Whatever the caller saw, no QEMU outlives it."""
    if qemu.poll() is None:
        qemu.kill()
        qemu.wait()
    qemu.stdout.close()


class Console:
    """The guest's serial console, read line by line; GUEST: lines are the /init's reports."""

    def __init__(self, proc):
        self.proc = proc
        self.partial = b""
        self.seen = []        # every line so far, for failure messages
        self.reports = []     # GUEST: reports not yet expected

    def expect(self, report: str, timeout: float = BOOT_TIMEOUT) -> str:
        """The rest of the guest's next `GUEST: <report> ...` line."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.reports:
                if line.startswith("FAIL"):
                    raise AssertionError(f"the guest reports {line}:\n{self.transcript()}")
                if line.split(" ", 1)[0] == report:
                    self.reports.remove(line)
                    return line[len(report):].strip()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {report} from the guest within {timeout} s:\n{self.transcript()}"
            readable, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if readable:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, f"QEMU exited with {self.proc.wait()}:\n{self.transcript()}"
                *lines, self.partial = (self.partial + chunk).split(b"\n")
                for line in (raw.decode(errors="replace").strip("\r") for raw in lines):
                    self.seen.append(line)
                    if "GUEST: " in line:      # after the BIOS's escape sequences, on the first
                        self.reports.append(line.split("GUEST: ", 1)[1])

    def transcript(self) -> str:
        return "\n".join(self.seen[-40:])


def whole_file(file) -> str:
    """What a file jailer still appends to holds now. Not seek(0) and read(): the file offset is
    shared with jailer's O_APPEND writes, which move it to the end, while Python's buffered
    reader may skip the lseek for a position it believes it is at: the first lines went missing."""
    fd = file.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


# The start of a guest /init for a virtio disk: busybox, /proc, /sys and /dev, the modules in
# modules/order loaded, /dev/vda waited for; say/fail report over the console, and $pci is the
# disk's PCI device directory in sysfs.
VDA_INIT_PRELUDE = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "GUEST: $*"; }
fail() { say "FAIL $*"; poweroff -f; }
for module in $(cat /modules/order); do insmod /modules/$module || fail "insmod $module"; done
tries=0
while [ ! -b /dev/vda ] && [ $tries -lt 200 ]; do tries=$((tries + 1)); sleep 0.05; done
[ -b /dev/vda ] || fail "no /dev/vda"
pci=$(readlink -f /sys/block/vda/device/..)
"""
