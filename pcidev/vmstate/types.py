"""Field types for vmstate descriptions.

A state class annotates each field with one of these types; the annotation alone
decides how the field is checked and encoded.  All of them are ordinary
``typing.Annotated`` aliases, so type checkers see plain ``int``/``bytes``/``str``/
``tuple`` (mypy with ``pcidev.vmstate.mypy_plugin`` for the ones taking a length):

======================================  ===============================================
annotation                              meaning
======================================  ===============================================
``U8 U16 U32 U64``                      unsigned integer of that width
``I8 I16 I32 I64``                      two's-complement signed integer of that width
``bool`` (alias ``Bool``)               boolean (not an integer)
``Bytes[n]``                            exactly *n* bytes
``VarBytes[n]`` / ``bytes``             at most *n* bytes / at most 2**32-1 bytes
``Str[n]`` / ``str``                    UTF-8 text of at most *n* / 65535 encoded bytes
``FdRef``                               index of a file descriptor passed out of band
``S`` (a ``@vmstate`` class)            nested structure with its own version
``Array[T, n]``                         tuple of exactly *n* elements of type T
``VarArray[T, n]`` / ``tuple[T, ...]``  tuple of at most *n* / any number of elements
``Optional[T]`` / ``T | None``          as an array element or a non-structure field:
                                        nullable; for a structure field: a subsection
======================================  ===============================================

**Constraints.** A field may add what a loaded value must satisfy beyond its type:
``Annotated[U32, Mask(0x00FFFFF1)]`` (only these bits may be set),
``Annotated[U8, Range(0, 2)]`` (inclusive bounds) or ``Annotated[T, Check(fn)]`` (``fn(value)``
returns None or the reason the value is refused). The decoder enforces them on every
load (a :class:`~pcidev.errors.StateError` naming the field; nothing is built from the
stream); they are no part of the wire format or of the schema. Invariants that span
fields are the description's ``check`` (see :func:`~pcidev.vmstate.vmstate`); those that
depend on the device's configuration, its ``check_device_state``.

``Array[Optional[S], n]`` (or ``VarArray``/``tuple``) with a ``@vmstate`` class ``S``
is an *array of pointers*: each entry is present or null and the loader creates
exactly the entries the source had.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import attrs

from pcidev.errors import ConfigError

# Array and VarArray build their type at run time from the element type they are given:
# as runtime values (not type expressions) these subscripts are opaque to a type checker.
_Annotated: Any = Annotated
_tuple: Any = tuple

__all__ = [
    "UInt",
    "SInt",
    "Length",
    "MaxLength",
    "U8",
    "U16",
    "U32",
    "U64",
    "I8",
    "I16",
    "I32",
    "I64",
    "Bool",
    "Bytes",
    "VarBytes",
    "Str",
    "Array",
    "VarArray",
    "FdRef",
    "Range",
    "Mask",
    "Check",
    "Constraint",
    "MAX_STR",
    "MAX_VARBYTES",
]

#: Default bound, in UTF-8 bytes, of a plain ``str`` field.
MAX_STR = 0xFFFF
#: Default bound of a plain ``bytes`` field.
MAX_VARBYTES = 0xFFFF_FFFF


@attrs.frozen
class UInt:
    """Marker: an unsigned integer of ``bits`` bits (8, 16, 32 or 64)."""

    bits: int


@attrs.frozen
class SInt:
    """Marker: a signed integer of ``bits`` bits (8, 16, 32 or 64)."""

    bits: int


@attrs.frozen
class Length:
    """Marker: the bytes value or array has exactly ``n`` elements."""

    n: int


@attrs.frozen
class MaxLength:
    """Marker: the bytes, text or array value has at most ``n`` elements (UTF-8 bytes
    for text)."""

    n: int


#: Unsigned 8-bit integer field: an ``int`` from 0 to 255.
U8 = Annotated[int, UInt(8)]
#: Unsigned 16-bit integer field: an ``int`` from 0 to 65535.
U16 = Annotated[int, UInt(16)]
#: Unsigned 32-bit integer field: an ``int`` from 0 to 2**32-1.
U32 = Annotated[int, UInt(32)]
#: Unsigned 64-bit integer field: an ``int`` from 0 to 2**64-1.
U64 = Annotated[int, UInt(64)]
#: Signed (two's-complement) 8-bit integer field: an ``int`` from -128 to 127.
I8 = Annotated[int, SInt(8)]
#: Signed (two's-complement) 16-bit integer field: an ``int`` from -32768 to 32767.
I16 = Annotated[int, SInt(16)]
#: Signed (two's-complement) 32-bit integer field: an ``int`` from -2**31 to 2**31-1.
I32 = Annotated[int, SInt(32)]
#: Signed (two's-complement) 64-bit integer field: an ``int`` from -2**63 to 2**63-1.
I64 = Annotated[int, SInt(64)]
Bool = bool


def _count(what: str, n: Any) -> int:
    if type(n) is not int or n < 0 or n > 0xFFFF_FFFF:
        raise ConfigError(f"{what}[...] needs a length between 0 and 2**32-1, got {n!r}")
    return n


class Bytes:
    """``Bytes[n]``: a bytes value of exactly *n* bytes (bytearray/memoryview are
    accepted on save; load always yields ``bytes``)."""

    def __class_getitem__(cls, n: int) -> Any:
        return Annotated[bytes, Length(_count("Bytes", n))]


class VarBytes:
    """``VarBytes[n]``: a bytes value of at most *n* bytes."""

    def __class_getitem__(cls, n: int) -> Any:
        return Annotated[bytes, MaxLength(_count("VarBytes", n))]


class Str:
    """``Str[n]``: text whose UTF-8 encoding has at most *n* bytes."""

    def __class_getitem__(cls, n: int) -> Any:
        return Annotated[str, MaxLength(_count("Str", n))]


class Array:
    """``Array[T, n]``: a tuple of exactly *n* elements of type *T*."""

    def __class_getitem__(cls, params: tuple[Any, int]) -> Any:
        if not isinstance(params, tuple) or len(params) != 2:
            raise ConfigError("use Array[element_type, length]")
        elem, n = params
        return _Annotated[_tuple[elem, ...], Length(_count("Array", n))]


class VarArray:
    """``VarArray[T, n]``: a tuple of at most *n* elements of type *T*."""

    def __class_getitem__(cls, params: tuple[Any, int]) -> Any:
        if not isinstance(params, tuple) or len(params) != 2:
            raise ConfigError("use VarArray[element_type, max_length]")
        elem, n = params
        return _Annotated[_tuple[elem, ...], MaxLength(_count("VarArray", n))]


def _fd_index(instance: Any, attribute: Any, value: Any) -> None:
    if type(value) is not int or not 0 <= value <= 0xFFFF_FFFF:
        raise ValueError(f"FdRef index must be an int in 0..2**32-1, got {value!r}")


@attrs.frozen
class FdRef:
    """A reference to a file descriptor that travels out of band (``SCM_RIGHTS``).

    The stream carries only ``index``, the position of the descriptor in the list
    sent alongside the stream; mapping indices to real descriptors is the
    transport's job.  Use ``FdRef`` both as the field annotation and as the value.

    :param index: position in the out-of-band descriptor list (0..2**32-1).
    """

    index: int = attrs.field(validator=_fd_index)


def _int_bound(instance: Any, attribute: Any, value: Any) -> None:
    if type(value) is not int:
        raise ConfigError(f"{attribute.name} must be an int, got {value!r}")


@attrs.frozen
class Range:
    """Constraint: an integer field's loaded value lies in ``lo..hi`` (inclusive).

    :param lo: the smallest value accepted.
    :param hi: the largest value accepted.
    """

    lo: int = attrs.field(validator=_int_bound)
    hi: int = attrs.field(validator=_int_bound)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused, or None."""
        if value is None or self.lo <= value <= self.hi:
            return None
        return f"value {value} out of range {self.lo}..{self.hi}"


@attrs.frozen
class Mask:
    """Constraint: an integer field has no bit set outside ``bits`` (reserved or
    read-only bits of a register, alignment).

    :param bits: the bits that may be set.
    """

    bits: int = attrs.field(validator=_int_bound)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused, or None."""
        if value is None or not value & ~self.bits:
            return None
        return f"value {value:#x} sets bits {value & ~self.bits:#x} outside the mask {self.bits:#x}"


@attrs.frozen
class Check:
    """Constraint: ``fn(value)`` returns None for a value the field accepts, else the
    reason it is refused (a short sentence).

    :param fn: the predicate (called with the decoded value, never with None unless the
        field is nullable).
    """

    fn: Callable[[Any], str | None]

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused, or None."""
        return self.fn(value)


#: Any of the constraint markers.
Constraint = Range | Mask | Check
