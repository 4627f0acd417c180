"""Submission and completion queues and their migration state.

A :class:`CompletionQueue` posts 16-byte entries with the phase tag
(:meth:`CompletionQueue.post_batch`, the only place that writes the CQE layout),
keeps a *backlog* of completions that arrive while it is full (posted in arrival
order, exactly once, as soon as the host frees slots:
:meth:`CompletionQueue.drain_backlog`) and counts the requests fetched for it that
have not completed yet (:attr:`CompletionQueue.reserved`), which the controller uses
to stop fetching before a backlog could grow without bound.

A :class:`SubmissionQueue` holds its ring state and the requests in flight (by
command identifier); the controller's fetch loop (:mod:`pcidev_nvme.fetch`) reads new
entries with :meth:`SubmissionQueue.fetch`. :class:`QueueSetMixin` gives the controller
its queue lookup, creation and deletion.

Each queue exposes ``snapshot()`` (a frozen :class:`CqState` / :class:`SqState`, the
``nvme/cq`` and ``nvme/sq`` vmstate descriptions) and ``restore(state)``.

CQE layout::

    00  DW0 (command specific)
    04  DW1 (command specific)
    08  SQ head pointer (15:0) | SQ identifier (31:16)
    0C  CID (15:0) | phase tag (16) | status field (31:17)

All entries of a batch are written in one go, the first one with the stale phase;
then the dword holding the first entry's phase tag, with release ordering
(:meth:`~pcidev.dma.GuestMemory.store32`). A host reads entries in order, so it
looks at none of the batch before that store, and then sees all of it.
"""

from __future__ import annotations

import collections
import struct
import threading
import time
from collections.abc import Sequence
from itertools import starmap
from typing import TYPE_CHECKING, Annotated, Protocol

import attrs

from pcidev.dma import GuestMemory
from pcidev.vmstate import U8, U16, U32, U64, Bool, Mask, Range, VarArray, vmstate
from pcidev_nvme.limits import CQE_SIZE, SQE_SIZE
from pcidev_nvme.request import Request
from pcidev_nvme.status import NvmeStatusError

#: opcode of Asynchronous Event Request (admin), for the AERs a restore re-parks
_AER_OPCODE = 0x0C

__all__ = [
    "CompletionQueue", "SubmissionQueue", "QueueSetMixin", "CqState", "SqState", "CqeState", "CQE_SIZE",
    "SQE_SIZE", "MAX_BACKLOG"
]

#: most completions a CQ's backlog may carry in a migration stream
MAX_BACKLOG = 65536

#: the fields of a completion queue entry: (dw0, dw1, sq_head, sqid, cid | phase << 16 | status << 17)
CqeFields = tuple[int, int, int, int, int]

#: a completion waiting in a full CQ: (sq, cid, status_field, dw0, dw1)
BacklogEntry = tuple["SubmissionQueue", int, int, int, int]

_CQE = struct.Struct("<IIHHI")  # DW0, DW1, SQ head, SQ id, CID | phase << 16 | status << 17
assert _CQE.size == CQE_SIZE


def _ring_problem(q: CqState | SqState) -> tuple[str, str] | None:
    """The invariant of a saved queue: its head and tail are slots of the ring (the
    queue's size against MQES is the controller's check)."""
    if q.head >= q.size:
        return f"head {q.head} outside a queue of {q.size}", "head"
    if q.tail >= q.size:
        return f"tail {q.tail} outside a queue of {q.size}", "tail"
    return None


@vmstate("nvme/cqe")
@attrs.frozen
class CqeState:
    """A completion parked in a full CQ's backlog (posted in order once the host frees slots)."""

    sqid: U16
    cid: U16
    status: Annotated[U16, Mask(0x7FFF)]  # the 15-bit status field
    dw0: U32
    dw1: U32


@vmstate("nvme/cq", check=_ring_problem)
@attrs.frozen
class CqState:
    """A completion queue: its ring, interrupt vector and backlog."""

    cqid: U16
    base: Annotated[U64, Mask(~3 & (2**64 - 1))]  # dword aligned (Create I/O CQ's PRP1)
    size: Annotated[U32, Range(2, 0x10000)]
    vector: U16
    ien: Bool
    head: U32
    tail: U32
    phase: Annotated[U8, Range(0, 1)]
    backlog: VarArray[CqeState, MAX_BACKLOG] = ()


