"""NVM Subsystem Reset: CAP.NSSRS, the NSSR register ("NVMe" resets, any other value is
ignored), CSTS.NSSRO (set by the reset, write 1 to clear, kept across other resets),
and what the reset does: the controller is disabled and back to its defaults, the
namespaces keep their data."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from pcidev.pci.config import ResetKind
from pcidev_nvme.registers import CAP_NSSRS, CSTS_NSSRO, NSSR_MAGIC, REG_NSSR
from pcidev_nvme.status import Status

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


# ------------------------------------------------------------------------ a reset during a Format NVM
def _status(drv, opcode: int, nsid: int, lba: int) -> int:
    buf = drv.machine.alloc(4096)
    try:
        if opcode == 0x01:
            drv.machine.write(buf, b"\xee" * 512)
        cid = drv.submit(1, opcode, nsid=nsid, cdw10=lba, buf=buf, length=512)
        comp = drv.reap(1)[0]
        assert comp.cid == cid
        return comp.status & 0x7FF
    finally:
        drv.machine.free(buf)


def _reset(env, kind: str) -> None:
    drv = env.drv
    if kind == "nssr":
        drv.subsystem_reset()
        drv.restart()
    else:  # a Function Level Reset: the driver sets the function up again
        env.pdev.reset_function()
        for q in drv.queues.values():
            q.free()
        drv.queues.clear()
        drv.probe()


@pytest.mark.parametrize("kind", ["nssr", "flr"])
def test_a_reset_during_a_format_keeps_the_namespace_held_until_the_format_ends(nvme_env, kind):
    """An NVM Subsystem Reset or an FLR resets the controller at once, but the Format NVM
    runs on in the admin worker (a controller reset by CC.EN waits for it, as for any
    command in flight): until its end of format
    the namespace's I/O is Format In Progress (never the half-formatted namespace's
    blocks), then every block reads zeroes; the other namespace is untouched throughout."""
    env = nvme_env("ns=mem:size=1M,ns=mem:size=1M", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    blocks = {lba: bytes([lba + 1]) * 512 for lba in range(16)}
    for nsid in (1, 2):
        for lba, data in blocks.items():
            drv.write(nsid, lba, data)
    ns = ctrl.allocated[1]
    entered, gate = threading.Event(), threading.Event()
    real = ns.backend.deallocate

    def slow(offset, length):
        entered.set()
        assert gate.wait(20)
        return real(offset, length)

    ns.backend.deallocate = slow
    try:
        drv.submit(0, 0x80, nsid=1, cdw10=0)  # Format NVM, LBA format 0, no secure erase
        assert entered.wait(10)
        _reset(env, kind)
        assert ctrl.fsm_state == "ready"
        for op in (0x02, 0x01):  # neither the old blocks nor a write that the erase would undo
            assert _status(drv, op, 1, 3) == Status.FORMAT_IN_PROGRESS
        assert all(drv.read(2, lba, 1) == data for lba, data in blocks.items())
    finally:
        gate.set()
    deadline = time.monotonic() + 20
    while _status(drv, 0x02, 1, 0) == Status.FORMAT_IN_PROGRESS:
        assert time.monotonic() < deadline, "the format never ended"
    assert drv.read(1, 0, 16) == bytes(16 * 512)  # formatted: every block zeroes
    assert all(drv.read(2, lba, 1) == data for lba, data in blocks.items())
    drv.write(1, 5, b"\x55" * 512)
    assert drv.read(1, 5, 1) == b"\x55" * 512
    assert drv.admin(0x80, nsid=1, cdw10=0, check=False).ok  # and a new format is not "in progress"
