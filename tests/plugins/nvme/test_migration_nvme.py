"""Live migration of the NVMe controller (section ``nvme``, pcidev_nvme.migration).

In-process round trips through the software host (save → fresh controller → load →
resume, the host then drives the destination) mid-I/O at QD 32 over several
namespaces and queues, with a full CQ, with outstanding AERs and a queued event,
SMART/error log/features/firmware preserved; malformed states refused with typed
errors leaving the destination untouched; blockers listing every reason. Every
migration compares the crc32c of every block of every namespace at the stop (source)
and after the load (destination), and the data-moving tests check every block through
the host after the migration too. The
cross-process test is in test_migration_nvme_process.py.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable

import attrs
import crc32c
import pytest

from pcidev.host import Machine
from pcidev.migration import (
    VMStateSnapshot,
    device_blockers,
    load_device,
    load_device_stream,
    save_device,
    save_device_stream,
)
from pcidev.vmstate import Section
from pcidev.vmstate.errors import ChecksumError, ConfigMismatchError, StateError, StreamError
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.migration import NvmeState
from pcidev_nvme.testing.driver import READ, WRITE, NvmeDriver

QD = 32


# ----------------------------------------------------------------------------- helpers
def namespace_crcs(ctrl: NvmeController) -> dict[int, list[int]]:
    """crc32c of every logical block of every namespace, read from the backends."""
    out = {}
    for nsid, ns in sorted(ctrl.allocated.items()):
        lbs, crcs = ns.lba_size, []
        for off in range(0, ns.size, 1 << 16):
            buf = bytearray(min(1 << 16, ns.size - off))
            ns.backend.readv([memoryview(buf)], off)
            crcs += [crc32c.crc32c(buf[i:i + lbs]) for i in range(0, len(buf), lbs)]
        out[nsid] = crcs
    return out


class Host:
    """A machine, a controller and a probed driver; ``migrate()`` moves the controller
    to a fresh one (same configuration) in this process and re-points the host at it.

    :param config: the controller's configuration, or a maker of controllers by name.
    """

    def __init__(self, config: str | Callable[[str], NvmeController], *, ram: int = 96 << 20,
                 **drv_kwargs) -> None:
        self.machine = Machine(ram_size=ram)
        self.ctrl = config("src") if callable(config) else NvmeController(config, name="src")
        self.pdev = self.machine.plug(self.ctrl)
        self.drv = NvmeDriver(self.machine, self.pdev, **drv_kwargs)
        self.drv.probe()
        self.old: list[NvmeController] = []
        self.resources: list = []
        self.sizes: list[int] = []

    def migrate(self) -> NvmeController:
        src = self.ctrl
        src.quiesce()
        before = namespace_crcs(src)  # every block, at the consistent point
        data, fds = save_device_stream(src)
        dst = NvmeController(src.cfg, name=f"dst{len(self.old)}")
        res = load_device_stream(dst, data, fds)
        assert namespace_crcs(dst) == before, "a block differs across the migration"
        self.resources.append(res)
        self.sizes.append(len(data))
        self.repoint(dst)
        dst.resume()
        return dst

    def repoint(self, dst: NvmeController) -> None:
        """The host drives ``dst`` from now on: its interrupts, and its BARs through the
        host's handle (the writes the handle held while the source was quiesced go to it)."""
        dst.irq.sink = self.pdev.recorder
        self.pdev.device = dst
        self.drv.device = dst
        self.old.append(self.ctrl)
        self.ctrl = dst

    def close(self) -> None:
        try:
            self.drv.close()
        except Exception:
            pass
        for c in (self.ctrl, *self.old):
            c.close()
        for r in self.resources:
            r.close()
        self.machine.close()


