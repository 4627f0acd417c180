"""Moving a running device from one process to another.

The source side, :func:`migrate_out`:

1. collects every blocker (:func:`~pcidev.migration.blockers.collect_blockers`) *before* stopping anything,
   and refuses with :class:`~pcidev.errors.MigrationBlockedError` listing them all;
   then asks the destination in a pre-flight (:mod:`pcidev.migration.preflight`: device
   type, section versions, fingerprint, the device's facts) whether it can take the
   device, and raises the same error with the destination's reasons if it cannot --
   still before anything stops;
2. quiesces the device at a consistent point (:meth:`~pcidev.device.PciDevice.quiesce`: no
   request half-done; the transport has already stopped reading guest accesses at
   a message boundary);
3. saves it (:func:`~pcidev.migration.snapshot.save_device_stream`) and sends the stream over the
   migration socket, with the guest-memory and interrupt eventfds attached
   (``SCM_RIGHTS``) on a UNIX socket;
4. waits for the destination's acknowledgement, ``timeout`` seconds from the stop in
   all (the quiesce, the pre-copy's remainder, the state and the ACK: a destination
   that reads or answers a byte at a time cannot stretch it). Until then it keeps
   everything; if anything fails (refusal, garbage, the destination dies or times
   out) it shuts the channel down, resumes the device and raises
   :class:`~pcidev.errors.MigrationError`. A refusal (NACK) always reaches the caller
   with the destination's reason, even when the destination refused early and closed
   so that the source's send broke first;
5. after the acknowledgement it answers COMMIT and never runs the device again (it
   marks it :attr:`~pcidev.device.PciDevice.migrated_out` and clears
   :attr:`~pcidev.device.PciDevice.owns_state`, so that closing it persists nothing
   over the destination's state), with one exception: a destination that ends the
   channel without a byte after COMMIT never ran it (see below); it waits briefly for
   the destination's RUNNING to report the downtime.

The destination side, :func:`migrate_in`, answers the pre-flight, receives, loads (all or nothing:
:func:`~pcidev.migration.snapshot.load_device_stream`), acknowledges, waits for COMMIT
(a source that gave up never sends it: no COMMIT within ``timeout``, the end of the
channel or ABORT, and the loaded device is discarded), sends RUNNING and only then
resumes the device. So the destination never runs a device whose source may still
run it, and a RUNNING that never came whole proves it did not run.

A peer of the previous version (before COMMIT ended every migration) is served as
before: the OFFER says ``commit`` and the ACK answers it; a source whose OFFER does
not say it never sends COMMIT, and the destination then resumes after its ACK; a
destination whose ACK does not say it runs without COMMIT, and the source sends none
and counts its ACK as the handover (the window in which both may run is only
narrowed: the source shuts the channel down before it resumes).

Over TCP no descriptors travel: the contents of the device's memory sources (its RAM
BARs, an NVMe ``mem`` namespace) travel instead (protocol 2, :mod:`pcidev.migration.precopy`),
and state that migrates only as a descriptor and no source covers blocks the migration
before anything stops (:func:`~pcidev.migration.blockers.descriptor_blockers`). The
destination loads without descriptors and must be
given the guest memory (the same regions) and the interrupt eventfds by the host
before it runs; it acknowledges with ``deferred`` set and does not resume by
itself (the device link's ``RESUME`` does it, see :mod:`pcidev.transport.link`).

Wire format of the migration channel (all integers little-endian)::

    frame   = magic "PCIDMIGR" (8) | type u16 | flags u16 (0) | length u32 | body
    OFFER   1  msgpack {"protocol": 1, "device_type", "stream_size", "fds", "boot_id", "commit": true}
               + the first (at most 253) fds
    FDS     2  empty body + the next batch of fds (when there are more than 253)
    STATE   3  the vmstate stream (docs/vmstate-format.md)
    ACK     4  msgpack {"link": address or nil, "deferred": bool, "boot_id", "commit": true}
    NACK    5  msgpack {"error": error class name, "message"}
    RUNNING 6  msgpack {"running_at": CLOCK_MONOTONIC seconds, or nil when deferred, "boot_id"}
    COMMIT  7  empty: the source gives the device up for good (after every ACK that says ``commit``)
    READY   8  msgpack: a handover's new process is built and waits (:mod:`pcidev.transport.vfio_user.handover`)
    CONN    9  msgpack: a handover's connection state, + the sockets that move with it
    ABORT  10  msgpack {"reason"}: the source keeps the device; the destination must not run it
    HANDOVER 11 msgpack: a request for a handover (the ``pcidev handover`` command to the serving process)
    REPORT 12  msgpack {"ok", "reason", ...}: the answer to HANDOVER
    SERVING 13 msgpack {"serving_at"}: a handover's new process polls the client's socket now
    MEMORY 14, CHUNK 15: memory contents (protocol 2, :mod:`pcidev.migration.precopy`)
    CHECK  16  msgpack: the source's pre-flight, its first frame (:mod:`pcidev.migration.preflight`)
    VERDICT 17 msgpack {"ok", "reasons", "features"}: the destination's answer to CHECK
    SYNC   18  msgpack {"seq", "sent"}: which memory contents are applied? (negotiated in VERDICT)
    SYNCED 19  msgpack {"seq", "applied"}: the answer, once everything before SYNC is applied

A source from before the pre-flight starts with MEMORY or OFFER, and the destination
takes it as always; a destination from before it NACKs CHECK, and the source (nothing
stopped) says so: ``preflight=False`` speaks the exchange without it.

Every migration ends OFFER ... ACK, COMMIT, RUNNING: the destination runs the device
only after COMMIT, and its RUNNING precedes its first guest access (deferred, over TCP:
it goes out before the destination serves its host's RESUME, with ``running_at`` nil).
Until COMMIT the source can still take the device back; after it, an end of the
channel without a single byte proves the destination never ran it, so the source may
resume then too. A destination whose RUNNING cannot be sent never runs the device.
What differs with ``commit=True`` (the vfio-user handover, where both processes could
read the same client socket) is a RUNNING that does not come in time: the source then
has the destination killed (``stall``), resumes if not one byte came, and otherwise
the device runs nowhere (:class:`~pcidev.errors.ConnectionLostError`); without
``commit`` a destination silent after COMMIT keeps the device (it may run it).

Downtime is reported as the time from the source's stop to the destination's
resume, both read from ``CLOCK_MONOTONIC``; the two are comparable only on the
same machine, which the kernel boot id (sent in every message) confirms.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pluggy

from pcidev.device import PciDevice
from pcidev.errors import (
    ConnectionLostError,
    MigrationBlockedError,
    MigrationError,
    TransportError,
    VMStateError,
)
from pcidev.migration.blockers import collect_blockers, descriptor_blockers
from pcidev.migration.frames import (
    ABORT,
    ACK,
    CHECK,
    CHUNK,
    COMMIT,
    CONN,
    FDS,
    FEATURE_SYNC,
    FRAME_HEADER,
    HANDOVER,
    MAGIC,
    MAX_OFFER_FDS,
    MAX_STREAM_SIZE,
    MEMORY,
    NACK,
    OFFER,
    PROTOCOL_MEMORY,
    PROTOCOL_VERSION,
    READY,
    REPORT,
    RUNNING,
    SERVING,
    STATE,
    SYNC,
    SYNCED,
    boot_id,
    check_offer_fds,
    frame_meta,
    frame_name,
    recv_frame,
    send_frame,
    send_meta,
)
from pcidev.migration.function_state import LoadedResources
from pcidev.migration.precopy import (
    MAX_CHUNK_FRAME,
    MAX_MEMORY_SIZE,
    Precopy,
    PrecopyReport,
    StagedMemory,
    destination_sources,
)
from pcidev.migration.preflight import answer, ask
from pcidev.migration.snapshot import load_device_stream, save_device_stream
from pcidev.plugins import hook_migration_summary
from pcidev.transport.fdpass import SCM_MAX_FD, close_fds, is_unix
from pcidev.vmstate.errors import ConfigMismatchError

__all__ = [
    "PROTOCOL_VERSION",
    "MIN_INCOMING_RATE",
    "MAGIC",
    "FRAME_HEADER",
    "MAX_STREAM_SIZE",
    "MAX_OFFER_FDS",
    "MigrationResult",
    "IncomingResult",
    "migrate_out",
    "migrate_in",
    "boot_id",
    "COMMIT",
    "READY",
    "CONN",
    "ABORT",
    "HANDOVER",
    "REPORT",
    "SERVING",
    "send_frame",
    "send_meta",
    "recv_frame",
    "frame_meta",
]

#: the slowest rate (bytes per second) at which :func:`migrate_in` waits, by default, for
#: the memory and state a source announced (see its ``total_timeout``)
MIN_INCOMING_RATE = 1 << 20

log = logging.getLogger(__name__)

@attrs.frozen
class MigrationResult:
    """What :func:`migrate_out` reports.

    :ivar state_size: bytes of the vmstate stream.
    :ivar fds: descriptors passed with it.
    :ivar stopped_at: ``CLOCK_MONOTONIC`` when the source device was quiesced.
    :ivar acked_at: when the acknowledgement arrived.
    :ivar committed_at: when COMMIT went out (None: an older destination, which takes
        the device with its ACK).
    :ivar running_at: when the destination resumed (its clock), or None.
    :ivar same_clock: source and destination share ``CLOCK_MONOTONIC`` (same boot id).
    :ivar deferred: the destination waits for its host to attach memory and resume.
    :ivar link: the address where the destination serves the device, if it said.
    :ivar summary: what the plugins said of the stopped device's state
        (:func:`~pcidev.hookspecs.pcidev_migration_summary`; NVMe: full CQs, parked
        completions, outstanding AERs).
    :ivar precopy: what the memory contents' pre-copy did (a migration without
        descriptors of a device with memory sources), else None.
    :ivar phases: ``CLOCK_MONOTONIC`` at each step of the stop, for a breakdown of the
        downtime: ``stopped``, ``quiesced``, ``saved``, ``sent``, ``acked`` (the source's
        clock) and, when the destination said so, ``received`` and ``loaded`` (its clock:
        comparable when ``same_clock``).
    """

    state_size: int
    fds: int
    stopped_at: float
    acked_at: float
    running_at: float | None = None
    same_clock: bool = False
    deferred: bool = False
    link: str | None = None
    summary: dict[str, Any] = attrs.field(factory=dict)
    precopy: PrecopyReport | None = None
    committed_at: float | None = None
    phases: dict[str, float] = attrs.field(factory=dict)

    @property
    def downtime(self) -> float | None:
        """Seconds from the stop on the source to running on the destination, when
        both clocks are comparable and the destination reported; else None."""
        if self.running_at is None or not self.same_clock:
            return None
        return self.running_at - self.stopped_at

    @property
    def downtime_upper_bound(self) -> float:
        """Seconds from the stop to COMMIT (the destination resumes when it arrives;
        an older one right after its acknowledgement): measured on the source clock alone."""
        return (self.committed_at if self.committed_at is not None else self.acked_at) - self.stopped_at

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (also what the device link returns to the host)."""
        return {"state_size": self.state_size, "fds": self.fds, "stopped_at": self.stopped_at,
                "acked_at": self.acked_at, "committed_at": self.committed_at, "running_at": self.running_at,
                "same_clock": self.same_clock,
                "deferred": self.deferred, "link": self.link, "downtime": self.downtime,
                "downtime_upper_bound": self.downtime_upper_bound, "boot_id": boot_id(), "summary": self.summary,
                "precopy": self.precopy.as_dict() if self.precopy is not None else None,
                "phases": dict(self.phases)}


