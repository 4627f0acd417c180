"""Get LBA Status (admin opcode 86h).

The command returns LBA Status Descriptors (``struct nvme_lba_status_desc``: DSLBA,
NLB, Status) for the logical blocks ``SLBA`` (CDW10-11) .. ``SLBA + RL - 1`` (RL,
CDW13 15:0; 0 = up to the end of the namespace) of the namespace NSID, chosen by the
Action Type (ATYPE, CDW13 31:24):

=====  ===========================================================================
ATYPE  Descriptors
=====  ===========================================================================
02h    the allocated ranges (Status 2h): the blocks that hold data, from the
       backend's extents (``allocated_ranges``: ``SEEK_DATA`` / ``SEEK_HOLE`` on an
       image file or a memfd, the page map of memory). The ranges between them are
       deallocated or were never written (they read as zeroes).
10h    scan, then return the Potentially Unrecoverable LBAs (Status 1h: each may
       report Unrecovered Read Error): the blocks marked by Write Uncorrectable --
       the controller tracks every such block, so a scan finds no others.
11h    the tracked Potentially Unrecoverable LBAs (Status 1h): the same blocks.
=====  ===========================================================================

A descriptor covers at most FFFFFFFFh blocks (longer ranges take several). The data
(``struct nvme_lba_status``) is an 8-byte header -- NLSD, the number of descriptors,
and CMPC, the completion condition -- then the descriptors; at most what MNDW (CDW12,
the 0's based number of dwords) allows is returned. CMPC is 1h when the descriptors
were cut short by MNDW (more follow: ask again from after the last one), 2h when every
descriptor of the range was returned.

Statuses: NSID not attached -> Invalid Namespace; SLBA beyond the namespace -> LBA Out
of Range; another ATYPE -> Invalid Field; a backend that does not answer in time (an
``nbd`` export: ``allocated_ranges_within``, 2 s) -> Namespace Not Ready (DNR clear: ask
again); another backend error -> Internal Error. The LBA Status Information Alert (feature
15h, log 0Eh) is not advertised.

**Deallocated or unwritten blocks.** The same knowledge decides the Deallocated or
Unwritten Logical Block error (Error Recovery DULBE, :func:`first_deallocated`), so the
two never disagree: a block is deallocated or unwritten when no byte of it is allocated
(it lies wholly in a hole of the backend). Holes have the backend's granularity: 4 KiB
pages for ``mem`` (its page map, rebuilt from the memfd's extents after a migration), the
file system's block for a ``file`` image (``SEEK_HOLE``; a file system that cannot punch
holes zeroes the range instead, which then stays allocated). A deallocation smaller than
that granularity zeroes the blocks and leaves them allocated -- Identify Namespace NPDG /
NPDA report the 4 KiB unit (:mod:`pcidev_nvme.namespace`). A backend without holes
(``null``: it keeps nothing) reports every block allocated and has NSFEAT.DAE clear.
"""

from __future__ import annotations

import errno
import struct

from pcidev_nvme.namespace import Namespace
from pcidev_nvme.status import NvmeStatusError, Status
from pcidev_nvme.uncorrectable import Uncorrectable

__all__ = ["get_lba_status", "first_deallocated", "ATYPE_ALLOCATED", "ATYPE_SCAN_UNTRACKED", "ATYPE_TRACKED",
           "LBARS_ERR", "LBARS_ALLOCATED", "CMPC_MNDW", "CMPC_RANGE"]

ATYPE_ALLOCATED = 0x02
ATYPE_SCAN_UNTRACKED = 0x10
ATYPE_TRACKED = 0x11
#: descriptor Status: each block may report Unrecovered Read Error
LBARS_ERR = 0x1
#: descriptor Status: the blocks are allocated
LBARS_ALLOCATED = 0x2
#: completion condition: cut short by MNDW / the whole range returned
CMPC_MNDW, CMPC_RANGE = 0x1, 0x2

_HEAD = struct.Struct("<IB3x")
_DESC = struct.Struct("<QIxB2x")
_OFF_CDW10, _OFF_CDW13 = 40, 52
_MAX_NLB = 0xFFFFFFFF
#: bytes of the namespace the backend is asked about at once
_WINDOW = 64 << 20


