"""RAM BARs migrate (pcidev.migration.function_state, the ``ram_bars`` subsection of
``pcidev/function``): the destination adopts the source's memfd, a file-backed BAR its
file; over TCP a file-backed BAR's contents travel and the destination copies them into
its own file; a load without descriptors nor contents refuses a RAM BAR with one clear
reason; loads stay all or nothing."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable

import attrs
import crc32c
import pytest
from precopy_device import Incoming, tcp_pair

from pcidev.bar import RamBacking, Register, RegisterMap, ram_file_key
from pcidev.device import PciDevice
from pcidev.errors import ConfigError, MigrationError
from pcidev.host import Machine
from pcidev.inheritance import inheriting
from pcidev.migration import (
    FunctionState,
    IncomingResult,
    MigrationResult,
    VMStateSnapshot,
    descriptor_blockers,
    load_device,
    load_device_stream,
    migrate_out,
    save_device,
    save_device_stream,
)
from pcidev.migration.precopy import Precopy
from pcidev.testing import plugged, roundtrip
from pcidev.transport.vfio_user.migration import migration_blockers
from pcidev.vmstate import U32, vmstate
from pcidev.vmstate.errors import StateError

PAGE = 4096
SIZE = 4 * PAGE


@vmstate("test/ram-bar-device")
@attrs.frozen
class RamDevState:
    x: U32


class RamDev(PciDevice):
    """Registers in BAR0 (X), RAM in BAR2 (a memfd, or ``path``)."""

    TYPE_NAME = "test-ram-bar"
    CLASS_CODE = 0xFF0000
    VMSTATE = RamDevState

    def __init__(self, path: str | None = None, *, refuse: bool = False, name: str | None = None) -> None:
        self.path = path
        self.refuse = refuse
        super().__init__(name=name)

    def describe(self) -> None:
        self.regs = RegisterMap(4096, [Register("X", 0)])
        self.add_mem_bar(0, 4096, self.regs)
        self.ram = RamBacking(SIZE, path=self.path, name="test-bar2")
        self.add_mem_bar(2, SIZE, self.ram, bits64=True, prefetchable=True)

    def get_device_state(self) -> RamDevState:
        return RamDevState(x=self.regs["X"].value)

    def set_device_state(self, state: RamDevState) -> None:
        if self.refuse:
            raise RuntimeError("refused on purpose")
        self.regs["X"].value = state.x

    def on_close(self) -> None:
        self.ram.close()


def _pattern(seed: int) -> bytes:
    return b"".join(crc32c.crc32c(bytes([seed, i & 0xFF, i >> 8])).to_bytes(4, "little") for i in range(SIZE // 4))


def _blocks(ram: RamBacking) -> list[int]:
    return [crc32c.crc32c(ram.mem[i:i + 512]) for i in range(0, SIZE, 512)]


def test_the_destination_adopts_the_sources_memfd() -> None:
    src, dst = RamDev(), RamDev()
    try:
        src.ram.mem[:] = _pattern(1)
        src.regs["X"].value = 7
        want = _blocks(src.ram)
        src.quiesce()
        stream, fds = save_device_stream(src)
        res = load_device_stream(dst, stream, fds)
        res.close()
        # the same memory, not a copy: every block, and a write on either side shows on the other
        assert os.path.sameopenfile(dst.ram.fd, src.ram.fd)
        assert _blocks(dst.ram) == want and dst.regs["X"].value == 7
        dst.ram.write(0x100, 4, 0xDEADBEEF)
        assert src.ram.read(0x100, 4) == 0xDEADBEEF
        # the framework section lists it: BAR2, its size, the descriptor after the others
        snap = save_device(dst)
        fstate = snap.sections[0].state
        assert isinstance(fstate, FunctionState) and fstate.ram_bars is not None
        (entry,) = fstate.ram_bars.bars
        assert (entry.bar, entry.size) == (2, SIZE)
        assert os.path.sameopenfile(snap.fds[entry.fd.index], src.ram.fd)
    finally:
        src.close()
        dst.close()
    assert dst.ram.fd == -1  # its own memfd was closed at the adoption, the adopted one at close


def test_a_failed_load_keeps_the_destinations_own_memory() -> None:
    src, dst = RamDev(), RamDev(refuse=True)
    try:
        src.ram.mem[:] = _pattern(2)
        dst.ram.mem[:] = _pattern(3)
        own = _blocks(dst.ram)
        src.quiesce()
        stream, fds = save_device_stream(src)
        with pytest.raises(StateError, match="refused on purpose"):
            load_device_stream(dst, stream, fds)
        assert not os.path.sameopenfile(dst.ram.fd, src.ram.fd)
        assert _blocks(dst.ram) == own
    finally:
        src.close()
        dst.close()


def test_without_descriptors_every_ram_bar_is_refused(tmp_path) -> None:
    """A memfd cannot travel without descriptors, and a file-backed BAR's path could name
    another file on the destination's host (here: another file at another path, whose
    contents a load must not silently take for the source's)."""
    src, dst = RamDev(), RamDev()
    try:
        src.quiesce()
        stream, _fds = save_device_stream(src)
        with pytest.raises(StateError, match=r"travel only as a file descriptor \(its memfd\)") as info:
            load_device_stream(dst, stream, None)
        assert info.value.path == "ram_bars.bars[0].fd"
    finally:
        src.close()
        dst.close()
    src, dst = RamDev(str(tmp_path / "a.img")), RamDev(str(tmp_path / "b.img"))
    try:
        src.ram.mem[:] = _pattern(4)
        dst.ram.mem[:] = _pattern(5)
        own = _blocks(dst.ram)
        assert descriptor_blockers(src, "a migration over TCP") == [
            "RAM BAR2 (feature 'bar2-ram') migrates only as a file descriptor (its file's), "
            "which a migration over TCP cannot carry"]
        src.quiesce()
        stream, _fds = save_device_stream(src)
        with pytest.raises(StateError, match=r"travel only as a file descriptor \(its file's\)") as info:
            load_device_stream(dst, stream, None)
        assert info.value.path == "ram_bars.bars[0].fd" and _blocks(dst.ram) == own
    finally:
        src.close()
        dst.close()


