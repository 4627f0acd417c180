"""An in-process host for NVMe migrations over the migration channel, UNIX or TCP: a
machine, a controller and a probed driver; :meth:`ChannelHost.move` migrates the
controller to a fresh one built from the same configuration (the destination in a
thread), over a socket pair (descriptors travel) or a loopback TCP connection (a
pre-copy runs first, while ``during`` keeps the host's I/O going; the destination is
then attached to the machine's memory and interrupts and resumed, as a device link's
RESUME does). Every block written through :meth:`ChannelHost.write` is recorded by its
CRC-32C and :meth:`ChannelHost.verify` reads every block of a namespace back."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import crc32c
from test_migration_nvme import Host

from pcidev.migration import MigrationResult, migrate_in, migrate_out
from pcidev.migration.precopy import Precopy
from pcidev_nvme.controller import NvmeController

BLOCK = 512


class ChannelHost(Host):
    """See the module docstring (the machine, the controller named ``src``, the driver and
    :meth:`close` are :class:`~test_migration_nvme.Host`'s).

    :param config: the controller's configuration (source and destinations alike).
    """

    def __init__(self, config: str, *, io_queues: int = 2) -> None:
        super().__init__(config, ram=64 << 20, io_queues=io_queues, io_depth=64, aers=0)
        self.config = config
        self.crc: dict[tuple[int, int], int] = {}
        self.writes = 0

    def write(self, nsid: int, slba: int, data: bytes, *, qid: int = 1) -> None:
        """A verified write (recorded by block)."""
        self.drv.write(nsid, slba, data, qid=qid)
        for i in range(len(data) // BLOCK):
            self.crc[(nsid, slba + i)] = crc32c.crc32c(data[i * BLOCK:(i + 1) * BLOCK])
        self.writes += 1

    def verify(self, nsid: int, nblocks: int) -> int:
        """Read every block of namespace ``nsid`` and compare it with what was written
        (zeros where nothing was). :returns: the blocks checked."""
        zero = crc32c.crc32c(bytes(BLOCK))
        bad = []
        step = 64
        for slba in range(0, nblocks, step):
            data = self.drv.read(nsid, slba, step)
            bad += [slba + i for i in range(step)
                    if crc32c.crc32c(data[i * BLOCK:(i + 1) * BLOCK]) != self.crc.get((nsid, slba + i), zero)]
        assert not bad, f"{len(bad)} blocks differ, the first {bad[:8]}"
        return nblocks

    def move(self, *, tcp: bool, during: Callable[[threading.Event], None] | None = None) -> MigrationResult:
        """Migrate the controller to a fresh one and point the host at it.

        :param tcp: over TCP (contents streamed, pre-copy first), else a UNIX socket pair.
        :param during: over TCP, run in a thread while the pre-copy runs, until the event
            it gets is set (the host's I/O; the pre-copy starts once it wrote through
            :meth:`write`, or ended).
        """
        dst = NvmeController(self.config)
        if tcp:
            lsock = socket.create_server(("127.0.0.1", 0))
            a = socket.create_connection(lsock.getsockname())
            b, _ = lsock.accept()
            lsock.close()
        else:
            a, b = socket.socketpair()
        got: dict[str, object] = {}

        def incoming() -> None:
            try:
                got["in"] = migrate_in(dst, b, timeout=30)
            except Exception as exc:
                got["error"] = exc

        peer = threading.Thread(target=incoming, daemon=True)
        peer.start()
        try:
            precopy = None
            if tcp:
                precopy = Precopy(self.ctrl, a, timeout=30)
                assert precopy.active
                stop = threading.Event()
                io = threading.Thread(target=during, args=(stop,)) if during is not None else None
                if io is not None:
                    writes = self.writes
                    io.start()
                    deadline = time.monotonic() + 10  # the host's I/O is going when the pre-copy starts
                    while self.writes == writes and io.is_alive() and time.monotonic() < deadline:
                        time.sleep(0.001)
                try:
                    precopy.run()
                finally:
                    stop.set()
                    if io is not None:
                        io.join(60)
            result = migrate_out(self.ctrl, a, precopy=precopy, timeout=30)
        except BaseException:
            a.close()
            peer.join(30)
            b.close()
            dst.close()
            raise
        peer.join(30)
        a.close()
        b.close()
        assert "error" not in got, got.get("error")
        self.resources.append(got["in"].resources)  # type: ignore[attr-defined]
        src = self.ctrl
        assert src.migrated_out and src.quiesced
        if result.deferred:  # over TCP: the host attaches memory and interrupts, then resumes
            dst.attach(self.machine.memory, self.pdev.recorder)
            dst.resume()
        else:
            dst.irq.sink = self.pdev.recorder
        self.pdev.device = dst
        drv = self.drv
        drv.device, drv._bar_write, drv._bar_read = dst, dst.bar_write, dst.bar_read
        self.old.append(src)
        self.ctrl = dst
        return result
