"""Atomic write parameters (pcidev_nvme.atomicity): the configuration, what Identify
reports, Write Atomicity Normal (feature 0Ah), the range locks that keep the guarantee,
a storm of overlapping commands on a ``file`` namespace in which every read must see each
atomic unit whole, and the limits in effect after an in-process migration (verified data).
"""

from __future__ import annotations

import random
import struct
import threading
import time

import crc32c
import pytest
from _helpers import GatedBackend, make_env, wait_until

from pcidev.errors import ConfigError
from pcidev.migration import load_device_stream, save_device_stream
from pcidev.vmstate.errors import ConfigMismatchError
from pcidev_nvme.atomicity import (
    AtomicLimits,
    BlockLocks,
    NamespaceAtomicity,
    RangeLockTable,
    effective_limits,
    namespace_problem,
)
from pcidev_nvme.backends.mem import MemoryBackend
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.namespace import Namespace
from pcidev_nvme.testing.driver import READ, WRITE, NvmeDriver

FID_WRITE_ATOMICITY = 0x0A
WRITE_ZEROES = 0x08
COMPARE = 0x05


def _u16(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", b, off)[0])


def _ns_fields(idns: bytes) -> tuple[int, ...]:
    """NAWUN NAWUPF NACWU NABSN NABO NABSPF."""
    return struct.unpack_from("<6H", idns, 34)


# ----------------------------------------------------------------------------- Identify
@pytest.mark.parametrize("config, awun, awupf, nsabp, fields", [
    ("ns=mem:size=16M", 0, 0, False, (0, 0, 0, 0, 0, 0)),
    ("atomic.awun=7,atomic.awupf=3,ns=mem:size=16M", 7, 3, False, (0, 0, 0, 0, 0, 0)),
    ("atomic.awun=7,atomic.awupf=3,ns=mem:size=16M,atomic.nawun=15,atomic.nawupf=7",
     7, 3, True, (15, 7, 0, 0, 0, 0)),
    ("ns=mem:size=16M,atomic.nawun=31,atomic.nawupf=15,atomic.nabsn=63,atomic.nabspf=31,atomic.nabo=8",
     0, 0, True, (31, 15, 0, 63, 8, 31)),
    # boundaries without units of its own: NSABP stays clear, the boundaries are reported
    ("atomic.awun=7,ns=mem:size=16M,atomic.nabsn=15,atomic.nabo=4", 7, 0, False, (0, 0, 0, 15, 4, 0)),
    ("awun=3,ns=mem:size=16M,nawun=7", 3, 0, True, (7, 0, 0, 0, 0, 0)),  # the short spellings
])
def test_identify_reports_the_configuration(config, awun, awupf, nsabp, fields):
    env = make_env(config, io_queues=1)
    try:
        idc = env.drv.identify(0x01)
        assert (_u16(idc, 526), _u16(idc, 528), _u16(idc, 532)) == (awun, awupf, 0)  # AWUN AWUPF ACWU
        idns = env.drv.identify(0x00, nsid=1)
        assert bool(idns[24] & 0x02) == nsabp  # NSFEAT.NSABP
        assert idns[24] & 0x10  # NSFEAT.OPTPERF stays
        assert _ns_fields(idns) == fields
        assert env.drv.identify(0x08, nsid=1)[0] == idns[24]  # CNS 08h repeats NSFEAT
    finally:
        env.close()


@pytest.mark.parametrize("config, message", [
    ("atomic.awun=3,atomic.awupf=7,ns=mem:size=1M", "atomic.awupf=7 exceeds atomic.awun=3"),
    ("atomic.awun=70000,ns=mem:size=1M", "out of range"),
    ("ns=mem:size=1M,atomic.nawun=3,atomic.nawupf=7", "atomic.nawupf=7 exceeds atomic.nawun=3"),
    ("ns=mem:size=1M,atomic.nawun=7,atomic.nabsn=11", "not a power of two"),
    ("ns=mem:size=1M,atomic.nawun=15,atomic.nabsn=7", "atomic.nabsn=7 is smaller than atomic.nawun=15"),
    ("ns=mem:size=1M,atomic.nawupf=3,atomic.nabspf=5", "not a power of two"),
    ("ns=mem:size=1M,atomic.nabo=4", "atomic.nabo=4 needs a boundary"),
    ("ns=mem:size=1M,atomic.nawun=7,atomic.nabsn=7,atomic.nabo=9", "atomic.nabo=9 exceeds atomic.nabsn=7"),
    ("ns=mem:size=1M,atomic.nawun=99999", "atomic.nawun=99999 must be 0 .. 65535"),
    ("atomic.awun=7,ns=mem:size=1M,atomic.nawun=3", "smaller than the controller's atomic.awun=7"),
    ("atomic.awun=7,atomic.awupf=7,ns=mem:size=1M,atomic.nawupf=3", "smaller than the controller's"),
    ("atomic.awun=3,ns=mem:size=1M,atomic.nawupf=7", "power-fail unit"),
    ("atomic.awun=15,ns=mem:size=1M,atomic.nabsn=7", "smaller than the atomic write unit in effect"),
    # MDTS 2 = 16 KiB: a unit of 64 blocks of 512 bytes (32 KiB) cannot be one command
    ("mdts=2,ns=mem:size=1M,atomic.nawun=63", "exceeds MDTS (16384 bytes)"),
    ("mdts=2,atomic.awun=7,ns=mem:size=1M,lbaf=1", "exceeds MDTS"),
])
def test_bad_configurations_are_refused_with_one_line(config, message):
    with pytest.raises(ConfigError) as info:
        NvmeController(config).close()
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_a_namespace_within_mdts_is_accepted():
    ctrl = NvmeController("mdts=2,atomic.awun=31,ns=mem:size=1M")  # 32 blocks of 512: 16 KiB
    ctrl.close()


# ----------------------------------------------------------------------------- the limits
def test_effective_limits_follow_dn():
    own = NamespaceAtomicity(nawun=15, nawupf=7, nabsn=31, nabspf=15, nabo=2)
    assert effective_limits(7, 3, own, False) == AtomicLimits(16, 32, 2)
    assert effective_limits(7, 3, own, True) == AtomicLimits(8, 16, 2)
    # a namespace without its own values: the controller's, no boundaries
    none = NamespaceAtomicity()
    assert effective_limits(7, 3, none, False) == AtomicLimits(8)
    assert effective_limits(7, 3, none, True) == AtomicLimits(4)
    assert effective_limits(0, 0, none, False) == AtomicLimits(1)
    # a namespace with a Normal unit only: DN falls back to the controller's AWUPF
    assert effective_limits(7, 0, NamespaceAtomicity(nawun=15), True) == AtomicLimits(1)


def test_atomic_writes_are_those_within_the_unit_and_a_boundary():
    lim = AtomicLimits(unit=8, boundary=16, offset=4)
    assert lim.atomic(4, 8) and lim.atomic(12, 8) and lim.atomic(20, 1)
    assert not lim.atomic(4, 9)  # more than the unit
    assert not lim.atomic(16, 8)  # crosses the boundary at LBA 20
    assert not lim.atomic(0, 8)  # starts before NABO
    assert lim.atomic(0, 1)  # a single block is always atomic
    assert AtomicLimits(unit=8).atomic(5, 8)  # no boundaries: anywhere
    assert namespace_problem(0, 0, NamespaceAtomicity(nawun=7), 512, None) is None


def test_dn_set_and_get_recompute_the_limits():
    env = make_env("atomic.awun=7,atomic.awupf=3,ns=mem:size=16M,atomic.nawun=15,atomic.nawupf=7,"
                   "atomic.nabsn=15,atomic.nabspf=7", io_queues=1)
    try:
        drv, ctrl = env.drv, env.ctrl
        ns = ctrl.namespaces[1]
        assert drv.get_features(FID_WRITE_ATOMICITY).dw0 == 0
        assert ctrl.atomicity.limits(ns) == AtomicLimits(16, 16)
        drv.set_features(FID_WRITE_ATOMICITY, 1)
        assert drv.get_features(FID_WRITE_ATOMICITY).dw0 == 1
        assert drv.get_features(FID_WRITE_ATOMICITY, sel=1).dw0 == 0  # the default
        assert ctrl.atomicity.limits(ns) == AtomicLimits(8, 8)  # only NAWUPF / NABSPF apply
        assert ctrl.atomicity.serialises(ns)
        drv.set_features(FID_WRITE_ATOMICITY, 0xFFFFFFFE)  # reserved bits: DN is bit 0
        assert drv.get_features(FID_WRITE_ATOMICITY).dw0 == 0
        assert ctrl.atomicity.limits(ns) == AtomicLimits(16, 16)
        drv.set_features(FID_WRITE_ATOMICITY, 1)
        drv.restart()  # a controller reset: back to the default
        assert drv.get_features(FID_WRITE_ATOMICITY).dw0 == 0 and not ctrl.atomicity.dn
        data = bytes(range(256)) * 2 * 16
        drv.write(1, 32, data)  # a unit, through the serialised path
        assert drv.read(1, 32, 16) == data
    finally:
        env.close()


def test_dn_default_and_dn_changing_the_limits_not_the_locking():
    """DN changes the limits reported, never whether commands on the namespace lock (review
    E3/E4: the namespaces and the lock table are shared by every controller of an SR-IOV
    subsystem, each with a DN of its own, and a DN changing under running commands must not
    mix locked and unlocked ones)."""
    env = make_env("atomic.awun=7,atomic.dn=on,ns=mem:size=16M", io_queues=1)
    try:
        drv, ctrl = env.drv, env.ctrl
        ns = ctrl.namespaces[1]
        assert drv.get_features(FID_WRITE_ATOMICITY).dw0 == 1
        assert drv.get_features(FID_WRITE_ATOMICITY, sel=1).dw0 == 1  # atomic.dn is the default
        # DN set and AWUPF 0: single blocks are what the host may count on; AWUN is configured,
        # so commands lock all the same
        assert ctrl.atomicity.limits(ns) == AtomicLimits(1) and ctrl.atomicity.serialises(ns)
        drv.set_features(FID_WRITE_ATOMICITY, 0)
        assert ctrl.atomicity.limits(ns) == AtomicLimits(8) and ctrl.atomicity.serialises(ns)
    finally:
        env.close()


def test_a_secondary_setting_dn_does_not_bypass_the_primary_atomic_writes():
    """Review E3: a VF whose host sets DN locked nothing on the namespace it shares with the
    PF, so its writes ran through the blocks a PF atomic write held."""
    env = make_env("atomic.awun=7,ns=mem:size=16M,max_ioqpairs=8,msix_vectors=9,sriov_max_vfs=2,"
                   "sriov_vq_flexible=6,sriov_vi_flexible=4", io_queues=1)
    try:
        vf = env.pdev.enable_sriov(1)[0].device
        ns = env.ctrl.namespaces[1]
        vf.atomicity.set_dn(True)
        assert vf.atomicity.serialises(ns) and env.ctrl.atomicity.serialises(ns)
        claim = env.ctrl.atomicity.locks.acquire(1, ((0, 8),), write=True)  # a PF atomic write at work
        got: list[bool] = []
        t = threading.Thread(target=lambda: got.append(bool(vf.atomicity.locks.acquire(1, ((4, 5),), write=True))))
        t.start()
        t.join(0.3)
        assert t.is_alive() and not got  # the VF's write waits for the PF's
        env.ctrl.atomicity.locks.release(claim)
        t.join(5)
        assert got == [True]
    finally:
        env.close()


def test_the_default_configuration_never_serialises():
    env = make_env("ns=mem:size=16M", io_queues=1)
    try:
        ns = env.ctrl.namespaces[1]
        assert ns.atomic == NamespaceAtomicity() and not env.ctrl.atomicity.serialises(ns)
        assert env.ctrl.atomicity.limits(ns) == AtomicLimits(1)
    finally:
        env.close()


# ----------------------------------------------------------------------------- the locks
def test_range_lock_table_shares_reads_and_excludes_overlapping_writes():
    table = RangeLockTable()
    r1 = table.acquire(1, ((0, 8),), write=False)
    r2 = table.acquire(1, ((4, 12),), write=False)  # readers share
    beside = table.acquire(1, ((12, 16),), write=True)  # a writer next to them: no overlap
    other_ns = table.acquire(2, ((0, 16),), write=True)  # another namespace: independent
    table.release(beside)
    table.release(other_ns)
    got: list[str] = []

    def writer():
        c = table.acquire(1, ((6, 7),), write=True)
        got.append("w")
        table.release(c)

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.05)
    assert got == []  # waits for both readers
    table.release(r1)
    time.sleep(0.05)
    assert got == []  # r2 still overlaps
    table.release(r2)
    t.join(5)
    assert got == ["w"] and table.held == 0