@vmstate("nvme/sq", check=_ring_problem)
@attrs.frozen
class SqState:
    """A submission queue: its ring and the CQ it posts to."""

    sqid: U16
    cqid: U16
    base: Annotated[U64, Mask(~63 & (2**64 - 1))]  # 64-byte aligned (one entry)
    size: Annotated[U32, Range(2, 0x10000)]
    head: U32
    tail: U32
    qprio: Annotated[U8, Range(0, 3)] = 0


class CompletionQueue:
    """One completion queue (admin or I/O).

    :param cqid: queue identifier (0 = admin).
    :param base: guest address of entry 0 (physically contiguous).
    :param size: number of entries (2..65536).
    :param vector: interrupt vector.
    :param ien: interrupts enabled.
    """

    __slots__ = ("cqid", "base", "size", "vector", "ien", "head", "tail", "phase", "lock", "backlog",
                 "reserved", "sqs", "throttled", "db_addr", "ei_addr", "posted_total", "gone")

    def __init__(self, cqid: int, base: int, size: int, vector: int, ien: bool) -> None:
        self.cqid = cqid
        self.base = base
        self.size = size
        self.vector = vector
        self.ien = ien
        self.head = 0
        self.tail = 0
        self.phase = 1
        self.lock = threading.Lock()
        #: completions waiting for room: (sq, cid, status_field, dw0, dw1)
        self.backlog: collections.deque[BacklogEntry] = collections.deque()
        #: requests fetched for this CQ, not yet posted or backlogged (parked AERs excluded)
        self.reserved = 0
        #: submission queues bound to this CQ
        self.sqs: list[SubmissionQueue] = []
        #: submission queues that stopped fetching because this CQ had no room
        self.throttled: set[SubmissionQueue] = set()
        #: shadow doorbell (CQ head) and EventIdx addresses, when the doorbell buffer is on
        self.db_addr: int | None = None
        self.ei_addr: int | None = None
        self.posted_total = 0
        self.gone = False

    # -- state ---------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Entries posted that the host has not consumed yet."""
        return (self.tail - self.head) % self.size

    def full(self) -> bool:
        """No free slot (one slot always stays empty)."""
        return (self.tail + 1) % self.size == self.head

    def room(self) -> int:
        """Free slots."""
        return self.size - 1 - (self.tail - self.head) % self.size

    def valid_head(self, value: int) -> bool:
        """Whether ``value`` is a head the host may write: it may not pass the tail."""
        if value >= self.size:
            return False
        return (value - self.head) % self.size <= (self.tail - self.head) % self.size

    # -- posting (call with :attr:`lock` held) ---------------------------------------------
    def post_batch(self, mem: GuestMemory, entries: Sequence[CqeFields]) -> None:
        """Write ``entries`` at the tail on and advance it (the only writer of CQEs).

        :param mem: guest memory.
        :param entries: ``(dw0, dw1, sqhd, sqid, dw3)`` with ``dw3 = cid | phase << 16 |
            status_field << 17`` and the phase each slot is posted with; at most
            :meth:`room` of them.
        :raises DmaError: if the queue memory is not writable guest memory.
        """
        start = self.tail
        size = self.size
        n = len(entries)
        packed = list(starmap(_CQE.pack, entries))
        # The first entry goes out with the stale phase and gets its phase dword last:
        # the host reads entries in order, so it looks at none of the batch until that
        # store, which is ordered after everything else.
        dw0, dw1, sqhd, sqid, first_dw3 = entries[0]
        packed[0] = _CQE.pack(dw0, dw1, sqhd, sqid, first_dw3 ^ 0x10000)
        blob = b"".join(packed)
        first = size - start
        base = self.base
        if n <= first:
            mem.write(base + (start << 4), blob)
        else:
            mv = memoryview(blob)
            mem.write(base + (start << 4), mv[:16 * first])
            mem.write(base, mv[16 * first:])
        mem.store32(base + (start << 4) + 12, first_dw3)
        if start + n >= size:
            self.phase ^= 1
        slot = start + n
        self.tail = slot if slot < size else slot - size
        self.posted_total += n

    def drain_backlog(self, mem: GuestMemory) -> int:
        """Post backlogged completions while there is room; returns how many.

        :raises DmaError: if the queue memory is not writable guest memory.
        """
        backlog = self.backlog
        n = min(len(backlog), self.room())
        if not n:
            return 0
        tail, size, phase = self.tail, self.size, self.phase
        entries = []
        for _ in range(n):
            sq, cid, sf, dw0, dw1 = backlog.popleft()
            entries.append((dw0, dw1, sq.head, sq.sqid, cid | (phase << 16) | (sf << 17)))
            tail += 1
            if tail == size:
                tail = 0
                phase ^= 1
        self.post_batch(mem, entries)
        self.reserved -= n
        return n

    # -- state ---------------------------------------------------------------------------
    def snapshot(self) -> CqState:
        """The queue's state (takes :attr:`lock`)."""
        with self.lock:
            backlog = tuple(CqeState(sqid=s.sqid, cid=cid, status=sf, dw0=dw0, dw1=dw1)
                            for s, cid, sf, dw0, dw1 in self.backlog)
            return CqState(cqid=self.cqid, base=self.base, size=self.size, vector=self.vector,
                           ien=bool(self.ien), head=self.head, tail=self.tail, phase=self.phase,
                           backlog=backlog)

    @classmethod
    def from_state(cls, state: CqState) -> CompletionQueue:
        """A new queue with the identity of ``state`` (its ring state follows by :meth:`restore`)."""
        return cls(state.cqid, state.base, state.size, state.vector, state.ien)

    def restore(self, state: CqState, sqs: Sequence[SubmissionQueue | None] = ()) -> None:
        """Take the ring state and backlog of ``state``.

        :param state: a checked state of this queue.
        :param sqs: submission queues by id (for the backlog entries).
        """
        with self.lock:
            self.head, self.tail, self.phase = state.head, state.tail, state.phase
            self.backlog.clear()
            for e in state.backlog:
                sq = sqs[e.sqid]
                assert sq is not None, "migration.check: a backlog entry names an SQ of this CQ"
                self.backlog.append((sq, e.cid, e.status, e.dw0, e.dw1))
            self.reserved = len(state.backlog)  # parked completions stay reserved until posted

    def attach(self, sq: SubmissionQueue) -> None:
        """Bind ``sq`` to this queue (it posts here)."""
        self.sqs.append(sq)

    def set_shadow(self, db_addr: int | None, ei_addr: int | None) -> None:
        """Shadow doorbell (CQ head) and EventIdx addresses (None: MMIO doorbell only)."""
        self.db_addr = db_addr
        self.ei_addr = ei_addr

    def __repr__(self) -> str:
        return (f"<CQ {self.cqid} size={self.size} head={self.head} tail={self.tail} phase={self.phase} "
                f"iv={self.vector} ien={self.ien} backlog={len(self.backlog)} reserved={self.reserved}>")


