"""Generated units, checked offline by systemd's own tools (pid 1 here is not systemd), and
the reasons given for switched-off protections, checked against the kernel."""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from jailer.errors import UsageError
from jailer.plan import (Bind, CgroupPlan, FdSpec, FilesystemPlan, LimitsPlan, NetworkPlan, Plan,
                         ProgramPlan, Rlimit)
from jailer.systemd import (DENIED_SYSCALL_GROUPS, make_request, render_service, service_directives,
                            systemd_run_argv, unit_quote, write_units)

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")

# Exposure measured for the plan below with systemd 252: 3.2 ("OK"). The threshold leaves
# room for small scoring changes between systemd releases, not for losing a protection.
EXPOSURE_THRESHOLD = 3.5


def device_plan(**changes) -> Plan:
    plan = Plan(
        source="/etc/jailer/idio16.toml", name="idio16", invocation="root",
        program=ProgramPlan(argv=("python3", "-m", "devices.gpio_pci_idio16"), executable="/usr/bin/python3"),
        limits=LimitsPlan(rlimits=(Rlimit("nofile", 64, 64),),
                          cgroup=CgroupPlan(memory_max=128 << 20, pids_max=8, cpu_quota_us=50000)),
        fds=(FdSpec("vfio-user", "unix-listener", 3),),
    )
    return replace(plan, **changes)


@pytest.fixture
def jailer_exe(tmp_path):
    """systemd-analyze verify insists that ExecStart's binary exists and is executable."""
    exe = tmp_path / "bin" / "jailer"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return str(exe)


def analyze(*args, unit_path=None):
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{unit_path}:") if unit_path else None
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60, env=env)


def exposure(result) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def verify(*units, unit_path=None):
    result = analyze("verify", "--man=no", *map(str, units), unit_path=unit_path)
    assert result.returncode == 0, result.stderr
    return result


def test_service_verifies_and_scores_ok(tmp_path, jailer_exe):
    request = make_request(device_plan(), "/etc/jailer/idio16.toml", jailer_exe)
    [service] = write_units(device_plan(), request, str(tmp_path / "units"))
    assert service.name == "jailer-idio16.service"
    verify(service)
    result = analyze("security", "--offline=yes", str(service))
    score = exposure(result)
    print(f"exposure {score}")
    assert score <= EXPOSURE_THRESHOLD
    assert result.returncode == 0


def test_socket_activation_pair_verifies(tmp_path, jailer_exe):
    request = make_request(device_plan(), "/etc/jailer/idio16.toml", jailer_exe, socket_activation=True,
                           socket_group="kvm")
    paths = write_units(device_plan(), request, str(tmp_path))
    assert sorted(p.name for p in paths) == ["jailer-idio16.service", "jailer-idio16.socket"]
    verify(*paths)
    service, socket_unit = (p.read_text() for p in sorted(paths))
    assert "--socket-path" not in service       # the listener arrives in LISTEN_FDS
    assert "Requires=jailer-idio16.socket" in service
    assert "FileDescriptorName=vfio-user" in socket_unit
    assert "SocketMode=0660" in socket_unit and "SocketGroup=kvm" in socket_unit


def test_drop_in_overrides_an_existing_unit(tmp_path, jailer_exe):
    base = tmp_path / "qemu-idio16.service"
    base.write_text("[Service]\nExecStart=/bin/true\nPrivateUsers=yes\nProtectKernelTunables=yes\n"
                    "CapabilityBoundingSet=CAP_NET_RAW\n")
    before = exposure(analyze("security", "--offline=yes", "qemu-idio16.service", unit_path=tmp_path))
    request = make_request(device_plan(), "/etc/jailer/idio16.toml", jailer_exe)
    [conf] = write_units(device_plan(), request, str(tmp_path), drop_in="qemu-idio16.service")
    assert conf == tmp_path / "qemu-idio16.service.d" / "50-jailer.conf"
    text = conf.read_text()
    assert "ExecStart=\nExecStart=" in text and "CapabilityBoundingSet=\nCapabilityBoundingSet=" in text
    assert "PrivateUsers=no" in text and "ProtectKernelTunables=no" in text
    verify("qemu-idio16.service", unit_path=tmp_path)
    after = exposure(analyze("security", "--offline=yes", "qemu-idio16.service", unit_path=tmp_path))
    assert after <= EXPOSURE_THRESHOLD < before


