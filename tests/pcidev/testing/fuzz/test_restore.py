"""``MachineTemplate``: what it puts back (the device, guest RAM, the allocator, the BAR
windows, the handle, host-side copies), by either way of resetting guest RAM."""

from __future__ import annotations

import pytest

from pcidev.devices.edu import EduDevice
from pcidev.host import Machine
from pcidev.testing.fuzz import restore
from pcidev.testing.fuzz.restore import MachineTemplate

PAGE = 4096


class _Host:
    """A host-side object: shares the machine and the handle, has state of its own."""

    def __init__(self, machine, pdev, *, local: bool = False) -> None:
        self.machine, self.pdev, self.mem = machine, pdev, machine.memory
        self.read = pdev.bar_read  # (a bound method of a shared object)
        self.buffers = [machine.alloc(PAGE)]
        self.callback = (lambda: None) if local else None  # pickle cannot take it, deepcopy can


@pytest.fixture
def saved():
    machine = Machine(ram_size=4 << 20)
    pdev = machine.plug(EduDevice(autorun=False))
    pdev.enable_device()
    pdev.set_master()
    pdev.alloc_irq_vectors(1, 2)
    host = _Host(machine, pdev)
    machine.memory.write(host.buffers[0], b"\x5A" * PAGE)
    machine.memory.write(3 * PAGE + 100, b"set-up")  # data in a page the allocator does not own
    template = MachineTemplate(machine, pdev)
    template.save(host, _Host(machine, pdev, local=True))
    image = machine.memory.read(0, machine.ram_size)
    try:
        yield template, image
    finally:
        template.close()


def _scribble(template: MachineTemplate) -> None:
    machine, pdev = template.machine, template.pdev
    buf = machine.alloc(3 * PAGE)
    machine.memory.write(buf, b"\xFF" * 3 * PAGE)  # pages that were zero at the save
    machine.memory.write(3 * PAGE, b"\x01" * PAGE)  # a page that held data
    machine.memory.write(machine.ram_size - PAGE, b"\x02" * PAGE)  # the last page
    machine.window_alloc("mem64", 1 << 20)
    pdev.iowrite64(0, 0x100, 0x7000)
    pdev.device.irq.sink.msi(0, 0xFEE00000, 0)  # (an interrupt the recorder counts)


@pytest.mark.parametrize("punch", [True, False], ids=["punched", "written"])
def test_the_restore_puts_back_ram_the_allocator_the_windows_and_the_device(saved, monkeypatch, punch):
    template, image = saved
    real, punched = restore._punch, []
    # (where MADV_REMOVE is refused, every byte is written instead)
    monkeypatch.setattr(restore, "_punch", lambda window: punched.append(real(window) if punch else False) or
                        punched[-1])
    machine = template.machine
    allocator, windows = machine.allocator.state(), machine.windows_state()
    counts = dict(template.pdev.recorder.counts)
    for _ in range(2):
        _scribble(template)
        assert machine.memory.read(0, machine.ram_size) != image
        template.restore()
        assert machine.memory.read(0, machine.ram_size) == image
        assert machine.allocator.state() == allocator and machine.windows_state() == windows
        assert template.device.regs["RING_BASE"].value == 0 and template.device.failed is None
        assert template.pdev.recorder.counts == counts
    assert punched == [punch, punch]


def test_host_copies_are_new_and_share_the_machine_and_the_handle(saved):
    template, _ = saved
    assert template._pickled[0] is not None and template._pickled[1] is None  # (a lambda: deep-copied)
    for index in (0, 1):
        a, b = template.host_copy(index), template.host_copy(index)
        assert a is not b and a.buffers is not b.buffers and a.buffers == b.buffers
        assert a.machine is b.machine is template.machine and a.mem is template.machine.memory
        assert a.pdev is template.pdev and a.read.__self__ is template.pdev
        a.buffers.append(1)
        assert template.host_copy(index).buffers == b.buffers
