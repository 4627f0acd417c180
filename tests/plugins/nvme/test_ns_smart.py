"""Per-namespace SMART / Health counters (LPA bit 0, :mod:`pcidev_nvme.ns_smart`) and the
start-up properties ``smart_critical_warning``, ``aer_max_queued`` and ``vsl``."""

from __future__ import annotations

import struct

import attrs
import crc32c
import pytest
from _helpers import expect_status, make_env
from test_virtualization import Host as SriovHost

from pcidev.errors import ConfigError
from pcidev.migration import load_device, save_device
from pcidev.vmstate import Section
from pcidev.vmstate.errors import StateError
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.ns_smart import NamespaceSmart, NamespaceSmartState, NsSmartEntry
from pcidev_nvme.persist import PersistState, StateFile
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import READ, WRITE, NvmeDriver

GET_LOG = 0x02
VERIFY = 0x0C


def _u128(b: bytes, off: int) -> int:
    lo, hi = struct.unpack_from("<QQ", b, off)
    return lo | hi << 64


def _io_fields(page: bytes) -> tuple[int, int, int, int]:
    """(data units read, data units written, host read commands, host write commands)."""
    return _u128(page, 32), _u128(page, 48), _u128(page, 64), _u128(page, 80)


def _smart(drv: NvmeDriver, nsid: int = 0xFFFFFFFF) -> bytes:
    return drv.get_log(0x02, 512, nsid=nsid)


def _verified_io(drv: NvmeDriver, nsid: int, start: int, count: int, seed: int = 1) -> dict[int, int]:
    """Write ``count`` blocks of a pattern one command each; the crc32c of each block."""
    bs = drv.lba_size(nsid)
    crcs = {}
    for i in range(count):
        data = bytes((seed * 31 + i * 7 + j) & 0xFF for j in range(bs))
        drv.write(nsid, slba=start + i, data=data)
        crcs[start + i] = crc32c.crc32c(data)
    return crcs


def _check(drv: NvmeDriver, nsid: int, crcs: dict[int, int]) -> None:
    for lba, crc in crcs.items():
        assert crc32c.crc32c(drv.read(nsid, slba=lba, nlb=1)) == crc, f"namespace {nsid} LBA {lba}"


def _log_args(lid: int, length: int, nsid: int) -> dict:
    numd = length // 4 - 1
    return {"nsid": nsid, "cdw10": (numd << 16) | lid, "length": length}


# -- the component -----------------------------------------------------------------------------
def test_counters_snapshot_restore_check_and_forget():
    s = NamespaceSmart()
    assert s.snapshot_if_any() is None
    s.record_read(1, 4096)
    s.record_write(2, 512)
    s.record_io(1, 2, 1024, 3, 1536)
    assert s.counters(1) == (5120, 1536, 3, 3) and s.counters(2) == (0, 512, 0, 1) and s.counters(3) == (0,) * 4
    assert s.totals() == (5120, 2048, 3, 4)
    st = s.snapshot()
    assert [e.nsid for e in st.entries] == [1, 2]
    other = NamespaceSmart()
    other.restore(st)
    assert other.snapshot() == st
    other.restore(st, keep=[2])
    assert other.counters(1) == (0,) * 4 and other.counters(2) == (0, 512, 0, 1)
    other.restore(None)  # a stream or state file from before per-namespace counting
    assert other.snapshot_if_any() is None
    assert s.check(st, [1, 2]) is None
    assert "namespace 2, which does not exist" in s.check(st, [1])
    twice = NamespaceSmartState(entries=(NsSmartEntry(1, 0, 0, 0, 0), NsSmartEntry(1, 0, 0, 0, 0)))
    assert "twice" in s.check(twice, [1])
    s.forget(1)
    assert s.counters(1) == (0,) * 4 and s.counters(2) == (0, 512, 0, 1)


# -- Get Log Page 02h per namespace ------------------------------------------------------------------
@pytest.fixture
def env():
    e = make_env("ns=mem:size=4M,ns=mem:size=4M,lbaf=1,ns=mem:size=1M", io_queues=2)
    yield e
    e.close()


def test_identify_advertises_lpa_bit_0(env):
    assert env.drv.identify(0x01)[261] & 1


