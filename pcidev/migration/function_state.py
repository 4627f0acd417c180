"""Framework-owned device state: what every :class:`~pcidev.device.PciDevice`
migrates whatever its type, and the configuration fingerprint.

A saved device is two vmstate sections (docs/migration.md; three when its class has a layer,
:attr:`~pcidev.device.PciDevice.LAYER_VMSTATE`, whose section comes between them):

* ``pcidev/function`` instance 0 (:class:`FunctionState`): configuration space
  (which holds the BAR assignments, the command register, MSI registers and every
  capability), the MSI-X table and Pending Bit Array, the INTx level, the failed
  flag, the guest-memory map and the interrupt eventfds, both as out-of-band
  file-descriptor references (:class:`~pcidev.vmstate.FdRef`), and the RAM BARs
  (:class:`RamBarsState`: each :class:`~pcidev.bar.RamBacking`'s descriptor, which
  the destination's backing adopts);
* the device type's own section, described by its ``VMSTATE`` class, instance 0.

The stream header carries the configuration fingerprint
(:func:`framework_fingerprint` plus the device's ``device_fingerprint()``): a
destination configured differently (BAR layout, vector counts, capability
layout, queue counts...) refuses the stream with an error naming every
difference.

The section composes what the components export: configuration space, the
interrupt controller's INTx state (:meth:`~pcidev.irq.InterruptController.snapshot`),
the MSI-X table and PBA (:meth:`~pcidev.pci.capabilities.msix.MsixCapability.snapshot`),
the failed flag, the guest-memory map and the interrupt eventfds.

The functions here are the machinery behind :func:`pcidev.migration.save_device`
and :func:`pcidev.migration.load_device`; device authors use those, not this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from pcidev.bar import RamBacking, RamMapping
from pcidev.device import PciDevice
from pcidev.dma import GuestMemory
from pcidev.errors import ConfigError, DeviceFailedError, DmaError
from pcidev.irq import EventfdSink, InterruptSink, InterruptState
from pcidev.memory_source import ContentDescriptors
from pcidev.pci.capabilities.base import ExtCapability
from pcidev.pci.capabilities.msi import MsiCapability
from pcidev.pci.capabilities.msix import MAX_VECTORS, MsixCapability, MsixState
from pcidev.vmstate import U8, U64, FdRef, Str, VarArray, VarBytes, vmstate
from pcidev.vmstate.errors import StateError

__all__ = [
    "FUNCTION_SECTION",
    "FunctionState",
    "MsixState",
    "DmaRegionState",
    "EventfdState",
    "RamBarState",
    "RamBarsState",
    "LoadedResources",
    "OwnedEventfdSink",
    "framework_fingerprint",
    "all_descriptors",
    "save_function_state",
    "check_function_state",
    "build_resources",
    "apply_function_state",
    "undo_function_state",
    "commit_function_state",
]

#: Section name of the framework state (instance 0).
FUNCTION_SECTION = "pcidev/function"
MAX_REGIONS = 4096
MAX_FAILURE_TEXT = 512
MAX_REGION_NAME = 64


@vmstate("pcidev/dma-region")
@attrs.frozen
class DmaRegionState:
    """One region of the guest-memory map: where it sits, and the fd backing it."""

    gpa: U64
    size: U64
    fd_offset: U64
    writable: bool
    name: Str[MAX_REGION_NAME]
    fd: FdRef


@vmstate("pcidev/eventfds")
@attrs.frozen
class EventfdState:
    """Interrupt eventfds of an :class:`~pcidev.irq.EventfdSink`, indexed by vector
    (``None`` where a vector has none), and the INTx eventfd."""

    vectors: VarArray[FdRef | None, MAX_VECTORS]
    intx: FdRef | None = None


@vmstate("pcidev/ram-bar")
@attrs.frozen
class RamBarState:
    """One RAM BAR (:class:`~pcidev.bar.RamBacking`): its index, size and descriptor."""

    bar: U8
    size: U64
    fd: FdRef


@vmstate("pcidev/ram-bars")
@attrs.frozen
class RamBarsState:
    """The RAM BARs of a function, in index order: their contents travel as descriptors
    that the destination's backings adopt (:meth:`~pcidev.bar.RamBacking.adopt`)."""

    bars: VarArray[RamBarState, 6]


