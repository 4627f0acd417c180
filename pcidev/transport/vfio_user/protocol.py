"""vfio-user wire formats (QEMU ``docs/interop/vfio-user.rst``), explicit little-endian.

Every message is a 16-byte :data:`HEADER` (id, command, size of the whole message,
flags, error) and a payload. File descriptors travel as ``SCM_RIGHTS`` with the
header's bytes.
"""

from __future__ import annotations

import errno
import json
import struct
from typing import Any

from pcidev.errors import TransportError

# -- header ------------------------------------------------------------------------------
#: id u16, command u16, size u32 (header included), flags u32, error u32
HEADER = struct.Struct("<HHIII")
#: Size in bytes of the message header (vfio-user spec, "Header"), counted in a message's size field.
HEADER_SIZE = HEADER.size  # 16

#: Header flags, message type (bits 0-3): a command (vfio-user spec, "Header").
TYPE_COMMAND = 0
#: Header flags, message type (bits 0-3): a reply (vfio-user spec, "Header").
TYPE_REPLY = 1
#: Mask of the message type bits (0-3) of the header flags.
TYPE_MASK = 0xF
#: Header flag bit 4, No_reply: the sender expects no reply to this command.
FLAG_NO_REPLY = 0x10
#: Header flag bit 5, Error: the reply reports a failure, its errno in the header's error field.
FLAG_ERROR = 0x20

# -- commands ----------------------------------------------------------------------------
#: Command VFIO_USER_VERSION: negotiate the protocol version and capabilities (JSON).
VERSION = 1
#: Command VFIO_USER_DMA_MAP: the client adds a guest-memory region (optionally with a file descriptor to mmap).
DMA_MAP = 2
#: Command VFIO_USER_DMA_UNMAP: the client removes a guest-memory region (or all, with :data:`DMA_UNMAP_FLAG_ALL`).
DMA_UNMAP = 3
#: Command VFIO_USER_DEVICE_GET_INFO: device flags and the numbers of regions and IRQ indexes.
DEVICE_GET_INFO = 4
#: Command VFIO_USER_DEVICE_GET_REGION_INFO: one region's size, flags and capabilities (sparse mmap areas).
DEVICE_GET_REGION_INFO = 5
#: Command VFIO_USER_DEVICE_GET_REGION_IO_FDS: file descriptors (ioeventfds) for parts of a region.
DEVICE_GET_REGION_IO_FDS = 6
#: Command VFIO_USER_DEVICE_GET_IRQ_INFO: the count and flags of one IRQ index.
DEVICE_GET_IRQ_INFO = 7
#: Command VFIO_USER_DEVICE_SET_IRQS: set up, trigger, mask or unmask interrupts of an IRQ index (eventfds attached).
DEVICE_SET_IRQS = 8
#: Command VFIO_USER_REGION_READ: the client reads from a device region (config space, a BAR, the ROM).
REGION_READ = 9
#: Command VFIO_USER_REGION_WRITE: the client writes to a device region.
REGION_WRITE = 10
#: Command VFIO_USER_DMA_READ: the server reads guest memory the client did not map with a file descriptor.
DMA_READ = 11
#: Command VFIO_USER_DMA_WRITE: the server writes guest memory the client did not map with a file descriptor.
DMA_WRITE = 12
#: Command VFIO_USER_DEVICE_RESET: reset the device.
DEVICE_RESET = 13
#: Command VFIO_USER_REGION_WRITE_MULTI: several small region writes in one message (:data:`WRITE_MULTI_ENTRY_S`).
REGION_WRITE_MULTI = 15
#: Command VFIO_USER_DEVICE_FEATURE: get, set or probe a device feature (used for the migration state).
DEVICE_FEATURE = 16
#: Command VFIO_USER_MIG_DATA_READ: the client reads the next chunk of the device's migration data.
MIG_DATA_READ = 17
#: Command VFIO_USER_MIG_DATA_WRITE: the client sends the next chunk of migration data to the device.
MIG_DATA_WRITE = 18

