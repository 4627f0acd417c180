"""Write Uncorrectable (I/O 04h, pcidev_nvme.uncorrectable): marks, the reads that fail
on them with Unrecovered Read Error, the writes and deallocations that clear them, the
sidecar that keeps them across restarts, and their migration."""

from __future__ import annotations

import json
import os
import struct
import threading
import time

import attrs
import crc32c
import pytest
from _helpers import expect_status, smart
from test_migration_nvme import Host

from pcidev.vmstate.errors import StateError
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.migration import check, save
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import NvmeDriver
from pcidev_nvme.uncorrectable import MAX_RANGES, SIDECAR_SUFFIX, Uncorrectable, UncorrectableState, WuRange

NLB = (4 << 20) // 512
WU, READ, WRITE, COMPARE, WZ, DSM, VERIFY, COPY = 0x04, 0x02, 0x01, 0x05, 0x08, 0x09, 0x0C, 0x19


def pattern(slba: int, nlb: int, lbs: int = 512) -> bytes:
    return b"".join(struct.pack("<Q", slba + i) * (lbs // 8) for i in range(nlb))


def read_status(drv: NvmeDriver, slba: int, nlb: int) -> int:
    buf = drv.machine.alloc(max(nlb * 512, 4096), 4096)
    try:
        return drv.io(1, READ, nsid=1, cdw10=slba, cdw12=nlb - 1, buf=buf, length=nlb * 512, check=False).code
    finally:
        drv.machine.free(buf)


@pytest.fixture(params=["mem", "file"])
def env(request, nvme_env, tmp_path):
    spec = "ns=mem:size=4M" if request.param == "mem" else f"ns=file:path={tmp_path}/img,size=4M"
    return nvme_env(spec)


def test_oncs_and_effects_advertise_write_uncorrectable(env):
    oncs = struct.unpack_from("<H", env.drv.identify(1), 520)[0]
    assert oncs & 0b10
    effects = struct.unpack_from("<256I", env.drv.get_log(0x05, 4096), 1024)
    assert effects[WU] & 0b11 == 0b11  # supported, changes LBA content


def test_marked_blocks_fail_reads_until_rewritten(env):
    drv, ctrl = env.drv, env.ctrl
    drv.write(1, 0, pattern(0, 32))
    drv.write_uncorrectable(1, 8, 4)
    assert ctrl.uncorrectable.ranges(1) == [(8, 4)]
    before = smart(drv)["media_errors"]
    comp = expect_status(drv, Status.UNRECOVERED_READ_ERROR, READ, qid=1, nsid=1, cdw10=6, cdw12=3,
                         buf=drv.machine.alloc(4096, 4096), length=2048)
    assert not comp.ok and ctrl.error_log.entries()[0]["lba"] == 8
    assert smart(drv)["media_errors"] == before + 1
    # blocks around the marks read as before
    assert drv.read(1, 0, 8) == pattern(0, 8)
    assert drv.read(1, 12, 20) == pattern(12, 20)
    for slba in range(8, 12):
        assert read_status(drv, slba, 1) == Status.UNRECOVERED_READ_ERROR
    # rewriting one block in the middle clears exactly that block
    drv.write(1, 9, pattern(900, 1))
    assert ctrl.uncorrectable.ranges(1) == [(8, 1), (10, 2)]
    assert drv.read(1, 9, 1) == pattern(900, 1)
    assert read_status(drv, 8, 1) == Status.UNRECOVERED_READ_ERROR
    assert read_status(drv, 10, 2) == Status.UNRECOVERED_READ_ERROR
    # Write Zeroes clears (and zeroes); a DSM deallocate clears
    drv.io(1, WZ, nsid=1, cdw10=8, cdw12=0)
    assert drv.read(1, 8, 1) == bytes(512)
    buf = drv.machine.alloc(4096, 4096)
    drv.mem.write(buf, struct.pack("<IIQ", 0, 2, 10))
    drv.io(1, DSM, nsid=1, cdw10=0, cdw11=1 << 2, buf=buf, length=16)
    assert ctrl.uncorrectable.ranges(1) == []
    assert drv.read(1, 8, 4) == bytes(512) + pattern(900, 1) + bytes(1024)


def test_compare_verify_and_copy_sources_fail_on_marks(env):
    drv, ctrl = env.drv, env.ctrl
    drv.write(1, 0, pattern(0, 16))
    drv.write_uncorrectable(1, 4, 1)
    buf = drv.machine.alloc(8192, 4096)
    drv.mem.write(buf, pattern(0, 8))
    expect_status(drv, Status.UNRECOVERED_READ_ERROR, COMPARE, qid=1, nsid=1, cdw10=0, cdw12=7, buf=buf, length=4096)
    expect_status(drv, Status.UNRECOVERED_READ_ERROR, VERIFY, qid=1, nsid=1, cdw10=2, cdw12=3)
    drv.io(1, VERIFY, nsid=1, cdw10=5, cdw12=3)  # past the mark
    # Copy: a marked source fails; a copy onto the marked block clears it
    drv.mem.write(buf, bytes(8) + struct.pack("<QH", 3, 1) + bytes(14))
    expect_status(drv, Status.UNRECOVERED_READ_ERROR, COPY, qid=1, nsid=1, cdw10=100, cdw12=0, buf=buf, length=32)
    drv.mem.write(buf, bytes(8) + struct.pack("<QH", 10, 0) + bytes(14))
    drv.io(1, COPY, nsid=1, cdw10=4, cdw12=0, buf=buf, length=32)
    assert ctrl.uncorrectable.ranges(1) == []
    assert drv.read(1, 4, 1) == pattern(10, 1)


def test_write_uncorrectable_statuses(env):
    drv = env.drv
    nlbas = drv.namespaces[1].nsze
    expect_status(drv, Status.LBA_RANGE, WU, qid=1, nsid=1, cdw10=nlbas - 1, cdw12=1)
    expect_status(drv, Status.INVALID_NSID, WU, qid=1, nsid=7, cdw10=0, cdw12=0)
    drv.write_uncorrectable(1, nlbas - 2, 2)
    assert env.ctrl.uncorrectable.ranges(1) == [(nlbas - 2, 2)]


def test_format_clears_marks(env):
    drv = env.drv
    drv.write_uncorrectable(1, 0, 8)
    drv.admin(0x80, nsid=1, cdw10=0)
    assert env.ctrl.uncorrectable.ranges(1) == []
    assert drv.read(1, 0, 8) == bytes(4096)


def test_marks_persist_beside_the_image(tmp_path):
    from pcidev.host import Machine

    img = tmp_path / "disk.img"
    cfg = f"serial=wu1,ns=file:path={img},size=4M"
    machine = Machine(ram_size=64 << 20)
    ctrl = NvmeController(cfg)
    drv = NvmeDriver.attach(machine, ctrl, aers=0)
    drv.write(1, 0, pattern(0, 8))
    drv.write_uncorrectable(1, 2, 3)
    side = str(img) + SIDECAR_SUFFIX
    assert json.loads(open(side).read())["ranges"] == [[2, 3]]
    drv.close()
    ctrl.close()
    machine.close()
    # a new process (controller) over the same image: the marks are back
    machine = Machine(ram_size=64 << 20)
    ctrl = NvmeController(cfg)
    drv = NvmeDriver.attach(machine, ctrl, aers=0)
    try:
        assert ctrl.uncorrectable.ranges(1) == [(2, 3)]
        assert read_status(drv, 3, 1) == Status.UNRECOVERED_READ_ERROR
        drv.write(1, 2, pattern(50, 3))
        assert ctrl.uncorrectable.flush()  # (a write that clears marks does not wait for the sidecar)
        assert not os.path.exists(side)  # no mark left: the sidecar is gone
        assert drv.read(1, 0, 8) == pattern(0, 2) + pattern(50, 3) + pattern(5, 3)
    finally:
        drv.close()
        ctrl.close()
        machine.close()


def test_a_foreign_sidecar_is_never_overwritten(tmp_path, caplog):
    img = tmp_path / "disk.img"
    side = str(img) + SIDECAR_SUFFIX
    with open(side, "w") as f:
        f.write("my notes\n")
    from pcidev.host import Machine

    machine = Machine(ram_size=64 << 20)
    ctrl = NvmeController(f"serial=wu2,ns=file:path={img},size=4M")
    drv = NvmeDriver.attach(machine, ctrl, aers=0)
    try:
        drv.write_uncorrectable(1, 0, 1)
        assert read_status(drv, 0, 1) == Status.UNRECOVERED_READ_ERROR
        assert open(side).read() == "my notes\n"
        assert "not usable as a Write Uncorrectable sidecar" in caplog.text
    finally:
        drv.close()
        ctrl.close()
        machine.close()


def test_range_bookkeeping():
    wu = Uncorrectable()
    assert wu.first_marked(1, 0, 100) is None
    wu.mark(1, 10, 5)
    wu.mark(1, 20, 5)
    wu.mark(1, 15, 5)  # joins both
    assert wu.ranges(1) == [(10, 15)]
    wu.clear(1, 12, 2)
    assert wu.ranges(1) == [(10, 2), (14, 11)]
    assert wu.first_marked(1, 12, 2) is None and wu.first_marked(1, 0, 11) == 10
    assert wu.first_marked(1, 13, 100) == 14
    state = wu.snapshot()
    other = Uncorrectable()
    other.restore(state)
    assert other.ranges(1) == wu.ranges(1)
    wu.clear(1, 0, 1000)
    assert wu.ranges(1) == [] and not wu.active and wu.snapshot() is None


def test_marks_migrate_with_verified_data():
    host = Host("serial=wum,ns=mem:size=4M", io_queues=1, aers=0)
    try:
        drv = host.drv
        data = pattern(0, 64)
        drv.write(1, 0, data)
        drv.write_uncorrectable(1, 16, 8)
        crcs = [crc32c.crc32c(data[i * 512:(i + 1) * 512]) for i in range(64)]
        dst = host.migrate()
        assert dst.uncorrectable.ranges(1) == [(16, 8)]
        assert read_status(drv, 20, 1) == Status.UNRECOVERED_READ_ERROR
        got = drv.read(1, 0, 16) + drv.read(1, 24, 40)
        assert [crc32c.crc32c(got[i * 512:(i + 1) * 512]) for i in range(56)] == crcs[:16] + crcs[24:]
        drv.write(1, 16, data[16 * 512:24 * 512])
        assert drv.read(1, 0, 64) == data
    finally:
        host.close()


def test_a_stream_with_impossible_marks_is_refused(nvme_env):
    env = nvme_env("ns=mem:size=4M")
    ctrl = env.ctrl
    env.drv.write_uncorrectable(1, 3, 2)
    ctrl.quiesce()
    try:
        st = save(ctrl)
        assert st.uncorrectable == UncorrectableState((WuRange(1, 3, 2),))
        check(ctrl, st)
        for bad in (WuRange(1, NLB - 1, 2), WuRange(2, 0, 1), WuRange(1, 0, 0)):
            with pytest.raises(StateError):
                check(ctrl, attrs.evolve(st, uncorrectable=UncorrectableState((bad,))))
        assert ctrl.uncorrectable.ranges(1) == [(3, 2)]  # nothing changed
        check(ctrl, attrs.evolve(st, uncorrectable=None))  # a stream from before marks existed
    finally:
        ctrl.resume()


def test_marks_hold_on_a_protection_information_namespace(nvme_env):
    """A PI type 1 namespace (its commands take the protected path): a marked block fails a
    read, a compare and a verify, and a PRACT write clears the mark."""
    drv = nvme_env("ns=mem:size=4M,lbaf=2,pi=1", io_queues=1).drv
    data = pattern(0, 8)
    comp, _, _ = drv.io_md(WRITE, 1, 0, 8, data=data, prinfo=8)  # PRACT: the controller adds the PI
    assert comp.ok
    assert drv.write_uncorrectable(1, 2, 3).ok
    for opcode in (READ, VERIFY):
        comp, _, _ = drv.io_md(opcode, 1, 0, 8, data_len=len(data), prinfo=8 | 7)
        assert comp.code == Status.UNRECOVERED_READ_ERROR, hex(comp.code)
    comp, _, _ = drv.io_md(COMPARE, 1, 0, 8, data=data, prinfo=8 | 7)
    assert comp.code == Status.UNRECOVERED_READ_ERROR
    comp, _, _ = drv.io_md(WRITE, 1, 2, 3, data=pattern(2, 3), prinfo=8, ref=2)  # type 1: ref tag = LBA
    assert comp.ok
    comp, got, _ = drv.io_md(READ, 1, 0, 8, data_len=len(data), prinfo=8 | 7)
    assert comp.ok and got == data


def test_a_failed_write_keeps_the_marks(nvme_env):
    """A write whose data cannot be fetched (its PRP points outside guest memory) fails
    and leaves the blocks marked: they still read as Unrecovered Read Error, never as the
    stale data underneath (the fast path clears the marks after the write, not before)."""
    env = nvme_env("ns=mem:size=4M")
    drv = env.drv
    drv.write(1, 0, pattern(0, 8))
    drv.write_uncorrectable(1, 0, 8)
    bad = drv.machine.ram_size + (1 << 30)  # no guest memory there
    comp = drv.io(1, WRITE, nsid=1, cdw10=2, cdw12=1, prp1=bad, check=False)
    assert comp.code == Status.DATA_TRANSFER_ERROR
    assert read_status(drv, 2, 2) == Status.UNRECOVERED_READ_ERROR
    assert env.ctrl.uncorrectable.ranges(1) == [(0, 8)]


def test_splits_never_grow_past_the_migration_bound(nvme_env):
    """Rewriting every other block of a marked range splits it once per write: the marks
    are bounded by their potential, so the ranges never exceed what a stream carries."""
    wu = Uncorrectable()
    assert not wu.mark(1, 0, 2 * MAX_RANGES + 1)  # could split into MAX_RANGES + 1 ranges
    assert wu.ranges(1) == [] and not wu.active
    assert wu.mark(1, 0, 2 * MAX_RANGES)
    for lba in range(1, 2 * MAX_RANGES, 2):
        wu.clear(1, lba, 1)
    assert wu.count() == MAX_RANGES
    assert not wu.mark(2, 0, 1)  # full: nothing more is marked
    state = wu.snapshot()
    assert state is not None and len(state.ranges) == MAX_RANGES
    other = Uncorrectable()
    other.restore(state)
    assert other.count() == MAX_RANGES and other.first_marked(1, 1, 1) is None and other.first_marked(1, 2, 1) == 2
    wu.clear(1, 0, 2 * MAX_RANGES)
    assert wu.mark(2, 0, 2)  # room again
    # through the command: Capacity Exceeded, nothing marked
    env = nvme_env("ns=mem:size=100M")
    assert env.drv.write_uncorrectable(1, 0, 65536).ok
    for slba in (65536, 131072):
        comp = env.drv.io(1, WU, nsid=1, cdw10=slba, cdw12=0xFFFF, check=False)
        assert (comp.code, slba) == (0 if slba == 65536 else Status.CAP_EXCEEDED, slba)
    assert env.ctrl.uncorrectable.ranges(1) == [(0, 131072)]
    comp = expect_status(env.drv, Status.CAP_EXCEEDED, WU, qid=1, nsid=1, cdw10=140_000, cdw12=0)
    assert env.ctrl.uncorrectable.ranges(1) == [(0, 131072)]


def test_sidecar_loads_and_restores_in_bulk(tmp_path, monkeypatch):
    """Loading or restoring thousands of ranges writes the sidecar at most once (not once
    per range, each with an fsync), and never on the restoring thread."""
    side = str(tmp_path / "img") + SIDECAR_SUFFIX
    ranges = [[i * 4, 2] for i in range(5000)]
    with open(side, "w") as f:
        json.dump({"format": "pcidev-nvme-write-uncorrectable", "version": 1, "nsid": 1, "ranges": ranges}, f)
    writes: list[str] = []
    original = Uncorrectable._write_sidecar

    def counting(self, nsid):
        writes.append(threading.current_thread().name)
        original(self, nsid)

    monkeypatch.setattr(Uncorrectable, "_write_sidecar", counting)
    wu = Uncorrectable(lambda nsid: side)
    t0 = time.monotonic()
    wu.load(1)
    assert time.monotonic() - t0 < 2
    assert wu.ranges(1) == [tuple(r) for r in ranges] and writes == []
    state = wu.snapshot()
    other = Uncorrectable(lambda nsid: side)
    t0 = time.monotonic()
    other.restore(state)
    assert time.monotonic() - t0 < 2
    assert other.flush()
    assert 1 <= len(writes) <= 1 and writes[0] != threading.current_thread().name
    assert json.load(open(side))["ranges"] == ranges


def test_concurrent_changes_leave_a_sidecar_that_agrees(tmp_path, caplog):
    """Four threads marking and clearing at once: no write collides (unique temporary
    files, one writer), and the sidecar ends equal to the marks in memory."""
    side = str(tmp_path / "img") + SIDECAR_SUFFIX
    wu = Uncorrectable(lambda nsid: side)

    def churn(k: int) -> None:
        for i in range(300):
            lba = k * 10_000 + i * 3
            wu.mark(1, lba, 2)
            if i % 3 == 0:
                wu.clear(1, lba + 1, 1)

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wu.flush()
    assert [tuple(r) for r in json.load(open(side))["ranges"]] == wu.ranges(1)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
    fresh = Uncorrectable(lambda nsid: side)
    fresh.load(1)
    assert fresh.ranges(1) == wu.ranges(1)
