"""docs/your-own-device.md, run as written: its command block, from the clone's root, with
the libvfio-user sample of ../shared/peers; then a client is served on the socket."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from devices.vfio_user.client import Client
from devices.vfio_user.device import CONFIG

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "your-own-device.md"
SAMPLES = REPO.parent / "shared" / "peers" / "libvfio-user" / "samples"
SOCKET = "/tmp/gpio.sock"

pytestmark = [pytest.mark.skipif(not (SAMPLES / "gpio-pci-idio-16").exists(), reason=f"no samples at {SAMPLES}"),
              pytest.mark.skipif(os.geteuid() != 0, reason="the guide is written for root")]


def guide_commands() -> str:
    return re.search(r"```sh\n(.*?)```", GUIDE.read_text(), re.S).group(1)


def test_the_guide_takes_the_sample_from_its_binary_to_a_served_jailed_device(tmp_path):
    commands = guide_commands()
    assert commands.count("jailer ") == 4
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as errors:
        shell = subprocess.Popen(["bash", "-e", "-c", commands + "wait\n"], cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=errors, text=True, start_new_session=True,
                                 env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    try:
        lines = []
        deadline = time.monotonic() + 240
        while not any('"event":"ready"' in line for line in lines):
            assert time.monotonic() < deadline and shell.poll() is None, (lines, stderr.read_text())
            lines.append(shell.stdout.readline())
        client = Client.connect(SOCKET)
        assert client.region_read(CONFIG, 0, 4) == bytes.fromhex("4f49c80d")
        client.close()
        said = stderr.read_text()
        assert "jailer init: wrote gpio.toml; next: jailer learn gpio.toml --in-place" in said
        assert re.search(r"jailer learn: \d+ syscalls .* written to gpio.toml; validated: nothing refused", said)
        assert "overall: blocked (27 blocked)" in "".join(lines)
        events = [json.loads(line) for line in lines if line.startswith("{")]
        assert [e["event"] for e in events][-2:] == ["listening", "ready"]
    finally:
        os.killpg(shell.pid, signal.SIGTERM)   # the shell, and jailer run, which stops the device
        shell.wait(30)
    deadline = time.monotonic() + 10
    while os.path.exists(SOCKET) and time.monotonic() < deadline:   # jailer removes it once the device is gone
        time.sleep(0.05)
    assert not os.path.exists(SOCKET)
