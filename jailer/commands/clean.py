"""`jailer clean`: remove what launchers killed with SIGKILL (or by the OOM killer) left behind.

The next `jailer run` of the same user does this too (jailer.host.leftovers); the command
is for when no run follows, or to see first what would go (--dry-run).
"""

from __future__ import annotations

import os

import click


@click.command("clean")
@click.option("--dry-run", is_flag=True, help="Say what would be removed, and remove nothing.")
def clean_command(dry_run: bool) -> None:
    """Remove the sockets, pid files and cgroups that launchers of this user which no longer
    run recorded, and, as root, free the host ids they held. Nothing a running launcher made
    is touched, nor a file someone made at a recorded path since: only the very file recorded
    (same device, inode and ctime) goes. One line on stdout per removal."""
    from jailer.errors import UsageError
    from jailer.host import host_ids, leftovers, paths

    said = []
    directory = leftovers.record_directory()
    if directory is not None and os.path.isdir(directory):
        try:
            dirfd = paths.open_directory(directory)
        except (OSError, UsageError) as exc:
            raise UsageError(f"cannot read the launchers' records in {directory}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        try:
            said += leftovers.sweep_records(dirfd, directory, dry_run=dry_run)
        finally:
            os.close(dirfd)
    if os.geteuid() == 0:
        said += host_ids.release_dead(dry_run)
    for line in said:
        click.echo(line)
    if not said:
        where = directory if directory is not None else "no record directory: set $XDG_STATE_HOME or $HOME"
        click.echo(f"nothing left behind by a killed launcher ({where})")
