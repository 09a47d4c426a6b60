"""The zero-exec preloader: the sandbox's process is created as soon as the plan is known,
and imports what the program needs while the launcher prepares.

A zero-exec program runs in the sandbox's first process, in the interpreter it inherited
from the launcher, so whatever that process has imported the program does not import
again. `jailer run` creates it right after resolving the plan (jailer.run_cli), exactly as
the launcher would create the sandbox's first process later: cloned straight into the new
user and pid namespaces as their pid 1 (jailer.layers.namespaces.start_child), not yet
mapped to any id. While the launcher allocates host ids and makes the sockets, cgroups and
launch record, this process imports, on the CPU the launcher ran on (the launcher
moves to another: _keep_this_cpu):

- the profile's program.preload modules. Only the standard library is allowed
  (jailer.profile refuses anything else), because these imports run before the sandbox
  is built, with the launcher's access to files. They are imported as the program would
  import them: from the standard library's directories only, with the program's
  environment; from the module cache the launcher opened for it when that is current
  (jailer.zero_exec.module_cache), and this process reports what it imported otherwise;
- runpy, which starts the program, and the jailer modules the sandbox's set-up uses.

When the launcher is ready to start the sandbox, it sends this process what a child of its
own would have inherited: the descriptors (SCM_RIGHTS) and the rest as marshalled data.
This process acknowledges it and goes on as the launcher's setup child (jailer.launch.setup_child):
it joins the cgroup, enters the mount, net, ipc and uts namespaces the launcher's builder
made and pivoted meanwhile (or, without them, unshares those itself, waits for its id
maps and builds the root), unshares the cgroup namespace, and runs the program. Until then it ignores the signals the launcher forwards;
when the launcher ends first, its end of the socket closes and this process exits as soon
as it has imported.

A failure here costs only time: if this process is gone, or it cannot take the request,
the launcher starts the sandbox's process itself (jailer.launch.launcher).
"""

from __future__ import annotations

import _signal as signal   # the C modules: `signal` and `socket` import enum (and selectors)
import _socket as socket
import gc
import marshal
import os
import sys
import time

_MAX_FDS = 253   # SCM_MAX_FD
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)   # (jailer.launch.setup_child.FORWARDED_SIGNALS)
_TAKEN = b"taken"   # the preloading process's answer: it is the sandbox's process from now on
_MTIME_MARGIN = 1_000_000_000   # ns: a file's mtime may lag the clock by a timer tick (or a server's skew)
_MAX_ANSWER = 1 << 16   # bytes: far below a datagram's limit (the socket's buffer): a report of some 900 modules


