"""What Namespace Management changed, as a migration carries it: the creation record of
every namespace it created and the configured namespaces it deleted.

A controller builds its configured namespaces at power-on (NSID 1, 2, ... from the
configuration, :attr:`~pcidev_nvme.namespaces.NamespaceSetMixin.configured`); Namespace
Management (admin 0Dh) then creates namespaces and deletes any, and Namespace Attachment
(15h) attaches and detaches them. The migration's fingerprint describes the configured
namespaces only; what changed since travels in the optional subsection ``nvme/ns-management``
of the ``nvme`` section (:class:`NamespaceChangesState`, written only when something
changed, so a stream from before it still loads and means "the configured namespaces,
none created"):

* per created namespace, a :class:`CreatedNamespaceRecord`: NSID, backend kind, size,
  the image path of a ``file`` namespace, NGUID, EUI-64 and UUID. Its LBA format,
  metadata and protection settings, attachment, memory (the ``mem`` memfd), SMART
  counters, error recovery setting and Write Uncorrectable marks travel in the
  per-namespace parts of the ``nvme`` section, as for a configured namespace;
* the NSIDs of the configured namespaces that were deleted (Namespace Management may
  have created another one with the same NSID since: it takes the lowest free NSID).

The destination checks the records in the load's check phase (:func:`plan`: NSIDs within
``max_namespaces``, no duplicates, no created NSID on a configured namespace that is not
deleted, built-in backend kinds, sizes within the capacity, a ``file`` namespace's image
reachable here with its size) and, in the apply phase, makes its namespace table the
source's: it deletes what the source does not have and creates the missing namespaces
the way Namespace Management does (:func:`creation_spec`). A namespace the destination
already has with the same record (a ``file`` namespace its state file brought back, a
reload into the same controller) is kept.
"""

from __future__ import annotations

import os
import stat
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from typing import Protocol

import attrs

from pcidev.vmstate import U32, U64, Bytes, Str, VarArray, vmstate
from pcidev.vmstate.errors import StateError
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.namespace import LBAF_TABLE, Namespace, format_problem

__all__ = ["CreatedNamespaceRecord", "NamespaceChangesState", "NamespacePlan", "NamespaceTables", "KINDS",
           "changes", "record_of", "record_problem", "snapshot", "plan", "creation_spec", "build_problem"]

#: the ``nvme`` vmstate section (the records travel in its subsection ``nvme/ns-management``)
SECTION = "nvme"
#: most records of each kind a stream carries (the controller supports at most 1024 NSIDs)
MAX_RECORDS = 1024
#: the backends a creation record can name (those Namespace Management creates)
KINDS = ("mem", "null", "file")


@vmstate("nvme/created-ns")
@attrs.frozen
class CreatedNamespaceRecord:
    """A namespace created by Namespace Management: what its creation chose and Identify
    reports (its format, attachment and contents travel with every namespace's state).

    :ivar kind: the backend: ``mem``, ``null`` or ``file``.
    :ivar size: bytes (NSZE x the LBA data size; NCAP = NSZE).
    :ivar path: a ``file`` namespace's image, an absolute path (empty otherwise).
    """

    nsid: U32
    kind: Str[16]
    size: U64
    nguid: Bytes[16]
    eui64: Bytes[8]
    uuid: Bytes[16]
    path: Str[4096] = ""


@vmstate("nvme/ns-management")
@attrs.frozen
class NamespaceChangesState:
    """What Namespace Management changed: the created namespaces (ascending NSID) and the
    configured NSIDs it deleted."""

    created: VarArray[CreatedNamespaceRecord, MAX_RECORDS] = ()
    deleted: VarArray[U32, MAX_RECORDS] = ()


class NamespaceTables(Protocol):
    """What this module reads of the controller's namespace tables
    (:class:`~pcidev_nvme.namespaces.NamespaceSetMixin`)."""

    cfg: NvmeConfig

    @property
    def state_dir(self) -> str | None: ...
    @property
    def allocated(self) -> Mapping[int, Namespace]: ...
    @property
    def configured(self) -> Mapping[int, Namespace]: ...