def test_verify_rejects_a_missing_launcher(tmp_path):
    """The offline check is worth something: it fails when ExecStart points nowhere."""
    request = make_request(device_plan(), "/etc/jailer/idio16.toml", str(tmp_path / "no-such-jailer"))
    [service] = write_units(device_plan(), request, str(tmp_path))
    assert analyze("verify", "--man=no", str(service)).returncode != 0


def test_quoting_survives_spaces_and_specifiers(tmp_path):
    odd = tmp_path / "dir with space %n $HOME"
    odd.mkdir()
    exe = odd / "jailer"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    request = make_request(device_plan(), str(odd / "p.toml"), str(exe))
    [service] = write_units(device_plan(), request, str(tmp_path))
    verify(service)     # finds the executable only if the path was quoted and escaped right
    assert f'"{odd}/p.toml"'.replace("%", "%%").replace("$", "$$") in service.read_text()
    assert unit_quote("a b") == '"a b"' and unit_quote("50%") == "50%%" and unit_quote("$X", variables=True) == "$$X"


def test_denied_syscall_groups_exist_in_systemd():
    result = analyze("syscall-filter", "--no-pager", *DENIED_SYSCALL_GROUPS)
    assert result.returncode == 0, result.stderr


def test_directives_follow_the_plan(jailer_exe):
    plan = device_plan(
        filesystem=FilesystemPlan(binds=(Bind("/srv/state", "/state", writable=True),),
                                  devices=("/dev/null", "/dev/vfio/vfio")),
        network=NetworkPlan(mode="veth", host_ifname="jl0"),
        limits=LimitsPlan(),
    )
    request = make_request(plan, "/etc/jailer/idio16.toml", jailer_exe, socket_path="/tmp/idio16/sock")
    values = {d.key: d.value for d in service_directives(plan, request)}
    assert values["ReadWritePaths"] == "/srv/state /tmp/idio16"
    assert values["PrivateTmp"] == "no"                 # the socket is in the host's /tmp
    assert values["DeviceAllow"] == "/dev/vfio/vfio rw" and values["BindPaths"] == "/dev/vfio/vfio"
    assert values["PrivateNetwork"] == "no" and "IPAddressDeny" not in values
    assert "CAP_NET_ADMIN" in values["CapabilityBoundingSet"]
    assert "AF_INET" in values["RestrictAddressFamilies"]
    assert "MemoryMax" not in values and "TasksMax" not in values
    assert "ExecStart" in values and values["ExecStart"].endswith("--socket-path /tmp/idio16/sock")


def test_control_socket_and_written_files_are_writable(jailer_exe):
    plan = device_plan(fds=(FdSpec("control", "unix-listener", 4, path="/run/idio16/control.sock"),
                            FdSpec("vfio-user", "unix-listener", 3),
                            FdSpec("log", "file", 5, path="/var/log/idio16.log", mode="w"),
                            FdSpec("config", "file", 6, path="/etc/idio16.conf")))
    request = make_request(plan, "/p.toml", jailer_exe, socket_activation=True)
    values = {d.key: d.value for d in service_directives(plan, request)}
    assert values["RuntimeDirectory"] == "idio16"       # the control socket; vfio-user comes from systemd
    assert values["ReadWritePaths"] == "/var/log/idio16.log"


def test_resource_limits_add_launcher_headroom(jailer_exe):
    plan = device_plan()
    values = {d.key: d.value for d in service_directives(plan, make_request(plan, "/p.toml", jailer_exe))}
    assert int(values["MemoryMax"]) == (128 << 20) + (64 << 20)
    assert values["TasksMax"] == "24" and values["CPUQuota"] == "50%"
    assert values["RuntimeDirectory"] == "jailer/jailer-idio16"


def test_every_directive_carries_its_reason(jailer_exe):
    plan = device_plan()
    text = render_service(plan, make_request(plan, "/p.toml", jailer_exe))
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^[A-Za-z]+=", line) and not lines[index - 1].startswith("[Install]"):
            assert lines[index - 1].startswith("# "), line


