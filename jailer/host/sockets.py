"""Sockets a jailed program binds itself, made reachable at the caller's path.

libvfio-user devices (SPDK's vfio-user target among them) bind their own socket path and
cannot take a listening descriptor. For each [[sockets]] entry jailer makes a private
directory beside the caller's --socket-path (same file system), owned by the sandbox's
uid, and the set-up child binds it writable at the socket's directory inside the sandbox
(Landlock then lets the program make and remove sockets there and nothing else). Once the
program listens (seen in /proc/PID/net/unix, so no client connection is consumed), the
socket is hard-linked into a second, root-only private directory, checked, given its mode
and group there, and moved to the caller's path with RENAME_NOREPLACE: the sandbox writes
the first directory, so nothing in it is ever acted on by name after that link.
"""

from __future__ import annotations

import os
import stat

from jailer.errors import JailerError, UsageError
from jailer.layers.fds import existing_socket, give_to_group
from jailer.host import paths

_LISTENING = 0x10000   # __SO_ACCEPTCON in /proc/net/unix's Flags


class ProgramSocket:
    """One [[sockets]] entry while the program runs."""

    def __init__(self, spec, host_path: str, owner: tuple[int, int], group: int | None):
        self.spec, self.path, self.owner, self.group = spec, host_path, owner, group
        self.inside_name = os.path.basename(spec.path)
        directory, self.name = paths.split(host_path)
        try:
            self.dirfd = paths.open_directory(directory)
        except OSError as exc:
            raise UsageError(f"cannot make {host_path} for socket '{spec.name}': {exc.strerror}") from None
        self.made = None
        try:
            self.replaces = existing_socket(self.dirfd, self.name, host_path)
            self.shared = paths.PrivateDirectory(self.dirfd, host_path)
        except BaseException:
            os.close(self.dirfd)
            raise
        root = os.geteuid() == 0
        try:
            if root:
                os.chown(f"/proc/self/fd/{self.shared.fd}", *owner)   # the held directory itself, by its fd
            st = os.fstat(self.shared.fd)
        except OSError as exc:
            self.close()
            raise UsageError(f"cannot make a directory for socket '{spec.name}' beside {host_path}: "
                             f"{exc.strerror}") from None
        self.source = os.path.join(directory or ".", self.shared.name)
        if not self.source.startswith("/"):
            self.source = os.path.join(os.getcwd(), self.source)
        self.identity = (st.st_dev, st.st_ino)

    def bind(self) -> tuple[str, str, tuple[int, int]]:
        """(host source, target inside, (st_dev, st_ino)) for the set-up child's mounts."""
        return self.source, os.path.dirname(self.spec.path), self.identity

    def listening(self, pid: int) -> bool:
        """Whether the program listens on its socket: its net namespace lists a listening
        socket bound in the socket's directory (under any name: a program may bind a
        temporary name and rename it, as the bundled device does), and the socket's own
        name is there. The directory is this socket's alone, so that is the program's."""
        try:
            with open(f"/proc/{pid}/net/unix", "rb") as table:
                lines = table.read().split(b"\n")[1:]
        except OSError:
            return False
        directory = os.fsencode(os.path.dirname(self.spec.path)) + b"/"
        name = os.fsencode(self.inside_name)
        if not any(len(fields) >= 8 and int(fields[3], 16) & _LISTENING
                   and (fields[7].startswith(directory) or fields[7] == name)
                   for fields in (line.split() for line in lines)):
            return False
        try:
            return stat.S_ISSOCK(os.stat(self.inside_name, dir_fd=self.shared.fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def place(self) -> None:
        """Make the listening socket reachable at the caller's path, with --socket-group's mode and group."""
        staging = paths.PrivateDirectory(self.dirfd, self.path)
        try:
            try:
                os.link(self.inside_name, self.name, src_dir_fd=self.shared.fd, dst_dir_fd=staging.fd,
                        follow_symlinks=False)
            except OSError as exc:
                raise JailerError(f"cannot reach the program's socket {self.spec.path}: {exc.strerror}") from None
            st = os.stat(self.name, dir_fd=staging.fd, follow_symlinks=False)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in (self.owner[0], os.geteuid()):
                raise JailerError(f"the program's {self.spec.path} is not a socket it made")
            if self.group is not None:
                give_to_group(staging, self.name, self.owner[0], self.group)
                os.chmod(self.name, 0o660, dir_fd=staging.fd)   # a checked socket in a directory only jailer writes
            held = paths.hold(staging.fd, self.name)
            try:
                paths.place(staging, self.name, self.dirfd, self.name, self.path, replace_socket=self.replaces)
            except BaseException:
                os.close(held)
                raise
            self.made = paths.Made(os.dup(self.dirfd), self.name, held)
        finally:
            staging.close(self.name)

    def remove(self) -> None:
        """Remove the socket at the caller's path (if still the one placed) and the shared directory."""
        if self.made is not None:
            self.made.remove()
            self.made = None
        if self.dirfd >= 0:
            if not paths.remove_flat_directory(self.dirfd, self.shared.name, self.shared.fd):
                from jailer import status

                status.warn(f"left {self.source}: the program made directories in it")
            self.close()

    def close(self) -> None:
        """Let go of the descriptors without removing anything (jailer-monitor took them over)."""
        if self.made is not None:
            self.made.close()
            self.made = None
        if self.dirfd >= 0:
            os.close(self.shared.fd)
            os.close(self.dirfd)
            self.dirfd = -1

    def monitor_lines(self) -> list[str]:
        lines = self.made.monitor_lines() if self.made is not None else []
        return lines + [f"tidy {self.shared.fd} {self.dirfd} {self.shared.name}"]

    def descriptors(self) -> list[int]:
        return (self.made.descriptors() if self.made is not None else []) + [self.shared.fd, self.dirfd]


def main_socket(specs, option: str):
    """The [[sockets]] entry --socket-path means: the only one, or the one named "vfio-user"."""
    if len(specs) == 1:
        return specs[0]
    named = [s for s in specs if s.name == "vfio-user"]
    if named:
        return named[0]
    raise UsageError(f"{option} needs one [[sockets]] entry in the profile, or one named 'vfio-user' (it has "
                     f"{len(specs)}: {', '.join(s.name for s in specs)}); use --socket NAME=PATH")