# ----------------------------------------------------------------------------- the source's side
def changes(tables: NamespaceTables) -> tuple[list[int], list[int]]:
    """(NSIDs of namespaces Namespace Management created, configured NSIDs it deleted): a
    namespace is a configured one while it is the very object the configuration built."""
    allocated, configured = dict(tables.allocated), dict(tables.configured)  # (snapshots: see remove_namespace)
    created = sorted(n for n, ns in allocated.items() if configured.get(n) is not ns)
    deleted = sorted(n for n, ns in configured.items() if allocated.get(n) is not ns)
    return created, deleted


def _kind(ns: Namespace) -> str:
    b = ns.backend
    return str(getattr(b, "kind", type(b).__name__))


def record_of(ns: Namespace) -> CreatedNamespaceRecord:
    """The creation record of namespace ``ns``."""
    kind = _kind(ns)
    path = getattr(ns.backend, "path", None) if kind == "file" else None
    return CreatedNamespaceRecord(nsid=ns.nsid, kind=kind, size=int(ns.size), nguid=bytes(ns.nguid),
                                  eui64=bytes(ns.eui64), uuid=ns.uuid.bytes,
                                  path=os.path.abspath(str(path)) if path else "")


def record_problem(ns: Namespace) -> str | None:
    """Why created namespace ``ns`` cannot follow the controller (a blocker, reported before
    anything stops), or None. A backend other than the built-in ones is the allow-list's
    business (its own blocker); a ``file`` namespace must be reachable by its path."""
    kind = _kind(ns)
    if kind not in KINDS:
        return None
    b = ns.backend
    if ns.atomic.configured:
        return "it has atomicity parameters, which a creation record does not carry"
    if kind != "file":
        return None
    if getattr(b, "direct", False) or getattr(b, "read_only", False):
        return "its image is opened O_DIRECT or read-only, which a creation record does not carry"
    path = str(getattr(b, "path", "") or "")
    fd = getattr(b, "fd", -1)
    try:
        here, held = os.stat(path), os.fstat(fd)
    except (OSError, TypeError) as exc:
        return f"its image {path} cannot be reached by its path ({getattr(exc, 'strerror', exc)})"
    if (here.st_dev, here.st_ino) != (held.st_dev, held.st_ino):
        return f"its image {path} names another file now (renamed or replaced): a destination cannot reach it"
    return None


def snapshot(tables: NamespaceTables) -> NamespaceChangesState | None:
    """The records of the moment, or None when nothing changed (the optional subsection is
    then left out: a stream from before it, or to an older destination, is the same)."""
    created, deleted = changes(tables)
    if not created and not deleted:
        return None
    allocated = tables.allocated
    return NamespaceChangesState(created=tuple(record_of(allocated[n]) for n in created), deleted=tuple(deleted))


# ----------------------------------------------------------------------------- the destination's side
@attrs.frozen
class NamespacePlan:
    """How a load turns this controller's namespace table into the stream's (:func:`plan`).

    :ivar sizes: every namespace after the load, NSID -> bytes.
    :ivar remove: NSIDs allocated here that the load deletes (closed when it is committed).
    :ivar build: the records of the namespaces the load creates.
    """

    sizes: Mapping[int, int]
    remove: tuple[int, ...] = ()
    build: tuple[CreatedNamespaceRecord, ...] = ()

    def record(self, nsid: int) -> CreatedNamespaceRecord | None:
        """The record of ``nsid`` if the load creates it."""
        for r in self.build:
            if r.nsid == nsid:
                return r
        return None


def _fail(why: str, path: str) -> StateError:
    return StateError(why, section=SECTION, instance_id=0, path=path)


@attrs.frozen
class _Planned:
    """A namespace not built yet, as :func:`~pcidev_nvme.namespace.format_problem` sees its backend."""

    kind: str
    path: str = ""


def created_image_name(serial: str | None, nsid: int) -> str:
    """The file name of the image Namespace Management creates for ``nsid`` in the state
    directory (:meth:`pcidev_nvme.admin.AdminCommands` ``_create_spec``)."""
    return f"nvme-{serial}-ns{nsid}.img".replace("/", "_")


