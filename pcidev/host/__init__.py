"""The software host: pcidev's qtest/libqos. See :mod:`pcidev.host.machine`."""

from __future__ import annotations

from pcidev.host.machine import Machine, PageAllocator
from pcidev.host.pci import PCI_IRQ_ALL_TYPES, PCI_IRQ_INTX, PCI_IRQ_MSI, PCI_IRQ_MSIX, HostPciDevice, InterruptRecorder

__all__ = ["Machine", "PageAllocator", "HostPciDevice", "InterruptRecorder", "PCI_IRQ_INTX", "PCI_IRQ_MSI",
           "PCI_IRQ_MSIX", "PCI_IRQ_ALL_TYPES"]
