"""``edu``: a small teaching device with registers, a DMA engine and MSI-X.

Modelled loosely on QEMU's ``edu`` device, with a descriptor-ring copy engine
so that DMA, interrupts and migration have something real to carry.

BAR0 (4 KiB, registers; MSI-X table at 0x800, PBA at 0xC00)::

    0x00  ID          RO   0x010000ED
    0x04  LIVENESS    RW   reads back the bitwise inverse of what was written
    0x08  FACTORIAL   RW   write n: computes n! (mod 2**32); read the result
    0x20  STATUS      RW   bit 7: raise vector 1 / INTx when a factorial completes
    0x24  IRQ_STATUS  RO   pending interrupt reasons (bit 0 factorial, bit 1 DMA)
    0x60  IRQ_RAISE   WO   sets IRQ_STATUS bits and raises the interrupt
    0x64  IRQ_ACK     WO   clears IRQ_STATUS bits (INTx deasserts when 0)
    0x100 RING_BASE   RW   64-bit guest address of the descriptor ring
    0x108 RING_SIZE   RW   entries (power of two, 1..4096)
    0x10C RING_TAIL   RW   doorbell: index after the last posted descriptor
    0x110 RING_HEAD   RO   index of the next descriptor the engine takes
    0x114 RING_CTRL   RW   bit 0 enable
    0x118 ERRORS      RO   descriptors completed with an error

Descriptor (32 bytes, little-endian)::

    0x00 src u64 | 0x08 dst u64 | 0x10 len u32 | 0x14 flags u32 (bit 0: interrupt)
    0x18 status u32 (device: 1 done, 2 DMA error, 3 bad length) | 0x1C crc32c u32 (device)

The engine copies ``len`` bytes from ``src`` to ``dst`` in guest memory,
writes the CRC-32C of the data and the status, and raises MSI-X vector 0
(or INTx) when asked. Descriptors are processed when the tail is written, or
in bounded steps with :meth:`EduDevice.process` when ``autorun`` is off, or by a
background worker thread (``engine=True``) that copies in ``chunk``-byte steps,
so that a descriptor can be *in flight* (partly copied) at any moment.

Migration: :class:`EduState` holds the registers, the ring position, the
completion counter and, in the ``edu/inflight`` subsection, the descriptor in
flight (its slot, addresses, bytes copied and running CRC). Quiescing stops the
worker between two chunks; the destination continues the descriptor where the
source stopped.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs
import crc32c

from pcidev.bar import Access, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.errors import ConfigError, DmaError
from pcidev.pci.config import ResetKind
from pcidev.properties import Size, structure_config
from pcidev.vmstate import U32, U64, vmstate
from pcidev.vmstate.errors import StateError
from pcidev.worker import Worker

ID_VALUE = 0x010000ED
DESC = struct.Struct("<QQII II")
DESC_SIZE = 32
STATUS_DONE = 1
STATUS_DMA_ERROR = 2
STATUS_BAD_LENGTH = 3
MAX_LEN = 1 << 20
IRQ_FACT = 0x1
IRQ_DMA = 0x2
VEC_DMA = 0
VEC_FACT = 1
_STATUS_CRC = struct.Struct("<II")


@vmstate("edu/inflight")
@attrs.frozen
class EduInflight:
    """The descriptor the engine is working on: ring slot, the descriptor's fields,
    bytes copied so far and the CRC-32C of those bytes."""

    slot: U32
    src: U64
    dst: U64
    length: U32
    flags: U32
    done: U32 = 0
    crc: U32 = 0


@vmstate("edu", version=1)
@attrs.frozen
class EduState:
    """The edu device's own state (the framework migrates config space and MSI-X)."""

    liveness: U32
    factorial: U32
    status: U32
    irq_status: U32
    ring_base: U64
    ring_size: U32
    ring_tail: U32
    ring_head: U32
    ring_ctrl: U32
    errors: U32
    completed: U64
    inflight: EduInflight | None = None


@attrs.define
class _Inflight:
    slot: int
    src: int
    dst: int
    length: int
    flags: int
    done: int = 0
    crc: int = 0

