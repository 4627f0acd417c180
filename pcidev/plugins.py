"""Building the plugin manager and calling hooks on behalf of pcidev.

The manager is built by :func:`make_plugin_manager`, never at import time, so
every caller (the command line, a test, an embedding program) gets a fresh one
with its own settings.  Loading order:

1. built-in plugins (:data:`BUILTIN_PLUGINS`, modules inside pcidev, attributed
   to the ``pcidev`` distribution; blockable like any other plugin);
2. third-party plugins from the entry-point group ``pcidev``, unless autoloading
   is disabled (``load_entrypoints=False`` or :envvar:`PCIDEV_DISABLE_PLUGIN_AUTOLOAD`);
3. plugins passed in explicitly (tests, ``pcidev -p MODULE``).

Names in :envvar:`PCIDEV_BLOCKED_PLUGINS` (comma-separated) or in ``blocked``
are never loaded, whichever of the three sources they come from.  After
loading, :func:`~pcidev.hookspecs.pcidev_add_hookspecs` runs and every hook
implementation must match a known specification: a misspelled hook name is a
:class:`~pcidev.errors.PluginError` naming the hook and the plugin.

The helpers :func:`load_registry`, :func:`add_plugin_options`,
:func:`hook_migration_blockers`, :func:`hook_migration_summary` and
:func:`hook_migration_workload` call a hook one plugin at a time
(:func:`each_plugin`), so each error names the plugin that caused it and each
registration is attributed to it (a failing ``pcidev_migration_blockers`` is a
reason that refuses the migration, not an error).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import pluggy

from pcidev import __version__, hookspecs
from pcidev.errors import PcidevError, PluginError, PluginSpecError, one_line
from pcidev.registry import DeviceRegistry, PluginOrigin

if TYPE_CHECKING:
    import argparse

    from pcidev.device import PciDevice

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRYPOINT_GROUP",
    "ENV_BLOCKED_PLUGINS",
    "ENV_DISABLE_AUTOLOAD",
    "PcidevPluginManager",
    "PluginHook",
    "add_plugin_options",
    "each_plugin",
    "hook_migration_blockers",
    "hook_migration_summary",
    "hook_migration_workload",
    "load_registry",
    "make_plugin_manager",
    "parse_plugin_specs",
]

#: Entry-point group third-party plugins register under.
ENTRYPOINT_GROUP = hookspecs.PROJECT_NAME

#: Plugins shipped inside pcidev, registered first: ``(plugin name, module name)`` pairs.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (("builtin", "pcidev.devices.builtin"),)

#: Environment variable that, when set to a true value, disables entry-point loading.
ENV_DISABLE_AUTOLOAD = "PCIDEV_DISABLE_PLUGIN_AUTOLOAD"

#: Environment variable holding a comma-separated list of plugin names to block.
ENV_BLOCKED_PLUGINS = "PCIDEV_BLOCKED_PLUGINS"

_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})


class PcidevPluginManager(pluggy.PluginManager):
    """A :class:`pluggy.PluginManager` that remembers where each plugin came from."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self._origins: dict[str, PluginOrigin] = {}

    def plugin_origin(self, name: str) -> PluginOrigin:
        """Return the origin (plugin name, distribution, version) of a plugin.

        :param name: the plugin's registered name.
        :returns: the origin; without distribution for plugins not loaded from
            an entry point.
        """
        return self._origins.get(name, PluginOrigin(name))

    def plugin_names(self) -> list[str]:
        """Return the names of the registered plugins, in registration order.

        :returns: the names (blocked names are not included).
        """
        return [name for name, plugin in self.list_name_plugin() if plugin is not None]

    def blocked_names(self) -> list[str]:
        """Return the blocked plugin names.

        :returns: the names, in the order they were blocked.
        """
        return [name for name, plugin in self.list_name_plugin() if plugin is None]


def _env_flag(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in _FALSE_WORDS


def _describe_exception(exc: BaseException) -> str:
    if isinstance(exc, PcidevError):
        return one_line(exc)
    return one_line(f"{type(exc).__name__}: {exc}")


def _register(pm: PcidevPluginManager, plugin: object, name: str, origin: PluginOrigin) -> None:
    try:
        registered = pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name!r} is invalid: {one_line(exc)}") from exc
    except ValueError as exc:
        other = pm.get_name(plugin)
        if other is not None and other != name:
            raise PluginError(
                f"plugin {name!r} is the same object as the already registered plugin {other!r}"
            ) from exc
        raise PluginError(f"two plugins are named {name!r}") from exc
    if registered is not None:
        pm._origins[registered] = origin


