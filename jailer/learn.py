"""`jailer learn`: derive a profile's seccomp allowlist from what its program really does.

The program runs in its profile's exact sandbox, but with a filter that routes every
syscall to the launcher, whose recording policy lets each one run and counts it by name,
stage ("setup" before the program is ready, "steady" after) and the values of the
arguments that select what a call does (ioctl requests, fcntl commands, socket families,
executable mappings, namespace flags of clone, ...). Meanwhile an exerciser drives the
device through every message it supports. Later runs (--runs) go at full speed under the
allowlist learned so far and record only the calls it does not cover, so paths that depend
on timing are taken as often as in production. The union of the runs becomes:

  - allow: the syscalls seen, unconditionally when their selecting arguments do not matter;
  - rule:  the syscalls whose selecting arguments took few values, one rule per value;
  - steady_rule: kill rules for what only start-up needed and a compromised device should
    never do again (open files, exec, create processes or sockets, map executable memory).

Only the profile's seccomp section is rewritten; every other byte of the file stays as it
was. The result is checked twice before it is written: its plan must build, and the
device must pass the same exerciser walk under the learned filter, enforcing, with
nothing refused. See docs/seccomp-learning.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import sys
import tempfile
from collections import Counter

import click

from jailer.errors import JailerError, UsageError

EXERCISERS = ("vfio-user", "none")
COMMAND = "command"   # the exerciser --drive stands for: the caller's own driver (a VM, a test client)
LOW32 = 0xFFFFFFFF
PROT_EXEC = 0x4
CLONE_NEW_FLAGS = 0x7E020000 | 0x80       # CLONE_NEWNS..CLONE_NEWNET, CLONE_NEWCGROUP, CLONE_NEWTIME
OPEN_WRITING = 0x243                     # O_WRONLY | O_RDWR | O_CREAT | O_TRUNC: 0 means opening to read
COMMENT_COLUMN = 72                      # comments after longer entries just follow them
MAX_VALUES = 16                          # more distinct values than this: the argument is left free
# syscall -> ((argument index, mask or None), ...): the arguments that select what a call does.
# A mask keeps only the bits that matter (executable memory, new namespaces).
SELECTORS = {
    "ioctl": ((1, None),), "fcntl": ((1, None),), "socket": ((0, None), (1, None)),
    "socketpair": ((0, None), (1, None)), "setsockopt": ((1, None), (2, None)),
    "getsockopt": ((1, None), (2, None)), "prctl": ((0, None),), "arch_prctl": ((0, None),),
    "madvise": ((2, None),), "personality": ((0, None),), "clone": ((0, CLONE_NEW_FLAGS),),
    "mmap": ((2, PROT_EXEC),), "mprotect": ((2, PROT_EXEC),), "pkey_mprotect": ((2, PROT_EXEC),),
    "open": ((1, OPEN_WRITING),), "openat": ((2, OPEN_WRITING),),
}
# Syscalls that give a process new powers: new descriptors from paths or sockets, new
# processes or programs, new names in the file system. Seen only during start-up, they
# are taken away once the device is ready (and so is executable memory, and an ioctl
# request only start-up used, but those of QUERY_IOCTLS).
STEADY_REMOVABLE = frozenset({
    "execve", "execveat", "fork", "vfork", "clone", "clone3", "open", "openat", "openat2", "creat",
    "socket", "socketpair", "bind", "listen", "connect", "memfd_create", "prctl", "unshare", "setns",
    "chdir", "fchdir", "mkdir", "mkdirat", "unlink", "unlinkat", "rename", "renameat", "renameat2",
    "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "chown", "fchown",
    "fchownat", "lchown", "mknod", "mknodat", "ioctl",
})
# ioctl requests that only read or set a descriptor's own flags: taking them away gains
# nothing, while a staged call costs a round trip to the launcher at every start-up
# (Python asks TCGETS of every file it opens, ~80 times before a device is ready).
QUERY_IOCTLS = frozenset({
    0x5401,   # TCGETS
    0x540F,   # TIOCGPGRP
    0x5413,   # TIOCGWINSZ
    0x541B,   # FIONREAD
    0x5421,   # FIONBIO
    0x5450,   # FIONCLEX
    0x5451,   # FIOCLEX
})
EXEC_MAPPING = ("mmap", "mprotect", "pkey_mprotect")
DENY = ("errno", "kill", "kill_thread", "trap")


# --- the trace and the rules it gives ----------------------------------------------------------

def _queries(name, conditions) -> bool:
    """An ioctl whose request condition is one of QUERY_IOCTLS."""
    return name == "ioctl" and any(index == 1 and op == "eq" and value in QUERY_IOCTLS
                                   for index, op, value, *_ in conditions)


class Recorder:
    """The launcher's notification policy while learning: record every syscall, let it run.

    The profile's own deny rules still apply (an errno rule fails its call as it will in
    production); a call a kill rule would kill is let through and reported as a conflict."""

    def __init__(self, seccomp_plan):
        from jailer.layers import seccomp

        self.counts = Counter()          # (name, selector values, stage) -> calls
        self.conflicts = Counter()       # names of syscalls the profile's kill rules would kill
        self.kept = [rule for rule in seccomp_plan.rules if rule.action in DENY]
        self._plan = seccomp_plan
        self._decide = seccomp.decide
        self._narrow = seccomp.KERNEL_32BIT_ARGS

    def decide(self, name, nr, args, stage):
        if self.kept and any(rule.syscall == name for rule in self.kept):
            action, err = self._decide(self._plan, name, args)
            if action == "errno":
                self.counts[(name, ("errno", err), stage)] += 1
                return "errno", err
            if action in DENY:
                self.conflicts[name] += 1
        self.counts[(name, selector_values(name, args, self._narrow), stage)] += 1
        return "continue", None


def selector_values(name, args, narrow=None) -> tuple:
    """The values of `name`'s selecting arguments in one call (masked, 32-bit ones narrowed)."""
    values = []
    for index, mask in SELECTORS.get(name, ()):
        value = args[index]
        if narrow and index in narrow.get(name, ()):
            value &= LOW32
        values.append(value & mask if mask is not None else value)
    return tuple(values)


