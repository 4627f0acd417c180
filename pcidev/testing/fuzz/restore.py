"""Reusing one machine and device across fuzz inputs: :class:`MachineTemplate`.

Building a device, plugging it and letting a driver probe it costs far more than most
inputs (a controller starts its workers, a probe runs a dozen admin commands through
instrumented code). A target that starts every input from the same probed state can
instead build that state once, save it, and put it back before each input:

* the device: :func:`~pcidev.migration.snapshot.save_device` once, and
  :func:`~pcidev.migration.snapshot.load_own_snapshot` of that snapshot into the same
  (quiesced) device before each input: the trusted path of a load (the template made the
  snapshot of this device itself: the fingerprint, the sections' constraints and the
  rollback copy are skipped; the device's own checks still run). Every memfd the device
  saved but guest RAM (an NVMe ``mem`` namespace's data, a memory buffer) is given as a
  fresh copy of its contents at the save, holes kept, so the device swaps in memory that
  no earlier input wrote;
* guest RAM: all of it made zero by punching it out of its memfd (``MADV_REMOVE``: no
  copy, the pages an input touched are freed), then the pages that held data at the save
  written back (a handful: queues, the set-up's buffers); where the kernel cannot punch,
  every byte is written; the machine's DMA allocator: its free and used ranges
  (:meth:`~pcidev.host.machine.PageAllocator.state`), and its BAR windows' next free
  addresses;
* the host's handle on the device (:class:`~pcidev.host.pci.HostPciDevice`: MSI-X, BAR
  assignments, held writes) and its interrupt recorder (counts per vector);
* a driver (or any host-side object): :meth:`MachineTemplate.host_copy` of a copy taken
  at the save, sharing the machine, the handle and the device (pickled once at the save
  with those as persistent references, unpickled for each copy; a deep copy for an object
  pickle cannot take).

What a target gains has to be shown, not assumed: the template's users compare, for
many inputs, the outcome of input B run after input A on the reused device with B on a
fresh one (``tests/plugins/nvme/testing/test_fuzz.py``). On anything unexpected (a
finding, an exception) a target drops the template and builds a new one
(:meth:`MachineTemplate.close`), so a broken device is never reused.
"""

from __future__ import annotations

import copy
import io
import mmap
import os
import pickle
from typing import Any, TypeVar

from pcidev.device import PciDevice
from pcidev.errors import PcidevError
from pcidev.host import Machine
from pcidev.host.pci import HostPciDevice
from pcidev.migration.snapshot import VMStateSnapshot, load_own_snapshot, save_device

__all__ = ["MachineTemplate"]

T = TypeVar("T")

#: the host handle's attributes that are identities, not state (kept as they are)
_HANDLE_IDENTITY = frozenset({"machine", "_lock", "physfn", "_device", "recorder"})
#: the interrupt recorder's state (its condition and callbacks are kept as they are)
_RECORDER_STATE = ("counts", "intx_level", "intx_edges", "stray")
#: the granule in which guest RAM's data at the save is kept (and written back)
_RAM_PAGE = 4096


def _data_pages(ram: bytes) -> list[tuple[int, bytes]]:
    """The runs of pages of ``ram`` that are not all zero: (offset, bytes) each."""
    out: list[tuple[int, bytes]] = []
    zero = bytes(_RAM_PAGE)
    start = None
    for off in range(0, len(ram), _RAM_PAGE):
        if ram[off:off + _RAM_PAGE] != zero:
            if start is None:
                start = off
        elif start is not None:
            out.append((start, ram[start:off]))
            start = None
    if start is not None:
        out.append((start, ram[start:]))
    return out


def _punch(window: mmap.mmap) -> bool:
    """Make all of a shared memfd mapping read as zeros by freeing its pages
    (``MADV_REMOVE``); False where the kernel (or Python) cannot."""
    try:
        window.madvise(mmap.MADV_REMOVE)
    except (OSError, ValueError, AttributeError):
        return False
    return True


