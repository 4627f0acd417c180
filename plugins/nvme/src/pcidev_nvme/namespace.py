"""NVMe namespaces: capacity in logical blocks over a backend, LBA formats,
identifiers, and the Identify data structures that describe them.

A namespace spec names a backend and its options, plus namespace options::

    mem:size=64M
    file:path=/var/lib/img.raw,size=1G,direct=on,lbaf=1
    null:size=1T,uuid=4f3b2c3e-...-...,eui64=0011223344556677

The options after the ``:`` follow pcidev's property grammar (:mod:`pcidev.properties`:
``key=value`` items, a literal comma written ``,,``, the same integer, size and boolean
forms everywhere). The namespace options are the fields of :class:`NamespaceOptions`;
the rest goes to the backend (whose options are its config class, e.g.
:class:`~pcidev_nvme.backends.MemConfig`):

``lbaf``
    initial LBA format: ``0`` = 512-byte blocks (default), ``1`` = 4096-byte blocks.
    ``lba_size=512|4096`` is accepted as a synonym.
``uuid``, ``nguid``, ``eui64``
    identifiers (hex; UUID in any form :class:`uuid.UUID` accepts).

Identifiers are stable across restarts:

1. given explicitly, they are used as given;
2. else, for a backend with an ``identity_path`` (file images:
   ``<image>.nvme-ids``), they are read from that small JSON file, or created
   at random and saved there on first use, so they follow the image;
3. else (no identity file, or one that cannot be written) they are derived from the
   controller serial number and the NSID with SHA-256 (same serial and NSID, same identifiers).

The identity file also remembers the LBA format chosen by Format NVM, so a file
namespace keeps its block size across restarts (an explicit ``lbaf`` wins). It is
never written beside a read-only image (``readonly=on``, or a directory this process
cannot write, :func:`may_write_beside`): such a namespace uses the derived identifiers
(or the ones an existing identity file holds).

:meth:`Namespace.snapshot` / :meth:`Namespace.restore` carry the LBA format
(:class:`NamespaceState`, the ``nvme/namespace`` vmstate description; the controller
adds whether the namespace is attached and, for memory, the descriptor reference).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import uuid as uuidlib
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from pcidev.errors import ConfigError
from pcidev.properties import PropertyError, Size, split_properties
from pcidev.vmstate import U8, U32, Bool, FdRef, vmstate
from pcidev_nvme.backends import Backend, BackendFactory, create_backend, take_options
from pcidev_nvme.limits import COPY_LIMITS
from pcidev_nvme.status import NvmeStatusError, Status

__all__ = [
    "LBA_FORMATS",
    "Namespace",
    "NamespaceOptions",
    "NamespaceState",
    "may_write_beside",
    "make_namespace",
    "parse_spec",
]

#: Supported LBA formats: (LBA data size, relative performance), index = LBAF number.
LBA_FORMATS: tuple[tuple[int, int], ...] = ((512, 1), (4096, 0))

#: Identify data structures are one 4 KiB page.
IDENTIFY_SIZE = 4096

#: Namespace Identification Descriptor types (CNS 03h).
NIDT_EUI64 = 1
NIDT_NGUID = 2
NIDT_UUID = 3
NIDT_CSI = 4

#: Command set identifier of the NVM command set.
CSI_NVM = 0

# NSFEAT bits
NSFEAT_THINP = 1 << 0
NSFEAT_OPTPERF = 1 << 4
# DLFEAT: deallocated blocks read as zeros (001b); Write Zeroes supports DEAC (bit 3).
DLFEAT_READ_ZEROES = 0x1
DLFEAT_WZ_DEAC = 1 << 3

#: Preferred write/deallocate granularity and alignment (the backing page size).
PREFERRED_GRANULARITY = 4096
#: Optimal write size reported in NOWS.
OPTIMAL_WRITE_SIZE = 128 * 1024

_IDNS_HEAD = struct.Struct("<QQQBBBBBBBBBB")  # NSZE NCAP NUSE NSFEAT NLBAF FLBAS MC DPC DPS NMIC RESCAP FPI DLFEAT
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def parse_spec(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split a namespace spec into the backend name and its options.

    The options after the ``:`` follow pcidev's property grammar
    (:func:`pcidev.properties.split_properties`: ``key=value`` items separated by
    ``,``, a literal comma written ``,,``).

    :param spec: ``"kind:key=value,..."`` (a bare ``"kind"`` has no options) or a
        mapping with a ``backend`` key and the options.
    :returns: ``(backend name, options)``.
    :raises ConfigError: malformed spec or a duplicated key.
    """
    if isinstance(spec, dict):
        options: dict[str, Any] = dict(spec)
        kind = options.pop("backend", None)
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"namespace spec {spec!r} has no 'backend' name")
        return kind, {str(k): v for k, v in options.items()}
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"namespace spec must be a non-empty string or mapping, got {spec!r}")
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if not kind:
        raise ConfigError(f"namespace spec {spec!r} does not start with a backend name")
    options = {}
    for key, value in split_properties(rest):
        if not key:
            hint = f" (write {value.strip()}=VALUE)" if value.strip().isprintable() and value.strip() else ""
            raise PropertyError(f"namespace spec {spec!r}: option {value!r} has no '=value'{hint}", name=value)
        if key in options:
            raise PropertyError(f"namespace spec {spec!r}: option {key!r} given twice", name=key)
        options[key] = value
    return kind, options


