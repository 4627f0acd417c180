"""Namespace backends: where a namespace's blocks live.

A backend is a flat array of ``size`` bytes with vectored reads and writes straight
between it and guest-memory views (no copy in Python for files: ``os.preadv`` /
``os.pwritev``; one ``memcpy`` for memory), plus flush, deallocate and zeroing.
Three are built in:

``file``
    a raw image file, sparse allowed (``file:path=/x.img,size=1G``). Created
    sparse when missing; deallocation punches holes
    (``fallocate(PUNCH_HOLE | KEEP_SIZE)``); Flush and FUA writes reach stable
    storage (``fdatasync`` / ``RWF_DSYNC``) before they complete.
    ``direct=on`` opens it with ``O_DIRECT``: block sizes below the file system's
    direct-I/O alignment are refused, and guest buffers that are not aligned go
    through an aligned bounce buffer. ``readonly=on`` refuses writes.
    File I/O may block, so the I/O command set runs it on worker threads.
``mem``
    volatile memory (``mem:size=64M``): a memfd (default) or an anonymous mapping
    (``anon=on``); deallocation punches holes in the memfd (or zeroes the anonymous
    mapping). Fast: commands complete inline.
``null``
    reads return zeros, writes are discarded (``null:size=1G``). Fast.

Other plugins contribute backends through the hook
:func:`pcidev_nvme.hookspecs.pcidev_nvme_register_backends`; see
:func:`load_backends`. A backend factory takes the option dictionary of the
namespace spec (string values), **removes** the options it understands and returns
a :class:`Backend`; options left over are reported as unknown.

Errors: factories raise :class:`~pcidev.errors.ConfigError` for bad options;
I/O methods raise :class:`OSError` (the I/O command set turns it into a media or
internal error status).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar, runtime_checkable

import attrs

from pcidev.errors import ConfigError, PluginError
from pcidev.properties import Size, structure_config
from pcidev.plugins import each_plugin
from pcidev.registry import PluginOrigin, check_name

__all__ = [
    "BACKEND_KIND",
    "Backend",
    "BackendEntry",
    "BackendFactory",
    "BackendRegistry",
    "BaseBackend",
    "FileBackend",
    "MemoryBackend",
    "NullBackend",
    "builtin_backends",
    "load_backends",
    "FileConfig",
    "MemConfig",
    "NullConfig",
    "take_options",
    "punch_hole",
]

#: Component kind under which backends are known (also accepted by ``add_component``).
BACKEND_KIND = "nvme-backend"

#: The hook through which plugins contribute backends.
HOOK_NAME = "pcidev_nvme_register_backends"

#: Backend sizes must be a multiple of this (so both LBA formats fit exactly).
SIZE_ALIGN = 4096

_C = TypeVar("_C")

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
if _IOV_MAX <= 0:
    _IOV_MAX = 1024

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with a mode (Python's :mod:`os` only offers mode 0).

    :param fd: an open file descriptor.
    :param mode: ``FALLOC_FL_*`` flags.
    :param offset: first byte.
    :param length: number of bytes (> 0).
    :raises OSError: the kernel refused (``EOPNOTSUPP`` when the file system
        cannot do it).
    """
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}): {os.strerror(err)}")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset + length)`` of a file; it reads back as zeros.

    :raises OSError: the file system cannot punch holes.
    """
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def _check_size(size: int, what: str = "size") -> int:
    if size <= 0 or size % SIZE_ALIGN:
        raise ConfigError(f"{what}={size} must be a positive multiple of {SIZE_ALIGN}")
    return size


def take_options(cls: type[_C], options: dict[str, Any], *, what: str) -> _C:
    """Structure the options a backend understands into its typed config.

    Removes the keys that are fields of ``cls`` from ``options`` (what is left is
    reported as unknown by the caller) and structures them with pcidev's property
    grammar (:func:`pcidev.properties.structure_config`), so ``size=0x100000``,
    ``size=64MiB`` and ``readonly=y`` mean what they mean everywhere else.

    :param cls: an attrs class.
    :param options: the namespace spec's options; the used ones are removed.
    :param what: prefix of error messages (``"mem backend"``).
    :returns: the config.
    :raises ConfigError: a bad value or a missing required option.
    """
    names = {f.name for f in attrs.fields(cls)}
    mine = {k: options.pop(k) for k in list(options) if k in names}
    return structure_config(cls, mine, what=what)


def _size_field(*, required: bool) -> Any:
    def check(inst: Any, attr: attrs.Attribute, value: int | None) -> None:
        if value is not None:
            _check_size(value)

    kw: dict[str, Any] = {"validator": check, "metadata": {"help": "bytes, a multiple of 4096"}}
    if not required:
        kw["default"] = None
    return attrs.field(**kw)


@attrs.define(kw_only=True)
class MemConfig:
    """Options of the ``mem`` backend."""

    size: Size = _size_field(required=True)
    anon: bool = attrs.field(default=False, metadata={
        "help": "an anonymous private mapping instead of a memfd"})


@attrs.define(kw_only=True)
class NullConfig:
    """Options of the ``null`` backend."""

    size: Size = _size_field(required=True)


@attrs.define(kw_only=True)
class FileConfig:
    """Options of the ``file`` backend."""

    path: str = attrs.field(metadata={"help": "the image file (created sparse when missing)"})
    size: Size | None = _size_field(required=False)
    direct: bool = attrs.field(default=False, metadata={"help": "open with O_DIRECT"})
    readonly: bool = attrs.field(default=False, metadata={"help": "refuse writes"})


# ----------------------------------------------------------------------------- protocol


@runtime_checkable
class Backend(Protocol):
    """What a namespace needs from its storage.

    ``offset`` and lengths are bytes; the namespace only issues whole blocks inside
    ``[0, size)``. Views are :class:`memoryview` slices of guest memory, at most
    a few thousand per call, of any length and alignment.

    :ivar kind: the backend's registered name (``file``, ``mem``...).
    :ivar size: capacity in bytes (a multiple of 4096).
    :ivar inline: operations are fast and never block (memory): the I/O command
        set runs them on the submitting thread. ``False`` sends them to workers.
    :ivar read_only: writes are refused (the namespace reports write protection).
    :ivar min_block: smallest block size usable (``O_DIRECT`` alignment), 512 or more.
    :ivar identity_path: a file where the namespace may persist its identifiers and
        format next to the data (``None``: nothing is persisted).
    """

    kind: str
    size: int
    inline: bool
    read_only: bool
    min_block: int
    identity_path: str | None

    def readv(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` (in order) from ``offset``."""

    def writev(self, views: list[memoryview], offset: int, *, fua: bool = False) -> None:
        """Store ``views`` (in order) at ``offset``; with ``fua`` durably before returning."""

    def flush(self) -> None:
        """Make every completed write durable."""

    def deallocate(self, offset: int, length: int) -> None:
        """Deallocate a range: it reads as zeros afterwards and may free space."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """Set a range to zeros, keeping it allocated where the backend can."""

    def allocated_bytes(self) -> int:
        """Bytes currently allocated (for NUSE)."""

    def close(self) -> None:
        """Release resources. Idempotent."""


class BaseBackend:
    """Convenient defaults for backends (subclassing it is optional).

    Subclasses implement :meth:`readv` and :meth:`writev` and set ``size``.
    """

    kind = "base"
    inline = False
    read_only = False
    min_block = 512
    identity_path: str | None = None

    def __init__(self, size: int) -> None:
        self.size = size

    def readv(self, views: list[memoryview], offset: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def writev(self, views: list[memoryview], offset: int, *, fua: bool = False) -> None:  # pragma: no cover
        raise NotImplementedError

    def flush(self) -> None:
        """Nothing to do for volatile or write-through backends."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write zeros with :meth:`writev` in chunks of up to 1 MiB."""
        while length:
            n = min(length, len(_ZEROS))
            self.writev([_ZEROS_MV[:n]], offset)
            offset += n
            length -= n

    def deallocate(self, offset: int, length: int) -> None:
        """Default: zero the range (it reads as zeros, as the namespace promises)."""
        self.write_zeroes(offset, length)

    def allocated_bytes(self) -> int:
        """Default: everything is allocated."""
        return self.size

    def close(self) -> None:
        """Nothing to release."""

    def describe(self) -> str:
        """One line for logs."""
        return f"{self.kind} backend, {self.size} bytes"