@attrs.frozen
class IncomingResult:
    """What :func:`migrate_in` reports.

    :ivar stream: the vmstate stream that was loaded.
    :ivar fds: descriptors received.
    :ivar resources: memory and sink the load created (the caller owns them).
    :ivar loaded_at: ``CLOCK_MONOTONIC`` after the load.
    :ivar running_at: when the device was resumed (None if deferred).
    """

    stream: bytes
    fds: int
    resources: LoadedResources
    loaded_at: float
    running_at: float | None


# ------------------------------------------------------------------- source
def _refusal(body: bytes) -> MigrationError:
    """The error a NACK body carries, for the source's caller.

    :raises TransportError: the body is not a well-formed NACK.
    """
    meta = frame_meta(NACK, body, {"error": str, "message": str})
    return MigrationError(f"the destination refused the state: {meta['error']}: {meta['message']}")


def _raise_refusal(sock: socket.socket, deadline: float, send_error: TransportError) -> None:
    """After a failed send, raise the destination's refusal if it sent one.

    A destination refuses as soon as it sees what it cannot accept (often the
    OFFER) and closes without reading the rest, so the source's send breaks
    (``EPIPE``/``ECONNRESET``) while the NACK already waits in its receive queue.
    The refusal is what the caller must see; the broken pipe only when there is
    no reply. Waits no longer than ``deadline`` (``CLOCK_MONOTONIC``).

    :raises MigrationError: the destination refused (chained to ``send_error``).
    """
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        kind, body, stray = recv_frame(sock, deadline=deadline)
        close_fds(stray)
        refusal = _refusal(body) if kind == NACK else None
    except (TransportError, OSError):
        return
    if refusal is not None:
        raise refusal from send_error


