"""The SR-IOV extended capability's registers (pcidev.pci.capabilities.sriov): read-only
fields, NumVFs and ARI writable only while VF Enable is clear, NumVFs above TotalVFs
refused, First VF Offset / VF Stride recomputed on NumVFs and ARI writes, System Page Size
one supported bit, VF BARs sized by all-ones probing (at least a system page), the listener
told of VF Enable changes and of a reset, config_loaded rebuilding what derives from
the registers."""

from __future__ import annotations

import pytest

from pcidev.device import PciDevice
from pcidev.errors import ConfigError
from pcidev.pci import ids
from pcidev.pci.capabilities import sriov as sr
from pcidev.pci.capabilities.sriov import SriovCapability, VfBar
from pcidev.pci.config import ResetKind


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def vfs_enabled(self, num_vfs: int) -> None:
        self.events.append(("on", num_vfs))

    def vfs_disabled(self) -> None:
        self.events.append(("off", 0))


def layout(num_vfs: int, ari: bool) -> tuple[int, int]:
    return (1, 1) if ari else (0x80 + num_vfs, 2)


class Pf(PciDevice):
    def describe(self) -> None:
        self.cap = self.add_capability(SriovCapability(
            7, vf_device_id=0xABCD, layout=layout,
            vf_bars=[VfBar(0, 0x2000, bits64=True, prefetchable=True), VfBar(2, 0x100), VfBar(5, 0x10000)]))


@pytest.fixture
def pf():
    dev = Pf()
    dev.realize()
    dev.listener = dev.cap.listener = Listener()
    return dev


def rd(dev, rel, size):
    return dev.config_read(dev.cap.offset + rel, size)


def wr(dev, rel, size, value):
    dev.config_write(dev.cap.offset + rel, size, value)


def test_header_and_read_only_fields(pf):
    assert pf.cap.offset == 0x100
    hdr = pf.config_read(0x100, 4)
    assert hdr & 0xFFFF == ids.ExtCapId.SRIOV and (hdr >> 16) & 0xF == 1
    ro = {sr.CAP: (4, 0), sr.INITIAL_VF: (2, 7), sr.TOTAL_VF: (2, 7), sr.FUNC_LINK: (1, 0),
          sr.VF_DID: (2, 0xABCD), sr.SUP_PGSIZE: (4, 0x553), sr.VFM: (4, 0), sr.VF_OFFSET: (2, 0x80),
          sr.VF_STRIDE: (2, 2)}
    for rel, (size, value) in ro.items():
        assert rd(pf, rel, size) == value, hex(rel)
        wr(pf, rel, size, (1 << (8 * size)) - 1)
        assert rd(pf, rel, size) == value, hex(rel)
    # VF Migration is not supported: those control bits stay clear; status reads 0
    wr(pf, sr.CTRL, 2, sr.CTRL_VFM | sr.CTRL_INTR)
    assert rd(pf, sr.CTRL, 2) == 0 and rd(pf, sr.STATUS, 2) == 0
    # a BAR the VFs do not have is read-only zero
    wr(pf, sr.BAR + 4, 4, 0xFFFFFFFF)  # upper half of 64-bit VF BAR0 is writable ...
    wr(pf, sr.BAR + 12, 4, 0xFFFFFFFF)  # ... VF BAR3 does not exist
    assert rd(pf, sr.BAR + 12, 4) == 0


def test_num_vfs_and_offset_stride(pf):
    wr(pf, sr.NUM_VF, 2, 3)
    assert rd(pf, sr.NUM_VF, 2) == 3
    assert (rd(pf, sr.VF_OFFSET, 2), rd(pf, sr.VF_STRIDE, 2)) == (0x83, 2)
    wr(pf, sr.NUM_VF, 2, 8)  # above TotalVFs: refused
    assert rd(pf, sr.NUM_VF, 2) == 3
    wr(pf, sr.NUM_VF, 1, 0x07)  # a byte write works
    assert rd(pf, sr.NUM_VF, 2) == 7
    wr(pf, sr.CTRL, 2, sr.CTRL_ARI)
    assert (rd(pf, sr.VF_OFFSET, 2), rd(pf, sr.VF_STRIDE, 2)) == (1, 1)
    assert pf.cap.vf_routing_id(0x200, 6) == 0x207
    wr(pf, sr.CTRL, 2, 0)
    assert (rd(pf, sr.VF_OFFSET, 2), rd(pf, sr.VF_STRIDE, 2)) == (0x87, 2)
    assert pf.cap.vf_routing_id(0x200, 1) == 0x200 + 0x87 + 2


