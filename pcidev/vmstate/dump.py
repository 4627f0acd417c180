"""Render a stream as JSON-ready data, without needing the state classes.

The stream carries field names, so it can be shown without the descriptions:
structures become ``{"version", "fields", "subsections"}`` objects, bytes become
``{"hex": "..."}``, fd references ``{"fd": n}``; nulls (absent pointer-array entries
and null values) stay ``null``.  The envelope is fully verified (magic, format
version, length, checksum, header); section payloads are checked for structural
shape only, since field types need the descriptions (:func:`~pcidev.vmstate.load`
does that).
"""

from __future__ import annotations

from typing import Any

from msgpack import ExtType

from pcidev.vmstate.codec import FD_EXT_CODE, _tname
from pcidev.vmstate.errors import StateError, StreamError, render_path
from pcidev.vmstate.stream import _header, open_stream

__all__ = ["dump_stream_json"]

_MAX_DEPTH = 200


def dump_stream_json(data: Any) -> dict[str, Any]:
    """Decode a stream into JSON-serializable data.

    :param data: the stream bytes.
    :returns: ``{"format_version", "size", "checksum", "device_type", "fingerprint",
        "sections": [{"name", "instance_id", "version", "fields", "subsections"}]}``.
    :raises StreamError: on an envelope or header problem (including fingerprint
        values outside the format).
    :raises StateError: when a section payload is not structurally a structure
        (the message names the section and the path).
    """
    fmt, body, crc = open_stream(data)
    dt, fp, secs = _header(body)
    fp_path: list[str | int] = []
    try:
        fingerprint = _value(fp, fp_path)
    except _DumpFail as e:
        raise StreamError(f"header: fingerprint item {render_path(fp_path)!r}: {e.reason}") from None
    sections = []
    for name, iid, payload in secs:
        path: list[str | int] = []
        try:
            st = _struct(payload, path)
        except _DumpFail as e:
            raise StateError(e.reason, section=name, instance_id=iid, path=render_path(path)) from None
        sections.append({"name": name, "instance_id": iid, **st})
    return {
        "format_version": fmt,
        "size": len(data),
        "checksum": f"0x{crc:08x}",
        "device_type": dt,
        "fingerprint": fingerprint,
        "sections": sections,
    }


class _DumpFail(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _is_struct(v: Any) -> bool:
    return (v.__class__ is list and 2 <= len(v) <= 3 and v[0].__class__ is int
            and v[1].__class__ is dict and (len(v) == 2 or (v[2].__class__ is dict and bool(v[2]))))


def _struct(v: Any, path: list[str | int]) -> dict[str, Any]:
    if len(path) > _MAX_DEPTH:
        raise _DumpFail(f"values nest deeper than {_MAX_DEPTH} levels")
    if not _is_struct(v):
        raise _DumpFail(f"expected a structure [version, fields(, subsections)], got {_tname(v)}")
    version, fields = v[0], v[1]
    subs = v[2] if len(v) == 3 else {}
    out_fields = {}
    for k, x in fields.items():
        if k.__class__ is not str:
            raise _DumpFail(f"field name {k!r} is not a str")
        path.append(k)
        out_fields[k] = _value(x, path)
        path.pop()
    out_subs = {}
    for k, x in subs.items():
        if k.__class__ is not str:
            raise _DumpFail(f"subsection name {k!r} is not a str")
        path.append(f"<{k}>")
        out_subs[k] = _struct(x, path)
        path.pop()
    return {"version": version, "fields": out_fields, "subsections": out_subs}


def _value(v: Any, path: list[str | int]) -> Any:
    if len(path) > _MAX_DEPTH:
        raise _DumpFail(f"values nest deeper than {_MAX_DEPTH} levels")
    if v is None or v.__class__ in (bool, int, str):
        return v
    if v.__class__ is bytes:
        return {"hex": v.hex()}
    if v.__class__ is ExtType:
        if v.code == FD_EXT_CODE and len(v.data) == 4:
            return {"fd": int.from_bytes(v.data, "little")}
        raise _DumpFail(f"unknown msgpack extension type {v.code} ({len(v.data)} bytes)")
    if _is_struct(v):
        return _struct(v, path)
    if v.__class__ is list:
        out = []
        for i, x in enumerate(v):
            path.append(i)
            out.append(_value(x, path))
            path.pop()
        return out
    if v.__class__ is dict:
        res = {}
        for k, x in v.items():
            if k.__class__ is not str:
                raise _DumpFail(f"map key {k!r} is not a str")
            path.append(k)
            res[k] = _value(x, path)
            path.pop()
        return res
    raise _DumpFail(f"unexpected {_tname(v)} value")
