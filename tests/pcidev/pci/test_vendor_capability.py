"""pcidev.pci.capabilities.vendor: the vendor-specific capability (ID 09h) with its cap_len,
several per function, fixed bodies, writable registers and read hooks."""

from __future__ import annotations

import pytest

from pcidev.bar import RegisterMap
from pcidev.device import PciDevice
from pcidev.errors import ConfigError
from pcidev.host import Machine
from pcidev.pci import ids
from pcidev.pci.capabilities.vendor import VendorCapability
from pcidev.testing import plugged


class Counter(VendorCapability):
    """cap_len 12: a writable scratch dword at 4 and a read counter at 8."""

    def __init__(self) -> None:
        super().__init__(12)
        self.reads = 0

    def setup(self) -> None:
        super().setup()
        self.writable(4, 4, 0xFFFFFFFF)
        self.on_read(8, 4, self._count)

    def _count(self, offset: int, size: int) -> int | None:
        self.reads += 1
        return self.reads


class Device(PciDevice):
    TYPE_NAME = "vendor-cap-test"
    VENDOR_ID, DEVICE_ID = 0x1B36, 0x00F2

    def describe(self) -> None:
        self.add_mem_bar(0, 4096, RegisterMap(4096))
        self.fixed = self.add_capability(VendorCapability(7, body=b"\x01\x02\x03"))
        self.counter = self.add_capability(Counter())
        self.add_standard_pcie_caps(aer=False)


def test_vendor_capabilities_in_the_chain():
    with Machine(ram_size=4 << 20) as machine:
        dev = Device()
        pdev = plugged(machine, dev)
        vendor = [pos for pos, cap_id in pdev.capabilities() if cap_id == ids.CapId.VNDR]
        assert vendor == [dev.fixed.offset, dev.counter.offset]
        assert all(pos % 4 == 0 for pos in vendor)
        fixed, counter = vendor
        assert pdev.config_read8(fixed + 2) == 7 and pdev.config_read8(counter + 2) == 12
        assert [pdev.config_read8(fixed + 3 + i) for i in range(3)] == [1, 2, 3]
        assert counter >= fixed + 7  # no overlap with the 7-byte capability before it
        pdev.config_write8(fixed + 3, 0xFF)  # read-only body
        assert pdev.config_read8(fixed + 3) == 1
        pdev.config_write32(counter + 4, 0xDEADBEEF)
        assert pdev.config_read32(counter + 4) == 0xDEADBEEF
        assert [pdev.config_read32(counter + 8) for _ in range(3)] == [1, 2, 3]
        assert pdev.config_read32(counter + 4) == 0xDEADBEEF  # the hook covers only its range
        dev.close()


@pytest.mark.parametrize("length, body", [(2, b""), (193, b""), (4, b"\x01\x02")])
def test_bad_lengths_are_refused(length, body):
    with pytest.raises(ConfigError):
        VendorCapability(length, body=body)


class Broken(VendorCapability):
    def __init__(self) -> None:
        super().__init__(8)

    def setup(self) -> None:
        super().setup()
        self.set(4, 4, 0x1234)
        self.on_read(4, 4, self._boom)

    def _boom(self, offset: int, size: int) -> int | None:
        raise RuntimeError("read hook bug")


class BrokenDevice(PciDevice):
    TYPE_NAME = "broken-cap-test"
    VENDOR_ID, DEVICE_ID = 0x1B36, 0x00F5

    def describe(self) -> None:
        self.cap = self.add_capability(Broken())


def test_a_read_hook_that_raises_fails_the_device_instead_of_escaping():
    dev = BrokenDevice()
    dev.realize()
    assert dev.config_read(dev.cap.offset + 4, 4) == 0x1234  # the stored bytes
    assert isinstance(dev.failed, RuntimeError)
