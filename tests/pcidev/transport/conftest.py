"""Fixtures of the transport tests: an edu device served over the device link."""

from __future__ import annotations

import pytest
from hostile_peer import ServedLink


@pytest.fixture
def served(tmp_path):
    """An edu endpoint served in a thread; yields (address, endpoint, server)."""
    with ServedLink(tmp_path, io_timeout=1.0) as s:
        yield s.address, s.ep, s.server
