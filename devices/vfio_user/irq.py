"""Interrupt eventfds and their VFIO semantics (DEVICE_SET_IRQS, digest 2.8 and 4.4).

INTx is level-triggered and automasked, as in kernel VFIO: a rising level (or an unmask
while the level is still high) writes the trigger eventfd once and masks the line; the
client unmasks at end of interrupt, either with SET_IRQS(UNMASK) or by signalling the
resample eventfd it registered with DATA_EVENTFD|ACTION_UNMASK. MSI, MSI-X, ERR and REQ
are edge-triggered; a vector signalled while masked stays pending and fires on unmask.
While the device is not running (migration STOP and friends) nothing is signalled; what
would have fired is delivered when it runs again. Only one of INTx, MSI and MSI-X may
have trigger eventfds at a time.
"""

from __future__ import annotations

import os

from . import protocol as P
from .connection import close_fds
from .device import DeviceError, IRQ_ERR, IRQ_INTX, IRQ_MSI, IRQ_MSIX, IRQ_REQ

_EXCLUSIVE = (IRQ_INTX, IRQ_MSI, IRQ_MSIX)


def irq_info_flags(index: int) -> int:
    """ERR and REQ take only ACTION_TRIGGER, so they are not maskable (as in kernel vfio-pci)."""
    if index == IRQ_INTX:
        return P.IRQ_INFO_EVENTFD | P.IRQ_INFO_MASKABLE | P.IRQ_INFO_AUTOMASKED
    if index in (IRQ_ERR, IRQ_REQ):
        return P.IRQ_INFO_EVENTFD
    return P.IRQ_INFO_EVENTFD | P.IRQ_INFO_MASKABLE


class _Vector:
    __slots__ = ("trigger", "masked", "pending")

    def __init__(self):
        self.trigger: int | None = None
        self.masked = False
        self.pending = False


