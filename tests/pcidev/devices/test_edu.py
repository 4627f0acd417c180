"""The edu device's background engine on a :class:`pcidev.worker.Worker`, driven by the software host."""

from __future__ import annotations

import os
import threading
import time

import crc32c

from pcidev.devices.edu import DESC, STATUS_DONE, EduDevice
from pcidev.host.machine import Machine


def _engine_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"edu-engine[{name}]"]


def test_engine_pauses_when_quiesced_finishes_after_resume_and_close_joins() -> None:
    length = 64 << 10
    with Machine(ram_size=32 << 20) as m, EduDevice(engine=True, chunk=4096, delay=0.002,
                                                    name="w0") as dev:
        pdev = m.plug(dev)
        pdev.enable_device()
        pdev.set_master()
        ring, src, dst = m.alloc(4096), m.alloc(length), m.alloc(length)
        data = os.urandom(length)
        m.write(src, data)
        m.write(ring, DESC.pack(src, dst, length, 0, 0, 0))
        dev.resume()  # what a transport does when it starts serving the device
        assert _engine_threads("w0")
        pdev.bar_write(0, 0x100, 8, ring)  # RING_BASE
        pdev.bar_write(0, 0x108, 4, 4)  # RING_SIZE
        pdev.bar_write(0, 0x114, 4, 1)  # RING_CTRL: enable
        pdev.bar_write(0, 0x10C, 4, 1)  # RING_TAIL: doorbell kicks the worker
        deadline = time.monotonic() + 5
        while dev.inflight is None or dev.inflight.done == 0:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        dev.quiesce()
        inflight = dev.inflight
        assert inflight is not None and 0 < inflight.done < length  # stopped between two chunks
        time.sleep(0.05)
        assert dev.inflight == inflight  # no step while quiesced
        dev.resume()
        while dev.pending:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        status, crc = DESC.unpack(m.read(ring, 32))[4:]
        assert status == STATUS_DONE and crc == crc32c.crc32c(data)
        assert m.read(dst, length) == data
    assert dev.closed and not _engine_threads("w0")
