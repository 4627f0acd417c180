"""The software host and the edu example device driven through it."""

from __future__ import annotations

import struct
import threading
import time

import crc32c
import pytest

from pcidev.bar import Access, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.devices.edu import DESC, STATUS_BAD_LENGTH, STATUS_DMA_ERROR, STATUS_DONE, EduDevice
from pcidev.errors import DmaError, PcidevError
from pcidev.host import PCI_IRQ_INTX, Machine, PageAllocator


@pytest.fixture
def machine():
    with Machine(ram_size=32 << 20) as m:
        yield m


@pytest.fixture
def edu(machine):
    p = machine.plug(EduDevice())
    p.enable_device()
    p.set_master()
    return p


def setup_ring(machine, p, entries=16):
    ring = machine.alloc(entries * 32)
    p.iowrite64(0, 0x100, ring)
    p.iowrite32(0, 0x108, entries)
    p.iowrite32(0, 0x114, 1)
    return ring


def test_allocator() -> None:
    a = PageAllocator(0x1000, 0x10000)
    x = a.alloc(0x1000)
    y = a.alloc(0x2000, align=0x2000)
    assert x == 0x1000 and y == 0x2000
    a.free(x)
    assert a.alloc(0x800) == 0x1000
    with pytest.raises(DmaError):
        a.alloc(0x100000)
    with pytest.raises(DmaError):
        a.free(0x9999)
    a.free(y)
    a.free(0x1000)
    assert a.free_bytes == 0xF000


def test_allocator_state_restores_what_was_allocated_and_freed_since() -> None:
    a = PageAllocator(0x1000, 0x10000)
    a.alloc(0x1000)
    gone = a.alloc(0x2000)
    saved = a.state()
    later = a.alloc(0x4000)
    a.free(gone)
    assert later == 0x4000 and a.state() != saved
    a.restore(saved)
    assert a.state() == saved and a.free_bytes == 0xF000 - 0x3000
    with pytest.raises(DmaError):
        a.free(later)  # allocated after the save: free again
    a.free(gone)  # freed after the save: allocated again
    assert a.alloc(0x2000) == gone
    assert saved == ([(0x4000, 0x10000)], {0x1000: 0x1000, 0x2000: 0x2000})  # a copy: not changed by the above


def test_enumeration_and_registers(edu) -> None:
    assert (edu.vendor, edu.device_id) == (0x1234, 0x11E8)
    assert edu.ioread32(0, 0) == 0x010000ED
    edu.iowrite32(0, 4, 0x0F0F0F0F)
    assert edu.ioread32(0, 4) == 0xF0F0F0F0
    edu.iowrite32(0, 8, 10)
    assert edu.ioread32(0, 8) == 3628800


def test_dma_ring_with_msix(machine, edu) -> None:
    assert edu.alloc_irq_vectors(1, 2) == 2
    ring = setup_ring(machine, edu)
    blocks = []
    for i in range(5):
        src, dst = machine.alloc(4096), machine.alloc(4096)
        data = bytes([i]) * 4096
        machine.write(src, data)
        machine.memory.write_struct(DESC, ring + 32 * i, src, dst, 4096, 1 if i == 4 else 0, 0, 0)
        blocks.append((dst, data))
    edu.iowrite32(0, 0x10C, 5)
    assert edu.wait_irq(0, 2.0)
    assert edu.irq_count(0) == 1  # one interrupt for the batch
    for i, (dst, data) in enumerate(blocks):
        assert machine.read(dst, 4096) == data
        st_, crc = struct.unpack("<II", machine.read(ring + 32 * i + 0x18, 8))
        assert (st_, crc) == (STATUS_DONE, crc32c.crc32c(data))
    assert edu.ioread32(0, 0x110) == 5


def test_dma_errors_get_status_not_crash(machine, edu) -> None:
    ring = setup_ring(machine, edu)
    machine.memory.write_struct(DESC, ring, 0xFFFF_FFFF_0000, machine.alloc(4096), 4096, 0, 0, 0)
    machine.memory.write_struct(DESC, ring + 32, machine.alloc(4096), 2**64 - 16, 4096, 0, 0, 0)
    machine.memory.write_struct(DESC, ring + 64, 0, 0, 0, 0, 0, 0)
    edu.iowrite32(0, 0x10C, 3)
    status = [struct.unpack("<I", machine.read(ring + 32 * i + 0x18, 4))[0] for i in range(3)]
    assert status == [STATUS_DMA_ERROR, STATUS_DMA_ERROR, STATUS_BAD_LENGTH]
    assert edu.ioread32(0, 0x118) == 3
    assert edu.device.failed is None


def test_ring_outside_memory_is_counted(machine, edu) -> None:
    edu.iowrite64(0, 0x100, 0x7FFF_FFFF_0000)
    edu.iowrite32(0, 0x108, 4)
    edu.iowrite32(0, 0x114, 1)
    edu.iowrite32(0, 0x10C, 2)
    assert edu.ioread32(0, 0x118) == 2
    assert edu.device.failed is None


