"""The split virtqueue on its own, with a fake device: chains, indirect tables, EVENT_IDX
and NO_INTERRUPT suppression, batching, the in-flight list, and hostile rings (hypothesis)
that must end in VirtqueueError or a valid chain, never anything else, and never leave
guest memory pinned."""

from __future__ import annotations

import os
import struct

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcidev import DmaError
from pcidev.dma import GuestMemory, alloc_memfd
from pcidev_virtio import spec
from pcidev_virtio.errors import VirtqueueError
from pcidev_virtio.virtqueue import Virtqueue, vring_need_event

RAM = 1 << 20
DESC, AVAIL, USED, DATA = 0x1000, 0x3000, 0x4000, 0x10000
SIZE = 16
F = spec.Feature


class FakeDevice:
    def __init__(self, features: int = (1 << F.RING_INDIRECT_DESC) | (1 << F.RING_EVENT_IDX)) -> None:
        self.memory = GuestMemory()
        fd = alloc_memfd(RAM, "vq-test")
        self.memory.map(0, RAM, fd)
        os.close(fd)
        self.features = features
        self.interrupts = 0

    @property
    def dma(self) -> GuestMemory:
        return self.memory

    def negotiated(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def queue_interrupt(self, vq: Virtqueue) -> None:
        self.interrupts += 1


@pytest.fixture
def dev():
    d = FakeDevice()
    yield d
    d.memory.close()


def make_vq(dev: FakeDevice, size: int = SIZE) -> Virtqueue:
    vq = Virtqueue(dev, 0, size)
    vq.desc, vq.driver, vq.device = DESC, AVAIL, USED
    assert vq.check_config() is None
    vq.enabled = True
    return vq


def desc(dev, i, addr, length, flags=0, nxt=0, table=DESC):
    dev.memory.write_struct(spec.DESC, table + 16 * i, addr, length, flags, nxt)


def make_available(dev, vq, *heads, start=0):
    for k, head in enumerate(heads):
        dev.memory.write_u16(AVAIL + 4 + 2 * ((start + k) % vq.size), head)
    dev.memory.write_u16(AVAIL + 2, (start + len(heads)) & 0xFFFF)


def test_a_chain_of_readable_then_writable_buffers(dev):
    vq = make_vq(dev)
    dev.memory.write(DATA, b"hello")
    desc(dev, 3, DATA, 5, spec.VRING_DESC_F_NEXT, 7)
    desc(dev, 7, DATA + 0x100, 8, spec.VRING_DESC_F_WRITE | spec.VRING_DESC_F_NEXT, 1)
    desc(dev, 1, DATA + 0x200, 0, spec.VRING_DESC_F_WRITE)  # zero-length: allowed, no view
    make_available(dev, vq, 3)
    elem = vq.pop()
    assert elem is not None and elem.head == 3
    assert bytes(elem.out_bufs[0]) == b"hello" and (elem.out_len(), elem.in_len()) == (5, 8)
    elem.in_bufs[0][:] = b"ABCDEFGH"  # zero copy: straight into guest memory
    assert dev.memory.read(DATA + 0x100, 8) == b"ABCDEFGH"
    assert vq.inflight() == (3,) and vq.pop() is None
    vq.push(elem, 100)  # cut to the buffers' size
    assert vq.inflight() == ()
    assert dev.memory.read(USED + 2, 2) == b"\0\0"  # not visible before the flush
    vq.flush()
    assert struct.unpack("<HHII", dev.memory.read(USED, 12)) == (0, 1, 3, 8)
    assert dev.interrupts == 1
    dev.memory.unmap(0)  # nothing left pinned


def test_indirect_table(dev):
    vq = make_vq(dev)
    table = 0x8000
    desc(dev, 0, DATA, 4, spec.VRING_DESC_F_NEXT, 1, table=table)
    desc(dev, 1, DATA + 64, 32, spec.VRING_DESC_F_WRITE, table=table)
    desc(dev, 5, table, 32, spec.VRING_DESC_F_INDIRECT)
    make_available(dev, vq, 5)
    elem = vq.pop()
    assert elem is not None and (elem.head, elem.out_len(), elem.in_len()) == (5, 4, 32)
    vq.push(elem, 32)
    vq.flush()


def test_direct_descriptors_followed_by_an_indirect_one(dev):
    """Spec 2.7.5.3.2: the device handles normal chained descriptors followed by one indirect."""
    vq = make_vq(dev)
    table = 0x8000
    dev.memory.write(DATA, b"head")
    desc(dev, 0, DATA + 64, 16, spec.VRING_DESC_F_WRITE, table=table)
    desc(dev, 2, DATA, 4, spec.VRING_DESC_F_NEXT, 9)
    desc(dev, 9, table, 16, spec.VRING_DESC_F_INDIRECT | spec.VRING_DESC_F_WRITE)  # WRITE ignored here
    make_available(dev, vq, 2)
    elem = vq.pop()
    assert elem is not None and (elem.out_len(), elem.in_len()) == (4, 16)
    vq.push(elem, 16)


@pytest.mark.parametrize("build, message", [
    (lambda d: (desc(d, 0, DATA, 4, spec.VRING_DESC_F_NEXT, 1), desc(d, 1, DATA, 4, spec.VRING_DESC_F_NEXT, 0)),
     "longer than"),
    (lambda d: desc(d, 0, DATA, 4, spec.VRING_DESC_F_NEXT, SIZE), "outside the descriptor table"),
    (lambda d: desc(d, 0, RAM - 2, 4), "buffer"),
    (lambda d: desc(d, 0, 2**64 - 1, 2, spec.VRING_DESC_F_WRITE), "buffer"),
    (lambda d: (desc(d, 0, DATA, 4, spec.VRING_DESC_F_WRITE | spec.VRING_DESC_F_NEXT, 1), desc(d, 1, DATA, 4)),
     "readable buffer after"),
    (lambda d: desc(d, 0, 0x8000, 0, spec.VRING_DESC_F_INDIRECT), "indirect table length"),
    (lambda d: desc(d, 0, 0x8000, 24, spec.VRING_DESC_F_INDIRECT), "indirect table length"),
    (lambda d: desc(d, 0, 0x8000, 16 * (SIZE + 1), spec.VRING_DESC_F_INDIRECT), "longer than the queue"),
    (lambda d: (desc(d, 0, DATA, 4, spec.VRING_DESC_F_NEXT, 1), desc(d, 1, 0x8000, 16 * SIZE,
                                                                       spec.VRING_DESC_F_INDIRECT)),
     "longer than the queue"),
    (lambda d: desc(d, 0, RAM - 16, 32, spec.VRING_DESC_F_INDIRECT), "outside guest memory"),
    (lambda d: desc(d, 0, 0x8000, 16, spec.VRING_DESC_F_INDIRECT | spec.VRING_DESC_F_NEXT, 1), "must end"),
    (lambda d: (desc(d, 0, 0x8000, 16, spec.VRING_DESC_F_INDIRECT),
                desc(d, 0, 0x9000, 16, spec.VRING_DESC_F_INDIRECT, table=0x8000)), "inside an indirect"),
    (lambda d: (desc(d, 0, 0x8000, 32, spec.VRING_DESC_F_INDIRECT),
                desc(d, 0, DATA, 1, spec.VRING_DESC_F_NEXT, 1, table=0x8000),
                desc(d, 1, DATA, 1, spec.VRING_DESC_F_NEXT, 0, table=0x8000)), "longer than"),
])
def test_malformed_chains_are_refused_and_nothing_is_taken(dev, build, message):
    vq = make_vq(dev)
    build(dev)
    make_available(dev, vq, 0)
    with pytest.raises(VirtqueueError, match=message):
        vq.pop()
    assert vq.last_avail_idx == 0 and vq.inflight() == ()
    dev.memory.unmap(0)  # no view left pinned


def test_a_chain_of_4_gib_or_more_is_refused():
    """The used entry's length is 32 bits; the guest's RAM here is a sparse 6 GiB memfd."""
    d = FakeDevice()
    big = 6 << 30
    fd = alloc_memfd(big, "vq-big")
    d.memory.map(1 << 32, big, fd)
    os.close(fd)
    try:
        vq = make_vq(d)
        desc(d, 0, 1 << 32, 3 << 30, spec.VRING_DESC_F_WRITE | spec.VRING_DESC_F_NEXT, 1)
        desc(d, 1, (1 << 32) + (3 << 30), 3 << 30, spec.VRING_DESC_F_WRITE)
        make_available(d, vq, 0)
        with pytest.raises(VirtqueueError, match="2\\*\\*32"):
            vq.pop()
    finally:
        d.memory.close()


def test_indirect_without_the_feature_is_refused(dev):
    dev.features = 0
    vq = make_vq(dev)
    desc(dev, 0, 0x8000, 16, spec.VRING_DESC_F_INDIRECT)
    make_available(dev, vq, 0)
    with pytest.raises(VirtqueueError, match="VIRTIO_F_INDIRECT_DESC"):
        vq.pop()


def test_ring_errors(dev):
    vq = make_vq(dev)
    make_available(dev, vq, SIZE)  # head beyond the queue
    with pytest.raises(VirtqueueError, match="outside a queue"):
        vq.pop()
    dev.memory.write_u16(AVAIL + 2, SIZE + 1)  # idx jumped by more than the queue holds
    with pytest.raises(VirtqueueError, match="ahead"):
        vq.pop()
    vq.driver = RAM + 0x1000
    with pytest.raises(VirtqueueError, match="unreadable"):
        vq.pop()


def test_a_head_made_available_twice_while_in_flight_is_refused(dev):
    vq = make_vq(dev)
    desc(dev, 2, DATA, 8, spec.VRING_DESC_F_WRITE)
    make_available(dev, vq, 2, 2)
    assert vq.pop() is not None
    with pytest.raises(VirtqueueError, match="again"):
        vq.pop()


def test_batching_one_flush_one_interrupt_and_event_idx(dev):
    vq = make_vq(dev)
    for i in range(8):
        desc(dev, i, DATA + 64 * i, 64, spec.VRING_DESC_F_WRITE)
    make_available(dev, vq, *range(8))
    elems = []
    while (e := vq.pop()) is not None:
        elems.append(e)
    assert [e.head for e in elems] == list(range(8)) and vq.inflight() == tuple(range(8))
    assert dev.memory.read_u16(USED + 4 + 8 * SIZE) == 8  # avail_event: the next index looked at
    dev.memory.write_u16(AVAIL + 4 + 2 * SIZE, 0)  # used_event 0: interrupt once entry 0 is used
    for e in elems[:4]:
        vq.push(e, 64)
    vq.flush()
    assert dev.interrupts == 1 and dev.memory.read_u16(USED + 2) == 4
    for e in elems[4:6]:
        vq.push(e, 64)
    vq.flush()  # used_event 0 was already crossed: no interrupt
    assert dev.interrupts == 1
    dev.memory.write_u16(AVAIL + 4 + 2 * SIZE, 6)
    for e in elems[6:]:
        vq.push(e, 64)
    vq.flush()
    assert dev.interrupts == 2
    vq.flush()  # nothing new: nothing happens
    assert dev.interrupts == 2


def test_no_interrupt_flag_without_event_idx(dev):
    dev.features = 0
    vq = make_vq(dev)
    desc(dev, 0, DATA, 8, spec.VRING_DESC_F_WRITE)
    dev.memory.write_u16(AVAIL, spec.VRING_AVAIL_F_NO_INTERRUPT)
    make_available(dev, vq, 0)
    vq.push(vq.pop(), 8)
    vq.flush()
    assert dev.interrupts == 0
    dev.memory.write_u16(AVAIL, 0)
    make_available(dev, vq, 0, start=1)
    vq.push(vq.pop(), 8)
    vq.flush()
    assert dev.interrupts == 1


def test_indices_wrap_at_65536(dev):
    vq = make_vq(dev, size=4)
    vq.last_avail_idx = vq.used_idx = vq.published_used_idx = 0xFFFE
    desc(dev, 1, DATA, 8, spec.VRING_DESC_F_WRITE)
    for k in range(4):
        make_available(dev, vq, 1, start=0xFFFE + k)
        vq.push(vq.pop(), 8)
        vq.flush()
    assert vq.last_avail_idx == vq.used_idx == 2


def test_vring_need_event():
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 3, 0)
    assert vring_need_event(5, 6, 0)
    assert vring_need_event(0xFFFF, 0, 0xFFFE)  # wrapping


