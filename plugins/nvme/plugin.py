"""Entry point of the NVMe plugin (``[project.entry-points.pcidev] nvme``).

pcidev finds this module only through its entry point, exactly as it finds a
third-party plugin, and registers it under the name ``nvme`` (block it with
``pcidev -p no:nvme`` or ``PCIDEV_BLOCKED_PLUGINS=nvme``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pcidev.hookspecs import hookimpl

if TYPE_CHECKING:
    import pluggy

    from pcidev.registry import DeviceRegistry


@hookimpl
def pcidev_add_hookspecs(pluginmanager: pluggy.PluginManager) -> None:
    """Publish the NVMe plugin's own hooks (namespace backends, see
    :mod:`pcidev_nvme.hookspecs`).

    :param pluginmanager: the plugin manager being set up.
    """
    from pcidev_nvme import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def pcidev_register_devices(registry: DeviceRegistry) -> None:
    """Register the NVMe controller device type, the namespace component (QEMU's
    ``nvme-ns`` beside ``nvme``) and the built-in namespace backends.

    Components:

    * ``nvme-ns/nvme-ns``: :func:`pcidev_nvme.namespace.make_namespace`, which builds
      a namespace from a spec such as ``"file:path=x.img,size=1G"``;
    * ``nvme-backend/<name>``: the factory of each built-in backend (``file``,
      ``mem``, ``null``). Backends of other plugins come through the NVMe plugin's
      own hook, :func:`pcidev_nvme.hookspecs.pcidev_nvme_register_backends`;
    * ``bench/nvme``: :func:`run_bench`, run by ``pcidev bench nvme``.

    :param registry: the registry collecting device types.
    """
    # Imported here so that loading the plugin stays cheap and an error in the
    # controller module is reported as a registration failure of this plugin.
    from pcidev_nvme.backends import BACKEND_KIND, builtin_backends
    from pcidev_nvme.controller import NvmeController
    from pcidev_nvme.namespace import make_namespace

    registry.add_device(NvmeController)
    registry.add_component("nvme-ns", "nvme-ns", make_namespace)
    for entry in builtin_backends():
        registry.add_component(BACKEND_KIND, entry.name, entry.factory)
    registry.add_component("bench", "nvme", run_bench)


def run_bench(argv: list[str]) -> int:
    """NVMe I/O benchmark through the software host: pcidev bench nvme [--json].

    The ``bench/nvme`` component that ``pcidev bench nvme`` runs (see
    :mod:`pcidev_nvme.testing.bench`; owned by the data path).

    :param argv: the benchmark's arguments.
    :returns: the exit status.
    """
    from pcidev_nvme.testing.bench import main

    return main(argv)
