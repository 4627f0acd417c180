"""Namespaces created, deleted, attached or detached by Namespace Management migrate
(pcidev_nvme.ns_records, the ``nvme/ns-management`` subsection of the ``nvme`` section).

The source deletes a configured namespace, creates namespaces (one of them on the NSID
the deleted one freed, one with an extended-LBA PI format, one left detached), detaches
and attaches, and writes data recorded per block (crc32c). After the migration (in
process, and between processes over UNIX) every block of every namespace reads back the
same through the host (the PI checked by the controller), Identify (CNS 00h, 02h, 03h,
10h, 11h, and the capacities of 01h) answers the same, the per-namespace state (SMART
counters, error recovery, Write Uncorrectable marks, the Changed Namespace List) is the
source's, and Namespace Management goes on working on the destination. Hostile records
are refused with a StateError naming the field and change nothing; a stream without the
subsection still loads; a load that fails late puts the table back."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import time
import uuid

import attrs
import crc32c
import pytest
from test_migration_nvme import namespace_crcs
from test_virtualization import Host as SriovHost
from test_virtualization import _repoint, _verify, _workload

from pcidev.host import Machine
from pcidev.migration import (
    VMStateSnapshot,
    device_blockers,
    load_device,
    load_device_stream,
    save_device,
    save_device_stream,
)
from pcidev.transport.vfio_user.handover import control_path, request_handover
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev.vmstate import Section
from pcidev.vmstate.errors import StateError
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.migration import NvmeState
from pcidev_nvme.ns_records import CreatedNamespaceRecord
from pcidev_nvme.testing.driver import NvmeDriver

NS_MGMT, NS_ATTACH, WRITE_UNC = 0x0D, 0x15, 0x04
CTRL_LIST = struct.pack("<HH", 1, 0)
READ, WRITE = 0x02, 0x01
PRACT, PRCHK = 8, 7
#: configured: 1 mem, 2 mem (deleted by the test), 3 null (detached by the test)
CFG = "max_ioqpairs=2,msix_vectors=3,ns=mem:size=1M,ns=mem:size=1M,ns=null:size=1M,capacity=16M,max_namespaces=8"


def ns_data(nsze: int, flbas: int = 0, dps: int = 0) -> bytes:
    buf = bytearray(4096)
    struct.pack_into("<QQ", buf, 0, nsze, nsze)
    buf[26], buf[29] = flbas, dps
    return bytes(buf)


def create(drv: NvmeDriver, nsze: int, **kw) -> int:
    return drv.admin(NS_MGMT, cdw10=0, data=ns_data(nsze, **kw)).dw0


def attach(drv: NvmeDriver, nsid: int, *, detach: bool = False) -> None:
    drv.admin(NS_ATTACH, nsid=nsid, cdw10=int(detach), data=CTRL_LIST)


class Blocks:
    """Every block written, by its crc32c; reads back every block of every attached
    namespace (zeros where nothing was written), a PI namespace with every PI check."""

    def __init__(self, drv: NvmeDriver) -> None:
        self.drv = drv
        self.crc: dict[tuple[int, int], int] = {}
        #: blocks marked by Write Uncorrectable: a read of one fails with Unrecovered Read Error
        self.marked: set[tuple[int, int]] = set()
        self.rnd = random.Random(11)

    def mark(self, nsid: int, slba: int, nlb: int) -> None:
        assert self.drv.write_uncorrectable(nsid, slba, nlb).ok
        for i in range(nlb):
            self.marked.add((nsid, slba + i))
            self.crc.pop((nsid, slba + i), None)

    def write(self, nsid: int, count: int = 24) -> None:
        drv = self.drv
        info = drv.namespaces[nsid]
        lbs = info.lba_size
        for _ in range(count):
            nlb = self.rnd.choice([1, 2, 4])
            slba = self.rnd.randrange(0, info.nsze - nlb)
            data = os.urandom(nlb * lbs)
            if info.pi:
                comp, _d, _m = drv.io_md(WRITE, nsid, slba, nlb, data=data, prinfo=PRACT, ref=slba)
                assert comp.ok, comp
            else:
                drv.write(nsid, slba, data)
            for i in range(nlb):
                self.crc[(nsid, slba + i)] = crc32c.crc32c(data[i * lbs:(i + 1) * lbs])
                self.marked.discard((nsid, slba + i))  # (a write clears the mark)

    def _read_marked(self, nsid: int, slba: int, n: int) -> list[bytes | None]:
        """Block by block, around the marked blocks (whose reads must fail)."""
        out: list[bytes | None] = []
        for lba in range(slba, slba + n):
            comp, raw, _m = self.drv.io_md(READ, nsid, lba, 1, data_len=self.drv.namespaces[nsid].lba_size)
            if (nsid, lba) in self.marked:
                assert comp.code == 0x281, comp  # Unrecovered Read Error
                out.append(None)
            else:
                assert comp.ok, comp
                out.append(raw)
        return out

    def verify(self) -> int:
        drv = self.drv
        checked, bad = 0, []
        for nsid, info in sorted(drv.namespaces.items()):
            lbs, step = info.lba_size, 16
            zero = crc32c.crc32c(bytes(lbs))
            for slba in range(0, info.nsze, step):
                n = min(step, info.nsze - slba)
                if any((nsid, lba) in self.marked for lba in range(slba, slba + n)):
                    blocks = self._read_marked(nsid, slba, n)
                elif info.pi:  # extended LBAs: data + 8 bytes of PI per block
                    comp, raw, _m = drv.io_md(READ, nsid, slba, n, data_len=n * (lbs + info.ms))
                    assert comp.ok, comp
                    blocks = [raw[i * (lbs + info.ms):i * (lbs + info.ms) + lbs] for i in range(n)]
                else:
                    data = drv.read(nsid, slba, n)
                    blocks = [data[i * lbs:(i + 1) * lbs] for i in range(n)]
                for i, b in enumerate(blocks):
                    if b is not None and crc32c.crc32c(b) != self.crc.get((nsid, slba + i), zero):
                        bad.append((nsid, slba + i))
                    checked += 1
        # the written blocks of PI namespaces once more, with Guard, Application and Reference Tag checks
        for (nsid, lba) in sorted(self.crc):
            info = drv.namespaces.get(nsid)
            if info is not None and info.pi:
                comp, _raw, _m = drv.io_md(READ, nsid, lba, 1, data_len=info.lba_size + info.ms, prinfo=PRCHK,
                                           ref=lba)
                assert comp.ok, (nsid, lba, comp)
        assert not bad, f"{len(bad)} blocks differ, first {bad[:5]}"
        return checked

    def forget(self, nsid: int) -> None:
        self.crc = {k: v for k, v in self.crc.items() if k[0] != nsid}


def open_fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def identify_all(drv: NvmeDriver) -> dict[str, bytes]:
    """What Identify says about the namespaces: CNS 02h, 10h, 00h / 03h per active NSID,
    11h per allocated NSID, and Identify Controller's capacities (TNVMCAP, UNVMCAP) and NN."""
    out = {"02": drv.identify(0x02), "10": drv.identify(0x10)}
    ctrl = drv.identify(0x01)
    out["01"] = ctrl[280:312] + ctrl[516:520]
    for nsid in (n for n in struct.unpack("<1024I", out["02"]) if n):
        out[f"00/{nsid}"] = drv.identify(0x00, nsid=nsid)
        out[f"03/{nsid}"] = drv.identify(0x03, nsid=nsid)
    for nsid in (n for n in struct.unpack("<1024I", out["10"]) if n):
        out[f"11/{nsid}"] = drv.identify(0x11, nsid=nsid)
    return out


