"""Which fuzz targets exist: the framework's own (:data:`BUILTIN_TARGETS`) and those
plugins register as components of kind ``fuzz-target``."""

from __future__ import annotations

from collections.abc import Callable

from pcidev.errors import PluginError
from pcidev.registry import DeviceRegistry
from pcidev.testing.fuzz.link_target import LinkTarget
from pcidev.testing.fuzz.migration_source_target import MigrationSourceTarget
from pcidev.testing.fuzz.migration_target import MigrationTarget
from pcidev.testing.fuzz.target import FUZZ_TARGET_KIND, FuzzTarget
from pcidev.testing.fuzz.vfio_user_target import VfioUserTarget
from pcidev.testing.fuzz.vmstate_target import VmstateTarget

__all__ = ["BUILTIN_TARGETS", "make_target", "target_factories"]

#: The framework's targets, by name (factories: call one to get a fresh target).
BUILTIN_TARGETS: dict[str, Callable[[], FuzzTarget]] = {
    VfioUserTarget.name: VfioUserTarget,
    VmstateTarget.name: VmstateTarget,
    LinkTarget.name: LinkTarget,
    MigrationTarget.name: MigrationTarget,
    MigrationSourceTarget.name: MigrationSourceTarget,
}


def target_factories(registry: DeviceRegistry) -> dict[str, Callable[[], FuzzTarget]]:
    """Every target: the built-in ones, then the plugins' (``fuzz-target`` components).

    :param registry: the registry the plugins registered into.
    :returns: factories by name.
    :raises PluginError: a plugin's target has the name of a built-in one or is not callable.
    """
    out = dict(BUILTIN_TARGETS)
    for entry in registry.components(FUZZ_TARGET_KIND):
        if entry.name in BUILTIN_TARGETS:
            raise PluginError(f"fuzz target {entry.name!r} of plugin {entry.plugin!r} hides a built-in one")
        if not callable(entry.obj):
            raise PluginError(f"fuzz target {entry.name!r} of plugin {entry.plugin!r} is not callable")
        out[entry.name] = entry.obj
    return out


def make_target(registry: DeviceRegistry, name: str) -> FuzzTarget:
    """A fresh target by name.

    :raises PluginError: there is no such target, or its factory does not make a
        :class:`~pcidev.testing.fuzz.FuzzTarget`.
    """
    factories = target_factories(registry)
    if name not in factories:
        raise PluginError(f"no fuzz target {name!r} (known: {', '.join(sorted(factories))})")
    target = factories[name]()
    if not isinstance(target, FuzzTarget):
        raise PluginError(f"fuzz target {name!r} made {target!r}, not a FuzzTarget")
    return target
