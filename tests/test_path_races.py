"""Root acting on paths in a directory another user controls, raced by that user.

Each test runs a real attacker process, as its own unprivileged uid, that swaps entries of
its directory for symlinks to a root-only victim (or swaps a whole subdirectory for a
symlink to a root-only directory) as fast as it can, while root repeats one privileged
path operation of jailer's thousands of times. Nothing outside what jailer created may
change: not the victim's owner, mode or content, not the victim directory's entries.
docs/security.md says why each operation is safe.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jailer import run_cli
from jailer.launch import launcher
from jailer.layers import fds, mounts
from jailer.errors import JailerError
from jailer.host import paths
from jailer.plan import Bind, FdSpec, FilesystemPlan

from engine_sandbox import DEVICE_PROFILE

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the attacker is another uid")

ATTACKER = 4321          # a uid and gid no account uses
ROUNDS = 20000           # privileged operations per test, at most
BUDGET = 2.0             # seconds of racing per test
SANDBOX = (65534, 65534)

# The attacker, in its own directory DIR, in C so that it loses no time. Entry mode: whenever
# NAME appears (jailer's socket, pid file, output...) it renames a ready symlink to TARGET over
# it, and removes that symlink again to let the next round start. Directory mode: it keeps
# exchanging DIR/NAME, a directory of its own, with a symlink to TARGET. Plant mode: it keeps a
# symlink to TARGET at NAME. All stop when STOP exists and print how often they swapped.
ATTACK = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static time_t deadline;

static int go_on(const char *stop, unsigned long spins)
{
	return (spins & 0xfff) || (access(stop, F_OK) < 0 && time(NULL) < deadline);
}

int main(int argc, char **argv)
{
	const char *mode = argv[1], *name = argv[3], *target = argv[4], *stop = argv[5];
	unsigned long spins = 0;
	long swaps = 0;
	struct stat st;
	if (argc != 6 || chdir(argv[2]) < 0)
		return 2;
	deadline = time(NULL) + 60;   /* bounded, whatever happens to the test */
	if (!strcmp(mode, "plant") && symlink(target, name) == 0)
		swaps++;   /* there before the first round */
	printf("racing\n");
	fflush(stdout);
	if (!strcmp(mode, "entry")) {
		symlink(target, ".link");
		while (go_on(stop, ++spins)) {
			if (lstat(name, &st) < 0)
				continue;
			if (S_ISLNK(st.st_mode)) {
				unlink(name);
				continue;
			}
			if (rename(".link", name) == 0) {
				swaps++;
				symlink(target, ".link");
			}
		}
	} else if (!strcmp(mode, "plant")) {
		while (go_on(stop, 0)) {
			if (lstat(name, &st) == 0 && !S_ISLNK(st.st_mode))
				unlink(name);   /* what root made there meanwhile */
			if (symlink(target, name) == 0)
				swaps++;
			usleep(100);
		}
	} else {
		symlink(target, ".alternate");
		mkdir(name, 0755);
		while (go_on(stop, ++spins))
			if (renameat2(AT_FDCWD, ".alternate", AT_FDCWD, name, RENAME_EXCHANGE) == 0)
				swaps++;
	}
	printf("%ld\n", swaps);
	return 0;
}
"""


@pytest.fixture(autouse=True)
def stop_attackers():
    """Whatever a test did, its attacker is stopped and its directory removed; and the
    privileged side, refused or not thousands of times, leaked no descriptor."""
    open_before = len(os.listdir("/proc/self/fd"))
    yield
    while Attacker.running:
        Attacker.running.pop().finish()
    assert len(os.listdir("/proc/self/fd")) == open_before


@pytest.fixture(scope="module", autouse=True)
def attacker_binary(tmp_path_factory):
    directory = tmp_path_factory.mktemp("attacker")
    source = directory / "attack.c"
    source.write_text(ATTACK)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(directory / "attack"), str(source)], check=True)
    Attacker.binary = str(directory / "attack")


