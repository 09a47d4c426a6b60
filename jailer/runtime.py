"""What a program needs from the host to run in an otherwise empty root.

The sandbox root starts as an empty tmpfs, so everything the program loads must be bound
in explicitly: for a native program its executable and shared-library closure (found the
way ld.so finds them: DT_RPATH/DT_RUNPATH, ld.so.conf, the default directories), for a
Python program the interpreter, its libraries, the stdlib with lib-dynload, the venv's
site-packages and the project packages named in `program.modules`. Every path is bound at
its real (symlink-free) location and each symlink met on the way (merged-/usr's /lib64 ->
usr/lib64, a venv's bin/python -> /usr/bin/python3, ...) becomes a Symlink entry, so the
names the program and ld.so use resolve inside exactly as on the host. Binding works
whatever the modes of the parent directories (e.g. a venv under 0700 /root): the new root's
parents are fresh directories.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass
from typing import NamedTuple

from jailer.plan import Bind, Symlink

EXECUTABLE_SEARCH_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
LD_SO_CONF = "/etc/ld.so.conf"
MAX_SYMLINK_HOPS = 40

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 0, 1, 5, 15, 29


@dataclass(frozen=True)
class Runtime:
    executable: str                       # path exec'd, visible at the same path inside
    argv: tuple[str, ...]
    binds: tuple[Bind, ...]
    symlinks: tuple[Symlink, ...]
    environment: tuple[tuple[str, str], ...]


class ElfInfo(NamedTuple):
    elf_class: int                        # 1 = 32-bit, 2 = 64-bit
    machine: int                          # e_machine
    interpreter: str | None               # PT_INTERP
    needed: tuple[str, ...]               # DT_NEEDED
    rpath: tuple[str, ...]                # DT_RPATH (used only when there is no DT_RUNPATH)
    runpath: tuple[str, ...]


def read_elf(path):
    """The dynamic-linking facts of the ELF file at `path`, or None if it is not ELF."""
    try:
        with open(path, "rb") as f:
            return _read_elf(f)
    except (OSError, struct.error, UnicodeDecodeError, IndexError):
        return None


def _read_elf(f):
    ident = f.read(16)
    if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
        return None
    elf_class = ident[4]
    order = "<" if ident[5] == 1 else ">"
    wide = elf_class == 2
    header = struct.unpack(order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH"), f.read(48 if wide else 36))
    machine, phoff, phentsize, phnum = header[1], header[4], header[8], header[9]
    segments = []
    for i in range(phnum):
        f.seek(phoff + i * phentsize)
        if wide:
            p_type, _flags, offset, vaddr, _paddr, filesz = struct.unpack(order + "IIQQQQ", f.read(40))
        else:
            p_type, offset, vaddr, _paddr, filesz = struct.unpack(order + "IIIII", f.read(20))
        segments.append((p_type, offset, vaddr, filesz))
    interpreter = None
    dynamic = []
    for p_type, offset, vaddr, filesz in segments:
        if p_type == PT_INTERP:
            f.seek(offset)
            interpreter = f.read(filesz).split(b"\0", 1)[0].decode()
        elif p_type == PT_DYNAMIC:
            f.seek(offset)
            entry = struct.Struct(order + ("qQ" if wide else "iI"))
            raw = f.read(filesz)
            for pos in range(0, len(raw) - entry.size + 1, entry.size):
                tag, value = entry.unpack_from(raw, pos)
                if tag == DT_NULL:
                    break
                dynamic.append((tag, value))
    strtab = next((value for tag, value in dynamic if tag == DT_STRTAB), None)
    strtab_offset = next((offset + strtab - vaddr for p_type, offset, vaddr, filesz in segments
                          if p_type == PT_LOAD and strtab is not None and vaddr <= strtab < vaddr + filesz), None)

    def string(at):
        f.seek(strtab_offset + at)
        chunk = b""
        while b"\0" not in chunk and len(chunk) < 65536:
            more = f.read(256)
            if not more:
                break
            chunk += more
        return chunk.split(b"\0", 1)[0].decode()

    def strings(wanted):
        if strtab_offset is None:
            return ()
        return tuple(string(value) for tag, value in dynamic if tag == wanted)

    def search_path(wanted):
        return tuple(d for entry in strings(wanted) for d in entry.split(":") if d)

    return ElfInfo(elf_class, machine, interpreter, strings(DT_NEEDED), search_path(DT_RPATH),
                   search_path(DT_RUNPATH))


def ld_so_conf_dirs(path=LD_SO_CONF, _seen=None):
    """Library directories listed in ld.so.conf and the files it includes, in order."""
    import glob

    seen = set() if _seen is None else _seen
    if path in seen:
        return []
    seen.add(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    dirs = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line.startswith("include"):
            pattern = line.split(None, 1)[1] if len(line.split(None, 1)) == 2 else ""
            pattern = pattern if pattern.startswith("/") else os.path.join(os.path.dirname(path), pattern)
            for included in sorted(glob.glob(pattern)):
                dirs += ld_so_conf_dirs(included, seen)
        elif line.startswith("/"):
            dirs.append(line.rstrip("/") or "/")
    return dirs


def default_library_dirs():
    """The directories ld.so searches last, multiarch first (Debian layout)."""
    triplet = getattr(sys.implementation, "_multiarch", None) or f"{os.uname().machine}-linux-gnu"
    return [f"/lib/{triplet}", f"/usr/lib/{triplet}", "/lib64", "/usr/lib64", "/lib", "/usr/lib"]


class _Exposure:
    """The host paths (at their real location) and symlinks the new root must contain."""

    def __init__(self):
        self.paths = {}
        self.links = {}

    def add(self, path):
        """Make `path` resolvable inside; returns its real path."""
        real = self.resolve(path)
        self.paths.setdefault(real, None)
        return real

    def resolve(self, path):
        """The real path of `path`, recording every symlink met while resolving it."""
        pending = [p for p in path.split("/") if p]
        current = "/"
        hops = 0
        while pending:
            name = pending.pop(0)
            if name == ".":
                continue
            if name == "..":
                current = os.path.dirname(current)
                continue
            candidate = os.path.join(current, name)
            if not os.path.islink(candidate):
                current = candidate
                continue
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise OSError(f"too many levels of symbolic links in {path}")
            points_to = os.readlink(candidate)
            self.links[candidate] = points_to
            if points_to.startswith("/"):
                current = "/"
            pending = [p for p in points_to.split("/") if p] + pending
        return current


    def result(self):
        """(binds, symlinks) without entries already visible through a bound directory."""
        directories = [p for p in self.paths if os.path.isdir(p)]
        binds = []
        for path in sorted(self.paths):
            if not covered(path, [d for d in directories if d != path]):
                binds.append(Bind(source=path, target=path, origin="runtime"))
        symlinks = tuple(Symlink(target=link, points_to=to) for link, to in sorted(self.links.items())
                         if not covered(link, directories))
        return tuple(binds), symlinks


class _Linker:
    """Finds shared libraries the way ld.so does, recording them in an _Exposure."""

    def __init__(self, exposure):
        self.exposure = exposure
        self.conf_dirs = ld_so_conf_dirs()
        self.default_dirs = default_library_dirs()
        self.visited = set()
        self.elf_cache = {}
        self.found_cache = {}

    def elf(self, path):
        if path not in self.elf_cache:
            self.elf_cache[path] = read_elf(path)
        return self.elf_cache[path]

    def expose_closure(self, path):
        """Expose `path`'s interpreter and library closure; returns the sonames that were not found."""
        info = self.elf(path)
        if info is None:
            return []
        missing = []
        queue = [(path, info)]
        if info.interpreter:
            if os.path.exists(info.interpreter):
                self.exposure.add(info.interpreter)
            else:
                missing.append(info.interpreter)
        while queue:
            obj, obj_info = queue.pop(0)
            for soname in obj_info.needed:
                found = self.find(soname, obj, obj_info, info)
                if found is None:
                    missing.append(soname)
                    continue
                real = self.exposure.add(found)
                if real not in self.visited:
                    self.visited.add(real)
                    queue.append((found, self.elf(real)))
        return missing

    def find(self, soname, obj, obj_info, root_info):
        if "/" in soname:
            return soname if os.path.exists(soname) else None
        if obj_info.rpath or obj_info.runpath:
            return self.search(soname, obj, obj_info, root_info)
        # Without a search path of its own, where a library is found depends only on its name.
        key = (soname, root_info.elf_class, root_info.machine)
        if key not in self.found_cache:
            self.found_cache[key] = self.search(soname, obj, obj_info, root_info)
        return self.found_cache[key]

    def search(self, soname, obj, obj_info, root_info):
        origin = os.path.dirname(obj)
        dirs = [*(() if obj_info.runpath else obj_info.rpath), *obj_info.runpath, *self.conf_dirs,
                *self.default_dirs]
        for directory in dirs:
            if "$" in directory:
                directory = directory.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
                if "$" in directory:
                    continue
            candidate = os.path.join(directory, soname)
            if not os.path.isfile(candidate):
                continue
            candidate_info = self.elf(os.path.realpath(candidate))
            if candidate_info and (candidate_info.elf_class, candidate_info.machine) == (root_info.elf_class,
                                                                                         root_info.machine):
                return candidate
        return None

    def expose_extensions(self, directory):
        """Library closure of every extension module (*.so) below `directory`; unresolvable ones are skipped,
        since they cannot be imported on the host either."""
        for root, subdirs, files in os.walk(directory):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            for name in files:
                if ".so" in name and (name.endswith(".so") or ".so." in name):
                    self.expose_closure(os.path.join(root, name))