def _allocated(ns: Namespace, slba: int, nlb: int, most: int, *, admin: bool = False) -> list[tuple[int, int]]:
    """The allocated LBA ranges within ``slba .. slba + nlb``: a block partly allocated
    counts. The backend is asked window by window (:data:`_WINDOW` bytes), and no further
    once more than ``most`` ranges are known (the rest could not be returned anyway).
    ``admin``: for the admin path, through the backend's bounded ``allocated_ranges_within``
    when it has one (a network backend: an ``ETIMEDOUT`` rather than holding the admin queue).

    :raises OSError: the backend could not tell.
    """
    shift = ns.lba_shift
    get = getattr(ns.backend, "allocated_ranges", None)  # optional in the Backend protocol
    if get is None:
        return [(slba, nlb)]
    if admin:
        get = getattr(ns.backend, "allocated_ranges_within", get)
    out: list[tuple[int, int]] = []
    pos, end = slba, slba + nlb
    window = max(1, _WINDOW >> shift)
    while pos < end and len(out) <= most:
        n = min(window, end - pos)
        for off, k in get(pos << shift, n << shift):
            a = off >> shift
            b = (off + k + (1 << shift) - 1) >> shift
            if out and out[-1][0] + out[-1][1] >= a:
                start = out[-1][0]
                out[-1] = (start, max(b, start + out[-1][1]) - start)
            else:
                out.append((a, b - a))
        pos += n
    return out


def first_deallocated(ns: Namespace, slba: int, nlb: int) -> int | None:
    """The first block of ``slba .. slba + nlb`` (inside the namespace) that is deallocated
    or was never written -- no byte of it allocated, as Get LBA Status reports it -- or None.

    :param ns: the namespace.
    :param slba: the first block.
    :param nlb: the number of blocks (1 or more).
    """
    pos = slba
    for start, n in _allocated(ns, slba, nlb, nlb + 1):
        if start > pos:
            return pos
        pos = max(pos, start + n)
    return pos if pos < slba + nlb else None


def _clip(ranges: list[tuple[int, int]], slba: int, end: int) -> list[tuple[int, int]]:
    out = []
    for s, n in ranges:
        a, b = max(s, slba), min(s + n, end)
        if a < b:
            out.append((a, b - a))
    return out


def get_lba_status(ns: Namespace, uncorrectable: Uncorrectable, cdw10: int, cdw11: int, cdw12: int,
                   cdw13: int) -> bytes:
    """Execute Get LBA Status on ``ns``; returns the data ((MNDW + 1) * 4 bytes).

    :raises NvmeStatusError: LBA Out of Range, Invalid Field.
    """
    slba = cdw10 | cdw11 << 32
    length = ((cdw12 & 0xFFFFFFFF) + 1) * 4
    rl = cdw13 & 0xFFFF
    atype = cdw13 >> 24
    if atype not in (ATYPE_ALLOCATED, ATYPE_SCAN_UNTRACKED, ATYPE_TRACKED):
        raise NvmeStatusError(Status.INVALID_FIELD, f"action type {atype:#04x} is not supported",
                              param_offset=_OFF_CDW13 + 3)
    if slba >= ns.nlbas:
        raise NvmeStatusError(Status.LBA_RANGE, f"SLBA {slba:#x} is beyond namespace {ns.nsid}",
                              param_offset=_OFF_CDW10, lba=slba)
    end = ns.nlbas if rl == 0 else min(slba + rl, ns.nlbas)
    room = max(0, (min(length, 1 << 20) - _HEAD.size) // _DESC.size)
    if atype == ATYPE_ALLOCATED:
        try:
            ranges = _allocated(ns, slba, end - slba, room, admin=True)
        except OSError as exc:
            if exc.errno == errno.ETIMEDOUT:  # (the storage did not answer in time: ask again)
                raise NvmeStatusError(Status.NS_NOT_READY, f"namespace {ns.nsid}: {exc.strerror}",
                                      dnr=False) from None
            raise NvmeStatusError(Status.INTERNAL, f"namespace {ns.nsid}: allocation unknown: {exc}") from None
        status = LBARS_ALLOCATED
    else:
        ranges = _clip(uncorrectable.ranges(ns.nsid), slba, end)
        status = LBARS_ERR
    descs: list[tuple[int, int]] = []
    for s, n in ranges:
        while n > 0:
            k = min(n, _MAX_NLB)
            descs.append((s, k))
            s += k
            n -= k
        if len(descs) > room:
            break
    cmpc = CMPC_RANGE
    if len(descs) > room:
        descs = descs[:room]
        cmpc = CMPC_MNDW
    out = bytearray(_HEAD.pack(len(descs), cmpc))
    for s, n in descs:
        out += _DESC.pack(s, n, status)
    return bytes(out[:length])
