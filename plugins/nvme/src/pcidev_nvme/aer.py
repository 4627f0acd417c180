"""Asynchronous events: outstanding Asynchronous Event Request commands, queued
events and per-type masking.

An event is queued by :meth:`AsyncEvents.post`; it completes an outstanding
AER command (DW0 = type | info << 8 | log page << 16) as soon as one is there
and its type is not masked. Once an event of a type was reported, the type is
masked until the host reads the log page associated with *that* event with RAE
cleared (:meth:`AsyncEvents.log_read`), as NVMe Base 2.0 section 5.2 says: after
a Namespace Attribute Changed notice (log 04h) reading the Firmware Slot log
(03h) does not unmask notices. Events of a masked type wait in the queue. A duplicate of an event already queued is
dropped, and the queue is bounded.

:meth:`AsyncEvents.snapshot` / :meth:`AsyncEvents.restore` carry the outstanding
requests (their command identifiers), the queued events and the masks
(:class:`AerState`, the ``nvme/aer`` vmstate description).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable
from typing import Annotated

import attrs

from pcidev.vmstate import U8, U16, Range, VarArray, vmstate
from pcidev_nvme.request import Request
from pcidev_nvme.status import Status

__all__ = [
    "AsyncEvents", "AerState", "EventState", "AER_ERROR", "AER_SMART", "AER_NOTICE", "AER_IMMEDIATE", "AER_IO",
    "AER_VENDOR", "INFO_INVALID_DB_REG", "INFO_INVALID_DB_VALUE", "INFO_SMART_RELIABILITY",
    "INFO_SMART_TEMPERATURE", "INFO_SMART_SPARE", "INFO_NS_ATTR_CHANGED", "INFO_FW_ACTIVATION"
]

AER_ERROR = 0
AER_SMART = 1
AER_NOTICE = 2
AER_IMMEDIATE = 3
AER_IO = 6
AER_VENDOR = 7

# error status
INFO_INVALID_DB_REG = 0x00
INFO_INVALID_DB_VALUE = 0x01
INFO_DIAG_FAILURE = 0x02
INFO_PERSISTENT_INTERNAL = 0x03
INFO_TRANSIENT_INTERNAL = 0x04
INFO_FW_IMAGE_LOAD = 0x05
# SMART / health status
INFO_SMART_RELIABILITY = 0x00
INFO_SMART_TEMPERATURE = 0x01
INFO_SMART_SPARE = 0x02
# notices
INFO_NS_ATTR_CHANGED = 0x00
INFO_FW_ACTIVATION = 0x01


@vmstate("nvme/event")
@attrs.frozen
class EventState:
    """An asynchronous event: type, information, associated log page."""

    etype: Annotated[U8, Range(0, 7)]  # Asynchronous Event Type (3 bits)
    info: U8
    lid: U8


@vmstate("nvme/aer")
@attrs.frozen
class AerState:
    """Asynchronous events: outstanding AER commands (CIDs on the admin SQ), queued
    events, and the masked types with the log page whose read unmasks each."""

    outstanding: VarArray[U16, 256] = ()
    queued: VarArray[EventState, 256] = ()
    masked: VarArray[EventState, 8] = ()  # etype, info unused (0), lid


class AsyncEvents:
    """Event queue, masks and parked AER commands of one controller.

    :param complete: ``complete(req, status, dw0)`` of the controller.
    :param limit: most AER commands that may be outstanding (AERL + 1).
    :param max_queued: most events kept while no AER is outstanding.
    """

    def __init__(self, complete: Callable[..., None], limit: int, max_queued: int = 64) -> None:
        self._complete = complete
        self.limit = limit
        self.max_queued = max_queued
        self._lock = threading.Lock()
        self.outstanding: collections.deque[Request] = collections.deque()
        self.queued: collections.deque[tuple[int, int, int]] = collections.deque()
        #: masked event types -> the log page whose read (RAE=0) clears the mask
        self.masked: dict[int, int] = {}
        #: events reported to the host (type, info, lid), oldest first (for tests and tools)
        self.history: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=256)

    def add_request(self, req: Request) -> bool:
        """Park an AER command. Returns False if the limit is reached (caller fails it)."""
        with self._lock:
            if len(self.outstanding) >= self.limit:
                return False
            self.outstanding.append(req)
        self.deliver()
        return True

    def post(self, etype: int, info: int, lid: int) -> None:
        """Queue an event and report it if an AER is outstanding and its type unmasked."""
        ev = (etype, info, lid)
        with self._lock:
            if ev in self.queued:
                return
            if len(self.queued) >= self.max_queued:
                return
            self.queued.append(ev)
        self.deliver()

    def discard(self, etype: int, info: int, lid: int) -> None:
        """Forget a queued event not reported yet (it no longer applies)."""
        with self._lock:
            try:
                self.queued.remove((etype, info, lid))
            except ValueError:
                pass

    def log_read(self, lid: int, rae: bool, *, notice_info: int | None = None) -> None:
        """The host read log page ``lid``; with ``rae`` clear, unmask every event type whose
        reported event is associated with that log page."""
        if rae:
            return
        with self._lock:
            cleared = [t for t, log_id in self.masked.items() if log_id == lid]
            for t in cleared:
                del self.masked[t]
        if cleared:
            self.deliver()

    def abort(self, cid: int) -> bool:
        """Complete the outstanding AER with ``cid`` as aborted. Returns True if found."""
        with self._lock:
            for req in self.outstanding:
                if req.cid == cid:
                    self.outstanding.remove(req)
                    break
            else:
                return False
        self._complete(req, Status.ABORT_REQUESTED, 0)
        return True

    def reset(self) -> list[Request]:
        """Controller reset: forget queued events and masks; return the parked requests (dropped)."""
        with self._lock:
            parked = list(self.outstanding)
            self.outstanding.clear()
            self.queued.clear()
            self.masked.clear()
        return parked

    def snapshot(self) -> AerState:
        with self._lock:
            return AerState(outstanding=tuple(r.cid for r in self.outstanding),
                            queued=tuple(EventState(*ev) for ev in self.queued),
                            masked=tuple(EventState(t, 0, lid) for t, lid in sorted(self.masked.items())))

    def restore(self, state: AerState, outstanding: Iterable[Request] = ()) -> None:
        """Take the queued events and masks of ``state``; ``outstanding`` are the parked
        requests standing for its outstanding CIDs (nothing is delivered here)."""
        with self._lock:
            self.outstanding.clear()
            self.outstanding.extend(outstanding)
            self.queued.clear()
            self.queued.extend((e.etype, e.info, e.lid) for e in state.queued)
            self.masked.clear()
            self.masked.update({m.etype: m.lid for m in state.masked})

    def deliver(self) -> None:
        """Complete outstanding requests with queued events of unmasked types."""
        while True:
            with self._lock:
                if not self.outstanding:
                    return
                for ev in self.queued:
                    if ev[0] not in self.masked:
                        break
                else:
                    return
                self.queued.remove(ev)
                self.masked[ev[0]] = ev[2]
                req = self.outstanding.popleft()
                self.history.append(ev)
            etype, info, lid = ev
            self._complete(req, 0, etype | (info << 8) | (lid << 16))
