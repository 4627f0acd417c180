"""Generated encoders and decoders between state objects and wire values.

For every description the first save or load generates (and caches) two plain
Python functions with every check inlined: ``encode(obj) -> wire`` and
``decode(wire) -> obj``.  *Wire values* are what msgpack carries: ``int``, ``bool``,
``bytes``, ``str``, ``None``, ``list``, ``dict`` and ``msgpack.ExtType`` (see
docs/vmstate-format.md for the mapping).  A structure's wire value is the list
``[version, {field: value}]``, with a third element ``{subsection name: structure}``
only when at least one subsection is written.

Why not cattrs' own generated hooks: on the benchmark state (examples/bench_vmstate.py)
a cattrs converter doing the same per-field checks (range and length hooks,
``forbid_extra_keys``, detailed validation) took about 25% longer for save+load
than this module does, although it skips the version handling, the envelope and the
checksum that this module also does. Its errors are also harder to turn into
paths. So the hot path is generated here.

Errors are raised as the internal ``_Fail`` with the field path collected on the
way out (try blocks are free on the success path); :mod:`pcidev.vmstate.stream`
turns them into public :class:`~pcidev.errors.VMStateError` subclasses.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import attrs
from msgpack import ExtType

from pcidev.errors import ConfigError
from pcidev.vmstate.description import (
    Description,
    KArray,
    KBool,
    KBytes,
    KFd,
    KNullable,
    KSInt,
    KStr,
    KStruct,
    KSub,
    KUInt,
    description_of,
    is_vmstate,
)
from pcidev.vmstate.errors import StateError, VersionError, VMStateError, _Fail, render_path
from pcidev.vmstate.types import FdRef

__all__ = ["Codec", "codec_for", "encode_state", "decode_state", "check_state", "FD_EXT_CODE"]

#: msgpack extension type code of an :class:`~pcidev.vmstate.types.FdRef`.
FD_EXT_CODE = 1

_U32 = struct.Struct("<I")


# ------------------------------------------------------------- runtime helpers
def _tname(v: Any) -> str:
    if v is None:
        return "nil"
    if isinstance(v, ExtType):
        return f"extension type {v.code}"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(v, str):
        return "str"
    if isinstance(v, (list, tuple)):
        return "array"
    if isinstance(v, dict):
        return "map"
    return type(v).__name__


def _expected(what: str, v: Any) -> str:
    return f"expected {what}, got {_tname(v)}"


def _int_fail(v: Any, lo: int, hi: int, label: str) -> Any:
    """Slow path of an integer check on the wire: always raises."""
    if v.__class__ is not int:
        raise _Fail(_expected(f"{label} (int)", v))
    raise _Fail(f"value {v} out of range for {label} ({lo}..{hi})")


def _enc_int(v: Any, lo: int, hi: int, label: str) -> int:
    """Slow path of an integer check on save: accepts int subclasses (enums), not bool."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Fail(_expected(f"{label} (int)", v))
    n = int(v)
    if not lo <= n <= hi:
        raise _Fail(f"value {n} out of range for {label} ({lo}..{hi})")
    return n


def _len_text(lo: int, hi: int) -> str:
    return f"exactly {lo}" if lo == hi else f"at most {hi}"


def _bytes_fail(v: Any, lo: int, hi: int) -> Any:
    if v.__class__ is not bytes:
        raise _Fail(_expected("bytes", v))
    raise _Fail(f"{len(v)} bytes, expected {_len_text(lo, hi)}")


def _enc_bytes(v: Any, lo: int, hi: int) -> bytes:
    if isinstance(v, (bytearray, memoryview)):
        try:
            v = bytes(v)
        except (TypeError, ValueError) as e:
            raise _Fail(f"cannot convert to bytes: {e}") from None
    if v.__class__ is not bytes:
        raise _Fail(_expected("bytes", v))
    if not lo <= len(v) <= hi:
        raise _Fail(f"{len(v)} bytes, expected {_len_text(lo, hi)}")
    return v


