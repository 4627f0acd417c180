"""I/O commands on namespaces formatted with metadata: the metadata transfer and
protection information of Read, Write, Compare, Verify, Write Zeroes, Dataset
Management and Copy.

:class:`~pcidev_nvme.io.IoCommandSet` hands a command here when its namespace has
metadata (``Namespace.ms`` non-zero: one test per command; namespaces without metadata
never come here, and the fast path does not take them).

Where the metadata travels (NVMe Base 2.0, "Metadata Region"):

* **extended LBAs** (FLBAS bit 4, ``mset=1``): each block's metadata follows its data
  in the data buffer, which holds ``NLB * (LBA size + MS)`` bytes;
* **separate buffer**: the data buffer holds the data, MPTR the metadata: with PSDT 00b
  or 01b MPTR is the address of one contiguous buffer, with PSDT 10b the address of an
  SGL descriptor (a Data Block, or a Segment / Last Segment leading to more:
  :func:`~pcidev_nvme.prp.sgl_segments`; Bit Buckets allowed on reads).

With PRACT set and metadata exactly as large as the PI, no metadata moves at all: the
controller inserts the PI on a write and strips it on a read
(:mod:`pcidev_nvme.protection`). The data is staged in a bounce buffer, so what is
checked is what is stored (the guest cannot change it between the check and the write).
MDTS counts the metadata of extended LBAs.

Errors in the metadata pointer carry the metadata statuses: a metadata SGL that does
not describe the metadata's length is Metadata SGL Length Invalid, and the parameter
error location of a metadata pointer problem is MPTR (SQE byte 16).

Data and metadata are two stores: each command holds the LBA-range locks of its blocks
(:class:`RangeLocks`: shared by reads, exclusive for changes) around the pair, so a read
never sees one write's data with another's PI and overlapping writes never leave a mix (single-block atomicity, as
Identify promises). Deallocations (Dataset Management, Write Zeroes) drop the metadata
first, then the data: in between, and after a crash there, the PI reads as the escape
values (unchecked), never as stale PI over new data. A write stores the data, then the
metadata: after a crash between the two, a block may hold new data under its old PI
(with the write cache enabled and no FUA the host expects nothing of such a write
anyway).

Compare and Verify refuse PRACT on namespaces with protection information (Invalid
Protection Information, as QEMU does): neither transfers PI the controller could insert
or strip.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

from pcidev.dma import GuestMemory
from pcidev.errors import DmaError
from pcidev_nvme.controller_memory import check_data_metadata
from pcidev_nvme.namespace import Namespace
from pcidev_nvme.protection import PIF_16B, PRINFO_PRACT, PiFormat
from pcidev_nvme.prp import PSDT_SGL_MPTR_SGL, data_segments, sgl_segments
from pcidev_nvme.request import ControllerPort, Request, count_read, count_write, lba_extent
from pcidev_nvme.status import NvmeStatusError, Status

__all__ = ["CopySource", "ProtectedIo", "RangeLocks", "copy_format_problem", "copy_incompatible", "interleave",
           "split_extended"]

_OFF_CDW10 = 40
_OFF_CDW12 = 48
_OFF_MPTR = 16
_OFF_DPTR = 24


class CopySource(NamedTuple):
    """One source range of a Copy, as its descriptor entry gives it.

    :ivar ns: the source namespace (the destination's for formats 0h and 1h).
    :ivar slba: first logical block.
    :ivar nlb: number of logical blocks (1-based).
    :ivar ref: the expected initial logical block reference tag (EILBRT, or the low 48 bits
        of ELBT in formats 1h and 3h).
    :ivar app: the expected logical block application tag (ELBAT).
    :ivar mask: the application tag mask (ELBATM).
    """

    ns: Namespace
    slba: int
    nlb: int
    ref: int
    app: int
    mask: int


def interleave(data: bytes | bytearray | memoryview, meta: bytes | bytearray | memoryview, nlb: int, lbs: int,
               ms: int) -> bytearray:
    """Extended LBAs: each block's data followed by its metadata."""
    step = lbs + ms
    out = bytearray(nlb * step)
    for i in range(nlb):
        at = i * step
        out[at:at + lbs] = data[i * lbs:(i + 1) * lbs]
        out[at + lbs:at + step] = meta[i * ms:(i + 1) * ms]
    return out


def split_extended(buf: bytes | bytearray | memoryview, nlb: int, lbs: int, ms: int) -> tuple[bytearray, bytearray]:
    """The data and the metadata of an extended-LBA buffer."""
    step = lbs + ms
    data = bytearray(nlb * lbs)
    meta = bytearray(nlb * ms)
    for i in range(nlb):
        at = i * step
        data[i * lbs:(i + 1) * lbs] = buf[at:at + lbs]
        meta[i * ms:(i + 1) * ms] = buf[at + lbs:at + step]
    return data, meta


def _gather(mem: GuestMemory, segs: Sequence[tuple[int | None, int]], length: int) -> bytearray:
    # (host-to-controller pointers have no bit buckets: prp.sgl_segments refuses them)
    buf = bytearray(length)
    views = mem.sg_views([(gpa, n) for gpa, n in segs if gpa is not None], write=False)
    try:
        pos = 0
        for v in views:
            n = len(v)
            buf[pos:pos + n] = v
            pos += n
    finally:
        for v in views:
            v.release()
    return buf


def _scatter(mem: GuestMemory, segs: Sequence[tuple[int | None, int]], data: bytes | bytearray) -> None:
    real = [(gpa, n) for gpa, n in segs if gpa is not None]
    views = mem.sg_views(real, write=True)  # every piece is checked before anything moves
    try:
        pos = 0
        it = iter(views)
        for gpa, n in segs:
            if gpa is not None:
                next(it)[:] = data[pos:pos + n]
            pos += n
    finally:
        for v in views:
            v.release()


class _Stripe:
    """A readers-writer lock: readers share it, a writer has it alone; a waiting writer
    holds back new readers (no starvation)."""

    __slots__ = ("_cond", "_readers", "_writer", "_waiting")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting = 0

    def acquire(self, write: bool) -> None:
        with self._cond:
            if write:
                self._waiting += 1
                while self._writer or self._readers:
                    self._cond.wait()
                self._waiting -= 1
                self._writer = True
            else:
                while self._writer or self._waiting:
                    self._cond.wait()
                self._readers += 1

    def release(self, write: bool) -> None:
        with self._cond:
            if write:
                self._writer = False
            else:
                self._readers -= 1
            if not self._readers:
                self._cond.notify_all()


class RangeLocks:
    """Striped readers-writer locks over LBA regions: a command holds the stripes of the
    regions its blocks fall in (in index order, so two commands never wait on each other
    in a cycle) while it reads (shared) or changes (exclusive) the data and metadata of
    those blocks.

    :param stripes: number of locks.
    :param region_shift: log2 of the blocks per region.
    """

    def __init__(self, stripes: int = 64, region_shift: int = 8) -> None:
        self._locks = [_Stripe() for _ in range(stripes)]
        self._shift = region_shift

    def _indexes(self, nsid: int, ranges: Iterable[tuple[int, int]]) -> list[int]:
        n = len(self._locks)
        out: set[int] = set()
        for slba, nlb in ranges:
            if nlb <= 0:
                continue
            first, last = slba >> self._shift, (slba + nlb - 1) >> self._shift
            if last - first + 1 >= n:
                return list(range(n))
            out.update((nsid * 0x9E3779B1 + r) % n for r in range(first, last + 1))
        return sorted(out)

    @contextmanager
    def hold(self, nsid: int, ranges: Iterable[tuple[int, int]], *, write: bool) -> Iterator[None]:
        """Hold the locks of ``(slba, nlb)`` ranges of namespace ``nsid``, shared
        (``write=False``) or exclusive."""
        taken: list[_Stripe] = []
        try:
            for i in self._indexes(nsid, ranges):
                self._locks[i].acquire(write)
                taken.append(self._locks[i])
            yield
        finally:
            for lock in reversed(taken):
                lock.release(write)


def _meta_error(exc: NvmeStatusError) -> NvmeStatusError:
    """A data-pointer error of the metadata pointer, as the metadata's status."""
    status = Status.MD_SGL_LEN_INVALID if exc.status == Status.DATA_SGL_LEN_INVALID else exc.status
    where = _OFF_MPTR if exc.param_offset is not None and _OFF_DPTR <= exc.param_offset < _OFF_CDW10 \
        else exc.param_offset
    msg = str(exc).split(": ", 1)[-1]
    return NvmeStatusError(status, f"metadata pointer: {msg}", param_offset=where, lba=exc.lba, dnr=exc.dnr)


class ProtectedIo:
    """The metadata and protection information side of the NVM I/O commands.

    :param ctrl: the controller (``dma``, ``page_size``, ``mdts_bytes``, ``smart``,
        ``volatile_write_cache``).
    """

    def __init__(self, ctrl: ControllerPort) -> None:
        self.ctrl = ctrl
        self.locks = RangeLocks()

    # -- buffers ----------------------------------------------------------------------

    def _extent(self, req: Request, ns: Namespace) -> tuple[int, int]:
        slba, nlb = lba_extent(req)
        if slba + nlb > ns.nlbas:
            raise NvmeStatusError(
                Status.LBA_RANGE, f"LBAs {slba:#x}+{nlb} exceed namespace {ns.nsid} ({ns.nlbas} blocks)",
                param_offset=_OFF_CDW10, lba=slba,
            )
        return slba, nlb

    @staticmethod
    def _moves_metadata(ns: Namespace, cdw12: int) -> bool:
        """Whether metadata travels between host and controller (not with PRACT and
        metadata that is only the PI)."""
        pif = ns.protection
        return not (pif is not None and cdw12 & PRINFO_PRACT and ns.ms == pif.size)

    def _host_length(self, ns: Namespace, nlb: int, with_meta: bool) -> int:
        length = nlb * ns.lba_size
        if ns.extended and with_meta:
            length += nlb * ns.ms
        mdts = self.ctrl.mdts_bytes
        if mdts and length > mdts:
            raise NvmeStatusError(
                Status.INVALID_FIELD, f"transfer of {length} bytes exceeds MDTS ({mdts} bytes)",
                param_offset=_OFF_CDW12,
            )
        return length

    def _data_segs(self, req: Request, length: int, *, to_host: bool) -> Sequence[tuple[int | None, int]]:
        return data_segments(self.ctrl.dma, req, length, self.ctrl.page_size, to_host=to_host)

    def _meta_segs(self, req: Request, length: int, *, to_host: bool) -> Sequence[tuple[int | None, int]]:
        """The metadata buffer MPTR names for ``length`` bytes."""
        mem = self.ctrl.dma
        if req.flags >> 6 == PSDT_SGL_MPTR_SGL:
            try:
                desc = mem.read(req.mptr, 16)
            except DmaError as exc:  # the descriptor is not in guest memory
                raise NvmeStatusError(Status.DATA_TRANSFER_ERROR, f"metadata SGL descriptor: {exc}",
                                      param_offset=_OFF_MPTR) from None
            try:
                return sgl_segments(mem, desc, length, allow_bit_bucket=to_host)
            except NvmeStatusError as exc:
                raise _meta_error(exc) from None
        return [(req.mptr, length)]

    @staticmethod
    def _meta_gather(mem: GuestMemory, segs: Sequence[tuple[int | None, int]], length: int) -> bytearray:
        try:
            return _gather(mem, segs, length)
        except DmaError as exc:
            raise NvmeStatusError(Status.DATA_TRANSFER_ERROR, f"metadata buffer: {exc}",
                                  param_offset=_OFF_MPTR) from None

    @staticmethod
    def _meta_scatter(mem: GuestMemory, segs: Sequence[tuple[int | None, int]], data: bytes | bytearray) -> None:
        try:
            _scatter(mem, segs, data)
        except DmaError as exc:
            raise NvmeStatusError(Status.DATA_TRANSFER_ERROR, f"metadata buffer: {exc}",
                                  param_offset=_OFF_MPTR) from None

    def _from_host(self, req: Request, ns: Namespace, nlb: int) -> tuple[bytearray, bytearray]:
        """The data and metadata a write-like command carries (metadata zeros when PRACT
        inserts the PI)."""
        moves = self._moves_metadata(ns, req.cdw12)
        length = self._host_length(ns, nlb, moves)
        mem = self.ctrl.dma
        segs = self._data_segs(req, length, to_host=False)
        buf = _gather(mem, segs, length)
        if not moves:
            return buf, bytearray(nlb * ns.ms)
        if ns.extended:
            return split_extended(buf, nlb, ns.lba_size, ns.ms)
        mlen = nlb * ns.ms
        msegs = self._meta_segs(req, mlen, to_host=False)
        check_data_metadata(mem, segs, msegs)  # (CMBLOC.CDMMMS clear)
        return buf, self._meta_gather(mem, msegs, mlen)

    def _host_segs(self, req: Request, ns: Namespace, nlb: int, moves: bool
                   ) -> tuple[Sequence[tuple[int | None, int]], Sequence[tuple[int | None, int]] | None]:
        """The data and (separate buffer) metadata pieces of a controller-to-host
        transfer: pointer errors before any work."""
        segs = self._data_segs(req, self._host_length(ns, nlb, moves), to_host=True)
        msegs = self._meta_segs(req, nlb * ns.ms, to_host=True) if moves and not ns.extended else None
        if msegs is not None:
            check_data_metadata(self.ctrl.dma, segs, msegs)  # (CMBLOC.CDMMMS clear)
        return segs, msegs

    def _to_host(self, ns: Namespace, nlb: int, data: bytearray, meta: bytearray, moves: bool,
                 segs: Sequence[tuple[int | None, int]], msegs: Sequence[tuple[int | None, int]] | None) -> None:
        mem = self.ctrl.dma
        if not moves:
            _scatter(mem, segs, data)
        elif msegs is None:  # extended LBAs
            _scatter(mem, segs, interleave(data, meta, nlb, ns.lba_size, ns.ms))
        else:
            _scatter(mem, segs, data)
            self._meta_scatter(mem, msegs, meta)

    def _stored(self, ns: Namespace, slba: int, nlb: int) -> tuple[bytearray, bytearray]:
        data = bytearray(nlb * ns.lba_size)
        with self.locks.hold(ns.nsid, ((slba, nlb),), write=False):
            ns.backend.readv([memoryview(data)], slba << ns.lba_shift)
            meta = ns.meta.read(slba, nlb) if ns.meta is not None else bytearray(nlb * ns.ms)
        return data, meta

    def _store(self, ns: Namespace, slba: int, data: bytearray, meta: bytearray, fua: bool) -> None:
        with self.locks.hold(ns.nsid, ((slba, len(data) >> ns.lba_shift),), write=True):
            ns.backend.writev([memoryview(data)], slba << ns.lba_shift, fua=fua)
            if ns.meta is not None:
                ns.meta.write(slba, meta, fua=fua)

    def _durable(self, cdw12: int) -> bool:
        return bool(cdw12 & (1 << 30)) or not self.ctrl.volatile_write_cache

    @staticmethod
    def _tags(pif: PiFormat, req: Request, slba: int, cdw12: int) -> tuple[int, int, int]:
        """(initial reference tag, application tag, application tag mask), the command's
        PRINFO settings checked."""
        ref = pif.initial_ref(req.cdw3, req.cdw14)
        pif.check_command(slba, cdw12, ref)
        return ref, req.cdw15 & 0xFFFF, req.cdw15 >> 16

    def _tags_of(self, ns: Namespace, req: Request, slba: int) -> tuple[int, int, int] | None:
        """:meth:`_tags` on a PI namespace (Invalid Protection Information before any
        work), None without PI."""
        pif = ns.protection
        return self._tags(pif, req, slba, req.cdw12) if pif is not None else None

    @staticmethod
    def _check(ns: Namespace, req: Request, slba: int, nlb: int, data: bytearray, meta: bytearray,
               tags: tuple[int, int, int] | None) -> None:
        pif = ns.protection
        if pif is None or tags is None:
            return
        ref, app, mask = tags
        pif.check(memoryview(data), memoryview(meta), nlb, slba=slba, cdw12=req.cdw12, ref=ref, app=app,
                  app_mask=mask)

    # -- commands ---------------------------------------------------------------------

    def read(self, req: Request, ns: Namespace) -> int:
        """Read: data and metadata from the store, PI checked, to the host."""
        slba, nlb = self._extent(req, ns)
        moves = self._moves_metadata(ns, req.cdw12)
        self._host_length(ns, nlb, moves)  # MDTS, then Invalid PI, then the pointers: as for a Write
        tags = self._tags_of(ns, req, slba)
        segs, msegs = self._host_segs(req, ns, nlb, moves)
        data, meta = self._stored(ns, slba, nlb)
        self._check(ns, req, slba, nlb, data, meta, tags)
        self._to_host(ns, nlb, data, meta, moves, segs, msegs)
        count_read(self.ctrl, ns.nsid, len(data))
        return 0

    def write(self, req: Request, ns: Namespace) -> int:
        """Write: data and metadata from the host, PI checked or generated, stored."""
        slba, nlb = self._extent(req, ns)
        cdw12 = req.cdw12
        pif = ns.protection
        self._host_length(ns, nlb, self._moves_metadata(ns, cdw12))  # MDTS before Invalid PI, as for a Read
        tags = self._tags(pif, req, slba, cdw12) if pif is not None else None
        data, meta = self._from_host(req, ns, nlb)
        if pif is not None and tags is not None:
            ref, app, mask = tags
            if cdw12 & PRINFO_PRACT:
                pif.generate(memoryview(data), memoryview(meta), nlb, ref, app)
            else:
                pif.check(memoryview(data), memoryview(meta), nlb, slba=slba, cdw12=cdw12, ref=ref, app=app,
                          app_mask=mask)
        self._store(ns, slba, data, meta, self._durable(cdw12))
        count_write(self.ctrl, ns.nsid, len(data))
        return 0

    @staticmethod
    def _refuse_pract(ns: Namespace, req: Request, what: str) -> None:
        if ns.protection is not None and req.cdw12 & PRINFO_PRACT:
            raise NvmeStatusError(Status.INVALID_PROT_INFO, f"{what} with PRACT set",
                                  param_offset=_OFF_CDW12 + 3)

    def compare(self, req: Request, ns: Namespace) -> int:
        """Compare: the stored blocks (PI checked) against the host's data and metadata
        (PRACT refused on a PI namespace: the controller has no PI to insert or strip)."""
        slba, nlb = self._extent(req, ns)
        self._refuse_pract(ns, req, "Compare")
        tags = self._tags_of(ns, req, slba)
        host_data, host_meta = self._from_host(req, ns, nlb)
        data, meta = self._stored(ns, slba, nlb)
        self._check(ns, req, slba, nlb, data, meta, tags)
        lbs, ms = ns.lba_size, ns.ms
        moves = self._moves_metadata(ns, req.cdw12)
        for i in range(nlb):
            if (data[i * lbs:(i + 1) * lbs] != host_data[i * lbs:(i + 1) * lbs]
                    or moves and meta[i * ms:(i + 1) * ms] != host_meta[i * ms:(i + 1) * ms]):
                raise NvmeStatusError(Status.COMPARE_FAILURE, f"data differs at LBA {slba + i:#x}", lba=slba + i)
        count_read(self.ctrl, ns.nsid, len(data))
        return 0

    def verify(self, req: Request, ns: Namespace) -> int:
        """Verify: read the stored blocks and check their PI (nothing moves to the host;
        PRACT refused on a PI namespace)."""
        slba, nlb = self._extent(req, ns)
        self._refuse_pract(ns, req, "Verify")
        tags = self._tags_of(ns, req, slba)
        data, meta = self._stored(ns, slba, nlb)
        self._check(ns, req, slba, nlb, data, meta, tags)
        count_read(self.ctrl, ns.nsid, len(data))
        return 0

    def write_zeroes(self, req: Request, ns: Namespace) -> int:
        """Write Zeroes: the data (and the metadata) zeroed; with PRACT on a PI namespace
        the PI of the zeroed blocks is generated, otherwise the metadata reads as never
        written (PI all ones: the escape values)."""
        slba, nlb = self._extent(req, ns)
        cdw12 = req.cdw12
        pif = ns.protection
        backend = ns.backend
        offset, length = slba << ns.lba_shift, nlb << ns.lba_shift
        # PRINFO matters only with PRACT (the PI of the zeroed blocks is generated from
        # it); without PRACT nothing is checked, so nothing is refused
        pract = pif is not None and cdw12 & PRINFO_PRACT
        tags = self._tags(pif, req, slba, cdw12) if pif is not None and pract else None
        meta_store = ns.meta
        with self.locks.hold(ns.nsid, ((slba, nlb),), write=True):
            if meta_store is not None:
                meta_store.deallocate(slba, nlb)  # first: in between, the PI reads as unchecked
            if cdw12 & (1 << 25):  # DEAC
                backend.deallocate(offset, length)
            else:
                backend.write_zeroes(offset, length)
            if meta_store is not None and pif is not None and tags is not None:
                ref, app, _mask = tags
                chunk = 16384
                for first in range(0, nlb, chunk):
                    n = min(chunk, nlb - first)
                    step = 0 if pif.pi_type == 3 else first
                    meta_store.write(slba + first, pif.zero_blocks_metadata(n, ref + step, app))
        if self._durable(cdw12):
            ns.flush()
        return 0

    def deallocate(self, ns: Namespace, slba: int, nlb: int) -> None:
        """Dataset Management deallocation of a namespace with metadata: the metadata
        (first), then the data of the range."""
        with self.locks.hold(ns.nsid, ((slba, nlb),), write=True):
            if ns.meta is not None:
                ns.meta.deallocate(slba, nlb)
            ns.backend.deallocate(slba << ns.lba_shift, nlb << ns.lba_shift)

    def copy_read(self, req: Request, dns: Namespace, src: CopySource, data: memoryview) -> bytearray:
        """One source range of a Copy with metadata on the destination or a source (any
        descriptor format; the caller checked the limits, the ranges,
        :func:`copy_format_problem` and :func:`copy_incompatible`, and holds the atomicity
        claim): its data into ``data`` and its PI checked as PRINFOR asks (CDW12 15:12,
        expected tags from the range entry), read under the range's shared lock.

        :returns: the metadata to write for it on ``dns`` (zeros when the source's is
            stripped or the source has none: :meth:`copy_write` inserts the PI).
        """
        sns = src.ns
        stored, meta = self._stored(sns, src.slba, src.nlb)
        spif = sns.protection
        if spif is not None:
            prinfor = (req.cdw12 >> 12 & 0xF) << 26
            spif.check_command(src.slba, prinfor, src.ref)
            spif.check(memoryview(stored), memoryview(meta), src.nlb, slba=src.slba, cdw12=prinfor, ref=src.ref,
                       app=src.app, app_mask=src.mask)
        data[:] = stored
        if sns.ms != dns.ms:  # (compatible: the PI is stripped, or inserted by copy_write)
            meta = bytearray(src.nlb * dns.ms)
        return meta

    def copy_write(self, req: Request, dns: Namespace, data: bytearray, meta: bytearray, sdlba: int) -> None:
        """Write what :meth:`copy_read` gathered at SDLBA of ``dns``, with PI checked or
        generated as PRINFOW asks (CDW12 29:26, CDW2/CDW3/CDW14 and CDW15 as for a Write),
        under the destination's exclusive lock."""
        cdw12 = req.cdw12
        total = len(data) >> dns.lba_shift
        pif = dns.protection
        if pif is not None:
            ref, app, mask = self._tags(pif, req, sdlba, cdw12)
            if cdw12 & PRINFO_PRACT:
                pif.generate(memoryview(data), memoryview(meta), total, ref, app)
            else:
                pif.check(memoryview(data), memoryview(meta), total, slba=sdlba, cdw12=cdw12, ref=ref, app=app,
                          app_mask=mask)
        self._store(dns, sdlba, data, meta, self._durable(cdw12))
        count_write(self.ctrl, dns.nsid, len(data))


def copy_format_problem(ns: Namespace, desfmt: int, cdw12: int) -> NvmeStatusError | None:
    """Why descriptor format ``desfmt`` cannot copy into namespace ``ns`` (None: it can).

    Formats 0h and 2h carry the 16b Guard's 32-bit tags, 1h and 3h the 64b Guard's 48-bit
    reference tag: on a namespace whose protection information has the other Guard the
    format is Invalid Format (as QEMU answers). A namespace without protection information
    takes the 16b formats (0h, 2h). PRINFOR.PRACT unlike PRINFOW.PRACT on a namespace with
    protection information is Invalid Field for a copy within it (formats 0h, 1h; per range
    for 2h, 3h: :func:`copy_incompatible`).
    """
    pif = ns.protection
    wide = pif is not None and pif.pif != PIF_16B
    if bool(desfmt & 1) != wide:
        guard = "64b" if wide else "16b (or no)"
        return NvmeStatusError(Status.INVALID_FORMAT,
                               f"Copy descriptor format {desfmt} does not fit namespace {ns.nsid}'s {guard} Guard "
                               f"protection information (formats {'1 and 3' if wide else '0 and 2'} do)",
                               param_offset=_OFF_CDW12 + 1)
    if pif is not None and desfmt < 2 and bool(cdw12 & 1 << 15) != bool(cdw12 & PRINFO_PRACT):
        return NvmeStatusError(Status.INVALID_FIELD, "PRINFOR.PRACT differs from PRINFOW.PRACT",
                               param_offset=_OFF_CDW12 + 1)
    return None


def copy_incompatible(sns: Namespace, dns: Namespace, cdw12: int) -> NvmeStatusError | None:
    """Why a range of namespace ``sns`` cannot be copied into ``dns`` (None: it can).

    Formats 2h and 3h. Within one namespace only PRINFOR.PRACT unlike PRINFOW.PRACT (with
    protection information) is refused, Invalid Field; across namespaces (Incompatible
    Namespace or Format, the rules QEMU applies, plus equal logical block sizes):

    * neither has protection information: the same block and metadata sizes;
    * both have it: the same LBA format and PI settings (type, position, Guard) and
      PRINFOR.PRACT equal to PRINFOW.PRACT;
    * only the destination: PRINFOW.PRACT set (the PI is generated), the source without
      metadata, the destination's metadata only the PI;
    * only the source: PRINFOR.PRACT set (the PI is stripped), the destination without
      metadata, the source's metadata only the PI.
    """
    spi, dpi = sns.protection, dns.protection
    pract_r, pract_w = bool(cdw12 & 1 << 15), bool(cdw12 & PRINFO_PRACT)
    if sns is dns:
        if spi is not None and pract_r != pract_w:
            return NvmeStatusError(Status.INVALID_FIELD, "PRINFOR.PRACT differs from PRINFOW.PRACT",
                                   param_offset=_OFF_CDW12 + 1)
        return None
    why = None
    if sns.lba_size != dns.lba_size:
        why = f"logical block sizes differ ({sns.lba_size} and {dns.lba_size} bytes)"
    elif spi is None and dpi is None:
        if sns.ms != dns.ms:
            why = f"metadata sizes differ ({sns.ms} and {dns.ms} bytes)"
    elif spi is not None and dpi is not None:
        if pract_r != pract_w:
            why = "PRINFOR.PRACT differs from PRINFOW.PRACT"
        elif (sns.ms, spi.pi_type, spi.first, spi.pif) != (dns.ms, dpi.pi_type, dpi.first, dpi.pif):
            why = "the metadata or protection information settings differ"
    elif dpi is not None:
        if not pract_w:
            why = "the destination has protection information and PRINFOW.PRACT is clear"
        elif sns.ms or dns.ms != dpi.size:
            why = "the source has metadata or the destination's is more than its protection information"
    else:
        assert spi is not None
        if not pract_r:
            why = "the source has protection information and PRINFOR.PRACT is clear"
        elif dns.ms or sns.ms != spi.size:
            why = "the destination has metadata or the source's is more than its protection information"
    if why is None:
        return None
    return NvmeStatusError(Status.INCOMPATIBLE_NS, f"namespace {sns.nsid} cannot be copied to {dns.nsid}: {why}")
