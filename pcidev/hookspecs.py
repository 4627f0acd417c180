"""Hook specifications: the complete contract between pcidev and its plugins.

A plugin is any module or object with functions marked by :data:`hookimpl`
whose names match the ``pcidev_*`` specifications below.  A distribution
makes its plugin known through the entry-point group ``pcidev``::

    [project.entry-points.pcidev]
    edu = "pcidev_edu.plugin"

:func:`pcidev.plugins.make_plugin_manager` loads it under the entry-point name
(``edu``), validates every hook implementation against these specifications
and fails with :class:`~pcidev.errors.PluginError` on an unknown (for example
misspelled) hook name.  A minimal plugin module::

    from pcidev import hookimpl
    from pcidev_edu.device import EduDevice

    @hookimpl
    def pcidev_register_devices(registry):
        registry.add_device(EduDevice)

Lifecycle, in order:

1. every plugin is registered (built-ins, then entry points, then plugins passed
   explicitly);
2. :func:`pcidev_add_hookspecs` lets plugins publish hook specifications of
   their own;
3. unknown hook names are rejected (``check_pending``);
4. :func:`pcidev_add_options` is called once by the command line, before parsing;
5. :func:`pcidev_register_devices` is called once per plugin by
   :func:`pcidev.plugins.load_registry`;
6. :func:`pcidev_migration_blockers` is called whenever a running device is asked
   whether it can migrate; :func:`pcidev_migration_summary` once the stopped device's
   state is saved, for the migration's report;
7. :func:`pcidev_migration_workload` is called by the testing toolkit
   (:func:`pcidev.testing.standard_workload`) when a test or an example asks for a
   device type's standard workload.

**Plugin-defined hooks.**  A plugin that wants hooks of its own puts their
specifications, marked with :data:`hookspec`, in a module of its own and adds
them from :func:`pcidev_add_hookspecs`::

    # pcidev_acme/hookspecs.py
    from pcidev.hookspecs import hookspec

    @hookspec
    def pcidev_acme_tune(settings):
        '''Adjust the acme device's settings.'''

    # pcidev_acme/plugin.py
    from pcidev import hookimpl
    from pcidev_acme import hookspecs

    @hookimpl
    def pcidev_add_hookspecs(pluginmanager):
        pluginmanager.add_hookspecs(hookspecs)

Building blocks that other plugins contribute to a device (the NVMe plugin's
namespace backends, for example) need no hook of their own: they are registry
components (``registry.add_component("nvme-backend", name, factory)`` from
:func:`pcidev_register_devices`), and
:meth:`pcidev.registry.DeviceRegistry.create` hands a device the catalogue of
the kinds its config class names.

Implementations of such hooks may live in plugins loaded before or after the one
adding the specification: pluggy validates them when the specification arrives,
and the unknown-hook check runs only after step 2.  Name plugin-defined hooks
``pcidev_<plugin>_*`` so they cannot collide with future core hooks.  Call them
with ``pm.hook.<name>(...)``, or one plugin at a time with
:func:`pcidev.plugins.each_plugin` to attribute results and errors to plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping
    from typing import Any

    from pcidev.device import PciDevice
    from pcidev.registry import DeviceRegistry

__all__ = [
    "PROJECT_NAME",
    "hookimpl",
    "hookspec",
    "pcidev_add_hookspecs",
    "pcidev_add_options",
    "pcidev_migration_blockers",
    "pcidev_migration_summary",
    "pcidev_migration_workload",
    "pcidev_register_devices",
]

#: The pluggy project name; also the entry-point group plugins are found in.
PROJECT_NAME = "pcidev"

#: Marker for hook specifications (used here and in plugin-defined spec modules).
hookspec = pluggy.HookspecMarker(PROJECT_NAME)

#: Marker for hook implementations in plugins; re-exported as ``pcidev.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def pcidev_add_hookspecs(pluginmanager: pluggy.PluginManager) -> None:
    """Add hook specifications defined by a plugin.

    Called once, after every plugin has been registered and before unknown hook
    names are rejected, so the hooks added here are validated like core hooks.
    Call :meth:`pluggy.PluginManager.add_hookspecs` with a module or class whose
    functions are marked with :data:`hookspec`.

    :param pluginmanager: the plugin manager being set up.
    :returns: nothing; the return value is ignored.

    .. note::
        Adding a specification that already exists (for instance the same module
        from two plugins) is an error reported as
        :class:`~pcidev.errors.PluginError`.
    """


@hookspec
def pcidev_add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add plugin-global command-line options.

    Called once by :func:`pcidev.cli.main` after all plugins are loaded and
    before the command line is parsed.  ``parser`` is the ``plugin options``
    argument group of the top-level parser: call
    :meth:`~argparse.ArgumentParser.add_argument` on it.  The options go before
    the subcommand (``pcidev --nvme-backend-dir /tmp demo``) and their values
    reach every command in its :class:`argparse.Namespace`.

    Use it for flags that concern the plugin as a whole (backend directories,
    tracing).  Per-device properties belong in the device's configuration
    class, not here.  Prefix option names with the plugin name
    (``--nvme-...``): a clash with another option is reported as
    :class:`~pcidev.errors.PluginError` naming the plugin.

    :param parser: the argument group to add options to.
    :returns: nothing; the return value is ignored.
    """


