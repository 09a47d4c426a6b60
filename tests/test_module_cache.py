"""The zero-exec preloader's module cache (jailer.zero_exec.module_cache) serves a module only
while the import system would find and load exactly what it holds; anything else falls back
to the import system. Built here over a library directory of its own, so that its files can
be changed."""

from __future__ import annotations

import importlib
import os
import py_compile
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jailer.run_cli import open_private
from jailer.zero_exec import module_cache
from jailer.zero_exec.module_cache import CachedModules


@pytest.fixture
def library(tmp_path):
    """(zip, library, lib-dynload) as jailer.zero_exec.standard_library() gives them, with a
    module, a package with a submodule, and bytecode files for them."""
    lib = tmp_path / "lib"
    (lib / "cachepkg").mkdir(parents=True)
    (lib / "lib-dynload").mkdir()
    (lib / "cachemod.py").write_text("VALUE = 1\ndef where():\n    return __file__\n")
    (lib / "cachepkg" / "__init__.py").write_text("NAME = 'package'\n")
    (lib / "cachepkg" / "sub.py").write_text("from cachepkg import NAME\nSUB = NAME + '.sub'\n")
    (lib / "cachepkg" / "inner").mkdir()
    (lib / "cachepkg" / "inner" / "__init__.py").write_text("INNER = True\n")
    for source in ("cachemod.py", "cachepkg/__init__.py", "cachepkg/sub.py", "cachepkg/inner/__init__.py"):
        py_compile.compile(str(lib / source), doraise=True)
    past = time.time() - 10   # directories whose mtime a later change visibly moves
    for directory in (lib, lib / "cachepkg", lib / "cachepkg" / "inner", lib / "lib-dynload"):
        os.utime(directory, (past, past))
    return str(tmp_path / "lib.zip"), str(lib), str(lib / "lib-dynload")


MODULES = [("cachemod", "cachemod.py", False), ("cachepkg", "cachepkg/__init__.py", True),
           ("cachepkg.sub", "cachepkg/sub.py", False), ("cachepkg.inner", "cachepkg/inner/__init__.py", True)]


def write_cache(library, tmp_path, modules=MODULES) -> str:
    path = tmp_path / "test.modules"
    path.write_bytes(module_cache.build([(name, os.path.join(library[1], file), package)
                                         for name, file, package in modules], library))
    path.chmod(0o600)
    return str(path)


def load(path: str) -> CachedModules | None:
    fd = open_private(path)
    assert fd is not None
    return module_cache.CachedModules.load(fd)


@pytest.fixture
def importing():
    """Import through a finder first on sys.meta_path, then forget what was imported."""
    saved_path, saved_meta = sys.path[:], sys.meta_path[:]
    before = set(sys.modules)

    def run(finder, library, *names):
        sys.path[:] = list(library)
        if finder is not None:
            sys.meta_path.insert(0, finder)
        return [importlib.import_module(name) for name in names]

    yield run
    sys.path[:], sys.meta_path[:] = saved_path, saved_meta
    for name in set(sys.modules) - before:
        del sys.modules[name]
    importlib.invalidate_caches()


def described(module) -> tuple:
    spec = module.__spec__
    return (module.__name__, module.__file__, module.__cached__, spec.origin, spec.cached, spec.parent,
            spec.submodule_search_locations, spec.has_location, type(module.__loader__), module.__loader__.path,
            type(spec.loader), sorted(k for k in vars(module) if not k.startswith("__")))


def test_served_modules_are_what_the_import_system_gives(library, tmp_path, importing):
    cache = load(write_cache(library, tmp_path))
    served = importing(cache, library, "cachemod", "cachepkg.sub", "cachepkg.inner")
    assert sorted(cache.served) == ["cachemod", "cachepkg", "cachepkg.inner", "cachepkg.sub"] and not cache.stale
    cache.close()
    served = [*served, sys.modules["cachepkg"]]
    served_described = [described(module) for module in served]
    assert served[0].where() == os.path.join(library[1], "cachemod.py")
    assert served[0].where.__code__.co_filename == served[0].__file__
    assert served[1].SUB == "package.sub"
    code = served[0].where.__code__.co_code
    for name in ("cachemod", "cachepkg", "cachepkg.sub", "cachepkg.inner"):
        del sys.modules[name]
    plain = importing(None, library, "cachemod", "cachepkg.sub", "cachepkg.inner")
    plain = [*plain, sys.modules["cachepkg"]]
    assert served_described == [described(module) for module in plain]
    assert plain[0].where.__code__.co_code == code


def test_a_changed_source_is_imported_again_and_reported(library, tmp_path, importing):
    path = write_cache(library, tmp_path)
    source = os.path.join(library[1], "cachemod.py")
    with open(source, "a") as f:
        f.write("CHANGED = True\n")        # (the directory's mtime stays: only the source tells)
    cache = load(path)
    module, = importing(cache, library, "cachemod")
    assert module.CHANGED and cache.stale and "cachemod" not in cache.served


@pytest.mark.parametrize("change", ["new module", "new package", "zip appears", "extension beside"])
def test_a_changed_directory_refuses_the_whole_cache(library, tmp_path, change):
    """A file added where the search looks may be found first (a package before a module, an
    extension before a source, the zip before the directory): the cache no longer says."""
    path = write_cache(library, tmp_path)
    lib = library[1]
    if change == "new module":
        open(os.path.join(lib, "cachepkg", "other.py"), "w").close()
    elif change == "new package":
        os.mkdir(os.path.join(lib, "cachemod"))
    elif change == "zip appears":
        open(library[0], "wb").close()
    else:
        open(os.path.join(lib, "cachemod.cpython-311-x86_64-linux-gnu.so"), "wb").close()
    assert load(path) is None


