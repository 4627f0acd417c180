"""The ``nvme-guest`` fuzz target: its seeds keep every invariant, and its checks fire
when the controller misbehaves on purpose (a stray guest-memory write, an escaped
exception, CSTS.CFS, namespace 2 overwritten)."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcidev.errors import PcidevError
from pcidev.migration import load_device_stream
from pcidev.migration.snapshot import save_device
from pcidev.pci.config import ResetKind
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.testing.fuzz import FuzzFinding, make_target, restore, vmstate_target
from pcidev.testing.fuzz.target import open_fd_count
from pcidev.vmstate.stream import PREFIX_SIZE, TRAILER_SIZE, seal
from pcidev_nvme import admin as admin_mod
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.status import NvmeStatusError, Status
from pcidev_nvme.testing import fuzz
from pcidev_nvme.testing.driver import NvmeDriverError
from pcidev_nvme.testing.fuzz import PAGE, NvmeGuestTarget, NvmeVmstateTarget


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


# ---------------------------------------------------------------- a fixed probe input after any input
_CORPUS = Path(__file__).parents[3] / "fuzz" / "corpus" / "nvme-guest"
#: an input that formats namespace 1 with metadata (a new metadata store: descriptors the
#: controller holds until the restore takes the format back)
_FORMATS = (_CORPUS / "regress-reuse-format-fd.bin").read_bytes()
#: an input that deletes namespace 1 (Namespace Management): no load brings a configured
#: namespace back, so the controller refuses the saved world's snapshot after it
_DELETES = (_CORPUS / "regress-reuse-namespace-1-deleted.bin").read_bytes()
#: the probe's admin commands: (opcode, nsid, cdw10, cdw11, bytes received)
_PROBE_ADMIN = (
    [(0x06, 0, 0x01, 0, 4096), (0x06, 0, 0x02, 0, 4096), (0x06, 0, 0x10, 0, 4096), (0x06, 1, 0x00, 0, 4096),
     (0x06, 2, 0x00, 0, 4096), (0x06, 3, 0x00, 0, 4096), (0x06, 1, 0x03, 0, 4096)]
    + [(0x0A, 0, fid, 0, 0) for fid in (0x01, 0x02, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x10, 0x16)]
    + [(0x0A, 1, 0x05, 0, 0), (0x0A, 0, 0x200 | 0x0B, 0, 0), (0x0A, 0, 0x300 | 0x06, 0, 0)]
    + [(0x02, 0xFFFFFFFF, ((n // 4 - 1) << 16) | lid, 0, n)
       for lid, n in ((0x01, 256), (0x02, 512), (0x03, 512), (0x04, 4096), (0x05, 4096), (0x06, 564))])
_PROBE_IO = ((1, 0, 8), (2, 0, 8), (1, 504, 8), (3, 0, 1))


def _probe(world: fuzz._World) -> dict[str, object]:
    """Input B, by hand, on ``world`` as an input starts from it (the saved world put back,
    or a fresh controller probed), through the world's own driver copy: registers, Identify
    (controller, namespace lists, each namespace), Get Features (current, default,
    saved), the log pages, reads of both namespaces and of one that does not exist, a
    write and its read-back, a controller reset (CC.EN 1 -> 0 -> 1) and the features and
    a read after it; every completion whole (SQ id, CID, SQ head, status, DW0, DW1), the
    data each returned, every register read, the interrupt counts and CSTS. The first
    driver error (a timeout: the driver and the controller disagree) ends it, recorded."""
    drv = world.start()
    drv.timeout = 5.0  # (a timeout ends the probe: generous, so that load is never one)
    pdev, machine = world.pdev, world.machine
    seen: list[object] = [("regs", [pdev.bar_read(0, off, 4) for off in range(0, 0x40, 4) if off != 0x18])]

    def admin() -> None:
        for op, nsid, cdw10, cdw11, n in _PROBE_ADMIN:
            c = drv.admin(op, nsid=nsid, cdw10=cdw10, cdw11=cdw11, length=n, check=False)
            seen.append((op, cdw10, c.sqid, c.cid, c.sqhd, c.status, c.dw0, c.dw1,
                         hashlib.sha256(c.tag).hexdigest() if n else None))

    def io(opcode: int, nsid: int, slba: int, nlb: int, data: bytes = b"") -> None:
        buf = machine.alloc(nlb * 512 + PAGE, PAGE)
        try:
            machine.memory.write(buf, data or bytes(nlb * 512))
            c = drv.io(1, opcode, nsid=nsid, cdw10=slba, cdw12=nlb - 1, buf=buf, length=nlb * 512, check=False)
            seen.append((opcode, nsid, slba, c.sqid, c.cid, c.sqhd, c.status, c.dw0, c.dw1,
                         hashlib.sha256(machine.memory.read(buf, nlb * 512)).hexdigest()))
        finally:
            machine.free(buf)

    try:
        admin()
        for nsid, slba, nlb in _PROBE_IO:
            io(0x02, nsid, slba, nlb)
        io(0x01, 1, 16, 2, b"\x11" * 1024)
        io(0x02, 1, 16, 2)
        seen.append(("csts", drv.csts))
        drv.disable()
        drv.enable()
        seen.append(("after reset", drv.csts))
        admin()
        drv.create_io_queue_pair(1, 8, ien=True)
        io(0x02, 1, 16, 2)
    except (NvmeDriverError, KeyError) as exc:  # (KeyError: a driver without the queue)
        seen.append(("driver error", repr(exc)))
    rec = pdev.recorder
    seen.append(("interrupts", dict(rec.counts), rec.intx_edges, rec.stray, rec.intx_level))
    seen.append(("csts", drv.csts))
    return {"seen": seen}


_fresh_probe: list[dict[str, object]] = []


def _probe_on_a_fresh_controller() -> dict[str, object]:
    if not _fresh_probe:  # (B is fixed: its outcome on a fresh controller is computed once)
        world = fuzz._World.fresh()
        try:
            _fresh_probe.append(_probe(world))
        finally:
            world.close()
    return _fresh_probe[0]


def _probe_after(a: bytes, target: NvmeGuestTarget | None = None) -> dict[str, object]:
    """Input A through the reused target, then B (:func:`_probe`) on its saved world."""
    target = target or NvmeGuestTarget()
    try:
        try:
            target.run(a)
        except FuzzFinding:
            pass  # (the world is built again: B still must match)
        target.setup()
        assert target._world is not None
        return _probe(target._world)
    finally:
        target.close()


_u32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 7, 0x0B, 0x31F, 0x10007, 0xFFFFFFFF]))
#: the target's actions as its decoder reads them (see NvmeGuestTarget.seeds): a command
#: (kind, opcode index, escape, NSID index, 6 dwords, pointer mode, pages, reserved,
#: offset, then the pointer's own choices), a register write, a raw SQE, a doorbell
_command = st.builds(
    lambda kind, op, nsid, dw, mode, npages, off, extra: bytes([kind, op, 0, nsid]) + struct.pack("<6I", *dw)
    + bytes([mode, npages, 0]) + struct.pack("<H", off) + extra,
    st.sampled_from([1, 2]), st.integers(0, 255), st.integers(0, 6), st.lists(_u32, min_size=6, max_size=6),
    st.integers(0, 4), st.integers(0, 8), st.integers(0, 0xFFFF), st.binary(max_size=24))
_register = st.builds(lambda pick, size, value: bytes([0, pick, size]) + struct.pack("<Q", value),
                      st.integers(0, 255), st.integers(0, 3), st.integers(0, 2**64 - 1))
_raw_sqe = st.builds(lambda qid, sqe: bytes([3, qid]) + sqe, st.integers(0, 1), st.binary(min_size=64, max_size=64))
_doorbell = st.builds(lambda qid, value, which: bytes([4, qid]) + struct.pack("<H", value) + bytes([which]),
                      st.integers(0, 2), st.integers(0, 0xFFFF), st.integers(0, 1))
_a_inputs = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(_command, _command, _register, _raw_sqe, _doorbell,
                       st.sampled_from(_seeds() + [_X, _Y, _FORMATS, _DELETES])),
             min_size=1, max_size=6).map(b"".join))


@settings(max_examples=60, deadline=None)
@given(a=_a_inputs)
def test_a_probe_input_after_any_input_on_the_reused_world_behaves_as_on_a_fresh_controller(a):
    """B after A on the reused world: the same completions (CIDs, SQ heads, status,
    result dwords), the same data read, registers, interrupt counts and CSTS as B on a
    controller built and probed for it. Unlike the saved state, this sees what lies
    outside it: the driver copy, the controller's workers and command-set internals,
    namespaces and metadata stores an input made."""
    assert _probe_after(a) == _probe_on_a_fresh_controller()


@pytest.mark.parametrize("a", [_X, _Y, _FORMATS, _DELETES], ids=["io", "features-shutdown", "format", "delete"])
def test_the_probe_input_after_each_kind_of_change_matches(a):
    assert _probe_after(a) == _probe_on_a_fresh_controller()


def _first_difference(got: dict[str, object], want: dict[str, object]) -> tuple[object, object]:
    """The first entry of the probe where ``got`` and ``want`` differ."""
    pairs = list(zip(got["seen"], want["seen"], strict=False))
    return next(((g, w) for g, w in pairs if g != w), (None, None))


def test_the_probe_sees_interrupt_counts_an_input_left(monkeypatch):
    """The probe is not blind: with the interrupt recorder's counts left as the input left
    them (one part of the restore switched off), B differs -- in the interrupt counts,
    and only there (every completion, data and register is as on a fresh controller)."""
    monkeypatch.setattr(restore, "_RECORDER_STATE", ())
    got, want = _first_difference(_probe_after(_X), _probe_on_a_fresh_controller())
    assert got is not None, "the probe did not see the counts the input left"
    assert got[0] == want[0] == "interrupts" and got[1] != want[1]


def test_the_probe_sees_a_driver_that_is_not_a_copy(monkeypatch):
    """... and with the driver handed out as it was left (not a copy of the saved one), B's
    first command does not complete as on a fresh controller: the driver the input left no
    longer has the admin queue it probed with, where the fresh one completes Identify."""
    monkeypatch.setattr(restore.MachineTemplate, "host_copy", lambda self, index=0: self._hosts[index])
    fresh = _probe_on_a_fresh_controller()
    got, want = _first_difference(_probe_after(_X), fresh)
    assert want is fresh["seen"][1]  # (B's first command)
    assert want[0] == 6 and want[5] == 0  # (Identify, successful)
    assert got == ("driver error", "KeyError(0)")


def test_an_input_that_makes_descriptors_is_no_fd_leak_on_the_reused_world():
    """Format NVM with metadata makes a metadata store (memfds) the controller holds: a
    fresh controller closes them with itself, the reused world with the restore after the
    input; either way the count after the input is the count before it."""
    for reuse in (True, False):
        target = NvmeGuestTarget(reuse=reuse)
        try:
            target.setup()
            fds = open_fd_count()
            target.run(_FORMATS)
            assert open_fd_count() == fds
        finally:
            target.close()


def test_a_refused_restore_builds_the_world_again_and_is_no_finding():
    target = NvmeGuestTarget()
    try:
        target.run(_DELETES)  # namespace 1 deleted: the controller cannot take the snapshot back
        assert target._world is not None and target.rebuilds == 1  # (built again at once)
        target.run(_X)
        assert target._world is not None and target.rebuilds == 1
    finally:
        target.close()
    alone = NvmeGuestTarget(reuse=False)
    alone.run(_X)
    assert target.steps == alone.steps


def test_a_leak_in_an_input_that_makes_the_world_be_built_again_is_found(monkeypatch):
    """Review S24b: when the restore was refused (the input deleted namespace 1) the world
    was dropped before the descriptors were counted, and its own descriptors hid the
    input's leak (the Format/delete race leaked 2 fds unreported). A delete that leaks one
    descriptor is an fd-leak finding, reused world or not."""
    leaked: list[int] = []
    original = admin_mod.AdminCommandSet._ns_delete

    def leaky_delete(self, req):
        original(self, req)
        leaked.append(os.open("/dev/null", os.O_RDONLY))

    monkeypatch.setattr(admin_mod.AdminCommandSet, "_ns_delete", leaky_delete)
    try:
        _found_both_ways(_DELETES, "fd-leak")
    finally:
        for fd in leaked:
            os.close(fd)


def _found_both_ways(data: bytes, invariant: str, *, after: Callable[[], None] = lambda: None) -> None:
    """``data`` breaks ``invariant`` on the reused world and on a fresh controller alike
    (``after`` runs once each target is closed)."""
    for reuse in (True, False):
        target = NvmeGuestTarget(reuse=reuse)
        try:
            with pytest.raises(FuzzFinding) as info:
                target.run(data)
            assert info.value.invariant == invariant, (reuse, info.value)
        finally:
            target.close()
            after()


@pytest.mark.parametrize("bug", ["namespace 1 unwritable", "number of queues refused"])
def test_a_controller_that_does_not_come_back_from_flr_is_a_recovery_finding(monkeypatch, bug):
    """Review S24b: the minimal check after an FLR left out what the full probe did (Set
    Features Number of Queues, the namespace list, a write read back), so a controller that
    came back unable to write namespace 1 or refusing Number of Queues went unreported."""
    flr: list[NvmeController] = []
    on_reset, set_features = NvmeController.on_reset, admin_mod.AdminCommandSet._set_features

    def on_reset_then(self, kind):
        on_reset(self, kind)
        if kind == ResetKind.FLR:
            flr.append(self)
            if bug == "namespace 1 unwritable":
                self.begin_format({1})  # (never ended: every I/O to it is refused)

    def set_features_then(self, req):
        if self.ctrl in flr and req.cdw10 & 0xFF == 0x07 and bug == "number of queues refused":
            raise NvmeStatusError(Status.CMD_SEQ_ERROR, "number of queues already set")
        return set_features(self, req)

    monkeypatch.setattr(NvmeController, "on_reset", on_reset_then)
    monkeypatch.setattr(admin_mod.AdminCommandSet, "_set_features", set_features_then)
    _found_both_ways(list(NvmeGuestTarget().seeds())[1], "recovery", after=flr.clear)


def test_a_traceback_logged_while_the_restore_waits_is_the_inputs_finding(monkeypatch):
    """Review S24b: the restore after an input ran outside the input's log watch, so what
    the input left running logged unchecked. A traceback logged during the restore is now
    a logged-traceback finding of that input."""
    original = restore.MachineTemplate.restore

    def noisy_restore(self):
        logging.getLogger("pcidev_nvme.admin").error("format failed", exc_info=RuntimeError("late failure"))
        original(self)

    target = NvmeGuestTarget()
    try:
        target.setup()
        monkeypatch.setattr(restore.MachineTemplate, "restore", noisy_restore)
        with pytest.raises(FuzzFinding) as info:
            target.run(_X)
        assert info.value.invariant == "logged-traceback" and "the restore after the input" in str(info.value)
    finally:
        target.close()


def test_a_namespace_an_input_created_is_no_fd_leak_and_gone_for_the_next_input(monkeypatch):
    """An input that creates a namespace (Namespace Management, waited for: its memfd is
    open before the input ends) leaves it to the restore after the input: no fd-leak in
    reuse mode, and the next input does not see it (nor its descriptor)."""
    real = fuzz._GuestRun._start

    def creating(self):
        real(self)
        data = bytearray(PAGE)
        struct.pack_into("<QQ", data, 0, 64, 64)  # NSZE, NCAP: 64 blocks
        assert self.drv.admin(0x0D, data=bytes(data), cdw10=0).dw0 == 3  # the new NSID
        assert 3 in self.ctrl.allocated

    target = NvmeGuestTarget()
    try:
        target.setup()
        fds = open_fd_count()
        with monkeypatch.context() as m:
            m.setattr(fuzz._GuestRun, "_start", creating)
            target.run(_X)
        assert open_fd_count() == fds and 3 not in target._world.ctrl.allocated
    finally:
        target.close()


# ---------------------------------------------------------------- nvme-vmstate: the kept destination
def _vmstate_target(reuse: bool) -> NvmeVmstateTarget:
    target = NvmeVmstateTarget()
    target.reuse_refused = reuse  # (the class keeps it; an instance may not)
    target.setup()
    return target


@pytest.fixture(scope="module")
def vmstate_targets():
    targets = _vmstate_target(True), _vmstate_target(False)
    yield targets
    for target in targets:
        target.close()


def _vmstate_outcome(target: NvmeVmstateTarget, data: bytes, monkeypatch) -> tuple[object, ...]:
    """B's outcome: its finding, the load's error (type and message) or, for a device that
    loaded, its registers and its whole saved state (but the clock's fields) after the
    target's guest accesses."""
    seen: list[object] = []
    real_load, real_exercise = vmstate_target.load_device_stream, NvmeVmstateTarget.exercise

    def load(dest, stream, fds):
        try:
            return real_load(dest, stream, fds)
        except Exception as exc:
            seen.append(("refused", type(exc).__name__, str(exc)))
            raise

    def exercise(self, dest):
        real_exercise(self, dest)
        regs = [dest.bar_read(0, off, 4) for off in range(0, 0x40, 4) if off != 0x18]
        dest.quiesce()
        body = save_device(dest).to_bytes()[PREFIX_SIZE:-TRAILER_SIZE]
        seen.append(("loaded", regs, _unclocked(msgpack.unpackb(body, raw=False, strict_map_key=False))))

    with monkeypatch.context() as m:
        m.setattr(vmstate_target, "load_device_stream", load)
        m.setattr(NvmeVmstateTarget, "exercise", exercise)
        try:
            target.run(data)
            finding = None
        except FuzzFinding as exc:
            finding = exc.signature
    return finding, seen


_mutations = st.one_of(st.binary(max_size=48), st.sampled_from(list(NvmeVmstateTarget().seeds())))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=st.lists(_mutations, min_size=1, max_size=3), b=_mutations)
def test_nvme_vmstate_input_after_refused_loads_matches_a_new_destination(vmstate_targets, monkeypatch, a, b):
    """B after inputs A on the target that keeps the destination of a refused load: the same
    refusal (type and message), or the same loaded device (registers, whole saved state),
    or the same finding, as B loaded into a controller made for it."""
    kept, fresh = vmstate_targets
    for data in a:
        _vmstate_outcome(kept, data, monkeypatch)
    assert _vmstate_outcome(kept, b, monkeypatch) == _vmstate_outcome(fresh, b, monkeypatch)