def test_range_lock_table_first_come_first_served():
    table = RangeLockTable()
    reader = table.acquire(1, ((0, 8),), write=False)
    order: list[str] = []

    def take(name: str, write: bool) -> None:
        c = table.acquire(1, ((0, 8),), write=write)
        order.append(name)
        table.release(c)

    w = threading.Thread(target=take, args=("writer", True))
    w.start()
    time.sleep(0.05)
    late = threading.Thread(target=take, args=("late reader", False))  # behind the waiting writer
    late.start()
    time.sleep(0.05)
    assert order == []
    table.release(reader)
    w.join(5)
    late.join(5)
    assert order == ["writer", "late reader"]


def test_overlapping_writes_of_the_write_conflict():
    table = RangeLockTable()
    a = table.acquire(1, ((0, 8),), write=True)
    done = threading.Event()

    def second():
        c = table.acquire(1, ((7, 9),), write=True)
        done.set()
        table.release(c)

    t = threading.Thread(target=second)
    t.start()
    assert not done.wait(0.05)
    adjacent = table.acquire(1, ((9, 16),), write=True)  # next to both claims: it goes by
    table.release(adjacent)
    table.release(a)
    t.join(5)
    assert done.is_set()


def test_a_read_waits_for_an_overlapping_atomic_write_in_flight(nvme_env):
    """Deterministic: a write held inside the backend keeps an overlapping Read and Compare
    out of the backend; a Read elsewhere goes on; the Read then sees the whole write."""
    env = nvme_env("ns=mem:size=4M", io_queues=2)
    drv, ctrl = env.drv, env.ctrl
    backend = GatedBackend(1 << 20)
    ns = Namespace(2, backend)
    ns.atomic = NamespaceAtomicity(nawun=7)
    ctrl.add_namespace(2, ns, attached=True)
    drv.scan_namespaces()
    data = b"".join(bytes([0x40 + i]) * 512 for i in range(8))
    wbuf = drv.machine.alloc(4096, 4096)
    rbuf = drv.machine.alloc(4096, 4096)
    cbuf = drv.machine.alloc(4096, 4096)
    obuf = drv.machine.alloc(4096, 4096)
    drv.mem.write(wbuf, data)
    drv.mem.write(cbuf, data)
    backend.hold()
    wcid = drv.submit(1, WRITE, nsid=2, cdw10=16, cdw12=7, buf=wbuf, length=4096)
    wait_until(lambda: backend.waiting == 1, what="the write to reach the backend")
    rcid = drv.submit(2, READ, nsid=2, cdw10=20, cdw12=7, buf=rbuf, length=4096)  # overlaps 20..23
    ccid = drv.submit(2, COMPARE, nsid=2, cdw10=16, cdw12=7, buf=cbuf, length=4096)
    ocid = drv.submit(2, READ, nsid=2, cdw10=100, cdw12=7, buf=obuf, length=4096)  # elsewhere
    wait_until(lambda: backend.waiting == 2, what="the other read to reach the backend")
    time.sleep(0.05)
    assert backend.waiting == 2  # the overlapping Read and Compare wait for the range lock
    backend.release()
    assert drv.wait_for(1, wcid).ok
    done = {c: drv.wait_for(2, c) for c in (rcid, ccid, ocid)}
    assert all(c.ok for c in done.values())  # the Compare saw the whole write: equal
    assert drv.mem.read(rbuf, 4096) == data[4 * 512:] + bytes(4 * 512)
    assert ctrl.atomicity.locks.held == 0


