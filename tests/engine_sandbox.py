"""Helpers for the engine tests: build Plans directly and run them for real, as root or as nobody."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from jailer.plan import Bind, FilesystemPlan, IdentityPlan, IdMap, Plan, ProgramPlan, SeccompPlan

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "tests" / "run_plan.py"
NOBODY = 65534
INVOCATIONS = ("root", "user")
DEVICE_PROFILE = REPO / "profiles" / "gpio-pci-idio-16.toml"
SYSTEM_DIRS = tuple(p for p in ("/usr", "/lib", "/lib64", "/bin", "/sbin") if os.path.exists(p))


def plan_for(invocation: str, script: str, **fields) -> Plan:
    """A plan that runs `sh -c script` with the system directories bound read-only.

    As root the program runs as nobody (mapped to itself); as the unprivileged caller
    (nobody) the caller is mapped to uid/gid 1000 inside, to show the map is applied."""
    if invocation == "root":
        identity = IdentityPlan(NOBODY, NOBODY, (IdMap(NOBODY, NOBODY),), (IdMap(NOBODY, NOBODY),))
    else:
        identity = IdentityPlan(1000, 1000, (IdMap(1000, NOBODY),), (IdMap(1000, NOBODY),))
    filesystem = fields.pop("filesystem", None) or FilesystemPlan(
        binds=tuple(Bind(p, p) for p in SYSTEM_DIRS), devices=("/dev/null",))
    plan = Plan(source="test", name="enginetest", invocation="root" if invocation == "root" else "unprivileged",
                program=ProgramPlan(argv=("sh", "-c", script), executable="/bin/sh"),
                identity=identity, filesystem=filesystem, seccomp=SeccompPlan(enabled=False),
                environment=(("PATH", "/usr/bin:/bin"),))
    return replace(plan, **fields)


NOBODY_DROP = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def nobody_python(imports: str, packages=("jailer",)) -> tuple[list, dict, str | None]:
    """(argv prefix, environment, copy directory) with which nobody runs Python that can
    `import {imports}`: this interpreter as it is when nobody can read the checkout and the
    venv, else /usr/bin/python3 on a readable copy of `packages` (project packages, or the
    directories of installed ones) and pyseccomp (a checkout under a 0700 /root)."""
    probe = subprocess.run(NOBODY_DROP + [sys.executable, "-c", f"import {imports}"], capture_output=True, cwd="/")
    if probe.returncode == 0:
        return NOBODY_DROP + [sys.executable], {}, None
    import pyseccomp

    copy = tempfile.mkdtemp(prefix="jailer-nobody-")
    atexit.register(shutil.rmtree, copy, True)
    for package in packages:
        source = REPO / package if (REPO / package).is_dir() else Path(package)
        shutil.copytree(source, Path(copy) / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(pyseccomp.__file__, copy)
    subprocess.run(["chmod", "-R", "a+rX", copy], check=True)
    return NOBODY_DROP + ["/usr/bin/python3"], {"PYTHONPATH": copy}, copy


class _Runner:
    """How to start tests/run_plan.py: as root, or as nobody with a copy it can read if needed."""

    def __init__(self):
        self.user_command = None

    def command(self, invocation):
        if invocation == "root":
            return [sys.executable, str(RUNNER)], {}
        if self.user_command is None:
            python, env, copy = nobody_python("jailer.launch.launcher, pyseccomp")
            if copy is not None:
                shutil.copy(RUNNER, copy)
                os.chmod(Path(copy) / RUNNER.name, 0o644)
            self.user_command = python + [str(Path(copy) / RUNNER.name if copy else RUNNER)], env
        return self.user_command


RUNNER_FOR = _Runner()


def readable_tempdir() -> str:
    """A temporary directory anybody can read and traverse (for plan files and binds); removed
    when the test run ends, whoever else forgot it."""
    path = tempfile.mkdtemp(prefix="jailer-test-")
    os.chmod(path, 0o755)
    atexit.register(shutil.rmtree, path, True)
    return path


def run(plan: Plan, *options: str, invocation: str = "root", pass_fds=(), timeout: float = 30,
        stdout=subprocess.PIPE, wait=True, env=None):
    """Run the plan through tests/run_plan.py; returns CompletedProcess (or Popen when wait=False)."""
    directory = readable_tempdir()
    plan_file = os.path.join(directory, "plan.json")
    with open(plan_file, "w") as f:
        json.dump(plan.to_dict(), f)
    os.chmod(plan_file, 0o644)
    command, extra_env = RUNNER_FOR.command(invocation)
    environment = {"PATH": "/usr/bin:/bin", **extra_env, **(env or {})}
    popen = subprocess.Popen(command + [plan_file, *options], stdout=stdout, stderr=subprocess.PIPE,
                             pass_fds=pass_fds, env=environment, cwd="/", text=True)
    if not wait:
        popen.plan_dir = directory
        return popen
    try:
        out, err = popen.communicate(timeout=timeout)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
        shutil.rmtree(directory, ignore_errors=True)
    return subprocess.CompletedProcess(popen.args, popen.returncode, out, err)


def status_events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_with_status(plan: Plan, *options: str, invocation: str = "root", pass_fds=(), env=None):
    """run() with --status-fd; returns (CompletedProcess, the status events)."""
    with tempfile.TemporaryFile("w+") as status:
        result = run(plan, "--status-fd", str(status.fileno()), *options, pass_fds=[status.fileno(), *pass_fds],
                     invocation=invocation, env=env)
        status.seek(0)
        return result, status_events(status.read())


def staged_device_profile(directory: Path) -> Path:
    """The shipped device profile, which is staged: ready once the device reports READY=1 (so
    SIGTERM finds its handler installed), with steady rules that forbid what a serving
    device never needs (opening files, socket, clone; execve too, refused from the first
    instruction since it starts zero-exec)."""
    from jailer.profile import build_plan

    plan = build_plan(str(DEVICE_PROFILE))
    steady = {r.syscall for r in plan.seccomp.steady}
    refused = steady | {r.syscall for r in plan.seccomp.rules if r.action not in ("allow", "log")}
    assert plan.program.ready == "notify" and {"openat", "socket"} <= steady and "execve" in refused
    return DEVICE_PROFILE