class Preloader:
    """The launcher's handle on the preloading process."""

    def __init__(self, pid: int, cloned: int, sock: socket.socket, module_cache: str | None, made_at: int):
        self.pid = pid
        self.cloned = cloned    # the namespaces it was cloned into (jailer.layers.namespaces.start_child)
        self.sock = sock
        self.module_cache = module_cache
        self.made_at = made_at  # (ns since the epoch) before it searched for any module

    @classmethod
    def fork(cls, plan, module_cache: str | None = None, use_module_cache: bool = True) -> "Preloader | None":
        """Create the preloading process (which never returns here); None when the system
        refuses (the launcher then starts the sandbox's process itself). module_cache: the
        file of the compiled modules it imports (jailer.zero_exec.module_cache), read when
        use_module_cache, written again when the preloader reports it out of date."""
        from jailer.layers import namespaces

        try:
            launcher_sock, own_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        except OSError:
            return None
        cache_fd = None
        if module_cache is not None and use_module_cache:
            from jailer.run_cli import open_private

            cache_fd = open_private(module_cache)
        launcher_pid, root, made_at = os.getpid(), os.geteuid() == 0, time.time_ns()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)   # until it ignores them (_serve)
        cpus = _keep_this_cpu()
        try:
            pid, cloned = namespaces.start_child(plan.namespaces)
        except OSError:
            launcher_sock.close()
            own_sock.close()
            return None
        finally:
            if os.getpid() == launcher_pid:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                _leave_this_cpu(cpus)
                if cache_fd is not None:
                    os.close(cache_fd)
        if pid == 0:
            _set_cpus(cpus)
            launcher_sock.close()
            code = 1
            try:
                code = _serve(own_sock, plan, launcher_pid, root, cloned, cache_fd)
            finally:
                os._exit(code)
        own_sock.close()
        return cls(pid, cloned, launcher_sock, module_cache, made_at)

    def start_sandbox(self, request: dict, fds: list[int], meanwhile=None) -> tuple[int, int] | None:
        """(pid, clone flags) of the sandbox's first process, which is this preloading process
        once it has taken `request` and `fds` (see _serve); None when it could not, and then
        it is gone and the launcher starts the sandbox's process itself. meanwhile() is called
        once the request is sent (the preloader may still be importing)."""
        if self.sock is None:
            return None
        try:
            self.sock.sendmsg([marshal.dumps(request)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_array(fds))],
                              socket.MSG_NOSIGNAL)
            if meanwhile is not None:
                meanwhile()
            answer = _receive(self.sock)
        except OSError:
            answer = b""
        if not answer.startswith(_TAKEN):
            self.stop()
            return None
        if len(answer) > len(_TAKEN) and self.module_cache is not None:
            self._write_module_cache(answer[len(_TAKEN):])
        self.sock.close()
        started = self.pid, self.cloned
        self.sock = self.pid = None   # the sandbox's process now: the launcher supervises it
        return started

    def _write_module_cache(self, report: bytes) -> None:
        """Rewrite the module cache from the modules the preloader reports it imported (best
        effort, as for the plan cache: it only costs time)."""
        from jailer import run_cli
        from jailer.zero_exec import module_cache, standard_library

        try:
            modules = marshal.loads(report)
        except (EOFError, ValueError, TypeError):
            return
        if isinstance(modules, list):
            data = module_cache.build(modules, standard_library(), unchanged_since=self.made_at - _MTIME_MARGIN)
            if data is not None:
                run_cli.write_cache_file(os.path.dirname(self.module_cache), self.module_cache, data)

    def stop(self) -> None:
        """End and reap the preloading process, unused."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = None


def _keep_this_cpu() -> set[int] | None:
    """Pin this process to the CPU it runs on, so that the preloader, which inherits that,
    starts here at once, where the preloading chain begins; the launcher then moves to
    another CPU (_leave_this_cpu). A new process is otherwise put on an idle CPU, and waking
    one costs 1-5 ms in a VM (a halted vCPU), all of it on the chain. The CPUs this process
    may use (restored in both), or None when there is nothing to choose."""
    from jailer.layers import syscalls

    try:
        cpus = os.sched_getaffinity(0)
        here = syscalls.current_cpu()
        if len(cpus) < 2 or here not in cpus:
            return None
        os.sched_setaffinity(0, {here})
    except OSError:
        return None
    return cpus


def _leave_this_cpu(cpus: set[int] | None) -> None:
    if cpus is None:
        return
    from jailer.layers import syscalls

    try:
        os.sched_setaffinity(0, cpus - {syscalls.current_cpu()})   # (moves this process now)
    except OSError:
        pass
    _set_cpus(cpus)


def _set_cpus(cpus: set[int] | None) -> None:
    if cpus is not None:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            pass


def _fd_array(fds: list[int]) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)   # (array imports collections: 3 ms)


def _serve(sock: socket.socket, plan, launcher_pid: int, root: bool, cloned: int, cache_fd: int | None) -> int | None:
    """The preloading process: import, wait for the launcher's request, go on as the setup child."""
    for signum in _FORWARDED:
        signal.signal(signum, signal.SIG_IGN)   # the launcher decides what reaches the program
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)   # (blocked from before the fork until now)
    cache = _module_cache(cache_fd)
    before = set(sys.modules)
    preload(plan.program.preload, plan.environment, cache)
    gc.freeze()   # the standard library stays: the reset's collection (jailer.zero_exec) need not walk it
    preloaded = set(sys.modules)
    if cache is not None:
        cache.own = True
        sys.meta_path.insert(0, cache)
    from jailer.launch import setup_child

    setup_child.import_for_child(plan, root, setup_child.builds_beside(plan, cloned))
    report = _out_of_date(cache, before, preloaded)
    message, fds = _receive_request(sock)
    if message is None:
        return 0
    try:
        child = setup_child.child_from_request(plan, message, fds, launcher_pid)
        answer = _TAKEN if report is None else _TAKEN + marshal.dumps(report)
        sock.send(answer if len(answer) <= _MAX_ANSWER else _TAKEN)   # (too many modules: not cached)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return 1
    child.cloned = cloned
    setup_child.run_child(child, [sock.detach()])   # (never returns)


