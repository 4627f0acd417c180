"""The device-author surface importable from the package root, and ``__all__`` of the core modules."""

from __future__ import annotations

import importlib

import pytest

import pcidev

AUTHOR_SURFACE = {"PciDevice", "Register", "RegisterMap", "Access", "RamBacking", "ResetKind", "hookimpl",
                  "vmstate", "PcidevError", "VMStateError", "StateError", "ConfigMismatchError",
                  "MigrationBlockedError"}


def test_the_package_root_exports_the_device_author_surface():
    assert AUTHOR_SURFACE <= set(pcidev.__all__)
    for name in pcidev.__all__:
        assert getattr(pcidev, name) is not None
    assert pcidev.PciDevice.__module__ == "pcidev.device"
    assert pcidev.ResetKind is importlib.import_module("pcidev.device").ResetKind


@pytest.mark.parametrize("module", ["pcidev.device", "pcidev.bar", "pcidev.errors", "pcidev.irq",
                                    "pcidev.pci.ids", "pcidev.pci.config", "pcidev.pci.capabilities.base",
                                    "pcidev.pci.capabilities.pm", "pcidev.pci.capabilities.msi",
                                    "pcidev.pci.capabilities.msix", "pcidev.pci.capabilities.express",
                                    "pcidev.pci.capabilities.aer", "pcidev.pci.capabilities.vendor",
                                    "pcidev.regions", "pcidev.ratelog", "pcidev.images", "pcidev.migration",
                                    "pcidev.migration.registers",
                                    "pcidev.worker", "pcidev.testing"])
def test_core_modules_declare_all_and_every_name_exists(module):
    mod = importlib.import_module(module)
    assert mod.__all__
    assert [name for name in mod.__all__ if not hasattr(mod, name)] == []
