"""Feature 08h (interrupt coalescing) has one owner, :class:`pcidev_nvme.features.Features`:
its reset and restore reach :class:`pcidev_nvme.interrupts.Interrupts` by themselves."""

from __future__ import annotations

import types

import attrs

from pcidev_nvme.atomicity import Atomicity
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.features import FID_IRQ_COALESCING, Features
from pcidev_nvme.interrupts import Interrupts, Timer
from pcidev_nvme.queues import CompletionQueue


class _Host:
    name = "test"

    def __init__(self):
        self.notified = []
        self.irq = types.SimpleNamespace(notify=self.notified.append, set_intx=lambda level: None)
        self.msix = types.SimpleNamespace(enabled=True)


def test_restore_and_reset_reach_the_interrupts():
    timer = Timer()
    try:
        host = _Host()
        cq = CompletionQueue(1, 0x10000, 16, 2, True)  # an I/O CQ on vector 2
        irq = Interrupts(host, [None, cq], timer, 4)
        ctrl = types.SimpleNamespace(cfg=NvmeConfig(serial="S"), namespaces={}, interrupts=irq, io_queue_limit=64,
                                     vector_limit=65, atomicity=Atomicity())
        source = Features(ctrl)
        source.values[FID_IRQ_COALESCING] = (255 << 8) | 7  # 8 entries or 25.5 ms
        state = source.snapshot()

        features = Features(ctrl)
        features.reset()
        assert not irq.coalescing_on
        features.restore(state)  # nothing else tells the interrupts
        assert irq.coalescing_on
        irq.signal(cq, 3)
        assert host.notified == []  # aggregated, below the threshold
        irq.signal(cq, 5)
        assert host.notified == [2]  # threshold passed

        features.reset()
        assert not irq.coalescing_on
        irq.signal(cq, 1)
        assert host.notified == [2, 2]  # at once: coalescing is off
        features.restore(attrs.evolve(state, coalescing=0))
        assert not irq.coalescing_on
    finally:
        timer.close()
