"""Interrupts: MSI-X (table, PBA, masking, pending), MSI, INTx, sinks,
eventfd delivery to another process."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pcidev import irq
from pcidev.bar import RegisterMap
from pcidev.device import PciDevice
from pcidev.errors import IrqError, MmioError
from pcidev.host import PCI_IRQ_INTX, PCI_IRQ_MSI, Machine
from pcidev.irq import CallbackSink, EventfdSink, InterruptState
from pcidev.pci import ids
from pcidev.pci.capabilities import msix as msixmod
from pcidev.pci.capabilities.msi import MsiCapability
from pcidev.pci.capabilities.msix import MsixCapability

TABLE = 0x2000
PBA = 0x3000


class IrqDevice(PciDevice):
    TYPE_NAME = "irqdev"

    def describe(self) -> None:
        self.add_mem_bar(0, 16384, RegisterMap(16384))
        self.add_msix(16, bar=0, table_offset=TABLE, pba_offset=PBA)
        self.add_msi(4)


@pytest.fixture
def machine():
    with Machine() as m:
        yield m


@pytest.fixture
def host(machine):
    p = machine.plug(IrqDevice())
    p.enable_device()
    p.set_master()
    return p


def test_msix_table_and_pba_access(host) -> None:
    # reset state: every vector masked, PBA clear
    for v in range(16):
        assert host.ioread32(0, TABLE + 16 * v + 12) == 1
    assert host.ioread64(0, PBA) == 0
    host.iowrite32(0, TABLE + 0, 0xFEE0_1003)  # reserved low bits ignored
    host.iowrite32(0, TABLE + 4, 0x1)
    host.iowrite32(0, TABLE + 8, 0xABCD)
    assert host.ioread32(0, TABLE) == 0xFEE0_1000
    assert host.ioread64(0, TABLE) == 0x1_FEE0_1000
    assert host.ioread32(0, TABLE + 8) == 0xABCD
    host.iowrite64(0, TABLE + 16, 0x2_0000_1000)
    assert host.ioread32(0, TABLE + 20) == 2
    # the PBA is read-only
    host.iowrite64(0, PBA, 0xFFFF)
    assert host.ioread64(0, PBA) == 0
    # an access straddling the table end is refused
    with pytest.raises(MmioError):
        host.device.bar_read(0, TABLE + 16 * 16 - 4, 8)


def test_msix_delivery_and_masked_vector_latches_pending(host) -> None:
    assert host.alloc_irq_vectors(1, 16) == 16
    dev = host.device
    assert dev.irq.mode == "msix"
    dev.irq.notify(3)
    assert host.irq_count(3) == 1
    host.msix_mask(3, True)
    dev.irq.notify(3)
    dev.irq.notify(3)
    assert host.irq_count(3) == 1
    assert host.ioread64(0, PBA) == 1 << 3
    host.msix_mask(3, False)  # unmask delivers the pending message once
    assert host.irq_count(3) == 2
    assert host.ioread64(0, PBA) == 0


def test_msix_function_mask(host) -> None:
    host.alloc_irq_vectors(16, 16)
    dev = host.device
    host.msix_function_mask(True)
    for v in (0, 5, 15):
        dev.irq.notify(v)
    assert all(host.irq_count(v) == 0 for v in (0, 5, 15))
    assert host.ioread64(0, PBA) == (1 << 0) | (1 << 5) | (1 << 15)
    host.msix_mask(5, True)
    host.msix_function_mask(False)
    assert host.irq_count(0) == 1 and host.irq_count(15) == 1 and host.irq_count(5) == 0
    assert host.ioread64(0, PBA) == 1 << 5
    host.msix_mask(5, False)
    assert host.irq_count(5) == 1


def test_msix_out_of_range_vector_is_typed_error(host) -> None:
    host.alloc_irq_vectors(1, 16)
    with pytest.raises(IrqError):
        host.device.irq.notify(16)


def test_notify_many_raises_each_vector_once_under_one_lock(host) -> None:
    host.alloc_irq_vectors(16, 16)
    dev = host.device
    host.msix_mask(5, True)
    acquired = []

    class CountingLock:
        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            acquired.append(1)
            return self.inner.__enter__()

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    real = dev.irq.lock
    dev.irq.lock = CountingLock(real)
    try:
        assert dev.irq.notify_many([0, 5, 15]) is True
    finally:
        dev.irq.lock = real
    assert len(acquired) == 1
    assert host.irq_count(0) == 1 and host.irq_count(15) == 1
    assert host.irq_count(5) == 0  # masked: latched pending, as notify() does
    assert host.ioread64(0, PBA) == 1 << 5
    # an out-of-range vector does not stop the valid ones, and is reported after them
    with pytest.raises(IrqError):
        dev.irq.notify_many([16, 3])
    assert host.irq_count(3) == 1


def test_notify_many_in_msi_and_intx_modes(host) -> None:
    dev = host.device
    assert dev.irq.notify_many([0]) is False  # INTx: nothing raised
    assert host.irq_count(0) == 0
    assert host.alloc_irq_vectors(1, 4, PCI_IRQ_MSI) == 4
    assert dev.irq.notify_many([1, 2]) is True
    assert host.irq_count(1) == 1 and host.irq_count(2) == 1


def test_bus_master_off_blocks_messages(host) -> None:
    host.alloc_irq_vectors(1, 16)
    host.clear_master()
    host.device.irq.notify(0)
    assert host.irq_count(0) == 0
    assert host.device.irq.blocked_by_bus_master == 1


def test_msi_multiple_messages_and_masking(host) -> None:
    assert host.alloc_irq_vectors(1, 4, PCI_IRQ_MSI) == 4
    dev = host.device
    assert dev.irq.mode == "msi"
    msi = dev.irq.msi
    assert msi.enabled_vectors == 4
    dev.irq.notify(2)
    assert host.irq_count(2) == 1  # data low bits carry the vector
    pos = host.find_capability(ids.CapId.MSI)
    host.config_write32(pos + 0x10, 1 << 1)  # mask vector 1
    dev.irq.notify(1)
    assert host.irq_count(1) == 0
    assert host.config_read32(pos + 0x14) == 1 << 1  # pending
    host.config_write32(pos + 0x10, 0)
    assert host.irq_count(1) == 1
    assert host.config_read32(pos + 0x14) == 0
    with pytest.raises(IrqError):
        dev.irq.notify(4)


@pytest.mark.parametrize(("allocated", "vector", "sent"), [(1, 1, 0), (1, 3, 0), (2, 3, 1), (2, 2, 0)])
def test_msi_vectors_past_the_allocated_ones_share_them(host, allocated, vector, sent) -> None:
    """Regression (fuzz vfio-user, session 23): a guest that allocates fewer MSI vectors than
    the function is capable of made the edu device's raise of vector 1 an IrqError, and the
    device failed. The function alters only the low log2(allocated) bits of the message data:
    the vector is sent modulo the allocated count."""
    assert host.alloc_irq_vectors(1, allocated, PCI_IRQ_MSI) == allocated
    dev = host.device
    assert dev.irq.msi.enabled_vectors == allocated
    assert dev.irq.notify(vector) is True
    assert host.irq_count(sent) == 1
    assert sum(host.irq_count(v) for v in range(4)) == 1


def test_msi_mme_clamped_to_capable(host) -> None:
    pos = host.find_capability(ids.CapId.MSI)
    host.config_write16(pos + 2, 0x0071)  # MME=7 (128) with MMC=2 (4)
    assert (host.config_read16(pos + 2) >> 4) & 7 == 2


def test_intx_level_status_and_disable(host) -> None:
    assert host.alloc_irq_vectors(1, 1, PCI_IRQ_INTX) == 1
    dev = host.device
    assert dev.irq.mode == "intx"
    assert not dev.irq.notify(0)
    dev.irq.set_intx(True)
    assert host.recorder.intx_level
    assert host.config_read16(ids.STATUS) & ids.Status.INTERRUPT
    host.config_write16(ids.COMMAND, host.config_read16(ids.COMMAND) | ids.Command.INTX_DISABLE)
    assert not host.recorder.intx_level  # line masked, status still shows it
    assert host.config_read16(ids.STATUS) & ids.Status.INTERRUPT
    host.config_write16(ids.COMMAND, host.config_read16(ids.COMMAND) & ~ids.Command.INTX_DISABLE)
    assert host.recorder.intx_level
    dev.irq.set_intx(False)
    assert not host.recorder.intx_level
    assert not host.config_read16(ids.STATUS) & ids.Status.INTERRUPT


def test_realize_binds_the_message_capabilities() -> None:
    dev = IrqDevice()
    assert dev.irq.msix is None and dev.irq.msi is None  # bound at realize, not looked up per call
    dev.realize()
    assert dev.irq.msix is dev.caps.find(MsixCapability)
    assert dev.irq.msi is dev.caps.find(MsiCapability)


def test_intx_snapshot_and_restore(host) -> None:
    assert host.alloc_irq_vectors(1, 1, PCI_IRQ_INTX) == 1
    dev = host.device
    assert dev.irq.snapshot() == InterruptState(intx_asserted=False, intx_line=False)
    dev.irq.set_intx(True)
    saved = dev.irq.snapshot()
    assert saved == InterruptState(intx_asserted=True, intx_line=True)
    dev.irq.set_intx(False)
    dev.irq.restore(saved)  # the sink is not told again
    assert dev.irq.snapshot() == saved and not host.recorder.intx_level
    dev.irq.set_intx(False)  # the controller knows the line is up: it lowers it
    assert dev.irq.snapshot() == InterruptState(intx_asserted=False, intx_line=False)


def test_callback_sink() -> None:
    got = []
    dev = IrqDevice()
    dev.attach(None, CallbackSink(on_msi=lambda v, a, d: got.append((v, a, d)), on_intx=got.append))
    dev.config_write(ids.COMMAND, 2, ids.Command.MASTER | ids.Command.MEMORY)
    dev.bar_write(0, TABLE, 4, 0xFEE00000)
    dev.bar_write(0, TABLE + 8, 4, 77)
    dev.bar_write(0, TABLE + 12, 4, 0)
    msix = dev.irq.msix
    dev.config_write(msix.offset + 2, 2, msixmod.CTRL_ENABLE)
    dev.irq.notify(0)
    assert got == [(0, 0xFEE00000, 77)]


def test_eventfd_delivery_to_another_process() -> None:
    """The device signals eventfds that a second process waits on."""
    efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
    dev = IrqDevice()
    sink = EventfdSink({0: efds[0], 1: efds[1]})
    dev.attach(None, sink)
    dev.config_write(ids.COMMAND, 2, ids.Command.MASTER | ids.Command.MEMORY)
    for v in range(2):
        dev.bar_write(0, TABLE + 16 * v, 4, 0xFEE00000)
        dev.bar_write(0, TABLE + 16 * v + 12, 4, 0)
    dev.config_write(dev.irq.msix.offset + 2, 2, msixmod.CTRL_ENABLE)
    child = textwrap.dedent("""
        import os, select, sys
        fds = [int(x) for x in sys.argv[1:]]
        got = []
        for fd in fds:
            r, _, _ = select.select([fd], [], [], 10)
            assert r, "timeout"
            got.append(os.eventfd_read(fd))
        print(" ".join(map(str, got)))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child, *map(str, efds)], pass_fds=efds,
                            stdout=subprocess.PIPE, text=True)
    dev.irq.notify(0)
    dev.irq.notify(1)
    dev.irq.notify(1)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert out.split() == ["1", "2"]
    # a vector without an eventfd is dropped and counted
    sink.set_vector(1, None)
    dev.irq.notify(1)
    assert sink.dropped == 1
    for fd in efds:
        os.close(fd)


