"""Coverage-guided fuzzing of devices, transports and streams (``pcidev fuzz``).

* what a target is (:class:`FuzzTarget`), the
  error it raises when an invariant breaks (:class:`FuzzFinding`) and a byte reader
  for decoding inputs (:class:`FuzzInput`);
* the framework's targets (``BUILTIN_TARGETS`` of ``pcidev.testing.fuzz.catalogue``):
  ``vfio-user`` (:mod:`~pcidev.testing.fuzz.vfio_user_target`),
  ``vmstate`` (:mod:`~pcidev.testing.fuzz.vmstate_target`), ``link``
  (:mod:`~pcidev.testing.fuzz.link_target`), ``migration``
  (:mod:`~pcidev.testing.fuzz.migration_target`), ``migration-source``
  (:mod:`~pcidev.testing.fuzz.migration_source_target`); ``vfio-user`` and ``link`` share
  their session loop (:mod:`~pcidev.testing.fuzz.peer_session`); plugins add theirs as registry components
  of kind ``fuzz-target`` (the NVMe plugin's ``nvme-guest``,
  :mod:`pcidev_nvme.testing.fuzz`), found by :func:`target_factories`;
* :mod:`pcidev.testing.fuzz.engine`: libFuzzer through atheris (the ``fuzz`` extra)
  and a pure-Python random mutator.

A target runs without any engine: ``target.run(data)`` replays one input, which is
how the committed regression corpus (``tests/fuzz/corpus/<target>/``) is replayed
by the normal test run. See docs/fuzzing.md.
"""

from __future__ import annotations

from pcidev.testing.fuzz.catalogue import make_target, target_factories
from pcidev.testing.fuzz.target import ErrorLogWatch, FuzzFinding, FuzzInput, FuzzTarget, RssWatch

__all__ = ["ErrorLogWatch", "FuzzFinding", "FuzzInput", "FuzzTarget", "RssWatch",
           "make_target", "target_factories"]
