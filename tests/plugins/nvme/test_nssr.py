"""NVM Subsystem Reset: CAP.NSSRS, the NSSR register ("NVMe" resets, any other value is
ignored), CSTS.NSSRO (set by the reset, write 1 to clear, kept across other resets),
and what the reset does: the controller is disabled and back to its defaults, the
namespaces keep their data."""

from __future__ import annotations

import struct

import pytest

from pcidev.pci.config import ResetKind
from pcidev_nvme.registers import CAP_NSSRS, CSTS_NSSRO, NSSR_MAGIC, REG_NSSR

CAP, CC, CSTS, AQA = 0x00, 0x14, 0x1C, 0x24


@pytest.fixture
def env(nvme_env):
    return nvme_env("ns=mem:size=4M", io_queues=1)


def test_cap_advertises_nssr(env):
    assert env.pdev.ioread64(0, CAP) & CAP_NSSRS


def test_other_values_are_ignored_and_nssr_reads_zero(env):
    drv, pdev = env.drv, env.pdev
    for value in (0, 1, 0x4E564D64, 0x656D564E, 0xFFFFFFFF):
        pdev.iowrite32(0, REG_NSSR, value)
        assert pdev.ioread32(0, REG_NSSR) == 0
        assert pdev.ioread32(0, CSTS) & 1 and not pdev.ioread32(0, CSTS) & CSTS_NSSRO
    drv.write(1, 0, b"\x11" * 512)  # still working
    assert drv.read(1, 0, 1) == b"\x11" * 512


def test_subsystem_reset(env):
    drv, pdev, ctrl = env.drv, env.pdev, env.ctrl
    data = bytes(range(256)) * 8
    drv.write(1, 0, data)
    drv.set_features(0x08, 0x0A05)  # a feature that a reset clears
    drv.subsystem_reset()
    csts = pdev.ioread32(0, CSTS)
    assert csts & CSTS_NSSRO and not csts & 1  # not ready, NSSRO set
    assert pdev.ioread32(0, CC) == 0 and pdev.ioread32(0, AQA) == 0
    assert ctrl.fsm_state == "disabled" and not any(ctrl.submission_queues)
    drv.restart()
    assert pdev.ioread32(0, CSTS) & CSTS_NSSRO  # until the host clears it
    assert drv.get_features(0x08).dw0 == 0
    assert drv.read(1, 0, 4) == data
    # NSSRO survives a controller reset and a function level reset, not a power-on
    drv.disable()
    assert pdev.ioread32(0, CSTS) & CSTS_NSSRO
    ctrl.on_reset(ResetKind.FLR)
    assert pdev.ioread32(0, CSTS) & CSTS_NSSRO
    pdev.iowrite32(0, CSTS, 0)  # writing 0 changes nothing
    assert pdev.ioread32(0, CSTS) & CSTS_NSSRO
    pdev.iowrite32(0, CSTS, CSTS_NSSRO | 0x3)  # RW1C; RDY/CFS are read-only
    assert not pdev.ioread32(0, CSTS) & CSTS_NSSRO
    drv.restart()
    drv.subsystem_reset()
    ctrl.on_reset(ResetKind.POWER_ON)
    assert not pdev.ioread32(0, CSTS) & CSTS_NSSRO


def test_nssr_magic_is_nvme_in_ascii():
    assert struct.pack(">I", NSSR_MAGIC) == b"NVMe"


def test_subsystem_reset_disables_the_cmb_and_the_pmr(nvme_env, tmp_path):
    """NSSR resets CMBMSC and the PMR registers (PMRCTL.EN, PMRMSC) as a PCI reset does;
    the PMR's contents stay."""
    env = nvme_env(f"cmb_size=2,pmr={tmp_path}/pmr,pmr_size=1M,ns=mem:size=4M", io_queues=1)
    drv = env.drv
    pmrctl, pmrsts, pmrmscl, cmbmsc = 0xE04, 0xE08, 0xE14, 0x50
    drv.cmb_enable()
    assert drv.read32(cmbmsc) & 0b11 == 0b11
    drv.write32(pmrctl, 1)
    drv.write32(pmrmscl, 0x2 | 0x8000_0000)  # CMSE at a CBA
    env.pdev.bar_write(4, 0, 8, 0x1122334455667788)
    drv.subsystem_reset()
    assert drv.read32(CSTS) & CSTS_NSSRO
    assert drv.read32(cmbmsc) == 0
    assert drv.read32(pmrctl) == 0 and drv.read32(pmrmscl) == 0
    assert not drv.read32(pmrsts) & (1 << 8)  # NRDY back to its reset value (0)
    assert env.ctrl.pmr.window is None and env.ctrl.cmb.window is None
    assert env.pdev.bar_read(4, 0, 8) == 0x1122334455667788
    drv.restart()
    drv.write(1, 0, b"\x33" * 512)
    assert drv.read(1, 0, 1) == b"\x33" * 512


def test_nssro_stays_clear_when_the_reset_activates_firmware(nvme_env):
    from pcidev_nvme.logs import firmware_image

    env = nvme_env("ns=mem:size=1M", io_queues=0, aers=0)
    drv = env.drv
    image = firmware_image("2.0", bytes(4096))
    drv.admin(0x11, cdw10=len(image) // 4 - 1, cdw11=0, data=image)
    drv.admin(0x10, cdw10=(1 << 3) | 2)  # replace slot 2, activate at the next reset
    drv.subsystem_reset()
    assert not drv.read32(CSTS) & CSTS_NSSRO
    drv.restart()
    assert drv.identify(0x01)[64:72] == b"2.0     "
    drv.subsystem_reset()  # nothing pending: NSSRO set
    assert drv.read32(CSTS) & CSTS_NSSRO
