"""`jailer probe SOCKET`: ask a vfio-user server what its device offers, like `lspci -vv`.

Connects as a client, negotiates, reads device/region/IRQ info, the PCI config space
header and capability list, and probes the migration and DMA-logging features. Read-only
for the device: nothing but config-space reads and info queries is sent.
"""

from __future__ import annotations

import errno
import json
import os
import struct

from . import protocol as P
from .client import Client, ClientError

CLASS_NAMES = {
    0x00: "Unclassified device", 0x01: "Mass storage controller", 0x02: "Network controller",
    0x03: "Display controller", 0x04: "Multimedia controller", 0x05: "Memory controller",
    0x06: "Bridge", 0x07: "Communication controller", 0x08: "Generic system peripheral",
    0x09: "Input device controller", 0x0C: "Serial bus controller", 0x11: "Signal processing controller",
    0xFF: "Unassigned class",
}
CAP_NAMES = {0x01: "Power Management", 0x05: "MSI", 0x09: "Vendor Specific", 0x10: "Express", 0x11: "MSI-X"}
IRQ_FLAG_NAMES = ((P.IRQ_INFO_EVENTFD, "eventfd"), (P.IRQ_INFO_MASKABLE, "maskable"),
                  (P.IRQ_INFO_AUTOMASKED, "automasked"), (P.IRQ_INFO_NORESIZE, "noresize"))
MIGRATION_FLAG_NAMES = ((P.MIGRATION_STOP_COPY, "STOP_COPY"), (P.MIGRATION_P2P, "P2P"),
                        (P.MIGRATION_PRE_COPY, "PRE_COPY"))


class ProbeError(Exception):
    """The socket does not answer like a vfio-user server."""


def probe(path: str, timeout: float = 5.0) -> dict:
    """Everything `jailer probe` prints, as a JSON-ready dict."""
    try:
        with Client.connect(path, timeout=timeout) as client:
            return _collect(client)
    except ClientError as exc:
        hint = " (a vfio-user server serves one client at a time: is a VMM connected?)" \
            if exc.errno == errno.ETIMEDOUT else ""
        raise ProbeError(f"probe {path}: {exc}{hint}") from None


def _collect(client: Client) -> dict:
    info = client.device_info()
    result = {
        "version": "%d.%d" % client.server_version,
        "capabilities": client.server_capabilities,
        "device": {"flags": info.flags, "pci": bool(info.flags & P.DEVICE_FLAG_PCI),
                   "reset": bool(info.flags & P.DEVICE_FLAG_RESET),
                   "num_regions": info.num_regions, "num_irqs": info.num_irqs},
        "regions": [], "irqs": [],
    }
    config_size = 0
    for index in range(info.num_regions):
        region, fd = client.region_info(index)
        if fd is not None:
            os.close(fd)
        if index == 7:
            config_size = region.size
        if not region.size:
            continue
        result["regions"].append({
            "index": index, "name": P.REGION_NAMES[index] if index < len(P.REGION_NAMES) else f"region {index}",
            "size": region.size, "readable": bool(region.flags & P.REGION_FLAG_READ),
            "writable": bool(region.flags & P.REGION_FLAG_WRITE), "mmap": bool(region.flags & P.REGION_FLAG_MMAP),
            "sparse_areas": [list(a) for a in region.sparse_areas],
        })
    for index in range(info.num_irqs):
        irq = client.irq_info(index)
        result["irqs"].append({
            "index": index, "name": P.IRQ_NAMES[index] if index < len(P.IRQ_NAMES) else f"irq {index}",
            "count": irq.count, "flags": [name for bit, name in IRQ_FLAG_NAMES if irq.flags & bit],
        })
    if config_size >= 64:
        result["pci"] = _decode_config(client.region_read(7, 0, min(config_size, 256)))
    migration = {"supported": client.probe_feature(P.FEATURE_MIGRATION)}
    if migration["supported"]:
        flags = client.migration_flags()
        migration["flags"] = [name for bit, name in MIGRATION_FLAG_NAMES if flags & bit]
        migration["state"] = P.MIG_STATE_NAMES.get(client.migration_state(), "unknown")
    migration["dma_logging"] = client.probe_feature(P.FEATURE_DMA_LOGGING_START, P.FEATURE_SET)
    result["migration"] = migration
    return result


def _decode_config(cfg: bytes) -> dict:
    vendor, device, command, status = struct.unpack_from("<HHHH", cfg, 0)
    revision, prog_if, subclass, base_class = cfg[8], cfg[9], cfg[10], cfg[11]
    sub_vendor, sub_device = struct.unpack_from("<HH", cfg, 0x2C)
    bars = []
    for i in range(6):
        (raw,) = struct.unpack_from("<I", cfg, 0x10 + 4 * i)
        if raw:
            io = raw & 1
            bars.append({"index": i, "io": bool(io), "64bit": bool(not io and raw & 0x6 == 0x4),
                         "prefetchable": bool(not io and raw & 0x8), "raw": raw})
    caps = []
    if status & 0x10 and len(cfg) > 0x34:
        pos, seen = cfg[0x34] & 0xFC, set()
        while pos and pos not in seen and pos + 1 < len(cfg):
            seen.add(pos)
            caps.append({"offset": pos, "id": cfg[pos], "name": CAP_NAMES.get(cfg[pos], "unknown")})
            pos = cfg[pos + 1] & 0xFC
    return {
        "vendor": vendor, "device": device, "subsystem_vendor": sub_vendor, "subsystem_device": sub_device,
        "class": (base_class << 16) | (subclass << 8) | prog_if, "revision": revision,
        "command": command, "status": status, "header_type": cfg[0x0E],
        "interrupt_pin": cfg[0x3D], "bars": bars, "capabilities": caps,
    }


def _flag(on: bool, name: str) -> str:
    return f"{name}{'+' if on else '-'}"


def format_report(path: str, r: dict) -> str:
    lines = []
    pci = r.get("pci")
    if pci:
        cls = CLASS_NAMES.get(pci["class"] >> 16, "Class")
        lines.append(f"{path}: {cls} [{pci['class'] >> 8:04x}]: Device {pci['vendor']:04x}:{pci['device']:04x} "
                     f"(rev {pci['revision']:02x})")
        lines.append(f"\tSubsystem: Device {pci['subsystem_vendor']:04x}:{pci['subsystem_device']:04x}")
        cmd = pci["command"]
        lines.append("\tControl: " + " ".join([_flag(cmd & 1, "I/O"), _flag(cmd & 2, "Mem"),
                                               _flag(cmd & 4, "BusMaster"), _flag(cmd & 0x400, "DisINTx")]))
        if pci["interrupt_pin"]:
            lines.append(f"\tInterrupt: pin {chr(ord('A') + pci['interrupt_pin'] - 1)}")
    else:
        lines.append(f"{path}: vfio-user device (no readable config space)")
    bars = {b["index"]: b for b in (pci or {}).get("bars", [])}
    for region in r["regions"]:
        access = " ".join(n for n, on in (("R", region["readable"]), ("W", region["writable"]),
                                          ("mmap", region["mmap"])) if on)
        kind = ""
        if region["index"] in bars:
            bar = bars[region["index"]]
            kind = "I/O ports, " if bar["io"] else ("Memory, 64-bit, " if bar["64bit"] else "Memory, 32-bit, ")
            if bar["prefetchable"]:
                kind += "prefetchable, "
        lines.append(f"\tRegion {region['index']} ({region['name']}): {kind}size={_size(region['size'])} [{access}]")
    for cap in (pci or {}).get("capabilities", []):
        lines.append(f"\tCapabilities: [{cap['offset']:02x}] {cap['name']} (id {cap['id']:#04x})")
    for irq in r["irqs"]:
        if irq["count"]:
            lines.append(f"\tIRQ {irq['name']}: {irq['count']} vector{'s' if irq['count'] > 1 else ''} "
                         f"[{' '.join(irq['flags'])}]")
    dev = r["device"]
    lines.append(f"\tvfio-user: protocol {r['version']}, {dev['num_regions']} regions, {dev['num_irqs']} irq types, "
                 f"reset{'+' if dev['reset'] else '-'}, capabilities {json.dumps(r['capabilities'], sort_keys=True)}")
    mig = r["migration"]
    if mig["supported"]:
        lines.append(f"\tMigration: v2 [{' '.join(mig['flags'])}], state {mig['state']}, "
                     f"DMA logging{'+' if mig['dma_logging'] else '-'}")
    else:
        lines.append("\tMigration: not supported")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
