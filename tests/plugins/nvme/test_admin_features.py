"""Admin: Get/Set Features 01h 02h 04h 05h 06h 07h 08h 09h 0Bh 0Eh 0Fh 16h, Select values,
Save, Keep Alive (command and timeout)."""

from __future__ import annotations

import struct
import time

import pytest
from _helpers import expect_status, wait_until

from pcidev_nvme.status import Status

GET, SET = 0x0A, 0x09


@pytest.fixture
def env(nvme_env):
    return nvme_env("ns=mem:size=4M,ns=mem:size=4M", io_queues=1)


def test_select_and_capabilities(env):
    drv = env.drv
    for fid in (0x01, 0x02, 0x04, 0x06, 0x07, 0x08, 0x0B, 0x0F):
        caps = drv.get_features(fid, sel=3).dw0
        assert caps & 0b100 and not caps & 0b001  # changeable, not saveable
    assert drv.get_features(0x05, sel=3, nsid=1).dw0 & 0b010  # namespace specific
    drv.set_features(0x08, 0x0102)
    assert drv.get_features(0x08).dw0 == 0x0102
    assert drv.get_features(0x08, sel=1).dw0 == 0  # default
    assert drv.get_features(0x08, sel=2).dw0 == 0  # saved = default
    expect_status(drv, Status.INVALID_FIELD, GET, cdw10=(4 << 8) | 0x08, param=41)
    expect_status(drv, Status.FEATURE_NOT_SAVEABLE, SET, cdw10=(1 << 31) | 0x08, cdw11=1)
    expect_status(drv, Status.INVALID_FIELD, GET, cdw10=0x03)  # LBA range type: not supported
    expect_status(drv, Status.INVALID_FIELD, SET, cdw10=0x7F)
    expect_status(drv, Status.FEATURE_NOT_PER_NS, SET, nsid=1, cdw10=0x08, cdw11=0)


def test_arbitration_and_power_management(env):
    drv = env.drv
    assert drv.get_features(0x01).dw0 & 7 == 7
    drv.set_features(0x01, 0x01020303)
    assert drv.get_features(0x01).dw0 == 0x01020303
    assert drv.get_features(0x02).dw0 == 0
    expect_status(drv, Status.INVALID_FIELD, SET, cdw10=0x02, cdw11=1)
    drv.set_features(0x02, 0x20)  # workload hint
    assert drv.get_features(0x02).dw0 == 0x20


def test_temperature_threshold(env):
    drv, ctrl = env.drv, env.ctrl
    over = drv.get_features(0x04).dw0
    assert over == ctrl.cfg.warning_temp
    assert drv.get_features(0x04, cdw11=1 << 20).dw0 == 0  # under threshold
    drv.set_features(0x04, 350)
    assert drv.get_features(0x04).dw0 == 350
    drv.set_features(0x04, (0xF << 16) | 360)  # all sensors
    assert drv.get_features(0x04).dw0 == 360
    expect_status(drv, Status.INVALID_FIELD, SET, cdw10=0x04, cdw11=(2 << 20) | 300)  # reserved THSEL
    expect_status(drv, Status.INVALID_FIELD, SET, cdw10=0x04, cdw11=(3 << 16) | 300)  # no sensor 3
    expect_status(drv, Status.INVALID_FIELD, GET, cdw10=0x04, cdw11=0xF << 16)
    # over threshold below the current temperature: critical warning bit 1
    drv.set_features(0x04, ctrl.temperature - 1)
    raw = drv.get_log(0x02, 512)
    assert raw[0] & 0x2
    drv.set_features(0x04, ctrl.temperature + 10)
    assert not drv.get_log(0x02, 512)[0] & 0x2
    # under threshold
    drv.set_features(0x04, (1 << 20) | (ctrl.temperature + 1))
    assert drv.get_log(0x02, 512)[0] & 0x2


