"""Zero-exec start (program.start = "zero-exec", jailer.zero_exec): a Python program run by
the sandbox's process in the launcher's interpreter sees what the exec path gives it, and
nothing of the launcher; execve is refused from its first instruction."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from jailer.errors import ProfileError
from jailer.profile import build_plan
from test_e2e_jailed_device import INVOCATIONS, JAILER, scratch  # noqa: F401  (fixture)

PROBE = Path(__file__).with_name("zero_exec_probe.py")
MODES = ("exec", "zero-exec")
LONG = 16384   # a variable longer than the launcher's whole environment: /proc shows all of the program's


def probe_profile(directory: Path, marker: str, start: str, extra_allow=()) -> Path:
    """A profile for the probe, named after the marker (the launcher holds its path)."""
    probe = directory / "zero_exec_probe.py"
    probe.write_bytes(PROBE.read_bytes())
    probe.chmod(0o644)
    path = directory / f"probe-{start}-{marker}.toml"
    allow = ", ".join(f'"{name}"' for name in ("@default", "@python", "@file-read", "@process-info", "prctl", *extra_allow))
    path.write_text(f"""
name = "zero-exec-probe"
[program]
runtime = "python"
argv = ["{probe}"]
start = "{start}"
[seccomp]
allow = [{allow}, "execve"]
[environment]
set = {{ LONGER_THAN_THE_LAUNCHERS = "{'x' * LONG}" }}
""")
    path.chmod(0o644)
    return path


def run_probe(invocation, directory: Path, start: str, *args, marker=None):
    marker = marker or f"launcher-only-{uuid.uuid4().hex}"
    profile = probe_profile(directory, marker, start)
    command, env = JAILER.command(invocation)
    result = subprocess.run([*command, "run", "--no-cache", str(profile), "--", marker[::-1], *args],
                            capture_output=True, text=True, timeout=60, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "JAILER_TEST_MARKER": marker, **env})
    return result


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
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return found


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_the_program_sees_what_the_exec_path_gives_it(invocation, reports):
    exec_path, zero = reports[invocation, "exec"], reports[invocation, "zero-exec"]
    for key in ("fds", "signals", "environ", "proc_environ", "cmdline", "comm", "dumpable", "argv", "path", "cwd",
                "jailer_modules", "foreign_modules", "jailer_objects", "marker_strings", "gc", "atexit", "hooks",
                "meta_path", "main", "ids", "dont_write_bytecode"):
        assert zero[key] == exec_path[key], key


@pytest.mark.parametrize("invocation", INVOCATIONS)
def test_nothing_of_the_launcher_stays_reachable(invocation, reports):
    zero = reports[invocation, "zero-exec"]
    assert zero["jailer_modules"] == [] and zero["foreign_modules"] == []
    assert zero["jailer_objects"] == 0 and zero["launcher_frames"] == 0
    assert zero["marker_strings"] == 0          # the profile's path, the launcher's environment
    assert not any(entry.startswith("JAILER_TEST_MARKER") for entry in zero["proc_environ"])
    assert zero["fds"] == [0, 1, 2, 3]          # stdio and the listing's own
    assert zero["ids"][2:] == ["1", "2", "0000000000000000", "0000000000000000"]


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