class Attacker:
    """The unprivileged attacker process, started in its own directory (mode 0755)."""

    binary = None   # built by the attacker_binary fixture
    running: list = []

    def __init__(self, mode: str, name: str, target: str):
        self.directory = tempfile.mkdtemp(prefix="jailer-attacker-")
        os.chmod(self.directory, 0o755)
        os.chown(self.directory, ATTACKER, ATTACKER)
        self.stop = os.path.join(tempfile.gettempdir(), f"jailer-attacker-stop-{os.getpid()}-{time.monotonic_ns()}")
        self.process = subprocess.Popen(
            ["setpriv", f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups", self.binary,
             mode, self.directory, name, target, self.stop], stdout=subprocess.PIPE, text=True)
        Attacker.running.append(self)
        assert self.process.stdout.readline() == "racing\n"
        self.swaps = 0

    def path(self, *parts) -> str:
        return os.path.join(self.directory, *parts)

    def finish(self) -> int:
        if self in Attacker.running:
            Attacker.running.remove(self)
        open(self.stop, "w").close()
        try:
            out, _ = self.process.communicate(timeout=30)
        finally:
            self.process.kill()
            os.unlink(self.stop)
            subprocess.run(["rm", "-rf", "--one-file-system", self.directory], check=True)
        self.swaps = int(out)
        return self.swaps


