"""jailer installed the ways users install it, from a fresh copy of the repository: a wheel
built from its sdist into a new venv, and a distribution package's descriptors. (The README's
set-up, an editable install by setup.sh, is tested in test_descriptors.py.)

Everything is built and installed offline, with the build tools of the venv running the
tests; the new venv reaches jailer's dependencies there through a .pth file.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from jailer.descriptors import search, select
from test_descriptors import started_from

REPO = Path(__file__).resolve().parent.parent
BUNDLED = ("gpio-pci-idio-16", "virtio-blk")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
OFFLINE = ["--no-index", "--no-deps", "--no-build-isolation"]


def fresh_copy(destination: Path) -> Path:
    """The files a fresh clone would have, plus those not committed yet (but not ignored):
    what a developer builds from, and in CI exactly the clone."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: no way to tell the repository's files from build output")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():   # a tracked file deleted in the working tree is not there
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def run(argv, **kwargs):
    """In a directory of no package: python -c would import jailer from the current one."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **{"cwd": "/", **kwargs})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel of a fresh copy, built as a build frontend does: sdist first, wheel from it."""
    tree = fresh_copy(tmp_path_factory.mktemp("tree"))
    dist = tmp_path_factory.mktemp("dist")
    sdist = run([sys.executable, "-c", "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))",
                 str(dist)], cwd=tree)
    assert sdist.returncode == 0, sdist.stderr
    built = run([*PIP, "wheel", "-q", *OFFLINE, "-w", str(dist), str(dist / sdist.stdout.split()[-1])])
    assert built.returncode == 0, built.stdout + built.stderr
    [found] = dist.glob("*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A new venv with only the wheel installed, and a home with no descriptors."""
    root = tmp_path_factory.mktemp("venv")
    new = root / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(new)], check=True, timeout=120)
    installed = run([*PIP, "--python", str(new / "bin" / "python"), "install", "-q", "--no-deps", "--no-index",
                     str(wheel)])
    assert installed.returncode == 0, installed.stdout + installed.stderr
    site_packages = run([str(new / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    (Path(site_packages.stdout.strip()) / "jailer-test-dependencies.pth").write_text(
        sysconfig.get_path("purelib") + "\n")
    (root / "home").mkdir()
    return new


def jailer(venv, *args):
    """The installed `jailer`, with a PATH that does not find it and a home of its own."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(venv.parent / "home")}
    return run([str(venv / "bin" / "jailer"), *args], env=env)


def installed_monitor(venv) -> Path:
    found = run([str(venv / "bin" / "python"), "-c", "from jailer import monitor; print(monitor.MONITOR)"])
    assert found.returncode == 0, found.stderr
    return Path(found.stdout.strip())


def test_the_wheel_carries_the_monitor_and_jailer_uses_it(wheel, venv):
    assert wheel.name.endswith(f"-py3-none-linux_{platform.machine()}.whl")   # a native program inside
    monitor = installed_monitor(venv)
    assert monitor.is_relative_to(venv) and os.access(monitor, os.X_OK)
    assert not (monitor.parent / "monitor.c").exists()   # a source newer than the binary would disable it
    checked = jailer(venv, "check", "--json", str(venv / "share" / "jailer" / "profiles" / "gpio-pci-idio-16.toml"))
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["host"]["monitor"] == {"path": str(monitor), "built": True}


def test_after_a_wheel_install_the_listing_says_how_to_install_the_bundled_descriptors(venv):
    """The wheel installs no descriptor where management tools look (its templates name /usr
    paths), and the listing says so with the command that writes real ones."""
    listed = jailer(venv, "descriptors")
    assert listed.returncode == 0
    assert str(venv) not in listed.stdout
    target = "/etc/qemu/vfio-user" if os.geteuid() == 0 else "~/.config/qemu/vfio-user"
    hints = [f"jailer descriptors: no descriptor in effect for the bundled {t}; install it with: "
             f"{venv}/bin/jailer descriptors --install {target}\n"
             for t in BUNDLED if f"  {t}  " not in listed.stdout]   # unless this host has one in /etc
    assert listed.stderr.endswith("".join(hints))
    assert len(hints) == 2 or Path("/etc/qemu/vfio-user").is_dir() or Path("/usr/share/qemu/vfio-user").is_dir()


def test_descriptors_installed_from_a_wheel_start_the_jailed_device(venv, tmp_path):
    written = jailer(venv, "descriptors", "--install", str(tmp_path / "vfio-user"))
    assert written.returncode == 0, written.stderr
    for descriptor in search([tmp_path / "vfio-user"]):
        for path in (descriptor.binary, descriptor.sandbox.launcher, descriptor.sandbox.profile):
            assert Path(path).is_relative_to(venv) and os.path.exists(path), path
    monitor = str(installed_monitor(venv))
    with started_from(select("gpio-pci-idio-16", [tmp_path / "vfio-user"]), tmp_path / "idio16.sock") as (device,
                                                                                                      client):
        assert client.region_read(7, 0, 4) == bytes.fromhex("4f49c80d")
        deadline = time.monotonic() + 10   # the launcher hands the running sandbox to the wheel's monitor
        while os.readlink(f"/proc/{device.pid}/exe") != monitor:
            assert time.monotonic() < deadline, os.readlink(f"/proc/{device.pid}/exe")
            time.sleep(0.02)
    assert device.returncode == 0, device.stderr.read()


def test_a_packager_writes_the_descriptors_of_the_installed_package(venv, tmp_path):
    """`--prefix /usr` writes the paths the package will have, into its staging directory;
    the profiles it names are where the wheel installs them under the prefix."""
    staged = tmp_path / "debian" / "tmp" / "usr" / "share" / "qemu" / "vfio-user"
    written = jailer(venv, "descriptors", "--install", str(staged), "--prefix", "/usr")
    assert written.returncode == 0, written.stderr
    found = search([staged])
    assert [d.type for d in found] == list(BUNDLED)
    for descriptor in found:
        assert (descriptor.binary, descriptor.sandbox.launcher, descriptor.sandbox.profile) == (
            f"/usr/bin/{descriptor.type}", "/usr/bin/jailer", f"/usr/share/jailer/profiles/{descriptor.type}.toml")
        assert (venv / "bin" / descriptor.type).exists()
        assert (venv / Path(descriptor.sandbox.profile).relative_to("/usr")).exists()


@pytest.mark.parametrize("gcc, line", [
    (None, "cannot build jailer/jailer-monitor: gcc is not on PATH; "),
    ("#!/bin/sh\necho 'ld: cannot find -lc' >&2\nexit 1\n",
     "cannot build jailer/jailer-monitor: gcc cannot link a static program; "),
], ids=["no gcc", "no static libc"])
def test_a_wheel_is_not_built_without_the_monitor(tmp_path, gcc, line):
    tree = fresh_copy(tmp_path / "tree")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if gcc:
        (bin_dir / "gcc").write_text(gcc)
        (bin_dir / "gcc").chmod(0o755)
    built = run([*PIP, "wheel", "-q", *OFFLINE, "-w", str(tmp_path / "dist"), str(tree)],
                env={"PATH": str(bin_dir), "HOME": str(tmp_path)})
    assert built.returncode != 0
    assert f"error: {line}install gcc and the static C library (Debian: apt-get install gcc libc6-dev)\n" \
        in built.stderr
    assert not list((tmp_path / "dist").glob("*.whl"))


def build_monitor_with(tmp_path, monkeypatch, musl_gcc: str) -> Path:
    """setup.py's build_monitor with `musl_gcc` (a shell script) first on PATH; the monitor built."""
    sys.path.insert(0, str(REPO))
    try:
        import setup
    finally:
        sys.path.remove(str(REPO))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "musl-gcc").write_text(musl_gcc)
    (bin_dir / "musl-gcc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    output = tmp_path / "jailer-monitor"
    setup.build_monitor(str(output))
    assert output.read_bytes()[:4] == b"\x7fELF" and os.access(output, os.X_OK)
    return output


@pytest.mark.skipif(shutil.which("musl-gcc") is None, reason="musl-tools is not installed (setup.sh installs it)")
def test_the_monitor_is_built_against_musl_where_musl_gcc_is_installed(tmp_path, monkeypatch):
    """No glibc start-up (its CPU probing is ~75 VM exits before the first notification is
    answered) and 160 kB resident instead of 900 kB: see setup.py."""
    used = tmp_path / "musl-gcc-ran"
    build_monitor_with(tmp_path, monkeypatch, f"#!/bin/sh\ntouch {used}\nexec {shutil.which('musl-gcc')} \"$@\"\n")
    assert used.exists()


def test_without_a_working_musl_gcc_the_monitor_is_built_with_gcc(tmp_path, monkeypatch):
    monitor = build_monitor_with(tmp_path, monkeypatch, "#!/bin/sh\necho 'musl-gcc: broken' >&2\nexit 1\n")
    assert monitor.stat().st_size > 0
