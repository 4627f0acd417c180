"""Host-side view of a plugged device, with the names Linux drivers use.

:class:`HostPciDevice` does what the Linux PCI core and a driver's probe do:
size and assign BARs (``enable_device``), enable bus mastering (``set_master``),
program MSI-X / MSI / INTx (``alloc_irq_vectors``), access BARs
(``ioread32``/``iowrite32``...), walk capabilities and reset the function.
Interrupts the device sends are recorded per host vector and can be waited on.

Every access the host makes to an in-process :class:`~pcidev.device.PciDevice`
(configuration and BAR reads and writes, expansion ROM reads, and so the resets
they trigger: FLR, D3hot to D0 without No_Soft_Reset) holds :attr:`PciDevice.lock
<pcidev.device.PciDevice.lock>`, exactly as a transport's
:class:`~pcidev.transport.endpoint.DeviceEndpoint` does: a device whose worker
thread holds the lock while it changes its state never has a guest access land
in the middle of the change, whichever host drives it. A remote device's server
takes the lock on its side.

And as a transport holds the guest's accesses while the device is quiesced (a migration's
stop, a handover), the host holds its BAR writes to a quiesced in-process device (a
doorbell rung meanwhile): they are delivered in order when the device resumes, or to the
device the handle is re-pointed at (a migrated copy) -- never applied to a device whose
state may already be saved, never dropped. Reads go through (they change nothing), after
the held writes once the device runs again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from pcidev.device import PciDevice
from pcidev.dma import GuestMemory
from pcidev.errors import ConfigError, IrqError, PcidevError
from pcidev.pci import ids
from pcidev.pci.capabilities import express, msi, msix, pm, sriov
from pcidev.sriov import SriovFunctions, VirtualFunction, functions_of

log = logging.getLogger(__name__)

__all__ = [
    "PCI_IRQ_INTX",
    "PCI_IRQ_MSI",
    "PCI_IRQ_MSIX",
    "PCI_IRQ_ALL_TYPES",
    "HostBus",
    "HostedDevice",
    "InterruptRecorder",
    "HostPciDevice",
]


class HostBus(Protocol):
    """What a :class:`HostPciDevice` needs of the machine it is plugged in (a
    :class:`~pcidev.host.machine.Machine`): address windows and bus accesses."""

    def window_alloc(self, kind: str, size: int) -> int:
        """Allocate ``size`` bytes (naturally aligned) in window ``kind`` (``io``,
        ``mem32``, ``mem64``)."""

    def mmio_read(self, addr: int, size: int) -> int:
        """A memory read on the bus."""

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        """A memory write on the bus."""

    def io_read(self, port: int, size: int) -> int:
        """An I/O port read."""

    def io_write(self, port: int, size: int, value: int) -> None:
        """An I/O port write."""


#: :meth:`HostPciDevice.alloc_irq_vectors` flag: allow INTx (Linux's ``PCI_IRQ_INTX``, include/linux/pci.h).
PCI_IRQ_INTX = 1
#: :meth:`HostPciDevice.alloc_irq_vectors` flag: allow MSI (Linux's ``PCI_IRQ_MSI``).
PCI_IRQ_MSI = 2
#: :meth:`HostPciDevice.alloc_irq_vectors` flag: allow MSI-X (Linux's ``PCI_IRQ_MSIX``).
PCI_IRQ_MSIX = 4
#: :meth:`HostPciDevice.alloc_irq_vectors` flags: allow any of MSI-X, MSI and INTx, in that order of preference.
PCI_IRQ_ALL_TYPES = PCI_IRQ_INTX | PCI_IRQ_MSI | PCI_IRQ_MSIX

MSI_ADDRESS = 0xFEE0_0000


class HostedDevice(Protocol):
    """What the host model uses of a device: a :class:`~pcidev.device.PciDevice` or a
    :class:`~pcidev.transport.link.RemoteDevice` proxy."""

    def realize(self) -> None: ...

    def attach(self, memory: GuestMemory, sink: InterruptRecorder, /) -> None: ...

    def config_read(self, offset: int, size: int, /) -> int: ...

    def config_write(self, offset: int, size: int, value: int, /) -> None: ...

    def bar_read(self, index: int, offset: int, size: int, /) -> int: ...

    def bar_write(self, index: int, offset: int, size: int, value: int, /) -> None: ...

    def rom_read(self, offset: int, size: int, /) -> int: ...


class InterruptRecorder:
    """An interrupt sink that counts messages per vector and lets callers wait.

    For MSI-X the host programs each entry's data with the vector number; for
    MSI the low bits of the data select the vector. Messages to any address
    other than the MSI window are counted in ``stray``.
    """

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.intx_level = False
        self.intx_edges = 0
        self.stray = 0
        self.callbacks: dict[int, Callable[[int], object]] = {}
        self._cond = threading.Condition()

    # Called by the device, often from a worker thread holding ``device.lock`` and
    # ``device.irq.lock``: only the recorder's own condition is taken (never while
    # calling back into anything), and a callback runs with no recorder lock held,
    # so no lock is ever taken in the opposite order.
    def msi(self, vector: int, address: int, data: int) -> None:
        if address & ~0xFFFFF != MSI_ADDRESS:
            with self._cond:
                self.stray += 1
            return
        cb = self.callbacks.get(data)
        with self._cond:
            self.counts[data] = self.counts.get(data, 0) + 1
            self._cond.notify_all()
        if cb is not None:
            cb(data)

    def intx(self, level: bool) -> None:
        with self._cond:
            self.intx_level = level
            if level:
                self.intx_edges += 1
            self._cond.notify_all()

    def count(self, vector: int) -> int:
        with self._cond:
            return self.counts.get(vector, 0)

    def wait(self, vector: int, *, above: int, timeout: float) -> bool:
        """Wait until vector ``vector`` has been raised more than ``above`` times."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.counts.get(vector, 0) <= above:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_intx(self, level: bool, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.intx_level != level:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