def _load_builtins(pm: PcidevPluginManager) -> None:
    for name, module_name in BUILTIN_PLUGINS:
        if pm.is_blocked(name):
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise PluginError(
                f"built-in plugin {name!r} ({module_name}) failed to import: "
                f"{_describe_exception(exc)}"
            ) from exc
        _register(pm, module, name, PluginOrigin(name, "pcidev", __version__))


def _load_entrypoints(pm: PcidevPluginManager) -> None:
    seen: dict[str, str] = {}
    entry_points = importlib.metadata.entry_points(group=ENTRYPOINT_GROUP)
    for ep in sorted(entry_points, key=lambda ep: (ep.name, ep.value)):
        dist = ep.dist
        dist_name = dist.metadata["Name"] if dist is not None else None
        dist_version = dist.version if dist is not None else None
        source = f"{dist_name} {dist_version}" if dist_name else "an unknown distribution"
        if ep.name in seen:
            raise PluginError(
                f"plugin name {ep.name!r} is claimed by two entry points: "
                f"{seen[ep.name]} and {ep.value!r} from {source}"
            )
        seen[ep.name] = f"{ep.value!r} from {source}"
        if pm.is_blocked(ep.name):
            continue
        if pm.has_plugin(ep.name):
            raise PluginError(
                f"entry point {ep.name!r} from {source} clashes with the built-in plugin "
                f"of the same name"
            )
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {ep.name!r} ({ep.value!r} from {source}) failed to import: "
                f"{_describe_exception(exc)}"
            ) from exc
        _register(pm, plugin, ep.name, PluginOrigin(ep.name, dist_name, dist_version))


def _plugin_name_for(plugin: object) -> str:
    name = getattr(plugin, "__name__", None)
    if isinstance(name, str) and name:
        return name
    return type(plugin).__name__


def _check_hooks(pm: PcidevPluginManager) -> None:
    known = sorted(
        name
        for name, caller in vars(pm.hook).items()
        if not name.startswith("_") and caller.has_spec()
    )
    for name, caller in sorted(vars(pm.hook).items()):
        if name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PluginError(
                f"plugin {impl.plugin_name!r} implements unknown hook {name!r}{hint}"
            )
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:  # the loop above reports these first
        raise PluginError(one_line(exc)) from exc


@attrs.frozen
class PluginHook:
    """One plugin's implementation(s) of a hook, as yielded by :func:`each_plugin`.

    Calling it runs only this plugin's implementations, with pluggy's usual
    semantics (keyword arguments, ``None`` results dropped), and turns any
    exception into a :class:`~pcidev.errors.PluginError` naming the plugin and
    the hook.

    :param name: the plugin's registered name.
    :param origin: where the plugin came from (for registries' ``registering_as``).
    :param hook_name: the hook being called.
    :param caller: the pluggy hook caller restricted to this plugin.
    """

    name: str
    origin: PluginOrigin
    hook_name: str
    caller: Any = attrs.field(repr=False)

    def __call__(self, **kwargs: Any) -> list[Any]:
        """Call the hook for this plugin.

        :param kwargs: the hook's arguments, by name.
        :returns: the plugin's non-``None`` results.
        :raises PluginError: if the implementation raises.
        """
        try:
            return list(self.caller(**kwargs))
        except Exception as exc:
            raise PluginError(
                f"plugin {self.name!r} failed in {self.hook_name}: {_describe_exception(exc)}"
            ) from exc


def each_plugin(pm: pluggy.PluginManager, hook_name: str) -> Iterator[PluginHook]:
    """Iterate over the plugins implementing ``hook_name``, in pluggy's call order.

    Use it to call a hook one plugin at a time, so that results and errors can
    be attributed (plugins may use it for hooks they define themselves)::

        for hook in each_plugin(pm, "pcidev_register_devices"):
            with registry.registering_as(hook.origin):
                hook(registry=registry)

    :param pm: the plugin manager.
    :param hook_name: a hook with a specification in ``pm``.
    :returns: an iterator of :class:`PluginHook`, one per plugin (pluggy calls the
        last registered plugin first; this order is kept).
    :raises PluginError: if ``hook_name`` is not a known hook.
    """
    caller = getattr(pm.hook, hook_name, None)
    if caller is None or not caller.has_spec():
        raise PluginError(f"unknown hook {hook_name!r}")
    order: list[object] = []
    for impl in reversed(caller.get_hookimpls()):
        if not any(impl.plugin is p for p in order):
            order.append(impl.plugin)
    for plugin in order:
        name = pm.get_name(plugin)
        if name is None:  # unregistered meanwhile
            continue
        others = [p for p in pm.get_plugins() if p is not None and p is not plugin]
        subset = pm.subset_hook_caller(hook_name, remove_plugins=others)
        yield PluginHook(name, _origin(pm, name), hook_name, subset)


