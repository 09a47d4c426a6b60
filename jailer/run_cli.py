"""`jailer run`: the start-up hot path, so it parses its own arguments and imports little.

The resolved plan, its compiled seccomp filter and the syscall-name table are cached per
profile, keyed on the profile's path, mtime, size and contents, the caller's uid/gid,
the environment variables the profile names, the jailer version and the files of the
modules that resolve profiles and compile filters; any mismatch or unreadable entry
falls back to resolving the profile again. toml, click, pyseccomp and pyroute2 are only
imported on a cache miss or when the plan needs them. Beside a zero-exec profile's entry
is the cache of the modules its preloader imports (jailer.zero_exec.module_cache).
"""

from __future__ import annotations

import gc
import marshal
import os
import sys

from jailer.errors import JailerError, UsageError

USAGE = """\
usage: jailer run [--fd NAME=N]... [--fd N] [--socket-path PATH] [--socket NAME=PATH]...
                  [--file NAME=PATH]... [--disk PATH] [--read-only] [--socket-group GROUP]
                  [--status-fd N] [--log-fd N] [--pidfile PATH] [--no-cache] [--no-restart]
                  PROFILE [-- ARG...]

Run the program a profile describes inside the sandbox the profile describes.

  --fd NAME=N        hand the caller's open fd N to the program as the profile's fd NAME
  --fd N             the same, for the profile's unix-listener fd (the only one, or "vfio-user")
  --socket-path PATH create a listening AF_UNIX socket at PATH for that unix-listener fd
  --socket NAME=PATH create a listening AF_UNIX socket at PATH for the unix-listener fd NAME
  --file NAME=PATH   open the existing file at PATH (outside the sandbox, with the caller's
                     rights) for the profile's file fd NAME, in that fd's mode
  --disk PATH        the same for the fd named "disk" (a disk image: profiles/virtio-blk.toml)
  --read-only        open the files of --file and --disk read-only, whatever their fd's mode
  --socket-group GROUP
                     the sockets jailer creates belong to GROUP (name or number) with mode
                     0660, so a client running as another user in GROUP can connect
  --status-fd N      write JSON-lines status events (started, enforced, ready, stage, seccomp,
                     exited, restarting, gave-up, ...) to fd N
  --log-fd N         jailer's messages and the program's stderr go to fd N instead of stderr
  --pidfile PATH     write the launcher's pid (the process to signal) to PATH while it runs
  --no-cache         resolve the profile and compile its filter even if a cached copy is valid
  --no-restart       do not apply the profile's [restart] policy (a service manager restarts)
  ARG...             appended to the profile's program arguments

Sockets passed by a service manager (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES) are taken as
the profile's fds of those names (a single one as its unix-listener).

With a [restart] policy, a program that ends is started again in a fresh sandbox, keeping the
sockets jailer listens on and the checkpoint fd, up to restart.limit times in restart.interval.

Exit status: the program's, or 128+N when signal N ended it; 1 on an error, 2 on a usage
or profile error, 3 when a required sandbox layer cannot be applied. See jailer(1).
"""


class Arguments:
    def __init__(self):
        self.profile = None
        self.given_fds = {}
        self.socket_path = None
        self.sockets = {}
        self.files = {}
        self.read_only = False
        self.socket_group = None
        self.status_fd = None
        self.log_fd = None
        self.pidfile = None
        self.use_cache = True
        self.restart = True
        self.extra_args = []


def _fd_number(text, option):
    if not text.isdigit():
        raise UsageError(f"{option}: '{text}' is not a file descriptor number")
    fd = int(text)
    try:
        os.fstat(fd)
    except OSError:
        raise UsageError(f"{option}: fd {fd} is not open in the caller") from None
    return fd


def _group_id(text) -> int:
    import grp

    try:
        return int(text) if text.isdigit() else grp.getgrnam(text).gr_gid
    except KeyError:
        raise UsageError(f"--socket-group: no group named '{text}'") from None


