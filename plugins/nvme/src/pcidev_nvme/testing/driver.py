"""A host-side NVMe driver for the software host (pcidev's libqos for NVMe).

It drives a controller through :class:`~pcidev.host.Machine` exactly as a guest
driver would: BAR and configuration-space accesses, queues and buffers in guest
RAM, MSI-X (or INTx) interrupts. Tests, examples and benchmarks use it::

    machine = Machine(ram_size=256 << 20)
    ctrl = NvmeController("ns=mem:size=64M")
    drv = NvmeDriver.attach(machine, ctrl, io_queues=2)     # probe like Linux
    drv.write(1, slba=0, data=b"x" * 4096)
    assert drv.read(1, slba=0, nlb=8) == b"x" * 4096

    # queue depth >= 32: submit without waiting, ring once, reap completions
    buf = machine.alloc(32 * 4096)
    for i in range(32):
        drv.submit_rw(1, READ, nsid=1, slba=8 * i, nlb=8, buf=buf + 4096 * i, ring=False, tag=i)
    drv.ring(1)
    done = drv.reap(1, min_completions=32)

Synchronous helpers (:meth:`NvmeDriver.admin`, :meth:`NvmeDriver.read`, ...)
raise :class:`NvmeCommandError` for a non-zero status unless ``check=False``.
The driver is not thread-safe: use one thread per queue (and only one for the
admin queue).
"""

from __future__ import annotations

import collections
import struct
import time
from typing import Any

import attrs

from pcidev import native
from pcidev.errors import PcidevError
from pcidev.host import PCI_IRQ_ALL_TYPES, PCI_IRQ_INTX, PCI_IRQ_MSIX, HostPciDevice, Machine
from pcidev.host.pci import HostedDevice
from pcidev_nvme.status import Status

__all__ = ["NvmeDriver", "Completion", "NvmeCommandError", "NvmeDriverError", "NamespaceInfo", "IoQueue",
           "READ", "WRITE", "FLUSH", "sgl_data_block"]

READ, WRITE, FLUSH = 0x02, 0x01, 0x00
WRITE_UNCORRECTABLE = 0x04
#: the NSSR register and the value that resets the NVM subsystem ("NVMe")
NSSR, NSSR_RESET = 0x20, 0x4E564D65

_SQE = struct.Struct("<BBHIIIQQQIIIIII")
_CQE = struct.Struct("<IIHHHH")
_SGL = struct.Struct("<QI3xB")
PAGE = 4096

# register offsets
CAP, VS, INTMS, INTMC, CC, CSTS, AQA, ASQ, ACQ = 0x00, 0x08, 0x0C, 0x10, 0x14, 0x1C, 0x24, 0x28, 0x30
CMBLOC, CMBSZ, CMBMSC, CMBSTS = 0x38, 0x3C, 0x50, 0x58


class NvmeDriverError(PcidevError):
    """The driver could not do what was asked (timeout, controller fatal status, full queue...)."""

    #: the completions reaped before a wait for completions failed (set by that wait)
    partial: list[Completion]


@attrs.define(slots=True)
class Completion:
    """One completion queue entry as the host saw it.

    :ivar status: the 15-bit status field (DNR << 14 | More << 13 | SCT << 8 | SC).
    :ivar tag: what the submitter attached to the command.
    """

    sqid: int
    cid: int
    sqhd: int
    status: int
    dw0: int
    dw1: int
    phase: int
    tag: Any = None
    opcode: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def code(self) -> int:
        """``SCT << 8 | SC``, comparable with :class:`~pcidev_nvme.status.Status`."""
        return self.status & 0x7FF

    @property
    def dnr(self) -> bool:
        return bool(self.status & (1 << 14))


class NvmeCommandError(NvmeDriverError):
    """A command completed with a non-zero status.

    :ivar completion: the completion entry.
    """

    def __init__(self, completion: Completion, what: str = "") -> None:
        self.completion = completion
        self.status = completion.code
        try:
            name = Status(self.status).name
        except ValueError:
            name = f"{self.status:#05x}"
        super().__init__(f"{what or 'command'} failed: {name} (status field {completion.status:#06x})")


@attrs.define
class NamespaceInfo:
    """What Identify Namespace said about an active namespace."""

    nsid: int
    nsze: int
    lba_size: int
    raw: bytes = attrs.field(repr=False, default=b"")
    #: metadata bytes per block of the current LBA format (LBAF MS)
    ms: int = 0
    #: extended LBAs (FLBAS bit 4): the metadata travels in the data buffer
    extended: bool = False
    #: protection information type (DPS 2:0) and PI first in the metadata (DPS bit 3)
    pi: int = 0
    pil: bool = False


def sgl_data_block(addr: int, length: int) -> bytes:
    """A 16-byte SGL Data Block descriptor."""
    return _SGL.pack(addr, length, 0x00)


def _sgl_desc(addr: int, length: int, dtype: int) -> bytes:
    return _SGL.pack(addr, length, dtype << 4)


class IoQueue:
    """Host state of one SQ/CQ pair (also used for the admin queue)."""

    def __init__(self, drv: NvmeDriver, qid: int, sq_size: int, cq_size: int, vector: int, *,
                 sq_in_cmb: bool = False) -> None:
        m = drv.machine
        self.drv = drv
        self.qid = qid
        self.sq_size = sq_size
        self.cq_size = cq_size
        self.vector = vector
        #: the SQ lives in the controller memory buffer (written through BAR2)
        self.sq_in_cmb = sq_in_cmb
        self.sq_base = drv.cmb_alloc(sq_size * 64) if sq_in_cmb else m.alloc(sq_size * 64, PAGE)
        self.cq_base = m.alloc(cq_size * 16, PAGE)
        self.sq_tail = 0
        self.sq_head = 0
        self.cq_head = 0
        self.phase = 1
        self.rung_tail = 0
        depth = min(sq_size - 1, 65535)
        self.free_cids: collections.deque[int] = collections.deque(range(depth))
        #: cid -> (tag, opcode)
        self.pending: dict[int, tuple[Any, int]] = {}
        #: cid -> first PRP list (or SGL segment) page; cid -> every page of its chain
        self.prp_pages: dict[int, int] = {}
        self.prp_chain: dict[int, list[int]] = {}
        #: cid -> (buffer, length) whose PRP list the pages hold now
        self.prp_cache: dict[int, tuple[int, int]] = {}
        stride = 4
        self.sq_db = 0x1000 + (2 * qid) * stride
        self.cq_db = 0x1000 + (2 * qid + 1) * stride

    @property
    def outstanding(self) -> int:
        return len(self.pending)

    def free(self) -> None:
        m = self.drv.machine
        own = () if self.sq_in_cmb else (self.sq_base,)
        for addr in (*own, self.cq_base, *(p for chain in self.prp_chain.values() for p in chain)):
            m.free(addr)
        self.prp_pages.clear()
        self.prp_chain.clear()
        self.prp_cache.clear()


