"""The frames of the migration channel (:mod:`pcidev.migration.frames`): what
:func:`~pcidev.migration.frames.frame_meta` accepts of a peer's msgpack body."""

from __future__ import annotations

import msgpack
import pytest

from pcidev.errors import TransportError
from pcidev.migration.frames import RUNNING, frame_meta


def test_a_key_that_may_be_nil_must_still_be_there():
    # found by the migration-source fuzz target: RUNNING {} after COMMIT passed the check
    # (a missing key read as nil) and migrate_out then failed with a KeyError
    with pytest.raises(TransportError, match="'running_at' missing"):
        frame_meta(RUNNING, msgpack.packb({"boot_id": "x"}), {"running_at": (float, type(None))})
    assert frame_meta(RUNNING, msgpack.packb({"running_at": None}), {"running_at": (float, type(None))}) == \
        {"running_at": None}
    assert frame_meta(RUNNING, msgpack.packb({"running_at": 2}), {"running_at": float})["running_at"] == 2


def test_a_wrong_type_or_a_body_that_is_not_a_map_is_refused():
    with pytest.raises(TransportError, match="wrong type"):
        frame_meta(RUNNING, msgpack.packb({"running_at": "soon"}), {"running_at": float})
    with pytest.raises(TransportError, match="not a map"):
        frame_meta(RUNNING, msgpack.packb([1.0]), {"running_at": float})
    with pytest.raises(TransportError, match="not msgpack"):
        frame_meta(RUNNING, b"\xc1", {"running_at": float})
