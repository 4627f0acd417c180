"""The Controller Memory Buffer (pcidev_nvme.cmb) through the software host: registers
and their transitions, SQs in the CMB with verified I/O, PRP/SGL data and PRP lists in
the CMB, the mixing rules, CQs in the CMB refused, resets, and migration of the CMB's
contents and registers (in process; between processes in test_cmb_process.py)."""

from __future__ import annotations

import os
import random
import struct

import attrs
import crc32c
import pytest
from _helpers import Env

from pcidev.bar import RamBacking
from pcidev.host import Machine
from pcidev.migration import descriptor_blockers
from pcidev.pci.config import ResetKind
from pcidev.testing import roundtrip
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.controller_memory import ControllerMemoryView
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import READ, WRITE, NvmeDriver, NvmeDriverError

CMB = "cmb_size=2,max_ioqpairs=4,msix_vectors=5,ns=mem:size=4M"
CMBLOC, CMBSZ, CMBMSC, CMBSTS, CMBEBS, CMBSWTP = 0x38, 0x3C, 0x50, 0x58, 0x5C, 0x60
INVALID_USE_OF_CMB = 0x12
CDPMLS, CDPCILS = 1 << 5, 1 << 6
CLOCK_FIELDS = ("smart.power_on_us", "smart.busy_us", "features.timestamp")


def _env(nvme_env, config: str = CMB, **kw) -> Env:
    kw.setdefault("io_queues", 2)
    return nvme_env(config, **kw)


def _cmb_sq(drv: NvmeDriver, qid: int = 2, size: int = 64) -> None:
    """Queue pair ``qid`` again, its SQ in the CMB."""
    if drv.cmb is None:
        drv.cmb_enable()
    drv.delete_io_queue_pair(qid)
    drv.create_io_queue_pair(qid, size, sq_in_cmb=True)


def _blocks(seed: int, n: int) -> bytes:
    rnd = random.Random(seed)
    return rnd.randbytes(512 * n)


def _crcs(data: bytes) -> list[int]:
    return [crc32c.crc32c(data[i:i + 512]) for i in range(0, len(data), 512)]


# ----------------------------------------------------------------------------- registers
def test_registers_and_their_transitions(nvme_env) -> None:
    env = _env(nvme_env)
    drv, ctrl, pdev = env.drv, env.ctrl, env.pdev
    assert (drv.cap >> 57) & 1  # CAP.CMBS
    sizes = pdev.size_bars()
    assert sizes[2][0] == 2 << 20
    bar2 = ctrl.bars[2]
    assert bar2 is not None and bar2.is_64bit and bar2.prefetchable and isinstance(bar2.handler, RamBacking)
    # 1.4 rule: CMBLOC and CMBSZ read 0 until CMBMSC.CRE
    assert (drv.read32(CMBLOC), drv.read32(CMBSZ), drv.read64(CMBMSC), drv.read32(CMBSTS)) == (0, 0, 0, 0)
    drv.write32(CMBMSC, 1)
    assert drv.read32(CMBLOC) == 2 | CDPMLS | CDPCILS  # BIR 2, OFST 0, lists anywhere
    # SQS, CQS=0, LISTS, RDS, WDS; SZU 1 MiB; SZ 2
    assert drv.read32(CMBSZ) == 0b11101 | (2 << 8) | (2 << 12)
    assert (drv.read32(CMBEBS), drv.read32(CMBSWTP)) == (0, 0)
    assert ctrl.cmb is not None and ctrl.cmb.window is None and ctrl.dma is env.machine.memory
    # a CBA whose range passes 2**64: CBAI, no controller memory space; CMBMSC reads back as written
    drv.write32(CMBMSC + 4, 0xFFFFFFFF)
    drv.write32(CMBMSC, 0xFFF00003)
    assert drv.read32(CMBSTS) == 1 and drv.read64(CMBMSC) == 0xFFFFFFFF_FFF00003 and ctrl.cmb.window is None
    # CMSE written 0 (or CRE 0): CBAI cleared
    drv.write32(CMBMSC, 0xFFF00001)
    assert drv.read32(CMBSTS) == 0
    drv.write32(CMBMSC, 0xFFF00003)
    assert drv.read32(CMBSTS) == 1
    drv.write32(CMBMSC, 0xFFF00002)  # with CRE 0, CMSE has no effect: no CBAI, no window, kept as written
    assert drv.read32(CMBSTS) == 0 and drv.read64(CMBMSC) & 3 == 2 and ctrl.cmb.window is None
    # a CBA not aligned to the 1 MiB size unit is valid (the spec asks only for the range)
    odd = pdev.bar_address(2) + 0x1000
    drv.write32(CMBMSC + 4, odd >> 32)
    drv.write32(CMBMSC, (odd & 0xFFFFFFFF) | 3)
    assert drv.read32(CMBSTS) == 0 and ctrl.cmb.window is not None and ctrl.cmb.window.start == odd
    # valid: CBAI cleared, controller memory space at CBA
    base, size = drv.cmb_enable()
    assert (base, size) == (pdev.bar_address(2), 2 << 20)
    assert drv.read32(CMBSTS) == 0 and drv.read64(CMBMSC) == base | 3
    view = ctrl.dma
    assert isinstance(view, ControllerMemoryView) and view.window_of(base) is ctrl.cmb.window
    assert view.window_of(base + size) is None and view.window_of(base - 1) is None
    # a controller reset and a function-level reset keep them; a conventional reset clears them
    drv.disable()
    assert drv.read64(CMBMSC) == base | 3
    ctrl.reset(ResetKind.FLR)
    regs = ctrl.regs  # (memory space is off after the reset: read the registers directly)
    assert (regs.read(CMBMSC, 8), regs.read(CMBSTS, 4), regs.read(CMBSZ, 4)) == (base | 3, 0, 0b11101 | 0x2200)
    assert ctrl.cmb.window is not None
    ctrl.reset(ResetKind.CONVENTIONAL)
    assert (regs.read(CMBMSC, 8), regs.read(CMBSTS, 4), regs.read(CMBSZ, 4)) == (0, 0, 0)
    assert ctrl.cmb.window is None


