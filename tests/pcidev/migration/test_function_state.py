"""Framework-owned state: save/load of PciDevice (config space, MSI-X, INTx, failed flag,
guest-memory map, eventfds), fingerprints, all-or-nothing loads."""

from __future__ import annotations

import os
import struct

import attrs
import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcidev.bar import RamBacking, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.devices.edu import DESC, STATUS_DONE, EduDevice, EduState
from pcidev.dma import GuestMemory, alloc_memfd
from pcidev.errors import ConfigError, DeviceFailedError, MigrationBlockedError, VMStateError
from pcidev.host import Machine
from pcidev.irq import CallbackSink, EventfdSink
from pcidev.migration import (
    FUNCTION_SECTION,
    FunctionState,
    VMStateSnapshot,
    descriptor_blockers,
    device_blockers,
    load_device,
    load_device_stream,
    save_device,
    save_device_stream,
    vmstate_fingerprint,
)
from pcidev.pci import ids
from pcidev.vmstate import U32, dump_stream_json, vmstate
from pcidev.vmstate.errors import ChecksumError, ConfigMismatchError, StateError, StreamError


@pytest.fixture
def machine():
    with Machine(ram_size=16 << 20) as m:
        yield m


def _edu(machine, **kw):
    p = machine.plug(EduDevice(autorun=False, **kw))
    p.enable_device()
    p.set_master()
    p.alloc_irq_vectors(1, 2)
    return p


def _ring(machine, p, entries=8):
    ring = machine.alloc(entries * 32)
    p.iowrite64(0, 0x100, ring)
    p.iowrite32(0, 0x108, entries)
    p.iowrite32(0, 0x114, 1)
    return ring


def _snapshot_view(dev: PciDevice):
    """Everything a load may change, for 'untouched' comparisons."""
    return (bytes(dev.config.data), dev.get_device_state(), dev.irq.intx_asserted,
            dev.irq.snapshot(), dev.failed, dev.memory, dev.irq.sink,
            bytes(dev.irq.msix.table), bytes(dev.irq.msix.pba))


def test_round_trip_moves_a_descriptor_in_flight(machine):
    p = _edu(machine, chunk=1000)
    ring = _ring(machine, p)
    src, dst = machine.alloc(8192), machine.alloc(8192)
    data = os.urandom(8192)
    machine.write(src, data)
    machine.memory.write_struct(DESC, ring, src, dst, 8192, 1, 0, 0)
    p.iowrite32(0, 0x10C, 1)
    dev = p.device
    dev.quiesce()
    dev._step(1000)
    dev._step(1000)
    assert dev.inflight.done == 2000
    stream, fds = save_device_stream(dev)
    assert fds == [machine.memory.fd_of(0)]

    dest = EduDevice(autorun=False, chunk=1000)
    res = load_device_stream(dest, stream, fds)
    try:
        assert res.memory is not None and res.sink is None
        assert dest.inflight == dev.inflight
        assert bytes(dest.config.data) == bytes(dev.config.data)
        assert dest.bar_address(0) == p.bar_address(0)
        assert dest.irq.mode == "msix"
        assert bytes(dest.irq.msix.table) == bytes(dev.irq.msix.table)
        got = []
        dest.irq.sink = CallbackSink(lambda v, a, d: got.append(v))
        assert dest.process() == 1
        status, crc = struct.unpack("<II", machine.read(ring + 0x18, 8))
        assert (status, crc) == (STATUS_DONE, crc32c.crc32c(data))
        assert machine.read(dst, 8192) == data
        assert got == [0]
    finally:
        res.close()


def test_snapshot_in_process_and_sections(machine):
    p = _edu(machine)
    snap = save_device(p.device)
    assert [s.name for s in snap.sections] == [FUNCTION_SECTION, "edu"]
    assert isinstance(snap.sections[0].state, FunctionState)
    assert isinstance(snap.sections[1].state, EduState)
    assert snap.fingerprint["pci.msix_vectors"] == 2
    assert snap.fingerprint["pci.bars"] == [[0, "mem32", 4096, False]]
    dest = EduDevice()
    res = load_device(dest, snap)
    res.close()
    again = save_device(dest)
    assert again.sections[0].state.config == snap.sections[0].state.config
    assert again.sections[1].state == snap.sections[1].state


