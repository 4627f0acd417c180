"""The decoded-size budget of a vmstate body: what decoding it may cost, checked before it is decoded.

A msgpack body decodes to Python objects many times its size: an empty array is one
byte and a 56-byte list, a small negative integer one byte and a 32-byte int, so a
256 MiB stream of such values would make a reader allocate tens of gigabytes before it
could look at a single section. Every body is therefore walked first, without building
anything (:func:`pcidev.native.measure_msgpack`, a few lines of C), adding up an
estimate of the memory its decoding takes at its peak; a body whose estimate passes
:data:`MAX_DECODED_SIZE` is refused. Writer and reader use the same walk and the same
limit: :func:`pcidev.vmstate.stream.save` refuses a state that :func:`~pcidev.vmstate.stream.load`
would refuse, so a stream this build writes is a stream it reads.

The estimate (:data:`COSTS`) charges each value what CPython 3.11 and msgpack-python
allocate for it, rounded up (measured with :mod:`tracemalloc`; a map also pays for the
key/value pairs it is built from): integers CPython caches, nil and booleans are free; an
array is 64 bytes plus 8 per element; a map 128 plus 152 per entry; a str 56 plus its
length when ASCII (80 plus four times its length otherwise); bin 48 plus its length.
The figure is an upper bound of the decoding's peak for the shapes an attacker would use
(one-byte values, empty containers) and overstates structured states about four times
(a 5-field structure costs some 1,200 bytes against some 260 really allocated, since
CPython shares interned keys and small integers): one completion queue with a full
backlog of 65,536 completions is estimated at about 86 MB (19 MB really allocated), so a
stream may carry 12 of them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pcidev.native import MSGPACK_COST_KINDS, MsgpackWalk, measure_msgpack

__all__ = ["COSTS", "MAX_DECODED_SIZE", "Estimate", "estimate"]

#: The most a vmstate body's decoding may be estimated to cost, in bytes (1 GiB). Part of
#: the format: a writer refuses to write more, a reader refuses to read more.
MAX_DECODED_SIZE = 1 << 30

#: The charge of each kind of value (see :func:`pcidev.native.measure_msgpack`), in bytes.
COSTS: dict[str, int] = {
    "int": 32, "int64": 48, "float": 32,
    "ascii_base": 56, "ascii_byte": 1, "str_base": 80, "str_byte": 4,
    "bin_base": 48, "bin_byte": 1, "ext_base": 96, "ext_byte": 1,
    "array_base": 64, "array_item": 8, "map_base": 128, "map_item": 152,
}
_COSTS = tuple(COSTS[k] for k in MSGPACK_COST_KINDS)


class Estimate(NamedTuple):
    """What walking a body found (see :func:`estimate`).

    :ivar walk: how the walk ended (:attr:`~pcidev.native.MsgpackWalk.OK` for a whole
        value within the limit).
    :ivar size: the estimated decoded size so far, in bytes.
    :ivar offset: the byte offset in the body of the value where the walk stopped (the
        body's length when it ended normally).
    :ivar limit: the limit the walk was given.
    """

    walk: MsgpackWalk
    size: int
    offset: int
    limit: int

    def problem(self) -> str | None:
        """Why the body cannot be decoded, as one line, or ``None`` when it can."""
        w, at = self.walk, self.offset
        if w is MsgpackWalk.OK:
            return None
        if w is MsgpackWalk.OVER:
            return (f"decoding it would take more than {self.limit:,} bytes (estimated {self.size:,} by the "
                    f"value at byte {at}; MAX_DECODED_SIZE)")
        if w is MsgpackWalk.TRUNCATED:
            return f"the value at byte {at} is truncated"
        if w is MsgpackWalk.RESERVED:
            return f"byte {at} is 0xc1, which msgpack never uses"
        if w is MsgpackWalk.DEEP:
            return f"values nest deeper than 1024 levels (at byte {at})"
        return f"bytes left over after the value, from byte {at}"


def estimate(body: Any, limit: int | None = None) -> Estimate:
    """Walk a msgpack body and estimate what decoding it would allocate.

    :param body: the body (a bytes-like object).
    :param limit: the walk stops once the estimate passes this many bytes (default:
        :data:`MAX_DECODED_SIZE`, read at each call).
    :returns: the estimate; its :meth:`Estimate.problem` says why the body cannot be
        decoded, if it cannot.
    """
    if limit is None:
        limit = MAX_DECODED_SIZE
    walk, size, offset = measure_msgpack(body, _COSTS, limit)
    return Estimate(walk, size, offset, limit)