def parse(argv) -> Arguments:
    args = Arguments()
    items = list(argv)
    while items:
        item = items.pop(0)
        if item == "--":
            args.extra_args = items
            break
        option, has_value, value = item.partition("=") if item.startswith("--") else (item, False, "")
        if option in ("--fd", "--socket-path", "--socket", "--file", "--disk", "--socket-group", "--status-fd",
                      "--log-fd", "--pidfile"):
            if not has_value:
                if not items:
                    raise UsageError(f"{option} needs a value (see jailer run --help)")
                value = items.pop(0)
            if option == "--fd":
                name, _, number = value.rpartition("=")
                if name in args.given_fds or (not name and None in args.given_fds):
                    raise UsageError(f"--fd {value}: fd {name or 'N'} given twice")
                args.given_fds[name or None] = _fd_number(number, "--fd")
            elif option == "--socket-path":
                args.socket_path = os.path.abspath(value)
            elif option == "--socket":
                name, equals, path = value.partition("=")
                if not equals or not name or not path:
                    raise UsageError(f"--socket {value}: expected NAME=PATH")
                if name in args.sockets:
                    raise UsageError(f"--socket {value}: fd {name} given twice")
                args.sockets[name] = os.path.abspath(path)
            elif option in ("--file", "--disk"):
                name, equals, path = value.partition("=") if option == "--file" else ("disk", "=", value)
                if not equals or not name or not path:
                    raise UsageError(f"--file {value}: expected NAME=PATH")
                if name in args.files:
                    raise UsageError(f"{option} {value}: file '{name}' given twice")
                args.files[name] = os.path.abspath(path)
            elif option == "--pidfile":
                args.pidfile = os.path.abspath(value)
            elif option == "--socket-group":
                args.socket_group = _group_id(value)
            elif option == "--log-fd":
                args.log_fd = _fd_number(value, "--log-fd")
            else:
                args.status_fd = _fd_number(value, "--status-fd")
        elif item == "--no-cache":
            args.use_cache = False
        elif item == "--no-restart":
            args.restart = False
        elif item == "--read-only":
            args.read_only = True
        elif item.startswith("-") and item != "-":
            raise UsageError(f"unknown option '{item}' (see jailer run --help)")
        elif args.profile is None:
            args.profile = item
        else:
            raise UsageError(f"unexpected argument '{item}': program arguments go after '--'")
    if args.profile is None:
        raise UsageError("missing PROFILE (see jailer run --help)")
    if args.read_only and not args.files:
        raise UsageError("--read-only applies to --file and --disk, and neither is given")
    return args


def cache_dir() -> str:
    if os.environ.get("JAILER_CACHE_DIR"):
        return os.environ["JAILER_CACHE_DIR"]
    if os.geteuid() == 0:
        return "/var/cache/jailer"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jailer")


def _cache_key(path: str) -> tuple:
    """What the resolved plan depends on. The environment counts only through the variables
    the profile names as TOML strings (environment.pass takes exact names) or as {env:NAME}
    placeholders, so unrelated variables, which change from run to run, do not defeat the cache."""
    import zlib

    from jailer import __version__

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        text = _read_all(fd, st.st_size)
    finally:
        os.close(fd)
    passed = tuple(sorted((name, value) for name, value in os.environ.items()
                          if f'"{name}"'.encode() in text or f"'{name}'".encode() in text
                          or f"{{env:{name}}}".encode() in text))
    return (path, st.st_mtime_ns, st.st_size, st.st_ino, zlib.crc32(text), os.geteuid(), os.getegid(), passed,
            __version__, _resolver_stamp())


# The modules whose code decides what a cache entry holds: an edited one invalidates it.
RESOLVER_MODULES = ("plan.py", "profile.py", "runtime.py", "syscall_groups.py", "zero_exec/__init__.py",
                    "layers/seccomp.py")


