"""BAR0 registers of the NVMe controller: offsets, the CAP / CC / CSTS fields, and
:class:`ControllerState`, the registers and state machine a migration carries.

BAR0::

    000h CAP     MQES, CQR=1, AMS=0, TO=15 (7.5 s), DSTRD=0, CSS = NVM + I/O command sets,
                 MPSMIN=0 (4 KiB), MPSMAX=4 (64 KiB), CRWMS=1
    008h VS      2.0
    00Ch INTMS   write 1 to mask a vector (pin-based / MSI)
    010h INTMC   write 1 to unmask
    014h CC      EN CSS MPS AMS SHN IOSQES IOCQES
    01Ch CSTS    RDY CFS SHST
    024h AQA     ASQS ACQS
    028h ASQ     038h.. CMB/BP/PMR registers read 0
    030h ACQ
    068h CRTO    CRWMT = 7.5 s
    1000h + 8*qid      SQ y tail doorbell
    1000h + 8*qid + 4  CQ y head doorbell

The register map itself is built by :meth:`pcidev_nvme.controller.NvmeController.describe`;
the CC/CSTS state machine lives there too.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from pcidev.bar import RegisterMap

__all__ = ["ControllerState", "Bar0", "ZeroBar", "DOORBELL_BASE", "ST_DISABLED", "ST_READY", "ST_RESETTING",
           "ST_FAILED", "REG_CAP", "REG_VS", "REG_INTMS", "REG_INTMC", "REG_CC", "REG_CSTS", "REG_NSSR",
           "REG_AQA", "REG_ASQ", "REG_ACQ", "REG_CRTO", "CC_EN", "CC_MASK", "CSTS_RDY", "CSTS_CFS",
           "CSTS_SHST_SHIFT", "SHST_NORMAL", "SHST_PROCESSING", "SHST_COMPLETE", "CAP_CSS_NVM", "CAP_CSS_IOCS",
           "CSS_NVM", "CSS_ALL", "CSS_ADMIN_ONLY", "MPSMIN", "MPSMAX", "CAP_TO"]

#: BAR0 offset of the first doorbell (registers below, doorbells from here on)
DOORBELL_BASE = 0x1000

#: states of the controller's state machine
ST_DISABLED, ST_READY, ST_RESETTING, ST_FAILED = "disabled", "ready", "resetting", "failed"

# -- register offsets --------------------------------------------------------------------
REG_CAP = 0x00
REG_VS = 0x08
REG_INTMS = 0x0C
REG_INTMC = 0x10
REG_CC = 0x14
REG_CSTS = 0x1C
REG_NSSR = 0x20
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
REG_CRTO = 0x68

CC_EN = 1 << 0
CC_MASK = 0x00FFFFF1
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
SHST_NORMAL, SHST_PROCESSING, SHST_COMPLETE = 0, 1, 2

CAP_CSS_NVM = 1 << 0
CAP_CSS_IOCS = 1 << 6
CSS_NVM, CSS_ALL, CSS_ADMIN_ONLY = 0, 6, 7
MPSMIN, MPSMAX = 0, 4
CAP_TO = 0x0F


@attrs.frozen
class ControllerState:
    """The controller's registers and state machine (what a migration carries of them)."""

    state: str  # "disabled", "ready" or "failed"
    cc: int
    csts: int
    aqa: int
    asq: int
    acq: int
    shutting_down: bool
    dirty: bool
    page_size: int


class Bar0:
    """BAR0 handler: the register map below 1000h, doorbells above.

    :param regs: the register map.
    :param doorbell_write: ``(offset, size, value)`` for a write at or above 1000h.
    :param db_end: end of the doorbell window (the MSI-X table may follow).
    """

    def __init__(self, regs: RegisterMap, doorbell_write: Callable[[int, int, int], None], db_end: int) -> None:
        self.regs = regs
        self.doorbell_write = doorbell_write
        self.db_end = db_end

    def read(self, offset: int, size: int) -> int:
        if offset < DOORBELL_BASE:
            if offset + size > DOORBELL_BASE:
                size = DOORBELL_BASE - offset
            return self.regs.read(offset, size)
        return 0  # doorbells are write-only

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= DOORBELL_BASE:
            if offset < self.db_end:
                self.doorbell_write(offset, size, value)
            return
        if offset + size > DOORBELL_BASE:
            size = DOORBELL_BASE - offset
            value &= (1 << (8 * size)) - 1
        self.regs.write(offset, size, value)

    def reset(self) -> None:
        self.regs.reset()


class ZeroBar:
    """A BAR whose only content is the MSI-X table and PBA (framework overlays)."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass
