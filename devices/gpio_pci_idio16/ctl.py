"""Command-line client for the IDIO-16 control socket (see devices.gpio_pci_idio16.control).

    python -m devices.gpio_pci_idio16.ctl --control-socket PATH COMMAND
        query-status          print the device state as JSON
        get-outputs           print the 16 output lines as 0xNNNN
        get-inputs            print the 16 input lines as 0xNNNN
        set-inputs VALUE      drive all input lines (0xBEEF, 48879, 0b1...)
        set-input LINE LEVEL  drive one input line (LINE 0-15, LEVEL 0 or 1)
        save-state FILE       write the device state (JSON with device_type, abi_version, data)
        load-state FILE       restore a state written by save-state

Exit status 0 on success, 1 when the device refuses or cannot be reached (one line on
stderr), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

TIMEOUT_SECONDS = 5.0


class CtlError(Exception):
    pass


def request(path: str, command: dict) -> dict:
    """Send one request, return its "return" object; CtlError for an error reply or no device."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT_SECONDS)
            sock.connect(path)
            sock.sendall(json.dumps(command).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise CtlError(f"{path}: the device closed the connection without replying")
                reply += chunk
    except OSError as error:
        raise CtlError(f"{path}: {error.strerror or error}") from None
    answer = json.loads(reply)
    if "error" in answer:
        raise CtlError(answer["error"]["desc"])
    return answer["return"]


def _integer(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    prog = os.path.basename(sys.argv[0])
    if prog.endswith(".py"):                # run as a module rather than an installed script
        prog = "python -m devices.gpio_pci_idio16.ctl"
    parser = argparse.ArgumentParser(prog=prog, description="Talk to a running gpio-pci-idio-16 device's control socket.")
    parser.add_argument("--control-socket", required=True, metavar="PATH")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("query-status", help="print the device state as JSON")
    commands.add_parser("get-outputs", help="print the output lines")
    commands.add_parser("get-inputs", help="print the input lines")
    commands.add_parser("set-inputs", help="drive all input lines").add_argument("value", type=_integer)
    one = commands.add_parser("set-input", help="drive one input line")
    one.add_argument("line", type=_integer)
    one.add_argument("level", type=_integer, choices=(0, 1))
    commands.add_parser("save-state", help="write the device state to FILE").add_argument("file")
    commands.add_parser("load-state", help="restore the device state from FILE").add_argument("file")
    return parser


def run(options: argparse.Namespace) -> str | None:
    """Carry out one command; returns what to print."""
    path = options.control_socket
    if options.command == "query-status":
        return json.dumps(request(path, {"cmd": "query-status"}), indent=2, sort_keys=True)
    if options.command in ("get-outputs", "get-inputs"):
        key = options.command.removeprefix("get-")
        return f"{request(path, {'cmd': options.command})[key]:#06x}"
    if options.command == "set-inputs":
        request(path, {"cmd": "set-inputs", "value": options.value})
    elif options.command == "set-input":
        request(path, {"cmd": "set-input", "line": options.line, "value": options.level})
    elif options.command == "save-state":
        state = request(path, {"cmd": "save-state"})
        try:
            with open(options.file, "w") as file:
                json.dump(state, file)
                file.write("\n")
        except OSError as error:
            raise CtlError(f"{options.file}: {error.strerror or error}") from None
    elif options.command == "load-state":
        try:
            with open(options.file) as file:
                state = json.load(file)
        except OSError as error:
            raise CtlError(f"{options.file}: {error.strerror or error}") from None
        except ValueError as error:
            raise CtlError(f"{options.file}: not a saved state ({error})") from None
        if not isinstance(state, dict):
            raise CtlError(f"{options.file}: not a saved state (not a JSON object)")
        request(path, {"cmd": "load-state", **{k: v for k, v in state.items() if k != "cmd"}})
    return None


def main(argv: list[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    try:
        output = run(options)
    except CtlError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if output is not None:
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