def _hexbytes(text: Any, n: int, what: str) -> bytes:
    value = str(text).replace("-", "").replace(":", "").strip()
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{what}={text!r} is not hexadecimal") from None
    if len(raw) != n:
        raise ConfigError(f"{what}={text!r} must be {n} bytes ({2 * n} hex digits)")
    return raw


def _parse_uuid(text: Any) -> uuidlib.UUID:
    try:
        return uuidlib.UUID(str(text))
    except ValueError:
        raise ConfigError(f"uuid={text!r} is not a UUID") from None


def _derived_ids(serial: str, nsid: int) -> tuple[bytes, bytes, uuidlib.UUID]:
    """NGUID, EUI-64 and UUID derived from the controller serial and the NSID."""
    digest = hashlib.sha256(f"pcidev-nvme-ns:{serial}:{nsid}".encode()).digest()
    nguid = digest[:16]
    eui = bytearray(digest[16:24])
    eui[0] = (eui[0] | 0x02) & 0xFE  # locally administered, unicast
    u = uuidlib.UUID(bytes=digest[16:32], version=4)
    return nguid, bytes(eui), u


def _random_ids() -> tuple[bytes, bytes, uuidlib.UUID]:
    raw = os.urandom(24)
    eui = bytearray(raw[16:24])
    eui[0] = (eui[0] | 0x02) & 0xFE
    return raw[:16], bytes(eui), uuidlib.uuid4()