def _str_check(v: Any, hi: int) -> str:
    if v.__class__ is not str:
        raise _Fail(_expected("str", v))
    if len(v) * 4 > hi or not v.isascii():
        try:
            n = len(v.encode("utf-8"))
        except UnicodeEncodeError:
            raise _Fail("text is not encodable as UTF-8 (lone surrogate)") from None
        if n > hi:
            raise _Fail(f"text of {n} UTF-8 bytes, expected at most {hi}")
    return v


def _enc_fd(v: Any) -> ExtType:
    if v.__class__ is not FdRef:
        raise _Fail(_expected("FdRef", v))
    i = v.index
    if i.__class__ is not int or not 0 <= i <= 0xFFFF_FFFF:
        raise _Fail(f"FdRef index {i!r} out of range (0..2**32-1)")
    return ExtType(FD_EXT_CODE, _U32.pack(i))


def _dec_fd(v: Any) -> FdRef:
    if v.__class__ is not ExtType or v.code != FD_EXT_CODE or len(v.data) != 4:
        if v.__class__ is ExtType and v.code == FD_EXT_CODE:
            raise _Fail(f"fd reference must carry 4 bytes, got {len(v.data)}")
        raise _Fail(_expected("an fd reference (extension type 1)", v))
    return FdRef(_U32.unpack(v.data)[0])


def _array_fail(v: Any, lo: int | None, hi: int | None, wire: bool) -> Any:
    if wire:
        if v.__class__ is not list:
            raise _Fail(_expected("array", v))
    elif v.__class__ is not tuple and v.__class__ is not list:
        raise _Fail(_expected("a tuple", v))
    if lo is not None:
        raise _Fail(f"{len(v)} elements, expected exactly {lo}")
    raise _Fail(f"{len(v)} elements, expected at most {hi}")


def _locate(fn: Callable[[Any], Any], seq: Any) -> None:
    """Re-run ``fn`` over ``seq`` to find the failing index (error path only)."""
    for i, x in enumerate(seq):
        try:
            fn(x)
        except _Fail as e:
            e.path.append(i)
            raise


def _locate_nullable(fn: Callable[[Any], Any], seq: Any) -> None:
    for i, x in enumerate(seq):
        if x is not None:
            try:
                fn(x)
            except _Fail as e:
                e.path.append(i)
                raise


def _struct_fail(name: str, w: Any) -> Any:
    if w.__class__ is list:
        raise _Fail(f"structure {name!r} must be [version, fields(, subsections)], "
                    f"got an array of {len(w)}")
    raise _Fail(_expected(f"structure {name!r} ([version, fields(, subsections)])", w))


def _subs_fail(name: str, s: Any) -> Any:
    if s.__class__ is not dict:
        raise _Fail(_expected(f"a map of subsections of {name!r}", s))
    raise _Fail(f"empty subsection map in {name!r} (writers omit it)")


def _not_state(name: str, cls: type, o: Any) -> Any:
    raise _Fail(f"expected a {cls.__name__} state object ({name!r}), got {type(o).__name__}")


def _bad_keys(name: str, version: int, f: dict[str, Any], keys: frozenset[str]) -> Any:
    missing = [k for k in keys if k not in f]
    extra = [k for k in f if k not in keys]
    if not missing and not extra:  # pragma: no cover - defensive: a lookup failed for another reason
        raise _Fail(f"inconsistent field map for {name!r} version {version}")
    parts = []
    if extra:
        parts.append("unknown field(s) " + ", ".join(repr(k) for k in extra))
    if missing:
        parts.append("missing field(s) " + ", ".join(repr(k) for k in sorted(missing)))
    err = _Fail("; ".join(parts) + f" for {name!r} version {version}")
    first = extra[0] if extra else sorted(missing)[0]
    err.path.append(first if isinstance(first, str) else repr(first))
    raise err


