"""`jailer run` options a management stack uses: --pidfile, --log-fd, --socket NAME=PATH,
--socket-group, --socket-path with several listeners, socket activation (LISTEN_FDS), and the refusal when
the launcher cannot take the seccomp listener. Each runs the real CLI on a real profile."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine_sandbox import nobody_python

REPO = Path(__file__).resolve().parent.parent
JAILER = str(Path(sys.executable).with_name("jailer"))
SLEEP_PROFILE = str(REPO / "tests" / "profiles" / "engine-sleep.toml")
TRUE_PROFILE = str(REPO / "profiles" / "examples" / "true.toml")


class Running:
    """`jailer run` in the background with a status stream, until it reports the program ready."""

    def __init__(self, *options, pass_fds=(), command=None):
        self.status_r, self.status_w = os.pipe()
        argv = command or [JAILER, "run", SLEEP_PROFILE]
        self.popen = subprocess.Popen(argv + ["--status-fd", str(self.status_w), *options],
                                      pass_fds=(self.status_w, *pass_fds), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        os.close(self.status_w)
        self.stream = os.fdopen(self.status_r)
        self.events = []

    def wait_for(self, kind, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.stream.readline()
            if not line:
                break
            self.events.append(json.loads(line))
            if self.events[-1]["event"] == kind:
                return self.events[-1]
        raise AssertionError(f"no {kind} event; got {self.events}; stderr: {self.stop()[1]}")

    def stop(self, signum=signal.SIGTERM):
        if self.popen.poll() is None:
            self.popen.send_signal(signum)
        try:
            out, err = self.popen.communicate(timeout=20)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait()
            self.stream.close()
        return out, err


def test_pidfile_holds_the_launchers_pid_while_it_runs_and_is_removed_after(tmp_path):
    pidfile = tmp_path / "device.pid"
    run = Running("--pidfile", str(pidfile))
    run.wait_for("ready")
    assert pidfile.read_text() == f"{run.popen.pid}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["device.pid"]   # no temporary left over
    os.kill(int(pidfile.read_text()), signal.SIGTERM)   # what a manager does with it
    run.stop()
    assert run.popen.returncode == 128 + signal.SIGTERM
    assert not pidfile.exists()


def test_log_fd_receives_the_programs_stderr_and_jailers_messages(tmp_path):
    with tempfile.TemporaryFile("w+") as log:
        run = Running("--log-fd", str(log.fileno()), pass_fds=(log.fileno(),))
        run.wait_for("ready")
        _, err = run.stop()
        assert err == ""
        failed = subprocess.run([JAILER, "run", SLEEP_PROFILE, "--log-fd", str(log.fileno()), "--fd", "nothere=0"],
                                pass_fds=(log.fileno(),), capture_output=True, text=True, timeout=20)
        assert failed.returncode == 2 and failed.stderr == ""
        log.seek(0)
        text = log.read()
    assert "started\n" in text   # the program's stderr
    assert "jailer: --fd: the profile has no fd named nothere" in text


def test_socket_name_path_and_socket_path_each_create_a_listener_removed_on_exit(tmp_path):
    control, vfio_user = tmp_path / "control.sock", tmp_path / "vfio-user.sock"
    run = Running("--socket", f"control={control}", "--socket-path", str(vfio_user))
    pid = run.wait_for("started")["pid"]
    run.wait_for("ready")
    for path, number in ((vfio_user, 3), (control, 4)):
        assert os.stat(f"/proc/{pid}/fd/{number}").st_ino == _socket_inode_listening_at(path)
    run.stop()
    assert list(tmp_path.iterdir()) == []


def _socket_inode_listening_at(path):
    """The inode of the socket listening at path (flag __SO_ACCEPTCON in /proc/net/unix). jailer
    binds inside a private directory and moves the socket into place, so the kernel knows it
    by its file name only (jailer.host.paths)."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == path.name and int(fields[3], 16) & 0x10000:
            return int(fields[6])
    raise AssertionError(f"nothing listens at {path}")


def _connects(path, uid, gid) -> bool:
    """Whether a client running as uid:gid (no other groups) can connect to the socket at path."""
    client = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "/usr/bin/python3",
                             "-c", f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r})"],
                            capture_output=True, text=True, timeout=20)
    return client.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the clients run as other users")
def test_socket_group_lets_a_client_of_that_group_connect_and_no_one_else():
    directory = tempfile.mkdtemp(prefix="jailer-group-")
    try:
        os.chmod(directory, 0o755)
        path = Path(directory) / "vfio-user.sock"
        run = Running("--socket-path", str(path), "--socket-group", "65533")
        run.wait_for("ready")
        st = path.stat()
        assert (oct(st.st_mode & 0o777), st.st_gid) == ("0o660", 65533)
        assert _connects(path, 65532, 65533)          # QEMU as its own user, in the socket's group
        assert not _connects(path, 65532, 65532)      # any other unprivileged user
        run.stop()
        assert not path.exists()
    finally:
        os.rmdir(directory)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run jailer as another user")
