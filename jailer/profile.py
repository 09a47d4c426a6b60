"""Profiles: one TOML file describes one device's sandbox; build_plan turns it into a Plan.

Validation collects every problem before failing, because a user fixing a profile wants
the whole list at once, each line naming the file, the key path (`seccomp.rule[2].args[0].op`,
indices count from 0), what was found and what was expected. The format is documented in
man/jailer-profile.5. Importing this module is cheap: toml, pyseccomp and the runtime
resolver are imported only when a profile is actually read.
"""

from __future__ import annotations

import os
import re

from jailer import plan as P
from jailer.errors import ProfileError

SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SIZE_RLIMITS = ("as", "core", "data", "fsize", "memlock", "msgqueue", "rss", "stack")
COUNT_RLIMITS = ("cpu", "locks", "nice", "nofile", "nproc", "rtprio", "rttime", "sigpending")
FD_MODES = ("r", "w", "rw")
MAX_ID = 2**32 - 2
MAX_ARG = 2**64 - 1

_FD_PLACEHOLDER = re.compile(r"\{fd:([^}]*)\}")
_SOCKET_PLACEHOLDER = re.compile(r"\{socket:([^}]*)\}")
_ENV_PLACEHOLDER = re.compile(r"\{env:([^}]*)\}")
_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
_FD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)\Z", re.IGNORECASE)
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%\Z")

TOP_KEYS = ("name", "die_with_parent", "program", "namespaces", "identity", "filesystem", "landlock",
            "seccomp", "limits", "fds", "sockets", "network", "restart", "environment", "enforcement")
EXEC_SYSCALLS = ("execve", "execveat")
PROGRAM_KEYS = ("runtime", "argv", "executable", "cwd", "modules", "site", "ready", "ready_timeout", "start",
                "preload")
SOCKET_KEYS = ("name", "path")
NAMESPACE_KEYS = ("user", "mount", "pid", "net", "ipc", "uts", "cgroup", "hostname", "pid1")
IDENTITY_KEYS = ("uid", "gid", "unprivileged_uid", "unprivileged_gid", "host_ids", "host_id_range")
FILESYSTEM_KEYS = ("root_size", "readonly_root", "proc", "devices", "bind", "tmpfs", "symlink")
BIND_KEYS = ("source", "target", "writable", "optional")
TMPFS_KEYS = ("target", "size", "mode")
SYMLINK_KEYS = ("target", "points_to")
SECCOMP_KEYS = ("enabled", "default_action", "default_errno", "allow", "rule", "report", "steady_deny",
                "steady_action", "steady_errno", "steady_rule")
STEADY_ACTIONS = ("kill", "kill_thread", "errno")   # a steady rule only takes permissions away
RULE_KEYS = ("syscall", "action", "errno", "args")
ARG_KEYS = ("index", "op", "value", "mask")
LIMIT_KEYS = tuple(sorted(SIZE_RLIMITS + COUNT_RLIMITS)) + ("cgroup",)
RLIMIT_KEYS = ("soft", "hard")
CGROUP_KEYS = ("memory", "pids", "cpu", "parent")
CPU_KEYS = ("quota_us", "period_us")
FD_KEYS = ("name", "kind", "number", "path", "size", "mode", "required")
RESTART_KEYS = ("policy", "limit", "interval", "delay", "max_delay")
CHECKPOINT_MIN_SIZE = 4096   # two slots of a page: anything smaller cannot hold a device's state
NETWORK_KEYS = ("mode", "host_ifname", "sandbox_ifname", "host_address", "sandbox_address")
ENVIRONMENT_KEYS = ("set", "pass")
ENFORCEMENT_KEYS = ("best_effort",)


