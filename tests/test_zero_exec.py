"""Zero-exec start (program.start = "zero-exec", jailer.zero_exec): a Python program run by
the sandbox's process in the launcher's interpreter sees what the exec path gives it, and
nothing of the launcher; execve is refused from its first instruction."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from jailer.errors import ProfileError
from jailer.profile import build_plan
from engine_sandbox import NOBODY
from test_e2e_jailed_device import INVOCATIONS, JAILER, scratch  # noqa: F401  (fixture)

PROBE = Path(__file__).with_name("zero_exec_probe.py")
REPO = Path(__file__).resolve().parent.parent
MODES = ("exec", "zero-exec")
LONG = 16384   # a variable longer than the launcher's whole environment: /proc shows all of the program's


PRELOAD = ("dataclasses",)   # zero-exec's probe starts with it imported (outside the sandbox, by the preloader)


def readable(path: Path, text: str) -> Path:
    """`path` holding `text`, readable by the unprivileged invocation too (left as it is when
    it holds it already: a profile rewritten would not be the cached plan's)."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    path.chmod(0o644)
    return path


def probe_profile(directory: Path, marker: str, start: str, extra_allow=()) -> Path:
    """A profile for the probe, named after the marker (the launcher holds its path)."""
    preload = ", ".join(f'"{name}"' for name in PRELOAD) if start == "zero-exec" else ""
    probe = readable(directory / "zero_exec_probe.py", PROBE.read_text())
    allow = ", ".join(f'"{name}"' for name in ("@default", "@python", "@file-read", "@process-info", "prctl", *extra_allow))
    return readable(directory / f"probe-{start}-{marker}.toml", f"""
name = "zero-exec-probe"
[program]
runtime = "python"
argv = ["{probe}"]
start = "{start}"
preload = [{preload}]
[seccomp]
allow = [{allow}, "execve"]
[environment]
set = {{ LONGER_THAN_THE_LAUNCHERS = "{'x' * LONG}" }}
""")


def run_probe(invocation, directory: Path, start: str, *args, marker=None, cache: Path | None = None):
    """The probe under `jailer run`, with no cache, or with the caches in `cache`."""
    marker = marker or f"launcher-only-{uuid.uuid4().hex}"
    profile = probe_profile(directory, marker, start)
    command, env = JAILER.command(invocation)
    caching = ["--no-cache"] if cache is None else []
    env = {**env, "JAILER_CACHE_DIR": str(cache)} if cache is not None else env
    result = subprocess.run([*command, "run", *caching, str(profile), "--", marker[::-1], *args],
                            capture_output=True, text=True, timeout=60, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "JAILER_TEST_MARKER": marker, **env})
    return result


def private_cache(directory: Path, invocation) -> Path:
    cache = directory / f"cache-{invocation}"
    cache.mkdir(mode=0o700)
    if invocation == "user" and os.geteuid() == 0:
        os.chown(cache, NOBODY, NOBODY)
    return cache


def run_with_module_cache(invocation, directory: Path, marker: str) -> tuple[dict, list]:
    """The zero-exec probe's report from a run whose preloader imports from a module cache
    (jailer.zero_exec.module_cache) made by the runs before it, and the cache file's
    (inode, mtime) after each run: the first run resolves the plan (its launcher imports
    much of what the preloader would), the second writes the whole module cache, the third
    only reads it."""
    cache = private_cache(directory, invocation)
    stamps = []
    for _ in range(3):
        result = run_probe(invocation, directory, "zero-exec", marker=marker, cache=cache)
        assert result.returncode == 0, result.stderr
        modules = [path for path in cache.iterdir() if path.suffix == ".modules"]
        stamps.append([(path.stat().st_ino, path.stat().st_mtime_ns) for path in modules])
    return json.loads(result.stdout), stamps


