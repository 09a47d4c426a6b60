"""Helpers: the test device as a real server process on a real socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TESTDEVICE = os.path.join(HERE, "vfio_testdevice.py")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class ServerProcess:
    def __init__(self, path: str, *args: str, pass_fds=(), env=None, stdin=None):
        self.path = path
        argv = [sys.executable, TESTDEVICE, *args]
        if path:
            argv += ["--socket-path", path]
        # A file, not a pipe: a chatty server must never block on a full pipe nobody reads.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(argv, cwd=REPO, stderr=self.log, text=True, pass_fds=pass_fds,
                                     env=env, stdin=stdin)
        if path:
            wait_for(lambda: os.path.exists(path) or self.proc.poll() is not None, what="server socket")
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.read_log()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fd_count(self) -> int:
        return fd_count(self.pid)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        return rc, self.read_log()

    def read_log(self) -> str:
        self.log.seek(0)
        return self.log.read()
