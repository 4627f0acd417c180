"""Live-migrate a virtio-blk disk between processes while the software host keeps doing
verified I/O, with :func:`pcidev.testing.migrate_under_load`.

Each step writes random 4 KiB blocks and reads every one back (CRC-32C per block); at
the end every block written is read again and checked. Prints the downtime of the
migrations and the I/O verified (exit status 1 on any mismatch or error).

Run::

    .venv/bin/python examples/plugins/pcidev-virtio/examples/migrate_blk.py [--migrations N] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile

import crc32c

from pcidev.testing import Workload, WorkloadContext, migrate_under_load
from pcidev_virtio.blk_driver import BlkDriver
from pcidev_virtio.blk_spec import BlkStatus
from pcidev_virtio.testing.driver import VirtioDriver

BLOCK = 4096
BLOCKS = 2048  # an 8 MiB disk


class VerifiedBlocks(Workload):
    """Random 4 KiB writes, each read back; every block checked again at the end."""

    def setup(self, ctx: WorkloadContext) -> None:
        drv = VirtioDriver(ctx.machine, ctx.pdev)
        drv.init()
        self.blk = BlkDriver(drv.queues[0])
        self.crc: dict[int, int] = {}
        self.rng = random.Random(1)
        self.ios = 0

    def step(self, ctx: WorkloadContext) -> bool:
        for _ in range(16):
            block = self.rng.randrange(BLOCKS)
            data = os.urandom(BLOCK)
            if self.blk.write(block * 8, data) != BlkStatus.OK:
                raise AssertionError(f"write of block {block} failed")
            self.crc[block] = crc32c.crc32c(data)
            status, got = self.blk.read(block * 8, 8)
            if status != BlkStatus.OK or crc32c.crc32c(got) != self.crc[block]:
                raise AssertionError(f"block {block} read back wrong")
            self.ios += 2
        return True

    def verify(self, ctx: WorkloadContext) -> None:
        for block, crc in sorted(self.crc.items()):
            status, got = self.blk.read(block * 8, 8)
            if status != BlkStatus.OK or crc32c.crc32c(got) != crc:
                raise AssertionError(f"block {block}: CRC-32C mismatch after the migrations")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--migrations", type=int, default=10)
    ap.add_argument("--steps", type=int, default=400, help="workload steps (16 blocks each)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pcidev-blk-") as tmp:
        work = VerifiedBlocks()
        result = migrate_under_load("virtio-blk", work, count=args.migrations, iterations=args.steps,
                                    properties=f"file={tmp}/disk.img,size={BLOCK * BLOCKS}")
    downtimes = [m.downtime * 1000 for m in result.migrations if m.downtime is not None]
    if downtimes:
        print(f"{len(downtimes)} migrations: downtime median {statistics.median(downtimes):.2f} ms, "
              f"worst {max(downtimes):.2f} ms, state {result.migrations[0].state_size} bytes")
    print(f"{work.ios} verified I/Os, {len(work.crc)} blocks checked at the end: 0 CRC-32C mismatches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
