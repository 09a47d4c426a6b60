"""vfio-user backend descriptors: JSON files that let QEMU/libvirt-style management find a
device program, modelled on QEMU's vhost-user.json (see docs/vfio-user-descriptor.md).

Discovery follows the vhost-user rules so libvirt's interop loader can read these unchanged:
directories from general to specific (distribution data, /etc, the user's config), files
merged by basename with the more specific directory winning, an empty file masking a
less specific one, the survivors sorted by basename, and the first matching one chosen.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from jailer.errors import JailerError, UsageError

SUBDIR = Path("qemu") / "vfio-user"
MAX_DESCRIPTOR_BYTES = 1 << 20     # libvirt refuses bigger interop files too
TYPE_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
GUEST_MEMORY = ("shared", "any")
PCI_ID_LIMITS = {"vendor-id": 0xFFFF, "device-id": 0xFFFF, "subsystem-vendor-id": 0xFFFF,
                 "subsystem-id": 0xFFFF, "class-code": 0xFFFFFF, "revision": 0xFF}
REQUIRED_PCI_IDS = ("vendor-id", "device-id", "class-code")


class DescriptorError(JailerError):
    """One line per problem: 'FILE: KEY: found X, expected Y'."""

    exit_code = 2

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class PciIds:
    vendor_id: int
    device_id: int
    class_code: int
    subsystem_vendor_id: int | None = None
    subsystem_id: int | None = None
    revision: int | None = None


@dataclass(frozen=True)
class Sandbox:
    launcher: str                   # runs `LAUNCHER run PROFILE --socket-path=PATH | --fd=N`
    profile: str
    device_nodes: tuple[str, ...] = ()
    guest_memory: str = "any"       # "shared": the client must export guest RAM as fds


@dataclass(frozen=True)
class Descriptor:
    path: Path
    description: str
    type: str
    binary: str
    pci: PciIds
    tags: tuple[str, ...] = ()
    sandbox: Sandbox | None = None
    data: dict = field(default_factory=dict, compare=False, repr=False)   # as read, for --json

    def command(self, *, socket_path: str | None = None, fd: int | None = None) -> list[str]:
        """argv that starts this backend on a socket, through the sandbox when it has one."""
        if (socket_path is None) == (fd is None):
            raise JailerError("give exactly one of socket_path and fd")
        endpoint = f"--socket-path={socket_path}" if socket_path is not None else f"--fd={fd}"
        if self.sandbox:
            return [self.sandbox.launcher, "run", self.sandbox.profile, endpoint]
        return [self.binary, endpoint]


def default_dirs(environ=None) -> list[Path]:
    """Search directories, most general first; the data dir of this installation comes right
    after the distribution's so a local install overrides a packaged one."""
    environ = os.environ if environ is None else environ
    dirs = [Path("/usr/share") / SUBDIR]
    installed = Path(sys.prefix) / "share" / SUBDIR
    if installed not in dirs:
        dirs.append(installed)
    dirs.append(Path("/etc") / SUBDIR)
    config_home = _user_config_dir(environ)
    if config_home:
        dirs.append(config_home / SUBDIR)
    return dirs


def _user_config_dir(environ) -> Path | None:
    config_home = environ.get("XDG_CONFIG_HOME") or (Path(environ["HOME"]) / ".config" if environ.get("HOME") else None)
    return Path(config_home) if config_home else None


def descriptor_files(dirs) -> list[Path]:
    """The effective files: merged by basename (later dirs win), empty files mask, sorted."""
    chosen: dict[str, Path] = {}
    for directory in map(Path, dirs):
        try:
            entries = sorted(directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError as exc:
            raise DescriptorError([f"{directory}: cannot read the directory: {exc.strerror}"]) from None
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".json") or not entry.is_file():
                continue
            chosen[entry.name] = entry
    return [chosen[name] for name in sorted(chosen) if chosen[name].stat().st_size > 0]


def search(dirs=None, device_type: str | None = None) -> list[Descriptor]:
    """All effective descriptors in priority order, optionally only those of `device_type`."""
    found = [load(path) for path in descriptor_files(default_dirs() if dirs is None else dirs)]
    return [d for d in found if device_type is None or d.type == device_type]


def select(device_type: str, dirs=None) -> Descriptor:
    """The first descriptor for `device_type`, as a management tool would pick it."""
    matches = search(dirs, device_type)
    if not matches:
        searched = ", ".join(str(d) for d in (default_dirs() if dirs is None else dirs))
        raise DescriptorError([f"no vfio-user descriptor of type '{device_type}' in {searched}"])
    return matches[0]


