"""The vmstate stream: envelope, header, sections; :func:`save`, :func:`load`,
:func:`peek_header`.

Layout (all integers little-endian; full specification in docs/vmstate-format.md)::

    +0      8  magic  b"PCIDEVVM"
    +8      2  u16    format version (1)
    +10     2  u16    flags (0)
    +12     4  u32    N = length of the body
    +16     N  body   one msgpack map {"device_type", "fingerprint", "sections"}
    +16+N   4  u32    CRC-32C (Castagnoli) of bytes [0, 16+N)

Each section is ``[name, instance_id, structure]`` and ``structure`` is
``[version, {field: value}]`` or, when subsections are written,
``[version, {field: value}, {subsection name: structure}]``.
"""

from __future__ import annotations

import reprlib
import struct
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import crc32c
import msgpack

from pcidev.errors import ConfigError
from pcidev.native import MsgpackWalk
from pcidev.vmstate.budget import estimate
from pcidev.vmstate.codec import _tname, codec_for, decode_state, encode_state
from pcidev.vmstate.description import description_of, is_vmstate
from pcidev.vmstate.errors import (
    ChecksumError,
    ConfigMismatchError,
    StateError,
    StreamError,
)
from pcidev.vmstate.gcpause import gc_paused

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "PREFIX_SIZE",
    "TRAILER_SIZE",
    "Section",
    "SectionInfo",
    "StreamHeader",
    "save",
    "load",
    "peek_header",
    "open_stream",
    "seal",
]

#: First eight bytes of every stream.
MAGIC = b"PCIDEVVM"
#: The envelope/body format this build writes and reads.
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHHI")
_TRAILER = struct.Struct("<I")
#: Size of the fixed prefix (magic, format version, flags, body length).
PREFIX_SIZE = _PREFIX.size
#: Size of the trailing checksum.
TRAILER_SIZE = _TRAILER.size
_MAX_U32 = 0xFFFF_FFFF
_HEADER_KEYS = ("device_type", "fingerprint", "sections")
_MAX_FP_DEPTH = 16
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 4, 60, 60
_show = _repr.repr


class Section(NamedTuple):
    """One section: a state object with its name and instance id.

    :ivar name: section name (the state class's description name).
    :ivar instance_id: distinguishes several sections of the same name (0..2**32-1).
    :ivar state: the state object.
    """

    name: str
    instance_id: int
    state: Any


class SectionInfo(NamedTuple):
    """What :func:`peek_header` reports about a section without decoding it."""

    name: str
    instance_id: int
    version: int


class StreamHeader(NamedTuple):
    """The verified header of a stream (see :func:`peek_header`).

    :ivar format_version: envelope format version.
    :ivar device_type: device type that saved the stream.
    :ivar fingerprint: configuration fingerprint, as decoded (tuples become lists).
    :ivar sections: name, instance id and top-level version of each section.
    :ivar size: total stream size in bytes.
    :ivar checksum: the stream's CRC-32C.
    """

    format_version: int
    device_type: str
    fingerprint: dict[str, Any]
    sections: tuple[SectionInfo, ...]
    size: int
    checksum: int


# ------------------------------------------------------------------- envelope
def seal(body: bytes, *, format_version: int = FORMAT_VERSION, flags: int = 0) -> bytes:
    """Wrap an encoded body in the envelope: prefix, body, CRC-32C.

    Tools and tests use it to build streams whose checksum is right but whose body
    is not (to exercise the decoder); :func:`save` uses it for real streams.

    :param body: the msgpack body.
    :param format_version: value of the format version field.
    :param flags: value of the flags field.
    :returns: the stream.
    :raises StreamError: when the body is larger than 2**32-1 bytes.
    """
    if len(body) > _MAX_U32:
        raise StreamError(f"body of {len(body)} bytes exceeds the 2**32-1 limit")
    head = _PREFIX.pack(MAGIC, format_version, flags, len(body)) + body
    return head + _TRAILER.pack(crc32c.crc32c(head))