def _origin(pm: pluggy.PluginManager, name: str) -> PluginOrigin:
    if isinstance(pm, PcidevPluginManager):
        return pm.plugin_origin(name)
    return PluginOrigin(name)


def parse_plugin_specs(specs: Iterable[str]) -> tuple[list[str], list[tuple[str, object]]]:
    """The plugin selection of ``-p`` options (the command line's and a device process's).

    ``no:NAME`` blocks the plugin ``NAME``; ``MODULE`` imports ``MODULE`` and adds it
    as an extra plugin named ``MODULE``. Pass the result to :func:`make_plugin_manager`
    as ``blocked=`` and ``plugins=``.

    :param specs: the option values, in order.
    :returns: ``(blocked names, [(module name, module), ...])``.
    :raises PluginSpecError: a malformed spec (``no:`` without a name, an empty one,
        one starting with ``-``).
    :raises PluginError: a module failed to import.
    """
    blocked: list[str] = []
    extra: list[tuple[str, object]] = []
    for spec in specs:
        if spec.startswith("no:"):
            name = spec[3:]
            if not name:
                raise PluginSpecError("-p no: needs a plugin name, e.g. -p no:nvme")
            blocked.append(name)
            continue
        if not spec or spec.startswith("-"):
            raise PluginSpecError(f"-p expects no:NAME or a module name, got {spec!r}")
        try:
            module = importlib.import_module(spec)
        except Exception as exc:
            raise PluginError(
                f"plugin module {spec!r} (from -p) failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        extra.append((spec, module))
    return blocked, extra


def make_plugin_manager(
    *,
    load_entrypoints: bool | None = None,
    blocked: Iterable[str] = (),
    plugins: Iterable[object] = (),
) -> PcidevPluginManager:
    """Build a plugin manager with the pcidev hook specifications and plugins loaded.

    :param load_entrypoints: load plugins from the entry-point group ``pcidev``.
        ``None`` (the default) loads them unless the environment variable
        ``PCIDEV_DISABLE_PLUGIN_AUTOLOAD`` is set to a true value (anything but
        empty, ``0``, ``false``, ``no``, ``off``); ``True`` or ``False`` override
        the environment.
    :param blocked: plugin names never to load, in addition to those in
        ``PCIDEV_BLOCKED_PLUGINS`` (comma-separated).
    :param plugins: extra plugins to register after the entry points: modules
        or objects with :data:`~pcidev.hookspecs.hookimpl` methods, or
        ``(name, plugin)`` pairs.  Without an explicit name a plugin is
        registered under its ``__name__`` or, failing that, its class name.
    :returns: the manager, with every plugin registered and checked.
    :raises PluginError: if a plugin fails to import, two plugins share a name,
        a hook implementation does not match its specification or names an
        unknown hook, or ``pcidev_add_hookspecs`` fails.
    """
    pm = PcidevPluginManager()

    names = [n.strip() for n in os.environ.get(ENV_BLOCKED_PLUGINS, "").split(",")]
    if isinstance(blocked, str):
        raise PluginError("blocked must be an iterable of plugin names, not a string")
    names.extend(blocked)
    for name in names:
        if not isinstance(name, str):
            raise PluginError(f"blocked plugin names must be strings, got {name!r}")
        if name:
            pm.set_blocked(name)

    if load_entrypoints is None:
        load_entrypoints = not _env_flag(os.environ.get(ENV_DISABLE_AUTOLOAD))

    _load_builtins(pm)
    if load_entrypoints:
        _load_entrypoints(pm)
    if isinstance(plugins, (str, bytes)):
        raise PluginError("plugins must be an iterable of plugin objects, not a string")
    for item in plugins:
        if isinstance(item, tuple):
            if len(item) != 2 or not isinstance(item[0], str) or not item[0]:
                raise PluginError(f"expected a (name, plugin) pair, got {item!r}")
            name, plugin = item
        else:
            name, plugin = _plugin_name_for(item), item
        _register(pm, plugin, name, PluginOrigin(name))

    for hook in each_plugin(pm, "pcidev_add_hookspecs"):
        hook(pluginmanager=pm)
    _check_hooks(pm)
    return pm


def load_registry(pm: pluggy.PluginManager) -> DeviceRegistry:
    """Build a :class:`~pcidev.registry.DeviceRegistry` from the plugins of ``pm``.

    Calls :func:`~pcidev.hookspecs.pcidev_register_devices` once for each plugin
    implementing it (in pluggy's call order) and attributes each entry to that
    plugin and its distribution.

    :param pm: a manager from :func:`make_plugin_manager`.
    :returns: a new registry.
    :raises PluginError: naming the plugin, if a registration is rejected or the
        hook raises.
    """
    registry = DeviceRegistry()
    for hook in each_plugin(pm, "pcidev_register_devices"):
        with registry.registering_as(hook.origin):
            hook(registry=registry)
    return registry


def add_plugin_options(
    pm: pluggy.PluginManager, parser: argparse.ArgumentParser | argparse._ArgumentGroup
) -> None:
    """Let every plugin add its command-line options (:func:`~pcidev.hookspecs.pcidev_add_options`).

    :param pm: the plugin manager.
    :param parser: the parser or argument group to add options to.
    :raises PluginError: naming the plugin, if it fails (e.g. a clashing option).
    """
    for hook in each_plugin(pm, "pcidev_add_options"):
        hook(parser=parser)


def hook_migration_blockers(pm: pluggy.PluginManager, device: PciDevice) -> list[str]:
    """Ask every plugin why ``device`` cannot migrate
    (:func:`~pcidev.hookspecs.pcidev_migration_blockers`), one plugin at a time.

    This is the one place plugins are asked; :func:`pcidev.migration.collect_blockers`
    adds the device's own reasons. A misbehaving plugin never crashes the caller
    and never hides another plugin's reasons: a plugin whose hook raises, or
    returns anything but a list (or tuple) of strings, contributes one reason
    naming it, so the migration is refused rather than attempted.

    :param pm: the plugin manager.
    :param device: the device about to be migrated.
    :returns: every plugin's reasons, concatenated in pluggy's call order (empty:
        no plugin objects).
    """
    reasons: list[str] = []
    for hook in each_plugin(pm, "pcidev_migration_blockers"):
        try:
            results = hook(device=device)
        except PluginError as exc:
            reasons.append(str(exc))
            continue
        for result in results:
            if isinstance(result, (list, tuple)) and all(isinstance(r, str) for r in result):
                reasons.extend(result)
            else:
                reasons.append(
                    f"plugin {hook.name!r} returned {_safe_repr(result):.100} from "
                    "pcidev_migration_blockers; expected a list of strings"
                )
    return reasons


def hook_migration_summary(pm: pluggy.PluginManager, device: PciDevice) -> dict[str, Any]:
    """Ask every plugin to describe the stopped ``device``'s state
    (:func:`~pcidev.hookspecs.pcidev_migration_summary`), one plugin at a time.

    A plugin that raises or returns anything but a dictionary with string keys never
    fails the migration: its part becomes an ``error`` entry naming it.

    :param pm: the plugin manager.
    :param device: the stopped device whose state was just saved.
    :returns: every plugin's figures merged (a later plugin's key does not replace an
        earlier one's).
    """
    out: dict[str, Any] = {}
    for hook in each_plugin(pm, "pcidev_migration_summary"):
        try:
            results = hook(device=device)
        except PluginError as exc:
            out.setdefault("error", str(exc))
            continue
        for result in results:
            if isinstance(result, dict) and all(isinstance(k, str) for k in result):
                for key, value in result.items():
                    out.setdefault(key, value)
            else:
                out.setdefault("error", f"plugin {hook.name!r} returned {_safe_repr(result):.100} from "
                                        "pcidev_migration_summary; expected a dictionary")
    return out


_Workload = TypeVar("_Workload")


def hook_migration_workload(pm: pluggy.PluginManager, device_type: str, options: Mapping[str, Any],
                            kind: type[_Workload]) -> _Workload | None:
    """The standard workload a plugin provides for ``device_type``
    (:func:`~pcidev.hookspecs.pcidev_migration_workload`), asking one plugin at a time.

    :param pm: the plugin manager.
    :param device_type: the device type.
    :param options: the caller's wishes (see the hook).
    :param kind: the class a workload must be an instance of
        (:class:`pcidev.testing.Workload`, which this module cannot import).
    :returns: the first plugin's workload, or None when no plugin provides one.
    :raises PluginError: naming the plugin, if its hook raises or returns something that
        is not a ``kind``.
    """
    for hook in each_plugin(pm, "pcidev_migration_workload"):
        for result in hook(device_type=device_type, options=options):
            if not isinstance(result, kind):
                raise PluginError(f"plugin {hook.name!r} returned {_safe_repr(result):.100} from "
                                  f"pcidev_migration_workload; expected a {kind.__name__}")
            return result
    return None


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # a plugin's object whose __repr__ fails
        return f"a {type(value).__name__}"