class _StopDeadline:
    """Shuts the channel down at the stop's deadline unless :meth:`disarm` came first:
    every send and receive after the stop (the pre-copy's remainder, the state, the ACK)
    then fails at once, however slowly the destination reads or answers.

    Its thread starts before the stop (:meth:`arm` sets the deadline), so that starting
    it costs nothing inside the downtime.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._cond = threading.Condition()
        self._at: float | None = None
        self._state = "waiting"  # waiting, armed, disarmed, expired
        threading.Thread(target=self._run, name="pcidev-migration-deadline", daemon=True).start()

    @property
    def expired(self) -> bool:
        """The deadline passed before :meth:`disarm`: the channel was shut down."""
        return self._state == "expired"

    def arm(self, at: float) -> None:
        """Shut the channel down at ``at`` (``CLOCK_MONOTONIC``)."""
        with self._cond:
            if self._state == "waiting":
                self._at, self._state = at, "armed"
                self._cond.notify()

    def disarm(self) -> bool:
        """Cancel it (idempotent). :returns: False if the deadline passed first."""
        with self._cond:
            if self._state == "expired":
                return False
            self._state = "disarmed"
            self._cond.notify()
            return True

    def _run(self) -> None:
        with self._cond:
            while self._state in ("waiting", "armed"):
                left = None if self._at is None else self._at - time.monotonic()
                if left is not None and left <= 0:
                    self._state = "expired"
                    try:
                        self._sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                self._cond.wait(left)


def _release(precopy: Precopy) -> None:
    """Release what the pre-copy holds after the handover, best-effort: the migration is
    done whatever this does (a failure is logged, never raised: it must not turn a completed
    migration into an error)."""
    try:
        precopy.release()
    except Exception:
        log.exception("migration: releasing the pre-copy's descriptors and mappings failed (the migration "
                      "completed)")


def _shut(sock: socket.socket) -> None:
    """End the channel before the source resumes: a destination's late ACK then finds it
    closed (a destination of this version waits for COMMIT anyway)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def migrate_out(device: PciDevice, sock: socket.socket, *, pm: pluggy.PluginManager | None = None,
                timeout: float = 10.0, running_timeout: float = 2.0, commit: bool = False,
                stall: Callable[[], None] | None = None, precopy: Precopy | None = None,
                quiesce_timeout: float | None = 5.0, preflight: bool = True) -> MigrationResult:
    """Send ``device`` to the destination at the other end of ``sock``.

    The caller has stopped guest accesses to the device (a transport does so by
    not reading its socket while this runs) and connected ``sock``.

    :param device: the running source device.
    :param sock: connected migration socket (UNIX: descriptors pass too).
    :param pm: plugin manager for the ``pcidev_migration_blockers`` hook.
    :param timeout: seconds from the stop (the quiesce and its flush included) to the
        acknowledgement, in all.
    :param running_timeout: seconds to wait, after COMMIT, for the destination's RUNNING
        (for the downtime report, and: if the channel ends first without a byte, the
        destination never ran the device, and it runs again here; with ``commit``,
        before ``stall`` is called).
    :param commit: count the migration done only when RUNNING arrives, and have a
        destination that stays silent killed (``stall``; the vfio-user handover).
    :param stall: with ``commit``, called when RUNNING does not come within
        ``running_timeout``: it must end the destination at once (SIGKILL and reap it).
        The device runs again here only if not one byte came after COMMIT.
    :param quiesce_timeout: seconds the device may take to reach its consistent point
        (:meth:`PciDevice.quiesce <pcidev.device.PciDevice.quiesce>`; None: its own limit).
        Without ``commit`` the quiesce also flushes what the device wrote (the destination
        may open its files from another host); a handover's new process shares this one's
        open files and page cache, and needs no flush.
    :param precopy: the :class:`~pcidev.migration.precopy.Precopy` that ran on ``sock``
        while the device ran: after the stop its :meth:`~pcidev.migration.precopy.Precopy.finish`
        sends the remainder (inside the downtime), and the OFFER maps the stream's
        descriptors to its sources (protocol 2). Without one, a channel that carries no
        descriptors and a device with memory sources get one with no iteration: every
        content is copied at the stop. It is aborted (tracking stopped) on any failure.
    :param preflight: before the stop, ask the destination whether it can take the device
        (:mod:`pcidev.migration.preflight`; done already if ``precopy`` ran): a refusal
        raises :class:`~pcidev.errors.MigrationBlockedError` with nothing stopped. False:
        the exchange of a destination from before the pre-flight (which NACKs it).
    :returns: sizes and timestamps.
    :raises MigrationBlockedError: blockers, or the destination refused in the pre-flight
        (nothing was stopped).
    :raises QuiesceTimeoutError: the device did not quiesce within ``quiesce_timeout``
        (nothing was sent; it runs on here).
    :raises ConnectionLostError: with ``commit``, the destination may have run the device
        and failed (RUNNING late or broken): it was killed, and the device runs nowhere.
    :raises MigrationError: the migration failed; the device runs again on the source.
    """
    reasons = collect_blockers(device, pm)
    if not is_unix(sock):
        try:
            if precopy is None or (not precopy.active and not precopy.failed):
                # (an inactive one found no source when it was made: there may be some now)
                ran = precopy
                precopy = Precopy(device, sock, max_iterations=0, timeout=timeout, preflight=preflight)
                if ran is not None:
                    precopy.verdict = ran.verdict  # (its pre-flight, if it ran one, holds)
            sources = precopy.sources() if precopy.active else []
        except MigrationError as exc:
            reasons.append(str(exc))
            sources = []
        reasons += descriptor_blockers(device, "a migration over TCP", sources)
    if precopy is not None and precopy.failed:
        reasons.append("its pre-copy failed")
    if reasons:
        if precopy is not None:
            precopy.abort()
        raise MigrationBlockedError(reasons)
    if preflight and (precopy is None or precopy.verdict is None):
        if precopy is not None:
            precopy.check()  # (its verdict: the SYNC it names is of no use at the stop)
        else:
            ask(device, sock, timeout=timeout)
    streams = precopy is not None and precopy.active
    was_running = not device.quiesced
    watchdog = _StopDeadline(sock)
    # the downtime starts here: the guest's accesses are held already, and the drain and
    # the flush of the quiesce are part of what it waits for
    stopped_at = time.monotonic()
    try:
        device.quiesce(quiesce_timeout, flush=not commit)  # (on failure it runs on: nothing to undo)
        phases = {"stopped": stopped_at, "quiesced": time.monotonic()}
    except BaseException:
        watchdog.disarm()
        if precopy is not None:
            precopy.abort()
        raise
    nfds = 0
    size = 0
    committed_at: float | None = None
    # ``timeout`` bounds the whole way from the stop to the ACK (the guest waits): each
    # send and receive gets what is left, and the watchdog ends the ones that a peer
    # reading or writing a byte at a time would stretch
    ack_by = stopped_at + timeout
    watchdog.arm(ack_by)

    def budget() -> None:
        left = ack_by - time.monotonic()
        if left <= 0:
            raise TransportError(f"timed out: no acknowledgement within {timeout:g} s of the stop")
        sock.settimeout(left)

    try:
        budget()
        deadline = ack_by  # (also for the reply to a failed send)
        if streams:
            assert precopy is not None
            try:
                precopy.finish(deadline=ack_by)
            except MigrationError as exc:
                if isinstance(exc.__cause__, TransportError):
                    _raise_refusal(sock, deadline, exc.__cause__)
                raise
        stream, fds = save_device_stream(device)
        phases["saved"] = time.monotonic()
        summary = hook_migration_summary(pm, device) if pm is not None else {}
        size = len(stream)
        pass_fds = is_unix(sock)
        nfds = len(fds) if pass_fds else 0
        sent = list(fds) if pass_fds else []
        offer: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "device_type": device.vmstate_device_type,
                                 "stream_size": size, "fds": nfds, "boot_id": boot_id(),
                                 "commit": True}  # (it answers the ACK with COMMIT)
        if streams:
            assert precopy is not None
            offer.update(protocol=PROTOCOL_MEMORY, stream_fds=len(fds), fd_sources=precopy.fd_sources(fds))
        try:
            budget()
            send_meta(sock, OFFER, offer, sent[:SCM_MAX_FD], deadline=ack_by)
            for i in range(SCM_MAX_FD, len(sent), SCM_MAX_FD):
                budget()
                send_frame(sock, FDS, b"", sent[i:i + SCM_MAX_FD], deadline=ack_by)
            budget()
            send_frame(sock, STATE, stream, deadline=ack_by)
            phases["sent"] = time.monotonic()
        except TransportError as exc:
            _raise_refusal(sock, deadline, exc)
            raise
        budget()
        kind, body, stray = recv_frame(sock, deadline=ack_by)
        close_fds(stray)
        if kind == NACK:
            raise _refusal(body)
        if kind != ACK:
            raise TransportError(f"migration channel: expected ACK, got {frame_name(kind)}")
        meta = frame_meta(kind, body, {"deferred": bool, "boot_id": str})
        acked_at = phases["acked"] = time.monotonic()
        phases.update({k: meta[k] for k in ("received", "loaded") if type(meta.get(k)) is float})
        if not watchdog.disarm():  # (it shut the channel down as the ACK came: no COMMIT can go)
            raise TransportError(f"timed out: no acknowledgement within {timeout:g} s of the stop")
        if not commit and meta.get("commit") is True:
            # the destination runs the device only after COMMIT: from here on it is its own.
            # A COMMIT that fails to go out did not arrive whole: it never runs it.
            sock.settimeout(running_timeout)
            send_frame(sock, COMMIT, deadline=time.monotonic() + running_timeout)
            committed_at = phases["committed"] = time.monotonic()
    except BaseException as exc:  # (KeyboardInterrupt too: the device must not stay stopped)
        watchdog.disarm()
        if not commit:  # (a handover's caller still sends ABORT on it)
            _shut(sock)  # before the resume: nothing the destination sends now reaches a reader
        if precopy is not None:
            precopy.abort()
        if was_running:
            device.resume()
        if not isinstance(exc, Exception):
            raise  # (as it came: the device runs again on the source, no COMMIT went out)
        if watchdog.expired or (not isinstance(exc, MigrationError) and time.monotonic() >= ack_by - 0.01):
            raise MigrationError(f"timed out: no acknowledgement within {timeout:g} s of the stop; "
                                 "the device runs again on the source") from exc
        if isinstance(exc, MigrationError):
            raise MigrationError(f"{exc}; the device runs again on the source") from exc
        raise MigrationError(f"migration failed ({type(exc).__name__}: {exc}); "
                             "the device runs again on the source") from exc
    if not commit:
        # Acknowledged (and committed): from here on the destination owns the device, marked
        # so before anything else may fail (a destination that ends the channel without a
        # byte after COMMIT never ran it: then it is ours again, below)
        device.migrated_out = True
        device.owns_state = False
    if precopy is not None:
        _release(precopy)  # its descriptors and mappings: after the ACK, outside the downtime
    if commit:
        return _commit(device, sock, meta, size=size, nfds=nfds, stopped_at=stopped_at, acked_at=acked_at,
                       running_timeout=running_timeout, stall=stall, was_running=was_running)
    running_at = None
    if committed_at is not None:
        outcome, kind, body = _await_running(sock, committed_at + running_timeout)
        if outcome == "ended":
            # not one byte after COMMIT: it never sent RUNNING, so it never ran the device
            device.migrated_out = False
            device.owns_state = True
            if was_running:
                device.resume()
            raise MigrationError("the destination ended the channel after COMMIT without running the device; "
                                 "the device runs again on the source")
        if outcome == "frame" and kind == RUNNING:
            try:
                running_at = frame_meta(kind, body, {"running_at": (float, type(None))})["running_at"]
            except TransportError:
                pass
        # silent, half a frame or another frame: it may run the device, which is its own now
    # the destination owns the device (marked above): never resume it, and never persist its
    # state when it is closed (PciDevice.owns_state)
    link = meta.get("link") if isinstance(meta.get("link"), str) else None
    same = bool(meta["boot_id"]) and meta["boot_id"] == boot_id()
    if committed_at is None and not meta["deferred"]:  # an older destination: RUNNING after its resume
        try:
            sock.settimeout(running_timeout)
            kind, body, stray = recv_frame(sock, deadline=time.monotonic() + running_timeout)
            close_fds(stray)
            if kind == RUNNING:
                running_at = frame_meta(kind, body, {"running_at": float})["running_at"]
        except (TransportError, OSError):
            pass
    return MigrationResult(state_size=size, fds=nfds, stopped_at=stopped_at, acked_at=acked_at,
                           running_at=running_at, same_clock=same, deferred=bool(meta["deferred"]), link=link,
                           summary=summary, committed_at=committed_at,
                           precopy=precopy.report if streams and precopy is not None else None, phases=phases)


