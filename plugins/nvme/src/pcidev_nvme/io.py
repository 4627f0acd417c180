"""The NVM I/O command set: Read, Write, Flush, Write Uncorrectable, Write Zeroes,
Dataset Management, Compare, Verify and Copy.

:class:`IoCommandSet` executes one :class:`~pcidev_nvme.request.Request` at a time
as the controller hands them over (:meth:`IoCommandSet.submit`) and reports each
exactly once through ``ctrl.complete(req, status, dw0)``:

* on the submitting thread, before ``submit`` returns, for namespaces whose
  backend is ``inline`` (memory, null; a Copy of descriptor format 2h or 3h, whose
  sources may be in any namespace, only when every namespace's is) and for every
  command that fails its checks;
* from a small pool of worker threads for the others (files), so a slow disk
  never holds up register accesses. Completions may then come out of order. A
  Read, or a Write that need not be durable, is first tried on the submitting
  thread without blocking (the backend's ``readv_nowait`` / ``writev_nowait``,
  ``RWF_NOWAIT`` for files: page-cache hits complete like memory); a worker does
  what that left (all of it when it would block, the rest after a short transfer).
  The pool has ``workers`` threads, or as many as a backend's optional ``queue_depth``
  asks for (an NBD export, :mod:`~pcidev_nvme.backends.nbd`: each worker waits for its
  command on the network, so the queue depth reaches the connection).

Data moves between guest memory and the backend with no copy in Python: the data
pointer (PRP or SGL, :mod:`pcidev_nvme.prp`) becomes memoryviews of guest RAM
that go straight to ``os.preadv`` / ``os.pwritev`` (files) or to one ``memcpy``
(memory).

Checks, in the order a command meets them, and their statuses (the Error
Information entry's parameter location is the SQE byte offset of the field):

=====================================================  =============================
fused operation (CDW0.FUSE) or PSDT 11b                Invalid Field (byte 1)
unsupported opcode                                     Invalid Opcode (byte 0)
NSID 0, FFFFFFFFh (except Flush) or not attached       Invalid Namespace (byte 4)
write to a read-only namespace                         Namespace is Write Protected
SLBA + NLB beyond the namespace                        LBA Out of Range (byte 40, LBA)
transfer larger than MDTS                              Invalid Field (byte 48)
malformed data pointer                                 PRP Offset Invalid / SGL statuses
data pointer outside guest memory, bus mastering off   Data Transfer Error (byte 24)
Copy format not offered, or 2h/3h not enabled (CDFE)  Invalid Field (byte 49)
Copy format for the other Guard (0h/2h vs 1h/3h)       Invalid Format (byte 49)
Copy limits (MSRC, MSSRL, MCL)                         Cmd Size Limit Exceeded
Copy source NSID 0, FFFFFFFFh, not attached            Invalid Namespace
Copy source namespace being formatted                  Format In Progress
Copy source and destination formats that do not fit    Incompatible Namespace or Format
Copy source overlapping the destination (2h, 3h)       Overlapping I/O Range
Copy source range asking for Fast Copy Only            Fast Copy Not Possible
Copy source range with a command extension (CETYPE)    Invalid Field
PRINFO invalid for the namespace's PI type              Invalid Protection Information
PI check failed (PRCHK: Guard, App Tag, Ref Tag)       End-to-end Guard / Application
                                                       Tag / Reference Tag Check Error
Compare mismatch                                       Compare Failure
a block marked by Write Uncorrectable is read          Unrecovered Read Error (LBA)
a deallocated or unwritten block is read (Read,        Deallocated or Unwritten Logical
Compare, Verify, Copy source) with Error Recovery       Block (LBA, DNR)
DULBE set for the namespace
a sanitize operation is in progress (all but Flush)    Sanitize In Progress
the command was aborted (Abort) before its I/O began   Command Abort Requested
backend I/O error on read / write                      Unrecovered Read Error / Write Fault
backend out of space                                   Capacity Exceeded
=====================================================  =============================

Namespaces formatted with metadata (``Namespace.ms``) take the general path, whose
handlers hand them to :class:`~pcidev_nvme.protected_io.ProtectedIo` (metadata buffers,
extended LBAs, protection information); the fast path never sees them.

Namespaces with Error Recovery DULBE set (``dulbe``, asked once per namespace lookup as
``read_only`` is read) take the general path too, whose Read, Compare, Verify and Copy
ask the backend where its holes are (``pcidev_nvme.lba_status.first_deallocated``,
the knowledge Get LBA Status reports); with DULBE clear nothing is asked.

Namespaces whose atomic write unit in effect is larger than one block
(:mod:`pcidev_nvme.atomicity`) take the general path too: each command there holds the
range lock of its blocks while its handler runs (:meth:`IoCommandSet._execute`);
Dataset Management and Copy claim theirs once their ranges are fetched and checked.

Every other namespace keeps each logical block whole (the spec's single-block atomicity,
AWUN 0) with :class:`~pcidev_nvme.atomicity.BlockLocks`: a command that changes data
(Write, Write Zeroes, Dataset Management, Write Uncorrectable, Copy: destination and
sources) holds the locks of the 128 KiB regions it touches while it does
(:meth:`IoCommandSet._hold`); a Read, Compare or Verify takes none, but reads again when a
writer overlapped it (the regions' sequence counts changed; :meth:`IoCommandSet._stable`).
On the submitting thread nothing waits: the fast path indexes the stripes itself (a 4 KiB
Read reads one count before and after, a Write takes one token), and a busy stripe hands
the command to a worker, which waits for it; a Read or Write moved only in part without
blocking goes on in a worker from its first block not moved, under the locks again.

The identify fields that describe this command set come from
:mod:`pcidev_nvme.limits` (re-exported here): :data:`ONCS`, :data:`SGLS`, :data:`OCFS`,
:data:`COPY_LIMITS`, :data:`DMRL`, :data:`DMRSL`, :data:`DMSL`, :data:`WZSL`,
:data:`VSL`.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Literal, Protocol, TypeGuard, cast, overload

from pcidev.dma import GuestMemory
from pcidev.errors import DmaError, QuiesceTimeoutError
from pcidev_nvme.atomicity import READ_TRIES, Atomicity
from pcidev_nvme.backends import Backend
from pcidev_nvme.lba_status import first_deallocated
from pcidev_nvme.limits import COPY_LIMITS, DMRL, DMRSL, DMSL, MAX_DSM_RANGES, OCFS, ONCS, SGLS, VSL, WZSL
from pcidev_nvme.namespace import Namespace
from pcidev_nvme.protected_io import CopySource, ProtectedIo, copy_format_problem, copy_incompatible
from pcidev_nvme.prp import OFF_DPTR1, data_segments, prp_segments
from pcidev_nvme.request import ControllerPort, Request, count_read, count_write, lba_extent
from pcidev_nvme.status import NvmeStatusError, Status
from pcidev_nvme.uncorrectable import Uncorrectable

__all__ = [
    "COPY_LIMITS",
    "DMRL",
    "DMRSL",
    "DMSL",
    "MAX_DSM_RANGES",
    "OCFS",
    "ONCS",
    "SGLS",
    "VSL",
    "WZSL",
    "IoCommandSet",
    "Opcode",
]

log = logging.getLogger(__name__)

#: a command's executor: (request, namespace) -> completion DW0; the namespace is None
#: only for a broadcast Flush, whose executor (``_flush_all``) accepts that
_Handler = Callable[[Request, Any], int]


def _without_bit_buckets(segs: Sequence[tuple[int | None, int]]) -> TypeGuard[Sequence[tuple[int, int]]]:
    """Whether every piece has an address (no SGL Bit Bucket)."""
    return all(gpa is not None for gpa, _ in segs)


def _after(views: list[memoryview], skip: int) -> list[memoryview]:
    """The part of ``views`` after its first ``skip`` bytes (``views`` itself when
    ``skip`` is 0; otherwise new views, which the caller releases)."""
    if not skip:
        return views
    out = []
    for v in views:
        n = len(v)
        if skip >= n:
            skip -= n
            continue
        out.append(v[skip:])
        skip = 0
    return out


class _NoWait(Protocol):
    """A backend with ``nowait`` set (:class:`~pcidev_nvme.backends.BaseBackend`)."""

    def readv_nowait(self, views: list[memoryview], offset: int) -> int: ...

    def writev_nowait(self, views: list[memoryview], offset: int) -> int: ...


class _Rest:
    """The worker's part of a Read or Write the fast path handed over: its first ``done``
    bytes moved on the submitting thread (0: none), ``stripes`` are the block locks of
    the whole command, as the fast path found them (an executor with the handler signature)."""

    __slots__ = ("fn", "done", "stripes")

    def __init__(self, fn: Callable[[Request, Namespace, int, list[int] | None], int], done: int,
                 stripes: list[int] | None = None) -> None:
        self.fn = fn
        self.done = done
        self.stripes = stripes

    def __call__(self, req: Request, ns: Namespace) -> int:
        return self.fn(req, ns, self.done, self.stripes)


class _Batch:
    """What the fast path did during the core's batch on one thread."""

    __slots__ = ("reads", "read_bytes", "writes", "written_bytes", "done", "nsid")

    def __init__(self, done: list[tuple[Request, int, int, int, Any]] | None) -> None:
        self.reads = self.read_bytes = self.writes = self.written_bytes = 0
        self.done = done
        #: the namespace the counts are of (a command of another one records them first)
        self.nsid = -1


