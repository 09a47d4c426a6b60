"""Apply a Plan: fork, build the sandbox in the child, exec the program, supervise it.

Processes (outer pids are the launcher's view):

  launcher   stays outside: writes the id maps, owns the cgroup and the veth host end,
             forwards SIGTERM/SIGINT/SIGHUP, answers seccomp notifications, reports status.
  setup      the child. With a pid namespace it is cloned straight into it (and into the
             user namespace, which must own it) and is the sandbox's pid 1 from the start;
             it joins the cgroup, unshares the other namespaces and waits for its maps.
             When that clone is refused (or without a pid namespace) it is a plain fork
             that unshares everything itself, which names the failing layer (or skips a
             best-effort one); it then forks pid 1 and waits for it (a process cannot
             enter a new pid namespace itself), staying outside as a fourth process.
             Under `jailer run` of a zero-exec plan it is made as soon as the plan is
             known and imports program.preload while the launcher prepares, then takes
             what a later child would have inherited from the launcher's request (the
             preloader, jailer.zero_exec.preloader); without it, or when it fails, the
             launcher makes the child once it is ready.
  builder    (with the preloader, a mount namespace and no veth) a fork of the launcher
             that enters the preloader's user and pid namespaces and forks into them a
             process (pid 2 there, for its few milliseconds) that does steps 2-5 below
             for the mount, net, ipc and uts namespaces while the preloader still
             imports; the launcher keeps fds of those namespaces, the builder ends, and
             the preloader enters them with setns when it takes the request (so the
             program of a reaper is pid 3). When the builder fails, the preloader does
             steps 2-5 itself.
  pid 1      inside every namespace: builds the sandbox, then either execs the program
             (pid1 = "program") or forks it and stays as a tiny reaper (pid1 = "reaper",
             the default) that reaps orphans, forwards SIGTERM/SIGINT/SIGHUP to the
             program and reports its exit status. The reaper is the default because a
             program that is pid 1 ignores every signal it has no handler for (a plain
             `sleep` would survive SIGTERM) and must reap orphans itself. A program that
             is pid 1 and reports readiness (ready = "notify") is SIGKILLed by a SIGTERM,
             SIGINT or SIGHUP that arrives before its READY=1: its handler may not exist
             yet; after READY=1 the signal is forwarded. The reaper runs
             with the same namespaces, Landlock domain, rlimits, uid/gid and empty
             capability sets as the program, is not dumpable (the program cannot ptrace
             it), but is not under the program's seccomp filter.

The documented order, all in single-threaded children between fork and exec:
  1. cgroup: the launcher creates <its cgroup>/<parent>/<name>.<pid> and writes the
     limits; the setup child joins it before unsharing the cgroup namespace (so that
     namespace is rooted there), moving only itself (see jailer.layers.cgroups.Cgroup.join;
     on cgroup v2 the launcher moves a zero-exec preloader in while it imports: Cgroup.move);
  2. namespaces: user and pid at the clone (root's supplementary groups dropped for
     it), else user first (alone); then mount, (pid,) net, ipc, uts, cgroup together;
     hostname set;
  3. uid/gid maps: written from outside by the launcher ("deny" to setgroups first);
  4. network: veth pair created by the launcher; lo/veth raised inside;
  5. mounts: "/" made MS_PRIVATE|MS_REC, pivot_root into a fresh tmpfs, binds/tmpfs/
     device binds/symlinks//proc (read-only /proc/sys), old root detached, chdir "/",
     "/" remounted read-only (see jailer.layers.mounts);
  6. Landlock (jailer.layers.landlock), with the ABI the kernel offers;
  7. rlimits;
  8. fds: manifest fds moved to their numbers, every other fd closed (close_range);
  9. setsid (no controlling terminal);
 10. privileges: bounding and ambient sets emptied, securebits set and locked,
     setresgid/setresuid to the plan's identity, effective/permitted/inheritable
     emptied, all five sets verified empty, no_new_privs (see jailer.layers.capabilities);
 11. (reaper mode: fork the program here; the reaper stays behind)
 12. seccomp, last, in the process that execs; its listener fd (reporting mode) is
     taken by the launcher with pidfd_getfd while the child waits;
 13. execve.
A layer that cannot be applied stops the launch with LayerError, unless the plan lists
it in best_effort: then it is skipped and the skip is reported (stderr and status).

Readiness and stages. The program is "ready" right after its exec (program.ready =
"exec") or when it writes READY=1 to its notify fd (program.ready = "notify": one end of a
datagram socketpair, its number in $JAILER_NOTIFY_FD; sd_notify-style newline-separated
KEY=VALUE datagrams, STATUS=... is passed on). On ready the launcher emits the status
event "ready", tells $NOTIFY_SOCKET READY=1 with MAINPID=<launcher pid> (the process a
service manager supervises and signals), and moves the seccomp stage from "setup" to
"steady": from then on the plan's steady rules apply too (status event "stage").

Notification policy (Options.notification_policy), the hook for answering the syscalls
the filter routes to the launcher (see jailer.layers.seccomp for which, and why CONTINUE is safe):
an object with

    decide(name: str, nr: int, args: tuple[int, ...], stage: str) -> (action: str, errno: int | None)

called once per notification in the launcher, with the syscall's name ("syscall N" when
unknown), number, six argument registers and the stage ("setup" or "steady"); action is
"continue" (run the syscall), "errno" (fail it with errno) or "kill" (kill the sandbox).
The default, seccomp.StagedPolicy, applies the plan's rules and steady rules. A learning
tool passes a recording policy that answers ("continue", None) and sets
Options.route_all_to_notify=True, so that the filter is compiled with
seccomp.compile_bpf(plan.seccomp, route_all_to_notify=True) and every syscall the
program makes reaches decide() (the handshake read before exec excepted).
"""

from __future__ import annotations

import _socket
import errno
import gc
import marshal
import os
import select
import _signal as signal   # the C module: `signal` imports enum, ~6 ms on the start-up path
import time

