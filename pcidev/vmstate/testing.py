"""Test helpers for state descriptions, reusable by every device type.

* :func:`assert_schema_matches` — the committed-schema snapshot check;
* :func:`strategy_for` — a hypothesis strategy producing valid state objects of any
  state class (hypothesis is imported lazily: it is a test dependency).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pcidev.vmstate.description import (
    KArray,
    KBool,
    KBytes,
    KFd,
    KNullable,
    KSInt,
    KStr,
    KStruct,
    KSub,
    KUInt,
    fields_of,
)
from pcidev.vmstate.schema import check_schema_compat, schema_of
from pcidev.vmstate.types import FdRef

__all__ = ["UPDATE_ENV", "assert_schema_matches", "schema_json", "strategy_for"]

#: Environment variable: ``1`` lets :func:`assert_schema_matches` create a missing
#: snapshot or rewrite one after a *compatible* change; ``force`` rewrites it even
#: after an incompatible change (a deliberate break: say so in the migrations notes).
UPDATE_ENV = "PCIDEV_UPDATE_SCHEMAS"


def schema_json(cls: type) -> str:
    """The canonical JSON text of a state class's schema, as committed.

    :param cls: a state class.
    :returns: indented, key-sorted JSON with a final newline.
    """
    return json.dumps(schema_of(cls), indent=2, sort_keys=True) + "\n"


def assert_schema_matches(cls: type, path: str | os.PathLike[str]) -> None:
    """Fail unless ``cls``'s schema equals the snapshot committed at ``path``.

    When it differs, the failure lists the problems found by
    :func:`~pcidev.vmstate.schema.check_schema_compat` (a change without a version
    bump, a removed subsection, a missing upgrade step, ...).  A compatible change
    (a version bump done right, a new subsection) still fails until the snapshot is
    refreshed, so the snapshot always holds the last released layout: re-run with
    ``PCIDEV_UPDATE_SCHEMAS=1`` (and commit a golden stream of the old version).

    :param cls: a state class.
    :param path: the committed JSON schema file.
    :raises AssertionError: on a missing or differing snapshot.
    """
    path = Path(path)
    update = os.environ.get(UPDATE_ENV, "")
    new = schema_of(cls)
    name = new["name"]
    if not path.exists():
        if update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(schema_json(cls))
            return
        raise AssertionError(f"no committed schema for {name!r} at {path}; "
                             f"run the test with {UPDATE_ENV}=1 to create it")
    old = json.loads(path.read_text())
    if old == new:
        return
    problems = check_schema_compat(old, new)
    if problems:
        if update == "force":
            path.write_text(schema_json(cls))
            return
        lines = "\n  ".join(problems)
        raise AssertionError(
            f"state description {name!r} changed incompatibly with the committed schema {path}:\n  "
            f"{lines}\nBump the version with an upgrade step, or move new state into a subsection.")
    if update:
        path.write_text(schema_json(cls))
        return
    raise AssertionError(
        f"state description {name!r} changed compatibly (version {old.get('version')} -> "
        f"{new['version']}); commit a golden stream of the old version if it was released, then "
        f"refresh {path} by re-running with {UPDATE_ENV}=1")


def strategy_for(cls: type) -> Any:
    """A hypothesis strategy generating valid state objects of ``cls``.

    Variable-length values are kept short (at most 8 array elements, 64 bytes) so
    round trips stay fast; pointer arrays get arbitrary null patterns.

    :param cls: a state class.
    :returns: a ``hypothesis.strategies.SearchStrategy``.
    """
    from hypothesis import strategies as st

    kwargs = {spec.alias: _kind_strategy(spec.kind, st) for spec in fields_of(cls)}
    return st.builds(cls, **kwargs)


def _kind_strategy(kind: Any, st: Any) -> Any:
    if isinstance(kind, KUInt):
        return st.integers(0, (1 << kind.bits) - 1)
    if isinstance(kind, KSInt):
        return st.integers(-(1 << (kind.bits - 1)), (1 << (kind.bits - 1)) - 1)
    if isinstance(kind, KBool):
        return st.booleans()
    if isinstance(kind, KBytes):
        if kind.length is not None:
            return st.binary(min_size=kind.length, max_size=kind.length)
        return st.binary(max_size=min(kind.max_length, 64))
    if isinstance(kind, KStr):
        return st.text(max_size=min(kind.max_length // 4, 16))
    if isinstance(kind, KFd):
        return st.builds(FdRef, st.integers(0, 0xFFFF_FFFF))
    if isinstance(kind, KStruct):
        return st.deferred(lambda: strategy_for(kind.cls))
    if isinstance(kind, KSub):
        return st.none() | st.deferred(lambda: strategy_for(kind.cls))
    if isinstance(kind, KNullable):
        return st.none() | _kind_strategy(kind.inner, st)
    if isinstance(kind, KArray):
        elem = _kind_strategy(kind.element, st)
        if kind.length is not None:
            return st.lists(elem, min_size=kind.length, max_size=kind.length).map(tuple)
        hi = 8 if kind.max_length is None else min(kind.max_length, 8)
        return st.lists(elem, max_size=hi).map(tuple)
    raise TypeError(f"unknown kind {kind!r}")  # pragma: no cover
