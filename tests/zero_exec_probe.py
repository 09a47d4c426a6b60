"""What a program sees of its process, printed as one JSON object: run by tests/test_zero_exec.py
under `jailer run` in both start modes, which must agree (jailer.zero_exec lists what the
exec path resets). Its argv: the reverse of MARKER (a string only the launcher held) [execve]."""

import sys

PRELOADED = sorted(name for name in ("dataclasses", "logging") if name in sys.modules)   # before any import here

import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402


def reachable_strings_with(reversed_marker: str) -> int:
    """How many strings or bytes reachable from a container hold the marker (given reversed,
    so that the program's own argv does not hold it)."""
    marker = reversed_marker[::-1]
    encoded = marker.encode()
    found = 0
    for container in gc.get_objects():
        for item in gc.get_referents(container):
            if (isinstance(item, str) and marker in item) or (isinstance(item, bytes) and encoded in item):
                found += 1
    return found


def of_a_jailer_class(o) -> bool:
    """An instance of a class jailer defines, but for the C library's functions and handles that
    jailer.layers.syscalls loads before the preloader freezes the heap (they hold an address
    each, nothing of the launcher's: what ctypes' CDLL would leave, as ctypes objects)."""
    kind = type(o)
    if kind.__module__ == "jailer.layers.syscalls" and kind.__name__ in ("_CFunction", "_CFunctionHoldingGil",
                                                                           "_Library"):
        return False
    return kind.__module__.startswith("jailer")


def launcher_frames() -> int:
    """Frames below this one that still hold locals, in jailer's code (but for the two that start
    the program, which hold its module or script, argv and environment)."""
    frame, held = sys._getframe(1), 0
    while frame is not None:
        if "/jailer/" in frame.f_code.co_filename and frame.f_code.co_name not in ("<module>", "_become", "_run_as_main") \
                and any(value is not None for value in frame.f_locals.values()):
            held += 1
        frame = frame.f_back
    return held


def loaders() -> dict:
    """How each module imported from a source file was loaded: the loader's class, the module's
    paths, and where its functions' code says it comes from."""
    found = {}
    for name, module in sorted(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if spec is None or not isinstance(spec.origin, str) or not spec.origin.endswith(".py"):
            continue
        filenames = sorted({value.__code__.co_filename for value in vars(module).values()
                            if getattr(value, "__module__", None) == name and hasattr(value, "__code__")})
        found[name] = [type(spec.loader).__qualname__, type(module.__loader__).__qualname__, module.__file__,
                       module.__cached__, filenames]
    return found


def main():
    if sys.argv[2:] == ["execve"]:
        os.execv(sys.executable, [sys.executable, "-S", "-c", "pass"])
    libc = ctypes.CDLL(None, use_errno=True)
    frozen = gc.get_freeze_count()
    gc.unfreeze()   # frozen objects are listed by no gc function: what is counted below must be all that lives
    uncollected = {"jailer_objects": sum(1 for o in gc.get_objects() if of_a_jailer_class(o)),
                   "marker_strings": reachable_strings_with(sys.argv[1])}   # (before a collection: garbage too)
    gc.collect()
    status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
    report = {
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
        "signals": {signal.Signals(n).name: str(signal.getsignal(n)) for n in sorted(signal.valid_signals())
                    if n not in (signal.SIGKILL, signal.SIGSTOP) and n < signal.SIGRTMIN},
        "environ": dict(os.environ),
        "proc_environ": [e for e in open("/proc/self/environ", "rb").read().decode().split("\0") if e],
        "cmdline": [a for a in open("/proc/self/cmdline", "rb").read().decode().split("\0") if a],
        "comm": open("/proc/self/comm").read().strip(),
        "dumpable": libc.prctl(3, 0, 0, 0, 0),
        "argv": sys.argv,
        "path": sys.path,
        "cwd": os.getcwd(),
        "jailer_modules": sorted(n for n in sys.modules if n == "jailer" or n.startswith("jailer.")),
        "foreign_modules": sorted(n for n in ("toml", "click", "pyseccomp", "prctl") if n in sys.modules),
        "jailer_objects": sum(1 for o in gc.get_objects() if of_a_jailer_class(o)),
        "marker_strings": reachable_strings_with(sys.argv[1]),
        "launcher_frames": launcher_frames(),
        "gc": [gc.isenabled(), list(gc.get_threshold())],
        "atexit": __import__("atexit")._ncallbacks(),
        "hooks": [sys.excepthook is sys.__excepthook__, sys.gettrace() is None, sys.getrecursionlimit()],
        "meta_path": [getattr(f, "__name__", type(f).__name__) for f in sys.meta_path],
        "main": sorted(k for k in vars(sys.modules["__main__"]) if not k.startswith("__")),
        "ids": [os.getuid(), os.getgid(), status["NoNewPrivs"], status["Seccomp"], status["CapEff"],
                status["CapBnd"]],
        "dont_write_bytecode": sys.dont_write_bytecode,
        "cpus": status["Cpus_allowed_list"],
        "preloaded": {name: sys.modules[name].__file__ for name in PRELOADED},
        "loaders": loaders(),
        "frozen": frozen,
        "uncollected": uncollected,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
