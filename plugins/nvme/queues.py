"""Submission and completion queues, interrupt vectors and the controller's timer.

A :class:`CompletionQueue` posts 16-byte entries with the phase tag, keeps a
*backlog* of completions that arrive while it is full (posted in arrival order,
exactly once, as soon as the host frees slots) and counts the requests fetched
for it that have not completed yet (:attr:`CompletionQueue.reserved`), which the
controller uses to stop fetching before a backlog could grow without bound.

A :class:`SubmissionQueue` only holds its ring state and the requests in flight
(by command identifier); fetching lives in the controller.

CQE layout::

    00  DW0 (command specific)
    04  DW1 (command specific)
    08  SQ head pointer (15:0) | SQ identifier (31:16)
    0C  CID (15:0) | phase tag (16) | status field (31:17)

The first 12 bytes are written first and the dword holding the phase tag last,
with release ordering (:meth:`~pcidev.dma.GuestMemory.store32`), so a host that
sees the new phase also sees the rest of the entry.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pcidev_nvme.limits import CQE_SIZE, SQE_SIZE

if TYPE_CHECKING:
    from pcidev.dma import GuestMemory

__all__ = ["CompletionQueue", "SubmissionQueue", "InterruptVector", "Timer", "CQE_SIZE", "SQE_SIZE"]

log = logging.getLogger(__name__)

_CQE_HEAD = struct.Struct("<IIHH")
_CQE_FULL = struct.Struct("<IIHHI")


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
        self.backlog: collections.deque = collections.deque()
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
    def post(self, mem: GuestMemory, sqhd: int, sqid: int, cid: int, sf: int, dw0: int, dw1: int) -> int:
        """Write one entry at the tail and advance it; returns the phase used.

        :param sf: the 15-bit status field (DNR/More/SCT/SC).
        :raises DmaError: if the queue memory is not writable guest memory.
        """
        tail = self.tail
        addr = self.base + (tail << 4)
        phase = self.phase
        mem.write_struct(_CQE_HEAD, addr, dw0 & 0xFFFFFFFF, dw1 & 0xFFFFFFFF, sqhd, sqid)
        mem.store32(addr + 12, cid | (phase << 16) | (sf << 17))
        tail += 1
        if tail == self.size:
            tail = 0
            self.phase = phase ^ 1
        self.tail = tail
        self.posted_total += 1
        return phase

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
        self.inflight: dict[int, Any] = {}
        #: a Delete I/O SQ is waiting for the in-flight commands
        self.deleting = False
        self.delete_req: Any = None
        self.db_addr: int | None = None
        self.ei_addr: int | None = None
        self.gone = False
        self.fetched_total = 0

    @property
    def pending(self) -> int:
        """Entries the host submitted that the controller has not fetched."""
        return (self.tail - self.head) % self.size

    def __repr__(self) -> str:
        return (f"<SQ {self.sqid} size={self.size} head={self.head} tail={self.tail} cq={self.cq.cqid} "
                f"inflight={len(self.inflight)}>")


class InterruptVector:
    """Per-vector interrupt state: coalescing disable (feature 09h) and aggregation.

    :param index: vector number.
    """

    __slots__ = ("index", "cd", "count", "armed", "masked_pending")

    def __init__(self, index: int) -> None:
        self.index = index
        #: Coalescing Disable
        self.cd = False
        #: completions aggregated since the last interrupt
        self.count = 0
        #: a coalescing deadline is scheduled
        self.armed = False
        #: (INTx/MSI) an interrupt is due when INTMS unmasks the vector
        self.masked_pending = False


class Timer:
    """A single background thread running callbacks at deadlines (coalescing
    time, keep-alive). Started on first use; :meth:`close` stops it."""

    def __init__(self, name: str = "nvme-timer") -> None:
        self.name = name
        self._heap: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def schedule(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the timer thread after ``delay`` seconds."""
        with self._cond:
            if self._closed:
                return
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._heap:
                        left = self._heap[0][0] - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    else:
                        self._cond.wait()
                if self._closed:
                    return
                _, _, fn, args = heapq.heappop(self._heap)
            try:
                fn(*args)
            except Exception:  # a timer callback must never kill the thread
                log.exception("timer callback %r failed", fn)

    def cancel_all(self) -> None:
        """Drop every scheduled callback."""
        with self._cond:
            self._heap.clear()

    def close(self) -> None:
        """Stop the thread (scheduled callbacks are dropped)."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
