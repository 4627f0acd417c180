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
    join_properties,
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


@attrs.define(kw_only=True)
class Keyed:
    """Fields whose keys are not their attribute names (as NVMe's ``ns``)."""

    namespaces: list = attrs.field(factory=list, metadata={"key": "ns", "aliases": ("namespace",)})
    block_count: int = attrs.field(default=0, metadata={"key": "blocks"})
    capacity: Size = attrs.field(default=0)


@pytest.mark.parametrize(("text", "value"), [
    ("64 M", 64 * MiB), ("64 MiB", 64 * MiB), (" 64 M ", 64 * MiB), ("0x40 M", 64 * MiB), ("64\tG", 64 << 30),
    ("64 B", 64), ("1B", 1), ("1b", 1), ("0b1", 1), ("0B11", 3), ("0", 0), ("00", 0),
])
def test_size_spaces_before_the_suffix_and_byte_suffixes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["0b", "0B", " 0b ", "0 b", "+0b", "0ib", "64 iB", "1 G B", "0b1b", "0o7B"])
def test_size_never_reads_a_bare_0b_as_zero_bytes(text):
    with pytest.raises(PropertyError, match="byte count"):
        parse_size(text, "capacity")


@pytest.mark.parametrize(("text", "value"), [("64 M", 64 * MiB), ("2 k", 2048), ("-5 k", -5120), ("0b 1", None)])
def test_int_accepts_a_space_before_its_suffix(text, value):
    if value is None:
        with pytest.raises(PropertyError):
            parse_int(text)
    else:
        assert parse_int(text) == value


@pytest.mark.parametrize("text", ["1B", "0b", "0B", "1MiB", "64MB", "64 mb", "4096b", "1 B"])
def test_int_takes_no_byte_suffix(text):
    with pytest.raises(PropertyError, match="expected an integer"):
        parse_int(text, "mdts")


def test_byte_suffixes_through_a_config():
    assert structure_config(Keyed, "capacity=64 M,blocks=2 k") == Keyed(capacity=64 * MiB, block_count=2048)
    for bad in ("blocks=1B", "blocks=0b", "capacity=0b"):
        with pytest.raises(PropertyError):
            structure_config(Keyed, bad)


@pytest.mark.parametrize("props", [
    {"namespaces": ["a"], "ns": "b"}, {"ns": "a", "namespace": "b"}, {"blocks": 1, "block_count": 2},
    {"items": ["x"], "item": "y"},
])
def test_a_mapping_with_two_spellings_of_one_property_is_an_error(props):
    cls = Sample if "items" in props else Keyed
    with pytest.raises(PropertyError, match="given twice") as info:
        structure_config(cls, props, what="keyed")
    assert str(info.value).startswith("keyed: ")


def test_a_mapping_may_use_any_one_spelling():
    expected = Keyed(namespaces=["a"], block_count=3)
    spellings = ({"namespaces": ["a"], "blocks": 3}, {"ns": "a", "block_count": 3}, {"namespace": ["a"], "blocks": "3"})
    for props in spellings:
        assert structure_config(Keyed, props) == expected


def test_unknown_property_lists_the_keys_users_type():
    with pytest.raises(PropertyError) as info:
        structure_config(Keyed, "bogus=1")
    assert "(known: ns, namespace, blocks, capacity)" in str(info.value)
    assert "namespaces" not in str(info.value) and "block_count" not in str(info.value)


@pytest.mark.parametrize("text", ["=5", "count=1,=5", " =5", "count=1, = x"])
def test_an_empty_key_is_named_as_such(text):
    with pytest.raises(PropertyError, match="has an empty key") as info:
        structure_config(Sample, text, what="sample")
    assert "no '=value'" not in str(info.value)
    with pytest.raises(PropertyError, match="empty key"):
        split_properties(text)


def test_a_missing_property_is_named_by_its_key():
    @attrs.define(kw_only=True)
    class NeedsKeyed:
        image_path: str = attrs.field(metadata={"key": "path"})

    with pytest.raises(PropertyError, match=r"missing property path=\.\.\."):
        structure_config(NeedsKeyed, "")


_PIECES = st.sampled_from([*"ns=,blockcapity0x1bBkMiG _-:", "namespace", "capacity", "blocks", "ns=", ",,"])


@given(st.one_of(st.text(max_size=60), st.lists(_PIECES, max_size=16).map("".join)))
def test_any_string_is_a_keyed_config_or_exactly_one_typed_error(text):
    try:
        cfg = structure_config(Keyed, text)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(cfg, Keyed)


@given(st.dictionaries(st.sampled_from(["ns", "namespace", "namespaces", "blocks", "block_count", "capacity", "x"]),
                       st.one_of(st.text(max_size=12), st.integers(), st.lists(st.text(max_size=5), max_size=3)),
                       max_size=5))
def test_any_mapping_is_a_config_or_exactly_one_typed_error(props):
    try:
        cfg = structure_config(Keyed, props)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(cfg, Keyed)


@given(st.lists(st.tuples(st.from_regex(r"[ab]([ab ]{0,2}[ab])?", fullmatch=True),
                          st.text(alphabet="ab,=", max_size=6)), max_size=5))
def test_join_properties_is_the_inverse_of_split_properties(pairs):
    assert split_properties(join_properties(pairs)) == pairs


def test_join_properties_doubles_commas_and_writes_bare_items():
    assert join_properties([("a", "x,y"), ("", "flag"), ("b", "")]) == "a=x,,y,flag,b="