def load(path) -> Descriptor:
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_DESCRIPTOR_BYTES:
        raise DescriptorError([f"{path}: file is {size} bytes, expected at most {MAX_DESCRIPTOR_BYTES}"])
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DescriptorError([f"{path}: not valid JSON: {exc}"]) from None
    return parse(data, str(path))


def parse(data, source: str) -> Descriptor:
    """Validate a descriptor object; every problem is reported, one line each."""
    check = _Checker(source)
    if not isinstance(data, dict):
        check.fail("", data, "a JSON object")
        raise DescriptorError(check.problems)
    check.unknown_keys(data, "", ("description", "type", "binary", "tags", "pci", "sandbox"))
    description = check.field(data, "description", str, "a string")
    device_type = check.field(data, "type", str, "a lower-case device type such as 'gpio-pci-idio-16'",
                              valid=TYPE_NAME.match)
    binary = check.field(data, "binary", str, "an absolute path", valid=os.path.isabs)
    tags = check.field(data, "tags", list, "a list of strings", required=False, default=[],
                       valid=lambda v: all(isinstance(t, str) for t in v))
    pci = None
    if "pci" in data:
        pci = _parse_pci(check, data["pci"])
    else:
        check.field(data, "pci", dict, "an object with vendor-id, device-id and class-code")
    sandbox = _parse_sandbox(check, data.get("sandbox"))
    if check.problems:
        raise DescriptorError(check.problems)
    return Descriptor(path=Path(source), description=description, type=device_type, binary=binary,
                      pci=pci, tags=tuple(tags), sandbox=sandbox, data=data)


def parse_capabilities(data, source: str) -> dict:
    """Validate `--print-capabilities` output: {"type": ..., "features": [...]} (+ optional "pci")."""
    check = _Checker(source)
    if not isinstance(data, dict):
        check.fail("", data, "a JSON object")
        raise DescriptorError(check.problems)
    check.field(data, "type", str, "a lower-case device type", valid=TYPE_NAME.match)
    check.field(data, "features", list, "a list of strings", valid=lambda v: all(isinstance(f, str) for f in v))
    if "pci" in data:
        _parse_pci(check, data["pci"])
    if check.problems:
        raise DescriptorError(check.problems)
    return data


def _parse_pci(check: "_Checker", pci) -> PciIds | None:
    if not isinstance(pci, dict):
        check.fail("pci", pci, "an object with vendor-id, device-id and class-code")
        return None
    check.unknown_keys(pci, "pci.", tuple(PCI_ID_LIMITS))
    ids = {}
    for key, limit in PCI_ID_LIMITS.items():
        ids[key] = check.field(pci, key, int, f"an integer from 0 to {limit:#x}", prefix="pci.",
                               required=key in REQUIRED_PCI_IDS,
                               valid=lambda v, limit=limit: not isinstance(v, bool) and 0 <= v <= limit)
    if check.problems:
        return None
    return PciIds(vendor_id=ids["vendor-id"], device_id=ids["device-id"], class_code=ids["class-code"],
                  subsystem_vendor_id=ids["subsystem-vendor-id"], subsystem_id=ids["subsystem-id"],
                  revision=ids["revision"])


def _parse_sandbox(check: "_Checker", sandbox) -> Sandbox | None:
    if sandbox is None:
        return None
    if not isinstance(sandbox, dict):
        check.fail("sandbox", sandbox, "an object with launcher and profile")
        return None
    check.unknown_keys(sandbox, "sandbox.", ("launcher", "profile", "device-nodes", "guest-memory"))
    launcher = check.field(sandbox, "launcher", str, "an absolute path", prefix="sandbox.", valid=os.path.isabs)
    profile = check.field(sandbox, "profile", str, "an absolute path", prefix="sandbox.", valid=os.path.isabs)
    nodes = check.field(sandbox, "device-nodes", list, "a list of absolute paths under /dev", prefix="sandbox.",
                        required=False, default=[],
                        valid=lambda v: all(isinstance(n, str) and n.startswith("/dev/") for n in v))
    memory = check.field(sandbox, "guest-memory", str, "one of " + ", ".join(GUEST_MEMORY), prefix="sandbox.",
                         required=False, default="any", valid=lambda v: v in GUEST_MEMORY)
    if check.problems:
        return None
    return Sandbox(launcher=launcher, profile=profile, device_nodes=tuple(nodes), guest_memory=memory)


