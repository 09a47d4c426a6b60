"""Descriptor discovery (vhost-user search path, merging, masking, priority) and validation."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from devices.vfio_user.client import Client, ClientError

from jailer import descriptors
from jailer.descriptors import (DescriptorError, default_dirs, descriptor_files, descriptors_command,
                                for_this_installation, load, parse, parse_capabilities, search, select)

SHIPPED = Path(__file__).resolve().parent.parent / "share" / "qemu" / "vfio-user"


def descriptor(device_type="gpio-pci-idio-16", binary="/usr/bin/idio16", **extra):
    return {"description": "test device", "type": device_type, "binary": binary,
            "pci": {"vendor-id": 0x494F, "device-id": 0x0DC8, "class-code": 0x110000}, **extra}


@pytest.fixture
def tree(tmp_path):
    """Three levels like /usr/share, /etc and $XDG_CONFIG_HOME."""
    levels = [tmp_path / name / "qemu" / "vfio-user" for name in ("usr-share", "etc", "xdg")]
    for level in levels:
        level.mkdir(parents=True)

    def put(level, name, content):
        path = levels[level] / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    return levels, put


def test_shipped_descriptors_are_valid():
    idio16, virtio_blk = search([SHIPPED])
    assert idio16.type == "gpio-pci-idio-16"
    assert (idio16.pci.vendor_id, idio16.pci.device_id, idio16.pci.class_code) == (0x494F, 0x0DC8, 0x110000)
    assert idio16.sandbox.launcher == "/usr/bin/jailer" and idio16.sandbox.profile.endswith("gpio-pci-idio-16.toml")
    assert virtio_blk.type == "virtio-blk"
    assert (virtio_blk.pci.vendor_id, virtio_blk.pci.device_id, virtio_blk.pci.class_code) == (0x1AF4, 0x1042, 0x010000)
    # its data moves with preadv into guest RAM: the VMM must give that RAM an fd
    assert virtio_blk.sandbox.guest_memory == "shared" and virtio_blk.sandbox.profile.endswith("virtio-blk.toml")


def test_more_specific_directory_wins_by_basename(tree):
    levels, put = tree
    put(0, "50-idio16.json", descriptor(binary="/usr/bin/distro"))
    put(1, "50-idio16.json", descriptor(binary="/usr/local/bin/admin"))
    put(2, "50-idio16.json", descriptor(binary="/home/u/bin/user"))
    assert [d.binary for d in search(levels)] == ["/home/u/bin/user"]
    assert [d.binary for d in search(levels[:2])] == ["/usr/local/bin/admin"]


def test_empty_file_masks_a_less_specific_one(tree):
    levels, put = tree
    put(0, "50-idio16.json", descriptor())
    put(0, "60-other.json", descriptor(device_type="other-device"))
    put(1, "50-idio16.json", "")
    assert [d.type for d in search(levels)] == ["other-device"]


def test_sorted_by_basename_across_directories_and_first_match_wins(tree):
    levels, put = tree
    put(0, "70-late.json", descriptor(binary="/usr/bin/late"))
    put(1, "20-early.json", descriptor(binary="/usr/bin/early"))
    put(2, "40-other-type.json", descriptor(device_type="nvme", binary="/usr/bin/nvme"))
    assert [p.name for p in descriptor_files(levels)] == ["20-early.json", "40-other-type.json", "70-late.json"]
    assert select("gpio-pci-idio-16", levels).binary == "/usr/bin/early"
    assert select("nvme", levels).binary == "/usr/bin/nvme"


def test_hidden_non_json_and_non_regular_entries_are_skipped(tree):
    levels, put = tree
    put(0, ".50-hidden.json", descriptor(binary="/usr/bin/hidden"))
    put(0, "50-notes.txt", "not a descriptor")
    (levels[0] / "60-dir.json").mkdir()
    put(0, "80-real.json", descriptor(binary="/usr/bin/real"))
    assert [d.binary for d in search(levels)] == ["/usr/bin/real"]


def test_missing_directories_are_fine_and_no_match_says_where_it_looked(tmp_path):
    assert search([tmp_path / "absent"]) == []
    with pytest.raises(DescriptorError, match=r"no vfio-user descriptor of type 'nvme' in .*absent"):
        select("nvme", [tmp_path / "absent"])


def test_default_dirs_follow_the_vhost_user_order(tmp_path):
    dirs = [str(d) for d in default_dirs({"XDG_CONFIG_HOME": str(tmp_path)})]
    assert dirs[0] == "/usr/share/qemu/vfio-user"
    assert dirs[-2:] == ["/etc/qemu/vfio-user", f"{tmp_path}/qemu/vfio-user"]
    assert default_dirs({"HOME": "/home/u"})[-1] == Path("/home/u/.config/qemu/vfio-user")


@pytest.mark.parametrize("change, line", [
    ({"type": "GPIO Card"}, 'type: found "GPIO Card", expected a lower-case device type such as \'gpio-pci-idio-16\''),
    ({"binary": "idio16"}, 'binary: found "idio16", expected an absolute path'),
    ({"tags": "jailer"}, 'tags: found "jailer", expected a list of strings'),
    ({"pci": {"vendor-id": 70000, "device-id": 1, "class-code": 0}},
     "pci.vendor-id: found 70000, expected an integer from 0 to 0xffff"),
    ({"pci": {"vendor-id": True, "device-id": 1, "class-code": 0}},
     "pci.vendor-id: found true, expected an integer from 0 to 0xffff"),
    ({"pci": {"vendor-id": 1, "class-code": 0}}, "pci.device-id: missing, expected an integer from 0 to 0xffff"),
    ({"sandbox": {"launcher": "/usr/bin/jailer", "profile": "p.toml"}},
     'sandbox.profile: found "p.toml", expected an absolute path'),
    ({"sandbox": {"launcher": "/usr/bin/jailer", "profile": "/p.toml", "guest-memory": "private"}},
     'sandbox.guest-memory: found "private", expected one of shared, any'),
    ({"sandbox": {"launcher": "/j", "profile": "/p", "device-nodes": ["/etc/passwd"]}},
     'sandbox.device-nodes: found ["/etc/passwd"], expected a list of absolute paths under /dev'),
    ({"firmware": "x"}, "firmware: unknown key, expected one of description, type, binary, tags, pci, sandbox"),
])
def test_validation_error_is_one_line_naming_file_key_expected(change, line):
    with pytest.raises(DescriptorError) as caught:
        parse({**descriptor(), **change}, "/etc/qemu/vfio-user/50-x.json")
    assert caught.value.problems == [f"/etc/qemu/vfio-user/50-x.json: {line}"]


def test_every_problem_is_reported_at_once():
    with pytest.raises(DescriptorError) as caught:
        parse({"type": "x"}, "f.json")
    assert caught.value.problems == [
        "f.json: description: missing, expected a string",
        "f.json: binary: missing, expected an absolute path",
        "f.json: pci: missing, expected an object with vendor-id, device-id and class-code",
    ]


def test_unreadable_json_names_the_file(tree):
    levels, put = tree
    path = put(0, "50-broken.json", "{\"type\": ")
    with pytest.raises(DescriptorError, match=rf"^{path}: not valid JSON"):
        load(path)


def test_command_goes_through_the_sandbox_when_there_is_one(tree):
    levels, put = tree
    sandbox = {"launcher": "/usr/bin/jailer", "profile": "/usr/share/jailer/profiles/idio16.toml"}
    put(0, "50-idio16.json", descriptor(sandbox=sandbox))
    put(0, "60-plain.json", descriptor(device_type="plain", binary="/usr/bin/plain"))
    assert select("gpio-pci-idio-16", levels).command(fd=3) == [
        "/usr/bin/jailer", "run", "/usr/share/jailer/profiles/idio16.toml", "--fd=3"]
    assert select("plain", levels).command(socket_path="/run/p.sock") == ["/usr/bin/plain",
                                                                          "--socket-path=/run/p.sock"]


def test_print_capabilities_shape():
    caps = {"type": "gpio-pci-idio-16", "features": ["migration"],
            "pci": {"vendor-id": 0x494F, "device-id": 0x0DC8, "class-code": 0x110000}}
    assert parse_capabilities(caps, "idio16 --print-capabilities") == caps
    with pytest.raises(DescriptorError, match="features: missing, expected a list of strings"):
        parse_capabilities({"type": "gpio-pci-idio-16"}, "idio16 --print-capabilities")


def test_a_real_backend_prints_valid_capabilities():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "devices.gpio_pci_idio16", "--print-capabilities",
                             "--socket-path", "/nonexistent"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    caps = parse_capabilities(json.loads(result.stdout), "gpio-pci-idio-16 --print-capabilities")
    assert caps["type"] == "gpio-pci-idio-16" and "listen-fds" in caps["features"]


def test_listing_command(tree):
    levels, put = tree
    put(0, "50-idio16.json", descriptor())
    put(1, "60-nvme.json", descriptor(device_type="nvme"))
    dirs = [arg for level in levels for arg in ("--dir", str(level))]
    result = CliRunner().invoke(descriptors_command, dirs)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].startswith("50-idio16.json  gpio-pci-idio-16  494f:0dc8 class 110000  /usr/bin/idio16  unjailed")
    assert lines[1].startswith("60-nvme.json  nvme")
    result = CliRunner().invoke(descriptors_command, [*dirs, "--json", "--type", "nvme"])
    [only] = json.loads(result.output)
    assert only["type"] == "nvme" and only["path"] == str(levels[1] / "60-nvme.json")


# --- The documents' examples are the real thing: parsed and validated here. ---

DOCS = Path(__file__).resolve().parent.parent / "docs"
QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def fenced_blocks(path: Path, language: str) -> list[str]:
    import re

    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def assert_vfio_user_device(argument: str) -> None:
    device = json.loads(argument)
    assert device["driver"] == "vfio-user-pci"
    assert device["socket"]["type"] == "unix" and device["socket"]["path"].startswith("/run/jailer/")


def test_qemu_command_line_in_docs():
    import re
    import shlex

    [command] = [b for b in fenced_blocks(DOCS / "qemu-libvirt.md", "sh") if b.lstrip().startswith("qemu-system")]
    argv = shlex.split(command.replace("\\\n", " "))
    assert_vfio_user_device(argv[argv.index("-device") + 1])
    memory = dict(item.split("=", 1) for item in argv[argv.index("-object") + 1].split(",")[1:])
    machine = dict(item.split("=", 1) for item in argv[argv.index("-machine") + 1].split(",")[1:])
    assert argv[argv.index("-object") + 1].startswith("memory-backend-memfd,")
    assert memory["share"] == "on" and machine["memory-backend"] == memory["id"]
    assert memory["size"] == argv[argv.index("-m") + 1]
    assert re.search(r"QEMU 10\.1 or newer", (DOCS / "qemu-libvirt.md").read_text())


def test_libvirt_domain_in_docs():
    import xml.etree.ElementTree as ET

    [domain_xml] = fenced_blocks(DOCS / "qemu-libvirt.md", "xml")
    domain = ET.fromstring(domain_xml)
    assert domain.tag == "domain" and domain.get("type") == "kvm"
    assert domain.find("memoryBacking/source").get("type") == "memfd"
    assert domain.find("memoryBacking/access").get("mode") == "shared"
    args = [a.get("value") for a in domain.find(f"{QEMU_NS}commandline").findall(f"{QEMU_NS}arg")]
    assert args[0] == "-device"
    assert_vfio_user_device(args[1])


def test_libvirt_domain_in_docs_passes_libvirts_own_schema(tmp_path):
    """virt-xml-validate checks the snippet against the domain schema libvirt ships."""
    import subprocess

    [domain_xml] = fenced_blocks(DOCS / "qemu-libvirt.md", "xml")
    (tmp_path / "domain.xml").write_text(domain_xml)
    result = subprocess.run(["virt-xml-validate", str(tmp_path / "domain.xml"), "domain"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_descriptor_examples_in_docs():
    """The example is what a package for /usr installs (--install DIR --prefix /usr)."""
    descriptor_doc, capabilities_doc = fenced_blocks(DOCS / "vfio-user-descriptor.md", "json")
    example = json.loads(descriptor_doc)
    parse(example, "docs/vfio-user-descriptor.md")
    assert example == for_this_installation(SHIPPED / "50-gpio-pci-idio-16.json", prefix="/usr")
    parse_capabilities(json.loads(capabilities_doc), "docs/vfio-user-descriptor.md")


@pytest.mark.parametrize("doc", ["qemu-libvirt.md", "systemd.md"])
def test_shell_snippets_in_docs_parse(doc):
    import subprocess

    for block in fenced_blocks(DOCS / doc, "sh"):
        result = subprocess.run(["sh", "-n"], input=block, capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, f"{doc}: {result.stderr}\n{block}"


ACCEPT_ONCE_PROFILE = """
name = "accept-once"