@vmstate(FUNCTION_SECTION)
@attrs.frozen
class FunctionState:
    """State every PCI function has, owned by the framework.

    ``config`` is the whole configuration space as stored (BAR assignments,
    command/status, MSI registers and pending bits, PM, PCIe and AER registers).
    ``intx_asserted`` is the device's INTx request; ``intx_line`` the level the
    interrupt sink was last told. ``dma`` is the guest-memory map. The MSI-X
    subsection is written for devices with MSI-X, the eventfd subsection when the
    interrupt sink is an :class:`~pcidev.irq.EventfdSink`, the RAM BAR subsection for
    devices with RAM BARs (a stream without it leaves their contents as they are).
    """

    config: VarBytes[4096]
    intx_asserted: bool
    intx_line: bool
    failed: bool
    failure: Str[MAX_FAILURE_TEXT]
    dma: VarArray[DmaRegionState, MAX_REGIONS]
    msix: MsixState | None = None
    eventfds: EventfdState | None = None
    ram_bars: RamBarsState | None = None


@attrs.frozen
class LoadedResources:
    """What a load created from the stream's file descriptors.

    The device is attached to them; the caller owns them (close them when the
    device goes away, or hand them to whatever serves the device).

    :ivar memory: a new :class:`~pcidev.dma.GuestMemory` mapping the stream's
        regions, or ``None`` if the device kept its memory.
    :ivar sink: a new :class:`OwnedEventfdSink`, or ``None`` if the device kept
        its interrupt sink.
    """

    memory: GuestMemory | None = None
    sink: OwnedEventfdSink | None = None

    def close(self) -> None:
        """Release the memory mappings and eventfds (after the device is gone)."""
        if self.memory is not None:
            self.memory.close()
        if self.sink is not None:
            self.sink.close()


class OwnedEventfdSink(EventfdSink):
    """An :class:`~pcidev.irq.EventfdSink` that owns its eventfds (duplicates made
    by a load) and closes them in :meth:`close`."""

    def close(self) -> None:
        """Close every eventfd; later interrupts are dropped and counted."""
        fds = list(self.vector_fds.values())
        if self.intx_fd is not None:
            fds.append(self.intx_fd)
        self.vector_fds = {}
        self.intx_fd = None
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


# --------------------------------------------------------------- fingerprint
def framework_fingerprint(device: PciDevice) -> dict[str, Any]:
    """Configuration items the framework requires a destination to match.

    Identity, config-space size, BAR layout, expansion ROM size, capability
    layout, MSI-X and MSI vector counts and the interrupt pin. Keys start with
    ``pci.``; a device's own items (``device_fingerprint()``) must not.

    :param device: a realized device.
    :returns: the items.
    """
    msix = device.caps.find(MsixCapability)
    msi = device.caps.find(MsiCapability)
    return {
        "pci.id": [device.vendor_id, device.device_id, device.subsystem_vendor_id, device.subsystem_id,
                   device.class_code, device.revision],
        "pci.config_size": device.config.size,
        "pci.bars": [[b.index, b.kind.value, b.size, b.prefetchable] for b in device.bars if b is not None],
        "pci.rom_size": device.rom_size,
        "pci.caps": [[int(c.CAP_ID), c.offset] for c in device.caps if not isinstance(c, ExtCapability)],
        "pci.ext_caps": [[int(c.CAP_ID), c.offset] for c in device.caps if isinstance(c, ExtCapability)],
        "pci.msix_vectors": msix.nvectors if msix is not None else 0,
        "pci.msix_layout": ([msix.table_bar, msix.table_offset, msix.pba_bar, msix.pba_offset]
                            if msix is not None else []),
        "pci.msi_vectors": msi.nvectors if msi is not None else 0,
        "pci.interrupt_pin": device.interrupt_pin,
    }


