"""``mem`` namespaces (and their metadata memfds, and a CMB) migrate over TCP: their
contents are memory sources (``NvmeController.memory_sources``) copied while the
controller keeps serving I/O (pre-copy, tracked by the dirty bitmaps every write path of
the stores marks) and the rest at the stop.

In process: every command that changes a namespace's memory (Write, Write Zeroes with
and without deallocation, Dataset Management deallocate, Copy, a PI write's metadata,
Format NVM, Sanitize) marks exactly the ranges it changed, and the sources name every
``mem`` namespace the controller has, one created by Namespace Management too.

Between processes, over TCP, with the software host running verified I/O at QD 32 on two
queues (crc32c per block, every block checked at the end): a ``mem`` namespace, a PI
namespace on ``mem`` and a controller with a CMB (an SQ and data buffers in it) migrate
twice each with a pre-copy report; a host keeps completing commands while the pre-copy
runs (the destination is stopped with SIGSTOP, so the pre-copy cannot end before it is
let go); a destination killed during the pre-copy leaves the source serving with every
block intact, and a second migration succeeds.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import threading
import time

import crc32c
import pytest
from _copy_exercisers import copy, f0

from pcidev.errors import MigrationError
from pcidev.host import Machine
from pcidev_nvme.backends import MemoryBackend, punch_hole
from pcidev_nvme.testing.driver import WRITE, NvmeDriver

QD = 32
READ, WRITE_ZEROES, DSM, FORMAT_NVM = 0x02, 0x08, 0x09, 0x80
PRACT, GUARD, REFTAG = 8, 4, 1
GRANULE = 4096


# ------------------------------------------------------------------------- in process
def _sources(ctrl):
    return {s.name.split("@")[0]: s for s in ctrl.memory_sources()}


def _track(ctrl):
    """Start every source's bitmap and take the initial 'everything' away."""
    srcs = _sources(ctrl)
    for s in srcs.values():
        s.bitmap.start()
        s.bitmap.take()
    return srcs


def _covered(ranges, off, length):
    end = off + length
    return any(a <= off and end <= a + n for a, n in ranges)


def _granules(off, length, size=1 << 40):
    """The run of whole granules that covers the bytes (cut to the object's size)."""
    first, last = off // GRANULE, (off + length - 1) // GRANULE
    return [(first * GRANULE, min((last + 1) * GRANULE, size) - first * GRANULE)]


