"""pcidev.native.measure_msgpack: the walk that estimates a msgpack value's decoding before it is decoded.

The C walk reads untrusted bytes, so besides agreeing with the Python walk and with
msgpack itself it is compiled here with AddressSanitizer and UndefinedBehaviorSanitizer
and run over truncated, mutated and random inputs.
"""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcidev import _native_build, native
from pcidev.native import MSGPACK_COST_KINDS, MSGPACK_DEPTH, MsgpackWalk, measure_msgpack, py_measure_msgpack

# distinct primes, so that a wrong kind or a wrong count shows in the total (int 3, int64 5,
# float 7, ..., array_base 41, array_item 43, map_base 47, map_item 53)
COSTS = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53)
assert len(COSTS) == len(MSGPACK_COST_KINDS)
BIG = 1 << 62

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(allow_nan=False)
    | st.text(max_size=40) | st.binary(max_size=300)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20)),
    lambda children: st.lists(children, max_size=20) | st.dictionaries(st.text(max_size=8), children, max_size=8),
    max_leaves=60)


def _mutants(data: bytes, rnd: random.Random, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        b = bytearray(data)
        for _ in range(rnd.randrange(1, 4)):
            r = rnd.random()
            if b and r < 0.4:
                b[rnd.randrange(len(b))] = rnd.randrange(256)
            elif b and r < 0.6:
                del b[rnd.randrange(len(b))]
            else:
                b.insert(rnd.randrange(len(b) + 1), rnd.choice((0xC1, 0xDD, 0xDF, 0xDB, 0xC9, 0x9F, 0x8F,
                                                                  rnd.randrange(256))))
        out.append(bytes(b))
    return out


def test_the_extension_has_the_walk():
    """The normal build uses the C walk (the Python one is only the fallback)."""
    if native.BACKEND == "cffi":
        assert native.MSGPACK_BACKEND == "cffi"
        assert measure_msgpack is not py_measure_msgpack


@settings(max_examples=300, deadline=None)
@given(values, st.sampled_from([0, 10, 1000, BIG]))
def test_c_and_python_walks_agree_on_msgpack_values(value, limit):
    """Every encodable value: both walks give the same verdict, estimate and offset; a whole
    value within a big limit is OK and ends at the last byte."""
    data = msgpack.packb(value, use_bin_type=True)
    got = measure_msgpack(data, COSTS, limit)
    assert got == py_measure_msgpack(data, COSTS, limit)
    if limit == BIG:
        assert got == (MsgpackWalk.OK, got[1], len(data))


@settings(max_examples=200, deadline=None)
@given(values, st.randoms(use_true_random=False))
def test_walks_agree_on_mutated_bytes_and_msgpack_refuses_what_the_walk_refuses(value, rnd):
    """Truncated, reserved, too deep or trailing by the walk -> msgpack refuses it too; and
    anything msgpack decodes, the walk accepts."""
    data = msgpack.packb(value, use_bin_type=True)
    for b in [data[:k] for k in range(len(data))][:64] + _mutants(data, rnd, 20):
        walk, cost, at = measure_msgpack(b, COSTS, BIG)
        assert (walk, cost, at) == py_measure_msgpack(b, COSTS, BIG)
        try:
            msgpack.unpackb(b, raw=False, strict_map_key=False)
        except Exception:
            continue
        assert walk is MsgpackWalk.OK, b


def _charge(value) -> int:
    """The expected estimate of a value, computed from the decoded value itself."""
    c = dict(zip(MSGPACK_COST_KINDS, COSTS, strict=True))
    if value is None or isinstance(value, bool):
        return 0
    if isinstance(value, int):
        if 0 <= value <= 0xFF:
            return 0
        return c["int64"] if not -(1 << 31) <= value < (1 << 32) else c["int"]
    if isinstance(value, float):
        return c["float"]
    if isinstance(value, str):
        n = len(value.encode())
        return c["ascii_base"] + c["ascii_byte"] * n if value.isascii() else c["str_base"] + c["str_byte"] * n
    if isinstance(value, bytes):
        return c["bin_base"] + c["bin_byte"] * len(value)
    if isinstance(value, msgpack.ExtType):
        return c["ext_base"] + c["ext_byte"] * len(value.data)
    if isinstance(value, list):
        return c["array_base"] + c["array_item"] * len(value) + sum(_charge(v) for v in value)
    return c["map_base"] + c["map_item"] * len(value) + sum(_charge(k) + _charge(v) for k, v in value.items())


@settings(max_examples=300, deadline=None)
@given(values)
def test_the_estimate_is_the_documented_sum_of_charges(value):
    """The estimate of a value equals the sum of the documented charges of what it decodes to."""
    data = msgpack.packb(value, use_bin_type=True)
    assert measure_msgpack(data, COSTS, BIG)[1] == _charge(msgpack.unpackb(data, raw=False, strict_map_key=False))


@pytest.mark.parametrize("impl", [measure_msgpack, py_measure_msgpack], ids=["selected", "python"])
def test_edges(impl):
    """Each way a walk ends, with its offset."""
    assert impl(b"", COSTS, BIG) == (MsgpackWalk.TRUNCATED, 0, 0)
    assert impl(b"\x92\x01\xc1", COSTS, BIG) == (MsgpackWalk.RESERVED, 41 + 2 * 43, 2)
    assert impl(b"\x01\x02", COSTS, BIG) == (MsgpackWalk.TRAILING, 0, 1)
    # a header declaring more elements than bytes are left: refused before its charge
    assert impl(b"\xdd\xff\xff\xff\xff\x00", COSTS, BIG) == (MsgpackWalk.TRUNCATED, 0, 0)
    assert impl(b"\xdf\x00\x00\x00\x02\x00\x00\x00", COSTS, BIG) == (MsgpackWalk.TRUNCATED, 0, 0)
    assert impl(b"\x91\xdb\x00\x00\x00\x05abc", COSTS, BIG) == (MsgpackWalk.TRUNCATED, 41 + 43, 1)
    # the limit: passing it stops at the value that passed it
    data = b"\x93\xe0\xe0\xe0"
    whole = 41 + 3 * 43 + 3 * 3  # the array's base and items, then three ints
    assert impl(data, COSTS, whole) == (MsgpackWalk.OK, whole, 4)
    assert impl(data, COSTS, whole - 1) == (MsgpackWalk.OVER, whole, 3)
    assert impl(b"\xdc\x00\x03\xc0\xc0\xc0", COSTS, 10) == (MsgpackWalk.OVER, 41 + 3 * 43, 0)


@pytest.mark.parametrize("impl", [measure_msgpack, py_measure_msgpack], ids=["selected", "python"])
def test_depth_limit_is_msgpacks(impl):
    """As msgpack: 1024 non-empty containers may be open, and no container (not even an
    empty one) may start inside them; a scalar may."""
    for body, ok in ((b"\x91" * (MSGPACK_DEPTH - 1) + b"\x90", True), (b"\x91" * MSGPACK_DEPTH + b"\xc0", True),
                     (b"\x91" * MSGPACK_DEPTH + b"\x90", False), (b"\x91" * MSGPACK_DEPTH + b"\x80", False),
                     (b"\x91" * (MSGPACK_DEPTH + 1) + b"\xc0", False)):
        got = impl(body, (0,) * 15, BIG)
        if ok:
            assert got[0] is MsgpackWalk.OK
            msgpack.unpackb(body)
        else:
            assert got == (MsgpackWalk.DEEP, 0, MSGPACK_DEPTH)
            with pytest.raises(msgpack.StackError):
                msgpack.unpackb(body)


@pytest.mark.parametrize("impl", [measure_msgpack, py_measure_msgpack], ids=["selected", "python"])
def test_bad_arguments(impl):
    with pytest.raises(ValueError, match="15 entries"):
        impl(b"\xc0", COSTS[:-1], BIG)
    with pytest.raises(ValueError, match="0..65535"):
        impl(b"\xc0", (1 << 16,) + COSTS[1:], BIG)
    with pytest.raises(ValueError, match="limit"):
        impl(b"\xc0", COSTS, (1 << 62) + 1)
    with pytest.raises(ValueError, match="limit"):
        impl(b"\xc0", COSTS, -1)


def test_constant_memory_for_huge_declared_counts():
    """A body of headers declaring 2**32-1 elements each is refused at the first header, with
    nothing allocated for the declared elements."""
    data = (b"\xdd\xff\xff\xff\xff") * 1000
    assert measure_msgpack(data, COSTS, BIG) == (MsgpackWalk.TRUNCATED, 0, 0)
    many = b"\xdd" + struct.pack(">I", 4000) + b"\xe0" * 4000
    assert measure_msgpack(many, COSTS, BIG) == (MsgpackWalk.OK, 41 + 43 * 4000 + 3 * 4000, len(many))


_DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
/* records on stdin: u32 length, u64 limit, the bytes; one line out per record */
int main(void)
{
    static const uint64_t costs[15] = {3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53};
    uint32_t n;
    uint64_t limit, out[2];
    while (fread(&n, 4, 1, stdin) == 1 && fread(&limit, 8, 1, stdin) == 1) {
        uint8_t *buf = malloc(n ? n : 1);   /* exactly n bytes: a read past the end is caught */
        if (n && fread(buf, 1, n, stdin) != n)
            return 2;
        int status = pcidev_msgpack_measure(buf, n, costs, limit, out);
        printf("%d %llu %llu\n", status, (unsigned long long)out[0], (unsigned long long)out[1]);
        free(buf);
    }
    return 0;
}
"""


def test_the_c_walk_under_address_and_undefined_behaviour_sanitizers(tmp_path: Path):
    """The C source, compiled with -fsanitize=address,undefined, walks thousands of hostile
    inputs (every truncation of a varied body, mutants, random bytes, huge declared
    counts) without a sanitizer report and with the Python walk's results."""
    src = tmp_path / "walk.c"
    src.write_text(_native_build.SOURCE + _DRIVER)
    exe = tmp_path / "walk"
    subprocess.run(["gcc", "-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-Wno-unused-function",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=all", str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    rnd = random.Random(24)
    seeds = [msgpack.packb(v, use_bin_type=True) for v in (
        {"device_type": "nvme", "fingerprint": {"a": [1, 2.5, None]}, "sections": [["x", 0, [1, {"f": b"\0" * 40}]]]},
        [-1, -(1 << 40), 1 << 40, "é€😀", "ascii", msgpack.ExtType(1, b"1234"), msgpack.ExtType(2, b"x" * 300)],
        {"k" * 40: {"n": list(range(-40, 300, 7))}}, [[[[[]]]], {}, [{}], ""])]
    inputs = []
    for s in seeds:
        inputs += [s[:k] for k in range(len(s) + 1)]
        inputs += _mutants(s, rnd, 400)
    inputs += [rnd.randbytes(rnd.randrange(64)) for _ in range(2000)]
    inputs += [bytes([b]) + rnd.randbytes(rnd.randrange(9)) for b in range(256)]
    inputs += [b"\xdd\xff\xff\xff\xff" * 3, b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
               b"\xc9\xff\xff\xff\xff\x01", b"\x91" * 1100 + b"\xc0", b"\x9f" * 1030]
    limits = [BIG, 0, 100]
    stdin = b"".join(struct.pack("<IQ", len(b), limits[i % 3]) + b for i, b in enumerate(inputs))
    run = subprocess.run([str(exe)], input=stdin, capture_output=True, check=False, timeout=300)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-3000:]
    assert run.stderr == b""
    lines = run.stdout.decode().splitlines()
    assert len(lines) == len(inputs)
    for i, (b, line) in enumerate(zip(inputs, lines, strict=True)):
        walk, cost, at = py_measure_msgpack(b, COSTS, limits[i % 3])
        assert line == f"{int(walk)} {cost} {at}", b
