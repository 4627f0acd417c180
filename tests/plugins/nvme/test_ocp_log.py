"""The OCP Datacenter NVMe SSD "SMART / Health Information Extended" log page (LID C0h),
offered with ``ocp=on`` (default off), and the Supported Log Pages log (LID 00h) that
lists exactly the log pages Get Log Page answers."""

from __future__ import annotations

import struct

import attrs
import pytest
from _helpers import expect_status, make_env, smart
from test_migration_nvme import Host

from pcidev.migration import load_device_stream, save_device_stream
from pcidev.vmstate.errors import ConfigMismatchError
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.logs import OCP_SMART_GUID, SmartCounters, ocp_smart_page
from pcidev_nvme.status import Status

GET_LOG = 0x02
GUID = bytes([0xC5, 0xAF, 0x10, 0x28, 0xEA, 0xBF, 0xF2, 0xA4, 0x9C, 0x4F, 0x6F, 0x7C, 0xC9, 0x14, 0xD5, 0xAF])


def _log_args(lid: int, length: int, nsid: int = 0xFFFFFFFF) -> dict[str, int]:
    numd = length // 4 - 1
    return dict(nsid=nsid, cdw10=(numd << 16) | lid, length=length)


def _u128(b: bytes, off: int) -> int:
    lo, hi = struct.unpack_from("<QQ", b, off)
    return int(lo | hi << 64)


@pytest.fixture
def ocp(nvme_env):
    return nvme_env("ns=mem:size=4M,ocp=on", io_queues=1)


def test_off_by_default(nvme_env):
    drv = nvme_env("ns=mem:size=4M", io_queues=1).drv
    expect_status(drv, Status.INVALID_LOG_PAGE, GET_LOG, **_log_args(0xC0, 512))
    assert struct.unpack_from("<I", drv.get_log(0x00, 1024), 4 * 0xC0)[0] == 0


def test_layout_guid_and_versions(ocp):
    page = ocp.drv.get_log(0xC0, 512)
    assert page[496:512] == GUID == OCP_SMART_GUID
    assert struct.unpack_from("<H", page, 494)[0] == 3  # Log Page Version: OCP 2.0
    errata, point, minor, major = struct.unpack_from("<BHHB", page, 98)
    assert (major, minor, point, errata) == (2, 0, 0, 0)  # DSSD Specification Version
    # what the emulation has no counterpart for is zero
    for lo, hi in ((32, 56), (64, 98), (104, 112), (116, 494)):
        assert page[lo:hi] == bytes(hi - lo), (lo, hi)
    assert struct.unpack_from("<I", ocp.drv.get_log(0x00, 1024), 4 * 0xC0)[0] & 1


def test_physical_media_units_follow_the_host_data(ocp):
    drv = ocp.drv
    before = drv.get_log(0xC0, 512)
    drv.write(1, 0, b"w" * 8192)
    drv.read(1, 0, 24)  # 24 x 512 bytes
    after = drv.get_log(0xC0, 512)
    assert _u128(after, 0) - _u128(before, 0) == 8192
    assert _u128(after, 16) - _u128(before, 16) == 24 * 512
    s = smart(drv)
    assert -(-_u128(after, 0) // 512_000) == s["data_units_written"]  # the same counters, in bytes
    assert -(-_u128(after, 16) // 512_000) == s["data_units_read"]


def test_uncorrectable_reads_and_incomplete_shutdowns(ocp):
    drv = ocp.drv
    drv.io(1, 0x04, nsid=1, cdw10=5, cdw12=0)  # Write Uncorrectable LBA 5
    assert drv.io(1, 0x02, nsid=1, cdw10=5, cdw12=0, buf=ocp.machine.alloc(4096), length=512,
                  check=False).code == Status.UNRECOVERED_READ_ERROR
    page = drv.get_log(0xC0, 512)
    assert struct.unpack_from("<Q", page, 56)[0] == smart(drv)["media_errors"] == 1
    assert struct.unpack_from("<I", page, 112)[0] == smart(drv)["unsafe_shutdowns"]
    counters = SmartCounters()
    counters.power_on(unsafe=True)
    counters.power_on(unsafe=True)
    assert struct.unpack_from("<I", ocp_smart_page(counters), 112)[0] == 2


def test_partial_reads_and_statuses(ocp):
    drv = ocp.drv
    whole = drv.get_log(0xC0, 512)
    assert drv.get_log(0xC0, 16, offset=496) == whole[496:]
    expect_status(drv, Status.INVALID_FIELD, GET_LOG, param=4, **_log_args(0xC0, 512, nsid=1))
    for lid in (0xC1, 0xC2, 0xFF):
        expect_status(drv, Status.INVALID_LOG_PAGE, GET_LOG, **_log_args(lid, 512))


def test_supported_log_pages_list_exactly_what_get_log_page_answers(ocp):
    drv = ocp.drv
    page = drv.get_log(0x00, 1024)
    listed = {lid for lid in range(256) if struct.unpack_from("<I", page, 4 * lid)[0] & 1}
    assert {0x00, 0x01, 0x02, 0x03, 0x05, 0x12, 0x13, 0xC0} <= listed
    assert all(struct.unpack_from("<I", page, 4 * lid)[0] == 1 for lid in listed)  # no IOS, no LIDSP
    for lid in range(256):
        comp = drv.admin(GET_LOG, check=False, **_log_args(lid, 512))
        assert (comp.code != Status.INVALID_LOG_PAGE) == (lid in listed), f"LID {lid:#04x}: {comp.code:#x}"
    assert drv.get_log(0x13, 4096) == bytes(4096)  # no NVMe-MI commands
    assert drv.identify(0x01)[261] & (1 << 5)  # LPA: LIDs 00h, 05h, 12h, 13h


def test_the_page_survives_a_restart_with_the_counters(tmp_path):
    cfg = f"serial=ocp1,ocp=on,ns=file:path={tmp_path / 'disk.img'},size=1M"
    env = make_env(cfg, io_queues=1)
    try:
        env.drv.write(1, 0, b"x" * 4096)
    finally:
        env.close()  # no CC.SHN: an incomplete shutdown
    env = make_env(cfg, io_queues=1)
    try:
        page = env.drv.get_log(0xC0, 512)
        assert _u128(page, 0) == 4096
        assert struct.unpack_from("<I", page, 112)[0] == 1
    finally:
        env.close()


def test_the_counters_behind_the_page_migrate_and_the_destination_must_offer_it():
    host = Host("serial=ocpm,ocp=on,ns=mem:size=4M", io_queues=1, aers=0)
    try:
        drv = host.drv
        pattern = bytes(range(256)) * 32
        drv.write(1, 16, pattern)
        drv.read(1, 16, len(pattern) // 512)
        before = drv.get_log(0xC0, 512)
        src = host.ctrl
        src.quiesce()
        data, fds = save_device_stream(src)
        # a destination without ocp=on would lose the log page: it refuses by configuration
        other = NvmeController(attrs.evolve(src.cfg, ocp=False))
        try:
            with pytest.raises(ConfigMismatchError, match="nvme.ocp"):
                load_device_stream(other, data, fds)
        finally:
            other.close()
        src.resume()
        host.migrate()  # the same configuration (verifies every block)
        after = drv.get_log(0xC0, 512)
        assert after[:32] == before[:32] and after[56:64] == before[56:64] and after[494:] == before[494:]
        assert drv.read(1, 16, len(pattern) // 512) == pattern
    finally:
        host.close()
