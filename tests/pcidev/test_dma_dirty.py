"""Dirty-page logging of GuestMemory (pcidev.dma.DirtyLog): every write path marks the
pages it wrote, reports are u64 little-endian bitmaps that clear what they report, and
writable views stay reported until the device settles."""

from __future__ import annotations

import os
import struct
import sys
import threading

import pytest

from pcidev.dma import DIRTY_PAGE, DirtyLog, GuestMemory, alloc_memfd
from pcidev.errors import DmaError

MiB = 1 << 20


@pytest.fixture
def mem():
    gm = GuestMemory()
    fd = alloc_memfd(4 * MiB)
    gm.map(0, 2 * MiB, fd, 0)
    gm.map(2 * MiB, 2 * MiB, fd, 2 * MiB)  # adjacent: writes may span both
    yield gm
    gm.close()


def pages(bitmap: bytes, iova: int = 0, page: int = DIRTY_PAGE) -> set[int]:
    bits = int.from_bytes(bitmap, "little")
    return {iova + i * page for i in range(len(bitmap) * 8) if bits >> i & 1}


def test_off_by_default_and_nothing_is_marked(mem):
    assert mem.dirty is None
    mem.write(0x1000, b"x")  # no log, no error


def test_every_write_path_marks_its_pages(mem):
    log = mem.start_dirty_log()
    assert log.ranges == [(0, 4 * MiB)]
    mem.write(0x1000, b"a")
    mem.fill(0x3000, 2 * DIRTY_PAGE, 7)                   # two pages
    mem.copy(0x6000, 0x1000, 8)
    mem.write_u8(0x7000, 1)
    mem.write_u16(0x8000, 1)
    mem.write_u32(0x9000, 1)
    mem.write_u64(0xA000, 1)
    mem.write_struct(struct.Struct("<QQ"), 0xBFF8, 1, 2)  # crosses into 0xC000
    mem.store32(0xD000, 1)
    mem.store64(0xE000, 1)
    mem.write(2 * MiB - 2, b"span")                       # crosses the region boundary
    mem.write_u32(2 * MiB + 0xFFFE, 5)                    # crosses a page inside a region
    assert pages(log.report(0, 4 * MiB, DIRTY_PAGE)) == {
        0x1000, 0x3000, 0x4000, 0x6000, 0x7000, 0x8000, 0x9000, 0xA000, 0xB000, 0xC000, 0xD000, 0xE000,
        2 * MiB - DIRTY_PAGE, 2 * MiB, 2 * MiB + 0xF000, 2 * MiB + 0x10000}
    # reads mark nothing; the report cleared everything
    mem.read(0x20000, 100)
    mem.read_u32(0x20000)
    assert log.report(0, 4 * MiB, DIRTY_PAGE) == bytes(4 * MiB // DIRTY_PAGE // 8)


def test_report_layout_matches_a_hand_built_bitmap(mem):
    log = mem.start_dirty_log([(0x100000, 0x100000)])  # 256 pages from 1 MiB
    for page in (0, 1, 63, 64, 130, 255):
        mem.write_u8(0x100000 + page * DIRTY_PAGE + 5, 1)
    mem.write(0x0, b"outside the range")  # not tracked: ignored
    expect = bytearray(32)  # 256 bits = 4 u64 words
    for page in (0, 1, 63, 64, 130, 255):
        expect[page // 8] |= 1 << (page % 8)
    assert log.report(0x100000, 0x100000, DIRTY_PAGE) == bytes(expect)
    # word by word: u64 little-endian, bit i of word w = page 64*w + i
    words = struct.unpack("<4Q", bytes(expect))
    assert words == ((1 << 0) | (1 << 1) | (1 << 63), (1 << 0), (1 << 2), (1 << 63))
    # a larger page size ORs the 4 KiB pages: 8 KiB pages 0, 31, 32, 65, 127
    for page in (0, 1, 63, 64, 130, 255):
        mem.write_u8(0x100000 + page * DIRTY_PAGE, 2)
    big = log.report(0x100000, 0x100000, 2 * DIRTY_PAGE)
    assert len(big) == 16 and pages(big, 0x100000, 2 * DIRTY_PAGE) == {
        0x100000 + p * 2 * DIRTY_PAGE for p in (0, 31, 32, 65, 127)}
    # a report of part of the range; the length is rounded up to whole u64 words
    mem.write_u8(0x100000 + 3 * DIRTY_PAGE, 1)
    assert log.report(0x100000, 4 * DIRTY_PAGE, DIRTY_PAGE) == bytes([0b1000]) + bytes(7)
    # 1 MiB pages (more than 64 sub-pages each)
    mem.write_u8(0x1FFFFF, 1)
    assert log.report(0x100000, 0x100000, 0x100000) == b"\x01" + bytes(7)


def test_views_stay_reported_until_the_device_settles(mem):
    log = mem.start_dirty_log()
    with mem.access([(0x5000, 100)], write=True) as views:
        views[0][0] = 1
    mem.views(0x9000, 10, write=True)
    mem.views(0xA000, 10)  # read-only views mark nothing
    assert pages(log.report(0, 4 * MiB, DIRTY_PAGE)) == {0x5000, 0x9000}
    # a write through a view may land after a report: the page is reported again
    assert pages(log.report(0, 4 * MiB, DIRTY_PAGE)) == {0x5000, 0x9000}
    log.settle()  # quiescent: the writes are done; reported once more, then clean
    assert pages(log.report(0, 4 * MiB, DIRTY_PAGE)) == {0x5000, 0x9000}
    assert pages(log.report(0, 4 * MiB, DIRTY_PAGE)) == set()


def test_bad_ranges_and_reports_are_dma_errors(mem):
    with pytest.raises(DmaError, match="page-aligned"):
        DirtyLog([(0x100, DIRTY_PAGE)])
    with pytest.raises(DmaError, match="overlaps"):
        DirtyLog([(0, 2 * DIRTY_PAGE), (DIRTY_PAGE, DIRTY_PAGE)])
    with pytest.raises(DmaError, match="pages to track"):
        DirtyLog([(0, 1 << 50)])
    log = mem.start_dirty_log([(0, MiB)])
    with pytest.raises(DmaError, match="already on"):
        mem.start_dirty_log()
    with pytest.raises(DmaError, match="power of two"):
        log.report(0, MiB, 3 * DIRTY_PAGE)
    with pytest.raises(DmaError, match="whole pages"):
        log.report(0x800, DIRTY_PAGE, DIRTY_PAGE)
    with pytest.raises(DmaError, match="not logged"):
        log.report(0, 2 * MiB, DIRTY_PAGE)
    mem.stop_dirty_log()
    assert mem.dirty is None


def test_a_region_mapped_later_inside_a_range_is_logged():
    gm = GuestMemory()
    fd = alloc_memfd(MiB)
    try:
        log = gm.start_dirty_log([(0, MiB)])
        gm.map(0x40000, 0x10000, fd)
        gm.write_u32(0x41000, 9)
        gm.unmap(0x40000)  # an unmap keeps the bits
        assert pages(log.report(0, MiB, DIRTY_PAGE)) == {0x41000}
    finally:
        gm.close()


# -- review regressions -------------------------------------------------------------------------
class StoppedBetweenReads(GuestMemory):
    """``dirty`` reads as the log, then None at the next read (logging stopped by another
    thread between two reads): a write path must read it once."""

    def __init__(self) -> None:
        self._log: DirtyLog | None = None
        self._reads = 0
        super().__init__()

    @property  # type: ignore[override]
    def dirty(self) -> DirtyLog | None:
        self._reads += 1
        return self._log if self._reads % 2 else None

    @dirty.setter
    def dirty(self, log: DirtyLog | None) -> None:
        self._log = log


def test_every_write_path_reads_the_log_once():
    gm = StoppedBetweenReads()
    fd = alloc_memfd(MiB)
    try:
        gm.map(0, MiB, fd)
        gm.dirty = DirtyLog([(0, MiB)])
        writes = [lambda: gm.write(0x1000, b"a"), lambda: gm.write(0x1FFF, b"ab"),
                  lambda: gm.fill(0x3000, 8, 7), lambda: gm.copy(0x6000, 0x1000, 8),
                  lambda: gm.write_u8(0x7000, 1), lambda: gm.write_u16(0x8000, 1),
                  lambda: gm.write_u32(0x9000, 1), lambda: gm.write_u64(0xA000, 1),
                  lambda: gm.write_struct(struct.Struct("<QQ"), 0xBFF8, 1, 2),
                  lambda: gm.store32(0xD000, 1), lambda: gm.store64(0xE000, 1),
                  lambda: gm.views(0xF000, 16, write=True), lambda: gm.sg_views([(0xF000, 16)], write=True)]
        for write in writes:
            gm._reads = 0
            write()  # never AttributeError: 'NoneType' object has no attribute 'mark'
    finally:
        gm.close()


def test_logging_all_memory_covers_regions_mapped_later():
    gm = GuestMemory()
    fd = alloc_memfd(4 * MiB)
    try:
        gm.map(0, MiB, fd)
        log = gm.start_dirty_log()  # no ranges: all mapped memory, now and later
        gm.map(3 * MiB + 0x800, 0x2000, fd, 2 * MiB)  # mapped later, not page-aligned: widened
        gm.map(MiB, MiB, fd, MiB)  # adjacent to the first
        gm.write_u32(3 * MiB + 0x1000, 1)
        gm.write(MiB - 2, b"span")
        assert log.ranges == [(0, MiB), (MiB, MiB), (3 * MiB, 0x3000)]
        assert pages(log.report(0, 2 * MiB, DIRTY_PAGE)) == {MiB - DIRTY_PAGE, MiB}
        assert pages(log.report(3 * MiB, 0x3000, DIRTY_PAGE), 3 * MiB) == {3 * MiB + 0x1000}
        # a region the log cannot track is refused before it is mapped
        with pytest.raises(DmaError, match="pages to track"):
            gm.map(1 << 40, 1 << 37, fd)
        assert gm.region_at(1 << 40) is None
        gm.stop_dirty_log()
        explicit = gm.start_dirty_log([(0, MiB)])  # with ranges: nothing is added
        gm.map(8 * MiB, MiB, fd)
        assert explicit.ranges == [(0, MiB)]
    finally:
        gm.close()


def test_marks_alternate_between_ranges_through_the_fast_path():
    log = DirtyLog([(0, MiB), (4 * MiB, MiB)])
    for gpa in (0x1000, 4 * MiB + 0x2000, 0x3000, 4 * MiB + 0x2FFF, MiB - 1):
        log.mark(gpa, 2)
    log.mark(MiB - 2, 8)  # leaves the range: the part outside is ignored
    log.mark(2 * MiB, 8)  # in no range
    assert pages(log.report(0, MiB, DIRTY_PAGE)) == {0x1000, 0x3000, MiB - DIRTY_PAGE}
    assert pages(log.report(4 * MiB, MiB, DIRTY_PAGE), 4 * MiB) == {4 * MiB + 0x2000, 4 * MiB + 0x3000}
    assert log.report(0, MiB, DIRTY_PAGE) == bytes(32)


def test_unmap_forgetting_views_frees_the_range_at_once():
    gm = GuestMemory()
    fd = alloc_memfd(MiB)
    try:
        gm.map(0, MiB, fd)
        views = gm.views(0x1000, 16, write=True)
        with pytest.raises(DmaError, match="still alive"):
            gm.unmap(0)
        gm.unmap(0, MiB, forget_views=True)
        assert gm.regions() == []
        views[0][:4] = b"late"  # the mapping lives on for the view: no crash
        gm.map(0, MiB, fd)  # the range is free for a new map
        assert gm.read(0x1000, 4) == b"late"  # (the same memfd)
        views[0].release()
    finally:
        gm.close()
        os.close(fd)


def test_marks_racing_with_reports_are_never_lost():
    """Marks take no lock: every page marked once, while another thread reports and
    clears again and again, is in one of the reports."""
    npages = 1 << 14
    log = DirtyLog([(0, npages * DIRTY_PAGE), (1 << 30, DIRTY_PAGE)])
    seen: set[int] = set()
    done = threading.Event()

    def writer() -> None:
        for i in range(npages):
            log.mark(i * DIRTY_PAGE + 8, 4 if i % 3 else DIRTY_PAGE)  # some marks cover two pages
            if i % 1024 == 0:
                log.mark(1 << 30, 1)  # another range: the fast path's range changes
        done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        t = threading.Thread(target=writer)
        t.start()
        while not done.is_set():
            seen |= pages(log.report(0, npages * DIRTY_PAGE, DIRTY_PAGE))
        t.join()
    finally:
        sys.setswitchinterval(old)
    seen |= pages(log.report(0, npages * DIRTY_PAGE, DIRTY_PAGE))
    assert seen == {i * DIRTY_PAGE for i in range(npages)}