def test_vf_enable_locks_num_vfs_and_ari_and_tells_the_listener(pf):
    wr(pf, sr.NUM_VF, 2, 2)
    wr(pf, sr.CTRL, 2, sr.CTRL_VFE | sr.CTRL_MSE)
    assert pf.listener.events == [("on", 2)]
    assert pf.cap.vf_enable and pf.cap.vf_mse
    wr(pf, sr.NUM_VF, 2, 5)
    assert rd(pf, sr.NUM_VF, 2) == 2
    wr(pf, sr.CTRL, 2, sr.CTRL_VFE | sr.CTRL_MSE | sr.CTRL_ARI)
    assert not pf.cap.ari
    wr(pf, sr.CTRL, 2, sr.CTRL_VFE)  # MSE alone changes: no event
    assert pf.listener.events == [("on", 2)] and not pf.cap.vf_mse
    wr(pf, sr.CTRL, 2, 0)
    assert pf.listener.events == [("on", 2), ("off", 0)]
    wr(pf, sr.NUM_VF, 2, 5)
    assert rd(pf, sr.NUM_VF, 2) == 5


def test_system_page_size_and_vf_bar_sizing(pf):
    def probe(rel):
        wr(pf, rel, 4, 0xFFFFFFFF)
        return rd(pf, rel, 4)

    assert rd(pf, sr.SYS_PGSIZE, 4) == 1
    assert rd(pf, sr.BAR, 4) == 0xC  # 64-bit prefetchable
    assert probe(sr.BAR) == (~(0x2000 - 1) & 0xFFFFFFF0) | 0xC
    assert probe(sr.BAR + 4) == 0xFFFFFFFF
    assert probe(sr.BAR + 8) == ~(0x1000 - 1) & 0xFFFFFFF0  # 0x100 rounds up to a 4 KiB page
    assert probe(sr.BAR + 20) == ~(0x10000 - 1) & 0xFFFFFFF0
    for bad in (0, 3, 0x4, 0x8000_0000):  # not exactly one supported size
        wr(pf, sr.SYS_PGSIZE, 4, bad)
        assert rd(pf, sr.SYS_PGSIZE, 4) == 1, bad
    wr(pf, sr.SYS_PGSIZE, 4, 0x10)  # 64 KiB
    assert pf.cap.system_page_size == 0x10000
    assert probe(sr.BAR) == (~(0x10000 - 1) & 0xFFFFFFF0) | 0xC
    assert probe(sr.BAR + 8) == ~(0x10000 - 1) & 0xFFFFFFF0
    wr(pf, sr.BAR, 4, 0x1234_0000)
    wr(pf, sr.BAR + 4, 4, 0x80)
    assert pf.cap.vf_bar_base(0) == 0x80_1234_0000
    assert pf.cap.vf_bar_address(3, 0) == 0x80_1234_0000 + 3 * 0x10000
    assert pf.cap.vf_bar_size(2) == 0x10000 and pf.cap.vf_bar_size(1) == 0


def test_reset_clears_vf_enable_and_tells_the_listener(pf):
    wr(pf, sr.NUM_VF, 2, 1)
    wr(pf, sr.CTRL, 2, sr.CTRL_VFE | sr.CTRL_ARI)
    pf.reset(ResetKind.FLR)
    assert pf.listener.events == [("on", 1), ("off", 0)]
    assert rd(pf, sr.CTRL, 2) == 0 and rd(pf, sr.NUM_VF, 2) == 0
    assert rd(pf, sr.VF_OFFSET, 2) == 0x80
    wr(pf, sr.NUM_VF, 2, 3)  # writable again
    assert rd(pf, sr.NUM_VF, 2) == 3


def test_config_loaded_rebuilds_masks_without_signalling(pf):
    other = Pf()
    other.realize()
    other.cap.listener = Listener()
    wr(other, sr.NUM_VF, 2, 2)
    wr(other, sr.SYS_PGSIZE, 4, 0x10)
    wr(other, sr.CTRL, 2, sr.CTRL_VFE)
    pf.config.data[:] = other.config.data
    pf.caps.config_loaded()
    assert pf.listener.events == []
    wr(pf, sr.NUM_VF, 2, 5)  # VF Enable is set in the loaded registers: NumVFs is locked
    assert rd(pf, sr.NUM_VF, 2) == 2
    wr(pf, sr.BAR + 8, 4, 0xFFFFFFFF)
    assert rd(pf, sr.BAR + 8, 4) == ~(0x10000 - 1) & 0xFFFFFFF0
    wr(pf, sr.CTRL, 2, 0)  # and clearing it is a transition the listener hears
    assert pf.listener.events == [("off", 0)]


@pytest.mark.parametrize("kwargs, match", [
    ({"total_vfs": 0}, "TotalVFs"),
    ({"total_vfs": 0x10000}, "TotalVFs"),
    ({"vf_device_id": 0x10000}, "16 bits"),
    ({"supported_page_sizes": 2}, "4 KiB"),
    ({"vf_bars": [VfBar(5, 0x1000, bits64=True)]}, "out of range"),
    ({"vf_bars": [VfBar(0, 0x1000, bits64=True), VfBar(1, 0x1000)]}, "overlaps"),
    ({"vf_bars": [VfBar(0, 0x1800)]}, "not a valid BAR size"),
])
def test_bad_declarations_are_refused(kwargs, match):
    args = {"total_vfs": 2, "vf_device_id": 1, **kwargs}
    with pytest.raises(ConfigError, match=match):
        SriovCapability(args.pop("total_vfs"), **args)
