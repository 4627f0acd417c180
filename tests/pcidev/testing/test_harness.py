"""pcidev.testing: plugged devices, the fixtures of the pytest plugin, and round trips."""

from __future__ import annotations

import struct

import crc32c
import pytest

from pcidev.devices.edu import DESC, STATUS_DONE, EduDevice
from pcidev.errors import ConfigError, ConfigMismatchError, PcidevError, PluginError
from pcidev.host import PCI_IRQ_MSIX, Machine
from pcidev.testing import RoundtripError, plugged, roundtrip

# Registers of edu's BAR0 (see pcidev/devices/edu.py).
RING_BASE, RING_SIZE, RING_TAIL, RING_HEAD, RING_CTRL = 0x100, 0x108, 0x10C, 0x110, 0x114


# [example: edu DMA copy]
def copy(machine, edu, data: bytes, *, slot: int = 0, ring: int | None = None) -> int:
    """Post one descriptor copying ``data`` through edu's DMA engine; returns the ring."""
    if ring is None:
        ring = machine.alloc(16 * 32)
        edu.iowrite64(0, RING_BASE, ring)
        edu.iowrite32(0, RING_SIZE, 16)
        edu.iowrite32(0, RING_CTRL, 1)
    src, dst = machine.alloc(len(data)), machine.alloc(len(data))
    machine.write(src, data)
    machine.memory.write_struct(DESC, ring + 32 * slot, src, dst, len(data), 1, 0, 0)  # flags: interrupt
    edu.iowrite32(0, RING_TAIL, slot + 1)  # the doorbell
    assert edu.wait_irq(0, timeout=5.0)  # MSI-X vector 0: DMA done
    status, crc = struct.unpack("<II", machine.read(ring + 32 * slot + 0x18, 8))
    assert (status, crc) == (STATUS_DONE, crc32c.crc32c(data))
    assert machine.read(dst, len(data)) == data
    return ring


def test_edu_copies_through_the_fixtures(pcidev_machine, pcidev_device):
    edu = pcidev_device("edu", "engine=on,chunk=1k")  # plugged, enabled, bus master, MSI-X
    edu.device.resume()  # start the engine's worker, as a transport does
    copy(pcidev_machine, edu, bytes(range(256)) * 16)
    assert edu.ioread32(0, RING_HEAD) == 1


def test_edu_keeps_working_after_a_roundtrip(pcidev_machine, pcidev_device):
    edu = pcidev_device("edu", "chunk=1k")
    ring = copy(pcidev_machine, edu, b"before" * 100)
    old = edu.device
    new = roundtrip(edu)  # save, load into a fresh edu; the handle now drives the copy
    assert edu.device is new and new is not old
    assert edu.ioread32(0, RING_HEAD) == 1
    copy(pcidev_machine, edu, b"after" * 100, slot=1, ring=ring)
    assert edu.ioread32(0, RING_HEAD) == 2
# [end example]


def test_plugged_allocates_msix_and_enables_decoding():
    with Machine(ram_size=8 << 20) as machine:
        pdev = plugged(machine, EduDevice())
        assert pdev.irq_type == PCI_IRQ_MSIX and pdev.nvec == 2
        assert pdev.ioread32(0, 0) == 0x010000ED
        assert pdev.device.bus_master


def test_plugged_reports_bad_input_as_errors(pcidev_machine, pcidev_registry):
    with pytest.raises(PluginError, match="unknown device type"):
        plugged(pcidev_machine, "no-such-device", registry=pcidev_registry)
    with pytest.raises(ConfigError, match="chunk"):
        plugged(pcidev_machine, "edu", "chunk=0", registry=pcidev_registry)
    with pytest.raises(PcidevError, match="properties go with a type name"):
        plugged(pcidev_machine, EduDevice(), "engine=on")


def test_roundtrip_moves_a_descriptor_in_flight(pcidev_machine, pcidev_device):
    edu = pcidev_device(EduDevice(autorun=False, chunk=1000))
    ring = pcidev_machine.alloc(16 * 32)
    edu.iowrite64(0, RING_BASE, ring)
    edu.iowrite32(0, RING_SIZE, 16)
    edu.iowrite32(0, RING_CTRL, 1)
    src, dst = pcidev_machine.alloc(8192), pcidev_machine.alloc(8192)
    data = bytes(range(256)) * 32
    pcidev_machine.write(src, data)
    pcidev_machine.memory.write_struct(DESC, ring, src, dst, 8192, 1, 0, 0)
    edu.iowrite32(0, RING_TAIL, 1)
    edu.device._step(1000)
    assert edu.device.inflight.done == 1000
    new = roundtrip(edu)
    assert new.inflight.done == 1000 and new.cfg.chunk == 1000
    assert new.process() == 1
    assert pcidev_machine.read(dst, 8192) == data
    assert edu.wait_irq(0, timeout=1.0)