def test_cmbmsc_survives_a_function_level_reset(nvme_env) -> None:
    """Linux maps the CMB once (nvme_map_cmb returns early when it has one) and never
    writes CMBMSC after pci_reset_function: its CMB SQs must keep working."""
    env = _env(nvme_env)
    drv, pdev = env.drv, env.pdev
    _cmb_sq(drv, 2)
    buf = env.machine.alloc(8 * 4096)
    data = _blocks(77, 64)
    env.machine.write(buf, data[:8 * 4096])
    drv.io(2, WRITE, nsid=1, cdw10=0, cdw12=63, buf=buf, length=len(data[:8 * 4096]))
    pdev.reset_function()  # sysfs reset / error recovery: FLR with the header restored
    for q in drv.queues.values():
        q.free()
    drv.queues.clear()
    drv.probe()  # nvme_reset_work: nvme_map_cmb does nothing the second time
    assert drv.read64(CMBMSC) == drv.cmb[0] | 3 and drv.read32(CMBSTS) == 0
    drv.delete_io_queue_pair(2)
    drv.create_io_queue_pair(2, 64, sq_in_cmb=True)
    assert _crcs(drv.read(1, 0, 64, qid=2)) == _crcs(data)


def test_admin_sq_in_the_cmb(nvme_env) -> None:
    """CMBSZ.SQS covers the admin SQ: CC.EN with ASQ in the CMB works; ACQ there (CQS 0) is
    refused with CSTS.CFS."""
    env = _env(nvme_env)
    drv = env.drv
    drv.cmb_enable()
    drv.disable()  # (a controller reset keeps CMBMSC)
    drv.enable(admin_sq_in_cmb=True)
    assert drv.queues[0].sq_in_cmb
    ident = drv.identify(0x01)
    assert ident[:2] == drv.id_ctrl[:2]
    assert not env.machine.memory.is_mapped(drv.queues[0].sq_base, 64)
    drv.create_io_queue_pair(1, 16)  # admin commands fetched from the CMB
    data = _blocks(5, 8)
    buf = env.machine.alloc(4096)
    env.machine.write(buf, data)
    drv.io(1, WRITE, nsid=1, cdw10=8, cdw12=7, buf=buf, length=4096)
    assert drv.read(1, 8, 8) == data
    # ACQ in the CMB: CSTS.CFS
    drv.disable()
    pdev = env.pdev
    pdev.iowrite32(0, 0x24, (15 << 16) | 15)
    pdev.lo_hi_writeq(0, 0x28, env.machine.alloc(16 * 64, 4096))
    pdev.lo_hi_writeq(0, 0x30, drv.cmb_alloc(16 * 16))
    pdev.iowrite32(0, 0x14, (6 << 4) | (6 << 16) | (4 << 20) | 1)
    assert drv.read32(0x1C) & 3 == 2  # CFS, not RDY


