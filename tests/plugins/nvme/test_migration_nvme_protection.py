"""Namespaces with metadata and protection information migrate: in process mid-I/O at
QD 32 (file writes in flight at the stop, commands left unrung until the destination
runs) and between processes during verified I/O. After every migration every block of
every namespace is read back with every PI check on (Guard, Application Tag, Reference
Tag) and its data compared by crc32c; the metadata stores are compared byte for byte
at the stop and after the load. A stream of a namespace without metadata carries no
metadata subsection (older streams load: test_migration_nvme.py's golden stream)."""

from __future__ import annotations

import os
import random
import threading

import crc32c
import pytest
from test_migration_nvme import Host, _slow_files

from pcidev import native
from pcidev.inheritance import image_key
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import WRITE, NvmeDriver

QD = 32
READ = 0x02
PRACT, ALL = 8, 7
APP = 0x5A5A
#: type 2 reference tags start here (type 1: the LBA)
T2_BASE = 0x10000


def _config(tmp_path) -> str:
    return (f"serial=MIGPI,max_ioqpairs=2,msix_vectors=3,ns=mem:size=1M,lbaf=2,pi=1,"
            f"ns=file:path={tmp_path}/p.img,size=1M,lbaf=5,pi=2,pil=1,mset=1")


def _ref(nsid: int, lba: int) -> int:
    return lba if nsid == 1 else T2_BASE + lba


def metadata_bytes(ctrl: NvmeController) -> dict[int, bytes]:
    return {nsid: bytes(ns.meta.read(0, ns.nlbas)) for nsid, ns in sorted(ctrl.allocated.items())
            if ns.meta is not None}


def host_pi(data: bytes, lba: int) -> bytes:
    """The 16b Guard PI of a 512-byte block of namespace 1 (type 1, PI last = all the metadata)."""
    return (native.py_crc16_t10dif(data).to_bytes(2, "big") + APP.to_bytes(2, "big")
            + (lba & 0xFFFFFFFF).to_bytes(4, "big"))


