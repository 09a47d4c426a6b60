"""Start-up cost of `jailer run` against bubblewrap and unshare, measured in one run.

Each command runs /bin/true in a full set of namespaces; the figure is the median
wall time over N runs after warm-ups, as root and as an unprivileged user (uid 65534
through setpriv). Uses hyperfine (-N, no shell) when installed, else a fork/exec loop.

    .venv/bin/python benchmarks/startup.py [--runs 50] [--warmup 5] [--json FILE]

A fourth command, "python", starts the interpreter the jailer command runs on, the same
way, and does nothing: no Python launcher can start faster, so jailer minus python is
what jailer itself adds, printed against bwrap too.

The jailer command is the venv's console script (absolute path: a version-manager shim
would add >100 ms). When the unprivileged user cannot read the checkout or the venv
(e.g. under /root), the packages are copied to a world-readable temporary directory
and run with Debian's /usr/bin/python3 and PYTHONPATH.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILE = os.path.join(REPO, "profiles", "examples", "true.toml")
SYSTEM_PYTHON = "/usr/bin/python3"
UNPRIVILEGED_UID = 65534
UNPRIVILEGED = ("setpriv", f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_UID}", "--clear-groups",
                "--inh-caps=-all")
PROJECT_PACKAGES = ("jailer", "devices")
TARGET_RATIO = 2.0   # jailer should cost at most twice bwrap


def readable_by_others(path):
    """True when every directory up to path lets 'others' in and path itself is readable."""
    path = os.path.abspath(path)
    while True:
        mode = os.stat(path).st_mode
        if not mode & 0o001 and os.path.isdir(path) or not mode & 0o004:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def world_readable_copy(dest, repo=REPO):
    """Copy the project packages and the venv's site-packages under dest for another uid.

    Returns the PYTHONPATH to use with /usr/bin/python3. Editable-install hooks are not
    copied: the project packages sit first on the path instead.
    """
    site_packages = sysconfig.get_paths()["purelib"]
    project = os.path.join(dest, "project")
    libs = os.path.join(dest, "site-packages")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "__editable__*", "jailer*.pth",
                                    "jailer-*.dist-info")
    for package in PROJECT_PACKAGES:
        if os.path.isdir(os.path.join(repo, package)):
            shutil.copytree(os.path.join(repo, package), os.path.join(project, package), ignore=ignore)
    shutil.copytree(site_packages, libs, ignore=ignore, symlinks=True)
    precompile(dest)
    for root, dirs, files in os.walk(dest):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644 | (os.stat(os.path.join(root, name)).st_mode & 0o111))
    os.chmod(dest, 0o755)
    return f"{project}:{libs}"


def jailer_command(unprivileged, scratch):
    """argv for `jailer run PROFILE` and its environment, runnable by the chosen identity."""
    script = os.path.join(REPO, ".venv", "bin", "jailer")
    if not unprivileged or (readable_by_others(script) and readable_by_others(sys.executable)):
        return [script if os.path.exists(script) else sys.executable, *(
            [] if os.path.exists(script) else ["-m", "jailer"]), "run", PROFILE], None
    pythonpath = world_readable_copy(os.path.join(scratch, "tree"))
    return [SYSTEM_PYTHON, "-m", "jailer", "run", PROFILE], pythonpath


def peer_commands():
    return {
        "bwrap": ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
                  "--dev", "/dev", "--proc", "/proc", "/bin/true"],
        "unshare": ["unshare", "-Urmpnui", "--fork", "/bin/true"],
    }


def interpreter_command(jailer_argv):
    """The interpreter jailer runs on, started the same way, doing nothing: the floor of any
    Python launcher, against which what jailer itself adds can be read."""
    if jailer_argv[0].endswith("/jailer"):
        with open(jailer_argv[0]) as script:
            return script.readline()[2:].split() + ["-c", "pass"]
    return [jailer_argv[0], "-c", "pass"]


def as_identity(argv, unprivileged):
    return [*UNPRIVILEGED, *argv] if unprivileged else argv


def check_runs(name, argv, env):
    """Run once: a command that fails is reported instead of timed."""
    try:
        result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{name}: cannot run: {exc}"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        return f"{name}: exit {result.returncode}: {last}"
    return None


def time_with_hyperfine(commands, env, runs, warmup, scratch, unprivileged):
    export = os.path.join(scratch, f"hyperfine-{os.getpid()}-{int(unprivileged)}.json")
    argv = ["hyperfine", "-N", "--style", "none", "--warmup", str(warmup), "--runs", str(runs),
            "--export-json", export]
    for name, command in commands.items():
        argv += ["--command-name", name, subprocess.list2cmdline(command)]
    subprocess.run(as_identity(argv, unprivileged), env=env, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, check=True, timeout=600)
    with open(export) as handle:
        results = json.load(handle)["results"]
    return {"wall": {result["command"]: result["median"] * 1000 for result in results},
            "cpu": {result["command"]: (result["user"] + result["system"]) * 1000 for result in results}}


def time_with_loop(commands, env, runs, warmup, scratch, unprivileged):
    """Fallback timer: run a readable copy of this file (stdlib only) under the chosen
    identity with --loop, and read its figures."""
    script = shutil.copy(os.path.abspath(__file__), scratch)
    os.chmod(script, 0o644)
    argv = [SYSTEM_PYTHON, script, "--loop", json.dumps(commands), "--runs", str(runs), "--warmup", str(warmup)]
    output = subprocess.run(as_identity(argv, unprivileged), env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, check=True, timeout=600).stdout
    return json.loads(output)


def loop_figures(commands, runs, warmup):
    """Median wall time and mean CPU time (user + system, children included) in ms per command."""
    import statistics

    figures = {"wall": {}, "cpu": {}}
    for name, argv in commands.items():
        walls, cpus = [], []
        for index in range(warmup + runs):
            start = time.perf_counter()
            pid = os.posix_spawnp(argv[0], argv, os.environ)
            usage = os.wait4(pid, 0)[2]
            if index >= warmup:
                walls.append((time.perf_counter() - start) * 1000)
                cpus.append((usage.ru_utime + usage.ru_stime) * 1000)
        figures["wall"][name] = statistics.median(walls)
        figures["cpu"][name] = statistics.fmean(cpus)
    return figures


def precompile(directory):
    """Write the bytecode a real install has, even when PYTHONDONTWRITEBYTECODE is set here."""
    import compileall

    compileall.compile_dir(directory, quiet=2)


def own_home(scratch, uid):
    """A home directory for uid, so jailer's per-user plan cache works as it would for that user."""
    home = os.path.join(scratch, f"home-{uid}")
    os.makedirs(home, 0o700, exist_ok=True)
    os.chown(home, uid, uid)
    return home


