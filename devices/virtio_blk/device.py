"""virtio-blk (virtio 1.2, section 5.2) serving one disk image given as a descriptor.

The image arrives open (jailer opens it outside the sandbox, `--disk-fd`): the device
never names a path, and whether it may write follows from the descriptor's access mode
(O_RDONLY offers VIRTIO_BLK_F_RO and refuses writes). Data moves between the image and
guest RAM with preadv/pwritev straight into the client's shared memory mappings; memory
reached only through DMA messages is copied through bytes instead.

A request is a chain: a 16-byte header (type, reserved, sector) the device reads, data,
and a status byte the device writes last. Whatever the guest puts there, the answer is
a status: OK, IOERR (outside the disk, unmapped data buffers, a write to a read-only
image, a failing host call) or UNSUPP (an unknown type, a malformed header). Only a chain
whose status byte the device cannot write makes the device ask for a reset.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct

from devices.vfio_user.device import DeviceError
from devices.virtio.pci import VirtioPciDevice
from devices.virtio.queue import Chain, QueueError, split_segments

log = logging.getLogger("virtio_blk")

VIRTIO_ID_BLOCK = 2
CLASS_STORAGE_SCSI = 0x010000           # what QEMU's virtio-blk-pci reports
SECTOR = 512
QUEUE_SIZE = 256

# Feature bits.
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

# Request types and status values.
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
WRITE_ZEROES_FLAG_UNMAP = 1
HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")         # discard / write-zeroes: sector, num_sectors, flags
ID_BYTES = 20

# Limits announced in the config structure.
SEG_MAX = QUEUE_SIZE - 2
MAX_DISCARD_SECTORS = 1 << 22           # 2 GiB per segment
MAX_DISCARD_SEG = 32
ZERO_CHUNK = 1 << 20
IOV_MAX = 1024

# struct virtio_blk_config up to write_zeroes_may_unmap and its padding (60 bytes).
CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIIIB3x")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# Saved state of the device's own part, layout 1: flags (bit 0: writeback cache on).
_OWN_STATE = struct.Struct("<4sHB")
_OWN_MAGIC = b"VBLK"

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Disk:
    """The image descriptor and what it can do, probed once before serving."""

    def __init__(self, fd: int):
        try:
            st = os.fstat(fd)
            access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError as exc:
            raise DeviceError(f"disk fd {fd}: {exc.strerror}", exc.errno or errno.EBADF) from None
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            raise DeviceError(f"disk fd {fd} is neither a regular file nor a block device")
        if access == os.O_WRONLY:
            raise DeviceError(f"disk fd {fd} is open write-only; it must be readable")
        self.fd = fd
        self.read_only = access == os.O_RDONLY
        self.size = size
        self.sectors = size // SECTOR
        if size % SECTOR:
            log.warning("disk image of %d bytes: the last %d bytes are not a whole sector and stay unused",
                        size, size % SECTOR)
        self.regular = stat.S_ISREG(st.st_mode)
        self.can_punch = not self.read_only and self.regular and self._try(FALLOC_FL_PUNCH_HOLE)
        self.can_zero_range = not self.read_only and self.regular and self._try(FALLOC_FL_ZERO_RANGE)

    def _try(self, mode: int) -> bool:
        """Whether the image's file system takes this fallocate mode (tried past the end, which
        changes nothing with KEEP_SIZE)."""
        try:
            fallocate(self.fd, mode | FALLOC_FL_KEEP_SIZE, self.size + (1 << 20), 4096)
        except OSError:
            return False
        return True


class VirtioBlk(VirtioPciDevice):
    device_type = "virtio-blk"
    abi_version = 1
    virtio_id = VIRTIO_ID_BLOCK
    class_code = CLASS_STORAGE_SCSI
    queue_count = 1
    queue_size = QUEUE_SIZE

    def __init__(self, disk: Disk, serial: str = "jailer-virtio-blk"):
        self.disk = disk
        encoded = serial.encode()
        if len(encoded) > ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {ID_BYTES} bytes")
        self.serial = encoded
        super().__init__()
        self.pci_ids = (self.config.get(0, 2), self.config.get(2, 2))
        self._config = self._config_bytes()

    # --- virtio device -----------------------------------------------------------------------

    def device_features(self) -> int:
        features = F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY
        if self.disk.read_only:
            features |= F_RO
        else:
            features |= F_WRITE_ZEROES
            if self.disk.can_punch:
                features |= F_DISCARD
        return features

    def config_size(self) -> int:
        return CONFIG.size

    def _config_bytes(self) -> bytes:
        discard = MAX_DISCARD_SECTORS if self.disk.can_punch else 0
        return CONFIG.pack(self.disk.sectors, 0, SEG_MAX,
                           0, 0, 0,                                   # geometry: unused
                           SECTOR,                                    # blk_size
                           0, 0, 1, 0,                                # topology: 512-byte physical, no hints
                           1, 0, 1,                                   # writeback, unused, num_queues
                           discard, MAX_DISCARD_SEG if discard else 0, 1 if discard else 0,
                           MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1 if self.disk.can_punch else 0)

    def config_read(self, offset: int, count: int) -> bytes:
        return self._config[offset:offset + count].ljust(count, b"\0")

    def queue_notified(self, queue) -> None:
        self.serve(queue, self._request)

    # --- requests ------------------------------------------------------------------------------

    def _request(self, chain: Chain) -> int:
        """Carry out one request; returns the bytes written into the chain's writable part."""
        memory = self.memory
        if not chain.writable or chain.writable[-1][1] == 0:
            raise QueueError(f"queue 0: a request without a writable status byte (head {chain.head})")
        *data_in, (status_iova, status_length) = chain.writable
        if status_length > 1:
            data_in.append((status_iova, status_length - 1))
        status_at = status_iova + status_length - 1
        header_segments, data_out = split_segments(chain.readable, HEADER.size)
        written = 0
        try:
            header = b"".join(memory.read(iova, length) for iova, length in header_segments)
            if len(header) < HEADER.size:
                status = S_UNSUPP
            else:
                kind, _reserved, sector = HEADER.unpack(header)
                status, written = self._dispatch(kind, sector, data_out, data_in)
        except DeviceError as exc:                  # an unmapped data buffer
            log.debug("request failed: %s", exc)
            status = S_IOERR
        try:
            memory.write(status_at, bytes([status]))
        except DeviceError as exc:
            raise QueueError(f"queue 0: cannot write the status byte at {status_at:#x}: {exc}") from None
        return written + 1

    def _dispatch(self, kind: int, sector: int, data_out: list, data_in: list) -> tuple[int, int]:
        if kind == T_IN:
            length = sum(size for _, size in data_in)
            if not self._inside(sector, length):
                return S_IOERR, 0
            return self._read(sector * SECTOR, data_in, length)
        if kind == T_OUT:
            length = sum(size for _, size in data_out)
            if self.disk.read_only or not self._inside(sector, length):
                return S_IOERR, 0
            return self._write(sector * SECTOR, data_out, length), 0
        if kind == T_FLUSH:
            return self._flush(), 0
        if kind == T_GET_ID:
            length = min(sum(size for _, size in data_in), ID_BYTES)
            identity = self.serial.ljust(ID_BYTES, b"\0")[:length]
            head, _ = split_segments(data_in, length)
            position = 0
            for iova, size in head:
                self.memory.write(iova, identity[position:position + size])
                position += size
            return S_OK, length
        if kind in (T_DISCARD, T_WRITE_ZEROES):
            if self.disk.read_only:
                return S_IOERR, 0
            if kind == T_DISCARD and not self.disk.can_punch:
                return S_UNSUPP, 0
            return self._ranges(kind, data_out), 0
        return S_UNSUPP, 0

    def _inside(self, sector: int, length: int) -> bool:
        return length % SECTOR == 0 and sector + length // SECTOR <= self.disk.sectors

    def _read(self, offset: int, segments: list, length: int) -> tuple[int, int]:
        views = self.memory.views(segments, True)
        try:
            if views is None:
                data = os.pread(self.disk.fd, length, offset)
                if len(data) != length:
                    return S_IOERR, 0
                position = 0
                for iova, size in segments:
                    self.memory.write(iova, data[position:position + size])
                    position += size
                return S_OK, length
            return (S_OK, length) if self._vectored(os.preadv, views, offset, length) == length else (S_IOERR, 0)
        except OSError as exc:
            log.warning("reading %d bytes at %d: %s", length, offset, exc.strerror)
            return S_IOERR, 0
        finally:
            _release(views)

    def _write(self, offset: int, segments: list, length: int) -> int:
        views = self.memory.views(segments, False)
        try:
            if views is None:
                data = b"".join(self.memory.read(iova, size) for iova, size in segments)
                return S_OK if os.pwrite(self.disk.fd, data, offset) == length else S_IOERR
            return S_OK if self._vectored(os.pwritev, views, offset, length) == length else S_IOERR
        except OSError as exc:
            log.warning("writing %d bytes at %d: %s", length, offset, exc.strerror)
            return S_IOERR
        finally:
            _release(views)

    def _vectored(self, call, views: list, offset: int, length: int) -> int:
        """preadv/pwritev over any number of views, resuming after short transfers."""
        done = 0
        while views:
            count = call(self.disk.fd, views[:IOV_MAX], offset + done)
            done += count
            if done == length or count == 0:
                return done
            position = 0
            while count >= len(views[position]):
                count -= len(views[position])
                position += 1
            views = [views[position][count:], *views[position + 1:]]
        return done

    def _flush(self) -> int:
        try:
            os.fdatasync(self.disk.fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:           # EINVAL: nothing to sync (a pipe, a special file)
                log.warning("flush: %s", exc.strerror)
                return S_IOERR
        return S_OK

    def _ranges(self, kind: int, segments: list) -> int:
        data = b"".join(self.memory.read(iova, size) for iova, size in segments)
        if not data or len(data) % SEGMENT.size or len(data) // SEGMENT.size > MAX_DISCARD_SEG:
            return S_UNSUPP
        for sector, count, flags in SEGMENT.iter_unpack(data):
            if flags & ~WRITE_ZEROES_FLAG_UNMAP or (kind == T_DISCARD and flags):
                return S_UNSUPP
            if count > MAX_DISCARD_SECTORS or not self._inside(sector, count * SECTOR):
                return S_IOERR
            try:
                self._zero(kind, flags, sector * SECTOR, count * SECTOR)
            except OSError as exc:
                log.warning("%s of %d sectors at %d: %s", "discard" if kind == T_DISCARD else "write zeroes",
                            count, sector, exc.strerror)
                return S_IOERR
        return S_OK

    def _zero(self, kind: int, flags: int, offset: int, length: int) -> None:
        fd = self.disk.fd
        if kind == T_DISCARD or (flags & WRITE_ZEROES_FLAG_UNMAP and self.disk.can_punch):
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        elif self.disk.can_zero_range:
            fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        else:
            zeros = bytes(min(length, ZERO_CHUNK))
            for position in range(offset, offset + length, ZERO_CHUNK):
                os.pwrite(fd, zeros[:min(ZERO_CHUNK, offset + length - position)], position)

    # --- state -----------------------------------------------------------------------------------

    def describe(self) -> dict:
        return {"capacity_sectors": self.disk.sectors, "read_only": self.disk.read_only,
                "status": self.status, "features": self.negotiated,
                "queues": [{"enabled": q.enabled, "size": q.size, "last_avail": q.last_avail,
                            "used_idx": q.used_idx} for q in self.queues]}

    def save_device_state(self) -> bytes:
        return _OWN_STATE.pack(_OWN_MAGIC, 1, 0)

    def load_device_state(self, data: bytes) -> None:
        if len(data) != _OWN_STATE.size:
            raise DeviceError(f"virtio-blk state of {len(data)} bytes, expected {_OWN_STATE.size}")
        magic, layout, flags = _OWN_STATE.unpack(data)
        if magic != _OWN_MAGIC or layout != 1 or flags:
            raise DeviceError(f"virtio-blk state with magic {magic!r}, layout {layout}, flags {flags:#x}")


def _release(views) -> None:
    for view in views or ():
        view.release()
