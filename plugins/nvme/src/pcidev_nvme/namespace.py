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
    initial LBA format (:data:`LBAF_TABLE`): ``0`` = 512-byte blocks (default), ``1`` =
    4096-byte blocks, ``2`` .. ``8`` with metadata: 512+8 and 4096+8 (16b Guard PI
    format), 512+16 and 4096+16 (64b Guard), 512+64 and 4096+64 (16b Guard), 4096+64
    (64b Guard). Only ``mem``, ``file`` (on a regular image) and ``null`` namespaces
    offer ``2`` .. ``8``; Identify lists only the formats a namespace can use.
    ``lba_size=512|4096`` is accepted as a synonym for ``0`` and ``1``.
``pi``
    protection information type: ``0`` none (default), ``1``, ``2`` or ``3``; needs an
    LBA format whose metadata holds the PI (8 bytes for the 16b Guard format, 16 for the
    64b one).
``pil``
    ``1``: the PI is in the first bytes of the metadata; ``0`` (default): the last.
``mset``
    ``1``: extended LBAs, the metadata travels at the end of each block's data in the
    data buffer; ``0`` (default): in a separate buffer (the command's MPTR).
``uuid``, ``nguid``, ``eui64``
    identifiers (hex; UUID in any form :class:`uuid.UUID` accepts).
``atomic.nawun``, ``atomic.nawupf``, ``atomic.nabsn``, ``atomic.nabo``, ``atomic.nabspf``
    the namespace's own atomicity parameters (0's based logical block counts, as QEMU's
    properties of the same names; ``nawun=`` ... also work): see
    :mod:`pcidev_nvme.atomicity`. NSFEAT.NSABP is set when NAWUN or NAWUPF is.

Identifiers are stable across restarts:

1. given explicitly, they are used as given;
2. else, for a backend with an ``identity_path`` (file images:
   ``<image>.nvme-ids``), they are read from that small JSON file, or created
   at random and saved there on first use, so they follow the image;
3. else (no identity file, or one that cannot be written) they are derived from the
   controller serial number and the NSID with SHA-256 (same serial and NSID, same identifiers).

The identity file also remembers the LBA format (and ``pi``, ``pil``, ``mset``) chosen by
Format NVM, so a file namespace keeps its block size across restarts (an explicit
``lbaf`` wins, with the ``pi``, ``pil`` and ``mset`` the spec gives).

Metadata (LBA formats with MS > 0) lives apart from the data
(:mod:`pcidev_nvme.metadata`: a second memfd, a sidecar ``IMAGE.nvme-meta``, nothing for
``null``); protection information is :mod:`pcidev_nvme.protection`. It is
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
from pcidev_nvme.atomicity import NO_ATOMICITY, NSFEAT_NSABP, NamespaceAtomicity
from pcidev_nvme.backends import Backend, BackendFactory, create_backend, take_options
from pcidev_nvme.limits import COPY_LIMITS
from pcidev_nvme.metadata import MetadataState, MetadataStore, metadata_supported, open_metadata
from pcidev_nvme.protection import PIF_16B, PIF_64B, PiFormat, pi_size, warn_slow_crcs
from pcidev_nvme.status import NvmeStatusError, Status

__all__ = [
    "LBAF_TABLE",
    "LBA_FORMATS",
    "LbaFormat",
    "Namespace",
    "NamespaceOptions",
    "NamespaceHolding",
    "NamespaceState",
    "identify_capabilities",
    "identify_elbaf",
    "may_write_beside",
    "make_namespace",
    "offered_formats",
    "parse_spec",
    "remember_identity",
    "stored_identifiers",
]


@attrs.frozen
class LbaFormat:
    """One LBA format (Identify Namespace LBAF, and ELBAF of CNS 05h).

    :ivar size: logical block data size in bytes (LBADS = log2).
    :ivar ms: metadata bytes per block (MS).
    :ivar pif: protection information format of the metadata (ELBAF PIF:
        :data:`~pcidev_nvme.protection.PIF_16B` or :data:`~pcidev_nvme.protection.PIF_64B`).
    :ivar rp: relative performance (0 best).
    """

    size: int
    ms: int = 0
    pif: int = PIF_16B
    rp: int = 0

    def lbaf_entry(self) -> int:
        """The 32-bit LBA Format entry: MS 15:0, LBADS 23:16, RP 25:24."""
        return self.ms | (self.size.bit_length() - 1) << 16 | self.rp << 24

    def elbaf_entry(self) -> int:
        """The 32-bit Extended LBA Format entry: STS 6:0 (no storage tag), PIF 8:7."""
        return self.pif << 7