def covered(path, directories):
    """Whether `path` is one of `directories` or lies below one of them."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in directories)


def find_executable(name):
    """Absolute path of `name`: itself if absolute, else searched in the standard system directories."""
    if name.startswith("/"):
        return name
    for directory in EXECUTABLE_SEARCH_PATH:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def native_runtime(argv, executable, report):
    """Runtime of a native program: the executable (or script and its interpreter) and its libraries.
    `report(key, text)` receives each problem; returns None if any."""
    key = "program.executable" if executable else "program.argv[0]"
    path = find_executable(executable or argv[0])
    if path is None:
        report(key, f'found "{argv[0]}", expected an absolute path or a program in '
               + ":".join(EXECUTABLE_SEARCH_PATH))
        return None
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        report(key, f'found "{path}", expected an executable file')
        return None
    if ".." in path.split("/"):   # e.g. from {env:NAME}=$PWD/../x: the sandbox has no such directory to climb out of
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    exposure = _Exposure()
    linker = _Linker(exposure)
    real = exposure.add(path)
    missing = linker.expose_closure(real)
    interpreter = _script_interpreter(real)
    if interpreter:
        if find_executable(interpreter) != interpreter or not os.path.isfile(interpreter):
            report(key, f'found script "{path}" for interpreter "{interpreter}", expected an existing interpreter')
            return None
        missing += linker.expose_closure(exposure.add(interpreter))
    if missing:
        report(key, f'found "{path}" needing {", ".join(sorted(set(missing)))}, expected every shared library '
               "to be found (in its RUNPATH, ld.so.conf or " + ", ".join(linker.default_dirs) + ")")
        return None
    binds, symlinks = exposure.result()
    return Runtime(executable=path, argv=tuple(argv), binds=binds, symlinks=symlinks, environment=())


def _script_interpreter(path):
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return words[0] if words else None


def python_runtime(argv, modules, site, report):
    """Runtime of a Python program run by the interpreter jailer itself runs on.

    `argv` are the interpreter's arguments (e.g. ["-m", "devices.gpio"]). Without `site`,
    the interpreter runs with -S and site-packages come through PYTHONPATH: faster start-up
    and a sys.path that is exactly what was bound. Returns None if a problem was reported."""
    import importlib.util
    import site as site_module
    import sysconfig

    exposure = _Exposure()
    linker = _Linker(exposure)
    interpreter = sys.executable
    missing = linker.expose_closure(exposure.add(interpreter))
    if missing:
        report("program.runtime", f'found interpreter "{interpreter}" needing {", ".join(sorted(set(missing)))}, '
               "expected every shared library to be found")
        return None
    if sys.prefix != sys.base_prefix and os.path.isfile(os.path.join(sys.prefix, "pyvenv.cfg")):
        exposure.add(os.path.join(sys.prefix, "pyvenv.cfg"))
    stdlib = exposure.add(sysconfig.get_path("stdlib"))
    dynload = next((p for p in sys.path if os.path.basename(p) == "lib-dynload" and os.path.isdir(p)),
                   sysconfig.get_config_var("DESTSHARED"))
    if dynload and os.path.isdir(dynload):
        linker.expose_extensions(exposure.add(dynload))
    site_dirs = []
    for directory in [*site_module.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]:
        if os.path.isdir(directory) and directory not in site_dirs:
            site_dirs.append(directory)
            linker.expose_extensions(exposure.add(directory))
    python_path = []
    visible = [stdlib, *(os.path.realpath(d) for d in site_dirs)]
    if argv and argv[0].startswith("/") and os.path.isfile(argv[0]):
        exposure.add(argv[0])  # a script run by path
    for index, module in enumerate(modules):
        top = module.split(".")[0]
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            report(f"program.modules[{index}]", f'found "{module}", expected a module that {interpreter} can '
                   "import (not found on its sys.path)")
            continue
        if spec.submodule_search_locations is not None:
            locations = list(spec.submodule_search_locations)
        elif spec.origin and spec.origin.startswith("/"):
            locations = [spec.origin]
        else:
            continue  # built into the interpreter
        for location in locations:
            if covered(os.path.realpath(location), visible):
                continue
            real = exposure.add(location)
            if os.path.isdir(real):
                linker.expose_extensions(real)
            else:
                linker.expose_closure(real)
            if os.path.dirname(location) not in python_path:
                python_path.append(os.path.dirname(location))
    if not site:
        python_path += [d for d in site_dirs if d not in python_path]
    environment = [("PYTHONDONTWRITEBYTECODE", "1")]
    if python_path:
        environment.append(("PYTHONPATH", ":".join(python_path)))
    binds, symlinks = exposure.result()
    flags = () if site else ("-S",)
    return Runtime(executable=interpreter, argv=(interpreter, *flags, *argv), binds=binds, symlinks=symlinks,
                   environment=tuple(environment))
