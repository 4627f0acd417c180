"""The pcidev/registers section: registers a device declares migratable are saved and
restored by the framework (no VMSTATE needed), in their own versioned section; a
destination with another register layout refuses the stream, untouched; devices
without migratable registers keep their streams as released."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from pcidev.bar import Access, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.devices.edu import EduDevice
from pcidev.errors import MigrationBlockedError
from pcidev.host import Machine
from pcidev.migration import device_blockers, load_device_stream, save_device_stream, vmstate_descriptions
from pcidev.migration.registers import RegistersState, migratable_maps
from pcidev.regions import RegionMap
from pcidev.testing import plugged, roundtrip
from pcidev.vmstate import U32, peek_header, vmstate
from pcidev.vmstate.errors import ConfigMismatchError, StateError
from pcidev.vmstate.testing import assert_schema_matches

SCHEMA = Path(__file__).resolve().parents[1] / "vmstate" / "schema" / "pcidev-registers.json"


class Counters(PciDevice):
    """Two BARs of registers, all of them migratable, and nothing else."""

    TYPE_NAME = "counters"
    VENDOR_ID, DEVICE_ID, CLASS_CODE = 0x1234, 0x11F0, 0xFF0000
    EXTRA = False

    def describe(self) -> None:
        self.regs0 = RegisterMap(4096, name="counters-bar0", migratable=True)
        self.regs0.add(Register("COUNT", 0x00, 4))
        self.regs0.add(Register("WIDE", 0x08, 8))
        self.regs0.add(Register("GO", 0x10, 4, Access.WO, on_write=self._go, migrate=False))
        if self.EXTRA:
            self.regs0.add(Register("EXTRA", 0x18, 4))
        self.add_mem_bar(0, 4096, self.regs0)
        self.regs2 = RegisterMap(16, name="counters-bar2")
        self.regs2.add(Register("KEPT", 0x0, 4, migrate=True))
        self.regs2.add(Register("LOST", 0x4, 4))
        self.add_mem_bar(2, 16, self.regs2)
        self.started = 0

    def _go(self, reg: Register, new: int, old: int) -> None:
        self.started += 1


class Extra(Counters):
    EXTRA = True


@vmstate("counted", version=1)
@attrs.frozen
class CountedState:
    ticks: U32


class WithState(Counters):
    """Registers by the framework plus a state of its own."""

    TYPE_NAME = "with-state"
    VMSTATE = CountedState
    ticks = 0
    refuse = False

    def get_device_state(self) -> CountedState:
        return CountedState(ticks=self.ticks)

    def set_device_state(self, state: CountedState) -> None:
        if self.refuse:
            raise RuntimeError("cannot take it")
        self.ticks = state.ticks


def test_the_section_schema_matches_the_snapshot() -> None:
    assert_schema_matches(RegistersState, SCHEMA)


def test_registers_alone_make_a_device_migratable() -> None:
    src = Counters()
    assert device_blockers(src) == []
    src.regs0["COUNT"].value, src.regs0["WIDE"].value = 5, 1 << 60
    src.regs2["KEPT"].value, src.regs2["LOST"].value = 9, 8
    src.quiesce()
    stream, fds = save_device_stream(src)
    assert [s.name for s in peek_header(stream).sections] == ["pcidev/function", "pcidev/registers"]
    dst = Counters()
    load_device_stream(dst, stream, fds).close()
    assert (dst.regs0["COUNT"].value, dst.regs0["WIDE"].value) == (5, 1 << 60)
    assert (dst.regs2["KEPT"].value, dst.regs2["LOST"].value) == (9, 0)  # LOST is not migratable
    assert dst.started == 0  # no on_write ran


def test_a_device_with_neither_state_nor_migratable_registers_is_blocked() -> None:
    class Plain(PciDevice):
        TYPE_NAME = "plain"

        def describe(self) -> None:
            self.add_mem_bar(0, 4096, RegisterMap(4096, [Register("X", 0)]))

    assert device_blockers(Plain()) == ["device type plain has no vmstate description"]
    with pytest.raises(MigrationBlockedError):
        save_device_stream(Plain())


def test_a_different_layout_is_refused_and_the_destination_stays_untouched() -> None:
    src = Counters()
    src.regs0["COUNT"].value = 5
    stream, fds = save_device_stream(src)
    dst = Extra()
    dst.regs0["COUNT"].value = 77
    with pytest.raises(ConfigMismatchError) as info:
        load_device_stream(dst, stream, fds)
    assert info.value.differences == ["EXTRA: migratable here, not in the stream"]
    assert "register map 'counters-bar0'" in str(info.value)
    assert dst.regs0["COUNT"].value == 77


def test_registers_and_a_device_section_together_and_a_failed_apply_rolls_back() -> None:
    src = WithState()
    src.ticks, src.regs0["COUNT"].value = 3, 4
    stream, fds = save_device_stream(src)
    assert [s.name for s in peek_header(stream).sections] == ["pcidev/function", "pcidev/registers", "counted"]
    assert vmstate_descriptions(src) == [vmstate_descriptions(src)[0], RegistersState, CountedState]
    dst = WithState()
    load_device_stream(dst, stream, fds).close()
    assert (dst.ticks, dst.regs0["COUNT"].value) == (3, 4)
    bad = WithState()
    bad.refuse, bad.regs0["COUNT"].value = True, 11
    with pytest.raises(StateError, match="cannot take it"):
        load_device_stream(bad, stream, fds)
    assert bad.regs0["COUNT"].value == 11  # put back


def test_edu_streams_keep_their_sections() -> None:
    edu = EduDevice()
    stream, _fds = save_device_stream(edu)
    assert [s.name for s in peek_header(stream).sections] == ["pcidev/function", "edu"]
    assert RegistersState not in vmstate_descriptions(edu)


def test_roundtrip_compares_the_registers() -> None:
    with Machine(ram_size=16 << 20) as machine:
        pdev = plugged(machine, Counters())
        pdev.iowrite32(0, 0x00, 41)
        dev = roundtrip(pdev)
        assert pdev.ioread32(0, 0x00) == 41 and dev.regs0["COUNT"].value == 41


class Composed(PciDevice):
    """Migratable registers in sub-regions of a BAR composed with a RegionMap (one of
    them nested a level deeper), as a layered device such as virtio-pci builds its BAR."""

    TYPE_NAME = "composed"
    VENDOR_ID, DEVICE_ID, CLASS_CODE = 0x1234, 0x11F1, 0xFF0000
    SECOND_AT = 0x800

    def describe(self) -> None:
        self.common = RegisterMap(0x100, [Register("MODE", 0x0, 4)], name="common", migratable=True)
        self.inner = RegisterMap(0x10, [Register("LEVEL", 0x4, 2)], name="inner", migratable=True)
        nested = RegionMap(0x400)
        nested.add("inner", 0x200, 0x10, self.inner)
        bar = RegionMap(0x1000)
        bar.add("common", 0x0, 0x100, self.common)
        bar.add("nested", self.SECOND_AT, 0x400, nested)
        self.add_mem_bar(0, 0x1000, bar)


class ComposedElsewhere(Composed):
    SECOND_AT = 0x400


def test_registers_in_region_map_sub_regions_migrate() -> None:
    """A RegisterMap answering a RegionMap sub-region (at any depth) is carried like a
    BAR's own map, keyed by BAR and offset; nothing is silently left behind."""
    with Machine() as machine:
        pdev = plugged(machine, Composed())
        pdev.iowrite32(0, 0x0, 0xAB)
        pdev.iowrite16(0, 0x800 + 0x200 + 0x4, 0x1234)
        new = roundtrip(pdev)
        assert isinstance(new, Composed)
        assert new.common["MODE"].value == 0xAB and new.inner["LEVEL"].value == 0x1234
        assert pdev.ioread16(0, 0xA04) == 0x1234
        assert [(bar, base, m.name) for bar, base, m in migratable_maps(new)] == \
            [(0, 0x0, "common"), (0, 0xA00, "inner")]
        new.quiesce()
        stream, fds = save_device_stream(new)
        with pytest.raises(ConfigMismatchError, match=r"BAR0\+0xa00.*BAR0\+0x600"):
            load_device_stream(ComposedElsewhere(), stream, fds)
