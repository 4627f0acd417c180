"""NVMe virtualization (pcidev_nvme.virtualization; SR-IOV through the software host): the
primary controller's Identify CNS 14h / 15h bytes, every Virtualization Management action
and refusal, OACS.VMS, per-function CNTLID, secondary controllers that refuse CC.EN while
offline or without resources, a secondary brought online doing crc32c-verified I/O on a
namespace attached to it while the primary does I/O, and a PF with two VFs migrating (in
process, and to another process and back) with every block verified across it."""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import textwrap
import time

import attrs
import crc32c
import pytest

from pcidev.errors import ConfigMismatchError
from pcidev.host import Machine
from pcidev.migration import (
    load_device,
    load_device_stream,
    migrate_in,
    migrate_out,
    save_device,
    save_device_stream,
)
from pcidev.pci import ids
from pcidev.pci.capabilities import sriov as sr
from pcidev.pci.config import ResetKind
from pcidev.vmstate import Section
from pcidev.vmstate.errors import StateError
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.controller import NvmeController, NvmeVirtualFunction
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import NvmeCommandError, NvmeDriver, NvmeDriverError

CFG = ("serial=SRIOV,max_ioqpairs=8,msix_vectors=9,sriov_max_vfs=2,sriov_vq_flexible=6,sriov_vi_flexible=4,"
       "ns=mem:size=2M,ns=mem:size=2M,ns=mem:size=2M")
VM = 0x1C
OFFLINE, ASSIGN, ONLINE, PRIMARY = 0x7, 0x8, 0x9, 0x1


class Host:
    def __init__(self, config: str = CFG) -> None:
        self.machine = Machine(ram_size=96 << 20)
        self.ctrl = NvmeController(config, name="pf")
        self.pdev = self.machine.plug(self.ctrl)
        self.drv = NvmeDriver(self.machine, self.pdev, io_queues=2)
        self.drv.probe()
        self.vf_drvs: list[NvmeDriver] = []
        self.closing: list = []

    def vm(self, act: int, cntlid: int, rt: int = 0, nr: int = 0, check: bool = False):
        return self.drv.admin(VM, cdw10=act | rt << 8 | cntlid << 16, cdw11=nr, check=check)

    def attach(self, nsid: int, *cntlids: int, sel: int = 0):
        data = struct.pack(f"<H{len(cntlids)}H", len(cntlids), *cntlids).ljust(4096, b"\0")
        return self.drv.admin(0x15, nsid=nsid, cdw10=sel, data=data, check=False)

    def bring_up(self, k: int, nsid: int) -> None:
        """Give secondary k 3 VQ and 2 VI, online, attach ``nsid``."""
        scid = k + 1
        assert self.vm(ASSIGN, scid, 0, 3).ok and self.vm(ASSIGN, scid, 1, 2).ok
        assert self.vm(ONLINE, scid).ok
        assert self.attach(nsid, scid).ok

    def probe_vf(self, k: int, **kw) -> NvmeDriver:
        drv = NvmeDriver(self.machine, self.pdev.virtfns[k], **{"io_queues": 2, **kw})
        drv.probe()
        self.vf_drvs.append(drv)
        return drv

    def close(self) -> None:
        for d in (*self.vf_drvs, self.drv):
            try:
                d.close()
            except Exception:
                pass
        self.ctrl.close()
        for c in self.closing:
            c.close()
        self.machine.close()


@pytest.fixture
def host():
    h = Host()
    yield h
    h.close()


def _status(comp) -> int:
    return comp.status & 0x7FF


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("extra, match", [
    ("sriov_max_vfs=2,sriov_vq_flexible=2,sriov_vi_flexible=4", "at least 2 queue"),
    ("sriov_max_vfs=2,sriov_vq_flexible=8,sriov_vi_flexible=4", "primary keeps"),
    ("sriov_max_vfs=2,sriov_vq_flexible=6,sriov_vi_flexible=4,sriov_max_vq_per_vf=7", "exceed the flexible"),
])
def test_bad_sriov_configurations_are_refused(extra, match):
    with pytest.raises(Exception, match=match):
        NvmeController(f"max_ioqpairs=8,msix_vectors=9,{extra},ns=mem:size=1M")


def test_no_sriov_by_default():
    ctrl = NvmeController("ns=mem:size=1M")
    try:
        assert ctrl.virtualization is None and ctrl.caps.find(sr.SriovCapability) is None
        assert NvmeConfig().sriov_max_vfs == 0
    finally:
        ctrl.close()


# ------------------------------------------------------------------------------------------- identify
def test_identify_primary_capabilities_and_secondary_list(host):
    drv = host.drv
    oacs, = struct.unpack_from("<H", drv.id_ctrl, 256)
    assert oacs & (1 << 7)  # VMS
    assert struct.unpack_from("<H", drv.id_ctrl, 78)[0] == 0 and drv.id_ctrl[111] == 1  # CNTLID, CNTRLTYPE I/O
    cap = drv.identify(0x14)
    assert struct.unpack_from("<HHB", cap, 0) == (0, 0, 3)
    # VQFRT VQRFA VQRFAP VQPRT VQFRSM VQGRAN / the VI ones
    assert struct.unpack_from("<IIHHHH", cap, 32) == (6, 0, 0, 3, 3, 1)
    assert struct.unpack_from("<IIHHHH", cap, 64) == (4, 0, 0, 5, 2, 1)
    assert cap[5:32] == bytes(27) and cap[80:] == bytes(4096 - 80)
    lst = drv.identify(0x15)
    assert lst[0] == 2 and lst[1:32] == bytes(31)
    # SCID PCID SCS VFN NVQ NVI
    assert [struct.unpack_from("<HHB3xHHH", lst, 32 + 32 * i) for i in range(2)] == [
        (1, 0, 0, 1, 0, 0), (2, 0, 0, 2, 0, 0)]
    assert drv.identify(0x15, cntid=2)[0] == 1
    assert struct.unpack_from("<H", drv.identify(0x15, cntid=2), 32)[0] == 2
    assert drv.identify(0x15, cntid=3)[0] == 0
    # the controllers of the subsystem (CNS 13h)
    assert struct.unpack_from("<HHHH", drv.identify(0x13), 0) == (3, 0, 1, 2)


