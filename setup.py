"""Builds jailer-monitor into every wheel; the project's metadata is in pyproject.toml.

Without jailer/jailer-monitor, jailer keeps the Python launcher resident beside each
running device (jailer/monitor.py). A wheel must therefore carry it: built here from
jailer/monitor.c the way setup.sh builds it in a checkout, or the build fails saying what
to install. The wheel is tagged for this platform, since the monitor is a native program.
"""

import os
import shutil
import subprocess
import tempfile
import warnings

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py
from setuptools.errors import CompileError

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join("jailer", "monitor.c")
TARGET = os.path.join("jailer", "jailer-monitor")
# Static, so no dynamic loader runs while a program waits on a notified syscall; against musl
# where musl-gcc is installed, whose start-up does not probe the CPU: glibc's static start-up
# runs some 75 CPUID instructions, each a VM exit (7.8 us on the development VM: 0.6 ms before
# the monitor answers its first notification), and leaves 900 kB resident against musl's 160 kB.
GCC_FLAGS = ["-O2", "-static", "-Wall", "-Wextra", "-Werror"]
WHAT_TO_INSTALL = "install gcc and the static C library (Debian: apt-get install gcc libc6-dev)"


def build_monitor(output: str) -> None:
    """Compile monitor.c into `output` (musl-gcc if it can, else gcc), or stop the build with one
    line saying what is missing. setup.sh builds a checkout's monitor with this too."""
    gcc = shutil.which("gcc")
    if gcc is None:   # (musl-gcc too runs gcc)
        raise CompileError(f"cannot build {TARGET}: gcc is not on PATH; {WHAT_TO_INSTALL}")
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    source = os.path.join(HERE, SOURCE)
    musl_gcc = shutil.which("musl-gcc")
    if musl_gcc is not None:
        with tempfile.TemporaryDirectory() as headers:
            if _compile([musl_gcc, *GCC_FLAGS, "-isystem", _kernel_headers(gcc, headers)], source, output) is None:
                return
    error = _compile([gcc, *GCC_FLAGS], source, output)
    if error is not None:
        if not _links_static(gcc):
            raise CompileError(f"cannot build {TARGET}: gcc cannot link a static program; {WHAT_TO_INSTALL}")
        raise CompileError(f"cannot build {TARGET} from {SOURCE}:\n{error}")


def _compile(command: list[str], source: str, output: str) -> str | None:
    """None once `output` is built, else the compiler's complaint."""
    result = subprocess.run([*command, "-o", output + ".new", source], capture_output=True, text=True)
    if result.returncode != 0:
        return result.stderr.strip()
    os.chmod(output + ".new", 0o755)
    os.replace(output + ".new", output)
    return None


def _kernel_headers(gcc: str, directory: str) -> str:
    """`directory` holding the Linux UAPI headers alone (linux/, asm/, asm-generic/): musl-gcc
    searches only musl's own headers, and adding all of /usr/include would mix glibc's in."""
    multiarch = subprocess.run([gcc, "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    for name, target in (("linux", "linux"), ("asm-generic", "asm-generic"), ("asm", os.path.join(multiarch, "asm"))):
        os.symlink(os.path.join("/usr/include", target), os.path.join(directory, name))
    return directory


def _links_static(gcc: str) -> bool:
    """Whether gcc builds an empty static program: tells a missing C library from an error in monitor.c."""
    with tempfile.TemporaryDirectory() as scratch:
        return subprocess.run([gcc, "-static", "-x", "c", "-o", os.path.join(scratch, "empty"), "-"],
                              input="int main(void) { return 0; }\n", capture_output=True, text=True).returncode == 0


class BuildPyWithMonitor(build_py):
    """build_py that adds the monitor to the package; an editable install leaves it to setup.sh,
    which builds it in the checkout the editable install points at."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            build_monitor(os.path.join(self.build_lib, TARGET))

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return [*outputs, os.path.join(self.build_lib, TARGET)]


class NativeDistribution(Distribution):
    """Not pure Python: the package goes to platlib and the wheel gets a platform tag."""

    def has_ext_modules(self):
        return True


def _platform_wheel():
    """bdist_wheel tagged py3-none-<platform>: any Python 3 runs the package, only this
    platform runs the monitor. None where no bdist_wheel is importable (building an sdist)."""
    try:
        from setuptools.command.bdist_wheel import bdist_wheel
    except ImportError:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from wheel.bdist_wheel import bdist_wheel
        except ImportError:
            return None

    class PlatformWheel(bdist_wheel):
        def get_tag(self):
            return ("py3", "none", super().get_tag()[2])

    return PlatformWheel


if __name__ == "__main__":   # (setuptools runs this file as __main__; setup.sh imports build_monitor)
    commands = {"build_py": BuildPyWithMonitor}
    platform_wheel = _platform_wheel()
    if platform_wheel is not None:
        commands["bdist_wheel"] = platform_wheel
    setup(distclass=NativeDistribution, cmdclass=commands)
