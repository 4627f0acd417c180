"""Admin: Asynchronous Event Request (limit, events, masking until the log page is read
with RAE cleared, configuration gating), Abort."""

from __future__ import annotations

import pytest
from _helpers import expect_status, wait_until

from pcidev_nvme.status import Status

AER = 0x0C


@pytest.fixture
def env(nvme_env):
    e = nvme_env("ns=mem:size=4M", io_queues=1, aers=0)
    e.drv.set_features(0x0B, 0x31F)
    return e


def events(drv, n, timeout=2.0):
    wait_until(lambda: drv.poll_events() is not None and len(drv.events) >= n, timeout=timeout,
               what=f"{n} events")
    return drv.events


def test_aer_limit(env):
    drv = env.drv
    for _ in range(4):  # AERL = 3
        drv.arm_aer()
    expect_status(drv, Status.AER_LIMIT, AER)


def test_smart_temperature_event_masked_until_log_read(env):
    drv, ctrl = env.drv, env.ctrl
    drv.arm_aer()
    drv.aer_auto_rearm = True
    ctrl.set_temperature(ctrl.cfg.warning_temp + 5)
    assert events(drv, 1) == [(1, 0x01, 0x02)]
    # another SMART event while masked stays queued
    ctrl.set_temperature(ctrl.cfg.temperature)
    ctrl.inject_critical_warning(0x01)  # spare below threshold
    assert drv.poll_events(timeout=0.05) == []
    drv.get_log(0x02, 512, rae=True)  # Retain Asynchronous Event: still masked
    assert drv.poll_events(timeout=0.05) == []
    drv.get_log(0x02, 512)  # RAE=0: unmasked, the queued event is reported
    assert events(drv, 2)[1] == (1, 0x02, 0x02)


def test_temperature_threshold_feature_raises_event(env):
    drv, ctrl = env.drv, env.ctrl
    drv.arm_aer()
    drv.set_features(0x04, ctrl.temperature - 1)
    assert events(drv, 1) == [(1, 0x01, 0x02)]


def test_events_disabled_in_aec_are_not_reported(env):
    drv, ctrl = env.drv, env.ctrl
    drv.set_features(0x0B, 0)
    drv.arm_aer()
    ctrl.set_temperature(400)
    ctrl.inject_critical_warning(0x4)
    drv.admin(0x15, nsid=1, cdw10=1, data=b"\x01\x00\x00\x00")  # detach: notice disabled too
    assert drv.poll_events(timeout=0.1) == []
    # errors cannot be disabled
    drv.write32(0x1000 + 8 * 9, 1)
    assert events(drv, 1) == [(0, 0x00, 0x01)]


def test_event_queued_before_any_aer_is_delivered_later(env):
    drv, ctrl = env.drv, env.ctrl
    ctrl.set_temperature(400)
    drv.arm_aer()
    assert events(drv, 1) == [(1, 0x01, 0x02)]


def test_namespace_attribute_notice_and_changed_list(env):
    drv = env.drv
    drv.arm_aer()
    drv.admin(0x15, nsid=1, cdw10=1, data=b"\x01\x00\x00\x00")  # detach NS 1 from controller 0
    assert events(drv, 1) == [(2, 0x00, 0x04)]
    changed = drv.get_log(0x04, 4096, rae=True)
    assert changed[:8] == b"\x01\x00\x00\x00\x00\x00\x00\x00"
    drv.admin(0x15, nsid=1, cdw10=0, data=b"\x01\x00\x00\x00")  # attach again: masked
    assert drv.poll_events(timeout=0.05) == []
    assert drv.get_log(0x04, 4096)[:8] == b"\x01\x00\x00\x00\x00\x00\x00\x00"  # RAE=0: clears
    assert drv.get_log(0x04, 4096) == bytes(4096)


def test_abort(env):
    drv = env.drv
    cid = drv.arm_aer()
    comp = drv.admin(0x08, cdw10=(cid << 16) | 0)
    assert comp.dw0 & 1 == 0  # aborted
    aborted = drv.stash[0].pop() if drv.stash.get(0) else drv.wait_for(0, cid)
    assert aborted.cid == cid and aborted.code == Status.ABORT_REQUESTED
    # a command that is not outstanding is "not aborted"
    assert drv.admin(0x08, cdw10=(0x1234 << 16) | 1).dw0 & 1 == 1
    assert drv.admin(0x08, cdw10=(0x1234 << 16) | 77).dw0 & 1 == 1


def test_aers_dropped_by_controller_reset(env):
    drv, ctrl = env.drv, env.ctrl
    for _ in range(4):
        drv.arm_aer()
    drv.disable()
    drv.enable()
    for _ in range(4):  # the limit applies afresh
        drv.arm_aer()
    assert len(ctrl.aer.outstanding) == 4


def test_enabling_aec_reports_a_condition_already_present(env):
    drv, ctrl = env.drv, env.ctrl
    drv.set_features(0x0B, 0)
    ctrl.set_temperature(400)
    drv.arm_aer()
    assert drv.poll_events(timeout=0.05) == []
    drv.set_features(0x0B, 0x2)
    assert events(drv, 1) == [(1, 0x01, 0x02)]
    # cleared and set again: reported again (once the log was read)
    drv.get_log(0x02, 512)
    ctrl.set_temperature(300)
    ctrl.set_temperature(401)
    assert events(drv, 2)[1] == (1, 0x01, 0x02)


def test_event_is_cleared_only_by_its_own_log_page(env):
    """NVMe 2.0 §5.2: a reported event masks its type until the host reads *the log page
    associated with that event* with RAE cleared; another log of the same type does not."""
    drv, ctrl = env.drv, env.ctrl
    from pcidev_nvme.aer import INFO_FW_ACTIVATION

    drv.arm_aer()
    drv.admin(0x15, nsid=1, cdw10=1, data=b"\x01\x00\x00\x00")  # detach: NS attribute notice (LID 04h)
    assert events(drv, 1) == [(2, 0x00, 0x04)]
    ctrl.notice(INFO_FW_ACTIVATION, 0x03)  # a firmware activation notice: masked meanwhile
    drv.get_log(0x03, 512)  # the Firmware Slot log does not clear the namespace notice
    drv.poll_events(timeout=0.05)
    assert len(drv.events) == 1
    drv.get_log(0x04, 4096)  # the Changed Namespace List does
    assert events(drv, 2)[1] == (2, 0x01, 0x03)
    drv.admin(0x15, nsid=1, cdw10=0, data=b"\x01\x00\x00\x00")  # attach: masked by the FW notice
    drv.get_log(0x04, 4096)
    drv.poll_events(timeout=0.05)
    assert len(drv.events) == 2
    drv.get_log(0x03, 512)  # clears the firmware activation notice
    assert events(drv, 3)[2] == (2, 0x00, 0x04)