def _constrained(constraints: tuple[Any, ...], v: Any) -> None:
    """Apply a field's constraints to its decoded value (raises the internal ``_Fail``)."""
    for c in constraints:
        try:
            why = c.problem(v)
        except Exception as e:  # a Check's user code; reported with context
            why = f"check failed: {type(e).__name__}: {e}"
        if why is not None:
            raise _Fail(str(why))


def _invariant(name: str, check: Callable[[Any], Any], obj: Any) -> Any:
    """Apply a description's invariant to a decoded object; returns it."""
    try:
        problem = check(obj)
    except Exception as e:  # user code; reported with context
        raise _Fail(f"invariant of {name!r} failed: {type(e).__name__}: {e}") from None
    if problem is None:
        return obj
    reason, path = problem
    err = _Fail(str(reason))
    if path:
        err.path.append(str(path))
    raise err


def _construct_fail(name: str, e: Exception) -> Any:
    raise _Fail(f"state class of {name!r} rejected the values: {type(e).__name__}: {e}")


# --------------------------------------------------------------------- codecs
@attrs.define(eq=False)
class Codec:
    """The generated functions for one description.

    :ivar encode: state object -> wire value (raises the internal ``_Fail``).
    :ivar decode: wire value -> new state object (raises the internal ``_Fail``).
    :ivar encode_field: per field name, value -> wire value (for defaults).
    :ivar source: the generated source, for debugging.
    """

    desc: Description
    encode: Callable[[Any], Any] = attrs.field(default=None)
    decode: Callable[[Any], Any] = attrs.field(default=None)
    encode_field: dict[str, Callable[[Any], Any]] = attrs.field(factory=dict)
    source: str = ""


_CODECS: dict[type, Codec] = {}


def codec_for(cls: type) -> Codec:
    """The (cached) codec of a state class, generating it on first use.

    :param cls: a state class.
    :returns: its codec.
    :raises ConfigError: on a bad description, including a description that
        contains itself (directly or through other descriptions).
    """
    c = _CODECS.get(cls)
    if c is not None:
        return c
    order: list[type] = []
    _collect(cls, order, [])
    for k in order:
        if k not in _CODECS:
            _CODECS[k] = _Generator(description_of(k)).build()
    return _CODECS[cls]


def _children(kind: Any) -> list[type]:
    if isinstance(kind, (KStruct, KSub)):
        return [kind.cls]
    if isinstance(kind, KArray):
        return _children(kind.element)
    if isinstance(kind, KNullable):
        return _children(kind.inner)
    return []


def _collect(cls: type, order: list[type], stack: list[type]) -> None:
    if cls in order:
        return
    if cls in stack:
        chain = " -> ".join(description_of(c).name for c in [*stack, cls])
        raise ConfigError(f"recursive state description: {chain}")
    desc = description_of(cls)
    stack.append(cls)
    for spec in desc.fields:
        for child in _children(spec.kind):
            _collect(child, order, stack)
    stack.pop()
    order.append(cls)


