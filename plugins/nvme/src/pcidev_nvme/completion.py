"""Completions of :class:`~pcidev_nvme.controller.NvmeController` (mixed into it):
:meth:`CompletionMixin.complete` is the command sets' way back (see ``ControllerPort``
in :mod:`pcidev_nvme.request`). A completion goes to its request's CQ, or waits in the
CQ's backlog while the CQ is full; a failed command adds an Error Information entry.
Completions made during a doorbell batch (on the batch's thread) are posted together at
its end (:meth:`CompletionMixin._complete_batch`): one lock, one memory write and one
interrupt per CQ. The entries themselves are written by
:meth:`~pcidev_nvme.queues.CompletionQueue.post_batch`, the only CQE writer.
"""

from __future__ import annotations

import logging
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

__all__ = ["CompletionMixin"]

log = logging.getLogger(__name__)



class CompletionMixin:
    """Posting completions (see the module docstring)."""

    _tls: BatchState
    _gen: int
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
        thread) are posted together when it ends, one interrupt per queue.
        """
        tls = self._tls
        if tls.depth:
            tls.done.append((req, status, dw0, dw1, error))
            return
        sq = req.sq
        if sq is None:
            log.error("complete() of a request that did not come from a queue: %r", req)
            return
        cq = sq.cq
        sf = status_field(status, dnr=error.dnr if error is not None else True) if status else 0
        posted = False
        stale = False
        cid = req.cid
        phase = 0
        try:
            with cq.lock:
                if req.done:
                    log.warning("%r completed twice; the second completion is ignored", req)
                    return
                req.done = True
                inflight = sq.inflight
                if inflight.get(cid) is req:
                    del inflight[cid]
                if req.gen != self._gen or sq.gone or cq.gone:
                    stale = True
                else:
                    tail = cq.tail
                    nxt = tail + 1
                    if nxt == cq.size:
                        nxt = 0
                    if cq.backlog or nxt == cq.head:
                        # still reserved until posted (parked requests never were)
                        if req.parked:
                            cq.reserved += 1
                        # the phase it will be posted with: backlog entries take the slots
                        # from the tail on, in order
                        phase = cq.phase ^ (((tail + len(cq.backlog)) // cq.size) & 1)
                        cq.backlog.append((sq, cid, sf, dw0 & 0xFFFFFFFF, dw1 & 0xFFFFFFFF))
                    else:
                        if not req.parked:
                            cq.reserved -= 1
                        mem = self.dma  # DmaError without memory or Bus Master
                        phase = cq.phase
                        cq.post_batch(mem, ((dw0 & 0xFFFFFFFF, dw1 & 0xFFFFFFFF, sq.head, sq.sqid,
                                             cid | (phase << 16) | (sf << 17)),))
                        posted = True
        except DmaError as exc:
            self._fatal(f"cannot post a completion to CQ {cq.cqid}: {exc}")
            return
        if stale:
            self._stale_completed()
            return
        if status:
            self._log_error(req, sf, phase, error)
        if sq.sqid:
            self.smart.record_busy(req.t_fetch, time.monotonic())
        if posted and cq.ien:
            self.interrupts.signal(cq, 1)
        if sq.deleting and not sq.inflight:
            self._finish_sq_delete(sq)
        if cq.throttled:
            self._kick_throttled(cq)

    def _complete_batch(self, items: list[Deferred], tls: BatchState) -> None:
        """Post the completions deferred during a batch: one lock and one memory write
        per completion queue, then each entry's phase dword in order."""
        first_cq = items[0][0].sq.cq
        if all(it[0].sq.cq is first_cq for it in items):
            groups = [(first_cq, items)]
        else:
            by_cq: dict[CompletionQueue, list[Deferred]] = {}
            for it in items:
                by_cq.setdefault(it[0].sq.cq, []).append(it)
            groups = list(by_cq.items())
        gen = self._gen
        for cq, its in groups:
            entries: list[CqeFields] = []
            errors: list[tuple[Request, int, int, NvmeStatusError | None]] = []
            deleting: list[SubmissionQueue] = []
            stale = False
            try:
                with cq.lock:
                    tail, head, size, phase = cq.tail, cq.head, cq.size, cq.phase
                    backlog = cq.backlog
                    posted_reserved = 0
                    for req, status, dw0, dw1, error in its:
                        if req.done:
                            log.warning("%r completed twice; the second completion is ignored", req)
                            continue
                        req.done = True
                        sq = req.sq
                        cid = req.cid
                        inflight = sq.inflight
                        if inflight.get(cid) is req:
                            del inflight[cid]
                        if sq.deleting:
                            deleting.append(sq)
                        if req.gen != gen or sq.gone or cq.gone:
                            stale = True
                            continue
                        sf = status_field(status, dnr=error.dnr if error is not None else True) if status else 0
                        nxt = tail + 1
                        if nxt == size:
                            nxt = 0
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
                        mem = self.dma  # DmaError without memory or Bus Master
                        cq.post_batch(mem, entries)
                        cq.reserved -= posted_reserved
            except DmaError as exc:
                self._fatal(f"cannot post completions to CQ {cq.cqid}: {exc}")
                return
            if stale:
                self._stale_completed()
            for req, sf, ph, error in errors:
                self._log_error(req, sf, ph, error)
            if entries and cq.ien:
                tls.cqs[cq] = tls.cqs.get(cq, 0) + len(entries)
            for sq in deleting:
                if sq.deleting and not sq.inflight:
                    self._finish_sq_delete(sq)
            if cq.throttled:
                self._kick_throttled(cq)

    def _log_error(self, req: Request, sf: int, phase: int, error: NvmeStatusError | None) -> None:
        self.error_log.add(sqid=req.sqid, cid=req.cid, status_field=sf, phase=phase,
                           param_offset=error.param_offset if error is not None else None,
                           lba=(error.lba or 0) if error is not None else 0,
                           nsid=req.nsid)
