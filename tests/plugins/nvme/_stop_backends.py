"""A pcidev plugin for the migration-stop tests: the ``gatedfile`` namespace backend, a
real ``file`` backend whose writes block on demand, and (in a device process) a recorder
of ``os.fdatasync`` calls.

Why a plugin backend and not a FIFO or a fault-injecting path: a FIFO is refused as an
image (neither a regular file nor a block device), and a fault-injecting file system
(FUSE, dm-delay) needs privileges the test suite does not have. This backend is the
``file`` backend itself (its kind stays ``file``: the migration treats it as one, and the
destination reopens the same image), with a gate in front of ``writev``; the data goes to
a real file, so the flush at the stop is real too. It reaches the controller the way any
third-party backend does (``pcidev_register_devices`` and ``add_backend``).

The gate: in this process, :data:`GATES` (one per image path): :meth:`Gate.arm` makes the
next write of that image wait until :meth:`Gate.open`. In a device process started with
``-p _stop_backends`` and ``PCIDEV_STOP_GATE=PATH`` in its environment, writes wait while
the file ``PATH`` exists. ``PCIDEV_STOP_FDATASYNC_LOG=PATH`` makes the process append one
line per ``os.fdatasync`` (pid, ``time.monotonic()``, the file synced as ``DEV:INODE``) to
``PATH``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from pcidev import hookimpl
from pcidev_nvme.backends import FileBackend, FileConfig, add_backend, take_options


class Gate:
    """Makes one write wait: :meth:`arm`, then the next write blocks until :meth:`open`."""

    def __init__(self) -> None:
        self._armed = False
        self.entered = threading.Event()
        self._open = threading.Event()
        self._open.set()

    def arm(self) -> None:
        """The next write waits (:attr:`entered` is set when it does)."""
        self.entered.clear()
        self._open.clear()
        self._armed = True

    def open(self) -> None:
        """Let the waiting write (and any later one) go on."""
        self._armed = False
        self._open.set()

    def pass_through(self) -> None:
        if self._armed:
            self._armed = False
            self.entered.set()
            self._open.wait(60)


class FileGate:
    """Writes wait while the file ``path`` exists (a gate another process controls)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def pass_through(self) -> None:
        deadline = time.monotonic() + 60
        while os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.001)


#: the in-process gates, by absolute image path
GATES: dict[str, Gate] = {}


class GatedFileBackend(FileBackend):
    """A ``file`` backend whose writes pass a gate first (never inline, never the
    submitting thread's non-blocking attempt: every write goes to a worker)."""

    def __init__(self, path: str, size: int | None, gate: Gate | FileGate) -> None:
        super().__init__(path, size)
        self.gate = gate
        self.nowait = False
        self._nowait_writes = False

    def writev(self, views: list[memoryview], offset: int, *, fua: bool = False) -> None:
        self.gate.pass_through()
        super().writev(views, offset, fua=fua)


def make_gated(options: dict[str, Any]) -> GatedFileBackend:
    cfg = take_options(FileConfig, options, what="gatedfile backend")
    path = os.path.abspath(cfg.path)
    env = os.environ.get("PCIDEV_STOP_GATE")
    gate: Gate | FileGate = FileGate(env) if env else GATES.setdefault(path, Gate())
    return GatedFileBackend(path, cfg.size, gate)


@hookimpl
def pcidev_register_devices(registry: Any) -> None:
    add_backend(registry, "gatedfile", make_gated)


def _record_fdatasync(log_path: str) -> None:
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        st = os.fstat(fd)
        target = f"{st.st_dev}:{st.st_ino}"
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {time.monotonic():.6f} {target}\n")

    os.fdatasync = fdatasync


if os.environ.get("PCIDEV_STOP_FDATASYNC_LOG"):
    _record_fdatasync(os.environ["PCIDEV_STOP_FDATASYNC_LOG"])