def namespace_management(drv: NvmeDriver) -> dict[str, int]:
    """The changes the tests make; returns the NSIDs created."""
    drv.admin(NS_MGMT, nsid=2, cdw10=1)  # configured namespace 2 deleted: NSID 2 is free
    a = create(drv, 256, flbas=1)  # 256 x 4 KiB: takes NSID 2
    pi = create(drv, 2048, flbas=0x12, dps=0x9)  # LBAF 2 (512+8), extended LBAs, PI type 1 first
    idle = create(drv, 512)  # 512 x 512 B, never attached
    assert (a, pi, idle) == (2, 4, 5)
    attach(drv, a)
    attach(drv, pi)
    attach(drv, a, detach=True)  # detached and attached again
    attach(drv, a)
    attach(drv, 3, detach=True)  # a configured namespace detached
    drv.scan_namespaces()
    assert sorted(drv.namespaces) == [1, 2, 4]
    info = drv.namespaces[pi]
    assert (info.lba_size, info.ms, info.extended, info.pi, info.pil) == (512, 8, True, 1, True)
    return {"a": a, "pi": pi, "idle": idle}


def per_namespace_state(drv: NvmeDriver, nsids) -> dict:
    """SMART log per namespace, error recovery per namespace, the Changed Namespace List (kept: RAE)."""
    out = {}
    for nsid in nsids:
        smart = drv.get_log(0x02, 512, nsid=nsid)
        out[f"smart/{nsid}"] = smart[32:96]  # data units and commands read/written
        out[f"tler/{nsid}"] = drv.get_features(0x05, nsid=nsid).dw0
    out["changed"] = drv.get_log(0x04, 4096, rae=True)
    return out


