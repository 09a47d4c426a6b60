"""Restarting the program: when `jailer run` does it, and what it keeps across it.

A restart is an exec of the same `jailer run` command line in the same process, so the
pid a service manager or --pidfile knows stays right, with $JAILER_RESTART_FD naming a
memfd of what the ended run hands on, one "key values..." line each:

    given NAME FD        a descriptor the program gets again as its fd NAME: a listening
                         socket jailer made (its path never goes away: clients that connect
                         meanwhile wait in its backlog), the checkpoint memfd the program
                         saves its state in, or one the caller or a service manager passed
    made FD DIRFD NAME   what jailer made at the caller's paths (sockets, the pid file),
                         removed by the last run only (jailer.host.paths.Made)
    restarted T          the CLOCK_MONOTONIC second of each restart so far

Whoever supervises the program decides: the Python launcher (jailer.launch.launcher) or, once it
has handed over, jailer-monitor (monitor.c), which implements `decide` again in C. The
rate limit is systemd's StartLimitBurst=/StartLimitIntervalSec=: more than `limit`
restarts within `interval` seconds gives up. The delay before a restart doubles with each
restart still within the interval (a crash loop backs off), up to `max_delay`.
"""

from __future__ import annotations

import os
import sys

from jailer.errors import UsageError
from jailer.host.paths import Made

ENVIRONMENT = "JAILER_RESTART_FD"


class Carried:
    """What one run of the program hands on to the next."""

    def __init__(self, given=None, made=(), restarts=()):
        self.given: dict[str, int] = dict(given or {})
        self.made: list[Made] = list(made)
        self.restarts: list[float] = list(restarts)

    @classmethod
    def from_environment(cls) -> "Carried | None":
        """The previous run's state when this process is a restart; None on a first start."""
        text = os.environ.pop(ENVIRONMENT, None)
        if text is None:
            return None
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)   # what they passed is among the given fds now
        try:
            fd = int(text)
            os.lseek(fd, 0, os.SEEK_SET)
            with open(fd, "rb", closefd=True) as file:
                lines = file.read().decode().splitlines()
        except (ValueError, OSError) as exc:
            raise UsageError(f"{ENVIRONMENT}={text}: not the state of a restart ({exc})") from None
        carried = cls()
        for line in lines:
            key, _, rest = line.partition(" ")
            if key == "given":
                name, number = rest.split(" ")
                carried.given[name] = _own(int(number))
            elif key == "made":
                fd, dirfd, name = rest.split(" ", 2)
                carried.made.append(Made(_own(int(dirfd)), name, _own(int(fd))))
            elif key == "restarted":
                carried.restarts.append(float(rest))
        return carried

    def lines(self) -> list[str]:
        return ([f"given {name} {fd}" for name, fd in self.given.items()]
                + [line for made in self.made for line in made.monitor_lines()]
                + [f"restarted {moment!r}" for moment in self.restarts])

    def descriptors(self) -> list[int]:
        return list(self.given.values()) + [fd for made in self.made for fd in made.descriptors()]

    def state_fd(self) -> int:
        """A memfd of lines() for the next run (inheritable, like every descriptor it names)."""
        fd = os.memfd_create("jailer-restart", 0)
        os.write(fd, "".join(line + "\n" for line in self.lines()).encode())
        return fd

    def remove(self) -> None:
        """The last run: remove what jailer made at the caller's paths."""
        for made in self.made:
            made.remove()
        self.made = []


def _own(fd: int) -> int:
    """A carried descriptor, close-on-exec again until it is handed on deliberately."""
    os.set_inheritable(fd, False)
    return fd


def failed(wait_status: int) -> bool:
    return os.WIFSIGNALED(wait_status) or os.waitstatus_to_exitcode(wait_status) != 0


def decide(restart, wait_status: int, stop_requested: bool, restarts: list[float], now: float):
    """(what to do, detail) when the program has ended: ("exit", None); ("restart", delay in
    seconds); or ("give-up", the restarts within the interval) when the rate limit is hit."""
    if restart.policy == "no" or stop_requested or (restart.policy == "on-failure" and not failed(wait_status)):
        return "exit", None
    recent = [moment for moment in restarts if now - moment < restart.interval]
    if len(recent) >= restart.limit:
        return "give-up", len(recent)
    return "restart", min(restart.max_delay, restart.delay * 2 ** len(recent))


def command_line() -> list[str]:
    """This `jailer run`'s own command line, to exec again (the working directory stays)."""
    return [sys.executable] + sys.orig_argv[1:]


def give_up_message(restart, count: int) -> str:
    return (f"the program ended again after {count} restarts within {restart.interval:g} s (restart.limit = "
            f"{restart.limit}): not restarting it")
