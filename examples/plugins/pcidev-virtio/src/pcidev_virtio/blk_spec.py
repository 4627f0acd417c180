"""The virtio block device's numbers and wire structures (virtio 1.2 section 5.2).

Values as in OASIS virtio 1.x and Linux ``include/uapi/linux/virtio_blk.h``;
every structure is little-endian (the modern transport has no native-endian
fields) and packed.

Request (one descriptor chain; the device must not assume any framing, so every
part may be split across descriptors at any byte)::

    driver -> device   struct virtio_blk_outhdr   le32 type, le32 ioprio, le64 sector
                       data (OUT), or virtio_blk_discard_write_zeroes[] (DISCARD, WRITE_ZEROES)
    device -> driver   data (IN, GET_ID)
                       u8 status                  the last byte of the device-writable part

Device configuration space (:data:`CONFIG`, 96 bytes)::

    0x00 le64 capacity (512-byte sectors)     0x24 le32 max_discard_sectors
    0x08 le32 size_max                        0x28 le32 max_discard_seg
    0x0c le32 seg_max                         0x2c le32 discard_sector_alignment
    0x10 le16 cylinders, u8 heads, u8 sectors 0x30 le32 max_write_zeroes_sectors
    0x14 le32 blk_size                        0x34 le32 max_write_zeroes_seg
    0x18 u8 physical_block_exp                0x38 u8 write_zeroes_may_unmap, u8[3]
    0x19 u8 alignment_offset                  0x3c le32 max_secure_erase_sectors
    0x1a le16 min_io_size                     0x40 le32 max_secure_erase_seg
    0x1c le32 opt_io_size                     0x44 le32 secure_erase_sector_alignment
    0x20 u8 writeback, u8 unused              0x48 zoned characteristics (24 bytes)
    0x22 le16 num_queues
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "CONFIG",
    "CONFIG_FIELDS",
    "CONFIG_SIZE",
    "DWZ_SEGMENT",
    "ID_BYTES",
    "OUTHDR",
    "SECTOR_SHIFT",
    "WRITEBACK_OFFSET",
    "WRITE_ZEROES_FLAG_UNMAP",
    "BlkFeature",
    "BlkStatus",
    "BlkType",
]

#: Sectors are 512 bytes, whatever the block size.
SECTOR_SHIFT = 9

#: Length of the GET_ID string (NUL-padded, not necessarily NUL-terminated).
ID_BYTES = 20


class BlkFeature(enum.IntEnum):
    """Device feature bits of the block device (bit numbers)."""

    SIZE_MAX = 1        #: size_max is the largest segment
    SEG_MAX = 2         #: seg_max is the most segments per request
    GEOMETRY = 4        #: legacy geometry in config
    RO = 5              #: the disk is read-only
    BLK_SIZE = 6        #: blk_size is the logical block size
    FLUSH = 9           #: VIRTIO_BLK_T_FLUSH (the spec's old name: WCE)
    TOPOLOGY = 10       #: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    CONFIG_WCE = 11     #: writeback is in config space and writable
    MQ = 12             #: num_queues request queues
    DISCARD = 13        #: VIRTIO_BLK_T_DISCARD
    WRITE_ZEROES = 14   #: VIRTIO_BLK_T_WRITE_ZEROES
    LIFETIME = 15       #: VIRTIO_BLK_T_GET_LIFETIME
    SECURE_ERASE = 16   #: VIRTIO_BLK_T_SECURE_ERASE
    ZONED = 17          #: zoned block device


class BlkType(enum.IntEnum):
    """Request types (``virtio_blk_outhdr.type``)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus(enum.IntEnum):
    """The status byte a request completes with."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


#: ``struct virtio_blk_outhdr``: type, ioprio (reserved in 1.x), sector.
OUTHDR = struct.Struct("<IIQ")

#: ``struct virtio_blk_discard_write_zeroes``: sector, num_sectors, flags.
DWZ_SEGMENT = struct.Struct("<QII")

#: The only flag of a write-zeroes segment: the range may be deallocated.
WRITE_ZEROES_FLAG_UNMAP = 0x1

#: ``struct virtio_blk_config`` (packed, little-endian), the zoned part as padding.
CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3xIII24x")

#: Size of the device configuration space.
CONFIG_SIZE = CONFIG.size

#: Field names of :data:`CONFIG`, in order (the unpacked tuple's names).
CONFIG_FIELDS = (
    "capacity", "size_max", "seg_max", "cylinders", "heads", "sectors", "blk_size",
    "physical_block_exp", "alignment_offset", "min_io_size", "opt_io_size", "writeback",
    "num_queues", "max_discard_sectors", "max_discard_seg", "discard_sector_alignment",
    "max_write_zeroes_sectors", "max_write_zeroes_seg", "write_zeroes_may_unmap",
    "max_secure_erase_sectors", "max_secure_erase_seg", "secure_erase_sector_alignment",
)

#: Byte offset of ``writeback`` (the one field a driver writes).
WRITEBACK_OFFSET = 0x20
