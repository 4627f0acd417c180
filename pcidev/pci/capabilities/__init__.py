"""PCI capabilities: the linked lists and the capability base classes (:mod:`.base`), Power
Management (:mod:`.pm`), MSI (:mod:`.msi`), MSI-X (:mod:`.msix`), PCI Express (:mod:`.express`),
Advanced Error Reporting (:mod:`.aer`) and vendor-specific capabilities (:mod:`.vendor`)."""