# ----------------------------------------------------------------------------- in process
def test_created_deleted_attached_namespaces_migrate_in_process(hosts):
    h = hosts(f"serial=NSM1,{CFG}", io_queues=2, aers=1)
    drv = h.drv
    made = namespace_management(drv)
    a, pi = made["a"], made["pi"]
    assert device_blockers(h.ctrl) == []  # no longer a blocker
    blocks = Blocks(drv)
    for nsid in (1, a, pi):
        blocks.write(nsid)
    drv.set_features(0x05, 0x10007, nsid=a)  # error recovery of a created namespace: TLER 7, DULBE
    blocks.mark(a, 200, 2)  # Write Uncorrectable on a created namespace
    ident = identify_all(drv)
    state = per_namespace_state(drv, (1, a, pi))
    assert struct.unpack("<6I", ident["10"][:24]) == (1, 2, 3, 4, 5, 0)  # allocated: 3 detached, 5 never attached
    assert struct.unpack("<4I", ident["02"][:16]) == (1, 2, 4, 0)  # active
    assert struct.unpack_from("<Q", ident["11/5"], 0)[0] == 512

    dst = h.migrate()  # namespace_crcs of every block compared at the stop and after the load
    assert dst.created.keys() == {a, pi, 5}
    assert sorted(dst.allocated) == [1, 2, 3, 4, 5] and sorted(dst.namespaces) == [1, 2, 4]
    assert dst.allocated[2] is not dst.configured[2]
    assert identify_all(drv) == ident
    assert per_namespace_state(drv, (1, a, pi)) == state
    assert drv.get_features(0x05, nsid=a).dw0 == 0x10007
    comp, _d, _m = drv.io_md(READ, a, 200, 1, data_len=4096)
    assert comp.code == 0x281  # Unrecovered Read Error: the mark travelled
    comp, _d, _m = drv.io_md(READ, a, 100, 1, data_len=4096)
    assert comp.code == 0x287 or (a, 100) in blocks.crc  # DULBE travelled: an unwritten block is an error
    drv.set_features(0x05, 7, nsid=a)  # (DULBE off: the read-back below reads unwritten blocks)
    for nsid in (1, pi):
        blocks.write(nsid, 8)
    assert blocks.verify() == 256 + 2048 + 2048

    # Namespace Management on the destination: delete and create again
    drv.admin(NS_MGMT, nsid=5, cdw10=1)
    assert create(drv, 128, flbas=1) == 5
    attach(drv, 5)
    drv.admin(NS_MGMT, nsid=a, cdw10=1)
    blocks.forget(a)
    assert create(drv, 64, flbas=1) == 2
    attach(drv, 2)
    drv.scan_namespaces()
    for nsid in (2, 5):
        blocks.write(nsid, 8)
    checked = blocks.verify()
    # and the destination migrates on: its table travels as it is now
    crcs = namespace_crcs(h.ctrl)
    ident = identify_all(drv)
    h.migrate()
    assert namespace_crcs(h.ctrl) == crcs and identify_all(drv) == ident
    assert blocks.verify() == checked


def test_an_old_stream_without_the_subsection_still_loads(hosts):
    h = hosts(f"serial=NSM2,{CFG}", io_queues=1)
    blocks = Blocks(h.drv)
    blocks.write(1)
    h.ctrl.quiesce()
    snap = save_device(h.ctrl)
    st = snap.sections[1].state
    assert st.ns_management is None  # nothing changed: the subsection is left out
    dst = NvmeController(h.ctrl.cfg, name="old")
    try:
        res = load_device(dst, snap)
        res.close()
        assert namespace_crcs(dst) == namespace_crcs(h.ctrl)
    finally:
        dst.close()
        h.ctrl.resume()


# ----------------------------------------------------------------------------- hostile records
def _with_state(snap: VMStateSnapshot, state: NvmeState) -> VMStateSnapshot:
    fs, _ = snap.sections
    return attrs.evolve(snap, sections=(fs, Section("nvme", 0, state)))


def _records(st: NvmeState, **kw) -> NvmeState:
    return attrs.evolve(st, ns_management=attrs.evolve(st.ns_management, **kw))


def _bad_states(st: NvmeState, tmp_path):
    ch = st.ns_management
    created = list(ch.created)
    first = created[0]

    def with_record(j: int, **kw) -> NvmeState:
        return _records(st, created=tuple(attrs.evolve(r, **kw) if i == j else r for i, r in enumerate(created)))

    yield "ns_management.created[0].nsid", with_record(0, nsid=99)  # beyond max_namespaces (8)
    yield "ns_management.created[1].nsid", with_record(1, nsid=first.nsid)  # the same NSID twice
    yield "ns_management.created[0].nsid", _records(st, deleted=())  # NSID 2 is configured and not deleted
    yield "ns_management.created[0].size", with_record(0, size=1 << 40)  # more than the capacity
    yield "ns_management.created[0].size", with_record(0, size=4097)
    yield "ns_management.created[0].kind", with_record(0, kind="exotic")
    yield "ns_management.created[0].path", with_record(0, path="/etc/passwd")  # a mem namespace with a path
    yield "ns_management.created", _records(st, created=tuple(
        attrs.evolve(r, size=8 << 20) for r in created))  # each fits, all together do not (16 MiB)
    yield "ns_management.deleted[0]", _records(st, deleted=(7,))  # not a configured namespace
    yield "ns_management.deleted[1]", _records(st, deleted=(2, 2))
    yield "namespaces", _records(st, created=tuple(created[:-1]))  # namespace 5 in the list, no record
    yield "namespaces[3].lbaf", attrs.evolve(st, namespaces=tuple(  # an unknown format for created namespace 4
        attrs.evolve(n, lbaf=15) if n.nsid == 4 else n for n in st.namespaces))
    missing = CreatedNamespaceRecord(nsid=6, kind="file", size=1 << 20, nguid=bytes(16), eui64=bytes(8),
                                     uuid=bytes(16), path=str(tmp_path / "nowhere.img"))
    yield "ns_management.created[3].path", _records(st, created=(*created, missing))
    (tmp_path / "small.img").write_bytes(bytes(4096))
    yield "ns_management.created[3].path", _records(st, created=(*created, attrs.evolve(
        missing, path=str(tmp_path / "small.img"))))
    ok = tmp_path / "ok.img"
    ok.write_bytes(b"")
    os.truncate(ok, 1 << 20)
    # an image of the right size, but not one this controller's Namespace Management creates
    # (this one has no state directory at all: reviewG finding 3)
    yield "ns_management.created[3].path", _records(st, created=(
        *created, attrs.evolve(missing, path=str(ok)), attrs.evolve(missing, nsid=7, path=str(ok))))


