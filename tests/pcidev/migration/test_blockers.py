"""Migration blockers: allow-list of features, static and dynamic reasons, plugin hook;
every reason reported together, before the device is stopped."""

from __future__ import annotations

import socket

import pytest

from pcidev import hookimpl
from pcidev.devices.edu import EduDevice
from pcidev.errors import MigrationBlockedError
from pcidev.migration import collect_blockers, device_blockers, migrate_out
from pcidev.pci.capabilities.base import Capability
from pcidev.plugins import hook_migration_blockers, make_plugin_manager
from pcidev.registry import DeviceRegistry


class _VendorCap(Capability):
    CAP_ID = 0x09
    SIZE = 8


class TracingEdu(EduDevice):
    """An edu with a feature it does not declare, a capability the framework does
    not know, and a dynamic reason."""

    TYPE_NAME = "tracing-edu"
    quiesced_calls = 0

    def describe(self):
        super().describe()
        self.add_capability(_VendorCap())

    def enabled_features(self):
        return super().enabled_features() | {"trace-to-file"}

    def device_migration_blockers(self):
        return ["a firmware update is in progress"]

    def on_quiesce(self):
        type(self).quiesced_calls += 1
        super().on_quiesce()


class _Plugin:
    @hookimpl
    def pcidev_migration_blockers(self, device):
        return [f"backend of {device.name} is a raw block device"] if isinstance(device, EduDevice) else []


class _BrokenPlugin:
    @hookimpl
    def pcidev_migration_blockers(self, device):
        return "not a list"


def test_edu_has_no_blockers():
    dev = EduDevice(engine=True)
    dev.regs["RING_CTRL"].value = 1
    assert {"dma-engine", "background-engine"} <= dev.enabled_features()
    assert device_blockers(dev) == []
    assert collect_blockers(dev, make_plugin_manager(load_entrypoints=False)) == []


def test_all_reasons_are_reported_together():
    pm = make_plugin_manager(load_entrypoints=False, plugins=[("raw", _Plugin()), ("broken", _BrokenPlugin())])
    dev = TracingEdu(name="t0")
    reasons = collect_blockers(dev, pm)
    assert reasons[:3] == [
        "feature 'cap:_VendorCap' is enabled but device type tracing-edu does not declare it migratable",
        "feature 'trace-to-file' is enabled but device type tracing-edu does not declare it migratable",
        "a firmware update is in progress",
    ]
    assert "backend of t0 is a raw block device" in reasons
    assert any("broken" in r and "pcidev_migration_blockers" in r for r in reasons)
    assert len(reasons) == 5


def test_declaring_a_feature_unblocks_it():
    class Declared(TracingEdu):
        MIGRATABLE_FEATURES = TracingEdu.MIGRATABLE_FEATURES | {"trace-to-file", "cap:_VendorCap"}

        def device_migration_blockers(self):
            return []

    assert device_blockers(Declared()) == []


def test_static_blocker_without_vmstate_matches_the_registry():
    class NoState(EduDevice):
        TYPE_NAME = "no-state"
        VMSTATE = None

    reg = DeviceRegistry()
    reg.add_device(NoState)
    assert device_blockers(NoState()) == reg.static_blockers("no-state")


def test_failing_device_hook_becomes_a_reason():
    class Flaky(EduDevice):
        def device_migration_blockers(self):
            raise RuntimeError("cannot tell")

    assert device_blockers(Flaky()) == ["device_migration_blockers() failed: RuntimeError: cannot tell"]


def test_blocked_migration_never_stops_the_device():
    pm = make_plugin_manager(load_entrypoints=False, plugins=[("raw", _Plugin())])
    dev = TracingEdu(name="t1")
    dev.resume()
    TracingEdu.quiesced_calls = 0
    a, b = socket.socketpair()
    try:
        with pytest.raises(MigrationBlockedError) as info:
            migrate_out(dev, a, pm=pm)
        assert len(info.value.reasons) == 4
        assert TracingEdu.quiesced_calls == 0 and not dev.quiesced
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # nothing was sent
    finally:
        a.close()
        b.close()


class _RaisingPlugin:
    @hookimpl
    def pcidev_migration_blockers(self, device):
        raise RuntimeError("backend table is corrupt")


class _UnprintableResult:
    def __repr__(self):
        raise ValueError("no repr")


@pytest.mark.parametrize("plugin, expected", [
    (_RaisingPlugin(), "plugin 'bad' failed in pcidev_migration_blockers: RuntimeError: backend table is corrupt"),
    (_BrokenPlugin(), "plugin 'bad' returned 'not a list' from pcidev_migration_blockers; "
                      "expected a list of strings"),
])
def test_a_misbehaving_plugin_is_one_reason_naming_it(plugin, expected):
    pm = make_plugin_manager(load_entrypoints=False, plugins=[("raw", _Plugin()), ("bad", plugin)])
    dev = EduDevice(name="e0")
    reasons = hook_migration_blockers(pm, dev)
    assert sorted(reasons) == sorted([expected, "backend of e0 is a raw block device"])
    # collect_blockers asks the plugins through the same function: the same reasons
    assert collect_blockers(dev, pm) == device_blockers(dev) + reasons


def test_a_result_without_a_repr_is_still_a_reason():
    class Odd:
        @hookimpl
        def pcidev_migration_blockers(self, device):
            return _UnprintableResult()

    pm = make_plugin_manager(load_entrypoints=False, plugins=[("odd", Odd())])
    assert hook_migration_blockers(pm, EduDevice()) == [
        "plugin 'odd' returned a _UnprintableResult from pcidev_migration_blockers; expected a list of strings"]


def test_a_raising_plugin_refuses_the_migration_without_stopping_the_device():
    pm = make_plugin_manager(load_entrypoints=False, plugins=[("bad", _RaisingPlugin())])
    dev = EduDevice(name="e1")
    dev.resume()
    a, b = socket.socketpair()
    try:
        with pytest.raises(MigrationBlockedError) as info:
            migrate_out(dev, a, pm=pm)
        assert info.value.reasons == [
            "plugin 'bad' failed in pcidev_migration_blockers: RuntimeError: backend table is corrupt"]
        assert not dev.quiesced
    finally:
        a.close()
        b.close()