class Victim:
    """A root-only directory holding a root-only file (and optionally a socket)."""

    def __init__(self, with_socket=False):
        self.directory = tempfile.mkdtemp(prefix="jailer-victim-")   # 0700 root
        atexit.register(shutil.rmtree, self.directory, True)
        self.file = os.path.join(self.directory, "secret")
        with open(self.file, "w") as f:
            f.write("root only\n")
        os.chmod(self.file, 0o600)
        self.listener = None
        if with_socket:
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(os.path.join(self.directory, "s.sock"))
            self.listener.listen()
        self.before = self.snapshot()

    def snapshot(self) -> dict:
        state = {}
        for name in sorted(os.listdir(self.directory)):
            st = os.lstat(os.path.join(self.directory, name))
            content = None
            if stat.S_ISREG(st.st_mode):
                with open(os.path.join(self.directory, name), "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            state[name] = (st.st_ino, st.st_uid, st.st_gid, oct(st.st_mode), st.st_nlink, content)
        st = os.stat(self.directory)
        state["."] = (st.st_uid, st.st_gid, oct(st.st_mode))
        return state

    def assert_untouched(self):
        assert self.snapshot() == self.before
        if self.listener is not None:
            self.listener.close()
        subprocess.run(["rm", "-rf", self.directory], check=True)


def race(attacker: Attacker, operation) -> tuple[int, int]:
    """Repeat operation() until ROUNDS or BUDGET; returns (rounds, rounds that failed with an
    error, which is a fine outcome under attack: the callers turn it into one line)."""
    deadline = time.monotonic() + BUDGET
    rounds = refused = 0
    while rounds < ROUNDS and time.monotonic() < deadline:
        rounds += 1
        try:
            operation()
        except (JailerError, OSError):
            refused += 1
    return rounds, refused


def _check(attacker, victim, rounds, min_swaps=20, min_rounds=100):
    swaps = attacker.finish()
    victim.assert_untouched()
    assert rounds >= min_rounds and swaps >= min_swaps, (rounds, swaps)   # a real race, not a walkover


@pytest.mark.parametrize("group", [ATTACKER, None], ids=["socket-group", "sandbox-owner"])
def test_socket_path_never_gives_away_a_file_swapped_in_for_the_socket(group):
    """The reported attack: a symlink to the victim renamed over the socket jailer just bound."""
    victim = Victim()
    attacker = Attacker("entry", "s.sock", victim.file)
    spec = FdSpec("vfio-user", "unix-listener", 3)

    def operation():
        manifest = fds.Manifest.gather((spec,), {}, attacker.path("s.sock"), SANDBOX, socket_group=group)
        manifest.close()

    rounds, _ = race(attacker, operation)
    _check(attacker, victim, rounds)


def test_a_stale_socket_is_replaced_only_by_exchange_never_anything_swapped_in():
    victim = Victim()
    attacker = Attacker("entry", "s.sock", victim.file)
    spec = FdSpec("vfio-user", "unix-listener", 3)

    def operation():
        manifest = fds.Manifest.gather((spec,), {}, attacker.path("s.sock"), SANDBOX)
        for made in manifest.made:
            made.close()        # leave the socket behind: the next round finds a stale one
        manifest.made.clear()
        manifest.close()

    rounds, _ = race(attacker, operation)
    _check(attacker, victim, rounds)


def test_a_socket_under_a_swapped_parent_never_lands_in_or_removes_from_another_directory():
    """DIR/sub swapped for a symlink to a root-only directory holding another service's
    socket at the same name: neither is that socket removed nor is anything created there."""
    victim = Victim(with_socket=True)
    attacker = Attacker("directory", "sub", victim.directory)
    spec = FdSpec("vfio-user", "unix-listener", 3)

    def operation():
        manifest = fds.Manifest.gather((spec,), {}, attacker.path("sub", "s.sock"), SANDBOX, socket_group=ATTACKER)
        manifest.close()

    rounds, _ = race(attacker, operation)
    _check(attacker, victim, rounds)


@pytest.mark.parametrize("swapped", ["entry", "directory"])
def test_pidfile_never_writes_or_removes_outside_its_directory(swapped):
    victim = Victim()
    attacker = Attacker(swapped, "device.pid" if swapped == "entry" else "run",
                        victim.file if swapped == "entry" else victim.directory)
    target = attacker.path("device.pid") if swapped == "entry" else attacker.path("run", "secret")

    def operation():
        launcher._write_pidfile(target).remove()

    rounds, _ = race(attacker, operation)
    _check(attacker, victim, rounds, min_swaps=1 if swapped == "entry" else 20)   # a pid file lives for microseconds


def test_a_file_fd_never_opens_what_was_swapped_in():
    victim = Victim()
    attacker = Attacker("plant", "out", victim.file)
    spec = FdSpec("log", "file", 3, path=attacker.path("out"), mode="rw")

    def operation():
        manifest = fds.Manifest.gather((spec,), {}, None, SANDBOX)
        try:
            for _, fd in manifest.entries:
                os.write(fd, b"written by the sandbox\n")
        finally:
            manifest.close()

    rounds, _ = race(attacker, operation)
    _check(attacker, victim, rounds, min_swaps=1)


def test_a_bind_source_is_never_the_victim():
    victim = Victim()
    attacker = Attacker("directory", "data", victim.directory)
    secret = os.stat(victim.directory)
    filesystem = FilesystemPlan(binds=(Bind(attacker.path("data"), "/data", optional=True),))
    bound = []

    def operation():
        checked = mounts.check_sources(filesystem)
        bound.extend(v for v in checked.values() if v is not None)

    rounds, _ = race(attacker, operation)
    _check(attacker, victim, rounds)
    assert (secret.st_dev, secret.st_ino) not in bound


def test_written_outputs_never_replace_what_a_symlink_swapped_in_points_to():
    """jailer learn --output, jailer systemd --output-dir: atomic writes through a pinned directory."""
    victim = Victim()
    attacker = Attacker("directory", "units", victim.directory)

    def operation():
        paths.write_file(attacker.path("units", "secret"), b"[Unit]\n", 0o644, keep_mode=True).close()

    rounds, _ = race(attacker, operation)
    _check(attacker, victim, rounds)


def test_the_plan_cache_never_prunes_or_writes_a_directory_swapped_in(tmp_path):
    """JAILER_CACHE_DIR under a directory someone else controls: its pruning deletes entries
    whose profile is gone, so a swapped-in directory must never be the one it prunes."""
    victim = Victim()
    attacker = Attacker("directory", "cache", victim.directory)
    profile = tmp_path / "p.toml"
    profile.write_text("")
    key = run_cli._cache_key(str(profile))
    directory = attacker.path("cache")

    def operation():
        run_cli._write_cache(directory, run_cli._cache_file(directory, str(profile)), {"key": key})

    rounds, _ = race(attacker, operation)
    _check(attacker, victim, rounds)


def test_jailer_run_as_the_issue_reproduced_it():
    """The report, end to end: root runs the shipped device with --socket-path in the
    attacker's directory and --socket-group, stopping it after 0.15 s, again and again.
    Before the fix the victim became mode 0660 within one to five runs here."""
    victim = Victim()
    attacker = Attacker("entry", "s.sock", victim.file)
    jailer = str(Path(sys.executable).with_name("jailer"))
    runs = 25
    for _ in range(runs):
        run = subprocess.Popen([jailer, "run", str(DEVICE_PROFILE), "--socket-path", attacker.path("s.sock"),
                                "--socket-group", str(ATTACKER)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.15)
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=30)
    _check(attacker, victim, runs, min_swaps=5, min_rounds=runs)