def test_hostile_records_are_refused_and_change_nothing(hosts, tmp_path):
    h = hosts(f"serial=NSM3,{CFG}", io_queues=1)
    namespace_management(h.drv)
    h.ctrl.quiesce()
    snap = save_device(h.ctrl)
    st = snap.sections[1].state
    assert [r.nsid for r in st.ns_management.created] == [2, 4, 5] and st.ns_management.deleted == (2,)
    dst = NvmeController(h.ctrl.cfg, name="victim")
    try:
        table = dict(dst.allocated)
        backends = {n: ns.backend for n, ns in table.items()}
        before = dst.get_device_state()
        fds = open_fds()
        seen = []
        for path, bad in _bad_states(st, tmp_path):
            with pytest.raises(StateError) as info:
                load_device(dst, _with_state(snap, bad))
            assert info.value.section == "nvme" and info.value.path == path, (path, str(info.value))
            with pytest.raises(StateError):  # the same through an encoded stream
                load_device_stream(dst, _with_state(snap, bad).to_bytes(), list(snap.fds))
            assert dst.allocated == table and {n: ns.backend for n, ns in dst.allocated.items()} == backends
            assert dst.created == {} and sorted(dst.namespaces) == [1, 2, 3]
            assert dst.get_device_state().namespaces == before.namespaces
            seen.append(path)
        assert len(seen) == 15
        assert open_fds() == fds  # nothing a refused load opened stays open
        res = load_device(dst, snap)  # the good one still loads
        res.close()
        assert sorted(dst.allocated) == [1, 2, 3, 4, 5] and namespace_crcs(dst) == namespace_crcs(h.ctrl)
    finally:
        dst.close()
        h.ctrl.resume()


def test_a_load_failing_late_puts_the_namespace_table_back(hosts, monkeypatch):
    """The load deleted configured namespace 2 and created three; a later part of the apply
    fails: the framework's rollback deletes the created ones and puts back the deleted one,
    with its data (crc32c per block through the host)."""
    h = hosts(f"serial=NSM4,{CFG}", io_queues=1)
    namespace_management(h.drv)
    h.ctrl.quiesce()
    snap = save_device(h.ctrl)
    h.ctrl.resume()
    dhost = hosts(f"serial=NSM4,{CFG}", io_queues=1)
    drv, dst = dhost.drv, dhost.ctrl
    blocks = Blocks(drv)
    for nsid in (1, 2):
        blocks.write(nsid)
    ident = identify_all(drv)
    dst.quiesce()
    table = dict(dst.allocated)
    calls = []
    real = dst.selftest.restore

    def fail_once(state):
        calls.append(state)
        if len(calls) == 1:
            assert sorted(dst.allocated) == [1, 2, 3, 4, 5]  # the table had changed
            raise RuntimeError("injected")
        real(state)

    monkeypatch.setattr(dst.selftest, "restore", fail_once)
    fds = open_fds()
    with pytest.raises(StateError, match="injected"):
        load_device(dst, snap)
    assert len(calls) == 2  # the load, then the rollback
    assert open_fds() == fds  # the namespaces the load created are closed
    assert dst.allocated == table and dst.created == {} and dst.configured[2] is dst.allocated[2]
    assert dst.fsm_state != "failed"
    dst.resume()
    assert identify_all(drv) == ident
    assert blocks.verify() == 2048 + 2048 + 2048


# ----------------------------------------------------------------------------- file namespaces
def _state_file_aside(state_dir, tmp_path) -> None:
    """Move the state file of ``state_dir`` away: a destination made now sharing the state
    directory does not bring the created namespaces back from it (an older copy)."""
    for f in state_dir.glob("*.state"):
        os.rename(f, tmp_path / f"{f.name}.aside")