def test_identify_14h_15h_without_sriov_are_invalid_field():
    machine = Machine(ram_size=32 << 20)
    ctrl = NvmeController("ns=mem:size=1M")
    drv = NvmeDriver.attach(machine, ctrl)
    try:
        for cns in (0x14, 0x15):
            c = drv.admin(0x06, cdw10=cns, length=4096, check=False)
            assert _status(c) == Status.INVALID_FIELD
        assert _status(drv.admin(VM, cdw10=ASSIGN | 1 << 16, check=False)) == Status.INVALID_OPCODE
        assert not struct.unpack_from("<H", drv.id_ctrl, 256)[0] & (1 << 7)
    finally:
        drv.close()
        ctrl.close()
        machine.close()


# ------------------------------------------------------------------------------------------- management
def test_virtualization_management_actions_and_refusals(host):
    h = host
    # assign: per-VF maximum, resource types, unknown controllers
    assert h.vm(ASSIGN, 1, 0, 3).dw0 == 3
    assert h.vm(ASSIGN, 1, 1, 2).dw0 == 2
    assert _status(h.vm(ASSIGN, 2, 0, 4)) == Status.INVALID_NUM_CTRL_RESOURCES  # > VQFRSM 3
    assert _status(h.vm(ASSIGN, 2, 1, 3)) == Status.INVALID_NUM_CTRL_RESOURCES  # > VIFRSM 2
    assert _status(h.vm(ASSIGN, 2, 2, 1)) == Status.INVALID_RESOURCE_ID
    assert _status(h.vm(ASSIGN, 3, 0, 1)) == Status.INVALID_CTRL_ID
    assert _status(h.vm(ASSIGN, 0, 0, 1)) == Status.INVALID_CTRL_ID  # the primary is no secondary
    assert _status(h.vm(0x2, 1)) == Status.INVALID_FIELD  # reserved action
    # online needs resources; an online secondary takes no assignment
    assert _status(h.vm(ONLINE, 2)) == Status.SEC_CTRL_STATE_INVALID
    assert h.vm(ONLINE, 1).ok
    assert _status(h.vm(ASSIGN, 1, 0, 2)) == Status.SEC_CTRL_STATE_INVALID
    assert _status(h.vm(ONLINE, 9)) == Status.INVALID_CTRL_ID
    lst = h.drv.identify(0x15)
    assert struct.unpack_from("<HHB3xHHH", lst, 32) == (1, 0, 1, 1, 3, 2)
    cap = h.drv.identify(0x14)
    assert struct.unpack_from("<II", cap, 32) == (6, 3) and struct.unpack_from("<II", cap, 64) == (4, 2)
    # the pool: 3 of 6 VQ left, 2 of 4 VI
    assert h.vm(ASSIGN, 2, 0, 3).ok and h.vm(ASSIGN, 2, 1, 2).ok
    assert _status(h.vm(PRIMARY, 0, 0, 1)) == Status.INVALID_NUM_CTRL_RESOURCES  # nothing free
    assert _status(h.vm(PRIMARY, 1, 0, 0)) == Status.INVALID_CTRL_ID
    assert _status(h.vm(PRIMARY, 0, 3, 0)) == Status.INVALID_RESOURCE_ID
    # offline, then the resources can go back
    assert h.vm(OFFLINE, 1).ok and h.vm(OFFLINE, 1).ok  # idempotent
    assert _status(h.vm(OFFLINE, 7)) == Status.INVALID_CTRL_ID
    assert h.vm(ASSIGN, 1, 0, 0).dw0 == 0 and h.vm(ASSIGN, 1, 1, 0).ok
    assert _status(h.vm(ONLINE, 1)) == Status.SEC_CTRL_STATE_INVALID
    # primary flexible allocation: takes effect at the primary's next controller reset
    assert h.vm(PRIMARY, 0, 0, 3).dw0 == 3 and h.vm(PRIMARY, 0, 1, 2).dw0 == 2
    assert _status(h.vm(ASSIGN, 1, 0, 1)) == Status.INVALID_NUM_CTRL_RESOURCES  # the pool is promised
    assert struct.unpack_from("<H", h.drv.identify(0x14), 40)[0] == 0  # VQRFAP: still 0
    assert h.drv.get_features(0x07).dw0 == (1 | 1 << 16)  # 2 private I/O queue pairs
    h.drv.disable()
    h.drv.enable()
    cap = h.drv.identify(0x14)
    assert struct.unpack_from("<H", cap, 40)[0] == 3 and struct.unpack_from("<H", cap, 72)[0] == 2
    assert h.drv.set_features(0x07, 0xFFFE_FFFE) == (4 | 4 << 16)  # 2 private + 3 flexible
    # vectors: 5 private + 2 flexible
    c = h.drv.admin(0x05, cdw10=1 | 15 << 16, cdw11=1 | 2 | 7 << 16, prp1=h.machine.alloc(4096), check=False)
    assert _status(c) == Status.INVALID_INTERRUPT_VECTOR


def test_secondary_offline_or_without_resources_refuses_to_become_ready(host):
    h = host
    vfs = h.pdev.enable_sriov(2)
    assert [v.routing_id for v in vfs] == [1, 2]  # QEMU's offset 1, stride 1
    assert all(isinstance(v.device, NvmeVirtualFunction) for v in vfs)
    for k in range(2):
        drv = NvmeDriver(h.machine, vfs[k], io_queues=1)
        h.vf_drvs.append(drv)
        with pytest.raises(NvmeDriverError, match="fatal status"):
            drv.probe()
        csts = vfs[k].ioread32(0, 0x1C)
        assert csts & 2 and not csts & 1  # CFS, not RDY
    # resources but offline: still refused; online: ready
    assert h.vm(ASSIGN, 1, 0, 3).ok and h.vm(ASSIGN, 1, 1, 2).ok
    drv = h.vf_drvs[0]
    drv.disable()
    with pytest.raises(NvmeDriverError, match="fatal status"):
        drv.enable()
    drv.disable()
    assert h.vm(ONLINE, 1).ok
    drv.enable()
    assert drv.csts & 1
    # going offline resets the secondary: RDY drops, and CC.EN set again fails it
    assert h.vm(OFFLINE, 1).ok
    assert not drv.csts & 1


