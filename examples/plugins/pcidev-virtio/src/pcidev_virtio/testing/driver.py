"""A host-side virtio-pci driver for tests: :class:`VirtioDriver`.

It drives any virtio device plugged into pcidev's software host
(:class:`pcidev.host.Machine`), in process, over the device link or over vfio-user,
doing what Linux's ``virtio_pci_modern`` does: find the virtio capabilities, reset,
``ACKNOWLEDGE``, ``DRIVER``, negotiate features in 32-bit windows, ``FEATURES_OK`` (read
back), set up split queues in the machine's RAM with MSI-X vectors (the configuration
vector 0, queue *i* vector *i + 1*), ``DRIVER_OK``::

    with Machine() as machine:
        pdev = plugged(machine, "virtio-rng")               # pcidev.testing
        drv = VirtioDriver(machine, pdev)
        drv.init()
        done = drv.queues[0].request(in_lens=[64])          # submit, kick, wait
        assert len(done.data) == done.written == 64

Interrupts: with MSI-X enabled on the handle (``plugged`` does it) the driver waits on
the queue's vector; with INTx it waits for the line and reads the ISR; with
``poll=True`` it only polls the used ring. Every wait has a deadline
(:class:`~pcidev_virtio.errors.DriverError` on timeout).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import attrs

from pcidev import native
from pcidev.host import PCI_IRQ_INTX, PCI_IRQ_MSIX, HostPciDevice, Machine
from pcidev.pci.capabilities.vendor import VendorCapability
from pcidev_virtio import spec
from pcidev_virtio.errors import DriverError
from pcidev_virtio.virtqueue import vring_need_event

__all__ = ["VirtioDriver", "DriverQueue", "Completion", "VirtioCap"]

C = spec.CommonCfg


@attrs.frozen
class VirtioCap:
    """One virtio PCI capability as the driver found it."""

    pos: int
    cfg_type: int
    bar: int
    offset: int
    length: int


@attrs.frozen
class Completion:
    """A used entry: the chain's head, the bytes the device reported written and the
    contents of the chain's device-writable buffers (all of them, in order)."""

    head: int
    written: int
    data: bytes


@attrs.define
class _Pending:
    descs: list[int]
    in_bufs: list[tuple[int, int]]
    allocations: list[int]