class _GatedDeallocate(GatedBackend):
    """A gated backend whose deallocations wait at the gate too."""

    def deallocate(self, offset, length):
        self._wait()
        super().deallocate(offset, length)


def test_dataset_management_claims_only_the_ranges_it_deallocates(nvme_env):
    """With a write held in the backend at blocks 16..23 of a serialised namespace: a DSM
    without AD (attributes only) completes at once, a deallocate elsewhere reaches the
    backend, a deallocate of blocks of the write waits for it (and then wins)."""
    env = nvme_env("ns=mem:size=4M", io_queues=2)
    drv, ctrl = env.drv, env.ctrl
    backend = _GatedDeallocate(1 << 20)
    ns = Namespace(2, backend)
    ns.atomic = NamespaceAtomicity(nawun=7)
    ctrl.add_namespace(2, ns, attached=True)
    drv.scan_namespaces()
    data = b"".join(bytes([0x40 + i]) * 512 for i in range(8))
    bufs = [drv.machine.alloc(4096, 4096) for _ in range(4)]
    drv.mem.write(bufs[0], data)
    drv.mem.write(bufs[1], struct.pack("<IIQ", 1, 8, 16))  # 16..23, context attributes only
    drv.mem.write(bufs[2], struct.pack("<IIQ", 0, 8, 100))  # 100..107
    drv.mem.write(bufs[3], struct.pack("<IIQ", 0, 2, 20) + struct.pack("<IIQ", 0, 0, 16))  # 20..21 (+ an empty one)
    try:
        backend.hold()
        wcid = drv.submit(1, WRITE, nsid=2, cdw10=16, cdw12=7, buf=bufs[0], length=4096)
        wait_until(lambda: backend.waiting == 1, what="the write to reach the backend")
        attrs_only = drv.submit(2, 0x09, nsid=2, cdw10=0, cdw11=1 << 0, buf=bufs[1], length=16)
        assert drv.wait_for(2, attrs_only, 5).ok  # no claim: it did not wait for the write
        elsewhere = drv.submit(2, 0x09, nsid=2, cdw10=0, cdw11=1 << 2, buf=bufs[2], length=16)
        wait_until(lambda: backend.waiting == 2, what="the deallocate elsewhere to reach the backend")
        overlapping = drv.submit(2, 0x09, nsid=2, cdw10=1, cdw11=1 << 2, buf=bufs[3], length=32)
        time.sleep(0.1)
        assert backend.waiting == 2  # waits for the write's claim
        backend.release()
        assert all(drv.wait_for(q, c).ok for q, c in ((1, wcid), (2, elsewhere), (2, overlapping)))
    finally:
        backend.release()
        for buf in bufs:
            drv.machine.free(buf)
    assert bytes(backend.data[16 * 512:24 * 512]) == data[:4 * 512] + bytes(2 * 512) + data[6 * 512:]
    assert ctrl.atomicity.locks.held == 0