def test_systemd_run_line_carries_the_same_properties(jailer_exe):
    plan = device_plan()
    request = make_request(plan, "/p.toml", jailer_exe, socket_activation=True)
    argv = systemd_run_argv(plan, request)
    assert argv[:2] == ["systemd-run", "--unit=jailer-idio16"]
    assert argv[argv.index("--") + 1:] == [jailer_exe, "run", "/p.toml"]
    properties = {a.split("=", 1)[1] for a in argv if a.startswith("--property=")}
    expected = {f"{d.key}={d.value}" for d in service_directives(plan, request) if d.key != "ExecStart"}
    assert properties == expected
    assert "--socket-property=ListenStream=/run/jailer/jailer-idio16/vfio-user.sock" in argv


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "bad/name"}, "--name"),
    ({"name": "x.service"}, "--name"),
    ({"socket_path": "relative.sock"}, "--socket-path"),
])
def test_bad_requests_name_the_option(jailer_exe, kwargs, message):
    with pytest.raises(UsageError, match=message):
        make_request(device_plan(), "/p.toml", jailer_exe, **kwargs)


def test_plan_without_listener_is_refused(jailer_exe):
    with pytest.raises(UsageError, match="one 'unix-listener' fd for the vfio-user socket .*found none"):
        make_request(device_plan(fds=()), "/p.toml", jailer_exe)
    two = (FdSpec("a", "unix-listener", 3), FdSpec("b", "unix-listener", 4))
    with pytest.raises(UsageError, match="named 'vfio-user' if there are several.*found a, b"):
        make_request(device_plan(fds=two), "/p.toml", jailer_exe)
    with pytest.raises(UsageError, match="absolute path to the jailer"):
        make_request(device_plan(), "/p.toml", "jailer")


# --- The kernel behind the choices: systemd's mount setup emulated with unshare(1). ---

EMULATE_UNIT_NAMESPACE = r"""
set -e
mount --make-rprivate /
root=$(mktemp -d)
mount --rbind / "$root"
cd "$root"
{setup}
mkdir -p "$root/tmp/.old" && pivot_root . "tmp/.old" && cd / && umount -l /tmp/.old
unshare --user --map-root-user --mount --pid --fork --mount-proc sh -c 'mount -t tmpfs jail /mnt && echo jail-built'
"""

PROTECTIONS_WE_SET = {
    "ProtectSystem=strict": "mount -o remount,bind,ro .",
    "PrivateDevices=yes": "mount -t tmpfs -o mode=0755,nosuid dev dev",
    "PrivateTmp=yes": "mount -t tmpfs tmp tmp",
    "ProtectHome=yes": "mount -t tmpfs -o mode=000 home home && mount -t tmpfs -o mode=000 home root",
}


def build_jail_inside(setup: str) -> subprocess.CompletedProcess:
    script = EMULATE_UNIT_NAMESPACE.format(setup=setup)
    return subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=30)


needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="emulating a unit's mount namespace needs root and unshare(1)")


@needs_root
def test_jail_builds_under_the_protections_we_set():
    result = build_jail_inside("\n".join(PROTECTIONS_WE_SET.values()))
    assert result.stdout.strip() == "jail-built", result.stderr


@needs_root
def test_protect_kernel_tunables_would_break_the_jail():
    """Why the unit says ProtectKernelTunables=no: a read-only /proc/sys overmount makes
    /proc not 'fully visible', so a user namespace may not mount a fresh /proc."""
    result = build_jail_inside("mount --bind proc/sys proc/sys && mount -o remount,bind,ro proc/sys")
    assert "jail-built" not in result.stdout
    assert "Operation not permitted" in result.stderr


