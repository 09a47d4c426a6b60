"""The sandbox's first process, the setup child: from its fork or clone (or the zero-exec
preloader taking the launcher's request, jailer.zero_exec.preloader) to the program's
start, applying the layers in the order jailer.launch.launcher documents.

The launcher's own side (preparing, supervising, handing over) is jailer.launch.launcher; this
module is all of the launch a zero-exec preloader imports, so that the launcher's side is
never loaded on the way to the program (0.3 ms of module body there).
"""

from __future__ import annotations

import fcntl
import marshal
import os
import _signal as signal   # the C module: `signal` imports enum, ~6 ms on the start-up path

from jailer import status
from jailer.errors import JailerError, LayerError
from jailer.layers import fds as fdlib
from jailer.layers import namespaces

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SETUP_FAILED = 125   # the exit code of a setup child that failed (it reported why first)


def send_message(fd, kind, *fields):
    os.write(fd, marshal.dumps((kind,) + fields))


def receive_message(fd):
    data = os.read(fd, 65536)
    return marshal.loads(data) if data else None


def error_fields(exc) -> tuple:
    if isinstance(exc, LayerError):
        return ("LayerError", exc.layer, exc.reason, exc.fix)
    if isinstance(exc, JailerError):
        return ("JailerError", "", str(exc), "")
    return ("JailerError", "", f"sandbox set-up failed: {type(exc).__name__}: {exc}", "")


def report_failure(fd, exc):
    if isinstance(exc, SystemExit):
        return
    try:
        send_message(fd, "error", *error_fields(exc))
    except OSError:
        pass


def import_for_child(plan, root: bool, built_beside: bool = False) -> None:
    """Import everything the sandbox's process runs before it is forked: after pivot_root
    jailer's files are gone, and importing once in the parent is cheaper than in a
    copy-on-write child. root: the launcher runs as root (the zero-exec preloader cannot
    tell by its own ids: it has none yet in its new user namespace). built_beside: the
    zero-exec preloader's root is built beside it (builds_beside), so that the mount layer
    is imported, before pivot_root, only if that fails."""
    from jailer.layers import capabilities, landlock, limits, syscalls  # noqa: F401
    if not built_beside:
        from jailer.layers import mounts  # noqa: F401
    if plan.network.mode != "none":
        from jailer.layers import network  # noqa: F401
    if plan.program.start == "zero-exec":
        from jailer import zero_exec  # noqa: F401
    if plan.limits.cgroup is not None:
        from jailer.layers import cgroups  # noqa: F401
    if getattr(plan.identity, "host_ids", "shared") != "shared" and root:
        from jailer.host import identity  # noqa: F401


def builds_beside(plan, cloned: int) -> bool:
    """Whether jailer.launch.launcher._Launch._build_beside builds the namespaces and root of
    a zero-exec preloader cloned into the namespaces `cloned` (clone flags) for this plan (it
    may still fail)."""
    from jailer.layers import syscalls

    both = syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWPID
    return cloned & both == both and bool(plan.namespaces.mount) and plan.network.mode != "veth"


def network_and_root(plan, enforcement, sources, socket_binds) -> None:
    """Steps 4 (inside) and 5 of the documented order, in the namespaces entered: the network
    raised, the root built and pivoted into. sources(): the opened bind sources (it raises
    the launcher's check's error, which the pivot_root layer reports)."""
    if "net_namespace" in enforcement.applied:
        if plan.network.mode == "none":
            enforcement.applied["network"] = {"mode": "none"}
        else:
            from jailer.layers import network

            enforcement.attempt("network", lambda: network.setup_inside(plan.network), network.FIX_VETH)
    if "mount_namespace" in enforcement.applied:
        from jailer.layers import mounts

        enforcement.attempt("pivot_root", lambda: mounts.build_root(plan.filesystem, plan.identity.uid,
                                                                    plan.identity.gid, sources(), socket_binds))


