"""A layer's own vmstate section (PciDevice.LAYER_VMSTATE): a base class between PciDevice
and the device type saves its state in a section of its own, checked, applied and rolled
back with the device's, with its own fingerprint items."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from pcidev.bar import RegisterMap
from pcidev.device import PciDevice
from pcidev.errors import ConfigError
from pcidev.migration import load_device_stream, save_device, save_device_stream
from pcidev.testing import roundtrip
from pcidev.vmstate import U32, dump_stream_json, vmstate
from pcidev.vmstate.errors import ConfigMismatchError, StateError


@vmstate("test-layer", version=1)
@attrs.frozen
class LayerState:
    ticks: U32


@vmstate("test-layered", version=1)
@attrs.frozen
class OwnState:
    value: U32


class Layer(PciDevice):
    """A transport-like base class owning ``ticks``."""

    LAYER_VMSTATE = LayerState
    QUEUES = 2

    def __init__(self, *, name: str | None = None) -> None:
        self.ticks = 0
        super().__init__(name=name)

    def describe(self) -> None:
        self.add_mem_bar(0, 4096, RegisterMap(4096))

    def layer_fingerprint(self) -> dict[str, Any]:
        return {"layer.queues": self.QUEUES}

    def get_layer_state(self) -> LayerState:
        return LayerState(self.ticks)

    def check_layer_state(self, state: LayerState) -> None:
        if state.ticks > 1000:
            raise StateError("too many ticks", section="test-layer", instance_id=0, path="ticks")

    def set_layer_state(self, state: LayerState) -> None:
        self.ticks = state.ticks


class Layered(Layer):
    TYPE_NAME = "test-layered"
    VENDOR_ID, DEVICE_ID = 0x1B36, 0x00F4
    VMSTATE = OwnState

    def __init__(self, *, name: str | None = None) -> None:
        self.value = 0
        self.fail_set = False
        super().__init__(name=name)

    def device_fingerprint(self) -> dict[str, Any]:
        return {"layered.size": 4}

    def get_device_state(self) -> OwnState:
        return OwnState(self.value)

    def set_device_state(self, state: OwnState) -> None:
        if self.fail_set:
            raise RuntimeError("refusing")
        self.value = state.value


def _source() -> Layered:
    dev = Layered()
    dev.realize()
    dev.ticks, dev.value = 7, 42
    return dev


def test_the_layer_section_sits_between_the_framework_and_the_device():
    src = _source()
    snap = save_device(src)
    assert [s.name for s in snap.sections] == ["pcidev/function", "test-layer", "test-layered"]
    assert snap.fingerprint["layer.queues"] == 2 and snap.fingerprint["layered.size"] == 4
    stream, fds = save_device_stream(src)
    assert [s["name"] for s in dump_stream_json(stream)["sections"]] == [
        "pcidev/function", "test-layer", "test-layered"]
    dest = Layered()
    load_device_stream(dest, stream, fds).close()
    assert (dest.ticks, dest.value) == (7, 42)


def test_the_layer_refuses_and_nothing_is_applied():
    src = _source()
    src.ticks = 5000
    stream, fds = save_device_stream(src)
    dest = Layered()
    with pytest.raises(StateError, match="too many ticks"):
        load_device_stream(dest, stream, fds)
    assert (dest.ticks, dest.value) == (0, 0)


def test_a_failing_device_section_rolls_the_layer_back():
    stream, fds = save_device_stream(_source())
    dest = Layered()
    dest.ticks = 3
    dest.fail_set = True
    with pytest.raises(StateError, match="applying the state failed"):
        load_device_stream(dest, stream, fds)
    assert (dest.ticks, dest.value) == (3, 0)


def test_a_layer_fingerprint_mismatch_is_refused_naming_the_item():
    stream, fds = save_device_stream(_source())

    class FewerQueues(Layered):
        QUEUES = 1

    with pytest.raises(ConfigMismatchError, match="layer.queues"):
        load_device_stream(FewerQueues(), stream, fds)


def test_layer_and_device_fingerprints_must_not_share_keys():
    class Clash(Layered):
        def device_fingerprint(self) -> dict[str, Any]:
            return {"layer.queues": 2}

    with pytest.raises(ConfigError, match="layer"):
        save_device(Clash())


def test_roundtrip_compares_the_layer_state_too():
    src = _source()
    dest = roundtrip(src)
    assert (dest.ticks, dest.value) == (7, 42)
    dest.close()