def test_each_namespace_counts_its_own_commands_and_the_controller_is_the_sum(env):
    drv = env.drv
    c1 = _verified_io(drv, 1, 0, 5)  # 5 writes of 512 bytes
    c2 = _verified_io(drv, 2, 0, 3, seed=2)  # 3 writes of 4096 bytes
    _check(drv, 1, c1)  # 5 reads
    _check(drv, 2, c2)  # 3 reads
    # a Compare and a Verify count as reads, as in the controller's log
    cbuf = env.machine.alloc(4096)
    env.machine.write(cbuf, drv.read(1, slba=0, nlb=1))  # (one more read)
    assert drv.io(1, 0x05, nsid=1, cdw10=0, cdw12=0, buf=cbuf, length=512).ok
    assert drv.io(1, VERIFY, nsid=2, cdw10=0, cdw12=1).ok
    p1, p2, p3, whole = _smart(drv, 1), _smart(drv, 2), _smart(drv, 3), _smart(drv)
    assert _io_fields(p1)[2:] == (7, 5) and _io_fields(p2)[2:] == (4, 3) and _io_fields(p3) == (0, 0, 0, 0)
    assert _io_fields(p1)[:2] == (1, 1) and _io_fields(p2)[:2] == (1, 1)  # (thousands of 512 B, rounded up)
    assert _io_fields(whole)[2:] == (11, 8)
    ctrl = env.ctrl
    assert ctrl.ns_smart.totals() == (ctrl.smart.bytes_read, ctrl.smart.bytes_written,
                                      ctrl.smart.host_read_commands, ctrl.smart.host_write_commands)
    assert ctrl.ns_smart.counters(2)[:2] == (3 * 4096 + 2 * 4096, 3 * 4096)
    # every other field is the controller's: warning, temperature, power cycles, hours, errors ...
    for page in (p1, p2, p3):
        assert page[:32] == whole[:32] and page[112:144] == whole[112:144] and page[160:200] == whole[160:200]
    # NSID 0 also answers the controller's log
    assert _io_fields(_smart(drv, 0)) == _io_fields(whole)


def test_commands_of_one_doorbell_on_several_namespaces_are_counted_per_namespace(env):
    drv = env.drv
    machine = env.machine
    buf = machine.alloc(8192, 4096)
    machine.write(buf, bytes(range(256)) * 32)
    pattern = [1, 1, 2, 1, 3, 3, 2, 2, 1]  # one ring: the core's batch switches namespaces
    for i, nsid in enumerate(pattern):
        drv.submit_rw(1, WRITE, nsid=nsid, slba=i, nlb=1, buf=buf, ring=False)
    for i, nsid in enumerate(pattern[:4]):
        drv.submit_rw(1, READ, nsid=nsid, slba=i, nlb=1, buf=buf + 4096, ring=False)
    drv.ring(1)
    comps = drv.reap(1, min_completions=len(pattern) + 4)
    assert all(c.ok for c in comps)
    s = env.ctrl.ns_smart
    assert [s.counters(n)[2:] for n in (1, 2, 3)] == [(3, 4), (1, 3), (0, 2)]
    assert s.counters(1)[:2] == (3 * 512, 4 * 512) and s.counters(2)[:2] == (4096, 3 * 4096)
    assert _io_fields(_smart(drv))[2:] == (4, 9)


def test_an_inactive_or_invalid_nsid_is_refused(env):
    drv = env.drv
    for nsid in (4, 0xFFFF, 0xFFFFFFFE):
        expect_status(drv, Status.INVALID_NSID, GET_LOG, param=4, **_log_args(0x02, 512, nsid))
    drv.admin(0x15, nsid=3, cdw10=1, buf=_ctrl_list(env, 0), length=4096)  # detach namespace 3
    expect_status(drv, Status.INVALID_NSID, GET_LOG, param=4, **_log_args(0x02, 512, 3))


def _ctrl_list(env, cntlid: int) -> int:
    buf = env.machine.alloc(4096)
    env.machine.write(buf, struct.pack("<HH", 1, cntlid).ljust(4096, b"\0"))
    return buf


def test_a_deleted_namespace_takes_its_counters_along(env):
    drv = env.drv
    _verified_io(drv, 3, 0, 2)
    before = _io_fields(_smart(drv))
    drv.admin(0x15, nsid=3, cdw10=1, buf=_ctrl_list(env, 0), length=4096)  # detach
    assert drv.admin(0x0D, nsid=3, cdw10=1).ok  # delete
    assert env.ctrl.ns_smart.counters(3) == (0, 0, 0, 0)
    assert _io_fields(_smart(drv)) == before  # the controller's counters keep them


# -- migration -------------------------------------------------------------------------------------
def test_the_counters_migrate_with_verified_data(hosts):
    h = hosts("serial=nsm1,ns=mem:size=4M,ns=mem:size=4M", io_queues=1, aers=0)
    drv = h.drv
    c1 = _verified_io(drv, 1, 0, 6)
    c2 = _verified_io(drv, 2, 100, 2, seed=9)
    before = {n: _smart(drv, n)[32:96] for n in (1, 2)}
    h.migrate()
    assert {n: _smart(drv, n)[32:96] for n in (1, 2)} == before
    _check(drv, 1, c1)
    _check(drv, 2, c2)
    more = _verified_io(drv, 2, 200, 3, seed=4)
    _check(drv, 2, more)
    s = h.ctrl.ns_smart
    assert s.counters(1)[2:] == (6, 6) and s.counters(2)[2:] == (5, 5)
    assert s.totals()[2:] == (h.ctrl.smart.host_read_commands, h.ctrl.smart.host_write_commands)