class _Generator:
    """Writes the source of one description's encoder and decoder."""

    def __init__(self, desc: Description) -> None:
        self.desc = desc
        self.ns: dict[str, Any] = {
            "_Fail": _Fail,
            "_expected": _expected,
            "_int_fail": _int_fail,
            "_enc_int": _enc_int,
            "_bytes_fail": _bytes_fail,
            "_enc_bytes": _enc_bytes,
            "_str_check": _str_check,
            "_enc_fd": _enc_fd,
            "_dec_fd": _dec_fd,
            "_array_fail": _array_fail,
            "_locate": _locate,
            "_locate_nullable": _locate_nullable,
            "_struct_fail": _struct_fail,
            "_not_state": _not_state,
            "_subs_fail": _subs_fail,
            "_bad_keys": _bad_keys,
            "_construct_fail": _construct_fail,
            "_constrained": _constrained,
            "_invariant": _invariant,
        }
        self.helpers: list[str] = []
        self.counter = 0

    # -- namespace
    def const(self, value: Any, hint: str = "c") -> str:
        self.counter += 1
        name = f"_{hint}{self.counter}"
        self.ns[name] = value
        return name

    # -- snippets: transform the local ``v`` in place (a list of source lines)
    def enc(self, kind: Any) -> list[str]:
        if isinstance(kind, (KUInt, KSInt)):
            lo, hi, label = _int_range(kind)
            return [f"if v.__class__ is not int or v < {lo} or v > {hi}: "
                    f"v = _enc_int(v, {lo}, {hi}, {label!r})"]
        if isinstance(kind, KBool):
            return ["if v.__class__ is not bool: raise _Fail(_expected('bool', v))"]
        if isinstance(kind, KBytes):
            lo = kind.length if kind.length is not None else 0
            cond = f"len(v) != {lo}" if kind.length is not None else f"len(v) > {kind.max_length}"
            return [f"if v.__class__ is not bytes or {cond}: v = _enc_bytes(v, {lo}, {kind.max_length})"]
        if isinstance(kind, KStr):
            return [f"v = _str_check(v, {kind.max_length})"]
        if isinstance(kind, KFd):
            return ["v = _enc_fd(v)"]
        if isinstance(kind, KStruct):
            fn = self.const(codec_for(kind.cls), "codec")
            return [f"v = {fn}.encode(v)"]
        if isinstance(kind, KNullable):
            return ["if v is not None:"] + ["    " + s for s in self.enc(kind.inner)]
        if isinstance(kind, KArray):
            return [f"v = {self.array_helper(kind, encode=True)}(v)"]
        raise ConfigError(f"unsupported kind {kind!r}")  # pragma: no cover

    def dec(self, kind: Any) -> list[str]:
        if isinstance(kind, (KUInt, KSInt)):
            lo, hi, label = _int_range(kind)
            return [f"if v.__class__ is not int or v < {lo} or v > {hi}: "
                    f"_int_fail(v, {lo}, {hi}, {label!r})"]
        if isinstance(kind, KBool):
            return ["if v.__class__ is not bool: raise _Fail(_expected('bool', v))"]
        if isinstance(kind, KBytes):
            lo = kind.length if kind.length is not None else 0
            cond = f"len(v) != {lo}" if kind.length is not None else f"len(v) > {kind.max_length}"
            return [f"if v.__class__ is not bytes or {cond}: _bytes_fail(v, {lo}, {kind.max_length})"]
        if isinstance(kind, KStr):
            return [f"v = _str_check(v, {kind.max_length})"]
        if isinstance(kind, KFd):
            return ["v = _dec_fd(v)"]
        if isinstance(kind, KStruct):
            fn = self.const(codec_for(kind.cls), "codec")
            return [f"v = {fn}.decode(v)"]
        if isinstance(kind, KNullable):
            return ["if v is not None:"] + ["    " + s for s in self.dec(kind.inner)]
        if isinstance(kind, KArray):
            return [f"v = {self.array_helper(kind, encode=False)}(v)"]
        raise ConfigError(f"unsupported kind {kind!r}")  # pragma: no cover

    def element_fn(self, kind: Any, encode: bool) -> tuple[str, bool]:
        """A function name converting one element, and whether nulls are skipped
        around it (pointer arrays call the structure codec directly)."""
        if isinstance(kind, KStruct):
            c = self.const(codec_for(kind.cls), "codec")
            return f"{c}.{'encode' if encode else 'decode'}", False
        if isinstance(kind, KNullable) and isinstance(kind.inner, KStruct):
            c = self.const(codec_for(kind.inner.cls), "codec")
            return f"{c}.{'encode' if encode else 'decode'}", True
        self.counter += 1
        name = f"_elem{self.counter}"
        body = self.enc(kind) if encode else self.dec(kind)
        self.helpers.append("\n".join([f"def {name}(v):", *("    " + s for s in body), "    return v"]))
        return name, False

    def array_helper(self, kind: KArray, encode: bool) -> str:
        fn, nullable = self.element_fn(kind.element, encode)
        self.counter += 1
        name = f"_arr{self.counter}"
        if encode:
            type_ok = "(v.__class__ is tuple or v.__class__ is list)"
        else:
            type_ok = "v.__class__ is list"
        if kind.length is not None:
            len_bad = f"len(v) != {kind.length}"
        elif kind.max_length is not None:
            len_bad = f"len(v) > {kind.max_length}"
        else:
            len_bad = "False"
        if nullable:
            comp = f"[x if x is None else {fn}(x) for x in v]"
            result = comp if encode else f"tuple({comp})"
            locate = "_locate_nullable"
        else:
            result = f"list(map({fn}, v))" if encode else f"tuple(map({fn}, v))"
            locate = "_locate"
        lines = [
            f"def {name}(v):",
            f"    if not {type_ok} or {len_bad}:",
            f"        _array_fail(v, {kind.length!r}, {kind.max_length!r}, {not encode})",
            "    try:",
            f"        return {result}",
            "    except _Fail:",
            f"        {locate}({fn}, v)",
            "        raise",
        ]
        self.helpers.append("\n".join(lines))
        return name

    # -- whole functions
    def build(self) -> Codec:
        desc = self.desc
        fields = [s for s in desc.fields if not isinstance(s.kind, KSub)]
        subs = [s for s in desc.fields if isinstance(s.kind, KSub)]
        codec = Codec(desc)
        self.ns["_cls"] = desc.cls
        self.ns["_name"] = desc.name
        self.ns["_keys"] = frozenset(s.name for s in fields)
        self.ns["_older"] = _make_older(desc, codec)
        self.ns["_sub_index"] = {description_of(s.kind.cls).name: i for i, s in enumerate(subs)}
        self.ns["_sub_field"] = [s.name for s in subs]
        self.ns["_sub_codec"] = [codec_for(s.kind.cls) for s in subs]

        out: list[str] = []
        # encoder
        out.append("def encode(o):")
        out.append("    if o.__class__ is not _cls: _not_state(_name, _cls, o)")
        locs = []
        for i, s in enumerate(fields):
            loc = f"a{i}"
            locs.append((s, loc))
            out.append(f"    v = o.{s.name}")
            out.append("    try:")
            out.extend("        " + line for line in self.enc(s.kind))
            out.append("    except _Fail as e:")
            out.append(f"        e.path.append({s.name!r}); raise")
            out.append(f"    {loc} = v")
        if subs:
            out.append("    subs = {}")
        for i, s in enumerate(subs):
            sub_name = description_of(s.kind.cls).name
            out.append(f"    v = o.{s.name}")
            out.append("    if v is not None:")
            out.append("        try:")
            out.append(f"            subs[{sub_name!r}] = _sub_codec[{i}].encode(v)")
            out.append("        except _Fail as e:")
            out.append(f"            e.path.append({s.name!r}); raise")
        body = ", ".join(f"{s.name!r}: {loc}" for s, loc in locs)
        if subs:
            out.append(f"    if subs: return [{desc.version}, {{{body}}}, subs]")
        out.append(f"    return [{desc.version}, {{{body}}}]")
        out.append("")
        # decoder
        out.append("def decode(w):")
        out.append("    if w.__class__ is not list or not 2 <= len(w) <= 3: _struct_fail(_name, w)")
        out.append("    if len(w) == 2:")
        out.append("        ver, f = w")
        out.append("        s = None")
        out.append("    else:")
        out.append("        ver, f, s = w")
        out.append("        if s.__class__ is not dict or not s: _subs_fail(_name, s)")
        out.append(f"    if ver.__class__ is not int or ver != {desc.version}: f = _older(ver, f)")
        out.append("    elif f.__class__ is not dict: raise _Fail(_expected('a map of fields', f))")
        # len + KeyError is an exact key-set check: n distinct expected keys present
        out.append(f"    if len(f) != {len(fields)}: _bad_keys(_name, {desc.version}, f, _keys)")
        out.append("    try:")
        for i, s in enumerate(fields):
            out.append(f"        v = f[{s.name!r}]")
            out.append("        try:")
            out.extend("            " + line for line in self.dec(s.kind))
            if s.constraints:
                out.append(f"            _constrained({self.const(s.constraints, 'cons')}, v)")
            out.append("        except _Fail as e:")
            out.append(f"            e.path.append({s.name!r}); raise")
            out.append(f"        a{i} = v")
        out.append("    except KeyError:")
        out.append(f"        _bad_keys(_name, {desc.version}, f, _keys)")
        if subs:
            out.append(f"    b = [None] * {len(subs)}")
            out.append("    if s:")
            out.append("        for k, x in s.items():")
            out.append("            j = _sub_index.get(k)")
            out.append("            if j is None:")
            out.append("                raise _Fail(f'unknown subsection {k!r} in {_name!r}')")
            out.append("            try:")
            out.append("                b[j] = _sub_codec[j].decode(x)")
            out.append("            except _Fail as e:")
            out.append("                e.path.append(_sub_field[j]); raise")
        else:
            out.append("    if s:")
            out.append("        k = next(iter(s))")
            out.append("        raise _Fail(f'unknown subsection {k!r} in {_name!r}')")
        args = []
        fi = si = 0
        for spec in desc.fields:
            if isinstance(spec.kind, KSub):
                expr = f"b[{si}]"
                si += 1
            else:
                expr = f"a{fi}"
                fi += 1
            args.append(f"{spec.alias}={expr}" if spec.kw_only else expr)
        out.append("    try:")
        out.append(f"        obj = _cls({', '.join(args)})")
        out.append("    except Exception as e:")
        out.append("        _construct_fail(_name, e)")
        if desc.check is not None:
            out.append(f"    return _invariant(_name, {self.const(desc.check, 'check')}, obj)")
        else:
            out.append("    return obj")
        out.append("")
        # per-field encoders, used to fill defaults of fields newer than a stream
        for i, s in enumerate(fields):
            out.append(f"def fenc{i}(v):")
            out.extend("    " + line for line in self.enc(s.kind))
            out.append("    return v")
            out.append("")

        source = "\n\n".join(self.helpers) + "\n\n" + "\n".join(out)
        filename = f"<vmstate codec {desc.name}>"
        exec(compile(source, filename, "exec"), self.ns)  # generated from the description, no outside text
        codec.encode = self.ns["encode"]
        codec.decode = self.ns["decode"]
        codec.encode_field = {s.name: self.ns[f"fenc{i}"] for i, s in enumerate(fields)}
        codec.source = source
        return codec


