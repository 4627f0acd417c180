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
key/value pairs it is built from and for the interned-string table entry of a str key):
integers CPython caches, nil and booleans are free; an array is 64 bytes plus 8 per
element; a map 128 plus 200 per entry; a str 56 plus its length when ASCII, else 96 plus six
times its length (CPython widens a string from one to two to four bytes a character with
both buffers alive); bin 48 plus its length; ext 128 plus its length. For every shape an
attacker could use (one-byte values, empty containers, wide strings, maps with a repeated
key, timestamps) the estimate bounds the decoding's peak, give or take the decoder's fixed
few KiB and a one-time growth of the interpreter's interned-string table (tested in
``tests/pcidev/vmstate/test_vmstate_budget.py``). It overstates structured states four to
five times (a 5-field structure is charged some 1,500 bytes against some 300 really
allocated, since CPython shares interned keys and small integers): one completion queue
with a full backlog of 65,536 completions is estimated at about 101 MB (about 21 MB really
allocated), so a stream may carry ten of them; ``save`` refuses an eleventh with a
:class:`~pcidev.vmstate.errors.StateError` naming the largest sections.

Without the compiled extension the walk runs in Python (``py_measure_msgpack``), some
0.5 µs a value: a body within the budget can hold 2**25 small values, so the walk may then
take tens of seconds of CPU for the largest hostile body.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pcidev.native import MSGPACK_COST_KINDS, MSGPACK_DEPTH, MsgpackWalk, measure_msgpack

__all__ = ["COSTS", "MAX_DECODED_SIZE", "Estimate", "estimate"]

#: The most a vmstate body's decoding may be estimated to cost, in bytes (1 GiB). Part of
#: the format: a writer refuses to write more, a reader refuses to read more.
MAX_DECODED_SIZE = 1 << 30

#: The charge of each kind of value (see :func:`pcidev.native.measure_msgpack`), in bytes.
COSTS: dict[str, int] = {
    "int": 32, "int64": 48, "float": 32,
    "ascii_base": 56, "ascii_byte": 1, "str_base": 96, "str_byte": 6,
    "bin_base": 48, "bin_byte": 1, "ext_base": 128, "ext_byte": 1,
    "array_base": 64, "array_item": 8, "map_base": 128, "map_item": 200,
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
            return f"decoding it would take more than {self.limit:,} bytes (estimated {self.size:,} by byte {at})"
        if w is MsgpackWalk.TRUNCATED:
            return f"the value at byte {at} is truncated"
        if w is MsgpackWalk.RESERVED:
            return f"byte {at} is 0xc1, which msgpack never uses"
        if w is MsgpackWalk.DEEP:
            return f"values nest deeper than {MSGPACK_DEPTH} levels (at byte {at})"
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
