"""Device properties: the one grammar for ``key=value,...`` strings and their values.

A device type declares its properties as an attrs class (its ``CONFIG_CLASS``);
this module turns a QEMU-style property string, or a mapping, into an instance::

    @attrs.define(kw_only=True)
    class EduConfig:
        chunk: Size = attrs.field(default=4096, metadata={"help": "DMA chunk in bytes"})
        engine: bool = attrs.field(default=False, metadata={"help": "run the DMA engine"})

    structure_config(EduConfig, "chunk=8k,engine=on")   # EduConfig(chunk=8192, engine=True)

Property strings
    Items are separated by ``,``; a literal comma inside a value is written ``,,``
    (as in QEMU). Each item is ``key=value``; spaces around the key are ignored
    (an empty key is an error), the value is kept as written. A key given twice
    is an error, except for a list-typed property, where every occurrence adds
    one element. In a mapping, two spellings of the same property (the key, an
    alias or the attribute name) are an error too. Field metadata
    may set the key (``"key": "ns"``, default: the field name), other spellings
    (``"aliases": ("namespace",)``), the help text (``"help"``) and whether
    ``describe`` shows the default in hex (``"hex": True``).

Values (the same rules wherever a property appears: controller properties, namespace specs, backend options)
    ``int``
        decimal (``4096``, leading zeros allowed, still decimal), ``0x`` hex,
        ``0o`` octal or ``0b`` binary, optionally negative, ``_`` ignored, and an
        optional multiplier suffix ``k``/``K``, ``M``, ``G``, ``T`` or ``P`` (below).
    :data:`Size`
        a byte count: the same forms as ``int`` but never negative, and the
        suffix may also be followed by ``B``, ``iB`` or ``ib`` (``64M``, ``64MB``,
        ``64MiB`` and ``0x40M`` are all 64 * 2**20); a bare ``B`` means bytes
        (``4096B``). ``B`` is for sizes only: ``mdts=1B`` is an error. ``0b``
        alone is refused everywhere (a binary prefix without digits, not zero bytes).
    Multiplier suffixes
        **Every suffix is binary: k = 1024**, as QEMU's size properties and as both
        grammars pcidev had before this module; there are no decimal (1000) units.
        Spaces may separate the number from its suffix (``64 M``, ``64 MiB``).
    ``bool``
        ``on``/``off``, ``true``/``false``, ``yes``/``no``, ``y``/``n``, ``1``/``0``
        (any case).
    ``float``
        a finite decimal number (``0.0004``, ``1e-3``).
    ``str``
        the text as written.
    ``list``
        one element per occurrence of the key (strings or mappings; a mapping
        may also give a list or a single element).

Errors
    Anything wrong is one :class:`PropertyError` (a
    :class:`~pcidev.errors.ConfigError`) whose message names the property and
    shows the accepted forms; no other exception escapes :func:`structure_config`
    for any input string or mapping of strings. Validators of the config class
    may raise :class:`~pcidev.errors.ConfigError` themselves; those pass through
    with the device type prefixed.

A field whose metadata names a component kind (``metadata={"component":
"nvme-backend"}``) is not a property: :meth:`pcidev.registry.DeviceRegistry.create`
fills it with the registry's catalogue of that kind.

A config class whose string grammar needs more than ``key=value`` pairs (NVMe's
``ns=`` swallows the options that follow it) defines a classmethod
``collect_properties(pairs) -> dict`` that turns the pairs of
:func:`split_properties` into the mapping to structure.
"""

from __future__ import annotations

import functools
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NewType, TypeVar

import attrs
import cattrs

from pcidev.errors import ConfigError

__all__ = [
    "ACCEPTED",
    "PropertyError",
    "PropertyInfo",
    "Size",
    "collect_pairs",
    "converter",
    "describe_config",
    "describe_value",
    "join_properties",
    "parse_bool",
    "parse_float",
    "parse_int",
    "parse_size",
    "split_device_spec",
    "split_properties",
    "structure_config",
]

#: A byte count (an ``int`` that is never negative); the suffixes are binary.
Size = NewType("Size", int)


