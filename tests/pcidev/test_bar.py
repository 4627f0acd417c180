"""BAR/MMIO dispatch: widths, straddling, unassigned offsets, failing handlers,
register semantics, RAM backing with sparse areas, decode gating."""

from __future__ import annotations

import logging
import mmap
import os

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcidev.bar import Access, CallbackHandler, RamBacking, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.errors import ConfigError, MmioError
from pcidev.host import Machine
from pcidev.pci import ids
from pcidev.vmstate.errors import ConfigMismatchError


def make_map() -> RegisterMap:
    rm = RegisterMap(0x100, name="t")
    rm.add(Register("A8", 0x00, 1, reset=0x11))
    rm.add(Register("B8", 0x01, 1, reset=0x22))
    rm.add(Register("C16", 0x02, 2, reset=0x4433))
    rm.add(Register("D32", 0x04, 4, reset=0x88776655))
    rm.add(Register("Q64", 0x08, 8, reset=0x1122334455667788))
    rm.add(Register("RO", 0x10, 4, Access.RO, reset=0xCAFE))
    rm.add(Register("W1C", 0x14, 4, Access.RW1C, reset=0xFF))
    rm.add(Register("WO", 0x18, 4, Access.WO))
    rm.add(Register("MASKED", 0x1C, 4, mask=0x0000FFFF))
    rm.add(Register("W1S", 0x20, 4, Access.RW1S))
    return rm


class MapDevice(PciDevice):
    TYPE_NAME = "mapdev"

    def describe(self) -> None:
        self.regs = make_map()
        self.add_mem_bar(0, 0x100, self.regs)


@pytest.fixture
def dev() -> MapDevice:
    d = MapDevice()
    d.realize()
    d.config_write(ids.COMMAND, 2, ids.Command.MEMORY)
    return d


def test_all_widths(dev) -> None:
    assert dev.bar_read(0, 0, 1) == 0x11
    assert dev.bar_read(0, 2, 2) == 0x4433
    assert dev.bar_read(0, 4, 4) == 0x88776655
    assert dev.bar_read(0, 8, 8) == 0x1122334455667788
    dev.bar_write(0, 8, 8, 0xA1A2A3A4A5A6A7A8)
    assert dev.regs["Q64"].value == 0xA1A2A3A4A5A6A7A8


def test_straddling_reads_assemble_bytes(dev) -> None:
    assert dev.bar_read(0, 0, 4) == 0x44332211
    assert dev.bar_read(0, 0, 8) == 0x8877665544332211
    assert dev.bar_read(0, 2, 4) == 0x66554433  # unaligned, across two registers
    # 64-bit register read as two 32-bit halves
    assert dev.bar_read(0, 8, 4) == 0x55667788
    assert dev.bar_read(0, 12, 4) == 0x11223344


def test_straddling_and_partial_writes(dev) -> None:
    dev.bar_write(0, 0, 4, 0xDDCCBBAA)
    assert (dev.regs["A8"].value, dev.regs["B8"].value, dev.regs["C16"].value) == (0xAA, 0xBB, 0xDDCC)
    dev.bar_write(0, 12, 4, 0xFFFFFFFF)  # upper half of the 64-bit register
    assert dev.regs["Q64"].value == 0xFFFFFFFF55667788
    dev.bar_write(0, 5, 1, 0x00)  # one byte inside a 32-bit register
    assert dev.regs["D32"].value == 0x88770055


def test_register_access_kinds(dev) -> None:
    dev.bar_write(0, 0x10, 4, 0)
    assert dev.bar_read(0, 0x10, 4) == 0xCAFE
    dev.bar_write(0, 0x14, 4, 0x0F)
    assert dev.bar_read(0, 0x14, 4) == 0xF0
    dev.bar_write(0, 0x18, 4, 0x1234)
    assert dev.bar_read(0, 0x18, 4) == 0 and dev.regs["WO"].value == 0x1234
    dev.bar_write(0, 0x1C, 4, 0xFFFFFFFF)
    assert dev.bar_read(0, 0x1C, 4) == 0xFFFF
    dev.bar_write(0, 0x20, 4, 0x1)
    dev.bar_write(0, 0x20, 4, 0x4)
    assert dev.bar_read(0, 0x20, 4) == 0x5


