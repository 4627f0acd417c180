"""Abort (admin 08h, pcidev_nvme.abort) of any outstanding command: one waiting for a
worker, one still in its submission queue, an Asynchronous Event Request; and what is
not aborted (I/O already started, unknown commands). Every aborted command completes
exactly once, with Command Abort Requested, and its data never reaches the namespace."""

from __future__ import annotations

import collections
import threading
import time

import pytest
from _helpers import GatedBackend, attach_namespace, wait_until

from pcidev_nvme.abort import Aborts, AbortsState, PendingAbort
from pcidev_nvme.io import DEFAULT_WORKERS
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import WRITE

NS = 2
#: blocks of 512 bytes in a region of the block locks (pcidev_nvme.atomicity.BlockLocks)
REGION = 256


@pytest.fixture
def env(nvme_env):
    env = nvme_env("ns=mem:size=4M", io_queues=2)
    env.backend = GatedBackend(1 << 20)
    attach_namespace(env.ctrl, NS, env.backend)
    env.drv.scan_namespaces()
    return env


def submit_write(drv, qid: int, slba: int, fill: int) -> int:
    buf = drv.machine.alloc(4096, 4096)
    drv.mem.write(buf, bytes([fill]) * 512)
    return drv.submit(qid, WRITE, nsid=NS, cdw10=slba, cdw12=0, buf=buf, length=512)


def reap_all(drv, qid: int, cids: set[int], timeout: float = 10.0) -> dict[int, list[int]]:
    """Completions of ``cids`` by CID (a list each, to count them)."""
    seen: dict[int, list[int]] = collections.defaultdict(list)
    deadline = time.monotonic() + timeout
    while set(seen) != cids and time.monotonic() < deadline:
        for c in drv.poll(qid):
            seen[c.cid].append(c.code)
        time.sleep(0.001)
    time.sleep(0.05)
    for c in drv.poll(qid):  # nothing more may come
        seen[c.cid].append(c.code)
    return seen


def test_abort_a_command_waiting_for_a_worker(env):
    drv, backend = env.drv, env.backend
    backend.hold()
    # (a region of the block locks apart: writes to one region would wait for each other)
    cids = [submit_write(drv, 1, i * REGION, 0x10 + i) for i in range(DEFAULT_WORKERS + 2)]
    wait_until(lambda: backend.waiting == DEFAULT_WORKERS, what="the workers to block")
    queued, started = cids[-1], cids[0]
    assert drv.abort(1, queued).dw0 & 1 == 0  # aborted
    assert drv.abort(1, started).dw0 & 1 == 1  # its write is under way: not aborted
    assert drv.abort(1, queued).dw0 & 1 == 1  # already completed
    backend.release()
    seen = reap_all(drv, 1, set(cids))
    assert seen[queued] == [Status.ABORT_REQUESTED]
    for cid in cids[:-1]:
        assert seen[cid] == [0], cid
    # data: the aborted write never happened, the others did
    for i in range(DEFAULT_WORKERS + 1):
        assert backend.data[i * REGION * 512:i * REGION * 512 + 512] == bytes([0x10 + i]) * 512
    last = (DEFAULT_WORKERS + 1) * REGION * 512
    assert backend.data[last:last + 512] == bytes(512)
    entry = env.ctrl.error_log.entries()[0]
    assert entry["cid"] == queued and entry["status"] & 0x7FF == Status.ABORT_REQUESTED


def test_abort_a_command_still_in_the_submission_queue(env):
    drv, backend = env.drv, env.backend
    drv.delete_io_queue_pair(2)
    drv.create_io_queue_pair(2, 8, cq_size=2)  # room for one completion: the next command waits in the SQ
    backend.hold()
    first = submit_write(drv, 2, 0, 0xA1)
    wait_until(lambda: backend.waiting == 1, what="the first write to block")
    second = submit_write(drv, 2, 1, 0xA2)
    sq = env.ctrl.sq(2)
    assert sq.pending == 1  # not fetched
    assert drv.abort(2, second).dw0 & 1 == 0
    state = env.ctrl.aborts.snapshot()  # what a migration carries now
    assert state == AbortsState((PendingAbort(2, second),))
    other = Aborts(env.ctrl, env.ctrl.io, env.ctrl.aer)
    other.restore(state)
    assert other.take(2, second) and not other.active
    backend.release()
    seen = reap_all(drv, 2, {first, second})
    assert seen == {first: [0], second: [Status.ABORT_REQUESTED]}
    assert backend.data[:512] == b"\xa1" * 512 and backend.data[512:1024] == bytes(512)
    assert not env.ctrl.aborts.active  # the remembered abort was used once


