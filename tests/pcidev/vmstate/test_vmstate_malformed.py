"""Every malformed input is refused with a typed error naming section and field."""

from __future__ import annotations

import copy
import struct
from typing import Any

import msgpack
import pytest
from vmstate_descriptions import DEVICE_TYPE, FINGERPRINT, AllKinds, CtrlState, IrqState, Item, QueueState
from vmstate_golden import SAMPLE_V2

from pcidev.errors import PcidevError, VMStateError
from pcidev.vmstate import (
    FORMAT_VERSION,
    MAGIC,
    ChecksumError,
    ConfigMismatchError,
    FdRef,
    StateError,
    StreamError,
    VersionError,
    dump_stream_json,
    load,
    peek_header,
    save,
)
from pcidev.vmstate.stream import PREFIX_SIZE, seal

DESCRIPTIONS = [CtrlState, AllKinds]


def good() -> bytes:
    return save(DEVICE_TYPE, FINGERPRINT, [("test/ctrl", 0, SAMPLE_V2), ("test/allkinds", 1, AllKinds())])


def body(data: bytes) -> Any:
    return msgpack.unpackb(data[PREFIX_SIZE:-4])


def reseal(obj: Any) -> bytes:
    return seal(msgpack.packb(obj, use_bin_type=True))


def do_load(data: Any, **kw: Any) -> Any:
    args = {"device_type": DEVICE_TYPE, "fingerprint": FINGERPRINT, "descriptions": DESCRIPTIONS}
    args.update(kw)
    return load(data, **args)


def edit(fn) -> bytes:
    """A correctly sealed copy of the good stream with ``fn`` applied to its body."""
    b = copy.deepcopy(body(good()))
    fn(b)
    return reseal(b)


def ctrl(b: Any) -> dict:
    """The field map of the test/ctrl section of a decoded body."""
    return b["sections"][0][2][1]


def allkinds(b: Any) -> dict:
    return b["sections"][1][2][1]


def test_error_hierarchy():
    for cls in (StreamError, ChecksumError, ConfigMismatchError, VersionError, StateError):
        assert issubclass(cls, VMStateError) and issubclass(cls, PcidevError)
    assert issubclass(ChecksumError, StreamError)


# ----------------------------------------------------------------------- envelope
def test_every_truncation_is_refused():
    data = good()
    for n in range(len(data)):
        with pytest.raises(StreamError):
            do_load(data[:n])


def test_truncation_messages():
    data = good()
    with pytest.raises(StreamError, match=r"truncated: 10 bytes, a stream has at least 20"):
        do_load(data[:10])
    with pytest.raises(StreamError, match=rf"truncated: the prefix announces {len(data)} bytes, got 100"):
        do_load(data[:100])


def test_wrong_magic():
    data = good()
    with pytest.raises(StreamError, match="bad magic b'QEVM"):
        do_load(b"QEVM" + data[4:])
    with pytest.raises(StreamError, match="bad magic"):
        do_load(b"\x00" * 8)
    with pytest.raises(StreamError, match="expected bytes, got str"):
        do_load("PCIDEVVM")


def test_format_version_too_new_and_too_old():
    inner = good()[PREFIX_SIZE:-4]
    with pytest.raises(StreamError, match=f"format version {FORMAT_VERSION + 1} is too new"):
        do_load(seal(inner, format_version=FORMAT_VERSION + 1))
    with pytest.raises(StreamError, match="format version 0 is too old"):
        do_load(seal(inner, format_version=0))
    with pytest.raises(StreamError, match="unknown flags 0x0001"):
        do_load(seal(inner, flags=1))


def test_trailing_bytes():
    with pytest.raises(StreamError, match="3 trailing bytes after the checksum"):
        do_load(good() + b"xyz")