class _Checker:
    """Collects 'FILE: KEY: found X, expected Y' lines instead of stopping at the first."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[str] = []

    def fail(self, key: str, value, expected: str) -> None:
        where = f"{self.source}: {key}: " if key else f"{self.source}: "
        self.problems.append(f"{where}found {json.dumps(value)}, expected {expected}")

    def unknown_keys(self, obj: dict, prefix: str, known) -> None:
        for key in obj:
            if key not in known:
                self.problems.append(f"{self.source}: {prefix}{key}: unknown key, expected one of "
                                     + ", ".join(known))

    def field(self, obj: dict, key: str, kind, expected: str, *, prefix: str = "", required: bool = True,
              default=None, valid=None):
        if key not in obj:
            if required:
                self.problems.append(f"{self.source}: {prefix}{key}: missing, expected {expected}")
            return default
        value = obj[key]
        if not isinstance(value, kind) or (valid is not None and not valid(value)):
            self.fail(prefix + key, value, expected)
            return default
        return value


# jailer's shipped files: (where a checkout has them, where they are installed under a data
# directory). pyproject.toml's [tool.setuptools.data-files] puts them at the second path, so a
# package for prefix P has them at P/<second path>.
SHIPPED_PROFILES = (Path("profiles"), Path("share") / "jailer" / "profiles")
SHIPPED_TEMPLATES = (Path("share") / SUBDIR, Path("share") / "jailer" / "vfio-user")
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def installation() -> tuple[Path, Path]:
    """(commands, data) directories of this installation. The install scheme that holds the
    package says where pip put its commands and data files: a venv, --user and Debian's
    /usr/local each differ from what sys.prefix alone says. A checkout is in no scheme: the
    interpreter's own directory and sys.prefix (setup.sh's venv)."""
    for scheme in dict.fromkeys([sysconfig.get_default_scheme(), *sysconfig.get_scheme_names()]):
        paths = sysconfig.get_paths(scheme)
        if PACKAGE_PARENT in (Path(paths["purelib"]).resolve(), Path(paths["platlib"]).resolve()):
            return Path(paths["scripts"]), Path(paths["data"])
    return Path(sys.executable).parent, Path(sys.prefix)


def shipped_dir(kind: tuple[Path, Path]) -> Path:
    """The directory of SHIPPED_PROFILES or SHIPPED_TEMPLATES: the checkout's own first (an
    editable install or a clone runs what it has), then this installation's data files."""
    in_tree, installed = kind
    candidates = []
    if (PACKAGE_PARENT / "pyproject.toml").is_file():
        candidates.append(PACKAGE_PARENT / in_tree)
    candidates += [installation()[1] / installed, Path(sys.prefix) / installed]
    candidates = list(dict.fromkeys(candidates))
    for directory in candidates:
        if directory.is_dir():
            return directory
    searched = ", ".join(map(str, candidates))
    raise DescriptorError([f"jailer's shipped files are in none of {searched}: reinstall jailer"])


def shipped_profile(name: str) -> Path:
    """The profile jailer ships for device type `name`: the one place that finds it."""
    return shipped_dir(SHIPPED_PROFILES) / f"{name}.toml"


def bundled_templates() -> list[Path]:
    """The descriptors jailer ships, with /usr paths to replace: installed under the data
    directory's share/jailer/vfio-user, where no management tool reads them as they are."""
    directory = shipped_dir(SHIPPED_TEMPLATES)
    found = sorted(directory.glob("*.json"))
    if not found:
        raise DescriptorError([f"no bundled descriptors in {directory}: reinstall jailer"])
    return found


def for_this_installation(template: Path, prefix: str | None = None) -> dict:
    """A bundled descriptor with the paths of this installation (the device's own command and
    the `jailer` of its commands directory, the shipped profile of the same type), or with the
    paths a package installed at `prefix` will have, which need not exist yet."""
    data = json.loads(template.read_bytes())
    if prefix is None:
        commands, profile = installation()[0], shipped_profile(data["type"])
    else:
        commands, profile = Path(prefix) / "bin", Path(prefix) / SHIPPED_PROFILES[1] / f"{data['type']}.toml"
    data["binary"] = str(commands / data["type"])
    if "sandbox" in data:
        data["sandbox"] = dict(data["sandbox"], launcher=str(commands / "jailer"), profile=str(profile))
    if prefix is None:
        missing = [path for path in (data["binary"], data.get("sandbox", {}).get("launcher"),
                                     data.get("sandbox", {}).get("profile")) if path and not os.path.exists(path)]
        if missing:
            raise DescriptorError([f"{template}: this installation has no {missing[0]}"])
    parse(data, str(template))
    return data


def install(directory: str, prefix: str | None = None) -> list[str]:
    """Write the bundled descriptors, with this installation's paths (or those of a package
    for `prefix`), into `directory`."""
    from jailer.host import paths

    if prefix is not None and not os.path.isabs(prefix):
        raise UsageError(f"--prefix: found '{prefix}', expected the absolute prefix the package installs to, "
                         "such as /usr")
    written = []
    for template in bundled_templates():
        text = json.dumps(for_this_installation(template, prefix), indent=4) + "\n"
        target = os.path.join(directory, template.name)
        try:
            paths.write_file(target, text.encode(), 0o644, make_dirs=0o755).close()
        except OSError as exc:
            raise JailerError(f"cannot write {target}: {exc.strerror}") from None
        written.append(target)
    return written


