"""The device side of the device link: :class:`LinkServer` runs in the device's
process. It reads one message at a time from each connection, calls the
transport-agnostic :class:`~pcidev.transport.endpoint.DeviceEndpoint`, and
replies (:mod:`pcidev.transport.link.protocol`). A malformed message gets an
error reply naming the problem; a connection whose framing is broken is closed;
the server itself keeps running.

One request is not answered at once: PRECOPY runs on a thread of its own
(:class:`~pcidev.transport.endpoint.PrecopySession`) while the loop keeps serving
every connection, and its reply goes out from the loop when it ends. The loop is the
only writer of every connection.

A MIGRATE with ``commit_timeout`` whose destination runs the device only once its host
re-attached it (TCP) leaves the device stopped here, awaiting RELEASE or TAKE_BACK on
the MIGRATE's connection (:data:`~pcidev.transport.endpoint.AWAITING_COMMIT`); without
either within ``commit_timeout``, or when that connection ends, the server gives the
device up and exits as after a migration: it never resumes a device that a destination
may run. RESUME's reply goes out before the device runs (a RESUME left without any reply
proves it never ran here).
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from typing import Any

import attrs

from pcidev.errors import MigrationError, PcidevError, TransportError
from pcidev.transport.address import parse_address
from pcidev.transport.endpoint import (
    ABANDONED,
    AWAITING_COMMIT,
    CONNECT_SLICE,
    MIGRATED,
    RUNNING,
    DeviceEndpoint,
    PrecopySession,
)
from pcidev.transport.fdpass import close_fds, send_all
from pcidev.transport.link.protocol import (
    ABANDON,
    BAR_READ,
    BAR_WRITE,
    CONFIG_READ,
    CONFIG_WRITE,
    DMA_MAP,
    DMA_UNMAP,
    FLAG_ERROR,
    FLAG_REPLY,
    HELLO,
    LINK_MAX_FDS,
    MIGRATE,
    NAMES,
    PRECOPY,
    RELEASE,
    RESUME,
    ROM_READ,
    SET_IRQS,
    STATUS,
    TAKE_BACK,
    U64_MAX,
    MessageReader,
    decode_body,
    encode_body,
    encode_error,
    encode_message,
)

__all__ = ["LinkServer", "DEFAULT_IO_TIMEOUT", "MAX_PRECOPY_ITERATIONS", "MAX_COMMIT_TIMEOUT", "MAX_CONNECTIONS",
           "MAX_ADDRESS"]

#: the most pre-copy passes a PRECOPY request may ask for
MAX_PRECOPY_ITERATIONS = 1000
#: the longest a source may be asked to keep a stopped device for its host's commit (seconds)
MAX_COMMIT_TIMEOUT = 3600.0
#: seconds a peer may take to send a whole message, and to take a reply (``io_timeout``)
DEFAULT_IO_TIMEOUT = 5.0
#: the most connections served at once (the host, a pre-copy's, a few monitors); more are refused
MAX_CONNECTIONS = 16
#: the longest destination address a PRECOPY or MIGRATE may name
MAX_ADDRESS = 4096
#: seconds the listener rests after a failed accept() (out of descriptors: no busy loop)
ACCEPT_BACKOFF = 0.1

log = logging.getLogger(__name__)


def _ints(body: Any, n: int, what: str) -> list[int]:
    if not isinstance(body, list) or len(body) != n or any(type(v) is not int for v in body):
        raise TransportError(f"{what}: expected an array of {n} integers, got {body!r:.100}")
    if any(not 0 <= v <= U64_MAX for v in body):
        raise TransportError(f"{what}: values must be in 0..2**64-1")
    return body


def _access(body: Any, n: int, what: str) -> tuple[list[int], bool]:
    if not isinstance(body, list) or len(body) != n + 1 or type(body[-1]) is not bool:
        raise TransportError(f"{what}: expected {n} integers and a bool, got {body!r:.100}")
    return _ints(body[:-1], n, what), body[-1]


def _map(body: Any, keys: dict[str, type], what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise TransportError(f"{what}: expected a map, got {body!r:.100}")
    for key, tp in keys.items():
        value: Any = body.get(key)
        if type(value) is not tp and not (tp is float and type(value) is int):
            raise TransportError(f"{what}: field {key!r} missing or not {tp.__name__}")
        if tp is int and not 0 <= body[key] <= U64_MAX:
            raise TransportError(f"{what}: field {key!r} out of range")
    return body


def _destination(m: dict[str, Any], what: str) -> str:
    """The ``to`` of a PRECOPY or MIGRATE: bounded, and an address (checked before anything starts)."""
    to: str = m["to"]
    if len(to) > MAX_ADDRESS:
        raise TransportError(f"{what}: the address is {len(to)} characters long (at most {MAX_ADDRESS})")
    parse_address(to)
    return to


class _PrecopyJob:
    """The pre-copy one connection asked for (the server runs one at a time).

    Its thread opens the channel and runs the pre-copy; the loop replies when it ended,
    then keeps the session for the MIGRATE that follows on the same connection.
    """

    def __init__(self, conn: socket.socket, mid: int, to: str, timeout: float) -> None:
        self.conn: socket.socket | None = conn  # None once the connection ended
        self.mid = mid
        self.to = to
        self.timeout = timeout
        self.session: PrecopySession | None = None
        self.error: BaseException | None = None
        self.cancelled = threading.Event()
        self.timed_out = False
        #: set by the thread when it ended (then it wakes the loop)
        self.done = threading.Event()
        self.replied = False
        #: ``CLOCK_MONOTONIC`` by which the pre-copy must end, then by which MIGRATE must come
        self.deadline = time.monotonic() + timeout
        self.thread: threading.Thread | None = None

    def cancel(self) -> None:
        """Stop the pre-copy soon (the thread closes what it opened)."""
        self.cancelled.set()
        session = self.session
        if session is not None:
            session.cancel()

    def close(self) -> None:
        """Give the session up (its channel closes; the device is untouched)."""
        session = self.session
        if session is not None:
            session.close()


@attrs.define
class _CommitWait:
    """A migration whose commit the server awaits: who may commit it, and until when."""

    #: the connection MIGRATE came on (the only one RELEASE and TAKE_BACK are taken from)
    conn: socket.socket
    #: ``CLOCK_MONOTONIC`` past which the device is given up
    deadline: float
    #: the destination
    to: str


class _Conn:
    """What the loop holds for one connection: the message it is reading, and the rest of
    the replies that did not fit the socket (the loop reads no further request from it
    until they went out)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = MessageReader(sock, max_fds=LINK_MAX_FDS)
        self.out = bytearray()
        #: ``CLOCK_MONOTONIC`` since when ``out`` waits (None: nothing waits)
        self.out_since: float | None = None