def test_error_recovery_per_namespace(env):
    drv = env.drv
    drv.set_features(0x05, 30, nsid=1)
    assert drv.get_features(0x05, nsid=1).dw0 == 30
    assert drv.get_features(0x05, nsid=2).dw0 == 0
    drv.set_features(0x05, 40, nsid=0xFFFFFFFF)
    assert drv.get_features(0x05, nsid=2).dw0 == 40
    expect_status(drv, Status.INVALID_NSID, GET, cdw10=0x05, nsid=0)
    expect_status(drv, Status.INVALID_NSID, GET, cdw10=0x05, nsid=0xFFFFFFFF)
    expect_status(drv, Status.INVALID_NSID, SET, cdw10=0x05, nsid=9)
    drv.set_features(0x05, (1 << 16) | 30, nsid=1)  # DULBE: the mem namespace has NSFEAT.DAE
    assert drv.get_features(0x05, nsid=1).dw0 == (1 << 16) | 30
    assert drv.get_features(0x05, nsid=1, sel=1).dw0 == 0


def test_error_recovery_dulbe_needs_dae(nvme_env):
    """DULBE only on a namespace that can tell unwritten blocks (NSFEAT.DAE): a null one
    cannot (Invalid Field); a broadcast sets it where DAE is set and clears it elsewhere."""
    env = nvme_env("ns=mem:size=4M,ns=null:size=4M", io_queues=1)
    drv = env.drv
    assert drv.identify(0, nsid=1)[24] & 0x4 and not drv.identify(0, nsid=2)[24] & 0x4
    expect_status(drv, Status.INVALID_FIELD, SET, cdw10=0x05, nsid=2, cdw11=1 << 16, param=46)
    assert drv.get_features(0x05, nsid=2).dw0 == 0
    drv.set_features(0x05, (1 << 16) | 5, nsid=0xFFFFFFFF)
    assert drv.get_features(0x05, nsid=1).dw0 == (1 << 16) | 5
    assert drv.get_features(0x05, nsid=2).dw0 == 5
    drv.set_features(0x05, 0, nsid=0xFFFFFFFF)
    assert drv.get_features(0x05, nsid=1).dw0 == 0


def test_volatile_write_cache(env):
    drv, ctrl = env.drv, env.ctrl
    assert drv.get_features(0x06).dw0 == 1
    drv.write(1, 0, b"w" * 512)
    drv.set_features(0x06, 0)  # flushes, then completes
    assert drv.get_features(0x06).dw0 == 0
    assert ctrl.volatile_write_cache is False
    drv.set_features(0x06, 1)
    assert ctrl.volatile_write_cache is True


def test_interrupt_vector_configuration(env):
    drv = env.drv
    assert drv.get_features(0x09, cdw11=3).dw0 == 3
    drv.set_features(0x09, (1 << 16) | 3)
    assert drv.get_features(0x09, cdw11=3).dw0 == (1 << 16) | 3
    assert drv.get_features(0x09, cdw11=3, sel=1).dw0 == 3
    expect_status(drv, Status.INVALID_FIELD, SET, cdw10=0x09, cdw11=65)
    expect_status(drv, Status.INVALID_FIELD, GET, cdw10=0x09, cdw11=1000)


def test_async_event_configuration(env):
    drv = env.drv
    drv.set_features(0x0B, 0xFFFFFFFF)
    assert drv.get_features(0x0B).dw0 == 0x431F  # only what the controller supports (14: endurance group events)
    drv.set_features(0x0B, 0)
    assert drv.get_features(0x0B).dw0 == 0


def test_timestamp(env):
    drv = env.drv
    comp = drv.get_features(0x0E, length=8)
    ts, = struct.unpack("<Q", comp.tag)
    assert (ts >> 49) & 7 == 0  # origin: reset
    drv.set_features(0x0E, data=struct.pack("<Q", 1_000_000))
    time.sleep(0.02)
    ts, = struct.unpack("<Q", drv.get_features(0x0E, length=8).tag)
    assert 1_000_015 <= ts & (2**48 - 1) < 1_010_000
    assert (ts >> 49) & 7 == 1  # set by the host
    expect_status(env.drv, Status.DATA_TRANSFER_ERROR, SET, cdw10=0x0E, prp1=0x7F00_0000_0000)