class Learned:
    """The allowlist a trace gives: allow names, conditional rules, steady rules, with counts."""

    def __init__(self, counts: Counter):
        self.allow = {}          # name -> Counter(stage -> calls)
        self.rules = []          # (name, ((index, op, value, mask), ...), Counter(stage -> calls))
        self.steady = []         # (name, conditions, Counter(stage -> calls))
        self.refused = Counter()     # (name, errno) -> calls answered by the profile's errno rules
        by_name = {}
        for (name, values, stage), calls in counts.items():
            if values and values[0] == "errno":
                self.refused[(name, values[1])] += calls
                continue
            by_name.setdefault(name, Counter())[(values, stage)] += calls
        for name in sorted(by_name):
            self._learn(name, by_name[name])

    def _learn(self, name, calls):
        selectors = list(SELECTORS.get(name, ()))
        tuples = {values for values, _ in calls}
        free = free_selectors(selectors, tuples)
        kept = [i for i in range(len(selectors)) if i not in free]
        grouped = {}
        for (values, stage), n in calls.items():
            grouped.setdefault(tuple(values[i] for i in kept), Counter())[stage] += n
        for key in sorted(grouped):
            conditions = tuple(_condition(selectors[i], value) for i, value in zip(kept, key))
            stages = grouped[key]
            if conditions:
                self.rules.append((name, conditions, stages))
            else:
                self.allow[name] = stages
            if name in STEADY_REMOVABLE and not stages["steady"] and not _queries(name, conditions):
                self.steady.append((name, conditions, stages))
        if name in EXEC_MAPPING:
            executable = Counter()
            for (values, stage), n in calls.items():
                if values[0] & PROT_EXEC:
                    executable[stage] += n
            if executable and not executable["steady"]:
                self.steady.append((name, ((2, "masked_eq", PROT_EXEC, PROT_EXEC),), executable))

    @property
    def names(self) -> list:
        return sorted(set(self.allow) | {name for name, _, _ in self.rules})

    def calls(self) -> int:
        return sum(sum(s.values()) for s in self.allow.values()) + sum(sum(s.values()) for *_, s in self.rules)


def recording_filter(learned: Learned, original):
    """A SeccompPlan for a later learning run: what is learned is allowed in the kernel, every
    other call notifies the recorder (a reported kill). Steady candidates keep notifying, so
    that a steady call to them is seen and they stay allowed."""
    from jailer.plan import ArgCondition, SeccompPlan, SeccompRule

    candidates = {(name, conditions) for name, conditions, _ in learned.steady}
    allowed = [(name, ()) for name in learned.allow] + [(name, conditions) for name, conditions, _ in learned.rules]
    rules = [SeccompRule(name, args=tuple(ArgCondition(index, op, value, mask) for index, op, value, mask in conditions))
             for name, conditions in allowed if (name, conditions) not in candidates]
    kept = [rule for rule in original.rules if rule.action in DENY]
    return SeccompPlan(enabled=True, default_action="kill", rules=tuple(rules) + tuple(kept), report=True)


def free_selectors(selectors, tuples) -> set:
    """Indices of selectors left unconstrained: every masked value seen (the condition would
    allow everything), or too many distinct combinations (the widest selector goes first)."""
    free = set()
    for i, (_, mask) in enumerate(selectors):
        if mask is not None and len({t[i] for t in tuples}) == 1 << bin(mask).count("1"):
            free.add(i)
    while len({tuple(t[i] for i in range(len(selectors)) if i not in free) for t in tuples}) > MAX_VALUES:
        widest = max((i for i in range(len(selectors)) if i not in free), key=lambda i: len({t[i] for t in tuples}))
        free.add(widest)
    return free


