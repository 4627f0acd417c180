"""The device registry: which device types (and components) the loaded plugins provide.

Plugins fill a :class:`DeviceRegistry` from their
:func:`~pcidev.hookspecs.pcidev_register_devices` hook::

    @hookimpl
    def pcidev_register_devices(registry):
        registry.add_device(NvmeController)
        registry.add_component("nvme-backend", "file", FileBackend)

Everything is validated at registration, so a broken plugin fails when it is
loaded rather than when a guest first touches the device: type names must be
unique and match ``^[a-z][a-z0-9_-]*$``, device classes must subclass
:class:`~pcidev.device.PciDevice` and carry a valid PCI identity and a
``CONFIG_CLASS`` that is ``None`` or an attrs class.  Each entry remembers the
plugin and distribution that registered it (see
:func:`pcidev.plugins.load_registry`).

:meth:`DeviceRegistry.create` is the one device factory: ``pcidev serve``, the
device-link process server, the command line and tests build devices from a
type name and properties through it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, TypeGuard

import attrs

from pcidev.device import PciDevice
from pcidev.errors import ConfigError, PluginError
from pcidev.properties import structure_config

__all__ = ["ComponentEntry", "ConfiguredDeviceType", "DeviceEntry", "DeviceRegistry", "PluginOrigin", "check_name"]

_NAME_RE = re.compile(r"[a-z][a-z0-9_-]*")


class ConfiguredDeviceType(Protocol):
    """A device class with a ``CONFIG_CLASS``: it is built from an instance of that
    class (``cls(config, name=...)``)."""

    #: the attrs class of the type's properties (checked by :meth:`DeviceRegistry.add_device`)
    CONFIG_CLASS: type[Any]

    # config: an instance of CONFIG_CLASS, whatever class each device type declares
    def __call__(self, config: Any, /, *, name: str | None = None) -> PciDevice: ...


def _takes_config(cls: type[PciDevice]) -> TypeGuard[ConfiguredDeviceType]:
    return cls.CONFIG_CLASS is not None


def check_name(name: object, what: str) -> str:
    """Validate a registry name (device type, component kind or component name).

    :param name: the candidate name.
    :param what: what the name is for, used in the error message.
    :returns: ``name``, now known to be a valid name.
    :raises PluginError: if ``name`` is not a string matching ``^[a-z][a-z0-9_-]*$``.
    """
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise PluginError(
            f"invalid {what} {name!r}: must match ^[a-z][a-z0-9_-]*$ "
            "(lower-case letter, then lower-case letters, digits, '_' or '-')"
        )
    return name


@attrs.frozen
class PluginOrigin:
    """Where a registry entry came from.

    :param plugin: name of the plugin in the plugin manager, or ``None`` when
        registered directly (outside any plugin).
    :param distribution: name of the installed distribution providing the
        plugin, if it was loaded from an entry point.
    :param version: version of that distribution.
    """

    plugin: str | None = None
    distribution: str | None = None
    version: str | None = None

    def describe(self) -> str:
        """Return a short human-readable description, e.g. ``plugin 'nvme' (pcidev 0.1.0)``.

        :returns: the description.
        """
        if self.plugin is None:
            return "direct registration"
        text = f"plugin {self.plugin!r}"
        if self.distribution is not None:
            text += f" ({self.distribution} {self.version or '?'})"
        return text


@attrs.frozen
class DeviceEntry:
    """A registered device type.

    :param name: the type name (as used on command lines, ``-device NAME,...``).
    :param cls: the :class:`~pcidev.device.PciDevice` subclass.
    :param plugin: name of the plugin that registered it, if any.
    :param distribution: distribution providing that plugin, if any.
    :param version: version of that distribution, if any.
    """

    name: str
    cls: type[PciDevice]
    plugin: str | None = None
    distribution: str | None = None
    version: str | None = None


@attrs.frozen
class ComponentEntry:
    """A registered component (a named building block that is not a device).

    :param kind: the component kind, e.g. ``nvme-backend``.
    :param name: the name within that kind, e.g. ``file``.
    :param obj: the registered object (typically a class or a factory).
    :param plugin: name of the plugin that registered it, if any.
    :param distribution: distribution providing that plugin, if any.
    :param version: version of that distribution, if any.
    """

    kind: str
    name: str
    obj: Any
    plugin: str | None = None
    distribution: str | None = None
    version: str | None = None


def _check_int_attr(cls: type, attr: str, bits: int, *, reject_all_ones: bool) -> None:
    value = getattr(cls, attr, None)
    where = f"{cls.__module__}.{cls.__qualname__}.{attr}"
    if value is None:
        raise PluginError(f"{where} is missing")
    if not isinstance(value, int) or isinstance(value, bool):
        raise PluginError(f"{where} must be an int, got {type(value).__name__}")
    limit = (1 << bits) - 1
    if not 0 <= value <= limit:
        raise PluginError(f"{where} = {value:#x} does not fit in {bits} bits")
    if reject_all_ones and value == limit:
        raise PluginError(
            f"{where} = {value:#x} is invalid: all-ones is what an absent function reads as"
        )


class DeviceRegistry:
    """Device types and components provided by plugins.

    Iterating yields type names in registration order; ``name in registry``
    tests for a device type.

    Entries record their :class:`PluginOrigin`: while
    :func:`pcidev.plugins.load_registry` calls a plugin's hook it wraps the call
    in :meth:`registering_as`.
    """

    def __init__(self) -> None:
        self._devices: dict[str, DeviceEntry] = {}
        self._components: dict[tuple[str, str], ComponentEntry] = {}
        self._origin = PluginOrigin()

    # -- registration -------------------------------------------------------------

    @contextlib.contextmanager
    def registering_as(self, origin: PluginOrigin) -> Iterator[DeviceRegistry]:
        """Attribute registrations made inside the ``with`` block to ``origin``.

        :param origin: the plugin (and distribution) being loaded.
        :returns: a context manager yielding this registry.
        """
        saved, self._origin = self._origin, origin
        try:
            yield self
        finally:
            self._origin = saved

    def add_device(self, cls: type[PciDevice], *, name: str | None = None) -> DeviceEntry:
        """Register a device type.

        :param cls: a subclass of :class:`~pcidev.device.PciDevice` with class
            attributes ``TYPE_NAME`` (unless ``name`` is given), ``VENDOR_ID``
            and ``DEVICE_ID`` (16-bit, not ``0xFFFF``) and ``CLASS_CODE`` (24-bit).
        :param name: the type name; defaults to ``cls.TYPE_NAME``.
        :returns: the new entry.
        :raises PluginError: if ``cls`` is not a ``PciDevice`` subclass (or is
            ``PciDevice`` itself), the name is missing, malformed or already
            registered, an ID attribute is missing or out of range, or
            ``CONFIG_CLASS`` is neither ``None`` nor an attrs class.
        """
        if not isinstance(cls, type):
            raise PluginError(f"add_device() expects a class, got {cls!r}")
        if not issubclass(cls, PciDevice):
            raise PluginError(
                f"{cls.__module__}.{cls.__qualname__} is not a subclass of pcidev.device.PciDevice"
            )
        if cls is PciDevice:
            raise PluginError("the PciDevice base class itself cannot be registered")
        if name is None:
            name = getattr(cls, "TYPE_NAME", None)
            if not name:
                raise PluginError(
                    f"{cls.__module__}.{cls.__qualname__} has no TYPE_NAME; "
                    "set it or pass name= to add_device()"
                )
        check_name(name, "device type name")
        _check_int_attr(cls, "VENDOR_ID", 16, reject_all_ones=True)
        _check_int_attr(cls, "DEVICE_ID", 16, reject_all_ones=True)
        _check_int_attr(cls, "CLASS_CODE", 24, reject_all_ones=False)
        config_cls = getattr(cls, "CONFIG_CLASS", None)
        if config_cls is not None and not (isinstance(config_cls, type) and attrs.has(config_cls)):
            raise PluginError(
                f"{cls.__module__}.{cls.__qualname__}.CONFIG_CLASS must be an attrs class or None, "
                f"got {config_cls!r}"
            )
        existing = self._devices.get(name)
        if existing is not None:
            raise PluginError(
                f"device type {name!r} is already registered by "
                f"{_origin_of(existing).describe()}"
            )
        origin = self._origin
        entry = DeviceEntry(name, cls, origin.plugin, origin.distribution, origin.version)
        self._devices[name] = entry
        return entry

    def add_component(self, kind: str, name: str, obj: object) -> ComponentEntry:
        """Register a named component of some kind (e.g. an NVMe namespace backend).

        :param kind: the component kind, e.g. ``nvme-backend``; a valid registry name.
        :param name: the component's name within ``kind``; a valid registry name.
        :param obj: the component (class, factory, ...); must not be ``None``.
        :returns: the new entry.
        :raises PluginError: on a malformed kind or name, ``obj`` being ``None``,
            or a duplicate ``(kind, name)``.
        """
        check_name(kind, "component kind")
        check_name(name, f"{kind} component name")
        if obj is None:
            raise PluginError(f"component {kind}/{name} must not be None")
        existing = self._components.get((kind, name))
        if existing is not None:
            raise PluginError(
                f"component {kind}/{name} is already registered by "
                f"{_origin_of(existing).describe()}"
            )
        origin = self._origin
        entry = ComponentEntry(kind, name, obj, origin.plugin, origin.distribution, origin.version)
        self._components[(kind, name)] = entry
        return entry

    # -- construction -------------------------------------------------------------

    def create(
        self, type_name: str, props: str | Mapping[str, Any] | None = None, *, name: str | None = None
    ) -> PciDevice:
        """Build a device of a registered type from its properties: the one device factory.

        The type's ``CONFIG_CLASS`` is structured from ``props`` with
        :func:`pcidev.properties.structure_config`; config fields whose metadata
        names a component kind (``metadata={"component": "nvme-backend"}``) get
        this registry's catalogue of that kind (``{name: object}``), which is how
        components of other plugins reach a device. The device is then built as
        ``cls(config, name=name)``, or ``cls(name=name)`` for a type without a
        config class.

        :param type_name: a registered device type.
        :param props: ``"key=value,..."``, a mapping, or ``None``/``""`` for the defaults.
        :param name: the device's name in logs.
        :returns: the new device.
        :raises PluginError: unknown device type.
        :raises ConfigError: bad properties (the message names the property), or
            properties for a type that takes none.
        """
        cls = self.get(type_name)
        if not _takes_config(cls):
            if props:
                raise ConfigError(
                    f"{type_name}: this device type takes no properties (got {props!r}); a device type declares "
                    f"its properties with CONFIG_CLASS, an attrs class (see 'Writing a plugin' in pcidev's README)")
            return cls(name=name)
        config_cls = cls.CONFIG_CLASS
        config = structure_config(config_cls, props, what=type_name)
        catalogues = {
            f.name: {e.name: e.obj for e in self.components(f.metadata["component"])}
            for f in attrs.fields(config_cls)
            if "component" in f.metadata
        }
        if catalogues:
            config = attrs.evolve(config, **catalogues)
        return cls(config, name=name)

    # -- lookup -------------------------------------------------------------------

    def get(self, name: str) -> type[PciDevice]:
        """Return the device class registered as ``name``.

        :param name: a device type name.
        :returns: the class.
        :raises PluginError: if no such type is registered.
        """
        return self.entry(name).cls

    def entry(self, name: str) -> DeviceEntry:
        """Return the full entry for device type ``name``.

        :param name: a device type name.
        :returns: the entry, with its origin.
        :raises PluginError: if no such type is registered.
        """
        try:
            return self._devices[name]
        except (KeyError, TypeError):
            known = ", ".join(self._devices) or "none"
            raise PluginError(f"unknown device type {name!r} (known: {known})") from None

    def devices(self) -> list[DeviceEntry]:
        """Return every registered device type, in registration order.

        :returns: the entries.
        """
        return list(self._devices.values())

    def component(self, kind: str, name: str) -> object:
        """Return the component registered as ``name`` under ``kind``.

        :param kind: the component kind.
        :param name: the component name.
        :returns: the registered object.
        :raises PluginError: if there is no such component.
        """
        try:
            return self._components[(kind, name)].obj
        except (KeyError, TypeError):
            known = ", ".join(e.name for e in self.components(kind)) or "none"
            raise PluginError(f"unknown {kind} component {name!r} (known: {known})") from None

    def components(self, kind: str | None = None) -> list[ComponentEntry]:
        """Return registered components, in registration order.

        :param kind: only this kind; all kinds if ``None``.
        :returns: the entries.
        """
        return [e for e in self._components.values() if kind is None or e.kind == kind]

    def static_blockers(self, name: str) -> list[str]:
        """Return the reasons a device type can never be migrated.

        A device class whose ``VMSTATE`` attribute is missing or ``None`` has no
        description of its state and is therefore unmigratable (QEMU's
        ``.unmigratable = 1``).

        :param name: a device type name.
        :returns: the reasons; empty if the type is migratable in principle.
        :raises PluginError: if no such type is registered.
        """
        cls = self.get(name)
        if getattr(cls, "VMSTATE", None) is None:
            return [f"device type {name} has no vmstate description"]
        return []

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._devices))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._devices

    def __len__(self) -> int:
        return len(self._devices)

    def __repr__(self) -> str:
        devices = list(self._devices)
        return f"<DeviceRegistry devices={devices!r} components={len(self._components)}>"


def _origin_of(entry: DeviceEntry | ComponentEntry) -> PluginOrigin:
    return PluginOrigin(entry.plugin, entry.distribution, entry.version)
