"""PRP and SGL walking (pcidev_nvme.prp), including hostile data pointers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcidev.dma import GuestMemory, alloc_memfd
from pcidev_nvme.prp import (
    MAX_SGL_DESCRIPTORS,
    MAX_TRANSFER,
    SGL_BIT_BUCKET,
    SGL_DATA_BLOCK,
    SGL_LAST_SEGMENT,
    SGL_SEGMENT,
    data_segments,
    map_views,
    prp_segments,
    sgl_descriptor,
    sgl_segments,
)
from pcidev_nvme.request import decode_sqe
from pcidev_nvme.status import NvmeStatusError, Status

PAGE = 4096
RAM = 8 << 20  # guest RAM at [0, 8 MiB); nothing is mapped above


@pytest.fixture(scope="module")
def mem():
    fd = alloc_memfd(RAM)
    gm = GuestMemory()
    gm.map(0, RAM, fd)
    yield gm
    gm.close()


def put_list(mem: GuestMemory, addr: int, entries: list[int]) -> None:
    mem.write(addr, struct.pack(f"<{len(entries)}Q", *entries))


def refused(fn, *args, **kwargs) -> NvmeStatusError:
    """Call ``fn(*args, **kwargs)``, which must raise NvmeStatusError; return the error."""
    with pytest.raises(NvmeStatusError) as ei:
        fn(*args, **kwargs)
    return ei.value


# ------------------------------------------------------------------------------ PRP


def test_prp1_only(mem):
    assert prp_segments(mem, 0x10000, 0, 4096, PAGE) == [(0x10000, 4096)]
    assert prp_segments(mem, 0x10200, 0xDEAD, 512, PAGE) == [(0x10200, 512)]
    # An offset PRP1 whose data stays in its page: PRP2 is ignored.
    assert prp_segments(mem, 0x10E00, 0xBAD, 0x200, PAGE) == [(0x10E00, 0x200)]


def test_zero_length_is_empty(mem):
    assert prp_segments(mem, 0x123, 0x456, 0, PAGE) == []


def test_prp2_second_page(mem):
    assert prp_segments(mem, 0x10800, 0x30000, 4096, PAGE) == [(0x10800, 0x800), (0x30000, 0x800)]
    # Contiguous pages are merged.
    assert prp_segments(mem, 0x10000, 0x11000, 8192, PAGE) == [(0x10000, 8192)]


def test_prp1_must_be_dword_aligned(mem):
    err = refused(prp_segments, mem, 0x10002, 0, 512, PAGE)
    assert err.status == Status.PRP_OFFSET_INVALID
    assert err.param_offset == 24


def test_prp2_data_pointer_must_have_no_offset(mem):
    err = refused(prp_segments, mem, 0x10000, 0x30008, 8192, PAGE)
    assert err.status == Status.PRP_OFFSET_INVALID
    assert err.param_offset == 32


def test_prp_list(mem):
    pages = [0x40000, 0x41000, 0x50000, 0x60000]
    put_list(mem, 0x20000, pages)
    segs = prp_segments(mem, 0x10000, 0x20000, 5 * PAGE, PAGE)
    assert segs == [(0x10000, PAGE), (0x40000, 2 * PAGE), (0x50000, PAGE), (0x60000, PAGE)]


def test_prp_contiguous_list_is_one_piece(mem):
    put_list(mem, 0x20000, [0x41000 + i * PAGE for i in range(31)])
    segs = prp_segments(mem, 0x40000, 0x20000, 128 * 1024 - 512, PAGE)
    assert segs == [(0x40000, 128 * 1024 - 512)]
    put_list(mem, 0x20000, [0x41000 + i * PAGE for i in range(30)] + [0x41208])
    with pytest.raises(NvmeStatusError):  # the last entry has an offset
        prp_segments(mem, 0x40000, 0x20000, 128 * 1024, PAGE)


def test_prp_list_last_entry_partial(mem):
    put_list(mem, 0x20000, [0x40000, 0x42000])
    segs = prp_segments(mem, 0x10C00, 0x20000, 0x400 + PAGE + 0x200, PAGE)
    assert segs == [(0x10C00, 0x400), (0x40000, PAGE), (0x42000, 0x200)]


def test_prp_list_pointer_with_offset(mem):
    put_list(mem, 0x20100, [0x40000, 0x50000])
    segs = prp_segments(mem, 0x10000, 0x20100, 3 * PAGE, PAGE)
    assert segs == [(0x10000, PAGE), (0x40000, PAGE), (0x50000, PAGE)]


def test_prp_list_pointer_must_be_qword_aligned(mem):
    assert refused(prp_segments, mem, 0x10000, 0x20004, 3 * PAGE, PAGE).status == Status.PRP_OFFSET_INVALID


def test_prp_list_chaining(mem):
    # The list starts 16 bytes before the end of its page: one data entry, then a
    # pointer to the next list page.
    put_list(mem, 0x20FF0, [0x40000, 0x21000])
    put_list(mem, 0x21000, [0x50000, 0x60000])
    segs = prp_segments(mem, 0x10000, 0x20FF0, 4 * PAGE, PAGE)
    assert segs == [(0x10000, PAGE), (0x40000, PAGE), (0x50000, PAGE), (0x60000, PAGE)]


def test_prp_list_chain_only_slot(mem):
    # A list pointer at the last slot of a page holds only the chain pointer.
    put_list(mem, 0x22FF8, [0x23000])
    put_list(mem, 0x23000, [0x40000, 0x50000])
    segs = prp_segments(mem, 0x10000, 0x22FF8, 3 * PAGE, PAGE)
    assert segs == [(0x10000, PAGE), (0x40000, PAGE), (0x50000, PAGE)]


def test_prp_list_entry_with_offset(mem):
    put_list(mem, 0x20000, [0x40000, 0x50200])
    assert refused(prp_segments, mem, 0x10000, 0x20000, 3 * PAGE, PAGE).status == Status.PRP_OFFSET_INVALID


def test_prp_chain_pointer_with_offset(mem):
    put_list(mem, 0x20FF0, [0x40000, 0x21008])
    assert refused(prp_segments, mem, 0x10000, 0x20FF0, 4 * PAGE, PAGE).status == Status.PRP_OFFSET_INVALID


def test_prp_list_outside_memory(mem):
    assert refused(prp_segments, mem, 0x10000, RAM + 0x1000, 3 * PAGE, PAGE).status == Status.DATA_TRANSFER_ERROR
    assert refused(prp_segments, mem, 0x10000, 1 << 63, 3 * PAGE, PAGE).status == Status.DATA_TRANSFER_ERROR


def test_prp_data_outside_memory_fails_when_mapped(mem):
    segs = prp_segments(mem, RAM - PAGE, RAM, 2 * PAGE, PAGE)
    assert segs == [(RAM - PAGE, 2 * PAGE)]
    assert refused(map_views, mem, segs, write=True).status == Status.DATA_TRANSFER_ERROR


def test_prp_self_loop_terminates(mem):
    # A list whose chain pointer points back at its own page: the walk reads exactly
    # as many entries as the length needs and stops.
    entries = [0x40000] * 511 + [0x24000]
    put_list(mem, 0x24000, entries)
    length = PAGE + 2000 * PAGE
    segs = prp_segments(mem, 0x10000, 0x24000, length, PAGE)
    assert sum(n for _, n in segs) == length


def test_prp_huge_length_refused(mem):
    assert refused(prp_segments, mem, 0x10000, 0x20000, MAX_TRANSFER + 1, PAGE).status == Status.INVALID_FIELD


def test_prp_bigger_page_size(mem):
    page = 16384
    put_list(mem, 0x20000, [0x40000, 0x80000])
    segs = prp_segments(mem, 0x10000, 0x20000, 3 * page, page)
    assert segs == [(0x10000, page), (0x40000, page), (0x80000, page)]
    with pytest.raises(NvmeStatusError):  # 4 KiB aligned is not 16 KiB aligned
        prp_segments(mem, 0x10000, 0x21000, 2 * page, page)


def expand_reference(mem, prp1, prp2, length, page):
    """Straightforward per-page model of the PRP rules (no merging)."""
    out = []
    first = min(length, page - prp1 % page)
    out.append((prp1, first))
    rest = length - first
    if rest == 0:
        return out
    if rest <= page:
        out.append((prp2, rest))
        return out
    addr = prp2
    while rest:
        slot_end = (addr // page + 1) * page
        e = mem.read_u64(addr)
        if addr + 8 == slot_end and rest > page:
            addr = e
            continue
        n = min(page, rest)
        out.append((e, n))
        rest -= n
        addr += 8
    return out


def merge(pieces):
    out = []
    for g, n in pieces:
        if out and out[-1][0] + out[-1][1] == g:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((g, n))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    off=st.integers(0, PAGE // 4 - 1).map(lambda x: x * 4),
    npages=st.integers(1, 1100),
    tail=st.integers(0, PAGE - 1),
    list_slot=st.integers(0, 511),
    seed=st.integers(0, 2**32 - 1),
    contiguous=st.booleans(),
)
def test_prp_matches_reference_model(mem, off, npages, tail, list_slot, seed, contiguous):
    import itertools
    import random

    rnd = random.Random(seed)
    counter = itertools.count()
    length = max(4, npages * PAGE - off - tail)
    prp1 = 0x100000 + off
    # Data pages anywhere in [2 MiB, 6 MiB); list pages in [1.25 MiB, 2 MiB).
    def data_page():
        if contiguous:  # runs of consecutive pages, as a real buffer gives
            return 0x200000 + (next(counter) % 1024) * PAGE
        return 0x200000 + rnd.randrange(1024) * PAGE

    prp2 = data_page()
    list_page = 0x140000
    rest = length - min(length, PAGE - off)
    if rest > PAGE:
        prp2 = list_page + list_slot * 8
        need = -(-rest // PAGE)
        addr = prp2
        lp = list_page
        while need:
            slots = (PAGE - addr % PAGE) // 8
            if need <= slots:
                put_list(mem, addr, [data_page() for _ in range(need)])
                need = 0
            else:
                lp += PAGE
                put_list(mem, addr, [data_page() for _ in range(slots - 1)] + [lp])
                need -= slots - 1
                addr = lp
    got = prp_segments(mem, prp1, prp2, length, PAGE)
    assert got == merge(expand_reference(mem, prp1, prp2, length, PAGE))
    assert sum(n for _, n in got) == length


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prp1=st.integers(0, 2**64 - 1),
    prp2=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, RAM // 8).map(lambda x: x * 8)),
    length=st.integers(0, 64 * PAGE),
    junk=st.lists(st.integers(0, 2**64 - 1), min_size=0, max_size=64),
)
def test_prp_hostile_inputs_only_raise_statuses(mem, prp1, prp2, length, junk):
    # Random list contents at the list pointer (if it is in memory).
    if junk and prp2 + 8 * len(junk) <= RAM and prp2 >= 0x300000:
        put_list(mem, prp2, junk)
    try:
        segs = prp_segments(mem, prp1, prp2, length, PAGE)
    except NvmeStatusError as exc:
        assert exc.status in (
            Status.PRP_OFFSET_INVALID,
            Status.DATA_TRANSFER_ERROR,
            Status.INVALID_FIELD,
        )
        return
    assert sum(n for _, n in segs) == length
    try:
        views = map_views(mem, segs, write=False)
    except NvmeStatusError as exc:
        assert exc.status == Status.DATA_TRANSFER_ERROR
    else:
        assert sum(len(v) for v in views) == length
        for v in views:
            v.release()


# ------------------------------------------------------------------------------ SGL


def D(addr, length):
    return sgl_descriptor(addr, length, SGL_DATA_BLOCK)


def B(length):
    return sgl_descriptor(0, length, SGL_BIT_BUCKET)


def SEG(addr, n):
    return sgl_descriptor(addr, 16 * n, SGL_SEGMENT)


def LAST(addr, n):
    return sgl_descriptor(addr, 16 * n, SGL_LAST_SEGMENT)


def put_segment(mem, addr, *descs):
    mem.write(addr, b"".join(descs))


def test_sgl_single_data_block(mem):
    assert sgl_segments(mem, D(0x10000, 4096), 4096) == [(0x10000, 4096)]
    assert sgl_segments(mem, D(0x10003, 513), 513) == [(0x10003, 513)]  # no alignment needed


def test_sgl_length_must_match(mem):
    for n in (4095, 4097):
        assert refused(sgl_segments, mem, D(0x10000, n), 4096).status == Status.DATA_SGL_LEN_INVALID


def test_sgl_segments_and_last_segment(mem):
    put_segment(mem, 0x30000, D(0x40000, 1000), D(0x40000 + 1000, 24), LAST(0x31000, 3))
    put_segment(mem, 0x31000, D(0x50000, 2048), B(512), D(0x60000, 512))
    segs = sgl_segments(mem, SEG(0x30000, 3), 4096)
    assert segs == [(0x40000, 1024), (0x50000, 2048), (None, 512), (0x60000, 512)]


def test_sgl_last_segment_in_command(mem):
    put_segment(mem, 0x30000, D(0x40000, 512), D(0x40200, 512))
    assert sgl_segments(mem, LAST(0x30000, 2), 1024) == [(0x40000, 1024)]


def test_sgl_bit_bucket_only_for_reads(mem):
    assert sgl_segments(mem, B(4096), 4096) == [(None, 4096)]
    assert refused(sgl_segments, mem, B(4096), 4096, allow_bit_bucket=False).status == Status.SGL_DESCR_TYPE_INVALID


@pytest.mark.parametrize("dtype", [0x4, 0x5, 0x6, 0xE, 0xF])
def test_sgl_unsupported_types(mem, dtype):
    err = refused(sgl_segments, mem, sgl_descriptor(0x10000, 4096, dtype), 4096)
    assert err.status == Status.SGL_DESCR_TYPE_INVALID
    assert err.param_offset == 24


def test_sgl_offset_subtype_refused(mem):
    err = refused(sgl_segments, mem, sgl_descriptor(0x10000, 4096, SGL_DATA_BLOCK, 1), 4096)
    assert err.status == Status.SGL_DESCR_TYPE_INVALID


def test_sgl_last_segment_may_not_hold_segment_descriptors(mem):
    put_segment(mem, 0x30000, D(0x40000, 512), SEG(0x31000, 1))
    assert refused(sgl_segments, mem, LAST(0x30000, 2), 1024).status == Status.INVALID_SGL_SEG_DESCR


def test_sgl_segment_descriptor_must_be_last_in_segment(mem):
    put_segment(mem, 0x30000, LAST(0x31000, 1), D(0x40000, 512))
    assert refused(sgl_segments, mem, SEG(0x30000, 2), 1024).status == Status.INVALID_NUM_SGL_DESCRS


def test_sgl_segment_must_end_with_segment_descriptor(mem):
    put_segment(mem, 0x30000, D(0x40000, 512), D(0x50000, 512))
    assert refused(sgl_segments, mem, SEG(0x30000, 2), 1024).status == Status.INVALID_SGL_SEG_DESCR


@pytest.mark.parametrize("length", [0, 8, 17, 33])
def test_sgl_segment_length_must_be_multiple_of_16(mem, length):
    err = refused(sgl_segments, mem, sgl_descriptor(0x30000, length, SGL_LAST_SEGMENT), 512)
    assert err.status == Status.INVALID_SGL_SEG_DESCR


def test_sgl_segment_self_loop_is_bounded(mem):
    put_segment(mem, 0x32000, SEG(0x32000, 1))
    assert refused(sgl_segments, mem, SEG(0x32000, 1), 4096).status == Status.INVALID_NUM_SGL_DESCRS


def test_sgl_loop_with_data_stops_at_length(mem):
    put_segment(mem, 0x33000, D(0x40000, 512), SEG(0x33000, 2))
    assert refused(sgl_segments, mem, SEG(0x33000, 2), 4096).status == Status.DATA_SGL_LEN_INVALID


def test_sgl_huge_segment_refused_without_reading(mem):
    err = refused(sgl_segments, mem, sgl_descriptor(0x30000, 0xFFFFFFF0, SGL_SEGMENT), 4096)
    assert err.status == Status.INVALID_NUM_SGL_DESCRS
    assert MAX_SGL_DESCRIPTORS < 0xFFFFFFF0 // 16


def test_sgl_segment_outside_memory(mem):
    assert refused(sgl_segments, mem, LAST(RAM - 16, 2), 1024).status == Status.DATA_TRANSFER_ERROR


def test_sgl_zero_length_data_blocks_are_skipped(mem):
    put_segment(mem, 0x30000, D(0x40000, 0), D(0xFFFF_FFFF_FFFF_0000, 0), D(0x50000, 512))
    assert sgl_segments(mem, LAST(0x30000, 3), 512) == [(0x50000, 512)]


def test_sgl_data_block_outside_memory_fails_at_mapping(mem):
    segs = sgl_segments(mem, D(RAM - 256, 512), 512)
    assert refused(map_views, mem, segs, write=True).status == Status.DATA_TRANSFER_ERROR


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    first=st.binary(min_size=16, max_size=16),
    segment=st.binary(min_size=0, max_size=512),
    length=st.integers(0, 1 << 20),
)
def test_sgl_hostile_inputs_only_raise_statuses(mem, first, segment, length):
    # Point the command's descriptor (whatever it is) at a random segment sometimes.
    if segment:
        mem.write(0x34000, segment)
        addr, n, ident = struct.unpack("<QI3xB", first)
        first = struct.pack("<QI3xB", 0x34000 if addr & 1 else addr, n, ident)
    try:
        segs = sgl_segments(mem, first, length)
    except NvmeStatusError as exc:
        assert exc.status in (
            Status.SGL_DESCR_TYPE_INVALID,
            Status.INVALID_SGL_SEG_DESCR,
            Status.INVALID_NUM_SGL_DESCRS,
            Status.DATA_SGL_LEN_INVALID,
            Status.DATA_TRANSFER_ERROR,
        )
        return
    assert sum(n for _, n in segs) == length


# ------------------------------------------------------------------------------ PSDT


def sqe(flags: int, dptr: bytes) -> bytes:
    raw = bytearray(64)
    raw[0] = 0x02
    raw[1] = flags
    raw[24:40] = dptr
    return bytes(raw)


def test_data_segments_by_psdt(mem):
    prp = decode_sqe(1, sqe(0x00, struct.pack("<QQ", 0x10000, 0x11000)))
    assert data_segments(mem, prp, 8192, PAGE) == [(0x10000, 8192)]
    for psdt in (1, 2):
        sgl = decode_sqe(1, sqe(psdt << 6, D(0x10000, 8192)))
        assert data_segments(mem, sgl, 8192, PAGE) == [(0x10000, 8192)]
    bad = decode_sqe(1, sqe(3 << 6, bytes(16)))
    assert refused(data_segments, mem, bad, 512, PAGE).status == Status.INVALID_FIELD
    bucket = decode_sqe(1, sqe(1 << 6, B(512)))
    assert refused(data_segments, mem, bucket, 512, PAGE, to_host=False).status == Status.SGL_DESCR_TYPE_INVALID
