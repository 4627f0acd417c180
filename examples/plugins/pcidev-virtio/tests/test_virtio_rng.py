"""virtio-rng: the entropy sources, the rate limit that keeps requests in flight, the
plugin's registration and properties."""

from __future__ import annotations

import time

import pytest

from pcidev import ConfigError
from pcidev.cli import main as cli_main
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.testing import plugged
from pcidev_virtio.rng import VirtioRng
from pcidev_virtio.testing.driver import VirtioDriver


def _driver(machine, dev):
    pdev = plugged(machine, dev)
    drv = VirtioDriver(machine, pdev)
    drv.init()
    return drv.queues[0]


def test_the_plugin_registers_virtio_rng():
    registry = load_registry(make_plugin_manager())
    dev = registry.create("virtio-rng", "source=urandom,max_bytes=1k,period=0.5")
    assert isinstance(dev, VirtioRng) and dev.cfg.max_bytes == 1024 and dev.cfg.period == 0.5
    dev.close()


def test_describe_lists_the_properties(capsys):
    assert cli_main(["describe", "virtio-rng"]) == 0
    out = capsys.readouterr().out
    assert "source" in out and "max_bytes" in out and "period" in out


@pytest.mark.parametrize("props, message", [("source=nowhere", "urandom"), ("period=0", "positive"),
                                            ("source=file:/nonexistent/x", "cannot open")])
def test_bad_properties_are_one_clear_error(props, message):
    with pytest.raises(ConfigError, match=message):
        VirtioRng(props)


def test_a_file_source_is_read_in_a_loop_straight_into_the_buffers(machine, tmp_path):
    pattern = bytes(range(251))
    (tmp_path / "pool").write_bytes(pattern)
    dev = VirtioRng(f"source=file:{tmp_path}/pool")
    q = _driver(machine, dev)
    first = q.request(in_lens=[100, 50])
    assert first.data == pattern[:150]
    second = q.request(in_lens=[200])
    assert second.data == (pattern * 2)[150:350]
    assert dev.served == 350
    dev.close()


def test_an_empty_file_gives_nothing_and_does_not_hang(machine, tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    dev = VirtioRng(f"source=file:{tmp_path}/empty")
    q = _driver(machine, dev)
    done = q.request(in_lens=[64], timeout=5)
    assert done.written == 0
    dev.close()


def test_out_buffers_are_ignored_and_a_chain_without_in_buffers_returns_zero(machine):
    dev = VirtioRng()
    q = _driver(machine, dev)
    assert q.request(out=[b"ignored"], in_lens=[16]).written == 16
    assert q.request(out=[b"only out"]).written == 0
    dev.close()


def test_the_rate_limit_keeps_requests_in_flight_until_the_next_period(machine):
    dev = VirtioRng("max_bytes=100,period=1")
    q = _driver(machine, dev)
    old = q.avail_idx
    for _ in range(3):
        q.add(in_lens=[60])
    q.kick(old_idx=old)
    start = time.monotonic()
    first = q.poll()
    assert [c.written for c in first] == [60, 40]  # the period's 100 bytes, the last one cut short
    assert dev.pending == 1 and dev.queues[0].inflight() != ()
    dev.resume()  # start the worker, as a transport does when it serves the device
    [last] = q.wait(1, timeout=10)
    assert last.written == 60 and dev.pending == 0
    assert time.monotonic() - start > 0.2  # it waited for the next period
    dev.close()


def test_vmstate_schema_shows_the_transport_layer(capsys):
    import json

    assert cli_main(["vmstate", "schema", "virtio-rng"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["owner"]) for s in out["sections"]] == [
        ("pcidev/function", "framework"), ("virtio-pci", "layer"), ("virtio-rng", "device")]
    assert out["layer"]["name"] == "virtio-pci" and out["static_blockers"] == []
