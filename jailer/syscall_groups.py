"""Named syscall groups a profile can list in `seccomp.allow` (e.g. "@python").

Groups keep profiles short and reviewable: a device profile says "@python" plus the few
syscalls its device really needs instead of sixty names. A group may include other groups.
Names that do not exist on the running architecture (e.g. `open` on aarch64) are dropped
when a group is expanded, so one table serves every architecture; names a user lists
explicitly are never dropped, they are validated instead.
"""

# name -> (why the group exists, members). Members starting with "@" are other groups.
GROUPS = {
    "@default": (
        "what any dynamically linked program needs to start, run and exit",
        ("execve", "brk", "arch_prctl", "mmap", "munmap", "mprotect", "set_tid_address",
         "set_robust_list", "rseq", "prlimit64", "getrandom", "futex", "exit", "exit_group",
         "rt_sigreturn", "restart_syscall", "access", "faccessat", "faccessat2", "open", "openat",
         "close", "read", "pread64", "fstat", "newfstatat", "stat", "lstat", "statx",
         "getpid", "gettid", "sched_yield", "clock_gettime", "clock_getres", "gettimeofday", "time",
         "nanosleep", "clock_nanosleep"),
    ),
    "@basic-io": (
        "reading and writing already-open descriptors",
        ("read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
         "pwritev2", "lseek", "close", "close_range", "dup", "dup2", "dup3", "fcntl", "fstat",
         "ftruncate", "fsync", "fdatasync"),
    ),
    "@file-read": (
        "looking up and reading files by path (no modification)",
        ("open", "openat", "openat2", "access", "faccessat", "faccessat2", "stat", "lstat",
         "newfstatat", "statx", "fstat", "readlink", "readlinkat", "getdents64", "getcwd", "chdir",
         "fchdir", "statfs", "fstatfs"),
    ),
    "@memory": (
        "mapping and releasing memory (mprotect can make memory executable: W^X is not enforced)",
        ("brk", "mmap", "munmap", "mprotect", "mremap", "madvise", "msync", "mincore", "membarrier",
         "memfd_create"),
    ),
    "@signal": (
        "handling signals and signalling own threads",
        ("rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigtimedwait",
         "rt_sigsuspend", "sigaltstack", "tgkill", "signalfd4"),
    ),
    "@time": (
        "reading clocks, sleeping and timer descriptors",
        ("clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep", "clock_nanosleep",
         "timerfd_create", "timerfd_settime", "timerfd_gettime"),
    ),
    "@poll": (
        "waiting on descriptors: poll, select, epoll and eventfd",
        ("poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl",
         "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd2"),
    ),
    "@unix-socket": (
        "serving and using stream sockets that are already bound (accept, fd passing)",
        ("accept", "accept4", "recvmsg", "sendmsg", "recvfrom", "sendto", "recvmmsg", "sendmmsg",
         "shutdown", "getsockopt", "setsockopt", "getsockname", "getpeername", "socketpair"),
    ),
    "@threads": (
        "synchronising threads; creating them needs the clone rule of jailer-profile(5), because "
        "an unconditional clone or clone3 also creates namespaces",
        ("futex", "set_robust_list", "get_robust_list", "gettid", "madvise",
         "sched_yield", "sched_getaffinity", "rseq", "exit"),
    ),
    "@process-info": (
        "asking about the own process and the system it runs on (inside its namespaces)",
        ("getpid", "getppid", "gettid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
         "getresgid", "getgroups", "uname", "sysinfo", "getrusage", "times", "getrlimit",
         "prlimit64", "sched_getaffinity", "getpriority", "getcpu"),
    ),
    "@python": (
        "what CPython needs to start, import modules (no bytecode writes) and run an event loop",
        ("@default", "@basic-io", "@file-read", "@memory", "@signal", "@time", "@poll",
         "@process-info", "ioctl"),
    ),
    "@vfio-user": (
        "a Python vfio-user device server on a passed-in listening socket: accepting the client, "
        "receiving DMA-region and interrupt descriptors, mapping DMA memory, signalling eventfds",
        ("@python", "@unix-socket"),
    ),
}


def expand(group):
    """Member syscall names of `group` (nested groups expanded, order kept, no duplicates)."""
    names = []
    for member in GROUPS[group][1]:
        for name in expand(member) if member.startswith("@") else (member,):
            if name not in names:
                names.append(name)
    return names
