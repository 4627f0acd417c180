"""Admin: Create/Delete I/O Submission and Completion Queues, Number of Queues, and the
statuses of every malformed variant (each with its Error Information entry)."""

from __future__ import annotations

import pytest
from _helpers import expect_status

from pcidev_nvme.status import Status

CREATE_SQ, CREATE_CQ, DELETE_SQ, DELETE_CQ = 0x01, 0x05, 0x00, 0x04


@pytest.fixture
def env(nvme_env):
    return nvme_env("ns=mem:size=4M,max_ioqpairs=8,mqes=255", io_queues=0)


def cq_args(env, qid=1, qsize=16, iv=1, ien=True, pc=True, prp1=None):
    prp1 = env.machine.alloc(qsize * 16) if prp1 is None else prp1
    return dict(prp1=prp1, cdw10=((qsize - 1) & 0xFFFF) << 16 | qid, cdw11=(iv << 16) | (2 if ien else 0) | int(pc))


def sq_args(env, qid=1, qsize=16, cqid=1, pc=True, prp1=None):
    prp1 = env.machine.alloc(qsize * 64) if prp1 is None else prp1
    return dict(prp1=prp1, cdw10=((qsize - 1) & 0xFFFF) << 16 | qid, cdw11=(cqid << 16) | int(pc))


def test_create_use_delete(env):
    drv = env.drv
    q = drv.create_io_queue_pair(3, 256)  # MQES + 1 entries
    assert env.ctrl.sq(3).size == 256 and env.ctrl.cq(3).vector == drv._vector_for(3)
    drv.write(1, 5, b"z" * 512, qid=3)
    assert drv.read(1, 5, 1, qid=3) == b"z" * 512
    assert q.qid == 3
    drv.delete_io_queue_pair(3)
    assert env.ctrl.sq(3) is None and env.ctrl.cq(3) is None


def test_all_queue_pairs(nvme_env):
    env = nvme_env("ns=mem:size=4M", io_queues=64, io_depth=8, ram=128 << 20)
    drv = env.drv
    assert drv.io_queue_count == 64
    for qid in range(1, 65):
        drv.write(1, qid, bytes([qid]) * 512, qid=qid)
    for qid in range(1, 65):
        assert drv.read(1, qid, 1, qid=65 - qid if qid % 2 else qid) == bytes([qid]) * 512


@pytest.mark.parametrize("kw, status, param", [
    (dict(qid=0), Status.QID_INVALID, 40),
    (dict(qid=9), Status.QID_INVALID, 40),
    (dict(qsize=1), Status.QUEUE_SIZE, 42),
    (dict(qsize=257), Status.QUEUE_SIZE, 42),
    (dict(pc=False), Status.INVALID_FIELD, 44),
    (dict(iv=65), Status.INVALID_INTERRUPT_VECTOR, 46),
    (dict(prp1=0x10_0800), Status.PRP_OFFSET_INVALID, 24),
    (dict(prp1=0x7F00_0000_0000), Status.DATA_TRANSFER_ERROR, 24),
])
def test_create_cq_errors(env, kw, status, param):
    expect_status(env.drv, status, CREATE_CQ, param=param, **cq_args(env, **kw))
    assert env.ctrl.cq(kw.get("qid", 1)) is None or kw.get("qid") == 0


def test_create_cq_twice(env):
    env.drv.admin(CREATE_CQ, **cq_args(env))
    expect_status(env.drv, Status.QID_INVALID, CREATE_CQ, **cq_args(env))


@pytest.mark.parametrize("kw, status", [
    (dict(qid=0), Status.QID_INVALID),
    (dict(qid=9), Status.QID_INVALID),
    (dict(cqid=0), Status.CQ_INVALID),
    (dict(cqid=2), Status.CQ_INVALID),
    (dict(qsize=1), Status.QUEUE_SIZE),
    (dict(qsize=300), Status.QUEUE_SIZE),
    (dict(pc=False), Status.INVALID_FIELD),
    (dict(prp1=0x10_0040), Status.PRP_OFFSET_INVALID),
    (dict(prp1=0x7F00_0000_0000), Status.DATA_TRANSFER_ERROR),
])
def test_create_sq_errors(env, kw, status):
    env.drv.admin(CREATE_CQ, **cq_args(env))
    expect_status(env.drv, status, CREATE_SQ, **sq_args(env, **kw))


def test_delete_errors(env):
    drv = env.drv
    expect_status(drv, Status.QID_INVALID, DELETE_SQ, cdw10=0)
    expect_status(drv, Status.QID_INVALID, DELETE_SQ, cdw10=1)
    expect_status(drv, Status.QID_INVALID, DELETE_CQ, cdw10=0)
    expect_status(drv, Status.QID_INVALID, DELETE_CQ, cdw10=7)
    drv.admin(CREATE_CQ, **cq_args(env))
    drv.admin(CREATE_SQ, **sq_args(env))
    drv.admin(CREATE_SQ, **sq_args(env, qid=2))  # two SQs on one CQ
    expect_status(drv, Status.INVALID_QUEUE_DELETION, DELETE_CQ, cdw10=1)
    drv.admin(DELETE_SQ, cdw10=1)
    expect_status(drv, Status.INVALID_QUEUE_DELETION, DELETE_CQ, cdw10=1)
    drv.admin(DELETE_SQ, cdw10=2)
    drv.admin(DELETE_CQ, cdw10=1)
    expect_status(drv, Status.QID_INVALID, DELETE_SQ, cdw10=2)


