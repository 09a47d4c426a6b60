"""Zero-exec start: the sandbox's own process runs a Python program in the launcher's
interpreter, where the exec path would execve a second interpreter.

The launcher is a running CPython with the standard library it shares with the program
already imported; a fresh interpreter costs its start-up and its own memory again. Nothing
is exec'd, so the filter refuses execve and execveat from the program's first instruction
(jailer.profile). Every layer up to seccomp is applied exactly as for the exec path, and
the launcher sees the same protocol (ready, the filter's listener, the exec pipe closing).

What an execve would have reset, and what this does instead, in this order:

- the process's name and /proc entries: comm becomes the interpreter's name;
  /proc/self/cmdline and environ show the program's argv and environment, whole, from a
  fresh mapping the kernel is pointed at (PR_SET_MM_MAP, which needs no capability), and
  the launcher's argv and environment are zeroed where they were; dumpable is set again, as
  an exec by a process that changed its ids does (ptrace and /proc/self stay the program's);
- before the filter: nothing more; the program's fds are in place, every other one closed
  (jailer.layers.fds.install), as for the exec path;
- after the filter, the launcher's state: the local variables of every frame below the
  program's (the plan, the profile, the launcher's objects and caches) are cleared, jailer's
  own modules and every module outside the standard library leave sys.modules, import
  hooks and caches are reset, atexit handlers dropped, the garbage collector re-enabled
  with its default thresholds and run, and what survives (the standard library's modules)
  frozen, so that the program's collections do not walk the bigger heap. The preloader
  (jailer.zero_exec.preloader) froze what existed once it had imported the standard
  library, so this collection walks only what came after; what it froze of the launcher
  and is unreachable once the frames are cleared (the functions and dicts of the few jailer
  modules imported before the preloader was made, and the C library functions
  jailer.layers.syscalls loaded) is never collected. A program that unfreezes can list
  those, but no other object of a jailer type and no string of the launcher's (the
  profile's path, its environment) is among them (tests/test_zero_exec.py counts both);
- the signal dispositions: every handled signal back to SIG_DFL (ignored ones stay
  ignored, as across execve), then what CPython's start-up sets (SIGPIPE and SIGXFSZ
  ignored, SIGINT raising KeyboardInterrupt); no wake-up fd;
- the interpreter's view: sys.argv, sys.orig_argv, sys.path (the exec path's: the program's
  directory, $PYTHONPATH, the standard library; site-packages through site.main() when the
  profile asks for site), os.environ (and the C environment) replaced by the program's,
  sys.dont_write_bytecode from $PYTHONDONTWRITEBYTECODE, a fresh __main__, default hooks,
  recursion limit and switch interval;
- the launcher's descriptors: the exec pipe first (closing it tells the launcher the program
  started, so it hands over to jailer-monitor while this resets), then, once the launcher
  holds the filter's listener (its "go", awaited after the reset rather than before it, as
  the exec path must), this process's copy of the listener and its end of the set-up socket;
- the exit: as CPython's (SystemExit codes and messages, a traceback and status 1, death by
  SIGINT after an unhandled KeyboardInterrupt), after non-daemon threads and atexit handlers.

What stays the launcher's: the address-space layout (no new ASLR draw), sys.flags (the
launcher's interpreter options), the hash seed, the standard streams' encoding and
buffering, and freed memory that is not scrubbed (unreachable from Python, readable as raw
memory by the program itself, as everything in its own address space is).
"""

from __future__ import annotations

import os
import sys

SUPPORTED_PYTHONS = ((3, 11), (3, 12))   # PyFrame_LocalsToFast clears a caller's locals (gone in 3.13)
FRESH_ENVIRONMENT_ONLY = ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")   # the PYTHON* variables honoured


def unsupported(runtime: str, argv) -> list[tuple[str, str, str]]:
    """(key, what was found, what was expected) for each reason a profile cannot start zero-exec."""
    problems = []
    if runtime != "python":
        problems.append(("program.start", f'"zero-exec" with runtime = "{runtime}"',
                         '"exec" (zero-exec runs a Python program in the launcher\'s interpreter: runtime = "python")'))
    elif sys.implementation.name != "cpython" or sys.version_info[:2] not in SUPPORTED_PYTHONS:
        problems.append(("program.start", f'"zero-exec" on {sys.implementation.name} {sys.version.split()[0]}',
                         '"exec" (zero-exec needs CPython ' + " or ".join(f"{a}.{b}" for a, b in SUPPORTED_PYTHONS)
                         + ")"))
    elif not (len(argv) >= 2 and argv[0] == "-m" and argv[1]) and not (argv and argv[0].startswith("/")):
        problems.append(("program.argv", repr(list(argv)[:2]),
                         '["-m", "module", ...] or ["/path/to/script.py", ...] with program.start = "zero-exec" '
                         "(interpreter options cannot apply to a running interpreter)"))
    return problems