def test_roundtrip_of_a_bare_device_and_with_make():
    with Machine(ram_size=8 << 20) as machine:
        dev = plugged(machine, EduDevice()).device
        dev.regs["LIVENESS"].value = 0x1234
        new = roundtrip(dev, make=lambda: EduDevice(name="copy"))
        assert new.name == "copy" and new.regs["LIVENESS"].value == 0x1234
        assert new.memory is machine.memory


def test_a_refused_stream_raises_and_the_destination_is_torn_down(pcidev_device):
    edu = pcidev_device("edu")
    source = edu.device

    class Smaller(EduDevice):
        def device_fingerprint(self):
            return {"edu.max_transfer": 4096}  # a different configuration: refused

    dest = Smaller()
    with pytest.raises(ConfigMismatchError, match="edu.max_transfer"):
        roundtrip(edu, make=lambda: dest)
    assert edu.device is source  # the handle still drives the source
    assert not source.quiesced and dest.closed  # the source runs on, the destination is torn down


def test_a_running_engine_moves_and_a_failed_roundtrip_resumes_the_source(pcidev_machine, pcidev_device):
    edu = pcidev_device("edu", "engine=on,chunk=512")
    edu.device.resume()  # the worker runs
    ring = copy(pcidev_machine, edu, b"x" * 4096)
    source = edu.device

    class Smaller(EduDevice):
        def device_fingerprint(self):
            return {"edu.max_transfer": 4096}

    with pytest.raises(ConfigMismatchError):
        roundtrip(edu, make=lambda: Smaller(engine=True))
    assert edu.device is source and not source.quiesced  # resumed, as after a failed migration
    copy(pcidev_machine, edu, b"y" * 4096, slot=1, ring=ring)
    new = roundtrip(edu)
    assert new.engine and not new.quiesced and source.quiesced
    copy(pcidev_machine, edu, b"z" * 4096, slot=2, ring=ring)  # the loaded device's worker copies


def test_a_half_loaded_device_is_reported(pcidev_device, monkeypatch):
    edu = pcidev_device("edu")
    edu.iowrite32(0, 0x04, 7)  # LIVENESS

    class Forgetful(EduDevice):
        def set_device_state(self, state):
            super().set_device_state(state)
            self.regs["LIVENESS"].value = 0  # "forgets" one register

    with pytest.raises(RoundtripError, match=r"device state differs: liveness: 7 != 0"):
        roundtrip(edu, make=lambda: Forgetful())


def test_nvme_roundtrip_keeps_registers_and_config_space(pcidev_machine, pcidev_device):
    driver = pytest.importorskip("pcidev_nvme.testing.driver")
    pdev = pcidev_device("nvme", "serial=TK1,max_ioqpairs=2,msix_vectors=3,ns=mem:size=1M")
    drv = driver.NvmeDriver(pcidev_machine, pdev, io_queues=1, io_depth=16, admin_depth=8)
    drv.probe()
    drv.write(1, 0, b"toolkit!" * 64)
    before_regs = [pdev.ioread32(0, off) for off in range(0, 0x40, 4)]
    before_config = pdev.save_config()
    with pytest.raises(RoundtripError, match="smart.power_on_us"):
        roundtrip(pdev, make=lambda: type(pdev.device)(pdev.device.cfg))  # clocks moved on
    new = roundtrip(pdev, ignore={"features.timestamp", "smart.power_on_us"})
    assert pdev.device is new
    assert [pdev.ioread32(0, off) for off in range(0, 0x40, 4)] == before_regs
    assert pdev.save_config() == before_config
    drv.device = new
    assert drv.read(1, 0, 1) == b"toolkit!" * 64


def test_roundtrip_hands_state_ownership_to_the_destination():
    """As after a migration out: the source is closed as migrated (it persists nothing
    over the destination's state), the destination owns the state."""
    with Machine() as machine:
        pdev = plugged(machine, EduDevice())
        src = pdev.device
        dest = roundtrip(pdev)
        assert src.closed and src.migrated_out and not src.owns_state
        assert dest.owns_state and not dest.migrated_out


def test_a_refused_roundtrip_destination_persists_nothing():
    closed = []

    class Watched(EduDevice):
        TYPE_NAME = "edu-watched"  # another device type: the load refuses the stream

        def on_close(self):
            closed.append(self.owns_state)
            super().on_close()

    with Machine() as machine:
        pdev = plugged(machine, EduDevice())
        with pytest.raises(ConfigMismatchError):
            roundtrip(pdev, make=Watched)
        assert closed == [False] and pdev.device.owns_state and not pdev.device.closed