class SubmissionQueue:
    """One submission queue (admin or I/O).

    :param sqid: queue identifier (0 = admin).
    :param base: guest address of entry 0.
    :param size: number of entries.
    :param cq: the completion queue it posts to.
    :param qprio: priority class (unused: round robin only).
    """

    __slots__ = ("sqid", "base", "size", "cq", "qprio", "head", "tail", "lock", "running", "rerun",
                 "inflight", "deleting", "delete_req", "db_addr", "ei_addr", "gone", "fetched_total")

    def __init__(self, sqid: int, base: int, size: int, cq: CompletionQueue, qprio: int = 0) -> None:
        self.sqid = sqid
        self.base = base
        self.size = size
        self.cq = cq
        self.qprio = qprio
        self.head = 0
        self.tail = 0
        self.lock = threading.Lock()
        self.running = False
        self.rerun = False
        #: fetched commands not completed yet, by CID
        self.inflight: dict[int, Request] = {}
        #: a Delete I/O SQ is waiting for the in-flight commands
        self.deleting = False
        self.delete_req: Request | None = None
        self.db_addr: int | None = None
        self.ei_addr: int | None = None
        self.gone = False
        self.fetched_total = 0

    @property
    def pending(self) -> int:
        """Entries the host submitted that the controller has not fetched."""
        return (self.tail - self.head) % self.size

    def fetch(self, mem: GuestMemory, n: int) -> bytes:
        """Read the ``n`` entries from the head on (``n`` <= :attr:`pending`) and advance the head.

        :raises DmaError: if the queue memory is not readable guest memory (the head stays).
        """
        head, size, base = self.head, self.size, self.base
        end = head + n
        if end <= size:
            raw = mem.read(base + head * SQE_SIZE, n * SQE_SIZE)
        else:
            raw = (mem.read(base + head * SQE_SIZE, (size - head) * SQE_SIZE)
                   + mem.read(base, (end - size) * SQE_SIZE))
        self.head = end % size
        self.fetched_total += n
        return raw

    def snapshot(self) -> SqState:
        """The queue's state."""
        return SqState(sqid=self.sqid, cqid=self.cq.cqid, base=self.base, size=self.size, head=self.head,
                       tail=self.tail, qprio=self.qprio)

    @classmethod
    def from_state(cls, state: SqState, cq: CompletionQueue) -> SubmissionQueue:
        """A new queue with the identity of ``state``, bound to ``cq``."""
        sq = cls(state.sqid, state.base, state.size, cq, state.qprio)
        sq.restore(state)
        return sq

    def restore(self, state: SqState) -> None:
        """Take the ring state (head, tail) of ``state``."""
        self.head, self.tail = state.head, state.tail

    def set_shadow(self, db_addr: int | None, ei_addr: int | None) -> None:
        """Shadow doorbell (SQ tail) and EventIdx addresses (None: MMIO doorbell only)."""
        self.db_addr = db_addr
        self.ei_addr = ei_addr

    def __repr__(self) -> str:
        return (f"<SQ {self.sqid} size={self.size} head={self.head} tail={self.tail} cq={self.cq.cqid} "
                f"inflight={len(self.inflight)}>")


