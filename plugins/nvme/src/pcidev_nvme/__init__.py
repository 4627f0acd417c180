"""pcidev_nvme: an NVMe controller as a pcidev device plugin (distribution ``pcidev-nvme``).

The plugin registers through ``pcidev_nvme.plugin`` (entry point ``nvme`` in the ``pcidev``
group); where each concern lives is listed in docs/nvme-contract.md of the pcidev checkout.
"""
