"""The Deallocated or Unwritten Logical Block error (Error Recovery, feature 05h, DULBE bit
16; NSFEAT.DAE): Read, Compare, Verify and Copy sources touching a block that was never
written or was deallocated fail with 02h/87h and an Error Information entry naming the
block; the same knowledge as Get LBA Status (the backend's holes, 4 KiB granularity); it
migrates with the features."""

from __future__ import annotations

import struct

import pytest
from _copy_exercisers import copy, f0
from _helpers import expect_status
from test_migration_nvme import Blocks, Host

from pcidev_nvme.lba_status import first_deallocated
from pcidev_nvme.status import Status

READ, WRITE, COMPARE, WZ, DSM, VERIFY = 0x02, 0x01, 0x05, 0x08, 0x09, 0x0C
DULBE = 1 << 16
#: blocks of 512 bytes in a 4 KiB page (the mem backend's and a file system's hole granularity)
PAGE = 8


def pattern(slba: int, nlb: int) -> bytes:
    return b"".join(struct.pack("<Q", 0xD0_0000 + slba + i) * 64 for i in range(nlb))


@pytest.fixture(params=["mem", "file"])
def env(request, nvme_env, tmp_path):
    spec = "ns=mem:size=4M" if request.param == "mem" else f"ns=file:path={tmp_path}/img,size=4M"
    return nvme_env(spec, io_queues=1)


def expect_dulb(drv, opcode, lba, **fields):
    comp = expect_status(drv, Status.DEALLOCATED_OR_UNWRITTEN, opcode, qid=1, nsid=1, **fields)
    entry = drv.device.error_log.entries()[0]
    assert entry["lba"] == lba and entry["nsid"] == 1
    assert comp.code == 0x287  # SCT 2h (media and data integrity), SC 87h
    return comp


def test_dae_advertised_and_off_by_default(env):
    drv = env.drv
    assert drv.identify(0, nsid=1)[24] & 0x4  # NSFEAT.DAE
    assert drv.get_features(0x05, nsid=1).dw0 == 0
    assert drv.read(1, 0, 8) == bytes(4096)  # DULBE clear: unwritten blocks read as zeroes


def test_reads_of_unwritten_blocks_fail_with_dulbe(env):
    drv = env.drv
    drv.write(1, 16, pattern(16, 16))
    drv.set_features(0x05, DULBE, nsid=1)
    buf = drv.machine.alloc(64 * 512, 4096)
    assert drv.read(1, 16, 16) == pattern(16, 16)  # written: fine
    expect_dulb(drv, READ, 32, cdw10=24, cdw12=15, buf=buf, length=16 * 512)  # 24..39: 32.. unwritten
    expect_dulb(drv, READ, 0, cdw10=0, cdw12=7, buf=buf, length=8 * 512)
    expect_dulb(drv, VERIFY, 8, cdw10=8, cdw12=15)  # 8..15 unwritten
    drv.io(1, VERIFY, nsid=1, cdw10=16, cdw12=15)
    drv.mem.write(buf, pattern(16, 16))
    drv.io(1, COMPARE, nsid=1, cdw10=16, cdw12=15, buf=buf, length=16 * 512)
    expect_dulb(drv, COMPARE, 32, cdw10=24, cdw12=15, buf=buf, length=16 * 512)
    # LBA Out of Range comes first
    expect_status(drv, Status.LBA_RANGE, READ, qid=1, nsid=1, cdw10=8191, cdw12=7, buf=buf, length=8 * 512)
    # clearing DULBE: zeroes again
    drv.set_features(0x05, 0, nsid=1)
    assert drv.read(1, 32, 8) == bytes(4096)
    drv.machine.free(buf)


def test_deallocation_makes_blocks_fail_again_and_agrees_with_get_lba_status(env):
    drv, ctrl = env.drv, env.ctrl
    drv.write(1, 0, pattern(0, 64))
    drv.set_features(0x05, DULBE, nsid=1)
    ranges = struct.pack("<IIQ", 0, 16, 16)  # deallocate 16..31 (two whole pages)
    buf = drv.machine.alloc(4096, 4096)
    drv.mem.write(buf, ranges)
    drv.io(1, DSM, nsid=1, cdw10=0, cdw11=1 << 2, buf=buf, length=16)
    drv.io(1, WZ, nsid=1, cdw10=48, cdw12=(1 << 25) | 7)  # Write Zeroes with DEAC: 48..55
    # Get LBA Status (allocated ranges) and DULBE agree block by block
    status = drv.get_lba_status(1, 0, rl=64, atype=0x02).tag
    nlsd = struct.unpack_from("<I", status, 0)[0]
    allocated = set()
    for i in range(nlsd):
        s, n, _st = struct.unpack_from("<QIxB2x", status, 8 + 16 * i)
        allocated |= set(range(s, s + n))
    ns = ctrl.namespaces[1]
    for lba in range(64):
        assert (first_deallocated(ns, lba, 1) is None) == (lba in allocated), lba
        code = drv.io(1, VERIFY, nsid=1, cdw10=lba, cdw12=0, check=False).code
        assert code == (0 if lba in allocated else Status.DEALLOCATED_OR_UNWRITTEN), lba
    assert allocated == set(range(16)) | set(range(32, 48)) | set(range(56, 64))
    # a deallocation smaller than the 4 KiB granularity zeroes the blocks, which stay allocated
    drv.mem.write(buf, struct.pack("<IIQ", 0, 2, 2))
    drv.io(1, DSM, nsid=1, cdw10=0, cdw11=1 << 2, buf=buf, length=16)
    assert drv.read(1, 0, 8) == pattern(0, 2) + bytes(1024) + pattern(4, 4)
    drv.io(1, WRITE, nsid=1, cdw10=16, cdw12=7, buf=buf, length=4096)  # rewritten: readable again
    drv.io(1, READ, nsid=1, cdw10=16, cdw12=7, buf=buf, length=4096)
    drv.machine.free(buf)