def test_secondary_online_does_verified_io_on_its_namespace_while_the_primary_does_io(host):
    h = host
    h.bring_up(0, 2)
    assert _status(h.attach(2, 1)) == Status.NS_ALREADY_ATTACHED
    assert _status(h.attach(2, 5)) == Status.CONTROLLER_LIST_INVALID
    h.pdev.enable_sriov(2)
    vd = h.probe_vf(0)
    assert struct.unpack_from("<H", vd.id_ctrl, 78)[0] == 1 and vd.id_ctrl[111] == 1  # CNTLID, CNTRLTYPE
    effects = vd.get_log(0x05, 4096)
    assert struct.unpack_from("<I", effects, 4 * 0x0D)[0] == 0 and struct.unpack_from("<I", effects, 4 * 0x1C)[0] == 0
    pf_effects = h.drv.get_log(0x05, 4096)
    assert struct.unpack_from("<I", pf_effects, 4 * 0x1C)[0] & 1  # CSUPP: Virtualization Management
    oacs = struct.unpack_from("<H", vd.id_ctrl, 256)[0]
    assert not oacs & (1 << 7) and not oacs & (1 << 3)  # no VMS, no NMS on a secondary
    assert sorted(vd.namespaces) == [2] and vd.io_queue_count == 2  # NVQ 3 = admin + 2 I/O
    assert _status(vd.admin(VM, cdw10=ASSIGN | 2 << 16, check=False)) == Status.INVALID_OPCODE
    assert _status(vd.admin(0x0D, check=False)) == Status.INVALID_OPCODE  # no Namespace Management
    # beyond its resources: queue 3 and vector 2 do not exist
    c = vd.admin(0x05, cdw10=3 | 15 << 16, cdw11=1, prp1=h.machine.alloc(4096), check=False)
    assert _status(c) == Status.QID_INVALID
    # the namespaces attached to the primary controller and to the secondary (CNS 12h)
    assert struct.unpack_from("<HHH", h.drv.identify(0x12, nsid=2), 0) == (2, 0, 1)
    # interleaved verified I/O: VF on namespace 2, PF on namespace 1
    rnd = random.Random(5)
    crcs: dict[tuple[int, int], int] = {}
    for i in range(64):
        for drv, nsid in ((vd, 2), (h.drv, 1)):
            slba = rnd.randrange(0, 4096 - 8)
            data = os.urandom(8 * 512)
            drv.write(nsid, slba, data, qid=1 + i % 2)
            for b in range(8):
                crcs[(nsid, slba + b)] = crc32c.crc32c(data[b * 512:(b + 1) * 512])
    for (nsid, lba), crc in crcs.items():
        assert crc32c.crc32c((vd if nsid == 2 else h.drv).read(nsid, lba, 1)) == crc
    # the primary sees what the secondary wrote (one namespace)
    lba, crc = next((k[1], v) for k, v in crcs.items() if k[0] == 2)
    assert crc32c.crc32c(h.drv.read(2, lba, 1)) == crc
    # detach: the secondary no longer sees namespace 2
    assert h.attach(2, 1, sel=1).ok
    assert h.pdev.virtfns[0].device.namespaces == {}
    with pytest.raises(NvmeCommandError):
        vd.read(2, 0, 1)
    assert _status(h.attach(2, 1, sel=1)) == Status.NS_NOT_ATTACHED


def test_disabling_vfs_removes_the_secondaries_but_keeps_their_state(host):
    h = host
    h.bring_up(0, 3)
    vfs = h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    vd.write(3, 10, b"\x5a" * 512)
    h.vf_drvs.remove(vd)
    h.pdev.disable_sriov()
    assert h.ctrl.virtual_functions == [] and vfs[0].device.closed
    assert h.drv.read(3, 10, 1) == b"\x5a" * 512  # the namespace stays (the primary's)
    assert struct.unpack_from("<HHB3xHHH", h.drv.identify(0x15), 32) == (1, 0, 1, 1, 3, 2)
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    assert vd.read(3, 10, 1) == b"\x5a" * 512


# ------------------------------------------------------------------------------------------- migration
def _workload(h: Host, drvs: list[tuple[NvmeDriver, int]], crcs: dict, seed: int, rounds: int = 24) -> None:
    rnd = random.Random(seed)
    for _ in range(rounds):
        for drv, nsid in drvs:
            slba = rnd.randrange(0, 4096 - 8)
            nlb = rnd.choice([1, 4, 8])
            data = os.urandom(nlb * 512)
            drv.write(nsid, slba, data, qid=rnd.choice([1, 2]))
            for b in range(nlb):
                crcs[(nsid, slba + b)] = crc32c.crc32c(data[b * 512:(b + 1) * 512])


def _verify(drvs: list[tuple[NvmeDriver, int]], crcs: dict) -> int:
    zero = crc32c.crc32c(bytes(512))
    checked = 0
    for drv, nsid in drvs:
        for slba in range(0, 4096, 128):
            data = drv.read(nsid, slba, 128)
            for b in range(128):
                assert crc32c.crc32c(data[b * 512:(b + 1) * 512]) == crcs.get((nsid, slba + b), zero), (nsid, slba + b)
                checked += 1
    return checked


def _repoint(h: Host, dst: NvmeController) -> None:
    """The host drives ``dst`` (and its VFs) from now on."""
    dst.irq.sink = h.pdev.recorder
    h.pdev.device = dst
    for drv, pdev in zip([h.drv, *h.vf_drvs], [h.pdev, *h.pdev.virtfns], strict=True):
        drv.device, drv._bar_write, drv._bar_read = pdev.device, pdev.bar_write, pdev.bar_read