class DriverQueue:
    """One split queue set up by :class:`VirtioDriver` in the machine's RAM.

    :param driver: the driver.
    :param index: queue index.
    :param size: the size chosen.
    :param vector: its MSI-X vector, or ``NO_VECTOR``.
    """

    def __init__(self, driver: VirtioDriver, index: int, size: int, vector: int) -> None:
        m = driver.machine
        self.driver = driver
        self.index = index
        self.size = size
        self.vector = vector
        self.desc = m.alloc(spec.desc_table_size(size), 16)
        self.avail = m.alloc(spec.avail_ring_size(size), 2)
        self.used = m.alloc(spec.used_ring_size(size), 4)
        self.free = list(range(size - 1, -1, -1))
        self.avail_idx = 0
        self.last_used = 0
        self.pending: dict[int, _Pending] = {}
        #: notifications actually written (kicks the device did not suppress)
        self.kicks = 0
        self.notify_off = 0

    # -- guest memory helpers ----------------------------------------------------------------------
    def _write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.driver.machine.memory.write_struct(spec.DESC, table + spec.DESC_SIZE * i, addr, length, flags, nxt)

    # -- submitting ------------------------------------------------------------------------------------
    def add(self, out: Sequence[bytes] = (), in_lens: Sequence[int] = (), *, indirect: bool = False) -> int:
        """Place one chain (out buffers with these contents, then in buffers of these
        lengths) in the driver ring, without notifying the device.

        :param out: device-readable buffers.
        :param in_lens: sizes of the device-writable buffers.
        :param indirect: put the chain in an indirect table (one ring descriptor).
        :returns: the chain's head.
        :raises DriverError: the queue is full.
        """
        m = self.driver.machine
        allocations: list[int] = []
        bufs: list[tuple[int, int, int]] = []
        in_bufs: list[tuple[int, int]] = []
        for data in out:
            addr = m.alloc(max(len(data), 1), 8)
            allocations.append(addr)
            m.write(addr, data)
            bufs.append((addr, len(data), 0))
        for n in in_lens:
            addr = m.alloc(max(n, 1), 8)
            allocations.append(addr)
            bufs.append((addr, n, spec.VRING_DESC_F_WRITE))
            in_bufs.append((addr, n))
        needed = 1 if indirect else len(bufs)
        if needed == 0 or needed > len(self.free):
            for a in allocations:
                m.free(a)
            raise DriverError(f"queue {self.index}: no room for a chain of {needed} descriptors")
        descs = [self.free.pop() for _ in range(needed)]
        if indirect:
            table = m.alloc(spec.DESC_SIZE * len(bufs), 16)
            allocations.append(table)
            for i, (addr, length, flags) in enumerate(bufs):
                nxt_flag = spec.VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0
                self._write_desc(table, i, addr, length, flags | nxt_flag, i + 1 if nxt_flag else 0)
            self._write_desc(self.desc, descs[0], table, spec.DESC_SIZE * len(bufs), spec.VRING_DESC_F_INDIRECT, 0)
        else:
            for i, (addr, length, flags) in enumerate(bufs):
                nxt_flag = spec.VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0
                self._write_desc(self.desc, descs[i], addr, length, flags | nxt_flag,
                                 descs[i + 1] if nxt_flag else 0)
        head = descs[0]
        self.pending[head] = _Pending(descs, in_bufs, allocations)
        mem = m.memory
        mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        mem.write_u16(self.avail + 2, self.avail_idx)
        return head

    def kick(self, *, old_idx: int | None = None) -> bool:
        """Notify the device unless it asked not to be (``VRING_USED_F_NO_NOTIFY``, or
        ``avail_event`` with EVENT_IDX).

        :param old_idx: the available index before the chains being announced (default:
            one chain ago).
        :returns: whether the notification was written.
        """
        mem = self.driver.machine.memory
        new = self.avail_idx
        old = (new - 1) & 0xFFFF if old_idx is None else old_idx
        # Linux's virtqueue_kick_prepare: a full barrier between the avail->idx store and
        # the loads that decide (the device fences between its avail_event store and its
        # reload of avail->idx: one of the two sees the other)
        native.fence()
        if self.driver.negotiated(spec.Feature.RING_EVENT_IDX):
            event = mem.read_u16(self.used + 4 + spec.USED_ELEM_SIZE * self.size)
            needed = vring_need_event(event, new, old)
        else:
            needed = not mem.read_u16(self.used) & spec.VRING_USED_F_NO_NOTIFY
        if needed:
            self.driver.notify(self)
            self.kicks += 1
        return needed

    def submit(self, out: Sequence[bytes] = (), in_lens: Sequence[int] = (), *, indirect: bool = False) -> int:
        """:meth:`add` then :meth:`kick`; returns the head."""
        old = self.avail_idx
        head = self.add(out, in_lens, indirect=indirect)
        self.kick(old_idx=old)
        return head

    # -- completions -------------------------------------------------------------------------------------
    def used_idx(self) -> int:
        """The device ring's ``idx`` as the device published it."""
        return self.driver.machine.memory.read_u16(self.used + 2)

    def poll(self) -> list[Completion]:
        """Collect the used entries published since the last call (freeing their buffers)."""
        m = self.driver.machine
        mem = m.memory
        done: list[Completion] = []
        idx = self.used_idx()
        if (idx - self.last_used) & 0xFFFF > self.size:
            raise DriverError(f"queue {self.index}: used idx {idx} jumped past {self.last_used}")
        while self.last_used != idx:
            head, written = mem.read_struct(spec.USED_ELEM, self.used + 4 + spec.USED_ELEM_SIZE * (
                self.last_used % self.size))
            self.last_used = (self.last_used + 1) & 0xFFFF
            req = self.pending.pop(head, None)
            if req is None:
                raise DriverError(f"queue {self.index}: used entry for head {head}, which is not pending")
            total = sum(n for _a, n in req.in_bufs)
            if written > total:
                raise DriverError(f"queue {self.index}: head {head} reports {written} bytes written "
                                  f"into {total}")
            data = b"".join(m.read(a, n) for a, n in req.in_bufs)
            for addr in req.allocations:
                m.free(addr)
            self.free.extend(reversed(req.descs))
            done.append(Completion(head, written, data))
        if self.driver.negotiated(spec.Feature.RING_EVENT_IDX):
            mem.write_u16(self.avail + 4 + 2 * self.size, self.last_used)  # used_event
        return done

    def wait(self, count: int = 1, timeout: float = 5.0) -> list[Completion]:
        """Wait until ``count`` used entries arrived (interrupt, else polling).

        :raises DriverError: not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        done: list[Completion] = []
        while True:
            done += self.poll()
            if len(done) >= count:
                return done
            left = deadline - time.monotonic()
            if left <= 0:
                raise DriverError(f"queue {self.index}: {len(done)} of {count} completions after {timeout} s")
            self.driver.wait_interrupt(self, min(left, 0.05))

    def request(self, out: Sequence[bytes] = (), in_lens: Sequence[int] = (), *, indirect: bool = False,
                timeout: float = 5.0) -> Completion:
        """Submit one chain and wait for its completion (nothing else may be pending)."""
        head = self.submit(out, in_lens, indirect=indirect)
        [done] = self.wait(1, timeout)
        if done.head != head:
            raise DriverError(f"queue {self.index}: completion for head {done.head}, expected {head}")
        return done


class VirtioDriver:
    """Drives a virtio-pci device on a :class:`~pcidev.host.Machine` handle.

    :param machine: the software host (its RAM holds the rings and buffers).
    :param pdev: the device's handle, enabled with bus mastering (and interrupt vectors,
        which :func:`pcidev.testing.plugged` sets up).
    :param poll: never wait for interrupts, poll the used rings.
    :raises DriverError: the device is not a modern virtio-pci device.
    """

    def __init__(self, machine: Machine, pdev: HostPciDevice, *, poll: bool = False) -> None:
        self.machine = machine
        self.pdev = pdev
        self.poll = poll
        if pdev.vendor != spec.VIRTIO_PCI_VENDOR_ID or not 0x1040 <= pdev.device_id <= 0x107F:
            raise DriverError(f"{pdev.vendor:04x}:{pdev.device_id:04x} is not a modern virtio-pci device")
        #: the virtio device id
        self.virtio_id = pdev.device_id - spec.VIRTIO_PCI_DEVICE_ID_BASE
        self.caps: dict[int, VirtioCap] = {}
        self.notify_multiplier = 0
        for pos, cap_id in pdev.capabilities():
            if cap_id != VendorCapability.CAP_ID:
                continue
            cap = VirtioCap(pos, pdev.config_read8(pos + 3), pdev.config_read8(pos + 4),
                            pdev.config_read32(pos + 8), pdev.config_read32(pos + 12))
            self.caps.setdefault(cap.cfg_type, cap)  # the first of each type is the preferred one
            if cap.cfg_type == spec.CfgType.NOTIFY and cap.pos == self.caps[cap.cfg_type].pos:
                self.notify_multiplier = pdev.config_read32(pos + 16)
        for needed in (spec.CfgType.COMMON, spec.CfgType.NOTIFY, spec.CfgType.ISR):
            if needed not in self.caps:
                raise DriverError(f"no virtio capability of type {needed.name}")
        #: the features the device offers / the driver accepted (after :meth:`init`)
        self.device_features = 0
        self.features = 0
        self.queues: list[DriverQueue] = []
        self.config_interrupts = 0

    # -- register access --------------------------------------------------------------------------------
    def _common(self, field: int, size: int, value: int | None = None) -> int:
        cap = self.caps[spec.CfgType.COMMON]
        off = cap.offset + field
        io = {1: (self.pdev.ioread8, self.pdev.iowrite8), 2: (self.pdev.ioread16, self.pdev.iowrite16),
              4: (self.pdev.ioread32, self.pdev.iowrite32)}[size]
        if value is None:
            return io[0](cap.bar, off)
        io[1](cap.bar, off, value)
        return 0

    def read_common(self, field: int, size: int) -> int:
        """Read a common configuration field (``spec.CommonCfg``) of ``size`` bytes."""
        return self._common(field, size)

    def write_common(self, field: int, size: int, value: int) -> None:
        """Write a common configuration field."""
        self._common(field, size, value)

    @property
    def status(self) -> int:
        """``device_status``."""
        return self._common(C.DEVICE_STATUS, 1)

    def set_status(self, bits: int) -> None:
        """Add ``bits`` to ``device_status``."""
        self._common(C.DEVICE_STATUS, 1, self.status | bits)

    def read_config(self, offset: int, size: int) -> int:
        """Read the device configuration (1, 2 or 4 bytes), as Linux does: retry while
        ``config_generation`` changes."""
        cap = self.caps.get(spec.CfgType.DEVICE)
        if cap is None:
            raise DriverError("the device has no device configuration")
        read = {1: self.pdev.ioread8, 2: self.pdev.ioread16, 4: self.pdev.ioread32, 8: self.pdev.ioread64}[size]
        for _ in range(100):
            gen = self._common(C.CONFIG_GENERATION, 1)
            value = read(cap.bar, cap.offset + offset)
            if self._common(C.CONFIG_GENERATION, 1) == gen:
                return value
        raise DriverError("config_generation keeps changing")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Write the device configuration."""
        cap = self.caps.get(spec.CfgType.DEVICE)
        if cap is None:
            raise DriverError("the device has no device configuration")
        write = {1: self.pdev.iowrite8, 2: self.pdev.iowrite16, 4: self.pdev.iowrite32}[size]
        write(cap.bar, cap.offset + offset, value)

    def read_isr(self) -> int:
        """Read (and so clear) the ISR status."""
        cap = self.caps[spec.CfgType.ISR]
        return self.pdev.ioread8(cap.bar, cap.offset)

    def negotiated(self, bit: int) -> bool:
        """Whether feature ``bit`` was negotiated."""
        return bool(self.features >> bit & 1)

    # -- initialisation ------------------------------------------------------------------------------------
    def reset(self, timeout: float = 5.0) -> None:
        """Write 0 to the status and wait until it reads 0 (``vp_reset``)."""
        self._common(C.DEVICE_STATUS, 1, 0)
        deadline = time.monotonic() + timeout
        while self.status:
            if time.monotonic() > deadline:
                raise DriverError("the device did not finish its reset")
            time.sleep(0.001)
        self.queues = []
        self.features = 0

    def read_device_features(self) -> int:
        """The 64 feature bits the device offers, read in two windows."""
        features = 0
        for sel in (0, 1):
            self._common(C.DEVICE_FEATURE_SELECT, 4, sel)
            features |= self._common(C.DEVICE_FEATURE, 4) << (32 * sel)
        return features

    def write_driver_features(self, features: int) -> None:
        """Write the driver's 64 feature bits in two windows."""
        for sel in (0, 1):
            self._common(C.DRIVER_FEATURE_SELECT, 4, sel)
            self._common(C.DRIVER_FEATURE, 4, (features >> (32 * sel)) & 0xFFFFFFFF)

    def init(self, features: int | None = None, *, queue_sizes: Sequence[int] | None = None,
             driver_ok: bool = True) -> int:
        """The whole initialisation sequence (spec 3.1.1).

        :param features: the feature bits wanted (default: everything offered); only
            offered ones are accepted, ``VERSION_1`` always.
        :param queue_sizes: the size to choose for each queue (default: the device's
            maximum, at most 256); a 0 leaves the queue unused.
        :param driver_ok: set ``DRIVER_OK`` at the end.
        :returns: the negotiated features.
        :raises DriverError: the device refused ``FEATURES_OK``.
        """
        self.reset()
        self.set_status(spec.Status.ACKNOWLEDGE)
        self.set_status(spec.Status.DRIVER)
        self.device_features = self.read_device_features()
        wanted = self.device_features if features is None else features
        accepted = (wanted & self.device_features) | (1 << spec.Feature.VERSION_1)
        self.write_driver_features(accepted)
        self.set_status(spec.Status.FEATURES_OK)
        if not self.status & spec.Status.FEATURES_OK:
            raise DriverError(f"the device refused features {accepted:#x}")
        self.features = accepted
        msix = self.pdev.irq_type == PCI_IRQ_MSIX
        if msix:
            self._common(C.CONFIG_MSIX_VECTOR, 2, 0)
            if self._common(C.CONFIG_MSIX_VECTOR, 2) == spec.NO_VECTOR:
                raise DriverError("the device refused MSI-X vector 0 for configuration changes")
        nqueues = self._common(C.NUM_QUEUES, 2)
        for i in range(nqueues):
            self._common(C.QUEUE_SELECT, 2, i)
            max_size = self._common(C.QUEUE_SIZE, 2)
            size = min(max_size, 256) if queue_sizes is None else (queue_sizes[i] if i < len(queue_sizes) else 0)
            if max_size == 0 or size == 0:
                continue
            vector = i + 1 if msix and i + 1 < self.pdev.nvec else spec.NO_VECTOR
            q = DriverQueue(self, i, size, vector)
            self._common(C.QUEUE_SIZE, 2, size)
            for field, addr in ((C.QUEUE_DESC, q.desc), (C.QUEUE_DRIVER, q.avail), (C.QUEUE_DEVICE, q.used)):
                self._common(field, 4, addr & 0xFFFFFFFF)
                self._common(field + 4, 4, addr >> 32)
            if msix:
                self._common(C.QUEUE_MSIX_VECTOR, 2, vector)
                if self._common(C.QUEUE_MSIX_VECTOR, 2) != vector:
                    raise DriverError(f"the device refused MSI-X vector {vector} for queue {i}")
            q.notify_off = self._common(C.QUEUE_NOTIFY_OFF, 2)
            self._common(C.QUEUE_ENABLE, 2, 1)
            self.queues.append(q)
        if driver_ok:
            self.set_status(spec.Status.DRIVER_OK)
        return accepted

    # -- notifications and interrupts -------------------------------------------------------------------
    def notify(self, q: DriverQueue) -> None:
        """Write the queue's index to its notification address."""
        cap = self.caps[spec.CfgType.NOTIFY]
        self.pdev.iowrite16(cap.bar, cap.offset + q.notify_off * self.notify_multiplier, q.index)

    def wait_interrupt(self, q: DriverQueue, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the queue's interrupt (or just sleep a
        little when polling)."""
        if self.poll:
            time.sleep(min(timeout, 0.001))
        elif self.pdev.irq_type == PCI_IRQ_MSIX and q.vector != spec.NO_VECTOR:
            self.pdev.wait_irq(q.vector, timeout)
        elif self.pdev.irq_type == PCI_IRQ_INTX:
            if self.pdev.recorder.wait_intx(True, timeout):
                if self.read_isr() & spec.ISR_CONFIG:
                    self.config_interrupts += 1
        else:
            time.sleep(min(timeout, 0.001))