# --------------------------------------------------------------------- save
def _truncate_utf8(text: str, limit: int) -> str:
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def save_function_state(device: PciDevice, memory: GuestMemory | None) -> tuple[FunctionState, list[int]]:
    """Build the framework state of ``device`` and the fd list its FdRefs index.

    :param device: the device (quiesced).
    :param memory: the guest memory it is attached to, if any.
    :returns: ``(state, fds)``; the fds are borrowed from ``memory`` and the sink.
    """
    fds: list[int] = []
    regions = []
    if memory is not None:
        for region, fd in memory.fds():
            regions.append(DmaRegionState(gpa=region.gpa, size=region.size, fd_offset=region.fd_offset,
                                          writable=region.writable,
                                          name=_truncate_utf8(region.name, MAX_REGION_NAME),
                                          fd=FdRef(len(fds))))
            fds.append(fd)
    msix = device.caps.find(MsixCapability)
    msix_state = msix.snapshot() if msix is not None else None
    eventfds = None
    sink = device.irq.sink
    if isinstance(sink, EventfdSink):
        vectors: list[FdRef | None] = []
        for vector, fd in sorted(sink.vector_fds.items()):
            if not 0 <= vector < MAX_VECTORS:
                continue
            vectors.extend([None] * (vector - len(vectors)))
            vectors.append(FdRef(len(fds)))
            fds.append(fd)
        intx = None
        if sink.intx_fd is not None:
            intx = FdRef(len(fds))
            fds.append(sink.intx_fd)
        eventfds = EventfdState(vectors=tuple(vectors), intx=intx)
    ram_bars = None
    rams = device.ram_bars()
    if rams:
        entries = []
        for bar in rams:
            ram = bar.handler
            assert isinstance(ram, RamBacking)  # ram_bars()
            entries.append(RamBarState(bar=bar.index, size=ram.size, fd=FdRef(len(fds))))
            fds.append(ram.fd)
        ram_bars = RamBarsState(bars=tuple(entries))
    failed = device.failed
    irq_state = device.irq.snapshot()
    state = FunctionState(
        config=bytes(device.config.data),
        intx_asserted=irq_state.intx_asserted,
        intx_line=irq_state.intx_line,
        failed=failed is not None,
        failure=_truncate_utf8(f"{type(failed).__name__}: {failed}" if failed is not None else "",
                               MAX_FAILURE_TEXT),
        dma=tuple(regions),
        msix=msix_state,
        eventfds=eventfds,
        ram_bars=ram_bars,
    )
    return state, fds


# --------------------------------------------------------------------- load
def _fail(reason: str, path: str = "") -> StateError:
    return StateError(reason, section=FUNCTION_SECTION, instance_id=0, path=path)


def all_descriptors(fds: Sequence[int | None] | None) -> Sequence[int] | None:
    """``fds`` if the descriptors themselves travelled (every one is there), else None.

    Over a channel without descriptors whose memory contents travelled
    (:mod:`pcidev.migration.precopy`), the load gets a
    :class:`~pcidev.memory_source.ContentDescriptors` (never a full list, whatever
    indexes it holds): guest memory and interrupt eventfds are then treated as over TCP
    without descriptors (the host attaches them).

    :param fds: what the load was given.
    """
    if fds is None or isinstance(fds, ContentDescriptors) or any(fd is None for fd in fds):
        return None
    return [fd for fd in fds if fd is not None]


