"""Fuzzing real streams: whatever the damage, only VMStateError comes out.

Three layers: raw byte damage (flips, truncations, insertions, deletions — mostly
stopped by the envelope checks and the checksum), byte damage to the body with the
checksum recomputed (reaches msgpack and the decoders), and structural damage to
the decoded body (reaches every field check).  When a damaged stream does load, the
result must be a valid state that saves again.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmstate_descriptions import DEVICE_TYPE, FINGERPRINT, AllKinds, CtrlState, Extra, Item
from vmstate_golden import DATA, SAMPLE_V2

from pcidev.errors import VMStateError
from pcidev.vmstate import FdRef, dump_stream_json, load, peek_header, save
from pcidev.vmstate.stream import PREFIX_SIZE, seal

DESCRIPTIONS = [CtrlState, AllKinds]

RICH = AllKinds(
    u8=1, u16=2, u32=3, u64=1 << 40, i8=-1, i16=-300, i32=-70000, i64=-(1 << 40), flag=True,
    fixed=bytes(range(16)), blob=b"blob", anybytes=b"\xff" * 40, label="label", text="text \u00e9",
    fd=FdRef(1), maybe_fd=FdRef(2), maybe_u32=7, item=Item(tag=9, data=b"d"), words=(1, 2, 3),
    shorts=(-1, 1), pairs=(b"ab", b"cd"), grid=((1, 2), (3, 4)),
    ptrs_fixed=(None, Item(tag=1), None, None, Item(tag=2), None),
    ptrs_var=(Item(tag=3), None), ptrs_any=(None, None, Item(tag=4)),
    items=(Item(tag=5), Item(tag=6, data=b"12345678")), extra=Extra(note="n", counters=(1, 2)),
)


def real_streams() -> list[bytes]:
    return [
        (DATA / "sample-v1.pcvm").read_bytes(),
        (DATA / "sample-v2.pcvm").read_bytes(),
        save(DEVICE_TYPE, FINGERPRINT, [("test/ctrl", 0, SAMPLE_V2), ("test/allkinds", 9, RICH)]),
    ]


def only_typed_errors(data: bytes) -> None:
    """Run every consumer of streams; anything but VMStateError fails the test."""
    try:
        sections = load(data, device_type=DEVICE_TYPE, fingerprint=FINGERPRINT, descriptions=DESCRIPTIONS)
    except VMStateError:
        pass
    else:
        # accepted: must be valid state that saves and loads back identically
        again = save(DEVICE_TYPE, FINGERPRINT, sections)
        assert load(again, device_type=DEVICE_TYPE, fingerprint=FINGERPRINT,
                    descriptions=DESCRIPTIONS) == sections
    for tool in (peek_header, dump_stream_json):
        try:
            tool(data)
        except VMStateError:
            pass


def damage_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.randrange(5)
    if op == 0:  # flip bits
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        del b[rng.randrange(len(b)):]
    elif op == 2:  # insert
        pos = rng.randrange(len(b) + 1)
        b[pos:pos] = rng.randbytes(rng.randint(1, 8))
    elif op == 3:  # delete a run
        pos = rng.randrange(len(b))
        del b[pos: pos + rng.randint(1, 8)]
    else:  # overwrite with an interesting byte
        b[rng.randrange(len(b))] = rng.choice([0x00, 0xFF, 0xC0, 0xC1, 0xC2, 0xC3, 0x90, 0x80, 0xD4, 0xDC])
    return bytes(b)


def test_raw_byte_damage():
    rng = random.Random(1234)
    for data in real_streams():
        for _ in range(600):
            only_typed_errors(damage_bytes(rng, data))


def test_body_byte_damage_with_valid_checksum():
    rng = random.Random(99)
    for data in real_streams():
        inner = data[PREFIX_SIZE:-4]
        for _ in range(600):
            only_typed_errors(seal(damage_bytes(rng, inner)))


PALETTE: list[Any] = [
    None, True, False, 0, 1, -1, 255, 256, 65536, -(1 << 63), (1 << 64) - 1, 1.5, "", "x", "test/queue",
    b"", b"\x00" * 16, [], [None], [1, {}], [1, {}, {}], [2, {"qid": 1}], [99, {}], {}, {"x": 1},
    msgpack.ExtType(1, b"\x01\x00\x00\x00"), msgpack.ExtType(1, b""), msgpack.ExtType(7, b"abc"),
]


def containers(node: Any, out: list[Any]) -> list[Any]:
    if isinstance(node, (list, dict)):
        out.append(node)
        for child in (node if isinstance(node, list) else node.values()):
            containers(child, out)
    return out


def damage_tree(rng: random.Random, body: Any) -> None:
    target = rng.choice(containers(body, []))
    op = rng.randrange(4)
    if isinstance(target, list):
        if not target or op == 0:
            target.append(copy.deepcopy(rng.choice(PALETTE)))
        elif op == 1:
            del target[rng.randrange(len(target))]
        else:
            target[rng.randrange(len(target))] = copy.deepcopy(rng.choice(PALETTE))
    else:
        keys = list(target)
        if not keys or op == 0:
            target[rng.choice(["x", "prio", "base", "test/ctrl/irq", "qid", b"k"])] = copy.deepcopy(rng.choice(PALETTE))
        elif op == 1:
            del target[rng.choice(keys)]
        else:
            target[rng.choice(keys)] = copy.deepcopy(rng.choice(PALETTE))


def test_structural_damage():
    rng = random.Random(7)
    for data in real_streams():
        body = msgpack.unpackb(data[PREFIX_SIZE:-4])
        for _ in range(500):
            damaged = copy.deepcopy(body)
            for _ in range(rng.randint(1, 3)):
                damage_tree(rng, damaged)
            only_typed_errors(seal(msgpack.packb(damaged, use_bin_type=True)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data):
    only_typed_errors(data)
    only_typed_errors(seal(data))


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20))
def test_arbitrary_msgpack_values_in_place_of_a_section(value):
    only_typed_errors(seal(msgpack.packb({"device_type": DEVICE_TYPE, "fingerprint": FINGERPRINT,
                                          "sections": [["test/ctrl", 0, value]]})))
    only_typed_errors(seal(msgpack.packb({"device_type": DEVICE_TYPE, "fingerprint": FINGERPRINT,
                                          "sections": [["test/allkinds", 0, [3, {"item": value}]]]})))
