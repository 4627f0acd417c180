"""queues.py on its own: the one CQE writer (post_batch) across the wrap, the backlog
drain, and the SQ ring read."""

from __future__ import annotations

import os
import struct

import pytest

from pcidev.dma import GuestMemory, alloc_memfd
from pcidev_nvme.queues import CompletionQueue, SubmissionQueue

CQ_BASE, SQ_BASE = 0x1000, 0x4000


@pytest.fixture
def mem():
    fd = alloc_memfd(1 << 20)
    m = GuestMemory()
    m.map(0, 1 << 20, fd)
    os.close(fd)
    yield m
    m.close()


def _cqe(mem, cq, slot):
    dw0, dw1, sqhd, sqid, dw3 = struct.unpack("<IIHHI", mem.read(cq.base + 16 * slot, 16))
    return dw0, dw1, sqhd, sqid, dw3 & 0xFFFF, (dw3 >> 16) & 1, dw3 >> 17


def test_post_batch_wraps_and_flips_the_phase(mem):
    cq = CompletionQueue(1, CQ_BASE, 4, 0, True)
    cq.head = cq.tail = 2
    entries = []
    phase, tail = cq.phase, cq.tail
    for cid in range(3):
        entries.append((cid, 0, 7, 1, cid | (phase << 16) | (0x4002 << 17 if cid == 1 else 0)))
        tail += 1
        if tail == cq.size:
            tail, phase = 0, phase ^ 1
    cq.post_batch(mem, entries)
    assert (cq.tail, cq.phase) == (1, 0)
    assert _cqe(mem, cq, 2)[4:6] == (0, 1) and _cqe(mem, cq, 3)[4:7] == (1, 1, 0x4002)
    assert _cqe(mem, cq, 0)[4:6] == (2, 0)
    assert cq.posted_total == 3


def test_backlog_drains_in_order_with_the_phase_of_each_slot(mem):
    cq = CompletionQueue(1, CQ_BASE, 4, 0, True)
    sq = SubmissionQueue(1, SQ_BASE, 8, cq)
    cq.attach(sq)
    cq.head, cq.tail = 0, 3  # full: one slot always stays empty
    for cid in (10, 11, 12):
        cq.backlog.append((sq, cid, 0, cid, 0))
    cq.reserved = 3
    assert cq.drain_backlog(mem) == 0  # no room
    cq.head = 2  # the host consumed two entries
    assert cq.drain_backlog(mem) == 2
    assert [_cqe(mem, cq, s)[4] for s in (3, 0)] == [10, 11]
    assert [_cqe(mem, cq, s)[5] for s in (3, 0)] == [1, 0]
    assert (cq.tail, cq.phase, cq.reserved, len(cq.backlog)) == (1, 0, 1, 1)


def test_sq_fetch_reads_across_the_wrap(mem):
    cq = CompletionQueue(1, CQ_BASE, 4, 0, True)
    sq = SubmissionQueue(1, SQ_BASE, 4, cq)
    for i in range(4):
        mem.write(SQ_BASE + 64 * i, bytes([i]) * 64)
    sq.head, sq.tail = 3, 1
    raw = sq.fetch(mem, 2)
    assert raw[:64] == bytes([3]) * 64 and raw[64:] == bytes([0]) * 64
    assert sq.head == 1 and sq.fetched_total == 2