def test_without_a_cmb_nothing_changes(nvme_env) -> None:
    env = _env(nvme_env, "ns=mem:size=1M")
    drv, ctrl = env.drv, env.ctrl
    assert not (drv.cap >> 57) & 1 and ctrl.cmb is None and ctrl.bars[2] is None
    drv.write32(CMBMSC, 3)
    assert (drv.read32(CMBLOC), drv.read32(CMBSZ), drv.read64(CMBMSC)) == (0, 0, 0)
    assert ctrl.dma is env.machine.memory  # the hot path hands out guest memory itself
    with pytest.raises(NvmeDriverError, match="no CMB"):
        drv.cmb_enable()


def test_cmb_size_must_be_in_range() -> None:
    from pcidev.errors import ConfigError

    with pytest.raises(ConfigError, match="cmb_size=5000 is out of range 0..4096"):
        NvmeController("cmb_size=5000")


# ----------------------------------------------------------------------------- SQ in the CMB
def test_sq_in_the_cmb_with_verified_io(nvme_env) -> None:
    env = _env(nvme_env)
    drv, m = env.drv, env.machine
    _cmb_sq(drv, 2)
    assert drv.queues[2].sq_in_cmb
    base, size = drv.cmb
    assert base <= drv.queues[2].sq_base < base + size
    want: dict[int, int] = {}
    buf = m.alloc(32 * 4096)
    for rnd in range(4):
        cids = []
        for k in range(32):  # QD 32: every SQE written into the CMB through BAR2, one doorbell
            slba = (rnd * 32 + k) * 8
            data = _blocks(rnd * 100 + k, 8)
            m.write(buf + k * 4096, data)
            cids.append(drv.submit_rw(2, WRITE, nsid=1, slba=slba, nlb=8, buf=buf + k * 4096, ring=False))
            for i, c in enumerate(_crcs(data)):
                want[slba + i] = c
        drv.ring(2)
        got = drv.reap(2, min_completions=32)
        assert len(got) == 32 and all(c.ok for c in got)
    for slba in range(0, 4 * 32 * 8, 64):  # read back through the CMB SQ as well
        data = drv.read(1, slba, 64, qid=2)
        assert _crcs(data) == [want[slba + i] for i in range(64)]
    # the fetch path read the SQEs from the CMB: host memory never held them
    assert not env.machine.memory.is_mapped(drv.queues[2].sq_base, 64)


def test_cq_in_the_cmb_is_refused(nvme_env) -> None:
    env = _env(nvme_env)
    drv = env.drv
    base, _ = drv.cmb_enable()
    drv.delete_io_queue_pair(2)
    comp = drv.admin(0x05, prp1=base, cdw10=(63 << 16) | 2, cdw11=(2 << 16) | 3, check=False)
    assert comp.code == INVALID_USE_OF_CMB and comp.dnr
    # an SQ straddling the CMB's end is refused too
    _, size = drv.cmb
    cq = env.machine.alloc(64 * 16, 4096)
    drv.admin(0x05, prp1=cq, cdw10=(63 << 16) | 2, cdw11=(2 << 16) | 3)
    comp = drv.admin(0x01, prp1=base + size - 4096, cdw10=(127 << 16) | 2, cdw11=(2 << 16) | 1, check=False)
    assert comp.code == INVALID_USE_OF_CMB and comp.dnr


# ----------------------------------------------------------------------------- data in the CMB
@pytest.mark.parametrize("nlb", [8, 16, 64])  # one page, PRP2 a page, PRP2 a list
def test_prp_data_in_the_cmb(nvme_env, nlb: int) -> None:
    env = _env(nvme_env)
    drv = env.drv
    drv.cmb_enable()
    wbuf, rbuf = drv.cmb_alloc(nlb * 512), drv.cmb_alloc(nlb * 512)
    data = _blocks(nlb, nlb)
    drv.cmb_write(wbuf, data)
    drv.io(1, WRITE, nsid=1, cdw10=100, cdw12=nlb - 1, buf=wbuf, length=len(data))
    drv.io(1, READ, nsid=1, cdw10=100, cdw12=nlb - 1, buf=rbuf, length=len(data))
    assert _crcs(drv.cmb_read(rbuf, len(data))) == _crcs(data)
    assert drv.read(1, 100, nlb) == data  # and through host memory