def test_corruption_is_caught_by_the_checksum():
    data = bytearray(good())
    for pos in (PREFIX_SIZE, len(data) // 2, len(data) - 5, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with pytest.raises(ChecksumError, match="checksum mismatch: stored 0x"):
            do_load(bytes(bad))


def test_body_that_is_not_msgpack():
    with pytest.raises(StreamError, match="body is not valid msgpack"):
        do_load(seal(b"\xc1"))  # never-used msgpack byte
    with pytest.raises(StreamError, match="body is not valid msgpack"):
        do_load(seal(b"\x92\x01"))  # truncated array
    with pytest.raises(StreamError, match="body is not valid msgpack"):
        do_load(seal(msgpack.packb(1) + b"\x01"))  # extra data


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.clear(), "missing key"),
    (lambda b: b.update(extra=1), "unknown key\\(s\\) 'extra'"),
    (lambda b: b.update(device_type=7), "device_type must be a non-empty str"),
    (lambda b: b.update(device_type=""), "device_type must be a non-empty str"),
    (lambda b: b.update(fingerprint=[1]), "fingerprint must be a map"),
    (lambda b: b.update(sections={}), "sections must be an array"),
    (lambda b: b["sections"].append([1, 2]), "section #2 must be \\[name, instance_id, state\\]"),
    (lambda b: b["sections"].append([b"n", 0, []]), "section #2 name must be a non-empty str"),
    (lambda b: b["sections"][0].__setitem__(1, -1), "instance id must be an int in 0..2\\*\\*32-1"),
    (lambda b: b["sections"][0].__setitem__(1, 1 << 32), "instance id must be an int"),
    (lambda b: b["sections"][0].__setitem__(1, True), "instance id must be an int"),
])
def test_malformed_header(mutate, message):
    with pytest.raises(StreamError, match=message):
        do_load(edit(mutate))


def test_body_not_a_map():
    with pytest.raises(StreamError, match="body must be a map, got array"):
        do_load(reseal([1, 2, 3]))


# ---------------------------------------------------------------- configuration
def test_device_type_mismatch():
    with pytest.raises(ConfigMismatchError, match="stream is for device type 'test-dev', this device is 'other'"):
        do_load(good(), device_type="other")


def test_fingerprint_mismatch_names_every_differing_item():
    fp = {"max_queues": 16, "namespace_sizes": [1 << 20], "bar0_size": 0x4000, "msix": 8}
    with pytest.raises(ConfigMismatchError) as ei:
        do_load(good(), fingerprint=fp)
    err = ei.value
    assert err.differences == [
        "max_queues: stream has 8, this device has 16",
        "msix: stream does not set it, this device has 8",
        "namespace_sizes: stream has [1048576, 1073741824], this device has [1048576]",
    ]
    for d in err.differences:
        assert d in str(err)


def test_fingerprint_comparison_is_type_strict():
    data = save(DEVICE_TYPE, {"flag": True, "n": 1}, [])
    with pytest.raises(ConfigMismatchError, match="flag: stream has True, this device has 1"):
        do_load(data, fingerprint={"flag": 1, "n": 1})
    assert do_load(data, fingerprint={"flag": True, "n": 1}) == []
    # tuples and lists are the same on the wire
    data = save(DEVICE_TYPE, {"bars": (1, 2)}, [])
    assert do_load(data, fingerprint={"bars": [1, 2]}) == []


def test_fingerprint_item_missing_from_this_device():
    with pytest.raises(ConfigMismatchError, match="bar0_size: stream has 16384, this device does not set it"):
        do_load(good(), fingerprint={"max_queues": 8, "namespace_sizes": [1 << 20, 1 << 30]})


# --------------------------------------------------------------------- sections
def test_unknown_section():
    with pytest.raises(StateError) as ei:
        do_load(good(), descriptions=[CtrlState])
    assert ei.value.section == "test/allkinds" and ei.value.instance_id == 1
    assert "unknown section" in str(ei.value)


def test_duplicate_section():
    with pytest.raises(StateError, match="section 'test/ctrl' instance 0: duplicate section"):
        do_load(edit(lambda b: b["sections"].append(copy.deepcopy(b["sections"][0]))))


def test_expected_sections():
    with pytest.raises(StateError, match="missing section\\(s\\) 'test/ctrl' instance 7"):
        do_load(good(), expected=[("test/ctrl", 0), ("test/ctrl", 7), ("test/allkinds", 1)])
    with pytest.raises(StateError, match="unexpected section\\(s\\) 'test/allkinds' instance 1"):
        do_load(good(), expected=[("test/ctrl", 0)])


def test_nothing_half_loads():
    # first section valid, second broken: no partial result, just the error
    data = edit(lambda b: allkinds(b).__setitem__("u8", 256))
    with pytest.raises(StateError) as ei:
        do_load(data)
    assert (ei.value.section, ei.value.instance_id, ei.value.path) == ("test/allkinds", 1, "u8")


# ------------------------------------------------------------ versions & markers
def test_description_version_too_new_names_section_and_path():
    data = edit(lambda b: ctrl(b)["queues"][0].__setitem__(0, 3))
    with pytest.raises(VersionError) as ei:
        do_load(data)
    assert (ei.value.section, ei.value.path) == ("test/ctrl", "queues[0]")
    assert "'test/queue': incoming version 3 is too new for local version 2" in str(ei.value)


