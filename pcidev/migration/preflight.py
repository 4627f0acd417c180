"""The pre-flight of a migration: before the source stops anything, it tells the
destination what the destination needs to decide whether it can take the device, and the
destination answers yes, or no with every reason (docs/migration.md §6).

What a destination checks at the load -- the device type, the versions of the vmstate
sections, the configuration fingerprint, the device's own checks (a backend file it cannot
reach, a namespace it could not build) -- would otherwise refuse the state only after the
source quiesced, inside the downtime, and after a pre-copy had streamed the memory. The
pre-flight asks the same questions first, while the device runs (before the pre-copy
copies anything): a refusal costs one round trip, and the source raises
:class:`~pcidev.errors.MigrationBlockedError` with the destination's reasons, nothing
stopped. The load's checks stay the final guard: the source may change between the
pre-flight and the stop.

The device contributes through two methods of :class:`~pcidev.device.PciDevice`:
:meth:`~pcidev.device.PciDevice.migration_facts` on the source (msgpack-able facts beyond
the fingerprint) and :meth:`~pcidev.device.PciDevice.check_migration_facts` on the
destination (the reasons they give it).

Wire format (frames of :mod:`pcidev.migration.frames`, msgpack maps)::

    CHECK   16  {"protocol": 3, "device_type", "sections": {name: version}, "fingerprint": {...},
                 "facts": {...}, "features": [str], "boot_id"}
    VERDICT 17  {"protocol": 3, "ok": bool, "reasons": [str], "features": [str], "boot_id"}

CHECK is the source's first frame; a VERDICT that says ``ok`` lets the exchange go on as
before (MEMORY or OFFER), and names the features both sides may use from then on
(:data:`~pcidev.migration.frames.FEATURE_SYNC`: the pre-copy's SYNC round trips). A
destination from before the pre-flight does not know CHECK: it answers NACK and ends the
channel, and the source reports that it must migrate without the pre-flight
(``preflight=False``: the exchange of protocols 1 and 2, unchanged); a source from before
it never sends CHECK, and a destination takes its exchange as always.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from typing import Any

import attrs
import msgpack

from pcidev.device import PciDevice
from pcidev.errors import MigrationBlockedError, MigrationError, TransportError
from pcidev.migration.frames import (
    CHECK,
    FEATURE_SYNC,
    NACK,
    PROTOCOL_PREFLIGHT,
    VERDICT,
    boot_id,
    frame_meta,
    frame_name,
    peer_data,
    recv_frame,
    send_frame,
    send_meta,
)
from pcidev.migration.snapshot import vmstate_descriptions, vmstate_fingerprint
from pcidev.transport.fdpass import close_fds
from pcidev.vmstate import description_of, fingerprint_differences

__all__ = ["FEATURES", "MAX_REASONS", "Verdict", "request", "ask", "problems", "answer"]

#: the features this side offers (and uses when the peer names them too)
FEATURES = (FEATURE_SYNC,)
#: the most reasons a VERDICT carries (the rest are counted in the last one)
MAX_REASONS = 32
#: the longest reason a VERDICT carries (characters)
MAX_REASON = 1000


@attrs.frozen
class Verdict:
    """The destination's answer to the pre-flight.

    :ivar ok: it can take the device.
    :ivar reasons: why not (empty when ``ok``).
    :ivar features: the features both sides use from now on (offered by both).
    """

    ok: bool
    reasons: tuple[str, ...] = ()
    features: frozenset[str] = frozenset()


def request(device: PciDevice) -> dict[str, Any]:
    """The CHECK a source sends for ``device`` (it may run meanwhile).

    :param device: the source device.
    :returns: the frame's map.
    :raises MigrationBlockedError: the device's :meth:`~pcidev.device.PciDevice.migration_facts`
        failed or is not a map.
    """
    try:
        facts = device.migration_facts()
    except Exception as exc:
        raise MigrationBlockedError([f"migration_facts() failed: {type(exc).__name__}: {exc}"]) from exc
    if not isinstance(facts, dict):
        raise MigrationBlockedError([f"migration_facts() returned {type(facts).__name__}, not a dict"])
    sections = {description_of(cls).name: description_of(cls).version for cls in vmstate_descriptions(device)}
    return {"protocol": PROTOCOL_PREFLIGHT, "device_type": device.vmstate_device_type, "sections": sections,
            "fingerprint": vmstate_fingerprint(device), "facts": facts, "features": list(FEATURES),
            "boot_id": boot_id()}


def ask(device: PciDevice, sock: socket.socket, *, timeout: float) -> Verdict:
    """The source's side: send CHECK on ``sock`` and wait for the VERDICT. Nothing is stopped.

    :param device: the running source device.
    :param sock: the connected migration channel (nothing sent on it yet).
    :param timeout: seconds for the send and for the answer.
    :returns: the verdict, always ``ok`` (a refusal raises).
    :raises MigrationBlockedError: the destination refused, with all its reasons (or the
        device's facts could not be gathered).
    :raises MigrationError: no verdict: the destination went away, timed out, answered
        garbage, or does not know the pre-flight (a destination from before it NACKs
        CHECK: migrate with ``preflight=False``); the device keeps running on the source.
    """
    try:
        body = msgpack.packb(request(device), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MigrationBlockedError([f"migration_facts() is not msgpack-able: {exc}"]) from exc
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        try:
            send_frame(sock, CHECK, body, deadline=deadline)
        except TransportError:
            pass  # a destination that refused at once and closed: its NACK may wait unread
        kind, reply, stray = recv_frame(sock, deadline=deadline)
        close_fds(stray)
    except (TransportError, OSError) as exc:
        raise MigrationError(f"no answer to the pre-flight ({exc}); the device keeps running on the source") \
            from exc
    if kind == NACK:
        try:
            meta = frame_meta(NACK, reply, {"error": str, "message": str})
            why = f"{meta['error']}: {meta['message']}"
        except TransportError as exc:
            why = str(exc)
        raise MigrationError(f"the destination does not take the pre-flight ({why}): a destination from before "
                             "it must be migrated to with preflight=False; the device keeps running on the source")
    if kind != VERDICT:
        raise MigrationError(f"the destination answered the pre-flight with {frame_name(kind)}; "
                             "the device keeps running on the source")
    try:
        with peer_data("VERDICT"):
            verdict = _verdict(reply)
    except TransportError as exc:
        raise MigrationError(f"{exc}; the device keeps running on the source") from exc
    if not verdict.ok:
        raise MigrationBlockedError([f"the destination refuses: {r}" for r in verdict.reasons])
    return verdict


def _verdict(body: bytes) -> Verdict:
    meta = frame_meta(VERDICT, body, {"protocol": int, "ok": bool, "reasons": list, "features": list})
    reasons = meta["reasons"]
    if meta["protocol"] < PROTOCOL_PREFLIGHT or len(reasons) > MAX_REASONS:
        raise TransportError(f"migration channel: VERDICT of protocol {meta['protocol']} with {len(reasons)} reasons")
    if not all(isinstance(r, str) and 0 < len(r) <= MAX_REASON for r in reasons):
        raise TransportError("migration channel: a VERDICT reason is not a non-empty string")
    if meta["ok"] == bool(reasons):
        raise TransportError("migration channel: VERDICT " + ("says ok and gives reasons" if reasons
                                                              else "refuses without a reason"))
    features = frozenset(f for f in meta["features"] if isinstance(f, str)) & frozenset(FEATURES)
    return Verdict(ok=meta["ok"], reasons=tuple(reasons), features=features)


# ------------------------------------------------------------------- destination
def problems(device: PciDevice, meta: Mapping[str, Any]) -> list[str]:
    """Every reason why ``device`` cannot take the state the CHECK ``meta`` describes
    (empty: it can). Nothing is changed.

    :param device: the destination device (fresh, or quiesced).
    :param meta: the CHECK's map, its top-level fields checked (:func:`answer`).
    :raises TransportError: a malformed field (the sections, or facts the device's
        :meth:`~pcidev.device.PciDevice.check_migration_facts` cannot read).
    """
    if meta["device_type"] != device.vmstate_device_type:
        return [f"the source is a device of type {str(meta['device_type'])[:64]!r}, this one is "
                f"{device.vmstate_device_type!r}"]
    out = []
    local = {description_of(cls).name: description_of(cls) for cls in vmstate_descriptions(device)}
    sections = meta["sections"]
    for name, version in sections.items():
        if not isinstance(name, str) or type(version) is not int:
            raise TransportError("migration channel: CHECK sections is not a map of names to versions")
        desc = local.get(name)
        if desc is None:
            out.append(f"the source's state has section {name[:64]!r}, which this device does not load")
        elif version > desc.version:
            out.append(f"section {name!r} version {version} is newer than this device loads ({desc.version})")
        elif version < desc.min_version:
            out.append(f"section {name!r} version {version} is older than this device loads "
                       f"(from {desc.min_version})")
    out += [f"the source's state has no section {name!r}" for name in local if name not in sections]
    with peer_data("CHECK fingerprint"):
        out += [f"configuration: {d}" for d in fingerprint_differences(meta["fingerprint"],
                                                                        vmstate_fingerprint(device))]
    with peer_data("CHECK facts"):
        try:
            reasons = device.check_migration_facts(meta["facts"])
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeError):
            raise
        except Exception as exc:  # the device's check failed on facts it could read: that refuses too
            reasons = [f"check_migration_facts() failed: {type(exc).__name__}: {exc}"]
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        reasons = [f"check_migration_facts() returned {type(reasons).__name__}, not a list of str"]
    return out + reasons


def answer(device: PciDevice, sock: socket.socket, body: bytes, *, deadline: float | None = None) -> Verdict:
    """The destination's side: check the CHECK ``body`` and send the VERDICT.

    :param device: the destination device.
    :param sock: the migration channel.
    :param body: the CHECK frame's body.
    :param deadline: ``CLOCK_MONOTONIC`` time by which the VERDICT must have gone out (a
        source that stops reading cannot hold the destination longer; None: the socket's
        timeout per send).
    :returns: the verdict sent (``ok``: the exchange goes on with the negotiated features).
    :raises TransportError: a malformed CHECK (nothing was sent: the caller NACKs), or the
        VERDICT could not be sent.
    :raises MigrationBlockedError: the device cannot take the state: the VERDICT with every
        reason went out (the source keeps its device running).
    """
    with peer_data("CHECK"):
        meta = frame_meta(CHECK, body, {"protocol": int, "device_type": str, "sections": dict,
                                        "fingerprint": dict, "facts": dict, "features": list, "boot_id": str})
        if meta["protocol"] < PROTOCOL_PREFLIGHT:
            raise TransportError(f"migration channel: CHECK of protocol {meta['protocol']} "
                                 f"(from {PROTOCOL_PREFLIGHT})")
        reasons = problems(device, meta)
        offered = frozenset(f for f in meta["features"] if isinstance(f, str))
    if len(reasons) > MAX_REASONS:
        reasons = [*reasons[:MAX_REASONS - 1], f"and {len(reasons) - MAX_REASONS + 1} more reasons"]
    reasons = [r[:MAX_REASON] or "(no reason given)" for r in reasons]
    features = offered & frozenset(FEATURES) if not reasons else frozenset()
    send_meta(sock, VERDICT, {"protocol": PROTOCOL_PREFLIGHT, "ok": not reasons, "reasons": reasons,
                              "features": sorted(features), "boot_id": boot_id()}, deadline=deadline)
    if reasons:
        raise MigrationBlockedError([f"refused in the pre-flight: {r}" for r in reasons])
    return Verdict(ok=True, features=features)
