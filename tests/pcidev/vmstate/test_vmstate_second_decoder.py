"""A second, independent reader of the vmstate stream, written from
docs/vmstate-format.md alone.

It imports nothing from :mod:`pcidev`: only ``msgpack``, ``crc32c`` and ``struct``.
Descriptions come from the committed schema JSON (docs section 8), plus what a
second implementation supplies itself (default values and upgrade steps are code,
not schema). It reads the committed golden streams and must find in them what the
reference implementation saved; and on damaged copies of them it must refuse
exactly when the reference refuses. If this file needs to look at the Python
implementation to pass, the document is not precise enough.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import crc32c
import msgpack
import pytest

HERE = Path(__file__).resolve().parent
SCHEMAS = HERE / "schema"

# --------------------------------------------------------------- the decoder (section 3..6)
MAGIC = b"PCIDEVVM"
PREFIX = struct.Struct("<8sHHI")
TRAILER = struct.Struct("<I")


class Refused(Exception):
    """The stream is refused; ``where`` names the section/field."""

    def __init__(self, reason: str, where: str = "stream") -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason
        self.where = where


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise Refused("a map repeats a key")
    return d


def open_envelope(data: bytes) -> tuple[dict[str, Any], int]:
    """Section 3: checks 1..7, in the document's order."""
    if len(data) < 20:
        if len(data) >= 8 and data[:8] != MAGIC:
            raise Refused("bad magic")
        raise Refused("truncated")
    magic, fmt, flags, n = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise Refused("bad magic")
    if fmt != 1:
        raise Refused("too new" if fmt > 1 else "too old")
    if flags != 0:
        raise Refused("unknown flags")
    if len(data) < 20 + n:
        raise Refused("truncated")
    if len(data) > 20 + n:
        raise Refused("trailing bytes")
    (stored,) = TRAILER.unpack_from(data, 16 + n)
    if stored != crc32c.crc32c(data[:16 + n]):
        raise Refused("checksum mismatch")
    try:
        body = msgpack.unpackb(data[16:16 + n], raw=False, strict_map_key=True, object_pairs_hook=_pairs,
                               timestamp=0)
    except Refused:
        raise
    except Exception as e:  # any msgpack failure is "not valid msgpack"
        raise Refused(f"not valid msgpack ({type(e).__name__})") from None
    return body, stored


def read_header(body: Any) -> tuple[str, dict[str, Any], list[list[Any]]]:
    """Section 4.2 and 4.4 (shape of each section entry)."""
    if type(body) is not dict or set(body) != {"device_type", "fingerprint", "sections"}:
        raise Refused("body must be a map of exactly device_type, fingerprint, sections")
    dt, fp, secs = body["device_type"], body["fingerprint"], body["sections"]
    if type(dt) is not str or not dt:
        raise Refused("device_type")
    if type(fp) is not dict or any(type(k) is not str for k in fp):
        raise Refused("fingerprint")
    if type(secs) is not list:
        raise Refused("sections")
    for sec in secs:
        if type(sec) is not list or len(sec) != 3 or type(sec[0]) is not str or not sec[0] \
                or type(sec[1]) is not int or not 0 <= sec[1] <= 0xFFFF_FFFF:
            raise Refused("malformed section entry")
    return dt, fp, secs


class Fd(int):
    """An fd reference (section 6): the index in the out-of-band list."""


class Desc:
    """A local description: the schema JSON of section 8, plus what a second
    implementation writes in its own code for some descriptions (default values
    of fields added later, upgrade steps), looked up by name in ``code``."""

    def __init__(self, schema: dict[str, Any], code: dict[str, dict[str, Any]]) -> None:
        self.name = schema["name"]
        self.version = schema["version"]
        self.min_version = schema["min_version"]
        self.fields = schema["fields"]
        self.code = code
        self.subs = {s["description"]["name"]: (s["field"], Desc(s["description"], code))
                     for s in schema["subsections"]}
        own = code.get(self.name, {})
        self.defaults = own.get("defaults", {})
        self.upgrades = own.get("upgrades", {})


