"""Regression tests of the EventIdx policy and the completion paths around a polling
transport (review of the hot path): a lazy EventIdx never outlives the poll (a race of
set_polling(False) with a fetch), nothing is posted while the controller is paused, a
DMA failure on one CQ does not strand the other CQs' commands."""

from __future__ import annotations

import threading
import time

from _helpers import GatedBackend, attach_namespace, wait_until

from pcidev.pci.capabilities.msix import CTRL, CTRL_ENABLE
from pcidev_nvme.queues import CompletionQueue
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import READ


def test_set_polling_false_racing_a_fetch_leaves_the_eventidx_eager(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    ctrl, drv, mem = env.ctrl, env.drv, env.machine.memory
    _dbs, eis = drv.doorbell_buffer_config()
    buf = env.machine.alloc(4096)
    ctrl.set_polling(True)
    drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)
    assert len(drv.reap(1, min_completions=1)) == 1
    # The next fetch's lazy EventIdx store: just before it lands, the transport's
    # thread stops polling (as if between the fetch's read of the policy and its store).
    dma_type = type(ctrl.dma)
    real = dma_type.store32
    fired = []

    def store32(self, addr, value):
        if addr == eis + 8 and not fired and ctrl.shadow.polling:
            fired.append(1)
            ctrl.set_polling(False)
        return real(self, addr, value)

    dma_type.store32 = store32
    try:
        drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)  # shadow only (EventIdx tail - 1)
        assert ctrl.poll_work()
        assert len(drv.reap(1, min_completions=1)) == 1
    finally:
        dma_type.store32 = real
    assert fired
    assert not ctrl.shadow.polling
    assert mem.read_u32(eis + 8) == ctrl.sq(1).tail, "a lazy EventIdx after set_polling(False)"
    drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)
    assert len(drv.reap(1, min_completions=1, timeout=2)) == 1


def test_process_sq_publishes_the_eventidx_even_when_it_fetched_nothing(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    ctrl, drv, mem = env.ctrl, env.drv, env.machine.memory
    _dbs, eis = drv.doorbell_buffer_config()
    sq = ctrl.sq(1)
    mem.write_u32(eis + 8, (sq.tail - 1) % sq.size)  # a stale lazy value, nothing to fetch
    ctrl.kick_all()
    assert mem.read_u32(eis + 8) == sq.tail


def test_set_polling_false_while_paused_posts_nothing(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=1, io_depth=16)
    ctrl, drv, m = env.ctrl, env.drv, env.machine
    drv.delete_io_queue_pair(1)
    drv.create_io_queue_pair(1, 16, cq_size=4)
    _dbs, eis = drv.doorbell_buffer_config()
    buf = m.alloc(4096)
    ctrl.set_polling(True)
    for _ in range(2):
        for _ in range(3):
            drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)
        ctrl.poll_work()
    cq = ctrl.cq(1)
    assert cq.backlog
    ctrl.quiesce()
    assert not ctrl.running
    saved = len(cq.snapshot().backlog)
    got = drv.poll(1)  # the host consumes while the device is stopped
    assert got
    before = cq.posted_total
    ctrl.set_polling(False)
    assert cq.posted_total == before, "CQEs written to guest memory while paused"
    assert len(cq.backlog) == saved
    assert m.memory.read_u32(eis + 12) == cq.head  # the CQ EventIdx is armed
    ctrl.resume()  # re-reads the shadow head: the backlog is posted
    rest = drv.reap(1, min_completions=6 - len(got), timeout=2)
    assert len(got) + len(rest) == 6



def test_a_dma_error_on_one_cq_does_not_strand_the_other_cqs_commands(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=2)
    ctrl, drv = env.ctrl, env.drv
    buf = env.machine.alloc(4096)
    ctrl.cq(1).base = 1 << 46  # CQ 1's memory is not guest RAM
    with ctrl.batch():
        drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)
        drv.submit_rw(2, READ, nsid=1, slba=0, nlb=8, buf=buf)
    assert drv.csts & 2  # CSTS.CFS
    assert not ctrl.sq(1).inflight and not ctrl.sq(2).inflight
    drv.write32(0x14, drv.read32(0x14) & ~1)  # CC.EN = 0
    t = time.monotonic()
    while drv.csts & 1 and time.monotonic() - t < 3:
        time.sleep(0.01)
    assert not drv.csts & 1, "the reset never finishes: a command stays in flight"
    assert ctrl.fsm_state == "disabled"


