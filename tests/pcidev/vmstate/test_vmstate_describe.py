"""Inconsistent descriptions are programming errors: ConfigError, early."""

from __future__ import annotations

from typing import Annotated, Optional, Union

import attrs
import pytest

from pcidev.errors import ConfigError
from pcidev.vmstate import (
    U8,
    U16,
    Array,
    Bytes,
    Str,
    VarArray,
    description_of,
    encode_state,
    fields_of,
    is_vmstate,
    vmfield,
    vmstate,
)
from pcidev.vmstate.types import Length, UInt


@vmstate("desc/leaf")
@attrs.frozen
class Leaf:
    v: U8 = 0


def test_metadata_is_recorded():
    d = description_of(Leaf)
    assert (d.name, d.version, d.min_version, dict(d.upgrades), d.cls) == ("desc/leaf", 1, 1, {}, Leaf)
    assert is_vmstate(Leaf) and not is_vmstate(Leaf(1)) and not is_vmstate(int)
    assert [f.name for f in fields_of(Leaf)] == ["v"]

    class NotState(Leaf):
        pass

    assert not is_vmstate(NotState)
    with pytest.raises(ConfigError, match="is not a @vmstate class"):
        description_of(NotState)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": ""}, "vmstate name must match"),
    ({"name": "has space"}, "vmstate name must match"),
    ({"name": "x" * 256}, "vmstate name must match"),
    ({"version": 0}, "version must be an int in 1..2\\*\\*32-1"),
    ({"version": True}, "version must be an int"),
    ({"version": 2, "min_version": 3}, "min_version must be an int in 1..version"),
    ({"version": 2, "min_version": 0}, "min_version must be an int in 1..version"),
    ({"version": 2, "min_version": 1, "upgrades": {2: lambda f: f}}, "upgrade step keys must be versions in 1..1"),
    ({"version": 3, "min_version": 2, "upgrades": {1: lambda f: f}}, "upgrade step keys"),
    ({"version": 2, "min_version": 1, "upgrades": {1: "no"}}, "upgrade step 1 is not callable"),
])
def test_bad_decorator_arguments(kwargs, message):
    args = {"name": "desc/x", **kwargs}
    with pytest.raises(ConfigError, match=message):
        vmstate(args.pop("name"), **args)


def test_needs_a_frozen_attrs_class():
    class Plain:
        v: U8 = 0

    with pytest.raises(ConfigError, match="needs an attrs class"):
        vmstate("desc/plain")(Plain)

    @attrs.define
    class Mutable:
        v: U8 = 0

    with pytest.raises(ConfigError, match="must be frozen"):
        vmstate("desc/mutable")(Mutable)


def _bad(annotation, default=attrs.NOTHING, *, version=1, min_version=None, upgrades=None, field=None):
    ns = {"__annotations__": {"f": annotation}}
    if field is not None:
        ns["f"] = field
    elif default is not attrs.NOTHING:
        ns["f"] = default
    cls = attrs.frozen(type("Bad", (), ns))
    return vmstate("desc/bad", version=version, min_version=min_version, upgrades=upgrades)(cls)


@pytest.mark.parametrize("annotation, message", [
    (int, "plain int has no width"),
    (float, "unsupported field type"),
    (list[U8], "unsupported field type"),
    (dict, "unsupported field type"),
    (tuple[U8, U8], "arrays are tuple\\[T, ...\\]"),
    (Union[U8, U16], "only Optional\\[T\\] unions"),
    (Optional[Union[U8, U16]], "only Optional\\[T\\] unions"),
    (Annotated[str, Length(4)], "text has no fixed length"),
    (Annotated[int, UInt(12)], "integer markers need int and 8/16/32/64 bits"),
    (Annotated[bytes, UInt(8)], "integer markers need int"),
    (Annotated[int, UInt(8), UInt(16)], "conflicting vmstate markers"),
    (Annotated[float, Length(4)], "does not apply to"),
])
def test_unsupported_annotations(annotation, message):
    with pytest.raises(ConfigError, match=message):
        _bad(annotation)


def test_non_vmstate_attrs_class_as_field():
    @attrs.frozen
    class Inner:
        v: U8 = 0

    with pytest.raises(ConfigError, match="Inner is an attrs class but not a @vmstate description"):
        _bad(Inner)


def test_str_marker_is_accepted():
    assert encode_state(_bad(Str[4], default="ab")())[1] == {"f": "ab"}


def test_length_arguments_are_checked():
    for make in (lambda: Bytes[-1], lambda: Str["x"], lambda: Array[U8, 1 << 32], lambda: VarArray[U8]):
        with pytest.raises(ConfigError):
            make()


def test_field_rules():
    with pytest.raises(ConfigError, match="since must be an int in 1..1"):
        _bad(U8, field=vmfield(default=0, since=2))
    with pytest.raises(ConfigError, match="added in version 2 with no default and no upgrade step"):
        _bad(U8, field=vmfield(since=2), version=2, min_version=1)
    # a step at or after since-1 may supply it
    _bad(U8, field=vmfield(since=2), version=2, min_version=1, upgrades={1: lambda f: {**f, "f": 0}})
    # since <= min_version: always present, no default needed
    _bad(U8, field=vmfield(since=2), version=3, min_version=2)
    with pytest.raises(ConfigError, match="init=False fields cannot be restored"):
        _bad(U8, field=attrs.field(default=0, init=False))
    with pytest.raises(ConfigError, match="Factory\\(takes_self=True\\) is not supported"):
        fields_of(_bad(U8, field=attrs.field(default=attrs.Factory(lambda s: 0, takes_self=True))))[0].default_value()


def test_subsection_rules():
    with pytest.raises(ConfigError, match="must default to None"):
        _bad(Optional[Leaf], default=Leaf())
    with pytest.raises(ConfigError, match="subsections are versioned by their own description"):
        _bad(Optional[Leaf], field=vmfield(default=None, since=2), version=2, min_version=2)

    with pytest.raises(ConfigError, match="subsection 'desc/leaf' already used by field 'a'"):
        @vmstate("desc/twice")
        @attrs.frozen
        class Twice:
            a: Optional[Leaf] = None
            b: Optional[Leaf] = None


def test_dunder_field_names_are_refused():
    with pytest.raises(ConfigError, match="must not start with '__'"):
        _bad_cls = attrs.frozen(type("Dunder", (), {"__annotations__": {"__v": U8}, "__v": 0}))
        vmstate("desc/dunder")(_bad_cls)


def test_optional_of_optional_and_nested_optional_arrays():
    # Optional[Optional[T]] collapses to Optional[T] in typing: fine
    cls = _bad(Optional[Optional[U8]], default=None)
    assert encode_state(cls(f=None))[1] == {"f": None}
    cls = _bad(Array[Optional[Array[U8, 2]], 2], default=(None, (1, 2)))
    assert encode_state(cls())[1] == {"f": [None, [1, 2]]}