def _condition(selector, value) -> tuple:
    index, mask = selector
    return (index, "eq", value, None) if mask is None else (index, "masked_eq", value, mask)


# --- rendering the section -------------------------------------------------------------------

def _value_names() -> dict:
    """(syscall, argument index) -> {value: symbolic name}, for the review comments."""
    import fcntl
    import termios

    def constants(module, prefixes, skip=()):
        table = {}
        for attr in sorted(dir(module)):
            value = getattr(module, attr)
            if attr.startswith(prefixes) and not attr.startswith(skip) and isinstance(value, int):
                table.setdefault(value, attr)
        return table

    families = {int(family): family.name for family in socket.AddressFamily}
    kinds = {int(kind): kind.name for kind in socket.SocketKind}
    kinds.update({kind | socket.SOCK_CLOEXEC: f"{name}|SOCK_CLOEXEC" for kind, name in list(kinds.items())})
    options = constants(socket, ("SO_",), ("SO_J1939",))
    return {
        ("ioctl", 1): constants(termios, ("TC", "TIOC", "FIO")),
        ("fcntl", 1): constants(fcntl, ("F_",), ("F_SEAL", "F_ADD_SEALS", "F_GET_SEALS", "F_OFD", "F_EXLCK",
                                                 "F_SHLCK")),
        ("socket", 0): families, ("socketpair", 0): families, ("socket", 1): kinds, ("socketpair", 1): kinds,
        ("setsockopt", 1): {socket.SOL_SOCKET: "SOL_SOCKET"}, ("getsockopt", 1): {socket.SOL_SOCKET: "SOL_SOCKET"},
        ("setsockopt", 2): options, ("getsockopt", 2): options,
        ("arch_prctl", 0): {0x1001: "ARCH_SET_GS", 0x1002: "ARCH_SET_FS", 0x1003: "ARCH_GET_FS",
                            0x1004: "ARCH_GET_GS", 0x3001: "ARCH_CET_STATUS"},
        ("prctl", 0): {1: "PR_SET_PDEATHSIG", 15: "PR_SET_NAME", 16: "PR_GET_NAME", 22: "PR_SET_SECCOMP",
                       23: "PR_CAPBSET_READ", 38: "PR_SET_NO_NEW_PRIVS", 39: "PR_GET_NO_NEW_PRIVS"},
    }


def _describe(name, conditions, names) -> str:
    parts = []
    for index, op, value, mask in conditions:
        if op == "masked_eq" and mask == PROT_EXEC:
            parts.append("executable" if value else "not executable")
        elif op == "masked_eq" and mask == OPEN_WRITING:
            parts.append("for writing" if value else "read-only")
        elif op == "masked_eq" and mask == CLONE_NEW_FLAGS:
            parts.append("new namespaces" if value else "no new namespaces")
        elif value in names.get((name, index), {}):
            parts.append(names[(name, index)][value])
    return " ".join(parts)


def _stages(stages: Counter) -> str:
    return " + ".join(f"{stages[s]} {s}" for s in ("setup", "steady") if stages[s])


def _hex(value: int) -> str:
    return f"0x{value:X}" if value > 9 else str(value)


def _inline_rule(name, conditions, action=None, errno=None) -> str:
    fields = [f'syscall = "{name}"']
    if action:
        fields.append(f'action = "{action}"')
    if errno is not None:
        import errno as errnos

        fields.append(f'errno = "{errnos.errorcode[errno]}"' if errno in errnos.errorcode else f"errno = {errno}")
    if conditions:
        args = []
        for index, op, value, mask in conditions:
            text = f'index = {index}, op = "{op}", '
            if mask is not None:
                text += f"mask = 0x{mask:X}, "
            args.append("{ " + text + f"value = {_hex(value)} }}")
        fields.append("args = [" + ", ".join(args) + "]")
    return "{ " + ", ".join(fields) + " }"


def _aligned(entries) -> list:
    """'    entry,   # comment' lines with the comments in one column (long entries excepted)."""
    width = min(max((len(entry) for entry, _ in entries), default=0) + 1, COMMENT_COLUMN)
    return [f"    {(entry + ','):<{width}}  # {comment}" if comment else f"    {entry}," for entry, comment in entries]


_KEPT_LINE = re.compile(r'^\s*"([A-Za-z0-9_]+)",?\s*#\s*(keep:.*?)\s*$', re.MULTILINE)


def kept_by_review(section_text: str) -> dict:
    """name -> comment of the allow entries a reviewer marked `# keep: why` (they survive re-learning)."""
    return {match.group(1): match.group(2) for match in _KEPT_LINE.finditer(section_text)}