#: The protocol's name of each command number (for logs and error messages).
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
#: one sparse mmap area: offset u64, size u64 (follows :data:`SPARSE_HDR_S`)
SPARSE_AREA_S = struct.Struct("<QQ")
#: argsz, flags, index, count
IRQ_INFO_S = struct.Struct("<IIII")
#: argsz, flags, index, start, count
SET_IRQS_S = struct.Struct("<IIIII")
#: offset u64, region u32, count u32
REGION_ACCESS_S = struct.Struct("<QII")
#: wr_cnt u64, then entries of offset u64, region u32, count u32, data[8]
WRITE_MULTI_HDR_S = struct.Struct("<Q")
#: one VFIO_USER_REGION_WRITE_MULTI entry: offset u64, region u32, count u32, data[8]
WRITE_MULTI_ENTRY_S = struct.Struct("<QII8s")

#: VFIO_USER_DMA_MAP flag: the device may read the region (VFIO_USER_F_DMA_REGION_READ).
DMA_FLAG_READ = 0x1
#: VFIO_USER_DMA_MAP flag: the device may write the region (VFIO_USER_F_DMA_REGION_WRITE).
DMA_FLAG_WRITE = 0x2
#: VFIO_USER_DMA_UNMAP flag: remove every region (Linux's VFIO_DMA_UNMAP_FLAG_ALL).
DMA_UNMAP_FLAG_ALL = 0x2

#: Device info flag: the device supports reset (Linux's VFIO_DEVICE_FLAGS_RESET).
DEVICE_FLAGS_RESET = 0x1
#: Device info flag: a PCI device (Linux's VFIO_DEVICE_FLAGS_PCI).
DEVICE_FLAGS_PCI = 0x2

#: Region info flag: the region can be read (Linux's VFIO_REGION_INFO_FLAG_READ).
REGION_FLAG_READ = 0x1
#: Region info flag: the region can be written (Linux's VFIO_REGION_INFO_FLAG_WRITE).
REGION_FLAG_WRITE = 0x2
#: Region info flag: the region can be mapped from the file descriptor of the reply (VFIO_REGION_INFO_FLAG_MMAP).
REGION_FLAG_MMAP = 0x4
#: Region info flag: capabilities follow the region info (Linux's VFIO_REGION_INFO_FLAG_CAPS).
REGION_FLAG_CAPS = 0x8

#: Region info capability id: sparse mmap areas (Linux's VFIO_REGION_INFO_CAP_SPARSE_MMAP).
REGION_CAP_SPARSE_MMAP = 1

#: Linux's VFIO_PCI_*_REGION_INDEX
BAR0_REGION, BAR5_REGION, ROM_REGION, CONFIG_REGION, VGA_REGION = 0, 5, 6, 7, 8
#: Number of regions of a PCI device: BARs 0-5, ROM, config space, VGA (Linux's VFIO_PCI_NUM_REGIONS).
NUM_REGIONS = 9

#: IRQ index of the legacy INTx pin (Linux's VFIO_PCI_INTX_IRQ_INDEX).
IRQ_INTX = 0
#: IRQ index of MSI (Linux's VFIO_PCI_MSI_IRQ_INDEX).
IRQ_MSI = 1
#: IRQ index of MSI-X (Linux's VFIO_PCI_MSIX_IRQ_INDEX).
IRQ_MSIX = 2
#: IRQ index of the error notification, AER (Linux's VFIO_PCI_ERR_IRQ_INDEX).
IRQ_ERR = 3
#: IRQ index of the device request notification (Linux's VFIO_PCI_REQ_IRQ_INDEX).
IRQ_REQ = 4
#: Number of IRQ indexes of a PCI device: INTx, MSI, MSI-X, ERR, REQ (Linux's VFIO_PCI_NUM_IRQS).
NUM_IRQS = 5

#: IRQ info flag: interrupts are signalled through eventfds (Linux's VFIO_IRQ_INFO_EVENTFD).
IRQ_INFO_EVENTFD = 0x1
#: IRQ info flag: the interrupts can be masked and unmasked (Linux's VFIO_IRQ_INFO_MASKABLE).
IRQ_INFO_MASKABLE = 0x2
#: IRQ info flag: the interrupt is masked when it fires, as INTx is (Linux's VFIO_IRQ_INFO_AUTOMASKED).
IRQ_INFO_AUTOMASKED = 0x4
#: IRQ info flag: the vector count cannot change while enabled (Linux's VFIO_IRQ_INFO_NORESIZE).
IRQ_INFO_NORESIZE = 0x8

