"""`jailer probe SOCKET`: the vfio-user client of devices.vfio_user.probe, as a command."""

from __future__ import annotations

import json

import click

from jailer.errors import JailerError


@click.command("probe")
@click.argument("socket_path", metavar="SOCKET")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON object.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for each reply.")
def probe_command(socket_path: str, as_json: bool, timeout: float) -> None:
    """Print what the vfio-user device behind SOCKET offers: PCI ids and class, regions,
    interrupts, protocol capabilities and migration support (like `lspci -vv`).

    The probe is a vfio-user client: it connects, negotiates and reads, then disconnects.
    A server serves one client at a time, so probe a device before its VMM connects.
    """
    from devices.vfio_user.probe import ProbeError, format_report, probe

    try:
        report = probe(socket_path, timeout)
    except ProbeError as exc:
        raise JailerError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        click.echo(format_report(socket_path, report))
