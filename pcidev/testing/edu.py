"""The ``edu`` device's standard workload: DMA copies and factorials, each checked.

:class:`DmaCopies` is what pcidev's built-in plugin returns from
:func:`~pcidev.hookspecs.pcidev_migration_workload` for ``edu``, so
``examples/migrate_between_processes.py --device edu`` and any test asking
:func:`pcidev.testing.standard_workload` for ``edu`` get it. Each step computes a
factorial on the device, then posts ``qd`` copy descriptors (``queues`` is
meaningless here: edu has one ring) of fresh random 4 KiB blocks with an interrupt on
the last, waits for it and checks every descriptor's status, the CRC-32C the device
wrote and the copy itself. A descriptor whose interrupt never comes is counted lost;
the device gives no way to see a completion twice (``duplicate_completions`` is None).
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Mapping
from typing import Any

import crc32c

from pcidev.devices.edu import DESC, STATUS_DONE
from pcidev.testing.migration import Workload, WorkloadContext

__all__ = ["DmaCopies"]

RING = 64
BLOCK = 4096
#: edu's registers: FACTORIAL, RING_BASE, RING_SIZE, RING_TAIL, RING_CTRL
_FACTORIAL, _RING_BASE, _RING_SIZE, _RING_TAIL, _RING_CTRL = 0x08, 0x100, 0x108, 0x10C, 0x114


class DmaCopies(Workload):
    """Each step: a factorial, then ``batch`` DMA copies, every one checked.

    :param batch: descriptors per step (at most 63: the ring has 64 slots).
    :param seed: seed of the factorial arguments (None: random).
    """

    # the worker copies in small chunks and sleeps between them: a descriptor is in
    # flight at most stops
    properties = "engine=on,chunk=1024,delay=0.0002"

    def __init__(self, batch: int = 16, seed: int | None = None) -> None:
        self.batch = max(1, min(batch, RING - 1))
        self.seed = seed if seed is not None else random.randrange(1 << 32)
        self.rnd = random.Random(self.seed)
        self.copies = self.factorials = self.mismatches = self.lost = 0
        self.tail = 0

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> DmaCopies:
        """The workload for ``options`` (``qd``: descriptors per step, default 16; ``seed``)."""
        return cls(int(options.get("qd") or 16), options.get("seed"))

    def setup(self, ctx: WorkloadContext) -> None:
        m, p = ctx.machine, ctx.pdev
        self.ring = m.alloc(RING * 32)
        self.src, self.dst = m.alloc(self.batch * BLOCK), m.alloc(self.batch * BLOCK)
        p.iowrite64(0, _RING_BASE, self.ring)
        p.iowrite32(0, _RING_SIZE, RING)
        p.iowrite32(0, _RING_CTRL, 1)  # the engine is on

    def step(self, ctx: WorkloadContext) -> None:
        m, p = ctx.machine, ctx.pdev
        n = self.rnd.randrange(13)
        p.iowrite32(0, _FACTORIAL, n)
        if p.ioread32(0, _FACTORIAL) != _factorial(n):
            self.mismatches += 1
            raise AssertionError(f"{n}! read back wrong")
        self.factorials += 1
        payload = os.urandom(self.batch * BLOCK)
        m.write(self.src, payload)
        m.memory.fill(self.dst, self.batch * BLOCK, 0)
        slots = [(self.tail + j) % RING for j in range(self.batch)]
        for j, slot in enumerate(slots):  # interrupt on the last descriptor of the batch
            m.memory.write_struct(DESC, self.ring + 32 * slot, self.src + j * BLOCK, self.dst + j * BLOCK, BLOCK,
                                  int(j == self.batch - 1), 0, 0)
        before = p.irq_count(0)
        self.tail = (self.tail + self.batch) % RING
        p.iowrite32(0, _RING_TAIL, self.tail)  # the doorbell
        if not p.recorder.wait(0, above=before, timeout=30):
            self.lost += self.batch
            raise TimeoutError(f"no DMA interrupt for {self.batch} descriptors in 30 s")
        bad = []
        for j, slot in enumerate(slots):
            block = payload[j * BLOCK:(j + 1) * BLOCK]
            status, crc = struct.unpack("<II", m.read(self.ring + 32 * slot + 0x18, 8))
            if status != STATUS_DONE:
                self.lost += 1
                bad.append(f"descriptor {slot} not done (status {status})")
            elif crc != crc32c.crc32c(block) or m.read(self.dst + j * BLOCK, BLOCK) != block:
                self.mismatches += 1
                bad.append(f"descriptor {slot}: the copy or its CRC-32C differs")
            else:
                self.copies += 1
        if bad:
            raise AssertionError("; ".join(bad[:5]))

    def report(self) -> dict[str, Any]:
        return {"seed": self.seed, "copies": self.copies, "factorials": self.factorials,
                "blocks_checked": self.copies, "mismatches": self.mismatches, "lost_completions": self.lost,
                "duplicate_completions": None}


def _factorial(n: int) -> int:
    out = 1
    for i in range(2, n + 1):
        out = out * i & 0xFFFFFFFF
    return out