#: VFIO_USER_DEVICE_SET_IRQS data type: no data (Linux's VFIO_IRQ_SET_DATA_NONE).
IRQ_SET_DATA_NONE = 0x1
#: VFIO_USER_DEVICE_SET_IRQS data type: one byte per vector (Linux's VFIO_IRQ_SET_DATA_BOOL).
IRQ_SET_DATA_BOOL = 0x2
#: VFIO_USER_DEVICE_SET_IRQS data type: one eventfd per vector, passed with the message (VFIO_IRQ_SET_DATA_EVENTFD).
IRQ_SET_DATA_EVENTFD = 0x4
#: VFIO_USER_DEVICE_SET_IRQS action: mask the vectors (Linux's VFIO_IRQ_SET_ACTION_MASK).
IRQ_SET_ACTION_MASK = 0x8
#: VFIO_USER_DEVICE_SET_IRQS action: unmask the vectors (Linux's VFIO_IRQ_SET_ACTION_UNMASK).
IRQ_SET_ACTION_UNMASK = 0x10
#: VFIO_USER_DEVICE_SET_IRQS action: trigger the vectors, or set their eventfds (VFIO_IRQ_SET_ACTION_TRIGGER).
IRQ_SET_ACTION_TRIGGER = 0x20
#: The data type bits of the SET_IRQS flags (Linux's VFIO_IRQ_SET_DATA_TYPE_MASK).
IRQ_SET_DATA_MASK = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
#: The action bits of the SET_IRQS flags (Linux's VFIO_IRQ_SET_ACTION_TYPE_MASK).
IRQ_SET_ACTION_MASK_ALL = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER


# -- migration (VFIO migration v2 over the socket: DEVICE_FEATURE, MIG_DATA_READ/WRITE) ----------
#: DEVICE_FEATURE header: argsz u32, flags u32 (the feature in bits 0-15, GET/SET/PROBE above), then data
DEVICE_FEATURE_S = struct.Struct("<II")
#: DEVICE_FEATURE flags: the feature number's bits (Linux's VFIO_DEVICE_FEATURE_MASK).
FEATURE_MASK = 0xFFFF
#: DEVICE_FEATURE flag: read the feature (Linux's VFIO_DEVICE_FEATURE_GET).
FEATURE_GET = 1 << 16
#: DEVICE_FEATURE flag: set the feature (Linux's VFIO_DEVICE_FEATURE_SET).
FEATURE_SET = 1 << 17
#: DEVICE_FEATURE flag: ask whether GET/SET (also given) are supported (Linux's VFIO_DEVICE_FEATURE_PROBE).
FEATURE_PROBE = 1 << 18
#: Feature 1: the migration capabilities, GET: a u64 of ``MIGRATION_*`` flags.
FEATURE_MIGRATION = 1
#: Feature 2: the migration state, GET/SET: :data:`MIG_STATE_S`.
FEATURE_MIG_DEVICE_STATE = 2
#: Feature 6: start DMA dirty-page logging, SET: :data:`LOGGING_CONTROL_S` + ranges.
FEATURE_DMA_LOGGING_START = 6
#: Feature 7: stop DMA dirty-page logging, SET: the same body as START.
FEATURE_DMA_LOGGING_STOP = 7
#: Feature 8: report and clear dirty pages, GET: :data:`LOGGING_REPORT_S`, the reply appends the bitmap.
FEATURE_DMA_LOGGING_REPORT = 8
#: MIGRATION flag: the device supports STOP_COPY (required; Linux's VFIO_MIGRATION_STOP_COPY).
MIGRATION_STOP_COPY = 0x1
#: MIGRATION flag: the RUNNING_P2P states (Linux's VFIO_MIGRATION_P2P; not offered by pcidev).
MIGRATION_P2P = 0x2
#: MIGRATION flag: the PRE_COPY states (Linux's VFIO_MIGRATION_PRE_COPY).
MIGRATION_PRE_COPY = 0x4
#: MIGRATION GET data: the flags u64
MIGRATION_S = struct.Struct("<Q")
#: MIG_DEVICE_STATE data: device_state u32, data_fd u32 (unused in vfio-user: 0xFFFFFFFF)
MIG_STATE_S = struct.Struct("<II")
#: Migration state (Linux's enum vfio_device_mig_state): failed; left only by DEVICE_RESET.
MIG_STATE_ERROR = 0
#: Migration state: stopped, no guest accesses progress, no DMA.
MIG_STATE_STOP = 1
#: Migration state: running (the state outside a migration).
MIG_STATE_RUNNING = 2
#: Migration state: stopped, its state readable with MIG_DATA_READ.
MIG_STATE_STOP_COPY = 3
#: Migration state: stopped, taking a state with MIG_DATA_WRITE.
MIG_STATE_RESUMING = 4
#: Migration state: running without peer-to-peer DMA (refused: P2P is not offered).
MIG_STATE_RUNNING_P2P = 5
#: Migration state: running, early state readable with MIG_DATA_READ.
MIG_STATE_PRE_COPY = 6
#: Migration state: PRE_COPY without peer-to-peer DMA (refused: P2P is not offered).
MIG_STATE_PRE_COPY_P2P = 7
#: The name of each migration state (logs, errors).
MIG_STATE_NAMES = {MIG_STATE_ERROR: "ERROR", MIG_STATE_STOP: "STOP", MIG_STATE_RUNNING: "RUNNING",
                   MIG_STATE_STOP_COPY: "STOP_COPY", MIG_STATE_RESUMING: "RESUMING",
                   MIG_STATE_RUNNING_P2P: "RUNNING_P2P", MIG_STATE_PRE_COPY: "PRE_COPY",
                   MIG_STATE_PRE_COPY_P2P: "PRE_COPY_P2P"}
