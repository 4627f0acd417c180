"""The plugin as pcidev finds it: through its entry point, listed by ``pcidev plugins``,
blockable with ``-p no:virtio``."""

from __future__ import annotations

import importlib.metadata

from pcidev.cli import main as cli_main
from pcidev.plugins import load_registry, make_plugin_manager


def test_the_entry_point_is_installed():
    eps = importlib.metadata.entry_points(group="pcidev")
    assert {ep.name: ep.value for ep in eps}["virtio"] == "pcidev_virtio.plugin"
    assert importlib.metadata.version("pcidev-virtio") == "0.1.0"


def test_pcidev_plugins_lists_it(capsys):
    assert cli_main(["plugins"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("virtio"))
    assert "pcidev-virtio" in line and "virtio-rng" in line


def test_it_can_be_blocked():
    registry = load_registry(make_plugin_manager(blocked=["virtio"]))
    assert "virtio-rng" not in {e.name for e in registry.devices()}
