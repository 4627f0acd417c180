"""Benchmark: save + load of an NVMe-like device state with pcidev.vmstate.

The state has 64 submission and 64 completion queues (arrays of pointers with 65
slots, slot 0 unused) and 1,000 in-flight request records, each a 64-byte command
plus a few integers.  The script prints the stream size and the save, load and
save+load times (median, 10th and 90th percentile over many runs, garbage collector
enabled as in a real process), then, for comparison, the same round trip through
cattrs and msgpack: a plain converter (no checks at all) and one with the same
per-field checks (range, length, extra keys) done by cattrs hooks.

Run::

    .venv/bin/python examples/bench_vmstate.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import typing
from pathlib import Path

import cattrs
import msgpack

from pcidev.vmstate import load, save
from pcidev.vmstate.types import Length, UInt

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by runpy or importlib
    sys.path.append(str(Path(__file__).resolve().parent))
from bench_state import QUEUES, REQUESTS, Controller, make_state

FINGERPRINT = {"queues": QUEUES, "namespaces": [1 << 30], "bar0": 0x4000}


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def _report(label: str, xs: list[float]) -> None:
    print(f"  {label:<10} median {statistics.median(xs):6.3f} ms   "
          f"p10 {_pct(xs, 0.1):6.3f} ms   p90 {_pct(xs, 0.9):6.3f} ms")


def bench_vmstate(state: Controller, runs: int) -> None:
    """Time pcidev.vmstate save and load."""
    saves, loads, both = [], [], []
    data = b""
    for _ in range(runs):
        t0 = time.perf_counter()
        data = save("bench", FINGERPRINT, [("bench/ctrl", 0, state)])
        t1 = time.perf_counter()
        [(_, _, loaded)] = load(data, device_type="bench", fingerprint=FINGERPRINT,
                                descriptions=[Controller])
        t2 = time.perf_counter()
        saves.append((t1 - t0) * 1e3)
        loads.append((t2 - t1) * 1e3)
        both.append((t2 - t0) * 1e3)
    assert loaded == state
    print(f"pcidev.vmstate: {QUEUES} SQ + {QUEUES} CQ, {REQUESTS} in-flight requests, {runs} runs")
    print(f"  stream     {len(data)} bytes ({len(data) / 1024:.1f} KiB)")
    _report("save", saves)
    _report("load", loads)
    _report("save+load", both)


def _marker(tp: object, kind: type) -> object:
    if typing.get_origin(tp) is typing.Annotated:
        return next((m for m in typing.get_args(tp)[1:] if isinstance(m, kind)), None)
    return None


def checked_cattrs_converter() -> cattrs.Converter:
    """A cattrs converter doing the same per-field checks as pcidev.vmstate (integer
    ranges, exact byte lengths, no extra keys, error paths), without versions."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def uint_check(tp: object):
        hi = (1 << _marker(tp, UInt).bits) - 1

        def check(v, _t=None):
            if type(v) is not int or not 0 <= v <= hi:
                raise ValueError(f"{v!r} out of range 0..{hi}")
            return v
        return check

    def bytes_check(tp: object):
        n = _marker(tp, Length).n

        def check(v, _t=None):
            if type(v) is not bytes or len(v) != n:
                raise ValueError(f"need exactly {n} bytes")
            return v
        return check

    for factory, pred in ((uint_check, lambda t: _marker(t, UInt) is not None),
                          (bytes_check, lambda t: _marker(t, Length) is not None
                           and typing.get_args(t)[0] is bytes)):
        conv.register_structure_hook_factory(pred, factory)
        conv.register_unstructure_hook_factory(pred, lambda t, f=factory: f(t))  # the check passes v through
    return conv


def bench_cattrs(state: Controller, runs: int, label: str, conv: cattrs.Converter) -> None:
    """Time the same round trip through a cattrs converter and msgpack."""
    both = []
    for _ in range(runs):
        t0 = time.perf_counter()
        data = msgpack.packb(conv.unstructure(state))
        loaded = conv.structure(msgpack.unpackb(data), Controller)
        both.append((time.perf_counter() - t0) * 1e3)
    assert loaded == state
    print(f"{label}, {runs} runs")
    print(f"  stream     {len(data)} bytes")
    _report("save+load", both)


def main() -> None:
    """Run the benchmarks."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    state = make_state()
    for _ in range(10):  # warm up: code generation, caches
        save("bench", FINGERPRINT, [("bench/ctrl", 0, state)])
    bench_vmstate(state, args.runs)
    bench_cattrs(state, args.runs, "cattrs, no checks (msgpack, no versions, envelope or checksum)",
                 cattrs.Converter())
    bench_cattrs(state, args.runs, "cattrs with the same field checks (no versions, envelope or checksum)",
                 checked_cattrs_converter())


if __name__ == "__main__":
    main()
