"""The PCI(e) function model every device plugin subclasses.

Lifecycle, as in libvfio-user: **describe → realize → attach → run**.

* :meth:`PciDevice.describe` (override it) declares BARs, capabilities and
  interrupts with the ``add_*`` verbs;
* :meth:`PciDevice.realize` freezes the description: writes the type-0 header,
  BAR registers and the capability chains, and records the reset defaults;
* :meth:`PciDevice.attach` connects guest memory and an interrupt sink (done by
  the software host or a transport);
* the host or transport then calls :meth:`~PciDevice.config_read`/:meth:`~PciDevice.config_write`
  and :meth:`~PciDevice.bar_read`/:meth:`~PciDevice.bar_write`.

Example::

    class Edu(PciDevice):
        TYPE_NAME = "edu"
        VENDOR_ID, DEVICE_ID, CLASS_CODE = 0x1234, 0x11E8, 0xFF0000

        def describe(self):
            self.regs = RegisterMap(4096, [Register("ID", 0, reset=0x010000ED, access=Access.RO)])
            self.add_mem_bar(0, 4096, self.regs)
            self.add_msix(4, bar=0, table_offset=0x800, pba_offset=0xC00)

An exception raised by a device's handler never escapes into the host or the
transport: it is logged, :attr:`PciDevice.failed` is set and
:meth:`PciDevice.on_failure` runs (NVMe sets CSTS.CFS there).

Migration (docs/migration.md): the framework saves and loads what it owns
(config space, MSI-X table and PBA, INTx level, failed flag, guest-memory map and
interrupt eventfds); a device type adds its own state through a small set of
hooks, and declares what it knows how to migrate::

    @vmstate("edu", version=1)
    @attrs.frozen
    class EduState:
        ring_head: U32
        ...

    class Edu(PciDevice):
        VMSTATE = EduState                          # no VMSTATE: the type cannot migrate
        MIGRATABLE_FEATURES = frozenset({"dma-engine"})

        def enabled_features(self):                 # what this instance uses
            return super().enabled_features() | {"dma-engine"}
        def device_fingerprint(self):               # configuration a destination must match
            return {"queues": self.nqueues}
        def get_device_state(self):                 # live object -> frozen state
            return EduState(ring_head=...)
        def check_device_state(self, state):        # refuse before anything is applied
            ...
        def set_device_state(self, state):          # frozen state -> live object
            ...
        def on_quiesce(self): ...                   # stop background work at a consistent point
        def on_resume(self): ...                    # start it again

The framework side lives in :mod:`pcidev.migration`, which imports this module
(never the reverse): :func:`~pcidev.migration.collect_blockers`,
:meth:`PciDevice.quiesce`, :func:`~pcidev.migration.save_device` /
:func:`~pcidev.migration.save_device_stream`,
:func:`~pcidev.migration.load_device` /
:func:`~pcidev.migration.load_device_stream`, :meth:`PciDevice.resume`; and
:func:`~pcidev.migration.migrate_out` / :func:`~pcidev.migration.migrate_in`
move a device between processes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Self

import attrs

from pcidev.bar import Bar, BarHandler, BarKind, RamBacking, ram_file_key
from pcidev.dma import GuestMemory
from pcidev.errors import ConfigError, ConfigSpaceError, DmaError, MigrationBlockedError, MmioError
from pcidev.irq import InterruptController, InterruptSink
from pcidev.memory_source import ContentDescriptors, MemorySource
from pcidev.pci import ids
from pcidev.pci.capabilities.aer import AerCapability
from pcidev.pci.capabilities.base import CapabilityList, CapT
from pcidev.pci.capabilities.express import PciExpressCapability
from pcidev.pci.capabilities.msi import MsiCapability
from pcidev.pci.capabilities.msix import MsixCapability
from pcidev.pci.capabilities.pm import D0, PMCSR, PowerManagementCapability
from pcidev.pci.capabilities.sriov import SriovCapability
from pcidev.pci.config import ConfigSpace, ResetKind
from pcidev.vmstate import FdRef
from pcidev.worker import Worker

__all__ = ["PciDevice", "ResetKind"]

log = logging.getLogger(__name__)

#: an MSI-X table or PBA access within a BAR: ``read(offset, size)``, ``write(offset, size, value)``
_OverlayRead = Callable[[int, int], int]
_OverlayWrite = Callable[[int, int, int], None]

# plain ints for the hot paths: IntFlag arithmetic costs about a microsecond per operation
_CMD_IO = int(ids.Command.IO)
_CMD_MEMORY = int(ids.Command.MEMORY)
_CMD_MASTER = int(ids.Command.MASTER)
_COMMAND_RW = (ids.Command.IO | ids.Command.MEMORY | ids.Command.MASTER | ids.Command.PARITY
               | ids.Command.SERR | ids.Command.INTX_DISABLE)


class PciDevice:
    """A PCI Express function (type-0 header).

    Class attributes give the identity; a subclass may change any of them per
    instance before :meth:`realize` (e.g. from its configuration).
    """

    #: registry name of the device type (``^[a-z][a-z0-9_-]*$``)
    TYPE_NAME: ClassVar[str] = ""
    VENDOR_ID: ClassVar[int] = 0x1B36
    DEVICE_ID: ClassVar[int] = 0x0000
    #: 24-bit class code: base class, sub class, programming interface
    CLASS_CODE: ClassVar[int] = ids.ClassCode.OTHER_UNCLASSIFIED
    REVISION: ClassVar[int] = 0
    SUBSYSTEM_VENDOR_ID: ClassVar[int] = 0x1AF4
    SUBSYSTEM_ID: ClassVar[int] = 0x1100
    #: 1 = INTA# … 4 = INTD#, 0 = no INTx
    INTERRUPT_PIN: ClassVar[int] = 1
    #: the device's own vmstate description (a ``@vmstate`` class describing only
    #: the device's state, not the framework's), or None if it cannot migrate
    VMSTATE: ClassVar[type[Any] | None] = None
    #: the vmstate description of the state an intermediate base class owns (a *layer*
    #: between :class:`PciDevice` and the device type, such as a virtio-pci transport that
    #: every virtio device type subclasses), saved as a section of its own between the
    #: framework's and the device type's; None (the default): no layer. The layer's class
    #: implements :meth:`get_layer_state`, :meth:`check_layer_state`,
    #: :meth:`set_layer_state` and :meth:`layer_fingerprint`, so that the device types
    #: built on it keep the ``*_device_state`` hooks for their own state.
    LAYER_VMSTATE: ClassVar[type[Any] | None] = None
    #: the attrs class of the device's properties, or None if it takes none. A device
    #: type with one is built as ``cls(config, name=...)`` by
    #: :meth:`pcidev.registry.DeviceRegistry.create` (config structured from a
    #: ``key=value,...`` string by :mod:`pcidev.properties`); without one, as ``cls(name=...)``.
    #: ``pcidev describe TYPE`` lists its fields (type, default, ``metadata["help"]``),
    #: then the option classes its ``property_groups()`` classmethod returns, if any, as
    #: ``(heading, attrs class)`` pairs (options nested in a value, like NVMe's ``ns=``).
    CONFIG_CLASS: ClassVar[type | None] = None
    #: features of this device type that its VMSTATE (or the framework) migrates;
    #: an enabled feature missing here blocks migration (see :meth:`enabled_features`)
    MIGRATABLE_FEATURES: ClassVar[frozenset[str]] = frozenset()
    #: features whose state travels only as file descriptors (:meth:`vmstate_fd`): a
    #: migration that carries none (vfio-user MIG_DATA) is blocked while one is enabled
    FD_FEATURES: ClassVar[frozenset[str]] = frozenset()
    #: ``(bar, start, end)``: BAR offsets whose 4-byte writes only record a value (queue
    #: doorbells), so a transport may deliver a burst of them in one :meth:`batch` and
    #: keep only the last value per register; None (the default): no such window. The
    #: vfio-user fast path clips it to the BAR and never lets it overlap an MSI-X structure.
    DOORBELL_WINDOW: ClassVar[tuple[int, int, int] | None] = None
    #: framework features the framework itself migrates (config space holds them,
    #: or the framework section does); not meant to be changed by device types
    FRAMEWORK_FEATURES: ClassVar[frozenset[str]] = frozenset(
        {"intx", "msi", "msix", "pm", "pcie", "aer", "rom", "sriov"})

    def __init__(self, *, name: str | None = None) -> None:
        self.name = name or self.TYPE_NAME or type(self).__name__.lower()
        self.log = logging.getLogger(f"pcidev.device.{self.TYPE_NAME or type(self).__name__}[{self.name}]")
        self.vendor_id = self.VENDOR_ID
        self.device_id = self.DEVICE_ID
        self.class_code = self.CLASS_CODE
        self.revision = self.REVISION
        self.subsystem_vendor_id = self.SUBSYSTEM_VENDOR_ID
        self.subsystem_id = self.SUBSYSTEM_ID
        self.interrupt_pin = self.INTERRUPT_PIN
        self.config = ConfigSpace()
        self.caps = CapabilityList(self)
        self.bars: list[Bar | None] = [None] * 6
        self.rom: bytes | None = None
        self.rom_size = 0
        self.irq = InterruptController(self.config)
        self.memory: GuestMemory | None = None
        #: the exception that put the device in its failed state, else None
        self.failed: BaseException | None = None
        self.realized = False
        #: serializes guest accesses made by a transport with the device's own
        #: background work (transports hold it around each access; a device's worker
        #: threads hold it while they change device state)
        self.lock = threading.RLock()
        #: True between :meth:`quiesce` and :meth:`resume`
        self.quiesced = False
        #: called (no arguments) at the end of each :meth:`resume`: an in-process host
        #: delivers the writes it held while the device was quiesced
        #: (:class:`pcidev.host.pci.HostPciDevice`)
        self.resume_listeners: list[Callable[[], None]] = []
        #: True after :meth:`close`
        self.closed = False
        #: True once a migration out of this process was acknowledged by its
        #: destination (set by :func:`pcidev.migration.migrate_out`, which also clears
        #: :attr:`owns_state`)
        self.migrated_out = False
        #: whether the device's state is its own to persist. False after a migration
        #: out (the destination owns it from then on), and when a transport closes a
        #: device that never ran (a migration destination that received nothing: its
        #: state is not the device's). :meth:`on_close` must then release what the
        #: device holds but persist nothing (a state file, a backend's metadata) over
        #: what the owner writes
        self.owns_state = True
        #: the workers of :meth:`add_worker`, quiesced, resumed and closed with the device
        self.workers: list[Worker] = []
        #: SR-IOV: the virtual functions of this physical function while VF Enable is set
        #: (kept by :class:`pcidev.sriov.SriovFunctions`); quiesced before, resumed after
        #: (but for those a transport of their own serves) and closed before the PF itself
        self.virtual_functions: list[PciDevice] = []
        #: SR-IOV: ends every virtual function (the one way they go at the PF's close:
        #: :meth:`pcidev.sriov.SriovFunctions.remove_all` once the PF has SR-IOV, which tells
        #: the watchers -- the host, the transports serving VFs -- before it closes them)
        self.remove_virtual_functions: Callable[[], None] = self._close_virtual_functions
        #: during a save by :mod:`pcidev.migration`: the descriptors the stream
        #: carries (:meth:`vmstate_fd` appends to it); None otherwise
        self.vmstate_save_fds: list[int] | None = None
        #: during a load by :mod:`pcidev.migration`: the descriptors that arrived
        #: with the stream (:meth:`vmstate_load_fd` reads it); None otherwise
        self.vmstate_load_fds: list[int | None] | None = None
        #: per BAR index, the MSI-X structures it holds: (start, end, read, write)
        self._overlays: dict[int, list[tuple[int, int, _OverlayRead, _OverlayWrite]]] = {}
        self._pm: PowerManagementCapability | None = None
        #: config offset of the PM state byte (PMCSR), or -1 without PM
        self._pmcsr = -1
        self.describe()

    # -- describe ---------------------------------------------------------------------
    def describe(self) -> None:
        """Declare BARs, capabilities and interrupts. Override in device classes."""

    def _check_describing(self) -> None:
        if self.realized:
            raise ConfigError("the device is realized: its description is frozen")

    def add_bar(self, bar: Bar) -> Bar:
        """Declare ``bar`` (see also :meth:`add_mem_bar` and :meth:`add_io_bar`)."""
        self._check_describing()
        idx = bar.index
        below = self.bars[idx - 1] if idx > 0 else None
        if self.bars[idx] is not None or (below is not None and below.is_64bit):
            raise ConfigError(f"BAR{idx} is already taken")
        if bar.is_64bit and self.bars[idx + 1] is not None:
            raise ConfigError(f"64-bit BAR{idx} needs BAR{idx + 1} free")
        self.bars[idx] = bar
        return bar

    def add_mem_bar(self, index: int, size: int, handler: BarHandler, *, bits64: bool = False,
                    prefetchable: bool = False) -> Bar:
        """Declare a memory BAR answered by ``handler``."""
        kind = BarKind.MEM64 if bits64 else BarKind.MEM32
        return self.add_bar(Bar(index, size, kind, handler, prefetchable))

    def add_io_bar(self, index: int, size: int, handler: BarHandler) -> Bar:
        """Declare an I/O BAR answered by ``handler``."""
        return self.add_bar(Bar(index, size, BarKind.IO, handler))

    def add_rom(self, data: bytes, size: int | None = None) -> None:
        """Declare an expansion ROM holding ``data`` (size: power of two ≥ 2 KiB)."""
        self._check_describing()
        size = size or max(2048, 1 << (max(len(data), 1) - 1).bit_length())
        if size < 2048 or size & (size - 1) or len(data) > size:
            raise ConfigError(f"bad expansion ROM size {size:#x}")
        self.rom = bytes(data).ljust(size, b"\xff")
        self.rom_size = size

    def add_capability(self, cap: CapT) -> CapT:
        """Add a (standard or extended) capability; it is linked at realize."""
        self._check_describing()
        return self.caps.add(cap)

    def add_msix(self, nvectors: int, *, bar: int, table_offset: int, pba_offset: int,
                 pba_bar: int | None = None) -> MsixCapability:
        """Add MSI-X with its table and PBA in BAR ``bar`` (PBA optionally elsewhere)."""
        return self.add_capability(MsixCapability(nvectors, table_bar=bar, table_offset=table_offset,
                                                  pba_bar=bar if pba_bar is None else pba_bar,
                                                  pba_offset=pba_offset))

    def add_msi(self, nvectors: int = 1, *, address64: bool = True, per_vector_mask: bool = True) -> MsiCapability:
        """Add an MSI capability."""
        return self.add_capability(MsiCapability(nvectors, address64=address64, per_vector_mask=per_vector_mask))

    def add_standard_pcie_caps(self, *, flr: bool = True, aer: bool = True) -> None:
        """Add Power Management, PCI Express (and AER) capabilities, as an endpoint has."""
        self.add_capability(PowerManagementCapability())
        self.add_capability(PciExpressCapability(flr=flr))
        if aer:
            self.add_capability(AerCapability())

    def add_worker(self, step: Callable[[], bool], *, name: str = "worker", delay: float = 0.0,
                   idle_poll: float = 0.05) -> Worker:
        """Add a background :class:`~pcidev.worker.Worker` running ``step`` (with
        :attr:`lock` held) in its own thread. It starts with :meth:`resume` (a
        transport calls it when it starts serving the device), stops stepping in
        :meth:`quiesce`, and :meth:`close` joins its thread. Call
        :meth:`~pcidev.worker.Worker.kick` on it when there is new work.

        :param step: does a bounded piece of work; returns True if it found work,
            False if idle.
        :param name: the worker's name (its thread is ``NAME[DEVICE]``).
        :param delay: seconds to sleep, without the lock, after each step that found work.
        :param idle_poll: seconds an idle worker waits for a kick before stepping anyway.
        :returns: the worker.
        """
        worker = Worker(self, step, name=name, delay=delay, idle_poll=idle_poll)
        self.workers.append(worker)
        return worker

    # -- realize ----------------------------------------------------------------------------
    def realize(self) -> None:
        """Freeze the description and build configuration space. Idempotent."""
        if self.realized:
            return
        cfg = self.config
        for attr, bits in (("vendor_id", 16), ("device_id", 16), ("subsystem_vendor_id", 16),
                           ("subsystem_id", 16), ("class_code", 24), ("revision", 8)):
            val = getattr(self, attr)
            if not 0 <= val < 1 << bits:
                raise ConfigError(f"{attr} {val:#x} does not fit in {bits} bits")
        if self.vendor_id == 0xFFFF:
            raise ConfigError("vendor id 0xffff means 'no device'")
        if not 0 <= self.interrupt_pin <= 4:
            raise ConfigError("interrupt pin must be 0..4")
        cfg.set16(ids.VENDOR_ID, self.vendor_id)
        cfg.set16(ids.DEVICE_ID, self.device_id)
        cfg.set_writable(ids.COMMAND, 2, _COMMAND_RW)
        cfg.set_w1c(ids.STATUS, 2, ids.STATUS_RW1C)
        cfg.set8(ids.REVISION_ID, self.revision)
        cfg.set(ids.CLASS_PROG, 3, self.class_code)
        cfg.set_writable(ids.CACHE_LINE_SIZE, 1, 0xFF)
        cfg.set8(ids.HEADER_TYPE, 0)
        cfg.set16(ids.SUBSYSTEM_VENDOR_ID, self.subsystem_vendor_id)
        cfg.set16(ids.SUBSYSTEM_ID, self.subsystem_id)
        cfg.set_writable(ids.INTERRUPT_LINE, 1, 0xFF)
        cfg.set8(ids.INTERRUPT_LINE, 0xFF if self.interrupt_pin else 0)
        cfg.set8(ids.INTERRUPT_PIN, self.interrupt_pin)
        for bar in self.bars:
            if bar is not None:
                self._realize_bar(bar)
        if self.rom is not None:
            cfg.set_writable(ids.ROM_ADDRESS, 4, (~(self.rom_size - 1) & 0xFFFFF800) | ids.ROM_ENABLE)
        self.caps.realize()
        for cap in self.caps:
            if isinstance(cap, MsixCapability):
                self._install_msix(cap)
        self.irq.bind(msix=self.caps.find(MsixCapability), msi=self.caps.find(MsiCapability))
        self._pm = self.caps.find(PowerManagementCapability)
        if self._pm is not None:
            assert self._pm.offset is not None  # placed by caps.realize()
            self._pmcsr = self._pm.offset + PMCSR
        cfg.add_write_hook(ids.COMMAND, 2, self._command_written)
        cfg.freeze_defaults()
        self.realized = True

    def _realize_bar(self, bar: Bar) -> None:
        cfg = self.config
        off = ids.BASE_ADDRESS_0 + 4 * bar.index
        cfg.set32(off, bar.flags)
        if bar.is_io:
            cfg.set_writable(off, 4, ~(bar.size - 1) & 0xFFFFFFFC)
        else:
            cfg.set_writable(off, 4, ~(bar.size - 1) & 0xFFFFFFF0)
            if bar.is_64bit:
                cfg.set_writable(off + 4, 4, ~((bar.size - 1) >> 32) & 0xFFFFFFFF)

    def _install_msix(self, cap: MsixCapability) -> None:
        for bar_idx, start, length, rd, wr in (
                (cap.table_bar, cap.table_offset, cap.table_size, cap.table_read, cap.table_write),
                (cap.pba_bar, cap.pba_offset, cap.pba_size, cap.pba_read, cap.pba_write)):
            bar = self.bars[bar_idx]
            if bar is None or bar.is_io or start + length > bar.size:
                raise ConfigError(f"MSI-X structure does not fit in BAR{bar_idx}")
            self._overlays.setdefault(bar_idx, []).append((start, start + length, rd, wr))

    # -- attach -----------------------------------------------------------------------------
    def attach(self, memory: GuestMemory | None, sink: InterruptSink | None) -> None:
        """Connect guest memory and an interrupt sink (host or transport side)."""
        self.realize()
        self.memory = memory
        if sink is not None:
            self.irq.sink = sink

    # -- state helpers ---------------------------------------------------------------------
    @property
    def command(self) -> int:
        return self.config.get16(ids.COMMAND)

    @property
    def bus_master(self) -> bool:
        """Bus Master Enable: the device may do DMA and send MSI/MSI-X."""
        return bool(self.config.get16(ids.COMMAND) & _CMD_MASTER)

    @property
    def dma(self) -> GuestMemory:
        """Guest memory for DMA.

        :raises DmaError: if bus mastering is disabled or no memory is attached.
        """
        memory = self.memory
        if memory is not None and self.config.data[ids.COMMAND] & _CMD_MASTER:  # one byte: MASTER < 0x100
            return memory
        if memory is None:
            raise DmaError("no guest memory attached")
        raise DmaError("bus mastering is disabled")

    def bar_address(self, index: int) -> int:
        """The address the guest assigned to BAR ``index`` (0 if unassigned)."""
        bar = self.bars[index]
        if bar is None:
            return 0
        off = ids.BASE_ADDRESS_0 + 4 * index
        lo = self.config.get32(off)
        if bar.is_io:
            return lo & ~0x3
        addr = lo & ~0xF
        if bar.is_64bit:
            addr |= self.config.get32(off + 4) << 32
        return addr

    @property
    def rom_address(self) -> int:
        return self.config.get32(ids.ROM_ADDRESS) & ~0x7FF

    # -- guest accesses --------------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        """A configuration read. A capability's read hook that raises puts the device in
        its failed state (:meth:`fail`) and the stored bytes are read instead.

        :raises ConfigSpaceError: on a malformed access.
        """
        try:
            return self.config.read(offset, size)
        except ConfigSpaceError:
            raise
        except Exception as exc:  # a capability's read hook failed
            self.fail(exc, f"config read {offset:#x}+{size}")
            return self.config.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A configuration write. :raises ConfigSpaceError: on a malformed access."""
        try:
            self.config.write(offset, size, value)
        except Exception as exc:  # a capability or device hook failed
            if isinstance(exc, ConfigSpaceError):
                raise
            self.fail(exc, f"config write {offset:#x}+{size}")

    def _decodes(self, bar: Bar) -> bool:
        cmd = self.config.get16(ids.COMMAND)
        if not cmd & (_CMD_IO if bar.kind is BarKind.IO else _CMD_MEMORY):
            return False
        return self._pmcsr < 0 or self.config.data[self._pmcsr] & 0x3 == D0

    def _bar(self, index: int, offset: int, size: int) -> Bar:
        if not isinstance(index, int) or not 0 <= index <= 5 or (bar := self.bars[index]) is None:
            raise MmioError(f"the device has no BAR{index}")
        bar.check_access(offset, size)
        return bar

    def bar_read(self, index: int, offset: int, size: int, *, check_decode: bool = True) -> int:
        """A read of ``size`` bytes at ``offset`` in BAR ``index``.

        With memory (or I/O) decoding disabled, or the function not in D0, the
        read is not claimed and returns all ones, as a real bus would.

        :param check_decode: honour the command register (a transport whose
            client already does, like QEMU, may pass False).
        :raises MmioError: for a missing BAR, a bad size or an access outside the BAR.
        """
        bar = self._bar(index, offset, size)
        if check_decode and not self._decodes(bar):
            return (1 << (8 * size)) - 1
        try:
            for start, end, rd, _wr in self._overlays.get(index, ()):
                if start <= offset < end:
                    if offset + size > end:
                        raise MmioError(f"access at {offset:#x}+{size} straddles an MSI-X structure")
                    return rd(offset - start, size)
            return bar.handler.read(offset, size)
        except MmioError:
            raise
        except Exception as exc:
            self.fail(exc, f"BAR{index} read {offset:#x}+{size}")
            return 0

    def bar_write(self, index: int, offset: int, size: int, value: int, *, check_decode: bool = True) -> None:
        """A write of ``size`` bytes at ``offset`` in BAR ``index`` (see :meth:`bar_read`)."""
        bar = self._bar(index, offset, size)
        if check_decode and not self._decodes(bar):
            return
        value &= (1 << (8 * size)) - 1
        try:
            for start, end, _rd, wr in self._overlays.get(index, ()):
                if start <= offset < end:
                    if offset + size > end:
                        raise MmioError(f"access at {offset:#x}+{size} straddles an MSI-X structure")
                    with self.irq.lock:
                        wr(offset - start, size, value)
                    return
            bar.handler.write(offset, size, value)
        except MmioError:
            raise
        except Exception as exc:
            self.fail(exc, f"BAR{index} write {offset:#x}+{size}={value:#x}")

    def rom_read(self, offset: int, size: int) -> int:
        """A read from the expansion ROM (all ones unless the ROM and memory decoding are enabled)."""
        if self.rom is None or offset < 0 or size not in (1, 2, 4, 8) or offset + size > self.rom_size:
            raise MmioError(f"no expansion ROM at {offset:#x}+{size}")
        if not (self.config.get32(ids.ROM_ADDRESS) & ids.ROM_ENABLE) or not self.command & ids.Command.MEMORY:
            return (1 << (8 * size)) - 1
        return int.from_bytes(self.rom[offset:offset + size], "little")

    # -- failure --------------------------------------------------------------------------------
    def fail(self, exc: BaseException, where: str) -> None:
        """Put the device in its failed state: log ``exc``, keep the first failure in
        :attr:`failed` and call :meth:`on_failure`. The framework calls it when a
        handler raises; a device's own worker threads call it for their errors.

        :param exc: what went wrong.
        :param where: what the device was doing (for the log line).
        """
        self.log.error("device handler failed during %s; device enters failed state", where,
                       exc_info=(type(exc), exc, exc.__traceback__))
        if self.failed is None:
            self.failed = exc
        try:
            self.on_failure(exc)
        except Exception:
            self.log.exception("on_failure itself failed")

    def on_failure(self, exc: BaseException) -> None:
        """Called once a handler raised. Override to show the failure to the
        guest (e.g. NVMe CSTS.CFS)."""

    # -- reset ---------------------------------------------------------------------------------
    def _command_written(self, offset: int, size: int, old: int, value: int) -> None:
        with self.irq.lock:
            self.irq.update_intx()
        self.on_command_written()

    def on_command_written(self) -> None:
        """Called after every guest write to the command register."""

    def reset(self, kind: ResetKind = ResetKind.CONVENTIONAL) -> None:
        """Reset the function: config space (keeping what ``kind`` keeps),
        capabilities, BAR handlers, interrupts, then :meth:`on_reset`."""
        self.config.reset(kind)
        self.caps.reset(kind)
        for bar in self.bars:
            if bar is not None and hasattr(bar.handler, "reset"):
                bar.handler.reset()
        self.irq.reset()
        self.failed = None
        try:
            self.on_reset(kind)
        except Exception as exc:
            self.fail(exc, f"{kind.value} reset")

    def request_reset(self, kind: ResetKind) -> None:
        """A capability asks for a reset (FLR, PM D3hot to D0): :meth:`reset`.

        Part of :class:`~pcidev.pci.capabilities.base.FunctionContext`.
        """
        self.reset(kind)

    def on_reset(self, kind: ResetKind) -> None:
        """Reset device-specific state. Override in device classes."""

    # -- migration: device-author hooks ----------------------------------------------------------
    def enabled_features(self) -> set[str]:
        """Features this instance has enabled (the migration allow-list checks them).

        The framework reports what it finds in the description: ``msix``, ``msi``,
        ``pm``, ``pcie``, ``aer``, ``sriov`` (capabilities), ``intx`` (an interrupt pin),
        ``rom`` (an expansion ROM), ``cap:<ClassName>`` for any other capability
        (it may keep state outside config space), and ``bar<N>-ram`` for a BAR
        backed by :class:`~pcidev.bar.RamBacking` (the framework migrates its contents
        as a file descriptor, see :meth:`ram_bars`). Override and extend ``super().enabled_features()`` with the
        device's own features (``"cmb"``, ``"sgl"``, ``"zns"``...). Every feature
        that is neither in :attr:`FRAMEWORK_FEATURES` nor in
        :attr:`MIGRATABLE_FEATURES` blocks migration with a reason naming it.

        :returns: a new set of feature names.
        """
        names = {MsixCapability: "msix", MsiCapability: "msi", PowerManagementCapability: "pm",
                 PciExpressCapability: "pcie", AerCapability: "aer", SriovCapability: "sriov"}
        features: set[str] = set()
        for cap in self.caps:
            features.add(names.get(type(cap), f"cap:{type(cap).__name__}"))
        if self.interrupt_pin:
            features.add("intx")
        if self.rom is not None:
            features.add("rom")
        for bar in self.bars:
            if bar is not None and isinstance(bar.handler, RamBacking):
                features.add(f"bar{bar.index}-ram")
        return features

    def ram_bars(self) -> list[Bar]:
        """The BARs backed by a :class:`~pcidev.bar.RamBacking`, in index order. The
        framework migrates their contents (their ``bar<N>-ram`` features are the
        framework's): the descriptor travels with the stream and the destination's
        backing adopts it; over TCP and in vfio-user migration data a memfd-backed one's
        contents travel instead (:meth:`memory_sources`), and a file-backed one blocks
        there (see :func:`pcidev.migration.descriptor_blockers`).

        :returns: the BARs.
        """
        return [b for b in self.bars if b is not None and isinstance(b.handler, RamBacking)]

    def memory_sources(self) -> list[MemorySource]:
        """The memory objects whose contents travel instead of their descriptor over a
        migration channel that carries none (TCP; see :mod:`pcidev.migration.precopy`):
        each names the descriptor the device's vmstate stream refers to by an
        :class:`~pcidev.vmstate.FdRef`, and how its writes are tracked while the device
        runs.

        The default: one source ``"bar<N>"`` per memfd-backed RAM BAR (:meth:`ram_bars`),
        whose :class:`~pcidev.memory_source.DirtyBitmap` the MMIO write path marks
        (:meth:`pcidev.bar.RamBacking.write`), or with no bitmap (tracked by page hashes)
        once its descriptor was handed out (:meth:`pcidev.bar.RamBacking.export_fd`: a
        vfio-user client maps it) or this process maps it a second time
        (:meth:`pcidev.bar.RamBacking.written_only_through_write`); a file-backed RAM BAR
        too (the destination copies the contents into its own file). An SR-IOV PF adds its
        live VFs' sources, ``"vf<k>/<name>"`` (they travel with the PF's stream). A device
        type adds its own objects (a memory
        namespace, a metadata memfd) by extending ``super().memory_sources()``, and marks
        their bitmaps on every write path *after* the write. Called while the device
        runs (from a migration thread) and again when it is quiesced.

        :returns: the sources, names unique within the device.
        """
        out = []
        for bar in self.ram_bars():
            ram = bar.handler
            assert isinstance(ram, RamBacking)  # ram_bars()
            src = ram.memory_source(f"bar{bar.index}")
            if src is not None:
                out.append(src)
        for k, vf in enumerate(list(self.virtual_functions)):
            # (the names of pcidev.sriov.vf_source_prefix)
            out.extend(attrs.evolve(src, name=f"vf{k}/{src.name}") for src in vf.memory_sources())
        return out

    def ram_bar_features(self) -> frozenset[str]:
        """The ``bar<N>-ram`` features of :meth:`ram_bars` (migrated by the framework)."""
        return frozenset(f"bar{b.index}-ram" for b in self.ram_bars())

    def framework_inheritable_fds(self) -> dict[str, int]:
        """The descriptors of file-backed RAM BARs (:func:`pcidev.bar.ram_file_key`), which a
        handover's new process takes over as it does :meth:`inheritable_fds` (borrowed)."""
        out: dict[str, int] = {}
        for bar in self.ram_bars():
            ram = bar.handler
            assert isinstance(ram, RamBacking)  # ram_bars()
            if ram.path is not None and ram.fd >= 0:
                out[ram_file_key(ram.path)] = ram.fd
        return out

    def device_migration_blockers(self) -> list[str]:
        """Override: reasons specific to the device's *current* state why it cannot
        migrate now (an operation that cannot be drained or recorded, a backend that
        cannot follow the process...). The framework's own checks are in
        :func:`pcidev.migration.device_blockers`; do not repeat them.

        :returns: one sentence per reason (empty: nothing blocks).
        """
        return []

    def device_fingerprint(self) -> dict[str, Any]:
        """Override: the device's own configuration items a destination must match
        exactly (queue counts, namespace sizes, feature switches). Values: None,
        bool, int, str, bytes and lists/dicts of them. Keys must not start with
        ``pci.`` (the framework's items: identity, BAR layout, vector counts, ...).

        :returns: a dict (empty by default).
        """
        return {}

    def layer_fingerprint(self) -> dict[str, Any]:
        """Override in a layer class (see :attr:`LAYER_VMSTATE`): the layer's configuration
        items a destination must match, merged with :meth:`device_fingerprint` (same value
        rules; the keys must differ from the device type's and not start with ``pci.``).

        :returns: a dict (empty by default).
        """
        return {}

    def migration_facts(self) -> dict[str, Any]:
        """Override: what a destination needs to know, before anything stops, to decide
        whether it can take this device *now*, beyond the configuration fingerprint (which
        travels beside it): the files its backends use, what was created at run time...
        The migration channel's pre-flight (:mod:`pcidev.migration.preflight`) sends it to
        the destination, whose :meth:`check_migration_facts` answers. Called on the source
        while the device runs (thread-safe against it); it must not change the device.
        Values as for :meth:`device_fingerprint` (msgpack: None, bool, int, float, str,
        bytes and lists/dicts of them, str keys).

        :returns: a dict (empty by default).
        """
        return {}

    def check_migration_facts(self, facts: dict[str, Any]) -> list[str]:
        """Override: on the destination, every reason why this device could not take the
        state of the source device whose :meth:`migration_facts` are ``facts`` (an image
        it cannot reach, a namespace it could not build...). Called before the source
        stops anything; it must change nothing. The load's own checks stay the final guard
        (the source may change between the pre-flight and the stop).

        :param facts: the source's :meth:`migration_facts` (from the peer: check every
            value's type before use).
        :returns: one sentence per reason (empty: nothing stands in the way).
        :raises ValueError: (or ``TypeError``, ``KeyError``) ``facts`` is malformed: the
            channel refuses the pre-flight as garbage.
        """
        return []

    def get_layer_state(self) -> Any:
        """Override in a layer class: build the layer's state object (an instance of
        :attr:`LAYER_VMSTATE`), as :meth:`get_device_state` does for the device type.

        :returns: the state object.
        """
        raise MigrationBlockedError([f"{type(self).__name__} declares no layer state"])

    def check_layer_state(self, state: Any) -> None:
        """Override in a layer class: refuse a loaded layer state that cannot apply, by
        raising :class:`~pcidev.vmstate.errors.StateError`. Called before anything is
        applied (before :meth:`check_device_state`); must not change the device.

        :param state: an instance of :attr:`LAYER_VMSTATE`.
        :raises StateError: the state does not fit.
        """

    def set_layer_state(self, state: Any) -> None:
        """Override in a layer class: apply a checked layer state. Called after the
        framework state and before :meth:`set_device_state`; rolled back like it.

        :param state: an instance of :attr:`LAYER_VMSTATE`.
        """
        raise MigrationBlockedError([f"{type(self).__name__} declares no layer state"])

    def get_device_state(self) -> Any:
        """Override: build the device's state object (an instance of
        :attr:`VMSTATE`) from the live device. Called while quiesced; must not
        change the device.

        :returns: the state object.
        """
        raise MigrationBlockedError([f"device type {self.vmstate_device_type} has no vmstate description"])

    def check_device_state(self, state: Any) -> None:
        """Override: refuse a loaded state that cannot apply to this device
        (indices beyond a table, inconsistent values), by raising
        :class:`~pcidev.vmstate.errors.StateError` naming the field. Called before
        anything is applied; must not change the device. Field types and ranges are
        already checked by the vmstate decoder.

        :param state: an instance of :attr:`VMSTATE`.
        :raises StateError: the state does not fit.
        """

    def check_vf_streams(self, streams: Sequence[bytes]) -> None:
        """Override (an SR-IOV PF): refuse its VFs' saved streams (VF 0 first) in the check
        phase of a load, after :meth:`check_device_state` of the same load accepted the PF's
        own state -- e.g. what a VF's state must agree with in that state. Must not change
        the device. The default accepts them (each VF still checks its own stream when it
        loads, after the PF's state is applied).

        :param streams: the VFs' vmstate streams.
        :raises VMStateError: a stream does not fit.
        """

    def set_device_state(self, state: Any) -> None:
        """Override: apply a checked state object to the live device. Called while
        quiesced, after the framework state was applied; if it raises, the framework
        puts the device back as it was (calling it again with the state saved just
        before) and the load fails.

        :param state: an instance of :attr:`VMSTATE`.
        """
        raise MigrationBlockedError([f"device type {self.vmstate_device_type} has no vmstate description"])

    def vmstate_fd(self, fd: int) -> FdRef | None:
        """During :meth:`get_device_state` of a save: send ``fd`` (borrowed; it must stay
        open until the stream is sent) with the stream, after the framework's
        descriptors, and return the :class:`~pcidev.vmstate.FdRef` naming it. Outside a
        save (a rollback copy, a test calling :meth:`get_device_state` directly) it
        returns None: store the reference as ``Optional[FdRef]``.

        :param fd: an open file descriptor (a memfd holding device data, ...).
        """
        fds = self.vmstate_save_fds
        if fds is None:
            return None
        fds.append(fd)
        return FdRef(len(fds) - 1)

    def vmstate_load_fd(self, ref: FdRef | None) -> int | None:
        """During :meth:`check_device_state` / :meth:`set_device_state` of a load: the
        descriptor a :class:`~pcidev.vmstate.FdRef` of the device's state names (borrowed
        from the caller: duplicate what you keep), or None when the load carries no
        descriptors (TCP, a snapshot) or ``ref`` is beyond those received. Over TCP a
        descriptor whose contents travelled (:meth:`memory_sources`) is a memfd of the
        destination's holding them."""
        fds = self.vmstate_load_fds
        if ref is None or fds is None or not 0 <= ref.index < len(fds):
            return None
        return fds[ref.index]

    def vmstate_load_allocated(self, ref: FdRef | None) -> bytes | None:
        """During a load, beside :meth:`vmstate_load_fd`: for a descriptor whose contents
        travelled (a memfd the channel staged), which of its pages hold data -- one byte per
        :data:`~pcidev.memory_source.ALLOCATION_PAGE` bytes, nonzero where data was written,
        zero where it is a hole (``allocated`` of :class:`~pcidev.memory_source.ContentDescriptors`),
        so that a device adopting it need not scan it for holes inside the downtime.
        None: unknown (a descriptor passed as it is, a snapshot, no load).

        :param ref: the reference in the device's state.
        :returns: the page map, or None.
        """
        fds = self.vmstate_load_fds
        if ref is None or not isinstance(fds, ContentDescriptors):
            return None
        return fds.allocated.get(ref.index)

    def inheritable_fds(self) -> dict[str, int]:
        """Override: the descriptors a handover's new process should take over instead
        of opening its own (a disk image opened by path: the path may name another file
        by now), by a key the device's backend looks up with
        :func:`pcidev.inheritance.take_inherited` while the new process builds the
        device (see :mod:`pcidev.inheritance`). Borrowed: the caller duplicates them.
        Called from the handover's control thread while the device runs: read what is
        stable (a backend's descriptor), take the device's lock for the rest. The
        default: none.
        """
        return {}

    def on_quiesce(self) -> None:
        """Override: stop background work at a consistent point: after return no
        thread of the device touches its state or guest memory, and no request is
        half-done (finish it, or record it in the state). Guest accesses are
        stopped by the transport.

        Respect :attr:`quiesce_deadline` when it is set: work that does not finish by
        then (a backend request that never completes) raises
        :class:`~pcidev.errors.QuiesceTimeoutError`, naming what waited. With
        :attr:`quiesce_flush`, make what the device wrote durable once its work is
        done. When this raises, :meth:`quiesce` calls :meth:`on_resume` (which must cope
        with a partial quiesce) and the device runs on; the work still in flight
        completes later, as if no quiesce had been tried."""

    def prepare_quiesce(self, *, flush: bool) -> None:
        """Override: do ahead of time what :meth:`on_quiesce` would, so the stop has
        less left (a migration's downtime is shorter). Called while the device runs and the
        guest's accesses are *not* held, shortly before a migration stops it (at the end of
        its pre-copy phase: :meth:`pcidev.transport.endpoint.PrecopySession.run`); it must be
        thread-safe against the running device, and must not change what the guest sees.
        Nothing here may be taken for granted at the stop: the device still does there
        whatever is left (NVMe: ``fdatasync`` of the images written since, which is little
        when this synced the rest). The default does nothing.

        :param flush: the stop will make what the device wrote durable (:attr:`quiesce_flush`).
        :raises MigrationError: preparing failed (a write-back error): the migration fails,
            the device runs on.
        """

    def on_resume(self) -> None:
        """Override: start (or restart) background work. Called when a transport
        starts serving the device, after a failed migration on the source, and after
        a load on the destination."""

    # -- transport hints: batching and polling ------------------------------------------------------
    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Override: a context manager around a burst of guest accesses that a transport
        delivers together (for example a run of posted doorbell writes). Work done
        inside it may defer its completions and interrupts to its end, so a burst
        costs one of each instead of one per access. Nesting is allowed; the transport
        leaves it before it answers the guest. The default does nothing.

        Use: ``with device.batch(): device.bar_write(...)``.
        """
        return contextlib.nullcontext()

    def poll_work(self) -> bool:
        """Override: look for work the guest posted without notifying the device (for
        example a queue index written only to guest memory). A polling transport calls
        it when its poll times out while it is polling (see :meth:`set_polling`).
        The default finds nothing.

        :returns: True if work was found (the transport keeps polling eagerly).
        """
        return False

    def set_polling(self, active: bool) -> None:
        """Override: a transport announces that it polls (True: it calls
        :meth:`poll_work` every short while) or that it stopped (False). A device
        may then ask the guest for fewer notifications while polling, and must ask
        for them again, and look for work once more, when polling stops. Without
        any call the device behaves as if no transport polled. The default does
        nothing.

        :param active: the transport polls from now on (True) or no longer (False).
        """

    # -- migration: what the framework's migration calls ------------------------------------------
    @property
    def vmstate_device_type(self) -> str:
        """The device type written into and expected from vmstate streams."""
        return self.TYPE_NAME or type(self).__name__.lower()

    #: while :meth:`quiesce` calls :meth:`on_quiesce`: the ``time.monotonic()`` by which the
    #: device must be at its consistent point (None: the caller gave no budget; the device's
    #: own limit applies). Read it in :meth:`on_quiesce` and raise
    #: :class:`~pcidev.errors.QuiesceTimeoutError` when the work in flight does not finish.
    quiesce_deadline: float | None = None
    #: while :meth:`quiesce` calls :meth:`on_quiesce`: also make everything the device wrote
    #: to its backing storage durable (``fdatasync`` of image files), so that a destination
    #: that opens the same files from another host sees every acknowledged write
    quiesce_flush: bool = False

    def quiesce(self, timeout: float | None = None, *, flush: bool = False) -> None:
        """Stop the device at a consistent point: quiesce its workers (no step in
        progress when this returns), then call :meth:`on_quiesce`.

        Idempotent. The caller stops guest accesses (a transport stops reading
        its socket at a message boundary).

        :param timeout: seconds :meth:`on_quiesce` may take (given to it as
            :attr:`quiesce_deadline`; the VFs quiesced with a PF share it); None: no budget
            from the caller.
        :param flush: also make what the device wrote durable (:attr:`quiesce_flush`): a
            migration to a destination that may open the same files from another host.
            It applies to the call that quiesces the device (an already quiesced device
            is left as it is).
        :raises MigrationError: :meth:`on_quiesce` failed, for example
            :class:`~pcidev.errors.QuiesceTimeoutError` past the budget: the device (its
            workers, the VFs this call quiesced) runs again, as before the call.
        """
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        stopped: list[PciDevice] = []
        try:
            for vf in self._dependent_vfs():
                if not vf.quiesced:
                    vf.quiesce(None if deadline is None else deadline - time.monotonic(), flush=flush)
                    stopped.append(vf)
            if not self.quiesced:
                paused: list[Worker] = []
                try:
                    for worker in self.workers:
                        worker.quiesce()
                        paused.append(worker)
                except BaseException:
                    for worker in paused:  # (the ones stopped before the failing one run again)
                        worker.resume()
                    raise
                self.quiesce_deadline, self.quiesce_flush = deadline, flush
                try:
                    self.on_quiesce()
                except BaseException:
                    self._undo_quiesce()
                    raise
                finally:
                    self.quiesce_deadline, self.quiesce_flush = None, False
                with self.lock:
                    self.quiesced = True
        except BaseException:
            for vf in stopped:
                vf.resume()
            raise

    def _undo_quiesce(self) -> None:
        """:meth:`on_quiesce` raised: the device runs again (its :meth:`on_resume`, its workers)."""
        try:
            self.on_resume()
        finally:
            for worker in self.workers:
                worker.resume()

    def resume(self) -> None:
        """Start or restart the device after :meth:`quiesce`: call :meth:`on_resume`,
        then resume its workers (starting their threads). Does nothing after :meth:`close`."""
        if self.closed:
            return
        with self.lock:
            self.quiesced = False
        self.on_resume()
        for worker in self.workers:
            worker.resume()
        for vf in self._dependent_vfs():
            vf.resume()
        for listener in list(self.resume_listeners):
            listener()

    def _dependent_vfs(self) -> list[PciDevice]:
        """The VFs quiesced and resumed with this PF: not those a transport of their own
        serves (:attr:`pcidev.sriov.VirtualFunction.standalone`): their clients are not the
        PF's, and that transport quiesces and resumes them."""
        return [vf for vf in self.virtual_functions if not getattr(vf, "standalone", False)]

    # -- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        """End the device's life: close its workers (joining their threads), then call
        :meth:`on_close`. Idempotent; the device cannot be resumed afterwards. Also
        the end of a ``with`` block on the device.
        """
        if self.closed:
            return
        self.closed = True
        self.remove_virtual_functions()
        for worker in self.workers:
            worker.close()
        try:
            self.on_close()
        except Exception:
            self.log.exception("on_close failed")

    def _close_virtual_functions(self) -> None:
        while self.virtual_functions:
            self.virtual_functions.pop().close()

    def on_close(self) -> None:
        """Override: release what the device holds (threads it started itself, files,
        backends). Called once, by :meth:`close`, after the device's workers stopped.

        A transport closes its device when it ends (``pcidev serve``, a device-link
        process), also after the device migrated away or when it never ran (a
        destination that received nothing). Then :attr:`owns_state` is False:
        release resources but persist nothing (do not write a state file another
        process now keeps)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.vendor_id:04x}:{self.device_id:04x}>"

