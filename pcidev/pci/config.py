"""PCI configuration space with per-byte write semantics.

The 4 KiB space is three parallel byte arrays:

``data``
    what a read returns (before any read hook);
``wmask``
    bits a configuration write may change (read-write);
``w1cmask``
    bits a configuration write of 1 clears (write-1-to-clear).

A bit in neither mask is read-only for the guest. The device itself sets any
bit with :meth:`ConfigSpace.set` and friends, bypassing the masks.

Two more masks describe which bits survive a reset (see :class:`ResetKind`):

``sticky``
    bits kept over conventional reset and FLR (the spec's ``*S`` types, e.g. AER status);
``flr_keep``
    bits kept over FLR but not over conventional reset (link control and similar).

Write hooks let capabilities and the header react to guest writes: each hook
covers a byte range and is called after the bytes have changed.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from pcidev.errors import ConfigSpaceError
from pcidev.pci import ids

__all__ = [
    "WriteHook", "ReadHook", "ResetKind", "ConfigSpace",
]

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

# Typed once so that the accessors return an int with no cast per call.
_u16_unpack: Callable[[ReadableBuffer, int], tuple[int]] = _U16.unpack_from
_u32_unpack: Callable[[ReadableBuffer, int], tuple[int]] = _U32.unpack_from

WriteHook = Callable[[int, int, int, int], None]
"""``hook(offset, size, old_value, new_value)``: called after a guest write
overlapping the hook's range, with the whole access as the guest made it."""

ReadHook = Callable[[int, int], int | None]
"""``hook(offset, size) -> value | None``: may refresh ``data`` before a read
(return None) or return the value to read directly."""


class ResetKind(enum.Enum):
    """The resets a PCI function distinguishes."""

    #: Power applied: everything, sticky bits included, returns to its default.
    POWER_ON = "power-on"
    #: Conventional (hot, warm or cold-without-power-loss) reset: sticky bits survive.
    CONVENTIONAL = "conventional"
    #: Function Level Reset: sticky bits and link-specific fields survive.
    FLR = "flr"


