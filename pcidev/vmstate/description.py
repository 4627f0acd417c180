"""Declaring state descriptions: the :func:`vmstate` decorator and :func:`vmfield`.

A description is a frozen attrs class plus metadata (name, version, minimum version,
upgrade steps).  Its fields come from the attrs fields and their annotations (see
:mod:`pcidev.vmstate.types`); :func:`vmfield` adds the version a field appeared in.

This module also turns annotations into *kinds*, the small internal type tree the
codec generator (:mod:`pcidev.vmstate.codec`) and the schema dumper
(:mod:`pcidev.vmstate.schema`) both walk.
"""

from __future__ import annotations

import keyword
import re
import sys
import types as _pytypes
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Union

import attrs

from pcidev.errors import ConfigError
from pcidev.vmstate.types import (
    MAX_STR,
    MAX_VARBYTES,
    Check,
    FdRef,
    Length,
    Mask,
    MaxLength,
    Range,
    SInt,
    UInt,
)

__all__ = [
    "vmstate",
    "vmfield",
    "Description",
    "FieldSpec",
    "description_of",
    "is_vmstate",
    "fields_of",
    "Upgrade",
    "Invariant",
]

#: A description's invariant: takes a decoded state object and returns None, or why the
#: state is refused as ``(reason, field path)`` (the path relative to the structure, such
#: as ``"head"`` or ``"queues[2].tail"``).
Invariant = Callable[[Any], "tuple[str, str] | None"]

#: An upgrade step: takes the field map of a stream of version ``v`` (wire values,
#: see docs/vmstate-format.md) and returns the field map of version ``v + 1``.
Upgrade = Callable[[dict[str, Any]], dict[str, Any]]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,255}$")
_SINCE_KEY = "pcidev.vmstate.since"
_MAX_VERSION = 0xFFFF_FFFF


# --------------------------------------------------------------------------- kinds
@attrs.frozen
class KUInt:
    """Unsigned integer kind."""

    bits: int


@attrs.frozen
class KSInt:
    """Signed integer kind."""

    bits: int


@attrs.frozen
class KBool:
    """Boolean kind."""


@attrs.frozen
class KBytes:
    """Bytes kind: ``length`` fixed, or ``length is None`` and at most ``max_length``."""

    length: int | None
    max_length: int


@attrs.frozen
class KStr:
    """UTF-8 text of at most ``max_length`` encoded bytes."""

    max_length: int


@attrs.frozen
class KFd:
    """Out-of-band file descriptor reference."""


@attrs.frozen
class KStruct:
    """Nested description."""

    cls: type


@attrs.frozen
class KArray:
    """Array: ``length`` fixed, or variable up to ``max_length`` (``None``: unbounded)."""

    element: Any
    length: int | None
    max_length: int | None


@attrs.frozen
class KNullable:
    """A value that may be null (an array of pointers when ``inner`` is a KStruct)."""

    inner: Any


@attrs.frozen
class KSub:
    """A subsection: an optional nested description, written only when not None."""

    cls: type


Kind = KUInt | KSInt | KBool | KBytes | KStr | KFd | KStruct | KArray | KNullable | KSub


# ---------------------------------------------------------------------- metadata
@attrs.frozen
class FieldSpec:
    """One field of a description, resolved.

    :ivar name: attribute name, also the key on the wire.
    :ivar alias: the ``__init__`` argument name.
    :ivar kind: the resolved kind.
    :ivar since: description version the field first appeared in.
    :ivar default: the attrs default (a value, an ``attrs.Factory`` or ``attrs.NOTHING``).
    :ivar kw_only: whether ``__init__`` takes the field by keyword only.
    :ivar constraints: what a loaded value must satisfy beyond its type
        (:class:`~pcidev.vmstate.types.Range`, :class:`~pcidev.vmstate.types.Mask`,
        :class:`~pcidev.vmstate.types.Check`), checked by the decoder.
    """

    name: str
    alias: str
    kind: Any
    since: int
    default: Any
    kw_only: bool = False
    constraints: tuple[Any, ...] = ()

    @property
    def has_default(self) -> bool:
        """Whether the field has a default value."""
        return self.default is not attrs.NOTHING

    def default_value(self) -> Any:
        """Produce the default value (calling a factory if needed).

        :raises ConfigError: when the field has no default.
        """
        d = self.default
        if d is attrs.NOTHING:
            raise ConfigError(f"field {self.name!r} has no default")
        # attrs' stub declares Factory a function returning the value (so that
        # ``x: list[int] = Factory(list)`` checks); at run time it is a class.
        if isinstance(d, attrs.Factory):  # type: ignore[arg-type]
            if d.takes_self:
                raise ConfigError(f"field {self.name!r}: Factory(takes_self=True) is not supported")
            return d.factory()
        return d


