"""Memory objects whose contents can stand in for their descriptor, and the dirty
tracking of the writes a device makes into them.

Over a migration channel that carries no file descriptors (TCP), a memfd or file
that a device's vmstate stream names by an :class:`~pcidev.vmstate.FdRef` cannot
travel; its *contents* travel instead, copied while the device runs (pre-copy, see
:mod:`pcidev.migration.precopy`) and the rest at the stop. A device lists those
objects as :class:`MemorySource` (:meth:`pcidev.device.PciDevice.memory_sources`);
each carries either a :class:`DirtyBitmap` that the device marks on every write it
makes (exact) or none (writes it cannot see, such as a client's through a shared
mapping: the pre-copy engine compares per-page hashes instead).

This module is part of the device-model core (:mod:`pcidev.bar` and
:mod:`pcidev.device` use it); the engine that reads the sources lives above, in
:mod:`pcidev.migration.precopy`.
"""

from __future__ import annotations

import mmap

import attrs

from pcidev.errors import ConfigError

__all__ = ["DirtyBitmap", "MemorySource", "ContentDescriptors", "DEFAULT_GRANULE", "ALLOCATION_PAGE", "object_name"]

#: the default tracking granule of a :class:`DirtyBitmap` (64 KiB)
DEFAULT_GRANULE = 65536
_ONE = b"\x01"


class DirtyBitmap:
    """Exact tracking of the writes a device makes itself into one memory object.

    One byte per ``granule`` bytes of the object (a bytearray), so :meth:`mark` is one
    slice store under the GIL: cheap, lock-free, callable from any thread, and a no-op
    while not tracking.

    **The rule for writers**: mark *after* the data is in memory. :meth:`take` clears
    exactly the granules it returns, and its caller reads the memory after it returned;
    a mark that races with :meth:`take` therefore either is returned now, or (when it
    lands after the clear) stays for the next :meth:`take`, and a write whose mark
    :meth:`take` cleared was in memory before the clear, so the caller's read sees it.

    :param size: bytes of the tracked object (> 0).
    :param granule: bytes per bit of tracking: a power of two, at least 4096.
    :raises ConfigError: a bad size or granule.
    """

    def __init__(self, size: int, granule: int = DEFAULT_GRANULE) -> None:
        if size <= 0:
            raise ConfigError(f"dirty bitmap: size {size} is not positive")
        if granule < 4096 or granule & (granule - 1):
            raise ConfigError(f"dirty bitmap: granule {granule} is not a power of two >= 4096")
        self.size = size
        self.granule = granule
        self._shift = granule.bit_length() - 1
        self._count = (size + granule - 1) >> self._shift
        self._bits = bytearray(self._count)
        self._tracking = False
        self._session = 0

    @property
    def session(self) -> int:
        """The number of :meth:`start` calls so far: what a writer that lost exact tracking
        during a session records, so that it stays lost until the next one."""
        return self._session

    @property
    def tracking(self) -> bool:
        """Whether writes are being recorded (between :meth:`start` and :meth:`stop`)."""
        return self._tracking

    def start(self) -> None:
        """Begin tracking: everything counts as dirty until the first :meth:`take`."""
        self._bits[:] = _ONE * self._count
        self._session += 1
        self._tracking = True

    def stop(self) -> None:
        """Stop tracking and forget what was recorded."""
        self._tracking = False
        self._bits[:] = bytes(self._count)

    def mark(self, offset: int, length: int) -> None:
        """Record a write of ``length`` bytes at ``offset`` (call it after the write;
        parts outside the object are ignored; nothing happens while not tracking).

        :param offset: first byte written.
        :param length: bytes written.
        """
        if not self._tracking or length <= 0:
            return
        first = max(offset, 0) >> self._shift
        last = min(offset + length - 1, self.size - 1) >> self._shift
        if first == last:
            self._bits[first] = 1
        elif first < last:
            self._bits[first:last + 1] = _ONE * (last + 1 - first)

    def take(self) -> list[tuple[int, int]]:
        """The ranges written since the last call (merged runs of granules, the last one
        cut to the object's size), and clear them. Read the memory *after* this returns.

        :returns: ``(offset, length)`` pairs in offset order.
        """
        bits = self._bits
        snap = bytes(bits)
        out: list[tuple[int, int]] = []
        i = snap.find(1)
        while i >= 0:
            j = snap.find(0, i)
            if j < 0:
                j = len(snap)
            bits[i:j] = bytes(j - i)
            start = i << self._shift
            out.append((start, min(j << self._shift, self.size) - start))
            i = snap.find(1, j)
        return out

    def dirty_bytes(self) -> int:
        """About how many bytes :meth:`take` would return now (whole granules)."""
        return min((self._count - self._bits.count(0)) << self._shift, self.size)


