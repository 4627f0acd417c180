# SPDX-License-Identifier: MIT
"""Native memory primitives: ordered 32/64-bit loads and stores, fences, bulk copies.

Python has no primitive for an *ordered* load or store on shared memory: ``struct``
reads and writes its integer codes byte by byte (a concurrent reader can see a torn
value; it even writes part of an out-of-range value before raising), and the GIL
orders nothing across processes. Doorbells and completion flags in memory shared
with another process (QEMU's vCPUs, a test peer) need exactly that, so this module
wraps a few lines of C compiled with cffi in API mode (``pcidev._native_build``,
built by ``pip install``):

* :meth:`Pinned.load32` / :meth:`Pinned.load64`: one aligned load with *acquire*
  ordering;
* :meth:`Pinned.store32` / :meth:`Pinned.store64`: one aligned store with *release*
  ordering;
* :func:`fence`: a full (sequentially consistent) memory fence
  (``__atomic_thread_fence(__ATOMIC_SEQ_CST)``);
* :meth:`Pinned.move`, :meth:`Pinned.copy_from`, :meth:`Pinned.fill`: ``memmove`` /
  ``memset`` between buffers (overlap-safe);
* :func:`crc16_t10dif` and :func:`crc64_nvme`: the CRCs of NVMe end-to-end data
  protection (the 16-bit and 64-bit Guard), which Python lacks and which a protected
  namespace computes once per logical block. :data:`CRC_BACKEND` says whether the C
  versions are in use (an extension built before they existed lacks them: the
  table-driven pure-Python versions then run, same results, far slower).

How loads and stores get their ordering is reported by :data:`ORDERING`:

``"atomic"``
    every access calls a C helper using ``__atomic_load_n(..., __ATOMIC_ACQUIRE)``
    / ``__atomic_store_n(..., __ATOMIC_RELEASE)`` (:class:`CffiAtomicPinned`);
    used on every host but x86.
``"x86-tso"``
    on x86 an aligned plain ``mov`` already is an acquire load or a release store
    (total store order), so the selected class indexes a cffi ``uint32_t *`` /
    ``uint64_t *`` instead, one ``mov`` without the C call, whose cost (cffi
    releases and re-takes the GIL around every call) exceeds the access itself.
``"python"``
    the fallback below.

Values are **little-endian in memory** on every host (the C code byte-swaps on a
big-endian one), matching PCI and NVMe.

A :class:`Pinned` wraps one buffer (typically an :class:`mmap.mmap`) for repeated
access. It holds a buffer export for as long as it lives, so the buffer cannot be
closed or resized until :meth:`Pinned.release` is called (or the ``with`` block
ends). Every access is bounds- and alignment-checked in Python before the C code
runs; a bad offset raises :class:`~pcidev.errors.DmaError` and never touches memory.
Offsets and values must be ``int``: other types raise :class:`TypeError`, and a
value that does not fit the width raises :class:`OverflowError`.

Backends
--------
:data:`BACKEND` says which implementation is in use:

``"cffi"``
    the compiled extension ``pcidev._native`` (the normal case);
``"python"``
    a pure-Python fallback used when the extension cannot be imported, or when the
    environment variable ``PCIDEV_NATIVE=python`` is set before import.
    :data:`FALLBACK_REASON` then says why. Loads and stores index
    ``memoryview.cast("I"/"Q")`` views (one fixed-size ``memcpy`` in CPython, so a
    single untorn access on little-endian hosts, ordered on x86 but not on weakly
    ordered CPUs; big-endian hosts fall back to byte-wise ``struct``), and
    :func:`fence` is a lock acquire/release pair, which is a full barrier for the
    calling thread on mainstream platforms. Alignment is checked against the
    buffer offset only, since Python cannot see the address. ``struct`` itself is
    no substitute: its integer codes read and write byte by byte, so a concurrent
    reader can see a torn value.

All implementations are importable, :class:`PythonPinned`, :class:`CffiPinned` (the
cffi class selected for this host) and :class:`CffiAtomicPinned` (``None`` when the
extension is missing), so tests can exercise each; :func:`pin` and the
module-level helpers use the selected one.

The module-level :func:`load32` and friends pin and release the buffer on every
call, which costs an order of magnitude more than the access: use :func:`pin` for
anything repeated. ``examples/bench_guest_memory.py`` measures each class
(table in docs/development.md).
"""

from __future__ import annotations

import enum
import os
import platform
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pcidev.errors import DmaError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = [
    "BACKEND",
    "CRC_BACKEND",
    "FALLBACK_REASON",
    "ORDERING",
    "CffiAtomicPinned",
    "CffiPinned",
    "Pinned",
    "PythonPinned",
    "MSGPACK_BACKEND",
    "MSGPACK_COST_KINDS",
    "MSGPACK_DEPTH",
    "MsgpackWalk",
    "crc16_t10dif",
    "crc64_nvme",
    "measure_msgpack",
    "py_measure_msgpack",
    "fence",
    "load32",
    "load64",
    "memmove",
    "memset",
    "pin",
    "store32",
    "store64",
]

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Typed once here so that callers get an int with no cast per call.
_u32_unpack: Callable[[ReadableBuffer, int], tuple[int]] = _U32.unpack_from
_u64_unpack: Callable[[ReadableBuffer, int], tuple[int]] = _U64.unpack_from
_MAX32 = 0xFFFF_FFFF
_MAX64 = 0xFFFF_FFFF_FFFF_FFFF
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