def decode_value(t: dict[str, Any], w: Any, where: str, code: dict[str, dict[str, Any]]) -> Any:
    """Section 6: one wire value of type ``t`` (a schema type)."""
    k = t["kind"]
    if k in ("uint", "int"):
        bits = t["bits"]
        lo, hi = (0, (1 << bits) - 1) if k == "uint" else (-(1 << bits - 1), (1 << bits - 1) - 1)
        if type(w) is not int or not lo <= w <= hi:
            raise Refused(f"expected {k}{bits}", where)
        return w
    if k == "bool":
        if type(w) is not bool:
            raise Refused("expected bool", where)
        return w
    if k == "bytes":
        if type(w) is not bytes or ("length" in t and len(w) != t["length"]) \
                or ("max_length" in t and len(w) > t["max_length"]):
            raise Refused("expected bin of the right length", where)
        return w
    if k == "str":
        if type(w) is not str or len(w.encode("utf-8")) > t["max_length"]:
            raise Refused("expected str of the right length", where)
        return w
    if k == "fd":
        if type(w) is not msgpack.ExtType or w.code != 1 or len(w.data) != 4:
            raise Refused("expected an fd reference (ext type 1, 4 bytes)", where)
        return Fd(struct.unpack("<I", w.data)[0])
    if k == "struct":
        return decode_structure(Desc(t["description"], code), w, where)
    if k == "array":
        if type(w) is not list:
            raise Refused("expected array", where)
        if ("length" in t and len(w) != t["length"]) or (t.get("max_length") is not None
                                                         and len(w) > t["max_length"]):
            raise Refused("array of the wrong length", where)
        return [decode_value(t["element"], x, f"{where}[{i}]", code) for i, x in enumerate(w)]
    if k == "optional":
        if w is None:
            return None
        inner = t["value"]
        if inner["kind"] == "struct" and not (type(w) is list and 2 <= len(w) <= 3 and type(w[0]) is int):
            raise Refused("bad presence marker", where)
        return decode_value(inner, w, where, code)
    raise AssertionError(f"schema kind {k!r} is not in the document")


def decode_structure(d: Desc, w: Any, where: str) -> dict[str, Any]:
    """Section 5.2, steps 1..8. Returns {field: value} with subsections under their field."""
    if type(w) is not list or not 2 <= len(w) <= 3:
        raise Refused("expected structure", where)
    ver, fields = w[0], w[1]
    if type(ver) is not int:
        raise Refused("version is not an int", where)
    if ver > d.version:
        raise Refused("too new", where)
    if ver < d.min_version:
        raise Refused("too old", where)
    if type(fields) is not dict:
        raise Refused("fields is not a map", where)
    fields = dict(fields)
    if ver < d.version:
        for f in d.fields:
            if f["since"] > ver and f["name"] in fields:
                raise Refused(f"field {f['name']} is newer than the stream", where)
        for u in range(ver, d.version):
            if u in d.upgrades:
                try:
                    fields = d.upgrades[u](fields)
                except Exception as e:  # a failing step refuses the stream (5.2 step 4.2)
                    raise Refused(f"upgrade step {u} failed: {e!r}", where) from None
                if type(fields) is not dict:
                    raise Refused(f"upgrade step {u} did not return a map", where)
        for f in d.fields:
            if f["since"] > ver and f["name"] not in fields and f["has_default"]:
                fields[f["name"]] = d.defaults[f["name"]]
    names = {f["name"] for f in d.fields}
    if set(fields) != names:
        raise Refused("unknown or missing fields", where)
    out = {f["name"]: decode_value(f["type"], fields[f["name"]], f"{where}.{f['name']}", d.code)
           for f in d.fields}
    for field, _ in d.subs.values():
        out[field] = None
    if len(w) == 3:
        subs = w[2]
        if type(subs) is not dict or not subs:
            raise Refused("subsections must be a non-empty map", where)
        for name, sw in subs.items():
            if name not in d.subs:
                raise Refused(f"unknown subsection {name!r}", where)
            field, sd = d.subs[name]
            out[field] = decode_structure(sd, sw, f"{where}.{field}")
    return out