class IrqTable:
    def __init__(self, counts, watch=None, unwatch=None):
        """counts[i] = vectors of irq index i; watch(fd, cb)/unwatch(fd) follow resample fds."""
        self.vectors = [[_Vector() for _ in range(count)] for count in counts]
        self.intx_level = False
        self.resample_fd: int | None = None
        self.running = True
        self._watch = watch
        self._unwatch = unwatch

    # --- device side --------------------------------------------------------------------

    def set_intx(self, asserted: bool) -> None:
        rising = asserted and not self.intx_level
        self.intx_level = asserted
        if rising:
            self._fire_intx()

    def _fire_intx(self) -> None:
        vectors = self.vectors[IRQ_INTX]
        if not vectors:
            return
        v = vectors[0]
        if v.masked or not self.running:
            v.pending = True
            return
        v.pending = False
        if v.trigger is not None:
            v.masked = True                     # automasked until the client unmasks
            _signal(v.trigger)

    def signal(self, index: int, vector: int) -> None:
        if index == IRQ_INTX:
            raise DeviceError("INTx is level-triggered: use set_intx()")
        try:
            v = self.vectors[index][vector]
        except IndexError:
            raise DeviceError(f"no vector {vector} of {P.IRQ_NAMES[index] if index < 5 else index}") from None
        if v.masked or not self.running:
            v.pending = True
        elif v.trigger is not None:
            _signal(v.trigger)

    def set_running(self, running: bool) -> None:
        self.running = running
        if not running:
            return
        for index, vectors in enumerate(self.vectors):
            for number, v in enumerate(vectors):
                if v.pending and not v.masked:
                    if index == IRQ_INTX:
                        if self.intx_level:
                            self._fire_intx()
                        else:
                            v.pending = False
                    else:
                        v.pending = False
                        if v.trigger is not None:
                            _signal(v.trigger)

    # --- client side (DEVICE_SET_IRQS) --------------------------------------------------

    def set_irqs(self, msg, fds: list) -> None:
        """Apply a decoded SetIrqs; takes the fds it keeps out of `fds`."""
        index, start, count = msg.index, msg.start, msg.count
        if index >= len(self.vectors):
            raise DeviceError(f"irq index {index} does not exist")
        vectors = self.vectors[index]
        if count == 0:                          # DATA_NONE|TRIGGER, start 0: disable the index
            self._disable(index, range(len(vectors)))
            return
        if start + count > len(vectors):
            raise DeviceError(f"{P.IRQ_NAMES[index]} vectors {start}..{start + count - 1} exceed its "
                              f"{len(vectors)} vector(s)")
        if index in (IRQ_ERR, IRQ_REQ) and msg.action != P.IRQ_ACTION_TRIGGER:
            raise DeviceError(f"{P.IRQ_NAMES[index]} accepts only ACTION_TRIGGER")
        selected = range(start, start + count)
        if msg.data_type == P.IRQ_DATA_BOOL:
            selected = [n for n, flag in zip(selected, msg.data) if flag]
        if msg.data_type == P.IRQ_DATA_EVENTFD:
            self._assign(index, msg.action, start, count, fds)
        elif msg.action == P.IRQ_ACTION_TRIGGER:
            for n in selected:
                if index == IRQ_INTX:
                    self._fire_intx()
                else:
                    self.signal(index, n)
        elif msg.action == P.IRQ_ACTION_MASK:
            for n in selected:
                vectors[n].masked = True
        else:
            for n in selected:
                self._unmask(index, n)

    def _unmask(self, index: int, n: int) -> None:
        v = self.vectors[index][n]
        v.masked = False
        if index == IRQ_INTX:
            if self.intx_level or v.pending:
                v.pending = False
                if self.intx_level:
                    self._fire_intx()
        elif v.pending and self.running:
            v.pending = False
            if v.trigger is not None:
                _signal(v.trigger)

    def _assign(self, index: int, action: int, start: int, count: int, fds: list) -> None:
        if action == P.IRQ_ACTION_MASK:
            raise DeviceError("DATA_EVENTFD with ACTION_MASK is not supported")
        if action == P.IRQ_ACTION_UNMASK:
            if index != IRQ_INTX or count != 1:
                raise DeviceError("a resample (unmask) eventfd exists only for INTx vector 0")
            if fds and not is_eventfd(fds[0]):
                raise DeviceError("the INTx resample fd is not an eventfd")
            self._set_resample(fds.pop() if fds else None)
            return
        if fds and index in _EXCLUSIVE:
            for other in _EXCLUSIVE:
                if other != index and any(v.trigger is not None for v in self.vectors[other]):
                    raise DeviceError(f"{P.IRQ_NAMES[other]} is enabled: disable it before enabling "
                                      f"{P.IRQ_NAMES[index]}")
        for fd in fds:
            if not is_eventfd(fd):
                raise DeviceError(f"fd passed for {P.IRQ_NAMES[index]} is not an eventfd")
        new = list(fds) if fds else [None] * count
        fds.clear()
        for n, fd in zip(range(start, start + count), new):
            v = self.vectors[index][n]
            if v.trigger is not None:
                close_fds([v.trigger])
            v.trigger = fd
            if fd is None:
                v.pending = False
                v.masked = False

    def _set_resample(self, fd: int | None) -> None:
        if self.resample_fd is not None:
            if self._unwatch:
                self._unwatch(self.resample_fd)
            close_fds([self.resample_fd])
        self.resample_fd = fd
        if fd is not None and self._watch:
            self._watch(fd, self._on_resample)

    def _on_resample(self) -> None:
        try:
            os.eventfd_read(self.resample_fd)
        except (BlockingIOError, OSError):
            return
        self._unmask(IRQ_INTX, 0)

    def _disable(self, index: int, numbers) -> None:
        for n in numbers:
            v = self.vectors[index][n]
            if v.trigger is not None:
                close_fds([v.trigger])
            v.trigger = None
            v.masked = v.pending = False
        if index == IRQ_INTX:
            self._set_resample(None)

    def close(self) -> None:
        """Drop every eventfd (client gone); levels and device state stay."""
        for index, vectors in enumerate(self.vectors):
            self._disable(index, range(len(vectors)))


def is_eventfd(fd: int) -> bool:
    """Writing to anything else (a full pipe) could block the server."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def _signal(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except OSError:
        pass        # a full or foreign fd: the client's problem, never the device's