class PiBlocks:
    """crc32c of every block written, and the check of all of them through the host."""

    def __init__(self, drv: NvmeDriver) -> None:
        self.drv = drv
        self.crc: dict[tuple[int, int], int] = {}

    def record(self, nsid: int, slba: int, data: bytes) -> None:
        lbs = self.drv.lba_size(nsid)
        for i in range(len(data) // lbs):
            self.crc[(nsid, slba + i)] = crc32c.crc32c(data[i * lbs:(i + 1) * lbs])

    def verify_all(self, qid: int = 1) -> int:
        drv = self.drv
        checked = 0
        bad = []
        for nsid, info in sorted(drv.namespaces.items()):
            lbs = info.lba_size
            zero = crc32c.crc32c(bytes(lbs))
            step = 32768 // lbs
            for slba in range(0, info.nsze, step):
                # every check on: a block whose PI does not match its data, tags or LBA fails
                comp, data, _meta = drv.io_md(READ, nsid, slba, step, data_len=step * lbs, prinfo=PRACT | ALL,
                                              ref=_ref(nsid, slba), app=APP, qid=qid)
                assert comp.ok, f"namespace {nsid} LBAs {slba}+{step}: status {comp.status:#x}"
                for i in range(step):
                    if crc32c.crc32c(data[i * lbs:(i + 1) * lbs]) != self.crc.get((nsid, slba + i), zero):
                        bad.append((nsid, slba + i))
                    checked += 1
        assert not bad, f"{len(bad)} blocks differ, first {bad[:5]}"
        return checked


def submit_pi_write(drv: NvmeDriver, m, qid: int, nsid: int, slba: int, nlb: int, data: bytes, *,
                    ring: bool) -> tuple[int, list[int]]:
    """Namespace 1: host-supplied PI in a separate buffer, every check; namespace 2: PRACT."""
    bufs = [m.alloc(max(len(data), 4096))]
    m.write(bufs[0], data)
    cdw12 = (nlb - 1)
    if nsid == 1:
        meta = b"".join(host_pi(data[i * 512:(i + 1) * 512], slba + i) for i in range(nlb))
        bufs.append(m.alloc(4096))
        m.write(bufs[1], meta)
        cdw12 |= ALL << 26
        mptr = bufs[1]
    else:
        cdw12 |= PRACT << 26
        mptr = 0
    ref = _ref(nsid, slba)
    cid = drv.submit(qid, WRITE, nsid=nsid, cdw10=slba, cdw12=cdw12, cdw3=ref >> 32, cdw14=ref & 0xFFFFFFFF,
                     cdw15=APP | 0xFFFF << 16, mptr=mptr, buf=bufs[0], length=len(data), ring=ring)
    return cid, bufs


def test_pi_namespaces_migrate_mid_io(tmp_path):
    h = Host(_config(tmp_path), io_queues=2, io_depth=64)
    try:
        drv, m = h.drv, h.machine
        assert (drv.namespaces[1].pi, drv.namespaces[2].pi, drv.namespaces[2].extended) == (1, 2, True)
        blocks = PiBlocks(drv)
        rnd = random.Random(11)
        in_flight = 0
        _slow_files(h.ctrl)
        for round_no in range(3):
            free = {1: list(range(0, drv.namespaces[1].nsze - 8, 8)), 2: list(range(drv.namespaces[2].nsze))}
            for lst in free.values():
                rnd.shuffle(lst)
            pending = {}
            for qid in (1, 2):
                for k in range(QD):
                    nsid = rnd.choice((1, 2))
                    slba = free[nsid].pop()
                    nlb = rnd.choice([1, 2, 8]) if nsid == 1 else 1
                    data = os.urandom(nlb * drv.lba_size(nsid))
                    cid, bufs = submit_pi_write(drv, m, qid, nsid, slba, nlb, data, ring=k < QD - 8)
                    pending[(qid, cid)] = (nsid, slba, data, bufs)
            in_flight += h.ctrl.io.inflight
            h.ctrl.quiesce()  # (migrate() quiesces again: a no-op) the consistent point
            src_meta = metadata_bytes(h.ctrl)
            h.migrate()
            assert metadata_bytes(h.ctrl) == src_meta, "metadata differs across the migration"
            _slow_files(h.ctrl)
            for qid in (1, 2):
                drv.ring(qid)
            got = []
            for qid in (1, 2):
                got += [(qid, c) for c in drv.reap(qid, min_completions=QD, timeout=20)]
            assert sorted((q, c.cid) for q, c in got) == sorted(pending), "completions lost or duplicated"
            assert all(c.ok for _q, c in got), [hex(c.status) for _q, c in got if not c.ok]
            for nsid, slba, data, bufs in pending.values():
                blocks.record(nsid, slba, data)
                for b in bufs:
                    m.free(b)
            assert blocks.verify_all(qid=1 + round_no % 2) == sum(i.nsze for i in drv.namespaces.values())
        assert in_flight > 0
        # the mem namespace's metadata memory came along (not a copy): a later write shows in it
        assert h.ctrl.allocated[1].meta.kind == "mem" and h.ctrl.allocated[2].meta.kind == "file"
    finally:
        h.close()


def test_a_namespace_without_metadata_writes_no_subsection(tmp_path):
    ctrl = NvmeController("ns=mem:size=1M,ns=mem:size=1M,lbaf=3,pi=3")
    try:
        st = ctrl.get_device_state()
        assert st.namespaces[0].metadata is None
        assert st.namespaces[1].metadata is not None and st.namespaces[1].metadata.pi == 3
    finally:
        ctrl.close()


class Workload(threading.Thread):
    """Rounds of PI writes (both namespaces) and checked read-backs."""

    def __init__(self, machine, drv, rounds):
        super().__init__(daemon=True)
        self.machine, self.drv, self.rounds = machine, drv, rounds
        self.blocks = PiBlocks(drv)
        self.done = threading.Semaphore(0)
        self.error: BaseException | None = None

    def run(self):
        try:
            drv, m = self.drv, self.machine
            rnd = random.Random(5)
            for _ in range(self.rounds):
                written = []
                for _k in range(QD):
                    nsid = rnd.choice((1, 2))
                    slba = rnd.randrange(0, drv.namespaces[nsid].nsze - 8)
                    nlb = rnd.choice([1, 4]) if nsid == 1 else 1
                    data = os.urandom(nlb * drv.lba_size(nsid))
                    cid, bufs = submit_pi_write(drv, m, 1, nsid, slba, nlb, data, ring=True)
                    comp = drv.wait_for(1, cid, 30)
                    assert comp.ok, hex(comp.status)
                    for b in bufs:
                        m.free(b)
                    self.blocks.record(nsid, slba, data)
                    written.append((nsid, slba, nlb))
                for nsid, slba, nlb in written:
                    lbs = drv.lba_size(nsid)
                    comp, _d, _m = drv.io_md(READ, nsid, slba, nlb, data_len=nlb * lbs, prinfo=PRACT | ALL,
                                             ref=_ref(nsid, slba), app=APP)
                    assert comp.ok, hex(comp.status)
                self.done.release()
        except BaseException as exc:
            self.error = exc
            self.done.release()


def test_pi_namespaces_migrate_between_processes(tmp_path, process_host):
    host = process_host(tmp_path, _config(tmp_path), io_queues=1, io_depth=64, aers=1)
    dst = host.destination("b")
    drv = host.drv
    assert (drv.namespaces[1].ms, drv.namespaces[2].ms) == (8, 16)
    work = Workload(host.machine, drv, rounds=6)
    host.listening(dst)
    work.start()
    for _ in range(3):
        assert work.done.acquire(timeout=60)
        assert work.error is None, work.error
    report = host.device.migrate(dst.incoming, timeout=20)
    work.join(120)
    assert work.error is None, work.error
    assert host.device.info["pid"] == dst.pid
    # RAM + the mem namespace's data and metadata memfds + 3 MSI-X eventfds + INTx
    assert report["fds"] == 7, report
    assert work.blocks.verify_all() == sum(i.nsze for i in drv.namespaces.values())
    host.close_machine()
    assert host.src.proc.wait(10) == 0


@pytest.mark.parametrize("pi", [1, 3])
def test_restore_changes_the_destination_format(pi):
    """A destination configured without PI takes the source's Format NVM result."""
    src = NvmeController("serial=FMT,ns=mem:size=1M")
    dst = NvmeController("serial=FMT,ns=mem:size=1M")
    try:
        src.allocated[1].format(2, 0, pi, 1, 0)
        st = src.get_device_state()
        dst.check_device_state(st)
        dst.set_device_state(st)
        ns = dst.allocated[1]
        assert (ns.lbaf, ns.ms, ns.pi, ns.pil) == (2, 8, pi, 1)
        assert ns.meta is not None
    finally:
        src.close()
        dst.close()


def test_handover_offers_the_metadata_sidecar(tmp_path):
    ctrl = NvmeController(f"ns=file:path={tmp_path}/h.img,size=1M,lbaf=2,pi=1")
    try:
        fds = ctrl.inheritable_fds()
        assert image_key(f"{tmp_path}/h.img", read_only=False) in fds
        assert image_key(f"{tmp_path}/h.img.nvme-meta", read_only=False) in fds
    finally:
        ctrl.close()


def test_a_formatted_file_namespace_keeps_its_metadata_when_the_destination_config_differs(tmp_path):
    """The destination is built from a spec naming another format than the source's last
    Format NVM: it must not touch the sidecar the source still uses, and takes the source's
    format (and metadata) at the restore."""
    h = Host(f"serial=MIGFMT,ns=file:path={tmp_path}/f.img,size=1M,lbaf=2,pi=1", io_queues=1)
    try:
        drv = h.drv
        drv.admin(0x80, nsid=1, cdw10=3 | 1 << 5)  # LBAF 3 (4096+8), PI type 1
        drv.scan_namespaces()
        data = os.urandom(4 * 4096)
        assert drv.io_md(WRITE, 1, 8, 4, data=data, prinfo=PRACT, ref=8, app=APP)[0].ok
        h.migrate()
        ns = h.ctrl.allocated[1]
        assert (ns.lbaf, ns.pi, ns.meta.kind) == (3, 1, "file")
        comp, back, _m = drv.io_md(READ, 1, 8, 4, data_len=len(data), prinfo=PRACT | ALL, ref=8, app=APP)
        assert comp.ok and back == data
        comp, _d, meta = drv.io_md(READ, 1, 8, 4, data_len=len(data), meta_len=32)
        assert comp.ok
        assert [meta[i * 8 + 4:i * 8 + 8] for i in range(4)] == [(8 + i).to_bytes(4, "big") for i in range(4)]
    finally:
        h.close()