def test_copy_source_reads_fail_with_dulbe(env):
    drv = env.drv
    drv.write(1, 0, pattern(0, 8))
    comp = copy(drv, 1, 100, [f0(0, 8)], 0)
    assert comp.ok  # DULBE clear
    drv.set_features(0x05, DULBE, nsid=1)
    comp = copy(drv, 1, 200, [f0(0, 8), f0(8, 8)], 0)
    assert comp.code == Status.DEALLOCATED_OR_UNWRITTEN and comp.dnr
    assert drv.device.error_log.entries()[0]["lba"] == 8
    buf = drv.machine.alloc(4096, 4096)
    # nothing was written: the destination is still unwritten
    assert drv.io(1, READ, nsid=1, cdw10=200, cdw12=7, buf=buf, length=4096, check=False).code == 0x287
    drv.machine.free(buf)
    comp = copy(drv, 1, 300, [f0(0, 8), f0(100, 8)], 0)  # the first copy's destination is written
    assert comp.ok
    assert drv.read(1, 300, 16) == pattern(0, 8) * 2


def test_dulbe_on_a_protection_information_namespace(nvme_env):
    """Namespaces with metadata take the protected path: DULBE holds there too."""
    drv = nvme_env("ns=mem:size=4M,lbaf=2,pi=1", io_queues=1).drv
    data = pattern(0, 8)
    comp, _, _ = drv.io_md(WRITE, 1, 0, 8, data=data, prinfo=8)
    assert comp.ok
    drv.set_features(0x05, DULBE, nsid=1)
    comp, got, _ = drv.io_md(READ, 1, 0, 8, data_len=len(data), prinfo=8 | 7)
    assert comp.ok and got == data
    for opcode in (READ, VERIFY):
        comp, _, _ = drv.io_md(opcode, 1, 8, 8, data_len=len(data), prinfo=8 | 7)
        assert comp.code == Status.DEALLOCATED_OR_UNWRITTEN, hex(comp.code)


def test_dulbe_migrates_with_verified_data():
    host = Host("ns=mem:size=4M,ns=mem:size=4M", io_queues=1)
    try:
        _migrate_with_dulbe(host)
    finally:
        host.close()


def _migrate_with_dulbe(host: Host) -> None:
    drv = host.drv
    blocks = Blocks(drv)
    for slba in (0, 64, 512):
        data = pattern(slba, 16)
        drv.write(1, slba, data)
        blocks.record(1, slba, data)
    drv.write(2, 0, pattern(0, 8))
    blocks.record(2, 0, pattern(0, 8))
    assert blocks.verify_all() > 0  # every block of both namespaces, before DULBE
    drv.set_features(0x05, DULBE | 7, nsid=1)
    host.migrate()  # (the migration itself compares every block's crc32c)
    assert drv.get_features(0x05, nsid=1).dw0 == DULBE | 7
    assert drv.get_features(0x05, nsid=2).dw0 == 0
    for slba in (0, 64, 512):
        assert drv.read(1, slba, 16) == pattern(slba, 16)
    buf = drv.machine.alloc(4096, 4096)
    expect_dulb(drv, READ, 16, cdw10=16, cdw12=7, buf=buf, length=4096)
    drv.machine.free(buf)
    drv.set_features(0x05, 0, nsid=1)
    assert blocks.verify_all() > 0  # every block of both namespaces, DULBE off
    host.migrate()  # and back without DULBE
    assert drv.get_features(0x05, nsid=1).dw0 == 0
    assert blocks.verify_all() > 0


def test_a_deleted_namespace_forgets_its_error_recovery(nvme_env):
    """Namespace Management: DULBE and TLER of a deleted namespace go with it; one created
    again with the same NSID starts at the defaults (and reads its blocks as zeroes)."""
    env = nvme_env("ns=mem:size=4M,capacity=64M,max_namespaces=4", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    data = bytearray(4096)
    struct.pack_into("<QQ", data, 0, 2048, 2048)
    ctrl_list = struct.pack("<HH", 1, 0)
    nsid = drv.admin(0x0D, cdw10=0, data=bytes(data)).dw0
    drv.admin(0x15, nsid=nsid, cdw10=0, data=ctrl_list)
    drv.set_features(0x05, DULBE | 9, nsid=nsid)
    assert ctrl.features.dulbe_enabled(nsid)
    drv.admin(0x0D, nsid=nsid, cdw10=1)  # delete (detaches it)
    assert not ctrl.features.dulbe_enabled(nsid) and nsid not in ctrl.features.tler
    assert drv.admin(0x0D, cdw10=0, data=bytes(data)).dw0 == nsid
    drv.admin(0x15, nsid=nsid, cdw10=0, data=ctrl_list)
    drv.scan_namespaces()
    assert drv.get_features(0x05, nsid=nsid).dw0 == 0
    assert drv.read(nsid, 0, 8) == bytes(4096)