def test_host_behavior_support(env):
    drv = env.drv
    data = bytes([1, 0, 1]) + bytes(509)
    drv.set_features(0x16, data=data)
    assert drv.get_features(0x16, length=512).tag == data
    expect_status(drv, Status.INVALID_FIELD, SET, cdw10=0x16, data=bytes([2]) + bytes(511))
    assert drv.get_features(0x16, length=512, sel=1).tag == bytes(512)


def test_features_reset_with_controller(env):
    drv = env.drv
    drv.set_features(0x08, 0x0305)
    drv.set_features(0x0B, 0x100)
    drv.disable()
    drv.enable()
    assert drv.get_features(0x08).dw0 == 0
    assert drv.get_features(0x0B).dw0 == 0


def test_keep_alive(env):
    drv, ctrl = env.drv, env.ctrl
    drv.admin(0x18)
    drv.set_features(0x0F, 150)
    assert drv.get_features(0x0F).dw0 == 200  # rounded to the 100 ms granularity (KAS)
    for _ in range(5):
        time.sleep(0.05)
        drv.admin(0x18)
    assert ctrl.csts & 0x2 == 0
    before = ctrl.error_log.count
    wait_until(lambda: ctrl.csts & 0x2, timeout=3, what="keep alive timeout")
    assert ctrl.error_log.entries()[0]["status"] & 0x7FF == Status.KA_TIMEOUT_EXPIRED
    assert ctrl.error_log.count == before + 1
    # a controller reset recovers
    drv.disable()
    drv.enable()
    assert drv.identify(0x01)[4:24].rstrip(b" ") == ctrl.cfg.serial.encode()


def test_largest_keep_alive_timeout_does_not_wrap(env):
    """KATO FFFFFFFFh rounded up to the 100 ms granularity must not wrap to 4 ms (which
    would fail the controller almost at once): it stays the largest multiple of 100 ms."""
    drv, ctrl = env.drv, env.ctrl
    drv.set_features(0x0F, 0xFFFFFFFF)
    kato = drv.get_features(0x0F).dw0
    assert kato == 0xFFFFFFFF // 100 * 100
    time.sleep(0.1)
    assert ctrl.csts & 0x3 == 0x1
    drv.set_features(0x0F, 0)  # disabled again
    assert drv.get_features(0x0F).dw0 == 0


def test_interrupt_vector_configuration_admin_vector(env):
    """Vector 0 is the admin completion queue's: coalescing never applies to it, so CD reads
    1 (current, default and saved), and a Set clearing it changes nothing."""
    drv = env.drv
    assert drv.get_features(0x09, cdw11=0).dw0 == 1 << 16
    assert drv.get_features(0x09, cdw11=0, sel=1).dw0 == 1 << 16
    assert drv.get_features(0x09, cdw11=0, sel=2).dw0 == 1 << 16
    drv.set_features(0x09, 0)  # CD clear: accepted, the vector stays uncoalesced
    assert drv.get_features(0x09, cdw11=0).dw0 == 1 << 16
    drv.set_features(0x09, (1 << 16) | 0)
    assert drv.get_features(0x09, cdw11=0).dw0 == 1 << 16


def test_admin_vector_never_coalesced_even_for_an_io_queue(nvme_env):
    """An I/O completion queue sharing vector 0 is not coalesced either (CD reads 1 there)."""
    env = nvme_env("ns=mem:size=4M", io_queues=0)
    drv = env.drv
    q = drv.create_io_queue_pair(1, 16, vector=0)
    assert q.vector == 0
    drv.set_features(0x08, (255 << 8) | 7)  # 8 entries or 25.5 ms
    before = env.pdev.irq_count(0)
    drv.submit(1, 0x00, nsid=1)  # one Flush: below the threshold, yet signalled at once
    assert env.pdev.irq_count(0) == before + 1
    assert len(drv.poll(1)) == 1
