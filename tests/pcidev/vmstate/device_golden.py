"""The device state recorded in the golden streams tests/pcidev/vmstate/data/edu-v*.pcvm.

A released description version gets a golden stream (tests/pcidev/vmstate/device_data/) (written once by
make_device_golden.py) that every later version of the code must still load.
``build_edu()`` makes the device the stream was saved from; the constants are what
the test expects after loading it.
"""

from __future__ import annotations

import os

from pcidev.devices.edu import DESC, EduDevice
from pcidev.dma import GuestMemory, alloc_memfd
from pcidev.irq import EventfdSink
from pcidev.pci import ids

RAM_SIZE = 1 << 20
BAR0 = 0xFEB0_0000
RING = 0x1_0000
MSIX_ENTRIES = [(0xFEE0_0000, 0x41), (0xFEE0_1000, 0x42)]


def build_edu():
    """The saved device, with its memory and eventfds (caller closes them)."""
    dev = EduDevice(autorun=False, chunk=1000)
    memfd = alloc_memfd(RAM_SIZE, "golden-ram")
    mem = GuestMemory()
    mem.map(0, RAM_SIZE, memfd, name="ram")
    efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3)]
    dev.attach(mem, EventfdSink({0: efds[0], 1: efds[1]}, intx_fd=efds[2]))
    dev.config_write(ids.BASE_ADDRESS_0, 4, BAR0)
    dev.config_write(ids.COMMAND, 2, ids.Command.MEMORY | ids.Command.MASTER | ids.Command.INTX_DISABLE)
    msix = dev.irq.msix
    dev.config_write(msix.offset + 2, 2, 0x8000)
    for v, (addr, data) in enumerate(MSIX_ENTRIES):
        for off, val in ((0, addr), (4, 0), (8, data), (12, int(v == 1))):
            dev.bar_write(0, 0x800 + 16 * v + off, 4, val)
    dev.irq.notify(1)  # masked: latched in the PBA
    dev.bar_write(0, 0x04, 4, 0x1234_5678)
    dev.bar_write(0, 0x08, 4, 5)
    dev.bar_write(0, 0x100, 8, RING)
    dev.bar_write(0, 0x108, 4, 16)
    dev.bar_write(0, 0x114, 4, 1)
    for i in range(3):
        mem.write_struct(DESC, RING + 32 * i, 0x2_0000 + 0x1000 * i, 0x8_0000 + 0x1000 * i, 0x1000,
                         int(i == 2), 0, 0)
    dev.bar_write(0, 0x10C, 4, 3)
    dev.process(budget=1)
    dev._step(1000)  # descriptor 1 in flight: 1000 of 4096 bytes
    return dev, mem, memfd, efds


# what a loaded edu-v1 stream holds
EXPECTED_EDU_V1 = {
    "bar0": BAR0,
    "ring_base": RING,
    "ring_size": 16,
    "ring_tail": 3,
    "ring_head": 1,
    "completed": 1,
    "irq_status": 0,
    "liveness": 0x1234_5678,
    "factorial": 120,
    "inflight": (1, 0x2_1000, 0x8_1000, 0x1000, 0, 1000),
    "pending_vector_1": True,
}
