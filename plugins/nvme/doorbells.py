"""Doorbells of the NVMe controller: the MMIO doorbell registers (BAR0 1000h on) and
the Doorbell Buffer Config shadow doorbells with their EventIdx buffer.

MMIO doorbell ``y`` is at ``1000h + 8 * y`` (SQ tail) and ``1000h + 8 * y + 4`` (CQ
head); the controller's doorbell handling lives in :mod:`pcidev_nvme.controller`.
With Doorbell Buffer Config (admin opcode 7Ch) the host also writes the new values to
a shadow buffer (``dbs``) and the controller publishes the values after which it
wants an MMIO write in the EventIdx buffer (``eis``); slot ``2 * qid`` is SQ
``qid``'s tail, ``2 * qid + 1`` CQ ``qid``'s head.

:class:`ShadowDoorbells` owns the two buffer addresses (:meth:`ShadowDoorbells.snapshot`
/ :meth:`ShadowDoorbells.restore` of a :class:`ShadowDoorbellsState`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from pcidev.errors import DmaError
from pcidev_nvme.queues import CompletionQueue, SubmissionQueue

if TYPE_CHECKING:
    from pcidev.dma import GuestMemory

__all__ = ["DOORBELL_BASE", "ShadowDoorbells", "ShadowDoorbellsState", "doorbell_offset"]

#: BAR0 offset of the first doorbell
DOORBELL_BASE = 0x1000


def doorbell_offset(qid: int, cq: bool = False) -> int:
    """BAR0 offset of queue ``qid``'s SQ tail (or CQ head) doorbell."""
    return DOORBELL_BASE + 8 * qid + (4 if cq else 0)


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