def test_created_file_namespace_is_reopened_by_path(hosts, tmp_path):
    """ns_create=file: the image travels by path. A destination whose state file brought the
    namespace back keeps it; one without (another state directory) reopens the image the
    record names; one where the image is gone refuses, and the source's blocker list names
    an image whose path no longer leads to it."""
    src_dir, other = tmp_path / "src", tmp_path / "other"
    src_dir.mkdir()
    other.mkdir()
    h = hosts(f"serial=NSM5,state_dir={src_dir},ns_create=file,{CFG}", io_queues=1)
    drv = h.drv
    made = namespace_management(drv)
    images = sorted(src_dir.glob("*.img"))
    assert len(images) == 3
    blocks = Blocks(drv)
    for nsid in (1, made["a"], made["pi"]):
        blocks.write(nsid)
    ident = identify_all(drv)
    assert device_blockers(h.ctrl) == []
    # a destination with the same state directory: its state file restored the namespaces
    h.ctrl.quiesce()
    snap = save_device(h.ctrl)
    rec = {r.nsid: r for r in snap.sections[1].state.ns_management.created}
    assert rec[2].kind == "file" and os.path.samefile(rec[2].path, h.ctrl.allocated[2].backend.path)
    same = NvmeController(h.ctrl.cfg, name="same-dir")
    try:
        # (NSID 2 is configured: at power-on the configured namespace wins, as at a restart)
        assert sorted(same.created) == [4, 5]
        kept = dict(same.allocated)
        load_device(same, snap).close()
        assert all(same.allocated[n] is kept[n] for n in (4, 5))  # kept, not rebuilt
        assert same.allocated[2] is not kept[2] and same.created[2].startswith("file:")
        assert namespace_crcs(same) == namespace_crcs(h.ctrl)
    finally:
        same.close()
    h.ctrl.resume()
    # another state directory: refused, nothing touched there or beside the images (the
    # images are not the ones this controller's Namespace Management creates)
    elsewhere = NvmeController(attrs.evolve(h.ctrl.cfg, state_dir=str(other)), name="other-dir")
    try:
        beside = sorted(os.listdir(src_dir))
        with pytest.raises(StateError, match="is not the one Namespace Management creates here") as info:
            load_device(elsewhere, snap)
        assert info.value.path.startswith("ns_management.created[")
        assert sorted(elsewhere.allocated) == [1, 2, 3] and elsewhere.created == {}
        assert sorted(os.listdir(src_dir)) == beside and list(other.glob("*.img*")) == []
    finally:
        elsewhere.close()
    # the same state directory, its state file without them (it is older): the images are
    # reopened by the records' paths
    _state_file_aside(src_dir, tmp_path)
    dst = h.migrate()
    assert sorted(dst.created) == [2, 4, 5] and all(dst.created[n].startswith("file:") for n in (2, 4, 5))
    assert identify_all(drv) == ident
    assert blocks.verify() == 256 + 2048 + 2048
    blocks.write(made["pi"], 4)
    assert blocks.verify() == 256 + 2048 + 2048
    assert sorted(src_dir.glob("*.img")) == images  # nothing created: reopened
    # the destination's state file remembers them (a restart brings them back)
    dst.save_state()
    again = NvmeController(dst.cfg, name="restart")
    try:  # (as on the source: a restart brings the configured namespace 2 back, not the created one)
        assert sorted(again.created) == [4, 5]
    finally:
        again.close()
    # an image renamed away: the source side reports it before anything stops
    moved = tmp_path / "moved.img"
    os.rename(dst.allocated[5].backend.path, moved)
    reasons = device_blockers(dst)
    assert len(reasons) == 1 and "namespace 5 (created by Namespace Management)" in reasons[0], reasons
    os.rename(moved, dst.allocated[5].backend.path)
    assert device_blockers(dst) == []


def test_created_file_namespace_with_other_identifiers_is_refused_at_build(hosts, tmp_path):
    """The image the record names carries other identifiers here (its identity file was
    rewritten): the apply's first step refuses before anything changed."""
    src_dir, other = tmp_path / "src", tmp_path / "other"
    src_dir.mkdir()
    other.mkdir()
    h = hosts(f"serial=NSM6,state_dir={src_dir},ns_create=file,{CFG}", io_queues=1)
    drv = h.drv
    nsid = create(drv, 256, flbas=1)
    attach(drv, nsid)
    h.ctrl.quiesce()
    snap = save_device(h.ctrl)
    h.ctrl.resume()
    ids = h.ctrl.allocated[nsid].backend.identity_path
    text = open(ids).read()
    nguid = h.ctrl.allocated[nsid].nguid.hex()
    _state_file_aside(src_dir, tmp_path)
    dst = NvmeController(h.ctrl.cfg, name="victim")
    try:
        table = dict(dst.allocated)
        with open(ids, "w") as f:
            f.write(text.replace(nguid, "ab" * 16))
        with pytest.raises(StateError, match="differs from the source's in nguid") as info:
            load_device(dst, snap)
        assert info.value.path == "ns_management.created[0]"
        assert dst.allocated == table and dst.created == {}
        with open(ids, "w") as f:
            f.write(text)
        load_device(dst, snap).close()
        assert sorted(dst.allocated) == [1, 2, 3, 4]
    finally:
        dst.close()