class _Words(Protocol):
    """Words indexed by word number, such as a cffi ``uint32_t *`` (its stub only says ``Any``)."""

    def __getitem__(self, index: int, /) -> int: ...

    def __setitem__(self, index: int, value: int, /) -> None: ...


# What a released PythonPinned keeps instead of its views (any access raises ValueError).
_RELEASED_VIEW = memoryview(b"")
_RELEASED_VIEW.release()


def _check_store_value(value: Any, hi: int, bits: int) -> None:
    """Refuse a store value that is not an ``int`` in ``0 .. hi`` (``hi`` = 2**bits - 1)."""
    if type(value) is not int:
        raise TypeError(f"value must be int, not {type(value).__name__}")
    if not 0 <= value <= hi:
        raise OverflowError(f"{value!r} does not fit in {bits} bits")


class Pinned:
    """A buffer held for native access by offset (base class; use :func:`pin`).

    :ivar size: length of the buffer in bytes (0 once released).
    :ivar writable: whether stores, moves and fills are allowed.

    Instances are context managers: leaving the ``with`` block releases the buffer.
    """

    __slots__ = ("_lim4", "_lim8", "_mis", "_wlim1", "_wlim4", "_wlim8", "size", "writable")

    def __init__(self, buf: Any, *, writable: bool = False) -> None:  # pragma: no cover - overridden
        """Pin ``buf`` (each backend; see :class:`PythonPinned`)."""
        raise NotImplementedError

    def _attach(self, size: int, writable: bool, misalignment: int) -> None:
        """Record the geometry of the buffer a subclass has just pinned."""
        self.size = size
        self.writable = writable
        self._mis = misalignment
        self._set_limits(size, writable)

    def _set_limits(self, size: int, writable: bool) -> None:
        # Largest valid offset for each access width; -1 means "nothing is valid".
        # Folding "released" and "read-only" into the limits keeps the hot path to
        # one chained comparison plus the alignment test.
        self._lim4 = size - 4 if size >= 4 else -1
        self._lim8 = size - 8 if size >= 8 else -1
        self._wlim1 = size if writable else -1
        self._wlim4 = self._lim4 if writable else -1
        self._wlim8 = self._lim8 if writable else -1

    @property
    def released(self) -> bool:
        """``True`` once :meth:`release` has run."""
        return self._released_flag()

    def _released_flag(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def _bad(self, offset: Any, width: int, *, write: bool = False) -> DmaError:
        """Build the error for a refused access (cold path)."""
        if self._released_flag():
            return DmaError("native access to a released buffer")
        if write and not self.writable:
            return DmaError("native store to a read-only buffer")
        if type(offset) is int and offset >= 0 and offset + width <= self.size:
            return DmaError(f"native {width * 8}-bit access at offset {offset:#x} is misaligned")
        return DmaError(
            f"native {width * 8}-bit access at offset {offset!r} is outside the "
            f"{self.size:#x}-byte buffer"
        )

    def _check_range(self, offset: int, length: int, limit: int, *, write: bool) -> None:
        if type(offset) is not int or type(length) is not int:
            raise TypeError("offset and length must be int")
        if offset < 0 or length < 0 or offset + length > limit:
            if self._released_flag():
                raise DmaError("native access to a released buffer")
            if write and not self.writable:
                raise DmaError("native write to a read-only buffer")
            raise DmaError(
                f"native range [{offset:#x}, +{length:#x}) is outside the "
                f"{self.size:#x}-byte buffer"
            )

    # The access methods below are implemented by both backends; the base class
    # only documents them.

    def load32(self, offset: int) -> int:  # pragma: no cover - overridden
        """Acquire-load the little-endian 32-bit value at ``offset``.

        :param offset: byte offset, 4-byte aligned.
        :returns: the value.
        :raises DmaError: out of range, misaligned, or released.
        """
        raise NotImplementedError

    def load64(self, offset: int) -> int:  # pragma: no cover - overridden
        """Acquire-load the little-endian 64-bit value at ``offset``.

        :param offset: byte offset, 8-byte aligned.
        :returns: the value.
        :raises DmaError: out of range, misaligned, or released.
        """
        raise NotImplementedError

    def store32(self, offset: int, value: int) -> None:  # pragma: no cover - overridden
        """Release-store ``value`` little-endian as 32 bits at ``offset``.

        :param offset: byte offset, 4-byte aligned.
        :param value: 0 .. 2**32-1.
        :raises DmaError: out of range, misaligned, read-only or released.
        :raises OverflowError: ``value`` does not fit.
        """
        raise NotImplementedError

    def store64(self, offset: int, value: int) -> None:  # pragma: no cover - overridden
        """Release-store ``value`` little-endian as 64 bits at ``offset``.

        :param offset: byte offset, 8-byte aligned.
        :param value: 0 .. 2**64-1.
        :raises DmaError: out of range, misaligned, read-only or released.
        :raises OverflowError: ``value`` does not fit.
        """
        raise NotImplementedError

    def move(self, dst_offset: int, src_offset: int, length: int) -> None:  # pragma: no cover
        """Copy ``length`` bytes within the buffer; overlapping ranges are fine.

        :raises DmaError: a range is outside the buffer, or it is read-only.
        """
        raise NotImplementedError

    def copy_from(
        self, dst_offset: int, src: Pinned, src_offset: int, length: int
    ) -> None:  # pragma: no cover - overridden
        """Copy ``length`` bytes from ``src`` (pinned by the same backend) into this buffer.

        :raises DmaError: a range is outside its buffer, or this one is read-only.
        :raises TypeError: ``src`` comes from the other backend.
        """
        raise NotImplementedError

    def fill(self, offset: int, length: int, byte: int = 0) -> None:  # pragma: no cover
        """Set ``length`` bytes at ``offset`` to ``byte``.

        :raises DmaError: the range is outside the buffer, or it is read-only.
        :raises ValueError: ``byte`` is not in 0..255.
        """
        raise NotImplementedError

    def release(self) -> None:  # pragma: no cover - overridden
        """Drop the buffer export; later accesses raise :class:`~pcidev.errors.DmaError`.

        Calling it again is a no-op.
        """
        raise NotImplementedError

    def __enter__(self) -> Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class PythonPinned(Pinned):
    """Pure-Python :class:`Pinned`, built on ``memoryview``.

    On little-endian hosts loads and stores index ``memoryview.cast("I")`` /
    ``cast("Q")`` views, which CPython implements as one fixed-size ``memcpy``: a
    single aligned load or store on mainstream compilers, hence untorn, and ordered
    on x86 (not on weakly ordered CPUs). On big-endian hosts they go through
    ``struct``, which reads and writes byte by byte: *not* atomic.

    :param buf: any C-contiguous buffer.
    :param writable: request write access; :class:`~pcidev.errors.DmaError` if the
        buffer is read-only.
    :raises TypeError: ``buf`` is not a C-contiguous buffer.
    """

    __slots__ = ("_m32", "_m64", "_mv")

    def __init__(self, buf: Any, *, writable: bool = False) -> None:
        mv = memoryview(buf)
        if not mv.c_contiguous:
            mv.release()
            raise TypeError("buffer must be C-contiguous")
        if writable and mv.readonly:
            mv.release()
            raise DmaError("buffer is read-only")
        flat = mv.cast("B")
        mv.release()
        n = flat.nbytes
        self._mv: memoryview = flat
        # Word views (used by little-endian hosts; big-endian ones go through struct).
        with flat[: n & ~3] as head:
            self._m32: memoryview = head.cast("I")
        with flat[: n & ~7] as head:
            self._m64: memoryview = head.cast("Q")
        self._attach(n, writable, 0)

    def _released_flag(self) -> bool:
        return self._mv is _RELEASED_VIEW

    if _LITTLE_ENDIAN_HOST:

        def load32(self, offset: int) -> int:
            """Load the little-endian 32-bit value at ``offset`` (must be 4-aligned)."""
            if 0 <= offset <= self._lim4 and not offset & 3:
                return self._m32[offset >> 2]
            raise self._bad(offset, 4)

        def load64(self, offset: int) -> int:
            """Load the little-endian 64-bit value at ``offset`` (must be 8-aligned)."""
            if 0 <= offset <= self._lim8 and not offset & 7:
                return self._m64[offset >> 3]
            raise self._bad(offset, 8)

        def store32(self, offset: int, value: int) -> None:
            """Store ``value`` little-endian as 32 bits at ``offset`` (must be 4-aligned)."""
            if 0 <= offset <= self._wlim4 and not offset & 3:
                _check_store_value(value, _MAX32, 32)
                self._m32[offset >> 2] = value
                return
            raise self._bad(offset, 4, write=True)

        def store64(self, offset: int, value: int) -> None:
            """Store ``value`` little-endian as 64 bits at ``offset`` (must be 8-aligned)."""
            if 0 <= offset <= self._wlim8 and not offset & 7:
                _check_store_value(value, _MAX64, 64)
                self._m64[offset >> 3] = value
                return
            raise self._bad(offset, 8, write=True)

    else:  # pragma: no cover - big-endian hosts

        def load32(self, offset: int) -> int:
            """Load the little-endian 32-bit value at ``offset`` (must be 4-aligned)."""
            if 0 <= offset <= self._lim4 and not offset & 3:
                return _u32_unpack(self._mv, offset)[0]
            raise self._bad(offset, 4)

        def load64(self, offset: int) -> int:
            """Load the little-endian 64-bit value at ``offset`` (must be 8-aligned)."""
            if 0 <= offset <= self._lim8 and not offset & 7:
                return _u64_unpack(self._mv, offset)[0]
            raise self._bad(offset, 8)

        def store32(self, offset: int, value: int) -> None:
            """Store ``value`` little-endian as 32 bits at ``offset`` (must be 4-aligned)."""
            if 0 <= offset <= self._wlim4 and not offset & 3:
                _check_store_value(value, _MAX32, 32)
                self._mv[offset:offset + 4] = _U32.pack(value)  # (pack_into clears its target first)
                return
            raise self._bad(offset, 4, write=True)

        def store64(self, offset: int, value: int) -> None:
            """Store ``value`` little-endian as 64 bits at ``offset`` (must be 8-aligned)."""
            if 0 <= offset <= self._wlim8 and not offset & 7:
                _check_store_value(value, _MAX64, 64)
                self._mv[offset:offset + 8] = _U64.pack(value)  # (pack_into clears its target first)
                return
            raise self._bad(offset, 8, write=True)

    def move(self, dst_offset: int, src_offset: int, length: int) -> None:
        """Copy ``length`` bytes within the buffer; overlapping ranges are fine."""
        self._check_range(dst_offset, length, self._wlim1, write=True)
        self._check_range(src_offset, length, self.size, write=False)
        mv = self._mv
        mv[dst_offset : dst_offset + length] = mv[src_offset : src_offset + length]

    def copy_from(self, dst_offset: int, src: Pinned, src_offset: int, length: int) -> None:
        """Copy ``length`` bytes from ``src`` (another :class:`PythonPinned`) into this buffer."""
        if not isinstance(src, PythonPinned):
            raise TypeError("copy_from needs a source pinned by the same backend")
        self._check_range(dst_offset, length, self._wlim1, write=True)
        src._check_range(src_offset, length, src.size, write=False)
        dst_mv, src_mv = self._mv, src._mv
        dst_mv[dst_offset : dst_offset + length] = src_mv[src_offset : src_offset + length]

    def fill(self, offset: int, length: int, byte: int = 0) -> None:
        """Set ``length`` bytes at ``offset`` to ``byte`` (0..255)."""
        if type(byte) is not int or not 0 <= byte <= 0xFF:
            raise ValueError(f"fill byte {byte!r} is not in 0..255")
        self._check_range(offset, length, self._wlim1, write=True)
        mv = self._mv
        chunk = bytes([byte]) * min(length, 1 << 16)
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(chunk), end - pos)
            mv[pos : pos + n] = chunk[:n] if n != len(chunk) else chunk
            pos += n

    def release(self) -> None:
        """Drop the buffer export; later accesses raise :class:`~pcidev.errors.DmaError`."""
        mv, self._mv = self._mv, _RELEASED_VIEW
        if mv is not _RELEASED_VIEW:
            self._set_limits(0, False)
            self.size = 0
            for view in (self._m32, self._m64):
                view.release()
            self._m32 = self._m64 = _RELEASED_VIEW
            mv.release()


