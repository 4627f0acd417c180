"""Identify tells the truth: every capability the controller advertises works, and every
command it rejects as unsupported is not advertised.

Three walks:

* every admin and I/O opcode (0..255): the Commands Supported and Effects log lists it
  exactly when the controller does not answer Invalid Opcode;
* the command bits of OACS and ONCS (and SANICAP) agree with that log;
* every other set bit of the walked Identify fields (and of CAP) has an exerciser in
  :data:`EXERCISERS` that uses it; a bit set without one fails, so a capability cannot be
  advertised without a test here.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import pytest
from _copy_exercisers import COPY_EXERCISERS, COPY_FORMATTING
from _helpers import Env, make_env
from _namespace_truth import check_namespace, check_namespace_via_cmb
from _numeric_exercisers import NUMERIC_EXERCISERS
from _protection_exercisers import PROTECTION_EXERCISERS
from crc32c import crc32c

from pcidev_nvme.controller import NvmeVirtualFunction
from pcidev_nvme.identify import identify_controller
from pcidev_nvme.logs import firmware_image
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import NvmeDriver

INVALID_OPCODE = Status.INVALID_OPCODE

#: OACS bit -> the admin opcodes it advertises (NVMe Base 2.0, Identify Controller)
OACS_OPCODES = {0: (0x81, 0x82), 1: (0x80,), 2: (0x10, 0x11), 3: (0x0D, 0x15), 4: (0x14,), 5: (0x19, 0x1A),
                6: (0x1D, 0x1E), 7: (0x1C,), 8: (0x7C,), 9: (0x86,), 10: (0x24,)}
#: ONCS bit -> the I/O opcodes it advertises (bit 4, Save/Select in features, and bit 6,
#: Timestamp, are features: exercised below)
ONCS_OPCODES = {0: (0x05,), 1: (0x04,), 2: (0x09,), 3: (0x08,), 5: (0x0D, 0x0E, 0x11, 0x15), 7: (0x0C,),
                8: (0x19,)}


_SRIOV = "ns=mem:size=16M,max_ioqpairs=8,msix_vectors=9,sriov_max_vfs=2,sriov_vq_flexible=6,sriov_vi_flexible=4"
#: everything on in one controller: SR-IOV with two VFs, a CMB, a PMR, the OCP log, and four
#: namespaces: a plain ``mem`` one (NSID 1, which the exercisers use), a ``file`` one with
#: PI type 1 in a 16b Guard format (4096+8), a ``file`` one with PI type 2 in a 64b Guard
#: format (512+16, PI first, extended LBAs) and a ``mem`` one with PI type 3 (512+64, 16b Guard)
_ALL = ("ns=mem:size=16M,ns=file:path={tmp}/pi16.img,size=1M,lbaf=3,pi=1,"
        "ns=file:path={tmp}/pi64.img,size=1M,lbaf=4,pi=2,pil=1,mset=1,ns=mem:size=1M,lbaf=6,pi=3,"
        "cmb_size=2,pmr={tmp}/pmr.img,pmr_size=1M,ocp=on,"
        "max_ioqpairs=8,msix_vectors=9,sriov_max_vfs=2,sriov_vq_flexible=6,sriov_vi_flexible=4")
#: configurations walked: the default, one with the CMB and the PMR, one with the OCP log, an
#: SR-IOV primary controller, and (``sriov-secondary``) the secondary controller of its VF 0
#: (online, 3 VQ and 2 VI, every namespace attached to it and to the primary); ``all`` is
#: everything in one controller (:data:`_ALL`), walked as the primary (with VF 0 running beside
#: it) and as that secondary. Add a configuration here and every test of the file runs on it.
CONFIGS = {"default": "ns=mem:size=16M",
           "cmb+pmr": "ns=mem:size=16M,cmb_size=2,pmr={tmp}/pmr.img,pmr_size=1M",
           "ocp": "ns=mem:size=16M,ocp=on",
           "sriov": _SRIOV,
           "sriov-secondary": _SRIOV,
           "atomic": "atomic.awun=7,atomic.awupf=3,ns=mem:size=16M,atomic.nawun=15,atomic.nawupf=7,atomic.nabsn=15",
           "all": _ALL,
           "all-secondary": _ALL}
#: configurations whose environment is the secondary controller of the primary's VF 0
_SECONDARY = {"sriov-secondary", "all-secondary"}
#: primary configurations walked with VF 0 enabled, online and probed beside them
_WITH_VF = {"all"}


@pytest.fixture(params=sorted(CONFIGS))
def env(request, tmp_path):
    e = make_env(CONFIGS[request.param].format(tmp=tmp_path), io_queues=1)
    if request.param not in _SECONDARY | _WITH_VF:
        yield e
        e.close()
        return
    for cdw10, nr in ((0x8 | 1 << 16, 3), (0x8 | 1 << 8 | 1 << 16, 2), (0x9 | 1 << 16, 0)):
        e.drv.admin(0x1C, cdw10=cdw10, cdw11=nr)
    for nsid in e.drv.namespaces:  # every namespace attached to the secondary too
        e.drv.admin(0x15, nsid=nsid, data=struct.pack("<HH", 1, 1).ljust(4096, b"\0"))
    vpdev = e.pdev.enable_sriov(1)[0]
    vdrv = NvmeDriver(e.machine, vpdev, io_queues=1, aers=0)
    try:
        vdrv.probe()
        if request.param in _SECONDARY:
            venv = Env(e.machine, vpdev.device, vdrv, vpdev)
            venv.primary_drv = e.drv  # type: ignore[attr-defined]  # (the namespace formats are the primary's)
            yield venv
        else:  # the primary, its VF 0 enabled and running beside it
            yield e
    finally:
        vdrv.close()
        e.close()


def _u16(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", b, off)[0])


def _u32(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", b, off)[0])


def _effects(drv: NvmeDriver) -> tuple[set[int], set[int]]:
    log = drv.get_log(0x05, 4096)
    admin = {op for op in range(256) if _u32(log, 4 * op) & 1}
    io = {op for op in range(256) if _u32(log, 1024 + 4 * op) & 1}
    return admin, io


#: admin opcodes not submitted blind: an AER stays outstanding until an event
_NOT_BLIND = {0x0C}


def test_the_effects_log_lists_exactly_the_opcodes_the_controller_accepts(env):
    drv = env.drv
    admin, io = _effects(drv)
    assert {0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x09, 0x0A, 0x0C} <= admin  # the mandatory ones
    assert {0x00, 0x01, 0x02} <= io
    for op in range(256):
        if op in _NOT_BLIND:
            continue
        comp = drv.admin(op, check=False, nsid=0)
        rejected = comp.code == INVALID_OPCODE
        assert rejected == (op not in admin), f"admin opcode {op:#04x}: status {comp.code:#x}, listed {op in admin}"
    for op in range(256):
        comp = drv.io(1, op, check=False, nsid=1)
        rejected = comp.code == INVALID_OPCODE
        assert rejected == (op not in io), f"I/O opcode {op:#04x}: status {comp.code:#x}, listed {op in io}"


def test_oacs_oncs_and_sanicap_agree_with_the_effects_log(env):
    drv = env.drv
    idc = drv.identify(0x01)
    admin, io = _effects(drv)
    oacs, oncs = _u16(idc, 256), _u16(idc, 520)
    for bit, ops in OACS_OPCODES.items():
        for op in ops:
            assert bool(oacs >> bit & 1) == (op in admin), f"OACS bit {bit} vs admin opcode {op:#04x}"
    for bit, ops in ONCS_OPCODES.items():
        for op in ops:
            assert bool(oncs >> bit & 1) == (op in io), f"ONCS bit {bit} vs I/O opcode {op:#04x}"
    sanicap = _u32(idc, 328)
    assert bool(sanicap & 0x7) == (0x84 in admin), "SANICAP vs Sanitize"


def test_directives_advertised_work(env):
    """OACS bit 5: Directive Receive returns the Identify directive's parameters (the
    directive types supported and enabled), Directive Send refuses what it must."""
    drv = env.drv
    assert _u16(drv.identify(0x01), 256) >> 5 & 1
    params = drv.admin(0x1A, nsid=1, cdw10=1023, cdw11=0x01, length=4096).tag  # Identify, Return Parameters
    assert _u32(params, 0) & 1 and _u32(params, 32) & 1
    assert drv.admin(0x19, nsid=1, cdw11=0x01, cdw12=0, check=False).code == Status.INVALID_FIELD


# -- exercisers of the other advertised bits -----------------------------------------------
Exerciser = Callable[[NvmeDriver], None]


def _flush_broadcast(drv: NvmeDriver) -> None:  # VWC bits 2:1 = 11b
    drv.io(1, 0x00, nsid=0xFFFFFFFF)


def _vwc_present(drv: NvmeDriver) -> None:  # VWC bit 0: Set Features 06h toggles the cache
    drv.set_features(0x06, 0)
    assert drv.get_features(0x06).dw0 & 1 == 0
    drv.set_features(0x06, 1)
    assert drv.get_features(0x06).dw0 & 1 == 1


def _sgl(drv: NvmeDriver) -> None:  # SGLS bits 1:0 = 01b: SGLs for I/O data
    data = bytes(range(256)) * 16
    drv.write(1, slba=8, data=data, sgl=True)
    assert drv.read(1, slba=8, nlb=len(data) // drv.lba_size(1), sgl=True) == data


def _sgl_bit_bucket(drv: NvmeDriver) -> None:  # SGLS bit 16: a bit bucket discards read data
    bs = drv.lba_size(1)
    drv.write(1, slba=16, data=bytes([0x5A]) * bs + bytes([0xA5]) * bs)
    buf = drv.machine.alloc(4096, 4096)
    try:
        drv.mem.write(buf, bytes(bs))
        drv.io(1, 0x02, nsid=1, cdw10=16, cdw12=1, segments=[(None, bs), (buf, bs)])
        assert drv.mem.read(buf, bs) == bytes([0xA5]) * bs
    finally:
        drv.machine.free(buf)


def _lpa_smart_per_ns(drv: NvmeDriver) -> None:  # LPA bit 0: the SMART / Health log per namespace
    def commands(nsid: int) -> tuple[int, int]:
        page = drv.get_log(0x02, 512, nsid=nsid)
        return struct.unpack_from("<QQ", page, 64)[0], struct.unpack_from("<QQ", page, 80)[0]

    reads, writes = commands(1)
    drv.write(1, slba=40, data=bytes([0x3C]) * drv.lba_size(1))
    assert drv.read(1, slba=40, nlb=1) == bytes([0x3C]) * drv.lba_size(1)
    assert commands(1) == (reads + 1, writes + 1)
    assert drv.admin(0x02, check=False, nsid=0xFFFFFFF0, cdw10=(127 << 16) | 0x02, length=512).code \
        == Status.INVALID_NSID


def _lpa_effects(drv: NvmeDriver) -> None:  # LPA bit 1: the Commands Supported and Effects log
    assert _effects(drv)[0]


def _lpa_extended(drv: NvmeDriver) -> None:  # LPA bit 2: extended NUMD and a log page offset
    whole = drv.get_log(0x05, 4096)
    assert drv.get_log(0x05, 512, offset=1024) == whole[1024:1536]


#: OCP SMART / Health Information Extended: its Log Page GUID (bytes 511:496)
_OCP_GUID = bytes.fromhex("C5AF1028EABFF2A49C4F6F7CC914D5AF")


def _lpa_supported_logs(drv: NvmeDriver) -> None:  # LPA bit 5: LIDs 00h, 05h, 12h, 13h
    page = drv.get_log(0x00, 1024)
    listed = {lid for lid in range(256) if _u32(page, 4 * lid) & 1}
    assert {0x00, 0x05, 0x12, 0x13} <= listed
    for lid in range(256):
        numd = 512 // 4 - 1
        comp = drv.admin(0x02, check=False, nsid=0xFFFFFFFF, cdw10=(numd << 16) | lid, length=512)
        assert (comp.code != Status.INVALID_LOG_PAGE) == (lid in listed), f"log page {lid:#04x}: {comp.code:#x}"
    assert drv.get_log(0x13, 4096) == bytes(4096)  # NVMe-MI Commands Supported and Effects: none
    assert _u32(drv.get_log(0x12, 1024), 4 * 0x19) & 1  # features supported log: e.g. 19h
    if 0xC0 in listed:  # ocp=on: the OCP SMART extended log
        assert drv.get_log(0xC0, 512)[496:] == _OCP_GUID


def _oaes_ns_attr(drv: NvmeDriver) -> None:  # OAES bit 8: Namespace Attribute Notices
    assert drv.get_features(0x0B).dw0 >> 8 & 1 in (0, 1)
    drv.set_features(0x0B, 1 << 8)
    assert drv.get_features(0x0B).dw0 >> 8 & 1 == 1
    before = len(drv.events)
    drv.arm_aer()
    ctrl = drv.device
    if isinstance(ctrl, NvmeVirtualFunction):  # a secondary: the primary changes its namespaces
        virt = ctrl.primary.virtualization
        assert virt is not None
        virt.detach(ctrl.cfg.cntlid, 1)
        virt.attach(ctrl.cfg.cntlid, 1)
    else:
        ctrl_list = struct.pack("<HH", 1, _u16(drv.identify(0x01), 78)).ljust(4096, b"\0")
        drv.admin(0x15, nsid=1, cdw10=1, data=ctrl_list)  # detach
        drv.admin(0x15, nsid=1, cdw10=0, data=ctrl_list)  # attach again
    if (2, 0x00, 0x04) not in drv.events[before:]:  # (it may have been taken while the detach completed)
        drv.poll_events(2.0)
    assert (2, 0x00, 0x04) in drv.events[before:], drv.events  # notice, attribute changed, log 04h


def _oaes_fw_activation(drv: NvmeDriver) -> None:  # OAES bit 9: Firmware Activation Notices
    drv.set_features(0x0B, 1 << 9)
    assert drv.get_features(0x0B).dw0 >> 9 & 1 == 1


def _frmw(drv: NvmeDriver) -> None:  # FRMW: slot 1 read-only, 3 slots, activation without reset
    if isinstance(drv.device, NvmeVirtualFunction):  # a secondary: the slots are the subsystem's
        frmw = drv.identify(0x01)[260]
        log = drv.get_log(0x03, 512)
        assert log[0] & 7 == 1 and log[8:16] == drv.identify(0x01)[64:72] and frmw >> 1 & 7 == 3
        assert drv.admin(0x10, cdw10=(3 << 3) | 3, check=False).code == INVALID_OPCODE  # the primary updates
        return
    image = firmware_image("9.9")
    for off in range(0, len(image), 4096):
        chunk = image[off:off + 4096]
        drv.admin(0x11, data=chunk, cdw10=len(chunk) // 4 - 1, cdw11=off // 4)
    drv.admin(0x10, cdw10=(3 << 3) | 3)  # CA=3: replace slot 3 and activate without a reset
    assert drv.get_log(0x03, 512)[0] & 7 == 3
    assert drv.identify(0x01)[64:72] == b"9.9     "
    assert drv.admin(0x10, cdw10=(0 << 3) | 1, check=False).code == Status.INVALID_FW_SLOT  # slot 1 is RO


def _ctratt_elbas(drv: NvmeDriver) -> None:  # CTRATT bit 15: extended LBA formats (CNS 05h, CSI 0)
    ns = drv.identify(0x05, nsid=1, csi=0)
    assert len(ns) == 4096


def _ctratt_endurance_groups(drv: NvmeDriver) -> None:  # CTRATT bit 4: endurance group 1 (ENDGIDMAX)
    assert _u16(drv.identify(0x01), 340) == 1 and _u16(drv.identify(0x00, nsid=1), 102) == 1  # ENDGIDMAX, ENDGID
    assert struct.unpack_from("<HH", drv.identify(0x19), 0) == (1, 1)  # CNS 19h: one group, 1
    info = drv.admin(0x02, nsid=0, cdw10=(127 << 16) | 0x09, cdw11=1 << 16, length=512).tag  # LSI = 1
    assert int.from_bytes(info[112:128], "little") == int.from_bytes(drv.get_log(0x02, 512)[80:96], "little")
    bad = drv.admin(0x02, nsid=0, cdw10=(127 << 16) | 0x09, cdw11=2 << 16, length=512, check=False)
    assert bad.code == Status.INVALID_FIELD


def _oaes_eg_event(drv: NvmeDriver) -> None:  # OAES bit 14: Endurance Group Event Aggregate notices
    drv.set_features(0x0B, 1 << 14)
    drv.set_features(0x18, 1 | 0x0D << 16)  # group 1: spare, reliability, read-only
    before = len(drv.events)
    drv.arm_aer()
    drv.device.inject_critical_warning(1 << 2)  # reliability degraded
    try:
        deadline = time.monotonic() + 2.0
        while (2, 0x06, 0x0F) not in drv.events[before:] and time.monotonic() < deadline:
            drv.get_log(0x04, 4096)  # notices stay masked after another exerciser's until its log is read
            if drv.poll_events(0.1):
                drv.arm_aer()
        assert (2, 0x06, 0x0F) in drv.events[before:], drv.events
        assert struct.unpack_from("<QH", drv.get_log(0x0F, 512), 0) == (1, 1)
        assert struct.unpack_from("<Q", drv.get_log(0x0F, 512), 0) == (0,)  # read with RAE clear: emptied
    finally:
        drv.device.inject_critical_warning(0)


def _kas(drv: NvmeDriver) -> None:  # KAS: Keep Alive, Set Features 0Fh
    drv.set_features(0x0F, 10000)
    assert drv.get_features(0x0F).dw0 == 10000
    drv.admin(0x18)


def _ocfs(drv: NvmeDriver) -> None:  # OCFS bit 0: the controller copy format 0
    bs = drv.lba_size(1)
    data = bytes([7]) * bs
    drv.write(1, slba=40, data=data)
    rng = drv.machine.alloc(4096, 4096)
    try:
        drv.mem.write(rng, struct.pack("<8xQH22x", 40, 0).ljust(32, b"\0"))
        drv.io(1, 0x19, nsid=1, cdw10=41, cdw12=0, prp1=rng)
    finally:
        drv.machine.free(rng)
    assert drv.read(1, slba=41, nlb=1) == data


def _icsvscc(drv: NvmeDriver) -> None:  # ICSVSCC bit 0: format of NVMe vendor specific (nothing to use)
    pass


def _dlfeat(drv: NvmeDriver) -> None:  # DLFEAT: deallocated reads zeros; Write Zeroes may deallocate
    bs = drv.lba_size(1)
    drv.write(1, slba=60, data=b"\x11" * bs)
    drv.io(1, 0x08, nsid=1, cdw10=60, cdw12=1 << 25)  # Write Zeroes, DEAC
    assert drv.read(1, slba=60, nlb=1) == bytes(bs)


def _nsfeat_optperf(drv: NvmeDriver) -> None:  # NSFEAT bit 4: NPWG/NPWA/NPDG/NPDA/NOWS valid
    ns = drv.identify(0x00, nsid=1)
    npwg, npwa, npdg, npda, nows = struct.unpack_from("<5H", ns, 64)
    assert npwg >= 0 and nows >= 0 and npdg >= 0 and npwa >= 0 and npda >= 0


def _nsfeat_nsabp(drv: NvmeDriver) -> None:  # NSFEAT bit 1: NAWUN/NAWUPF/NACWU are this namespace's
    nawun, nawupf, nacwu = struct.unpack_from("<3H", drv.identify(0x00, nsid=1), 34)
    assert nawun and nawupf <= nawun and nacwu == 0
    ctrl = drv.device
    ns = ctrl.namespaces[1]
    assert ctrl.atomicity.limits(ns).unit == nawun + 1 and ctrl.atomicity.serialises(ns)
    data = bytes(range(256)) * 2 * (nawun + 1)  # one atomic unit, under its range lock
    drv.write(1, 16 * (nawun + 1), data)
    assert drv.read(1, 16 * (nawun + 1), nawun + 1) == data
    assert ctrl.atomicity.locks.held == 0


def _nsfeat_dae(drv: NvmeDriver) -> None:  # NSFEAT bit 2: Error Recovery DULBE works
    bs = drv.lba_size(1)
    page = max(1, 4096 // bs)  # the backend's hole granularity, in blocks
    slba = drv.namespaces[1].nsze // 2 // page * page
    drv.io(1, 0x08, nsid=1, cdw10=slba, cdw12=(1 << 25) | (2 * page - 1))  # Write Zeroes, DEAC: 2 pages
    drv.write(1, slba=slba, data=b"\x5a" * bs * page)
    drv.set_features(0x05, 1 << 16, nsid=1)
    try:
        assert drv.get_features(0x05, nsid=1).dw0 == 1 << 16
        drv.io(1, 0x0C, nsid=1, cdw10=slba, cdw12=page - 1)  # Verify: written
        comp = drv.io(1, 0x0C, nsid=1, cdw10=slba, cdw12=2 * page - 1, check=False)
        assert comp.code == Status.DEALLOCATED_OR_UNWRITTEN and comp.dnr
    finally:
        drv.set_features(0x05, 0, nsid=1)


def _css_ncss(drv: NvmeDriver) -> None:  # CAP.CSS bit 0: the NVM command set
    assert drv.read64(0) >> 37 & 1


def _css_iocs(drv: NvmeDriver) -> None:  # CAP.CSS bit 6: I/O command sets (CC.CSS = 110b)
    drv.disable()
    drv.enable(css=6)
    drv.probe()


def _crms_crwms(drv: NvmeDriver) -> None:  # CAP.CRMS bit 0: ready with media (CC.CRIME=0), CRTO.CRWMT
    crwmt = drv.read32(0x68) & 0xFFFF  # CRTO.CRWMT, 500 ms units; CAP.TO mirrors it (up to FFh)
    assert crwmt and min(crwmt, 0xFF) == drv.read64(0) >> 24 & 0xFF
    assert drv.read32(0x14) >> 24 & 1 == 0 and drv.csts & 1


def _nssrs(drv: NvmeDriver) -> None:  # CAP.NSSRS: "NVMe" in NSSR resets, CSTS.NSSRO says so
    drv.subsystem_reset()
    assert drv.csts & 1 << 4 and not drv.read32(0x14) & 1  # NSSRO set, CC.EN cleared
    drv.write32(0x1C, 1 << 4)  # RW1C
    assert not drv.csts & 1 << 4
    drv.restart()
    bs = drv.lba_size(1)
    drv.write(1, slba=0, data=b"\x42" * bs)
    assert drv.read(1, slba=0, nlb=1) == b"\x42" * bs


def _cmbs(drv: NvmeDriver) -> None:  # CAP.CMBS: a CMB with SQs and data in it
    drv.cmb_enable()
    drv.delete_io_queue_pair(1)
    drv.create_io_queue_pair(1, 16, sq_in_cmb=True)
    bs = drv.lba_size(1)
    buf = drv.cmb_alloc(4096)
    drv.cmb_write(buf, b"\x6c" * bs)
    drv.io(1, 0x01, nsid=1, cdw10=90, cdw12=0, prp1=buf)  # Write from the CMB, through an SQ in it
    assert drv.read(1, slba=90, nlb=1) == b"\x6c" * bs
    drv.delete_io_queue_pair(1)
    drv.create_io_queue_pair(1, drv.io_depth)


def _pmrs(drv: NvmeDriver) -> None:  # CAP.PMRS: the PMR enables and becomes ready within PMRTO
    drv.write32(0xE04, 1)  # PMRCTL.EN
    timeout = (drv.read32(0xE00) >> 16 & 0xFF) * 0.5 or 0.5  # PMRTO, 500 ms units
    deadline = time.monotonic() + timeout
    while drv.read32(0xE08) & 1 << 8:  # PMRSTS.NRDY
        assert time.monotonic() < deadline, "PMR not ready within PMRTO"
        time.sleep(0.005)


def _oncs_save(drv: NvmeDriver) -> None:  # ONCS bit 4: SEL in Get Features (supported capabilities)
    assert drv.get_features(0x04, sel=3).ok


def _oncs_timestamp(drv: NvmeDriver) -> None:  # ONCS bit 6: Timestamp feature
    drv.set_features(0x0E, data=(1234567).to_bytes(8, "little"))
    ts = int.from_bytes(drv.get_features(0x0E, length=8).tag[:6], "little")
    assert 1234567 <= ts < 1234567 + 60_000


def _cmic_multi_ctrl(drv: NvmeDriver) -> None:  # CMIC bit 1: the subsystem has two or more controllers
    ids = drv.identify(0x13)
    n = _u16(ids, 0)
    cntlids = struct.unpack_from(f"<{n}H", ids, 2)
    assert n >= 2 and _u16(drv.identify(0x01), 78) in cntlids


def _cmic_sriov_vf(drv: NvmeDriver) -> None:  # CMIC bit 2: a controller of an SR-IOV VF
    ctrl = drv.device
    assert isinstance(ctrl, NvmeVirtualFunction) and ctrl.physfn is not None
    assert _u16(drv.identify(0x01), 78) == ctrl.primary.cfg.cntlid + ctrl.vf_index + 1
    assert drv.identify(0x01)[768:1024] == identify_controller(ctrl.primary)[768:1024]  # one subsystem NQN


def _nmic_shared(drv: NvmeDriver) -> None:  # NMIC bit 0: namespace 1 attached to two controllers at once
    own = _u16(drv.identify(0x01), 78)
    attached = drv.identify(0x12, nsid=1)
    if _u16(attached, 0) < 2:  # the primary: attach it to secondary 1 too
        other = next(c for c in struct.unpack_from("<8H", drv.identify(0x13), 2) if c != own)
        drv.admin(0x15, nsid=1, data=struct.pack("<HH", 1, other).ljust(4096, b"\0"))
        attached = drv.identify(0x12, nsid=1)
        cntlids = struct.unpack_from(f"<{_u16(attached, 0)}H", attached, 2)
        drv.admin(0x15, nsid=1, cdw10=1, data=struct.pack("<HH", 1, other).ljust(4096, b"\0"))
    else:
        cntlids = struct.unpack_from(f"<{_u16(attached, 0)}H", attached, 2)
    assert len(cntlids) >= 2 and own in cntlids
    data = bytes(range(256)) * 2
    drv.write(1, 40, data)
    assert drv.read(1, 40, 1) == data


#: (field, bit) -> exerciser; CAP bits are ("cap", bit)
EXERCISERS: dict[tuple[str, int], Exerciser] = {
    ("vwc", 0): _vwc_present, ("vwc", 1): _flush_broadcast, ("vwc", 2): _flush_broadcast,
    ("sgls", 0): _sgl, ("sgls", 16): _sgl_bit_bucket,
    ("lpa", 0): _lpa_smart_per_ns, ("lpa", 1): _lpa_effects, ("lpa", 2): _lpa_extended, ("lpa", 5): _lpa_supported_logs,
    ("oaes", 8): _oaes_ns_attr, ("oaes", 9): _oaes_fw_activation, ("oaes", 14): _oaes_eg_event,
    ("frmw", 0): _frmw, ("frmw", 1): _frmw, ("frmw", 2): _frmw, ("frmw", 4): _frmw,
    ("ctratt", 15): _ctratt_elbas, ("ctratt", 4): _ctratt_endurance_groups,
    ("cmic", 1): _cmic_multi_ctrl, ("cmic", 2): _cmic_sriov_vf, ("nmic", 0): _nmic_shared,
    ("kas", 0): _kas,
    ("ocfs", 0): _ocfs,
    ("icsvscc", 0): _icsvscc,
    ("dlfeat", 0): _dlfeat, ("dlfeat", 3): _dlfeat,
    ("nsfeat", 4): _nsfeat_optperf, ("nsfeat", 1): _nsfeat_nsabp, ("nsfeat", 2): _nsfeat_dae,
    ("oncs", 4): _oncs_save, ("oncs", 6): _oncs_timestamp,
    ("cap", 36): _nssrs, ("cap", 56): _pmrs, ("cap", 57): _cmbs, ("cap", 37): _css_ncss,
    ("cap", 43): _css_iocs, ("cap", 59): _crms_crwms,
}

EXERCISERS.update(PROTECTION_EXERCISERS)  # metadata and protection information
EXERCISERS.update(COPY_EXERCISERS)  # Copy descriptor formats 1h..3h (OCFS bits 1..3)

#: fields walked: name -> (structure, offset, bytes); "idc" Identify Controller, "idns" Identify Namespace
FIELDS = {"oaes": ("idc", 92, 4), "ctratt": ("idc", 96, 4), "frmw": ("idc", 260, 1), "lpa": ("idc", 261, 1),
          "kas": ("idc", 320, 2), "fuses": ("idc", 522, 2), "fna": ("idc", 524, 1), "vwc": ("idc", 525, 1),
          "icsvscc": ("idc", 530, 1), "ocfs": ("idc", 534, 2), "sgls": ("idc", 536, 4),
          "cmic": ("idc", 76, 1), "nmic": ("idns", 30, 1),
          "nsfeat": ("idns", 24, 1), "mc": ("idns", 27, 1), "dpc": ("idns", 28, 1), "dlfeat": ("idns", 33, 1)}
#: CAP bits that are capabilities (not sizes or timeouts): CSS 37..44, NSSRS 36, BPS 45, CMBS 57, PMRS 56,
#: CRMS 59..60, NSSS 61
CAP_BITS = [36, *range(37, 45), 45, 56, 57, 59, 60, 61]
#: ONCS bits that are not commands (the command bits are walked against the effects log)
ONCS_FEATURE_BITS = (4, 6)


def _advertised(drv: NvmeDriver) -> list[tuple[str, int]]:
    structs = {"idc": drv.identify(0x01), "idns": drv.identify(0x00, nsid=1)}
    out = []
    for name, (which, off, size) in FIELDS.items():
        value = int.from_bytes(structs[which][off:off + size], "little")
        out += [(name, bit) for bit in range(8 * size) if value >> bit & 1]
    oncs = _u16(structs["idc"], 520)
    out += [("oncs", bit) for bit in ONCS_FEATURE_BITS if oncs >> bit & 1]
    cap = drv.read64(0)
    out += [("cap", bit) for bit in CAP_BITS if cap >> bit & 1]
    return out


def test_every_advertised_bit_has_an_exerciser(env):
    missing = [f"{name} bit {bit}" for name, bit in _advertised(env.drv) if (name, bit) not in EXERCISERS]
    assert missing == [], "advertised without a test that uses it: " + ", ".join(missing)


def test_every_advertised_bit_works(env):
    drv = env.drv
    seen: set[Exerciser] = set()
    for key in _advertised(drv):
        ex = EXERCISERS.get(key)
        if ex is None or ex in seen:
            continue
        seen.add(ex)
        # a secondary controller cannot format: the namespace's protection capabilities are
        # exercised through its primary (one namespace, shared)
        primary = getattr(env, "primary_drv", None)
        formats = key in PROTECTION_EXERCISERS or key in COPY_FORMATTING
        ex(primary if primary is not None and formats else drv)


def test_virtualization_management_works_exactly_when_advertised(env):
    drv = env.drv
    vms = _u16(drv.identify(0x01), 256) >> 7 & 1
    comp = drv.admin(0x1C, cdw10=0x8 | 2 << 16, cdw11=2, check=False)  # assign 2 VQ to secondary 2
    if not vms:
        assert comp.code == INVALID_OPCODE
        assert drv.admin(0x06, cdw10=0x14, length=4096, check=False).code == Status.INVALID_FIELD
        return
    assert comp.code == 0 and comp.dw0 == 2
    assert drv.admin(0x1C, cdw10=0x8 | 1 << 8 | 2 << 16, cdw11=1).dw0 == 1  # 1 VI
    drv.admin(0x1C, cdw10=0x9 | 2 << 16)  # online
    lst = drv.identify(0x15, cntid=2)
    assert lst[0] == 1 and struct.unpack_from("<HHB3xHHH", lst, 32) == (2, 0, 1, 2, 2, 1)
    drv.admin(0x1C, cdw10=0x7 | 2 << 16)  # offline
    drv.admin(0x1C, cdw10=0x8 | 2 << 16, cdw11=0)
    drv.admin(0x1C, cdw10=0x8 | 1 << 8 | 2 << 16, cdw11=0)
    assert struct.unpack_from("<HHB3xHHH", drv.identify(0x15, cntid=2), 32) == (2, 0, 0, 2, 0, 0)



def test_every_namespace_does_what_it_says(env):
    """Each namespace, in the format it was configured with, does what its Identify
    Namespace says (LBA format, metadata, PI): protected I/O works and the checks catch a
    wrong tag; with a CMB, the same with the data and metadata in it. Then the walk's
    exercisers run, and the protected namespaces still hold their data."""
    drv = env.drv
    for nsid in sorted(drv.namespaces):
        check_namespace(drv, nsid)
        if drv.read64(0) >> 57 & 1:  # CAP.CMBS
            check_namespace_via_cmb(drv, nsid)
    kept = {nsid: drv.read(nsid, 100, 1) for nsid in drv.namespaces if nsid != 1 and not drv.namespaces[nsid].extended}
    primary = getattr(env, "primary_drv", None)
    for key in _advertised(drv):
        if key not in PROTECTION_EXERCISERS and key[0] != "cap":
            # (a secondary cannot format: those exercisers run through its primary)
            EXERCISERS[key](primary if primary is not None and key in COPY_FORMATTING else drv)
    assert {nsid: drv.read(nsid, 100, 1) for nsid in kept} == kept


def test_dsto_with_sriov_each_controller_runs_its_own_self_test(tmp_path):
    """Regression: with SR-IOV, DSTO bit 0 said one device self-test in the NVM subsystem,
    but the primary and a secondary each ran one at once; it is clear now (one per
    controller), and they do."""
    e = make_env(_SRIOV, io_queues=1)
    try:
        for cdw10, nr in ((0x8 | 1 << 16, 3), (0x8 | 1 << 8 | 1 << 16, 2), (0x9 | 1 << 16, 0)):
            e.drv.admin(0x1C, cdw10=cdw10, cdw11=nr)
        vdrv = NvmeDriver(e.machine, e.pdev.enable_sriov(1)[0], io_queues=1, aers=0)
        try:
            vdrv.probe()
            for drv in (e.drv, vdrv):
                assert drv.identify(0x01)[318] & 1 == 0
            e.drv.device_self_test(1)
            vdrv.device_self_test(1)  # its own, beside the primary's
            assert vdrv.device_self_test(1, check=False).code == Status.SELF_TEST_IN_PROGRESS
            assert e.drv.device_self_test(1, check=False).code == Status.SELF_TEST_IN_PROGRESS
            for drv in (e.drv, vdrv):
                drv.device_self_test(0xF)
                assert drv.self_test_log()[4] == (1 << 4) | 1  # short, aborted by a Device Self-test command
        finally:
            vdrv.close()
    finally:
        e.close()
    plain = make_env("ns=mem:size=16M", io_queues=1)
    try:
        assert plain.drv.identify(0x01)[318] & 1  # one controller: one self-test in the subsystem
    finally:
        plain.close()



def test_nssr_resets_the_secondary_controllers_too():
    """Regression: the primary's NVM Subsystem Reset reset the primary alone; its online
    secondary controllers (of the same subsystem: CMIC bit 1, one subsystem NQN) stayed
    enabled with their queues. Now each is reset (CC and CSTS.RDY cleared; NSSRO stays clear:
    it is valid only with CAP.NSSRS, which a secondary has clear) and, enabled
    again, finds its data (crc32c-checked blocks written before)."""
    e = make_env(_SRIOV, io_queues=1)
    try:
        for cdw10, nr in ((0x8 | 1 << 16, 3), (0x8 | 1 << 8 | 1 << 16, 2), (0x9 | 1 << 16, 0)):
            e.drv.admin(0x1C, cdw10=cdw10, cdw11=nr)
        e.drv.admin(0x15, nsid=1, data=struct.pack("<HH", 1, 1).ljust(4096, b"\0"))
        vdrv = NvmeDriver(e.machine, e.pdev.enable_sriov(1)[0], io_queues=1, aers=0)
        try:
            vdrv.probe()
            blocks = [bytes([i]) * 512 for i in range(8)]
            vdrv.write(1, 0, b"".join(blocks))
            sums = [crc32c(b) for b in blocks]
            e.drv.subsystem_reset()
            assert vdrv.csts & (1 << 4 | 1) == 0 and vdrv.read32(0x14) == 0
            vdrv.restart()
            e.drv.restart()
            got = vdrv.read(1, 0, 8)
            assert [crc32c(got[i * 512:(i + 1) * 512]) for i in range(8)] == sums
        finally:
            vdrv.close()
    finally:
        e.close()


# -- multi-bit and numeric fields (_numeric_exercisers) ------------------------------------------
@pytest.mark.parametrize("field", sorted(NUMERIC_EXERCISERS))
def test_every_numeric_field_holds(env, field):
    """The limit or capability a multi-bit field reports is the one the controller enforces."""
    NUMERIC_EXERCISERS[field](env)
