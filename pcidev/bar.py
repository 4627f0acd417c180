"""Base Address Registers and what stands behind them.

A device declares each BAR with a *handler* that answers accesses by
``(offset, size)``:

* :class:`RegisterMap`: declarative registers (name, offset, width, access,
  reset value, read/write hooks), including arrays such as doorbells;
* :class:`RamBacking`: RAM-like memory in a sealed memfd (or a file), so a transport
  can hand the fd to another process to mmap (optionally only *sparse* areas of it);
  the framework migrates its contents (the descriptor travels with the stream);
* any object with ``read(offset, size) -> int`` and ``write(offset, size, value)``
  (see :class:`BarHandler`), e.g. :class:`CallbackHandler`.

Accesses are 1, 2, 4 or 8 bytes. A :class:`RegisterMap` splits an access that
straddles registers into the pieces each register owns; offsets no register
owns read 0 and ignore writes, with a rate-limited log line.

**Migratable registers.** ``RegisterMap(..., migratable=True)`` (every register
of the map) or ``Register(..., migrate=True)`` (that register) asks the framework
to save and restore register values with the device's state: the device writes
no code for them (no field in its ``VMSTATE``, nothing in
``get_device_state``/``set_device_state``); ``Register(..., migrate=False)``
leaves one register of a migratable map out. The map owns that state
(:meth:`RegisterMap.save_state`, :meth:`RegisterMap.check_state`,
:meth:`RegisterMap.load_state`, the ``pcidev/register-map`` description); the
framework puts the maps of a device's BARs in the ``pcidev/registers`` section
(:mod:`pcidev.migration.registers`). What travels is each register's stored
``Register.value``: a value an ``on_read`` hook computes is not saved (the
hook computes it again at the destination from what it reads), and a load sets
the values without calling any ``on_write`` hook (a write's side effects, such as
an interrupt or a started operation, are not replayed: the device's own state
carries what is in progress). A destination whose migratable registers differ
(name, offset or width) refuses the stream with
:class:`~pcidev.vmstate.errors.ConfigMismatchError` naming each difference.
"""

from __future__ import annotations

import bisect
import enum
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import attrs

from pcidev.dma import GuestMemory, alloc_memfd
from pcidev.errors import ConfigError, MmioError
from pcidev.inheritance import take_inherited
from pcidev.memory_source import DirtyBitmap, MemorySource
from pcidev.ratelog import RateLimitedLog
from pcidev.vmstate import U8, U32, U64, Str, VarArray, vmstate
from pcidev.vmstate.errors import ConfigMismatchError

__all__ = [
    "BarKind", "BarHandler", "CallbackHandler", "Access", "Register", "RegisterMap", "RamBacking", "RamMapping", "Bar",
    "ram_file_key", "RegisterState", "RegisterMapState", "MAX_MIGRATABLE_REGISTERS",
]

#: most migratable registers one map may have
MAX_MIGRATABLE_REGISTERS = 4096


log = logging.getLogger(__name__)


class BarKind(enum.Enum):
    """The address space a BAR decodes."""

    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


class BarHandler(Protocol):
    """What answers a BAR's accesses. Offsets are relative to the BAR."""

    def read(self, offset: int, size: int) -> int:
        """Return ``size`` bytes at ``offset`` as a little-endian integer."""

    def write(self, offset: int, size: int, value: int) -> None:
        """Store ``size`` bytes of ``value`` at ``offset``."""