_T = TypeVar("_T")


class HostPciDevice:
    """The host's handle on one plugged device.

    The bus cycles (:meth:`config_read`, :meth:`config_write`, :meth:`bar_read`,
    :meth:`bar_write`, :meth:`rom_read`) are the only way the host reaches the
    device; each holds the device's lock (see the module documentation).

    :param machine: the machine the device is plugged in.
    :param device: an in-process device or a remote proxy.
    :param slot: the slot number on the machine.
    """

    def __init__(self, machine: HostBus, device: HostedDevice, slot: int, *,
                 physfn: HostPciDevice | None = None, vf_index: int = 0) -> None:
        self.machine = machine
        self._lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        #: SR-IOV: the PF of a virtual function's handle (None for a PF or an ordinary function)
        self.physfn = physfn
        #: SR-IOV: the VF's number (0-based) when :attr:`physfn` is set
        self.vf_index = vf_index
        #: SR-IOV: the handles of the PF's virtual functions while VF Enable is set
        self.virtfns: list[HostPciDevice] = []
        self._sriov: SriovFunctions | None = None
        self.slot = slot
        #: BAR writes held while the in-process device is quiesced: (bar, offset, size, value)
        self._held: list[tuple[int, int, int, int]] = []
        self.device = device
        self.recorder = InterruptRecorder()
        #: per BAR: (address, size, kind) once assigned
        self.resources: dict[int | str, tuple[int, int, str]] = {}
        self.irq_type = 0
        self.nvec = 0
        self._consumed: dict[int, int] = {}

    @property
    def device(self) -> HostedDevice:
        """The device this handle drives (settable: a test may swap in a migrated copy)."""
        return self._device

    @device.setter
    def device(self, device: HostedDevice) -> None:
        old = self.__dict__.get("_device")
        if isinstance(old, PciDevice) and self._deliver_held in old.resume_listeners:
            old.resume_listeners.remove(self._deliver_held)
        self._device = device
        # an in-process device: hold its lock like a transport; a remote proxy: its
        # server holds the lock in the device's process
        self._lock = device.lock if isinstance(device, PciDevice) else contextlib.nullcontext()
        if isinstance(device, PciDevice):
            device.resume_listeners.append(self._deliver_held)
        self._follow_virtfns(device)
        self._deliver_held()  # (what a quiesced source held goes to a copy that runs)

    def _holds(self) -> bool:
        """The device is an in-process one that is quiesced (call with its lock held)."""
        dev = self._device
        return isinstance(dev, PciDevice) and dev.quiesced

    def _deliver_held(self) -> None:
        """Deliver the held BAR writes, in order, unless the device is (still) quiesced."""
        with self._lock:
            while self._held and not self._holds():
                bar, off, size, value = self._held.pop(0)
                try:
                    self._device.bar_write(bar, off, size, value)
                except PcidevError as exc:  # (an access the device refuses: as if made now)
                    log.warning("held BAR%d write at %#x+%d refused at delivery: %s", bar, off, size, exc)

    # -- SR-IOV: the virtual functions of an in-process PF ---------------------------------------
    @property
    def routing_id(self) -> int:
        """Bus/device/function number: ``slot << 3`` on bus 0 for a PF, the PF's plus
        First VF Offset plus ``k`` times VF Stride for its VF ``k``."""
        if self.physfn is None:
            return self.slot << 3
        cap = self.physfn.sriov_capability()
        if cap is None:
            raise ConfigError(f"VF {self.vf_index}: its PF no longer has an SR-IOV capability")
        return cap.vf_routing_id(self.physfn.routing_id, self.vf_index)

    def sriov_capability(self) -> sriov.SriovCapability | None:
        """The in-process PF's SR-IOV capability, or None."""
        return self._sriov.cap if self._sriov is not None else None

    def _follow_virtfns(self, device: HostedDevice) -> None:
        """Watch an in-process PF's virtual functions; when the handle is re-pointed at
        another device (a migrated copy), its VFs take over the existing VF handles."""
        if self._sriov is not None:
            self._sriov.unwatch(self)
        self._sriov = functions_of(device) if isinstance(device, PciDevice) else None
        if self._sriov is None:
            self.virtfns = []
            return
        self._sriov.watch(self)
        vfs = [vf for vf in self._sriov.vfs if isinstance(vf, VirtualFunction)]
        handles, self.virtfns = self.virtfns, []
        for k, vf in enumerate(vfs):
            if k < len(handles):
                handles[k].device = vf
                vf.irq.sink = handles[k].recorder
                self.virtfns.append(handles[k])
            else:
                self.vf_added(vf)

    def vf_added(self, vf: VirtualFunction) -> None:
        """Enumerate a new VF: a handle with its BARs placed from the PF's VF BARs and its
        interrupts recorded (part of :class:`~pcidev.sriov.VfWatcher`)."""
        handle = HostPciDevice(self.machine, vf, self.slot, physfn=self, vf_index=vf.vf_index)
        cap = vf.physfn_cap
        if cap is None:
            raise ConfigError(f"VF {vf.vf_index} was announced before it was bound to its PF")
        for bar in cap.vf_bars:
            handle.resources[bar.index] = (cap.vf_bar_address(vf.vf_index, bar.index),
                                           cap.vf_bar_size(bar.index), "mem64" if bar.bits64 else "mem32")
        vf.attach(vf.physfn.memory if vf.physfn is not None else None, handle.recorder)
        self.virtfns.append(handle)

    def vf_removed(self, vf: VirtualFunction) -> None:
        """Forget a VF's handle (part of :class:`~pcidev.sriov.VfWatcher`)."""
        self.virtfns = [h for h in self.virtfns if h.device is not vf]

    def _probe_vf_bar(self, off: int) -> tuple[int, bool]:
        """Size one VF BAR at config offset ``off`` (all ones, read back, restore)."""
        orig = self.config_read32(off)
        self.config_write32(off, 0xFFFFFFFF)
        val = self.config_read32(off)
        self.config_write32(off, orig)
        if val == 0:
            return 0, False
        if val & ids.BAR_MEM_TYPE_64:
            orig_hi = self.config_read32(off + 4)
            self.config_write32(off + 4, 0xFFFFFFFF)
            hi = self.config_read32(off + 4)
            self.config_write32(off + 4, orig_hi)
            return (~((hi << 32) | (val & ~0xF)) & 0xFFFFFFFFFFFFFFFF) + 1, True
        return (~(val & ~0xF) & 0xFFFFFFFF) + 1, False

    def enable_sriov(self, num_vfs: int) -> list[HostPciDevice]:
        """Size and assign the VF BARs (room for TotalVFs), write NumVFs and set VF
        Enable and VF MSE, as Linux's ``pci_enable_sriov`` does.

        :returns: the handles of the new VFs (also in :attr:`virtfns`).
        :raises PcidevError: the device has no SR-IOV capability or the VFs did not appear.
        """
        pos = self.find_ext_capability(ids.ExtCapId.SRIOV)
        if not pos:
            raise PcidevError("device has no SR-IOV capability")
        total = self.config_read16(pos + sriov.TOTAL_VF)
        i = 0
        while i < 6:
            off = pos + sriov.BAR + 4 * i
            size, is64 = self._probe_vf_bar(off)
            if size:
                span = 1 << (size * total - 1).bit_length()
                addr = self.machine.window_alloc("mem64" if is64 else "mem32", span)
                self.config_write32(off, addr & 0xFFFFFFFF)
                if is64:
                    self.config_write32(off + 4, addr >> 32)
            i += 2 if is64 else 1
        self.config_write16(pos + sriov.NUM_VF, num_vfs)
        ctrl = self.config_read16(pos + sriov.CTRL)
        self.config_write16(pos + sriov.CTRL, ctrl | sriov.CTRL_VFE | sriov.CTRL_MSE)
        if isinstance(self._device, PciDevice) and len(self.virtfns) != num_vfs:
            raise PcidevError(f"{len(self.virtfns)} VFs appeared, {num_vfs} were asked for")
        return list(self.virtfns)

    def disable_sriov(self) -> None:
        """Clear VF Enable and VF MSE, then NumVFs (``pci_disable_sriov``)."""
        pos = self.find_ext_capability(ids.ExtCapId.SRIOV)
        if not pos:
            raise PcidevError("device has no SR-IOV capability")
        ctrl = self.config_read16(pos + sriov.CTRL)
        self.config_write16(pos + sriov.CTRL, ctrl & ~(sriov.CTRL_VFE | sriov.CTRL_MSE))
        self.config_write16(pos + sriov.NUM_VF, 0)

    # -- bus cycles: every access to the device goes through _access -------------------------
    def _access(self, op: Callable[..., _T], *args: int) -> _T:
        """Call one of the device's access methods with the device's lock held (after
        the BAR writes held while it was quiesced, if it runs again)."""
        with self._lock:
            if self._held and not self._holds():
                self._deliver_held()
            return op(*args)

    def config_read(self, off: int, size: int) -> int:
        """A configuration read of ``size`` bytes at ``off``."""
        return self._access(self._device.config_read, off, size)

    def config_write(self, off: int, size: int, value: int) -> None:
        """A configuration write."""
        self._access(self._device.config_write, off, size, value)

    def bar_read(self, bar: int, off: int, size: int) -> int:
        """A read of BAR ``bar`` at ``off`` (by BAR and offset, as the bus routes it)."""
        return self._access(self._device.bar_read, bar, off, size)

    def bar_write(self, bar: int, off: int, size: int, value: int) -> None:
        """A write to BAR ``bar`` at ``off`` (held while an in-process device is quiesced,
        delivered at its resume: see the module documentation)."""
        with self._lock:
            if self._holds():
                self._held.append((bar, off, size, value))
                return
            if self._held:
                self._deliver_held()
            self._device.bar_write(bar, off, size, value)

    def rom_read(self, off: int, size: int) -> int:
        """An expansion ROM read."""
        return self._access(self._device.rom_read, off, size)

    # -- configuration space -----------------------------------------------------------------
    def config_read8(self, off: int) -> int:
        return self.config_read(off, 1)

    def config_read16(self, off: int) -> int:
        return self.config_read(off, 2)

    def config_read32(self, off: int) -> int:
        return self.config_read(off, 4)

    def config_write8(self, off: int, v: int) -> None:
        self.config_write(off, 1, v)

    def config_write16(self, off: int, v: int) -> None:
        self.config_write(off, 2, v)

    def config_write32(self, off: int, v: int) -> None:
        self.config_write(off, 4, v)

    @property
    def vendor(self) -> int:
        """The Vendor ID (a VF's reads FFFFh: its PF's, as Linux takes it)."""
        if self.physfn is not None:
            return self.physfn.vendor
        return self.config_read16(ids.VENDOR_ID)

    @property
    def device_id(self) -> int:
        """The Device ID (a VF's: the PF's VF Device ID, as Linux takes it)."""
        if self.physfn is not None:
            pos = self.physfn.find_ext_capability(ids.ExtCapId.SRIOV)
            return self.physfn.config_read16(pos + sriov.VF_DID)
        return self.config_read16(ids.DEVICE_ID)

    @property
    def class_code(self) -> int:
        return self.config_read32(ids.REVISION_ID) >> 8

    def find_capability(self, cap_id: int) -> int:
        """Offset of the first standard capability ``cap_id``, or 0 (``pci_find_capability``)."""
        if not self.config_read16(ids.STATUS) & ids.Status.CAP_LIST:
            return 0
        pos = self.config_read8(ids.CAPABILITY_LIST) & ~3
        seen = 0
        while pos and seen < 48:
            if self.config_read8(pos) == cap_id:
                return pos
            pos = self.config_read8(pos + 1) & ~3
            seen += 1
        return 0

    def capabilities(self) -> list[tuple[int, int]]:
        """``(offset, id)`` of every standard capability, in chain order."""
        out: list[tuple[int, int]] = []
        pos = self.config_read8(ids.CAPABILITY_LIST) & ~3 if self.config_read16(ids.STATUS) & ids.Status.CAP_LIST else 0
        while pos and len(out) < 48:
            out.append((pos, self.config_read8(pos)))
            pos = self.config_read8(pos + 1) & ~3
        return out

    def ext_capabilities(self) -> list[tuple[int, int, int]]:
        """``(offset, id, version)`` of every extended capability, in chain order."""
        out: list[tuple[int, int, int]] = []
        pos = ids.EXT_CAP_START
        while pos and len(out) < (4096 - 256) // 8:
            hdr = self.config_read32(pos)
            if hdr == 0 or hdr == 0xFFFFFFFF:
                break
            out.append((pos, hdr & 0xFFFF, (hdr >> 16) & 0xF))
            pos = (hdr >> 20) & 0xFFC
            if pos and pos < ids.EXT_CAP_START:
                break
        return out

    def find_ext_capability(self, cap_id: int) -> int:
        """Offset of extended capability ``cap_id``, or 0 (``pci_find_ext_capability``)."""
        for off, cid, _ver in self.ext_capabilities():
            if cid == cap_id:
                return off
        return 0

    # -- BARs -----------------------------------------------------------------------------------
    def size_bars(self) -> dict[int, tuple[int, str]]:
        """Size every BAR the way firmware does: write all ones, read back, restore.

        :returns: BAR index → (size, kind) with kind ``mem32``, ``mem64`` or ``io``.
        """
        cmd = self.config_read16(ids.COMMAND)
        self.config_write16(ids.COMMAND, cmd & ~(ids.Command.MEMORY | ids.Command.IO))
        found: dict[int, tuple[int, str]] = {}
        i = 0
        while i < 6:
            off = ids.BASE_ADDRESS_0 + 4 * i
            orig = self.config_read32(off)
            self.config_write32(off, 0xFFFFFFFF)
            val = self.config_read32(off)
            self.config_write32(off, orig)
            if val == 0:
                i += 1
                continue
            if val & ids.BAR_SPACE_IO:
                size = (~(val & ~0x3) & 0xFFFFFFFF) + 1
                found[i] = (size & 0xFFFF if size > 0xFFFF else size, "io")
                i += 1
                continue
            if val & ids.BAR_MEM_TYPE_64:
                orig_hi = self.config_read32(off + 4)
                self.config_write32(off + 4, 0xFFFFFFFF)
                hi = self.config_read32(off + 4)
                self.config_write32(off + 4, orig_hi)
                mask = (hi << 32) | (val & ~0xF)
                size = (~mask & 0xFFFFFFFFFFFFFFFF) + 1
                found[i] = (size, "mem64")
                i += 2
                continue
            size = (~(val & ~0xF) & 0xFFFFFFFF) + 1
            found[i] = (size, "mem32")
            i += 1
        self.config_write16(ids.COMMAND, cmd)
        return found

    def rom_size(self) -> int:
        """Size the expansion ROM BAR (0: none)."""
        orig = self.config_read32(ids.ROM_ADDRESS)
        self.config_write32(ids.ROM_ADDRESS, 0xFFFFF800)
        val = self.config_read32(ids.ROM_ADDRESS) & ~0x7FF
        self.config_write32(ids.ROM_ADDRESS, orig)
        return 0 if val == 0 else (~val & 0xFFFFFFFF) + 1

    def enable_device(self) -> None:
        """Size and assign every BAR (and the ROM), then enable memory and I/O
        decoding (``pci_enable_device``)."""
        cmd_bits = 0
        for idx, (size, kind) in self.size_bars().items():
            addr = self.machine.window_alloc(kind, max(size, 16))
            off = ids.BASE_ADDRESS_0 + 4 * idx
            self.config_write32(off, addr & 0xFFFFFFFF)
            if kind == "mem64":
                self.config_write32(off + 4, addr >> 32)
            self.resources[idx] = (addr, size, kind)
            cmd_bits |= ids.Command.IO if kind == "io" else ids.Command.MEMORY
        rom = self.rom_size()
        if rom:
            addr = self.machine.window_alloc("mem32", rom)
            self.config_write32(ids.ROM_ADDRESS, addr)
            self.resources["rom"] = (addr, rom, "mem32")
        cmd = self.config_read16(ids.COMMAND)
        self.config_write16(ids.COMMAND, cmd | cmd_bits)

    def disable_device(self) -> None:
        cmd = self.config_read16(ids.COMMAND)
        self.config_write16(ids.COMMAND, cmd & ~(ids.Command.MEMORY | ids.Command.IO | ids.Command.MASTER))

    def set_master(self) -> None:
        """Enable bus mastering (DMA and MSI)."""
        self.config_write16(ids.COMMAND, self.config_read16(ids.COMMAND) | ids.Command.MASTER)

    def clear_master(self) -> None:
        self.config_write16(ids.COMMAND, self.config_read16(ids.COMMAND) & ~ids.Command.MASTER)

    def decode(self, addr: int, size: int, io: bool) -> tuple[int | str, int] | None:
        """``(bar, offset)`` if one of this device's assigned BARs holds ``addr``."""
        for key, (base, length, kind) in self.resources.items():
            if (kind == "io") != io:
                continue
            if base <= addr < base + length:
                return key, addr - base
        return None

    def bar_address(self, bar: int) -> int:
        if bar not in self.resources:
            raise PcidevError(f"BAR{bar} is not assigned (call enable_device)")
        return self.resources[bar][0]

    def _ioread(self, bar: int, off: int, size: int) -> int:
        res = self.resources.get(bar)
        if res is None:
            raise PcidevError(f"BAR{bar} is not assigned (call enable_device)")
        if res[2] == "io":
            return self.machine.io_read(res[0] + off, size)
        return self.machine.mmio_read(res[0] + off, size)

    def _iowrite(self, bar: int, off: int, size: int, value: int) -> None:
        res = self.resources.get(bar)
        if res is None:
            raise PcidevError(f"BAR{bar} is not assigned (call enable_device)")
        if res[2] == "io":
            self.machine.io_write(res[0] + off, size, value)
        else:
            self.machine.mmio_write(res[0] + off, size, value)

    def ioread8(self, bar: int, off: int) -> int:
        return self._ioread(bar, off, 1)

    def ioread16(self, bar: int, off: int) -> int:
        return self._ioread(bar, off, 2)

    def ioread32(self, bar: int, off: int) -> int:
        return self._ioread(bar, off, 4)

    def ioread64(self, bar: int, off: int) -> int:
        return self._ioread(bar, off, 8)

    def iowrite8(self, bar: int, off: int, v: int) -> None:
        self._iowrite(bar, off, 1, v)

    def iowrite16(self, bar: int, off: int, v: int) -> None:
        self._iowrite(bar, off, 2, v)

    def iowrite32(self, bar: int, off: int, v: int) -> None:
        self._iowrite(bar, off, 4, v)

    def iowrite64(self, bar: int, off: int, v: int) -> None:
        self._iowrite(bar, off, 8, v)

    def lo_hi_writeq(self, bar: int, off: int, v: int) -> None:
        """Write a 64-bit register as two 32-bit halves, low first (Linux ``lo_hi_writeq``)."""
        self.iowrite32(bar, off, v & 0xFFFFFFFF)
        self.iowrite32(bar, off + 4, v >> 32)

    def lo_hi_readq(self, bar: int, off: int) -> int:
        return self.ioread32(bar, off) | (self.ioread32(bar, off + 4) << 32)

    def read_rom(self, length: int | None = None) -> bytes:
        """Enable the ROM BAR, read it, disable it again (``pci_map_rom``)."""
        if "rom" not in self.resources:
            return b""
        base, size, _ = self.resources["rom"]
        length = size if length is None else min(length, size)
        self.config_write32(ids.ROM_ADDRESS, base | ids.ROM_ENABLE)
        try:
            return b"".join(self.machine.mmio_read(base + o, 4).to_bytes(4, "little")
                            for o in range(0, length, 4))[:length]
        finally:
            self.config_write32(ids.ROM_ADDRESS, base)

    # -- interrupts ---------------------------------------------------------------------------
    def alloc_irq_vectors(self, min_vecs: int, max_vecs: int, flags: int = PCI_IRQ_ALL_TYPES) -> int:
        """Enable MSI-X, else MSI, else INTx, with up to ``max_vecs`` vectors
        (``pci_alloc_irq_vectors``). MSI-X entry *i* (MSI message *i*) is
        programmed so that it is recorded as host vector *i*.

        :returns: the number of vectors enabled.
        :raises IrqError: if fewer than ``min_vecs`` can be had.
        """
        if flags & PCI_IRQ_MSIX:
            pos = self.find_capability(ids.CapId.MSIX)
            if pos:
                nvec = min(max_vecs, (self.config_read16(pos + 2) & 0x7FF) + 1)
                if nvec >= min_vecs:
                    self._setup_msix(pos, nvec)
                    return nvec
        if flags & PCI_IRQ_MSI:
            pos = self.find_capability(ids.CapId.MSI)
            if pos:
                ctrl = self.config_read16(pos + 2)
                cap = 1 << ((ctrl >> 1) & 7)
                nvec = 1
                while nvec * 2 <= min(max_vecs, cap):
                    nvec *= 2
                if nvec >= min_vecs:
                    self._setup_msi(pos, nvec)
                    return nvec
        if flags & PCI_IRQ_INTX and min_vecs <= 1 and self.config_read8(ids.INTERRUPT_PIN):
            self.irq_type, self.nvec = PCI_IRQ_INTX, 1
            cmd = self.config_read16(ids.COMMAND)
            self.config_write16(ids.COMMAND, cmd & ~ids.Command.INTX_DISABLE)
            return 1
        raise IrqError(f"cannot allocate {min_vecs} interrupt vectors")

    def _setup_msix(self, pos: int, nvec: int) -> None:
        ctrl = self.config_read16(pos + 2)
        self.config_write16(pos + 2, ctrl | msix.CTRL_ENABLE | msix.CTRL_MASKALL)
        table = self.config_read32(pos + msix.TABLE)
        bar, off = table & 7, table & ~7
        for v in range(nvec):
            e = off + v * msix.ENTRY_SIZE
            self.iowrite32(bar, e + 0, MSI_ADDRESS)
            self.iowrite32(bar, e + 4, 0)
            self.iowrite32(bar, e + 8, v)
            self.iowrite32(bar, e + 12, 0)
        self.irq_type, self.nvec = PCI_IRQ_MSIX, nvec
        self._msix = (pos, bar, off)
        cmd = self.config_read16(ids.COMMAND)
        self.config_write16(ids.COMMAND, cmd | ids.Command.INTX_DISABLE)
        self.config_write16(pos + 2, (ctrl | msix.CTRL_ENABLE) & ~msix.CTRL_MASKALL)

    def _setup_msi(self, pos: int, nvec: int) -> None:
        ctrl = self.config_read16(pos + 2)
        is64 = bool(ctrl & msi.CTRL_64BIT)
        self.config_write32(pos + 4, MSI_ADDRESS)
        data_off = 0x0C if is64 else 0x08
        if is64:
            self.config_write32(pos + 8, 0)
        self.config_write16(pos + data_off, 0)
        if ctrl & msi.CTRL_MASKBIT:
            self.config_write32(pos + data_off + 4, 0)
        log2 = nvec.bit_length() - 1
        ctrl = (ctrl & ~msi.CTRL_MME_MASK) | (log2 << msi.CTRL_MME_SHIFT) | msi.CTRL_ENABLE
        cmd = self.config_read16(ids.COMMAND)
        self.config_write16(ids.COMMAND, cmd | ids.Command.INTX_DISABLE)
        self.config_write16(pos + 2, ctrl)
        self.irq_type, self.nvec = PCI_IRQ_MSI, nvec

    def free_irq_vectors(self) -> None:
        """Disable MSI-X/MSI (``pci_free_irq_vectors``)."""
        for cap_id, bit in ((ids.CapId.MSIX, msix.CTRL_ENABLE), (ids.CapId.MSI, msi.CTRL_ENABLE)):
            pos = self.find_capability(cap_id)
            if pos:
                self.config_write16(pos + 2, self.config_read16(pos + 2) & ~bit)
        self.irq_type, self.nvec = 0, 0

    def msix_mask(self, vector: int, masked: bool = True) -> None:
        """Set or clear the per-vector mask bit of MSI-X entry ``vector``."""
        _pos, bar, off = self._msix
        self.iowrite32(bar, off + vector * msix.ENTRY_SIZE + 12, 1 if masked else 0)

    def msix_function_mask(self, masked: bool = True) -> None:
        pos = self.find_capability(ids.CapId.MSIX)
        ctrl = self.config_read16(pos + 2)
        self.config_write16(pos + 2, ctrl | msix.CTRL_MASKALL if masked else ctrl & ~msix.CTRL_MASKALL)

    def irq_count(self, vector: int) -> int:
        """How many times host vector ``vector`` fired."""
        return self.recorder.count(vector)

    def wait_irq(self, vector: int, timeout: float = 5.0) -> bool:
        """Wait for one *new* interrupt on ``vector`` since the last successful
        wait (each interrupt is consumed once)."""
        seen = self._consumed.get(vector, 0)
        if self.recorder.wait(vector, above=seen, timeout=timeout):
            self._consumed[vector] = seen + 1
            return True
        return False

    # -- power and reset ---------------------------------------------------------------------------
    def set_power_state(self, state: int) -> None:
        """Write PMCSR's power state (0 = D0, 3 = D3hot)."""
        pos = self.find_capability(ids.CapId.PM)
        if not pos:
            raise PcidevError("device has no Power Management capability")
        v = self.config_read16(pos + pm.PMCSR)
        self.config_write16(pos + pm.PMCSR, (v & ~pm.STATE_MASK & ~pm.PME_STATUS) | state)

    def flr(self) -> None:
        """Initiate a Function Level Reset (``pcie_flr``)."""
        pos = self.find_capability(ids.CapId.EXP)
        if not pos or not self.config_read32(pos + express.DEVCAP) & express.DEVCAP_FLR:
            raise PcidevError("device does not support FLR")
        self.config_write16(pos + express.DEVCTL, self.config_read16(pos + express.DEVCTL) | express.DEVCTL_BCR_FLR)

    def save_config(self) -> bytes:
        """The first 256 bytes of config space, read with config cycles as
        ``pci_save_state`` does (so it works for remote devices too)."""
        return b"".join(self.config_read32(o).to_bytes(4, "little") for o in range(0, 256, 4))

    def reset_function(self) -> None:
        """FLR with the header (BARs, command) restored afterwards, as ``pci_reset_function`` does."""
        saved = [self.config_read32(o) for o in range(ids.BASE_ADDRESS_0, ids.BASE_ADDRESS_0 + 24, 4)]
        cmd = self.config_read16(ids.COMMAND)
        self.flr()
        for i, v in enumerate(saved):
            self.config_write32(ids.BASE_ADDRESS_0 + 4 * i, v)
        self.config_write16(ids.COMMAND, cmd)
        self.irq_type, self.nvec = 0, 0