def _commit(device: PciDevice, sock: socket.socket, meta: dict[str, Any], *, size: int, nfds: int,
            stopped_at: float, acked_at: float, running_timeout: float, stall: Callable[[], None] | None,
            was_running: bool) -> MigrationResult:
    """COMMIT after the ACK, then RUNNING or the end of the channel (see :func:`migrate_out`).

    The destination sends RUNNING before anything else touches the device or the guest's
    socket. So a clean end of the channel with not one byte after COMMIT proves it never
    ran the device, and it runs here again. Anything else that is not a well-formed
    RUNNING in time (a RUNNING too late, a part of a frame, another frame) means it may
    have run it: the destination is killed and neither side runs the device
    (:class:`~pcidev.errors.ConnectionLostError`).
    """
    deadline = time.monotonic() + running_timeout
    why = ""
    try:
        sock.settimeout(running_timeout)
        send_frame(sock, COMMIT, deadline=deadline)
        outcome, kind, body = _await_running(sock, deadline)
    except TransportError as exc:  # COMMIT did not go out: the destination is gone or stuck
        outcome, kind, body, why = "silent", 0, b"", f"did not take COMMIT ({exc})"
    if outcome == "frame" and kind == RUNNING:
        try:
            running_at = frame_meta(kind, body, {"running_at": float})["running_at"]
        except TransportError:
            running_at = time.monotonic()  # it said it runs: it does, whatever its body says
        device.migrated_out = True
        device.owns_state = False
        same = bool(meta["boot_id"]) and meta["boot_id"] == boot_id()
        return MigrationResult(state_size=size, fds=nfds, stopped_at=stopped_at, acked_at=acked_at,
                               running_at=running_at, same_clock=same, deferred=False,
                               link=meta.get("link") if isinstance(meta.get("link"), str) else None)
    # No RUNNING in time: end the destination at once (no grace: it may be about to run).
    if stall is None:
        raise MigrationError("the destination did not confirm it runs after COMMIT; neither side runs the device")
    stall()
    if outcome in ("silent", "ended") and _nothing_arrived(sock):
        # not one byte after COMMIT, and the destination is dead: it never ran the device
        if was_running:
            device.resume()
        raise MigrationError(f"the destination {why or f'did not confirm it runs within {running_timeout:g} s'} "
                             "after COMMIT (killed); the device runs again on the source")
    device.migrated_out = True  # it may have run: its state is not ours any more
    device.owns_state = False
    what = (f"sent {frame_name(kind)} instead of RUNNING" if outcome == "frame"
            else f"sent a broken frame ({why})" if outcome == "broken"
            else f"confirmed too late (after {running_timeout:g} s)")
    raise ConnectionLostError(f"the new process {what} after COMMIT and was killed; it may have served the "
                              "client, so neither process runs the device: the client's connection is lost")