@attrs.define(eq=False)
class Description:
    """Metadata recorded by :func:`vmstate` on a state class (``cls.__vmstate__``).

    :ivar name: description name; also the section name of a top-level section.
    :ivar version: current version (written on save).
    :ivar min_version: oldest version still loaded.
    :ivar upgrades: ``{v: fn}``: step from version ``v`` to ``v + 1``.
    :ivar cls: the state class.
    :ivar check: the invariant every loaded state object must satisfy (None: none).
    """

    name: str
    version: int
    min_version: int
    upgrades: Mapping[int, Upgrade]
    cls: type
    check: Invariant | None = None
    _localns: dict[str, Any] = attrs.field(factory=dict, repr=False)
    _fields: tuple[FieldSpec, ...] | None = None

    @property
    def fields(self) -> tuple[FieldSpec, ...]:
        """The resolved fields, in declaration order (resolved on first access).

        :raises ConfigError: when an annotation is not a supported field type or
            names something undefined.
        """
        if self._fields is None:
            try:
                self._fields = _resolve_fields(self)
            except NameError as e:
                raise ConfigError(f"{self.name}: cannot resolve a field annotation: {e}") from None
        return self._fields


def is_vmstate(obj: Any) -> bool:
    """Whether ``obj`` is a class decorated with :func:`vmstate`.

    :param obj: anything.
    :returns: True for a state class.
    """
    return isinstance(obj, type) and isinstance(obj.__dict__.get("__vmstate__"), Description)


def description_of(cls: type) -> Description:
    """The :class:`Description` of a state class.

    :param cls: a class decorated with :func:`vmstate`.
    :returns: its description.
    :raises ConfigError: when ``cls`` is not a state class.
    """
    if not is_vmstate(cls):
        raise ConfigError(f"{cls!r} is not a @vmstate class")
    desc: Description = cls.__dict__["__vmstate__"]
    return desc


def fields_of(cls: type) -> tuple[FieldSpec, ...]:
    """The resolved fields of a state class.

    :param cls: a state class.
    :returns: its fields in declaration order.
    :raises ConfigError: on a bad description.
    """
    return description_of(cls).fields


def vmfield(*, default: Any = attrs.NOTHING, factory: Callable[[], Any] | None = None,
            since: int = 1, **kwargs: Any) -> Any:
    """An attrs field with vmstate metadata.

    :param default: default value (needed when ``since`` is above the description's
        ``min_version``, unless an upgrade step supplies the field).
    :param factory: default factory, instead of ``default``.
    :param since: the description version that introduced the field: streams of
        older versions do not contain it and get the default (or an upgrade step's
        value); streams of this version or newer must contain it.
    :param kwargs: passed to :func:`attrs.field` (validators, converters, ...).
    :returns: an attrs field definition.
    """
    metadata = dict(kwargs.pop("metadata", None) or {})
    metadata[_SINCE_KEY] = since
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata, **kwargs)
    return attrs.field(default=default, metadata=metadata, **kwargs)


def _is_frozen(cls: type) -> bool:
    props = getattr(cls, "__attrs_props__", None)
    if props is not None:
        return bool(props.is_frozen)
    return getattr(cls.__setattr__, "__name__", "") == "_frozen_setattrs"