REVIEWED_STEADY_KEYS = ("steady_deny", "steady_action", "steady_errno")


def reviewed_steady(section_text: str) -> dict:
    """The steady_deny/steady_action/steady_errno a reviewer wrote: a policy decision (e.g.
    "no file is opened once the device serves") that a recording cannot make, so it is kept."""
    import toml

    seccomp = toml.loads(section_text).get("seccomp", {}) if section_text else {}
    return {key: seccomp[key] for key in REVIEWED_STEADY_KEYS if key in seccomp}


def render_section(learned: Learned, original, exerciser: str, kept_rules=(), runs: int = 1, kept_names=None,
                   kept_steady=None) -> str:
    """The new [seccomp] section: sorted, one syscall (or rule) per line, each with its counts.
    `kept_names` (name -> "keep: why") are allowed too, with the reviewer's comment;
    `kept_steady` (see reviewed_steady) is written back as it was."""
    names = _value_names()
    default = original.default_action if original.default_action in DENY else "kill"
    lines = ["[seccomp]",
             f"# Learned by `jailer learn {'--drive COMMAND' if exerciser == COMMAND else '--exerciser ' + exerciser}`"
             f" from {learned.calls()} calls of "
             f"{len(learned.names)} syscalls, then reviewed.",
             *((f"# Counts are calls recorded in {runs} learning runs (the first records every call, later ones",
                '# only what was new): "setup" before the program was ready, "steady" after. Re-learn when',
                "# the device, its Python or its libraries change; see docs/seccomp-learning.md.") if runs > 1 else
               ('# Counts are calls recorded in the learning run: "setup" before the program was ready,',
                '# "steady" after. Re-learn when the device, its Python or its libraries change; see',
                "# docs/seccomp-learning.md.")),
             f'default_action = "{default}"']
    if default == "errno" and original.default_errno is not None:
        lines.append(f"default_errno = {original.default_errno}")
    if not original.report:
        lines.append("report = false")
    lines.append("allow = [")
    ruled = {name for name, _, _ in learned.rules}
    entries = {name: _stages(stages) for name, stages in learned.allow.items()}
    entries.update({name: why for name, why in (kept_names or {}).items() if name not in entries and name not in ruled})
    lines += _aligned([(f'"{name}"', comment) for name, comment in sorted(entries.items())])
    lines.append("]")
    rules = [(_inline_rule(name, conditions), "; ".join(filter(None, [_describe(name, conditions, names),
                                                                       _stages(stages)])))
             for name, conditions, stages in learned.rules]
    refused = {(name, err): n for (name, err), n in learned.refused.items()}
    for rule in kept_rules:
        conditions = tuple((c.index, c.op, c.value, c.mask) for c in rule.args)
        calls = sum(n for (name, _), n in refused.items() if name == rule.syscall)
        note = f"kept from the profile; refused {calls} calls" if calls else "kept from the profile"
        rules.append((_inline_rule(rule.syscall, conditions, rule.action,
                                   rule.errno if rule.action == "errno" else None), note))
    if rules:
        lines.append("rule = [")
        lines += _aligned(sorted(rules))
        lines.append("]")
    if kept_steady:
        lines.append("# Written by a reviewer, kept by jailer learn: refused once the program is ready.")
        lines += [f"{key} = {json.dumps(kept_steady[key])}" for key in REVIEWED_STEADY_KEYS if key in kept_steady]
    denied = set((kept_steady or {}).get("steady_deny", ()))
    steady = [entry for entry in sorted(learned.steady) if entry[0] not in denied]
    if steady and staging_supported():
        lines.append("# Taken away once the program is ready (killed): only start-up needed them.")
        lines.append("steady_rule = [")
        lines += _aligned([(_inline_rule(name, conditions), "; ".join(filter(None, [
            _describe(name, conditions, names), "only " + _stages(stages)])))
            for name, conditions, stages in steady])
        lines.append("]")
    return "\n".join(lines) + "\n"


def staging_supported() -> bool:
    """Whether this jailer's profile reader knows seccomp.steady_rule (staged rules)."""
    from jailer import profile

    return "steady_rule" in profile.SECCOMP_KEYS


# --- rewriting only the seccomp section of a TOML file ----------------------------------------

_HEADER = re.compile(r"\s*\[\[?\s*(.*?)\s*\]\]?\s*(#.*)?$")


