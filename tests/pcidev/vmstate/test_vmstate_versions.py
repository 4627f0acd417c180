"""Versions: golden streams of each released version, upgrade steps, fields added
in later versions, subsections as the forward-compatibility valve."""

from __future__ import annotations

from typing import Any, Optional

import attrs
import pytest
from vmstate_descriptions import DEVICE_TYPE, FINGERPRINT, CtrlState, IrqState, QueueState
from vmstate_descriptions_v1 import SAMPLE_V1, CtrlStateV1, QueueStateV1
from vmstate_golden import DATA, SAMPLE_V1_UPGRADED, SAMPLE_V2

from pcidev.errors import ConfigError
from pcidev.vmstate import (
    U8,
    U16,
    StateError,
    VersionError,
    decode_state,
    encode_state,
    load,
    peek_header,
    save,
    vmfield,
    vmstate,
)


def load_ctrl(data: bytes, *classes: type) -> Any:
    [(name, iid, state)] = load(data, device_type=DEVICE_TYPE, fingerprint=FINGERPRINT,
                                descriptions=classes or [CtrlState])
    assert (name, iid) == ("test/ctrl", 0)
    return state


# ------------------------------------------------------------------ golden streams
def test_golden_v1_is_still_what_version_1_writes():
    # pins the wire format byte for byte: same classes, same bytes
    golden = (DATA / "sample-v1.pcvm").read_bytes()
    assert save(DEVICE_TYPE, FINGERPRINT, [("test/ctrl", 0, SAMPLE_V1)]) == golden
    assert load_ctrl(golden, CtrlStateV1) == SAMPLE_V1


def test_current_code_loads_golden_v1_through_the_upgrade_step():
    golden = (DATA / "sample-v1.pcvm").read_bytes()
    header = peek_header(golden)
    assert [s.version for s in header.sections] == [1]
    state = load_ctrl(golden)
    assert state == SAMPLE_V1_UPGRADED
    assert state.queues[0].dma_addr == 0x1000 and state.queues[0].prio == 0
    assert state.irq is None


def test_golden_v2_loads_and_is_what_current_code_writes():
    golden = (DATA / "sample-v2.pcvm").read_bytes()
    assert load_ctrl(golden) == SAMPLE_V2
    assert save(DEVICE_TYPE, FINGERPRINT, [("test/ctrl", 0, SAMPLE_V2)]) == golden


def test_version_2_stream_is_refused_by_version_1_code():
    golden = (DATA / "sample-v2.pcvm").read_bytes()
    with pytest.raises(VersionError) as ei:
        load_ctrl(golden, CtrlStateV1)
    err = ei.value
    assert err.section == "test/ctrl" and err.path == "queues[0]"
    assert "'test/queue': incoming version 2 is too new for local version 1" in str(err)


def test_subsection_unknown_to_old_code_is_refused_but_absent_one_is_fine():
    plain = CtrlState(enabled=True, serial="s", queues=(None,) * 8)
    # no queues (so no test/queue v2 entries), no subsection: version 1 code loads it
    data = save(DEVICE_TYPE, FINGERPRINT, [("test/ctrl", 0, plain)])
    assert load_ctrl(data, CtrlStateV1) == CtrlStateV1(enabled=True, serial="s", queues=(None,) * 8)
    # with the subsection written, version 1 code refuses, naming it
    data = save(DEVICE_TYPE, FINGERPRINT,
                [("test/ctrl", 0, attrs.evolve(plain, irq=IrqState(vector=1)))])
    with pytest.raises(StateError, match="unknown subsection 'test/ctrl/irq' in 'test/ctrl'"):
        load_ctrl(data, CtrlStateV1)


# ------------------------------------------------------------ version mechanics
def _v1_wire(**fields: Any) -> list:
    base = {"qid": 1, "size": 8, "head": 0, "tail": 0, "base": 0x40, "pending": []}
    base.update(fields)
    return [1, base]


