"""jailer.host.paths and the sockets, pid files and outputs built on it, one case at a time
(test_path_races.py races a live attacker against the same operations)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jailer.launch import launcher
from jailer.layers import fds
from jailer.errors import UsageError
from jailer.host import paths

from engine_sandbox import REPO, nobody_python

JAILER = str(Path(sys.executable).with_name("jailer"))

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the directory belongs to another uid")
OTHER = 4321


@pytest.fixture
def foreign(tmp_path):
    """A directory another user owns (mode 0755), as a tenant's or a client's would be."""
    directory = tmp_path / "foreign"
    directory.mkdir(mode=0o755)
    os.chown(directory, OTHER, OTHER)
    return directory


def _as_other(path):
    """Make `path` (a symlink, file or directory) the other user's, as if they had made it."""
    os.chown(path, OTHER, OTHER, follow_symlinks=False)


def test_walk_follows_roots_own_symlinks():
    fd, st = paths.walk("/bin/sh")   # /bin -> usr/bin and sh -> dash on a merged-/usr Debian
    try:
        assert os.path.samestat(st, os.stat("/bin/sh"))
        assert os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath("/bin/sh")
    finally:
        os.close(fd)


def test_walk_resolves_dot_dot_and_relative_links(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("x")
    os.symlink("b/f", tmp_path / "a" / "link")
    fd, st = paths.walk(f"{tmp_path}/a/b/../link")
    os.close(fd)
    assert os.path.samestat(st, os.stat(tmp_path / "a" / "b" / "f"))


def test_walk_with_a_shared_cache_reaches_the_same_files_and_closes_nothing_it_shares():
    cache = {}
    targets = ["/usr/bin/env", "/usr/bin/python3", "/usr/lib/os-release", "/usr/bin"]
    for path in targets:
        fd, st = paths.walk(path, cache=cache)
        os.close(fd)
        assert os.path.samestat(st, os.stat(path))
    assert "/usr" in cache and "/usr/bin" in cache
    for fd, _ in cache.values():
        os.fstat(fd)   # still open: the caller closes them
        os.close(fd)


def test_walk_refuses_a_symlink_loop(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(UsageError, match="too many levels of symbolic links"):
        paths.walk(str(tmp_path / "loop"))


@ROOT_ONLY
def test_walk_refuses_another_users_symlink_to_what_they_do_not_own(foreign, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("root only")
    os.symlink(secret, foreign / "link")
    _as_other(foreign / "link")
    with pytest.raises(paths.Refused, match=f"owned by uid {OTHER}"):
        paths.walk(str(foreign / "link"))
    os.symlink("/etc", foreign / "etc")
    _as_other(foreign / "etc")
    with pytest.raises(paths.Refused):
        paths.open_directory(str(foreign / "etc"))


@ROOT_ONLY
def test_walk_follows_another_users_symlink_to_what_they_own(foreign):
    (foreign / "real").mkdir()
    _as_other(foreign / "real")
    os.symlink("real", foreign / "link")
    _as_other(foreign / "link")
    fd = paths.open_directory(str(foreign / "link"))
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(foreign / "real"))
    finally:
        os.close(fd)


@ROOT_ONLY
def test_open_file_refuses_a_hard_link_to_someone_elses_file(foreign, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("root only")
    os.link(secret, foreign / "out")   # what a tenant can do where fs.protected_hardlinks is 0
    with pytest.raises(paths.Refused, match=f"it leads from what uid {OTHER} controls to what uid 0 owns"):
        paths.open_file(str(foreign / "out"), os.O_RDWR | os.O_CREAT)
    assert secret.read_text() == "root only"


def test_a_file_with_several_names_in_a_directory_others_may_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)                 # root's, like /tmp: the owner rule passes
    secret = tmp_path / "secret"
    secret.write_text("root only")
    os.link(secret, shared / "out")
    with pytest.raises(paths.Refused, match="2 hard links in a directory others may write"):
        paths.open_file(str(shared / "out"), os.O_RDWR)
    with pytest.raises(paths.Refused, match="2 hard links"):
        paths.walk(str(shared / "out"))
    os.unlink(secret)
    os.close(paths.open_file(str(shared / "out"), os.O_RDWR))   # its only name now


def test_open_file_creates_and_follows_a_trusted_symlink(tmp_path):
    fd = paths.open_file(str(tmp_path / "new"), os.O_WRONLY | os.O_CREAT)
    os.close(fd)
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o600
    os.symlink("new", tmp_path / "link")
    fd = paths.open_file(str(tmp_path / "link"), os.O_RDWR | os.O_CREAT)
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "new"))
    finally:
        os.close(fd)


@pytest.mark.parametrize("path", ["dir/", "dir/..", "dir/.", "dir/a\nb"])
def test_split_refuses_what_cannot_name_a_file_jailer_makes(path):
    with pytest.raises(UsageError):
        paths.split(path)


