"""The only place jailer calls the kernel (and the C library) through ctypes.

Python 3.11 has no os.unshare and no wrappers for pivot_root, mount_setattr, seccomp,
Landlock, pidfd_getfd or capabilities, so each is a thin function here that raises
OSError(errno) like the os module does; the rest of the engine goes through them.

The calls go through ctypes' own C module, _ctypes, with the few C types they need defined
here: `import ctypes` runs a module body that builds some forty types and loads libc twice,
1.3 ms against 0.4 on the start-up chain of every sandbox (the zero-exec preloader is
cloned with these calls, so the program's start waits for them).
"""

from __future__ import annotations

import _ctypes
import fcntl
import os
import struct
import _signal as signal   # the C module: `signal` imports enum, ~6 ms on the start-up path

from _ctypes import POINTER, Structure, byref, get_errno, sizeof


# The C types of these calls, by ctypes' type codes (what ctypes.c_int and the rest are).
c_int, c_uint, c_long, c_ulong, c_uint8, c_uint16, c_uint64, c_char, c_char_p, c_void_p, _PyObject = (
    type(name, (_ctypes._SimpleCData,), {"_type_": code}) for name, code in (
        ("c_int", "i"), ("c_uint", "I"), ("c_long", "l"), ("c_ulong", "L"), ("c_uint8", "B"), ("c_uint16", "H"),
        ("c_uint64", "Q"), ("c_char", "c"), ("c_char_p", "z"), ("c_void_p", "P"), ("_PyObject", "O")))
c_int32, c_uint32, c_size_t = c_int, c_uint, c_ulong


class _CFunction(_ctypes.CFuncPtr):
    """A C library function: int result, errno kept for get_errno(), the GIL released."""
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = c_int


class _CFunctionHoldingGil(_CFunction):
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO | _ctypes.FUNCFLAG_PYTHONAPI


class _Library:
    """A loaded library's functions by attribute, as ctypes.CDLL gives them."""

    def __init__(self, name: str | None, function_type=_CFunction):
        self._handle = _ctypes.dlopen(name, os.RTLD_NOW)
        self._function_type = function_type

    def __getattr__(self, name: str):
        function = self._function_type(_ctypes.dlsym(self._handle, name))
        setattr(self, name, function)
        return function


_libc = _Library("libc.so.6")
_libc.syscall.restype = c_long
# This process's own symbols, CPython's C API and the C library's alike, called holding the
# GIL: the C API needs it, and clone must not release it around the fork.
_holding_gil = _Library(None, _CFunctionHoldingGil)
_holding_gil.syscall.restype = c_long
_MACHINE = os.uname().machine

# Syscall numbers that differ between the architectures jailer supports; 424 and up are shared.
_NUMBERS = {
    "x86_64": {"pivot_root": 155, "seccomp": 317, "capget": 125, "capset": 126, "unshare": 272, "clone": 56,
               "brk": 12},
    "aarch64": {"pivot_root": 41, "seccomp": 277, "capget": 90, "capset": 91, "unshare": 97, "clone": 220,
                "brk": 214},
}
_COMMON = {"close_range": 436, "pidfd_getfd": 438,
           "mount_setattr": 442, "landlock_create_ruleset": 444, "landlock_add_rule": 445,
           "landlock_restrict_self": 446}
if _MACHINE not in _NUMBERS:
    raise ImportError(f"jailer supports x86_64 and aarch64, not {_MACHINE}")
NR = {**_NUMBERS[_MACHINE], **_COMMON}

# clone(2) namespace flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

# mount_setattr(2)
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
PR_SET_MM = 35
PR_SET_MM_MAP = 14
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_CLEAR_ALL = 4

# seccomp(2)
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1

# Landlock
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1


def _check(result):
    if result == -1:
        err = get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _syscall(name, *args):
    return _check(_libc.syscall(NR[name], *args))


def _path(path):
    return None if path is None else os.fsencode(path)


def clone_process(flags: int) -> int:
    """fork() straight into new namespaces: clone(2) with `flags` (CLONE_NEWUSER, CLONE_NEWPID...)
    and no new stack, wrapped in CPython's own before/after-fork steps as os.fork does; returns
    0 in the child and the child's pid in the parent. With CLONE_NEWPID the child is the new
    namespace's pid 1, which unshare() cannot make the calling process."""
    api = _holding_gil
    api.PyOS_BeforeFork()
    result = api.syscall(c_long(NR["clone"]), c_ulong(flags | signal.SIGCHLD),
                                       None, None, None, None)
    if result == 0:
        api.PyOS_AfterFork_Child()
        return 0
    error = get_errno()
    api.PyOS_AfterFork_Parent()
    if result == -1:
        raise OSError(error, os.strerror(error))
    return result


RLIM_INFINITY = 2**64 - 1


class _Rlimit(Structure):   # struct rlimit (64-bit rlim_t on every architecture jailer supports)
    _fields_ = [("soft", c_uint64), ("hard", c_uint64)]