def test_field_added_later_takes_its_default_from_older_streams():
    q = decode_state(_v1_wire(), QueueState)
    assert q == QueueState(qid=1, size=8, dma_addr=0x40, prio=0)


def test_field_added_later_must_not_appear_in_older_streams():
    with pytest.raises(StateError) as ei:
        decode_state(_v1_wire(prio=3), QueueState, section="s", instance_id=1)
    assert ei.value.path == "prio"
    assert "exists only since version 2 of 'test/queue', but the stream has version 1" in str(ei.value)


def test_field_of_current_version_is_required():
    wire = encode_state(QueueState(qid=1, size=2))
    del wire[1]["prio"]
    with pytest.raises(StateError, match=r"missing field\(s\) 'prio' for 'test/queue' version 2"):
        decode_state(wire, QueueState)


def test_old_field_name_in_current_version_stream_is_refused():
    wire = encode_state(QueueState(qid=1, size=2))
    wire[1]["base"] = wire[1].pop("dma_addr")
    with pytest.raises(StateError) as ei:
        decode_state(wire, QueueState)
    assert ei.value.path == "base"
    assert "unknown field(s) 'base'" in str(ei.value) and "missing field(s) 'dma_addr'" in str(ei.value)


def test_upgrade_steps_chain_and_run_in_order():
    calls = []

    def step(frm):
        def fn(fields):
            calls.append(frm)
            fields = dict(fields)
            fields["n"] = fields.pop("n") * 10 + frm
            return fields
        return fn

    @vmstate("test/chain", version=4, min_version=1, upgrades={1: step(1), 2: step(2), 3: step(3)})
    @attrs.frozen
    class Chain:
        n: U16 = 0

    assert decode_state([1, {"n": 0}], Chain) == Chain(n=123)
    assert calls == [1, 2, 3]
    calls.clear()
    assert decode_state([3, {"n": 5}], Chain) == Chain(n=53)
    assert calls == [3]
    calls.clear()
    assert decode_state([4, {"n": 5}], Chain) == Chain(n=5)
    assert calls == []


def test_upgrade_step_can_supply_a_field_without_default():
    def add_limit(fields):
        return {**fields, "limit": fields["size"] * 2}

    @vmstate("test/limit", version=2, min_version=1, upgrades={1: add_limit})
    @attrs.frozen
    class Limit:
        size: U16
        limit: U16 = vmfield(since=2)

    assert decode_state([1, {"size": 4}], Limit) == Limit(size=4, limit=8)
    # the upgrade's output is checked like stream data
    assert decode_state([2, {"size": 4, "limit": 1}], Limit) == Limit(size=4, limit=1)
    with pytest.raises(StateError) as ei:
        decode_state([1, {"size": 40000}], Limit)
    assert ei.value.path == "limit" and "out of range for u16" in str(ei.value)


def test_failing_or_misbehaving_upgrade_step_is_a_typed_error():
    def boom(fields):
        raise KeyError("nope")

    @vmstate("test/boom", version=2, min_version=1, upgrades={1: boom})
    @attrs.frozen
    class Boom:
        x: U8 = 0

    with pytest.raises(StateError, match="upgrade of 'test/boom' from version 1 to 2 failed: KeyError"):
        decode_state([1, {"x": 1}], Boom, section="sec", instance_id=0)

    @vmstate("test/notdict", version=2, min_version=1, upgrades={1: lambda f: None})
    @attrs.frozen
    class NotDict:
        x: U8 = 0

    with pytest.raises(StateError, match="returned NoneType, not a dict"):
        decode_state([1, {"x": 1}], NotDict)


def test_too_old_and_too_new_versions():
    @vmstate("test/window", version=5, min_version=3)
    @attrs.frozen
    class Window:
        x: U8 = 0

    assert decode_state([3, {"x": 1}], Window) == Window(x=1)
    for ver, word in [(2, "too old for local minimum version 3"), (0, "too old"),
                      (-1, "too old"), (6, "too new for local version 5")]:
        with pytest.raises(VersionError, match=word):
            decode_state([ver, {"x": 1}], Window)
    with pytest.raises(StateError, match="version of 'test/window' must be an integer, got bool"):
        decode_state([True, {"x": 1}], Window)


