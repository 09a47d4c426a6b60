"""Runtime resolution: the binds found really are enough to run the program in an otherwise empty root.

The proof builds a root exactly from the resolved binds and symlinks (a tmpfs in a private
mount namespace, read-only bind mounts, symlinks, chroot) and runs the program there as
uid 65534, so a missed library, a missed symlink or an unreadable parent directory fails.
"""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from jailer import runtime
from jailer.profile import build_plan

REPO = pathlib.Path(__file__).resolve().parent.parent
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="building a root needs mount rights (root) and unshare")


def problems_of(call, *args):
    found = []
    result = call(*args, lambda key, text: found.append(f"{key}: {text}"))
    return result, found


def run_in_minimal_root(tmp_path, binds, symlinks, environment, argv, uid=NOBODY):
    """Run argv as `uid` in a root holding only `binds` and `symlinks`; returns the CompletedProcess."""
    root = tmp_path / "root"
    root.mkdir()
    q = shlex.quote
    lines = ["set -e", f"mount -t tmpfs -o size=4m,mode=755 jailer-test {q(str(root))}"]
    for bind in binds:
        target = f"{root}{bind.target}"
        if os.path.isdir(bind.source):
            lines.append(f"mkdir -p {q(target)}")
        else:
            lines += [f"mkdir -p {q(os.path.dirname(target))}", f": > {q(target)}"]
        lines += [f"mount --bind {q(bind.source)} {q(target)}",
                  f"mount -o remount,bind,ro {q(target)}"]
    for link in symlinks:
        target = f"{root}{link.target}"
        lines += [f"mkdir -p {q(os.path.dirname(target))}", f"ln -s {q(link.points_to)} {q(target)}"]
    env = " ".join(q(f"{k}={v}") for k, v in environment)
    lines.append(f"exec /usr/bin/env -i {env} /usr/sbin/chroot --userspec={uid}:{uid} {q(str(root))} "
                 + " ".join(q(a) for a in argv))
    script = tmp_path / "enter.sh"
    script.write_text("\n".join(lines) + "\n")
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", str(script)],
                          capture_output=True, text=True, timeout=60)


def test_read_elf_finds_interpreter_and_needed_libraries():
    info = runtime.read_elf("/bin/true")
    assert info.elf_class == 2 and info.interpreter.endswith("ld-linux-x86-64.so.2" if os.uname().machine ==
                                                             "x86_64" else ".so.1")
    assert "libc.so.6" in info.needed
    assert runtime.read_elf(__file__) is None
    pyenv_python = "/root/.pyenv/versions/3.11.7/bin/python3.11"
    if os.path.exists(pyenv_python):
        assert runtime.read_elf(pyenv_python).runpath == ("/root/.pyenv/versions/3.11.7/lib",)


def test_ld_so_conf_includes_are_followed(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "b.conf").write_text("/opt/b/lib\n# comment\n")
    (tmp_path / "conf.d" / "a.conf").write_text("/opt/a/lib/  # trailing comment\ninclude " + str(
        tmp_path / "ld.so.conf") + "\n")
    (tmp_path / "ld.so.conf").write_text("/first\ninclude conf.d/*.conf\n/last\n")
    assert runtime.ld_so_conf_dirs(str(tmp_path / "ld.so.conf")) == ["/first", "/opt/a/lib", "/opt/b/lib", "/last"]


def test_native_runtime_binds_executable_libc_and_loader_with_merged_usr_symlinks():
    result, problems = problems_of(runtime.native_runtime, ["/bin/true"], None)
    assert problems == []
    sources = {b.source for b in result.binds}
    assert os.path.realpath("/bin/true") in sources
    assert any(os.path.basename(s).startswith("libc.so") for s in sources)
    assert os.path.realpath(runtime.read_elf("/bin/true").interpreter) in sources
    assert all(b.origin == "runtime" and not b.writable and b.source == b.target for b in result.binds)
    if os.path.islink("/bin"):
        assert runtime.Symlink("/bin", os.readlink("/bin")) in result.symlinks
    if os.path.islink("/lib64"):
        assert runtime.Symlink("/lib64", os.readlink("/lib64")) in result.symlinks


