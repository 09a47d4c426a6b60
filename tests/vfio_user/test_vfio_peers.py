"""Independent peers: the shared C client vfu_bench, and `jailer probe` as a user runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from vfio_helpers import REPO

TOOLS = os.environ.get("JAILER_SHARED_TOOLS") or os.path.join(REPO, "..", "shared", "tools")


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_vfu_bench_c_client(server, tmp_path):
    source = os.path.join(TOOLS, "vfu_bench.c")
    if not os.path.exists(source):
        pytest.skip(f"no vfu_bench.c in {TOOLS}")
    binary = tmp_path / "vfu_bench"
    subprocess.run(["gcc", "-O2", "-o", str(binary), source], check=True)
    result = subprocess.run([str(binary), server.path, "0", "0", "2000"], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, VFU_BENCH_WARMUP="100"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "version: server 0.2" in out
    assert "device: flags 0x3 (reset=1 pci=1) regions 9 irqs 5" in out
    assert "region 7: size 0x100 flags 0x3 R W" in out
    assert "config: vendor 1b36 device 0005" in out
    assert re.search(r"REGION_READ  1B region 0 off 0: 2000 in", out)
    assert re.search(r"REGION_WRITE 1B region 0 off 0: 2000 in", out)


def jailer(*args):
    return subprocess.run([os.path.join(REPO, ".venv", "bin", "jailer"), *args], capture_output=True, text=True,
                          timeout=30, cwd=REPO)


def test_jailer_probe_text_and_json(server):
    text = jailer("probe", server.path)
    assert text.returncode == 0, text.stderr
    assert "Device 1b36:0005" in text.stdout
    assert "Region 1 (BAR1): size=4K [R W mmap]" in text.stdout
    assert "IRQ MSI-X: 8 vectors" in text.stdout
    assert "Migration: v2 [STOP_COPY PRE_COPY], state RUNNING, DMA logging+" in text.stdout
    report = json.loads(jailer("probe", "--json", server.path).stdout)
    assert report["pci"]["vendor"] == 0x1B36 and report["pci"]["interrupt_pin"] == 1
    assert [r["index"] for r in report["regions"]] == [0, 1, 7]
    assert [i["count"] for i in report["irqs"]] == [1, 4, 8, 1, 1]
    assert report["migration"]["supported"] is True


def test_jailer_probe_reports_errors_in_one_line(tmp_path):
    result = jailer("probe", str(tmp_path / "missing.sock"))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "cannot connect" in result.stderr and "Traceback" not in result.stderr


def test_jailer_probe_names_a_busy_server(client, server):
    result = jailer("probe", "--timeout", "0.5", server.path)
    assert result.returncode == 1
    assert "one client at a time" in result.stderr