[program]
runtime = "python"
argv = ["-c", "import socket; c = socket.socket(fileno=3).accept()[0]; c.sendall(b'device says hi')"]

[seccomp]
allow = ["@python", "accept4", "accept", "sendto", "getsockopt", "getsockname", "getpeername"]

[[fds]]
name = "vfio-user"
kind = "unix-listener"
number = 3
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="runs jailer as a libvirt hook would, as root")
def test_hook_without_systemd_from_docs(tmp_path):
    """The documented hook runs a real `jailer run`, returns once the status stream says
    `started`, and a client can then talk to the device through the socket."""
    import socket
    import subprocess
    import sys

    [hook] = [b for b in fenced_blocks(DOCS / "qemu-libvirt.md", "sh") if "setsid jailer run" in b]
    profile = tmp_path / "idio16.toml"
    profile.write_text(ACCEPT_ONCE_PROFILE)
    state = tmp_path / "state"
    script = hook.replace("/etc/jailer/idio16.toml", str(profile)).replace("/run/jailer/vm1", str(state))
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    subprocess.run(["sh", "-e", "-c", script], check=True, timeout=30, env=env)
    pid = int((state / "idio16.pid").read_text())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(state / "idio16.sock"))
            assert client.recv(64) == b"device says hi"
        for _ in range(100):
            if '"event":"exited"' in (state / "idio16.status").read_text():
                break
            time.sleep(0.05)
        assert '"event":"exited","code":0' in (state / "idio16.status").read_text()
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_an_empty_listing_says_where_it_looked(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "jailer", "descriptors", "--dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == ""
    assert result.stderr == f"no vfio-user descriptors in {tmp_path}\n"


def test_the_readme_set_up_makes_the_bundled_descriptor_discoverable():
    """setup.sh installs the bundled descriptor with this installation's paths into the
    venv's data directory, where `jailer descriptors` looks (an editable install copies none)."""
    result = subprocess.run([sys.executable, "-m", "jailer", "descriptors", "--json", "--type", "gpio-pci-idio-16"],
                            capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found and found[0]["path"].startswith(sys.prefix)
    for path in (found[0]["binary"], found[0]["sandbox"]["launcher"], found[0]["sandbox"]["profile"]):
        assert os.path.exists(path), path


def test_the_readme_set_up_writes_the_bytecode_the_sandbox_cannot():
    """setup.sh byte-compiles jailer and the bundled devices: the sandbox binds them
    read-only and sets PYTHONDONTWRITEBYTECODE, so without it a device compiles every module
    from source on every start (a new module here needs ./setup.sh run again)."""
    import importlib.util

    repo = Path(__file__).resolve().parent.parent
    sources = [path for package in ("jailer", "devices") for path in (repo / package).rglob("*.py")]
    missing = [str(path.relative_to(repo)) for path in sources
               if not os.path.exists(importlib.util.cache_from_source(str(path)))]
    assert len(sources) > 50 and missing == [], f"no bytecode (run ./setup.sh): {missing}"


def test_installed_descriptor_starts_the_jailed_device_as_a_management_tool_would(tmp_path):
    written = subprocess.run([sys.executable, "-m", "jailer", "descriptors", "--install", str(tmp_path / "vfio-user")],
                             capture_output=True, text=True, timeout=60)
    assert written.returncode == 0, written.stderr
    assert written.stderr == "".join(f"jailer descriptors: wrote {tmp_path / 'vfio-user' / name}\n"
                                     for name in ("50-gpio-pci-idio-16.json", "50-virtio-blk.json"))
    with started_from(select("gpio-pci-idio-16", [tmp_path / "vfio-user"]), tmp_path / "idio16.sock") as (_, client):
        assert client.region_read(7, 0, 4) == bytes.fromhex("4f49c80d")


@contextlib.contextmanager
def started_from(descriptor, socket_path):
    """Start a device as a management tool would from its descriptor; yields the process and
    a connected vfio-user client, and stops the device with SIGTERM."""
    device = subprocess.Popen(descriptor.command(socket_path=str(socket_path)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        client = None
        deadline = time.monotonic() + 20
        while client is None:
            try:
                client = Client.connect(str(socket_path))
            except ClientError:
                assert device.poll() is None and time.monotonic() < deadline, device.stderr.read()
                time.sleep(0.02)
        try:
            yield device, client
        finally:
            client.close()
    finally:
        device.terminate()
        device.wait(20)


# --- Bundled descriptors and profiles: found from a checkout, said when not in effect. ---

def test_a_checkout_uses_its_own_profiles_and_templates():
    """A clone or an editable install runs the profiles it has, not an installed copy."""
    checkout = Path(__file__).resolve().parent.parent
    assert descriptors.shipped_profile("gpio-pci-idio-16") == checkout / "profiles" / "gpio-pci-idio-16.toml"
    assert descriptors.bundled_templates() == sorted(SHIPPED.glob("*.json"))


def test_an_installed_package_finds_its_data_files_under_its_schemes_data_directory(tmp_path, monkeypatch):
    """Installed (no pyproject.toml beside the package), the shipped files are where
    pyproject's data-files put them, under the install scheme's data directory."""
    profiles = tmp_path / "share" / "jailer" / "profiles"
    profiles.mkdir(parents=True)
    monkeypatch.setattr(descriptors, "PACKAGE_PARENT", tmp_path / "lib" / "site-packages")
    monkeypatch.setattr(descriptors, "installation", lambda: (tmp_path / "bin", tmp_path))
    assert descriptors.shipped_profile("virtio-blk") == profiles / "virtio-blk.toml"
    with pytest.raises(DescriptorError, match=r"shipped files are in none of .*/share/jailer/vfio-user.*reinstall"):
        descriptors.bundled_templates()


def test_the_packager_prefix_writes_the_packages_paths_without_needing_them(tmp_path):
    written = subprocess.run([sys.executable, "-m", "jailer", "descriptors", "--install", str(tmp_path / "d"),
                              "--prefix", "/opt/nowhere"], capture_output=True, text=True, timeout=60)
    assert written.returncode == 0, written.stderr
    [idio16, virtio_blk] = search([tmp_path / "d"])
    assert (idio16.binary, idio16.sandbox.launcher, idio16.sandbox.profile) == (
        "/opt/nowhere/bin/gpio-pci-idio-16", "/opt/nowhere/bin/jailer",
        "/opt/nowhere/share/jailer/profiles/gpio-pci-idio-16.toml")
    assert virtio_blk.sandbox.profile == "/opt/nowhere/share/jailer/profiles/virtio-blk.toml"


@pytest.mark.parametrize("argv, line", [
    (["--install", "d", "--prefix", "usr"],
     "jailer: --prefix: found 'usr', expected the absolute prefix the package installs to, such as /usr\n"),
    (["--prefix", "/usr"],
     "jailer: --prefix goes with --install DIR: it names where the package that DIR belongs to installs jailer\n"),
])
def test_a_wrong_prefix_is_one_line(tmp_path, argv, line):
    result = subprocess.run([sys.executable, "-m", "jailer", "descriptors", *argv], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, line)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("euid, target", [(0, "/etc/qemu/vfio-user"), (1000, "~/.config/qemu/vfio-user")])
def test_a_bundled_device_in_effect_nowhere_is_said_with_the_command_that_installs_it(tree, monkeypatch,
                                                                                     euid, target):
    levels, put = tree
    put(1, "50-other.json", descriptor(device_type="virtio-blk"))
    monkeypatch.setattr(descriptors, "default_dirs", lambda environ=None: levels)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setattr(descriptors, "_this_jailer", lambda: "jailer")
    result = CliRunner().invoke(descriptors_command, [])
    assert result.exit_code == 0 and result.stdout.startswith("50-other.json  virtio-blk")
    assert result.stderr == ("jailer descriptors: no descriptor in effect for the bundled gpio-pci-idio-16; "
                             f"install it with: jailer descriptors --install {target}\n")
    # the same with --type and --json; nothing for another type, nor for directories given with --dir
    result = CliRunner().invoke(descriptors_command, ["--json", "--type", "gpio-pci-idio-16"])
    assert (result.exit_code, json.loads(result.stdout)) == (0, [])
    assert result.stderr.startswith("jailer descriptors: no descriptor in effect for the bundled gpio-pci-idio-16;")
    assert CliRunner().invoke(descriptors_command, ["--type", "virtio-blk"]).stderr == ""
    dirs = [arg for level in levels for arg in ("--dir", str(level))]
    assert CliRunner().invoke(descriptors_command, dirs).stderr == ""
