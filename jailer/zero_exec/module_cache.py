"""The modules a zero-exec preloader imports, the standard library's and jailer's own, kept
compiled in one file beside the profile's cached plan (jailer.run_cli), so that the next
preloader imports them without the import system's search and without opening a file per
module.

Importing program.preload is most of the preloader's work, and all of it is on the way to
the program's start. About a seventh of it is not the modules' own code: it is the import
system looking for each module (a scan of, and stats in, every directory on the path) and
reading its bytecode file. This file keeps, for each module, what that search found (its
source and bytecode paths, whether it is a package) and the code its bytecode file held;
the preloader maps the file and puts a finder serving it first: for the standard library's
modules while it preloads (when the path is the standard library's directories only), for
jailer's while it imports jailer's set-up modules (found in jailer's package only).

A module is served only while nothing the search depends on has changed:
- the interpreter: its version, bytecode magic, optimisation level and pycache prefix, and
  the standard library's directories (interpreter_key);
- the directories searched: their mtimes, since adding, removing or renaming a file
  changes them, and the standard library's zip, which must still be absent;
- the module's source: its mtime and size, the check its bytecode file's header serves.

A module the cache lacks, or does not serve, the interpreter's own finders import as usual.
The preloader then reports what it imported (imported_modules), and the launcher rewrites
the file (build), unless the file lists the module as one it cannot hold (a hash-based
bytecode file, a source outside those directories). Once preloading is done, each module
served gets the SourceFileLoader the search would have given it (CachedModules.close), so
nothing of jailer's stays reachable from the program. Like a bytecode file, the file has
no checksum: it is trusted as the private cache directory it is in (the plan cache's).
"""

from __future__ import annotations

import marshal
import os
import sys

from _frozen_importlib_external import MAGIC_NUMBER, SourceFileLoader, cache_from_source, spec_from_file_location

_HEADER_SIZE = 4   # bytes of the little-endian length of the marshalled index that follows
OWN_PACKAGE = __name__.partition(".")[0]


def interpreter_key() -> tuple:
    from jailer.zero_exec import standard_library

    return (sys.implementation.cache_tag, sys.version, MAGIC_NUMBER, sys.flags.optimize, sys.pycache_prefix,
            standard_library())


class _CachedLoader(SourceFileLoader):
    """The loader of a module served from the cache while preloading: its code comes from
    the cache; CachedModules.close replaces it with a plain SourceFileLoader afterwards."""

    def __init__(self, fullname, path, cache):
        super().__init__(fullname, path)
        self.cache = cache

    def get_code(self, fullname):
        try:
            return self.cache.code(fullname, self.path)
        except (EOFError, ValueError, TypeError):   # (a damaged file: the import system reads the module)
            self.cache.stale = True
            return super().get_code(fullname)


class CachedModules:
    """A meta path finder serving the modules of one cache file (see the module's docstring)."""

    def __init__(self, mapping, index: dict, start: int, left_out: frozenset):
        self._mapping = mapping
        self._index = index
        self._start = start
        self.left_out = left_out   # names reported before that build could not cache: not worth a rewrite
        self.served = []       # the names imported from here
        self.stale = False     # a module it holds had changed: the launcher should rewrite it
        self.own = False       # serving jailer's modules (else the standard library's)

    @classmethod
    def load(cls, fd: int) -> "CachedModules | None":
        """The finder for the cache file open on fd (closed here), or None when the file is
        not one for this interpreter or a directory searched has changed."""
        import mmap

        try:
            mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        try:
            length = int.from_bytes(mapping[:_HEADER_SIZE], "little")
            with memoryview(mapping)[_HEADER_SIZE:_HEADER_SIZE + length] as view:
                header = marshal.loads(view)
            start = _HEADER_SIZE + length
            if header["key"] == interpreter_key() and _well_formed(header["modules"], len(mapping) - start) \
                    and all(_mtime(path) == mtime for path, mtime in header["dirs"]):
                return cls(mapping, header["modules"], start, frozenset(header["left_out"]))
        except (EOFError, ValueError, TypeError, KeyError, OSError):
            pass
        mapping.close()
        return None

    def find_spec(self, name, path=None, target=None):
        entry = self._index.get(name)
        if entry is None or name.startswith(OWN_PACKAGE + ".") != self.own:
            return None
        origin, cached, is_package, mtime, size, _, _ = entry
        directory = os.path.dirname(origin)
        if path is not None and list(path) != [os.path.dirname(directory) if is_package else directory]:
            return None   # its parent package is not the one cached
        try:
            st = os.stat(origin)
        except (OSError, ValueError):   # (gone; or a damaged file's path)
            st = None
        if st is None or st.st_mtime_ns != mtime or st.st_size != size:
            self.stale = True
            return None
        spec = spec_from_file_location(name, origin, loader=_CachedLoader(name, origin, self),
                                       submodule_search_locations=[] if is_package else None)
        spec.cached = cached
        return spec

    def code(self, name: str, origin: str):
        import _imp

        _, _, _, _, _, offset, length = self._index[name]
        with memoryview(self._mapping)[self._start + offset:self._start + offset + length] as view:
            code = marshal.loads(view)
        if not isinstance(code, type(_well_formed.__code__)):
            raise TypeError(f"no code for {name}")
        _imp._fix_co_filename(code, origin)   # (as the import system does for a bytecode file)
        self.served.append(name)
        return code

    def close(self) -> None:
        """Unmap the file, and give each module served the loader the search would have."""
        for name in self.served:
            module = sys.modules.get(name)
            spec = getattr(module, "__spec__", None)
            if spec is not None and isinstance(spec.loader, _CachedLoader):
                spec.loader = module.__loader__ = SourceFileLoader(name, spec.origin)
        self.served = []
        self._index = {}
        self._mapping.close()