def test_subsections_are_versioned_independently():
    @vmstate("test/sub", version=2, min_version=1, upgrades={1: lambda f: {**f, "b": 9}})
    @attrs.frozen
    class Sub:
        a: U8
        b: U8 = vmfield(since=2)

    @vmstate("test/parent")
    @attrs.frozen
    class Parent:
        x: U8 = 0
        sub: Optional[Sub] = None

    assert decode_state([1, {"x": 1}, {"test/sub": [1, {"a": 2}]}], Parent) == Parent(x=1, sub=Sub(a=2, b=9))
    with pytest.raises(VersionError) as ei:
        decode_state([1, {"x": 1}, {"test/sub": [3, {"a": 2, "b": 1}]}], Parent)
    assert ei.value.path == "sub"


def test_state_class_validators_run_on_load():
    def even(inst, attribute, value):
        if value % 2:
            raise ValueError("must be even")

    @vmstate("test/even")
    @attrs.frozen
    class Even:
        n: U8 = attrs.field(default=0, validator=even)

    with pytest.raises(StateError, match="state class of 'test/even' rejected the values: ValueError: must be even"):
        decode_state([1, {"n": 3}], Even)


def test_default_that_does_not_fit_is_reported():
    @vmstate("test/baddefault", version=2, min_version=1)
    @attrs.frozen
    class BadDefault:
        n: U8 = vmfield(default=300, since=2)

    with pytest.raises(StateError, match="default value does not fit the field"):
        decode_state([1, {}], BadDefault)


def test_recursive_descriptions_are_rejected():
    @vmstate("test/node")
    @attrs.frozen
    class Node:
        children: tuple[Optional[Node], ...] = ()

    with pytest.raises(ConfigError, match="recursive state description: test/node -> test/node"):
        encode_state(Node())


@vmstate("test/early")
@attrs.frozen
class Early:
    later: Later


@vmstate("test/later")
@attrs.frozen
class Later:
    v: U16 = 0


def test_module_level_forward_reference():
    assert decode_state(encode_state(Early(Later(5))), Early) == Early(Later(5))


def test_undefined_annotation_is_a_config_error_on_first_use():
    @vmstate("test/undefined")
    @attrs.frozen
    class Undefined:
        b: NoSuchThing  # noqa: F821 - deliberately undefined

    with pytest.raises(ConfigError, match="cannot resolve a field annotation: name 'NoSuchThing'"):
        encode_state(Undefined(b=None))


def test_unused_upgrade_steps_below_stream_version_do_not_run():
    ran = []

    @vmstate("test/skip", version=3, min_version=1, upgrades={1: lambda f: ran.append(1) or f,
                                                             2: lambda f: ran.append(2) or f})
    @attrs.frozen
    class Skip:
        v: U16 = 0

    decode_state([2, {"v": 1}], Skip)
    assert ran == [2]


def test_same_name_old_and_new_classes_coexist():
    # the registry is per load call: v1 and v2 classes of "test/queue" both work
    q1 = QueueStateV1(qid=1, size=2, base=3)
    data = save(DEVICE_TYPE, FINGERPRINT, [("test/queue", 0, q1)])
    [(_, _, old)] = load(data, device_type=DEVICE_TYPE, fingerprint=FINGERPRINT, descriptions=[QueueStateV1])
    [(_, _, new)] = load(data, device_type=DEVICE_TYPE, fingerprint=FINGERPRINT, descriptions=[QueueState])
    assert old == q1 and new == QueueState(qid=1, size=2, dma_addr=3)
    with pytest.raises(ConfigError, match="share the description name 'test/queue'"):
        load(data, device_type=DEVICE_TYPE, fingerprint=FINGERPRINT, descriptions=[QueueState, QueueStateV1])
