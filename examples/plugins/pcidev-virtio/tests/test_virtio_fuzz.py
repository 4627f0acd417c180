"""The ``virtio-guest`` fuzz target: its seeds keep every invariant, and its checks fire when
the device misbehaves on purpose (a stray guest-memory write, an escaped exception,
DEVICE_NEEDS_RESET for well-framed traffic, a used entry for a head never made available,
a failed request that changed the disk)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.testing.fuzz import FuzzFinding, make_target
from pcidev.testing.fuzz.target import open_fd_count
from pcidev_virtio import spec
from pcidev_virtio.blk import VirtioBlk
from pcidev_virtio.blk_requests import BlkRequestEngine
from pcidev_virtio.blk_spec import BlkStatus
from pcidev_virtio.device import VirtioPciDevice
from pcidev_virtio.testing.fuzz import BUF_AT, RAM, USED_AT, VirtioGuestTarget
from pcidev_virtio.virtqueue import Virtqueue

CORPUS = Path(__file__).parents[4] / "tests" / "fuzz" / "corpus" / "virtio-guest"


def _seeds() -> list[bytes]:
    return list(VirtioGuestTarget().seeds())


def test_the_plugin_registers_the_target() -> None:
    target = make_target(load_registry(make_plugin_manager()), "virtio-guest")
    assert isinstance(target, VirtioGuestTarget)


@pytest.mark.parametrize("seed", _seeds(), ids=[f"seed-{i:02d}" for i in range(len(_seeds()))])
def test_seeds_keep_every_invariant(seed: bytes) -> None:
    VirtioGuestTarget().run(seed)


def test_the_committed_corpus_holds_the_seeds() -> None:
    committed = {p.read_bytes() for p in CORPUS.iterdir()}
    assert set(_seeds()) <= committed


def _finding(seed: bytes) -> FuzzFinding:
    with pytest.raises(FuzzFinding) as info:
        VirtioGuestTarget().run(seed)
    return info.value


def test_a_write_outside_the_named_buffers_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    real = VirtioBlk.queue_notify

    def stray(self: VirtioBlk, vq: Virtqueue) -> None:
        real(self, vq)
        self.dma.write(0x800, b"\x00")  # a byte no descriptor names

    monkeypatch.setattr(VirtioBlk, "queue_notify", stray)
    assert _finding(_seeds()[0]).invariant == "memory-outside-buffers"


def test_a_write_into_a_device_readable_buffer_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    real = VirtioBlk.queue_notify

    def header_write(self: VirtioBlk, vq: Virtqueue) -> None:
        header = self.dma.read_struct(spec.DESC, vq.desc)[0]  # the first request's header: device-readable
        real(self, vq)
        self.dma.write(header, b"\xFF")

    monkeypatch.setattr(VirtioBlk, "queue_notify", header_write)
    assert _finding(_seeds()[0]).invariant == "memory-outside-buffers"


@pytest.mark.parametrize("at", [0, RAM - 1, USED_AT + spec.used_ring_size(64), BUF_AT - 1])
def test_a_write_just_outside_what_the_device_may_write_is_found(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """The first and last byte of guest RAM, the byte after the used ring, the byte before
    the first buffer: each checked though the same action writes the used ring and buffers
    (the comparison goes gap by gap between those)."""
    real = VirtioBlk.queue_notify

    def stray(self: VirtioBlk, vq: Virtqueue) -> None:
        real(self, vq)
        self.dma.write(at, bytes([self.dma.read(at, 1)[0] ^ 0x01]))

    monkeypatch.setattr(VirtioBlk, "queue_notify", stray)
    finding = _finding(_seeds()[0])
    assert finding.invariant == "memory-outside-buffers" and f"at {at:#x} " in finding.detail


def test_a_write_into_the_used_ring_while_needs_reset_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop seed sets DEVICE_NEEDS_RESET; a notification after it (a doorbell action)
    that writes the used ring's flags -- a range the device may write otherwise -- is found."""
    real = VirtioPciDevice._notify_access

    def writing(self: VirtioPciDevice, offset: int, size: int, is_write: bool, value: int) -> int:
        if self.status & spec.Status.DEVICE_NEEDS_RESET:
            self.dma.write(USED_AT, b"\x01")
        return real(self, offset, size, is_write, value)

    monkeypatch.setattr(VirtioPciDevice, "_notify_access", writing)
    assert _finding(_seeds()[3] + bytes([8, 0])).invariant == "needs-reset-ignored"


def test_an_exception_escaping_a_notification_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(self: VirtioBlk, vq: Virtqueue) -> None:
        raise IndexError("escaped on purpose")

    monkeypatch.setattr(VirtioBlk, "queue_notify", failing)
    finding = _finding(_seeds()[0])
    assert finding.invariant in ("escaped-exception", "logged-traceback") and "IndexError" in finding.detail


