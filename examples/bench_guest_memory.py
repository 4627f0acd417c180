"""Benchmark: the per-call cost of guest-memory accesses (pcidev.dma) and native primitives.

Prints the table of docs/development.md ("Cost of guest-memory access"): for each
operation the best of ``--repeat`` timeit runs of ``--number`` calls, in ns per call.
Orientation only: the numbers move with the machine and its load.

Run::

    .venv/bin/python examples/bench_guest_memory.py [--number N] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import struct
import sys
import timeit
from typing import Any

from pcidev import native
from pcidev.dma import GuestMemory, alloc_memfd

RAM = 0x10000
OTHER = 0x200000
SIZE = 1 << 20


def cases(gm: GuestMemory) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, statement, globals)`` of every measured operation."""
    # an NVMe submission queue entry: opcode, flags, CID, NSID, reserved, MPTR, PRP1, PRP2, CDW10-15
    sqe = struct.Struct("<BBHIQQQQ6I")
    buf4k = bytes(4096)
    g: dict[str, Any] = {"gm": gm, "sqe": sqe, "fields": (1, 0, 7, 1, 0, 0, 0x1000, 0, 0, 0, 0, 0, 0, 0),
                         "buf4k": buf4k, "native": native}
    rows = [
        ("read_u32 (4 bytes, cached region)", "gm.read_u32(0x10040)", g),
        # two calls per statement (a second region each time), halved below
        ("read_u32 (alternating between two regions: bisect)", "gm.read_u32(0x10040); gm.read_u32(0x200040)", g),
        ("read_struct (64-byte Struct, an NVMe SQE)", "gm.read_struct(sqe, 0x10040)", g),
        ("write_u32", "gm.write_u32(0x10040, 5)", g),
        ("write_struct (64 bytes; packed before writing)", "gm.write_struct(sqe, 0x10040, *fields)", g),
        ("load32 (ordered, native)", "gm.load32(0x10040)", g),
        ("store32 (ordered, native)", "gm.store32(0x10040, 7)", g),
        ("read 4 KiB", "gm.read(0x10000, 4096)", g),
        ("write 4 KiB", "gm.write(0x10000, buf4k)", g),
        ("views (one 4 KiB view)", "gm.views(0x10000, 4096)", g),
        ("with access([two 4 KiB entries]) as views: pass",
         "with gm.access([(0x10000, 4096), (0x11000, 4096)]): pass", g),
        ("native.fence()", "native.fence()", g),
    ]
    impls: list[tuple[str, type[native.Pinned] | None]] = [
        ("selected", native.CffiPinned),
        ("CffiAtomicPinned", native.CffiAtomicPinned),
        ("PythonPinned", native.PythonPinned),
    ]
    for label, impl in impls:
        if impl is None:
            continue
        p = impl(bytearray(4096), writable=True)
        rows.append((f"Pinned.load32 ({label})", "p.load32(64)", {"p": p}))
        rows.append((f"Pinned.store32 ({label})", "p.store32(64, 7)", {"p": p}))
    mm = mmap.mmap(-1, 4096)
    rows.append(("native.load32 on an mmap (pins and releases each call)", "native.load32(mm, 64)",
                 {"native": native, "mm": mm}))
    return rows


def main() -> None:
    """Measure and print the table (or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=100_000, help="calls per timeit run")
    ap.add_argument("--repeat", type=int, default=25, help="timeit runs; the best is reported")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()

    gm = GuestMemory()
    fds = [alloc_memfd(SIZE), alloc_memfd(SIZE)]
    gm.map(RAM, SIZE, fds[0])
    gm.map(OTHER, SIZE, fds[1])
    try:
        results = {}
        for label, stmt, g in cases(gm):
            best = min(timeit.repeat(stmt, globals=g, number=args.number, repeat=args.repeat))
            calls = 2 if "alternating" in label else 1
            results[label] = round(best / (args.number * calls) * 1e9, 1)
    finally:
        gm.close()
        for fd in fds:
            os.close(fd)
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "backend": native.BACKEND, "ordering": native.ORDERING}
    if args.json:
        json.dump({"environment": env, "ns_per_call": results}, sys.stdout, indent=2)
        print()
        return
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    width = max(len(k) for k in results)
    for label, ns in results.items():
        print(f"{label:<{width}}  {ns:8.1f} ns")


if __name__ == "__main__":
    main()
