"""pcidev.worker.Worker and the device's worker and teardown hooks."""

from __future__ import annotations

import threading
import time

import pytest

from pcidev.device import PciDevice
from pcidev.devices.edu import EduDevice
from pcidev.worker import Worker


class Counter(PciDevice):
    TYPE_NAME = "counter"

    def __init__(self) -> None:
        self.count = 0
        self.held: list[bool] = []
        self.gate = threading.Event()
        self.gate.set()
        self.in_step = threading.Event()
        self.boom = False
        self.closed_hook = 0
        super().__init__(name="c0")

    def describe(self) -> None:
        self.worker = self.add_worker(self._step, name="counter", idle_poll=0.01)

    def _step(self) -> bool:
        self.held.append(self.lock._is_owned())  # type: ignore[attr-defined]
        self.in_step.set()
        self.gate.wait(5)
        if self.boom:
            raise RuntimeError("boom")
        self.count += 1
        return self.count < 1_000_000

    def on_close(self) -> None:
        self.closed_hook += 1


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(name)]


def _wait(cond: object, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_steps_run_under_the_device_lock() -> None:
    with Counter() as dev:
        assert dev.count == 0 and dev.worker.thread is None  # created stopped
        dev.resume()
        _wait(lambda: dev.count > 10)
        dev.quiesce()
        assert dev.held and all(dev.held)


def test_quiesce_waits_for_the_step_in_progress_and_resume_restarts() -> None:
    with Counter() as dev:
        dev.gate.clear()
        dev.resume()
        assert dev.in_step.wait(5)
        done = threading.Event()
        threading.Thread(target=lambda: (dev.quiesce(), done.set()), daemon=True).start()
        assert not done.wait(0.1)  # a step is in progress
        dev.gate.set()
        assert done.wait(5)
        count = dev.count
        time.sleep(0.1)
        assert dev.count == count and not dev.worker.running  # no step while quiesced
        dev.resume()
        _wait(lambda: dev.count > count)


def test_an_exception_in_a_step_fails_the_device_and_stops_the_worker() -> None:
    with Counter() as dev:
        dev.boom = True
        dev.resume()
        _wait(lambda: dev.failed is not None)
        assert isinstance(dev.failed, RuntimeError)
        _wait(lambda: not _threads("counter[c0]"))
        assert dev.count == 0 and not dev.worker.running


def test_close_joins_the_thread_and_is_idempotent() -> None:
    dev = Counter()
    dev.resume()
    _wait(lambda: dev.count > 0)
    assert _threads("counter[c0]")
    dev.close()
    assert not _threads("counter[c0]") and dev.worker.closed and dev.closed_hook == 1
    dev.close()
    assert dev.closed_hook == 1
    dev.resume()  # a closed device stays stopped
    assert not _threads("counter[c0]")


def test_close_from_the_worker_thread_does_not_deadlock() -> None:
    dev = Counter()
    calls: list[bool] = []

    def step() -> bool:
        worker.close()
        calls.append(True)
        return True

    worker = Worker(dev, step, name="self-closing")
    worker.start()
    _wait(lambda: not _threads("self-closing"))
    assert calls == [True] and worker.closed
    dev.close()


def test_kick_wakes_an_idle_worker() -> None:
    dev = Counter()
    work: list[int] = []
    done: list[int] = []

    def step() -> bool:
        if not work:
            return False
        done.append(work.pop())
        return True

    worker = Worker(dev, step, name="kicked", idle_poll=60.0)
    worker.start()
    time.sleep(0.05)
    work.append(1)
    worker.kick()
    _wait(lambda: done == [1], timeout=2.0)
    worker.close()
    assert not _threads("kicked")
    dev.close()


@pytest.mark.parametrize("engine", [True, False])
def test_edu_dropped_by_close_leaks_no_thread(engine: bool) -> None:
    before = set(threading.enumerate())
    dev = EduDevice(engine=engine, name=f"leak{engine}")
    dev.realize()
    dev.resume()
    assert (dev.worker is not None) == engine
    assert bool(_threads(f"edu-engine[leak{engine}]")) == engine
    dev.close()
    assert set(threading.enumerate()) <= before


def test_stop_ends_the_thread_and_resume_starts_a_new_one() -> None:
    with Counter() as dev:
        dev.resume()
        _wait(lambda: dev.count > 0)
        first = dev.worker.thread
        dev.worker.stop()
        assert first is not None and not first.is_alive() and dev.worker.thread is None
        count = dev.count
        dev.worker.resume()
        _wait(lambda: dev.count > count)
        assert dev.worker.thread is not None and dev.worker.thread is not first