def _await_running(sock: socket.socket, deadline: float) -> tuple[str, int, bytes]:
    """Wait for the frame after COMMIT until ``deadline``.

    :returns: ``("frame", kind, body)``; ``("silent", 0, b"")``: nothing arrived in time;
        ``("ended", 0, b"")``: the channel ended (closed or reset) without a byte;
        ``("broken", 0, b"")``: bytes arrived, but no whole frame.
    """
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    if not poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        return "silent", 0, b""
    try:
        sock.settimeout(0)
        first = sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return "silent", 0, b""
    except OSError:
        first = b""  # reset: the bytes sent before it would still be read first
    if not first:
        return "ended", 0, b""  # not one byte
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        kind, body, stray = recv_frame(sock, deadline=deadline)
    except TransportError:
        return "broken", 0, b""
    close_fds(stray)
    return "frame", kind, body


def _nothing_arrived(sock: socket.socket) -> bool:
    """Whether no byte waits on ``sock`` (its peer is dead and reaped: none can come)."""
    try:
        return not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return True  # reset: nothing readable


# -------------------------------------------------------------- destination
def migrate_in(device: PciDevice, sock: socket.socket, *, timeout: float = 10.0, link: str | None = None,
               adopt: Callable[[LoadedResources], None] | None = None,
               defer_without_fds: bool = True, commit: bool = False,
               committed: Callable[[], None] | None = None, resume: bool = True,
               max_memory: int = MAX_MEMORY_SIZE, total_timeout: float | None = None) -> IncomingResult:
    """Receive a device state on ``sock``, load it into ``device``, acknowledge,
    and resume the device.

    :param device: a fresh (or quiesced) device of the same type and configuration.
    :param sock: the accepted migration connection.
    :param timeout: seconds to wait for each part of the stream.
    :param link: the address where this process serves the device (sent in the ACK
        so the source can tell the host where to go).
    :param adopt: called with the memory and sink created by the load, before the
        acknowledgement (the transport takes ownership of them).
    :param defer_without_fds: over a socket without descriptors (TCP), do not
        resume: the host must attach memory and eventfds first (the ACK says
        ``deferred``).
    :param commit: wait for the source's COMMIT after the ACK even if its OFFER does not
        say ``commit`` (the handover). Either way, after COMMIT it sends RUNNING
        *before* resuming the device (the source treats an end of the channel without
        RUNNING as "never ran"); no COMMIT within ``timeout``, ABORT or the end of the
        channel instead raise :class:`~pcidev.errors.MigrationError`: the device must not
        run (the source gave up). A source whose OFFER does not say ``commit`` (the
        previous version) sends none: the device resumes right after the ACK.
    :param committed: called after COMMIT and before RUNNING.
    :param resume: with ``commit``, resume the device after RUNNING (False: it was not
        running at the source, e.g. quiesced because its client left: it stays so).
    :param max_memory: over a channel without descriptors, the most bytes of memory
        contents the source may announce (:class:`~pcidev.migration.precopy.StagedMemory`):
        a cap above the real bound, which is this device's own memory sources (each
        announced source must be one of them, of its exact size:
        :func:`~pcidev.migration.precopy.destination_sources`); they are staged in memfds
        of this process and handed to the load in place of the source's descriptors.
    :param total_timeout: seconds the whole incoming stream (pre-copy included) may take
        until the state has arrived; None: ``4 * timeout`` plus the announced bytes (memory
        and state) and the memory bytes applied so far (a pre-copy's passes re-send what
        the device dirtied, at most :data:`~pcidev.migration.precopy.MAX_ROUNDS` times the
        memory) twice at :data:`MIN_INCOMING_RATE` (a peer that trickles data just inside
        ``timeout`` is cut off, then NACKed).
    :returns: the stream, the resources and timestamps.
    :raises TransportError: the channel broke or carried garbage (NACK sent if possible).
    :raises VMStateError: the stream was refused (NACK sent); the device is untouched.
    :raises MigrationError: the acknowledgement could not be sent, or no COMMIT came, or
        RUNNING could not be sent (the source resumes; this device must not run).
    """
    sock.settimeout(timeout)
    started = time.monotonic()
    fds: list[int] = []
    staged: StagedMemory | None = None
    announced = 0  # the state's bytes, once the OFFER said

    def deadline() -> float:
        if total_timeout is not None:
            return started + total_timeout
        # (a pre-copy re-sends what the device dirtied: what was applied counts too, up
        # to StagedMemory's max_rounds times the memory)
        memory = staged.announced_bytes + staged.received if staged is not None else 0
        return started + 4 * timeout + 2 * (memory + announced) / MIN_INCOMING_RATE

    features: frozenset[str] = frozenset()
    try:
        try:
            kind, body, fds = recv_frame(sock, max_fds=SCM_MAX_FD, deadline=deadline())
            if kind == CHECK:  # the pre-flight (a source from before it starts with MEMORY or OFFER)
                close_fds(fds)
                fds = []
                # (a refusal raises, its VERDICT sent)
                features = answer(device, sock, body, deadline=deadline()).features
                kind, body, fds = recv_frame(sock, max_fds=SCM_MAX_FD, deadline=deadline())
            if kind == MEMORY:
                close_fds(fds)
                fds = []
                if is_unix(sock):
                    raise TransportError("migration channel: MEMORY on a socket that carries descriptors")
                staged = StagedMemory(max_memory, destination_sources(device))
                staged.announce(body)
                kind, body, fds = _receive_memory(sock, staged, deadline, sync=FEATURE_SYNC in features)
            if kind != OFFER:
                raise TransportError(f"migration channel: expected OFFER, got {frame_name(kind)}")
            offer = frame_meta(kind, body, {"protocol": int, "device_type": str, "stream_size": int, "fds": int,
                                            "boot_id": str})
            if offer["protocol"] == PROTOCOL_MEMORY and staged is None:
                raise TransportError(f"migration protocol {PROTOCOL_MEMORY} OFFER without MEMORY first")
            if offer["protocol"] == PROTOCOL_VERSION and staged is not None:
                raise TransportError(f"migration protocol {PROTOCOL_VERSION} OFFER after MEMORY")
            if offer["protocol"] not in (PROTOCOL_VERSION, PROTOCOL_MEMORY):
                raise TransportError(f"migration protocol {offer['protocol']} is not {PROTOCOL_VERSION} "
                                     f"or {PROTOCOL_MEMORY}")
            load_fds: list[int | None] | None = staged.load_fds(offer) if staged is not None else None
            if offer["device_type"] != device.vmstate_device_type:
                raise ConfigMismatchError(f"stream is for device type {offer['device_type']!r}, "
                                          f"this device is {device.vmstate_device_type!r}")
            want, size = offer["fds"], offer["stream_size"]
            if not 0 < size <= MAX_STREAM_SIZE:
                raise TransportError(f"migration channel: OFFER announces {want} fds and {size} bytes")
            check_offer_fds(want)  # before a single FDS frame
            if want and not is_unix(sock):
                raise TransportError("migration channel: fds announced on a socket that cannot carry them")
            announced = size
            while len(fds) < want:
                kind, _body, more = recv_frame(sock, max_fds=min(SCM_MAX_FD, want - len(fds)), deadline=deadline())
                fds.extend(more)
                if kind != FDS or not more:
                    raise TransportError(f"migration channel: expected FDS, got {frame_name(kind)}")
            if len(fds) != want:
                raise TransportError(f"migration channel: {len(fds)} fds arrived, {want} announced")
            kind, stream, stray = recv_frame(sock, max_len=size, deadline=deadline())
            close_fds(stray)
            if kind != STATE or len(stream) != size or stray:
                raise TransportError(f"migration channel: expected a STATE of {size} bytes, got "
                                     f"{frame_name(kind)} of {len(stream)}")
            received_at = time.monotonic()
            use_fds: Sequence[int | None] | None = fds if is_unix(sock) else load_fds
            res = load_device_stream(device, stream, use_fds)
        except (VMStateError, TransportError) as exc:
            try:  # (also after the deadline; a source that stopped reading gets a second at most)
                send_meta(sock, NACK, {"error": type(exc).__name__, "message": str(exc)},
                          deadline=time.monotonic() + min(timeout, 1.0))
            except TransportError:
                pass
            raise
    except BaseException:
        if staged is not None:
            staged.close()
        raise
    finally:
        close_fds(fds)
    try:
        return _acknowledge(device, sock, stream=stream, nfds=len(fds), res=res, timeout=timeout, link=link,
                            adopt=adopt, defer_without_fds=defer_without_fds, commit=commit,
                            committing=commit or offer.get("commit") is True, committed=committed, resume=resume,
                            received_at=received_at)
    finally:
        if staged is not None:  # the load duplicated what it adopted; unmapping large staging
            _release_later(staged)  # memory takes long: after the ACK, and off this thread