def decode_stream(data: bytes, descs: dict[str, Desc]) -> dict[str, Any]:
    """The whole stream: header and every section (all or nothing)."""
    body, crc = open_envelope(data)
    dt, fp, secs = read_header(body)
    sections = {}
    for name, iid, payload in secs:
        if (name, iid) in sections:
            raise Refused("duplicate section", name)
        if name not in descs:
            raise Refused("unknown section", name)
        sections[(name, iid)] = decode_structure(descs[name], payload, f"{name}#{iid}")
    return {"device_type": dt, "fingerprint": fp, "sections": sections, "crc": crc}


def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


# ------------------------------------------------------------------- descriptions
def _queue_v1_to_v2(fields: dict[str, Any]) -> dict[str, Any]:
    """This reader's own upgrade step of test/queue: version 1 called ``dma_addr`` ``base``."""
    fields = dict(fields)
    fields["dma_addr"] = fields.pop("base")
    return fields


#: What this reader supplies in code: test/queue's ``prio`` (since 2) defaults to 0.
SAMPLE_CODE = {"test/queue": {"defaults": {"prio": 0}, "upgrades": {1: _queue_v1_to_v2}}}


def sample_descs() -> dict[str, Desc]:
    return {"test/ctrl": Desc(schema("test-ctrl.json"), SAMPLE_CODE)}


def edu_descs() -> dict[str, Desc]:
    return {"pcidev/function": Desc(schema("pcidev-function.json"), {}), "edu": Desc(schema("edu.json"), {})}


# -------------------------------------------------------------------------- tests
def test_doc_worked_example_crc() -> None:
    """Section 3: CRC-32C check value."""
    assert crc32c.crc32c(b"123456789") == 0xE3069283


def test_sample_v2_golden() -> None:
    data = (HERE / "data" / "sample-v2.pcvm").read_bytes()
    got = decode_stream(data, sample_descs())
    assert got["device_type"] == "test-dev"
    assert got["fingerprint"] == {"max_queues": 8, "namespace_sizes": [1 << 20, 1 << 30], "bar0_size": 16384}
    (key, ctrl), = got["sections"].items()
    assert key == ("test/ctrl", 0)
    assert ctrl["enabled"] is True and ctrl["serial"] == "PCIDEV-0002"
    assert ctrl["last_cmd"] == b"\xff" * 16
    present = [i for i, q in enumerate(ctrl["queues"]) if q is not None]
    assert present == [0, 1, 7]
    q0, q1, q7 = (ctrl["queues"][i] for i in present)
    assert q0 == {"qid": 0, "size": 32, "head": 1, "tail": 2, "dma_addr": 0x2000, "pending": [1], "prio": 3}
    assert q1 == {"qid": 1, "size": 16, "head": 0, "tail": 0, "dma_addr": 0, "pending": [], "prio": 0}
    assert q7["dma_addr"] == 0xFFFF_FFFF_FFFF_F000 and q7["prio"] == 255 and q7["head"] == 4095
    assert ctrl["irq"] == {"vector": 5, "masked": True, "eventfd": 2}
    assert isinstance(ctrl["irq"]["eventfd"], Fd)