# --------------------------------------------------------------------------- cffi

FALLBACK_REASON: str | None = None
"""Why the pure-Python fallback is in use (``None`` with the cffi backend)."""

CffiPinned: type[Pinned] | None = None
"""The cffi :class:`Pinned` used on this host, or ``None`` without the extension."""

CffiAtomicPinned: type[Pinned] | None = None
"""The cffi :class:`Pinned` that calls the ``__atomic`` C helpers for every access."""

# On x86 (total store order) an aligned plain load already has acquire semantics
# and an aligned plain store release semantics, and cffi's typed-pointer indexing
# compiles to exactly one such ``mov``. That avoids the C call, which costs more
# than the access itself because cffi releases and re-takes the GIL around every
# call. Elsewhere every ordered access goes through the __atomic helpers.
_PLAIN_IS_ORDERED = sys.byteorder == "little" and platform.machine().lower() in {
    "x86_64",
    "amd64",
    "i386",
    "i486",
    "i586",
    "i686",
    "x86",
}

try:
    if os.environ.get("PCIDEV_NATIVE", "").strip().lower() == "python":
        raise ImportError("PCIDEV_NATIVE=python is set")
    from pcidev._native import ffi as _ffi
    from pcidev._native import lib as _lib
except ImportError as exc:  # the extension was not built, or the fallback was forced
    FALLBACK_REASON = str(exc) or type(exc).__name__
