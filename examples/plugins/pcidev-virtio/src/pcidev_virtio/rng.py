"""``virtio-rng``: the virtio entropy device (virtio id 4, spec 5.4).

One request queue; every chain the driver makes available is a set of
device-writable buffers, which the device fills with random bytes (straight into
guest memory, ``os.readv`` on the source into the chain's views) and returns with
the number of bytes written.

Properties (:class:`VirtioRngConfig`, ``pcidev describe virtio-rng``):

* ``source``: ``urandom`` (``/dev/urandom``, the default) or ``file:PATH``: the bytes of a
  file, read in a loop (a recorded entropy pool, or a deterministic test pattern);
* ``max_bytes`` / ``period``: rate limit, as QEMU's ``virtio-rng``: at most ``max_bytes``
  bytes per ``period`` seconds (0, the default: no limit). Requests beyond the limit stay
  *in flight* (taken from the ring, not yet returned) until the next period, served by the
  device's worker thread; a migration carries them (the transport's in-flight heads) and
  the destination serves them (:meth:`VirtioRng.resubmit`).

Requests are processed under ``device.lock`` (the transport holds it around the
notification; the worker's steps hold it).
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import attrs

from pcidev import ConfigError
from pcidev.properties import Size, structure_config
from pcidev.vmstate import U64, vmstate
from pcidev_virtio.device import VirtioPciDevice
from pcidev_virtio.errors import VirtqueueError
from pcidev_virtio.spec import VirtioId
from pcidev_virtio.virtqueue import VirtqElement, Virtqueue

__all__ = ["VirtioRng", "VirtioRngConfig", "VirtioRngState", "QUEUE_SIZE"]

#: the request queue's size
QUEUE_SIZE = 256
#: iovecs per readv (below IOV_MAX)
_IOV_BATCH = 512


def _check_source(inst: Any, attr: attrs.Attribute[str], value: str) -> None:
    if value != "urandom" and not (value.startswith("file:") and len(value) > 5):
        raise ConfigError(f"source must be 'urandom' or 'file:PATH', got {value!r}")


def _not_negative(inst: Any, attr: attrs.Attribute[Size], value: Size) -> None:
    if value < 0:
        raise ConfigError(f"{attr.name} must not be negative, got {value}")


def _positive(inst: Any, attr: attrs.Attribute[float], value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{attr.name} must be positive, got {value}")


@attrs.define(kw_only=True)
class VirtioRngConfig:
    """Properties of a virtio-rng device."""

    source: str = attrs.field(default="urandom", validator=_check_source, metadata={
        "help": "where random bytes come from: urandom, or file:PATH (read in a loop)"})
    max_bytes: Size = attrs.field(default=Size(0), validator=_not_negative, metadata={
        "help": "rate limit: bytes per period (0: unlimited)"})
    period: float = attrs.field(default=1.0, validator=_positive, metadata={
        "help": "rate limit: the period in seconds"})


@vmstate("virtio-rng", version=1)
@attrs.frozen
class VirtioRngState:
    """The rng's own state (the transport's, with the requests in flight, is its layer
    section). ``quota`` is what is left of the current period's ``max_bytes``."""

    served: U64
    quota: U64