class _DuplicateKey(ValueError):
    pass


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """Map hook for msgpack: a map with a repeated key is malformed, not "last one wins".

    The repeated key is found by emptying the dict built, not by building a second
    container: the decoded-size budget charges a map for one dict.
    """
    d = dict(pairs)
    if len(d) != len(pairs):
        gone = object()
        for k, _ in pairs:
            if d.pop(k, gone) is gone:
                raise _DuplicateKey(f"duplicate key {_show(k)} in a map")
    return d


def open_stream(data: Any) -> tuple[int, Any, int]:
    """Check the envelope and decode the body (sections are not interpreted).

    Checks, in order: length, magic, format version, flags, body length, checksum,
    msgpack validity (including no repeated key in any map).

    :param data: the stream (bytes-like).
    :returns: ``(format_version, decoded body, checksum)``.
    :raises StreamError: on any envelope problem (:class:`~pcidev.vmstate.errors.ChecksumError` for a bad
        checksum).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StreamError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < PREFIX_SIZE + TRAILER_SIZE:
        if len(data) >= len(MAGIC) and data[: len(MAGIC)] != MAGIC:
            raise StreamError(f"bad magic {data[:8]!r}, expected {MAGIC!r}: not a pcidev vmstate stream")
        raise StreamError(f"truncated: {len(data)} bytes, a stream has at least "
                          f"{PREFIX_SIZE + TRAILER_SIZE}")
    magic, fmt, flags, n = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise StreamError(f"bad magic {magic!r}, expected {MAGIC!r}: not a pcidev vmstate stream")
    if fmt > FORMAT_VERSION:
        raise StreamError(f"stream format version {fmt} is too new; this build reads version "
                          f"{FORMAT_VERSION}")
    if fmt < FORMAT_VERSION:
        raise StreamError(f"stream format version {fmt} is too old; this build reads version "
                          f"{FORMAT_VERSION}")
    if flags != 0:
        raise StreamError(f"unknown flags 0x{flags:04x} in the stream prefix")
    total = PREFIX_SIZE + n + TRAILER_SIZE
    if len(data) < total:
        raise StreamError(f"truncated: the prefix announces {total} bytes, got {len(data)}")
    if len(data) > total:
        raise StreamError(f"{len(data) - total} trailing bytes after the checksum")
    (stored,) = _TRAILER.unpack_from(data, PREFIX_SIZE + n)
    computed = crc32c.crc32c(data[: PREFIX_SIZE + n])
    if stored != computed:
        raise ChecksumError(f"checksum mismatch: stored 0x{stored:08x}, computed 0x{computed:08x} "
                            f"(corrupted stream)")
    with memoryview(data) as whole, whole[PREFIX_SIZE: PREFIX_SIZE + n] as packed:
        return fmt, _decode_body(packed), stored


def _decode_body(packed: memoryview) -> Any:
    """Walk the body within the decoded-size budget (:mod:`pcidev.vmstate.budget`), then decode it."""
    est = estimate(packed)
    problem = est.problem()
    if problem is not None:
        if est.walk is MsgpackWalk.OVER:
            raise StreamError(f"body is too large: {problem} (MAX_DECODED_SIZE)")
        raise StreamError(f"body is not valid msgpack: {problem}")
    try:
        return msgpack.unpackb(packed, raw=False, strict_map_key=True, use_list=True,
                               object_pairs_hook=_unique_map)
    except msgpack.StackError:
        raise StreamError("body is not valid msgpack: values nest deeper than 1024 levels") from None
    except Exception as e:  # msgpack raises several unrelated types
        raise StreamError(f"body is not valid msgpack: {type(e).__name__}: {e}") from None


def _header(body: Any) -> tuple[str, dict[str, Any], list[Any]]:
    if body.__class__ is not dict:
        raise StreamError(f"body must be a map, got {_tname(body)}")
    keys = set(body)
    if keys != set(_HEADER_KEYS):
        extra = sorted(repr(k) for k in keys - set(_HEADER_KEYS))
        missing = sorted(repr(k) for k in set(_HEADER_KEYS) - keys)
        parts = ([f"unknown key(s) {', '.join(extra)}"] if extra else []) + (
            [f"missing key(s) {', '.join(missing)}"] if missing else [])
        raise StreamError("header: " + "; ".join(parts))
    dt, fp, secs = body["device_type"], body["fingerprint"], body["sections"]
    if dt.__class__ is not str or not dt:
        raise StreamError(f"header: device_type must be a non-empty str, got {_tname(dt)}")
    if fp.__class__ is not dict or any(k.__class__ is not str for k in fp):
        raise StreamError("header: fingerprint must be a map with str keys")
    if secs.__class__ is not list:
        raise StreamError(f"header: sections must be an array, got {_tname(secs)}")
    for i, sec in enumerate(secs):
        if sec.__class__ is not list or len(sec) != 3:
            raise StreamError(f"header: section #{i} must be [name, instance_id, state]")
        name, iid, _ = sec
        if name.__class__ is not str or not name:
            raise StreamError(f"header: section #{i} name must be a non-empty str, got {_tname(name)}")
        if iid.__class__ is not int or not 0 <= iid <= _MAX_U32:
            raise StreamError(f"header: section #{i} ({name!r}) instance id must be an int in "
                              f"0..2**32-1, got {_show(iid)}")
    return dt, fp, secs


def peek_header(data: Any) -> StreamHeader:
    """Verify a stream's envelope and read its header without loading sections.

    :param data: the stream.
    :returns: the header.
    :raises StreamError: on an envelope or header problem.
    :raises StateError: when a section payload is not a structure.
    """
    fmt, body, crc = open_stream(data)
    dt, fp, secs = _header(body)
    infos = []
    for name, iid, payload in secs:
        if payload.__class__ is not list or not 2 <= len(payload) <= 3 or payload[0].__class__ is not int:
            raise StateError("section payload must be a structure [version, fields(, subsections)]",
                             section=name, instance_id=iid)
        infos.append(SectionInfo(name, iid, payload[0]))
    return StreamHeader(fmt, dt, fp, tuple(infos), len(data), crc)


# --------------------------------------------------------------- fingerprints
def _check_fp(value: Any, path: str, depth: int = 0) -> None:
    if depth > _MAX_FP_DEPTH:
        raise StateError(f"fingerprint item {path!r} nests deeper than {_MAX_FP_DEPTH} levels")
    if value is None or isinstance(value, (bool, str, bytes)):
        return
    if isinstance(value, int):
        if not -(1 << 63) <= value <= (1 << 64) - 1:
            raise StateError(f"fingerprint item {path!r}: integer {value} does not fit 64 bits")
        return
    if isinstance(value, (list, tuple)):
        for i, x in enumerate(value):
            _check_fp(x, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        for k, x in value.items():
            if not isinstance(k, str):
                raise StateError(f"fingerprint item {path!r}: map keys must be str, got {k!r}")
            _check_fp(x, f"{path}.{k}", depth + 1)
        return
    raise StateError(f"fingerprint item {path!r}: unsupported value type {type(value).__name__}")


def _normalize_fp(fp: Any) -> dict[str, Any]:
    if not isinstance(fp, Mapping):
        raise StateError(f"fingerprint must be a mapping, got {type(fp).__name__}")
    for k, v in fp.items():
        if not isinstance(k, str):
            raise StateError(f"fingerprint keys must be str, got {k!r}")
        _check_fp(v, k)
    # one msgpack round trip gives exactly what a loader would see (tuples -> lists,
    # int/str subclasses -> base types)
    normalized: dict[str, Any] = msgpack.unpackb(msgpack.packb(dict(fp), use_bin_type=True), raw=False)
    return normalized


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def fingerprint_differences(stream_fp: dict[str, Any], local_fp: Mapping[str, Any]) -> list[str]:
    """Compare two configuration fingerprints item by item.

    :param stream_fp: the fingerprint from a stream.
    :param local_fp: this device's fingerprint.
    :returns: one message per differing item (empty when equal).
    :raises StateError: when ``local_fp`` holds unsupported values.
    """
    local = _normalize_fp(local_fp)
    out = []
    for k in sorted(set(stream_fp) | set(local)):
        if k not in local:
            out.append(f"{k}: stream has {_show(stream_fp[k])}, this device does not set it")
        elif k not in stream_fp:
            out.append(f"{k}: stream does not set it, this device has {_show(local[k])}")
        elif not _same(stream_fp[k], local[k]):
            out.append(f"{k}: stream has {_show(stream_fp[k])}, this device has {_show(local[k])}")
    return out


# ------------------------------------------------------------------ save/load
def _registry(descriptions: Iterable[type] | Mapping[str, type]) -> dict[str, type]:
    classes = descriptions.values() if isinstance(descriptions, Mapping) else descriptions
    reg: dict[str, type] = {}
    for cls in classes:
        if not is_vmstate(cls):
            raise ConfigError(f"{cls!r} is not a @vmstate class")
        name = description_of(cls).name
        if name in reg and reg[name] is not cls:
            raise ConfigError(f"two state classes share the description name {name!r}")
        reg[name] = cls
        codec_for(cls)
    return reg


def save(device_type: str, fingerprint: Mapping[str, Any],
         sections: Iterable[Section | tuple[str, int, Any]]) -> bytes:
    """Save state objects as a stream.

    :param device_type: the device type name (non-empty, at most 255 UTF-8 bytes).
    :param fingerprint: configuration items a destination must match exactly
        (str keys; values None/bool/int/str/bytes and lists/maps of them).
    :param sections: ``(name, instance_id, state)`` triples; ``name`` must be the
        description name of ``state``'s class; ``(name, instance_id)`` pairs unique.
    :returns: the stream bytes.
    :raises StateError: when a state object does not match its description (the
        message names the section and field path), or on a bad section list or
        fingerprint.
    :raises ConfigError: on an inconsistent state class.
    """
    with gc_paused():
        return _save(device_type, fingerprint, sections)


def _save(device_type: str, fingerprint: Mapping[str, Any],
          sections: Iterable[Section | tuple[str, int, Any]]) -> bytes:
    if not isinstance(device_type, str) or not device_type or len(device_type.encode("utf-8", "replace")) > 255:
        raise StateError(f"device type must be a non-empty str of at most 255 bytes, got {device_type!r}")
    fp = _normalize_fp(fingerprint)
    out = []
    seen: set[tuple[str, int]] = set()
    for sec in sections:
        if not isinstance(sec, tuple) or len(sec) != 3:
            raise StateError(f"sections must be (name, instance_id, state) triples, got {sec!r}")
        name, iid, state = sec
        if type(iid) is not int or not 0 <= iid <= _MAX_U32:
            raise StateError(f"instance id must be an int in 0..2**32-1, got {iid!r}", section=str(name))
        if not is_vmstate(type(state)):
            raise StateError(f"expected a @vmstate state object, got {type(state).__name__}",
                             section=str(name), instance_id=iid)
        dname = description_of(type(state)).name
        if name != dname:
            raise StateError(f"section name must be the description name {dname!r}",
                             section=str(name), instance_id=iid)
        if (name, iid) in seen:
            raise StateError("duplicate section", section=name, instance_id=iid)
        seen.add((name, iid))
        out.append([name, iid, encode_state(state, section=name, instance_id=iid)])
    body = {"device_type": device_type, "fingerprint": fp, "sections": out}
    try:
        packed = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:  # pragma: no cover - values are checked
        raise StateError(f"cannot encode the stream: {e}") from None
    est = estimate(packed)
    if est.walk is MsgpackWalk.OVER:
        raise StateError(_too_large(packed, out, est.limit))
    if est.walk is not MsgpackWalk.OK:  # pragma: no cover - msgpack wrote it
        raise StateError(f"cannot encode the stream: {est.problem()}")
    return seal(packed)


def _too_large(packed: bytes, sections: list[list[Any]], limit: int) -> str:
    """The message of a state whose stream a reader would refuse as too large to decode."""
    whole = estimate(packed, 1 << 62).size
    sizes = sorted(((estimate(msgpack.packb(enc, use_bin_type=True), 1 << 62).size, name, iid)
                    for name, iid, enc in sections), reverse=True)
    largest = ", ".join(f"{name} {iid}: {size:,}" for size, name, iid in sizes[:3])
    return (f"the state is too large to save: decoding its stream would take an estimated {whole:,} bytes, "
            f"more than the {limit:,} a reader accepts (MAX_DECODED_SIZE); largest sections: "
            f"{largest}")


def load(data: Any, *, device_type: str, fingerprint: Mapping[str, Any],
         descriptions: Iterable[type] | Mapping[str, type],
         expected: Iterable[tuple[str, int]] | None = None) -> list[Section]:
    """Load a stream into new state objects.

    Nothing is mutated: the result is a list of new frozen state objects, built only
    if the whole stream is valid; the caller applies them to its live objects.

    :param data: the stream.
    :param device_type: this device's type; must equal the stream's.
    :param fingerprint: this device's configuration fingerprint; must equal the
        stream's item by item.
    :param descriptions: the state classes this device understands (or a mapping
        whose values are those classes); a section is decoded with the class whose
        description name equals the section name.
    :param expected: if given, the exact set of ``(name, instance_id)`` the stream
        must contain.
    :returns: the sections, in stream order.
    :raises StreamError: envelope or header problem (:class:`~pcidev.vmstate.errors.ChecksumError` for a
        checksum mismatch).
    :raises ConfigMismatchError: different device type or configuration; the message
        names each differing item.
    :raises VersionError: a description version too new or too old.
    :raises StateError: unknown, duplicate, missing or malformed section (field path
        in the message).
    """
    with gc_paused():
        return _load(data, device_type=device_type, fingerprint=fingerprint, descriptions=descriptions,
                     expected=expected)


def _load(data: Any, *, device_type: str, fingerprint: Mapping[str, Any],
          descriptions: Iterable[type] | Mapping[str, type],
          expected: Iterable[tuple[str, int]] | None) -> list[Section]:
    _, body, _ = open_stream(data)
    dt, fp, secs = _header(body)
    if dt != device_type:
        raise ConfigMismatchError(f"stream is for device type {dt!r}, this device is {device_type!r}")
    diffs = fingerprint_differences(fp, fingerprint)
    if diffs:
        raise ConfigMismatchError("device configuration differs from the stream's: " + "; ".join(diffs),
                                  differences=diffs)
    reg = _registry(descriptions)
    result: list[Section] = []
    seen: set[tuple[str, int]] = set()
    for name, iid, payload in secs:
        if (name, iid) in seen:
            raise StateError("duplicate section", section=name, instance_id=iid)
        seen.add((name, iid))
        cls = reg.get(name)
        if cls is None:
            raise StateError("unknown section: this device has no state description of that name",
                             section=name, instance_id=iid)
        result.append(Section(name, iid, decode_state(payload, cls, section=name, instance_id=iid)))
    if expected is not None:
        want = set(expected)
        missing = sorted(want - seen)
        extra = sorted(seen - want)
        if missing or extra:
            parts = ([f"missing section(s) {', '.join(f'{n!r} instance {i}' for n, i in missing)}"]
                     if missing else []) + (
                [f"unexpected section(s) {', '.join(f'{n!r} instance {i}' for n, i in extra)}"]
                if extra else [])
            first = (missing or extra)[0]
            raise StateError("; ".join(parts), section=first[0], instance_id=first[1])
    return result