def test_native_runtime_follows_a_script_to_its_interpreter(tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o755)
    result, problems = problems_of(runtime.native_runtime, [str(script)], None)
    assert problems == []
    assert {str(script), os.path.realpath("/bin/sh")} <= {b.source for b in result.binds}


def test_native_runtime_reports_a_missing_library(tmp_path):
    fake = tmp_path / "needs-missing"
    shutil.copy("/bin/true", fake)
    data = bytearray(fake.read_bytes())
    at = data.index(b"libc.so.6\0")
    data[at:at + 9] = b"libq.so.6"
    fake.write_bytes(bytes(data))
    result, problems = problems_of(runtime.native_runtime, [str(fake)], None)
    assert result is None and len(problems) == 1
    assert problems[0].startswith(f'program.argv[0]: found "{fake}" needing libq.so.6, expected every shared '
                                  "library to be found")


def test_python_runtime_binds_interpreter_libc_loader_stdlib_and_site_packages():
    result, problems = problems_of(runtime.python_runtime, ["-c", "pass"], ["devices", "click"], False)
    assert problems == []
    sources = [b.source for b in result.binds]
    assert result.executable == sys.executable and result.argv == (sys.executable, "-S", "-c", "pass")
    assert os.path.realpath(sys.executable) in sources
    assert any(os.path.basename(s).startswith("libc.so") for s in sources)
    assert any(os.path.basename(s).startswith("ld-linux") for s in sources)
    assert os.path.realpath(sysconfig.get_path("stdlib")) in sources
    site_packages = os.path.realpath(sysconfig.get_path("purelib"))
    assert site_packages in sources
    assert str(REPO / "devices") in sources                      # outside site-packages: bound on its own
    assert not any(s.startswith(site_packages + "/") for s in sources)   # click comes with site-packages
    env = dict(result.environment)
    assert env["PYTHONPATH"].split(":") == [str(REPO), sysconfig.get_path("purelib")]
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    if sys.prefix != sys.base_prefix:
        assert os.path.join(os.path.realpath(sys.prefix), "pyvenv.cfg") in sources


def test_python_script_given_by_path_is_bound(tmp_path):
    script = tmp_path / "hello.py"
    script.write_text("print('hello')\n")
    result, problems = problems_of(runtime.python_runtime, [str(script), "--flag"], [], False)
    assert problems == [] and str(script) in [b.source for b in result.binds]
    assert result.argv == (sys.executable, "-S", str(script), "--flag")


@needs_root
def test_resolved_python_runtime_really_runs_in_an_empty_root(tmp_path):
    code = ("import os, devices, click, toml, prctl; print('ok', os.getuid(), os.path.exists('/etc/passwd'), "
            "sorted(os.listdir('/')))")
    result, problems = problems_of(runtime.python_runtime, ["-c", code], ["devices"], False)
    assert problems == []
    done = run_in_minimal_root(tmp_path, result.binds, result.symlinks, result.environment, result.argv)
    assert done.returncode == 0, done.stderr
    top = sorted({b.target.split("/")[1] for b in result.binds} | {s.target.split("/")[1] for s in result.symlinks})
    assert done.stdout.strip() == f"ok {NOBODY} False {top}"


@needs_root
def test_native_runtime_really_runs_in_an_empty_root(tmp_path):
    plan = build_plan(str(REPO / "profiles" / "examples" / "true.toml"), euid=0)
    fs = plan.filesystem
    done = run_in_minimal_root(tmp_path, fs.binds, fs.symlinks, plan.environment, plan.program.argv)
    assert (done.returncode, done.stderr) == (0, "")


