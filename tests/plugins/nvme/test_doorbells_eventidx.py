"""The EventIdx policy of the shadow doorbells and the transport hooks (PciDevice.batch,
poll_work, set_polling): without a polling transport every EventIdx is eager, as
before; while one polls, an I/O SQ's EventIdx is tail - 1 (the host does not ring,
poll_work finds the shadow tail) and, with MSI-X, an I/O CQ's is head - 1 (the host
rings at most once per wrap) unless completions wait for room; the controller reads
the shadow CQ head before it decides that a CQ is full; stopping the poll arms every
EventIdx again and reads the shadows once more."""

from __future__ import annotations

from pcidev_nvme.testing.driver import READ


class Shadow:
    """The driver's shadow doorbell and EventIdx buffers, and an MMIO doorbell counter."""

    def __init__(self, env):
        self.env = env
        self.mem = env.machine.memory
        self.dbs, self.eis = env.drv.doorbell_buffer_config()
        self.mmio = []
        drv = env.drv
        real = drv._bar_write

        def counting(bar, off, size, value):
            if off >= 0x1000:
                self.mmio.append((off, value))
            return real(bar, off, size, value)

        drv._bar_write = counting

    def sq_ei(self, qid: int) -> int:
        return self.mem.read_u32(self.eis + 8 * qid)

    def cq_ei(self, qid: int) -> int:
        return self.mem.read_u32(self.eis + 8 * qid + 4)

    def sq_rings(self, qid: int) -> int:
        return sum(1 for off, _ in self.mmio if off == 0x1000 + 8 * qid)

    def cq_rings(self, qid: int) -> int:
        return sum(1 for off, _ in self.mmio if off == 0x1000 + 8 * qid + 4)


def _submit(env, qid: int, n: int, *, ring: bool = True) -> None:
    drv = env.drv
    buf = env.machine.alloc(n * 4096)
    for i in range(n):
        drv.submit_rw(qid, READ, nsid=1, slba=8 * i, nlb=8, buf=buf + 4096 * i, ring=False)
    if ring:
        drv.ring(qid)


def test_without_polling_every_eventidx_is_eager(nvme_env):
    env = nvme_env(io_queues=1)
    sh = Shadow(env)
    ctrl, drv = env.ctrl, env.drv
    for _ in range(3):
        _submit(env, 1, 4)
        assert sh.sq_ei(1) == ctrl.sq(1).tail
        assert len(drv.reap(1, min_completions=4)) == 4
        assert sh.cq_ei(1) == ctrl.cq(1).head == drv.queues[1].cq_head
    assert sh.sq_rings(1) == 3 and sh.cq_rings(1) == 3  # the host rang every time
    assert ctrl.poll_work() is False


def test_polling_suppresses_sq_doorbells_and_poll_work_finds_the_shadow_tail(nvme_env):
    env = nvme_env(io_queues=1)
    sh = Shadow(env)
    ctrl, drv = env.ctrl, env.drv
    ctrl.set_polling(True)
    _submit(env, 1, 4)  # the EventIdx was still eager: this one rings
    size = ctrl.sq(1).size
    assert sh.sq_rings(1) == 1
    assert sh.sq_ei(1) == (ctrl.sq(1).tail - 1) % size == 3
    assert len(drv.reap(1, min_completions=4)) == 4
    _submit(env, 1, 5)  # written only to the shadow
    assert sh.sq_rings(1) == 1
    assert ctrl.sq(1).tail == 4 and drv.poll(1) == []
    assert ctrl.poll_work() is True
    got = drv.reap(1, min_completions=5)
    assert len(got) == 5 and all(c.ok for c in got)
    assert sh.sq_ei(1) == 8
    assert ctrl.poll_work() is False  # nothing new


def test_cq_eventidx_while_polling_with_msix_and_its_wrap(nvme_env):
    env = nvme_env(io_queues=1, io_depth=8)
    sh = Shadow(env)
    ctrl, drv = env.ctrl, env.drv
    ctrl.set_polling(True)
    cq = ctrl.cq(1)
    _submit(env, 1, 4)
    assert len(drv.reap(1, min_completions=4)) == 4
    # the first head update rang (EventIdx was eager) and got the lazy value back
    assert sh.cq_rings(1) == 1
    assert cq.head == 4 and sh.cq_ei(1) == 3
    for _ in range(2):
        _submit(env, 1, 2)
        ctrl.poll_work()
        assert len(drv.reap(1, min_completions=2)) == 2
    # heads 6 and 0 (across the wrap) were written only to the shadow: the host rings
    # again only when it passes index 4 again
    assert drv.queues[1].cq_head == 0
    assert sh.cq_rings(1) == 1
    assert cq.head == 4 and sh.cq_ei(1) == 3
    drv._bar_write(0, 0x1000 + 8 + 4, 4, 0)  # a (late) MMIO write of head 0
    assert cq.head == 0 and sh.cq_ei(1) == 7  # the EventIdx wraps
    _submit(env, 1, 3)
    ctrl.poll_work()
    assert len(drv.reap(1, min_completions=3)) == 3
    assert sh.cq_rings(1) == 2 and cq.head == 0  # suppressed: the controller's head is old
    _submit(env, 1, 6)
    ctrl.poll_work()
    assert len(drv.reap(1, min_completions=6)) == 6  # 3 -> 1: passes index 7
    assert sh.cq_rings(1) == 3 and cq.head == 1 and sh.cq_ei(1) == 0