class PropertyError(ConfigError):
    """A property is unknown, malformed or has a value of the wrong form.

    :param message: the full one-line message.
    :param name: the property concerned (``""`` when the error is not about one).
    """

    def __init__(self, message: str, *, name: str = "") -> None:
        super().__init__(message)
        self.name = name


#: What each value type accepts, in words (shown in error messages and ``describe``).
ACCEPTED: dict[Any, str] = {
    int: "an integer: decimal, 0x hex, 0o octal or 0b binary, optional k/M/G/T/P suffix (binary, k = 1024)",
    Size: "a byte count: decimal or 0x hex, optional suffix k/M/G/T/P or KiB/MiB/GiB/TiB/PiB (binary, k = 1024)",
    bool: "on/off, true/false, yes/no, y/n or 1/0",
    float: "a finite number such as 0.5 or 1e-3",
    str: "a string",
    list: "one value per occurrence of the key",
}

_NUMBER_RE = re.compile(
    r"([+-]?)(0x[0-9a-f]+|0o[0-7]+|0b[01]+|[0-9]+)\s*(?:([kmgtp])(i?b)?|(b))?",
    re.IGNORECASE,
)
_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50}
_TRUE = frozenset({"on", "true", "yes", "y", "1"})
_FALSE = frozenset({"off", "false", "no", "n", "0"})


def _value_error(name: str, value: Any, kind: Any) -> PropertyError:
    where = f"property {name!r}: " if name else ""
    return PropertyError(f"{where}{value!r} is not valid (expected {ACCEPTED[kind]})", name=name)


def _parse_number(value: Any, name: str, kind: Any) -> int:
    """An int of the forms of ``kind`` (``int``, or :data:`Size` with its ``B``/``iB`` suffixes)."""
    if isinstance(value, bool):
        raise _value_error(name, value, kind)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _NUMBER_RE.fullmatch(value.strip().replace("_", ""))
        if m is not None:
            sign, digits, unit, unit_bytes, bare_bytes = m.groups()
            if (unit_bytes or bare_bytes) and kind is not Size:
                raise _value_error(name, value, kind)
            if bare_bytes and (digits == "0" or digits[:2].lower() in ("0b", "0o")):
                # "0b" is a binary prefix without digits, not zero bytes; "0b1b", "0o7b" read as typos
                raise _value_error(name, value, kind)
            try:
                number = int(digits, 0) if digits[:2].lower() in ("0x", "0o", "0b") else int(digits, 10)
            except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
                raise _value_error(name, value, kind) from None
            if unit:
                number <<= _SHIFT[unit.lower()]
            return -number if sign == "-" else number
    raise _value_error(name, value, kind)


def parse_int(value: Any, name: str = "") -> int:
    """An ``int`` from an int or a property string (see the module docstring).

    :param value: the value.
    :param name: the property, for the error message.
    :returns: the integer.
    :raises PropertyError: not an integer (booleans included).
    """
    return _parse_number(value, name, int)


def parse_size(value: Any, name: str = "") -> int:
    """A byte count from an int or a property string (``4096``, ``64M``, ``0x100000``, ``2GiB``).

    :param value: the value.
    :param name: the property, for the error message.
    :returns: the number of bytes (>= 0).
    :raises PropertyError: not a size, or negative.
    """
    number = _parse_number(value, name, Size)
    if number < 0:
        raise _value_error(name, value, Size)
    return number