else:

    class _CffiPinnedBase(Pinned):
        """Shared part of the cffi :class:`Pinned` variants: pinning, bulk copies."""

        __slots__ = ("_p32", "_p64", "_ptr")

        def __init__(self, buf: Any, *, writable: bool = False) -> None:
            with memoryview(buf) as mv:
                if not mv.c_contiguous:
                    raise TypeError("buffer must be C-contiguous")
                if writable and mv.readonly:
                    raise DmaError("buffer is read-only")
                nbytes = mv.nbytes
            if writable:
                ptr = _ffi.from_buffer("uint8_t[]", buf, require_writable=True)
            else:
                ptr = _ffi.from_buffer("uint8_t[]", buf, require_writable=False)
            # None once released (the limits then keep every access from reaching it).
            self._ptr: Any = ptr
            misalignment = int(_ffi.cast("uintptr_t", ptr)) & 7
            # Typed pointers based at the 8-aligned address at or below the buffer
            # start, so that element (offset + misalignment) >> k is the aligned
            # word at ``offset``. They are only dereferenced in bounds.
            aligned = _ffi.cast("uint8_t *", ptr) - misalignment
            self._p32: _Words = _ffi.cast("uint32_t *", aligned)
            self._p64: _Words = _ffi.cast("uint64_t *", aligned)
            self._attach(nbytes, writable, misalignment)

        def _released_flag(self) -> bool:
            return self._ptr is None

        def move(self, dst_offset: int, src_offset: int, length: int) -> None:
            """``memmove`` ``length`` bytes within the buffer (overlap-safe)."""
            self._check_range(dst_offset, length, self._wlim1, write=True)
            self._check_range(src_offset, length, self.size, write=False)
            if length:
                _lib.pcidev_memmove(self._ptr, dst_offset, self._ptr, src_offset, length)

        def copy_from(self, dst_offset: int, src: Pinned, src_offset: int, length: int) -> None:
            """``memmove`` ``length`` bytes from ``src`` (pinned by a cffi backend)."""
            if not isinstance(src, _CffiPinnedBase):
                raise TypeError("copy_from needs a source pinned by the same backend")
            self._check_range(dst_offset, length, self._wlim1, write=True)
            src._check_range(src_offset, length, src.size, write=False)
            if length:
                _lib.pcidev_memmove(self._ptr, dst_offset, src._ptr, src_offset, length)

        def fill(self, offset: int, length: int, byte: int = 0) -> None:
            """``memset`` ``length`` bytes at ``offset`` to ``byte`` (0..255)."""
            if type(byte) is not int or not 0 <= byte <= 0xFF:
                raise ValueError(f"fill byte {byte!r} is not in 0..255")
            self._check_range(offset, length, self._wlim1, write=True)
            if length:
                _lib.pcidev_memset(self._ptr, offset, byte, length)

        def release(self) -> None:
            """Drop the buffer export; later accesses raise :class:`~pcidev.errors.DmaError`."""
            ptr, self._ptr = self._ptr, None
            if ptr is not None:
                self._p32 = self._p64 = _ffi.NULL  # indexing it raises instead of crashing
                self._set_limits(0, False)
                self.size = 0
                _ffi.release(ptr)

    class _CffiAtomicPinned(_CffiPinnedBase):
        """cffi :class:`Pinned` whose loads and stores call the ``__atomic`` C helpers.

        :param buf: any C-contiguous buffer.
        :param writable: request write access; :class:`~pcidev.errors.DmaError` if
            the buffer is read-only.
        :raises TypeError: ``buf`` is not a C-contiguous buffer.
        """

        __slots__ = ()

        def load32(self, offset: int) -> int:
            """Acquire-load the little-endian 32-bit value at ``offset`` (4-aligned)."""
            if 0 <= offset <= self._lim4 and not (offset + self._mis) & 3:
                return _lib.pcidev_load32(self._ptr, offset)
            raise self._bad(offset, 4)

        def load64(self, offset: int) -> int:
            """Acquire-load the little-endian 64-bit value at ``offset`` (8-aligned)."""
            if 0 <= offset <= self._lim8 and not (offset + self._mis) & 7:
                return _lib.pcidev_load64(self._ptr, offset)
            raise self._bad(offset, 8)

        def store32(self, offset: int, value: int) -> None:
            """Release-store ``value`` little-endian as 32 bits at ``offset`` (4-aligned)."""
            if 0 <= offset <= self._wlim4 and not (offset + self._mis) & 3:
                _lib.pcidev_store32(self._ptr, offset, value)
                return
            raise self._bad(offset, 4, write=True)

        def store64(self, offset: int, value: int) -> None:
            """Release-store ``value`` little-endian as 64 bits at ``offset`` (8-aligned)."""
            if 0 <= offset <= self._wlim8 and not (offset + self._mis) & 7:
                _lib.pcidev_store64(self._ptr, offset, value)
                return
            raise self._bad(offset, 8, write=True)

    class _CffiTsoPinned(_CffiPinnedBase):
        """cffi :class:`Pinned` for x86: one plain aligned ``mov`` per access.

        Under x86's total store order that ``mov`` is an acquire load or a release
        store, so this has the same ordering as :class:`CffiAtomicPinned` at less
        than half the cost (no C call, hence no GIL release).

        :param buf: any C-contiguous buffer.
        :param writable: request write access; :class:`~pcidev.errors.DmaError` if
            the buffer is read-only.
        :raises TypeError: ``buf`` is not a C-contiguous buffer.
        """

        __slots__ = ()

        def load32(self, offset: int) -> int:
            """Acquire-load the little-endian 32-bit value at ``offset`` (4-aligned)."""
            if 0 <= offset <= self._lim4:
                o = offset + self._mis
                if not o & 3:
                    return self._p32[o >> 2]
            raise self._bad(offset, 4)

        def load64(self, offset: int) -> int:
            """Acquire-load the little-endian 64-bit value at ``offset`` (8-aligned)."""
            if 0 <= offset <= self._lim8:
                o = offset + self._mis
                if not o & 7:
                    return self._p64[o >> 3]
            raise self._bad(offset, 8)

        def store32(self, offset: int, value: int) -> None:
            """Release-store ``value`` little-endian as 32 bits at ``offset`` (4-aligned)."""
            if 0 <= offset <= self._wlim4:
                o = offset + self._mis
                if not o & 3:
                    self._p32[o >> 2] = value
                    return
            raise self._bad(offset, 4, write=True)

        def store64(self, offset: int, value: int) -> None:
            """Release-store ``value`` little-endian as 64 bits at ``offset`` (8-aligned)."""
            if 0 <= offset <= self._wlim8:
                o = offset + self._mis
                if not o & 7:
                    self._p64[o >> 3] = value
                    return
            raise self._bad(offset, 8, write=True)

    CffiAtomicPinned = _CffiAtomicPinned
    CffiPinned = _CffiTsoPinned if _PLAIN_IS_ORDERED else _CffiAtomicPinned

