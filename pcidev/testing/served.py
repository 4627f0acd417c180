"""A device served over vfio-user by ``pcidev serve`` in a process of its own, for tests.

:func:`served` starts ``pcidev serve --vfio-user SOCKET TYPE[,PROPS]``, waits until it
listens and yields a :class:`ServedDevice`; whatever happens, the process is stopped and
reaped and its output pipe closed at the end. Drive it as QEMU would with
:class:`~pcidev.transport.vfio_user.client.VfioUserClient`, or plug it into the software
host with :class:`~pcidev.transport.vfio_user.remote.VfioUserDevice`::

    with served("edu", directory=tmp_path) as dev, Machine() as machine:
        with VfioUserDevice.connect(dev.path) as remote:
            pdev = machine.plug(remote)
            ...
        assert dev.wait() == 0  # the server ends when its client leaves

:meth:`ServedDevice.handover` moves the device to a new process (``pcidev handover``)
while a client stays connected; the new process is followed (:attr:`ServedDevice.pid`)
and stopped at the end like the first one.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs

from pcidev.errors import PcidevError
from pcidev.transport.vfio_user.handover import control_path, request_handover

__all__ = ["ServedDevice", "served"]


@attrs.define
class ServedDevice:
    """A ``pcidev serve --vfio-user`` process serving one device.

    :ivar path: the vfio-user socket.
    :ivar proc: the server process (its standard output and error are one pipe).
    :ivar banner: the server's first line (``... listening on PATH``).
    """

    path: str
    proc: subprocess.Popen[str]
    banner: str
    #: the processes that served the device, in order (the first is ``proc``)
    pids: list[int] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        if not self.pids:
            self.pids.append(self.proc.pid)

    @property
    def pid(self) -> int:
        """The process serving the device now."""
        return self.pids[-1]

    def handover(self, **kwargs: Any) -> dict[str, Any]:
        """Hand the device to a new process (``pcidev handover``) and follow it.

        :param kwargs: for :func:`~pcidev.transport.vfio_user.handover.request_handover`
            (``timeout``, ``exec_path``).
        :returns: the handover's report (``downtime_ms``, ``new_pid``...).
        :raises MigrationError: the handover failed (the same process serves on).
        :raises TransportError: the server's control endpoint cannot be reached.
        """
        report = request_handover(control_path(self.path), **kwargs)
        self.pids.append(int(report["new_pid"]))
        return report

    def wait(self, timeout: float = 20.0) -> int | None:
        """Wait for the server to end (it does when its client leaves, with ``once``).

        :param timeout: seconds.
        :returns: its exit status, or None after a handover (the process serving now
            is not a child of this one: its status cannot be read).
        :raises subprocess.TimeoutExpired: it is still running.
        """
        if self.pid == self.proc.pid:
            return self.proc.wait(timeout)
        _wait_gone(self.pid, timeout)
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(f"pid {pid}", timeout)
        time.sleep(0.02)


@contextmanager
def served(device: str, props: str = "", *, plugin_specs: Sequence[str] = ("no:nvme",),
           directory: str | os.PathLike[str] | None = None, start_timeout: float = 30.0,
           once: bool = True) -> Iterator[ServedDevice]:
    """Serve a device of a registered type over vfio-user in a new process.

    :param device: the device type.
    :param props: its properties (``"key=value,..."``).
    :param plugin_specs: ``-p`` options for the server (default: without the NVMe
        plugin, for a faster start; give ``()`` to load every installed plugin, or a
        module name to load yours).
    :param directory: where the socket goes (default: a new temporary directory,
        removed at the end).
    :param start_timeout: seconds to wait for the server to listen.
    :param once: the server ends when its client leaves (``serve --once``); else it
        keeps the device for the next client (``--persist``, the command's default).
    :returns: a context manager yielding the :class:`ServedDevice`.
    :raises PcidevError: the server did not start (its output is in the message).
    """
    own_dir = directory is None
    where = tempfile.mkdtemp(prefix="pcidev-serve-") if directory is None else os.fspath(directory)
    path = os.path.join(where, f"{device}.sock")
    spec = f"{device},{props}" if props else device
    argv = [sys.executable, "-m", "pcidev"]
    for p in plugin_specs:
        argv += ["-p", p]
    argv += ["serve", "--vfio-user", path, "--once" if once else "--persist", spec]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = False
    try:
        assert proc.stdout is not None
        banner = _first_line(proc, start_timeout)
        if "listening on" not in banner:
            rest = proc.stdout.read() if proc.poll() is not None else ""
            raise PcidevError(f"pcidev serve {spec} did not start: {(banner + rest).strip()}")
        dev = ServedDevice(path, proc, banner.strip())
        started = True
        yield dev
    finally:
        # the process a handover started last (the ones before it ended by themselves:
        # their PIDs may belong to others by now)
        if started and dev.pid != proc.pid and _alive(dev.pid):
            try:
                os.kill(dev.pid, signal.SIGTERM)
                _wait_gone(dev.pid, 5)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.kill(dev.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.terminate()  # the server removes its socket
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        for sock in (path, control_path(path)) if started else ():  # the sockets of the server started here
            if os.path.exists(sock):
                try:
                    os.unlink(sock)
                except OSError:
                    pass
        if own_dir:
            try:
                os.rmdir(where)
            except OSError:
                pass


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The server's first output line, or what it printed before it ended or the timeout."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return f"(no output in {timeout:g} s)"
    return proc.stdout.readline()
