"""vfio-user migration data with memory sources (pcidev.transport.vfio_user.migration_data):
an NVMe ``mem`` namespace migrates between two ``pcidev serve`` processes through pcidev's
client with I/O running during PRE_COPY (every block's crc32c checked on the destination);
PRE_COPY reads are dirty-tracked iterations and STOP_COPY carries only the rest; malformed
MIG_DATA_WRITE streams get EINVAL (never a crash, a hang or unbounded memory); a
DEVICE_RESET during PRE_COPY keeps the state and the stream consistent."""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c
import msgpack
import pytest
from test_vfio_user_migration import InProcess

from pcidev.errors import MigrationError
from pcidev.host.machine import Machine
from pcidev.migration.precopy import MAX_CHUNK_FRAME
from pcidev.testing import served
from pcidev.transport.vfio_user import migration as vfio_migration
from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.migration import migration_blockers
from pcidev.transport.vfio_user.migration_client import (
    mig_read,
    mig_read_all,
    mig_state,
    mig_write,
    mig_write_all,
    migrate,
    set_mig_state,
)
from pcidev.transport.vfio_user.protocol import (
    MIG_STATE_ERROR,
    MIG_STATE_PRE_COPY,
    MIG_STATE_RESUMING,
    MIG_STATE_RUNNING,
    MIG_STATE_STOP,
    MIG_STATE_STOP_COPY,
    VfioUserError,
)
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import NvmeDriver

BLOCK = 512
MIB = 1 << 20


def _crcs(data: bytes) -> list[int]:
    return [crc32c.crc32c(data[i:i + BLOCK]) for i in range(0, len(data), BLOCK)]


