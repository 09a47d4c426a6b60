"""The jailed IDIO-16 under a real QEMU (vfio-user-pci, 10.1 or newer) with a real Linux guest
whose own driver (gpio_pci_idio_16) binds the device, drives its outputs, reads the inputs the
host sets through the control socket and takes the card's change-of-state interrupt; the
guest then reboots, and QEMU's system reset resets the device, which its driver binds again.
The same guest driver also drives libvfio-user's own sample device jailed by the shipped
profiles/libvfio-user-gpio-pci-idio-16.toml (from ../shared/peers/libvfio-user, or
LIBVFIO_USER_SAMPLES; skipped where absent), whose BAR accesses QEMU's trace shows it answered.

Debian 12 packages neither such a QEMU nor a guest for it. By default the prebuilt peers
beside the checkout are used (../shared/peers: QEMU 10.2.2 and Debian 12's two kernels, 6.1
and 6.12, with their module subsets; setup.sh installs the libraries QEMU needs and
busybox-static), and every test runs once per kernel found there. Each can be overridden,
and the tests are skipped, saying what is missing, where neither is there:

    JAILER_QEMU=/path/to/qemu-system-x86_64     a QEMU whose `-device help` lists vfio-user-pci
    JAILER_GUEST_KERNEL=/boot/vmlinuz-VERSION    the one kernel to test, with
                                                 CONFIG_GPIO_PCI_IDIO_16=m; its modules come
                                                 from ../../lib/modules/VERSION
    JAILER_QEMU_DATADIR=DIR[:DIR...]             where QEMU finds its BIOS (-L)
    JAILER_QEMU_ACCEL=kvm                        the accelerator (default tcg, which works
                                                 everywhere, nested guests included)

The guest is that kernel plus an initramfs made by tests/guest.py (which holds the QEMU and
guest helpers these tests share with test_qemu_restart.py and benchmarks/virtio_blk.py) from
the host's static busybox, the driver module and the modules it needs (on 6.12 gpio-idio-16
and gpio-regmap), found through the kernel's modules.dep; its /init (GUEST_INIT below, or
GUEST_SAMPLE_INIT for the sample) loads them in dependency order and reports over the serial
console.

Every test runs on each kernel: the eight take about 110-135 s under TCG on 2 cores (an
IDIO-16 run 17-27 s on 6.1 and 12-22 s on 6.12, each for two boots; a sample run, one boot,
8-12 s on 6.1 and 6-9 s on 6.12), within what CI affords.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from devices.gpio_pci_idio16.ctl import request as control
from guest import (KERNELS, PEERS, QEMU, Console, _stop_qemu, initramfs, kernel_problem, qemu_command, qemu_problem,
                   vfio_user_device)
# tests/vm/debian.py takes these from here (they live in tests/guest.py now)
from guest import ACCEL, BUSYBOX, DATADIRS, newc_archive  # noqa: F401
from guest import modules_directory as _modules_directory  # noqa: F401
from test_e2e_jailed_device import jailed, listener, scratch, start_with_control  # noqa: F401  (fixtures)

DRIVER = "gpio_pci_idio_16"
OUTPUTS = 0x8009              # the guest drives OUT0, OUT3 and OUT15 high
INPUTS = 0xA5C3               # the host drives these input lines

# Both guests' /init begin alike: load the driver, find the card, report the driver bound to it
# and its gpiochip, and define line N -> its sysfs directory, exported on first use.
GUEST_PRELUDE = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
say() { echo "GUEST: $*"; }
fail() { say "FAIL $*"; poweroff -f; }
for module in $(cat /modules/order); do insmod /modules/$module || fail "insmod $module"; done
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor):$(cat $d/device)" = "0x494f:0x0dc8" ] && dev=$d
done
[ -n "$dev" ] || fail "no 494f:0dc8 device"
say "DRIVER $(basename $(readlink $dev/driver))"
chip=$(ls -d $dev/gpio/gpiochip* | head -n 1)
base=$(cat $chip/base)
say "CHIP $(cat $chip/ngpio)"
# sysfs names an exported line after the driver's line name (OUT0..OUT15, IIN0..IIN15)
line() {
    if [ $1 -lt 16 ]; then name=OUT$1; else name=IIN$(($1 - 16)); fi
    for path in /sys/class/gpio/$name /sys/class/gpio/gpio$(($base + $1)); do
        [ -d $path ] && { echo $path; return; }
    done
    echo $(($base + $1)) > /sys/class/gpio/export || fail "export of line $1"
    for path in /sys/class/gpio/$name /sys/class/gpio/gpio$(($base + $1)); do
        [ -d $path ] && { echo $path; return; }
    done
    fail "no sysfs directory for line $1"
}
inputs() {
    value=0
    for l in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
        value=$(( value | ($(cat $(line $((16 + l)))/value) << l) ))
    done
    echo $value
}
"""