def _int_range(kind: Any) -> tuple[int, int, str]:
    if isinstance(kind, KUInt):
        return 0, (1 << kind.bits) - 1, f"u{kind.bits}"
    return -(1 << (kind.bits - 1)), (1 << (kind.bits - 1)) - 1, f"i{kind.bits}"


def _make_older(desc: Description, codec: Codec) -> Callable[[Any, Any], dict[str, Any]]:
    """The slow path of a decoder: a stream version other than the current one."""
    name, version, min_version = desc.name, desc.version, desc.min_version
    newer = [s for s in desc.fields if not isinstance(s.kind, KSub) and s.since > min_version]
    upgrades = sorted(desc.upgrades.items())

    def older(ver: Any, f: Any) -> dict[str, Any]:
        if ver.__class__ is not int:
            raise _Fail(f"version of {name!r} must be an integer, got {_tname(ver)}")
        if ver > version:
            raise _Fail(f"{name!r}: incoming version {ver} is too new for local version {version}",
                        VersionError)
        if ver < min_version:
            raise _Fail(f"{name!r}: incoming version {ver} is too old for local minimum version "
                        f"{min_version}", VersionError)
        if f.__class__ is not dict:
            raise _Fail(_expected("a map of fields", f))
        for s in newer:
            if s.since > ver and s.name in f:
                err = _Fail(f"field exists only since version {s.since} of {name!r}, "
                            f"but the stream has version {ver}")
                err.path.append(s.name)
                raise err
        for frm, step in upgrades:
            if frm < ver:
                continue
            try:
                f = step(f)
            except VMStateError as e:
                raise _Fail(f"upgrade of {name!r} from version {frm} to {frm + 1} failed: {e.reason}",
                            type(e)) from None
            except Exception as e:  # user code; reported with context
                raise _Fail(f"upgrade of {name!r} from version {frm} to {frm + 1} failed: "
                            f"{type(e).__name__}: {e}") from None
            if f.__class__ is not dict:
                raise _Fail(f"upgrade of {name!r} from version {frm} to {frm + 1} returned "
                            f"{type(f).__name__}, not a dict")
        for s in newer:
            if s.since > ver and s.name not in f and s.has_default:
                try:
                    f[s.name] = codec.encode_field[s.name](s.default_value())
                except _Fail as e:
                    e.reason = f"default value does not fit the field: {e.reason}"
                    e.path.append(s.name)
                    raise
        return f

    return older


