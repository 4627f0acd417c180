"""crc32c-verified NVMe blocks for the vfio-user reconnect and migration tests."""

from __future__ import annotations

import os

import crc32c

from pcidev_nvme.testing.driver import NvmeDriver

BLOCK = 512
CHUNK = 4096  # one write: 8 blocks


class Pattern:
    """Written blocks and their crc32c, verified per block."""

    def __init__(self) -> None:
        self.crcs: dict[int, int] = {}

    def write(self, drv: NvmeDriver, slba: int, qid: int) -> None:
        data = os.urandom(CHUNK)
        drv.write(1, slba, data, qid=qid)
        for i in range(CHUNK // BLOCK):
            self.crcs[slba + i] = crc32c.crc32c(data[i * BLOCK:(i + 1) * BLOCK])

    def verify(self, drv: NvmeDriver, qids: tuple[int, ...] = (1, 2)) -> None:
        lbas = sorted(self.crcs)
        for n, first in enumerate(range(0, len(lbas), CHUNK // BLOCK)):
            slba = lbas[first]
            data = drv.read(1, slba, CHUNK // BLOCK, qid=qids[n % len(qids)])
            for i in range(CHUNK // BLOCK):
                assert crc32c.crc32c(data[i * BLOCK:(i + 1) * BLOCK]) == self.crcs[slba + i], f"LBA {slba + i}"


def host_writes(drv: NvmeDriver) -> int:
    """SMART Host Write Commands (u128 at byte 80 of log page 02h)."""
    return int.from_bytes(drv.get_log(0x02, 512)[80:96], "little")