BACKEND: str = "python" if CffiPinned is None else "cffi"
"""Which implementation :func:`pin` uses: ``"cffi"`` or ``"python"``."""

ORDERING: str = "python" if CffiPinned is None else ("x86-tso" if _PLAIN_IS_ORDERED else "atomic")
"""How :class:`Pinned` orders accesses: ``"x86-tso"`` (plain aligned ``mov``),
``"atomic"`` (``__atomic`` acquire/release helpers) or ``"python"`` (fallback)."""

_PinnedImpl: type[Pinned] = PythonPinned if CffiPinned is None else CffiPinned
_fence_lock = threading.Lock()


def pin(buf: Any, *, writable: bool = False) -> Pinned:
    """Hold ``buf`` for native access with the selected backend.

    :param buf: any C-contiguous buffer (``mmap``, ``bytearray``, ``memoryview``...).
    :param writable: request write access.
    :returns: a :class:`Pinned`; release it (or use ``with``) before closing ``buf``.
    :raises DmaError: ``writable`` was requested on a read-only buffer.
    :raises TypeError: ``buf`` is not a C-contiguous buffer.
    """
    return _PinnedImpl(buf, writable=writable)


def load32(buf: Any, offset: int) -> int:
    """Acquire-load the little-endian 32-bit value at ``offset`` of ``buf``.

    Pins ``buf`` for the duration of the call; use :func:`pin` for repeated access.

    :param buf: any C-contiguous buffer.
    :param offset: byte offset, 4-byte aligned.
    :returns: the value.
    :raises DmaError: ``offset`` is out of range or misaligned.
    """
    with pin(buf) as p:
        return p.load32(offset)


