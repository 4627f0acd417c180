"""examples/tutorial/scratchpad.py, the device docs/tutorial.md builds: plugged, driven,
round-tripped and created through a registry (the tutorial includes these tests)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from pcidev.host.machine import Machine
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.testing import plugged, roundtrip

TUTORIAL = Path(__file__).resolve().parents[2] / "examples" / "tutorial"
if str(TUTORIAL) not in sys.path:
    sys.path.insert(0, str(TUTORIAL))
scratchpad = importlib.import_module("scratchpad")  # what `PYTHONPATH=examples/tutorial` does

MAGIC, SCRATCH0, SCRATCH1, DOORBELL, RINGS = 0x00, 0x04, 0x08, 0x0C, 0x10


# [test: plugged]
def test_registers_and_interrupt() -> None:
    with Machine(ram_size=16 << 20) as machine:
        pad = plugged(machine, scratchpad.ScratchpadDevice("magic=0x1234"))  # enabled, MSI-X on
        assert pad.ioread32(0, MAGIC) == 0x1234
        pad.iowrite32(0, SCRATCH0, 0xDEADBEEF)
        pad.iowrite32(0, MAGIC, 0)  # read-only: the write is ignored
        assert (pad.ioread32(0, SCRATCH0), pad.ioread32(0, MAGIC)) == (0xDEADBEEF, 0x1234)
        pad.iowrite32(0, DOORBELL, 1)
        assert pad.wait_irq(0, timeout=5.0)  # MSI-X vector 0 was raised
        assert pad.irq_count(0) == 1 and pad.ioread32(0, RINGS) == 1
# [end test]


# [test: roundtrip]
def test_registers_survive_a_roundtrip() -> None:
    with Machine(ram_size=16 << 20) as machine:
        pad = plugged(machine, scratchpad.ScratchpadDevice())
        pad.iowrite32(0, SCRATCH1, 42)
        pad.iowrite32(0, DOORBELL, 1)
        old = pad.device
        new = roundtrip(pad)  # save, load into a fresh scratchpad; pad now drives it
        assert pad.device is new and new is not old and old.closed
        assert (pad.ioread32(0, SCRATCH1), pad.ioread32(0, RINGS)) == (42, 1)
        pad.iowrite32(0, DOORBELL, 1)  # MSI-X still works on the loaded device
        assert pad.wait_irq(0, timeout=5.0) and pad.ioread32(0, RINGS) == 2
# [end test]


# [test: registry]
def test_created_through_a_registry() -> None:
    pm = make_plugin_manager(load_entrypoints=False, plugins=[scratchpad])
    registry = load_registry(pm)
    assert "scratchpad" in registry
    dev = registry.create("scratchpad", "magic=7")
    assert isinstance(dev, scratchpad.ScratchpadDevice) and dev.cfg.magic == 7
    with Machine(ram_size=16 << 20) as machine:
        pad = plugged(machine, "scratchpad", "magic=9", registry=registry)
        assert pad.ioread32(0, MAGIC) == 9
# [end test]
