"""`jailer init`: a starting profile for a device program.

A new device should be sandboxed in a handful of commands: `jailer init` writes a profile
that already builds (the program's native closure, its socket, every namespace, limits, a
wide allowlist to be learned), `jailer learn` narrows the allowlist to what the device
calls, `jailer selftest` proves the sandbox, `jailer run` runs it.
"""

from __future__ import annotations

import json
import os
import re

import click

from jailer.errors import UsageError

_SOCKET = re.compile(r"\{socket:([A-Za-z_][A-Za-z0-9_-]*)\}")
_FD = re.compile(r"\{fd:([A-Za-z_][A-Za-z0-9_-]*)\}")

HEADER = """\
# A starting profile for {program}, written by `jailer init`.
# Next, as the user who will run it:
#   jailer learn {profile} --in-place      # the allowlist the device really needs, validated
#   jailer selftest {profile}              # every escape the probe tries must be blocked
#   jailer run {profile} {run_socket}
# Every key is explained in `man jailer-profile` (man/jailer-profile.5).
name = {name}
"""

PROGRAM = """
[program]
runtime = "native"
argv = {argv}
{ready}
"""

SOCKET = """
# The socket the program binds itself: jailer gives its directory a private, writable
# bind (sockets only) and makes the socket reachable at --socket-path once it listens.
[[sockets]]
name = {name}
path = {path}
"""

FD = """
# The listening socket jailer creates at --socket-path (or takes with --fd N), as fd {number}.
[[fds]]
name = {name}
kind = "unix-listener"
number = {number}
"""

REST = """
# Every namespace (the defaults, written out to be reviewed): the device talks only over
# its socket, so its net namespace has no interface at all.
[namespaces]
user = true
mount = true
pid = true
net = true
ipc = true
uts = true
cgroup = true

[filesystem]
root_size = "1M"   # a read-only tmpfs root holding only the program's own files

[limits]
nofile = 64
core = 0
data = "64M"   # private memory, where the cgroup cannot be had (guest RAM it maps is shared, not counted)
# address space: a vfio-user device maps the guest's RAM (DMA), so leave it unlimited or
# set it above the largest guest, e.g.  as = "64G"

[limits.cgroup]
memory = "256M"
pids = 16

[enforcement]
best_effort = ["cgroup"]   # an unprivileged caller on a cgroup v1 host cannot create cgroups

# A wide start for `jailer learn`, which replaces this section with what the device calls.
[seccomp]
default_action = "kill"
allow = ["@default", "@basic-io", "@file-read", "@memory", "@signal", "@time", "@poll", "@unix-socket"]
"""


def render(argv: list[str], name: str, profile: str) -> str:
    sockets = sorted({match for arg in argv for match in _SOCKET.findall(arg)})
    fds = sorted({match for arg in argv for match in _FD.findall(arg)})
    if not sockets and not fds:
        raise UsageError("say where the program takes its socket: write {socket:vfio-user} where it takes the "
                         "path of a socket it binds itself, or {fd:vfio-user} where it takes a listening fd")
    if sockets and fds:
        raise UsageError("a program that binds its own socket and takes a listening fd: write the profile by hand "
                         "(see man jailer-profile)")
    ready = 'ready = "socket"   # ready once it listens on its socket' if sockets else \
        'ready = "exec"     # or "notify" if it writes READY=1 to a notify fd'
    run_socket = "--socket-path /run/DEVICE.sock" if len(sockets + fds) == 1 else \
        " ".join(f"--socket {entry}=/run/DEVICE-{entry}.sock" for entry in sockets + fds)
    text = HEADER.format(program=argv[0], profile=profile, run_socket=run_socket, name=json.dumps(name))
    text += PROGRAM.format(argv=json.dumps(argv), ready=ready)
    for entry in sockets:
        text += SOCKET.format(name=json.dumps(entry), path=json.dumps(f"/run/vfio-user/{entry}.sock"))
    for number, entry in enumerate(fds, start=3):
        text += FD.format(name=json.dumps(entry), number=number)
    return text + REST


@click.command("init", context_settings={"ignore_unknown_options": True})
@click.option("--output", "-o", "output", required=True, type=click.Path(dir_okay=False),
              help="The profile to write (refused if it exists).")
@click.option("--name", help="The sandbox's name (default: the program's file name).")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def init_command(output, name, argv):
    """Write a starting profile for the device program ARGV (after --).

    Write {socket:vfio-user} where the program takes the path of a socket it binds itself
    (libvfio-user devices), or {fd:vfio-user} where it takes a listening fd; {env:NAME}
    names a directory each user sets. The profile is built before it is written, so what
    `jailer init` writes already runs.

    \b
      jailer init -o gpio.toml -- /opt/libvfio-user/samples/gpio-pci-idio-16 {socket:vfio-user}
    """
    from jailer.host import paths
    from jailer.profile import build_plan

    argv = list(argv)
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "-", os.path.basename(argv[0].split("}")[-1])) or "device"
    text = render(argv, name, output)
    if os.path.lexists(output):
        raise UsageError(f"{output} exists; choose another --output (jailer init never overwrites a profile)")
    made = paths.write_file(output, text.encode(), 0o644)
    try:
        build_plan(output)
    except BaseException:
        made.remove()
        raise
    made.close()
    click.echo(f"jailer init: wrote {output}; next: jailer learn {output} --in-place", err=True)