def test_description_version_too_old():
    data = edit(lambda b: b["sections"][0][2].__setitem__(0, 0))
    with pytest.raises(VersionError,
                       match="section 'test/ctrl' instance 0: 'test/ctrl': incoming version 0 is too old"):
        do_load(data)


@pytest.mark.parametrize("marker", [0, 1, 0x30, 0x31, True, False, "present", b"\x01", [], [2], {}, 1.5])
def test_bad_presence_marker(marker):
    data = edit(lambda b: ctrl(b)["queues"].__setitem__(3, marker))
    with pytest.raises(StateError) as ei:
        do_load(data)
    assert (ei.value.section, ei.value.path) == ("test/ctrl", "queues[3]")
    assert "structure 'test/queue'" in ei.value.reason


def test_pointer_array_length_is_checked():
    with pytest.raises(StateError, match="field 'queues': 9 elements, expected exactly 8"):
        do_load(edit(lambda b: ctrl(b)["queues"].append(None)))
    with pytest.raises(StateError, match="field 'ptrs_var': 11 elements, expected at most 10"):
        do_load(edit(lambda b: allkinds(b).__setitem__("ptrs_var", [None] * 11)))


def test_unknown_and_malformed_subsections():
    with pytest.raises(StateError, match="unknown subsection 'test/ctrl/bogus' in 'test/ctrl'"):
        do_load(edit(lambda b: b["sections"][0][2][2].__setitem__("test/ctrl/bogus", [1, {}])))
    with pytest.raises(StateError) as ei:
        do_load(edit(lambda b: b["sections"][0][2][2]["test/ctrl/irq"][1].__setitem__("vector", -1)))
    assert ei.value.path == "irq.vector"
    with pytest.raises(StateError, match="expected a map of subsections of 'test/ctrl', got array"):
        do_load(edit(lambda b: b["sections"][0][2].__setitem__(2, [])))
    with pytest.raises(StateError, match="empty subsection map in 'test/ctrl'"):
        do_load(edit(lambda b: b["sections"][0][2].__setitem__(2, {})))
    # a subsection inside a subsection whose description has none
    extra = [1, {"note": "", "counters": []}, {"x": [1, {}]}]
    with pytest.raises(StateError) as ei:
        do_load(edit(lambda b: b["sections"][1][2].append({"test/allkinds/extra": extra})))
    assert ei.value.path == "extra"
    assert "unknown subsection 'x' in 'test/allkinds/extra'" in str(ei.value)


# ---------------------------------------------------------------- field content
FIELD_CASES = [
    ("u8", 256, "value 256 out of range for u8 (0..255)"),
    ("u8", -1, "value -1 out of range for u8"),
    ("u16", "1", "expected u16 (int), got str"),
    ("u64", True, "expected u64 (int), got bool"),
    ("u32", None, "expected u32 (int), got nil"),
    ("i8", 128, "value 128 out of range for i8 (-128..127)"),
    ("i8", -129, "out of range for i8"),
    ("i64", 1 << 63, "out of range for i64"),
    ("flag", 1, "expected bool, got int"),
    ("fixed", b"\x00" * 15, "15 bytes, expected exactly 16"),
    ("fixed", "x" * 16, "expected bytes, got str"),
    ("blob", b"\x00" * 33, "33 bytes, expected at most 32"),
    ("label", "x" * 13, "text of 13 UTF-8 bytes, expected at most 12"),
    ("label", "\u00e9" * 7, "text of 14 UTF-8 bytes"),
    ("label", b"abc", "expected str, got bytes"),
    ("fd", 3, "expected an fd reference (extension type 1), got int"),
    ("fd", msgpack.ExtType(2, b"\0\0\0\0"), "got extension type 2"),
    ("fd", msgpack.ExtType(1, b"\0\0"), "fd reference must carry 4 bytes, got 2"),
    ("maybe_u32", -5, "out of range for u32"),
    ("item", 5, "expected structure 'test/item'"),
    ("item", [1, {"tag": 1}], "missing field(s) 'data' for 'test/item' version 1"),
    ("item", [1, {"tag": 1, "data": b"", "zzz": 0}], "unknown field(s) 'zzz'"),
    ("item", [1, []], "expected a map of fields, got array"),
    ("item", [1, {"tag": 1, "data": b""}, {}, 4], "must be [version, fields(, subsections)], got an array of 4"),
    ("words", [1, 2], "2 elements, expected exactly 3"),
    ("words", {"a": 1}, "expected array, got map"),
    ("shorts", [0] * 6, "6 elements, expected at most 5"),
    ("grid", [[0, 0], [0, 256]], "value 256 out of range for u8"),
    ("items", [[1, {"tag": 1, "data": b""}], [1, {"tag": -1, "data": b""}]], "out of range for u32"),
]


