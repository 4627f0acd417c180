# SPDX-License-Identifier: MIT
"""Tests for pcidev.native: ordered loads/stores, fences, bulk copies, both backends."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from pcidev import native
from pcidev.dma import alloc_memfd
from pcidev.errors import DmaError

_IMPLS = [
    pytest.param(native.PythonPinned, id="python"),
    pytest.param(
        native.CffiAtomicPinned,
        id="cffi-atomic",
        marks=pytest.mark.skipif(native.CffiAtomicPinned is None, reason="extension not built"),
    ),
    pytest.param(
        native.CffiPinned,
        id="cffi-selected",
        marks=pytest.mark.skipif(native.CffiPinned is None, reason="extension not built"),
    ),
]


@pytest.fixture(params=_IMPLS)
def impl(request: pytest.FixtureRequest) -> type[native.Pinned]:
    cls: type[native.Pinned] = request.param
    return cls


def test_compiled_backend_is_in_use() -> None:
    """`pip install -e .` must have built the extension (unless the fallback is forced)."""
    if os.environ.get("PCIDEV_NATIVE", "").lower() == "python":
        assert native.BACKEND == "python"
        assert native.FALLBACK_REASON
        return
    assert native.BACKEND == "cffi", native.FALLBACK_REASON
    assert native.FALLBACK_REASON is None
    assert native.ORDERING in {"x86-tso", "atomic"}
    assert native.CffiPinned is not None and native.CffiAtomicPinned is not None


def test_forced_python_fallback_in_subprocess() -> None:
    code = textwrap.dedent(
        """
        from pcidev import native
        assert native.BACKEND == "python", native.BACKEND
        assert native.ORDERING == "python"
        assert "PCIDEV_NATIVE" in native.FALLBACK_REASON
        buf = bytearray(16)
        native.store64(buf, 8, 0x0102030405060708)
        assert native.load64(buf, 8) == 0x0102030405060708
        assert buf[8] == 8
        native.fence()
        print("ok")
        """
    )
    env = dict(os.environ, PCIDEV_NATIVE="python")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_round_trips_are_little_endian(impl: type[native.Pinned]) -> None:
    buf = bytearray(64)
    with impl(buf, writable=True) as p:
        p.store32(4, 0x11223344)
        p.store64(8, 0x8877665544332211)
        p.store32(60, 0xFFFFFFFF)
        assert p.load32(4) == 0x11223344
        assert p.load64(8) == 0x8877665544332211
        assert p.load32(60) == 0xFFFFFFFF
        assert p.load32(8) == 0x44332211
        assert p.load32(12) == 0x88776655
    assert buf[4:8] == bytes.fromhex("44332211")
    assert buf[8:16] == bytes.fromhex("1122334455667788")
    assert struct.unpack_from("<Q", buf, 8)[0] == 0x8877665544332211


def test_round_trips_on_mmap(impl: type[native.Pinned]) -> None:
    mm = mmap.mmap(-1, 8192)
    p = impl(mm, writable=True)
    for off in range(0, 8192, 8):
        p.store64(off, off * 0x0101010101 + 7)
    for off in range(0, 8192, 8):
        assert p.load64(off) == off * 0x0101010101 + 7
        assert p.load32(off) == (off * 0x0101010101 + 7) & 0xFFFFFFFF
    p.release()
    mm.close()


@pytest.mark.parametrize("offset", [-4, -1, 61, 62, 63, 64, 68, 1 << 40, 1 << 70])
def test_load32_out_of_bounds(impl: type[native.Pinned], offset: int) -> None:
    p = impl(bytearray(64), writable=True)
    with pytest.raises(DmaError):
        p.load32(offset)
    with pytest.raises(DmaError):
        p.store32(offset, 1)


@pytest.mark.parametrize("offset", [-8, 57, 60, 64, 1 << 64])
def test_load64_out_of_bounds(impl: type[native.Pinned], offset: int) -> None:
    p = impl(bytearray(64), writable=True)
    with pytest.raises(DmaError):
        p.load64(offset)
    with pytest.raises(DmaError):
        p.store64(offset, 1)


@pytest.mark.parametrize("offset", [1, 2, 3, 5, 6, 7])
def test_misaligned_is_refused(impl: type[native.Pinned], offset: int) -> None:
    mm = mmap.mmap(-1, 4096)  # page-aligned base: offset alignment == address alignment
    p = impl(mm, writable=True)
    with pytest.raises(DmaError, match="misaligned"):
        p.load32(offset)
    with pytest.raises(DmaError, match="misaligned"):
        p.store32(offset, 0)
    with pytest.raises(DmaError, match="misaligned"):
        p.load64(offset + 8 if offset < 4 else offset)
    with pytest.raises(DmaError, match="misaligned"):
        p.store64(4, 0)
    assert mm[:16] == bytes(16)
    p.release()
    mm.close()


@pytest.mark.skipif(native.CffiAtomicPinned is None, reason="extension not built")
@pytest.mark.parametrize("name", ["CffiAtomicPinned", "CffiPinned"])
def test_cffi_checks_real_address_alignment(name: str) -> None:
    """The cffi classes see the address: a buffer starting 1 byte past a page needs offset 3."""
    cls = getattr(native, name)
    mm = mmap.mmap(-1, 4096)
    mm[4:8] = struct.pack("<I", 0xCAFEF00D)
    with memoryview(mm) as mv, mv[1:] as shifted:
        p = cls(shifted, writable=True)
        assert p.load32(3) == 0xCAFEF00D
        p.store32(7, 0x12345678)
        assert mm[8:12] == struct.pack("<I", 0x12345678)
        with pytest.raises(DmaError, match="misaligned"):
            p.load32(0)
        with pytest.raises(DmaError, match="misaligned"):
            p.load64(8)
        p.store64(15, 1)
        assert p.load64(15) == 1
        p.release()
    mm.close()


def test_read_only_buffers(impl: type[native.Pinned]) -> None:
    data = bytes(range(16))
    with pytest.raises(DmaError, match="read-only"):
        impl(data, writable=True)
    p = impl(data)
    assert p.load32(0) == 0x03020100
    with pytest.raises(DmaError, match="read-only"):
        p.store32(0, 1)
    with pytest.raises(DmaError, match="read-only"):
        p.store64(8, 1)
    with pytest.raises(DmaError, match="read-only"):
        p.fill(0, 4, 0xAA)
    with pytest.raises(DmaError, match="read-only"):
        p.move(0, 4, 4)
    assert data == bytes(range(16))
    # A writable buffer pinned read-only is also protected.
    buf = bytearray(16)
    q = impl(buf)
    with pytest.raises(DmaError, match="read-only"):
        q.store32(0, 1)
    assert buf == bytearray(16)


def test_value_range_and_types(impl: type[native.Pinned]) -> None:
    p = impl(bytearray(16), writable=True)
    for bad in (-1, 1 << 32):
        with pytest.raises(OverflowError):
            p.store32(0, bad)
    for bad in (-1, 1 << 64):
        with pytest.raises(OverflowError):
            p.store64(8, bad)
    with pytest.raises(TypeError):
        p.store32(0, 1.5)
    with pytest.raises(TypeError):
        p.load32(4.0)
    with pytest.raises(TypeError):
        impl(12345)
    assert p.load64(0) == 0 and p.load64(8) == 0


def test_release_unpins_and_blocks_further_access(impl: type[native.Pinned]) -> None:
    mm = mmap.mmap(-1, 4096)
    p = impl(mm, writable=True)
    p.store32(0, 5)
    with pytest.raises(BufferError):
        mm.close()  # the pin holds an export
    assert not p.released
    p.release()
    assert p.released
    p.release()  # idempotent
    with pytest.raises(DmaError, match="released"):
        p.load32(0)
    with pytest.raises(DmaError, match="released"):
        p.store32(0, 1)
    with pytest.raises(DmaError, match="released"):
        p.fill(0, 1)
    mm.close()


def test_context_manager_releases(impl: type[native.Pinned]) -> None:
    mm = mmap.mmap(-1, 4096)
    with impl(mm, writable=True) as p:
        p.store64(8, 42)
    assert p.released
    assert struct.unpack_from("<Q", mm, 8)[0] == 42
    mm.close()


def test_move_overlapping_both_directions(impl: type[native.Pinned]) -> None:
    buf = bytearray(range(32))
    with impl(buf, writable=True) as p:
        p.move(4, 0, 16)  # forward overlap
    assert buf[4:20] == bytes(range(16))
    buf = bytearray(range(32))
    with impl(buf, writable=True) as p:
        p.move(0, 4, 16)  # backward overlap
        p.move(0, 0, 0)
    assert buf[0:16] == bytes(range(4, 20))


def test_move_and_fill_bounds(impl: type[native.Pinned]) -> None:
    buf = bytearray(32)
    with impl(buf, writable=True) as p:
        for args in ((0, 17, 16), (17, 0, 16), (-1, 0, 1), (0, -1, 1), (0, 0, -1), (0, 0, 1 << 64)):
            with pytest.raises(DmaError):
                p.move(*args)
        with pytest.raises(DmaError):
            p.fill(30, 3, 1)
        with pytest.raises(DmaError):
            p.fill(-1, 2, 1)
        with pytest.raises(ValueError):
            p.fill(0, 1, 256)
        with pytest.raises(ValueError):
            p.fill(0, 1, -1)
        p.fill(8, 8, 0xAB)
        p.fill(32, 0, 1)  # empty at the very end is fine
    assert buf == bytes(8) + b"\xab" * 8 + bytes(16)


def test_copy_from_between_buffers(impl: type[native.Pinned]) -> None:
    src = bytes(range(100, 164))
    dst = bytearray(64)
    with impl(dst, writable=True) as d, impl(src) as s:
        d.copy_from(8, s, 16, 32)
        with pytest.raises(DmaError):
            d.copy_from(40, s, 0, 32)
        with pytest.raises(DmaError):
            d.copy_from(0, s, 40, 32)
        with pytest.raises(TypeError):
            d.copy_from(0, object(), 0, 1)  # type: ignore[arg-type]
    assert dst[8:40] == src[16:48]
    assert dst[:8] == bytes(8) and dst[40:] == bytes(24)


def test_module_level_helpers() -> None:
    mm = mmap.mmap(-1, 4096)
    native.store32(mm, 16, 0xDEADBEEF)
    native.store64(mm, 24, 1 << 63)
    assert native.load32(mm, 16) == 0xDEADBEEF
    assert native.load64(mm, 24) == 1 << 63
    native.memset(mm, 100, 10, 0x5A)
    assert mm[100:110] == b"Z" * 10
    native.memmove(mm, 200, mm, 100, 10)  # same buffer
    assert mm[200:210] == b"Z" * 10
    other = bytearray(16)
    native.memmove(other, 2, mm, 16, 4)
    assert other[2:6] == struct.pack("<I", 0xDEADBEEF)
    with pytest.raises(DmaError):
        native.memmove(other, 0, mm, 4090, 16)
    with pytest.raises(DmaError):
        native.memmove(b"readonly", 0, mm, 0, 1)
    with pytest.raises(DmaError):
        native.load32(mm, 4094)
    native.fence()
    mm.close()  # module-level helpers released their pins


_PEER = textwrap.dedent(
    """
    import mmap, sys, time
    from pcidev import native
    fd, rounds = int(sys.argv[1]), int(sys.argv[2])
    mm = mmap.mmap(fd, 4096)
    p = native.pin(mm, writable=True)
    deadline = time.monotonic() + 30
    # Handshake: wait for the parent's flag, then answer with its value + 1.
    while p.load32(0) != 0xA5A5A5A5:
        if time.monotonic() > deadline:
            sys.exit("timeout waiting for parent")
    assert p.load64(8) == 0x1122334455667788, hex(p.load64(8))
    p.store64(16, 0x8877665544332211)
    p.store32(4, 0x5A5A5A5A)
    # Message passing: payload words first, then the sequence number (release).
    for seq in range(1, rounds + 1):
        for w in range(8):
            p.store64(64 + 8 * w, seq)
        p.store64(32, seq)
    p.release()
    mm.close()
    """
)


@pytest.mark.parametrize("child_backend", ["native", "python"])
def test_cross_process_visibility_and_ordering(child_backend: str) -> None:
    """A child process and this one exchange data through ordered loads and stores.

    The parent always uses the selected backend; the child uses it too, or the
    pure-Python fallback.
    """
    if child_backend == "native" and native.CffiPinned is None:
        pytest.skip("extension not built")
    rounds = 20000
    fd = alloc_memfd(4096, "native-test")
    try:
        mm = mmap.mmap(fd, 4096)
        p = native.pin(mm, writable=True)
        env = dict(os.environ)
        if child_backend == "python":
            env["PCIDEV_NATIVE"] = "python"
        child = subprocess.Popen(
            [sys.executable, "-c", _PEER, str(fd), str(rounds)], pass_fds=(fd,), env=env
        )
        try:
            p.store64(8, 0x1122334455667788)
            p.store32(0, 0xA5A5A5A5)  # release: the payload at 8 is visible first
            seen = 0
            deadline = time.monotonic() + 60
            while seen < rounds and time.monotonic() < deadline:
                seq = p.load64(32)  # acquire: payload reads below are not hoisted
                if seq:
                    seen = max(seen, seq)
                    words = [p.load64(64 + 8 * w) for w in range(8)]
                    # The payload of round `seq` was written before `seq` was published.
                    assert all(word >= seq for word in words), (seq, words)
            assert child.wait(timeout=60) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert p.load32(4) == 0x5A5A5A5A
        assert p.load64(16) == 0x8877665544332211
        assert p.load64(32) == rounds
        p.release()
        mm.close()
    finally:
        os.close(fd)