class CallbackHandler:
    """A handler made of one function, libvfio-user style:
    ``fn(offset, size, is_write, value) -> int`` (the return value of a write is ignored).
    """

    def __init__(self, fn: Callable[[int, int, bool, int], int]) -> None:
        self.fn = fn

    def read(self, offset: int, size: int) -> int:
        return self.fn(offset, size, False, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        self.fn(offset, size, True, value)


class Access(enum.Enum):
    """How a register answers the guest."""

    RO = "ro"      #: read-only: writes ignored
    RW = "rw"      #: read-write (within ``Register.mask``)
    WO = "wo"      #: write-only: reads return 0
    RW1C = "rw1c"  #: writing 1 clears the bit
    RW1S = "rw1s"  #: writing 1 sets the bit; writing 0 has no effect


def _all_bits_if_none(mask: int | None) -> int:
    """Converter of ``Register.mask``: ``None`` means every bit (cut to the width after init)."""
    return -1 if mask is None else mask


# NO_OP: no generated __setattr__ (``value`` is written on every MMIO access; the
# converter on ``mask`` would otherwise make each write run Python code)
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class Register:
    """One register in a :class:`RegisterMap`.

    :param name: unique name in the map.
    :param offset: byte offset in the BAR (naturally aligned to ``width``).
    :param width: 1, 2, 4 or 8 bytes.
    :param access: how writes act.
    :param reset: value after reset.
    :param mask: bits a write may change (RW/RW1C/RW1S); all by default.
    :param on_read: ``fn(reg) -> int`` computes the value read (else ``value``).
    :param on_write: ``fn(reg, new, old)`` after a write changed (or tried) the value.
    :param index: position in a register array (e.g. doorbell number), else None.
    :param migrate: save and restore ``value`` with the device's state (True),
        never (False), or as the map says (None, the default: see
        :class:`RegisterMap`'s ``migratable``). The stored value travels, not what
        ``on_read`` computes, and a load calls no ``on_write``.
    """

    name: str
    offset: int
    width: int = 4
    access: Access = Access.RW
    reset: int = 0
    mask: int = attrs.field(default=None, converter=_all_bits_if_none)
    on_read: Callable[[Register], int] | None = None
    on_write: Callable[[Register, int, int], None] | None = None
    index: int | None = None
    migrate: bool | None = None
    value: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        if self.width not in (1, 2, 4, 8):
            raise ConfigError(f"register {self.name}: width must be 1, 2, 4 or 8")
        if self.offset % self.width:
            raise ConfigError(f"register {self.name}: offset {self.offset:#x} not aligned to its width")
        full = (1 << (8 * self.width)) - 1
        self.mask &= full
        self.value = self.reset & full

    @property
    def end(self) -> int:
        return self.offset + self.width

    def guest_read(self) -> int:
        if self.access is Access.WO:
            return 0
        if self.on_read is not None:
            return self.on_read(self) & ((1 << (8 * self.width)) - 1)
        return self.value

    def guest_write(self, value: int) -> None:
        old = self.value
        mask = self.mask
        acc = self.access
        if acc is Access.RW or acc is Access.WO:
            self.value = (old & ~mask) | (value & mask)
        elif acc is Access.RW1C:
            self.value = old & ~(value & mask)
        elif acc is Access.RW1S:
            self.value = old | (value & mask)
        if self.on_write is not None:
            self.on_write(self, self.value, old)


@vmstate("pcidev/register", version=1)
@attrs.frozen
class RegisterState:
    """One migratable register as a stream carries it: its layout and stored value."""

    name: Str[64]
    offset: U32
    width: U8
    value: U64


@vmstate("pcidev/register-map", version=1)
@attrs.frozen
class RegisterMapState:
    """The migratable registers of one :class:`RegisterMap`, in offset order, the BAR it
    answers and where in that BAR it starts (0 unless it is a sub-region of a
    :class:`~pcidev.regions.RegionMap`)."""

    bar: U8
    base: U32
    registers: VarArray[RegisterState, MAX_MIGRATABLE_REGISTERS]


class RegisterMap:
    """A BAR handler made of declarative registers.

    :param size: size of the BAR (accesses past it are the caller's error).
    :param registers: initial registers.
    :param name: used in log lines.
    :param migratable: the framework saves and restores the values of the map's
        registers with the device's state (each register's ``migrate`` overrides
        it; see the module docstring for what is saved).
    """

    def __init__(self, size: int, registers: Iterable[Register] = (), *, name: str = "",
                 migratable: bool = False) -> None:
        self.size = size
        self.name = name
        self.migratable = migratable
        self._migrating = 0
        self._regs: list[Register] = []
        self._starts: list[int] = []
        self._by_name: dict[str, Register] = {}
        self._by_offset: dict[int, Register] = {}
        self._unassigned_log = RateLimitedLog(log)
        for reg in registers:
            self.add(reg)

    def add(self, reg: Register) -> Register:
        """Add ``reg``; it may not overlap another register or leave the BAR. A
        migratable one (see ``migratable``) needs a name of at most 64 bytes (UTF-8),
        and a map has at most :data:`MAX_MIGRATABLE_REGISTERS` of them."""
        if reg.offset < 0 or reg.end > self.size:
            raise ConfigError(f"register {reg.name} at {reg.offset:#x} outside {self.size:#x}-byte map")
        if reg.name in self._by_name:
            raise ConfigError(f"duplicate register name {reg.name}")
        migrates = self.migratable if reg.migrate is None else reg.migrate
        if migrates and len(reg.name.encode()) > 64:
            raise ConfigError(f"register {reg.name[:64]}...: a migratable register's name has at most 64 bytes")
        if migrates and self._migrating >= MAX_MIGRATABLE_REGISTERS:
            raise ConfigError(f"register {reg.name}: a map has at most {MAX_MIGRATABLE_REGISTERS} "
                              "migratable registers")
        i = bisect.bisect_left(self._starts, reg.offset)
        if (i < len(self._regs) and self._regs[i].offset < reg.end) or (i > 0 and self._regs[i - 1].end > reg.offset):
            raise ConfigError(f"register {reg.name} overlaps another register")
        self._regs.insert(i, reg)
        self._starts.insert(i, reg.offset)
        self._by_name[reg.name] = reg
        self._by_offset[reg.offset] = reg
        self._migrating += migrates
        return reg

    def add_array(self, name: str, offset: int, count: int, *, width: int = 4, stride: int | None = None,
                  **kwargs: Any) -> list[Register]:
        """Add ``count`` registers ``name[0]``… at ``offset + i*stride`` with shared hooks;
        each gets its ``index``."""
        stride = stride or width
        return [self.add(Register(f"{name}[{i}]", offset + i * stride, width, index=i, **kwargs))
                for i in range(count)]

    def __getitem__(self, name: str) -> Register:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Register]:
        return iter(self._regs)

    # -- migration: the state this map owns ------------------------------------------------
    def migratable_registers(self) -> list[Register]:
        """The registers whose values migrate, in offset order."""
        return [r for r in self._regs if (self.migratable if r.migrate is None else r.migrate)]

    def save_state(self, bar: int, base: int = 0) -> RegisterMapState:
        """The stored values of the migratable registers (call it while the device is quiesced).

        :param bar: the index of the BAR this map answers.
        :param base: where the map starts in that BAR (a :class:`~pcidev.regions.RegionMap`
            sub-region's offset; 0 when the map answers the whole BAR).
        :returns: the state.
        """
        return RegisterMapState(bar=bar, base=base, registers=tuple(
            RegisterState(name=r.name, offset=r.offset, width=r.width, value=r.value)
            for r in self.migratable_registers()))

    def check_state(self, state: RegisterMapState) -> None:
        """Refuse a state whose registers are not this map's migratable registers
        (same names, offsets and widths, in offset order) or whose values do not fit.

        :param state: a loaded state.
        :raises ConfigMismatchError: naming every difference.
        """
        ours = {r.name: r for r in self.migratable_registers()}
        theirs = {r.name: r for r in state.registers}
        diffs = [f"{n}: in the stream, not migratable here" for n in theirs if n not in ours]
        diffs += [f"{n}: migratable here, not in the stream" for n in ours if n not in theirs]
        for name in ours.keys() & theirs.keys():
            mine, got = ours[name], theirs[name]
            if (mine.offset, mine.width) != (got.offset, got.width):
                diffs.append(f"{name}: {got.width} bytes at {got.offset:#x} in the stream, "
                             f"{mine.width} bytes at {mine.offset:#x} here")
            elif got.value >> (8 * got.width):
                diffs.append(f"{name}: value {got.value:#x} does not fit {got.width} bytes")
        if not diffs and len(theirs) != len(state.registers):
            diffs.append("a register appears twice in the stream")
        if diffs:
            where = self.name or (f"BAR{state.bar}" + (f"+{state.base:#x}" if state.base else ""))
            raise ConfigMismatchError(f"register map {where!r}: the stream's migratable registers differ from "
                                      "this device's: " + "; ".join(sorted(diffs)), differences=sorted(diffs),
                                      section="pcidev/registers", path=f"bar{state.bar}+{state.base:#x}")

    def load_state(self, state: RegisterMapState) -> None:
        """Set the stored values a checked state carries (no ``on_write`` hook runs).

        :param state: a state :meth:`check_state` accepted.
        """
        for saved in state.registers:
            self._by_name[saved.name].value = saved.value

    def reset(self) -> None:
        """Return every register to its reset value."""
        for reg in self._regs:
            reg.value = reg.reset & ((1 << (8 * reg.width)) - 1)

    def _overlapping(self, offset: int, end: int) -> Iterator[Register]:
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            i = 0
        regs = self._regs
        while i < len(regs) and regs[i].offset < end:
            reg = regs[i]
            if reg.end > offset:
                yield reg
            i += 1

    def read(self, offset: int, size: int) -> int:
        """Guest read; straddling accesses are assembled from each register's bytes."""
        reg = self._by_offset.get(offset)
        if reg is not None and reg.width == size:
            return reg.guest_read()
        end = offset + size
        result = 0
        covered = 0
        for reg in self._overlapping(offset, end):
            val = reg.guest_read()
            lo = max(offset, reg.offset)
            hi = min(end, reg.end)
            chunk = (val >> (8 * (lo - reg.offset))) & ((1 << (8 * (hi - lo))) - 1)
            result |= chunk << (8 * (lo - offset))
            covered += hi - lo
        if covered < size:
            self._unassigned_log("%s: read of %d bytes at %#x touches unassigned offsets",
                                 self.name or "bar", size, offset)
        return result

    def write(self, offset: int, size: int, value: int) -> None:
        """Guest write; each register receives its own bytes, merged with its
        current value when the access covers only part of it."""
        reg = self._by_offset.get(offset)
        if reg is not None and reg.width == size:
            reg.guest_write(value)
            return
        end = offset + size
        covered = 0
        for reg in list(self._overlapping(offset, end)):
            lo = max(offset, reg.offset)
            hi = min(end, reg.end)
            nbits = 8 * (hi - lo)
            part = (value >> (8 * (lo - offset))) & ((1 << nbits) - 1)
            shift = 8 * (lo - reg.offset)
            field = ((1 << nbits) - 1) << shift
            if reg.access is Access.RW1C or reg.access is Access.RW1S:
                merged = part << shift  # bytes not written write zeros (no effect)
            else:
                merged = (reg.value & ~field) | (part << shift)
            reg.guest_write(merged)
            covered += hi - lo
        if covered < size:
            self._unassigned_log("%s: write of %d bytes at %#x touches unassigned offsets",
                                 self.name or "bar", size, offset)


