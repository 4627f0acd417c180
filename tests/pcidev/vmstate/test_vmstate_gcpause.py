"""Saves and loads keep the cyclic garbage collector out (pcidev.vmstate.gcpause):
the thousands of small objects they allocate would otherwise trigger collector
passes inside the migration's downtime."""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import pytest

from pcidev.migration import load_device_stream, save_device_stream
from pcidev.vmstate import U16, U64, Bytes, StreamError, VarArray, load, save, vmstate
from pcidev.vmstate.gcpause import gc_paused


@vmstate("test/gc-item")
@attrs.frozen
class Item:
    a: U16
    b: U64
    c: Bytes[4]


@vmstate("test/gc-big")
@attrs.frozen
class Big:
    items: VarArray[Item, 100000]


BIG = Big(items=tuple(Item(i & 0xFFFF, i, b"abcd") for i in range(5000)))


@contextmanager
def collections(*functions: str) -> Iterator[list[int]]:
    """Record the generation of every collector pass started while one of ``functions`` runs.

    ``functions`` are names of functions of pcidev. (A pass that starts when the pause ends,
    from its ``__exit__``, is the deferred one: not recorded.)"""
    seen: list[int] = []

    def cb(phase: str, info: dict) -> None:
        if phase != "start":
            return
        f = sys._getframe(1)
        while f is not None:
            if f.f_code.co_name in ("gc_paused", "__exit__"):
                return
            if f.f_code.co_name in functions and "/pcidev/" in f.f_code.co_filename:
                seen.append(info["generation"])
                return
            f = f.f_back

    gc.callbacks.append(cb)
    try:
        yield seen
    finally:
        gc.callbacks.remove(cb)


@pytest.fixture(autouse=True)
def _collector_enabled() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_save_and_load_run_no_collector_pass() -> None:
    with collections("save") as seen:
        data = save("gc", {}, [("test/gc-big", 0, BIG)])
    assert seen == []
    with collections("load") as seen:
        (sec,) = load(data, device_type="gc", fingerprint={}, descriptions=[Big])
    assert seen == []
    assert sec.state == BIG
    assert gc.isenabled()


def test_a_failed_load_restores_the_collector() -> None:
    with pytest.raises(StreamError):
        load(b"garbage", device_type="gc", fingerprint={}, descriptions=[Big])
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    data = save("gc", {}, [("test/gc-big", 0, BIG)])
    load(data, device_type="gc", fingerprint={}, descriptions=[Big])
    assert not gc.isenabled()


def test_nested_and_concurrent_pauses_share_one() -> None:
    inside = threading.Barrier(2)
    first_out = threading.Event()
    states: list[bool] = []

    def early() -> None:
        with gc_paused():
            inside.wait()
        first_out.set()

    def late() -> None:
        with gc_paused():
            inside.wait()
            first_out.wait(5)
            with gc_paused():
                pass
            states.append(gc.isenabled())  # the other thread left: still paused for this one

    threads = [threading.Thread(target=early), threading.Thread(target=late)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert states == [False]
    assert gc.isenabled()


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "examples" / "bench_device_migration.py"
    spec = importlib.util.spec_from_file_location("bench_device_migration_gc", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # annotations are resolved against the module's globals
    spec.loader.exec_module(mod)
    return mod


def test_device_save_and_load_run_no_collector_pass() -> None:
    """The whole device path: get_device_state, the framework section, the stream,
    the load, the checks and set_device_state (64 queue pairs, 1,000 requests)."""
    bench = _bench_module()
    src = bench.BenchController()
    src.populate()
    src.quiesce()
    with collections("save_device_stream") as seen:
        data, fds = save_device_stream(src)
    assert seen == []
    dest = bench.BenchController()
    with collections("load_device_stream") as seen:
        load_device_stream(dest, data, fds)
    assert seen == []
    assert dest.get_device_state() == src.get_device_state()
    assert gc.isenabled()