def test_a_stream_without_the_subsection_leaves_the_contents() -> None:
    src, dst = RamDev(), RamDev()
    try:
        dst.ram.mem[:] = _pattern(5)
        own = _blocks(dst.ram)
        src.quiesce()
        snap = save_device(src)
        fstate = snap.sections[0].state
        old = attrs.evolve(fstate, ram_bars=None)  # as a stream from before RAM BARs migrated
        sections = (snap.sections[0]._replace(state=old), *snap.sections[1:])
        older = VMStateSnapshot(snap.device_type, snap.fingerprint, sections, snap.fds)
        load_device_stream(dst, older.to_bytes(), list(snap.fds)).close()
        assert _blocks(dst.ram) == own
    finally:
        src.close()
        dst.close()


def test_a_descriptor_too_small_is_refused_untouched() -> None:
    src, dst = RamDev(), RamDev()
    small = os.memfd_create("small")
    try:
        os.ftruncate(small, PAGE)
        src.quiesce()
        snap = save_device(src)
        fds = list(snap.fds)
        fds[snap.sections[0].state.ram_bars.bars[0].fd.index] = small
        with pytest.raises(StateError, match="has 4096 bytes, the BAR 16384"):
            load_device(dst, snap, fds)
        assert not os.path.sameopenfile(dst.ram.fd, small)
    finally:
        os.close(small)
        src.close()
        dst.close()


