"""vfio-user wire constants and exact struct layouts (QEMU docs/interop/vfio-user.rst).

Every field is host-endian in this protocol revision; every realistic host is little
endian, so the layouts use an explicit '<' and importing this module on a big-endian host
fails loudly instead of talking garbage.
"""

import struct
import sys

if sys.byteorder != "little":
    raise ImportError("vfio-user messages are host-endian; this library only speaks little-endian")

# Version this library implements (replies use min(client minor, ours)).
VERSION_MAJOR = 0
VERSION_MINOR = 2

# --- commands -----------------------------------------------------------------------
VERSION = 1
DMA_MAP = 2
DMA_UNMAP = 3
DEVICE_GET_INFO = 4
DEVICE_GET_REGION_INFO = 5
DEVICE_GET_REGION_IO_FDS = 6
DEVICE_GET_IRQ_INFO = 7
DEVICE_SET_IRQS = 8
REGION_READ = 9
REGION_WRITE = 10
DMA_READ = 11
DMA_WRITE = 12
DEVICE_RESET = 13
DIRTY_PAGES = 14            # migration v1, removed from the spec: recognised and refused
REGION_WRITE_MULTI = 15
DEVICE_FEATURE = 16
MIG_DATA_READ = 17
MIG_DATA_WRITE = 18

COMMAND_NAMES = {
    VERSION: "VERSION", DMA_MAP: "DMA_MAP", DMA_UNMAP: "DMA_UNMAP",
    DEVICE_GET_INFO: "DEVICE_GET_INFO", DEVICE_GET_REGION_INFO: "DEVICE_GET_REGION_INFO",
    DEVICE_GET_REGION_IO_FDS: "DEVICE_GET_REGION_IO_FDS", DEVICE_GET_IRQ_INFO: "DEVICE_GET_IRQ_INFO",
    DEVICE_SET_IRQS: "DEVICE_SET_IRQS", REGION_READ: "REGION_READ", REGION_WRITE: "REGION_WRITE",
    DMA_READ: "DMA_READ", DMA_WRITE: "DMA_WRITE", DEVICE_RESET: "DEVICE_RESET",
    DIRTY_PAGES: "DIRTY_PAGES", REGION_WRITE_MULTI: "REGION_WRITE_MULTI",
    DEVICE_FEATURE: "DEVICE_FEATURE", MIG_DATA_READ: "MIG_DATA_READ", MIG_DATA_WRITE: "MIG_DATA_WRITE",
}
SERVER_COMMANDS = frozenset({DMA_READ, DMA_WRITE})


def command_name(cmd: int) -> str:
    return COMMAND_NAMES.get(cmd, f"command {cmd}")


# --- header -------------------------------------------------------------------------
HEADER = struct.Struct("<HHIII")            # msg_id, cmd, msg_size, flags, error
HEADER_SIZE = HEADER.size                   # 16
FLAG_TYPE_MASK = 0x0F
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20
REPLY_ERROR_FLAGS = TYPE_REPLY | FLAG_ERROR

# --- limits -------------------------------------------------------------------------
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20        # when a peer does not say
DEFAULT_MAX_MSG_FDS = 1                     # spec default when a peer does not say
MAX_DATA_XFER_SIZE = 1 << 20                # what this library accepts per transfer
MAX_MSG_FDS = 16                            # fds this library accepts per message
MAX_CLIENT_MSG_FDS = 1024                   # largest max_msg_fds a peer may claim
MAX_DMA_MAPS = 65535
# Largest message accepted: the biggest payload is a 1 MiB transfer plus its fixed part.
MAX_MESSAGE_SIZE = HEADER_SIZE + 32 + MAX_DATA_XFER_SIZE
WRITE_MULTI_MAX_ENTRIES = 200
WRITE_MULTI_MAX_DATA = 8
PAGE_SIZE = 4096

# --- VERSION ------------------------------------------------------------------------
VERSION_HDR = struct.Struct("<HH")           # major, minor, then NUL-terminated JSON

# --- DMA_MAP / DMA_UNMAP ------------------------------------------------------------
DMA_MAP_STRUCT = struct.Struct("<IIQQQ")     # argsz, flags, offset, address, size
DMA_MAP_FLAG_READ = 1
DMA_MAP_FLAG_WRITE = 2
DMA_MAP_FLAGS_KNOWN = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
DMA_UNMAP_STRUCT = struct.Struct("<IIQQ")    # argsz, flags, address, size
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1          # migration v1: recognised and refused
DMA_UNMAP_FLAG_ALL = 2
DMA_UNMAP_FLAGS_KNOWN = DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | DMA_UNMAP_FLAG_ALL

# --- DEVICE_GET_INFO ----------------------------------------------------------------
DEVICE_INFO = struct.Struct("<IIII")         # argsz, flags, num_regions, num_irqs
DEVICE_FLAG_RESET = 1
DEVICE_FLAG_PCI = 2

# --- DEVICE_GET_REGION_INFO ---------------------------------------------------------
REGION_INFO = struct.Struct("<IIIIQQ")       # argsz, flags, index, cap_offset, size, offset
REGION_FLAG_READ = 1
REGION_FLAG_WRITE = 2
REGION_FLAG_MMAP = 4
REGION_FLAG_CAPS = 8
CAP_HEADER = struct.Struct("<HHI")           # id, version, next
CAP_SPARSE_MMAP = 1
CAP_SPARSE_MMAP_HDR = struct.Struct("<HHIII")   # cap header + nr_areas, reserved
SPARSE_AREA = struct.Struct("<QQ")          # offset, size
CAP_TYPE = 2
CAP_TYPE_STRUCT = struct.Struct("<HHIII")    # cap header + type, subtype
CAP_MSIX_MAPPABLE = 3

