"""The split virtqueue (virtio 1.x, spec 2.7), device side.

A :class:`Virtqueue` is configured by the driver through the transport's common
configuration (size, the three ring addresses, enable) and then used by the device
type::

    while (elem := vq.pop()) is not None:       # next available chain, or None
        n = fill(elem.in_bufs)                  # memoryviews straight into guest RAM
        vq.push(elem, n)                        # used entry written, not yet visible
    vq.flush()                                  # used idx published, one interrupt if wanted

Guest memory is reached only through the device's guarded ``dma``
(:attr:`pcidev.PciDevice.dma`: bounds-checked, refused without bus mastering). A
chain is checked completely before :meth:`Virtqueue.pop` returns it: a head or
``next`` index beyond the queue, a chain longer than the queue (a loop), an indirect
descriptor without ``VIRTIO_F_INDIRECT_DESC``, indirect-in-indirect, an indirect table
whose length is zero or not a multiple of 16, an indirect descriptor that does not end
its chain, a device-readable buffer after a device-writable one, a buffer outside guest
memory, or a chain of 2**32 bytes or more raise
:class:`~pcidev_virtio.errors.VirtqueueError`, with nothing pinned; the transport then
sets ``DEVICE_NEEDS_RESET``. Zero-length direct buffers are allowed (they contribute no
view). A chain may be direct descriptors followed by one indirect descriptor (spec
2.7.5.3.2); its length, direct descriptors plus the indirect table's entries, may not
exceed the queue size (2.7.5.3.1: a device type offering ``seg_max`` keeps it below the
queue size, as QEMU does with ``queue_size - 2``).

Notification suppression: without ``VIRTIO_F_EVENT_IDX`` the driver's
``VRING_AVAIL_F_NO_INTERRUPT`` flag is honoured; with it, ``used_event`` decides
whether a flush interrupts, and the device publishes ``avail_event`` (the available
index it will look at next) so the driver kicks only when needed.

Memory ordering: the driver runs on other CPUs, which may see a store after a later
load (even x86 lets a load pass an earlier store). A full fence
(:func:`pcidev.native.fence`) orders the used entries before the used index that
publishes them, that index before the read of ``used_event`` or the flags (else an
interrupt the driver waits for may be missed), and the ``avail_event`` store before
the available index is read again (else a kick may be missed), as Linux's
``virtio_mb()`` does on the driver side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs

from pcidev import DmaError
from pcidev.dma import GuestMemory
from pcidev.native import fence
from pcidev.vmstate import U16, U64, VarArray, vmstate
from pcidev_virtio import spec
from pcidev_virtio.errors import VirtqueueError

__all__ = ["VirtqElement", "Virtqueue", "VirtqueueState", "QueueOwner", "vring_need_event"]

#: the most in-flight heads a saved queue may list (a queue holds at most this many chains)
MAX_INFLIGHT = spec.MAX_QUEUE_SIZE
#: the longest chain in bytes (the used entry's length is 32 bits)
MAX_CHAIN_BYTES = 0xFFFF_FFFF


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Whether moving an index from ``old`` to ``new`` crosses ``event`` (spec 2.7.10,
    all three 16-bit, wrapping): the notification test of ``VIRTIO_F_EVENT_IDX``."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@attrs.frozen
class VirtqElement:
    """One available descriptor chain, resolved.

    :ivar head: descriptor index of the chain's head (the used entry's id).
    :ivar out_bufs: driver -> device buffers (the device reads them), in chain order.
    :ivar in_bufs: device -> driver buffers (the device writes them), in chain order.

    The buffers are memoryviews into guest memory (bounds-checked; indirect descriptors
    resolved). They pin the guest mapping until :meth:`Virtqueue.push` releases them.
    """

    head: int
    out_bufs: tuple[memoryview, ...]
    in_bufs: tuple[memoryview, ...]

    def out_len(self) -> int:
        """Bytes the driver gave the device to read."""
        return sum(b.nbytes for b in self.out_bufs)

    def in_len(self) -> int:
        """Bytes the device may write."""
        return sum(b.nbytes for b in self.in_bufs)

    def release(self) -> None:
        """Release every view (the element cannot be used afterwards)."""
        for buf in (*self.out_bufs, *self.in_bufs):
            buf.release()


@vmstate("virtio/virtqueue", version=1)
@attrs.frozen
class VirtqueueState:
    """A queue's configuration and position, as a migration saves it.

    :ivar size: the queue size the driver chose.
    :ivar enabled: ``queue_enable``.
    :ivar msix_vector: the queue's MSI-X vector (``NO_VECTOR`` if none).
    :ivar desc: guest address of the descriptor table.
    :ivar driver: guest address of the driver (available) ring.
    :ivar device: guest address of the device (used) ring.
    :ivar last_avail_idx: the next available-ring index the device takes.
    :ivar used_idx: the next used-ring index the device writes (entries pushed so far).
    :ivar published_used_idx: the used index the driver has been shown (a flush).
    :ivar inflight: heads taken from the ring and not yet returned, in the order taken.
    """

    size: U16
    enabled: bool
    msix_vector: U16
    desc: U64
    driver: U64
    device: U64
    last_avail_idx: U16
    used_idx: U16
    published_used_idx: U16
    inflight: VarArray[U16, MAX_INFLIGHT] = ()


class QueueOwner(Protocol):
    """What a :class:`Virtqueue` needs of its device (a
    :class:`~pcidev_virtio.device.VirtioPciDevice` provides it)."""

    @property
    def dma(self) -> GuestMemory:
        """The device's guarded guest memory (raises :class:`pcidev.DmaError` without bus mastering)."""
        ...

    @property
    def memory(self) -> GuestMemory | None:
        """The guest's memory map, whether bus mastering is on or not (None: none attached)."""
        ...

    def negotiated(self, bit: int) -> bool:
        """Whether the driver accepted feature ``bit``."""
        ...

    def queue_interrupt(self, vq: Virtqueue) -> None:
        """Send the driver a used buffer notification for ``vq``."""
        ...


