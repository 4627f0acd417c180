"""The ``virtio-guest`` target's guest-RAM check against a plain reference.

The target checks guest RAM in place after each action (the shadow against RAM itself,
gap by gap without copies), then copies into the shadow only the ranges the device may
write, and reuses the list of those ranges while the shadow and the queues stay the
same. The reference here does it the plain way (as the target did until session 25): the
whole of RAM copied back into the shadow after an action that changed it, each gap
compared through copies, the ranges computed afresh every time from every descriptor. Every committed corpus
input and seed, random inputs, and devices that write a stray byte at chosen places must
give the same outcome (the finding with its detail, or none) and the same recorded steps
(each action's description, device status and checksums of guest RAM and the disk) both
ways.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcidev.testing.fuzz import FuzzFinding
from pcidev_virtio import spec
from pcidev_virtio.blk import VirtioBlk
from pcidev_virtio.rng import VirtioRng
from pcidev_virtio.testing import fuzz
from pcidev_virtio.testing.fuzz import VirtioGuestTarget
from pcidev_virtio.virtqueue import Virtqueue

CORPUS = Path(__file__).parents[4] / "tests" / "fuzz" / "corpus" / "virtio-guest"
_INPUTS = sorted(p.read_bytes() for p in CORPUS.iterdir()) + list(VirtioGuestTarget().seeds())


def _table(ram: bytearray, at: int, count: int) -> Iterator[tuple[int, int, int, int]]:
    """The descriptors of a table in ``ram`` (as many as lie inside it)."""
    at = max(0, at)
    end = min(at + spec.DESC.size * count, len(ram))
    end -= (end - at) % spec.DESC.size if end > at else 0
    return spec.DESC.iter_unpack(ram[at:end]) if end > at else iter(())


class _WholeRamMemory(fuzz._GuestMemory):
    """The shadow takes the whole of guest RAM after an action that changed it."""

    def absorb(self, ram: mmap.mmap, ranges: list[tuple[int, int]]) -> None:
        self.shadow[:] = ram[:]
        self.version += 1


class _ReferenceRun(fuzz._GuestRun):
    """The target's run with the plain guest-RAM check."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.mem = _WholeRamMemory(self.mem.memory, self.mem.shadow)

    def _writable(self, ram: bytearray) -> list[tuple[int, int]]:
        """Computed afresh every time, every descriptor unpacked."""
        out: list[tuple[int, int]] = []
        for vq in self.dev.queues:
            if not vq.enabled:
                continue
            out.append((vq.device, vq.device + spec.used_ring_size(vq.size)))
            for addr, length, flags, _nxt in _table(ram, vq.desc, vq.size):
                if flags & spec.VRING_DESC_F_WRITE:
                    out.append((addr, addr + length))
                if flags & spec.VRING_DESC_F_INDIRECT:
                    out += [(a, a + n) for a, n, f, _x in _table(ram, addr, min(length // 16, vq.size))
                            if f & spec.VRING_DESC_F_WRITE]
        return sorted((max(0, a), min(fuzz.RAM, b)) for a, b in out if a < fuzz.RAM and b > a)

    def _check_memory(self, what: str, before: bytearray, after: fuzz._Ram, allowed: list[tuple[int, int]]) -> None:
        if before is after or before == after:
            return
        pos = 0
        for lo, hi in [*allowed, (fuzz.RAM, fuzz.RAM)]:
            if lo > pos and bytes(before[pos:lo]) != bytes(after[pos:lo]):
                at = next(i for i in range(pos, lo) if before[i] != after[i])
                raise FuzzFinding("memory-outside-buffers",
                                  f"{what}: guest memory at {at:#x} changed outside every device-writable "
                                  "buffer and used ring", where=what.split(" ")[0])
            pos = max(pos, hi)


def _outcome(data: bytes) -> tuple[object, ...]:
    target = VirtioGuestTarget()
    target.record = True
    try:
        try:
            target.run(data)
            found: tuple[str, str, str] | None = None
        except FuzzFinding as finding:
            found = (finding.invariant, finding.where, finding.detail)
        return found, tuple(target.steps)
    finally:
        target.close()


def _both(monkeypatch: pytest.MonkeyPatch, data: bytes,
          calls: list[int] | None = None) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """``data``'s outcome through the target, then through the reference (``calls`` set to
    ``[0]`` before each)."""
    calls = calls if calls is not None else [0]
    calls[0] = 0
    ours = _outcome(data)
    with monkeypatch.context() as m:
        m.setattr(fuzz, "_GuestRun", _ReferenceRun)
        calls[0] = 0
        reference = _outcome(data)
    return ours, reference


@pytest.mark.parametrize("data", _INPUTS, ids=[f"input-{i:02d}" for i in range(len(_INPUTS))])
def test_corpus_and_seeds_give_the_same_outcome_and_steps(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    ours, reference = _both(monkeypatch, data)
    assert ours == reference
    assert ours[1]  # (steps were recorded)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(min_size=1, max_size=200),
                      st.sampled_from(_INPUTS).flatmap(lambda s: st.binary(max_size=60).map(lambda t: s + t))))
def test_random_inputs_give_the_same_outcome_and_steps(data: bytes) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        ours, reference = _both(monkeypatch, data)
    assert ours == reference


def _stray_places() -> Iterator[tuple[str, int]]:
    """Where a misbehaving device writes: the edges of guest RAM, of the rings and of the
    buffers (just outside and just inside what it may write), and the pattern between."""
    used_end = fuzz.USED_AT + spec.used_ring_size(fuzz.BLK_QUEUE)
    yield from (("ram-first", 0), ("ram-last", fuzz.RAM - 1), ("pattern", 0x800), ("descriptors", fuzz.DESC_AT + 8),
                ("avail", fuzz.AVAIL_AT + 2), ("used-first", fuzz.USED_AT), ("used-last", used_end - 1),
                ("used-past", used_end), ("indirect", fuzz.INDIRECT_AT), ("buffer-first", fuzz.BUF_AT),
                ("buffers", fuzz.BUF_AT + 0x1234), ("buffer-end", fuzz.BUF_END))


@pytest.mark.parametrize("place", list(_stray_places()), ids=[name for name, _ in _stray_places()])
@pytest.mark.parametrize("nth", [1, 3])
def test_a_stray_write_gives_the_same_outcome(monkeypatch: pytest.MonkeyPatch, place: tuple[str, int],
                                              nth: int) -> None:
    """A device that writes one byte at ``place`` on its ``nth`` notification (after serving
    it): found (or, inside what it may write, not) the same way both ways."""
    _name, at = place
    calls = [0]  # notifications served in this run
    for cls in (VirtioBlk, VirtioRng):
        real = cls.queue_notify

        def stray(self: VirtioBlk, vq: Virtqueue, real: object = real) -> None:
            real(self, vq)  # type: ignore[operator]
            calls[0] += 1
            if calls[0] == nth:
                self.dma.write(at, bytes([self.dma.read(at, 1)[0] ^ 0xA5]))

        monkeypatch.setattr(cls, "queue_notify", stray)
    found: set[object] = set()
    for data in _INPUTS:
        ours, reference = _both(monkeypatch, data, calls)
        assert ours == reference
        finding = ours[0]
        found.add(finding[0] if isinstance(finding, tuple) else None)
    if place[0] in ("ram-first", "ram-last", "pattern", "used-past", "buffer-end"):
        assert "memory-outside-buffers" in found  # (never inside anything the device may write)