@pytest.fixture
def readable_dir():
    """A directory the unprivileged invocation can read too."""
    path = Path(tempfile.mkdtemp(prefix="jailer-zero-exec-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def reports():
    """The probe's report in each mode and invocation."""
    found = {}
    directory = Path(tempfile.mkdtemp(prefix="jailer-zero-exec-"))
    directory.chmod(0o755)
    try:
        for param in INVOCATIONS:
            invocation = param.values[0] if hasattr(param, "values") else param
            if invocation == "root" and os.geteuid() != 0:
                continue
            marker = f"launcher-only-{uuid.uuid4().hex}"
            for start in MODES:
                result = run_probe(invocation, directory, start, marker=marker)
                assert result.returncode == 0, result.stderr
                found[invocation, start] = json.loads(result.stdout)
            found[invocation, "module cache"] = run_with_module_cache(invocation, directory, marker)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return found


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_the_program_sees_what_the_exec_path_gives_it(invocation, reports):
    exec_path, zero = reports[invocation, "exec"], reports[invocation, "zero-exec"]
    for key in ("fds", "signals", "environ", "proc_environ", "cmdline", "comm", "dumpable", "argv", "path", "cwd",
                "jailer_modules", "foreign_modules", "jailer_objects", "marker_strings", "gc", "atexit", "hooks",
                "meta_path", "main", "ids", "dont_write_bytecode", "cpus"):
        assert zero[key] == exec_path[key], key


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_modules_imported_from_the_module_cache_are_what_the_import_system_gives(invocation, reports):
    """The preloader's module cache changes nothing the program can see: the same report,
    and every module loaded by a SourceFileLoader from the same files as the exec path's."""
    exec_path, zero = reports[invocation, "exec"], reports[invocation, "zero-exec"]
    cached, stamps = reports[invocation, "module cache"]
    assert len(stamps[1]) == 1 and stamps[2] == stamps[1]   # written once whole, then only read
    for key in zero:
        if key not in ("frozen", "loaders"):
            assert cached[key] == zero[key], key
    for name, loaded in cached["loaders"].items():   # (which modules the launcher imported depends on the plan cache)
        assert loaded == zero["loaders"].get(name, exec_path["loaders"].get(name)), name
        assert loaded[:2] == ["SourceFileLoader", "SourceFileLoader"], name
    dataclasses = cached["loaders"]["dataclasses"]      # (preloaded, from the cache)
    assert dataclasses[2] == sys.modules["os"].__file__.replace("os.py", "dataclasses.py") \
        and dataclasses[4] == [dataclasses[2]]


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_nothing_of_the_launcher_stays_reachable(invocation, reports):
    zero = reports[invocation, "zero-exec"]
    assert zero["jailer_modules"] == [] and zero["foreign_modules"] == []
    assert zero["jailer_objects"] == 0 and zero["launcher_frames"] == 0
    assert zero["marker_strings"] == 0          # the profile's path, the launcher's environment
    assert zero["uncollected"] == {"jailer_objects": 0, "marker_strings": 0}   # not even as garbage
    assert not any(entry.startswith("JAILER_TEST_MARKER") for entry in zero["proc_environ"])
    assert zero["fds"] == [0, 1, 2, 3]          # stdio and the listing's own
    assert zero["ids"][2:] == ["1", "2", "0000000000000000", "0000000000000000"]
    own = dict(line.split(":\t", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":\t" in line)
    assert zero["cpus"] == own["Cpus_allowed_list"]   # the preloader's start on the launcher's CPU is undone


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_preloaded_modules_are_the_standard_librarys_and_already_imported(invocation, reports):
    import dataclasses

    zero, exec_path = reports[invocation, "zero-exec"], reports[invocation, "exec"]
    assert zero["preloaded"] == {"dataclasses": dataclasses.__file__} and exec_path["preloaded"] == {}
    assert zero["frozen"] > 0    # what the preloader imported is kept out of the program's collections


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_execve_is_refused_from_the_first_instruction(invocation, readable_dir):
    zero = run_probe(invocation, readable_dir, "zero-exec", "execve")
    assert zero.returncode == 128 + 31, zero.stderr        # SIGSYS: the profile's default action, kill
    assert "execve" in zero.stderr
    exec_path = run_probe(invocation, readable_dir, "exec", "execve")
    assert exec_path.returncode == 0, exec_path.stderr     # the exec path's profile allows it


def test_profiles_that_cannot_start_zero_exec_are_refused_with_the_key(tmp_path):
    cases = {
        'runtime = "native"\nargv = ["/bin/true"]': "program.start",
        'runtime = "python"\nargv = ["-c", "pass"]': "program.argv",
    }
    for program, key in cases.items():
        path = tmp_path / "p.toml"
        path.write_text(f'[program]\n{program}\nstart = "zero-exec"\n[seccomp]\nallow = ["@default"]\n')
        with pytest.raises(ProfileError) as caught:
            build_plan(str(path))
        assert f"{path}: {key}:" in str(caught.value), str(caught.value)
    path.write_text('[program]\nruntime = "python"\nargv = ["-m", "json.tool"]\nstart = "zero-exec"\n'
                    '[environment]\nPYTHONHASHSEED = "0"\n')
    with pytest.raises(ProfileError, match="environment.PYTHONHASHSEED"):
        build_plan(str(path))


def test_only_the_standard_library_is_preloaded_and_only_for_zero_exec(tmp_path):
    path = tmp_path / "p.toml"
    cases = {('"exec"', '"json"'): 'program.preload: found an array with start = "exec", expected no preload',
             ('"zero-exec"', '"json", "click"'): 'program.preload[1]: found "click", expected a module of the '
                                                 'standard library',
             ('"zero-exec"', '"antigravity"'): 'program.preload[0]: found "antigravity", expected a module of the '
                                               'standard library whose import only defines things',
             ('"zero-exec"', '"venv.__main__"'): 'program.preload[0]: found "venv.__main__", expected a module '
                                                 "that is not a package's __main__",
             ('"zero-exec"', '"json..tool"'): 'program.preload[0]: found "json..tool", expected a module name',
             ('"zero-exec"', '"json.decodr"'): 'program.preload[0]: found "json.decodr", expected a module of the '
                                               f'standard library ({os.path.dirname(os.__file__)}/json has no '
                                               'decodr.py and no package decodr)'}
    for (start, preload), message in cases.items():
        path.write_text(f'[program]\nruntime = "python"\nargv = ["-m", "json.tool"]\nstart = {start}\n'
                        f'preload = [{preload}]\n')
        with pytest.raises(ProfileError) as caught:
            build_plan(str(path))
        assert f"{path}: {message}" in str(caught.value), str(caught.value)
    path.write_text('[program]\nruntime = "python"\nargv = ["-m", "json.tool"]\nstart = "zero-exec"\n'
                    'preload = ["json", "importlib.util", "email.mime.text"]\n')
    assert build_plan(str(path)).program.preload == ("json", "importlib.util", "email.mime.text")


def zero_exec_plan(directory: Path):
    return build_plan(str(probe_profile(directory, f"launcher-only-{uuid.uuid4().hex}", "zero-exec")))


def exited(pid: int, within: float = 10.0):
    """The wait status of child `pid` once it ends (None if it is still running after `within` s)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    return None


def test_the_preloader_ignores_forwarded_signals_and_ends_with_its_launcher(readable_dir):
    from jailer.zero_exec.preloader import Preloader

    preloader = Preloader.fork(zero_exec_plan(readable_dir))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):   # the launcher forwards these itself
        os.kill(preloader.pid, signum)
    assert exited(preloader.pid, within=0.5) is None
    preloader.sock.close()     # the launcher's end closes (as when it ends) without asking for a sandbox
    assert os.waitstatus_to_exitcode(exited(preloader.pid)) == 0


VIEW = """import os
print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), os.uname().nodename, sorted(os.listdir("/")))
"""


def view_profile(directory: Path, extra: str = "") -> Path:
    """A zero-exec program that prints the pids its /proc shows, its host name and its root."""
    program = readable(directory / "view.py", VIEW)
    return readable(directory / f"view-{uuid.uuid4().hex}.toml", f"""
name = "view"
[program]
runtime = "python"
argv = ["{program}"]
start = "zero-exec"
preload = ["json"]
[namespaces]
hostname = "built-beside"
[seccomp]
allow = ["@default", "@python", "@file-read", "@process-info"]
{extra}""")


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_the_namespaces_built_beside_the_preloader_are_the_sandboxs_own(invocation, readable_dir):
    """The builder that mounts the root while the preloader imports lives in the sandbox's pid
    namespace (pid 2, gone by the time the program runs), so the /proc it mounted shows the
    sandbox's pids only: the reaper (1) and the program; host name and root are the profile's."""
    command, env = JAILER.command(invocation)
    result = subprocess.run([*command, "run", "--no-cache", str(view_profile(readable_dir))], capture_output=True,
                            text=True, timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[1, 3] built-beside "), result.stdout
    assert "'proc'" in result.stdout and "'etc'" not in result.stdout and "'home'" not in result.stdout


def test_when_the_builder_fails_the_preloader_builds_and_reports_the_error_once(readable_dir):
    """A root the builder cannot make (a bind into /proc) costs only time: the preloader tries
    itself and the one error is the setup child's, as without the builder."""
    profile = view_profile(readable_dir, f'[[filesystem.bind]]\nsource = "{readable_dir}"\ntarget = "/proc/x"\n')
    command, env = JAILER.command("root")
    result = subprocess.run([*command, "run", "--no-cache", str(profile)], capture_output=True, text=True,
                            timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 3 and result.stdout == ""
    assert result.stderr.count("jailer:") == 1, result.stderr
    assert result.stderr.startswith("jailer: cannot apply layer 'pivot_root': bind /proc/x: No such file or directory")


def run_with_preloader(profile: Path, marker: str, kill_preloader: bool):
    """Run `profile` through launcher.run in a fresh interpreter with a preloader, as `jailer
    run` does (all in a function: a module's globals are not the launcher's to clear); the
    preloader's pid is printed first on stderr, then the status events."""
    script = (
        "import sys\n"
        "def main():\n"
        "    import os, signal\n"
        "    from jailer.launch import launcher\n"
        "    from jailer.profile import build_plan\n"
        "    from jailer.zero_exec.preloader import Preloader\n"
        "    plan = build_plan(sys.argv[1])\n"
        "    preloader = Preloader.fork(plan)\n"
        "    os.write(2, f'preloader {preloader.pid}\\n'.encode())\n"
        "    if sys.argv[3] == 'kill':\n"
        "        os.kill(preloader.pid, signal.SIGKILL)\n"
        "    return launcher.run(plan, launcher.Options(extra_args=[sys.argv[2]], preloader=preloader, status_fd=2))\n"
        "sys.exit(main())\n")
    result = subprocess.run([sys.executable, "-c", script, str(profile), marker[::-1], "kill" if kill_preloader else ""],
                            capture_output=True, text=True, timeout=60, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    preloader = int(re.search(r"^preloader (\d+)$", result.stderr, re.M).group(1))
    started = [json.loads(line)["pid"] for line in result.stderr.splitlines() if line.startswith('{"event":"started"')]
    return preloader, started, json.loads(result.stdout)


def test_the_preloader_is_the_sandboxs_process(readable_dir):
    """The process that imported while the launcher prepared is the one that runs the program:
    no second clone (of a process that has imported everything) on the way to the device."""
    if os.geteuid() != 0:
        pytest.skip("runs the launcher in this invocation, as root")
    marker = f"preloader-{uuid.uuid4().hex}"
    profile = probe_profile(readable_dir, marker, "zero-exec")
    profile.write_text(profile.read_text() + '[namespaces]\npid1 = "program"\n')   # no reaper: the program is pid 1
    preloader, started, report = run_with_preloader(profile, marker, kill_preloader=False)
    assert started == [preloader]
    assert list(report["preloaded"]) == list(PRELOAD) and report["jailer_objects"] == 0


def test_without_its_preloader_the_launcher_starts_the_sandbox_itself(readable_dir):
    """A preloader that is gone (killed, or refused a fork) costs only time: the launcher forks
    the sandbox's process itself, and the program sees nothing of either."""
    if os.geteuid() != 0:
        pytest.skip("runs the launcher in this invocation, as root")
    marker = f"launcher-only-{uuid.uuid4().hex}"
    preloader, started, report = run_with_preloader(probe_profile(readable_dir, marker, "zero-exec"), marker,
                                                    kill_preloader=True)
    assert len(started) == 1 and started != [preloader]
    assert report["jailer_objects"] == 0 and report["marker_strings"] == 0 and report["jailer_modules"] == []
    assert report["fds"] == [0, 1, 2, 3] and report["ids"][2:4] == ["1", "2"]
