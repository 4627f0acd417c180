"""pcidev.ratelog: a guest repeating a bad access cannot flood the log."""

from __future__ import annotations

import logging

from pcidev.ratelog import RateLimitedLog


def test_a_burst_passes_then_lines_are_counted_not_logged(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr("pcidev.ratelog.time.monotonic", lambda: now[0])
    warn = RateLimitedLog(logging.getLogger("t"), burst=3, period=5.0)
    with caplog.at_level(logging.WARNING, logger="t"):
        for i in range(1000):
            warn("bad access %d", i)
        assert [r.getMessage() for r in caplog.records] == ["bad access 0", "bad access 1", "bad access 2"]
        assert warn.suppressed == 997
        now[0] += 6
        warn("again")
    assert [r.getMessage() for r in caplog.records[3:]] == ["997 similar messages suppressed", "again"]
    assert warn.suppressed == 0
