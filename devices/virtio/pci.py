"""A modern (virtio 1.x, non-transitional) virtio PCI function (virtio 1.2, section 4.1).

Layout, what a guest driver finds:
- config space: vendor 0x1af4, device 0x1040 + the virtio device id, revision 1, and five
  vendor-specific capabilities: common config, notifications, ISR status, device config
  (all in BAR4) and the PCI config access window, then MSI-X (table and PBA in BAR1);
- BAR4 (64-bit memory, 16 KiB): common config at 0x0, ISR at 0x1000, device config at
  0x2000, notifications at 0x3000 (queue N's doorbell at 0x3000 + 4 * N);
- interrupts: MSI-X, one vector for configuration changes and one per queue as the
  driver assigns them, or INTx with the ISR register when MSI-X is off.

QEMU's vfio-user-pci client emulates the MSI-X table itself and forwards every config
write (the MSI-X enable bit included), so the device learns from its own config space
whether to raise vectors or INTx. No region is mmappable, so QEMU posts doorbell writes
without waiting for a reply: a notification costs the guest one message, not a round trip.

A subclass is a virtio device: it sets `virtio_id`, `queue_count`, `queue_size` and
implements device_features(), config_read(), queue_notified() and the state hooks.
"""

from __future__ import annotations

import logging
import struct

from devices.vfio_user.device import BAR1, BAR4, CONFIG, IRQ_MSIX, DeviceError
from devices.vfio_user.pci import MSIX_FLAGS_ENABLE, Bar, ConfigSpace, PciDevice

from .queue import QueueError, SplitQueue

log = logging.getLogger("virtio")

VENDOR_VIRTIO = 0x1AF4
MODERN_DEVICE_ID_BASE = 0x1040
NO_VECTOR = 0xFFFF

# Feature bits the transport and ring implement (virtio 1.2, section 6).
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = F_INDIRECT_DESC | F_EVENT_IDX | F_VERSION_1

# Device status bits.
S_ACKNOWLEDGE = 1
S_DRIVER = 2
S_DRIVER_OK = 4
S_FEATURES_OK = 8
S_NEEDS_RESET = 64
S_FAILED = 128

# ISR status bits.
ISR_QUEUE = 1
ISR_CONFIG = 2

# virtio_pci_cap cfg_type values.
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5
CAP_ID_VENDOR = 0x09

VIRTIO_BAR = BAR4
VIRTIO_BAR_SIZE = 0x4000
COMMON_OFFSET, ISR_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET = 0x0000, 0x1000, 0x2000, 0x3000
STRUCTURE_SIZE = 0x1000
NOTIFY_MULTIPLIER = 4
MSIX_BAR = BAR1
MSIX_BAR_SIZE = 0x1000
MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET = 0x000, 0x800

# struct virtio_pci_common_cfg, up to queue_reset (0x3c bytes).
COMMON = struct.Struct("<IIIIHHBBHHHHHQQQHH")
(C_DFSELECT, C_DF, C_GFSELECT, C_GF, C_MSIX_CONFIG, C_NUM_QUEUES, C_STATUS, C_GENERATION, C_QSELECT,
 C_QSIZE, C_QVECTOR, C_QENABLE, C_QNOTIFY_OFF, C_QDESC, C_QDRIVER, C_QDEVICE, C_QNOTIFY_DATA,
 C_QRESET) = (0x00, 0x04, 0x08, 0x0C, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1A, 0x1C, 0x1E, 0x20, 0x28,
              0x30, 0x38, 0x3A)
_WRITABLE_COMMON = ((C_DFSELECT, 4), (C_GFSELECT, 4), (C_GF, 4), (C_MSIX_CONFIG, 2), (C_STATUS, 1),
                    (C_QSELECT, 2), (C_QSIZE, 2), (C_QVECTOR, 2), (C_QENABLE, 2), (C_QDESC, 8),
                    (C_QDRIVER, 8), (C_QDEVICE, 8))

# Saved state, layout 1: transport registers, each queue, the device's own part, config space.
STATE_MAGIC = b"VIO1"
_STATE = struct.Struct("<4sIIQBBBHHHI")