#: register name -> EduState field
_REGISTER_FIELDS = {"LIVENESS": "liveness", "FACTORIAL": "factorial", "STATUS": "status",
                    "IRQ_STATUS": "irq_status", "RING_BASE": "ring_base", "RING_SIZE": "ring_size",
                    "RING_TAIL": "ring_tail", "RING_HEAD": "ring_head", "RING_CTRL": "ring_ctrl",
                    "ERRORS": "errors"}


def _positive(inst: Any, attr: attrs.Attribute[Size], value: Size) -> None:
    if value <= 0:
        raise ConfigError(f"chunk must be positive, got {value}")


def _not_negative(inst: Any, attr: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ConfigError(f"delay must not be negative, got {value}")


@attrs.define(kw_only=True)
class EduConfig:
    """Properties of an edu device (``pcidev describe edu``)."""

    autorun: bool = attrs.field(default=True, metadata={
        "help": "process descriptors as soon as the tail is written (else only in process()); "
                "ignored with engine"})
    engine: bool = attrs.field(default=False, metadata={
        "help": "process descriptors in a background worker thread"})
    chunk: Size = attrs.field(default=Size(4096), validator=_positive, metadata={
        "help": "bytes the worker copies per step"})
    delay: float = attrs.field(default=0.0, validator=_not_negative, metadata={
        "help": "seconds the worker sleeps after each step"})


class EduDevice(PciDevice):
    """The edu teaching device (see the module docstring for its registers).

    :param config: an :class:`EduConfig`, a property string (``"engine=on,chunk=8k"``)
        or a mapping; ``None`` for the defaults.
    :param name: device name in logs.
    :param props: the properties as keywords, instead of ``config``
        (``EduDevice(autorun=False)``).
    :raises ConfigError: a bad property.

    Properties (:class:`EduConfig`):

    :param autorun: process descriptors as soon as the tail is written (else
        only in :meth:`process`, which lets tests stop it mid-ring). Ignored with
        ``engine``.
    :param engine: process descriptors in a background :class:`~pcidev.worker.Worker`
        (:attr:`worker`), started by :meth:`resume` (a transport calls it when it starts
        serving the device) and joined by :meth:`close`.
    :param chunk: bytes the worker copies per step (a descriptor stays in flight
        over several steps).
    :param delay: seconds the worker sleeps after each step (slows it down, so a
        demo or a test can catch descriptors in flight).
    """

    TYPE_NAME = "edu"
    VENDOR_ID = 0x1234
    DEVICE_ID = 0x11E8
    CLASS_CODE = 0x00FF00
    REVISION = 0x10
    VMSTATE = EduState
    CONFIG_CLASS = EduConfig
    MIGRATABLE_FEATURES = frozenset({"dma-engine", "background-engine"})

    def __init__(self, config: EduConfig | str | dict[str, Any] | None = None, *,
                 name: str | None = None, **props: Any) -> None:
        if props:
            if config is not None:
                raise ConfigError("edu: give the properties as config or as keywords, not both")
            config = props
        cfg = structure_config(EduConfig, config, what="edu")
        self.cfg = cfg
        self.autorun = cfg.autorun
        self.engine = cfg.engine
        self.chunk = cfg.chunk
        self.delay = cfg.delay
        self._inflight: _Inflight | None = None
        #: the background engine (``engine=True``), else None
        self.worker: Worker | None = None
        super().__init__(name=name)

    def describe(self) -> None:
        regs = RegisterMap(4096, name="edu-bar0")
        regs.add(Register("ID", 0x00, 4, Access.RO, reset=ID_VALUE))
        regs.add(Register("LIVENESS", 0x04, 4, on_read=lambda r: ~r.value & 0xFFFFFFFF))
        regs.add(Register("FACTORIAL", 0x08, 4, on_write=self._factorial))
        regs.add(Register("STATUS", 0x20, 4, mask=0x80))
        regs.add(Register("IRQ_STATUS", 0x24, 4, Access.RO))
        regs.add(Register("IRQ_RAISE", 0x60, 4, Access.WO, on_write=self._irq_raise))
        regs.add(Register("IRQ_ACK", 0x64, 4, Access.WO, on_write=self._irq_ack))
        regs.add(Register("RING_BASE", 0x100, 8, mask=~0x1F & (2**64 - 1)))
        regs.add(Register("RING_SIZE", 0x108, 4, reset=0))
        regs.add(Register("RING_TAIL", 0x10C, 4, on_write=self._doorbell))
        regs.add(Register("RING_HEAD", 0x110, 4, Access.RO))
        regs.add(Register("RING_CTRL", 0x114, 4, mask=0x1))
        regs.add(Register("ERRORS", 0x118, 4, Access.RO))
        self.regs = regs
        self.add_mem_bar(0, 4096, regs)
        self.add_msix(2, bar=0, table_offset=0x800, pba_offset=0xC00)
        self.add_msi(2)
        self.add_standard_pcie_caps()
        if self.engine:
            self.worker = self.add_worker(self._engine_step, name="edu-engine", delay=self.delay)
        #: descriptors completed since power-on (device-internal statistic)
        self.completed = 0

    # -- registers -------------------------------------------------------------------
    def _factorial(self, reg: Register, new: int, old: int) -> None:
        result = 1
        for i in range(2, min(new, 64) + 1):
            result = (result * i) & 0xFFFFFFFF
        reg.value = result if new <= 64 else 0
        if self.regs["STATUS"].value & 0x80:
            self._raise(IRQ_FACT, VEC_FACT)

    def _irq_raise(self, reg: Register, new: int, old: int) -> None:
        self._raise(new, VEC_FACT)

    def _irq_ack(self, reg: Register, new: int, old: int) -> None:
        st = self.regs["IRQ_STATUS"]
        st.value &= ~new & 0xFFFFFFFF
        if st.value == 0:
            self.irq.set_intx(False)

    def _raise(self, reason: int, vector: int) -> None:
        self.regs["IRQ_STATUS"].value |= reason
        if not self.irq.notify(vector):
            self.irq.set_intx(True)

    def _doorbell(self, reg: Register, new: int, old: int) -> None:
        size = self.regs["RING_SIZE"].value
        if size == 0 or size & (size - 1) or size > 4096:
            reg.value = old
            return
        reg.value = new % size
        if self.worker is not None:
            self.worker.kick()
        elif self.autorun:
            self.process()

    # -- DMA engine ------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Descriptors posted but not yet finished (including one in flight)."""
        size = self.regs["RING_SIZE"].value
        if not size:
            return 0
        return (self.regs["RING_TAIL"].value - self.regs["RING_HEAD"].value) % size

    @property
    def inflight(self) -> EduInflight | None:
        """The descriptor in flight (partly copied), if any."""
        inf = self._inflight
        return None if inf is None else EduInflight(**attrs.asdict(inf))

    def _runnable(self) -> bool:
        return bool(self.regs["RING_CTRL"].value & 1) and self.bus_master and (
            self._inflight is not None or self.pending > 0)

    def _step(self, chunk: int | None) -> tuple[bool, bool]:
        """Advance the engine by one step: fetch a descriptor if none is in flight,
        then copy up to ``chunk`` bytes of it (all of it if None).

        :returns: ``(finished a descriptor, it asked for an interrupt)``.
        """
        mem = self.dma
        size = self.regs["RING_SIZE"].value
        head_reg = self.regs["RING_HEAD"]
        inf = self._inflight
        if inf is None:
            slot = head_reg.value
            addr = self.regs["RING_BASE"].value + slot * DESC_SIZE
            try:
                src, dst, length, flags, _st, _crc = mem.read_struct(DESC, addr)
            except DmaError:
                self.regs["ERRORS"].value += 1
                head_reg.value = (slot + 1) % size
                return True, False
            inf = self._inflight = _Inflight(slot, src, dst, length, flags)
            if length == 0 or length > MAX_LEN:
                return True, self._finish(STATUS_BAD_LENGTH)
        n = inf.length - inf.done if chunk is None else min(chunk, inf.length - inf.done)
        try:
            data = mem.read(inf.src + inf.done, n)
            mem.write(inf.dst + inf.done, data)
        except DmaError:
            return True, self._finish(STATUS_DMA_ERROR)
        inf.crc = crc32c.crc32c(data, value=inf.crc)
        inf.done += n
        if inf.done == inf.length:
            return True, self._finish(STATUS_DONE)
        return False, False

    def _finish(self, status: int) -> bool:
        inf = self._inflight
        assert inf is not None
        self._inflight = None
        if status != STATUS_DONE:
            self.regs["ERRORS"].value += 1
        addr = self.regs["RING_BASE"].value + inf.slot * DESC_SIZE
        try:
            self.dma.write_struct(_STATUS_CRC, addr + 0x18, status, inf.crc if status == STATUS_DONE else 0)
        except DmaError:
            pass
        size = self.regs["RING_SIZE"].value
        self.regs["RING_HEAD"].value = (inf.slot + 1) % size if size else 0
        self.completed += 1
        return bool(inf.flags & 1)

    def process(self, budget: int | None = None) -> int:
        """Process up to ``budget`` posted descriptors (all if None), each completely
        (a descriptor in flight is finished first). One interrupt is raised at the
        end if any processed descriptor asked for one.

        :returns: how many were processed.
        """
        with self.lock:
            if not self.regs["RING_CTRL"].value & 1 or not self.bus_master:
                return 0
            done = 0
            raise_irq = False
            while self._runnable() and (budget is None or done < budget):
                finished, irq = self._step(None)
                done += finished
                raise_irq |= irq
            if raise_irq:
                self._raise(IRQ_DMA, VEC_DMA)
            return done

    # -- background worker -------------------------------------------------------------------
    def _engine_step(self) -> bool:
        """One step of the background engine (its :class:`~pcidev.worker.Worker` holds
        :attr:`lock`): copy up to ``chunk`` bytes.

        :returns: whether there was work.
        """
        if not self._runnable():
            return False
        _finished, irq = self._step(self.chunk)
        if irq:
            self._raise(IRQ_DMA, VEC_DMA)
        return True

    def stop(self) -> None:
        """Stop the worker thread (the device can be resumed again later, which starts a new one)."""
        if self.worker is not None:
            self.worker.stop()

    # -- migration ---------------------------------------------------------------------------
    def enabled_features(self) -> set[str]:
        features = super().enabled_features()
        if self.regs["RING_CTRL"].value & 1:
            features.add("dma-engine")
        if self.engine:
            features.add("background-engine")
        return features

    def device_fingerprint(self) -> dict[str, Any]:
        return {"edu.max_transfer": MAX_LEN}

    def get_device_state(self) -> EduState:
        values = {field: self.regs[reg].value for reg, field in _REGISTER_FIELDS.items()}
        return EduState(completed=self.completed, inflight=self.inflight, **values)

    def check_device_state(self, state: EduState) -> None:
        size = state.ring_size
        if size & (size - 1) or size > 4096:
            raise StateError(f"ring size {size} is not a power of two up to 4096", section="edu",
                             instance_id=0, path="ring_size")
        for field in ("ring_head", "ring_tail"):
            value = getattr(state, field)
            if value >= max(size, 1):
                raise StateError(f"{value} is outside a ring of {size} entries", section="edu",
                                 instance_id=0, path=field)
        inf = state.inflight
        if inf is not None:
            if size == 0 or inf.slot != state.ring_head:
                raise StateError(f"descriptor in flight at slot {inf.slot}, but the ring head is "
                                 f"{state.ring_head} (size {size})", section="edu", instance_id=0,
                                 path="inflight.slot")
            if not 0 < inf.length <= MAX_LEN or inf.done > inf.length:
                raise StateError(f"{inf.done} of {inf.length} bytes copied is impossible", section="edu",
                                 instance_id=0, path="inflight.done")

    def set_device_state(self, state: EduState) -> None:
        for reg, field in _REGISTER_FIELDS.items():
            self.regs[reg].value = getattr(state, field)
        self.completed = state.completed
        inf = state.inflight
        self._inflight = None if inf is None else _Inflight(**attrs.asdict(inf))

    def on_reset(self, kind: ResetKind) -> None:
        # the register map was reset with the BAR handlers
        self._inflight = None
        if kind is ResetKind.POWER_ON:
            self.completed = 0
