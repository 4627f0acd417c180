"""The host side of the device link: :class:`RemoteDevice`, a proxy for a device
served by a :class:`~pcidev.transport.link.server.LinkServer` in another process,
and :class:`LinkClient`, one request/reply connection.

:class:`RemoteDevice` has the surface the software host uses
(``config_read``/``config_write``/``bar_read``/``bar_write``/``rom_read``/``attach``),
so ``Machine.plug_remote`` plugs it like a local device. It shares the host's
guest RAM (the memfd passed with ``SCM_RIGHTS``), creates one eventfd per
interrupt vector and delivers what they signal to the host's interrupt sink
(vector *v* as ``sink.msi(v, MSI_ROUTE_ADDRESS, v)``, see
:mod:`pcidev.transport.link.protocol`), and can follow the device to another
process (:meth:`RemoteDevice.migrate`): first a pre-copy, on a connection of its own, while
the host's accesses go on (when the device's process knows PRECOPY), then the
migration itself, holding the host's accesses meanwhile.

A destination that waits for its host before it runs (TCP: no descriptors travel) is
committed: the source keeps its stopped device until this proxy tells it the destination
runs (RELEASE) or never did (TAKE_BACK: the source resumes it and the accesses go on
there), see :mod:`pcidev.transport.link.protocol`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pcidev.dma import GuestMemory
from pcidev.errors import ConnectionLostError, MigrationError, PcidevError, TransportError
from pcidev.irq import InterruptSink
from pcidev.transport.address import connect
from pcidev.transport.irq_eventfds import InterruptEventfds
from pcidev.transport.link.protocol import (
    ABANDON,
    BAR_READ,
    BAR_WRITE,
    CONFIG_READ,
    CONFIG_WRITE,
    DMA_MAP,
    FLAG_ERROR,
    FLAG_REPLY,
    HELLO,
    LINK_MAX_FDS,
    MIGRATE,
    MSI_ROUTE_ADDRESS,
    NAMES,
    PRECOPY,
    RELEASE,
    RESUME,
    ROM_READ,
    SET_IRQS,
    STATUS,
    TAKE_BACK,
    U64_MAX,
    decode_body,
    encode_body,
    error_from_reply,
    read_message,
    send_message,
)

__all__ = ["LinkClient", "RemoteDevice", "UnansweredError"]


class UnansweredError(TransportError):
    """A request that provably had no effect beyond its peer's reading it: it could not be
    sent whole, or the connection ended cleanly before one byte of the reply (a peer that
    replies before it acts on a request, as a link server's RESUME, then never acted)."""


def _pcidev_error(exc: BaseException) -> PcidevError:
    return exc if isinstance(exc, PcidevError) else TransportError(f"{type(exc).__name__}: {exc}")


class _FollowError(Exception):
    """Following a migrated device to its destination failed.

    :param error: what failed.
    :param ran: False when the destination provably never ran the device; None when it may have.
    :param client: the connection to the destination, if one was made (closed by the catcher).
    """

    def __init__(self, error: PcidevError, *, ran: bool | None, client: LinkClient | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.ran = ran
        self.client = client


class LinkClient:
    """The host side of one link connection: request/reply, one at a time.

    :param sock: a connected UNIX stream socket.
    :param io_timeout: seconds a request may take, its send and its whole reply (an overall
        deadline: a server that reads or replies a byte at a time cannot stretch it; MIGRATE
        passes its own).
    """

    def __init__(self, sock: socket.socket, *, io_timeout: float = 10.0) -> None:
        self.sock = sock
        self.io_timeout = io_timeout
        self._next = 1
        self._lock = threading.Lock()
        self.closed = False
        #: a request failed in transit (not with an error reply): the connection is unusable
        self.broken = False

    def request(self, kind: int, body: Any = None, fds: Sequence[int] = (), *,
                timeout: float | None = None) -> Any:
        """Send a request and return the decoded reply body.

        :raises PcidevError: the error the device replied with (its own type).
        :raises UnansweredError: the request was not sent whole, or the connection ended
            before any byte of the reply.
        :raises TransportError: the connection broke or the reply is malformed.
        """
        with self._lock:
            if self.closed:
                raise TransportError("the link connection is closed")
            mid = self._next
            self._next = (self._next % 0xFFFF_FFFF) + 1
            wait = self.io_timeout if timeout is None else timeout
            deadline = time.monotonic() + wait  # (the request and its reply, in all)
            self.sock.settimeout(wait)
            try:
                send_message(self.sock, kind, 0, mid, encode_body({} if body is None else body), fds,
                             deadline=deadline)
            except TransportError as exc:
                self.broken = True
                raise UnansweredError(f"{NAMES.get(kind, kind)} could not be sent: {exc}") from exc
            try:
                msg = read_message(self.sock, max_fds=0, eof_ok=True, deadline=deadline)
            except TransportError:
                self.broken = True
                raise
            if msg is None:
                self.broken = True
                raise UnansweredError(f"the link connection ended before the reply to {NAMES.get(kind, kind)}")
            rkind, rflags, rid, rbody, _ = msg
            if rflags & FLAG_ERROR and rid == 0:
                raise error_from_reply(rbody)
            if rkind != kind or rid != mid or not rflags & FLAG_REPLY:
                raise TransportError(f"link: reply {NAMES.get(rkind, rkind)}#{rid} does not match "
                                     f"request {NAMES.get(kind, kind)}#{mid}")
            if rflags & FLAG_ERROR:
                raise error_from_reply(rbody)
            return decode_body(rbody, f"{NAMES.get(kind, kind)} reply")

    def close(self) -> None:
        """Close the connection (never ``shutdown``: the socket may be shared)."""
        self.closed = True
        self.sock.close()


class RemoteDevice:
    """Host-side proxy for a device served by a
    :class:`~pcidev.transport.link.server.LinkServer` in another process.

    It has the methods the software host calls on a device, so
    :meth:`pcidev.host.Machine.plug_remote` (or ``Machine.plug(RemoteDevice(...))``)
    drives it like a local one. All accesses go through one lock: while
    :meth:`migrate` or :meth:`retarget` runs, accesses from other threads wait and
    then continue on the new process.

    :param address: the link address (``unix:PATH``).
    :param timeout: seconds to wait for the server to accept.
    :param io_timeout: seconds to wait for each reply.
    """

    realized = True

    def __init__(self, address: str, *, timeout: float = 5.0, io_timeout: float = 10.0) -> None:
        self.address = address
        self.io_timeout = io_timeout
        self._client = LinkClient(connect(address, timeout=timeout), io_timeout=io_timeout)
        try:
            self.info: dict[str, Any] = self._client.request(HELLO)
        except BaseException:
            self._client.close()
            raise
        self._check_info(self.info)
        self.TYPE_NAME = self.info["device_type"]
        self.name = self.info["name"]
        self.vendor_id = self.info["vendor_id"]
        self.device_id = self.info["device_id"]
        self._access = threading.RLock()
        self._memory: GuestMemory | None = None
        self._sink: InterruptSink | None = None
        self._intx = False
        self._irqs: InterruptEventfds | None = None
        self._closing = False
        #: migrations this proxy followed, oldest first (the reports)
        self.migrations: list[dict[str, Any]] = []

    @staticmethod
    def _check_info(info: Any) -> None:
        need = {"device_type": str, "name": str, "vendor_id": int, "device_id": int, "msix_vectors": int,
                "msi_vectors": int, "interrupt_pin": int, "state": str, "boot_id": str}
        if not isinstance(info, dict) or any(type(info.get(k)) is not t for k, t in need.items()):
            raise TransportError(f"malformed HELLO reply {info!r:.200}")
        if not 0 <= info["msix_vectors"] <= 2048 or not 0 <= info["msi_vectors"] <= 32:
            raise TransportError("HELLO reply announces impossible vector counts")

    def __repr__(self) -> str:
        return f"<RemoteDevice {self.TYPE_NAME} {self.name!r} {self.vendor_id:04x}:{self.device_id:04x} " \
               f"at {self.address} (pid {self.info.get('pid')})>"

    # -- the device surface the host uses ---------------------------------------------
    def realize(self) -> None:
        """Nothing to do: the device was realized in its own process."""

    def _req(self, kind: int, body: Any) -> Any:
        with self._access:
            return self._client.request(kind, body)

    def _note_intx(self, level: Any) -> None:
        level = bool(level)
        if level != self._intx:
            self._intx = level
            if self._sink is not None:
                self._sink.intx(level)

    def config_read(self, offset: int, size: int) -> int:
        """A configuration read in the device's process."""
        value: int
        value, intx = self._req(CONFIG_READ, [offset, size])
        self._note_intx(intx)
        return value

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A configuration write in the device's process."""
        (intx,) = self._req(CONFIG_WRITE, [offset, size, value])
        self._note_intx(intx)

    def bar_read(self, index: int, offset: int, size: int, *, check_decode: bool = True) -> int:
        """A BAR read in the device's process."""
        value: int
        value, intx = self._req(BAR_READ, [index, offset, size, check_decode])
        self._note_intx(intx)
        return value

    def bar_write(self, index: int, offset: int, size: int, value: int, *, check_decode: bool = True) -> None:
        """A BAR write in the device's process."""
        (intx,) = self._req(BAR_WRITE, [index, offset, size, value & U64_MAX, check_decode])
        self._note_intx(intx)

    def rom_read(self, offset: int, size: int) -> int:
        """An expansion ROM read in the device's process."""
        value: int = self._req(ROM_READ, [offset, size])[0]
        return value

    def status(self) -> dict[str, Any]:
        """``{intx, failed, state}`` of the device."""
        st: dict[str, Any] = self._req(STATUS, {})
        self._note_intx(st.get("intx"))
        return st

    # -- attach: memory and interrupts ----------------------------------------------------
    def attach(self, memory: GuestMemory | None, sink: InterruptSink | None) -> None:
        """Share ``memory`` with the device (its regions' fds) and route the device's
        interrupts to ``sink`` through eventfds (one per MSI-X/MSI vector, and INTx)."""
        with self._access:
            self._memory = memory
            self._sink = sink
            if self._irqs is None:
                self._irqs = InterruptEventfds(max(self.info["msix_vectors"], self.info["msi_vectors"]),
                                               bool(self.info["interrupt_pin"]), name=f"link-irq[{self.name}]")
            self._attach_on(self._client)
        if sink is not None:
            self._irqs.start(self._deliver_vector, self._deliver_intx)

    def _attach_on(self, client: LinkClient) -> None:
        if self._memory is not None:
            for region, fd in self._memory.fds():
                client.request(DMA_MAP, {"gpa": region.gpa, "size": region.size, "fd_offset": region.fd_offset,
                                         "writable": region.writable, "name": region.name[:64]}, [fd])
        if self._irqs is None:
            return
        vector_fds, intx_fd = self._irqs.vector_fds, self._irqs.intx_fd
        vectors = list(range(len(vector_fds)))
        batch = LINK_MAX_FDS - 1
        for start in range(0, max(len(vectors), 1), batch):
            part = vectors[start:start + batch]
            last = start + batch >= len(vectors)
            intx_fds = [intx_fd] if last and intx_fd is not None else []
            with_intx = bool(intx_fds)
            fds = [vector_fds[v] for v in part] + intx_fds
            if fds:
                client.request(SET_IRQS, {"vectors": part, "intx": with_intx}, fds)

    def route(self, vector: int) -> tuple[int, int]:
        """The ``(address, data)`` delivered for ``vector`` (see the module docstring)."""
        return MSI_ROUTE_ADDRESS, vector

    def _deliver_vector(self, vector: int, count: int) -> None:
        sink = self._sink
        if sink is not None:
            address, data = self.route(vector)
            for _ in range(count):
                sink.msi(vector, address, data)

    def _deliver_intx(self) -> None:
        if self._sink is not None:
            try:
                self.status()  # the line's level comes with the device's status
            except PcidevError:
                pass

    # -- following the device -------------------------------------------------------------------
    def _follow(self, link: str, timeout: float) -> tuple[LinkClient, dict[str, Any], float | None]:
        """Connect to the device at ``link``, check it, and attach and resume it if it
        awaits attachment; the caller switches to the returned connection.

        :raises _FollowError: it failed; ``ran`` says whether the destination may run it.
        """
        new: LinkClient | None = None
        try:
            new = LinkClient(connect(link, timeout=timeout), io_timeout=self.io_timeout)
            info = new.request(HELLO)
            self._check_info(info)
            if info["device_type"] != self.TYPE_NAME:
                raise TransportError(f"{link} serves a {info['device_type']!r}, not a {self.TYPE_NAME!r}")
            resumed_at = info.get("resumed_at")
            if info["state"] == "running":
                return new, info, resumed_at if isinstance(resumed_at, (int, float)) else None
            if info["state"] != "awaiting-attach":
                raise TransportError(f"the device at {link} is {info['state']}")
            self._attach_on(new)
        except Exception as exc:  # nothing here makes it run: only RESUME does
            raise _FollowError(_pcidev_error(exc), ran=False, client=new) from exc
        try:
            reply = new.request(RESUME)
        except UnansweredError as exc:
            # a server that replies before it resumes (HELLO ``commit``) never ran it
            raise _FollowError(exc, ran=False if info.get("commit") is True else None, client=new) from exc
        except TransportError as exc:  # no reply in time, or half of one: it may have run it
            raise _FollowError(exc, ran=None, client=new) from exc
        except PcidevError as exc:  # it refused: it did not resume
            raise _FollowError(exc, ran=False, client=new) from exc
        except Exception as exc:
            raise _FollowError(_pcidev_error(exc), ran=None, client=new) from exc
        resumed = reply.get("resumed_at") if isinstance(reply, dict) else None
        return new, info, resumed if isinstance(resumed, (int, float)) else None

    def _switch_to(self, new: LinkClient, link: str, info: dict[str, Any]) -> None:
        old, self._client = self._client, new
        old.close()
        self.address = link
        self.info = info

    def retarget(self, address: str, *, timeout: float = 5.0) -> None:
        """Drive the device at ``address`` from now on (after it was moved by other
        means). Accesses wait meanwhile. A destination that awaits attachment gets
        the memory regions and eventfds again, then a RESUME.

        :raises TransportError: nobody serves a device of the same type there.
        """
        with self._access:
            try:
                new, info, _ = self._follow(address, timeout)
            except _FollowError as exc:
                if exc.client is not None:
                    exc.client.close()
                raise exc.error from None
            self._switch_to(new, address, info)

    def migrate(self, to: str, *, timeout: float = 30.0, link: str | None = None, precopy: bool = True,
                max_downtime_ms: float = 10.0, max_iterations: int = 30,
                after_precopy: Callable[[dict[str, Any]], object] | None = None,
                quiesce_timeout_ms: float | None = None,
                before_follow: Callable[[dict[str, Any]], object] | None = None) -> dict[str, Any]:
        """Ask the device's process to migrate it to the destination listening at
        ``to``, then follow it there.

        In two phases when the device's process offers it (its HELLO says ``precopy``)
        and ``precopy`` is true: a PRECOPY on a second connection copies the device's large
        state (a ``mem`` namespace or a RAM BAR over TCP) while this host's accesses go on,
        until what is left fits ``max_downtime_ms`` or after ``max_iterations`` passes;
        then MIGRATE on that connection stops the device and sends the rest. Accesses
        from other threads wait only during MIGRATE and continue on the destination (or
        on the source if the migration failed).

        A destination that runs the device only once this host re-attached it (TCP) is
        committed: the source keeps its stopped device until the destination answered
        RESUME (then RELEASE: the source exits), or takes it back when the destination
        provably never ran it (it died, refused, or could not be attached: TAKE_BACK, and
        the accesses go on at the source with nothing lost, a :class:`~pcidev.errors.MigrationError`).

        :param to: the destination's migration address.
        :param timeout: seconds for the pre-copy, and again for the migration.
        :param link: where the destination serves the device, if it does not say so itself.
        :param precopy: copy before the stop where the device's process can (False: one MIGRATE).
        :param max_downtime_ms: the downtime budget the pre-copy aims for.
        :param max_iterations: the most pre-copy passes (0: everything at the stop).
        :param after_precopy: called with the PRECOPY reply (the pre-copy's figures) once it
            ended, before the accesses are held (not called without a pre-copy phase).
        :param quiesce_timeout_ms: the quiesce budget (None: the device process's
            ``--quiesce-timeout-ms``); past it the migration fails and the device runs on.
        :param before_follow: called with the MIGRATE reply (the source's report) before
            this proxy follows the device to its destination (accesses held; for tests and
            tracing).
        :returns: the report: ``state_size``, ``fds``, ``downtime`` (stop on the source
            to running on the destination, seconds; None if the clocks are not
            comparable), ``downtime_upper_bound``, ``host_pause`` (how long accesses
            were held here), ``precopy`` (iterations, bytes per iteration, ..., or None),
            ``precopy_seconds`` (the first phase, while accesses went on),
            ``awaiting_commit`` (the source waited for this host's word), ``released``
            (it took the RELEASE), ``held_at`` (``CLOCK_MONOTONIC`` when the accesses were
            held), ``phases`` (the stop's steps, :class:`~pcidev.migration.channel.MigrationResult`), ...
        :raises MigrationBlockedError: blockers (nothing was stopped).
        :raises MigrationError: the migration (or its pre-copy) failed; the source device
            runs on (again).
        :raises ConnectionLostError: the destination may have run the device and failed
            (no answer to RESUME in time): the source gave it up, neither side is followed.
        :raises TransportError: the source process went away, or the destination of a
            migration the source did not wait for could not be followed (the device is lost).
        """
        if not precopy or not self.info.get("precopy"):
            with self._access:
                return self._migrate_on(self._client, to, timeout, link, time.monotonic(), None,
                                        quiesce_timeout_ms, before_follow)
        t0 = time.monotonic()
        side = LinkClient(connect(self.address, timeout=self.io_timeout), io_timeout=self.io_timeout)
        try:
            reply = side.request(PRECOPY, {"to": to, "timeout": float(timeout),
                                           "max_downtime_ms": float(max_downtime_ms),
                                           "max_iterations": int(max_iterations)}, timeout=timeout + 10.0)
            precopy_seconds = time.monotonic() - t0
            if not isinstance(reply, dict):
                raise TransportError(f"malformed PRECOPY reply {reply!r:.200}")
            if after_precopy is not None:
                after_precopy(dict(reply))
            with self._access:
                return self._migrate_on(side, to, timeout, link, time.monotonic(), precopy_seconds,
                                        quiesce_timeout_ms, before_follow)
        finally:
            side.close()

    def commit_timeout(self, timeout: float) -> float:
        """How long a source is asked to keep its stopped device for this host's word: longer
        than following the device may take (connect, HELLO, attach, RESUME)."""
        return min(timeout + 10 * self.io_timeout + 5.0, 3600.0)

    def _migrate_on(self, client: LinkClient, to: str, timeout: float, link: str | None, t0: float,
                    precopy_seconds: float | None, quiesce_timeout_ms: float | None,
                    before_follow: Callable[[dict[str, Any]], object] | None) -> dict[str, Any]:
        """MIGRATE on ``client`` (accesses held by the caller), then follow the device and
        commit the migration (RELEASE or TAKE_BACK on ``client``) if the source awaits it."""
        args: dict[str, Any] = {"to": to, "timeout": float(timeout), "commit_timeout": self.commit_timeout(timeout)}
        if quiesce_timeout_ms is not None:
            args["quiesce_timeout_ms"] = float(quiesce_timeout_ms)
        try:
            report = dict(client.request(MIGRATE, args, timeout=timeout + 10.0))
        except TransportError as exc:
            if not client.broken:  # an error reply: the source answered
                raise
            self._lost_migrate_reply(client, exc)  # raises
        awaiting = report.get("awaiting_commit") is True
        report["awaiting_commit"] = awaiting
        target = report.get("link") or link
        try:
            if before_follow is not None:
                try:
                    before_follow(dict(report))
                except Exception as exc:  # the destination has not heard of this host yet
                    raise _FollowError(_pcidev_error(exc), ran=False, client=None) from exc
            if not isinstance(target, str):
                raise _FollowError(TransportError("the migration succeeded but nobody said where the device is "
                                                  "served now"), ran=False, client=None)
            new, info, resumed_at = self._follow(target, timeout)
        except _FollowError as exc:
            if not awaiting:  # the source gave the device up at the ACK: it is lost
                if exc.client is not None:
                    exc.client.close()
                raise exc.error from None
            self._fail_commit(client, exc)  # raises
            raise AssertionError("unreachable") from None  # pragma: no cover
        except BaseException:
            if awaiting:  # interrupted (KeyboardInterrupt) maybe after RESUME: never on both sides
                self._release(client)
            raise
        report["released"] = self._release(client) if awaiting else False
        self._switch_to(new, target, info)
        report["resumed_at"] = resumed_at
        if isinstance(resumed_at, (int, float)) and info.get("boot_id") == report.get("boot_id") \
                and info.get("boot_id"):
            report["downtime"] = resumed_at - report["stopped_at"]
        report["host_pause"] = time.monotonic() - t0
        report["held_at"] = t0  # (the breakdown of the downtime starts at the hold)
        report["precopy_seconds"] = precopy_seconds
        report.setdefault("precopy", None)
        report["destination_pid"] = info.get("pid")
        self.migrations.append(report)
        return report

    def _lost_migrate_reply(self, client: LinkClient, exc: TransportError) -> None:
        """MIGRATE got no reply (the connection broke or the reply did not come in time): ask
        the source, on a connection of its own, what became of the device.

        :raises MigrationError: the source runs it (the migration failed or never started).
        :raises TransportError: it does not: the outcome is unknown here (a source awaiting
            this host's commit gives the device up once ``client`` is closed).
        """
        client.close()
        try:
            probe = LinkClient(connect(self.address, timeout=self.io_timeout), io_timeout=self.io_timeout)
        except PcidevError as err:
            raise TransportError(f"MIGRATE got no reply ({exc}) and the source cannot be reached ({err}): "
                                 "what became of the device is unknown") from exc
        try:
            info = probe.request(HELLO)
            self._check_info(info)
        except PcidevError as err:
            probe.close()
            raise TransportError(f"MIGRATE got no reply ({exc}) and the source does not answer ({err}): "
                                 "what became of the device is unknown") from exc
        if info["state"] == "running":
            if client is self._client:
                self._client = probe
                self.info = info
            else:
                probe.close()
            raise MigrationError(f"MIGRATE got no reply ({exc}); the device runs on the source") from exc
        probe.close()
        raise TransportError(f"MIGRATE got no reply ({exc}); the source's device is {info['state']}: where it runs "
                             "is unknown here") from exc

    @staticmethod
    def _release(client: LinkClient) -> bool:
        """RELEASE: the destination runs the device; the source may go (it gives the device
        up by itself if this does not reach it)."""
        try:
            client.request(RELEASE)
        except PcidevError:
            return False
        return True

    def _fail_commit(self, client: LinkClient, exc: _FollowError) -> None:
        """The device could not be followed to its destination, whose source awaits the
        commit: take it back if the destination provably never ran it, else give it up.

        :raises MigrationError: taken back: the device runs on the source again.
        :raises ConnectionLostError: the destination may have run it: the source gave it up.
        :raises TransportError: the source could not take it back (the device is lost).
        """
        why = f"{type(exc.error).__name__}: {exc.error}"
        dest = exc.client
        if exc.ran is not False:
            if dest is not None:
                dest.close()
            self._release(client)  # never on both sides: at worst it runs nowhere
            raise ConnectionLostError(f"the destination may have run the device ({why}); the source gave it up, "
                                      "so neither side is followed: the device is lost to this host") from exc.error
        if dest is not None:  # tell it: it never runs the device (a dead one does not answer)
            try:
                dest.request(ABANDON, {"reason": "its source takes the device back"}, timeout=min(self.io_timeout, 5.0))
            except PcidevError:
                pass
            finally:
                dest.close()
        try:
            client.request(TAKE_BACK, {"reason": why[:500]})
        except PcidevError as err:
            raise TransportError(f"the destination did not take the device ({why}) and the source could not take "
                                 f"it back ({type(err).__name__}: {err}): the device is lost") from exc.error
        raise MigrationError(f"the destination did not take the device ({why}); the device runs again on the "
                             "source") from exc.error

    # -- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop interrupt delivery, close the eventfds and the connection. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._irqs is not None:
            self._irqs.close()
        self._client.close()
