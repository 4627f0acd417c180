"""Benchmark: save + load of a whole device through pcidev.migration.save_device_stream /
load_device_stream, for an NVMe-like device with 64 queue pairs and 1,000 in-flight
requests.

Unlike examples/bench_vmstate.py (the vmstate library alone), this goes through a real
device: the live device keeps mutable queue and request objects and builds its frozen
state object on every save (``get_device_state``), the framework adds its section
(4 KiB config space, a 65-vector MSI-X table and PBA, the guest-memory map and 66
interrupt eventfds as fd references), and the load decodes, checks, maps guest memory,
duplicates the eventfds and applies everything to a second device. This is the work a
migration does while the device is stopped (the socket transfer aside).

Run::

    .venv/bin/python examples/bench_device_migration.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import attrs

from pcidev.bar import Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.dma import GuestMemory, alloc_memfd
from pcidev.irq import EventfdSink
from pcidev.migration import load_device_stream, prepare_vmstate, save_device_stream
from pcidev.pci import ids

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by runpy or importlib
    sys.path.append(str(Path(__file__).resolve().parent))
from bench_state import QUEUES, REQUESTS, make_state
from bench_state import CompletionQueue as CqState
from bench_state import Controller as ControllerState
from bench_state import Request as RequestState
from bench_state import SubmissionQueue as SqState

VECTORS = QUEUES + 1


@attrs.define
class _Sq:  # live, mutable
    sqid: int
    cqid: int
    size: int
    head: int = 0
    tail: int = 0
    prio: int = 0
    base: int = 0


@attrs.define
class _Cq:
    cqid: int
    size: int
    vector: int = 0
    head: int = 0
    tail: int = 0
    phase: bool = True
    irq_enabled: bool = True
    base: int = 0


@attrs.define
class _Request:
    cid: int
    sqid: int
    status: int = 0
    nlb: int = 0
    slba: int = 0
    cmd: bytes = bytes(64)


class BenchController(PciDevice):
    """An NVMe-like device: registers in BAR0, 65 MSI-X vectors, queues and requests."""

    TYPE_NAME = "bench-ctrl"
    VENDOR_ID, DEVICE_ID, CLASS_CODE = 0x1B36, 0x0010, 0x010802
    VMSTATE = ControllerState

    def describe(self) -> None:
        regs = RegisterMap(0x4000, [Register("CC", 0x14), Register("CSTS", 0x1C), Register("AQA", 0x24),
                                    Register("ASQ", 0x28, 8), Register("ACQ", 0x30, 8)])
        self.regs = regs
        self.add_mem_bar(0, 0x4000, regs, bits64=True)
        self.add_msix(VECTORS, bar=0, table_offset=0x2000, pba_offset=0x3000)
        self.add_standard_pcie_caps()
        self.sqs: list[_Sq | None] = [None] * (QUEUES + 1)
        self.cqs: list[_Cq | None] = [None] * (QUEUES + 1)
        self.requests: list[_Request] = []

    def populate(self) -> None:
        """Create 64 I/O queue pairs and 1,000 requests in flight (examples/bench_state.py)."""
        self.set_device_state(make_state())

    def device_fingerprint(self) -> dict:
        return {"queues": QUEUES}

    def get_device_state(self) -> ControllerState:
        r = self.regs
        return ControllerState(
            cc=r["CC"].value, csts=r["CSTS"].value, aqa=r["AQA"].value, asq=r["ASQ"].value, acq=r["ACQ"].value,
            sq=tuple(None if q is None else SqState(q.sqid, q.cqid, q.size, q.head, q.tail, q.prio, q.base)
                     for q in self.sqs),
            cq=tuple(None if q is None else CqState(q.cqid, q.size, q.vector, q.head, q.tail, q.phase,
                                                    q.irq_enabled, q.base) for q in self.cqs),
            inflight=tuple(RequestState(q.cid, q.sqid, q.status, q.nlb, q.slba, q.cmd) for q in self.requests))

    def set_device_state(self, state: ControllerState) -> None:
        r = self.regs
        r["CC"].value, r["CSTS"].value, r["AQA"].value = state.cc, state.csts, state.aqa
        r["ASQ"].value, r["ACQ"].value = state.asq, state.acq
        self.sqs = [None if s is None else _Sq(s.sqid, s.cqid, s.size, s.head, s.tail, s.prio, s.base)
                    for s in state.sq]
        self.cqs = [None if c is None else _Cq(c.cqid, c.size, c.vector, c.head, c.tail, c.phase, c.irq_enabled,
                                               c.base) for c in state.cq]
        self.requests = [_Request(q.cid, q.sqid, q.status, q.nlb, q.slba, q.cmd) for q in state.inflight]


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def run(runs: int) -> dict:
    """Measure; returns the figures (milliseconds, bytes)."""
    memfd = alloc_memfd(64 << 20, "bench-ram")
    memory = GuestMemory()
    memory.map(0, 64 << 20, memfd, name="ram")
    efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(VECTORS + 1)]
    src = BenchController()
    src.attach(memory, EventfdSink(dict(enumerate(efds[:VECTORS])), intx_fd=efds[-1]))
    src.config_write(ids.COMMAND, 2, ids.Command.MEMORY | ids.Command.MASTER)
    src.config_write(src.irq.msix.offset + 2, 2, 0x8000)
    src.populate()
    prepare_vmstate(src)
    saves, loads, both = [], [], []
    stream, fds = b"", []
    for i in range(runs + 5):
        src.quiesce()
        t0 = time.perf_counter()
        stream, fds = save_device_stream(src)
        t1 = time.perf_counter()
        dest = BenchController()
        t2 = time.perf_counter()
        res = load_device_stream(dest, stream, fds)
        t3 = time.perf_counter()
        src.resume()
        assert dest.get_device_state() == src.get_device_state()
        res.close()
        if i >= 5:  # warm-up runs are not counted
            saves.append((t1 - t0) * 1e3)
            loads.append((t3 - t2) * 1e3)
            both.append((t1 - t0 + t3 - t2) * 1e3)
    memory.close()
    for fd in [memfd, *efds]:
        os.close(fd)
    out = {"queues": QUEUES, "requests": REQUESTS, "runs": runs, "stream_bytes": len(stream), "fds": len(fds)}
    for label, xs in (("save", saves), ("load", loads), ("save_load", both)):
        out[label] = {"median_ms": statistics.median(xs), "p10_ms": _pct(xs, 0.1), "p90_ms": _pct(xs, 0.9)}
    return out


def main(argv: list[str] | None = None) -> None:
    """Run and print the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = run(args.runs)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"device save+load: {QUEUES} SQ + {QUEUES} CQ, {REQUESTS} in-flight requests, {VECTORS} MSI-X vectors, "
          f"{args.runs} runs")
    print(f"  stream     {r['stream_bytes']} bytes ({r['stream_bytes'] / 1024:.1f} KiB) + {r['fds']} fds")
    for label in ("save", "load", "save_load"):
        f = r[label]
        print(f"  {label.replace('_', '+'):<10} median {f['median_ms']:6.3f} ms   p10 {f['p10_ms']:6.3f} ms   "
              f"p90 {f['p90_ms']:6.3f} ms")


if __name__ == "__main__":
    main()
