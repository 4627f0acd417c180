"""``howto-mailbox``: the device of the how-to "Expose a sparse-mmapped page".

BAR0 (4 KiB, trapped registers)::

    0x00  SEQ    RO  how many times the device posted a message
    0x04  POST   WO  the device writes the value as a message into the mailbox page

BAR2 (8 KiB, RAM backed by a memfd: :class:`~pcidev.bar.RamBacking`)::

    0x0000  page 0: trapped (every access is a message to the device process)
    0x1000  page 1: the mailbox, offered for mmap (a sparse-mmap area): the client maps
            it and reads the messages with no message to the device process at all

A RAM BAR has no registers: every access, trapped or mapped, reads and writes the memfd.
The framework migrates BAR2's contents (its memfd travels with the stream and the
destination adopts it); the device's own state is SEQ.
"""

from __future__ import annotations

import struct

import attrs

from pcidev import hookimpl
from pcidev.bar import Access, RamBacking, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.registry import DeviceRegistry
from pcidev.vmstate import U32, vmstate

PAGE = 4096
MAILBOX = PAGE  # offset of the mapped page in BAR2


# version 2: the framework migrates the RAM BAR (version 1 carried its bytes here)
@vmstate("howto-mailbox", version=2, min_version=2)
@attrs.frozen
class MailboxState:
    """SEQ (the framework migrates the RAM BAR's contents)."""

    seq: U32


# [device]
class MailboxDevice(PciDevice):
    """Registers in BAR0, a RAM BAR2 whose second page may be mmapped."""

    TYPE_NAME = "howto-mailbox"
    VENDOR_ID = 0x1234
    DEVICE_ID = 0x3A11
    VMSTATE = MailboxState

    def describe(self) -> None:
        """BAR0 registers; BAR2 RAM with one sparse-mmap area (the mailbox page)."""
        regs = RegisterMap(4096, name="mailbox-bar0")
        regs.add(Register("SEQ", 0x00, 4, Access.RO))
        regs.add(Register("POST", 0x04, 4, Access.WO, on_write=self._post))
        self.regs = regs
        self.add_mem_bar(0, 4096, regs)
        self.ram = RamBacking(2 * PAGE, sparse_areas=[(MAILBOX, PAGE)], name="mailbox-bar2")
        self.add_mem_bar(2, 2 * PAGE, self.ram, bits64=True)

    def _post(self, reg: Register, new: int, old: int) -> None:
        """Write (sequence, value) at the start of the mailbox page."""
        seq = self.regs["SEQ"]
        seq.value = (seq.value + 1) & 0xFFFFFFFF
        struct.pack_into("<II", self.ram.mem, MAILBOX, seq.value, new)
# [end device]

    def get_device_state(self) -> MailboxState:
        """SEQ."""
        return MailboxState(seq=self.regs["SEQ"].value)

    def set_device_state(self, state: MailboxState) -> None:
        """Put SEQ back (the framework has already adopted the source's BAR2 memfd)."""
        self.regs["SEQ"].value = state.seq

    def on_close(self) -> None:
        """Release the RAM BAR's memfd."""
        self.ram.close()


@hookimpl
def pcidev_register_devices(registry: DeviceRegistry) -> None:
    """Register ``howto-mailbox`` when this module is loaded as a plugin (``-p shared_page``)."""
    registry.add_device(MailboxDevice)