def test_no_dma_without_bus_master(machine, edu) -> None:
    ring = setup_ring(machine, edu)
    src, dst = machine.alloc(4096), machine.alloc(4096)
    machine.write(src, b"x" * 4096)
    machine.memory.write_struct(DESC, ring, src, dst, 4096, 0, 0, 0)
    edu.clear_master()
    edu.iowrite32(0, 0x10C, 1)
    assert machine.read(dst, 4) == b"\0\0\0\0"
    edu.set_master()
    edu.device.process()
    assert machine.read(dst, 4) == b"xxxx"


def test_intx_fallback(machine, edu) -> None:
    assert edu.alloc_irq_vectors(1, 1, PCI_IRQ_INTX) == 1
    edu.iowrite32(0, 0x60, 1)
    assert edu.recorder.wait_intx(True, 1.0)
    assert edu.ioread32(0, 0x24) == 1
    edu.iowrite32(0, 0x64, 1)
    assert edu.recorder.wait_intx(False, 1.0)


def test_reset_function_keeps_bars_and_clears_device_state(machine, edu) -> None:
    setup_ring(machine, edu)
    addr = edu.bar_address(0)
    edu.reset_function()
    assert edu.device.bar_address(0) == addr
    assert edu.ioread32(0, 0x108) == 0  # ring registers reset


def test_machine_guards(machine) -> None:
    with pytest.raises(PcidevError):
        Machine(ram_size=1024)
    p = machine.plug(EduDevice())
    with pytest.raises(PcidevError):
        p.ioread32(0, 0)  # BAR not assigned yet
    with pytest.raises(PcidevError):
        machine.plug(EduDevice(), slot=p.slot)


# ------------------------------------------------------------ the host holds device.lock
class PairDevice(PciDevice):
    """A worker thread keeps the register pair LO/HI equal, changing both under
    ``device.lock`` (and yielding between the two halves), then raises MSI-X vector 0
    with the lock still held. Reading LO yields too, so a host that did not hold the
    lock would see the worker's change between the halves of one 64-bit read."""

    TYPE_NAME = "pair"

    def __init__(self) -> None:
        super().__init__()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    def describe(self) -> None:
        regs = RegisterMap(4096, name="pair-bar0")
        regs.add(Register("LO", 0x00, 4, on_read=self._slow_read))
        regs.add(Register("HI", 0x04, 4))
        regs.add(Register("RAISE", 0x08, 4, Access.WO, on_write=lambda r, new, old: self.irq.notify(0)))
        self.regs = regs
        self.add_mem_bar(0, 4096, regs)
        self.add_msix(1, bar=0, table_offset=0x800, pba_offset=0xC00)

    @staticmethod
    def _slow_read(reg: Register) -> int:
        time.sleep(0)  # let another thread run mid-access
        return reg.value

    def _work(self) -> None:
        n = 0
        while not self._stop.is_set():
            n = (n + 1) & 0xFFFFFFFF
            with self.lock:
                self.regs["LO"].value = n
                time.sleep(0)  # let another thread run mid-update
                self.regs["HI"].value = n
                self.irq.notify(0)  # delivered to the host with device.lock held

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(5.0)


def test_host_holds_device_lock_so_a_worker_pair_is_never_torn(machine) -> None:
    """Each host access holds ``device.lock`` as the transports do: a 64-bit read of a
    pair the worker changes under the lock is never torn. Interrupts the worker sends
    with the lock held reach the host, whose callback may itself access the device
    (same thread, reentrant lock), while the host thread raises interrupts from a
    register write: no deadlock."""
    p = machine.plug(PairDevice())
    p.enable_device()
    p.set_master()
    assert p.alloc_irq_vectors(1, 1) == 1
    from_callback: list[int] = []

    def on_irq(_vector: int) -> None:  # runs in whichever thread raised it, lock held
        if len(from_callback) < 200:
            from_callback.append(p.ioread64(0, 0))

    p.recorder.callbacks[0] = on_irq
    dev = p.device
    dev.start()
    torn = []
    try:
        for _ in range(2000):
            v = p.ioread64(0, 0)
            if v & 0xFFFFFFFF != v >> 32:
                torn.append(hex(v))
            p.iowrite32(0, 0x08, 1)
        assert p.wait_irq(0, timeout=5.0)
    finally:
        dev.stop()
    assert not torn, f"{len(torn)} torn reads of 2000, e.g. {torn[:3]}"
    assert from_callback and all(v & 0xFFFFFFFF == v >> 32 for v in from_callback)
    assert p.irq_count(0) >= 2000


def test_a_remote_proxy_is_not_locked_by_the_host(machine) -> None:
    """Only an in-process device's lock is taken: a proxy (whose server locks on its
    side) is driven even while something else holds the wrapped device's lock."""

    class Proxy:
        def __init__(self, dev):
            self.dev = dev

        def __getattr__(self, name):
            return getattr(self.dev, name)

    inner = EduDevice()
    p = machine.plug(Proxy(inner))
    held, release = threading.Event(), threading.Event()

    def hold():
        with inner.lock:
            held.set()
            release.wait(5.0)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    try:
        assert held.wait(5.0)
        assert p.config_read16(0) == inner.vendor_id  # would block if the host locked
    finally:
        release.set()
        t.join(5.0)
