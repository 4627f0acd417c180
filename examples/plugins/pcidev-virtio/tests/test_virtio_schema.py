"""The plugin's state descriptions as released: committed schema snapshots of the
transport's layer section and of every virtio device type's own section. Changing one
without a version bump fails here (pcidev.vmstate.testing.assert_schema_matches); a new
device type needs its snapshot committed (``PCIDEV_UPDATE_SCHEMAS=1`` creates it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.vmstate.testing import assert_schema_matches
from pcidev_virtio.device import VirtioPciState

SCHEMA = Path(__file__).resolve().parent / "schema"


def _virtio_types():
    registry = load_registry(make_plugin_manager())
    return [(e.name, e.cls) for e in registry.devices() if e.cls.__module__.startswith("pcidev_virtio.")]


def test_the_transport_layer_schema_matches_the_snapshot():
    assert_schema_matches(VirtioPciState, SCHEMA / "virtio-pci.json")


@pytest.mark.parametrize("type_name, cls", _virtio_types(), ids=lambda v: v if isinstance(v, str) else "")
def test_device_schema_matches_the_snapshot(type_name, cls):
    assert cls.VMSTATE is not None, f"{type_name} cannot migrate"
    assert_schema_matches(cls.VMSTATE, SCHEMA / f"{type_name}.json")
