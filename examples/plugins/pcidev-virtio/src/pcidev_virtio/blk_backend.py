"""Where a virtio-blk disk's bytes live: a file (``file=PATH``) or volatile memory.

A backend is a flat array of ``size`` bytes with vectored reads and writes
straight between it and guest-memory views (``os.preadv`` / ``os.pwritev``: no
copy in Python), plus flush, discard (deallocate) and zeroing.

:class:`FileBackend`
    A raw image file or block device. A missing file is created sparse with
    ``size`` bytes, atomically (made under a hidden name and linked into place, so
    processes started together, as in a migration, all open the same complete
    file); an existing file is never truncated, resized or overwritten by opening
    it: when ``size`` is given it must equal the file's size. ``read_only`` opens it
    read-only (the device offers ``VIRTIO_BLK_F_RO``) and every write is refused. In
    a handover's new process the old one's descriptor is taken instead of the path
    (:mod:`pcidev.inheritance`).
:class:`MemoryBackend`
    A memfd of ``size`` bytes (tests, scratch disks). Its descriptor can travel
    with a migration stream, so a memory disk follows the device to another
    process.

Both discard by punching holes (``fallocate(PUNCH_HOLE | KEEP_SIZE)``): a
discarded range reads back as zeros. Where the file system cannot punch holes, a
discard does nothing (it is advisory) and an unmapping write-zeroes writes zeros.

Errors: constructors raise :class:`~pcidev.errors.ConfigError` (one line);
I/O methods raise :class:`OSError`, which the request engine turns into
``VIRTIO_BLK_S_IOERR``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat

from pcidev.errors import ConfigError
from pcidev.images import create_image
from pcidev.inheritance import image_key, take_inherited

__all__ = [
    "SECTOR_SIZE",
    "BlkBackend",
    "FileBackend",
    "MemoryBackend",
    "full_preadv",
    "full_pwritev",
]

#: virtio-blk addresses the disk in 512-byte sectors whatever its block size.
SECTOR_SIZE = 512

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
if _IOV_MAX <= 0:
    _IOV_MAX = 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_ZEROS = bytes(1 << 20)
_ZEROS_MV = memoryview(_ZEROS)


def _fallocate_mode(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with a mode (:mod:`os` offers only mode 0).

    :raises OSError: the kernel refused (``EOPNOTSUPP``: the file system cannot).
    """
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}): {os.strerror(err)}")