def check_function_state(device: PciDevice, st: FunctionState, fds: Sequence[int | None] | None,
                         memory: GuestMemory | None) -> None:
    """Check that ``st`` fits ``device`` before anything is applied.

    :param device: the destination device.
    :param st: the decoded framework state.
    :param fds: the descriptors received with the stream, or ``None`` when the
        transport carries none (TCP); a list with None at some indexes when only memory
        contents travelled (see :func:`all_descriptors`: the RAM BARs' are used, guest
        memory and eventfds are the host's to attach).
    :param memory: the destination's current guest memory (used when ``fds`` is None:
        if it has regions they must be the stream's; if it has none, the host maps
        them before the device resumes).
    :raises StateError: naming the field that does not fit.
    """
    ram_fds, fds = fds, all_descriptors(fds)
    if isinstance(ram_fds, ContentDescriptors):
        _check_contents(st, ram_fds)
    if len(st.config) != device.config.size:
        raise _fail(f"config space is {len(st.config)} bytes, this device has {device.config.size}", "config")
    if (config_problem := device.config.load_problem(st.config)) is not None:
        raise _fail(f"{config_problem[0]} (offset {config_problem[1]:#x})", "config")
    msix = device.caps.find(MsixCapability)
    if (st.msix is None) != (msix is None):
        raise _fail("MSI-X state " + ("missing" if msix is not None else "present for a device without MSI-X"),
                    "msix")
    if msix is not None and st.msix is not None:
        if len(st.msix.table) != msix.table_size:
            raise _fail(f"MSI-X table is {len(st.msix.table)} bytes, this device has {msix.table_size}",
                        "msix.table")
        if len(st.msix.pba) != msix.pba_size:
            raise _fail(f"MSI-X PBA is {len(st.msix.pba)} bytes, this device has {msix.pba_size}", "msix.pba")
    prev_end = 0
    for i, r in enumerate(st.dma):
        where = f"dma[{i}]"
        if r.size == 0 or r.gpa + r.size > 1 << 64:
            raise _fail(f"region [{r.gpa:#x}, +{r.size:#x}) is empty or wraps past 2**64", where)
        if r.gpa < prev_end:
            raise _fail(f"region at {r.gpa:#x} overlaps the previous one or is out of order", where)
        prev_end = r.gpa + r.size
        if fds is not None and r.fd.index >= len(fds):
            raise _fail(f"fd index {r.fd.index} but only {len(fds)} fds arrived", where + ".fd")
    if fds is None and memory is not None and memory.regions():
        have = [(m.gpa, m.size, m.writable) for m in memory.regions()]
        want = [(r.gpa, r.size, r.writable) for r in st.dma]
        if have != want:
            raise _fail("the stream's guest-memory map differs from the memory attached to this device "
                        f"(stream {len(want)} region(s), attached {len(have)})", "dma")
    if st.ram_bars is not None:
        _check_ram_bars(device, st.ram_bars, ram_fds)
    if st.eventfds is not None and fds is not None:
        refs = [(f"eventfds.vectors[{v}]", r) for v, r in enumerate(st.eventfds.vectors) if r is not None]
        if st.eventfds.intx is not None:
            refs.append(("eventfds.intx", st.eventfds.intx))
        for where, ref in refs:
            if ref.index >= len(fds):
                raise _fail(f"fd index {ref.index} but only {len(fds)} fds arrived", where)


def _check_contents(st: FunctionState, fds: ContentDescriptors) -> None:
    """Memory contents may stand only for a memory object's descriptor: never for guest
    memory or an eventfd (the host attaches those), and a RAM BAR's only under its own
    name."""
    refs = [(f"dma[{i}].fd", r.fd) for i, r in enumerate(st.dma)]
    if st.eventfds is not None:
        refs += [(f"eventfds.vectors[{v}]", r) for v, r in enumerate(st.eventfds.vectors) if r is not None]
        if st.eventfds.intx is not None:
            refs.append(("eventfds.intx", st.eventfds.intx))
    for where, ref in refs:
        if ref.index in fds.names:
            raise _fail(f"memory contents {fds.names[ref.index]!r} were sent for descriptor {ref.index}, which "
                        "is not a memory object's (guest memory and eventfds are the host's to attach)", where)
    if st.ram_bars is not None:
        for i, b in enumerate(st.ram_bars.bars):
            name = fds.names.get(b.fd.index)
            if name is not None and name != f"bar{b.bar}":
                raise _fail(f"memory contents {name!r} were sent for RAM BAR{b.bar}'s descriptor",
                            f"ram_bars.bars[{i}].fd")


def _ram_backing(device: PciDevice, index: int) -> RamBacking | None:
    bar = device.bars[index] if 0 <= index < len(device.bars) else None
    ram = bar.handler if bar is not None else None
    return ram if isinstance(ram, RamBacking) else None


def _check_ram_bars(device: PciDevice, st: RamBarsState, fds: Sequence[int | None] | None) -> None:
    want = [b.index for b in device.ram_bars()]
    got = [r.bar for r in st.bars]
    if got != want:
        raise _fail(f"RAM BARs {got} in the stream, this device has {want}", "ram_bars")
    for i, r in enumerate(st.bars):
        where = f"ram_bars.bars[{i}]"
        ram = _ram_backing(device, r.bar)
        assert ram is not None  # the lists are equal
        if r.size != ram.size:
            raise _fail(f"RAM BAR{r.bar} has {r.size} bytes in the stream, {ram.size} here", where + ".size")
        if fds is None:  # (a file by its path could name another file on another host)
            what = "its memfd" if ram.path is None else "its file's"
            raise _fail(f"the contents of RAM BAR{r.bar} travel only as a file descriptor ({what}), "
                        "and this migration carried none (TCP)", where + ".fd")
        if r.fd.index >= len(fds):
            raise _fail(f"fd index {r.fd.index} but only {len(fds)} fds arrived", where + ".fd")
        fd = fds[r.fd.index]
        if fd is None:
            raise _fail(f"the contents of RAM BAR{r.bar} did not travel with this migration (no memory "
                        "source of the source device stands for it)", where + ".fd")
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise _fail(f"unusable file descriptor: {exc.strerror}", where + ".fd") from None
        if size < ram.size:
            raise _fail(f"the descriptor of RAM BAR{r.bar} has {size} bytes, the BAR {ram.size}", where + ".fd")


