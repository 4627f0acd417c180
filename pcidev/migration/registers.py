"""The ``pcidev/registers`` section: the values of a device's migratable registers.

A device declares registers migratable on its :class:`~pcidev.bar.RegisterMap`
(``RegisterMap(..., migratable=True)`` or ``Register(..., migrate=True)``, see
:mod:`pcidev.bar`); the framework then carries their stored values in this
section, between the framework's function section and the device's own
``VMSTATE`` section, without the device writing them into its state by hand.
Each map owns its part (:meth:`~pcidev.bar.RegisterMap.save_state`,
:meth:`~pcidev.bar.RegisterMap.check_state`,
:meth:`~pcidev.bar.RegisterMap.load_state`); this module gathers the maps of the
device's BARs, in BAR order: a BAR's own map, and the maps that answer sub-regions
of a BAR composed with a :class:`~pcidev.regions.RegionMap` (at any depth), in
offset order. A device without migratable registers has no such
section, so its streams are unchanged.
"""

from __future__ import annotations

import attrs

from pcidev.bar import BarHandler, RegisterMap, RegisterMapState
from pcidev.device import PciDevice
from pcidev.errors import ConfigError
from pcidev.regions import RegionMap
from pcidev.vmstate import VarArray, vmstate
from pcidev.vmstate.errors import ConfigMismatchError

__all__ = ["REGISTERS_SECTION", "MAX_MIGRATABLE_MAPS", "RegistersState", "migratable_maps", "save_registers",
           "check_registers", "apply_registers"]

#: name of the section
REGISTERS_SECTION = "pcidev/registers"

#: most register maps with migratable registers one device may have
MAX_MIGRATABLE_MAPS = 64


@vmstate(REGISTERS_SECTION, version=1)
@attrs.frozen
class RegistersState:
    """The migratable registers of every register map of a device's BARs, in BAR order."""

    maps: VarArray[RegisterMapState, MAX_MIGRATABLE_MAPS]


def _maps_in(handler: BarHandler, base: int) -> list[tuple[int, RegisterMap]]:
    if isinstance(handler, RegisterMap):
        return [(base, handler)] if handler.migratable_registers() else []
    if isinstance(handler, RegionMap):
        return [found for region in handler for found in _maps_in(region.handler, base + region.offset)]
    return []


def migratable_maps(device: PciDevice) -> list[tuple[int, int, RegisterMap]]:
    """The ``(BAR index, offset in the BAR, map)`` of each :class:`~pcidev.bar.RegisterMap`
    with migratable registers that answers a BAR or a sub-region of a BAR's
    :class:`~pcidev.regions.RegionMap`, in BAR and offset order.

    :param device: the device (described).
    :returns: the maps; empty when the device declared no register migratable.
    :raises ConfigError: more than :data:`MAX_MIGRATABLE_MAPS` maps.
    """
    found = [(bar.index, base, m) for bar in device.bars if bar is not None
             for base, m in _maps_in(bar.handler, 0)]
    if len(found) > MAX_MIGRATABLE_MAPS:
        raise ConfigError(f"{len(found)} register maps with migratable registers; at most "
                          f"{MAX_MIGRATABLE_MAPS} are supported")
    return found


def save_registers(device: PciDevice) -> RegistersState | None:
    """The section's state, or None when the device has no migratable registers.

    :param device: the device (quiesced).
    """
    maps = migratable_maps(device)
    return RegistersState(maps=tuple(m.save_state(bar, base) for bar, base, m in maps)) if maps else None


def check_registers(device: PciDevice, state: RegistersState) -> None:
    """Refuse a section that does not fit the device's migratable registers.

    :param device: the destination device.
    :param state: the loaded section.
    :raises ConfigMismatchError: other BARs (or places in a BAR) carry migratable
        registers, or a map's registers differ (each difference named).
    """
    maps = {(bar, base): m for bar, base, m in migratable_maps(device)}
    places = [(m.bar, m.base) for m in state.maps]
    if places != list(maps):
        raise ConfigMismatchError(f"the stream has migratable registers at {_places(places)}, this device at "
                                  f"{_places(list(maps))}", section=REGISTERS_SECTION)
    for saved in state.maps:
        maps[(saved.bar, saved.base)].check_state(saved)


def _places(places: list[tuple[int, int]]) -> str:
    return ", ".join(f"BAR{bar}+{base:#x}" for bar, base in places) or "no place"


def apply_registers(device: PciDevice, state: RegistersState) -> RegistersState | None:
    """Set the register values of a checked section.

    :param device: the destination device (quiesced).
    :param state: a section :func:`check_registers` accepted.
    :returns: the values before (to put back if the rest of the load fails).
    """
    before = save_registers(device)
    maps = {(bar, base): m for bar, base, m in migratable_maps(device)}
    for saved in state.maps:
        maps[(saved.bar, saved.base)].load_state(saved)
    return before