def _two_vfs(h: Host) -> list[tuple[NvmeDriver, int]]:
    h.bring_up(0, 2)
    h.bring_up(1, 3)
    h.pdev.enable_sriov(2)
    return [(h.drv, 1), (h.probe_vf(0), 2), (h.probe_vf(1), 3)]


def test_pf_with_two_vfs_migrates_in_process_with_verified_io(host):
    h = host
    drvs = _two_vfs(h)
    crcs: dict = {}
    _workload(h, drvs, crcs, 1)
    src = h.ctrl
    src.quiesce()
    data, fds = save_device_stream(src)
    dst = NvmeController(src.cfg, name="dst")
    h.closing.append(load_device_stream(dst, data, fds))
    assert len(dst.virtual_functions) == 2
    assert dst.virtualization.snapshot() == src.virtualization.snapshot()
    _repoint(h, dst)
    dst.resume()
    h.closing.append(src)
    h.ctrl = dst
    assert _verify(drvs, crcs) == 3 * 4096
    _workload(h, drvs, crcs, 2)
    assert _verify(drvs, crcs) == 3 * 4096
    # the secondaries' queues and identities came along
    assert [struct.unpack_from("<H", d.identify(0x01), 78)[0] for d, _ in drvs] == [0, 1, 2]


CHILD = textwrap.dedent("""
    import socket, sys
    from pcidev.migration import migrate_in, migrate_out
    from pcidev_nvme.controller import NvmeController
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sys.argv[1])
    dev = NvmeController(sys.argv[2], name="child")
    migrate_in(dev, sock)
    assert len(dev.virtual_functions) == 2, dev.virtual_functions
    dev.quiesce()
    migrate_out(dev, sock)
    dev.close()
""")


