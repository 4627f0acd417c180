"""The decoded-size budget of a vmstate body (pcidev.vmstate.budget): hostile bodies are refused
before they are decoded, the estimate bounds what decoding really allocates, and save and
load agree on what fits, down to the largest legitimate NVMe states."""

from __future__ import annotations

import gc
import struct
import tracemalloc

import attrs
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmstate_descriptions import DEVICE_TYPE, FINGERPRINT, QueueState

from pcidev.native import MsgpackWalk
from pcidev.vmstate import StateError, StreamError, load, save
from pcidev.vmstate import budget as budget_mod
from pcidev.vmstate.budget import MAX_DECODED_SIZE, estimate
from pcidev.vmstate.stream import _decode_body, open_stream, seal
from pcidev_nvme.queues import CqeState, CqState
from pcidev_nvme.uncorrectable import UncorrectableState, WuRange
from pcidev_nvme.virtualization import MAX_VFS, SecondaryState, VirtualizationState


def _array(elems: list[bytes]) -> bytes:
    return b"\xdd" + struct.pack(">I", len(elems)) + b"".join(elems)


N = 20_000


def _str32(data: bytes) -> bytes:
    return b"\xdb" + struct.pack(">I", len(data)) + data


def _map_of(keys: list[bytes], value: bytes = b"\xc0") -> bytes:
    return b"\xdf" + struct.pack(">I", len(keys)) + b"".join(k + value for k in keys)


_KEYS = [b"\xa5" + b"%05x" % i for i in range(N)]
SHAPES = {
    "empty arrays": _array([b"\x90"] * N),
    "empty maps": _array([b"\x80"] * N),
    "negative fixints": _array([b"\xe0"] * N),
    "nested pairs": b"\x92\xe0" * 1000 + b"\xe0",
    "maps of one key": _array([b"\x81" + k + b"\xe0" for k in _KEYS]),
    "one big map": _map_of(_KEYS, b"\x90"),
    # review S24: the repeated key is found without a second container
    "one big map, its last key repeated": _map_of(_KEYS[:-1] + _KEYS[:1]),
    "bin keys, the last repeated": _map_of([b"\xc4\x03" + i.to_bytes(3, "big") for i in range(N - 1)]
                                           + [b"\xc4\x03\0\0\0"]),
    "ascii strs": _array(_KEYS),
    "astral strs": _array([b"\xa4\xf0\x9f\x98\x80"] * N),
    # review S24: CPython widens a str 1 -> 2 -> 4 bytes a character while both buffers live
    "one str, 1- then 2- then 4-byte characters": _str32(b"a" * (1 << 20) + "\u20ac\U0001f600".encode()),
    "one str, 2- then 4-byte characters": _str32("\u20ac\U0001f600".encode() + "\u20ac".encode() * 300_000),
    "bins": _array([b"\xc4\x02xy"] * N),
    "exts": _array([b"\xd4\x05x"] * N),
    "16-byte exts": _array([b"\xd8\x05" + b"x" * 16] * N),
    "timestamps 96": _array([b"\xc7\x0c\xff" + struct.pack(">Iq", 999_999_999, -(1 << 62) + i) for i in range(N)]),
    "floats": _array([b"\xca\x3f\xc0\x00\x00"] * N),
    "int64s": _array([b"\xd3\x80" + b"\x00" * 7] * N),
    "arrays of one": _array([b"\x91\xe0"] * N),
}


def _peak(decode, *args) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        try:
            decode(*args)
        except StreamError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _peak_of_open(stream: bytes) -> int:
    return _peak(open_stream, stream)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_estimate_bounds_what_decoding_allocates(shape):
    """For each shape an attacker would use, what decoding the body really allocates at its
    peak (tracemalloc) is at most the estimate plus the decoder's fixed few KiB, and not
    wildly below it.

    The body is decoded once before the measured run: that run may grow the interpreter's
    table of interned strings (msgpack interns str map keys), a one-time cost set by the
    process's own interned strings, not by the body (the format page says so).
    """
    body = SHAPES[shape]
    est = estimate(body)
    assert est.walk is MsgpackWalk.OK and est.offset == len(body)
    with memoryview(body) as view:
        _peak(_decode_body, view)
        peak = _peak(_decode_body, view)
    assert peak <= est.size + (16 << 10), (peak, est.size)
    assert est.size <= 3 * peak


@pytest.mark.parametrize("name, body", [
    # 16 MiB of empty arrays: 1.2 GB estimated (1.1 GB to decode before this budget)
    ("empty arrays", b"\xdd" + struct.pack(">I", 16 << 20) + b"\x90" * (16 << 20)),
    # review S23's nested shape: 16 levels of 2M-1 negative fixints around the next level
    ("nested negative fixints", b"".join(b"\xdd" + struct.pack(">I", 1 << 21) + b"\xe0" * ((1 << 21) - 1)
                                         for _ in range(16)) + b"\xc0"),
    # empty maps, the dearest value per byte
    ("empty maps", b"\xdd" + struct.pack(">I", 8 << 20) + b"\x80" * (8 << 20)),
])
def test_hostile_bodies_are_refused_before_they_are_decoded(name, body):
    """Bodies that would decode to gigabytes are refused as too large, and refusing them
    allocates little more than the stream."""
    stream = seal(body)
    with pytest.raises(StreamError, match=r"body is too large: decoding it would take more than 1,073,741,824"):
        open_stream(stream)
    assert _peak_of_open(stream) < 3 * len(stream) + (1 << 20)


