"""The controller's persistent state file: what survives a restart.

What it keeps (:class:`PersistState`, the ``nvme/persist`` vmstate description,
version 1): the serial number it belongs to, the clean/unclean flag (an enabled
controller powered off without a shutdown notification counts an unsafe shutdown at
the next power-on), the SMART counters (:class:`~pcidev_nvme.logs.SmartState`) and the
per-namespace ones (:class:`~pcidev_nvme.ns_smart.NamespaceSmartState`, optional: files from
before them load, their namespaces then count from zero), the lifetime error count, the
firmware slots (:class:`~pcidev_nvme.logs.FirmwareState`)
the file-backed namespaces created by Namespace Management and the sanitize status
with an operation in progress (:class:`~pcidev_nvme.sanitize.SanitizeState`: the
spec has a sanitize continue across power cycles and keep its log; a restarted
controller refuses what it refused and, once it first runs as the state's owner,
continues the operation where the last save left it) and the device self-test results
with a test in progress (:class:`~pcidev_nvme.selftest.SelfTestState`: a short test
is aborted by the power cycle, an extended one continues), and what the endurance
group's counters (log 09h) hold beyond this controller's SMART counters
(:class:`~pcidev_nvme.endurance.MediaTotals`: those of secondary controllers whose VF
was disabled, and those of the live secondaries, which have no state file of their
own; at power-on they are the group's retired counters, so the lifetime totals never
go back). These are the same
state classes live migration carries, written with the same codec
(:func:`pcidev.vmstate.save`: versioned, range-checked, CRC-protected).

**Where it lives** (first match):

1. ``state_file=PATH``: that file;
2. ``state_dir=DIR``: ``DIR/nvme-<serial>.state``;
3. otherwise, beside the image of the first file-backed namespace
   (``nvme-<serial>.state`` in its directory), **unless** that namespace is
   read-only (``readonly=on``) or its directory is not writable: nothing is ever
   written beside a read-only image;
4. otherwise nowhere: the state is kept in memory only (a one-line warning says so
   when a file-backed namespace was there but could not host it).

A state file that cannot be read (corrupt, truncated, another format, a newer
version) is reported with one warning line and the controller starts from zero; it
is never a crash. A JSON state file written by earlier versions
(``nvme-<serial>.state.json``, or JSON at the ``state_file`` path) is read once and
rewritten in this format (the old default-named JSON file is then removed).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from pcidev.errors import ConfigError, ConfigMismatchError, PcidevError, VersionError, VMStateError
from pcidev.vmstate import U32, U64, Bool, Str, VarArray, load, save, vmstate
from pcidev.vmstate.stream import MAGIC as STREAM_MAGIC
from pcidev_nvme.config import NamespaceSpec, NvmeConfig
from pcidev_nvme.endurance import EnduranceGroup, MediaTotals
from pcidev_nvme.limits import STATE_SAVE_INTERVAL
from pcidev_nvme.logs import ErrorLog, ErrorLogState, FirmwareSlots, FirmwareState, SmartCounters, SmartState
from pcidev_nvme.namespace import Namespace, may_write_beside
from pcidev_nvme.namespaces import persists
from pcidev_nvme.ns_smart import NamespaceSmart, NamespaceSmartState
from pcidev_nvme.sanitize import Sanitizer, SanitizeState
from pcidev_nvme.selftest import SelfTest, SelfTestState

__all__ = ["PersistenceMixin", "PersistState", "CreatedNamespaceState", "StateFile", "STATE_SECTION", "DEVICE_TYPE",
           "state_file_name", "legacy_state_file_name", "upgrade_legacy"]

log = logging.getLogger(__name__)

#: section name of the state file's description
STATE_SECTION = "nvme/persist"
#: device type recorded in the state file's stream header
DEVICE_TYPE = "nvme-state"
MAX_CREATED = 1024


@vmstate("nvme/created-namespace")
@attrs.frozen
class CreatedNamespaceState:
    """A file-backed namespace created by Namespace Management."""

    nsid: U32
    spec: Str[4096]
    attached: Bool


@vmstate(STATE_SECTION, version=1)
@attrs.frozen
class PersistState:
    """What the state file keeps (see the module docstring)."""

    serial: Str[256]
    dirty: Bool
    smart: SmartState
    error_count: U64
    firmware: FirmwareState
    created: VarArray[CreatedNamespaceState, MAX_CREATED] = ()
    #: the sanitize status and an operation in progress (optional: files from before it load)
    sanitize: SanitizeState | None = None
    #: the device self-test results and a test in progress (optional, as ``sanitize``)
    self_test: SelfTestState | None = None
    #: the per-namespace SMART counters (optional, as ``sanitize``; :mod:`pcidev_nvme.ns_smart`)
    ns_smart: NamespaceSmartState | None = None
    #: the endurance group's counters beyond this controller's own (optional, as
    #: ``sanitize``; absent while zero)
    endurance: MediaTotals | None = None


def state_file_name(serial: str) -> str:
    """The default file name of controller ``serial``'s state file."""
    return f"nvme-{serial}.state".replace("/", "_")


