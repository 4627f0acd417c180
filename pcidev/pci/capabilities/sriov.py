"""Single Root I/O Virtualization extended capability (ID 0010h), version 1.

Layout (PCIe Base spec, SR-IOV chapter; Linux ``PCI_SRIOV_*``)::

    00  header: id 0010h, version 1, next
    04  SR-IOV Capabilities (RO)           08  SR-IOV Control (16) | 0A Status (16, RW1C)
    0C  InitialVFs (16, RO)                0E  TotalVFs (16, RO)
    10  NumVFs (16, RW while VF Enable=0)  12  Function Dependency Link (8, RO)
    14  First VF Offset (16, RO)           16  VF Stride (16, RO)
    1A  VF Device ID (16, RO)
    1C  Supported Page Sizes (32, RO)      20  System Page Size (32, RW while VF Enable=0)
    24  VF BAR0..VF BAR5 (6 x 32)          3C  VF Migration State Array Offset (RO)

Control: bit 0 VF Enable, bit 3 VF Memory Space Enable (VF MSE), bit 4 ARI Capable
Hierarchy (writable only while VF Enable is clear). NumVFs is writable only while VF
Enable is clear; a value above TotalVFs is refused (the register keeps its old value).
First VF Offset and VF Stride are recomputed whenever NumVFs or ARI Capable Hierarchy
change (by the *layout* function the capability was built with). System Page Size
takes one bit of Supported Page Sizes (other writes are ignored); the VF BARs are
sized like BARs (write all ones, read back) with a size of at least the system page
size, and their address bits are read-write.

The capability only holds registers. Whoever owns the virtual functions (see
:mod:`pcidev.sriov`) sets :attr:`SriovCapability.listener`, which is told when VF
Enable is set (with NumVFs) or cleared, including by a reset of the function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from pcidev.errors import ConfigError
from pcidev.pci import ids
from pcidev.pci.capabilities.base import ExtCapability
from pcidev.pci.config import ResetKind

__all__ = [
    "CAP", "CTRL", "STATUS", "INITIAL_VF", "TOTAL_VF", "NUM_VF", "FUNC_LINK", "VF_OFFSET", "VF_STRIDE",
    "VF_DID", "SUP_PGSIZE", "SYS_PGSIZE", "BAR", "VFM", "CTRL_VFE", "CTRL_VFM", "CTRL_INTR", "CTRL_MSE",
    "CTRL_ARI", "STATUS_VFM", "VfBar", "VfLayout", "SriovListener", "default_layout", "SriovCapability",
]

#: SR-IOV Capabilities register (PCI_SRIOV_CAP)
CAP = 0x04
#: SR-IOV Control register (PCI_SRIOV_CTRL)
CTRL = 0x08
#: SR-IOV Status register (PCI_SRIOV_STATUS)
STATUS = 0x0A
#: InitialVFs (PCI_SRIOV_INITIAL_VF)
INITIAL_VF = 0x0C
#: TotalVFs (PCI_SRIOV_TOTAL_VF)
TOTAL_VF = 0x0E
#: NumVFs (PCI_SRIOV_NUM_VF)
NUM_VF = 0x10
#: Function Dependency Link (PCI_SRIOV_FUNC_LINK)
FUNC_LINK = 0x12
#: First VF Offset (PCI_SRIOV_VF_OFFSET)
VF_OFFSET = 0x14
#: VF Stride (PCI_SRIOV_VF_STRIDE)
VF_STRIDE = 0x16
#: VF Device ID (PCI_SRIOV_VF_DID)
VF_DID = 0x1A
#: Supported Page Sizes (PCI_SRIOV_SUP_PGSIZE)
SUP_PGSIZE = 0x1C
#: System Page Size (PCI_SRIOV_SYS_PGSIZE)
SYS_PGSIZE = 0x20
#: VF BAR0 (PCI_SRIOV_BAR); VF BAR n is at ``BAR + 4 * n``
BAR = 0x24
#: VF Migration State Array Offset (PCI_SRIOV_VFM)
VFM = 0x3C
#: Control: VF Enable (PCI_SRIOV_CTRL_VFE)
CTRL_VFE = 0x01
#: Control: VF Migration Enable (PCI_SRIOV_CTRL_VFM); not supported, reads 0
CTRL_VFM = 0x02
#: Control: VF Migration Interrupt Enable (PCI_SRIOV_CTRL_INTR); not supported, reads 0
CTRL_INTR = 0x04
#: Control: VF Memory Space Enable (PCI_SRIOV_CTRL_MSE)
CTRL_MSE = 0x08
#: Control: ARI Capable Hierarchy (PCI_SRIOV_CTRL_ARI)
CTRL_ARI = 0x10
#: Status: VF Migration Status (PCI_SRIOV_STATUS_VFM)
STATUS_VFM = 0x01

_MEM64 = 0x4
_PREFETCH = 0x8


@attrs.frozen
class VfBar:
    """One BAR every virtual function has (memory only: VFs have no I/O space).

    :ivar index: the BAR number (0..5; a 64-bit BAR also takes ``index + 1``).
    :ivar size: its size in bytes (a power of two, at least 16).
    :ivar bits64: a 64-bit BAR.
    :ivar prefetchable: prefetchable memory.
    """

    index: int
    size: int
    bits64: bool = False
    prefetchable: bool = False

    @property
    def flags(self) -> int:
        """The low bits of the BAR register (type and prefetchable)."""
        return (_MEM64 if self.bits64 else 0) | (_PREFETCH if self.prefetchable else 0)


#: ``layout(num_vfs, ari) -> (first_vf_offset, vf_stride)``
VfLayout = Callable[[int, bool], tuple[int, int]]


def default_layout(num_vfs: int, ari: bool) -> tuple[int, int]:
    """First VF Offset and VF Stride for a PF that is function 0: with ARI Capable
    Hierarchy the VFs follow the PF in its 256-function ARI space (offset 1); without
    it they start on the next bus (offset 100h), one routing ID apart (stride 1).

    :param num_vfs: NumVFs (unused: the layout does not depend on it).
    :param ari: ARI Capable Hierarchy.
    """
    return (1, 1) if ari else (0x100, 1)


class SriovListener(Protocol):
    """Told when the virtual functions appear and disappear (see :mod:`pcidev.sriov`)."""

    def vfs_enabled(self, num_vfs: int) -> None:
        """VF Enable was set with NumVFs = ``num_vfs``."""

    def vfs_disabled(self) -> None:
        """VF Enable was cleared (by a write or a reset of the PF)."""


class SriovCapability(ExtCapability):
    """The SR-IOV capability of a physical function.

    :param total_vfs: TotalVFs (and InitialVFs), 1..65535.
    :param vf_device_id: the VF Device ID.
    :param vf_bars: the BARs each VF has.
    :param layout: computes First VF Offset and VF Stride (default :func:`default_layout`).
    :param supported_page_sizes: Supported Page Sizes (bit n: ``4 KiB << n``); 4 KiB must be one.
    """

    CAP_ID = ids.ExtCapId.SRIOV
    VERSION = 1
    SIZE = 0x40

    def __init__(self, total_vfs: int, *, vf_device_id: int, vf_bars: Sequence[VfBar] = (),
                 layout: VfLayout = default_layout, supported_page_sizes: int = 0x553,
                 offset: int | None = None) -> None:
        super().__init__(offset=offset)
        if not 1 <= total_vfs <= 0xFFFF:
            raise ConfigError(f"TotalVFs {total_vfs} is not in 1..65535")
        if not 0 <= vf_device_id <= 0xFFFF:
            raise ConfigError(f"VF device id {vf_device_id:#x} does not fit in 16 bits")
        if not supported_page_sizes & 1 or supported_page_sizes >> 32:
            raise ConfigError("Supported Page Sizes must include 4 KiB and fit in 32 bits")
        taken: set[int] = set()
        for bar in vf_bars:
            slots = {bar.index, bar.index + 1} if bar.bits64 else {bar.index}
            if not 0 <= bar.index <= (4 if bar.bits64 else 5) or slots & taken:
                raise ConfigError(f"VF BAR{bar.index} is out of range or overlaps another")
            if bar.size < 16 or bar.size & (bar.size - 1) or (not bar.bits64 and bar.size > 1 << 31):
                raise ConfigError(f"VF BAR{bar.index} size {bar.size:#x} is not a valid BAR size")
            taken |= slots
        self.total_vfs = total_vfs
        self.vf_device_id = vf_device_id
        self.vf_bars: tuple[VfBar, ...] = tuple(sorted(vf_bars, key=lambda b: b.index))
        self.layout = layout
        self.supported_page_sizes = supported_page_sizes
        #: told when VF Enable changes (set by the owner of the virtual functions)
        self.listener: SriovListener | None = None
        #: whether the listener was last told the VFs are enabled
        self._enabled = False

    # -- registers ----------------------------------------------------------------------------
    def setup(self) -> None:
        self.set(CAP, 4, 0)
        self.set(INITIAL_VF, 2, self.total_vfs)
        self.set(TOTAL_VF, 2, self.total_vfs)
        self.set(FUNC_LINK, 1, 0)
        self.set(VF_DID, 2, self.vf_device_id)
        self.set(SUP_PGSIZE, 4, self.supported_page_sizes)
        self.set(SYS_PGSIZE, 4, 1)
        self.set(VFM, 4, 0)
        self.w1c(STATUS, 2, 0)
        for bar in self.vf_bars:
            self.set(BAR + 4 * bar.index, 4, bar.flags)
        self._update_layout()
        self._update_masks()
        self.on_write(CTRL, 2, self._ctrl_written)
        self.on_write(NUM_VF, 2, self._num_vfs_written)
        self.on_write(SYS_PGSIZE, 4, self._page_size_written)

    def _update_masks(self) -> None:
        """Write masks that depend on the registers: NumVFs, ARI and System Page Size only
        while VF Enable is clear, VF BAR address bits from the system page size."""
        vfe = bool(self.get(CTRL, 2) & CTRL_VFE)
        self.writable(CTRL, 2, CTRL_VFE | CTRL_MSE | (0 if vfe else CTRL_ARI))
        self.writable(NUM_VF, 2, 0 if vfe else 0xFFFF)
        self.writable(SYS_PGSIZE, 4, 0 if vfe else 0xFFFFFFFF)  # (it sizes and places live VF BARs)
        for bar in self.vf_bars:
            mask = ~(self.vf_bar_size(bar.index) - 1) & ((1 << 64) - 1)
            self.writable(BAR + 4 * bar.index, 4, mask & 0xFFFFFFF0)
            if bar.bits64:
                self.writable(BAR + 4 * bar.index + 4, 4, mask >> 32)

    def _update_layout(self) -> None:
        offset, stride = self.layout(self.num_vfs, self.ari)
        self.set(VF_OFFSET, 2, offset)
        self.set(VF_STRIDE, 2, stride)

    def _ctrl_written(self, offset: int, size: int, old: int, value: int) -> None:
        ctrl = self.get(CTRL, 2)
        self._update_layout()
        self._update_masks()
        vfe = bool(ctrl & CTRL_VFE)
        if vfe != self._enabled:
            self._notify(vfe)

    def _num_vfs_written(self, offset: int, size: int, old: int, value: int) -> None:
        if self.num_vfs > self.total_vfs:  # refused: the register keeps its old value
            self._put_back(NUM_VF, 2, offset, size, old)
        self._update_layout()

    def _page_size_written(self, offset: int, size: int, old: int, value: int) -> None:
        new = self.get(SYS_PGSIZE, 4)
        if new & (new - 1) or not new & self.supported_page_sizes:  # not one supported size
            self._put_back(SYS_PGSIZE, 4, offset, size, old)
        self._update_masks()
        for bar in self.vf_bars:  # keep every address aligned to the (new) BAR size
            reg = self._base + BAR + 4 * bar.index
            wmask = int.from_bytes(self.config.wmask[reg:reg + 4], "little")
            self.config.set32(reg, (self.config.get32(reg) & wmask) | bar.flags)

    def _put_back(self, rel: int, width: int, offset: int, size: int, old: int) -> None:
        """Restore the bytes of register ``rel`` that a guest access (``offset``,
        ``size``, value before it ``old``) covered."""
        start = self._base + rel
        for pos in range(max(offset, start), min(offset + size, start + width)):
            self.config.data[pos] = (old >> (8 * (pos - offset))) & 0xFF

    def _notify(self, enabled: bool) -> None:
        self._enabled = enabled
        listener = self.listener
        if listener is None:
            return
        if enabled:
            listener.vfs_enabled(self.num_vfs)
        else:
            listener.vfs_disabled()

    def reset(self, kind: ResetKind) -> None:
        self._update_layout()
        self._update_masks()
        if self._enabled and not self.vf_enable:
            self._notify(False)

    def config_loaded(self) -> None:
        self._update_masks()
        self._enabled = self.vf_enable

    # -- values ---------------------------------------------------------------------------------
    @property
    def vf_enable(self) -> bool:
        """VF Enable."""
        return bool(self.get(CTRL, 2) & CTRL_VFE)

    @property
    def vf_mse(self) -> bool:
        """VF Memory Space Enable: the VFs decode their BARs."""
        return bool(self.get(CTRL, 2) & CTRL_MSE)

    @property
    def ari(self) -> bool:
        """ARI Capable Hierarchy."""
        return bool(self.get(CTRL, 2) & CTRL_ARI)

    @property
    def num_vfs(self) -> int:
        """NumVFs."""
        return self.get(NUM_VF, 2)

    @property
    def first_vf_offset(self) -> int:
        """First VF Offset."""
        return self.get(VF_OFFSET, 2)

    @property
    def vf_stride(self) -> int:
        """VF Stride."""
        return self.get(VF_STRIDE, 2)

    @property
    def system_page_size(self) -> int:
        """The System Page Size in bytes."""
        return 4096 << (self.get(SYS_PGSIZE, 4).bit_length() - 1)

    def vf_bar(self, index: int) -> VfBar | None:
        """The declared VF BAR ``index``, or None."""
        return next((b for b in self.vf_bars if b.index == index), None)

    def vf_bar_size(self, index: int) -> int:
        """The size of VF BAR ``index`` for one VF: the declared size, at least the
        system page size (0 for a BAR the VFs do not have)."""
        bar = self.vf_bar(index)
        return 0 if bar is None else max(bar.size, self.system_page_size)

    def vf_bar_base(self, index: int) -> int:
        """The address programmed in VF BAR ``index`` (VF 0's BAR)."""
        bar = self.vf_bar(index)
        if bar is None:
            return 0
        addr = self.get(BAR + 4 * index, 4) & ~0xF
        if bar.bits64:
            addr |= self.get(BAR + 4 * index + 4, 4) << 32
        return addr

    def vf_bar_address(self, vf: int, index: int) -> int:
        """Where VF ``vf``'s BAR ``index`` sits: the VF BAR plus ``vf`` times its size."""
        return self.vf_bar_base(index) + vf * self.vf_bar_size(index)

    def vf_routing_id(self, pf_routing_id: int, vf: int) -> int:
        """The routing ID of VF ``vf`` (0-based) of a PF at ``pf_routing_id``.

        :raises ConfigError: it is beyond the last routing ID (FFFFh): no such function.
        """
        rid = pf_routing_id + self.first_vf_offset + vf * self.vf_stride
        if rid > 0xFFFF:
            raise ConfigError(f"VF {vf}'s routing ID {rid:#x} is beyond FFFFh")
        return rid