def test_an_unprivileged_caller_cannot_give_its_socket_to_another_group():
    directory = tempfile.mkdtemp(prefix="jailer-group-")
    try:
        os.chmod(directory, 0o777)
        python, env, _ = nobody_python("jailer.layers.fds")
        result = subprocess.run([*python, "-c", "import sys; from jailer.layers.fds import create_listener; "
                                 "create_listener(sys.argv[1], 65534, 65534, group=0)", f"{directory}/s"],
                                capture_output=True, text=True, timeout=20, env=env, cwd="/")
        assert "--socket-group: cannot give" in result.stderr and "only root may name a group" in result.stderr
        assert os.listdir(directory) == []          # the socket file it bound is gone again
    finally:
        shutil.rmtree(directory)


@pytest.mark.parametrize("args, message", [
    (["--socket-path", "{dir}/s", "--socket-group", "no-such-group-here"], "--socket-group: no group named"),
    (["--socket-group", "0"], "--socket-group: jailer creates no socket here"),
])
def test_socket_group_usage_errors(tmp_path, args, message):
    args = [arg.replace("{dir}", str(tmp_path)) for arg in args]
    result = subprocess.run([JAILER, "run", TRUE_PROFILE if "--socket-path" not in args else SLEEP_PROFILE, *args],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_socket_path_with_two_listeners_needs_one_named_vfio_user(tmp_path):
    profile = tmp_path / "two.toml"
    profile.write_text(Path(SLEEP_PROFILE).read_text().replace('name = "vfio-user"', 'name = "data"'))
    result = subprocess.run([JAILER, "run", str(profile), "--socket-path", str(tmp_path / "s")],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "--socket-path needs one unix-listener fd in the profile, or one named 'vfio-user' (it has 2: data, " \
           "control)" in result.stderr
    assert not (tmp_path / "s").exists()


# What a service manager does: the sockets at 3, 4, ..., LISTEN_PID = the pid it then execs.
ACTIVATE = """
import os, sys
names, fds = sys.argv[1], [int(fd) for fd in sys.argv[2].split(",")]
for offset, fd in enumerate(fds):
    os.dup2(fd, 3 + offset)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names)
os.execv(sys.argv[3], sys.argv[3:])
"""


def activated(names, fds, *argv):
    return [sys.executable, "-c", ACTIVATE, names, ",".join(str(fd) for fd in fds), *argv]


def test_socket_activation_takes_the_managers_socket_as_the_named_fd(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as activated_socket:
        activated_socket.bind(str(tmp_path / "activated.sock"))
        activated_socket.listen(1)
        run = Running(command=activated("control", [activated_socket.fileno()], JAILER, "run", SLEEP_PROFILE),
                      pass_fds=(activated_socket.fileno(),))
        pid = run.wait_for("started")["pid"]
        run.wait_for("ready")
        assert os.stat(f"/proc/{pid}/fd/4").st_ino == os.fstat(activated_socket.fileno()).st_ino
        assert not os.path.exists(f"/proc/{pid}/fd/3")   # the optional vfio-user listener was not made
        run.stop()
    assert run.popen.returncode == 128 + signal.SIGTERM


def test_socket_activation_refuses_a_name_the_profile_does_not_declare():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as passed:
        fds = [passed.fileno(), passed.fileno()]
        result = subprocess.run(activated("control:extra", fds, JAILER, "run", SLEEP_PROFILE), pass_fds=fds,
                                capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "the service manager passed fd 4 named 'extra', which the profile does not declare" in result.stderr


OUTER_FILTER = """
import os, sys, pyseccomp
outer = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
outer.add_rule(pyseccomp.ERRNO(1), "pidfd_getfd")   # as a container runtime's profile may
outer.load()
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_a_refused_pidfd_getfd_stops_the_launch_with_a_layer_error_instead_of_hanging():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", OUTER_FILTER, JAILER, "run", "--no-cache", TRUE_PROFILE],
                            capture_output=True, text=True, timeout=30)
    assert time.monotonic() - started < 10
    assert result.returncode == 3, result.stderr
    assert "cannot take the notification listener (pidfd_getfd: Operation not permitted)" in result.stderr
    assert "CAP_SYS_PTRACE" in result.stderr and "outer seccomp filter" in result.stderr
    assert result.stderr.count("\n") == 1