def legacy_state_file_name(serial: str) -> str:
    """The file name earlier versions used (JSON)."""
    return f"nvme-{serial}.state.json".replace("/", "_")


# ----------------------------------------------------------------------------- legacy JSON
def _num(d: Any, key: str, *, scale: float = 1.0) -> int:
    v = d.get(key) if isinstance(d, dict) else None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
        return min(int(v * scale), 2**64 - 1)
    return 0


def upgrade_legacy(data: Any) -> PersistState | None:
    """A :class:`PersistState` from the JSON an earlier version wrote (version 1), or None
    if ``data`` is not that. Malformed items read as zero / empty, as before."""
    if not isinstance(data, dict) or data.get("version") != 1:
        return None
    sm = data.get("smart")
    smart = SmartState(
        bytes_read=_num(sm, "bytes_read"), bytes_written=_num(sm, "bytes_written"),
        host_read_commands=_num(sm, "host_read_commands"), host_write_commands=_num(sm, "host_write_commands"),
        busy_us=_num(sm, "busy_seconds", scale=1e6), power_cycles=_num(sm, "power_cycles"),
        power_on_us=_num(sm, "power_on_seconds", scale=1e6), unsafe_shutdowns=_num(sm, "unsafe_shutdowns"),
        media_errors=_num(sm, "media_errors"), warning_temp_us=_num(sm, "warning_temp_seconds", scale=1e6),
        critical_temp_us=_num(sm, "critical_temp_seconds", scale=1e6), temperature=0, injected_warning=0,
        reported_warning=0)
    fw_data = data.get("firmware")
    fw: dict[str, Any] = fw_data if isinstance(fw_data, dict) else {}
    revs = fw.get("revisions")
    if not (isinstance(revs, list) and 1 <= len(revs) <= 7
            and all(isinstance(r, str) and len(r) <= 8 and r.isascii() and r.isprintable() for r in revs)):
        revs = [""]
    active, nxt = fw.get("active"), fw.get("next_reset")
    firmware = FirmwareState(revisions=tuple(revs),
                             active=active if isinstance(active, int) and 1 <= active <= 7 else 1,
                             next_reset=nxt if isinstance(nxt, int) and 0 <= nxt <= 7 else 0)
    created = []
    raw = data.get("created_namespaces")
    for key, ent in sorted(raw.items()) if isinstance(raw, dict) else ():
        try:
            nsid = int(key)
            spec = ent["spec"]
            attached = bool(ent.get("attached"))
        except (TypeError, ValueError, KeyError):
            log.warning("nvme state file: ignoring a malformed created-namespace record %r", key)
            continue
        if isinstance(spec, str) and 1 <= nsid <= 0xFFFFFFFE and len(spec.encode()) <= 4096:
            created.append(CreatedNamespaceState(nsid=nsid, spec=spec, attached=attached))
    serial = data.get("serial")
    return PersistState(serial=serial if isinstance(serial, str) else "", dirty=bool(data.get("dirty")),
                        smart=smart, error_count=_num(data, "error_count"), firmware=firmware,
                        created=tuple(created[:MAX_CREATED]))