def load_profile(path):
    """The profile's TOML as a dict; a syntax error becomes a ProfileError naming line and column."""
    import toml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ProfileError([f"{path}: cannot read the profile: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ProfileError([f"{path}: cannot read the profile: not UTF-8 text ({exc.reason})"]) from None
    try:
        return toml.loads(text)
    except toml.TomlDecodeError as exc:
        raise ProfileError([f"{path}:{exc.lineno}:{exc.colno}: TOML syntax error: {_toml_message(exc.msg)}"]) from None
    except Exception as exc:  # the toml package trips over some malformed input instead of reporting it
        line = _first_failing_line(toml, text, type(exc))
        raise ProfileError([f"{path}:{line}:1: TOML syntax error: cannot parse this line (the parser failed with "
                            f"{type(exc).__name__}; check for mixed-type arrays and unbalanced quotes or brackets)"]
                           ) from None


def _first_failing_line(toml, text, error):
    """The first line whose inclusion makes the parser fail with `error` (1 if none is found)."""
    lines = text.splitlines()
    for count in range(1, len(lines) + 1):
        try:
            toml.loads("\n".join(lines[:count]))
        except error:
            return count
        except Exception:
            continue
    return 1


def _toml_message(message):
    """The toml package's message without the parser state it sometimes appends."""
    redefined = re.match(r"What\? (.+) already exists\?", message)
    if redefined:
        return f"table [{redefined.group(1)}] is defined twice"
    literal = re.match(r"invalid literal for \w+\(\) with base \d+: (.*)", message)
    if literal:
        return f"invalid value {literal.group(1)}"
    return message


def build_plan(path, *, euid=None, egid=None, environ=None):
    """Validate the profile at `path` and resolve it into the Plan for this invocation.

    Pure: reads the profile and the files the runtime needs, changes nothing. `euid`/`egid`
    default to the caller's; `environ` (default os.environ) feeds `environment.pass`.
    """
    data = load_profile(path)
    euid = os.geteuid() if euid is None else euid
    egid = (os.getegid() if euid == os.geteuid() else euid) if egid is None else egid
    reader = _Reader(str(path))
    plan = _PlanBuilder(reader, data, euid, egid, os.environ if environ is None else environ).build()
    if reader.problems:
        raise ProfileError(reader.problems)
    return plan


def parse_size(value):
    """Bytes from an int or a string like "64M" (suffix K, M, G or T, powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value.strip()) if isinstance(value, str) else None
    if not match:
        raise _Invalid('a size: an integer of bytes or a string like "64M" (suffix K, M, G or T)')
    return int(match.group(1)) * SIZE_SUFFIXES[match.group(2).upper()]


def did_you_mean(word, choices):
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Invalid(Exception):
    """A value has the wrong type or form; carries what was expected."""

    def __init__(self, expected, hint=""):
        super().__init__(expected)
        self.expected = expected
        self.hint = hint


def _describe(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, float):
        return f"the float {value}"
    if isinstance(value, int):
        return str(value)
    return type(value).__name__


def _join(prefix, key):
    return f"{prefix}.{key}" if prefix else key


# Converters: take a TOML value, return the plan value or raise _Invalid(expected).

def _boolean(value):
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _string(value):
    if not isinstance(value, str) or not value:
        raise _Invalid("a non-empty string")
    return value


def _absolute_path(value):
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise _Invalid("an absolute path")
    if ".." in value.split("/"):
        raise _Invalid("an absolute path without '..'")
    return os.path.normpath(value).replace("//", "/")


def _seconds(low, high):
    def convert(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
            raise _Invalid(f"a number of seconds above {low} and at most {high}")
        return float(value)
    return convert


def _seconds_or_zero(high):
    def convert(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
            raise _Invalid(f"a number of seconds from 0 to {high}")
        return float(value)
    return convert


def _integer(low, high=None):
    def convert(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise _Invalid(f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}")
        return value
    return convert


def _id_range(value):
    expected = f"[first id, count]: integers, first >= 1000, the range ending at most at {MAX_ID}"
    if not isinstance(value, list) or len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int)
                                                             for v in value):
        raise _Invalid(expected)
    first, count = value
    if first < 1000 or count < 1 or first + count > MAX_ID:
        raise _Invalid(expected)
    return (first, count)


def _choice(options):
    def convert(value):
        if value not in options:
            hint = did_you_mean(value, options) if isinstance(value, str) else ""
            raise _Invalid("one of " + ", ".join(options), hint)
        return value
    return convert


def _matching(pattern, expected):
    def convert(value):
        if not isinstance(value, str) or not pattern.match(value):
            raise _Invalid(expected)
        return value
    return convert


def _string_list(value):
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Invalid("an array of non-empty strings")
    return value


def _file_mode(value):
    if isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value):
        value = int(value.lstrip("0o") or "0", 8)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise _Invalid('a file mode: an integer like 0o755 or a string like "755"')
    return value


def _errno_number(value):
    import errno

    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4095:
        return value
    if isinstance(value, str) and value.startswith("E") and isinstance(getattr(errno, value, None), int):
        return getattr(errno, value)
    names = sorted(errno.errorcode.values())
    raise _Invalid('an errno name like "EPERM" or a number from 1 to 4095',
                   did_you_mean(value, names) if isinstance(value, str) else "")


def _rlimit_value(convert):
    def convert_limit(value):
        if value == "unlimited":
            return -1
        try:
            return convert(value)
        except _Invalid as exc:
            raise _Invalid(exc.expected + ' or "unlimited"') from None
    return convert_limit


class _Reader:
    """Reads typed values out of TOML tables, collecting one line per problem."""

    def __init__(self, file):
        self.file = file
        self.problems = []

    def fail(self, key, text):
        self.problems.append(f"{self.file}: {key}: {text}")

    def wrong(self, key, value, expected, hint=""):
        self.fail(key, f"found {_describe(value)}, expected {expected}{hint}")

    def table(self, value, key, keys):
        """`value` as a dict with only `keys` in it; {} (after reporting) when it is not a table."""
        if not isinstance(value, dict):
            self.wrong(key or "(top level)", value, "a table")
            return {}
        for name in value:
            if name not in keys:
                self.fail(_join(key, name), "found unknown key, expected one of " + ", ".join(keys)
                          + did_you_mean(name, keys))
        return value

    def tables(self, value, key, keys):
        """(key path, table) for each entry of an array of tables."""
        if not isinstance(value, list):
            self.wrong(key, value, "an array of tables")
            return []
        return [(f"{key}[{i}]", self.table(entry, f"{key}[{i}]", keys)) for i, entry in enumerate(value)]

    def get(self, table, prefix, name, convert, default=None):
        if name not in table:
            return default
        value = table[name]
        try:
            return convert(value)
        except _Invalid as exc:
            self.wrong(_join(prefix, name), value, exc.expected, exc.hint)
            return default

    def require(self, table, prefix, name, convert, expected):
        if name not in table:
            self.fail(_join(prefix, name), f"missing, expected {expected}")
            return None
        return self.get(table, prefix, name, convert)


class _PlanBuilder:
    def __init__(self, reader, data, euid, egid, environ):
        self.r = reader
        self.data = reader.table(data, "", TOP_KEYS)
        self.euid = euid
        self.egid = egid
        self.environ = environ

    def section(self, name, keys):
        return self.r.table(self.data.get(name, {}), name, keys)

    def build(self):
        r = self.r
        name = r.get(self.data, "", "name", _matching(_NAME, "a name of letters, digits, '.', '_' or '-'"))
        fds = self.fds()
        sockets = self.sockets({fd.name for fd in fds})
        namespaces = self.namespaces()
        program, runtime = self.program({fd.name for fd in fds}, {s.name: s.path for s in sockets})
        plan = P.Plan(
            source=r.file,
            name=name or os.path.splitext(os.path.basename(r.file))[0],
            invocation="root" if self.euid == 0 else "unprivileged",
            program=program,
            namespaces=namespaces,
            identity=self.identity(namespaces.user),
            filesystem=self.filesystem(runtime),
            landlock=P.LandlockPlan(enabled=r.get(self.section("landlock", ("enabled",)), "landlock",
                                                  "enabled", _boolean, True)),
            seccomp=self.seccomp(zero_exec=program.start == "zero-exec"),
            limits=self.limits(),
            fds=fds,
            sockets=sockets,
            network=self.network(namespaces.net),
            restart=self.restart(),
            environment=self.environment(runtime),
            die_with_parent=r.get(self.data, "", "die_with_parent", _boolean, True),
            best_effort=frozenset(self.best_effort()),
        )
        if program.start == "zero-exec":
            from jailer import zero_exec

            environment = dict(plan.environment)
            for variable in zero_exec.unsupported_environment(environment):
                r.fail(f"environment.{variable}", f"found {_describe(environment[variable])}, expected no variable "
                       "CPython reads only at start-up with program.start = \"zero-exec\" (the interpreter "
                       "already runs)")
        notify_fds = [fd.name for fd in fds if fd.kind == "notify"]
        if len(notify_fds) > 1:
            r.fail("fds", f"found {len(notify_fds)} notify fds ({', '.join(notify_fds)}), expected at most one")
        elif program.ready == "notify" and not notify_fds:
            r.fail("program.ready", 'found "notify" without a notify fd, expected an [[fds]] entry with kind = '
                   '"notify" (the program writes READY=1 to it) or ready = "exec"')
        if program.ready == "socket" and not sockets:
            r.fail("program.ready", 'found "socket" without a [[sockets]] entry, expected the socket the program '
                   'binds itself declared in [[sockets]], or ready = "exec" or "notify"')
        if sockets and not namespaces.mount:
            r.fail("sockets", "found sockets the program binds itself with namespaces.mount = false, expected "
                   "namespaces.mount = true (jailer binds a private directory at each socket's directory)")
        targets = {b.target for b in plan.filesystem.binds} | {t.target for t in plan.filesystem.tmpfs}
        for index, entry in enumerate(sockets):
            directory = os.path.dirname(entry.path)
            if directory in targets:
                r.fail(f"sockets[{index}].path", f"found {_describe(entry.path)}, expected a socket in a directory "
                       f"of its own: {directory} is already a [filesystem] target")
        if not _directory_in_sandbox(program.cwd, plan.filesystem):
            r.fail("program.cwd", f"found {_describe(program.cwd)}, expected \"/\" or a directory the sandbox "
                   "has: a tmpfs or directory bind target, a directory inside such a bind, or a parent of a target")
        return plan

    def expand_environment(self, key: str, value: str) -> str:
        """{env:NAME} becomes the caller's $NAME, so that a shipped profile can name a program
        that lives where each user put it (the plan cache keys on such variables too)."""
        for name in _ENV_PLACEHOLDER.findall(value):
            if not self.environ.get(name):
                self.r.fail(key, f"found {_describe(value)} with ${name} not set, expected ${name} to name where "
                            "the program is (e.g. " + name + "=/opt/... jailer run ...)")
                continue
            value = value.replace("{env:" + name + "}", self.environ[name])
        return value

    def sockets(self, fd_names):
        r = self.r
        sockets, names, directories = [], {}, {}
        for key, entry in r.tables(self.data.get("sockets", []), "sockets", SOCKET_KEYS):
            name = r.require(entry, key, "name", _matching(_FD_NAME, "a name of letters, digits, '_' or '-'"),
                             "a name")
            path = r.require(entry, key, "path", _absolute_path, "an absolute path")
            if name is not None:
                if name in names or name in fd_names:
                    r.fail(f"{key}.name", f"found {_describe(name)}, expected a name not already used by "
                           f"{names.get(name, 'an [[fds]] entry')}")
                names.setdefault(name, key)
            if path is not None:
                directory = os.path.dirname(path)
                if directory == "/":
                    r.fail(f"{key}.path", f"found {_describe(path)}, expected a socket in a directory of its own "
                           'like "/run/vfio-user/device.sock" (jailer binds a private directory there)')
                elif directory in directories:
                    r.fail(f"{key}.path", f"found {_describe(path)}, expected a directory not already used by "
                           f"{directories[directory]}")
                directories.setdefault(directory, key)
            if name is not None and path is not None:
                sockets.append(P.ProgramSocket(name=name, path=path))
        return tuple(sockets)

    def program(self, fd_names, socket_paths=None):
        r = self.r
        problems_before = len(r.problems)
        section = self.section("program", PROGRAM_KEYS)
        if "program" not in self.data:
            r.fail("program", "missing, expected a [program] table with at least argv")
            return P.ProgramPlan(argv=("",), executable="/"), None
        runtime_name = r.get(section, "program", "runtime", _choice(P.RUNTIMES), "native")
        argv = list(r.require(section, "program", "argv", _string_list, "an array of strings") or [])
        if "argv" in section and section["argv"] == []:
            r.wrong("program.argv", [], "at least one element" + (" (the interpreter's arguments, e.g. "
                                                                 '["-m", "module"])' if runtime_name == "python"
                                                                 else " (the program)"))
        socket_paths = socket_paths or {}
        for index, arg in enumerate(argv):
            arg = argv[index] = self.expand_environment(f"program.argv[{index}]", arg)
            for socket_name in _SOCKET_PLACEHOLDER.findall(arg):
                if socket_name not in socket_paths:
                    r.fail(f"program.argv[{index}]",
                           f"found unknown socket '{socket_name}' in {_describe(arg)}, expected one of the "
                           "[[sockets]] names: " + (", ".join(sorted(socket_paths)) or "(none declared)")
                           + did_you_mean(socket_name, socket_paths))
                    continue
                arg = argv[index] = arg.replace("{socket:" + socket_name + "}", socket_paths[socket_name])
            for fd in _FD_PLACEHOLDER.findall(arg):
                if fd not in fd_names:
                    r.fail(f"program.argv[{index}]",
                           f"found unknown fd '{fd}' in {_describe(arg)}, expected one of the [[fds]] names: "
                           + (", ".join(sorted(fd_names)) or "(none declared)") + did_you_mean(fd, fd_names))
        cwd = r.get(section, "program", "cwd", _absolute_path, "/")
        python_only = {"modules": _string_list, "site": _boolean}
        if runtime_name != "python":
            for key in python_only:
                if key in section:
                    r.fail(f"program.{key}", f'found {_describe(section[key])}, expected no {key} '
                           f'(only used with runtime = "python")')
        modules = r.get(section, "program", "modules", _string_list, [])
        for index, module in enumerate(modules):
            if not _MODULE.match(module):
                r.wrong(f"program.modules[{index}]", module, "a module name like \"devices\" or \"pkg.sub\"")
        if isinstance(section.get("executable"), str):
            section = dict(section, executable=self.expand_environment("program.executable", section["executable"]))
        executable = r.get(section, "program", "executable", _absolute_path)
        if runtime_name == "python" and "executable" in section:
            r.fail("program.executable", f"found {_describe(section['executable'])}, expected no executable "
                   "(the python runtime runs the interpreter jailer runs on; argv are its arguments)")
        if not argv or len(r.problems) > problems_before:
            return P.ProgramPlan(argv=tuple(argv) or ("",), executable=executable or "/", cwd=cwd), None
        from jailer import runtime

        try:
            if runtime_name == "python":
                resolved = runtime.python_runtime(argv, modules, r.get(section, "program", "site", _boolean, False),
                                                  r.fail)
            else:
                resolved = runtime.native_runtime(argv, executable, r.fail)
        except OSError as exc:
            r.fail("program.runtime", f"found {runtime_name!r}, whose files cannot be resolved: {exc}")
            resolved = None
        if resolved is None:
            return P.ProgramPlan(argv=tuple(argv), executable=executable or "/", cwd=cwd), None
        ready = r.get(section, "program", "ready", _choice(P.READY_MODES), "exec")
        if "ready_timeout" in section and ready != "socket":
            r.fail("program.ready_timeout", f"found {_describe(section['ready_timeout'])}, expected no "
                   'ready_timeout (only used with ready = "socket")')
        start = r.get(section, "program", "start", _choice(P.START_MODES), "exec")
        if start == "zero-exec":
            from jailer import zero_exec

            for key, found, expected in zero_exec.unsupported(runtime_name, argv):
                r.fail(key, f"found {found}, expected {expected}")
        preload = r.get(section, "program", "preload", _string_list, [])
        if preload and start != "zero-exec":
            r.fail("program.preload", f"found {_describe(preload)} with start = {_describe(start)}, expected no "
                   'preload (it imports into the sandbox\'s process before it runs the program: start = "zero-exec")')
        for index, module in enumerate(preload if start == "zero-exec" else ()):
            if not _MODULE.match(module):
                r.wrong(f"program.preload[{index}]", module, 'a module name like "json" or "importlib.util"')
            elif reason := zero_exec.not_preloadable(module):
                r.wrong(f"program.preload[{index}]", module, reason)
        return P.ProgramPlan(argv=resolved.argv, executable=resolved.executable, runtime=runtime_name,
                             cwd=cwd, ready=ready, start=start, preload=tuple(preload),
                             ready_timeout=r.get(section, "program", "ready_timeout", _seconds(0, 3600), 10.0)), \
            resolved

    def namespaces(self):
        r = self.r
        section = self.section("namespaces", NAMESPACE_KEYS)
        flags = {key: r.get(section, "namespaces", key, _boolean, True) for key in NAMESPACE_KEYS[:7]}
        hostname = r.get(section, "namespaces", "hostname",
                         _matching(re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}\Z"),
                                   "a host name of up to 64 letters, digits, '.' or '-'"), "jailer")
        pid1 = r.get(section, "namespaces", "pid1", _choice(P.PID1_MODES), "reaper")
        if "hostname" in section and not flags["uts"]:
            r.fail("namespaces.hostname", "found a hostname with uts = false, expected uts = true "
                   "(the host name can only be set in a new UTS namespace)")
        if "pid1" in section and not flags["pid"]:
            r.fail("namespaces.pid1", "found pid1 with pid = false, expected pid = true "
                   "(pid 1 only exists in a new pid namespace)")
        return P.NamespacesPlan(**flags, hostname=hostname, pid1=pid1)

    def identity(self, user_namespace):
        r = self.r
        section = self.section("identity", IDENTITY_KEYS)
        ids = _integer(0, MAX_ID)
        uid = r.get(section, "identity", "uid", ids, 65534)
        gid = r.get(section, "identity", "gid", ids, 65534)
        inside_uid = r.get(section, "identity", "unprivileged_uid", ids, uid)
        inside_gid = r.get(section, "identity", "unprivileged_gid", ids, gid)
        host_ids = r.get(section, "identity", "host_ids", _choice(P.HOST_ID_MODES), "per-device")
        host_id_range = r.get(section, "identity", "host_id_range", _id_range, P.IdentityPlan.host_id_range)
        own = dict(host_ids=host_ids, host_id_range=host_id_range)   # (applied only as root)
        if self.euid == 0:
            if not user_namespace:
                return P.IdentityPlan(uid=uid, gid=gid, **own)
            return P.IdentityPlan(uid=uid, gid=gid, uid_map=(P.IdMap(uid, uid),), gid_map=(P.IdMap(gid, gid),), **own)
        if not user_namespace:
            return P.IdentityPlan(uid=self.euid, gid=self.egid, **own)
        return P.IdentityPlan(uid=inside_uid, gid=inside_gid, uid_map=(P.IdMap(inside_uid, self.euid),),
                              gid_map=(P.IdMap(inside_gid, self.egid),), **own)

    def filesystem(self, runtime):
        r = self.r
        section = self.section("filesystem", FILESYSTEM_KEYS)
        targets = {}

        def claim(key, target):
            if target in targets:
                r.fail(key, f"found {_describe(target)}, expected a target not already used by {targets[target]}")
            targets[target] = key

        binds = []
        for key, entry in r.tables(section.get("bind", []), "filesystem.bind", BIND_KEYS):
            source = r.require(entry, key, "source", _absolute_path, "an absolute path")
            target = r.get(entry, key, "target", _absolute_path, source)
            optional = r.get(entry, key, "optional", _boolean, False)
            if source is None:
                continue
            if not optional and not os.path.lexists(source):
                r.fail(f"{key}.source", f"found {_describe(source)}, which does not exist, expected an existing "
                       "path (or optional = true)")
            claim(f"{key}.target", target)
            binds.append(P.Bind(source=source, target=target, writable=r.get(entry, key, "writable", _boolean, False),
                                optional=optional))
        tmpfs = []
        for key, entry in r.tables(section.get("tmpfs", []), "filesystem.tmpfs", TMPFS_KEYS):
            target = r.require(entry, key, "target", _absolute_path, "an absolute path")
            if target is not None:
                claim(f"{key}.target", target)
                tmpfs.append(P.Tmpfs(target=target, size=r.get(entry, key, "size", parse_size, 16 << 20),
                                     mode=r.get(entry, key, "mode", _file_mode, 0o755)))
        symlinks = []
        for key, entry in r.tables(section.get("symlink", []), "filesystem.symlink", SYMLINK_KEYS):
            target = r.require(entry, key, "target", _absolute_path, "an absolute path")
            points_to = r.require(entry, key, "points_to", _string, "the link contents (a path)")
            if target is not None and points_to is not None:
                claim(f"{key}.target", target)
                symlinks.append(P.Symlink(target=target, points_to=points_to))
        devices = r.get(section, "filesystem", "devices", _string_list, [])
        for index, device in enumerate(devices):
            key = f"filesystem.devices[{index}]"
            if not device.startswith("/dev/") or ".." in device.split("/"):
                r.wrong(key, device, 'a device node under /dev, like "/dev/null"')
            elif not _is_device_node(device):
                r.fail(key, f"found {_describe(device)}, which is not a device node on this host, expected an "
                       "existing character or block device")
            else:
                claim(key, device)
        if runtime is not None:
            binds, symlinks = self.merge_runtime(runtime, binds, symlinks, targets)
        return P.FilesystemPlan(
            root_size=r.get(section, "filesystem", "root_size", parse_size, P.FilesystemPlan.root_size),
            binds=tuple(binds), tmpfs=tuple(tmpfs), symlinks=tuple(symlinks), devices=tuple(devices),
            proc=r.get(section, "filesystem", "proc", _boolean, True),
            readonly_root=r.get(section, "filesystem", "readonly_root", _boolean, True))

    def merge_runtime(self, runtime, binds, symlinks, targets):
        """Runtime entries first, then the profile's. The launcher mounts parents before children, so a
        runtime path inside a profile tmpfs is mounted on top of it, and one inside an identity bind (same
        source and target) is already visible through it; inside another bind or a symlink it cannot be."""
        from jailer.runtime import covered

        identity = [b.target for b in binds if b.source == b.target]
        hiding = [target for target, key in targets.items()
                  if target not in identity and key.startswith(("filesystem.bind", "filesystem.symlink"))]
        for target in hiding:
            hidden = [e.target for e in (*runtime.binds, *runtime.symlinks) if covered(e.target, [target])]
            if hidden:
                self.r.fail(targets[target], f"found {_describe(target)}, expected a target that does not hide "
                            f"the runtime's {hidden[0]}")
        return ([b for b in runtime.binds if not covered(b.target, identity)] + binds,
                [s for s in runtime.symlinks if not covered(s.target, identity)] + symlinks)

    def seccomp(self, zero_exec: bool = False):
        """With zero_exec nothing is ever exec'd: execve and execveat are refused from the first
        instruction of the program, whatever the profile allows."""
        r = self.r
        section = self.section("seccomp", SECCOMP_KEYS)
        default_action, default_errno = self.action_and_errno(section, "seccomp", "default_action", "default_errno",
                                                              P.SECCOMP_ACTIONS, "kill", "ENOSYS")
        table = _SyscallTable()
        rules = self.seccomp_rules(section, "rule", P.SECCOMP_ACTIONS, "allow", table)
        ruled = {rule.syscall for rule in rules}
        allowed = []
        problems_before = len(r.problems)
        for key, name, names in self.syscall_list(section, "allow", table):
            if name.startswith("@"):
                # A syscall that has its own rules is governed by them, not by the group.
                allowed += [s for s in names if s not in ruled]
            else:
                if name in ruled:
                    r.fail(key, f"found {_describe(name)}, expected it either in seccomp.allow or in "
                           "[[seccomp.rule]], not both (an unconditional allow would void the rule)")
                allowed.append(name)
        allowed = list(dict.fromkeys(allowed))
        enabled = r.get(section, "seccomp", "enabled", _boolean, True)
        if zero_exec:
            refusal = (default_action, default_errno) if default_action not in ("allow", "log") else ("errno", 1)
            allowed = [s for s in allowed if s not in EXEC_SYSCALLS]
            rules = [rule for rule in rules if rule.syscall not in EXEC_SYSCALLS] + [
                P.SeccompRule(syscall=s, action=refusal[0], errno=refusal[1] if refusal[0] == "errno" else None)
                for s in EXEC_SYSCALLS]
        elif enabled and len(r.problems) == problems_before and default_action not in ("allow", "log") \
                and "execve" not in allowed and not any(
                rule.syscall == "execve" and rule.action in ("allow", "log") for rule in rules):
            r.fail("seccomp.allow", 'found no rule allowing execve, expected "execve" or "@default" (the program '
                   "is started by execve after the filter is installed)")
        steady = self.steady_rules(section, table)
        if zero_exec:   # (refused already, in the kernel)
            steady = tuple(rule for rule in steady if rule.syscall not in EXEC_SYSCALLS)
        if steady and not enabled:
            r.fail("seccomp.steady_deny" if "steady_deny" in section else "seccomp.steady_rule",
                   "found steady rules with enabled = false, expected seccomp enabled (steady rules are "
                   "part of the filter)")
        native_only = {rule.syscall for rule in rules if rule.action in ("trap", "log")}
        if default_action in ("trap", "log"):
            native_only |= {rule.syscall for rule in steady} - {s for s in allowed} - ruled
        for name in sorted(native_only & {rule.syscall for rule in steady}):
            r.fail("seccomp.steady_deny", f"found steady rules for {_describe(name)}, whose plain action is trap "
                   "or log, expected no steady rule for it (a syscall with steady rules is decided by the "
                   "launcher, which can neither raise the trap's SIGSYS nor log it for the kernel)")
        return P.SeccompPlan(enabled=enabled, default_action=default_action, default_errno=default_errno,
                             rules=tuple(P.SeccompRule(syscall=s) for s in allowed) + tuple(rules),
                             report=r.get(section, "seccomp", "report", _boolean, True), steady=steady)

    def action_and_errno(self, table, prefix, action_key, errno_key, actions, default_action, default_errno):
        """An action and its errno (only with "errno", where it defaults to default_errno)."""
        r = self.r
        action = r.get(table, prefix, action_key, _choice(actions), default_action)
        err = r.get(table, prefix, errno_key, _errno_number)
        if action == "errno" and err is None:
            err = _errno_number(default_errno)
        elif action != "errno" and errno_key in table:
            r.fail(_join(prefix, errno_key), f'found {_describe(table[errno_key])}, expected no {errno_key} '
                   f'(only used with {action_key} = "errno")')
        return action, err

    def syscall_list(self, section, list_key, table):
        """(key, entry, syscalls) for each valid entry of a list of syscall names and @groups."""
        r = self.r
        entries = []
        for index, name in enumerate(r.get(section, "seccomp", list_key, _string_list, [])):
            key = f"seccomp.{list_key}[{index}]"
            if name.startswith("@"):
                from jailer import syscall_groups

                if name not in syscall_groups.GROUPS:
                    r.wrong(key, name, "a syscall group: one of " + ", ".join(syscall_groups.GROUPS),
                            did_you_mean(name, syscall_groups.GROUPS))
                    continue
                entries.append((key, name, [s for s in syscall_groups.expand(name) if table.exists(s)]))
            elif table.check(r, key, name):
                entries.append((key, name, [name]))
        return entries

    def seccomp_rules(self, section, name, actions, default_action, table):
        """[[seccomp.rule]] or [[seccomp.steady_rule]] entries as SeccompRules."""
        r = self.r
        rules = []
        for key, entry in r.tables(section.get(name, []), f"seccomp.{name}", RULE_KEYS):
            syscall = r.require(entry, key, "syscall", _string, "a syscall name")
            action, err = self.action_and_errno(entry, key, "action", "errno", actions, default_action, "EPERM")
            args = [self.arg_condition(arg_key, arg) for arg_key, arg in r.tables(entry.get("args", []),
                                                                                   f"{key}.args", ARG_KEYS)]
            if syscall is not None and table.check(r, f"{key}.syscall", syscall):
                rules.append(P.SeccompRule(syscall=syscall, action=action, errno=err,
                                           args=tuple(a for a in args if a is not None)))
        return rules

    def steady_rules(self, section, table):
        """steady_deny (names and @groups, all with steady_action) and [[seccomp.steady_rule]]."""
        action, err = self.action_and_errno(section, "seccomp", "steady_action", "steady_errno", STEADY_ACTIONS,
                                            "kill", "EPERM")
        denied = [s for _, _, names in self.syscall_list(section, "steady_deny", table) for s in names]
        rules = self.seccomp_rules(section, "steady_rule", STEADY_ACTIONS, "kill", table)
        return tuple(P.SeccompRule(syscall=s, action=action, errno=err) for s in dict.fromkeys(denied)) + \
            tuple(rules)

    def arg_condition(self, key, entry):
        r = self.r
        index = r.require(entry, key, "index", _integer(0, 5), "an integer from 0 to 5")
        op = r.require(entry, key, "op", _choice(P.ARG_OPS), "one of " + ", ".join(P.ARG_OPS))
        value = r.require(entry, key, "value", _integer(0, MAX_ARG), f"an integer from 0 to {MAX_ARG}")
        mask = r.get(entry, key, "mask", _integer(0, MAX_ARG))
        if op == "masked_eq" and "mask" not in entry:
            r.fail(f"{key}.mask", f'missing, expected an integer from 0 to {MAX_ARG} (op "masked_eq" needs a mask)')
        elif op not in (None, "masked_eq") and "mask" in entry:
            r.fail(f"{key}.mask", f'found {_describe(entry["mask"])}, expected no mask (only used with op = '
                   '"masked_eq")')
        if None in (index, op, value):
            return None
        return P.ArgCondition(index=index, op=op, value=value, mask=mask)

    def limits(self):
        r = self.r
        section = self.section("limits", LIMIT_KEYS)
        rlimits = []
        for name in LIMIT_KEYS[:-1]:
            if name not in section:
                continue
            key = f"limits.{name}"
            convert = _rlimit_value(parse_size if name in SIZE_RLIMITS else _integer(0))
            value = section[name]
            if isinstance(value, dict):
                entry = r.table(value, key, RLIMIT_KEYS)
                soft = r.require(entry, key, "soft", convert, "a limit")
                hard = r.get(entry, key, "hard", convert, soft)
            else:
                soft = hard = r.get(section, "limits", name, convert)
            if soft is None or hard is None:
                continue
            if hard != -1 and (soft == -1 or soft > hard):
                r.fail(key, f"found soft limit {soft} above hard limit {hard}, expected soft <= hard")
            rlimits.append(P.Rlimit(name=name, soft=soft, hard=hard))
        cgroup = None
        if "cgroup" in section:
            entry = r.table(section["cgroup"], "limits.cgroup", CGROUP_KEYS)
            period = P.CgroupPlan.cpu_period_us
            if isinstance(entry.get("cpu"), dict):
                cpu = r.table(entry["cpu"], "limits.cgroup.cpu", CPU_KEYS)
                period = r.get(cpu, "limits.cgroup.cpu", "period_us", _integer(1000, 1000000), period)
                quota = r.require(cpu, "limits.cgroup.cpu", "quota_us", _integer(1000), "an integer >= 1000")
            else:
                quota = r.get(entry, "limits.cgroup", "cpu", _cpu_quota(period))
            cgroup = P.CgroupPlan(
                memory_max=r.get(entry, "limits.cgroup", "memory", parse_size),
                pids_max=r.get(entry, "limits.cgroup", "pids", _integer(1)),
                cpu_quota_us=quota,
                cpu_period_us=period,
                parent=r.get(entry, "limits.cgroup", "parent", _matching(
                    re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z"),
                    'a relative cgroup path like "jailer" or "machine/devices"'), "jailer"))
            if cgroup.parent and any(part in (".", "..") for part in cgroup.parent.split("/")):
                r.wrong("limits.cgroup.parent", cgroup.parent, "a relative cgroup path without '.' or '..'")
        return P.LimitsPlan(rlimits=tuple(rlimits), cgroup=cgroup)

    def fds(self):
        r = self.r
        fds = []
        names, numbers = {}, {}
        for key, entry in r.tables(self.data.get("fds", []), "fds", FD_KEYS):
            name = r.require(entry, key, "name", _matching(_FD_NAME, "a name of letters, digits, '_' or '-'"),
                             "a name")
            kind = r.require(entry, key, "kind", _choice(P.FD_KINDS), "one of " + ", ".join(P.FD_KINDS))
            number = r.require(entry, key, "number", _integer(3, 1023), "an integer from 3 to 1023")
            if name is not None:
                if name in names:
                    r.fail(f"{key}.name", f"found {_describe(name)}, expected a name not already used by {names[name]}")
                names.setdefault(name, key)
            if number is not None:
                if number in numbers:
                    r.fail(f"{key}.number", f"found {number}, expected a number not already used by {numbers[number]}")
                numbers.setdefault(number, key)
            allowed = {"path": ("unix-listener", "file"), "size": ("memfd", "checkpoint"), "mode": ("file",)}
            for field, kinds in allowed.items():
                if field in entry and kind is not None and kind not in kinds:
                    r.fail(f"{key}.{field}", f"found {_describe(entry[field])}, expected no {field} for kind "
                           f"'{kind}' (only for " + " and ".join(kinds) + ")")
            spec = dict(path=r.get(entry, key, "path", _absolute_path), size=r.get(entry, key, "size", parse_size),
                        mode=r.get(entry, key, "mode", _choice(FD_MODES), "r"),
                        required=r.get(entry, key, "required", _boolean, True))
            if kind == "checkpoint":
                if spec["size"] is None:
                    r.fail(f"{key}.size", 'missing, expected the size of the checkpoint memfd, e.g. "64K"')
                elif spec["size"] < CHECKPOINT_MIN_SIZE:
                    r.wrong(f"{key}.size", entry["size"], f"at least {CHECKPOINT_MIN_SIZE} bytes")
            if None not in (name, kind, number):
                fds.append(P.FdSpec(name=name, kind=kind, number=number, **spec))
        if sum(1 for fd in fds if fd.kind == "checkpoint") > 1:
            r.fail("fds", "found more than one checkpoint fd, expected at most one")
        return tuple(fds)

    def restart(self):
        r = self.r
        section = self.section("restart", RESTART_KEYS)
        plan = P.RestartPlan(
            policy=r.get(section, "restart", "policy", _choice(P.RESTART_POLICIES), "no"),
            limit=r.get(section, "restart", "limit", _integer(1, 1000), 5),
            interval=r.get(section, "restart", "interval", _seconds(0, 86400), 60.0),
            delay=r.get(section, "restart", "delay", _seconds_or_zero(3600), 0.1),
            max_delay=r.get(section, "restart", "max_delay", _seconds_or_zero(3600), 5.0))
        if plan.max_delay < plan.delay:
            r.fail("restart.max_delay", f"found {plan.max_delay:g}, expected at least restart.delay ({plan.delay:g})")
        if section and plan.policy == "no" and set(section) - {"policy"}:
            r.fail("restart.policy", 'missing or "no" while restart limits are set, expected "on-failure" or '
                   '"always" (or no [restart] limits)')
        return plan

    def network(self, net_namespace):
        r = self.r
        section = self.section("network", NETWORK_KEYS)
        mode = r.get(section, "network", "mode", _choice(P.NETWORK_MODES), "none")
        if mode != "none" and not net_namespace:
            r.fail("network.mode", f"found {_describe(mode)} with namespaces.net = false, expected "
                   "namespaces.net = true (the sandbox network is set up in a new net namespace)")
        ifname = _matching(re.compile(r"[A-Za-z0-9_.-]{1,15}\Z"), "an interface name of 1 to 15 letters, digits, "
                           "'_', '.' or '-'")
        veth_keys = {"host_ifname": ifname, "sandbox_ifname": ifname, "host_address": _cidr,
                     "sandbox_address": _cidr}
        values = {}
        for key, convert in veth_keys.items():
            if key in section and mode != "veth":
                r.fail(f"network.{key}", f'found {_describe(section[key])}, expected no {key} (only used with '
                       'mode = "veth")')
            values[key] = r.get(section, "network", key, convert)
        if values["host_address"] and values["sandbox_address"] and \
                values["host_address"].network != values["sandbox_address"].network:
            r.fail("network.sandbox_address", f"found {values['sandbox_address']}, expected an address in the "
                   f"host side's network {values['host_address'].network}")
        return P.NetworkPlan(mode=mode, host_ifname=values["host_ifname"],
                             sandbox_ifname=values["sandbox_ifname"] or "eth0",
                             host_address=values["host_address"] and str(values["host_address"]),
                             sandbox_address=values["sandbox_address"] and str(values["sandbox_address"]))

    def environment(self, runtime):
        r = self.r
        section = self.section("environment", ENVIRONMENT_KEYS)
        variables = dict(runtime.environment) if runtime is not None else {}
        explicit = section.get("set", {})
        if not isinstance(explicit, dict):
            r.wrong("environment.set", explicit, 'a table of names to strings, like { TERM = "dumb" }')
            explicit = {}
        for name, value in explicit.items():
            if not _ENV_NAME.match(name):
                r.wrong("environment.set", name, "variable names of letters, digits and '_'")
            elif not isinstance(value, str):
                r.wrong(f"environment.set.{name}", value, "a string")
            else:
                variables[name] = value
        for index, name in enumerate(r.get(section, "environment", "pass", _string_list, [])):
            if not _ENV_NAME.match(name):
                r.wrong(f"environment.pass[{index}]", name, "a variable name of letters, digits and '_'")
            elif name in explicit:
                r.fail(f"environment.pass[{index}]", f"found {_describe(name)}, expected a variable not also "
                       "given a value in environment.set")
            elif name in self.environ:
                variables[name] = self.environ[name]
        return tuple(sorted(variables.items()))

    def best_effort(self):
        r = self.r
        section = self.section("enforcement", ENFORCEMENT_KEYS)
        layers = []
        for index, layer in enumerate(r.get(section, "enforcement", "best_effort", _string_list, [])):
            if layer not in P.LAYERS:
                r.wrong(f"enforcement.best_effort[{index}]", layer, "a layer name: one of " + ", ".join(P.LAYERS),
                        did_you_mean(layer, P.LAYERS))
            else:
                layers.append(layer)
        return layers


def _is_device_node(path):
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def _directory_in_sandbox(path, fs):
    """Whether `path` will be a directory of the new root when the program starts."""
    if path == "/":
        return True
    targets = [b.target for b in fs.binds] + [t.target for t in fs.tmpfs] + [s.target for s in fs.symlinks] + \
        list(fs.devices)
    if any(target.startswith(path.rstrip("/") + "/") for target in targets):
        return True  # created as a parent
    if any(path == t.target for t in fs.tmpfs):
        return True
    for bind in fs.binds:
        if path == bind.target or path.startswith(bind.target.rstrip("/") + "/"):
            return os.path.isdir(bind.source + path[len(bind.target):])
    return False


def _cidr(value):
    import ipaddress

    try:
        if not isinstance(value, str) or "/" not in value:
            raise ValueError(value)
        return ipaddress.ip_interface(value)
    except ValueError:
        raise _Invalid('an address with prefix length, like "10.200.0.1/30"') from None


def _cpu_quota(period):
    def convert(value):
        match = _PERCENT.match(value) if isinstance(value, str) else None
        if match and float(match.group(1)) > 0:
            return max(1000, round(float(match.group(1)) * period / 100))
        raise _Invalid('a share of one CPU like "50%" (above 100% for several CPUs) or a table like '
                       '{ quota_us = 50000, period_us = 100000 }')
    return convert


class _SyscallTable:
    """Syscall names of the running kernel's architecture, resolved through libseccomp on first use."""

    def __init__(self):
        self._known = {}
        self._all = None

    def exists(self, name):
        if name not in self._known:
            import pyseccomp

            self._known[name] = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) >= 0
        return self._known[name]

    def check(self, reader, key, name):
        if self.exists(name):
            return True
        reader.wrong(key, name, "a syscall name of this architecture", did_you_mean(name, self.all_names()))
        return False

    def all_names(self):
        if self._all is None:
            import pyseccomp

            names = []
            for number in range(1024):
                try:
                    names.append(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, number).decode())
                except ValueError:
                    continue
            self._all = names
        return self._all