# ------------------------------------------------------------------ entry points
def _public(e: _Fail, section: str | None, instance_id: int | None) -> VMStateError:
    return e.kind(e.reason, section=section, instance_id=instance_id,
                  path=render_path(list(reversed(e.path))))


def encode_state(obj: Any, *, section: str | None = None, instance_id: int | None = None) -> Any:
    """Encode a state object to its wire value.

    :param obj: an instance of a state class.
    :param section: section name for error messages.
    :param instance_id: instance id for error messages.
    :returns: the wire value (``[version, fields]`` or ``[version, fields, subsections]``).
    :raises StateError: when a value does not fit its field (path in the message).
    :raises ConfigError: when ``obj``'s class is not a valid description.
    """
    if not is_vmstate(type(obj)):
        raise StateError(f"expected a @vmstate state object, got {type(obj).__name__}",
                         section=section, instance_id=instance_id)
    try:
        return codec_for(type(obj)).encode(obj)
    except _Fail as e:
        raise _public(e, section, instance_id) from None


def decode_state(wire: Any, cls: type, *, section: str | None = None,
                 instance_id: int | None = None) -> Any:
    """Decode a wire value into a new state object of ``cls``.

    :param wire: the wire value.
    :param cls: the state class expected.
    :param section: section name for error messages.
    :param instance_id: instance id for error messages.
    :returns: a new state object.
    :raises VMStateError: (a :class:`~pcidev.vmstate.errors.StateError` or
        :class:`~pcidev.vmstate.errors.VersionError`) naming the field path.
    """
    try:
        return codec_for(cls).decode(wire)
    except _Fail as e:
        raise _public(e, section, instance_id) from None



def check_state(obj: Any, *, section: str | None = None, instance_id: int | None = None) -> None:
    """Check a state object held in memory (a same-process snapshot) exactly as a load of
    it from a stream would: every field's type, range and constraints, and every
    description's invariant, nested structures included.

    :param obj: an instance of a state class.
    :param section: section name for error messages.
    :param instance_id: instance id for error messages.
    :raises VMStateError: (a :class:`~pcidev.vmstate.errors.StateError`) naming the field.
    """
    decode_state(encode_state(obj, section=section, instance_id=instance_id), type(obj),
                 section=section, instance_id=instance_id)
