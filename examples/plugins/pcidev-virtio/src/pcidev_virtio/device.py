"""The virtio 1.x modern PCI transport (spec 4.1): :class:`VirtioPciDevice`.

A virtio device type subclasses :class:`VirtioPciDevice`, sets its virtio device id
and queue sizes, and answers queue notifications::

    class VirtioRng(VirtioPciDevice):
        TYPE_NAME = "virtio-rng"
        VIRTIO_DEVICE_ID = VirtioId.RNG
        QUEUE_SIZES = (256,)

        def queue_notify(self, vq):                 # device.lock is held
            while (elem := vq.pop()) is not None:
                ...
                vq.push(elem, written)
            vq.flush()

Identity: vendor 0x1AF4, device id 0x1040 + the virtio device id, revision 1
(non-transitional), subsystem 0x1AF4:0x1100; no legacy I/O BAR.

Layout: BAR1 (32-bit, 4 KiB) holds the MSI-X table (0x000) and PBA (0x800), with one
vector for configuration changes and one per queue; BAR4 (64-bit, 16 KiB) holds the
virtio structures, each announced by a vendor-specific capability
(:mod:`pcidev_virtio.capabilities`)::

    0x0000  common configuration   (56 bytes: struct virtio_pci_common_cfg up to queue_device)
    0x1000  ISR status             (1 byte; reading clears it and deasserts INTx)
    0x2000  device configuration   (the device type's, DEVICE_CONFIG_SIZE bytes; no cap if 0)
    0x3000  notifications          (notify_off_multiplier 4; queue i at 0x3000 + 4*i)

plus a PCI configuration access capability (``VIRTIO_PCI_CAP_PCI_CFG``), and Power
Management and PCI Express capabilities (FLR resets the virtio device too).

The transport owns: the device status and its state machine, feature negotiation in
32-bit windows (``VIRTIO_F_VERSION_1`` required; features not offered refused at
``FEATURES_OK``), the queues' configuration (:class:`~pcidev_virtio.virtqueue.Virtqueue`),
MSI-X vector assignment (``VIRTIO_MSI_NO_VECTOR`` when a vector does not exist), the ISR
and INTx when MSI-X is off, ``config_generation``, and reset (writing 0 to
``device_status``; it reads back 0 once done, at once here). A queue the driver
misconfigures or a malformed ring sets ``DEVICE_NEEDS_RESET`` (and, after ``DRIVER_OK``,
sends a configuration change notification); no guest input makes an exception leave
the device.

Accesses to the common configuration must be the width of the field (64-bit fields
may be written as two 32-bit halves, or as one 64-bit access); other accesses read 0
and are ignored, as are accesses to offsets holding no field.

Migration: the transport's state is the ``virtio-pci`` layer section
(:attr:`pcidev.PciDevice.LAYER_VMSTATE`, :class:`VirtioPciState`): status, features,
selectors, ISR, ``config_generation``, the configuration vector and every queue
(configuration, ``last_avail_idx``, used index, in-flight heads). A device type saves only
its own state with the usual ``get_device_state`` hooks. On the destination the chains in
flight at the source are read again from guest memory when the device resumes and handed
to :meth:`VirtioPciDevice.resubmit`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import attrs

from pcidev import ConfigError, PciDevice, ResetKind, StateError
from pcidev.bar import CallbackHandler, RegisterMap
from pcidev.ratelog import RateLimitedLog
from pcidev.regions import RegionMap
from pcidev.vmstate import U8, U16, U32, U64, VarArray, vmstate
from pcidev_virtio import spec
from pcidev_virtio.capabilities import VirtioNotifyCap, VirtioPciCap, VirtioPciCfgCap
from pcidev_virtio.errors import VirtqueueError
from pcidev_virtio.virtqueue import VirtqElement, Virtqueue, VirtqueueState

__all__ = [
    "VirtioPciDevice", "VirtioPciState", "MSIX_BAR", "VIRTIO_BAR", "COMMON_OFFSET", "ISR_OFFSET",
    "DEVICE_OFFSET", "NOTIFY_OFFSET", "NOTIFY_MULTIPLIER", "MAX_QUEUES", "MAX_MSIX_QUEUES",
]

log = logging.getLogger(__name__)

#: the BAR of the MSI-X table (0x000) and PBA (0x800)
MSIX_BAR = 1
#: the BAR of the virtio structures
VIRTIO_BAR = 4
VIRTIO_BAR_SIZE = 0x4000
#: offset in the virtio BAR of the common configuration structure (VIRTIO_PCI_CAP_COMMON_CFG)
COMMON_OFFSET = 0x0000
#: offset in the virtio BAR of the ISR status byte (VIRTIO_PCI_CAP_ISR_CFG)
ISR_OFFSET = 0x1000
#: offset in the virtio BAR of the device-specific configuration (VIRTIO_PCI_CAP_DEVICE_CFG)
DEVICE_OFFSET = 0x2000
#: offset in the virtio BAR of the queue notification area (VIRTIO_PCI_CAP_NOTIFY_CFG)
NOTIFY_OFFSET = 0x3000
REGION_SIZE = 0x1000
#: bytes between two queues' notification addresses
NOTIFY_MULTIPLIER = 4
#: the most queues the notification area has room for
MAX_QUEUES = REGION_SIZE // NOTIFY_MULTIPLIER
#: most queues a device type may have: MSI-X table (at 0x000, before the PBA at 0x800)
#: holds 128 vectors, one per queue and one for configuration changes
MAX_MSIX_QUEUES = 0x800 // 16 - 1
_MASK32 = 0xFFFFFFFF
#: a common configuration field: (width, getter, setter or None for a read-only field)
_Field = tuple[int, Callable[[], int], Callable[[int], None] | None]
_STATUS = spec.CommonCfg.DEVICE_STATUS


@vmstate("virtio-pci", version=1)
@attrs.frozen
class VirtioPciState:
    """The transport's state (the ``virtio-pci`` layer section of a virtio device's stream).

    :ivar status: ``device_status``.
    :ivar device_feature_select: the device feature window selected.
    :ivar driver_feature_select: the driver feature window selected.
    :ivar driver_features: the features the driver accepted (all 64 bits).
    :ivar config_msix_vector: the configuration change vector.
    :ivar queue_select: the selected queue.
    :ivar config_generation: ``config_generation``.
    :ivar isr: the ISR status bits not yet read.
    :ivar queues: every queue, by index.
    """

    status: U8
    device_feature_select: U32
    driver_feature_select: U32
    driver_features: U64
    config_msix_vector: U16
    queue_select: U16
    config_generation: U8
    isr: U8
    queues: VarArray[VirtqueueState, MAX_QUEUES]


def _queue_reject(reject: Callable[[str, str], StateError], index: int, message: str, field: str) -> StateError:
    return reject(message, f"queues[{index}].{field}")


class VirtioPciDevice(PciDevice):
    """Base class of virtio devices over the modern PCI transport.

    Subclasses set :attr:`VIRTIO_DEVICE_ID`, :attr:`QUEUE_SIZES` and
    :attr:`DEVICE_CONFIG_SIZE` (or override :meth:`queue_max_sizes` /
    :meth:`device_config_size` when they depend on properties: those are called once, when
    the device is described, so set what they read before calling ``super().__init__``),
    and override :meth:`queue_notify` and the other hooks below. The transport's state is
    migrated by the transport; a subclass declaring ``MIGRATABLE_FEATURES`` keeps the
    transport's: ``VirtioPciDevice.MIGRATABLE_FEATURES | {...}``. A subclass that needs more
    in its description (another capability, a worker) overrides :meth:`describe` and calls
    ``super().describe()`` first; one that overrides :meth:`resume` or ``on_resume()`` calls
    the base class's too.

    :param name: device name in logs.
    """

    #: the virtio device id (:class:`~pcidev_virtio.spec.VirtioId`): 4 entropy, 2 block...
    VIRTIO_DEVICE_ID: ClassVar[int] = 0
    #: the largest size of each queue (powers of two); their number is the queue count
    QUEUE_SIZES: ClassVar[tuple[int, ...]] = ()
    #: bytes of the device-specific configuration structure (0: none)
    DEVICE_CONFIG_SIZE: ClassVar[int] = 0
    VENDOR_ID = spec.VIRTIO_PCI_VENDOR_ID
    REVISION = spec.VIRTIO_PCI_REVISION
    SUBSYSTEM_VENDOR_ID = spec.VIRTIO_PCI_VENDOR_ID
    SUBSYSTEM_ID = 0x1100
    LAYER_VMSTATE = VirtioPciState
    #: the transport's capabilities keep all their state in configuration space, which the
    #: framework migrates; a device type adds its own features to these
    MIGRATABLE_FEATURES = frozenset({"cap:VirtioPciCap", "cap:VirtioNotifyCap", "cap:VirtioPciCfgCap"})

    def __init__(self, *, name: str | None = None) -> None:
        self._bad_access = RateLimitedLog(log)
        #: warnings a guest can trigger once per request (malformed requests, failed I/O)
        self.guest_error = RateLimitedLog(log)
        #: ``device_status``
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        #: the features the driver wrote (accepted once ``FEATURES_OK`` stuck)
        self.driver_features = 0
        self.config_msix_vector = spec.NO_VECTOR
        self.queue_select = 0
        #: ``config_generation`` (8 bits, wraps)
        self.config_generation = 0
        #: ISR status bits not yet read by the driver
        self.isr = 0
        #: a migration loaded chains in flight: resubmit them when the device resumes
        self._resubmit_pending = False
        #: the guest-memory layout the queues last worked with (set at DRIVER_OK, grown on
        #: resume): while memory is smaller than that, the host is remapping it
        self._working_layout: frozenset[tuple[int, int]] = frozenset()
        super().__init__(name=name)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.VIRTIO_DEVICE_ID:  # the modern PCI device id follows from the virtio id (spec 4.1.2)
            cls.DEVICE_ID = spec.VIRTIO_PCI_DEVICE_ID_BASE + cls.VIRTIO_DEVICE_ID

    # -- what a device type provides ----------------------------------------------------------
    def queue_max_sizes(self) -> tuple[int, ...]:
        """The largest size of each queue (default :attr:`QUEUE_SIZES`)."""
        return self.QUEUE_SIZES

    def device_config_size(self) -> int:
        """Bytes of the device configuration structure (default :attr:`DEVICE_CONFIG_SIZE`)."""
        return self.DEVICE_CONFIG_SIZE

    def device_features(self) -> int:
        """Override: the device-type feature bits offered (bits 0..23, and any the type
        implements above); the transport adds :data:`~pcidev_virtio.spec.TRANSPORT_FEATURES`.

        :returns: a bit mask.
        """
        return 0

    def validate_features(self, features: int) -> bool:
        """Override: whether the device accepts this combination of features the driver
        chose (all offered, ``VERSION_1`` included: the transport checked that). Called
        when the driver sets ``FEATURES_OK``.

        :param features: the driver's feature bits.
        :returns: False to refuse (``FEATURES_OK`` then stays clear).
        """
        return True

    def device_config_read(self, offset: int, size: int) -> int:
        """Override: read ``size`` bytes at ``offset`` of the device configuration (inside
        :meth:`device_config_size`).

        :returns: the little-endian value.
        """
        return 0

    def device_config_write(self, offset: int, size: int, value: int) -> None:
        """Override: the driver wrote the device configuration (inside its size)."""

    def queue_notify(self, vq: Virtqueue) -> None:
        """Override: the driver made buffers available in ``vq`` (called with
        ``device.lock`` held, only after ``DRIVER_OK``, never while ``DEVICE_NEEDS_RESET``).
        A :class:`~pcidev_virtio.errors.VirtqueueError` raised here sets
        ``DEVICE_NEEDS_RESET``; a worker thread handling the queue calls
        :meth:`set_needs_reset` itself.

        :param vq: the queue.
        """

    def device_reset(self) -> None:
        """Override: reset the device type's state (the driver wrote 0 to the status, or
        a PCI reset). Queues, features and interrupts are already reset."""

    def driver_ok(self) -> None:
        """Override: the driver set ``DRIVER_OK`` (enabled queues are then notified once,
        for buffers made available before)."""

    def resubmit(self, vq: Virtqueue, elems: list[VirtqElement]) -> None:
        """Override: after a migration, the chains that were in flight at the source
        (taken, not returned) must be processed again; they are in flight here too. The
        default returns each with nothing written.

        :param vq: the queue.
        :param elems: the chains, in the order the source took them.
        """
        for elem in elems:
            vq.push(elem, 0)
        vq.flush()

    # -- what the transport provides -----------------------------------------------------------
    @property
    def queues(self) -> list[Virtqueue]:
        """The device's queues, by index."""
        return self._queues

    def offered_features(self) -> int:
        """Every feature bit the device offers (device type's and transport's)."""
        return self.device_features() | spec.TRANSPORT_FEATURES

    def negotiated(self, bit: int) -> bool:
        """Whether feature ``bit`` was accepted (the driver set it and ``FEATURES_OK`` stuck)."""
        return bool(self.status & spec.Status.FEATURES_OK) and bool(self.driver_features >> bit & 1)

    def config_changed(self) -> None:
        """The device configuration changed: bump ``config_generation`` and, after
        ``DRIVER_OK``, send a configuration change notification."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            if self.status & spec.Status.DRIVER_OK:
                self._config_interrupt()

    def _layout(self) -> frozenset[tuple[int, int]]:
        mem = self.memory
        return frozenset((r.gpa, r.size) for r in mem.regions()) if mem is not None else frozenset()

    def queue_error(self, vq: Virtqueue, exc: VirtqueueError) -> bool:
        """Answer a :class:`~pcidev_virtio.errors.VirtqueueError` met while serving ``vq``: ``DEVICE_NEEDS_RESET``,
        unless bus mastering is off (the device may not reach the rings at all: the next
        notification after the driver sets it looks again), or guest memory is being
        remapped (the queue's rings are not mapped, or memory lacks regions the queues
        worked with). A host remaps guest memory piecewise (QEMU's
        vfio-user client unmaps RAM and maps it back when the BIOS area changes, and
        firmware may notify in between); nothing was taken from the ring, and the device
        looks at every queue again when it resumes after the next map (:meth:`resume`).
        Call it with ``device.lock`` held.

        :param vq: the queue.
        :param exc: what was wrong.
        :returns: True when the queue waits for the next map instead.
        """
        if not self.bus_master:  # DMA refused: the guest's rings are not at fault
            self.log.info("queue %d: bus mastering is off (%s); looked at again on the next notification",
                          vq.index, exc)
            return True
        if vq.check_config() is not None or not self._layout() >= self._working_layout:
            self.log.info("queue %d: guest memory is being remapped (%s); looked at again on resume", vq.index, exc)
            return True
        self.set_needs_reset(str(exc))
        return False

    def set_needs_reset(self, reason: str) -> None:
        """Enter ``DEVICE_NEEDS_RESET`` (spec 2.1.2): queues stop until the driver resets
        the device; after ``DRIVER_OK`` the driver gets a configuration change notification.

        :param reason: what went wrong (logged once).
        """
        with self.lock:
            if self.status & spec.Status.DEVICE_NEEDS_RESET:
                return
            self.log.warning("DEVICE_NEEDS_RESET: %s", reason)
            self.status = int(self.status | spec.Status.DEVICE_NEEDS_RESET)
            if self.status & spec.Status.DRIVER_OK:
                self._config_interrupt()

    @property
    def running(self) -> bool:
        """``DRIVER_OK`` is set and ``DEVICE_NEEDS_RESET`` is not: queues may be used."""
        return self.status & (spec.Status.DRIVER_OK | spec.Status.DEVICE_NEEDS_RESET) == spec.Status.DRIVER_OK

    def queue_interrupt(self, vq: Virtqueue) -> None:
        """Send a used buffer notification for ``vq``: its MSI-X vector (none if
        ``NO_VECTOR``), or the ISR queue bit and INTx when MSI-X is off."""
        if self.irq.mode == "msix":
            if vq.msix_vector != spec.NO_VECTOR:
                self.irq.notify(vq.msix_vector)
        else:
            self._raise_isr(spec.ISR_QUEUE)

    def _config_interrupt(self) -> None:
        if self.irq.mode == "msix":
            if self.config_msix_vector != spec.NO_VECTOR:
                self.irq.notify(self.config_msix_vector)
        else:
            self._raise_isr(spec.ISR_CONFIG)

    def _raise_isr(self, bit: int) -> None:
        self.isr |= bit
        self.irq.set_intx(True)

    # -- description ------------------------------------------------------------------------------
    def describe(self) -> None:
        """Declare the BARs, the virtio capabilities, MSI-X (one vector more than queues) and
        the PM and PCI Express capabilities, and build the queues."""
        sizes = tuple(self.queue_max_sizes())
        if not 1 <= len(sizes) <= MAX_MSIX_QUEUES:
            raise ConfigError(f"{type(self).__name__}: {len(sizes)} queues (1..{MAX_MSIX_QUEUES} supported: "
                              "one MSI-X vector each and one for configuration changes)")
        self._queues = [Virtqueue(self, i, size) for i, size in enumerate(sizes)]
        config_size = self.device_config_size()
        if not 0 <= config_size <= REGION_SIZE:
            raise ConfigError(f"device configuration of {config_size} bytes does not fit {REGION_SIZE}")
        self._config_size = config_size
        regions = RegionMap(VIRTIO_BAR_SIZE, name=f"{self.name}-virtio")
        regions.add("common", COMMON_OFFSET, REGION_SIZE, CallbackHandler(self._common_access))
        regions.add("isr", ISR_OFFSET, REGION_SIZE, CallbackHandler(self._isr_access))
        regions.add("device", DEVICE_OFFSET, REGION_SIZE, CallbackHandler(self._device_cfg_access))
        regions.add("notify", NOTIFY_OFFSET, REGION_SIZE, CallbackHandler(self._notify_access))
        self.virtio_regions = regions
        self.add_mem_bar(MSIX_BAR, 0x1000, RegisterMap(0x1000, name=f"{self.name}-msix"))
        self.add_mem_bar(VIRTIO_BAR, VIRTIO_BAR_SIZE, regions, bits64=True)
        self.add_capability(VirtioPciCap(spec.CfgType.COMMON, VIRTIO_BAR, COMMON_OFFSET, spec.COMMON_CFG_LENGTH))
        self.add_capability(VirtioNotifyCap(VIRTIO_BAR, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * len(sizes),
                                            NOTIFY_MULTIPLIER))
        self.add_capability(VirtioPciCap(spec.CfgType.ISR, VIRTIO_BAR, ISR_OFFSET, 1))
        if config_size:
            self.add_capability(VirtioPciCap(spec.CfgType.DEVICE, VIRTIO_BAR, DEVICE_OFFSET, config_size))
        self.add_capability(VirtioPciCfgCap(self._window_access))
        self.add_msix(len(sizes) + 1, bar=MSIX_BAR, table_offset=0x000, pba_offset=0x800)
        self.add_standard_pcie_caps(aer=False)
        self._common_fields = self._build_common_fields()

    # -- BAR regions --------------------------------------------------------------------------------
    def _window_access(self, bar: int, offset: int, size: int, is_write: bool, value: int) -> int:
        """The PCI configuration access capability's BAR access."""
        if is_write:
            self.bar_write(bar, offset, size, value, check_decode=False)
            return 0
        return self.bar_read(bar, offset, size, check_decode=False)

    def _isr_access(self, offset: int, size: int, is_write: bool, value: int) -> int:
        if is_write or offset != 0:
            return 0
        isr, self.isr = self.isr, 0
        if isr:
            self.irq.set_intx(False)
        return isr

    def _device_cfg_access(self, offset: int, size: int, is_write: bool, value: int) -> int:
        if offset + size > self._config_size:
            self._bad_access("%s: device configuration access %#x+%d outside its %d bytes", self.name, offset,
                             size, self._config_size)
            return 0
        if is_write:
            self.device_config_write(offset, size, value)
            return 0
        return self.device_config_read(offset, size)

    def _notify_access(self, offset: int, size: int, is_write: bool, value: int) -> int:
        if not is_write:
            return 0
        index = offset // NOTIFY_MULTIPLIER
        if index >= len(self._queues):
            self._bad_access("%s: notification for queue %d, which does not exist", self.name, index)
            return 0
        vq = self._queues[index]
        if not (vq.enabled and self.running and self.bus_master):
            return 0
        with self.lock:
            self._kick(vq)
        return 0

    def _kick(self, vq: Virtqueue) -> None:
        """:meth:`queue_notify`, with the transport's answer to a :class:`VirtqueueError`:
        :meth:`queue_error` (``DEVICE_NEEDS_RESET``, or wait while guest memory is remapped)."""
        try:
            self.queue_notify(vq)
        except VirtqueueError as exc:
            self.queue_error(vq, exc)

    # -- common configuration -----------------------------------------------------------------------
    def _selected(self) -> Virtqueue | None:
        sel = self.queue_select
        return self._queues[sel] if sel < len(self._queues) else None

    def _build_common_fields(self) -> dict[int, _Field]:
        """The fields of the common configuration: offset -> (width, getter, setter or None)."""
        c = spec.CommonCfg
        fields: dict[int, _Field] = {
            c.DEVICE_FEATURE_SELECT: (4, lambda: self.device_feature_select,
                                      lambda v: setattr(self, "device_feature_select", v)),
            c.DEVICE_FEATURE: (4, self._device_feature_window, None),
            c.DRIVER_FEATURE_SELECT: (4, lambda: self.driver_feature_select,
                                      lambda v: setattr(self, "driver_feature_select", v)),
            c.DRIVER_FEATURE: (4, self._driver_feature_window, self._set_driver_feature_window),
            c.CONFIG_MSIX_VECTOR: (2, lambda: self.config_msix_vector,
                                   lambda v: setattr(self, "config_msix_vector", self._valid_vector(v))),
            c.NUM_QUEUES: (2, lambda: len(self._queues), None),
            c.DEVICE_STATUS: (1, lambda: self.status, self._write_status),
            c.CONFIG_GENERATION: (1, lambda: self.config_generation, None),
            c.QUEUE_SELECT: (2, lambda: self.queue_select, lambda v: setattr(self, "queue_select", v)),
            c.QUEUE_SIZE: (2, self._queue_size, self._set_queue_size),
            c.QUEUE_MSIX_VECTOR: (2, self._queue_vector, self._set_queue_vector),
            c.QUEUE_ENABLE: (2, self._queue_enable, self._set_queue_enable),
            c.QUEUE_NOTIFY_OFF: (2, lambda: vq.index if (vq := self._selected()) else 0, None),
        }
        for base, attr in ((c.QUEUE_DESC, "desc"), (c.QUEUE_DRIVER, "driver"), (c.QUEUE_DEVICE, "device")):
            for half in (0, 1):
                fields[base + 4 * half] = (4, self._addr_getter(attr, half), self._addr_setter(attr, half))
        return fields

    def _common_access(self, offset: int, size: int, is_write: bool, value: int) -> int:
        if size == 8 and offset in (spec.CommonCfg.QUEUE_DESC, spec.CommonCfg.QUEUE_DRIVER,
                                    spec.CommonCfg.QUEUE_DEVICE):
            lo = self._common_access(offset, 4, is_write, value & _MASK32)
            hi = self._common_access(offset + 4, 4, is_write, value >> 32)
            return lo | hi << 32
        field = self._common_fields.get(offset)
        if field is None or field[0] != size:
            self._bad_access("%s: common configuration %s of %d bytes at %#x matches no field", self.name,
                             "write" if is_write else "read", size, offset)
            return 0
        _width, getter, setter = field
        if not is_write:
            return int(getter())
        if setter is not None:
            setter(value)
        return 0

    def _device_feature_window(self) -> int:
        sel = self.device_feature_select
        return (self.offered_features() >> (32 * sel)) & _MASK32 if sel < 2 else 0

    def _driver_feature_window(self) -> int:
        sel = self.driver_feature_select
        return (self.driver_features >> (32 * sel)) & _MASK32 if sel < 2 else 0

    def _set_driver_feature_window(self, value: int) -> None:
        sel = self.driver_feature_select
        if self.status & spec.Status.FEATURES_OK or sel >= 2:
            return  # features are fixed once FEATURES_OK stuck; windows past 63 hold nothing
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(_MASK32 << shift)) | (value << shift)

    def _valid_vector(self, vector: int) -> int:
        msix = self.irq.msix
        if vector == spec.NO_VECTOR or msix is None or vector < msix.nvectors:
            return vector if msix is not None else spec.NO_VECTOR
        return spec.NO_VECTOR

    def _queue_size(self) -> int:
        vq = self._selected()
        return vq.size if vq is not None else 0

    def _set_queue_size(self, value: int) -> None:
        vq = self._selected()
        if vq is not None and not vq.enabled:
            vq.size = value

    def _queue_vector(self) -> int:
        vq = self._selected()
        return vq.msix_vector if vq is not None else spec.NO_VECTOR

    def _set_queue_vector(self, value: int) -> None:
        vq = self._selected()
        if vq is not None:
            vq.msix_vector = self._valid_vector(value)

    def _queue_enable(self) -> int:
        vq = self._selected()
        return int(vq is not None and vq.enabled)

    def _set_queue_enable(self, value: int) -> None:
        vq = self._selected()
        if vq is None or vq.enabled or value != 1:
            return  # writing 0 is not allowed without VIRTIO_F_RING_RESET (not offered)
        problem = vq.check_config()
        if problem is not None:
            self.set_needs_reset(f"queue {vq.index} enabled with a bad configuration: {problem}")
            return
        vq.enabled = True

    def _addr_getter(self, attr: str, half: int) -> Callable[[], int]:
        def get() -> int:
            vq = self._selected()
            return (getattr(vq, attr) >> (32 * half)) & _MASK32 if vq is not None else 0
        return get

    def _addr_setter(self, attr: str, half: int) -> Callable[[int], None]:
        def put(value: int) -> None:
            vq = self._selected()
            if vq is None or vq.enabled:
                return
            shift = 32 * half
            setattr(vq, attr, (getattr(vq, attr) & ~(_MASK32 << shift)) | (value << shift))
        return put

    # -- device status --------------------------------------------------------------------------------
    def _write_status(self, value: int) -> None:
        if value == 0:
            self.virtio_reset()
            return
        status = spec.Status
        old = self.status
        # the driver never clears a bit (only a reset does) nor sets DEVICE_NEEDS_RESET
        new = old | (value & ~status.DEVICE_NEEDS_RESET & 0xFF)
        if new & status.FEATURES_OK and not old & status.FEATURES_OK and not self._features_acceptable():
            new &= ~status.FEATURES_OK
        if new & status.DRIVER_OK and not new & status.FEATURES_OK:
            new &= ~status.DRIVER_OK  # DRIVER_OK without negotiated features is not taken
        self.status = int(new)
        if new & status.DRIVER_OK and not old & status.DRIVER_OK:
            self._working_layout = self._layout()
            self.driver_ok()
            for vq in self._queues:
                if vq.enabled and self.running and self.bus_master:
                    self._kick(vq)

    def _features_acceptable(self) -> bool:
        features = self.driver_features
        extra = features & ~self.offered_features()
        if extra:
            self.log.info("FEATURES_OK refused: the driver accepted features not offered (%#x)", extra)
            return False
        if not features >> spec.Feature.VERSION_1 & 1:
            self.log.info("FEATURES_OK refused: VIRTIO_F_VERSION_1 not accepted (legacy drivers are not supported)")
            return False
        return self.validate_features(features)

    def virtio_reset(self) -> None:
        """Reset the virtio device (the driver wrote 0 to ``device_status``, or a PCI
        reset): status, features, selectors, vectors, ISR and queues, then
        :meth:`device_reset`. Chains in flight are dropped (the driver reclaims them)."""
        with self.lock:
            self.status = 0
            self.device_feature_select = self.driver_feature_select = 0
            self.driver_features = 0
            self.config_msix_vector = spec.NO_VECTOR
            self.queue_select = 0
            self._resubmit_pending = False
            for vq in self._queues:
                vq.reset()
            if self.isr:
                self.isr = 0
                self.irq.set_intx(False)
            self.device_reset()

    def on_reset(self, kind: ResetKind) -> None:
        """A PCI reset (conventional, FLR) resets the virtio device too."""
        self.virtio_reset()

    def on_failure(self, exc: BaseException) -> None:
        """A handler raised: show the driver ``DEVICE_NEEDS_RESET``."""
        self.set_needs_reset(f"device handler failed: {type(exc).__name__}: {exc}")

    # -- migration (the layer section) ------------------------------------------------------------------
    def layer_fingerprint(self) -> dict[str, Any]:
        """The transport's configuration a destination must match: the virtio device id, the
        queue sizes, the features offered and the device configuration's size."""
        return {"virtio.device_id": self.VIRTIO_DEVICE_ID,
                "virtio.queue_sizes": [vq.max_size for vq in self._queues],
                "virtio.device_features": self.offered_features(),
                "virtio.config_size": self._config_size}

    def get_layer_state(self) -> VirtioPciState:
        """The transport's state (the ``virtio-pci`` section)."""
        return VirtioPciState(status=self.status, device_feature_select=self.device_feature_select,
                              driver_feature_select=self.driver_feature_select,
                              driver_features=self.driver_features, config_msix_vector=self.config_msix_vector,
                              queue_select=self.queue_select, config_generation=self.config_generation,
                              isr=self.isr, queues=tuple(vq.snapshot() for vq in self._queues))

    def check_layer_state(self, state: VirtioPciState) -> None:
        """Refuse a transport state this device cannot take: another queue count, features
        it does not offer, vectors beyond its MSI-X table, inconsistent queue indices.

        :param state: the loaded section.
        :raises StateError: naming the field.
        """
        def reject(message: str, path: str) -> StateError:
            return StateError(message, section="virtio-pci", instance_id=0, path=path)

        if len(state.queues) != len(self._queues):
            raise reject(f"{len(state.queues)} queues in the stream, this device has {len(self._queues)}", "queues")
        extra = state.driver_features & ~self.offered_features()
        if extra:
            raise reject(f"driver features {extra:#x} are not offered by this device", "driver_features")
        msix = self.irq.msix
        nvectors = msix.nvectors if msix is not None else 0
        vectors = [("config_msix_vector", state.config_msix_vector)] + [
            (f"queues[{i}].msix_vector", q.msix_vector) for i, q in enumerate(state.queues)]
        for path, vector in vectors:
            if vector != spec.NO_VECTOR and vector >= nvectors:
                raise reject(f"MSI-X vector {vector} does not exist ({nvectors} vectors)", path)
        for i, (vq, qstate) in enumerate(zip(self._queues, state.queues, strict=True)):
            vq.check_state(qstate, partial(_queue_reject, reject, i))

    def set_layer_state(self, state: VirtioPciState) -> None:
        """Apply a checked transport state; chains in flight are resubmitted by :meth:`resume`.

        :param state: the loaded section.
        """
        self.status = state.status
        self.device_feature_select = state.device_feature_select
        self.driver_feature_select = state.driver_feature_select
        self.driver_features = state.driver_features
        self.config_msix_vector = state.config_msix_vector
        self.queue_select = state.queue_select
        self.config_generation = state.config_generation
        self.isr = state.isr
        for vq, qstate in zip(self._queues, state.queues, strict=True):
            vq.restore(qstate)
        self._resubmit_pending = any(vq.inflight() or vq.used_idx != vq.published_used_idx
                                     for vq in self._queues)

    def resume(self) -> None:
        """Resume the device. First, after a migration brought chains in flight, read them
        again from guest memory and hand them to :meth:`resubmit` (and publish used entries
        the source pushed but did not flush); then, once the driver is running, look at
        every enabled queue (:meth:`queue_notify`): a notification may have come while the
        rings were not mapped (a transport resumes the device after each guest-memory map),
        or have been held while the device was stopped."""
        if not self.closed:
            with self.lock:
                layout = self._layout()
                if layout > self._working_layout:
                    self._working_layout = layout  # memory grew: the queues work with all of it
                if self._resubmit_pending:
                    self._resubmit_pending = False
                    self._resubmit_all()
                if self.running and self.bus_master and self.memory is not None:
                    for vq in self._queues:
                        if vq.enabled:
                            self._kick(vq)
        super().resume()

    def _resubmit_all(self) -> None:
        for vq in self._queues:
            try:
                vq.flush()
                heads = vq.inflight()
                if not heads:
                    continue
                elems = [vq.read_chain(head) for head in heads]
            except VirtqueueError as exc:
                if self.queue_error(vq, exc):
                    self._resubmit_pending = True  # again after the next map
                return
            try:
                self.resubmit(vq, elems)
            except VirtqueueError as exc:
                self.queue_error(vq, exc)

