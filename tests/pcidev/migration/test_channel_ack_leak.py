"""Fuzz finding F2-1 (helper F2, session 21): ``migrate_in`` leaks what the load created
when the source is gone before the destination's ACK.

The ``migration`` fuzz target saw 2 RAM memfds left open after a migration now and then
(timing-dependent there). Deterministic here: a source sends CHECK, OFFER and STATE of
a real migration, then closes before reading anything. The destination loads the state,
cannot send its ACK (EPIPE) and raises ``MigrationError`` without closing the loaded
resources (``pcidev/migration/channel.py``: the ACK's ``except TransportError`` path,
unlike the adopt-failure path above it, does not call ``res.close()``).
"""

from __future__ import annotations

import os
import socket
import threading

from pcidev.devices.edu import EduDevice
from pcidev.dma import alloc_memfd
from pcidev.errors import MigrationError
from pcidev.migration.channel import migrate_in
from pcidev.migration.frames import CHECK, COMMIT, recv_frame, send_frame
from pcidev.testing.fuzz.migration_target import MigrationTarget
from pcidev.transport.fdpass import close_fds


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_source_gone_before_the_ack_leaves_no_descriptor_open():
    recorder = MigrationTarget()
    recorder.setup()  # the frames a real source sends (edu device, 4 MiB of RAM)
    before = _fds()
    src, dst = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dest = EduDevice()
    outcome: dict[str, BaseException] = {}

    def destination() -> None:
        try:
            migrate_in(dest, dst, timeout=5.0)
        except BaseException as exc:
            outcome["exc"] = exc

    thread = threading.Thread(target=destination, daemon=True)
    thread.start()
    for kind, body, nfds in recorder.frames:
        if kind == COMMIT:
            break
        fds = [alloc_memfd(4 << 20) for _ in range(nfds)]
        try:
            send_frame(src, kind, body, fds)
        finally:
            close_fds(fds)
        if kind == CHECK:
            close_fds(recv_frame(src, max_fds=8)[2])  # the VERDICT
    src.close()  # the source is gone before the ACK (the load takes longer than this)
    thread.join(10)
    assert isinstance(outcome.get("exc"), MigrationError) and "could not acknowledge" in str(outcome["exc"])
    dst.close()
    dest.owns_state = False
    dest.close()
    assert _fds() == before
