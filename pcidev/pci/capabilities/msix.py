"""MSI-X capability (ID 11h), with the table and the Pending Bit Array owned by
the framework.

Capability layout::

    00  id | next | message control (16)
    04  table offset [31:3] | table BIR [2:0]
    08  PBA offset [31:3]   | PBA BIR [2:0]

Message control: bits 10:0 table size − 1, bit 14 function mask, bit 15 enable.

Each table entry is 16 bytes: address low (bits 1:0 reserved), address high,
data, vector control (bit 0: mask; set at reset). The PBA holds one bit per
vector in quadwords; it is read-only to the guest.

A message raised while its vector (or the whole function) is masked sets its
pending bit; unmasking delivers it and clears the bit (PCI Local Bus spec,
MSI-X chapter).

The table and the PBA are state outside configuration space: a migration saves
them with :meth:`MsixCapability.snapshot` and puts them back with
:meth:`MsixCapability.restore` (:class:`MsixState`, the ``pcidev/msix``
vmstate description).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import attrs

from pcidev.errors import ConfigError, IrqError
from pcidev.pci import ids
from pcidev.pci.capabilities.base import Capability
from pcidev.pci.config import ResetKind
from pcidev.vmstate import VarBytes, vmstate

__all__ = [
    "CTRL", "TABLE", "PBA", "CTRL_ENABLE", "CTRL_MASKALL", "ENTRY_SIZE", "ENTRY_CTRL", "VECTOR_MASKED",
    "MAX_VECTORS", "MsixState", "MsixCapability",
]

#: Message Control register offset in the MSI-X capability (PCI_MSIX_FLAGS)
CTRL = 2
#: Table Offset/Table BIR register offset in the MSI-X capability (PCI_MSIX_TABLE)
TABLE = 4
#: PBA Offset/PBA BIR register offset in the MSI-X capability (PCI_MSIX_PBA)
PBA = 8
#: Message Control bit: MSI-X Enable (PCI_MSIX_FLAGS_ENABLE)
CTRL_ENABLE = 0x8000
#: Message Control bit: Function Mask, masks every vector (PCI_MSIX_FLAGS_MASKALL)
CTRL_MASKALL = 0x4000
#: Size in bytes of an MSI-X table entry (PCI_MSIX_ENTRY_SIZE)
ENTRY_SIZE = 16
#: Vector Control dword offset in an MSI-X table entry (PCI_MSIX_ENTRY_VECTOR_CTRL)
ENTRY_CTRL = 12
#: Vector Control bit: Mask Bit, set at reset (PCI_MSIX_ENTRY_CTRL_MASKBIT)
VECTOR_MASKED = 0x1

#: Most vectors an MSI-X table can have: the 11-bit Table Size field (PCI_MSIX_FLAGS_QSIZE) holds N - 1
MAX_VECTORS = 2048

_ENTRY = struct.Struct("<IIII")


@vmstate("pcidev/msix")
@attrs.frozen
class MsixState:
    """The MSI-X table (16 bytes per vector) and Pending Bit Array (a quadword per
    64 vectors), as the capability holds them."""

    table: VarBytes[MAX_VECTORS * ENTRY_SIZE]
    pba: VarBytes[MAX_VECTORS // 8]


class MsixCapability(Capability):
    """MSI-X with ``nvectors`` vectors whose table and PBA live in BARs.

    :param nvectors: 1..2048.
    :param table_bar: BAR index holding the table.
    :param table_offset: byte offset of the table in that BAR (8-byte aligned).
    :param pba_bar: BAR index holding the PBA.
    :param pba_offset: byte offset of the PBA in that BAR (8-byte aligned).
    """

    CAP_ID = ids.CapId.MSIX
    SIZE = 12

    def __init__(self, nvectors: int, *, table_bar: int, table_offset: int, pba_bar: int,
                 pba_offset: int, offset: int | None = None) -> None:
        super().__init__(offset=offset)
        if not 1 <= nvectors <= MAX_VECTORS:
            raise ConfigError(f"MSI-X supports 1..{MAX_VECTORS} vectors, not {nvectors}")
        for name, bar, off in (("table", table_bar, table_offset), ("PBA", pba_bar, pba_offset)):
            if not 0 <= bar <= 5 or off % 8 or off < 0:
                raise ConfigError(f"MSI-X {name} BAR {bar} offset {off:#x} is invalid")
        self.nvectors = nvectors
        self.table_bar = table_bar
        self.table_offset = table_offset
        self.pba_bar = pba_bar
        self.pba_offset = pba_offset
        self.table = bytearray(nvectors * ENTRY_SIZE)
        self.pba = bytearray(((nvectors + 63) // 64) * 8)
        self._reset_table()
        t0, t1 = table_offset, table_offset + len(self.table)
        p0, p1 = pba_offset, pba_offset + len(self.pba)
        if table_bar == pba_bar and t0 < p1 and p0 < t1:
            raise ConfigError("MSI-X table and PBA overlap")

    @property
    def table_size(self) -> int:
        return len(self.table)

    @property
    def pba_size(self) -> int:
        return len(self.pba)

    def setup(self) -> None:
        self.set(CTRL, 2, self.nvectors - 1)
        self.writable(CTRL, 2, CTRL_ENABLE | CTRL_MASKALL)
        self.set(TABLE, 4, self.table_offset | self.table_bar)
        self.set(PBA, 4, self.pba_offset | self.pba_bar)
        self.on_write(CTRL, 2, self._ctrl_written)

    def _reset_table(self) -> None:
        self.table[:] = bytes(len(self.table))
        for v in range(self.nvectors):
            self.table[v * ENTRY_SIZE + ENTRY_CTRL] = VECTOR_MASKED
        self.pba[:] = bytes(len(self.pba))

    # -- state --------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.get(CTRL, 2) & CTRL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.get(CTRL, 2) & CTRL_MASKALL)

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """``(address, data, masked)`` of a table entry."""
        lo, hi, data, ctrl = _ENTRY.unpack_from(self.table, vector * ENTRY_SIZE)
        return (hi << 32) | (lo & ~3), data, bool(ctrl & VECTOR_MASKED)

    def is_pending(self, vector: int) -> bool:
        return bool(self.pba[vector >> 3] >> (vector & 7) & 1)

    def _set_pending(self, vector: int, on: bool) -> None:
        if on:
            self.pba[vector >> 3] |= 1 << (vector & 7)
        else:
            self.pba[vector >> 3] &= ~(1 << (vector & 7)) & 0xFF

    def notify(self, vector: int) -> None:
        """Send ``vector``'s message, or latch its pending bit while masked.

        :raises IrqError: for a vector the table does not have.
        """
        if not 0 <= vector < self.nvectors:
            raise IrqError(f"MSI-X vector {vector} out of range (table has {self.nvectors})")
        address, data, masked = self.entry(vector)
        if masked or self.function_masked or not self.enabled:
            self._set_pending(vector, True)
            return
        self.irq.send(vector, address, data)

    def _deliver_pending(self, vectors: Iterable[int]) -> None:
        if not self.enabled or self.function_masked:
            return
        for v in vectors:
            if self.is_pending(v):
                address, data, masked = self.entry(v)
                if not masked:
                    self._set_pending(v, False)
                    self.irq.send(v, address, data)

    def _ctrl_written(self, off: int, size: int, old: int, value: int) -> None:
        # Under the interrupt lock: a notify() racing with this write has either
        # latched its pending bit already (delivered here) or sees the new mask.
        with self.irq.lock:
            self._deliver_pending(range(self.nvectors))
            self.irq.update_intx()

    # -- BAR side -------------------------------------------------------------------
    def table_read(self, offset: int, size: int) -> int:
        """A guest read of ``size`` bytes at ``offset`` within the table."""
        return int.from_bytes(self.table[offset:offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        """A guest write within the table; unmasking a vector delivers its pending message."""
        raw = bytearray(value.to_bytes(size, "little"))
        first = offset // ENTRY_SIZE
        last = (offset + size - 1) // ENTRY_SIZE
        for i in range(size):
            pos = offset + i
            rel = pos % ENTRY_SIZE
            if rel == 0:
                raw[i] &= 0xFC  # address bits 1:0 are reserved
            elif rel == ENTRY_CTRL:
                raw[i] &= VECTOR_MASKED
            elif rel > ENTRY_CTRL:
                raw[i] = 0  # reserved vector-control bits
        self.table[offset:offset + size] = raw
        self._deliver_pending(range(first, last + 1))

    def pba_read(self, offset: int, size: int) -> int:
        """A guest read within the PBA."""
        return int.from_bytes(self.pba[offset:offset + size], "little")

    def pba_write(self, offset: int, size: int, value: int) -> None:
        """Writes to the PBA are ignored (it is read-only)."""

    def reset(self, kind: ResetKind) -> None:
        self._reset_table()

    # -- migration ------------------------------------------------------------------
    def snapshot(self) -> MsixState:
        """The table and the PBA as they are now (copies)."""
        return MsixState(table=bytes(self.table), pba=bytes(self.pba))

    def restore(self, state: MsixState) -> None:
        """Put back a table and PBA from :meth:`snapshot` (no message is sent).

        :param state: a state of a capability with as many vectors.
        :raises ConfigError: the state's table or PBA has another size.
        """
        if len(state.table) != len(self.table) or len(state.pba) != len(self.pba):
            raise ConfigError(f"MSI-X state of {len(state.table)}+{len(state.pba)} bytes does not fit "
                              f"a table of {self.nvectors} vectors")
        self.table[:] = state.table
        self.pba[:] = state.pba