def build_resources(st: FunctionState, fds: Sequence[int]) -> LoadedResources:
    """Map the stream's guest-memory regions and duplicate its eventfds.

    The caller keeps ownership of ``fds`` (everything here is a duplicate).

    :raises StateError: a region cannot be mapped or an fd is unusable; whatever
        was created is released first.
    """
    memory = GuestMemory(max_regions=MAX_REGIONS) if st.dma else None
    sink: OwnedEventfdSink | None = None
    try:
        if memory is not None:
            for i, r in enumerate(st.dma):
                try:
                    memory.map(r.gpa, r.size, fds[r.fd.index], r.fd_offset, writable=r.writable, name=r.name)
                except DmaError as exc:
                    raise _fail(f"cannot map the region: {exc}", f"dma[{i}]") from exc
        if st.eventfds is not None:
            sink = OwnedEventfdSink()
            for v, ref in enumerate(st.eventfds.vectors):
                if ref is not None:
                    sink.set_vector(v, _dup(fds[ref.index], f"eventfds.vectors[{v}]"))
            if st.eventfds.intx is not None:
                sink.intx_fd = _dup(fds[st.eventfds.intx.index], "eventfds.intx")
    except BaseException:
        if memory is not None:
            memory.close()
        if sink is not None:
            sink.close()
        raise
    return LoadedResources(memory=memory, sink=sink)


def _dup(fd: int, where: str) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
    except OSError as exc:
        raise _fail(f"unusable file descriptor: {exc}", where) from exc


@attrs.frozen
class AppliedFunctionState:
    """What :func:`apply_function_state` replaced (to roll back)."""

    config: bytes
    msix: MsixState | None
    intx: InterruptState
    failed: BaseException | None
    memory: GuestMemory | None
    memory_replaced: bool
    sink: InterruptSink
    #: the RAM BAR mappings replaced by adopted descriptors: closed by
    #: :func:`commit_function_state`, put back by :func:`undo_function_state`
    ram: tuple[tuple[RamBacking, RamMapping], ...] = ()
    #: the contents of the RAM BARs copied into (their descriptor was handed out): put
    #: back by :func:`undo_function_state`
    ram_contents: tuple[tuple[RamBacking, bytes], ...] = ()


def _map_ram_bars(device: PciDevice, st: FunctionState,
                  fds: Sequence[int | None] | None) -> list[tuple[RamBacking, RamMapping]]:
    """Map the stream's RAM BAR descriptors (nothing installed yet); a backing that
    already maps that file (an in-process reload) is left out, and so is one whose
    descriptor was handed out (:func:`_read_ram_bars` copies into those)."""
    if st.ram_bars is None or fds is None:
        return []
    out: list[tuple[RamBacking, RamMapping]] = []
    try:
        for i, r in enumerate(st.ram_bars.bars):
            ram = _ram_backing(device, r.bar)
            assert ram is not None  # checked
            fd = fds[r.fd.index]
            assert fd is not None  # checked
            if ram.same_file(fd) or ram.copies_contents(isinstance(fds, ContentDescriptors)):
                continue
            try:
                out.append((ram, ram.map_fd(fd)))
            except ConfigError as exc:
                raise _fail(str(exc), f"ram_bars.bars[{i}].fd") from None
    except BaseException:
        for _ram, mapping in out:
            mapping.close()
        raise
    return out


