"""The namespaces of :class:`~pcidev_nvme.controller.NvmeController` (mixed into it):
which exist (allocated), which are attached, which Namespace Management created,
which are being formatted, and the backends a namespace spec may name.

One namespace itself (its blocks, LBA formats, identifiers, Identify data) is
:class:`~pcidev_nvme.namespace.Namespace`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pcidev_nvme import aer as aer_mod
from pcidev_nvme.backends import BUILTIN_BACKENDS
from pcidev_nvme.config import NamespaceSpec, NvmeConfig
from pcidev_nvme.logs import ChangedNamespaces
from pcidev_nvme.namespace import Namespace, make_namespace

__all__ = ["NamespaceSetMixin"]

log = logging.getLogger(__name__)


class NamespaceSetMixin:
    """Namespace bookkeeping of the controller (see the module docstring).

    :ivar namespaces: attached namespaces by NSID (what the I/O command set sees).
    :ivar allocated: every namespace that exists, attached or not, by NSID.
    :ivar created: namespaces created by Namespace Management (restored at power-on):
        NSID -> spec.
    """

    namespaces: dict[int, Namespace]
    allocated: dict[int, Namespace]
    created: dict[int, str]
    _formatting: set[int]
    cfg: NvmeConfig
    state_lock: threading.RLock
    changed_ns: ChangedNamespaces

    if TYPE_CHECKING:  # provided by the other parts of NvmeController
        def notice(self, info: int, lid: int) -> None: ...

    def _init_namespaces(self) -> None:
        """No namespace yet (:meth:`_make_namespaces` builds the configured ones)."""
        self.namespaces = {}
        self.allocated = {}
        self.created = {}
        #: NSIDs being formatted: I/O to them completes with Format In Progress
        self._formatting = set()

    @property
    def total_capacity(self) -> int:
        """TNVMCAP: the configured capacity, or what is allocated if that is more."""
        return max(self.cfg.capacity, self.allocated_capacity)

    @property
    def allocated_capacity(self) -> int:
        """Bytes held by the namespaces that exist."""
        return sum(int(ns.size) for ns in self.allocated.values())

    def backend_registry(self) -> Mapping[str, Any]:
        """The namespace backends by name: ``cfg.backends`` (what
        :meth:`~pcidev.registry.DeviceRegistry.create` resolved from the registry),
        else the built-ins. A controller never loads plugins itself."""
        return self.cfg.backends if self.cfg.backends is not None else BUILTIN_BACKENDS

    def make_namespace(self, nsid: int, spec: NamespaceSpec) -> Namespace:
        """Build namespace ``nsid`` from a spec (see :func:`pcidev_nvme.namespace.make_namespace`)."""
        return make_namespace(nsid, spec, state_dir=self.cfg.state_dir, serial=self.cfg.serial_number,
                              backends=self.backend_registry())

    def _make_namespaces(self) -> None:
        """The configured namespaces, NSID 1, 2, ... in order, attached."""
        for i, spec in enumerate(self.cfg.namespaces, start=1):
            ns = self.make_namespace(i, spec)
            self.allocated[i] = ns
            self.namespaces[i] = ns

    def _close_namespaces(self) -> None:
        """Close every namespace's backend (power off); a failure is logged."""
        for ns in self.allocated.values():
            try:
                ns.close()
            except Exception:
                log.exception("closing namespace %d failed", ns.nsid)

    def begin_format(self, nsids: set[int]) -> list[int]:
        """Mark ``nsids`` as being formatted (I/O to them fails with Format In Progress);
        returns the ones already being formatted instead (then nothing is marked)."""
        with self.state_lock:
            busy = sorted(n for n in nsids if n in self._formatting)
            if not busy:
                self._formatting |= nsids
            return busy

    def end_format(self, nsids: set[int]) -> None:
        """A Format NVM of ``nsids`` finished."""
        with self.state_lock:
            self._formatting -= nsids

    def formats_cleared(self) -> None:
        """A reset or restore: no Format NVM is in progress any more."""
        self._formatting.clear()

    def namespace_changed(self, nsid: int) -> None:
        """Record ``nsid`` in the Changed Namespace List and post the notice."""
        self.changed_ns.add(nsid)
        self.notice(aer_mod.INFO_NS_ATTR_CHANGED, 0x04)