# ----------------------------------------------------------------------------- the storm
UNIT = 256  # blocks of 512 bytes per atomic unit (atomic.nawun=255): 128 KiB, 32 pages
UNITS = 2  # the contended region: every command overlaps others
_HEAD = struct.Struct("<QII")  # command tag, block index in its write, unit


def _unit_data(tag: int, unit: int) -> bytes:
    """A whole unit written by command ``tag``: every block carries the tag, its index and
    its crc32c in the last four bytes."""
    fill = bytes([tag & 0xFF]) * (512 - _HEAD.size - 4)
    out = []
    for i in range(UNIT):
        body = _HEAD.pack(tag, i, unit) + fill
        out.append(body + struct.pack("<I", crc32c.crc32c(body)))
    return b"".join(out)


def _unit_problem(data: bytes, unit: int) -> str | None:
    """Why the :data:`UNIT` blocks of ``data`` are not one whole write (None: they are; all zeros is
    the unit before any write, or after a Write Zeroes)."""
    tags = set()
    for i in range(UNIT):
        block = data[i * 512:(i + 1) * 512]
        if block == bytes(512):
            tags.add(0)
            continue
        body, (crc,) = block[:-4], struct.unpack_from("<I", block, 508)
        if crc32c.crc32c(body) != crc:
            return f"unit {unit} block {i}: torn block (crc mismatch)"
        tag, index, where = _HEAD.unpack_from(block)
        if index != i or where != unit:
            return f"unit {unit} block {i}: block {index} of unit {where} found here"
        tags.add(tag)
    if len(tags) != 1:
        return f"unit {unit}: blocks of {len(tags)} commands {sorted(tags)[:4]}"
    return None


