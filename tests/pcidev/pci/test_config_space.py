"""Configuration space: write masks, BAR sizing, header, reset kinds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcidev.bar import RegisterMap
from pcidev.device import PciDevice
from pcidev.errors import ConfigError, ConfigSpaceError
from pcidev.host import Machine
from pcidev.pci import ids
from pcidev.pci.config import ConfigSpace, ResetKind


class BarsDevice(PciDevice):
    TYPE_NAME = "bars"
    VENDOR_ID, DEVICE_ID = 0x1B36, 0x00F0

    def describe(self) -> None:
        self.add_mem_bar(0, 4096, RegisterMap(4096))
        self.add_mem_bar(2, 1 << 33, RegisterMap(16), bits64=True, prefetchable=True)
        self.add_io_bar(4, 32, RegisterMap(32))
        self.add_mem_bar(5, 16, RegisterMap(16))
        self.add_standard_pcie_caps()


class PlainDevice(PciDevice):
    TYPE_NAME = "plain"

    def describe(self) -> None:
        self.add_mem_bar(0, 4096, RegisterMap(4096))


@pytest.fixture
def dev() -> BarsDevice:
    d = BarsDevice()
    d.realize()
    return d


def test_header_identity(dev: BarsDevice) -> None:
    assert dev.config_read(ids.VENDOR_ID, 2) == 0x1B36
    assert dev.config_read(ids.DEVICE_ID, 2) == 0x00F0
    assert dev.config_read(ids.VENDOR_ID, 4) == 0x00F01B36
    assert dev.config_read(ids.HEADER_TYPE, 1) == 0
    assert dev.config_read(ids.INTERRUPT_PIN, 1) == 1
    # read-only identity ignores writes
    dev.config_write(ids.VENDOR_ID, 4, 0xDEADBEEF)
    assert dev.config_read(ids.VENDOR_ID, 4) == 0x00F01B36


def test_bad_config_accesses_are_typed_errors(dev: BarsDevice) -> None:
    for off, size in ((4096, 1), (4095, 2), (-1, 1), (0, 3), (0, 8), (0, 0)):
        with pytest.raises(ConfigSpaceError):
            dev.config_read(off, size)
        with pytest.raises(ConfigSpaceError):
            dev.config_write(off, size, 0)


def test_command_register_mask(dev: BarsDevice) -> None:
    dev.config_write(ids.COMMAND, 2, 0xFFFF)
    assert dev.config_read(ids.COMMAND, 2) == 0x0547
    dev.config_write(ids.COMMAND, 2, 0)
    assert dev.config_read(ids.COMMAND, 2) == 0


def test_status_rw1c_clears_only_written_bits(dev: BarsDevice) -> None:
    cfg = dev.config
    cfg.set_bits(ids.STATUS, 2, ids.Status.REC_MASTER_ABORT | ids.Status.SIG_TARGET_ABORT)
    before = dev.config_read(ids.STATUS, 2)
    dev.config_write(ids.STATUS, 2, ids.Status.REC_MASTER_ABORT)
    after = dev.config_read(ids.STATUS, 2)
    assert after == before & ~ids.Status.REC_MASTER_ABORT
    assert after & ids.Status.SIG_TARGET_ABORT
    assert after & ids.Status.CAP_LIST  # read-only bit kept


def _sizing(dev: PciDevice, off: int) -> int:
    orig = dev.config_read(off, 4)
    dev.config_write(off, 4, 0xFFFFFFFF)
    val = dev.config_read(off, 4)
    dev.config_write(off, 4, orig)
    return val


def test_bar_sizing_32bit(dev: BarsDevice) -> None:
    assert _sizing(dev, 0x10) == 0xFFFFF000
    assert _sizing(dev, 0x24) == 0xFFFFFFF0  # 16-byte BAR5


def test_bar_sizing_64bit_prefetchable(dev: BarsDevice) -> None:
    lo = _sizing(dev, 0x18)
    hi = _sizing(dev, 0x1C)
    assert lo & 0xF == ids.BAR_MEM_TYPE_64 | ids.BAR_MEM_PREFETCH
    mask = (hi << 32) | (lo & ~0xF)
    assert (~mask & (2**64 - 1)) + 1 == 1 << 33


def test_bar_sizing_io(dev: BarsDevice) -> None:
    val = _sizing(dev, 0x20)
    assert val & 0x3 == ids.BAR_SPACE_IO
    assert (~(val & ~0x3) & 0xFFFFFFFF) + 1 == 32


def test_rom_without_rom_reads_zero_after_sizing(dev: BarsDevice) -> None:
    dev.config_write(ids.ROM_ADDRESS, 4, 0xFFFFF801)
    assert dev.config_read(ids.ROM_ADDRESS, 4) == 0


def test_rom_sizing_and_contents() -> None:
    class RomDevice(PlainDevice):
        def describe(self) -> None:
            super().describe()
            self.add_rom(b"\x55\xaa" + bytes(range(100)), 0x8000)

    with Machine() as m:
        p = m.plug(RomDevice())
        d = p.device
        d.config_write(ids.ROM_ADDRESS, 4, 0xFFFFF800)
        assert d.config_read(ids.ROM_ADDRESS, 4) == 0xFFFF8000
        d.config_write(ids.ROM_ADDRESS, 4, 0)
        assert p.rom_size() == 0x8000
        p.enable_device()
        data = p.read_rom(16)
        assert data[:2] == b"\x55\xaa" and data[2:16] == bytes(range(14))
        # disabled ROM decode reads all ones
        assert d.rom_read(0, 4) == 0xFFFFFFFF


def test_bar_address_assignment(dev: BarsDevice) -> None:
    dev.config_write(0x10, 4, 0xC0001000)
    assert dev.bar_address(0) == 0xC0001000
    dev.config_write(0x18, 4, 0)
    dev.config_write(0x1C, 4, 0x80)
    assert dev.bar_address(2) == 0x80_0000_0000
    dev.config_write(0x20, 4, 0x1000)
    assert dev.bar_address(4) == 0x1000


def test_bad_bar_declarations() -> None:
    class Bad(PciDevice):
        def describe(self) -> None:
            self.add_mem_bar(0, 3000, RegisterMap(3000))

    with pytest.raises(ConfigError):
        Bad()

    class Overlap(PciDevice):
        def describe(self) -> None:
            self.add_mem_bar(0, 4096, RegisterMap(4096), bits64=True)
            self.add_mem_bar(1, 4096, RegisterMap(4096))

    with pytest.raises(ConfigError):
        Overlap()

    class BadIo(PciDevice):
        def describe(self) -> None:
            self.add_io_bar(0, 512, RegisterMap(512))

    with pytest.raises(ConfigError):
        BadIo()


# -- hypothesis: masks ------------------------------------------------------------------

offsets = st.integers(0, 4095)
sizes = st.sampled_from([1, 2, 4])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(offsets, sizes, st.integers(0, 2**32 - 1)), max_size=40))
def test_random_writes_never_change_read_only_bits(writes) -> None:
    d = BarsDevice()
    d.realize()
    cfg = d.config
    before = bytes(cfg.data)
    ro = bytes(~(w | c) & 0xFF for w, c in zip(cfg.wmask, cfg.w1cmask, strict=True))
    for off, size, value in writes:
        if off + size > 4096:
            with pytest.raises(ConfigSpaceError):
                d.config_write(off, size, value)
            continue
        d.config_write(off, size, value)
    after = bytes(cfg.data)
    for i in range(4096):
        assert (before[i] & ro[i]) == (after[i] & ro[i]), f"read-only bits changed at {i:#x}"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_rw1c_clears_only_written_ones(rw1c_mask, initial, written) -> None:
    cfg = ConfigSpace()
    cfg.set_w1c(0x80, 4, rw1c_mask)
    cfg.set32(0x80, initial)
    cfg.write(0x80, 4, written)
    expected = initial & ~(written & rw1c_mask)
    assert cfg.get32(0x80) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 3), sizes)
def test_rw_mask_semantics_any_alignment(wmask, initial, written, shift, size) -> None:
    cfg = ConfigSpace()
    cfg.set_writable(0x80, 4, wmask)
    cfg.set32(0x80, initial)
    off = 0x80 + shift
    if shift + size > 4:
        size = 4 - shift
        if size == 3:
            size = 2
    cfg.write(off, size, written)
    field = ((1 << (8 * size)) - 1) << (8 * shift)
    w = (written << (8 * shift)) & field
    m = wmask & field
    assert cfg.get32(0x80) == (initial & ~m) | (w & m)


# -- reset kinds -------------------------------------------------------------------------

def test_reset_kinds_restore_and_keep() -> None:
    cfg = ConfigSpace()
    cfg.set_writable(0x40, 4, 0xFFFFFFFF)
    cfg.set_writable(0x44, 4, 0xFFFFFFFF)
    cfg.set_writable(0x48, 4, 0xFFFFFFFF)
    cfg.set_sticky(0x44, 4, 0x0000FFFF)
    cfg.set_flr_keep(0x48, 4, 0xFFFFFFFF)
    cfg.freeze_defaults()
    for off in (0x40, 0x44, 0x48):
        cfg.write(off, 4, 0x12345678)
    cfg.reset(ResetKind.FLR)
    assert (cfg.get32(0x40), cfg.get32(0x44), cfg.get32(0x48)) == (0, 0x5678, 0x12345678)
    for off in (0x40, 0x44, 0x48):
        cfg.write(off, 4, 0x12345678)
    cfg.reset(ResetKind.CONVENTIONAL)
    assert (cfg.get32(0x40), cfg.get32(0x44), cfg.get32(0x48)) == (0, 0x5678, 0)
    cfg.reset(ResetKind.POWER_ON)
    assert (cfg.get32(0x40), cfg.get32(0x44), cfg.get32(0x48)) == (0, 0, 0)


def test_reset_clears_command_and_bars(dev: BarsDevice) -> None:
    dev.config_write(0x10, 4, 0xC0000000)
    dev.config_write(ids.COMMAND, 2, ids.Command.MEMORY | ids.Command.MASTER)
    dev.reset(ResetKind.CONVENTIONAL)
    assert dev.config_read(ids.COMMAND, 2) == 0
    assert dev.bar_address(0) == 0
    assert dev.config_read(ids.VENDOR_ID, 2) == 0x1B36