def vmstate(name: str, *, version: int = 1, min_version: int | None = None,
            upgrades: Mapping[int, Upgrade] | None = None,
            check: Invariant | None = None) -> Callable[[type], type]:
    """Class decorator: make a frozen attrs class a versioned state description.

    Apply it on top of ``@attrs.frozen``::

        @vmstate("test/queue", version=2, min_version=1, upgrades={1: add_prio})
        @attrs.frozen
        class QueueState:
            head: U16 = 0
            prio: U8 = vmfield(default=0, since=2)

    :param name: description name (``[A-Za-z0-9_.:/-]``, 1..255 characters); a
        top-level section carries this name.
    :param version: current version, 1..2**32-1.
    :param min_version: oldest version still loaded (default: ``version``).
    :param upgrades: ``{v: fn}`` with ``min_version <= v < version``: ``fn`` turns
        the field map of a version-``v`` stream into a version-``v+1`` field map.
    :param check: an invariant across the fields (:data:`Invariant`): called with every
        state object a load decodes, after each field passed its type and constraints;
        what it returns refuses the stream with a
        :class:`~pcidev.vmstate.errors.StateError` naming the field. Invariants that
        need the device's configuration belong in its ``check_device_state``.
    :returns: the decorator.
    :raises ConfigError: on an inconsistent description.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"vmstate name must match [A-Za-z0-9_.:/-]{{1,255}}, got {name!r}")
    if type(version) is not int or not 1 <= version <= _MAX_VERSION:
        raise ConfigError(f"{name}: version must be an int in 1..2**32-1, got {version!r}")
    if min_version is None:
        min_version = version
    if type(min_version) is not int or not 1 <= min_version <= version:
        raise ConfigError(f"{name}: min_version must be an int in 1..version, got {min_version!r}")
    ups = dict(upgrades or {})
    for v, fn in ups.items():
        if type(v) is not int or not min_version <= v < version:
            raise ConfigError(
                f"{name}: upgrade step keys must be versions in {min_version}..{version - 1} "
                f"(step v -> v+1), got {v!r}")
        if not callable(fn):
            raise ConfigError(f"{name}: upgrade step {v} is not callable")
    if check is not None and not callable(check):
        raise ConfigError(f"{name}: check is not callable")

    # names visible where the class is defined (a function body, for local classes);
    # string annotations are resolved against them as well as the module globals
    caller = sys._getframe(1)
    localns = {} if caller.f_locals is caller.f_globals else dict(caller.f_locals)

    def decorate(cls: type) -> type:
        if not attrs.has(cls):
            raise ConfigError(f"{name}: @vmstate needs an attrs class (put it above @attrs.frozen)")
        if not _is_frozen(cls):
            raise ConfigError(f"{name}: state classes must be frozen (@attrs.frozen)")
        desc = Description(name, version, min_version, ups, cls, check, localns)
        typing.cast(Any, cls).__vmstate__ = desc  # a class attribute no annotation declares
        try:
            desc._fields = _resolve_fields(desc)
        except NameError:
            pass  # forward reference: resolved on first use
        return cls

    return decorate


# ---------------------------------------------------------------------- resolving
def _resolve_fields(desc: Description) -> tuple[FieldSpec, ...]:
    cls = desc.cls
    localns = {**desc._localns, cls.__name__: cls}
    try:
        hints = typing.get_type_hints(cls, localns=localns, include_extras=True)
    except NameError:
        raise
    except Exception as e:  # any failure to evaluate annotations
        raise ConfigError(f"{desc.name}: cannot evaluate annotations: {e}") from e
    specs: list[FieldSpec] = []
    sub_names: dict[str, str] = {}
    for a in attrs.fields(cls):
        where = f"{desc.name}.{a.name}"
        if not a.init:
            raise ConfigError(f"{where}: init=False fields cannot be restored; drop them from the state class")
        if not a.name.isidentifier() or keyword.iskeyword(a.name):
            raise ConfigError(f"{where}: field names must be Python identifiers")
        if a.name.startswith("__"):
            raise ConfigError(f"{where}: field names must not start with '__'")
        tp = hints.get(a.name, a.type)
        if tp is None:
            raise ConfigError(f"{where}: field has no type annotation")
        kind = _kind(tp, where, field_level=True)
        since = a.metadata.get(_SINCE_KEY, 1)
        if type(since) is not int or not 1 <= since <= desc.version:
            raise ConfigError(f"{where}: since must be an int in 1..{desc.version}, got {since!r}")
        if isinstance(kind, KSub):
            if a.default is not None:
                raise ConfigError(f"{where}: a subsection field (Optional[state class]) must default to None")
            if since != 1:
                raise ConfigError(f"{where}: subsections are versioned by their own description; drop since=")
            sub = description_of(kind.cls)
            if sub.name in sub_names:
                raise ConfigError(f"{where}: subsection {sub.name!r} already used by field {sub_names[sub.name]!r}")
            sub_names[sub.name] = a.name
        elif since > desc.min_version and a.default is attrs.NOTHING:
            if not any(u >= since - 1 for u in desc.upgrades):
                raise ConfigError(
                    f"{where}: added in version {since} with no default and no upgrade step "
                    f"that could supply it")
        constraints = _constraints(tp, kind, where)
        specs.append(FieldSpec(a.name, a.alias or a.name, kind, since, a.default, bool(a.kw_only), constraints))
    return tuple(specs)


def _nested_constraint(tp: Any) -> Any:
    """A Range, Mask or Check inside ``tp`` (not at its top level), or None."""
    for arg in typing.get_args(tp):
        if typing.get_origin(arg) is Annotated:
            found = [m for m in typing.get_args(arg)[1:] if isinstance(m, (Range, Mask, Check))]
            if found:
                return found[0]
            arg = typing.get_args(arg)[0]
        if not isinstance(arg, (type, int, str)) or typing.get_args(arg):
            inner = _nested_constraint(arg)
            if inner is not None:
                return inner
    return None


def _constraints(tp: Any, kind: Any, where: str) -> tuple[Any, ...]:
    """The constraint markers of a field's annotation (integer kinds only for Range and Mask).

    :raises ConfigError: a marker nested inside the type (an ``Optional``'s member, an
        array's element), where the decoder would not check it: it must annotate the field
        as a whole (``Annotated[U8 | None, Range(...)]``; an array's elements: a ``Check``
        on the field).
    """
    nested = _nested_constraint(typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp)
    if nested is not None:
        raise ConfigError(f"{where}: {type(nested).__name__} inside the field's type is not checked; annotate the "
                          "field as a whole (Annotated[U8 | None, Range(...)]; for an array's elements, a Check "
                          "on the field)")
    if typing.get_origin(tp) is not Annotated:
        return ()
    found = tuple(m for m in typing.get_args(tp)[1:] if isinstance(m, (Range, Mask, Check)))
    for m in found:
        if isinstance(m, (Range, Mask)):
            inner = kind.inner if isinstance(kind, KNullable) else kind
            if not isinstance(inner, (KUInt, KSInt)):
                raise ConfigError(f"{where}: {type(m).__name__} applies to integer fields only")
        if isinstance(m, Range) and m.lo > m.hi:
            raise ConfigError(f"{where}: empty range {m.lo}..{m.hi}")
        if isinstance(m, Check) and not callable(m.fn):
            raise ConfigError(f"{where}: Check needs a callable")
    return found


def _markers(meta: tuple[Any, ...]) -> list[Any]:
    return [m for m in meta if isinstance(m, (UInt, SInt, Length, MaxLength))]


def _kind(tp: Any, where: str, *, field_level: bool) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        marks = _markers(tuple(meta))
        if not marks:
            return _kind(base, where, field_level=field_level)
        if len(marks) != 1:
            raise ConfigError(f"{where}: conflicting vmstate markers {marks!r}")
        m = marks[0]
        if isinstance(m, (UInt, SInt)):
            if base is not int or m.bits not in (8, 16, 32, 64):
                raise ConfigError(f"{where}: integer markers need int and 8/16/32/64 bits")
            return KUInt(m.bits) if isinstance(m, UInt) else KSInt(m.bits)
        if base is bytes:
            if isinstance(m, Length):
                return KBytes(m.n, m.n)
            return KBytes(None, m.n)
        if base is str:
            if isinstance(m, Length):
                raise ConfigError(f"{where}: text has no fixed length; use Str[max] or Bytes[n]")
            return KStr(m.n)
        if typing.get_origin(base) is tuple:
            elem = _tuple_element(base, where)
            if isinstance(m, Length):
                return KArray(elem, m.n, None)
            return KArray(elem, None, m.n)
        raise ConfigError(f"{where}: marker {m!r} does not apply to {base!r}")
    if tp is bool:
        return KBool()
    if tp is int:
        raise ConfigError(f"{where}: plain int has no width; use U8..U64 or I8..I64")
    if tp is bytes:
        return KBytes(None, MAX_VARBYTES)
    if tp is str:
        return KStr(MAX_STR)
    if tp is FdRef:
        return KFd()
    if is_vmstate(tp):
        return KStruct(tp)
    if origin is tuple:
        return KArray(_tuple_element(tp, where), None, None)
    if origin is Union or origin is _pytypes.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(tp)) != 2:
            raise ConfigError(f"{where}: only Optional[T] unions are supported, got {tp!r}")
        inner = args[0]
        if field_level and is_vmstate(inner):
            return KSub(inner)
        inner_kind = _kind(inner, where, field_level=False)
        if isinstance(inner_kind, KNullable):
            raise ConfigError(f"{where}: nested Optional")
        return KNullable(inner_kind)
    if attrs.has(tp) if isinstance(tp, type) else False:
        raise ConfigError(f"{where}: {tp.__name__} is an attrs class but not a @vmstate description")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _tuple_element(tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if len(args) != 2 or args[1] is not Ellipsis:
        raise ConfigError(f"{where}: arrays are tuple[T, ...] (or Array[T, n] / VarArray[T, n])")
    return _kind(args[0], where + "[]", field_level=False)