def test_every_write_path_marks_the_namespace_and_metadata_bitmaps(nvme_env):
    env = nvme_env("ns=mem:size=4M,ns=mem:size=1M,lbaf=2,pi=1,capacity=64M", io_queues=1)
    drv, ctrl, m = env.drv, env.ctrl, env.machine
    srcs = _track(ctrl)
    assert sorted(srcs) == ["nvme/ns1", "nvme/ns2", "nvme/ns2/meta"]
    assert all(s.covers == {"nvme-backend:mem"} for s in srcs.values())
    data1, data2, meta = (srcs[k].bitmap for k in ("nvme/ns1", "nvme/ns2", "nvme/ns2/meta"))

    def took(bitmap):
        return bitmap.take()

    # Write: the bytes written, nothing else
    drv.write(1, 1000, os.urandom(8 * 512))
    assert took(data1) == _granules(1000 * 512, 8 * 512)
    assert took(data2) == [] and took(meta) == []
    # Write Zeroes, plain and with DEAC (whole pages punched, the rest zeroed)
    drv.io(1, WRITE_ZEROES, nsid=1, cdw10=3000, cdw12=15)
    assert took(data1) == _granules(3000 * 512, 16 * 512)
    drv.io(1, WRITE_ZEROES, nsid=1, cdw10=4096, cdw12=(256 - 1) | 1 << 25)
    assert took(data1) == _granules(4096 * 512, 256 * 512)
    # Dataset Management, deallocate
    buf = m.alloc(4096)
    m.write(buf, struct.pack("<IIQ", 0, 512, 6144))
    drv.io(1, DSM, nsid=1, cdw10=0, cdw11=1 << 2, buf=buf, length=16)
    assert took(data1) == _granules(6144 * 512, 512 * 512)
    # Copy: the destination range of the destination namespace
    assert copy(drv, 1, 7000, [f0(1000, 8)], 0).ok
    assert took(data1) == _granules(7000 * 512, 8 * 512)
    # a PI write (PRACT: the controller writes the protection information): data and metadata
    comp, _d, _m = drv.io_md(WRITE, 2, 100, 4, data=os.urandom(4 * 512), prinfo=PRACT, ref=100)
    assert comp.ok
    assert took(data2) == _granules(100 * 512, 4 * 512)
    assert took(meta) == _granules(100 * 8, 4 * 8, size=2048 * 8)
    # Write Zeroes on the PI namespace: its metadata reads as deallocated
    drv.io(1, WRITE_ZEROES, nsid=2, cdw10=200, cdw12=7)
    assert _covered(took(data2), 200 * 512, 8 * 512) and _covered(took(meta), 200 * 8, 8 * 8)
    assert took(data1) == []
    # Sanitize (block erase): every namespace, all of it
    drv.sanitize(2)
    deadline = time.monotonic() + 20
    while drv.sanitize_log()["sstat"] & 7 != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert _covered(took(data1), 0, 4 << 20) and _covered(took(data2), 0, 1 << 20)
    # Format NVM of namespace 1 (user data erase): all of it
    drv.write(1, 0, os.urandom(4096))
    took(data1)
    drv.admin(FORMAT_NVM, nsid=1, cdw10=0 | 1 << 9)
    assert _covered(took(data1), 0, 4 << 20)
    # a format to a format with metadata gives namespace 1 a new metadata memfd: a new source
    drv.admin(FORMAT_NVM, nsid=1, cdw10=2 | 1 << 5)
    now = _sources(ctrl)
    assert sorted(now) == ["nvme/ns1", "nvme/ns1/meta", "nvme/ns2", "nvme/ns2/meta"]


def test_the_sources_follow_namespace_management_and_stay_quiet_untracked(nvme_env):
    env = nvme_env("ns=mem:size=1M,capacity=16M,max_namespaces=4", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    buf = bytearray(4096)
    struct.pack_into("<QQ", buf, 0, 2048, 2048)
    nsid = drv.admin(0x0D, cdw10=0, data=bytes(buf)).dw0
    srcs = _sources(ctrl)
    assert sorted(srcs) == ["nvme/ns1", f"nvme/ns{nsid}"]
    assert srcs[f"nvme/ns{nsid}"].size == 2048 * 512
    # not tracking: writes leave the bitmaps empty (the hot path's mark is a no-op)
    drv.write(1, 0, os.urandom(4096))
    assert srcs["nvme/ns1"].bitmap.dirty_bytes() == 0
    # a source's name carries its memfd's inode: the same namespace is the same name
    assert {s.name for s in ctrl.memory_sources()} == {s.name for s in srcs.values()}
    drv.admin(0x0D, nsid=nsid, cdw10=1)  # deleted: no longer a source
    assert sorted(_sources(ctrl)) == ["nvme/ns1"]


def test_an_adopted_memfd_keeps_its_page_map_full_or_with_holes():
    """``MemoryBackend.from_fd`` (the load of a migrated namespace): a memfd with every page
    allocated is taken as all written without a scan; one with holes keeps them (NUSE)."""
    size = 1 << 20
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, os.urandom(size), 0)
        full = MemoryBackend.from_fd(fd, size)
        assert full.allocated_bytes() == size and full.allocated_ranges(0, size) == [(0, size)]
        full.close()
        punch_hole(fd, 8192, 3 * 4096)
        holed = MemoryBackend.from_fd(fd, size)
        assert holed.allocated_bytes() == size - 3 * 4096
        assert holed.allocated_ranges(0, size) == [(0, 8192), (8192 + 3 * 4096, size - 8192 - 3 * 4096)]
        v = bytearray(4 * 4096)
        holed.readv([memoryview(v)], 4096)
        assert v[4096:] == bytes(3 * 4096) and v[:4096] == os.pread(fd, 4096, 4096)
        holed.close()
    finally:
        os.close(fd)


