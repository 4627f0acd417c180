"""examples/howto/counter.py (docs/howto/vmstate-field.md): a field added in version 2 of
a device state, and streams saved by version 1 still load."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import attrs
import pytest

from pcidev.bar import Register, RegisterMap
from pcidev.errors import StateError
from pcidev.host import Machine
from pcidev.migration import load_device_stream, save_device_stream
from pcidev.testing import plugged, roundtrip
from pcidev.vmstate import U32, VersionError, vmstate

HOWTO = Path(__file__).resolve().parents[3] / "examples" / "howto"
if str(HOWTO) not in sys.path:
    sys.path.insert(0, str(HOWTO))
counter = importlib.import_module("counter")

GOLDEN_V1 = HOWTO / "data" / "howto-counter-v1.pcvm"
COUNT, STEP, TICK = 0x00, 0x04, 0x08


# What version 1 of the device looked like (it saved data/howto-counter-v1.pcvm).
@vmstate("howto-counter", version=1)
@attrs.frozen
class CounterStateV1:
    count: U32


class CounterDeviceV1(counter.CounterDevice):
    VMSTATE = CounterStateV1

    def describe(self) -> None:
        regs = RegisterMap(4096, name="counter-bar0")
        regs.add(Register("COUNT", 0x00, 4))
        self.regs = regs
        self.add_mem_bar(0, 4096, regs)

    def get_device_state(self) -> CounterStateV1:  # type: ignore[override]
        return CounterStateV1(count=self.regs["COUNT"].value)


def save_v1_stream(count: int) -> bytes:
    """A stream as version 1 saved it (how data/howto-counter-v1.pcvm was made, count=41)."""
    dev = CounterDeviceV1()
    dev.realize()
    dev.regs["COUNT"].value = count
    data, fds = save_device_stream(dev)
    assert fds == []
    return data


# [test: old stream]
def test_a_stream_saved_by_version_1_still_loads() -> None:
    dev = counter.CounterDevice()
    load_device_stream(dev, GOLDEN_V1.read_bytes())  # committed when version 1 was released
    assert dev.get_device_state() == counter.CounterState(count=41, step=1)
    with Machine(ram_size=16 << 20) as machine:
        pdev = plugged(machine, dev)
        pdev.iowrite32(0, TICK, 1)  # the loaded device goes on counting as version 1 did
        assert pdev.ioread32(0, COUNT) == 42
# [end test]


def test_the_golden_stream_is_what_version_1_saves() -> None:
    assert save_v1_stream(41) == GOLDEN_V1.read_bytes()


def test_a_fresh_version_1_stream_loads_with_the_default_step() -> None:
    dev = counter.CounterDevice()
    load_device_stream(dev, save_v1_stream(7))
    assert (dev.regs["COUNT"].value, dev.regs["STEP"].value) == (7, 1)


def test_version_2_carries_the_new_field() -> None:
    with Machine(ram_size=16 << 20) as machine:
        pdev = plugged(machine, counter.CounterDevice())
        pdev.iowrite32(0, STEP, 5)
        pdev.iowrite32(0, TICK, 1)
        roundtrip(pdev)
        assert (pdev.ioread32(0, COUNT), pdev.ioread32(0, STEP)) == (5, 5)


def test_version_1_code_refuses_a_version_2_stream() -> None:
    src = counter.CounterDevice()
    src.realize()
    data, _fds = save_device_stream(src)
    with pytest.raises(VersionError, match="version 2"):
        load_device_stream(CounterDeviceV1(), data)


def test_a_step_the_register_cannot_hold_is_refused() -> None:
    src = counter.CounterDevice()
    src.realize()
    src.regs["STEP"].value = 0x10000  # no guest write can produce it (the register is 16 bits)
    data, _fds = save_device_stream(src)
    dst = counter.CounterDevice()
    with pytest.raises(StateError, match="does not fit"):
        load_device_stream(dst, data)
    assert dst.regs["STEP"].value == 1  # nothing was applied
