"""The pre-flight of the migration channel (pcidev.migration.preflight): a destination that
cannot take the device -- another device type, section versions it does not load, another
configuration, the device's own reasons -- refuses with every reason before the source
stops anything (MigrationBlockedError; the source never quiesced, its data verified); a
malformed CHECK gets a typed NACK, a malformed VERDICT fails the source cleanly, never a
crash or a hang; a peer from before the pre-flight still migrates (preflight=False one
way, a CHECK-less exchange the other); in two phases the pre-flight comes before the
pre-copy copies anything; and the pre-copy's SYNC round trips make its figures count the
bytes the destination applied."""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
from typing import Any

import msgpack
import pytest
from precopy_device import Incoming, PrecopyDev, page_crcs, tcp_pair

from pcidev.devices.edu import EduDevice
from pcidev.errors import MigrationBlockedError, MigrationError, TransportError
from pcidev.migration import channel as channel_module
from pcidev.migration import migrate_in, migrate_out
from pcidev.migration.frames import (
    CHECK,
    MAGIC,
    MEMORY,
    NACK,
    OFFER,
    PROTOCOL_PREFLIGHT,
    SYNC,
    VERDICT,
    frame_name,
    recv_frame,
    send_meta,
)
from pcidev.migration.precopy import Precopy, StagedMemory
from pcidev.migration.preflight import problems, request

HDR = struct.Struct("<8sHHI")
MiB = 1 << 20


def _pair(family: str) -> tuple[socket.socket, socket.socket]:
    return socket.socketpair() if family == "unix" else tcp_pair()


class FactsDev(PrecopyDev):
    """A PrecopyDev whose facts name a file the destination must see (two reasons when
    it does not: the file, and a word that must match)."""

    def __init__(self, size: int = MiB, *, path: str = "", word: str = "same", fail: bool = False):
        self.path, self.word, self.fail = path, word, fail
        self.quiesces = 0
        super().__init__(size)

    def migration_facts(self) -> dict[str, Any]:
        return {"file": self.path, "word": self.word}

    def check_migration_facts(self, facts: dict[str, Any]) -> list[str]:
        if self.fail:
            raise RuntimeError("the check broke")
        path, word = facts["file"], facts["word"]
        if not isinstance(path, str) or not isinstance(word, str):
            raise ValueError("facts of the wrong type")
        out = []
        if path and not os.path.exists(path):
            out.append(f"{path} cannot be reached here")
        if word != self.word:
            out.append(f"the word is {word!r}, here {self.word!r}")
        return out

    def on_quiesce(self) -> None:
        self.quiesces += 1


