"""The software host: an in-process machine playing the part QEMU plays.

It owns guest RAM (a memfd mapped into a :class:`~pcidev.dma.GuestMemory`, so a
device in another process could map the same RAM), an allocator for DMA
buffers, memory and I/O windows from which BARs are assigned, and an
interrupt recorder per device. Tests, examples and benchmarks drive devices
through it::

    machine = Machine(ram_size=64 << 20)
    pdev = machine.plug(MyDevice())
    pdev.enable_device()
    pdev.set_master()
    nvec = pdev.alloc_irq_vectors(1, 4)
    pdev.iowrite32(0, 0x10, 1)
    assert pdev.wait_irq(0, timeout=1.0)
"""

from __future__ import annotations

import bisect
import os
import threading

from pcidev.dma import GuestMemory, alloc_memfd
from pcidev.errors import DmaError, MmioError, PcidevError
from pcidev.host.pci import HostedDevice, HostPciDevice
from pcidev.transport.link import RemoteDevice

#: x86's MSI address window
MSI_ADDRESS = 0xFEE0_0000


class PageAllocator:
    """A first-fit allocator over ``[start, end)`` of guest-physical addresses."""

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self._free: list[tuple[int, int]] = [(start, end)]
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    def alloc(self, size: int, align: int = 4096) -> int:
        """Allocate ``size`` bytes aligned to ``align`` (a power of two).

        :raises DmaError: when no free range is large enough.
        """
        if size <= 0 or align <= 0 or align & (align - 1):
            raise DmaError(f"bad allocation size {size} / alignment {align}")
        with self._lock:
            for i, (lo, hi) in enumerate(self._free):
                addr = (lo + align - 1) & ~(align - 1)
                if addr + size <= hi:
                    pieces = []
                    if addr > lo:
                        pieces.append((lo, addr))
                    if addr + size < hi:
                        pieces.append((addr + size, hi))
                    self._free[i:i + 1] = pieces
                    self._used[addr] = size
                    return addr
        raise DmaError(f"guest RAM exhausted: no {size}-byte block free")

    def free(self, addr: int) -> None:
        """Free a block returned by :meth:`alloc`."""
        with self._lock:
            size = self._used.pop(addr, None)
            if size is None:
                raise DmaError(f"{addr:#x} was not allocated")
            i = bisect.bisect_left(self._free, (addr, addr + size))
            self._free.insert(i, (addr, addr + size))
            # coalesce neighbours
            merged: list[tuple[int, int]] = []
            for lo, hi in self._free:
                if merged and merged[-1][1] == lo:
                    merged[-1] = (merged[-1][0], hi)
                else:
                    merged.append((lo, hi))
            self._free = merged

    def state(self) -> tuple[list[tuple[int, int]], dict[int, int]]:
        """The free ranges and the used blocks (copies), for :meth:`restore`."""
        with self._lock:
            return list(self._free), dict(self._used)

    def restore(self, state: tuple[list[tuple[int, int]], dict[int, int]]) -> None:
        """Put back the free ranges and used blocks :meth:`state` returned (everything
        allocated since is free again, everything freed since allocated again)."""
        free, used = state
        with self._lock:
            self._free, self._used = list(free), dict(used)

    @property
    def free_bytes(self) -> int:
        return sum(hi - lo for lo, hi in self._free)


