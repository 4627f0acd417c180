"""``edu``: a small teaching device with registers, a DMA engine and MSI-X.

Modelled loosely on QEMU's ``edu`` device, with a descriptor-ring copy engine
so that DMA, interrupts and migration have something real to carry.

BAR0 (4 KiB, registers; MSI-X table at 0x800, PBA at 0xC00)::

    0x00  ID          RO   0x010000ED
    0x04  LIVENESS    RW   reads back the bitwise inverse of what was written
    0x08  FACTORIAL   RW   write n: computes n! (mod 2**32); read the result
    0x20  STATUS      RW   bit 7: raise vector 1 / INTx when a factorial completes
    0x24  IRQ_STATUS  RO   pending interrupt reasons (bit 0 factorial, bit 1 DMA)
    0x60  IRQ_RAISE   WO   sets IRQ_STATUS bits and raises the interrupt
    0x64  IRQ_ACK     WO   clears IRQ_STATUS bits (INTx deasserts when 0)
    0x100 RING_BASE   RW   64-bit guest address of the descriptor ring
    0x108 RING_SIZE   RW   entries (power of two, 1..4096)
    0x10C RING_TAIL   RW   doorbell: index after the last posted descriptor
    0x110 RING_HEAD   RO   index of the next descriptor the engine takes
    0x114 RING_CTRL   RW   bit 0 enable
    0x118 ERRORS      RO   descriptors completed with an error

Descriptor (32 bytes, little-endian)::

    0x00 src u64 | 0x08 dst u64 | 0x10 len u32 | 0x14 flags u32 (bit 0: interrupt)
    0x18 status u32 (device: 1 done, 2 DMA error, 3 bad length) | 0x1C crc32c u32 (device)

The engine copies ``len`` bytes from ``src`` to ``dst`` in guest memory,
writes the CRC-32C of the data and the status, and raises MSI-X vector 0
(or INTx) when asked. Descriptors are processed when the tail is written, or
in bounded steps with :meth:`EduDevice.process` when ``autorun`` is off.
"""

from __future__ import annotations

import struct

import crc32c

from pcidev.bar import Access, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.errors import DmaError
from pcidev.pci.config import ResetKind

ID_VALUE = 0x010000ED
DESC = struct.Struct("<QQII II")
DESC_SIZE = 32
STATUS_DONE = 1
STATUS_DMA_ERROR = 2
STATUS_BAD_LENGTH = 3
MAX_LEN = 1 << 20
IRQ_FACT = 0x1
IRQ_DMA = 0x2
VEC_DMA = 0
VEC_FACT = 1