def _headers(text: str) -> list:
    """(offset of the line, table key) of every table header, skipping strings and arrays."""
    headers = []
    depth = 0
    quote = None                 # '"""', "'''" while inside a multi-line string
    offset = 0
    for line in text.splitlines(keepends=True):
        if quote is None and depth == 0:
            match = _HEADER.match(line)
            if match and line.lstrip().startswith("["):
                key = ".".join(part.strip().strip("\"'") for part in match.group(1).split("."))
                headers.append((offset, key))
                offset += len(line)
                continue
        i = 0
        while i < len(line):
            if quote is not None:
                end = line.find(quote, i)
                if end < 0:
                    break
                i, quote = end + 3, None
                continue
            char = line[i]
            if char == "#":
                break
            if line.startswith('"""', i) or line.startswith("'''", i):
                quote = line[i:i + 3]
                i += 3
                continue
            if char in "\"'":
                i += 1
                while i < len(line) and line[i] != char:
                    i += 2 if char == '"' and line[i] == "\\" else 1
            elif char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
            i += 1
        offset += len(line)
    return headers


def _attached_start(text: str, offset: int) -> int:
    """Where the comment lines directly above a header (no blank line between) begin."""
    start = offset
    while start > 0:
        previous = text.rfind("\n", 0, start - 1) + 1
        if not text[previous:start].lstrip().startswith("#"):
            break
        start = previous
    return start


def _seccomp_spans(text: str) -> list:
    """(start, end) offsets of the [seccomp] and [[seccomp.*]] tables, with the comments directly
    above the later ones (those above [seccomp] itself stay with the file)."""
    headers = _headers(text)
    spans = []
    for position, (offset, key) in enumerate(headers):
        if key != "seccomp" and not key.startswith("seccomp."):
            continue
        start = offset if not spans else _attached_start(text, offset)
        end = _attached_start(text, headers[position + 1][0]) if position + 1 < len(headers) else len(text)
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def seccomp_section_text(text: str) -> str:
    return "".join(text[start:end] for start, end in _seccomp_spans(text))


def replace_seccomp_section(text: str, section: str, path: str = "profile") -> str:
    """`text` with its [seccomp] table (and [[seccomp.*]] tables) replaced by `section`."""
    import toml

    spans = _seccomp_spans(text)
    if not spans:
        if "seccomp" in toml.loads(text):
            raise UsageError(f"{path}: the seccomp settings are not written as a [seccomp] table; "
                             "write them as one so that jailer learn can replace it")
        separator = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return text + separator + section
    result = []
    cursor = 0
    for index, (start, end) in enumerate(spans):
        result.append(text[cursor:start])
        if index == 0:
            result.append(section + ("\n" if end < len(text) else ""))
        cursor = end
    result.append(text[cursor:])
    return "".join(result)


# --- running the program ---------------------------------------------------------------------

SCRATCH_FILE_SIZE = 16 << 20