def _reset_finishes(drv, ctrl) -> None:
    drv.write32(0x14, drv.read32(0x14) & ~1)  # CC.EN = 0
    t = time.monotonic()
    while drv.csts & 1 and time.monotonic() - t < 3:
        time.sleep(0.01)
    assert not drv.csts & 1, "the reset never finishes: a command stays in flight"
    assert ctrl.fsm_state == "disabled"


def _small_cq(env, cq_size: int = 4):
    drv = env.drv
    drv.delete_io_queue_pair(1)
    drv.create_io_queue_pair(1, 16, cq_size=cq_size)
    return drv.doorbell_buffer_config()


def test_cq_arm_leaves_the_eventidx_of_the_head_it_ended_with(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=1, io_depth=16)
    ctrl, drv, mem = env.ctrl, env.drv, env.machine.memory
    dbs, eis = _small_cq(env)
    buf = env.machine.alloc(4096)
    dma_type = type(ctrl.dma)
    real = dma_type.store32
    consumed = []

    def store32(self, addr, value):
        real(self, addr, value)
        if addr == eis + 12 and ctrl.cq(1).backlog and not consumed:
            # the host consumes the 3 entries after this EventIdx store and writes only
            # the shadow head (it read the EventIdx before the store: no ring)
            consumed.append(value)
            drv.queues[1].cq_head = 3
            real(self, dbs + 12, 3)

    dma_type.store32 = store32
    try:
        with ctrl.batch():
            for _ in range(5):
                drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)
    finally:
        dma_type.store32 = real
    cq = ctrl.cq(1)
    assert consumed == [0]
    assert cq.head == 3 and not cq.backlog and cq.posted_total == 5
    assert mem.read_u32(eis + 12) == cq.head, "a stale CQ EventIdx after the arm's own refresh"
    assert len(drv.poll(1)) == 2


def test_a_shadow_head_beyond_what_was_written_is_not_taken(nvme_env, monkeypatch):
    env = nvme_env("ns=mem:size=1M", io_queues=1, io_depth=16)
    ctrl, drv, mem = env.ctrl, env.drv, env.machine.memory
    dbs, _eis = _small_cq(env)
    buf = env.machine.alloc(4096)
    cq = ctrl.cq(1)
    batches = []
    real_post = CompletionQueue.post_batch

    def post_batch(self, m, entries):
        if self is cq:
            batches.append(len(entries))
        return real_post(self, m, entries)

    monkeypatch.setattr(CompletionQueue, "post_batch", post_batch)
    with ctrl.batch():  # two entries the host does not consume yet
        for _ in range(2):
            drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)
    assert (cq.head, cq.tail, batches) == (0, 2, [2])
    mem.write_u32(dbs + 12, 3)  # a head past entry 2, which is not written yet
    with ctrl.batch():  # three more (as many as the reservation allows)
        for _ in range(3):
            drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)
    # entry 2 is written before the host's head 3 is believed; then the rest
    assert batches == [2, 1, 2], batches
    assert cq.head == 3 and cq.posted_total == 5


def test_msix_turned_off_while_polling_rearms_the_cq_eventidx(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    ctrl, drv, mem = env.ctrl, env.drv, env.machine.memory
    _dbs, eis = drv.doorbell_buffer_config()
    buf = env.machine.alloc(4096)
    ctrl.set_polling(True)
    drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)
    assert len(drv.reap(1, min_completions=1)) == 1
    cq = ctrl.cq(1)
    assert mem.read_u32(eis + 12) == (cq.head - 1) % cq.size  # lazy: MSI-X and polling
    cap = ctrl.msix
    control = ctrl.config_read(cap.offset + CTRL, 2)
    ctrl.config_write(cap.offset + CTRL, 2, control & ~CTRL_ENABLE)
    assert not cap.enabled
    assert mem.read_u32(eis + 12) == cq.head, "a lazy CQ EventIdx under INTx"


