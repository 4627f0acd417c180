"""Endurance groups (pcidev_nvme.endurance): Identify CNS 19h and the ENDGID / ENDGIDMAX
fields, the Endurance Group Information log (09h) agreeing with the SMART / Health log,
feature 18h per endurance group, the Endurance Group Event Aggregate log (0Fh) and its
notice, the supported-logs / features logs, Namespace Management's ENDGID, migration,
and what an SR-IOV secondary controller reports."""

from __future__ import annotations

import os
import struct

import crc32c
import pytest
from _helpers import expect_status, make_env
from test_virtualization import Host as SriovHost

from pcidev_nvme.endurance import ENDGID, EnduranceGroup, EnduranceState, MediaTotals, endurance_group_list
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import NvmeDriver

GET_LOG, GET_FEATURES, SET_FEATURES, IDENTIFY = 0x02, 0x0A, 0x09, 0x06


@pytest.fixture
def env():
    e = make_env("ns=mem:size=16M,ns=mem:size=8M", io_queues=1)
    yield e
    e.close()


def _u128(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 16], "little")


def _eg_log(drv: NvmeDriver, endgid: int = 1, *, length: int = 512, offset: int = 0, check: bool = True):
    numd = length // 4 - 1
    return drv.admin(GET_LOG, nsid=0, cdw10=(numd << 16) | 0x09, cdw11=endgid << 16, cdw12=offset,
                     length=length, check=check)


def _verified_io(drv: NvmeDriver, nsid: int, start: int, count: int) -> dict[int, int]:
    crcs = {}
    for i in range(count):
        data = os.urandom(8 * drv.lba_size(nsid))
        drv.write(nsid, start + 8 * i, data)
        for b in range(8):
            blk = data[b * drv.lba_size(nsid):(b + 1) * drv.lba_size(nsid)]
            crcs[start + 8 * i + b] = crc32c.crc32c(blk)
    return crcs


def _check(drv: NvmeDriver, nsid: int, crcs: dict[int, int]) -> None:
    for lba, crc in crcs.items():
        assert crc32c.crc32c(drv.read(nsid, lba, 1)) == crc, f"block {lba} differs"


def test_identify_reports_endurance_group_1(env):
    drv = env.drv
    idc = drv.identify(0x01)
    assert struct.unpack_from("<I", idc, 96)[0] & (1 << 4)  # CTRATT: Endurance Groups
    assert struct.unpack_from("<HH", idc, 338) == (0, 1)  # NSETIDMAX, ENDGIDMAX
    for nsid in (1, 2):
        assert struct.unpack_from("<HH", drv.identify(0x00, nsid=nsid), 100) == (0, ENDGID)  # NVMSETID, ENDGID
        assert struct.unpack_from("<H", drv.identify(0x08, nsid=nsid), 12)[0] == ENDGID  # CNS 08h too
    for endgid, want in ((0, (1, 1)), (1, (1, 1)), (2, (0, 0)), (0xFFFF, (0, 0))):
        data = drv.admin(IDENTIFY, cdw10=0x19, cdw11=endgid, length=4096).tag
        assert struct.unpack_from("<HH", data, 0) == want, endgid
        assert data == endurance_group_list(endgid)


def test_information_log_agrees_with_smart(env):
    drv = env.drv
    crcs = _verified_io(drv, 1, 0, 40)
    _check(drv, 1, crcs)
    drv.io(1, 0x04, nsid=1, cdw10=500, cdw12=0)  # Write Uncorrectable, then a read of it fails
    assert drv.io(1, 0x02, nsid=1, cdw10=500, cdw12=0, length=drv.lba_size(1), check=False).code == \
        Status.UNRECOVERED_READ_ERROR
    expect_status(drv, Status.INVALID_FIELD, GET_LOG, nsid=0, cdw10=(127 << 16) | 0x09, cdw11=7 << 16,
                  length=512, param=46)  # LSI names a group that does not exist: an error entry
    smart = drv.get_log(0x02, 512)
    info = _eg_log(drv).tag
    assert info[0] == smart[0] & 0x0D == 0 and info[3:6] == smart[3:6] == bytes([100, 10, 0])
    # data units read / written, media units written: billions of bytes, rounded up (some
    # kilobytes here: 1), where the SMART log counts thousands of 512-byte units
    assert _u128(info, 48) == 1 and _u128(smart, 32) > 0
    assert _u128(info, 64) == _u128(info, 80) == 1 and _u128(smart, 48) > 0
    assert _u128(info, 96) == _u128(smart, 64) >= 41  # host read commands
    assert _u128(info, 112) == _u128(smart, 80) >= 40  # host write commands
    assert _u128(info, 128) == _u128(smart, 160) == 1  # media and data integrity errors
    assert _u128(info, 144) == _u128(smart, 176) >= 2  # error information log entries
    idc = drv.identify(0x01)
    assert info[160:176] == idc[280:296] and info[176:192] == idc[296:312]  # TNVMCAP, UNVMCAP
    assert info[192:] == bytes(320) and info[32:48] == bytes(16)  # reserved; endurance estimate not reported
    assert _eg_log(drv, length=64, offset=48).tag == info[48:112]  # an offset into the page


