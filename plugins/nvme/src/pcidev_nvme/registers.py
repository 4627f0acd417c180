"""BAR0 registers of the NVMe controller: offsets, the CAP / CC / CSTS fields, and
:class:`ControllerState`, the registers and state machine a migration carries.

BAR0::

    000h CAP     MQES, CQR=1, AMS=0, TO=15 (7.5 s), DSTRD=0, NSSRS=1, CSS = NVM + I/O command
                 sets, MPSMIN=0 (4 KiB), MPSMAX=4 (64 KiB), CRWMS=1, CMBS / PMRS with a CMB / PMR
    008h VS      2.0
    00Ch INTMS   write 1 to mask a vector (pin-based / MSI)
    010h INTMC   write 1 to unmask
    014h CC      EN CSS MPS AMS SHN IOSQES IOCQES
    01Ch CSTS    RDY CFS SHST NSSRO (RW1C)
    020h NSSR    write 4E564D65h ("NVMe") for an NVM Subsystem Reset; reads 0
    024h AQA     ASQS ACQS
    028h ASQ     038h.. CMB registers (:mod:`pcidev_nvme.cmb`), BP and NSSD read 0
    030h ACQ     E00h.. PMR registers (:mod:`pcidev_nvme.pmr`)
    068h CRTO    CRWMT = 7.5 s
    1000h + 8*qid      SQ y tail doorbell
    1000h + 8*qid + 4  CQ y head doorbell

:func:`build_register_map` builds the register map; the CC/CSTS state machine behind
INTMS/INTMC/CC/CSTS lives in :mod:`pcidev_nvme.controller`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs

from pcidev.bar import Access, Register, RegisterMap
from pcidev.errors import ConfigError

__all__ = [
    "ControllerState", "Bar0", "build_register_map", "cap_value", "ZeroBar", "DOORBELL_BASE", "ST_DISABLED",
    "ST_READY", "ST_RESETTING", "ST_FAILED", "REG_CAP", "REG_VS", "REG_INTMS", "REG_INTMC", "REG_CC", "REG_CSTS",
    "REG_NSSR", "REG_AQA", "REG_ASQ", "REG_ACQ", "REG_CRTO", "CC_EN", "CC_MASK", "CSTS_RDY", "CSTS_CFS",
    "CSTS_SHST_SHIFT", "SHST_NORMAL", "SHST_PROCESSING", "SHST_COMPLETE", "CAP_CSS_NVM", "CAP_CSS_IOCS",
    "CSTS_NSSRO", "NSSR_MAGIC", "CAP_NSSRS", "CSS_NVM", "CSS_ALL", "CSS_ADMIN_ONLY", "MPSMIN", "MPSMAX", "CAP_TO",
    "CAP_CMBS", "CAP_PMRS", "CSTS_MASK", "AQA_MASK", "QUEUE_BASE_MASK", "state_problem"
]

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
#: CSTS.NSSRO: an NVM Subsystem Reset occurred (write 1 to clear)
CSTS_NSSRO = 1 << 4
#: the CSTS bits this controller ever sets (RDY, CFS, SHST, NSSRO)
CSTS_MASK = CSTS_RDY | CSTS_CFS | 3 << CSTS_SHST_SHIFT | CSTS_NSSRO
#: the bits of AQA a guest can set (ASQS, ACQS)
AQA_MASK = 0x0FFF0FFF
#: the bits of ASQ / ACQ a guest can set (bits 11:0 are reserved: page aligned)
QUEUE_BASE_MASK = ~0xFFF & (2**64 - 1)
#: the value whose write to NSSR resets the NVM subsystem ("NVMe")
NSSR_MAGIC = 0x4E564D65
#: CAP.NSSRS: NVM Subsystem Reset supported
CAP_NSSRS = 1 << 36
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


#: CAP.PMRS (a Persistent Memory Region) and CAP.CMBS (CMBLOC/CMBSZ behind CMBMSC.CRE)
CAP_PMRS = 1 << 56
CAP_CMBS = 1 << 57


def cap_value(mqes: int, *, cmbs: bool = False, pmrs: bool = False) -> int:
    """CAP: MQES, CQR=1, TO, NSSRS, CSS (NVM + I/O command sets), MPSMIN, MPSMAX, CRWMS, and
    CMBS / PMRS when the controller has a CMB / PMR."""
    return (mqes | (1 << 16) | (CAP_TO << 24) | CAP_NSSRS | ((CAP_CSS_NVM | CAP_CSS_IOCS) << 37)
            | (MPSMIN << 48) | (MPSMAX << 52) | (1 << 59) | (CAP_CMBS if cmbs else 0) | (CAP_PMRS if pmrs else 0))


#: registers that read 0 unless a component supplies them (controller memory buffer:
#: :mod:`pcidev_nvme.cmb`; boot partitions; NSSD; persistent memory region:
#: :mod:`pcidev_nvme.pmr`): name, offset, width
_ZERO_REGISTERS = (("CMBLOC", 0x38, 4), ("CMBSZ", 0x3C, 4), ("BPINFO", 0x40, 4), ("BPRSEL", 0x44, 4),
                   ("BPMBL", 0x48, 8), ("CMBMSC", 0x50, 8), ("CMBSTS", 0x58, 4), ("CMBEBS", 0x5C, 4),
                   ("CMBSWTP", 0x60, 4), ("NSSD", 0x64, 4), ("PMRCAP", 0xE00, 4), ("PMRCTL", 0xE04, 4),
                   ("PMRSTS", 0xE08, 4), ("PMREBS", 0xE0C, 4), ("PMRSWTP", 0xE10, 4), ("PMRMSCL", 0xE14, 4),
                   ("PMRMSCU", 0xE18, 4))


#: a register write hook: ``fn(reg, new, old)``
_OnWrite = Callable[[Register, int, int], None]


def build_register_map(name: str, cap: int, *, intms: Callable[[Register], int], on_intms: _OnWrite,
                       on_intmc: _OnWrite, on_cc: _OnWrite,
                       csts: Callable[[Register], int], extra: Iterable[Register] = (),
                       on_csts: _OnWrite | None = None, on_nssr: _OnWrite | None = None) -> RegisterMap:
    """The BAR0 register map below the doorbells (see the module docstring).

    :param name: the map's name in logs.
    :param cap: the CAP value (:func:`cap_value`).
    :param intms: reads INTMS / INTMC (the mask).
    :param on_intms: write handler of INTMS.
    :param on_intmc: write handler of INTMC.
    :param on_cc: write handler of CC.
    :param csts: reads CSTS.
    :param extra: registers of the CMB and PMR components, each in place of the
        read-as-zero register of the same name, offset and width.
    :raises ConfigError: an extra register that is not one of those.
    :param on_csts: write handler of CSTS (NSSRO is write 1 to clear; None: read-only).
    :param on_nssr: write handler of NSSR (gets the value written; None: read-only).
    """
    regs = RegisterMap(DOORBELL_BASE, name=name)
    ro = Access.RO
    regs.add(Register("CAP", REG_CAP, 8, ro, reset=cap))
    regs.add(Register("VS", REG_VS, 4, ro, reset=0x00020000))
    regs.add(Register("INTMS", REG_INTMS, 4, on_read=intms, on_write=on_intms))
    regs.add(Register("INTMC", REG_INTMC, 4, on_read=intms, on_write=on_intmc))
    regs.add(Register("CC", REG_CC, 4, mask=CC_MASK, on_write=on_cc))
    if on_csts is None:
        regs.add(Register("CSTS", REG_CSTS, 4, ro, on_read=csts))
    else:
        regs.add(Register("CSTS", REG_CSTS, 4, mask=CSTS_NSSRO, on_read=csts, on_write=on_csts))
    if on_nssr is None:
        regs.add(Register("NSSR", REG_NSSR, 4, ro))
    else:
        regs.add(Register("NSSR", REG_NSSR, 4, on_read=lambda r: 0, on_write=on_nssr))
    regs.add(Register("AQA", REG_AQA, 4, mask=AQA_MASK))
    regs.add(Register("ASQ", REG_ASQ, 8, mask=QUEUE_BASE_MASK))
    regs.add(Register("ACQ", REG_ACQ, 8, mask=QUEUE_BASE_MASK))
    supplied = {r.name: r for r in extra}
    for reg_name, off, width in _ZERO_REGISTERS:
        reg = supplied.pop(reg_name, None)
        if reg is not None and (reg.offset, reg.width) != (off, width):
            raise ConfigError(f"register {reg_name}: {reg.width} bytes at {reg.offset:#x}, "
                              f"expected {width} at {off:#x}")
        regs.add(reg if reg is not None else Register(reg_name, off, width, ro))
    if supplied:
        raise ConfigError(f"registers {sorted(supplied)} are not CMB or PMR registers")
    regs.add(Register("CRTO", REG_CRTO, 4, ro, reset=CAP_TO))
    return regs


def enable_problem(cc: int, aqa: int, asq: int, acq: int) -> str | None:
    """Why CC.EN 0->1 with these registers must fail (CSTS.CFS), or None.

    Checks the admin queue sizes, CC.MPS, CC.CSS, CC.AMS and the alignment of ASQ
    and ACQ; whether the queues lie in guest memory is the controller's check.

    :returns: the problem in words, or None when the registers are acceptable.
    """
    asqs, acqs = (aqa & 0xFFF) + 1, ((aqa >> 16) & 0xFFF) + 1
    css, mps, ams = (cc >> 4) & 7, (cc >> 7) & 0xF, (cc >> 11) & 7
    if asqs < 2:
        return f"AQA.ASQS {asqs - 1} is too small"
    if acqs < 2:
        return f"AQA.ACQS {acqs - 1} is too small"
    if not MPSMIN <= mps <= MPSMAX:
        return f"CC.MPS {mps} outside MPSMIN..MPSMAX ({MPSMIN}..{MPSMAX})"
    if css not in (CSS_NVM, CSS_ALL):
        return f"CC.CSS {css:#05b} is not supported"
    if ams != 0:
        return f"CC.AMS {ams} is not supported (round robin only)"
    if asq == 0 or acq == 0:
        return "ASQ or ACQ is zero"
    page = 4096 << mps
    if asq & (page - 1) or acq & (page - 1):
        return f"ASQ/ACQ not aligned to the {page}-byte memory page"
    return None


def state_problem(state: str, cc: int, csts: int, shutting_down: bool, page_size: int) -> tuple[str, str] | None:
    """Why saved registers are ones no live controller has, as ``(reason, field)``, or None.

    What the state machine guarantees: CSTS.RDY is set exactly when the controller is
    enabled (ready, or failed after being ready), and then CC.EN is 1 (CC.EN 0 starts a
    reset, which a save waits for), the memory page size is CC.MPS's, CSTS.CFS is set
    exactly when it failed; CSTS.SHST is never 3; a shutdown in progress has CC.SHN set.

    :param state: ``"disabled"``, ``"ready"`` or ``"failed"``.
    """
    enabled = state != ST_DISABLED
    if bool(csts & CSTS_RDY) != enabled:
        return f"CSTS.RDY is {csts & CSTS_RDY} for a {state} controller", "csts"
    if enabled and not cc & CC_EN:
        return f"CC.EN is 0 for a {state} controller (its reset would never complete)", "cc"
    if enabled and bool(csts & CSTS_CFS) != (state == ST_FAILED):
        return f"CSTS.CFS is {(csts & CSTS_CFS) >> 1} for a {state} controller", "csts"
    if (csts >> CSTS_SHST_SHIFT) & 3 == 3:
        return "CSTS.SHST is 3 (reserved)", "csts"
    if shutting_down and not (cc >> 14) & 3:
        return "a shutdown in progress with CC.SHN 0", "shutting_down"
    if page_size < 4096 or page_size > 4096 << MPSMAX or page_size & (page_size - 1):
        return f"memory page size {page_size} is not 4 KiB..{4 << MPSMAX} KiB", "page_size"
    if enabled and page_size != 4096 << ((cc >> 7) & 0xF):
        return f"memory page size {page_size} is not CC.MPS's ({4096 << ((cc >> 7) & 0xF)})", "page_size"
    return None


def _align(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


def _pow2(v: int) -> int:
    return 1 << max(v - 1, 1).bit_length()


@attrs.frozen
class BarLayout:
    """Where BAR0's doorbells end and the MSI-X table and PBA live.

    :param bar0_size: size of BAR0 (a power of two).
    :param doorbell_window: offset in BAR0 where the doorbell window ends (the MSI-X
        table, or the end of BAR0).
    :param msix_bar: the BAR of the MSI-X table and PBA (0 or 4).
    :param table_offset: MSI-X table offset in that BAR.
    :param pba_offset: PBA offset in that BAR.
    :param bar4_size: size of BAR4 (0 when the table is in BAR0).
    """

    bar0_size: int
    doorbell_window: int
    msix_bar: int
    table_offset: int
    pba_offset: int
    bar4_size: int = 0


def bar_layout(max_ioqpairs: int, vectors: int, msix_bar: int) -> BarLayout:
    """The BAR layout for ``max_ioqpairs`` I/O queue pairs and ``vectors`` MSI-X vectors.

    :param max_ioqpairs: I/O queue pairs (a doorbell pair each, plus the admin queue's).
    :param vectors: MSI-X table size.
    :param msix_bar: 0: table and PBA after the doorbells in BAR0 (page aligned); 4: in
        BAR4 at offset 0, as QEMU's nvme does.
    :returns: the layout.
    """
    db_end = DOORBELL_BASE + 8 * (max_ioqpairs + 1)
    pba_bytes = _align((vectors + 63) // 64 * 8, 4096)
    if msix_bar == 0:
        table = _align(db_end, 4096)
        pba = _align(table + 16 * vectors, 4096)
        return BarLayout(bar0_size=_pow2(pba + pba_bytes), doorbell_window=table, msix_bar=0,
                         table_offset=table, pba_offset=pba)
    size = _pow2(_align(db_end, 4096))
    pba = _align(16 * vectors, 4096)
    return BarLayout(bar0_size=size, doorbell_window=size, msix_bar=4, table_offset=0, pba_offset=pba,
                     bar4_size=_pow2(pba + pba_bytes))


class Bar0:
    """BAR0 handler: the register map below 1000h, doorbells above.

    :param regs: the register map.
    :param doorbell_write: ``(offset, size, value)`` for a write at or above 1000h.
    :param db_end: end of the doorbell window (the MSI-X table may follow).
    :param components: the registers a component owns (the CMB's and the PMR's): a PCI
        reset leaves them to their component (its ``reset``), which knows what the reset
        keeps.
    """

    def __init__(self, regs: RegisterMap, doorbell_write: Callable[[int, int, int], None], db_end: int,
                 components: Iterable[Register] = ()) -> None:
        self.regs = regs
        self.doorbell_write = doorbell_write
        self.db_end = db_end
        theirs = {id(r) for r in components}
        self._own = [r for r in regs if id(r) not in theirs]

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
        """A PCI reset: every register this map owns back to its reset value."""
        for reg in self._own:
            reg.value = reg.reset & ((1 << (8 * reg.width)) - 1)


class ZeroBar:
    """A BAR whose only content is the MSI-X table and PBA (framework overlays)."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass
