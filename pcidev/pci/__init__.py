"""The PCI function as the bus sees it: register layout and identifiers (:mod:`~pcidev.pci.ids`),
configuration space (:mod:`~pcidev.pci.config`) and the capabilities in it
(:mod:`~pcidev.pci.capabilities`)."""
