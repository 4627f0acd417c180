"""One NVMe command on its way through the controller.

The controller core fetches a 64-byte Submission Queue Entry (SQE), copies it
out of guest memory and decodes it once into a :class:`Request`; the admin
command set or the I/O command set (``io.py``) executes it and hands it back
with :meth:`NvmeController.complete() <pcidev_nvme.controller.NvmeController.complete>`,
exactly once.

SQE layout (NVMe Base 2.0, figure "Common Command Format")::

    00  CDW0: opcode 7:0 | FUSE 9:8 | PSDT 15:14 | CID 31:16
    04  NSID
    08  CDW2, CDW3 (command specific)
    10  MPTR (metadata pointer)
    18  DPTR: PRP1 (18h) and PRP2 (20h), or SGL1 (18h..27h)
    28  CDW10 .. CDW15

All fields are plain attributes (decoded once, at fetch), because the data
path reads them on every I/O.

:class:`ControllerPort` is what a command set sees of the controller (the
contract in ``docs/nvme-contract.md``), so the command sets never import it.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol

from pcidev.dma import GuestMemory
from pcidev_nvme.limits import SQE_SIZE
from pcidev_nvme.logs import SmartCounters
from pcidev_nvme.namespace import Namespace
from pcidev_nvme.ns_smart import NamespaceSmart
from pcidev_nvme.status import NvmeStatusError

__all__ = ["Request", "SQE", "SQE_SIZE", "decode_sqe", "lba_extent", "ControllerPort", "count_read",
           "count_write"]


#: opcode, flags, cid, nsid, cdw2, cdw3, mptr, prp1, prp2, cdw10..cdw15
SQE = struct.Struct("<BBHIIIQQQIIIIII")
_unpack_from = SQE.unpack_from


class Request:
    """A decoded Submission Queue Entry plus the core's bookkeeping.

    Build one with :func:`decode_sqe` (the fetch loop's way: no validation, no
    copy of the entry) or with the constructor (keyword names as below). Fields the
    data path may read:

    :ivar sqid: submission queue the command came from (0 = admin).
    :ivar cid: command identifier (CDW0 31:16).
    :ivar opcode: CDW0 7:0.
    :ivar nsid: namespace identifier (DW1).
    :ivar sqe: the 64 raw bytes of the entry, as fetched (read only).
    :ivar flags: CDW0 15:8 (FUSE in bits 1:0, PSDT in bits 7:6).
    :ivar cdw2: DW2.
    :ivar cdw3: DW3.
    :ivar mptr: metadata pointer (DW4-5).
    :ivar prp1: DW6-7 (first PRP entry, or the first half of SGL1).
    :ivar prp2: DW8-9 (second PRP entry / PRP list pointer, or the second half of SGL1).
    :ivar cdw10: DW10 … :ivar cdw15: DW15.
    :ivar ctx: free slot for whoever executes the command (the data path may
        keep per-command state here); the core never reads it.
    :ivar sq: (core bookkeeping) the submission queue object it was fetched from.
    :ivar gen: (core) controller generation at fetch; a completion from an older
        generation is dropped.
    :ivar t_fetch: (core) ``time.monotonic()`` of the fetch batch (controller busy time).
    :ivar done: (core) True once the completion was handed to the core (exactly-once guard).
    :ivar parked: (core) held by the controller indefinitely (an Asynchronous Event Request).
    """

    __slots__ = ("sqid", "cid", "opcode", "nsid", "_raw", "_off", "flags", "cdw2", "cdw3", "mptr", "prp1", "prp2",
                 "cdw10", "cdw11", "cdw12", "cdw13", "cdw14", "cdw15", "ctx", "sq", "gen", "t_fetch", "done",
                 "parked")

    sqid: int
    cid: int
    opcode: int
    nsid: int
    flags: int
    cdw2: int
    cdw3: int
    mptr: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int
    ctx: Any
    sq: Any
    gen: int
    t_fetch: float
    done: bool
    parked: bool

    def __init__(self, sqid: int, cid: int, opcode: int, nsid: int, sqe: bytes, flags: int = 0, cdw2: int = 0,
                 cdw3: int = 0, mptr: int = 0, prp1: int = 0, prp2: int = 0, cdw10: int = 0, cdw11: int = 0,
                 cdw12: int = 0, cdw13: int = 0, cdw14: int = 0, cdw15: int = 0, ctx: Any = None, sq: Any = None,
                 gen: int = 0, t_fetch: float = 0.0, done: bool = False, parked: bool = False) -> None:
        self.sqid = sqid
        self.cid = cid
        self.opcode = opcode
        self.nsid = nsid
        self._raw = sqe
        self._off = 0
        self.flags = flags
        self.cdw2 = cdw2
        self.cdw3 = cdw3
        self.mptr = mptr
        self.prp1 = prp1
        self.prp2 = prp2
        self.cdw10 = cdw10
        self.cdw11 = cdw11
        self.cdw12 = cdw12
        self.cdw13 = cdw13
        self.cdw14 = cdw14
        self.cdw15 = cdw15
        self.ctx = ctx
        self.sq = sq
        self.gen = gen
        self.t_fetch = t_fetch
        self.done = done
        self.parked = parked

    @property
    def sqe(self) -> bytes:
        """The 64 raw bytes of the entry, as fetched."""
        raw, off = self._raw, self._off
        if not off and len(raw) == SQE_SIZE:
            return bytes(raw)
        return bytes(raw[off:off + SQE_SIZE])

    @property
    def fuse(self) -> int:
        """Fused operation (CDW0 9:8): 0 normal, 1 first, 2 second."""
        return self.flags & 0x3

    @property
    def psdt(self) -> int:
        """PRP or SGL for Data Transfer (CDW0 15:14): 0 PRP, 1 SGL (MPTR buffer), 2 SGL (MPTR SGL)."""
        return (self.flags >> 6) & 0x3

    @property
    def sgl1(self) -> bytes:
        """The 16-byte SGL descriptor in DPTR (bytes 24..39 of the SQE)."""
        return self.sqe[24:40]

    @property
    def cdw0(self) -> int:
        """The whole first dword."""
        return self.opcode | (self.flags << 8) | (self.cid << 16)

    def __repr__(self) -> str:
        return (f"<Request sq{self.sqid} cid={self.cid:#x} opc={self.opcode:#04x} nsid={self.nsid:#x} "
                f"cdw10={self.cdw10:#x} cdw11={self.cdw11:#x} cdw12={self.cdw12:#x}>")


_new = object.__new__


def decode_sqe(sqid: int, raw: bytes, offset: int = 0, sq: Any = None, gen: int = 0, t_fetch: float = 0.0) -> Request:
    """Decode the 64-byte entry at ``raw[offset:offset + 64]`` into a :class:`Request`.

    :param sqid: the submission queue it came from.
    :param raw: an immutable buffer (``bytes``) holding at least ``offset + 64`` bytes;
        the request keeps a reference to it for :attr:`Request.sqe` (no copy).
    :param offset: where the entry starts.
    :param sq: the core's queue object (bookkeeping).
    :param gen: the controller generation (bookkeeping).
    :param t_fetch: fetch time (bookkeeping).
    :returns: the request.
    :raises struct.error: if ``raw`` is too short.
    """
    req = _new(Request)
    (req.opcode, req.flags, req.cid, req.nsid, req.cdw2, req.cdw3, req.mptr, req.prp1, req.prp2,
     req.cdw10, req.cdw11, req.cdw12, req.cdw13, req.cdw14, req.cdw15) = _unpack_from(raw, offset)
    if type(raw) is not bytes:  # a mutable buffer could change under the request: keep a copy
        raw, offset = bytes(raw[offset:offset + SQE_SIZE]), 0
    req.sqid = sqid
    req._raw = raw
    req._off = offset
    req.ctx = None
    req.sq = sq
    req.gen = gen
    req.t_fetch = t_fetch
    req.done = False
    req.parked = False
    return req


def lba_extent(req: Request) -> tuple[int, int]:
    """(SLBA, NLB) of a command that addresses logical blocks like Read and Write: SLBA in
    CDW10-11, NLB in CDW12 bits 15:0 (zero's based). Not checked against a namespace."""
    return req.cdw10 | req.cdw11 << 32, (req.cdw12 & 0xFFFF) + 1


class ControllerPort(Protocol):
    """What a command set uses of the controller (``docs/nvme-contract.md``).

    :ivar page_size: the memory page size CC.MPS selects (bytes).
    :ivar mdts_bytes: the largest data transfer (bytes), or None for no limit.
    :ivar namespaces: attached namespaces by NSID.
    :ivar smart: the SMART counters (:class:`~pcidev_nvme.logs.SmartCounters`).
    :ivar ns_smart: the per-namespace SMART counters (:class:`~pcidev_nvme.ns_smart.NamespaceSmart`):
        a command set counts each command there too, by its namespace's NSID.
    """

    page_size: int
    mdts_bytes: int | None
    namespaces: dict[int, Namespace]
    smart: SmartCounters
    ns_smart: NamespaceSmart

    @property
    def dma(self) -> GuestMemory:
        """Guest memory for DMA; raises :class:`~pcidev.errors.DmaError` while bus
        mastering is off."""

    @property
    def volatile_write_cache(self) -> bool:
        """Feature 06h WCE: False means every write must be durable before it completes."""

    def complete(self, req: Request, status: int = 0, dw0: int = 0, dw1: int = 0, *,
                 error: NvmeStatusError | None = None) -> None:
        """Post the completion of ``req`` (thread-safe; exactly once per request)."""


def count_read(ctrl: ControllerPort, nsid: int, nbytes: int) -> None:
    """Count a host read of ``nbytes`` on namespace ``nsid`` in the controller's SMART
    counters and in the namespace's (the fast path's batches sum their own)."""
    ctrl.smart.record_read(nbytes)
    ctrl.ns_smart.record_read(nsid, nbytes)


def count_write(ctrl: ControllerPort, nsid: int, nbytes: int) -> None:
    """Count a host write of ``nbytes`` on namespace ``nsid``, as :func:`count_read`."""
    ctrl.smart.record_write(nbytes)
    ctrl.ns_smart.record_write(nsid, nbytes)