def test_pf_with_two_vfs_migrates_to_another_process_and_back_with_verified_io(host, tmp_path):
    h = host
    drvs = _two_vfs(h)
    crcs: dict = {}
    _workload(h, drvs, crcs, 3)
    path = str(tmp_path / "mig.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    src = h.ctrl
    child = subprocess.Popen([sys.executable, "-c", CHILD, path, CFG])
    try:
        conn, _ = srv.accept()
        src.quiesce()
        report = migrate_out(src, conn, timeout=30)
        back = NvmeController(src.cfg, name="back")
        result = migrate_in(back, conn, timeout=30, resume=False)
        assert child.wait(30) == 0
    finally:
        child.kill()
        srv.close()
    assert report.state_size > 0
    h.closing += [src, result.resources]
    _repoint(h, back)
    h.ctrl = back
    assert _verify(drvs, crcs) == 3 * 4096
    _workload(h, drvs, crcs, 4)
    assert _verify(drvs, crcs) == 3 * 4096


def test_vf_count_in_the_stream_must_match_numvfs(host):
    h = host
    _two_vfs(h)
    h.ctrl.quiesce()
    snap = save_device(h.ctrl)
    dst = NvmeController(h.ctrl.cfg, name="dst")
    try:
        # a stream whose config says 2 VFs but the sriov section carries one
        sections = list(snap.sections)
        vfs = sections[-1]
        assert vfs.name == "pcidev/sriov"
        sections[-1] = Section(vfs.name, vfs.instance_id, attrs.evolve(vfs.state, vfs=vfs.state.vfs[:1]))
        with pytest.raises(StateError, match="NumVFs say 2"):
            load_device(dst, attrs.evolve(snap, sections=tuple(sections)))
        assert dst.virtual_functions == []
        assert not dst.caps.find(sr.SriovCapability).vf_enable
    finally:
        dst.close()
        h.ctrl.resume()
    assert h.pdev.config_read16(h.pdev.find_ext_capability(ids.ExtCapId.SRIOV) + sr.NUM_VF) == 2


# ------------------------------------------------------------------------------------------- shared state
def _read_status(drv: NvmeDriver, nsid: int, lba: int) -> int:
    try:
        drv.read(nsid, lba, 1)
    except NvmeCommandError as exc:
        return exc.status & 0x7FF
    return 0


def test_write_uncorrectable_marks_are_one_set_for_primary_and_secondary(host):
    h = host
    h.bring_up(0, 2)
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    assert h.pdev.virtfns[0].device.uncorrectable is h.ctrl.uncorrectable
    h.drv.write(2, 10, b"\x11" * 512)
    h.drv.write_uncorrectable(2, 10, 1)
    assert _read_status(h.drv, 2, 10) == _read_status(vd, 2, 10) == Status.UNRECOVERED_READ_ERROR
    vd.write(2, 10, b"\x22" * 512)  # a write clears the mark, for every controller
    assert h.drv.read(2, 10, 1) == vd.read(2, 10, 1) == b"\x22" * 512
    vd.write_uncorrectable(2, 20, 2)
    assert _read_status(h.drv, 2, 21) == Status.UNRECOVERED_READ_ERROR


def test_secondary_has_no_sanitize_format_firmware_or_subsystem_reset(host):
    h = host
    h.bring_up(0, 2)
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    vf = h.pdev.virtfns[0]
    vd.write(2, 0, b"\x33" * 512)
    h.drv.write(1, 0, b"\x44" * 512)
    for opc in (0x84, 0x80, 0x10, 0x11):  # Sanitize, Format NVM, Firmware Commit, Firmware Download
        assert _status(vd.admin(opc, nsid=2, cdw10=2, check=False)) == Status.INVALID_OPCODE, hex(opc)
    assert h.drv.read(1, 0, 1) == b"\x44" * 512 and vd.read(2, 0, 1) == b"\x33" * 512
    oacs = struct.unpack_from("<H", vd.id_ctrl, 256)[0]
    assert not oacs & 0b1110 and oacs & (1 << 4)  # no Format, Firmware, NS Management; Self-test stays
    assert struct.unpack_from("<I", vd.id_ctrl, 328)[0] == 0  # SANICAP
    assert struct.unpack_from("<I", h.drv.id_ctrl, 328)[0] != 0
    effects = vd.get_log(0x05, 4096)
    assert all(struct.unpack_from("<I", effects, 4 * opc)[0] == 0 for opc in (0x84, 0x80, 0x10, 0x11))
    pf_effects = h.drv.get_log(0x05, 4096)
    assert all(struct.unpack_from("<I", pf_effects, 4 * opc)[0] & 1 for opc in (0x84, 0x80, 0x10, 0x11))
    # CAP.NSSRS clear on the secondary; an NSSR write there resets nothing
    assert not vf.ioread64(0, 0) & (1 << 36) and h.pdev.ioread64(0, 0) & (1 << 36)
    vf.iowrite32(0, 0x20, 0x4E564D65)
    assert vd.csts & 1 and not vd.csts & (1 << 4) and h.drv.csts & 1
    assert vd.read(2, 0, 1) == b"\x33" * 512


def test_a_primary_sanitize_holds_the_secondaries_io_too(host):
    h = host
    h.bring_up(0, 2)
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    vf = h.pdev.virtfns[0].device
    h.ctrl._sanitize_refuse(Status.SANITIZE_IN_PROGRESS)
    try:
        assert vf.io.refuse == Status.SANITIZE_IN_PROGRESS
        assert _read_status(vd, 2, 0) == Status.SANITIZE_IN_PROGRESS
    finally:
        h.ctrl._sanitize_refuse(0)
    assert _read_status(vd, 2, 0) == 0


def test_a_sanitize_running_when_the_pf_migrates_still_holds_the_secondaries_io(host):
    """The hold survives a migration: the VFs load after the PF, and a VF's own (never
    running) sanitizer must not release it (found by the cross-package review)."""
    h = host
    h.bring_up(0, 2)
    h.pdev.enable_sriov(1)
    h.probe_vf(0)
    src = h.ctrl
    src.sanitizer.rate = 1.0  # a byte per second: it runs throughout
    h.drv.sanitize(2)  # block erase
    assert src.io.refuse == Status.SANITIZE_IN_PROGRESS
    src.quiesce()
    data, fds = save_device_stream(src)
    dst = NvmeController(src.cfg, name="dst")
    h.closing.append(load_device_stream(dst, data, fds))
    h.closing.append(src)
    assert dst.sanitizer.running and dst.io.refuse == Status.SANITIZE_IN_PROGRESS
    assert [vf.io.refuse for vf in dst.virtual_functions] == [Status.SANITIZE_IN_PROGRESS]
    dst.sanitizer.rate = None


def test_a_primary_format_holds_the_secondaries_io_and_counts_their_io_in_flight(host):
    """The primary's Format NVM covers the shared namespace on every controller: while it
    runs, a secondary's I/O to it is Format In Progress, and the primary's wait for I/O in
    flight sees the secondaries' commands (cross-package review)."""
    h = host
    h.bring_up(0, 2)
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    vf = h.pdev.virtfns[0].device
    assert h.ctrl.begin_format({2}) == []
    try:
        assert _read_status(vd, 2, 0) == Status.FORMAT_IN_PROGRESS
    finally:
        h.ctrl.end_format({2})
    assert _read_status(vd, 2, 0) == 0
    seen = []
    vf.io_inflight_for = lambda nsids: seen.append(set(nsids)) or True  # a command of the VF in flight
    assert h.ctrl.io_inflight_for({2}) and seen == [{2}]


def test_a_primary_sanitize_aborts_the_secondaries_self_test(host):
    h = host
    h.bring_up(0, 2)
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    vd.device_self_test(2, nsid=0xFFFFFFFF)  # extended: runs for minutes
    assert vd.self_test_log()[0] == 2  # in progress
    h.drv.sanitize(2)
    _wait_sanitized(h.drv)  # (log 06h is refused on every controller while the subsystem sanitizes)
    log = vd.self_test_log()
    assert log[0] == 0 and log[4] & 0xF == 0x9, log[:8]  # aborted by a sanitize operation


@pytest.mark.parametrize("how", ["format", "delete", "detach"])
def test_a_primary_format_delete_or_detach_aborts_the_secondary_s_self_test(how):
    """The primary's Format NVM (result 4h), Namespace Management delete or detach from the
    secondary (3h) ends the secondary's self-test of that namespace, as the primary's own
    (review F12); a test of another namespace runs on."""
    h = Host("serial=SRIOV,max_ioqpairs=8,msix_vectors=9,sriov_max_vfs=2,sriov_vq_flexible=6,"
             "sriov_vi_flexible=4,ns=mem:size=2M,ns=mem:size=2M,ns=mem:size=2M,capacity=16M")
    try:
        h.bring_up(0, 2)
        h.bring_up(1, 3)
        h.pdev.enable_sriov(2)
        vd, other = h.probe_vf(0), h.probe_vf(1)
        vd.device_self_test(2, nsid=2)  # extended: runs for minutes
        other.device_self_test(2, nsid=3)
        h.drv.device_self_test(2, nsid=2)
        assert vd.self_test_log()[0] == other.self_test_log()[0] == h.drv.self_test_log()[0] == 2
        if how == "format":
            assert h.drv.admin(0x80, nsid=2, cdw10=0, check=False, timeout=30).ok
            want = 0x4
        elif how == "delete":
            assert h.drv.admin(0x0D, nsid=2, cdw10=1, check=False).ok
            want = 0x3
        else:
            assert h.attach(2, 1, sel=1).ok  # detached from the secondary (CNTLID 1)
            want = 0x3
        log = vd.self_test_log()
        assert log[0] == 0 and log[4] & 0xF == want, log[:8]
        assert other.self_test_log()[0] == 2  # namespace 3's test runs on
        assert h.drv.self_test_log()[0] == (2 if how == "detach" else 0)
    finally:
        h.close()


def test_identify_says_multi_controller_subsystem_and_shared_namespaces(host):
    h = host
    h.bring_up(0, 2)
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    assert h.drv.id_ctrl[76] == 0b010  # CMIC: multi-controller subsystem
    assert vd.id_ctrl[76] == 0b110  # and an SR-IOV VF
    assert h.drv.id_ctrl[768:1024] == vd.id_ctrl[768:1024]  # one subsystem NQN
    assert struct.unpack_from("<H", h.drv.id_ctrl, 78) != struct.unpack_from("<H", vd.id_ctrl, 78)
    idns_pf, idns_vf = h.drv.identify(0x00, nsid=2), vd.identify(0x00, nsid=2)
    assert idns_pf[30] == idns_vf[30] == 1  # NMIC: shared
    assert idns_pf[104:128] == idns_vf[104:128]  # NGUID, EUI64: one namespace
    machine = Machine(ram_size=32 << 20)
    ctrl = NvmeController("ns=mem:size=1M")
    drv = NvmeDriver.attach(machine, ctrl)
    try:  # without SR-IOV: one controller, private namespaces
        assert drv.id_ctrl[76] == 0 and drv.identify(0x00, nsid=1)[30] == 0
    finally:
        drv.close()
        ctrl.close()
        machine.close()


def test_namespace_attachment_checks_every_entry_before_applying_any(host):
    h = host
    assert h.attach(3, 0, sel=1).ok  # namespace 3 off the primary
    assert h.attach(3, 1).ok  # onto secondary 1
    assert _status(h.attach(3, 0, 1)) == Status.NS_ALREADY_ATTACHED
    assert 3 not in h.ctrl.namespaces  # the primary's entry was not applied
    assert _status(h.attach(3, 1, 0, sel=1)) == Status.NS_NOT_ATTACHED
    assert h.ctrl.virtualization.attached(0) == {3}  # nor the secondary's detach
    assert h.attach(3, 0, 2).ok and 3 in h.ctrl.namespaces and h.ctrl.virtualization.attached(1) == {3}


def test_vfs_of_a_primary_with_cmb_and_pmr_have_neither(tmp_path):
    h = Host(CFG + f",cmb_size=1,pmr={tmp_path / 'pmr'},pmr_size=1M")
    try:
        h.bring_up(0, 2)
        vfs = h.pdev.enable_sriov(1)
        assert h.ctrl.failed is None and len(h.ctrl.virtual_functions) == 1
        vf = vfs[0].device
        assert vf.cmb is None and vf.pmr is None and [b.index for b in vf.bars if b is not None] == [0]
        vd = h.probe_vf(0)
        vd.write(2, 5, b"\x66" * 512)
        assert h.drv.read(2, 5, 1) == b"\x66" * 512
        assert h.ctrl.cmb is not None and h.ctrl.pmr is not None
    finally:
        h.close()


# ------------------------------------------------------------------------------------------- a secondary's own stream
def _with_nvme(snap, **changes):
    sections = list(snap.sections)
    j = next(i for i, s in enumerate(sections) if s.name == "nvme")
    sections[j] = Section("nvme", sections[j].instance_id, attrs.evolve(sections[j].state, **changes))
    return attrs.evolve(snap, sections=tuple(sections))


def test_a_secondary_stream_must_agree_with_the_primary_records(host):
    h = host
    h.bring_up(0, 2)
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0, io_queues=2)
    vd.write(2, 3, b"\x77" * 512)
    vf = h.pdev.virtfns[0].device
    vf.quiesce()
    snap = save_device(vf)
    st = next(s.state for s in snap.sections if s.name == "nvme")
    # namespaces the primary never attached to it
    forged = tuple(attrs.evolve(n, attached=True) for n in st.namespaces)
    with pytest.raises(StateError, match=r"namespaces \[1, 2, 3\] attached, the primary controller attached \[2\]"):
        load_device(vf, _with_nvme(snap, namespaces=forged))
    assert sorted(vf.namespaces) == [2]
    # another format for a shared namespace: the primary's namespace keeps its own
    ns1 = h.ctrl.allocated[1]
    before = ns1.lbaf
    reformatted = tuple(attrs.evolve(n, lbaf=1) if n.nsid == 1 else n for n in st.namespaces)
    load_device(vf, _with_nvme(snap, namespaces=reformatted))
    assert ns1.lbaf == before and h.ctrl.allocated[1].lba_size == 512
    vf.resume()
    assert vd.read(2, 3, 1) == b"\x77" * 512
    # fewer resources (offline, NVQ 2, online): its queue 2 no longer exists; offline: not ready
    vf.quiesce()
    assert h.vm(OFFLINE, 1).ok and h.vm(ASSIGN, 1, 0, 2).ok
    with pytest.raises(StateError, match="enabled, but"):
        load_device(vf, snap)
    assert h.vm(ONLINE, 1).ok
    with pytest.raises(StateError, match=r"Number of Queues 2/2 beyond the 1"):
        load_device(vf, snap)
    forged_features = attrs.evolve(st.features, nsq=1, ncq=1, num_queues=0)  # (Number of Queues reads 0/0)
    with pytest.raises(StateError, match=r"I/O queue 2 beyond the 1|queue 2 exists but Number of Queues allocated 1"):
        load_device(vf, _with_nvme(snap, features=forged_features))
    vf.resume()


