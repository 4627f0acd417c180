"""The ``nvme-guest`` fuzz target: its seeds keep every invariant, and its checks fire
when the controller misbehaves on purpose (a stray guest-memory write, an escaped
exception, CSTS.CFS, namespace 2 overwritten)."""

from __future__ import annotations

import msgpack
import pytest

from pcidev.migration import load_device_stream
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.testing.fuzz import FuzzFinding, make_target
from pcidev.vmstate.stream import seal
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing import fuzz
from pcidev_nvme.testing.fuzz import NvmeGuestTarget, NvmeVmstateTarget


def _seeds() -> list[bytes]:
    return list(NvmeGuestTarget().seeds())


def test_the_plugin_registers_the_target():
    target = make_target(load_registry(make_plugin_manager()), "nvme-guest")
    assert isinstance(target, NvmeGuestTarget)


@pytest.mark.parametrize("seed", _seeds())
def test_seeds_keep_every_invariant(seed):
    NvmeGuestTarget().run(seed)


def test_a_write_outside_the_named_buffers_is_found(monkeypatch):
    real = fuzz._GuestRun._command

    def stray(self, *, admin):
        real(self, admin=admin)
        addr, _ = self.guards[-1]  # the canary page after the command's buffer
        self.machine.memory.write(addr + 100, b"\x00")  # as a device overrunning it would

    monkeypatch.setattr(fuzz._GuestRun, "_command", stray)
    with pytest.raises(FuzzFinding) as info:
        NvmeGuestTarget().run(_seeds()[1])
    assert info.value.invariant == "memory-outside-buffers"


def test_an_exception_escaping_a_doorbell_is_found(monkeypatch):
    real = NvmeController.bar_write

    def failing(self, bar, off, size, value, **kw):
        if off >= 0x1000 and getattr(self, "_fuzz_armed", False):
            raise IndexError("escaped on purpose")
        return real(self, bar, off, size, value, **kw)

    monkeypatch.setattr(NvmeController, "bar_write", failing)
    monkeypatch.setattr(fuzz._GuestRun, "_start", _armed(fuzz._GuestRun._start))
    with pytest.raises(FuzzFinding) as info:
        NvmeGuestTarget().run(_seeds()[1])
    assert info.value.invariant == "escaped-exception" and "IndexError" in info.value.where


def _armed(start):
    def wrapped(self):
        start(self)
        self.ctrl._fuzz_armed = True
    return wrapped


def test_namespace_2_overwritten_is_found(monkeypatch):
    real = fuzz._GuestRun._recover

    def overwrite(self):
        self.drv.write(2, 0, b"\x00" * 4096)  # no action named namespace 2
        real(self)

    monkeypatch.setattr(fuzz._GuestRun, "_recover", overwrite)
    with pytest.raises(FuzzFinding) as info:
        NvmeGuestTarget().run(_seeds()[0])
    assert info.value.invariant == "bystander-data"


def test_nvme_vmstate_target_loads_its_own_stream_and_refuses_mutations_with_typed_errors():
    target = make_target(load_registry(make_plugin_manager()), "nvme-vmstate")
    assert isinstance(target, NvmeVmstateTarget)
    target.setup()
    try:
        dest = target.make_device()
        try:  # the unmutated stream loads: the mutations start from a stream the device takes
            load_device_stream(dest, seal(msgpack.packb(target.body, use_bin_type=True)), target.fds).close()
        finally:
            dest.owns_state = False
            dest.close()
        for seed in target.seeds():
            target.run(seed)
    finally:
        target.close()
