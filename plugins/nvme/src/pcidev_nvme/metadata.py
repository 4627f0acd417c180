"""Where a namespace's per-block metadata lives, apart from its data.

A namespace formatted with metadata (an LBA format with MS > 0) keeps ``ms`` bytes
per logical block here, never in the data backend, so every data backend keeps its
layout and an image stays a plain image:

``mem`` namespaces (:class:`MemMetadata`)
    a second memfd (``pcidev-nvme-meta``). It migrates like the data: its descriptor
    travels as an :class:`~pcidev.vmstate.FdRef` (:class:`MetadataState`).
``file`` namespaces (:class:`FileMetadata`)
    a sidecar file ``IMAGE.nvme-meta`` beside the image: a 4 KiB header (magic,
    metadata size, block count, the whole per-block PI layout) then the metadata, sparse
    (a deallocation punches a hole; a sidecar shorter than its header says reads as
    holes past its end). Images on block devices have no sidecar (it would land in
    ``/dev``): LBA formats with metadata are not usable there. It is created
    when first needed and never written over unless it carries pcidev's header (a
    foreign file of that name is refused: :class:`~pcidev.errors.ConfigError`);
    formatting to an LBA format without metadata removes it. A sidecar of another
    format (a spec naming another ``lbaf`` than the last Format NVM) is left alone until
    the first write, which starts it afresh: a migration's destination, built from its
    configuration while the source still uses the file, takes the source's format at
    the restore and so never rewrites it. A destination process
    opens the same path; a handover's new process takes the old one's descriptor
    (:meth:`FileMetadata.inheritable_fds`, :mod:`pcidev.inheritance`).
``null`` namespaces (:class:`NullMetadata`)
    nothing is kept: metadata reads as never written.

Protection information is kept **complemented** (XOR with the format's
:attr:`~pcidev_nvme.protection.PiFormat.store_pattern`), so a hole -- a block never
written, deallocated or written with zeroes without PRACT -- reads as PI of all ones:
the escape values (and Guard FFFFh, DLFEAT bit 4 cleared) the spec gives deallocated
blocks. Other metadata bytes read as zeros there (DLFEAT 001b).

Other backends (plugins) have no metadata store: LBA formats with metadata are not
usable on them (:func:`open_metadata` returns None).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import struct
import threading
from typing import Any

import attrs

from pcidev.errors import ConfigError
from pcidev.inheritance import image_key, take_inherited
from pcidev.memory_source import DirtyBitmap
from pcidev.vmstate import U8, Bool, FdRef, vmstate
from pcidev_nvme.backends import punch_hole
from pcidev_nvme.backends.durability import Durability

__all__ = [
    "FileMetadata",
    "MemMetadata",
    "MetadataState",
    "MetadataStore",
    "NullMetadata",
    "SIDECAR_SUFFIX",
    "metadata_supported",
    "open_metadata",
]

log = logging.getLogger(__name__)

#: the sidecar of image ``X`` is ``X`` + this
SIDECAR_SUFFIX = ".nvme-meta"

_HEADER_SIZE = 4096
_MAGIC = b"pcidev-nvme-meta"
#: magic, version, ms, nlbas, PI store pattern (first 16 bytes: version 1), whole pattern (version 2)
_HEADER = struct.Struct("<16sIIQ16s64s")
_HEADER_V1 = struct.Struct("<16sIIQ16s")
_VERSION = 2
#: bytes zeroed per write where a hole cannot be punched
_ZERO_CHUNK = 1 << 20


def _zero_fd(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset + length)`` of ``fd`` read as zeros: a punched hole (no
    allocation, any size), else writes of zeros a chunk at a time."""
    try:
        punch_hole(fd, offset, length)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    zeros = bytes(min(length, _ZERO_CHUNK))
    end = offset + length
    pos = offset
    while pos < end:
        pos += os.pwrite(fd, zeros[:min(len(zeros), end - pos)], pos)