def test_listener_is_bound_moved_into_place_and_removed_only_while_it_is_ours(tmp_path):
    path = tmp_path / "s.sock"
    fd, made = fds.create_listener(str(path), 0, 0)
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert [p.name for p in tmp_path.iterdir()] == ["s.sock"]   # no private directory left
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        client.close()
        os.rename(path, tmp_path / "moved")          # someone else's socket takes its place
        stranger = socket.socket(socket.AF_UNIX)
        stranger.bind(str(path))
        made.remove()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # not ours: left alone
        stranger.close()
    finally:
        os.close(fd)


def test_a_stale_socket_is_replaced_and_anything_else_refused(tmp_path):
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    fd, made = fds.create_listener(str(path), 0, 0)
    os.close(fd)
    made.remove()
    assert list(tmp_path.iterdir()) == []
    path.write_text("a file")
    with pytest.raises(UsageError, match="exists and is not a socket; refusing to replace it"):
        fds.create_listener(str(path), 0, 0)
    assert path.read_text() == "a file" and [p.name for p in tmp_path.iterdir()] == ["s.sock"]


@ROOT_ONLY
def test_socket_group_socket_is_born_with_its_mode_and_owner(foreign):
    path = foreign / "s.sock"
    fd, made = fds.create_listener(str(path), 65534, 65534, group=OTHER)
    try:
        st = os.lstat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 65534, OTHER)
    finally:
        os.close(fd)
        made.remove()
    assert list(foreign.iterdir()) == []


def test_a_threaded_caller_keeps_its_working_directory(tmp_path):
    """A program embedding the launcher may have threads: binding must not borrow the cwd then."""
    import threading

    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        here = os.getcwd()
        fd, made = fds.create_listener(str(tmp_path / "s.sock"), 0, 0)
        assert os.getcwd() == here and stat.S_ISSOCK(os.lstat(tmp_path / "s.sock").st_mode)
        os.close(fd)
        made.remove()
    finally:
        release.set()
        thread.join()


def test_a_long_directory_is_fine_the_socket_name_is_what_must_fit(tmp_path):
    deep = tmp_path / ("d" * 100) / ("e" * 100)
    deep.mkdir(parents=True)
    fd, made = fds.create_listener(str(deep / "s.sock"), 0, 0)   # the whole path is >108 bytes
    os.close(fd)
    made.remove()
    with pytest.raises(UsageError, match="cannot listen on"):
        fds.create_listener(str(tmp_path / ("n" * 120)), 0, 0)


def test_pidfile_written_whole_with_its_mode_and_removed_only_while_ours(tmp_path):
    path = tmp_path / "device.pid"
    made = launcher._write_pidfile(str(path))
    assert path.read_text() == f"{os.getpid()}\n" and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["device.pid"]
    path.unlink()
    path.write_text("another process's\n")
    made.remove()
    assert path.read_text() == "another process's\n"


def test_write_file_keeps_an_existing_files_mode_and_makes_directories(tmp_path):
    target = tmp_path / "new" / "dir" / "unit.service"
    paths.write_file(str(target), b"one\n", 0o644, make_dirs=0o755).close()
    assert target.read_text() == "one\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    os.chmod(target, 0o600)
    paths.write_file(str(target), b"two\n", 0o644, keep_mode=True).close()
    assert target.read_text() == "two\n" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["unit.service"]


@ROOT_ONLY
def test_jailer_run_refuses_a_socket_path_through_another_users_symlink_in_one_line(foreign, tmp_path):
    os.symlink(tmp_path, foreign / "elsewhere")
    _as_other(foreign / "elsewhere")
    result = subprocess.run([JAILER, "run", str(REPO / "profiles" / "gpio-pci-idio-16.toml"), "--socket-path",
                             str(foreign / "elsewhere" / "s.sock")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "refusing to follow the symlink 'elsewhere'" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["foreign"]


@ROOT_ONLY
def test_an_unprivileged_caller_trusts_its_own_directories_and_symlinks():
    directory = tempfile.mkdtemp(prefix="jailer-own-")
    try:
        os.chmod(directory, 0o755)
        os.mkdir(os.path.join(directory, "mine"))
        os.symlink("mine", os.path.join(directory, "link"))
        for entry in ("", "mine", "link"):
            os.chown(os.path.join(directory, entry), 65534, 65534, follow_symlinks=False)
        python, env, _ = nobody_python("jailer.host.paths")
        result = subprocess.run([*python, "-c", "import sys; from jailer.layers import fds; "
                                 "fd, made = fds.create_listener(sys.argv[1], 65534, 65534); made.remove()",
                                 os.path.join(directory, "link", "s.sock")],
                                capture_output=True, text=True, timeout=20, env=env, cwd="/")
        assert result.returncode == 0, result.stderr
        assert os.listdir(os.path.join(directory, "mine")) == []
    finally:
        subprocess.run(["rm", "-rf", directory], check=True)