def test_unassigned_offsets_read_zero_and_log_rate_limited(dev, caplog) -> None:
    caplog.set_level(logging.WARNING)
    assert dev.bar_read(0, 0x80, 4) == 0
    dev.bar_write(0, 0x80, 4, 0xFFFFFFFF)
    assert dev.bar_read(0, 0x80, 8) == 0
    # partially assigned: the assigned bytes are read
    assert dev.bar_read(0, 0x20, 8) == 0
    for _ in range(100):
        dev.bar_write(0, 0x90, 4, 1)
    lines = [r for r in caplog.records if "unassigned" in r.getMessage()]
    assert 1 <= len(lines) <= 10


def test_malformed_accesses_are_typed_errors(dev) -> None:
    for bar, off, size in ((0, 0, 3), (0, 0, 16), (0, 0xFC, 8), (0, 0x100, 1), (0, -1, 1), (1, 0, 4),
                           (6, 0, 4), (-1, 0, 4)):
        with pytest.raises(MmioError):
            dev.bar_read(bar, off, size)
        with pytest.raises(MmioError):
            dev.bar_write(bar, off, size, 0)


def test_memory_decode_gating(dev) -> None:
    dev.config_write(ids.COMMAND, 2, 0)
    assert dev.bar_read(0, 0, 4) == 0xFFFFFFFF
    dev.bar_write(0, 4, 4, 0)
    dev.config_write(ids.COMMAND, 2, ids.Command.MEMORY)
    assert dev.bar_read(0, 4, 4) == 0x88776655