def load64(buf: Any, offset: int) -> int:
    """Acquire-load the little-endian 64-bit value at ``offset`` of ``buf``.

    :param buf: any C-contiguous buffer.
    :param offset: byte offset, 8-byte aligned.
    :returns: the value.
    :raises DmaError: ``offset`` is out of range or misaligned.
    """
    with pin(buf) as p:
        return p.load64(offset)


def store32(buf: Any, offset: int, value: int) -> None:
    """Release-store ``value`` little-endian as 32 bits at ``offset`` of ``buf``.

    :param buf: a writable C-contiguous buffer.
    :param offset: byte offset, 4-byte aligned.
    :param value: 0 .. 2**32-1.
    :raises DmaError: out of range, misaligned, or ``buf`` is read-only.
    :raises OverflowError: ``value`` does not fit.
    """
    with pin(buf, writable=True) as p:
        p.store32(offset, value)


def store64(buf: Any, offset: int, value: int) -> None:
    """Release-store ``value`` little-endian as 64 bits at ``offset`` of ``buf``.

    :param buf: a writable C-contiguous buffer.
    :param offset: byte offset, 8-byte aligned.
    :param value: 0 .. 2**64-1.
    :raises DmaError: out of range, misaligned, or ``buf`` is read-only.
    :raises OverflowError: ``value`` does not fit.
    """
    with pin(buf, writable=True) as p:
        p.store64(offset, value)


def fence() -> None:
    """Full memory fence (sequentially consistent)."""
    if CffiPinned is not None:
        _lib.pcidev_fence()
    else:
        with _fence_lock:
            pass


def memmove(dst: Any, dst_offset: int, src: Any, src_offset: int, length: int) -> None:
    """Copy ``length`` bytes from ``src[src_offset:]`` to ``dst[dst_offset:]``.

    ``dst`` and ``src`` may be the same buffer and the ranges may overlap.

    :param dst: writable C-contiguous buffer.
    :param dst_offset: byte offset in ``dst``.
    :param src: C-contiguous buffer.
    :param src_offset: byte offset in ``src``.
    :param length: number of bytes.
    :raises DmaError: a range is outside its buffer, or ``dst`` is read-only.
    """
    with pin(dst, writable=True) as d, pin(src) as s:
        d.copy_from(dst_offset, s, src_offset, length)


def memset(dst: Any, offset: int, length: int, byte: int = 0) -> None:
    """Set ``length`` bytes of ``dst`` at ``offset`` to ``byte``.

    :param dst: writable C-contiguous buffer.
    :param offset: byte offset.
    :param length: number of bytes.
    :param byte: fill value, 0..255.
    :raises DmaError: the range is outside ``dst``, or ``dst`` is read-only.
    :raises ValueError: ``byte`` is not in 0..255.
    """
    with pin(dst, writable=True) as d:
        d.fill(offset, length, byte)


# --------------------------------------------------------------------------- CRCs

#: CRC-16/T10-DIF generator polynomial (MSB first, initial value 0, no final XOR)
CRC16_T10DIF_POLY = 0x8BB7
#: CRC-64/NVME generator polynomial, reflected form of 0xAD93D23594C93659 (initial value
#: and final XOR all ones)
CRC64_NVME_POLY_REFLECTED = 0x9A6C9329AC4BC9B5


def _tables() -> tuple[tuple[int, ...], tuple[int, ...]]:
    t16 = []
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = ((c << 1) ^ CRC16_T10DIF_POLY) if c & 0x8000 else c << 1
        t16.append(c & 0xFFFF)
    t64 = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ CRC64_NVME_POLY_REFLECTED if c & 1 else c >> 1
        t64.append(c)
    return tuple(t16), tuple(t64)


_T16, _T64 = _tables()


def py_crc16_t10dif(data: Any, crc: int = 0) -> int:
    """Pure-Python :func:`crc16_t10dif` (the fallback; also what tests compare against)."""
    t = _T16
    crc &= 0xFFFF
    for b in memoryview(data).cast("B"):
        crc = ((crc << 8) & 0xFFFF) ^ t[(crc >> 8) ^ b]
    return crc


