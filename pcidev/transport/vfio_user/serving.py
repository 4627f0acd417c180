"""Running a device as a vfio-user server: the listening socket, the accept loop, signals.

:func:`serve_device` is what ``pcidev serve --vfio-user`` runs: it listens on a
UNIX socket, prints one ``listening`` line, and serves each client with a
:class:`~pcidev.transport.vfio_user.server.VfioUserServer`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Any, TextIO

import pluggy

from pcidev.device import PciDevice
from pcidev.errors import TransportError
from pcidev.transport.address import Listener, listen_unix
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.vfio_user.server import ExtraClientGuard, VfioUserServer

log = logging.getLogger(__name__)

__all__ = ["listen_vfio_user", "serve_device"]


def listen_vfio_user(path: str) -> Listener:
    """Listen on the vfio-user socket ``path`` (:func:`pcidev.transport.address.listen_unix`:
    only a stale socket is replaced), for :func:`serve_device`.

    Create the listener before building the device, so that a refused path leaves
    nothing behind (a device may create files when it is built).

    :param path: the socket path.
    :returns: the listener.
    :raises TransportError: the socket cannot be created (one line naming the cause).
    """
    return listen_unix(path, backlog=1, what="vfio-user socket")


def serve_device(device: PciDevice, path: str, *, pm: pluggy.PluginManager | None = None, once: bool = True,
                 out: TextIO | None = None, listener: Listener | None = None) -> int:
    """Serve ``device`` over vfio-user on the UNIX socket ``path``.

    Listens (:func:`listen_vfio_user`, unless ``listener`` is given), prints one
    ``listening`` line, serves one client until it leaves (QEMU never reconnects)
    and returns 0. SIGTERM/SIGINT end it cleanly. The device and the listener
    are closed at the end.

    :param device: the device, e.g. from :meth:`pcidev.registry.DeviceRegistry.create`.
    :param path: the socket path.
    :param pm: the plugin manager (migration blockers of its plugins).
    :param once: return after the first client (else serve the next one).
    :param out: where the status lines go (standard output).
    :param listener: a listener from :func:`listen_vfio_user` on ``path`` (owned
        by this function from now on, closed when it returns or raises).
    :returns: the exit status.
    :raises TransportError: the socket cannot be created (one line naming the cause).
    """
    out = sys.stdout if out is None else out
    try:
        endpoint = DeviceEndpoint(device, pm=pm)
    except BaseException:
        if listener is not None:
            listener.close()
        raise
    try:
        if listener is None:
            listener = listen_vfio_user(path)
    except BaseException:
        endpoint.close()
        raise
    server: VfioUserServer | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        endpoint.start()
        print(f"pcidev: vfio-user server for {device.TYPE_NAME or type(device).__name__} listening on "
              f"{path} (pid {os.getpid()})", file=out, flush=True)
        pending = None
        while True:
            conn = pending if pending is not None else listener.sock.accept()[0]
            server = VfioUserServer(endpoint, conn)
            with ExtraClientGuard(listener.sock, conn) as guard:  # a second client is closed at once
                reason = server.serve()  # a client that left: server.disconnect() ran
            pending = guard.next_client
            if not server.counts:
                # closed before its first message (another server probing whether
                # this socket is live, say): not the client; keep listening
                log.info("a connection closed before its first message (%s); still listening", reason)
                continue
            print(f"pcidev: client left ({reason}); messages: {json.dumps(server.counts, sort_keys=True)}",
                  file=out, flush=True)
            if once:
                return 0
    except OSError as exc:
        raise TransportError(f"vfio-user socket {path}: {exc.strerror or exc}") from exc
    finally:
        listener.close()
        endpoint.close()
        device.close()  # the device's life ends with the server: workers joined, on_close() (NVMe saves its state)
