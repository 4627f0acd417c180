"""``virtio-blk``: a virtio block device (virtio 1.2 section 5.2) on the modern PCI transport.

One request queue (``req.0``), or ``num_queues`` with ``VIRTIO_BLK_F_MQ``; a file or memory disk
(:mod:`~pcidev_virtio.blk_backend`); the requests IN, OUT, FLUSH, GET_ID, DISCARD
and WRITE_ZEROES (:mod:`~pcidev_virtio.blk_requests`). Properties:
:class:`~pcidev_virtio.blk_config.VirtioBlkConfig`.

Features offered: ``SEG_MAX`` (queue size - 2), ``BLK_SIZE``, ``TOPOLOGY``
(physical block exponent, minimum I/O of one physical block), ``FLUSH``,
``CONFIG_WCE`` (the driver switches write-back / write-through through the
``writeback`` byte, as Linux's ``cache_type`` sysfs file does), ``DISCARD`` and
``WRITE_ZEROES`` (both dropped for a read-only disk), ``RO`` with ``readonly=on``.
``MQ`` with ``num_queues`` > 1. Not offered: SIZE_MAX, GEOMETRY, LIFETIME,
SECURE_ERASE, ZONED.

Processing is synchronous: a driver's notification (:meth:`VirtioBlk.queue_notify`,
called with ``device.lock`` held) carries out every available request and
publishes the used entries before it returns. So no request is ever taken from
the ring and left unfinished when the device quiesces; a request the driver made
available without the device having taken it yet is still in the ring, whose
indices migrate with the transport's state, and the destination takes it when it
resumes (the transport looks at every enabled queue when the device resumes: a
kick the driver sent while the device was stopped, or while the host was remapping
guest memory, is not lost). Chains the transport hands back through
:meth:`VirtioBlk.resubmit` are carried out the same way.

Cache: with ``writeback`` (the default) a write completes when the backend has it
and is durable after FLUSH (``fdatasync``); write-through (``writeback=off``, or the
driver writing 0, or FLUSH not negotiated) makes every write durable before it
completes (``RWF_DSYNC``).

Migration: the transport migrates queues and features; the device adds the cache
mode and, for a memory disk, the memfd (so a memory disk needs a UNIX socket;
a file disk is opened by path at the destination, except by a handover's new
process, which takes the old one's descriptor: :meth:`VirtioBlk.inheritable_fds`).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import attrs

from pcidev.errors import ConfigError
from pcidev.properties import structure_config
from pcidev.vmstate import FdRef, vmstate
from pcidev.vmstate.errors import StateError
from pcidev_virtio.blk_backend import BlkBackend, FileBackend, MemoryBackend
from pcidev_virtio.blk_config import VirtioBlkConfig, config_space
from pcidev_virtio.blk_requests import BlkLimits, BlkRequestEngine
from pcidev_virtio.blk_spec import CONFIG_SIZE, WRITEBACK_OFFSET, BlkFeature
from pcidev_virtio.device import VirtioPciDevice
from pcidev_virtio.spec import Status, VirtioId
from pcidev_virtio.virtqueue import VirtqElement, Virtqueue

__all__ = ["VirtioBlk", "VirtioBlkConfig", "VirtioBlkState"]

#: used entries pushed before the device publishes them (one interrupt per batch)
_FLUSH_BATCH = 8


@vmstate("virtio-blk", version=1)
@attrs.frozen
class VirtioBlkState:
    """The block device's own state (the transport saves queues, features and status).

    :ivar writeback: the cache mode (config space ``writeback``).
    :ivar mem_fd: the memfd of a memory disk (its data), sent with the stream.
    """

    writeback: bool
    mem_fd: FdRef | None = None


def _open_backend(cfg: VirtioBlkConfig) -> BlkBackend:
    if cfg.file is not None:
        return FileBackend(cfg.file, cfg.size, read_only=cfg.readonly)
    assert cfg.size is not None  # VirtioBlkConfig requires file= or size=
    return MemoryBackend(cfg.size, read_only=cfg.readonly)


class VirtioBlk(VirtioPciDevice):
    """A virtio block device (see the module docstring).

    :param config: a :class:`VirtioBlkConfig`, a property string
        (``"file=/x.img,size=1G"``) or a mapping.
    :param name: device name in logs.
    :param props: the properties as keywords instead of ``config``.
    :raises ConfigError: a bad property, or the image cannot be opened or created.
    """

    TYPE_NAME = "virtio-blk"
    VIRTIO_DEVICE_ID: ClassVar[int] = VirtioId.BLOCK
    CONFIG_CLASS = VirtioBlkConfig
    VMSTATE = VirtioBlkState

    def __init__(self, config: VirtioBlkConfig | str | dict[str, Any] | None = None, *,
                 name: str | None = None, **props: Any) -> None:
        if props:
            if config is not None:
                raise ConfigError("virtio-blk: give the properties as config or as keywords, not both")
            config = props
        cfg = structure_config(VirtioBlkConfig, config, what="virtio-blk")
        backend = _open_backend(cfg)
        if backend.size % cfg.logical_block_size:
            backend.abandon()
            raise ConfigError(f"virtio-blk: the disk's {backend.size} bytes are not a multiple of "
                              f"logical_block_size={cfg.logical_block_size}")
        self.cfg = cfg
        #: the disk
        self.backend = backend
        #: carries out the requests
        self.engine = BlkRequestEngine(backend, serial=(cfg.serial or "").encode("ascii"), limits=BlkLimits(
            logical_block_size=cfg.logical_block_size,
            max_discard_sectors=cfg.max_discard_sectors, max_discard_seg=cfg.max_discard_seg,
            max_write_zeroes_sectors=cfg.max_write_zeroes_sectors, max_write_zeroes_seg=cfg.max_write_zeroes_seg))
        #: config space ``writeback``: the driver's choice of cache mode
        self.writeback = cfg.writeback
        try:
            super().__init__(name=name)
        except BaseException:
            backend.abandon()  # an image made for this device goes again
            raise

    # -- the virtio device type ---------------------------------------------------------------
    def device_features(self) -> int:
        """SEG_MAX, BLK_SIZE, TOPOLOGY, FLUSH, CONFIG_WCE; MQ with more than one queue; RO for a
        read-only disk, else DISCARD and WRITE_ZEROES as configured."""
        cfg = self.cfg
        bits = [BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.TOPOLOGY, BlkFeature.FLUSH,
                BlkFeature.CONFIG_WCE]
        if cfg.num_queues > 1:
            bits.append(BlkFeature.MQ)
        if cfg.readonly:
            bits.append(BlkFeature.RO)
        else:
            if cfg.discard:
                bits.append(BlkFeature.DISCARD)
            if cfg.write_zeroes:
                bits.append(BlkFeature.WRITE_ZEROES)
        return sum(1 << b for b in bits)

    def queue_max_sizes(self) -> tuple[int, ...]:
        """``num_queues`` request queues of ``queue_size`` entries."""
        return (self.cfg.queue_size,) * self.cfg.num_queues

    def device_config_size(self) -> int:
        """``struct virtio_blk_config``: 96 bytes."""
        return CONFIG_SIZE

    def device_config_read(self, offset: int, size: int) -> int:
        """A little-endian field (or part of one) of the configuration space."""
        if offset < 0 or size <= 0 or offset + size > CONFIG_SIZE:
            return 0
        raw = config_space(self.cfg, capacity_bytes=self.backend.size, writeback=self._config_writeback(),
                           may_unmap=True)
        return int.from_bytes(raw[offset:offset + size], "little")

    def device_config_write(self, offset: int, size: int, value: int) -> None:
        """The driver sets the cache mode (``writeback``, 0 or 1, with CONFIG_WCE); other writes are ignored."""
        # Only ``writeback`` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE (spec 5.2.4).
        if offset == WRITEBACK_OFFSET and size == 1 and self.negotiated(BlkFeature.CONFIG_WCE) and value in (0, 1):
            self.writeback = bool(value)
            self._sync_engine()

    def _config_writeback(self) -> bool:
        """The ``writeback`` field: once features are negotiated, write-back needs FLUSH
        (without it the device is write-through, spec 5.2.6.2)."""
        if not self.status & Status.FEATURES_OK:
            return self.writeback
        return self.writeback and self.negotiated(BlkFeature.FLUSH)

    def _sync_engine(self) -> None:
        """The engine follows the negotiated features and the cache mode."""
        engine = self.engine
        engine.discard = self.negotiated(BlkFeature.DISCARD)
        engine.write_zeroes = self.negotiated(BlkFeature.WRITE_ZEROES)
        engine.writeback = self.writeback and self.negotiated(BlkFeature.FLUSH)

    def driver_ok(self) -> None:
        """The engine takes the negotiated features."""
        self._sync_engine()

    def device_reset(self) -> None:
        """Back to the configured cache mode."""
        self.writeback = self.cfg.writeback
        self._sync_engine()

    def queue_notify(self, vq: Virtqueue) -> None:
        """Carry out every available request of the queue (``device.lock`` is held)."""
        self._sync_engine()
        self._process(vq)

    def _process(self, vq: Virtqueue) -> None:
        """Carry out every available request of ``vq``, publishing used entries in batches."""
        pending = 0
        try:
            while (elem := vq.pop()) is not None:
                vq.push(elem, self.engine.execute(elem))
                pending += 1
                if pending == _FLUSH_BATCH:
                    vq.flush()
                    pending = 0
        finally:
            if pending:
                vq.flush()

    def resubmit(self, vq: Virtqueue, elems: list[VirtqElement]) -> None:
        """Carry out the chains that were in flight at a migration source."""
        self._sync_engine()
        try:
            for elem in elems:
                vq.push(elem, self.engine.execute(elem))
        finally:
            vq.flush()

    # -- migration ---------------------------------------------------------------------------
    def device_fingerprint(self) -> dict[str, Any]:
        """Capacity, disk kind, read-only, block sizes, queue size, features and serial."""
        fp = dict(super().device_fingerprint())
        cfg = self.cfg
        fp.update({
            "virtio-blk.capacity": self.backend.size,
            "virtio-blk.backend": self.backend.kind,
            "virtio-blk.readonly": cfg.readonly,
            "virtio-blk.logical_block_size": cfg.logical_block_size,
            "virtio-blk.physical_block_size": cfg.physical_block_size or cfg.logical_block_size,
            "virtio-blk.queue_size": cfg.queue_size,
            "virtio-blk.num_queues": cfg.num_queues,
            "virtio-blk.features": self.device_features(),
            "virtio-blk.serial": cfg.serial or "",
        })
        return fp

    def inheritable_fds(self) -> dict[str, int]:
        """A file disk's image descriptor (a handover's new process takes it instead of
        reopening the path)."""
        return self.backend.inheritable_fds() if isinstance(self.backend, FileBackend) else {}

    def get_device_state(self) -> VirtioBlkState:
        """The cache mode and, for a memory disk, its memfd."""
        mem_fd = self.vmstate_fd(self.backend.fd) if isinstance(self.backend, MemoryBackend) else None
        return VirtioBlkState(writeback=self.writeback, mem_fd=mem_fd)

    def check_device_state(self, state: VirtioBlkState) -> None:
        """A memory disk needs its memfd, of the right size, with the stream.

        :raises StateError: it did not arrive, or does not fit.
        """
        memory = isinstance(self.backend, MemoryBackend)
        if state.mem_fd is not None and not memory:
            raise StateError("the stream carries a memory disk, this device has a file disk",
                             section="virtio-blk", path="mem_fd")
        if not memory:
            return
        fd = self.vmstate_load_fd(state.mem_fd)
        if fd is None:
            raise StateError("the memory disk's data did not arrive: a memory disk migrates only with "
                             "file descriptors (a UNIX socket)", section="virtio-blk", path="mem_fd")
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise StateError(f"the memory disk's descriptor: {exc.strerror}", section="virtio-blk",
                             path="mem_fd") from None
        if size != self.backend.size:
            raise StateError(f"the memory disk has {size} bytes, this device {self.backend.size}",
                             section="virtio-blk", path="mem_fd")

    def set_device_state(self, state: VirtioBlkState) -> None:
        """Take the cache mode, and a memory disk's memory from the source."""
        self.writeback = state.writeback
        fd = self.vmstate_load_fd(state.mem_fd)
        if isinstance(self.backend, MemoryBackend) and fd is not None and fd != self.backend.fd:
            old = self.backend
            self.backend = MemoryBackend(old.size, read_only=old.read_only, fd=fd)
            self.engine.backend = self.backend
            old.close()
        self._sync_engine()

    def on_close(self) -> None:
        """Close the disk."""
        super().on_close()
        self.backend.close()
