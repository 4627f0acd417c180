"""A vfio-user client that leaves is not a dead device: the server unmaps the client's
memory and drops its eventfds but keeps the device, and serves the next client
(``VfioUserDevice.reconnect``). NVMe with a file namespace, verified I/O on two queues
with an AER outstanding, across reconnects."""

from __future__ import annotations

import fcntl
import os
import select
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nvme_blocks import Pattern, host_writes

from pcidev.devices.edu import EduDevice
from pcidev.dma import GuestMemory, alloc_memfd
from pcidev.host.machine import Machine
from pcidev.pci.capabilities.msix import MsixCapability
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import close_fds
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev.transport.vfio_user.server import ExtraClientGuard, VfioUserServer
from pcidev_nvme.testing.driver import NvmeDriver

HERE = Path(__file__).resolve().parent


class Server:
    """``persistent_server.py`` in a process: serve_device(once=False)."""

    def __init__(self, path: str, spec: str) -> None:
        self.path = path
        self.proc = subprocess.Popen([sys.executable, str(HERE / "persistent_server.py"), path, spec],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._buf = ""
        self.wait_for("listening on", 30)

    def wait_for(self, text: str, timeout: float = 10.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while sum(text in line for line in self.lines) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"server never printed {text!r} x{count}: {self.lines}"
            if self._sel.select(left):
                chunk = self.proc.stdout.read()
                assert chunk, f"server ended: {self.lines} {self._buf}"
                self._buf += chunk
                *done, self._buf = self._buf.split("\n")
                self.lines.extend(done)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._sel.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def nvme_server(tmp_path: Path) -> Iterator[Server]:
    server = Server(str(tmp_path / "nvme.sock"), f"nvme,ns=file:path={tmp_path}/ns.img,size=4M")
    try:
        yield server
    finally:
        server.stop()
    assert server.proc.returncode in (0, -15, 143), server.lines


def error_event(drv: NvmeDriver, remote: VfioUserDevice) -> list[tuple[int, int, int]]:
    """Ring the doorbell of an SQ that does not exist: the outstanding AER completes."""
    remote.bar_write(0, 0x1000 + 8 * 9, 4, 1)
    return drv.poll_events(2.0)


def split_memory(machine: Machine) -> GuestMemory:
    """The machine's RAM, remapped as two regions (other fds, other map table)."""
    mem = GuestMemory()
    half = machine.ram_size // 2
    mem.map(0, half, machine.ram_fd, 0, name="low")
    mem.map(half, machine.ram_size - half, machine.ram_fd, half, name="high")
    return mem


def test_a_client_that_leaves_and_comes_back_finds_its_device(nvme_server: Server) -> None:
    with Machine(ram_size=64 << 20) as machine:
        remote = VfioUserDevice.connect(nvme_server.path)
        mem2: GuestMemory | None = None
        try:
            drv = NvmeDriver.attach(machine, remote, io_queues=2, io_depth=32, aers=1)
            pattern = Pattern()
            for i in range(16):
                pattern.write(drv, i * 8, qid=1 + i % 2)
            pattern.verify(drv)
            writes = host_writes(drv)
            assert writes >= 16

            # the client goes away (only its socket closes) and connects again at once
            remote.client.close()
            remote.reconnect()
            nvme_server.wait_for("client left")
            assert drv.csts & 1, "CSTS.RDY after the reconnect"
            pattern.verify(drv)  # both queues still exist, the data is there
            for i in range(16, 20):
                pattern.write(drv, i * 8, qid=1 + i % 2)
            pattern.verify(drv)
            assert host_writes(drv) == writes + 4  # SMART counted on
            assert error_event(drv, remote) == [(0, 0x00, 0x01)]  # the AER outstanding before

            # a second reconnect, with the memory mapped differently
            remote.client.close()
            nvme_server.wait_for("client left", count=2)
            mem2 = split_memory(machine)
            remote.reconnect(memory=mem2)
            assert drv.csts & 1
            pattern.verify(drv, qids=(2, 1))
            pattern.write(drv, 20 * 8, qid=2)
            pattern.verify(drv)
            assert host_writes(drv) == writes + 5
            drv.close()
        finally:
            remote.close()
            if mem2 is not None:
                mem2.close()


def test_a_second_client_is_closed_at_once_and_the_first_keeps_its_device(nvme_server: Server) -> None:
    with Machine(ram_size=32 << 20) as machine, VfioUserDevice.connect(nvme_server.path) as remote:
        drv = NvmeDriver.attach(machine, remote, io_queues=1, io_depth=16)
        pattern = Pattern()
        pattern.write(drv, 0, qid=1)
        intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        intruder.settimeout(10)
        intruder.connect(nvme_server.path)
        assert intruder.recv(16) == b""  # accepted and closed, not left waiting
        intruder.close()
        pattern.verify(drv, qids=(1,))
        pattern.write(drv, 8, qid=1)
        pattern.verify(drv, qids=(1,))
        drv.close()
    # the first client left; a new one is served (its device still enabled)
    nvme_server.wait_for("client left")
    with VfioUserDevice.connect(nvme_server.path) as again:
        assert again.bar_read(0, 0x1C, 4) & 1  # CSTS.RDY: drv.close() did not shut down


# -- what a disconnect tears down, and what resumes the device (in process) ----------------------
def _connect(ep: DeviceEndpoint) -> tuple[VfioUserServer, VfioUserClient, threading.Thread, dict[str, str]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = VfioUserServer(ep, a)
    result: dict[str, str] = {}
    t = threading.Thread(target=lambda: result.setdefault("reason", server.serve()), daemon=True)
    t.start()
    client = VfioUserClient(b, timeout=10)
    client.version()
    return server, client, t, result


@pytest.mark.parametrize("wake", ["bar-read", "bar-write", "reset"])
def test_disconnect_tears_down_the_connection_and_the_next_client_resumes_the_device(wake: str) -> None:
    ep = DeviceEndpoint(EduDevice())
    ep.start()
    dev = ep.device
    fd = alloc_memfd(1 << 20)
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    try:
        server, client, t, result = _connect(ep)
        client.dma_map(0, 1 << 20, fd)
        client.dma_map(1 << 20, 1 << 20, None)  # a range without an fd
        client.set_irq_eventfds(protocol.IRQ_MSIX, efds)
        msix = dev.caps.find(MsixCapability)
        assert msix is not None and not msix.entry(0)[2]
        client.close()
        t.join(10)
        assert result["reason"] == "eof"
        assert ep.memory.regions() == [] and server.nofd_maps == {}
        assert ep.sink.vector_fds == {} and ep.sink.intx_fd is None
        assert msix.entry(0)[2] and msix.entry(1)[2]  # masked: interrupts latch as pending now
        assert dev.quiesced and server.dormant and server.counts["DMA_MAP"] == 2

        server, client, t, result = _connect(ep)
        client.device_info()
        client.config_read(0, 4)
        client.region_info(0)
        assert dev.quiesced  # config and info requests do not resume it
        if wake == "bar-read":
            assert client.read_int(0, 0, 4) == 0x010000ED  # edu's identification register
        elif wake == "bar-write":
            client.write_int(0, 4, 4, 0x12345678)
        else:
            client.reset()
        assert not dev.quiesced and not server.dormant
        client.close()
        t.join(10)
    finally:
        close_fds(efds + [fd])
        ep.close()


# -- review regressions: reconnect ordering and the guard -----------------------------------------
def test_reconnect_with_the_old_connection_still_open(tmp_path: Path) -> None:
    server = Server(str(tmp_path / "edu.sock"), "edu")
    try:
        with VfioUserDevice.connect(server.path) as remote:
            remote.bar_write(0, 0x04, 4, 0x0BADF00D)  # edu's scratch register: the card-liveness check
            assert remote.bar_read(0, 0x04, 4) == 0xF4520FF2  # it reads the complement
            old = remote.client
            remote.reconnect()  # the old connection is open: it must be closed first
            assert old.closed and remote.client is not old
            assert remote.bar_read(0, 0x04, 4) == 0xF4520FF2  # the same device, its state kept
        server.wait_for("client left", count=2)
    finally:
        server.stop()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "guard.sock"))
    sock.listen(4)
    yield sock
    sock.close()


def test_the_guard_takes_a_newcomer_as_the_next_client_once_the_old_one_closed(listener: socket.socket) -> None:
    served, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    newcomer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with ExtraClientGuard(listener, served, grace=30) as guard:
            newcomer.connect(listener.getsockname())  # before the served client leaves...
            peer.close()                              # ...which it does within the grace
            guard._thread.join(30)
        assert guard.next_client is not None
        guard.next_client.sendall(b"ping")
        assert newcomer.recv(4) == b"ping"  # the newcomer's connection, kept open
        guard.next_client.close()
        assert listener.gettimeout() is None  # blocking again for the accept loop
    finally:
        for s in (served, peer, newcomer):
            s.close()


def test_the_guard_closes_a_second_client_and_stops_when_the_listener_fails(listener: socket.socket) -> None:
    served, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with ExtraClientGuard(listener, served, grace=0.01) as guard:
            intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            intruder.settimeout(10)
            intruder.connect(listener.getsockname())
            assert intruder.recv(16) == b""  # closed: the served client is still there
            intruder.close()
            listener.shutdown(socket.SHUT_RDWR)  # POLLHUP, accept fails: the guard ends instead of spinning
            guard._thread.join(10)
            assert not guard._thread.is_alive()
        assert guard.next_client is None
    finally:
        served.close()
        peer.close()


def test_the_guard_never_changes_the_listeners_file_status(listener: socket.socket) -> None:
    """O_NONBLOCK belongs to the open file description, which a handover shares with the
    new process: the guard must not flip it (its accept waits for poll instead)."""
    served, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    before = fcntl.fcntl(listener.fileno(), fcntl.F_GETFL)
    try:
        with ExtraClientGuard(listener, served, grace=0.01):
            assert fcntl.fcntl(listener.fileno(), fcntl.F_GETFL) == before
            intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            intruder.settimeout(10)
            intruder.connect(listener.getsockname())
            assert intruder.recv(16) == b""  # still closes a second client
            intruder.close()
            assert fcntl.fcntl(listener.fileno(), fcntl.F_GETFL) == before
        assert fcntl.fcntl(listener.fileno(), fcntl.F_GETFL) == before
    finally:
        served.close()
        peer.close()


def test_a_paused_guard_accepts_nothing_until_resumed(listener: socket.socket) -> None:
    """Paused (a handover passes the listener on), the guard leaves newcomers queued for
    whoever serves next; resumed (rolled back), it closes them again."""
    served, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    newcomer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with ExtraClientGuard(listener, served, grace=0.01) as guard:
            guard.pause()
            assert not guard._thread.is_alive()
            newcomer.connect(listener.getsockname())
            assert select.select([listener], [], [], 0.3)[0] == [listener]  # still queued: nobody took it
            guard.resume()
            newcomer.settimeout(10)
            assert newcomer.recv(16) == b""
        assert guard.next_client is None
    finally:
        for s in (served, peer, newcomer):
            s.close()
