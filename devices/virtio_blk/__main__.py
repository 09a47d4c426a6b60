"""virtio-blk: a virtio 1.x block device as a vfio-user backend program.

    python -m devices.virtio_blk (--socket-path=PATH | --fd=N) --disk-fd=N [--serial=ID]
                                 [--checkpoint-fd=N] [-v]
    python -m devices.virtio_blk --print-capabilities

The disk is an inherited descriptor of a regular file or block device (`jailer run ...
--disk PATH` opens it outside the sandbox): read-write, or read-only when the descriptor
was opened O_RDONLY, which the guest then sees as a read-only disk. The vfio-user side
follows the backend conventions of devices.vfio_user.backend.
"""

from __future__ import annotations

import argparse
import sys

from devices.vfio_user.backend import BackendError, run_backend
from devices.vfio_user.device import DeviceError
from devices.virtio_blk.device import ID_BYTES, Disk, VirtioBlk


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--disk-fd", type=int, metavar="N", required=False,
                        help="serve the disk image open on inherited fd N (O_RDONLY: a read-only disk)")
    parser.add_argument("--serial", default="jailer-virtio-blk", metavar="ID",
                        help=f"the disk's serial number (GET_ID), at most {ID_BYTES} bytes")


def _device(options) -> VirtioBlk:
    if options.disk_fd is None:
        raise BackendError("--disk-fd=N is required: the disk image, open on an inherited fd", 2)
    if len(options.serial.encode()) > ID_BYTES:
        raise BackendError(f"--serial {options.serial!r} is longer than {ID_BYTES} bytes", 2)
    try:
        disk = Disk(options.disk_fd)
    except DeviceError as exc:
        raise BackendError(f"--disk-fd={options.disk_fd}: {exc}", 2) from None
    return VirtioBlk(disk, options.serial)


def main(argv: list[str] | None = None) -> None:
    run_backend(_device, argv, description="virtio-blk disk (virtio 1.x over vfio-user)",
                device_type=VirtioBlk.device_type, extra_options=_options,
                features=("disk-fd", "read-only", "discard", "write-zeroes", "flush"))


if __name__ == "__main__":
    main(sys.argv[1:])