def _resolver_stamp() -> tuple:
    package = os.path.dirname(os.path.abspath(__file__))
    stamp = []
    for name in RESOLVER_MODULES:
        try:
            st = os.stat(os.path.join(package, name))
            stamp.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            stamp.append((name, None, None))
    return tuple(stamp)


def _cache_file(directory: str, path: str) -> str:
    import zlib

    return os.path.join(directory, f"{zlib.crc32(path.encode()):08x}-{os.path.basename(path)}.plan")


def _modules_beside(plan_file: str) -> str:
    """The module cache (jailer.zero_exec.module_cache) beside a cached plan's file."""
    return plan_file[:-len(".plan")] + ".modules"


def open_private(file: str) -> int | None:
    """The cache file, opened read-only, when it is this user's and private to it; else None."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and not st.st_mode & 0o077:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _read_cache(file: str, key: tuple):
    """The cached entry when it is ours, private and for exactly this key; else None."""
    fd = open_private(file)
    if fd is None:
        return None
    try:
        entry = marshal.loads(_read_all(fd, os.fstat(fd).st_size))
        return entry if isinstance(entry, dict) and entry.get("key") == key else None
    except (OSError, EOFError, ValueError, TypeError):
        return None
    finally:
        os.close(fd)


def _read_all(fd: int, size: int) -> bytes:
    """The whole file in as few reads as its size allows (a buffered file object costs more here)."""
    chunks = []
    while True:
        chunk = os.read(fd, max(size, 4096) + 1)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _write_cache(directory: str, file: str, entry: dict) -> None:
    write_cache_file(directory, file, marshal.dumps(entry), prune=True)


def write_cache_file(directory: str, file: str, data: bytes, prune: bool = False) -> None:
    """Best effort: a cache that cannot be written only costs time. The directory is pinned
    (jailer.host.paths) and must be this user's and private; the file is written in it
    atomically (paths.write_in)."""
    from jailer.host import paths

    try:
        dirfd = paths.open_directory(directory, make_dirs=0o700)
    except (OSError, JailerError):
        return
    try:
        st = os.fstat(dirfd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return
        if prune:
            _prune(dirfd)
        os.close(paths.write_in(dirfd, os.path.basename(file), data, 0o600))
    except OSError:
        pass
    finally:
        os.close(dirfd)


class PlanView:
    """A cached plan, read-only, with the Plan's attribute names (lists become tuples).

    Building the real Plan dataclasses costs more than the whole sandbox set-up (the
    dataclass machinery compiles code at import), so a warm `jailer run` reads the cached
    plan.to_dict() through this view instead; the cache is only written from a Plan that
    build_plan has validated. A part is converted when it is first read: a start reads a
    fraction of the plan, and converting all of it cost 0.2-0.3 ms on the way to the
    sandbox's first process."""

    def __init__(self, data: dict):
        object.__setattr__(self, "_data", data)

    def __getattr__(self, name):   # (only for what is not converted yet)
        try:
            value = _view(self._data[name])
        except KeyError:
            raise AttributeError(f"a plan has no '{name}'") from None
        object.__setattr__(self, name, value)
        return value

    def __setattr__(self, name, value):
        raise AttributeError("a cached plan is read-only")


def _view(value):
    if isinstance(value, dict):
        return PlanView(value)
    if isinstance(value, list):
        return tuple(_view(item) for item in value)
    return value


def _prune(dirfd: int, limit: int = 256) -> None:
    """Drop entries whose profile is gone (temporary profiles would pile up), with the module
    cache beside each (jailer.zero_exec.module_cache); only on a miss, and only files named
    as _cache_file names them."""
    listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        names = sorted(os.listdir(listing))[:limit]
    finally:
        os.close(listing)
    beside_plans = {_modules_beside(name) for name in names if name.endswith(".plan")}
    for name in names:
        if name.endswith(".modules") and name[8:9] == "-" and name not in beside_plans:
            try:
                os.unlink(name, dir_fd=dirfd)
            except OSError:
                pass
        if not name.endswith(".plan") or name[8:9] != "-":
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            with open(fd, "rb") as f:
                profile = marshal.load(f)["key"][0]
        except (OSError, EOFError, ValueError, TypeError, KeyError, IndexError):
            profile = None
        if profile is None or not os.path.exists(profile):
            for stale in (name, _modules_beside(name)):
                try:
                    os.unlink(stale, dir_fd=dirfd)
                except OSError:
                    pass