def setrlimit(resource: int, soft: int, hard: int) -> None:
    """prlimit(2) on this process: what resource.setrlimit does, without loading that C
    module on the sandbox's start-up path."""
    _check(_libc.prlimit(c_int(0), c_int(resource), byref(_Rlimit(soft, hard)), None))


def current_cpu() -> int:
    """The CPU this thread runs on now (sched_getcpu(3)); -1 when unknown."""
    return _libc.sched_getcpu()


def unshare(flags: int) -> None:
    _syscall("unshare", c_int(flags))


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(c_int(fd), c_int(nstype)))


def mount(source, target, fstype, flags=0, data=None) -> None:
    _check(_libc.mount(_path(source), _path(target), _path(fstype), c_ulong(flags), _path(data)))


def umount2(target, flags=0) -> None:
    _check(_libc.umount2(_path(target), c_int(flags)))


def pivot_root(new_root, put_old) -> None:
    _syscall("pivot_root", _path(new_root), _path(put_old))


class _MountAttr(Structure):
    _fields_ = [("attr_set", c_uint64), ("attr_clr", c_uint64),
                ("propagation", c_uint64), ("userns_fd", c_uint64)]


def mount_setattr(path, attr_set: int, recursive: bool) -> None:
    """Set mount attributes (never clears any): the kernel keeps locked flags as they are."""
    attr = _MountAttr(attr_set, 0, 0, 0)
    _syscall("mount_setattr", c_int(AT_FDCWD), _path(path),
             c_uint(AT_RECURSIVE if recursive else 0), byref(attr), c_size_t(sizeof(attr)))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(c_int(option), c_ulong(arg2), c_ulong(arg3),
                              c_ulong(arg4), c_ulong(arg5)))


def set_process_name(name: bytes) -> None:
    """The task's comm (what ps and /proc/PID/comm show), at most 15 bytes."""
    _check(_libc.prctl(c_int(PR_SET_NAME), c_char_p(name[:15]), c_ulong(0),
                       c_ulong(0), c_ulong(0)))


class _MmMap(Structure):   # struct prctl_mm_map
    _fields_ = [*((name, c_uint64) for name in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
        "arg_start", "arg_end", "env_start", "env_end", "auxv")),
        ("auxv_size", c_uint32), ("exe_fd", c_int32)]


def set_mm_map(**layout: int) -> None:
    """Point the kernel's view of this process's memory layout (what /proc/PID/cmdline, environ
    and stat read) at new addresses, auxv and exe link unchanged; needs no capability."""
    fields = _MmMap(**layout, auxv=0, auxv_size=0, exe_fd=-1)
    _check(_libc.prctl(c_int(PR_SET_MM), c_ulong(PR_SET_MM_MAP), byref(fields),
                       c_ulong(sizeof(fields)), c_ulong(0)))


def program_break() -> int:
    """The current end of the heap (brk(0) returns it and changes nothing)."""
    return _libc.syscall(c_long(NR["brk"]), c_ulong(0))


_libc.mmap.restype = c_void_p
_libc.mmap.argtypes = [c_void_p, c_size_t, c_int, c_int, c_int, c_long]
_MAP_FAILED = c_void_p(-1).value


def map_anonymous(size: int) -> int:
    """A private read-write mapping of `size` zeroed bytes; its address."""
    address = _libc.mmap(None, size, 0x1 | 0x2, 0x02 | 0x20, -1, 0)   # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    if address == _MAP_FAILED:
        err = get_errno()
        raise OSError(err, os.strerror(err))
    return address


_libc.memmove.argtypes = (c_void_p, c_char_p, c_size_t)
_libc.memset.argtypes = (c_void_p, c_int, c_size_t)


def write_memory(address: int, data: bytes) -> None:
    """Copy `data` to `address` in this process (a mapping of its own it knows to be writable)."""
    _libc.memmove(address, data, len(data))


def zero_memory(address: int, size: int) -> None:
    _libc.memset(address, 0, size)


def store_frame_locals(frame) -> None:
    """Write a frame's f_locals back into its fast locals, clearing those deleted there
    (PyFrame_LocalsToFast with clear=1): how a caller's variables can be dropped in 3.11-3.12
    (looked up when first called: later Pythons have no such function)."""
    function = _holding_gil.PyFrame_LocalsToFast
    function.argtypes = (_PyObject, c_int)
    function(frame, 1)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, c_size_t(len(raw))))


# renameat2(2)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old_dirfd: int, old_name: str, new_dirfd: int, new_name: str, flags: int) -> None:
    _check(_libc.renameat2(c_int(old_dirfd), _path(old_name), c_int(new_dirfd), _path(new_name),
                           c_uint(flags)))


def setfsuid(uid: int) -> None:
    _libc.setfsuid(c_uint(uid))


def setfsgid(gid: int) -> None:
    _libc.setfsgid(c_uint(gid))


class _CapHeader(Structure):
    _fields_ = [("version", c_uint32), ("pid", c_int)]


class _CapData(Structure):
    _fields_ = [("effective", c_uint32), ("permitted", c_uint32), ("inheritable", c_uint32)]


