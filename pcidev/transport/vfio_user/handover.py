"""Live handover: a served device and its client's connection move to a new process.

``pcidev handover --vfio-user SOCKET`` asks the ``pcidev serve`` process serving
``SOCKET`` to hand its device, and the client connection QEMU holds on it, to a
new ``pcidev serve`` process. QEMU never reconnects, so the connected socket
itself moves (``SCM_RIGHTS``), with the DMA region fds, the interrupt eventfds,
the device's vmstate and its backends' fds; QEMU and the guest see a pause.

Who does what:

* **The control endpoint** is ``SOCKET + ".ctl"`` (:func:`control_path`), a UNIX
  stream socket of mode 0600 bound by ``serve`` beside the vfio-user socket. Every
  connection is checked with ``SO_PEERCRED``: only the user the server runs as may
  ask (:class:`HandoverControl`).
* **The old process spawns the new one**: ``python -m pcidev [-p ...] serve
  --vfio-user SOCKET ... DEVICE,props --adopt FD`` with one end of a socketpair as
  ``FD``. It keeps serving while the new process starts and builds its device,
  until the new one says READY. Descriptors the device names in
  :meth:`~pcidev.device.PciDevice.inheritable_fds` (its disk images) are passed at
  the start (``--inherit-fd FD:KEY``, :mod:`pcidev.inheritance`): the new process
  builds its device on them and never reopens their paths.
* **The cut**: the old process stops reading the client socket at a message
  boundary (every request read so far answered; the bytes of a message read only
  in part travel as ``pending``), sends CONN (the connection state, the client
  socket, the vfio-user and control listeners), then the device
  (:meth:`~pcidev.transport.endpoint.DeviceEndpoint.hand_over`: quiesce, vmstate
  with its fds in batches of at most 253). The new process loads, acknowledges;
  the old one sends COMMIT; the new one sends RUNNING *before* it first reads the
  client socket, then serves. The old process closes its copies (never
  ``shutdown``), leaves the socket files in place and exits 0.
* **Rollback**: any failure before COMMIT (or the new process ending after COMMIT
  without RUNNING) sends ABORT, kills and reaps the new process, and the old one
  serves on with the same device; ``pcidev handover`` exits 1 with the reason.

Frames are those of :mod:`pcidev.migration.channel` (READY, CONN, COMMIT, ABORT,
HANDOVER, REPORT). The environment variable :data:`FAULT_ENV` makes the new
process fail on purpose (tests): ``die-before-ack``, ``nack``, ``die-after-commit``.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from pcidev._version import __version__
from pcidev.errors import ConnectionLostError, HandoverDeniedError, MigrationError, PcidevError, TransportError
from pcidev.inheritance import format_inherit_arg
from pcidev.migration.channel import (
    ABORT,
    CONN,
    FRAME_HEADER,
    HANDOVER,
    MAGIC,
    READY,
    REPORT,
    SERVING,
    frame_meta,
    recv_frame,
    send_meta,
)
from pcidev.transport.address import Address, Listener, SocketFile, listen_unix
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import SCM_MAX_FD, close_fds, recv_exact
from pcidev.transport.vfio_user.conn import ConnectionState
from pcidev.transport.vfio_user.server import VfioUserServer

log = logging.getLogger(__name__)

__all__ = [
    "CONTROL_SUFFIX",
    "FAULT_ENV",
    "FAULTS",
    "HANDED",
    "HANDOVER_PROTOCOL",
    "KEPT",
    "LOST",
    "Adopted",
    "HandoverControl",
    "HandoverJob",
    "adopt",
    "control_path",
    "listen_control",
    "outcome_line",
    "peer_uid",
    "request_handover",
]

#: appended to the vfio-user socket path to name the control endpoint
CONTROL_SUFFIX = ".ctl"
#: environment variable that makes the new process fail on purpose (tests)
FAULT_ENV = "PCIDEV_HANDOVER_FAULT"
#: the failures :data:`FAULT_ENV` can ask for
FAULTS = ("die-before-ack", "die-after-commit", "nack", "hang-after-commit", "half-running")
#: version of the HANDOVER request
HANDOVER_PROTOCOL = 1
_UCRED = struct.Struct("@iII")  # struct ucred {pid_t pid; uid_t uid; gid_t gid}: a native struct
#: The paused phase (the client's socket is read by nobody) must end well within QEMU's
#: ``x-msg-timeout`` (5 s by default): at most _ACK_TIMEOUT seconds from the stop to the
#: new process's acknowledgement, then at most _RUNNING_TIMEOUT for RUNNING after COMMIT
#: (then a SIGKILL at once): in all at most _PAUSE_BUDGET seconds.
_ACK_TIMEOUT = 2.0
_RUNNING_TIMEOUT = 1.0
_PAUSE_BUDGET = _ACK_TIMEOUT + _RUNNING_TIMEOUT
#: seconds the serve thread may take to reach a message boundary after READY
_BOUNDARY_TIMEOUT = 10.0
#: seconds a control connection may take to send its whole request
_REQUEST_TIMEOUT = 2.0
#: the longest HANDOVER request body (bytes)
_MAX_REQUEST = 1 << 16
#: the longest CONN body (bytes): the connection state and the pending bytes of a message
_MAX_CONN = 1 << 24
#: control connections read at once (more are answered "busy" at once)
_MAX_READERS = 8
#: the most the serving process takes after the request, beyond the CLI's ``timeout``
#: (reaching the boundary, the pause, SIGKILL and reaping, SERVING): the CLI waits longer
_SERVER_SLACK = _BOUNDARY_TIMEOUT + _ACK_TIMEOUT + _RUNNING_TIMEOUT + 5.0


def control_path(socket_path: str) -> str:
    """The control endpoint of the server on the vfio-user socket ``socket_path``:
    ``socket_path + ".ctl"``."""
    return socket_path + CONTROL_SUFFIX


def listen_control(path: str) -> Listener:
    """Listen on the control endpoint ``path`` (mode 0600; only a stale socket is replaced).

    :raises TransportError: the socket cannot be created (one line naming the cause).
    """
    return listen_unix(path, backlog=4, what="handover control socket", mode=0o600)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of the UNIX socket ``sock`` (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(raw)[1])


def _notify_main_pid(pid: int) -> None:
    """Tell systemd the service's main process is ``pid`` now (``MAINPID``), if it asked
    (``NOTIFY_SOCKET``). The old process sends it (it is the main PID, which the default
    ``NotifyAccess=main`` listens to); the new one too (heard with ``NotifyAccess=all``)."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return
    addr = "\0" + where[1:] if where.startswith("@") else where
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(f"MAINPID={pid}\n".encode(), addr)
    except OSError as exc:
        log.warning("handover: could not notify systemd of the new main pid: %s", exc)