def _source(**kw: Any) -> FactsDev:
    src = FactsDev(**kw)
    src.realize()
    src.ram.mem[:MiB // 2] = os.urandom(MiB // 2)
    src.regs["X"].value = 7
    return src


def _untouched(src: FactsDev, crcs: list[int]) -> None:
    """Nothing stopped, nothing changed, and the device serves on."""
    assert src.quiesces == 0 and not src.quiesced and not src.migrated_out and src.owns_state
    assert page_crcs(src.ram) == crcs and src.regs["X"].value == 7
    assert not src.ram.dirty.tracking
    src.bar_write(2, 0, 8, 0x1234, check_decode=False)  # it serves on
    assert int.from_bytes(src.ram.mem[:8], "little") == 0x1234


# ------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("family", ["unix", "tcp"])
def test_every_reason_is_reported_before_anything_stops(tmp_path, family):
    (tmp_path / "here").write_text("x")
    src = _source(path=str(tmp_path / "gone"), word="src")
    dst = FactsDev(2 * MiB, path=str(tmp_path / "here"), word="dst")  # another size: the fingerprint
    crcs = page_crcs(src.ram)
    try:
        with Incoming(dst, _pair(family)) as inc:
            with pytest.raises(MigrationBlockedError) as info:
                migrate_out(src, inc.sock, timeout=5)
        reasons = info.value.reasons
        assert any("configuration: size: stream has 1048576, this device has 2097152" in r for r in reasons), reasons
        assert any(f"{tmp_path}/gone cannot be reached here" in r for r in reasons), reasons
        assert any("the word is 'src', here 'dst'" in r for r in reasons), reasons
        assert all(r.startswith("the destination refuses: ") for r in reasons)
        assert isinstance(inc.error, MigrationBlockedError) and len(inc.error.reasons) == len(reasons) >= 4
        assert inc.trace == ["CHECK", "VERDICT"]  # nothing after the pre-flight
        _untouched(src, crcs)
        # and to a destination that can take it, the migration goes through
        (tmp_path / "gone").write_text("x")
        ok = FactsDev(path=str(tmp_path / "gone"), word="src")
        with Incoming(ok, _pair(family)) as inc:
            src.ram.mem[:8] = b"lastword"
            result = migrate_out(src, inc.sock, timeout=5)
        assert inc.error is None and src.migrated_out
        assert page_crcs(ok.ram) == page_crcs(src.ram) and ok.regs["X"].value == 7
        assert (result.precopy is not None) == (family == "tcp")
        inc.result.resources.close()
        ok.close()
    finally:
        src.close()
        dst.close()


def test_another_device_type_is_one_reason():
    src = EduDevice()
    src.realize()
    a, b = socket.socketpair()
    got: dict[str, BaseException] = {}

    def destination() -> None:
        try:
            migrate_in(PrecopyDev(), b, timeout=5)
        except BaseException as exc:
            got["error"] = exc

    t = threading.Thread(target=destination, daemon=True)
    t.start()
    try:
        with pytest.raises(MigrationBlockedError) as info:
            migrate_out(src, a, timeout=5)
        t.join(5)
        assert info.value.reasons == ["the destination refuses: the source is a device of type 'edu', this one is "
                                      "'test-precopy'"]
        assert not src.quiesced and src.owns_state
    finally:
        a.close()
        b.close()
        src.close()


def test_section_versions_and_missing_sections_are_reasons():
    dev = PrecopyDev()
    try:
        meta = request(dev)
        assert problems(dev, meta) == []
        newer = {**meta, "sections": {**meta["sections"], "test/precopy-device": 9}}
        assert problems(dev, newer) == ["section 'test/precopy-device' version 9 is newer than this device loads (1)"]
        older = {**meta, "sections": {**meta["sections"], "test/precopy-device": 0}}
        assert "is older than this device loads (from 1)" in problems(dev, older)[0]
        extra = {**meta, "sections": {**meta["sections"], "other/thing": 1}}
        assert problems(dev, extra) == ["the source's state has section 'other/thing', which this device does not load"]
        fewer = {**meta, "sections": {"pcidev/function": meta["sections"]["pcidev/function"]}}
        assert problems(dev, fewer) == ["the source's state has no section 'test/precopy-device'"]
    finally:
        dev.close()


# ------------------------------------------------------------------ malformed frames
def _check(**over: Any) -> bytes:
    dev = FactsDev()
    try:
        meta = {**request(dev), **over}
    finally:
        dev.close()
    return msgpack.packb(meta, use_bin_type=True)


BAD_CHECKS = [
    ("not-msgpack", b"\xc1\xc1", "CHECK body is not msgpack"),
    ("not-a-map", msgpack.packb([1, 2]), "CHECK body is not a map"),
    ("no-fingerprint", _check(fingerprint=None), "field 'fingerprint' missing or of the wrong type"),
    ("protocol-2", _check(protocol=2), "CHECK of protocol 2"),
    ("protocol-string", _check(protocol="3"), "field 'protocol' missing"),
    ("sections-list", _check(sections=[1]), "field 'sections' missing"),
    ("section-version-string", _check(sections={"test/precopy-device": "1"}), "not a map of names to versions"),
    ("facts-of-the-wrong-type", _check(facts={"file": 5, "word": "same"}), "malformed CHECK facts (ValueError"),
    ("facts-missing", _check(facts={}), "malformed CHECK facts (KeyError"),
    ("fingerprint-value-garbage", _check(fingerprint={"size": {"a": [b"x", None, 1.5]}}), None),
]


@pytest.mark.parametrize("body, message", [pytest.param(b, m, id=i) for i, b, m in BAD_CHECKS])
def test_a_malformed_check_gets_a_typed_nack(body, message):
    dst = FactsDev()
    a, b = socket.socketpair()
    try:
        a.sendall(HDR.pack(MAGIC, CHECK, 0, len(body)) + body)
        a.settimeout(5)
        if message is None:  # well-formed, only wrong: refused in a VERDICT
            with pytest.raises(MigrationBlockedError, match="configuration: size"):
                migrate_in(dst, b, timeout=2)
            kind, reply, _ = recv_frame(a)
            assert kind == VERDICT and msgpack.unpackb(reply)["ok"] is False
            return
        with pytest.raises(TransportError, match=re.escape(message)):
            migrate_in(dst, b, timeout=2)
        kind, reply, _ = recv_frame(a)
        assert kind == NACK, frame_name(kind)
        nack = msgpack.unpackb(reply)
        assert nack["error"] == "TransportError" and message in nack["message"]
    finally:
        a.close()
        b.close()
        dst.close()


def test_a_check_the_device_cannot_judge_is_refused_with_a_reason():
    """check_migration_facts() raising on facts it could read refuses (a reason), never a crash."""
    src, dst = _source(), FactsDev(fail=True)
    crcs = page_crcs(src.ram)
    try:
        with Incoming(dst, socket.socketpair()) as inc:
            with pytest.raises(MigrationBlockedError, match="check_migration_facts\\(\\) failed: RuntimeError: "
                                                            "the check broke"):
                migrate_out(src, inc.sock, timeout=5)
        _untouched(src, crcs)
    finally:
        src.close()
        dst.close()


def _verdict_peer(sock: socket.socket, reply: bytes | None) -> None:
    """Read the CHECK, answer ``reply`` (raw bytes, or None: say nothing), wait for the end."""
    try:
        kind, _body, _ = recv_frame(sock)
        assert kind == CHECK
        if reply is not None:
            sock.sendall(reply)
        sock.settimeout(10)
        while sock.recv(65536):
            pass
    except (OSError, TransportError):
        pass


def _frame(kind: int, meta: Any) -> bytes:
    body = msgpack.packb(meta)
    return HDR.pack(MAGIC, kind, 0, len(body)) + body


GOOD = {"protocol": PROTOCOL_PREFLIGHT, "ok": True, "reasons": [], "features": [], "boot_id": ""}
BAD_VERDICTS = [
    ("ok-with-reasons", _frame(VERDICT, {**GOOD, "reasons": ["but"]}), "says ok and gives reasons"),
    ("no-without-reason", _frame(VERDICT, {**GOOD, "ok": False}), "refuses without a reason"),
    ("reason-not-str", _frame(VERDICT, {**GOOD, "ok": False, "reasons": [5]}), "is not a non-empty string"),
    ("ok-string", _frame(VERDICT, {**GOOD, "ok": "yes"}), "field 'ok' missing or of the wrong type"),
    ("old-protocol", _frame(VERDICT, {**GOOD, "protocol": 1}), "VERDICT of protocol 1"),
    ("garbage", b"not a frame at all, not at all", "bad magic"),
    ("another-frame", _frame(OFFER, {}), "answered the pre-flight with OFFER"),
    ("half-a-frame", _frame(VERDICT, GOOD)[:20], "no answer to the pre-flight"),
    ("silence", None, "no answer to the pre-flight"),
]


@pytest.mark.parametrize("reply, message", [pytest.param(r, m, id=i) for i, r, m in BAD_VERDICTS])
def test_a_malformed_verdict_fails_the_source_with_nothing_stopped(reply, message):
    src = _source()
    crcs = page_crcs(src.ram)
    a, b = socket.socketpair()
    t = threading.Thread(target=_verdict_peer, args=(b, reply), daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(MigrationError, match=message) as info:
            migrate_out(src, a, timeout=1.0)
        assert time.monotonic() - t0 < 5  # (the timeout ends a silent peer)
        assert not isinstance(info.value, MigrationBlockedError)
        assert "keeps running on the source" in str(info.value)
        _untouched(src, crcs)
    finally:
        a.close()
        t.join(5)
        b.close()
        src.close()


# ------------------------------------------------------------------ older peers
def _old_destination(sock: socket.socket) -> None:
    """A destination from before the pre-flight, as it behaves on a CHECK: the frame type is
    unknown to it, so it NACKs with its TransportError and ends the channel."""
    head = sock.recv(HDR.size)
    _magic, kind, flags, _length = HDR.unpack(head)
    send_meta(sock, NACK, {"error": "TransportError",
                           "message": f"migration channel: unknown frame type {kind} / flags {flags:#x}"})
    sock.close()


@pytest.mark.parametrize("family", ["unix", "tcp"])
def test_an_older_destination_is_told_apart_and_migrates_without_the_preflight(family):
    src = _source()
    crcs = page_crcs(src.ram)
    try:
        a, b = _pair(family)
        t = threading.Thread(target=_old_destination, args=(b,), daemon=True)
        t.start()
        with pytest.raises(MigrationError, match="does not take the pre-flight .*unknown frame type 16.*"
                                                 "preflight=False") as info:
            migrate_out(src, a, timeout=5)
        t.join(5)
        a.close()
        assert not isinstance(info.value, MigrationBlockedError)
        _untouched(src, crcs)
        # without the pre-flight the exchange is the one such a destination speaks: it migrates
        # (the destination here is a new one; that it takes a CHECK-less source is the point too)
        dst = FactsDev()
        with Incoming(dst, _pair(family)) as inc:
            result = migrate_out(src, inc.sock, timeout=5, preflight=False)
        assert inc.error is None and "CHECK" not in inc.trace and src.migrated_out
        assert inc.trace[0] == ("MEMORY" if family == "tcp" else "OFFER")
        assert page_crcs(dst.ram) == page_crcs(src.ram)
        if family == "tcp":
            assert result.precopy is not None and not result.precopy.synced
        inc.result.resources.close()
        dst.close()
    finally:
        src.close()


def test_a_precopy_without_the_preflight_runs_as_before_and_counts_what_the_socket_took():
    src, dst = _source(), FactsDev()
    try:
        with Incoming(dst, tcp_pair()) as inc:
            p = Precopy(src, inc.sock, timeout=10, preflight=False)
            p.run()
            result = migrate_out(src, inc.sock, precopy=p, timeout=10, preflight=False)
        assert "CHECK" not in inc.trace and "SYNC" not in inc.trace
        assert result.precopy is not None and result.precopy.iterations >= 1 and not result.precopy.synced
        assert page_crcs(dst.ram) == page_crcs(src.ram)
        inc.result.resources.close()
    finally:
        src.close()
        dst.close()


# ------------------------------------------------------------------ two phases
def test_a_refused_preflight_costs_the_precopy_nothing():
    """In two phases the pre-flight is the pre-copy's first exchange: refused, no byte of
    memory was sent, no tracking started, nothing stopped."""
    src, dst = _source(word="src"), FactsDev(word="dst")
    crcs = page_crcs(src.ram)
    try:
        with Incoming(dst, tcp_pair()) as inc:
            p = Precopy(src, inc.sock, timeout=5)
            with pytest.raises(MigrationBlockedError, match="the word is 'src', here 'dst'"):
                p.run()
            assert p.failed and p.report.iterations == 0 and p.report.bytes_per_iteration == ()
            # the migration after it is refused as blocked too (nothing more goes out)
            with pytest.raises(MigrationBlockedError, match="its pre-copy failed"):
                migrate_out(src, inc.sock, precopy=p, timeout=5)
        assert inc.trace == ["CHECK", "VERDICT"]
        _untouched(src, crcs)
    finally:
        src.close()
        dst.close()


class SlowStaging(StagedMemory):
    """A destination whose staging applies slowly (``delay`` seconds per CHUNK)."""

    delay = 0.0

    def apply(self, body: bytes) -> None:
        time.sleep(self.delay)
        super().apply(body)


def test_the_precopy_counts_the_bytes_the_destination_applied(monkeypatch):
    """A destination that applies 1 MiB chunks at most every 20 ms (50 MiB/s), behind socket
    buffers of 4 MiB: with SYNC each pass ends when the destination applied it, so the
    bandwidth is at most the rate of applying (without it, the socket's acceptance of the
    first 4 MiB would count as sent at once), and every SYNCED says everything arrived."""
    SlowStaging.delay = 0.02
    monkeypatch.setattr(channel_module, "StagedMemory", SlowStaging)
    src, dst = FactsDev(8 * MiB), FactsDev(8 * MiB)
    try:
        src.realize()
        src.ram.mem[:] = os.urandom(8 * MiB)
        with Incoming(dst, tcp_pair(buffers=4 << 20)) as inc:
            p = Precopy(src, inc.sock, timeout=30, max_iterations=3)
            p.run()
            rep = p.report
            result = migrate_out(src, inc.sock, precopy=p, timeout=30)
        assert rep.synced and result.precopy is not None and result.precopy.synced
        assert rep.bytes_per_iteration[0] == 8 * MiB
        assert 0 < rep.bandwidth <= 8 * MiB / (8 * SlowStaging.delay) * 1.01, rep
        assert inc.trace.count("SYNC") == rep.iterations == inc.trace.count("SYNCED")
        assert inc.trace.index("CHECK") == 0 and inc.trace.index("VERDICT") == 1 and inc.trace[2] == "MEMORY"
        assert page_crcs(dst.ram) == page_crcs(src.ram)
        inc.result.resources.close()
    finally:
        src.close()
        dst.close()


def test_a_sync_before_the_preflight_negotiated_it_is_garbage():
    dst = FactsDev()
    a, b = tcp_pair()
    try:
        send_meta(a, MEMORY, {"protocol": 2, "boot_id": "", "sources": [{"name": "bar2", "size": MiB}]})
        send_meta(a, SYNC, {"seq": 1, "sent": 0})
        with pytest.raises(TransportError, match="expected OFFER, got SYNC"):
            migrate_in(dst, b, timeout=2)
        a.settimeout(5)
        kind, _reply, _ = recv_frame(a)
        assert kind == NACK
    finally:
        a.close()
        b.close()
        dst.close()
