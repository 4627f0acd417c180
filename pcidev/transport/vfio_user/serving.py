"""Running a device as a vfio-user server: the listening socket, the accept loop, signals.

:func:`serve_device` is what ``pcidev serve --vfio-user`` runs: it listens on a
UNIX socket, prints one ``listening`` line, and serves each client with a
:class:`~pcidev.transport.vfio_user.server.VfioUserServer`. With ``once`` it
returns when the first client leaves; without, the device keeps its state and
the next client is accepted (``pcidev serve``'s default).

With a control endpoint (``control``), a ``pcidev handover`` request moves the
device and its client's connection to a new process
(:mod:`pcidev.transport.vfio_user.handover`): the serve thread stops reading the
client at a message boundary and hands everything over; on success it returns
0 without removing the socket files, which the new process now serves.
:func:`serve_adopted` is the new process's side (``serve --adopt FD``).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import pluggy

from pcidev.device import PciDevice
from pcidev.errors import ConfigError, TransportError
from pcidev.migration.blockers import collect_blockers
from pcidev.pci.capabilities import sriov as sriov_regs
from pcidev.sriov import SriovFunctions, VirtualFunction, functions_of
from pcidev.transport.address import Listener, listen_unix
from pcidev.transport.endpoint import NEW, DeviceEndpoint
from pcidev.transport.vfio_user.handover import (
    HANDED,
    LOST,
    Adopted,
    HandoverControl,
    HandoverJob,
    adopt,
    outcome_line,
)
from pcidev.transport.vfio_user.server import ExtraClientGuard, VfioUserServer, endpoint_migrated_out

log = logging.getLogger(__name__)

__all__ = ["VfioUserService", "VfSockets", "enable_vfs", "listen_vfio_user", "serve_adopted", "serve_device",
           "vf_socket_path"]


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


#: vfio-user migration state RUNNING (``VFIO_DEVICE_STATE_RUNNING``): a handover needs it
_MIG_RUNNING = 2
_HANDED_OVER = "handed over"
_SIGNALLED = "signal"
_LOST = "connection lost in a handover"
_STOPPED = "stopped"
#: reasons that end the service rather than a client's session
_ENDS = (_HANDED_OVER, _SIGNALLED, _LOST, _STOPPED)


class VfioUserService:
    """The serving loop of one device on one vfio-user socket: accepts clients, serves
    each, and runs the handovers its control endpoint asks for.

    :param endpoint: the device's endpoint (started, or adopted from a handover).
    :param listener: the vfio-user socket's listener (owned from now on).
    :param path: the socket path (for messages).
    :param pm: the plugin manager (migration blockers of its plugins).
    :param once: return when the first client leaves (else the device keeps its
        state and the next client is accepted).
    :param out: where the status lines go.
    :param control: the handover control endpoint (owned from now on), or None.
    :param child_args: arguments of a handover's new process after ``python -m pcidev``.
    :param signals: make SIGTERM/SIGINT end the service (only from the main thread; a VF's
        service in a thread of its own is ended by :meth:`stop`).
    :param server_options: keyword arguments of each client's
        :class:`~pcidev.transport.vfio_user.server.VfioUserServer` (its limits:
        ``max_dma_maps``, ``message_timeout``, ``allow_unsealed_dma``, ...).
    """

    def __init__(self, endpoint: DeviceEndpoint, listener: Listener, path: str, *,
                 pm: pluggy.PluginManager | None = None, once: bool = False, out: TextIO | None = None,
                 control: Listener | None = None, child_args: Sequence[str] = (), signals: bool = True,
                 server_options: dict[str, Any] | None = None) -> None:
        self.endpoint = endpoint
        #: keyword arguments of each client's server (its limits)
        self.server_options: dict[str, Any] = dict(server_options or {})
        self.device = endpoint.device
        self.listener = listener
        self.path = path
        self.pm = pm
        self.once = once
        self.out = sys.stdout if out is None else out
        self.control_listener = control
        self.control: HandoverControl | None = None
        if control is not None:
            self.control = HandoverControl(control, child_args=child_args, endpoint=endpoint, wake=self.wake,
                                           precheck=self._precheck)
        self.server: VfioUserServer | None = None
        self._lock = threading.Lock()
        self._woken = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._deferred_signal: int | None = None
        self._handed_job: HandoverJob | None = None
        self._closed = False
        self._next_client: socket.socket | None = None
        self._signals_installed = not signals
        self._stop_requested = False
        self._guard: ExtraClientGuard | None = None
        #: called once right before the first poll of a socket (a handover's new process
        #: tells the old one: the end of the downtime it reports)
        self.on_serving: Callable[[], None] | None = None

    # -- waking the serve thread ------------------------------------------------------------
    def wake(self) -> None:
        """Make the serve thread look at pending handovers and deferred signals at the
        next message boundary (any thread)."""
        self._woken.set()
        with self._lock:
            if self._closed:
                return
            server = self.server
            if server is not None:
                server.loop.wake()
            try:
                os.write(self._wake_w, b"w")
            except OSError:
                pass

    def stop(self) -> None:
        """End the service at the next message boundary (any thread): its client is
        dropped, the socket removed and the device closed."""
        self._stop_requested = True
        self.wake()

    def _precheck(self) -> str | None:
        if self.device.virtual_functions:
            return "the device's VFs are served on sockets of their own: a handover cannot move them"
        if endpoint_migrated_out(self.endpoint):
            return ("the device migrated out over vfio-user (STOP_COPY reached) and has not run since: "
                    "its state lives at the destination")
        server = self.server
        if server is not None and server.conn.mig_state != _MIG_RUNNING:
            return f"the device is in vfio-user migration state {server.conn.mig_state}, not RUNNING"
        if self.endpoint.memory.dirty is not None:
            return "DMA dirty logging is on (a vfio-user migration runs)"
        reasons = collect_blockers(self.device, self.pm)
        if reasons:
            return "the device cannot migrate now: " + "; ".join(reasons)
        return None

    def _on_wake(self, server: VfioUserServer | None) -> str | None:
        self._woken.clear()
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass
        if self.control is not None:
            job = self.control.take_cut()
            guard = self._guard
            outcome = None
            if job is not None:
                if guard is not None:
                    guard.pause()  # before CONN: the listener is the new process's from then on
                outcome = self.control.cut(job, server, self.listener)
                if guard is not None and outcome not in (HANDED, LOST):
                    guard.resume()
            if job is not None and outcome == HANDED:
                self._handed_job = job
                print(outcome_line(job.outcome), file=self.out, flush=True)
                return _HANDED_OVER
            if job is not None and outcome == LOST:
                self._handed_job = job  # the report must reach the CLI before this process ends
                print(f"pcidev: {job.outcome['reason']}", file=self.out, flush=True)
                return _LOST
        if self._deferred_signal is not None and not (self.control is not None and self.control.cutting):
            return _SIGNALLED
        if self._stop_requested:
            return _STOPPED
        return None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._handed_job is not None and self._handed_job.reported.is_set():
            # handed over and reported: only this process's copies are left (the kernel
            # closes them; nothing is unlinked or saved), so a signal ends it at once
            os._exit(0 if self._handed_job.outcome.get("ok") else 1)
        if self._handed_job is not None or (self.control is not None and self.control.cutting):
            log.warning("signal %d deferred: a handover's cut is running", signum)
            self._deferred_signal = signum
            return
        raise SystemExit(128 + signum)

    def install_signals(self) -> None:
        """Make SIGTERM/SIGINT end the service cleanly (deferred while a handover runs). Idempotent."""
        if self._signals_installed:
            return
        self._signals_installed = True
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _mark_serving(self) -> None:
        hook, self.on_serving = self.on_serving, None
        if hook is not None:
            hook()

    # -- the loop ---------------------------------------------------------------------------
    def _accept(self) -> VfioUserServer | str | None:
        """Wait for a client (or a wake-up). :returns: its server, a reason to stop, or None."""
        poller = select.poll()
        poller.register(self.listener.sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        if not self._woken.is_set():
            self._mark_serving()
            events = poller.poll()
            if not any(fd == self.listener.sock.fileno() for fd, _ev in events):
                return self._on_wake(None)
        else:
            return self._on_wake(None)
        conn, _ = self.listener.sock.accept()
        conn.set_inheritable(False)
        return VfioUserServer(self.endpoint, conn, **self.server_options)

    def run(self, server: VfioUserServer | None = None, *, banner: str | None = None) -> int:
        """Serve until the end (see the class): returns the exit status, closes what it owns.

        :param server: a connection to serve first (adopted in a handover).
        :param banner: printed once the signals are handled and the endpoint runs.
        :raises TransportError: the socket failed (one line naming the cause).
        :raises SystemExit: SIGTERM/SIGINT (deferred while a handover runs).
        """
        handed = False
        try:
            self.install_signals()
            if self.endpoint.state == NEW:
                self.endpoint.start()
            if self.control is not None and not self.control.started:
                self.control.start()
            if banner is not None:
                print(banner, file=self.out, flush=True)
            while True:
                if server is None:
                    got = self._accept()
                    if not isinstance(got, VfioUserServer):
                        reason = got
                    else:
                        server, reason = got, None
                if server is not None:
                    reason = self._serve_one(server)
                    if reason not in _ENDS and self._client_left(server, reason):
                        if self.control is not None:  # a handover being prepared has nothing left to move
                            self.control.stop(f"the client left ({reason}) and the server ends (--once)")
                        return 0
                    server = None
                    nxt, self._next_client = self._next_client, None
                    if nxt is not None and reason not in _ENDS:
                        server = VfioUserServer(self.endpoint, nxt, **self.server_options)
                        continue
                    if nxt is not None:
                        nxt.close()
                if reason == _HANDED_OVER:
                    handed = True
                    return 0
                if reason == _LOST:
                    return 1
                if reason == _STOPPED:
                    return 0
                if reason == _SIGNALLED:
                    raise SystemExit(128 + (self._deferred_signal or signal.SIGTERM))
        except OSError as exc:
            raise TransportError(f"vfio-user socket {self.path}: {exc.strerror or exc}") from exc
        finally:
            self._close(handed)

    def _serve_one(self, server: VfioUserServer) -> str:
        server.loop.on_wake = lambda: self._on_wake(server)
        with self._lock:
            self.server = server
        if self._woken.is_set():
            server.loop.wake()
        try:
            with ExtraClientGuard(self.listener.sock, server.sock) as guard:  # a second client is closed at once
                self._guard = guard
                self._mark_serving()
                try:
                    reason = server.serve()
                finally:
                    self._guard = None  # closes the socket (never shuts it down); disconnect() if the client left
            self._next_client = guard.next_client
            return reason
        finally:
            with self._lock:
                self.server = None

    def _client_left(self, server: VfioUserServer, reason: str) -> bool:
        """A client left: report it. :returns: whether to stop (``once``)."""
        if not server.counts:
            # closed before its first message (another server probing whether
            # this socket is live, say): not the client; keep listening
            log.info("a connection closed before its first message (%s); still listening", reason)
            return False
        print(f"pcidev: client left ({reason}); messages: {json.dumps(server.counts, sort_keys=True)}",
              file=self.out, flush=True)
        # (integration, WP-B: VfioUserServer.serve() runs disconnect() itself when its client left)
        return self.once

    def discard(self) -> None:
        """Forget a service that never ran (a handover that failed in the new process):
        stop its control thread, close its own pipes; the listeners stay open (the old
        process serves them)."""
        if self.control is not None:
            self.control.stop()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _close(self, handed: bool) -> None:
        if self._handed_job is not None:
            self._handed_job.reported.wait(5.0)  # the report must reach the CLI before this process ends
        if self.control is not None:
            self.control.stop()
        with self._lock:
            self._closed = True
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        if handed:
            # the new process listens on the same sockets now: close, never unlink
            self.listener.detach()
            if self.control_listener is not None:
                self.control_listener.detach()
        else:
            self.listener.close()
            if self.control_listener is not None:
                self.control_listener.close()
        # After a handover the device no longer owns its state (migrated_out):
        # closing it joins its workers and persists nothing.
        self.endpoint.close()
        self.device.close()


def serve_device(device: PciDevice, path: str, *, pm: pluggy.PluginManager | None = None, once: bool = True,
                 out: TextIO | None = None, listener: Listener | None = None, control: Listener | None = None,
                 child_args: Sequence[str] = (), sriov_vfs: int = 0,
                 server_options: dict[str, Any] | None = None) -> int:
    """Serve ``device`` over vfio-user on the UNIX socket ``path``.

    Listens (:func:`listen_vfio_user`, unless ``listener`` is given), prints one
    ``listening`` line, and serves clients (:class:`VfioUserService`): with
    ``once``, until the first one leaves (QEMU never reconnects). SIGTERM/SIGINT
    end it cleanly. The device and the listeners are closed at the end (after a
    handover the socket files stay: the new process serves them).

    :param device: the device, e.g. from :meth:`pcidev.registry.DeviceRegistry.create`.
    :param path: the socket path.
    :param pm: the plugin manager (migration blockers of its plugins).
    :param once: return after the first client (else serve the next one, the device
        keeping its state).
    :param out: where the status lines go (standard output).
    :param listener: a listener from :func:`listen_vfio_user` on ``path`` (owned
        by this function from now on, closed when it returns or raises).
    :param control: the handover control endpoint
        (:func:`~pcidev.transport.vfio_user.handover.listen_control`), owned from now on.
    :param child_args: the arguments of a handover's new process after
        ``python -m pcidev`` (``serve ... DEVICE,props``; ``--adopt FD`` is appended).
    :param server_options: keyword arguments of each client's
        :class:`~pcidev.transport.vfio_user.server.VfioUserServer` (its limits).
    :param sriov_vfs: SR-IOV: enable this many VFs at the start. A device with SR-IOV has
        VF ``k`` served on ``PATH.vf<k>`` while it exists (:class:`VfSockets`), whoever set
        VF Enable; a handover is refused while there are VFs.
    :returns: the exit status.
    :raises TransportError: the socket cannot be created (one line naming the cause).
    """
    out = sys.stdout if out is None else out
    owned = [x for x in (listener, control) if x is not None]
    try:
        endpoint = DeviceEndpoint(device, pm=pm)
    except BaseException:
        for x in owned:
            x.close()
        raise
    try:
        if listener is None:
            listener = listen_vfio_user(path)
    except BaseException:
        endpoint.close()
        for x in owned:
            x.close()
        raise
    service = VfioUserService(endpoint, listener, path, pm=pm, once=once, out=out, control=control,
                              server_options=server_options,
                              child_args=child_args)
    vf_sockets: VfSockets | None = None
    functions = functions_of(device)
    if functions is not None or sriov_vfs:
        try:
            if functions is None:
                raise ConfigError(f"device type {device.TYPE_NAME} has no SR-IOV capability (--sriov-vfs)")
            vf_sockets = VfSockets(functions, path, pm=pm, out=out,  # also VFs the PF's client enables
                                   server_options=server_options)
            if sriov_vfs:
                enable_vfs(device, sriov_vfs)
        except BaseException:
            if vf_sockets is not None:
                vf_sockets.close()
            service.discard()
            listener.close()
            if control is not None:
                control.close()
            endpoint.close()
            device.close()
            raise
    try:
        return service.run(banner=f"pcidev: vfio-user server for {device.TYPE_NAME or type(device).__name__} "
                                  f"listening on {path} (pid {os.getpid()})")
    finally:
        if vf_sockets is not None:
            vf_sockets.close()


def serve_adopted(device: PciDevice, path: str, chan_fd: int, *, pm: pluggy.PluginManager | None = None,
                  once: bool = False, out: TextIO | None = None, child_args: Sequence[str] = (),
                  timeout: float = 30.0, server_options: dict[str, Any] | None = None) -> int:
    """Take ``device``'s place in a handover (``pcidev serve --adopt FD``) and serve on.

    The device was built here like the old process's (same type and properties);
    the old process sends its state, the client's connection and its listeners
    over ``chan_fd`` (:func:`~pcidev.transport.vfio_user.handover.adopt`). On any
    failure before the device runs here, the old process keeps it: this returns 1
    with one line, touching none of the sockets received.

    :param device: the new device.
    :param path: the vfio-user socket path (the old process's).
    :param chan_fd: the socketpair end inherited from the old process.
    :param pm: the plugin manager.
    :param once: as :func:`serve_device`.
    :param out: where the status lines go.
    :param child_args: for the next handover, as :func:`serve_device`.
    :param timeout: seconds to wait for each step of the handover.
    :param server_options: as :func:`serve_device` (a handover's new process gets the old
        one's through its command line).
    :returns: the exit status.
    """
    out = sys.stdout if out is None else out
    try:
        endpoint = DeviceEndpoint(device, pm=pm)
    except BaseException:
        device.close()
        raise
    services: list[VfioUserService] = []

    def prepare(got: Adopted) -> None:
        # everything serving needs is built before the acknowledgement: outside the downtime
        service = VfioUserService(endpoint, got.listener, path, pm=pm, once=once, out=out,
                                  control=got.control, child_args=child_args, server_options=server_options)
        service.install_signals()
        service.on_serving = got.serving
        services.append(service)

    def committed(got: Adopted) -> None:
        service = services[0]
        if service.control is not None:
            service.control.start()
        dormant = "" if got.running else " (dormant: the device waits, quiesced, for its next client)"
        print(f"pcidev: vfio-user server for {device.TYPE_NAME or type(device).__name__} took over {path} "
              f"from pid {got.old_pid} (pid {os.getpid()}){dormant}", file=out, flush=True)

    try:
        adopted = adopt(chan_fd, endpoint, timeout=timeout, prepare=prepare, committed=committed)
    except BaseException:
        for service in services:
            service.discard()
        endpoint.close()  # NEW or never committed: persists nothing
        raise
    # SR-IOV (handed over with VF Enable clear): the VFs the PF's client enables get sockets, as in serve_device
    functions = functions_of(device)
    vf_sockets = (VfSockets(functions, path, pm=pm, out=out, server_options=server_options)
                  if functions is not None else None)
    try:
        return services[0].run(adopted.server)
    finally:
        if vf_sockets is not None:
            vf_sockets.close()


# ------------------------------------------------------------------------------------------ SR-IOV
def vf_socket_path(path: str, k: int) -> str:
    """The socket VF ``k`` (0-based) of the PF served on ``path`` is served on: ``PATH.vf<k>``."""
    return f"{path}.vf{k}"


class VfSockets:
    """Serves each virtual function of a PF on a vfio-user socket of its own
    (:func:`vf_socket_path`) while VF Enable is set: QEMU's ``vfio-user-pci`` attaches one
    device per socket. Each VF gets its own endpoint (its client's memory and eventfds) and
    a serving thread; a VF that goes (VF Enable cleared, the PF reset) has its socket closed.
    A :class:`~pcidev.sriov.VfWatcher`.

    :param functions: the PF's virtual functions.
    :param path: the PF's socket path.
    :param pm: the plugin manager.
    :param out: where the status lines go.
    :param server_options: keyword arguments of each VF client's
        :class:`~pcidev.transport.vfio_user.server.VfioUserServer` (its limits, as the PF's).
    """

    def __init__(self, functions: SriovFunctions, path: str, *, pm: pluggy.PluginManager | None = None,
                 out: TextIO | None = None, server_options: dict[str, Any] | None = None) -> None:
        self.functions = functions
        self.path = path
        self.pm = pm
        self.server_options: dict[str, Any] = dict(server_options or {})
        self.out = sys.stdout if out is None else out
        self._served: dict[int, tuple[VfioUserService, threading.Thread]] = {}
        self._lock = threading.Lock()
        functions.watch(self)

    def vf_added(self, vf: VirtualFunction) -> None:
        """Listen on the VF's socket and serve it in a thread."""
        vpath = vf_socket_path(self.path, vf.vf_index)
        vf.standalone = True
        try:
            listener = listen_vfio_user(vpath)
        except TransportError as exc:
            log.error("VF %d is not served: %s", vf.vf_index, exc)
            return
        endpoint = DeviceEndpoint(vf, pm=self.pm)
        service = VfioUserService(endpoint, listener, vpath, pm=self.pm, once=False, out=self.out, signals=False,
                                  server_options=self.server_options)
        thread = threading.Thread(target=self._run, args=(service, vf.vf_index, vpath), name=f"vfio-user[{vf.name}]",
                                  daemon=True)
        with self._lock:
            self._served[vf.vf_index] = (service, thread)
        thread.start()

    def _run(self, service: VfioUserService, k: int, vpath: str) -> None:
        try:
            service.run(banner=f"pcidev: VF {k} served on {vpath}")
        except Exception:
            log.exception("serving VF %d failed", k)

    def vf_removed(self, vf: VirtualFunction) -> None:
        """Stop serving the VF and remove its socket."""
        with self._lock:
            got = self._served.pop(vf.vf_index, None)
        if got is not None:
            service, thread = got
            service.stop()
            thread.join(10.0)
            if thread.is_alive():
                log.error("VF %d: its vfio-user service did not stop within 10 s; the VF is closed under it",
                          vf.vf_index)

    def close(self) -> None:
        """Stop serving every VF (the PF's service ends)."""
        self.functions.unwatch(self)
        with self._lock:
            served, self._served = list(self._served.values()), {}
        for service, _thread in served:
            service.stop()
        for _service, thread in served:
            thread.join(10.0)


def enable_vfs(device: PciDevice, num_vfs: int) -> None:
    """Set NumVFs, VF Enable and VF MSE in ``device``'s SR-IOV capability, as a host does
    (``sriov_numvfs``) before it hands its VFs out.

    :raises ConfigError: the device has no SR-IOV capability, or too few VFs, or they did not appear.
    """
    functions = functions_of(device)
    if functions is None:
        raise ConfigError(f"device type {device.TYPE_NAME or type(device).__name__} has no SR-IOV capability")
    cap = functions.cap
    if not 0 < num_vfs <= cap.total_vfs:
        raise ConfigError(f"{num_vfs} VFs asked for, TotalVFs is {cap.total_vfs}")
    if cap.offset is None:
        raise ConfigError("the SR-IOV capability is not placed in configuration space (the device is not realized)")
    with device.lock:
        device.config_write(cap.offset + sriov_regs.NUM_VF, 2, num_vfs)
        device.config_write(cap.offset + sriov_regs.CTRL, 2, sriov_regs.CTRL_VFE | sriov_regs.CTRL_MSE)
    if len(functions.vfs) != num_vfs or device.failed is not None:
        raise ConfigError(f"the VFs did not appear: {device.failed}")
