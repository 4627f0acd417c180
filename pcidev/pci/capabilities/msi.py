"""MSI capability (ID 05h): 32- or 64-bit addresses, multiple messages,
optional per-vector masking.

Layout (byte offsets from the capability)::

    00  id | next | message control (16)
    04  message address [31:0]
    08  message upper address      (64-bit only)
    08/0C  message data (16)
    0C/10  mask bits               (per-vector masking only)
    10/14  pending bits            (per-vector masking only)

Message control: bit 0 enable, bits 3:1 multiple message capable (log2),
bits 6:4 multiple message enable (log2), bit 7 64-bit, bit 8 per-vector masking.
"""

from __future__ import annotations

from pcidev.errors import ConfigError, IrqError
from pcidev.pci import ids
from pcidev.pci.capabilities.base import Capability
from pcidev.pci.config import ResetKind

__all__ = [
    "CTRL", "ADDR_LO", "CTRL_ENABLE", "CTRL_MMC_SHIFT", "CTRL_MME_SHIFT", "CTRL_MME_MASK", "CTRL_64BIT",
    "CTRL_MASKBIT", "MsiCapability",
]

#: Message Control register offset in the MSI capability (PCI_MSI_FLAGS)
CTRL = 2
#: Message Address (low 32 bits) register offset in the MSI capability (PCI_MSI_ADDRESS_LO)
ADDR_LO = 4
#: Message Control bit: MSI Enable (PCI_MSI_FLAGS_ENABLE)
CTRL_ENABLE = 0x0001
#: Message Control shift of the Multiple Message Capable field, log2 of the vectors (mask PCI_MSI_FLAGS_QMASK)
CTRL_MMC_SHIFT = 1
#: Message Control shift of the Multiple Message Enable field, log2 of the vectors (mask PCI_MSI_FLAGS_QSIZE)
CTRL_MME_SHIFT = 4
#: Message Control mask of the Multiple Message Enable field (PCI_MSI_FLAGS_QSIZE)
CTRL_MME_MASK = 0x0070
#: Message Control bit: 64 Bit Address Capable (PCI_MSI_FLAGS_64BIT)
CTRL_64BIT = 0x0080
#: Message Control bit: Per-Vector Masking Capable (PCI_MSI_FLAGS_MASKBIT)
CTRL_MASKBIT = 0x0100


class MsiCapability(Capability):
    """MSI with ``nvectors`` messages (1, 2, 4, 8, 16 or 32).

    :param nvectors: messages the function can use (rounded per the spec's log2 encoding).
    :param address64: 64-bit message address.
    :param per_vector_mask: implement mask and pending bits.
    """

    CAP_ID = ids.CapId.MSI

    def __init__(self, nvectors: int = 1, *, address64: bool = True, per_vector_mask: bool = True,
                 offset: int | None = None) -> None:
        super().__init__(offset=offset)
        if nvectors not in (1, 2, 4, 8, 16, 32):
            raise ConfigError(f"MSI supports 1, 2, 4, 8, 16 or 32 vectors, not {nvectors}")
        self.nvectors = nvectors
        self.address64 = address64
        self.per_vector_mask = per_vector_mask

    @property
    def size(self) -> int:
        base = 0x0E if self.address64 else 0x0A
        if self.per_vector_mask:
            base += 0x0A
        return (base + 3) & ~3

    @property
    def _data(self) -> int:
        return 0x0C if self.address64 else 0x08

    @property
    def _mask(self) -> int:
        return self._data + 4

    @property
    def _pending(self) -> int:
        return self._data + 8

    def setup(self) -> None:
        log2 = self.nvectors.bit_length() - 1
        ctrl = log2 << CTRL_MMC_SHIFT
        if self.address64:
            ctrl |= CTRL_64BIT
        if self.per_vector_mask:
            ctrl |= CTRL_MASKBIT
        self.set(CTRL, 2, ctrl)
        self.writable(CTRL, 2, CTRL_ENABLE | CTRL_MME_MASK)
        self.writable(ADDR_LO, 4, 0xFFFFFFFC)
        if self.address64:
            self.writable(8, 4, 0xFFFFFFFF)
        self.writable(self._data, 2, 0xFFFF)
        if self.per_vector_mask:
            self.writable(self._mask, 4, (1 << self.nvectors) - 1 if self.nvectors < 32 else 0xFFFFFFFF)
            self.on_write(self._mask, 4, self._mask_written)
        self.on_write(CTRL, 2, self._ctrl_written)

    # -- state ---------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """MSI enable bit."""
        return bool(self.get(CTRL, 2) & CTRL_ENABLE)

    @property
    def enabled_vectors(self) -> int:
        """Vectors the guest allocated (2**MME, capped at the capable count)."""
        mme = (self.get(CTRL, 2) & CTRL_MME_MASK) >> CTRL_MME_SHIFT
        return min(1 << mme, self.nvectors)

    @property
    def address(self) -> int:
        lo = self.get(ADDR_LO, 4)
        hi = self.get(8, 4) if self.address64 else 0
        return (hi << 32) | lo

    @property
    def data(self) -> int:
        return self.get(self._data, 2)

    def is_masked(self, vector: int) -> bool:
        return self.per_vector_mask and bool(self.get(self._mask, 4) >> vector & 1)

    @property
    def pending(self) -> int:
        return self.get(self._pending, 4) if self.per_vector_mask else 0

    def _ctrl_written(self, off: int, size: int, old: int, value: int) -> None:
        # MME may not exceed MMC: clamp what the guest wrote
        ctrl = self.get(CTRL, 2)
        mme = (ctrl & CTRL_MME_MASK) >> CTRL_MME_SHIFT
        mmc = (ctrl >> CTRL_MMC_SHIFT) & 7
        if mme > mmc:
            self.set(CTRL, 2, (ctrl & ~CTRL_MME_MASK) | (mmc << CTRL_MME_SHIFT))
        with self.irq.lock:
            self._deliver_unmasked()
            self.irq.update_intx()

    def _mask_written(self, off: int, size: int, old: int, value: int) -> None:
        with self.irq.lock:  # see MsixCapability._ctrl_written
            self._deliver_unmasked()

    def _deliver_unmasked(self) -> None:
        pend = self.pending
        if not pend or not self.enabled:
            return
        for vector in range(self.enabled_vectors):
            if pend >> vector & 1 and not self.is_masked(vector):
                pend &= ~(1 << vector)
                self.set(self._pending, 4, pend)
                self._send(vector)

    def _send(self, vector: int) -> None:
        nvec = self.enabled_vectors
        data = (self.data & ~(nvec - 1)) | vector
        self.irq.send(vector, self.address, data)

    def notify(self, vector: int) -> None:
        """Send message ``vector``, or latch its pending bit while masked.

        The guest may allocate fewer vectors than the function is capable of (Multiple
        Message Enable below Multiple Message Capable): a function may then change only
        the low log2(allocated) bits of the message data, so a vector past the allocated
        ones is sent as ``vector mod allocated`` (several sources share a message, as the
        PCI specification lets a function do), never refused -- the guest chose the count.

        :raises IrqError: if ``vector`` is not one the function is capable of (a device bug).
        """
        if not 0 <= vector < self.nvectors:
            raise IrqError(f"MSI vector {vector} does not exist (the function is capable of {self.nvectors})")
        vector %= self.enabled_vectors
        if self.is_masked(vector):
            self.set(self._pending, 4, self.pending | (1 << vector))
            return
        self._send(vector)

    def reset(self, kind: ResetKind) -> None:
        pass  # everything lives in config space, restored by the config reset
