"""The Controller Memory Buffer (CMB): memory of the controller that the host maps through
BAR2 and that the controller reads and writes as if it were host memory.

``cmb_size=N`` (MiB) gives the controller BAR2, a 64-bit prefetchable RAM BAR
(:class:`~pcidev.bar.RamBacking`, a memfd, offered for mmap to a vfio-user client so the
guest's accesses never trap) whose first N MiB are the CMB, and CAP.CMBS. The NVMe 1.4
registers (NVMe Base 2.0, 3.1.4.14 to 3.1.4.19; names as in libnvme ``types.h``)::

    038h CMBLOC   BIR = 2, OFST = 0                 (reads 0 until CMBMSC.CRE is set)
    03Ch CMBSZ    SQS = 1, CQS = 0, LISTS = 1, RDS = 1, WDS = 1, SZU = 1 MiB, SZ = N
                                                    (reads 0 until CMBMSC.CRE is set)
    050h CMBMSC   CRE (bit 0), CMSE (bit 1), CBA (bits 63:12)
    058h CMBSTS   CBAI (bit 0): the host set CMSE with an invalid CBA
    05Ch CMBEBS   0 (no elasticity buffer reported)
    060h CMBSWTP  0 (no sustained write throughput reported)

**Controller memory space.** While CMBMSC.CMSE is 1 (with CRE), addresses in
``[CBA, CBA + N MiB)`` are CMB addresses: the controller's DMA view
(:class:`CmbMemory`, what :attr:`NvmeController.dma
<pcidev_nvme.controller.NvmeController.dma>` returns then) sends them to the CMB's
memory and every other address to guest memory. A CBA that is not aligned to the CMB
size unit (1 MiB) or whose range would pass 2**64 is refused: CMBSTS.CBAI is set and
CMSE stays 0. CMBSTS.CBAI is cleared by the next valid CMSE write.

**What may live in the CMB**: I/O submission queues (Linux's ``nvme.use_cmb_sqes``:
the fetch path reads the entries from the CMB), PRP lists and SGL segments (LISTS),
and read and write data (RDS, WDS). Completion queues may not (CQS = 0): Create I/O
Completion Queue with its base in the CMB fails with Invalid Use of Controller Memory
Buffer. The admin queues stay in host memory.

**Mixing rule** (as QEMU's): the data buffer of one command is either wholly in the CMB
or wholly in host memory; a PRP or SGL data pointer that mixes the two, or one piece
that straddles the CMB's edge, fails with Invalid Use of Controller Memory Buffer
(00h/12h, DNR). PRP lists and SGL segments themselves may be in either.

**Reset and migration.** A PCI reset (conventional, FLR) clears CMBMSC and CMBSTS; a
controller reset (CC.EN 1 to 0) keeps them (Linux writes them again after every
reset). The contents are a RAM BAR, which the framework migrates (the memfd travels;
see :mod:`pcidev.migration.function_state`); the registers travel as the optional
``cmb`` subsection of the ``nvme`` section (:class:`CmbState`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from pcidev.bar import Access, RamBacking, Register
from pcidev.dma import GuestMemory
from pcidev.errors import DmaError
from pcidev.vmstate import U32, U64, vmstate
from pcidev_nvme.status import NvmeStatusError, Status

__all__ = ["CMB_BAR", "CmbMemory", "CmbState", "ControllerMemoryBuffer", "CMBMSC_CRE", "CMBMSC_CMSE",
           "CMBSTS_CBAI", "CMBSZ_SQS", "CMBSZ_CQS", "CMBSZ_LISTS", "CMBSZ_RDS", "CMBSZ_WDS", "SZU_1M"]

#: the BAR holding the CMB
CMB_BAR = 2
#: CMBMSC fields
CMBMSC_CRE = 1 << 0
CMBMSC_CMSE = 1 << 1
CMBMSC_CBA_MASK = ((1 << 64) - 1) & ~0xFFF
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
    """The CMB's registers: CMBMSC (CRE, CMSE, CBA) and CMBSTS (CBAI)."""

    cmbmsc: U64
    cmbsts: U32


def _mixed(what: str) -> NvmeStatusError:
    return NvmeStatusError(Status.INVALID_USE_OF_CMB, what, dnr=True)