def test_sample_v1_golden_through_own_upgrade_step() -> None:
    """An older stream: the field added in version 2 takes this reader's default,
    the renamed one goes through this reader's upgrade step, the absent subsection
    stays absent."""
    data = (HERE / "data" / "sample-v1.pcvm").read_bytes()
    got = decode_stream(data, sample_descs())
    ctrl = got["sections"][("test/ctrl", 0)]
    assert ctrl["serial"] == "PCIDEV-0001" and ctrl["irq"] is None
    assert ctrl["last_cmd"] == bytes(range(16))
    assert [i for i, q in enumerate(ctrl["queues"]) if q is not None] == [0, 2, 5]
    assert ctrl["queues"][0] == {"qid": 0, "size": 32, "head": 3, "tail": 5, "dma_addr": 0x1000,
                                 "pending": [7, 9], "prio": 0}
    assert ctrl["queues"][2]["dma_addr"] == 0xFFFF_0000_1000
    assert ctrl["queues"][5]["head"] == 1023


def test_edu_v1_golden() -> None:
    """The real device's golden stream: framework section and edu section, typed
    by the committed schema snapshots."""
    data = (HERE / "device_data" / "edu-v1.pcvm").read_bytes()
    got = decode_stream(data, edu_descs())
    assert got["device_type"] == "edu"
    assert set(got["sections"]) == {("pcidev/function", 0), ("edu", 0)}
    fn = got["sections"][("pcidev/function", 0)]
    edu = got["sections"][("edu", 0)]
    cfg = fn["config"]
    assert len(cfg) == 4096 and cfg[:4] == struct.pack("<HH", 0x1234, 0x11E8)
    assert struct.unpack_from("<I", cfg, 0x10)[0] & ~0xF == 0xFEB0_0000
    assert [(r["gpa"], r["size"], r["name"], r["writable"]) for r in fn["dma"]] == [(0, 1 << 20, "ram", True)]
    table = fn["msix"]["table"]
    assert struct.unpack_from("<IIII", table, 0) == (0xFEE0_0000, 0, 0x41, 0)
    assert struct.unpack_from("<IIII", table, 16) == (0xFEE0_1000, 0, 0x42, 1)
    assert fn["msix"]["pba"][0] & 0b10  # vector 1 was masked when it fired
    fds = fn["eventfds"]
    assert fds["vectors"][:2] == [1, 2] and fds["intx"] == 3 and fn["dma"][0]["fd"] == 0
    assert (edu["ring_base"], edu["ring_size"], edu["ring_tail"], edu["ring_head"]) == (0x1_0000, 16, 3, 1)
    assert edu["inflight"] is not None and edu["inflight"]["done"] == 1000


def _reseal(body: bytes) -> bytes:
    head = PREFIX.pack(MAGIC, 1, 0, len(body)) + body
    return head + TRAILER.pack(crc32c.crc32c(head))


def _reference_refuses(data: bytes, which: str) -> bool:
    """Whether the reference implementation refuses ``data`` (imported here only,
    for the comparison)."""
    from pcidev.errors import VMStateError
    from pcidev.vmstate import load

    if which == "edu":
        from pcidev.devices.edu import EduDevice
        from pcidev.migration import FunctionState

        kw = {"device_type": "edu", "fingerprint": _GOLDEN_HEADERS["edu"][1],
              "descriptions": [FunctionState, EduDevice.VMSTATE]}
    else:
        from vmstate_descriptions import DEVICE_TYPE, FINGERPRINT, CtrlState

        kw = {"device_type": DEVICE_TYPE, "fingerprint": FINGERPRINT, "descriptions": [CtrlState]}
    try:
        load(data, **kw)
    except VMStateError:
        return True
    return False


GOLDEN = {"sample-v1": HERE / "data" / "sample-v1.pcvm", "sample-v2": HERE / "data" / "sample-v2.pcvm",
          "edu": HERE / "device_data" / "edu-v1.pcvm"}
#: device type and fingerprint of each golden stream (what the destination has)
_GOLDEN_HEADERS = {k: (lambda b: (b["device_type"], b["fingerprint"]))(open_envelope(p.read_bytes())[0])
                   for k, p in GOLDEN.items()}


