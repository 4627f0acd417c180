"""Each NVMe component saves and restores its own state: snapshot() -> restore() on a
fresh component -> the same snapshot."""

from __future__ import annotations

import types

import attrs

from pcidev.vmstate import decode_state, encode_state, is_vmstate
from pcidev_nvme.aer import AER_NOTICE, AER_SMART, AsyncEvents
from pcidev_nvme.atomicity import Atomicity
from pcidev_nvme.backends import MemoryBackend
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.doorbells import ShadowDoorbells
from pcidev_nvme.features import FID_ARBITRATION, FID_IRQ_COALESCING, FID_KATO, FID_NUM_QUEUES, Features
from pcidev_nvme.interrupts import Interrupts, Timer
from pcidev_nvme.logs import ChangedNamespaces, ErrorLog, FirmwareSlots, SmartCounters
from pcidev_nvme.namespace import Namespace
from pcidev_nvme.queues import CompletionQueue, SubmissionQueue


def _roundtrip(state):
    """A vmstate state class also survives its codec unchanged."""
    if is_vmstate(type(state)):
        assert decode_state(encode_state(state), type(state)) == state
    return state


def test_queues():
    cq = CompletionQueue(1, 0x10000, 16, 2, True)
    sq = SubmissionQueue(1, 0x20000, 32, cq, qprio=1)
    cq.attach(sq)
    sq.head, sq.tail = 5, 9
    cq.head, cq.tail, cq.phase = 3, 2, 0
    cq.backlog.append((sq, 7, 0x4002, 1, 2))
    sqs = [None, sq]
    cst, sst = _roundtrip(cq.snapshot()), _roundtrip(sq.snapshot())
    cq2 = CompletionQueue.from_state(cst)
    sq2 = SubmissionQueue.from_state(sst, cq2)
    cq2.restore(cst, [None, sq2])
    assert cq2.snapshot() == cst and sq2.snapshot() == sst
    assert cq2.reserved == 1 and cq2.backlog[0][0] is sq2
    assert sqs[1].snapshot() == sst


class _Host:
    name = "test"
    msix = None

    def __init__(self):
        self.irq = types.SimpleNamespace(notify=lambda v: None, set_intx=lambda level: None)


def test_interrupts():
    timer = Timer()
    try:
        irq = Interrupts(_Host(), [None, None], timer, 4)
        irq.mask(0b101)
        irq.set_vector_cd(2, True)
        st = irq.snapshot()
        fresh = Interrupts(_Host(), [None, None], timer, 4)
        fresh.restore(st)
        assert fresh.snapshot() == st and fresh.intms == 0b101 and fresh.vector_cd(2)
    finally:
        timer.close()


def _ctrl_stub():
    return types.SimpleNamespace(cfg=NvmeConfig(serial="S"), namespaces={}, io_queue_limit=64, vector_limit=65,
                                 interrupts=types.SimpleNamespace(set_coalescing=lambda thr, tim: None),
                                 atomicity=Atomicity())


def test_features():
    f = Features(_ctrl_stub())
    f.values[FID_ARBITRATION] = 3
    f.values[FID_IRQ_COALESCING] = 0x0A05
    f.values[FID_KATO] = 5000
    f.temp_over, f.temp_under = 350, 260
    f.tler = {1: 20}
    f.nsq, f.ncq, f.nq_allocated = 2, 3, True
    f.values[FID_NUM_QUEUES] = 1 | 2 << 16  # (what Set Features Number of Queues reads back)
    f.host_behavior = bytes([1]) + bytes(511)
    st = _roundtrip(f.snapshot())
    fresh = Features(_ctrl_stub())
    fresh.restore(st)
    again = fresh.snapshot()
    assert attrs.evolve(again, timestamp=st.timestamp) == st
    assert st.timestamp <= again.timestamp < st.timestamp + 1000  # the clock counts on


def test_smart():
    s = SmartCounters(temperature=320)
    s.record_read(4096)
    s.record_write(512)
    s.record_media_error()
    s.inject_warning(0x4)
    s.report_warnings(0x4, 0xFF)
    st = _roundtrip(s.snapshot())
    fresh = SmartCounters()
    fresh.restore(st)
    again = fresh.snapshot()
    assert attrs.evolve(again, power_on_us=st.power_on_us) == st
    assert st.power_on_us <= again.power_on_us


def test_error_log():
    el = ErrorLog(4)
    for i in range(6):
        el.add(sqid=1, cid=i, status_field=0x4002)
    st = el.snapshot()
    fresh = ErrorLog(4)
    fresh.restore(st)
    assert fresh.snapshot() == st and fresh.count == 6 and fresh.page() == el.page()


def test_firmware():
    fw = FirmwareSlots(3, "1.0")
    fw.revisions[1] = "2.0"
    fw.next_reset = 2
    fw.staged = {0: b"abcd", 4: b"efgh"}
    st = _roundtrip(fw.snapshot())
    fresh = FirmwareSlots(3, "1.0")
    fresh.restore(st)
    assert fresh.snapshot() == st


def test_changed_namespaces():
    cn = ChangedNamespaces()
    cn.add(3)
    cn.add(1)
    st = cn.snapshot()
    fresh = ChangedNamespaces()
    fresh.restore(st)
    assert fresh.snapshot() == st and st.nsids == (1, 3)


def test_async_events():
    done = []
    aer = AsyncEvents(lambda req, status, dw0: done.append(dw0), limit=4)
    aer.post(AER_SMART, 1, 2)
    aer.add_request(types.SimpleNamespace(cid=9))  # takes the SMART event, masks SMART
    aer.post(AER_SMART, 0, 2)  # queued: SMART is masked
    aer.add_request(types.SimpleNamespace(cid=10))  # waits
    st = _roundtrip(aer.snapshot())
    assert st.outstanding == (10,) and [e.etype for e in st.queued] == [AER_SMART]
    fresh = AsyncEvents(lambda req, status, dw0: None, limit=4)
    fresh.restore(st, [types.SimpleNamespace(cid=c) for c in st.outstanding])
    assert fresh.snapshot() == st
    fresh.post(AER_NOTICE, 0, 4)  # a notice is not masked: the restored request takes it
    assert not fresh.snapshot().outstanding


def test_shadow_doorbells():
    db = ShadowDoorbells()
    db.configure(0x1000, 0x2000)
    st = db.snapshot()
    fresh = ShadowDoorbells()
    fresh.restore(st)
    assert fresh.snapshot() == st and fresh.addresses(3) == (0x100C, 0x200C)


def test_namespace():
    ns = Namespace(1, MemoryBackend(1 << 20), lbaf=1)
    try:
        st = _roundtrip(ns.snapshot(attached=True))
        fresh = Namespace(1, MemoryBackend(1 << 20))
        try:
            fresh.restore(st)
            assert fresh.snapshot(attached=True) == st and fresh.lba_size == 4096
        finally:
            fresh.close()
    finally:
        ns.close()