class VirtioPciDevice(PciDevice):
    virtio_id = 0
    queue_count = 1
    queue_size = 256
    class_code = 0xFF0000

    def __init__(self):
        self.config = ConfigSpace(vendor_id=VENDOR_VIRTIO, device_id=MODERN_DEVICE_ID_BASE + self.virtio_id,
                                  revision=1, class_code=self.class_code, subsystem_vendor_id=VENDOR_VIRTIO,
                                  subsystem_id=self.virtio_id, interrupt_pin=1,
                                  bars={MSIX_BAR: Bar(MSIX_BAR_SIZE, "mem32"),
                                        VIRTIO_BAR: Bar(VIRTIO_BAR_SIZE, "mem64")})
        self._add_virtio_cap(CAP_COMMON, COMMON_OFFSET, COMMON.size)
        self._add_virtio_cap(CAP_NOTIFY, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * self.queue_count,
                             extra=struct.pack("<I", NOTIFY_MULTIPLIER))
        self._add_virtio_cap(CAP_ISR, ISR_OFFSET, 1)
        self._add_virtio_cap(CAP_DEVICE, DEVICE_OFFSET, self.config_size())
        # The PCI configuration access capability: bar, offset and length are the driver's
        # to set, and pci_cfg_data is a window onto that part of the BAR.
        self._pci_cfg = self.config.add_capability(
            CAP_ID_VENDOR, struct.pack("<BBBB2xII4x", 20, CAP_PCI_CFG, 0, 0, 0, 0),
            wmask=bytes(2) + b"\xff" + bytes(3) + b"\xff" * 12)
        self._msix = self.config.add_msix(1 + self.queue_count, MSIX_BAR, MSIX_TABLE_OFFSET,
                                          MSIX_BAR, MSIX_PBA_OFFSET)
        self.queues = [SplitQueue(index, self.queue_size) for index in range(self.queue_count)]
        self.memory = None
        self._transport_power_on()

    def _add_virtio_cap(self, cfg_type: int, offset: int, length: int, extra: bytes = b"") -> int:
        body = struct.pack("<BBBB2xII", 16 + len(extra), cfg_type, VIRTIO_BAR, 0, offset, length) + extra
        return self.config.add_capability(CAP_ID_VENDOR, body)

    def _transport_power_on(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.status = 0
        self.generation = 0
        self.isr = 0
        self.msix_config = NO_VECTOR
        self.queue_select = 0
        for queue in self.queues:
            queue.reset()
        self.set_intx_pending(False)

    # --- for the device subclass ---------------------------------------------------------

    def device_features(self) -> int:
        """Device-specific feature bits (the transport adds its own)."""
        return 0

    def config_size(self) -> int:
        return 0

    def config_read(self, offset: int, count: int) -> bytes:
        """Bytes of the device-specific configuration structure."""
        return bytes(count)

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write into the device configuration (most of it is read-only)."""

    def features_accepted(self, features: int) -> None:
        """FEATURES_OK: the driver settled on `features`."""

    def queue_notified(self, queue: SplitQueue) -> None:
        """The driver notified `queue` (DRIVER_OK, the queue enabled, a client attached)."""

    def virtio_reset(self) -> None:
        """The device-specific part of a reset (device status 0, or DEVICE_RESET)."""

    def save_device_state(self) -> bytes:
        return b""

    def load_device_state(self, data: bytes) -> None:
        if data:
            raise DeviceError(f"unexpected {len(data)} bytes of device state")

    @property
    def features(self) -> int:
        return self.device_features() | TRANSPORT_FEATURES

    @property
    def negotiated(self) -> int:
        return self.driver_features if self.status & S_FEATURES_OK else 0

    @property
    def driver_ok(self) -> bool:
        return self.status & (S_DRIVER_OK | S_NEEDS_RESET) == S_DRIVER_OK

    def needs_reset(self, reason: str) -> None:
        """The driver broke the rules: stop serving and ask it for a reset (spec 2.1.2)."""
        if not self.status & S_NEEDS_RESET:
            log.warning("%s: device needs reset: %s", self.device_type, reason)
            self.status |= S_NEEDS_RESET
            self.notify_config()

    def notify_config(self) -> None:
        self.generation = (self.generation + 1) & 0xFF
        self._interrupt(self.msix_config, ISR_CONFIG)

    def notify_queue(self, queue: SplitQueue) -> None:
        self._interrupt(queue.vector, ISR_QUEUE)

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if self.config.get(self._msix + 2, 2) & MSIX_FLAGS_ENABLE:
            if vector != NO_VECTOR and self.host is not None:
                self.host.signal_irq(IRQ_MSIX, vector)
        else:
            self.isr |= isr_bit
            self.set_intx_pending(True)

    def serve(self, queue: SplitQueue, handle) -> None:
        """Take every available chain, `handle(chain) -> bytes written`, return it, and
        interrupt the driver as it asked; then re-arm its notification and look once more."""
        memory = self.memory
        while True:
            count = queue.pending(memory)
            if not count:
                queue.ask_for_notification(memory)
                if not queue.pending(memory):
                    return
                continue
            for _ in range(count):
                chain = queue.pop(memory)
                queue.push(memory, chain.head, handle(chain))
            if queue.publish(memory):
                self.notify_queue(queue)

    # --- Device ------------------------------------------------------------------------------

    def attach(self, host) -> None:
        super().attach(host)
        self.memory = _HostMemory(host) if host is not None else None
        for queue in self.queues:
            queue.release_views()

    def dma_changing(self) -> None:
        for queue in self.queues:
            queue.release_views()

    def resumed(self) -> None:
        for queue in self.queues:              # chains the source left on the ring, or queued while stopped
            self.kick(queue)

    def reset(self) -> None:
        self.reset_config()
        self._transport_power_on()
        self.virtio_reset()

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == CONFIG and self._in_pci_cfg_data(offset, count):
            self._pci_cfg_access(None)
        return super().region_read(index, offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        super().region_write(index, offset, data)
        if index == CONFIG and self._in_pci_cfg_data(offset, len(data)):
            self._pci_cfg_access(self.config.read(self._pci_cfg + 16, 4))

    def bar_read(self, index: int, offset: int, count: int) -> bytes:
        if index == VIRTIO_BAR:
            if offset < ISR_OFFSET:
                return self._common_bytes()[offset:offset + count].ljust(count, b"\0")
            if offset < DEVICE_OFFSET:
                if offset == ISR_OFFSET:
                    value, self.isr = self.isr, 0       # reading clears and de-asserts INTx
                    self.set_intx_pending(False)
                    return bytes([value]) + bytes(count - 1)
                return bytes(count)
            if offset < NOTIFY_OFFSET:
                return self.config_read(offset - DEVICE_OFFSET, count)
        return bytes(count)                             # notifications, MSI-X PBA: nothing pending here

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        if index != VIRTIO_BAR:
            return
        if offset >= NOTIFY_OFFSET:
            number = (offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER
            if number < self.queue_count:
                self.kick(self.queues[number])
        elif offset < ISR_OFFSET:
            self._common_write(offset, data)
        elif DEVICE_OFFSET <= offset:
            self.config_write(offset - DEVICE_OFFSET, data)

    def kick(self, queue: SplitQueue) -> None:
        if self.driver_ok and queue.enabled and self.memory is not None:
            try:
                queue.bind(self.memory)
                self.queue_notified(queue)
            except QueueError as exc:
                self.needs_reset(str(exc))

    # --- common configuration ------------------------------------------------------------------

    def _selected_queue(self) -> SplitQueue | None:
        return self.queues[self.queue_select] if self.queue_select < self.queue_count else None

    def _common_bytes(self) -> bytes:
        queue = self._selected_queue()
        select = self.device_feature_select
        device_features = (self.features >> (32 * select)) & 0xFFFFFFFF if select < 2 else 0
        driver_select = self.driver_feature_select
        driver_features = (self.driver_features >> (32 * driver_select)) & 0xFFFFFFFF if driver_select < 2 else 0
        queue_fields = (queue.size, queue.vector, int(queue.enabled), queue.index, queue.desc, queue.avail,
                        queue.used, queue.index, 0) if queue else (0,) * 9
        return COMMON.pack(self.device_feature_select, device_features, self.driver_feature_select,
                           driver_features, self.msix_config, self.queue_count, self.status & 0xFF,
                           self.generation, self.queue_select, *queue_fields)

    def _common_write(self, offset: int, data: bytes) -> None:
        merged = bytearray(self._common_bytes())
        end = min(offset + len(data), len(merged))
        merged[offset:end] = data[:end - offset]
        for field, width in _WRITABLE_COMMON:
            if field < end and offset < field + width:
                self._set_common(field, int.from_bytes(merged[field:field + width], "little"))

    def _set_common(self, field: int, value: int) -> None:
        queue = self._selected_queue()
        if field == C_DFSELECT:
            self.device_feature_select = value
        elif field == C_GFSELECT:
            self.driver_feature_select = value
        elif field == C_GF:
            if self.driver_feature_select < 2 and not self.status & S_FEATURES_OK:
                shift = 32 * self.driver_feature_select
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif field == C_MSIX_CONFIG:
            self.msix_config = value if value < self.config.msix_vectors else NO_VECTOR
        elif field == C_STATUS:
            self._set_status(value)
        elif field == C_QSELECT:
            self.queue_select = value
        elif queue is None or (queue.enabled and field != C_QVECTOR):
            return                                      # no such queue, or live: read-only now
        elif field == C_QSIZE:
            queue.size = value
        elif field == C_QVECTOR:
            queue.vector = value if value < self.config.msix_vectors else NO_VECTOR
        elif field == C_QENABLE:
            if value == 1:
                self._enable(queue)
        elif field == C_QDESC:
            queue.desc = value
        elif field == C_QDRIVER:
            queue.avail = value
        elif field == C_QDEVICE:
            queue.used = value

    def _enable(self, queue: SplitQueue) -> None:
        problem = queue.problem()
        if problem:
            self.needs_reset(problem)
            return
        queue.enabled = True
        queue.event_idx = bool(self.negotiated & F_EVENT_IDX)
        queue.indirect = bool(self.negotiated & F_INDIRECT_DESC)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self._transport_power_on()
            self.virtio_reset()
            return
        value &= 0xFF
        if value & S_FEATURES_OK and not self.status & S_FEATURES_OK:
            unknown = self.driver_features & ~self.features
            if unknown or not self.driver_features & F_VERSION_1:
                log.warning("%s: refusing driver features %#x (offered %#x; VERSION_1 is required)",
                            self.device_type, self.driver_features, self.features)
                value &= ~S_FEATURES_OK
            else:
                self.features_accepted(self.driver_features)
        starting = value & S_DRIVER_OK and not self.status & S_DRIVER_OK
        self.status = value | (self.status & S_NEEDS_RESET)
        if starting:
            for queue in self.queues:              # buffers made available before DRIVER_OK
                self.kick(queue)

    # --- the PCI configuration access window -----------------------------------------------------

    def _in_pci_cfg_data(self, offset: int, count: int) -> bool:
        window = self._pci_cfg + 16
        return offset < window + 4 and window < offset + count

    def _pci_cfg_access(self, written: bytes | None) -> None:
        """Carry a pci_cfg_data access over to the BAR the capability points at."""
        cap = self._pci_cfg
        bar = self.config.data[cap + 4]
        offset, length = struct.unpack_from("<II", self.config.data, cap + 8)
        if bar != VIRTIO_BAR or length not in (1, 2, 4) or offset % length or offset + length > VIRTIO_BAR_SIZE:
            return
        if written is None:
            self.config.data[cap + 16:cap + 16 + length] = self.bar_read(bar, offset, length)
        else:
            self.bar_write(bar, offset, written[:length])

    # --- saved state ------------------------------------------------------------------------------

    def save_state(self) -> bytes:
        own = self.save_device_state()
        parts = [_STATE.pack(STATE_MAGIC, self.device_feature_select, self.driver_feature_select,
                             self.driver_features, self.status, self.generation, self.isr, self.msix_config,
                             self.queue_select, self.queue_count, len(own))]
        parts += [queue.save() for queue in self.queues]
        parts += [own, self.config.snapshot()]
        return b"".join(parts)

    def load_state(self, data: bytes, abi_version: int) -> None:
        self.check_loadable(data, abi_version, _STATE.size)
        (magic, dfselect, gfselect, driver_features, status, generation, isr, msix_config, queue_select,
         queue_count, own_length) = _STATE.unpack_from(data)
        queues_end = _STATE.size + queue_count * SplitQueue.STATE.size
        expected = queues_end + own_length + self.config.size
        problems = [(magic != STATE_MAGIC, f"bad magic {magic!r}"),
                    (queue_count != self.queue_count, f"{queue_count} queues, this device has {self.queue_count}"),
                    (len(data) != expected, f"{len(data)} bytes, expected {expected}"),
                    (driver_features & ~self.features, f"driver features {driver_features:#x} beyond the "
                                                       f"offered {self.features:#x}"),
                    (isr & ~(ISR_QUEUE | ISR_CONFIG), f"bad ISR {isr:#x}")]
        for bad, problem in problems:
            if bad:
                raise DeviceError(f"refusing {self.device_type} state: {problem}")
        snapshot = [queue.save() for queue in self.queues]
        try:
            for queue, offset in zip(self.queues, range(_STATE.size, queues_end, SplitQueue.STATE.size)):
                queue.load(data[offset:offset + SplitQueue.STATE.size])
            self.load_device_state(data[queues_end:queues_end + own_length])
            self.config.restore(data[queues_end + own_length:])
        except (ValueError, DeviceError) as exc:
            for queue, saved in zip(self.queues, snapshot):
                queue.load(saved)
            raise DeviceError(f"refusing {self.device_type} state: {exc}") from None
        self.device_feature_select, self.driver_feature_select = dfselect, gfselect
        self.driver_features, self.status, self.generation = driver_features, status, generation
        self.msix_config, self.queue_select, self.isr = msix_config, queue_select, isr
        for queue in self.queues:
            queue.event_idx = bool(self.negotiated & F_EVENT_IDX)
            queue.indirect = bool(self.negotiated & F_INDIRECT_DESC)
        if self.status & S_FEATURES_OK:
            self.features_accepted(self.driver_features)
        self.set_intx_pending(bool(isr))


class _HostMemory:
    """The DeviceHost's DMA calls under the names the virtqueue code uses."""

    __slots__ = ("read", "write", "views")

    def __init__(self, host):
        self.read = host.dma_read
        self.write = host.dma_write
        self.views = host.dma_views
