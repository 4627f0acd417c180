"""The ``vmstate`` fuzz target's mutations stay bounded: a list grown in several steps of
one input (the session-22 ``memory-growth`` finding) cannot blow the body up."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import msgpack
import pytest

from pcidev.testing.fuzz import FuzzInput, vmstate_target
from pcidev.testing.fuzz.vmstate_target import MAX_BODY_GROWTH, MAX_BODY_POSITIONS, VmstateTarget, body_extent
from pcidev.vmstate.stream import PREFIX_SIZE, TRAILER_SIZE, open_stream


@pytest.fixture
def target() -> Iterator[VmstateTarget]:
    t = VmstateTarget()
    t.setup()
    yield t
    t.close()


def _grow(target: VmstateTarget, position: tuple[object, ...], steps: int, times: int = 64) -> bytes:
    """An input whose every step grows the list at ``position`` ``times``-fold."""
    index = [p for p in vmstate_target._paths(target.body) if p].index(position)
    # steps-1; then per step: 0xff (any position, not only the sections'), the position,
    # kind 7, an odd byte (grow), the factor
    step = bytes([0xFF]) + struct.pack("<H", index) + bytes([7, 1, times - 1])
    return bytes([steps - 1]) + step * steps


def _sections(stream: bytes) -> list[object]:
    body = msgpack.unpackb(stream[PREFIX_SIZE:-TRAILER_SIZE], raw=False, strict_map_key=False)
    return list(body["sections"])


def test_one_list_growth_within_the_bounds_is_made(target):
    stream = target.mutate(FuzzInput(_grow(target, ("sections",), 1)))
    assert len(_sections(stream)) == 2 * 64  # edu's two sections, 64 times: ~280 kB
    open_stream(stream)


def test_a_list_grown_in_several_steps_stays_within_the_bounds(target):
    base = len(msgpack.packb(target.body, use_bin_type=True))
    # unbounded, two steps made an 18 MB stream and three a 1.1 GB one (3.4 GB peak)
    for steps in (2, 3, 4):
        stream = target.mutate(FuzzInput(_grow(target, ("sections",), steps)))
        body = msgpack.unpackb(stream[PREFIX_SIZE:-TRAILER_SIZE], raw=False, strict_map_key=False)
        assert len(stream) - PREFIX_SIZE - TRAILER_SIZE <= base + MAX_BODY_GROWTH
        assert len(vmstate_target._paths(body)) <= MAX_BODY_POSITIONS
        assert len(body["sections"]) == 2 * 64  # the first growth was made, the rest dropped
        open_stream(stream)


def test_a_part_shared_by_a_grown_list_counts_everywhere_it_occurs(target):
    # the sections list grown 64-fold holds the same two section lists 64 times over:
    # growing the DMA list inside one of them grows it in all 64 copies
    first = _grow(target, ("sections",), 1)
    grown = msgpack.unpackb(target.mutate(FuzzInput(first))[PREFIX_SIZE:-TRAILER_SIZE], raw=False,
                            strict_map_key=False)
    dma = [p for p in vmstate_target._paths(grown) if p].index(("sections", 0, 2, 1, "dma"))
    step = bytes([0xFF]) + struct.pack("<H", dma) + bytes([7, 1, 63])
    stream = target.mutate(FuzzInput(bytes([2]) + first[1:] + step * 2))
    body = msgpack.unpackb(stream[PREFIX_SIZE:-TRAILER_SIZE], raw=False, strict_map_key=False)
    positions, size = body_extent(body)
    assert positions <= MAX_BODY_POSITIONS and len(vmstate_target._paths(body)) == positions
    assert len(body["sections"]) == 128
    # the second growth (64 x 64 DMA entries, ~36k positions) was made, the third dropped
    assert {len(s[2][1]["dma"]) for s in body["sections"][0::2]} == {64}


def test_body_extent_counts_shared_parts_and_bounds_the_encoding():
    inner = [1, "ab", b"xyz", {"k": None}]
    body = {"a": [inner] * 3, "b": msgpack.ExtType(1, b"\0" * 4), "c": 1.5, "d": -(1 << 63)}
    positions, size = body_extent(body)
    assert positions == len(vmstate_target._paths(body)) == 1 + 1 + 3 * 6 + 3
    assert size >= len(msgpack.packb(body, use_bin_type=True))


def test_body_extent_bounds_every_mutated_body(target):
    for seed in range(200):
        data = struct.pack("<QQQQ", *(seed * k * 0x9E3779B97F4A7C15 % (1 << 64) for k in (1, 3, 5, 7)))
        stream = target.mutate(FuzzInput(data))
        body = msgpack.unpackb(stream[PREFIX_SIZE:-TRAILER_SIZE], raw=False, strict_map_key=False)
        positions, size = body_extent(body)
        assert positions == len(vmstate_target._paths(body))
        assert len(stream) - PREFIX_SIZE - TRAILER_SIZE <= size
