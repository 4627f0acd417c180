"""The fast path of the vfio-user server: posted doorbell writes straight to the device.

A guest I/O on an NVMe controller costs one or two posted ``REGION_WRITE`` messages
(``NO_REPLY``): the SQ tail and the CQ head doorbells. The generic path
(:meth:`~pcidev.transport.vfio_user.server.VfioUserServer.handle_message`) checks the
header flags, the region, its size and flags, splits the access into naturally
aligned pieces and goes through the endpoint's state check, for every one of them.
:class:`FastPath` handles exactly those writes with a precomputed bound instead:

* the message is a posted ``REGION_WRITE`` (flags == ``NO_REPLY``) of 4 bytes,
  4-aligned, inside the device's **doorbell window**
  (:attr:`PciDevice.DOORBELL_WINDOW <pcidev.device.PciDevice.DOORBELL_WINDOW>`; the NVMe
  controller declares BAR0 from 0x1000, clipped to the MSI-X structures or the end of
  the BAR);
* it applies only while the endpoint is running and the connection's migration state
  is RUNNING (``ConnectionState.mig_state`` == 2);
  everything else, and every message that is not such a write, takes the generic path.

:meth:`FastPath.burst` handles the run of such writes at the front of the reader's
buffer (the messages one socket read brought) inside one
:meth:`PciDevice.batch() <pcidev.device.PciDevice.batch>`, under the device lock,
so that the completions and interrupts they cause go out once per burst.
Consecutive writes to the same doorbell register collapse to the last value (a
doorbell holds a queue index, so only the newest one matters). The batch ends
before the message that ended the burst is handled, so no reply is ever sent
while a batch is open and nothing is merged across a reply or a non-posted message.

The same object drives adaptive polling for the connection loop:
:meth:`FastPath.poll_work` and :meth:`FastPath.set_polling` call the device's
:meth:`~pcidev.device.PciDevice.poll_work` and
:meth:`~pcidev.device.PciDevice.set_polling` hooks, and :attr:`FastPath.polls`
says whether the device implements them at all.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from pcidev.bar import BarHandler
from pcidev.device import PciDevice
from pcidev.errors import MmioError
from pcidev.pci.capabilities.msix import MsixCapability
from pcidev.transport.endpoint import RUNNING, DeviceEndpoint
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.conn import ConnectionState
from pcidev.transport.vfio_user.reader import Message, MessageReader

log = logging.getLogger(__name__)

__all__ = ["FastPath", "doorbell_window"]

#: migration state RUNNING (``VFIO_DEVICE_STATE_RUNNING``)
_MIG_RUNNING = 2

_REGION_WRITE = protocol.REGION_WRITE
_POSTED = protocol.TYPE_COMMAND | protocol.FLAG_NO_REPLY
_ACCESS = protocol.REGION_ACCESS_S
_DATA = _ACCESS.size
_WRITE4_BODY = _DATA + 4


def doorbell_window(device: PciDevice) -> tuple[int, int, int] | None:
    """The device's doorbell window ``(bar, start, end)``: BAR offsets whose 4-byte
    writes only record a value (a queue index) and may be coalesced, or None.

    The device type declares it (:attr:`~pcidev.device.PciDevice.DOORBELL_WINDOW`);
    it is clipped to the BAR's size and up to an MSI-X table or PBA above its start
    (None if such a structure overlaps its start).
    """
    declared = device.DOORBELL_WINDOW
    if declared is None:
        return None
    bar, start, end = declared
    if not 0 <= bar <= 5 or (b := device.bars[bar]) is None:
        return None
    end = min(end, b.size)
    msix = device.caps.find(MsixCapability)
    if msix is not None:
        for sbar, lo, size in ((msix.table_bar, msix.table_offset, msix.table_size),
                               (msix.pba_bar, msix.pba_offset, msix.pba_size)):
            if sbar != bar:
                continue
            if lo >= start:
                end = min(end, lo)
            elif lo + size > start:
                return None
    return (bar, start, end) if start < end else None


class FastPath:
    """Posted doorbell writes of one connection, straight to the device.

    :param endpoint: the served device's endpoint.
    :param conn: the connection's state (its migration state gates the fast path).
    """

    def __init__(self, endpoint: DeviceEndpoint, conn: ConnectionState) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.device = endpoint.device
        self.window = doorbell_window(self.device)
        #: whether the device implements :meth:`~pcidev.device.PciDevice.poll_work` (else
        #: polling would only burn CPU)
        self.polls = type(self.device).poll_work is not PciDevice.poll_work
        #: whether :meth:`set_polling` last announced polling
        self.polling = False
        #: posted writes handled here, and how many of them were collapsed
        self.writes = 0
        self.coalesced = 0

    def active(self) -> bool:
        """Whether the fast path applies now (a doorbell window, the endpoint running,
        the migration state RUNNING, the device not quiesced)."""
        return (self.window is not None and self.endpoint.state == RUNNING and self.conn.mig_state == _MIG_RUNNING
                and not self.device.quiesced)

    def burst(self, reader: MessageReader, stop: threading.Event) -> tuple[int, Message | None]:
        """Handle the posted doorbell writes at the front of ``reader``'s buffer.

        :param reader: the connection's reader (only its buffered messages are taken).
        :param stop: ends the burst at the next message boundary when set.
        :returns: ``(writes handled, the message that ended the burst or None)``; the
            caller handles that message (on the generic path) after the batch ended.
        """
        assert self.window is not None
        bar, lo, hi = self.window
        dev = self.device
        b = dev.bars[bar]
        assert b is not None  # doorbell_window() checked it
        handler = b.handler
        unpack = _ACCESS.unpack_from
        nxt = reader.next
        is_set = stop.is_set
        n = 0
        last_off = -1
        last_val = 0
        out: Message | None = None
        batch = None
        try:
            while not is_set():
                msg = nxt()
                if msg is None:
                    break
                body = msg.body
                if msg.cmd != _REGION_WRITE or msg.flags != _POSTED or len(body) != _WRITE4_BODY:
                    out = msg
                    break
                offset, region, count = unpack(body)
                if region != bar or count != 4 or offset & 3 or not lo <= offset < hi or msg.fds:
                    out = msg
                    break
                n += 1
                value = int.from_bytes(body[_DATA:], "little")
                if offset == last_off:
                    last_val = value
                    self.coalesced += 1
                    continue
                if batch is None:  # a batch only around doorbell writes (never an empty one)
                    batch = contextlib.ExitStack()
                    batch.enter_context(dev.lock)
                    batch.enter_context(dev.batch())
                else:
                    self._write(handler, bar, last_off, last_val)
                last_off, last_val = offset, value
            if last_off >= 0:
                self._write(handler, bar, last_off, last_val)
        except Exception as exc:  # the device's batch hook failed: the device's bug, not the client's
            dev.fail(exc, "vfio-user burst of doorbell writes")
        finally:
            if batch is not None:
                try:
                    batch.close()
                except Exception as exc:
                    dev.fail(exc, "vfio-user burst of doorbell writes")
        if n:
            self.writes += n
            counts = self.conn.counts
            counts["REGION_WRITE"] = counts.get("REGION_WRITE", 0) + n
        return n, out

    def _write(self, handler: BarHandler, bar: int, offset: int, value: int) -> None:
        """One doorbell write (under the device lock), failures as the generic path has them."""
        try:
            handler.write(offset, 4, value)
        except MmioError as exc:  # posted: nobody to answer
            log.info("vfio-user: posted write BAR%d %#x refused: %s", bar, offset, exc)
        except Exception as exc:  # a device bug must not end the connection
            self.device.fail(exc, f"BAR{bar} write {offset:#x}+4={value:#x}")

    # -- adaptive polling -------------------------------------------------------------------
    def poll_work(self) -> bool:
        """Let the device look for work posted without a doorbell write (in one batch).

        :returns: whether it found some.
        """
        dev = self.device
        try:
            with dev.lock, dev.batch():
                return dev.poll_work()
        except Exception as exc:
            dev.fail(exc, "poll_work")
            return False

    def set_polling(self, active: bool) -> None:
        """Tell the device whether the connection now polls (see
        :meth:`~pcidev.device.PciDevice.set_polling`)."""
        if active == self.polling:
            return
        self.polling = active
        dev = self.device
        try:
            with dev.lock:
                dev.set_polling(active)
        except Exception as exc:
            dev.fail(exc, f"set_polling({active})")
