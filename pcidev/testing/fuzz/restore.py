"""Reusing one machine and device across fuzz inputs: :class:`MachineTemplate`.

Building a device, plugging it and letting a driver probe it costs far more than most
inputs (a controller starts its workers, a probe runs a dozen admin commands through
instrumented code). A target that starts every input from the same probed state can
instead build that state once, save it, and put it back before each input:

* the device: :func:`~pcidev.migration.snapshot.save_device` once, and
  :func:`~pcidev.migration.snapshot.load_device` of that snapshot into the same
  (quiesced) device before each input, the all-or-nothing load a migration does. Every
  memfd the device saved but guest RAM (an NVMe ``mem`` namespace's data, a memory
  buffer) is given as a fresh copy of its contents at the save, holes kept, so the device
  swaps in memory that no earlier input wrote;
* guest RAM: every byte written back; the machine's DMA allocator: its free and used
  ranges (:meth:`~pcidev.host.machine.PageAllocator.state`);
* the host's handle on the device (:class:`~pcidev.host.pci.HostPciDevice`: MSI-X, BAR
  assignments, held writes) and its interrupt recorder (counts per vector);
* a driver (or any host-side object): :meth:`MachineTemplate.host_copy` of a copy taken
  at the save, sharing the machine, the handle and the device.

What a target gains has to be shown, not assumed: the template's users compare, for
many inputs, the outcome of input B run after input A on the reused device with B on a
fresh one (``tests/plugins/nvme/testing/test_fuzz.py``). On anything unexpected (a
finding, an exception) a target drops the template and builds a new one
(:meth:`MachineTemplate.close`), so a broken device is never reused.
"""

from __future__ import annotations

import copy
import os
from typing import Any, TypeVar

from pcidev.device import PciDevice
from pcidev.errors import PcidevError
from pcidev.host import Machine
from pcidev.host.pci import HostPciDevice
from pcidev.migration.snapshot import VMStateSnapshot, load_device, save_device

__all__ = ["MachineTemplate"]

T = TypeVar("T")

#: the host handle's attributes that are identities, not state (kept as they are)
_HANDLE_IDENTITY = frozenset({"machine", "_lock", "physfn", "_device", "recorder"})
#: the interrupt recorder's state (its condition and callbacks are kept as they are)
_RECORDER_STATE = ("counts", "intx_level", "intx_edges", "stray")


def _extents(fd: int) -> list[tuple[int, bytes]]:
    """The data extents of a file (``SEEK_DATA``/``SEEK_HOLE``): (offset, bytes) each."""
    size = os.fstat(fd).st_size
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data past pos
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, os.pread(fd, end - start, start)))
        pos = end
    return out


class _MemfdImage:
    """A memfd's size and data extents at the save; :meth:`copy` makes a new memfd of them."""

    def __init__(self, fd: int) -> None:
        self.name = os.readlink(f"/proc/self/fd/{fd}").removeprefix("/memfd:").removesuffix(" (deleted)")
        self.size = os.fstat(fd).st_size
        self.extents = _extents(fd)

    def copy(self) -> int:
        fd = os.memfd_create(self.name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self.size)
            for off, data in self.extents:
                os.pwrite(fd, data, off)
        except BaseException:
            os.close(fd)
            raise
        return fd