def test_unmask_racing_with_notify_from_another_thread_loses_nothing(host) -> None:
    """A device thread raising a vector while the host toggles the function mask:
    every message is either delivered or left pending, and the last unmask
    delivers whatever was pending — never a pending bit stuck behind an unmask."""
    import threading

    host.alloc_irq_vectors(1, 16)
    dev = host.device
    stop = threading.Event()
    raised = 0

    def device_thread() -> None:
        nonlocal raised
        while not stop.is_set():
            dev.irq.notify(7)
            raised += 1

    t = threading.Thread(target=device_thread)
    t.start()
    try:
        for _ in range(2000):
            host.msix_function_mask(True)
            host.msix_function_mask(False)
    finally:
        stop.set()
        t.join()
    assert not dev.irq.msix.is_pending(7)
    assert 1 <= host.irq_count(7) <= raised


_MAX_COUNTER = 0xFFFF_FFFF_FFFF_FFFE


class _PollThatLosesTheRace:
    """``select.poll`` for :func:`pcidev.irq.signal_eventfd`'s first poll: it answers
    "writable", but the peer fills the counter right after it (the race the watchdog is
    for); later polls (the watchdog's) are real ones."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.raced = False
        self.real = select.poll

    def __call__(self) -> object:
        if self.raced:
            return self.real()
        outer = self

        class Poll:
            def register(self, fd: int, events: int) -> None:
                pass

            def poll(self, timeout: int) -> list[tuple[int, int]]:
                outer.raced = True
                os.eventfd_write(outer.fd, _MAX_COUNTER)  # the peer saturates it now
                return [(outer.fd, select.POLLOUT)]
        return Poll()


def test_a_peer_saturating_a_blocking_eventfd_after_the_poll_holds_the_write_only_briefly(monkeypatch) -> None:
    """Regression: the peer shares the open file description, so it can make its eventfd
    blocking and fill the counter between signal_eventfd's poll and its write; the device
    thread then blocked in write() until the peer read (forever once the peer left). The
    watchdog drains the counter after EVENTFD_STUCK_SECONDS and the signal goes through."""
    fd = os.eventfd(0)  # blocking, as the peer set it
    before = irq.eventfd_writes_unblocked()
    monkeypatch.setattr(irq.select, "poll", _PollThatLosesTheRace(fd))
    result: list[bool] = []
    writer = threading.Thread(target=lambda: result.append(irq.signal_eventfd(fd)), daemon=True)
    started = time.monotonic()
    writer.start()
    writer.join(irq.EVENTFD_STUCK_SECONDS * 1.25 + 10)  # generous: the machine is shared
    took = time.monotonic() - started
    stuck = writer.is_alive()
    if stuck:  # do what the peer never will, so that the test ends
        os.eventfd_read(fd)
        writer.join()
    os.set_blocking(fd, False)
    counter = os.eventfd_read(fd)
    os.close(fd)
    assert not stuck, "signal_eventfd blocked in write() on a saturated blocking eventfd"
    assert result == [True] and counter == 1  # drained, then our signal
    assert took >= irq.EVENTFD_STUCK_SECONDS * 0.9
    # the drain thread counts after its read let the writer go: wait for it, not for the writer
    deadline = time.monotonic() + 10
    while irq.eventfd_writes_unblocked() == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert irq.eventfd_writes_unblocked() == before + 1


def test_signalling_an_eventfd_leaves_nothing_for_the_watchdog() -> None:
    fd = os.eventfd(0)
    try:
        for _ in range(3):
            assert irq.signal_eventfd(fd)
        assert os.eventfd_read(fd) == 3
        os.eventfd_write(fd, _MAX_COUNTER)
        assert not irq.signal_eventfd(fd)  # saturated: dropped, not waited for
        assert irq._WATCHDOG.writing == {}
    finally:
        os.close(fd)


def test_a_drain_after_the_write_ended_leaves_a_reused_fd_number_alone() -> None:
    # the watchdog saw a held write on fd N; before its drain thread ran, the write ended, the
    # server closed N and a socket took the number: the drain must not touch that socket
    efd = os.eventfd(0)
    call = next(irq._CALLS)
    irq._WATCHDOG.writing[call] = efd
    del irq._WATCHDOG.writing[call]  # the write returned
    os.close(efd)
    a, b = socket.socketpair()
    try:
        if a.fileno() != efd:  # make the number be reused, as it would be
            os.dup2(a.fileno(), efd)
        b.sendall(b"ABCDEFGHIJKLMNOP")
        irq._WATCHDOG.drain(call, efd, 1.0)
        assert os.get_blocking(efd)
        assert os.read(efd, 64) == b"ABCDEFGHIJKLMNOP"
    finally:
        if a.fileno() != efd:
            os.close(efd)
        a.close()
        b.close()


def test_a_drain_of_a_write_still_held_empties_the_counter_through_a_duplicate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    efd = os.eventfd(0)
    try:
        os.eventfd_write(efd, _MAX_COUNTER)
        call = next(irq._CALLS)
        irq._WATCHDOG.writing[call] = efd  # as a write held on the saturated counter would be
        dups: list[int] = []
        closed: list[int] = []
        real_dup, real_close = os.dup, os.close

        def dup(fd: int) -> int:
            new = real_dup(fd)
            if fd == efd:
                dups.append(new)
            return new

        def close(fd: int) -> None:
            closed.append(fd)
            real_close(fd)

        # (counting /proc/self/fd would race with other threads' descriptors)
        monkeypatch.setattr(os, "dup", dup)
        monkeypatch.setattr(os, "close", close)
        try:
            irq._WATCHDOG.drain(call, efd, 1.0)
        finally:
            del irq._WATCHDOG.writing[call]
            monkeypatch.undo()
        assert dups and set(dups) <= set(closed)  # drained through a duplicate, closed after
        p = select.poll()
        p.register(efd, select.POLLIN)
        assert not p.poll(0)  # counter 0: drained
        assert irq.signal_eventfd(efd)
        assert os.eventfd_read(efd) == 1
    finally:
        os.close(efd)