def _release_later(staged: StagedMemory) -> None:
    """Close ``staged`` on a thread of its own: tearing down hundreds of MiB of staging
    mappings takes tens of milliseconds, which a destination over TCP would otherwise spend
    before it serves its host's RESUME (inside the downtime)."""
    threading.Thread(target=staged.close, name="pcidev-staging-release", daemon=True).start()


def _acknowledge(device: PciDevice, sock: socket.socket, *, stream: bytes, nfds: int, res: LoadedResources,
                 timeout: float, link: str | None, adopt: Callable[[LoadedResources], None] | None,
                 defer_without_fds: bool, commit: bool, committing: bool, committed: Callable[[], None] | None,
                 resume: bool, received_at: float | None = None) -> IncomingResult:
    """The part of :func:`migrate_in` after the load: adopt, ACK, COMMIT, RUNNING, resume
    (``committing``: the source sends COMMIT; else it is of the previous version)."""
    loaded_at = time.monotonic()
    deferred = defer_without_fds and not is_unix(sock)
    if adopt is not None:
        try:
            adopt(res)
        except Exception as exc:
            # refuse the migration so the source resumes at once (instead of
            # waiting out its timeout), and release what the load created
            try:
                send_meta(sock, NACK, {"error": type(exc).__name__, "message": f"adopt failed: {exc}"},
                          deadline=time.monotonic() + min(timeout, 1.0))
            except TransportError:
                pass
            if res is not None:
                res.close()
            raise MigrationError(f"the destination could not adopt the device: {exc}") from exc
    # (received, loaded: for the source's breakdown of the downtime, MigrationResult.phases)
    ack: dict[str, Any] = {"link": link, "deferred": deferred, "boot_id": boot_id(), "received": received_at,
                           "loaded": loaded_at}
    if committing:
        ack["commit"] = True  # (it runs the device only after COMMIT)
    try:
        send_meta(sock, ACK, ack, deadline=time.monotonic() + timeout)
    except TransportError as exc:
        if adopt is None and res is not None:
            res.close()  # (nobody else owns what the load created: the source keeps the device)
        raise MigrationError(f"could not acknowledge ({exc}); the source keeps the device") from exc
    running_at = None
    if committing:
        stamp = time.monotonic()
        runs = commit or not deferred  # (deferred: its host's RESUME runs it, later)
        try:
            _await_commit(sock, timeout)
            if committed is not None:
                committed()
            stamp = time.monotonic()
            try:
                send_meta(sock, RUNNING, {"running_at": stamp if runs else None, "boot_id": boot_id()},
                          deadline=time.monotonic() + timeout)
            except TransportError as exc:
                # the source did not hear it, so it may run the device again: never run it here
                raise MigrationError(f"could not confirm RUNNING ({exc}); the device must not run here") from exc
        except BaseException:
            if adopt is None and res is not None:
                res.close()  # (nobody else owns what the load created)
            raise
        if runs:
            running_at = stamp
            if resume or not commit:  # (``resume`` is the handover's)
                device.resume()
    elif not deferred:  # a source of the previous version: it took the ACK as the handover
        device.resume()
        running_at = time.monotonic()
        try:
            send_meta(sock, RUNNING, {"running_at": running_at, "boot_id": boot_id()},
                      deadline=time.monotonic() + timeout)
        except TransportError:
            pass
    return IncomingResult(stream=stream, fds=nfds, resources=res, loaded_at=loaded_at, running_at=running_at)


