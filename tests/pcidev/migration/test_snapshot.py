"""``load_own_snapshot``: the trusted load of a device's own same-process snapshot (what a
fuzz target's saved world uses): it puts the state back as ``load_device`` does, still
lets the device refuse before anything is applied, and leaves a device that failed while
applying failed."""

from __future__ import annotations

import attrs
import pytest

from pcidev.devices.edu import EduDevice
from pcidev.errors import DeviceFailedError, VMStateError
from pcidev.host import Machine
from pcidev.migration.snapshot import load_device, load_own_snapshot, save_device
from pcidev.vmstate.errors import ConfigMismatchError, StateError


@pytest.fixture
def machine():
    with Machine(ram_size=16 << 20) as m:
        yield m


class _Armed(EduDevice):
    """Refuses (``refuse``) or fails half-way through applying (``crash``) a state, once armed."""

    refuse = False
    crash = False

    def check_device_state(self, state):
        if self.refuse:
            raise StateError("ring not welcome", section="edu", instance_id=0, path="ring_base")
        super().check_device_state(state)

    def set_device_state(self, state):
        self.regs["RING_BASE"].value = state.ring_base
        if self.crash:
            raise RuntimeError("disk on fire")
        super().set_device_state(state)


class _OtherType(EduDevice):
    TYPE_NAME = "edu-but-another-type"


def _plugged(machine, cls=EduDevice):
    p = machine.plug(cls(autorun=False))
    p.enable_device()
    p.set_master()
    p.alloc_irq_vectors(1, 2)
    p.iowrite64(0, 0x100, 0x1000)
    p.iowrite32(0, 0x108, 8)
    return p


def _changed(p):
    p.iowrite64(0, 0x100, 0x7000)
    p.iowrite32(0, 0x108, 2)
    p.config_write16(0x04, 0)  # memory decoding and bus mastering off


def test_it_puts_the_state_back_as_load_device_does(machine):
    p = _plugged(machine)
    dev = p.device
    snap = save_device(dev)
    _changed(p)
    load_own_snapshot(dev, snap, snap.fds).close()
    dev.attach(machine.memory, p.recorder)  # (the host's to give back, after either load)
    trusted = save_device(dev)
    _changed(p)
    load_device(dev, snap).close()
    dev.attach(machine.memory, p.recorder)
    checked = save_device(dev)
    assert [s.state for s in trusted.sections] == [s.state for s in checked.sections] == \
        [s.state for s in snap.sections]
    assert dev.regs["RING_BASE"].value == 0x1000 and dev.failed is None


def test_a_refusal_changes_nothing(machine):
    p = _plugged(machine, _Armed)
    dev = p.device
    snap = save_device(dev)
    _changed(p)
    before = (bytes(dev.config.data), dev.get_device_state())
    dev.refuse = True
    with pytest.raises(VMStateError) as info:
        load_own_snapshot(dev, snap, snap.fds)
    assert info.value.section == "edu"
    assert (bytes(dev.config.data), dev.get_device_state()) == before and dev.failed is None


def test_a_failure_while_applying_fails_the_device(machine, caplog):
    p = _plugged(machine, _Armed)
    dev = p.device
    snap = save_device(dev)
    _changed(p)
    dev.crash = True
    with pytest.raises(DeviceFailedError, match="disk on fire"):
        load_own_snapshot(dev, snap, snap.fds)
    assert isinstance(dev.failed, RuntimeError)


def test_a_snapshot_of_another_device_is_refused_not_crashed(machine):
    """Review S24b: another device type's snapshot raised a KeyError; now the cheap checks
    (device type, sections) refuse it with a typed error and change nothing."""
    edu = _plugged(machine, _Armed).device
    other = _plugged(machine, _OtherType).device
    snap = save_device(edu)
    before = (bytes(other.config.data), other.get_device_state())
    with pytest.raises(ConfigMismatchError, match="device type"):
        load_own_snapshot(other, snap, snap.fds)
    forged = attrs.evolve(snap, device_type=other.vmstate_device_type, sections=snap.sections[:-1])
    with pytest.raises(StateError, match="sections"):
        load_own_snapshot(other, forged, snap.fds)
    assert (bytes(other.config.data), other.get_device_state()) == before and other.failed is None