class VirtioRng(VirtioPciDevice):
    """The virtio entropy device (see the module docstring).

    :param config: a :class:`VirtioRngConfig`, a property string or a mapping.
    :param name: device name in logs.
    :raises ConfigError: a bad property or an unreadable source.
    """

    TYPE_NAME = "virtio-rng"
    VIRTIO_DEVICE_ID = VirtioId.RNG
    QUEUE_SIZES = (QUEUE_SIZE,)
    CLASS_CODE = 0xFF0000  # PCI_CLASS_OTHERS, as QEMU's virtio-rng
    CONFIG_CLASS = VirtioRngConfig
    VMSTATE = VirtioRngState

    def __init__(self, config: VirtioRngConfig | str | dict[str, Any] | None = None, *,
                 name: str | None = None) -> None:
        self.cfg = structure_config(VirtioRngConfig, config, what="virtio-rng")
        path = "/dev/urandom" if self.cfg.source == "urandom" else self.cfg.source[5:]
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"virtio-rng: cannot open the source {path}: {exc.strerror}") from None
        self._looping = self.cfg.source != "urandom"
        #: heads of the chains taken from the queue and not yet filled (rate limit), in order;
        #: their buffers are resolved again when they are served, so that nothing pins guest
        #: memory while they wait (the host may remap it meanwhile)
        self._pending: collections.deque[int] = collections.deque()
        #: random bytes handed to the driver since power-on
        self.served = 0
        self._quota = int(self.cfg.max_bytes)
        #: when the current rate-limit period started (None: at the next request)
        self._window: float | None = None
        try:
            super().__init__(name=name)
        except BaseException:
            os.close(self._fd)
            raise
        self.worker = self.add_worker(self._step, name="virtio-rng",
                                      idle_poll=min(self.cfg.period, 0.05)) if self.cfg.max_bytes else None

    # -- requests ------------------------------------------------------------------------------
    def queue_notify(self, vq: Virtqueue) -> None:
        """Take every available chain and serve as many as the rate limit allows."""
        while (elem := vq.pop()) is not None:
            self._pending.append(elem.head)
            elem.release()
        self._serve(vq)

    def resubmit(self, vq: Virtqueue, elems: list[VirtqElement]) -> None:
        """After a migration: the source's requests in flight wait here as they did there."""
        for elem in elems:
            self._pending.append(elem.head)
            elem.release()
        self._serve(vq)

    def _refill(self) -> None:
        """Start a new period (and its quota) if the current one is over, or none began."""
        now = time.monotonic()
        if self._window is None or now - self._window >= self.cfg.period:
            self._window = now
            self._quota = int(self.cfg.max_bytes)

    def _serve(self, vq: Virtqueue) -> bool:
        """Fill pending chains as far as the rate limit allows; one flush (one interrupt).

        :returns: whether any chain was returned.
        """
        limited = bool(self.cfg.max_bytes)
        if limited:
            self._refill()
        done = False
        while self._pending and (not limited or self._quota > 0):
            elem = vq.read_chain(self._pending[0])
            self._pending.popleft()
            try:
                budget = min(elem.in_len(), self._quota) if limited else elem.in_len()
                written = self._fill(elem, budget)
            except BaseException:
                elem.release()
                raise
            if limited:
                self._quota -= written
            self.served += written
            vq.push(elem, written)
            done = True
        if done:
            vq.flush()
        if self._pending and self.worker is not None:
            self.worker.kick()
        return done

    def _fill(self, elem: VirtqElement, budget: int) -> int:
        """Read up to ``budget`` bytes from the source straight into the chain's buffers.

        :returns: bytes written.
        """
        made: list[memoryview] = []  # every slice taken here, released before returning
        views: list[memoryview] = []
        left = budget
        for buf in elem.in_bufs:
            if left <= 0:
                break
            if buf.nbytes > left:
                buf = buf[:left]
                made.append(buf)
            views.append(buf)
            left -= buf.nbytes
        written = 0
        try:
            while views:
                try:
                    n = os.readv(self._fd, views[:_IOV_BATCH])
                except OSError as exc:  # the source failed: the driver gets what was read
                    self.guest_error("virtio-rng: reading the source failed: %s", exc)
                    break
                if n == 0:  # end of a file source: start again, unless it is empty
                    if not self._looping or os.lseek(self._fd, 0, os.SEEK_CUR) == 0:
                        break
                    os.lseek(self._fd, 0, os.SEEK_SET)
                    continue
                written += n
                while views and n >= views[0].nbytes:
                    n -= views.pop(0).nbytes
                if n:
                    views[0] = views[0][n:]
                    made.append(views[0])
        finally:
            for view in made:
                view.release()
        return written

    def _step(self) -> bool:
        """The rate-limited worker: serve what the new period allows."""
        if not self._pending or not self.running:
            return False
        try:
            return self._serve(self.queues[0])
        except VirtqueueError as exc:
            self.queue_error(self.queues[0], exc)  # the chain stays pending if memory is being remapped
            return False

    @property
    def pending(self) -> int:
        """Chains waiting for the rate limit."""
        return len(self._pending)

    # -- reset, teardown, migration ---------------------------------------------------------------
    def _drop_pending(self) -> None:
        self._pending.clear()

    def device_reset(self) -> None:
        """Drop the requests waiting (the driver reclaims them) and refill the quota."""
        self._drop_pending()
        self._quota = int(self.cfg.max_bytes)
        self._window = None

    def on_close(self) -> None:
        """Release the requests still waiting and close the source."""
        self._drop_pending()
        os.close(self._fd)

    def device_fingerprint(self) -> dict[str, Any]:
        return {"virtio-rng.max_bytes": int(self.cfg.max_bytes)}

    def get_device_state(self) -> VirtioRngState:
        return VirtioRngState(served=self.served, quota=self._quota)

    def set_device_state(self, state: VirtioRngState) -> None:
        self.served = state.served
        self._quota = min(state.quota, int(self.cfg.max_bytes))
        self._window = time.monotonic()
        self._drop_pending()  # the in-flight chains come back through resubmit()