_ZEROS = bytes(1 << 20)
_ZEROS_MV = memoryview(_ZEROS)


def _zero_views(views: Iterable[memoryview]) -> None:
    for v in views:
        n = len(v)
        pos = 0
        while pos < n:
            k = min(n - pos, len(_ZEROS))
            v[pos : pos + k] = _ZEROS_MV[:k]
            pos += k


def _views_after(views: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``views`` once their first ``n`` bytes (fewer than they hold)
    are transferred: a short ``preadv``/``pwritev``."""
    i = 0
    while n >= len(views[i]):
        n -= len(views[i])
        i += 1
    return [views[i][n:], *views[i + 1 :]]


def _full_preadv(fd: int, views: list[memoryview], offset: int) -> None:
    """``preadv`` until every view is full; bytes past end of file read as zeros."""
    if len(views) == 1:
        v = views[0]
        n = os.preadv(fd, views, offset)
        if n == len(v):
            return
        views = [v[n:]] if n else views
        offset += n
        if n == 0:
            _zero_views(views)
            return
    while views:
        batch = views[:_IOV_MAX]
        want = sum(len(v) for v in batch)
        n = os.preadv(fd, batch, offset)
        if n == 0:
            _zero_views(views)  # past the end of the file
            return
        offset += n
        views = views[len(batch) :] if n == want else _views_after(views, n)


def _full_pwritev(fd: int, views: list[memoryview], offset: int, flags: int = 0) -> None:
    """``pwritev`` until every view is written."""
    while views:
        batch = views[:_IOV_MAX]
        want = sum(len(v) for v in batch)
        n = os.pwritev(fd, batch, offset, flags) if flags else os.pwritev(fd, batch, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        views = views[len(batch) :] if n == want else _views_after(views, n)


# ----------------------------------------------------------------------------- null


class NullBackend(BaseBackend):
    """Reads zeros, discards writes; nothing is ever allocated."""

    kind = "null"
    inline = True

    def readv(self, views: list[memoryview], offset: int) -> None:
        """Fill the views with zeros."""
        _zero_views(views)

    def writev(self, views: list[memoryview], offset: int, *, fua: bool = False) -> None:
        """Discard."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """Nothing to do."""

    def deallocate(self, offset: int, length: int) -> None:
        """Nothing to do."""

    def allocated_bytes(self) -> int:
        """Always 0."""
        return 0


def _make_null(options: dict[str, Any]) -> NullBackend:
    return NullBackend(take_options(NullConfig, options, what="null backend").size)


# ----------------------------------------------------------------------------- memory


class MemoryBackend(BaseBackend):
    """Volatile memory: a memfd (default) or an anonymous private mapping.

    Reads and writes are one ``memcpy`` between the mapping and the guest views.
    A map with one byte per 4 KiB page records which pages were written: reads
    of pages never written (or deallocated) go through ``preadv`` on the memfd,
    which returns zeros without allocating memory (touching a hole through the
    mapping would allocate it), so :meth:`allocated_bytes` (NUSE) stays true.
    Deallocation frees whole pages (``PUNCH_HOLE`` on the memfd,
    ``MADV_DONTNEED`` on the anonymous mapping) and zeroes partial ones.

    :param size: bytes (a multiple of 4096).
    :param anon: use an anonymous private mapping instead of a memfd.
    """

    kind = "mem"
    inline = True

    def __init__(self, size: int, *, anon: bool = False) -> None:
        super().__init__(_check_size(size))
        self.fd = -1
        try:
            if anon:
                self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            else:
                self.fd = os.memfd_create("pcidev-nvme-ns", os.MFD_CLOEXEC)
                os.ftruncate(self.fd, size)
                self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except OSError as exc:
            if self.fd >= 0:
                os.close(self.fd)
            raise ConfigError(f"cannot allocate {size} bytes of namespace memory: {exc}") from exc
        self._mv = memoryview(self._mm)
        self._written = bytearray(size >> _PAGE_SHIFT)  # 1 = page holds written data
        self._unwritten = len(self._written)  # pages never written (or deallocated)
        self._lock = threading.Lock()

    @classmethod
    def from_fd(cls, fd: int, size: int) -> MemoryBackend:
        """A backend over an existing memfd (a migrated namespace: the source's memory).

        ``fd`` is duplicated (the caller keeps its own). The map of written pages is
        rebuilt from the file's data extents (``SEEK_DATA``/``SEEK_HOLE``), so NUSE and
        the hole-reading shortcut stay what they were on the source.

        :raises ConfigError: the descriptor is not a file of ``size`` bytes or cannot be mapped.
        """
        _check_size(size)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise ConfigError(f"namespace memory descriptor: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise ConfigError(f"namespace memory descriptor is not a {size}-byte memory file "
                              f"(mode {st.st_mode:o}, {st.st_size} bytes)")
        self = cls.__new__(cls)
        BaseBackend.__init__(self, size)
        self.fd = os.dup(fd)
        try:
            os.set_inheritable(self.fd, False)
            self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except OSError as exc:
            os.close(self.fd)
            raise ConfigError(f"cannot map the namespace memory: {exc}") from exc
        self._mv = memoryview(self._mm)
        written = bytearray(size >> _PAGE_SHIFT)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), size)
            a, b = start >> _PAGE_SHIFT, (end + _PAGE_MASK) >> _PAGE_SHIFT
            written[a:b] = b"\x01" * (b - a)
            pos = end
        self._written = written
        self._unwritten = written.count(0)
        self._lock = threading.Lock()
        return self

    def readv(self, views: list[memoryview], offset: int) -> None:
        """Copy from the memory into the views (one ``memcpy`` each)."""
        if len(views) == 1:
            v = views[0]
            n = len(v)
            if not self._unwritten or self._written.find(
                0, offset >> _PAGE_SHIFT, (offset + n + _PAGE_MASK) >> _PAGE_SHIFT
            ) < 0:
                v[:] = self._mv[offset : offset + n]
                return
        else:
            n = sum(len(v) for v in views)
            if not self._unwritten or self._written.find(
                0, offset >> _PAGE_SHIFT, (offset + n + _PAGE_MASK) >> _PAGE_SHIFT
            ) < 0:
                mv = self._mv
                for v in views:
                    k = len(v)
                    v[:] = mv[offset : offset + k]
                    offset += k
                return
        # Some page was never written: read through the file (holes give zeros).
        if self.fd >= 0:
            _full_preadv(self.fd, views, offset)
        else:  # untouched anonymous pages are the shared zero page: reading is free
            mv = self._mv
            for v in views:
                k = len(v)
                v[:] = mv[offset : offset + k]
                offset += k

    def writev(self, views: list[memoryview], offset: int, *, fua: bool = False) -> None:
        """Copy the views into the memory (FUA means nothing for volatile memory)."""
        mv = self._mv
        start = offset
        for v in views:
            n = len(v)
            mv[offset : offset + n] = v
            offset += n
        if self._unwritten:
            self._mark(start >> _PAGE_SHIFT, (offset + _PAGE_MASK) >> _PAGE_SHIFT)

    def _mark(self, a: int, b: int) -> None:
        """Record pages ``[a, b)`` as written."""
        with self._lock:
            written = self._written
            self._unwritten -= written.count(0, a, b)
            written[a:b] = _ONES[: b - a] if b - a <= len(_ONES) else b"\x01" * (b - a)

    def deallocate(self, offset: int, length: int) -> None:
        """Free the whole pages of the range and zero the rest."""
        end = offset + length
        a = (offset + _PAGE_MASK) >> _PAGE_SHIFT  # first whole page
        b = end >> _PAGE_SHIFT  # one past the last whole page
        if a >= b:
            self.write_zeroes(offset, length)
            return
        if offset < a << _PAGE_SHIFT:
            self.write_zeroes(offset, (a << _PAGE_SHIFT) - offset)
        if end > b << _PAGE_SHIFT:
            self.write_zeroes(b << _PAGE_SHIFT, end - (b << _PAGE_SHIFT))
        start, n = a << _PAGE_SHIFT, (b - a) << _PAGE_SHIFT
        with self._lock:
            if self.fd >= 0:
                punch_hole(self.fd, start, n)
            else:
                self._mm.madvise(mmap.MADV_DONTNEED, start, n)
            self._unwritten += self._written.count(1, a, b)
            self._written[a:b] = bytes(b - a)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero the range (``memset``); the pages count as written."""
        _zero_views([self._mv[offset : offset + length]])
        self._mark(offset >> _PAGE_SHIFT, (offset + length + _PAGE_MASK) >> _PAGE_SHIFT)

    def allocated_bytes(self) -> int:
        """Bytes of the pages written and not deallocated since."""
        return (len(self._written) - self._unwritten) << _PAGE_SHIFT

    def close(self) -> None:
        """Unmap and close. Idempotent."""
        with self._lock:
            if self._mv is None:
                return
            self._mv.release()
            self._mv = None  # type: ignore[assignment]
            self._mm.close()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


_PAGE_SHIFT = 12
_PAGE_MASK = (1 << _PAGE_SHIFT) - 1
_ONES = b"\x01" * 65536


def _make_mem(options: dict[str, Any]) -> MemoryBackend:
    cfg = take_options(MemConfig, options, what="mem backend")
    return MemoryBackend(cfg.size, anon=cfg.anon)


# ----------------------------------------------------------------------------- file


def _probe_direct_alignment(fd: int) -> int:
    """The smallest block (512 or 4096) an ``O_DIRECT`` read of ``fd`` accepts."""
    buf = mmap.mmap(-1, 3 * 4096)
    try:
        with memoryview(buf) as mv:
            for align in (512, 4096):
                try:
                    # A buffer aligned to ``align`` but not to 4096 (unless align is 4096).
                    os.preadv(fd, [mv[align : 2 * align]], align)
                    return align
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise ConfigError(f"O_DIRECT read failed: {exc}") from exc
    finally:
        buf.close()
    raise ConfigError("the file system refuses O_DIRECT reads of 512 and 4096 bytes")


class FileBackend(BaseBackend):
    """A raw image file.

    :param path: the image. Created (sparse, ``size`` bytes) when missing.
    :param size: bytes; required to create the file. For an existing file it must
        match the file's size if given.
    :param direct: open with ``O_DIRECT``.
    :param read_only: open read-only and refuse writes.
    :raises ConfigError: the file cannot be opened or created, sizes disagree, the
        size is not a multiple of 4096, or the file system refuses ``O_DIRECT``.
    """

    kind = "file"
    inline = False

    def __init__(
        self, path: str, size: int | None = None, *, direct: bool = False, read_only: bool = False
    ) -> None:
        self.path = os.path.abspath(path)
        self.read_only = read_only
        self.direct = direct
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        exists = os.path.exists(self.path)
        if not exists:
            if read_only:
                raise ConfigError(f"image {self.path} does not exist (and readonly=on)")
            if size is None:
                raise ConfigError(f"image {self.path} does not exist: give size=... to create it")
            flags |= os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot open image {self.path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not exists:
                os.ftruncate(fd, size)  # type: ignore[arg-type]
            elif not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ConfigError(f"{self.path} is neither a regular file nor a block device")
            else:
                actual = os.lseek(fd, 0, os.SEEK_END)  # block devices have no st_size
                if size is None:
                    size = actual
                elif size != actual:
                    raise ConfigError(
                        f"image {self.path} has {actual} bytes, not the size={size} given"
                    )
            _check_size(size, f"size of {self.path}")  # type: ignore[arg-type]
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot size image {self.path}: {exc.strerror}") from exc
        except ConfigError:
            os.close(fd)
            if not exists:
                os.unlink(self.path)
            raise
        super().__init__(size)  # type: ignore[arg-type]
        self.fd = fd
        self.dfd = -1
        self.min_block = 512
        self._bounce_lock = threading.Lock()
        self.identity_path = self.path + ".nvme-ids"
        if direct:
            try:
                self.dfd = os.open(self.path, (flags & ~(os.O_CREAT | os.O_EXCL)) | os.O_DIRECT)
            except OSError as exc:
                os.close(fd)
                raise ConfigError(f"cannot open {self.path} with O_DIRECT: {exc.strerror}") from exc
            try:
                self.min_block = _probe_direct_alignment(self.dfd)
            except ConfigError:
                self.close()
                raise

    # -- I/O ---------------------------------------------------------------------------

    def _aligned(self, views: list[memoryview]) -> bool:
        a = self.min_block - 1
        return all(not len(v) & a for v in views)

    def readv(self, views: list[memoryview], offset: int) -> None:
        """``preadv`` into the views (``O_DIRECT`` when possible)."""
        if self.dfd >= 0:
            if self._aligned(views):
                try:
                    _full_preadv(self.dfd, views, offset)
                    return
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
            self._bounce_read(views, offset)
            return
        _full_preadv(self.fd, views, offset)

    def writev(self, views: list[memoryview], offset: int, *, fua: bool = False) -> None:
        """``pwritev`` the views; with ``fua`` using ``RWF_DSYNC`` (durable on return)."""
        if self.read_only:
            raise OSError(errno.EROFS, "the image is read-only")
        flags = os.RWF_DSYNC if fua else 0
        if self.dfd >= 0:
            if self._aligned(views):
                try:
                    _full_pwritev(self.dfd, views, offset, flags)
                    return
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
            self._bounce_write(views, offset, flags)
            return
        _full_pwritev(self.fd, views, offset, flags)

    def _bounce_read(self, views: list[memoryview], offset: int) -> None:
        total = sum(len(v) for v in views)
        buf = mmap.mmap(-1, max(total, 1))
        try:
            with memoryview(buf) as mv:
                _full_preadv(self.dfd, [mv[:total]], offset)
                pos = 0
                for v in views:
                    n = len(v)
                    v[:] = mv[pos : pos + n]
                    pos += n
        finally:
            buf.close()

    def _bounce_write(self, views: list[memoryview], offset: int, flags: int) -> None:
        total = sum(len(v) for v in views)
        buf = mmap.mmap(-1, max(total, 1))
        try:
            with memoryview(buf) as mv:
                pos = 0
                for v in views:
                    n = len(v)
                    mv[pos : pos + n] = v
                    pos += n
                _full_pwritev(self.dfd, [mv[:total]], offset, flags)
        finally:
            buf.close()

    def flush(self) -> None:
        """``fdatasync``: every completed write reaches stable storage."""
        os.fdatasync(self.fd)

    def deallocate(self, offset: int, length: int) -> None:
        """Punch a hole (the blocks read as zeros and free their space)."""
        if self.read_only:
            raise OSError(errno.EROFS, "the image is read-only")
        try:
            punch_hole(self.fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            super().write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero the range, allocated (``FALLOC_FL_ZERO_RANGE``, else writes of zeros)."""
        if self.read_only:
            raise OSError(errno.EROFS, "the image is read-only")
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            super().write_zeroes(offset, length)

    def allocated_bytes(self) -> int:
        """Bytes of the file that hold data (``st_blocks``; holes do not count)."""
        return min(self.size, os.fstat(self.fd).st_blocks * 512)

    def close(self) -> None:
        """Close the file. Idempotent."""
        for attr in ("dfd", "fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)

    def describe(self) -> str:
        """One line for logs."""
        mode = ", O_DIRECT" if self.dfd >= 0 else ""
        ro = ", read-only" if self.read_only else ""
        return f"file {self.path}, {self.size} bytes{mode}{ro}"


def _make_file(options: dict[str, Any]) -> FileBackend:
    if not options.get("path"):
        raise ConfigError("the file backend needs path=...")
    cfg = take_options(FileConfig, options, what="file backend")
    return FileBackend(cfg.path, cfg.size, direct=cfg.direct, read_only=cfg.readonly)


# ----------------------------------------------------------------------------- registry

#: Attributes every backend must have (see :class:`Backend`; ``min_block`` and
#: ``identity_path`` are optional).
_REQUIRED = (
    "size", "inline", "read_only", "readv", "writev", "flush", "deallocate", "write_zeroes",
    "allocated_bytes", "close",
)

#: A backend factory: takes the spec's options (removing those it uses), returns a backend.
BackendFactory = Callable[[dict[str, Any]], Backend]


class BackendEntry:
    """A registered backend factory and where it came from.

    :param name: the backend name (the part before ``:`` in a namespace spec).
    :param factory: the factory.
    :param origin: the plugin that registered it.
    """

    __slots__ = ("factory", "name", "origin")

    def __init__(self, name: str, factory: BackendFactory, origin: PluginOrigin) -> None:
        self.name = name
        self.factory = factory
        self.origin = origin

    def __repr__(self) -> str:
        return f"<BackendEntry {self.name} from {self.origin.describe()}>"


class BackendRegistry:
    """Namespace backend factories by name.

    The argument of :func:`~pcidev_nvme.hookspecs.pcidev_nvme_register_backends`.
    """

    def __init__(self) -> None:
        self._entries: dict[str, BackendEntry] = {}
        self._origin = PluginOrigin()
        #: called once, on the first unknown name, to register more backends
        #: (see :func:`load_backends`: the installed plugins)
        self._discover: Callable[[BackendRegistry], None] | None = None

    @contextlib.contextmanager
    def registering_as(self, origin: PluginOrigin) -> Iterator[BackendRegistry]:
        """Attribute registrations made inside the ``with`` block to ``origin``.

        :param origin: the plugin being called.
        :returns: a context manager yielding this registry.
        """
        saved, self._origin = self._origin, origin
        try:
            yield self
        finally:
            self._origin = saved

    def add_backend(self, name: str, factory: BackendFactory) -> BackendEntry:
        """Register ``factory`` as backend ``name``.

        :param name: the backend name, ``^[a-z][a-z0-9_-]*$``.
        :param factory: ``factory(options: dict) -> Backend``; it removes the
            options it understands from ``options`` and raises
            :class:`~pcidev.errors.ConfigError` for bad values.
        :returns: the new entry.
        :raises PluginError: bad name, a factory that is not callable, or a
            name registered already.
        """
        check_name(name, "NVMe backend name")
        if not callable(factory):
            raise PluginError(f"NVMe backend {name!r}: factory {factory!r} is not callable")
        existing = self._entries.get(name)
        if existing is not None:
            raise PluginError(
                f"NVMe backend {name!r} is already registered by {existing.origin.describe()}"
            )
        entry = BackendEntry(name, factory, self._origin)
        self._entries[name] = entry
        return entry

    def add_component(self, kind: str, name: str, obj: BackendFactory) -> BackendEntry:
        """Same as :meth:`add_backend`, spelled as the device registry's method.

        :param kind: must be ``"nvme-backend"``.
        :raises PluginError: another kind.
        """
        if kind != BACKEND_KIND:
            raise PluginError(f"this registry only takes {BACKEND_KIND!r} components, not {kind!r}")
        return self.add_backend(name, obj)

    def entry(self, name: str) -> BackendEntry:
        """The entry registered as ``name``.

        :raises ConfigError: unknown backend (a namespace spec error).
        :raises PluginError: an installed plugin failed while registering backends
            (only when the name is not registered yet and plugins are consulted).
        """
        if self._discover is not None and isinstance(name, str) and name not in self._entries:
            discover, self._discover = self._discover, None
            discover(self)
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._entries)) or "none"
            raise ConfigError(f"unknown NVMe namespace backend {name!r} (known: {known})") from None

    def create(self, name: str, options: dict[str, Any]) -> Backend:
        """Build a backend from a spec's options.

        :param name: backend name.
        :param options: options (not modified).
        :returns: the backend.
        :raises ConfigError: unknown backend, bad or unknown options, or a factory
            failure (any exception from a third-party factory is reported as such).
        """
        entry = self.entry(name)
        rest = dict(options)
        try:
            backend = entry.factory(rest)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"NVMe backend {name!r} ({entry.origin.describe()}) failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if rest:
            try:
                backend.close()
            except Exception:
                pass
            raise ConfigError(
                f"unknown option(s) for NVMe backend {name!r}: {', '.join(sorted(rest))}"
            )
        missing = [attr for attr in _REQUIRED if not hasattr(backend, attr)]
        if missing:
            try:
                backend.close()
            except Exception:
                pass
            raise ConfigError(
                f"NVMe backend {name!r} returned {backend!r} without {', '.join(missing)} "
                "(subclass pcidev_nvme.backends.BaseBackend for defaults)"
            )
        return backend

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._entries.values()))


def builtin_backends() -> BackendRegistry:
    """A registry holding the built-in ``file``, ``mem`` and ``null`` backends."""
    reg = BackendRegistry()
    with reg.registering_as(PluginOrigin("nvme")):
        reg.add_backend("file", _make_file)
        reg.add_backend("mem", _make_mem)
        reg.add_backend("null", _make_null)
    return reg


def load_backends(pm: Any = None, *, installed: bool = True) -> BackendRegistry:
    """The built-in backends plus those contributed by plugins.

    Calls :func:`~pcidev_nvme.hookspecs.pcidev_nvme_register_backends` on every
    plugin of ``pm`` that implements it, one plugin at a time
    (:func:`pcidev.plugins.each_plugin`), so each backend records which plugin
    registered it and a failure names the plugin.

    :param pm: a plugin manager from :func:`pcidev.plugins.make_plugin_manager`
        (with the NVMe plugin loaded, so the hook specification is known), or
        ``None``: the built-ins, and the first time a spec names another backend
        the installed plugins (entry-point group ``pcidev``, honouring
        ``PCIDEV_BLOCKED_PLUGINS`` and ``PCIDEV_DISABLE_PLUGIN_AUTOLOAD``) are
        asked for theirs. That is how a controller built from its options alone
        (``pcidev serve``, the device registry) finds backends of installed plugins.
    :param installed: with ``pm`` ``None``, consult the installed plugins for
        unknown names (``False``: the built-ins only).
    :returns: the registry.
    :raises PluginError: a plugin's registration failed (names the plugin).
    """
    reg = builtin_backends()
    if pm is None:
        if installed:
            reg._discover = _register_installed
        return reg
    _register_from(pm, reg)
    return reg


def _register_from(pm: Any, reg: BackendRegistry) -> None:
    """Call every implementation of the backend hook of ``pm`` on ``reg``."""
    caller = getattr(pm.hook, HOOK_NAME, None)
    if caller is None or not caller.has_spec():
        return
    for hook in each_plugin(pm, HOOK_NAME):
        with reg.registering_as(hook.origin):
            hook(registry=reg)


def _register_installed(reg: BackendRegistry) -> None:
    """Register the backends of the installed plugins (a fresh plugin manager)."""
    from pcidev.plugins import make_plugin_manager

    _register_from(make_plugin_manager(), reg)