def test_a_record_naming_a_file_that_is_not_this_controllers_image_is_refused_untouched(hosts, tmp_path):
    """Review G, finding 3: a created-namespace record naming another file of the right size
    (another VM's image, with its identifiers known, or a symbolic link named like this
    controller's image) is refused before anything is opened or written: no identity file
    appears beside it, it is not adopted (so the guest's Namespace Delete cannot unlink it)."""
    src_dir, elsewhere = tmp_path / "src", tmp_path / "someone-elses-vm"
    src_dir.mkdir()
    elsewhere.mkdir()
    h = hosts(f"serial=NSM9,state_dir={src_dir},ns_create=file,{CFG}", io_queues=1)
    nsid = create(h.drv, 256, flbas=1)
    attach(h.drv, nsid)
    h.ctrl.quiesce()
    snap = save_device(h.ctrl)
    h.ctrl.resume()
    st = snap.sections[1].state
    rec = st.ns_management.created[0]
    victim = elsewhere / "disk.img"
    content = os.urandom(4096) * (rec.size // 4096)
    victim.write_bytes(content)
    ns = h.ctrl.allocated[nsid]
    victim_ids = elsewhere / "disk.img.nvme-ids"
    mine = src_dir / f"nvme-NSM9-ns{nsid}.img"
    assert rec.path == str(mine)
    _state_file_aside(src_dir, tmp_path)
    dst = NvmeController(h.ctrl.cfg, name="dst")
    try:
        table = dict(dst.allocated)
        for label, bad in (("a file elsewhere", attrs.evolve(rec, path=str(victim))),
                           ("elsewhere, identifiers known", attrs.evolve(rec, path=str(victim)))):
            if label.endswith("known"):  # (the identifiers of the victim's namespace)
                victim_ids.write_text(open(ns.backend.identity_path).read())
            with pytest.raises(StateError, match="is not the one Namespace Management creates here") as info:
                load_device(dst, _with_state(snap, _records(st, created=(bad,))))
            assert info.value.path == "ns_management.created[0].path", label
            assert dst.allocated == table and dst.created == {}
        assert sorted(p.name for p in elsewhere.iterdir()) == ["disk.img", "disk.img.nvme-ids"]
        victim_ids.unlink()
        # a symbolic link where this controller's image would be, to the victim
        os.rename(mine, tmp_path / "real.img")
        os.symlink(victim, mine)
        with pytest.raises(StateError, match="not a regular file"):
            load_device(dst, snap)
        assert dst.allocated == table and dst.created == {}
        # the real image back: it loads
        os.unlink(mine)
        os.rename(tmp_path / "real.img", mine)
        load_device(dst, snap).close()
        assert sorted(dst.allocated) == [1, 2, 3, nsid] and dst.allocated[nsid].backend.path == str(mine)
    finally:
        dst.close()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["disk.img"] and victim.read_bytes() == content


def _tree(d) -> dict[str, tuple[int, int, str]]:
    """Every regular file of directory ``d``: size, modification time and SHA-256."""
    out = {}
    for p in sorted(d.iterdir()):
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            continue
        out[p.name] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def test_a_refused_load_writes_nothing_in_the_destinations_state_dir(hosts, tmp_path, monkeypatch):
    """Status item 6: the destination builds the created ``file`` namespaces with the
    records' identifiers and writes an identity file (``.nvme-ids``) only once the load is
    accepted (its resume). A load refused late (a later part fails: rolled back) or at its
    build (an identity file with other identifiers) leaves the state directory byte for byte
    as it was -- identity files, metadata and Write Uncorrectable sidecars, images; an
    accepted one writes nothing before the resume, and the identity file it writes then
    holds the source's identifiers (a restart keeps them)."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    h = hosts(f"serial=NSMA,state_dir={src_dir},ns_create=file,{CFG}", io_queues=1)
    made = namespace_management(h.drv)
    a, pi, idle = made["a"], made["pi"], made["idle"]
    blocks = Blocks(h.drv)
    for nsid in (1, a, pi):
        blocks.write(nsid)
    blocks.mark(a, 10, 2)  # a Write Uncorrectable sidecar beside a's image
    src = h.ctrl
    src.quiesce()
    snap = save_device(src)
    crcs = namespace_crcs(src)
    rec = {r.nsid: r for r in snap.sections[1].state.ns_management.created}
    idle_ids = src.allocated[idle].backend.identity_path
    pi_ids = src.allocated[pi].backend.identity_path
    src.owns_state = False  # (it stays quiesced; the destination owns the state file)
    os.unlink(idle_ids)  # the idle namespace's identity file is missing here
    _state_file_aside(src_dir, tmp_path)
    dst = NvmeController(src.cfg, name="dst")
    try:
        table = dict(dst.allocated)
        before = _tree(src_dir)
        assert any(n.endswith(".nvme-meta") for n in before) and any(n.endswith(".nvme-wu") for n in before)
        # refused late: a later part of the apply fails, the rollback puts the table back
        real, calls = dst.selftest.restore, []

        def fail_once(state):
            calls.append(state)
            if len(calls) == 1:
                raise RuntimeError("injected")
            real(state)

        monkeypatch.setattr(dst.selftest, "restore", fail_once)
        with pytest.raises(StateError, match="injected"):
            load_device(dst, snap)
        assert dst.allocated == table and dst.created == {}
        assert _tree(src_dir) == before
        # refused at the build: the pi namespace's identity file holds other identifiers
        text = open(pi_ids).read()
        with open(pi_ids, "w") as f:
            f.write(text.replace(rec[pi].nguid.hex(), "ab" * 16))
        changed = _tree(src_dir)
        with pytest.raises(StateError, match="differs from the source's in nguid"):
            load_device(dst, snap)
        assert _tree(src_dir) == changed and dst.allocated == table
        with open(pi_ids, "w") as f:
            f.write(text)
        before = _tree(src_dir)
        # accepted: nothing written until the resume, then the missing identity file
        load_device(dst, snap).close()
        assert namespace_crcs(dst) == crcs
        assert _tree(src_dir) == before and not os.path.exists(idle_ids)
        dst.resume()
        stored = json.loads(open(idle_ids).read())
        assert (stored["nguid"], stored["eui64"], stored["uuid"]) == (
            rec[idle].nguid.hex(), rec[idle].eui64.hex(), str(uuid.UUID(bytes=rec[idle].uuid)))
        assert open(pi_ids).read() == text
        dst.save_state()
    finally:
        dst.close()
    again = NvmeController(src.cfg, name="restart")
    try:
        assert sorted(again.created) == [pi, idle]
        for nsid in (pi, idle):
            ns = again.allocated[nsid]
            assert (ns.nguid, ns.eui64, ns.uuid.bytes) == (rec[nsid].nguid, rec[nsid].eui64, rec[nsid].uuid)
        assert namespace_crcs(again)[pi] == crcs[pi]
    finally:
        again.close()


# ----------------------------------------------------------------------------- between processes
def test_namespace_management_migrates_between_processes(tmp_path, process_host):
    host = process_host(tmp_path, f"serial=NSMP,{CFG}", io_queues=2, io_depth=64)
    drv = host.drv
    made = namespace_management(drv)
    blocks = Blocks(drv)
    for nsid in (1, made["a"], made["pi"]):
        blocks.write(nsid)
    ident = identify_all(drv)
    for hop in range(2):
        dest = host.destination(f"d{hop}", listening=True)
        report = host.device.migrate(dest.incoming, timeout=20)
        assert host.device.info["pid"] == dest.pid
        # RAM, the memfds of namespaces 1 and of the created 2, 4 (and its metadata) and 5,
        # 3 MSI-X eventfds, INTx
        assert report["fds"] == 10, report
        assert identify_all(drv) == ident
        assert blocks.verify() == sum(i.nsze for i in drv.namespaces.values())
        if hop == 0:  # Namespace Management on the destination, then on to the next
            drv.admin(NS_MGMT, nsid=5, cdw10=1)
            assert create(drv, 128, flbas=1) == 5
            attach(drv, 5)
            drv.scan_namespaces()
            blocks.write(5, 8)
            blocks.write(made["pi"], 8)
            ident = identify_all(drv)
    assert blocks.verify() == 256 + 2048 + 2048 + 128
    host.close_machine()
    assert host.src.proc.wait(10) == 0 and host.src.wait_event("exit")["reason"] == "migrated"


# ----------------------------------------------------------------------------- handovers
def _user_files_config(d) -> str:
    """Two configured ``file`` namespaces on the user's images, Namespace Management
    creating ``file`` namespaces in the state directory ``d``."""
    return (f"serial=NSMH,state_dir={d},ns_create=file,max_ioqpairs=2,msix_vectors=3,"
            f"ns=file:path={d}/user1.img,size=1M,ns=file:path={d}/user2.img,size=1M,"
            "capacity=16M,max_namespaces=8")


def _delete_and_recreate_two(drv: NvmeDriver, blocks: Blocks, d) -> dict[str, tuple[int, int, str]]:
    """The guest writes both configured namespaces, deletes the configured namespace 2
    and creates a ``file`` namespace on NSID 2 (in the state directory), which it fills.
    Returns the user's second image as it is now (what must stay untouched)."""
    blocks.write(1)
    blocks.write(2)
    drv.flush(2)
    drv.admin(NS_MGMT, nsid=2, cdw10=1)
    blocks.forget(2)
    assert create(drv, 256, flbas=1) == 2  # 256 x 4 KiB on the freed NSID
    attach(drv, 2)
    drv.scan_namespaces()
    assert os.path.exists(d / "nvme-NSMH-ns2.img")
    blocks.write(2)
    blocks.write(1, 8)
    return {n: v for n, v in _tree(d).items() if n.startswith("user2.img")}


def _settled_identify(drv: NvmeDriver) -> dict[str, bytes]:
    """:func:`identify_all` once both namespaces are flushed (NUSE of a file image is its
    allocated size, which the file system settles at write-back: the stop's fdatasync)."""
    for nsid in (1, 2):
        drv.flush(nsid)
    return identify_all(drv)


def _serve(sock: str, spec: str, log) -> subprocess.Popen:
    from_env = dict(os.environ)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pcidev", "serve", "--vfio-user", sock, spec],
                                stdout=out, stderr=subprocess.STDOUT, env=from_env)
    deadline = time.monotonic() + 60
    while not (os.path.exists(sock) and os.path.exists(control_path(sock))):
        assert proc.poll() is None, open(log).read()
        assert time.monotonic() < deadline, "the server did not listen"
        time.sleep(0.02)
    return proc