#: The supported LBA formats, index = LBAF number. 0 and 1 are the formats without
#: metadata every earlier version had; the rest carry metadata.
LBAF_TABLE: tuple[LbaFormat, ...] = (
    LbaFormat(512, rp=1),
    LbaFormat(4096),
    LbaFormat(512, 8, PIF_16B, 1),
    LbaFormat(4096, 8, PIF_16B),
    LbaFormat(512, 16, PIF_64B, 1),
    LbaFormat(4096, 16, PIF_64B),
    LbaFormat(512, 64, PIF_16B, 1),
    LbaFormat(4096, 64, PIF_16B),
    LbaFormat(4096, 64, PIF_64B),
)

#: (LBA data size, relative performance) of each of :data:`LBAF_TABLE`.
LBA_FORMATS: tuple[tuple[int, int], ...] = tuple((f.size, f.rp) for f in LBAF_TABLE)

#: Identify Namespace MC: extended LBAs (0) and separate metadata buffers (1) supported
MC_EXTENDED = 1 << 0
MC_SEPARATE = 1 << 1
#: Identify Namespace DPC: PI types 1, 2, 3, PI first (3) and last (4) in the metadata
DPC_ALL = 0x1F
#: DPS bit 3: the PI is the first bytes of the metadata
DPS_PI_FIRST = 1 << 3
#: FLBAS bit 4: extended LBAs
FLBAS_EXTENDED = 1 << 4

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
#: NSFEAT.DAE: the Deallocated or Unwritten Logical Block error is supported (Error Recovery
#: DULBE may be set): the backend tells its holes (:attr:`Namespace.dae`)
NSFEAT_DAE = 1 << 2
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
    if value is not None and not 0 <= value < len(LBAF_TABLE):
        raise ConfigError(f"lbaf={value} must be 0 .. {len(LBAF_TABLE) - 1}")


def _check_range(hi: int) -> Callable[[Any, attrs.Attribute[int | None], int | None], None]:
    def check(inst: Any, attr: attrs.Attribute[int | None], value: int | None) -> None:
        if value is not None and not 0 <= value <= hi:
            raise ConfigError(f"{attr.name}={value} must be 0 .. {hi}")
    return check


def offered_formats(metadata: bool) -> tuple[LbaFormat, ...]:
    """The LBA formats Identify lists: all of :data:`LBAF_TABLE` when metadata can be
    kept, else the formats without metadata (0 and 1)."""
    return LBAF_TABLE if metadata else tuple(f for f in LBAF_TABLE if not f.ms)


def identify_capabilities(buf: bytearray, metadata: bool) -> None:
    """Fill the format fields of an Identify Namespace structure: NLBAF, MC, DPC and the
    LBA Format list (the formats :func:`offered_formats` gives)."""
    formats = offered_formats(metadata)
    buf[25] = len(formats) - 1  # NLBAF (0's based)
    buf[27] = MC_EXTENDED | MC_SEPARATE if metadata else 0  # MC
    buf[28] = DPC_ALL if metadata else 0  # DPC: types 1, 2, 3, PI first or last
    for i, f in enumerate(formats):
        _U32.pack_into(buf, 128 + 4 * i, f.lbaf_entry())


def identify_elbaf(metadata: bool) -> bytes:
    """The NVM command set specific Identify Namespace structure (CNS 05h, CSI 0) for the
    formats :func:`offered_formats` gives.

    No storage tags: LBSTM and PIC (whose bits are about storage tags and the qualified
    PI formats) are zero; ELBAF (byte 12 on, one dword per LBA format) gives each format's
    protection information format (16b or 64b Guard, STS 0).
    """
    buf = bytearray(IDENTIFY_SIZE)
    for i, f in enumerate(offered_formats(metadata)):
        _U32.pack_into(buf, 12 + 4 * i, f.elbaf_entry())
    return bytes(buf)


