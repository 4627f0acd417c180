"""Constants shared by several modules of the NVMe controller (a leaf: imports nothing
of the project).

* entry sizes: :data:`SQE_SIZE`, :data:`CQE_SIZE`;
* controller timing: :data:`SHUTDOWN_DRAIN_TIMEOUT`, :data:`STATE_SAVE_INTERVAL`,
  :data:`FETCH_BATCH`;
* the limits the NVM I/O command set (:mod:`pcidev_nvme.io`) enforces and Identify
  (:mod:`pcidev_nvme.identify`, Identify Namespace in :mod:`pcidev_nvme.namespace`)
  reports: :data:`ONCS`, :data:`SGLS`, :data:`OCFS`, :data:`COPY_LIMITS`,
  :data:`MAX_DSM_RANGES`, :data:`DMRL`, :data:`DMRSL`, :data:`DMSL`, :data:`WZSL`,
  :data:`VSL`.
"""

from __future__ import annotations

__all__ = ["SQE_SIZE", "CQE_SIZE", "FETCH_BATCH", "STATE_SAVE_INTERVAL", "SHUTDOWN_DRAIN_TIMEOUT",
           "ONCS", "SGLS", "OCFS", "COPY_LIMITS", "MAX_DSM_RANGES", "DMRL", "DMRSL", "DMSL", "WZSL", "VSL"]

#: bytes of a submission queue entry (CC.IOSQES = 6)
SQE_SIZE = 64
#: bytes of a completion queue entry (CC.IOCQES = 4)
CQE_SIZE = 16

#: most SQ entries fetched in one go
FETCH_BATCH = 256
#: save the state file at most this often during activity (seconds)
STATE_SAVE_INTERVAL = 60.0
#: how long a shutdown waits for commands in flight before giving up on them
SHUTDOWN_DRAIN_TIMEOUT = 10.0

#: Identify Controller ONCS bits of the NVM command set: Compare (0), Write
#: Uncorrectable (1), Dataset Management (2), Write Zeroes (3), Verify (7), Copy (8).
#: The core ORs in its own (Save/Select in features, timestamp).
ONCS = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 7) | (1 << 8)

#: Identify Controller SGLS: SGLs supported without alignment or granularity
#: requirement (bits 1:0 = 01b), SGL Bit Bucket descriptor supported (bit 16), MPTR
#: holding an SGL descriptor for metadata (PSDT 10b, MSDS, bit 19).
SGLS = 0x1 | (1 << 16) | (1 << 19)

#: Identify Controller OCFS: Copy source range descriptor formats 0h (16b Guard tags), 1h
#: (64b Guard: 48-bit reference tags), 2h and 3h (the same with a source namespace per range:
#: cross-namespace copy, usable once the host enables them in Host Behavior Support CDFE).
OCFS = 0xF

#: Copy limits (Identify Namespace MSSRL, MCL, MSRC): at most 128 logical blocks per
#: source range, 1024 blocks per command, 128 source ranges (MSRC is 0's based).
COPY_LIMITS = (128, 1024, 127)

#: Ranges one Dataset Management command may carry (NR is 8 bits, 0's based): all are accepted.
MAX_DSM_RANGES = 256
#: Dataset Management Ranges Limit (Identify Controller NVM, CNS 06h): 0 = no limit
#: beyond the command's own 256.
DMRL = 0
#: Dataset Management Range Size Limit: 0 = no limit (a range's 32-bit length is accepted).
DMRSL = 0
#: Dataset Management Size Limit: 0 = no limit on the total.
DMSL = 0
#: Write Zeroes Size Limit (units of the minimum memory page size, 2^n): 0 = no limit.
WZSL = 0
#: Verify Size Limit: 0 = no limit.
VSL = 0