def _next_size(sock: socket.socket) -> int:
    """The next message's length (at least 1), without taking it: SOCK_SEQPACKET truncates a
    message to the buffer, and a buffer of exactly its size costs no more than it needs."""
    return max(sock.recv_into(bytearray(1), 1, socket.MSG_PEEK | socket.MSG_TRUNC), 1)


def _receive(sock: socket.socket) -> bytes:
    return sock.recv(_next_size(sock))


def _receive_request(sock: socket.socket):
    try:
        data, ancillary, _, _ = sock.recvmsg(_next_size(sock), socket.CMSG_SPACE(_MAX_FDS * 4))
    except OSError:
        return None, []
    fds = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(int.from_bytes(payload[i:i + 4], sys.byteorder) for i in range(0, len(payload) - 3, 4))
    try:
        return (marshal.loads(data) if data else None), fds
    except (ValueError, EOFError, TypeError):
        return None, fds


def _module_cache(cache_fd: int | None):
    """The finder of the module cache open on cache_fd (jailer.zero_exec.module_cache), or None."""
    if cache_fd is None:
        return None
    from jailer.zero_exec.module_cache import CachedModules

    return CachedModules.load(cache_fd)


def _out_of_date(cache, before: set, preloaded: set) -> list | None:
    """Stop serving from the module cache; what the launcher should write in it when the
    cache did not serve all it could, else None: the modules imported since `before`, but of
    those imported since `preloaded` only jailer's (the cache serves the standard library's
    only while preloading, when the path is the standard library's)."""
    from jailer.zero_exec import module_cache, standard_library

    served = set(cache.served) | cache.left_out if cache is not None else set()
    stale = cache is None or cache.stale
    if cache is not None:
        sys.meta_path.remove(cache)
        cache.close()
    own = module_cache.OWN_PACKAGE + "."
    new = [name for name in sys.modules if name not in before and (name in preloaded or name.startswith(own))]
    library = standard_library()
    if not stale and not module_cache.imported_modules(library, [name for name in new if name not in served]):
        return None   # (what it did not serve is built in, or an extension module)
    return module_cache.imported_modules(library, new) or None


def preload(modules, environment, cache=None) -> None:
    """Import `modules` from the standard library as the program would (its environment, the
    standard library's directories only, no import hooks of jailer's); one that fails is
    left for the program to import (or fail to) itself. cache: the module cache's finder
    (jailer.zero_exec.module_cache), first while importing."""
    from jailer.zero_exec import interpreters_own_finders, standard_library

    saved = sys.path[:], sys.meta_path[:], dict(os.environ)
    sys.path[:] = list(standard_library())
    sys.meta_path[:] = [cache, *interpreters_own_finders()] if cache is not None else interpreters_own_finders()
    os.environ.clear()
    os.environ.update(environment)
    try:
        for name in ("runpy", *modules):
            try:
                __import__(name)   # (as an import statement: importlib is the program's to import)
            except Exception:   # (the program meets the same error when it imports it)
                continue
    finally:
        sys.path[:], sys.meta_path[:] = saved[0], saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