def test_a_failed_load_into_a_pf_with_live_vfs_leaves_pf_and_vfs_as_they_were(host):
    h = host
    drvs = _two_vfs(h)
    crcs: dict = {}
    _workload(h, drvs, crcs, 7)
    vfs_before = list(h.ctrl.virtual_functions)
    h.ctrl.quiesce()
    snap = save_device(h.ctrl)
    sections = list(snap.sections)
    vfs = sections[-1]
    sections[-1] = Section(vfs.name, vfs.instance_id, attrs.evolve(vfs.state, vfs=vfs.state.vfs[:1]))
    with pytest.raises(StateError, match="NumVFs say 2"):
        load_device(h.ctrl, attrs.evolve(snap, sections=tuple(sections)))
    # a VF that refuses its stream (VF 1 given VF 0's: another CNTLID): all or nothing as well
    sections[-1] = Section(vfs.name, vfs.instance_id, attrs.evolve(vfs.state, vfs=vfs.state.vfs[::-1]))
    with pytest.raises(ConfigMismatchError, match="cntlid: stream has 2, this device has 1"):
        load_device(h.ctrl, attrs.evolve(snap, sections=tuple(sections)))
    h.ctrl.resume()
    assert h.ctrl.failed is None and h.ctrl.virtual_functions == vfs_before
    assert all(not vf.closed for vf in vfs_before)
    assert _verify(drvs, crcs) > 0
    _workload(h, drvs, crcs, 8)
    assert _verify(drvs, crcs) > 0