def test_fingerprint_mismatch_names_every_difference(machine):
    p = _edu(machine)
    stream, fds = save_device_stream(p.device)

    class BigEdu(EduDevice):
        def describe(self):
            super().describe()

        def device_fingerprint(self):
            return {"edu.max_transfer": 4096}

    class MoreVectors(EduDevice):
        def add_msix(self, nvectors, **kw):
            return super().add_msix(8, **kw)

    with pytest.raises(ConfigMismatchError) as info:
        load_device_stream(BigEdu(), stream, fds)
    assert info.value.differences == ["edu.max_transfer: stream has 1048576, this device has 4096"]
    with pytest.raises(ConfigMismatchError) as info:
        load_device_stream(MoreVectors(), stream, fds)
    assert any(d.startswith("pci.msix_vectors: stream has 2, this device has 8") for d in info.value.differences)


def test_reserved_fingerprint_keys_are_refused():
    class Bad(EduDevice):
        def device_fingerprint(self):
            return {"pci.bars": 1}

    with pytest.raises(ConfigError, match="reserved"):
        vmstate_fingerprint(Bad())


def test_device_without_vmstate_cannot_save():
    class Plain(PciDevice):
        TYPE_NAME = "plain"

    with pytest.raises(MigrationBlockedError) as info:
        save_device(Plain())
    assert info.value.reasons == ["device type plain has no vmstate description"]


# ------------------------------------------------------------ all or nothing
class _Refusing(EduDevice):
    def check_device_state(self, state):
        raise StateError("ring not welcome", section="edu", instance_id=0, path="ring_base")


class _Crashing(EduDevice):
    """set_device_state applies half of the state, then fails."""

    fail = True

    def set_device_state(self, state):
        self.regs["RING_BASE"].value = state.ring_base
        if self.fail and state.ring_base == 0x1000:
            raise RuntimeError("disk on fire")
        super().set_device_state(state)


def _saved_with_ring(machine):
    p = _edu(machine)
    p.iowrite64(0, 0x100, 0x1000)
    p.iowrite32(0, 0x108, 8)
    return save_device_stream(p.device)


@pytest.mark.parametrize("cls", [_Refusing, _Crashing])
def test_failed_load_leaves_the_destination_untouched(machine, cls):
    stream, fds = _saved_with_ring(machine)
    dest = cls()
    dest.realize()
    dest.attach(None, CallbackSink())
    dest.config_write(ids.COMMAND, 2, ids.Command.MEMORY)
    dest.regs["RING_BASE"].value = 0xABC0
    before = _snapshot_view(dest)
    with pytest.raises(VMStateError) as info:
        load_device_stream(dest, stream, fds)
    assert info.value.section == "edu"
    assert _snapshot_view(dest) == before
    assert dest.failed is None


def test_unmappable_region_fd_is_refused_untouched(machine):
    stream, _ = _saved_with_ring(machine)
    r, w = os.pipe()
    try:
        dest = EduDevice()
        dest.realize()
        before = _snapshot_view(dest)
        with pytest.raises(StateError, match="cannot map") as info:
            load_device_stream(dest, stream, [r])
        assert info.value.path == "dma[0]"
        assert _snapshot_view(dest) == before
    finally:
        os.close(r)
        os.close(w)


def test_missing_fd_is_named(machine):
    stream, _ = _saved_with_ring(machine)
    with pytest.raises(StateError) as info:
        load_device_stream(EduDevice(), stream, [])
    assert (info.value.section, info.value.path) == (FUNCTION_SECTION, "dma[0].fd")