# Standard-library modules whose import does more than define things: they print, open a
# browser or a window, or start a program.
_IMPORT_SIDE_EFFECTS = ("this", "antigravity", "idlelib", "turtledemo", "__hello__", "__phello__", "__main__")


def not_preloadable(module: str) -> str | None:
    """Why program.preload may not name `module` (what was expected), or None when it may."""
    top, *rest = module.split(".")
    if "__main__" in rest:    # a package's __main__ runs it on import (venv.__main__ would create a venv)
        return ("a module that is not a package's __main__ (importing one runs the package's program, "
                "before the sandbox exists, with the launcher's rights)")
    if top not in sys.stdlib_module_names or top in _IMPORT_SIDE_EFFECTS:
        return ("a module of the standard library whose import only defines things (preloading runs before "
                "the sandbox exists, with the launcher's rights, so it imports only what jailer trusts as its own "
                "code: the program imports everything else itself, inside the sandbox)")
    stdlib = standard_library()[1]
    if rest and os.path.isdir(stdlib):   # a submodule: a file of a standard-library package, found without importing
        path = os.path.join(stdlib, top, *rest)
        if not (os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))):
            return (f"a module of the standard library ({os.path.join(stdlib, top, *rest[:-1])} has no "
                    f"{rest[-1]}.py and no package {rest[-1]})")
    return None


def unsupported_environment(environment) -> list[str]:
    """The PYTHON* variables a running interpreter cannot honour (read at start-up only)."""
    return sorted(name for name in environment if name.startswith("PYTHON") and name not in FRESH_ENVIRONMENT_ONLY)


# The memory layout fields of /proc/PID/stat (proc(5) numbers them from 1; the text after
# the command's closing parenthesis starts with field 3), as struct prctl_mm_map names them.
_LAYOUT_FIELDS = {"start_code": 26, "end_code": 27, "start_stack": 28, "start_data": 45, "end_data": 46,
                  "start_brk": 47, "arg_start": 48, "arg_end": 49, "env_start": 50, "env_end": 51}


def process_layout() -> dict[str, int]:
    """This process's memory layout as the kernel records it, /proc/self/cmdline's and
    environ's blocks among it. Read before pivot_root (the new root may have no /proc)."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return {name: int(fields[number - 3]) for name, number in _LAYOUT_FIELDS.items()}


class Start:
    """The program's start in this process: its argv (as exec'd: interpreter, options, then
    "-m module" or a script, then its arguments) and environment."""

    def __init__(self, argv, environment: dict, layout: dict):
        self.interpreter = argv[0]
        options = list(argv[1:])
        self.site = True
        while options and options[0] == "-S":
            self.site = False
            options.pop(0)
        if options[0] == "-m":
            self.module, self.script, self.args = options[1], None, options[2:]
        else:
            self.module, self.script, self.args = None, options[0], options[1:]
        self.argv = list(argv)
        self.environment = dict(environment)
        self.layout = layout

    def take_over_process(self) -> None:
        """Before the filter: comm, /proc/self/cmdline and environ, dumpable, as after execve."""
        from jailer.layers import syscalls

        syscalls.set_process_name(os.fsencode(os.path.basename(self.interpreter)))
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 1)
        _show_in_proc(self.layout, [os.fsencode(arg) for arg in self.argv],
                      [os.fsencode(f"{key}={value}") for key, value in self.environment.items()])

    def run(self, exec_pipe: int, sock_fd: int, listener: int | None) -> None:
        """Become the program (never returns). listener: the filter's, when the launcher takes
        it (this process then waits for its "go" on sock_fd before closing it)."""
        _become(self.module, self.script, self.args, self.argv, self.environment, self.site, exec_pipe, sock_fd,
                listener)


def _show_in_proc(layout: dict, argv, environment) -> None:
    """Zero the launcher's argv and environment blocks and have the kernel read cmdline and
    environ from a new mapping holding the program's, NUL-terminated as execve lays them out
    (the program's may be longer than the launcher's blocks). The mapping lives as long as
    the process."""
    from jailer.layers import syscalls

    for start, end in ((layout["arg_start"], layout["arg_end"]), (layout["env_start"], layout["env_end"])):
        syscalls.zero_memory(start, end - start)
    arguments = b"".join(string + b"\0" for string in argv)
    variables = b"".join(string + b"\0" for string in environment)
    start = syscalls.map_anonymous(len(arguments) + len(variables) or 1)
    syscalls.write_memory(start, arguments + variables)
    middle, end = start + len(arguments), start + len(arguments) + len(variables)
    syscalls.set_mm_map(**{**layout, "arg_start": start, "arg_end": middle, "env_start": middle, "env_end": end,
                           "brk": syscalls.program_break()})


def _become(module, script, args, argv, environment, site, exec_pipe, sock_fd, listener) -> None:
    """Close the exec pipe (that tells the launcher the program started, so it hands over to
    jailer-monitor while this resets), forget the launcher, reset what an exec would have,
    wait until the launcher holds the listener (it took it while this reset), close the
    launcher's fds, run the program."""
    os.close(exec_pipe)
    _forget_callers()
    _reset_interpreter(module, script, args, argv, environment, site)
    if listener is not None:
        try:
            os.read(sock_fd, 1)   # "go": the launcher holds the listener, this copy may close
        except OSError:
            pass
        os.close(listener)
    os.close(sock_fd)
    os._exit(_run_as_main(module, script))


