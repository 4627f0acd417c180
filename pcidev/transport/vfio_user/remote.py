"""The software host's view of a device served over vfio-user: :class:`VfioUserDevice`.

:class:`VfioUserDevice` has the surface :class:`pcidev.host.Machine` drives
(``realize``/``attach``/``config_read``/``config_write``/``bar_read``/``bar_write``/
``rom_read``), so ``machine.plug(VfioUserDevice.connect(path))`` drives a device that
``pcidev serve --vfio-user PATH`` serves in another process, the way QEMU's
``vfio-user-pci`` does: the machine's guest RAM is passed to the server as memfds
(``DMA_MAP``), each MSI-X vector gets an eventfd (``DEVICE_SET_IRQS``), BAR writes are
posted, and the MSI-X table is shadowed here so that a vector's eventfd becomes the
message (address, data) the host programmed into that table entry.

The connection can change under the same proxy (the host keeps driving the same
object): :meth:`VfioUserDevice.reconnect` opens a new connection to a server whose
previous client left (it re-sends VERSION, maps the same memory and installs the same
eventfds), and :meth:`VfioUserDevice.retarget` switches to the destination of a
migration (:func:`pcidev.transport.vfio_user.migration_client.migrate`). Neither may run
while the host accesses the device.

INTx: vfio-user signals an assertion through the eventfd and has no message for the
deassertion, so each signal is delivered to the sink as a pulse (``intx(True)`` then
``intx(False)``). MSI (not MSI-X) is not routed.
"""

from __future__ import annotations

import os
from types import TracebackType

from pcidev.dma import GuestMemory
from pcidev.errors import TransportError
from pcidev.irq import InterruptSink
from pcidev.pci.capabilities.msix import ENTRY_SIZE, TABLE
from pcidev.transport.irq_eventfds import InterruptEventfds
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.client import VfioUserClient

__all__ = ["VfioUserDevice"]

_PCI_CAP_ID_MSIX = 0x11


