"""Plugin manager: discovery, blocking, validation and per-plugin hook calls."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect

import pluggy
import pytest

import pcidev
import pcidev.plugins
from pcidev import hookspecs
from pcidev.errors import PluginError
from pcidev.hookspecs import hookimpl, hookspec
from pcidev.plugins import (
    add_plugin_options,
    hook_migration_blockers,
    load_registry,
    make_plugin_manager,
)


class DevicePlugin:
    """An inline plugin registering the device classes it is given."""

    def __init__(self, *classes: type) -> None:
        self.classes = classes

    @hookimpl
    def pcidev_register_devices(self, registry):
        for cls in self.classes:
            registry.add_device(cls)


# -- the NVMe plugin, found only through its entry point ------------------------------


def test_builtin_plugin_registers_edu_and_can_be_blocked():
    from pcidev.devices.edu import EduDevice

    pm = make_plugin_manager(load_entrypoints=False)
    assert pm.get_plugin("builtin") is importlib.import_module("pcidev.devices.builtin")
    origin = pm.plugin_origin("builtin")
    assert (origin.distribution, origin.version) == ("pcidev", pcidev.__version__)
    entry = load_registry(pm).entry("edu")
    assert (entry.cls, entry.plugin) == (EduDevice, "builtin")
    blocked = make_plugin_manager(load_entrypoints=False, blocked=["builtin"])
    assert blocked.plugin_names() == []
    assert len(load_registry(blocked)) == 0


# -- discovery switches ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "yes", "true", "anything"])
def test_autoload_disabled_by_environment(monkeypatch, value):
    monkeypatch.setenv("PCIDEV_DISABLE_PLUGIN_AUTOLOAD", value)
    pm = make_plugin_manager()
    assert pm.get_plugin("nvme") is None
    assert pm.plugin_names() == ["builtin"]


@pytest.mark.parametrize("value", ["", "0", "false", "No", "off"])
def test_autoload_stays_on_for_false_values(monkeypatch, value):
    monkeypatch.setenv("PCIDEV_DISABLE_PLUGIN_AUTOLOAD", value)
    assert make_plugin_manager().has_plugin("nvme")


def test_autoload_argument_overrides_environment(monkeypatch):
    assert not make_plugin_manager(load_entrypoints=False).has_plugin("nvme")
    monkeypatch.setenv("PCIDEV_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert make_plugin_manager(load_entrypoints=True).has_plugin("nvme")


def test_block_by_argument():
    pm = make_plugin_manager(blocked=["nvme"])
    assert pm.get_plugin("nvme") is None
    assert pm.is_blocked("nvme")
    assert pm.blocked_names() == ["nvme"]


def test_block_by_environment(monkeypatch):
    monkeypatch.setenv("PCIDEV_BLOCKED_PLUGINS", " other ,nvme,, ")
    pm = make_plugin_manager()
    assert pm.get_plugin("nvme") is None
    assert sorted(pm.blocked_names()) == ["nvme", "other"]


def test_blocked_entry_point_is_not_even_imported(make_distribution):
    make_distribution(
        "pcidev-explosive",
        entry_points={"explosive": "explosive_plugin_mod"},
        modules={"explosive_plugin_mod": "raise RuntimeError('imported!')\n"},
    )
    with pytest.raises(PluginError, match="explosive"):
        make_plugin_manager()
    pm = make_plugin_manager(blocked=["explosive"])
    assert not pm.has_plugin("explosive")


def test_block_applies_to_explicit_plugins(make_device_class):
    plugin = DevicePlugin(make_device_class("testdev"))
    pm = make_plugin_manager(load_entrypoints=False, plugins=[("mine", plugin)], blocked=["mine"])
    assert not pm.has_plugin("mine")
    assert "testdev" not in load_registry(pm)


def test_manager_is_never_built_at_import():
    module_globals = vars(pcidev.plugins).values()
    assert not any(isinstance(value, pluggy.PluginManager) for value in module_globals)
    assert make_plugin_manager() is not make_plugin_manager()


# -- third-party distributions --------------------------------------------------------


THIRD_PARTY_SOURCE = """
from pcidev import hookimpl
from pcidev.device import PciDevice

class AcmeDevice(PciDevice):
    TYPE_NAME = "acme-dev"
    VENDOR_ID = 0x1234
    DEVICE_ID = 0x11E9
    CLASS_CODE = 0x00FF00

@hookimpl
def pcidev_register_devices(registry):
    registry.add_device(AcmeDevice)