from jailer.layers import fds as fdlib
from jailer import status
from jailer.layers import namespaces
from jailer.errors import JailerError, LayerError, UsageError
from jailer.launch.setup_child import (FORWARDED_SIGNALS, SetupChild, builds_beside, error_fields,
                                       import_for_child, network_and_root, run_child, send_message)

_GRAB_TIMEOUT = 5.0
_BUILD_TIMEOUT = 5.0   # seconds the namespaces built beside the preloader may take (else it builds them)
_NS_FILES = {"mount_namespace": "mnt", "net_namespace": "net", "ipc_namespace": "ipc", "uts_namespace": "uts"}
HAND_OVER_AFTER = 0.1   # seconds a program without start-up notifications runs before the monitor takes over
_GRAB_PAUSES = (0.00005, 0.0001, 0.0002, 0.0005)   # seconds between pidfd_getfd attempts, then poll's 1 ms
_GRAB_SPIN = 0.0003   # seconds of attempts without a pause first: the filter loads ~0.1 ms after "ready"
_GRAB_FIX = ("pidfd_getfd needs ptrace access to the sandbox: run the launcher with CAP_SYS_PTRACE (or, "
             "unprivileged, with kernel.yama.ptrace_scope <= 1), and not under an outer seccomp filter that "
             "refuses pidfd_getfd (a container runtime's default profile does); else set report = false and "
             "drop the steady rules in the profile's [seccomp] section")


class Options:
    """What the command line (or a tool driving the launcher) adds to a plan."""

    def __init__(self, given_fds=None, socket_path=None, status_fd=None, extra_args=(), bpf=None,
                 syscall_names=None, notification_policy=None, route_all_to_notify=False, sockets=None,
                 pidfile=None, hand_over=False, socket_group=None, restart=None, carried=None, files=None,
                 read_only=False, preloader=None):
        self.given_fds = dict(given_fds or {})   # name (None: the unix-listener) -> caller's fd
        self.socket_path = socket_path           # listener for the vfio-user unix-listener fd
        self.sockets = dict(sockets or {})       # fd name -> path of a listening socket to create
        self.files = dict(files or {})           # file fd name -> path of an existing file to open
        self.read_only = read_only               # open those read-only, whatever the fd's mode
        self.socket_group = socket_group         # gid of the sockets created (mode 0660), or None
        self.status_fd = status_fd
        self.pidfile = pidfile                   # path written with the launcher's pid while it runs
        self.extra_args = tuple(extra_args)
        self.bpf = bpf                           # compiled filter, or None to compile now
        self.syscall_names = syscall_names       # callable -> {nr: name}, for reporting
        self.notification_policy = notification_policy   # None: seccomp.StagedPolicy (see above)
        self.route_all_to_notify = route_all_to_notify   # compile (when bpf is None) and listen for learning
        # exec jailer-monitor in this very process once the program runs (see jailer.monitor):
        # only for a process that exists to run the sandbox (`jailer run`), never an embedder's
        self.hand_over = hand_over
        # restart the program as the plan's RestartPlan says (only `jailer run`, which can exec
        # itself again: jailer.host.restart), and what the run before this one handed on
        self.restart = restart
        self.carried = carried
        self.preloader = preloader               # zero-exec: jailer.zero_exec.preloader.Preloader, or None


def run(plan, options: Options) -> int:
    """Run the plan's program in its sandbox; returns the launcher's exit code."""
    return _Launch(plan, options).run()