def test_a_stream_from_before_loads_with_zero_counters(hosts):
    h = hosts("serial=nsm2,ns=mem:size=4M", io_queues=1, aers=0)
    drv = h.drv
    crcs = _verified_io(drv, 1, 0, 3)
    h.ctrl.ns_smart.restore(None)  # as a source without per-namespace counters would save
    h.migrate()
    assert _io_fields(_smart(drv, 1)) == (0, 0, 0, 0)
    _check(drv, 1, crcs)
    assert _io_fields(_smart(drv, 1))[2:] == (3, 0)


def test_a_stream_with_counters_of_a_missing_namespace_is_refused(hosts):
    h = hosts("serial=nsm3,ns=mem:size=1M,ns=mem:size=1M", io_queues=1, aers=0)
    crcs = _verified_io(h.drv, 2, 0, 2)
    h.ctrl.quiesce()
    snap = save_device(h.ctrl)
    fs, sec = snap.sections
    st = sec.state
    assert [e.nsid for e in st.ns_smart.entries] == [2]
    dst = NvmeController(h.ctrl.cfg, name="victim")
    try:
        dst.ns_smart.record_write(1, 512)
        for bad in (NamespaceSmartState(entries=(NsSmartEntry(5, 0, 512, 0, 1),)),
                    NamespaceSmartState(entries=(NsSmartEntry(2, 0, 512, 0, 1),) * 2)):
            with pytest.raises(StateError) as info:
                load_device(dst, attrs.evolve(snap, sections=(fs, Section("nvme", 0, attrs.evolve(st, ns_smart=bad)))))
            assert info.value.path.startswith("ns_smart")
            assert dst.ns_smart.counters(1) == (0, 512, 0, 1)  # untouched
        load_device(dst, snap).close()
        assert dst.ns_smart.counters(2) == h.ctrl.ns_smart.counters(2) and dst.ns_smart.counters(1) == (0,) * 4
    finally:
        dst.close()
        h.ctrl.resume()
    _check(h.drv, 2, crcs)


# -- persistence --------------------------------------------------------------------------------
def test_the_counters_persist_in_the_state_file(tmp_path):
    img = tmp_path / "a.img"
    cfg = f"serial=nsp1,state_dir={tmp_path},ns=file:path={img},size=1M,ns=mem:size=1M"
    env = make_env(cfg, io_queues=1)
    try:
        crcs = _verified_io(env.drv, 1, 0, 4)
        _verified_io(env.drv, 2, 0, 1)
        page1 = _smart(env.drv, 1)
    finally:
        env.close()
    st = StateFile(tmp_path / "nvme-nsp1.state").load()
    assert st is not None and st.ns_smart is not None
    assert {e.nsid: e.host_write_commands for e in st.ns_smart.entries} == {1: 4, 2: 1}
    env = make_env(cfg, io_queues=1)
    try:
        assert _smart(env.drv, 1)[32:96] == page1[32:96]
        assert _io_fields(_smart(env.drv, 2))[2:] == (0, 1)
        _check(env.drv, 1, crcs)
        assert _io_fields(_smart(env.drv, 1))[2:] == (4, 4)  # (the reads of the check)
    finally:
        env.close()


def test_a_state_file_from_before_loads(tmp_path):
    img = tmp_path / "b.img"
    cfg = f"serial=nsp2,state_dir={tmp_path},ns=file:path={img},size=1M"
    env = make_env(cfg, io_queues=1)
    try:
        _verified_io(env.drv, 1, 0, 2)
    finally:
        env.close()
    path = tmp_path / "nvme-nsp2.state"
    sf = StateFile(path)
    old = sf.load()
    assert old is not None and old.ns_smart is not None
    sf.save(attrs.evolve(old, ns_smart=None))  # what an earlier version wrote
    assert isinstance(StateFile(path).load(), PersistState)
    env = make_env(cfg, io_queues=1)
    try:
        assert _io_fields(_smart(env.drv, 1)) == (0, 0, 0, 0)
        assert _io_fields(_smart(env.drv))[3] == 2  # the controller's counters are there
    finally:
        env.close()