"""


def test_third_party_distribution_is_loaded_and_attributed(make_distribution):
    make_distribution(
        "pcidev-acme", "2.5", entry_points={"acme": "pcidev_acme_tp"},
        modules={"pcidev_acme_tp": THIRD_PARTY_SOURCE},
    )
    pm = make_plugin_manager(blocked=["nvme"])
    # other installed plugins may be loaded too: look at ours only
    assert [n for n in pm.plugin_names() if n in ("builtin", "acme", "nvme")] == ["builtin", "acme"]
    origin = pm.plugin_origin("acme")
    assert (origin.distribution, origin.version) == ("pcidev-acme", "2.5")
    entry = load_registry(pm).entry("acme-dev")
    assert entry.cls.__module__ == "pcidev_acme_tp"
    assert (entry.plugin, entry.distribution, entry.version) == ("acme", "pcidev-acme", "2.5")


def test_entry_point_import_failure_names_the_plugin(make_distribution):
    make_distribution(
        "pcidev-broken", "0.3", entry_points={"broken": "pcidev_broken_mod"},
        modules={"pcidev_broken_mod": "import pcidev_no_such_dependency\n"},
    )
    with pytest.raises(PluginError) as info:
        make_plugin_manager(blocked=["nvme"])
    message = str(info.value)
    assert "plugin 'broken'" in message
    assert "pcidev-broken 0.3" in message
    assert "pcidev_no_such_dependency" in message
    assert "\n" not in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_missing_entry_point_module_names_the_plugin(make_distribution):
    make_distribution("pcidev-ghost", entry_points={"ghost": "pcidev_ghost_missing"})
    with pytest.raises(PluginError, match=r"plugin 'ghost' \('pcidev_ghost_missing'"):
        make_plugin_manager(blocked=["nvme"])


def test_two_distributions_claiming_one_name_fail(make_distribution):
    source = "from pcidev import hookimpl\n"
    make_distribution("pcidev-twin-a", entry_points={"twin": "twin_a_mod"},
                      modules={"twin_a_mod": source})
    make_distribution("pcidev-twin-b", entry_points={"twin": "twin_b_mod"},
                      modules={"twin_b_mod": source})
    with pytest.raises(PluginError, match="plugin name 'twin' is claimed by two entry points"):
        make_plugin_manager(blocked=["nvme"])


# -- inline plugins, validation -------------------------------------------------------


def test_inline_plugin_is_found_and_registers_its_device(make_device_class):
    cls = make_device_class("testdev")
    plugin = DevicePlugin(cls)
    pm = make_plugin_manager(load_entrypoints=False, plugins=[plugin])
    assert pm.get_name(plugin) == "DevicePlugin"
    registry = load_registry(pm)
    assert registry.get("testdev") is cls
    entry = registry.entry("testdev")
    assert (entry.plugin, entry.distribution, entry.version) == ("DevicePlugin", None, None)


def test_inline_module_plugin_uses_its_module_name(make_device_class):
    import types

    module = types.ModuleType("pcidev_inline_module")
    cls = make_device_class("testdev")

    @hookimpl
    def pcidev_register_devices(registry):
        registry.add_device(cls)

    module.pcidev_register_devices = pcidev_register_devices
    pm = make_plugin_manager(load_entrypoints=False, plugins=[module])
    assert load_registry(pm).entry("testdev").plugin == "pcidev_inline_module"


def test_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def pcidev_regster_devices(self, registry):
            raise AssertionError("never called")

    with pytest.raises(PluginError) as info:
        make_plugin_manager(load_entrypoints=False, plugins=[("typo", Typo())])
    message = str(info.value)
    assert "'pcidev_regster_devices'" in message
    assert "plugin 'typo'" in message
    assert "did you mean 'pcidev_register_devices'" in message


def test_optional_unknown_hook_is_allowed():
    class Optional:
        @hookimpl(optionalhook=True)
        def pcidev_future_hook(self):
            return 1

    pm = make_plugin_manager(load_entrypoints=False, plugins=[Optional()])
    assert pm.has_plugin("Optional")


def test_hook_with_unknown_argument_fails():
    class BadArgs:
        @hookimpl
        def pcidev_register_devices(self, registry, flavour):
            pass

    with pytest.raises(PluginError, match=r"plugin 'BadArgs' is invalid: .*flavour"):
        make_plugin_manager(load_entrypoints=False, plugins=[BadArgs()])


def test_duplicate_plugin_names_fail():
    class Same:
        pass

    with pytest.raises(PluginError, match="two plugins are named 'Same'"):
        make_plugin_manager(load_entrypoints=False, plugins=[Same(), Same()])
    one = Same()
    with pytest.raises(PluginError, match="same object as the already registered plugin 'a'"):
        make_plugin_manager(load_entrypoints=False, plugins=[("a", one), ("b", one)])


@pytest.mark.parametrize("bad", [("x",), ("", object()), (1, object()), ("a", object(), 3)])
def test_malformed_plugin_pairs_fail(bad):
    with pytest.raises(PluginError, match=r"\(name, plugin\) pair"):
        make_plugin_manager(load_entrypoints=False, plugins=[bad])


def test_string_arguments_are_rejected():
    with pytest.raises(PluginError, match="not a string"):
        make_plugin_manager(load_entrypoints=False, blocked="nvme")
    with pytest.raises(PluginError, match="not a string"):
        make_plugin_manager(load_entrypoints=False, plugins="nvme")
    with pytest.raises(PluginError, match="must be strings"):
        make_plugin_manager(load_entrypoints=False, blocked=[None])


# -- plugin-defined hook specifications -----------------------------------------------


class ExtraSpecs:
    @hookspec
    def pcidev_test_extra(self, value):
        """A hook defined by a plugin."""


class SpecPlugin:
    @hookimpl
    def pcidev_add_hookspecs(self, pluginmanager):
        pluginmanager.add_hookspecs(ExtraSpecs)


class ExtraImpl:
    @hookimpl
    def pcidev_test_extra(self, value):
        return value * 2


def test_plugin_can_add_hookspecs_for_other_plugins():
    # The implementation is registered before the plugin that adds the spec.
    pm = make_plugin_manager(
        load_entrypoints=False, plugins=[("impl", ExtraImpl()), ("spec", SpecPlugin())]
    )
    assert pm.hook.pcidev_test_extra(value=21) == [42]


def test_plugin_hook_without_its_spec_is_unknown():
    message = "plugin 'impl' implements unknown hook 'pcidev_test_extra'"
    with pytest.raises(PluginError, match=message):
        make_plugin_manager(load_entrypoints=False, plugins=[("impl", ExtraImpl())])


def test_adding_the_same_hookspecs_twice_fails():
    with pytest.raises(PluginError, match=r"plugin 'spec\d' failed in pcidev_add_hookspecs"):
        make_plugin_manager(
            load_entrypoints=False, plugins=[("spec1", SpecPlugin()), ("spec2", SpecPlugin())]
        )


def test_added_spec_validates_earlier_impls():
    class WrongImpl:
        @hookimpl
        def pcidev_test_extra(self, value, nonsense):
            pass

    with pytest.raises(PluginError, match="failed in pcidev_add_hookspecs.*nonsense"):
        make_plugin_manager(
            load_entrypoints=False, plugins=[("wrong", WrongImpl()), ("spec", SpecPlugin())]
        )


# -- per-plugin hook calls ------------------------------------------------------------


def test_load_registry_attributes_each_plugin(make_device_class):
    a, b, c = (make_device_class(n) for n in ("dev-a", "dev-b", "dev-c"))
    pm = make_plugin_manager(
        load_entrypoints=False,
        plugins=[("first", DevicePlugin(a)), ("second", DevicePlugin(b, c))],
    )
    registry = load_registry(pm)
    assert {e.name: e.plugin for e in registry.devices()} == {
        "dev-a": "first", "dev-b": "second", "dev-c": "second", "edu": "builtin",
    }


def test_load_registry_calls_each_plugin_once(make_device_class):
    calls = []

    class Counting:
        @hookimpl
        def pcidev_register_devices(self, registry):
            calls.append(registry)

    pm = make_plugin_manager(load_entrypoints=False, plugins=[Counting()])
    registry = load_registry(pm)
    assert calls == [registry]


def test_duplicate_device_across_plugins_names_both(make_device_class):
    pm = make_plugin_manager(
        load_entrypoints=False,
        plugins=[("first", DevicePlugin(make_device_class("testdev"))),
                 ("second", DevicePlugin(make_device_class("testdev")))],
    )
    with pytest.raises(PluginError) as info:
        load_registry(pm)
    message = str(info.value)
    assert "failed in pcidev_register_devices" in message
    assert "'testdev' is already registered by plugin" in message
    assert {"'first'", "'second'"} <= {w.strip(":") for w in message.split()}


def test_crashing_registration_becomes_plugin_error():
    class Crashing:
        @hookimpl
        def pcidev_register_devices(self, registry):
            raise ZeroDivisionError("boom")

    pm = make_plugin_manager(load_entrypoints=False, plugins=[("crashy", Crashing())])
    with pytest.raises(PluginError, match="plugin 'crashy' failed in pcidev_register_devices: "
                                          "ZeroDivisionError: boom") as info:
        load_registry(pm)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_plugin_registering_a_non_device_is_rejected():
    pm = make_plugin_manager(load_entrypoints=False, plugins=[("bad", DevicePlugin(dict))])
    with pytest.raises(PluginError, match="plugin 'bad'.*not a subclass of pcidev.device.PciDevice"):
        load_registry(pm)


def test_each_plugin_calls_one_plugin_at_a_time_in_pluggy_order():
    class Named:
        def __init__(self, label):
            self.label = label

        @hookimpl
        def pcidev_migration_blockers(self, device):
            return [self.label]

    pm = make_plugin_manager(
        load_entrypoints=False, blocked=["builtin"],
        plugins=[("a", Named("A")), ("b", Named("B")), ("c", Named("C"))],
    )
    hooks = list(pcidev.plugins.each_plugin(pm, "pcidev_migration_blockers"))
    # pluggy calls the last registered plugin first; each_plugin keeps that order.
    assert [h.name for h in hooks] == ["c", "b", "a"]
    assert pm.hook.pcidev_migration_blockers(device=None) == [["C"], ["B"], ["A"]]
    assert [h(device=None) for h in hooks] == [[["C"]], [["B"]], [["A"]]]  # one result each
    assert hooks[0].origin.plugin == "c" and hooks[0].origin.distribution is None
    with pytest.raises(PluginError, match="unknown hook 'pcidev_no_such_hook'"):
        list(pcidev.plugins.each_plugin(pm, "pcidev_no_such_hook"))


def test_migration_blockers_are_concatenated():
    class StorageA:
        @hookimpl
        def pcidev_migration_blockers(self, device):
            return [f"{device} uses a raw block device"]

    class StorageB:
        @hookimpl
        def pcidev_migration_blockers(self, device):
            return ("tracing is on", "a second reason")

    class Silent:
        @hookimpl
        def pcidev_migration_blockers(self, device):
            return []

    pm = make_plugin_manager(
        load_entrypoints=False, plugins=[StorageA(), Silent(), StorageB()]
    )
    reasons = hook_migration_blockers(pm, "dev0")
    assert sorted(reasons) == [
        "a second reason", "dev0 uses a raw block device", "tracing is on",
    ]
    assert reasons.index("tracing is on") + 1 == reasons.index("a second reason")
    assert hook_migration_blockers(make_plugin_manager(load_entrypoints=False), "dev0") == []


@pytest.mark.parametrize("returned", ["one reason", 3, [1, "ok"], {"a": "b"}])
def test_malformed_migration_blockers_become_a_reason_naming_the_plugin(returned):
    class Bad:
        @hookimpl
        def pcidev_migration_blockers(self, device):
            return returned

    pm = make_plugin_manager(load_entrypoints=False, plugins=[("bad", Bad())])
    [reason] = hook_migration_blockers(pm, object())
    assert reason.startswith("plugin 'bad' returned ") and "expected a list of strings" in reason


def test_plugin_options_are_added_and_clashes_are_blamed():
    class Options:
        @hookimpl
        def pcidev_add_options(self, parser):
            parser.add_argument("--edu-trace", action="store_true")

    parser = argparse.ArgumentParser()
    add_plugin_options(make_plugin_manager(load_entrypoints=False, plugins=[("one", Options())]),
                       parser)
    assert parser.parse_args(["--edu-trace"]).edu_trace is True

    pm = make_plugin_manager(load_entrypoints=False,
                             plugins=[("one", Options()), ("two", Options())])
    with pytest.raises(PluginError, match="plugin 'one' failed in pcidev_add_options.*--edu-trace"):
        add_plugin_options(pm, argparse.ArgumentParser())


# -- the hook specifications themselves -----------------------------------------------


def _specs():
    return [
        getattr(hookspecs, name)
        for name in dir(hookspecs)
        if name.startswith("pcidev_") and callable(getattr(hookspecs, name))
    ]


def test_every_hookspec_is_prefixed_and_fully_documented():
    specs = _specs()
    assert {f.__name__ for f in specs} >= {
        "pcidev_register_devices", "pcidev_add_options", "pcidev_migration_blockers",
        "pcidev_add_hookspecs",
    }
    for func in specs:
        doc = inspect.getdoc(func) or ""
        for param in inspect.signature(func).parameters:
            assert f":param {param}:" in doc, (func.__name__, param)
        assert ":returns:" in doc, func.__name__
        assert func.__name__ in hookspecs.__all__


def test_hookimpl_is_exported_from_the_package():
    assert pcidev.hookimpl is hookspecs.hookimpl
    assert hookspecs.hookimpl.project_name == hookspecs.hookspec.project_name == "pcidev"