class MachineTemplate:
    """A machine with one in-process device, probed by a host-side driver: saved once by
    :meth:`save`, put back by :meth:`restore` (see the module's documentation).

    :param machine: the machine (the template owns it from now on).
    :param pdev: the host's handle on the device, plugged into ``machine``.
    """

    def __init__(self, machine: Machine, pdev: HostPciDevice) -> None:
        device = pdev.device
        if not isinstance(device, PciDevice):
            raise PcidevError(f"a machine template needs an in-process device, not {device!r}")
        self.machine = machine
        self.pdev = pdev
        self.device: PciDevice = device
        self._snapshot: VMStateSnapshot | None = None
        self._fds: list[int | _MemfdImage] = []  # per snapshot index: RAM (its fd), or a memfd's image
        self._dups: list[int] = []
        self._ram = b""
        self._allocator: tuple[list[tuple[int, int]], dict[int, int]] = ([], {})
        self._handle: dict[str, Any] = {}
        self._recorder: dict[str, Any] = {}
        self._hosts: list[object] = []

    def _shared(self) -> dict[int, Any]:
        """The deepcopy memo that keeps the machine, the handle, the device and their
        memory and recorder shared (what a host-side copy refers to, not copies of it)."""
        keep = (self.machine, self.machine.memory, self.pdev, self.pdev.recorder, self.device)
        return {id(o): o for o in keep}

    def save(self, *hosts: object) -> list[Any]:
        """Save the device (quiescing it: call it once the set-up is done), guest RAM, the
        allocator, the handle and copies of ``hosts`` (a driver...); the device resumes.

        :param hosts: host-side objects whose state :meth:`host_copy` hands out again.
        :returns: nothing useful but the copies' count check (the copies, for a test).
        """
        dev = self.device
        dev.quiesce()
        try:
            snap = save_device(dev)
            fds: list[int | _MemfdImage] = []
            for fd in snap.fds:
                if os.path.sameopenfile(fd, self.machine.ram_fd):
                    fds.append(self.machine.ram_fd)
                elif os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
                    fds.append(_MemfdImage(fd))
                else:  # an eventfd or a file: the same one each time (a duplicate of it)
                    dup = os.dup(fd)
                    self._dups.append(dup)
                    fds.append(dup)
            self._snapshot, self._fds = snap, fds
            self._ram = self.machine.memory.read(0, self.machine.ram_size)
            self._allocator = self.machine.allocator.state()
            self._handle = {k: copy.deepcopy(v, self._shared()) for k, v in vars(self.pdev).items()
                            if k not in _HANDLE_IDENTITY}
            self._recorder = {k: copy.deepcopy(getattr(self.pdev.recorder, k)) for k in _RECORDER_STATE}
            self._hosts = [copy.deepcopy(h, self._shared()) for h in hosts]
        finally:
            dev.resume()
        return list(self._hosts)

    def host_copy(self, index: int = 0) -> Any:
        """A new copy of the ``index``-th host object given to :meth:`save`, as it was then."""
        return copy.deepcopy(self._hosts[index], self._shared())

    def restore(self) -> None:
        """Put the device, guest RAM, the allocator and the handle back as :meth:`save` found them.

        :raises PcidevError: the device refused its own snapshot (a
            :class:`~pcidev.errors.VMStateError`): the template is unusable, close it.
        """
        snap = self._snapshot
        if snap is None:
            raise PcidevError("the machine template was not saved")
        dev, machine, pdev = self.device, self.machine, self.pdev
        dev.quiesce()
        made: list[int] = []
        try:
            fds: list[int | None] = []
            for entry in self._fds:
                if isinstance(entry, _MemfdImage):
                    made.append(entry.copy())
                    fds.append(made[-1])
                else:
                    fds.append(entry)
            res = load_device(dev, snap, fds)
        finally:
            for fd in made:  # (the load keeps duplicates of what it maps)
                os.close(fd)
        dev.attach(machine.memory, pdev.recorder)
        res.close()
        machine.memory.write(0, self._ram)
        machine.allocator.restore(self._allocator)
        for k, v in self._handle.items():
            setattr(pdev, k, copy.deepcopy(v, self._shared()))
        for k in _RECORDER_STATE:
            setattr(pdev.recorder, k, copy.deepcopy(self._recorder[k]))
        dev.resume()

    def close(self) -> None:
        """Close the device and the machine."""
        for fd in self._dups:
            os.close(fd)
        self._dups.clear()
        self.device.close()
        self.machine.close()