def format_problem(lbaf: int, pi: int, pil: int, mset: int, backend: Any) -> str | None:
    """Why a format setting cannot be used on ``backend`` (None: it can).

    :param lbaf: LBA format index.
    :param pi: PI type (0 none).
    :param pil: 1 = PI first in the metadata.
    :param mset: 1 = extended LBAs.
    :param backend: the data backend (its ``min_block`` and kind).
    """
    if not 0 <= lbaf < len(LBAF_TABLE):
        return f"LBA format {lbaf} is not supported"
    f = LBAF_TABLE[lbaf]
    min_block = getattr(backend, "min_block", 512)
    if f.size < min_block:
        return f"LBA format {lbaf} ({f.size}-byte blocks) is smaller than the backend's block size {min_block}"
    if not 0 <= pi <= 3 or pil not in (0, 1) or mset not in (0, 1):
        return f"protection setting pi={pi} pil={pil} mset={mset} is invalid"
    if pi and f.ms < pi_size(f.pif):
        return (f"LBA format {lbaf} has {f.ms} bytes of metadata, too few for "
                f"{pi_size(f.pif)} bytes of protection information")
    if f.ms and not metadata_supported(backend):
        return f"the {getattr(backend, 'kind', '?')} backend cannot keep metadata (LBA format {lbaf})"
    return None


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


def _atomic_field(name: str, what: str) -> Any:
    """An ``atomic.NAME`` option: a 0's based 16-bit count of logical blocks."""
    def check(inst: Any, attr: attrs.Attribute[int], value: int) -> None:
        if not 0 <= value <= 0xFFFF:
            raise ConfigError(f"atomic.{name}={value} must be 0 .. 65535")
    return attrs.field(default=0, validator=check, metadata={
        "key": f"atomic.{name}", "aliases": (name,), "help": what})


@attrs.define(kw_only=True)
class NamespaceOptions:
    """The options of a namespace spec that belong to the namespace, not its backend
    (``ns=KIND:BACKEND-OPTIONS,NAMESPACE-OPTIONS``, in any order)."""

    lbaf: int | None = attrs.field(default=None, validator=_check_lbaf, metadata={
        "help": "initial LBA format: 0 = 512-byte blocks, 1 = 4096-byte blocks "
                "(default: 0, or what the image's identity file remembers)"})
    lba_size: Size | None = attrs.field(default=None, validator=_check_lba_size, metadata={
        "help": "initial logical block size, 512 or 4096 (instead of lbaf)"})
    pi: int | None = attrs.field(default=None, validator=_check_range(3), metadata={
        "help": "protection information type 0 (none), 1, 2 or 3 (needs an LBA format with metadata)"})
    pil: int | None = attrs.field(default=None, validator=_check_range(1), metadata={
        "help": "1: protection information in the first bytes of the metadata, 0: the last"})
    mset: int | None = attrs.field(default=None, validator=_check_range(1), metadata={
        "help": "1: extended LBAs (metadata at the end of each block in the data buffer), "
                "0: a separate metadata buffer"})
    uuid: str | None = attrs.field(default=None, validator=_check_uuid, metadata={
        "help": "namespace UUID (default: stored beside the image, else derived from serial and NSID)"})
    nguid: str | None = attrs.field(default=None, validator=_check_id(16), metadata={
        "help": "NGUID, 16 bytes in hex (default: as uuid)"})
    eui64: str | None = attrs.field(default=None, validator=_check_id(8), metadata={
        "help": "EUI-64, 8 bytes in hex (default: as uuid)"})
    nawun: int = _atomic_field("nawun", "NAWUN: atomic write unit of this namespace, logical blocks, 0's "
                               "based (0: the controller's atomic.awun)")
    nawupf: int = _atomic_field("nawupf", "NAWUPF: power-fail atomic write unit, 0's based (0: atomic.awupf); "
                                "<= nawun")
    nabsn: int = _atomic_field("nabsn", "NABSN: atomic boundary size for NAWUN, 0's based, a power of two "
                               "minus one (0: no boundaries)")
    nabo: int = _atomic_field("nabo", "NABO: LBA of the first atomic boundary")
    nabspf: int = _atomic_field("nabspf", "NABSPF: atomic boundary size for NAWUPF, 0's based (0: none)")
    detached: bool = attrs.field(default=False, metadata={
        "help": "on: the namespace starts allocated but not attached to the controller (Identify "
                "CNS 10h/11h list it; Namespace Attachment attaches it), at every power-on"})

    def __attrs_post_init__(self) -> None:
        if self.lbaf is not None and self.lba_size is not None:
            raise ConfigError("give lbaf or lba_size, not both")
        problem = self.atomicity().problem()
        if problem is not None:
            raise ConfigError(problem)

    def atomicity(self) -> NamespaceAtomicity:
        """The namespace's own atomicity parameters (:mod:`pcidev_nvme.atomicity`)."""
        return NamespaceAtomicity(self.nawun, self.nawupf, self.nabsn, self.nabo, self.nabspf)

    def format_index(self) -> int | None:
        """The LBA format asked for (``lbaf``, or the one of ``lba_size``), None if neither."""
        if self.lba_size is not None:
            return [lba for lba, _rp in LBA_FORMATS].index(self.lba_size)
        return self.lbaf

    def protection(self) -> tuple[int, int, int] | None:
        """``(pi, pil, mset)`` if any of them is given (the others 0), else None."""
        if self.pi is None and self.pil is None and self.mset is None:
            return None
        return self.pi or 0, self.pil or 0, self.mset or 0