def test_a_created_file_namespace_on_a_deleted_configured_nsid_survives_handovers(tmp_path):
    """Status item 6: configured namespace 2 is a ``file`` namespace on the user's image;
    the guest deletes it and Namespace Management creates a ``file`` namespace on NSID 2.
    A vfio-user handover builds the configured namespaces at power-on (the user's image
    opened again) before the load deletes NSID 2 and reopens the created image: every
    block reads back after each of two handovers, the user's image and its identity file
    are never written, and the created namespace keeps its identifiers."""
    d = tmp_path
    sock = str(d / "d.sock")
    spec = "nvme," + _user_files_config(d)
    proc = _serve(sock, spec, d / "serve.log")
    pids = [proc.pid]
    try:
        with Machine(ram_size=32 << 20) as machine, VfioUserDevice.connect(sock) as remote:
            drv = NvmeDriver(machine, machine.plug(remote), io_queues=2)
            drv.probe()
            blocks = Blocks(drv)
            user = _delete_and_recreate_two(drv, blocks, d)
            for _hop in range(2):
                ident = _settled_identify(drv)
                report = request_handover(control_path(sock))
                assert report["old_pid"] == pids[-1]
                pids.append(report["new_pid"])
                assert identify_all(drv) == ident
                assert blocks.verify() == 2048 + 256
                blocks.write(2, 8)
            drv.close()
        assert {n: v for n, v in _tree(d).items() if n.startswith("user2.img")} == user
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        proc.wait(20)


