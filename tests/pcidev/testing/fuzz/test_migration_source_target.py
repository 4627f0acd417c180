"""The ``migration-source`` fuzz target (:mod:`pcidev.testing.fuzz.migration_source_target`):
its seeds reach each end of ``migrate_out``, and each of its checks fires."""

from __future__ import annotations

import time

import pytest

from pcidev.errors import MigrationError
from pcidev.migration.frames import CHECK, CHUNK, COMMIT, MEMORY, OFFER, STATE, SYNC
from pcidev.testing.fuzz import FuzzFinding
from pcidev.testing.fuzz import migration_source_target as mst


@pytest.fixture
def target():
    t = mst.MigrationSourceTarget()
    # generous deadlines (the machine is shared): the well-behaved seeds then always migrate,
    # and the pauses of the "too late" seeds are this long
    t.stop_seconds, t.running_seconds = 1.0, 0.5
    t.setup()
    yield t
    t.close()


def test_the_seeds_migrate_once_and_are_refused_otherwise(target):
    seeds = list(target.seeds())
    target.run(seeds[0])  # the well-behaved destination
    assert target.transcript == [CHECK, OFFER, STATE, COMMIT, "MigrationResult"]
    target.run(seeds[1])  # the pre-flight says no: nothing stopped
    assert target.transcript == [CHECK, "MigrationBlockedError"]
    for seed in seeds[2:7]:  # refusals, early ends, wrong answers: the source runs on (checked by run)
        target.run(seed)
        assert target.transcript[-1] == "MigrationError"


def test_over_tcp_the_memory_travels_as_frames_and_a_wrong_synced_keeps_the_source(target):
    seeds = list(target.seeds())
    target.run(seeds[7])  # no pass: the RAM BAR's contents at the stop
    assert target.transcript == [CHECK, MEMORY, CHUNK, OFFER, STATE, COMMIT, "MigrationResult"]
    target.run(seeds[9])  # one pass, its SYNC answered with a mutated SYNCED: the pre-copy fails
    assert target.transcript[:4] == [CHECK, MEMORY, CHUNK, SYNC]
    assert target.transcript[-1] == "MigrationBlockedError"  # nothing stopped; run() checked it serves


def test_an_input_replays_the_same_after_another(target):
    good, refused = list(target.seeds())[:2]
    target.run(good)
    first = list(target.transcript)
    target.run(refused)
    target.run(good)
    assert target.transcript == first


def test_a_migration_without_an_ack_is_a_finding(target, monkeypatch):
    real = mst.migrate_out

    def lying(device, sock, **kwargs):
        # stops and gives the device up as a real migration does, with no ACK ever read
        device.quiesce(1.0)
        device.migrated_out, device.owns_state = True, False
        return "migrated"

    monkeypatch.setattr(mst, "migrate_out", lying)
    with pytest.raises(FuzzFinding) as info:
        target.run(bytes([0, 8]))  # the destination just closes
    assert info.value.invariant == "migrated-without-ack"
    monkeypatch.setattr(mst, "migrate_out", real)
    target.run(bytes([0, 8]))  # the real one: refused, resumed


def test_a_source_left_stopped_after_a_failure_is_a_finding(target, monkeypatch):
    def stuck(device, sock, **kwargs):
        device.quiesce(1.0)
        raise MigrationError("gave up, and forgot to resume")

    monkeypatch.setattr(mst, "migrate_out", stuck)
    with pytest.raises(FuzzFinding) as info:
        target.run(bytes([0, 8]))
    assert info.value.invariant == "not-resumed"


def test_an_untyped_error_is_an_escaped_exception(target, monkeypatch):
    def broken(device, sock, **kwargs):
        raise KeyError("running_at")

    monkeypatch.setattr(mst, "migrate_out", broken)
    with pytest.raises(FuzzFinding) as info:
        target.run(bytes([0, 8]))
    assert info.value.invariant == "escaped-exception" and "KeyError" in info.value.where


def test_a_source_that_stops_serving_is_a_finding(target, monkeypatch):
    def deaf(device, sock, **kwargs):
        device.config_write(0x04, 2, 0)  # memory decode off: BAR reads come back all-ones
        raise MigrationError("refused")

    monkeypatch.setattr(mst, "migrate_out", deaf)
    with pytest.raises(FuzzFinding) as info:
        target.run(bytes([0, 8]))
    assert info.value.invariant == "not-serving" and "0xffffffff" in info.value.detail


def test_a_pause_ends_once_the_source_has_ended(target):
    # the pre-flight refused, then a pause past the stop deadline (1.02 s with the fixture's
    # deadlines): the source has ended at once, so the pause does not wait it out
    refused_then_pause = bytes([0]) + bytes([0]) + bytes([3, 128, 0, 0]) + bytes([7, 7])
    started = time.monotonic()
    target.run(refused_then_pause)
    assert target.transcript == [CHECK, "MigrationBlockedError"]
    assert time.monotonic() - started < 0.8
