"""vfio-user wire formats (QEMU ``docs/interop/vfio-user.rst``), explicit little-endian.

Every message is a 16-byte :data:`HEADER` (id, command, size of the whole message,
flags, error) and a payload. File descriptors travel as ``SCM_RIGHTS`` with the
header's bytes.
"""

from __future__ import annotations

import errno
import struct

from pcidev.errors import TransportError

# -- header ------------------------------------------------------------------------------
#: id u16, command u16, size u32 (header included), flags u32, error u32
HEADER = struct.Struct("<HHIII")
HEADER_SIZE = HEADER.size  # 16

TYPE_COMMAND = 0
TYPE_REPLY = 1
TYPE_MASK = 0xF
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20

# -- commands ----------------------------------------------------------------------------
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
REGION_WRITE_MULTI = 15
DEVICE_FEATURE = 16
MIG_DATA_READ = 17
MIG_DATA_WRITE = 18

COMMAND_NAMES = {
    VERSION: "VERSION", DMA_MAP: "DMA_MAP", DMA_UNMAP: "DMA_UNMAP", DEVICE_GET_INFO: "DEVICE_GET_INFO",
    DEVICE_GET_REGION_INFO: "DEVICE_GET_REGION_INFO", DEVICE_GET_REGION_IO_FDS: "DEVICE_GET_REGION_IO_FDS",
    DEVICE_GET_IRQ_INFO: "DEVICE_GET_IRQ_INFO", DEVICE_SET_IRQS: "DEVICE_SET_IRQS", REGION_READ: "REGION_READ",
    REGION_WRITE: "REGION_WRITE", DMA_READ: "DMA_READ", DMA_WRITE: "DMA_WRITE", DEVICE_RESET: "DEVICE_RESET",
    REGION_WRITE_MULTI: "REGION_WRITE_MULTI", DEVICE_FEATURE: "DEVICE_FEATURE",
    MIG_DATA_READ: "MIG_DATA_READ", MIG_DATA_WRITE: "MIG_DATA_WRITE",
}

# -- payloads ------------------------------------------------------------------------------
#: major u16, minor u16, then a NUL-terminated JSON string
VERSION_HDR = struct.Struct("<HH")
#: argsz, flags, offset, address, size
DMA_MAP_S = struct.Struct("<IIQQQ")
#: argsz, flags, address, size
DMA_UNMAP_S = struct.Struct("<IIQQ")
#: argsz, flags, num_regions, num_irqs
DEVICE_INFO_S = struct.Struct("<IIII")
#: argsz, flags, index, cap_offset, size, offset
REGION_INFO_S = struct.Struct("<IIIIQQ")
#: capability header: id, version, next
CAP_HDR_S = struct.Struct("<HHI")
#: sparse mmap: nr_areas, reserved; then areas of (offset u64, size u64)
SPARSE_HDR_S = struct.Struct("<II")
SPARSE_AREA_S = struct.Struct("<QQ")
#: argsz, flags, index, count
IRQ_INFO_S = struct.Struct("<IIII")
#: argsz, flags, index, start, count
SET_IRQS_S = struct.Struct("<IIIII")
#: offset u64, region u32, count u32
REGION_ACCESS_S = struct.Struct("<QII")
#: wr_cnt u64, then entries of offset u64, region u32, count u32, data[8]
WRITE_MULTI_HDR_S = struct.Struct("<Q")
WRITE_MULTI_ENTRY_S = struct.Struct("<QII8s")

DMA_FLAG_READ = 0x1
DMA_FLAG_WRITE = 0x2
DMA_UNMAP_FLAG_ALL = 0x2

DEVICE_FLAGS_RESET = 0x1
DEVICE_FLAGS_PCI = 0x2

REGION_FLAG_READ = 0x1
REGION_FLAG_WRITE = 0x2
REGION_FLAG_MMAP = 0x4
REGION_FLAG_CAPS = 0x8

REGION_CAP_SPARSE_MMAP = 1

#: Linux's VFIO_PCI_*_REGION_INDEX
BAR0_REGION, BAR5_REGION, ROM_REGION, CONFIG_REGION, VGA_REGION = 0, 5, 6, 7, 8
NUM_REGIONS = 9

IRQ_INTX, IRQ_MSI, IRQ_MSIX, IRQ_ERR, IRQ_REQ = 0, 1, 2, 3, 4
NUM_IRQS = 5

IRQ_INFO_EVENTFD = 0x1
IRQ_INFO_MASKABLE = 0x2
IRQ_INFO_AUTOMASKED = 0x4
IRQ_INFO_NORESIZE = 0x8

IRQ_SET_DATA_NONE = 0x1
IRQ_SET_DATA_BOOL = 0x2
IRQ_SET_DATA_EVENTFD = 0x4
IRQ_SET_ACTION_MASK = 0x8
IRQ_SET_ACTION_UNMASK = 0x10
IRQ_SET_ACTION_TRIGGER = 0x20
IRQ_SET_DATA_MASK = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_MASK_ALL = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER


class VfioUserError(TransportError):
    """A request the server refuses: answered with an ERROR reply carrying :attr:`errno`.

    :param err: a positive errno.
    :param message: what was wrong (logged, not sent).
    """

    def __init__(self, err: int, message: str) -> None:
        super().__init__(f"{message} ({errno.errorcode.get(err, err)})")
        self.errno = err


def header(mid: int, cmd: int, size: int, flags: int = TYPE_COMMAND, error: int = 0) -> bytes:
    """Pack a header (``size`` counts the whole message)."""
    return HEADER.pack(mid & 0xFFFF, cmd & 0xFFFF, size, flags, error)


def message(mid: int, cmd: int, payload: bytes = b"", flags: int = TYPE_COMMAND, error: int = 0) -> bytes:
    """A whole message: header + payload."""
    return header(mid, cmd, HEADER_SIZE + len(payload), flags, error) + payload


def reply(mid: int, cmd: int, payload: bytes = b"") -> bytes:
    """A successful reply to request ``mid``."""
    return message(mid, cmd, payload, TYPE_REPLY)


def error_reply(mid: int, cmd: int, err: int) -> bytes:
    """An error reply: the header alone, ERROR set, ``err`` a positive errno."""
    return message(mid, cmd, b"", TYPE_REPLY | FLAG_ERROR, err)


__all__ = [name for name in dir() if name.isupper()] + [
    "VfioUserError", "header", "message", "reply", "error_reply"]