@needs_root
def test_packages_under_a_0700_directory_are_importable_as_another_user(tmp_path):
    private = tmp_path / "private"
    (private / "secret_pkg").mkdir(parents=True)
    (private / "secret_pkg" / "__init__.py").write_text("WHERE = __file__\n")
    (private / "sibling.txt").write_text("not bound\n")
    private.chmod(0o700)
    # Resolve in a separate interpreter whose sys.path holds the private directory, as a caller's would.
    resolver = textwrap.dedent(f"""
        import json, sys
        from jailer import runtime
        code = "import secret_pkg, os; print(secret_pkg.WHERE, os.path.exists({str(private / 'sibling.txt')!r}))"
        r = runtime.python_runtime(["-c", code], ["secret_pkg"], False, lambda k, t: sys.exit(k + ": " + t))
        print(json.dumps({{"binds": [[b.source, b.target] for b in r.binds],
                          "symlinks": [[s.target, s.points_to] for s in r.symlinks],
                          "env": r.environment, "argv": r.argv}}))
    """)
    out = subprocess.run([sys.executable, "-c", resolver], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": f"{REPO}:{private}"}, check=True)
    data = json.loads(out.stdout)
    assert [str(private / "secret_pkg")] * 2 in data["binds"]
    binds = [runtime.Bind(s, t) for s, t in data["binds"]]
    symlinks = [runtime.Symlink(t, p) for t, p in data["symlinks"]]
    done = run_in_minimal_root(tmp_path, binds, symlinks, data["env"], data["argv"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{private / 'secret_pkg' / '__init__.py'} False"


PYENV_PYTHON = "/root/.pyenv/versions/3.11.7/bin/python3.11"


@needs_root
@pytest.mark.skipif(not os.path.exists(PYENV_PYTHON), reason="needs an interpreter installed under /root")
def test_interpreter_under_root_with_runpath_libpython_runs_as_nobody(tmp_path):
    """An interpreter inside 0700 /root whose libpython is found through DT_RUNPATH."""
    resolver = ("import json, sys; sys.path.insert(0, sys.argv[1]); from jailer import runtime; "
                "r = runtime.python_runtime(['-c', 'import json, ssl, ctypes; print(\"ok\")'], [], False, "
                "lambda k, t: sys.exit(t)); print(json.dumps([[(b.source, b.target) for b in r.binds], "
                "[(s.target, s.points_to) for s in r.symlinks], r.environment, r.argv]))")
    out = subprocess.run([PYENV_PYTHON, "-c", resolver, str(REPO)], capture_output=True, text=True, timeout=120,
                         check=True)
    binds, symlinks, env, argv = json.loads(out.stdout)
    assert any(s.endswith("libpython3.11.so.1.0") for s, _ in binds)
    done = run_in_minimal_root(tmp_path, [runtime.Bind(s, t) for s, t in binds],
                               [runtime.Symlink(t, p) for t, p in symlinks], env, argv)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


def _world_traversable(path):
    """Whether every directory on the way to `path` lets any uid through (o+x)."""
    path = os.path.realpath(path)
    parts = path.split("/")
    return all(os.stat("/".join(parts[:i]) or "/").st_mode & 0o001 for i in range(1, len(parts)))


@needs_root
@pytest.mark.parametrize("invocation", ["root", "unprivileged"])
def test_example_python_program_runs_under_the_real_launcher(invocation):
    """`jailer run` on the python runtime example: only the resolved runtime is visible, and it is enough."""
    prefix = []
    if invocation == "unprivileged":
        if not (_world_traversable(sys.executable) and _world_traversable(str(REPO / "devices"))
                and shutil.which("setpriv")):
            pytest.skip("the interpreter or the repository is not reachable by an unprivileged uid")
        prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    done = subprocess.run([*prefix, sys.executable, "-m", "jailer", "run", "--no-cache",
                           str(REPO / "profiles" / "examples" / "python-hello.toml")],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert (done.returncode, done.stdout) == (0, "hello from cpython\n"), done.stderr
