"""Migration of a device: its state, its blockers and the channel between processes.

The package sits above :mod:`pcidev.device` (it imports the device, never the
reverse) and below the transports:

* :mod:`~pcidev.migration.function_state`: what the framework migrates for every
  PCI function (the ``pcidev/function`` section) and the configuration fingerprint;
* :mod:`~pcidev.migration.registers`: the values of the registers a device
  declared migratable (the ``pcidev/registers`` section);
* :mod:`~pcidev.migration.snapshot`: save and load one device
  (:func:`save_device`, :func:`load_device_stream`...);
* :mod:`~pcidev.migration.blockers`: why a device cannot migrate now
  (:func:`collect_blockers`);
* :mod:`~pcidev.migration.frames`: the frames of the ``PCIDMIGR`` channel;
* :mod:`~pcidev.migration.precopy`: memory contents over a channel without
  descriptors (:class:`Precopy` while the device runs, :class:`StagedMemory` on the
  destination);
* :mod:`~pcidev.migration.preflight`: the destination's answer, before anything stops,
  to whether it can take the device (the device's facts and checks);
* :mod:`~pcidev.migration.channel`: the ``PCIDMIGR`` wire protocol that moves a
  device between processes (:func:`migrate_out`, :func:`migrate_in`).
"""

from __future__ import annotations

from pcidev.migration.blockers import collect_blockers, descriptor_blockers, device_blockers
from pcidev.migration.channel import (
    MAGIC,
    MAX_STREAM_SIZE,
    PROTOCOL_VERSION,
    IncomingResult,
    MigrationResult,
    boot_id,
    migrate_in,
    migrate_out,
)
from pcidev.migration.function_state import (
    FUNCTION_SECTION,
    DmaRegionState,
    EventfdState,
    FunctionState,
    LoadedResources,
    MsixState,
    OwnedEventfdSink,
    RamBarsState,
    RamBarState,
    framework_fingerprint,
)
from pcidev.migration.precopy import (
    DirtyBitmap,
    MemorySource,
    Precopy,
    PrecopyReport,
    StagedMemory,
)
from pcidev.migration.registers import REGISTERS_SECTION, RegistersState
from pcidev.migration.snapshot import (
    VMStateSnapshot,
    load_device,
    load_device_stream,
    prepare_vmstate,
    save_device,
    save_device_stream,
    vmstate_descriptions,
    vmstate_fingerprint,
)

__all__ = [
    "FUNCTION_SECTION",
    "MAGIC",
    "MAX_STREAM_SIZE",
    "PROTOCOL_VERSION",
    "REGISTERS_SECTION",
    "RegistersState",
    "DirtyBitmap",
    "DmaRegionState",
    "EventfdState",
    "FunctionState",
    "IncomingResult",
    "LoadedResources",
    "MemorySource",
    "MigrationResult",
    "MsixState",
    "Precopy",
    "PrecopyReport",
    "OwnedEventfdSink",
    "RamBarState",
    "RamBarsState",
    "StagedMemory",
    "VMStateSnapshot",
    "boot_id",
    "collect_blockers",
    "descriptor_blockers",
    "device_blockers",
    "framework_fingerprint",
    "load_device",
    "load_device_stream",
    "migrate_in",
    "migrate_out",
    "prepare_vmstate",
    "save_device",
    "save_device_stream",
    "vmstate_descriptions",
    "vmstate_fingerprint",
]
