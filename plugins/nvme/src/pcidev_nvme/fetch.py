"""The fetch loop of :class:`~pcidev_nvme.controller.NvmeController` (mixed into it):
a doorbell (or a completion freeing room in a throttled CQ) *kicks* a submission
queue; :class:`FetchMixin` reads the new entries in one batch
(:meth:`~pcidev_nvme.queues.SubmissionQueue.fetch`), decodes them and hands each to
the admin or I/O command set on the same thread. Interrupts, kicks and the
completions made during a batch are deferred to its end (:class:`BatchState`): one
CQE write and one interrupt per completion queue.

With shadow doorbells the new SQ tail is read from the shadow buffer, and the
EventIdx published after the batch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pcidev.dma import GuestMemory
from pcidev.errors import DmaError
from pcidev_nvme import aer as aer_mod
from pcidev_nvme.abort import Aborts
from pcidev_nvme.admin import AdminCommandSet
from pcidev_nvme.doorbells import ShadowDoorbells
from pcidev_nvme.interrupts import Interrupts
from pcidev_nvme.io import IoCommandSet
from pcidev_nvme.limits import FETCH_BATCH, SQE_SIZE
from pcidev_nvme.logs import SmartCounters
from pcidev_nvme.namespace import Namespace
from pcidev_nvme.queues import CompletionQueue, SubmissionQueue
from pcidev_nvme.registers import DOORBELL_BASE
from pcidev_nvme.request import SQE, Request
from pcidev_nvme.status import NvmeStatusError, Status

__all__ = ["BatchState", "FetchMixin"]

log = logging.getLogger(__name__)

#: a completion made during a batch, posted at its end: (request, status, dw0, dw1, error)
Deferred = tuple[Request, int, int, int, "NvmeStatusError | None"]


class BatchState(threading.local):
    """Per-thread state of a doorbell batch: interrupts and kicks are deferred to its end."""

    def __init__(self) -> None:
        self.depth = 0
        self.start = 0.0
        self.io = False
        self.cqs: dict[CompletionQueue, int] = {}
        self.kicks: list[SubmissionQueue] = []
        #: completions made on this thread during the batch, posted at its end
        self.done: list[Deferred] = []


class FetchMixin:
    """Fetch and dispatch of :class:`~pcidev_nvme.controller.NvmeController` (see the module
    docstring; uses its queues, command sets, ``interrupts``, ``smart`` and ``complete``)."""

    _tls: BatchState
    _sqs: list[SubmissionQueue | None]
    _batches: int
    _batch_lock: threading.Lock
    _running: bool
    _gen: int
    _formatting: dict[int, int]
    namespaces: dict[int, Namespace]
    name: str
    admin: AdminCommandSet
    io: IoCommandSet
    aborts: Aborts
    smart: SmartCounters
    interrupts: Interrupts
    shadow: ShadowDoorbells

    if TYPE_CHECKING:  # provided by the other parts of NvmeController
        @property
        def dma(self) -> GuestMemory: ...

        def keep_alive(self, now: float | None = None) -> None: ...

        def _fatal(self, why: str) -> None: ...

        def complete(self, req: Request, status: int = 0, dw0: int = 0, dw1: int = 0, *,
                     error: NvmeStatusError | None = None) -> None: ...

        def _complete_batch(self, items: list[Deferred], tls: BatchState) -> None: ...

        def _doorbell_error(self, info: int, qid: int, offset: int, value: int) -> None: ...

        def _sq_event_idx(self, sq: SubmissionQueue, mem: GuestMemory) -> bool: ...

    def _init_fetch(self) -> None:
        """No batch in progress on any thread."""
        self._tls = BatchState()
        #: doorbell/kick batches in progress on any thread
        self._batches = 0
        self._batch_lock = threading.Lock()

    def fetch_idle(self) -> bool:
        """No doorbell or kick batch in progress and no SQ being fetched."""
        return not self._batches and not any(sq is not None and sq.running for sq in list(self._sqs))

    def batches_idle(self) -> bool:
        """No doorbell or kick batch in progress on any thread."""
        return not self._batches

    def kick_all(self) -> None:
        """Fetch every live submission queue (after a resume: what was submitted meanwhile)."""
        for sq in list(self._sqs):
            if sq is not None and not sq.gone:
                self._kick(sq)

    def _kick_throttled(self, cq: CompletionQueue) -> None:
        with cq.lock:
            sqs = list(cq.throttled)
            cq.throttled.clear()
        tls = self._tls
        if tls.depth:
            tls.kicks.extend(sqs)
        else:
            for sq in sqs:
                if not sq.gone:
                    self._kick(sq)

    def _kick(self, sq: SubmissionQueue) -> None:
        """Fetch and dispatch what the host submitted on ``sq`` (unless another thread already is)."""
        with sq.lock:
            if sq.running:
                sq.rerun = True
                return
            sq.running = True
        tls = self._tls
        self._enter_batch(tls)
        try:
            while True:
                self._process_sq(sq)
                with sq.lock:
                    if not sq.rerun:
                        sq.running = False
                        break
                    sq.rerun = False
        except BaseException:
            with sq.lock:
                sq.running = False
                sq.rerun = False
            raise
        finally:
            self._leave_batch(tls)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """A burst of guest accesses (see :meth:`pcidev.device.PciDevice.batch`): the
        doorbell writes inside it form one batch, so their completions are posted and
        their interrupts raised once, at its end (one per completion queue and vector)."""
        tls = self._tls
        self._enter_batch(tls)
        try:
            yield
        finally:
            self._leave_batch(tls)

    def _enter_batch(self, tls: BatchState) -> None:
        if not tls.depth:
            tls.start = time.monotonic()
            with self._batch_lock:
                self._batches += 1
            self.io.begin_batch(tls.done)
        tls.depth += 1

    def _leave_batch(self, tls: BatchState) -> None:
        tls.depth -= 1
        if not tls.depth:
            try:
                self._end_batch(tls)
            finally:
                with self._batch_lock:
                    self._batches -= 1

    def _end_batch(self, tls: BatchState) -> None:
        self.io.end_batch()
        if tls.done:
            done, tls.done = tls.done, []
            self._complete_batch(done, tls)
        if tls.io:
            tls.io = False
            self.smart.record_busy(tls.start, time.monotonic())
        while tls.cqs or tls.kicks:
            cqs, tls.cqs = tls.cqs, {}
            if cqs:
                self.interrupts.signal_many(cqs)
            kicks, tls.kicks = tls.kicks, []
            for sq in kicks:
                if not sq.gone:
                    self._kick(sq)

    def _internal_error(self, req: Request, exc: Exception) -> None:
        """A command set raised (a bug): complete ``req`` with Internal Error unless done."""
        log.exception("%s: command %r failed unexpectedly", self.name, req, exc_info=exc)
        if not req.done:
            self.complete(req, Status.INTERNAL, error=NvmeStatusError(Status.INTERNAL, str(exc)))

    def _process_sq(self, sq: SubmissionQueue) -> None:
        if sq.gone or sq.deleting:
            return
        try:
            mem = self.dma
        except DmaError as exc:
            if self._running:
                self._fatal(f"SQ {sq.sqid}: {exc}")
            return
        if self._running:
            if not self._fetch_sq(sq, mem):
                return
        # The EventIdx for the current policy, whether or not anything was fetched (a
        # value another policy left, a lazy one from before a migration, is replaced).
        if sq.ei_addr is not None:
            try:
                if self._sq_event_idx(sq, mem) and self._running:
                    # the host wrote the shadow tail before it saw this EventIdx and did
                    # not ring: fetch once more (a paused controller fetches at its resume)
                    with sq.lock:
                        sq.rerun = True
            except DmaError:
                pass

    def _fetch_sq(self, sq: SubmissionQueue, mem: GuestMemory) -> bool:
        """Fetch and dispatch the entries of ``sq`` up to its tail (shadow or MMIO).
        Returns False if the controller failed (nothing more is done for ``sq``)."""
        try:
            if sq.db_addr is not None:
                tail = mem.load32(sq.db_addr)
                if tail >= sq.size:
                    self._doorbell_error(aer_mod.INFO_INVALID_DB_VALUE, sq.sqid, DOORBELL_BASE + 8 * sq.sqid, tail)
                    return True
                sq.tail = tail
        except DmaError as exc:
            self._fatal(f"SQ {sq.sqid}: {exc}")
            return False
        cq = sq.cq
        size = sq.size
        sqid = sq.sqid
        admin = sqid == 0
        if not admin:
            self._tls.io = True
        inflight = sq.inflight
        while self._running and not sq.gone:
            head = sq.head
            n = (sq.tail - head) % size
            if not n:
                break
            with cq.lock:
                budget = cq.size - 1 - cq.reserved
                if budget <= 0:
                    cq.throttled.add(sq)
                    break
                if n > budget:
                    n = budget
                if n > FETCH_BATCH:
                    n = FETCH_BATCH
                cq.reserved += n
            try:
                raw = sq.fetch(mem, n)
                if type(raw) is not bytes:  # requests keep it: never a buffer that may change
                    raw = bytes(raw)
            except DmaError as exc:
                with cq.lock:
                    cq.reserved -= n
                self._fatal(f"cannot fetch from SQ {sqid}: {exc}")
                return False
            now = time.monotonic()
            gen = self._gen
            formatting = self._formatting
            attached = self.namespaces
            aborts = self.aborts
            unpack = SQE.unpack_from
            new_request = object.__new__
            reqs: list[Request] = []
            for off in range(0, n * SQE_SIZE, SQE_SIZE):
                # decode_sqe, inline (the hot loop): raw is bytes, so the request keeps it
                req = new_request(Request)
                (req.opcode, req.flags, req.cid, req.nsid, req.cdw2, req.cdw3, req.mptr, req.prp1, req.prp2,
                 req.cdw10, req.cdw11, req.cdw12, req.cdw13, req.cdw14, req.cdw15) = unpack(raw, off)
                req.sqid = sqid
                req._raw = raw
                req._off = off
                req.ctx = None
                req.sq = sq
                req.gen = gen
                req.t_fetch = now
                req.done = False
                req.parked = False
                cid = req.cid
                if cid in inflight:
                    self.complete(req, Status.CMDID_CONFLICT,
                                  error=NvmeStatusError(Status.CMDID_CONFLICT, param_offset=2))
                    continue
                inflight[cid] = req
                if aborts.active and aborts.take(sqid, cid):  # aborted before it was fetched
                    self.complete(req, Status.ABORT_REQUESTED,
                                  error=NvmeStatusError(Status.ABORT_REQUESTED, "aborted before it was fetched",
                                                        dnr=False))
                    continue
                if admin:
                    try:
                        self.keep_alive(now)
                        self.admin.submit(req)
                    except Exception as exc:  # never lose a command to a bug
                        self._internal_error(req, exc)
                elif formatting and (claimed := formatting.get(req.nsid)) is not None and req.nsid in attached:
                    # claimed by a Format NVM (it ends: retry later, DNR clear) or a delete (it
                    # will not become ready: Namespace Not Ready, DNR set); one look, so a
                    # claim released meanwhile lets the command run; a namespace not attached
                    # here is Invalid Namespace, claimed or not (the command set says so)
                    self.complete(req, claimed,
                                  error=NvmeStatusError(claimed, dnr=claimed != Status.FORMAT_IN_PROGRESS))
                else:
                    reqs.append(req)
            if reqs:
                try:
                    self.io.submit_many(reqs)  # (completes each command itself, even on a bug)
                except Exception as exc:  # a bug: no command of the fetch is left without a completion
                    log.exception("%s: submitting %d I/O commands failed unexpectedly", self.name, len(reqs))
                    deferred = {id(d[0]) for d in self._tls.done}
                    for req in reqs:
                        if not req.done and id(req) not in deferred and inflight.get(req.cid) is req:
                            self.complete(req, Status.INTERNAL, error=NvmeStatusError(Status.INTERNAL, str(exc)))
        return True