@attrs.frozen
class MemorySource:
    """A memory object of a device whose contents stand in for its descriptor over a
    channel that carries none (TCP).

    :ivar name: unique within the device (``"bar2"``, ``"nvme/ns1"``, ``"nvme/ns1/meta"``):
        at most 64 characters of ``[A-Za-z0-9_./:@+-]``. An ``@`` suffix tells generations
        of one object apart on the source (``"nvme/ns1@<inode>"``: a store that Format NVM
        replaced during the pre-copy is a new source); the destination matches the part
        before the ``@`` against its own sources (:func:`object_name`).
    :ivar fd: the descriptor (borrowed) that the device's vmstate stream names by an
        :class:`~pcidev.vmstate.FdRef`; the engine matches it against the stream's
        descriptors by ``os.fstat`` device and inode.
    :ivar size: bytes of the object the destination receives.
    :ivar bitmap: exact tracking of every write into the object, or None: the engine
        then compares per-page CRC-32C hashes each iteration and at the stop (for writes
        the device cannot see, such as a client's through a shared mapping).
    :ivar covers: the device's :attr:`~pcidev.device.PciDevice.FD_FEATURES` this source
        stands in for (they block a migration without descriptors only while some
        enabled one is covered by no source).
    :ivar buffer: the contents, for memory whose descriptor does not hold them (an
        anonymous mapping: ``fd`` then only *names* the object, as the descriptor the
        stream refers to, which the device fills at the stop): the engine reads this
        mapping instead of ``fd``. Such a source needs a ``bitmap`` (no page hashing).
    """

    name: str
    fd: int
    size: int
    bitmap: DirtyBitmap | None = None
    covers: frozenset[str] = frozenset()
    buffer: mmap.mmap | None = None


class ContentDescriptors(list[int | None]):
    """The descriptor list a load gets when only memory *contents* travelled (a channel
    without descriptors, :mod:`pcidev.migration.precopy`): the indexes of ``names`` hold a
    memfd of the destination's with the contents of the source's memory object of that
    name; every other index is None. Guest memory and interrupt eventfds are never among
    them (the host attaches those): the load checks that no index it names is one.

    :param fds: the list (None where nothing travelled).
    :param names: ``{index: source name}`` of the indexes that hold a descriptor.
    :param allocated: ``{index: page map}``: one byte per :data:`ALLOCATION_PAGE` bytes of
        the memfd at that index, nonzero where it holds data (the pages the contents wrote),
        zero where it is a hole, as the channel staged it -- so that a device adopting the
        memfd need not scan it for holes (``SEEK_DATA``/``SEEK_HOLE`` walks every extent:
        ~28 ms for 40,000 scattered pages of 256 MiB, inside the downtime). An index
        without a map: unknown (scan).
    """

    def __init__(self, fds: list[int | None], names: dict[int, str],
                 allocated: dict[int, bytes] | None = None) -> None:
        super().__init__(fds)
        self.names = dict(names)
        self.allocated = dict(allocated or {})


#: the granule of the page maps of :class:`ContentDescriptors` (``allocated``; the page size of memfds)
ALLOCATION_PAGE = 4096


def object_name(name: str) -> str:
    """The memory object a source name names on any side: ``name`` without its ``@``
    generation suffix (see :class:`MemorySource`).

    :param name: a source name.
    :returns: the part before the first ``@``.
    """
    return name.split("@", 1)[0]