def _storm(drv: NvmeDriver, queues: int, batches: int, depth: int = 8, seed: int = 1) -> tuple[list[str], int]:
    """``queues`` threads, one per I/O queue, each submitting ``batches`` batches of
    ``depth`` overlapping commands (whole-unit Writes with distinct tags, a few Write
    Zeroes, Reads of one or two units) and checking every Read. Returns the problems seen
    and the commands run."""
    problems: list[str] = []
    count = [0]
    lock = threading.Lock()
    bufs = {q: [drv.machine.alloc(2 * UNIT * 512, 4096) for _ in range(depth)] for q in range(1, queues + 1)}

    def run(qid: int) -> None:
        rnd = random.Random(seed * 1000 + qid)
        tag = qid << 40
        try:
            for _ in range(batches):
                reads = {}
                for k in range(depth):
                    buf = bufs[qid][k]
                    choice = rnd.random()
                    if choice < 0.45:
                        unit = rnd.randrange(UNITS)
                        tag += 1
                        drv.mem.write(buf, _unit_data(tag, unit))
                        drv.submit(qid, WRITE, nsid=1, cdw10=unit * UNIT, cdw12=UNIT - 1, buf=buf,
                                   length=UNIT * 512, ring=False)
                    elif choice < 0.5:
                        unit = rnd.randrange(UNITS)
                        drv.submit(qid, WRITE_ZEROES, nsid=1, cdw10=unit * UNIT, cdw12=UNIT - 1, ring=False)
                    else:
                        n = rnd.choice((1, 2))
                        unit = rnd.randrange(UNITS - n + 1)
                        cid = drv.submit(qid, READ, nsid=1, cdw10=unit * UNIT, cdw12=n * UNIT - 1, buf=buf,
                                         length=n * UNIT * 512, ring=False)
                        reads[cid] = (buf, unit, n)
                drv.ring(qid)
                for comp in drv.reap(qid, min_completions=depth, timeout=30):
                    if not comp.ok:
                        problems.append(f"queue {qid}: command {comp.cid} failed {comp.code:#x}")
                        continue
                    if comp.cid in reads:
                        buf, unit, n = reads[comp.cid]
                        data = drv.mem.read(buf, n * UNIT * 512)
                        for j in range(n):
                            p = _unit_problem(data[j * UNIT * 512:(j + 1) * UNIT * 512], unit + j)
                            if p is not None:
                                problems.append(p)
                with lock:
                    count[0] += depth
        except Exception as exc:  # a driver failure is a problem too
            problems.append(f"queue {qid}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(q,)) for q in range(1, queues + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    final = drv.read(1, 0, UNITS * UNIT)
    for u in range(UNITS):
        p = _unit_problem(final[u * UNIT * 512:(u + 1) * UNIT * 512], u)
        if p is not None:
            problems.append("after the storm: " + p)
    return problems, count[0]


def test_the_storm_checker_sees_a_torn_unit():
    a, b = _unit_data(5, 1), _unit_data(6, 1)
    assert _unit_problem(a, 1) is None and _unit_problem(bytes(UNIT * 512), 0) is None
    mixed = a[:100 * 512] + b[100 * 512:]
    assert "blocks of 2 commands" in (_unit_problem(mixed, 1) or "")
    torn = a[:10 * 512 + 200] + b[10 * 512 + 200:]
    assert "torn block" in (_unit_problem(torn, 1) or "")
    assert "found here" in (_unit_problem(a, 0) or "")


def test_overlapping_commands_on_a_file_namespace_never_see_a_unit_torn(tmp_path):
    env = make_env(f"ns=file:path={tmp_path}/a.img,size=4M,atomic.nawun={UNIT - 1},atomic.nawupf={UNIT - 1},"
                   f"atomic.nabsn={UNIT - 1}", io_queues=4)
    try:
        ns = env.ctrl.namespaces[1]
        assert env.ctrl.atomicity.limits(ns) == AtomicLimits(UNIT, UNIT)
        # (with the serialisation switched off, Atomicity.serialises returning False, this
        # storm saw torn units in 6 runs of 6: blocks of two writes in one unit, and torn
        # blocks where a read raced a write in the page cache)
        problems, commands = _storm(env.drv, queues=4, batches=120)
        assert commands == 4 * 120 * 8
        assert problems == [], f"{len(problems)} problems, first: {problems[:5]}"
        assert env.ctrl.atomicity.locks.held == 0
    finally:
        env.close()


# ----------------------------------------------------------------------------- block locks
def test_block_locks_map_regions_to_stripes_in_order():
    blocks = BlockLocks(stripes=8, region_shift=16)
    one = blocks.indexes(((1, 0, 4096),))
    assert len(one) == 1 and blocks.span(1, 0, 4096) == one == blocks.span(1, 60 * 1024, 4096)
    two = blocks.indexes(((1, 60 * 1024, 8192),))  # across a 64 KiB boundary: two regions
    assert len(two) == 2 and two == sorted(two) and blocks.span(1, 60 * 1024, 8192) == two
    assert blocks.indexes(((1, 0, 8 << 16),)) == list(range(8))  # as many regions as stripes: all
    assert blocks.indexes(((1, 0, 0),)) == []
    both = blocks.indexes(((1, 0, 4096), (2, 0, 4096), (1, 4096, 4096)))
    assert both == sorted(set(both)) and set(one) <= set(both)
    with pytest.raises(ValueError):
        BlockLocks(stripes=6)
    rnd = random.Random(3)
    for _ in range(500):  # span() is indexes() for one span, wrapping around the stripes too
        nsid, offset, length = rnd.randrange(1, 5), rnd.randrange(1 << 22), rnd.randrange(1 << 20)
        assert blocks.span(nsid, offset, length) == blocks.indexes(((nsid, offset, length),))


def test_block_locks_writers_exclude_and_readers_see_them():
    blocks = BlockLocks(stripes=8, region_shift=16)
    a, b = blocks.indexes(((1, 0, 4096),)), blocks.indexes(((1, 0, 2 << 16),))
    seen = blocks.seq(b)
    assert seen is not None and seen == [0, 0]
    assert blocks.try_write(a)
    assert blocks.seq(a) is None and blocks.seq(b) is None  # a writer at work: readers wait or read again
    assert not blocks.try_write(b) and blocks.held == 1  # all or none: b's second lock was not kept
    done = threading.Event()

    def second():
        blocks.write(b)
        done.set()
        blocks.end_write(b)

    t = threading.Thread(target=second)
    t.start()
    assert not done.wait(0.05)
    blocks.end_write(a)
    t.join(5)
    assert done.is_set() and blocks.held == 0
    after = blocks.seq(b)
    assert after is not None and after != seen  # the counts moved: a reader from before reads again


def test_default_namespace_commands_wait_only_for_overlapping_writers(nvme_env):
    """Deterministic, on a default namespace whose I/O runs on the workers: a Write held inside
    the backend keeps an overlapping Read and Write Zeroes out of the backend, while a Read
    elsewhere and a second Read of the same region go on; the Read then sees the whole write."""
    env = nvme_env("ns=mem:size=4M", io_queues=2)
    drv, ctrl = env.drv, env.ctrl
    backend = GatedBackend(1 << 20)
    ctrl.add_namespace(2, Namespace(2, backend), attached=True)
    drv.scan_namespaces()
    assert not ctrl.atomicity.serialises(ctrl.namespaces[2])
    data = b"".join(bytes([0x50 + i]) * 512 for i in range(8))
    wbuf, rbuf, obuf, pbuf = (drv.machine.alloc(4096, 4096) for _ in range(4))
    drv.mem.write(wbuf, data)
    backend.hold()
    wcid = drv.submit(1, WRITE, nsid=2, cdw10=16, cdw12=7, buf=wbuf, length=4096)
    wait_until(lambda: backend.waiting == 1, what="the write to reach the backend")
    rcid = drv.submit(2, READ, nsid=2, cdw10=20, cdw12=7, buf=rbuf, length=4096)  # overlaps 20..23
    zcid = drv.submit(2, WRITE_ZEROES, nsid=2, cdw10=23, cdw12=0)  # overlaps LBA 23
    ocid = drv.submit(2, READ, nsid=2, cdw10=1000, cdw12=7, buf=obuf, length=4096)  # another region
    wait_until(lambda: backend.waiting == 2, what="the read elsewhere to reach the backend")
    time.sleep(0.05)
    assert backend.waiting == 2  # the overlapping Read and Write Zeroes wait for the writer
    backend.release()
    assert drv.wait_for(1, wcid).ok
    done = {c: drv.wait_for(2, c) for c in (rcid, zcid, ocid)}
    assert all(c.ok for c in done.values())
    # the Read ran after the whole write, before or after the Write Zeroes of LBA 23
    got = drv.mem.read(rbuf, 4096)
    assert got[:3 * 512] == data[4 * 512:7 * 512] and got[4 * 512:] == bytes(4 * 512)
    assert got[3 * 512:4 * 512] in (data[7 * 512:], bytes(512))
    # readers never wait for readers: two Reads of one region in the backend at once
    backend.sem = threading.Semaphore(0)  # (no permits left over from the release above)
    backend.hold()
    a = drv.submit(1, READ, nsid=2, cdw10=16, cdw12=7, buf=rbuf, length=4096)
    b = drv.submit(2, READ, nsid=2, cdw10=17, cdw12=7, buf=pbuf, length=4096)
    wait_until(lambda: backend.waiting == 2, what="both reads in the backend")
    backend.release()
    assert drv.wait_for(1, a).ok and drv.wait_for(2, b).ok
    assert ctrl.atomicity.blocks.held == 0 and ctrl.io.inflight == 0


def test_a_busy_stripe_sends_an_inline_command_to_a_worker(nvme_env):
    """On a ``mem`` namespace (commands run on the submitting thread) a Write or Read whose
    stripe a writer holds is handed to a worker instead of waiting: the doorbell write
    returns, a Read elsewhere completes at once, and both complete, whole, once the writer is
    done."""
    env = nvme_env("ns=mem:size=4M", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    blocks = ctrl.atomicity.blocks
    held = blocks.span(1, 0, 4096)
    first = _blocks_data(1, 0, 8)
    drv.write(1, 0, first)
    wbuf, rbuf, obuf = (drv.machine.alloc(4096, 4096) for _ in range(3))
    second = _blocks_data(2, 0, 8)
    drv.mem.write(wbuf, second)
    blocks.write(held)  # a writer at work in the region of LBAs 0..127
    try:
        wcid = drv.submit(1, WRITE, nsid=1, cdw10=0, cdw12=7, buf=wbuf, length=4096)
        rcid = drv.submit(1, READ, nsid=1, cdw10=4, cdw12=7, buf=rbuf, length=4096)
        ocid = drv.submit(1, READ, nsid=1, cdw10=4096, cdw12=7, buf=obuf, length=4096)  # 2 MiB away
        assert drv.wait_for(1, ocid).ok  # not held up
        time.sleep(0.05)
        assert ctrl.io.inflight == 2  # the two others wait in workers
    finally:
        blocks.end_write(held)
    assert drv.wait_for(1, wcid).ok and drv.wait_for(1, rcid).ok
    got = drv.mem.read(rbuf, 4096)
    assert _block_problems(got, 4) == []
    assert drv.read(1, 0, 8) == second
    assert blocks.held == 0 and ctrl.io.inflight == 0


# ----------------------------------------------------------------------------- single blocks
AREA = 1024  # blocks of 512 bytes (512 KiB, 4 regions of the block locks) every command lands in
_BLOCK = struct.Struct("<QQ")  # command tag, LBA
_SIZES = (1, 1, 2, 7, 8, 16, 64, 128, 256)  # blocks per command (256: 128 KiB, across regions)
DSM = 0x09


def _blocks_data(tag: int, slba: int, nlb: int) -> bytes:
    """``nlb`` blocks written by command ``tag`` at ``slba``: each carries the tag, its LBA,
    a fill byte of the tag and its crc32c in the last four bytes."""
    fill = bytes([tag & 0xFF or 1]) * (512 - _BLOCK.size - 4)
    out = []
    for lba in range(slba, slba + nlb):
        body = _BLOCK.pack(tag, lba) + fill
        out.append(body + struct.pack("<I", crc32c.crc32c(body)))
    return b"".join(out)


def _block_problems(data: bytes, slba: int) -> list[str]:
    """Why blocks of ``data`` (read at ``slba``) are not whole: each must be all zeros (never
    written, or zeroed) or one write's block for its LBA (crc32c over the tag and fill)."""
    out = []
    for i in range(len(data) // 512):
        block = data[i * 512:(i + 1) * 512]
        if block == bytes(512):
            continue
        body, (crc,) = block[:-4], struct.unpack_from("<I", block, 508)
        if crc32c.crc32c(body) != crc:
            out.append(f"LBA {slba + i}: torn block (crc mismatch)")
        elif _BLOCK.unpack_from(block)[1] != slba + i:
            out.append(f"LBA {slba + i}: holds LBA {_BLOCK.unpack_from(block)[1]}'s block")
    return out


def _block_storm(drv: NvmeDriver, queues: int, batches: int, depth: int = 8, seed: int = 1, *,
                 area: int = AREA, sizes: tuple[int, ...] = _SIZES, mix: tuple[float, float, float] = (0.45, 0.5, 0.53),
                 nsid: int = 1, first: int = 0) -> tuple[list[str], int]:
    """``queues`` host threads, one per I/O queue, each submitting ``batches`` batches of
    ``depth`` commands in :data:`AREA` blocks: Writes of 1..128 blocks with distinct tags,
    Write Zeroes (half of them deallocating), Dataset Management deallocations, Reads,
    half of the data buffers at a page offset of 100h (a block then straddles two PRP
    pages); every Read is checked block by block (:func:`_block_problems`), and the area
    once more at the end. Returns the problems seen and the commands run."""
    problems: list[str] = []
    count = [0]
    lock = threading.Lock()
    size = max(sizes) * 512 + 4096
    bufs = {q: [drv.machine.alloc(size, 4096) for _ in range(depth)] for q in range(1, queues + 1)}
    ranges = {q: drv.machine.alloc(4096, 4096) for q in range(1, queues + 1)}

    def run(qid: int) -> None:
        rnd = random.Random(seed * 1000 + qid)
        tag = qid << 40
        try:
            for _ in range(batches):
                reads = {}
                dsm = False
                for k in range(depth):
                    buf = bufs[qid][k] + rnd.choice((0, 0x100))
                    nlb = rnd.choice(sizes)
                    slba = first + rnd.randrange(area - nlb + 1)
                    choice = rnd.random()
                    if choice < mix[0]:
                        tag += 1
                        drv.mem.write(buf, _blocks_data(tag, slba, nlb))
                        drv.submit(qid, WRITE, nsid=nsid, cdw10=slba, cdw12=nlb - 1, buf=buf, length=nlb * 512,
                                   ring=False)
                    elif choice < mix[1]:
                        deac = rnd.choice((0, 1 << 25))
                        drv.submit(qid, WRITE_ZEROES, nsid=nsid, cdw10=slba, cdw12=(nlb - 1) | deac, ring=False)
                    elif choice < mix[2] and not dsm:  # (one range buffer per queue: one DSM a batch)
                        dsm = True
                        drv.mem.write(ranges[qid], struct.pack("<IIQ", 0, nlb, slba))
                        drv.submit(qid, DSM, nsid=nsid, cdw11=1 << 2, buf=ranges[qid], length=16, ring=False)
                    else:
                        cid = drv.submit(qid, READ, nsid=nsid, cdw10=slba, cdw12=nlb - 1, buf=buf,
                                         length=nlb * 512, ring=False)
                        reads[cid] = (buf, slba, nlb)
                drv.ring(qid)
                for comp in drv.reap(qid, min_completions=depth, timeout=30):
                    if not comp.ok:
                        problems.append(f"queue {qid}: command {comp.cid} failed {comp.code:#x}")
                    elif comp.cid in reads:
                        buf, slba, nlb = reads[comp.cid]
                        problems.extend(_block_problems(drv.mem.read(buf, nlb * 512), slba))
                with lock:
                    count[0] += depth
        except Exception as exc:  # a driver failure is a problem too
            problems.append(f"queue {qid}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(q,)) for q in range(1, queues + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    problems.extend("after the storm: " + p for p in _block_problems(drv.read(nsid, first, area), first))
    return problems, count[0]


def test_the_block_checker_sees_a_torn_block():
    a, b = _blocks_data(5, 10, 4), _blocks_data(6, 10, 4)
    assert _block_problems(a, 10) == [] and _block_problems(bytes(2048), 0) == []
    assert _block_problems(a[:1024] + b[1024:], 10) == []  # whole blocks of two writes: allowed
    assert _block_problems(a[:700] + b[700:], 10) == ["LBA 11: torn block (crc mismatch)"]
    assert _block_problems(a, 11)[0] == "LBA 11: holds LBA 10's block"


def test_every_block_stays_whole_on_a_default_file_namespace(tmp_path):
    """The default atomicity (AWUN 0: one block) on a ``file`` namespace: host threads on
    four queues (each rings its own doorbell; the workers and the submitting threads' page
    cache reads run at once) storm 256 blocks across two regions of the block locks with
    overlapping Writes of 64 to 256 blocks, Write Zeroes, deallocations and Reads; every
    block read is whole, and the blocks of two overlapping writes never mix inside one."""
    env = make_env(f"ns=file:path={tmp_path}/a.img,size=4M", io_queues=4)
    try:
        ctrl = env.ctrl
        ns = ctrl.namespaces[1]
        assert ctrl.atomicity.limits(ns) == AtomicLimits(1) and not ctrl.atomicity.serialises(ns)
        # (without the block locks this storm saw torn blocks -- reads racing writes in the
        # page cache -- in 8 runs of 8, one to nine torn blocks each)
        problems, commands = _block_storm(env.drv, queues=4, batches=600, area=256, first=128,
                                          sizes=(64, 128, 256), mix=(0.5, 0.52, 0.53))
        assert commands == 4 * 600 * 8
        assert problems == [], f"{len(problems)} problems, first: {problems[:5]}"
        assert ctrl.atomicity.blocks.held == 0 and ctrl.io.inflight == 0
    finally:
        env.close()


class _LockCheckingMemory(MemoryBackend):
    """A ``mem`` backend that records, for every read and write, whether the thread moving
    the data holds the controller's device lock."""

    def __init__(self, size: int, lock: threading.RLock) -> None:
        super().__init__(size)
        self.device_lock = lock
        self.unlocked = 0
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if not self.device_lock._is_owned():  # type: ignore[attr-defined]
            self.unlocked += 1

    def readv(self, views, offset):
        self._check()
        super().readv(views, offset)

    def writev(self, views, offset, *, fua=False):
        self._check()
        super().writev(views, offset, fua=fua)


def test_every_block_stays_whole_on_a_mem_namespace():
    """A ``mem`` namespace (inline: commands run on the thread that rang the doorbell) under
    the same storm from four host threads: every block whole. The in-process host holds the
    device's lock (``PciDevice.lock``) around each bus cycle, as the vfio-user server does,
    so the doorbell writes of different queues -- and the inline commands they run -- never
    overlap: the backend sees every transfer under that lock. A worker thread that frees
    room in a throttled completion queue fetches without it: the block locks cover that."""
    env = make_env("ns=mem:size=4M", io_queues=4)
    try:
        ctrl = env.ctrl
        backend = _LockCheckingMemory(4 << 20, ctrl.lock)
        ctrl.add_namespace(2, Namespace(2, backend), attached=True)
        env.drv.scan_namespaces()
        problems, commands = _block_storm(env.drv, queues=4, batches=150, nsid=2)
        assert problems == [], f"{len(problems)} problems, first: {problems[:5]}"
        assert commands == 4 * 150 * 8 and backend.calls > 2000
        assert backend.unlocked == 0  # serialised by the device lock
        assert ctrl.atomicity.blocks.held == 0 and ctrl.io.inflight == 0
    finally:
        env.close()


# ----------------------------------------------------------------------------- migration
def _migrate(src: NvmeController, machine, pdev, drv: NvmeDriver, cfg: NvmeConfig | None = None):
    src.quiesce()
    data, fds = save_device_stream(src)
    dst = NvmeController(cfg if cfg is not None else src.cfg, name="dst")
    try:
        res = load_device_stream(dst, data, fds)
    except BaseException:
        dst.close()
        raise
    dst.irq.sink = pdev.recorder
    pdev.device = dst
    drv.device, drv._bar_write, drv._bar_read = dst, dst.bar_write, dst.bar_read
    dst.resume()
    return dst, res, (data, fds)


def test_migration_keeps_the_limits_in_effect(tmp_path):
    from pcidev.host import Machine

    config = (f"atomic.awun=7,atomic.awupf=3,ns=file:path={tmp_path}/a.img,size=2M,atomic.nawun=15,"
              f"atomic.nawupf=7,atomic.nabsn=15,atomic.nabspf=7,ns=mem:size=1M")
    machine = Machine(ram_size=64 << 20)
    src = NvmeController(config, name="src")
    pdev = machine.plug(src)
    drv = NvmeDriver(machine, pdev, io_queues=1)
    drv.probe()
    dst = res = None
    try:
        drv.set_features(FID_WRITE_ATOMICITY, 1)
        written = {}
        for nsid in (1, 2):
            for unit in range(6):
                data = _unit_data((nsid << 8) | unit, unit)[:16 * 512]
                drv.write(nsid, unit * 16, data)
                written[(nsid, unit)] = crc32c.crc32c(data)
        limits = {n: src.atomicity.limits(ns) for n, ns in src.namespaces.items()}
        assert limits[1] == AtomicLimits(8, 8) and limits[2] == AtomicLimits(4)
        # a destination configured without the namespace's atomicity refuses by fingerprint
        src.quiesce()
        data, fds = save_device_stream(src)
        other = NvmeController(config.replace(",atomic.nabsn=15,atomic.nabspf=7", ""), name="other")
        try:
            with pytest.raises(ConfigMismatchError, match="nvme.atomic"):
                load_device_stream(other, data, fds)
        finally:
            other.close()
        src.resume()
        dst, res, _ = _migrate(src, machine, pdev, drv)
        assert drv.get_features(FID_WRITE_ATOMICITY).dw0 == 1
        assert dst.atomicity.dn
        assert {n: dst.atomicity.limits(ns) for n, ns in dst.namespaces.items()} == limits
        assert dst.atomicity.serialises(dst.namespaces[1]) and dst.atomicity.serialises(dst.namespaces[2])
        idns = drv.identify(0x00, nsid=1)
        assert idns[24] & 0x02 and _ns_fields(idns) == (15, 7, 0, 15, 0, 7)
        for (nsid, unit), crc in written.items():
            assert crc32c.crc32c(drv.read(nsid, unit * 16, 16)) == crc
        again = _unit_data(0x77, 3)[:16 * 512]
        drv.write(1, 48, again)
        assert drv.read(1, 48, 16) == again
    finally:
        drv.close()
        for c in (dst, src):
            if c is not None:
                c.close()
        if res is not None:
            res.close()
        machine.close()


def test_fingerprint_unchanged_without_atomic_parameters():
    from pcidev_nvme.migration import fingerprint

    ctrl = NvmeController("ns=mem:size=1M")
    try:
        assert not any(k.startswith("nvme.atomic") for k in fingerprint(ctrl))
    finally:
        ctrl.close()


def test_secondary_controllers_share_the_primary_lock_table():
    env = make_env("atomic.awun=7,ns=mem:size=16M,max_ioqpairs=8,msix_vectors=9,sriov_max_vfs=2,"
                   "sriov_vq_flexible=6,sriov_vi_flexible=4", io_queues=1)
    try:
        vf = env.pdev.enable_sriov(1)[0].device
        assert vf.atomicity is not env.ctrl.atomicity  # DN is per controller
        assert vf.atomicity.locks is env.ctrl.atomicity.locks  # the namespaces are shared
        assert vf.atomicity.awun == 7
    finally:
        env.close()


@pytest.mark.parametrize("props, message", [
    ("nvme,atomic.awun=1,atomic.awupf=3,ns=mem:size=1M", "atomic.awupf=3 exceeds atomic.awun=1"),
    ("nvme,ns=mem:size=1M,atomic.nabsn=5", "not a power of two"),
    ("nvme,mdts=2,ns=mem:size=1M,atomic.nawun=63", "exceeds MDTS"),
])
def test_the_command_line_says_one_line(props, message, tmp_path, capsys):
    from pcidev.cli import main

    assert main(["serve", "--vfio-user", str(tmp_path / "s.sock"), props]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("spec", ["file:path={tmp}/a.img,size=1M", "mem:size=1M,lbaf=2,pi=1"])
def test_every_data_command_runs_under_the_locks(spec, tmp_path):
    """Write, Read, Compare, Verify, Write Zeroes, Write Uncorrectable, Dataset Management and
    Copy on a serialised namespace (a file; a namespace with protection information, whose
    own locks nest inside): right results, no lock left behind."""
    env = make_env("ns=" + spec.format(tmp=tmp_path) + ",atomic.nawun=15", io_queues=1)
    try:
        drv, ctrl = env.drv, env.ctrl
        ns = ctrl.namespaces[1]
        assert ctrl.atomicity.serialises(ns)
        pract = (1 << 29) if ns.pi else 0  # the controller inserts and strips the PI
        data = _unit_data(9, 0)[:16 * 512]
        buf = drv.machine.alloc(16 * 512, 4096)
        drv.mem.write(buf, data)

        def io(opcode, slba, nlb, *, cdw12=0, check=True, **kw):
            return drv.io(1, opcode, nsid=1, cdw10=slba, cdw12=(nlb - 1) | pract | cdw12, check=check, **kw)

        io(WRITE, 32, 16, buf=buf, length=16 * 512)
        rbuf = drv.machine.alloc(16 * 512, 4096)
        if ns.ms:  # Compare and Verify refuse PRACT: compare with the stored PI, read first
            mbuf = drv.machine.alloc(4096, 4096)
            drv.io(1, READ, nsid=1, cdw10=32, cdw12=15, buf=rbuf, length=16 * 512, mptr=mbuf)
            assert drv.io(1, COMPARE, nsid=1, cdw10=32, cdw12=15, buf=buf, length=16 * 512, mptr=mbuf).ok
            drv.io(1, 0x0C, nsid=1, cdw10=32, cdw12=15)  # Verify
        else:
            assert io(COMPARE, 32, 16, buf=buf, length=16 * 512).ok
            io(0x0C, 32, 16)  # Verify
        io(READ, 32, 16, buf=rbuf, length=16 * 512)
        assert drv.mem.read(rbuf, 16 * 512) == data
        ranges = drv.machine.alloc(4096, 4096)
        drv.mem.write(ranges, struct.pack("<8xQH14x", 32, 15))
        prinfo = (1 << 15 | 1 << 29) if pract else 0  # PRINFOR and PRINFOW: PRACT
        drv.io(1, 0x19, nsid=1, cdw10=64, cdw12=prinfo, buf=ranges, length=32)  # Copy
        io(READ, 64, 16, buf=rbuf, length=16 * 512)
        assert drv.mem.read(rbuf, 16 * 512) == data
        io(WRITE_ZEROES, 64, 8)
        io(READ, 64, 16, buf=rbuf, length=16 * 512)
        assert drv.mem.read(rbuf, 16 * 512) == bytes(8 * 512) + data[8 * 512:]
        drv.write_uncorrectable(1, 80, 4)
        assert not io(READ, 80, 4, buf=rbuf, length=4 * 512, check=False).ok
        drv.mem.write(ranges, struct.pack("<IIQ", 0, 16, 32))  # Dataset Management: deallocate 32..47
        drv.io(1, 0x09, nsid=1, cdw10=0, cdw11=1 << 2, buf=ranges, length=16)
        io(READ, 32, 16, buf=rbuf, length=16 * 512)
        assert drv.mem.read(rbuf, 16 * 512) == bytes(16 * 512)
        assert ctrl.atomicity.locks.held == 0
    finally:
        env.close()
