"""Completions of :class:`~pcidev_nvme.controller.NvmeController` (mixed into it):
:meth:`CompletionMixin.complete` is the command sets' way back (see ``ControllerPort``
in :mod:`pcidev_nvme.request`). A completion goes to its request's CQ, or waits in the
CQ's backlog while the CQ is full; a failed command adds an Error Information entry.
Completions made during a doorbell batch (on the batch's thread) are posted together at
its end (:meth:`CompletionMixin._complete_batch`): one lock and one memory write per CQ,
one interrupt per vector. Completions made outside a batch (backend I/O finishing on
worker threads, timers) are *combined*: they join a shared list, and the thread that
finds no other thread posting posts the whole list (and whatever the others add
meanwhile) the same way; the poster counts as a batch in progress, so a quiesce
(``batches_idle``) waits for it. The entries themselves are written by
:meth:`~pcidev_nvme.queues.CompletionQueue.post_batch`, the only CQE writer.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from pcidev.dma import GuestMemory
from pcidev.errors import DmaError
from pcidev_nvme.fetch import BatchState, Deferred
from pcidev_nvme.interrupts import Interrupts
from pcidev_nvme.logs import ErrorLog, SmartCounters
from pcidev_nvme.queues import CompletionQueue, CqeFields, SubmissionQueue
from pcidev_nvme.request import Request
from pcidev_nvme.status import NvmeStatusError, status_field

__all__ = ["COMBINE_ROUNDS", "CompletionMixin"]

log = logging.getLogger(__name__)

#: rounds of combined completions one thread posts before it leaves the posting role
COMBINE_ROUNDS = 8


class CompletionMixin:
    """Posting completions (see the module docstring)."""

    _tls: BatchState
    _gen: int
    _batches: int
    _batch_lock: threading.Lock
    _combined: list[Deferred]
    _combine_lock: threading.Lock
    _posting: bool
    name: str
    error_log: ErrorLog
    interrupts: Interrupts
    smart: SmartCounters

    if TYPE_CHECKING:  # provided by the other parts of NvmeController
        @property
        def dma(self) -> GuestMemory: ...

        def _fatal(self, why: str) -> None: ...

        def _stale_completed(self) -> None: ...

        def _finish_sq_delete(self, sq: SubmissionQueue, *, complete: bool = True) -> None: ...

        def _kick_throttled(self, cq: CompletionQueue) -> None: ...

        def _end_batch(self, tls: BatchState) -> None: ...

        def _cq_refresh_head(self, cq: CompletionQueue, mem: GuestMemory, tail: int) -> bool: ...

        def _cq_arm(self, cq: CompletionQueue, mem: GuestMemory, *, post: bool = True) -> int: ...

    def complete(self, req: Request, status: int = 0, dw0: int = 0, dw1: int = 0, *,
                 error: NvmeStatusError | None = None) -> None:
        """Post the completion of ``req`` (thread-safe; call exactly once per request).

        The entry goes to the request's completion queue, or waits in its backlog
        while the queue is full. A non-zero ``status`` adds an Error Information
        log entry (parameter location and LBA from ``error`` when given).

        :param req: the request from the submission queue.
        :param status: ``SCT << 8 | SC`` (see :class:`~pcidev_nvme.status.Status`).
        :param dw0: completion DW0.
        :param dw1: completion DW1.
        :param error: the exception the status came from, if any.

        Completions made while a doorbell write is being processed (on that same
        thread) are posted together when it ends, one interrupt per vector; others
        may be posted by another thread that is posting at the time (see the module
        docstring), shortly after this returns.
        """
        tls = self._tls
        if tls.depth:
            tls.done.append((req, status, dw0, dw1, error))
            return
        if req.sq is None:
            log.error("complete() of a request that did not come from a queue: %r", req)
            return
        # Outside a batch (a worker thread, a timer): combine. The completion joins the
        # shared list; the thread that finds no poster running becomes the poster and
        # posts everything the others add meanwhile, one interrupt per vector.
        with self._combine_lock:
            self._combined.append((req, status, dw0, dw1, error))
            if self._posting:
                return
            self._posting = True
            with self._batch_lock:  # a quiesce waits for the poster (batches_idle)
                self._batches += 1
        self._post_combined(tls)

    def _init_completion(self) -> None:
        """No combined completions pending and no poster running."""
        #: completions made outside a batch, waiting for the poster
        self._combined = []
        self._combine_lock = threading.Lock()
        #: a thread is posting :attr:`_combined` (it counts as a batch in progress)
        self._posting = False

    def _post_combined(self, tls: BatchState) -> None:
        """Post the combined completions until none are left (the poster's loop).

        Each round's interrupts are raised at once (a steady stream of completions
        does not delay them), and after :data:`COMBINE_ROUNDS` rounds the thread
        leaves the posting role with its last round taken: the next completion's
        thread becomes the poster, so that no thread is kept posting indefinitely.
        """
        tls.depth += 1
        rounds = 0
        try:
            while True:
                with self._combine_lock:
                    items = self._combined
                    if not items:
                        self._posting = False
                        break
                    self._combined = []
                    rounds += 1
                    last = rounds >= COMBINE_ROUNDS
                    if last:  # hand off: what comes after this round goes to a new poster
                        self._posting = False
                start = 0.0
                for it in items:
                    req = it[0]
                    if req.sqid and (not start or req.t_fetch < start):
                        start = req.t_fetch
                self._complete_batch(items, tls)
                if start:
                    self.smart.record_busy(start, time.monotonic())
                cqs = tls.cqs
                if cqs:
                    tls.cqs = {}
                    self.interrupts.signal_many(cqs)
                if last:
                    break
        except BaseException:
            with self._combine_lock:
                self._posting = False
            raise
        finally:
            tls.depth -= 1
            try:
                self._end_batch(tls)
            finally:
                with self._batch_lock:
                    self._batches -= 1

    def _complete_batch(self, items: list[Deferred], tls: BatchState) -> None:
        """Post the completions deferred during a batch: one lock, one memory write and
        one release store per completion queue (entries of one queue in order).

        If posting fails (guest memory that is not, or a bug), the controller is
        fatally failed and every completion not posted yet is dropped as a stale one
        (its request done and out of its SQ's in-flight table, so that a reset finishes).
        """
        while items:
            try:
                items = self._post_to_cq(items[0][0].sq.cq, items, tls)
            except DmaError as exc:
                self._fatal(f"cannot post completions to CQ {items[0][0].sq.cq.cqid}: {exc}")
                self._drop_completions(items)
                return
            except Exception as exc:  # a bug: nothing may stay in flight forever
                log.exception("%s: posting %d completions failed unexpectedly", self.name, len(items))
                self._fatal(f"internal error posting completions: {type(exc).__name__}: {exc}")
                self._drop_completions(items)
                return

    def _drop_completions(self, items: list[Deferred]) -> None:
        """Completions that will not be posted (the controller failed): each request is
        done and leaves its SQ's in-flight table, as a stale one."""
        deleting: set[SubmissionQueue] = set()
        for it in items:
            req = it[0]
            sq = req.sq
            with sq.cq.lock:
                if req.done:
                    continue
                req.done = True
                if sq.inflight.get(req.cid) is req:
                    del sq.inflight[req.cid]
            if sq.deleting:
                deleting.add(sq)
        for sq in deleting:
            if sq.deleting and not sq.inflight:
                self._finish_sq_delete(sq)
        self._stale_completed()

    def _post_to_cq(self, cq: CompletionQueue, items: list[Deferred], tls: BatchState) -> list[Deferred]:
        """Post the completions of ``items`` that go to ``cq``; returns the others, in order.

        :raises DmaError: the queue or its shadow buffers are not guest memory (the
            requests of ``cq`` taken so far are done and out of their in-flight tables).
        """
        gen = self._gen
        rest: list[Deferred] = []
        entries: list[CqeFields] = []
        errors: list[tuple[Request, int, int, NvmeStatusError | None]] = []
        deleting: list[SubmissionQueue] = []
        stale = False
        try:
            with cq.lock:
                tail, head, size, phase = cq.tail, cq.head, cq.size, cq.phase
                backlog = cq.backlog
                backlogged = len(backlog)
                shadowed = cq.db_addr is not None and cq.cqid != 0
                cq_gone = cq.gone
                mem: GuestMemory | None = None
                posted_reserved = 0
                drained = 0
                for req, status, dw0, dw1, error in items:
                    sq = req.sq
                    if sq.cq is not cq:
                        rest.append((req, status, dw0, dw1, error))
                        continue
                    if req.done:
                        log.warning("%r completed twice; the second completion is ignored", req)
                        continue
                    req.done = True
                    cid = req.cid
                    other = sq.inflight.pop(cid, None)
                    if other is not req and other is not None:  # (a CID conflict's: not in flight)
                        sq.inflight[cid] = other
                    if sq.deleting:
                        deleting.append(sq)
                    if req.gen != gen or sq.gone or cq_gone:
                        stale = True
                        continue
                    sf = status_field(status, dnr=error.dnr if error is not None else True) if status else 0
                    nxt = tail + 1
                    if nxt == size:
                        nxt = 0
                    if nxt == head and shadowed and not backlog:
                        # full as far as the last doorbell says: the host may have
                        # consumed more and written only the shadow head
                        if mem is None:
                            mem = self.dma
                        self._cq_refresh_head(cq, mem, cq.tail)  # (only what was written)
                        head = cq.head
                    if backlog or nxt == head:
                        if req.parked:
                            cq.reserved += 1
                        if status:  # with the phase it will be posted with
                            errors.append((req, sf, phase ^ (((tail + len(backlog)) // size) & 1), error))
                        backlog.append((sq, cid, sf, dw0 & 0xFFFFFFFF, dw1 & 0xFFFFFFFF))
                        continue
                    if not req.parked:
                        posted_reserved += 1
                    entries.append((dw0 & 0xFFFFFFFF, dw1 & 0xFFFFFFFF, sq.head, sq.sqid,
                                    cid | (phase << 16) | (sf << 17)))
                    if status:
                        errors.append((req, sf, phase, error))
                    tail = nxt
                    if not nxt:
                        phase ^= 1
                if entries:
                    if mem is None:
                        mem = self.dma  # DmaError without memory or Bus Master
                    cq.post_batch(mem, entries)
                    cq.reserved -= posted_reserved
                if shadowed and len(backlog) > backlogged:
                    # completions wait for room: the host must ring at its next head
                    drained = self._cq_arm(cq, mem if mem is not None else self.dma)
        finally:
            for sq in deleting:
                if sq.deleting and not sq.inflight:
                    self._finish_sq_delete(sq)
        if stale:
            self._stale_completed()
        for req, sf, ph, error in errors:
            self._log_error(req, sf, ph, error)
        if (entries or drained) and cq.ien:
            tls.cqs[cq] = tls.cqs.get(cq, 0) + len(entries) + drained
        if cq.throttled:
            self._kick_throttled(cq)
        return rest

    def _log_error(self, req: Request, sf: int, phase: int, error: NvmeStatusError | None) -> None:
        self.error_log.add(sqid=req.sqid, cid=req.cid, status_field=sf, phase=phase,
                           param_offset=error.param_offset if error is not None else None,
                           lba=(error.lba or 0) if error is not None else 0,
                           nsid=req.nsid if error is None or error.nsid is None else error.nsid)
