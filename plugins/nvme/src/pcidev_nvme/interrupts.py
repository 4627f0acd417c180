"""Interrupts of the NVMe controller: per-vector state, interrupt coalescing
(feature 08h, Coalescing Disable per vector from feature 09h), INTMS/INTMC masking
of pin-based interrupts, and the controller's :class:`Timer`.

:class:`Interrupts` signals new completion entries: an MSI-X message (aggregated
per vector while coalescing is on, for I/O queues on vectors other than 0: vector 0 is
the admin completion queue's, which coalescing never applies to, so Get Features 09h
reports Coalescing Disable set for it) or, without MSI-X, the INTx
level computed from every CQ with unconsumed entries and the INTMS mask.
:meth:`Interrupts.snapshot` / :meth:`Interrupts.restore` carry INTMS and the
per-vector Coalescing Disable bits (:class:`InterruptsState`).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from pcidev.errors import IrqError
from pcidev.irq import InterruptController
from pcidev.pci.capabilities.msix import MsixCapability
from pcidev_nvme.queues import CompletionQueue

__all__ = ["Interrupts", "InterruptsState", "InterruptVector", "InterruptHost", "Timer"]

log = logging.getLogger(__name__)


class InterruptHost(Protocol):
    """What :class:`Interrupts` needs from the device: its name, interrupt controller
    (``notify(vector)``, ``set_intx(level)``) and MSI-X capability."""

    name: str

    @property
    def irq(self) -> InterruptController: ...

    @property
    def msix(self) -> MsixCapability | None: ...


@attrs.frozen
class InterruptsState:
    """INTMS and the Coalescing Disable bit of every vector."""

    intms: int
    vector_cd: tuple[bool, ...]


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


class Interrupts:
    """Interrupt signalling of one controller (see the module docstring).

    :param host: the device (name, ``irq``, ``msix``).
    :param cqs: the controller's completion queues by id (the list is shared, not copied).
    :param timer: timer for coalescing deadlines.
    :param nvectors: number of interrupt vectors.
    """

    def __init__(self, host: InterruptHost, cqs: Sequence[CompletionQueue | None], timer: Timer,
                 nvectors: int) -> None:
        self.host = host
        self.cqs = cqs
        self.timer = timer
        self.vectors = [InterruptVector(i) for i in range(nvectors)]
        #: INTMS: pin-based / MSI vectors masked by the host
        self.intms = 0
        #: pin-based interrupt status: a bit per vector with unconsumed entries
        self.irq_status = 0
        # Feature 08h (interrupt coalescing) is owned by :class:`~pcidev_nvme.features.Features`;
        # these three are a copy derived from it for the per-completion path, written only
        # through :meth:`set_coalescing`, which only ``Features`` calls.
        #: interrupt coalescing is on (feature 08h THR or TIME non-zero)
        self.coalescing_on = False
        self._threshold = 0
        self._time = 0
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()

    # -- signalling ------------------------------------------------------------------------
    def signal(self, cq: CompletionQueue, n: int) -> None:
        """Signal ``n`` new entries on ``cq`` (MSI-X with coalescing, or INTx/MSI level logic)."""
        if not cq.ien:
            return
        host = self.host
        msix = host.msix
        if msix is not None and msix.enabled:
            vec = cq.vector
            if self.coalescing_on and vec and not self._aggregate(self.vectors[vec], n):  # (vector 0: admin)
                return
            try:
                host.irq.notify(vec)
            except IrqError as exc:
                log.warning("%s: %s", host.name, exc)
            return
        self.legacy_update()

    def signal_many(self, counts: Mapping[CompletionQueue, int]) -> None:
        """Signal the new entries of a batch: ``counts`` maps each completion queue to
        how many entries it got. With MSI-X, each vector is raised at most once (CQs
        sharing a vector get one message), all under one acquisition of the interrupt
        lock; coalescing applies per vector as in :meth:`signal`. Without MSI-X the
        INTx/MSI level is recomputed once.

        :param counts: completion queue -> entries posted.
        """
        if len(counts) == 1:
            for cq, n in counts.items():
                self.signal(cq, n)
            return
        host = self.host
        msix = host.msix
        if msix is None or not msix.enabled:
            if any(cq.ien for cq in counts):
                self.legacy_update()
            return
        # entries per vector (an admin CQ's vector, vector 0, is never coalesced: key -1 - vector)
        per_vector: dict[int, int] = {}
        for cq, n in counts.items():
            if cq.ien:
                key = cq.vector if cq.cqid and cq.vector else -1 - cq.vector
                per_vector[key] = per_vector.get(key, 0) + n
        vectors: list[int] = []
        coalescing = self.coalescing_on
        for key, n in per_vector.items():
            vec = key if key >= 0 else -1 - key
            if key >= 0 and coalescing and not self._aggregate(self.vectors[vec], n):
                continue
            if vec not in vectors:
                vectors.append(vec)
        if not vectors:
            return
        try:
            host.irq.notify_many(vectors)
        except IrqError as exc:
            log.warning("%s: %s", host.name, exc)

    def _aggregate(self, v: InterruptVector, n: int) -> bool:
        """Coalescing (feature 08h) of ``n`` entries on vector ``v``: True if the
        interrupt is due now, False if it is aggregated (a deadline is armed)."""
        if v.cd:
            return True
        thr, tim = self._threshold, self._time
        with self._lock:
            v.count += n
            if v.count > thr or not tim:
                v.count = 0
                return True
            if not v.armed:
                v.armed = True
                self.timer.schedule(tim * 100e-6, self._coalesce_expired, v)
            return False

    def _coalesce_expired(self, v: InterruptVector) -> None:
        with self._lock:
            v.armed = False
            due = v.count > 0
            v.count = 0
        msix = self.host.msix
        if due and msix is not None and msix.enabled:
            try:
                self.host.irq.notify(v.index)
            except IrqError:
                pass

    def flush_coalesced(self) -> None:
        """Deliver every aggregated interrupt now and disarm the deadlines (a quiesce)."""
        with self._lock:
            due = [v for v in self.vectors if v.count]
            for v in self.vectors:
                v.count = 0
                v.armed = False
        msix = self.host.msix
        for v in due:
            if msix is not None and msix.enabled:
                try:
                    self.host.irq.notify(v.index)
                except Exception:
                    pass

    def pin_status(self) -> int:
        """The pin-based interrupt status the completion queues call for."""
        status = 0
        for cq in self.cqs:
            if cq is not None and cq.ien and cq.head != cq.tail:
                status |= 1 << (cq.vector & 31)
        return status

    def legacy_update(self, unmasked: int = 0) -> None:
        """Pin-based interrupts: the line is asserted while an unmasked vector has
        unconsumed completion entries."""
        msix = self.host.msix
        if msix is not None and msix.enabled:
            return
        status = self.pin_status()
        self.irq_status = status
        self.host.irq.set_intx(bool(status & ~self.intms))

    # -- registers and features ------------------------------------------------------------
    def mask(self, bits: int) -> None:
        """INTMS written: mask the vectors in ``bits``."""
        with self._state_lock:
            self.intms |= bits
        self.legacy_update()

    def unmask(self, bits: int) -> None:
        """INTMC written: unmask the vectors in ``bits``."""
        with self._state_lock:
            self.intms &= ~bits & 0xFFFFFFFF
        self.legacy_update(unmasked=bits)

    def set_coalescing(self, threshold: int, time_100us: int) -> None:
        """Feature 08h changed (called only by :class:`~pcidev_nvme.features.Features`,
        which owns the value: at Set Features, reset and restore).

        :param threshold: aggregation threshold (THR).
        :param time_100us: aggregation time (TIME, 100 us units).
        """
        self._threshold, self._time = threshold, time_100us
        self.coalescing_on = bool(threshold or time_100us)

    def vector_cd(self, iv: int) -> bool:
        """Coalescing Disable of vector ``iv``."""
        return self.vectors[iv].cd

    def set_vector_cd(self, iv: int, cd: bool) -> None:
        self.vectors[iv].cd = cd

    def reset(self) -> None:
        """Controller reset: nothing masked, every vector back to its default (coalescing
        itself is turned off by :meth:`Features.reset <pcidev_nvme.features.Features.reset>`)."""
        with self._lock:
            for v in self.vectors:
                v.cd = False
                v.count = 0
                v.armed = False
                v.masked_pending = False
        self.intms = 0
        self.irq_status = 0

    # -- state -----------------------------------------------------------------------------
    def snapshot(self) -> InterruptsState:
        return InterruptsState(intms=self.intms, vector_cd=tuple(v.cd for v in self.vectors))

    def restore(self, state: InterruptsState) -> None:
        """Take INTMS and the Coalescing Disable bits; nothing aggregated, nothing signalled
        (the pin status is recomputed from the queues)."""
        with self._lock:
            for v, cd in zip(self.vectors, state.vector_cd, strict=False):
                v.cd = cd
                v.count = 0
                v.armed = False
                v.masked_pending = False
        self.intms = state.intms
        self.irq_status = self.pin_status()


class Timer:
    """A single background thread running callbacks at deadlines (coalescing
    time, keep-alive). Started on first use; :meth:`close` stops it."""

    def __init__(self, name: str = "nvme-timer") -> None:
        self.name = name
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
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
