"""The kernel layers of a sandbox, one module per concern: namespaces, mounts (the minimal
root and pivot_root), landlock, limits (rlimits), cgroups, fds (the fd manifest),
network, capabilities (ids, capability sets, securebits, no_new_privs) and seccomp; and
syscalls, the one place where thin ctypes wrappers call what Python's os module lacks.

jailer.launch.launcher applies them to a sandbox's child in the order its docstring documents;
jailer.lockdown applies those a running process can take on to itself.
"""
