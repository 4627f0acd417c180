"""Capability objects and the auto-linked capability lists.

A device adds :class:`Capability` instances (standard list, from the
capabilities pointer at 0x34) and :class:`ExtCapability` instances (extended
list, from 0x100). At realize the :class:`CapabilityList` gives each one a byte
offset (or honours the offset it pinned), writes the headers with the ``next``
links, and lets each capability write its registers and masks. All offsets are
byte offsets.

A capability sees the function it belongs to only through
:class:`FunctionContext` (configuration space, the interrupt operations it
needs, a reset request), so it can be tested with a small fake instead of a
whole :class:`~pcidev.device.PciDevice`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import ClassVar, Protocol, TypeVar

from pcidev.errors import ConfigError
from pcidev.pci import ids
from pcidev.pci.config import ConfigSpace, ResetKind, WriteHook

__all__ = ["InterruptPort", "FunctionContext", "Capability", "ExtCapability", "CapabilityList"]


class InterruptPort(Protocol):
    """The interrupt operations a capability uses (an
    :class:`~pcidev.irq.InterruptController` provides them)."""

    #: held while a capability changes masks and delivers pending messages
    lock: threading.RLock

    def send(self, vector: int, address: int, data: int) -> None:
        """Deliver one MSI/MSI-X message (dropped while bus mastering is off)."""

    def update_intx(self) -> None:
        """Recompute the INTx line level (after an interrupt mode change)."""


class FunctionContext(Protocol):
    """What a capability sees of the PCI function it is installed in."""

    #: the function's configuration space
    config: ConfigSpace
    #: the function's interrupt delivery
    irq: InterruptPort

    def request_reset(self, kind: ResetKind) -> None:
        """Reset the function now (a Function Level Reset, or the conventional
        reset of a D3hot to D0 transition)."""


class Capability:
    """A capability in the standard list.

    Subclasses set ``CAP_ID`` and ``SIZE`` and override :meth:`setup`
    to write their registers through the relative helpers below.

    :param offset: pin the capability at this byte offset (else one is chosen).
    """

    CAP_ID: ClassVar[int] = 0
    SIZE: ClassVar[int] = 4
    #: header size in bytes (2 for a standard capability: id, next).
    HEADER: ClassVar[int] = 2

    # Bound by install(), before any register helper or interrupt delivery can run; the
    # helpers read them on every access (MSI-X delivery included), so they are plain
    # attributes rather than checked properties.
    #: the function's configuration space
    config: ConfigSpace
    #: the function's interrupt delivery
    irq: InterruptPort
    #: the byte offset the capability was installed at (the base of the relative helpers)
    _base: int

    def __init__(self, *, offset: int | None = None) -> None:
        #: the byte offset: the pinned one, else the one chosen at realize (None until then)
        self.offset: int | None = offset
        #: the function the capability is installed in (None until realize)
        self.device: FunctionContext | None = None

    @property
    def size(self) -> int:
        """Size of the capability structure in bytes."""
        return self.SIZE

    def __repr__(self) -> str:
        off = "?" if self.offset is None else f"{self.offset:#x}"
        return f"<{type(self).__name__} at {off}>"

    # -- relative helpers --------------------------------------------------------
    def get(self, rel: int, size: int) -> int:
        return self.config.get(self._base + rel, size)

    def set(self, rel: int, size: int, value: int) -> None:
        self.config.set(self._base + rel, size, value)

    def writable(self, rel: int, size: int, bits: int) -> None:
        self.config.set_writable(self._base + rel, size, bits)

    def w1c(self, rel: int, size: int, bits: int) -> None:
        self.config.set_w1c(self._base + rel, size, bits)

    def sticky(self, rel: int, size: int, bits: int) -> None:
        self.config.set_sticky(self._base + rel, size, bits)

    def flr_keep(self, rel: int, size: int, bits: int) -> None:
        self.config.set_flr_keep(self._base + rel, size, bits)

    def on_write(self, rel: int, size: int, hook: WriteHook) -> None:
        """Call ``hook(offset, size, old, value)`` after guest writes to ``[rel, rel+size)``."""
        self.config.add_write_hook(self._base + rel, size, hook)

    # -- lifecycle ------------------------------------------------------------------
    def install(self, device: FunctionContext, offset: int) -> None:
        """Bind to ``device`` at ``offset`` and write registers (called by the list).

        :param device: the function (anything providing :class:`FunctionContext`).
        :param offset: the byte offset in configuration space.
        """
        self.device = device
        self.config = device.config
        self.irq = device.irq
        self.offset = self._base = offset
        self.setup()

    def setup(self) -> None:
        """Write the registers, masks and hooks. Override in subclasses."""

    def reset(self, kind: ResetKind) -> None:
        """React to a reset after config space was restored. Override if the
        capability keeps state outside config space."""

    def config_loaded(self) -> None:
        """Config space was replaced wholesale (a vmstate load or its rollback).
        Override if the capability keeps state derived from its registers outside
        config space: rebuild it from the registers. Must not touch config space or
        signal anything."""


class ExtCapability(Capability):
    """A capability in the PCIe extended list (4-byte header: id, version, next)."""

    VERSION: ClassVar[int] = 1
    HEADER: ClassVar[int] = 4


CapT = TypeVar("CapT", bound=Capability)


class CapabilityList:
    """Places capabilities and links them.

    :param device: the owning function.
    """

    def __init__(self, device: FunctionContext) -> None:
        self.device = device
        self.standard: list[Capability] = []
        self.extended: list[ExtCapability] = []

    def add(self, cap: CapT) -> CapT:
        """Add ``cap`` to the standard or extended list (by its type)."""
        if cap.device is not None:
            raise ConfigError(f"{cap!r} is already installed in a device")
        if isinstance(cap, ExtCapability):
            self.extended.append(cap)
        else:
            self.standard.append(cap)
        return cap

    def find(self, cap_type: type[CapT]) -> CapT | None:
        """First capability of ``cap_type``, or None."""
        for cap in (*self.standard, *self.extended):
            if isinstance(cap, cap_type):
                return cap
        return None

    def __iter__(self) -> Iterator[Capability]:
        return iter((*self.standard, *self.extended))

    @staticmethod
    def _place(caps: Sequence[Capability], start: int, end: int, what: str) -> list[int]:
        """Check the pinned offsets and give every other capability the lowest free one.

        :returns: the offset of each capability, in the order of ``caps``.
        """
        taken: list[tuple[int, int, Capability]] = []
        for cap in caps:
            if cap.offset is not None:
                if cap.offset % 4 or cap.offset < start or cap.offset + cap.size > end:
                    raise ConfigError(f"{what} {cap!r} pinned at a bad offset")
                taken.append((cap.offset, cap.offset + cap.size, cap))
        taken.sort(key=lambda t: t[0])
        for (_a0, a1, c0), (b0, _b1, c1) in zip(taken, taken[1:], strict=False):
            if b0 < a1:
                raise ConfigError(f"{c0!r} and {c1!r} overlap")
        for cap in caps:
            if cap.offset is not None:
                continue
            pos = start
            for t0, t1, _ in sorted(taken, key=lambda t: t[0]):
                if pos + cap.size <= t0:
                    break
                pos = max(pos, (t1 + 3) & ~3)
            if pos + cap.size > end:
                raise ConfigError(f"no room for {what} {cap!r}")
            cap.offset = pos
            taken.append((pos, pos + cap.size, cap))
        offsets = []
        for cap in caps:
            assert cap.offset is not None  # pinned, or placed above
            offsets.append(cap.offset)
        return offsets

    def realize(self) -> None:
        """Choose offsets, write headers and links, and install every capability."""
        dev = self.device
        cfg = dev.config
        std = self._place(self.standard, ids.STD_CAP_START, ids.CONFIG_SPACE_SIZE, "capability")
        ext: list[tuple[int, ExtCapability]] = []
        if self.extended:
            if cfg.size < ids.EXT_CONFIG_SPACE_SIZE:
                raise ConfigError("extended capabilities need a 4 KiB config space")
            # the first extended capability must sit at 0x100
            if not any(c.offset == ids.EXT_CAP_START for c in self.extended):
                first = next((c for c in self.extended if c.offset is None), None)
                if first is None:
                    raise ConfigError("one extended capability must be at 0x100")
                first.offset = ids.EXT_CAP_START
            offsets = self._place(self.extended, ids.EXT_CAP_START, ids.EXT_CONFIG_SPACE_SIZE,
                                  "extended capability")
            # the one at 0x100 heads the chain, the others follow in the order added
            ext = sorted(zip(offsets, self.extended, strict=True), key=lambda t: t[0] != ids.EXT_CAP_START)
        # standard chain, in order of the list as added
        if std:
            cfg.set8(ids.CAPABILITY_LIST, std[0])
            cfg.set_bits(ids.STATUS, 2, ids.Status.CAP_LIST)
        for i, (off, cap) in enumerate(zip(std, self.standard, strict=True)):
            nxt = std[i + 1] if i + 1 < len(std) else 0
            cfg.set8(off, cap.CAP_ID)
            cfg.set8(off + 1, nxt)
            cap.install(dev, off)
        for i, (off, ecap) in enumerate(ext):
            nxt = ext[i + 1][0] if i + 1 < len(ext) else 0
            cfg.set32(off, (ecap.CAP_ID & 0xFFFF) | ((ecap.VERSION & 0xF) << 16) | (nxt << 20))
            ecap.install(dev, off)

    def reset(self, kind: ResetKind) -> None:
        for cap in self:
            cap.reset(kind)

    def config_loaded(self) -> None:
        """Tell every capability that config space was replaced (see
        :meth:`Capability.config_loaded`)."""
        for cap in self:
            cap.config_loaded()