def test_number_of_queues(env):
    drv = env.drv
    expect_status(drv, Status.INVALID_FIELD, 0x09, cdw10=0x07, cdw11=0xFFFF)
    dw0 = drv.set_features(0x07, (1 << 16) | 2)  # 3 SQs, 2 CQs
    assert dw0 == (1 << 16) | 2
    assert drv.get_features(0x07).dw0 == dw0
    # "the value allocated shall not change between resets": a second request gets the same answer
    assert drv.set_features(0x07, (100 << 16) | 100) == dw0
    assert drv.get_features(0x07).dw0 == dw0
    expect_status(drv, Status.QID_INVALID, CREATE_CQ, **cq_args(env, qid=3))
    drv.admin(CREATE_CQ, **cq_args(env, qid=2))
    drv.admin(CREATE_SQ, **sq_args(env, qid=3, cqid=2))
    expect_status(drv, Status.CMD_SEQ_ERROR, 0x09, cdw10=0x07, cdw11=0)
    assert drv.get_features(0x07, sel=1).dw0 == (7 << 16) | 7  # default
    drv.disable()  # after a reset the host may ask again
    drv.enable()
    assert drv.set_features(0x07, (100 << 16) | 100) == (7 << 16) | 7  # capped at max_ioqpairs


def test_entry_sizes_must_be_64_and_16(env):
    drv = env.drv
    cc = drv.read32(0x14)
    drv.disable()
    drv.enable()
    drv.write32(0x14, drv.read32(0x14) & ~(0xFF << 16) | 1)  # IOSQES = IOCQES = 0 (allowed while enabled)
    expect_status(drv, Status.QUEUE_SIZE, CREATE_CQ, **cq_args(env))
    drv.write32(0x14, cc)
    drv.admin(CREATE_CQ, **cq_args(env))


def test_interrupts_disabled_queue(env):
    drv = env.drv
    q = drv.create_io_queue_pair(1, 8, ien=False)
    before = env.pdev.irq_count(q.vector)
    drv.submit(1, 0x00, nsid=1)
    assert env.pdev.irq_count(q.vector) == before
    assert len(drv.reap(1)) == 1


def test_nonzero_vector_needs_msix(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=0, irq="intx")
    expect_status(env.drv, Status.INVALID_INTERRUPT_VECTOR, CREATE_CQ, **cq_args(env, iv=1))
    env.drv.admin(CREATE_CQ, **cq_args(env, iv=0))


@pytest.mark.parametrize("opcode, kw, status, param", [
    # queue memory that starts in guest RAM and runs past its end
    (CREATE_CQ, dict(qsize=512, end=True), Status.DATA_TRANSFER_ERROR, 24),
    (CREATE_SQ, dict(qsize=128, end=True), Status.DATA_TRANSFER_ERROR, 24),
    # the largest field values
    (CREATE_CQ, dict(qid=0xFFFF), Status.QID_INVALID, 40),
    (CREATE_SQ, dict(qid=0xFFFF), Status.QID_INVALID, 40),
    (CREATE_CQ, dict(iv=0xFFFF), Status.INVALID_INTERRUPT_VECTOR, 46),
    (CREATE_SQ, dict(cqid=0xFFFF), Status.CQ_INVALID, 46),
    (CREATE_CQ, dict(qsize=0x10000), Status.QUEUE_SIZE, 42),
    (CREATE_SQ, dict(qsize=0x10000), Status.QUEUE_SIZE, 42),
])
def test_create_queue_hostile_fields(nvme_env, opcode, kw, status, param):
    env = nvme_env("ns=mem:size=1M,max_ioqpairs=4,mqes=1023", io_queues=0, ram=32 << 20)
    drv = env.drv
    if opcode == CREATE_SQ:
        drv.admin(CREATE_CQ, **cq_args(env))
    if kw.pop("end", False):  # page aligned, the last page of RAM
        kw["prp1"] = env.machine.ram_size - 4096
    args = (cq_args if opcode == CREATE_CQ else sq_args)(env, **kw)
    expect_status(drv, status, opcode, param=param, **args)
    assert env.ctrl.csts & 0x3 == 0x1


def test_create_sq_twice_and_delete_the_largest_ids(env):
    drv = env.drv
    drv.admin(CREATE_CQ, **cq_args(env))
    drv.admin(CREATE_SQ, **sq_args(env))
    expect_status(drv, Status.QID_INVALID, CREATE_SQ, param=40, **sq_args(env))
    expect_status(drv, Status.QID_INVALID, DELETE_SQ, param=40, cdw10=0xFFFF)
    expect_status(drv, Status.QID_INVALID, DELETE_CQ, param=40, cdw10=0xFFFF)
    # the upper half of CDW10 is reserved for the deletes: queue 1 still goes
    drv.admin(DELETE_SQ, cdw10=0xABCD0001)
    drv.admin(DELETE_CQ, cdw10=0xABCD0001)
    assert not env.ctrl.io_queues_exist()


def test_number_of_queues_hostile_values(env):
    drv = env.drv
    expect_status(drv, Status.INVALID_FIELD, 0x09, param=44, cdw10=0x07, cdw11=0xFFFF0000)  # NCQR 65536
    expect_status(drv, Status.INVALID_FIELD, 0x09, param=44, cdw10=0x07, cdw11=0xFFFFFFFF)
    assert drv.set_features(0x07, 0) == 0  # one of each (0's based)
    assert drv.set_features(0x07, 0xFFFEFFFE) == 0  # unchanged until the next reset
    expect_status(drv, Status.QID_INVALID, CREATE_CQ, **cq_args(env, qid=2))
    drv.disable()
    drv.enable()
    assert drv.set_features(0x07, 0xFFFEFFFE) == (7 << 16) | 7  # 65535 each: capped, 0's based
