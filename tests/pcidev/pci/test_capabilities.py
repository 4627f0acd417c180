"""Capability chains, Power Management, PCI Express (FLR), AER."""

from __future__ import annotations

import threading

import pytest

from pcidev.bar import RegisterMap
from pcidev.device import PciDevice
from pcidev.errors import ConfigError
from pcidev.host import Machine
from pcidev.pci import ids
from pcidev.pci.capabilities import aer, express, msix, pm
from pcidev.pci.capabilities.base import Capability, CapabilityList, ExtCapability, FunctionContext
from pcidev.pci.capabilities.msix import MsixCapability
from pcidev.pci.config import ConfigSpace, ResetKind


class VendorCap(Capability):
    CAP_ID = ids.CapId.VNDR
    SIZE = 8


class DsnCap(ExtCapability):
    CAP_ID = ids.ExtCapId.DSN
    SIZE = 12

    def setup(self) -> None:
        self.set(4, 8, 0x0123456789ABCDEF)


class FullDevice(PciDevice):
    TYPE_NAME = "full"
    VENDOR_ID, DEVICE_ID = 0x1B36, 0x00F1

    def describe(self) -> None:
        self.regs = RegisterMap(4096)
        self.add_mem_bar(0, 8192, self.regs)
        self.add_standard_pcie_caps()
        self.add_msi(4)
        self.add_msix(8, bar=0, table_offset=0x1000, pba_offset=0x1800)
        self.add_capability(VendorCap(offset=0xC0))
        self.add_capability(DsnCap())
        self.resets: list[ResetKind] = []

    def on_reset(self, kind: ResetKind) -> None:
        self.resets.append(kind)


@pytest.fixture
def host():
    with Machine() as m:
        p = m.plug(FullDevice())
        yield p


def test_chain_walks_from_capabilities_pointer(host) -> None:
    caps = host.capabilities()
    assert [c for _, c in caps] == [ids.CapId.PM, ids.CapId.EXP, ids.CapId.MSI, ids.CapId.MSIX, ids.CapId.VNDR]
    offsets = [o for o, _ in caps]
    assert offsets[0] == host.config_read8(ids.CAPABILITY_LIST)
    assert all(o % 4 == 0 and 0x40 <= o < 0x100 for o in offsets)
    assert 0xC0 in offsets  # pinned offset honoured
    # no two capabilities overlap
    dev = host.device
    spans = sorted((c.offset, c.offset + c.size) for c in dev.caps.standard)
    assert all(a1 <= b0 for (_, a1), (b0, _) in zip(spans, spans[1:], strict=False))
    assert host.config_read16(ids.STATUS) & ids.Status.CAP_LIST


def test_extended_chain(host) -> None:
    ext = host.ext_capabilities()
    assert ext[0][0] == 0x100
    assert [(cid, ver) for _, cid, ver in ext] == [(ids.ExtCapId.ERR, 2), (ids.ExtCapId.DSN, 1)]
    dsn = host.find_ext_capability(ids.ExtCapId.DSN)
    assert host.config_read32(dsn + 4) == 0x89ABCDEF
    assert host.config_read32(dsn + 8) == 0x01234567
    # the last header's next pointer is 0
    assert host.config_read32(dsn) >> 20 == 0


def test_no_capabilities_means_no_cap_list_bit() -> None:
    class Bare(PciDevice):
        pass

    d = Bare()
    d.realize()
    assert not d.config_read(ids.STATUS, 2) & ids.Status.CAP_LIST
    assert d.config_read(ids.CAPABILITY_LIST, 1) == 0
    assert d.config_read(0x100, 4) == 0


def test_capability_placement_errors() -> None:
    class Clash(PciDevice):
        def describe(self) -> None:
            self.add_capability(VendorCap(offset=0x40))
            self.add_capability(pm.PowerManagementCapability(offset=0x44))

    with pytest.raises(ConfigError):
        Clash().realize()

    class Misaligned(PciDevice):
        def describe(self) -> None:
            self.add_capability(VendorCap(offset=0x42))

    with pytest.raises(ConfigError):
        Misaligned().realize()


