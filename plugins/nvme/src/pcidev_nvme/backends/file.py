"""The ``file`` backend: a raw image file, sparse allowed (``file:path=/x.img,size=1G``).

Created sparse when missing; deallocation punches holes
(``fallocate(PUNCH_HOLE | KEEP_SIZE)``); Flush and FUA writes reach stable
storage (``fdatasync`` / ``RWF_DSYNC``) before they complete. ``direct=on``
opens it with ``O_DIRECT``: block sizes below the file system's direct-I/O
alignment are refused, and guest buffers that are not aligned go through an
aligned bounce buffer. ``readonly=on`` refuses writes. A migration's stop flushes with
:meth:`FileBackend.flush_at_stop`, which costs nothing when nothing was written since the
last ``fdatasync`` (:attr:`FileBackend.unflushed`). File I/O may block, so
the I/O command set first tries it without blocking on the submitting thread
(``RWF_NOWAIT``: page-cache hits, and buffered writes that need no allocation;
never a FUA write) and hands what is left to its worker threads.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
from typing import Any

import attrs

from pcidev.errors import ConfigError
from pcidev.images import create_image
from pcidev.inheritance import image_key, take_inherited
from pcidev.properties import Size
from pcidev_nvme.backends.base import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_ZERO_RANGE,
    BaseBackend,
    check_size,
    data_extents,
    fallocate,
    full_preadv,
    full_pwritev,
    punch_hole,
    size_field,
    take_options,
)
from pcidev_nvme.backends.durability import Durability

__all__ = ["FileBackend", "FileConfig", "make_file"]

#: ``RWF_NOWAIT`` (0 where :mod:`os` does not have it: no inline attempt)
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)

_IOV_MAX = max(os.sysconf("SC_IOV_MAX"), 16) if hasattr(os, "sysconf") else 1024


@attrs.define(kw_only=True)
class FileConfig:
    """Options of the ``file`` backend."""

    path: str = attrs.field(metadata={"help": "the image file (created sparse when missing)"})
    size: Size | None = size_field(required=False)
    direct: bool = attrs.field(default=False, metadata={"help": "open with O_DIRECT"})
    readonly: bool = attrs.field(default=False, metadata={"help": "refuse writes"})
    nofollow: bool = attrs.field(default=False, metadata={
        "help": "refuse an existing image that is a symbolic link (O_NOFOLLOW)"})


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
    :param nofollow: open an existing image with ``O_NOFOLLOW`` (a symbolic link is refused:
        a migration reopening the image of a created namespace).
    :raises ConfigError: the file cannot be opened or created, sizes disagree, the
        size is not a multiple of 4096, or the file system refuses ``O_DIRECT``.
    """

    kind = "file"
    #: ``SEEK_DATA`` / ``SEEK_HOLE`` tell the holes (at the file system's block granularity)
    holes = True
    inline = False

    def __init__(
        self, path: str, size: int | None = None, *, direct: bool = False, read_only: bool = False,
        nofollow: bool = False,
    ) -> None:
        self.path = os.path.abspath(path)
        self.read_only = read_only
        self.direct = direct
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
        # a handover's new process takes the old one's descriptor: the path may name
        # another file by now (renamed, unlinked, replaced), the guest's disk is this one
        inherited = take_inherited(image_key(self.path, read_only=read_only))
        exists = inherited is not None or (os.path.lexists if nofollow else os.path.exists)(self.path)
        created: int | None = None
        if inherited is not None:
            fd = inherited
        elif not exists:
            if read_only:
                raise ConfigError(f"image {self.path} does not exist (and readonly=on)")
            if size is None:
                raise ConfigError(f"image {self.path} does not exist: give size=... to create it")
            check_size(size, f"size of {self.path}")
            created = create_image(self.path, size)  # None: another process made it meanwhile
            exists = created is None
        if inherited is not None:
            pass
        elif exists:
            try:
                fd = os.open(self.path, flags)
            except OSError as exc:
                raise ConfigError(f"cannot open image {self.path}: {exc.strerror}") from exc
        else:
            assert created is not None
            fd = created  # read-write (readonly=on needs an existing image), sparse, sized
        try:
            if exists:
                st = os.fstat(fd)
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                    raise ConfigError(f"{self.path} is neither a regular file nor a block device")
                actual = os.lseek(fd, 0, os.SEEK_END)  # block devices have no st_size
                if size is None:
                    size = actual
                elif size != actual:
                    raise ConfigError(
                        f"image {self.path} has {actual} bytes, not the size={size} given"
                    )
            assert size is not None
            check_size(size, f"size of {self.path}")
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot size image {self.path}: {exc.strerror}") from exc
        except ConfigError:
            os.close(fd)
            if not exists:
                os.unlink(self.path)
            raise
        super().__init__(size)
        self.fd = fd
        self.dfd = -1
        #: the writes and fdatasync calls: clean only once an fdatasync that began after
        #: the last write returned (unflushed at first: what another process wrote -- a
        #: handover's old one, whose descriptor this may be; an earlier run -- may still be
        #: in the page cache only); a write-back error the stop's flush met, kept for the host
        self.durability = Durability()
        self.min_block = 512
        self._bounce_lock = threading.Lock()
        self.identity_path = self.path + ".nvme-ids"
        #: try RWF_NOWAIT I/O on the submitting thread first (buffered images only)
        self.nowait = _RWF_NOWAIT != 0 and not direct
        #: writes too (cleared when the file system refuses RWF_NOWAIT writes)
        self._nowait_writes = self.nowait
        if direct:
            try:
                dfd = take_inherited(image_key(self.path, read_only=read_only, direct=True))
                if dfd is None and inherited is not None:  # never mix the inherited file and the path
                    raise ConfigError(f"the old process passed {self.path} without its O_DIRECT descriptor")
                self.dfd = dfd if dfd is not None else os.open(self.path, flags | os.O_DIRECT)
            except OSError as exc:
                os.close(fd)
                raise ConfigError(f"cannot open {self.path} with O_DIRECT: {exc.strerror}") from exc
            except ConfigError:
                os.close(fd)
                raise
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
                    full_preadv(self.dfd, views, offset)
                    return
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
            self._bounce_read(views, offset)
            return
        full_preadv(self.fd, views, offset)

    def writev(self, views: list[memoryview], offset: int, *, fua: bool = False) -> None:
        """``pwritev`` the views; with ``fua`` using ``RWF_DSYNC`` (durable on return)."""
        if self.read_only:
            raise OSError(errno.EROFS, "the image is read-only")
        flags = os.RWF_DSYNC if fua else 0
        try:
            if self.dfd >= 0:
                if self._aligned(views):
                    try:
                        full_pwritev(self.dfd, views, offset, flags)
                        return
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
                self._bounce_write(views, offset, flags)
                return
            full_pwritev(self.fd, views, offset, flags)
        finally:
            if not fua:  # (RWF_DSYNC: durable already; a failed write may have written a part)
                self.durability.wrote()

    def readv_nowait(self, views: list[memoryview], offset: int) -> int:
        """``preadv(..., RWF_NOWAIT)``: what the page cache holds, without blocking
        (buffered images only; 0 with ``O_DIRECT``, or when it would block)."""
        if not self.nowait or len(views) > _IOV_MAX:
            return 0
        try:
            return os.preadv(self.fd, views, offset, _RWF_NOWAIT)
        except OSError as exc:
            return self._nowait_refused(exc)

    def writev_nowait(self, views: list[memoryview], offset: int) -> int:
        """``pwritev(..., RWF_NOWAIT)`` of a non-durable write (buffered images only; 0
        when read-only, with ``O_DIRECT``, or when it would block)."""
        if not self._nowait_writes or self.read_only or len(views) > _IOV_MAX:
            return 0
        try:
            n = os.pwritev(self.fd, views, offset, _RWF_NOWAIT)
            self.durability.wrote()
            return n
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                self._nowait_writes = False  # (ext4 has no buffered RWF_NOWAIT writes)
            return 0  # (EAGAIN, EINVAL, or a real error the worker meets again and reports)

    def _nowait_refused(self, exc: OSError) -> int:
        """0 for "would block" and "not here" (the worker does the I/O, and reports a
        real error); a file system without RWF_NOWAIT reads is not asked again."""
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            self.nowait = False
        return 0  # (EAGAIN, EINVAL, or a real error the worker meets again and reports)

    def _bounce_read(self, views: list[memoryview], offset: int) -> None:
        total = sum(len(v) for v in views)
        buf = mmap.mmap(-1, max(total, 1))
        try:
            with memoryview(buf) as mv:
                full_preadv(self.dfd, [mv[:total]], offset)
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
                full_pwritev(self.dfd, [mv[:total]], offset, flags)
        finally:
            buf.close()

    @property
    def unflushed(self) -> bool:
        """Written since the last ``fdatasync`` that returned successfully began (none
        returned since the image was opened, or one is still blocked), or a write-back
        error is pending: a flush has work to do (:class:`~pcidev_nvme.backends.durability.Durability`).
        Optional in the :class:`~pcidev_nvme.backends.base.Backend` protocol (a
        migration's stop skips the backends that say False)."""
        return self.durability.unflushed

    @property
    def syncing(self) -> bool:
        """An ``fdatasync`` of the image began and has not returned (a migration's stop
        waits for it rather than queueing another one). Optional, like :attr:`unflushed`."""
        return self.durability.syncing

    def wait_synced(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no ``fdatasync`` of the image is in
        progress; False if one still is. Optional, like :attr:`syncing`."""
        return self.durability.wait_idle(timeout)

    def flush(self) -> None:
        """``fdatasync``: every completed write reaches stable storage (the host's Flush:
        always the system call, the file system's own write-back errors included).

        :raises OSError: the file system reported a write-back error -- also one that a
            migration's stop met first (:meth:`flush_at_stop`), reported here once.
        """
        self.durability.flush(self.fd)

    def flush_at_stop(self) -> None:
        """The flush of a migration's stop (after the drain): ``fdatasync`` only if
        :attr:`unflushed`; a write-back error it meets stays pending for the host's next
        Flush. Linux reports such an error once per open file, to the first ``fdatasync``
        after it: taken here, the host would never learn that acknowledged writes may be
        lost. Optional in the :class:`~pcidev_nvme.backends.base.Backend` protocol.

        :raises OSError: the error (the migration fails, the device runs on here), or one
            met earlier that the host has not been told about yet (the device must not move
            before its host learns it).
        """
        self.durability.flush_at_stop(self.fd)

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
        finally:
            self.durability.wrote()

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
        finally:
            self.durability.wrote()

    def allocated_bytes(self) -> int:
        """Bytes of the file that hold data (``st_blocks``; holes do not count)."""
        return min(self.size, os.fstat(self.fd).st_blocks * 512)

    def allocated_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The file's data extents in the range (``SEEK_DATA`` / ``SEEK_HOLE``)."""
        return data_extents(self.fd, offset, length)

    def close(self) -> None:
        """Close the file. Idempotent."""
        for attr in ("dfd", "fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)

    def inheritable_fds(self) -> dict[str, int]:
        """The image's descriptors, for a handover's new process (:mod:`pcidev.inheritance`)."""
        if self.fd < 0:  # closed (a namespace being deleted)
            return {}
        out = {image_key(self.path, read_only=self.read_only): self.fd}
        if self.dfd >= 0:
            out[image_key(self.path, read_only=self.read_only, direct=True)] = self.dfd
        return out

    def describe(self) -> str:
        """One line for logs."""
        mode = ", O_DIRECT" if self.dfd >= 0 else ""
        ro = ", read-only" if self.read_only else ""
        return f"file {self.path}, {self.size} bytes{mode}{ro}"


def make_file(options: dict[str, Any]) -> FileBackend:
    """The ``file`` factory: takes ``path``, ``size``, ``direct`` and ``readonly`` from ``options``."""
    if not options.get("path"):
        raise ConfigError("the file backend needs path=...")
    cfg = take_options(FileConfig, options, what="file backend")
    return FileBackend(cfg.path, cfg.size, direct=cfg.direct, read_only=cfg.readonly, nofollow=cfg.nofollow)