class _Sockets:
    """Listening sockets learn creates for the profile's unix-listener fds, and the paths where
    the launcher makes the program's own sockets ([[sockets]]) reachable, in a private directory;
    and a scratch file (16 MiB, sparse) for each file fd the caller must name (a disk image)."""

    def __init__(self, plan):
        self.directory = tempfile.mkdtemp(prefix="jailer-learn-")
        self.fds = {}
        self.paths = {}
        self.scratch = []
        self.program = {spec.name: os.path.join(self.directory, f"{spec.name}.sock") for spec in plan.sockets}
        self.paths.update(self.program)
        for spec in plan.fds:
            if spec.kind == "unix-listener":
                path = os.path.join(self.directory, f"{spec.name}.sock")
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sock.bind(path)
                sock.listen(16)
                self.fds[spec.name] = sock.detach()
                self.paths[spec.name] = path
            elif spec.required and spec.kind == "file" and not spec.path:
                path = os.path.join(self.directory, f"{spec.name}.img")
                flags = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}[spec.mode]
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                os.truncate(path, SCRATCH_FILE_SIZE)
                self.fds[spec.name] = fd
                self.scratch.append(path)
            elif spec.required and spec.kind == "unix-stream":
                self.close()
                raise UsageError(f"fd '{spec.name}' is a {spec.kind} the caller must pass: jailer learn only "
                                 "drives devices that listen (unix-listener fds)")

    def close_fds(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def close(self):
        self.close_fds()
        for path in [*self.paths.values(), *self.scratch]:
            try:
                os.unlink(path)
            except OSError:
                pass
        os.rmdir(self.directory)


def _roles(plan, names) -> tuple:
    """(vfio-user socket fd name, control socket fd name or None): the one whose placeholder
    sits in a --control option is the control socket."""
    control = None
    for arg in plan.program.argv:
        for name in re.findall(r"\{fd:([^}]*)\}", arg):
            if name in names and "control" in arg:
                control = name
    device = [name for name in names if name != control]
    if len(device) != 1:
        raise UsageError(f"{plan.source}: the vfio-user exerciser needs exactly one socket for the device: a "
                         "unix-listener fd or a [[sockets]] entry (and at most one more fd passed as "
                         "--control-fd={fd:NAME}); the profile has " + (", ".join(sorted(names)) or "none")
                         + " (use --exerciser none for other programs)")
    return device[0], control


class _LauncherRun:
    """One run of the plan's program in a forked launcher: its status stream and its answer.

    The launcher runs in a child process (it owns signal handlers and forks the sandbox);
    the child sends back its exit code, what the policy recorded and any error, marshalled."""

    def __init__(self, plan, given_fds, policy, route_all, program_sockets=None):
        result_r, result_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        self.pid = os.fork()
        if self.pid == 0:
            os.close(result_r)
            os.close(status_r)
            _launcher_child(plan, given_fds, policy, route_all, status_w, result_w, program_sockets)
        os.close(result_w)
        os.close(status_w)
        self.pipes = {result_r: bytearray(), status_r: bytearray()}
        self.result_fd, self.status_fd = result_r, status_r
        self.ended = set()          # pipes the child closed
        self.answer = None

    def _pump(self, timeout) -> bool:
        """Read what the pipes hold (waiting up to `timeout`); True once the answer is complete."""
        import select

        waiting = [fd for fd in self.pipes if fd not in self.ended]
        for fd in select.select(waiting, [], [], timeout)[0] if waiting else ():
            chunk = os.read(fd, 1 << 20)
            if chunk:
                self.pipes[fd].extend(chunk)
            else:
                self.ended.add(fd)
        return self.result_fd in self.ended

    def alive(self) -> bool:
        if self.answer is None and self._pump(0):
            self._reap()
        return self.answer is None

    def wait(self) -> int:
        while self.answer is None:
            if self._pump(None):
                self._reap()
        return self.answer[0]

    def terminate(self) -> int:
        if self.answer is None:
            os.kill(self.pid, signal.SIGTERM)   # not reaped yet, so the pid is still the child's
        return self.wait()

    def _reap(self):
        import marshal

        os.waitpid(self.pid, 0)
        try:
            self.answer = marshal.loads(bytes(self.pipes[self.result_fd]))
        except (EOFError, ValueError, TypeError):
            self.answer = (1, None, ("JailerError", "the learning run ended without an answer", 1))

    def events(self) -> list:
        while self.status_fd not in self.ended:
            self._pump(None)
        events = []
        for line in bytes(self.pipes[self.status_fd]).splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def close(self):
        """Stop the child if it still runs (an error on our side), then release the pipes."""
        if self.answer is None:
            os.kill(self.pid, signal.SIGKILL)   # the sandbox dies with its launcher (die_with_parent)
            os.waitpid(self.pid, 0)
            self.answer = (1, None, None)
        for fd in (self.result_fd, self.status_fd):
            os.close(fd)


def run_sandboxed(plan, exerciser: str, policy=None, route_all: bool = False, timeout: float = 10.0,
                  drive: str | None = None):
    """Run the plan's program in a forked launcher while the exerciser drives it (the
    vfio-user walk, or with exerciser COMMAND the shell command `drive`).

    Returns (exit code, exercise report or None, status events, policy). The policy comes
    back from the launcher's process (marshalled), so what it recorded is visible here."""
    sockets = _Sockets(plan)
    run = None
    try:
        roles = _roles(plan, sockets.paths) if exerciser in ("vfio-user", COMMAND) else None
        run = _LauncherRun(plan, sockets.fds, policy, route_all, sockets.program)
        sockets.close_fds()
        report = None
        if exerciser == COMMAND:
            report = _drive(drive, sockets.paths[roles[0]], run, timeout)
        elif roles is not None:
            from devices.vfio_user.exerciser import exercise

            device, control = roles
            # the learning walk: every path the device offers, any answer the spec allows (the
            # project's own devices are held to their exact behaviour by their own tests)
            report = exercise(sockets.paths[device], sockets.paths.get(control), terminate=run.terminate,
                              alive=run.alive, timeout=timeout, strict=False)
        else:   # the program runs until it exits; SIGINT/SIGTERM to jailer learn end it
            stopped = []

            def stop(signum, frame):
                stopped.append(signal.Signals(signum).name)
                os.kill(run.pid, signal.SIGTERM)
            forward = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                run.wait()
            finally:
                for sig, handler in forward.items():
                    signal.signal(sig, handler)
            if stopped:   # someone drove it meanwhile, by hand or with a VM: a re-run cannot do the same
                from devices.vfio_user.exerciser import ExerciseReport, Step

                report = ExerciseReport()
                report.steps.append(Step(f"stopped by {stopped[0]}", True))
        code = run.wait()
        events = run.events()
        _, recorded, error = run.answer
        if error:
            _kind, message, exit_code = error
            failure = JailerError(message)
            failure.exit_code = exit_code
            raise failure
        if recorded is not None:
            policy.counts, policy.conflicts = Counter(recorded[0]), Counter(recorded[1])
        return code, report, events, policy
    finally:
        if run is not None:
            run.close()
        sockets.close()


def _drive(command: str, socket_path: str, run, timeout: float):
    """Run the caller's driver once the device's socket is served ($JAILER_SOCKET names it),
    then stop the device (SIGTERM): a report of one step, the command, and the stop."""
    import subprocess
    import time

    from devices.vfio_user.exerciser import ExerciseReport, Step

    report = ExerciseReport()
    deadline = time.monotonic() + timeout
    while not os.path.exists(socket_path):
        if not run.alive() or time.monotonic() > deadline:
            report.steps.append(Step("command", False, f"the device did not serve {socket_path}"))
            report.exit_status = run.terminate()
            return report
        time.sleep(0.01)
    started = time.monotonic()
    done = subprocess.run(["/bin/sh", "-c", command], env={**os.environ, "JAILER_SOCKET": socket_path},
                          stdin=subprocess.DEVNULL)
    report.steps.append(Step("command", done.returncode == 0, f"exit status {done.returncode}",
                             round(time.monotonic() - started, 4)))
    report.exit_status = run.terminate()
    return report


def _launcher_child(plan, given_fds, policy, route_all, status_fd, result_fd, program_sockets=None):
    """In the forked child: run the launcher, send back (exit code, recorded trace, error)."""
    import marshal

    code, recorded, error = 1, None, None
    try:
        from jailer.launch import launcher

        learning = {"notification_policy": policy, "route_all_to_notify": route_all} if policy is not None else {}
        options = launcher.Options(given_fds=given_fds, status_fd=status_fd, sockets=program_sockets, **learning)
        code = launcher.run(plan, options)
        if policy is not None:
            recorded = (dict(policy.counts), dict(policy.conflicts))
    except JailerError as exc:
        error = (type(exc).__name__, str(exc), exc.exit_code)
    except BaseException as exc:   # never unwind into the parent's code
        error = ("JailerError", f"the learning run failed: {type(exc).__name__}: {exc}", 1)
    try:
        data = marshal.dumps((code, recorded, error))
        view = memoryview(data)
        while view:
            view = view[os.write(result_fd, view):]
    finally:
        os._exit(0)


# --- the command -------------------------------------------------------------------------------

def learn(profile: str, exerciser: str = "vfio-user", timeout: float = 10.0, runs: int = 3,
          drive: str | None = None) -> dict:
    """Learn the profile's allowlist from `runs` recording runs (their union: a path a race
    takes only sometimes, like a signal arriving while the loop sleeps, needs more than one);
    returns a summary with the new profile text in "profile_text"."""
    from jailer.profile import build_plan

    plan = build_plan(profile, euid=os.geteuid())
    with open(profile, encoding="utf-8") as f:
        original = f.read()
    counts, conflicts, learning_runs, passed, codes = Counter(), Counter(), [], None, set()
    for number in range(runs):
        # The first run records every syscall; later ones run at full speed under what is learned
        # so far and record only the rest (timing-dependent paths then take their production odds).
        recording = plan if number == 0 else dataclasses.replace(plan, seccomp=recording_filter(Learned(counts),
                                                                                                plan.seccomp))
        code, report, _events, recorder = run_sandboxed(recording, exerciser, Recorder(plan.seccomp),
                                                        route_all=number == 0, timeout=timeout, drive=drive)
        if report is not None and not any(s.ok for s in report.steps):
            raise JailerError(f"{profile}: the device did not answer the exerciser while learning "
                              f"({report.failures[0].name}: {report.failures[0].detail})")
        counts.update(recorder.counts)
        conflicts.update(recorder.conflicts)
        steps = {s.name for s in report.steps if s.ok} if report is not None else set()
        passed = steps if passed is None else passed & steps
        codes.add(code)
        learning_runs.append({"exit": code, "exerciser": report.to_dict() if report else None})
    if conflicts:
        raise JailerError(f"{profile}: the program called {sorted(conflicts)[0]}, which a kill rule of the profile "
                          "forbids: remove that rule, or fix the program")
    if len(codes) > 1:
        raise JailerError(f"{profile}: the program's exit status differs from run to run ({sorted(codes)}): "
                          "learning needs a program that ends the same way each time")
    learned = Learned(counts)
    if not learned.names:
        raise JailerError(f"{profile}: no syscall was recorded (is seccomp reporting available here?)")
    section_text = seccomp_section_text(original)
    section = render_section(learned, plan.seccomp, exerciser, Recorder(plan.seccomp).kept, runs,
                             kept_by_review(section_text), reviewed_steady(section_text))
    text = replace_seccomp_section(original, section, profile)
    if exerciser == "none" and any(run["exerciser"] for run in learning_runs):
        # it ran until stopped, driven meanwhile by hand or by a VM: nothing can do that the same
        # way again, so the profile is written unvalidated and says so, rather than faked
        validation = {"skipped": "the program ran until stopped (--exerciser none): run it under the learned "
                                 "profile with its driver to check it"}
    else:
        validation = validate(text, profile, exerciser, passed, codes.pop(), timeout, drive)
    return {"profile_text": text, "syscalls": learned.names, "calls": learned.calls(),
            "rules": len(learned.rules), "steady": [name for name, _, _ in learned.steady],
            "learning_runs": learning_runs, "validation": validation}


def validate(text: str, profile: str, exerciser: str, passed: set, code: int, timeout: float,
             drive: str | None = None) -> dict:
    """Build the learned profile's plan and run the device under it, enforcing: nothing may be
    refused, and every exerciser step that passed while learning must pass again."""
    from jailer.profile import build_plan

    directory = tempfile.mkdtemp(prefix="jailer-learned-")
    path = os.path.join(directory, os.path.basename(profile))
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        plan = build_plan(path, euid=os.geteuid())
        exit_code, report, events, _ = run_sandboxed(plan, exerciser, timeout=timeout, drive=drive)
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(directory)
    refused = [e for e in events if e.get("event") == "seccomp"]
    if refused:
        first = refused[0]
        raise JailerError(f"{profile}: the learned profile refused {first.get('syscall')} "
                          f"({first.get('action')}, stage {first.get('stage', '?')}) when re-run: a path the "
                          "learning runs did not take; learn again with more --runs, or extend the exerciser")
    if report is not None:
        lost = sorted(passed - {s.name for s in report.steps if s.ok})
        if lost:
            failed = {s.name: s.detail for s in report.failures}
            raise JailerError(f"{profile}: under the learned profile the exerciser step '{lost[0]}' fails "
                              f"({failed.get(lost[0], 'not reached')})")
    if exit_code != code:
        raise JailerError(f"{profile}: under the learned profile the program exits with {exit_code}, "
                          f"while learning it exited with {code}")
    return {"exit": exit_code, "refused": 0, "steps_passed": len([s for s in report.steps if s.ok]) if report else None}


@click.command("learn")
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write the learned profile to FILE.")
@click.option("--in-place", is_flag=True, help="Rewrite PROFILE's [seccomp] section in place.")
@click.option("--exerciser", type=click.Choice(EXERCISERS), default="vfio-user", show_default=True,
              help="What drives the program while learning: the vfio-user walk, or nothing (the program runs "
                   "until it exits or jailer learn gets SIGINT/SIGTERM; what it recorded is written, "
                   "not validated).")
@click.option("--drive", metavar="COMMAND",
              help="Drive the device with your own shell COMMAND instead of the walk (a VM booted against "
                   "$JAILER_SOCKET, a test client), once per run and again to validate; the device is stopped "
                   "when it exits, which must be with status 0.")
@click.option("--timeout", type=click.FloatRange(0.5, 600), default=10.0, show_default=True,
              help="Seconds the exerciser waits for each reply.")
@click.option("--runs", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Recording runs whose union is learned (racy paths need more than one).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of the profile.")
def learn_command(profile, output, in_place, exerciser, timeout, runs, as_json, drive):
    """Learn a minimal seccomp allowlist for PROFILE's program and write it into the profile.

    The program runs in the profile's sandbox with every syscall recorded while the
    exerciser drives it; the learned [seccomp] section replaces the old one (the rest of
    the file is kept byte for byte) once the device passes the same walk under it. Without
    --output or --in-place the new profile is printed."""
    if output and in_place:
        raise UsageError("give --output FILE or --in-place, not both")
    if not os.path.isfile(profile):
        raise UsageError(f"{profile}: no such profile file")
    if drive is not None:
        if exerciser == "none":
            raise UsageError("give --drive COMMAND or --exerciser none, not both")
        exerciser = COMMAND
    summary = learn(profile, exerciser, timeout, runs, drive)
    text = summary.pop("profile_text")
    target = profile if in_place else output
    if target:
        from jailer.host import paths

        umask = os.umask(0o022)
        os.umask(umask)
        try:
            paths.write_file(target, text.encode(), 0o666 & ~umask, keep_mode=True).close()
        except OSError as exc:
            raise JailerError(f"cannot write {target}: {exc.strerror}") from None
        summary["written"] = target
    if as_json:
        if not target:
            summary["profile"] = text
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    elif target:
        checked = summary["validation"].get("skipped") or "validated: nothing refused under the learned filter"
        click.echo(f"jailer learn: {len(summary['syscalls'])} syscalls ({summary['rules']} conditional rules, "
                   f"{len(summary['steady'])} taken away once ready) written to {target}; {checked}", err=True)
    else:
        sys.stdout.write(text)