class Virtqueue:
    """One split virtqueue of a device.

    :param owner: the device (guest memory, negotiated features, interrupts).
    :param index: the queue's index.
    :param max_size: the largest size the device supports (a power of two, 1..32768).
    """

    def __init__(self, owner: QueueOwner, index: int, max_size: int) -> None:
        if not 1 <= max_size <= spec.MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to {spec.MAX_QUEUE_SIZE}")
        self.owner = owner
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset: not enabled, maximum size, no vector."""
        #: the size the driver chose (``queue_size``)
        self.size = self.max_size
        #: ``queue_enable``
        self.enabled = False
        #: the queue's MSI-X vector (``queue_msix_vector``)
        self.msix_vector = spec.NO_VECTOR
        #: guest addresses of the descriptor table, driver ring and device ring
        self.desc = self.driver = self.device = 0
        self.last_avail_idx = 0
        self.used_idx = 0
        self.published_used_idx = 0
        self._inflight: dict[int, None] = {}

    def __repr__(self) -> str:
        return f"<Virtqueue {self.index} size {self.size}{' enabled' if self.enabled else ''}>"

    # -- configuration checks ------------------------------------------------------------
    def check_config(self) -> str | None:
        """Why the driver's configuration is unusable (size, alignment, rings outside guest
        memory), or None if it is fine. Called when the driver enables the queue.

        The rings are checked against the guest's memory map, not against what the device
        may reach right now: bus mastering off does not make a configuration bad (the
        driver may enable queues before it sets Bus Master Enable; the device reads the
        rings only once it is on).
        """
        size = self.size
        mem = self.owner.memory
        if not 1 <= size <= self.max_size or size & (size - 1):
            return f"size {size} is not a power of two up to {self.max_size}"
        for what, addr, length, align in (
                ("descriptor table", self.desc, spec.desc_table_size(size), 16),
                ("driver ring", self.driver, spec.avail_ring_size(size), 2),
                ("device ring", self.device, spec.used_ring_size(size), 4)):
            if addr % align:
                return f"{what} at {addr:#x} is not {align}-byte aligned"
            if mem is None:
                return f"no guest memory for the {what}"
            if not mem.is_mapped(addr, length, write=what == "device ring"):
                return f"{what} {addr:#x}+{length:#x} is outside guest memory"
        return None

    # -- taking chains ------------------------------------------------------------------
    def _fail(self, message: str) -> VirtqueueError:
        return VirtqueueError(message, queue=self.index)

    def avail_idx(self) -> int:
        """The driver ring's ``idx`` (read from guest memory).

        :raises VirtqueueError: the ring is not in guest memory.
        """
        try:
            return self.owner.dma.read_u16(self.driver + 2)
        except DmaError as exc:
            raise self._fail(f"driver ring unreadable: {exc}") from None

    def has_available(self) -> bool:
        """Whether the driver made a chain available that :meth:`pop` has not taken."""
        return self.enabled and self.avail_idx() != self.last_avail_idx

    def pop(self) -> VirtqElement | None:
        """Take the next available chain.

        :returns: the resolved chain, or None if the driver made none available (or the
            queue is not enabled).
        :raises VirtqueueError: the ring or the chain is malformed (nothing is taken then).
        """
        if not self.enabled:
            return None
        mem = self._memory()
        avail = self.avail_idx()
        if avail == self.last_avail_idx:
            if self.owner.negotiated(spec.Feature.RING_EVENT_IDX):
                self._set_avail_event(mem, self.last_avail_idx)
                fence()  # the avail_event store before the idx load (the driver fences its side)
                avail = self.avail_idx()  # the driver may have added one before it saw avail_event
            if avail == self.last_avail_idx:
                return None
        if (avail - self.last_avail_idx) & 0xFFFF > self.size:
            raise self._fail(f"driver ring idx {avail} is more than {self.size} ahead of {self.last_avail_idx}")
        slot = self.last_avail_idx % self.size
        try:
            head = mem.read_u16(self.driver + 4 + 2 * slot)
        except DmaError as exc:
            raise self._fail(f"driver ring unreadable: {exc}") from None
        if head in self._inflight:
            raise self._fail(f"head {head} is made available again while the device holds it")
        elem = self.read_chain(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        self._inflight[head] = None
        if self.owner.negotiated(spec.Feature.RING_EVENT_IDX):
            self._set_avail_event(mem, self.last_avail_idx)
        return elem

    def _memory(self) -> GuestMemory:
        try:
            return self.owner.dma
        except DmaError as exc:
            raise self._fail(str(exc)) from None

    def _set_avail_event(self, mem: GuestMemory, value: int) -> None:
        try:
            mem.write_u16(self.device + 4 + spec.USED_ELEM_SIZE * self.size, value)
        except DmaError as exc:
            raise self._fail(f"device ring unwritable: {exc}") from None

    def read_chain(self, head: int) -> VirtqElement:
        """Resolve the chain starting at descriptor ``head`` (following ``next`` links and an
        indirect table), without taking anything from the ring. Migration uses it to rebuild
        the chains in flight at the source.

        :param head: a descriptor index.
        :returns: the chain's buffers.
        :raises VirtqueueError: a malformed chain (no view is left pinned).
        """
        mem = self._memory()
        size = self.size
        if not 0 <= head < size:
            raise self._fail(f"head {head} is outside a queue of {size}")
        out_bufs: list[memoryview] = []
        in_bufs: list[memoryview] = []
        try:
            self._walk(mem, self.desc, size, head, out_bufs, in_bufs, indirect=False)
            total = sum(b.nbytes for b in out_bufs) + sum(b.nbytes for b in in_bufs)
            if total > MAX_CHAIN_BYTES:
                raise self._fail(f"chain of {total} bytes (at most 2**32 - 1, spec 2.7.13.1)")
        except BaseException:
            for buf in (*out_bufs, *in_bufs):
                buf.release()
            raise
        return VirtqElement(head, tuple(out_bufs), tuple(in_bufs))

    def _walk(self, mem: GuestMemory, table: int, count: int, index: int, out_bufs: list[memoryview],
              in_bufs: list[memoryview], *, indirect: bool) -> None:
        """Follow one descriptor table from ``index``, at most ``count`` descriptors."""
        where = "indirect table" if indirect else "descriptor table"
        for seen in range(count + 1):
            if seen == count:
                raise self._fail(f"chain in the {where} is longer than {count} descriptors (a loop?)")
            try:
                addr, length, flags, nxt = mem.read_struct(spec.DESC, table + spec.DESC_SIZE * index)
            except DmaError as exc:
                raise self._fail(f"{where} unreadable: {exc}") from None
            if flags & spec.VRING_DESC_F_INDIRECT:
                if indirect:
                    raise self._fail("an indirect descriptor inside an indirect table")
                if not self.owner.negotiated(spec.Feature.RING_INDIRECT_DESC):
                    raise self._fail("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & spec.VRING_DESC_F_NEXT:
                    raise self._fail("an indirect descriptor with VIRTQ_DESC_F_NEXT (it must end its chain)")
                if length == 0 or length % spec.DESC_SIZE:
                    raise self._fail(f"indirect table length {length} is not a positive multiple of 16")
                entries = length // spec.DESC_SIZE
                if seen + entries > self.size:
                    raise self._fail(f"chain of {seen} descriptors and an indirect table of {entries} is longer "
                                     f"than the queue size {self.size}")
                if not mem.is_mapped(addr, length):
                    raise self._fail(f"indirect table {addr:#x}+{length:#x} is outside guest memory")
                self._walk(mem, addr, entries, 0, out_bufs, in_bufs, indirect=True)
                return
            writable = bool(flags & spec.VRING_DESC_F_WRITE)
            if not writable and in_bufs:
                raise self._fail("a device-readable buffer after a device-writable one")
            try:
                views = mem.views(addr, length, write=writable)
            except DmaError as exc:
                raise self._fail(f"buffer {addr:#x}+{length:#x}: {exc}") from None
            (in_bufs if writable else out_bufs).extend(views)
            if not flags & spec.VRING_DESC_F_NEXT:
                return
            if nxt >= count:
                raise self._fail(f"next {nxt} is outside the {where} of {count}")
            index = nxt

    # -- returning chains -------------------------------------------------------------------
    def inflight(self) -> tuple[int, ...]:
        """Heads taken by :meth:`pop` and not yet :meth:`push`-ed, in the order taken."""
        return tuple(self._inflight)

    def push(self, elem: VirtqElement, written: int) -> None:
        """Return a chain: write its used entry (not yet visible to the driver; see
        :meth:`flush`) and release its views.

        :param elem: a chain from :meth:`pop` (or one given to ``resubmit()``).
        :param written: bytes the device wrote into ``elem.in_bufs`` (cut to their size).
        :raises VirtqueueError: the chain is not in flight, or the device ring is not writable.
        """
        if elem.head not in self._inflight:
            raise self._fail(f"head {elem.head} is not in flight")
        written = max(0, min(written, elem.in_len()))
        elem.release()
        try:
            self._memory().write_struct(spec.USED_ELEM, self.device + 4 + spec.USED_ELEM_SIZE * (
                self.used_idx % self.size), elem.head, written)
        except DmaError as exc:
            raise self._fail(f"device ring unwritable: {exc}") from None
        del self._inflight[elem.head]
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def flush(self) -> None:
        """Publish the used entries pushed since the last flush (the used ring's ``idx``)
        and send one interrupt if the driver wants one.

        :raises VirtqueueError: the rings are not in guest memory.
        """
        old, new = self.published_used_idx, self.used_idx
        if old == new:
            return
        mem = self._memory()
        try:
            fence()  # the used entries before the idx that publishes them
            mem.write_u16(self.device + 2, new)
            self.published_used_idx = new
            fence()  # the idx store before the used_event / flags load (a missed interrupt otherwise)
            if self.owner.negotiated(spec.Feature.RING_EVENT_IDX):
                event = mem.read_u16(self.driver + 4 + 2 * self.size)
                wanted = vring_need_event(event, new, old)
            else:
                wanted = not mem.read_u16(self.driver) & spec.VRING_AVAIL_F_NO_INTERRUPT
        except DmaError as exc:
            raise self._fail(f"ring not in guest memory: {exc}") from None
        if wanted:
            self.owner.queue_interrupt(self)

    def drop_inflight(self) -> None:
        """Forget the chains in flight without returning them (a device reset)."""
        self._inflight.clear()

    # -- migration ------------------------------------------------------------------------------
    def snapshot(self) -> VirtqueueState:
        """The queue's configuration, indices and in-flight heads."""
        return VirtqueueState(size=self.size, enabled=self.enabled, msix_vector=self.msix_vector,
                              desc=self.desc, driver=self.driver, device=self.device,
                              last_avail_idx=self.last_avail_idx, used_idx=self.used_idx,
                              published_used_idx=self.published_used_idx, inflight=self.inflight())

    def check_state(self, state: VirtqueueState, reject: Callable[[str, str], Exception]) -> None:
        """Refuse a saved queue this queue cannot take.

        :param state: the saved queue.
        :param reject: builds the exception to raise from ``(message, field)``.
        """
        size = state.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise reject(f"queue size {size} is not a power of two up to {self.max_size}", "size")
        heads = state.inflight
        if len(set(heads)) != len(heads) or any(h >= size for h in heads):
            raise reject(f"in-flight heads {list(heads)} repeat or lie outside a queue of {size}", "inflight")
        if (state.last_avail_idx - state.used_idx) & 0xFFFF != len(heads):
            raise reject(f"{len(heads)} chains in flight, but {state.last_avail_idx} taken and "
                         f"{state.used_idx} returned", "inflight")
        if (state.used_idx - state.published_used_idx) & 0xFFFF > size:
            raise reject("more used entries pushed than the queue holds", "published_used_idx")

    def restore(self, state: VirtqueueState) -> None:
        """Put back a checked state. The in-flight heads are only recorded: their chains are
        read again from guest memory by :meth:`read_chain` (the transport does it when the
        device resumes) and handed to the device type."""
        self.size = state.size
        self.enabled = state.enabled
        self.msix_vector = state.msix_vector
        self.desc, self.driver, self.device = state.desc, state.driver, state.device
        self.last_avail_idx = state.last_avail_idx
        self.used_idx = state.used_idx
        self.published_used_idx = state.published_used_idx
        self._inflight = dict.fromkeys(state.inflight)
