"""Vendor-specific capability (ID 09h) of the standard list.

Layout (PCI Local Bus 3.0, 6.8.4)::

    00  id (09h) | next | cap_len (8): length of the whole capability in bytes, header included
    03  vendor-defined bytes up to cap_len

The framework writes the header and ``cap_len``; a subclass writes the vendor
bytes in :meth:`VendorCapability.setup` through the relative helpers of
:class:`~pcidev.pci.capabilities.base.Capability` (``set``, ``writable``,
``on_write``) and may add read hooks with :meth:`VendorCapability.on_read`.
A device may carry several vendor-specific capabilities (virtio-pci uses one per
configuration structure); each is a separate instance::

    class BoardRevision(VendorCapability):
        def __init__(self):
            super().__init__(8)                  # cap_len 8: header + 5 vendor bytes
        def setup(self):
            super().setup()                      # writes cap_len
            self.set(4, 4, 0x0002_0001)

    dev.add_capability(BoardRevision())

Without a subclass, ``VendorCapability(length, body=b"...")`` presents fixed,
read-only vendor bytes.
"""

from __future__ import annotations

from pcidev.errors import ConfigError
from pcidev.pci import ids
from pcidev.pci.capabilities.base import Capability
from pcidev.pci.config import ReadHook

__all__ = ["CAP_LEN", "BODY", "MAX_LENGTH", "VendorCapability"]

#: offset of the cap_len byte
CAP_LEN = 2
#: offset of the first vendor-defined byte
BODY = 3
#: the largest capability that fits the standard configuration space after its header area
MAX_LENGTH = ids.CONFIG_SPACE_SIZE - ids.STD_CAP_START


class VendorCapability(Capability):
    """A vendor-specific capability of ``length`` bytes (``cap_len``).

    :param length: ``cap_len``: the capability's size in bytes, header included (3..192).
    :param body: read-only vendor bytes written from offset 3 (at most ``length - 3``);
        a subclass may write its registers in :meth:`setup` instead.
    :param offset: pin the capability at this (4-byte aligned) offset.
    :raises ConfigError: a length outside 3..192 or a body that does not fit.
    """

    CAP_ID = ids.CapId.VNDR

    def __init__(self, length: int, *, body: bytes = b"", offset: int | None = None) -> None:
        super().__init__(offset=offset)
        if not BODY <= length <= MAX_LENGTH:
            raise ConfigError(f"vendor capability length {length} is outside {BODY}..{MAX_LENGTH}")
        if len(body) > length - BODY:
            raise ConfigError(f"vendor capability body of {len(body)} bytes does not fit cap_len {length}")
        self.length = length
        self.body = bytes(body)

    @property
    def size(self) -> int:
        """The capability's size in bytes (its ``cap_len``)."""
        return self.length

    def setup(self) -> None:
        """Write ``cap_len`` and the fixed body. A subclass calls it first, then writes its registers."""
        self.set(CAP_LEN, 1, self.length)
        for i, byte in enumerate(self.body):
            self.set(BODY + i, 1, byte)

    def on_read(self, rel: int, size: int, hook: ReadHook) -> None:
        """Call ``hook(offset, size)`` before guest reads overlapping ``[rel, rel+size)`` of the
        capability; it returns the value to read, or None to read the stored bytes (which it
        may have refreshed). The offsets it receives are absolute configuration offsets.

        :param rel: offset within the capability.
        :param size: bytes covered.
        :param hook: the read hook (see :data:`pcidev.pci.config.ReadHook`); it must not raise.
        """
        self.config.add_read_hook(self._base + rel, size, hook)