_CAPABILITY_VERSION_3 = 0x20080522


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this thread as 64-bit masks."""
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _syscall("capget", byref(header), data)
    return tuple(getattr(data[0], f) | getattr(data[1], f) << 32 for f in ("effective", "permitted", "inheritable"))


def capset_clear() -> None:
    """Empty the effective, permitted and inheritable sets of this thread."""
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _syscall("capset", byref(header), data)


class _SockFilter(Structure):
    _fields_ = [("code", c_uint16), ("jt", c_uint8), ("jf", c_uint8), ("k", c_uint32)]


class _SockFprog(Structure):
    _fields_ = [("len", c_uint16), ("filter", POINTER(_SockFilter))]


def seccomp_load(bpf: bytes, new_listener: bool) -> int:
    """Install a classic BPF program; returns the notification listener fd (or 0 without one)."""
    count = len(bpf) // sizeof(_SockFilter)
    program = (_SockFilter * count).from_buffer_copy(bpf)
    fprog = _SockFprog(count, program)
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER if new_listener else 0
    return _syscall("seccomp", c_uint(SECCOMP_SET_MODE_FILTER), c_uint(flags), byref(fprog))


# The notification path runs once per routed syscall of the program (hundreds during a
# Python program's start-up), so it uses fcntl.ioctl on preallocated buffers, not ctypes.
_NOTIF = struct.Struct("=QII iIQ 6Q")        # struct seccomp_notif (with its seccomp_data)
_NOTIF_RESP = struct.Struct("=QqiI")         # struct seccomp_notif_resp
_NOTIF_ID = struct.Struct("=Q")
_ZEROED_NOTIF = bytes(_NOTIF.size)


class SeccompNotif:
    """One notified syscall: the cookie to answer it with, the caller's pid (as the
    listener's pid namespace sees it), the syscall number and its six argument registers."""

    __slots__ = ("id", "pid", "nr", "args")

    def __init__(self, raw):
        self.id, self.pid, _, self.nr, _, _, *args = _NOTIF.unpack(raw)
        self.args = tuple(args)


def seccomp_notif_recv(listener: int) -> SeccompNotif:
    buffer = bytearray(_ZEROED_NOTIF)   # the kernel refuses a buffer that is not zeroed
    fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, buffer, True)
    return SeccompNotif(buffer)


def seccomp_notif_id_valid(listener: int, notif_id: int) -> bool:
    """True while the notifying task is still blocked in that very syscall."""
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, _NOTIF_ID.pack(notif_id))
    except OSError:
        return False
    return True


def seccomp_notif_fail(listener: int, notif_id: int, errno: int) -> None:
    """Answer a notification with an error."""
    fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, _NOTIF_RESP.pack(notif_id, 0, -errno, 0))


def seccomp_notif_continue(listener: int, notif_id: int) -> None:
    """Let the notified syscall run as if the filter had allowed it (see jailer.layers.seccomp on when that is safe)."""
    fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, _NOTIF_RESP.pack(notif_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE))


def close_range(first: int, last: int = 0xFFFFFFFF, flags: int = 0) -> None:
    _syscall("close_range", c_uint(first), c_uint(last), c_uint(flags))


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    return _syscall("pidfd_getfd", c_int(pidfd), c_int(target_fd), c_uint(0))


def landlock_abi() -> int:
    """The Landlock ABI version this kernel offers (OSError when Landlock is off)."""
    return _syscall("landlock_create_ruleset", None, c_size_t(0), c_uint(LANDLOCK_CREATE_RULESET_VERSION))


class _RulesetAttr(Structure):
    _fields_ = [("handled_access_fs", c_uint64), ("handled_access_net", c_uint64),
                ("scoped", c_uint64)]


class _PathBeneathAttr(Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", c_uint64), ("parent_fd", c_int32)]


def landlock_create_ruleset(handled_fs: int, handled_net: int, scoped: int) -> int:
    """Older kernels accept the longer struct as long as the fields they do not know are zero."""
    attr = _RulesetAttr(handled_fs, handled_net, scoped)
    return _syscall("landlock_create_ruleset", byref(attr), c_size_t(sizeof(attr)),
                    c_uint(0))


def landlock_add_path_rule(ruleset_fd: int, allowed: int, parent_fd: int) -> None:
    attr = _PathBeneathAttr(allowed, parent_fd)
    _syscall("landlock_add_rule", c_int(ruleset_fd), c_uint(LANDLOCK_RULE_PATH_BENEATH),
             byref(attr), c_uint(0))


def landlock_restrict_self(ruleset_fd: int) -> None:
    _syscall("landlock_restrict_self", c_int(ruleset_fd), c_uint(0))


def ioctl_ifreq(fd: int, request: int, ifreq: bytearray) -> None:
    """ioctl(fd, request, struct ifreq) on a 40-byte buffer that the kernel may fill in."""
    buffer = (c_char * len(ifreq)).from_buffer(ifreq)
    _check(_libc.ioctl(c_int(fd), c_ulong(request), buffer))

