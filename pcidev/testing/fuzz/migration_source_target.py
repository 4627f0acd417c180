"""The fuzz target ``migration-source``: a hostile destination against
:func:`pcidev.migration.channel.migrate_out` (the source).

The input's first byte chooses the channel. Even: a fresh, running ``edu`` device (a
:class:`~pcidev.transport.endpoint.DeviceEndpoint` with 64 KiB of guest memory mapped and an
interrupt eventfd, so that the OFFER carries descriptors) migrates over a UNIX socketpair.
Odd: a device with a 64 KiB RAM BAR (:class:`RamBarDevice`) migrates over a loopback TCP
connection, so that its memory travels as frames: a
:class:`~pcidev.migration.precopy.Precopy` of 0 to 3 passes (MEMORY, CHUNK, SYNC when the
VERDICT names ``sync``) runs first, then ``migrate_out`` with it. Either
runs on the target's server thread
(:class:`~pcidev.testing.fuzz.peer_session.ServerThread`) and the input plays the
destination, step by step (at most :data:`MAX_STEPS`):

* *await*: read the source's next frame (CHECK, OFFER, STATE, COMMIT...), or nothing if
  it waits for an answer or has ended;
* *answer*: send a frame: the natural answer to the last frame read (VERDICT to CHECK,
  ACK to STATE, RUNNING to COMMIT, SYNCED with the SYNC's numbers to SYNC), a refusal (a VERDICT that says no, a
  NACK), or any type; its msgpack body as it should be, mutated
  (:func:`~pcidev.testing.fuzz.migration_target.mutate_meta`), cut short or raw bytes; now
  and then with descriptors the source does not expect, a length that lies or a bad magic;
* *raw*: bytes that are not a frame, or a part of one;
* *pause*: wait (:data:`PAUSES`: mostly not at all or a millisecond; now and then past
  the source's RUNNING deadline, or past its other deadlines), less once the source has ended;

At the end of the input the destination closes its end. ``migrate_out`` gets short
deadlines (:data:`STOP_SECONDS` from the stop to the ACK, for the pre-flight's answer and
for each SYNCED; :data:`RUNNING_SECONDS` for RUNNING after COMMIT), so no input stalls it
(a test may give a target longer ones: :attr:`MigrationSourceTarget.stop_seconds` and
:attr:`MigrationSourceTarget.running_seconds`).

Invariants (a break raises :class:`~pcidev.testing.fuzz.FuzzFinding`):

* ``migrate_out`` returns or raises a :class:`~pcidev.errors.PcidevError`; anything else
  escaped (and no traceback is logged);
* it ends within :data:`END_SECONDS` of the destination closing, and within its own
  deadlines (plus :data:`OVERRUN_SECONDS` for a loaded machine) in all;
* it returns (the device migrated, stopped, its state no longer its own) only if the
  destination sent a whole ACK frame; when it raises, the device runs again on the source,
  has not failed, owns its state, and answers a verified register write and read;
* no file descriptor is left open once the device is closed.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import attrs
import msgpack

from pcidev.bar import RamBacking, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.devices.edu import EduDevice
from pcidev.dma import alloc_memfd
from pcidev.errors import PcidevError, TransportError
from pcidev.migration.channel import MigrationResult, migrate_out
from pcidev.migration.frames import (
    ACK,
    CHECK,
    COMMIT,
    FRAME_HEADER,
    MAGIC,
    NACK,
    PROTOCOL_PREFLIGHT,
    RUNNING,
    STATE,
    SYNC,
    SYNCED,
    VERDICT,
    boot_id,
    recv_frame,
)
from pcidev.migration.precopy import Precopy
from pcidev.testing.fuzz.migration_target import mutate_meta
from pcidev.testing.fuzz.peer_session import ServerJob, ServerThread
from pcidev.testing.fuzz.target import ErrorLogWatch, FuzzFinding, FuzzInput, FuzzTarget, open_fd_count
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import close_fds, send_all
from pcidev.vmstate import U32, vmstate

__all__ = ["END_SECONDS", "MAX_STEPS", "OVERRUN_SECONDS", "PAUSES", "RUNNING_SECONDS", "STOP_SECONDS", "RamBarDevice",
           "RamBarState", "MigrationSourceTarget"]

#: ``migrate_out``'s ``timeout``: for the pre-flight's answer, and from the stop to the ACK
STOP_SECONDS = 0.1
#: ``migrate_out``'s ``running_timeout``: for RUNNING after COMMIT
RUNNING_SECONDS = 0.05
#: ``migrate_out``'s ``quiesce_timeout`` (an ``edu`` device quiesces at once)
QUIESCE_SECONDS = 0.5
#: longest ``migrate_out`` may take to end once the destination closed the channel
END_SECONDS = 5.0
#: how far ``migrate_out`` may overrun its own deadlines in all (a shared, loaded machine)
OVERRUN_SECONDS = 3.0
#: the most steps one input plays
MAX_STEPS = 24
#: what a *pause* step sleeps, by the step's byte modulo 8, in seconds or as ``"running"`` /
#: ``"stop"``: 10 ms past the target's RUNNING deadline, 20 ms past its other deadlines
#: (rarer, as they are most of an input's time)
PAUSES: tuple[float | str, ...] = (0.0, 0.0, 0.0, 0.001, 0.001, 0.005, "running", "stop")
#: longest an *await* step waits for a frame while the source may still send one
AWAIT_SECONDS = 2.0
_GUEST_MEMORY = 64 << 10
_RAM_BAR = 64 << 10
_LIVENESS = 0x04  # edu: reads back the inverse of what was written
_KINDS = 21  # frame types 0..20: the known ones and two around them
_OPS = ("await", "await", "await", "answer", "answer", "answer", "raw", "pause", "end")


@vmstate("pcidev-fuzz/ram-bar-device")
@attrs.frozen
class RamBarState:
    """The state of :class:`RamBarDevice` beyond its RAM: register X."""

    x: U32


class RamBarDevice(PciDevice):
    """The TCP mode's source: a register X in BAR0 and a 64 KiB memfd RAM BAR2 (a memory
    source whose contents travel as frames when no descriptor can)."""

    TYPE_NAME = "pcidev-fuzz-ram-bar"
    CLASS_CODE = 0xFF0000
    VMSTATE = RamBarState

    def describe(self) -> None:
        """BAR0: the register; BAR2: the RAM."""
        self.regs = RegisterMap(4096, [Register("X", 0)])
        self.add_mem_bar(0, 4096, self.regs)
        self.ram = RamBacking(_RAM_BAR, name="pcidev-fuzz-ram-bar")
        self.add_mem_bar(2, _RAM_BAR, self.ram, bits64=True)

    def get_device_state(self) -> RamBarState:
        """Register X."""
        return RamBarState(x=self.regs["X"].value)

    def set_device_state(self, state: RamBarState) -> None:
        """Register X."""
        self.regs["X"].value = state.x

    def on_close(self) -> None:
        """Release the RAM's memfd."""
        self.ram.close()