def _check_lbaf(inst: Any, attr: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and not 0 <= value < len(LBA_FORMATS):
        raise ConfigError(f"lbaf={value} must be 0 (512 B) or 1 (4 KiB)")


def _check_lba_size(inst: Any, attr: attrs.Attribute[Size | None], value: Size | None) -> None:
    if value is not None and value not in [lba for lba, _rp in LBA_FORMATS]:
        raise ConfigError(f"lba_size={value} must be 512 or 4096")


def _check_id(n: int) -> Callable[[Any, attrs.Attribute[str | None], str | None], None]:
    def check(inst: Any, attr: attrs.Attribute[str | None], value: str | None) -> None:
        if value is not None:
            _hexbytes(value, n, attr.name)
    return check


def _check_uuid(inst: Any, attr: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None:
        _parse_uuid(value)


@attrs.define(kw_only=True)
class NamespaceOptions:
    """The options of a namespace spec that belong to the namespace, not its backend
    (``ns=KIND:BACKEND-OPTIONS,NAMESPACE-OPTIONS``, in any order)."""

    lbaf: int | None = attrs.field(default=None, validator=_check_lbaf, metadata={
        "help": "initial LBA format: 0 = 512-byte blocks, 1 = 4096-byte blocks "
                "(default: 0, or what the image's identity file remembers)"})
    lba_size: Size | None = attrs.field(default=None, validator=_check_lba_size, metadata={
        "help": "initial logical block size, 512 or 4096 (instead of lbaf)"})
    uuid: str | None = attrs.field(default=None, validator=_check_uuid, metadata={
        "help": "namespace UUID (default: stored beside the image, else derived from serial and NSID)"})
    nguid: str | None = attrs.field(default=None, validator=_check_id(16), metadata={
        "help": "NGUID, 16 bytes in hex (default: as uuid)"})
    eui64: str | None = attrs.field(default=None, validator=_check_id(8), metadata={
        "help": "EUI-64, 8 bytes in hex (default: as uuid)"})

    def __attrs_post_init__(self) -> None:
        if self.lbaf is not None and self.lba_size is not None:
            raise ConfigError("give lbaf or lba_size, not both")

    def format_index(self) -> int | None:
        """The LBA format asked for (``lbaf``, or the one of ``lba_size``), None if neither."""
        if self.lba_size is not None:
            return [lba for lba, _rp in LBA_FORMATS].index(self.lba_size)
        return self.lbaf


@vmstate("nvme/namespace")
@attrs.frozen
class NamespaceState:
    """A namespace: attached or not, its LBA format, the memory of a ``mem`` backend."""

    nsid: U32
    attached: Bool
    lbaf: U8
    mem_fd: FdRef | None = None


class Namespace:
    """One namespace: a backend seen as ``nlbas`` logical blocks of ``lba_size`` bytes.

    :param nsid: namespace identifier (1-based).
    :param backend: where the data lives.
    :param lbaf: LBA format index (see :data:`LBA_FORMATS`).
    :param nguid: 16-byte Namespace Globally Unique Identifier.
    :param eui64: 8-byte IEEE Extended Unique Identifier.
    :param uuid: Namespace UUID.
    :raises ConfigError: the backend's size is not a multiple of 4096, or the LBA
        format is unknown or smaller than the backend allows.

    ``lba_size``, ``lba_shift`` and ``nlbas`` change only in :meth:`format`; the
    controller quiesces I/O to the namespace around it.
    """

    def __init__(
        self,
        nsid: int,
        backend: Backend,
        *,
        lbaf: int = 0,
        nguid: bytes | None = None,
        eui64: bytes | None = None,
        uuid: uuidlib.UUID | None = None,
    ) -> None:
        if not 1 <= nsid <= 0xFFFFFFFE:
            raise ConfigError(f"NSID {nsid} is out of range")
        size = int(backend.size)
        if size <= 0 or size % 4096:
            raise ConfigError(f"namespace {nsid}: backend size {size} is not a multiple of 4096")
        d_nguid, d_eui, d_uuid = _derived_ids("", nsid)
        self.nsid = nsid
        self.backend = backend
        self.size = size
        self.nguid = bytes(nguid) if nguid is not None else d_nguid
        self.eui64 = bytes(eui64) if eui64 is not None else d_eui
        self.uuid = uuid if uuid is not None else d_uuid
        if len(self.nguid) != 16 or len(self.eui64) != 8:
            raise ConfigError("NGUID must be 16 bytes and EUI-64 8 bytes")
        self._lock = threading.Lock()
        self._set_format(lbaf, config=True)

    # -- format ---------------------------------------------------------------------------

    def _usable(self, lbaf: int) -> bool:
        return 0 <= lbaf < len(LBA_FORMATS) and LBA_FORMATS[lbaf][0] >= getattr(
            self.backend, "min_block", 512
        )

    def _set_format(self, lbaf: int, *, config: bool = False) -> None:
        if not self._usable(lbaf):
            if config:
                raise ConfigError(
                    f"namespace {self.nsid}: LBA format {lbaf} is unknown or smaller than the "
                    f"backend's block size {getattr(self.backend, 'min_block', 512)}"
                )
            raise NvmeStatusError(Status.INVALID_FORMAT, f"LBA format {lbaf} is not usable")
        self.lbaf = lbaf
        self.lba_size = LBA_FORMATS[lbaf][0]
        self.lba_shift = self.lba_size.bit_length() - 1
        self.nlbas = self.size >> self.lba_shift

    # -- state ---------------------------------------------------------------------------
    def snapshot(self, *, attached: bool, mem_fd: FdRef | None = None) -> NamespaceState:
        """The namespace's state.

        :param attached: whether the controller has it attached.
        :param mem_fd: reference to the descriptor of its memory (a ``mem`` backend).
        """
        return NamespaceState(nsid=self.nsid, attached=attached, lbaf=self.lbaf, mem_fd=mem_fd)

    def restore(self, state: NamespaceState) -> None:
        """Take the LBA format of a checked ``state``."""
        if self.lbaf != state.lbaf:
            self._set_format(state.lbaf)

    def replace_backend(self, backend: Backend) -> Backend:
        """Use ``backend`` (same size: migrated memory) from now on; returns the old one."""
        old, self.backend = self.backend, backend
        return old

    @property
    def read_only(self) -> bool:
        """Whether the namespace is write protected (its backend refuses writes)."""
        return bool(getattr(self.backend, "read_only", False))

    def format(self, lbaf: int, ses: int) -> None:
        """Format NVM on this namespace: switch LBA format, optionally erase.

        :param lbaf: the new LBA format index.
        :param ses: Secure Erase Settings: 0 none, 1 user data erase; 2
            (cryptographic erase) is not supported. In both supported cases every
            block is deallocated and reads zeros, on stable storage before this
            returns: after a Format NVM the controller shall not return user data
            the namespace held before (NVMe Base 2.0, Format NVM), and a change
            of LBA size would make the old data meaningless anyway. SES 1 differs
            only in name here, as the erase already reaches stable storage.
        :raises NvmeStatusError: Invalid Format for an unknown or unusable LBA
            format; Invalid Field for an unsupported ``ses``; Namespace is Write
            Protected for a read-only backend.
        """
        if not self._usable(lbaf):
            raise NvmeStatusError(
                Status.INVALID_FORMAT, f"LBA format {lbaf} is not supported", param_offset=40
            )
        if ses not in (0, 1):
            raise NvmeStatusError(
                Status.INVALID_FIELD, f"secure erase setting {ses} is not supported",
                param_offset=41,
            )
        if self.read_only:
            raise NvmeStatusError(Status.NS_WRITE_PROTECTED, "the namespace is read-only")
        with self._lock:
            try:
                self.backend.deallocate(0, self.size)
                self.backend.flush()  # the erase survives a crash right after it
            except OSError as exc:
                raise NvmeStatusError(Status.INTERNAL, f"erase failed: {exc}") from exc
            self._set_format(lbaf)
            _save_identity(self)

    # -- identify -------------------------------------------------------------------------

    def nuse(self) -> int:
        """Namespace Utilization: blocks that hold data (holes do not count)."""
        try:
            used = int(self.backend.allocated_bytes())
        except (OSError, AttributeError):
            used = self.size
        used = max(0, min(used, self.size))
        return (used + self.lba_size - 1) >> self.lba_shift

    def identify(self) -> bytes:
        """The Identify Namespace data structure (CNS 00h), 4096 bytes.

        :returns: the structure.
        """
        # Imported here: io imports this module.
        buf = bytearray(IDENTIFY_SIZE)
        lbas = self.lba_size
        per_page = max(PREFERRED_GRANULARITY // lbas, 1)
        _IDNS_HEAD.pack_into(
            buf,
            0,
            self.nlbas,  # NSZE
            self.nlbas,  # NCAP
            min(self.nuse(), self.nlbas),  # NUSE
            NSFEAT_OPTPERF,  # NSFEAT: NPWG..NOWS are valid
            len(LBA_FORMATS) - 1,  # NLBAF (0's based)
            self.lbaf & 0xF | (self.lbaf >> 4 & 0x3) << 5,  # FLBAS
            0,  # MC: no metadata
            0,  # DPC: no protection information
            0,  # DPS
            0,  # NMIC: private namespace
            0,  # RESCAP
            0,  # FPI
            DLFEAT_READ_ZEROES | DLFEAT_WZ_DEAC,  # DLFEAT
        )
        # 34.. NAWUN NAWUPF NACWU NABSN NABO NABSPF: 0 (controller values apply)
        # NOIOB (46): no optimal I/O boundary.
        buf[48:64] = self.size.to_bytes(16, "little")  # NVMCAP
        npwg = per_page - 1
        nows = max(OPTIMAL_WRITE_SIZE // lbas, 1) - 1
        struct.pack_into("<HHHHH", buf, 64, npwg, npwg, npwg, npwg, nows)  # NPWG NPWA NPDG NPDA NOWS
        mssrl, mcl, msrc = COPY_LIMITS
        struct.pack_into("<HIB", buf, 74, mssrl, mcl, msrc)  # MSSRL MCL MSRC
        buf[99] = 1 if self.read_only else 0  # NSATTR: write protected
        buf[104:120] = self.nguid
        buf[120:128] = self.eui64
        for i, (size, rp) in enumerate(LBA_FORMATS):
            _U32.pack_into(buf, 128 + 4 * i, (size.bit_length() - 1) << 16 | rp << 24)
        return bytes(buf)

    def identify_csi_nvm(self) -> bytes:
        """The NVM command set specific Identify Namespace structure (CNS 05h, CSI 0).

        No storage tags and no protection information: LBSTM, PIC and every
        extended LBA format are zero.

        :returns: 4096 bytes.
        """
        return bytes(IDENTIFY_SIZE)

    def id_descriptors(self) -> bytes:
        """The Namespace Identification Descriptor list (CNS 03h): EUI-64, NGUID,
        UUID and command set identifier.

        :returns: 4096 bytes (the list ends with a zero descriptor header).
        """
        out = bytearray()
        for nidt, value in (
            (NIDT_EUI64, self.eui64),
            (NIDT_NGUID, self.nguid),
            (NIDT_UUID, self.uuid.bytes),
            (NIDT_CSI, bytes([CSI_NVM])),
        ):
            out += bytes([nidt, len(value), 0, 0]) + value
        out += bytes(IDENTIFY_SIZE - len(out))
        return bytes(out)

    def close(self) -> None:
        """Close the backend. Idempotent."""
        self.backend.close()

    def __repr__(self) -> str:
        return (
            f"<Namespace {self.nsid} {self.nlbas} x {self.lba_size} B "
            f"on {getattr(self.backend, 'kind', type(self.backend).__name__)}>"
        )


# ----------------------------------------------------------------------------- identity files


def _load_identity(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"namespace identity file {path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"namespace identity file {path} does not hold a JSON object")
    return data


def may_write_beside(backend: Any) -> bool:
    """Whether files may be written beside a backend's image (its identity file, the
    controller's state file): never beside a read-only image (``readonly=on``) or in a
    directory this process cannot write."""
    path = getattr(backend, "path", None)
    if not isinstance(path, str) or not path or getattr(backend, "read_only", False):
        return False
    return os.access(os.path.dirname(os.path.abspath(path)) or ".", os.W_OK)


def _save_identity(ns: Namespace) -> bool:
    """Write the namespace's identifiers and format to its identity file, if any.

    :returns: whether the file now holds them (``False`` without an identity file
        or when it cannot be written).
    """
    path = getattr(ns.backend, "identity_path", None)
    if not path or not may_write_beside(ns.backend):
        return False
    data = {
        "nguid": ns.nguid.hex(),
        "eui64": ns.eui64.hex(),
        "uuid": str(ns.uuid),
        "lbaf": ns.lbaf,
    }
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        # A read-only or missing directory: the caller falls back to derived
        # identifiers for a new namespace; a new format is not remembered.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
    return True


def make_namespace(
    nsid: int,
    spec: str | dict[str, Any],
    *,
    state_dir: str | None = None,
    serial: str = "",
    backends: Mapping[str, BackendFactory] | None = None,
) -> Namespace:
    """Build a namespace from a spec (see the module docstring).

    :param nsid: the namespace identifier.
    :param spec: ``"mem:size=64M"``, ``"file:path=...,size=1G,direct=on"``, or a mapping.
    :param state_dir: the controller's state directory; relative image paths of file
        backends are resolved against it.
    :param serial: controller serial number, used to derive stable identifiers
        when none are given or stored.
    :param backends: the backends by name (a device registry's ``nvme-backend``
        components, see :mod:`pcidev_nvme.backends`); ``None``: the built-ins.
    :returns: the namespace.
    :raises ConfigError: bad spec, unknown backend or option, or backend failure.
    """
    kind, options = parse_spec(spec)
    ns_options = take_options(NamespaceOptions, options, what="namespace")
    lbaf = ns_options.format_index()
    explicit: dict[str, Any] = {}
    if ns_options.uuid is not None:
        explicit["uuid"] = _parse_uuid(ns_options.uuid)
    if ns_options.nguid is not None:
        explicit["nguid"] = _hexbytes(ns_options.nguid, 16, "nguid")
    if ns_options.eui64 is not None:
        explicit["eui64"] = _hexbytes(ns_options.eui64, 8, "eui64")
    if state_dir and kind == "file" and "path" in options:
        options["path"] = os.path.join(state_dir, os.path.expanduser(str(options["path"])))
    backend = create_backend(kind, options, backends)
    try:
        nguid, eui64, uuid = _derived_ids(serial, nsid)
        stored = None
        path = getattr(backend, "identity_path", None)
        if path:
            stored = _load_identity(path)
            if stored is None:
                nguid, eui64, uuid = _random_ids()
            else:
                try:
                    nguid = _hexbytes(stored["nguid"], 16, "nguid")
                    eui64 = _hexbytes(stored["eui64"], 8, "eui64")
                    uuid = _parse_uuid(stored["uuid"])
                except KeyError as exc:
                    raise ConfigError(f"namespace identity file {path} lacks {exc}") from None
                if lbaf is None and isinstance(stored.get("lbaf"), int):
                    lbaf = stored["lbaf"]
        nguid = explicit.get("nguid", nguid)
        eui64 = explicit.get("eui64", eui64)
        uuid = explicit.get("uuid", uuid)
        if lbaf is None:
            lbaf = 0 if getattr(backend, "min_block", 512) <= 512 else 1
        ns = Namespace(nsid, backend, lbaf=lbaf, nguid=nguid, eui64=eui64, uuid=uuid)
        if path and (stored is None or stored.get("lbaf") != ns.lbaf or explicit):
            if not _save_identity(ns) and stored is None:
                # Random identifiers that cannot be remembered would change on every
                # start: use the derived ones (stable for this serial and NSID).
                d_nguid, d_eui64, d_uuid = _derived_ids(serial, nsid)
                ns.nguid = explicit.get("nguid", d_nguid)
                ns.eui64 = explicit.get("eui64", d_eui64)
                ns.uuid = explicit.get("uuid", d_uuid)
    except BaseException:
        backend.close()
        raise
    return ns