@pytest.mark.parametrize("field, value, message", FIELD_CASES)
def test_wrong_type_or_range_names_the_field(field, value, message):
    data = edit(lambda b: allkinds(b).__setitem__(field, value))
    with pytest.raises(StateError) as ei:
        do_load(data)
    err = ei.value
    assert err.section == "test/allkinds" and err.instance_id == 1
    assert err.path.split("[")[0].split(".")[0] == field
    assert message in err.reason
    assert f"section 'test/allkinds' instance 1, field '{err.path}'" in str(err)


def test_nested_paths():
    cases = [
        (lambda b: allkinds(b).__setitem__("grid", [[0, 0], [0, 256]]), "grid[1][1]"),
        (lambda b: allkinds(b).__setitem__("items", [[1, {"tag": 1, "data": b""}],
                                                     [1, {"tag": -1, "data": b""}]]), "items[1].tag"),
        (lambda b: allkinds(b).__setitem__("item", [1, {"tag": 1, "data": b"", "zzz": 0}]), "item.zzz"),
        (lambda b: ctrl(b)["queues"][0][1]["pending"].__setitem__(0, "x"), "queues[0].pending[0]"),
    ]
    for mutate, path in cases:
        with pytest.raises(StateError) as ei:
            do_load(edit(mutate))
        assert ei.value.path == path


def test_extra_and_missing_top_level_fields():
    with pytest.raises(StateError) as ei:
        do_load(edit(lambda b: ctrl(b).__setitem__("bogus", 1)))
    assert ei.value.path == "bogus" and "unknown field(s) 'bogus' for 'test/ctrl' version 1" in str(ei.value)
    with pytest.raises(StateError) as ei:
        do_load(edit(lambda b: ctrl(b).pop("serial")))
    assert ei.value.path == "serial" and "missing field(s) 'serial'" in str(ei.value)
    with pytest.raises(StateError, match="unknown field\\(s\\) b'raw'"):
        do_load(edit(lambda b: ctrl(b).__setitem__(b"raw", 1)))


def test_section_payload_not_a_structure():
    with pytest.raises(StateError, match="section 'test/ctrl' instance 0: expected structure 'test/ctrl'"):
        do_load(edit(lambda b: b["sections"][0].__setitem__(2, "hello")))


# ----------------------------------------------------------------------- save side
def test_save_refuses_bad_state_objects():
    cases = [
        (AllKinds(u8=256), "u8", "value 256 out of range for u8"),
        (AllKinds(u16=True), "u16", "expected u16 (int), got bool"),
        (AllKinds(u32=1.0), "u32", "expected u32 (int), got float"),
        (AllKinds(flag=1), "flag", "expected bool, got int"),
        (AllKinds(fixed=b"abc"), "fixed", "3 bytes, expected exactly 16"),
        (AllKinds(label="\udc80"), "label", "not encodable as UTF-8"),
        (AllKinds(fd=3), "fd", "expected FdRef, got int"),
        (AllKinds(item=QueueState(qid=1, size=1)), "item",
         "expected a Item state object ('test/item'), got QueueState"),
        (AllKinds(words=(1, 2)), "words", "2 elements, expected exactly 3"),
        (AllKinds(words="abc"), "words", "expected a tuple, got str"),
        (AllKinds(ptrs_var=(None, Item(tag=1 << 40))), "ptrs_var[1].tag", "out of range for u32"),
        (AllKinds(items=(Item(tag=1), Item(tag=2, data=b"x" * 9))), "items[1].data", "9 bytes, expected at most 8"),
        (AllKinds(extra=IrqState(vector=1)), "extra", "expected a Extra state object"),
    ]
    for state, path, message in cases:
        with pytest.raises(StateError) as ei:
            save(DEVICE_TYPE, FINGERPRINT, [("test/allkinds", 3, state)])
        assert (ei.value.section, ei.value.instance_id, ei.value.path) == ("test/allkinds", 3, path)
        assert message in ei.value.reason


