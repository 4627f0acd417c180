"""The host-side driver end to end: probe, PRP and SGL data pointers, submit/reap at
queue depth >= 32 over several queues, interrupts (MSI-X, INTx, polling), shadow
doorbells, events, errors, shutdown."""

from __future__ import annotations

import os
import random

import pytest
from _helpers import GatedBackend, attach_namespace, wait_until

from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import READ, WRITE, NvmeCommandError, NvmeDriverError


@pytest.fixture
def env(nvme_env):
    return nvme_env("ns=mem:size=16M,ns=mem:size=8M,lbaf=1", io_queues=4, ram=128 << 20)


def test_probe(env):
    drv = env.drv
    assert set(drv.namespaces) == {1, 2}
    assert drv.namespaces[1].lba_size == 512 and drv.namespaces[2].lba_size == 4096
    assert drv.io_queue_count == 4 and set(drv.queues) == {0, 1, 2, 3, 4}
    assert drv.mdts_bytes == 4096 << 7
    assert env.ctrl.irq.mode == "msix"
    assert len({drv.queues[q].vector for q in range(1, 5)}) == 4


@pytest.mark.parametrize("sgl", [False, True])
@pytest.mark.parametrize("nbytes", [512, 4096, 8192, 3 * 4096, 128 * 1024])
def test_read_write_prp_and_sgl(env, sgl, nbytes):
    drv = env.drv
    data = os.urandom(nbytes)
    drv.write(1, 100, data, sgl=sgl)
    assert drv.read(1, 100, nbytes // 512, sgl=not sgl) == data
    assert drv.read(1, 100, nbytes // 512, sgl=sgl, qid=3) == data


def test_unaligned_prp_buffer_and_scatter_sgl(env):
    drv, m = env.drv, env.machine
    data = os.urandom(8192)
    buf = m.alloc(4 * 4096)
    m.write(buf + 1024, data)  # starts mid-page: PRP1 offset, PRP list for the rest
    drv.io(1, WRITE, nsid=1, cdw10=0, cdw12=15, buf=buf + 1024, length=8192)
    assert drv.read(1, 0, 16) == data
    # SGL read into three scattered pieces, one of them a bit bucket
    a, b = m.alloc(4096), m.alloc(4096)
    drv.io(1, READ, nsid=1, cdw10=0, cdw12=15, segments=[(a, 3000), (None, 2000), (b, 3192)])
    assert m.read(a, 3000) == data[:3000]
    assert m.read(b, 3192) == data[5000:]


def test_queue_depth_32_on_several_queues(env):
    drv, m = env.drv, env.machine
    rnd = random.Random(1)
    lbs = 4096
    blocks = {}
    bufs = {q: m.alloc(32 * lbs) for q in (1, 2, 3, 4)}
    for q in (1, 2, 3, 4):
        for i in range(32):
            slba = (q - 1) * 32 + i
            data = rnd.randbytes(lbs)
            blocks[slba] = data
            m.write(bufs[q] + i * lbs, data)
            drv.submit_rw(q, WRITE, nsid=2, slba=slba, nlb=1, buf=bufs[q] + i * lbs, ring=False, tag=slba)
        drv.ring(q)
    for q in (1, 2, 3, 4):
        done = drv.reap(q, min_completions=32)
        assert len(done) == 32 and all(c.ok for c in done)
    for q in (1, 2, 3, 4):
        m.write(bufs[q], bytes(32 * lbs))
        for i in range(32):
            drv.submit_rw(q, READ, nsid=2, slba=(q - 1) * 32 + i, nlb=1, buf=bufs[q] + i * lbs, ring=False)
        drv.ring(q)
    for q in (1, 2, 3, 4):
        assert len(drv.reap(q, min_completions=32)) == 32
        for i in range(32):
            assert m.read(bufs[q] + i * lbs, lbs) == blocks[(q - 1) * 32 + i]


def test_sq_full_is_reported(nvme_env):
    env = nvme_env(io_queues=0)
    drv = env.drv
    drv.create_io_queue_pair(1, 4)
    for _ in range(3):
        drv.submit(1, 0x00, nsid=1, ring=False)
    with pytest.raises(NvmeDriverError, match="full"):
        drv.submit(1, 0x00, nsid=1)
    drv.ring(1)
    assert len(drv.reap(1, min_completions=3)) == 3


@pytest.mark.parametrize("irq", ["intx", None, "any"])
def test_interrupt_modes(nvme_env, irq):
    env = nvme_env("ns=mem:size=4M", io_queues=2, irq=irq)
    drv = env.drv
    data = os.urandom(4096)
    drv.write(1, 0, data, qid=2)
    assert drv.read(1, 0, 8, qid=1) == data


def test_shadow_doorbells(env):
    drv, ctrl = env.drv, env.ctrl
    dbs, eis = drv.doorbell_buffer_config()
    data = os.urandom(4096)
    for q in (1, 2):
        drv.write(1, 8 * q, data, qid=q)
        assert drv.read(1, 8 * q, 8, qid=q) == data
    assert env.machine.memory.read_u32(dbs + 8) == drv.queues[1].sq_tail
    assert env.machine.memory.read_u32(eis + 8) == drv.queues[1].sq_tail  # EventIdx follows the tail
    assert ctrl.sq(1).db_addr == dbs + 8
    # new queues get shadow slots too
    drv.delete_io_queue_pair(4)
    drv.create_io_queue_pair(4, 32)
    assert ctrl.sq(4).db_addr == dbs + 32
    drv.write(1, 0, data, qid=4)
    assert drv.read(1, 0, 8, qid=4) == data
    # Doorbell Buffer Config validation
    comp = drv.admin(0x7C, prp1=dbs + 8, prp2=eis, check=False)
    assert comp.code == Status.INVALID_FIELD
    comp = drv.admin(0x7C, prp1=dbs, prp2=0, check=False)
    assert comp.code == Status.INVALID_FIELD


def test_shadow_doorbells_disabled_by_config(nvme_env):
    env = nvme_env("dbbuf=off", io_queues=1)
    assert not env.drv.identify(0x01)[257] & 1  # OACS bit 8 clear
    comp = env.drv.admin(0x7C, prp1=env.machine.alloc(4096), prp2=env.machine.alloc(4096), check=False)
    assert comp.code == Status.INVALID_OPCODE


def test_command_errors_raise(env):
    drv = env.drv
    with pytest.raises(NvmeCommandError) as ei:
        drv.read(1, 1 << 40, 1)
    assert ei.value.status == Status.LBA_RANGE
    with pytest.raises(NvmeCommandError) as ei:
        drv.read(9, 0, 1) if 9 in drv.namespaces else drv.io(1, READ, nsid=9)
    assert ei.value.status == Status.INVALID_NSID


def test_events_and_rearm(nvme_env):
    env = nvme_env(io_queues=1, aers=2)
    drv, ctrl = env.drv, env.ctrl
    ctrl.set_temperature(ctrl.cfg.warning_temp + 1)
    assert drv.poll_events(timeout=2) == [(1, 1, 2)]
    assert len(ctrl.aer.outstanding) == 2  # re-armed


def test_shutdown(env):
    drv = env.drv
    drv.write(1, 0, b"e" * 512)
    drv.shutdown()
    assert (drv.csts >> 2) & 3 == 2
    assert set(drv.queues) == {0}


def test_chained_prp_lists(nvme_env):
    env = nvme_env("mdts=0,ns=mem:size=16M", io_queues=1, ram=128 << 20)
    drv = env.drv
    assert drv.mdts_bytes is None
    data = os.urandom(5 << 20)  # 1280 pages: three chained PRP list pages
    drv.write(1, 0, data)
    assert drv.read(1, 0, len(data) // 512) == data
    assert len(drv.queues[1].prp_chain[min(drv.queues[1].prp_chain)]) >= 3
    # the same command identifier reused for another buffer gets a fresh list
    assert drv.read(1, 8, 16) == data[4096:12288]


def test_mdts_enforced(env):
    drv = env.drv
    with pytest.raises(NvmeCommandError) as ei:
        drv.read(1, 0, (drv.mdts_bytes // 512) + 1)
    assert ei.value.status == Status.INVALID_FIELD
    assert len(drv.read(1, 0, drv.mdts_bytes // 512)) == drv.mdts_bytes


def test_disable_recovers_a_fatal_controller_with_commands_in_flight(nvme_env):
    """Like Linux's nvme_disable_ctrl, disable() waits for CSTS.RDY=0 even while CSTS.CFS is
    set: that reset is how a host recovers from a fatal status."""
    import threading

    env = nvme_env("ns=mem:size=1M", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    gated = GatedBackend()
    attach_namespace(ctrl, 2, gated)
    drv.scan_namespaces()
    gated.hold()
    drv.submit(1, READ, nsid=2, buf=env.machine.alloc(4096), length=512)
    wait_until(lambda: gated.waiting == 1)
    ctrl._fatal("simulated fatal error")
    assert drv.csts & 0x3 == 0x3
    threading.Timer(0.2, gated.release).start()
    drv.disable()  # RDY goes to 0 once the read is done
    assert drv.csts == 0
    drv.enable()
    drv.create_io_queue_pair(1, 16)
    assert drv.read(1, 0, 1) == bytes(512)