class EduDevice(PciDevice):
    """The edu teaching device (see the module docstring for its registers).

    :param autorun: process descriptors as soon as the tail is written (else
        only in :meth:`process`, which lets tests stop it mid-ring).
    """

    TYPE_NAME = "edu"
    VENDOR_ID = 0x1234
    DEVICE_ID = 0x11E8
    CLASS_CODE = 0x00FF00
    REVISION = 0x10

    def __init__(self, *, name: str | None = None, autorun: bool = True) -> None:
        self.autorun = autorun
        super().__init__(name=name)

    def describe(self) -> None:
        regs = RegisterMap(4096, name="edu-bar0")
        regs.add(Register("ID", 0x00, 4, Access.RO, reset=ID_VALUE))
        regs.add(Register("LIVENESS", 0x04, 4, on_read=lambda r: ~r.value & 0xFFFFFFFF))
        regs.add(Register("FACTORIAL", 0x08, 4, on_write=self._factorial))
        regs.add(Register("STATUS", 0x20, 4, mask=0x80))
        regs.add(Register("IRQ_STATUS", 0x24, 4, Access.RO))
        regs.add(Register("IRQ_RAISE", 0x60, 4, Access.WO, on_write=self._irq_raise))
        regs.add(Register("IRQ_ACK", 0x64, 4, Access.WO, on_write=self._irq_ack))
        regs.add(Register("RING_BASE", 0x100, 8, mask=~0x1F & (2**64 - 1)))
        regs.add(Register("RING_SIZE", 0x108, 4, reset=0))
        regs.add(Register("RING_TAIL", 0x10C, 4, on_write=self._doorbell))
        regs.add(Register("RING_HEAD", 0x110, 4, Access.RO))
        regs.add(Register("RING_CTRL", 0x114, 4, mask=0x1))
        regs.add(Register("ERRORS", 0x118, 4, Access.RO))
        self.regs = regs
        self.add_mem_bar(0, 4096, regs)
        self.add_msix(2, bar=0, table_offset=0x800, pba_offset=0xC00)
        self.add_msi(2)
        self.add_standard_pcie_caps()
        #: descriptors completed since power-on (device-internal statistic)
        self.completed = 0

    # -- registers -------------------------------------------------------------------
    def _factorial(self, reg: Register, new: int, old: int) -> None:
        result = 1
        for i in range(2, min(new, 64) + 1):
            result = (result * i) & 0xFFFFFFFF
        reg.value = result if new <= 64 else 0
        if self.regs["STATUS"].value & 0x80:
            self._raise(IRQ_FACT, VEC_FACT)

    def _irq_raise(self, reg: Register, new: int, old: int) -> None:
        self._raise(new, VEC_FACT)

    def _irq_ack(self, reg: Register, new: int, old: int) -> None:
        st = self.regs["IRQ_STATUS"]
        st.value &= ~new & 0xFFFFFFFF
        if st.value == 0:
            self.irq.set_intx(False)

    def _raise(self, reason: int, vector: int) -> None:
        self.regs["IRQ_STATUS"].value |= reason
        if not self.irq.notify(vector):
            self.irq.set_intx(True)

    def _doorbell(self, reg: Register, new: int, old: int) -> None:
        size = self.regs["RING_SIZE"].value
        if size == 0 or size & (size - 1) or size > 4096:
            reg.value = old
            return
        reg.value = new % size
        if self.autorun:
            self.process()

    # -- DMA engine ------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Descriptors posted but not yet processed."""
        size = self.regs["RING_SIZE"].value
        if not size:
            return 0
        return (self.regs["RING_TAIL"].value - self.regs["RING_HEAD"].value) % size

    def process(self, budget: int | None = None) -> int:
        """Process up to ``budget`` posted descriptors (all if None).

        :returns: how many were processed.
        """
        if not self.regs["RING_CTRL"].value & 1 or not self.bus_master:
            return 0
        size = self.regs["RING_SIZE"].value
        base = self.regs["RING_BASE"].value
        head_reg = self.regs["RING_HEAD"]
        done = 0
        raise_irq = False
        mem = self.dma
        while self.pending and (budget is None or done < budget):
            addr = base + head_reg.value * DESC_SIZE
            try:
                src, dst, length, flags, _st, _crc = mem.read_struct(DESC, addr)
            except DmaError:
                self.regs["ERRORS"].value += 1
                head_reg.value = (head_reg.value + 1) % size
                done += 1
                continue
            status, crc = STATUS_DONE, 0
            if length == 0 or length > MAX_LEN:
                status = STATUS_BAD_LENGTH
            else:
                try:
                    data = mem.read(src, length)
                    mem.write(dst, data)
                    crc = crc32c.crc32c(data)
                except DmaError:
                    status = STATUS_DMA_ERROR
            if status != STATUS_DONE:
                self.regs["ERRORS"].value += 1
            try:
                mem.write_struct(struct.Struct("<II"), addr + 0x18, status, crc)
            except DmaError:
                pass
            head_reg.value = (head_reg.value + 1) % size
            self.completed += 1
            done += 1
            raise_irq |= bool(flags & 1)
        if raise_irq:
            self._raise(IRQ_DMA, VEC_DMA)
        return done

    def on_reset(self, kind: ResetKind) -> None:
        # the register map was reset with the BAR handlers
        if kind is ResetKind.POWER_ON:
            self.completed = 0
