"""The contract between the vfio-user server and a device model.

The server (devices.vfio_user.server) owns the protocol, the socket, DMA mappings,
interrupt eventfds and migration; a device model owns registers and behaviour. The
model never touches a socket: it answers region accesses and raises interrupts and
DMA through the DeviceHost it is attached to. That split lets the same model run
under the server, in unit tests with a fake host, and across migrations.
"""

from __future__ import annotations

import abc
import errno
from dataclasses import dataclass

# vfio region indices for a PCI device (VFIO_PCI_*_REGION_INDEX).
BAR0, BAR1, BAR2, BAR3, BAR4, BAR5, ROM, CONFIG, VGA = range(9)
NUM_PCI_REGIONS = 9

# vfio irq indices for a PCI device (VFIO_PCI_*_IRQ_INDEX).
IRQ_INTX, IRQ_MSI, IRQ_MSIX, IRQ_ERR, IRQ_REQ = range(5)
NUM_PCI_IRQS = 5


class DeviceError(Exception):
    """A region access or state operation the device refuses; `errno` goes into the error reply."""

    def __init__(self, message: str, err: int = errno.EINVAL):
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class Region:
    size: int                       # 0 = region not implemented
    readable: bool = True
    writable: bool = True
    mmap_fd: int | None = None      # an fd the client may mmap (whole region, offset 0)


class DeviceHost(abc.ABC):
    """What a device may ask of whoever runs it (the server, or a test double)."""

    @abc.abstractmethod
    def set_intx(self, asserted: bool) -> None:
        """Drive the level of INTx; the host turns a rising level into an eventfd signal
        and re-signals on unmask/resample while the level stays asserted."""

    @abc.abstractmethod
    def signal_irq(self, index: int, vector: int) -> None:
        """Edge-triggered interrupt (MSI/MSI-X vector, ERR, REQ)."""

    @abc.abstractmethod
    def dma_read(self, iova: int, length: int) -> bytes:
        """Read guest memory; raises DeviceError(EFAULT) if unmapped."""

    @abc.abstractmethod
    def dma_write(self, iova: int, data: bytes) -> None:
        """Write guest memory (marks pages dirty while DMA logging is on)."""

    def dma_views(self, segments, writable: bool) -> list[memoryview] | None:
        """Guest memory of (iova, length) segments as memoryviews for zero-copy access, or
        None where only dma_read and
        dma_write reach it. Views must be released before the device returns to the server
        loop, or in Device.dma_changing() at the latest."""
        return None


class Device(abc.ABC):
    """A PCI device model. Subclasses set `device_type` and `abi_version`.

    `abi_version` is the version of the guest-visible behaviour and of the saved-state
    format; a destination refuses state whose type or version it does not accept.
    """

    device_type: str = ""
    abi_version: int = 1
    # Largest saved state (Device.save_state()) a migration stream may bring in: the
    # destination buffers the stream until it is complete, and a client must not be able
    # to make that buffer grow without end.
    max_state_size: int = 4 << 20
    pci_ids: tuple[int, int] = (0, 0)   # (vendor, device), for logs and `jailer probe`

    host: DeviceHost | None = None

    def attach(self, host: DeviceHost | None) -> None:
        """Called with the server's host on start, and with None while no client is connected."""
        self.host = host

    def dma_changing(self) -> None:
        """The client's DMA mappings are about to change: drop any views of guest memory."""

    def resumed(self) -> None:
        """Migration brought the device back to RUNNING (after STOP, or a loaded state): work
        the guest queued meanwhile, when no access could reach the device, can start now."""

    @abc.abstractmethod
    def regions(self) -> dict[int, Region]:
        """Region index -> Region, for every index 0..NUM_PCI_REGIONS-1 the device implements."""

    def irq_count(self, index: int) -> int:
        """Number of vectors of irq `index` (0 = not supported)."""
        return 0

    @abc.abstractmethod
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Return exactly `count` bytes or raise DeviceError."""

    @abc.abstractmethod
    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Apply a write or raise DeviceError."""

    @abc.abstractmethod
    def reset(self) -> None:
        """DEVICE_RESET: registers and pending interrupts back to power-on state."""

    @abc.abstractmethod
    def save_state(self) -> bytes:
        """The device's own state (the server wraps it with device_type and abi_version)."""

    @abc.abstractmethod
    def load_state(self, data: bytes, abi_version: int) -> None:
        """Restore state saved by save_state at `abi_version`; raise DeviceError if incompatible."""

    def accepts_abi(self, abi_version: int) -> bool:
        """Whether load_state can take state saved at `abi_version`."""
        return abi_version == self.abi_version

    def check_loadable(self, data: bytes, abi_version: int, header_size: int) -> None:
        """The first checks of every load_state: an accepted ABI version, a whole header."""
        if not self.accepts_abi(abi_version):
            raise DeviceError(f"{self.device_type} state of ABI version {abi_version} is not loadable "
                              f"(this device is version {self.abi_version})")
        if len(data) < header_size:
            raise DeviceError(f"refusing {self.device_type} state: {len(data)} bytes, shorter than its header")