# ----------------------------------------------------------------------------- the CLI side
def request_handover(control: str, *, exec_path: str | None = None, timeout: float = 30.0,
                     fault: str | None = None) -> dict[str, Any]:
    """Ask the server whose control endpoint is ``control`` for a handover and wait
    for its report (what ``pcidev handover`` does).

    :param control: the control endpoint (:func:`control_path` of the vfio-user socket).
    :param exec_path: the Python interpreter of the new process (default: the server's own).
    :param timeout: seconds the new process may take to start and build its device.
    :param fault: make the new process fail on purpose (one of :data:`FAULTS`; tests).
    :returns: the report (``downtime_ms``, ``state_bytes``, ``fds``, ``old_pid``, ``new_pid``...).
    :raises MigrationError: the server refused or the handover failed (the old process serves on).
    :raises TransportError: the control endpoint cannot be reached or answered garbage.
    """
    started = time.monotonic()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.settimeout(5.0)
            sock.connect(control)
        except FileNotFoundError:
            raise TransportError(f"no handover control socket at {control} (is 'pcidev serve --vfio-user' "
                                 "running on that socket?)") from None
        except ConnectionRefusedError:
            raise TransportError(f"handover control socket {control}: nobody listens on it "
                                 "(the server is gone)") from None
        except OSError as exc:
            raise TransportError(f"handover control socket {control}: {exc.strerror or exc}") from None
        request: dict[str, Any] = {"protocol": HANDOVER_PROTOCOL, "exec": exec_path, "timeout": float(timeout),
                                   "fault": fault}
        try:
            send_meta(sock, HANDOVER, request, deadline=time.monotonic() + _REQUEST_TIMEOUT)
        except TransportError:
            pass  # refused before the request was read (and closed): the REPORT says why
        waited = timeout + _SERVER_SLACK + 15.0  # longer than the server's worst case
        sock.settimeout(waited)
        try:  # (the whole REPORT by then: a server trickling it cannot stretch the wait)
            kind, body, stray = recv_frame(sock, deadline=time.monotonic() + waited)
        except TransportError as exc:
            raise TransportError(f"handover control socket {control}: the server did not answer within "
                                 f"{waited:g} s ({exc}); see its log for the outcome") from None
        close_fds(stray)
        if kind != REPORT:
            raise TransportError(f"handover control socket {control}: expected a REPORT, got frame type {kind}")
        report = frame_meta(kind, body, {"ok": bool, "reason": str})
    finally:
        sock.close()
    if not report["ok"]:
        raise MigrationError(f"handover refused: {report['reason']}" if report.get("refused")
                             else f"handover failed: {report['reason']}")
    report["host_ms"] = round((time.monotonic() - started) * 1000, 3)
    return report