#: DMA_LOGGING_START/STOP data: page_size u64, num_ranges u32, reserved u32; then ranges
LOGGING_CONTROL_S = struct.Struct("<QII")
#: one logging range: iova u64, length u64
LOGGING_RANGE_S = struct.Struct("<QQ")
#: DMA_LOGGING_REPORT data: iova u64, length u64, page_size u64 (the reply appends the bitmap)
LOGGING_REPORT_S = struct.Struct("<QQQ")
#: MIG_DATA_READ request: argsz u32, size u32; the reply and MIG_DATA_WRITE append the data
MIG_DATA_S = struct.Struct("<II")
#: The page size pcidev advertises for migration (VERSION ``migration.pgsize``).
MIGRATION_PGSIZE = 4096


#: the deepest nesting of arrays and objects accepted in a VERSION capability string
MAX_VERSION_DEPTH = 32
#: the longest VERSION capability string accepted, in bytes (QEMU's is about 200)
MAX_VERSION_SIZE = 64 * 1024


def json_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` in JSON ``text`` (brackets inside strings
    do not count), found without recursion: checked before ``json.loads``, whose
    recursive parser raises ``RecursionError`` on a few thousand levels."""
    depth = most = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            most = max(most, depth)
        elif ch in "]}":
            depth -= 1
    return most


def parse_caps(text: bytes) -> dict[str, Any]:
    """The capabilities of a VERSION payload's string (after the major and minor):
    a NUL-terminated JSON object, its ``capabilities`` member an object. Bounded: a
    string longer than :data:`MAX_VERSION_SIZE` or nested deeper than
    :data:`MAX_VERSION_DEPTH` is refused before the (recursive) JSON parser sees it.

    :param text: the string with its NUL (empty: no capabilities).
    :returns: the ``capabilities`` object (``{}`` when absent).
    :raises ValueError: what is wrong, in one line.
    """
    if not text:
        return {}
    if len(text) > MAX_VERSION_SIZE:
        raise ValueError(f"the capability string has {len(text)} bytes (at most {MAX_VERSION_SIZE})")
    if not text.endswith(b"\0"):
        raise ValueError("the capability string is not NUL-terminated")
    try:
        decoded = text[:-1].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"the capability string is not UTF-8 ({exc})") from None
    if not decoded.strip():
        return {}
    if json_depth(decoded) > MAX_VERSION_DEPTH:
        raise ValueError(f"the capability JSON nests deeper than {MAX_VERSION_DEPTH} levels")
    try:
        parsed = json.loads(decoded)
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise ValueError("the capability JSON nests too deep") from None
    except ValueError as exc:
        raise ValueError(f"bad capability JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise ValueError("the capabilities are not a JSON object")
    inner = parsed.get("capabilities", {})
    if not isinstance(inner, dict):
        raise ValueError("'capabilities' is not an object")
    return inner


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
    "VfioUserError", "header", "message", "reply", "error_reply", "json_depth", "parse_caps"]
