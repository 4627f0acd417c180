"""pcidev.regions.RegionMap: a BAR made of sub-regions, each with its own handler."""

from __future__ import annotations

import pytest

from pcidev.bar import CallbackHandler, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.errors import ConfigError
from pcidev.host import Machine
from pcidev.regions import RegionMap
from pcidev.testing import plugged


def test_dispatch_with_relative_offsets_and_unassigned_gaps():
    seen = []
    regions = RegionMap(0x4000, name="t")
    regs = RegisterMap(0x100, [Register("A", 0x10, 4, reset=7)])
    regions.add("regs", 0x0, 0x100, regs)
    regions.add("cb", 0x1000, 0x10, CallbackHandler(lambda off, size, w, v: seen.append((off, size, w, v)) or 42))
    assert regions.read(0x10, 4) == 7
    regions.write(0x10, 4, 9)
    assert regs["A"].value == 9
    assert regions.read(0x1004, 2) == 42
    regions.write(0x100C, 4, 5)
    assert seen == [(4, 2, False, 0), (12, 4, True, 5)]
    assert regions.read(0x2000, 4) == 0  # no region there
    regions.write(0x2000, 4, 1)
    assert regions.read(0x100E, 4) == 0  # straddles the end of a region
    assert len(seen) == 2
    assert regions.find(0x1000, 16) is regions["cb"] and regions.find(0x1000, 17) is None
    assert [r.name for r in regions] == ["regs", "cb"]
    regions.reset()
    assert regs["A"].value == 7


@pytest.mark.parametrize("offset, size", [(-1, 4), (0x3FF0, 0x20), (0x80, 0x100), (0x0, 0)])
def test_bad_or_overlapping_regions_are_refused(offset, size):
    regions = RegionMap(0x4000)
    regions.add("a", 0x100, 0x100, RegisterMap(0x100))
    with pytest.raises(ConfigError):
        regions.add("b", offset, size, RegisterMap(0x100))


def test_duplicate_names_are_refused():
    regions = RegionMap(0x100)
    regions.add("a", 0, 0x10, RegisterMap(0x10))
    with pytest.raises(ConfigError, match="duplicate"):
        regions.add("a", 0x20, 0x10, RegisterMap(0x10))


class RegionDevice(PciDevice):
    TYPE_NAME = "regions-test"
    VENDOR_ID, DEVICE_ID = 0x1B36, 0x00F3

    def describe(self) -> None:
        self.regs = RegisterMap(0x1000, [Register("R", 0, 4)])
        regions = RegionMap(0x4000)
        regions.add("regs", 0x1000, 0x1000, self.regs)
        self.add_mem_bar(2, 0x4000, regions, bits64=True)
        self.add_msix(1, bar=2, table_offset=0x3000, pba_offset=0x3800)
        self.add_standard_pcie_caps(aer=False)


def test_a_device_bar_with_regions_and_msix_and_reset():
    with Machine(ram_size=4 << 20) as machine:
        dev = RegionDevice()
        pdev = plugged(machine, dev)
        pdev.iowrite32(2, 0x1000, 0x55)
        assert pdev.ioread32(2, 0x1000) == 0x55 and dev.regs["R"].value == 0x55
        pdev.iowrite32(2, 0x3008, 0x1234)  # the MSI-X table stays the framework's
        assert pdev.ioread32(2, 0x3008) == 0x1234
        pdev.flr()
        assert dev.regs["R"].value == 0  # the regions' handlers were reset with the function
        dev.close()