def ram_file_key(path: str) -> str:
    """The :mod:`pcidev.inheritance` key of a RAM BAR file opened at ``path`` (made
    absolute): a handover's new process takes the old one's descriptor under it.

    :param path: the file's path as configured.
    """
    return f"ram-bar:{os.path.abspath(path)}"


class RamMapping:
    """One descriptor of a :class:`RamBacking` and its shared mapping (what
    :meth:`RamBacking.map_fd` makes and :meth:`RamBacking.swap` installs).

    :ivar fd: the descriptor (owned).
    :ivar mem: the ``MAP_SHARED`` mapping of its first ``size`` bytes.
    """

    def __init__(self, fd: int, mem: mmap.mmap) -> None:
        self.fd = fd
        self.mem = mem

    def close(self) -> None:
        """Unmap and close (a mapping something still holds a view of is left to the
        garbage collector)."""
        try:
            self.mem.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_ram_file(path: str, size: int) -> int:
    """Open (or create, never truncate) the file of a file-backed RAM BAR."""
    inherited = take_inherited(ram_file_key(path))
    if inherited is not None:
        fd = inherited
    else:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            created = True
        except FileExistsError:
            created = False
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise ConfigError(f"RAM BAR file {path}: cannot open it read-write: {exc.strerror}") from None
        except OSError as exc:
            raise ConfigError(f"RAM BAR file {path}: cannot create it: {exc.strerror}") from None
        if created:
            try:
                os.posix_fallocate(fd, 0, size)  # no holes: a write into one could SIGBUS
            except OSError as exc:
                os.close(fd)
                os.unlink(path)
                raise ConfigError(f"RAM BAR file {path}: cannot size it to {size} bytes: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"RAM BAR file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"RAM BAR file {path} is not a regular file")
    if st.st_size != size:
        os.close(fd)
        raise ConfigError(f"RAM BAR file {path} has {st.st_size} bytes, the BAR needs {size} "
                          "(an existing file is never resized: give its size or another path)")
    return fd