def run_child(child, close: list[int]) -> None:
    """The sandbox's first process, from its fork or clone: close what it must not hold, set
    up (never returns: the program is exec'd, or this process exits)."""
    try:
        for fd in close:
            os.close(fd)
        child.setup()
    except BaseException as exc:   # report, never unwind into the caller's code
        report_failure(child.sock_fd, exc)
    finally:
        os._exit(SETUP_FAILED)


def child_from_request(plan, request: dict, fds: list[int], launcher_pid: int) -> "SetupChild":
    """The SetupChild a fork of the launcher would have been, from the data and fds of
    jailer.launch.launcher._Launch._child_request."""
    if request["host_id"] is not None:
        from jailer.host.identity import Identity, PlanWithIdentity

        plan = PlanWithIdentity(plan, Identity(plan.identity, request["host_id"]))
    enforcement = status.Enforcement(plan.best_effort)
    enforcement.merge(request["applied"], request["skipped"])
    cgroup = None
    if request["cgroup"] is not None:
        from jailer.layers.cgroups import Cgroup

        cgroup = Cgroup(*request["cgroup"])
    specs = list(plan.fds)
    sock_fd, exec_w, *rest = fds
    manifest_fds, namespace_fds = rest[:len(request["specs"])], rest[len(request["specs"]):]
    entries = [(specs[index], fd) for index, fd in zip(request["specs"], manifest_fds, strict=True)]
    child = SetupChild(plan, enforcement, sock_fd, exec_w, launcher_pid, entries, request["argv"],
                   request["environment"], request["bpf"], request["listen"], cgroup, cloned=None)
    child.built = list(zip(request["built"], namespace_fds, strict=True))
    return child