def parse_bool(value: Any, name: str = "") -> bool:
    """A ``bool`` from a bool, 0/1 or ``on/off/true/false/yes/no/y/n/1/0`` (any case).

    :param value: the value.
    :param name: the property, for the error message.
    :returns: the boolean.
    :raises PropertyError: anything else.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise _value_error(name, value, bool)


def parse_float(value: Any, name: str = "") -> float:
    """A finite ``float`` from a number or a decimal string.

    :param value: the value.
    :param name: the property, for the error message.
    :returns: the number.
    :raises PropertyError: not a finite number (booleans included).
    """
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            pass
        else:
            if math.isfinite(number):
                return number
    raise _value_error(name, value, float)


def _parse_str(value: Any, name: str = "") -> str:
    if isinstance(value, str):
        return value
    raise _value_error(name, value, str)


def _parse_list(value: Any, name: str = "") -> list[Any]:
    if isinstance(value, (str, Mapping)):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise _value_error(name, value, list)


#: a config class (an attrs class)
ConfigT = TypeVar("ConfigT", bound=attrs.AttrsInstance)

#: parses one property value (a string from the command line, or an already typed value)
_Parser = Callable[[Any, str], object]

#: the parser of each property type (keys are types, and the NewType :data:`Size`)
_PARSERS: dict[object, _Parser] = {
    int: parse_int,
    Size: parse_size,
    bool: parse_bool,
    float: parse_float,
    str: _parse_str,
    list: _parse_list,
}


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for kind, parse in _PARSERS.items():
        conv.register_structure_hook(kind, _structure_hook(parse))
    return conv


def _structure_hook(parse: _Parser) -> Callable[[Any, Any], object]:
    def structure(value: Any, _type: Any) -> object:
        return parse(value, "")
    return structure


#: The cattrs converter with the property hooks (``int``, :data:`Size`, ``bool``,
#: ``float``, ``str``, ``list``); use it to unstructure config classes too.
converter = _make_converter()


def split_properties(text: str) -> list[tuple[str, str]]:
    """Split ``"a=1,b=x,,y"`` into ``[("a", "1"), ("b", "x,y")]`` (``,,`` is a literal comma).

    Empty items are skipped; an item without ``=`` is returned with the key ``""``
    and the whole item as its value.

    :param text: the property string.
    :returns: ``(key, value)`` pairs in order.
    :raises PropertyError: if ``text`` is not a string, or an item's key is empty (``=5``).
    """
    if not isinstance(text, str):
        raise PropertyError(f"a property string was expected, got {type(text).__name__}")
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    out = []
    for item in items:
        if item == "":
            continue
        key, sep, value = item.partition("=")
        if sep and not key.strip():
            raise PropertyError(f"property {item!r} has an empty key (write KEY={value})")
        out.append((key.strip(), value) if sep else ("", item))
    return out


def join_properties(pairs: Iterable[tuple[str, str]]) -> str:
    """The property string of ``(key, value)`` pairs: the inverse of :func:`split_properties`.

    Commas in keys and values are doubled (``,,``); a pair with the key ``""`` is
    written as its value alone (an item without ``=``).

    :param pairs: the pairs, in order.
    :returns: ``"key=value,..."`` that :func:`split_properties` turns back into ``pairs``.
    """
    items = []
    for key, value in pairs:
        escaped = value.replace(",", ",,")
        items.append(f"{key.replace(',', ',,')}={escaped}" if key else escaped)
    return ",".join(items)


def split_device_spec(spec: str) -> tuple[str, str]:
    """Split ``"TYPE[,key=value,...]"`` (a device on a command line) into type and properties.

    :param spec: the device spec.
    :returns: ``(type name, property string)``; the property string may be empty.
    :raises PropertyError: no type name.
    """
    if not isinstance(spec, str):
        raise PropertyError(f"a device spec TYPE[,key=value,...] was expected, got {type(spec).__name__}")
    type_name, _, props = spec.partition(",")
    if not type_name.strip():
        raise PropertyError(f"device spec {spec!r} does not start with a device type (TYPE[,key=value,...])")
    return type_name.strip(), props


# -- describing a config class ------------------------------------------------------------------


@attrs.frozen
class PropertyInfo:
    """One property of a config class, for ``pcidev describe``.

    :param name: the key.
    :param type: the value type's name (``int``, ``size``, ``bool``...).
    :param default: the default, as text (``""`` when the property is required).
    :param help: the help text (``metadata={"help": ...}`` of the attrs field).
    :param aliases: other spellings of the key.
    """

    name: str
    type: str
    default: str
    help: str
    aliases: tuple[str, ...] = ()


@functools.lru_cache(maxsize=256)
def _type_hints(cls: type) -> Mapping[str, Any]:
    # resolving the annotations evaluates their strings: once per class, not per device built
    return types.MappingProxyType(typing.get_type_hints(cls))


def _field_types(cls: type) -> dict[str, Any]:
    try:
        hints = _type_hints(cls)
    except Exception as exc:  # a broken annotation is the config class's bug
        raise ConfigError(f"{cls.__qualname__}: cannot resolve its field types: {exc}") from exc
    return {f.name: hints.get(f.name, Any) for f in attrs.fields(cls)}


def _unwrap(kind: Any) -> tuple[Any, bool]:
    """``(inner type, None allowed)`` of ``X | None``; list types become ``list``."""
    optional = False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = len(args) < len(typing.get_args(kind))
        kind = args[0] if len(args) == 1 else Any
    if typing.get_origin(kind) is list:
        kind = list
    return kind, optional


def _type_name(kind: Any) -> str:
    inner, optional = _unwrap(kind)
    names = {int: "int", Size: "size", bool: "bool", float: "float", str: "str", list: "list"}
    text = names.get(inner, getattr(inner, "__name__", str(inner)))
    return text + (" (optional)" if optional else "")


def describe_value(kind: Any) -> str:
    """What a value of the field type ``kind`` may look like, in words.

    :param kind: a field type (``int``, :data:`Size`, ``bool | None``...).
    :returns: the accepted forms (from :data:`ACCEPTED`), or ``"a value of type X"``.
    """
    inner, _optional = _unwrap(kind)
    return ACCEPTED.get(inner, f"a value of type {_type_name(inner)}")


def _size_text(value: int) -> str:
    for unit, shift in (("P", 50), ("T", 40), ("G", 30), ("M", 20), ("k", 10)):
        if value and not value % (1 << shift):
            return f"{value >> shift}{unit}"
    return str(value)


def _default_text(field: attrs.Attribute[Any], kind: Any = None) -> str:
    default: Any = field.default  # of any property type, an attrs.Factory or attrs.NOTHING
    if default is attrs.NOTHING:
        return ""
    # attrs' stub declares Factory a function returning the value; at run time it is a class.
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory() if not default.takes_self else None
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return "none"
    if isinstance(default, list):
        return "none" if not default else ",".join(map(str, default))
    if isinstance(default, int) and field.metadata.get("hex"):
        return f"{default:#x}"
    if isinstance(default, int) and kind is Size:
        return _size_text(default)
    return str(default)


def describe_config(cls: type) -> list[PropertyInfo]:
    """Every property of a config class, in declaration order.

    :param cls: an attrs class.
    :returns: one :class:`PropertyInfo` per field.
    :raises ConfigError: ``cls`` is not an attrs class.
    """
    if not attrs.has(cls):
        raise ConfigError(f"{cls!r} is not an attrs class")
    kinds = _field_types(cls)
    out = []
    for f in attrs.fields(cls):
        if not f.init or "component" in f.metadata:
            continue
        out.append(PropertyInfo(
            name=str(f.metadata.get("key", f.name)),
            type=_type_name(kinds[f.name]),
            default=_default_text(f, _unwrap(kinds[f.name])[0]),
            help=str(f.metadata.get("help", "")),
            aliases=tuple(f.metadata.get("aliases", ())),
        ))
    return out


# -- structuring ----------------------------------------------------------------------------


def _spellings(cls: type) -> dict[str, str]:
    """Every key and alias of the fields of ``cls`` (metadata ``key``/``aliases``) to the field name."""
    out = {}
    for f in attrs.fields(cls):
        for alias in (f.metadata.get("key", f.name), *f.metadata.get("aliases", ())):
            out[alias] = f.name
    return out


def _known_keys(fields: Mapping[str, attrs.Attribute[Any]]) -> str:
    """The keys users type for ``fields`` (metadata ``key`` and ``aliases``), for an error message."""
    return ", ".join(spelling for f in fields.values()
                     for spelling in (f.metadata.get("key", f.name), *f.metadata.get("aliases", ())))


def _from_mapping(cls: type, props: Mapping[Any, Any]) -> dict[Any, Any]:
    """``props`` with every spelling turned into the field name; two spellings of one field are an error."""
    spelled = _spellings(cls)
    data: dict[Any, Any] = {}
    given: dict[Any, Any] = {}
    for key, value in props.items():
        name = spelled.get(key, key)
        if name in data:
            raise PropertyError(f"property {key!r} given twice (also as {given[name]!r})", name=str(key))
        data[name] = value
        given[name] = key
    return data


def collect_pairs(cls: type, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """The default ``collect_properties`` of a config class: keys (or aliases) to field
    names and values; a list field accumulates its repeated key, any other key may
    appear once.

    :param cls: the attrs config class.
    :param pairs: ``(key, value)`` pairs as :func:`split_properties` returns them.
    :returns: field name -> value (a list for list fields).
    :raises PropertyError: a key without ``=value`` or given twice.
    """
    kinds = _field_types(cls)
    aliases = _spellings(cls)
    data: dict[str, Any] = {}
    for key, value in pairs:
        if not key:
            raise PropertyError(f"property {value!r} has no '=value' (write {value}=VALUE)", name=value)
        name = aliases.get(key, key)
        if _unwrap(kinds.get(name, Any))[0] is list:
            data.setdefault(name, []).append(value)
            continue
        if name in data:
            raise PropertyError(f"property {key!r} given twice", name=key)
        data[name] = value
    return data


def structure_config(cls: type[ConfigT], props: ConfigT | str | Mapping[str, Any] | None, *,
                     what: str = "") -> ConfigT:
    """Build an instance of the attrs class ``cls`` from a property string or mapping.

    :param cls: the config class (an attrs class whose fields all have defaults
        or are given).
    :param props: ``"key=value,..."`` (see the module docstring), a mapping of
        property names to values (strings, or values of the field types), an
        instance of ``cls`` (returned as is), or ``None`` (all defaults).
    :param what: prefix for error messages (the device type, ``"nvme"``).
    :returns: the instance.
    :raises PropertyError: unknown key, malformed item, a value of the wrong form.
    :raises ConfigError: a validator of ``cls`` refused a value.
    """
    prefix = f"{what}: " if what else ""
    if isinstance(props, cls):
        return props
    try:
        if props is None:
            data: Mapping[str, Any] = {}
        elif isinstance(props, str):
            pairs = split_properties(props)
            collect = getattr(cls, "collect_properties", None)
            data = collect(pairs) if collect is not None else collect_pairs(cls, pairs)
        elif isinstance(props, Mapping):
            data = _from_mapping(cls, props)
        else:
            raise PropertyError(f"properties must be a string or a mapping, not {type(props).__name__}")
        kinds = _field_types(cls)
        fields = {f.name: f for f in attrs.fields(cls) if f.init and "component" not in f.metadata}
        unknown = sorted(str(k) for k in data if k not in fields)
        if unknown:
            raise PropertyError(
                f"unknown propert{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)} "
                f"(known: {_known_keys(fields)})", name=unknown[0])
        missing = [name for name, f in fields.items()
                   if f.default is attrs.NOTHING and name not in data]
        if missing:
            key = str(fields[missing[0]].metadata.get("key", missing[0]))
            raise PropertyError(f"missing property {key}=... ({describe_value(kinds[missing[0]])})", name=key)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            inner, optional = _unwrap(kinds[key])
            if value is None and optional:
                kwargs[key] = None
                continue
            parse = _PARSERS.get(inner)
            if parse is not None:
                kwargs[key] = parse(value, key)
            else:
                try:
                    kwargs[key] = converter.structure(value, inner)
                except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
                    raise PropertyError(f"property {key!r}: {value!r} is not valid ({exc})",
                                        name=key) from None
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc
    except PropertyError as exc:
        raise PropertyError(f"{prefix}{exc}", name=exc.name) from None
    except ConfigError as exc:
        if prefix and not str(exc).startswith(prefix):
            raise ConfigError(f"{prefix}{exc}") from None
        raise
