"""Abort (admin opcode 08h) of any outstanding command.

A command is outstanding from the moment the host rings its SQ tail doorbell until
its completion is posted. :class:`Aborts` decides, for the command CDW10 names (SQID
in bits 15:0, CID in bits 31:16):

* **still in the submission queue** (between the controller's head and the last tail
  the host rang, e.g. while its completion queue is full): the (SQID, CID) is
  remembered; when the controller fetches that entry it completes it at once with
  Command Abort Requested (00h/07h) without executing it. The Abort completes with
  DW0 bit 0 = 0 (aborted). A Delete I/O Submission Queue (or a controller reset)
  forgets the remembered aborts of its queue;
* **fetched, an I/O command waiting for a worker thread** (backends that may block):
  it completes now with Command Abort Requested and the worker skips it; DW0 bit 0 = 0;
* **fetched, an Asynchronous Event Request**: it completes with Command Abort
  Requested; DW0 bit 0 = 0;
* **anything else** -- an I/O command whose backend I/O has started (a read or write
  already issued to the file is never cancelled: data integrity first, the command
  completes as it would have), an I/O command of an inline backend (memory: it has
  completed before an Abort can see it), an admin command being executed (Format NVM,
  a flush), or no such command: not aborted, DW0 bit 0 = 1.

The Abort itself always succeeds (the spec's "Abort Command Limit Exceeded" cannot
happen: an Abort completes at once, so ACL = 3 in Identify Controller is never reached).
An aborted command completes exactly once.

:meth:`Aborts.snapshot` / :meth:`Aborts.restore` carry the remembered aborts of
commands not fetched yet (:class:`AbortsState`, an optional subsection of the
``nvme`` section: the SQ entries stay in guest memory and the destination fetches them).
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import attrs

from pcidev.dma import GuestMemory
from pcidev.errors import DmaError
from pcidev.vmstate import U16, VarArray, vmstate
from pcidev_nvme.limits import SQE_SIZE
from pcidev_nvme.request import Request

__all__ = ["Aborts", "AbortsState", "PendingAbort", "NOT_ABORTED", "ABORTED"]

#: Abort completion DW0: bit 0 = 0 the command was aborted, 1 it was not
ABORTED, NOT_ABORTED = 0, 1
#: most remembered aborts of commands not fetched yet
MAX_PENDING = 4096
#: submission queue entries read at once when an Abort searches a queue
_SCAN_ENTRIES = 1024


@vmstate("nvme/pending-abort")
@attrs.frozen
class PendingAbort:
    """An aborted command still in submission queue ``sqid``."""

    sqid: U16
    cid: U16


@vmstate("nvme/aborts")
@attrs.frozen
class AbortsState:
    """The aborts of commands the controller has not fetched yet."""

    pending: VarArray[PendingAbort, MAX_PENDING] = ()


class AbortHost(Protocol):
    """What :class:`Aborts` uses of the controller."""

    @property
    def dma(self) -> GuestMemory: ...
    def sq(self, qid: int) -> Any: ...


class _Target(Protocol):
    """Who may take a fetched command: the I/O command set and the asynchronous events."""

    def abort(self, req: Request) -> bool: ...


class Aborts:
    """Abort of outstanding commands (see the module docstring).

    :param ctrl: the controller (its queues and guest memory).
    :param io: takes an I/O command a worker has not started (``abort(req) -> bool``).
    :param aer: takes an outstanding Asynchronous Event Request (``abort(cid) -> bool``).
    """

    def __init__(self, ctrl: AbortHost, io: _Target, aer: Any) -> None:
        self.ctrl = ctrl
        self.io = io
        self.aer = aer
        self._lock = threading.Lock()
        self._pending: set[tuple[int, int]] = set()

    def abort(self, sqid: int, cid: int) -> int:
        """Execute an Abort of command ``cid`` of submission queue ``sqid``.

        A command still in its submission queue is remembered *before* the queue is
        searched, so a fetch racing with the search (a completion thread kicking a
        throttled queue) either finds the remembered abort and completes the command
        aborted, or fetched the entry before: then the abort is taken back and the
        command is treated as fetched (it is never both executed and reported aborted).

        :returns: the completion's DW0 (:data:`ABORTED` or :data:`NOT_ABORTED`).
        """
        sq = self.ctrl.sq(sqid)
        if sq is None or sq.gone or sq.deleting:
            return NOT_ABORTED
        req = sq.inflight.get(cid)
        if req is not None:
            return self._abort_fetched(sqid, cid, req)
        key = (sqid, cid)
        with self._lock:
            if key in self._pending:  # aborted already, not fetched yet
                return ABORTED
            if len(self._pending) >= MAX_PENDING:
                return NOT_ABORTED
            self._pending.add(key)
        if self._in_queue(sq, cid):
            return ABORTED  # not fetched when the search began: the fetch will find the abort
        with self._lock:
            if key not in self._pending:
                return ABORTED  # fetched meanwhile, and the fetch took the abort
            self._pending.discard(key)
        req = sq.inflight.get(cid)  # fetched meanwhile, before the abort was remembered
        return NOT_ABORTED if req is None else self._abort_fetched(sqid, cid, req)

    def _abort_fetched(self, sqid: int, cid: int, req: Request) -> int:
        """The Abort of a fetched command ``req``."""
        if req.done:
            return NOT_ABORTED
        if req.parked:
            return ABORTED if sqid == 0 and self.aer.abort(cid) else NOT_ABORTED
        if sqid != 0 and self.io.abort(req):
            return ABORTED
        return NOT_ABORTED

    def _in_queue(self, sq: Any, cid: int) -> bool:
        """Whether an entry with ``cid`` waits in ``sq`` between its head and tail (the
        ring is read in bulk, :data:`_SCAN_ENTRIES` entries at a time)."""
        head = sq.head
        n = (sq.tail - head) % sq.size
        if not n:
            return False
        want = cid.to_bytes(2, "little")
        try:
            mem = self.ctrl.dma
            while n:
                count = min(n, sq.size - head, _SCAN_ENTRIES)
                raw = mem.read(sq.base + head * SQE_SIZE, count * SQE_SIZE)
                for off in range(2, count * SQE_SIZE, SQE_SIZE):
                    if raw[off:off + 2] == want:
                        return True
                head = (head + count) % sq.size
                n -= count
        except DmaError:
            return False
        return False

    @property
    def active(self) -> bool:
        """Some fetched command may be one to abort (the fetch loop's cheap test)."""
        return bool(self._pending)

    def take(self, sqid: int, cid: int) -> bool:
        """At fetch: whether command ``cid`` of ``sqid`` was aborted before it was fetched
        (it then completes with Command Abort Requested, unexecuted)."""
        with self._lock:
            if (sqid, cid) in self._pending:
                self._pending.discard((sqid, cid))
                return True
        return False

    def forget_queue(self, sqid: int | None = None) -> None:
        """The queue (None: every queue) was deleted or the controller reset."""
        with self._lock:
            if sqid is None:
                self._pending.clear()
            else:
                self._pending = {p for p in self._pending if p[0] != sqid}

    # -- state -------------------------------------------------------------------------
    def snapshot(self) -> AbortsState | None:
        """The remembered aborts, or None if there are none."""
        with self._lock:
            pending = sorted(self._pending)
        return AbortsState(pending=tuple(PendingAbort(s, c) for s, c in pending)) if pending else None

    def restore(self, state: AbortsState | None) -> None:
        """Take the remembered aborts of ``state`` (None: none)."""
        with self._lock:
            self._pending = set() if state is None else {(p.sqid, p.cid) for p in state.pending}