def _tcp_migration(src: RamDev, dst: RamDev, writes: int = 0,
                   before_stop: Callable[[], None] | None = None) -> tuple[object, object]:
    """Migrate ``src`` to ``dst`` over a loopback TCP connection (pre-copy, then the stop),
    ``writes`` MMIO writes into BAR2 made while the pre-copy runs, ``before_stop`` called
    between the pre-copy and the stop; returns the results."""
    with Incoming(dst, tcp_pair(), timeout=30) as incoming:
        a = incoming.sock
        p = Precopy(src, a, timeout=30, max_iterations=3)
        assert p.active
        rng = random.Random(9)

        def writer() -> None:
            for _ in range(writes):
                with src.lock:
                    src.bar_write(2, rng.randrange(0, SIZE // 4) * 4, 4, rng.getrandbits(32), check_decode=False)

        w = threading.Thread(target=writer)
        w.start()
        p.run()
        w.join()
        if before_stop is not None:
            before_stop()
        try:
            out: object = migrate_out(src, a, precopy=p, timeout=30)
        except MigrationError as exc:
            out = exc
    return out, incoming.result if incoming.error is None else incoming.error


def test_a_file_backed_bar_migrates_over_tcp_into_the_destinations_own_file(tmp_path) -> None:
    """Its contents travel as a memory source (pre-copy while MMIO writes it, the rest at the
    stop); the destination copies them into the file it maps (another file here): it keeps
    its file backing, and the file holds every page the source had at the stop."""
    src, dst = RamDev(str(tmp_path / "a.img")), RamDev(str(tmp_path / "b.img"))
    try:
        src.ram.mem[:] = _pattern(4)
        dst.ram.mem[:] = _pattern(5)
        assert descriptor_blockers(src, "a migration over TCP", src.memory_sources()) == []
        result, incoming = _tcp_migration(src, dst, writes=2000)
        assert isinstance(result, MigrationResult) and isinstance(incoming, IncomingResult), (result, incoming)
        want = _blocks(src.ram)
        assert _blocks(dst.ram) == want and result.fds == 0
        st = os.stat(tmp_path / "b.img")
        assert dst.ram.identity == (st.st_dev, st.st_ino) and dst.ram.path == str(tmp_path / "b.img")
        dst.ram.flush()
        raw = (tmp_path / "b.img").read_bytes()
        assert [crc32c.crc32c(raw[i:i + 512]) for i in range(0, SIZE, 512)] == want
        incoming.resources.close()
    finally:
        src.close()
        dst.close()


def test_a_view_mapped_and_dropped_during_the_pre_copy_loses_no_write() -> None:
    """Review G #4: a device's own window on its RAM BAR (the NVMe CMB / PMR) that exists
    only between the pre-copy's start and the stop writes past RamBacking.write; mapping it
    through RamBacking.map_view ends exact tracking for good, so the stop sends what it
    wrote (the last page here) although /proc/self/maps shows one mapping again."""
    src, dst = RamDev(), RamDev()
    try:
        src.ram.mem[:] = _pattern(8)

        def window() -> None:
            assert not src.ram.exported
            view = src.ram.map_view(0x1000_0000, name="window")
            view.write(0x1000_0000 + SIZE - PAGE, b"\xbb" * PAGE)  # DMA through the window
            view.unmap(0x1000_0000)
            del view
            assert src.ram.exported and src.ram.memory_source("bar2").bitmap is None

        result, incoming = _tcp_migration(src, dst, writes=100, before_stop=window)
        assert isinstance(result, MigrationResult), result
        assert bytes(dst.ram.mem[SIZE - PAGE:]) == b"\xbb" * PAGE
        assert _blocks(dst.ram) == _blocks(src.ram)
        assert isinstance(incoming, IncomingResult)
        incoming.resources.close()
    finally:
        src.close()
        dst.close()


def test_a_refused_tcp_load_leaves_the_destinations_file_as_it_was(tmp_path) -> None:
    src, dst = RamDev(str(tmp_path / "a.img")), RamDev(str(tmp_path / "b.img"), refuse=True)
    try:
        src.ram.mem[:] = _pattern(6)
        dst.ram.mem[:] = _pattern(7)
        own = _blocks(dst.ram)
        result, incoming = _tcp_migration(src, dst)
        assert isinstance(result, MigrationError) and "refused on purpose" in str(result)
        assert not src.quiesced  # the source runs on
        assert _blocks(dst.ram) == own and dst.ram.path == str(tmp_path / "b.img")
    finally:
        src.close()
        dst.close()


def test_vfio_user_migration_data_carries_a_memfd_bar() -> None:
    dev = RamDev()
    try:
        # its contents go with the data (tests/pcidev/transport/test_vfio_user_migration_ram_bars.py)
        assert migration_blockers(dev) == []
    finally:
        dev.close()


def test_through_the_software_host_the_guest_sees_its_data_after_a_roundtrip() -> None:
    with Machine(ram_size=16 << 20) as machine:
        pdev = plugged(machine, RamDev())
        for i in range(0, SIZE, 64):
            pdev.iowrite32(2, i, crc32c.crc32c(i.to_bytes(4, "little")))
        roundtrip(pdev)
        assert all(pdev.ioread32(2, i) == crc32c.crc32c(i.to_bytes(4, "little")) for i in range(0, SIZE, 64))


# -------------------------------------------------------------------------- file backing
def test_a_file_is_created_at_the_bar_size_and_keeps_its_contents(tmp_path) -> None:
    path = str(tmp_path / "pmr.img")
    ram = RamBacking(SIZE, path=path)
    try:
        assert os.path.getsize(path) == SIZE and ram.path == path
        assert os.stat(path).st_blocks * 512 >= SIZE  # allocated, not sparse: no SIGBUS on a full disk
        ram.mem[:] = _pattern(6)
        ram.flush()
    finally:
        ram.close()
    again = RamBacking(SIZE, path=path)  # "a restart": the contents are the file's
    try:
        assert bytes(again.mem) == _pattern(6)
    finally:
        again.close()


def test_an_existing_file_of_another_size_is_refused_and_untouched(tmp_path) -> None:
    path = tmp_path / "user.img"
    path.write_bytes(b"user data" * 100)
    with pytest.raises(ConfigError, match="has 900 bytes, the BAR needs 16384") as info:
        RamBacking(SIZE, path=str(path))
    assert "never resized" in str(info.value)
    assert path.read_bytes() == b"user data" * 100
    with pytest.raises(ConfigError, match="not a regular file|cannot open"):
        RamBacking(SIZE, path=str(tmp_path))


def test_a_handover_hands_the_file_over_instead_of_the_path(tmp_path) -> None:
    path = str(tmp_path / "bar.img")
    dev = RamDev(path)
    try:
        dev.ram.mem[:4] = b"old!"
        fds = dev.framework_inheritable_fds()
        assert list(fds) == [ram_file_key(path)]
        os.rename(path, path + ".moved")  # the path now names nothing: it must not be created
        with inheriting({k: os.dup(fd) for k, fd in fds.items()}):
            new = RamDev(path)
        try:
            assert not os.path.exists(path)
            assert os.path.sameopenfile(new.ram.fd, dev.ram.fd) and bytes(new.ram.mem[:4]) == b"old!"
        finally:
            new.close()
    finally:
        dev.close()


def test_a_failure_while_applying_the_function_state_puts_the_own_mapping_back(monkeypatch) -> None:
    src, dst = RamDev(), RamDev()
    try:
        src.ram.mem[:] = _pattern(7)
        dst.ram.mem[:] = _pattern(8)
        own = _blocks(dst.ram)
        src.quiesce()
        stream, fds = save_device_stream(src)

        def boom() -> None:
            raise RuntimeError("capability refused the configuration")

        monkeypatch.setattr(dst.caps, "config_loaded", boom)
        with pytest.raises(RuntimeError, match="capability refused"):
            load_device_stream(dst, stream, fds)
        assert not os.path.sameopenfile(dst.ram.fd, src.ram.fd)
        assert _blocks(dst.ram) == own
    finally:
        src.close()
        dst.close()