def _header_pattern(pattern: bytes | None) -> bytes:
    return (pattern or b"").ljust(64, b"\0")


@vmstate("nvme/namespace-metadata")
@attrs.frozen
class MetadataState:
    """A namespace's metadata setting (beyond its LBA format) and, for ``mem``, the
    memory holding the metadata.

    :ivar pi: PI type (0 none, 1..3).
    :ivar pil: the PI sits in the first bytes of the metadata.
    :ivar mset: extended LBAs (metadata interleaved with the data).
    :ivar mem_fd: the metadata memfd of a ``mem`` namespace.
    """

    pi: U8
    pil: Bool
    mset: Bool
    mem_fd: FdRef | None = None


def _xor(buf: bytes | bytearray | memoryview, pattern: bytes | None, n: int) -> bytes | bytearray | memoryview:
    """``buf`` with ``pattern`` (one block's) XORed into each of its ``n`` blocks."""
    if pattern is None or not n:
        return buf
    length = len(pattern) * n
    return (int.from_bytes(buf, "little") ^ int.from_bytes(pattern * n, "little")).to_bytes(length, "little")


class MetadataStore:
    """``nlbas`` blocks of ``ms`` metadata bytes (base class).

    :param ms: metadata bytes per block.
    :param nlbas: blocks.
    :param pattern: one block's PI mask (the PI is stored complemented), None without PI.
    """

    kind = "none"

    def __init__(self, ms: int, nlbas: int, pattern: bytes | None) -> None:
        self.ms = ms
        self.nlbas = nlbas
        self.nbytes = ms * nlbas
        self.pattern = pattern

    def read(self, lba: int, n: int) -> bytearray:
        """The metadata of blocks ``lba .. lba + n - 1``."""
        raw = self._read(lba * self.ms, n * self.ms)
        out = _xor(raw, self.pattern, n)
        return out if type(out) is bytearray else bytearray(out)

    def write(self, lba: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        """Store the metadata of ``len(data) // ms`` blocks from ``lba``."""
        n = len(data) // self.ms
        self._write(lba * self.ms, _xor(data, self.pattern, n), fua)

    def deallocate(self, lba: int, n: int) -> None:
        """Forget the metadata of ``n`` blocks (it reads as never written)."""
        if n:
            self._zero(lba * self.ms, n * self.ms)

    def _read(self, offset: int, length: int) -> bytes | bytearray:
        return bytes(length)

    def _write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        pass

    def _zero(self, offset: int, length: int) -> None:
        pass

    def flush(self) -> None:
        """Make the written metadata durable."""

    def close(self) -> None:
        """Release the store (its contents stay where they are). Idempotent."""

    def remove(self) -> None:
        """Close and drop the contents for good (a format to an LBA format without
        metadata)."""
        self.close()

    def discard(self) -> None:
        """Close a store that was never used (opened for a migration's load that failed):
        only what it created itself is dropped (:meth:`FileMetadata.discard`)."""
        self.close()

    def inheritable_fds(self) -> dict[str, int]:
        """Descriptors a handover's new process takes over (see :mod:`pcidev.inheritance`)."""
        return {}

    @property
    def mem_fd(self) -> int:
        """The memfd of a memory store (-1 otherwise)."""
        return -1


class NullMetadata(MetadataStore):
    """A ``null`` namespace's metadata: nothing is kept."""

    kind = "null"


class MemMetadata(MetadataStore):
    """Metadata in a memfd (a ``mem`` namespace).

    :param fd: an existing memfd of the right size (a migrated namespace's; duplicated),
        or None for a new one.
    :raises ConfigError: no memory, or ``fd`` is not a file of the right size.
    """

    kind = "mem"

    def __init__(self, ms: int, nlbas: int, pattern: bytes | None, *, fd: int | None = None) -> None:
        super().__init__(ms, nlbas, pattern)
        size = self.nbytes
        try:
            if fd is None:
                self._fd = os.memfd_create("pcidev-nvme-meta", os.MFD_CLOEXEC)
                os.ftruncate(self._fd, size)
            else:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                    raise ConfigError(f"namespace metadata descriptor is not a {size}-byte memory file "
                                      f"({st.st_size} bytes)")
                self._fd = os.dup(fd)
                os.set_inheritable(self._fd, False)
        except OSError as exc:
            raise ConfigError(f"cannot allocate {size} bytes of namespace metadata: {exc}") from exc
        try:
            self._mm = mmap.mmap(self._fd, size, mmap.MAP_SHARED)
        except OSError as exc:
            os.close(self._fd)
            raise ConfigError(f"cannot map the namespace metadata: {exc}") from exc
        self._mv = memoryview(self._mm)
        self._lock = threading.Lock()
        self._closed = False
        #: the writes since a migration started tracking them (marked after each write)
        self.dirty = DirtyBitmap(max(size, 1), 4096)  # a page: 512 blocks of 8 bytes

    @property
    def mem_fd(self) -> int:
        return self._fd

    def _read(self, offset: int, length: int) -> bytes | bytearray:
        return bytearray(self._mv[offset:offset + length])

    def _write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        self._mv[offset:offset + len(data)] = data
        self.dirty.mark(offset, len(data))

    def _zero(self, offset: int, length: int) -> None:
        # a hole in the memfd (pages freed, the mapping reads zeros), never a buffer of
        # ``length`` zeros: a discard of a whole large namespace is one call
        _zero_fd(self._fd, offset, length)
        self.dirty.mark(offset, length)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._mv.release()
            self._mm.close()
            os.close(self._fd)
            self._fd = -1


class FileMetadata(MetadataStore):
    """Metadata in the sidecar file ``IMAGE.nvme-meta``.

    :param image: the image's path (absolute).
    :param read_only: the image is read-only: the sidecar must exist and is not written.
    :param erase: start from empty metadata (Format NVM) instead of keeping what the
        sidecar holds.
    :param fd: the sidecar already open (owned from now on): a namespace changing format
        keeps the file it has (in a handover's new process, the inherited one) rather
        than opening the path again.
    :raises ConfigError: the sidecar cannot be created or opened, a file of that name is
        not pcidev's, or (read-only) it is missing or describes another format.
    """

    kind = "file"

    def __init__(self, ms: int, nlbas: int, pattern: bytes | None, *, image: str, read_only: bool = False,
                 erase: bool = False, fd: int | None = None) -> None:
        super().__init__(ms, nlbas, pattern)
        self.path = image + SIDECAR_SUFFIX
        self.read_only = read_only
        self._fd = -1
        #: this store created the sidecar (it did not exist): :meth:`discard` may unlink it
        self.created = False
        #: the sidecar describes another format: read as empty, rewritten at the first write
        self._stale = False
        self._stale_lock = threading.Lock()
        #: the writes and fdatasync calls (a migration's stop skips a clean sidecar), and a
        #: write-back error the stop met, kept for the host's next Flush
        self.durability = Durability()
        if fd is None:
            fd = take_inherited(image_key(self.path, read_only=read_only))
        if fd is None:
            # O_NONBLOCK: a FIFO of that name must not block the open (it is refused below)
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
            try:
                fd = os.open(self.path, flags)
            except FileNotFoundError:
                if read_only:
                    raise ConfigError(f"{self.path} (the metadata of a read-only image) does not exist") from None
                try:
                    fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                except OSError as exc:
                    raise ConfigError(f"cannot create {self.path}: {exc.strerror}") from exc
                try:
                    self._initialise(fd)
                except OSError as exc:
                    os.close(fd)
                    os.unlink(self.path)
                    raise ConfigError(f"cannot initialise {self.path}: {exc.strerror}") from exc
                self._fd = fd
                self.created = True
                return
            except OSError as exc:
                raise ConfigError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{self.path} exists and is not a regular file: not using it for metadata")
            header = os.pread(fd, _HEADER.size, 0)
            if len(header) < _HEADER_V1.size or not header.startswith(_MAGIC):
                raise ConfigError(f"{self.path} exists and is not a pcidev metadata file: not overwriting it")
            if erase:
                self._initialise(fd)
            elif not self._same_format(header):
                h_ms, h_nlbas = _HEADER_V1.unpack_from(header)[2:4]
                if read_only:
                    raise ConfigError(f"{self.path} holds metadata of another LBA format (read-only image)")
                # Not rewritten now: a migration's destination is built from its configuration
                # while the source still uses the sidecar (its restore then asks for the format
                # the header has). The first write starts it afresh; until then it reads empty.
                log.warning("%s holds metadata of another format (%d bytes x %d blocks): it starts "
                            "empty at the first write", self.path, h_ms, h_nlbas)
                self._stale = True
            os.set_blocking(fd, True)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from exc
        except ConfigError:
            os.close(fd)
            raise
        self._fd = fd

    def _same_format(self, header: bytes) -> bool:
        """Whether ``header`` describes this store's geometry and PI layout. A version-1
        header kept only the first 16 bytes of the PI layout: it matches only when the
        metadata is no larger (larger metadata may hide the PI past them)."""
        _magic, version, h_ms, h_nlbas, h_pattern16 = _HEADER_V1.unpack_from(header)
        if (h_ms, h_nlbas) != (self.ms, self.nlbas):
            return False
        full = _header_pattern(self.pattern)
        if version == 1:
            return self.ms <= 16 and h_pattern16 == full[:16]
        return version == _VERSION and len(header) >= _HEADER.size and _HEADER.unpack(header)[5] == full

    def _initialise(self, fd: int) -> None:
        """Empty metadata of this geometry: header, then a hole of ``nbytes``."""
        os.ftruncate(fd, 0)
        os.ftruncate(fd, _HEADER_SIZE + self.nbytes)
        full = _header_pattern(self.pattern)
        os.pwrite(fd, _HEADER.pack(_MAGIC, _VERSION, self.ms, self.nlbas, full[:16], full), 0)
        os.fsync(fd)

    def _fresh(self) -> None:
        """Start a stale sidecar afresh (header of this format, empty metadata)."""
        with self._stale_lock:
            if self._stale:
                self._initialise(self._fd)
                self._stale = False

    def _read(self, offset: int, length: int) -> bytes | bytearray:
        buf = bytearray(length)
        if self._stale:
            return buf
        mv = memoryview(buf)
        pos = 0
        while pos < length:
            got = os.preadv(self._fd, [mv[pos:]], _HEADER_SIZE + offset + pos)
            if got <= 0:
                break  # past the end of a truncated sidecar: holes (the rest stays zeros)
            pos += got
        mv.release()
        return buf

    def _write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "the image is read-only")
        if self._stale:
            self._fresh()
        flags = os.RWF_DSYNC if fua else 0
        mv = memoryview(data)
        pos = 0
        try:
            while pos < len(mv):
                pos += os.pwritev(self._fd, [mv[pos:]], _HEADER_SIZE + offset + pos, flags)
        finally:
            mv.release()
            if not fua:
                self.durability.wrote()

    def _zero(self, offset: int, length: int) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "the image is read-only")
        if self._stale:
            self._fresh()
        try:
            _zero_fd(self._fd, _HEADER_SIZE + offset, length)
        finally:
            self.durability.wrote()

    @property
    def unflushed(self) -> bool:
        """Written since the last ``fdatasync`` that returned successfully began, or a
        write-back error is pending (as :attr:`pcidev_nvme.backends.FileBackend.unflushed`)."""
        return self.durability.unflushed

    @property
    def syncing(self) -> bool:
        """An ``fdatasync`` of the sidecar began and has not returned."""
        return self.durability.syncing

    def wait_synced(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no ``fdatasync`` of the sidecar is in
        progress; False if one still is."""
        return self.durability.wait_idle(timeout)

    def flush(self) -> None:
        """The host's Flush: a write-back error a migration's stop met is reported once,
        else ``fdatasync``.

        :raises OSError: that error, or the system call's.
        """
        self.durability.flush(self._fd)

    def flush_at_stop(self) -> None:
        """A migration's stop: ``fdatasync`` if :attr:`unflushed`; a write-back error it
        meets stays pending for the host's next :meth:`flush`.

        :raises OSError: the error, or one the host has not been told yet.
        """
        self.durability.flush_at_stop(self._fd)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def remove(self) -> None:
        """Close and unlink the sidecar -- if the path still names the file this store
        has open (after a rename or replacement of it, nothing is unlinked)."""
        fd = self._fd
        try:
            same = fd >= 0 and os.path.samestat(os.fstat(fd), os.stat(self.path))
        except OSError:
            same = False
        self.close()
        if same:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def discard(self) -> None:
        """Close a store that was never used (a migration's check prepared it, then the
        load failed): the sidecar is unlinked only if this store created it -- a file the
        process found there (the source's metadata) is never deleted."""
        if self.created:
            self.remove()
        else:
            self.close()

    @property
    def is_open(self) -> bool:
        """The sidecar is open (not closed yet)."""
        return self._fd >= 0

    def reopen(self, ms: int, nlbas: int, pattern: bytes | None, *, erase: bool) -> FileMetadata:
        """The same sidecar file (this store's descriptor, not the path) for another format."""
        return FileMetadata(ms, nlbas, pattern, image=self.path[:-len(SIDECAR_SUFFIX)], read_only=self.read_only,
                            erase=erase, fd=os.dup(self._fd))

    def inheritable_fds(self) -> dict[str, int]:
        return {image_key(self.path, read_only=self.read_only): self._fd} if self._fd >= 0 else {}


def _on_block_device(backend: Any) -> bool:
    try:
        return stat.S_ISBLK(os.stat(str(backend.path)).st_mode)
    except (OSError, AttributeError):
        return False


def metadata_supported(backend: Any) -> bool:
    """Whether ``backend`` can have a metadata store (``mem``, ``file`` on a regular
    image -- not a block device, whose sidecar would land in ``/dev`` --, ``null``)."""
    kind = getattr(backend, "kind", None)
    if kind == "file":
        return not _on_block_device(backend)
    return kind in ("mem", "null")


def open_metadata(backend: Any, ms: int, nlbas: int, pattern: bytes | None, *, erase: bool,
                  mem_fd: int | None = None, current: MetadataStore | None = None) -> MetadataStore | None:
    """The metadata store for a namespace over ``backend``.

    :param backend: the namespace's data backend (its kind picks the store).
    :param ms: metadata bytes per block (> 0).
    :param nlbas: blocks.
    :param pattern: the PI store pattern, None without PI.
    :param erase: start empty (Format NVM) rather than keep a sidecar's contents.
    :param mem_fd: for ``mem``: a migrated metadata memfd to map instead of a new one.
    :param current: the namespace's store so far: a ``file`` namespace keeps its sidecar's
        descriptor (:meth:`FileMetadata.reopen`).
    :returns: the store, or None when the backend has none (plugin backends).
    :raises ConfigError: the store cannot be made.
    """
    kind = getattr(backend, "kind", None)
    if kind == "mem":
        return MemMetadata(ms, nlbas, pattern, fd=mem_fd)
    if kind == "file":
        if _on_block_device(backend):
            return None
        if isinstance(current, FileMetadata) and current.is_open:
            return current.reopen(ms, nlbas, pattern, erase=erase)
        return FileMetadata(ms, nlbas, pattern, image=str(backend.path),
                            read_only=bool(getattr(backend, "read_only", False)), erase=erase)
    if kind == "null":
        return NullMetadata(ms, nlbas, pattern)
    return None
