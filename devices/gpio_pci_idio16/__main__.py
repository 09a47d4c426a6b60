"""gpio-pci-idio-16: the emulated ACCES PCI-IDIO-16 as a vfio-user backend program.

    python -m devices.gpio_pci_idio16 (--socket-path=PATH | --fd=N) [--control-socket=PATH | --control-fd=N]
                                      [--checkpoint-fd=N] [-v]
    python -m devices.gpio_pci_idio16 --print-capabilities

The vfio-user side follows the backend conventions of devices.vfio_user.backend; the
optional control socket (protocol in devices.gpio_pci_idio16.control) lets the host set the
input lines and read the outputs while a guest drives the card. --control-fd takes an
already listening AF_UNIX socket, for a sandbox that cannot create socket files.
"""

from __future__ import annotations

import argparse
import sys

from devices.gpio_pci_idio16.control import ControlServer, open_listener
from devices.gpio_pci_idio16.device import Idio16
from devices.vfio_user.backend import run_backend


def _options(parser: argparse.ArgumentParser) -> None:
    control = parser.add_mutually_exclusive_group()
    control.add_argument("--control-socket", metavar="PATH",
                         help="serve the JSON control protocol (set inputs, read outputs) on this UNIX socket")
    control.add_argument("--control-fd", type=int, metavar="N",
                         help="serve the control protocol on inherited listening UNIX socket fd N")


def _start_control(server, device: Idio16, options):
    if options.control_socket is None and options.control_fd is None:
        return None
    listener, remove = open_listener(options.control_socket, options.control_fd)
    control = ControlServer(device, listener, server, after_request=server.save_checkpoint)

    def stop() -> None:
        control.close()
        remove()
    return stop


def main(argv: list[str] | None = None, *, before_serving=None) -> None:
    """before_serving(): called once the device holds everything it serves with (its
    listening socket, control socket and checkpoint), just before it serves: where a program
    embedding the device locks itself down (examples/locked_down_idio16.py). With
    --socket-path the socket is renamed into place after it; --fd needs nothing more."""
    def setup(server, device: Idio16, options):
        stop = _start_control(server, device, options)
        if before_serving is not None:
            try:
                before_serving()
            except BaseException:
                if stop is not None:
                    stop()   # the loop's clean-up never comes: remove the control socket now
                raise
        return stop

    run_backend(lambda options: Idio16(), argv, description="Emulated ACCES PCI-IDIO-16 GPIO card (vfio-user)",
                device_type=Idio16.device_type, extra_options=_options, setup=setup,
                features=("control-socket", "control-fd"))


if __name__ == "__main__":
    main(sys.argv[1:])
