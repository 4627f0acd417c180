"""Entry point of the NVMe plugin (``[project.entry-points.pcidev] nvme``).

pcidev finds this module only through its entry point, exactly as it finds a
third-party plugin, and registers it under the name ``nvme`` (block it with
``pcidev -p no:nvme`` or ``PCIDEV_BLOCKED_PLUGINS=nvme``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pcidev.device import PciDevice
from pcidev.hookspecs import hookimpl
from pcidev.registry import DeviceRegistry
from pcidev_nvme.backends import BUILTIN_BACKENDS, add_backend
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.namespace import make_namespace
from pcidev_nvme.testing import bench
from pcidev_nvme.testing.fuzz import NvmeGuestTarget, NvmeVmstateTarget


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
    * ``bench/nvme``: :func:`run_bench`, run by ``pcidev bench nvme``;
    * ``fuzz-target/nvme-guest``: :class:`~pcidev_nvme.testing.fuzz.NvmeGuestTarget`, run by
      ``pcidev fuzz nvme-guest``, and ``fuzz-target/nvme-vmstate``:
      :class:`~pcidev_nvme.testing.fuzz.NvmeVmstateTarget`.

    :param registry: the registry collecting device types.
    """
    registry.add_device(NvmeController)
    registry.add_component("nvme-ns", "nvme-ns", make_namespace)
    for name, factory in BUILTIN_BACKENDS.items():
        add_backend(registry, name, factory)
    registry.add_component("bench", "nvme", run_bench)
    registry.add_component("fuzz-target", NvmeGuestTarget.name, NvmeGuestTarget)
    registry.add_component("fuzz-target", NvmeVmstateTarget.name, NvmeVmstateTarget)


def run_bench(argv: list[str]) -> int:
    """NVMe I/O benchmark through the software host: pcidev bench nvme [--json].

    The ``bench/nvme`` component that ``pcidev bench nvme`` runs (see
    :mod:`pcidev_nvme.testing.bench`; owned by the data path).

    :param argv: the benchmark's arguments.
    :returns: the exit status.
    """
    return bench.main(argv)


@hookimpl
def pcidev_migration_summary(device: PciDevice) -> dict[str, int] | None:
    """What the stopped controller's saved state holds that a migration test wants to
    see happen (:func:`~pcidev.hookspecs.pcidev_migration_summary`): the completion
    queues that were full (``cqs_full``), the completions parked in their backlogs
    (``cq_backlog``, posted by the destination once the host frees slots), the
    submission queue entries not fetched yet (``sq_unfetched``) and the outstanding
    Asynchronous Event Requests (``aers_outstanding``); and how long the stop's quiesce
    took (``quiesce_drain_us``: until the commands in flight completed,
    ``quiesce_flush_us``: the ``fdatasync`` of what was written since the last one).

    :param device: the stopped device (None is returned for another type).
    """
    if not isinstance(device, NvmeController):
        return None
    cqs = [cq for cq in device.completion_queues if cq is not None]
    sqs = [sq for sq in device.submission_queues if sq is not None]
    times = device.quiesce_times
    with device.state_lock:
        out = {"cqs_full": sum(cq.full() for cq in cqs), "cq_backlog": sum(len(cq.backlog) for cq in cqs),
               "sq_unfetched": sum((sq.tail - sq.head) % sq.size for sq in sqs),
               "aers_outstanding": len(device.aer.outstanding)}
    if times is not None:
        out.update(quiesce_drain_us=round(times.drain * 1e6), quiesce_flush_us=round(times.flush * 1e6))
    return out


@hookimpl
def pcidev_migration_workload(device_type: str, options: Mapping[str, Any]) -> Any:
    """The NVMe controller's standard verified workload
    (:class:`pcidev_nvme.testing.workload.VerifiedIo`; see
    :func:`~pcidev.hookspecs.pcidev_migration_workload`).

    :param device_type: ``nvme`` (anything else: None).
    :param options: ``queues``, ``qd``, ``transport``, ``workdir``, ``seed``.
    """
    if device_type != NvmeController.TYPE_NAME:
        return None
    # imported here: the host-side toolkit is not loaded in every device process
    from pcidev_nvme.testing.workload import VerifiedIo
    return VerifiedIo.from_options(options)
