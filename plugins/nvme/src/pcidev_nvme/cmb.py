"""The Controller Memory Buffer (CMB): memory of the controller that the host maps through
BAR2 and that the controller reads and writes as if it were host memory.

``cmb_size=N`` (MiB) gives the controller BAR2, a 64-bit prefetchable RAM BAR
(:class:`~pcidev.bar.RamBacking`, a memfd, offered for mmap to a vfio-user client so the
guest's accesses never trap) whose first N MiB are the CMB, and CAP.CMBS. The NVMe 1.4
registers (NVMe Base 2.0, 3.1.4.14 to 3.1.4.19; names as in libnvme ``types.h``)::

    038h CMBLOC   BIR = 2, CDPMLS = 1, CDPCILS = 1, OFST = 0  (reads 0 until CMBMSC.CRE is set)
    03Ch CMBSZ    SQS = 1, CQS = 0, LISTS = 1, RDS = 1, WDS = 1, SZU = 1 MiB, SZ = N
                                                    (reads 0 until CMBMSC.CRE is set)
    050h CMBMSC   CRE (bit 0), CMSE (bit 1), CBA (bits 63:12): read back as written
    058h CMBSTS   CBAI (bit 0): CRE and CMSE are set and CBA is invalid
    05Ch CMBEBS   0 (no elasticity buffer reported)
    060h CMBSWTP  0 (no sustained write throughput reported)

**Controller memory space.** While CMBMSC.CRE and CMSE are 1 and CBA is valid,
addresses in ``[CBA, CBA + N MiB)`` are CMB addresses: the controller's DMA view
(:class:`~pcidev_nvme.controller_memory.ControllerMemoryView`, what
:attr:`NvmeController.dma <pcidev_nvme.controller.NvmeController.dma>` returns then)
sends them to the CMB's memory and every other address to guest memory. CBA is invalid
when the range would pass 2**64 or overlaps the PMR's enabled controller memory space
(:mod:`pcidev_nvme.pmr`); then CMBSTS.CBAI is set and the CMB has no controller memory
space. Each CMBMSC write evaluates them again (CBAI is cleared when CRE or CMSE is 0 or CBA
is valid); with CRE 0, CMSE has no effect. The register keeps what the host wrote.

**Legacy mode** (``legacy_cmb=on``, QEMU's ``legacy-cmb``): the CMB as NVMe 1.2 / 1.3
define it, for kernels that predate CMBMSC (Linux before 5.x maps the CMB from CMBLOC /
CMBSZ alone). CAP.CMBS is clear; CMBMSC and CMBSTS are reserved (read 0, writes ignored);
CMBLOC and CMBSZ always report the CMB; and the CMB's controller memory space is BAR2's
bus address itself, while BAR2 is assigned (non-zero) and memory decoding is on
(COMMAND.MSE): every write of BAR2 or of the command register places it again (a BAR being
sized, or overlapping the PMR's controller memory space, has none). The registers migrate
as in 1.4 mode (CMBMSC 0); the place follows from configuration space, which migrates too.

**What may live in the CMB**: admin and I/O submission queues (Linux's
``nvme.use_cmb_sqes``: the fetch path reads the entries from the CMB), PRP lists and SGL
segments (LISTS), and read and write data (RDS, WDS). Completion queues may not (CQS = 0):
Create I/O Completion Queue with its base in the CMB fails with Invalid Use of Controller
Memory Buffer, and CC.EN with ACQ in the CMB sets CSTS.CFS.

**Mixing rule** (as QEMU's): the data buffer of one command is wholly in the CMB, wholly
in the PMR or wholly in host memory; a PRP or SGL data pointer that mixes them, or one piece
that straddles the CMB's edge, fails with Invalid Use of Controller Memory Buffer (00h/12h,
DNR). PRP lists and SGL segments may be in either, whether or not the command's
submission queue is in the CMB (CMBLOC.CDPCILS) and even when the data is in the other
memory (CMBLOC.CDPMLS).

**Reset and migration.** A conventional or power-on reset clears CMBMSC and CMBSTS. A
Function Level Reset (and vfio-user's device reset, which is one) and a controller
reset (CC.EN 1 to 0) keep them (NVMe Base 2.1: CMBMSC is not reset by a Controller Reset
or an FLR; Linux maps the CMB once, in ``nvme_map_cmb``, and never writes CMBMSC again).
The contents are a RAM BAR, which the framework migrates (the memfd travels over UNIX
sockets, its contents over TCP and in vfio-user migration data: see
:mod:`pcidev.migration.function_state`; the window maps it through
:meth:`pcidev.bar.RamBacking.map_view`, so a pre-copy tracks it by page hashes once
controller memory space was enabled); the registers travel as the optional
``cmb`` subsection of the ``nvme`` section (:class:`CmbState`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import attrs

from pcidev.bar import Access, RamBacking, Register
from pcidev.pci.config import ResetKind
from pcidev.vmstate import U32, U64, vmstate
from pcidev_nvme.controller_memory import MemoryWindow, invalid_use, map_window, ranges_overlap

__all__ = ["CMB_BAR", "CmbState", "ControllerMemoryBuffer", "CMBMSC_CRE", "CMBMSC_CMSE",
           "CMBSTS_CBAI", "CMBLOC_CDPMLS", "CMBLOC_CDPCILS",
           "CMBSZ_SQS", "CMBSZ_CQS", "CMBSZ_LISTS", "CMBSZ_RDS", "CMBSZ_WDS", "SZU_1M"]

#: the BAR holding the CMB
CMB_BAR = 2
#: CMBMSC fields
CMBMSC_CRE = 1 << 0
CMBMSC_CMSE = 1 << 1
CMBMSC_CBA_MASK = ((1 << 64) - 1) & ~0xFFF
#: CMBLOC.CDPMLS (PRP lists / SGLs and their data may be in different memories) and
#: CMBLOC.CDPCILS (PRP lists / SGLs may be in the CMB whatever memory the SQ is in)
CMBLOC_CDPMLS = 1 << 5
CMBLOC_CDPCILS = 1 << 6
#: CMBSTS.CBAI
CMBSTS_CBAI = 1 << 0
#: CMBSZ support bits
CMBSZ_SQS = 1 << 0
CMBSZ_CQS = 1 << 1
CMBSZ_LISTS = 1 << 2
CMBSZ_RDS = 1 << 3
CMBSZ_WDS = 1 << 4
#: CMBSZ.SZU value of 1 MiB units
SZU_1M = 2
_UNIT = 1 << 20


@vmstate("nvme/cmb", version=1)
@attrs.frozen
class CmbState:
    """The CMB's registers: CMBMSC (CRE, CMSE, CBA) and CMBSTS (CBAI; evaluated again
    on restore)."""

    cmbmsc: U64
    cmbsts: U32


class ControllerMemoryBuffer:
    """The CMB of one controller (see the module docstring): BAR2's memory, its registers
    and, while controller memory space is enabled, the controller's DMA view.

    :param size_mib: the CMB size in MiB (>= 1).
    :param name: the controller's name (for the memfd).
    :param changed: called when :attr:`window` changed (the controller recomposes its DMA view).
    :param other: the range ``(start, end)`` of the PMR's enabled controller memory space,
        or None (a CBA overlapping it is invalid).
    :param lock: serializes changes of the controller's windows (one per controller).
    :param legacy: the pre-1.4 CMB (see the module docstring): no CMBMSC, the CMB at BAR2.
    :param bar_base: BAR2's bus address while the guest decodes it, else None (legacy mode).
    """

    def __init__(self, size_mib: int, name: str, changed: Callable[[], None], *,
                 other: Callable[[], tuple[int, int] | None] = lambda: None,
                 lock: threading.RLock | None = None, legacy: bool = False,
                 bar_base: Callable[[], int | None] = lambda: None) -> None:
        self._changed = changed
        self._other = other
        self.legacy = legacy
        self._bar_base = bar_base
        self._lock = lock if lock is not None else threading.RLock()
        self.size_mib = size_mib
        #: the CMB's bytes (the start of BAR2)
        self.size = size_mib * _UNIT
        #: BAR2's size: the CMB rounded up to a power of two
        self.bar_size = 1 << (self.size - 1).bit_length()
        self.ram = RamBacking(self.bar_size, name=f"nvme-cmb[{name}]")
        self.msc = Register("CMBMSC", 0x50, 8, Access.RW, on_write=self._msc_written)
        self.sts = Register("CMBSTS", 0x58, 4, Access.RO)
        #: the CMB's addresses while controller memory space is enabled, else None
        self.window: MemoryWindow | None = None
        self._window_key: tuple[int, tuple[int, int] | None] | None = None

    # -- registers ---------------------------------------------------------------------------
    def registers(self) -> list[Register]:
        """CMBLOC, CMBSZ, CMBMSC, CMBSTS, CMBEBS and CMBSWTP for the BAR0 register map."""
        ro = Access.RO
        return [Register("CMBLOC", 0x38, 4, ro, on_read=lambda r: self.cmbloc),
                Register("CMBSZ", 0x3C, 4, ro, on_read=lambda r: self.cmbsz),
                self.msc, self.sts,
                Register("CMBEBS", 0x5C, 4, ro), Register("CMBSWTP", 0x60, 4, ro)]

    @property
    def enabled_registers(self) -> bool:
        """CMBMSC.CRE (always, in legacy mode): CMBLOC and CMBSZ report the CMB."""
        return self.legacy or bool(self.msc.value & CMBMSC_CRE)

    @property
    def cmbloc(self) -> int:
        """CMBLOC: BAR2, offset 0, CDPMLS and CDPCILS (0 until CMBMSC.CRE)."""
        return CMB_BAR | CMBLOC_CDPMLS | CMBLOC_CDPCILS if self.enabled_registers else 0

    @property
    def cmbsz(self) -> int:
        """CMBSZ: submission queues, lists, read and write data; 1 MiB units (0 until CMBMSC.CRE)."""
        if not self.enabled_registers:
            return 0
        return CMBSZ_SQS | CMBSZ_LISTS | CMBSZ_RDS | CMBSZ_WDS | (SZU_1M << 8) | (self.size_mib << 12)

    @property
    def enabled_range(self) -> tuple[int, int] | None:
        """``(CBA, CBA + size)`` while controller memory space is enabled, else None."""
        w = self.window
        return (w.start, w.end) if w is not None else None

    def _invalid(self, msc: int) -> str | None:
        """Why the CBA of ``msc`` (CRE and CMSE set) is invalid, or None."""
        cba = msc & CMBMSC_CBA_MASK
        if cba + self.size > 1 << 64:
            return f"CBA {cba:#x}: the CMB would pass 2**64"
        if ranges_overlap((cba, cba + self.size), self._other()):
            return f"CBA {cba:#x}: the CMB would overlap the PMR's controller memory space"
        return None

    def _msc_written(self, reg: Register, new: int, old: int) -> None:
        with self._lock:
            if self.legacy:  # (reserved before NVMe 1.4)
                reg.value = 0
                return
            reg.value = new & (CMBMSC_CRE | CMBMSC_CMSE | CMBMSC_CBA_MASK)
            self._evaluate()

    def bar_moved(self) -> None:
        """BAR2 or the command register was written: a legacy CMB follows BAR2's address."""
        if self.legacy:
            with self._lock:
                self._evaluate()

    def _evaluate(self, *, force: bool = False) -> None:
        """Derive CMBSTS.CBAI and the window from CMBMSC (CRE, CMSE, CBA's validity)."""
        msc = self.msc.value
        base: int | None = None
        self.sts.value = 0
        if self.legacy:
            bar = self._bar_base()
            if bar is not None and self._invalid(bar) is None:
                base = bar
        elif msc & CMBMSC_CRE and msc & CMBMSC_CMSE:
            if self._invalid(msc) is None:
                base = msc & CMBMSC_CBA_MASK
            else:
                self.sts.value = CMBSTS_CBAI
        # (the memory object too: a load may have adopted another one)
        key = (base, self.ram.identity) if base is not None else None
        if key == self._window_key and not force:
            return
        # the old window is only dropped: a thread may still use it (the GC unmaps it)
        self.window = map_window("CMB", base, self.size, self.ram) if base is not None else None
        self._window_key = key
        self._changed()

    def refuse_cq(self, base: int, nbytes: int) -> None:
        """Create I/O Completion Queue: a queue in the CMB is not supported (CMBSZ.CQS = 0).

        :raises NvmeStatusError: Invalid Use of Controller Memory Buffer.
        """
        w = self.window
        if w is not None and w.overlaps(base, nbytes):
            raise invalid_use(f"completion queues in the controller memory buffer are not supported "
                              f"(CQ at {base:#x})")

    # -- lifecycle ----------------------------------------------------------------------------
    def reset(self, kind: ResetKind) -> None:
        """A PCI reset: a conventional or power-on reset clears CMBMSC and CMBSTS (controller
        memory space disabled); a Function Level Reset keeps them.

        :param kind: the reset.
        """
        if kind is ResetKind.FLR:
            return
        with self._lock:
            self.msc.value = 0
            self._evaluate()

    def snapshot(self) -> CmbState:
        """The registers."""
        return CmbState(cmbmsc=self.msc.value, cmbsts=self.sts.value)

    def restore(self, st: CmbState | None) -> None:
        """Take the registers of a checked state (None: a stream without them: reset
        values), and map the RAM BAR's current descriptor (the one a load adopted);
        CMBSTS.CBAI follows from CMBMSC."""
        with self._lock:
            self.msc.value = st.cmbmsc if st is not None else 0
            self._evaluate(force=True)

    def state_range(self, st: CmbState) -> tuple[int, int] | None:
        """The controller memory space ``st`` enables (CRE and CMSE set, CBAI clear, the
        range below 2**64), or None (always in legacy mode: the place is BAR2's)."""
        if self.legacy:
            return None
        cba = st.cmbmsc & CMBMSC_CBA_MASK
        if (st.cmbmsc & CMBMSC_CRE and st.cmbmsc & CMBMSC_CMSE and not st.cmbsts & CMBSTS_CBAI
                and cba + self.size <= 1 << 64):
            return (cba, cba + self.size)
        return None

    def check(self, st: CmbState) -> str | None:
        """Why ``st`` cannot apply, or None."""
        if st.cmbmsc & ~(CMBMSC_CRE | CMBMSC_CMSE | CMBMSC_CBA_MASK):
            return f"CMBMSC {st.cmbmsc:#x} sets reserved bits"
        if st.cmbsts & ~CMBSTS_CBAI:
            return f"CMBSTS {st.cmbsts:#x} sets reserved bits"
        if self.legacy and (st.cmbmsc or st.cmbsts):
            return "CMBMSC / CMBSTS set for a legacy CMB (reserved there)"
        return None

    def close(self) -> None:
        """Drop the window and close the RAM BAR."""
        with self._lock:
            self.window, self._window_key = None, None
        self.ram.close()
