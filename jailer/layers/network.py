"""Network inside the new net namespace: nothing, loopback, or one veth pair.

"none" leaves even `lo` down. "loopback" brings `lo` up with one SIOCSIFFLAGS ioctl.
"veth" needs the host side too: the launcher (root) creates the pair with pyroute2,
moves the peer into the child's namespace and configures the host end; the child then
addresses and raises its end with plain ioctls. pyroute2 costs ~200 ms to import, so it
is imported only here, only for veth.
"""

from __future__ import annotations

import _socket
import struct

from jailer.layers import syscalls

SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCSIFADDR, SIOCSIFNETMASK = 0x8916, 0x891C
IFF_UP = 0x1
FIX_VETH = "veth networking needs root (CAP_NET_ADMIN on the host); use network mode none or loopback"


def _ifreq(name: str, payload: bytes = b"") -> bytearray:
    return bytearray(struct.pack("16s", name.encode()) + payload.ljust(24, b"\0"))


def _sockaddr_in(address: str) -> bytes:
    return struct.pack("=H2s4s8x", _socket.AF_INET, b"\0\0", _socket.inet_aton(address))


def bring_up(ifname: str, address: str | None = None) -> None:
    """Optionally assign an IPv4 CIDR address, then set IFF_UP on `ifname` in this namespace."""
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    try:
        fd = sock.fileno()
        if address:
            ip, prefix = _split_cidr(address)
            netmask = _socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))
            syscalls.ioctl_ifreq(fd, SIOCSIFADDR, _ifreq(ifname, _sockaddr_in(ip)))
            syscalls.ioctl_ifreq(fd, SIOCSIFNETMASK, _ifreq(ifname, _sockaddr_in(netmask)))
        request = _ifreq(ifname)
        syscalls.ioctl_ifreq(fd, SIOCGIFFLAGS, request)
        flags = struct.unpack_from("H", request, 16)[0] | IFF_UP
        syscalls.ioctl_ifreq(fd, SIOCSIFFLAGS, _ifreq(ifname, struct.pack("H", flags)))
    finally:
        sock.close()


def _split_cidr(cidr: str) -> tuple[str, int]:
    ip, _, prefix = cidr.partition("/")
    return ip, int(prefix or 32)


def setup_inside(network) -> dict:
    """The child's part: lo for loopback and veth, plus the addressed veth end."""
    bring_up("lo")
    if network.mode == "veth":
        bring_up(network.sandbox_ifname, network.sandbox_address)
        return {"mode": "veth", "interface": network.sandbox_ifname, "address": network.sandbox_address}
    return {"mode": "loopback"}


def create_veth(network, child_pid: int) -> None:
    """The launcher's part: the pair, the peer moved into the child's namespace, the host end up."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("add", ifname=network.host_ifname, kind="veth",
                 peer={"ifname": network.sandbox_ifname, "net_ns_pid": child_pid})
        index = ipr.link_lookup(ifname=network.host_ifname)[0]
        if network.host_address:
            ip, prefix = _split_cidr(network.host_address)
            ipr.addr("add", index=index, address=ip, prefixlen=prefix)
        ipr.link("set", index=index, state="up")