# ------------------------------------------------------------------------- between processes
CONFIGS = {
    "mem": "serial=XTCPM,max_ioqpairs=2,msix_vectors=3,ns=mem:size=16M",
    "pi": "serial=XTCPP,max_ioqpairs=2,msix_vectors=3,ns=mem:size=4M,lbaf=2,pi=1,ns=mem:size=4M",
    "cmb": "serial=XTCPC,cmb_size=1,max_ioqpairs=2,msix_vectors=3,ns=mem:size=4M",
}


class Verified(threading.Thread):
    """Rounds of QD writes on each of queues 1 and 2 (random blocks, PI generated by the
    controller on a PI namespace, half of queue 2's data in the CMB when there is one),
    each block read back and checked by its crc32c; runs until :meth:`stop`."""

    def __init__(self, machine: Machine, drv: NvmeDriver, *, cmb: bool = False, seed: int = 1) -> None:
        super().__init__(daemon=True)
        self.machine, self.drv, self.cmb = machine, drv, cmb
        self.crc: dict[tuple[int, int], int] = {}
        self.error: BaseException | None = None
        self.completed = 0
        self.rounds = 0
        self.mismatches = 0
        self.rnd = random.Random(seed)
        self.halt = threading.Event()
        self._progress = threading.Condition()

    def stop(self) -> None:
        self.halt.set()
        self.join(120)
        assert not self.is_alive(), "the workload did not stop"
        assert self.error is None, self.error

    def wait_completed(self, n: int, timeout: float = 120.0) -> None:
        with self._progress:
            assert self._progress.wait_for(lambda: self.completed >= n or self.error is not None, timeout), \
                f"only {self.completed} commands completed"
        assert self.error is None, self.error

    def _pi(self, nsid: int) -> bool:
        return self.drv.namespaces[nsid].pi != 0

    def run(self) -> None:
        try:
            drv, m, rnd = self.drv, self.machine, self.rnd
            host = m.alloc(2 * QD * 4096)
            cmb = [drv.cmb_alloc(4096) for _ in range(QD)] if self.cmb else []
            while not self.halt.is_set():
                free = {n: rnd.sample(range(0, ns.nsze - 8, 8), 2 * QD) for n, ns in drv.namespaces.items()}
                written = []
                for qi, qid in enumerate((1, 2)):
                    for k in range(QD):
                        nsid = rnd.choice(sorted(free))
                        slba, nlb = free[nsid].pop(), rnd.choice([1, 4, 8])
                        data = rnd.randbytes(nlb * drv.lba_size(nsid))
                        if cmb and qid == 2 and k % 2:
                            buf = cmb[k]
                            drv.cmb_write(buf, data)
                        else:
                            buf = host + (qi * QD + k) * 4096
                            m.write(buf, data)
                        if self._pi(nsid):  # PRACT: the controller generates the PI (type 1: tag = LBA)
                            drv.submit(qid, WRITE, nsid=nsid, cdw10=slba, cdw12=(nlb - 1) | PRACT << 26,
                                       cdw14=slba, buf=buf, length=len(data))
                        else:
                            drv.submit_rw(qid, WRITE, nsid=nsid, slba=slba, nlb=nlb, buf=buf)
                        written.append((nsid, slba, data))
                for qid in (1, 2):
                    got = drv.reap(qid, min_completions=QD, timeout=60)
                    assert len(got) == QD and all(c.ok for c in got), got
                    with self._progress:
                        self.completed += QD
                        self._progress.notify_all()
                for nsid, slba, data in written:
                    lbs = drv.lba_size(nsid)
                    for i in range(len(data) // lbs):
                        self.crc[(nsid, slba + i)] = crc32c.crc32c(data[i * lbs:(i + 1) * lbs])
                    self.mismatches += self.read(nsid, slba, len(data) // lbs, qid=1 + self.rounds % 2) != data
                self.rounds += 1
        except BaseException as exc:
            self.error = exc
            with self._progress:
                self._progress.notify_all()

    def read(self, nsid: int, slba: int, nlb: int, *, qid: int = 1) -> bytes:
        if not self._pi(nsid):
            return self.drv.read(nsid, slba, nlb, qid=qid)
        lbs = self.drv.lba_size(nsid)
        # every check but the application tag: a block whose PI does not match its data or LBA fails
        comp, data, _meta = self.drv.io_md(READ, nsid, slba, nlb, data_len=nlb * lbs, prinfo=PRACT | GUARD | REFTAG,
                                           ref=slba, qid=qid)
        assert comp.ok, f"namespace {nsid} LBA {slba}+{nlb}: status {comp.status:#x}"
        return data

    def fill(self, nsid: int, nbytes: int) -> None:
        """Write ``nbytes`` of random data from LBA 0 (before the workload starts)."""
        lbs = self.drv.lba_size(nsid)
        chunk = 64 << 10
        for off in range(0, nbytes, chunk):
            data = self.rnd.randbytes(chunk)
            if self._pi(nsid):
                comp, _d, _m = self.drv.io_md(WRITE, nsid, off // lbs, chunk // lbs, data=data, prinfo=PRACT,
                                              ref=off // lbs)
                assert comp.ok, hex(comp.status)
            else:
                self.drv.write(nsid, off // lbs, data)
            for i in range(chunk // lbs):
                self.crc[(nsid, off // lbs + i)] = crc32c.crc32c(data[i * lbs:(i + 1) * lbs])

    def verify_everything(self) -> int:
        checked = bad = 0
        for nsid, info in sorted(self.drv.namespaces.items()):
            lbs = info.lba_size
            zero = crc32c.crc32c(bytes(lbs))
            step = 32768 // lbs
            for slba in range(0, info.nsze, step):
                data = self.read(nsid, slba, step, qid=1 + (slba // step) % 2)
                for i in range(step):
                    checked += 1
                    bad += crc32c.crc32c(data[i * lbs:(i + 1) * lbs]) != self.crc.get((nsid, slba + i), zero)
        assert bad == 0, f"{bad} blocks differ"
        return checked


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_mem_namespaces_migrate_over_tcp_during_verified_io(tmp_path, config, process_host):
    host = process_host(tmp_path, CONFIGS[config], io_queues=2, io_depth=2 * QD, aers=1)
    drv = host.drv
    if config == "cmb":  # queue 2's SQ in the CMB
        drv.cmb_enable()
        drv.delete_io_queue_pair(2)
        drv.create_io_queue_pair(2, 2 * QD, sq_in_cmb=True)
    work = Verified(host.machine, drv, cmb=config == "cmb")
    work.fill(1, 2 << 20)  # something for the first pass to copy
    work.start()
    reports = []
    for k in (1, 2):
        work.wait_completed(work.completed + 4 * QD)
        dest = host.destination(f"d{k}", "tcp", listening=True)
        reports.append(host.device.migrate(dest.incoming, timeout=30))
        assert host.device.info["pid"] == dest.pid
    work.wait_completed(work.completed + 4 * QD)  # and it goes on at the last destination
    work.stop()
    assert work.mismatches == 0
    assert work.verify_everything() == sum(ns.nsze for ns in drv.namespaces.values())
    host.close_machine()
    for report in reports:
        pre = report["precopy"]
        assert report["fds"] == 0 and report["deferred"]
        assert pre is not None and pre["iterations"] >= 1 and pre["bytes_per_iteration"][0] >= 2 << 20, pre
        if config == "cmb":  # the CMB is written by controller DMA: tracked by page hashes
            assert pre["hashed_bytes"] > 0
        print(f"{config}: precopy {pre['iterations']} iterations {pre['bytes_per_iteration']}, remainder "
              f"{pre['remainder_bytes']} B, downtime {report['downtime'] * 1e3:.2f} ms")
    assert host.src.proc.wait(10) == 0


def _stalled_migration(p, address, completed):
    """A migration on a thread; its events: ("precopied", commands completed at the PRECOPY
    reply), then ("done", the report or the error)."""
    events: list = []

    def run():
        try:
            report = p.device.migrate(address, timeout=30,
                                      after_precopy=lambda _rep: events.append(("precopied", completed())))
            events.append(("done", report))
        except BaseException as exc:
            events.append(("done", exc))

    return threading.Thread(target=run, daemon=True), events


def test_the_host_keeps_doing_io_during_precopy_and_a_dead_destination_leaves_the_source_serving(
        tmp_path, process_host):
    host = process_host(tmp_path, "serial=XTCPS,max_ioqpairs=2,msix_vectors=3,ns=mem:size=64M", io_queues=2,
                        io_depth=2 * QD, aers=1)
    p, src = host.pdev, host.src
    work = Verified(host.machine, host.drv, seed=7)
    work.fill(1, 32 << 20)  # more than the sockets buffer: a stopped destination stalls the pre-copy
    work.start()

    # 1. the destination stops (SIGSTOP) and is killed during the pre-copy
    victim = host.destination("d1", "tcp", listening=True)
    os.kill(victim.pid, signal.SIGSTOP)
    t, events = _stalled_migration(p, victim.incoming, lambda: work.completed)
    t.start()
    at_start = work.completed
    work.wait_completed(at_start + 8 * QD)  # commands complete while the pre-copy is stuck
    assert t.is_alive() and events == []
    os.kill(victim.pid, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive()
    (what, outcome), = events
    assert what == "done" and isinstance(outcome, MigrationError), outcome
    assert "keeps running" in str(outcome)
    assert p.device.info["pid"] == src.pid
    work.wait_completed(work.completed + 4 * QD)  # the source serves on

    # 2. the host keeps completing commands between the PRECOPY request and its reply
    dest = host.destination("d2", "tcp", listening=True)
    os.kill(dest.pid, signal.SIGSTOP)
    t, events = _stalled_migration(p, dest.incoming, lambda: work.completed)
    at_start = work.completed
    t.start()
    work.wait_completed(at_start + 8 * QD)
    assert t.is_alive() and events == []
    os.kill(dest.pid, signal.SIGCONT)
    t.join(60)
    assert not t.is_alive()
    (what1, at_reply), (what2, report) = events
    assert (what1, what2) == ("precopied", "done") and isinstance(report, dict), events
    assert at_reply >= at_start + 8 * QD, (at_start, at_reply)
    assert p.device.info["pid"] == dest.pid
    pre = report["precopy"]
    assert pre["iterations"] >= 1 and pre["bytes_per_iteration"][0] >= 32 << 20, pre
    assert report["precopy_seconds"] > 0 and report["host_pause"] < report["precopy_seconds"]
    work.wait_completed(work.completed + 4 * QD)
    work.stop()
    assert work.mismatches == 0
    assert work.verify_everything() == (64 << 20) // 512
    host.close_machine()
    assert src.proc.wait(10) == 0


def test_a_migration_in_one_go_copies_everything_at_the_stop(tmp_path, process_host):
    """``precopy=False`` (or an older device process): one MIGRATE; the contents go at the stop."""
    host = process_host(tmp_path, "serial=XTCP1,max_ioqpairs=1,msix_vectors=2,ns=mem:size=4M,lbaf=2,pi=1",
                        ram=32 << 20, io_queues=1, aers=0)
    drv = host.drv
    payload = {}
    for i in range(64):
        data = os.urandom(4096)
        comp, _d, _m = drv.io_md(WRITE, 1, 64 * i, 8, data=data, prinfo=PRACT, ref=64 * i)
        assert comp.ok
        payload[64 * i] = data
    dest = host.destination("d1", "tcp", listening=True)
    report = host.device.migrate(dest.incoming, timeout=20, precopy=False)
    assert report["precopy"]["iterations"] == 0 and report["precopy"]["remainder_bytes"] > 0
    assert report["precopy_seconds"] is None
    for slba, data in payload.items():
        comp, got, _m = drv.io_md(READ, 1, slba, 8, data_len=4096, prinfo=PRACT | GUARD | REFTAG, ref=slba)
        assert comp.ok and got == data, slba


def test_the_migrate_nvme_example_moves_a_filled_mem_namespace_over_tcp(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
    try:
        import migrate_nvme
    finally:
        sys.path.pop(0)
    assert migrate_nvme.main(["--tcp", "--mem", "--fill", "--migrations", "2", "--rounds", "6", "--qd", "8",
                              "--ns-size", str(2 << 20)]) == 0
    out = capsys.readouterr().out
    assert out.count("pre-copy: ") == 2 and "2.0 MiB" in out and "0 CRC-32C mismatches" in out
    assert "8192 blocks checked" in out  # both namespaces, every block