class CmbMemory(GuestMemory):
    """The controller's DMA view while its CMB is addressable: guest memory, with the
    CMB's addresses sent to the CMB (see the module docstring for the mixing rule).

    It is a :class:`~pcidev.dma.GuestMemory` for the data path (``read``, ``write``,
    ``views``, ``sg_views``, ``access``, ``load32``...), but maps nothing itself: each
    access goes to :attr:`host` or to the CMB's own mapping.

    :param cmb: the CMB's memory, mapped at ``[start, end)``.
    :param start: the first CMB address (CBA).
    :param end: one past the last.
    """

    def __init__(self, cmb: GuestMemory, start: int, end: int) -> None:
        super().__init__(max_regions=1)
        self.cmb = cmb
        self.start = start
        self.end = end
        self.host: GuestMemory = cmb  # set by over() before any use

    def over(self, host: GuestMemory) -> CmbMemory:
        """This view on top of ``host`` (the device's guest memory now)."""
        if self.host is not host:
            self.host = host
        return self

    def _side(self, gpa: int, length: int) -> GuestMemory:
        if gpa >= self.end or gpa + length <= self.start:
            return self.host
        if gpa >= self.start and gpa + length <= self.end:
            return self.cmb
        raise _mixed(f"[{gpa:#x}, +{length:#x}) straddles the edge of the controller memory buffer "
                     f"[{self.start:#x}, {self.end:#x})")

    def contains(self, gpa: int) -> bool:
        """Whether ``gpa`` is a CMB address."""
        return self.start <= gpa < self.end

    # -- the data path's accesses --------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        return self._side(gpa, length).read(gpa, length)

    def read_into(self, gpa: int, buf: Any) -> None:
        with memoryview(buf) as mv:
            self._side(gpa, mv.nbytes).read_into(gpa, buf)

    def write(self, gpa: int, data: Any) -> None:
        with memoryview(data) as mv:
            self._side(gpa, mv.nbytes).write(gpa, data)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self._side(gpa, length).fill(gpa, length, byte)

    def copy(self, dst_gpa: int, src_gpa: int, length: int) -> None:
        src, dst = self._side(src_gpa, length), self._side(dst_gpa, length)
        if src is dst:
            src.copy(dst_gpa, src_gpa, length)
        else:
            dst.write(dst_gpa, src.read(src_gpa, length))

    def load32(self, gpa: int) -> int:
        return self._side(gpa, 4).load32(gpa)

    def load64(self, gpa: int) -> int:
        return self._side(gpa, 8).load64(gpa)

    def store32(self, gpa: int, value: int) -> None:
        self._side(gpa, 4).store32(gpa, value)

    def store64(self, gpa: int, value: int) -> None:
        self._side(gpa, 8).store64(gpa, value)

    def read_u32(self, gpa: int) -> int:
        return self._side(gpa, 4).read_u32(gpa)

    def write_u32(self, gpa: int, value: int) -> None:
        self._side(gpa, 4).write_u32(gpa, value)

    def is_mapped(self, gpa: int, length: int, *, write: bool = False) -> bool:
        try:
            side = self._side(gpa, length)
        except NvmeStatusError:
            return False
        return side.is_mapped(gpa, length, write=write)

    def views(self, gpa: int, length: int, *, write: bool = False) -> list[memoryview]:
        return self._side(gpa, length).views(gpa, length, write=write)

    def sg_views(self, sgl: Iterable[tuple[int, int]], *, write: bool = False) -> list[memoryview]:
        """Views of a scatter-gather list: all of it in the CMB or all in guest memory,
        else Invalid Use of Controller Memory Buffer."""
        entries = list(sgl)
        start, end = self.start, self.end
        in_cmb = 0
        for entry in entries:
            try:
                gpa, length = entry
            except (TypeError, ValueError):
                raise DmaError(f"bad scatter-gather entry {entry!r}") from None
            if not length:
                continue
            if gpa >= end or gpa + length <= start:
                if in_cmb > 0:
                    raise _mixed("a data buffer mixes controller memory buffer and host memory")
                in_cmb = -1
            elif gpa >= start and gpa + length <= end:
                if in_cmb < 0:
                    raise _mixed("a data buffer mixes host memory and controller memory buffer")
                in_cmb = 1
            else:
                raise _mixed(f"a data buffer piece [{gpa:#x}, +{length:#x}) straddles the edge of the "
                             "controller memory buffer")
        return (self.cmb if in_cmb > 0 else self.host).sg_views(entries, write=write)


