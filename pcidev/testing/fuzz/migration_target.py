"""The fuzz target ``migration``: a hostile source against
:func:`pcidev.migration.channel.migrate_in` (the destination).

:meth:`MigrationTarget.setup` records the frames a real source
(:func:`~pcidev.migration.channel.migrate_out` of a running ``edu`` device) sends over a
socketpair. Each input then plays the source again, frame by frame, with mutations: a
frame dropped, repeated or of another type, its msgpack body changed (edge values, keys
dropped or added), its bytes flipped, or a length that lies; descriptors the frame
carried are replaced by fresh memfds. The destination's own frames are read and
discarded as they come.

Invariants (a break raises :class:`~pcidev.testing.fuzz.FuzzFinding`):

* ``migrate_in`` returns, or raises a :class:`~pcidev.errors.PcidevError` (a
  :class:`~pcidev.errors.MigrationError`, :class:`~pcidev.errors.TransportError` or
  :class:`~pcidev.errors.VMStateError`); anything else escaped;
* it ends within :data:`END_SECONDS` of the source closing the channel;
* a device it loaded has not failed (but for a failure the stream carried);
* no file descriptor is left open once the destination device is closed.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import msgpack

from pcidev.devices.edu import EduDevice
from pcidev.dma import alloc_memfd
from pcidev.errors import PcidevError, TransportError
from pcidev.host import Machine
from pcidev.migration.channel import migrate_in, migrate_out
from pcidev.migration.frames import FRAME_HEADER, MAGIC, recv_frame, send_frame
from pcidev.testing.fuzz.target import ErrorLogWatch, FuzzFinding, FuzzInput, FuzzTarget, open_fd_count
from pcidev.testing.harness import probe
from pcidev.transport.fdpass import close_fds, send_all

__all__ = ["END_SECONDS", "MigrationTarget", "mutate_meta"]

#: longest the destination may take to end once the source closed the channel
END_SECONDS = 10.0
#: the destination's wait for each part of the stream (short: the fuzzer's source is instant)
_PART_SECONDS = 0.5
#: the recorded machine's memory size (the memfds a replay sends have it)
_RAM = 4 << 20
_EDGE = (0, 1, -1, 2, 0xFF, 0xFFFF, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, 4096)


class MigrationTarget(FuzzTarget):
    """``migration``: recorded source frames, mutated, against ``migrate_in`` (see the module)."""

    name: ClassVar[str] = "migration"
    summary: ClassVar[str] = "migration channel: mutated source frames against migrate_in (edu device)"
    invariants: ClassVar[tuple[str, ...]] = (
        "migrate_in returns or raises a typed error", "bounded time after the source closes",
        "a loaded device has not failed", "fd count unchanged")

    def __init__(self) -> None:
        #: the recorded source frames: (type, body, number of fds)
        self.frames: list[tuple[int, bytes, int]] = []

    def setup(self) -> None:
        """Record a real source's frames (an ``edu`` device migrating in this process)."""
        if self.frames:
            return
        with Machine(ram_size=_RAM) as machine:
            source = EduDevice()
            pdev = machine.plug(source)
            probe(pdev)
            pdev.bar_write(0, 0x04, 4, 0x1234)
            src, relay_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            relay_out, dst = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            dest = EduDevice()
            done: dict[str, Any] = {}

            def forward(a: socket.socket, b: socket.socket, record: bool) -> None:
                try:
                    while True:
                        kind, body, fds = recv_frame(a, max_fds=64, max_len=1 << 28)
                        if record:
                            self.frames.append((kind, body, len(fds)))
                        try:
                            send_frame(b, kind, body, fds)
                        finally:
                            close_fds(fds)
                except (TransportError, OSError):
                    b.close()

            def destination() -> None:
                try:
                    done["in"] = migrate_in(dest, dst, timeout=5.0)
                except PcidevError as exc:
                    done["in"] = exc

            threads = [threading.Thread(target=forward, args=(relay_in, relay_out, True), daemon=True),
                       threading.Thread(target=forward, args=(relay_out, relay_in, False), daemon=True),
                       threading.Thread(target=destination, daemon=True)]
            for t in threads:
                t.start()
            try:
                migrate_out(source, src, timeout=5.0)
            finally:
                src.close()
                threads[2].join(10)  # the destination, then its end of the relay: the relays end
                dst.close()
                for t in threads[:2]:
                    t.join(10)
                for s in (relay_in, relay_out):
                    s.close()
                dest.close()
                source.close()
        if not self.frames:
            raise PcidevError("the migration target recorded no frames")

    def run(self, data: bytes) -> None:
        """Play the mutated source against a fresh destination.

        :param data: the fuzzer's bytes.
        :raises FuzzFinding: an invariant broke.
        """
        if not self.frames:
            self.setup()
        inp = FuzzInput(data)
        before = open_fd_count()
        dest = EduDevice()
        src, dst = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        outcome: dict[str, Any] = {}

        def destination() -> None:
            try:
                outcome["result"] = migrate_in(dest, dst, timeout=_PART_SECONDS, total_timeout=3.0)
            except PcidevError as exc:
                outcome["refused"] = exc
            except BaseException as exc:
                outcome["exc"] = exc
            finally:
                try:  # the player waits for this EOF instead of sleeping
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        with ErrorLogWatch() as watch:
            thread = threading.Thread(target=destination, name="fuzz-migrate-in", daemon=True)
            thread.start()
            try:
                self._play(inp, src)
            finally:
                src.close()
                thread.join(END_SECONDS)
            if thread.is_alive():
                raise FuzzFinding("hang", f"migrate_in did not end within {END_SECONDS} s of the source closing",
                                  where="migrate_in")
            try:
                exc = outcome.get("exc")
                if isinstance(exc, BaseException):
                    raise FuzzFinding.escaped(exc, "migrate_in")
                if "result" in outcome and dest.failed is not None and "source" not in str(dest.failed):
                    raise FuzzFinding.escaped(dest.failed, "the migrated device (failed)")
                watch.check("migrate_in")
            finally:
                dst.close()
                res = outcome.get("result")
                resources = getattr(res, "resources", None)
                if resources is not None and hasattr(resources, "close"):
                    resources.close()
                dest.owns_state = False
                dest.close()
        after = open_fd_count()
        if after > before:
            raise FuzzFinding("fd-leak", f"{after - before} file descriptor(s) left open by one migration")

    def _play(self, inp: FuzzInput, sock: socket.socket) -> None:
        sock.setblocking(False)
        frames = list(self.frames)
        i = 0
        while i < len(frames) and i < 64:
            kind, body, nfds = frames[i]
            op = inp.u8() % 12
            if op == 0:
                i += 1
                continue  # dropped
            if op == 1:
                frames.insert(i + 1, frames[i])  # repeated
            elif op == 2:
                kind = inp.u8() % 21
            elif op == 3:
                body = mutate_meta(inp, body)
            elif op == 4 and body:
                pos = inp.u32() % len(body)
                body = body[:pos] + bytes([body[pos] ^ (1 << inp.u8() % 8)]) + body[pos + 1:]
            elif op == 5:
                body = body[:inp.u32() % (len(body) + 1)]
            fds = [alloc_memfd(_RAM) for _ in range(min(nfds + (op == 6), 4))]  # sparse: cheap
            length = len(body) if op != 7 else inp.u32()
            try:
                send_all(sock, FRAME_HEADER.pack(MAGIC, kind & 0xFFFF, 0, length) + body, fds)
            except (OSError, TransportError):
                return
            finally:
                close_fds(fds)
            time.sleep(0)  # let the destination answer
            self._drain(sock)
            i += 1
        # the source is done: half-close, so the destination sees the end of the stream at
        # once, then read its last words (ACK, RUNNING...) until it ends (it half-closes
        # its side when migrate_in returns); no fixed sleep
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = time.monotonic() + END_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0] or not self._drain(sock):
                return

    def _drain(self, sock: socket.socket) -> bool:
        """Read and drop what the destination sent; False once it closed."""
        while True:
            try:
                data, anc, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            except BlockingIOError:
                return True
            except OSError:
                return False
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    close_fds(memoryview(payload).cast("i").tolist())
            if not data:  # (it once tested the address, None: every read looked like the end)
                return False

    def seeds(self) -> Iterator[bytes]:
        """The recorded source unchanged, and each mutation once on the first frames."""
        yield bytes([11] * 16)
        for op in range(8):
            yield bytes([op, 3, 0, 0, 0, 0, 0, 0] + [11] * 12)


def mutate_meta(inp: FuzzInput, body: bytes) -> bytes:
    """A frame's msgpack body with one change chosen by ``inp``: a key dropped, set to an
    edge value or a value of another type, a key added, or a value made bytes (a body
    that is not a map comes back reversed or as it was). Shared with
    :mod:`~pcidev.testing.fuzz.migration_source_target`.

    :param inp: the fuzzer's bytes.
    :param body: the frame's body.
    :returns: the mutated body.
    """
    try:
        meta = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:
        return body[::-1]
    if not isinstance(meta, dict) or not meta:
        return body
    keys = list(meta)
    key = keys[inp.u8() % len(keys)]
    what = inp.u8() % 5
    if what == 0:
        del meta[key]
    elif what == 1:
        meta[key] = inp.pick(_EDGE)
    elif what == 2:
        meta[key] = (None, "", [], {}, True, "x" * 100)[inp.u8() % 6]
    elif what == 3:
        meta[inp.blob(8).decode("latin-1")] = inp.pick(_EDGE)
    else:
        meta[key] = inp.blob(32)
    return bytes(msgpack.packb(meta, use_bin_type=True))
