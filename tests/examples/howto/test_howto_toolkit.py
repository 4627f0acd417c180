"""docs/howto/test-a-device.md: a device author's first tests with pcidev.testing, on the
counter of examples/howto/counter.py (the fixtures come from pcidev's pytest plugin)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from pcidev.errors import VMStateError
from pcidev.testing import roundtrip

HOWTO = Path(__file__).resolve().parents[3] / "examples" / "howto"
if str(HOWTO) not in sys.path:
    sys.path.insert(0, str(HOWTO))
counter = importlib.import_module("counter")

COUNT, STEP, TICK = 0x00, 0x04, 0x08


# [example: registers]
def test_tick_adds_step(pcidev_device) -> None:
    dev = pcidev_device(counter.CounterDevice())      # plugged, enabled, like a driver's probe
    dev.iowrite32(0, STEP, 3)
    dev.iowrite32(0, TICK, 1)
    dev.iowrite32(0, TICK, 1)
    assert dev.ioread32(0, COUNT) == 6
# [end example]


# [example: roundtrip]
def test_state_survives_a_migration(pcidev_device) -> None:
    dev = pcidev_device(counter.CounterDevice())
    dev.iowrite32(0, STEP, 3)
    dev.iowrite32(0, TICK, 1)
    roundtrip(dev)                                     # save, load into a fresh device, switch over
    dev.iowrite32(0, TICK, 1)                          # the loaded device goes on counting
    assert (dev.ioread32(0, COUNT), dev.ioread32(0, STEP)) == (6, 3)
# [end example]


# [example: refusal]
def test_a_bad_state_is_refused_and_the_source_kept(pcidev_device) -> None:
    dev = pcidev_device(counter.CounterDevice())
    source = dev.device
    source.regs["STEP"].value = 0x10000                # corrupt: check_device_state refuses it
    with pytest.raises(VMStateError, match="does not fit"):
        roundtrip(dev)
    assert dev.device is source                         # the handle still drives the source
# [end example]
