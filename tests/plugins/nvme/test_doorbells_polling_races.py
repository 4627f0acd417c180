"""Regression tests of the EventIdx policy and the completion paths around a polling
transport (review of the hot path): a lazy EventIdx never outlives the poll (a race of
set_polling(False) with a fetch), nothing is posted while the controller is paused, a
DMA failure on one CQ does not strand the other CQs' commands."""

from __future__ import annotations

import time

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
