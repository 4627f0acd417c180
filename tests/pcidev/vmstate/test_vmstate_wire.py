"""The wire format, byte for byte: the worked example of docs/vmstate-format.md."""

from __future__ import annotations

import json
from typing import Optional

import attrs
import crc32c
from vmstate_golden import DATA

from pcidev.vmstate import U16, Array, Bytes, FdRef, dump_stream_json, load, peek_header, save, vmstate
from pcidev.vmstate.stream import SectionInfo


@vmstate("ex/q")
@attrs.frozen
class Q:
    head: U16
    cmd: Bytes[2]


@vmstate("ex/irq")
@attrs.frozen
class Irq:
    fd: FdRef


@vmstate("ex/dev")
@attrs.frozen
class Dev:
    on: bool
    q: Array[Optional[Q], 2]
    irq: Optional[Irq] = None


EXAMPLE = Dev(on=True, q=(None, Q(head=0x1234, cmd=b"\xab\xcd")), irq=Irq(fd=FdRef(1)))

# Annotated in docs/vmstate-format.md, "Worked example".
EXAMPLE_BYTES = bytes.fromhex(
    "50434944455656 4d 0100 0000 6a000000"
    "83"
    "ab 6465766963655f74797065 a2 6578"
    "ab 66696e6765727072696e74 81 a6 717565756573 02"
    "a8 73656374696f6e73 91"
    "93 a6 65782f646576 00"
    "93 01"
    "82 a2 6f6e c3"
    "a1 71 92 c0 92 01 82 a4 68656164 cd1234 a3 636d64 c402abcd"
    "81 a6 65782f697271 92 01 81 a2 6664 d601 01000000"
    "8093c1b9"
)


def test_worked_example_bytes():
    data = save("ex", {"queues": 2}, [("ex/dev", 0, EXAMPLE)])
    assert data == EXAMPLE_BYTES
    assert crc32c.crc32c(data[:-4]).to_bytes(4, "little") == data[-4:]
    assert load(data, device_type="ex", fingerprint={"queues": 2}, descriptions=[Dev]) == [("ex/dev", 0, EXAMPLE)]


def test_worked_example_dump():
    assert dump_stream_json(EXAMPLE_BYTES) == {
        "format_version": 1,
        "size": 126,
        "checksum": "0xb9c19380",
        "device_type": "ex",
        "fingerprint": {"queues": 2},
        "sections": [{
            "name": "ex/dev", "instance_id": 0, "version": 1,
            "fields": {
                "on": True,
                "q": [None, {"version": 1, "fields": {"head": 0x1234, "cmd": {"hex": "abcd"}},
                             "subsections": {}}],
            },
            "subsections": {"ex/irq": {"version": 1, "fields": {"fd": {"fd": 1}}, "subsections": {}}},
        }],
    }


def test_peek_header():
    h = peek_header(EXAMPLE_BYTES)
    assert (h.format_version, h.device_type, h.fingerprint, h.size, h.checksum) == (
        1, "ex", {"queues": 2}, 126, 0xB9C19380)
    assert h.sections == (SectionInfo("ex/dev", 0, 1),)


def test_dump_of_golden_streams_is_json():
    for path in sorted(DATA.glob("*.pcvm")):
        dumped = dump_stream_json(path.read_bytes())
        assert json.loads(json.dumps(dumped)) == dumped
        assert dumped["device_type"] == "test-dev"
    v1 = dump_stream_json((DATA / "sample-v1.pcvm").read_bytes())
    queues = v1["sections"][0]["fields"]["queues"]
    assert [q is None for q in queues] == [False, True, False, True, True, False, True, True]
    assert queues[0]["fields"]["base"] == 0x1000