def test_power_management_states(host) -> None:
    host.enable_device()
    pos = host.find_capability(ids.CapId.PM)
    assert host.config_read16(pos + pm.PMC) & 0x7 == 3
    assert host.config_read16(pos + pm.PMCSR) & pm.NO_SOFT_RESET
    host.set_power_state(pm.D3HOT)
    assert host.config_read16(pos + pm.PMCSR) & 3 == 3
    # a function in D3hot does not decode its BARs
    assert host.ioread32(0, 0) == 0xFFFFFFFF
    host.set_power_state(1)  # D1 is not supported: ignored
    assert host.config_read16(pos + pm.PMCSR) & 3 == 3
    host.set_power_state(pm.D0)
    assert host.config_read16(pos + pm.PMCSR) & 3 == 0
    assert host.ioread32(0, 0) == 0


def test_pcie_capability_fields(host) -> None:
    pos = host.find_capability(ids.CapId.EXP)
    flags = host.config_read16(pos + express.FLAGS)
    assert flags & 0xF == 2 and (flags >> 4) & 0xF == 0
    devcap = host.config_read32(pos + express.DEVCAP)
    assert devcap & express.DEVCAP_FLR
    assert devcap & 0x7 == 1  # 256-byte MPS supported
    lnksta = host.config_read16(pos + express.LNKSTA)
    assert lnksta & 0xF == 3 and (lnksta >> 4) & 0x3F == 4
    # device status error bits are RW1C
    host.device.caps.find(express.PciExpressCapability).report_error("nonfatal")
    assert host.config_read16(pos + express.DEVSTA) & 2
    host.config_write16(pos + express.DEVSTA, 2)
    assert not host.config_read16(pos + express.DEVSTA) & 2


def test_flr_resets_function_but_keeps_sticky_and_link(host) -> None:
    dev: FullDevice = host.device
    host.enable_device()
    host.set_master()
    host.alloc_irq_vectors(1, 8)
    exp = host.find_capability(ids.CapId.EXP)
    aer_pos = host.find_ext_capability(ids.ExtCapId.ERR)
    host.config_write16(exp + express.LNKCTL, 0x0040)  # common clock
    host.config_write16(exp + express.DEVCTL, 0x2810 | 0x0F)  # enable error reporting
    host.config_write32(aer_pos + aer.UNCOR_MASK, 0x00001000)
    dev.caps.find(aer.AerCapability).report_uncorrectable(20)
    host.flr()
    assert dev.resets == [ResetKind.FLR]
    assert host.config_read16(ids.COMMAND) == 0  # decoding and bus master off
    assert dev.bar_address(0) == 0
    assert host.config_read16(exp + express.DEVCTL) == express.DEVCTL_DEFAULT  # initiate-FLR reads 0, fields reset
    assert host.config_read16(exp + express.LNKCTL) == 0x0040  # link control survives FLR
    assert host.config_read32(aer_pos + aer.UNCOR_STATUS) & (1 << 20)  # sticky
    assert host.config_read32(aer_pos + aer.UNCOR_MASK) == 0x00001000  # sticky
    msix = host.find_capability(ids.CapId.MSIX)
    assert not host.config_read16(msix + 2) & 0x8000  # MSI-X disabled
    assert dev.caps.find(type(dev.irq.msix)).entry(0)[2]  # vectors masked again
    # conventional reset: sticky survives, link control does not
    dev.reset(ResetKind.CONVENTIONAL)
    assert host.config_read16(exp + express.LNKCTL) == 0
    assert host.config_read32(aer_pos + aer.UNCOR_STATUS) & (1 << 20)
    # power-on reset clears sticky bits too
    dev.reset(ResetKind.POWER_ON)
    assert host.config_read32(aer_pos + aer.UNCOR_STATUS) == 0
    assert host.config_read32(aer_pos + aer.UNCOR_SEVER) == aer.UNCOR_SEVER_DEFAULT