def test_a_prp_list_in_the_cmb(nvme_env) -> None:
    env = _env(nvme_env)
    drv, m = env.drv, env.machine
    drv.cmb_enable()
    # data in host memory, the PRP list in the CMB (LISTS); then data in the CMB, list in the CMB
    for in_cmb in (False, True):
        pages = [drv.cmb_alloc(4096) if in_cmb else m.alloc(4096, 4096) for _ in range(4)]
        plist = drv.cmb_alloc(64)
        drv.cmb_write(plist, struct.pack("<3Q", *pages[1:]))
        data = _blocks(in_cmb, 32)
        for i, p in enumerate(pages):
            chunk = data[i * 4096:(i + 1) * 4096]
            drv.cmb_write(p, chunk) if in_cmb else m.write(p, chunk)
        drv.io(1, WRITE, nsid=1, cdw10=200, cdw12=31, prp1=pages[0], prp2=plist)
        assert drv.read(1, 200, 32) == data


def test_sgl_data_in_the_cmb(nvme_env) -> None:
    env = _env(nvme_env)
    drv = env.drv
    drv.cmb_enable()
    assert int.from_bytes(drv.id_ctrl[536:540], "little") & 3  # SGLS
    buf = drv.cmb_alloc(8 * 512)
    data = _blocks(9, 8)
    drv.cmb_write(buf, data)
    drv.io(1, WRITE, nsid=1, cdw10=300, cdw12=7, segments=[(buf, 2048), (buf + 2048, 2048)])
    assert drv.read(1, 300, 8) == data


def test_mixing_cmb_and_host_memory_is_refused(nvme_env) -> None:
    env = _env(nvme_env)
    drv, m = env.drv, env.machine
    base, size = drv.cmb_enable()
    cmb_page, host_page = drv.cmb_alloc(4096), m.alloc(4096, 4096)
    cases = {
        "PRP1 in the CMB, PRP2 in host memory": dict(prp1=cmb_page, prp2=host_page),
        "PRP1 in host memory, PRP2 in the CMB": dict(prp1=host_page, prp2=cmb_page),
        "a piece straddling the CMB's end": dict(prp1=base + size - 512, prp2=0),
    }
    for what, ptrs in cases.items():
        nlb = 16 if ptrs["prp2"] else 2
        for op in (WRITE, READ):
            comp = drv.io(1, op, nsid=1, cdw10=0, cdw12=nlb - 1, check=False, **ptrs)
            assert comp.code == INVALID_USE_OF_CMB and comp.dnr, what
    # a PRP list mixing CMB and host pages
    plist = m.alloc(4096, 4096)
    m.write(plist, struct.pack("<3Q", host_page, cmb_page, host_page))
    comp = drv.io(1, WRITE, nsid=1, cdw10=0, cdw12=31, prp1=host_page, prp2=plist, check=False)
    assert comp.code == INVALID_USE_OF_CMB and comp.dnr
    # an SGL mixing them
    comp = drv.io(1, WRITE, nsid=1, cdw10=0, cdw12=7, segments=[(cmb_page, 2048), (host_page, 2048)],
                  check=False)
    assert comp.code == INVALID_USE_OF_CMB and comp.dnr
    assert Status.INVALID_USE_OF_CMB == INVALID_USE_OF_CMB


def test_without_controller_memory_space_cmb_addresses_are_host_addresses(nvme_env) -> None:
    env = _env(nvme_env)
    drv = env.drv
    base, _ = drv.cmb_enable()
    drv.write32(CMBMSC, 1)  # CMSE off: the controller no longer recognises its CMB
    comp = drv.io(1, WRITE, nsid=1, cdw10=0, cdw12=7, buf=base, length=4096, check=False)
    assert comp.code == Status.DATA_TRANSFER_ERROR


