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
* :class:`StateFile`: the JSON file that carries SMART counters, the error
  count, firmware slots and the clean/unclean flag across restarts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pcidev.errors import ConfigError

__all__ = ["ErrorLog", "SmartCounters", "FirmwareSlots", "firmware_image", "parse_firmware_image", "ChangedNamespaces", "StateFile", "effects_log",
           "LID_ERROR", "LID_SMART", "LID_FW_SLOT", "LID_CHANGED_NS", "LID_EFFECTS", "CMD_EFFECTS"]

log = logging.getLogger(__name__)

LID_ERROR = 0x01
LID_SMART = 0x02
LID_FW_SLOT = 0x03
LID_CHANGED_NS = 0x04
LID_EFFECTS = 0x05

_ERR_ENTRY = struct.Struct("<QHHHHQIBB2xQH22x")
assert _ERR_ENTRY.size == 64


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
        """Record an error; returns its error count (unique, increasing, never 0).

        :param status_field: the 15-bit status field the command completed with.
        :param param_offset: byte offset in the SQE of the offending field, or None.
        """
        pel = 0xFFFF if param_offset is None else ((param_offset & 0xFF) | ((param_bit & 7) << 8))
        with self._lock:
            self.count += 1
            entry = _ERR_ENTRY.pack(self.count, sqid & 0xFFFF, cid & 0xFFFF,
                                    ((status_field & 0x7FFF) << 1) | (phase & 1), pel,
                                    lba & (2**64 - 1), nsid & 0xFFFFFFFF, 0, 0, csi & (2**64 - 1), 0)
            self._ring.insert(0, entry)
            del self._ring[self.capacity:]
            return self.count

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