def test_aer_registers(host) -> None:
    pos = host.find_ext_capability(ids.ExtCapId.ERR)
    cap = host.device.caps.find(aer.AerCapability)
    assert host.config_read32(pos + aer.COR_MASK) == aer.COR_MASK_DEFAULT
    cap.report_uncorrectable(18, header=b"\x01\x02\x03\x04")
    assert host.config_read32(pos + aer.UNCOR_STATUS) == 1 << 18
    assert host.config_read32(pos + aer.CAP_CTRL) & 0x1F == 18  # first error pointer
    assert host.config_read32(pos + aer.HEADER_LOG) == 0x04030201
    cap.report_uncorrectable(12)
    assert host.config_read32(pos + aer.CAP_CTRL) & 0x1F == 18  # still the first
    host.config_write32(pos + aer.UNCOR_STATUS, 1 << 18)
    assert host.config_read32(pos + aer.UNCOR_STATUS) == 1 << 12
    host.config_write32(pos + aer.UNCOR_STATUS, 0xFFFFFFFF)
    assert host.config_read32(pos + aer.UNCOR_STATUS) == 0
    cap.report_correctable(0)
    assert host.config_read32(pos + aer.COR_STATUS) == 1
    with pytest.raises(ValueError):
        cap.report_correctable(3)
    # header log is read-only
    host.config_write32(pos + aer.HEADER_LOG, 0)
    assert host.config_read32(pos + aer.HEADER_LOG) == 0x04030201


# -- a capability against a small fake of its function (FunctionContext) -----------------------
class FakeInterrupts:
    """The interrupt operations a capability uses, recorded."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.sent: list[tuple[int, int, int]] = []
        self.intx_updates = 0

    def send(self, vector: int, address: int, data: int) -> None:
        self.sent.append((vector, address, data))

    def update_intx(self) -> None:
        self.intx_updates += 1


class FakeFunction:
    """Just what :class:`FunctionContext` asks for: no PciDevice, no BARs, no host."""

    def __init__(self) -> None:
        self.config = ConfigSpace()
        self.irq = FakeInterrupts()
        self.resets: list[ResetKind] = []

    def request_reset(self, kind: ResetKind) -> None:
        self.resets.append(kind)


def _fake_with(*caps: Capability) -> FakeFunction:
    fn: FunctionContext = FakeFunction()
    chain = CapabilityList(fn)
    for cap in caps:
        chain.add(cap)
    chain.realize()
    return fn


def test_msix_delivers_through_the_function_context_and_latches_while_masked():
    cap = MsixCapability(4, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x800)
    fn = _fake_with(cap)
    fn.config.write(cap.offset + msix.CTRL, 2, msix.CTRL_ENABLE)
    assert fn.irq.intx_updates == 1  # enabling MSI-X turns INTx off
    cap.table_write(2 * msix.ENTRY_SIZE, 4, 0xFEE0_1000)
    cap.table_write(2 * msix.ENTRY_SIZE + 8, 4, 0x41)
    cap.notify(2)  # still masked (the reset value)
    assert fn.irq.sent == [] and cap.is_pending(2)
    cap.table_write(2 * msix.ENTRY_SIZE + msix.ENTRY_CTRL, 4, 0)
    assert fn.irq.sent == [(2, 0xFEE0_1000, 0x41)] and not cap.is_pending(2)
    cap.notify(2)
    assert fn.irq.sent[-1] == (2, 0xFEE0_1000, 0x41)


def test_msix_snapshot_and_restore_round_trip_and_refuse_another_size():
    cap = MsixCapability(4, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x800)
    _fake_with(cap)
    cap.table_write(0, 4, 0xFEE0_0000)
    cap.notify(1)  # masked: pending
    saved = cap.snapshot()
    cap.reset(ResetKind.CONVENTIONAL)
    assert cap.snapshot() != saved
    cap.restore(saved)
    assert cap.snapshot() == saved and cap.is_pending(1)
    other = MsixCapability(64, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x800)
    with pytest.raises(ConfigError):
        other.restore(saved)


def test_pm_and_flr_request_a_reset_from_the_function_context():
    pmc = pm.PowerManagementCapability(no_soft_reset=False)
    pcie = express.PciExpressCapability(flr=True)
    fn = _fake_with(pmc, pcie)
    fn.config.write(pmc.offset + pm.PMCSR, 2, pm.D3HOT)
    fn.config.write(pmc.offset + pm.PMCSR, 2, pm.D0)
    fn.config.write(pcie.offset + express.DEVCTL, 2, express.DEVCTL_BCR_FLR)
    assert fn.resets == [ResetKind.CONVENTIONAL, ResetKind.FLR]