GUEST_INIT = GUEST_PRELUDE + r"""outputs() {
    value=0
    for l in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
        value=$(( value | ($(cat $(line $l)/value) << l) ))
    done
    echo $value
}
if [ $(inputs) -ne 0 ]; then
    # second boot, after the reboot below: QEMU's system reset has reset the device
    say "AFTER-RESET outputs $(printf 0x%04x $(outputs)) inputs $(printf 0x%04x $(inputs))"
    poweroff -f
fi
for l in 0 3 15; do echo 1 > $(line $l)/value; done
say "OUTPUTS-SET"
# the lines are read one by one: wait for the host's change, then for two reads that agree
seen=0; previous=-1; tries=0
while { [ $seen -eq 0 ] || [ $seen -ne $previous ]; } && [ $tries -lt 300 ]; do
    previous=$seen; seen=$(inputs); tries=$((tries + 1)); sleep 0.1
done
say "INPUTS $(printf 0x%04x $seen)"
irq=$(cat $dev/irq)
count() { awk -v irq="$irq:" '$1 == irq { n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i; print n }' /proc/interrupts; }
echo both > $(line 16)/edge || fail "edge"
before=$(count)
say "IRQ-ARMED"
tries=0
while [ "$(count)" = "$before" ] && [ $tries -lt 300 ]; do tries=$((tries + 1)); sleep 0.1; done
say "IRQS $(( $(count) - before )) IIN0 $(cat $(line 16)/value)"
say "REBOOT"
reboot -f
"""


def _kernel_problem(kernel: str) -> str | None:
    return kernel_problem(kernel, [DRIVER], "CONFIG_GPIO_PCI_IDIO_16=m")


QEMU_PROBLEM = qemu_problem()
pytestmark = pytest.mark.skipif(QEMU_PROBLEM is not None, reason=str(QEMU_PROBLEM))


def _kernel_param(kernel: str):
    problem = _kernel_problem(kernel)
    return pytest.param(kernel, id=Path(kernel).name.removeprefix("vmlinuz-"),
                        marks=pytest.mark.skipif(problem is not None, reason=str(problem)))


GUEST_KERNELS = [_kernel_param(kernel) for kernel in KERNELS]