def test_closing_the_primary_ends_the_secondaries_through_the_watchers(host):
    h = host
    h.bring_up(0, 2)
    vfs = [v.device for v in h.pdev.enable_sriov(2)]
    h.ctrl.close()
    assert h.pdev.virtfns == [] and all(vf.closed for vf in vfs)


def test_a_secondary_lists_the_subsystem_controllers_and_a_namespace_s_controllers(host):
    h = host
    h.bring_up(0, 2)
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    assert struct.unpack_from("<HHHH", vd.identify(0x13), 0) == (3, 0, 1, 2)  # CNS 13h: the subsystem's
    assert struct.unpack_from("<HHH", vd.identify(0x12, nsid=2), 0) == (2, 0, 1)  # CNS 12h: primary and itself
    assert vd.identify(0x12, nsid=3)[:2] == b"\x01\x00"  # namespace 3: the primary's only


def test_a_primary_format_holds_a_secondary_across_its_reset_and_one_enabled_meanwhile(host):
    """The primary's Format NVM holds the shared namespace on the secondaries until its end
    of format: a secondary's own controller reset or FLR does not release it, and a VF
    enabled while the format runs is held too (cross-package review)."""
    h = host
    h.bring_up(0, 2)
    h.bring_up(1, 2)
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    assert h.ctrl.begin_format({2}) == []
    try:
        vd.disable()
        vd.restart()
        assert _read_status(vd, 2, 0) == Status.FORMAT_IN_PROGRESS
        h.pdev.virtfns[0].device.on_reset(ResetKind.FLR)
        vd.restart()
        assert _read_status(vd, 2, 0) == Status.FORMAT_IN_PROGRESS
        h.pdev.disable_sriov()
        h.vf_drvs.clear()
        h.pdev.enable_sriov(2)
        vds = [h.probe_vf(0), h.probe_vf(1)]
        assert all(_read_status(d, 2, 0) == Status.FORMAT_IN_PROGRESS for d in vds)
    finally:
        h.ctrl.end_format({2})
    assert all(_read_status(d, 2, 0) == 0 for d in vds)


def test_an_nvm_subsystem_reset_of_the_primary_resets_every_secondary(host):
    """NSSR resets every controller of the NVM subsystem: the live secondaries too (CC,
    AQA, ASQ, ACQ back to 0, not ready, queues gone; their CSTS.NSSRO stays clear: the
    field is valid only with CAP.NSSRS, which a secondary clears); the namespaces keep
    their data (cross-package review)."""
    h = host
    drvs = _two_vfs(h)
    crcs: dict = {}
    _workload(h, drvs, crcs, 31)
    vfs = [p.device for p in h.pdev.virtfns]
    assert all(vf.fsm_state == "ready" for vf in vfs)
    h.drv.subsystem_reset()
    assert h.drv.read32(0x1C) & (1 << 4) and not h.drv.read32(0x1C) & 1  # NSSRO, not ready
    for drv, vf in zip(h.vf_drvs, vfs, strict=True):
        csts = drv.read32(0x1C)
        assert not csts & 1 and not csts & (1 << 4), hex(csts)
        assert [drv.read32(r) for r in (0x14, 0x24)] == [0, 0] and vf.fsm_state == "disabled"
        assert not any(vf.submission_queues)
    for d, _nsid in drvs:
        d.restart()
    assert _verify(drvs, crcs) == 3 * 4096
    _workload(h, drvs, crcs, 32)
    assert _verify(drvs, crcs) == 3 * 4096


def test_an_nvm_subsystem_reset_waits_for_a_secondary_s_register_write(host):
    """The primary's NSSR resets a secondary under the secondary's device lock, as its own
    register writes run: a CC write in progress on the VF finishes first (review F7)."""
    import threading

    h = host
    h.bring_up(0, 2)
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    vf = h.pdev.virtfns[0].device
    held, release = threading.Event(), threading.Event()

    def register_write_in_progress() -> None:
        with vf.lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=register_write_in_progress)
    t.start()
    assert held.wait(10)
    nssr = threading.Thread(target=h.drv.subsystem_reset)
    nssr.start()
    try:
        nssr.join(0.3)
        assert nssr.is_alive() and vf.fsm_state == "ready" and vf.regs["CC"].value & 1  # waits for the VF lock
    finally:
        release.set()
        t.join(10)
        nssr.join(10)
    assert not nssr.is_alive() and vf.fsm_state == "disabled" and vd.read32(0x14) == 0
    vd.restart()
    vd.write(2, 0, b"\x42" * 512)
    assert vd.read(2, 0, 1) == b"\x42" * 512


def _wait_sanitized(drv: NvmeDriver) -> dict[str, int]:
    deadline = time.monotonic() + 20
    while (log := drv.sanitize_log())["sstat"] & 7 == 2:
        assert time.monotonic() < deadline, "the sanitize did not finish"
        time.sleep(0.01)
    return log