class NvmeDriver:
    """A host driver for one NVMe controller on a :class:`~pcidev.host.Machine`.

    :param machine: the software host.
    :param pdev: the host handle of the plugged controller.
    :param io_queues: I/O queue pairs to create at probe.
    :param io_depth: entries per I/O queue.
    :param admin_depth: entries of the admin queues.
    :param irq: ``"msix"`` (default), ``"intx"``, or ``None`` to poll.
    :param aers: Asynchronous Event Requests kept outstanding (0: none).
    :param timeout: default seconds to wait for a completion.
    """

    def __init__(self, machine: Machine, pdev: HostPciDevice, *, io_queues: int = 1, io_depth: int = 256,
                 admin_depth: int = 64, irq: str | None = "msix", aers: int = 1, timeout: float = 10.0) -> None:
        self.machine = machine
        self.pdev = pdev
        self.device = pdev.device
        self.mem = machine.memory
        self.io_queue_count = io_queues
        self.io_depth = io_depth
        self.admin_depth = admin_depth
        self.irq_mode = irq
        self.aer_count = aers
        self.timeout = timeout
        self.queues: dict[int, IoQueue] = {}
        self.namespaces: dict[int, NamespaceInfo] = {}
        #: asynchronous events received: (type, info, log page)
        self.events: list[tuple[int, int, int]] = []
        self.id_ctrl = b""
        self.cap = 0
        self.nvec = 0
        self.mdts_bytes: int | None = None
        self._bar_write = pdev.bar_write  # the host's bus cycles (they hold device.lock)
        self._bar_read = pdev.bar_read
        self._recorder = pdev.recorder
        self._dbbuf: tuple[int, int] | None = None
        #: the controller memory buffer once :meth:`cmb_enable` ran: (bus address, size), and
        #: the next free byte of it (a bump allocator for queues and buffers)
        self.cmb: tuple[int, int] | None = None
        self._cmb_next = 0
        self._cmb_bar_offset = 0

    # ---------------------------------------------------------------- construction
    @classmethod
    def attach(cls, machine: Machine, ctrl: HostedDevice, **kwargs: Any) -> NvmeDriver:
        """Plug ``ctrl`` into ``machine``, then :meth:`probe` it.

        :returns: the probed driver.
        """
        pdev = machine.plug(ctrl)
        drv = cls(machine, pdev, **kwargs)
        drv.probe()
        return drv

    # ---------------------------------------------------------------- registers
    def read32(self, off: int) -> int:
        return self._bar_read(0, off, 4)

    def write32(self, off: int, value: int) -> None:
        self._bar_write(0, off, 4, value)

    def read64(self, off: int) -> int:
        return self._bar_read(0, off, 8)

    @property
    def csts(self) -> int:
        return self.read32(CSTS)

    def _wait_csts(self, mask: int, value: int, timeout: float, *, fatal_ok: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while True:
            csts = self.read32(CSTS)
            if csts & mask == value:
                return
            if csts & 0x2 and not (mask & 0x2) and not fatal_ok:
                raise NvmeDriverError(f"controller fatal status (CSTS={csts:#x})")
            if time.monotonic() > deadline:
                raise NvmeDriverError(f"timeout waiting for CSTS & {mask:#x} == {value:#x} (CSTS={csts:#x})")
            time.sleep(0.0005)

    def disable(self) -> None:
        """CC.EN = 0 and wait for CSTS.RDY = 0 (a controller reset; also the way out of a
        fatal status, so CSTS.CFS does not end the wait)."""
        cc = self.read32(CC)
        self.write32(CC, cc & ~1)
        self._wait_csts(0x1, 0, self._to(), fatal_ok=True)
        for q in self.queues.values():
            q.free()
        self.queues.clear()
        self._dbbuf = None

    def _to(self) -> float:
        return max(((self.cap >> 24) & 0xFF) * 0.5, 1.0)

    def enable(self, *, mps: int = 0, css: int | None = None, admin_sq_in_cmb: bool = False) -> None:
        """Program the admin queues and set CC.EN = 1; wait for CSTS.RDY.

        :param admin_sq_in_cmb: the admin SQ in the controller memory buffer
            (:meth:`cmb_enable` first).
        :raises NvmeDriverError: if the controller does not become ready.
        """
        pdev = self.pdev
        admin = IoQueue(self, 0, self.admin_depth, self.admin_depth, 0, sq_in_cmb=admin_sq_in_cmb)
        self.queues[0] = admin
        pdev.iowrite32(0, AQA, ((self.admin_depth - 1) << 16) | (self.admin_depth - 1))
        pdev.lo_hi_writeq(0, ASQ, admin.sq_base)
        pdev.lo_hi_writeq(0, ACQ, admin.cq_base)
        if css is None:
            css = 6 if (self.cap >> 37) & (1 << 6) else 0
        cc = (css << 4) | (mps << 7) | (6 << 16) | (4 << 20) | 1
        pdev.iowrite32(0, CC, cc)
        self._wait_csts(0x1, 0x1, self._to())

    def probe(self) -> None:
        """Bring the controller up the way Linux does (``nvme_reset_work``)."""
        pdev = self.pdev
        pdev.enable_device()
        pdev.set_master()
        if self.irq_mode == "msix":
            self.nvec = pdev.alloc_irq_vectors(1, self.io_queue_count + 1, PCI_IRQ_MSIX)
        elif self.irq_mode == "intx":
            self.nvec = pdev.alloc_irq_vectors(1, 1, PCI_IRQ_INTX)
        elif self.irq_mode is None:
            self.nvec = 0
        else:
            self.nvec = pdev.alloc_irq_vectors(1, self.io_queue_count + 1, PCI_IRQ_ALL_TYPES)
        self.cap = pdev.lo_hi_readq(0, CAP)
        if self.read32(CC) & 1:
            self.disable()
        self._bring_up()

    def restart(self) -> None:
        """Set the controller up again after a reset that left it disabled (an NVM
        Subsystem Reset): what :meth:`probe` does after the PCI part."""
        for q in self.queues.values():
            q.free()
        self.queues.clear()
        self._dbbuf = None
        if self.read32(CC) & 1:
            self.disable()
        self._bring_up()

    def _bring_up(self) -> None:
        self.enable()
        self.id_ctrl = self.identify(0x01)
        mdts = self.id_ctrl[77]
        self.mdts_bytes = (PAGE << mdts) if mdts else None
        if self.io_queue_count:
            n = self.io_queue_count
            dw0 = self.set_features(0x07, ((n - 1) << 16) | (n - 1))
            n = min(n, (dw0 & 0xFFFF) + 1, (dw0 >> 16) + 1)
            self.io_queue_count = n
            for qid in range(1, n + 1):
                self.create_io_queue_pair(qid, self.io_depth)
        if self.aer_count:
            self.set_features(0x0B, 0x31F)
            for _ in range(self.aer_count):
                self.arm_aer()
        self.scan_namespaces()

    # ---------------------------------------------------------------- queues
    def _vector_for(self, qid: int) -> int:
        if self.irq_mode == "msix" and self.nvec > 1:
            return qid % self.nvec
        return 0

    def create_io_queue_pair(self, qid: int, size: int, *, vector: int | None = None, ien: bool = True,
                             cq_size: int | None = None, sq_in_cmb: bool = False) -> IoQueue:
        """Create I/O CQ ``qid`` then SQ ``qid`` bound to it (with ``sq_in_cmb``, the SQ in
        the controller memory buffer, as Linux's ``nvme.use_cmb_sqes``: :meth:`cmb_enable` first)."""
        vector = self._vector_for(qid) if vector is None else vector
        q = IoQueue(self, qid, size, cq_size or size, vector, sq_in_cmb=sq_in_cmb)
        try:
            self.admin(0x05, prp1=q.cq_base, cdw10=((q.cq_size - 1) << 16) | qid,
                       cdw11=(vector << 16) | (2 if ien else 0) | 1, what=f"create CQ {qid}")
            try:
                self.admin(0x01, prp1=q.sq_base, cdw10=((size - 1) << 16) | qid, cdw11=(qid << 16) | 1,
                           what=f"create SQ {qid}")
            except NvmeDriverError:
                self.admin(0x04, cdw10=qid, check=False)
                raise
        except BaseException:
            q.free()
            raise
        self.queues[qid] = q
        if self._dbbuf is not None:
            self._init_shadow(q)
        return q

    def delete_io_queue_pair(self, qid: int) -> None:
        """Delete SQ ``qid`` then CQ ``qid`` (outstanding commands are reaped first)."""
        q = self.queues[qid]
        self.admin(0x00, cdw10=qid, what=f"delete SQ {qid}")
        if q.pending:
            self.reap(qid, min_completions=0, timeout=0)
        self.admin(0x04, cdw10=qid, what=f"delete CQ {qid}")
        del self.queues[qid]
        q.free()

    # ---------------------------------------------------------------- controller memory buffer
    def cmb_enable(self, *, cba: int | None = None) -> tuple[int, int]:
        """Map the controller memory buffer as Linux's ``nvme_map_cmb`` does: CMBMSC.CRE,
        read CMBLOC and CMBSZ, then CMBMSC.CMSE with CBA = the BAR's bus address (or
        ``cba``). Returns ``(bus address, size)``. With CAP.CMBS clear, a CMBSZ that reads
        non-zero is a legacy (pre-1.4) CMB: it is at the BAR's address, no CMBMSC is written
        (``cba`` must be None), as Linux does.

        :raises NvmeDriverError: no CMB (CAP.CMBS clear and CMBSZ 0, or CMBSZ 0 with
            CMBMSC.CRE set), or CMBSTS.CBAI set.
        """
        legacy = not (self.cap >> 57) & 1
        if legacy:
            if not self.read32(CMBSZ) or cba is not None:
                raise NvmeDriverError("the controller has no CMB (CAP.CMBS and CMBSZ are 0)")
        else:
            self.write32(CMBMSC, 1)  # CRE
        cmbloc, cmbsz = self.read32(CMBLOC), self.read32(CMBSZ)
        if not cmbsz:
            raise NvmeDriverError("CMBSZ reads 0 with CMBMSC.CRE set")
        unit = 4096 << 4 * ((cmbsz >> 8) & 0xF)  # CMBSZ.SZU
        size = ((cmbsz >> 12) & 0xFFFFF) * unit
        self._cmb_bar_offset = (cmbloc >> 12) * unit  # CMBLOC.OFST, in SZU units (as nvme_map_cmb)
        base = self.pdev.bar_address(cmbloc & 7) + self._cmb_bar_offset if cba is None else cba
        if not legacy:
            value = base | 0x3  # CRE | CMSE
            self.write32(CMBMSC + 4, value >> 32)  # hi_lo_writeq, as Linux
            self.write32(CMBMSC, value & 0xFFFFFFFF)
        if self.read32(CMBSTS) & 1:
            raise NvmeDriverError(f"CMBSTS.CBAI: the controller refused CBA {base:#x}")
        self.cmb = (base, size)
        self._cmb_next = 0
        return self.cmb

    def cmb_alloc(self, size: int, align: int = PAGE) -> int:
        """``size`` bytes of the controller memory buffer (bus address); never freed."""
        if self.cmb is None:
            raise NvmeDriverError("cmb_enable() first")
        base, total = self.cmb
        start = (self._cmb_next + align - 1) & ~(align - 1)
        if start + size > total:
            raise NvmeDriverError(f"the CMB has no {size} bytes left")
        self._cmb_next = start + size
        return base + start

    def _cmb_offset(self, addr: int, length: int) -> int:
        if self.cmb is None or not self.cmb[0] <= addr <= addr + length <= self.cmb[0] + self.cmb[1]:
            raise NvmeDriverError(f"[{addr:#x}, +{length:#x}) is not in the CMB")
        return addr - self.cmb[0] + self._cmb_bar_offset

    def cmb_write(self, addr: int, data: bytes) -> None:
        """Write ``data`` at bus address ``addr`` of the CMB through BAR2 (MMIO writes)."""
        off = self._cmb_offset(addr, len(data))
        bar = self.read32(CMBLOC) & 7
        pos = 0
        while pos < len(data):
            n = 8 if not (off + pos) & 7 and len(data) - pos >= 8 else 1
            self._bar_write(bar, off + pos, n, int.from_bytes(data[pos:pos + n], "little"))
            pos += n

    def cmb_read(self, addr: int, length: int) -> bytes:
        """Read ``length`` bytes at bus address ``addr`` of the CMB through BAR2."""
        off = self._cmb_offset(addr, length)
        bar = self.read32(CMBLOC) & 7
        out = bytearray()
        while len(out) < length:
            pos = len(out)
            n = 8 if not (off + pos) & 7 and length - pos >= 8 else 1
            out += self._bar_read(bar, off + pos, n).to_bytes(n, "little")
        return bytes(out)

    # ---------------------------------------------------------------- submission
    def _prp(self, q: IoQueue, cid: int, buf: int, length: int) -> tuple[int, int]:
        """PRP1 and PRP2 for a contiguous buffer, writing (chained) PRP lists into pages
        owned by the command identifier; an unchanged list is not rewritten."""
        if length <= 0:
            return buf, 0
        first = PAGE - (buf & (PAGE - 1))
        if length <= first:
            return buf, 0
        rest = length - first
        nxt = buf + first
        if rest <= PAGE:
            return buf, nxt
        pages = q.prp_pages.get(cid)
        if pages is not None and q.prp_cache.get(cid) == (buf, length):  # (cached lists have pages)
            return buf, pages
        nents = (rest + PAGE - 1) // PAGE
        per = PAGE // 8
        npages, left = 1, nents
        while left > per:  # every full page but the last ends with a pointer to the next
            left -= per - 1
            npages += 1
        chain = q.prp_chain.get(cid, [])
        while len(chain) < npages:
            chain.append(self.machine.alloc(PAGE, PAGE))
        q.prp_chain[cid] = chain
        q.prp_pages[cid] = chain[0]
        entries = [nxt + PAGE * i for i in range(nents)]
        pos = 0
        for i, page in enumerate(chain[:npages]):
            left = nents - pos
            if left <= per:
                self.mem.write(page, struct.pack(f"<{left}Q", *entries[pos:]))
                break
            take = per - 1
            self.mem.write(page, struct.pack(f"<{take}Q", *entries[pos:pos + take]) + struct.pack("<Q", chain[i + 1]))
            pos += take
        q.prp_cache[cid] = (buf, length)
        return buf, chain[0]

    def _sgl(self, q: IoQueue, cid: int, segments: list[tuple[int | None, int]]) -> tuple[int, int]:
        """SGL1 for ``segments`` as the (DW6-7, DW8-9) pair of the SQE."""
        def desc(addr: int | None, n: int) -> tuple[int, int]:
            return (0, n | (0x10 << 56)) if addr is None else (addr, n)

        if len(segments) == 1:
            return desc(*segments[0])
        if len(segments) > PAGE // 16:
            raise NvmeDriverError("too many SGL segments for one list page")
        q.prp_cache.pop(cid, None)
        chain = q.prp_chain.setdefault(cid, [])
        if not chain:
            chain.append(self.machine.alloc(PAGE, PAGE))
        page = q.prp_pages[cid] = chain[0]
        blob = b"".join(_sgl_desc(0, n, 0x1) if a is None else _sgl_desc(a, n, 0x0) for a, n in segments)
        self.mem.write(page, blob)
        return page, len(blob) | (0x30 << 56)  # Last Segment descriptor

    def submit(self, qid: int, opcode: int, *, nsid: int = 0, cdw10: int = 0, cdw11: int = 0, cdw12: int = 0,
               cdw13: int = 0, cdw14: int = 0, cdw15: int = 0, cdw2: int = 0, cdw3: int = 0, mptr: int = 0,
               prp1: int | None = None, prp2: int = 0, buf: int | None = None, length: int = 0,
               sgl: bool = False, segments: list[tuple[int | None, int]] | None = None, flags: int = 0,
               cid: int | None = None, tag: Any = None, ring: bool = True) -> int:
        """Place one command in SQ ``qid``; returns its command identifier.

        The data pointer is ``prp1``/``prp2`` as given, or built from ``buf`` and
        ``length`` (PRP entries and a PRP list, or with ``sgl`` an SGL Data Block),
        or from ``segments`` (an SGL; ``None`` addresses are bit buckets).

        :param ring: write the SQ tail doorbell now (else call :meth:`ring`).
        :raises NvmeDriverError: if the submission queue is full.
        """
        q = self.queues[qid]
        tail = q.sq_tail
        nxt = tail + 1
        if nxt == q.sq_size:
            nxt = 0
        if nxt == q.sq_head:
            raise NvmeDriverError(f"SQ {qid} is full")
        if cid is None:
            if not q.free_cids:
                raise NvmeDriverError(f"no free command identifier on queue {qid}")
            cid = q.free_cids.popleft()
        elif cid in q.pending:
            pass  # deliberately reused by a test
        if segments is not None:
            flags |= 0x40
            prp1_v, prp2_v = self._sgl(q, cid, segments)
        elif buf is not None:
            if sgl:
                flags |= 0x40
                prp1_v, prp2_v = buf, length  # Data Block: address, length, id 0
            else:
                prp1_v, prp2_v = self._prp(q, cid, buf, length)
        else:
            prp1_v, prp2_v = prp1 or 0, prp2
        if q.sq_in_cmb:
            self.cmb_write(q.sq_base + tail * 64, _SQE.pack(opcode, flags, cid, nsid, cdw2, cdw3, mptr, prp1_v,
                                                              prp2_v, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15))
        else:
            self.mem.write_struct(_SQE, q.sq_base + tail * 64, opcode, flags, cid, nsid, cdw2, cdw3, mptr,
                                  prp1_v, prp2_v, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15)
        q.pending[cid] = (tag, opcode)
        q.sq_tail = nxt
        if ring:
            self.ring(qid)
        return cid

    def submit_raw(self, qid: int, sqe: bytes, *, tag: Any = None, ring: bool = True) -> int:
        """Place 64 raw bytes in SQ ``qid`` (garbage tests); returns the CID found in them."""
        if len(sqe) != 64:
            raise ValueError("an SQE is 64 bytes")
        q = self.queues[qid]
        tail = q.sq_tail
        nxt = (tail + 1) % q.sq_size
        if nxt == q.sq_head:
            raise NvmeDriverError(f"SQ {qid} is full")
        cid = int.from_bytes(sqe[2:4], "little")
        if q.sq_in_cmb:
            self.cmb_write(q.sq_base + tail * 64, sqe)
        else:
            self.mem.write(q.sq_base + tail * 64, sqe)
        q.pending[cid] = (tag, sqe[0])
        if cid in q.free_cids:
            q.free_cids.remove(cid)
        q.sq_tail = nxt
        if ring:
            self.ring(qid)
        return cid

    def ring(self, qid: int) -> None:
        """Write SQ ``qid``'s tail doorbell (through the shadow buffer when configured, for
        an I/O queue: the admin queue is never shadowed, as by Linux)."""
        q = self.queues[qid]
        tail = q.sq_tail
        if self._dbbuf is not None and qid:
            dbs, eis = self._dbbuf
            old = q.rung_tail
            self.mem.store32(dbs + 8 * qid, tail)  # (one ordered store: the device polls it)
            # Linux's mb(): the store before the EventIdx load (the device stores its
            # EventIdx, fences, reads the shadow: one of the two sees the other)
            native.fence()
            ei = self.mem.load32(eis + 8 * qid)
            q.rung_tail = tail
            if ((tail - ei - 1) & 0xFFFF) >= ((tail - old) & 0xFFFF):
                return
        q.rung_tail = tail
        self._bar_write(0, q.sq_db, 4, tail)

    # ---------------------------------------------------------------- completion
    def poll(self, qid: int, max_completions: int | None = None) -> list[Completion]:
        """Take the completions already posted on CQ ``qid`` (no waiting); rings the CQ head doorbell."""
        q = self.queues[qid]
        out: list[Completion] = []
        head, phase, size, base = q.cq_head, q.phase, q.cq_size, q.cq_base
        limit = max_completions if max_completions is not None else size
        pending = q.pending
        free = q.free_cids
        unpack = _CQE.unpack_from
        sq_head = q.sq_head
        while len(out) < limit:
            # read the entries up to the end of the ring (at most 64) in one go
            n = min(size - head, 64, limit - len(out))
            raw = self.mem.read(base + head * 16, n * 16)
            stop = False
            for off in range(0, n * 16, 16):
                dw0, dw1, sqhd, sqid, cid, sf = unpack(raw, off)
                if sf & 1 != phase:
                    stop = True
                    break
                info = pending.pop(cid, None)
                if info is not None:
                    free.append(cid)
                    out.append(Completion(sqid, cid, sqhd, sf >> 1, dw0, dw1, sf & 1, info[0], info[1]))
                else:
                    out.append(Completion(sqid, cid, sqhd, sf >> 1, dw0, dw1, sf & 1, None, -1))
                if sqid == qid:
                    sq_head = sqhd
                head += 1
            if head == size:
                head = 0
                phase ^= 1
            if stop:
                break
        if out:
            q.cq_head, q.phase, q.sq_head = head, phase, sq_head
            self._ring_cq(q)
            if qid == 0:
                out = self._take_events(out)
        return out

    def cq_posted(self, qid: int) -> int:
        """How many entries the controller has posted on CQ ``qid`` that the host has not
        taken yet (looked at, not consumed: no doorbell). ``cq_size - 1`` means the CQ is
        full: the controller parks further completions until the host frees slots."""
        q = self.queues[qid]
        raw = self.mem.read(q.cq_base, q.cq_size * 16)
        head, phase, n = q.cq_head, q.phase, 0
        while n < q.cq_size - 1 and raw[16 * head + 14] & 1 == phase:
            n += 1
            head += 1
            if head == q.cq_size:
                head, phase = 0, phase ^ 1
        return n

    def _ring_cq(self, q: IoQueue) -> None:
        head = q.cq_head
        if self._dbbuf is not None and q.qid:  # (the admin queue: MMIO only, as by Linux)
            dbs, eis = self._dbbuf
            slot = 8 * q.qid + 4
            old = self.mem.read_u32(dbs + slot)
            self.mem.store32(dbs + slot, head)
            native.fence()  # (as in ring)
            ei = self.mem.load32(eis + slot)
            if ((head - ei - 1) & 0xFFFF) >= ((head - old) & 0xFFFF):
                return
        self._bar_write(0, q.cq_db, 4, head)

    def _take_events(self, comps: list[Completion]) -> list[Completion]:
        rest = []
        for c in comps:
            if c.tag == "aer":
                if c.ok:
                    self.events.append((c.dw0 & 7, (c.dw0 >> 8) & 0xFF, (c.dw0 >> 16) & 0xFF))
                    if self.aer_auto_rearm:
                        self.arm_aer()
                else:
                    rest.append(c)
            else:
                rest.append(c)
        return rest

    aer_auto_rearm = True

    def wait_interrupt(self, qid: int, timeout: float) -> bool:
        """Wait for the queue's interrupt (or just sleep briefly when polling)."""
        q = self.queues[qid]
        if self.irq_mode == "msix":
            return self._recorder.wait(q.vector, above=self._recorder.count(q.vector), timeout=timeout)
        if self.irq_mode == "intx":
            return self._recorder.wait_intx(True, timeout)
        time.sleep(min(timeout, 0.0002))
        return True

    def reap(self, qid: int, *, min_completions: int = 1, max_completions: int | None = None,
             timeout: float | None = None) -> list[Completion]:
        """Collect completions from CQ ``qid`` until at least ``min_completions`` arrived.

        :raises NvmeDriverError: on timeout (with what arrived so far in ``.partial``).
        """
        timeout = self.timeout if timeout is None else timeout
        out = self.poll(qid, max_completions)
        if len(out) >= min_completions:
            return out
        q = self.queues[qid]
        deadline = time.monotonic() + timeout
        rec = self._recorder
        while True:
            msix = self.irq_mode == "msix"
            seen = rec.count(q.vector) if msix else 0  # counted before the poll: no lost wake-up
            more = self.poll(qid, None if max_completions is None else max_completions - len(out))
            out += more
            if len(out) >= min_completions:
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                break
            signalled = False
            if msix:
                # an interrupt came: no need to look at CSTS (over vfio-user a register
                # read is a round trip to the server)
                signalled = bool(rec.wait(q.vector, above=seen, timeout=min(left, 0.05)))
            elif self.irq_mode == "intx":
                rec.wait_intx(True, min(left, 0.01))
                if rec.intx_level:
                    time.sleep(0.0001)
            else:
                time.sleep(0.0001)
            if not signalled and self.read32(CSTS) & 0x2:
                err = NvmeDriverError(f"controller fatal status while waiting on queue {qid}")
                err.partial = out
                raise err
        err = NvmeDriverError(f"timeout: {len(out)} of {min_completions} completions on queue {qid}")
        err.partial = out
        raise err

    def wait_for(self, qid: int, cid: int, timeout: float | None = None) -> Completion:
        """Reap until the command ``cid`` completes; other completions are kept in :attr:`stash`."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        stash = self.stash.setdefault(qid, [])
        for i, c in enumerate(stash):
            if c.cid == cid:
                return stash.pop(i)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NvmeDriverError(f"timeout waiting for command {cid} on queue {qid}")
            try:
                got = self.reap(qid, min_completions=1, timeout=left)
            except NvmeDriverError as exc:
                stash.extend(getattr(exc, "partial", []))
                for i, c in enumerate(stash):
                    if c.cid == cid:
                        return stash.pop(i)
                raise
            found = None
            for c in got:
                if c.cid == cid and found is None:
                    found = c
                else:
                    stash.append(c)
            if found is not None:
                return found

    @property
    def stash(self) -> dict[int, list[Completion]]:
        st = self.__dict__.get("_stash")
        if st is None:
            st = self.__dict__["_stash"] = {}
        return st

    # ---------------------------------------------------------------- admin
    def admin(self, opcode: int, *, data: bytes | None = None, length: int = 0, check: bool = True,
              what: str = "", timeout: float | None = None, **fields: Any) -> Completion:
        """Run one admin command synchronously.

        :param data: bytes to send to the controller (host → controller buffer).
        :param length: bytes to receive (controller → host buffer); returned in ``.data``.
        :param fields: ``nsid``, ``cdw10``…``cdw15``, ``prp1``, ``prp2``, ``flags``, ``cid``.
        :returns: the completion; with ``length`` its ``tag`` holds the received bytes.
        :raises NvmeCommandError: non-zero status (with ``check``).
        """
        size = max(len(data) if data is not None else 0, length)
        buf = None
        if size and "prp1" not in fields:
            buf = self.machine.alloc(max(size, PAGE), PAGE)
            if data is not None:
                self.mem.write(buf, bytes(data))
            fields.setdefault("buf", buf)
            fields.setdefault("length", size)
        try:
            cid = self.submit(0, opcode, **fields)
            comp = self.wait_for(0, cid, timeout)
            if buf is not None and length:
                comp.tag = self.mem.read(buf, length)
        finally:
            if buf is not None:
                self.machine.free(buf)
        if check and not comp.ok:
            raise NvmeCommandError(comp, what or f"admin opcode {opcode:#04x}")
        return comp

    def identify(self, cns: int, *, nsid: int = 0, cntid: int = 0, csi: int = 0) -> bytes:
        """Identify; returns the 4096-byte structure."""
        data: bytes = self.admin(0x06, nsid=nsid, cdw10=(cntid << 16) | cns, cdw11=csi << 24, length=4096,
                                 what=f"identify CNS {cns:#x}").tag  # a data-in command's tag: its data
        return data

    def get_log(self, lid: int, length: int, *, nsid: int = 0xFFFFFFFF, offset: int = 0, rae: bool = False,
                lsp: int = 0, csi: int = 0) -> bytes:
        """Get Log Page; returns ``length`` bytes."""
        numd = length // 4 - 1
        data: bytes = self.admin(
            0x02, nsid=nsid, cdw10=((numd & 0xFFFF) << 16) | (int(rae) << 15) | (lsp << 8) | lid,
            cdw11=numd >> 16, cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32, cdw14=csi << 24,
            length=length, what=f"get log page {lid:#x}").tag  # a data-in command's tag: its data
        return data

    def get_features(self, fid: int, *, cdw11: int = 0, sel: int = 0, nsid: int = 0, length: int = 0) -> Completion:
        """Get Features; returns the completion (DW0, and ``.tag`` bytes when ``length``)."""
        return self.admin(0x0A, nsid=nsid, cdw10=(sel << 8) | fid, cdw11=cdw11, length=length,
                          what=f"get features {fid:#x}")

    def set_features(self, fid: int, cdw11: int = 0, *, data: bytes | None = None, nsid: int = 0,
                     save: bool = False) -> int:
        """Set Features; returns DW0."""
        return self.admin(0x09, nsid=nsid, cdw10=(int(save) << 31) | fid, cdw11=cdw11, data=data,
                          what=f"set features {fid:#x}").dw0

    def arm_aer(self) -> int:
        """Submit one Asynchronous Event Request (completes when an event occurs)."""
        return self.submit(0, 0x0C, tag="aer")

    def poll_events(self, timeout: float = 0.0) -> list[tuple[int, int, int]]:
        """Process admin completions for up to ``timeout`` seconds; return new events."""
        before = len(self.events)
        deadline = time.monotonic() + timeout
        while True:
            rest = self.poll(0)
            if rest:
                self.stash.setdefault(0, []).extend(rest)
            if len(self.events) > before or time.monotonic() >= deadline:
                return self.events[before:]
            self.wait_interrupt(0, min(0.01, max(deadline - time.monotonic(), 0)))

    def scan_namespaces(self) -> dict[int, NamespaceInfo]:
        """Identify CNS 02h, then CNS 00h for each active namespace."""
        raw = self.identify(0x02)
        nsids = [n for n in struct.unpack("<1024I", raw) if n]
        self.namespaces = {}
        for nsid in nsids:
            idns = self.identify(0x00, nsid=nsid)
            nsze = struct.unpack_from("<Q", idns, 0)[0]
            flbas = idns[26]
            lbaf = (flbas & 0xF) | ((flbas >> 5) & 3) << 4
            entry = struct.unpack_from("<I", idns, 128 + 4 * lbaf)[0]
            lbads = (entry >> 16) & 0xFF
            self.namespaces[nsid] = NamespaceInfo(nsid, nsze, 1 << lbads, idns, ms=entry & 0xFFFF,
                                                  extended=bool(flbas & 0x10), pi=idns[29] & 7,
                                                  pil=bool(idns[29] & 8))
        return self.namespaces

    def doorbell_buffer_config(self) -> tuple[int, int]:
        """Enable shadow doorbells (Doorbell Buffer Config); returns (dbs, eis) addresses."""
        dbs = self.machine.alloc(PAGE, PAGE)
        eis = self.machine.alloc(PAGE, PAGE)
        self.admin(0x7C, prp1=dbs, prp2=eis, what="doorbell buffer config")
        self._dbbuf = (dbs, eis)
        for q in self.queues.values():
            q.rung_tail = q.sq_tail
        return dbs, eis

    def _init_shadow(self, q: IoQueue) -> None:
        pass  # the controller initialises the shadow slots of a new queue

    # ---------------------------------------------------------------- I/O
    def lba_size(self, nsid: int) -> int:
        return self.namespaces[nsid].lba_size

    def submit_rw(self, qid: int, opcode: int, *, nsid: int, slba: int, nlb: int, buf: int, fua: bool = False,
                  sgl: bool = False, tag: Any = None, ring: bool = True) -> int:
        """Submit a Read or Write of ``nlb`` blocks at ``slba`` with the data at guest address ``buf``
        (the fast path the benchmarks use; see :meth:`submit` for everything else).

        :raises NvmeDriverError: the submission queue or its command identifiers are exhausted.
        """
        q = self.queues[qid]
        tail = q.sq_tail
        nxt = tail + 1
        if nxt == q.sq_size:
            nxt = 0
        if nxt == q.sq_head or not q.free_cids:
            raise NvmeDriverError(f"SQ {qid} is full")
        cid = q.free_cids.popleft()
        length = nlb * self.namespaces[nsid].lba_size
        if sgl:
            flags, p1, p2 = 0x40, buf, length
        elif (buf & (PAGE - 1)) + length <= PAGE:
            flags, p1, p2 = 0, buf, 0
        else:
            flags = 0
            p1, p2 = self._prp(q, cid, buf, length)
        fields = (opcode, flags, cid, nsid, 0, 0, 0, p1, p2, slba & 0xFFFFFFFF, slba >> 32,
                  ((nlb - 1) & 0xFFFF) | (int(fua) << 30), 0, 0, 0)
        if q.sq_in_cmb:
            self.cmb_write(q.sq_base + tail * 64, _SQE.pack(*fields))
        else:
            self.mem.write_struct(_SQE, q.sq_base + tail * 64, *fields)
        q.pending[cid] = (tag, opcode)
        q.sq_tail = nxt
        if ring:
            self.ring(qid)
        return cid

    def io(self, qid: int, opcode: int, *, check: bool = True, what: str = "", timeout: float | None = None,
           **fields: Any) -> Completion:
        """Run one I/O command synchronously on queue ``qid``."""
        cid = self.submit(qid, opcode, **fields)
        comp = self.wait_for(qid, cid, timeout)
        if check and not comp.ok:
            raise NvmeCommandError(comp, what or f"I/O opcode {opcode:#04x}")
        return comp

    def read(self, nsid: int, slba: int, nlb: int, *, qid: int = 1, sgl: bool = False) -> bytes:
        """Read ``nlb`` blocks; returns the data."""
        length = nlb * self.lba_size(nsid)
        buf = self.machine.alloc(max(length, PAGE), PAGE)
        try:
            self.io(qid, READ, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=nlb - 1, buf=buf,
                    length=length, sgl=sgl, what="read")
            return self.mem.read(buf, length)
        finally:
            self.machine.free(buf)

    def write(self, nsid: int, slba: int, data: bytes, *, qid: int = 1, fua: bool = False, sgl: bool = False) -> None:
        """Write ``data`` (a whole number of blocks) at ``slba``."""
        lbs = self.lba_size(nsid)
        if not data or len(data) % lbs:
            raise ValueError(f"data must be a non-empty multiple of {lbs} bytes")
        nlb = len(data) // lbs
        buf = self.machine.alloc(max(len(data), PAGE), PAGE)
        try:
            self.mem.write(buf, bytes(data))
            self.io(qid, WRITE, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                    cdw12=(nlb - 1) | (int(fua) << 30), buf=buf, length=len(data), sgl=sgl, what="write")
        finally:
            self.machine.free(buf)

    def flush(self, nsid: int, *, qid: int = 1) -> None:
        self.io(qid, FLUSH, nsid=nsid, what="flush")

    def write_uncorrectable(self, nsid: int, slba: int, nlb: int, *, qid: int = 1, check: bool = True) -> Completion:
        """Write Uncorrectable (I/O 04h): mark ``nlb`` blocks from ``slba``."""
        return self.io(qid, WRITE_UNCORRECTABLE, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                       cdw12=(nlb - 1) & 0xFFFF, check=check, what="write uncorrectable")

    # ---------------------------------------------------------------- admin features
    def abort(self, sqid: int, cid: int) -> Completion:
        """Abort (admin 08h) command ``cid`` of SQ ``sqid``; DW0 bit 0 = 0 means aborted."""
        return self.admin(0x08, cdw10=(cid << 16) | sqid, what="abort")

    def sanitize(self, sanact: int, *, ause: bool = False, owpass: int = 0, oipbp: bool = False,
                 ndas: bool = False, ovrpat: int = 0, check: bool = True) -> Completion:
        """Sanitize (admin 84h): start a sanitize operation (it completes at once)."""
        cdw10 = (sanact & 7) | (int(ause) << 3) | ((owpass & 0xF) << 4) | (int(oipbp) << 8) | (int(ndas) << 9)
        return self.admin(0x84, cdw10=cdw10, cdw11=ovrpat, check=check, what="sanitize")

    def sanitize_log(self) -> dict[str, int]:
        """The Sanitize Status log page (81h), decoded (``struct nvme_sanitize_log_page``)."""
        raw = self.get_log(0x81, 512)
        names = ("sprog", "sstat", "scdw10", "eto", "etbe", "etce", "etond", "etbend", "etcend")
        return dict(zip(names, struct.unpack_from("<HHIIIIIII", raw), strict=True))

    def device_self_test(self, stc: int, *, nsid: int = 0, check: bool = True) -> Completion:
        """Device Self-test (admin 14h) with self-test code ``stc``."""
        return self.admin(0x14, nsid=nsid, cdw10=stc, check=check, what="device self-test")

    def self_test_log(self) -> bytes:
        """The Device Self-test log page (06h), 564 bytes."""
        return self.get_log(0x06, 564, nsid=0)

    def get_lba_status(self, nsid: int, slba: int, *, mndw: int = 1023, rl: int = 0, atype: int = 0x11,
                       check: bool = True) -> Completion:
        """Get LBA Status (admin 86h); the data ((MNDW + 1) * 4 bytes) is in ``.tag``."""
        return self.admin(0x86, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=mndw,
                          cdw13=(atype << 24) | (rl & 0xFFFF), length=(mndw + 1) * 4, check=check,
                          what="get lba status")

    def subsystem_reset(self) -> None:
        """Write "NVMe" to NSSR (an NVM Subsystem Reset); the controller must be enabled again."""
        self.write32(NSSR, NSSR_RESET)

    def io_md(self, opcode: int, nsid: int, slba: int, nlb: int, *, data: bytes | None = None,
              meta: bytes | None = None, data_len: int = 0, meta_len: int = 0, prinfo: int = 0, ref: int = 0,
              app: int = 0, app_mask: int = 0xFFFF, fua: bool = False, sgl: bool = False, meta_sgl: bool = False,
              cdw12_extra: int = 0, qid: int = 1, timeout: float | None = None) -> tuple[Completion, bytes, bytes]:
        """A Read, Write, Compare or Verify with a metadata buffer and protection settings.

        The data buffer holds ``data`` (or ``data_len`` bytes: with extended LBAs the
        metadata is in it); the metadata buffer (MPTR) holds ``meta`` (or ``meta_len``
        bytes; none when both are empty). ``meta_sgl`` names the metadata buffer with an
        SGL Data Block descriptor (PSDT 10b, the data with one too); ``sgl`` the data
        alone (PSDT 01b, MPTR a plain address).

        :param prinfo: the PRINFO field (bit 3 PRACT, 2 Guard, 1 Application Tag, 0
            Reference Tag check).
        :param ref: the initial reference tag (CDW14, and CDW3 above 32 bits).
        :param app: the application tag (CDW15 15:0).
        :param app_mask: the application tag mask (CDW15 31:16).
        :returns: the completion and the data and metadata buffers' contents afterwards.
        """
        dlen = len(data) if data is not None else data_len
        mlen = len(meta) if meta is not None else meta_len
        dbuf = self.machine.alloc(max(dlen, PAGE), PAGE)
        mbuf = self.machine.alloc(max(mlen, PAGE), PAGE) if mlen else 0
        dbuf_desc = self.machine.alloc(PAGE, PAGE) if meta_sgl else 0
        try:
            if data is not None:
                self.mem.write(dbuf, bytes(data))
            if meta is not None and mlen:
                self.mem.write(mbuf, bytes(meta))
            fields: dict[str, Any] = {}
            mptr = mbuf
            if meta_sgl:
                self.mem.write(dbuf_desc, sgl_data_block(mbuf, mlen))
                mptr = dbuf_desc
                fields.update(flags=0x80, prp1=dbuf, prp2=dlen)
            else:
                fields.update(buf=dbuf, length=dlen, sgl=sgl)
            cdw12 = ((nlb - 1) & 0xFFFF) | (prinfo & 0xF) << 26 | int(fua) << 30 | cdw12_extra
            comp = self.io(qid, opcode, check=False, timeout=timeout, nsid=nsid, cdw10=slba & 0xFFFFFFFF,
                           cdw11=slba >> 32, cdw12=cdw12, cdw3=(ref >> 32) & 0xFFFF, cdw14=ref & 0xFFFFFFFF,
                           cdw15=(app & 0xFFFF) | (app_mask & 0xFFFF) << 16, mptr=mptr, **fields)
            return comp, self.mem.read(dbuf, dlen), self.mem.read(mbuf, mlen) if mlen else b""
        finally:
            self.machine.free(dbuf)
            if mbuf:
                self.machine.free(mbuf)
            if dbuf_desc:
                self.machine.free(dbuf_desc)

    # ---------------------------------------------------------------- teardown
    def shutdown(self, *, abrupt: bool = False) -> None:
        """Delete the I/O queues, then CC.SHN and wait for CSTS.SHST = complete."""
        for qid in sorted((q for q in self.queues if q), reverse=True):
            try:
                self.delete_io_queue_pair(qid)
            except NvmeDriverError:
                pass
        cc = self.read32(CC)
        self.write32(CC, (cc & ~(3 << 14)) | ((2 if abrupt else 1) << 14))
        self._wait_csts(0xC, 0x8, 10.0)

    def close(self) -> None:
        """Release the driver's guest memory (the controller is left as it is)."""
        for q in self.queues.values():
            q.free()
        self.queues.clear()