def test_a_cache_for_another_interpreter_is_refused(library, tmp_path, monkeypatch):
    path = write_cache(library, tmp_path)
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path))   # the bytecode files are elsewhere now
    assert load(path) is None


def test_without_a_current_bytecode_file_the_source_is_compiled(library, tmp_path, importing):
    lib = library[1]
    os.unlink(importlib.util.cache_from_source(os.path.join(lib, "cachemod.py")))
    stale = importlib.util.cache_from_source(os.path.join(lib, "cachepkg", "sub.py"))
    with open(stale, "r+b") as f:
        f.seek(8)
        f.write(b"\0\0\0\0")                # the header's source mtime no longer matches
    cache = load(write_cache(library, tmp_path))
    module, sub = importing(cache, library, "cachemod", "cachepkg.sub")
    assert sorted(cache.served) == ["cachemod", "cachepkg", "cachepkg.sub"]
    assert module.VALUE == 1 and sub.SUB == "package.sub"


def test_hash_based_bytecode_is_left_to_the_import_system(library, tmp_path):
    source = os.path.join(library[1], "cachemod.py")
    py_compile.compile(source, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    cache = load(write_cache(library, tmp_path))
    assert cache.find_spec("cachemod") is None and cache.find_spec("cachepkg") is not None
    assert cache.left_out == {"cachemod"}   # (its import does not make the preloader ask for a rewrite)
    cache.close()


def test_only_the_librarys_sources_are_cached(library, tmp_path):
    elsewhere = tmp_path / "elsewhere.py"
    elsewhere.write_text("X = 1\n")
    modules = [("elsewhere", str(elsewhere), False), ("site", os.path.join(library[1], "site-packages", "x.py"), False),
               ("cachemod", os.path.join(library[1], "cachemod.py"), False), (7, None, False)]
    path = tmp_path / "test.modules"
    path.write_bytes(module_cache.build(modules, library))
    path.chmod(0o600)
    cache = load(str(path))
    assert [name for name in ("elsewhere", "site", "cachemod") if cache.find_spec(name)] == ["cachemod"]
    cache.close()


def test_a_damaged_or_foreign_file_is_not_used(library, tmp_path):
    path = write_cache(library, tmp_path)
    data = open(path, "rb").read()
    for damaged in (data[:3], data[:40], b"\xff\xff\xff\x7f" + data[4:], b"\x10\0\0\0" + b"\0" * 16):
        with open(path, "wb") as f:
            f.write(damaged)
        fd = open_private(path)
        assert fd is None or CachedModules.load(fd) is None
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)                   # readable by others: not this user's private cache
    assert open_private(path) is None


def test_jailers_modules_are_served_only_apart_from_the_standard_librarys(library, tmp_path):
    """While preloading (the path: the standard library's directories) it serves the library's
    modules; while the preloader imports jailer's set-up modules (found in jailer's package,
    whatever the path), only those."""
    import jailer.layers.limits as limits

    path = tmp_path / "test.modules"
    path.write_bytes(module_cache.build([("cachemod", os.path.join(library[1], "cachemod.py"), False),
                                         ("jailer.layers.limits", limits.__file__, False),
                                         ("jailer.layers.elsewhere", os.path.join(library[1], "cachemod.py"), False)],
                                        library))
    path.chmod(0o600)
    cache = load(str(path))
    layers = [os.path.dirname(limits.__file__)]
    assert cache.find_spec("cachemod") is not None and cache.find_spec("jailer.layers.limits", layers) is None
    cache.own = True
    assert cache.find_spec("cachemod") is None and cache.find_spec("jailer.layers.limits", layers) is not None
    assert cache.find_spec("jailer.layers.elsewhere", layers) is None
    cache.close()


def test_a_directory_changed_while_its_modules_were_searched_for_is_not_cached(library, tmp_path):
    """What the search found before the change may not be what it finds now: no cache."""
    modules = [(name, os.path.join(library[1], file), package) for name, file, package in MODULES]
    searched = time.time_ns()
    assert module_cache.build(modules, library, unchanged_since=searched) is not None
    open(os.path.join(library[1], "cachepkg", "new.py"), "w").close()
    assert module_cache.build(modules, library, unchanged_since=searched) is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mangled_file_is_refused_or_still_serves_only_what_it_checked(library, tmp_path, data):
    """Bytes of the file flipped, cut or added anywhere: the finder is refused, or it serves
    only modules whose source and directories still match (never raises while searching)."""
    path = write_cache(library, tmp_path)
    original = bytearray(open(path, "rb").read())
    mangled = original[:]
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(mangled) - 1))
        mangled[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        mangled = mangled[:data.draw(st.integers(0, len(mangled)))]
    with open(path, "wb") as f:
        f.write(mangled)
    fd = open_private(path)
    cache = CachedModules.load(fd) if fd is not None else None
    if cache is not None:
        for name in ("cachemod", "cachepkg", "cachepkg.sub", "cachepkg.inner", "other"):
            spec = cache.find_spec(name, None if "." not in name else [os.path.join(library[1], "cachepkg")])
            assert spec is None or spec.origin.startswith(library[1] + os.sep)
        cache.close()