def wait_ready(device, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not any(event["event"] == "ready" for event in device.events()):
        assert device.proc.poll() is None, f"jailer exited {device.proc.returncode}: {device.errors()}"
        assert time.monotonic() < deadline, f"the device is not ready: {device.errors()}"
        time.sleep(0.01)


QEMU_UID, SOCKET_GID = 65532, 65534   # an unprivileged QEMU, in the group jailer gives its socket


def start_for_unprivileged_qemu(jailed, invocation, scratch: Path):
    """jailer creates the vfio-user socket itself (--socket-path), mode 0660 in SOCKET_GID
    (--socket-group; nobody's own group, so that nobody may give it); the control socket is ours."""
    sock, ctl = str(scratch / "guest.sock"), str(scratch / "guest.ctl")
    control_listener = listener(ctl)
    device = jailed(invocation, scratch, "--socket-path", sock, "--socket-group", str(SOCKET_GID),
                    f"--fd=control={control_listener.fileno()}", pass_fds=[control_listener.fileno()])
    control_listener.close()
    return device, sock, ctl


NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.mark.parametrize("kernel", GUEST_KERNELS)
@pytest.mark.parametrize("invocation, qemu_user", [
    pytest.param("root", "caller", marks=NEEDS_ROOT),
    ("user", "caller"),
    pytest.param("root", "unprivileged", marks=NEEDS_ROOT),   # QEMU as its own user, jailer's socket
])
def test_linux_guest_driver_binds_and_drives_the_jailed_device(invocation, qemu_user, kernel, scratch, jailed):
    if qemu_user == "caller":
        device, sock, ctl = start_with_control(jailed, invocation, scratch, "guest")
        prefix = []
    else:
        device, sock, ctl = start_for_unprivileged_qemu(jailed, invocation, scratch)
        prefix = ["setpriv", f"--reuid={QEMU_UID}", f"--regid={SOCKET_GID}", "--clear-groups"]
    wait_ready(device)
    command = prefix + qemu_command(initramfs(scratch, kernel, GUEST_INIT, [DRIVER]), kernel, vfio_user_device(sock))
    qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        console = Console(qemu)
        assert "idio-16" in console.expect("DRIVER")             # the guest's own driver is bound
        assert console.expect("CHIP") == "32"                     # 16 outputs + 16 inputs
        console.expect("OUTPUTS-SET")
        assert control(ctl, {"cmd": "get-outputs"})["outputs"] == OUTPUTS
        control(ctl, {"cmd": "set-inputs", "value": INPUTS})
        assert console.expect("INPUTS") == f"0x{INPUTS:04x}"
        console.expect("IRQ-ARMED")
        control(ctl, {"cmd": "set-input", "line": 0, "value": 0})   # IIN0 falls: change of state
        irqs, _, level = console.expect("IRQS").partition(" IIN0 ")
        assert int(irqs) >= 1 and level == "0", console.transcript()
        console.expect("REBOOT")
        # QEMU's system reset resets the device (DEVICE_RESET): the output latch clears, the
        # inputs (the outside world's) stay, and the guest's driver binds it again
        assert "idio-16" in console.expect("DRIVER")
        assert console.expect("AFTER-RESET") == f"outputs 0x0000 inputs 0x{INPUTS & ~1:04x}"
        assert control(ctl, {"cmd": "get-outputs"})["outputs"] == 0
        assert qemu.wait(60) == 0, console.transcript()
    finally:
        _stop_qemu(qemu)
    assert device.proc.poll() is None, "the device must outlive its client"
    refused = [event for event in device.events() if event["event"] == "seccomp"]
    assert not refused, f"the learned allowlist must cover a real QEMU client: {refused}"
    assert device.stop() == 0, device.errors()


# --- libvfio-user's own sample device, jailed ---------------------------------------------

LIBVFIO_USER_SAMPLES = Path(os.environ.get("LIBVFIO_USER_SAMPLES") or PEERS / "libvfio-user" / "samples")
SAMPLE_PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "libvfio-user-gpio-pci-idio-16.toml"
# What the guest below writes to BAR2, in order, as (offset, byte): OUT0 high (OUT0-7 at 0x0),
# OUT15 high (OUT8-15 at 0x4), OUT0 low, OUT15 low; no other output is ever driven.
GUEST_OUTPUT_WRITES = [(0x0, 0x01), (0x4, 0x80), (0x0, 0x00), (0x4, 0x00)]
INPUT_REGISTERS = (0x1, 0x5)      # IIN0-7, IIN8-15
# QEMU's own trace of the vfio-user traffic: the sample's -v logs no BAR access in a release
# build of libvfio-user (its region access log is compiled in only with -Dbuildtype=debug)
TRACED = ("vfio_user_recv_hdr", "vfio_region_write", "vfio_region_read")
REGION_READ, REGION_WRITE, REPLY = 0x9, 0xA, 0x1   # vfio-user commands; a reply without error flags

# The sample has no control socket and raises no interrupt, and it keeps no output latch (a
# read returns what its code makes up): the guest drives OUT0 and OUT15 high, then low, for the
# host to find in what the device acknowledged, and reads the input lines once.
GUEST_SAMPLE_INIT = GUEST_PRELUDE + r"""
# 6.1's driver lets sysfs set an output line's direction; on 6.12 (gpio-regmap) it is fixed and
# sysfs has no direction file
direction() { if [ -e $(line $1)/direction ]; then cat $(line $1)/direction; else echo fixed; fi; }
for l in 0 15; do
    [ "$(direction $l)" = fixed ] || echo out > $(line $l)/direction || fail "direction out on line $l"
done
say "DIRECTIONS $(direction 0) $(direction 15)"
for level in 1 0; do
    for l in 0 15; do echo $level > $(line $l)/value || fail "value $level on line $l"; done
done
say "OUTPUTS-DRIVEN"
say "INPUTS $(printf 0x%04x $(inputs))"
say "POWEROFF"
poweroff -f
"""


def _sample_problem() -> str | None:
    if not os.access(LIBVFIO_USER_SAMPLES / "gpio-pci-idio-16", os.X_OK):
        return f"no libvfio-user sample gpio-pci-idio-16 in {LIBVFIO_USER_SAMPLES} (set LIBVFIO_USER_SAMPLES)"
    if QEMU_PROBLEM is None:
        listed = subprocess.run([QEMU, "-trace", "help"], check=False, capture_output=True, text=True, timeout=30)
        if not set(TRACED) <= set(listed.stdout.split()):
            return f"{QEMU} cannot trace {', '.join(TRACED)} (built without a trace backend such as log)"
    return None


SAMPLE_PROBLEM = _sample_problem()


def acknowledged_bar2_accesses(trace: str) -> list[tuple[str, int, int]]:
    """("write" or "read", offset, byte) of each guest access to BAR2 in QEMU's trace, in order.
    QEMU traces an access once it is done, so each must come right after the device's own reply
    to that command: with posted writes off, every write the guest made was answered by the device."""
    accesses, reply = [], None
    for line in trace.splitlines():
        if header := re.match(r"vfio_user_recv_hdr .* cmd (0x[0-9a-f]+) size 0x[0-9a-f]+ flags (0x[0-9a-f]+)$", line):
            reply = (int(header[1], 16), int(header[2], 16))
        elif access := re.match(r"vfio_region_(write|read) +\(.*:region2\+(0x[0-9a-f]+), "
                                r"(?:(0x[0-9a-f]+), 1\)|1\) = (0x[0-9a-f]+))$", line):
            kind = access[1]
            assert reply == ({"write": REGION_WRITE, "read": REGION_READ}[kind], REPLY), \
                f"the device did not answer the BAR2 {kind} before QEMU finished it: {line} after {reply}"
            accesses.append((kind, int(access[2], 16), int(access[3] or access[4], 16)))
            reply = None
    return accesses


@pytest.mark.skipif(SAMPLE_PROBLEM is not None, reason=str(SAMPLE_PROBLEM))
@NEEDS_ROOT
@pytest.mark.parametrize("kernel", GUEST_KERNELS)
def test_linux_guest_driver_drives_the_jailed_libvfio_user_sample(kernel, scratch, jailed):
    """The reference library's own C device, jailed by the shipped profile, under a real QEMU and
    the guest's own driver: the learned allowlist must hold for a real client (DMA maps of the
    guest's RAM, INTx eventfds, resets, BAR traffic), not only for jailer's exerciser.
    One boot per kernel: 8-12 s on 6.1, 6-9 s on 6.12 under TCG on 2 cores."""
    sock = scratch / "gpio.sock"
    device = jailed("root", scratch, "--socket-path", str(sock), profile=SAMPLE_PROFILE,
                    program_args=["-v"],     # its log (DMA maps, IRQ set-up, resets) explains a failure
                    extra_env={"LIBVFIO_USER_SAMPLES": str(LIBVFIO_USER_SAMPLES)})
    wait_ready(device)
    trace = scratch / "qemu-trace.log"
    command = qemu_command(initramfs(scratch, kernel, GUEST_SAMPLE_INIT, [DRIVER]), kernel,
                           vfio_user_device(str(sock), {"x-no-posted-writes": True}))  # each BAR write waits for the device's reply
    command += ["-D", str(trace)] + [argument for event in TRACED for argument in ("-trace", event)]
    qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        console = Console(qemu)
        assert console.expect("DRIVER") == "pci-idio-16"          # the guest's own driver is bound
        assert console.expect("CHIP") == "32"                     # 16 outputs + 16 inputs
        assert console.expect("DIRECTIONS") in ("out out", "fixed fixed")
        console.expect("OUTPUTS-DRIVEN")
        inputs = int(console.expect("INPUTS"), 16)
        console.expect("POWEROFF")
        assert qemu.wait(60) == 0, console.transcript()
    finally:
        _stop_qemu(qemu)
    accesses = acknowledged_bar2_accesses(trace.read_text())
    output_writes = [(offset, value) for kind, offset, value in accesses
                     if kind == "write" and offset in dict(GUEST_OUTPUT_WRITES)]
    assert output_writes[-len(GUEST_OUTPUT_WRITES):] == GUEST_OUTPUT_WRITES, accesses
    # the sample answers input reads with whatever its reply buffer holds: each line the guest
    # read must have the level its bit had in an answer the device gave for that register
    last_write = max(index for index, (kind, _, _) in enumerate(accesses) if kind == "write")
    answers = {register: {value for kind, offset, value in accesses[last_write:]
                          if kind == "read" and offset == register} for register in INPUT_REGISTERS}
    assert all(answers.values()), f"the guest's input reads did not reach the device: {accesses}"
    for line in range(16):
        levels = {(value >> (line % 8)) & 1 for value in answers[INPUT_REGISTERS[line // 8]]}
        assert (inputs >> line) & 1 in levels, f"IIN{line} of 0x{inputs:04x} is no answer of the device: {answers}"
    assert device.proc.poll() is None, "the device must outlive its client"
    refused = [event for event in device.events() if event["event"] == "seccomp"]
    assert not refused, f"the learned allowlist must cover a real QEMU client: {refused}"
    assert device.stop() == 128 + signal.SIGTERM, device.errors()   # the sample has no SIGTERM handler
    assert device.events()[-1] == {"event": "exited", "signal": signal.SIGTERM}, device.events()
    assert not sock.exists(), "jailer must remove the socket it made reachable"
    assert not any(path.name.startswith(".jailer") or path.suffix == ".sock" for path in scratch.iterdir())