# ----------------------------------------------------------------------------- migration
def test_migration_with_sqes_waiting_in_the_cmb(nvme_env) -> None:
    """Commands sit in the CMB SQ (tail not rung) and their data in the CMB; after the
    round trip the destination fetches them from the adopted memfd."""
    env = _env(nvme_env)
    drv, pdev = env.drv, env.pdev
    _cmb_sq(drv, 2)
    want: dict[int, int] = {}
    bufs = [drv.cmb_alloc(4096) for _ in range(16)]
    for k, b in enumerate(bufs):
        data = _blocks(1000 + k, 8)
        drv.cmb_write(b, data)
        drv.submit_rw(2, WRITE, nsid=1, slba=k * 8, nlb=8, buf=b, ring=False)
        want.update({k * 8 + i: c for i, c in enumerate(_crcs(data))})
    src = env.ctrl
    assert src.cmb is not None
    assert "bar2-ram" in src.enabled_features() and descriptor_blockers(src, "TCP")
    regs = src.cmb.snapshot()
    src_fd = os.dup(src.cmb.ram.fd)
    try:
        dst = roundtrip(pdev, ignore=CLOCK_FIELDS)
        assert isinstance(dst, NvmeController) and dst.cmb is not None
        assert os.path.sameopenfile(dst.cmb.ram.fd, src_fd)  # the source's memfd, adopted
    finally:
        os.close(src_fd)
    assert dst.cmb.snapshot() == regs and regs.cmbmsc & 3 == 3
    assert isinstance(dst.dma, ControllerMemoryView)
    drv.ring(2)
    got = drv.reap(2, min_completions=16)
    assert len(got) == 16 and all(c.ok for c in got)
    data = drv.read(1, 0, 128, qid=2)
    assert _crcs(data) == [want[i] for i in range(128)]


def test_a_second_controller_on_the_same_machine_keeps_its_own_cmb() -> None:
    with Machine(ram_size=64 << 20) as machine:
        a, b = NvmeController(CMB, name="a"), NvmeController(CMB, name="b")
        try:
            da = NvmeDriver.attach(machine, a, io_queues=1, aers=0)
            db = NvmeDriver.attach(machine, b, io_queues=1, aers=0)
            ba, _ = da.cmb_enable()
            bb, _ = db.cmb_enable()
            assert ba != bb
            da.cmb_write(ba, b"A" * 64)
            db.cmb_write(bb, b"B" * 64)
            assert da.cmb_read(ba, 64) == b"A" * 64 and db.cmb_read(bb, 64) == b"B" * 64
        finally:
            a.close()
            b.close()


# ----------------------------------------------------------------------------- with a PMR as well
PMRCTL, PMRSTS, PMRMSCL, PMRMSCU = 0xE04, 0xE08, 0xE14, 0xE18


def _both(nvme_env, tmp_path) -> Env:
    return _env(nvme_env, f"cmb_size=2,pmr={tmp_path / 'pmr'},pmr_size=1M,max_ioqpairs=4,msix_vectors=5,"
                "ns=mem:size=4M")


def _pmr_on(drv: NvmeDriver, cba: int) -> int:
    drv.write32(PMRCTL, 1)
    while drv.read32(PMRSTS) & (1 << 8):
        pass
    drv.write32(PMRMSCU, cba >> 32)
    drv.write32(PMRMSCL, (cba & 0xFFFFF000) | 2)
    return drv.read32(PMRSTS)


def test_cmb_and_pmr_windows_may_not_overlap(nvme_env, tmp_path) -> None:
    env = _both(nvme_env, tmp_path)
    drv, ctrl = env.drv, env.ctrl
    assert ctrl.cmb is not None and ctrl.pmr is not None
    base, size = drv.cmb_enable()
    # the PMR's CBA inside the CMB's enabled range: PMRSTS.CBAI, no PMR window
    assert _pmr_on(drv, base + (1 << 20)) & (1 << 12) and ctrl.pmr.window is None
    # and the other way round: the PMR where it belongs, then a CMB CBA over it
    assert not _pmr_on(drv, env.pdev.bar_address(4)) & (1 << 12) and ctrl.pmr.window is not None
    pmr = env.pdev.bar_address(4)
    drv.write32(CMBMSC + 4, pmr >> 32)
    drv.write32(CMBMSC, (pmr & 0xFFFFFFFF) | 3)
    assert drv.read32(CMBSTS) == 1 and ctrl.cmb.window is None
    view = ctrl.dma
    assert isinstance(view, ControllerMemoryView) and [w.name for w in view.windows] == ["PMR"]
    drv.write32(CMBMSC, (base & 0xFFFFFFFF) | 3)
    drv.write32(CMBMSC + 4, base >> 32)
    assert drv.read32(CMBSTS) == 0 and {w.name for w in ctrl.dma.windows} == {"CMB", "PMR"}