class _Launch:
    """The launcher's side: prepare, fork, then supervise until the sandbox is gone."""

    def __init__(self, plan, options):
        self.plan = plan
        self.options = options
        self.enforcement = status.Enforcement(plan.best_effort)
        self.status = status.StatusStream(options.status_fd)
        self.manifest = None
        self.program_sockets = []       # jailer.host.sockets.ProgramSocket, one per [[sockets]] entry
        self.socket_deadline = None     # ready = "socket": monotonic time by which the program must listen
        self.ready_failure = None       # why the program never became ready (it was killed for it)
        self.cgroup = None
        self.setup_pid = None
        self.maps_written = None        # the pid whose id maps are written (the zero-exec preloader's, early)
        self.program_pid = None         # outer pid of the program
        self.error = None               # _error_fields of the first failure
        self.program_status = None
        self.pid1_status = None
        self.listener = None
        self.notifications = None
        self.grab = None                # (pidfd, fd number, deadline) while taking the listener
        self.handshake = None           # (pid, nr of read, sync fd): the child's own wait for "go"
        self.started = False
        self.stage = "setup"            # "steady" once the program is ready
        self.ready_pending = False      # READY=1 arrived before the exec was seen
        self.notify_fd = None           # the launcher's end of the program's notify socketpair
        self.reported = set()
        self.pending_signals = []
        self.pidfile = None             # the --pidfile written (jailer.host.paths.Made)
        self.host_id_made = None        # the record of this sandbox's own host id (jailer.host.host_ids)
        self.record = None              # the record of what this run made, for a clean-up after a kill (jailer.host.leftovers)
        self.hand_over_at = None        # monotonic time from which jailer-monitor may take over
        self.monitor_failed = False
        self.setup_pidfd = None
        self.monitor_can_take_over = None   # decided once the program's pid is known
        self.prepared_state = None      # (what it depends on, the monitor's state text)
        self.monitor_rules = None       # jailer.monitor.rule_lines, rendered before the program starts
        self.syscall_names = None       # {nr: name}, for the notifications and the monitor
        self.stop_requested = False     # a stop signal was passed on: the program is not restarted
        self.restart_after = None       # seconds to wait before the program is started again
        self.restart_state = None       # memfd of what a restart gets (jailer.host.restart), once made

    def run(self) -> int:
        plan = self.plan = self._with_own_host_ids(self.plan)
        identity = plan.identity
        owner = (namespaces.outside_id(identity.uid, identity.uid_map),
                 namespaces.outside_id(identity.gid, identity.gid_map))
        options = self.options
        self.pidfile = _write_pidfile(options.pidfile) if options.pidfile else None
        self.hand_on = None             # what the next run gets (jailer.host.restart.Carried) when restarting
        try:
            code = self._run(plan, options, owner)
        finally:
            if self.hand_on is None:
                if self.pidfile is not None:
                    self.pidfile.remove()
                if self.host_id_made is not None:
                    self.host_id_made.remove()
                if self.record is not None:
                    self.record.remove()
                if options.carried is not None:
                    options.carried.remove()   # (already done, unless the run failed before taking them)
        if self.hand_on is not None:
            return self._restart(self.hand_on, code)
        return code

    def _with_own_host_ids(self, plan):
        """As root, the plan with a host uid/gid of this sandbox's own (jailer.host.host_ids)."""
        identity = plan.identity
        mode = getattr(identity, "host_ids", "shared")
        if os.geteuid() != 0 or mode == "shared":
            return plan
        from jailer.host import host_ids
        from jailer.host.identity import Identity, PlanWithIdentity

        number, self.host_id_made = host_ids.allocate(mode, tuple(identity.host_id_range), plan.name)
        self.enforcement.applied["host_ids"] = {"mode": mode, "uid": number, "gid": number}
        return PlanWithIdentity(plan, Identity(identity, number))

    def _run(self, plan, options, owner) -> int:
        socket_path, fd_sockets, program_paths = _split_sockets(plan, options)
        if options.carried is not None:   # a restart: what jailer made or was given comes again
            given = dict(options.carried.given)
            fd_sockets = {name: path for name, path in fd_sockets.items() if name not in given}
            if socket_path is not None and fdlib.main_listener(plan.fds, "--socket-path").name in given:
                socket_path = None
        else:
            given = dict(options.given_fds)
            if "LISTEN_FDS" in os.environ:
                given = fdlib.activated_fds(plan.fds, given, options.sockets, options.socket_path)
        self.manifest = fdlib.Manifest.gather(plan.fds, given, socket_path, owner, fd_sockets,
                                              options.socket_group, program_sockets=bool(program_paths),
                                              made=options.carried.made if options.carried else (),
                                              files=options.files, read_only=options.read_only)
        try:
            for name, fd in self.manifest.new_checkpoints.items():
                # systemd keeps it across restarts of the unit and passes it back (LISTEN_FDNAMES)
                self._tell_service_manager(f"FDSTORE=1\nFDNAME={name}", fds=(fd,))
            if plan.sockets:
                from jailer.host.sockets import ProgramSocket

                for spec in plan.sockets:
                    self.program_sockets.append(ProgramSocket(spec, program_paths[spec.name], owner,
                                                              options.socket_group))
            self.notify_fd = self.manifest.notify_fd
            numbers = self.manifest.numbers()
            argv = fdlib.expand_argv(plan.program.argv + options.extra_args, numbers,
                                     [spec.name for spec in plan.fds if not spec.required])
            environment = dict(plan.environment)
            environment.update(fdlib.listen_environment(self.manifest.listen_numbers()))
            if self.notify_fd is not None:
                environment["JAILER_NOTIFY_FD"] = str(numbers[self.manifest.notify_name])
            bpf = None
            self.listen = False
            if plan.seccomp.enabled:
                from jailer.layers import seccomp

                self.listen = seccomp.needs_listener(plan.seccomp, options.route_all_to_notify)
                bpf = options.bpf
                if bpf is None:
                    bpf = seccomp.compile_bpf(plan.seccomp, options.route_all_to_notify)
            cgroup_plan = plan.limits.cgroup
            if cgroup_plan is not None and (cgroup_plan.memory_max is not None or cgroup_plan.pids_max is not None
                                            or cgroup_plan.cpu_quota_us is not None):
                self.enforcement.attempt("cgroup", lambda: self._create_cgroup(cgroup_plan))
            if options.carried is None:   # (a restart carries the record of its first run)
                from jailer.host import leftovers

                self.record = leftovers.record([made for made in self._made_at_callers_paths()
                                                if made is not self.host_id_made],   # (freed by host_ids)
                                               sorted(set(self.cgroup.directories.values())) if self.cgroup else ())
            return self._fork_and_supervise(argv, environment, bpf)
        finally:
            if self.cgroup is not None:
                self.cgroup.remove()
            if self.restart_after is not None:
                self.hand_on = self._hand_on()
            for program_socket in self.program_sockets:
                program_socket.remove()
            self.manifest.close()

    def _made_at_callers_paths(self) -> list:
        """The sockets and pid file jailer made for the caller (jailer.host.paths.Made)."""
        return (self.manifest.made + [p.made for p in self.program_sockets if p.made is not None]
                + [made for made in (self.pidfile, self.host_id_made, self.record) if made is not None])

    def _carried(self):
        """What a restart would get now (jailer.host.restart.Carried)."""
        from jailer.host.restart import Carried

        return Carried(self.manifest.kept, self._made_at_callers_paths(), self._restarts_so_far())

    def _restarts_so_far(self) -> list:
        return list(self.options.carried.restarts) if self.options.carried is not None else []

    def _hand_on(self):
        """Take what the next run keeps out of this run's clean-up: the descriptors the program
        gets again and what jailer made at the caller's paths."""
        carried = self._carried()
        self.manifest.made = []
        for program_socket in self.program_sockets:
            program_socket.made = None
        self.pidfile = self.host_id_made = self.record = None
        kept = set(self.manifest.kept.values())
        self.manifest.created_fds = [fd for fd in self.manifest.created_fds if fd not in kept]
        return carried

    def _plan_restart(self, wait_status):
        from jailer.host import restart

        previous = self._restarts_so_far()
        action, detail = restart.decide(self.options.restart, wait_status, self.stop_requested, previous,
                                        time.monotonic())
        if action == "restart":
            self.restart_after = detail
            self.status.emit("restarting", restart=len(previous) + 1, delay=detail)
        elif action == "give-up":
            self.status.emit("gave-up", restarts=detail, interval=self.options.restart.interval)
            status.warn(restart.give_up_message(self.options.restart, detail))

    def _restart(self, carried, code) -> int:
        """Wait the back-off, then exec this `jailer run` again with what it keeps; returns
        (the program's last exit code, or 128 + the signal) only when stopped meanwhile or
        when that exec fails, having removed what jailer made."""
        import sys

        from jailer.host import restart

        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        stop = self.pending_signals[0] if self.pending_signals else None
        if stop is None:
            caught = signal.sigtimedwait(FORWARDED_SIGNALS, self.restart_after)
            stop = caught.si_signo if caught is not None else None
        if stop is not None:
            self.status.emit("restart-cancelled", signal=stop)
            carried.remove()
            return 128 + stop
        carried.restarts.append(time.monotonic())
        state = carried.state_fd()
        for fd in carried.descriptors():
            os.set_inheritable(fd, True)
        os.environ[restart.ENVIRONMENT] = str(state)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        command = restart.command_line()
        try:
            os.execv(command[0], command)
        except OSError as exc:
            status.warn(f"cannot restart the program: {command[0]}: {exc.strerror}")
        os.close(state)
        carried.remove()
        return code

    def _create_cgroup(self, cgroup_plan):
        from jailer.layers.cgroups import Cgroup

        preloader = self.options.preloader
        self.cgroup = Cgroup.create(cgroup_plan, self.plan.name,
                                    companions=[preloader.pid] if preloader is not None and preloader.pid else [])
        if preloader is not None and preloader.pid:
            try:
                self.cgroup.move(preloader.pid)
            except OSError:
                pass   # (the sandbox's process joins itself, and reports what refuses it)
        return self.cgroup.describe()

    def _fork_and_supervise(self, argv, environment, bpf) -> int:
        parent_sock, child_sock = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        parent_sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_PASSCRED, 1)
        exec_r, exec_w = os.pipe2(os.O_CLOEXEC)
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        import_for_child(self.plan, os.geteuid() == 0)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED_SIGNALS}
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)   # a restart execs with them blocked
        old_wakeup = signal.set_wakeup_fd(wake_w)
        launcher_pid = os.getpid()
        started = None
        self.bind_sources = None
        if self.options.preloader is not None:
            built = self._build_beside(self.options.preloader)
            started = self.options.preloader.start_sandbox(*self._child_request(child_sock, exec_w, argv, environment,
                                                                                bpf, built),
                                                           meanwhile=self._prepare_monitor)
            for _, fd in built or ():
                os.close(fd)   # (the preloader holds them now, or they are not needed)
        if started is not None:
            pid, cloned = started
        else:
            pid, cloned = namespaces.start_child(self.plan.namespaces)
        if pid == 0:
            signal.set_wakeup_fd(-1)
            child = SetupChild(self.plan, self.enforcement, child_sock.detach(), exec_w, launcher_pid,
                           self.manifest.entries, argv, environment, bpf, self.listen, self.cgroup, cloned)
            run_child(child, [parent_sock.detach(), exec_r, wake_r, wake_w])
        self.setup_pid = pid
        if self.bind_sources is None:
            self.bind_sources = self._check_bind_sources()   # while the child unshares
        child_sock.close()
        os.close(exec_w)
        try:
            return self._supervise(parent_sock, exec_r, wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (exec_r, wake_r, wake_w):
                os.close(fd)
            parent_sock.close()
            if self.listener is not None:
                os.close(self.listener)

    def _child_request(self, child_sock, exec_w, argv, environment, bpf, built) -> tuple[dict, list[int]]:
        """What the sandbox's process would inherit from a fork of this launcher now, for the
        zero-exec preloader (jailer.zero_exec.preloader), which started before most of it existed:
        the data, and the descriptors (the set-up socket, the exec pipe, the manifest's, then
        the namespaces built beside it, when they were: see _build_beside)."""
        specs = list(self.plan.fds)
        host_id = self.enforcement.applied.get("host_ids", {}).get("uid") if self.host_id_made else None
        layers, namespace_fds = zip(*built) if built else ((), ())
        request = {"argv": list(argv), "environment": dict(environment), "bpf": bpf, "listen": self.listen,
                   "applied": self.enforcement.applied, "skipped": self.enforcement.skipped, "host_id": host_id,
                   "specs": [specs.index(spec) for spec, _ in self.manifest.entries], "built": list(layers),
                   "cgroup": ((self.cgroup.directories, self.cgroup.versions, self.cgroup.joined)
                              if self.cgroup is not None else None)}
        return request, [child_sock.fileno(), exec_w, *(fd for _, fd in self.manifest.entries), *namespace_fds]

    def _build_beside(self, preloader) -> list[tuple[str, int]] | None:
        """Build the sandbox's mount, net, ipc and uts namespaces and its root while the zero-exec
        preloader still imports, so that it only enters them (setns) when it takes the request:
        its id maps are written now, and a builder process, forked into its user and pid
        namespaces (so the /proc it mounts is the sandbox's), unshares, mounts and pivots as
        the setup child would (_run_builder). [(layer, fd of the namespace)], or None when the
        plan does not allow it or anything failed: the preloader then does it all itself,
        which reports the failure."""
        plan = self.plan
        if not (preloader.pid and builds_beside(plan, preloader.cloned)):
            return None
        self.bind_sources = self._check_bind_sources()
        if self.bind_sources[1] is not None:
            return None
        try:
            namespaces.write_id_maps(preloader.pid, plan.identity)
        except JailerError:
            return None
        self.maps_written = preloader.pid
        try:
            user_fd = os.open(f"/proc/{preloader.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            pid_fd = os.open(f"/proc/{preloader.pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        ours.setsockopt(_socket.SOL_SOCKET, _socket.SO_PASSCRED, 1)
        launcher_pid = os.getpid()
        builder = os.fork()
        if builder == 0:
            code = 1
            try:
                code = _run_builder(plan, theirs.fileno(), user_fd, pid_fd, self.bind_sources, launcher_pid)
            finally:
                os._exit(code)
        theirs.close()
        os.close(user_fd)
        os.close(pid_fd)
        built = None
        try:
            if select.select([ours], (), (), _BUILD_TIMEOUT)[0]:
                data, ancillary, _, _ = ours.recvmsg(65536, _socket.CMSG_SPACE(12))
                sender = next((int.from_bytes(payload[:4], "little", signed=True) for level, kind, payload
                               in ancillary if level == _socket.SOL_SOCKET and kind == _socket.SCM_CREDENTIALS), None)
                message = marshal.loads(data) if data else None
                if message and message[0] == "built" and sender:
                    _, applied, skipped = message
                    built = [(layer, os.open(f"/proc/{sender}/ns/{_NS_FILES[layer]}", os.O_RDONLY | os.O_CLOEXEC))
                             for layer in _NS_FILES if layer in applied]
                    self.enforcement.merge(applied, skipped)
        except (OSError, ValueError, EOFError, TypeError):
            built = None
        finally:
            ours.close()   # (the builder's processes end when they read its end of file)
            if built is None:
                os.kill(builder, signal.SIGKILL)
            os.waitpid(builder, 0)
        return built

    def _check_bind_sources(self) -> tuple:
        """({source: (st_dev, st_ino) or None}, error fields or None, [(source, target)] of the
        writable binds the program's own sockets get), sent to the child with "go". Resolved
        here, with the invoker's ids and in the host's view of file owners, which
        jailer.host.paths needs to tell whose directory a path passes through (inside a user
        namespace root and every other unmapped user look alike); the child opens each source
        in its mount namespace and binds it only if it is this inode."""
        if not self.plan.namespaces.mount:
            return {}, None, []
        from jailer.layers import mounts

        try:
            checked = mounts.check_sources(self.plan.filesystem)
        except LayerError as exc:
            return {}, error_fields(exc), []
        socket_binds = []
        for program_socket in self.program_sockets:
            source, target, identity = program_socket.bind()
            checked[source] = identity
            socket_binds.append((source, target))
        return checked, None, socket_binds

    def _on_signal(self, signum, frame):
        self.pending_signals.append(signum)

    def _supervise(self, sock, exec_r, wake_r) -> int:
        setup_pidfd = self.setup_pidfd = os.pidfd_open(self.setup_pid)
        poller = select.poll()
        for fd in (sock.fileno(), exec_r, wake_r, setup_pidfd):
            poller.register(fd, select.POLLIN)
        if self.notify_fd is not None:
            poller.register(self.notify_fd, select.POLLIN)
        exec_open = True
        try:
            while True:
                for fd, events in poller.poll(self._poll_timeout()):
                    if fd == sock.fileno():
                        if not self._receive(sock) and events & select.POLLHUP:
                            poller.unregister(fd)   # every child end is closed
                    elif fd == exec_r:
                        poller.unregister(exec_r)
                        exec_open = False
                        while self._receive(sock, block=False):   # an exec failure is reported first
                            pass
                        self._exec_done()
                    elif fd == wake_r:
                        _drain(wake_r)
                    elif fd == self.listener:
                        if events & (select.POLLHUP | select.POLLERR):
                            poller.unregister(fd)
                        else:
                            self._notification()
                    elif fd == self.notify_fd:
                        if not self._read_notify():
                            poller.unregister(fd)
                    elif fd == setup_pidfd:
                        _, setup_status = os.waitpid(self.setup_pid, 0)
                        while self._receive(sock, block=False):
                            pass
                        if exec_open:
                            self._exec_done()
                        if self.notify_fd is not None:
                            self._read_notify()   # what the program said before it ended
                        return self._finish(setup_status)
                if self.grab:
                    self._try_grab(sock, poller)
                if self.socket_deadline is not None and self.program_pid is not None:
                    self._check_program_sockets()
                self._forward_signals()
                if self._may_hand_over():
                    self._hand_over()
        finally:
            os.close(setup_pidfd)
            if self.grab:
                os.close(self.grab[0])

    def _receive(self, sock, block=True) -> bool:
        try:
            data, ancillary, _, _ = sock.recvmsg(65536, _socket.CMSG_SPACE(12), 0 if block else _socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except ConnectionResetError:   # the sandbox ended with our "go" unread (its read was refused)
            return True
        if not data:
            return False
        sender = None
        for level, kind, payload in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_CREDENTIALS:
                sender = int.from_bytes(payload[:4], "little", signed=True)
        kind, *fields = marshal.loads(data)
        if kind == "unshared":
            self._write_maps_and_release(sock, sender, *fields)
        elif kind == "ready":
            self._ready(sender, *fields)
        elif kind == "skipped":
            self.enforcement.skipped[fields[0]] = fields[1]
        elif kind == "error":
            self.error = self.error or tuple(fields)
        elif kind == "status":
            if fields[0] == "program":
                self.program_status = fields[1]
            else:
                self.pid1_status = fields[1]
        return True

    def _write_maps_and_release(self, sock, setup_pid, user_namespace, net_namespace):
        try:
            if user_namespace and self.maps_written != setup_pid:
                namespaces.write_id_maps(setup_pid, self.plan.identity)
            if net_namespace and self.plan.network.mode == "veth":
                from jailer.layers import network

                self.enforcement.attempt("network", lambda: network.create_veth(self.plan.network, setup_pid),
                                         network.FIX_VETH)
        except JailerError as exc:
            self.error = error_fields(exc)
            os.kill(setup_pid, signal.SIGKILL)
            return
        send_message(sock.fileno(), "go", *self.bind_sources)

    def _ready(self, program_pid, applied, skipped, listener_number, sync_number):
        self.program_pid = program_pid
        self.enforcement.merge(applied, skipped)
        if listener_number >= 0:
            self.grab = (os.pidfd_open(program_pid), listener_number, time.monotonic() + _GRAB_TIMEOUT)
            self.handshake = (program_pid, sync_number)

    def _try_grab(self, sock, poller):
        """Take the program's seccomp listener (pidfd_getfd) as soon as its filter is loaded.

        The filter loads about 0.1 ms after "ready"; until then pidfd_getfd fails with EBADF.
        This tries again at once for _GRAB_SPIN (the child runs on another CPU, and a sleep
        here would halt this one: a VM's vCPU wakes 0.1 ms or more late, and the exec of
        jailer-monitor, which the program's first notified syscall waits for, with it), then
        sleeps in short steps (select). Any other failure will not change: the child would
        wait forever for its go-ahead, so the sandbox is stopped with a LayerError."""
        from jailer.layers import seccomp, syscalls

        pidfd, number, deadline = self.grab
        fd = None
        failure = None
        spin_until = time.monotonic() + _GRAB_SPIN
        pauses = iter(_GRAB_PAUSES)
        while True:
            try:
                fd = syscalls.pidfd_getfd(pidfd, number)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    failure = f"pidfd_getfd: {exc.strerror}"
                    break
            else:
                if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:seccomp notify":
                    break
                os.close(fd)
                fd = None
            if time.monotonic() < spin_until:
                continue
            pause = next(pauses, None)
            if pause is None:
                break
            select.select((), (), (), pause)
        if fd is None:
            if failure is None and time.monotonic() > deadline:
                failure = "the program's filter did not appear in time"
            if failure is not None or self.error:
                os.close(pidfd)
                self.grab = None
            if failure is not None and not self.error:
                self.error = ("LayerError", "seccomp", f"cannot take the notification listener ({failure})",
                              _GRAB_FIX)
                self._kill_sandbox(self.program_pid)
            return
        os.close(pidfd)
        self.grab = None
        self.listener = fd
        names = self._syscall_names()
        policy = self.options.notification_policy or seccomp.StagedPolicy(self.plan.seccomp,
                                                                          self.options.route_all_to_notify)
        self.notifications = seccomp.Notifications(fd, policy, names, self._kill_sandbox)
        program_pid, sync_number = self.handshake
        self.handshake = (program_pid, next((nr for nr, name in names.items() if name == "read"), -1), sync_number)
        poller.register(fd, select.POLLIN)
        send_message(sock.fileno(), "go")
        self._prepare_hand_over()
        if self.plan.program.start == "zero-exec":
            # Nothing is exec'd: once its filter is loaded the program runs (jailer.zero_exec), so
            # jailer-monitor can take over now, while the program resets, rather than once the
            # exec pipe closes; the program would wait for it at its first notified syscall.
            self._exec_done()

    def _notification(self):
        if self.notify_fd is not None:
            self._read_notify()   # a READY=1 sent before this syscall counts before it is answered
        try:
            notif = self.notifications.receive()
        except OSError:
            return
        if self.handshake and (notif.pid, notif.nr, notif.args[0]) == self.handshake:
            # The child's own wait for "go" after loading the filter, once: release it, do not report it.
            from jailer.layers import syscalls

            self.handshake = None
            try:
                syscalls.seccomp_notif_fail(self.listener, notif.id, 1)
            except OSError:
                pass
            return
        event = self.notifications.answer(notif, self.stage)
        if event is None:
            return
        self.status.emit("seccomp", **event)
        key = (event["syscall"], event["action"])
        if key not in self.reported:
            self.reported.add(key)
            outcome = f"failed with errno {event['errno']}" if event["action"] == "errno" else "sandbox killed"
            when = " after it was ready" if self.stage == "steady" and self.plan.seccomp.steady else ""
            status.warn(f"seccomp: the program called {event['syscall']}{when}, refused by action "
                        f"'{event['action']}': {outcome}")

    def _read_notify(self) -> bool:
        """Read the program's sd_notify-style datagrams; False once its end is gone."""
        while True:
            try:
                data = os.read(self.notify_fd, 4096)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return True
            for line in data.decode(errors="replace").split("\n"):
                key, _, value = line.partition("=")
                if key == "READY" and value == "1":
                    if self.started:
                        self._become_ready()
                    else:
                        self.ready_pending = True
                elif key == "STATUS":
                    self.status.emit("status", text=value)
                    self._tell_service_manager(f"STATUS={value}")

    def _check_program_sockets(self):
        """ready = "socket": place each socket the program listens on, ready once all are;
        past the deadline the sandbox is killed and the run fails saying which is missing."""
        waiting = [p for p in self.program_sockets if p.made is None]
        for program_socket in waiting:
            if not program_socket.listening(self.program_pid):
                continue
            try:
                program_socket.place()
            except JailerError as exc:
                self._fail_readiness(str(exc))
                return
            self.status.emit("listening", socket=program_socket.spec.name, path=program_socket.path)
        waiting = [p for p in self.program_sockets if p.made is None]
        if not waiting:
            self.socket_deadline = None
            self._become_ready()
        elif time.monotonic() > self.socket_deadline:
            first = waiting[0].spec
            self._fail_readiness(f"the program did not listen on its socket '{first.name}' ({first.path}) within "
                                 f"{self.plan.program.ready_timeout:g} s (program.ready_timeout)")

    def _fail_readiness(self, reason):
        self.socket_deadline = None
        self.ready_failure = reason
        self._kill_sandbox(None)

    def _become_ready(self):
        if self.stage != "setup":
            return
        self.stage = "steady"
        self.status.emit("ready", pid=self.program_pid)
        self._tell_service_manager(f"READY=1\nMAINPID={os.getpid()}")
        if self.plan.seccomp.steady and self.listener is not None:
            self.status.emit("stage", stage="steady")

    def _tell_service_manager(self, state, fds=()):
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        from jailer import sdnotify

        try:
            sdnotify.notify(state, fds=fds)
        except JailerError as exc:
            status.warn(str(exc))

    def _kill_sandbox(self, pid):
        """SIGKILL the sandbox: the process that holds it together first (pid 1 of its pid namespace,
        or the set-up process pid 1 dies with), then the program, then `pid`. A task blocked in a
        notified syscall is killed last, so that nothing waiting on it runs on meanwhile."""
        for target in (self.setup_pid, self.program_pid, pid):
            if target:
                try:
                    os.kill(target, signal.SIGKILL)
                except OSError:
                    pass

    def _exec_done(self):
        """The exec pipe closed: the program was exec'd (or its process died before exec)."""
        if self.error or self.program_pid is None or self.started:
            return
        self.started = True
        if self.plan.seccomp.enabled and "seccomp" not in self.enforcement.skipped:
            self.enforcement.applied["seccomp"] = {
                "rules": len(self.plan.seccomp.rules), "default": self.plan.seccomp.default_action,
                "report": "user-notify" if self.listener is not None and self.plan.seccomp.report else "no",
                "steady_rules": len(self.plan.seccomp.steady)}
        self.status.emit("started", pid=self.program_pid)
        self.status.emit("enforced", layers=self.enforcement.applied, skipped=self.enforcement.skipped)
        for layer, reason in self.enforcement.skipped.items():
            status.warn(f"layer '{layer}' skipped (best effort): {reason}")
        if self.plan.program.ready == "exec" or self.ready_pending:
            self._become_ready()
        elif self.plan.program.ready == "socket":
            self.socket_deadline = time.monotonic() + self.plan.program.ready_timeout
            self._check_program_sockets()

    def _forward_signals(self):
        while self.pending_signals:
            if not self.started and self.program_pid is not None and not self.error:
                return   # the program is being exec'd: deliver once it runs
            signum = self.pending_signals.pop(0)
            if not self.started:
                self._kill_sandbox(self.setup_pid)   # interrupted during set-up: tear it down
                self.error = self.error or ("JailerError", "", f"interrupted by signal {signum} during set-up", "")
                continue
            self.stop_requested = True
            if self._program_is_unguarded_pid1():
                # As pid 1 the program ignores a signal it has no handler for yet, and until it
                # says READY=1 it may not have one: end it instead of waiting for nothing.
                self._kill_sandbox(None)
                continue
            try:
                os.kill(self.program_pid, signum)
            except OSError:
                pass

    def _poll_timeout(self):
        """ms until something is due without an event: the listener grab, or the hand-over."""
        if self.grab:
            return 1
        if self.socket_deadline is not None:
            return 5
        if self.started and not self.monitor_failed and self.hand_over_at not in (None, float("inf")):
            return max(0, int((self.hand_over_at - time.monotonic()) * 1000) + 1)
        return None

    def _may_hand_over(self) -> bool:
        """Whether jailer-monitor can take over now (see jailer.monitor): the program runs and
        is this process's own child, and nothing but the default policy answers for it. A
        program that is starting up with notified syscalls is handed over at once (the monitor
        answers them faster); any other only once it has run for HAND_OVER_AFTER seconds, so
        that a short-lived one is not worth an exec."""
        if not self.started or self.error or self.grab or self.pending_signals or self.socket_deadline is not None:
            return False   # (the monitor cannot wait for a program's own socket)
        if self.hand_over_at is None:
            if not self._monitor_can_take_over():
                self.hand_over_at = float("inf")
                gc.enable()   # run_cli turned it off for the start-up; this launcher stays to supervise
                return False
            urgent = self.stage == "setup" and self.listener is not None
            self.hand_over_at = time.monotonic() + (0 if urgent else HAND_OVER_AFTER)
        return (time.monotonic() >= self.hand_over_at and not self.monitor_failed
                and not (self.notifications is not None and self.notifications.killed))

    def _monitor_can_take_over(self) -> bool:
        if self.monitor_can_take_over is None:
            from jailer import monitor

            self.monitor_can_take_over = bool(
                self.options.hand_over and self.program_pid == self.setup_pid
                and self.options.notification_policy is None and not self.options.route_all_to_notify
                and monitor.available() and not self._restart_command_has_newline())
        return self.monitor_can_take_over

    def _restart_plan(self):
        """The profile's [restart] when this run applies it, else None."""
        restart_plan = self.options.restart
        return None if restart_plan is None or restart_plan.policy == "no" else restart_plan

    def _restart_command_has_newline(self) -> bool:
        """The monitor reads the command it restarts one argument per line."""
        if self._restart_plan() is None:
            return False
        from jailer.host.restart import command_line

        return any("\n" in arg for arg in command_line())

    def _syscall_names(self) -> dict:
        if self.syscall_names is None:
            from jailer.layers import seccomp

            self.syscall_names = self.options.syscall_names() if self.options.syscall_names else seccomp.syscall_names()
        return self.syscall_names

    def _prepare_monitor(self):
        """What the hand-over needs that only the plan decides (the monitor's module, its
        restart module and the rules part of its state, most of it), made while the zero-exec
        preloader takes the request: the launcher would only wait, and the program waits at
        its first notified syscall until the monitor runs. (Whether the monitor is available is
        checked once, when it may take over.)"""
        if not self.options.hand_over:
            return
        if self._restart_plan() is not None:
            from jailer.host import restart  # noqa: F401
        self._monitor_rules()

    def _monitor_rules(self) -> list[str]:
        if self.monitor_rules is None:
            from jailer import monitor

            self.monitor_rules = monitor.rule_lines(self.plan.seccomp, self._syscall_names() if self.listen else None)
        return self.monitor_rules

    def _prepare_hand_over(self):
        """Render the monitor's state while the program is being exec'd, when the launcher waits
        anyway: from its exec on, the program stalls at its first notified syscall until the
        monitor answers, so the hand-over does as little as it can after the exec."""
        if self._monitor_can_take_over():
            self.prepared_state = self._monitor_state()

    def _monitor_state(self) -> tuple:
        """(what the state depends on that may still change, the monitor's state text)."""
        from jailer import monitor

        changing = (self.stage, frozenset(self.reported))
        if self.prepared_state is not None and self.prepared_state[0] == changing:
            return self.prepared_state
        return changing, monitor.state(
            program_pid=self.program_pid, pidfd=self.setup_pidfd, listener=self.listener, notify_fd=self.notify_fd,
            status_fd=self.status.fd, cgroup_dirs=sorted(set(self.cgroup.directories.values())) if self.cgroup else (),
            made=self._made(), rules=self._monitor_rules(), reported=self.reported, stage=self.stage,
            guard=self._program_is_pid1_until_ready())

    def _made(self) -> list:
        """The sockets, directories and pid file jailer made, which whoever outlives the program removes."""
        return (self.manifest.made + self.program_sockets
                + [made for made in (self.pidfile, self.host_id_made, self.record) if made is not None])

    def _hand_over(self):
        """Exec jailer-monitor in this process; returns only if that exec failed."""
        import sys

        from jailer import monitor

        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        self._forward_signals()   # those caught before the block
        _, text = self._monitor_state()
        restart_lines, restart_fds = self._monitor_restart()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        error = monitor.exec_monitor(text + restart_lines,
                                     (self.setup_pidfd, self.listener, self.notify_fd, self.status.fd,
                                      *(fd for made in self._made() for fd in made.descriptors()), *restart_fds))
        for fd in restart_fds[:1]:
            os.close(fd)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        self.monitor_failed = True
        gc.enable()
        status.warn(f"cannot start {monitor.MONITOR}: {error.strerror}; the launcher stays resident")

    def _monitor_restart(self) -> tuple[str, list]:
        """(the monitor's restart lines, the descriptors a restart needs) when the plan restarts:
        the monitor decides as _plan_restart does and execs this `jailer run` again with the
        state a memfd holds (jailer.host.restart), descriptors first."""
        restart_plan = self._restart_plan()
        if restart_plan is None:
            return "", []
        from jailer.host.restart import command_line

        carried = self._carried()
        state = carried.state_fd()
        lines = [f"restart {restart_plan.policy} {restart_plan.limit} {restart_plan.interval!r} "
                 f"{restart_plan.delay!r} {restart_plan.max_delay!r} {state}"]
        lines += [f"restarted {moment!r}" for moment in carried.restarts]
        if self.stop_requested:   # a signal passed on just before the hand-over: the end is asked for
            lines.append("stopping")
        lines += [f"exec {arg}" for arg in command_line()]
        return "".join(line + "\n" for line in lines), [state, *self.manifest.kept.values()]

    def _program_is_pid1_until_ready(self) -> bool:
        """The program is pid 1 and says when it is ready: until then it may lack a handler."""
        return (self.plan.namespaces.pid1 == "program" and self.plan.program.ready == "notify"
                and "pid_namespace" in self.enforcement.applied)

    def _program_is_unguarded_pid1(self) -> bool:
        return self.stage == "setup" and self._program_is_pid1_until_ready()

    def _finish(self, setup_status) -> int:
        if self.error and not self.started:
            kind, layer, reason, fix = self.error
            if kind == "LayerError":
                raise LayerError(layer, reason, fix)
            raise JailerError(reason)
        wait_status = self.program_status
        if wait_status is None:
            wait_status = self.pid1_status if self.pid1_status is not None else setup_status
        if self.notifications is not None and self.notifications.killed:
            from jailer.layers.seccomp import SIGSYS

            wait_status = SIGSYS   # what the kernel's own kill action would have shown
        self.status.emit("exited", **status.describe_exit(wait_status))
        if self.options.restart is not None:
            self._plan_restart(wait_status)
        if self.ready_failure is not None:
            if self.restart_after is None:
                raise JailerError(self.ready_failure)
            status.warn(self.ready_failure)
        return status.exit_code(wait_status)


def _split_sockets(plan, options) -> tuple:
    """(--socket-path for a unix-listener fd or None, {fd name: path}, {[[sockets]] name: path}):
    --socket-path names the program's own socket when the profile has no unix-listener fd."""
    if not plan.sockets:   # (jailer.host.sockets stays off the start-up path)
        return options.socket_path, options.sockets, {}
    from jailer.host.sockets import main_socket

    names = {spec.name for spec in plan.sockets}
    fd_sockets = {name: path for name, path in options.sockets.items() if name not in names}
    program_paths = {name: path for name, path in options.sockets.items() if name in names}
    socket_path = options.socket_path
    if socket_path is not None and not any(f.kind == "unix-listener" for f in plan.fds):
        main = main_socket(plan.sockets, "--socket-path")
        if main.name in program_paths:
            raise UsageError(f"--socket-path and --socket {main.name}=PATH name the same socket")
        program_paths[main.name] = socket_path
        socket_path = None
    missing = [spec.name for spec in plan.sockets if spec.name not in program_paths]
    if missing:
        option = "--socket-path PATH" if len(plan.sockets) == 1 else f"--socket {missing[0]}=PATH"
        raise UsageError(f"the program binds its socket '{missing[0]}' itself: say where to make it reachable "
                         f"with {option}")
    return socket_path, fd_sockets, program_paths


def _write_pidfile(path):
    """Write our pid to `path` atomically (a reader never sees a partial file); returns what was made."""
    from jailer.host import paths

    try:
        return paths.write_file(path, f"{os.getpid()}\n".encode(), 0o644)
    except OSError as exc:
        raise JailerError(f"cannot write the pid file {path}: {exc.strerror}") from None


def _drain(fd):
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass


def _run_builder(plan, sock_fd: int, user_fd: int, pid_fd: int, bind_sources: tuple, launcher_pid: int) -> int:
    """The builder (see _Launch._build_beside), a fork of the launcher: it enters the zero-exec
    preloader's user and pid namespaces and forks into them a process that unshares the
    mount, net, ipc and uts namespaces, binds, mounts /proc and pivots exactly as the setup
    child would, reports "built" with what it applied, and ends when the launcher has opened
    its namespaces (its end of the socket closes)."""
    from jailer.layers import mounts, syscalls

    fdlib.close_all_but({2, sock_fd, user_fd, pid_fd})
    syscalls.setns(user_fd, syscalls.CLONE_NEWUSER)
    syscalls.setns(pid_fd, syscalls.CLONE_NEWPID)   # (for its children)
    os.close(user_fd)
    os.close(pid_fd)
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)   # (after setns, which changed the credentials)
    if os.getppid() != launcher_pid:
        return 1
    pid = os.fork()
    if pid != 0:
        os.close(sock_fd)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    enforcement = status.Enforcement(plan.best_effort)
    namespaces.enter_namespaces(plan.namespaces, enforcement, exclude=("pid_namespace", "cgroup_namespace"))
    checked, _, socket_binds = bind_sources   # (no error: _build_beside checked that)
    sources = mounts.open_sources(checked) if checked else {}
    syscalls.setfsuid(plan.identity.uid)   # what the set-up creates belongs to the sandbox's ids
    syscalls.setfsgid(plan.identity.gid)
    os.umask(0o022)   # (as the setup child's, whose program keeps it)
    network_and_root(plan, enforcement, lambda: sources, socket_binds)
    send_message(sock_fd, "built", enforcement.applied, enforcement.skipped)
    os.read(sock_fd, 1)
    return 0