def test_nvme_vmstate_keeps_only_a_refused_destination_and_counts_its_descriptors():
    target = _vmstate_target(True)
    try:
        refused = next(s for s in target.seeds() if _refused(target, s))
        target.run(refused)
        spare = target.spare
        assert spare is not None
        fds = open_fd_count()
        for _ in range(5):
            target.run(refused)
            assert target.spare is spare and open_fd_count() == fds
        loaded = next(s for s in [*target.seeds(), *(bytes([i, 0, i]) + bytes(9) for i in range(256))]
                      if not _refused(target, s))
        target.run(loaded)  # a device that loaded is closed, never kept
        assert target.spare is None and open_fd_count() < fds
    finally:
        target.close()


def _refused(target: NvmeVmstateTarget, data: bytes) -> bool:
    dest = target.make_device()
    try:
        load_device_stream(dest, target.mutate(fuzz.FuzzInput(data)), target.fds).close()
        return False
    except PcidevError:
        return True
    finally:
        dest.owns_state = False
        dest.close()


def test_the_nvme_vmstate_comparison_sees_a_destination_a_refusal_changed(monkeypatch):
    """The comparison is not blind: if a refused load had changed the destination (here:
    taken namespace 1 out of it), the next input's outcome differs from a new device's: the
    stream a new device loads is refused by the changed one, for the namespace."""
    kept, fresh = _vmstate_target(True), _vmstate_target(False)
    try:
        candidates = [*kept.seeds(), *(bytes([i, 0, i]) + bytes(9) for i in range(256))]
        refused = next(s for s in candidates if _refused(kept, s))
        loaded = next(s for s in candidates if not _refused(kept, s))
        real_load = vmstate_target.load_device_stream

        def changing(dest, stream, fds):
            try:
                return real_load(dest, stream, fds)
            except PcidevError:
                dest.remove_namespace(1).ns.close()
                raise

        with monkeypatch.context() as m:
            m.setattr(vmstate_target, "load_device_stream", changing)
            kept.run(refused)
        got, want = _vmstate_outcome(kept, loaded, monkeypatch), _vmstate_outcome(fresh, loaded, monkeypatch)
        assert want[0] is None and [w[0] for w in want[1]] == ["loaded"]
        assert got[0] is None and len(got[1]) == 1
        kind, error, message = got[1][0]
        assert (kind, error) == ("refused", "StateError") and "namespace 1 was deleted" in message
    finally:
        kept.close()
        fresh.close()