def test_one_data_buffer_in_the_cmb_and_the_pmr_is_refused(nvme_env, tmp_path) -> None:
    env = _both(nvme_env, tmp_path)
    drv = env.drv
    drv.cmb_enable()
    pmr = env.pdev.bar_address(4)
    assert not _pmr_on(drv, pmr) & (1 << 12)
    cmb_page = drv.cmb_alloc(4096)
    for prp1, prp2 in ((cmb_page, pmr), (pmr, cmb_page)):
        for op in (WRITE, READ):
            comp = drv.io(1, op, nsid=1, cdw10=0, cdw12=15, prp1=prp1, prp2=prp2, check=False)
            assert comp.code == INVALID_USE_OF_CMB and comp.dnr
    comp = drv.io(1, WRITE, nsid=1, cdw10=0, cdw12=7, segments=[(cmb_page, 2048), (pmr, 2048)], check=False)
    assert comp.code == INVALID_USE_OF_CMB and comp.dnr
    # data wholly in the PMR with its PRP list in the CMB works (CMBLOC.CDPMLS)
    data = _blocks(11, 24)
    for i in range(0, len(data), 8):
        env.pdev.bar_write(4, i, 8, int.from_bytes(data[i:i + 8], "little"))
    plist = drv.cmb_alloc(64)
    drv.cmb_write(plist, struct.pack("<2Q", pmr + 4096, pmr + 8192))
    assert drv.io(1, WRITE, nsid=1, cdw10=40, cdw12=23, prp1=pmr, prp2=plist).ok
    assert drv.read(1, 40, 24) == data


# ----------------------------------------------------------------------------- the view's contract
def test_the_view_follows_the_guest_memory_contract(nvme_env) -> None:
    """Every accessor goes to the right memory; an access straddling the CMB's edge raises a
    DmaError (what completion posting, shadow doorbells and the SQ fetch expect) that is
    also the Invalid Use of Controller Memory Buffer status a command completes with."""
    from pcidev.errors import DmaError
    from pcidev_nvme.controller_memory import ControllerMemoryError
    from pcidev_nvme.status import NvmeStatusError

    env = _env(nvme_env)
    drv, ctrl, m = env.drv, env.ctrl, env.machine
    base, size = drv.cmb_enable()
    view = ctrl.dma
    assert isinstance(view, ControllerMemoryView)
    drv.cmb_write(base, struct.pack("<QQ", 0x1122334455667788, 0x99AABBCCDDEEFF00))
    assert (view.read_u8(base), view.read_u16(base), view.read_u32(base), view.read_u64(base)) == (
        0x88, 0x7788, 0x55667788, 0x1122334455667788)
    st = struct.Struct("<QQ")
    assert view.read_struct(st, base) == (0x1122334455667788, 0x99AABBCCDDEEFF00)
    view.write_u64(base + 16, 7)
    view.write_u16(base + 24, 8)
    view.write_u8(base + 26, 9)
    view.write_struct(st, base + 32, 1, 2)
    assert drv.cmb_read(base + 16, 32) == struct.pack("<QHB5xQQ", 7, 8, 9, 1, 2)
    assert view.region_at(base) is not None and view.region_at(base).name == "nvme-cmb"
    assert view.fd_of(base) >= 0
    host = m.alloc(4096, 4096)
    view.write_u64(host, 5)
    assert m.memory.read_u64(host) == 5 and view.region_at(host) == m.memory.region_at(host)
    assert view.regions() == m.memory.regions() and view.dirty is m.memory.dirty
    with pytest.raises(DmaError):
        view.map(0, 4096, -1)
    for access in (lambda: view.read_u64(base + size - 4), lambda: view.write_u32(base - 2, 0),
                   lambda: view.read(base - 8, 16), lambda: view.views(base + size - 8, 16)):
        with pytest.raises(ControllerMemoryError) as info:
            access()
        assert isinstance(info.value, DmaError) and isinstance(info.value, NvmeStatusError)
        assert info.value.status == INVALID_USE_OF_CMB


def test_a_window_change_never_unmaps_under_a_user(nvme_env) -> None:
    """A thread that took the DMA view before CMBMSC changed keeps a valid mapping."""
    env = _env(nvme_env)
    drv, ctrl = env.drv, env.ctrl
    base, _ = drv.cmb_enable()
    drv.cmb_write(base, b"12345678")
    old = ctrl.dma
    assert isinstance(old, ControllerMemoryView)
    drv.write32(CMBMSC, 1)  # controller memory space off
    assert ctrl.dma is env.machine.memory
    assert old.read(base, 8) == b"12345678"  # the old view still reads the CMB
    drv.cmb = None
    drv.cmb_enable()
    ctrl.reset(ResetKind.CONVENTIONAL)
    assert old.read(base, 8) == b"12345678"