def _image_problem(rec: CreatedNamespaceRecord, state_dir: str | None, serial: str | None) -> str | None:
    """Why the image of a ``file`` record cannot be reopened here (None: it can). Only the
    image this controller's Namespace Management would create for that NSID is accepted
    (``STATE_DIR/nvme-<serial>-ns<N>.img``, the directory resolved, the file itself no
    symbolic link): a record naming any other file -- another VM's image, a symlink out
    of the directory -- is refused before anything is opened, so a load never writes
    beside, adopts or later deletes a file that is not this controller's."""
    if not os.path.isabs(rec.path):
        return f"image path {rec.path!r} is not absolute"
    if not state_dir:
        return (f"image {rec.path} is not this controller's: it has no state directory, where Namespace "
                "Management creates images")
    name = created_image_name(serial, rec.nsid)
    try:
        here = os.path.realpath(state_dir, strict=True)
        there = os.path.realpath(os.path.dirname(rec.path), strict=True)
    except OSError as exc:
        return f"image {rec.path} cannot be reached here ({exc.strerror}): the destination must see the same file"
    if os.path.basename(rec.path) != name or there != here:
        return (f"image {rec.path} is not the one Namespace Management creates here for namespace {rec.nsid} "
                f"({os.path.join(here, name)})")
    try:
        st = os.lstat(rec.path)
    except OSError as exc:
        return f"image {rec.path} cannot be reached here ({exc.strerror}): the destination must see the same file"
    if not stat.S_ISREG(st.st_mode):
        return f"image {rec.path} is not a regular file"
    if st.st_size != rec.size:
        return f"image {rec.path} has {st.st_size} bytes, the namespace {rec.size}"
    if not os.access(rec.path, os.R_OK | os.W_OK, follow_symlinks=False):
        return f"image {rec.path} cannot be opened for reading and writing here"
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def plan(tables: NamespaceTables, state: NamespaceChangesState | None, nsids: Sequence[int]) -> NamespacePlan:
    """Check the stream's records against this controller and say what the load changes.
    Nothing is changed (no file is opened).

    :param state: the stream's records (None: a stream from before them, or one whose
        source changed nothing: the configured namespaces).
    :param nsids: the NSIDs of the stream's namespace list, in order.
    :raises StateError: naming the field.
    """
    cfg = tables.cfg
    allocated, configured = tables.allocated, tables.configured
    ch = state if state is not None else NamespaceChangesState()
    deleted: set[int] = set()
    for j, nsid in enumerate(ch.deleted):
        p = f"ns_management.deleted[{j}]"
        if nsid not in configured:
            raise _fail(f"namespace {nsid} is not one of the {len(configured)} configured namespaces", p)
        if nsid in deleted:
            raise _fail(f"configured namespace {nsid} is deleted twice", p)
        deleted.add(nsid)
    sizes = {n: int(ns.size) for n, ns in configured.items() if n not in deleted}
    images = {n: str(getattr(ns.backend, "path", "") or "") for n, ns in configured.items() if n not in deleted}
    records: dict[int, CreatedNamespaceRecord] = {}
    keep: set[int] = set()
    for j, rec in enumerate(ch.created):
        p = f"ns_management.created[{j}]"
        if not 1 <= rec.nsid <= cfg.max_namespaces:
            raise _fail(f"created namespace {rec.nsid} is outside NSIDs 1..{cfg.max_namespaces}", p + ".nsid")
        if rec.nsid in records:
            raise _fail(f"namespace {rec.nsid} is created twice", p + ".nsid")
        if rec.nsid in sizes:
            raise _fail(f"created namespace {rec.nsid} collides with configured namespace {rec.nsid}, "
                        "which is not deleted", p + ".nsid")
        here = allocated.get(rec.nsid)
        if here is not None and configured.get(rec.nsid) is not here and record_of(here) == rec:
            keep.add(rec.nsid)  # this very namespace (brought back by the state file, a reload)
        elif rec.kind not in KINDS:
            raise _fail(f"created namespace {rec.nsid} has backend {rec.kind!r} (Namespace Management "
                        f"creates {', '.join(KINDS)})", p + ".kind")
        if rec.size == 0 or rec.size % 4096 or rec.size > cfg.capacity:
            raise _fail(f"created namespace {rec.nsid} has {rec.size} bytes (a multiple of 4 KiB up to "
                        f"the capacity, {cfg.capacity})", p + ".size")
        if rec.kind == "file":
            # (a namespace held here already has nothing to build or reach)
            why = None if rec.nsid in keep else _image_problem(rec, tables.state_dir, cfg.serial)
            if why is None:
                clash = next((n for n, img in images.items() if img and _same_file(img, rec.path)), None)
                if clash is not None:
                    why = f"image {rec.path} is namespace {clash}'s too"
            if why is not None:
                raise _fail(f"created namespace {rec.nsid}: {why}", p + ".path")
            images[rec.nsid] = rec.path
        elif rec.path:
            raise _fail(f"created {rec.kind} namespace {rec.nsid} names an image path", p + ".path")
        records[rec.nsid] = rec
        sizes[rec.nsid] = rec.size
    mem = sum(r.size for r in records.values() if r.kind == "mem")
    if mem > cfg.mem_create_limit:
        raise _fail(f"the created mem namespaces hold {mem} bytes, more than this controller's mem_create_limit "
                    f"({cfg.mem_create_limit}); give the destination mem_create_limit={mem} or more",
                    "ns_management.created")
    if records and sum(sizes.values()) > cfg.capacity:
        raise _fail(f"the namespaces hold {sum(sizes.values())} bytes, more than the capacity ({cfg.capacity})",
                    "ns_management.created")
    want = sorted(sizes)
    if list(nsids) != want:
        raise _fail(f"namespaces {list(nsids)}, the configuration and Namespace Management records make {want}",
                    "namespaces")
    for nsid in sizes:
        if nsid not in records:
            if allocated.get(nsid) is not configured[nsid]:
                raise _fail(f"configured namespace {nsid} was deleted on this controller", "namespaces")
            keep.add(nsid)
    return NamespacePlan(sizes=sizes, remove=tuple(sorted(n for n in allocated if n not in keep)),
                         build=tuple(r for n, r in sorted(records.items()) if n not in keep))


