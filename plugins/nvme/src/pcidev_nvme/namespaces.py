"""The namespaces of :class:`~pcidev_nvme.controller.NvmeController` (mixed into it):
which exist (allocated), which are attached, which Namespace Management created,
which are being formatted, and the backends a namespace spec may name.

One namespace itself (its blocks, LBA formats, identifiers, Identify data) is
:class:`~pcidev_nvme.namespace.Namespace`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from pcidev.errors import ConfigError
from pcidev_nvme import aer as aer_mod
from pcidev_nvme.atomicity import namespace_problem
from pcidev_nvme.backends import BUILTIN_BACKENDS
from pcidev_nvme.config import NamespaceSpec, NvmeConfig
from pcidev_nvme.logs import ChangedNamespaces
from pcidev_nvme.namespace import Namespace, make_namespace
from pcidev_nvme.status import NvmeStatusError, Status

__all__ = ["NamespaceSetMixin", "RemovedNamespace", "persists"]

log = logging.getLogger(__name__)


def persists(spec: str) -> bool:
    """Whether a namespace Namespace Management created with ``spec`` outlives the process
    (a ``file`` image: the state file brings it back at power-on; ``mem`` and ``null``
    namespaces end with the process, as their contents do)."""
    return spec.startswith("file:")


class RemovedNamespace(NamedTuple):
    """What :meth:`NamespaceSetMixin.remove_namespace` took out of the tables."""

    #: the namespace (still open: the caller closes it)
    ns: Namespace
    #: it was attached
    was_attached: bool
    #: its spec if Namespace Management created it, else None
    created_spec: str | None


class NamespaceSetMixin:
    """Namespace bookkeeping of the controller (see the module docstring).

    The tables below are changed only by this class's methods (:meth:`add_namespace`,
    :meth:`remove_namespace`, :meth:`attach_namespace`, :meth:`detach_namespace`, :meth:`set_attached`);
    everything else only reads them.

    :ivar namespaces: attached namespaces by NSID (what the I/O command set sees).
    :ivar allocated: every namespace that exists, attached or not, by NSID.
    :ivar created: namespaces created by Namespace Management (or by a migration in, as
        the source's Namespace Management did), NSID -> the spec it was built with; the
        ``file`` ones (:func:`persists`) are saved in the state file and restored at power-on.
    :ivar configured: the namespaces the configuration built at power-on, by NSID, kept
        (closed) after Namespace Management deleted them: what the migration fingerprint
        describes (:mod:`pcidev_nvme.ns_records`). A namespace is a configured one while
        ``allocated[nsid] is configured[nsid]``.
    """

    namespaces: dict[int, Namespace]
    allocated: dict[int, Namespace]
    created: dict[int, str]
    configured: dict[int, Namespace]
    _formatting: dict[int, int]
    cfg: NvmeConfig
    state_lock: threading.RLock
    changed_ns: ChangedNamespaces

    if TYPE_CHECKING:  # provided by the other parts of NvmeController
        def notice(self, info: int, lid: int) -> None: ...
        @property
        def state_dir(self) -> str | None: ...

    def _init_namespaces(self) -> None:
        """No namespace yet (:meth:`_make_namespaces` builds the configured ones)."""
        self.namespaces = {}
        self.allocated = {}
        self.created = {}
        self.configured = {}
        #: NSIDs claimed by a Format NVM or a Namespace Management delete: the status new
        #: I/O to them completes with (Format In Progress; Namespace Not Ready)
        self._formatting = {}

    #: the namespaces are this controller's own (a secondary controller's are its primary's)
    owns_namespaces = True

    @property
    def total_capacity(self) -> int:
        """TNVMCAP: the configured capacity, or what is allocated if that is more."""
        return max(self.cfg.capacity, self.allocated_capacity)

    @property
    def created_mem_bytes(self) -> int:
        """Bytes of the ``mem`` namespaces Namespace Management created (and no one deleted):
        what ``mem_create_limit`` bounds."""
        return sum(int(self.allocated[n].size) for n, spec in self.created.items()
                   if spec.startswith("mem:") and n in self.allocated)

    @property
    def allocated_capacity(self) -> int:
        """Bytes held by the namespaces that exist."""
        return sum(int(ns.size) for ns in list(self.allocated.values()))  # (a snapshot: see remove_namespace)

    @property
    def creates_mem_namespaces(self) -> bool:
        """Whether Namespace Management creates ``mem`` namespaces here (``ns_create=mem``, or
        ``file`` without a state directory to put the image in): ``mem_create_limit`` bounds them."""
        kind = self.cfg.ns_create
        return kind == "mem" or (kind == "file" and not self.state_dir)

    @property
    def unallocated_capacity(self) -> int:
        """UNVMCAP (and the Endurance Group's UEGCAP): the bytes Namespace Management can
        still create, so a host that sizes a create by it is not refused.

        That is TNVMCAP less the allocated capacity, and, when created namespaces are
        ``mem`` (:attr:`creates_mem_namespaces`), at most what ``mem_create_limit`` leaves
        (the limit less :attr:`created_mem_bytes`, rounded down to 4 KiB, the granule of a
        create).

        The specification's UNVMCAP is "the unallocated NVM capacity"; read literally it is
        TNVMCAP less what is allocated. With a ``mem_create_limit`` below that, the rest is
        neither allocated nor allocatable: we report what can be allocated (UNVMCAP is what
        hosts, nvme-cli's ``create-ns`` and the Linux tools alike, size a create by) and
        keep TNVMCAP the configured ``capacity``, so TNVMCAP - UNVMCAP may exceed the
        allocated capacity by what the memory limit withholds.
        """
        room = max(self.total_capacity - self.allocated_capacity, 0)
        if self.creates_mem_namespaces:
            left = max(int(self.cfg.mem_create_limit) - self.created_mem_bytes, 0)
            room = min(room, left - left % 4096)
        return room

    def backend_registry(self) -> Mapping[str, Any]:
        """The namespace backends by name: ``cfg.backends`` (what
        :meth:`~pcidev.registry.DeviceRegistry.create` resolved from the registry),
        else the built-ins. A controller never loads plugins itself."""
        return self.cfg.backends if self.cfg.backends is not None else BUILTIN_BACKENDS

    def make_namespace(self, nsid: int, spec: NamespaceSpec, *, remember: bool = True) -> Namespace:
        """Build namespace ``nsid`` from a spec (see :func:`pcidev_nvme.namespace.make_namespace`;
        ``remember=False``: nothing is written beside its image)."""
        return make_namespace(nsid, spec, state_dir=self.cfg.state_dir, serial=self.cfg.serial_number,
                              backends=self.backend_registry(), remember=remember)

    def _make_namespaces(self) -> None:
        """The configured namespaces, NSID 1, 2, ... in order, attached (but those with the
        ``detached`` option: allocated only, for Namespace Attachment to attach)."""
        cfg = self.cfg
        for i, spec in enumerate(cfg.namespaces, start=1):
            ns = self.make_namespace(i, spec)
            problem = namespace_problem(cfg.awun, cfg.awupf, ns.atomic, ns.lba_size,
                                        (4096 << cfg.mdts) if cfg.mdts else None)
            if problem is not None:  # (the atomicity the namespace's options and the controller's give)
                ns.close()
                raise ConfigError(f"nvme: namespace {i}: {problem}")
            self.add_namespace(i, ns, attached=not ns.starts_detached)
            self.configured[i] = ns

    # -- the verbs that change the tables ----------------------------------------------------------
    def add_namespace(self, nsid: int, ns: Namespace, *, created_spec: str | None = None,
                      attached: bool = False) -> None:
        """Allocate namespace ``nsid``.

        :param nsid: its NSID (not allocated yet).
        :param ns: the namespace.
        :param created_spec: the spec to remember when Namespace Management created it
            (a ``file`` one is saved in the state file and restored at power-on), else None.
        :param attached: attach it too.
        :raises NvmeStatusError: Namespace Identifier Unavailable if ``nsid`` is allocated.
        """
        if nsid in self.allocated:
            raise NvmeStatusError(Status.NS_ID_UNAVAILABLE, f"namespace {nsid} is already allocated")
        self.allocated[nsid] = ns
        if created_spec is not None:
            self.created[nsid] = created_spec
        if attached:
            self.namespaces[nsid] = ns

    def remove_namespace(self, nsid: int) -> RemovedNamespace:
        """Delete namespace ``nsid`` from every table (detaching it first if attached);
        the caller closes it and posts any notice.

        A Namespace Management delete calls this on the admin worker while admin commands
        run on the admin queue's thread: a reader that iterates a table takes a snapshot
        first (``list(d.values())``, ``dict(d)``, ``sorted(d)``: one step for the interpreter).

        :raises NvmeStatusError: Invalid Namespace or Format if ``nsid`` is not allocated.
        """
        ns = self.allocated.pop(nsid, None)
        if ns is None:
            raise NvmeStatusError(Status.INVALID_NSID, f"namespace {nsid:#x} is not allocated")
        was_attached = self.namespaces.pop(nsid, None) is not None
        return RemovedNamespace(ns, was_attached, self.created.pop(nsid, None))

    def attach_namespace(self, nsid: int) -> None:
        """Attach allocated namespace ``nsid`` to the controller.

        :raises NvmeStatusError: Invalid Namespace or Format if it is not allocated,
            Namespace Already Attached if it is attached.
        """
        ns = self.allocated.get(nsid)
        if ns is None:
            raise NvmeStatusError(Status.INVALID_NSID, f"namespace {nsid:#x} is not allocated")
        if nsid in self.namespaces:
            raise NvmeStatusError(Status.NS_ALREADY_ATTACHED, f"namespace {nsid} is already attached")
        self.namespaces[nsid] = ns

    def detach_namespace(self, nsid: int) -> None:
        """Detach namespace ``nsid`` (it stays allocated).

        :raises NvmeStatusError: Namespace Not Attached if it is not attached.
        """
        if nsid not in self.namespaces:
            raise NvmeStatusError(Status.NS_NOT_ATTACHED, f"namespace {nsid} is not attached")
        del self.namespaces[nsid]

    def set_attached(self, nsids: Iterable[int]) -> None:
        """Attach exactly ``nsids`` (a restore); the ``namespaces`` dict stays the same object.

        :raises NvmeStatusError: Invalid Namespace or Format if one is not allocated
            (then nothing changes).
        """
        attached = {}
        for nsid in nsids:
            ns = self.allocated.get(nsid)
            if ns is None:
                raise NvmeStatusError(Status.INVALID_NSID, f"namespace {nsid:#x} is not allocated")
            attached[nsid] = ns
        self.namespaces.clear()
        self.namespaces.update(attached)

    def _close_namespaces(self) -> None:
        """Close every namespace's backend (power off); a failure is logged."""
        for ns in self.allocated.values():
            try:
                ns.close()
            except Exception:
                log.exception("closing namespace %d failed", ns.nsid)

    def begin_format(self, nsids: set[int], *, status: int = Status.FORMAT_IN_PROGRESS) -> list[int]:
        """Claim ``nsids`` for a Format NVM (or, with ``status`` Namespace Not Ready, a
        Namespace Management delete): new I/O to them completes with ``status``; returns
        the ones already claimed instead (then nothing is claimed)."""
        with self.state_lock:
            busy = sorted(n for n in nsids if n in self._formatting)
            if not busy:
                self._formatting.update(dict.fromkeys(nsids, status))
            return busy

    def end_format(self, nsids: set[int]) -> None:
        """The Format NVM (or delete) of ``nsids`` finished: they are no longer claimed."""
        with self.state_lock:
            for n in nsids:
                self._formatting.pop(n, None)

    def claim_status(self, nsid: int) -> int | None:
        """The status I/O to ``nsid`` completes with while it is claimed (see
        :meth:`begin_format`), or None."""
        return self._formatting.get(nsid)

    def formats_cleared(self) -> None:
        """A reset or restore: no Format NVM is in progress any more."""
        self._formatting.clear()

    def namespace_changed(self, nsid: int) -> None:
        """Record ``nsid`` in the Changed Namespace List and post the notice."""
        self.changed_ns.add(nsid)
        self.notice(aer_mod.INFO_NS_ATTR_CHANGED, 0x04)