def test_snapshot_restore_and_read_chain(dev):
    vq = make_vq(dev)
    desc(dev, 4, DATA, 8, spec.VRING_DESC_F_WRITE)
    make_available(dev, vq, 4)
    elem = vq.pop()
    state = vq.snapshot()
    assert state.inflight == (4,) and state.last_avail_idx == 1 and state.used_idx == 0
    other = Virtqueue(dev, 0, SIZE)
    other.check_state(state, lambda m, f: ValueError(m))
    other.restore(state)
    again = other.read_chain(4)
    assert again.in_len() == 8
    other.push(again, 8)
    other.flush()
    elem.release()
    bad = [attrs.evolve(state, inflight=(4, 4)), attrs.evolve(state, size=3), attrs.evolve(state, inflight=())]
    for s in bad:
        with pytest.raises(ValueError):
            other.check_state(s, lambda m, f: ValueError(m))


@settings(max_examples=400, deadline=None)
@given(descs=st.lists(st.tuples(st.integers(0, RAM + 0x1000), st.integers(0, 0x3000),
                                st.integers(0, 7), st.integers(0, SIZE + 2)), min_size=SIZE, max_size=SIZE),
       indirect=st.lists(st.tuples(st.integers(0, RAM), st.integers(0, 0x100), st.integers(0, 7),
                                   st.integers(0, 10)), max_size=8),
       heads=st.lists(st.integers(0, SIZE + 2), min_size=1, max_size=SIZE),
       avail_idx=st.integers(0, 0xFFFF))
