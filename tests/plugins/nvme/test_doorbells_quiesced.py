"""Doorbells rung while the controller is quiesced (a migration's stop, a handover), in
process: never dropped (design/issue-11-migration.md, status item 7).

A real transport holds the guest's accesses while the device is quiesced. In process the
software host (:class:`pcidev.host.HostPciDevice`) holds its BAR writes to a quiesced
device and delivers them in order at the resume, or to the device it is re-pointed at (a
migrated copy); and a paused controller that gets a doorbell write anyway (one that lands
while the quiesce drains, a restored controller not resumed yet) records the value and
fetches at its resume. Each test checks every command completes exactly once, with its
data (crc32c per block).
"""

from __future__ import annotations

import os
import time

import crc32c
import pytest
from test_migration_nvme import Host, namespace_crcs

from pcidev.migration import load_device_stream, save_device_stream
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import WRITE

CFG = "serial=DBQ,max_ioqpairs=2,msix_vectors=3,ns=mem:size=1M"
DEPTH = 8


class Writes:
    """Staged 4 KiB writes (each its own random data) on a host (``test_migration_nvme.Host``),
    and the checks: completions per command, every written block read back."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.written: dict[int, bytes] = {}  # slba -> data

    def stage(self, slba: int) -> int:
        """The data of a write at ``slba`` in guest memory; returns its address."""
        data = os.urandom(4096)
        buf = self.host.machine.alloc(4096, 4096)
        self.host.drv.mem.write(buf, data)
        self.written[slba] = data
        return buf

    def submit(self, first: int, count: int, *, qid: int = 1) -> list[int]:
        """``count`` 4 KiB writes (8 blocks each) from block ``first``, rung one by one."""
        drv = self.host.drv
        return [drv.submit_rw(qid, WRITE, nsid=1, slba=first + 8 * i, nlb=8, buf=self.stage(first + 8 * i))
                for i in range(count)]

    def completions(self, qid: int, cids: list[int]) -> dict[int, int]:
        """Wait for every command of ``cids``, then a while longer: completions per cid."""
        drv = self.host.drv
        seen: dict[int, int] = {}
        for cid in cids:
            comp = drv.wait_for(qid, cid, timeout=10)
            assert comp.ok, comp
            seen[cid] = seen.get(cid, 0) + 1
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:  # nothing more: no command completed twice
            for c in drv.poll(qid):
                seen[c.cid] = seen.get(c.cid, 0) + 1
            time.sleep(0.01)
        return seen

    def verify(self) -> int:
        """Every written block reads back through the host (crc32c per 512-byte block)."""
        checked = 0
        for slba, data in sorted(self.written.items()):
            got = self.host.drv.read(1, slba, 8)
            for i in range(8):
                blk = slice(512 * i, 512 * (i + 1))
                assert crc32c.crc32c(got[blk]) == crc32c.crc32c(data[blk]), (slba, i)
                checked += 1
        return checked


@pytest.fixture
def rig(hosts) -> Writes:
    return Writes(hosts(CFG, ram=32 << 20, io_queues=2, io_depth=32))


def _sq(ctrl: NvmeController, qid: int):
    sq = ctrl.submission_queues[qid]
    assert sq is not None
    return sq


def test_doorbells_rung_while_quiesced_are_fetched_at_the_resume_exactly_once(rig):
    ctrl, drv = rig.host.ctrl, rig.host.drv
    first = rig.submit(0, 4)
    assert rig.completions(1, first) == {c: 1 for c in first}
    # completions waiting in CQ 2 when the stop comes: the host consumes them while the
    # controller is quiesced (its CQ head doorbell is held too)
    on_two = rig.submit(512, 2, qid=2)
    deadline = time.monotonic() + 5
    while drv.cq_posted(2) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    ctrl.quiesce()
    sq = _sq(ctrl, 1)
    head, tail = sq.head, sq.tail
    cq_head = ctrl.completion_queues[2].head
    held = rig.submit(64, DEPTH)
    assert rig.completions(2, on_two) == {c: 1 for c in on_two}
    time.sleep(0.1)
    # nothing reached the quiesced controller: its state is as it was saved
    assert (sq.head, sq.tail) == (head, tail) and ctrl.completion_queues[2].head == cq_head
    assert drv.poll(1) == []
    ctrl.resume()
    assert rig.completions(1, held) == {c: 1 for c in held}
    assert ctrl.completion_queues[2].head != cq_head  # the held CQ head write arrived
    assert rig.verify() == 8 * (4 + 2 + DEPTH)


def test_a_paused_controller_takes_a_doorbell_written_to_it_and_fetches_at_the_resume(rig):
    """The device itself (no host in between: a write landing while the quiesce drains, or
    at a restored controller before its resume): the tail is recorded, nothing is fetched
    while paused, everything is fetched at the resume."""
    ctrl, drv = rig.host.ctrl, rig.host.drv
    ctrl.quiesce()
    cids = [drv.submit_rw(1, WRITE, nsid=1, slba=8 * i, nlb=8, buf=rig.stage(8 * i), ring=False)
            for i in range(DEPTH)]
    q = drv.queues[1]
    ctrl.bar_write(0, q.sq_db, 4, q.sq_tail)  # straight to the device, not through the host
    sq = _sq(ctrl, 1)
    assert sq.tail == q.sq_tail  # recorded
    time.sleep(0.1)
    assert sq.head != sq.tail and drv.poll(1) == []  # not fetched while paused
    ctrl.resume()
    assert rig.completions(1, cids) == {c: 1 for c in cids}
    assert rig.verify() == 8 * DEPTH


def test_a_doorbell_rung_after_the_save_goes_to_the_destination(rig):
    """In-process migration: the host rings after the source's state was saved; the write
    is held (the source's state stays the saved one) and goes to the destination the
    handle is re-pointed at, which runs the commands once; the source never fetched them."""
    host = rig.host
    src = host.ctrl
    before = rig.submit(0, 4)
    assert rig.completions(1, before) == {c: 1 for c in before}
    src.quiesce()
    crcs = namespace_crcs(src)
    data, fds = save_device_stream(src)
    held = rig.submit(128, DEPTH)
    sq = _sq(src, 1)
    assert sq.head == sq.tail == 4  # the saved state: nothing rung since
    dst = NvmeController(src.cfg, name="dst")
    host.resources.append(load_device_stream(dst, data, fds))
    assert namespace_crcs(dst) == crcs
    host.repoint(dst)  # the held writes go to the destination (restored, not resumed yet)
    dst.resume()
    assert rig.completions(1, held) == {c: 1 for c in held}
    assert (sq.head, sq.tail) == (4, 4)  # the source fetched nothing
    assert rig.verify() == 8 * (4 + DEPTH)
