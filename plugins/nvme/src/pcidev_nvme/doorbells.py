"""Doorbells of the NVMe controller: the MMIO doorbell registers (BAR0 1000h on) and
the Doorbell Buffer Config shadow doorbells with their EventIdx buffer.

MMIO doorbell ``y`` is at ``1000h + 8 * y`` (SQ tail) and ``1000h + 8 * y + 4`` (CQ
head), handled by :class:`DoorbellsMixin` (a part of
:class:`~pcidev_nvme.controller.NvmeController`: it works on the controller's queues
and hands a new SQ tail to the fetch loop, :class:`~pcidev_nvme.fetch.FetchMixin`).
With Doorbell Buffer Config (admin opcode 7Ch) the host also writes the new values to
a shadow buffer (``dbs``) and the controller publishes the values after which it
wants an MMIO write in the EventIdx buffer (``eis``); slot ``2 * qid`` is SQ
``qid``'s tail, ``2 * qid + 1`` CQ ``qid``'s head.

:class:`ShadowDoorbells` owns the two buffer addresses (:meth:`ShadowDoorbells.snapshot`
/ :meth:`ShadowDoorbells.restore` of a :class:`ShadowDoorbellsState`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs

from pcidev import native
from pcidev.dma import GuestMemory
from pcidev.errors import DmaError
from pcidev.pci.capabilities.msix import MsixCapability
from pcidev_nvme import aer as aer_mod
from pcidev_nvme.aer import AsyncEvents
from pcidev_nvme.interrupts import Interrupts
from pcidev_nvme.logs import ErrorLog
from pcidev_nvme.queues import CompletionQueue, SubmissionQueue
from pcidev_nvme.registers import DOORBELL_BASE

__all__ = ["DOORBELL_BASE", "DoorbellsMixin", "ShadowDoorbells", "ShadowDoorbellsState"]

log = logging.getLogger(__name__)


@attrs.frozen
class ShadowDoorbellsState:
    """The shadow doorbell and EventIdx buffers (``enabled`` False: none configured)."""

    dbs: int = 0
    eis: int = 0
    enabled: bool = False


class ShadowDoorbells:
    """Where the shadow doorbell and EventIdx buffers are (Doorbell Buffer Config)."""

    def __init__(self) -> None:
        #: (shadow doorbell buffer, EventIdx buffer) guest addresses, or None
        self.buffers: tuple[int, int] | None = None
        #: a transport polls the shadow tails (:meth:`DoorbellsMixin.set_polling`): the
        #: EventIdx values ask the host for few MMIO writes (not migrated: a transport
        #: property, announced again by the destination's transport)
        self.polling = False

    @property
    def enabled(self) -> bool:
        return self.buffers is not None

    def configure(self, dbs: int, eis: int) -> None:
        """Doorbell Buffer Config: shadow doorbells at ``dbs``, EventIdx at ``eis``."""
        self.buffers = (dbs, eis)

    def reset(self) -> None:
        """Controller reset: no buffers."""
        self.buffers = None

    def addresses(self, slot: int) -> tuple[int, int] | tuple[None, None]:
        """(shadow doorbell, EventIdx) addresses of ``slot``, or (None, None)."""
        if self.buffers is None:
            return None, None
        dbs, eis = self.buffers
        return dbs + 4 * slot, eis + 4 * slot

    def bind(self, q: SubmissionQueue | CompletionQueue, mem: GuestMemory | None = None) -> None:
        """Give ``q`` its shadow addresses; with ``mem``, also write its current doorbell
        value (SQ tail or CQ head) to both (a queue created after the buffer config)."""
        if isinstance(q, SubmissionQueue):
            slot, value = 2 * q.sqid, q.tail
        else:
            slot, value = 2 * q.cqid + 1, q.head
        db, ei = self.addresses(slot)
        q.set_shadow(db, ei)
        if mem is not None and db is not None and ei is not None:
            try:
                mem.store32(db, value)
                mem.store32(ei, value)
            except DmaError:
                pass

    def snapshot(self) -> ShadowDoorbellsState:
        if self.buffers is None:
            return ShadowDoorbellsState()
        return ShadowDoorbellsState(dbs=self.buffers[0], eis=self.buffers[1], enabled=True)

    def restore(self, state: ShadowDoorbellsState) -> None:
        self.buffers = (state.dbs, state.eis) if state.enabled else None


class DoorbellsMixin:
    """Doorbell writes of :class:`~pcidev_nvme.controller.NvmeController` (mixed into it;
    uses its queues, ``shadow``, ``interrupts``, ``error_log``, ``aer`` and the fetch loop)."""

    _sqs: list[SubmissionQueue | None]
    _cqs: list[CompletionQueue | None]
    _running: bool
    _doorbells_open: bool
    shadow: ShadowDoorbells
    name: str
    interrupts: Interrupts
    error_log: ErrorLog
    aer: AsyncEvents

    if TYPE_CHECKING:  # provided by the other parts of NvmeController
        @property
        def dma(self) -> GuestMemory: ...

        def _fatal(self, why: str) -> None: ...

        def _kick(self, sq: SubmissionQueue) -> None: ...

        def _kick_throttled(self, cq: CompletionQueue) -> None: ...

        @property
        def msix(self) -> MsixCapability | None: ...

    def _doorbell_write(self, offset: int, size: int, value: int) -> None:
        if size == 8 and not offset & 7:
            self._doorbell_write(offset, 4, value & 0xFFFFFFFF)
            self._doorbell_write(offset + 4, 4, value >> 32)
            return
        if size != 4 or offset & 3:
            log.warning("%s: %d-byte doorbell write at %#x ignored (doorbells are 32-bit)", self.name, size, offset)
            return
        if not self._doorbells_open:
            return  # (a disabled, shutting down or closed controller ignores its doorbells)
        # (a paused one -- quiesced for a migration, restored and not resumed yet -- takes
        # the value: an SQ tail is fetched at the resume, never dropped)
        idx = (offset - DOORBELL_BASE) >> 2
        qid = idx >> 1
        if idx & 1:
            self._cq_head_write(qid, value, offset)
        else:
            self._sq_tail_write(qid, value, offset)

    def _doorbell_error(self, info: int, qid: int, offset: int, value: int) -> None:
        log.info("%s: invalid doorbell %s: offset %#x value %#x",
                 self.name, "register" if info == aer_mod.INFO_INVALID_DB_REG else "value", offset, value)
        self.error_log.add(sqid=qid, cid=0xFFFF, status_field=0, param_offset=None, csi=offset)
        self.aer.post(aer_mod.AER_ERROR, info, 0x01)

    def _sq_tail_write(self, qid: int, value: int, offset: int) -> None:
        sq = self._sqs[qid] if qid < len(self._sqs) else None
        if sq is None or sq.deleting:
            self._doorbell_error(aer_mod.INFO_INVALID_DB_REG, qid, offset, value)
            return
        if value >= sq.size:
            self._doorbell_error(aer_mod.INFO_INVALID_DB_VALUE, qid, offset, value)
            return
        if sq.db_addr is not None:
            if qid:
                # An I/O queue's shadow tail is the truth and an MMIO write only a
                # notification, one that can arrive late (a posted vfio-user write, handled
                # while another thread fetches): its value must not become the tail, or the
                # fetch loop would take the entries from there to the head as a whole lap
                # of new commands and run them again. The fetch reads the shadow.
                self._kick(sq)
                return
            # the admin queue (which Linux never shadows, as QEMU's nvme): the MMIO value
            # is the truth, and the shadow follows it
            try:
                self.dma.store32(sq.db_addr, value)
            except DmaError:
                pass
        sq.tail = value
        self._kick(sq)

    def _cq_head_write(self, qid: int, value: int, offset: int) -> None:
        cq = self._cqs[qid] if qid < len(self._cqs) else None
        if cq is None:
            self._doorbell_error(aer_mod.INFO_INVALID_DB_REG, qid, offset, value)
            return
        posted = 0
        try:
            with cq.lock:
                mem = None
                if cq.db_addr is not None and cq.ei_addr is not None:  # shadow doorbells (both or neither)
                    mem = self.dma
                    if qid == 0:
                        # the admin queue is not shadowed by Linux: the MMIO value is the truth
                        mem.store32(cq.db_addr, value)
                        mem.store32(cq.ei_addr, value)
                    else:
                        # The shadow head is never older than an MMIO write that may arrive late
                        # (posted): take it, publish the EventIdx for it, and look again in case
                        # the host moved on meanwhile (it then saw the old EventIdx and rang nothing).
                        value = mem.load32(cq.db_addr)
                        while True:
                            mem.store32(cq.ei_addr, self._cq_event_idx(cq, value))
                            native.fence()  # (the host: store shadow, mb(), load EventIdx)
                            again = mem.load32(cq.db_addr)
                            if again == value:
                                break
                            value = again
                if not cq.valid_head(value):
                    bad = True
                else:
                    bad = False
                    cq.head = value
                    if cq.backlog:
                        posted = cq.drain_backlog(mem or self.dma)
        except DmaError as exc:
            self._fatal(f"CQ {qid}: {exc}")
            return
        if bad:
            self._doorbell_error(aer_mod.INFO_INVALID_DB_VALUE, qid, offset, value)
            return
        if posted and cq.ien:
            self.interrupts.signal(cq, posted)
        elif self.interrupts.irq_status:
            self.interrupts.legacy_update()
        if cq.throttled:
            self._kick_throttled(cq)

    # -- EventIdx policy ---------------------------------------------------------------------
    def _cq_event_idx(self, cq: CompletionQueue, head: int) -> int:
        """The EventIdx to publish for I/O CQ ``cq`` whose host head is ``head``.

        Eager (``head``: the host rings at its next head update) unless a transport
        polls, MSI-X is on and nothing waits for room in the queue (no backlog, no
        throttled SQ): then ``head - 1``, and the host rings at most once per wrap. The
        controller reads the shadow head itself when it needs room (before deciding
        that the queue is full, :meth:`_cq_refresh_head`). INTx and MSI need prompt
        heads for the pin status, so they stay eager.
        """
        if self.shadow.polling and not cq.backlog and not cq.throttled and head < cq.size:
            msix = self.msix
            if msix is not None and msix.enabled:
                return (head - 1) % cq.size
        return head

    def _cq_refresh_head(self, cq: CompletionQueue, mem: GuestMemory, tail: int) -> bool:
        """Take the host's shadow head of I/O CQ ``cq`` (call with ``cq.lock`` held), as if
        it had rung; ``tail`` is where the caller is about to post (the host can only
        have consumed up to it). Returns whether the head moved. A value outside what
        was written is left alone (the MMIO write reports it).

        :raises DmaError: the shadow buffer is not readable guest memory.
        """
        if cq.db_addr is None or not cq.cqid:
            return False
        value = mem.load32(cq.db_addr)
        head, size = cq.head, cq.size
        if value == head or value >= size or (value - head) % size > (tail - head) % size:
            return False
        cq.head = value
        return True

    def _cq_arm(self, cq: CompletionQueue, mem: GuestMemory, *, post: bool = True) -> int:
        """Publish I/O CQ ``cq``'s EventIdx for the current policy and its head (call with
        ``cq.lock`` held), then look at the shadow head again (a host that saw the old
        EventIdx rang nothing), until it stays put; with ``post``, the backlog is posted
        as room appears. Returns the entries posted.

        :raises DmaError: the queue or the shadow buffers are not guest memory.
        """
        if cq.ei_addr is None or not cq.cqid:
            return 0
        drained = 0
        while True:
            if post and cq.backlog:
                drained += cq.drain_backlog(mem)
            mem.store32(cq.ei_addr, self._cq_event_idx(cq, cq.head))
            native.fence()  # (before the shadow head is read again: see _cq_head_write)
            if not self._cq_refresh_head(cq, mem, cq.tail):
                return drained

    def _sq_event_idx(self, sq: SubmissionQueue, mem: GuestMemory) -> bool:
        """Publish SQ ``sq``'s EventIdx for the current policy (call from the thread that
        fetches ``sq``, or with nothing fetching it): ``tail - 1`` for an I/O SQ while a
        transport polls, else ``tail``. A lazy value is stored again eagerly if the poll
        stopped meanwhile (:meth:`set_polling` then re-arms through the fetching thread).

        :returns: the shadow tail moved on and is a valid tail (the host wrote it
            without seeing the EventIdx: fetch again).
        :raises DmaError: the buffers are not guest memory.
        """
        ei = sq.ei_addr
        if ei is None:
            return False
        shadow = self.shadow
        tail = sq.tail
        if sq.sqid and shadow.polling:
            mem.store32(ei, (tail - 1) % sq.size)
            if shadow.polling:
                return False
        mem.store32(ei, tail)
        if sq.db_addr is None:
            return False
        # a full fence, as the host's mb() between its shadow store and its EventIdx load
        # (x86 may order a store after a later load): one of the two sees the other's
        native.fence()
        value = mem.load32(sq.db_addr)
        return value != tail and value < sq.size

    def _sq_rearm(self, sq: SubmissionQueue) -> None:
        """Publish ``sq``'s EventIdx for the current policy and fetch what the shadow tail
        shows beyond it, serialized with the fetch loop: if another thread fetches ``sq``
        it does so again when done (its next pass publishes the EventIdx). While the
        controller does not run, only the EventIdx is written."""
        with sq.lock:
            if sq.running:
                sq.rerun = True
                return
            sq.running = True
        moved = False
        try:
            mem = self._dma_or_none()
            if mem is not None:
                moved = self._sq_event_idx(sq, mem)
        except DmaError:
            pass
        finally:
            with sq.lock:
                rerun = sq.rerun
                sq.running = sq.rerun = False
        if (moved or rerun) and self._running and not sq.gone and not sq.deleting:
            self._kick(sq)

    def _cq_rearm(self, cq: CompletionQueue) -> None:
        """Publish I/O CQ ``cq``'s EventIdx for the current policy after taking a valid
        shadow head; while the controller runs, post the backlog that now fits and
        raise its interrupt. A paused controller posts nothing (its state is saved)."""
        post = self._running
        try:
            with cq.lock:
                if cq.gone:
                    return
                posted = self._cq_arm(cq, self.dma, post=post)
        except DmaError as exc:
            if post:
                self._fatal(f"CQ {cq.cqid}: {exc}")
            return
        if posted and cq.ien:
            self.interrupts.signal(cq, posted)
        elif self.interrupts.irq_status:
            self.interrupts.legacy_update()
        if post and cq.throttled:
            self._kick_throttled(cq)

    def rearm_event_idx(self) -> None:
        """Publish every I/O queue's EventIdx for the current policy and look at the shadow
        doorbells once more (after a restore or resume, a change of the polling or of
        MSI-X): a value left by another policy (a lazy ``tail - 1`` of a transport that
        polled before a migration) would keep the host from ringing."""
        if not self.shadow.enabled:
            return
        for sq in list(self._sqs[1:]):
            if sq is not None and not sq.gone and not sq.deleting and sq.ei_addr is not None:
                self._sq_rearm(sq)
        for cq in list(self._cqs[1:]):
            if cq is not None and not cq.gone and cq.ei_addr is not None:
                self._cq_rearm(cq)

    def poll_work(self) -> bool:
        """A polling transport's look for work (see :meth:`pcidev.device.PciDevice.poll_work`):
        fetch every I/O SQ whose shadow tail moved, and take the shadow head of every I/O
        CQ with completions waiting for room.

        :returns: True if an SQ had new entries.
        """
        if not self._running or not self.shadow.enabled:
            return False
        mem = self._dma_or_none()
        if mem is None:
            return False
        found = False
        for sq in list(self._sqs[1:]):
            if sq is None or sq.gone or sq.deleting or sq.db_addr is None:
                continue
            try:
                tail = mem.load32(sq.db_addr)
            except DmaError:
                continue
            if tail != sq.tail and tail < sq.size:
                found = True
                self._kick(sq)
        for cq in list(self._cqs[1:]):
            if cq is not None and cq.backlog and cq.db_addr is not None:
                self._cq_head_write(cq.cqid, cq.head, DOORBELL_BASE + 8 * cq.cqid + 4)
        return found

    def set_polling(self, active: bool) -> None:
        """A transport polls (True) or stopped polling (False); see
        :meth:`pcidev.device.PciDevice.set_polling`.

        While polling, an I/O SQ's EventIdx is ``tail - 1`` after each fetch (the host
        need not ring: :meth:`poll_work` reads the shadow tails), and with MSI-X an I/O
        CQ's is ``head - 1`` while nothing waits for room. When polling stops, every
        EventIdx is armed again (the current tail or head) and the shadow doorbells are
        read once more, so that a value the host wrote only to the shadow is not lost
        (an SQ being fetched by another thread is re-armed by that thread's next pass).
        While the controller is paused or stopped only the EventIdx values are written:
        nothing is fetched or posted. The admin queues are never affected.

        :param active: the transport polls from now on.
        """
        shadow = self.shadow
        if shadow.polling == bool(active):
            return
        shadow.polling = bool(active)
        if not active:
            self.rearm_event_idx()

    def _dma_or_none(self) -> GuestMemory | None:
        try:
            return self.dma
        except DmaError:
            return None

    def set_doorbell_buffer(self, dbs: int, eis: int) -> None:
        """Doorbell Buffer Config: shadow doorbells at ``dbs``, EventIdx at ``eis``."""
        self.shadow.configure(dbs, eis)
        mem = self._dma_or_none()
        for q in (*self._sqs, *self._cqs):
            if q is not None:
                self.shadow.bind(q, mem)
