"""Declared constraints and invariants: every loaded field range-checked, every
cross-field invariant enforced, the stream refused with a StateError naming the field
(nothing is built from it) -- and a save is never refused by them."""

from __future__ import annotations

from typing import Annotated

import attrs
import pytest

from pcidev.errors import ConfigError
from pcidev.vmstate import (
    U8,
    U16,
    U32,
    U64,
    Check,
    Mask,
    Range,
    StateError,
    VarArray,
    load,
    save,
    vmstate,
)


def _head_in_queue(q: QueueState) -> tuple[str, str] | None:
    if q.head >= q.size:
        return f"head {q.head} outside a queue of {q.size}", "head"
    return None


def _even(v: int) -> str | None:
    return None if v % 2 == 0 else f"{v} is odd"


@vmstate("cons/queue", check=_head_in_queue)
@attrs.frozen
class QueueState:
    size: Annotated[U16, Range(2, 4096)] = 2
    head: U16 = 0


@vmstate("cons/ctrl")
@attrs.frozen
class CtrlState:
    state: Annotated[U8, Range(0, 2)] = 0
    base: Annotated[U64, Mask(~0xFFF & (2**64 - 1))] = 0
    even: Annotated[U32, Check(_even)] = 0
    queues: VarArray[QueueState, 8] = ()


def _round_trip(st: CtrlState) -> CtrlState:
    data = save("cons", {}, [("cons/ctrl", 0, st)])
    [(_, _, out)] = load(data, device_type="cons", fingerprint={}, descriptions=[CtrlState])
    return out


def test_values_inside_the_constraints_load():
    st = CtrlState(state=2, base=0x1000, even=4, queues=(QueueState(16, 15),))
    assert _round_trip(st) == st


@pytest.mark.parametrize(("change", "path", "words"), [
    ({"state": 3}, "state", "out of range 0..2"),
    ({"base": 0x1234}, "base", "outside the mask"),
    ({"even": 3}, "even", "3 is odd"),
    ({"queues": (QueueState(2, 0), QueueState(1, 0))}, "queues[1].size", "out of range 2..4096"),
    ({"queues": (QueueState(4, 4),)}, "queues[0].head", "head 4 outside a queue of 4"),
])
def test_a_value_outside_its_constraint_refuses_the_stream_naming_the_field(change, path, words):
    # (saving does not check them: a device whose state breaks them has a bug the load reports)
    data = save("cons", {}, [("cons/ctrl", 0, attrs.evolve(CtrlState(), **change))])
    with pytest.raises(StateError, match=words) as info:
        load(data, device_type="cons", fingerprint={}, descriptions=[CtrlState])
    assert info.value.path == path and info.value.section == "cons/ctrl"


def test_a_check_that_raises_is_a_state_error_not_a_crash():
    def boom(v: int) -> str | None:
        raise ZeroDivisionError("no")

    @vmstate("cons/boom")
    @attrs.frozen
    class Boom:
        x: Annotated[U8, Check(boom)] = 0

    data = save("cons", {}, [("cons/boom", 0, Boom())])
    with pytest.raises(StateError, match="ZeroDivisionError"):
        load(data, device_type="cons", fingerprint={}, descriptions=[Boom])


def test_range_and_mask_apply_to_integers_only():
    with pytest.raises(ConfigError, match="integer fields only"):
        @vmstate("cons/bad")
        @attrs.frozen
        class Bad:
            x: Annotated[bytes, Range(0, 1)] = b""
    with pytest.raises(ConfigError, match="empty range"):
        @vmstate("cons/bad2")
        @attrs.frozen
        class Bad2:
            x: Annotated[U8, Range(2, 1)] = 2


def test_a_constraint_inside_the_type_is_refused_where_the_decoder_would_not_check_it():
    """An Optional's member or an array's element: the decoder checks constraints of the
    field as a whole only, so a nested one is a declaration error, not a silent no-op;
    the field-level form of an Optional is enforced."""
    with pytest.raises(ConfigError, match="inside the field's type is not checked"):
        @vmstate("t/nested-opt")
        @attrs.frozen
        class Opt:
            x: Annotated[U8, Range(0, 3)] | None = None
    with pytest.raises(ConfigError, match="inside the field's type is not checked"):
        @vmstate("t/nested-arr")
        @attrs.frozen
        class Arr:
            xs: VarArray[Annotated[U8, Range(0, 3)], 4] = ()

    @vmstate("t/whole-opt")
    @attrs.frozen
    class Whole:
        x: Annotated[U8 | None, Range(0, 3)] = None

    def roundtrip(st: Whole) -> Whole:
        data = save("cons", {}, [("t/whole-opt", 0, st)])
        [(_, _, out)] = load(data, device_type="cons", fingerprint={}, descriptions=[Whole])
        return out

    assert roundtrip(Whole(2)) == Whole(2) and roundtrip(Whole(None)) == Whole(None)
    with pytest.raises(StateError, match="x"):
        roundtrip(Whole(9))