class Blocks:
    """Expected crc32c of every block of every namespace (absent: zeros)."""

    def __init__(self, drv: NvmeDriver) -> None:
        self.drv = drv
        self.crc: dict[tuple[int, int], int] = {}

    def record(self, nsid: int, slba: int, data: bytes) -> None:
        lbs = self.drv.lba_size(nsid)
        for i in range(len(data) // lbs):
            self.crc[(nsid, slba + i)] = crc32c.crc32c(data[i * lbs:(i + 1) * lbs])

    def verify_all(self, qid: int = 1) -> int:
        """Read every block of every namespace; returns the blocks checked (asserts no mismatch)."""
        drv = self.drv
        checked = 0
        bad = []
        for nsid, info in sorted(drv.namespaces.items()):
            lbs = info.lba_size
            zero = crc32c.crc32c(bytes(lbs))
            step = max(1, 65536 // lbs)
            for slba in range(0, info.nsze, step):
                n = min(step, info.nsze - slba)
                data = drv.read(nsid, slba, n, qid=qid)
                for i in range(n):
                    got = crc32c.crc32c(data[i * lbs:(i + 1) * lbs])
                    if got != self.crc.get((nsid, slba + i), zero):
                        bad.append((nsid, slba + i))
                    checked += 1
        assert not bad, f"{len(bad)} blocks differ, first {bad[:5]}"
        return checked


def _files(tmp_path) -> str:
    return (f"ns=file:path={tmp_path}/a.img,size=1M,ns=mem:size=1M,"
            f"ns=file:path={tmp_path}/b.img,size=2M,lba_size=4096,ns=file:path={tmp_path}/c.img,size=1M,direct=on")


# ----------------------------------------------------------------------------- (1) mid-I/O at QD 32
def _slow_files(ctrl, delay=0.002):
    """File backends take ``delay`` per write, so commands are surely in flight at the stop."""
    import time

    for ns in ctrl.allocated.values():
        b = ns.backend
        if b.kind == "file":
            real = type(b).writev

            def slow(views, offset, *, fua=False, _b=b, _real=real):
                time.sleep(delay)
                return _real(_b, views, offset, fua=fua)

            b.writev = slow


def test_round_trip_mid_io_qd32_several_namespaces_and_queues(hosts, tmp_path):
    h = hosts(f"serial=MIG1,max_ioqpairs=4,msix_vectors=5,{_files(tmp_path)}", io_queues=4, io_depth=64)
    drv, m = h.drv, h.machine
    assert device_blockers(h.ctrl) == []  # file (O_DIRECT too), 4 KiB file, mem
    assert len(drv.namespaces) == 4
    blocks = Blocks(drv)
    rnd = random.Random(7)
    total_in_flight = 0
    _slow_files(h.ctrl)
    for rnd_no in range(4):
        # QD writes per queue, random namespaces and ranges, no two overlapping in a round
        free = {nsid: list(range(0, info.nsze - 8, 8)) for nsid, info in drv.namespaces.items()}
        for lst in free.values():
            rnd.shuffle(lst)
        pending = {}
        for qid in range(1, 5):
            for k in range(QD):
                nsid = rnd.choice(sorted(free))
                slba = free[nsid].pop()
                nlb = rnd.choice([1, 2, 8])
                lbs = drv.lba_size(nsid)
                data = os.urandom(nlb * lbs)
                buf = m.alloc(len(data))
                m.write(buf, data)
                # the last 8 of each queue stay unrung until after the migration
                cid = drv.submit_rw(qid, WRITE, nsid=nsid, slba=slba, nlb=nlb, buf=buf, ring=k < QD - 8)
                pending[(qid, cid)] = (nsid, slba, data, buf)
        total_in_flight += h.ctrl.io.inflight
        h.migrate()  # file writes in flight are drained, completions posted or parked
        _slow_files(h.ctrl)
        for qid in range(1, 5):
            drv.ring(qid)
        got = []
        for qid in range(1, 5):
            got += [(qid, c) for c in drv.reap(qid, min_completions=QD, timeout=20)]
        keys = [(qid, c.cid) for qid, c in got]
        assert sorted(keys) == sorted(pending), "completions lost or duplicated"
        assert all(c.ok for _q, c in got), [c for _q, c in got if not c.ok]
        for nsid, slba, data, buf in pending.values():
            blocks.record(nsid, slba, data)
            m.free(buf)
        assert blocks.verify_all(qid=1 + rnd_no % 4) == sum(i.nsze for i in drv.namespaces.values())
    assert len(h.old) == 4
    assert total_in_flight > 0  # backend I/O was in flight when the quiesce began
    assert max(h.sizes) < 64 * 1024


# ----------------------------------------------------------------------------- (2) full CQ
def test_full_cq_parked_completions_survive_exactly_once(hosts, tmp_path):
    h = hosts(f"serial=MIG2,max_ioqpairs=4,msix_vectors=5,ns=mem:size=1M,ns=file:path={tmp_path}/c.img,size=1M",
              io_queues=2)
    drv, m = h.drv, h.machine
    drv.delete_io_queue_pair(2)
    q = drv.create_io_queue_pair(2, 64, cq_size=8)
    blocks = Blocks(drv)
    want = {}
    for i in range(20):
        nsid = 1 + i % 2
        data = os.urandom(4096)
        buf = m.alloc(4096)
        m.write(buf, data)
        cid = drv.submit_rw(2, WRITE, nsid=nsid, slba=8 * i, nlb=8, buf=buf)
        want[cid] = (nsid, 8 * i, data)
    h.ctrl.io.drain()
    cq = h.ctrl._cqs[2]
    assert cq.pending == 7 and len(cq.backlog) == 7  # CQ full, 7 parked, 6 still unfetched
    assert h.ctrl._sqs[2].pending == 6
    dst = h.migrate()
    assert len(dst._cqs[2].backlog) == 7 and dst._cqs[2].pending == 7
    vec_before = h.pdev.recorder.count(q.vector)
    got = []
    while len(got) < 20:
        got += drv.reap(2, min_completions=1, timeout=10)
    assert sorted(c.cid for c in got) == sorted(want)  # exactly once each
    assert all(c.ok and c.sqid == 2 for c in got)
    assert h.pdev.recorder.count(q.vector) > vec_before  # the vector fired on the destination
    # the SQ head reported moves forward to the end
    assert got[-1].sqhd == 20 % 64
    for nsid, slba, data in want.values():
        blocks.record(nsid, slba, data)
    blocks.verify_all()


# ----------------------------------------------------------------------------- (3) AERs
def test_outstanding_aers_and_a_queued_event(hosts):
    h = hosts("serial=MIG3,aerl=3,ns=mem:size=1M", io_queues=1, aers=4)
    drv, ctrl = h.drv, h.ctrl
    assert len(ctrl.aer.outstanding) == 4
    # a temperature event: reported (one AER used, re-armed by the driver), SMART now masked
    seen = len(drv.events)
    drv.set_features(0x04, ctrl.temperature - 1)
    drv.poll_events(0.5)
    assert drv.events[seen:] == [(1, 0x01, 0x02)]
    drv.poll(0)
    # a second SMART event while masked: it waits in the queue
    ctrl.inject_critical_warning(1 << 0)
    assert list(ctrl.aer.queued) == [(1, 0x02, 0x02)]
    assert len(ctrl.aer.outstanding) == 4
    dst = h.migrate()
    assert len(dst.aer.outstanding) == 4 and list(dst.aer.queued) == [(1, 0x02, 0x02)]
    assert dst.aer.masked == {1: 0x02}
    assert drv.poll_events(0.2) == []  # still masked

    def events(action):
        seen = len(drv.events)
        action()
        drv.poll_events(0.3)
        return drv.events[seen:]

    # reading the SMART log unmasks: the queued event is reported, exactly once
    assert events(lambda: drv.get_log(0x02, 512, rae=False)) == [(1, 0x02, 0x02)]
    assert len(dst.aer.outstanding) == 4  # re-armed on the destination
    # an error event (invalid doorbell) completes exactly one more AER
    assert events(lambda: dst.bar_write(0, 0x1000 + 8 * 9, 4, 1)) == [(0, 0x00, 0x01)]
    assert drv.poll_events(0.2) == []
    # Abort of an outstanding migrated AER works (Abort: SQID 0, its CID)
    cid = next(iter(dst.aer.outstanding)).cid
    drv.aer_auto_rearm = False
    assert drv.admin(0x08, cdw10=cid << 16).ok


# ----------------------------------------------------------------------------- (4) SMART, error log, features
def test_smart_error_log_features_and_firmware_survive(hosts):
    h = hosts("serial=MIG4,ns=mem:size=2M,ns=mem:size=2M,lbaf=1", io_queues=2)
    drv, ctrl = h.drv, h.ctrl
    for i in range(10):
        drv.write(1, i * 8, os.urandom(4096))
        drv.read(2, i, 1, qid=2)
    bad = drv.io(1, READ, nsid=7, cdw12=0, check=False, buf=h.machine.alloc(4096), length=4096)
    assert not bad.ok
    drv.set_features(0x04, 350)                    # over-temperature threshold
    drv.set_features(0x04, 260 | (1 << 20))        # under-temperature threshold
    drv.set_features(0x08, 0x0304)                 # coalescing
    drv.set_features(0x09, 1 | (1 << 16))          # vector 1: coalescing disabled
    drv.set_features(0x0F, 120000)                 # keep alive (long)
    drv.set_features(0x0E, data=struct.pack("<Q", 1_000_000_000))
    ctrl.inject_critical_warning(1 << 3)
    ctrl.smart.record_media_error()
    smart_before = drv.get_log(0x02, 512, rae=True)
    errors_before = drv.get_log(0x01, 64 * 64)
    fw_before = drv.get_log(0x03, 512)
    ts_before = struct.unpack("<Q", drv.get_features(0x0E, length=8).tag)[0] & (2**48 - 1)
    feats = {fid: drv.get_features(fid).dw0 for fid in (0x01, 0x02, 0x06, 0x07, 0x08, 0x0B, 0x0F)}
    thresholds = (drv.get_features(0x04).dw0, drv.get_features(0x04, cdw11=1 << 20).dw0)
    dst = h.migrate()
    assert dst.smart.host_read_commands == ctrl.smart.host_read_commands >= 10
    assert dst.smart.host_write_commands == ctrl.smart.host_write_commands >= 10
    smart_after = drv.get_log(0x02, 512, rae=True)
    # identical except the counters the log reads themselves move: none in SMART (Get Log is admin)
    assert smart_after[:128] == smart_before[:128] and smart_after[144:192] == smart_before[144:192]
    assert smart_after[0] & (1 << 3) and smart_after[160] == 1  # critical warning, media errors
    assert drv.get_log(0x01, 64 * 64) == errors_before
    assert dst.error_log.count == ctrl.error_log.count >= 1
    assert drv.get_log(0x03, 512) == fw_before
    ts_after = struct.unpack("<Q", drv.get_features(0x0E, length=8).tag)[0] & (2**48 - 1)
    assert ts_before <= ts_after < ts_before + 5000  # monotonic across the migration
    assert {fid: drv.get_features(fid).dw0 for fid in feats} == feats
    assert (drv.get_features(0x04).dw0, drv.get_features(0x04, cdw11=1 << 20).dw0) == thresholds == (350, 260)
    assert drv.get_features(0x09, cdw11=1).dw0 == 1 | (1 << 16)
    assert dst.interrupts.coalescing_on and dst.features.kato_ms == 120000
    # and the destination keeps working
    data = os.urandom(4096)
    drv.write(2, 3, data)
    assert drv.read(2, 3, 1) == data


def test_shadow_doorbells_survive(hosts):
    h = hosts("serial=MIG5,ns=mem:size=1M", io_queues=2)
    drv = h.drv
    dbs, eis = drv.doorbell_buffer_config()
    data = os.urandom(4096)
    drv.write(1, 0, data)
    dst = h.migrate()
    assert dst.shadow.buffers == (dbs, eis) and dst._sqs[1].db_addr == dbs + 8
    for i in range(40):  # through shadow tails and EventIdx only
        drv.write(1, 8 + i, data[:512], qid=1 + i % 2)
    assert drv.read(1, 0, 8) == data
    assert all(drv.read(1, 8 + i, 1) == data[:512] for i in range(40))


def test_admin_queue_and_register_read_back(hosts):
    h = hosts("serial=MIG6,ns=mem:size=1M", io_queues=2)
    drv = h.drv
    drv.delete_io_queue_pair(2)
    regs = {off: drv.read32(off) for off in (0x00, 0x04, 0x08, 0x0C, 0x14, 0x1C, 0x24, 0x28, 0x2C, 0x30, 0x34)}
    dst = h.migrate()
    assert {off: drv.read32(off) for off in regs} == regs
    assert dst._sqs[0] is not None and dst._cqs[0] is not None
    assert drv.identify(0x01)[4:24].decode().strip() == "MIG6"
    drv.create_io_queue_pair(2, 16)
    drv.write(1, 0, b"x" * 512, qid=2)
    assert drv.read(1, 0, 1, qid=1) == b"x" * 512


def test_reset_and_disabled_controller_round_trip(hosts):
    h = hosts("serial=MIG7,ns=mem:size=1M", io_queues=1)
    h.drv.write(1, 5, b"q" * 512)
    h.drv.disable()
    dst = h.migrate()
    assert dst._state == "disabled" and not dst.ready
    h.drv.enable()
    h.drv.create_io_queue_pair(1, 32)
    assert h.drv.read(1, 5, 1) == b"q" * 512


# ----------------------------------------------------------------------------- (6) malformed sections
def _loaded_source(hosts, tmp_path):
    h = hosts(f"serial=MIG8,max_ioqpairs=4,msix_vectors=5,ns=mem:size=1M,ns=file:path={tmp_path}/d.img,size=1M",
              io_queues=3, aers=2)
    drv = h.drv
    drv.delete_io_queue_pair(3)
    drv.create_io_queue_pair(3, 64, cq_size=4)
    for i in range(8):
        drv.submit_rw(3, WRITE, nsid=1, slba=i, nlb=1, buf=h.machine.alloc(512))
    h.ctrl.quiesce()
    snap = save_device(h.ctrl)
    return h, snap


def _stable(st: NvmeState) -> NvmeState:
    """The state without what moves by itself (timestamp, power-on time)."""
    return attrs.evolve(st, features=attrs.evolve(st.features, timestamp=0),
                        smart=attrs.evolve(st.smart, power_on_us=0))


def _with_state(snap: VMStateSnapshot, state: NvmeState) -> VMStateSnapshot:
    fs, _ = snap.sections
    return attrs.evolve(snap, sections=(fs, Section("nvme", 0, state)))


def _bad_states(st: NvmeState):
    sqs, cqs = list(st.sqs), list(st.cqs)
    yield "sqs[1].sqid", attrs.evolve(st, sqs=tuple(sqs[:1] + [attrs.evolve(sqs[1], sqid=2)] + sqs[2:]))
    yield "sqs[1].cqid", attrs.evolve(st, cqs=tuple(cqs[:1] + [None] + cqs[2:]))
    yield "sqs", attrs.evolve(st, sqs=st.sqs[:-1])
    yield "cqs[3].head", attrs.evolve(st, cqs=tuple(cqs[:3] + [attrs.evolve(cqs[3], head=9)] + cqs[4:]))
    yield "cqs[3].vector", attrs.evolve(st, cqs=tuple(cqs[:3] + [attrs.evolve(cqs[3], vector=99)] + cqs[4:]))
    bl = cqs[3].backlog
    yield "cqs[3].backlog[0].sqid", attrs.evolve(
        st, cqs=tuple(cqs[:3] + [attrs.evolve(cqs[3], backlog=(attrs.evolve(bl[0], sqid=1),) + bl[1:])] + cqs[4:]))
    yield "cqs[3].backlog", attrs.evolve(
        st, cqs=tuple(cqs[:3] + [attrs.evolve(cqs[3], head=cqs[3].tail)] + cqs[4:]))
    yield "aer.outstanding", attrs.evolve(st, aer=attrs.evolve(st.aer, outstanding=tuple(range(9))))
    yield "aer.outstanding", attrs.evolve(st, aer=attrs.evolve(st.aer, outstanding=(5, 5)))
    yield "namespaces", attrs.evolve(st, namespaces=st.namespaces[:1])
    yield "namespaces[0].mem_fd", attrs.evolve(
        st, namespaces=(attrs.evolve(st.namespaces[0], mem_fd=type(st.namespaces[0].mem_fd)(40)),)
        + st.namespaces[1:])
    yield "namespaces[1].lbaf", attrs.evolve(st, namespaces=st.namespaces[:1] + (
        attrs.evolve(st.namespaces[1], lbaf=15),))
    yield "firmware.active", attrs.evolve(st, firmware=attrs.evolve(st.firmware, active=3))
    yield "state", attrs.evolve(st, state=9)
    yield "csts", attrs.evolve(st, state=0)  # CSTS.RDY of a ready controller
    yield "sqs", attrs.evolve(st, state=0, csts=st.csts & ~1)
    yield "features.vector_cd", attrs.evolve(st, features=attrs.evolve(st.features, vector_cd=()))
    yield "page_size", attrs.evolve(st, page_size=1000)


def test_malformed_states_are_refused_and_the_destination_stays_untouched(hosts, tmp_path):
    h, snap = _loaded_source(hosts, tmp_path)
    st = snap.sections[1].state
    assert len(st.cqs[3].backlog) == 3 and st.aer.outstanding
    dst = NvmeController(h.ctrl.cfg, name="victim")
    try:
        before = _stable(dst.get_device_state())
        backends = {n: ns.backend for n, ns in dst.allocated.items()}
        seen = []
        for path, bad in _bad_states(st):
            with pytest.raises(StateError) as info:
                load_device(dst, _with_state(snap, bad))
            assert info.value.section == "nvme" and info.value.path.startswith(path), (path, str(info.value))
            # the same through a stream (encoded, checksummed): the same refusal
            data = _with_state(snap, bad).to_bytes()
            with pytest.raises(StateError):
                load_device_stream(dst, data, list(snap.fds))
            assert _stable(dst.get_device_state()) == before
            assert {n: ns.backend for n, ns in dst.allocated.items()} == backends
            seen.append(path)
        assert len(seen) >= 15
        data, fds = snap.to_bytes(), list(snap.fds)
        with pytest.raises(StreamError):
            load_device_stream(dst, data[: len(data) // 2], fds)
        garbled = bytearray(data)
        garbled[len(data) // 2] ^= 0x40
        with pytest.raises((ChecksumError, StreamError)):
            load_device_stream(dst, bytes(garbled), fds)
        # TCP: no descriptors, so the mem namespace cannot follow
        with pytest.raises(StateError, match="did not arrive"):
            load_device_stream(dst, data, None)
        assert _stable(dst.get_device_state()) == before
        # a destination with another namespace size refuses by fingerprint, naming the item
        other = NvmeController(attrs.evolve(h.ctrl.cfg, namespaces=["mem:size=2M", h.ctrl.cfg.namespaces[1]]))
        try:
            with pytest.raises(ConfigMismatchError, match="nvme.namespaces"):
                load_device_stream(other, data, fds)
        finally:
            other.close()
        # and the good stream still loads
        res = load_device_stream(dst, data, fds)
        res.close()
        assert len(dst._cqs[3].backlog) == 3
    finally:
        dst.close()
        h.ctrl.resume()


def test_failed_migration_resumes_the_source(hosts, tmp_path):
    """After a save the source resumes (the destination refused): queued SQEs are fetched."""
    h = hosts(f"serial=MIG9,ns=file:path={tmp_path}/e.img,size=1M", io_queues=1)
    drv, m = h.drv, h.machine
    data = os.urandom(512)
    buf = m.alloc(512)
    m.write(buf, data)
    h.ctrl.quiesce()
    save_device_stream(h.ctrl)
    h.ctrl.resume()
    drv.submit_rw(1, WRITE, nsid=1, slba=1, nlb=1, buf=buf)
    assert drv.reap(1)[0].ok
    assert drv.read(1, 1, 1) == data


# ----------------------------------------------------------------------------- (7) blockers
def test_blockers_list_every_reason(tmp_path):
    from pcidev.migration import collect_blockers
    from pcidev.plugins import make_plugin_manager
    from pcidev_nvme.backends import NullBackend
    from pcidev_nvme.namespace import Namespace

    class Exotic(NullBackend):
        kind = "exotic"

    ctrl = NvmeController("serial=BLK,ns=mem:size=1M,anon=on,ns=null:size=1M")
    try:
        ctrl.allocated[3] = ctrl.namespaces[3] = Namespace(3, Exotic(1 << 20))
        ctrl.allocated[4] = ctrl.make_namespace(4, "mem:size=1M")
        ctrl.allocated.pop(2).close()  # configured, deleted by Namespace Management
        ctrl.namespaces.pop(2)
        reasons = collect_blockers(ctrl, make_plugin_manager(load_entrypoints=False))
        text = "\n".join(reasons)
        # (namespaces created or deleted by Namespace Management migrate: no reason for 2 and 4;
        # anonymous memory migrates by its contents: no reason for 1); one sentence for 3
        assert reasons == ["namespace 3: its backend (exotic) cannot follow the controller to another process"], text
    finally:
        ctrl.close()
    ok = NvmeController(f"serial=OK,ns=mem:size=1M,ns=null:size=1M,ns=file:path={tmp_path}/f.img,size=1M")
    try:
        assert device_blockers(ok) == []
    finally:
        ok.close()


def test_namespace_management_no_longer_blocks(hosts):
    """A namespace created through the admin command does not block migration (it travels
    as a creation record: test_migration_nvme_nsmgmt.py); deleted again, nothing travels."""
    h = hosts("serial=MIG13,ns=mem:size=1M", io_queues=1)
    drv, ctrl = h.drv, h.ctrl
    data = bytearray(4096)
    struct.pack_into("<QQ", data, 0, 256, 256)  # 256 x 512 B
    nsid = drv.admin(0x0D, cdw10=0, data=bytes(data)).dw0
    assert nsid == 2
    assert device_blockers(ctrl) == []
    drv.admin(0x0D, cdw10=1, nsid=nsid)
    assert device_blockers(ctrl) == []
    h.migrate()
    assert sorted(h.ctrl.allocated) == [1]
    assert drv.read(1, 0, 1) == bytes(512)


def test_mem_backend_from_fd_keeps_holes():
    from pcidev_nvme.backends import MemoryBackend

    a = MemoryBackend(1 << 20)
    try:
        a.writev([memoryview(b"z" * 4096)], 8192)
        b = MemoryBackend.from_fd(a.fd, 1 << 20)
        try:
            assert b.allocated_bytes() == 4096
            out = bytearray(12288)
            b.readv([memoryview(out)], 4096)
            assert out[4096:8192] == b"z" * 4096 and not any(out[:4096]) and not any(out[8192:])
        finally:
            b.close()
    finally:
        a.close()


# ----------------------------------------------------------------------------- golden stream
def test_golden_nvme_v1_stream_loads():
    """The released layout (tests/pcidev/vmstate/device_data/nvme-v1.pcvm, written once by
    tests/pcidev/vmstate/make_device_golden.py) loads into today's controller."""
    import sys
    from pathlib import Path

    from pcidev.dma import alloc_memfd
    from pcidev.transport.fdpass import close_fds

    vm = Path(__file__).resolve().parents[2] / "pcidev" / "vmstate"
    sys.path.insert(0, str(vm))
    from nvme_golden import EXPECTED_NVME_V1, NVME_CONFIG, RAM_SIZE

    data = (vm / "device_data" / "nvme-v1.pcvm").read_bytes()
    ram, nsmem = alloc_memfd(RAM_SIZE, "golden-ram"), alloc_memfd(1 << 20, "golden-ns")
    os.pwrite(nsmem, b"migrated memory!" * 32, 0)
    ctrl = NvmeController(NVME_CONFIG)
    try:
        res = load_device_stream(ctrl, data, [ram, nsmem])
        try:
            st = ctrl.get_device_state()
            want = EXPECTED_NVME_V1
            assert st.state == want["state"]
            assert [i for i, q in enumerate(st.sqs) if q is not None] == want["sq_ids"]
            assert st.cqs[2].size == want["cq2_size"] and len(st.cqs[2].backlog) == want["cq2_backlog"]
            assert len(ctrl.aer.outstanding) == want["aers"] and list(ctrl.aer.queued) == want["queued"]
            assert ctrl.aer.masked == want["masked"]
            assert ctrl.smart.host_write_commands == want["host_write_commands"]
            assert ctrl.error_log.count == want["error_count"]
            assert [(n.nsid, n.attached, n.lbaf) for n in st.namespaces] == want["namespaces"]
            out = bytearray(512)
            ctrl.allocated[1].backend.readv([memoryview(out)], 0)
            assert bytes(out) == b"migrated memory!" * 32  # the namespace maps the memfd it was given
        finally:
            res.close()
    finally:
        ctrl.close()
        close_fds([ram, nsmem])


def test_a_stuck_backend_fails_the_quiesce_and_the_controller_keeps_running(hosts, tmp_path, monkeypatch):
    import threading

    from pcidev.errors import MigrationError

    h = hosts(f"serial=MIG10,ns=file:path={tmp_path}/g.img,size=1M", io_queues=1)
    drv, m, ctrl = h.drv, h.machine, h.ctrl
    gate = threading.Event()
    backend = ctrl.namespaces[1].backend
    real = backend.writev

    def slow(views, offset, **kw):
        gate.wait(10)
        return real(views, offset, **kw)

    monkeypatch.setattr(backend, "writev", slow)
    buf = m.alloc(512)
    m.write(buf, b"s" * 512)
    drv.submit_rw(1, WRITE, nsid=1, slba=0, nlb=1, buf=buf)
    with pytest.raises(MigrationError, match="backend I/O in flight"):
        ctrl.quiesce(0.2)
    assert not ctrl.quiesced and ctrl._running
    gate.set()
    assert drv.reap(1)[0].ok
    assert drv.read(1, 0, 1) == b"s" * 512


# ----------------------------------------------------------------------------- hostile states (hypothesis)
def _int_paths(obj, cls, prefix=()):
    """(path, bits) of every unsigned integer inside a state object."""
    from pcidev.vmstate import fields_of
    from pcidev.vmstate.description import KArray, KNullable, KStruct, KSub, KUInt

    def walk(value, kind, path):
        if isinstance(kind, KUInt):
            yield path, kind.bits
        elif isinstance(kind, (KStruct, KSub)) and value is not None:
            yield from _int_paths(value, kind.cls, path)
        elif isinstance(kind, KNullable) and value is not None:
            yield from walk(value, kind.inner, path)
        elif isinstance(kind, KArray) and value is not None:
            for i, v in enumerate(value):
                yield from walk(v, kind.element, path + (i,))

    for spec in fields_of(cls):
        yield from walk(getattr(obj, spec.name), spec.kind, prefix + (spec.name,))


def _replace(obj, path, value):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        items = list(obj)
        items[head] = _replace(items[head], rest, value)
        return tuple(items)
    return attrs.evolve(obj, **{head: _replace(getattr(obj, head), rest, value)})


def test_mutated_states_are_refused_or_applied_never_crash(hosts, tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    h, snap = _loaded_source(hosts, tmp_path)
    good = snap.sections[1].state
    paths = list(_int_paths(good, NvmeState))
    dst = NvmeController(h.ctrl.cfg, name="fuzz")
    outcomes = {"refused": 0, "applied": 0}

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(paths), st.integers(0, 2**64 - 1)), min_size=1, max_size=3))
    def run(changes):
        state = good
        for (path, bits), raw in changes:
            state = _replace(state, path, raw & ((1 << bits) - 1) if raw % 3 else raw % 5)
        try:
            res = load_device(dst, _with_state(snap, state))
        except StateError as exc:
            # refused by the checks, not by a crash while checking or applying
            assert "applying the state failed" not in str(exc), exc
            assert "the device refused the state" not in str(exc), exc
            outcomes["refused"] += 1
            return
        outcomes["applied"] += 1
        try:
            dst.resume()   # kicks every queue: guest memory problems become CSTS.CFS, never an exception
            dst.quiesce()
            dst.get_device_state()
        finally:
            res.close()

    try:
        run()
    finally:
        dst.close()
        h.ctrl.resume()
    assert outcomes["refused"] and outcomes["applied"]


def test_intx_mode_round_trip(hosts):
    h = hosts("serial=MIG11,ns=mem:size=1M", io_queues=1, irq="intx")
    data = os.urandom(4096)
    h.drv.write(1, 0, data)
    dst = h.migrate()
    assert dst.irq.mode == "intx"
    h.drv.write(1, 8, data)
    assert h.drv.read(1, 0, 8) == data and h.drv.read(1, 8, 8) == data


def test_failed_and_shut_down_controllers_round_trip(hosts):
    h = hosts("serial=MIG12,ns=mem:size=1M", io_queues=1)
    h.drv.write(1, 0, b"f" * 512)
    h.ctrl._fatal("test: fatal status")
    dst = h.migrate()
    assert dst.csts & 0x2 and dst._state == "failed"
    h.drv.disable()  # a reset is the way out of CFS, on the destination too
    h.drv.enable()
    h.drv.create_io_queue_pair(1, 16)
    assert h.drv.read(1, 0, 1) == b"f" * 512
    h.drv.shutdown()
    csts = h.drv.csts
    dst = h.migrate()
    assert h.drv.csts == csts and (csts >> 2) & 3 == 2  # shutdown complete, still


def test_a_migration_while_polling_rearms_the_lazy_eventidx(hosts):
    """The source's transport polled (SQ EventIdx = tail - 1 in guest memory) and stopped
    without set_polling(False); the destination does not poll: its restore publishes
    every EventIdx eagerly, so the host rings again and I/O goes on (verified data)."""
    h = hosts("serial=MIGP,ns=mem:size=1M", io_queues=1)
    drv, mem = h.drv, h.machine.memory
    _dbs, eis = drv.doorbell_buffer_config()
    data = os.urandom(4096)
    drv.write(1, 0, data)
    h.ctrl.set_polling(True)
    buf = h.machine.alloc(4096)
    drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)  # rings: the device publishes tail - 1
    assert [c.ok for c in drv.reap(1, min_completions=1)] == [True]
    src_tail = h.ctrl.sq(1).tail
    assert mem.read_u32(eis + 8) == (src_tail - 1) % h.ctrl.sq(1).size
    dst = h.migrate()  # no set_polling(False) on the source
    assert not dst.shadow.polling
    assert mem.read_u32(eis + 8) == dst.sq(1).tail == src_tail
    drv.submit_rw(1, READ, nsid=1, slba=0, nlb=8, buf=buf)
    got = drv.reap(1, min_completions=1, timeout=2)
    assert [c.ok for c in got] == [True], "the host did not ring: a stale lazy EventIdx"
    assert h.machine.memory.read(buf, 4096) == data
    assert drv.read(1, 0, 8) == data