@hookspec
def pcidev_register_devices(registry: DeviceRegistry) -> None:
    """Register the device types (and components) a plugin provides.

    Called once per plugin by :func:`pcidev.plugins.load_registry`.  Call
    :meth:`~pcidev.registry.DeviceRegistry.add_device` for each
    :class:`~pcidev.device.PciDevice` subclass, and
    :meth:`~pcidev.registry.DeviceRegistry.add_component` for other named
    building blocks (for example NVMe namespace backends).  The registry records
    which plugin and distribution registered each entry.

    Import heavy modules inside the implementation, not at plugin import time:
    a failure is then reported as a registration error of this plugin.

    :param registry: the registry collecting device types.
    :returns: nothing; the return value is ignored.
    :raises pcidev.errors.PluginError: (from the registry) for a duplicate or
        invalid type name, a class that is not a
        :class:`~pcidev.device.PciDevice` or an invalid PCI identity.
    """


@hookspec
def pcidev_migration_blockers(device: PciDevice) -> list[str]:
    """Report reasons why ``device`` cannot be migrated right now.

    A collecting hook: every implementation is called and the lists are
    concatenated (see :func:`pcidev.plugins.hook_migration_blockers`), so all
    reasons are reported at once.  It complements the device's own blockers and
    the static ones recorded by the registry (a device type without a vmstate
    description); it suits cross-cutting plugins, such as a storage backend that
    knows an open raw block device cannot follow the process.

    :param device: a realized device instance (of any type, not only the
        plugin's own: return an empty list for devices you know nothing about).
    :returns: human-readable reasons, one sentence each; empty if migration is
        fine as far as this plugin knows. An implementation that raises, or
        returns anything but a list of strings, blocks the migration with a
        reason naming the plugin.
    """
    raise NotImplementedError  # a specification: pluggy calls the implementations, never this


@hookspec
def pcidev_migration_summary(device: PciDevice) -> dict[str, Any]:
    """Describe the state a stopped device is migrated in, for the migration's report.

    Called by the migration channel (:func:`pcidev.migration.channel.migrate_out`) right
    after the stopped device's state was saved, through
    :func:`pcidev.plugins.hook_migration_summary`; the merged dictionaries travel in the
    report as ``summary`` (:class:`pcidev.migration.channel.MigrationResult`). It is
    evidence, not state: the NVMe plugin reports how many completion queues were full,
    how many completions were parked in their backlogs and how many Asynchronous Event
    Requests were outstanding at the stop, so a test can assert that a migration really
    happened in such a state. Keep it cheap (the device is stopped) and never change the
    device.

    :param device: the stopped source device (of any type: return ``None`` or an empty
        dictionary for devices you know nothing about).
    :returns: figures by name (JSON-ready: numbers, strings, booleans). A plugin that
        raises or returns anything but a dictionary never fails the migration: the
        summary then holds one ``error`` entry naming it.
    """
    raise NotImplementedError  # a specification: pluggy calls the implementations, never this


@hookspec
def pcidev_migration_workload(device_type: str, options: Mapping[str, Any]) -> object | None:
    """Provide the standard verified workload of ``device_type`` for migration tests.

    :func:`pcidev.testing.standard_workload` calls it (through
    :func:`pcidev.plugins.hook_migration_workload`) for
    ``examples/migrate_between_processes.py``, the soak tests and any test that wants
    "the usual load" on a device while it migrates (:func:`pcidev.testing.migrate_under_load`).
    The first plugin (in pluggy's call order) that returns something wins.

    The workload is a :class:`pcidev.testing.Workload`: it drives the device from the
    software host, checks every result (data by CRC-32C per block, completions counted
    so lost and duplicated ones are found) and says what device configuration it needs
    (:attr:`~pcidev.testing.Workload.properties`, ``probe``, ``ram_size``); its
    :meth:`~pcidev.testing.Workload.report` gives the figures (``mismatches``,
    ``lost_completions``, ``duplicate_completions``...). See the NVMe plugin's
    :class:`pcidev_nvme.testing.workload.VerifiedIo`.

    :param device_type: the registered device type asked for (return ``None`` for one
        that is not yours).
    :param options: what the caller wants: ``queues`` (I/O queues to use), ``qd``
        (commands in flight per queue), ``transport`` (``unix`` or ``tcp``: a workload
        picks backings that can follow over it), ``workdir`` (a private directory for
        backing files, removed after the run) and ``seed`` (for the random choices;
        None: random). Ignore the ones that mean nothing for your device.
    :returns: a :class:`pcidev.testing.Workload`, or ``None``.
    """
    raise NotImplementedError  # a specification: pluggy calls the implementations, never this
