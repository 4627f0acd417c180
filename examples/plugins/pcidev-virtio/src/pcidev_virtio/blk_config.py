"""The properties of a virtio-blk device (``pcidev describe virtio-blk``) and its config space.

Examples (``pcidev serve --vfio-user SOCK virtio-blk,...``)::

    virtio-blk,file=/srv/disk.img                 an existing image (any size, a multiple of 512)
    virtio-blk,file=/srv/new.img,size=1G          created sparse when missing; never truncated
    virtio-blk,file=/srv/disk.img,readonly=on     VIRTIO_BLK_F_RO: every write fails
    virtio-blk,size=64M,serial=disk0              a memory disk (its memory follows a migration)
"""

from __future__ import annotations

from typing import Any

import attrs

from pcidev.errors import ConfigError
from pcidev.properties import Size
from pcidev_virtio.blk_spec import CONFIG, ID_BYTES, SECTOR_SHIFT

__all__ = ["MAX_REQUEST_QUEUES", "VirtioBlkConfig", "config_space"]

#: The most request queues a device may have (each has its own MSI-X vector).
MAX_REQUEST_QUEUES = 64


def _block_size(inst: Any, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (value < 512 or value > 65536 or value & (value - 1)):
        raise ConfigError(f"{attr.name}={value} must be a power of two from 512 to 64k")


def _serial(inst: Any, attr: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and (not value.isascii() or not value.isprintable() or len(value) > ID_BYTES):
        raise ConfigError(f"serial={value!r} must be at most {ID_BYTES} printable ASCII characters")


def _positive_u32(inst: Any, attr: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= 0xFFFFFFFF:
        raise ConfigError(f"{attr.name}={value} must be from 1 to 0xffffffff")


def _num_queues(inst: Any, attr: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= MAX_REQUEST_QUEUES:
        raise ConfigError(f"num_queues={value} must be from 1 to {MAX_REQUEST_QUEUES}")


def _queue_size(inst: Any, attr: attrs.Attribute[int], value: int) -> None:
    if not 4 <= value <= 32768 or value & (value - 1):
        raise ConfigError(f"queue_size={value} must be a power of two from 4 to 32768")


@attrs.define(kw_only=True)
class VirtioBlkConfig:
    """Properties of a virtio-blk device.

    Either ``file`` (an image; ``size`` creates it when missing) or ``size`` alone (a
    memory disk) must be given.
    """

    file: str | None = attrs.field(default=None, metadata={
        "help": "the image file or block device (created sparse when missing and size= is given; "
                "an existing file is never truncated or resized)"})
    size: Size | None = attrs.field(default=None, metadata={
        "help": "bytes, a multiple of 512 and of logical_block_size: creates a missing file, must match "
                "an existing one; without file=, the size of a memory disk"})
    readonly: bool = attrs.field(default=False, metadata={
        "help": "offer VIRTIO_BLK_F_RO and fail every write"})
    serial: str | None = attrs.field(default=None, validator=_serial, metadata={
        "help": "the GET_ID string (up to 20 printable ASCII characters; /sys/block/vdX/serial); "
                "none: 20 NUL bytes"})
    logical_block_size: Size = attrs.field(default=Size(512), validator=_block_size, metadata={
        "help": "bytes per logical block (blk_size): 512..64k, a power of two"})
    physical_block_size: Size | None = attrs.field(default=None, validator=_block_size, metadata={
        "help": "bytes per physical block (topology); default: the logical block size"})
    writeback: bool = attrs.field(default=True, metadata={
        "help": "the write cache starts write-back (writes durable after a flush); off: write-through "
                "(every write durable when it completes); the driver may switch it (CONFIG_WCE)"})
    discard: bool = attrs.field(default=True, metadata={"help": "offer VIRTIO_BLK_F_DISCARD"})
    write_zeroes: bool = attrs.field(default=True, metadata={"help": "offer VIRTIO_BLK_F_WRITE_ZEROES"})
    max_discard_sectors: int = attrs.field(default=1 << 22, validator=_positive_u32, metadata={
        "help": "most 512-byte sectors in one discard segment"})
    max_discard_seg: int = attrs.field(default=32, validator=_positive_u32, metadata={
        "help": "most segments in one discard request"})
    max_write_zeroes_sectors: int = attrs.field(default=1 << 22, validator=_positive_u32, metadata={
        "help": "most 512-byte sectors in one write-zeroes segment"})
    max_write_zeroes_seg: int = attrs.field(default=32, validator=_positive_u32, metadata={
        "help": "most segments in one write-zeroes request"})
    queue_size: int = attrs.field(default=256, validator=_queue_size, metadata={
        "help": "entries of each request queue (seg_max is two less)"})
    num_queues: int = attrs.field(default=1, validator=_num_queues, metadata={
        "help": "request queues; more than one offers VIRTIO_BLK_F_MQ (Linux uses at most one per CPU)"})

    def __attrs_post_init__(self) -> None:
        if self.file is None and self.size is None:
            raise ConfigError("give file=PATH (an image) or size=N (a memory disk)")
        if self.file == "":
            raise ConfigError("file= is empty")
        lbs = self.logical_block_size
        if self.physical_block_size is not None and self.physical_block_size < lbs:
            raise ConfigError(f"physical_block_size={self.physical_block_size} is smaller than "
                              f"logical_block_size={lbs}")
        if self.size is not None and (self.size == 0 or self.size % lbs):
            raise ConfigError(f"size={self.size} must be a positive multiple of logical_block_size={lbs}")

    @property
    def physical_block_exp(self) -> int:
        """log2(physical / logical block size) (the topology field)."""
        phys = self.physical_block_size or self.logical_block_size
        return (phys // self.logical_block_size).bit_length() - 1

    @property
    def discard_sector_alignment(self) -> int:
        """Sectors a discard is best aligned to (the physical block)."""
        return (self.physical_block_size or self.logical_block_size) >> SECTOR_SHIFT


def config_space(cfg: VirtioBlkConfig, *, capacity_bytes: int, writeback: bool, may_unmap: bool) -> bytes:
    """The device configuration space (:data:`pcidev_virtio.blk_spec.CONFIG`, 96 bytes).

    Fields of features the device does not offer are zero (the driver reads them only
    when the feature is negotiated).

    :param cfg: the properties.
    :param capacity_bytes: the disk's size.
    :param writeback: the current cache mode.
    :param may_unmap: a write-zeroes with UNMAP may deallocate.
    :returns: the bytes, little-endian.
    """
    return CONFIG.pack(
        capacity_bytes >> SECTOR_SHIFT,
        0,                                  # size_max: not offered (no limit per segment)
        cfg.queue_size - 2,                 # seg_max: a chain holds the header and status too
        0, 0, 0,                            # geometry: not offered
        cfg.logical_block_size,
        cfg.physical_block_exp, 0,          # topology: physical block, alignment_offset 0,
        1 << cfg.physical_block_exp, 0,     # min_io_size one physical block, opt_io_size none
        int(writeback),
        cfg.num_queues,
        cfg.max_discard_sectors, cfg.max_discard_seg, cfg.discard_sector_alignment,
        cfg.max_write_zeroes_sectors, cfg.max_write_zeroes_seg, int(may_unmap),
        0, 0, 0,                            # secure erase: not offered
    )