def test_a_failed_nvme_load_leaves_the_cmb_window_on_the_destinations_own_memfd(monkeypatch) -> None:
    from pcidev.errors import StateError
    from pcidev.migration import load_device_stream, save_device_stream
    from pcidev_nvme.cmb import CmbState

    cba = 0x40_0000_0000
    src = NvmeController(CMB)
    dst = NvmeController(src.cfg)  # (the same configuration: serial, namespace identifiers)
    try:
        assert src.cmb is not None and dst.cmb is not None
        for ctrl, tag in ((src, b"source.."), (dst, b"own.....")):
            ctrl.cmb.restore(CmbState(cmbmsc=cba | 3, cmbsts=0))
            ctrl.cmb.ram.mem[:8] = tag
        src.quiesce()
        stream, fds = save_device_stream(src)

        def boom(*args: object) -> None:
            raise RuntimeError("refused on purpose")

        monkeypatch.setattr(dst.uncorrectable, "restore", boom)  # (after the CMB took its registers)
        with pytest.raises(StateError, match="refused on purpose"):
            load_device_stream(dst, stream, fds)
        assert not os.path.sameopenfile(dst.cmb.ram.fd, src.cmb.ram.fd)
        assert dst.cmb.window is not None and dst.cmb.window.memory.read(cba, 8) == b"own....."
    finally:
        src.close()
        dst.close()


def test_a_failure_while_describing_closes_the_cmb_and_the_pmr(monkeypatch, tmp_path) -> None:
    def boom(self: NvmeController) -> None:
        raise RuntimeError("describe failed on purpose")

    monkeypatch.setattr(NvmeController, "_describe_bars", boom)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError, match="on purpose"):
        NvmeController(f"cmb_size=2,pmr={tmp_path / 'pmr'},pmr_size=1M,ns=mem:size=1M")
    assert set(os.listdir("/proc/self/fd")) <= before  # the CMB's memfd and the PMR's file are closed


def test_migration_keeps_which_window_was_refused(nvme_env, tmp_path) -> None:
    """The PMR took an address first, the CMB was then refused (CBAI) there: after the
    round trip the same one is refused, whatever order the components restore in."""
    env = _both(nvme_env, tmp_path)
    drv, pdev = env.drv, env.pdev
    pmr = pdev.bar_address(4)
    assert not _pmr_on(drv, pmr) & (1 << 12)
    drv.write32(CMBMSC, 1)
    drv.write32(CMBMSC + 4, pmr >> 32)
    drv.write32(CMBMSC, (pmr & 0xFFFFFFFF) | 3)
    assert drv.read32(CMBSTS) == 1
    dst = roundtrip(pdev, ignore=CLOCK_FIELDS)
    assert isinstance(dst, NvmeController) and dst.cmb is not None and dst.pmr is not None
    assert dst.cmb.window is None and dst.pmr.window is not None and drv.read32(CMBSTS) == 1
    assert not drv.read32(PMRSTS) & (1 << 12)
    # a stream whose CMB and PMR both claim the same addresses is refused
    from pcidev_nvme.cmb import CmbState
    from pcidev_nvme.migration import check
    from pcidev_nvme.pmr import PmrState

    state = dst.get_device_state()
    forged = attrs.evolve(state, cmb=CmbState(cmbmsc=pmr | 3, cmbsts=0),
                          pmr=PmrState(pmrctl=1, pmrmscl=(pmr & 0xFFFFF000) | 2, pmrmscu=pmr >> 32, cbai=False,
                                       ready=True))
    with pytest.raises(Exception, match="controller memory spaces overlap"):
        check(dst, forged)


# ----------------------------------------------------------------------------- legacy (pre-1.4) CMB
LEGACY = "cmb_size=2,legacy-cmb=on,max_ioqpairs=4,msix_vectors=5,ns=mem:size=4M"