def _views_after(views: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``views`` once their first ``n`` bytes (fewer than they hold) moved."""
    i = 0
    while n >= len(views[i]):
        n -= len(views[i])
        i += 1
    return [views[i][n:], *views[i + 1:]]


def full_preadv(fd: int, views: list[memoryview], offset: int) -> None:
    """``preadv`` until every view is full; bytes past the end of the file read as zeros.

    :param fd: an open file.
    :param views: writable views, filled in order.
    :param offset: the file offset of the first byte.
    :raises OSError: the read failed.
    """
    views = [v for v in views if len(v)]
    while views:
        batch = views[:_IOV_MAX]
        want = sum(len(v) for v in batch)
        n = os.preadv(fd, batch, offset)
        if n == 0:  # past the end of the file
            for v in views:
                _zero(v)
            return
        offset += n
        views = views[len(batch):] if n == want else _views_after(views, n)


def full_pwritev(fd: int, views: list[memoryview], offset: int, flags: int = 0) -> None:
    """``pwritev`` until every view is written.

    :param fd: an open file.
    :param views: the data, in order.
    :param offset: the file offset of the first byte.
    :param flags: ``os.RWF_*`` flags (``RWF_DSYNC``: durable on return).
    :raises OSError: the write failed or wrote nothing.
    """
    views = [v for v in views if len(v)]
    while views:
        batch = views[:_IOV_MAX]
        want = sum(len(v) for v in batch)
        n = os.pwritev(fd, batch, offset, flags)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        views = views[len(batch):] if n == want else _views_after(views, n)


def _zero(view: memoryview) -> None:
    pos, n = 0, len(view)
    while pos < n:
        k = min(n - pos, len(_ZEROS))
        view[pos:pos + k] = _ZEROS_MV[:k]
        pos += k


class BlkBackend:
    """A disk image open as a file descriptor (the base of both backends).

    :param fd: the open descriptor (owned: closed by :meth:`close`).
    :param size: capacity in bytes (a multiple of :data:`SECTOR_SIZE`).
    :param read_only: refuse writes, discards and zeroing.

    :ivar kind: ``"file"`` or ``"mem"``.
    :ivar size: capacity in bytes.
    :ivar read_only: writes are refused.
    """

    kind = "fd"

    def __init__(self, fd: int, size: int, *, read_only: bool = False) -> None:
        self.fd = fd
        self.size = size
        self.read_only = read_only

    def _writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "the disk is read-only")

    def readv(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` (in order) from byte ``offset`` of the disk.

        :raises OSError: the read failed.
        """
        full_preadv(self.fd, views, offset)

    def writev(self, views: list[memoryview], offset: int, *, fua: bool = False) -> None:
        """Store ``views`` (in order) at byte ``offset``.

        :param fua: durable before returning (``RWF_DSYNC``): a write-through cache.
        :raises OSError: the write failed or the disk is read-only.
        """
        self._writable()
        full_pwritev(self.fd, views, offset, os.RWF_DSYNC if fua else 0)

    def flush(self) -> None:
        """Make every completed write durable (``fdatasync``).

        :raises OSError: the flush failed.
        """
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate ``[offset, offset + length)`` where the file system can (holes are
        punched: the range then reads back as zeros). A discard is advisory: where holes
        cannot be punched it does nothing (it never writes zeros, which would allocate a
        sparse image and stall the device on a large range).

        :raises OSError: the disk is read-only or the operation failed.
        """
        self._writable()
        if length > 0:
            self._punch(offset, length)

    def _punch(self, offset: int, length: int) -> bool:
        """Punch a hole; False where the file system cannot."""
        try:
            _fallocate_mode(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return False
        return True

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Set ``[offset, offset + length)`` to zeros.

        :param unmap: the range may be deallocated (a hole punched where the file system
            can); otherwise, or where it cannot, it stays allocated (``FALLOC_FL_ZERO_RANGE``,
            else zeros are written).
        :raises OSError: the disk is read-only or the operation failed.
        """
        self._writable()
        if length <= 0:
            return
        if unmap and self._punch(offset, length):
            return
        try:
            _fallocate_mode(self.fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            self._write_zero_bytes(offset, length)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        while length:
            n = min(length, len(_ZEROS))
            full_pwritev(self.fd, [_ZEROS_MV[:n]], offset)
            offset += n
            length -= n

    def allocated_bytes(self) -> int:
        """Bytes of the image that hold data (holes do not count)."""
        return min(self.size, os.fstat(self.fd).st_blocks * 512)

    def close(self) -> None:
        """Close the descriptor. Idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def abandon(self) -> None:
        """Close, and undo what opening did (the device using it was refused): a file
        backend removes an image it created."""
        self.close()

    def describe(self) -> str:
        """One line for logs."""
        return f"{self.kind} backend, {self.size} bytes{', read-only' if self.read_only else ''}"


def _check_size(size: int, what: str) -> None:
    if size <= 0 or size % SECTOR_SIZE:
        raise ConfigError(f"{what}={size} must be a positive multiple of {SECTOR_SIZE}")


class FileBackend(BlkBackend):
    """A raw image file or block device (see the module docstring for the rules).

    :param path: the image; created sparse with ``size`` bytes when missing.
    :param size: bytes (a multiple of 512); required to create the file, and when
        given for an existing file it must equal the file's size.
    :param read_only: open read-only; writes are refused.
    :raises ConfigError: cannot open or create the file, it is not a regular file or
        block device, the sizes disagree, or the size is not a multiple of 512.
    """

    kind = "file"

    def __init__(self, path: str, size: int | None = None, *, read_only: bool = False) -> None:
        self.path = os.path.abspath(path)
        #: (st_dev, st_ino) of the image when this backend created it, else None
        self.created: tuple[int, int] | None = None
        # a handover's new process takes the old one's image, whatever the path names now
        inherited = take_inherited(image_key(self.path, read_only=read_only))
        if inherited is None and not os.path.exists(self.path):
            if read_only:
                raise ConfigError(f"image {self.path} does not exist (and readonly=on)")
            if size is None:
                raise ConfigError(f"image {self.path} does not exist: give size=... to create it")
            _check_size(size, "size")
            fd = create_image(self.path, size)
            if fd is not None:
                st = os.fstat(fd)
                self.created = (st.st_dev, st.st_ino)
                super().__init__(fd, size, read_only=read_only)
                return
            # another process created it meanwhile (the processes of a migration start
            # together): open theirs, like any existing image
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = inherited if inherited is not None else os.open(self.path, flags)
        except OSError as exc:
            raise ConfigError(f"cannot open image {self.path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ConfigError(f"{self.path} is neither a regular file nor a block device")
            actual = os.lseek(fd, 0, os.SEEK_END)  # a block device has no st_size
            if size is not None and size != actual:
                raise ConfigError(f"image {self.path} has {actual} bytes, not the size={size} given")
            _check_size(actual, f"size of {self.path}")
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot size image {self.path}: {exc.strerror}") from exc
        except ConfigError:
            os.close(fd)
            raise
        super().__init__(fd, actual, read_only=read_only)

    def inheritable_fds(self) -> dict[str, int]:
        """The image's descriptor, for a handover's new process (:mod:`pcidev.inheritance`)."""
        return {image_key(self.path, read_only=self.read_only): self.fd} if self.fd >= 0 else {}

    def abandon(self) -> None:
        """Close; remove the image if this backend created it and it is still that file."""
        self.close()
        if self.created is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.created:
                os.unlink(self.path)
        except OSError:
            pass
        self.created = None

    def describe(self) -> str:
        """One line for logs."""
        return f"file {self.path}, {self.size} bytes{', read-only' if self.read_only else ''}"


class MemoryBackend(BlkBackend):
    """Volatile memory: a memfd of ``size`` bytes (pages are allocated when written).

    :param size: bytes (a multiple of 512).
    :param read_only: refuse writes (a blank read-only disk, for tests).
    :param fd: an existing memfd to use instead of a new one (a migrated disk: the
        source's memory); it is duplicated, the caller keeps its own.
    :raises ConfigError: bad size, no memory, or ``fd`` is not a file of ``size`` bytes.
    """

    kind = "mem"

    def __init__(self, size: int, *, read_only: bool = False, fd: int | None = None) -> None:
        _check_size(size, "size")
        try:
            if fd is None:
                own = os.memfd_create("pcidev-virtio-blk", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(own, size)
                except OSError:
                    os.close(own)
                    raise
            else:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                    raise ConfigError(f"the disk memory descriptor is not a {size}-byte file "
                                      f"(mode {st.st_mode:o}, {st.st_size} bytes)")
                own = os.dup(fd)
                os.set_inheritable(own, False)
        except OSError as exc:
            raise ConfigError(f"cannot allocate {size} bytes of disk memory: {exc.strerror}") from exc
        super().__init__(own, size, read_only=read_only)

    def flush(self) -> None:
        """Nothing to do: volatile memory has no stable storage."""