def _well_formed(index, size: int) -> bool:
    """Whether the index is one build wrote, for code that lies within `size` bytes."""
    kinds = (str, str, bool, int, int, int, int)
    return isinstance(index, dict) and all(
        isinstance(name, str) and isinstance(entry, tuple) and len(entry) == len(kinds)
        and all(isinstance(field, kind) for field, kind in zip(entry, kinds))
        and 0 <= entry[5] and 0 < entry[6] and entry[5] + entry[6] <= size
        for name, entry in index.items())


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def own_package() -> str:
    """jailer's package directory."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imported_modules(library, names) -> list[tuple[str, str, bool]]:
    """(name, source path, is a package) of each module of `names` imported from a source file
    of the standard library (library: jailer.zero_exec.standard_library()) or of jailer's
    package, for the launcher's write."""
    found = []
    own = own_package()
    for name in names:
        spec = getattr(sys.modules.get(name), "__spec__", None)
        origin = getattr(spec, "origin", None)
        if isinstance(spec.loader if spec else None, SourceFileLoader) and isinstance(origin, str) \
                and _cacheable(name, origin, library[1], own):
            found.append((name, origin, spec.submodule_search_locations is not None))
    return found


def _cacheable(name, origin, stdlib: str, own: str) -> bool:
    """A source file of the standard library (not of its site-packages) or, for one of
    jailer's submodules, of jailer's package."""
    if not (isinstance(name, str) and isinstance(origin, str) and origin.endswith(".py")):
        return False
    if name.startswith(OWN_PACKAGE + "."):
        return origin.startswith(own + os.sep)
    return origin.startswith(stdlib + os.sep) and f"{os.sep}site-packages{os.sep}" not in origin \
        and f"{os.sep}dist-packages{os.sep}" not in origin


def build(modules, library, own: str | None = None, unchanged_since: int | None = None) -> bytes | None:
    """The cache file's contents for modules (imported_modules' list): for each one whose
    source is in the standard library (library: jailer.zero_exec.standard_library()) or in
    jailer's package (own: its directory), its bytecode file's code when that file is current
    (as the import system checks it), else the code compiled from its source (as the import
    system would compile it). Modules with hash-based bytecode files are left out.
    unchanged_since (ns since the epoch): a time before the modules were searched for; None
    when a directory searched has changed since (what was found there may no longer be)."""
    zipped, stdlib, dynload = library
    own = own or own_package()
    index, blobs, offset, left_out = {}, [], 0, []
    directories = {zipped, stdlib, dynload}
    for name, origin, is_package in modules:
        code = None
        if _cacheable(name, origin, stdlib, own):
            try:
                code, st = _code_of(name, origin)
            except (OSError, SyntaxError, ValueError):
                code = None
        if code is None:
            if isinstance(name, str):
                left_out.append(name)
            continue
        index[name] = (origin, cache_from_source(origin), bool(is_package), st.st_mtime_ns, st.st_size,
                       offset, len(code))
        blobs.append(code)
        offset += len(code)
        directory = os.path.dirname(origin)
        directories.add(directory)
        if is_package:
            directories.add(os.path.dirname(directory))
    stamps = tuple((path, _mtime(path)) for path in sorted(directories))
    if unchanged_since is not None and any(mtime is not None and mtime >= unchanged_since for _, mtime in stamps):
        return None
    header = marshal.dumps({"key": interpreter_key(), "modules": index, "left_out": tuple(left_out), "dirs": stamps})
    return len(header).to_bytes(_HEADER_SIZE, "little") + header + b"".join(blobs)


def _code_of(name: str, origin: str) -> tuple[bytes | None, os.stat_result]:
    """The module's marshalled code as the import system would load it (None when its
    bytecode file is hash-based: the cache's mtime check would not be the import system's),
    and the source's status that code is for."""
    st = os.stat(origin)
    try:
        with open(cache_from_source(origin), "rb") as f:
            data = f.read()
    except OSError:
        data = b""
    if len(data) >= 16 and data[:4] == MAGIC_NUMBER:
        if int.from_bytes(data[4:8], "little") != 0:
            return None, st
        if int.from_bytes(data[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF \
                and int.from_bytes(data[12:16], "little") == st.st_size & 0xFFFFFFFF:
            return data[16:], st
    loader = SourceFileLoader(name, origin)
    return marshal.dumps(loader.source_to_code(loader.get_data(origin), origin)), st