def test_a_created_file_namespace_on_a_deleted_configured_nsid_migrates_to_a_new_process(tmp_path, process_host):
    """The same over the device link to a new process (same machine, same state directory):
    the data of every block, the identifiers, and the user's image untouched."""
    host = process_host(tmp_path, _user_files_config(tmp_path), io_queues=2, io_depth=64)
    drv = host.drv
    blocks = Blocks(drv)
    user = _delete_and_recreate_two(drv, blocks, tmp_path)
    for hop in range(2):
        ident = _settled_identify(drv)
        dest = host.destination(f"d{hop}", listening=True)
        host.device.migrate(dest.incoming, timeout=30)
        assert host.device.info["pid"] == dest.pid
        assert identify_all(drv) == ident
        assert blocks.verify() == 2048 + 256
        blocks.write(2, 8)
    host.close_machine()
    assert {n: v for n, v in _tree(tmp_path).items() if n.startswith("user2.img")} == user


# ----------------------------------------------------------------------------- SR-IOV
def test_created_namespace_attached_to_a_secondary_migrates():
    """An SR-IOV primary deletes configured namespace 3 and creates another one in its place
    (NSID 3), attached to secondary controller 2 (VF 1): the VF's I/O on it goes on after the
    migration with every block verified, and the VFs' streams load against the new table."""
    h = SriovHost()
    try:
        h.drv.admin(NS_MGMT, nsid=3, cdw10=1)
        assert create(h.drv, 4096) == 3  # 4096 x 512 B, in place of the deleted one
        h.bring_up(0, 2)
        h.bring_up(1, 3)
        h.pdev.enable_sriov(2)
        drvs = [(h.drv, 1), (h.probe_vf(0), 2), (h.probe_vf(1), 3)]
        crcs: dict = {}
        _workload(h, drvs, crcs, 5)
        src = h.ctrl
        assert device_blockers(src) == []
        src.quiesce()
        data, fds = save_device_stream(src)
        dst = NvmeController(src.cfg, name="dst")
        h.closing.append(load_device_stream(dst, data, fds))
        assert dst.allocated[3] is not dst.configured[3] and dst.allocated[3].shared
        assert dst.virtualization.snapshot() == src.virtualization.snapshot()
        _repoint(h, dst)
        dst.resume()
        h.closing.append(src)
        h.ctrl = dst
        assert _verify(drvs, crcs) == 3 * 4096
        _workload(h, drvs, crcs, 6)
        assert _verify(drvs, crcs) == 3 * 4096
    finally:
        h.close()


def test_created_file_namespaces_migrate_over_tcp(tmp_path, process_host):
    """ns_create=file and file configured namespaces: nothing needs a descriptor, so the
    migration goes over TCP; the destination (same machine, same state directory) brings the
    created images back from the state file or reopens them by the records' paths."""
    images = []
    for name in ("a.img", "b.img"):
        images.append(tmp_path / name)
        images[-1].write_bytes(b"")
        os.truncate(images[-1], 1 << 20)
    opts = (f"serial=NSMT,state_dir={tmp_path},ns_create=file,max_ioqpairs=2,msix_vectors=3,"
            f"ns=file:path={images[0]},size=1M,ns=file:path={images[1]},size=1M,ns=null:size=1M,"
            "capacity=16M,max_namespaces=8")
    host = process_host(tmp_path, opts, io_queues=2, io_depth=64)
    drv = host.drv
    made = namespace_management(drv)
    assert len(list(tmp_path.glob("nvme-NSMT-ns*.img"))) == 3
    blocks = Blocks(drv)
    for nsid in (1, made["a"], made["pi"]):
        blocks.write(nsid)
    for nsid in (1, made["a"], made["pi"]):
        # NUSE of a file image is its allocated size (st_blocks), which the file system
        # settles at write-back: the stop's fdatasync would change it after this Identify
        drv.flush(nsid)
    ident = identify_all(drv)
    # started now: the identity files and the state file are written
    tcp = host.destination("t", "tcp", listening=True)
    report = host.device.migrate(tcp.incoming, timeout=20)
    assert report["fds"] == 0 and host.device.info["pid"] == tcp.pid
    assert identify_all(drv) == ident
    assert blocks.verify() == 2048 + 256 + 2048
    blocks.write(made["pi"], 8)
    assert blocks.verify() == 2048 + 256 + 2048