class _Shared(pickle.Pickler):
    """Pickles a host-side object with the template's shared objects as persistent references."""

    def __init__(self, file: io.BytesIO, shared: list[object]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._ids = {id(o): i for i, o in enumerate(shared)}

    def persistent_id(self, obj: object) -> int | None:
        return self._ids.get(id(obj))


class _Unshared(pickle.Unpickler):
    def __init__(self, data: bytes, shared: list[object]) -> None:
        super().__init__(io.BytesIO(data))
        self._shared = shared

    def persistent_load(self, pid: Any) -> object:
        return self._shared[pid]


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
        self._ram: list[tuple[int, bytes]] = []  # guest RAM's pages with data at the save
        self._ram_window: mmap.mmap | None = None  # guest RAM's memfd, mapped to punch it
        self._allocator: tuple[list[tuple[int, int]], dict[int, int]] = ([], {})
        self._windows: dict[str, int] = {}
        self._handle: dict[str, Any] = {}
        self._recorder: dict[str, Any] = {}
        self._hosts: list[object] = []
        self._pickled: list[bytes | None] = []  # per host object: its pickle (None: deep-copied)

    def _kept(self) -> list[object]:
        """What a host-side copy refers to, not copies of it: the machine, its memory, the
        handle, its recorder and the device."""
        return [self.machine, self.machine.memory, self.pdev, self.pdev.recorder, self.device]

    def _shared(self) -> dict[int, Any]:
        """The deepcopy memo that keeps :meth:`_kept` shared."""
        return {id(o): o for o in self._kept()}

    def _pickle(self, obj: object) -> bytes | None:
        buf = io.BytesIO()
        try:
            _Shared(buf, self._kept()).dump(obj)
        except (pickle.PicklingError, TypeError, AttributeError):
            return None
        return buf.getvalue()

    def _copy(self, obj: object, pickled: bytes | None) -> Any:
        if pickled is None:
            return copy.deepcopy(obj, self._shared())
        return _Unshared(pickled, self._kept()).load()

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
            machine = self.machine
            self._ram = _data_pages(machine.memory.read(0, machine.ram_size))
            if self._ram_window is None:
                self._ram_window = mmap.mmap(machine.ram_fd, machine.ram_size)
            self._allocator = machine.allocator.state()
            self._windows = machine.windows_state()
            self._handle = {k: copy.deepcopy(v, self._shared()) for k, v in vars(self.pdev).items()
                            if k not in _HANDLE_IDENTITY}
            self._recorder = {k: copy.deepcopy(getattr(self.pdev.recorder, k)) for k in _RECORDER_STATE}
            self._hosts = [copy.deepcopy(h, self._shared()) for h in hosts]
            self._pickled = [self._pickle(h) for h in self._hosts]
        finally:
            dev.resume()
        return list(self._hosts)

    def host_copy(self, index: int = 0) -> Any:
        """A new copy of the ``index``-th host object given to :meth:`save`, as it was then."""
        return self._copy(self._hosts[index], self._pickled[index])

    def _restore_ram(self) -> None:
        machine = self.machine
        if self._ram_window is None or not _punch(self._ram_window):
            machine.memory.fill(0, machine.ram_size, 0)
        for off, data in self._ram:
            machine.memory.write(off, data)

    def restore(self) -> None:
        """Put the device, guest RAM, the allocator and the handle back as :meth:`save` found them.

        :raises VMStateError: the device refused its own snapshot (nothing was applied; an
            input deleted what no load brings back) or failed to apply it (the device is
            failed): the template is unusable, close it.
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
            res = load_own_snapshot(dev, snap, fds)
        finally:
            for fd in made:  # (the load keeps duplicates of what it maps)
                os.close(fd)
        dev.attach(machine.memory, pdev.recorder)
        res.close()
        self._restore_ram()
        machine.allocator.restore(self._allocator)
        machine.restore_windows(self._windows)
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
        if self._ram_window is not None:
            self._ram_window.close()
            self._ram_window = None
        self.device.close()
        self.machine.close()