def _forget_callers() -> None:
    """Clear the locals of every function frame below _become's: what the launcher held
    (the plan, its objects) becomes unreachable, and is collected."""
    from jailer.layers import syscalls

    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name != "<module>":    # (a module's locals are its globals)
            names = frame.f_locals
            for name in names:
                names[name] = None
            syscalls.store_frame_locals(frame)
        frame = frame.f_back


def interpreters_own_finders() -> list:
    """sys.meta_path as CPython starts it: without jailer's import hook (or anyone's)."""
    return [finder for finder in sys.meta_path
            if getattr(finder, "__name__", None) in ("BuiltinImporter", "FrozenImporter", "PathFinder")]


def standard_library() -> tuple[str, ...]:
    stdlib = os.path.dirname(os.__file__)
    dynload = next((p for p in sys.path if os.path.basename(p) == "lib-dynload"), os.path.join(stdlib, "lib-dynload"))
    zipped = os.path.join(sys.base_prefix, "lib", f"python{sys.version_info[0]}{sys.version_info[1]}.zip")
    return zipped, stdlib, dynload


def _in_standard_library(module, stdlib: str) -> bool:
    path = getattr(module, "__file__", None)
    if path is None:
        return True                          # built in, or frozen
    return path.startswith(stdlib + os.sep) and os.sep + "site-packages" + os.sep not in path \
        and os.sep + "dist-packages" + os.sep not in path


def _reset_interpreter(module, script, args, argv, environment, site) -> None:
    import _signal as signal   # (the C module: `signal` imports enum, which costs milliseconds here)
    import atexit
    import gc
    import importlib
    import types

    zipped, stdlib, dynload = standard_library()
    for name, module in list(sys.modules.items()):
        if name == "__main__" or not _in_standard_library(module, stdlib):
            del sys.modules[name]
    main = types.ModuleType("__main__")
    main.__builtins__ = sys.modules["builtins"]
    sys.modules["__main__"] = main
    sys.meta_path[:] = interpreters_own_finders()
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    atexit._clear()

    signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(signum) not in (signal.SIG_IGN, signal.SIG_DFL, None):
                signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    os.environ.clear()
    os.environ.update(environment)
    initial = sys.modules["posix"].environ     # (the environment the interpreter started with)
    initial.clear()
    initial.update((os.fsencode(key), os.fsencode(value)) for key, value in environment.items())
    sys.dont_write_bytecode = bool(environment.get("PYTHONDONTWRITEBYTECODE"))
    first = os.path.dirname(script) if script else os.getcwd()
    python_path = [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [first, *python_path, zipped, stdlib, dynload]
    sys.argv = [script or "-m", *args]
    sys.orig_argv = list(argv)
    for hook in ("excepthook", "displayhook", "unraisablehook", "breakpointhook"):
        setattr(sys, hook, getattr(sys, f"__{hook}__"))
    sys.settrace(None)
    sys.setprofile(None)
    sys.setrecursionlimit(1000)
    sys.setswitchinterval(0.005)
    if site:
        import site as site_module

        site_module.main()
    gc.set_threshold(700, 10, 10)
    gc.enable()
    gc.collect()
    gc.freeze()   # what survives is the standard library's: the program's collections need not walk it


def _run_as_main(module, script) -> int:
    """Run the program as CPython's main would; its exit status."""
    import runpy

    code = 0
    try:
        if module is not None:
            runpy._run_module_as_main(module, alter_argv=True)
        else:
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code = -2
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    if code == -2:      # CPython dies by the signal, so its parent sees the interrupt
        import _signal as signal

        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    return code


def _exit_status(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1
