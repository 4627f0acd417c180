"""Advanced Error Reporting extended capability (ID 0001h), version 2.

Layout::

    00  header: id 0001h, version 2, next
    04  uncorrectable error status (RW1CS)   08  uncorrectable error mask (RWS)
    0C  uncorrectable error severity (RWS)   10  correctable error status (RW1CS)
    14  correctable error mask (RWS)         18  advanced capabilities and control
    1C  header log (4 dwords, ROS)           2C..47 root/prefix registers (zero for an endpoint)

Status, mask and severity bits are sticky: they survive conventional reset and
FLR and are only cleared by power-on reset.
"""

from __future__ import annotations

from pcidev.pci import ids
from pcidev.pci.capabilities.base import ExtCapability

__all__ = [
    "UNCOR_STATUS", "UNCOR_MASK", "UNCOR_SEVER", "COR_STATUS", "COR_MASK", "CAP_CTRL", "HEADER_LOG",
    "UNCOR_BITS", "UNCOR_SEVER_DEFAULT", "COR_BITS", "COR_MASK_DEFAULT", "AerCapability",
]

#: Uncorrectable Error Status register offset in the AER capability (PCI_ERR_UNCOR_STATUS)
UNCOR_STATUS = 0x04
#: Uncorrectable Error Mask register offset in the AER capability (PCI_ERR_UNCOR_MASK)
UNCOR_MASK = 0x08
#: Uncorrectable Error Severity register offset in the AER capability (PCI_ERR_UNCOR_SEVER)
UNCOR_SEVER = 0x0C
#: Correctable Error Status register offset in the AER capability (PCI_ERR_COR_STATUS)
COR_STATUS = 0x10
#: Correctable Error Mask register offset in the AER capability (PCI_ERR_COR_MASK)
COR_MASK = 0x14
#: Advanced Error Capabilities and Control register offset in the AER capability (PCI_ERR_CAP)
CAP_CTRL = 0x18
#: Header Log register offset (4 dwords) in the AER capability (PCI_ERR_HEADER_LOG)
HEADER_LOG = 0x1C

#: implemented uncorrectable error bits (DLP, SDES, poisoned TLP, FCP, completion
#: timeout, completer abort, unexpected completion, overflow, malformed TLP, ECRC,
#: unsupported request, ACS violation, internal error)
UNCOR_BITS = 0x007FF030
#: Uncorrectable Error Severity at reset: fatal for DLP, SDES, FCP, receiver overflow, malformed TLP, internal error
UNCOR_SEVER_DEFAULT = 0x00462030
#: implemented correctable error bits
COR_BITS = 0x0000F1C1
#: Correctable Error Mask at reset: Advisory Non-Fatal Error masked (PCI_ERR_COR_ADV_NFAT)
COR_MASK_DEFAULT = 0x00002000


class AerCapability(ExtCapability):
    """Advanced Error Reporting for an endpoint."""

    CAP_ID = ids.ExtCapId.ERR
    VERSION = 2
    SIZE = 0x48

    def setup(self) -> None:
        self.w1c(UNCOR_STATUS, 4, UNCOR_BITS)
        self.writable(UNCOR_MASK, 4, UNCOR_BITS)
        self.set(UNCOR_SEVER, 4, UNCOR_SEVER_DEFAULT)
        self.writable(UNCOR_SEVER, 4, UNCOR_BITS)
        self.w1c(COR_STATUS, 4, COR_BITS)
        self.set(COR_MASK, 4, COR_MASK_DEFAULT)
        self.writable(COR_MASK, 4, COR_BITS)
        for reg in (UNCOR_STATUS, UNCOR_MASK, UNCOR_SEVER, COR_STATUS, COR_MASK, CAP_CTRL):
            self.sticky(reg, 4, 0xFFFFFFFF)
        self.sticky(HEADER_LOG, 16, (1 << 128) - 1)

    def report_uncorrectable(self, bit: int, header: bytes = b"") -> None:
        """Record uncorrectable error ``bit`` (0..31), with an optional TLP header log.

        Sets the status bit; if it is the first unmasked error, records the
        First Error Pointer and the header log.
        """
        if not (UNCOR_BITS >> bit) & 1:
            raise ValueError(f"uncorrectable error bit {bit} is not implemented")
        status = self.get(UNCOR_STATUS, 4)
        masked = bool(self.get(UNCOR_MASK, 4) >> bit & 1)
        self.set(UNCOR_STATUS, 4, status | (1 << bit))
        if not masked and not (status & ~self.get(UNCOR_MASK, 4)):
            self.set(CAP_CTRL, 4, (self.get(CAP_CTRL, 4) & ~0x1F) | bit)
            self.set(HEADER_LOG, 16, int.from_bytes(header[:16].ljust(16, b"\0"), "little"))

    def report_correctable(self, bit: int) -> None:
        """Record correctable error ``bit``."""
        if not (COR_BITS >> bit) & 1:
            raise ValueError(f"correctable error bit {bit} is not implemented")
        self.set(COR_STATUS, 4, self.get(COR_STATUS, 4) | (1 << bit))