def _read_ram_bars(device: PciDevice, st: FunctionState,
                   fds: Sequence[int | None] | None) -> list[tuple[RamBacking, bytes]]:
    """The contents of the stream's RAM BAR descriptors for the backings whose own
    descriptor was handed out (:meth:`~pcidev.bar.RamBacking.export_fd`: a vfio-user
    client maps it): adopting another memfd would leave that client's mapping on the old
    one, so the contents are copied into it instead (:func:`apply_function_state`)."""
    if st.ram_bars is None or fds is None:
        return []
    out: list[tuple[RamBacking, bytes]] = []
    for i, r in enumerate(st.ram_bars.bars):
        ram = _ram_backing(device, r.bar)
        assert ram is not None  # checked
        fd = fds[r.fd.index]
        assert fd is not None  # checked
        if not ram.copies_contents(isinstance(fds, ContentDescriptors)) or ram.same_file(fd):
            continue
        try:
            data = os.pread(fd, ram.size, 0)
        except OSError as exc:
            raise _fail(f"cannot read the descriptor: {exc.strerror}", f"ram_bars.bars[{i}].fd") from None
        if len(data) != ram.size:
            raise _fail(f"the descriptor gave {len(data)} bytes of {ram.size}", f"ram_bars.bars[{i}].fd")
        out.append((ram, data))
    return out


def apply_function_state(device: PciDevice, st: FunctionState, res: LoadedResources,
                         memory: GuestMemory | None,
                         set_memory: Callable[[GuestMemory | None], None],
                         fds: Sequence[int | None] | None = None) -> AppliedFunctionState:
    """Apply a checked framework state.

    :param device: the destination device (quiesced, its lock held).
    :param st: the state, checked by :func:`check_function_state`.
    :param res: what :func:`build_resources` created (attached here).
    :param memory: the guest memory the device has now (kept for a rollback).
    :param set_memory: attaches new guest memory to the device.
    :param fds: the stream's descriptors (its RAM BARs' are adopted: the source's, or
        staging memfds holding their contents), None without.
    :returns: what it replaced, for :func:`undo_function_state` (or
        :func:`commit_function_state` once the whole load succeeded).
    :raises StateError: a RAM BAR descriptor cannot be mapped (nothing was changed).
    """
    copies = _read_ram_bars(device, st, fds)
    maps = _map_ram_bars(device, st, fds)
    replaced = tuple((ram, ram.swap(mapping)) for ram, mapping in maps)
    overwritten = []
    for ram, data in copies:
        overwritten.append((ram, bytes(ram.mem)))
        ram.mem[:] = data
    msix = device.caps.find(MsixCapability)
    old = AppliedFunctionState(config=bytes(device.config.data),
                               msix=msix.snapshot() if msix is not None else None,
                               intx=device.irq.snapshot(), failed=device.failed, memory=memory,
                               memory_replaced=res.memory is not None, sink=device.irq.sink, ram=replaced,
                               ram_contents=tuple(overwritten))
    try:
        device.config.data[:] = st.config
        device.caps.config_loaded()
        if msix is not None and st.msix is not None:
            msix.restore(st.msix)
        device.irq.restore(InterruptState(intx_asserted=st.intx_asserted, intx_line=st.intx_line))
        device.failed = DeviceFailedError(st.failure or "failed on the source") if st.failed else None
        if res.memory is not None:
            set_memory(res.memory)
        if res.sink is not None:
            device.irq.sink = res.sink
    except BaseException:
        with contextlib.suppress(Exception):  # (the first failure is the one to report)
            undo_function_state(device, old, set_memory)
        raise
    return old


def undo_function_state(device: PciDevice, old: AppliedFunctionState,
                        set_memory: Callable[[GuestMemory | None], None]) -> None:
    """Put back what :func:`apply_function_state` replaced.

    :param device: the device.
    :param old: what :func:`apply_function_state` returned.
    :param set_memory: attaches guest memory to the device.
    """
    try:
        device.config.data[:] = old.config
        device.caps.config_loaded()
        msix = device.caps.find(MsixCapability)
        if msix is not None and old.msix is not None:
            msix.restore(old.msix)
        device.irq.restore(old.intx)
        device.failed = old.failed
        if old.memory_replaced:
            set_memory(old.memory)
        device.irq.sink = old.sink
    finally:  # the device's own RAM BAR mappings and contents come back whatever failed above
        for ram, mapping in old.ram:
            ram.swap(mapping).close()
        for ram, contents in old.ram_contents:
            ram.mem[:] = contents


def commit_function_state(old: AppliedFunctionState) -> None:
    """The whole load succeeded: close the RAM BAR mappings the adopted descriptors replaced.

    :param old: what :func:`apply_function_state` returned.
    """
    for _ram, mapping in old.ram:
        mapping.close()
