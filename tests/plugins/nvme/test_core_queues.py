"""Controller core: queues (phase tags, wrap, SQ head), the full-CQ backlog (nothing lost,
exactly once, in order), interrupts (one per batch, coalescing, vector CD, INTx with
INTMS/INTMC), out-of-order completions from worker threads, Delete SQ with commands
in flight, responsiveness while the backend is slow."""

from __future__ import annotations

import random
import time

from _helpers import GatedBackend, attach_namespace, expect_status, wait_until

from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import FLUSH, READ, WRITE


def _env_with_gated_ns2(nvme_env, io_queues: int):
    """A controller with a 1 MiB memory namespace 1 and a GatedBackend as namespace 2,
    scanned by the driver; returns ``(env, gated)``."""
    env = nvme_env("ns=mem:size=1M", io_queues=io_queues)
    gated = GatedBackend()
    attach_namespace(env.ctrl, 2, gated)
    env.drv.scan_namespaces()
    return env, gated


def test_phase_tags_wrap_and_sq_head(nvme_env):
    env = nvme_env(io_queues=0)
    drv = env.drv
    q = drv.create_io_queue_pair(1, 4)
    phases = []
    heads = []
    for _ in range(25):  # wraps the 4-entry queues six times
        comp = drv.io(1, FLUSH, nsid=1)
        phases.append(comp.phase)
        heads.append(comp.sqhd)
        assert comp.sqid == 1
    # the phase flips after every 4 entries: 1,1,1,1,0,0,0,0,1...
    assert phases == [1 - (i // 4) % 2 for i in range(25)]
    # the SQ head in each entry is the slot after the command it completes
    assert heads == [(i + 1) % 4 for i in range(25)]
    assert q.cq_head == 25 % 4


def test_full_cq_loses_nothing(nvme_env):
    env = nvme_env(io_queues=0)
    drv, ctrl = env.drv, env.ctrl
    drv.create_io_queue_pair(1, 64, cq_size=4)
    buf = env.machine.alloc(4096)
    cids = [drv.submit(1, READ, nsid=1, cdw12=0, buf=buf, length=512, ring=False, tag=i) for i in range(40)]
    drv.ring(1)
    cq = ctrl.cq(1)
    # 3 entries fill the 4-entry CQ; later completions wait in the backlog; the
    # controller stops fetching once the backlog could not drain
    assert cq.pending == 3
    assert len(cq.backlog) == 3
    assert ctrl.sq(1).pending > 0
    got = []
    while len(got) < 40:
        got += drv.reap(1, min_completions=1, max_completions=2)
    assert [c.tag for c in got] == list(range(40))  # in order
    assert sorted(c.cid for c in got) == sorted(cids)  # exactly once
    assert all(c.ok for c in got)
    assert not cq.backlog and cq.reserved == 0
    assert drv.poll(1) == []


def test_full_cq_with_out_of_order_worker_completions(nvme_env):
    env, gated = _env_with_gated_ns2(nvme_env, io_queues=0)
    drv = env.drv
    drv.create_io_queue_pair(1, 64, cq_size=8)
    buf = env.machine.alloc(64 * 512)
    gated.hold()
    n = 30
    for i in range(n):
        # (LBAs a region of the block locks apart: a write held in the backend keeps the
        # commands of its region out of it)
        drv.submit(1, WRITE if i % 2 else READ, nsid=2, cdw10=i * 256 % 2048, buf=buf + 512 * i, length=512,
                   ring=False, tag=i)
    drv.ring(1)
    wait_until(lambda: gated.waiting >= 4, what="workers blocked")
    gated.release()
    got = []
    deadline = time.monotonic() + 10
    while len(got) < n:
        got += drv.reap(1, min_completions=1, max_completions=3)
        assert time.monotonic() < deadline
    assert sorted(c.tag for c in got) == list(range(n))
    assert all(c.ok for c in got)
    time.sleep(0.05)
    assert drv.poll(1) == []  # nothing posted twice


def test_one_interrupt_per_batch(nvme_env):
    env = nvme_env(io_queues=1)
    drv = env.drv
    q = drv.queues[1]
    buf = env.machine.alloc(32 * 4096)
    before = env.pdev.irq_count(q.vector)
    for i in range(32):
        drv.submit_rw(1, READ, nsid=1, slba=8 * i, nlb=8, buf=buf + 4096 * i, ring=False)
    drv.ring(1)
    assert env.pdev.irq_count(q.vector) == before + 1
    assert len(drv.reap(1, min_completions=32)) == 32


def test_interrupt_coalescing_threshold_and_time(nvme_env):
    env = nvme_env(io_queues=1)
    drv = env.drv
    vec = drv.queues[1].vector
    count = env.pdev.irq_count
    drv.set_features(0x08, (255 << 8) | 7)  # 8 entries or 25.5 ms
    assert drv.get_features(0x08).dw0 == (255 << 8) | 7
    before = count(vec)
    for _ in range(3):
        drv.submit(1, FLUSH, nsid=1)
    assert count(vec) == before  # below the threshold: delayed
    wait_until(lambda: count(vec) == before + 1, timeout=2, what="coalescing timer")
    assert len(drv.poll(1)) == 3
    before = count(vec)
    for _ in range(8):
        drv.submit(1, FLUSH, nsid=1, ring=False)
    drv.ring(1)
    assert count(vec) == before + 1  # threshold reached: at once
    assert len(drv.poll(1)) == 8
    # Coalescing Disable for the vector: every batch interrupts at once
    drv.set_features(0x09, (1 << 16) | vec)
    assert drv.get_features(0x09, cdw11=vec).dw0 == (1 << 16) | vec
    before = count(vec)
    drv.submit(1, FLUSH, nsid=1)
    assert count(vec) == before + 1
    drv.poll(1)
    # admin completions are never coalesced
    drv.set_features(0x09, vec)
    before0 = count(0)
    drv.get_features(0x07)
    assert count(0) > before0


def test_intx_fallback_with_intms(nvme_env):
    env = nvme_env(io_queues=1, irq="intx")
    drv = env.drv
    rec = env.pdev.recorder
    assert env.ctrl.irq.mode == "intx"
    drv.submit(1, FLUSH, nsid=1)
    assert rec.intx_level  # unconsumed entry: line asserted
    drv.write32(0x0C, 1)  # INTMS vector 0
    assert not rec.intx_level
    drv.write32(0x10, 1)  # INTMC
    assert rec.intx_level
    assert len(drv.reap(1)) == 1
    assert not rec.intx_level  # consumed: deasserted
    assert drv.read(1, 0, 1) == bytes(512)


def test_msix_vector_mask_latches_pending(nvme_env):
    env = nvme_env(io_queues=1)
    drv = env.drv
    vec = drv.queues[1].vector
    env.pdev.msix_mask(vec, True)
    before = env.pdev.irq_count(vec)
    drv.submit(1, FLUSH, nsid=1)
    assert env.pdev.irq_count(vec) == before
    env.pdev.msix_mask(vec, False)
    assert env.pdev.irq_count(vec) == before + 1
    assert len(drv.poll(1)) == 1


def test_out_of_order_completion_on_several_queues(nvme_env, tmp_path):
    img = tmp_path / "a.img"
    env = nvme_env(f"ns=file:path={img},size=4M", io_queues=2)
    drv = env.drv
    rnd = random.Random(7)
    bufs = {q: env.machine.alloc(64 * 4096) for q in (1, 2)}
    expected = {}
    for qid in (1, 2):
        for i in range(64):
            slba = rnd.randrange(0, 8000)
            data = bytes([qid, i]) * 256
            env.machine.write(bufs[qid] + 512 * i, data)
            expected[(qid, i)] = (slba, data)
            drv.submit(qid, WRITE, nsid=1, cdw10=slba, buf=bufs[qid] + 512 * i, length=512, ring=False,
                       tag=(qid, i))
        drv.ring(qid)
    for qid in (1, 2):
        got = drv.reap(qid, min_completions=64)
        assert sorted(c.tag[1] for c in got) == list(range(64))
        assert all(c.ok for c in got)


def test_cid_conflict_with_command_in_flight(nvme_env):
    env = nvme_env()
    drv = env.drv
    cid = drv.arm_aer()  # parked: in flight indefinitely
    comp = expect_status(drv, Status.CMDID_CONFLICT, 0x06, cid=cid, cdw10=1, buf=env.machine.alloc(4096),
                         length=4096)
    assert comp.cid == cid
    drv.queues[0].pending[cid] = ("aer", 0x0C)  # the AER is still outstanding
    env.ctrl.set_temperature(400)  # nothing enabled in AEC: no event
    assert drv.poll(0) == []


def test_delete_sq_waits_for_commands_in_flight(nvme_env):
    env, gated = _env_with_gated_ns2(nvme_env, io_queues=1)
    drv = env.drv
    buf = env.machine.alloc(4096)
    gated.hold()
    drv.submit(1, READ, nsid=2, buf=buf, length=512, tag="io")
    wait_until(lambda: gated.waiting == 1)
    del_cid = drv.submit(0, 0x00, cdw10=1)
    time.sleep(0.05)
    assert drv.poll(0) == []  # Delete SQ waits for the read
    # the SQ's doorbell is already gone
    assert drv.read32(0x1C) & 1
    gated.release()
    comp = drv.wait_for(0, del_cid)
    assert comp.ok
    io = drv.reap(1)
    assert [c.tag for c in io] == ["io"] and io[0].ok
    drv.admin(0x04, cdw10=1)
    del drv.queues[1]


def test_reset_with_commands_in_flight_finishes_when_they_do(nvme_env):
    env, gated = _env_with_gated_ns2(nvme_env, io_queues=1)
    drv = env.drv
    buf = env.machine.alloc(4096)
    gated.hold()
    drv.submit(1, WRITE, nsid=2, buf=buf, length=512)
    wait_until(lambda: gated.waiting == 1)
    cc = drv.read32(0x14)
    t0 = time.monotonic()
    drv.write32(0x14, cc & ~1)
    assert time.monotonic() - t0 < 0.5  # the register write does not wait
    assert drv.read32(0x1C) & 1  # RDY stays 1 while the write is in flight
    gated.release()
    wait_until(lambda: not drv.read32(0x1C) & 1, what="CSTS.RDY=0")
    cq_base = drv.queues[1].cq_base
    assert env.machine.read(cq_base, 16) == bytes(16)  # the stale completion was not posted


def test_registers_respond_while_backend_is_slow(nvme_env):
    env, gated = _env_with_gated_ns2(nvme_env, io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    buf = env.machine.alloc(16 * 4096)
    gated.hold()
    for i in range(16):
        drv.submit(1, READ, nsid=2, cdw10=i, buf=buf + 4096 * i, length=512, ring=False)
    t0 = time.monotonic()
    drv.ring(1)
    for _ in range(100):
        drv.read32(0x1C)
        drv.read64(0x00)
    assert drv.identify(0x01)[4:24].rstrip(b" ") == ctrl.cfg.serial.encode()  # the admin queue works too
    assert time.monotonic() - t0 < 1.0
    gated.release()
    assert len(drv.reap(1, min_completions=16)) == 16


def test_invalid_doorbells_post_error_events(nvme_env):
    env = nvme_env(io_queues=1, aers=1)
    drv, ctrl = env.drv, env.ctrl
    drv.write32(0x1000 + 8 * 5, 1)  # SQ 5 does not exist
    ev = drv.poll_events(timeout=1)
    assert ev == [(0, 0x00, 0x01)]
    entry = ctrl.error_log.entries()[0]
    assert entry["cid"] == 0xFFFF and entry["sqid"] == 5
    # masked until the Error Information log is read with RAE=0
    drv.write32(0x1000 + 8 * 1, 9999)  # tail beyond the queue
    assert drv.poll_events(timeout=0.05) == []
    drv.get_log(0x01, 4096)  # RAE=0: unmasks; the queued event arrives
    wait_until(lambda: drv.poll_events() is not None and len(drv.events) == 2, what="second event")
    assert drv.events[1] == (0, 0x01, 0x01)
    drv.get_log(0x01, 64)
    drv.write32(0x1000 + 8 * 1 + 4, 77)  # CQ head beyond the tail
    wait_until(lambda: drv.poll_events() is not None and len(drv.events) == 3, what="third event")
    assert drv.events[2] == (0, 0x01, 0x01)
    # the queues still work
    assert drv.read(1, 0, 1) == bytes(512)


def test_shadow_tail_written_while_eventidx_is_updated_is_not_lost(nvme_env):
    """A second host CPU that writes the shadow SQ tail after the controller read it but
    before the controller published its EventIdx saw the old EventIdx, so it does not ring
    the MMIO doorbell (Linux's nvme_dbbuf_need_event): the controller must notice the new
    tail after publishing EventIdx, as the Doorbell Buffer Config protocol requires."""
    import struct

    from pcidev_nvme.request import SQE

    env = nvme_env("ns=mem:size=1M", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    dbs, eis = drv.doorbell_buffer_config()
    q = drv.queues[1]
    mem = ctrl.memory
    real_store32 = mem.store32
    state = {"armed": True, "cid": None}

    def racing_store32(gpa, value):
        real_store32(gpa, value)
        if gpa == eis + 8 and state["armed"]:
            state["armed"] = False
            # the other CPU: one more command, shadow tail updated, no MMIO doorbell
            tail = q.sq_tail
            cid = q.free_cids.popleft()
            env.machine.memory.write(q.sq_base + 64 * tail,
                                     SQE.pack(FLUSH, 0, cid, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
            q.pending[cid] = ("raced", FLUSH)
            q.sq_tail = (tail + 1) % q.sq_size
            q.rung_tail = q.sq_tail
            env.machine.memory.write(dbs + 8, struct.pack("<I", q.sq_tail))
            state["cid"] = cid

    mem.store32 = racing_store32
    try:
        first = drv.submit(1, FLUSH, nsid=1, tag="first")
        got = drv.reap(1, min_completions=2, timeout=2.0)
    finally:
        del mem.store32
    assert state["cid"] is not None
    assert sorted(c.cid for c in got) == sorted([first, state["cid"]])
    assert all(c.ok for c in got)
    assert env.machine.memory.read_u32(eis + 8) == q.sq_tail  # EventIdx caught up


def test_error_entry_phase_of_a_backlogged_completion(nvme_env):
    """The Error Information entry of a failed command that waited in a full CQ's backlog
    records the phase tag its completion is eventually posted with (after the CQ wrapped)."""
    env = nvme_env(io_queues=0)
    drv, ctrl = env.drv, env.ctrl
    drv.create_io_queue_pair(1, 16, cq_size=4)
    for i in range(3):  # fill the CQ (3 entries, phase 1) without consuming anything
        drv.submit(1, FLUSH, nsid=1, ring=False, tag=i)
    for i in range(3, 6):  # then three failing commands: slot 3 (phase 1), slots 0, 1 (phase 0)
        drv.submit(1, 0x7E, nsid=1, ring=False, tag=i)
    drv.ring(1)
    assert len(ctrl.cq(1).backlog) == 3
    got = []
    while len(got) < 6:
        got += drv.reap(1, min_completions=1, max_completions=1)
    failed = [c for c in got if not c.ok]
    assert [c.phase for c in failed] == [1, 0, 0]
    entries = {e["cid"]: e for e in ctrl.error_log.entries() if e["sqid"] == 1}
    assert [entries[c.cid]["phase"] for c in failed] == [c.phase for c in failed]


def _post_flushes(env, q, n):
    """Write ``n`` FLUSH SQEs on ``q`` without ringing; returns their cids."""
    from pcidev_nvme.request import SQE

    cids = []
    for i in range(n):
        tail = q.sq_tail
        cid = q.free_cids.popleft()
        env.machine.memory.write(q.sq_base + 64 * tail, SQE.pack(FLUSH, 0, cid, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
        q.pending[cid] = (f"f{i}", FLUSH)
        q.sq_tail = (tail + 1) % q.sq_size
        cids.append(cid)
    return cids


def test_late_mmio_sq_doorbell_does_not_rewind_the_shadow_tail(nvme_env):
    """Nvme (found by real guest): with shadow doorbells, Linux rings the MMIO doorbell for
    tail t1, then writes t2 to the shadow only. Over vfio-user the MMIO write is posted and
    arrives after the shadow moved to t2; copying t1 into the shadow lost the commands
    between t1 and t2 (fio timed out)."""
    import struct

    env = nvme_env("ns=mem:size=1M", io_queues=1)
    drv = env.drv
    dbs, _eis = drv.doorbell_buffer_config()
    q = drv.queues[1]
    cids = _post_flushes(env, q, 3)
    stale = (q.sq_tail - 2) % q.sq_size
    env.machine.memory.write(dbs + 8, struct.pack("<I", q.sq_tail))  # the host's newest tail
    q.rung_tail = q.sq_tail
    drv.write32(0x1000 + 8 * 1, stale)  # the MMIO write of an older tail, arriving late
    got = drv.reap(1, min_completions=3, timeout=2.0)
    assert sorted(c.cid for c in got) == sorted(cids) and all(c.ok for c in got)
    assert env.machine.memory.read_u32(dbs + 8) == q.sq_tail  # the shadow was not rewound


def test_late_mmio_cq_doorbell_takes_the_shadow_head(nvme_env):
    """Nvme (found by real guest): a late CQ head MMIO write must not rewind the head nor
    EventIdx to an older value (the host, seeing an EventIdx behind its head, never rings
    again and the CQ eventually looks full for good)."""
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    dbs, eis = drv.doorbell_buffer_config()
    q = drv.queues[1]
    for _ in range(3):
        drv.submit(1, FLUSH, nsid=1)
    drv.reap(1, min_completions=3, timeout=2.0)
    head = q.cq_head
    assert env.machine.memory.read_u32(dbs + 12) == head
    drv.write32(0x1000 + 8 * 1 + 4, (head - 2) % q.cq_size)  # late MMIO of an older head
    assert ctrl._cqs[1].head == head
    assert env.machine.memory.read_u32(eis + 12) == head
    assert ctrl.error_log.entries() == []  # not an "invalid doorbell value"
