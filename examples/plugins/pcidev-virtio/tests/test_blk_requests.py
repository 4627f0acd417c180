"""The virtio-blk request engine on hand-built chains (bytearrays standing in for guest memory).

Every request type, the status byte at the end of the device-writable part, and
chains split at every byte: the engine must give the same answer however the
driver cut its buffers. Garbage (hypothesis) always completes with a status and
never touches bytes outside the chain.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence

import attrs
import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcidev.errors import ConfigError
from pcidev_virtio.blk_backend import BlkBackend, MemoryBackend
from pcidev_virtio.blk_requests import BlkLimits, BlkRequestEngine, gather, window
from pcidev_virtio.blk_spec import DWZ_SEGMENT, OUTHDR, WRITE_ZEROES_FLAG_UNMAP, BlkStatus, BlkType

DISK = 1 << 20  # 2048 sectors


@attrs.frozen
class Chain:
    """A stand-in for VirtqElement: memoryviews into bytearrays."""

    out_bufs: tuple[memoryview, ...]
    in_bufs: tuple[memoryview, ...]
    head: int = 0


def split(data: bytes | bytearray, cuts: Sequence[int]) -> list[bytearray]:
    """``data`` as buffers cut at the offsets ``cuts`` (out of range and repeated cuts ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [bytearray(data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


class Request:
    """One request's buffers: driver-written ``out`` and device-writable ``inb``."""

    def __init__(self, rtype: int, sector: int = 0, payload: bytes = b"", in_data: int = 0, *,
                 out_cuts: Sequence[int] = (), in_cuts: Sequence[int] = (), status_len: int = 1) -> None:
        self.out = split(OUTHDR.pack(rtype, 0, sector) + payload, out_cuts)
        self.inb = split(bytes([0xEE]) * (in_data + status_len), in_cuts)
        self.in_data = in_data

    def chain(self) -> Chain:
        return Chain(tuple(memoryview(b) for b in self.out), tuple(memoryview(b) for b in self.inb))

    @property
    def data(self) -> bytes:
        return bytes(b"".join(self.inb))[: self.in_data]

    @property
    def status(self) -> int:
        return b"".join(self.inb)[-1]


@pytest.fixture
def backend() -> Iterator[MemoryBackend]:
    b = MemoryBackend(DISK)
    yield b
    b.close()


@pytest.fixture
def engine(backend: MemoryBackend) -> BlkRequestEngine:
    e = BlkRequestEngine(backend, serial=b"vblk-test-0001", limits=BlkLimits(max_discard_seg=4, max_write_zeroes_seg=4,
                                                                              max_discard_sectors=256,
                                                                              max_write_zeroes_sectors=256))
    e.discard = e.write_zeroes = True
    return e


def run(engine: BlkRequestEngine, req: Request) -> int:
    used = engine.execute(req.chain())
    return used


def pattern(sector: int, count: int, seed: int = 0) -> bytes:
    """Distinct content for each sector (its number and a seed in every 8 bytes)."""
    return b"".join(struct.pack("<II", s, seed) * 64 for s in range(sector, sector + count))


def disk_bytes(backend: BlkBackend, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    backend.readv([memoryview(buf)], offset)
    return bytes(buf)


# -- helpers -----------------------------------------------------------------------------------

def test_window_and_gather_cross_buffers() -> None:
    views = [memoryview(bytearray(b"abc")), memoryview(bytearray(b"")), memoryview(bytearray(b"defg"))]
    assert [bytes(v) for v in window(views, 2, 5)] == [b"c", b"de"]
    assert gather(views, 1, 100) == b"bcdefg"
    assert window(views, 7, 9) == []


# -- read and write ----------------------------------------------------------------------------

def test_write_then_read_back_crc_per_sector(engine: BlkRequestEngine, backend: MemoryBackend) -> None:
    data = pattern(8, 16)
    w = Request(BlkType.OUT, 8, data)
    assert run(engine, w) == 1
    assert w.status == BlkStatus.OK
    r = Request(BlkType.IN, 8, in_data=len(data))
    assert run(engine, r) == len(data) + 1
    assert r.status == BlkStatus.OK
    for i in range(16):
        block = r.data[i * 512:(i + 1) * 512]
        assert crc32c.crc32c(block) == crc32c.crc32c(data[i * 512:(i + 1) * 512])
    assert disk_bytes(backend, 8 * 512, len(data)) == data


@pytest.mark.parametrize("cut", [1, 7, 15, 16, 17, 511, 512, 513, 1000, 1024 + 16 - 1])
def test_split_anywhere_gives_the_same_result(engine: BlkRequestEngine, cut: int) -> None:
    data = pattern(0, 2, seed=cut)
    w = Request(BlkType.OUT, 4, data, out_cuts=[cut, cut + 3])
    run(engine, w)
    assert w.status == BlkStatus.OK
    r = Request(BlkType.IN, 4, in_data=len(data), in_cuts=[cut, cut + 5, 1024])
    run(engine, r)
    assert r.status == BlkStatus.OK and r.data == data


def test_header_split_into_single_bytes(engine: BlkRequestEngine) -> None:
    data = pattern(3, 1)
    w = Request(BlkType.OUT, 3, data, out_cuts=range(1, 17))
    run(engine, w)
    assert w.status == BlkStatus.OK
    r = Request(BlkType.IN, 3, in_data=512, in_cuts=range(500, 513))
    run(engine, r)
    assert r.data == data


def test_read_of_never_written_sectors_is_zero(engine: BlkRequestEngine) -> None:
    r = Request(BlkType.IN, 100, in_data=4096)
    run(engine, r)
    assert r.status == BlkStatus.OK and r.data == bytes(4096)


def test_last_sector_ok_one_past_is_ioerr(engine: BlkRequestEngine) -> None:
    last = DISK // 512 - 1
    assert_status(engine, Request(BlkType.OUT, last, pattern(last, 1)), BlkStatus.OK)
    assert_status(engine, Request(BlkType.OUT, last, pattern(last, 2)), BlkStatus.IOERR)
    assert_status(engine, Request(BlkType.IN, last + 1, in_data=512), BlkStatus.IOERR)
    assert_status(engine, Request(BlkType.IN, (1 << 64) - 1, in_data=512), BlkStatus.IOERR)
    assert_status(engine, Request(BlkType.OUT, (1 << 55), pattern(0, 1)), BlkStatus.IOERR)


def assert_status(engine: BlkRequestEngine, req: Request, status: BlkStatus) -> None:
    run(engine, req)
    assert req.status == status


def test_data_not_a_multiple_of_512_is_ioerr_and_writes_nothing(engine: BlkRequestEngine,
                                                                 backend: MemoryBackend) -> None:
    assert_status(engine, Request(BlkType.OUT, 0, b"\x55" * 513), BlkStatus.IOERR)
    assert disk_bytes(backend, 0, 1024) == bytes(1024)
    assert_status(engine, Request(BlkType.IN, 0, in_data=100), BlkStatus.IOERR)


def test_zero_length_read_and_write_are_ok(engine: BlkRequestEngine) -> None:
    assert_status(engine, Request(BlkType.OUT, 5), BlkStatus.OK)
    assert_status(engine, Request(BlkType.IN, 5), BlkStatus.OK)


def test_logical_block_size_4096_refuses_misaligned(backend: MemoryBackend) -> None:
    engine = BlkRequestEngine(backend, limits=BlkLimits(logical_block_size=4096))
    assert_status(engine, Request(BlkType.OUT, 8, pattern(8, 8)), BlkStatus.OK)
    assert_status(engine, Request(BlkType.OUT, 9, pattern(9, 8)), BlkStatus.IOERR)
    assert_status(engine, Request(BlkType.OUT, 8, pattern(8, 1)), BlkStatus.IOERR)
    assert_status(engine, Request(BlkType.IN, 4, in_data=4096), BlkStatus.IOERR)


def test_write_through_cache_uses_durable_writes(engine: BlkRequestEngine, backend: MemoryBackend,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    real = backend.writev

    def spy(views: list[memoryview], offset: int, *, fua: bool = False) -> None:
        seen.append(fua)
        real(views, offset, fua=fua)

    monkeypatch.setattr(backend, "writev", spy)
    run(engine, Request(BlkType.OUT, 0, pattern(0, 1)))
    engine.writeback = False
    run(engine, Request(BlkType.OUT, 0, pattern(0, 1)))
    assert seen == [False, True]


# -- flush, get id ---------------------------------------------------------------------------

def test_flush_calls_the_backend(engine: BlkRequestEngine, backend: MemoryBackend,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(backend, "flush", lambda: calls.append(1))
    req = Request(BlkType.FLUSH)
    assert run(engine, req) == 1
    assert req.status == BlkStatus.OK and calls == [1]


def test_flush_failure_is_ioerr(engine: BlkRequestEngine, backend: MemoryBackend,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise OSError(5, "EIO")
    monkeypatch.setattr(backend, "flush", fail)
    assert_status(engine, Request(BlkType.FLUSH), BlkStatus.IOERR)


def test_get_id_is_20_bytes_nul_padded(engine: BlkRequestEngine) -> None:
    req = Request(BlkType.GET_ID, in_data=20, in_cuts=[3, 19])
    assert run(engine, req) == 21
    assert req.status == BlkStatus.OK
    assert req.data == b"vblk-test-0001".ljust(20, b"\0")


def test_get_id_into_a_short_buffer_fills_what_fits(engine: BlkRequestEngine) -> None:
    req = Request(BlkType.GET_ID, in_data=4)
    run(engine, req)
    assert req.status == BlkStatus.OK and req.data == b"vblk"


def test_serial_longer_than_20_bytes_is_refused(backend: MemoryBackend) -> None:
    with pytest.raises(ConfigError, match="at most 20"):
        BlkRequestEngine(backend, serial=b"x" * 21)


# -- discard and write zeroes ---------------------------------------------------------------------

def segments(*segs: tuple[int, int, int]) -> bytes:
    return b"".join(DWZ_SEGMENT.pack(*s) for s in segs)


def test_discard_several_segments_reads_zero(engine: BlkRequestEngine, backend: MemoryBackend) -> None:
    run(engine, Request(BlkType.OUT, 0, pattern(0, 64)))
    req = Request(BlkType.DISCARD, payload=segments((8, 8, 0), (32, 16, 0)), out_cuts=[20, 33])
    run(engine, req)
    assert req.status == BlkStatus.OK
    got = disk_bytes(backend, 0, 64 * 512)
    want = bytearray(pattern(0, 64))
    want[8 * 512:16 * 512] = bytes(8 * 512)
    want[32 * 512:48 * 512] = bytes(16 * 512)
    assert got == bytes(want)


def test_discard_frees_the_pages(engine: BlkRequestEngine, backend: MemoryBackend) -> None:
    run(engine, Request(BlkType.OUT, 0, pattern(0, 256)))
    before = backend.allocated_bytes()
    assert_status(engine, Request(BlkType.DISCARD, payload=segments((0, 256, 0))), BlkStatus.OK)
    assert backend.allocated_bytes() < before


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes(engine: BlkRequestEngine, backend: MemoryBackend, unmap: bool) -> None:
    run(engine, Request(BlkType.OUT, 0, pattern(0, 16)))
    flags = WRITE_ZEROES_FLAG_UNMAP if unmap else 0
    assert_status(engine, Request(BlkType.WRITE_ZEROES, payload=segments((2, 4, flags))), BlkStatus.OK)
    got = disk_bytes(backend, 0, 16 * 512)
    assert got[:1024] == pattern(0, 2)
    assert got[1024:3072] == bytes(2048)
    assert got[3072:] == pattern(6, 10)


def test_discard_with_unmap_or_unknown_flags_is_unsupp(engine: BlkRequestEngine, backend: MemoryBackend) -> None:
    run(engine, Request(BlkType.OUT, 0, pattern(0, 4)))
    assert_status(engine, Request(BlkType.DISCARD, payload=segments((0, 4, WRITE_ZEROES_FLAG_UNMAP))),
                  BlkStatus.UNSUPP)
    assert_status(engine, Request(BlkType.WRITE_ZEROES, payload=segments((0, 4, 2))), BlkStatus.UNSUPP)
    # a bad segment after a good one: nothing is done
    assert_status(engine, Request(BlkType.WRITE_ZEROES, payload=segments((0, 1, 0), (1, 1, 0x80))),
                  BlkStatus.UNSUPP)
    assert disk_bytes(backend, 0, 2048) == pattern(0, 4)


def test_segment_limits(engine: BlkRequestEngine, backend: MemoryBackend) -> None:
    run(engine, Request(BlkType.OUT, 0, pattern(0, 4)))
    five = segments(*[(i, 1, 0) for i in range(5)])
    assert_status(engine, Request(BlkType.DISCARD, payload=five), BlkStatus.UNSUPP)
    assert_status(engine, Request(BlkType.WRITE_ZEROES, payload=five), BlkStatus.UNSUPP)
    assert_status(engine, Request(BlkType.DISCARD, payload=segments((0, 257, 0))), BlkStatus.IOERR)
    assert_status(engine, Request(BlkType.WRITE_ZEROES, payload=segments((0, 1, 0), (2040, 9, 0))),
                  BlkStatus.IOERR)
    assert disk_bytes(backend, 0, 2048) == pattern(0, 4)  # nothing of a refused request happened
    assert_status(engine, Request(BlkType.DISCARD, payload=b""), BlkStatus.IOERR)
    assert_status(engine, Request(BlkType.DISCARD, payload=segments((0, 1, 0))[:15]), BlkStatus.IOERR)


def test_discard_and_write_zeroes_unsupp_unless_negotiated(engine: BlkRequestEngine) -> None:
    engine.discard = engine.write_zeroes = False
    assert_status(engine, Request(BlkType.DISCARD, payload=segments((0, 1, 0))), BlkStatus.UNSUPP)
    assert_status(engine, Request(BlkType.WRITE_ZEROES, payload=segments((0, 1, 0))), BlkStatus.UNSUPP)


# -- read-only, unsupported, malformed ---------------------------------------------------------------

def test_read_only_disk_refuses_every_write(tmp_path: os.PathLike[str]) -> None:
    ro = MemoryBackend(DISK, read_only=True)
    try:
        engine = BlkRequestEngine(ro)
        engine.discard = engine.write_zeroes = True
        assert_status(engine, Request(BlkType.OUT, 0, pattern(0, 1)), BlkStatus.IOERR)
        assert_status(engine, Request(BlkType.DISCARD, payload=segments((0, 1, 0))), BlkStatus.IOERR)
        assert_status(engine, Request(BlkType.WRITE_ZEROES, payload=segments((0, 1, 0))), BlkStatus.IOERR)
        assert_status(engine, Request(BlkType.IN, 0, in_data=512), BlkStatus.OK)
        assert_status(engine, Request(BlkType.FLUSH), BlkStatus.OK)
    finally:
        ro.close()


@pytest.mark.parametrize("rtype", [2, 3, 5, 10, 14, 16, 0x80000000, 0x80000001, 0xFFFFFFFF])
def test_unknown_types_are_unsupp(engine: BlkRequestEngine, rtype: int) -> None:
    assert_status(engine, Request(rtype, 0, in_data=512), BlkStatus.UNSUPP)


def test_short_header_is_ioerr(engine: BlkRequestEngine) -> None:
    chain = Chain((memoryview(bytearray(OUTHDR.pack(BlkType.IN, 0, 0)[:15])),), (memoryview(bytearray(513)),))
    assert engine.execute(chain) == 513
    assert chain.in_bufs[0][512] == BlkStatus.IOERR


def test_no_device_writable_byte_completes_with_length_zero(engine: BlkRequestEngine,
                                                            backend: MemoryBackend) -> None:
    out = bytearray(OUTHDR.pack(BlkType.OUT, 0, 0) + pattern(0, 1))
    assert engine.execute(Chain((memoryview(out),), ())) == 0
    assert engine.execute(Chain((memoryview(out),), (memoryview(bytearray()),))) == 0
    assert disk_bytes(backend, 0, 512) == bytes(512)


def test_backend_error_is_ioerr(engine: BlkRequestEngine, backend: MemoryBackend,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(views: list[memoryview], offset: int) -> None:
        raise OSError(5, "media error")
    monkeypatch.setattr(backend, "readv", fail)
    assert_status(engine, Request(BlkType.IN, 0, in_data=512), BlkStatus.IOERR)


# -- garbage ---------------------------------------------------------------------------------

_buffers = st.lists(st.binary(max_size=80), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rtype=st.sampled_from([0, 1, 4, 8, 11, 13]) | st.integers(0, 2**32 - 1),
    sector=st.sampled_from([0, 1, 2047, 2048, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1),
    tail=_buffers,
    in_sizes=st.lists(st.integers(0, 1100), max_size=5),
    out_cuts=st.lists(st.integers(0, 200), max_size=4),
)
def test_garbage_always_completes_with_a_status(engine: BlkRequestEngine, rtype: int, sector: int,
                                                tail: list[bytes], in_sizes: list[int], out_cuts: list[int]) -> None:
    out = split(OUTHDR.pack(rtype, 0, sector) + b"".join(tail), out_cuts)
    # each device-writable buffer sits between guard bytes that must stay untouched
    arenas = [bytearray(b"\xAA" * 4 + b"\xEE" * n + b"\xAA" * 4) for n in in_sizes]
    chain = Chain(tuple(memoryview(b) for b in out), tuple(memoryview(a)[4:4 + n] for a, n in zip(arenas, in_sizes,
                                                                                                 strict=True)))
    used = engine.execute(chain)
    total_in = sum(in_sizes)
    assert used == total_in
    for a, n in zip(arenas, in_sizes, strict=True):
        assert a[:4] == b"\xAA" * 4 and a[4 + n:] == b"\xAA" * 4
    if total_in:
        status = b"".join(bytes(v) for v in chain.in_bufs)[-1]
        assert status in (BlkStatus.OK, BlkStatus.IOERR, BlkStatus.UNSUPP)
