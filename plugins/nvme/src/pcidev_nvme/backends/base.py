"""What a namespace backend is (:class:`Backend`) and what backends share.

A backend is a flat array of ``size`` bytes with vectored reads and writes straight
between it and guest-memory views, plus flush, deallocate and zeroing.
:class:`BaseBackend` gives defaults; the helpers here (vectored I/O until done,
``fallocate`` modes, zeroing views, typed options with :func:`take_options`) are
shared by the built-in backends and available to third-party ones.

Errors: factories raise :class:`~pcidev.errors.ConfigError` for bad options;
I/O methods raise :class:`OSError` (the I/O command set turns it into a media or
internal error status).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterable
from typing import Any, Protocol, TypeVar, runtime_checkable

import attrs

from pcidev.errors import ConfigError
from pcidev.properties import Size, structure_config

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "SIZE_ALIGN",
    "ZEROS",
    "ZEROS_MV",
    "Backend",
    "BaseBackend",
    "check_size",
    "data_extents",
    "fallocate",
    "full_preadv",
    "full_pwritev",
    "punch_hole",
    "size_field",
    "take_options",
    "zero_views",
]

#: Backend sizes must be a multiple of this (so both LBA formats fit exactly).
SIZE_ALIGN = 4096

_C = TypeVar("_C", bound=attrs.AttrsInstance)

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
if _IOV_MAX <= 0:
    _IOV_MAX = 1024

#: ``fallocate(2)`` mode flag: do not change the file size (Linux ``FALLOC_FL_KEEP_SIZE``, <linux/falloc.h>).
FALLOC_FL_KEEP_SIZE = 0x01
#: ``fallocate(2)`` mode flag: deallocate the range, which then reads as zeros; needs :data:`FALLOC_FL_KEEP_SIZE`.
FALLOC_FL_PUNCH_HOLE = 0x02
#: ``fallocate(2)`` mode flag: make the range read as zeros, allocated (Linux ``FALLOC_FL_ZERO_RANGE``).
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


def data_extents(fd: int, offset: int, length: int) -> list[tuple[int, int]]:
    """The data extents of file ``fd`` within ``offset .. offset + length``
    (``SEEK_DATA`` / ``SEEK_HOLE``), as (offset, length) in ascending order."""
    out: list[tuple[int, int]] = []
    end = offset + length
    pos = offset
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if start >= end:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        out.append((start, stop - start))
        pos = stop
    return out


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset + length)`` of a file; it reads back as zeros.

    :raises OSError: the file system cannot punch holes.
    """
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def check_size(size: int, what: str = "size") -> int:
    """``size`` if it is a positive multiple of :data:`SIZE_ALIGN`.

    :raises ConfigError: otherwise.
    """
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
    names = {spelling for f in attrs.fields(cls)
             for spelling in (f.name, f.metadata.get("key", f.name), *f.metadata.get("aliases", ()))}
    mine = {k: options.pop(k) for k in list(options) if k in names}
    return structure_config(cls, mine, what=what)