class LinkServer:
    """Serves a :class:`~pcidev.transport.endpoint.DeviceEndpoint` over a listening
    UNIX socket, one message at a time (several connections may be open: a host
    that reconnects, a monitoring tool; at most :data:`MAX_CONNECTIONS`).

    No connection can hold another up: the loop reads each one incrementally and without
    blocking (:class:`~pcidev.transport.link.protocol.MessageReader`: a peer that trickles a
    message, or sends half of one, only delays itself), and writes replies without blocking
    (what does not fit the socket waits in the connection's own buffer, and the loop reads
    no further request from it until that went out).

    :param endpoint: the device side.
    :param listener: a listening socket (see :func:`pcidev.transport.address.listen`).
    :param io_timeout: seconds a peer may take to send a whole message once its first bytes
        came (an overall deadline per message, not per read), and to take a reply that
        did not fit its socket at once; past either the connection is dropped.
    :param quiesce_timeout_ms: the quiesce budget of a MIGRATE that gives none.
    """

    def __init__(self, endpoint: DeviceEndpoint, listener: socket.socket, *, io_timeout: float = DEFAULT_IO_TIMEOUT,
                 quiesce_timeout_ms: float = 5000.0) -> None:
        self.endpoint = endpoint
        self.quiesce_timeout_ms = quiesce_timeout_ms
        self.listener = listener
        self.io_timeout = io_timeout
        self._stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._conns: dict[socket.socket, _Conn] = {}
        self._sel: selectors.BaseSelector | None = None
        #: why :meth:`serve_forever` returned
        self.exit_reason = ""
        #: the last migration report (source side)
        self.migration: dict[str, Any] | None = None
        self._precopy: _PrecopyJob | None = None
        self._commit: _CommitWait | None = None
        #: per connection, why its pre-copy was given up after its reply (a MIGRATE then is refused)
        self._lapsed: dict[socket.socket, str] = {}
        #: ``CLOCK_MONOTONIC`` until which the listener rests after a failed accept()
        self._accept_rest: float | None = None

    def stop(self) -> None:
        """Make :meth:`serve_forever` return (thread- and signal-safe)."""
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def serve_forever(self) -> str:
        """Serve until :meth:`stop` or until the device migrated away.

        :returns: ``"migrated"`` or ``"stopped"``.
        """
        sel = self._sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop:
                for key, events in sel.select(self._select_timeout()):
                    if self._stop:
                        break
                    if key.data == "accept":
                        try:
                            conn, _ = self.listener.accept()
                        except OSError as exc:  # out of descriptors: rest instead of spinning
                            log.warning("link: accept failed (%s); pausing %g s", exc, ACCEPT_BACKOFF)
                            sel.unregister(self.listener)
                            self._accept_rest = time.monotonic() + ACCEPT_BACKOFF
                            continue
                        conn.setblocking(False)  # (the loop never waits on one connection)
                        if len(self._conns) >= MAX_CONNECTIONS:
                            self._refuse(conn)
                            continue
                        self._conns[conn] = _Conn(conn)
                        sel.register(conn, selectors.EVENT_READ, conn)  # data: the connection itself
                    elif key.data == "wake":
                        try:
                            os.read(self._wake_r, 64)
                        except OSError:
                            pass
                    else:
                        client: socket.socket = key.data
                        if client not in self._conns:
                            continue  # (dropped earlier in this round)
                        if events & selectors.EVENT_WRITE:
                            if not self._flush(client):
                                self._drop(client)
                        elif not self.handle(client):
                            self._drop(client)
                if not self._stop:
                    self._tend_connections()
                    self._tend_precopy()
                    self._tend_commit()
                    if self._accept_rest is not None and time.monotonic() >= self._accept_rest:
                        self._accept_rest = None
                        sel.register(self.listener, selectors.EVENT_READ, "accept")
        finally:
            self._end_precopy()
            sel.close()
            self._sel = None
            last = time.monotonic() + self.io_timeout  # (replies that still wait: a MIGRATE's, in all)
            for state in self._conns.values():
                state.reader.discard()
                if state.out:
                    try:
                        send_all(state.sock, bytes(state.out), deadline=last)
                    except TransportError:
                        pass
                state.sock.close()
            self._conns.clear()
            self.listener.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        if not self.exit_reason:
            self.exit_reason = "stopped"
        return self.exit_reason

    # -- connections ---------------------------------------------------------------------------
    def _drop(self, conn: socket.socket) -> None:
        """Close ``conn`` and forget it (what it held, its pre-copy, its commit)."""
        state = self._conns.pop(conn, None)
        if state is None:
            return
        state.reader.discard()
        if self._sel is not None:
            try:
                self._sel.unregister(conn)
            except (KeyError, ValueError):
                pass
        self._connection_ended(conn)
        conn.close()

    def _reply(self, conn: socket.socket, kind: int, flags: int, mid: int, body: bytes) -> int:
        """Send a reply on ``conn`` without blocking; what does not fit waits in its buffer
        (and the loop reads no further request from it until it went out, or drops it
        ``io_timeout`` later).

        :returns: the bytes of this reply that went out at once.
        :raises TransportError: the connection broke (or is not served any more).
        """
        state = self._conns.get(conn)
        if state is None:
            raise TransportError("the link connection was closed")
        data = encode_message(kind, flags, mid, body)
        state.out += data
        if not self._flush(conn):
            raise TransportError("send failed: the peer closed the connection")
        return len(data) - min(len(state.out), len(data))  # (this reply is the buffer's tail)

    def _flush(self, conn: socket.socket) -> bool:
        """Write what waits for ``conn`` as far as its socket takes it, without blocking.

        :returns: False when the connection broke.
        """
        state = self._conns.get(conn)
        if state is None:
            return False
        try:
            while state.out:
                n = conn.send(state.out)
                del state.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return False
        waiting = bool(state.out)
        if not waiting:
            state.out_since = None
        elif state.out_since is None:
            state.out_since = time.monotonic()
        if self._sel is not None:
            try:
                self._sel.modify(conn, selectors.EVENT_WRITE if waiting else selectors.EVENT_READ, conn)
            except (KeyError, ValueError):
                pass
        return True

    def _tend_connections(self) -> None:
        """Drop the connections past a deadline: a message begun more than ``io_timeout``
        ago, or a reply that waited that long for its peer to take it."""
        now = time.monotonic()
        for conn, state in list(self._conns.items()):
            started = state.reader.started
            if started is not None and now >= started + self.io_timeout:
                exc = TransportError(f"the peer did not finish its message in time (overall deadline of "
                                     f"{self.io_timeout:g} s)")
                log.warning("link: dropping a connection: %s", exc)
                self._last_word(conn, exc)
                self._drop(conn)
            elif state.out_since is not None and now >= state.out_since + self.io_timeout:
                log.warning("link: dropping a connection that did not take its reply within %g s", self.io_timeout)
                self._drop(conn)

    @staticmethod
    def _last_word(conn: socket.socket, exc: PcidevError) -> None:
        """An error reply (id 0) before the connection is dropped, if it fits at once; then
        what the peer sent and the server did not read is discarded (a bounded amount: a
        close with unread data would reset the connection before the peer reads the reply)."""
        try:
            conn.send(encode_message(0, FLAG_REPLY | FLAG_ERROR, 0, encode_error(exc)), socket.MSG_DONTWAIT)
            for _ in range(16):
                if not conn.recv(1 << 16, socket.MSG_DONTWAIT):
                    break
        except OSError:
            pass

    def _refuse(self, conn: socket.socket) -> None:
        self._last_word(conn, TransportError(f"too many link connections (at most {MAX_CONNECTIONS}); "
                                             "try again later"))
        conn.close()

    # -- pre-copy ------------------------------------------------------------------------------
    def _select_timeout(self) -> float | None:
        deadlines = [w.deadline for w in (self._precopy, self._commit) if w is not None]
        for state in self._conns.values():
            for since in (state.reader.started, state.out_since):
                if since is not None:
                    deadlines.append(since + self.io_timeout)
        if self._accept_rest is not None:
            deadlines.append(self._accept_rest)
        if not deadlines:
            return None
        return max(min(deadlines) - time.monotonic(), 0.0) + 0.01

    # -- the commit of a deferred migration ----------------------------------------------------
    def _tend_commit(self) -> None:
        wait = self._commit
        if wait is not None and time.monotonic() >= wait.deadline:
            self._give_up(f"no RELEASE or TAKE_BACK within the commit timeout of the migration to {wait.to}")

    def _give_up(self, why: str) -> None:
        """No word from the host: the destination may run the device, so it never runs
        here again (the safe side: at worst it runs nowhere)."""
        self._commit = None
        if self.endpoint.state == AWAITING_COMMIT:
            log.warning("link: %s; the device is given up (the destination may run it)", why)
            self.endpoint.release()
        self.exit_reason = "migrated"
        self.stop()

    def _committing(self, conn: socket.socket | None, what: str) -> _CommitWait:
        wait = self._commit
        if wait is None:
            raise MigrationError(f"{what}: no migration awaits its commit here")
        if wait.conn is not conn:
            raise MigrationError(f"{what}: the migration to {wait.to} is committed on the connection of its "
                                 "MIGRATE only")
        return wait

    def _start_precopy(self, conn: socket.socket, mid: int, body: bytes, fds: list[int]) -> None:
        """Check a PRECOPY request and start its thread (the reply comes from ``_tend_precopy``).

        :raises PcidevError: a malformed request, or a pre-copy already running.
        """
        args = decode_body(body, "PRECOPY")
        if fds:
            raise TransportError(f"PRECOPY carries no file descriptors, got {len(fds)}")
        m = _map(args, {"to": str, "timeout": float, "max_downtime_ms": float, "max_iterations": int}, "PRECOPY")
        _destination(m, "PRECOPY")
        timeout, budget, limit = float(m["timeout"]), float(m["max_downtime_ms"]), m["max_iterations"]
        if not 0 < timeout <= 3600:
            raise TransportError("PRECOPY: timeout must be in (0, 3600] seconds")
        if not 0 < budget <= 60_000:
            raise TransportError("PRECOPY: max_downtime_ms must be in (0, 60000]")
        if not 0 <= limit <= MAX_PRECOPY_ITERATIONS:
            raise TransportError(f"PRECOPY: max_iterations must be in 0..{MAX_PRECOPY_ITERATIONS}")
        busy = self._precopy
        if busy is not None:
            raise MigrationError(f"a pre-copy to {busy.to!r:.200} is already running; one at a time "
                                 "(the device keeps running here)")
        if self.endpoint.state != RUNNING:  # a typed refusal before a thread starts
            raise MigrationError(f"the device endpoint is {self.endpoint.state}, not running")
        job = _PrecopyJob(conn, mid, m["to"], timeout)

        def run() -> None:
            try:
                session = self.endpoint.open_precopy(job.to, timeout=timeout, max_downtime_ms=budget,
                                                     max_iterations=limit, cancelled=job.cancelled)
                job.session = session  # first, then the check: cancel() sees one or the other
                if job.cancelled.is_set():
                    session.cancel()
                session.run()
            except BaseException as exc:
                job.error = exc
                job.close()
            finally:
                job.done.set()
                try:
                    os.write(self._wake_w, b"p")
                except OSError:
                    pass

        job.thread = threading.Thread(target=run, name="pcidev-link-precopy", daemon=True)
        try:
            job.thread.start()
        except RuntimeError as exc:  # (can't start new thread): nothing published, nothing to undo
            raise MigrationError(f"the pre-copy cannot start ({exc}); the device keeps running here") from exc
        self._lapsed.pop(conn, None)
        self._precopy = job

    def _tend_precopy(self) -> None:
        """The loop's part of the pre-copy: cancel it past its time, reply when it ended,
        and give an unused session up when no MIGRATE came in time."""
        job = self._precopy
        if job is None:
            return
        now = time.monotonic()
        if not job.done.is_set():
            if now >= job.deadline and not job.cancelled.is_set():
                job.timed_out = True
                job.cancel()
            return
        if job.replied:
            if now >= job.deadline:
                log.warning("link: no MIGRATE within %g s of the pre-copy to %.200r; giving it up", job.timeout,
                            job.to)
                self._precopy = None
                if job.conn is not None:
                    self._lapsed[job.conn] = f"no MIGRATE came within {job.timeout:g} s of its reply"
                job.close()
            return
        job.replied = True
        if job.error is None and (job.cancelled.is_set() or job.timed_out):  # cancelled as it ended
            job.error = MigrationError(f"the pre-copy to {job.to!r:.200} was cancelled as it ended; "
                                       "the device keeps running here")
        if job.conn is None or job.error is not None:
            self._precopy = None
            job.close()
        if job.conn is None:
            return
        if job.error is None and job.session is not None:
            started, ended = job.session.started_at, job.session.ended_at
            reply = encode_body({**job.session.report.as_dict(),
                                 "seconds": (ended - started) if started is not None and ended is not None else None})
            rflags = FLAG_REPLY
            job.deadline = now + job.timeout  # MIGRATE must follow within as long again
        else:
            err = job.error
            if job.timed_out:
                why = f" ({err})" if isinstance(err, PcidevError) and "cannot reach" in str(err) else ""
                err = MigrationError(f"the pre-copy to {job.to!r:.200} did not end within {job.timeout:g} s{why}; "
                                     "the device keeps running here")
            elif not isinstance(err, PcidevError):
                err = MigrationError(f"pre-copy failed ({type(err).__name__}: {err}); the device keeps running here")
            reply, rflags = encode_error(err), FLAG_REPLY | FLAG_ERROR
        try:
            self._reply(job.conn, PRECOPY, rflags, job.mid, reply)
        except TransportError:
            pass  # the connection's end is seen by the loop, which then gives the session up

    def _connection_ended(self, conn: socket.socket) -> None:
        self._lapsed.pop(conn, None)
        wait = self._commit
        if wait is not None and wait.conn is conn:
            self._give_up(f"the host's connection ended while the migration to {wait.to} awaited its commit")
        job = self._precopy
        if job is None or job.conn is not conn:
            return
        job.conn = None
        if job.done.is_set():
            self._precopy = None
            job.close()
        else:
            job.cancel()  # the thread ends soon; _tend_precopy() then drops the job

    def _end_precopy(self) -> None:
        job, self._precopy = self._precopy, None
        if job is None:
            return
        job.cancel()
        if job.thread is not None:  # cancelled, it ends within a connect attempt or a send
            job.thread.join(self.io_timeout + CONNECT_SLICE + 1.0)
        job.close()

    def _take_precopy(self, conn: socket.socket | None) -> PrecopySession | None:
        """The pre-copy session a MIGRATE on ``conn`` finishes (None: a migration in one go).

        :raises MigrationError: the pre-copy belongs to another connection or still runs.
        """
        job = self._precopy
        if job is None:
            lapsed = self._lapsed.pop(conn, None) if conn is not None else None
            if lapsed is not None:  # the host thinks its pre-copy is open: no silent migration in one go
                raise MigrationError(f"the pre-copy on this connection was given up ({lapsed}); "
                                     "the device keeps running here")
            return None
        if job.conn is not conn:
            raise MigrationError(f"a pre-copy to {job.to!r:.200} is open on another connection; "
                                 "the device keeps running here")
        if not job.replied:
            raise MigrationError("the pre-copy is still running (wait for its reply); "
                                 "the device keeps running here")
        self._precopy = None
        return job.session

    def handle(self, conn: socket.socket) -> bool:
        """Read what ``conn`` holds of its next message, without blocking; once the message
        is whole, execute it and reply.

        :returns: False when the connection must be closed (EOF, broken framing).
        """
        state = self._conns.get(conn)
        if state is None:
            return False
        try:
            msg = state.reader.read()
        except TransportError as exc:
            log.warning("link: dropping a connection: %s", exc)
            self._last_word(conn, exc)
            return False
        if msg is False:
            return False
        if msg is None or msg is True:
            return True
        kind, flags, mid, body, fds = msg
        try:
            if flags:
                raise TransportError(f"unexpected flags {flags:#x} on a request")
            if kind == PRECOPY:
                self._start_precopy(conn, mid, body, fds)
                return True  # the reply comes when it ends (_tend_precopy)
            if kind == RESUME:
                return self._resume(conn, mid, body, fds)
            result = self.dispatch(kind, body, fds, conn=conn)
            fds = []
            reply, rflags = encode_body(result), FLAG_REPLY
        except PcidevError as exc:
            reply, rflags = encode_error(exc), FLAG_REPLY | FLAG_ERROR
        except Exception as exc:  # a bug in a device or here: report it, keep serving
            log.exception("link: %s failed", NAMES.get(kind, kind))
            reply, rflags = encode_error(TransportError(f"internal error: {type(exc).__name__}: {exc}")), \
                FLAG_REPLY | FLAG_ERROR
        finally:
            close_fds(fds)
        try:
            self._reply(conn, kind, rflags, mid, reply)
        except TransportError:
            self._after_reply()  # (a migration the reply of which was lost still happened)
            return False
        self._after_reply()
        return True

    def _after_reply(self) -> None:
        """Stop serving once the device is not this process's any more."""
        state = self.endpoint.state
        if state in (MIGRATED, ABANDONED) and not self._stop:
            self.exit_reason = "migrated" if state == MIGRATED else "abandoned"
            self.stop()

    def _resume(self, conn: socket.socket, mid: int, body: bytes, fds: list[int]) -> bool:
        """RESUME: the reply goes out first, and the device runs only once it went out
        (a reply that cannot be sent leaves the device abandoned: it never runs here)."""
        tried: list[bool] = []

        def announce(resumed_at: float) -> None:
            # (the device runs once a byte of the reply went out: a peer whose socket holds
            # not one byte more proves, by no reply at all, that it never ran here)
            tried.append(True)
            state = self._conns.get(conn)
            if state is not None and state.out:
                raise TransportError("RESUME's reply cannot go out: earlier replies still wait")
            if self._reply(conn, RESUME, FLAG_REPLY, mid, encode_body({"resumed_at": resumed_at})) == 0:
                if state is not None:
                    state.out.clear()  # (never sent later: the device does not run)
                raise TransportError("RESUME's reply did not fit the connection (its peer reads nothing)")

        try:
            decode_body(body, "RESUME")
            if fds:
                raise TransportError(f"RESUME carries no file descriptors, got {len(fds)}")
            self.endpoint.resume_after_attach(announce)
            return True
        except PcidevError as exc:
            if tried:  # the reply did not go out: the endpoint gave the device up
                log.warning("link: RESUME's reply could not be sent (%s); the device never runs here", exc)
                self._after_reply()
                return False
            reply = encode_error(exc)
        try:  # (handle() closes ``fds``)
            self._reply(conn, RESUME, FLAG_REPLY | FLAG_ERROR, mid, reply)
        except TransportError:
            return False
        return True

    def dispatch(self, kind: int, body: bytes, fds: list[int], *, conn: socket.socket | None = None) -> Any:
        """Execute one request; takes ownership of ``fds`` (closes what it does not keep).

        :param conn: the connection it came on (a MIGRATE there finishes its pre-copy).
        """
        ep = self.endpoint
        what = NAMES.get(kind)
        if what is None:
            raise TransportError(f"unknown link message type {kind}")
        args = decode_body(body, what)
        if kind not in (DMA_MAP, SET_IRQS) and fds:
            raise TransportError(f"{what} carries no file descriptors, got {len(fds)}")
        if kind == BAR_READ:
            (bar, off, size), decode = _access(args, 3, what)
            return [ep.bar_read(bar, off, size, decode), ep.intx_level]
        if kind == BAR_WRITE:
            (bar, off, size, value), decode = _access(args, 4, what)
            ep.bar_write(bar, off, size, value, decode)
            return [ep.intx_level]
        if kind == CONFIG_READ:
            off, size = _ints(args, 2, what)
            return [ep.config_read(off, size), ep.intx_level]
        if kind == CONFIG_WRITE:
            off, size, value = _ints(args, 3, what)
            ep.config_write(off, size, value)
            return [ep.intx_level]
        if kind == ROM_READ:
            off, size = _ints(args, 2, what)
            return [ep.rom_read(off, size)]
        if kind == HELLO:
            return ep.info()
        if kind == STATUS:
            return {"intx": ep.intx_level, "failed": ep.device.failed is not None, "state": ep.state}
        if kind == DMA_MAP:
            m = _map(args, {"gpa": int, "size": int, "fd_offset": int, "writable": bool, "name": str}, what)
            if len(fds) != 1:
                raise TransportError(f"DMA_MAP needs exactly one fd, got {len(fds)}")
            ep.dma_map(m["gpa"], m["size"], fds[0], m["fd_offset"], writable=m["writable"], name=m["name"][:64])
            close_fds(fds)  # the guest memory keeps its own duplicate
            return {}
        if kind == DMA_UNMAP:
            m = _map(args, {"gpa": int, "size": int}, what)
            ep.dma_unmap(m["gpa"], m["size"])
            return {}
        if kind == SET_IRQS:
            m = _map(args, {"vectors": list, "intx": bool}, what)
            vectors = m["vectors"]
            if any(type(v) is not int for v in vectors) or len(set(vectors)) != len(vectors):
                raise TransportError("SET_IRQS: vectors must be distinct integers")
            if len(fds) != len(vectors) + m["intx"]:
                raise TransportError(f"SET_IRQS: {len(vectors) + m['intx']} eventfds announced, {len(fds)} sent")
            mapping = dict(zip(vectors, fds, strict=False))  # the INTx eventfd, if any, is last
            intx_fd = fds[-1] if m["intx"] else None
            taken = list(fds)
            fds.clear()  # set_irqs owns them now (closes them on error)
            del taken
            ep.set_irqs(mapping, intx_fd)
            return {}
        if kind == MIGRATE:
            m = _map(args, {"to": str, "timeout": float}, what)
            _destination(m, what)
            timeout = float(m["timeout"])
            if not 0 < timeout <= 3600:
                raise TransportError("MIGRATE: timeout must be in (0, 3600] seconds")
            qt = m.get("quiesce_timeout_ms", self.quiesce_timeout_ms)
            if type(qt) not in (int, float) or not 0 < qt <= 3_600_000:
                raise TransportError("MIGRATE: quiesce_timeout_ms must be in (0, 3600000]")
            ct = m.get("commit_timeout")
            if ct is not None and (type(ct) not in (int, float) or not 0 < ct <= MAX_COMMIT_TIMEOUT):
                raise TransportError(f"MIGRATE: commit_timeout must be in (0, {MAX_COMMIT_TIMEOUT:g}] seconds")
            session = self._take_precopy(conn)
            result = ep.migrate_to(m["to"], timeout=timeout, session=session, quiesce_timeout=qt / 1000,
                                   await_commit=ct is not None and conn is not None).as_dict()
            result["awaiting_commit"] = ep.state == AWAITING_COMMIT
            if ep.state == AWAITING_COMMIT:
                assert conn is not None and ct is not None
                self._commit = _CommitWait(conn, time.monotonic() + float(ct), m["to"])
            self.migration = result
            return result
        if kind == RELEASE:
            self._committing(conn, what)
            self._commit = None
            ep.release()
            return {}
        if kind == TAKE_BACK:
            wait = self._committing(conn, what)
            reason = args.get("reason") if isinstance(args, dict) else None
            self._commit = None
            resumed_at = ep.take_back()
            self.migration = None
            log.warning("link: the migration to %s is taken back (%s); the device runs here again", wait.to,
                        str(reason)[:200] if reason else "no reason given")
            return {"resumed_at": resumed_at}
        if kind == ABANDON:
            ep.abandon()
            return {}
        if kind == RESUME:
            raise TransportError("RESUME is answered by the server's loop (handle()), not by dispatch()")
        if kind == PRECOPY:
            raise TransportError("PRECOPY is answered by the server's loop (handle()), not by dispatch()")
        raise TransportError(f"unhandled link message {what}")  # pragma: no cover
