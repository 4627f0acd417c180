"""The ``pcidev/registers`` section: the values of a device's migratable registers.

A device declares registers migratable on its :class:`~pcidev.bar.RegisterMap`
(``RegisterMap(..., migratable=True)`` or ``Register(..., migrate=True)``, see
:mod:`pcidev.bar`); the framework then carries their stored values in this
section, between the framework's function section and the device's own
``VMSTATE`` section, without the device writing them into its state by hand.
Each map owns its part (:meth:`~pcidev.bar.RegisterMap.save_state`,
:meth:`~pcidev.bar.RegisterMap.check_state`,
:meth:`~pcidev.bar.RegisterMap.load_state`); this module gathers the maps of the
device's BARs, in BAR order. A device without migratable registers has no such
section, so its streams are unchanged.
"""

from __future__ import annotations

import attrs

from pcidev.bar import RegisterMap, RegisterMapState
from pcidev.device import PciDevice
from pcidev.vmstate import VarArray, vmstate
from pcidev.vmstate.errors import ConfigMismatchError

__all__ = ["REGISTERS_SECTION", "RegistersState", "migratable_maps", "save_registers", "check_registers",
           "apply_registers"]

#: name of the section
REGISTERS_SECTION = "pcidev/registers"


@vmstate(REGISTERS_SECTION, version=1)
@attrs.frozen
class RegistersState:
    """The migratable registers of every register map of a device's BARs, in BAR order."""

    maps: VarArray[RegisterMapState, 6]


def migratable_maps(device: PciDevice) -> list[tuple[int, RegisterMap]]:
    """The ``(BAR index, map)`` of each BAR answered by a :class:`~pcidev.bar.RegisterMap`
    with migratable registers, in BAR order.

    :param device: the device (described).
    :returns: the maps; empty when the device declared no register migratable.
    """
    return [(bar.index, bar.handler) for bar in device.bars
            if bar is not None and isinstance(bar.handler, RegisterMap) and bar.handler.migratable_registers()]


def save_registers(device: PciDevice) -> RegistersState | None:
    """The section's state, or None when the device has no migratable registers.

    :param device: the device (quiesced).
    """
    maps = migratable_maps(device)
    return RegistersState(maps=tuple(m.save_state(bar) for bar, m in maps)) if maps else None


def check_registers(device: PciDevice, state: RegistersState) -> None:
    """Refuse a section that does not fit the device's migratable registers.

    :param device: the destination device.
    :param state: the loaded section.
    :raises ConfigMismatchError: other BARs carry migratable registers, or a map's
        registers differ (each difference named).
    """
    maps = dict(migratable_maps(device))
    bars = [m.bar for m in state.maps]
    if bars != sorted(maps):
        raise ConfigMismatchError(f"the stream has migratable registers in BARs {bars}, this device in BARs "
                                  f"{sorted(maps)}", section=REGISTERS_SECTION)
    for saved in state.maps:
        maps[saved.bar].check_state(saved)


def apply_registers(device: PciDevice, state: RegistersState) -> RegistersState | None:
    """Set the register values of a checked section.

    :param device: the destination device (quiesced).
    :param state: a section :func:`check_registers` accepted.
    :returns: the values before (to put back if the rest of the load fails).
    """
    before = save_registers(device)
    maps = dict(migratable_maps(device))
    for saved in state.maps:
        maps[saved.bar].load_state(saved)
    return before