def test_a_full_cq_takes_the_shadow_head_before_backlogging(nvme_env):
    env = nvme_env(io_queues=0)
    drv, ctrl = env.drv, env.ctrl
    drv.create_io_queue_pair(1, 16, cq_size=4)
    sh = Shadow(env)
    ctrl.set_polling(True)
    cq = ctrl.cq(1)
    for rnd in range(4):
        _submit(env, 1, 3)  # (the shadow tail; an MMIO write only the first time)
        drv._bar_write(0, 0x1000 + 8, 4, drv.queues[1].sq_tail)  # MMIO: no poll_work here
        # each time the controller's head is older than the host's, but the CQ never
        # backlogs: it reads the shadow head when it looks full
        assert not cq.backlog, rnd
        got = drv.reap(1, min_completions=3)
        assert len(got) == 3 and all(c.ok for c in got)
    assert sh.cq_rings(1) < 4  # at least one head update was only in the shadow
    assert cq.reserved == 0


def test_completions_waiting_for_room_arm_the_cq_eventidx(nvme_env):
    env = nvme_env(io_queues=0)
    drv, ctrl = env.drv, env.ctrl
    drv.create_io_queue_pair(1, 16, cq_size=4)
    sh = Shadow(env)
    ctrl.set_polling(True)
    cq = ctrl.cq(1)
    buf = env.machine.alloc(6 * 4096)
    for i in range(6):
        drv.submit_rw(1, READ, nsid=1, slba=8 * i, nlb=8, buf=buf + 4096 * i, ring=False, tag=i)
    drv.ring(1)
    ctrl.poll_work()
    assert len(cq.backlog) == 3
    assert sh.cq_ei(1) == cq.head == 0  # armed: the host's next head update rings
    got = drv.reap(1, min_completions=3, max_completions=3)
    assert sh.cq_rings(1) == 1 and not cq.backlog  # it rang, and the backlog went out
    got += drv.reap(1, min_completions=3)
    assert [c.tag for c in got] == list(range(6))
    assert all(c.ok for c in got)
    assert cq.reserved == 0


def test_stopping_the_poll_arms_eventidx_and_fetches_a_shadow_only_tail(nvme_env):
    env = nvme_env(io_queues=1)
    sh = Shadow(env)
    ctrl, drv = env.ctrl, env.drv
    ctrl.set_polling(True)
    _submit(env, 1, 2)
    assert len(drv.reap(1, min_completions=2)) == 2
    _submit(env, 1, 3)  # shadow only: the poller would find it, but it stops first
    assert ctrl.sq(1).tail == 2
    ctrl.set_polling(False)
    got = drv.reap(1, min_completions=3)
    assert len(got) == 3 and all(c.ok for c in got)
    assert sh.sq_ei(1) == ctrl.sq(1).tail == 5  # eager again
    assert sh.cq_ei(1) == ctrl.cq(1).head
    rings = sh.sq_rings(1)
    _submit(env, 1, 1)
    assert sh.sq_rings(1) == rings + 1  # the host rings again
    assert len(drv.reap(1, min_completions=1)) == 1


def test_intx_keeps_cq_heads_eager_and_admin_queue_is_unchanged(nvme_env):
    env = nvme_env(io_queues=1, irq="intx")
    sh = Shadow(env)
    ctrl, drv = env.ctrl, env.drv
    ctrl.set_polling(True)
    for _ in range(3):
        _submit(env, 1, 2)
        ctrl.poll_work()
        assert len(drv.reap(1, min_completions=2)) == 2
        assert sh.cq_ei(1) == ctrl.cq(1).head == drv.queues[1].cq_head  # pin status needs heads
    assert sh.sq_ei(1) == (ctrl.sq(1).tail - 1) % ctrl.sq(1).size  # the SQ side still polls
    drv.get_features(0x07)  # an admin command while polling
    assert sh.sq_ei(0) == ctrl.sq(0).tail


def test_batch_hook_defers_completions_and_interrupts_to_its_end(nvme_env):
    env = nvme_env(io_queues=2)
    drv, ctrl = env.drv, env.ctrl
    for qid in (1, 2):
        drv.delete_io_queue_pair(qid)
        drv.create_io_queue_pair(qid, 32, vector=1)
    before = env.pdev.irq_count(1)
    with ctrl.batch():
        _submit(env, 1, 3)
        _submit(env, 2, 3)
        assert drv.poll(1) == [] and drv.poll(2) == []  # not posted before the end
        assert env.pdev.irq_count(1) == before
    assert env.pdev.irq_count(1) == before + 1  # one interrupt for both queues
    assert len(drv.poll(1)) == 3 and len(drv.poll(2)) == 3
    assert ctrl.batches_idle()


def test_the_driver_rings_the_admin_queue_by_mmio_only(nvme_env):
    """As Linux: the admin queue is never shadowed. Every admin command rings both admin
    doorbells by MMIO (the controller mirrors the value into the shadow slots, as QEMU's
    nvme does); a driver that wrote the admin shadow and skipped the MMIO write as EventIdx
    allowed lost a command to a late MMIO write over vfio-user (its older value copied over
    the newer shadow tail -- review S25)."""
    env = nvme_env(io_queues=1)
    sh = Shadow(env)
    ctrl, drv = env.ctrl, env.drv
    for i in range(4):
        # an admin EventIdx that would let a shadowing driver skip the MMIO write (set as
        # if the controller had published it): the command must still be rung and fetched
        sh.mem.store32(sh.eis, (drv.queues[0].sq_tail + 1) % drv.queues[0].sq_size)
        drv.timeout = 2.0
        drv.get_features(0x07)
        assert (sh.sq_rings(0), sh.cq_rings(0)) == (i + 1, i + 1)
        assert sh.mem.read_u32(sh.dbs) == ctrl.sq(0).tail == drv.queues[0].sq_tail  # (mirrored)