class _Local(threading.local):
    """Per-thread state of :class:`IoCommandSet`."""

    #: the core's batch in progress on this thread, or None
    batch: _Batch | None = None
    #: a command runs on the submitting thread: block locks are only tried, never waited for
    inline: bool = False


class _AsyncIo:
    """One fast-path Read or Write a backend completes itself (its ``submit_readv`` /
    ``submit_writev``): the callable ``done(error)`` the backend calls exactly once when the
    command ended (0 or an errno).

    :ivar batch: the controller's batch (a context-manager factory: ``ctrl.batch``, or None):
        a backend that ends several commands at once may run their ``done`` calls inside one
        ``with done.batch():``, so that their completions are posted together, with one
        interrupt per vector.
    """

    __slots__ = ("io", "req", "ns", "views", "offset", "length", "read", "stripes", "seen", "batch")

    def __init__(self, io: IoCommandSet, req: Request, ns: Namespace, views: list[memoryview], offset: int,
                 length: int, read: bool, stripes: list[int], seen: Any) -> None:
        self.io, self.req, self.ns, self.views = io, req, ns, views
        self.offset, self.length, self.read, self.stripes, self.seen = offset, length, read, stripes, seen
        self.batch = io._ctrl_batch

    def __call__(self, error: int) -> None:
        self.io._async_done(self, error)


class _Busy(Exception):
    """A block lock a command on the submitting thread needs is held: a worker runs it."""


class Opcode:
    """NVM command set opcodes handled here."""

    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_UNCORRECTABLE = 0x04
    COMPARE = 0x05
    WRITE_ZEROES = 0x08
    DSM = 0x09
    VERIFY = 0x0C
    COPY = 0x19


#: Worker threads for backends that may block.
DEFAULT_WORKERS = 4

#: The most worker threads a backend's ``queue_depth`` can ask for.
MAX_WORKERS = 256

#: Verify reads the range through the backend in chunks of this size.
VERIFY_CHUNK = 1 << 20

_BROADCAST = 0xFFFFFFFF
#: command names for messages (a drain past its deadline names the oldest command)
_OPCODE_NAMES = {Opcode.FLUSH: "Flush", Opcode.WRITE: "Write", Opcode.READ: "Read",
                 Opcode.WRITE_UNCORRECTABLE: "Write Uncorrectable", Opcode.COMPARE: "Compare",
                 Opcode.WRITE_ZEROES: "Write Zeroes", Opcode.DSM: "Dataset Management",
                 Opcode.VERIFY: "Verify", Opcode.COPY: "Copy"}
_DSM_RANGE = struct.Struct("<IIQ")  # context attributes, length (LBAs), starting LBA
#: Copy source range entries (NVM Command Set, "Source Range Entries Copy Descriptor
#: Format" 0h..3h; the offsets of libnvme ``struct nvme_copy_range``, ``_f1``, ``_f2``,
#: ``_f3``):
#: format 0h (32 bytes): SLBA, NLB (0's based), EILBRT, ELBAT, ELBATM;
#: format 1h (40 bytes): SLBA, NLB, ELBT (80 bits, big-endian: storage tag above the
#: 48-bit reference tag), ELBAT, ELBATM;
#: format 2h (32 bytes): SNSID, SLBA, NLB, SOPT, EILBRT, ELBAT, ELBATM;
#: format 3h (40 bytes): SNSID, SLBA, NLB, SOPT, ELBT, ELBAT, ELBATM.
#: Byte order: EILBRT, ELBAT and ELBATM are little-endian, as Linux ``include/linux/nvme.h``
#: declares them (``__le32 eilbrt; __le16 elbat; __le16 elbatm``) and QEMU reads them;
#: current libnvme declares format 0h/2h's as big-endian (``__be32 elbt``) and writes
#: ``cpu_to_be32``: a host using it with a non-zero EILBRT and reference tag checking sees
#: tag mismatches here, as on QEMU. ELBT of 1h/3h is big-endian in all three.
#: Byte 18 bits 3:0 are CETYPE (Command Extension Type, bytes 21:20 its value CEV): no
#: command extension is supported, a non-zero CETYPE is Invalid Field (CEV is then
#: ignored, as the other reserved bytes are).
_COPY_ENTRY = (
    struct.Struct("<8xQH6xIHH"),
    struct.Struct("<8xQH8x10sHH"),
    struct.Struct("<I4xQH4xHIHH"),
    struct.Struct("<I4xQH4xH2x10sHH"),
)
#: SOPT bit 15: Fast Copy Only
_SOPT_FCO = 1 << 15
#: byte 18 of every source range entry: bits 3:0 CETYPE
_COPY_CETYPE_BYTE = 18

# Byte offsets in the SQE (Error Information "parameter error location").
_OFF_OPCODE = 0
_OFF_FLAGS = 1
_OFF_NSID = 4
_OFF_CDW10 = 40
_OFF_CDW12 = 48

_WRITE_PROTECTED = {Opcode.WRITE, Opcode.WRITE_ZEROES, Opcode.COPY, Opcode.WRITE_UNCORRECTABLE}


def _lba_range(slba: int, nlb: int, ns: Namespace) -> NvmeStatusError:
    return NvmeStatusError(
        Status.LBA_RANGE,
        f"LBAs {slba:#x}+{nlb} exceed namespace {ns.nsid} ({ns.nlbas} blocks)",
        param_offset=_OFF_CDW10,
        lba=slba,
    )


def _copy_entry(raw: bytes | bytearray, desfmt: int, i: int
                ) -> tuple[int | None, int, int, int, int, int, int]:
    """Source range entry ``i`` of a Copy descriptor of format ``desfmt``: (SNSID or None,
    SLBA, NLB 0's based, SOPT, expected initial reference tag, ELBAT, ELBATM); the 48-bit
    reference tag of formats 1h and 3h is the low bits of ELBT (no storage tag: STS 0)."""
    entry = _COPY_ENTRY[desfmt]
    fields = entry.unpack_from(raw, i * entry.size)
    if desfmt == 0:
        slba, nlb0, ref, app, mask = fields
        return None, slba, nlb0, 0, ref, app, mask
    if desfmt == 1:
        slba, nlb0, elbt, app, mask = fields
        return None, slba, nlb0, 0, int.from_bytes(elbt[4:], "big"), app, mask
    if desfmt == 2:
        snsid, slba, nlb0, sopt, ref, app, mask = fields
        return snsid, slba, nlb0, sopt, ref, app, mask
    snsid, slba, nlb0, sopt, elbt, app, mask = fields
    return snsid, slba, nlb0, sopt, int.from_bytes(elbt[4:], "big"), app, mask


def _copy_snsids(raw: bytes | bytearray, desfmt: int, count: int) -> set[int]:
    """The source namespace identifiers of the entries (formats 2h and 3h; none otherwise)."""
    if desfmt < 2:
        return set()
    size = _COPY_ENTRY[desfmt].size
    return {int.from_bytes(raw[i * size:i * size + 4], "little") for i in range(count)}


def _os_status(exc: OSError, *, write: bool, flush: bool = False) -> int:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Status.CAP_EXCEEDED
    if flush and exc.errno in (errno.EROFS, errno.EPERM):  # (not durable; a Flush is never write-protected)
        return Status.WRITE_FAULT
    if exc.errno == errno.EROFS or (write and exc.errno == errno.EPERM):  # (an NBD server's EPERM)
        return Status.NS_WRITE_PROTECTED
    if exc.errno in (errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADMSG, errno.EUCLEAN):
        return Status.WRITE_FAULT if write else Status.UNRECOVERED_READ_ERROR
    return Status.INTERNAL


