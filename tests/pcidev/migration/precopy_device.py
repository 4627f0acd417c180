"""A test device for the pre-copy tests: registers in BAR0, a memfd RAM BAR2 of a chosen
size, helpers to verify its contents page by page (CRC-32C), socket pairs, a peer in a
thread (:func:`in_thread`) and a destination in a thread whose frames are traced
(:class:`Incoming`)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import attrs
import crc32c
from killpoints import Tripwire

from pcidev.bar import RamBacking, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.migration import IncomingResult, migrate_in
from pcidev.vmstate import U32, vmstate

PAGE = 4096


@vmstate("test/precopy-device")
@attrs.frozen
class PrecopyDevState:
    x: U32


class PrecopyDev(PciDevice):
    """Registers in BAR0 (X), a memfd RAM BAR2 of ``size`` bytes (a power of two)."""

    TYPE_NAME = "test-precopy"
    CLASS_CODE = 0xFF0000
    VMSTATE = PrecopyDevState

    def __init__(self, size: int = 1 << 20, *, name: str | None = None) -> None:
        self.size = size
        super().__init__(name=name)

    def describe(self) -> None:
        self.regs = RegisterMap(4096, [Register("X", 0)])
        self.add_mem_bar(0, 4096, self.regs)
        self.ram = RamBacking(self.size, name="test-precopy-bar2")
        self.add_mem_bar(2, self.size, self.ram, bits64=True)

    def device_fingerprint(self) -> dict[str, int]:
        return {"size": self.size}

    def get_device_state(self) -> PrecopyDevState:
        return PrecopyDevState(x=self.regs["X"].value)

    def set_device_state(self, state: PrecopyDevState) -> None:
        self.regs["X"].value = state.x

    def on_close(self) -> None:
        self.ram.close()


def page_crcs(ram: RamBacking) -> list[int]:
    """The CRC-32C of every page of ``ram``."""
    mem = memoryview(ram.mem)
    try:
        return [crc32c.crc32c(mem[i:i + PAGE]) for i in range(0, ram.size, PAGE)]
    finally:
        mem.release()


def tcp_pair(*, buffers: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on the loopback (``buffers``: the sender's and receiver's
    socket buffer sizes, so that a large copy cannot sit in them whole)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    a = socket.socket()
    if buffers is not None:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    a.connect(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    if buffers is not None:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
    return a, b


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a daemon thread (a peer: a destination, a hand-made source); returns
    the thread, started, and a dict that gets ``"value"`` (what ``fn`` returned) or
    ``"error"`` (what it raised) when it ends."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


class Incoming:
    """A destination in a thread: :func:`~pcidev.migration.migrate_in` of ``dst`` on one end
    of ``pair`` (its end watched: :attr:`trace` lists the frames that went through it whole,
    read or written, in order); :attr:`sock` is the source's end. As a context manager it
    waits for the destination at the exit (and closes both ends); :attr:`result` or
    :attr:`error` then says how it ended.

    :param dst: the destination device.
    :param pair: ``(source's end, destination's end)``.
    :param kwargs: for ``migrate_in`` (``timeout`` 10 s by default).
    """

    def __init__(self, dst: PciDevice, pair: tuple[socket.socket, socket.socket], **kwargs: Any) -> None:
        self.sock, self._peer = pair
        self.wire = Tripwire(self._peer, None, lambda: None)
        self.result: IncomingResult | None = None
        self.error: BaseException | None = None
        kwargs.setdefault("timeout", 10)
        self._thread = threading.Thread(target=self._run, args=(dst, kwargs), name="incoming", daemon=True)

    def _run(self, dst: PciDevice, kwargs: dict[str, Any]) -> None:
        try:
            self.result = migrate_in(dst, self.wire, **kwargs)  # type: ignore[arg-type]
        except BaseException as exc:
            self.error = exc

    @property
    def trace(self) -> list[str]:
        """The frames that went through the destination's end whole, in order."""
        return self.wire.trace

    def __enter__(self) -> Incoming:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.join()

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the destination (the source's end is closed first: a destination still
        waiting for a frame ends), then close the destination's end."""
        self.sock.close()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the destination did not end"
        self._peer.close()
