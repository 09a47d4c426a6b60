"""The bundled IDIO-16 device locking itself down in-process with its shipped profile.

    .venv/bin/python examples/locked_down_idio16.py --socket-path PATH [-v]

Instead of being started by `jailer run`, the device checks the lockdown first (a refusal
names the layer, in one line, before anything happens), opens its listening socket at PATH
(a stale socket there is replaced), builds the device, and, once the device holds
everything it serves with, applies profiles/gpio-pci-idio-16.toml's steady stage to itself
through jailer.lockdown, logs what was applied on stderr, then serves vfio-user clients.
SIGTERM or SIGINT ends it (exit 0).

It runs without what only `jailer run` gives, knowingly (SKIP below; docs/lockdown.md says
what that costs): the profile's pid namespace, minimal root, fd manifest, program and
environment, readiness and restarts, and as root a host id of its own (it runs as the
profile's uid 65534); the cgroup is best effort in the profile. The socket file stays when
it exits, since the locked-down device may not remove it; the next start replaces it.
devices/ never imports jailer: this program imports both.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from devices.gpio_pci_idio16.__main__ import main as serve_device
from devices.vfio_user.backend import BackendError, listen_on_path, publish
from jailer import lockdown
from jailer.errors import JailerError

PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "gpio-pci-idio-16.toml"
SKIP = {"pid_namespace", "pivot_root", "fds", "program", "readiness", "host_ids"}
NAME = "locked-down-idio16"


def main(argv: list[str] | None = None) -> None:
    """Never returns: the device exits with its own status, a refusal with the error's."""
    parser = argparse.ArgumentParser(description="The IDIO-16 device, locked down in-process by its profile")
    parser.add_argument("--socket-path", required=True, metavar="PATH", help="listen for a vfio-user client here")
    parser.add_argument("-v", "--verbose", action="store_true", help="log protocol details on stderr")
    options = parser.parse_args(argv)
    try:
        prepared = lockdown.prepare(PROFILE, stage="steady", skip=SKIP)
        listener = listen_on_path(options.socket_path)
        publish(options.socket_path)   # clients that connect now wait in the backlog until it serves
    except (JailerError, BackendError) as exc:
        print(f"{NAME}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)

    def lock_down():
        try:
            report = prepared.apply()
        except JailerError as exc:
            raise BackendError(f"lockdown: {exc}", exc.exit_code) from None
        logging.getLogger("vfio_user").info("locked down: %s; without: %s", ", ".join(report["applied"]),
                                            ", ".join(report["skipped"]))

    serve_device([f"--fd={listener.detach()}", *(["-v"] if options.verbose else [])], before_serving=lock_down)


if __name__ == "__main__":
    main()
