"""pcidev.properties: the one property grammar (splitting, value forms, typed errors)."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcidev.errors import ConfigError
from pcidev.properties import (
    PropertyError,
    Size,
    describe_config,
    parse_bool,
    parse_int,
    parse_size,
    split_properties,
    structure_config,
)

MiB = 1 << 20


@attrs.define(kw_only=True)
class Sample:
    count: int = attrs.field(default=1, metadata={"help": "how many"})
    size: Size = attrs.field(default=4096, metadata={"help": "bytes"})
    flag: bool = attrs.field(default=False, metadata={"help": "a switch"})
    ratio: float = 0.5
    label: str | None = None
    items: list = attrs.field(factory=list, metadata={"aliases": ("item",)})


@attrs.define(kw_only=True)
class Needs:
    path: str


def test_split_properties():
    assert split_properties("a=1,b=x,,y,c") == [("a", "1"), ("b", "x,y"), ("", "c")]
    assert split_properties(" k =v=w,,") == [("k", "v=w,")]
    assert split_properties("") == []
    with pytest.raises(PropertyError):
        split_properties(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "value"), [
    ("4096", 4096), ("64M", 64 * MiB), ("1G", 1 << 30), ("2GiB", 2 << 30), ("8k", 8192),
    ("8K", 8192), ("64MB", 64 * MiB), ("64mib", 64 * MiB), ("0x100000", MiB), ("0x10k", 16 << 10),
    ("1T", 1 << 40), ("1P", 1 << 50), ("4096B", 4096), ("010", 10), ("1_024", 1024), (512, 512),
])
def test_size_forms(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "1.5G", "-1", "10Q", "0x", "1 G B", True, None, 1.0, "9" * 5000])
def test_size_rejects(text):
    with pytest.raises(PropertyError, match="byte count"):
        parse_size(text, "size")


def test_int_and_bool_forms():
    assert parse_int("0x1B36") == 0x1B36 and parse_int("-5") == -5 and parse_int("2k") == 2048
    assert parse_int("0b101") == 5 and parse_int("0o17") == 15
    for word in ("on", "ON", "true", "yes", "y", "1", True, 1):
        assert parse_bool(word) is True
    for word in ("off", "false", "No", "n", "0", False, 0):
        assert parse_bool(word) is False
    with pytest.raises(PropertyError, match="on/off"):
        parse_bool("perhaps", "flag")
    with pytest.raises(PropertyError):
        parse_int(True)


def test_structure_config():
    cfg = structure_config(Sample, "count=0x10,size=64MiB,flag=on,ratio=1e-3,label=a,,b,item=x,items=y")
    assert cfg == Sample(count=16, size=64 * MiB, flag=True, ratio=0.001, label="a,b", items=["x", "y"])
    assert structure_config(Sample, {"count": 3, "items": "one"}) == Sample(count=3, items=["one"])
    assert structure_config(Sample, None) == Sample()
    assert structure_config(Sample, cfg) is cfg


@pytest.mark.parametrize(("props", "match"), [
    ("bogus=1", "unknown property bogus"),
    ("count=x", r"property 'count': 'x' is not valid \(expected an integer"),
    ("size=-1", "property 'size'.*byte count"),
    ("flag=perhaps", "property 'flag'.*on/off"),
    ("count=1,count=2", "'count' given twice"),
    ("count", "no '=value'"),
    ({"label": 5}, "property 'label'.*string"),
])
def test_errors_name_the_property_and_the_accepted_forms(props, match):
    with pytest.raises(PropertyError, match=match) as info:
        structure_config(Sample, props, what="sample")
    assert str(info.value).startswith("sample: ")


def test_missing_required_property():
    with pytest.raises(PropertyError, match="missing property path"):
        structure_config(Needs, "")


def test_describe_config():
    rows = {p.name: p for p in describe_config(Sample)}
    assert rows["size"].type == "size" and rows["size"].default == "4k" and rows["size"].help == "bytes"
    assert rows["flag"].default == "off" and rows["label"].type == "str (optional)"
    assert rows["items"].aliases == ("item",) and rows["items"].name == "items"


@given(st.text(max_size=60))
def test_any_string_is_a_config_or_one_typed_error(text):
    try:
        structure_config(Sample, text)
    except ConfigError:
        pass


@given(st.lists(st.tuples(st.sampled_from(["count", "size", "flag", "ratio", "label", "items", "x"]),
                          st.text(max_size=12)), max_size=6))
def test_any_pairs_are_a_config_or_one_typed_error(pairs):
    text = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in pairs)
    try:
        structure_config(Sample, text)
    except ConfigError:
        pass


@given(st.one_of(st.text(max_size=20), st.integers(), st.booleans(), st.none(), st.floats()))
def test_value_parsers_raise_only_property_errors(value):
    for parse in (parse_int, parse_size, parse_bool):
        try:
            parse(value)
        except PropertyError:
            pass
