"""examples/tutorial/scratchpad.py, the device docs/tutorial.md builds: plugged, driven,
round-tripped, migrated between device processes and created through a registry (the
tutorial includes these tests)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from pcidev.bar import Register
from pcidev.cli import main as cli_main
from pcidev.host.machine import Machine
from pcidev.migration import load_device_stream, save_device_stream
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.testing import plugged, roundtrip
from pcidev.transport.link import RemoteDevice
from pcidev.transport.link.process import DeviceProcess
from pcidev.vmstate.errors import ConfigMismatchError

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


# [test: processes]
def test_migrates_between_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TUTORIAL))  # the device processes import the plugin
    source = DeviceProcess("scratchpad", f"unix:{tmp_path}/src.sock", options="magic=5",
                           plugin_specs=["scratchpad"])
    dest = DeviceProcess("scratchpad", f"unix:{tmp_path}/dst.sock", options="magic=5",
                         incoming=f"unix:{tmp_path}/migration.sock", plugin_specs=["scratchpad"])
    try:
        source.wait_event("ready")
        with Machine(ram_size=16 << 20) as machine:
            pad = machine.plug_remote(source.link, timeout=10.0)
            pad.enable_device()
            pad.set_master()
            pad.alloc_irq_vectors(1, 1)
            pad.iowrite32(0, SCRATCH0, 0xCAFE)
            pad.iowrite32(0, DOORBELL, 1)
            assert pad.wait_irq(0, timeout=5.0)
            remote = pad.device
            assert isinstance(remote, RemoteDevice)
            remote.migrate(str(dest.wait_event("listening")["incoming"]), timeout=10.0)
            source.proc.wait(10.0)  # the source process ends after the move
            assert (pad.ioread32(0, SCRATCH0), pad.ioread32(0, RINGS)) == (0xCAFE, 1)
            pad.iowrite32(0, DOORBELL, 1)  # the destination raises vector 0 now
            assert pad.wait_irq(0, timeout=5.0) and pad.ioread32(0, RINGS) == 2
    finally:
        for proc in (source, dest):
            proc.stop()
# [end test]


# [test: layout]
def test_a_destination_with_other_registers_refuses() -> None:
    class Wider(scratchpad.ScratchpadDevice):
        """A later scratchpad with one more register (migratable, as its map says)."""

        def describe(self) -> None:
            super().describe()
            self.regs.add(Register("SCRATCH2", 0x14, 4))

    src = scratchpad.ScratchpadDevice()
    stream, fds = save_device_stream(src)
    with pytest.raises(ConfigMismatchError, match="SCRATCH2: migratable here, not in the stream"):
        load_device_stream(Wider(), stream, fds)
# [end test]


def test_schema_names_the_registers_section(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`pcidev vmstate schema` builds a device to learn its migratable registers: the
    scratchpad, whose state is all registers, has a registers section and no blocker."""
    monkeypatch.syspath_prepend(str(Path(scratchpad.__file__).parent))
    assert cli_main(["-p", "scratchpad", "vmstate", "schema", "scratchpad,magic=3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["owner"]) for s in doc["sections"]] == [("pcidev/function", "framework"),
                                                                    ("pcidev/registers", "registers")]
    assert doc["registers"]["name"] == "pcidev/registers" and doc["device"] is None
    assert doc["static_blockers"] == []
    assert cli_main(["-p", "scratchpad", "vmstate", "schema", "scratchpad,magic=nope"]) == 1
    assert "magic" in capsys.readouterr().err


def test_a_destination_with_another_magic_refuses() -> None:
    """MAGIC is not carried: the fingerprint makes a destination with another magic refuse."""
    with Machine() as machine:
        pad = plugged(machine, scratchpad.ScratchpadDevice("magic=5"))
        pad.device.quiesce()
        stream, fds = save_device_stream(pad.device)
        other = scratchpad.ScratchpadDevice("magic=6")
        with pytest.raises(ConfigMismatchError, match="magic"):
            load_device_stream(other, stream, fds)
        other.close()
        pad.device.resume()
        assert pad.ioread32(0, 0x00) == 5
