"""Fixtures shared by the whole test suite (keep this file small)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_plugin_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never inherit a plugin selection from the environment that runs them."""
    monkeypatch.delenv("PCIDEV_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PCIDEV_BLOCKED_PLUGINS", raising=False)


@pytest.fixture
def pm():
    """A fresh plugin manager without entry-point plugins."""
    from pcidev.plugins import make_plugin_manager

    return make_plugin_manager(load_entrypoints=False)


@pytest.fixture
def make_device_class() -> Callable[..., type]:
    """Factory for minimal :class:`~pcidev.device.PciDevice` subclasses.

    ``make_device_class("edu", VENDOR_ID=0x1234, VMSTATE=...)``: the type name,
    then class attributes overriding valid defaults (QEMU's test vendor 0x1b36).
    """
    from pcidev.device import PciDevice

    def make(type_name: str = "testdev", **attributes: object) -> type:
        namespace = {
            "TYPE_NAME": type_name,
            "VENDOR_ID": 0x1B36,
            "DEVICE_ID": 0x0005,
            "CLASS_CODE": 0xFF0000,
            **attributes,
        }
        return type(f"Device_{type_name.replace('-', '_')}", (PciDevice,), namespace)

    return make


@pytest.fixture
def make_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Path]]:
    """Factory that "installs" a distribution for one test.

    ``make_distribution(name, version, entry_points={"ep": "module"},
    modules={"module": "source"})`` writes the modules and a ``.dist-info``
    directory into a directory on ``sys.path``, so :mod:`importlib.metadata`
    finds the entry points exactly as it finds those of a pip-installed package.
    Module names should be unique to the test; they are dropped from
    ``sys.modules`` afterwards.
    """
    root = tmp_path / "site-packages"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    modules_made: list[str] = []

    def make(
        name: str,
        version: str = "1.0",
        *,
        entry_points: dict[str, str] | None = None,
        modules: dict[str, str] | None = None,
    ) -> Path:
        for module, source in (modules or {}).items():
            (root / f"{module}.py").write_text(source)
            modules_made.append(module)
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        lines = ["[pcidev]"] + [f"{ep} = {target}" for ep, target in (entry_points or {}).items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        importlib.invalidate_caches()
        return info

    yield make
    for module in modules_made:
        sys.modules.pop(module, None)
