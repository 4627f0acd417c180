"""Log pages and the counters behind them.

* :class:`ErrorLog` (LID 01h): one 64-byte Error Information entry per failed
  command (and per invalid doorbell write), newest first, with a lifetime error
  count that survives restarts;
* :class:`SmartCounters` (LID 02h): data units, commands, busy time, power
  cycles, power-on hours, unsafe shutdowns, media errors, temperatures;
* :class:`FirmwareSlots` (LID 03h): slot contents, the active slot and the
  slot activated at the next reset;
* :class:`ChangedNamespaces` (LID 04h);
* :func:`effects_log` (LID 05h): Commands Supported and Effects;
* :func:`supported_logs_page` (LID 00h): Supported Log Pages;
* :func:`ocp_smart_page` (LID C0h, with ``ocp=on``): the OCP Datacenter NVMe SSD
  specification's SMART / Health Information Extended log, from :class:`SmartCounters`.

Each component exposes ``snapshot()`` and ``restore(state)`` of a frozen state class
defined beside it (:class:`ErrorLogState`, :class:`SmartState`,
:class:`FirmwareState`, :class:`ChangedNsState`); the controller's migration
(:mod:`pcidev_nvme.migration`) and its state file (:mod:`pcidev_nvme.persist`) both
store those.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from collections.abc import Iterable

import attrs
import crc32c

from pcidev.vmstate import U8, U16, U32, U64, Str, VarArray, vmstate

__all__ = ["ErrorLog", "ErrorLogState", "ERROR_COUNT_MAX", "next_error_count", "error_log_problem",
           "SmartCounters", "SmartState", "FirmwareSlots", "FirmwareState", "FwChunk",
           "firmware_image", "parse_firmware_image", "ChangedNamespaces", "ChangedNsState", "effects_log",
           "LID_ERROR", "LID_SMART", "LID_FW_SLOT", "LID_CHANGED_NS", "LID_EFFECTS", "CMD_EFFECTS",
           "LID_SUPPORTED", "LID_MI_EFFECTS", "LID_OCP_SMART", "OCP_SMART_GUID", "ocp_smart_page",
           "supported_logs_page"]

log = logging.getLogger(__name__)

LID_ERROR = 0x01
LID_SMART = 0x02
LID_FW_SLOT = 0x03
LID_CHANGED_NS = 0x04
LID_EFFECTS = 0x05
LID_SUPPORTED = 0x00
#: NVMe-MI Commands Supported and Effects (no NVMe-MI commands: all zero)
LID_MI_EFFECTS = 0x13
#: OCP Datacenter NVMe SSD: SMART / Health Information Extended ("SMART cloud attributes")
LID_OCP_SMART = 0xC0

_ERR_ENTRY = struct.Struct("<QHHHHQIBB2xQH22x")
assert _ERR_ENTRY.size == 64

#: the largest Error Count: the 64-bit count rolls over from this value to 1 (never 0,
#: which marks an invalid entry), as the Error Information log page's Error Count field says
ERROR_COUNT_MAX = 2**64 - 1


def next_error_count(count: int) -> int:
    """The Error Count after ``count``: ``count + 1``, rolling over from 2**64-1 to 1."""
    return 1 if count >= ERROR_COUNT_MAX else count + 1


def error_log_problem(count: int, entries: Iterable[bytes], capacity: int) -> tuple[str, str] | None:
    """Why a loaded Error Information log (lifetime ``count``, ``entries`` newest first)
    is one no live log could be in, as ``(reason, field)``, or None.

    A live log's newest entry carries the lifetime count, each older one the count
    before it (rolling over 2**64-1 -> 1), no entry has count 0, and it keeps at most
    ``capacity`` entries.
    """
    entries = list(entries)
    if len(entries) > capacity:
        return f"{len(entries)} error entries, the log keeps {capacity}", "error_entries"
    if entries and count == 0:
        return "error entries with an error count of 0", "error_count"
    want = count
    for j, raw in enumerate(entries):
        got = _ERR_ENTRY.unpack_from(raw)[0]
        if got != want:
            return f"entry {j} has error count {got}, expected {want}", f"error_entries[{j}]"
        want = ERROR_COUNT_MAX if want == 1 else want - 1
    return None


@attrs.frozen
class ErrorLogState:
    """The lifetime error count and the kept 64-byte entries, newest first."""

    count: int
    entries: tuple[bytes, ...] = ()


class ErrorLog:
    """The Error Information log: a ring of the most recent entries.

    :param entries: how many entries are kept (ELPE + 1).
    :param count: lifetime error count to continue from (persisted).
    """

    def __init__(self, entries: int, count: int = 0) -> None:
        self.capacity = entries
        self.count = count
        self._ring: list[bytes] = []
        self._lock = threading.Lock()

    def add(self, *, sqid: int, cid: int, status_field: int, phase: int = 0, param_offset: int | None = None,
            param_bit: int = 0, lba: int = 0, nsid: int = 0, csi: int = 0) -> int:
        """Record an error; returns its error count (never 0; increasing, rolling over
        from 2**64-1 to 1).

        :param status_field: the 15-bit status field the command completed with.
        :param param_offset: byte offset in the SQE of the offending field, or None.
        """
        pel = 0xFFFF if param_offset is None else ((param_offset & 0xFF) | ((param_bit & 7) << 8))
        with self._lock:
            self.count = next_error_count(self.count)
            entry = _ERR_ENTRY.pack(self.count, sqid & 0xFFFF, cid & 0xFFFF,
                                    ((status_field & 0x7FFF) << 1) | (phase & 1), pel,
                                    lba & (2**64 - 1), nsid & 0xFFFFFFFF, 0, 0, csi & (2**64 - 1), 0)
            self._ring.insert(0, entry)
            del self._ring[self.capacity:]
            return self.count

    def snapshot(self) -> ErrorLogState:
        with self._lock:
            return ErrorLogState(count=self.count, entries=tuple(self._ring))

    def restore(self, state: ErrorLogState) -> None:
        """Take the count and the entries (at most :attr:`capacity` of them are kept)."""
        with self._lock:
            self.count = state.count
            self._ring = [bytes(e) for e in state.entries[:self.capacity]]

    def page(self) -> bytes:
        """The log page: ``capacity`` entries, newest first, unused entries zero."""
        with self._lock:
            data = b"".join(self._ring)
        return data.ljust(64 * self.capacity, b"\0")

    def entries(self) -> list[dict[str, int]]:
        """The kept entries decoded (newest first), for tests and tools."""
        with self._lock:
            ring = list(self._ring)
        return [decode_error_entry(e) for e in ring]


def decode_error_entry(raw: bytes) -> dict[str, int]:
    """Decode one 64-byte Error Information entry into a dict."""
    (count, sqid, cid, sf, pel, lba, nsid, vsia, trtype, csi, ttsi) = _ERR_ENTRY.unpack_from(raw)
    return {"error_count": count, "sqid": sqid, "cid": cid, "status": sf >> 1, "phase": sf & 1,
            "param_error_location": pel, "lba": lba, "nsid": nsid, "csi": csi}


@vmstate("nvme/smart")
@attrs.frozen
class SmartState:
    """SMART counters; times in microseconds."""

    bytes_read: U64
    bytes_written: U64
    host_read_commands: U64
    host_write_commands: U64
    busy_us: U64
    power_cycles: U64
    power_on_us: U64
    unsafe_shutdowns: U64
    media_errors: U64
    warning_temp_us: U64
    critical_temp_us: U64
    temperature: U16
    injected_warning: U8
    reported_warning: U8


def _us(seconds: float) -> int:
    return max(0, int(seconds * 1e6))


class SmartCounters:
    """SMART / Health counters (thread-safe: the data path updates them from any thread),
    the composite temperature and the critical warning bits injected and reported.

    Data units are kept as bytes and reported, as the spec says, in thousands of
    512-byte units rounded up.

    :param temperature: composite temperature in kelvin at power-on.
    """

    def __init__(self, temperature: int = 0) -> None:
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.bytes_written = 0
        self.host_read_commands = 0
        self.host_write_commands = 0
        self.busy_seconds = 0.0
        self.power_cycles = 0
        #: power-on time accumulated before this power-on
        self.power_on_seconds = 0.0
        self.unsafe_shutdowns = 0
        self.media_errors = 0
        self.warning_temp_seconds = 0.0
        self.critical_temp_seconds = 0.0
        self._powered_at = time.monotonic()
        self._busy_until = 0.0
        #: composite temperature (kelvin)
        self.temperature = temperature
        self._temp_since = time.monotonic()
        #: critical warning bits set by a test or tool
        self.injected_warning = 0
        #: critical warning bits reported by an AEN (reported again only after they clear)
        self.reported_warning = 0

    # -- data path ---------------------------------------------------------------------
    def record_read(self, nbytes: int) -> None:
        """Count one host read command transferring ``nbytes``."""
        with self._lock:
            self.host_read_commands += 1
            self.bytes_read += nbytes

    def record_write(self, nbytes: int) -> None:
        """Count one host write command transferring ``nbytes``."""
        with self._lock:
            self.host_write_commands += 1
            self.bytes_written += nbytes

    def record_io(self, reads: int, read_bytes: int, writes: int, written_bytes: int) -> None:
        """Count a batch of host commands at once (the I/O command set sums a doorbell
        batch and records it at its end).

        :param reads: read commands.
        :param read_bytes: bytes they transferred.
        :param writes: write commands.
        :param written_bytes: bytes they transferred.
        """
        with self._lock:
            self.host_read_commands += reads
            self.bytes_read += read_bytes
            self.host_write_commands += writes
            self.bytes_written += written_bytes

    def record_media_error(self) -> None:
        """Count one unrecovered data integrity error."""
        with self._lock:
            self.media_errors += 1

    def record_busy(self, start: float, end: float) -> None:
        """Add the part of ``[start, end]`` (monotonic seconds) not already counted as busy."""
        with self._lock:
            begin = start if start > self._busy_until else self._busy_until
            if end > begin:
                self.busy_seconds += end - begin
                self._busy_until = end

    # -- reported values ------------------------------------------------------------------
    @staticmethod
    def _units(nbytes: int) -> int:
        return math.ceil(math.ceil(nbytes / 512) / 1000)

    @property
    def data_units_read(self) -> int:
        """Thousands of 512-byte units read, rounded up."""
        return self._units(self.bytes_read)

    @property
    def data_units_written(self) -> int:
        """Thousands of 512-byte units written, rounded up."""
        return self._units(self.bytes_written)

    @property
    def power_on_total(self) -> float:
        """Seconds powered on, over all power cycles."""
        return self.power_on_seconds + (time.monotonic() - self._powered_at)

    @property
    def power_on_hours(self) -> int:
        return int(self.power_on_total // 3600)

    @property
    def busy_minutes(self) -> int:
        return int(self.busy_seconds // 60)

    # -- temperature ---------------------------------------------------------------------------
    def account_temperature(self, warning_temp: int, critical_temp: int) -> None:
        """Count the time since the last call above the warning or critical temperature."""
        now = time.monotonic()
        with self._lock:
            dt = now - self._temp_since
            self._temp_since = now
            if self.temperature >= critical_temp:
                self.critical_temp_seconds += dt
            elif self.temperature >= warning_temp:
                self.warning_temp_seconds += dt

    def set_temperature(self, kelvin: int) -> None:
        """Change the composite temperature (account the time before with
        :meth:`account_temperature` first)."""
        self.temperature = kelvin

    def inject_warning(self, bits: int) -> None:
        """Set the injected critical warning bits (0 spare, 2 reliability, 3 read-only, 4 backup)."""
        self.injected_warning = bits & 0x3D

    def report_warnings(self, current: int, enabled: int) -> int:
        """The critical warning bits to report now: set in ``current``, enabled, and not
        reported since they last cleared; they count as reported from now on."""
        with self._lock:
            self.reported_warning &= current
            new = current & ~self.reported_warning & enabled
            self.reported_warning |= new
            return new

    def clear_reported(self) -> None:
        """Controller reset: every warning still set is reported again."""
        self.reported_warning = 0

    # -- state ---------------------------------------------------------------------------------
    def snapshot(self) -> SmartState:
        """The counters now (the power-on time includes the current power cycle)."""
        with self._lock:
            return SmartState(
                bytes_read=self.bytes_read, bytes_written=self.bytes_written,
                host_read_commands=self.host_read_commands, host_write_commands=self.host_write_commands,
                busy_us=_us(self.busy_seconds), power_cycles=self.power_cycles,
                power_on_us=_us(self.power_on_total), unsafe_shutdowns=self.unsafe_shutdowns,
                media_errors=self.media_errors, warning_temp_us=_us(self.warning_temp_seconds),
                critical_temp_us=_us(self.critical_temp_seconds), temperature=self.temperature,
                injected_warning=self.injected_warning, reported_warning=self.reported_warning)

    def restore(self, state: SmartState) -> None:
        """Take every counter of ``state``; this power cycle starts now."""
        now = time.monotonic()
        with self._lock:
            self.bytes_read, self.bytes_written = state.bytes_read, state.bytes_written
            self.host_read_commands, self.host_write_commands = state.host_read_commands, state.host_write_commands
            self.busy_seconds = state.busy_us / 1e6
            self.power_cycles = state.power_cycles
            self.power_on_seconds = state.power_on_us / 1e6
            self._powered_at = now
            self.unsafe_shutdowns = state.unsafe_shutdowns
            self.media_errors = state.media_errors
            self.warning_temp_seconds = state.warning_temp_us / 1e6
            self.critical_temp_seconds = state.critical_temp_us / 1e6
            self.temperature = state.temperature
            self._temp_since = now
            self.injected_warning = state.injected_warning
            self.reported_warning = state.reported_warning

    def media_totals(self) -> tuple[int, int, int, int]:
        """(bytes written, bytes read, media errors, unsafe shutdowns), read together."""
        with self._lock:
            return self.bytes_written, self.bytes_read, self.media_errors, self.unsafe_shutdowns

    def power_on(self, *, unsafe: bool) -> None:
        """Count a power cycle (and an unsafe shutdown before it)."""
        with self._lock:
            self.power_cycles += 1
            if unsafe:
                self.unsafe_shutdowns += 1

    def page(self, *, critical_warning: int, temperature: int, spare: int = 100, spare_threshold: int = 10,
             percent_used: int = 0, error_entries: int = 0, eg_warning_summary: int = 0,
             io_counts: tuple[int, int, int, int] | None = None) -> bytes:
        """The 512-byte SMART / Health Information log page.

        :param eg_warning_summary: Endurance Group Critical Warning Summary (byte 6): the
            critical warnings of the endurance groups (:mod:`pcidev_nvme.endurance`).
        :param io_counts: (bytes read, bytes written, read commands, write commands) to
            report instead of these counters' (a namespace's log page); None: these.
        """
        buf = bytearray(512)
        buf[0] = critical_warning & 0xFF
        struct.pack_into("<H", buf, 1, temperature & 0xFFFF)
        buf[3] = spare
        buf[4] = spare_threshold
        buf[5] = min(percent_used, 255)
        buf[6] = eg_warning_summary & 0xFF

        def u128(off: int, v: int) -> None:
            v = min(int(v), 2**128 - 1)
            struct.pack_into("<QQ", buf, off, v & (2**64 - 1), v >> 64)

        with self._lock:
            if io_counts is None:
                io_counts = (self.bytes_read, self.bytes_written, self.host_read_commands, self.host_write_commands)
            u128(32, self._units(io_counts[0]))
            u128(48, self._units(io_counts[1]))
            u128(64, io_counts[2])
            u128(80, io_counts[3])
            u128(96, self.busy_minutes)
            u128(112, self.power_cycles)
            u128(144, self.unsafe_shutdowns)
            u128(160, self.media_errors)
            wt, ct = self.warning_temp_seconds, self.critical_temp_seconds
        u128(128, self.power_on_hours)
        u128(176, error_entries)
        struct.pack_into("<II", buf, 192, min(int(wt // 60), 2**32 - 1), min(int(ct // 60), 2**32 - 1))
        return bytes(buf)


@vmstate("nvme/fw-chunk")
@attrs.frozen
class FwChunk:
    """A piece of a firmware image being downloaded (``offset`` in dwords)."""

    offset: U32
    data: bytes


@vmstate("nvme/firmware")
@attrs.frozen
class FirmwareState:
    """Firmware slot contents, the active and next-reset slot, a partly downloaded image."""

    revisions: VarArray[Str[8], 7]
    active: U8
    next_reset: U8
    staged: VarArray[FwChunk, 4096] = ()


class FirmwareSlots:
    """Firmware slots 1..n (slot 1 read-only), the active slot and the next-reset slot.

    :param nslots: number of slots.
    :param initial: revision in slot 1.
    """

    def __init__(self, nslots: int, initial: str) -> None:
        self.nslots = nslots
        self.revisions: list[str] = [initial] + [""] * (nslots - 1)
        self.active = 1
        #: slot activated at the next controller reset, or 0
        self.next_reset = 0
        #: image accumulated by Firmware Image Download: dword offset -> bytes
        self.staged: dict[int, bytes] = {}

    def revision(self, slot: int | None = None) -> str:
        return self.revisions[(slot or self.active) - 1]

    def page(self) -> bytes:
        """The 512-byte Firmware Slot Information log page."""
        buf = bytearray(512)
        buf[0] = (self.active & 7) | ((self.next_reset & 7) << 4)
        for i, rev in enumerate(self.revisions):
            buf[8 + 8 * i: 16 + 8 * i] = rev.encode("ascii").ljust(8, b" ") if rev else bytes(8)
        return bytes(buf)

    # -- Firmware Image Download / Firmware Commit ----------------------------------------------
    def overlaps(self, start: int, end: int) -> bool:
        """Whether bytes ``start..end`` of the image overlap a piece downloaded earlier."""
        return any(o < end and start < o + len(piece) for o, piece in self.staged.items())

    def stage(self, start: int, data: bytes) -> None:
        """Keep a downloaded piece of the next image (``start`` in bytes)."""
        self.staged[start] = bytes(data)

    def take_staged_image(self) -> bytes | None:
        """The downloaded image (None if nothing or a gap); the pieces are dropped."""
        image = bytearray()
        ok = True
        for o in sorted(self.staged):
            if o != len(image):
                ok = False  # a gap
                break
            image += self.staged[o]
        self.staged.clear()
        return bytes(image) if ok and image else None

    def install(self, slot: int, revision: str) -> None:
        """Slot ``slot`` (2..n) holds ``revision`` from now on."""
        self.revisions[slot - 1] = revision

    def activate(self, slot: int, *, at_reset: bool) -> None:
        """Activate ``slot`` at the next controller reset, or now."""
        if at_reset:
            self.next_reset = slot
        else:
            self.active = slot
            self.next_reset = 0

    def activate_pending(self) -> bool:
        """At a controller reset: switch to the next-reset slot. Returns True if it changed."""
        if self.next_reset and self.revisions[self.next_reset - 1]:
            changed = self.next_reset != self.active
            self.active = self.next_reset
            self.next_reset = 0
            return changed
        self.next_reset = 0
        return False

    def snapshot(self) -> FirmwareState:
        return FirmwareState(revisions=tuple(self.revisions), active=self.active, next_reset=self.next_reset,
                             staged=tuple(FwChunk(o, bytes(d)) for o, d in sorted(self.staged.items())))

    def restore(self, state: FirmwareState) -> None:
        """Take a checked ``state`` (as many slots as this controller has)."""
        self.revisions = list(state.revisions)
        self.active = state.active
        self.next_reset = state.next_reset
        self.staged = {c.offset: bytes(c.data) for c in state.staged}


#: magic at the start of a firmware image this controller accepts
FW_MAGIC = b"PCIDEVFW"
_FW_HEAD = struct.Struct("<8s8sI")  # magic, revision, payload length; payload; crc32c of all before


def firmware_image(revision: str, payload: bytes = b"") -> bytes:
    """Build a firmware image the controller accepts.

    Layout: ``"PCIDEVFW"``, the 8-character revision (space padded), the payload
    length (u32), the payload, then the CRC-32C of everything before it (u32),
    padded with zeros to a multiple of 4 bytes.

    :param revision: 1..8 printable ASCII characters.
    :raises ValueError: for a bad revision.
    """
    rev = revision.encode("ascii")
    if not 1 <= len(rev) <= 8 or not revision.isprintable() or not revision.strip():
        raise ValueError(f"firmware revision {revision!r} must be 1..8 printable ASCII characters")
    body = _FW_HEAD.pack(FW_MAGIC, rev.ljust(8, b" "), len(payload)) + bytes(payload)
    image = body + struct.pack("<I", crc32c.crc32c(body))
    return image + bytes(-len(image) % 4)


def parse_firmware_image(image: bytes) -> str | None:
    """The revision of a valid image (see :func:`firmware_image`), or None if it is invalid."""
    if len(image) < _FW_HEAD.size + 4:
        return None
    magic, rev, plen = _FW_HEAD.unpack_from(image)
    end = _FW_HEAD.size + plen
    if magic != FW_MAGIC or end + 4 > len(image) or any(image[end + 4:]):
        return None
    (crc,) = struct.unpack_from("<I", image, end)
    if crc != crc32c.crc32c(image[:end]):
        return None
    try:
        text: str = rev.decode("ascii").rstrip(" ")
    except UnicodeDecodeError:
        return None
    if not text or not text.isprintable():
        return None
    return text


@attrs.frozen
class ChangedNsState:
    """The Changed Namespace List: NSIDs in order, or overflowed."""

    nsids: tuple[int, ...] = ()
    overflow: bool = False


class ChangedNamespaces:
    """The Changed Namespace List (up to 1024 NSIDs; more overflow to FFFFFFFFh)."""

    LIMIT = 1024

    def __init__(self) -> None:
        self._nsids: list[int] = []
        self._overflow = False
        self._lock = threading.Lock()
        self._added = 0  # changes reported since power-on (also those an overflow swallowed)

    def add(self, nsid: int) -> None:
        with self._lock:
            self._added += 1
            if self._overflow or nsid in self._nsids:
                return
            if len(self._nsids) >= self.LIMIT:
                self._overflow = True
                self._nsids = []
            else:
                self._nsids.append(nsid)
                self._nsids.sort()

    def page(self, clear: bool) -> bytes:
        """The log page (4096 bytes); ``clear`` empties the list at once."""
        page, token = self.read()
        if clear:
            self.clear(token)
        return page

    def read(self) -> tuple[bytes, tuple[tuple[int, ...], bool, int]]:
        """The log page and a token naming what it holds: :meth:`clear` with that token
        (once the page reached the host, RAE cleared) removes only what the host was given,
        so a namespace changed between the read and the clear stays for the next read."""
        with self._lock:
            ids = (0xFFFFFFFF,) if self._overflow else tuple(self._nsids)
            token = (ids, self._overflow, self._added)
        return struct.pack(f"<{len(ids)}I", *ids).ljust(4096, b"\0"), token

    def clear(self, token: tuple[tuple[int, ...], bool, int]) -> None:
        """Remove what the page read with ``token`` (:meth:`read`) listed."""
        ids, overflow, added = token
        with self._lock:
            if overflow:
                if self._added == added:  # (an overflowed list drops what is added meanwhile)
                    self._nsids, self._overflow = [], False
                return
            given = set(ids)
            self._nsids = [n for n in self._nsids if n not in given]

    def __len__(self) -> int:
        return len(self._nsids)

    def snapshot(self) -> ChangedNsState:
        with self._lock:
            return ChangedNsState(nsids=tuple(self._nsids), overflow=self._overflow)

    def restore(self, state: ChangedNsState) -> None:
        with self._lock:
            self._nsids = list(state.nsids)
            self._overflow = state.overflow


#: Commands Supported and Effects bits
CMD_EFFECTS = {"csupp": 1 << 0, "lbcc": 1 << 1, "ncc": 1 << 2, "nic": 1 << 3, "ccc": 1 << 4,
               "cse_ns": 1 << 16, "cse_all": 2 << 16}


def effects_log(admin: dict[int, int], io: dict[int, int]) -> bytes:
    """The 4096-byte Commands Supported and Effects page from opcode → effects maps."""
    buf = bytearray(4096)
    for opc, eff in admin.items():
        struct.pack_into("<I", buf, 4 * opc, eff | CMD_EFFECTS["csupp"])
    for opc, eff in io.items():
        struct.pack_into("<I", buf, 1024 + 4 * opc, eff | CMD_EFFECTS["csupp"])
    return bytes(buf)


def supported_logs_page(lids: Iterable[int]) -> bytes:
    """The Supported Log Pages log page (LID 00h): one LIDSUPP dword per log identifier,
    LSUPP (bit 0) set for each of ``lids``; IOS (index offsets) is never set."""
    page = bytearray(1024)
    for lid in lids:
        struct.pack_into("<I", page, 4 * lid, 1)
    return bytes(page)


#: Log Page GUID of the OCP SMART / Health Information Extended log (bytes 511:496),
#: AFD514C97C6F4F9CA4F2BFEA2810AFC5h, stored little-endian
OCP_SMART_GUID = bytes.fromhex("AFD514C97C6F4F9CA4F2BFEA2810AFC5")[::-1]
#: Log Page Version (bytes 495:494) of OCP Datacenter NVMe SSD specification 2.0
OCP_SMART_VERSION = 3
#: DSSD Specification Version 2.0.0, errata 0: major (103), minor (102:101), point (100:99), errata (98)
OCP_DSSD_VERSION = (2, 0, 0, 0)


def ocp_smart_page(smart: SmartCounters) -> bytes:
    """The 512-byte OCP SMART / Health Information Extended log page (LID C0h).

    From the counters the controller keeps: Physical Media Units Written / Read
    (bytes 15:0 / 31:16, in bytes: the media is the backend, written as the host
    wrote it), Uncorrectable Read Error Count (63:56: the media and data integrity
    errors), Incomplete Shutdowns (115:112: the unsafe shutdowns); the DSSD
    Specification Version, the Log Page Version and the Log Page GUID. Everything
    the emulation has no counterpart for (NAND blocks, ECC, throttling, capacitor,
    PCIe errors, endurance estimate, ...) is zero.
    """
    buf = bytearray(512)
    written, read, media_errors, unsafe = smart.media_totals()
    for off, v in ((0, written), (16, read)):
        v = min(v, 2**128 - 1)
        struct.pack_into("<QQ", buf, off, v & (2**64 - 1), v >> 64)
    struct.pack_into("<Q", buf, 56, min(media_errors, 2**64 - 1))
    major, minor, point, errata = OCP_DSSD_VERSION
    struct.pack_into("<BHHB", buf, 98, errata, point, minor, major)
    struct.pack_into("<I", buf, 112, min(unsafe, 2**32 - 1))
    struct.pack_into("<H", buf, 494, OCP_SMART_VERSION)
    buf[496:512] = OCP_SMART_GUID
    return bytes(buf)