def test_needs_reset_for_well_framed_traffic_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    def refusing(self: VirtioBlk, vq: Virtqueue) -> None:
        self.set_needs_reset("refused on purpose")

    monkeypatch.setattr(VirtioBlk, "queue_notify", refusing)
    assert _finding(_seeds()[0]).invariant == "needs-reset"


def test_a_used_entry_for_another_head_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Virtqueue.push

    def wrong_head(self: Virtqueue, elem: object, written: int) -> None:
        slot = self.device + 4 + spec.USED_ELEM_SIZE * (self.used_idx % self.size)
        real(self, elem, written)  # type: ignore[arg-type]
        self.owner.dma.write_u32(slot, 7)  # a head the guest never made available

    monkeypatch.setattr(Virtqueue, "push", wrong_head)
    assert _finding(_seeds()[2]).invariant == "used-head"  # virtio-rng: no disk to check first


def test_a_failed_request_that_changed_the_disk_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    real = BlkRequestEngine._read

    def damaging(self: BlkRequestEngine, sector: int, data: list[memoryview]) -> BlkStatus:
        self.backend.writev([memoryview(b"\x00" * 512)], 0, fua=False)
        real(self, sector, data)
        return BlkStatus.IOERR

    monkeypatch.setattr(BlkRequestEngine, "_read", damaging)
    assert _finding(_seeds()[0]).invariant == "disk-outside-requests"


def test_a_well_framed_request_left_unanswered_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(VirtioBlk, "queue_notify", lambda self, vq: None)
    assert _finding(_seeds()[0]).invariant == "no-completion"


def test_features_ok_with_features_not_offered_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(VirtioBlk, "_features_acceptable", lambda self: True)
    # reset, ACKNOWLEDGE, DRIVER, driver features 0xFFFFFFFF in window 0 (VERSION_1 left out), FEATURES_OK
    seed = bytes([0, 0, 0, 3, 0, 3, 1, 3, 2, 0, 1, 0, 0, 0, 0, 2, 0, 0, 5, 3, 3])
    assert _finding(seed).invariant == "features-ok"


def test_the_loop_seed_reaches_device_needs_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hostile seeds reach the device's refusals (the target exercises what it is for)."""
    reasons: list[str] = []
    real = VirtioBlk.set_needs_reset

    def recording(self: VirtioBlk, reason: str) -> None:
        reasons.append(reason)
        real(self, reason)

    monkeypatch.setattr(VirtioBlk, "set_needs_reset", recording)
    VirtioGuestTarget().run(_seeds()[3])
    assert len(reasons) == 1 and "longer than" in reasons[0]


# -- inputs do not leak into each other: the target keeps a machine and device per kind of
# input (reset before each: FLR, vectors, disk) and its RAM buffers; an input must replay
# the same after any other as on a fresh target (virtio-rng's steps leave out guest RAM:
# its entropy differs)

_INPUTS = st.one_of(st.binary(min_size=1, max_size=160), st.sampled_from(_seeds()))


def _outcome(target: VirtioGuestTarget, data: bytes) -> tuple[object, ...]:
    try:
        target.run(data)
        found = None
    except FuzzFinding as finding:
        found = finding.signature
    return found, tuple(target.steps)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=_INPUTS, second=_INPUTS)
def test_an_input_replays_the_same_after_another(first: bytes, second: bytes) -> None:
    """B after A on one target gives the same steps (descriptions with the values read,
    device status, checksums of guest RAM and the disk) and outcome as B on a fresh target."""
    second = bytes([(second[0] & ~3) | (first[0] & 3)]) + second[1:]  # the same kind: the same kept device
    reused, fresh = VirtioGuestTarget(), VirtioGuestTarget()
    reused.record = fresh.record = True
    try:
        _outcome(reused, first)
        assert _outcome(reused, second) == _outcome(fresh, second)
    finally:
        reused.close()
        fresh.close()


def test_the_device_is_kept_between_inputs_and_dropped_after_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    target = VirtioGuestTarget()
    try:
        target.run(_seeds()[0])
        kept = target._setups[(False, 1)]
        fds = open_fd_count()
        for _ in range(3):
            target.run(_seeds()[1])
        assert target._setups[(False, 1)] is kept  # reset, not rebuilt
        assert open_fd_count() == fds  # (the reset's vectors replace the old ones)
        monkeypatch.setattr(VirtioBlk, "queue_notify", lambda self, vq: None)
        with pytest.raises(FuzzFinding):
            target.run(_seeds()[0])
        assert (False, 1) not in target._setups  # what a finding left is not reused
    finally:
        target.close()