class Machine:
    """An in-process PCI host with guest RAM at guest-physical address 0.

    :param ram_size: bytes of guest RAM (memfd-backed).
    """

    MMIO32_BASE = 0xC000_0000
    MMIO32_END = 0xFEC0_0000
    MMIO64_BASE = 0x80_0000_0000
    MMIO64_END = 0x100_0000_0000
    IO_BASE = 0x1000
    IO_END = 0x1_0000
    #: first guest address handed out by :meth:`alloc` (the first MiB stays free)
    ALLOC_BASE = 0x10_0000

    def __init__(self, ram_size: int = 64 << 20) -> None:
        if ram_size <= self.ALLOC_BASE or ram_size > self.MMIO32_BASE:
            raise PcidevError(f"RAM size {ram_size:#x} must be between 1 MiB and 3 GiB")
        self.ram_size = ram_size
        self.ram_fd = alloc_memfd(ram_size, "pcidev-guest-ram")
        self.memory = GuestMemory()
        self.memory.map(0, ram_size, self.ram_fd, name="ram")
        self.allocator = PageAllocator(self.ALLOC_BASE, ram_size)
        self.devices: list[HostPciDevice] = []
        self._remote: list[RemoteDevice] = []
        self._next = {"mem32": self.MMIO32_BASE, "mem64": self.MMIO64_BASE, "io": self.IO_BASE}

    # -- memory ---------------------------------------------------------------------------
    def alloc(self, size: int, align: int = 4096) -> int:
        """Allocate zeroed guest RAM for DMA buffers and queues; returns its address."""
        addr = self.allocator.alloc(size, align)
        self.memory.fill(addr, size, 0)
        return addr

    def free(self, addr: int) -> None:
        """Free guest RAM from :meth:`alloc`."""
        self.allocator.free(addr)

    def read(self, addr: int, length: int) -> bytes:
        return self.memory.read(addr, length)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.memory.write(addr, data)

    # -- devices ---------------------------------------------------------------------------
    def plug(self, device: HostedDevice, *, slot: int | None = None) -> HostPciDevice:
        """Realize ``device``, attach RAM and an interrupt recorder, and return the
        host-side handle (not yet enabled: call :meth:`~pcidev.host.pci.HostPciDevice.enable_device`)."""
        slot = len(self.devices) if slot is None else slot
        if any(d.slot == slot for d in self.devices):
            raise PcidevError(f"slot {slot} is taken")
        device.realize()
        pdev = HostPciDevice(self, device, slot)
        device.attach(self.memory, pdev.recorder)
        self.devices.append(pdev)
        return pdev

    def plug_remote(self, address: str, *, slot: int | None = None, timeout: float = 5.0) -> HostPciDevice:
        """Plug a device served in another process over the device link
        (:mod:`pcidev.transport.link`): its guest RAM is this machine's memfd, its
        interrupts arrive through eventfds. The handle works like one from
        :meth:`plug`; ``pdev.device`` is the :class:`~pcidev.transport.link.RemoteDevice`
        proxy, whose ``migrate()`` moves the device to another process while this
        machine keeps driving it. The proxy is closed with the machine.

        :param address: the device's link address (``unix:PATH``).
        :raises TransportError: nobody serves a device there.
        """
        remote = RemoteDevice(address, timeout=timeout)
        try:
            pdev = self.plug(remote, slot=slot)
        except BaseException:
            remote.close()
            raise
        self._remote.append(remote)
        return pdev

    def unplug(self, pdev: HostPciDevice) -> None:
        self.devices.remove(pdev)
        for remote in self._remote:
            if remote is pdev.device:
                self._remote.remove(remote)
                remote.close()
                break

    def windows_state(self) -> dict[str, int]:
        """The next free address of each BAR window (a copy), for :meth:`restore_windows`."""
        return dict(self._next)

    def restore_windows(self, state: dict[str, int]) -> None:
        """Put back the next free addresses :meth:`windows_state` returned (ranges assigned
        since are assigned again)."""
        self._next.update(state)

    def window_alloc(self, kind: str, size: int) -> int:
        """Assign a naturally aligned address range for a BAR of ``size`` bytes."""
        end = {"mem32": self.MMIO32_END, "mem64": self.MMIO64_END, "io": self.IO_END}[kind]
        addr = (self._next[kind] + size - 1) & ~(size - 1)
        if addr + size > end:
            raise PcidevError(f"{kind} window exhausted")
        self._next[kind] = addr + size
        return addr

    def _route(self, addr: int, size: int, io: bool) -> tuple[HostPciDevice, tuple[int | str, int]]:
        for pdev in self.devices:
            hit = pdev.decode(addr, size, io)
            if hit is not None:
                return pdev, hit
            for vf in pdev.virtfns:  # SR-IOV: a PF's virtual functions
                hit = vf.decode(addr, size, io)
                if hit is not None:
                    return vf, hit
        raise MmioError(f"no device decodes {'I/O' if io else 'memory'} address {addr:#x}")

    def mmio_read(self, addr: int, size: int) -> int:
        """Read ``size`` bytes at bus address ``addr`` from whichever BAR decodes it."""
        pdev, (bar, off) = self._route(addr, size, False)
        if isinstance(bar, str):  # "rom"
            return pdev.rom_read(off, size)
        return pdev.bar_read(bar, off, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        """Write to bus address ``addr``."""
        pdev, (bar, off) = self._route(addr, size, False)
        if isinstance(bar, str):  # "rom"
            return
        pdev.bar_write(bar, off, size, value)

    def io_read(self, port: int, size: int) -> int:
        pdev, (bar, off) = self._route(port, size, True)
        assert isinstance(bar, int)  # the ROM decodes memory only
        return pdev.bar_read(bar, off, size)

    def io_write(self, port: int, size: int, value: int) -> None:
        pdev, (bar, off) = self._route(port, size, True)
        assert isinstance(bar, int)  # the ROM decodes memory only
        pdev.bar_write(bar, off, size, value)

    def close(self) -> None:
        """Close remote devices, then release guest RAM."""
        for remote in self._remote:
            remote.close()
        self._remote.clear()
        self.memory.close()
        os.close(self.ram_fd)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