def test_hostile_rings_give_chains_or_virtqueue_errors(descs, indirect, heads, avail_idx):
    d = FakeDevice()
    try:
        vq = make_vq(d)
        for i, (addr, length, flags, nxt) in enumerate(descs):
            desc(d, i, addr, length, flags, nxt)
        for i, (addr, length, flags, nxt) in enumerate(indirect):
            desc(d, i, addr, length, flags, nxt, table=0x8000)
        make_available(d, vq, *heads)
        d.memory.write_u16(AVAIL + 2, avail_idx)
        taken = []
        for _ in range(SIZE + 1):
            try:
                elem = vq.pop()
            except VirtqueueError:
                break
            if elem is None:
                break
            assert elem.out_len() + elem.in_len() <= SIZE * 0x3000
            taken.append(elem)
        for elem in taken:
            vq.push(elem, elem.in_len())
        vq.flush()
        assert vq.inflight() == ()
        d.memory.unmap(0)  # every view was released
    finally:
        d.memory.close()


def test_check_config_looks_at_the_memory_map_not_the_dma_guard(dev):
    """A configuration is judged against the guest's memory, not against whether the
    device may reach it right now (Bus Master Enable off: ``dma`` refuses)."""
    class NoMaster(FakeDevice):
        @property
        def dma(self) -> GuestMemory:
            raise DmaError("bus mastering is disabled")

    owner = NoMaster()
    try:
        vq = Virtqueue(owner, 0, SIZE)
        vq.desc, vq.driver, vq.device = DESC, AVAIL, USED
        assert vq.check_config() is None
        vq.device = RAM  # outside guest memory: still refused
        assert "outside guest memory" in (vq.check_config() or "")
    finally:
        owner.memory.close()
