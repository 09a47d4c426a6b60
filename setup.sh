#!/usr/bin/env bash
# Set up jailer on a fresh Debian 12 machine: system packages, then a venv with the project.
# Idempotent; run as root (apt). Set JAILER_SKIP_APT=1 to skip the system packages.
set -euo pipefail
cd "$(dirname "$0")"

apt_packages=(
    python3 python3-venv python3-dev gcc libc6-dev linux-libc-dev musl-tools libcap-dev libseccomp2 libseccomp-dev
    util-linux iproute2 bubblewrap procps systemd libvirt-clients libxml2-utils
    # the real-guest tests: what ../shared/peers' QEMU links against, and the guest's busybox
    libglib2.0-0 libfdt1 zlib1g busybox-static
    # the libvfio-user sample devices of ../shared/peers (bring-your-own-device tests)
    libjson-c5
    # the Debian 12 guest with systemd as pid 1 and cgroup v2 (tests/vm/debian.py): its root
    # file system and the disk that carries the checkout in
    debootstrap e2fsprogs
)
if [ "${JAILER_SKIP_APT:-0}" != 1 ]; then
    missing=()
    for p in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
fi

# Debian's interpreter, by absolute path: a version-manager shim costs >100 ms per start.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check wheel
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat

# Bytecode for jailer and the bundled devices, written here because nothing else writes it:
# the sandbox binds the modules read-only and runs the program with PYTHONDONTWRITEBYTECODE,
# and an editable install compiles nothing, so a device would compile its modules from
# source on every start (the IDIO-16: ready in 69 ms instead of 49).
.venv/bin/python -m compileall -q jailer devices

# jailer-monitor: the native process the launcher becomes once its program is ready (a
# resident Python launcher costs ~8 MiB per device, this 160 kB); see jailer/monitor.py.
# Static, against musl (musl-tools): setup.py's build_monitor says why. An editable install
# leaves it to this line; a wheel's build runs the same function.
.venv/bin/python -c 'import setup; setup.build_monitor("jailer/jailer-monitor")'

# The `jailer` command starts Python isolated and without site (-IS): `jailer run` is a
# start-up hot path and site alone costs more than the kernel work of a whole sandbox.
# jailer.cli adds the venv's site-packages the first time an import needs them.
cat > .venv/bin/jailer <<ENTRY
#!$PWD/.venv/bin/python -IS
import sys
sys.path.insert(0, "$PWD")
from jailer.cli import main
main()
ENTRY

# The bundled vfio-user descriptors, with this installation's paths, where `jailer
# descriptors` (and a tool told this venv's data directory) finds them; an editable install
# copies no data files. As root, `jailer descriptors --install /etc/qemu/vfio-user` makes
# them visible to every management tool following the vhost-user discovery rules.
.venv/bin/jailer descriptors --install .venv/share/qemu/vfio-user