def test_failing_handler_does_not_escape(dev, caplog) -> None:
    failures = []

    class Failing(PciDevice):
        def describe(self) -> None:
            def boom(reg, new, old):
                raise RuntimeError("handler bug")

            self.add_mem_bar(0, 64, RegisterMap(64, [Register("X", 0, on_write=boom),
                                                     Register("Y", 4, on_read=lambda r: 1 // 0)]))

        def on_failure(self, exc):
            failures.append(exc)

    d = Failing()
    d.realize()
    d.config_write(ids.COMMAND, 2, ids.Command.MEMORY)
    caplog.set_level(logging.ERROR)
    d.bar_write(0, 0, 4, 1)
    assert isinstance(d.failed, RuntimeError)
    assert d.bar_read(0, 4, 4) == 0
    assert [type(e) for e in failures] == [RuntimeError, ZeroDivisionError]
    assert any("failed state" in r.getMessage() for r in caplog.records)
    # the device still answers afterwards, and a reset clears the failed state
    d.reset()
    assert d.failed is None


def test_callback_handler() -> None:
    log = []

    def fn(off, size, is_write, value):
        log.append((off, size, is_write, value))
        return 0xAB

    h = CallbackHandler(fn)
    assert h.read(4, 2) == 0xAB
    h.write(8, 4, 7)
    assert log == [(4, 2, False, 0), (8, 4, True, 7)]


def test_register_map_declaration_errors() -> None:
    rm = RegisterMap(64)
    rm.add(Register("A", 0, 4))
    with pytest.raises(ConfigError):
        rm.add(Register("B", 2, 2))
    with pytest.raises(ConfigError):
        rm.add(Register("A", 8, 4))
    with pytest.raises(ConfigError):
        rm.add(Register("C", 64, 4))
    with pytest.raises(ConfigError):
        Register("D", 2, 4)
    arr = rm.add_array("DB", 0x10, 4, width=4, stride=8)
    assert [r.offset for r in arr] == [0x10, 0x18, 0x20, 0x28] and arr[2].index == 2


def test_ram_backing_with_sparse_areas_shared_via_fd() -> None:
    page = mmap.PAGESIZE

    class RamDevice(PciDevice):
        def describe(self) -> None:
            self.ram = RamBacking(4 * page, sparse_areas=[(page, 2 * page)])
            self.add_mem_bar(2, 4 * page, self.ram, bits64=True, prefetchable=True)

    d = RamDevice()
    d.realize()
    d.config_write(ids.COMMAND, 2, ids.Command.MEMORY)
    d.bar_write(2, page + 8, 8, 0x0102030405060708)
    # another mapping of the same fd (as another process would get) sees the data
    other = mmap.mmap(d.ram.fd, 4 * page)
    assert other[page + 8:page + 16] == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    other[0:4] = b"\x11\x22\x33\x44"
    assert d.bar_read(2, 0, 4) == 0x44332211
    other.close()
    assert d.ram.sparse_areas == [(page, 2 * page)]
    # sealed: nobody can shrink it under us
    with pytest.raises(OSError):
        os.ftruncate(d.ram.fd, page)
    with pytest.raises(ConfigError):
        RamBacking(page, sparse_areas=[(1, page)])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0x40), st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**64 - 1))
def test_write_then_read_of_plain_rw_registers_round_trips(off, size, value) -> None:
    rm = RegisterMap(0x80)
    for i in range(0, 0x48, 4):
        rm.add(Register(f"R{i}", i, 4))
    value &= (1 << (8 * size)) - 1
    rm.write(off, size, value)
    assert rm.read(off, size) == value


def test_host_routes_by_assigned_address() -> None:
    with Machine() as m:
        p1 = m.plug(MapDevice())
        p2 = m.plug(MapDevice())
        p1.enable_device()
        p2.enable_device()
        assert p1.bar_address(0) != p2.bar_address(0)
        p1.iowrite32(0, 4, 1)
        p2.iowrite32(0, 4, 2)
        assert p1.ioread32(0, 4) == 1 and p2.ioread32(0, 4) == 2
        with pytest.raises(MmioError):
            m.mmio_read(0xDEAD0000, 4)


def test_register_writes_run_no_generated_setattr():
    """``Register.value`` is written on every MMIO access: attrs must not put a
    Python ``__setattr__`` (converters/validators on assignment) in that path."""
    assert Register.__setattr__ is object.__setattr__


# -- migratable registers: the state a RegisterMap owns --------------------------------------
def _map(**kwargs) -> RegisterMap:
    writes = []
    regs = RegisterMap(64, name="m", **kwargs)
    regs.add(Register("A", 0x00, 4))
    regs.add(Register("B", 0x08, 8, on_write=lambda r, new, old: writes.append(new)))
    regs.add(Register("C", 0x10, 4, on_read=lambda r: 0x1234, migrate=False))
    regs.add(Register("D", 0x14, 2, migrate=True))
    regs.writes = writes  # type: ignore[attr-defined]
    return regs


def test_which_registers_migrate() -> None:
    assert [r.name for r in _map().migratable_registers()] == ["D"]  # only the one that asks
    assert [r.name for r in _map(migratable=True).migratable_registers()] == ["A", "B", "D"]


def test_the_stored_value_travels_and_no_hook_runs() -> None:
    src, dst = _map(migratable=True), _map(migratable=True)
    src.write(0x00, 4, 7)
    src.write(0x08, 8, 1 << 40)
    src.write(0x14, 2, 0xBEEF)
    state = src.save_state(bar=2)
    assert state.bar == 2 and [(r.name, r.value) for r in state.registers] == [("A", 7), ("B", 1 << 40),
                                                                                 ("D", 0xBEEF)]
    dst.check_state(state)
    dst.load_state(state)
    assert (dst["A"].value, dst["B"].value, dst["D"].value) == (7, 1 << 40, 0xBEEF)
    assert dst.writes == []  # type: ignore[attr-defined]  # on_write is not replayed by a load
    assert dst.read(0x10, 4) == 0x1234  # C is computed by its on_read, not carried


def test_a_different_layout_is_refused_naming_each_difference() -> None:
    state = _map(migratable=True).save_state(bar=0)
    other = RegisterMap(64, name="m", migratable=True)
    other.add(Register("A", 0x04, 4))  # moved
    other.add(Register("B", 0x08, 4))  # narrower
    other.add(Register("E", 0x10, 4))  # new
    with pytest.raises(ConfigMismatchError) as info:
        other.check_state(state)
    err = info.value
    assert err.differences == ["A: 4 bytes at 0x0 in the stream, 4 bytes at 0x4 here",
                               "B: 8 bytes at 0x8 in the stream, 4 bytes at 0x8 here",
                               "D: in the stream, not migratable here",
                               "E: migratable here, not in the stream"]
    assert "register map 'm': the stream's migratable registers differ" in str(err)


def test_a_value_too_wide_for_its_register_is_refused() -> None:
    src = _map(migratable=True)
    state = src.save_state(bar=0)
    bad = attrs.evolve(state, registers=(state.registers[0], state.registers[1],
                                         attrs.evolve(state.registers[2], value=1 << 16)))
    with pytest.raises(ConfigMismatchError, match="D: value 0x10000 does not fit 2 bytes"):
        _map(migratable=True).check_state(bad)


def test_migratable_registers_have_limits() -> None:
    with pytest.raises(ConfigError, match="at most 64 bytes"):
        RegisterMap(4096, migratable=True).add(Register("X" * 65, 0))
    RegisterMap(4096).add(Register("X" * 65, 0))  # not migratable: any name
    with pytest.raises(ConfigError, match="at most 4096 migratable registers"):
        RegisterMap(8 << 13, migratable=True).add_array("R", 0, 4097, width=8)


def test_a_ram_bar_loses_exact_tracking_for_the_whole_session_once_its_fd_is_taken() -> None:
    """Review G #4: reading the descriptor while a pre-copy tracks (a window mapped with
    it, even if dropped again) ends exact tracking until the session ends; the identity
    accessor does not, and a new session starts exact."""
    ram = RamBacking(4 * mmap.PAGESIZE)
    try:
        assert ram.written_only_through_write()
        ram.dirty.start()
        assert ram.written_only_through_write() and ram.fd_for_identity >= 0
        assert ram.written_only_through_write()
        window = mmap.mmap(ram.fd, 4 * mmap.PAGESIZE)
        window.close()
        assert not ram.written_only_through_write()
        assert not ram.written_only_through_write()  # sticky
        ram.dirty.stop()
        assert ram.written_only_through_write()  # the check before the next session
        ram.dirty.start()
        assert ram.written_only_through_write()
        other = mmap.mmap(ram.fd_for_identity, 4 * mmap.PAGESIZE)  # (a mapping seen in the maps)
        assert not ram.written_only_through_write()
        other.close()
        assert not ram.written_only_through_write()  # sticky though the maps show one again
        ram.dirty.stop()
    finally:
        ram.close()


# ------------------------------------------------------------------ RamBacking's device API
def test_a_ram_backing_names_maps_and_describes_its_memory(tmp_path):
    """Identity (no tracking lost), map_view (the device's own DMA window: sticky hashing),
    memory_source (memfd and file alike) and copies_contents (a migration's load rule)."""
    ram = RamBacking(4 * 4096, name="api")
    try:
        info = os.fstat(ram.fd_for_identity)
        assert ram.identity == (info.st_dev, info.st_ino)
        src = ram.memory_source("bar2")
        assert src is not None and src.name == "bar2" and src.size == 4 * 4096 and src.bitmap is ram.dirty
        assert not ram.copies_contents(False) and not ram.copies_contents(True)  # adopts what it gets
        view = ram.map_view(0x8000_0000, 2 * 4096, name="window")
        view.write(0x8000_0000 + 4096, b"\x5a" * 16)  # the device's DMA lands in the BAR's memory
        assert ram.read(4096, 8) == 0x5A5A5A5A5A5A5A5A
        assert ram.exported and ram.memory_source("bar2").bitmap is None  # hashed from now on
        assert ram.copies_contents(False)  # the view stays on this memory: a load copies into it
        with pytest.raises(ConfigError):
            ram.map_view(0, 3)
        with pytest.raises(ConfigError):
            ram.map_view(0, 8 * 4096)
    finally:
        ram.close()
    assert ram.identity is None and ram.memory_source("bar2") is None
    filed = RamBacking(4096, path=str(tmp_path / "bar.img"))
    try:
        info = os.stat(tmp_path / "bar.img")
        assert filed.identity == (info.st_dev, info.st_ino)
        assert filed.memory_source("bar4") is not None  # a file's contents travel too
        assert filed.copies_contents(True) and not filed.copies_contents(False)  # its own file, always
    finally:
        filed.close()
