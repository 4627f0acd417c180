"""Data pointers: walking PRP entries and lists, and SGL descriptors and segments.

An NVMe command names its data buffer in the Data Pointer (SQE bytes 24-39), as
PRP Entry 1 and 2 or as the first SGL descriptor (CDW0.PSDT says which). The
functions here turn a data pointer plus a transfer length into a list of
``(gpa, length)`` pieces of guest memory, ready for
:meth:`pcidev.dma.GuestMemory.sg_views`. Adjacent pieces are merged, so a
physically contiguous buffer comes back as one piece whatever its page count.

Only the structure is checked here (offsets, list chaining, descriptor types and
lengths, the walk's bounds); the guest addresses of the data itself are checked
when views are taken (:func:`map_views`), where a piece outside guest memory
becomes Data Transfer Error. PRP lists and SGL segments are read from guest
memory during the walk, so an unreadable list is a Data Transfer Error at once.

A hostile guest can build PRP lists or SGL segments that point back at themselves.
Every walk is bounded: a PRP walk reads at most one list entry per data page of
the transfer (plus one chain pointer per list page), and an SGL walk stops after
:data:`MAX_SGL_DESCRIPTORS` descriptors or as soon as the descriptors describe
more data than the command transfers.

PRP rules (NVMe Base 2.0, "Physical Region Page Entry and List"):

* PRP1 may start anywhere in a memory page but must be dword aligned.
* If the rest of the transfer fits in one more page, PRP2 is that page's address,
  with offset 0. Otherwise PRP2 points to a PRP list; the list pointer may have an
  offset (qword aligned). Every entry in a list is a page address with offset 0.
* When a list needs more entries than fit in the rest of its page, the page's last
  entry points to the next list page (offset 0).
* A bad offset is PRP Offset Invalid; list memory that cannot be read is Data
  Transfer Error.

SGL rules ("Scatter Gather List"): descriptors are 16 bytes (address, length,
identifier = type << 4 | subtype). Supported: Data Block (0h), Bit Bucket (1h, only
for controller-to-host transfers), Segment (2h) and Last Segment (3h), all with the
Address subtype. A Segment's last descriptor must be a Segment or Last Segment
descriptor, the segment a Last Segment points to must not contain one, and
segment lengths are non-zero multiples of 16. The descriptors must describe
exactly the transfer length (SGLS does not advertise longer SGLs).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Literal, overload

from pcidev.dma import GuestMemory
from pcidev.errors import DmaError
from pcidev_nvme.request import Request
from pcidev_nvme.status import NvmeStatusError, Status

__all__ = [
    "MAX_SGL_DESCRIPTORS",
    "MAX_TRANSFER",
    "PSDT_PRP",
    "PSDT_SGL_MPTR_CONTIG",
    "PSDT_SGL_MPTR_SGL",
    "SGL_BIT_BUCKET",
    "SGL_DATA_BLOCK",
    "SGL_LAST_SEGMENT",
    "SGL_SEGMENT",
    "data_segments",
    "map_views",
    "prp_segments",
    "sgl_descriptor",
    "sgl_segments",
]

#: CDW0.PSDT values.
PSDT_PRP = 0
PSDT_SGL_MPTR_CONTIG = 1
PSDT_SGL_MPTR_SGL = 2

#: SGL descriptor types (identifier bits 7:4).
SGL_DATA_BLOCK = 0x0
SGL_BIT_BUCKET = 0x1
SGL_SEGMENT = 0x2
SGL_LAST_SEGMENT = 0x3
SGL_KEYED_DATA_BLOCK = 0x4
SGL_TRANSPORT_DATA_BLOCK = 0x5

#: Most descriptors (of every type, segment descriptors included) one SGL walk reads.
MAX_SGL_DESCRIPTORS = 4096

#: Largest transfer any command can describe: 65536 blocks of 4 KiB (NLB is 16 bits).
MAX_TRANSFER = 65536 * 4096

#: Byte offsets in the SQE, for the Error Information log's parameter location.
OFF_DPTR1 = 24
OFF_PRP2 = 32

_DESC = struct.Struct("<QI3xB")
_CMD, _SEGMENT, _LAST = 0, 1, 2  # where the SGL walk is: the command, a Segment, the last one
_desc_unpack_from = _DESC.unpack_from


def sgl_descriptor(address: int, length: int, dtype: int, subtype: int = 0) -> bytes:
    """Encode one 16-byte SGL descriptor (for hosts and tests).

    :param address: the address field.
    :param length: the length field (32 bits).
    :param dtype: descriptor type (``SGL_DATA_BLOCK``...).
    :param subtype: descriptor subtype (0 = Address).
    :returns: the 16 bytes.
    """
    return _DESC.pack(address, length, (dtype & 0xF) << 4 | (subtype & 0xF))


def _transfer_error(message: str, offset: int | None) -> NvmeStatusError:
    return NvmeStatusError(Status.DATA_TRANSFER_ERROR, message, param_offset=offset)


def prp_segments(
    mem: GuestMemory, prp1: int, prp2: int, length: int, page_size: int
) -> list[tuple[int, int]]:
    """The guest memory pieces a PRP data pointer describes for ``length`` bytes.

    :param mem: guest memory (PRP lists are read from it).
    :param prp1: PRP Entry 1.
    :param prp2: PRP Entry 2 (a page address or a PRP list pointer).
    :param length: bytes to transfer (0 gives ``[]``).
    :param page_size: the controller's memory page size (CC.MPS), a power of two >= 4096.
    :returns: ``(gpa, length)`` pieces in transfer order, adjacent ones merged.
    :raises NvmeStatusError: PRP Offset Invalid for a misplaced offset, Data Transfer
        Error for an unreadable PRP list, Invalid Field for a length beyond
        :data:`MAX_TRANSFER`.
    """
    if length <= 0:
        return []
    if length > MAX_TRANSFER:
        raise NvmeStatusError(Status.INVALID_FIELD, f"transfer of {length} bytes is too large")
    if prp1 & 3:
        raise NvmeStatusError(
            Status.PRP_OFFSET_INVALID, f"PRP1 {prp1:#x} is not dword aligned", param_offset=OFF_DPTR1
        )
    mask = page_size - 1
    first = page_size - (prp1 & mask)
    if length <= first:
        return [(prp1, length)]
    remaining = length - first
    if remaining <= page_size:
        if prp2 & mask:
            raise NvmeStatusError(
                Status.PRP_OFFSET_INVALID,
                f"PRP2 {prp2:#x} has a page offset",
                param_offset=OFF_PRP2,
            )
        if prp1 + first == prp2:
            return [(prp1, length)]
        return [(prp1, first), (prp2, remaining)]
    # PRP2 is a PRP list pointer.
    if prp2 & 7:
        raise NvmeStatusError(
            Status.PRP_OFFSET_INVALID,
            f"PRP list pointer {prp2:#x} is not qword aligned",
            param_offset=OFF_PRP2,
        )
    out: list[tuple[int, int]] = []
    cur, cur_len = prp1, first
    nents = (remaining + mask) // page_size  # data entries still to read
    list_addr = prp2
    while nents:
        slots = (page_size - (list_addr & mask)) >> 3
        if nents <= slots:
            take, chain = nents, 0
        else:
            take, chain = slots - 1, 1
        count = take + chain
        try:
            raw = mem.read(list_addr, count << 3)
        except NvmeStatusError:  # (Invalid Use of Controller Memory Buffer)
            raise
        except DmaError as exc:
            raise _transfer_error(f"PRP list at {list_addr:#x}: {exc}", OFF_PRP2) from None
        entries = struct.unpack(f"<{count}Q", raw)
        e0 = entries[0]
        if (
            take > 1
            and not e0 & mask
            and entries[take - 1] == e0 + (take - 1) * page_size
            and entries[:take] == tuple(range(e0, e0 + take * page_size, page_size))
        ):
            # Physically contiguous pages (the common case): one piece, checked in C.
            n = take * page_size
            if n > remaining:
                n = remaining
            remaining -= n
            if cur + cur_len == e0:
                cur_len += n
            else:
                out.append((cur, cur_len))
                cur, cur_len = e0, n
            take_loop = 0
        else:
            take_loop = take
        for i in range(take_loop):
            e = entries[i]
            if e & mask:
                raise NvmeStatusError(
                    Status.PRP_OFFSET_INVALID,
                    f"PRP list entry {e:#x} at {list_addr + 8 * i:#x} has a page offset",
                )
            n = page_size if remaining > page_size else remaining
            remaining -= n
            if cur + cur_len == e:
                cur_len += n
            else:
                out.append((cur, cur_len))
                cur, cur_len = e, n
        nents -= take
        if chain:
            nxt = entries[take]
            if nxt & mask:
                raise NvmeStatusError(
                    Status.PRP_OFFSET_INVALID,
                    f"PRP list chain pointer {nxt:#x} at {list_addr + 8 * take:#x} "
                    "has a page offset",
                )
            list_addr = nxt
    out.append((cur, cur_len))
    return out


# Without bit buckets allowed, every piece has an address: the overloads say so.
@overload
def sgl_segments(
    mem: GuestMemory,
    sgl1: bytes | bytearray | memoryview,
    length: int,
    *,
    allow_bit_bucket: Literal[False],
    max_descriptors: int = ...,
) -> list[tuple[int, int]]: ...


@overload
def sgl_segments(
    mem: GuestMemory,
    sgl1: bytes | bytearray | memoryview,
    length: int,
    *,
    allow_bit_bucket: bool = ...,
    max_descriptors: int = ...,
) -> Sequence[tuple[int | None, int]]: ...


def sgl_segments(
    mem: GuestMemory,
    sgl1: bytes | bytearray | memoryview,
    length: int,
    *,
    allow_bit_bucket: bool = True,
    max_descriptors: int = MAX_SGL_DESCRIPTORS,
) -> Sequence[tuple[int | None, int]]:
    """The guest memory pieces an SGL describes for ``length`` bytes.

    :param mem: guest memory (SGL segments are read from it).
    :param sgl1: the 16-byte SGL descriptor of the command (SQE bytes 24-39).
    :param length: bytes to transfer.
    :param allow_bit_bucket: accept Bit Bucket descriptors. Pass ``False`` for
        host-to-controller transfers (writes), where a bit bucket is SGL Descriptor
        Type Invalid.
    :param max_descriptors: bound on the descriptors read (segment descriptors
        included); more is Invalid Number of SGL Descriptors.
    :returns: ``(gpa, length)`` pieces in transfer order, adjacent ones merged;
        ``gpa`` is ``None`` for a bit bucket (data to be discarded).
    :raises NvmeStatusError: SGL Descriptor Type Invalid, Invalid SGL Segment
        Descriptor, Invalid Number of SGL Descriptors, Data SGL Length Invalid or
        Data Transfer Error (segment memory unreadable).
    """
    if length > MAX_TRANSFER:
        raise NvmeStatusError(Status.INVALID_FIELD, f"transfer of {length} bytes is too large")
    out: list[tuple[int | None, int]] = []
    cur: int | None = None
    cur_len = 0
    total = 0
    count = 1
    # The command's own descriptor is handled as a one-entry segment of kind _CMD.
    descs: list[tuple[int, int, int]] = [_desc_unpack_from(sgl1, 0)]
    kind = _CMD
    where: int | None = OFF_DPTR1  # parameter error location while in the command
    while True:
        next_segment: tuple[int, int, int] | None = None
        last_index = len(descs) - 1
        for i, (addr, dlen, ident) in enumerate(descs):
            dtype = ident >> 4
            if ident & 0xF and dtype <= SGL_LAST_SEGMENT:
                raise NvmeStatusError(
                    Status.SGL_DESCR_TYPE_INVALID,
                    f"SGL descriptor subtype {ident & 0xF:#x} is not supported",
                    param_offset=where,
                )
            if dtype == SGL_DATA_BLOCK or dtype == SGL_BIT_BUCKET:
                if kind == _SEGMENT and i == last_index:
                    raise NvmeStatusError(
                        Status.INVALID_SGL_SEG_DESCR,
                        "an SGL Segment does not end with a Segment or Last Segment descriptor",
                    )
                if dtype == SGL_BIT_BUCKET:
                    if not allow_bit_bucket:
                        raise NvmeStatusError(
                            Status.SGL_DESCR_TYPE_INVALID,
                            "SGL Bit Bucket descriptor in a host-to-controller transfer",
                            param_offset=where,
                        )
                    gpa: int | None = None
                else:
                    gpa = addr
                if not dlen:
                    continue
                total += dlen
                if total > length:
                    raise NvmeStatusError(
                        Status.DATA_SGL_LEN_INVALID,
                        f"the SGL describes more than the {length} bytes transferred",
                        param_offset=where,
                    )
                if cur_len and (
                    (cur is None and gpa is None)
                    or (cur is not None and gpa is not None and cur + cur_len == gpa)
                ):
                    cur_len += dlen
                else:
                    if cur_len:
                        out.append((cur, cur_len))
                    cur, cur_len = gpa, dlen
            elif dtype == SGL_SEGMENT or dtype == SGL_LAST_SEGMENT:
                if kind == _LAST:
                    raise NvmeStatusError(
                        Status.INVALID_SGL_SEG_DESCR,
                        "the last SGL segment contains a segment descriptor",
                    )
                if i != last_index:
                    raise NvmeStatusError(
                        Status.INVALID_NUM_SGL_DESCRS,
                        "an SGL segment descriptor is not the last descriptor of its segment",
                    )
                if dlen == 0 or dlen & 0xF:
                    raise NvmeStatusError(
                        Status.INVALID_SGL_SEG_DESCR,
                        f"SGL segment length {dlen} is not a non-zero multiple of 16",
                        param_offset=where,
                    )
                next_segment = (addr, dlen, _LAST if dtype == SGL_LAST_SEGMENT else _SEGMENT)
            else:
                raise NvmeStatusError(
                    Status.SGL_DESCR_TYPE_INVALID,
                    f"SGL descriptor type {dtype:#x} is not supported",
                    param_offset=where,
                )
        if next_segment is None:
            break
        seg_addr, seg_len, kind = next_segment
        count += seg_len >> 4
        if count > max_descriptors:
            raise NvmeStatusError(
                Status.INVALID_NUM_SGL_DESCRS,
                f"the SGL has more than {max_descriptors} descriptors",
            )
        try:
            raw = mem.read(seg_addr, seg_len)
        except NvmeStatusError:  # (Invalid Use of Controller Memory Buffer)
            raise
        except DmaError as exc:
            raise _transfer_error(f"SGL segment at {seg_addr:#x}: {exc}", None) from None
        descs = list(_DESC.iter_unpack(raw))
        where = None
    if cur_len:
        out.append((cur, cur_len))
    if total != length:
        raise NvmeStatusError(
            Status.DATA_SGL_LEN_INVALID,
            f"the SGL describes {total} bytes, the command transfers {length}",
            param_offset=OFF_DPTR1,
        )
    return out


_SQE_DPTR = struct.Struct("<QQ")


@overload
def data_segments(
    mem: GuestMemory,
    req: Request,
    length: int,
    page_size: int,
    *,
    to_host: Literal[False],
) -> list[tuple[int, int]]: ...


@overload
def data_segments(
    mem: GuestMemory,
    req: Request,
    length: int,
    page_size: int,
    *,
    to_host: bool = ...,
) -> Sequence[tuple[int | None, int]]: ...


def data_segments(
    mem: GuestMemory,
    req: Request,
    length: int,
    page_size: int,
    *,
    to_host: bool = True,
) -> Sequence[tuple[int | None, int]]:
    """The data buffer of command ``req``: PRP or SGL by CDW0.PSDT.

    :param mem: guest memory.
    :param req: the request; only ``req.sqe`` (the 64-byte SQE) is used.
    :param length: bytes the command transfers.
    :param page_size: the controller's memory page size.
    :param to_host: the transfer goes from the controller to the host (a read);
        bit buckets are allowed only then.
    :returns: ``(gpa, length)`` pieces (``gpa`` ``None`` for a bit bucket).
    :raises NvmeStatusError: Invalid Field for the reserved PSDT 11b, or any error
        of :func:`prp_segments` / :func:`sgl_segments`.
    """
    sqe = req.sqe
    psdt = sqe[1] >> 6
    if psdt == PSDT_PRP:
        prp1, prp2 = _SQE_DPTR.unpack_from(sqe, 24)
        return prp_segments(mem, prp1, prp2, length, page_size)
    if psdt == 3:
        raise NvmeStatusError(Status.INVALID_FIELD, "PSDT 11b is reserved", param_offset=1)
    return sgl_segments(mem, memoryview(sqe)[24:40], length, allow_bit_bucket=to_host)


def map_views(
    mem: GuestMemory, segments: list[tuple[int, int]], *, write: bool
) -> list[memoryview]:
    """Views of guest memory for pieces without bit buckets, errors as NVMe statuses.

    :param mem: guest memory.
    :param segments: ``(gpa, length)`` pieces.
    :param write: the device writes into them (a read command).
    :returns: the views (release them when done).
    :raises NvmeStatusError: Data Transfer Error if any piece is outside guest
        memory (or read-only for ``write``).
    """
    try:
        return mem.sg_views(segments, write=write)
    except NvmeStatusError:  # (Invalid Use of Controller Memory Buffer)
        raise
    except DmaError as exc:
        raise _transfer_error(str(exc), OFF_DPTR1) from None