def measure(unprivileged, runs, warmup, scratch):
    """{"wall": medians, "cpu": means} in ms per command for one identity, and the commands that failed."""
    jailer_argv, pythonpath = jailer_command(unprivileged, scratch)
    env = {key: value for key, value in os.environ.items() if key != "XDG_CACHE_HOME"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    if unprivileged:
        env["HOME"] = own_home(scratch, UNPRIVILEGED_UID)
    commands = {"jailer": jailer_argv, **peer_commands(), "python": interpreter_command(jailer_argv)}
    failures = {}
    for name, argv in list(commands.items()):
        problem = check_runs(name, as_identity(argv, unprivileged), env)
        if problem:
            failures[name] = problem
            del commands[name]
    if not commands:
        return {"wall": {}, "cpu": {}}, failures
    if shutil.which("hyperfine"):
        return time_with_hyperfine(commands, env, runs, warmup, scratch, unprivileged), failures
    return time_with_loop(commands, env, runs, warmup, scratch, unprivileged), failures


def ratio(medians, numerator, denominator):
    if numerator in medians and denominator in medians:
        return f"{medians[numerator] / medians[denominator]:.2f}"
    return "-"


def table(rows, unit):
    header = ("identity", f"jailer {unit}", f"bwrap {unit}", f"unshare {unit}", f"python {unit}", "jailer/bwrap",
              "jailer/unshare", "(jailer-python)/bwrap")
    lines = [header]
    for identity, medians in rows.items():
        beyond = (f"{(medians['jailer'] - medians['python']) / medians['bwrap']:.2f}"
                  if {"jailer", "python", "bwrap"} <= medians.keys() else "-")
        lines.append((identity, *(f"{medians[n]:.2f}" if n in medians else "-"
                                  for n in ("jailer", "bwrap", "unshare", "python")),
                      ratio(medians, "jailer", "bwrap"), ratio(medians, "jailer", "unshare"), beyond))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="also write the medians and failures as JSON")
    parser.add_argument("--loop", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.loop:
        json.dump(loop_figures(json.loads(options.loop), options.runs, options.warmup), sys.stdout)
        return 0
    identities = {"root": False, "unprivileged": True} if os.geteuid() == 0 else {"unprivileged": False}
    rows, failures = {}, {}
    for package in PROJECT_PACKAGES:
        if os.path.isdir(os.path.join(REPO, package)):
            precompile(os.path.join(REPO, package))
    with tempfile.TemporaryDirectory(prefix="jailer-bench-") as scratch:
        os.chmod(scratch, 0o777)
        for identity, drop in identities.items():
            rows[identity], failures[identity] = measure(drop, options.runs, options.warmup, scratch)
    print(f"start-up of /bin/true in all namespaces, {options.runs} runs "
          f"({'hyperfine -N' if shutil.which('hyperfine') else 'fork/exec loop'}, {options.warmup} warm-ups)")
    print("wall time, median:")
    print(table({identity: figures["wall"] for identity, figures in rows.items()}, "ms"))
    print("CPU time (user + system), mean: less sensitive to a busy machine")
    print(table({identity: figures["cpu"] for identity, figures in rows.items()}, "cpu ms"))
    for identity, problems in failures.items():
        for problem in problems.values():
            print(f"not measured as {identity}: {problem}")
    for identity, figures in rows.items():
        medians = figures["wall"]
        if "jailer" in medians and "bwrap" in medians:
            verdict = "within" if medians["jailer"] <= TARGET_RATIO * medians["bwrap"] else "OVER"
            print(f"{identity}: jailer is {verdict} the {TARGET_RATIO:g}x bwrap target")
    if options.json:
        with open(options.json, "w") as handle:
            json.dump({"runs": options.runs, "figures_ms": rows, "failures": failures}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
