"""Schemas: the committed snapshots, the compatibility checker, the snapshot helper."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import attrs
import pytest
from vmstate_descriptions import AllKinds, CtrlState, QueueState
from vmstate_descriptions_v1 import CtrlStateV1, QueueStateV1

from pcidev.vmstate import (
    U8,
    U16,
    U32,
    Array,
    Bytes,
    Str,
    VarArray,
    check_schema_compat,
    schema_of,
    vmfield,
    vmstate,
)
from pcidev.vmstate.testing import UPDATE_ENV, assert_schema_matches, schema_json

SCHEMAS = Path(__file__).resolve().parent / "schema"


@pytest.mark.parametrize("cls, filename", [
    (CtrlState, "test-ctrl.json"),
    (QueueState, "test-queue.json"),
    (AllKinds, "test-allkinds.json"),
])
def test_committed_schema_snapshots(cls, filename):
    assert_schema_matches(cls, SCHEMAS / filename)


def test_schema_shape():
    s = schema_of(QueueState)
    assert s["schema_format"] == 1
    assert (s["name"], s["version"], s["min_version"], s["upgrades"]) == ("test/queue", 2, 1, [1])
    fields = {f["name"]: f for f in s["fields"]}
    assert fields["prio"] == {"name": "prio", "since": 2, "has_default": True, "type": {"kind": "uint", "bits": 8}}
    assert fields["pending"]["type"] == {"kind": "array", "max_length": None,
                                         "element": {"kind": "uint", "bits": 16}}
    c = schema_of(CtrlState)
    queues = next(f for f in c["fields"] if f["name"] == "queues")["type"]
    assert queues["length"] == 8 and queues["element"]["kind"] == "optional"
    assert queues["element"]["value"]["description"]["name"] == "test/queue"
    assert [(sub["field"], sub["description"]["name"]) for sub in c["subsections"]] == [("irq", "test/ctrl/irq")]
    json.dumps(schema_of(AllKinds))  # JSON-serializable


def test_released_history_is_compatible():
    # test/queue 1 -> 2 with an upgrade step, test/ctrl gained a subsection
    assert check_schema_compat(schema_of(QueueStateV1), schema_of(QueueState)) == []
    assert check_schema_compat(schema_of(CtrlStateV1), schema_of(CtrlState)) == []
    # and not the other way round
    assert check_schema_compat(schema_of(CtrlState), schema_of(CtrlStateV1))


# ---------------------------------------------------------- checker, rule by rule
@vmstate("chk/item")
@attrs.frozen
class ItemA:
    x: U8 = 0


@vmstate("chk/item")
@attrs.frozen
class ItemChangedNoBump:
    x: U16 = 0


@vmstate("chk/item", version=2, min_version=1, upgrades={1: lambda f: f})
@attrs.frozen
class ItemChangedBumped:
    x: U16 = 0


@vmstate("chk/sub")
@attrs.frozen
class Sub:
    y: U8 = 0


@vmstate("chk/base")
@attrs.frozen
class Base:
    a: U8 = 0
    b: Bytes[4] = bytes(4)
    items: VarArray[ItemA, 4] = ()


def _variant(**kw):
    """Build a ``chk/base`` variant from annotations and defaults given as keywords."""
    version = kw.pop("_version", 1)
    min_version = kw.pop("_min", 1)
    upgrades = kw.pop("_upgrades", None)
    name = kw.pop("_name", "chk/base")
    ns = {"__annotations__": {k: v[0] for k, v in kw.items()}, **{k: v[1] for k, v in kw.items()}}
    cls = type("Variant", (), ns)
    return vmstate(name, version=version, min_version=min_version, upgrades=upgrades)(attrs.frozen(cls))


BASE_FIELDS = {"a": (U8, 0), "b": (Bytes[4], bytes(4)), "items": (VarArray[ItemA, 4], ())}
UP = {"_version": 2, "_upgrades": {1: lambda f: f}}


def problems(**changes):
    fields = {**BASE_FIELDS, **{k: v for k, v in changes.items() if not k.startswith("_")}}
    for k in [k for k, v in changes.items() if v is None]:
        del fields[k]
    meta = {k: v for k, v in changes.items() if k.startswith("_")}
    return check_schema_compat(schema_of(Base), schema_of(_variant(**fields, **meta)))


def test_identical_schema_has_no_problems():
    assert problems() == []


def test_change_without_version_bump_is_refused():
    assert problems(c=(U8, 0)) == ["chk/base: field 'c' added without a version bump"]
    assert problems(b=None) == ["chk/base: field 'b' removed without a version bump"]
    assert problems(a=(U16, 0)) == ["chk/base.a: type changed without a version bump (u8 -> u16)"]
    assert problems(b=(Bytes[8], bytes(8))) == [
        "chk/base.b: type changed without a version bump (bytes[4] -> bytes[8])"]


def test_new_subsection_needs_no_bump():
    assert problems(extra=(Optional[Sub], None)) == []


def test_changes_with_a_version_bump():
    # added field: since above the old version, with a default
    assert problems(c=(U8, vmfield(default=0, since=2)), **UP) == []
    assert problems(c=(U8, 0), _version=2) == [
        "chk/base: field 'c' added with since=1, but version 1 streams do not have it "
        "(use since=2 or later, or an upgrade step)"]
    assert problems(c=(U8, 0), **UP) == []  # the step supplies it
    # removed field: needs the upgrade step that drops it
    assert problems(b=None, **UP) == []
    assert problems(b=None, _version=2) == [
        "chk/base: field 'b' removed in version 2, but no upgrade step removes it from version 1 streams"]
    # widening is fine without a step, narrowing is not
    assert problems(a=(U32, 0), _version=2) == []
    assert problems(a=(Optional[U8], None), _version=2) == []
    assert problems(b=(Bytes[2], bytes(2)), _version=2) == [
        "chk/base.b: type changed incompatibly (bytes[4] -> bytes[2]) with no upgrade step from version 1"]
    assert problems(b=(Bytes[2], bytes(2)), **UP) == []
    assert problems(a=(Str[4], ""), _version=2) == [
        "chk/base.a: type changed incompatibly (u8 -> str[<=4]) with no upgrade step from version 1"]


def test_version_and_name_rules():
    assert problems(_name="chk/renamed") == [
        "chk/renamed: description renamed from 'chk/base' to 'chk/renamed' "
        "(sections and subsections are matched by name)"]
    assert problems(_version=2, _min=2) == [
        "chk/base: min_version rose from 1 to 2: streams of versions 1..1 no longer load"]
    old = schema_of(_variant(**BASE_FIELDS, **UP))
    assert check_schema_compat(old, schema_of(Base)) == ["chk/base: version went down from 2 to 1"]
    no_step = schema_of(_variant(**BASE_FIELDS, _version=2))
    assert check_schema_compat(old, no_step) == ["chk/base: upgrade step 1->2 removed"]


def test_removed_subsection_is_refused():
    with_sub = schema_of(_variant(**BASE_FIELDS, extra=(Optional[Sub], None)))
    assert check_schema_compat(with_sub, schema_of(Base)) == [
        "chk/base: subsection 'chk/sub' removed: streams that carry it would be refused"]


def test_nested_descriptions_are_checked_on_their_own_versions():
    changed = problems(items=(VarArray[ItemChangedNoBump, 4], ()))
    assert changed == ["chk/base.items[].x: type changed without a version bump (u8 -> u16)"]
    # bumping the nested description is enough; the parent keeps its version
    assert problems(items=(VarArray[ItemChangedBumped, 4], ())) == []
    # growing the array bound is a widening, but still needs the parent's bump
    assert problems(items=(VarArray[ItemA, 8], ())) == [
        "chk/base.items: type changed without a version bump "
        "(array[<=4] of struct 'chk/item' -> array[<=8] of struct 'chk/item')"]
    assert problems(items=(VarArray[ItemA, 8], ()), _version=2) == []
    assert problems(items=(VarArray[Optional[ItemA], 4], ()), _version=2) == []
    # a variable array cannot become a fixed one without a step
    assert problems(items=(Array[Optional[ItemA], 4], (None,) * 4), _version=2) == [
        "chk/base.items: type changed incompatibly (array[<=4] of struct 'chk/item' -> "
        "array[4] of optional struct 'chk/item') with no upgrade step from version 1"]


def test_malformed_schema_is_reported_not_raised():
    assert check_schema_compat({}, schema_of(Base))[-1].startswith("malformed schema: KeyError")
    assert check_schema_compat(schema_of(Base), {"schema_format": 1, "name": "chk/base"})[-1].startswith(
        "malformed schema")


# ------------------------------------------------------ assert_schema_matches
def test_assert_schema_matches_workflow(tmp_path, monkeypatch):
    path = tmp_path / "nested" / "chk-base.json"
    monkeypatch.delenv(UPDATE_ENV, raising=False)
    with pytest.raises(AssertionError, match="no committed schema"):
        assert_schema_matches(Base, path)
    monkeypatch.setenv(UPDATE_ENV, "1")
    assert_schema_matches(Base, path)  # creates it
    assert path.read_text() == schema_json(Base)
    monkeypatch.delenv(UPDATE_ENV)
    assert_schema_matches(Base, path)

    incompatible = _variant(**{**BASE_FIELDS, "a": (U16, 0)})
    with pytest.raises(AssertionError, match=r"(?s)changed incompatibly.*type changed without a version bump"):
        assert_schema_matches(incompatible, path)
    monkeypatch.setenv(UPDATE_ENV, "1")
    with pytest.raises(AssertionError, match="changed incompatibly"):
        assert_schema_matches(incompatible, path)  # update=1 never accepts a break
    assert path.read_text() == schema_json(Base)

    compatible = _variant(**{**BASE_FIELDS, "c": (U8, vmfield(default=0, since=2))}, **UP)
    monkeypatch.delenv(UPDATE_ENV)
    with pytest.raises(AssertionError, match="(?s)changed compatibly \\(version 1 -> 2\\).*golden stream"):
        assert_schema_matches(compatible, path)
    monkeypatch.setenv(UPDATE_ENV, "1")
    assert_schema_matches(compatible, path)
    assert json.loads(path.read_text())["version"] == 2

    monkeypatch.setenv(UPDATE_ENV, "force")
    assert_schema_matches(Base, path)  # a deliberate break
    assert json.loads(path.read_text())["version"] == 1
