"""Live-migrate the edu example device between processes while the software host
keeps driving it, with :func:`pcidev.testing.migrate_under_load`.

The device (a DMA descriptor-ring engine with MSI-X) runs in its own process,
served over the device link; the runner plugs it into an in-process software host
and moves it to a new process ``--migrations`` times (quiesce between two DMA
chunks, save, send with the guest-memory and interrupt fds, load, acknowledge,
resume) while the workload below keeps running: each step computes a factorial
on the device and copies a batch of blocks with its DMA engine, waits for the
MSI-X interrupt and checks every block's bytes and the CRC-32C the device wrote.
The script prints each migration's downtime and state size (exit status 1 when
the workload or a migration fails).

Run::

    .venv/bin/python examples/migrate_edu.py [--blocks N] [--block-size BYTES]
        [--migrations N] [--tcp] [--json] [-p no:NAME | -p MODULE]...

``pcidev demo`` shows the same with a tour of the device first (``pcidev/demo.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import crc32c

from pcidev.devices.edu import DESC, STATUS_DONE
from pcidev.errors import PcidevError
from pcidev.testing import Workload, WorkloadContext, migrate_under_load

RING = 64
BATCH = 16


# [example: edu workload]
class EduWorkload(Workload):
    """Factorials and DMA copies, each checked; ``blocks`` blocks in all."""

    def __init__(self, blocks: int, block_size: int) -> None:
        self.blocks, self.block_size = blocks, block_size
        self.copied = 0
        self.tail = 0

    def setup(self, ctx: WorkloadContext) -> None:
        m, p = ctx.machine, ctx.pdev
        self.ring = m.alloc(RING * 32)
        self.src, self.dst = m.alloc(BATCH * self.block_size), m.alloc(BATCH * self.block_size)
        p.iowrite64(0, 0x100, self.ring)  # RING_BASE
        p.iowrite32(0, 0x108, RING)  # RING_SIZE
        p.iowrite32(0, 0x114, 1)  # RING_CTRL: the engine is on

    def step(self, ctx: WorkloadContext) -> bool:
        m, p, bs = ctx.machine, ctx.pdev, self.block_size
        n = ctx.iteration % 13
        p.iowrite32(0, 0x08, n)  # FACTORIAL: write n, read n!
        if p.ioread32(0, 0x08) != _factorial(n):
            raise AssertionError(f"{n}! read back wrong")
        count = min(BATCH, self.blocks - self.copied)
        payload = os.urandom(count * bs)
        m.write(self.src, payload)
        slots = [(self.tail + j) % RING for j in range(count)]
        for j, slot in enumerate(slots):  # interrupt on the last descriptor of the batch
            m.memory.write_struct(DESC, self.ring + 32 * slot, self.src + j * bs, self.dst + j * bs, bs,
                                  int(j == count - 1), 0, 0)
        before = p.irq_count(0)
        self.tail = (self.tail + count) % RING
        p.iowrite32(0, 0x10C, self.tail)  # RING_TAIL: the doorbell
        if not p.recorder.wait(0, above=before, timeout=20):
            raise TimeoutError(f"no DMA interrupt for blocks {self.copied}..{self.copied + count - 1}")
        for j, slot in enumerate(slots):
            block = payload[j * bs:(j + 1) * bs]
            status, crc = struct.unpack("<II", m.read(self.ring + 32 * slot + 0x18, 8))
            if status != STATUS_DONE or crc != crc32c.crc32c(block) or m.read(self.dst + j * bs, bs) != block:
                raise AssertionError(f"block {self.copied + j}: status {status}, the copy or its CRC-32C differs")
        self.copied += count
        return self.copied < self.blocks  # False: all blocks copied, the workload ends
# [end example]


def _factorial(n: int) -> int:
    out = 1
    for i in range(2, n + 1):
        out = out * i & 0xFFFFFFFF
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the migrations under load, report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=384, help="DMA blocks to copy and verify")
    ap.add_argument("--block-size", type=int, default=65536, help="bytes per block")
    ap.add_argument("--migrations", type=int, default=3, help="how many times the device moves")
    ap.add_argument("--tcp", action="store_true",
                    help="migrate over TCP (no fds travel; the host re-attaches RAM and eventfds)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    ap.add_argument("-p", action="append", default=[], dest="plugin_specs", metavar="no:NAME|MODULE",
                    help="plugin selection of the device processes, as pcidev -p; repeatable")
    args = ap.parse_args(argv)
    workload = EduWorkload(args.blocks, args.block_size)
    # [example: run edu]
    try:
        result = migrate_under_load(
            "edu", workload, count=args.migrations, iterations=-(-args.blocks // BATCH),
            transport="tcp" if args.tcp else "unix", plugin_specs=args.plugin_specs,
            properties={"engine": True, "chunk": 8192, "delay": 0.0005},  # DMA in flight at each stop
            ram_size=max(64 << 20, 2 * BATCH * args.block_size + (16 << 20)))
    except PcidevError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result)  # one line per migration: downtime, state size, the workload's progress
    # [end example]
    print(f"{workload.copied} blocks of {args.block_size} bytes copied by DMA and verified: 0 CRC-32C mismatches")
    if args.json:
        print(json.dumps({"iterations": result.iterations, "seconds": result.seconds,
                          "migrations": [dict(m.report) for m in result.migrations]}, indent=2, default=str))
    return 0 if len(result.migrations) == args.migrations else 1


if __name__ == "__main__":
    sys.exit(main())