class Blocks:
    """The expected crc32c of every block of namespace 1, checked per block."""

    def __init__(self, size: int) -> None:
        self.crcs = _crcs(bytes(size))
        self.lock = threading.Lock()

    def write(self, drv: NvmeDriver, slba: int, data: bytes, qid: int = 1) -> None:
        drv.write(1, slba, data, qid=qid)
        with self.lock:
            self.crcs[slba:slba + len(data) // BLOCK] = _crcs(data)

    def verify(self, drv: NvmeDriver, step: int = 256 << 10) -> None:
        nblocks = step // BLOCK
        for slba in range(0, len(self.crcs), nblocks):
            got = _crcs(drv.read(1, slba, nblocks, qid=1 + (slba // nblocks) % 2))
            bad = [slba + i for i, (a, b) in enumerate(zip(got, self.crcs[slba:slba + nblocks], strict=True))
                   if a != b]
            assert not bad, f"{len(bad)} blocks differ, the first LBA {bad[0]}"


# -- the full migration between processes ----------------------------------------------------------
def test_a_64mib_mem_namespace_migrates_with_io_during_precopy(tmp_path: Path) -> None:
    size = 64 * MIB
    spec = "serial=D2,ns=mem:size=64M"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rng = random.Random(11)
    with served("nvme", spec, plugin_specs=(), directory=tmp_path / "a") as src, \
            served("nvme", spec, plugin_specs=(), directory=tmp_path / "b") as dst, \
            Machine(ram_size=64 << 20) as machine:
        remote = VfioUserDevice.connect(src.path)
        try:
            drv = NvmeDriver.attach(machine, remote, io_queues=2, io_depth=32, aers=1)
            blocks = Blocks(size)
            step = 256 << 10
            for off in range(0, size, step):  # every block written with verified data
                blocks.write(drv, off // BLOCK, rng.randbytes(step), qid=1 + (off // step) % 2)

            stop = threading.Event()
            written: list[int] = []

            def io() -> None:  # random verified writes while the pre-copy runs
                r = random.Random(12)
                while not stop.is_set():
                    slba = r.randrange(0, size // BLOCK - 8)
                    blocks.write(drv, slba, r.randbytes(8 * BLOCK), qid=2)
                    written.append(slba)

            worker = threading.Thread(target=io, daemon=True)
            seen: list[tuple[int, int]] = []

            def on_iteration(i: int, n: int) -> None:
                seen.append((i, n))

            def before_stop() -> None:
                stop.set()
                worker.join(30)
                assert not worker.is_alive()

            dst_client = VfioUserClient.connect(dst.path, timeout=60)
            worker.start()  # the writes go on while the pre-copy copies
            while not written and worker.is_alive():
                time.sleep(0.01)
            outcome = migrate(remote, dst_client, path=dst.path, max_iterations=6, max_downtime_ms=10.0,
                              on_iteration=on_iteration, before_stop=before_stop)
            assert src.wait(30) == 0
            assert written, "no I/O ran during the pre-copy"
            assert outcome.precopy_iterations == len(seen) >= 2
            assert outcome.precopy_bytes[0] >= size  # the first iteration: every byte (random data)
            assert list(outcome.precopy_bytes) == [n for _i, n in seen]
            assert sum(outcome.precopy_bytes[1:]) > 0  # what the I/O dirtied went again
            assert outcome.state_bytes < size // 4  # STOP_COPY: only the remainder
            assert mig_state(remote.client) == MIG_STATE_RUNNING and drv.csts & 1
            blocks.verify(drv)  # every block's crc32c, on the destination
            blocks.write(drv, 0, rng.randbytes(4096))
            blocks.verify(drv)
            drv.close()
        finally:
            remote.close()
        assert dst.wait(30) == 0


# -- pre-copy iterations ------------------------------------------------------------------------------
@pytest.fixture
def pair() -> Iterator[tuple[InProcess, InProcess]]:
    src = InProcess(NvmeController("serial=D2,ns=mem:size=2M"))
    dst = InProcess(NvmeController("serial=D2,ns=mem:size=2M"))
    yield src, dst
    src.close()
    dst.close()


def _backend(srv: InProcess) -> Any:
    return srv.endpoint.device.allocated[1].backend


def _device_write(srv: InProcess, offset: int, data: bytes) -> None:
    """A write of the controller's into its namespace (it marks the dirty bitmap)."""
    _backend(srv).writev([memoryview(data)], offset)


def _contents(srv: InProcess) -> bytes:
    b = _backend(srv)
    return os.pread(b.fd, b.size, 0)


def test_precopy_reads_are_iterations_and_stop_copy_carries_the_rest(pair: tuple[InProcess, InProcess]) -> None:
    src, dst = pair
    assert migration_blockers(src.endpoint.device) == []  # a mem namespace no longer blocks
    _device_write(src, 0, os.urandom(MIB))
    set_mig_state(dst.client, MIG_STATE_RESUMING)
    set_mig_state(src.client, MIG_STATE_PRE_COPY)
    first = mig_read_all(src.client, 64 << 10)
    assert MIB < len(first) < 2 * MIB  # the announcement and the data (zeros left out)
    assert mig_read_all(src.client) == b""  # nothing written since: an empty iteration
    _device_write(src, 5 * 4096, b"\x07" * 100)
    second = mig_read_all(src.client)
    assert 4096 <= len(second) < 8192  # one dirty page
    assert src.server.migration.precopy_iterations == [MIB, 0, 4096]
    mig_write_all(dst.client, first + second, 4096)  # (pieces that split frames)
    assert dst.server.migration.pending_bytes < MAX_CHUNK_FRAME + 4096
    _device_write(src, MIB + 8192, b"\x09" * 5000)  # written after the last iteration
    set_mig_state(src.client, MIG_STATE_STOP_COPY)
    rest = mig_read_all(src.client)
    assert len(rest) < len(first) // 4  # two pages, the OFFER and the state
    mig_write_all(dst.client, rest)
    assert set_mig_state(dst.client, MIG_STATE_RUNNING) == MIG_STATE_RUNNING
    assert _contents(dst) == _contents(src)


def test_an_iteration_not_read_to_its_end_goes_on_in_stop_copy(pair: tuple[InProcess, InProcess]) -> None:
    src, dst = pair
    data = os.urandom(2 * MIB)
    _device_write(src, 0, data)
    set_mig_state(dst.client, MIG_STATE_RESUMING)
    set_mig_state(src.client, MIG_STATE_PRE_COPY)
    part = src.client.max_data_xfer_size
    head = mig_read(src.client, part)  # a part of the first iteration only
    assert len(head) == part
    set_mig_state(src.client, MIG_STATE_STOP_COPY)
    rest = mig_read_all(src.client)
    mig_write_all(dst.client, head + rest)
    set_mig_state(dst.client, MIG_STATE_RUNNING)
    assert _contents(dst) == data


def test_reading_an_iteration_that_ends_on_the_request_size_ends_with_an_empty_read(
        pair: tuple[InProcess, InProcess]) -> None:
    src, _dst = pair
    set_mig_state(src.client, MIG_STATE_PRE_COPY)
    whole = mig_read_all(src.client, 1000)
    assert whole  # the announcement at least
    set_mig_state(src.client, MIG_STATE_RUNNING)
    set_mig_state(src.client, MIG_STATE_PRE_COPY)  # again, from the start
    assert mig_read(src.client, len(whole)) == whole  # exactly the iteration: the end is still owed
    assert mig_read(src.client, 100) == b""
    assert mig_read(src.client, 100) == b""  # the next iteration: nothing written
    set_mig_state(src.client, MIG_STATE_RUNNING)


def test_a_failed_stop_copy_keeps_the_precopy_consistent(pair: tuple[InProcess, InProcess],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = pair
    data = os.urandom(2 * MIB)
    _device_write(src, 0, data)
    set_mig_state(dst.client, MIG_STATE_RESUMING)
    set_mig_state(src.client, MIG_STATE_PRE_COPY)
    first = mig_read_all(src.client)

    def broken(device: object) -> tuple[bytes, list[int]]:
        raise MigrationError("the save failed (test)")

    with monkeypatch.context() as m:
        m.setattr(vfio_migration, "save_device_stream", broken)
        with pytest.raises(VfioUserError) as info:
            set_mig_state(src.client, MIG_STATE_STOP_COPY)
    assert info.value.errno == errno.EBUSY
    assert mig_state(src.client) == MIG_STATE_PRE_COPY and not src.endpoint.device.quiesced
    _device_write(src, 4096, b"\x01" * 10)
    second = mig_read_all(src.client)  # the pre-copy goes on where it was
    assert 4096 <= len(second) < 8192
    set_mig_state(src.client, MIG_STATE_STOP_COPY)
    mig_write_all(dst.client, first + second + mig_read_all(src.client))
    set_mig_state(dst.client, MIG_STATE_RUNNING)
    assert _contents(dst) == _contents(src)


# -- a reset during the pre-copy ---------------------------------------------------------------------
def test_iterations_that_stop_shrinking_end_the_precopy(pair: tuple[InProcess, InProcess]) -> None:
    """Each iteration finds as much dirtied as the last (64 KiB written after each): with
    ``max_stalled_passes=2`` the client stops iterating after two that were no smaller
    than the smallest before them, not after ``max_iterations``; everything arrives."""
    src, dst = pair
    _device_write(src, 0, os.urandom(MIB))
    rng = random.Random(3)

    def on_iteration(i: int, n: int) -> None:
        _device_write(src, (i % 16) * (64 << 10), rng.randbytes(64 << 10))

    with Machine(ram_size=16 << 20) as machine:
        remote = VfioUserDevice(src.client)
        drv = NvmeDriver.attach(machine, remote, io_queues=1, io_depth=8, aers=0)
        outcome = migrate(remote, dst.client, max_iterations=30, max_downtime_ms=0.0, max_stalled_passes=2,
                          on_iteration=on_iteration)
        assert drv.csts & 1
        drv.close()
    assert not outcome.converged
    assert outcome.precopy_iterations == 4  # the first (everything), then three of 64 KiB
    assert all(64 << 10 <= n < 80 << 10 for n in outcome.precopy_bytes[1:])
    assert _contents(dst) == _contents(src)
    with pytest.raises(ValueError, match="max_stalled_passes"):
        migrate(remote, dst.client, max_stalled_passes=-1)


def test_a_device_reset_during_precopy_keeps_the_stream_consistent() -> None:
    src = InProcess(NvmeController("serial=D2,ns=mem:size=4M"))
    dst = InProcess(NvmeController("serial=D2,ns=mem:size=4M"))
    try:
        with Machine(ram_size=32 << 20) as machine:
            remote = VfioUserDevice(src.client)
            drv = NvmeDriver.attach(machine, remote, io_queues=2, io_depth=16, aers=0)
            blocks = Blocks(4 * MIB)
            rng = random.Random(5)
            for off in range(0, 4 * MIB, 128 << 10):
                blocks.write(drv, off // BLOCK, rng.randbytes(128 << 10))
            states: list[int] = []

            def on_iteration(i: int, n: int) -> None:
                if i == 1:
                    pdev = drv.pdev  # the host's pci_reset_function, by DEVICE_RESET
                    bars = [pdev.config_read32(o) for o in range(0x10, 0x28, 4)]
                    command = pdev.config_read16(0x04)
                    remote.client.reset()  # DEVICE_RESET while the pre-copy runs
                    states.append(mig_state(remote.client))
                    assert not drv.csts & 1  # the controller was reset
                    for k, v in enumerate(bars):
                        pdev.config_write32(0x10 + 4 * k, v)
                    pdev.config_write16(0x04, command)
                    pdev.irq_type, pdev.nvec = 0, 0
                    for q in drv.queues.values():
                        q.free()
                    drv.queues.clear()
                    drv.probe()  # the driver sets the controller up again
                    for k in range(16):  # written after the reset, during the pre-copy
                        blocks.write(drv, rng.randrange(0, 4 * MIB // BLOCK - 8), rng.randbytes(4096),
                                     qid=1 + k % 2)

            outcome = migrate(remote, dst.client, max_iterations=3, on_iteration=on_iteration)
            assert states == [MIG_STATE_PRE_COPY]  # the reset kept the migration state (libvfio-user #853)
            assert outcome.precopy_iterations >= 2 and outcome.precopy_bytes[1] > 0
            assert drv.csts & 1
            blocks.verify(drv)  # on the destination
            drv.close()
    finally:
        src.close(keep_device=False)
        dst.close()


def test_a_reset_outside_precopy_still_returns_to_running(pair: tuple[InProcess, InProcess]) -> None:
    src, _dst = pair
    set_mig_state(src.client, MIG_STATE_STOP)
    src.client.reset()
    assert mig_state(src.client) == MIG_STATE_RUNNING and not src.endpoint.device.quiesced


# -- malformed streams ---------------------------------------------------------------------------------
_HDR = struct.Struct("<8sHHI")
_OFFER, _STATE, _MEMORY, _CHUNK = 1, 3, 14, 15
_CHUNK_HEAD = struct.Struct("<HQI")

Frames = list[tuple[int, bytes]]


def _frames(data: bytes) -> Frames:
    out, pos = [], 0
    while pos < len(data):
        _magic, kind, _flags, length = _HDR.unpack_from(data, pos)
        out.append((kind, data[pos + _HDR.size:pos + _HDR.size + length]))
        pos += _HDR.size + length
    return out


def _join(frames: Frames) -> bytes:
    return b"".join(_HDR.pack(b"PCIDMIGR", k, 0, len(b)) + b for k, b in frames)


def _meta(frames: Frames, kind: int, change: Callable[[dict[str, Any]], None]) -> Frames:
    out = []
    for k, body in frames:
        if k == kind:
            meta = msgpack.unpackb(body)
            change(meta)
            body = msgpack.packb(meta)
        out.append((k, body))
    return out


def _first(frames: Frames, kind: int) -> int:
    return next(i for i, (k, _b) in enumerate(frames) if k == kind)


def _rename_chunk(frames: Frames) -> Frames:
    i = _first(frames, _CHUNK)
    nlen, off, length = _CHUNK_HEAD.unpack_from(frames[i][1])
    name = b"nvme/ns9@1"
    frames[i] = (_CHUNK, _CHUNK_HEAD.pack(len(name), off, length) + name + frames[i][1][_CHUNK_HEAD.size + nlen:])
    return frames


def _chunk_beyond(frames: Frames) -> Frames:
    i = _first(frames, _CHUNK)
    nlen, _off, length = _CHUNK_HEAD.unpack_from(frames[i][1])
    frames[i] = (_CHUNK, _CHUNK_HEAD.pack(nlen, 2 * MIB - 100, length) + frames[i][1][_CHUNK_HEAD.size:])
    return frames


def _set_source(key: str, value: object) -> Callable[[Frames], Frames]:
    def change(meta: dict[str, Any]) -> None:
        meta["sources"][0][key] = value
    return lambda frames: _meta(frames, _MEMORY, change)


def _duplicate(kind: int) -> Callable[[Frames], Frames]:
    def dup(frames: Frames) -> Frames:
        i = _first(frames, kind)
        return [*frames[:i + 1], frames[i], *frames[i + 1:]]
    return dup


def _chunk_after_offer(frames: Frames) -> Frames:
    i = _first(frames, _CHUNK)
    chunk = frames.pop(i)
    j = _first(frames, _OFFER)
    return [*frames[:j + 1], chunk, *frames[j + 1:]]


DAMAGE: dict[str, Callable[[Frames], Frames]] = {
    "unknown-chunk-name": _rename_chunk,
    "unknown-source-name": _set_source("name", "nvme/ns7@3"),
    "size-beyond-the-destination": _set_source("size", 4 * MIB),
    "size-of-16-gib": _set_source("size", 16 << 30),
    "chunk-beyond-its-source": _chunk_beyond,
    "duplicate-memory": _duplicate(_MEMORY),
    "duplicate-offer": _duplicate(_OFFER),
    "duplicate-state": _duplicate(_STATE),
    "chunk-after-the-offer": _chunk_after_offer,
    "no-state": lambda frames: frames[:-1],
    "state-first": lambda frames: [frames[-1], *frames[:-1]],
}


def _stream(src: InProcess, data: bytes) -> bytes:
    """The source's whole migration data (one PRE_COPY iteration and STOP_COPY) for ``data``."""
    _device_write(src, 0, data)
    set_mig_state(src.client, MIG_STATE_PRE_COPY)
    out = mig_read_all(src.client)
    set_mig_state(src.client, MIG_STATE_STOP_COPY)
    out += mig_read_all(src.client)
    set_mig_state(src.client, MIG_STATE_RUNNING)
    return out


def _refused(dst: InProcess, data: bytes, chunk: int | None = None) -> int:
    """Write ``data`` into RESUMING and load it: the errno of the refusal (at the write or the load)."""
    set_mig_state(dst.client, MIG_STATE_RESUMING)
    with pytest.raises(VfioUserError) as info:
        mig_write_all(dst.client, data, chunk)
        set_mig_state(dst.client, MIG_STATE_STOP)
    assert mig_state(dst.client) == MIG_STATE_ERROR
    assert dst.server.migration.pending_bytes == 0  # nothing held
    return info.value.errno


def _recovers(dst: InProcess, before: bytes) -> None:
    assert _contents(dst) == before  # the namespace is untouched
    dst.client.reset()
    assert mig_state(dst.client) == MIG_STATE_RUNNING
    assert dst.client.config_read(0, 2) == int.from_bytes(dst.endpoint.device.config.data[:2], "little")
    assert dst.thread.is_alive()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_malformed_stream_is_refused_with_einval(pair: tuple[InProcess, InProcess], damage: str) -> None:
    src, dst = pair
    data = _stream(src, os.urandom(MIB // 2) + bytes(MIB // 2) + os.urandom(MIB))
    before = os.urandom(4096) * 512
    _device_write(dst, 0, before)
    bad = _join(DAMAGE[damage](_frames(data)))
    assert _refused(dst, bad, 65536) == errno.EINVAL
    _recovers(dst, before)


@pytest.mark.parametrize("cut", [20, 1000, MIB // 2 + 77, -30, -1])
def test_a_truncated_stream_is_refused_at_the_load(pair: tuple[InProcess, InProcess], cut: int) -> None:
    src, dst = pair
    data = _stream(src, os.urandom(2 * MIB))
    before = _contents(dst)
    assert _refused(dst, data[:cut]) == errno.EINVAL
    _recovers(dst, before)


def test_a_frame_longer_than_its_kind_allows_is_refused_before_it_arrives(pair: tuple[InProcess, InProcess]) -> None:
    _src, dst = pair
    before = _contents(dst)
    memory = msgpack.packb({"protocol": 2, "boot_id": "x", "sources": [{"name": "nvme/ns1@1", "size": 2 * MIB}]})
    for kind, length in ((_CHUNK, MAX_CHUNK_FRAME + 1), (_MEMORY, 1 << 20), (_STATE, 0xFFFF_FFFF)):
        set_mig_state(dst.client, MIG_STATE_RESUMING)
        head = _join([(_MEMORY, memory)]) if kind != _MEMORY else b""
        with pytest.raises(VfioUserError) as info:
            mig_write(dst.client, head + _HDR.pack(b"PCIDMIGR", kind, 0, length) + b"\x00" * 100)
        assert info.value.errno == errno.EINVAL and mig_state(dst.client) == MIG_STATE_ERROR
        _recovers(dst, before)


def test_repeated_chunks_before_the_offer_apply_again(pair: tuple[InProcess, InProcess]) -> None:
    """Pre-copy re-sends what was written meanwhile: a chunk again is not an error, the last wins."""
    src, dst = pair
    data = _stream(src, os.urandom(2 * MIB))
    frames = _frames(data)
    j = _first(frames, _OFFER)
    chunks = [f for f in frames if f[0] == _CHUNK]
    stale = [(k, b[:len(b) - 4096] + bytes(4096)) for k, b in chunks]  # other contents first
    frames = [*frames[:1], *stale, *frames[1:j], *frames[j:]]
    set_mig_state(dst.client, MIG_STATE_RESUMING)
    mig_write_all(dst.client, _join(frames))
    set_mig_state(dst.client, MIG_STATE_RUNNING)
    assert _contents(dst) == _contents(src)


def test_random_damage_never_crashes_or_hangs_the_destination(pair: tuple[InProcess, InProcess]) -> None:
    src, dst = pair
    data = _stream(src, os.urandom(256 << 10))
    rng = random.Random(3)
    for _ in range(25):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(min(len(bad), 4096)) if rng.random() < 0.7 else rng.randrange(len(bad))
            bad[pos] = rng.randrange(256)
        if rng.random() < 0.3:
            bad = bad[:rng.randrange(len(bad))]
        set_mig_state(dst.client, MIG_STATE_RESUMING)
        try:
            mig_write_all(dst.client, bytes(bad), rng.choice((100, 4096, 65536)))
            set_mig_state(dst.client, MIG_STATE_STOP)
        except VfioUserError as exc:
            assert exc.errno == errno.EINVAL, exc
            assert mig_state(dst.client) == MIG_STATE_ERROR
            dst.client.reset()
        else:
            set_mig_state(dst.client, MIG_STATE_RUNNING)
        assert mig_state(dst.client) == MIG_STATE_RUNNING and dst.thread.is_alive()
        assert dst.server.migration.pending_bytes == 0