def not_in_effect(found, device_type: str | None = None, environ=None) -> list[str]:
    """One line per bundled device type that no descriptor in effect offers, with the command
    that installs it: a wheel's templates are not where management tools look."""
    try:
        types = [json.loads(template.read_bytes()).get("type") for template in bundled_templates()]
    except (DescriptorError, OSError, ValueError):
        return []   # a broken installation: --install says what is wrong
    offered = {d.type for d in found}
    missing = [t for t in dict.fromkeys(types) if t not in offered and device_type in (None, t)]
    if not missing:
        return []
    environ = os.environ if environ is None else environ
    user_dir = _user_config_dir(environ)
    if os.geteuid() == 0 or user_dir is None:
        target = shlex.quote(str(Path("/etc") / SUBDIR))
    else:
        home = (environ.get("HOME") or "").rstrip("/")
        target = str(user_dir / SUBDIR)
        under_home = bool(home) and target.startswith(home + "/")
        target = "~/" + shlex.quote(target[len(home) + 1:]) if under_home else shlex.quote(target)
    command = f"{_this_jailer()} descriptors --install {target}"
    return [f"jailer descriptors: no descriptor in effect for the bundled {t}; install it with: {command}"
            for t in missing]


def _this_jailer() -> str:
    """How to name this installation's `jailer` in a command to copy: its bare name when that
    is what PATH finds."""
    launcher = installation()[0] / "jailer"
    on_path = shutil.which("jailer")
    if on_path and launcher.exists() and Path(on_path).resolve() == launcher.resolve():
        return "jailer"
    return shlex.quote(str(launcher)) if launcher.exists() else f"{shlex.quote(sys.executable)} -m jailer"


def _summary_line(d: Descriptor) -> str:
    ids = f"{d.pci.vendor_id:04x}:{d.pci.device_id:04x} class {d.pci.class_code:06x}"
    runs = f"jailed by {d.sandbox.profile}" if d.sandbox else "unjailed"
    return f"{d.path.name}  {d.type}  {ids}  {d.binary}  {runs}  ({d.path.parent})"


def _click_command():
    import click

    @click.command("descriptors", help="List the vfio-user backend descriptors in effect, in the order a "
                   "management tool picks them (vhost-user search path and masking rules).")
    @click.option("--json", "as_json", is_flag=True, help="Print the descriptors as a JSON list.")
    @click.option("--type", "device_type", metavar="T", help="Only descriptors of device type T.")
    @click.option("--dir", "dirs", multiple=True, type=click.Path(file_okay=False),
                  help="Search these directories (general first) instead of the standard ones.")
    @click.option("--install", "install_dir", metavar="DIR", type=click.Path(file_okay=False),
                  help="Write jailer's bundled descriptors, with this installation's paths, into DIR "
                       "(setup.sh: the venv's share/qemu/vfio-user; as root, /etc/qemu/vfio-user makes them "
                       "visible to every management tool).")
    @click.option("--prefix", metavar="P",
                  help="With --install: write the paths of a package installed at prefix P (P/bin/TYPE, "
                       "P/bin/jailer, P/share/jailer/profiles/TYPE.toml), e.g. --install "
                       "debian/tmp/usr/share/qemu/vfio-user --prefix /usr.")
    def descriptors_command(as_json, device_type, dirs, install_dir, prefix):
        if prefix is not None and not install_dir:
            raise UsageError("--prefix goes with --install DIR: it names where the package that DIR belongs to "
                             "installs jailer")
        if install_dir:
            for target in install(install_dir, prefix):
                click.echo(f"jailer descriptors: wrote {target}", err=True)
            return
        found = search(list(dirs) or None, device_type)
        if as_json:
            click.echo(json.dumps([{"path": str(d.path), **d.data} for d in found], indent=2))
        else:
            for descriptor in found:
                click.echo(_summary_line(descriptor))
        if not found and not as_json:   # say where we looked: an empty listing alone does not tell why
            searched = ", ".join(str(d) for d in (list(dirs) or default_dirs()))
            kind = f" of type '{device_type}'" if device_type else ""
            click.echo(f"no vfio-user descriptors{kind} in {searched}", err=True)
        if not dirs:   # what a management tool would see: a bundled device it cannot find is said
            for line in not_in_effect(found, device_type):
                click.echo(line, err=True)

    return descriptors_command


descriptors_command = _click_command()
