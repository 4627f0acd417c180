"""Round trips: every field kind, pointer arrays with arbitrary null patterns."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmstate_descriptions import (
    DEVICE_TYPE,
    FINGERPRINT,
    AllKinds,
    Color,
    CtrlState,
    Extra,
    IrqState,
    Item,
    QueueState,
)

from pcidev.vmstate import (
    U8,
    Array,
    FdRef,
    Section,
    decode_state,
    encode_state,
    load,
    save,
    vmstate,
)
from pcidev.vmstate.testing import strategy_for

DESCRIPTIONS = [AllKinds, CtrlState, QueueState, IrqState, Item, Extra]


def roundtrip(*states, instance_ids=None):
    ids = instance_ids or range(len(states))
    sections = [(type(s).__vmstate__.name, i, s) for i, s in zip(ids, states, strict=True)]
    data = save(DEVICE_TYPE, FINGERPRINT, sections)
    out = load(data, device_type=DEVICE_TYPE, fingerprint=FINGERPRINT, descriptions=DESCRIPTIONS)
    assert [(n, i) for n, i, _ in out] == [(n, i) for n, i, _ in sections]
    return [s for _, _, s in out]


@settings(max_examples=200, deadline=None)
@given(strategy_for(AllKinds))
def test_every_field_kind_round_trips(state):
    [back] = roundtrip(state)
    assert back == state
    assert back is not state
    # the wire value alone round-trips too
    assert decode_state(encode_state(state), AllKinds) == state


@settings(max_examples=100, deadline=None)
@given(strategy_for(CtrlState))
def test_sample_description_round_trips(state):
    assert roundtrip(state) == [state]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), max_size=40), st.data())
def test_pointer_arrays_keep_exactly_the_present_entries(pattern, data):
    entries = tuple(data.draw(strategy_for(Item)) if present else None for present in pattern)
    fixed = tuple(list(entries[:6]) + [None] * (6 - len(entries[:6])))
    state = AllKinds(ptrs_fixed=fixed, ptrs_var=entries[:10], ptrs_any=entries)
    [back] = roundtrip(state)
    assert [e is None for e in back.ptrs_any] == [not p for p in pattern]
    assert back.ptrs_any == entries
    assert back.ptrs_var == entries[:10]
    assert back.ptrs_fixed == fixed


@settings(max_examples=50, deadline=None)
@given(st.lists(strategy_for(QueueState) | st.none(), min_size=8, max_size=8),
       st.integers(0, 0xFFFF_FFFF))
def test_many_sections_and_instance_ids(queues, iid):
    ctrl = CtrlState(enabled=False, serial="x", queues=tuple(queues))
    states = [ctrl, *(q for q in queues if q is not None)]
    ids = [iid] + list(range(len(states) - 1))
    assert roundtrip(*states, instance_ids=ids) == states


def test_extreme_integers():
    lo = AllKinds(u8=0, u16=0, u32=0, u64=0, i8=-128, i16=-(1 << 15), i32=-(1 << 31), i64=-(1 << 63))
    hi = AllKinds(u8=255, u16=0xFFFF, u32=0xFFFF_FFFF, u64=(1 << 64) - 1, i8=127, i16=(1 << 15) - 1,
                  i32=(1 << 31) - 1, i64=(1 << 63) - 1)
    assert roundtrip(lo, hi) == [lo, hi]


def test_fd_refs_travel_as_indices():
    state = AllKinds(fd=FdRef(0xFFFF_FFFF), maybe_fd=FdRef(3))
    [back] = roundtrip(state)
    assert back.fd == FdRef(0xFFFF_FFFF) and back.maybe_fd == FdRef(3)
    with pytest.raises(ValueError):
        FdRef(-1)


def test_save_accepts_int_enums_lists_and_bytearrays():
    state = AllKinds(u8=Color.RED, u16=Color.BLUE, fixed=bytearray(16), blob=memoryview(b"ab"),
                     words=[1, 2, 3], items=[Item(tag=Color.BLUE)])
    [back] = roundtrip(state)
    assert back.u8 == 1 and type(back.u8) is int
    assert back.fixed == bytes(16) and type(back.fixed) is bytes
    assert back.blob == b"ab"
    assert back.words == (1, 2, 3) and back.items == (Item(tag=200),)


def test_subsection_written_only_when_needed():
    plain = CtrlState(enabled=True, serial="s", queues=(None,) * 8)
    with_irq = attrs.evolve(plain, irq=IrqState(vector=3, eventfd=FdRef(1)))
    wire_plain = encode_state(plain)
    wire_irq = encode_state(with_irq)
    assert len(wire_plain) == 2  # [version, fields]: no subsection map at all
    assert wire_irq[2].keys() == {"test/ctrl/irq"}
    assert roundtrip(plain, with_irq, instance_ids=[0, 1]) == [plain, with_irq]


def test_save_is_deterministic():
    state = CtrlState(enabled=True, serial="s", queues=(QueueState(qid=1, size=2),) + (None,) * 7)
    a = save(DEVICE_TYPE, FINGERPRINT, [("test/ctrl", 0, state)])
    b = save(DEVICE_TYPE, dict(reversed(list(FINGERPRINT.items()))), [("test/ctrl", 0, state)])
    assert a == save(DEVICE_TYPE, FINGERPRINT, [("test/ctrl", 0, state)])
    # fingerprint order is irrelevant to loading
    load(b, device_type=DEVICE_TYPE, fingerprint=FINGERPRINT, descriptions=[CtrlState])


def test_load_returns_sections_and_accepts_a_mapping_registry():
    q = QueueState(qid=1, size=2)
    data = save(DEVICE_TYPE, FINGERPRINT, [Section("test/queue", 4, q)])
    out = load(data, device_type=DEVICE_TYPE, fingerprint=FINGERPRINT,
               descriptions={"anything": QueueState}, expected=[("test/queue", 4)])
    assert out == [("test/queue", 4, q)]
    assert out[0].state == q and out[0].instance_id == 4


def test_load_does_not_mutate_its_input():
    state = CtrlState(enabled=True, serial="s", queues=(QueueState(qid=1, size=2),) + (None,) * 7)
    data = bytearray(save(DEVICE_TYPE, FINGERPRINT, [("test/ctrl", 0, state)]))
    before = bytes(data)
    fp = {"max_queues": 8, "namespace_sizes": [1 << 20, 1 << 30], "bar0_size": 0x4000}
    load(data, device_type=DEVICE_TYPE, fingerprint=fp, descriptions=[CtrlState])
    assert bytes(data) == before
    assert fp == FINGERPRINT


def test_private_and_kw_only_attributes():
    @vmstate("test/private")
    @attrs.frozen
    class Private:
        _secret: U8 = 0
        visible: Array[U8, 2] = attrs.field(default=(0, 0), kw_only=True)

    state = Private(secret=7, visible=(1, 2))
    assert decode_state(encode_state(state), Private) == state
    assert encode_state(state)[1] == {"_secret": 7, "visible": [1, 2]}

