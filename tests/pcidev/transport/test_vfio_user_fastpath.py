"""The vfio-user fast path: posted doorbell writes in one device batch, never across a reply."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from pcidev.device import PciDevice
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.vfio_user import loop as loop_mod
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.fastpath import doorbell_window
from pcidev.transport.vfio_user.server import VfioUserServer
from pcidev_nvme.controller import NvmeController


class _Bar0:
    def __init__(self, log: list[tuple[object, ...]]) -> None:
        self.events = log

    def read(self, offset: int, size: int) -> int:
        self.events.append(("read", offset))
        return 0x5A

    def write(self, offset: int, size: int, value: int) -> None:
        self.events.append(("write", offset, value))


class DoorbellDevice(PciDevice):
    """Records BAR0 accesses, batches and polling; doorbells at 0x100..0x200 of BAR0."""

    VENDOR_ID = 0x1234
    DEVICE_ID = 0x0DB0
    CLASS_CODE = 0x00FF00
    DOORBELL_WINDOW = (0, 0x100, 0x200)

    def __init__(self, work: int = 0) -> None:
        self.events: list[tuple[object, ...]] = []
        self.work = work  # poll_work finds work this many times
        super().__init__()

    def describe(self) -> None:
        self.add_mem_bar(0, 4096, _Bar0(self.events))

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        self.events.append(("batch",))
        try:
            yield
        finally:
            self.events.append(("end",))

    def batch(self) -> contextlib.AbstractContextManager[None]:
        return self._batch()

    def poll_work(self) -> bool:
        self.events.append(("poll",))
        if self.work:
            self.work -= 1
            return True
        return False

    def set_polling(self, active: bool) -> None:
        self.events.append(("polling", active))


def _write(mid: int, offset: int, value: int, *, posted: bool = True) -> bytes:
    body = protocol.REGION_ACCESS_S.pack(offset, 0, 4) + value.to_bytes(4, "little")
    return protocol.message(mid, protocol.REGION_WRITE, body, protocol.FLAG_NO_REPLY if posted else 0)


def _read(mid: int, offset: int) -> bytes:
    return protocol.message(mid, protocol.REGION_READ, protocol.REGION_ACCESS_S.pack(offset, 0, 4))


@pytest.fixture
def served():
    dev = DoorbellDevice()
    ep = DeviceEndpoint(dev)
    ep.start()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = VfioUserServer(ep, a)
    yield dev, server, b
    b.close()
    ep.close()


def _accesses(events: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """The events without polling: the loop may poll (and announce it) while it waits for
    the client's shutdown, and its re-check after arming runs a poll in a batch of its own.
    A loaded machine delays the shutdown past the hot poll's timeout, so how often that
    happens is timing; what the tests check is the order of batches, accesses and replies."""
    out: list[tuple[object, ...]] = []
    for e in events:
        if e[0] in ("polling", "poll"):
            continue
        if e == ("end",) and out and out[-1] == ("batch",):
            out.pop()  # a batch that held nothing but a poll
            continue
        out.append(e)
    return out


def _run(server: VfioUserServer, client: socket.socket, data: bytes, replies: int) -> list[bytes]:
    """Send ``data`` in one write, serve until the client closes, return the replies."""
    out: list[bytes] = []
    t = threading.Thread(target=server.serve, daemon=True)
    client.sendall(data)
    t.start()
    cl = VfioUserClient(client, timeout=10)
    for _ in range(replies):
        out.append(cl.recv().payload)
    client.shutdown(socket.SHUT_WR)
    t.join(10)
    assert not t.is_alive()
    return out


def test_posted_doorbell_writes_go_in_one_batch_that_ends_before_a_reply(served):
    dev, server, client = served
    data = (_write(1, 0x100, 1) + _write(2, 0x100, 2) + _write(3, 0x104, 3) + _read(4, 0x0)
            + _write(5, 0x100, 4) + _write(6, 0x10, 9) + _write(7, 0x108, 5, posted=False) + _write(8, 0x108, 6))
    replies = _run(server, client, data, 2)
    assert len(replies) == 2
    assert _accesses(dev.events) == [
        ("batch",), ("write", 0x100, 2), ("write", 0x104, 3), ("end",),   # 1 and 2 collapse to the last value
        ("read", 0x0),                                                    # the reply goes out after the batch
        ("batch",), ("write", 0x100, 4), ("end",),
        ("write", 0x10, 9),                                               # outside the doorbell window: generic
        ("write", 0x108, 5),                                              # not posted: generic, with a reply
        ("batch",), ("write", 0x108, 6), ("end",),
    ]
    fast = server.loop.fast
    assert fast is not None and (fast.writes, fast.coalesced) == (5, 1)
    assert server.counts["REGION_WRITE"] == 7 and server.counts["REGION_READ"] == 1


def test_outside_the_running_migration_state_every_write_takes_the_generic_path(served):
    dev, server, client = served
    server.conn.mig_state = 0  # STOP
    _run(server, client, _write(1, 0x100, 1) + _write(2, 0x100, 2), 0)
    assert _accesses(dev.events) == [("write", 0x100, 1), ("write", 0x100, 2)]  # no batch, nothing collapsed
    assert server.loop.fast is not None and server.loop.fast.writes == 0


def test_adaptive_polling_polls_while_work_comes_then_arms_and_looks_again(served, monkeypatch):
    dev, server, client = served
    monkeypatch.setattr(loop_mod, "HOT_WINDOW", 0.05)
    dev.work = 3
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    client.sendall(_write(1, 0x100, 1))
    deadline = threading.Event()
    for _ in range(200):
        if dev.events.count(("polling", False)) >= 1:
            break
        deadline.wait(0.01)
    client.shutdown(socket.SHUT_WR)
    t.join(10)
    assert not t.is_alive()
    log = dev.events
    on = log.index(("polling", True))
    assert log.index(("write", 0x100, 1)) < on  # hot after the burst
    off = log.index(("polling", False))
    polls = [e for e in log[on:off] if e == ("poll",)]
    assert len(polls) >= 4  # three that found work, then at least one empty one
    assert log[off + 1:off + 2] == [("batch",)] and log[off + 2] == ("poll",)  # the re-check after arming
    assert log[-1] == ("polling", False) or ("polling", True) not in log[off:]


def test_a_device_without_poll_work_is_never_polled():
    ctrl = NvmeController("ns=mem:size=1M")
    try:
        ep = DeviceEndpoint(ctrl)
        a, b = socket.socketpair()
        with a, b:
            fast = VfioUserServer(ep, a).loop.fast
            assert fast is not None
            assert fast.polls == (type(ctrl).poll_work is not PciDevice.poll_work)
            bar0 = ctrl.bars[0]
            assert fast.window is not None and bar0 is not None
            bar, lo, hi = fast.window
            assert (bar, lo) == (0, 0x1000) and hi <= bar0.size
        ep.close()
    finally:
        ctrl.close()


def test_the_nvme_doorbell_window_stops_at_the_msix_table():
    for props, table_in_bar0 in (("ns=mem:size=1M", True), ("ns=mem:size=1M,msix_bar=4", False)):
        ctrl = NvmeController(props)
        try:
            window = doorbell_window(ctrl)
            assert window is not None and window[:2] == (0, 0x1000)
            bar0 = ctrl.bars[0]
            assert bar0 is not None
            if table_in_bar0:
                assert window[2] < bar0.size
            else:
                assert window[2] == bar0.size
        finally:
            ctrl.close()
