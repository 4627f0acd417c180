"""The virtio-blk backends: a user's file is never overwritten, truncated or resized; I/O is vectored."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pcidev.errors import ConfigError
from pcidev_virtio.blk_backend import FileBackend, MemoryBackend, full_preadv


def test_missing_file_is_created_sparse_with_size(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    b = FileBackend(str(path), 1 << 20)
    try:
        assert path.stat().st_size == 1 << 20
        assert b.allocated_bytes() == 0
        assert "disk.img" in b.describe()
    finally:
        b.close()


def test_missing_file_without_size_is_refused_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with pytest.raises(ConfigError, match="give size="):
        FileBackend(str(path))
    with pytest.raises(ConfigError, match="readonly"):
        FileBackend(str(path), 4096, read_only=True)
    assert not path.exists()


def test_bad_size_for_a_new_file_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with pytest.raises(ConfigError, match="multiple of 512"):
        FileBackend(str(path), 1000)
    assert not path.exists()


def test_existing_file_is_kept_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    content = os.urandom(8192)
    path.write_bytes(content)
    b = FileBackend(str(path))
    assert b.size == 8192
    b.close()
    with pytest.raises(ConfigError, match="has 8192 bytes, not the size=16384"):
        FileBackend(str(path), 16384)
    assert path.read_bytes() == content  # neither resized nor truncated by the refusal
    FileBackend(str(path), 8192).close()
    assert path.read_bytes() == content


def test_existing_file_of_odd_size_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(ConfigError, match="multiple of 512"):
        FileBackend(str(path))
    assert path.read_bytes() == b"x" * 1000


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Is a directory|neither a regular file"):
        FileBackend(str(tmp_path))


def test_read_only_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(4096))
    b = FileBackend(str(path), read_only=True)
    try:
        with pytest.raises(OSError):
            b.writev([memoryview(b"a" * 512)], 0)
        with pytest.raises(OSError):
            b.discard(0, 512)
        with pytest.raises(OSError):
            b.write_zeroes(0, 512)
    finally:
        b.close()
    assert path.read_bytes() == bytes(4096)


@pytest.mark.parametrize("make", ["file", "mem"])
def test_vectored_io_discard_and_zeroes(tmp_path: Path, make: str) -> None:
    b = FileBackend(str(tmp_path / "d.img"), 1 << 20) if make == "file" else MemoryBackend(1 << 20)
    try:
        data = os.urandom(3 * 4096)
        views = [memoryview(data)[:100], memoryview(data)[100:5000], memoryview(data)[5000:]]
        b.writev(views, 4096, fua=True)
        out = [bytearray(7), bytearray(len(data) - 7)]
        b.readv([memoryview(x) for x in out], 4096)
        assert bytes(out[0] + out[1]) == data
        b.discard(4096, 4096)
        b.write_zeroes(8192, 512)
        b.write_zeroes(8192 + 512, 512, unmap=True)
        got = bytearray(len(data))
        b.readv([memoryview(got)], 4096)
        assert got == bytes(4096) + bytes(1024) + data[4096 + 1024:]
        b.flush()
    finally:
        b.close()
        b.close()  # idempotent


def test_read_past_end_of_file_reads_zeros(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"\x11" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(b"\xFF" * 300)
        full_preadv(fd, [memoryview(buf)], 0)
        assert buf == b"\x11" * 100 + bytes(200)
    finally:
        os.close(fd)


def test_memory_backend_from_an_fd_shares_the_data() -> None:
    a = MemoryBackend(8192)
    try:
        a.writev([memoryview(b"\x42" * 512)], 512)
        b = MemoryBackend(8192, fd=a.fd)
        try:
            got = bytearray(512)
            b.readv([memoryview(got)], 512)
            assert got == b"\x42" * 512
            assert b.fd != a.fd
        finally:
            b.close()
        with pytest.raises(ConfigError, match="not a 4096-byte file"):
            MemoryBackend(4096, fd=a.fd)
    finally:
        a.close()


def test_processes_creating_one_image_together_all_open_it(tmp_path):
    """The processes of a migration start together with the same file=...,size=...:
    whoever creates the image, every one opens the same complete file (none sees it
    half-made, none fails with 'File exists')."""
    import threading

    path = tmp_path / "disk.img"
    for round_ in range(50):
        if path.exists():
            path.unlink()
        out: list = []
        barrier = threading.Barrier(4)

        def open_it(box=out, b=barrier):
            b.wait()
            try:
                box.append(FileBackend(str(path), 1 << 20))
            except Exception as exc:  # collected and asserted below
                box.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(isinstance(b, FileBackend) and b.size == 1 << 20 for b in out), (round_, out)
        inodes = {os.fstat(b.fd).st_ino for b in out}
        assert inodes == {path.stat().st_ino}
        for b in out:
            b.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img"]  # no hidden name left


def test_where_holes_cannot_be_punched_a_discard_writes_nothing(tmp_path, monkeypatch):
    """A discard is advisory: on a file system without hole punching it neither writes
    zeros (allocating a sparse image) nor fails; write-zeroes with UNMAP still zeroes."""
    import errno

    from pcidev_virtio import blk_backend

    def no_holes(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    b = FileBackend(str(tmp_path / "sparse.img"), 64 << 20)
    try:
        os.pwrite(b.fd, b"\xAA" * 4096, 0)
        monkeypatch.setattr(blk_backend, "_fallocate_mode", no_holes)
        allocated = os.fstat(b.fd).st_blocks
        b.discard(1 << 20, 32 << 20)
        assert os.fstat(b.fd).st_blocks == allocated
        b.write_zeroes(0, 4096, unmap=True)
        assert os.pread(b.fd, 4096, 0) == bytes(4096)
    finally:
        b.close()


def test_an_image_made_for_a_refused_device_is_removed_and_nothing_else(tmp_path):
    made = FileBackend(str(tmp_path / "new.img"), 1 << 20)
    made.abandon()
    assert not (tmp_path / "new.img").exists()
    (tmp_path / "theirs.img").write_bytes(bytes(1 << 20))
    theirs = FileBackend(str(tmp_path / "theirs.img"), 1 << 20)
    theirs.abandon()
    assert (tmp_path / "theirs.img").exists()  # a user's file is never removed