# --- DEVICE_GET_REGION_IO_FDS -------------------------------------------------------
REGION_IO_FDS = struct.Struct("<IIII")       # argsz, flags, index, count
IO_FD_ENTRY = struct.Struct("<QQIIIIQ")      # offset, size, fd_index, type, flags, pad, data

# --- DEVICE_GET_IRQ_INFO / DEVICE_SET_IRQS ------------------------------------------
IRQ_INFO = struct.Struct("<IIII")            # argsz, flags, index, count
IRQ_INFO_EVENTFD = 1
IRQ_INFO_MASKABLE = 2
IRQ_INFO_AUTOMASKED = 4
IRQ_INFO_NORESIZE = 8
IRQ_SET = struct.Struct("<IIIII")            # argsz, flags, index, start, count
IRQ_DATA_NONE = 0x01
IRQ_DATA_BOOL = 0x02
IRQ_DATA_EVENTFD = 0x04
IRQ_ACTION_MASK = 0x08
IRQ_ACTION_UNMASK = 0x10
IRQ_ACTION_TRIGGER = 0x20
IRQ_DATA_MASK = IRQ_DATA_NONE | IRQ_DATA_BOOL | IRQ_DATA_EVENTFD
IRQ_ACTION_MASK_BITS = IRQ_ACTION_MASK | IRQ_ACTION_UNMASK | IRQ_ACTION_TRIGGER

# --- REGION_READ / REGION_WRITE / REGION_WRITE_MULTI --------------------------------
REGION_ACCESS = struct.Struct("<QII")        # offset, region, count (+ data)
WRITE_MULTI_COUNT = struct.Struct("<Q")      # wr_cnt
WRITE_MULTI_ENTRY = struct.Struct("<QII8s")  # offset, region, count, data[8]

# --- DMA_READ / DMA_WRITE (server -> client) ----------------------------------------
# The spec's layout (u64 count, data at payload offset 16; DMA_WRITE reply echoes
# address and count) is used, as libvfio-user does. QEMU 10.1's client uses a u32 count
# with data at offset 12 (digest 2.10/8.7): with QEMU, back guest RAM with a shared fd.
DMA_ACCESS = struct.Struct("<QQ")            # address, count (+ data)

# --- DEVICE_FEATURE -----------------------------------------------------------------
FEATURE = struct.Struct("<II")               # argsz, flags (+ data)
FEATURE_MASK = 0xFFFF
FEATURE_GET = 0x10000
FEATURE_SET = 0x20000
FEATURE_PROBE = 0x40000
FEATURE_FLAGS_KNOWN = FEATURE_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE
FEATURE_MIGRATION = 1
FEATURE_MIG_DEVICE_STATE = 2
FEATURE_DMA_LOGGING_START = 6
FEATURE_DMA_LOGGING_STOP = 7
FEATURE_DMA_LOGGING_REPORT = 8
MIGRATION_FLAGS = struct.Struct("<Q")
MIGRATION_STOP_COPY = 1
MIGRATION_P2P = 2
MIGRATION_PRE_COPY = 4
MIG_STATE = struct.Struct("<II")             # device_state, data_fd
LOGGING_CONTROL = struct.Struct("<QII")      # page_size, num_ranges, reserved
LOGGING_RANGE = struct.Struct("<QQ")         # iova, length
LOGGING_REPORT = struct.Struct("<QQQ")       # iova, length, page_size (+ bitmap)

# Migration v2 device states.
MIG_STATE_ERROR = 0
MIG_STATE_STOP = 1
MIG_STATE_RUNNING = 2
MIG_STATE_STOP_COPY = 3
MIG_STATE_RESUMING = 4
MIG_STATE_RUNNING_P2P = 5
MIG_STATE_PRE_COPY = 6
MIG_STATE_PRE_COPY_P2P = 7
MIG_STATE_NAMES = {
    MIG_STATE_ERROR: "ERROR", MIG_STATE_STOP: "STOP", MIG_STATE_RUNNING: "RUNNING",
    MIG_STATE_STOP_COPY: "STOP_COPY", MIG_STATE_RESUMING: "RESUMING",
    MIG_STATE_RUNNING_P2P: "RUNNING_P2P", MIG_STATE_PRE_COPY: "PRE_COPY",
    MIG_STATE_PRE_COPY_P2P: "PRE_COPY_P2P",
}

# --- MIG_DATA_READ / MIG_DATA_WRITE -------------------------------------------------
MIG_DATA = struct.Struct("<II")              # argsz, size (+ data)

# --- obsolete DIRTY_PAGES (recognised only to refuse it with a clear reason) --------
DIRTY_PAGES_STRUCT = struct.Struct("<II")    # argsz, flags

# --- region and irq indices of a PCI device -----------------------------------------
NUM_PCI_REGIONS = 9
NUM_PCI_IRQS = 5
REGION_NAMES = ("BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5", "ROM", "CONFIG", "VGA")
IRQ_NAMES = ("INTx", "MSI", "MSI-X", "ERR", "REQ")
