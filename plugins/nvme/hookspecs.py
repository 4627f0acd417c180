"""Hook specifications the NVMe plugin adds to pcidev's plugin manager.

The NVMe plugin publishes them from its
:func:`~pcidev.hookspecs.pcidev_add_hookspecs` implementation, so any installed
plugin (loaded before or after the NVMe plugin) can implement them::

    # my_backend_plugin.py, registered under the "pcidev" entry-point group
    from pcidev import hookimpl

    @hookimpl
    def pcidev_nvme_register_backends(registry):
        registry.add_backend("rbd", make_rbd_backend)

A namespace spec then names it: ``rbd:pool=x,image=y,size=10G``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pcidev.hookspecs import hookspec

if TYPE_CHECKING:
    from pcidev_nvme.backends import BackendRegistry

__all__ = ["pcidev_nvme_register_backends"]


@hookspec
def pcidev_nvme_register_backends(registry: BackendRegistry) -> None:
    """Contribute NVMe namespace backends.

    Called once per plugin by :func:`pcidev_nvme.backends.load_backends` when the
    NVMe controller builds its namespaces. Call
    ``registry.add_backend(name, factory)`` for each backend (``add_component(
    "nvme-backend", name, factory)`` is accepted too). ``factory(options)`` gets the
    namespace spec's options as a ``dict`` of strings, removes the ones it
    understands, and returns an object following
    :class:`pcidev_nvme.backends.Backend` (subclass
    :class:`~pcidev_nvme.backends.BaseBackend` for defaults); it raises
    :class:`~pcidev.errors.ConfigError` for bad options.

    :param registry: the :class:`~pcidev_nvme.backends.BackendRegistry` being built.
    :returns: nothing; the return value is ignored.
    :raises pcidev.errors.PluginError: (from the registry) a duplicate or invalid
        backend name.
    """