# -- SR-IOV --------------------------------------------------------------------------------------
def test_a_namespace_shared_with_a_secondary_counts_the_subsystems_commands():
    h = SriovHost()
    try:
        h.bring_up(0, 2)
        h.pdev.enable_sriov(1)
        vd = h.probe_vf(0, aers=0)
        vf = h.ctrl.virtual_functions[0]
        assert vf.ns_smart is h.ctrl.ns_smart  # one set of counters: the namespaces are shared
        assert vd.identify(0x01)[261] & 1
        vcrcs = _verified_io(vd, 2, 0, 4)
        assert 2 in h.ctrl.namespaces  # attached to the primary and to the secondary
        pcrcs = _verified_io(h.drv, 2, 50, 2, seed=3)
        _check(vd, 2, vcrcs)
        _check(h.drv, 2, pcrcs)
        # the namespace's log is the same from both controllers: every controller's commands
        page_vf = _smart(vd, 2)
        assert _smart(h.drv, 2)[32:96] == page_vf[32:96]
        n = len(vcrcs) + len(pcrcs)
        assert _io_fields(page_vf)[2:] == (n, n)
        # the namespaces' counters sum to the controllers' (the endurance group's totals)
        totals = h.ctrl.endurance_totals()
        s = h.ctrl.ns_smart.totals()
        assert s == (totals.bytes_read, totals.bytes_written, totals.host_reads, totals.host_writes)
        assert _io_fields(_smart(vd))[2:] == (len(vcrcs), len(vcrcs))  # the secondary's own log
        expect_status(vd, Status.INVALID_NSID, GET_LOG, param=4, **_log_args(0x02, 512, 1))  # not attached to it
    finally:
        h.close()


# -- start-up properties -------------------------------------------------------------------------
def test_smart_critical_warning_is_set_at_start():
    env = make_env("smart_critical_warning=0x0c,ns=mem:size=1M", io_queues=0)
    try:
        assert _smart(env.drv)[0] == 0x0C
        assert _smart(env.drv, 1)[0] == 0x0C
        assert env.ctrl.critical_warning == 0x0C
    finally:
        env.close()


def test_aer_max_queued_bounds_the_event_queue():
    ctrl = NvmeController("aer_max_queued=2,ns=mem:size=1M")
    try:
        assert ctrl.aer.max_queued == 2
        for info in range(4):
            ctrl.aer.post(0, info, 1)  # no AER outstanding: kept up to the bound
        assert len(ctrl.aer.queued) == 2
    finally:
        ctrl.close()
    ctrl = NvmeController("ns=mem:size=1M")
    try:
        assert ctrl.aer.max_queued == 64  # QEMU's default
    finally:
        ctrl.close()


def test_vsl_limits_verify_and_identify_reports_it():
    env = make_env("vsl=1,ns=mem:size=1M,ns=mem:size=1M,lbaf=2,pi=1", io_queues=1)  # 2 pages: 8 KiB
    try:
        drv = env.drv
        assert drv.admin(0x06, cdw10=0x06, length=4096).tag[0] == 1  # CNS 06h VSL
        assert drv.io(1, VERIFY, nsid=1, cdw10=0, cdw12=15).ok  # 16 x 512 = 8 KiB
        comp = drv.io(1, VERIFY, nsid=1, cdw10=0, cdw12=16, check=False)  # 17 blocks: beyond
        assert comp.code == Status.INVALID_FIELD
        assert drv.io(1, VERIFY, nsid=2, cdw10=0, cdw12=15).ok  # (data only: metadata is not counted)
        assert drv.io(1, VERIFY, nsid=2, cdw10=0, cdw12=16, check=False).code == Status.INVALID_FIELD
    finally:
        env.close()
    env = make_env("ns=mem:size=1M", io_queues=1)
    try:
        assert env.drv.admin(0x06, cdw10=0x06, length=4096).tag[0] == 0  # no limit
        assert env.drv.io(1, VERIFY, nsid=1, cdw10=0, cdw12=2047).ok
    finally:
        env.close()


@pytest.mark.parametrize("props, message", [
    ("smart_critical_warning=0x02", "bits 0x2 cannot be set"),
    ("smart_critical_warning=0x100", "out of range"),
    ("smart_critical_warning=0x40", "bits 0x40 cannot be set"),
    ("aer_max_queued=0", "aer_max_queued=0 is out of range 1..256"),
    ("aer_max_queued=257", "aer_max_queued=257 is out of range"),
    ("vsl=256", "vsl=256 is out of range 0..255"),
    ("vsl=x", "vsl"),
])
def test_bad_values_are_one_line_on_the_command_line(props, message, tmp_path, capsys):
    from pcidev.cli import main

    with pytest.raises(ConfigError, match=message.split(" is ")[0]):
        NvmeController(f"{props},ns=mem:size=1M").close()
    assert main(["serve", "--vfio-user", str(tmp_path / "s.sock"), f"nvme,{props},ns=mem:size=1M"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