def py_crc64_nvme(data: Any, crc: int = 0) -> int:
    """Pure-Python :func:`crc64_nvme` (the fallback; also what tests compare against)."""
    t = _T64
    crc = ~crc & _MAX64
    for b in memoryview(data).cast("B"):
        crc = (crc >> 8) ^ t[(crc ^ b) & 0xFF]
    return ~crc & _MAX64


if CffiPinned is not None and hasattr(_lib, "pcidev_crc64_nvme"):
    _from_buffer = _ffi.from_buffer
    _c_crc16 = _lib.pcidev_crc16_t10dif
    _c_crc64 = _lib.pcidev_crc64_nvme

    def crc16_t10dif(data: Any, crc: int = 0) -> int:
        """CRC-16/T10-DIF of ``data`` (the 16-bit Guard of NVMe protection information):
        polynomial 0x8BB7, initial value 0, not reflected, no final XOR. The check value
        (of ``b"123456789"``) is 0xD0DB.

        :param data: any C-contiguous buffer.
        :param crc: the CRC of the bytes before ``data`` (0 to start).
        :returns: the 16-bit CRC.
        """
        n = len(data) if type(data) is bytes else memoryview(data).nbytes
        return int(_c_crc16(crc, _from_buffer("uint8_t[]", data), n))

    def crc64_nvme(data: Any, crc: int = 0) -> int:
        """CRC-64/NVME of ``data`` (the 64-bit Guard; Linux's ``crc64_rocksoft``):
        reflected polynomial 0xAD93D23594C93659, initial value and final XOR all ones.
        The check value (of ``b"123456789"``) is 0xAE8B14860A799888.

        :param data: any C-contiguous buffer.
        :param crc: the CRC of the bytes before ``data`` (0 to start).
        :returns: the 64-bit CRC.
        """
        n = len(data) if type(data) is bytes else memoryview(data).nbytes
        return int(_c_crc64(crc, _from_buffer("uint8_t[]", data), n))

else:
    crc16_t10dif = py_crc16_t10dif
    crc64_nvme = py_crc64_nvme

CRC_BACKEND: str = "python" if crc16_t10dif is py_crc16_t10dif else "cffi"
"""Which CRC implementation :func:`crc16_t10dif` and :func:`crc64_nvme` use: ``"cffi"`` (the
extension's C functions) or ``"python"`` (no extension, or one built before it had them)."""


# ------------------------------------------------------------- msgpack measure
class MsgpackWalk(enum.IntEnum):
    """How :func:`measure_msgpack` ended (the C function's return values)."""

    #: one whole value, no bytes left over, the estimate within the limit
    OK = 0
    #: the estimate passed the limit (at the value at the returned offset)
    OVER = 1
    #: the bytes end inside a value (or a container declares more elements than bytes are left)
    TRUNCATED = 2
    #: the byte 0xc1, which msgpack never uses
    RESERVED = 3
    #: a container (even an empty one) inside :data:`MSGPACK_DEPTH` open non-empty ones
    DEEP = 4
    #: bytes left over after the value
    TRAILING = 5


#: The kinds of charge :func:`measure_msgpack` makes, in the order of its ``costs`` argument.
MSGPACK_COST_KINDS = ("int", "int64", "float", "ascii_base", "ascii_byte", "str_base", "str_byte",
                      "bin_base", "bin_byte", "ext_base", "ext_byte", "array_base", "array_item",
                      "map_base", "map_item")
#: Most non-empty containers open at once, and no container may start inside that many
#: (msgpack-python's own nesting limit).
MSGPACK_DEPTH = 1024
_MAX_COST = 0xFFFF
_MAX_LIMIT = 1 << 62


def _check_measure_args(costs: Sequence[int], limit: int) -> None:
    if len(costs) != len(MSGPACK_COST_KINDS):
        raise ValueError(f"costs must have {len(MSGPACK_COST_KINDS)} entries ({', '.join(MSGPACK_COST_KINDS)})")
    if any(type(c) is not int or not 0 <= c <= _MAX_COST for c in costs):
        raise ValueError(f"each cost must be an int in 0..{_MAX_COST}")
    if type(limit) is not int or not 0 <= limit <= _MAX_LIMIT:
        raise ValueError(f"limit must be an int in 0..2**62, got {limit!r}")