@pytest.mark.parametrize("nbytes, units", [(0, 0), (1, 1), (10**9, 1), (10**9 + 1, 2), (3 * 10**9, 3),
                                           (512_000 * 5000, 3)])
def test_data_and_media_units_are_billions_of_bytes_rounded_up(nbytes, units):
    """Log 09h's Data Units Read / Written and Media Units Written count bytes in billions,
    rounded up (the Endurance Group Information log figure; review F5), not the SMART
    log's thousands of 512-byte units (5000 of those: 2.56 GB, 3 here)."""
    from pcidev_nvme.aer import AsyncEvents

    totals = MediaTotals(bytes_read=nbytes, bytes_written=2 * nbytes, host_reads=7, host_writes=9)
    group = EnduranceGroup(AsyncEvents(lambda *a, **k: None, 1), lambda: [], lambda: totals,
                           lambda: (0, 0), lambda: 0)
    page = group.information_page(1)
    assert _u128(page, 48) == units
    assert _u128(page, 64) == _u128(page, 80) == -(-2 * nbytes // 10**9)
    assert (_u128(page, 96), _u128(page, 112)) == (7, 9)


@pytest.mark.parametrize("endgid", [0, 2, 0xFFFF])
def test_information_log_of_another_group_is_invalid_field(env, endgid):
    comp = _eg_log(env.drv, endgid, check=False)
    assert comp.code == Status.INVALID_FIELD and comp.dnr


def test_information_log_offset_beyond_the_page_is_invalid_field(env):
    assert _eg_log(env.drv, length=64, offset=516, check=False).code == Status.INVALID_FIELD


def test_critical_warning_shows_in_both_logs(env):
    drv, ctrl = env.drv, env.ctrl
    ctrl.inject_critical_warning((1 << 0) | (1 << 3) | (1 << 4))  # spare, read-only, backup failed
    try:
        info, smart = _eg_log(drv).tag, drv.get_log(0x02, 512)
        assert info[0] == 0x09  # the group has spare and read-only, not the volatile backup bit
        assert smart[0] & 0x19 == 0x19 and smart[6] == 0x09  # SMART: the warning and the group summary
    finally:
        ctrl.inject_critical_warning(0)
    assert _eg_log(drv).tag[0] == 0 and drv.get_log(0x02, 512)[6] == 0


def test_feature_18h_per_endurance_group(env):
    drv = env.drv
    assert drv.get_features(0x18, cdw11=1).dw0 == 1  # EGCW 0 by default
    drv.set_features(0x18, 1 | 0xFF << 16)
    assert drv.get_features(0x18, cdw11=1).dw0 == 1 | 0x0D << 16  # only the warnings a group has
    assert drv.get_features(0x18, cdw11=1, sel=1).dw0 == 1  # default
    assert drv.get_features(0x18, cdw11=1, sel=2).dw0 == 1  # saved = default
    assert drv.get_features(0x18, cdw11=1, sel=3).dw0 == 4  # changeable, not per namespace, not saveable
    for endgid in (0, 2):
        expect_status(drv, Status.INVALID_FIELD, GET_FEATURES, cdw10=0x18, cdw11=endgid, param=44)
        expect_status(drv, Status.INVALID_FIELD, SET_FEATURES, cdw10=0x18, cdw11=endgid | 1 << 16, param=44)
    expect_status(drv, Status.FEATURE_NOT_SAVEABLE, SET_FEATURES, cdw10=0x18 | 1 << 31, cdw11=1)
    expect_status(drv, Status.FEATURE_NOT_PER_NS, SET_FEATURES, nsid=1, cdw10=0x18, cdw11=1)
    assert drv.get_features(0x18, cdw11=1).dw0 == 1 | 0x0D << 16  # the refusals changed nothing
    drv.restart()  # a controller reset: back to the default
    assert drv.get_features(0x18, cdw11=1).dw0 == 1


def test_supported_logs_and_features_list_what_works(env):
    drv = env.drv
    logs = drv.get_log(0x00, 1024)
    assert struct.unpack_from("<I", logs, 4 * 0x09)[0] & 1 and struct.unpack_from("<I", logs, 4 * 0x0F)[0] & 1
    fsupp = struct.unpack_from("<I", drv.get_log(0x12, 1024), 4 * 0x18)[0]
    assert fsupp & 1 and fsupp >> 20 & 0xFFF == 1 << 3  # supported, endurance group scope
    assert drv.get_log(0x0F, 512) == bytes(512)  # nothing aggregated yet


def _events_after(drv: NvmeDriver, before: int, timeout: float) -> list[tuple[int, int, int]]:
    drv.poll_events(timeout)  # (an event may already have come with another command's completion)
    return drv.events[before:]


def test_event_aggregate_log_and_notice(env):
    drv, ctrl = env.drv, env.ctrl
    # no warning enabled by feature 18h: nothing aggregated, no notice
    drv.set_features(0x0B, 1 << 14)
    drv.arm_aer()
    n = len(drv.events)
    ctrl.inject_critical_warning(1 << 0)
    assert _events_after(drv, n, 0.2) == [] and drv.get_log(0x0F, 512) == bytes(512)
    # enabling the warning reports the condition already there
    drv.set_features(0x18, 1 | 1 << 16)
    assert _events_after(drv, n, 2.0) == [(2, 0x06, 0x0F)]
    assert struct.unpack_from("<QH", drv.get_log(0x0F, 512, rae=True), 0) == (1, 1)  # RAE: kept
    assert struct.unpack_from("<QH", drv.get_log(0x0F, 512), 0) == (1, 1)
    assert drv.get_log(0x0F, 512) == bytes(512)  # read with RAE clear: emptied
    # the same warning is not reported again while it stays; after it clears, it is
    drv.arm_aer()
    n = len(drv.events)
    ctrl.inject_critical_warning(1 << 0)
    assert _events_after(drv, n, 0.2) == []
    ctrl.inject_critical_warning(0)
    ctrl.inject_critical_warning(1 << 0)
    assert _events_after(drv, n, 2.0) == [(2, 0x06, 0x0F)]
    drv.get_log(0x0F, 512)
    # AEC bit 14 clear: the group is aggregated, no notice
    drv.set_features(0x0B, 0)
    drv.arm_aer()
    n = len(drv.events)
    ctrl.inject_critical_warning(0)
    ctrl.inject_critical_warning(1 << 0)
    assert _events_after(drv, n, 0.2) == []
    assert struct.unpack_from("<QH", drv.get_log(0x0F, 512), 0) == (1, 1)
    ctrl.inject_critical_warning(0)


def test_an_entry_added_while_log_0fh_is_read_stays_for_the_next_read(env, monkeypatch):
    """Reading log 0Fh with RAE clear empties it only of what the host got: an entry added
    between the copy and the clear (another thread's warning) stays (review F9)."""
    drv, ctrl = env.drv, env.ctrl
    drv.set_features(0x18, 1 | 1 << 16)
    admin = ctrl.admin
    real = admin.to_host

    def to_host(req, data):
        out = real(req, data)
        if req.opcode == GET_LOG and req.cdw10 & 0xFF == 0x0F:
            ctrl.inject_critical_warning(1 << 0)  # the group is added meanwhile
        return out

    monkeypatch.setattr(admin, "to_host", to_host)
    assert drv.get_log(0x0F, 512) == bytes(512)  # the page the host got was empty ...
    monkeypatch.undo()
    assert struct.unpack_from("<QH", drv.get_log(0x0F, 512), 0) == (1, 1)  # ... the entry stays
    assert drv.get_log(0x0F, 512) == bytes(512)
    ctrl.inject_critical_warning(0)


def test_namespace_management_takes_endurance_group_1(env):
    drv = env.drv
    for endgid, status in ((1, 0), (0, 0), (2, Status.INVALID_FIELD)):
        data = bytearray(4096)
        struct.pack_into("<QQ", data, 0, 1024, 1024)  # NSZE, NCAP (512-byte blocks)
        struct.pack_into("<H", data, 102, endgid)
        comp = drv.admin(0x0D, cdw10=0, data=bytes(data), check=False)
        assert comp.code == status, endgid
        if not status:
            assert struct.unpack_from("<H", drv.identify(0x11, nsid=comp.dw0), 102)[0] == ENDGID
    data = bytearray(4096)
    struct.pack_into("<QQ", data, 0, 1024, 1024)
    struct.pack_into("<H", data, 100, 1)  # NVMSETID: no NVM sets
    assert drv.admin(0x0D, cdw10=0, data=bytes(data), check=False).code == Status.INVALID_FIELD


def test_component_state_round_trips_and_old_streams_load():
    from pcidev_nvme.aer import AsyncEvents
    from pcidev_nvme.logs import SmartCounters

    smart = SmartCounters()
    eg = EnduranceGroup(AsyncEvents(lambda *a: None, 4), lambda: [smart], MediaTotals, lambda: (0, 0), lambda: 0)
    assert eg.snapshot() is None  # the default: no subsection in the stream
    eg.set_feature(1 | 0x04 << 16)
    smart.inject_warning(0x04)
    eg.check()
    eg.retire(MediaTotals(1, 2, 3, 4, 5, 6))
    eg.retire(MediaTotals(1, 1, 1, 1, 1, 1))
    st = eg.snapshot()
    assert st == EnduranceState(event_config=0x04, pending=True, reported=0x04, retired=MediaTotals(2, 3, 4, 5, 6, 7))
    other = EnduranceGroup(AsyncEvents(lambda *a: None, 4), lambda: [smart], MediaTotals, lambda: (0, 0), lambda: 0)
    other.restore(st)
    assert other.snapshot() == st
    other.restore(None)  # a stream from before endurance groups
    assert other.snapshot() is None


def test_feature_aggregate_log_and_counters_migrate_with_verified_data(hosts):
    h = hosts("serial=egmig,ns=mem:size=8M", io_queues=1, aers=0)
    drv = h.drv
    crcs = _verified_io(drv, 1, 0, 16)
    drv.set_features(0x18, 1 | 0x0D << 16)
    h.ctrl.inject_critical_warning(1 << 2)
    before_info = _eg_log(drv).tag
    h.migrate()
    assert _eg_log(drv).tag == before_info  # the counters and the warning came along (with SMART's)
    _check(drv, 1, crcs)
    assert drv.get_features(0x18, cdw11=1).dw0 == 1 | 0x0D << 16
    assert struct.unpack_from("<QH", drv.get_log(0x0F, 512), 0) == (1, 1)  # still aggregated
    assert _u128(_eg_log(drv).tag, 96) == _u128(before_info, 96) + len(crcs)  # the verifying reads count on
    more = _verified_io(drv, 1, 512, 4)
    _check(drv, 1, {**crcs, **more})
    smart = drv.get_log(0x02, 512)
    info = _eg_log(drv).tag
    assert _u128(info, 96) == _u128(smart, 64) and _u128(info, 112) == _u128(smart, 80)


def test_sriov_secondary_reports_the_subsystems_endurance_group():
    h = SriovHost()
    try:
        h.bring_up(0, 2)
        h.pdev.enable_sriov(2)
        vd = h.probe_vf(0, aers=0)
        idc = vd.identify(0x01)
        assert struct.unpack_from("<I", idc, 96)[0] & (1 << 4) and struct.unpack_from("<H", idc, 340)[0] == 1
        assert struct.unpack_from("<H", vd.identify(0x00, nsid=2), 102)[0] == ENDGID
        assert struct.unpack_from("<HH", vd.admin(IDENTIFY, cdw10=0x19, length=4096).tag, 0) == (1, 1)
        vcrcs = _verified_io(vd, 2, 0, 6)
        pcrcs = _verified_io(h.drv, 1, 0, 3)
        _check(vd, 2, vcrcs)
        _check(h.drv, 1, pcrcs)
        # one group for the subsystem: the same page from both controllers, the sum of their SMART logs
        pf_info, vf_info = _eg_log(h.drv).tag, _eg_log(vd).tag
        assert pf_info == vf_info
        pf_smart, vf_smart = h.drv.get_log(0x02, 512), vd.get_log(0x02, 512)
        for eg_off, smart_off in ((96, 64), (112, 80)):
            assert _u128(pf_info, eg_off) == _u128(pf_smart, smart_off) + _u128(vf_smart, smart_off)
        assert _u128(vf_smart, 80) >= 6 and _u128(pf_smart, 80) >= 3
        # feature 18h is the group's (one value for the subsystem); each controller has its
        # own aggregate log, and a warning on one controller reaches every one's (review F8)
        vd.set_features(0x18, 1 | 1 << 16)
        assert h.drv.get_features(0x18, cdw11=1).dw0 == 1 | 1 << 16
        h.ctrl.virtual_functions[0].inject_critical_warning(1 << 0)
        try:
            assert struct.unpack_from("<QH", vd.get_log(0x0F, 512), 0) == (1, 1)
            assert vd.get_log(0x0F, 512) == bytes(512)  # read with RAE clear: this one's emptied
            assert struct.unpack_from("<QH", h.drv.get_log(0x0F, 512), 0) == (1, 1)
            assert _eg_log(h.drv).tag[0] == _eg_log(vd).tag[0] == 0x01  # the group's warning, seen by both
        finally:
            h.ctrl.virtual_functions[0].inject_critical_warning(0)
    finally:
        h.close()


def test_feature_18h_is_the_group_s_and_a_primary_warning_reaches_the_secondary():
    """Set Features 18h on the primary is what a secondary reports (Endurance Group scope),
    a secondary's reset leaves it, and a warning appearing on the primary adds the group
    to the secondary's aggregate log (review F8)."""
    h = SriovHost()
    try:
        h.bring_up(0, 2)
        h.pdev.enable_sriov(1)
        vd = h.probe_vf(0, aers=0)
        crcs = _verified_io(vd, 2, 0, 4)
        h.drv.set_features(0x18, 1 | (1 << 3) << 16)
        assert vd.get_features(0x18, cdw11=1).dw0 == 1 | (1 << 3) << 16
        vd.disable()
        vd.restart()  # the secondary's controller reset: the group's value stays
        assert vd.get_features(0x18, cdw11=1).dw0 == 1 | (1 << 3) << 16
        h.ctrl.inject_critical_warning(1 << 3)
        try:
            assert struct.unpack_from("<QH", vd.get_log(0x0F, 512), 0) == (1, 1)
            assert struct.unpack_from("<QH", h.drv.get_log(0x0F, 512), 0) == (1, 1)
        finally:
            h.ctrl.inject_critical_warning(0)
        _check(vd, 2, crcs)
        h.drv.disable()
        h.drv.restart()  # the primary's reset: the default again, for the group
        assert vd.get_features(0x18, cdw11=1).dw0 == 1
    finally:
        h.close()


def test_a_disabled_vfs_counters_stay_in_the_group_and_migrate():
    from test_virtualization import _repoint

    from pcidev.migration import load_device_stream, save_device_stream
    from pcidev_nvme.controller import NvmeController

    h = SriovHost()
    try:
        h.bring_up(0, 2)
        h.pdev.enable_sriov(1)
        vd = h.probe_vf(0, aers=0)
        vcrcs = _verified_io(vd, 2, 0, 5)
        _check(vd, 2, vcrcs)
        before = _eg_log(h.drv).tag
        vf_smart = vd.get_log(0x02, 512)
        assert _u128(vf_smart, 80) >= 5
        h.vf_drvs.remove(vd)
        vd.close()
        h.pdev.disable_sriov()  # the secondary is gone: its counters stay in the group's
        after = _eg_log(h.drv).tag
        assert after[48:160] == before[48:160]
        pf_smart = h.drv.get_log(0x02, 512)
        assert _u128(after, 112) == _u128(pf_smart, 80) + _u128(vf_smart, 80)
        # and they migrate (the endurance subsection)
        src = h.ctrl
        src.quiesce()
        data, fds = save_device_stream(src)
        dst = NvmeController(src.cfg, name="dst")
        h.closing.append(load_device_stream(dst, data, fds))
        _repoint(h, dst)
        dst.resume()
        h.closing.append(src)
        h.ctrl = dst
        assert _eg_log(h.drv).tag[48:160] == after[48:160]
        _check(h.drv, 2, vcrcs)  # the VF's data, read through the primary
    finally:
        h.close()


def test_a_load_onto_live_vfs_carries_the_source_s_totals_only():
    """Loading onto a destination whose own VFs are live: closing them (the load replaces
    them) adds nothing to the migrated endurance group, whose log 09h is the source's
    (review F4). The data is verified by the source's host driving a second destination
    loaded from the first."""
    from test_virtualization import _repoint, _two_vfs, _verify, _workload

    from pcidev.migration import load_device, load_device_stream, save_device, save_device_stream
    from pcidev_nvme.controller import NvmeController

    src, dst = SriovHost(), SriovHost()
    try:
        s_drvs, d_drvs = _two_vfs(src), _two_vfs(dst)
        crcs: dict = {}
        _workload(src, s_drvs, crcs, 1)
        _workload(dst, d_drvs, {}, 2)
        assert _u128(_eg_log(dst.drv).tag, 112) >= 3 * 24
        page = _eg_log(src.drv).tag
        src.ctrl.quiesce()
        dst.ctrl.quiesce()
        load_device(dst.ctrl, save_device(src.ctrl))
        assert dst.ctrl.endurance.information_page(1)[48:160] == page[48:160]
        # on to a fresh controller the source's host drives: the data and log 09h came along
        data, fds = save_device_stream(dst.ctrl)
        again = NvmeController(src.ctrl.cfg, name="again")
        src.closing.append(load_device_stream(again, data, fds))
        _repoint(src, again)
        again.resume()
        src.closing.append(src.ctrl)
        src.ctrl = again
        assert _verify(s_drvs, crcs) == 3 * 4096
        after = _eg_log(src.drv).tag
        assert after[64:96] == page[64:96] and after[112:128] == page[112:128]  # written: unchanged
        assert _u128(after, 96) > _u128(page, 96)  # (the reads since)
    finally:
        dst.close()
        src.close()


def test_the_group_s_totals_survive_a_restart_with_sriov(tmp_path):
    """Log 09h after a power cycle still counts what the secondaries did (live or disabled
    before it): the state file keeps the group's counters beyond the primary's SMART
    counters (review F10). The data written through the secondary is verified after it."""
    cfg = ("serial=EGP,max_ioqpairs=8,msix_vectors=9,sriov_max_vfs=2,sriov_vq_flexible=6,sriov_vi_flexible=4,"
           f"state_dir={tmp_path},ns=mem:size=2M,ns=file:path={tmp_path}/b.img,size=2M,ns=mem:size=2M")
    h = SriovHost(cfg)
    try:
        h.bring_up(0, 2)
        h.bring_up(1, 3)
        h.pdev.enable_sriov(2)
        vd, other = h.probe_vf(0, aers=0), h.probe_vf(1, aers=0)
        crcs = _verified_io(vd, 2, 0, 6)
        _verified_io(other, 3, 0, 4)
        _verified_io(h.drv, 1, 0, 3)
        _check(vd, 2, crcs)
        h.ctrl.save_state()  # (a periodic save while the secondaries are live)
        before = _eg_log(h.drv).tag
        assert _u128(before, 112) >= 13
    finally:
        h.close()
    h = SriovHost(cfg)
    try:
        after = _eg_log(h.drv).tag
        assert after[48:96] == before[48:96] and after[112:160] == before[112:160]
        h.bring_up(0, 2)
        h.pdev.enable_sriov(1)
        vd = h.probe_vf(0, aers=0)
        _check(vd, 2, crcs)
        assert _u128(_eg_log(h.drv).tag, 112) == _u128(before, 112)  # (reads since: not writes)
    finally:
        h.close()
    # a restart with the secondaries' VFs disabled before it: the same
    h = SriovHost(cfg)
    try:
        assert _eg_log(h.drv).tag[112:160] == before[112:160]
    finally:
        h.close()