def _receive_memory(sock: socket.socket, staged: StagedMemory, deadline: Callable[[], float], *,
                    sync: bool) -> tuple[int, bytes, list[int]]:
    """Apply MEMORY and CHUNK frames, and answer SYNC, until another frame comes, and
    return that one.

    :param deadline: when the whole incoming stream must have arrived (it grows with
        what was announced).
    :param sync: the pre-flight negotiated SYNC (else a SYNC is garbage).
    :raises TransportError: a frame refused by ``staged``, garbage, or the deadline passed.
    """
    while True:
        kind, body, fds = recv_frame(sock, max_len=MAX_CHUNK_FRAME, deadline=deadline())
        if kind == CHUNK:
            staged.apply(body)
        elif kind == MEMORY:
            staged.announce(body)
        elif kind == SYNC and sync:
            close_fds(fds)
            meta = frame_meta(SYNC, body, {"seq": int, "sent": int})
            # everything before it is applied (CHUNKs are applied as they are read)
            send_meta(sock, SYNCED, {"seq": meta["seq"], "applied": staged.received}, deadline=deadline())
        else:
            return kind, body, fds


def _await_commit(sock: socket.socket, timeout: float) -> None:
    """Wait for COMMIT after the ACK, ``timeout`` seconds in all.

    :raises MigrationError: ABORT, garbage, the end or nothing in time instead.
    """
    try:
        sock.settimeout(timeout)
        kind, body, stray = recv_frame(sock, deadline=time.monotonic() + timeout)
        close_fds(stray)
    except TransportError as exc:
        raise MigrationError(f"no COMMIT from the source ({exc}); the device must not run here") from exc
    if kind == COMMIT:
        return
    reason = ""
    if kind == ABORT:
        try:
            reason = str(frame_meta(kind, body, {}).get("reason", ""))
        except TransportError:
            pass
    raise MigrationError(f"the source sent {frame_name(kind)} instead of COMMIT"
                         + (f" ({reason})" if reason else "") + "; the device must not run here")
