"""A vfio-user server: the handlers of one client's (QEMU's ``vfio-user-pci``) connection.

The server takes one message at a time, in order (read by
:class:`~pcidev.transport.vfio_user.reader.MessageReader`, driven by
:class:`~pcidev.transport.vfio_user.loop.ConnectionLoop`), calls the device's
:class:`~pcidev.transport.endpoint.DeviceEndpoint`, and answers. Every malformed
or refused request gets an ERROR reply with an errno (unless it was sent with
NO_REPLY); nothing a client sends can raise out of :meth:`VfioUserServer.serve`.
A message whose size cannot be trusted (larger than the advertised maximum) is
answered with ``E2BIG`` and ends the connection, because the stream cannot be
re-synchronized.

Regions are Linux's ``VFIO_PCI_*``: BAR0..5, the expansion ROM (6), config space
(7), VGA (8, empty). A BAR whose handler is a :class:`~pcidev.bar.RamBacking` is
offered for mmap with a sparse-mmap capability over its memfd. Interrupts are
eventfds only (SET_IRQS); QEMU emulates the MSI-X table, so a vector that has an
eventfd is unmasked in the device's own table, and masked again when its eventfd
is removed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from typing import Any

from pcidev.bar import RamBacking
from pcidev.errors import (
    ConfigError,
    ConfigSpaceError,
    DmaError,
    IrqError,
    MigrationError,
    MmioError,
    TransportError,
)
from pcidev.pci.capabilities.msi import MsiCapability
from pcidev.pci.capabilities.msix import ENTRY_CTRL, ENTRY_SIZE, MsixCapability
from pcidev.pci.config import ResetKind
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import close_fds, send_all
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.conn import ConnectionState
from pcidev.transport.vfio_user.fastpath import FastPath
from pcidev.transport.vfio_user.loop import ConnectionLoop
from pcidev.transport.vfio_user.protocol import VfioUserError
from pcidev.transport.vfio_user.reader import Message, MessageReader

log = logging.getLogger(__name__)

__all__ = ["VfioUserServer"]

def _chunks(offset: int, count: int, widths: tuple[int, ...]) -> list[tuple[int, int]]:
    """Split ``[offset, offset+count)`` into naturally aligned accesses of ``widths``."""
    out = []
    pos, end = offset, offset + count
    while pos < end:
        for w in widths:
            if pos % w == 0 and pos + w <= end:
                break
        else:  # pragma: no cover - widths always ends with 1
            raise AssertionError
        out.append((pos, w))
        pos += w
    return out


class VfioUserServer:
    """Serves one :class:`~pcidev.transport.endpoint.DeviceEndpoint` to one client.

    :param endpoint: the device endpoint (started by the caller).
    :param sock: the connected ``AF_UNIX`` stream socket (the server closes it at the end).
    :param max_msg_fds: the most fds accepted with one message (advertised).
    :param max_data_xfer_size: the most data in one region access (advertised).
    """

    def __init__(self, endpoint: DeviceEndpoint, sock: socket.socket, *, max_msg_fds: int = 8,
                 max_data_xfer_size: int = 1 << 20) -> None:
        self.endpoint = endpoint
        self.device = endpoint.device
        self.sock = sock
        #: the connection's own state (what the client set up; travels in a handover)
        self.conn = ConnectionState(max_msg_fds=max_msg_fds, max_data_xfer_size=max_data_xfer_size)
        self.reader = MessageReader(sock, max_msg_fds=max_msg_fds, max_data_xfer_size=max_data_xfer_size)
        self.loop = ConnectionLoop(self.handle_message, self.reader, fast=FastPath(endpoint, self.conn))

    @property
    def max_msg_fds(self) -> int:
        """The most fds accepted with one message (advertised)."""
        return self.conn.max_msg_fds

    @property
    def max_data_xfer_size(self) -> int:
        """The most data in one region access (advertised)."""
        return self.conn.max_data_xfer_size

    @property
    def client_caps(self) -> dict[str, Any] | None:
        """What the client said in VERSION (None before)."""
        return self.conn.client_caps

    @property
    def nofd_maps(self) -> dict[int, tuple[int, int]]:
        """DMA ranges the client gave without an fd: address -> (size, flags)."""
        return self.conn.nofd_maps

    @property
    def irq_vectors(self) -> dict[int, set[int]]:
        """Vectors of each IRQ index that have an eventfd."""
        return self.conn.irq_vectors

    @property
    def intx_masked(self) -> bool:
        """Whether the client masked INTx."""
        return self.conn.intx_masked

    @property
    def counts(self) -> dict[str, int]:
        """Messages handled, by command name."""
        return self.conn.counts

    # -- loop ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Make :meth:`serve` return at the next message boundary (any thread). The
        socket is not shut down: only this process stops reading it."""
        self.loop.wake()

    def serve(self) -> str:
        """Handle messages until the client leaves or :meth:`stop`. Closes the socket.

        :returns: why it ended.
        """
        try:
            return self.loop.run()
        finally:
            self.loop.close()
            try:
                self.sock.close()
            except OSError:
                pass

    def handle_one(self) -> str | None:
        """Read and answer one message (blocks). :returns: a reason to stop, or None."""
        msg = self.reader.read()
        if msg is None:
            return "eof"
        return self.handle_message(msg)

    def handle_message(self, msg: Message) -> str | None:
        """Answer one message read by the reader (the reply is sent when this returns).

        :returns: a reason to end the connection, or None.
        :raises TransportError: the reply could not be sent.
        """
        mid, cmd, flags, body, fds = msg.mid, msg.cmd, msg.flags, msg.body, msg.fds
        if msg.error is not None:
            close_fds(fds)
            self._error(mid, cmd, flags, msg.error[0], msg.error[1])
            return "oversized message" if msg.fatal else None
        kind = flags & protocol.TYPE_MASK
        if kind == protocol.TYPE_REPLY:
            close_fds(fds)
            log.warning("vfio-user: unexpected reply id %d cmd %d (the server sends no requests)", mid, cmd)
            return None
        name = protocol.COMMAND_NAMES.get(cmd, str(cmd))
        counts = self.conn.counts
        counts[name] = counts.get(name, 0) + 1
        out_fds: list[int] = []
        try:
            if kind != protocol.TYPE_COMMAND:
                raise VfioUserError(errno.EINVAL, f"message type {kind} is neither command nor reply")
            if flags & ~(protocol.TYPE_MASK | protocol.FLAG_NO_REPLY | protocol.FLAG_ERROR) \
                    or flags & protocol.FLAG_ERROR:
                raise VfioUserError(errno.EINVAL, f"bad flags {flags:#x} on a command")
            payload, out_fds = self.dispatch(cmd, body, fds)
            fds = []
        except VfioUserError as exc:
            close_fds(fds)
            self._error(mid, cmd, flags, exc.errno, str(exc))
            return None
        except (ConfigSpaceError, MmioError, IrqError, ConfigError) as exc:
            close_fds(fds)
            self._error(mid, cmd, flags, errno.EINVAL, str(exc))
            return None
        except DmaError as exc:
            close_fds(fds)
            self._error(mid, cmd, flags, errno.EINVAL, str(exc))
            return None
        except (MigrationError, TransportError) as exc:
            close_fds(fds)
            self._error(mid, cmd, flags, errno.ENODEV, str(exc))
            return None
        except Exception as exc:  # a bug here must not end the guest's device
            close_fds(fds)
            log.exception("vfio-user: %s failed", name)
            self._error(mid, cmd, flags, errno.EIO, f"{type(exc).__name__}: {exc}")
            return None
        if not flags & protocol.FLAG_NO_REPLY:
            send_all(self.sock, protocol.reply(mid, cmd, payload), out_fds)
        return None

    def _error(self, mid: int, cmd: int, flags: int, err: int, text: str) -> None:
        log.info("vfio-user: refusing %s (id %d): %s", protocol.COMMAND_NAMES.get(cmd, cmd), mid, text)
        if not flags & protocol.FLAG_NO_REPLY:
            send_all(self.sock, protocol.error_reply(mid, cmd, err))

    # -- dispatch -----------------------------------------------------------------------
    def dispatch(self, cmd: int, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        """Execute one command. Takes ownership of ``fds`` on success (closes what it
        does not keep); on an exception the caller closes them.

        :returns: the reply payload and the fds to send with it.
        :raises VfioUserError: (and pcidev errors) to refuse the command.
        """
        takes_fds = cmd in (protocol.DMA_MAP, protocol.DEVICE_SET_IRQS)
        if fds and not takes_fds:
            raise VfioUserError(errno.EINVAL, f"command {cmd} carries no file descriptors")
        handler = self._HANDLERS.get(cmd)
        if handler is None:
            if cmd == protocol.DEVICE_FEATURE:
                raise VfioUserError(errno.ENOTTY, "no device features")
            raise VfioUserError(errno.ENOSYS, f"unsupported command {cmd}")
        return handler(self, body, fds)

    @staticmethod
    def _need(body: bytes, n: int, what: str) -> None:
        if len(body) < n:
            raise VfioUserError(errno.EINVAL, f"{what}: payload of {len(body)} bytes, need {n}")

    # VERSION ------------------------------------------------------------------------------
    def _version(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.VERSION_HDR.size, "VERSION")
        major, _minor = protocol.VERSION_HDR.unpack_from(body)
        if major != 0:
            raise VfioUserError(errno.ENOTSUP, f"VERSION: major {major} (this server speaks 0)")
        text = body[protocol.VERSION_HDR.size:]
        caps: dict[str, Any] = {}
        if text:
            if not text.endswith(b"\0"):
                raise VfioUserError(errno.EINVAL, "VERSION: the capability string is not NUL-terminated")
            try:
                parsed = json.loads(text[:-1].decode("utf-8")) if text[:-1].strip() else {}
            except (UnicodeDecodeError, ValueError) as exc:
                raise VfioUserError(errno.EINVAL, f"VERSION: bad capability JSON ({exc})") from exc
            if not isinstance(parsed, dict):
                raise VfioUserError(errno.EINVAL, "VERSION: the capabilities are not a JSON object")
            inner = parsed.get("capabilities", {})
            if not isinstance(inner, dict):
                raise VfioUserError(errno.EINVAL, "VERSION: 'capabilities' is not an object")
            caps = inner
        self.conn.client_caps = caps
        mine = json.dumps({"capabilities": {"max_msg_fds": self.max_msg_fds,
                                            "max_data_xfer_size": self.max_data_xfer_size}},
                          separators=(",", ":")).encode() + b"\0"
        if len(mine) > len(text):  # never larger than the client's own request (its buffer)
            mine = b"{}\0"
            if len(mine) > len(text):
                mine = b""
        return protocol.VERSION_HDR.pack(0, 0) + mine, []

    # DMA ------------------------------------------------------------------------------------
    def _overlaps(self, addr: int, size: int) -> bool:
        end = addr + size
        for a, (s, _f) in self.nofd_maps.items():
            if a < end and addr < a + s:
                return True
        for r in self.endpoint.memory.regions():
            if r.gpa < end and addr < r.gpa + r.size:
                return True
        return False

    def _dma_map(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.DMA_MAP_S.size, "DMA_MAP")
        argsz, flags, offset, addr, size = protocol.DMA_MAP_S.unpack_from(body)
        if argsz < protocol.DMA_MAP_S.size:
            raise VfioUserError(errno.EINVAL, f"DMA_MAP: argsz {argsz}")
        if flags & ~0xF:
            raise VfioUserError(errno.EINVAL, f"DMA_MAP: unknown flags {flags:#x}")
        if size == 0 or addr + size > 1 << 64:
            raise VfioUserError(errno.EINVAL, f"DMA_MAP: bad range {addr:#x}+{size:#x}")
        if len(fds) > 1:
            raise VfioUserError(errno.EINVAL, f"DMA_MAP: {len(fds)} fds (at most 1)")
        if self._overlaps(addr, size):
            raise VfioUserError(errno.EEXIST, f"DMA_MAP: {addr:#x}+{size:#x} overlaps a mapped range")
        if not fds:
            self.nofd_maps[addr] = (size, flags)
            return b"", []
        try:
            self.endpoint.dma_map(addr, size, fds[0], offset, writable=bool(flags & protocol.DMA_FLAG_WRITE),
                                  name=f"vfio-user-{addr:#x}")
        finally:
            close_fds(fds)  # the guest memory keeps its own duplicate
            fds.clear()
        return b"", []

    def _dma_unmap(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.DMA_UNMAP_S.size, "DMA_UNMAP")
        argsz, flags, addr, size = protocol.DMA_UNMAP_S.unpack_from(body)
        if argsz < protocol.DMA_UNMAP_S.size:
            raise VfioUserError(errno.EINVAL, f"DMA_UNMAP: argsz {argsz}")
        echo = body[:protocol.DMA_UNMAP_S.size]
        if flags == protocol.DMA_UNMAP_FLAG_ALL:
            if addr or size:
                raise VfioUserError(errno.EINVAL, "DMA_UNMAP: ALL with a non-zero range")
            self.nofd_maps.clear()
            for r in self.endpoint.memory.regions():
                self.endpoint.dma_unmap(r.gpa, r.size)
            return echo, []
        if flags:
            raise VfioUserError(errno.EINVAL, f"DMA_UNMAP: unsupported flags {flags:#x}")
        if addr in self.nofd_maps:
            if self.nofd_maps[addr][0] != size:
                raise VfioUserError(errno.EINVAL, "DMA_UNMAP: size does not match the map")
            del self.nofd_maps[addr]
            return echo, []
        region = self.endpoint.memory.region_at(addr)
        if region is None or region.gpa != addr or region.size != size:
            raise VfioUserError(errno.EINVAL, f"DMA_UNMAP: no map {addr:#x}+{size:#x}")
        self.endpoint.dma_unmap(addr, size)
        return echo, []

    # device and region info ---------------------------------------------------------------
    def _device_info(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.DEVICE_INFO_S.size, "DEVICE_GET_INFO")
        argsz = protocol.DEVICE_INFO_S.unpack_from(body)[0]
        if argsz < protocol.DEVICE_INFO_S.size:
            raise VfioUserError(errno.EINVAL, f"DEVICE_GET_INFO: argsz {argsz}")
        flags = protocol.DEVICE_FLAGS_RESET | protocol.DEVICE_FLAGS_PCI
        return protocol.DEVICE_INFO_S.pack(protocol.DEVICE_INFO_S.size, flags, protocol.NUM_REGIONS,
                                           protocol.NUM_IRQS), []

    def region_layout(self, index: int) -> tuple[int, int, RamBacking | None]:
        """``(size, flags, ram_backing_or_None)`` of region ``index``."""
        dev = self.device
        rw = protocol.REGION_FLAG_READ | protocol.REGION_FLAG_WRITE
        if 0 <= index <= 5:
            bar = dev.bars[index]
            if bar is None:
                return 0, 0, None
            ram = bar.handler if isinstance(bar.handler, RamBacking) else None
            flags = rw | (protocol.REGION_FLAG_MMAP | protocol.REGION_FLAG_CAPS if ram is not None else 0)
            return bar.size, flags, ram
        if index == protocol.ROM_REGION:
            return (dev.rom_size, protocol.REGION_FLAG_READ, None) if dev.rom is not None else (0, 0, None)
        if index == protocol.CONFIG_REGION:
            return dev.config.size, rw, None
        return 0, 0, None

    def _region_info(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.REGION_INFO_S.size, "DEVICE_GET_REGION_INFO")
        argsz, _flags, index, _cap, _size, _off = protocol.REGION_INFO_S.unpack_from(body)
        if argsz < protocol.REGION_INFO_S.size:
            raise VfioUserError(errno.EINVAL, f"DEVICE_GET_REGION_INFO: argsz {argsz}")
        if index >= protocol.NUM_REGIONS:
            raise VfioUserError(errno.EINVAL, f"DEVICE_GET_REGION_INFO: no region {index}")
        size, flags, ram = self.region_layout(index)
        caps = b""
        cap_offset = 0
        if ram is not None:
            cap_offset = protocol.REGION_INFO_S.size
            areas = b"".join(protocol.SPARSE_AREA_S.pack(o, s) for o, s in ram.sparse_areas)
            caps = (protocol.CAP_HDR_S.pack(protocol.REGION_CAP_SPARSE_MMAP, 1, 0)
                    + protocol.SPARSE_HDR_S.pack(len(ram.sparse_areas), 0) + areas)
        needed = protocol.REGION_INFO_S.size + len(caps)
        if needed > argsz:  # the client retries with a buffer this large
            return protocol.REGION_INFO_S.pack(needed, flags, index, 0, size, 0), []
        out = protocol.REGION_INFO_S.pack(needed, flags, index, cap_offset, size, 0) + caps
        return out, ([ram.fd] if ram is not None else [])

    def _irq_info(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.IRQ_INFO_S.size, "DEVICE_GET_IRQ_INFO")
        argsz, _flags, index, _count = protocol.IRQ_INFO_S.unpack_from(body)
        if argsz < protocol.IRQ_INFO_S.size:
            raise VfioUserError(errno.EINVAL, f"DEVICE_GET_IRQ_INFO: argsz {argsz}")
        if index >= protocol.NUM_IRQS:
            raise VfioUserError(errno.EINVAL, f"DEVICE_GET_IRQ_INFO: no IRQ index {index}")
        flags = protocol.IRQ_INFO_EVENTFD
        if index == protocol.IRQ_INTX:
            flags |= protocol.IRQ_INFO_MASKABLE | protocol.IRQ_INFO_AUTOMASKED
        return protocol.IRQ_INFO_S.pack(protocol.IRQ_INFO_S.size, flags, index, self.irq_count(index)), []

    def irq_count(self, index: int) -> int:
        """Vectors of IRQ ``index`` (ERR and REQ: 0)."""
        dev = self.device
        if index == protocol.IRQ_INTX:
            return 1 if dev.interrupt_pin else 0
        if index == protocol.IRQ_MSI:
            msi = dev.caps.find(MsiCapability)
            return msi.nvectors if msi is not None else 0
        if index == protocol.IRQ_MSIX:
            msix = dev.caps.find(MsixCapability)
            return msix.nvectors if msix is not None else 0
        return 0

    # interrupts ------------------------------------------------------------------------------
    def _msix_mask(self, vector: int, masked: bool) -> None:
        """QEMU emulates the MSI-X table: mirror "has an eventfd" as the vector's mask bit."""
        msix = self.device.caps.find(MsixCapability)
        if msix is not None and vector < msix.nvectors:
            msix.table_write(vector * ENTRY_SIZE + ENTRY_CTRL, 4, 1 if masked else 0)

    def _assign(self, index: int, vector: int, fd: int | None) -> None:
        """Give (or with None take away) ``vector``'s eventfd; under the IRQ lock."""
        sink = self.endpoint.sink
        if index == protocol.IRQ_INTX:
            old = sink.intx_fd
            sink.intx_fd = fd
        else:
            old = sink.vector_fds.get(vector)
            sink.set_vector(vector, fd)
        if old is not None and old != fd:
            close_fds([old])
        if fd is None:
            self.irq_vectors[index].discard(vector)
        else:
            self.irq_vectors[index].add(vector)
        if index == protocol.IRQ_MSIX:
            self._msix_mask(vector, fd is None)

    def _set_irqs(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.SET_IRQS_S.size, "DEVICE_SET_IRQS")
        argsz, flags, index, start, count = protocol.SET_IRQS_S.unpack_from(body)
        if argsz < protocol.SET_IRQS_S.size:
            raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: argsz {argsz}")
        if flags & ~(protocol.IRQ_SET_DATA_MASK | protocol.IRQ_SET_ACTION_MASK_ALL):
            raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: unknown flags {flags:#x}")
        data = flags & protocol.IRQ_SET_DATA_MASK
        action = flags & protocol.IRQ_SET_ACTION_MASK_ALL
        if data not in (protocol.IRQ_SET_DATA_NONE, protocol.IRQ_SET_DATA_BOOL, protocol.IRQ_SET_DATA_EVENTFD) \
                or action not in (protocol.IRQ_SET_ACTION_MASK, protocol.IRQ_SET_ACTION_UNMASK,
                                  protocol.IRQ_SET_ACTION_TRIGGER):
            raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: flags {flags:#x} need one data type and one action")
        if index >= protocol.NUM_IRQS:
            raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: no IRQ index {index}")
        nvec = self.irq_count(index)
        if data == protocol.IRQ_SET_DATA_EVENTFD and fds and len(fds) != count:
            raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: count {count} but {len(fds)} fds")
        if data != protocol.IRQ_SET_DATA_EVENTFD and fds:
            raise VfioUserError(errno.EINVAL, "DEVICE_SET_IRQS: fds without DATA_EVENTFD")
        irq = self.device.irq
        if count == 0:
            if data == protocol.IRQ_SET_DATA_NONE and action == protocol.IRQ_SET_ACTION_TRIGGER:
                with irq.lock:  # disable the whole index
                    for v in sorted(self.irq_vectors[index]):
                        self._assign(index, v, None)
                return b"", []
            if start > nvec:
                raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: start {start} beyond {nvec} vectors")
            return b"", []
        if start + count > nvec:
            raise VfioUserError(errno.EINVAL,
                                f"DEVICE_SET_IRQS: vectors {start}+{count} beyond the {nvec} of index {index}")
        if data == protocol.IRQ_SET_DATA_BOOL:
            self._need(body, protocol.SET_IRQS_S.size + count, "DEVICE_SET_IRQS (bools)")
        if index == protocol.IRQ_INTX and action in (protocol.IRQ_SET_ACTION_MASK, protocol.IRQ_SET_ACTION_UNMASK):
            if data == protocol.IRQ_SET_DATA_EVENTFD:
                # the KVM resample fd: not needed (the line is re-signalled on unmask)
                close_fds(fds)
                fds.clear()
                return b"", []
            flag = bool(body[protocol.SET_IRQS_S.size]) if data == protocol.IRQ_SET_DATA_BOOL else True
            if flag:
                with irq.lock:
                    if action == protocol.IRQ_SET_ACTION_MASK:
                        self.conn.intx_masked = True
                    else:
                        self.conn.intx_masked = False
                        fd = self.endpoint.sink.intx_fd
                        if fd is not None and self.endpoint.intx_level:
                            os.eventfd_write(fd, 1)  # still asserted: level-triggered
            return b"", []
        if action != protocol.IRQ_SET_ACTION_TRIGGER:
            # MSI/MSI-X masking is QEMU's job (it emulates the table); accept and ignore
            close_fds(fds)
            fds.clear()
            return b"", []
        if data == protocol.IRQ_SET_DATA_EVENTFD:
            taken = list(fds)
            fds.clear()
            with irq.lock:
                for i in range(count):
                    self._assign(index, start + i, taken[i] if taken else None)
            return b"", []
        # DATA_NONE / DATA_BOOL with TRIGGER: fire the vectors now (loopback test)
        with irq.lock:
            for i in range(count):
                if data == protocol.IRQ_SET_DATA_BOOL and not body[protocol.SET_IRQS_S.size + i]:
                    continue
                v = start + i
                fd = self.endpoint.sink.intx_fd if index == protocol.IRQ_INTX else self.endpoint.sink.vector_fds.get(v)
                if fd is not None:
                    os.eventfd_write(fd, 1)
        return b"", []

    # region accesses --------------------------------------------------------------------------
    def _region_check(self, region: int, offset: int, count: int) -> int:
        if region >= protocol.NUM_REGIONS:
            raise VfioUserError(errno.EINVAL, f"no region {region}")
        size, flags, _ram = self.region_layout(region)
        if count == 0 or count > self.max_data_xfer_size:
            raise VfioUserError(errno.EINVAL, f"access of {count} bytes")
        if offset + count > size:
            raise VfioUserError(errno.EINVAL, f"access {offset:#x}+{count} outside region {region} ({size:#x})")
        return flags

    def read_region(self, region: int, offset: int, count: int) -> bytes:
        """``count`` bytes of ``region`` at ``offset`` (validated)."""
        self._region_check(region, offset, count)
        ep = self.endpoint
        out = bytearray()
        if region == protocol.CONFIG_REGION:
            for pos, w in _chunks(offset, count, (4, 2, 1)):
                out += ep.config_read(pos, w).to_bytes(w, "little")
        elif region == protocol.ROM_REGION:
            rom = self.device.rom
            assert rom is not None  # without a ROM the region is 0 bytes: _region_check refused the access
            out += rom[offset:offset + count]
        else:
            for pos, w in _chunks(offset, count, (8, 4, 2, 1)):
                out += ep.bar_read(region, pos, w, False).to_bytes(w, "little")
        return bytes(out)

    def write_region(self, region: int, offset: int, data: bytes) -> None:
        """Write ``data`` to ``region`` at ``offset`` (validated)."""
        flags = self._region_check(region, offset, len(data))
        if not flags & protocol.REGION_FLAG_WRITE:
            raise VfioUserError(errno.EINVAL, f"region {region} is read-only")
        ep = self.endpoint
        if region == protocol.CONFIG_REGION:
            for pos, w in _chunks(offset, len(data), (4, 2, 1)):
                ep.config_write(pos, w, int.from_bytes(data[pos - offset:pos - offset + w], "little"))
        else:
            for pos, w in _chunks(offset, len(data), (8, 4, 2, 1)):
                ep.bar_write(region, pos, w, int.from_bytes(data[pos - offset:pos - offset + w], "little"), False)

    def _region_read(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.REGION_ACCESS_S.size, "REGION_READ")
        offset, region, count = protocol.REGION_ACCESS_S.unpack_from(body)
        data = self.read_region(region, offset, count)
        return protocol.REGION_ACCESS_S.pack(offset, region, len(data)) + data, []

    def _region_write(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.REGION_ACCESS_S.size, "REGION_WRITE")
        offset, region, count = protocol.REGION_ACCESS_S.unpack_from(body)
        data = body[protocol.REGION_ACCESS_S.size:]
        if len(data) != count:
            raise VfioUserError(errno.EINVAL, f"REGION_WRITE: count {count} but {len(data)} data bytes")
        self.write_region(region, offset, data)
        return protocol.REGION_ACCESS_S.pack(offset, region, count), []

    def _write_multi(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.WRITE_MULTI_HDR_S.size, "REGION_WRITE_MULTI")
        (n,) = protocol.WRITE_MULTI_HDR_S.unpack_from(body)
        if n > 200 or len(body) != protocol.WRITE_MULTI_HDR_S.size + n * protocol.WRITE_MULTI_ENTRY_S.size:
            raise VfioUserError(errno.EINVAL, f"REGION_WRITE_MULTI: {n} entries in {len(body)} bytes")
        entries = [protocol.WRITE_MULTI_ENTRY_S.unpack_from(body, protocol.WRITE_MULTI_HDR_S.size + i * 24)
                   for i in range(n)]
        for _off, _reg, count, _data in entries:
            if not 1 <= count <= 8:
                raise VfioUserError(errno.EINVAL, f"REGION_WRITE_MULTI: count {count}")
        for off, reg, count, data in entries:
            self.write_region(reg, off, data[:count])
        return protocol.WRITE_MULTI_HDR_S.pack(n), []

    def _reset(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        dev = self.device
        with dev.lock:
            dev.reset(ResetKind.FLR)
            with dev.irq.lock:  # the table was masked by the reset; eventfds stay
                for v in self.irq_vectors[protocol.IRQ_MSIX]:
                    self._msix_mask(v, False)
        self.conn.intx_masked = False
        return b"", []

    _HANDLERS = {
        protocol.VERSION: _version, protocol.DMA_MAP: _dma_map, protocol.DMA_UNMAP: _dma_unmap,
        protocol.DEVICE_GET_INFO: _device_info,
        protocol.DEVICE_GET_REGION_INFO: _region_info, protocol.DEVICE_GET_IRQ_INFO: _irq_info,
        protocol.DEVICE_SET_IRQS: _set_irqs, protocol.REGION_READ: _region_read, protocol.REGION_WRITE: _region_write,
        protocol.REGION_WRITE_MULTI: _write_multi, protocol.DEVICE_RESET: _reset,
    }