def build_problem(rec: CreatedNamespaceRecord, fmt: tuple[int, int, int, int]) -> str | None:
    """Why a namespace built from ``rec`` cannot take the format ``fmt`` ``(lbaf, pi, pil,
    mset)`` (None: it can), checked before it is built."""
    lbaf = fmt[0]
    if not 0 <= lbaf < len(LBAF_TABLE):
        return f"LBA format {lbaf} is not supported"
    if rec.size % LBAF_TABLE[lbaf].size:
        return f"{rec.size} bytes are not a whole number of {LBAF_TABLE[lbaf].size}-byte blocks"
    return format_problem(*fmt, _Planned(rec.kind, rec.path))


def _protection(fmt: tuple[int, int, int, int]) -> str:
    _lbaf, pi, pil, mset = fmt
    return f",pi={pi},pil={pil},mset={mset}" if pi or pil or mset else ""


def creation_spec(rec: CreatedNamespaceRecord, fmt: tuple[int, int, int, int], *, build: bool = False) -> str:
    """The namespace spec of ``rec`` in format ``fmt`` ``(lbaf, pi, pil, mset)``, as
    Namespace Management writes one.

    :param build: the spec to build it with now rather than the one remembered (in the
        state file, for a ``file`` namespace): a ``file`` image is reopened, never created
        (no ``size``: a missing image is an error), with the record's identifiers (the
        load checks that an identity file beside the image holds the same, and writes it
        only once the load is committed: the namespace is built with ``remember=False``);
        a ``mem`` namespace starts without metadata (the load then maps the migrated memory
        and metadata).
    """
    lbaf = fmt[0]
    ids = f",nguid={rec.nguid.hex()},eui64={rec.eui64.hex()},uuid={uuidlib.UUID(bytes=rec.uuid)}"
    if rec.kind == "file":
        escaped = rec.path.replace(",", ",,")  # the spec grammar: a literal comma is ",,"
        if build:  # (never through a symbolic link planted where the checked image was)
            return f"file:path={escaped},nofollow=on,lbaf={lbaf}{_protection(fmt)}{ids}"
        # (remembered: the identifiers are the identity file's, which follows the image)
        return f"file:path={escaped},size={rec.size},lbaf={lbaf}{_protection(fmt)}"
    if build and rec.kind == "mem":
        return f"mem:size={rec.size},lbaf=0{ids}"
    return f"{rec.kind}:size={rec.size},lbaf={lbaf}{_protection(fmt)}{ids}"

