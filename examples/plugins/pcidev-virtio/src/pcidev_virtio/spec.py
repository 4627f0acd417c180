"""Constants and structure layouts of the virtio 1.x specification (OASIS virtio 1.2/1.3).

Names follow the specification and Linux's ``include/uapi/linux/virtio_pci.h``,
``virtio_ring.h`` and ``virtio_config.h``; every structure is little-endian.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "VIRTIO_PCI_VENDOR_ID", "VIRTIO_PCI_DEVICE_ID_BASE", "VIRTIO_PCI_REVISION", "VirtioId",
    "Status", "Feature", "TRANSPORT_FEATURES", "CfgType", "ISR_QUEUE", "ISR_CONFIG", "NO_VECTOR",
    "VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE", "VRING_DESC_F_INDIRECT", "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_USED_F_NO_NOTIFY", "DESC", "USED_ELEM", "DESC_SIZE", "USED_ELEM_SIZE", "MAX_QUEUE_SIZE",
    "CommonCfg", "COMMON_CFG_LENGTH", "PCI_CAP_LENGTH", "NOTIFY_CAP_LENGTH", "PCI_CFG_CAP_LENGTH",
    "desc_table_size", "avail_ring_size", "used_ring_size",
]

#: PCI vendor id of every virtio device (Red Hat, Inc.)
VIRTIO_PCI_VENDOR_ID = 0x1AF4
#: a modern (non-transitional) device's PCI device id is this plus its virtio device id
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
#: a non-transitional device has revision 1 or higher
VIRTIO_PCI_REVISION = 1


class VirtioId(enum.IntEnum):
    """Virtio device ids (spec 5, ``VIRTIO_ID_*``)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4


class Status(enum.IntFlag):
    """Device status bits (spec 2.1, ``VIRTIO_CONFIG_S_*``)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


class Feature(enum.IntEnum):
    """Reserved (transport and ring) feature bit numbers (spec 6, ``VIRTIO_F_*``)."""

    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40


#: the feature bits the transport offers on top of the device type's: split rings with
#: indirect descriptors and EVENT_IDX, as a modern (VERSION_1) device
TRANSPORT_FEATURES = (1 << Feature.RING_INDIRECT_DESC) | (1 << Feature.RING_EVENT_IDX) | (1 << Feature.VERSION_1)


class CfgType(enum.IntEnum):
    """``cfg_type`` of a virtio PCI capability (``VIRTIO_PCI_CAP_*``)."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5
    SHARED_MEMORY = 8
    VENDOR = 9


#: ISR status bit 0: a virtqueue interrupt
ISR_QUEUE = 0x1
#: ISR status bit 1: a device configuration change
ISR_CONFIG = 0x2
#: ``VIRTIO_MSI_NO_VECTOR``: no MSI-X vector is assigned
NO_VECTOR = 0xFFFF

#: descriptor flag ``VIRTQ_DESC_F_NEXT``: the chain continues in the ``next`` field
VRING_DESC_F_NEXT = 1
#: descriptor flag ``VIRTQ_DESC_F_WRITE``: the buffer is device-writable (else device-readable)
VRING_DESC_F_WRITE = 2
#: descriptor flag ``VIRTQ_DESC_F_INDIRECT``: the buffer is a table of descriptors
VRING_DESC_F_INDIRECT = 4
#: available ring flag ``VIRTQ_AVAIL_F_NO_INTERRUPT``: the driver asks for no interrupt
VRING_AVAIL_F_NO_INTERRUPT = 1
#: used ring flag ``VIRTQ_USED_F_NO_NOTIFY``: the device asks for no notification
VRING_USED_F_NO_NOTIFY = 1

#: ``struct virtq_desc``: addr (le64), len (le32), flags (le16), next (le16)
DESC = struct.Struct("<QIHH")
#: size in bytes of a ``struct virtq_desc`` (16)
DESC_SIZE = DESC.size
#: ``struct virtq_used_elem``: id (le32), len (le32)
USED_ELEM = struct.Struct("<II")
#: size in bytes of a ``struct virtq_used_elem`` (8)
USED_ELEM_SIZE = USED_ELEM.size
#: the largest split queue (spec 2.7: queue size up to 32768)
MAX_QUEUE_SIZE = 32768


class CommonCfg(enum.IntEnum):
    """Offsets in ``struct virtio_pci_common_cfg`` (spec 4.1.4.3)."""

    DEVICE_FEATURE_SELECT = 0
    DEVICE_FEATURE = 4
    DRIVER_FEATURE_SELECT = 8
    DRIVER_FEATURE = 12
    CONFIG_MSIX_VECTOR = 16
    NUM_QUEUES = 18
    DEVICE_STATUS = 20
    CONFIG_GENERATION = 21
    QUEUE_SELECT = 22
    QUEUE_SIZE = 24
    QUEUE_MSIX_VECTOR = 26
    QUEUE_ENABLE = 28
    QUEUE_NOTIFY_OFF = 30
    QUEUE_DESC = 32
    QUEUE_DRIVER = 40
    QUEUE_DEVICE = 48


#: bytes of the common configuration structure this device presents (up to queue_device:
#: queue_notify_data and queue_reset exist only with NOTIF_CONFIG_DATA / RING_RESET, not offered)
COMMON_CFG_LENGTH = 56
#: ``struct virtio_pci_cap``: vndr, next, len, cfg_type, bar, id, padding[2], offset (le32), length (le32)
PCI_CAP_LENGTH = 16
#: ``struct virtio_pci_notify_cap``: the cap and notify_off_multiplier (le32)
NOTIFY_CAP_LENGTH = 20
#: ``struct virtio_pci_cfg_cap``: the cap and pci_cfg_data[4]
PCI_CFG_CAP_LENGTH = 20


def desc_table_size(size: int) -> int:
    """Bytes of a descriptor table of ``size`` entries (alignment 16)."""
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """Bytes of a driver (available) ring: flags, idx, ring[size], used_event (alignment 2)."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """Bytes of a device (used) ring: flags, idx, ring[size], avail_event (alignment 4)."""
    return 6 + USED_ELEM_SIZE * size