def test_load_without_fds_keeps_memory_and_checks_its_layout(machine):
    stream, _ = _saved_with_ring(machine)
    fresh = EduDevice()
    res = load_device_stream(fresh, stream, None)  # TCP: no fds, no memory yet
    assert res.memory is None and fresh.memory is None
    other = GuestMemory()
    fd = alloc_memfd(1 << 20)
    try:
        other.map(0, 1 << 20, fd)
        dest = EduDevice()
        dest.attach(other, None)
        with pytest.raises(StateError, match="guest-memory map differs"):
            load_device_stream(dest, stream, None)
        same = EduDevice()
        same.attach(machine.memory, None)
        load_device_stream(same, stream, None)
        assert same.memory is machine.memory
    finally:
        other.close()
        os.close(fd)


def test_bad_state_values_are_refused_with_the_field(machine):
    p = _edu(machine)
    snap = save_device(p.device)
    fs, ds = snap.sections[0].state, snap.sections[1].state
    bad_ring = attrs.evolve(ds, ring_size=6)
    from pcidev.vmstate import Section

    with pytest.raises(StateError) as info:
        load_device(EduDevice(), VMStateSnapshot(snap.device_type, snap.fingerprint,
                                                 (snap.sections[0], Section("edu", 0, bad_ring)), snap.fds))
    assert info.value.path == "ring_size"
    short_cfg = attrs.evolve(fs, config=fs.config[:256])
    with pytest.raises(StateError) as info:
        load_device(EduDevice(), VMStateSnapshot(snap.device_type, snap.fingerprint,
                                                 (Section(FUNCTION_SECTION, 0, short_cfg), snap.sections[1]),
                                                 snap.fds))
    assert info.value.path == "config"


def test_corrupted_streams_raise_typed_errors_and_change_nothing(machine):
    p = _edu(machine)
    stream, fds = save_device_stream(p.device)
    dest = EduDevice()
    dest.realize()
    before = _snapshot_view(dest)
    with pytest.raises(StreamError):
        load_device_stream(dest, stream[:-5], fds)
    flipped = bytearray(stream)
    flipped[40] ^= 0x10
    with pytest.raises(ChecksumError):
        load_device_stream(dest, bytes(flipped), fds)
    with pytest.raises(StreamError):
        load_device_stream(dest, b"garbage" * 10, fds)
    assert _snapshot_view(dest) == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_real_streams_only_raise_vmstate_errors(machine, data):
    p = _edu(machine)
    stream, fds = save_device_stream(p.device)
    buf = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del buf[pos:pos + data.draw(st.integers(1, 16))]
        else:
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    dest = EduDevice()
    dest.realize()
    before = _snapshot_view(dest)
    try:
        res = load_device_stream(dest, bytes(buf), fds)
    except VMStateError:
        assert _snapshot_view(dest) == before
    else:  # a mutation that happened to keep the stream valid (e.g. rewrote the checksum)
        res.close()


# ------------------------------------------------------------ hypothesis round trips
_MSIX_TABLE = st.binary(min_size=32, max_size=32)


@settings(max_examples=100, deadline=None)
@given(cmd=st.integers(0, 0xFFFF), line=st.integers(0, 255), cache=st.integers(0, 255),
       bar=st.integers(0, 0xFFFF_FFFF), table=_MSIX_TABLE, pba=st.integers(0, 3),
       msix_ctrl=st.sampled_from([0, 0x8000, 0xC000]), intx=st.booleans(), failed=st.booleans(),
       regs=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)))