def test_abort_an_asynchronous_event_request(env):
    drv = env.drv
    cid = drv.submit(0, 0x0C, tag="mine")
    wait_until(lambda: env.ctrl.aer.outstanding, what="the AER to be parked")
    assert drv.abort(0, cid).dw0 & 1 == 0
    comp = drv.wait_for(0, cid)
    assert comp.code == Status.ABORT_REQUESTED


def test_what_is_not_aborted(env):
    drv = env.drv
    assert drv.abort(1, 0x1234).dw0 & 1 == 1  # no such command
    assert drv.abort(7, 1).dw0 & 1 == 1  # no such queue
    # an admin command being executed (the Abort itself)
    cid = drv.submit(0, 0x08, cdw10=(0xBEEF << 16))
    comp = drv.wait_for(0, cid)
    assert comp.ok and comp.dw0 & 1 == 1
    # memory I/O completes before an Abort can see it
    drv.write(1, 0, b"\x55" * 512)
    assert drv.read(1, 0, 1) == b"\x55" * 512


def test_identify_acl_and_effects(env):
    idc = env.drv.identify(1)
    assert idc[258] == 3
    effects = env.drv.get_log(0x05, 4096)
    assert effects[4 * 0x08] & 1


def _one_waiting_in_the_sq(env) -> tuple[int, int]:
    """SQ 2 with room for one completion: the first write blocks in the backend, the
    second waits unfetched in the SQ. Returns their CIDs (the backend is held)."""
    drv, backend = env.drv, env.backend
    drv.delete_io_queue_pair(2)
    drv.create_io_queue_pair(2, 8, cq_size=2)
    backend.hold()
    first = submit_write(drv, 2, 0, 0xA1)
    wait_until(lambda: backend.waiting == 1, what="the first write to block")
    second = submit_write(drv, 2, 1, 0xA2)
    assert env.ctrl.sq(2).pending == 1
    return first, second


def test_deleting_the_queue_forgets_its_aborts(env):
    """A remembered abort goes with its SQ: the migration check stays happy and a
    command with the same CID on the recreated queue runs."""
    from pcidev_nvme.migration import check, save

    drv, backend, ctrl = env.drv, env.backend, env.ctrl
    first, stuck = _one_waiting_in_the_sq(env)
    assert drv.abort(2, stuck).dw0 & 1 == 0
    assert ctrl.aborts.snapshot() == AbortsState((PendingAbort(2, stuck),))
    # Delete SQ 2 waits for the first write (released a moment later); the second is never fetched
    threading.Timer(0.2, backend.release).start()
    drv.delete_io_queue_pair(2)
    assert ctrl.aborts.snapshot() is None and not ctrl.aborts.active
    ctrl.quiesce()
    try:
        check(ctrl, save(ctrl))  # no abort for a queue that does not exist
    finally:
        ctrl.resume()
    drv.create_io_queue_pair(2, 8)
    buf = drv.machine.alloc(4096, 4096)
    drv.mem.write(buf, b"\xd7" * 512)
    comp = drv.io(2, WRITE, nsid=NS, cdw10=9, cdw12=0, buf=buf, length=512, cid=stuck, check=False)
    assert comp.code == 0
    assert backend.data[9 * 512:10 * 512] == b"\xd7" * 512


def test_an_abort_racing_with_the_fetch_is_never_both(env, monkeypatch):
    """The entry is fetched while the Abort searches the SQ (a completion kicks the
    throttled queue): the command is aborted, not executed, and nothing stays behind."""
    drv, backend, ctrl = env.drv, env.backend, env.ctrl
    first, second = _one_waiting_in_the_sq(env)
    sq = ctrl.sq(2)
    search = Aborts._in_queue

    def search_then_fetch(self, q, cid):
        found = search(self, q, cid)
        backend.release()  # the first write completes; its completion fetches the second
        wait_until(lambda: sq.pending == 0, what="the second write to be fetched")
        return found

    monkeypatch.setattr(Aborts, "_in_queue", search_then_fetch)
    assert drv.abort(2, second).dw0 & 1 == 0
    seen = reap_all(drv, 2, {first, second})
    assert seen == {first: [0], second: [Status.ABORT_REQUESTED]}
    assert backend.data[512:1024] == bytes(512)  # the aborted write never ran
    assert not ctrl.aborts.active