class RamBacking:
    """RAM-like BAR contents in a sealed memfd, or in a file (``path``).

    The fd can be passed to another process, which may mmap the areas listed in
    ``sparse_areas`` (all of it by default), as vfio-user's sparse mmap
    capability describes.

    **Migration.** The framework migrates the contents of every RAM BAR (the feature
    ``bar<N>-ram``): the descriptor travels with the stream (an
    :class:`~pcidev.vmstate.FdRef` in the ``pcidev/function`` section) and the
    destination's backing *adopts* it (:meth:`adopt`: it maps the source's memfd and
    closes its own), so that both processes, and a vfio-user client that mapped the
    BAR, see the same memory. Over a channel that carries no descriptors (TCP) the
    contents travel instead (:meth:`pcidev.device.PciDevice.memory_sources`, pre-copy in
    :mod:`pcidev.migration.precopy`): every write through :meth:`write` (the device's
    MMIO path) marks :attr:`dirty`, which is exact as long as nothing else writes the
    memory; whoever hands the descriptor to another process or maps it to write through
    that mapping (a vfio-user client's sparse mmap, a device's own window on it) takes it
    with :meth:`export_fd` (or reads :attr:`fd`: the descriptor read while a pre-copy
    tracks the BAR, or after the last check that found it mapped once, counts as a
    mapping made with it, for the rest of that tracking session: a window that exists
    only for a while during the pre-copy is never missed), and the BAR is then tracked
    by comparing page hashes or sent whole at the stop (and a
    destination whose descriptor was handed out copies the contents into it instead of
    adopting another). vfio-user migration data carries the contents too, copied at the
    stop. A file-backed BAR's contents travel the same way (:meth:`memory_source`), and
    the destination copies them into its own file (:meth:`copies_contents`): it never
    adopts a staging memfd, which would drop the file backing (see docs/migration.md §6).

    **What a device uses** (no code reads the backing's descriptor to map it):
    :meth:`map_view` maps the memory at a bus address for the device's own DMA (the
    NVMe CMB and PMR windows), :attr:`identity` names the memory object (``st_dev``,
    ``st_ino``) without handing out anything, and :meth:`memory_source` describes it
    to the migration engine.

    **File backing** (``path``): the file is mapped ``MAP_SHARED``, so its contents
    survive the process; it is created at ``size`` bytes if missing (allocated with
    ``posix_fallocate``: a write through the mapping into a hole of a sparse file on a
    full file system would raise SIGBUS; an existing file is used as it is), and an existing
    file of another size is refused (:class:`~pcidev.errors.ConfigError`), never
    resized. In a handover the new process takes the old one's descriptor
    (:func:`ram_file_key`, :mod:`pcidev.inheritance`) instead of opening the path.

    :param size: bytes (a multiple of the page size).
    :param sparse_areas: ``(offset, size)`` page-aligned areas another process may map.
    :param name: memfd name.
    :param path: back the BAR by this file instead of a memfd.
    :raises ConfigError: a bad size or area, or a file that cannot be used.
    """

    def __init__(self, size: int, *, sparse_areas: Iterable[tuple[int, int]] | None = None,
                 name: str = "pcidev-bar", path: str | None = None) -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ConfigError(f"RAM BAR size {size:#x} must be a positive multiple of the page size")
        areas = [(0, size)] if sparse_areas is None else list(sparse_areas)
        for off, length in areas:
            if off % mmap.PAGESIZE or length % mmap.PAGESIZE or off < 0 or length <= 0 or off + length > size:
                raise ConfigError(f"sparse area {off:#x}+{length:#x} is not page-aligned inside the BAR")
        self.size = size
        self.sparse_areas = areas
        #: the backing file's path, or None for a memfd
        self.path = path
        #: the writes made through :meth:`write` while a migration tracks them (pre-copy)
        self.dirty = DirtyBitmap(size)
        #: the descriptor was handed out (:meth:`export_fd`): writes can bypass :meth:`write`
        self.exported = False
        #: reads of :attr:`fd` so far, and their number at the last check that found the
        #: memory mapped only once while not tracking (:meth:`written_only_through_write`)
        self._fd_reads = 0
        self._fd_reads_checked = -1
        #: the :attr:`dirty` session in which exact tracking was lost (sticky until the next)
        self._lost_session = -1
        fd = _open_ram_file(path, size) if path is not None else alloc_memfd(size, name)
        try:
            self._map = RamMapping(fd, mmap.mmap(fd, size))
        except BaseException:
            os.close(fd)
            raise

    @property
    def fd(self) -> int:
        """The descriptor of the contents (a memfd or the file; -1 after :meth:`close`).

        Reading it counts as taking the descriptor to map or write the memory past
        :meth:`write`: while :attr:`dirty` tracks, the BAR is no longer tracked exactly
        for the rest of that session (see the class docstring). A device needs it for
        nothing: it maps its own window with :meth:`map_view`, names the memory by
        :attr:`identity` and describes it with :meth:`memory_source`.
        """
        self._fd_reads += 1
        if self.dirty.tracking:
            self._lost_session = self.dirty.session
        return self._map.fd

    @property
    def fd_for_identity(self) -> int:
        """The descriptor, for code that neither maps nor writes through it (``fstat``, a
        :class:`~pcidev.memory_source.MemorySource` that the pre-copy engine reads): unlike
        :attr:`fd`, reading it does not end exact tracking (prefer :attr:`identity` and
        :meth:`memory_source`)."""
        return self._map.fd

    @property
    def mem(self) -> mmap.mmap:
        """The shared mapping of the contents."""
        return self._map.mem

    def read(self, offset: int, size: int) -> int:
        """A guest read: ``size`` bytes at ``offset``, little-endian."""
        return int.from_bytes(self._map.mem[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write (the MMIO path): store ``size`` bytes of ``value`` at ``offset``,
        then mark :attr:`dirty` (a no-op unless a pre-copy tracks it)."""
        self._map.mem[offset:offset + size] = value.to_bytes(size, "little")
        self.dirty.mark(offset, size)  # after the store (see DirtyBitmap)

    def written_only_through_write(self) -> bool:
        """Whether every write into the memory goes through :meth:`write` (so :attr:`dirty`
        sees them all): the descriptor was never handed out (:meth:`export_fd`), this
        process maps the memory nowhere else (``/proc/self/maps``: a device's own window on
        it, such as a controller's DMA view of its memory buffer, writes past :meth:`write`),
        and, while :attr:`dirty` tracks, neither was the case at any point of this tracking
        session: nobody read :attr:`fd` since the check before the session started, and no
        check during it saw a second mapping (sticky: a window mapped and dropped again
        during a pre-copy still counts).
        """
        tracking = self.dirty.tracking
        if self.exported or (tracking and (self._lost_session == self.dirty.session
                                           or self._fd_reads != self._fd_reads_checked)):
            if tracking:
                self._lost_session = self.dirty.session
            return False
        try:
            st = os.fstat(self._map.fd)
            with open("/proc/self/maps") as f:
                lines = f.read().splitlines()
        except OSError:
            return False
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        count = 0
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) >= 5 and fields[4] == str(st.st_ino) and fields[3] == dev:
                count += 1
        if count > 1:  # mapped elsewhere in this process
            if tracking:
                self._lost_session = self.dirty.session
            return False
        if not tracking:
            self._fd_reads_checked = self._fd_reads
        return True

    @property
    def identity(self) -> tuple[int, int] | None:
        """``(st_dev, st_ino)`` of the memory object now (None once closed): what names it
        (matching a migration stream's descriptor) without mapping or writing it, so
        reading it never ends exact tracking."""
        try:
            st = os.fstat(self._map.fd)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def map_view(self, start: int, size: int | None = None, *, name: str = "") -> GuestMemory:
        """A mapping of the memory's first ``size`` bytes (all of it by default) at bus
        address ``start``, for the device's own DMA into it (a controller memory window).
        Writes through it bypass :meth:`write`, so from now on the contents are tracked by
        page hashes in a pre-copy, as after :meth:`export_fd` (sticky: a view made and
        dropped again during a pre-copy is never missed). The view stays valid after a
        later :meth:`adopt` (it maps the object it was made on): make a new one then.

        :param start: the bus address of the memory's first byte.
        :param size: bytes to map (a multiple of the page size, at most the backing's ``size``).
        :param name: the region's name (for messages).
        :returns: a :class:`~pcidev.dma.GuestMemory` holding one region.
        :raises DmaError: the kernel refused the mapping.
        :raises ConfigError: a bad size.
        """
        length = self.size if size is None else size
        if length <= 0 or length > self.size or length % mmap.PAGESIZE:
            raise ConfigError(f"RAM BAR view of {length:#x} bytes: not a page multiple of at most {self.size:#x}")
        self.exported = True  # (before the mapping exists: a pre-copy can never miss it)
        mem = GuestMemory(max_regions=1)
        mem.map(start, length, self._map.fd, 0, writable=True, name=name or "ram-bar-view")
        return mem

    def memory_source(self, name: str) -> MemorySource | None:
        """This memory as a migration's :class:`~pcidev.memory_source.MemorySource` (its
        contents travel instead of its descriptor over a channel without descriptors):
        tracked by :attr:`dirty` while every write goes through :meth:`write`
        (:meth:`written_only_through_write`), else by page hashes. None once closed.

        :param name: the source's name (``"bar2"``, ``"vf0/bar2"``).
        """
        fd = self._map.fd
        if fd < 0:
            return None
        return MemorySource(name=name, fd=fd, size=self.size,
                            bitmap=self.dirty if self.written_only_through_write() else None)

    def copies_contents(self, contents_only: bool) -> bool:
        """Whether a migration's load copies the migrated contents into this backing
        instead of adopting the descriptor it received: when its descriptor was handed out
        (:attr:`exported`: whoever mapped it would be left on the old memory), and for a
        file-backed one when only the contents travelled (``contents_only``: the
        descriptor is a staging memfd, and adopting it would drop the file backing).

        :param contents_only: the load's descriptors hold streamed contents (TCP,
            vfio-user migration data), not the source's own descriptors.
        """
        return self.exported or (contents_only and self.path is not None)

    def export_fd(self) -> int:
        """The descriptor, for a peer (or a mapping of the device's own) that may write the
        memory without going through :meth:`write`: from now on the contents are tracked
        by page hashes in a pre-copy, not by :attr:`dirty` alone (see the class docstring).

        :returns: :attr:`fd` (borrowed).
        """
        self.exported = True
        return self._map.fd

    def flush(self, offset: int = 0, size: int | None = None) -> None:
        """Make the contents durable (``msync``): for a file, what was written is on
        the file's storage when this returns; for a memfd it does nothing useful.

        :param offset: first byte (rounded down to a page).
        :param size: bytes (default: to the end).
        """
        start = offset - offset % mmap.PAGESIZE
        end = self.size if size is None else min(self.size, offset + size)
        if end > start:
            self._map.mem.flush(start, end - start)

    # -- migration: taking over another process's descriptor ---------------------------------
    def same_file(self, fd: int) -> bool:
        """Whether ``fd`` is the file this backing maps already."""
        try:
            return os.path.sameopenfile(fd, self._map.fd)
        except OSError:
            return False

    def map_fd(self, fd: int) -> RamMapping:
        """Map a duplicate of ``fd`` (the caller keeps ``fd``) as this backing's contents
        would be, without installing it (see :meth:`swap`).

        :param fd: a memfd or regular file of at least ``size`` bytes (the BAR's).
        :raises ConfigError: the descriptor is unusable or too small.
        """
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise ConfigError(f"RAM BAR descriptor {fd}: {exc.strerror}") from None
        if size < self.size:
            raise ConfigError(f"RAM BAR descriptor {fd} has {size} bytes, the BAR {self.size}")
        own = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
        try:
            return RamMapping(own, mmap.mmap(own, self.size))
        except (OSError, ValueError) as exc:
            os.close(own)
            raise ConfigError(f"RAM BAR descriptor {fd}: cannot map it: {exc}") from None

    def swap(self, mapping: RamMapping) -> RamMapping:
        """Install ``mapping`` (from :meth:`map_fd`) and return the one it replaces (the
        caller closes it, or swaps it back)."""
        old, self._map = self._map, mapping
        return old

    def adopt(self, fd: int) -> None:
        """Take over ``fd`` (borrowed: a duplicate is kept): map it, and close this
        backing's own descriptor and mapping. What a migration's destination does with
        the source's memfd.

        :raises ConfigError: see :meth:`map_fd` (the backing is unchanged then).
        """
        if self.same_file(fd):
            return
        self.swap(self.map_fd(fd)).close()

    def close(self) -> None:
        """Unmap and close the descriptor."""
        self._map.close()


@attrs.define(eq=False)
class Bar:
    """A declared BAR.

    :param index: 0..5.
    :param size: power of two (memory ≥ 16 bytes, I/O 4..256 bytes).
    :param kind: memory (32/64-bit) or I/O.
    :param handler: what answers accesses.
    :param prefetchable: memory BAR may be prefetched.
    """

    index: int
    size: int
    kind: BarKind
    handler: BarHandler
    prefetchable: bool = False

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.index <= 5:
            raise ConfigError(f"BAR index {self.index} out of range 0..5")
        if self.size <= 0 or self.size & (self.size - 1):
            raise ConfigError(f"BAR{self.index} size {self.size:#x} is not a power of two")
        if self.kind is BarKind.IO:
            if not 4 <= self.size <= 256:
                raise ConfigError(f"I/O BAR{self.index} size must be 4..256 bytes")
            if self.prefetchable:
                raise ConfigError("an I/O BAR cannot be prefetchable")
        elif self.size < 16:
            raise ConfigError(f"memory BAR{self.index} must be at least 16 bytes")
        if self.kind is BarKind.MEM64 and self.index == 5:
            raise ConfigError("a 64-bit BAR cannot start at BAR5")
        if self.kind is BarKind.MEM32 and self.size > 1 << 31:
            raise ConfigError("a 32-bit BAR cannot exceed 2 GiB")

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO

    @property
    def is_64bit(self) -> bool:
        return self.kind is BarKind.MEM64

    @property
    def flags(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.kind is BarKind.IO:
            return 0x1
        return (0x4 if self.kind is BarKind.MEM64 else 0) | (0x8 if self.prefetchable else 0)

    def check_access(self, offset: int, size: int) -> None:
        """:raises MmioError: for a size other than 1/2/4/8 or an access leaving the BAR."""
        if size not in (1, 2, 4, 8):
            raise MmioError(f"BAR{self.index}: access size {size} is not 1, 2, 4 or 8")
        if offset < 0 or offset + size > self.size:
            raise MmioError(f"BAR{self.index}: access at {offset:#x}+{size} outside its {self.size:#x} bytes")
