"""PCI register offsets, bit fields and identifier enums.

Names follow Linux ``include/uapi/linux/pci_regs.h`` where one exists, so a reader
can check each value against that header.
"""

from __future__ import annotations

import enum

__all__ = [
    "VENDOR_ID", "DEVICE_ID", "COMMAND", "STATUS", "REVISION_ID", "CLASS_PROG", "CLASS_DEVICE",
    "CACHE_LINE_SIZE", "LATENCY_TIMER", "HEADER_TYPE", "BIST", "BASE_ADDRESS_0", "CARDBUS_CIS",
    "SUBSYSTEM_VENDOR_ID", "SUBSYSTEM_ID", "ROM_ADDRESS", "CAPABILITY_LIST", "INTERRUPT_LINE", "INTERRUPT_PIN",
    "MIN_GNT", "MAX_LAT", "CONFIG_SPACE_SIZE", "EXT_CONFIG_SPACE_SIZE", "EXT_CAP_START", "STD_CAP_START",
    "Command", "Status", "STATUS_RW1C", "BAR_SPACE_IO", "BAR_MEM_TYPE_64", "BAR_MEM_PREFETCH", "ROM_ENABLE",
    "CapId", "ExtCapId", "ClassCode",
]

# -- type-0 configuration header -------------------------------------------------
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CLASS_DEVICE = 0x0A
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BASE_ADDRESS_0 = 0x10
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
MIN_GNT = 0x3E
MAX_LAT = 0x3F

CONFIG_SPACE_SIZE = 0x100
EXT_CONFIG_SPACE_SIZE = 0x1000
EXT_CAP_START = 0x100
STD_CAP_START = 0x40


class Command(enum.IntFlag):
    """Command register bits (offset 0x04)."""

    IO = 0x0001
    MEMORY = 0x0002
    MASTER = 0x0004
    SPECIAL = 0x0008
    INVALIDATE = 0x0010
    VGA_PALETTE = 0x0020
    PARITY = 0x0040
    WAIT = 0x0080
    SERR = 0x0100
    FAST_BACK = 0x0200
    INTX_DISABLE = 0x0400


class Status(enum.IntFlag):
    """Status register bits (offset 0x06)."""

    IMM_READY = 0x0001
    INTERRUPT = 0x0008
    CAP_LIST = 0x0010
    MHZ66 = 0x0020
    FAST_BACK = 0x0080
    PARITY = 0x0100
    DEVSEL_MASK = 0x0600
    SIG_TARGET_ABORT = 0x0800
    REC_TARGET_ABORT = 0x1000
    REC_MASTER_ABORT = 0x2000
    SIG_SYSTEM_ERROR = 0x4000
    DETECTED_PARITY = 0x8000


#: Status bits software clears by writing 1.
STATUS_RW1C = (
    Status.PARITY
    | Status.SIG_TARGET_ABORT
    | Status.REC_TARGET_ABORT
    | Status.REC_MASTER_ABORT
    | Status.SIG_SYSTEM_ERROR
    | Status.DETECTED_PARITY
)

# BAR low bits
BAR_SPACE_IO = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8
ROM_ENABLE = 0x1


class CapId(enum.IntEnum):
    """Standard capability IDs (``PCI_CAP_ID_*``)."""

    PM = 0x01
    AGP = 0x02
    VPD = 0x03
    MSI = 0x05
    VNDR = 0x09
    EXP = 0x10
    MSIX = 0x11


class ExtCapId(enum.IntEnum):
    """Extended capability IDs (``PCI_EXT_CAP_ID_*``)."""

    ERR = 0x0001
    VC = 0x0002
    DSN = 0x0003
    PWR = 0x0004
    VNDR = 0x000B
    ACS = 0x000D
    ARI = 0x000E
    SRIOV = 0x0010
    LTR = 0x0018


class ClassCode(enum.IntEnum):
    """A few 24-bit class codes (base class, sub class, programming interface)."""

    NVME = 0x010802
    OTHER_UNCLASSIFIED = 0xFF0000
    OTHER_SYSTEM_PERIPHERAL = 0x088000