@vmstate("nvme/namespace")
@attrs.frozen
class NamespaceState:
    """A namespace: attached or not, its LBA format, the memory of a ``mem`` backend, and
    (a subsection, for a namespace with metadata or protection) the metadata setting."""

    nsid: U32
    attached: Bool
    lbaf: U8
    mem_fd: FdRef | None = None
    metadata: MetadataState | None = None


@attrs.frozen(eq=False)
class NamespaceHolding:
    """What a namespace holds (:meth:`Namespace.holding`): its data backend, its metadata
    store and its format ``(lbaf, pi, pil, mset)``."""

    backend: Backend
    meta: MetadataStore | None
    fmt: tuple[int, int, int, int]


class Namespace:
    """One namespace: a backend seen as ``nlbas`` logical blocks of ``lba_size`` bytes.

    :param nsid: namespace identifier (1-based).
    :param backend: where the data lives.
    :param lbaf: LBA format index (see :data:`LBAF_TABLE`).
    :param pi: protection information type (0 none, 1..3).
    :param pil: 1: the PI is in the first bytes of the metadata.
    :param mset: 1: extended LBAs.
    :param nguid: 16-byte Namespace Globally Unique Identifier.
    :param eui64: 8-byte IEEE Extended Unique Identifier.
    :param uuid: Namespace UUID.
    :raises ConfigError: the backend's size is not a multiple of 4096, or the LBA
        format is unknown or smaller than the backend allows.

    ``lba_size``, ``lba_shift``, ``nlbas``, ``ms``, ``pi`` and the metadata store change
    only in :meth:`format` (and a migration's :meth:`restore`); the controller quiesces
    I/O to the namespace around it.

    :ivar ms: metadata bytes per block (0: the LBA format has none; the I/O command set
        takes its metadata path only when this is non-zero).
    :ivar pi: protection information type (0 none).
    :ivar pil: 1 when the PI is first in the metadata.
    :ivar mset: 1 for extended LBAs (only meaningful with metadata).
    :ivar protection: the :class:`~pcidev_nvme.protection.PiFormat` when ``pi`` is set.
    :ivar meta: the :class:`~pcidev_nvme.metadata.MetadataStore` when ``ms`` is set.
    """

    #: may be attached to two or more controllers (Identify Namespace NMIC bit 0; SR-IOV)
    shared: bool = False
    #: the namespace's own atomicity parameters (configuration: NAWUN, NAWUPF, NABSN, NABO,
    #: NABSPF; :mod:`pcidev_nvme.atomicity` keeps the limits in effect)
    atomic: NamespaceAtomicity = NO_ATOMICITY

    def __init__(
        self,
        nsid: int,
        backend: Backend,
        *,
        lbaf: int = 0,
        pi: int = 0,
        pil: int = 0,
        mset: int = 0,
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
        self.meta: MetadataStore | None = None
        #: a metadata store opened by :meth:`restore_problem` for the format it checked
        self._prepared: tuple[tuple[int, int, int, int], MetadataStore] | None = None
        self.ms = 0
        #: the ``detached`` option: the controller allocates it without attaching it at power-on
        self.starts_detached = False
        self._set_format(lbaf, pi, pil, mset, config=True)

    # -- format ---------------------------------------------------------------------------

    def _usable(self, lbaf: int) -> bool:
        return format_problem(lbaf, 0, 0, 0, self.backend) is None

    def _set_format(self, lbaf: int, pi: int = 0, pil: int = 0, mset: int = 0, *, config: bool = False,
                    erase: bool = False, mem_fd: int | None = None,
                    prepared: MetadataStore | None = None) -> None:
        problem = format_problem(lbaf, pi, pil, mset, self.backend)
        if problem is not None:
            if config:
                raise ConfigError(f"namespace {self.nsid}: {problem}")
            raise NvmeStatusError(Status.INVALID_FORMAT, problem, param_offset=40)
        if pi:
            warn_slow_crcs()
        new_meta = None
        if LBAF_TABLE[lbaf].ms:
            try:
                new_meta = prepared if prepared is not None else self._open_store(
                    (lbaf, pi, pil, mset), erase=erase, mem_fd=mem_fd)
            except ConfigError as exc:
                if config:
                    raise
                raise NvmeStatusError(Status.INTERNAL, f"namespace {self.nsid}: {exc}") from exc
        old = self._install(lbaf, pi, pil, mset, new_meta)
        if old is not None and old is not new_meta:
            if new_meta is None:
                old.remove()
            else:
                old.close()

    def _open_store(self, want: tuple[int, int, int, int], *, erase: bool,
                    mem_fd: int | None = None) -> MetadataStore | None:
        """A metadata store for the format ``want`` (its LBA format has metadata).

        :raises ConfigError: the store cannot be made.
        """
        lbaf, pi, pil, _mset = want
        f = LBAF_TABLE[lbaf]
        pattern = PiFormat(pi, f.pif, f.ms, f.size, bool(pil)).store_pattern if pi else None
        return open_metadata(self.backend, f.ms, self.size >> (f.size.bit_length() - 1), pattern,
                             erase=erase, mem_fd=mem_fd, current=self.meta)

    def _install(self, lbaf: int, pi: int, pil: int, mset: int, meta: MetadataStore | None) -> MetadataStore | None:
        """Take the format and the metadata store (checked, opened); returns the store it
        replaces (still open: the caller closes it), None if there was none or it stays."""
        f = LBAF_TABLE[lbaf]
        old = self.meta
        self.meta = meta if f.ms else None
        self.lbaf = lbaf
        self.lba_size = f.size
        self.lba_shift = f.size.bit_length() - 1
        self.nlbas = self.size >> self.lba_shift
        self.pi = pi
        self.pil = pil
        self.mset = mset
        self.protection = PiFormat(pi, f.pif, f.ms, f.size, bool(pil)) if pi else None
        self.ms = f.ms
        return old if old is not None and old is not self.meta else None

    # -- state ---------------------------------------------------------------------------
    def snapshot(self, *, attached: bool, mem_fd: FdRef | None = None,
                 meta_fd: FdRef | None = None) -> NamespaceState:
        """The namespace's state.

        :param attached: whether the controller has it attached.
        :param mem_fd: reference to the descriptor of its memory (a ``mem`` backend).
        :param meta_fd: reference to the descriptor of its metadata memory (a ``mem``
            backend with metadata).
        """
        meta = None
        if self.ms:  # (pi and mset mean nothing without metadata)
            meta = MetadataState(pi=self.pi, pil=bool(self.pil), mset=bool(self.mset), mem_fd=meta_fd)
        return NamespaceState(nsid=self.nsid, attached=attached, lbaf=self.lbaf, mem_fd=mem_fd, metadata=meta)

    def prepare_restore(self, state: NamespaceState, *, meta_fd: int | None = None) -> None:
        """The part of a restore that can fail, done before anything changes: open the
        metadata store :meth:`restore` takes for ``state``'s format (a ``file`` namespace's
        sidecar :meth:`restore_problem` opened is kept).

        :param meta_fd: the migrated metadata memfd (a ``mem`` namespace), to map
            instead of this namespace's own metadata memory.
        :raises ConfigError: the store cannot be made (then nothing is held open).
        """
        want = self.wanted_format(state)
        if not LBAF_TABLE[want[0]].ms:
            self.drop_prepared()
            return
        if meta_fd is None:
            prepared = self._prepared
            if prepared is not None and prepared[0] == want:
                return  # (restore_problem opened it)
            self.drop_prepared()
            if (self.lbaf, self.pi, self.pil, self.mset) == want:
                return  # it keeps the store it has
        else:
            self.drop_prepared()
        store = self._open_store(want, erase=False, mem_fd=meta_fd)
        if store is not None:
            self._prepared = (want, store)

    def restore(self, state: NamespaceState) -> MetadataStore | None:
        """Take the LBA format and metadata setting of a checked ``state``, with the store
        :meth:`prepare_restore` (or :meth:`restore_problem`) opened for it.

        :returns: the metadata store it replaced, still open: the caller closes it once
            the load is committed (or puts it back with :meth:`reinstate`); None if
            nothing was replaced.
        :raises NvmeStatusError: (without a prepared store only) the store cannot be opened.
        """
        want = self.wanted_format(state)
        prepared, self._prepared = self._prepared, None
        store = None
        if prepared is not None:
            if prepared[0] == want:
                store = prepared[1]
            else:
                prepared[1].discard()
        if store is None:
            if (self.lbaf, self.pi, self.pil, self.mset) == want:
                return None
            if LBAF_TABLE[want[0]].ms:
                try:
                    store = self._open_store(want, erase=False)
                except ConfigError as exc:
                    raise NvmeStatusError(Status.INTERNAL, f"namespace {self.nsid}: {exc}") from exc
        if want[1]:
            warn_slow_crcs()
        return self._install(*want, store)

    def holding(self) -> NamespaceHolding:
        """What the namespace holds now: its backend, metadata store and format (what a
        failed vmstate load puts back with :meth:`reinstate`)."""
        return NamespaceHolding(self.backend, self.meta, (self.lbaf, self.pi, self.pil, self.mset))

    def reinstate(self, held: NamespaceHolding) -> NamespaceHolding:
        """Hold ``held`` again (from :meth:`holding` before a load that failed).

        :returns: what it held instead (the failed load's memory and stores: the caller
            closes what differs from ``held``).
        """
        now = self.holding()
        self.backend = held.backend
        self._install(*held.fmt, held.meta)
        return now

    @staticmethod
    def wanted_format(state: NamespaceState) -> tuple[int, int, int, int]:
        """The format ``(lbaf, pi, pil, mset)`` a namespace's ``state`` gives."""
        m = state.metadata
        return (state.lbaf, m.pi, int(m.pil), int(m.mset)) if m is not None else (state.lbaf, 0, 0, 0)

    def restore_problem(self, state: NamespaceState) -> str | None:
        """Why ``state``'s format cannot apply here (None: it can). A ``file`` namespace
        whose format changes opens its metadata sidecar now (a file that cannot be opened
        or is not pcidev's is a problem here, not a failure halfway through the restore);
        :meth:`restore` then takes that store. A sidecar this check had to create is
        removed again at once (:meth:`prepare_restore` creates it in the apply): a load
        refused by a later check leaves no file behind."""
        want = self.wanted_format(state)
        problem = format_problem(*want, self.backend)
        if problem is not None:
            return problem
        self.drop_prepared()
        f = LBAF_TABLE[want[0]]
        if (not f.ms or (self.lbaf, self.pi, self.pil, self.mset) == want
                or getattr(self.backend, "kind", None) != "file"):
            return None
        pattern = PiFormat(want[1], f.pif, f.ms, f.size, bool(want[2])).store_pattern if want[1] else None
        try:
            store = open_metadata(self.backend, f.ms, self.size >> (f.size.bit_length() - 1), pattern,
                                  erase=False, current=self.meta)
        except ConfigError as exc:
            return str(exc)
        if store is not None:
            if getattr(store, "created", False):
                # made only to check: removed at once (a later part's check may refuse the
                # load, and the framework does not say so); the apply's prepare_restore
                # creates it again, once every check passed
                store.discard()
            else:
                self._prepared = (want, store)
        return None

    def drop_prepared(self) -> None:
        """Close the metadata store :meth:`restore_problem` or :meth:`prepare_restore`
        opened (the load failed or was not applied): a sidecar is unlinked only if that
        store created it (:meth:`~pcidev_nvme.metadata.MetadataStore.discard`)."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            prepared[1].discard()

    def metadata_bytes(self, lbaf: int) -> int:
        """Bytes of metadata the LBA format ``lbaf`` needs on this namespace."""
        f = LBAF_TABLE[lbaf]
        return f.ms * (self.size >> (f.size.bit_length() - 1))

    def replace_backend(self, backend: Backend) -> Backend:
        """Use ``backend`` (same size: migrated memory) from now on; returns the old one."""
        old, self.backend = self.backend, backend
        return old

    @property
    def read_only(self) -> bool:
        """Whether the namespace is write protected (its backend refuses writes)."""
        return bool(getattr(self.backend, "read_only", False))

    def format(self, lbaf: int, ses: int, pi: int = 0, pil: int = 0, mset: int = 0) -> None:
        """Format NVM on this namespace: switch LBA format, optionally erase.

        :param lbaf: the new LBA format index.
        :param pi: protection information type (0 none).
        :param pil: 1: PI first in the metadata.
        :param mset: 1: extended LBAs.
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
        problem = format_problem(lbaf, pi, pil, mset, self.backend)
        if problem is not None:
            raise NvmeStatusError(Status.INVALID_FORMAT, problem, param_offset=40)
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
            self._set_format(lbaf, pi, pil, mset, erase=True)
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
            # NSFEAT: NPWG..NOWS valid; DAE; NSABP
            NSFEAT_OPTPERF | (NSFEAT_DAE if self.dae else 0) | (NSFEAT_NSABP if self.atomic.nsabp else 0),
            0,  # NLBAF: identify_capabilities
            self.flbas,  # FLBAS
            0,  # MC: identify_capabilities
            0,  # DPC: identify_capabilities
            self.pi | (DPS_PI_FIRST if self.pi and self.pil else 0),  # DPS
            int(self.shared),  # NMIC bit 0: may be attached to two or more controllers (SR-IOV)
            0,  # RESCAP
            0,  # FPI
            DLFEAT_READ_ZEROES | DLFEAT_WZ_DEAC,  # DLFEAT
        )
        struct.pack_into("<6H", buf, 34, *self.atomic.identify_fields())  # NAWUN NAWUPF NACWU NABSN NABO NABSPF
        # NOIOB (46): no optimal I/O boundary.
        buf[48:64] = self.size.to_bytes(16, "little")  # NVMCAP
        npwg = per_page - 1
        nows = max(OPTIMAL_WRITE_SIZE // lbas, 1) - 1
        struct.pack_into("<HHHHH", buf, 64, npwg, npwg, npwg, npwg, nows)  # NPWG NPWA NPDG NPDA NOWS
        mssrl, mcl, msrc = COPY_LIMITS
        struct.pack_into("<HIB", buf, 74, mssrl, mcl, msrc)  # MSSRL MCL MSRC
        buf[99] = 1 if self.read_only else 0  # NSATTR: write protected
        struct.pack_into("<H", buf, 102, 1)  # ENDGID: the one endurance group (pcidev_nvme.endurance.ENDGID)
        buf[104:120] = self.nguid
        buf[120:128] = self.eui64
        identify_capabilities(buf, self.metadata_capable)
        return bytes(buf)

    @property
    def dae(self) -> bool:
        """NSFEAT.DAE: the backend tells never-written and deallocated blocks from written
        ones (its ``holes``: ``file`` and ``mem``; ``null`` keeps nothing and reports every
        block written), so Error Recovery may enable the Deallocated or Unwritten Logical
        Block error (``pcidev_nvme.lba_status.first_deallocated``)."""
        return bool(getattr(self.backend, "holes", False))

    @property
    def metadata_capable(self) -> bool:
        """Whether this namespace's backend can keep metadata (LBA formats 2 .. 8)."""
        return metadata_supported(self.backend)

    @property
    def flbas(self) -> int:
        """Identify Namespace FLBAS: format index 3:0 and 6:5, extended LBAs (bit 4)."""
        ext = FLBAS_EXTENDED if self.ms and self.mset else 0
        return self.lbaf & 0xF | ext | (self.lbaf >> 4 & 0x3) << 5

    @property
    def extended(self) -> bool:
        """Metadata travels interleaved with the data (extended LBAs)."""
        return bool(self.ms and self.mset)

    def identify_csi_nvm(self) -> bytes:
        """The NVM command set specific Identify Namespace structure (CNS 05h, CSI 0):
        :func:`identify_elbaf` of the formats this namespace offers.

        :returns: 4096 bytes.
        """
        return identify_elbaf(self.metadata_capable)

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
        """Close the backend and the metadata store. Idempotent."""
        self.drop_prepared()
        if self.meta is not None:
            self.meta.close()
        self.backend.close()

    def flush(self) -> None:
        """Make every completed write durable: the data, then the metadata.

        :raises OSError: the backend or the metadata store failed to flush.
        """
        self.backend.flush()
        if self.meta is not None:
            self.meta.flush()

    def inheritable_fds(self) -> dict[str, int]:
        """The descriptors of the namespace's metadata store a handover's new process
        takes over (the backend's are asked separately)."""
        return self.meta.inheritable_fds() if self.meta is not None else {}

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


def stored_identifiers(backend: Any) -> tuple[bytes, bytes, uuidlib.UUID] | None:
    """(NGUID, EUI-64, UUID) the identity file of ``backend``'s image holds, or None when it
    has none (nothing is written).

    :raises ConfigError: the identity file is unreadable or incomplete.
    """
    path = getattr(backend, "identity_path", None)
    stored = _load_identity(path) if path else None
    if stored is None:
        return None
    try:
        return (_hexbytes(stored["nguid"], 16, "nguid"), _hexbytes(stored["eui64"], 8, "eui64"),
                _parse_uuid(stored["uuid"]))
    except KeyError as exc:
        raise ConfigError(f"namespace identity file {path} lacks {exc}") from None


def remember_identity(ns: Namespace) -> bool:
    """Write the namespace's identifiers and format to its identity file (a namespace built
    with ``remember=False``, once it is the controller's: a migration's load, after it is
    committed).

    :returns: whether the file now holds them (``False`` without an identity file or when
        it cannot be written). A file that holds them already is left as it is (no write on
        a migration's resume).
    """
    path = getattr(ns.backend, "identity_path", None)
    try:
        if path and _load_identity(path) == _identity_data(ns):
            return True
    except ConfigError:
        pass  # (unreadable: written anew)
    return _save_identity(ns)


def _identity_data(ns: Namespace) -> dict[str, Any]:
    """What the identity file of ``ns`` holds (JSON object)."""
    data: dict[str, Any] = {"nguid": ns.nguid.hex(), "eui64": ns.eui64.hex(), "uuid": str(ns.uuid), "lbaf": ns.lbaf}
    if ns.pi or ns.pil or ns.mset:
        data.update(pi=ns.pi, pil=ns.pil, mset=ns.mset)
    return data


def _save_identity(ns: Namespace) -> bool:
    """Write the namespace's identifiers and format to its identity file, if any.

    :returns: whether the file now holds them (``False`` without an identity file
        or when it cannot be written).
    """
    path = getattr(ns.backend, "identity_path", None)
    if not path or not may_write_beside(ns.backend):
        return False
    data = _identity_data(ns)
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
    remember: bool = True,
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
    :param remember: write the identity file beside the image when it lacks what the
        namespace uses (False: write nothing -- a migration's load builds the namespaces of
        its records with their identifiers and writes the file once it is committed,
        :func:`remember_identity`; a ``file`` image must then exist).
    :returns: the namespace.
    :raises ConfigError: bad spec, unknown backend or option, or backend failure.
    """
    kind, options = parse_spec(spec)
    ns_options = take_options(NamespaceOptions, options, what="namespace")
    lbaf = ns_options.format_index()
    protection = ns_options.protection()
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
                    if protection is None:
                        kept = [stored.get(k, 0) for k in ("pi", "pil", "mset")]
                        if all(isinstance(v, int) for v in kept):
                            protection = (kept[0], kept[1], kept[2])
        nguid = explicit.get("nguid", nguid)
        eui64 = explicit.get("eui64", eui64)
        uuid = explicit.get("uuid", uuid)
        if lbaf is None:
            lbaf = 0 if getattr(backend, "min_block", 512) <= 512 else 1
        pi, pil, mset = protection or (0, 0, 0)
        ns = Namespace(nsid, backend, lbaf=lbaf, pi=pi, pil=pil, mset=mset, nguid=nguid, eui64=eui64, uuid=uuid)
        ns.atomic = ns_options.atomicity()
        ns.starts_detached = ns_options.detached
        remembered = (stored.get("lbaf"), stored.get("pi", 0), stored.get("pil", 0),
                      stored.get("mset", 0)) if stored is not None else None
        if remember and path and (remembered != (ns.lbaf, ns.pi, ns.pil, ns.mset) or explicit):
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