def test_legacy_cmb_registers(nvme_env) -> None:
    """legacy-cmb=on: CAP.CMBS clear, CMBLOC/CMBSZ valid from the start, CMBMSC/CMBSTS
    reserved (read 0, writes ignored), the CMB at BAR2's address with no CMBMSC write."""
    env = _env(nvme_env, LEGACY)
    drv, ctrl, pdev = env.drv, env.ctrl, env.pdev
    assert not (drv.cap >> 57) & 1  # CAP.CMBS: no CMBMSC
    assert drv.read32(CMBLOC) == 2 | CDPMLS | CDPCILS
    assert drv.read32(CMBSZ) == 0b11101 | (2 << 8) | (2 << 12)  # SQS LISTS RDS WDS, 1 MiB units, 2
    drv.write32(CMBMSC, 3)
    drv.write32(CMBMSC + 4, 0x1234)
    assert (drv.read64(CMBMSC), drv.read32(CMBSTS)) == (0, 0)
    assert ctrl.cmb is not None and ctrl.cmb.enabled_range == (pdev.bar_address(2), pdev.bar_address(2) + (2 << 20))
    assert isinstance(ctrl.dma, ControllerMemoryView)
    base, size = drv.cmb_enable()
    assert (base, size) == (pdev.bar_address(2), 2 << 20)
    assert drv.read64(CMBMSC) == 0  # the driver wrote nothing there
    # memory decoding off: no controller memory space; on again: back at BAR2
    cmd = pdev.config_read(0x04, 2)
    pdev.config_write(0x04, 2, cmd & ~0x2)
    assert ctrl.cmb.enabled_range is None and ctrl.dma is env.machine.memory
    pdev.config_write(0x04, 2, cmd)
    assert ctrl.cmb.enabled_range == (base, base + size)


def test_legacy_cmb_follows_bar2(nvme_env) -> None:
    """The legacy CMB's controller memory space is wherever the guest puts BAR2."""
    env = _env(nvme_env, LEGACY)
    ctrl, pdev = env.ctrl, env.pdev
    assert ctrl.cmb is not None
    old = pdev.bar_address(2)
    new = old + (64 << 20)
    cmd = pdev.config_read(0x04, 2)
    pdev.config_write(0x04, 2, cmd & ~0x2)  # as a kernel moving a BAR: decoding off first
    pdev.config_write(0x18, 4, (new & 0xFFFFFFFF) | 0xC)
    pdev.config_write(0x1C, 4, new >> 32)
    assert ctrl.cmb.enabled_range is None
    pdev.config_write(0x04, 2, cmd)
    assert ctrl.cmb.enabled_range == (new, new + (2 << 20))
    pdev.config_write(0x04, 2, cmd & ~0x2)
    pdev.config_write(0x18, 4, (old & 0xFFFFFFFF) | 0xC)
    pdev.config_write(0x1C, 4, old >> 32)
    pdev.config_write(0x04, 2, cmd)
    assert ctrl.cmb.enabled_range == (old, old + (2 << 20))


def test_legacy_cmb_sqs_and_data_with_verified_io_and_migration(nvme_env) -> None:
    """SQ entries and data in the legacy CMB (Linux's use_cmb_sqes on an old kernel), data
    verified by crc32c before and after a migration round trip."""
    env = _env(nvme_env, LEGACY)
    drv, pdev = env.drv, env.pdev
    _cmb_sq(drv, 2)
    want: dict[int, int] = {}
    bufs = [drv.cmb_alloc(4096) for _ in range(8)]
    for k, b in enumerate(bufs):
        data = _blocks(2000 + k, 8)
        drv.cmb_write(b, data)
        drv.submit_rw(2, WRITE, nsid=1, slba=k * 8, nlb=8, buf=b, ring=k < 4)
        want.update({k * 8 + i: c for i, c in enumerate(_crcs(data))})
    assert all(c.ok for c in drv.reap(2, min_completions=4))
    dst = roundtrip(pdev, ignore=CLOCK_FIELDS)  # four SQEs still waiting in the CMB
    assert isinstance(dst, NvmeController) and dst.cmb is not None and dst.cmb.legacy
    assert dst.cmb.enabled_range == (pdev.bar_address(2), pdev.bar_address(2) + (2 << 20))
    assert dst.cmb.snapshot().cmbmsc == 0
    drv.ring(2)
    assert all(c.ok for c in drv.reap(2, min_completions=4))
    data = drv.read(1, 0, 64, qid=2)
    assert _crcs(data) == [want[i] for i in range(64)]
    back = drv.cmb_alloc(4096)
    drv.submit_rw(2, READ, nsid=1, slba=8, nlb=8, buf=back)
    assert all(c.ok for c in drv.reap(2, min_completions=1))
    assert _crcs(drv.cmb_read(back, 4096)) == [want[8 + i] for i in range(8)]


def test_legacy_cmb_needs_a_cmb() -> None:
    from pcidev.errors import ConfigError

    with pytest.raises(ConfigError, match="legacy_cmb=on needs a CMB"):
        NvmeController("legacy-cmb=on,ns=mem:size=1M", name="x")
