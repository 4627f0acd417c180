"""The virtio PCI capabilities (spec 4.1.4): vendor-specific capabilities (ID 09h)
that tell the driver where each virtio structure lives.

``struct virtio_pci_cap`` (16 bytes, little-endian)::

    00 cap_vndr (09h) | cap_next | cap_len | cfg_type
    04 bar | id | padding[2]
    08 offset (le32): where the structure starts in the BAR
    0C length (le32): its length in bytes

The notification capability appends ``notify_off_multiplier`` (le32, 20 bytes in all);
the PCI configuration access capability appends ``pci_cfg_data[4]`` and lets the driver
reach any BAR byte through configuration space (its bar, offset and length are
writable; an access to ``pci_cfg_data`` is an access of ``length`` bytes at
``offset`` of BAR ``bar``).
"""

from __future__ import annotations

from collections.abc import Callable

from pcidev import PcidevError
from pcidev.pci.capabilities.vendor import VendorCapability
from pcidev_virtio import spec

__all__ = ["VirtioPciCap", "VirtioNotifyCap", "VirtioPciCfgCap", "BarAccess"]

# offsets inside struct virtio_pci_cap
_CFG_TYPE = 3
_BAR = 4
_ID = 5
_OFFSET = 8
_LENGTH = 12
_EXTRA = 16  # notify_off_multiplier / pci_cfg_data

#: ``access(bar, offset, size, is_write, value) -> value read`` on the device's BARs
BarAccess = Callable[[int, int, int, bool, int], int]


class VirtioPciCap(VendorCapability):
    """One ``struct virtio_pci_cap``.

    :param cfg_type: the structure (:class:`~pcidev_virtio.spec.CfgType`).
    :param bar: the BAR holding it.
    :param offset: its offset in the BAR.
    :param length: its length in bytes.
    :param cap_len: the capability's length (16, or 20 for the notify and PCI cfg variants).
    """

    def __init__(self, cfg_type: int, bar: int, offset: int, length: int, *,
                 cap_len: int = spec.PCI_CAP_LENGTH) -> None:
        super().__init__(cap_len)
        self.cfg_type = cfg_type
        self.bar = bar
        self.struct_offset = offset
        self.struct_length = length

    def setup(self) -> None:
        super().setup()
        self.set(_CFG_TYPE, 1, self.cfg_type)
        self.set(_BAR, 1, self.bar)
        self.set(_ID, 1, 0)
        self.set(_OFFSET, 4, self.struct_offset)
        self.set(_LENGTH, 4, self.struct_length)


class VirtioNotifyCap(VirtioPciCap):
    """``struct virtio_pci_notify_cap``: a queue's notification address is
    ``offset + queue_notify_off * notify_off_multiplier`` in the BAR.

    :param bar: the BAR.
    :param offset: the notification area's offset.
    :param length: its length.
    :param multiplier: ``notify_off_multiplier`` (even, or 0 for one shared address).
    """

    def __init__(self, bar: int, offset: int, length: int, multiplier: int) -> None:
        super().__init__(spec.CfgType.NOTIFY, bar, offset, length, cap_len=spec.NOTIFY_CAP_LENGTH)
        self.multiplier = multiplier

    def setup(self) -> None:
        super().setup()
        self.set(_EXTRA, 4, self.multiplier)


class VirtioPciCfgCap(VirtioPciCap):
    """``struct virtio_pci_cfg_cap``: a window onto the BARs through configuration space.

    The driver writes ``bar``, ``offset`` and ``length`` (1, 2 or 4, ``offset`` aligned
    to it); a read of ``pci_cfg_data`` reads that many bytes from the BAR into it, a
    write writes its first ``length`` bytes to the BAR. A window that is not valid
    (another length, misaligned, past the BAR, a missing BAR) does nothing.

    :param access: performs the BAR access (the device's, without the command
        register's decode check: the window works whatever the BAR's address).
    """

    def __init__(self, access: BarAccess) -> None:
        super().__init__(spec.CfgType.PCI, 0, 0, 0, cap_len=spec.PCI_CFG_CAP_LENGTH)
        self._access = access

    def setup(self) -> None:
        super().setup()
        self.writable(_BAR, 1, 0xFF)
        self.writable(_OFFSET, 4, 0xFFFFFFFF)
        self.writable(_LENGTH, 4, 0xFFFFFFFF)
        self.writable(_EXTRA, 4, 0xFFFFFFFF)
        self.on_write(_EXTRA, 4, self._data_written)
        self.on_read(_EXTRA, 4, self._data_read)

    def _window(self) -> tuple[int, int, int] | None:
        bar, offset, length = self.get(_BAR, 1), self.get(_OFFSET, 4), self.get(_LENGTH, 4)
        if length not in (1, 2, 4) or offset % length or bar > 5:
            return None
        return bar, offset, length

    def _data_written(self, off: int, size: int, old: int, value: int) -> None:
        window = self._window()
        if window is None:
            return
        bar, offset, length = window
        try:
            self._access(bar, offset, length, True, self.get(_EXTRA, length))
        except PcidevError:
            pass  # no such BAR byte: the access goes nowhere

    def _data_read(self, off: int, size: int) -> int | None:
        window = self._window()
        if window is not None:
            bar, offset, length = window
            try:
                self.set(_EXTRA, length, self._access(bar, offset, length, False, 0))
            except PcidevError:
                pass
        return None  # read the (refreshed) stored bytes