class ControllerMemoryBuffer:
    """The CMB of one controller (see the module docstring): BAR2's memory, its registers
    and, while controller memory space is enabled, the controller's DMA view.

    :param size_mib: the CMB size in MiB (>= 1).
    :param name: the controller's name (for the memfd).
    """

    def __init__(self, size_mib: int, name: str) -> None:
        self.size_mib = size_mib
        #: the CMB's bytes (the start of BAR2)
        self.size = size_mib * _UNIT
        #: BAR2's size: the CMB rounded up to a power of two
        self.bar_size = 1 << (self.size - 1).bit_length()
        self.ram = RamBacking(self.bar_size, name=f"nvme-cmb[{name}]")
        self.msc = Register("CMBMSC", 0x50, 8, Access.RW, on_write=self._msc_written)
        self.sts = Register("CMBSTS", 0x58, 4, Access.RO)
        #: the controller's DMA view while controller memory space is enabled, else None
        self.window: CmbMemory | None = None
        self._mapped: GuestMemory | None = None
        self._mapped_key: tuple[int, int] | None = None

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
        """CMBMSC.CRE: CMBLOC and CMBSZ report the CMB."""
        return bool(self.msc.value & CMBMSC_CRE)

    @property
    def cmbloc(self) -> int:
        """CMBLOC: BAR2, offset 0 (0 until CMBMSC.CRE)."""
        return CMB_BAR if self.enabled_registers else 0

    @property
    def cmbsz(self) -> int:
        """CMBSZ: submission queues, lists, read and write data; 1 MiB units (0 until CMBMSC.CRE)."""
        if not self.enabled_registers:
            return 0
        return CMBSZ_SQS | CMBSZ_LISTS | CMBSZ_RDS | CMBSZ_WDS | (SZU_1M << 8) | (self.size_mib << 12)

    def _msc_written(self, reg: Register, new: int, old: int) -> None:
        value = new & (CMBMSC_CRE | CMBMSC_CMSE | CMBMSC_CBA_MASK)
        if value & CMBMSC_CMSE:
            cba = value & CMBMSC_CBA_MASK
            if not value & CMBMSC_CRE or cba % _UNIT or cba + self.size > 1 << 64:
                self.sts.value = CMBSTS_CBAI
                value &= ~CMBMSC_CMSE
            else:
                self.sts.value = 0
        reg.value = value
        self._place()

    def _place(self) -> None:
        """Make :attr:`window` follow CMBMSC (and the RAM BAR's descriptor)."""
        msc = self.msc.value
        if not (msc & CMBMSC_CMSE and msc & CMBMSC_CRE):
            self.window = None
            return
        cba = msc & CMBMSC_CBA_MASK
        key = (cba, self.ram.fd)
        if self._mapped_key != key or self._mapped is None:
            mapped = GuestMemory(max_regions=1)
            mapped.map(cba, self.size, self.ram.fd, 0, writable=True, name="nvme-cmb")
            old, self._mapped, self._mapped_key = self._mapped, mapped, key
            if old is not None:
                _close_quietly(old)
        self.window = CmbMemory(self._mapped, cba, cba + self.size)

    def refuse_cq(self, base: int, nbytes: int) -> None:
        """Create I/O Completion Queue: a queue in the CMB is not supported (CMBSZ.CQS = 0).

        :raises NvmeStatusError: Invalid Use of Controller Memory Buffer.
        """
        w = self.window
        if w is not None and base < w.end and base + nbytes > w.start:
            raise _mixed(f"completion queues in the controller memory buffer are not supported "
                         f"(CQ at {base:#x})")

    # -- lifecycle ----------------------------------------------------------------------------
    def reset(self) -> None:
        """A PCI reset: CMBMSC and CMBSTS cleared, controller memory space disabled."""
        self.msc.value = 0
        self.sts.value = 0
        self._place()

    def snapshot(self) -> CmbState:
        """The registers."""
        return CmbState(cmbmsc=self.msc.value, cmbsts=self.sts.value)

    def restore(self, st: CmbState | None) -> None:
        """Take the registers of a checked state (None: a stream without them: reset
        values), and map the RAM BAR's current descriptor (the one a load adopted)."""
        self.msc.value = st.cmbmsc if st is not None else 0
        self.sts.value = st.cmbsts if st is not None else 0
        self._place()

    def check(self, st: CmbState) -> str | None:
        """Why ``st`` cannot apply, or None."""
        if st.cmbmsc & ~(CMBMSC_CRE | CMBMSC_CMSE | CMBMSC_CBA_MASK):
            return f"CMBMSC {st.cmbmsc:#x} sets reserved bits"
        if st.cmbsts & ~CMBSTS_CBAI:
            return f"CMBSTS {st.cmbsts:#x} sets reserved bits"
        cba = st.cmbmsc & CMBMSC_CBA_MASK
        if st.cmbmsc & CMBMSC_CMSE and (cba % _UNIT or cba + self.size > 1 << 64 or not st.cmbmsc & CMBMSC_CRE):
            return f"controller memory space enabled at an invalid CBA {cba:#x}"
        return None

    def close(self) -> None:
        """Unmap the DMA view and close the RAM BAR."""
        self.window = None
        if self._mapped is not None:
            _close_quietly(self._mapped)
            self._mapped = None
        self.ram.close()


def _close_quietly(mem: GuestMemory) -> None:
    try:
        mem.close()
    except DmaError:
        pass  # views still alive: the mappings go with them
