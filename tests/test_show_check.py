"""`jailer show` and `jailer check` run as the user runs them: a subprocess, exit status, stdout/stderr."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jailer.plan import Plan
from jailer.profile import build_plan

REPO = pathlib.Path(__file__).resolve().parent.parent
TRUE = str(REPO / "profiles" / "examples" / "true.toml")
PYTHON_HELLO = str(REPO / "profiles" / "examples" / "python-hello.toml")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="answering for another uid needs root")


def jailer(*args):
    return subprocess.run([sys.executable, "-m", "jailer", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, "TERM": "dumb"})


def test_show_prints_every_group_of_the_plan():
    done = jailer("show", PYTHON_HELLO)
    assert done.returncode == 0 and done.stderr == ""
    starts = [line.split()[0] for line in done.stdout.splitlines() if not line.startswith(" ")]
    assert starts == ["profile", "invocation", "program", "namespaces", "identity", "filesystem", "landlock",
                      "seccomp", "limits", "fds", "restart", "network", "environment", "die", "best"]
    assert f"  executable    {sys.executable}" in done.stdout.splitlines()
    assert "  tmpfs         /tmp 16M mode 1777" in done.stdout.splitlines()
    assert "  cgroup        memory 128M, pids 16, cpu 50000/100000 us (below 'jailer')" in done.stdout.splitlines()
    assert any(line.startswith("  bind ro       ") and line.endswith("/devices  [runtime]")
               for line in done.stdout.splitlines())


def test_show_json_is_the_plan():
    done = jailer("show", "--json", TRUE)
    assert done.returncode == 0
    assert Plan.from_dict(json.loads(done.stdout)) == build_plan(TRUE, environ={"TERM": "dumb"})


def test_show_as_user_gives_the_unprivileged_plan():
    data = json.loads(jailer("show", "--json", "--as-user", "1000", "--as-group", "1001", TRUE).stdout)
    assert data["invocation"] == "unprivileged"
    assert data["identity"]["uid_map"] == [{"inside": 65534, "outside": 1000, "count": 1}]
    assert data["identity"]["gid_map"] == [{"inside": 65534, "outside": 1001, "count": 1}]


def test_invalid_profile_exits_2_with_one_line_per_problem_and_no_traceback(tmp_path):
    profile = tmp_path / "bad.toml"
    profile.write_text('[program]\nargv = ["/bin/true", "{fd:sokcet}"]\n[namespaces]\nusr = true\n'
                       '[seccomp]\nallow = ["@default", "opne"]\n[[fds]]\nname = "socket"\nkind = "unix-listener"\n'
                       'number = 3\n')
    for command in ("show", "check"):
        done = jailer(command, str(profile))
        assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
        assert sorted(done.stderr.splitlines()) == sorted([
            f"jailer: {profile}: program.argv[1]: found unknown fd 'sokcet' in \"{{fd:sokcet}}\", expected one of "
            "the [[fds]] names: socket (did you mean 'socket'?)",
            f"jailer: {profile}: namespaces.usr: found unknown key, expected one of user, mount, pid, net, ipc, "
            "uts, cgroup, hostname, pid1 (did you mean 'user'?)",
            f"jailer: {profile}: seccomp.allow[1]: found \"opne\", expected a syscall name of this architecture "
            "(did you mean 'open'?)",
        ])


def test_toml_syntax_error_exits_2_naming_the_line(tmp_path):
    profile = tmp_path / "syntax.toml"
    profile.write_text('[program]\nargv = ["/bin/true"]\n[seccomp\n')
    done = jailer("show", str(profile))
    assert (done.returncode, done.stderr) == (2, f"jailer: {profile}:3:1: TOML syntax error: Key group not on a "
                                                 "line by itself.\n")


def test_missing_profile_exits_2():
    done = jailer("show", "/nonexistent/profile.toml")
    assert (done.returncode, done.stderr) == (
        2, "jailer: /nonexistent/profile.toml: cannot read the profile: No such file or directory\n")


def test_check_reports_what_this_host_enforces():
    done = jailer("check", "--json", PYTHON_HELLO)
    report = json.loads(done.stdout)
    assert done.returncode == (0 if report["ok"] else 3)
    host = report["host"]
    assert host["seccomp"]["filter"] is True and host["seccomp"]["actions"]["kill_process"] is True
    assert isinstance(host["landlock_abi"], int) or host["landlock_abi"].startswith("unavailable")
    layers = {layer["layer"]: layer for layer in report["layers"]}
    assert set(layers) == {"user_namespace", "mount_namespace", "pid_namespace", "net_namespace", "ipc_namespace",
                           "uts_namespace", "cgroup_namespace", "pivot_root", "landlock", "rlimits", "cgroup",
                           "capabilities", "no_new_privs", "securebits", "seccomp"}
    assert layers["cgroup"]["required"] is False and layers["seccomp"]["required"] is True
    text = jailer("check", PYTHON_HELLO)
    assert text.returncode == done.returncode and "Traceback" not in text.stderr
    assert text.stdout.splitlines()[-1] in ("result      every required layer can be applied",
                                            f"result      {sum(1 for l in report['layers'] if l['required'] and not l['available'])} required layer(s) cannot be applied")


@needs_root
def test_check_refuses_namespaces_for_an_unprivileged_caller_without_a_user_namespace(tmp_path):
    profile = tmp_path / "nouser.toml"
    profile.write_text('[program]\nargv = ["/bin/true"]\n[namespaces]\nuser = false\n[seccomp]\n'
                       'allow = ["@default"]\n[limits]\nnofile = "unlimited"\n[network]\nmode = "loopback"\n')
    done = jailer("check", "--as-user", "65534", str(profile))
    assert done.returncode == 3 and "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert "  REFUSED   mount_namespace: unshare refused: EPERM (an unprivileged caller needs namespaces.user = " \
           "true) (fix: set namespaces.user = true in the profile, or run as root)" in lines
    import resource

    nofile_refused = resource.getrlimit(resource.RLIMIT_NOFILE)[1] != resource.RLIM_INFINITY
    assert ("  REFUSED   rlimits: raising a hard limit needs CAP_SYS_RESOURCE: nofile (fix: lower these limits in the "
            "profile or raise the caller's hard limits (ulimit -H / limits.conf))" in lines) == nofile_refused
    assert "  REFUSED   securebits: setting securebits needs CAP_SETPCAP (fix: run as root or enable " \
           "namespaces.user)" in lines
    assert lines[-1].startswith("result      ") and lines[-1].endswith("required layer(s) cannot be applied")
    as_root = json.loads(jailer("check", "--json", "--as-user", "0", str(profile)).stdout)
    assert as_root["invocation"] == "root"
    assert all(layer["available"] for layer in as_root["layers"] if layer["layer"] != "cgroup")


@needs_root
def test_check_as_an_unprivileged_user_with_a_user_namespace():
    report = json.loads(jailer("check", "--json", "--as-user", "65534", TRUE).stdout)
    layers = {layer["layer"]: layer for layer in report["layers"]}
    assert report["invocation"] == "unprivileged" and report["uid"] == 65534
    assert layers["user_namespace"]["available"] == (report["host"]["unshare"]["user_namespace"] == 0)
    assert layers["mount_namespace"]["available"] == layers["user_namespace"]["available"]


@needs_root
def test_check_finds_bind_sources_the_caller_cannot_reach(tmp_path):
    private = tmp_path / "private"
    (private / "data").mkdir(parents=True)
    private.chmod(0o700)
    profile = tmp_path / "bind.toml"
    profile.write_text(f'[program]\nargv = ["/bin/true"]\n[seccomp]\nallow = ["@default"]\n[[filesystem.bind]]\n'
                       f'source = "{private / "data"}"\ntarget = "/data"\n')
    done = jailer("check", "--as-user", "65534", str(profile))
    assert done.returncode == 3
    assert f"  REFUSED   pivot_root: cannot open bind sources as this caller: {private / 'data'} (EACCES) (fix: make " \
           "them and their parent directories searchable by the caller, or start jailer as root)" in \
        done.stdout.splitlines()
    as_root = json.loads(jailer("check", "--json", "--as-user", "0", str(profile)).stdout)
    assert as_root["host"]["unreachable_paths"] == []
