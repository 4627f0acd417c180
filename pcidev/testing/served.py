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
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import attrs

from pcidev.errors import PcidevError

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

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the server to end (it does when its client leaves).

        :param timeout: seconds.
        :returns: its exit status.
        :raises subprocess.TimeoutExpired: it is still running.
        """
        return self.proc.wait(timeout)


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
        started = True
        yield ServedDevice(path, proc, banner.strip())
    finally:
        if proc.poll() is None:
            proc.terminate()  # the server removes its socket
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if started and os.path.exists(path):  # the socket of the server started here
            try:
                os.unlink(path)
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
