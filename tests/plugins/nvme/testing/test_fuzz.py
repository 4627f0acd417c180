"""The ``nvme-guest`` fuzz target: its seeds keep every invariant, and its checks fire
when the controller misbehaves on purpose (a stray guest-memory write, an escaped
exception, CSTS.CFS, namespace 2 overwritten)."""

from __future__ import annotations

import hashlib
import os
import struct
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcidev.migration import load_device_stream
from pcidev.migration.snapshot import save_device
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.testing.fuzz import FuzzFinding, make_target
from pcidev.testing.fuzz.target import open_fd_count
from pcidev.vmstate.stream import PREFIX_SIZE, TRAILER_SIZE, seal
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing import fuzz
from pcidev_nvme.testing.fuzz import NvmeGuestTarget, NvmeVmstateTarget


def _seeds() -> list[bytes]:
    return list(NvmeGuestTarget().seeds())


def test_the_plugin_registers_the_target():
    target = make_target(load_registry(make_plugin_manager()), "nvme-guest")
    assert isinstance(target, NvmeGuestTarget)


@pytest.mark.parametrize("seed", _seeds())
@pytest.mark.parametrize("reuse", [True, False], ids=["reused", "fresh"])
def test_seeds_keep_every_invariant(seed, reuse):
    target = NvmeGuestTarget(reuse=reuse)
    try:
        target.run(seed)
    finally:
        target.close()


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


def _cmd(kind: int, op_index: int, dwords: tuple[int, ...], mode: int = 0, npages: int = 0) -> bytes:
    """One command action as the target decodes it (see ``NvmeGuestTarget.seeds``)."""
    dw = list(dwords) + [0] * (6 - len(dwords))
    return bytes([kind, op_index, 0, 0]) + struct.pack("<6I", *dw) + bytes([mode, npages, 0]) + struct.pack("<H", 0)


#: write and read 8 blocks of namespace 1, then Get Features (Asynchronous Event Configuration)
_X = _cmd(2, 1, (0, 0, 7), 0, 1) + _cmd(2, 2, (0, 0, 7), 0, 1) + _cmd(1, 8, (0x0B,))
#: Set Features (Asynchronous Event Configuration: every event the driver arms), a write of namespace 1, then
#: CC with a shutdown request (SHN = 01b): state a leak would carry into the next input
_Y = (_cmd(1, 7, (0x0B, 0x31F)) + _cmd(2, 1, (0, 0, 7), 0, 1)
      + bytes([0, 2, 2]) + struct.pack("<Q", 0x00460001 | 1 << 14))


def test_an_input_runs_the_same_after_another_one_as_alone():
    alone = NvmeGuestTarget(reuse=False)
    alone.run(_X)
    target = NvmeGuestTarget()
    target.setup()
    try:
        target.run(_X)
        first = list(target.steps)
        target.run(_Y)
        other = list(target.steps)
        target.run(_X)
        again = list(target.steps)
    finally:
        target.close()
    assert any("status=0x0" in s for s in first) and first != other  # both did something, not the same
    assert again == first == alone.steps
    assert first[-2:] == ["flr", "after-recovery"]


# ---------------------------------------------------------------- the reused world
#: the saved state's fields that follow the clock (they differ between two fresh runs too)
_CLOCK_FIELDS = frozenset({"power_on_us", "busy_us", "timestamp"})


def _unclocked(value: object) -> object:
    if isinstance(value, dict):
        return {k: None if k in _CLOCK_FIELDS else _unclocked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unclocked(v) for v in value]
    return value


def _observe(run: fuzz._GuestRun) -> dict[str, object]:
    """What an input left behind, taken before its FLR: guest RAM, BAR0's registers, the
    controller's whole saved state (features, logs, SMART, error log, queues, namespaces...;
    but the clock's fields) and every namespace's data (RAM and data as digests)."""
    ctrl = run.ctrl
    # a shutdown (CC.SHN) runs on the admin worker: a fresh controller starts that thread
    # then, a reused one has it running already; compare once it is done (CSTS.SHST not 01b)
    deadline = time.monotonic() + 10
    while (ctrl.bar_read(0, 0x1C, 4) >> 2) & 3 == 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    regs = [ctrl.bar_read(0, off, 4) for off in range(0, 0x40, 4)]
    ctrl.quiesce()
    try:
        snap = save_device(ctrl)
        state = msgpack.unpackb(snap.to_bytes()[PREFIX_SIZE:-TRAILER_SIZE], raw=False, strict_map_key=False)
        data = [hashlib.sha256(os.pread(fd, os.fstat(fd).st_size, 0)).hexdigest() for fd in snap.fds
                if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:pcidev-nvme")]
    finally:
        ctrl.resume()
    ram = hashlib.sha256(run.machine.memory.read(0, run.machine.ram_size)).hexdigest()
    return {"ram": ram, "regs": regs, "state": _unclocked(state), "namespaces": data}


@pytest.fixture
def observed(monkeypatch):
    seen: list[dict[str, object]] = []
    real = fuzz._GuestRun._recover

    def recover(self):
        seen.append(_observe(self))
        real(self)

    monkeypatch.setattr(fuzz._GuestRun, "_recover", recover)
    return seen


def _outcome(target: NvmeGuestTarget, data: bytes, seen: list[dict[str, object]]) -> tuple[object, ...]:
    seen.clear()
    try:
        target.run(data)
        finding = None
    except FuzzFinding as exc:
        finding = exc.signature
    return finding, list(target.steps), list(seen)


_inputs = st.one_of(st.binary(max_size=400), st.lists(st.sampled_from(_seeds() + [_X, _Y]), min_size=1,
                                                       max_size=3).map(b"".join))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=_inputs, b=_inputs)
def test_an_input_on_the_reused_world_matches_a_fresh_controller(observed, a, b):
    """B after A on the one saved, restored world leaves exactly what B leaves on a controller
    built and probed for it: the same steps and completions, guest RAM, registers, saved
    controller state and namespace data (so nothing of A leaks into B)."""
    fresh = _outcome(NvmeGuestTarget(reuse=False), b, observed)
    reused = NvmeGuestTarget()
    try:
        _outcome(reused, a, observed)
        after_a = _outcome(reused, b, observed)
    finally:
        reused.close()
    assert after_a == fresh


def test_the_restore_leaves_no_descriptor_and_the_world_is_built_once():
    target = NvmeGuestTarget()
    try:
        target.run(_Y)
        world = target._world
        fds = open_fd_count()
        for _ in range(20):
            target.run(_Y)
            target.run(_X)
        assert target._world is world and open_fd_count() == fds
    finally:
        target.close()


def test_a_finding_drops_the_saved_world(monkeypatch):
    target = NvmeGuestTarget()
    try:
        target.run(_X)
        world = target._world
        monkeypatch.setattr(fuzz._GuestRun, "_recover", lambda self: (_ for _ in ()).throw(FuzzFinding("x", "y")))
        with pytest.raises(FuzzFinding):
            target.run(_X)
        assert target._world is None
        monkeypatch.undo()
        target.run(_X)
        assert target._world is not None and target._world is not world
    finally:
        target.close()