def test_framework_state_round_trips(cmd, line, cache, bar, table, pba, msix_ctrl, intx, failed, regs):
    src = EduDevice(autorun=False)
    src.realize()
    src.attach(None, CallbackSink())
    src.config_write(ids.COMMAND, 2, cmd)
    src.config_write(ids.INTERRUPT_LINE, 1, line)
    src.config_write(ids.CACHE_LINE_SIZE, 1, cache)
    src.config_write(ids.BASE_ADDRESS_0, 4, bar)
    pos = src.irq.msix.offset
    src.config_write(pos + 2, 2, msix_ctrl)
    for off in range(0, 32, 4):
        src.irq.msix.table_write(off, 4, int.from_bytes(table[off:off + 4], "little"))
    src.irq.msix.pba[0] = pba
    src.irq.set_intx(intx)
    if failed:
        src.fail(RuntimeError("boom"), "test")
    src.regs["LIVENESS"].value, src.regs["FACTORIAL"].value, src.regs["RING_BASE"].value = regs
    stream, fds = save_device_stream(src)
    dest = EduDevice(autorun=False)
    load_device_stream(dest, stream, fds)
    assert bytes(dest.config.data) == bytes(src.config.data)
    assert dest.bar_address(0) == src.bar_address(0)
    assert bytes(dest.irq.msix.table) == bytes(src.irq.msix.table)
    assert bytes(dest.irq.msix.pba) == bytes(src.irq.msix.pba)
    assert dest.irq.intx_asserted == src.irq.intx_asserted
    assert dest.irq.snapshot() == src.irq.snapshot()
    assert (dest.failed is None) == (src.failed is None)
    if failed:
        assert isinstance(dest.failed, DeviceFailedError) and "boom" in str(dest.failed)
    assert dest.get_device_state() == src.get_device_state()
    assert dest.irq.mode == src.irq.mode


def test_eventfds_travel_and_still_signal():
    fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(3)]
    try:
        src = EduDevice()
        src.attach(None, EventfdSink({0: fds[0], 1: fds[1]}, intx_fd=fds[2]))
        snap = save_device(src)
        fs = snap.sections[0].state
        assert [r.index for r in fs.eventfds.vectors] == [0, 1] and fs.eventfds.intx.index == 2
        assert list(snap.fds) == fds
        dest = EduDevice()
        res = load_device(dest, snap)
        try:
            sink = res.sink
            assert dest.irq.sink is sink
            assert sorted(sink.vector_fds) == [0, 1]
            assert set(sink.vector_fds.values()).isdisjoint(fds)  # duplicates, owned by the sink
            sink.msi(1, 0xFEE00000, 1)
            assert os.eventfd_read(fds[1]) == 1  # the same kernel eventfd
        finally:
            res.close()
        assert sink.vector_fds == {}
    finally:
        for fd in fds:
            os.close(fd)


def test_dump_shows_the_framework_section(machine):
    p = _edu(machine)
    doc = dump_stream_json(save_device_stream(p.device)[0])
    names = [s["name"] for s in doc["sections"]]
    assert names == ["pcidev/function", "edu"]
    fw = doc["sections"][0]
    assert fw["fields"]["dma"][0]["fields"]["fd"] == {"fd": 0}
    assert "pcidev/msix" in fw["subsections"]


# ------------------------------------------------------------ features and blockers
def test_enabled_features_of_the_framework():
    @vmstate("test/ram")
    @attrs.frozen
    class RamState:
        x: U32 = 0

    class WithRam(PciDevice):
        TYPE_NAME = "with-ram"
        VMSTATE = RamState

        def describe(self):
            self.add_mem_bar(0, 4096, RegisterMap(4096, [Register("R", 0)]))
            self.ram = RamBacking(4096)
            self.add_mem_bar(2, 4096, self.ram)
            self.add_msix(4, bar=0, table_offset=0x800, pba_offset=0xC00)
            self.add_standard_pcie_caps()
            self.add_rom(b"\x55\xaa")

    dev = WithRam()
    try:
        assert dev.enabled_features() == {"msix", "pm", "pcie", "aer", "intx", "rom", "bar2-ram"}
        # the framework migrates RAM BARs (the memfd travels): nothing blocks but a
        # migration that carries no descriptors
        assert device_blockers(dev) == []
        assert descriptor_blockers(dev, "a migration over TCP") == [
            "RAM BAR2 (feature 'bar2-ram') migrates only as a file descriptor (its memfd), "
            "which a migration over TCP cannot carry"]
    finally:
        dev.ram.close()