# ---------------------------------------------------------------------- the old process
@attrs.define
class HandoverJob:
    """One handover in progress in the old process.

    :ivar proc: the new process.
    :ivar chan: the old process's end of the socketpair to it.
    :ivar fault: the failure asked of the new process (tests), or None.
    :ivar ready: the new process's READY (``pid``, ``version``, ``device_type``).
    :ivar spawn_ms: from starting the new process to its READY.
    :ivar inherited: descriptors passed at the start (the device's images).
    """

    proc: subprocess.Popen[bytes]
    chan: socket.socket
    fault: str | None = None
    inherited: int = 0
    ready: dict[str, Any] = attrs.Factory(dict)
    spawn_ms: float = 0.0
    #: set by the serve thread when the cut ended (handed over or rolled back)
    done: threading.Event = attrs.Factory(threading.Event)
    #: set by the control thread once the report went out
    reported: threading.Event = attrs.Factory(threading.Event)
    #: the result: ``ok`` and ``reason``, and the figures on success
    outcome: dict[str, Any] = attrs.Factory(dict)

    def kill(self) -> None:
        """End the new process (SIGKILL if it is still alive after 1 s) and reap it."""
        try:
            self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            self.kill_now()

    def kill_now(self) -> None:
        """SIGKILL the new process at once and reap it (after COMMIT: it may be about to run)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def send_abort(self, reason: str) -> None:
        """Tell the new process to give up (ABORT); it must not run the device."""
        try:
            self.chan.settimeout(0.5)
            send_meta(self.chan, ABORT, {"reason": reason}, deadline=time.monotonic() + 0.5)
        except (TransportError, OSError):
            pass

    def abort(self, reason: str) -> None:
        """:meth:`send_abort`, then end and reap the new process."""
        self.send_abort(reason)
        self.kill()
        self.chan.close()


#: :meth:`HandoverControl.cut`'s outcome: the new process serves (this one must stop)
HANDED = "handed"
#: :meth:`HandoverControl.cut`'s outcome: rolled back, this process serves on
KEPT = "kept"
#: :meth:`HandoverControl.cut`'s outcome: the connection is lost (neither may run the device)
LOST = "lost"

#: returns why a handover cannot start now (None: it can)
Precheck = Callable[[], "str | None"]


class HandoverControl:
    """The control endpoint of a serving process and the handovers it runs.

    A thread accepts connections on the control listener, checks the peer's uid,
    reads one HANDOVER request, starts the new process and waits for READY (the
    device is served meanwhile), then asks the serve thread for the cut
    (``wake``) and waits for :meth:`cut` to finish, and answers with REPORT. A
    second request while one runs is refused at once.

    :param listener: the control endpoint (:func:`listen_control`).
    :param child_args: the arguments of the new process after ``python -m pcidev``
        (``--adopt FD`` is appended).
    :param endpoint: the served device's endpoint.
    :param wake: makes the serve thread call :meth:`take_cut` soon, at a message boundary.
    :param precheck: why a handover cannot run now (a migration in progress...), or None.
    """

    def __init__(self, listener: Listener, *, child_args: Sequence[str], endpoint: DeviceEndpoint,
                 wake: Callable[[], None], precheck: Precheck) -> None:
        self.listener = listener
        self.child_args = list(child_args)
        self.endpoint = endpoint
        self.wake = wake
        self.precheck = precheck
        self._lock = threading.Lock()
        self._job: HandoverJob | None = None
        self._cut_wanted: HandoverJob | None = None
        self._busy = False
        self._cutting = False
        self._readers = 0
        self._stopping: str | None = None
        self._spawning: tuple[subprocess.Popen[bytes], socket.socket] | None = None
        self._requests: list[threading.Thread] = []
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._stopped = False

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start accepting requests (a daemon thread)."""
        self._thread = threading.Thread(target=self._accept_loop, name="pcidev-handover-control", daemon=True)
        self._thread.start()

    def stop(self, reason: str = "the server is stopping", *, wait_requests: bool = True) -> None:
        """Stop accepting requests and wait for the thread (not the listener: the caller
        closes or detaches it). A handover not yet at the cut is aborted (its new process
        killed and reaped; its requester told ``reason``). Idempotent.

        :param reason: why, for a requester whose handover is aborted.
        :param wait_requests: also wait (up to 5 s each) for the requests being answered.
        """
        if not self._stopped:
            self._stopped = True
            self.abort_pending(reason)
            try:
                os.write(self._stop_w, b"s")
            except OSError:
                pass
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(10.0)
            for fd in (self._stop_r, self._stop_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        if wait_requests:  # their answers must go out before this process ends
            for t in list(self._requests):
                if t is not threading.current_thread():
                    t.join(5.0)

    def abort_pending(self, reason: str) -> None:
        """Abort a handover that has not reached the cut (any thread): its new process is
        killed and reaped, the requester hears ``reason``. A cut under way is not touched."""
        with self._lock:
            self._stopping = reason
            spawning = self._spawning
            job, self._cut_wanted = self._cut_wanted, None
        if spawning is not None:
            proc, chan = spawning
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            try:
                chan.shutdown(socket.SHUT_RDWR)  # wakes the wait for READY
            except OSError:
                pass
        if job is not None:
            job.outcome = {"ok": False, "reason": reason}
            job.send_abort(reason)
            job.done.set()

    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran."""
        return self._thread is not None

    @property
    def busy(self) -> bool:
        """Whether a handover runs (from its request to its report)."""
        return self._busy

    @property
    def cutting(self) -> bool:
        """Whether the cut runs (the device is paused; signals are deferred meanwhile)."""
        return self._cutting

    # -- control thread -----------------------------------------------------------------
    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self.listener.sock.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            try:
                events = poller.poll()
            except OSError:
                return
            if any(fd == self._stop_r for fd, _ev in events):
                return
            try:
                conn, _ = self.listener.sock.accept()
            except OSError:
                continue
            conn.set_inheritable(False)
            with self._lock:
                take = self._readers < _MAX_READERS
                if take:
                    self._readers += 1
            if not take:
                self._answer(conn, {"ok": False, "refused": True, "reason": "too many control connections"})
                continue
            t = threading.Thread(target=self._serve_request, args=(conn,), name="pcidev-handover", daemon=True)
            self._requests = [r for r in self._requests if r.is_alive()] + [t]
            t.start()

    @staticmethod
    def _answer(conn: socket.socket, report: dict[str, Any]) -> None:
        try:
            conn.settimeout(2.0)
            send_meta(conn, REPORT, report, deadline=time.monotonic() + 2.0)
        except (TransportError, OSError):
            pass
        finally:
            conn.close()

    def _serve_request(self, conn: socket.socket) -> None:
        job: HandoverJob | None = None
        took = False
        try:
            try:
                req = self._read_request(conn)
            except HandoverDeniedError as exc:
                req, report = None, {"ok": False, "refused": True, "reason": f"permission denied: {exc}"}
            except TransportError as exc:
                req, report = None, {"ok": False, "refused": True, "reason": f"bad request: {exc}"}
            finally:
                with self._lock:
                    self._readers -= 1
            if req is None:
                self._answer(conn, report)
                return
            with self._lock:
                take = not self._busy and self._stopping is None
                if take:
                    self._busy = took = True
                why = self._stopping
            if not take:
                self._answer(conn, {"ok": False, "refused": True,
                                    "reason": why or "a handover of this device is already in progress"})
                return
            report = self._run(req)
            job = self._job
        except Exception as exc:  # a bug must not kill the control thread silently
            log.exception("handover failed")
            report = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
        failed = not report.get("ok") and took
        if failed:  # before the answer: the next request must find the server free
            with self._lock:
                self._job = None
                self._busy = False
        try:
            self._answer(conn, report)
        finally:
            if job is not None:
                job.reported.set()
            if failed:
                self.wake()  # a signal may have been deferred meanwhile

    def _read_request(self, conn: socket.socket) -> dict[str, Any]:
        uid = peer_uid(conn)
        if uid != os.getuid():
            raise HandoverDeniedError(f"uid {uid} may not hand over a device served by uid {os.getuid()}")
        kind, body = _recv_request(conn, time.monotonic() + _REQUEST_TIMEOUT)
        if kind != HANDOVER:
            raise TransportError(f"expected a HANDOVER request, got frame type {kind}")
        req = frame_meta(kind, body, {"protocol": int, "timeout": float})
        if req["protocol"] != HANDOVER_PROTOCOL:
            raise TransportError(f"handover protocol {req['protocol']} (this server speaks {HANDOVER_PROTOCOL})")
        if not 0 < req["timeout"] <= 3600:
            raise TransportError(f"timeout {req['timeout']} s out of range")
        exe, fault = req.get("exec"), req.get("fault")
        if exe is not None and (not isinstance(exe, str) or not exe):
            raise TransportError("'exec' is not a path")
        if fault is not None and fault not in FAULTS:
            raise TransportError(f"unknown fault {fault!r}")
        return req

    def _run(self, req: dict[str, Any]) -> dict[str, Any]:
        why = self.precheck()
        if why is not None:
            return {"ok": False, "refused": True, "reason": why}
        try:
            job = self._spawn(req.get("exec") or sys.executable, req.get("fault"), float(req["timeout"]))
        except (OSError, TransportError, MigrationError) as exc:
            return {"ok": False, "reason": f"the new process did not start: {exc}"}
        self._job = job
        with self._lock:
            stopping = self._stopping
            if stopping is None:
                self._cut_wanted = job
        if stopping is not None:
            job.abort(stopping)
            return {"ok": False, "reason": stopping}
        self.wake()
        if not job.done.wait(_BOUNDARY_TIMEOUT):
            with self._lock:
                withdrawn = self._cut_wanted is job
                if withdrawn:
                    self._cut_wanted = None
            if withdrawn:  # the serve thread never came by (a client stuck in the middle of a message)
                job.outcome = {"ok": False, "reason": f"the server did not reach a message boundary in "
                                                      f"{_BOUNDARY_TIMEOUT:g} s"}
                job.send_abort(job.outcome["reason"])
                job.done.set()
            job.done.wait()  # the cut runs: it has its own timeouts
        if not job.outcome.get("ok"):
            job.kill()  # the serve thread already sent ABORT and serves on
            job.chan.close()
            code = job.proc.returncode
            if code not in (0, None, -signal.SIGKILL):
                job.outcome["reason"] += f" (the new process exited with status {code})"
            return job.outcome
        return {**job.outcome, "spawn_ms": job.spawn_ms}

    def _inheritable(self) -> dict[str, int]:
        """Copies of the device's :meth:`~pcidev.device.PciDevice.inheritable_fds`
        (owned by the caller), for the new process (:mod:`pcidev.inheritance`).

        :raises MigrationError: the device's method failed or returned something else
            than keys and open descriptors.
        """
        try:
            device = self.endpoint.device
            fds = {**device.framework_inheritable_fds(), **dict(device.inheritable_fds())}  # + RAM BAR files
        except Exception as exc:
            raise MigrationError(f"the device's inheritable_fds() failed: {type(exc).__name__}: {exc}") from exc
        out: dict[str, int] = {}
        try:
            for key, fd in fds.items():
                if not isinstance(key, str) or not key or "\0" in key or type(fd) is not int:
                    raise MigrationError(f"the device's inheritable_fds() returned {key!r}: {fd!r}")
                try:
                    out[key] = os.dup(fd)
                except OSError as exc:
                    raise MigrationError(f"the device's descriptor {key!r} ({fd}): {exc.strerror}") from None
        except BaseException:
            close_fds(list(out.values()))
            raise
        return out

    def _spawn(self, exe: str, fault: str | None, timeout: float) -> HandoverJob:
        """Start the new process and wait for its READY (the device is served meanwhile)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        mine.set_inheritable(False)
        env = dict(os.environ)
        env.pop(FAULT_ENV, None)
        if fault:
            env[FAULT_ENV] = fault
        argv = [exe, "-m", "pcidev", *self.child_args, "--adopt", str(theirs.fileno())]
        started = time.monotonic()
        inherit: dict[str, int] = {}
        try:
            inherit = self._inheritable()
            for key, fd in inherit.items():
                argv += ["--inherit-fd", format_inherit_arg(key, fd)]
            proc = subprocess.Popen(argv, pass_fds=[theirs.fileno(), *inherit.values()], env=env,
                                    stdin=subprocess.DEVNULL)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
            close_fds(list(inherit.values()))
        job = HandoverJob(proc=proc, chan=mine, fault=fault, inherited=len(inherit))
        with self._lock:
            stopping = self._stopping
            if stopping is None:
                self._spawning = (proc, mine)
        try:
            if stopping is not None:
                raise TransportError(stopping)
            mine.settimeout(timeout)
            try:  # the whole READY within ``timeout`` of the start, however slowly it comes
                kind, body, stray = recv_frame(mine, deadline=started + timeout)
            except TransportError as exc:
                code = proc.poll()
                if self._stopping is not None:
                    raise TransportError(f"{self._stopping} (the new process was killed)") from None
                raise TransportError(f"it ended (status {code}) before it was ready" if code is not None
                                     else f"it was not ready in time ({exc})") from None
            close_fds(stray)
            with self._lock:
                if self._stopping is not None:
                    raise TransportError(self._stopping)
            if kind != READY:
                raise TransportError(f"expected READY, got frame type {kind}")
            job.ready = frame_meta(kind, body, {"pid": int, "device_type": str})
            if job.ready["device_type"] != self.endpoint.device.vmstate_device_type:
                raise TransportError(f"it built a {job.ready['device_type']!r}, not a "
                                     f"{self.endpoint.device.vmstate_device_type!r}")
        except BaseException as exc:
            job.abort(str(exc))
            raise
        finally:
            with self._lock:
                self._spawning = None
        job.spawn_ms = round((time.monotonic() - started) * 1000, 3)
        return job

    # -- serve thread ---------------------------------------------------------------------
    def take_cut(self) -> HandoverJob | None:
        """The handover waiting for the cut, if any (the serve thread calls this at a
        message boundary, then :meth:`cut`)."""
        with self._lock:
            job, self._cut_wanted = self._cut_wanted, None
            self._cutting = job is not None  # signals are deferred from here to the end of the cut
        return job

    def cut(self, job: HandoverJob, server: VfioUserServer | None, listener: Listener) -> str:
        """Hand the device over (serve thread, at a message boundary; the client socket is
        not read meanwhile). On failure everything is as before and serving goes on,
        except when the connection is lost.

        :param job: from :meth:`take_cut`.
        :param server: the connection being served, or None between clients.
        :param listener: the vfio-user socket's listener.
        :returns: :data:`HANDED` (the new process serves now: this one must stop),
            :data:`KEPT` (rolled back: serve on) or :data:`LOST` (the new process may have
            served the client and was killed: neither may run the device; close the
            connection and exit 1).
        """
        self._cutting = True
        try:
            outcome = self._cut(job, server, listener)
        except Exception as exc:
            log.exception("handover failed")
            job.outcome = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
            outcome = KEPT
        if outcome == HANDED:  # before the report: the next request must reach the new process
            self.stop("handed over", wait_requests=False)
        elif outcome == KEPT:
            job.send_abort(str(job.outcome.get("reason", "")))  # the control thread reaps it
        self._cutting = False
        job.done.set()
        return outcome

    def _cut(self, job: HandoverJob, server: VfioUserServer | None, listener: Listener) -> str:
        cut_at = time.monotonic()
        why = self.precheck()
        if why is not None:
            job.outcome = {"ok": False, "refused": True, "reason": why}
            return KEPT
        pending, pending_fds = server.reader.pending() if server is not None else (b"", [])
        try:
            files = {"listener": _file_meta(listener), "control": _file_meta(self.listener)}
            fds = [listener.sock.fileno(), self.listener.sock.fileno()]
            if server is not None:
                fds.append(server.sock.fileno())
            meta = {"protocol": HANDOVER_PROTOCOL, "conn": server.conn.to_meta() if server is not None else None,
                    "pending": pending, "pending_fds": len(pending_fds), "old_pid": os.getpid(),
                    "running": not self.endpoint.device.quiesced, **files}
            conn_fds = fds + pending_fds
            job.chan.settimeout(_ACK_TIMEOUT)
            send_meta(job.chan, CONN, meta, conn_fds, deadline=cut_at + _ACK_TIMEOUT)
            result = self.endpoint.hand_over(job.chan, timeout=max(cut_at + _ACK_TIMEOUT - time.monotonic(), 0.001),
                                             running_timeout=_RUNNING_TIMEOUT, stall=job.kill_now)
        except ConnectionLostError as exc:  # the new process may have read the client: never resume
            close_fds(pending_fds)
            log.error("handover: %s", exc)
            job.outcome = {"ok": False, "lost": True, "reason": str(exc)}
            return LOST
        except Exception as exc:  # the device runs here again (hand_over resumed it)
            if server is not None:
                server.reader.prepend(pending, pending_fds)  # as if nothing had been taken
            if not isinstance(exc, (MigrationError, TransportError)):
                log.exception("handover failed")
            job.outcome = {"ok": False, "reason": str(exc) or type(exc).__name__}
            return KEPT
        close_fds(pending_fds)  # the new process has its own copies
        _notify_main_pid(int(job.ready["pid"]))  # still the main PID: systemd hears this one
        running_at = result.running_at if result.running_at is not None else time.monotonic()
        serving_at = _await_serving(job.chan)  # the new process's first poll of the client's socket
        job.chan.close()
        end = serving_at if serving_at is not None else running_at
        job.outcome = {"ok": True, "reason": "", "old_pid": os.getpid(), "new_pid": int(job.ready["pid"]),
                       "downtime_ms": round((end - cut_at) * 1000, 3), "state_bytes": result.state_size,
                       "fds": result.fds + len(conn_fds) + job.inherited, "same_clock": result.same_clock,
                       "cut_at": round(cut_at, 6),
                       "quiesced_ms": round((result.stopped_at - cut_at) * 1000, 3),
                       "acked_ms": round((result.acked_at - cut_at) * 1000, 3),
                       "running_ms": round((running_at - cut_at) * 1000, 3),
                       "serving_reported": serving_at is not None,
                       "device_running": bool(meta["running"]),
                       "new_version": str(job.ready.get("version", ""))}
        return HANDED


def _await_serving(chan: socket.socket) -> float | None:
    """The new process's SERVING time (its first poll of the client's socket), or None
    if it does not say within a second (it runs the device all the same)."""
    try:
        chan.settimeout(1.0)
        kind, body, stray = recv_frame(chan, deadline=time.monotonic() + 1.0)
        close_fds(stray)
        if kind != SERVING:
            return None
        return float(frame_meta(kind, body, {"serving_at": float})["serving_at"])
    except (TransportError, OSError):
        return None


def _recv_request(conn: socket.socket, deadline: float) -> tuple[int, bytes]:
    """One frame from a control connection, whole by ``deadline`` (``CLOCK_MONOTONIC``),
    however slowly its bytes come (``fdpass.recv_exact``'s deadline).

    :raises TransportError: not in time, the end, descriptors, or not a HANDOVER frame of
        at most :data:`_MAX_REQUEST` bytes.
    """
    def take(n: int) -> bytes:
        try:
            return recv_exact(conn, n, deadline=deadline)[0]
        except TransportError:
            if time.monotonic() >= deadline - 0.005:
                raise TransportError(f"no whole request within {_REQUEST_TIMEOUT:g} s") from None
            raise

    magic, kind, flags, length = FRAME_HEADER.unpack(take(FRAME_HEADER.size))
    if magic != MAGIC or flags or kind != HANDOVER or length > _MAX_REQUEST:
        raise TransportError("not a handover request")
    return kind, take(length) if length else b""


def _file_meta(listener: Listener) -> dict[str, Any] | None:
    f = listener.file
    return None if f is None else {"path": f.path, "dev": f.dev, "ino": f.ino}


def _listener_from(fd: int, meta: Any) -> Listener:
    sock = socket.socket(fileno=fd)
    if not isinstance(meta, dict):
        return Listener(sock, Address("unix", path=""))
    path = str(meta["path"])
    return Listener(sock, Address("unix", path=path), SocketFile(path, int(meta["dev"]), int(meta["ino"])))


def outcome_line(report: dict[str, Any]) -> str:
    """The one line that reports a handover: ``pcidev: handover OLD -> NEW: downtime X ms, ...``."""
    return (f"pcidev: handover {report['old_pid']} -> {report['new_pid']}: downtime {report['downtime_ms']:.1f} ms, "
            f"state {report['state_bytes'] / 1024:.1f} KiB, {report['fds']} fds")


# ---------------------------------------------------------------------- the new process
@attrs.define
class Adopted:
    """What a handover's new process received.

    :ivar listener: the vfio-user socket's listener (the same socket file).
    :ivar control: the control endpoint's listener.
    :ivar server: the client's connection with its state and pending bytes, or None
        (no client was connected).
    :ivar old_pid: the process that served the device before (from CONN).
    :ivar chan: the channel to the old process until :meth:`serving` (then None).
    :ivar running: the device ran in the old process (else it was dormant, quiesced since
        its client left, and stays so until a client's first BAR access).
    """

    listener: Listener
    control: Listener
    server: VfioUserServer | None
    old_pid: int
    chan: socket.socket | None = None
    running: bool = True

    def serving(self) -> None:
        """Tell the old process this one polls the client's socket now (SERVING: the end
        of the downtime it reports), and close the channel. Idempotent; never raises."""
        chan, self.chan = self.chan, None
        if chan is None:
            return
        try:
            chan.settimeout(0.5)
            now = time.monotonic()
            send_meta(chan, SERVING, {"serving_at": now}, deadline=now + 0.5)
        except (TransportError, OSError):
            pass
        finally:
            chan.close()


def _fault_exit(fault: str | None, at: str) -> None:
    if fault == at:
        log.warning("handover: failing on purpose (%s=%s)", FAULT_ENV, fault)
        os._exit(3)


def _fault_after_commit(fault: str | None, chan: socket.socket) -> None:
    """The failures after COMMIT (tests): die, hang, or send half a RUNNING and hang."""
    _fault_exit(fault, "die-after-commit")
    if fault in ("hang-after-commit", "half-running"):
        log.warning("handover: failing on purpose (%s=%s)", FAULT_ENV, fault)
        if fault == "half-running":
            chan.sendall(MAGIC[:4])
        time.sleep(3600)  # the old process kills this one
        os._exit(3)


#: called with what was received, before the acknowledgement (build everything the
#: serving needs here: it is outside the downtime), or after COMMIT (just before RUNNING)
AdoptHook = Callable[[Adopted], None]


def adopt(chan_fd: int, endpoint: DeviceEndpoint, *, timeout: float = 30.0, prepare: AdoptHook | None = None,
          committed: AdoptHook | None = None) -> Adopted:
    """Take the device and its connection over from the process at the other end of
    ``chan_fd`` (``serve --adopt FD``): READY, CONN, the device, ACK, COMMIT, RUNNING.

    Nothing here reads the client socket; when this returns, the device runs and
    RUNNING has gone out, so the caller serves the connection (and calls
    :meth:`Adopted.serving` right before its first poll). On an exception the old
    process keeps (or takes back) the device: the caller must exit without touching
    the sockets received (no ``shutdown``, no unlink).

    :param chan_fd: this end of the socketpair (``--adopt``).
    :param endpoint: the endpoint of the device built here (not started).
    :param timeout: seconds to wait for each step.
    :param prepare: called before the acknowledgement (an exception refuses the handover).
    :param committed: called after COMMIT, before RUNNING (keep it short: the guest waits).
    :returns: what was received.
    :raises PcidevError: the handover failed (one line).
    """
    fault = os.environ.get(FAULT_ENV) or None
    try:
        chan = socket.socket(fileno=chan_fd)
    except OSError as exc:
        raise TransportError(f"handover: --adopt {chan_fd} is not a socket from a serving process "
                             f"({exc.strerror or exc})") from None
    received: list[int] = []
    try:
        chan.set_inheritable(False)
        try:
            endpoint.config_read(0, 4)  # warm the access path before the downtime
        except PcidevError:
            pass
        chan.settimeout(timeout)
        send_meta(chan, READY, {"pid": os.getpid(), "version": __version__,
                                "device_type": endpoint.device.vmstate_device_type},
                  deadline=time.monotonic() + timeout)
        # the whole CONN within ``timeout``, however slowly its bytes come
        kind, body, received = recv_frame(chan, max_fds=SCM_MAX_FD, max_len=_MAX_CONN,
                                          deadline=time.monotonic() + timeout)
        if kind != CONN:
            raise TransportError(f"handover: expected CONN, got frame type {kind}")
        meta = frame_meta(kind, body, {"protocol": int, "pending": bytes, "pending_fds": int})
        # (an old process of an older pcidev sends neither: it ran the device, and is our parent)
        running = meta.get("running", True)
        old_pid = meta.get("old_pid", os.getppid())
        if not isinstance(running, bool) or not isinstance(old_pid, int):
            raise TransportError("handover: CONN's 'running' or 'old_pid' is of the wrong type")
        if meta["protocol"] != HANDOVER_PROTOCOL:
            raise TransportError(f"handover: protocol {meta['protocol']} (this pcidev speaks {HANDOVER_PROTOCOL})")
        npend = meta["pending_fds"]
        has_client = meta.get("conn") is not None
        if len(received) != 2 + int(has_client) + npend or npend < 0:
            raise TransportError(f"handover: CONN carried {len(received)} fds")
        conn = ConnectionState.from_meta(meta["conn"]) if has_client else None
        listener = _listener_from(received[0], meta.get("listener"))
        control = _listener_from(received[1], meta.get("control"))
        client = socket.socket(fileno=received[2]) if has_client else None
        pending_fds = received[2 + int(has_client):]
        received = []
        got = Adopted(listener=listener, control=control, server=None, old_pid=old_pid, chan=chan,
                      running=running)

        def before_ack() -> None:
            _fault_exit(fault, "die-before-ack")
            if fault == "nack":
                raise MigrationError(f"refusing on purpose ({FAULT_ENV}=nack)")
            if client is not None and conn is not None:  # built now: outside the downtime
                server = VfioUserServer(endpoint, client, max_msg_fds=conn.max_msg_fds,
                                        max_data_xfer_size=conn.max_data_xfer_size)
                server.conn = conn
                # loaded, not resumed yet: it runs after COMMIT if it ran in the old process;
                # else (its client left) the first BAR access of this one resumes it
                server.dormant = not running
                server.reader.prepend(meta["pending"], pending_fds)
                got.server = server
            if prepare is not None:
                prepare(got)

        def after_commit() -> None:
            _fault_after_commit(fault, chan)
            if committed is not None:
                committed(got)

        endpoint.accept_handover(chan, timeout=timeout, before_ack=before_ack, committed=after_commit,
                                 resume=running)
    except BaseException:
        close_fds(received)
        chan.close()
        raise
    _notify_main_pid(os.getpid())
    return got
