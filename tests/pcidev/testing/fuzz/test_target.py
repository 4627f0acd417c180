"""The memory-growth invariant (:class:`~pcidev.testing.fuzz.target.RssWatch`) and the
engines' use of it."""

from __future__ import annotations

import pytest

from pcidev.testing.fuzz import FuzzFinding, FuzzTarget, target
from pcidev.testing.fuzz.engine import FindingLog, run_one


def test_resident_set_is_measured():
    assert 1 < target.resident_mb() < 1 << 20


def test_rss_watch_samples_every_n_inputs_and_flags_growth_past_the_first_sample(monkeypatch):
    samples = iter([100.0, 150.0, 700.0, 710.0])
    taken: list[float] = []

    def fake() -> float:
        taken.append(next(samples))
        return taken[-1]

    monkeypatch.setattr(target, "resident_mb", fake)
    watch = target.RssWatch(every=3, growth_mb=512)
    for _ in range(2):
        watch.tick()
    assert taken == []  # not sampled between two multiples of `every`
    watch.tick()  # 3rd input: the baseline (100)
    for _ in range(3):
        watch.tick()  # 6th: 150, within the bound
    for _ in range(2):
        watch.tick()
    with pytest.raises(FuzzFinding) as err:
        watch.tick()  # 9th: 700 - 100 > 512
    assert err.value.invariant == "memory-growth" and "600 MiB" in err.value.detail
    for _ in range(3):
        watch.tick()  # 12th: 710, the baseline moved to 700: reported once
    assert taken == [100.0, 150.0, 700.0, 710.0]


class _Quiet(FuzzTarget):
    name = "quiet"

    def run(self, data: bytes) -> None:
        pass


def test_run_one_records_memory_growth_as_a_finding(monkeypatch, tmp_path):
    sizes = iter([10.0, 2000.0])
    monkeypatch.setattr(target, "resident_mb", lambda: next(sizes))
    log = FindingLog(tmp_path, "quiet")
    watch = target.RssWatch(every=1, growth_mb=512)
    assert run_one(_Quiet(), b"a", log, watch) is None
    line = run_one(_Quiet(), b"b", log, watch)
    assert line is not None and "memory-growth" in line
    assert [p.read_bytes() for p in tmp_path.iterdir() if p.suffix == ".bin"] == [b"b"]