class VfioUserDevice:
    """A device in another process, reached over vfio-user, for :meth:`pcidev.host.Machine.plug`.

    :param client: a connected client after VERSION (owned from now on; closed by :meth:`close`).
    :raises TransportError: the server is not a PCI device.
    """

    realized = True

    def __init__(self, client: VfioUserClient, *, path: str | os.PathLike[str] | None = None) -> None:
        self.client = client
        #: the socket path connected to (what :meth:`reconnect` uses by default)
        self.path = os.fspath(path) if path is not None else None
        self._memory: GuestMemory | None = None
        info = client.device_info()
        if not info.flags & protocol.DEVICE_FLAGS_PCI:
            raise TransportError("vfio-user: the server's device is not a PCI device")
        self.vendor_id = client.config_read(0x00, 2)
        self.device_id = client.config_read(0x02, 2)
        self.msix_vectors = client.irq_info(protocol.IRQ_MSIX).count if info.num_irqs > protocol.IRQ_MSIX else 0
        self.has_intx = client.irq_info(protocol.IRQ_INTX).count > 0 if info.num_irqs > protocol.IRQ_INTX else False
        #: (BAR, offset) of the MSI-X table, if the device has one
        self.msix_table: tuple[int, int] | None = None
        pos = client.find_capability(_PCI_CAP_ID_MSIX) if self.msix_vectors else None
        if pos is not None:
            table = client.config_read(pos + TABLE, 4)
            self.msix_table = (table & 7, table & ~7)
        self._shadow = bytearray(self.msix_vectors * ENTRY_SIZE)
        self._sink: InterruptSink | None = None
        self._irqs: InterruptEventfds | None = None
        self._closing = False

    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float = 10.0) -> VfioUserDevice:
        """Connect to the vfio-user socket ``path``, negotiate, and read the device's identity.

        :param path: the socket of ``pcidev serve --vfio-user PATH`` (or any vfio-user server).
        :param timeout: seconds each request may take (see :class:`~pcidev.transport.vfio_user.client.VfioUserClient`).
        :raises TransportError: nobody serves there, or the server misbehaved.
        """
        client = VfioUserClient.connect(path, timeout=timeout)
        try:
            return cls(client, path=path)
        except BaseException:
            client.close()
            raise

    def __repr__(self) -> str:
        return f"<VfioUserDevice {self.vendor_id:04x}:{self.device_id:04x}>"

    # -- the device surface the host uses ---------------------------------------------
    def realize(self) -> None:
        """Nothing to do: the device was realized in its own process."""

    def config_read(self, offset: int, size: int) -> int:
        """A configuration read (``REGION_READ`` of the config region)."""
        return self.client.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A configuration write (acknowledged)."""
        self.client.config_write(offset, size, value)

    def bar_read(self, index: int, offset: int, size: int, *, check_decode: bool = True) -> int:
        """A BAR read (``REGION_READ``); ``check_decode`` is the server's business."""
        return self.client.read_int(index, offset, size)

    def bar_write(self, index: int, offset: int, size: int, value: int, *, check_decode: bool = True) -> None:
        """A posted BAR write; writes to the MSI-X table are also kept in the shadow table."""
        if self.msix_table is not None and index == self.msix_table[0]:
            rel = offset - self.msix_table[1]
            if 0 <= rel and rel + size <= len(self._shadow):
                self._shadow[rel:rel + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        self.client.write_int(index, offset, size, value, posted=True)

    def rom_read(self, offset: int, size: int) -> int:
        """An expansion ROM read."""
        return self.client.read_int(protocol.ROM_REGION, offset, size)

    def route(self, vector: int) -> tuple[int, int]:
        """The MSI-X message ``(address, data)`` the host programmed for ``vector``."""
        base = vector * ENTRY_SIZE
        lo, hi, data = (int.from_bytes(self._shadow[base + i:base + i + 4], "little") for i in (0, 4, 8))
        return hi << 32 | lo, data

    # -- attach: memory and interrupts ----------------------------------------------------
    def attach(self, memory: GuestMemory | None, sink: InterruptSink | None) -> None:
        """Give the server ``memory``'s regions (``DMA_MAP`` of their memfds) and route
        the device's MSI-X vectors and INTx to ``sink`` through eventfds.

        :param memory: the host's guest memory (None: none).
        :param sink: where interrupts go (None: nowhere).
        """
        if memory is not None:
            self._memory = memory
            self._map_memory(self.client, memory)
        self._sink = sink
        if sink is None or self._irqs is not None or self._closing:
            return
        irqs = self._irqs = InterruptEventfds(self.msix_vectors, self.has_intx, name="vfio-user-irq")
        self._install_eventfds(self.client)
        irqs.start(self._deliver_vector, self._deliver_intx)

    @property
    def memory(self) -> GuestMemory | None:
        """The guest memory the server was given (:meth:`attach`, :meth:`reconnect`)."""
        return self._memory

    @staticmethod
    def _map_memory(client: VfioUserClient, memory: GuestMemory) -> None:
        for region, fd in memory.fds():
            client.dma_map(region.gpa, region.size, fd, region.fd_offset, writable=region.writable)

    def _install_eventfds(self, client: VfioUserClient) -> None:
        irqs = self._irqs
        if irqs is None:
            return
        if irqs.vector_fds:
            client.set_irq_eventfds(protocol.IRQ_MSIX, irqs.vector_fds)
        if irqs.intx_fd is not None:
            client.set_irq_eventfds(protocol.IRQ_INTX, [irqs.intx_fd])

    def establish(self, client: VfioUserClient) -> None:
        """Give the server behind ``client`` what this proxy gave its own: the guest
        memory (``DMA_MAP`` of the same fds) and the interrupt eventfds
        (``DEVICE_SET_IRQS``). For a reconnect and a migration's destination.

        :param client: a connected client after VERSION.
        """
        if self._memory is not None:
            self._map_memory(client, self._memory)
        self._install_eventfds(client)

    # -- a new connection ------------------------------------------------------------------
    def reconnect(self, path: str | os.PathLike[str] | None = None, *, memory: GuestMemory | None = None,
                  timeout: float | None = None) -> None:
        """Connect again to a server whose client left (this proxy's, or one that died):
        close the old connection first (a vfio-user server serves one client at a time
        and closes a second one at once), then open a new one, send VERSION, map the
        guest memory and install the same eventfds. The server resumes the device at the
        first BAR access.

        :param path: the socket (default: the one :meth:`connect` used).
        :param memory: the guest memory to map from now on (default: the one :meth:`attach` gave).
        :param timeout: seconds per request (default: the old connection's).
        :raises TransportError: the server cannot be reached or refused the setup (the
            proxy keeps the old, closed connection).
        """
        where = path if path is not None else self.path
        if where is None:
            raise TransportError("vfio-user: reconnect needs a socket path (the proxy was not made by connect())")
        timeout = self.client.timeout if timeout is None else timeout
        self.client.close()  # before connecting: the server takes the next client only once this one left
        client = VfioUserClient.connect(where, timeout=timeout)
        old_memory = self._memory
        try:
            if memory is not None:
                self._memory = memory
            self.establish(client)
        except BaseException:
            self._memory = old_memory
            client.close()
            raise
        self.client = client
        self.path = os.fspath(where)

    def retarget(self, client: VfioUserClient, *, path: str | os.PathLike[str] | None = None) -> VfioUserClient:
        """Drive the device through ``client`` from now on (a migration's destination,
        already given the memory and eventfds: :meth:`establish`). The MSI-X shadow
        table and the eventfds stay.

        :param client: the new connection (owned by the proxy from now on).
        :param path: its socket path, for :meth:`reconnect` (default: unknown).
        :returns: the previous connection (the caller's: close it when done with it).
        """
        old, self.client = self.client, client
        self.path = os.fspath(path) if path is not None else None
        return old

    def _deliver_vector(self, vector: int, count: int) -> None:
        sink = self._sink
        if sink is not None:
            address, data = self.route(vector)
            for _ in range(count):
                sink.msi(vector, address, data)

    def _deliver_intx(self) -> None:
        sink = self._sink
        if sink is not None:  # vfio-user has no message for the line going low: a pulse
            sink.intx(True)
            sink.intx(False)

    # -- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop interrupt delivery, close the connection and the eventfds. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._irqs is not None:
            self._irqs.close()
        self.client.close()

    def __enter__(self) -> VfioUserDevice:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