# ----------------------------------------------------------------------------- the file
class StateFile:
    """The persistent state file, written atomically (temporary file, fsync, rename).

    :param path: the file; None keeps everything in memory.
    :param legacy: a JSON file of an earlier version to upgrade from when ``path`` does
        not exist yet (removed once the new file is written, if it was one).

    A file at ``path`` that is neither empty nor a state file of this plugin (old or new
    format) is never overwritten: the state is then kept in memory only (one warning).
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, legacy: str | os.PathLike[str] | None = None,
                 read_only: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.legacy = Path(legacy) if legacy is not None else None
        #: load only: nothing is written or removed (the state file beside a read-only image)
        self.read_only = read_only
        #: the file at ``path`` is not ours: never written
        self.foreign = False
        self._lock = threading.Lock()

    def load(self) -> PersistState | None:
        """The saved state, or None if there is none or it cannot be used (one warning).

        :raises ConfigError: if the directory does not exist or the path is a directory.
        """
        if self.path is None:
            return None
        if not self.path.parent.is_dir():
            raise ConfigError(f"nvme state directory {self.path.parent} does not exist")
        if self.path.is_dir():
            raise ConfigError(f"nvme state file {self.path} is a directory")
        path = self.path
        if path.exists():
            self.legacy = None  # only an old file that is actually upgraded is removed
        elif self.legacy is not None and self.legacy.is_file():
            path = self.legacy
        else:
            self.legacy = None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._unusable(path, exc.strerror or str(exc))
            return None
        if not data:
            return None  # an empty file: ours to fill
        if data[:1] in (b"{", b"[", b" ", b"\n"):
            return self._load_json(path, data)
        try:
            [section] = load(data, device_type=DEVICE_TYPE, fingerprint={}, descriptions=[PersistState],
                             expected=[(STATE_SECTION, 0)])
        except (ConfigMismatchError, VersionError) as exc:
            self._unusable(path, str(exc))  # another device's stream, or a newer version: not ours to replace
            return None
        except (VMStateError, ValueError) as exc:
            if path == self.path and data.startswith(STREAM_MAGIC):
                # our own format, damaged (a torn disk, say): start over and rewrite it
                log.warning("nvme state file %s is damaged (%s); starting from zero, it will be rewritten", path, exc)
                return None
            self._unusable(path, str(exc))
            return None
        state: PersistState = section.state  # load() built it from the PersistState description
        return state

    def _unusable(self, path: Path, why: str) -> None:
        """``path`` holds something that is not a state file of this plugin: leave it as
        it is (the state file of an older version, if that is what it was, is not removed
        either) and keep the state in memory."""
        if path == self.legacy:
            self.legacy = None
            log.warning("old nvme state file %s cannot be used (%s); starting from zero and leaving it as it is",
                        path, why)
            return None
        self.foreign = True
        log.warning("nvme state file %s cannot be used (%s); starting from zero, the file is left as it is and "
                    "the controller state is kept in memory only", path, why)
        return None

    def _load_json(self, path: Path, data: bytes) -> PersistState | None:
        try:
            state = upgrade_legacy(json.loads(data))
        except ValueError:
            state = None
        if state is None:
            self._unusable(path, "corrupt or of an unknown format")
            return None
        log.info("nvme state file %s is in the old JSON format; it is rewritten as %s", path, self.path)
        return state

    def save(self, state: PersistState) -> None:
        """Write ``state`` atomically. Errors are logged, not raised."""
        if self.path is None or self.foreign or self.read_only:
            return
        try:
            payload = save(DEVICE_TYPE, {}, [(STATE_SECTION, 0, state)])
        except VMStateError as exc:
            log.warning("cannot save nvme state file %s: %s", self.path, exc)
            return
        with self._lock:
            try:
                fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
                try:
                    with os.fdopen(fd, "wb") as f:
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
                return
            legacy, self.legacy = self.legacy, None
        if legacy is not None and legacy != self.path:
            try:
                legacy.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove the old nvme state file %s: %s", legacy, exc)


class PersistenceMixin:
    """The state file of :class:`~pcidev_nvme.controller.NvmeController` (mixed into it):
    where it lives, loading it at power-on and saving it (see the module docstring)."""

    state_file: StateFile
    _dirty: bool
    _last_save: float
    name: str
    cfg: NvmeConfig
    smart: SmartCounters
    ns_smart: NamespaceSmart
    error_log: ErrorLog
    firmware: FirmwareSlots
    endurance: EnduranceGroup
    allocated: dict[int, Namespace]
    namespaces: dict[int, Namespace]
    created: dict[int, str]
    sanitizer: Sanitizer
    selftest: SelfTest

    if TYPE_CHECKING:  # provided by the other parts of NvmeController
        def make_namespace(self, nsid: int, spec: NamespaceSpec) -> Namespace: ...
        def add_namespace(self, nsid: int, ns: Namespace, *, created_spec: str | None = None,
                          attached: bool = False) -> None: ...

    def _init_persist(self) -> None:
        """Open the state file and take what it holds (call once the configured namespaces exist)."""
        self.state_file = self._open_state_file()
        #: enabled and not shut down since: the next power-on counts an unsafe shutdown
        self._dirty = False
        #: the power-on of this process, counted (and the file written) only when the
        #: controller first runs as the state's owner: None once counted or taken over by
        #: a migration in, else whether the last run ended unsafely
        self._power_on_pending: bool | None = None
        #: the sanitize state the file held (taken by :meth:`restore_persisted_sanitize`)
        self._persisted_sanitize: SanitizeState | None = None
        self._persisted_self_test: SelfTestState | None = None
        self._self_test_waiting = False
        #: a sanitize operation from the file waits to continue until the first run as owner
        self._sanitize_waiting = False
        self._load_state()
        self._last_save = time.monotonic()

    @property
    def dirty(self) -> bool:
        """Enabled and not shut down cleanly (the next power-on counts an unsafe shutdown)."""
        return self._dirty

    def _settle_power_on(self) -> None:
        """Count this process's power-on if it is still pending (the first save as owner)."""
        unsafe, self._power_on_pending = self._power_on_pending, None
        if unsafe is not None:
            self.smart.power_on(unsafe=unsafe)
        if self._sanitize_waiting:
            self._sanitize_waiting = False
            self.sanitizer.resume()  # the interrupted operation continues
        if self._self_test_waiting:
            self._self_test_waiting = False
            self.selftest.resume()  # an extended self-test continues after a power cycle

    def restore_persisted_sanitize(self) -> None:
        """Take the sanitize state the file held (call once :attr:`sanitizer` exists): its
        status and refusals now, an operation in progress continues at the first run as
        the state's owner (a migration in replaces it instead)."""
        st, self._persisted_sanitize = self._persisted_sanitize, None
        if st is None:
            return
        self.sanitizer.restore(st)
        if st.running:
            self._sanitize_waiting = True
        else:
            self.sanitizer.resume()

    def restore_persisted_self_test(self) -> None:
        """Take the device self-test results the file held (call once :attr:`selftest`
        exists); a short test in progress was aborted by the power cycle, an extended one
        continues at the first run as the state's owner."""
        st, self._persisted_self_test = self._persisted_self_test, None
        if st is None:
            return
        self.selftest.restore(st)
        self.selftest.controller_reset()  # (a short test: aborted)
        if self.selftest.current:
            self._self_test_waiting = True
        else:
            self.selftest.resume()

    def mark_dirty(self) -> None:
        """The controller was enabled: unclean until a shutdown (saved at once, the first time)."""
        self._settle_power_on()
        if not self._dirty:
            self._dirty = True
            self.save_state()

    def mark_clean(self) -> None:
        """A shutdown finished: clean, saved now."""
        self._dirty = False
        self.save_state()

    def restore_dirty(self, dirty: bool) -> None:
        """Take the flag of a migrated controller (whose source counted the power-on)."""
        self._dirty = dirty
        self._power_on_pending = None
        self._sanitize_waiting = self._self_test_waiting = False  # (the migrated state replaced the file's)

    def count_power_on(self) -> None:
        """A power-on: count it (and an unsafe shutdown if the last run did not shut down), saved now."""
        self._settle_power_on()
        self.smart.power_on(unsafe=self._dirty)
        self.mark_clean()

    def save_soon(self) -> None:
        """Write the state file at the next :meth:`maybe_save_state` (after a migration's resume)."""
        self._last_save = float("-inf")

    def _open_state_file(self) -> StateFile:
        """The state file (see :mod:`pcidev_nvme.persist` for where it lives)."""
        state_file = self._locate_state_file()
        if self.cfg.ns_create == "file" and (state_file.path is None or state_file.read_only):
            log.warning("%s: ns_create=file but no writable directory for the images of created namespaces "
                        "(give state_dir=): Namespace Management creates memory namespaces", self.name)
        return state_file

    def _locate_state_file(self) -> StateFile:
        cfg = self.cfg
        if cfg.state_file:
            return StateFile(cfg.state_file)
        if cfg.state_dir:
            d = Path(cfg.state_dir)
            return StateFile(d / state_file_name(cfg.serial_number),
                                     legacy=d / legacy_state_file_name(cfg.serial_number))
        for ns in self.allocated.values():
            path = getattr(ns.backend, "path", None)
            if isinstance(path, str) and path:
                d = Path(os.path.dirname(os.path.abspath(path)))
                if not may_write_beside(ns.backend):
                    log.warning("%s: namespace %d's image %s is read-only or in a directory this process cannot "
                                "write: the controller state (SMART, firmware slots) is read from beside it but "
                                "kept in memory only; give state_dir= to keep it", self.name, ns.nsid, path)
                    return StateFile(d / state_file_name(cfg.serial_number), read_only=True)
                return StateFile(d / state_file_name(cfg.serial_number),
                                         legacy=d / legacy_state_file_name(cfg.serial_number))
        return StateFile(None)

    @property
    def state_dir(self) -> str | None:
        """Directory of the state file (and of image files Namespace Management creates)."""
        p = self.state_file.path
        if p is None or self.state_file.read_only:
            return self.cfg.state_dir  # never beside a read-only image
        return str(p.parent)

    def _load_state(self) -> None:
        st = self.state_file.load()
        if st is not None:
            # the temperature and warnings are not persisted: they start from the configuration
            self.smart.restore(attrs.evolve(st.smart, temperature=self.smart.temperature, injected_warning=0,
                                            reported_warning=0))
            self.error_log.restore(ErrorLogState(count=st.error_count))
            self.firmware.restore(self._persisted_firmware(st.firmware))
            self._load_created(st.created)
            self._persisted_sanitize = st.sanitize
            self._persisted_self_test = st.self_test
            self.ns_smart.restore(st.ns_smart, keep=self.allocated)  # (of the namespaces that are there)
            if st.endurance is not None:  # (counted as retired: the secondaries start from zero)
                self.endurance.retire(st.endurance)
        # Counted when the controller first runs as the owner of this state (enabled, a
        # save, closed as owner), not now: a process waiting for a migration in must not
        # count a power cycle, nor write the file the running controller owns.
        self._power_on_pending = st is not None and st.dirty
        self._dirty = False

    def _persisted_firmware(self, fw: FirmwareState) -> FirmwareState:
        """Saved firmware slots fitted to this controller: slot 1 is the configured
        firmware, at most ``fw_slots`` slots, the active / next-reset slot only if it holds an image."""
        nslots = self.cfg.fw_slots
        revs = [self.cfg.firmware] + [r for r in fw.revisions[1:nslots]]
        revs += [""] * (nslots - len(revs))
        active = fw.active if 1 <= fw.active <= nslots and revs[fw.active - 1] else 1
        nxt = fw.next_reset if 1 <= fw.next_reset <= nslots and revs[fw.next_reset - 1] else 0
        return FirmwareState(revisions=tuple(revs), active=active, next_reset=nxt)

    def _load_created(self, created: tuple[CreatedNamespaceState, ...]) -> None:
        """Bring back the file-backed namespaces Namespace Management created earlier."""
        for ent in created:
            nsid, spec = ent.nsid, ent.spec
            if not 1 <= nsid <= self.cfg.max_namespaces or nsid in self.allocated:
                log.warning("%s: created namespace %s conflicts with the configuration; not restored", self.name, nsid)
                continue
            try:
                ns = self.make_namespace(nsid, spec)
            except PcidevError as exc:
                log.warning("%s: created namespace %d cannot be restored: %s", self.name, nsid, exc)
                continue
            self.add_namespace(nsid, ns, created_spec=spec, attached=ent.attached)

    def endurance_to_persist(self) -> MediaTotals:
        """What the endurance group's counters hold beyond this controller's SMART
        counters (which persist on their own): the retired secondaries' counters."""
        return self.endurance.retired

    def save_state(self) -> None:
        """Write SMART counters, the error count, firmware slots, the clean flag and the
        file-backed namespaces created by Namespace Management to the state file."""
        self._last_save = time.monotonic()
        self._settle_power_on()
        if self.state_file.path is None:
            return
        fw = self.firmware.snapshot()
        created = tuple(CreatedNamespaceState(nsid=n, spec=spec, attached=n in self.namespaces)
                        for n, spec in sorted(self.created.items()) if persists(spec))
        sanitizer: Sanitizer | None = getattr(self, "sanitizer", None)  # (None while the controller is made)
        selftest: SelfTest | None = getattr(self, "selftest", None)
        endurance = self.endurance_to_persist()
        self.state_file.save(PersistState(
            serial=self.cfg.serial_number, dirty=self._dirty, smart=self.smart.snapshot(),
            error_count=self.error_log.count, firmware=attrs.evolve(fw, staged=()), created=created,
            sanitize=sanitizer.snapshot() if sanitizer is not None else None,
            self_test=selftest.snapshot() if selftest is not None else None,
            ns_smart=self.ns_smart.snapshot_if_any(),
            endurance=endurance if endurance != MediaTotals() else None))

    def maybe_save_state(self) -> None:
        """Save the state file if the last save is older than :data:`STATE_SAVE_INTERVAL`."""
        if time.monotonic() - self._last_save > STATE_SAVE_INTERVAL:
            self.save_state()
