"""A testing toolkit for device authors: plug a device into the software host,
round-trip it through save and load, and pytest fixtures for both.

Installing pcidev installs the pytest plugin :mod:`pcidev.testing.plugin`
(entry point ``pcidev`` in the ``pytest11`` group), so a project that depends on
pcidev gets its fixtures (``pcidev_machine``, ``pcidev_registry``,
``pcidev_device``) without configuring anything. The functions here work
without pytest:

* :func:`plugged`: build a device (by registered type name, or an instance), plug
  it into a :class:`~pcidev.host.Machine` and enable it as a driver's probe does;
* :func:`roundtrip`: save a device and load the stream into a fresh device of the
  same type and configuration, as a migration does, in this process;
* :func:`migrate_under_load`: migrate a device of any registered type between
  processes N times while a :class:`Workload` keeps running on it and verifies
  itself (:mod:`pcidev.testing.migration`);
* :func:`standard_workload`: the verified workload a device type's plugin provides
  (with the device configuration it needs), for :func:`migrate_under_load`
  (:mod:`pcidev.testing.workloads`);
* :func:`served`: serve a device over vfio-user with ``pcidev serve`` in a process of
  its own, to drive it as QEMU would (:mod:`pcidev.testing.served`).
"""

from __future__ import annotations

from pcidev.testing.harness import RoundtripError, plugged, probe, roundtrip, state_differences, teardown_device
from pcidev.testing.migration import (
    MigrationRecord,
    MigrationRunResult,
    Workload,
    WorkloadContext,
    WorkloadError,
    migrate_under_load,
)
from pcidev.testing.served import ServedDevice, served
from pcidev.testing.workloads import standard_workload

__all__ = ["RoundtripError", "plugged", "roundtrip", "state_differences", "teardown_device",
           "migrate_under_load", "Workload", "WorkloadContext", "WorkloadError", "MigrationRecord",
           "MigrationRunResult", "probe", "served", "ServedDevice", "standard_workload"]