def test_save_refuses_bad_section_lists_and_fingerprints():
    q = QueueState(qid=1, size=1)
    with pytest.raises(StateError, match="section name must be the description name 'test/queue'"):
        save(DEVICE_TYPE, {}, [("queue", 0, q)])
    with pytest.raises(StateError, match="duplicate section"):
        save(DEVICE_TYPE, {}, [("test/queue", 0, q), ("test/queue", 0, q)])
    with pytest.raises(StateError, match="instance id must be an int"):
        save(DEVICE_TYPE, {}, [("test/queue", -1, q)])
    with pytest.raises(StateError, match="expected a @vmstate state object, got dict"):
        save(DEVICE_TYPE, {}, [("test/queue", 0, {"qid": 1})])
    with pytest.raises(StateError, match="triples"):
        save(DEVICE_TYPE, {}, [("test/queue", q)])
    with pytest.raises(StateError, match="device type"):
        save("", {}, [])
    with pytest.raises(StateError, match="fingerprint item 'x': unsupported value type float"):
        save(DEVICE_TYPE, {"x": 1.5}, [])
    with pytest.raises(StateError, match="fingerprint keys must be str"):
        save(DEVICE_TYPE, {1: 1}, [])
    with pytest.raises(StateError, match="does not fit 64 bits"):
        save(DEVICE_TYPE, {"x": [1 << 64]}, [])
    with pytest.raises(StateError, match="fingerprint must be a mapping"):
        save(DEVICE_TYPE, [("x", 1)], [])


# ------------------------------------------------------------------------ tooling
def test_peek_header_and_dump_refuse_the_same_envelopes():
    data = good()
    for bad in (data[:30], b"X" + data[1:], data + b"\0", seal(b"\xc1")):
        with pytest.raises(StreamError):
            peek_header(bad)
        with pytest.raises(StreamError):
            dump_stream_json(bad)
    with pytest.raises(StateError, match="section 'test/ctrl' instance 0: section payload must be a structure"):
        peek_header(edit(lambda b: b["sections"][0].__setitem__(2, 5)))


def test_dump_reports_structural_problems_with_paths():
    with pytest.raises(StateError) as ei:
        dump_stream_json(edit(lambda b: ctrl(b)["queues"][1][1].__setitem__("qid", 1.5)))
    assert (ei.value.section, ei.value.path) == ("test/ctrl", "queues[1].qid")
    with pytest.raises(StateError, match="unknown msgpack extension type 5"):
        dump_stream_json(edit(lambda b: allkinds(b).__setitem__("fd", msgpack.ExtType(5, b""))))
    deep: Any = None
    for _ in range(300):
        deep = [deep]
    with pytest.raises(StateError, match="nest deeper"):
        dump_stream_json(edit(lambda b: allkinds(b).__setitem__("words", deep)))


def test_deeply_nested_garbage_is_a_typed_error():
    deep: Any = 0
    for _ in range(1000):
        deep = [deep]
    for mutate in (lambda b: allkinds(b).__setitem__("words", deep),
                   lambda b: b["fingerprint"].__setitem__("max_queues", deep)):
        with pytest.raises(VMStateError):
            do_load(edit(mutate))


def test_wire_prefix_layout():
    data = good()
    magic, fmt, flags, n = struct.unpack_from("<8sHHI", data)
    assert (magic, fmt, flags, n) == (MAGIC, 1, 0, len(data) - 20)
    assert FdRef(1) == FdRef(1)


def test_repeated_map_key_is_refused():
    # {"device_type": ..., "device_type": ...}: msgpack allows writing it; we refuse it
    packed = msgpack.packb(body(good()))
    assert packed[0] == 0x83
    dup = b"\x84" + msgpack.packb("device_type") + msgpack.packb("other") + packed[1:]
    with pytest.raises(StreamError, match="duplicate key 'device_type' in a map"):
        do_load(seal(dup))
    with pytest.raises(StreamError, match="duplicate key"):
        dump_stream_json(seal(dup))


def test_errors_survive_pickling():
    import pickle

    with pytest.raises(ConfigMismatchError) as ei:
        do_load(good(), fingerprint={})
    err = pickle.loads(pickle.dumps(ei.value))
    assert type(err) is ConfigMismatchError and str(err) == str(ei.value)
    assert err.differences == ei.value.differences
    with pytest.raises(StateError) as ei:
        do_load(edit(lambda b: allkinds(b).__setitem__("u8", 256)))
    err = pickle.loads(pickle.dumps(ei.value))
    assert (type(err), str(err), err.section, err.instance_id, err.path) == (
        StateError, str(ei.value), "test/allkinds", 1, "u8")
