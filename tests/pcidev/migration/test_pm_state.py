"""The power-management capability's state migrates: the destination acts on the
power state the source was in, not on the one it was created in."""

from __future__ import annotations

import pytest

from pcidev.devices.edu import EduDevice
from pcidev.migration import load_device_stream, save_device_stream
from pcidev.pci.capabilities.pm import D0, D3HOT, PMCSR, PowerManagementCapability
from pcidev.pci.config import ResetKind


class _ResettingEdu(EduDevice):
    """edu whose D3hot -> D0 transition resets it (No_Soft_Reset clear)."""

    TYPE_NAME = "edu"

    def describe(self) -> None:
        super().describe()
        pm = self.caps.find(PowerManagementCapability)
        pm.no_soft_reset = False
        self.resets: list[ResetKind] = []

    def on_reset(self, kind: ResetKind) -> None:
        super().on_reset(kind)
        self.resets.append(kind)


def _pm(dev) -> PowerManagementCapability:
    dev.realize()
    return dev.caps.find(PowerManagementCapability)


def _move(src):
    src.quiesce()
    data, fds = save_device_stream(src)
    dst = type(src)(autorun=False)
    load_device_stream(dst, data, fds)
    return dst


@pytest.mark.parametrize("cls", [EduDevice, _ResettingEdu])
def test_destination_knows_it_is_in_d3hot(cls) -> None:
    src = cls(autorun=False)
    pm = _pm(src)
    src.config_write(pm.offset + PMCSR, 2, D3HOT)
    assert pm.power_state == D3HOT
    dst = _move(src)
    dpm = _pm(dst)
    assert dpm.power_state == D3HOT
    # an unsupported state (D1) is ignored: the function stays where it is
    dst.config_write(dpm.offset + PMCSR, 2, 1)
    assert dpm.power_state == D3HOT


def test_d3hot_to_d0_after_migration_resets_as_on_the_source() -> None:
    src = _ResettingEdu(autorun=False)
    src.config_write(_pm(src).offset + PMCSR, 2, D3HOT)
    dst = _move(src)
    dst.resets.clear()
    dst.config_write(_pm(dst).offset + PMCSR, 2, D0)
    assert dst.resets == [ResetKind.CONVENTIONAL]


class _RefusingEdu(EduDevice):
    TYPE_NAME = "edu"

    def set_device_state(self, state) -> None:
        if getattr(self, "refuse", False):
            raise RuntimeError("cannot apply")
        super().set_device_state(state)


def test_a_rolled_back_load_keeps_the_destination_power_state() -> None:
    src = _RefusingEdu(autorun=False)
    _pm(src)
    src.quiesce()
    data, fds = save_device_stream(src)  # source in D0
    dst = _RefusingEdu(autorun=False)
    dpm = _pm(dst)
    dst.config_write(dpm.offset + PMCSR, 2, D3HOT)
    dst.refuse = True
    with pytest.raises(Exception, match="cannot apply"):
        load_device_stream(dst, data, fds)
    assert dpm.power_state == D3HOT
    dst.config_write(dpm.offset + PMCSR, 2, 1)  # unsupported: stays in D3hot
    assert dpm.power_state == D3HOT