def test_an_exception_escaping_submit_many_completes_every_command_of_the_fetch(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    ctrl, drv = env.ctrl, env.drv
    buf = env.machine.alloc(4096)
    real = ctrl.io.submit_many

    def broken(reqs):
        real(reqs[:1])
        raise RuntimeError("a bug after the first command")

    ctrl.io.submit_many = broken
    for _ in range(4):
        drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf, ring=False)
    drv.ring(1)
    got = drv.reap(1, min_completions=4, timeout=2)
    assert sorted(c.code for c in got) == [0, Status.INTERNAL, Status.INTERNAL, Status.INTERNAL]
    assert not ctrl.sq(1).inflight
    assert not drv.csts & 2


def test_a_bug_while_posting_combined_completions_strands_nothing(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=2)
    ctrl, drv = env.ctrl, env.drv
    gated = GatedBackend()
    attach_namespace(ctrl, 2, gated)
    drv.scan_namespaces()
    buf = env.machine.alloc(4 * 512)
    real = ctrl._post_to_cq
    calls = []

    def broken(cq, items, tls):
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("a bug while posting")
        return real(cq, items, tls)

    ctrl._post_to_cq = broken
    gated.hold()
    for i in range(4):
        drv.submit(1 + i % 2, READ, nsid=2, cdw10=i, buf=buf + 512 * i, length=512, ring=False, tag=i)
    drv.ring(1)
    drv.ring(2)
    wait_until(lambda: gated.waiting >= 1, what="a worker blocked")
    gated.release()
    wait_until(lambda: ctrl.io.inflight == 0 and ctrl.batches_idle(), what="the workers and the poster")
    assert calls and drv.csts & 2  # the controller failed
    assert not ctrl.sq(1).inflight and not ctrl.sq(2).inflight and not ctrl._combined
    _reset_finishes(drv, ctrl)


def test_set_polling_false_with_hostile_shadow_values_raises_no_event(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    ctrl, drv, mem = env.ctrl, env.drv, env.machine.memory
    dbs, eis = drv.doorbell_buffer_config()
    buf = env.machine.alloc(4096)
    ctrl.set_polling(True)
    drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)
    assert len(drv.reap(1, min_completions=1)) == 1
    before = ctrl.error_log.count
    mem.write_u32(dbs + 8, 0xFFFF)  # SQ tail and CQ head beyond the queues
    mem.write_u32(dbs + 12, 0xFFFF)
    ctrl.set_polling(False)
    assert ctrl.error_log.count == before, "an invalid-doorbell event nobody rang for"
    sq, cq = ctrl.sq(1), ctrl.cq(1)
    assert mem.read_u32(eis + 8) == sq.tail and mem.read_u32(eis + 12) == cq.head
    assert sq.tail == 1 and cq.head == 1


def test_a_kick_of_a_paused_controller_with_a_moved_shadow_tail_returns(nvme_env):
    """A fetch that finds the controller paused (a quiesce began meanwhile) publishes the
    EventIdx and returns, even though the shadow tail moved: it is fetched at the resume."""
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    ctrl, drv, mem = env.ctrl, env.drv, env.machine.memory
    _dbs, eis = drv.doorbell_buffer_config()
    buf = env.machine.alloc(4096)
    ctrl.set_polling(True)
    drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)
    assert len(drv.reap(1, min_completions=1)) == 1
    drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)  # shadow only (lazy EventIdx)
    ctrl.quiesce()
    ctrl.set_polling(False)  # the shadow tail is seen to have moved; nothing is fetched
    kick = threading.Thread(target=ctrl._kick, args=(ctrl.sq(1),), daemon=True)
    kick.start()
    kick.join(2)
    stuck = kick.is_alive()
    ctrl.resume()
    kick.join(2)
    assert not stuck, "the fetch loop spun while the controller was paused"
    assert mem.read_u32(eis + 8) == ctrl.sq(1).tail == 2
    assert len(drv.reap(1, min_completions=1, timeout=2)) == 1