def _mine_refuses(data: bytes, which: str) -> bool:
    descs = edu_descs() if which == "edu" else sample_descs()
    try:
        got = decode_stream(data, descs)
    except Refused:
        return True
    dt, fp = _GOLDEN_HEADERS[which]
    return got["device_type"] != dt or not _same(got["fingerprint"], fp)


def _same(a: Any, b: Any) -> bool:
    """Section 4.3: same msgpack type and content, recursively."""
    if type(a) is not type(b):
        return False
    if type(a) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _byte_damage(body: bytes, rng: random.Random, i: int) -> bytes:
    b = bytearray(body)
    pos = rng.randrange(len(b))
    if i % 3 == 0:
        b[pos] = rng.randrange(256)
    elif i % 3 == 1:
        b[pos:pos] = bytes([rng.randrange(256)])
    else:
        del b[pos:pos + rng.randrange(1, 4)]
    return bytes(b)


_REPLACEMENTS = [None, True, False, 0, 1, -1, 255, 256, 65536, 2**32, 2**64 - 1, -(2**63), "", "x" * 70, b"",
                 b"\0" * 16, [], {}, [1, {}], [1, {}, {}], [99, {}], [0, {}], [1.0, {}], 1.5,
                 msgpack.ExtType(1, b"\0" * 4), msgpack.ExtType(1, b"\0" * 3), msgpack.ExtType(2, b"\0" * 4)]


def _nodes(v: Any, out: list[tuple[Any, Any]]) -> None:
    if type(v) is list:
        for i, x in enumerate(v):
            out.append((v, i))
            _nodes(x, out)
    elif type(v) is dict:
        for k, x in v.items():
            out.append((v, k))
            _nodes(x, out)


def _value_damage(body: bytes, rng: random.Random, i: int) -> bytes:
    """Replace one value (or rename a key, or drop an entry) anywhere in the body."""
    tree = msgpack.unpackb(body, raw=False)
    nodes: list[tuple[Any, Any]] = []
    _nodes(tree, nodes)
    parent, key = rng.choice(nodes)
    op = i % 4
    if op == 3 and type(parent) is dict:
        del parent[key]
    elif op == 2 and type(parent) is dict:
        parent[key + "_"] = parent.pop(key)
    elif op == 2:
        del parent[key]
    else:
        parent[key] = rng.choice(_REPLACEMENTS)
    return msgpack.packb(tree, use_bin_type=True)


@pytest.mark.parametrize("damage", [_byte_damage, _value_damage], ids=["bytes", "values"])
@pytest.mark.parametrize("which", sorted(GOLDEN))
def test_refuses_exactly_what_the_reference_refuses(which: str, damage: Any) -> None:
    """Damaged bodies under a correct checksum (so the body rules decide): the two
    readers must agree on every one, and some must still load (the damage is not
    all fatal, so the comparison means something)."""
    body = GOLDEN[which].read_bytes()[16:-4]
    rng = random.Random(f"{which}-{damage.__name__}")
    disagreements, accepted = [], 0
    for i in range(300):
        data = _reseal(damage(body, rng, i))
        mine = _mine_refuses(data, which)
        accepted += not mine
        if mine != _reference_refuses(data, which):
            disagreements.append((mine, data.hex()))
    assert not disagreements, disagreements[:2]
    assert accepted > 0


def test_documented_nesting_limit() -> None:
    """Section 4.1: 1024 nested containers (the body map included) are read, one more
    is refused, by this reader (msgpack's own limit) and by the reference."""
    from pcidev.vmstate.errors import StreamError
    from pcidev.vmstate.stream import open_stream

    for depth, ok in ((1024, True), (1025, False)):
        data = _reseal(b"\x81\xa1s" + b"\x91" * (depth - 1) + b"\xc0")
        if ok:
            open_envelope(data)
            open_stream(data)
        else:
            with pytest.raises(Refused, match="not valid msgpack"):
                open_envelope(data)
            with pytest.raises(StreamError, match="nest"):
                open_stream(data)