def size_field(*, required: bool) -> Any:
    """An attrs field for a backend's ``size`` option (checked by :func:`check_size`).

    :param required: no default (else ``None``: taken from the image).
    """
    def check(inst: Any, attr: attrs.Attribute[Size | None], value: Size | None) -> None:
        if value is not None:
            check_size(value)

    kw: dict[str, Any] = {"validator": check, "metadata": {"help": "bytes, a multiple of 4096"}}
    if not required:
        kw["default"] = None
    return attrs.field(**kw)


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

    Optional: ``inheritable_fds()`` (see :meth:`BaseBackend.inheritable_fds`), the
    descriptors a handover's new process takes instead of opening paths;
    ``allocated_ranges()`` and ``holes`` (see :attr:`BaseBackend.holes`): where the
    data is, for Get LBA Status and the Deallocated or Unwritten Logical Block error;
    ``queue_depth``: the commands the backend can usefully have in flight at once (its
    blocking calls wait on a network, not a CPU), the I/O command set then keeps at least
    that many worker threads (up to ``pcidev_nvme.io.MAX_WORKERS``).
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

    Subclasses implement :meth:`Backend.readv` and :meth:`Backend.writev` and set ``size``.
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

    def inheritable_fds(self) -> dict[str, int]:
        """The descriptors a handover's new process should take instead of opening
        its own, by :func:`pcidev.inheritance.take_inherited` key (borrowed; see
        :mod:`pcidev.inheritance`). The default: none (a backend holding nothing opened
        by path). Optional: a backend without this method passes nothing."""
        return {}

    #: :meth:`allocated_ranges` tells the backend's holes (never written or deallocated) from
    #: its data: the namespace then advertises NSFEAT.DAE and the Deallocated or Unwritten
    #: Logical Block error (``pcidev_nvme.lba_status``). False: every byte counts as written.
    holes = False

    #: :meth:`readv_nowait` / :meth:`writev_nowait` may move data (the I/O command set
    #: tries them on the submitting thread before handing a command to its workers)
    nowait = False

    def readv_nowait(self, views: list[memoryview], offset: int) -> int:
        """Read what can be read without blocking (page-cache hits), from ``offset`` on.

        :param views: the destination buffers, filled in order.
        :param offset: byte offset in the backend.
        :returns: the bytes read (0 if it would block or is not supported); the I/O
            command set hands the rest to a worker thread, which uses :meth:`Backend.readv`.
        """
        return 0

    def writev_nowait(self, views: list[memoryview], offset: int) -> int:
        """Write what can be written without blocking (never for a durable write: FUA
        writes always go through :meth:`Backend.writev`).

        :param views: the source buffers, in order.
        :param offset: byte offset in the backend.
        :returns: the bytes written (0 if it would block or is not supported).
        """
        return 0

    def flush(self) -> None:
        """Nothing to do for volatile or write-through backends."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write zeros with :meth:`Backend.writev` in chunks of up to 1 MiB."""
        while length:
            n = min(length, len(ZEROS))
            self.writev([ZEROS_MV[:n]], offset)
            offset += n
            length -= n

    def deallocate(self, offset: int, length: int) -> None:
        """Default: zero the range (it reads as zeros, as the namespace promises)."""
        self.write_zeroes(offset, length)

    def allocated_bytes(self) -> int:
        """Default: everything is allocated."""
        return self.size

    def allocated_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The parts of ``offset .. offset + length`` that hold data, as (offset, length)
        in ascending order (holes -- never written or deallocated -- left out). Optional in
        the :class:`Backend` protocol (Get LBA Status); the default: all of it."""
        return [(offset, length)] if length > 0 else []

    def close(self) -> None:
        """Nothing to release."""

    def describe(self) -> str:
        """One line for logs."""
        return f"{self.kind} backend, {self.size} bytes"


#: 1 MiB of zeros, the source of zero-filling writes (shared, immutable).
ZEROS = bytes(1 << 20)
#: A :class:`memoryview` of :data:`ZEROS`, sliced to write zeros without copying.
ZEROS_MV = memoryview(ZEROS)


def zero_views(views: Iterable[memoryview]) -> None:
    """Fill every view with zeros."""
    for v in views:
        n = len(v)
        pos = 0
        while pos < n:
            k = min(n - pos, len(ZEROS))
            v[pos : pos + k] = ZEROS_MV[:k]
            pos += k


def _views_after(views: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``views`` once their first ``n`` bytes (fewer than they hold)
    are transferred: a short ``preadv``/``pwritev``."""
    i = 0
    while n >= len(views[i]):
        n -= len(views[i])
        i += 1
    return [views[i][n:], *views[i + 1 :]]


def full_preadv(fd: int, views: list[memoryview], offset: int) -> None:
    """``preadv`` until every view is full; bytes past end of file read as zeros."""
    if len(views) == 1:
        v = views[0]
        n = os.preadv(fd, views, offset)
        if n == len(v):
            return
        views = [v[n:]] if n else views
        offset += n
        if n == 0:
            zero_views(views)
            return
    while views:
        batch = views[:_IOV_MAX]
        want = sum(len(v) for v in batch)
        n = os.preadv(fd, batch, offset)
        if n == 0:
            zero_views(views)  # past the end of the file
            return
        offset += n
        views = views[len(batch) :] if n == want else _views_after(views, n)


def full_pwritev(fd: int, views: list[memoryview], offset: int, flags: int = 0) -> None:
    """``pwritev`` until every view is written."""
    while views:
        batch = views[:_IOV_MAX]
        want = sum(len(v) for v in batch)
        n = os.pwritev(fd, batch, offset, flags) if flags else os.pwritev(fd, batch, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        views = views[len(batch) :] if n == want else _views_after(views, n)
