"""The split virtqueue (virtio 1.2, section 2.7), read and written in guest memory.

Everything here is driven by the device through a `memory` object with three methods
(the server's DeviceHost has them, a test uses a bytearray):

    memory.read(iova, length) -> bytes           raises DeviceError when unmapped
    memory.write(iova, data)
    memory.views(iova, length, writable) -> [memoryview] | None   (None: no zero-copy)

The guest driver owns the rings, so nothing in them is trusted: a head or `next` index
past the queue size, a chain longer than the queue (a loop), a nested or empty indirect
table, a readable descriptor after a writable one, an avail index that runs more than a
queue ahead, or ring memory that is not mapped all raise QueueError. The spec's answer
(2.1.2) is DEVICE_NEEDS_RESET: the transport stops serving the queue and tells the driver,
rather than guessing. Buffer addresses are checked where they are used (the device's
request handling), because only there is a bad one the request's error and not the ring's.
"""

from __future__ import annotations

import struct

from devices.vfio_user.device import DeviceError

DESC = struct.Struct("<QIHH")       # addr, len, flags, next
DESC_SIZE = DESC.size
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")    # id, len

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1

MAX_QUEUE_SIZE = 32768
# An indirect table is bounded by the queue's own size in Linux (it never builds one
# larger than the segments it announced); a hostile driver gets no more than this.
MAX_INDIRECT = 1024


class QueueError(Exception):
    """The driver broke the ring's rules: the device must stop and ask for a reset."""