class SetupChild:
    """The setup child, then (after the pid-namespace fork) the sandbox's pid 1 and the program."""

    def __init__(self, plan, enforcement, sock_fd, exec_w, launcher_pid, entries, argv, environment, bpf, listen,
                 cgroup, cloned):
        self.plan = plan
        self.enforcement = enforcement
        self.sock_fd = sock_fd
        self.exec_w = exec_w
        self.launcher_pid = launcher_pid
        self.entries = entries
        self.argv = argv
        self.environment = environment
        self.bpf = bpf
        self.listen = listen            # the filter notifies: the launcher takes its listener
        self.cgroup = cgroup
        self.cloned = cloned            # clone flags this process was created with (0: a plain fork)
        self.bind_sources, self.bind_sources_error = {}, None   # opened as the launcher's "go" says
        self.socket_binds = []
        self.user_namespace = False
        self.last_cap = None
        self.process_layout = None      # zero-exec: where /proc/self/cmdline and environ live (jailer.zero_exec)
        self.built = []                 # [(layer, fd)]: namespaces built beside the preloader (_build_beside)

    def _die_with(self, parent_pid):
        """SIGKILL this process when its parent dies (and die now if it already has). The parent
        of the sandbox's pid 1 lives outside its pid namespace, where getppid() reads 0."""
        from jailer.layers import syscalls

        if self.plan.die_with_parent:
            syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() not in (parent_pid, 0):
                os._exit(SETUP_FAILED)

    def setup(self):
        """Join the cgroup, unshare, wait for the maps; fork pid 1 when there is a pid namespace."""
        from jailer.layers import capabilities

        self.last_cap = capabilities.last_capability()   # /proc may not exist in the new root
        if self.plan.program.start == "zero-exec":
            from jailer import zero_exec

            self.process_layout = zero_exec.process_layout()
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)   # the launcher decides what reaches the program
        self._die_with(self.launcher_pid)
        plan = self.plan
        if self.cgroup is not None:
            self.enforcement.attempt("cgroup", self._join_cgroup)
        if self.cloned:
            from jailer.layers import syscalls

            self.user_namespace = bool(self.cloned & syscalls.CLONE_NEWUSER)
            if self.user_namespace:
                self.enforcement.applied["user_namespace"] = True
            self.enforcement.applied["pid_namespace"] = True
        else:
            if os.geteuid() == 0 and plan.namespaces.user:
                os.setgroups([])   # the last moment root's supplementary groups can be dropped
            self.user_namespace = namespaces.enter_user_namespace(plan.namespaces, self.enforcement)
        if self.built:
            self._enter_built()
            entered = namespaces.enter_namespaces(plan.namespaces, self.enforcement)   # (the cgroup one)
        else:
            entered = namespaces.enter_namespaces(plan.namespaces, self.enforcement)
            send_message(self.sock_fd, "unshared", self.user_namespace, "net_namespace" in entered)
            go = receive_message(self.sock_fd)
            if not go or go[0] != "go":
                os._exit(SETUP_FAILED)
            checked, self.bind_sources_error, self.socket_binds = go[1:]
            self._open_bind_sources(checked)   # with the invoker's ids, before taking the sandbox's
        if self.user_namespace:
            from jailer.layers import syscalls

            syscalls.setfsuid(plan.identity.uid)   # what the set-up creates belongs to the sandbox's ids
            syscalls.setfsgid(plan.identity.gid)
        self._die_with(self.launcher_pid)   # unshare and setfs[ug]id cleared the parent-death signal
        if self.cloned or "pid_namespace" not in entered:
            self.inside()   # already pid 1 of its pid namespace, or there is none
            return
        my_pid = os.getpid()
        pid1 = self._fork_giving_up_exec_pipe()
        if pid1 == 0:
            self._die_with(my_pid)
            self.inside()
            return
        fdlib.close_all_but({2, self.sock_fd})
        _, wait_status = os.waitpid(pid1, 0)
        send_message(self.sock_fd, "status", "program" if plan.namespaces.pid1 == "program" else "pid1", wait_status)
        os._exit(0)

    def _enter_built(self):
        """Enter the namespaces built beside this process, root pivoted (_run_builder): setns
        into the mount namespace makes its root this process's root and cwd."""
        from jailer.layers import syscalls

        for layer, fd in self.built:
            try:
                syscalls.setns(fd, namespaces.NAMESPACE_LAYERS[layer][0])
            except OSError as exc:
                raise LayerError(layer, f"cannot enter the namespace built for the sandbox: {exc.strerror}",
                                 namespaces.FIX_OTHER) from None
            os.close(fd)

    def _open_bind_sources(self, checked: dict):
        """Open what the launcher checked, in this mount namespace; an error is raised where
        the pivot_root layer is attempted (it may be best effort)."""
        if self.bind_sources_error is not None or not checked:
            return
        from jailer.layers import mounts

        try:
            self.bind_sources = mounts.open_sources(checked)
        except LayerError as exc:
            self.bind_sources_error = error_fields(exc)

    def _bind_sources(self) -> dict:
        if self.bind_sources_error is not None:
            kind, layer, reason, fix = self.bind_sources_error
            raise LayerError(layer, reason, fix)
        return self.bind_sources

    def _fork_giving_up_exec_pipe(self) -> int:
        """fork(); the child goes on only once the parent has closed its copy of the exec pipe,
        so that the pipe closes exactly when the program execs (the launcher's signal that
        the program runs and its steady stage may begin), never later."""
        release_r, release_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(release_w)
            os.read(release_r, 1)
            os.close(release_r)
            return 0
        os.close(self.exec_w)
        os.close(release_w)
        os.close(release_r)
        return pid

    def _join_cgroup(self):
        self.cgroup.join()
        return self.cgroup.describe()

    def inside(self):
        """Everything from the network to the exec, in the documented order."""
        from jailer.layers import capabilities

        plan, attempt = self.plan, self.enforcement.attempt
        os.umask(0o022)
        if not self.built:
            network_and_root(plan, self.enforcement, self._bind_sources, self.socket_binds)
        pivoted = "pivot_root" in self.enforcement.applied
        try:
            os.chdir(plan.program.cwd)
        except OSError as exc:
            raise LayerError("pivot_root", f"cannot enter the program's cwd {plan.program.cwd}: {exc.strerror}",
                             "bind the directory or change program.cwd") from None
        if plan.landlock.enabled:
            from jailer.layers import landlock

            attempt("landlock", lambda: landlock.restrict(plan, pivoted), landlock.FIX)
        if plan.limits.rlimits:
            from jailer.layers import limits

            attempt("rlimits", lambda: limits.apply_rlimits(plan.limits.rlimits))
        self.sock_fd, self.exec_w = fdlib.install(self.entries, [self.sock_fd, self.exec_w])
        os.setsid()
        last_cap = self.last_cap
        attempt("capabilities", lambda: capabilities.drop_bounding_set(last_cap), capabilities.FIX)
        attempt("securebits", capabilities.lock_securebits, capabilities.FIX)
        capabilities.become(plan.identity.uid, plan.identity.gid,
                            drop_groups=not self.user_namespace and os.geteuid() == 0)
        attempt("capabilities", lambda: capabilities.clear_capabilities(last_cap), capabilities.FIX)
        attempt("no_new_privs", capabilities.set_no_new_privs)
        self._die_with(os.getppid())   # the uid change cleared the parent-death signal
        if "pid_namespace" in self.enforcement.applied and plan.namespaces.pid1 == "reaper":
            self.fork_program()
        self.exec_program()

    def fork_program(self):
        """Fork the program; this process stays as the sandbox's pid 1 (returns only in the program)."""
        from jailer.layers import syscalls

        program = []
        pending = []

        def forward(signum, frame):
            if program:
                try:
                    os.kill(program[0], signum)
                except OSError:
                    pass
            else:
                pending.append(signum)

        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, forward)
        reaper_pid = os.getpid()
        pid = self._fork_giving_up_exec_pipe()
        if pid == 0:
            self._die_with(reaper_pid)
            return
        program.append(pid)
        for signum in pending:
            forward(signum, None)
        fdlib.close_all_but({2, self.sock_fd})
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
        while True:
            try:
                reaped, wait_status = os.wait()
            except ChildProcessError:
                os._exit(0)
            if reaped == pid:
                break
        send_message(self.sock_fd, "status", "program", wait_status)
        os._exit(0)

    def exec_program(self):
        """The process that execs: environment, seccomp last, execve (or, zero-exec, the
        program's start in this process: jailer.zero_exec)."""
        plan = self.plan
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        environment = dict(self.environment)
        if "LISTEN_FDS" in environment:
            environment["LISTEN_PID"] = str(os.getpid())
        zero_exec = None
        if plan.program.start == "zero-exec":
            from jailer.zero_exec import Start

            zero_exec = Start(self.argv, environment, self.process_layout)
            zero_exec.take_over_process()
        report = bool(self.bpf) and self.listen
        listener_number = -1
        if report:   # the kernel gives the listener the lowest free number: tell the launcher which
            listener_number = fcntl.fcntl(self.sock_fd, fcntl.F_DUPFD_CLOEXEC, 0)
            os.close(listener_number)
        send_message(self.sock_fd, "ready", self.enforcement.applied, self.enforcement.skipped, listener_number,
              self.sock_fd)
        if self.bpf:
            from jailer.layers import syscalls

            self.enforcement.attempt("seccomp", lambda: syscalls.seccomp_load(self.bpf, new_listener=report),
                                     "use a kernel with seccomp filters (and user notification, Linux >= 5.0)")
            if "seccomp" in self.enforcement.skipped:
                send_message(self.sock_fd, "skipped", "seccomp", self.enforcement.skipped["seccomp"])
                report = False
            elif report and zero_exec is None:
                try:
                    os.read(self.sock_fd, 1)   # wait until the launcher holds the listener
                except OSError:
                    pass
        if zero_exec is not None:   # (it waits for "go" itself, after the reset, before it closes the listener)
            zero_exec.run(self.exec_w, self.sock_fd, listener_number if report else None)
        try:
            os.execve(plan.program.executable, self.argv, environment)
        except OSError as exc:
            raise JailerError(f"cannot execute {plan.program.executable}: {exc.strerror} "
                              "(is it bound into the sandbox, and executable by its uid?)") from None
