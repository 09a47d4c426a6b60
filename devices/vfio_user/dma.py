"""The client's DMA address space as the server sees it, and dirty-page logging.

Mappings that came with an fd are mmapped (MAP_SHARED) and accessed directly; mappings
without one are reached through message-based DMA_READ/DMA_WRITE, via the callbacks the
server supplies. Policy (digest 8.2, because QEMU aborts when a map fails at run time):
a new mapping replaces whatever it overlaps (old mappings are trimmed or split, their
fd and mmap live as long as any piece does); an unmap removes the mappings it fully
covers, refuses one that would cut a mapping (partial overlap: EINVAL), and succeeds
quietly when nothing is mapped there. Dirty logging covers writes this server
makes through fd-backed mappings; message-based writes are the client's to track
(libvfio-user #751).
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import stat

from . import protocol as P
from .connection import close_fds
from .device import DeviceError


class _Backing:
    """An fd and its mmap, shared by the pieces of a mapping that was trimmed or split."""

    __slots__ = ("fd", "mm", "view", "base", "refs")

    def __init__(self, fd: int, mm: mmap.mmap | None, base: int):
        self.fd = fd
        self.mm = mm
        self.view = memoryview(mm) if mm is not None else None
        self.base = base        # file offset of mm[0]
        self.refs = 0

    def release(self) -> None:
        self.refs -= 1
        if self.refs <= 0:
            if self.view is not None:
                self.view.release()
                self.mm.close()
            close_fds([self.fd])


class Mapping:
    __slots__ = ("iova", "size", "flags", "backing", "offset")

    def __init__(self, iova: int, size: int, flags: int, backing: _Backing | None, offset: int):
        self.iova = iova
        self.size = size
        self.flags = flags
        self.backing = backing
        self.offset = offset    # position of `iova` inside backing.mm

    @property
    def end(self) -> int:
        return self.iova + self.size

    def piece(self, start: int, end: int) -> "Mapping":
        if self.backing is not None:
            self.backing.refs += 1
        return Mapping(start, end - start, self.flags, self.backing, self.offset + (start - self.iova))


def _map_granularity(fd: int) -> int:
    blksize = os.fstat(fd).st_blksize
    if blksize > mmap.PAGESIZE and blksize & (blksize - 1) == 0:
        return blksize                                  # hugetlbfs: 2 MiB pages
    return mmap.PAGESIZE


class DmaSpace:
    def __init__(self, message_read=None, message_write=None, max_maps: int = P.MAX_DMA_MAPS):
        self._maps: list[Mapping] = []                  # sorted by iova, never overlapping
        self._starts: list[int] = []
        self._message_read = message_read               # (iova, length) -> bytes
        self._message_write = message_write             # (iova, data) -> None
        self.max_maps = max_maps
        self.log_page_size = 0                          # 0 = dirty logging off
        self._log_ranges: tuple = ()
        self._dirty: set[int] = set()                   # page numbers (iova // log_page_size)
        # Called before any mapping goes away or moves: whoever holds views() of guest
        # memory must drop them then (an mmap with exported views cannot be closed).
        self.before_change = None
        self._recent: Mapping | None = None             # the fd-backed mapping the last access hit

    # --- map / unmap --------------------------------------------------------------------

    def _changing(self) -> None:
        self._recent = None
        if self.before_change is not None:
            self.before_change()

    def map(self, iova: int, size: int, flags: int, fd: int | None = None, offset: int = 0) -> None:
        """Add a mapping; takes ownership of `fd` (closed on failure too)."""
        self._changing()
        try:
            backing = self._backing(fd, offset, size, flags) if fd is not None else None
        except BaseException:
            close_fds([fd])
            raise
        self._remove_range(iova, iova + size)
        if len(self._maps) >= self.max_maps:
            if backing is not None:
                backing.release()
            raise DeviceError(f"too many DMA mappings (limit {self.max_maps})", errno.ENOSPC)
        mapping = Mapping(iova, size, flags, backing, offset - backing.base if backing else 0)
        if backing is not None:
            backing.refs += 1
        index = bisect.bisect(self._starts, iova)
        self._maps.insert(index, mapping)
        self._starts.insert(index, iova)

    @staticmethod
    def _backing(fd: int, offset: int, size: int, flags: int) -> _Backing:
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and offset + size > st.st_size:
                raise DeviceError(f"DMA_MAP: file of {st.st_size} bytes is smaller than offset "
                                  f"{offset:#x} + size {size:#x}", errno.EINVAL)
            gran = _map_granularity(fd)
            base = offset - offset % gran
            length = -(-(offset + size - base) // gran) * gran
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if flags & P.DMA_MAP_FLAG_WRITE else 0)
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=base)
        except OSError as exc:
            raise DeviceError(f"DMA_MAP: cannot mmap the region: {exc.strerror}", exc.errno or errno.EINVAL) from None
        return _Backing(fd, mm, base)

    def unmap(self, iova: int, size: int) -> None:
        end = iova + size
        hit = [m for m in self._overlapping(iova, end)]
        partial = [m for m in hit if m.iova < iova or m.end > end]
        if partial:
            m = partial[0]
            raise DeviceError(f"DMA_UNMAP [{iova:#x}, {end:#x}) cuts mapping [{m.iova:#x}, {m.end:#x})",
                              errno.EINVAL)
        self._changing()
        self._remove_range(iova, end)

    def unmap_all(self) -> None:
        self._changing()
        for m in self._maps:
            if m.backing is not None:
                m.backing.release()
        self._maps.clear()
        self._starts.clear()

    def close(self) -> None:
        """The client is gone: unmap everything, stop logging, and let go of the message
        channel (the server's session, which holds this space)."""
        self.unmap_all()
        self.stop_logging()
        self._message_read = self._message_write = self.before_change = None

    def _overlapping(self, start: int, end: int):
        index = max(bisect.bisect(self._starts, start) - 1, 0)
        for m in self._maps[index:]:
            if m.iova >= end:
                break
            if m.end > start:
                yield m

    def _remove_range(self, start: int, end: int) -> None:
        """Drop [start, end) from the address space, trimming or splitting mappings."""
        victims = list(self._overlapping(start, end))
        if not victims:
            return
        kept = []
        for m in victims:
            if m.iova < start:
                kept.append(m.piece(m.iova, start))
            if m.end > end:
                kept.append(m.piece(end, m.end))
            if m.backing is not None:
                m.backing.release()
        ids = {id(m) for m in victims}
        self._maps = sorted([m for m in self._maps if id(m) not in ids] + kept, key=lambda m: m.iova)
        self._starts = [m.iova for m in self._maps]

    # --- access -------------------------------------------------------------------------

    def _pieces(self, iova: int, length: int, need_flag: int):
        """(mapping, start, end) covering [iova, iova+length) contiguously, or DeviceError(EFAULT)."""
        end = iova + length
        pos = iova
        index = bisect.bisect(self._starts, iova) - 1
        while pos < end:
            if index < 0 or index >= len(self._maps) or not self._maps[index].iova <= pos < self._maps[index].end:
                raise DeviceError(f"DMA to unmapped address {pos:#x}", errno.EFAULT)
            m = self._maps[index]
            if not m.flags & need_flag:
                what = "read" if need_flag == P.DMA_MAP_FLAG_READ else "write"
                raise DeviceError(f"DMA {what} at {pos:#x}: the mapping does not allow it", errno.EPERM)
            stop = min(end, m.end)
            yield m, pos, stop
            pos = stop
            index += 1

    def read(self, iova: int, length: int) -> bytes:
        m = self._recent                                # a device's accesses cluster: try it first
        if m is not None and m.iova <= iova and iova + length <= m.iova + m.size and m.flags & P.DMA_MAP_FLAG_READ:
            off = m.offset + iova - m.iova
            return m.backing.mm[off:off + length]
        if length == 0:
            return b""
        parts = []
        for m, start, stop in list(self._pieces(iova, length, P.DMA_MAP_FLAG_READ)):
            if m.backing is None:
                parts.append(self._by_message_read(start, stop - start))
            else:
                off = m.offset + start - m.iova
                parts.append(m.backing.mm[off:off + stop - start])
                self._recent = m
        return b"".join(parts)

    def write(self, iova: int, data: bytes) -> None:
        m = self._recent
        length = len(data)
        if m is not None and m.iova <= iova and iova + length <= m.iova + m.size and m.flags & P.DMA_MAP_FLAG_WRITE:
            off = m.offset + iova - m.iova
            m.backing.view[off:off + length] = data
            if self.log_page_size:
                self._mark_dirty(iova, iova + length)
            return
        if not data:
            return
        data = memoryview(data)
        for m, start, stop in list(self._pieces(iova, len(data), P.DMA_MAP_FLAG_WRITE)):
            chunk = data[start - iova:stop - iova]
            if m.backing is None:
                self._by_message_write(start, chunk)
            else:
                off = m.offset + start - m.iova
                m.backing.view[off:off + len(chunk)] = chunk
                self._recent = m
                if self.log_page_size:
                    self._mark_dirty(start, stop)

    def views(self, segments, writable: bool) -> list[memoryview] | None:
        """Guest memory of (iova, length) `segments` as memoryviews of the fd-backed mappings,
        for zero-copy I/O (preadv into guest RAM); None when some of it is reached only by
        messages. Writable views count as written for dirty logging. The views must be
        released before the next map or unmap (see before_change). A device's scatter list
        mostly stays inside one mapping, which is looked up once, not per segment."""
        views = []
        need = P.DMA_MAP_FLAG_WRITE if writable else P.DMA_MAP_FLAG_READ
        m = None
        for iova, length in segments:
            if m is not None and m.iova <= iova and iova + length <= m.iova + m.size:
                off = m.offset + iova - m.iova
                views.append(m.backing.view[off:off + length])
                if writable and self.log_page_size:
                    self._mark_dirty(iova, iova + length)
                continue
            if length == 0:
                continue
            for m, start, stop in self._pieces(iova, length, need):
                if m.backing is None:
                    for view in views:
                        view.release()
                    return None
                off = m.offset + start - m.iova
                views.append(m.backing.view[off:off + stop - start])
                if writable and self.log_page_size:
                    self._mark_dirty(start, stop)
        return views

    def _by_message_read(self, iova: int, length: int) -> bytes:
        if self._message_read is None:
            raise DeviceError(f"DMA read at {iova:#x}: mapping has no fd and no message channel", errno.EFAULT)
        return self._message_read(iova, length)

    def _by_message_write(self, iova: int, data) -> None:
        if self._message_write is None:
            raise DeviceError(f"DMA write at {iova:#x}: mapping has no fd and no message channel", errno.EFAULT)
        self._message_write(iova, bytes(data))

    # --- dirty page logging -------------------------------------------------------------

    def start_logging(self, page_size: int, ranges=()) -> None:
        """Pages are tracked in a set: a page smaller than the negotiated pgsizes would let a
        client make one device write cost a set entry per byte."""
        if page_size < 1 or page_size & (page_size - 1):
            raise DeviceError(f"DMA logging page size {page_size} is not a power of two")
        if page_size < P.PAGE_SIZE:
            raise DeviceError(f"DMA logging page size {page_size} is smaller than the page size "
                              f"{P.PAGE_SIZE} (pgsizes)")
        if self.log_page_size and self.log_page_size != page_size:
            raise DeviceError(f"DMA logging already runs with page size {self.log_page_size}", errno.EBUSY)
        self.log_page_size = page_size
        self._log_ranges = tuple(ranges)
        self._dirty.clear()

    def stop_logging(self) -> None:
        self.log_page_size = 0
        self._log_ranges = ()
        self._dirty.clear()

    def _mark_dirty(self, start: int, end: int) -> None:
        if self._log_ranges and not any(r_iova < end and start < r_iova + r_len
                                        for r_iova, r_len in self._log_ranges):
            return
        page = self.log_page_size
        self._dirty.update(range(start // page, (end - 1) // page + 1))

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """Dirty bitmap of [iova, iova+length), one bit per page_size, u64 words; read-and-clear."""
        if not self.log_page_size:
            raise DeviceError("DMA_LOGGING_REPORT while logging is not started")
        if page_size < 1 or page_size & (page_size - 1):
            raise DeviceError(f"report page size {page_size} is not a power of two")
        lp = self.log_page_size
        end = iova + length
        nbits = -(-length // page_size)
        bitmap = bytearray(-(-nbits // 64) * 8)
        first, last = iova // lp, (end - 1) // lp
        hits = [p for p in self._dirty if first <= p <= last] if len(self._dirty) < last - first \
            else [p for p in range(first, last + 1) if p in self._dirty]
        for p in hits:
            lo = max(p * lp, iova) - iova
            hi = min((p + 1) * lp, end) - iova - 1
            for bit in range(lo // page_size, hi // page_size + 1):
                bitmap[bit >> 3] |= 1 << (bit & 7)
            if p * lp >= iova and (p + 1) * lp <= end:
                self._dirty.discard(p)
        return bytes(bitmap)