def resolve(profile: str, use_cache: bool = True):
    """(plan, bpf, syscall names) for the profile, from the cache when it is valid."""
    path = os.path.abspath(profile)
    try:
        key = _cache_key(path)
    except OSError as exc:
        raise UsageError(f"{profile}: {exc.strerror}") from None
    directory = cache_dir()
    file = _cache_file(directory, path)
    entry = _read_cache(file, key) if use_cache else None
    if entry is not None:
        try:
            return PlanView(entry["plan"]), entry["bpf"], entry["names"]
        except (KeyError, TypeError, AttributeError):
            pass
    from jailer.profile import build_plan

    plan = build_plan(path, euid=os.geteuid())
    bpf = names = None
    if plan.seccomp.enabled:
        from jailer.layers import seccomp

        bpf = seccomp.compile_bpf(plan.seccomp)
        names = seccomp.syscall_names() if seccomp.needs_listener(plan.seccomp) else None
    _write_cache(directory, file, {"key": key, "plan": plan.to_dict(), "bpf": bpf, "names": names})
    return plan, bpf, names


def main(argv) -> int:
    # No garbage collection while starting: a collection in a forked child touches every
    # object and copies the whole heap; the launcher turns it back on once the program runs.
    gc.disable()
    if any(a in ("-h", "--help") for a in argv[: argv.index("--") if "--" in argv else len(argv)]):
        sys.stdout.write(USAGE)
        return 0
    carried = None
    if "JAILER_RESTART_FD" in os.environ:   # this is a restart: take what the last run handed on first
        from jailer.host.restart import Carried

        carried = Carried.from_environment()
    try:
        args = parse(argv)
        if args.log_fd is not None and args.log_fd != 2:
            os.dup2(args.log_fd, 2)   # every later message, the program's stderr included, goes there
        plan, bpf, names = resolve(args.profile, args.use_cache)
    except BaseException:
        if carried is not None:
            carried.remove()
        raise
    preloader = None
    if plan.program.start == "zero-exec":   # the sandbox's process starts importing now
        from jailer.zero_exec.preloader import Preloader

        module_cache = _modules_beside(_cache_file(cache_dir(), os.path.abspath(args.profile)))
        preloader = Preloader.fork(plan, module_cache, args.use_cache)
    try:
        code = run_plan(plan, args, bpf, names, carried, preloader)
    finally:
        if preloader is not None:
            preloader.stop()
    # Done: skip the interpreter's teardown (module and heap finalization cost more than the
    # whole sandbox set-up); everything jailer made is already removed, only stdio may hold data.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run_plan(plan, args: Arguments, bpf=None, names=None, carried=None, preloader=None) -> int:
    """Run an already resolved plan with the command line's fds, status fd and arguments;
    carried: what the run before this one handed on, when this is a restart; preloader: the
    zero-exec sandbox process's head start (jailer.zero_exec.preloader)."""
    from jailer.launch import launcher

    restart = plan.restart if args.restart and plan.restart.policy != "no" else None
    options = launcher.Options(given_fds=args.given_fds, socket_path=args.socket_path, status_fd=args.status_fd,
                               extra_args=args.extra_args, bpf=bpf, syscall_names=(lambda: names) if names else None,
                               sockets=args.sockets, files=args.files, read_only=args.read_only,
                               pidfile=None if carried else args.pidfile, hand_over=True,
                               socket_group=args.socket_group, restart=restart, carried=carried,
                               preloader=preloader)
    return launcher.run(plan, options)