MDWE_FILTER = r"""
import errno, os, sys, pyseccomp, prctl
WX = 0x2 | 0x4
rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
rules.add_rule(pyseccomp.ERRNO(errno.EPERM), "mmap", pyseccomp.Arg(2, pyseccomp.MASKED_EQ, WX, WX))
for name in ("mprotect", "pkey_mprotect"):
    rules.add_rule(pyseccomp.ERRNO(errno.EPERM), name, pyseccomp.Arg(2, pyseccomp.MASKED_EQ, 0x4, 0x4))
prctl.set_no_new_privs(True)
rules.load()
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""

LAUNCHER_STACK = r"""
import ctypes, mmap, click, prctl, pyseccomp, toml
callback = ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)
assert callback() == 7
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    print("launcher-ok, W|X refused")
"""


def test_launcher_stack_runs_under_memory_deny_write_execute():
    """Why MemoryDenyWriteExecute=yes is safe: the filter systemd installs for it (W|X mmap,
    +X mprotect refused) leaves the launcher's Python stack, ctypes callbacks included, working."""
    result = subprocess.run([sys.executable, "-c", MDWE_FILTER, LAUNCHER_STACK], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip() == "launcher-ok, W|X refused", result.stderr


# --- The command, from a real profile through jailer.profile.build_plan. ---

PROFILE = """
name = "idio16"

[program]
argv = ["/bin/true", "--fd={fd:vfio-user}"]

[seccomp]
allow = ["@default"]

[limits.cgroup]
memory = "64M"
pids = 8

[[fds]]
name = "vfio-user"
kind = "unix-listener"
number = 3
"""


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "idio16.toml"
    path.write_text(PROFILE)
    return path


def run_command(*args):
    from click.testing import CliRunner

    from jailer.systemd import systemd_command

    return CliRunner().invoke(systemd_command, [str(a) for a in args])


def test_command_writes_verifiable_units(profile, tmp_path, jailer_exe):
    out = tmp_path / "units"
    result = run_command(profile, "--socket", "--name", "idio16", "--output-dir", out, "--jailer", jailer_exe)
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(out / "idio16.service"), str(out / "idio16.socket")]
    verify(out / "idio16.service", out / "idio16.socket")
    service = (out / "idio16.service").read_text()
    assert f"ExecStart={jailer_exe} run {profile}\n" in service
    assert f"MemoryMax={(64 << 20) + (64 << 20)}" in service
    assert "ListenStream=/run/jailer/idio16/vfio-user.sock" in (out / "idio16.socket").read_text()
    assert exposure(analyze("security", "--offline=yes", str(out / "idio16.service"))) <= EXPOSURE_THRESHOLD


def test_command_drop_in_and_systemd_run(profile, tmp_path, jailer_exe):
    result = run_command(profile, "--drop-in", "qemu-idio16.service", "--output-dir", tmp_path,
                         "--jailer", jailer_exe, "--socket-path", "/run/vm1/idio16.sock")
    assert result.exit_code == 0, result.output
    conf = tmp_path / "qemu-idio16.service.d" / "50-jailer.conf"
    assert result.output.strip() == str(conf)
    assert "--socket-path /run/vm1/idio16.sock" in conf.read_text()
    result = run_command(profile, "--print-systemd-run", "--jailer", jailer_exe)
    assert result.output.startswith("systemd-run --unit=jailer-idio16 ")
    assert result.output.rstrip().endswith(f"-- {jailer_exe} run {profile} --socket-path "
                                           "/run/jailer/jailer-idio16/vfio-user.sock")


@pytest.mark.parametrize("args, message", [
    (["--socket-group", "kvm"], "--socket-group needs --socket"),
    (["--socket", "--drop-in", "x.service"], "--drop-in and --socket are exclusive"),
    (["--drop-in", "noext"], "expected a full unit name"),
])
def test_command_usage_errors(profile, tmp_path, jailer_exe, args, message):
    result = run_command(profile, "--output-dir", tmp_path, "--jailer", jailer_exe, *args)
    assert isinstance(result.exception, UsageError) and message in str(result.exception)


@needs_root
def test_bounding_set_does_not_limit_a_new_user_namespace():
    """Why CapabilityBoundingSet= bounds only jailer's host-side work: a process whose bounding
    set lacks CAP_SYS_ADMIN still mounts inside a user namespace it creates."""
    drop_then_mount = ("import os, prctl; prctl.capbset.sys_admin = False; "
                       "os.execvp('unshare', ['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c', "
                       "'mount -t tmpfs x /mnt && echo mounted'])")
    result = subprocess.run([sys.executable, "-c", drop_then_mount], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "mounted", result.stderr