def test_headers_that_declare_more_than_the_body_holds_are_refused_at_once():
    """Review S23's "prealloc" shape: nested headers each declaring 2**32-1 elements."""
    stream = seal(b"\xdd\xff\xff\xff\xff" * 64 + b"\x00" * 4096)
    with pytest.raises(StreamError, match=r"not valid msgpack: the value at byte 0 is truncated"):
        open_stream(stream)
    assert _peak_of_open(stream) < 64 << 10


@pytest.mark.parametrize("body, message", [
    (b"\x92\x01\xc1", "byte 2 is 0xc1"),
    (b"\x91" * 1025 + b"\xc0", "nest deeper than 1024 levels"),
    (b"\x90\x90", "bytes left over after the value, from byte 1"),
])
def test_malformed_bodies_name_where(body, message):
    with pytest.raises(StreamError, match=f"body is not valid msgpack: .*{message}"):
        open_stream(seal(body))


def _queue(n: int) -> QueueState:
    return QueueState(qid=1, size=64, pending=tuple(range(1000, 1000 + n)))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3000), st.integers(2_000, 40_000))
def test_save_and_load_agree_on_what_fits(n, limit):
    """Whatever the limit, a state save accepts is one load accepts, and a state save refuses
    is one load refuses (a writer with a higher limit made the stream)."""
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(budget_mod, "MAX_DECODED_SIZE", 1 << 40)
        stream = save(DEVICE_TYPE, FINGERPRINT, [("test/queue", 0, _queue(n))])
        mp.setattr(budget_mod, "MAX_DECODED_SIZE", limit)
        try:
            saved = save(DEVICE_TYPE, FINGERPRINT, [("test/queue", 0, _queue(n))])
        except StateError as e:
            assert "too large to save" in str(e)
            with pytest.raises(StreamError, match="too large"):
                load(stream, device_type=DEVICE_TYPE, fingerprint=FINGERPRINT, descriptions=[QueueState])
        else:
            assert saved == stream
            (sec,) = load(saved, device_type=DEVICE_TYPE, fingerprint=FINGERPRINT, descriptions=[QueueState])
            assert sec.state == _queue(n)
    finally:
        mp.undo()


def test_a_state_too_large_to_save_names_its_largest_sections(monkeypatch):
    monkeypatch.setattr(budget_mod, "MAX_DECODED_SIZE", 30_000)
    with pytest.raises(StateError) as info:
        save(DEVICE_TYPE, FINGERPRINT, [("test/queue", 0, _queue(10)), ("test/queue", 1, _queue(2000)),
                                        ("test/queue", 2, _queue(500))])
    msg = str(info.value)
    assert "the state is too large to save" in msg and "more than the 30,000 a reader accepts" in msg
    assert msg.index("test/queue 1:") < msg.index("test/queue 2:") < msg.index("test/queue 0:")


def _full_backlog_cq() -> CqState:
    cqe = CqeState(sqid=1, cid=7, status=0x4002, dw0=0x1234_5678, dw1=0)
    return CqState(cqid=1, base=0x10_0000, size=2, vector=0, ien=True, head=0, tail=0, phase=1,
                   backlog=(cqe,) * 65536)


def test_the_largest_legitimate_nvme_states_save_and_load():
    """At the real limit: a completion queue with a full backlog (65,536 completions, the
    most its description allows), 65,536 uncorrectable ranges and the most secondary
    controllers (127, each with 1,024 namespaces attached) save and load as they are;
    ten such queues fit in one stream, eleven would not."""
    cq = _full_backlog_cq()
    wu = UncorrectableState(ranges=tuple(WuRange(**{a.name: i for a in attrs.fields(WuRange)})
                                         for i in range(65536)))
    virt = VirtualizationState(vqfa=0, vifa=0, vqfa_next=0, vifa_next=0, secondaries=tuple(
        SecondaryState(online=True, nvq=2, nvi=1, attached=tuple(range(1, 1025))) for _ in range(MAX_VFS)))
    stream = save("nvme", {}, [("nvme/cq", 1, cq), ("nvme/uncorrectable", 0, wu), ("nvme/virtualization", 0, virt)])
    got = load(stream, device_type="nvme", fingerprint={},
               descriptions=[CqState, UncorrectableState, VirtualizationState])
    assert [s.state for s in got] == [cq, wu, virt]
    one = estimate(msgpack.packb(msgpack.unpackb(stream[16:-4])["sections"][0], use_bin_type=True)).size
    assert 10 * one < MAX_DECODED_SIZE < 11 * one