def test_a_bug_in_one_command_of_a_fetch_leaves_the_others_running(nvme_env):
    """An exception that escapes a command's own handling in submit_many (here: posting
    its error status fails once) ends that command with Internal Error; the commands
    after it in the same fetch still run."""
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    ctrl, drv = env.ctrl, env.drv
    data = bytes(range(256)) * 16
    drv.write(1, 0, data)
    bufs = [env.machine.alloc(4096) for _ in range(4)]
    real = ctrl.io._complete
    failed = []

    def complete(req, status=0, dw0=0, dw1=0, *, error=None):
        if status and not failed:
            failed.append(req.cid)
            raise RuntimeError("a bug while completing")
        return real(req, status, dw0, dw1, error=error)

    ctrl.io._complete = complete
    nlbas = drv.namespaces[1].nsze
    cids = [drv.submit_rw(1, READ, nsid=1, slba=nlbas if i == 1 else 0, nlb=8, buf=bufs[i], ring=False)
            for i in range(4)]
    drv.ring(1)
    got = {c.cid: c for c in drv.reap(1, min_completions=4, timeout=2)}
    assert failed == [cids[1]]
    assert got[cids[1]].code == Status.INTERNAL
    for i in (0, 2, 3):
        assert got[cids[i]].ok, got[cids[i]]
        assert env.machine.memory.read(bufs[i], 4096) == data
    assert not ctrl.sq(1).inflight


def test_a_late_mmio_tail_on_a_shadowed_sq_never_rewinds_a_running_fetch(nvme_env):
    """With shadow doorbells the shadow tail is the truth for an I/O SQ; an MMIO tail
    write is a notification that may arrive late (a posted vfio-user write, handled on
    another thread). Landing while another thread fetches the SQ, an older
    value must not rewind the tail the fetch loop reads: (old - head) % size entries of
    the previous lap would be fetched and run again, their completions duplicated (the
    other thread: a completion worker kicking a throttled SQ, or the admin worker)."""
    env = nvme_env("ns=mem:size=1M", io_queues=1, io_depth=16)
    ctrl, drv = env.ctrl, env.drv
    drv.doorbell_buffer_config()
    buf = env.machine.alloc(4096)
    for _ in range(3):  # a lap's worth of history in the SQ slots ahead: real, runnable commands
        for _ in range(5):
            drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf, ring=False)
        drv.ring(1)
        assert len(drv.reap(1, min_completions=5, timeout=10)) == 5
    sq = ctrl.sq(1)
    real = ctrl.io.submit_many
    entered, go = threading.Event(), threading.Event()

    def gated(reqs):
        if not entered.is_set():
            entered.set()
            assert go.wait(10)
        return real(reqs)

    ctrl.io.submit_many = gated
    old_tail = sq.tail
    for i in range(4):
        drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf, ring=False, tag=i)
    new_tail = drv.queues[1].sq_tail
    fetcher = threading.Thread(target=drv.ring, args=(1,))  # shadow + MMIO doorbell: fetches on this thread
    fetcher.start()
    try:
        assert entered.wait(10)
        assert sq.head == new_tail  # the four are fetched; the fetch thread is inside the batch
        # the late one, older than the shadow, from another thread (as a vfio-user server's
        # message thread: not through the host's bus lock, which the fetching thread holds)
        ctrl.bar_write(0, 0x1000 + 8 * 1, 4, (old_tail + 2) % sq.size)
    finally:
        go.set()
        fetcher.join(10)
    got = drv.reap(1, min_completions=4, timeout=10)
    time.sleep(0.2)
    got += drv.poll(1)
    assert sorted(c.tag for c in got if c.tag is not None) == [0, 1, 2, 3]
    assert len(got) == 4, f"{len(got) - 4} completions of commands not outstanding"
    assert all(c.ok for c in got)
    assert sq.head == sq.tail == new_tail