def py_measure_msgpack(data: Any, costs: Sequence[int], limit: int) -> tuple[MsgpackWalk, int, int]:
    """Pure-Python :func:`measure_msgpack` (the fallback; also what tests compare against)."""
    _check_measure_args(costs, limit)
    buf = bytes(data)
    size = len(buf)
    (c_int, c_int64, c_float, c_ascii, c_ascii_b, c_str, c_str_b, c_bin, c_bin_b, c_ext, c_ext_b,
     c_arr, c_arr_i, c_map, c_map_i) = costs
    left = [1]
    cost = pos = start = 0

    def need(width: int) -> int:
        nonlocal pos
        if size - pos < width:
            raise _Truncated
        v = int.from_bytes(buf[pos:pos + width], "big")
        pos += width
        return v

    try:
        while True:
            while len(left) > 1 and left[-1] == 0:
                left.pop()
            if left[-1] == 0:
                break
            left[-1] -= 1
            start = pos
            if pos >= size:
                raise _Truncated
            b = buf[pos]
            pos += 1
            count = -1  # a container's element count, else -1
            if b <= 0x7F or b in (0xC0, 0xC2, 0xC3):
                continue
            if b >= 0xE0:
                cost += c_int
            elif b <= 0x8F or b in (0xDE, 0xDF):
                n = b & 0x0F if b <= 0x8F else need(2 if b == 0xDE else 4)
                if n > (size - pos) // 2:
                    raise _Truncated
                cost += c_map + c_map_i * n
                count = 2 * n
            elif b <= 0x9F or b in (0xDC, 0xDD):
                n = b & 0x0F if b <= 0x9F else need(2 if b == 0xDC else 4)
                if n > size - pos:
                    raise _Truncated
                cost += c_arr + c_arr_i * n
                count = n
            elif b <= 0xBF or b in (0xD9, 0xDA, 0xDB):
                n = b & 0x1F if b <= 0xBF else need(1 << (b - 0xD9))
                if n > size - pos:
                    raise _Truncated
                cost += (c_ascii + c_ascii_b * n) if buf[pos:pos + n].isascii() else (c_str + c_str_b * n)
                pos += n
            elif b == 0xC1:
                return MsgpackWalk.RESERVED, cost, start
            elif b in (0xC4, 0xC5, 0xC6):
                n = need(1 << (b - 0xC4))
                if n > size - pos:
                    raise _Truncated
                cost += c_bin + c_bin_b * n
                pos += n
            elif b in (0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8):
                n = need(1 << (b - 0xC7)) if b <= 0xC9 else 1 << (b - 0xD4)
                if size - pos < 1 or n > size - pos - 1:
                    raise _Truncated
                cost += c_ext + c_ext_b * n
                pos += 1 + n
            else:
                width, charge = _FIXED[b]
                need(width)
                cost += (0, c_int, c_int64, c_float)[charge]
            if cost > limit:
                return MsgpackWalk.OVER, cost, start
            if count >= 0:
                if len(left) > MSGPACK_DEPTH:
                    return MsgpackWalk.DEEP, cost, start
                if count:
                    left.append(count)
    except _Truncated:
        return MsgpackWalk.TRUNCATED, cost, start
    if pos != size:
        return MsgpackWalk.TRAILING, cost, pos
    return MsgpackWalk.OK, cost, size


class _Truncated(Exception):
    pass


# fixed-width numbers: first byte -> (payload width, charge: 0 none, 1 int, 2 int64, 3 float)
_FIXED = {0xCA: (4, 3), 0xCB: (8, 3), 0xCC: (1, 0), 0xCD: (2, 1), 0xCE: (4, 1), 0xCF: (8, 2),
          0xD0: (1, 1), 0xD1: (2, 1), 0xD2: (4, 1), 0xD3: (8, 2)}


if CffiPinned is not None and hasattr(_lib, "pcidev_msgpack_measure"):
    _c_measure = _lib.pcidev_msgpack_measure
    _new = _ffi.new
    _buffer_of = _ffi.from_buffer

    def measure_msgpack(data: Any, costs: Sequence[int], limit: int) -> tuple[MsgpackWalk, int, int]:
        """Walk one msgpack value without building it, adding up what decoding it would cost.

        The charge of each value comes from ``costs`` (one entry per
        :data:`MSGPACK_COST_KINDS` kind): nil, booleans, positive fixints and uint 8 (the
        integers CPython caches) are free; negative fixints, uint 16/32 and int 8/16/32
        charge ``int``, 64-bit integers ``int64``, floats ``float``; a str charges
        ``ascii_base + ascii_byte * n`` when its n bytes are all ASCII, else ``str_base +
        str_byte * n``; bin and ext charge their base plus per byte; an array or map charges
        its base plus ``array_item``/``map_item`` per declared element, at its header. The
        walk stops at the first problem, in stream order: bytes ending inside a value (a
        container declaring more elements than bytes are left counts, checked before its
        charge), the unused byte 0xc1, the estimate passing ``limit``, a container starting
        inside :data:`MSGPACK_DEPTH` open non-empty ones; then bytes left after the value. Nothing the
        bytes say is allocated: memory use is constant.

        :param data: the bytes (any C-contiguous buffer).
        :param costs: the charges, ints in 0..65535.
        :param limit: the most the estimate may reach (0..2**62).
        :returns: ``(how the walk ended, the estimate so far, the offset of the value where it
            stopped)``; the offset is ``len(data)`` when the walk ended with the value, and the
            first extra byte's for :attr:`MsgpackWalk.TRAILING`.
        :raises ValueError: bad ``costs`` or ``limit``.
        """
        _check_measure_args(costs, limit)
        out = _new("uint64_t[2]")
        with memoryview(data) as mv:
            n = mv.nbytes
        status = _c_measure(_buffer_of("uint8_t[]", data), n, _new("uint64_t[]", list(costs)), limit, out)
        return MsgpackWalk(status), int(out[0]), int(out[1])

else:
    measure_msgpack = py_measure_msgpack

MSGPACK_BACKEND: str = "python" if measure_msgpack is py_measure_msgpack else "cffi"
"""Which :func:`measure_msgpack` runs: ``"cffi"`` (the extension's C walk) or ``"python"``."""