class IoCommandSet:
    """Executes NVM I/O commands for one controller.

    :param ctrl: the controller (see the contract in ``docs/nvme-contract.md``):
        ``dma``, ``page_size``, ``mdts_bytes``, ``namespaces``, ``smart`` and
        ``complete``.
    :param workers: size of the worker pool for backends that may block.
    :param uncorrectable: the Write Uncorrectable marks (None: a set of its own).
    :param atomicity: the atomic write limits and range locks (None: one of its own, with
        nothing configured).

    :ivar refuse: a status every command but Flush completes with at once (Sanitize In
        Progress while a sanitize operation runs, Sanitize Failed in its failure mode),
        or 0; set by the controller.
    """

    def __init__(self, ctrl: ControllerPort, *, workers: int = DEFAULT_WORKERS,
                 uncorrectable: Uncorrectable | None = None, atomicity: Atomicity | None = None) -> None:
        self.ctrl = ctrl
        self.atomicity = atomicity if atomicity is not None else Atomicity()
        self.uncorrectable = uncorrectable if uncorrectable is not None else Uncorrectable()
        #: called after a Write Zeroes or a Write Uncorrectable (commands the SMART write
        #: count leaves out) altered user data: the Sanitize Status log's Global Data Erased
        self.altered: Callable[[], None] = lambda: None
        self.refuse = 0
        #: Verify Size Limit in bytes of data (the controller's ``vsl`` property; 0: none)
        self.verify_limit = VSL
        #: Host Behavior Support CDFE: the Copy descriptor formats (bit n: format n) the host
        #: enabled; set by the controller to its features' value
        self.copy_formats_enabled: Callable[[], int] = lambda: 0
        #: the status I/O to a namespace gets while a Format NVM (Format In Progress) or a
        #: Namespace Management delete (Namespace Not Ready) has it, else None (a Copy's
        #: source namespace); set by the controller
        self.claim_status: Callable[[int], int | None] = lambda nsid: None
        #: whether Error Recovery DULBE is set for a namespace (NSID); set by the controller to
        #: its features' value
        self.dulbe: Callable[[int], bool] = lambda nsid: False
        #: source namespaces (other than the destination) of the Copies running: NSID -> count
        self._copying_from: dict[int, int] = {}
        #: commands handed to the workers and not started yet (an Abort may take them)
        self._queued: set[Request] = set()
        self._complete = ctrl.complete
        #: the controller's batch (``ctrl.batch``), for backends that end commands in groups
        self._ctrl_batch: Callable[[], Any] | None = getattr(ctrl, "batch", None)
        self._workers = max(1, int(workers))
        self._pool: ThreadPoolExecutor | None = None
        #: the worker threads of ``_pool``: ``workers``, or more for a backend whose optional
        #: ``queue_depth`` (commands it wants in flight: an NBD connection) is larger
        self._pool_size = self._workers
        self._cond = threading.Condition()
        #: the commands with the workers, with the ``time.monotonic()`` they were handed over
        #: (what a drain past its deadline names)
        self._busy: dict[Request, float] = {}
        self._closed = False
        self._local = _Local()
        #: the metadata and protection information side of namespaces with metadata
        self._protected = ProtectedIo(ctrl)
        self._handlers: dict[int, _Handler] = {
            Opcode.READ: self._read,
            Opcode.WRITE: self._write,
            Opcode.FLUSH: self._flush,
            Opcode.WRITE_ZEROES: self._write_zeroes,
            Opcode.DSM: self._dsm,
            Opcode.COMPARE: self._compare,
            Opcode.VERIFY: self._verify,
            Opcode.COPY: self._copy,
            Opcode.WRITE_UNCORRECTABLE: self._write_uncorrectable,
        }

    # -- submission -------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        """Execute ``req`` and complete it exactly once (now or from a worker).

        Never raises for anything the guest put in the command.

        :param req: a :class:`~pcidev_nvme.request.Request`.
        """
        self.submit_many((req,))

    def submit_many(self, reqs: Sequence[Request]) -> None:
        """Execute each of ``reqs``, in order, as :meth:`submit` does (the controller's
        fetch loop hands over the commands of one fetch together: the lookups every
        command needs are made once).

        :param reqs: requests from one submission queue.
        """
        ctrl = self.ctrl
        namespaces = ctrl.namespaces
        closed = self._closed
        batch = self._local.batch
        mem: GuestMemory | None = None  # ctrl.dma, at the first data transfer
        page = ctrl.page_size
        mdts = ctrl.mdts_bytes
        # the namespace of the previous command (commands of a fetch mostly share one)
        nsid = -1
        ns: Namespace | None = None
        backend: Any = None
        inline = fast = read_only = asyn = False
        nlbas = shift = 0
        i = 0
        wu = self.uncorrectable
        refuse = self.refuse
        serialises = self.atomicity.serialises
        dulbe = self.dulbe
        blocks = self.atomicity.blocks
        tokens = blocks.tokens
        seqs = blocks.seqs
        waiting = blocks.waiting
        smask = blocks.mask
        sshift = blocks.shift
        salt = 0
        # read once per batch (a Set Features of the cache applies from the next fetch on)
        durable = not ctrl.volatile_write_cache
        try:
            for i, req in enumerate(reqs):  # noqa: B007 (i is read by the except clause)
                op = req.opcode
                if refuse and op != Opcode.FLUSH:
                    self._complete(req, refuse, 0, error=NvmeStatusError(refuse, "refused while sanitizing"))
                    continue
                if (op == 2 or op == 1) and not req.flags and not closed:
                    # Fast path: Read or Write with PRPs, the benchmark's path. Same checks as
                    # the general path, fewer calls. An inline backend (memory) moves the data
                    # here; a backend that may block (a file) first moves what it can without
                    # blocking (page-cache hits), and a worker thread does the rest.
                    if req.nsid != nsid:
                        nsid = req.nsid
                        ns = namespaces.get(nsid)
                        if ns is not None:
                            backend = ns.backend
                            inline = backend.inline
                            # (namespaces with metadata, atomic units of more than a
                            # block, or DULBE set take the general path)
                            asyn = getattr(backend, "submit_readv", None) is not None and not inline
                            fast = ((inline or asyn or getattr(backend, "nowait", False)) and not ns.ms
                                    and not serialises(ns) and not dulbe(nsid))
                            nlbas = ns.nlbas
                            shift = ns.lba_shift
                            read_only = ns.read_only
                            salt = blocks.salt(nsid)
                    if ns is not None and fast:
                        try:
                            if op == 1 and read_only:
                                raise NvmeStatusError(
                                    Status.NS_WRITE_PROTECTED, f"namespace {ns.nsid} is write protected"
                                )
                            slba = req.cdw10 | req.cdw11 << 32
                            cdw12 = req.cdw12
                            nlb = (cdw12 & 0xFFFF) + 1
                            if slba + nlb > nlbas:
                                raise _lba_range(slba, nlb, ns)
                            length = nlb << shift
                            if mdts and length > mdts:
                                raise NvmeStatusError(
                                    Status.INVALID_FIELD,
                                    f"transfer of {length} bytes exceeds MDTS ({mdts} bytes)",
                                    param_offset=_OFF_CDW12,
                                )
                            if op == 2 and wu.active:
                                self._check_marks(ns, slba, nlb)
                            if mem is None:
                                mem = ctrl.dma
                            prp1 = req.prp1
                            read = op == 2
                            if not prp1 & 3 and length <= page - (prp1 & (page - 1)):
                                views = mem.views(prp1, length, write=read)
                            else:
                                views = mem.sg_views(prp_segments(mem, prp1, req.prp2, length, page), write=read)
                            offset = slba << shift
                            # the block locks (atomicity.BlockLocks): a Read notes the counts of
                            # its stripes and checks them after; a Write takes the tokens without
                            # waiting. A busy stripe (done -1) hands the command to a worker.
                            first = offset >> sshift
                            many: list[int] | None = None
                            if first == (offset + length - 1) >> sshift:
                                si = (salt + first) & smask
                            else:
                                many = blocks.span(nsid, offset, length)
                            if asyn:  # a backend that completes commands itself (NBD): no worker
                                self._submit_async(req, ns, backend, views, offset, length, read,
                                                   bool(cdw12 & 0x40000000) or durable,
                                                   [si] if many is None else many)
                                continue
                            try:
                                if read:
                                    if many is None:
                                        token = tokens[si]
                                        seq = seqs[si]
                                        if not token:
                                            done = -1
                                        else:
                                            if inline:
                                                backend.readv(views, offset)
                                                done = length
                                            else:
                                                done = cast(_NoWait, backend).readv_nowait(views, offset)
                                            if not token or seqs[si] != seq:
                                                done = -1
                                    else:
                                        seen = blocks.seq(many)
                                        if seen is None:
                                            done = -1
                                        else:
                                            if inline:
                                                backend.readv(views, offset)
                                                done = length
                                            else:
                                                done = cast(_NoWait, backend).readv_nowait(views, offset)
                                            if blocks.seq(many) != seen:
                                                done = -1
                                elif not inline and (cdw12 & 0x40000000 or durable):
                                    done = 0  # a durable write never goes without waiting
                                elif many is None:
                                    token = tokens[si]
                                    try:
                                        token.pop()
                                    except IndexError:
                                        done = -1
                                    else:
                                        try:
                                            if inline:
                                                backend.writev(views, offset,
                                                               fua=bool(cdw12 & 0x40000000) or durable)
                                                done = length
                                            else:
                                                done = cast(_NoWait, backend).writev_nowait(views, offset)
                                        finally:
                                            seqs[si] += 1
                                            token.append(True)
                                            if waiting[si]:
                                                blocks.wake()
                                elif not blocks.try_write(many):
                                    done = -1
                                else:
                                    try:
                                        if inline:
                                            backend.writev(views, offset, fua=bool(cdw12 & 0x40000000) or durable)
                                            done = length
                                        else:
                                            done = cast(_NoWait, backend).writev_nowait(views, offset)
                                    finally:
                                        blocks.end_write(many)
                            finally:
                                if len(views) == 1:
                                    views[0].release()
                                else:
                                    for v in views:
                                        v.release()
                            if done < length:  # (the worker's _write clears the marks after the write)
                                # whole blocks only: the worker moves the rest under the locks
                                done = done >> shift << shift if done > 0 else 0
                                self._dispatch(_Rest(self._read if read else self._write, done,
                                                     [si] if many is None else many), req, ns)
                                continue
                            if not read and wu.active:  # written: the marks go (never before the write)
                                wu.clear(nsid, slba, nlb)
                            if batch is not None:  # the core's batch: counted and completed at its end
                                if self._count_in_batch(batch, req, nsid, read, length):
                                    continue
                            elif read:
                                ctrl.smart.record_read(length)
                                ctrl.ns_smart.record_read(nsid, length)
                            else:
                                ctrl.smart.record_write(length)
                                ctrl.ns_smart.record_write(nsid, length)
                        except BaseException as exc:
                            self._fail(req, exc)
                            continue
                        self._complete(req, 0, 0)
                        continue
                self._submit_general(req)
        except Exception as exc:  # a bug outside a command's own handling
            log.exception("I/O command %r failed unexpectedly", reqs[i])
            req = reqs[i]
            if not req.done:  # (a second completion of a command is ignored by the controller)
                try:
                    self._complete(req, Status.INTERNAL, 0, error=NvmeStatusError(Status.INTERNAL, str(exc)))
                except Exception:
                    log.exception("completing %r failed", req)
            if i + 1 < len(reqs):  # the commands after it were not started: run them
                self.submit_many(reqs[i + 1:])

    def _submit_async(self, req: Request, ns: Namespace, backend: Any, views: list[memoryview], offset: int,
                      length: int, read: bool, fua: bool, stripes: list[int]) -> None:
        """A fast-path Read or Write on a backend with ``submit_readv`` / ``submit_writev``:
        started here, completed from the backend's thread by its callback (no worker waits
        for it). A Read notes its stripes' counts and reads again on a worker when a writer
        overlapped it; a Write holds its stripes' tokens until it ends. A command the backend
        does not start (a scatter list, a connection being reopened) goes to a worker."""
        blocks = self.atomicity.blocks
        seen = blocks.seq(stripes) if read else None
        if (seen is None) if read else not blocks.try_write(stripes):
            self._release(views)
            self._dispatch(_Rest(self._read if read else self._write, 0, stripes), req, ns)
            return
        with self._cond:
            self._busy[req] = time.monotonic()
        done = _AsyncIo(self, req, ns, views, offset, length, read, stripes, seen)
        try:
            started = (backend.submit_readv(views, offset, done) if read
                       else backend.submit_writev(views, offset, done, fua=fua))
        except BaseException as exc:
            started = False
            if not read:
                blocks.end_write(stripes)
            self._release(views)
            self._done(req)
            self._fail(req, exc)
            return
        if not started:
            if not read:
                blocks.end_write(stripes)
            self._release(views)
            self._done(req)
            self._dispatch(_Rest(self._read if read else self._write, 0, stripes), req, ns)

    def _async_done(self, cmd: _AsyncIo, error: int) -> None:
        """The end of a command :meth:`_submit_async` started (``cmd``; ``error``: 0 or an
        errno), on the backend's thread. Inside the controller's batch on that thread
        (:attr:`_AsyncIo.batch`), a success is counted and completed with the batch's."""
        req = cmd.req
        again = False
        try:
            self._release(cmd.views)
            read = cmd.read
            if read:
                again = not error and self.atomicity.blocks.seq(cmd.stripes) != cmd.seen
            else:
                self.atomicity.blocks.end_write(cmd.stripes)
            if again:  # a writer overlapped the read: a worker reads again, under the locks
                self._dispatch(_Rest(self._read, 0, cmd.stripes), req, cmd.ns)
            elif error:
                self._fail(req, OSError(error, os.strerror(error)))
            else:
                ns = cmd.ns
                nsid = ns.nsid
                length = cmd.length
                if not read and self.uncorrectable.active:
                    self.uncorrectable.clear(nsid, cmd.offset >> ns.lba_shift, length >> ns.lba_shift)
                batch = self._local.batch
                if batch is None:
                    if read:
                        count_read(self.ctrl, nsid, length)
                    else:
                        count_write(self.ctrl, nsid, length)
                    self._complete(req, 0, 0)
                elif not self._count_in_batch(batch, req, nsid, read, length):
                    # (the controller's batch on this thread: counted, and completed at its end)
                    self._complete(req, 0, 0)
        except BaseException as exc:  # (also a re-read the closed pool refused)
            again = False
            self._fail(req, exc)
        finally:
            if not again:
                self._done(req)

    @staticmethod
    def _release(views: list[memoryview]) -> None:
        """Release guest-memory views (one a backend still holds is left to its last reference)."""
        for v in views:
            try:
                v.release()
            except BufferError:
                pass

    def _submit_general(self, req: Request) -> None:
        """Every command but the fast path's (see :meth:`submit`)."""
        try:
            handler = self._handlers.get(req.opcode)
            if handler is None:
                raise NvmeStatusError(
                    Status.INVALID_OPCODE,
                    f"I/O opcode {req.opcode:#04x} is not supported",
                    param_offset=_OFF_OPCODE,
                )
            flags = req.flags
            if flags & 0x3:
                raise NvmeStatusError(
                    Status.INVALID_FIELD, "fused operations are not supported",
                    param_offset=_OFF_FLAGS,
                )
            if flags & 0xC0 == 0xC0:
                raise NvmeStatusError(
                    Status.INVALID_FIELD, "PSDT 11b is reserved", param_offset=_OFF_FLAGS
                )
            nsid = req.nsid
            ns = self.ctrl.namespaces.get(nsid)
            if ns is None:
                if nsid != _BROADCAST or req.opcode != Opcode.FLUSH:
                    raise NvmeStatusError(
                        Status.INVALID_NSID, f"namespace {nsid:#x} is not attached",
                        param_offset=_OFF_NSID,
                    )
                handler = self._flush_all
                inline = self._all_inline()
            else:
                inline = ns.backend.inline
                if inline and req.opcode == Opcode.COPY and (req.cdw12 >> 8) & 0xF >= 2:
                    # formats 2h, 3h read other namespaces too: never a file on this thread
                    inline = self._all_inline()
            if self._closed:
                raise NvmeStatusError(Status.INTERNAL, "the I/O command set is closed")
            if not inline:
                self._dispatch(handler, req, ns)
                return
            local = self._local
            local.inline = True
            try:
                dw0 = self._execute(handler, req, ns)
            except _Busy:  # nothing was done yet: a worker waits for the locks and runs it
                self._dispatch(handler, req, ns)
                return
            finally:
                local.inline = False
        except BaseException as exc:
            self._fail(req, exc)
            return
        self._complete(req, 0, dw0)

    def _execute(self, handler: _Handler, req: Request, ns: Namespace | None) -> int:
        """Run ``handler``; on a namespace the atomicity serialises, under the range lock
        of the command's blocks (:meth:`~pcidev_nvme.atomicity.Atomicity.hold`)."""
        atomicity = self.atomicity
        if ns is None or not atomicity.serialises(ns):
            return handler(req, ns)
        slba, nlb = lba_extent(req)
        with atomicity.hold(req.opcode, ns.nsid, slba, nlb):
            return handler(req, ns)

    def _guarded(self, ns: Namespace) -> bool:
        """Whether commands on ``ns`` hold the block locks (:class:`~pcidev_nvme.atomicity.BlockLocks`):
        every namespace but those with metadata (whose :class:`~pcidev_nvme.protected_io.RangeLocks`
        already cover data and metadata) and those the atomicity serialises (whose range locks
        cover the whole command)."""
        return not ns.ms and not self.atomicity.serialises(ns)

    def _span(self, ns: Namespace, slba: int, nlb: int) -> list[int] | None:
        """The block lock stripes of ``nlb`` blocks at ``slba`` (None: ``ns`` is not
        :meth:`_guarded`)."""
        if ns.ms or self.atomicity.serialises(ns):
            return None
        shift = ns.lba_shift
        return self.atomicity.blocks.span(ns.nsid, slba << shift, nlb << shift)

    def _indexes(self, spans: Iterable[tuple[Namespace, int, int]]) -> list[int]:
        """The block lock stripes of ``(namespace, SLBA, NLB)`` spans on guarded namespaces."""
        return self.atomicity.blocks.indexes([(ns.nsid, slba << ns.lba_shift, nlb << ns.lba_shift)
                                              for ns, slba, nlb in spans if self._guarded(ns)])

    def _begin_write(self, indexes: list[int]) -> None:
        """Take the block locks of ``indexes`` as a writer: a worker waits for them; on the
        submitting thread they are only tried, and :class:`_Busy` (raised before anything
        changed) hands the command to a worker. The caller ends with
        :meth:`~pcidev_nvme.atomicity.BlockLocks.end_write`."""
        blocks = self.atomicity.blocks
        if self._local.inline:
            if not blocks.try_write(indexes):
                raise _Busy
        else:
            blocks.write(indexes)

    @contextmanager
    def _hold(self, spans: Iterable[tuple[Namespace, int, int]]) -> Iterator[None]:
        """Hold the block locks of ``(namespace, SLBA, NLB)`` spans as a writer
        (:meth:`_begin_write`) while the command changes data."""
        indexes = self._indexes(spans)
        if not indexes:
            yield
            return
        self._begin_write(indexes)
        try:
            yield
        finally:
            self.atomicity.blocks.end_write(indexes)

    def _stable(self, indexes: list[int] | None, read: Callable[[], object]) -> None:
        """Run ``read`` (which reads the blocks of stripes ``indexes``; None or empty: no
        locks) until no writer overlapped it (:class:`~pcidev_nvme.atomicity.BlockLocks`:
        the counts before and after are equal and even); after
        :data:`~pcidev_nvme.atomicity.READ_TRIES` tries, under the locks. On the submitting
        thread a writer at work raises :class:`_Busy` instead: a worker reads."""
        if not indexes:
            read()
            return
        blocks = self.atomicity.blocks
        for _ in range(READ_TRIES):
            seen = blocks.seq(indexes)
            if seen is not None:
                read()
                if blocks.seq(indexes) == seen:
                    return
            if self._local.inline:
                raise _Busy
        blocks.take(indexes)
        try:
            read()
        finally:
            blocks.give(indexes)

    def begin_batch(self, done: list[tuple[Request, int, int, int, Any]] | None = None) -> None:
        """The controller starts a doorbell batch on this thread: the SMART counts of the
        Reads and Writes completed on this thread are summed until :meth:`end_batch`
        (one update).

        :param done: the core's list of completions deferred to the end of the batch:
            a Read or Write that succeeds on this thread is appended to it as
            ``(req, 0, 0, 0, None)`` instead of going through ``ctrl.complete`` (None:
            through ``ctrl.complete``).
        """
        self._local.batch = _Batch(done)

    def end_batch(self) -> None:
        """The batch on this thread ended: record its SMART counts."""
        local = self._local
        batch = local.batch
        if batch is not None:
            local.batch = None
            self._record_batch(batch, -1)

    def _count_in_batch(self, batch: _Batch, req: Any, nsid: int, read: bool, length: int) -> bool:
        """Count a successful Read or Write of ``length`` bytes in the controller's ``batch``
        (per namespace too); True when the batch also completes it at its end (the caller
        does nothing more), False when the caller completes it."""
        if nsid != batch.nsid:
            self._record_batch(batch, nsid)
        if read:
            batch.reads += 1
            batch.read_bytes += length
        else:
            batch.writes += 1
            batch.written_bytes += length
        if batch.done is not None:
            batch.done.append((req, 0, 0, 0, None))
            return True
        return False

    def _record_batch(self, batch: _Batch, nsid: int) -> None:
        """Record the counts ``batch`` summed so far (the controller's and its namespace's)
        and sum those of namespace ``nsid`` from now on."""
        if batch.reads or batch.writes:
            ctrl = self.ctrl
            ctrl.smart.record_io(batch.reads, batch.read_bytes, batch.writes, batch.written_bytes)
            ctrl.ns_smart.record_io(batch.nsid, batch.reads, batch.read_bytes, batch.writes, batch.written_bytes)
            batch.reads = batch.read_bytes = batch.writes = batch.written_bytes = 0
        batch.nsid = nsid

    def _all_inline(self) -> bool:
        return all(ns.backend.inline for ns in list(self.ctrl.namespaces.values()))

    def _dispatch(self, handler: _Handler, req: Request, ns: Namespace | None) -> None:
        """Hand the command to a worker thread."""
        if self._closed:
            raise NvmeStatusError(Status.INTERNAL, "the I/O command set is closed")
        # a Read or Write whose first part already moved is not abortable (see abort())
        abortable = not (isinstance(handler, _Rest) and handler.done)
        depth = min(int(getattr(ns.backend, "queue_depth", 0)), MAX_WORKERS) if ns is not None else 0
        with self._cond:
            if self._pool is None or depth > self._pool_size:
                # a backend that completes many commands at once (a network connection) gets
                # as many workers, each waiting for its command: the queue depth reaches it
                old, self._pool_size = self._pool, max(self._pool_size, depth)
                self._pool = ThreadPoolExecutor(self._pool_size, thread_name_prefix="nvme-io")
                if old is not None:
                    old.shutdown(wait=False)  # (its queued commands still run; drain() counts them)
            self._busy[req] = time.monotonic()
            if abortable:
                self._queued.add(req)
            try:
                # (under the lock: another thread's growth would shut this pool down between)
                self._pool.submit(self._run, handler, req, ns)
            except BaseException:
                self._queued.discard(req)
                self._busy.pop(req, None)
                if not self._busy:
                    self._cond.notify_all()
                raise

    def abort(self, req: Request) -> bool:
        """Abort ``req`` if a worker has not started it yet: it completes now with Command
        Abort Requested and the worker skips it. Backend I/O already issued is never
        cancelled (data integrity first): a command whose I/O began, or a Read or Write
        whose first part moved on the submitting thread, is not aborted.

        :returns: whether the command was aborted (it then completed here, exactly once).
        """
        with self._cond:
            if req not in self._queued:
                return False
            self._queued.discard(req)
        self._complete(req, Status.ABORT_REQUESTED, 0,
                       error=NvmeStatusError(Status.ABORT_REQUESTED, "aborted by an Abort command", dnr=False))
        return True

    def _run(self, handler: _Handler, req: Request, ns: Namespace | None) -> None:
        with self._cond:
            if req in self._queued:
                self._queued.discard(req)
            elif not (isinstance(handler, _Rest) and handler.done):  # taken by abort(), which completed it
                self._done(req)
                return
        try:
            dw0 = self._execute(handler, req, ns)
        except BaseException as exc:
            self._fail(req, exc)
        else:
            try:
                self._complete(req, 0, dw0)
            except Exception:  # pragma: no cover - the core's own failure
                log.exception("completing %r failed", req)
        finally:
            self._done(req)

    def _done(self, req: Request) -> None:
        with self._cond:
            self._busy.pop(req, None)
            if not self._busy:
                self._cond.notify_all()

    def _fail(self, req: Request, exc: BaseException) -> None:
        """Complete ``req`` with the status ``exc`` stands for."""
        try:
            self._fail_status(req, exc)
        finally:
            # The traceback holds the failed command's frames (and through them guest
            # memory views); a backend may keep the exception object: drop them.
            exc.__traceback__ = None

    def _fail_status(self, req: Request, exc: BaseException) -> None:
        if isinstance(exc, NvmeStatusError):
            err = exc
        elif isinstance(exc, DmaError):
            err = NvmeStatusError(Status.DATA_TRANSFER_ERROR, str(exc), param_offset=OFF_DPTR1)
        elif isinstance(exc, OSError):
            write = req.opcode in _WRITE_PROTECTED or req.opcode in (Opcode.DSM, Opcode.FLUSH)
            status = _os_status(exc, write=write, flush=req.opcode == Opcode.FLUSH)
            err = NvmeStatusError(status, f"backend: {exc}")
            if status in (Status.UNRECOVERED_READ_ERROR, Status.WRITE_FAULT):
                self._media_error()
        elif isinstance(exc, Exception):
            log.exception("I/O command %r failed unexpectedly", req)
            err = NvmeStatusError(Status.INTERNAL, f"{type(exc).__name__}: {exc}")
        else:  # KeyboardInterrupt, SystemExit: complete, then let it propagate
            self._complete(req, Status.INTERNAL, 0)
            raise exc
        self._complete(req, err.status, 0, error=err)

    def _media_error(self) -> None:
        smart = getattr(self.ctrl, "smart", None)
        if smart is None:
            return
        record = getattr(smart, "record_media_error", None)
        if record is not None:
            record()
        else:
            try:
                smart.media_errors += 1
            except AttributeError:
                pass

    def drain(self, deadline: float | None = None) -> None:
        """Wait until every command handed to the workers has completed.

        :param deadline: ``time.monotonic()`` by which they must have (None: no limit).
        :raises QuiesceTimeoutError: commands were still in flight at the deadline; they go
            on, and complete later. The message names their namespaces and the oldest
            command with its age (:meth:`describe_busy`).
        """
        with self._cond:
            while self._busy:
                if deadline is None:
                    self._cond.wait()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QuiesceTimeoutError(f"nvme: backend I/O in flight did not complete in time: "
                                              f"{self.describe_busy()}")
                self._cond.wait(left)

    def describe_busy(self) -> str:
        """The commands with the workers, for an error message: how many, on which
        namespaces, and the oldest one with how long it has waited ("" when none)."""
        with self._cond:
            busy = list(self._busy.items())
        if not busy:
            return ""
        now = time.monotonic()
        nsids = sorted({req.nsid for req, _ in busy})
        spaces = ", ".join("all (broadcast Flush)" if n == _BROADCAST else str(n) for n in nsids)
        req, since = min(busy, key=lambda item: item[1])
        what = _OPCODE_NAMES.get(req.opcode, f"command {req.opcode:#04x}")
        where = "all namespaces" if req.nsid == _BROADCAST else f"namespace {req.nsid}"
        return (f"{len(busy)} command(s) on namespace(s) {spaces}; the oldest, a {what} of {where} "
                f"(CID {req.cid} on SQ {req.sqid}), has waited {now - since:.3f} s")

    def close(self) -> None:
        """Drain, then stop the workers. Later submissions fail with Internal Error."""
        self._closed = True
        self.drain()
        with self._cond:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def offload(self, fn: Callable[[], None]) -> Future[None]:
        """Run ``fn`` on a worker thread (a migration's stop flushes the namespaces there:
        in parallel, and a flush that never returns holds a worker, not the quiesce).

        :returns: its future.
        """
        with self._cond:  # (submitted under the lock: a pool growth shuts the old pool down)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._pool_size, thread_name_prefix="nvme-io")
            return self._pool.submit(fn)

    @property
    def inflight(self) -> int:
        """Commands currently with the workers."""
        return len(self._busy)

    # -- helpers ------------------------------------------------------------------------

    def _rw_extent(self, req: Request, ns: Namespace, *, data: bool) -> tuple[int, int]:
        """Check SLBA/NLB (CDW10-12) and MDTS; return (byte offset, byte length)."""
        slba, nlb = lba_extent(req)
        if slba + nlb > ns.nlbas:
            raise _lba_range(slba, nlb, ns)
        shift = ns.lba_shift
        length = nlb << shift
        if data:
            mdts = self.ctrl.mdts_bytes
            if mdts and length > mdts:
                raise NvmeStatusError(
                    Status.INVALID_FIELD,
                    f"transfer of {length} bytes exceeds MDTS ({mdts} bytes)",
                    param_offset=_OFF_CDW12,
                )
        return slba << shift, length

    @overload
    def _segments(self, req: Request, length: int, *,
                  to_host: Literal[False]) -> tuple[GuestMemory, list[tuple[int, int]]]: ...

    @overload
    def _segments(self, req: Request, length: int, *,
                  to_host: bool) -> tuple[GuestMemory, Sequence[tuple[int | None, int]]]: ...

    def _segments(self, req: Request, length: int, *,
                  to_host: bool) -> tuple[GuestMemory, Sequence[tuple[int | None, int]]]:
        """Guest memory and the data pointer's pieces for ``length`` bytes."""
        ctrl = self.ctrl
        mem = ctrl.dma
        if not req.flags & 0xC0:
            prp1 = req.prp1
            page = ctrl.page_size
            if not prp1 & 3 and length <= page - (prp1 & (page - 1)):
                return mem, [(prp1, length)]
            return mem, prp_segments(mem, prp1, req.prp2, length, page)
        return mem, data_segments(mem, req, length, ctrl.page_size, to_host=to_host)

    @staticmethod
    def _views(mem: GuestMemory, segs: Iterable[tuple[int, int]], write: bool) -> list[memoryview]:
        try:
            return mem.sg_views(segs, write=write)
        except NvmeStatusError:  # (Invalid Use of Controller Memory Buffer)
            raise
        except DmaError as exc:
            raise NvmeStatusError(
                Status.DATA_TRANSFER_ERROR, str(exc), param_offset=OFF_DPTR1
            ) from None

    def _fetch(self, req: Request, length: int) -> bytearray:
        """Copy ``length`` bytes of host data (DSM ranges, Copy descriptors) out of guest memory."""
        mem, segs = self._segments(req, length, to_host=False)
        buf = bytearray(length)
        views = self._views(mem, segs, False)
        try:
            pos = 0
            for v in views:
                n = len(v)
                buf[pos : pos + n] = v
                pos += n
        finally:
            for v in views:
                v.release()
        return buf

    def _durable(self, cdw12: int) -> bool:
        """Whether a write must be on stable storage when it completes: FUA (CDW12
        bit 30) is set, or the host disabled the volatile write cache (Feature 06h)."""
        return bool(cdw12 & (1 << 30)) or not self.ctrl.volatile_write_cache

    def _check_marks(self, ns: Namespace, slba: int, nlb: int) -> None:
        """Unrecovered Read Error if a block of the range is marked by Write Uncorrectable
        (a range past the namespace's end is left to the LBA range check: LBA Out of Range
        comes first)."""
        if slba + nlb > ns.nlbas:
            return
        lba = self.uncorrectable.first_marked(ns.nsid, slba, nlb)
        if lba is not None:
            self._media_error()
            raise NvmeStatusError(Status.UNRECOVERED_READ_ERROR,
                                  f"LBA {lba:#x} of namespace {ns.nsid} is marked uncorrectable", lba=lba)

    def _check_dulbe(self, ns: Namespace, slba: int, nlb: int) -> None:
        """Deallocated or Unwritten Logical Block (DNR) if Error Recovery DULBE is set for
        ``ns`` and a block of the range is deallocated or was never written (a range past the
        namespace's end is left to the LBA range check)."""
        if not self.dulbe(ns.nsid) or slba + nlb > ns.nlbas or nlb <= 0:
            return
        lba = first_deallocated(ns, slba, nlb)
        if lba is not None:
            raise NvmeStatusError(Status.DEALLOCATED_OR_UNWRITTEN,
                                  f"LBA {lba:#x} of namespace {ns.nsid} is deallocated or unwritten (DULBE)",
                                  lba=lba)

    def _check_writable(self, ns: Namespace) -> None:
        if ns.read_only:
            raise NvmeStatusError(
                Status.NS_WRITE_PROTECTED, f"namespace {ns.nsid} is write protected"
            )

    # -- commands -----------------------------------------------------------------------

    def _read(self, req: Request, ns: Namespace, done: int = 0, stripes: list[int] | None = None) -> int:
        """Read (``done``: bytes already read into the front of the buffer; ``stripes``: its
        block locks, when the fast path found them)."""
        if ns.ms:
            if self.uncorrectable.active:
                self._check_marks(ns, *lba_extent(req))
            self._check_dulbe(ns, *lba_extent(req))
            return self._protected.read(req, ns)
        offset, length = self._rw_extent(req, ns, data=True)
        if self.uncorrectable.active:
            self._check_marks(ns, offset >> ns.lba_shift, length >> ns.lba_shift)
        if not done:  # (a Read whose first part moved was checked before)
            self._check_dulbe(ns, offset >> ns.lba_shift, length >> ns.lba_shift)
        mem, segs = self._segments(req, length, to_host=True)
        backend = ns.backend
        shift = ns.lba_shift
        if _without_bit_buckets(segs):
            views = self._views(mem, segs, True)
            rest = _after(views, done)
            try:
                if rest:
                    if stripes is None:
                        stripes = self._span(ns, (offset + done) >> shift, (length - done) >> shift)
                    self._stable(stripes, lambda: backend.readv(rest, offset + done))
            finally:
                if rest is not views:
                    for v in rest:
                        v.release()
                for v in views:
                    v.release()
        elif len(segs) > 1:
            self._stable(self._span(ns, offset >> shift, length >> shift),
                         lambda: self._read_with_buckets(mem, segs, backend, offset))
        # else a single bit bucket: nothing to transfer
        count_read(self.ctrl, ns.nsid, length)
        return 0

    def _read_with_buckets(self, mem: GuestMemory, segs: Sequence[tuple[int | None, int]], backend: Backend,
                           offset: int) -> None:
        """A read whose SGL has bit buckets: read each run of real pieces where it lies."""
        # Validate every piece first, so nothing is read for a bad SGL.
        for v in self._views(mem, [(gpa, n) for gpa, n in segs if gpa is not None], True):
            v.release()
        pos = offset
        run: list[tuple[int, int]] = []
        run_start = pos
        for gpa, n in [*segs, (None, 0)]:
            if gpa is None:
                if run:
                    views = self._views(mem, run, True)
                    try:
                        backend.readv(views, run_start)
                    finally:
                        for v in views:
                            v.release()
                    run = []
                pos += n
                run_start = pos
            else:
                run.append((gpa, n))
                pos += n

    def _write(self, req: Request, ns: Namespace, done: int = 0, stripes: list[int] | None = None) -> int:
        """Write (``done``: bytes from the front of the buffer already written; ``stripes``:
        its block locks, when the fast path found them)."""
        self._check_writable(ns)
        if ns.ms:
            status = self._protected.write(req, ns)
            self.uncorrectable.clear(ns.nsid, *lba_extent(req))
            return status
        offset, length = self._rw_extent(req, ns, data=True)
        mem, segs = self._segments(req, length, to_host=False)
        views = self._views(mem, segs, False)
        rest = _after(views, done)
        shift = ns.lba_shift
        try:
            if rest:
                held = stripes if stripes is not None else self._span(ns, (offset + done) >> shift,
                                                                      (length - done) >> shift)
                if held is None:
                    ns.backend.writev(rest, offset + done, fua=self._durable(req.cdw12))
                else:
                    self._begin_write(held)
                    try:
                        ns.backend.writev(rest, offset + done, fua=self._durable(req.cdw12))
                    finally:
                        self.atomicity.blocks.end_write(held)
        finally:
            if rest is not views:
                for v in rest:
                    v.release()
            for v in views:
                v.release()
        self.uncorrectable.clear(ns.nsid, offset >> ns.lba_shift, length >> ns.lba_shift)
        count_write(self.ctrl, ns.nsid, length)
        return 0

    def _compare(self, req: Request, ns: Namespace) -> int:
        if ns.ms:
            self._check_marks(ns, *lba_extent(req))
            self._check_dulbe(ns, *lba_extent(req))
            return self._protected.compare(req, ns)
        offset, length = self._rw_extent(req, ns, data=True)
        self._check_marks(ns, offset >> ns.lba_shift, length >> ns.lba_shift)
        self._check_dulbe(ns, offset >> ns.lba_shift, length >> ns.lba_shift)
        mem, segs = self._segments(req, length, to_host=False)
        views = self._views(mem, segs, False)
        try:
            stored = bytearray(length)
            self._stable(self._span(ns, offset >> ns.lba_shift, length >> ns.lba_shift),
                         lambda: ns.backend.readv([memoryview(stored)], offset))
            pos = 0
            for v in views:
                n = len(v)
                if stored[pos : pos + n] != v:
                    for i in range(n):
                        if stored[pos + i] != v[i]:
                            break
                    lba = (offset + pos + i) >> ns.lba_shift
                    raise NvmeStatusError(
                        Status.COMPARE_FAILURE, f"data differs at LBA {lba:#x}", lba=lba
                    )
                pos += n
        finally:
            for v in views:
                v.release()
        count_read(self.ctrl, ns.nsid, length)
        return 0

    def _verify(self, req: Request, ns: Namespace) -> int:
        limit = self.verify_limit
        if limit and lba_extent(req)[1] << ns.lba_shift > limit:
            raise NvmeStatusError(Status.INVALID_FIELD, f"Verify of more than the Verify Size Limit ({limit} bytes)",
                                  param_offset=_OFF_CDW12)
        if ns.ms:
            self._check_marks(ns, *lba_extent(req))
            self._check_dulbe(ns, *lba_extent(req))
            return self._protected.verify(req, ns)
        offset, length = self._rw_extent(req, ns, data=False)
        self._check_marks(ns, offset >> ns.lba_shift, length >> ns.lba_shift)
        self._check_dulbe(ns, offset >> ns.lba_shift, length >> ns.lba_shift)
        req_len = length
        backend = ns.backend
        if backend.inline:  # memory cannot fail to read
            count_read(self.ctrl, ns.nsid, length)
            return 0
        buf = bytearray(min(length, VERIFY_CHUNK))
        mv = memoryview(buf)
        shift = ns.lba_shift
        try:
            while length:  # each chunk under its own block locks (a long Verify holds few at once)
                n = min(length, len(buf))
                chunk = mv[:n]
                try:
                    self._stable(self._span(ns, offset >> shift, n >> shift),
                                 functools.partial(backend.readv, [chunk], offset))
                finally:
                    chunk.release()
                offset += n
                length -= n
        finally:
            mv.release()
        count_read(self.ctrl, ns.nsid, req_len)
        return 0

    def _flush(self, req: Request, ns: Namespace) -> int:
        ns.flush()
        return 0

    def _flush_all(self, req: Request, ns: Namespace | None) -> int:
        # every attached namespace but those a Format NVM or a delete holds (their data goes;
        # a flush of one in flight when the claim came is waited for: io_inflight_for)
        for each in list(self.ctrl.namespaces.values()):
            if self.claim_status(each.nsid) is None:
                each.flush()
        return 0

    def _write_zeroes(self, req: Request, ns: Namespace) -> int:
        self._check_writable(ns)
        if ns.ms:
            status = self._protected.write_zeroes(req, ns)
            self.uncorrectable.clear(ns.nsid, *lba_extent(req))
            self.altered()
            return status
        offset, length = self._rw_extent(req, ns, data=False)
        cdw12 = req.cdw12
        backend = ns.backend
        with self._hold(((ns, offset >> ns.lba_shift, length >> ns.lba_shift),)):
            if cdw12 & (1 << 25):  # DEAC: deallocate (DLFEAT: reads return zeros)
                backend.deallocate(offset, length)
            else:
                backend.write_zeroes(offset, length)
        self.uncorrectable.clear(ns.nsid, offset >> ns.lba_shift, length >> ns.lba_shift)  # (after: done)
        self.altered()
        if self._durable(cdw12):
            backend.flush()
        return 0

    def _dsm(self, req: Request, ns: Namespace) -> int:
        nr = (req.cdw10 & 0xFF) + 1
        deallocate = bool(req.cdw11 & (1 << 2))
        raw = self._fetch(req, nr * _DSM_RANGE.size)
        ranges = []
        for i in range(nr):
            _attrs, nlb, slba = _DSM_RANGE.unpack_from(raw, i * _DSM_RANGE.size)
            if slba + nlb > ns.nlbas:
                raise NvmeStatusError(
                    Status.LBA_RANGE,
                    f"DSM range {i}: LBAs {slba:#x}+{nlb} exceed namespace {ns.nsid}",
                    lba=slba,
                )
            if nlb:
                ranges.append((slba, nlb))
        if deallocate and ranges:
            self._check_writable(ns)
            shift = ns.lba_shift
            with self.atomicity.hold_ranges(ns, [(slba, slba + nlb) for slba, nlb in ranges], write=True), \
                    self._hold([(ns, slba, nlb) for slba, nlb in ranges]):
                for slba, nlb in ranges:
                    if ns.ms:  # the metadata and the data, under the range's lock
                        self._protected.deallocate(ns, slba, nlb)
                    else:
                        ns.backend.deallocate(slba << shift, nlb << shift)
                    self.uncorrectable.clear(ns.nsid, slba, nlb)
            if not self.ctrl.volatile_write_cache:
                ns.flush()  # the data and the metadata
        return 0

    def _copy(self, req: Request, ns: Namespace) -> int:
        """Copy (descriptor formats 0h..3h) into namespace ``ns`` (see :meth:`_copy_sources`
        for the checks); the source namespaces of formats 2h and 3h are held against a
        Format NVM (:meth:`copying_from`) until it completes."""
        self._check_writable(ns)
        cdw12 = req.cdw12
        nr = cdw12 & 0xFF
        desfmt = (cdw12 >> 8) & 0xF
        if desfmt > 3 or not OCFS >> desfmt & 1:
            raise NvmeStatusError(
                Status.INVALID_FIELD, f"Copy descriptor format {desfmt} is not supported",
                param_offset=_OFF_CDW12 + 1,
            )
        if desfmt >= 2 and not self.copy_formats_enabled() >> desfmt & 1:
            raise NvmeStatusError(
                Status.INVALID_FIELD,
                f"Copy descriptor format {desfmt} is not enabled (Host Behavior Support CDFE)",
                param_offset=_OFF_CDW12 + 1,
            )
        problem = copy_format_problem(ns, desfmt, cdw12)
        if problem is not None:
            raise problem
        msrc = COPY_LIMITS[2]
        if nr > msrc:
            raise NvmeStatusError(
                Status.CMD_SIZE_LIMIT_EXCEEDED, f"{nr + 1} source ranges exceed {msrc + 1}",
                param_offset=_OFF_CDW12,
            )
        entry = _COPY_ENTRY[desfmt]
        raw = self._fetch(req, (nr + 1) * entry.size)
        others = {n for n in _copy_snsids(raw, desfmt, nr + 1) if n != ns.nsid}
        if not others:
            return self._copy_checked(req, ns, raw, desfmt)
        with self._cond:
            for n in others:
                self._copying_from[n] = self._copying_from.get(n, 0) + 1
        try:
            return self._copy_checked(req, ns, raw, desfmt)
        finally:
            with self._cond:
                for n in others:
                    left = self._copying_from[n] - 1
                    if left:
                        self._copying_from[n] = left
                    else:
                        del self._copying_from[n]

    def copying_from(self, nsids: set[int]) -> bool:
        """Whether a Copy (format 2h or 3h) reading one of ``nsids`` as a source namespace
        is running (a Format NVM of the namespace waits for it, as for the I/O to it).

        :param nsids: namespace identifiers.
        """
        with self._cond:
            return any(n in self._copying_from for n in nsids)

    def _copy_checked(self, req: Request, ns: Namespace, raw: bytearray, desfmt: int) -> int:
        sources = self._copy_sources(req, ns, raw, desfmt)
        sdlba = req.cdw10 | req.cdw11 << 32
        total = sum(src.nlb for src in sources)
        if sdlba + total > ns.nlbas:
            raise _lba_range(sdlba, total, ns)
        if desfmt >= 2:
            for src in sources:
                if src.ns is ns and src.slba < sdlba + total and sdlba < src.slba + src.nlb:
                    raise NvmeStatusError(
                        Status.OVERLAPPING_IO_RANGE,
                        f"source LBAs {src.slba:#x}+{src.nlb} overlap the destination {sdlba:#x}+{total}",
                        lba=src.slba,
                    )
        for src in sources:
            try:
                self._check_marks(src.ns, src.slba, src.nlb)
                self._check_dulbe(src.ns, src.slba, src.nlb)
            except NvmeStatusError as exc:
                exc.nsid = src.ns.nsid  # (the error is the source namespace's, at its LBA)
                raise
        # the block locks of the destination and of every source range (on namespaces that
        # hold them: those without a larger atomic unit; the range claims of the others are
        # taken inside, one at a time, and those with metadata take their own RangeLocks
        # inside those)
        with self._hold([(ns, sdlba, total), *((src.ns, src.slba, src.nlb) for src in sources)]):
            return self._copy_data(req, ns, sources, sdlba, total)

    def _copy_data(self, req: Request, ns: Namespace, sources: Sequence[CopySource], sdlba: int, total: int) -> int:
        """Read the source ranges and write them at SDLBA (checked, under the block locks)."""
        cdw12 = req.cdw12
        protected = bool(ns.ms or any(src.ns.ms for src in sources))
        shift = ns.lba_shift  # (every source has the destination's block size)
        buf = bytearray(total << shift)
        metas: list[bytearray] = [bytearray()] * len(sources)
        starts = list(itertools.accumulate((src.nlb for src in sources), initial=0))
        # Each source namespace's ranges are read under one shared claim, then the
        # destination is written under its exclusive one: one claim at a time, so copies
        # between namespaces in opposite directions never wait for each other, and a
        # namespace is held only while its own blocks move.
        by_ns: dict[int, list[int]] = {}
        for i, src in enumerate(sources):
            by_ns.setdefault(src.ns.nsid, []).append(i)
        mv = memoryview(buf)
        try:
            for indexes in by_ns.values():
                sns = sources[indexes[0]].ns
                claim = [(sources[i].slba, sources[i].slba + sources[i].nlb) for i in indexes]
                try:
                    with self.atomicity.hold_ranges(sns, claim, write=False):
                        for i in indexes:
                            src = sources[i]
                            part = mv[starts[i] << shift:starts[i + 1] << shift]
                            if protected:
                                metas[i] = self._protected.copy_read(req, ns, src, part)
                            else:
                                sns.backend.readv([part], src.slba << shift)
                except NvmeStatusError as exc:
                    if exc.nsid is None:  # (the error is the source namespace's, at its LBA)
                        exc.nsid = sns.nsid
                    raise
            with self.atomicity.hold_ranges(ns, ((sdlba, sdlba + total),), write=True):
                if protected:
                    self._protected.copy_write(req, ns, buf, bytearray().join(metas), sdlba)
                else:
                    ns.backend.writev([mv], sdlba << shift, fua=self._durable(cdw12))
                    count_write(self.ctrl, ns.nsid, len(buf))
                self.uncorrectable.clear(ns.nsid, sdlba, total)  # (after the write: it took)
        finally:
            mv.release()
        return 0

    def _copy_sources(self, req: Request, ns: Namespace, raw: bytearray, desfmt: int) -> list[CopySource]:
        """The source ranges of a Copy into ``ns``, each checked, in the order a range meets
        the checks: its source namespace (formats 2h, 3h: 0, FFFFFFFFh or not attached is
        Invalid Namespace, one being formatted Format In Progress with DNR clear, one being deleted
        Namespace Not Ready), MSSRL and MCL (Command
        Size Limit Exceeded), the namespaces' compatibility (:func:`copy_incompatible`),
        its LBAs on the source namespace (LBA Out of Range), SOPT Fast Copy Only (Fast Copy
        Not Possible: no copy is a fast one), CETYPE (Invalid Field: no command extension
        is supported)."""
        mssrl, mcl, _msrc = COPY_LIMITS
        namespaces = self.ctrl.namespaces
        cdw12 = req.cdw12
        entry = _COPY_ENTRY[desfmt]
        sources: list[CopySource] = []
        total = 0
        for i in range(len(raw) // entry.size):
            snsid, slba, nlb0, sopt, ref, app, mask = _copy_entry(raw, desfmt, i)
            sns = ns
            if snsid is not None and snsid != ns.nsid:
                found = namespaces.get(snsid) if snsid not in (0, _BROADCAST) else None
                if found is None:
                    raise NvmeStatusError(Status.INVALID_NSID,
                                          f"source range {i}: namespace {snsid:#x} is not attached")
                claimed = self.claim_status(snsid)
                if claimed is not None:  # (as I/O to it: a format ends, a deleted namespace does not come back)
                    formatting = claimed == Status.FORMAT_IN_PROGRESS
                    raise NvmeStatusError(claimed, f"source range {i}: namespace {snsid} is being "
                                          + ("formatted" if formatting else "deleted"), dnr=not formatting)
                sns = found
            nlb = nlb0 + 1
            if nlb > mssrl:
                raise NvmeStatusError(
                    Status.CMD_SIZE_LIMIT_EXCEEDED,
                    f"source range {i} has {nlb} blocks, more than {mssrl}",
                )
            total += nlb
            if total > mcl:
                raise NvmeStatusError(
                    Status.CMD_SIZE_LIMIT_EXCEEDED, f"Copy of more than {mcl} blocks"
                )
            if desfmt >= 2:
                problem = copy_incompatible(sns, ns, cdw12)
                if problem is not None:
                    raise problem
            if slba + nlb > sns.nlbas:
                raise NvmeStatusError(
                    Status.LBA_RANGE,
                    f"source range {i}: LBAs {slba:#x}+{nlb} exceed namespace {sns.nsid}",
                    lba=slba, nsid=sns.nsid,
                )
            if sopt & _SOPT_FCO:
                raise NvmeStatusError(Status.FAST_COPY_NOT_POSSIBLE,
                                      f"source range {i} asks for a fast copy (SOPT.FCO): none is")
            cetype = raw[i * entry.size + _COPY_CETYPE_BYTE] & 0xF
            if cetype:
                raise NvmeStatusError(Status.INVALID_FIELD,
                                      f"source range {i} has a command extension (CETYPE {cetype}): none is supported")
            sources.append(CopySource(sns, slba, nlb, ref, app, mask))
        return sources

    def _write_uncorrectable(self, req: Request, ns: Namespace) -> int:
        """Write Uncorrectable: mark SLBA..SLBA+NLB; the data underneath stays as it was,
        reads fail until the blocks are written or deallocated (:mod:`pcidev_nvme.uncorrectable`)."""
        self._check_writable(ns)
        slba, nlb = lba_extent(req)
        if slba + nlb > ns.nlbas:
            raise _lba_range(slba, nlb, ns)
        with self._hold(((ns, slba, nlb),)):
            marked = self.uncorrectable.mark(ns.nsid, slba, nlb)
        if not marked:
            raise NvmeStatusError(Status.CAP_EXCEEDED, "too many blocks are marked uncorrectable", lba=slba)
        self.uncorrectable.sync(ns.nsid)  # the mark is on disk when the command completes
        self.altered()
        return 0