class ConfigSpace:
    """A function's configuration space (256 bytes for PCI, 4096 for PCIe).

    :param size: 256 or 4096.
    """

    __slots__ = ("size", "data", "wmask", "w1cmask", "sticky", "flr_keep", "_defaults",
                 "_write_hooks", "_read_hooks")

    def __init__(self, size: int = ids.EXT_CONFIG_SPACE_SIZE) -> None:
        if size not in (ids.CONFIG_SPACE_SIZE, ids.EXT_CONFIG_SPACE_SIZE):
            raise ConfigSpaceError(f"config space size must be 256 or 4096, not {size}")
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self.sticky = bytearray(size)
        self.flr_keep = bytearray(size)
        self._defaults: bytes | None = None
        self._write_hooks: list[tuple[int, int, WriteHook]] = []
        self._read_hooks: list[tuple[int, int, ReadHook]] = []

    # -- checks -----------------------------------------------------------------
    def _check(self, offset: int, size: int) -> None:
        if size not in (1, 2, 4):
            raise ConfigSpaceError(f"config access size must be 1, 2 or 4 bytes, not {size}")
        if offset < 0 or offset + size > self.size:
            raise ConfigSpaceError(
                f"config access at {offset:#x}+{size} is outside the {self.size}-byte space")

    # -- device-side accessors (no masks) ----------------------------------------
    def get(self, offset: int, size: int) -> int:
        """Return the stored value of ``size`` bytes at ``offset`` (no read hooks)."""
        if size == 2 and 0 <= offset <= self.size - 2:
            return _u16_unpack(self.data, offset)[0]
        if size == 4 and 0 <= offset <= self.size - 4:
            return _u32_unpack(self.data, offset)[0]
        self._check_range(offset, size)
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        """Store ``value`` regardless of the write masks (device side)."""
        self._check_range(offset, size)
        self.data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def get8(self, offset: int) -> int:
        return self.data[offset]

    def get16(self, offset: int) -> int:
        return _u16_unpack(self.data, offset)[0]

    def get32(self, offset: int) -> int:
        return _u32_unpack(self.data, offset)[0]

    def set8(self, offset: int, value: int) -> None:
        self.set(offset, 1, value)

    def set16(self, offset: int, value: int) -> None:
        self.set(offset, 2, value)

    def set32(self, offset: int, value: int) -> None:
        self.set(offset, 4, value)

    def set_bits(self, offset: int, size: int, bits: int) -> None:
        """Set ``bits`` in the stored value (device side)."""
        self.set(offset, size, self.get(offset, size) | bits)

    def clear_bits(self, offset: int, size: int, bits: int) -> None:
        """Clear ``bits`` in the stored value (device side)."""
        self.set(offset, size, self.get(offset, size) & ~bits)

    def _set_mask(self, mask: bytearray, offset: int, size: int, bits: int) -> None:
        self._check_range(offset, size)
        mask[offset:offset + size] = (bits & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _check_range(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ConfigSpaceError(f"range {offset:#x}+{size} is outside the config space")

    def set_writable(self, offset: int, size: int, bits: int) -> None:
        """Make ``bits`` read-write for the guest (replaces the mask of these bytes)."""
        self._set_mask(self.wmask, offset, size, bits)

    def set_w1c(self, offset: int, size: int, bits: int) -> None:
        """Make ``bits`` write-1-to-clear for the guest (replaces the mask of these bytes)."""
        self._set_mask(self.w1cmask, offset, size, bits)

    def set_sticky(self, offset: int, size: int, bits: int) -> None:
        """Mark ``bits`` as sticky: kept over conventional reset and FLR."""
        self._set_mask(self.sticky, offset, size, bits)

    def set_flr_keep(self, offset: int, size: int, bits: int) -> None:
        """Mark ``bits`` as kept over FLR (but reset by a conventional reset)."""
        self._set_mask(self.flr_keep, offset, size, bits)

    # -- hooks ------------------------------------------------------------------
    def add_write_hook(self, offset: int, size: int, hook: WriteHook) -> None:
        """Call ``hook`` after every guest write overlapping ``[offset, offset+size)``."""
        self._check_range(offset, size)
        self._write_hooks.append((offset, offset + size, hook))

    def add_read_hook(self, offset: int, size: int, hook: ReadHook) -> None:
        """Call ``hook`` before every guest read overlapping ``[offset, offset+size)``."""
        self._check_range(offset, size)
        self._read_hooks.append((offset, offset + size, hook))

    # -- guest-side accessors ------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """A guest configuration read.

        :raises ConfigSpaceError: on a bad size or an access past the end.
        """
        self._check(offset, size)
        end = offset + size
        for start, stop, hook in self._read_hooks:
            if offset < stop and start < end:
                value = hook(offset, size)
                if value is not None:
                    return value & ((1 << (8 * size)) - 1)
        return int.from_bytes(self.data[offset:end], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest configuration write, applying the write masks byte by byte.

        :raises ConfigSpaceError: on a bad size or an access past the end.
        """
        self._check(offset, size)
        value &= (1 << (8 * size)) - 1
        end = offset + size
        old = int.from_bytes(self.data[offset:end], "little")
        data, wmask, w1c = self.data, self.wmask, self.w1cmask
        for i in range(size):
            b = (value >> (8 * i)) & 0xFF
            pos = offset + i
            m = wmask[pos]
            cur = (data[pos] & ~m) | (b & m)
            cur &= ~(b & w1c[pos])
            data[pos] = cur & 0xFF
        for start, stop, hook in self._write_hooks:
            if offset < stop and start < end:
                hook(offset, size, old, value)

    # -- loading --------------------------------------------------------------------
    #: the header bytes a device never changes after realize and a guest cannot write:
    #: IDs, revision and class, header type, subsystem IDs, capabilities pointer, interrupt
    #: pin -- and, through the write mask, the read-only bits of the BARs and the ROM BAR
    #: (their type and size)
    FIXED_HEADER: tuple[tuple[int, int, str], ...] = (
        (ids.VENDOR_ID, 4, "vendor/device ID"),
        (ids.REVISION_ID, 4, "revision/class"),
        (ids.HEADER_TYPE, 1, "header type"),
        (ids.SUBSYSTEM_VENDOR_ID, 4, "subsystem IDs"),
        (ids.CAPABILITY_LIST, 1, "capabilities pointer"),
        (ids.INTERRUPT_PIN, 1, "interrupt pin"),
    )

    def load_problem(self, loaded: bytes) -> tuple[str, int] | None:
        """Why config space ``loaded`` (a migration stream's) cannot replace this one, as
        ``(reason, offset)``, or None: a byte of :attr:`FIXED_HEADER` differs, or a bit of a
        BAR or the ROM BAR that no write can change (type, size) does. A loaded state must be
        one this device could be in; its writable and device-set bits are the device's to
        check.

        :param loaded: the stream's config space (as long as this one).
        """
        data, wmask = self.data, self.wmask
        if len(loaded) != len(data):
            return f"config space is {len(loaded)} bytes, this device has {len(data)}", 0
        for off, size, what in self.FIXED_HEADER:
            if loaded[off:off + size] != data[off:off + size]:
                return (f"{what} at {off:#x} is {bytes(loaded[off:off + size]).hex()}, "
                        f"this device's is {bytes(data[off:off + size]).hex()}"), off
        bars = [*range(ids.BASE_ADDRESS_0, ids.BASE_ADDRESS_0 + 24), *range(ids.ROM_ADDRESS, ids.ROM_ADDRESS + 4)]
        for off in bars:
            if (loaded[off] ^ data[off]) & ~wmask[off] & 0xFF:
                return (f"read-only BAR bits at {off:#x} differ ({loaded[off]:#04x}, this device's "
                        f"{data[off]:#04x}: type or size)"), off
        return None

    # -- reset ----------------------------------------------------------------------
    def freeze_defaults(self) -> None:
        """Record the current contents as the reset defaults (called at realize)."""
        self._defaults = bytes(self.data)

    @property
    def defaults(self) -> bytes:
        """The contents a power-on reset restores."""
        if self._defaults is None:
            raise ConfigSpaceError("config space defaults were never frozen (device not realized)")
        return self._defaults

    def reset(self, kind: ResetKind) -> None:
        """Restore the defaults, keeping what ``kind`` keeps."""
        defaults = self.defaults
        if kind is ResetKind.POWER_ON:
            self.data[:] = defaults
            return
        # the whole space as one integer: a byte loop costs milliseconds per reset
        keep = int.from_bytes(self.sticky, "little")
        if kind is not ResetKind.CONVENTIONAL:
            keep |= int.from_bytes(self.flr_keep, "little")
        data = int.from_bytes(self.data, "little") & keep | int.from_bytes(defaults, "little") & ~keep
        self.data[:] = data.to_bytes(len(self.data), "little")
