"""Namespace backends: where a namespace's blocks live.

A backend is a flat array of ``size`` bytes with vectored reads and writes straight
between it and guest-memory views (no copy in Python for files: ``os.preadv`` /
``os.pwritev``; one ``memcpy`` for memory), plus flush, deallocate and zeroing
(the :class:`~pcidev_nvme.backends.base.Backend` protocol). Four are built in:
``file`` (:mod:`~pcidev_nvme.backends.file`), ``mem``
(:mod:`~pcidev_nvme.backends.mem`), ``null`` (:mod:`~pcidev_nvme.backends.null`) and
``nbd`` (:mod:`~pcidev_nvme.backends.nbd`: an NBD export through libnbd, whose Python
bindings are loaded only when such a namespace is made).

**One registration path.** A backend is a device-registry component of kind
``nvme-backend``, registered from the ordinary
:func:`~pcidev.hookspecs.pcidev_register_devices` hook (the NVMe plugin registers
the built-ins the same way)::

    @hookimpl
    def pcidev_register_devices(registry):
        pcidev_nvme.backends.add_backend(registry, "rbd", make_rbd_backend)
        # same as registry.add_component("nvme-backend", "rbd", make_rbd_backend)

A namespace spec then names it: ``rbd:pool=x,image=y,size=10G``. It reaches a
controller only through :meth:`pcidev.registry.DeviceRegistry.create`, which
puts the registry's ``nvme-backend`` catalogue into the controller's config
(``NvmeConfig.backends``); a controller constructed directly
(``NvmeController("ns=mem:size=1M")``) knows the built-ins
(:data:`BUILTIN_BACKENDS`) and never loads plugins.

A factory takes the option dictionary of the namespace spec (string values),
**removes** the options it understands (:func:`~pcidev_nvme.backends.base.take_options`
structures them into a typed attrs config with pcidev's property grammar) and
returns a backend; options left over are reported as unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pcidev.errors import ConfigError, PluginError
from pcidev.registry import ComponentEntry, DeviceRegistry
from pcidev_nvme.backends.base import Backend, BaseBackend, punch_hole, take_options
from pcidev_nvme.backends.file import FileBackend, FileConfig, make_file
from pcidev_nvme.backends.mem import MemConfig, MemoryBackend, make_mem
from pcidev_nvme.backends.nbd import NbdBackend, NbdConfig, make_nbd
from pcidev_nvme.backends.null import NullBackend, NullConfig, make_null

__all__ = [
    "BACKEND_KIND",
    "BUILTIN_BACKENDS",
    "BUILTIN_BACKEND_CONFIGS",
    "Backend",
    "BackendFactory",
    "BaseBackend",
    "FileBackend",
    "FileConfig",
    "MemConfig",
    "MemoryBackend",
    "NbdBackend",
    "NbdConfig",
    "NullBackend",
    "NullConfig",
    "add_backend",
    "create_backend",
    "punch_hole",
    "take_options",
]

#: Device-registry component kind under which backends are registered.
BACKEND_KIND = "nvme-backend"

#: A backend factory: takes the spec's options (removing those it uses), returns a backend.
BackendFactory = Callable[[dict[str, Any]], Backend]

#: The built-in backends by name (what a controller built without a registry knows).
BUILTIN_BACKENDS: Mapping[str, BackendFactory] = {
    "file": make_file, "mem": make_mem, "nbd": make_nbd, "null": make_null,
}

#: The option classes of the built-in backends by name (what ``pcidev describe nvme`` lists).
BUILTIN_BACKEND_CONFIGS: Mapping[str, type] = {
    "file": FileConfig, "mem": MemConfig, "nbd": NbdConfig, "null": NullConfig,
}

#: Attributes every backend must have (see :class:`Backend`; ``min_block`` and
#: ``identity_path`` are optional).
_REQUIRED = (
    "size", "inline", "read_only", "readv", "writev", "flush", "deallocate", "write_zeroes",
    "allocated_bytes", "close",
)


def add_backend(registry: DeviceRegistry, name: str, factory: BackendFactory) -> ComponentEntry:
    """Register ``factory`` as the namespace backend ``name`` (from ``pcidev_register_devices``).

    A typed spelling of ``registry.add_component("nvme-backend", name, factory)``.

    :param registry: the registry passed to the hook.
    :param name: the backend name, ``^[a-z][a-z0-9_-]*$`` (the part before ``:`` in a spec).
    :param factory: ``factory(options: dict) -> Backend``.
    :returns: the registry entry.
    :raises PluginError: a factory that is not callable, a bad or duplicate name.
    """
    if not callable(factory):
        raise PluginError(f"NVMe backend {name!r}: factory {factory!r} is not callable")
    return registry.add_component(BACKEND_KIND, name, factory)


def _close_quietly(backend: Any) -> None:
    try:
        backend.close()
    except Exception:
        pass


def create_backend(name: str, options: Mapping[str, Any],
                   catalogue: Mapping[str, BackendFactory] | None = None) -> Backend:
    """Build a backend from a namespace spec's name and options.

    :param name: backend name.
    :param options: options (not modified).
    :param catalogue: the backends by name (a registry's ``nvme-backend``
        components); ``None`` for :data:`BUILTIN_BACKENDS`.
    :returns: the backend.
    :raises ConfigError: unknown backend, bad or unknown options, or a factory
        failure (any exception from a third-party factory is reported as such).
    """
    known = BUILTIN_BACKENDS if catalogue is None else catalogue
    factory = known.get(name) if isinstance(name, str) else None
    if factory is None:
        names = ", ".join(sorted(known)) or "none"
        hint = ""
        if isinstance(name, str) and ("," in name or "=" in name):
            kind = name.split(",")[0].split("=")[0]
            kind = kind if kind.isprintable() and kind.strip() else "KIND"
            hint = (f"; a backend's options follow a ':' after its name, "
                    f"as in ns={kind}:size=64M")
        raise ConfigError(f"unknown NVMe namespace backend {name!r} (known: {names}){hint}")
    rest = dict(options)
    try:
        backend = factory(rest)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"NVMe backend {name!r} failed: {type(exc).__name__}: {exc}") from exc
    if rest:
        _close_quietly(backend)
        raise ConfigError(f"unknown option(s) for NVMe backend {name!r}: {', '.join(sorted(rest))}")
    missing = [attr for attr in _REQUIRED if not hasattr(backend, attr)]
    if missing:
        _close_quietly(backend)
        raise ConfigError(
            f"NVMe backend {name!r} returned {backend!r} without {', '.join(missing)} "
            "(subclass pcidev_nvme.backends.BaseBackend for defaults)"
        )
    return backend
