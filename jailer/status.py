"""What was enforced, and the --status-fd stream that tells management tools about it.

Every layer attempt goes through Enforcement.attempt: it either records the layer as
applied, records it as skipped (only for layers the plan lists in best_effort, and the
skip is reported on stderr and in the status stream), or raises LayerError. That one
function is what makes jailer fail closed.

The status stream is JSON lines; the tiny encoder here avoids importing json on the
start-up hot path.
"""

from __future__ import annotations

import os

from jailer.errors import LayerError


class Enforcement:
    """The layers applied so far and those skipped, with why; copied into forked children."""

    def __init__(self, best_effort=frozenset()):
        self.best_effort = frozenset(best_effort)
        self.applied: dict[str, object] = {}
        self.skipped: dict[str, str] = {}

    def attempt(self, layer, action, fix=""):
        """Run action(); record `layer` as applied with its result, or skip it, or raise LayerError."""
        try:
            detail = action()
        except LayerError as exc:
            self._fail(layer, exc.reason, exc.fix)
            return None
        except OSError as exc:
            self._fail(layer, exc.strerror or str(exc), fix)
            return None
        self.applied[layer] = True if detail is None else detail
        return detail

    def _fail(self, layer, reason, fix):
        if layer not in self.best_effort:
            raise LayerError(layer, reason, fix)
        self.applied.pop(layer, None)   # e.g. a cgroup made by the launcher that the child could not join
        self.skipped[layer] = reason + (f" (to fix: {fix})" if fix else "")

    def merge(self, applied, skipped):
        self.applied.update(applied)
        self.skipped.update(skipped)


def warn(message):
    """One line on stderr, prefixed like every other jailer message."""
    try:
        os.write(2, f"jailer: {message}\n".encode(errors="replace"))
    except OSError:
        pass


class StatusStream:
    """JSON lines on the caller's --status-fd; a closed reader never stops the sandbox."""

    def __init__(self, fd):
        self.fd = fd

    def emit(self, event, **fields):
        if self.fd is None:
            return
        line = encode_json({"event": event, **fields}) + "\n"
        try:
            os.write(self.fd, line.encode())
        except OSError as exc:
            warn(f"status fd {self.fd}: {exc.strerror}; no more status events")
            self.fd = None


def encode_json(value) -> str:
    """JSON for the plain values status events carry (dict, list, str, int, float, bool, None)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)   # finite: seconds
    if isinstance(value, str):
        return '"' + "".join(_escape(ch) for ch in value) + '"'
    if isinstance(value, dict):
        return "{" + ",".join(f"{encode_json(str(k))}:{encode_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(encode_json(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__} in a status event")


def _escape(ch):
    if ch in '"\\':
        return "\\" + ch
    if ch < " " or ch == "\x7f":
        return f"\\u{ord(ch):04x}"
    return ch


def describe_exit(wait_status) -> dict:
    """The 'exited' fields for a wait status: {"code": n} or {"signal": n}."""
    if os.WIFSIGNALED(wait_status):
        return {"signal": os.WTERMSIG(wait_status)}
    return {"code": os.waitstatus_to_exitcode(wait_status)}


def exit_code(wait_status) -> int:
    """Shell convention: the exit code, or 128 + the signal that killed the program."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)

