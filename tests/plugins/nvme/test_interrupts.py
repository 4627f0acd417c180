"""Interrupts.signal_many: the interrupts of a batch, one message per vector under one
interrupt lock, coalescing per vector (the sum of the vector's CQs), INTx recomputed once."""

from __future__ import annotations

from pcidev_nvme.interrupts import Interrupts, Timer
from pcidev_nvme.queues import CompletionQueue


class FakeMsix:
    enabled = True


class FakeIrq:
    def __init__(self):
        self.calls: list[list[int]] = []
        self.intx: list[bool] = []

    def notify(self, vector):
        self.calls.append([vector])
        return True

    def notify_many(self, vectors):
        self.calls.append(list(vectors))
        return True

    def set_intx(self, level):
        self.intx.append(level)


class FakeHost:
    name = "fake"

    def __init__(self, msix: bool = True):
        self.irq = FakeIrq()
        self.msix = FakeMsix() if msix else None


def _setup(msix: bool = True):
    host = FakeHost(msix)
    cqs = [CompletionQueue(0, 0x1000, 16, 0, True), CompletionQueue(1, 0x2000, 16, 1, True),
           CompletionQueue(2, 0x3000, 16, 1, True), CompletionQueue(3, 0x4000, 16, 2, True),
           CompletionQueue(4, 0x5000, 16, 2, False)]
    timer = Timer("test-timer")
    return host, cqs, Interrupts(host, cqs, timer, 4), timer


def test_one_message_per_vector_in_one_call():
    host, cqs, irqs, timer = _setup()
    try:
        irqs.signal_many({cqs[1]: 2, cqs[2]: 5, cqs[3]: 1, cqs[4]: 3, cqs[0]: 1})
        # vectors 1 (two CQs) and 2 once each, the admin CQ's vector 0; CQ 4 has IEN off
        assert host.irq.calls == [[1, 2, 0]]
    finally:
        timer.close()


def test_coalescing_counts_the_vector_not_each_cq():
    host, cqs, irqs, timer = _setup()
    try:
        irqs.set_coalescing(3, 200)  # more than 3 entries, or 20 ms
        irqs.signal_many({cqs[1]: 2, cqs[2]: 2})  # 4 on vector 1: due now, nothing armed
        assert host.irq.calls == [[1]]
        assert not irqs.vectors[1].armed and irqs.vectors[1].count == 0
        irqs.signal_many({cqs[1]: 1, cqs[3]: 1})  # below the threshold on both vectors
        assert host.irq.calls == [[1]]
        assert irqs.vectors[1].armed and irqs.vectors[2].armed
        irqs.flush_coalesced()
        assert sorted(v for call in host.irq.calls[1:] for v in call) == [1, 2]
        # the admin CQ is never coalesced
        irqs.signal_many({cqs[0]: 1, cqs[1]: 1})
        assert host.irq.calls[-1] == [0]
    finally:
        timer.close()


def test_without_msix_the_pin_is_recomputed_once():
    host, cqs, irqs, timer = _setup(msix=False)
    try:
        cqs[1].tail = 2
        cqs[3].tail = 1
        irqs.signal_many({cqs[1]: 2, cqs[3]: 1})
        assert host.irq.intx == [True] and host.irq.calls == []
        assert irqs.irq_status == (1 << 1) | (1 << 2)
    finally:
        timer.close()
