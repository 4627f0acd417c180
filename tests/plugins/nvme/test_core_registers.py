"""Controller core: PCI identity, BAR0 registers (QEMU nvme qtest cases included), the
CC/CSTS enable/disable/shutdown state machine with its validation, doorbells and resets."""

from __future__ import annotations

import time

import pytest

from pcidev.pci import ids
from pcidev.pci.capabilities.msix import MsixCapability
from pcidev.pci.config import ResetKind
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.controller import NvmeController

CAP, VS, INTMS, INTMC, CC, CSTS, AQA, ASQ, ACQ = 0x00, 0x08, 0x0C, 0x10, 0x14, 0x1C, 0x24, 0x28, 0x30
CC_VALID = (6 << 16) | (4 << 20) | (6 << 4)


def wait_csts(pdev, mask: int, value: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        csts = pdev.ioread32(0, CSTS)
        if csts & mask == value:
            return csts
        assert time.monotonic() < deadline, f"CSTS={csts:#x}"
        time.sleep(0.001)


@pytest.fixture
def raw(nvme_env):
    """A controller plugged in and bus-mastering, not enabled; admin queues allocated."""
    env = nvme_env(probe=False)
    env.pdev.enable_device()
    env.pdev.set_master()
    env.asq = env.machine.alloc(4096, 65536)
    env.acq = env.machine.alloc(4096, 65536)
    return env


def program_admin(env, *, aqa=(31 << 16) | 31) -> None:
    env.pdev.iowrite32(0, AQA, aqa)
    env.pdev.lo_hi_writeq(0, ASQ, env.asq)
    env.pdev.lo_hi_writeq(0, ACQ, env.acq)


# -- PCI identity -------------------------------------------------------------------------
def test_pci_identity_and_capabilities(raw):
    pdev = raw.pdev
    assert pdev.vendor == 0x1B36 and pdev.device_id == 0x0010
    assert pdev.class_code == 0x010802
    caps = {cid for _, cid in pdev.capabilities()}
    assert {ids.CapId.PM, ids.CapId.EXP, ids.CapId.MSIX} <= caps
    assert any(cid == ids.ExtCapId.ERR for _, cid, _ in pdev.ext_capabilities())
    pos = pdev.find_capability(ids.CapId.MSIX)
    assert (pdev.config_read16(pos + 2) & 0x7FF) + 1 >= 65
    assert pdev.config_read32(pos + 4) & 7 == 0  # table in BAR0
    assert pdev.config_read8(ids.INTERRUPT_PIN) == 1  # INTx fallback
    bars = pdev.size_bars()
    assert bars[0][1] == "mem64" and bars[0][0] >= 0x4000


def test_identity_is_configurable():
    ctrl = NvmeController(NvmeConfig(vendor_id=0x8086, device_id=0x5845, msix_vectors=129, max_ioqpairs=128,
                                     msix_bar=4))
    try:
        from pcidev.host import Machine
        with Machine() as m:
            pdev = m.plug(ctrl)
            pdev.enable_device()
            assert pdev.vendor == 0x8086 and pdev.device_id == 0x5845
            pos = pdev.find_capability(ids.CapId.MSIX)
            assert (pdev.config_read16(pos + 2) & 0x7FF) + 1 == 129
            assert pdev.config_read32(pos + 4) & 7 == 4  # table in BAR4, as QEMU
            assert pdev.config_read32(pos + 8) & 7 == 4
            assert 4 in pdev.size_bars()
    finally:
        ctrl.close()


# -- QEMU nvme-test.c "reg-read" ---------------------------------------------------------
def test_qemu_reg_read_cap_halves_and_64bit(raw):
    pdev = raw.pdev
    lo = pdev.ioread32(0, CAP)
    hi = pdev.ioread32(0, CAP + 4)
    cap64 = pdev.ioread64(0, CAP)
    assert cap64 == lo | (hi << 32)
    assert cap64 & 0xFFFF == 0x7FF  # MQES
    assert (cap64 >> 52) & 0xF == 4  # MPSMAX
    assert (cap64 >> 48) & 0xF == 0  # MPSMIN
    assert (cap64 >> 16) & 1 == 1  # CQR
    assert (cap64 >> 24) & 0xFF == 0xF  # TO
    assert (cap64 >> 32) & 0xF == 0  # DSTRD
    css = (cap64 >> 37) & 0xFF
    assert css & 1 and css & (1 << 6)  # NVM and I/O command sets
    assert pdev.ioread32(0, VS) == 0x00020000
    # 16-bit and 8-bit reads see the same bytes
    assert pdev.ioread16(0, CAP) == lo & 0xFFFF
    assert pdev.ioread8(0, CAP + 7) == hi >> 24


def test_mqes_is_configurable(nvme_env):
    env = nvme_env("mqes=255", probe=False)
    env.pdev.enable_device()
    assert env.pdev.ioread32(0, CAP) & 0xFFFF == 255


def test_read_only_registers_ignore_writes(raw):
    pdev = raw.pdev
    cap = pdev.ioread64(0, CAP)
    pdev.iowrite32(0, CAP, 0)
    pdev.iowrite32(0, VS, 0)
    pdev.iowrite32(0, CSTS, 0xFFFFFFFF)
    assert pdev.ioread64(0, CAP) == cap
    assert pdev.ioread32(0, VS) == 0x00020000
    assert pdev.ioread32(0, CSTS) == 0
    # doorbells are write-only and read 0
    assert pdev.ioread32(0, 0x1000) == 0


# -- enable / disable ------------------------------------------------------------------------
def test_enable_and_disable(raw):
    pdev = raw.pdev
    program_admin(raw)
    assert pdev.ioread32(0, AQA) == (31 << 16) | 31
    assert pdev.lo_hi_readq(0, ASQ) == raw.asq
    pdev.iowrite32(0, CC, CC_VALID | 1)
    assert wait_csts(pdev, 1, 1) & 0x2 == 0
    assert raw.ctrl.page_size == 4096
    pdev.iowrite32(0, CC, CC_VALID)
    wait_csts(pdev, 1, 0)
    # AQA/ASQ/ACQ survive a controller reset
    assert pdev.lo_hi_readq(0, ACQ) == raw.acq
    pdev.iowrite32(0, CC, CC_VALID | (2 << 7) | 1)  # MPS 16 KiB
    wait_csts(pdev, 1, 1)
    assert raw.ctrl.page_size == 16384


@pytest.mark.parametrize("cc, aqa, why", [
    (CC_VALID | (5 << 7), (31 << 16) | 31, "MPS above MPSMAX"),
    ((CC_VALID & ~(7 << 4)) | (1 << 4), (31 << 16) | 31, "reserved CSS"),
    ((CC_VALID & ~(7 << 4)) | (7 << 4), (31 << 16) | 31, "admin-only CSS not in CAP.CSS"),
    (CC_VALID | (1 << 11), (31 << 16) | 31, "weighted round robin not in CAP.AMS"),
    (CC_VALID, 31, "ACQS 0"),
    (CC_VALID, 31 << 16, "ASQS 0"),
])
def test_invalid_configuration_refuses_enable_with_cfs(raw, cc, aqa, why):
    pdev = raw.pdev
    program_admin(raw, aqa=aqa)
    pdev.iowrite32(0, CC, cc | 1)
    csts = pdev.ioread32(0, CSTS)
    assert csts & 1 == 0, why
    assert csts & 2, why
    # a reset (EN=0) clears CFS; a valid configuration then enables
    pdev.iowrite32(0, CC, 0)
    wait_csts(pdev, 3, 0)
    program_admin(raw)
    pdev.iowrite32(0, CC, CC_VALID | 1)
    wait_csts(pdev, 3, 1)


def test_unaligned_or_unmapped_admin_queue_refused(raw):
    pdev = raw.pdev
    program_admin(raw)
    pdev.lo_hi_writeq(0, ASQ, raw.asq + 4096)  # 4 KiB aligned, not 8 KiB
    pdev.iowrite32(0, CC, CC_VALID | (1 << 7) | 1)  # 8 KiB pages: ASQ must be 8 KiB aligned
    assert pdev.ioread32(0, CSTS) & 3 == 2
    pdev.iowrite32(0, CC, 0)
    wait_csts(pdev, 3, 0)
    pdev.lo_hi_writeq(0, ASQ, 0x7FFF_0000_0000)  # outside guest RAM
    pdev.iowrite32(0, CC, CC_VALID | 1)
    assert pdev.ioread32(0, CSTS) & 3 == 2


def test_cc_fields_frozen_while_enabled(raw):
    pdev = raw.pdev
    program_admin(raw)
    pdev.iowrite32(0, CC, CC_VALID | 1)
    wait_csts(pdev, 1, 1)
    pdev.iowrite32(0, CC, CC_VALID | (3 << 7) | 1)  # try to change MPS while enabled
    assert (pdev.ioread32(0, CC) >> 7) & 0xF == 0
    assert raw.ctrl.page_size == 4096


def test_shutdown_notification(nvme_env):
    env = nvme_env()
    drv = env.drv
    drv.write(1, 0, b"s" * 512)
    cc = drv.read32(CC)
    drv.write32(CC, cc | (1 << 14))  # normal shutdown
    deadline = time.monotonic() + 5
    while (drv.read32(CSTS) >> 2) & 3 != 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert drv.read32(CSTS) & 1  # still ready; the host resets next
    # no further commands are processed after shutdown
    drv.submit(1, 0x00, nsid=1)
    time.sleep(0.05)
    assert drv.poll(1) == []
    drv.write32(CC, cc & ~1 & ~(3 << 14))
    deadline = time.monotonic() + 5
    while drv.read32(CSTS) & 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert (drv.read32(CSTS) >> 2) & 3 == 0


def test_disable_deletes_queues_and_reenable_works(nvme_env):
    env = nvme_env(io_queues=2)
    drv = env.drv
    drv.write(1, 0, b"q" * 512)
    drv.disable()
    assert not env.ctrl.io_queues_exist()
    drv.enable()
    drv.create_io_queue_pair(1, 64)
    assert drv.read(1, 0, 1) == b"q" * 512


def test_flr_resets_controller(nvme_env):
    env = nvme_env()
    drv = env.drv
    drv.write(1, 0, b"f" * 512)
    env.pdev.reset_function()
    assert env.pdev.ioread32(0, CSTS) == 0
    assert env.pdev.ioread32(0, CC) == 0
    assert not env.ctrl.io_queues_exist()
    drv.queues.clear()
    env.pdev.set_master()
    drv.probe()
    assert drv.read(1, 0, 1) == b"f" * 512


def test_conventional_reset(nvme_env):
    env = nvme_env()
    env.ctrl.reset(ResetKind.CONVENTIONAL)
    assert env.ctrl.csts == 0
    assert env.ctrl.regs["CC"].value == 0 and env.ctrl.regs["AQA"].value == 0
    assert not env.ctrl.io_queues_exist()


def test_intms_intmc(raw):
    pdev = raw.pdev
    pdev.iowrite32(0, INTMS, 0x5)
    assert pdev.ioread32(0, INTMS) == 0x5
    assert pdev.ioread32(0, INTMC) == 0x5
    pdev.iowrite32(0, INTMS, 0x2)
    assert pdev.ioread32(0, INTMS) == 0x7
    pdev.iowrite32(0, INTMC, 0x1)
    assert pdev.ioread32(0, INTMC) == 0x6


def test_msix_table_behind_doorbells(raw):
    ctrl = raw.ctrl
    msix = ctrl.caps.find(MsixCapability)
    assert msix.table_offset >= 0x1000 + 8 * (ctrl.cfg.max_ioqpairs + 1)
    assert msix.table_offset % 4096 == 0 and msix.pba_offset % 4096 == 0


def test_doorbells_ignored_while_disabled(raw):
    raw.pdev.iowrite32(0, 0x1000, 5)
    raw.pdev.iowrite32(0, 0x1004, 5)
    assert raw.ctrl.csts == 0


def test_odd_sized_doorbell_writes_are_harmless(nvme_env):
    env = nvme_env()
    drv = env.drv
    for size in (1, 2):
        env.ctrl.bar_write(0, 0x1008, size, 1)
    env.ctrl.bar_write(0, 0x1008, 8, 0)  # 64-bit write = SQ1 tail 0, CQ1 head 0 (no change)
    assert drv.read(1, 0, 1) == bytes(512)
    assert env.ctrl.csts & 2 == 0


def test_handler_failure_sets_cfs(nvme_env):
    env = nvme_env()
    ctrl = env.ctrl

    def boom(*_a):
        raise RuntimeError("simulated internal bug")

    ctrl.admin.submit = boom  # a bug in the admin path while a doorbell is processed
    env.drv.submit(0, 0x06, cdw10=1)
    assert ctrl.csts & 0x2 == 0  # a failing command is completed with Internal Error instead
    comp = env.drv.reap(0)[0]
    assert comp.code == 0x006
    ctrl.regs["CC"].on_write = boom
    env.pdev.iowrite32(0, CC, env.pdev.ioread32(0, CC))
    assert ctrl.csts & 0x2  # CFS: the register handler itself failed
    assert ctrl.failed is not None