class Chain:
    """One available descriptor chain: `readable` and `writable` are (iova, length) lists."""

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list, writable: list):
        self.head = head
        self.readable = readable
        self.writable = writable

    @property
    def readable_length(self) -> int:
        return sum(length for _, length in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(length for _, length in self.writable)


def split_segments(segments: list, length: int) -> tuple[list, list]:
    """(the first `length` bytes of `segments`, the rest), cutting a segment if needed."""
    head, tail = [], []
    remaining = length
    for iova, size in segments:
        if remaining >= size:
            head.append((iova, size))
            remaining -= size
        elif remaining > 0:
            head.append((iova, remaining))
            tail.append((iova + remaining, size - remaining))
            remaining = 0
        else:
            tail.append((iova, size))
    return head, tail


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event: whether moving an index from `old` to `new` crosses `event`."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class SplitQueue:
    """One virtqueue's driver-programmed configuration and the device's position in it."""

    def __init__(self, index: int, max_size: int):
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} must be a power of two up to {MAX_QUEUE_SIZE}")
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.enabled = False
        self.vector = 0xFFFF            # VIRTIO_MSI_NO_VECTOR
        self.desc = self.avail = self.used = 0
        self.last_avail = 0             # next avail ring entry the device takes
        self.used_idx = 0               # next used ring entry the device fills
        self.signalled_used = 0         # used index the driver was last interrupted for
        self.event_idx = False
        self.indirect = False
        self.release_views()

    # --- direct views of the rings ---------------------------------------------------------------

    def bind(self, memory) -> None:
        """Keep memoryviews of the descriptor table and the driver area when each lies in one
        fd-backed mapping: the per-request reads then cost no lookup. The device area is
        written through memory.write, which keeps dirty logging right."""
        if self._bound:
            return
        self._bound = True
        for name, address, length in (("_desc_view", self.desc, DESC_SIZE * self.size),
                                      ("_avail_view", self.avail, 6 + 2 * self.size)):
            try:
                views = memory.views([(address, length)], False)
            except DeviceError:
                views = None                    # unmapped: the accesses themselves will say so
            if views is not None and len(views) == 1:
                setattr(self, name, views[0])
            else:
                for view in views or ():
                    view.release()

    def release_views(self) -> None:
        """Before the client's mappings change (Device.dma_changing), and at reset."""
        for name in ("_desc_view", "_avail_view"):
            view = getattr(self, name, None)
            if view is not None:
                view.release()
            setattr(self, name, None)
        self._bound = False

    # --- configuration (the transport's common config structure) -------------------------

    def problem(self) -> str | None:
        """Why the driver's configuration cannot be enabled, or None."""
        if not 1 <= self.size <= self.max_size or self.size & (self.size - 1):
            return f"queue {self.index}: size {self.size} is not a power of two up to {self.max_size}"
        for name, address, alignment in (("descriptor table", self.desc, 16), ("driver area", self.avail, 2),
                                         ("device area", self.used, 4)):
            if address % alignment:
                return f"queue {self.index}: {name} at {address:#x} is not {alignment}-byte aligned"
        return None

    # --- the device's side of the rings ---------------------------------------------------

    def avail_idx(self, memory) -> int:
        if self._avail_view is not None:
            return U16.unpack_from(self._avail_view, 2)[0]
        return U16.unpack(self._read(memory, self.avail + 2, 2))[0]

    def pending(self, memory) -> int:
        """How many chains the driver has made available that the device has not taken."""
        count = (self.avail_idx(memory) - self.last_avail) & 0xFFFF
        if count > self.size:
            raise QueueError(f"queue {self.index}: the driver made {count} buffers available "
                             f"in a ring of {self.size}")
        return count

    def pop(self, memory) -> Chain:
        """The next available chain (call only while pending() > 0)."""
        slot = self.last_avail % self.size
        if self._avail_view is not None:
            head = U16.unpack_from(self._avail_view, 4 + 2 * slot)[0]
        else:
            head = U16.unpack(self._read(memory, self.avail + 4 + 2 * slot, 2))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return self.chain(memory, head)

    def chain(self, memory, head: int) -> Chain:
        size = self.size
        if head >= size:
            raise QueueError(f"queue {self.index}: head {head} is outside the ring of {size}")
        table = None                    # bytes of an indirect table once we are in one
        readable, writable = [], []
        index, seen, limit = head, 0, size
        ring = self._desc_view
        while True:
            if table is None:
                if ring is not None:
                    addr, length, flags, next_index = DESC.unpack_from(ring, DESC_SIZE * index)
                else:
                    addr, length, flags, next_index = DESC.unpack(self._read(memory, self.desc + DESC_SIZE * index,
                                                                             DESC_SIZE))
            else:
                addr, length, flags, next_index = DESC.unpack_from(table, DESC_SIZE * index)
            seen += 1
            if seen > limit:
                raise QueueError(f"queue {self.index}: the chain from head {head} is longer than {limit} "
                                 f"descriptors (a loop)")
            if flags & DESC_F_INDIRECT:
                if table is not None:
                    raise QueueError(f"queue {self.index}: an indirect descriptor inside an indirect table")
                if not self.indirect:
                    raise QueueError(f"queue {self.index}: an indirect descriptor, but INDIRECT_DESC "
                                     f"was not negotiated")
                if flags & DESC_F_NEXT or readable or writable:
                    raise QueueError(f"queue {self.index}: an indirect descriptor must be the chain's only one")
                if not length or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise QueueError(f"queue {self.index}: an indirect table of {length} bytes (expected a "
                                     f"multiple of {DESC_SIZE}, at most {MAX_INDIRECT} descriptors)")
                table = self._read(memory, addr, length)
                index, seen, limit = 0, 0, length // DESC_SIZE
                continue
            if flags & DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise QueueError(f"queue {self.index}: a device-readable descriptor after a writable one")
            else:
                readable.append((addr, length))
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable)
            index = next_index
            if index >= limit:
                raise QueueError(f"queue {self.index}: next index {index} is outside "
                                 f"{'the indirect table' if table is not None else 'the ring'} of {limit}")

    def push(self, memory, head: int, written: int) -> None:
        """Return a chain to the driver; the used index is published by publish()."""
        slot = self.used_idx % self.size
        self._write(memory, self.used + 4 + USED_ELEM.size * slot, USED_ELEM.pack(head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish(self, memory) -> bool:
        """Make the used entries visible; returns whether the driver wants an interrupt."""
        self._write(memory, self.used + 2, U16.pack(self.used_idx))
        old, new = self.signalled_used, self.used_idx
        if old == new:
            return False
        view = self._avail_view
        if self.event_idx:
            offset = 4 + 2 * self.size
            used_event = U16.unpack_from(view, offset)[0] if view is not None else \
                U16.unpack(self._read(memory, self.avail + offset, 2))[0]
            wanted = need_event(used_event, new, old)
        else:
            flags = U16.unpack_from(view, 0)[0] if view is not None else U16.unpack(self._read(memory, self.avail, 2))[0]
            wanted = not flags & AVAIL_F_NO_INTERRUPT
        self.signalled_used = new
        return wanted

    def ask_for_notification(self, memory) -> None:
        """With EVENT_IDX: notify me once you make anything past what I have taken available."""
        if self.event_idx:
            self._write(memory, self.used + 4 + USED_ELEM.size * self.size, U16.pack(self.last_avail))

    def _read(self, memory, iova: int, length: int) -> bytes:
        try:
            return memory.read(iova, length)
        except DeviceError as exc:          # unmapped ring memory is the ring's fault
            raise QueueError(f"queue {self.index}: cannot read ring memory at {iova:#x}: {exc}") from None

    def _write(self, memory, iova: int, data: bytes) -> None:
        try:
            memory.write(iova, data)
        except DeviceError as exc:
            raise QueueError(f"queue {self.index}: cannot write ring memory at {iova:#x}: {exc}") from None

    # --- saved state -------------------------------------------------------------------------

    STATE = struct.Struct("<HBHQQQHHH")

    def save(self) -> bytes:
        return self.STATE.pack(self.size, self.enabled, self.vector, self.desc, self.avail, self.used,
                               self.last_avail, self.used_idx, self.signalled_used)

    def load(self, data: bytes) -> None:
        (size, enabled, vector, desc, avail, used, last_avail, used_idx,
         signalled) = self.STATE.unpack(data)
        self.release_views()
        self.size, self.enabled, self.vector = size, bool(enabled), vector
        self.desc, self.avail, self.used = desc, avail, used
        self.last_avail, self.used_idx, self.signalled_used = last_avail, used_idx, signalled
        if enabled and (problem := self.problem()):
            raise ValueError(problem)