class SmartCounters:
    """SMART / Health counters (thread-safe: the data path updates them from any thread).

    Data units are kept as bytes and reported, as the spec says, in thousands of
    512-byte units rounded up.
    """

    _PERSISTED = ("bytes_read", "bytes_written", "host_read_commands", "host_write_commands", "busy_seconds",
                  "power_cycles", "power_on_seconds", "unsafe_shutdowns", "media_errors",
                  "warning_temp_seconds", "critical_temp_seconds")

    def __init__(self) -> None:
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

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """What the state file keeps (power-on time includes the current power cycle)."""
        with self._lock:
            d = {k: getattr(self, k) for k in self._PERSISTED}
        d["power_on_seconds"] = self.power_on_total
        return d

    def load(self, data: dict[str, Any]) -> None:
        """Restore counters saved by :meth:`to_dict`; unknown or malformed keys are ignored."""
        for key in self._PERSISTED:
            val = data.get(key)
            if isinstance(val, (int, float)) and not isinstance(val, bool) and val >= 0:
                setattr(self, key, type(getattr(self, key))(val))
        self._powered_at = time.monotonic()

    def page(self, *, critical_warning: int, temperature: int, spare: int = 100, spare_threshold: int = 10,
             percent_used: int = 0, error_entries: int = 0) -> bytes:
        """The 512-byte SMART / Health Information log page."""
        buf = bytearray(512)
        buf[0] = critical_warning & 0xFF
        struct.pack_into("<H", buf, 1, temperature & 0xFFFF)
        buf[3] = spare
        buf[4] = spare_threshold
        buf[5] = min(percent_used, 255)

        def u128(off: int, v: int) -> None:
            v = min(int(v), 2**128 - 1)
            struct.pack_into("<QQ", buf, off, v & (2**64 - 1), v >> 64)

        with self._lock:
            u128(32, self.data_units_read)
            u128(48, self.data_units_written)
            u128(64, self.host_read_commands)
            u128(80, self.host_write_commands)
            u128(96, self.busy_minutes)
            u128(112, self.power_cycles)
            u128(144, self.unsafe_shutdowns)
            u128(160, self.media_errors)
            wt, ct = self.warning_temp_seconds, self.critical_temp_seconds
        u128(128, self.power_on_hours)
        u128(176, error_entries)
        struct.pack_into("<II", buf, 192, min(int(wt // 60), 2**32 - 1), min(int(ct // 60), 2**32 - 1))
        return bytes(buf)


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

    def activate_pending(self) -> bool:
        """At a controller reset: switch to the next-reset slot. Returns True if it changed."""
        if self.next_reset and self.revisions[self.next_reset - 1]:
            changed = self.next_reset != self.active
            self.active = self.next_reset
            self.next_reset = 0
            return changed
        self.next_reset = 0
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"revisions": list(self.revisions), "active": self.active, "next_reset": self.next_reset}

    def load(self, data: dict[str, Any]) -> None:
        revs = data.get("revisions")
        if isinstance(revs, list) and all(isinstance(r, str) and len(r) <= 8 and r.isascii() for r in revs):
            for i in range(1, min(len(revs), self.nslots)):  # slot 1 is the configured firmware
                self.revisions[i] = revs[i]
        act = data.get("active")
        if isinstance(act, int) and 1 <= act <= self.nslots and self.revisions[act - 1]:
            self.active = act
        nxt = data.get("next_reset")
        if isinstance(nxt, int) and 1 <= nxt <= self.nslots and self.revisions[nxt - 1]:
            self.next_reset = nxt


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
    import crc32c

    rev = revision.encode("ascii")
    if not 1 <= len(rev) <= 8 or not revision.isprintable() or not revision.strip():
        raise ValueError(f"firmware revision {revision!r} must be 1..8 printable ASCII characters")
    body = _FW_HEAD.pack(FW_MAGIC, rev.ljust(8, b" "), len(payload)) + bytes(payload)
    image = body + struct.pack("<I", crc32c.crc32c(body))
    return image + bytes(-len(image) % 4)


def parse_firmware_image(image: bytes) -> str | None:
    """The revision of a valid image (see :func:`firmware_image`), or None if it is invalid."""
    import crc32c

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
        text = rev.decode("ascii").rstrip(" ")
    except UnicodeDecodeError:
        return None
    if not text or not text.isprintable():
        return None
    return text


class ChangedNamespaces:
    """The Changed Namespace List (up to 1024 NSIDs; more overflow to FFFFFFFFh)."""

    LIMIT = 1024

    def __init__(self) -> None:
        self._nsids: list[int] = []
        self._overflow = False
        self._lock = threading.Lock()

    def add(self, nsid: int) -> None:
        with self._lock:
            if self._overflow or nsid in self._nsids:
                return
            if len(self._nsids) >= self.LIMIT:
                self._overflow = True
                self._nsids = []
            else:
                self._nsids.append(nsid)
                self._nsids.sort()

    def page(self, clear: bool) -> bytes:
        with self._lock:
            ids = [0xFFFFFFFF] if self._overflow else list(self._nsids)
            if clear:
                self._nsids, self._overflow = [], False
        return struct.pack(f"<{len(ids)}I", *ids).ljust(4096, b"\0")

    def __len__(self) -> int:
        return len(self._nsids)


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


class StateFile:
    """Persistent controller state in a JSON file, written atomically.

    :param path: the file; None disables persistence (everything stays in memory).
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()

    def load(self) -> dict[str, Any]:
        """The saved state, or ``{}`` if none (a corrupt file is logged and ignored).

        :raises ConfigError: if the directory does not exist or the path is a directory.
        """
        if self.path is None:
            return {}
        if not self.path.parent.is_dir():
            raise ConfigError(f"nvme state directory {self.path.parent} does not exist")
        if self.path.is_dir():
            raise ConfigError(f"nvme state file {self.path} is a directory")
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("cannot read nvme state file %s: %s", self.path, exc)
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            log.warning("nvme state file %s is corrupt; starting from zero", self.path)
            return {}
        if not isinstance(data, dict) or data.get("version") != self.VERSION:
            log.warning("nvme state file %s has an unknown format; starting from zero", self.path)
            return {}
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Write ``data`` atomically (temporary file, fsync, rename). Errors are logged, not raised."""
        if self.path is None:
            return
        payload = json.dumps({"version": self.VERSION, **data}, indent=1, sort_keys=True)
        with self._lock:
            try:
                fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
                try:
                    with os.fdopen(fd, "w") as f:
                        f.write(payload)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
                    raise
            except OSError as exc:
                log.warning("cannot save nvme state file %s: %s", self.path, exc)
