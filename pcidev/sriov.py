"""Single Root I/O Virtualization: the life cycle of a physical function's virtual functions.

A device type (the *physical function*, PF) declares SR-IOV in its
:meth:`~pcidev.device.PciDevice.describe` with :func:`add_sriov`: TotalVFs, the VF
Device ID, the BARs every VF has, and a *factory* that builds virtual function ``k``::

    class Pf(PciDevice):
        def describe(self):
            ...
            self.sriov = add_sriov(self, total_vfs=4, vf_device_id=0x11E9,
                                   vf_bars=[VfBar(0, 0x4000, bits64=True)], factory=Vf)

    class Vf(VirtualFunction):
        def __init__(self, pf, k):
            super().__init__(name=f"{pf.name}-vf{k}")

        def describe(self):
            self.add_mem_bar(0, 0x4000, MyRegisters(), bits64=True)   # sizes as declared above
            self.add_msix(2, bar=0, table_offset=0x2000, pba_offset=0x3000)

The PF gets an :class:`~pcidev.pci.capabilities.sriov.SriovCapability`. When the
guest sets VF Enable with NumVFs = *n*, :class:`SriovFunctions` builds *n* VFs
with the factory, realizes them, attaches them to the PF's guest memory and starts
them; when VF Enable is cleared (or the PF is reset) it quiesces and closes them.
Watchers (the software host, a transport serving each VF) are told of every VF
that appears or goes (:class:`VfWatcher`).

A VF is a :class:`VirtualFunction`: a :class:`~pcidev.device.PciDevice` whose
configuration space follows the VF rules: Vendor and Device ID read FFFFh, its
BAR registers read zero (the VF's BAR ``i`` sits at the PF's VF BAR ``i`` plus
``k`` times its size), Memory and I/O Space Enable are read-only zero and the
VF decodes its BARs while the PF's VF MSE is set; it has no INTx (MSI-X is
allowed). The PF quiesces and resumes its VFs with itself, but those a transport of
their own serves (:attr:`VirtualFunction.standalone`), and closes them first
(:attr:`PciDevice.virtual_functions <pcidev.device.PciDevice.virtual_functions>`,
:meth:`SriovFunctions.remove_all`); its migration carries them
(:mod:`pcidev.migration.virtual_functions`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from pcidev.device import PciDevice
from pcidev.errors import ConfigError
from pcidev.pci import ids
from pcidev.pci.capabilities.pm import D0
from pcidev.pci.capabilities.sriov import SriovCapability, VfBar, VfLayout, default_layout

__all__ = ["VirtualFunction", "VfFactory", "VfWatcher", "SriovFunctions", "add_sriov", "functions_of",
           "VfBar", "vf_source_prefix", "vf_memory_objects"]

log = logging.getLogger(__name__)

#: ``factory(pf, k) -> VirtualFunction``: builds virtual function ``k`` (0-based) of ``pf``
VfFactory = Callable[[PciDevice, int], "VirtualFunction"]

_NO_DECODE = int(ids.Command.IO | ids.Command.MEMORY)
#: Command bits read-only zero on a VF: I/O and Memory Space Enable (the PF's VF MSE decodes),
#: Interrupt Disable (a VF has no INTx)
_VF_COMMAND_RO = _NO_DECODE | int(ids.Command.INTX_DISABLE)
#: end of the type-0 header's BAR registers
_BARS_END = ids.BASE_ADDRESS_0 + 24


class VirtualFunction(PciDevice):
    """A virtual function: subclass it (first, before another device class) for a
    VF type. :class:`SriovFunctions` binds it to its PF before it is realized."""

    #: VFs have no INTx
    INTERRUPT_PIN = 0

    #: the PF's SR-IOV capability (bound by :meth:`bind_physfn`)
    physfn_cap: SriovCapability | None = None
    #: the PF (bound by :meth:`bind_physfn`)
    physfn: PciDevice | None = None
    #: the VF's number (0-based: VF ``k`` is the PF's ``k + 1``-th VF)
    vf_index: int = 0

    def bind_physfn(self, pf: PciDevice, cap: SriovCapability, index: int) -> None:
        """Make this the PF's VF ``index`` (before :meth:`realize`).

        :raises ConfigError: the VF's BARs are not those the PF declares.
        """
        self.physfn, self.physfn_cap, self.vf_index = pf, cap, index
        mine = [(b.index, b.size, b.is_64bit, b.prefetchable, b.is_io) for b in self.bars if b is not None]
        want = [(b.index, b.size, b.bits64, b.prefetchable, False) for b in cap.vf_bars]
        if mine != want:
            raise ConfigError(f"VF BARs {mine} differ from those the PF declares {want}")

    def realize(self) -> None:
        """Realize as a VF: Vendor/Device ID read FFFFh, no BAR registers, Memory and
        I/O Space Enable and Interrupt Disable read-only zero."""
        if self.realized:
            return
        super().realize()
        cfg = self.config
        cfg.set16(ids.VENDOR_ID, 0xFFFF)
        cfg.set16(ids.DEVICE_ID, 0xFFFF)
        writable = int.from_bytes(cfg.wmask[ids.COMMAND:ids.COMMAND + 2], "little")
        cfg.set_writable(ids.COMMAND, 2, writable & ~_VF_COMMAND_RO)
        cfg.set16(ids.COMMAND, cfg.get16(ids.COMMAND) & ~_VF_COMMAND_RO)
        cfg.set_writable(ids.INTERRUPT_LINE, 1, 0)
        cfg.set8(ids.INTERRUPT_LINE, 0)
        cfg.freeze_defaults()

    def _realize_bar(self, bar: object) -> None:
        """VF BAR registers are read-only zero (the PF's VF BARs place them)."""

    def bar_address(self, index: int) -> int:
        """Where the VF's BAR ``index`` sits: the PF's VF BAR plus ``vf_index`` times its size."""
        cap = self.physfn_cap
        if cap is None or self.bars[index] is None:
            return 0
        return cap.vf_bar_address(self.vf_index, index)

    # -- presented alone: a transport serves the VF as a device of its own ------------------------
    #: the VF is served on a socket of its own (vfio-user): its configuration space then
    #: shows what the kernel's ``vfio-pci`` shows of a VF (see :meth:`config_read`)
    standalone: bool = False

    def _shown_bars(self) -> dict[int, int]:
        shown: dict[int, int] = self.__dict__.setdefault("_vf_shown_bars", {})
        return shown

    def config_read(self, offset: int, size: int) -> int:
        """A configuration read. While :attr:`standalone`, as the kernel's ``vfio-pci``
        shows a VF: Vendor ID and Device ID read as the PF's vendor and VF Device ID, and
        the BAR registers are emulated (sized by writing all ones, like any BAR).

        :raises ConfigSpaceError: on a malformed access.
        """
        value = super().config_read(offset, size)
        if not self.standalone or offset >= _BARS_END:
            return value
        cap, pf = self.physfn_cap, self.physfn
        shown = bytearray(value.to_bytes(size, "little"))
        emulated = bytearray(_BARS_END)
        if cap is not None and pf is not None:
            emulated[ids.VENDOR_ID:ids.VENDOR_ID + 2] = pf.vendor_id.to_bytes(2, "little")
            emulated[ids.DEVICE_ID:ids.DEVICE_ID + 2] = cap.vf_device_id.to_bytes(2, "little")
        for reg, val in self._bar_registers().items():
            emulated[reg:reg + 4] = val.to_bytes(4, "little")
        for i in range(size):
            pos = offset + i
            if pos < 4 or ids.BASE_ADDRESS_0 <= pos < _BARS_END:
                shown[i] = emulated[pos]
        return int.from_bytes(shown, "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A configuration write; while :attr:`standalone` the BAR registers are emulated."""
        if self.standalone and ids.BASE_ADDRESS_0 <= offset < _BARS_END:
            self.config._check(offset, size)
            regs = self._bar_registers()
            data = bytearray(_BARS_END)
            for reg, val in regs.items():
                data[reg:reg + 4] = val.to_bytes(4, "little")
            data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            shown = self._shown_bars()
            for reg in regs:
                shown[reg] = int.from_bytes(data[reg:reg + 4], "little")
            return
        super().config_write(offset, size, value)

    def _bar_registers(self) -> dict[int, int]:
        """The emulated BAR registers of a standalone VF: address bits as written, masked
        by the size, and the type bits."""
        shown = self._shown_bars()
        out: dict[int, int] = {}
        for bar in self.bars:
            if bar is None:
                continue
            reg = ids.BASE_ADDRESS_0 + 4 * bar.index
            mask = ~(bar.size - 1) & ((1 << 64) - 1)
            out[reg] = (shown.get(reg, 0) & mask & 0xFFFFFFF0) | bar.flags
            if bar.is_64bit:
                out[reg + 4] = shown.get(reg + 4, 0) & (mask >> 32)
        return out

    def device_migration_blockers(self) -> list[str]:
        """The VF type's reasons, and while :attr:`standalone`: a VF migrates only with its PF
        (its stream inside the PF's), so neither a VF served on a socket of its own nor the PF
        of such VFs migrates (the destination's PF would rebuild the VFs other clients use)."""
        reasons = list(super().device_migration_blockers())
        if self.standalone:
            reasons.append(f"VF {self.vf_index} is served on a socket of its own: a VF migrates only "
                           "inside its PF's stream, and a PF whose VFs are served standalone does not migrate")
        return reasons

    def add_release(self, release: Callable[[], None]) -> None:
        """Call ``release`` once the VF is closed (what a migration mapped for it)."""
        self.__dict__.setdefault("_vf_releases", []).append(release)

    def close(self) -> None:
        """Close the VF (:meth:`~pcidev.device.PciDevice.close`), then run what :meth:`add_release` registered."""
        super().close()
        releases: list[Callable[[], None]] = self.__dict__.pop("_vf_releases", [])
        for release in releases:
            try:
                release()
            except Exception:
                log.exception("releasing a closed VF's resources failed")

    def _decodes(self, bar: object) -> bool:
        cap = self.physfn_cap
        if cap is None or not cap.vf_mse:
            return False
        return self._pmcsr < 0 or self.config.data[self._pmcsr] & 0x3 == D0


class VfWatcher(Protocol):
    """Told of each virtual function that appears or goes (the software host, a transport)."""

    def vf_added(self, vf: VirtualFunction) -> None:
        """``vf`` was built, realized and attached to the PF's memory (not yet started)."""

    def vf_removed(self, vf: VirtualFunction) -> None:
        """``vf`` is about to be quiesced and closed."""


class SriovFunctions:
    """The virtual functions of one PF: built when VF Enable is set, closed when it is cleared.

    :param pf: the physical function.
    :param cap: its SR-IOV capability (this object becomes its listener).
    :param factory: builds VF ``k``.
    """

    def __init__(self, pf: PciDevice, cap: SriovCapability, factory: VfFactory) -> None:
        self.pf = pf
        self.cap = cap
        self.factory = factory
        #: the live VFs, VF 0 first (the same list as the PF's ``virtual_functions``)
        self.vfs: list[PciDevice] = pf.virtual_functions
        self._watchers: list[VfWatcher] = []
        #: the state a failed load's rollback puts back and the VFs it describes (see
        #: :func:`pcidev.migration.virtual_functions.save_vfs`)
        self.kept: tuple[object, tuple[PciDevice, ...]] | None = None
        cap.listener = self
        pf.remove_virtual_functions = self.remove_all  # the PF's close ends its VFs here too

    # -- watchers ---------------------------------------------------------------------------
    def watch(self, watcher: VfWatcher) -> None:
        """Tell ``watcher`` of every VF from now on (not of those that exist already)."""
        if watcher not in self._watchers:
            self._watchers.append(watcher)

    def unwatch(self, watcher: VfWatcher) -> None:
        """Stop telling ``watcher``."""
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    # -- the capability's listener ------------------------------------------------------------
    def vfs_enabled(self, num_vfs: int) -> None:
        """VF Enable was set: build, announce and start ``num_vfs`` VFs. A VF the
        factory cannot build puts the PF in its failed state."""
        try:
            self.build(num_vfs)
        except Exception as exc:
            self.remove_all()
            self.pf.fail(exc, "building its virtual functions")
            return
        for vf in self.vfs:
            vf.resume()

    def vfs_disabled(self) -> None:
        """VF Enable was cleared: quiesce and close every VF."""
        self.remove_all()

    # -- life cycle -----------------------------------------------------------------------------
    def build(self, num_vfs: int) -> list[PciDevice]:
        """Build ``num_vfs`` VFs (replacing any there are), attach them to the PF's
        memory and announce them; they are not started (:meth:`~pcidev.device.PciDevice.resume`).

        :returns: the VFs.
        :raises ConfigError: the factory built something that is not a fitting VF.
        """
        self.remove_all()
        return self.install(self.make(num_vfs))

    def make(self, num_vfs: int) -> list[VirtualFunction]:
        """Build ``num_vfs`` VFs aside: bound to the PF and attached to its memory, but
        neither live nor announced (a migration loads them before :meth:`install`).

        :returns: the VFs.
        :raises ConfigError: the factory built something that is not a fitting VF (those
            built are closed again).
        """
        made: list[VirtualFunction] = []
        try:
            for k in range(num_vfs):
                vf = self.factory(self.pf, k)
                if not isinstance(vf, VirtualFunction):
                    vf.close()
                    raise ConfigError(f"the VF factory built a {type(vf).__name__}, not a VirtualFunction")
                try:
                    vf.bind_physfn(self.pf, self.cap, k)
                    vf.attach(self.pf.memory, None)
                except BaseException:
                    vf.close()
                    raise
                made.append(vf)
        except BaseException:
            self.discard(made)
            raise
        return made

    @staticmethod
    def discard(vfs: Sequence[VirtualFunction]) -> None:
        """Close VFs :meth:`make` built that never went live."""
        for vf in reversed(vfs):
            try:
                vf.close()
            except Exception:
                log.exception("closing a VF that never went live failed")

    def install(self, vfs: Sequence[VirtualFunction]) -> list[PciDevice]:
        """Make VFs from :meth:`make` the live ones (replacing any there are) and announce them.

        :returns: the live VFs.
        """
        self.remove_all()
        for vf in vfs:
            self.vfs.append(vf)
            for watcher in list(self._watchers):
                watcher.vf_added(vf)
        return list(self.vfs)

    def remove_all(self) -> None:
        """Announce, quiesce and close every VF, last first (VF Enable cleared, the PF reset
        or closed): a watcher serving a VF stops serving it before it is closed."""
        while self.vfs:
            vf = self.vfs.pop()
            if isinstance(vf, VirtualFunction):  # (what install() added)
                for watcher in list(self._watchers):
                    try:
                        watcher.vf_removed(vf)
                    except Exception:
                        log.exception("a VF watcher failed")
            if not vf.closed:  # (a transport serving the VF may have closed it)
                vf.quiesce()
            vf.close()


def add_sriov(pf: PciDevice, *, total_vfs: int, vf_device_id: int, factory: VfFactory,
              vf_bars: Sequence[VfBar] = (), layout: VfLayout = default_layout) -> SriovFunctions:
    """Give ``pf`` (while it describes itself) an SR-IOV capability and the life cycle of its VFs.

    :param pf: the physical function, in its ``describe()``.
    :param total_vfs: TotalVFs.
    :param vf_device_id: the VF Device ID.
    :param factory: builds VF ``k``.
    :param vf_bars: the BARs each VF has (the VF type must describe the same).
    :param layout: First VF Offset and VF Stride (see
        :func:`~pcidev.pci.capabilities.sriov.default_layout`).
    :returns: the :class:`SriovFunctions`.
    """
    cap = pf.add_capability(SriovCapability(total_vfs, vf_device_id=vf_device_id, vf_bars=vf_bars,
                                            layout=layout))
    return SriovFunctions(pf, cap, factory)


def functions_of(device: PciDevice) -> SriovFunctions | None:
    """The :class:`SriovFunctions` of a PF, or None for a device without SR-IOV."""
    cap = device.caps.find(SriovCapability)
    listener = cap.listener if cap is not None else None
    return listener if isinstance(listener, SriovFunctions) else None


def vf_source_prefix(k: int) -> str:
    """The prefix of VF ``k``'s memory-source names within its PF's
    (:meth:`~pcidev.device.PciDevice.memory_sources`: ``"vf0/bar2"``)."""
    return f"vf{k}/"


def vf_memory_objects(device: PciDevice, limit: int) -> dict[str, int]:
    """``{name: size}`` of every memory source the VFs of PF ``device`` could have: a
    destination PF has no VFs before the load builds them, yet must accept their RAM BARs'
    contents (streamed with the PF's). Each declared VF BAR of the first ``limit`` VFs, at
    its declared size (a VF type whose BAR is not RAM simply never sends it).

    :param device: the PF (no SR-IOV: empty).
    :param limit: the most VFs to list (a stream announces a bounded number of sources).
    """
    functions = functions_of(device)
    if functions is None:
        return {}
    cap = functions.cap
    return {f"{vf_source_prefix(k)}bar{bar.index}": bar.size
            for k in range(min(cap.total_vfs, limit)) for bar in cap.vf_bars}
