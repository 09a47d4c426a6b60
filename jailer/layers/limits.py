"""Resource limits (setrlimit) from Plan.limits.rlimits; -1 means unlimited."""

from __future__ import annotations

from jailer.errors import LayerError
from jailer.layers import syscalls

# Linux resource numbers (the same on every architecture jailer supports; Python lacks RLIMIT_LOCKS).
RLIMITS = {
    "cpu": 0, "fsize": 1, "data": 2, "stack": 3, "core": 4, "rss": 5, "nproc": 6, "nofile": 7,
    "memlock": 8, "as": 9, "locks": 10, "sigpending": 11, "msgqueue": 12, "nice": 13, "rtprio": 14, "rttime": 15,
}


def _value(number: int) -> int:
    return syscalls.RLIM_INFINITY if number == -1 else number


def apply_rlimits(rlimits) -> dict:
    applied = {}
    for limit in rlimits:
        if limit.name not in RLIMITS:
            raise LayerError("rlimits", f"unknown resource limit '{limit.name}'",
                             f"use one of {', '.join(sorted(RLIMITS))}")
        try:
            syscalls.setrlimit(RLIMITS[limit.name], _value(limit.soft), _value(limit.hard))
        except OSError as exc:
            raise LayerError("rlimits", f"setrlimit {limit.name}={limit.soft}:{limit.hard}: {exc.strerror}",
                             "a hard limit can only be raised with CAP_SYS_RESOURCE on the host: lower it in the "
                             "profile, or run as root") from None
        applied[limit.name] = [limit.soft, limit.hard]
    return applied