@pytest.mark.parametrize("how", ["write", "write zeroes", "write uncorrectable"])
def test_a_secondary_write_clears_the_primary_s_global_data_erased(host, how):
    """Global Data Erased (Sanitize Status SSTAT bit 8) is the NVM subsystem's: a write
    through a secondary clears it as one through the primary does; the secondary's log 81h
    is the primary's (cross-package review)."""
    h = host
    h.bring_up(0, 2)
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    h.drv.sanitize(2)  # block erase
    log = _wait_sanitized(h.drv)
    assert log["sstat"] == 1 | 1 << 8
    assert vd.sanitize_log() == log
    h.drv.read(1, 0, 1)  # reads and the primary's other commands leave it set
    assert h.drv.sanitize_log()["sstat"] & 1 << 8
    if how == "write":
        vd.write(2, 7, b"\x42" * 512)
    elif how == "write zeroes":
        vd.io(1, 0x08, nsid=2, cdw10=7)
    else:
        vd.io(1, 0x04, nsid=2, cdw10=7)
    assert not h.drv.sanitize_log()["sstat"] & 1 << 8
    assert not vd.sanitize_log()["sstat"] & 1 << 8


def test_a_secondary_refuses_what_the_primary_s_sanitize_forbids(host):
    """While the primary's sanitize runs, the secondaries' admin commands the spec does not
    allow during a sanitize (Device Self-test, Get LBA Status, Get Log Page of the self-test
    log) complete with Sanitize In Progress, those it allows are processed; the same with
    Sanitize Failed in the failure mode (cross-package review)."""
    h = host
    h.bring_up(0, 2)
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    h.ctrl.sanitizer.rate = 1 << 20  # 1 MiB/s: 6 MiB of namespaces take seconds
    try:
        h.drv.sanitize(3, ovrpat=0x5A5A5A5A)  # overwrite
        assert h.drv.sanitize_log()["sstat"] & 7 == 2
        for status, refused in (
            (vd.device_self_test(1, nsid=0xFFFFFFFF, check=False), True),
            (vd.get_lba_status(2, 0, check=False), True),
            (vd.admin(0x02, nsid=0xFFFFFFFF, cdw10=0x06 | (564 // 4 - 1) << 16, length=564, check=False), True),
            (vd.admin(0x06, cdw10=0x01, length=4096, check=False), False),  # Identify
            (vd.admin(0x02, nsid=0xFFFFFFFF, cdw10=0x81 | (512 // 4 - 1) << 16, length=512, check=False), False),
        ):
            assert (_status(status) == Status.SANITIZE_IN_PROGRESS) == refused, (hex(status.status), refused)
    finally:
        h.ctrl.sanitizer.rate = None
    _wait_sanitized(h.drv)
    assert vd.self_test_log()[0] == 0  # the refused Device Self-test started nothing
    assert vd.device_self_test(1, nsid=0xFFFFFFFF, check=False).ok
    assert vd.get_lba_status(2, 0, check=False).ok
    # the failure mode: Sanitize Failed on the secondary too, until the primary recovers
    h.ctrl.sanitizer.restore(attrs.evolve(h.ctrl.sanitizer.snapshot(), sstat=3, failure_mode=1, running=False))
    try:
        assert _status(vd.get_lba_status(2, 0, check=False)) == Status.SANITIZE_FAILED
    finally:
        h.drv.sanitize(1)  # Exit Failure Mode
    assert vd.get_lba_status(2, 0, check=False).ok


def _between_make_and_install(monkeypatch, step) -> None:
    """Run ``step`` when the VFs were built (``SriovFunctions.make``) but are not live yet:
    the admin worker's or sanitizer thread's interleaving with a VF Enable, made
    deterministic."""
    from pcidev.sriov import SriovFunctions

    real = SriovFunctions.install

    def install(self, vfs):
        step()
        return real(self, vfs)

    monkeypatch.setattr(SriovFunctions, "install", install)


def test_a_format_ending_while_vfs_are_built_does_not_hold_them(host, monkeypatch):
    """A VF built while the primary's Format NVM ends reads the primary's set of namespaces
    being formatted, never a copy made at build time (review F2: the copy kept the
    namespace formatting for ever, a reset did not clear it)."""
    h = host
    h.bring_up(0, 2)
    assert h.ctrl.begin_format({2}) == []
    _between_make_and_install(monkeypatch, lambda: h.ctrl.end_format({2}))
    h.pdev.enable_sriov(2)
    vd = h.probe_vf(0)
    vd.write(2, 0, b"\x5a" * 512)
    assert vd.read(2, 0, 1) == b"\x5a" * 512
    assert h.drv.read(2, 0, 1) == b"\x5a" * 512


def test_a_format_starting_while_vfs_are_built_holds_them(host, monkeypatch):
    h = host
    h.bring_up(0, 2)
    _between_make_and_install(monkeypatch, lambda: h.ctrl.begin_format({2}))
    h.pdev.enable_sriov(1)
    vd = h.probe_vf(0)
    try:
        assert _read_status(vd, 2, 0) == Status.FORMAT_IN_PROGRESS
        vd.disable()  # the secondary's own reset leaves the primary's format running
        vd.restart()
        assert _read_status(vd, 2, 0) == Status.FORMAT_IN_PROGRESS
    finally:
        h.ctrl.end_format({2})
    assert _read_status(vd, 2, 0) == 0


@pytest.mark.parametrize("starts", [True, False])
def test_a_sanitize_starting_or_ending_while_vfs_are_built_reaches_them(host, monkeypatch, starts):
    """A VF's I/O gate is the primary's sanitize refusal, read at each fetch: a sanitize
    that starts while the VF is built refuses its writes, one that ends then lets its I/O
    run (review F3: the VF copied the value at build time)."""
    h = host
    h.bring_up(0, 2)
    before, during = (0, Status.SANITIZE_IN_PROGRESS) if starts else (Status.SANITIZE_IN_PROGRESS, 0)
    h.ctrl._sanitize_refuse(before)
    _between_make_and_install(monkeypatch, lambda: h.ctrl._sanitize_refuse(during))
    try:
        h.pdev.enable_sriov(1)
        vd = h.probe_vf(0)
        assert h.pdev.virtfns[0].device.io.refuse == during
        assert _read_status(vd, 2, 0) == during
    finally:
        h.ctrl._sanitize_refuse(0)
    vd.write(2, 0, b"\xa5" * 512)
    assert vd.read(2, 0, 1) == b"\xa5" * 512
