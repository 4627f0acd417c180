"""Helpers shared by the NVMe controller tests (``import _helpers``).

:func:`make_env` builds a software host, a controller and a probed driver (the
``nvme_env`` fixture in ``conftest.py`` closes them at teardown);
:func:`expect_status` runs a command and checks both its status and the Error
Information entry the controller must have written.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from pcidev.host import Machine
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.namespace import Namespace
from pcidev_nvme.testing.driver import Completion, NvmeDriver

__all__ = ["Env", "expect_status", "make_env", "error_entries", "smart", "admin_raw", "GatedBackend",
           "attach_namespace", "wait_until"]


@attrs.define(slots=False)
class Env:
    machine: Machine
    ctrl: NvmeController
    drv: NvmeDriver | None
    pdev: object

    def close(self) -> None:
        if self.drv is not None:
            self.drv.close()
        self.ctrl.close()
        self.machine.close()


def make_env(config: str | dict | None = "ns=mem:size=16M", *, ram: int = 64 << 20, probe: bool = True,
             **drv_kwargs) -> Env:
    """A machine with one controller plugged in; probed by the driver unless ``probe=False``."""
    machine = Machine(ram_size=ram)
    ctrl = NvmeController(config)
    if probe:
        drv_kwargs.setdefault("aers", 0)
        drv = NvmeDriver.attach(machine, ctrl, **drv_kwargs)
        return Env(machine, ctrl, drv, drv.pdev)
    pdev = machine.plug(ctrl)
    return Env(machine, ctrl, None, pdev)


def error_entries(ctrl: NvmeController) -> list[dict[str, int]]:
    """Decoded Error Information entries kept by the controller, newest first."""
    return ctrl.error_log.entries()


def expect_status(drv: NvmeDriver, status: int, opcode: int, *, qid: int = 0, param: int | None = None,
                  **fields) -> Completion:
    """Run a command (admin if ``qid`` is 0), check its status, DNR and its Error Information entry."""
    ctrl: NvmeController = drv.device
    before = ctrl.error_log.count
    if qid == 0:
        comp = drv.admin(opcode, check=False, **fields)
    else:
        comp = drv.io(qid, opcode, check=False, **fields)
    assert comp.code == status, f"expected status {status:#x}, got {comp.code:#x}"
    if status:
        assert comp.dnr
        assert ctrl.error_log.count == before + 1, "a failed command must add an Error Information entry"
        entry = ctrl.error_log.entries()[0]
        assert entry["error_count"] == before + 1
        assert entry["sqid"] == qid
        assert entry["cid"] == comp.cid
        assert entry["status"] & 0x7FF == status
        assert entry["phase"] == comp.phase
        if param is not None:
            assert entry["param_error_location"] & 0xFF == param
    else:
        assert ctrl.error_log.count == before
    return comp


def smart(drv: NvmeDriver) -> dict[str, int]:
    """The SMART / Health log, decoded."""
    raw = drv.get_log(0x02, 512)

    def u128(off: int) -> int:
        lo, hi = struct.unpack_from("<QQ", raw, off)
        return lo | (hi << 64)

    return {
        "critical_warning": raw[0], "temperature": struct.unpack_from("<H", raw, 1)[0],
        "available_spare": raw[3], "data_units_read": u128(32), "data_units_written": u128(48),
        "host_read_commands": u128(64), "host_write_commands": u128(80), "busy_minutes": u128(96),
        "power_cycles": u128(112), "power_on_hours": u128(128), "unsafe_shutdowns": u128(144),
        "media_errors": u128(160), "error_entries": u128(176),
    }


def admin_raw(drv: NvmeDriver, sqe: bytes) -> Completion:
    """Submit 64 raw bytes on the admin queue and wait for their completion."""
    cid = drv.submit_raw(0, sqe)
    return drv.wait_for(0, cid)


class GatedBackend:
    """A memory backend whose I/O runs on the controller's workers and waits at a gate,
    so tests decide when (and in which order) commands complete.

    ``gate.clear()`` holds every new command; ``release(n)`` lets ``n`` through.
    """

    kind = "gated"
    inline = False
    read_only = False
    min_block = 512
    identity_path = None

    def __init__(self, size: int = 1 << 20) -> None:
        self.size = size
        self.data = bytearray(size)
        self.sem = threading.Semaphore(0)
        self.open = threading.Event()
        self.open.set()
        self.waiting = 0
        self._lock = threading.Lock()

    def _wait(self) -> None:
        if self.open.is_set():
            return
        with self._lock:
            self.waiting += 1
        self.sem.acquire(timeout=10)
        with self._lock:
            self.waiting -= 1

    def hold(self) -> None:
        self.open.clear()

    def release(self, n: int | None = None) -> None:
        if n is None:
            self.open.set()
            n = 1000
        for _ in range(n):
            self.sem.release()

    def readv(self, views, offset):
        self._wait()
        for v in views:
            v[:] = self.data[offset:offset + len(v)]
            offset += len(v)

    def writev(self, views, offset, *, fua=False):
        self._wait()
        for v in views:
            self.data[offset:offset + len(v)] = v
            offset += len(v)

    def flush(self):
        pass

    def deallocate(self, offset, length):
        self.data[offset:offset + length] = bytes(length)

    def write_zeroes(self, offset, length):
        self.deallocate(offset, length)

    def allocated_bytes(self):
        return self.size

    def close(self):
        self.release()


def attach_namespace(ctrl: NvmeController, nsid: int, backend) -> object:
    """Allocate and attach a namespace over ``backend`` (bypassing Namespace Management)."""
    ns = Namespace(nsid, backend)
    ctrl.add_namespace(nsid, ns, attached=True)
    return ns


def wait_until(pred, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timeout waiting for {what}"
        time.sleep(0.001)


def closed_at_teardown(make: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Yield a factory calling ``make``; at teardown close what it made, last made first
    (in a fixture: ``yield from`` it with a class of hosts)."""
    made: list[Any] = []

    def factory(*args: Any, **kwargs: Any) -> Any:
        thing = make(*args, **kwargs)
        made.append(thing)
        return thing

    yield factory
    for thing in reversed(made):
        thing.close()