class ShadowBinder(Protocol):
    """What :class:`QueueSetMixin` uses of the controller's
    :class:`~pcidev_nvme.doorbells.ShadowDoorbells`."""

    @property
    def enabled(self) -> bool: ...

    def bind(self, q: SubmissionQueue | CompletionQueue, mem: GuestMemory | None = None) -> None: ...


class LegacyInterrupts(Protocol):
    """What :class:`QueueSetMixin` uses of the controller's
    :class:`~pcidev_nvme.interrupts.Interrupts`."""

    @property
    def irq_status(self) -> int: ...

    def legacy_update(self, unmasked: int = 0) -> None: ...


class QueueSetMixin:
    """The queues of :class:`~pcidev_nvme.controller.NvmeController` (mixed into it): lookup,
    creation and deletion for the admin command set, parked requests (AERs)."""

    _sqs: list[SubmissionQueue | None]
    _cqs: list[CompletionQueue | None]
    _gen: int

    if TYPE_CHECKING:  # provided by the other parts of NvmeController
        @property
        def shadow(self) -> ShadowBinder: ...

        @property
        def interrupts(self) -> LegacyInterrupts: ...

        def _dma_or_none(self) -> GuestMemory | None: ...

        def complete(self, req: Request, status: int = 0, dw0: int = 0, dw1: int = 0, *,
                     error: NvmeStatusError | None = None) -> None: ...

    def _init_queues(self, count: int) -> None:
        """The queue tables: ``count`` queue ids (admin + I/O), all unused."""
        self._sqs = [None] * count
        self._cqs = [None] * count

    @property
    def submission_queues(self) -> list[SubmissionQueue | None]:
        """Submission queues by id (read only: queues change through admin commands)."""
        return self._sqs

    @property
    def completion_queues(self) -> list[CompletionQueue | None]:
        """Completion queues by id (read only)."""
        return self._cqs

    def install_queues(self, sqs: list[SubmissionQueue | None], cqs: list[CompletionQueue | None]) -> None:
        """Use restored queues (indexed by queue id, as many as this controller has)."""
        self._sqs[:] = sqs
        self._cqs[:] = cqs

    def clear_queues(self) -> None:
        """Forget every queue (a controller reset or a restore); each is marked gone."""
        for i in range(len(self._sqs)):
            sq, cq = self._sqs[i], self._cqs[i]
            if sq is not None:
                sq.gone = True
            if cq is not None:
                cq.gone = True
            self._sqs[i] = None
            self._cqs[i] = None

    def restore_parked_aers(self, cids: tuple[int, ...]) -> list[Request]:
        """Parked Asynchronous Event Requests on the admin SQ with these CIDs (restored
        outstanding AERs); they are in flight on the admin SQ."""
        asq = self._sqs[0]
        out = []
        now = time.monotonic()
        for cid in cids:
            # migration.check: outstanding AERs only on a ready controller, which has an admin SQ
            assert asq is not None
            sqe = bytes([_AER_OPCODE, 0]) + cid.to_bytes(2, "little") + bytes(SQE_SIZE - 4)
            req = Request(0, cid, _AER_OPCODE, 0, sqe, sq=asq, gen=self._gen, t_fetch=now, parked=True)
            asq.inflight[cid] = req
            out.append(req)
        return out

    def park(self, req: Request) -> None:
        """Hold ``req`` indefinitely (an AER): it no longer counts against its CQ's fetch budget."""
        cq = req.sq.cq
        with cq.lock:
            req.parked = True
            cq.reserved -= 1

    def unpark(self, req: Request) -> None:
        cq = req.sq.cq
        with cq.lock:
            req.parked = False
            cq.reserved += 1

    def io_inflight_for(self, nsids: set[int]) -> bool:
        """Whether an I/O command for one of ``nsids`` is in flight (one for every namespace,
        NSID FFFFFFFFh -- a Flush -- counts for each)."""
        for sq in list(self._sqs[1:]):
            if sq is not None and any(r.nsid in nsids or r.nsid == 0xFFFFFFFF for r in list(sq.inflight.values())):
                return True
        return False

    def io_queues_exist(self) -> bool:
        return any(q is not None for q in self._sqs[1:]) or any(q is not None for q in self._cqs[1:])

    def sq(self, qid: int) -> SubmissionQueue | None:
        """The submission queue ``qid``, or None."""
        return self._sqs[qid] if 0 <= qid < len(self._sqs) else None

    def cq(self, qid: int) -> CompletionQueue | None:
        """The completion queue ``qid``, or None."""
        return self._cqs[qid] if 0 <= qid < len(self._cqs) else None

    def add_cq(self, cq: CompletionQueue) -> None:
        if self.shadow.enabled:
            self.shadow.bind(cq, self._dma_or_none())
        self._cqs[cq.cqid] = cq

    def add_sq(self, sq: SubmissionQueue) -> None:
        if self.shadow.enabled:
            self.shadow.bind(sq, self._dma_or_none())
        sq.cq.attach(sq)
        self._sqs[sq.sqid] = sq

    def delete_cq(self, cq: CompletionQueue) -> None:
        with cq.lock:
            cq.gone = True
        self._cqs[cq.cqid] = None
        if self.interrupts.irq_status:
            self.interrupts.legacy_update()

    def delete_sq(self, sq: SubmissionQueue, req: Request) -> bool:
        """Start deleting ``sq``. Returns True if done now; else ``req`` completes when the
        commands in flight on it have."""
        self._sqs[sq.sqid] = None
        with sq.cq.lock:
            sq.deleting = True
            sq.delete_req = req
            sq.cq.throttled.discard(sq)
            done = not sq.inflight
        if done:
            self._finish_sq_delete(sq, complete=False)
        return done

    def _finish_sq_delete(self, sq: SubmissionQueue, *, complete: bool = True) -> None:
        with sq.cq.lock:
            if sq.gone:
                return
            sq.gone = True
            if sq in sq.cq.sqs:
                sq.cq.sqs.remove(sq)
            req, sq.delete_req = sq.delete_req, None
        if complete and req is not None:
            self.complete(req)
