"""Entry point of the NVMe plugin (``[project.entry-points.pcidev] nvme``).

pcidev finds this module only through its entry point, exactly as it finds a
third-party plugin, and registers it under the name ``nvme`` (block it with
``pcidev -p no:nvme`` or ``PCIDEV_BLOCKED_PLUGINS=nvme``).
"""

from __future__ import annotations

from pcidev.hookspecs import hookimpl
from pcidev.registry import DeviceRegistry
from pcidev_nvme.backends import BUILTIN_BACKENDS, add_backend
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.namespace import make_namespace
from pcidev_nvme.testing import bench


@hookimpl
def pcidev_register_devices(registry: DeviceRegistry) -> None:
    """Register the NVMe controller device type, the namespace component (QEMU's
    ``nvme-ns`` beside ``nvme``) and the built-in namespace backends.

    Components:

    * ``nvme-ns/nvme-ns``: :func:`pcidev_nvme.namespace.make_namespace`, which builds
      a namespace from a spec such as ``"file:path=x.img,size=1G"``;
    * ``nvme-backend/<name>``: the factory of each built-in backend (``file``,
      ``mem``, ``null``). Other plugins register theirs the same way, from their own
      ``pcidev_register_devices`` (:func:`pcidev_nvme.backends.add_backend`), and
      :meth:`~pcidev.registry.DeviceRegistry.create` hands the whole catalogue to the
      controller;
    * ``bench/nvme``: :func:`run_bench`, run by ``pcidev bench nvme``.

    :param registry: the registry collecting device types.
    """
    registry.add_device(NvmeController)
    registry.add_component("nvme-ns", "nvme-ns", make_namespace)
    for name, factory in BUILTIN_BACKENDS.items():
        add_backend(registry, name, factory)
    registry.add_component("bench", "nvme", run_bench)


def run_bench(argv: list[str]) -> int:
    """NVMe I/O benchmark through the software host: pcidev bench nvme [--json].

    The ``bench/nvme`` component that ``pcidev bench nvme`` runs (see
    :mod:`pcidev_nvme.testing.bench`; owned by the data path).

    :param argv: the benchmark's arguments.
    :returns: the exit status.
    """
    return bench.main(argv)