class MigrationSourceTarget(FuzzTarget):
    """``migration-source``: a fuzzed destination against ``migrate_out`` (see the module)."""

    name: ClassVar[str] = "migration-source"
    summary: ClassVar[str] = ("migration channel: a fuzzed destination against migrate_out (edu over UNIX, "
                              "a RAM-BAR device with pre-copy over TCP)")
    invariants: ClassVar[tuple[str, ...]] = (
        "migrate_out returns or raises a typed error", "bounded time", "migrated only after a whole ACK",
        "otherwise resumed and serving", "fd count unchanged")

    #: coverage of the source side (migrate_out, the pre-copy, frames, the endpoint and the
    #: devices' state) guides the fuzzer; this module (the destination) and the other fuzz
    #: modules are the harness and run uninstrumented
    instrument: ClassVar[tuple[str, ...]] = (
        "pcidev.migration", "pcidev.transport", "pcidev.vmstate", "pcidev.device", "pcidev.devices.edu",
        "pcidev.bar", "pcidev.pci", "pcidev.dma", "pcidev.irq", "pcidev.regions", "pcidev.memory_source")

    def __init__(self) -> None:
        self._server: ServerThread | None = None
        self._listener: socket.socket | None = None
        #: ``migrate_out``'s ``timeout`` and the pre-copy's (default :data:`STOP_SECONDS`)
        self.stop_seconds = STOP_SECONDS
        #: ``migrate_out``'s ``running_timeout`` (default :data:`RUNNING_SECONDS`)
        self.running_seconds = RUNNING_SECONDS
        #: the last input's frames read from the source and its outcome (for replay checks)
        self.transcript: list[Any] = []

    def setup(self) -> None:
        """Start the thread ``migrate_out`` runs on, and listen on the loopback (TCP mode)."""
        if self._server is None:
            self._server = ServerThread("fuzz-migration-source")
        if self._listener is None:
            self._listener = socket.create_server(("127.0.0.1", 0))

    def close(self) -> None:
        """End that thread and the listener."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _tcp_pair(self) -> tuple[socket.socket, socket.socket]:
        assert self._listener is not None
        src = socket.create_connection(self._listener.getsockname())
        dst, _ = self._listener.accept()
        for sock in (src, dst):  # (as pcidev.transport.address.connect does: no 40 ms Nagle stalls)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return src, dst

    def run(self, data: bytes) -> None:
        """Migrate a fresh device out to the destination ``data`` plays, and check the source.

        :param data: the fuzzer's bytes.
        :raises FuzzFinding: an invariant broke.
        """
        self.setup()
        assert self._server is not None
        before = open_fd_count()
        inp = FuzzInput(data)
        mode = inp.u8()
        tcp = bool(mode & 1)
        passes = (mode >> 1) % 4
        ep = _tcp_source() if tcp else _unix_source()
        src, dst = self._tcp_pair() if tcp else socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        dest = _Destination(inp, {"running": self.running_seconds + 0.01, "stop": self.stop_seconds + 0.02})
        stop, running = self.stop_seconds, self.running_seconds
        timing: dict[str, float] = {}

        def out() -> MigrationResult:
            timing["start"] = time.monotonic()
            try:
                precopy = None
                if tcp:
                    precopy = Precopy(ep.device, src, max_iterations=passes, timeout=stop)
                    try:
                        precopy.run()
                    except PcidevError:
                        pass  # (failed: migrate_out refuses it as a blocker, nothing stopped)
                return migrate_out(ep.device, src, timeout=stop, running_timeout=running,
                                   quiesce_timeout=QUIESCE_SECONDS, precopy=precopy)
            finally:
                timing["end"] = time.monotonic()

        with ErrorLogWatch() as watch:
            job = self._server.submit(out)
            try:
                dest.play(dst, job)
            finally:
                dst.close()
                ended = job.wait(END_SECONDS)
                self.transcript = [*dest.received, type(job.exc).__name__ if job.exc else
                                   type(job.result).__name__]
            if not ended:
                raise FuzzFinding("hang", f"migrate_out did not end within {END_SECONDS} s of the destination "
                                  "closing", where="migrate_out")
            try:
                self._check(ep, job, dest, timing["end"] - timing["start"],
                            bound=6 * stop + running + QUIESCE_SECONDS + OVERRUN_SECONDS)
                watch.check("migrate_out")
            finally:
                src.close()
                ep.close()
        after = open_fd_count()
        if after > before:
            raise FuzzFinding("fd-leak", f"{after - before} file descriptor(s) left open by one migration")

    @staticmethod
    def _check(ep: DeviceEndpoint, job: ServerJob, dest: _Destination, took: float, *, bound: float) -> None:
        # (bound: the pre-flight, up to 3 passes (each send and SYNC), the stop to the ACK,
        # RUNNING, and the overrun a loaded machine may add)
        device = ep.device
        if took > bound:
            raise FuzzFinding("overrun", f"migrate_out took {took:.2f} s (its deadlines allow {bound:g} s)",
                              where="migrate_out")
        if job.exc is not None and not isinstance(job.exc, PcidevError):
            raise FuzzFinding.escaped(job.exc, "migrate_out")
        if job.exc is None:
            if not dest.sent_ack:
                raise FuzzFinding("migrated-without-ack", f"migrate_out returned {job.result!r:.200} but the "
                                  "destination never sent a whole ACK", where="migrate_out")
            if not (device.migrated_out and not device.owns_state and device.quiesced):
                raise FuzzFinding("migrated-but-running", f"migrate_out returned, but the device has "
                                  f"migrated_out={device.migrated_out} owns_state={device.owns_state} "
                                  f"quiesced={device.quiesced}", where="migrate_out")
            return
        what = f"after {type(job.exc).__name__}: {job.exc}"
        if device.migrated_out or not device.owns_state or device.quiesced:
            raise FuzzFinding("not-resumed", f"{what:.300}: migrated_out={device.migrated_out} "
                              f"owns_state={device.owns_state} quiesced={device.quiesced}",
                              where=type(job.exc).__name__)
        if device.failed is not None:
            raise FuzzFinding.escaped(device.failed, f"the source device ({what:.200})")
        # a verified write and read: edu's liveness register reads back the inverse; the
        # RAM BAR device's register and RAM read back what was written
        checks = ([(0, _LIVENESS, 0x5A5AC3C3, 0xA5A53C3C)] if isinstance(device, EduDevice)
                  else [(0, 0, 0x5A5AC3C3, 0x5A5AC3C3), (2, 0x1234 * 4, 0x0BADF00D, 0x0BADF00D)])
        for bar, offset, value, expect in checks:
            try:
                ep.bar_write(bar, offset, 4, value)
                got = ep.bar_read(bar, offset, 4)
            except PcidevError as exc:
                raise FuzzFinding("not-serving", f"{what:.300}: an access to BAR{bar} failed: {exc}",
                                  where=type(job.exc).__name__) from exc
            if got != expect:
                raise FuzzFinding("not-serving", f"{what:.300}: BAR{bar} + {offset:#x} read {got:#x}, not "
                                  f"{expect:#x}", where=type(job.exc).__name__)

    def seeds(self) -> Iterator[bytes]:
        """A well-behaved destination, refusals at each step, an early close, a wrong answer."""
        unix, wait, answer, refuse = bytes([0]), bytes([0]), bytes([3, 0, 0, 0]), bytes([3, 128, 0, 0])
        good = wait + answer + wait + wait + answer + wait + answer  # CHECK, OFFER, STATE, COMMIT: migrated
        yield unix + good
        yield unix + wait + refuse  # the pre-flight says no
        yield unix + wait + answer + wait + wait + refuse  # NACK after the state
        yield unix + wait + answer + wait + wait + answer + wait  # no RUNNING: ended after COMMIT
        yield unix + wait + bytes([8])  # closed after CHECK
        yield unix + wait + bytes([3, 200, 4, 0, 0])  # ACK to CHECK
        yield unix + wait + answer + wait + wait + bytes([7, 7]) + answer  # the ACK comes too late
        # TCP, the memory as frames: no pass (CHECK, VERDICT, MEMORY, CHUNKs at the stop, SYNC,
        # OFFER, STATE...), then one pass with its SYNC answered, then one answered wrong
        yield bytes([1]) + wait + answer + wait * 4 + answer + wait * 4 + answer + wait * 3 + answer
        yield bytes([3]) + wait + answer + wait * 4 + answer + wait * 4 + answer + wait * 4 + answer + wait + answer
        yield bytes([3]) + wait + answer + wait * 4 + bytes([3, 0, 200, 1, 1, 0])


def _tcp_source() -> DeviceEndpoint:
    """A running :class:`RamBarDevice` endpoint (nothing that travels only as a descriptor)."""
    ep = DeviceEndpoint(RamBarDevice())
    try:
        ep.start()
        ep.config_write(0x04, 2, 0x0006)  # COMMAND: memory space and bus master on
        ep.bar_write(2, 0, 4, 0x600DCAFE)  # one page of contents that is not zero
    except BaseException:
        ep.close()
        raise
    return ep


def _unix_source() -> DeviceEndpoint:
    """A running ``edu`` endpoint with guest memory and an interrupt eventfd."""
    ep = DeviceEndpoint(EduDevice())
    try:
        ep.start()
        ep.config_write(0x04, 2, 0x0006)  # COMMAND: memory space and bus master on
        fd = alloc_memfd(_GUEST_MEMORY)
        try:
            ep.dma_map(0, _GUEST_MEMORY, fd, name="fuzz-guest")
        finally:
            close_fds([fd])
        ep.set_irqs({0: _eventfd()})
    except BaseException:
        ep.close()
        raise
    return ep


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


class _Destination:
    """The fuzzed destination: plays the steps ``inp`` decodes into."""

    def __init__(self, inp: FuzzInput, deadlines: dict[str, float]) -> None:
        self.inp = inp
        self.deadlines = deadlines
        #: the types of the frames read from the source
        self.received: list[int] = []
        #: the body of the last SYNC read ({"seq", "sent"})
        self.sync: dict[str, Any] = {}
        #: a whole ACK frame (right magic, type and length) went out
        self.sent_ack = False
        #: False while the source waits for us: after a frame it wants answered, or after
        #: bytes that may leave it in the middle of a frame (raw bytes, a length longer than
        #: the body); an *await* then reads nothing instead of waiting for its deadline
        self.answered = True
        self.bid = boot_id()

    def play(self, sock: socket.socket, job: ServerJob) -> None:
        inp = self.inp
        steps = 0
        while inp.remaining and steps < MAX_STEPS:
            if job.done and not select.select([sock], [], [], 0)[0]:
                return  # the source ended and said all it had to: nothing more can happen
            steps += 1
            op = _OPS[inp.u8() % len(_OPS)]
            if op == "await":
                if not self._await(sock, job):
                    return
            elif op == "answer":
                if not self._answer(sock):
                    return
            elif op == "raw":
                if not self._send(sock, inp.blob(64), []):
                    return
                self.answered = False  # (it may wait for the rest of a frame)
            elif op == "pause":
                pause = PAUSES[inp.u8() % len(PAUSES)]
                # (no longer once the source has ended: then nothing can happen any more, and
                # the loop returns at its next step)
                job.wait(self.deadlines[pause] if isinstance(pause, str) else pause)
            else:
                if inp.u8() & 1:
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    self._await(sock, job)  # the source's last words, if any
                return

    def _await(self, sock: socket.socket, job: ServerJob) -> bool:
        """Read the source's next frame; False once the channel ended."""
        if not self.answered:
            return True  # it waits for us: nothing comes
        deadline = time.monotonic() + AWAIT_SECONDS
        while not select.select([sock], [], [], 0.002)[0]:
            if job.done or time.monotonic() >= deadline:
                return True  # it ended (what it sent is readable already) or sends nothing
        try:
            sock.settimeout(AWAIT_SECONDS)
            kind, body, fds = recv_frame(sock, max_fds=64, max_len=1 << 24, deadline=time.monotonic() + AWAIT_SECONDS)
        except (TransportError, OSError):
            return False
        close_fds(fds)
        self.received.append(kind)
        if kind == SYNC:
            try:
                self.sync = dict(msgpack.unpackb(body, raw=False))
            except Exception:
                self.sync = {}
        self.answered = kind not in (CHECK, STATE, COMMIT, SYNC)
        return True

    def _natural(self, refuse: bool) -> tuple[int, dict[str, Any]]:
        """The answer to the last frame read (or a refusal of it)."""
        last = self.received[-1] if self.received else CHECK
        if refuse:
            if last == CHECK:
                return VERDICT, {"protocol": PROTOCOL_PREFLIGHT, "ok": False, "reasons": ["the fuzzer says no"],
                                 "features": [], "boot_id": self.bid}
            return NACK, {"error": "MigrationError", "message": "refused by the fuzzer"}
        if last == CHECK:
            return VERDICT, {"protocol": PROTOCOL_PREFLIGHT, "ok": True, "reasons": [], "features": ["sync"],
                             "boot_id": self.bid}
        if last == COMMIT:
            return RUNNING, {"running_at": 1.5, "boot_id": self.bid}
        if last == SYNC:
            return SYNCED, {"seq": self.sync.get("seq", 0), "applied": self.sync.get("sent", 0)}
        return ACK, {"link": None, "deferred": False, "boot_id": self.bid, "commit": True, "received": 1.0,
                     "loaded": 1.25}

    def _answer(self, sock: socket.socket) -> bool:
        inp = self.inp
        pick = inp.u8()
        kind, meta = self._natural(refuse=128 <= pick < 160)
        if pick >= 160:
            kind = inp.u8() % _KINDS
        body = msgpack.packb(meta, use_bin_type=True)
        shape = inp.u8()
        if shape >= 240:
            body = inp.blob(64)
        elif shape >= 200:
            body = mutate_meta(inp, body)
        elif shape >= 180:
            body = body[:inp.u8() % (len(body) + 1)]
        extra = inp.u8()
        fds: list[int] = []
        magic, length = MAGIC, len(body)
        if 200 <= extra < 220:
            fds = [alloc_memfd(4096) if i & 1 else _eventfd() for i in range(1 + extra % 3)]
        elif 220 <= extra < 240:
            length = inp.u32() if extra & 1 else max(0, len(body) + (1 if extra & 2 else -1))
        elif extra >= 240:
            magic = inp.take(8)
        frame = FRAME_HEADER.pack(magic, kind & 0xFFFF, 0, length) + body
        if not self._send(sock, frame, fds):
            return False
        if kind == ACK and magic == MAGIC and length == len(body):
            self.sent_ack = True
        self.answered = length <= len(body)  # (a longer length: it waits for the rest)
        return True

    @staticmethod
    def _send(sock: socket.socket, data: bytes, fds: list[int]) -> bool:
        try:
            send_all(sock, data, fds, deadline=time.monotonic() + AWAIT_SECONDS)
            return True
        except (TransportError, OSError):
            return False  # the source closed first
        finally:
            close_fds(fds)
