"""PciDevice.quiesce(timeout, flush=): the budget and the flush request reach on_quiesce,
and a quiesce that fails leaves the device running as before (its on_resume, its workers,
the VFs the call quiesced)."""

from __future__ import annotations

import threading
import time

import pytest

from pcidev.device import PciDevice
from pcidev.errors import MigrationError, QuiesceTimeoutError


class Stopper(PciDevice):
    """A device with a worker whose on_quiesce waits for its request in flight, within
    the budget it was given."""

    TYPE_NAME = "stopper"

    def __init__(self, name: str = "s0") -> None:
        self.request_done = threading.Event()
        self.request_done.set()
        self.seen: list[tuple[float | None, bool]] = []
        self.resumed = 0
        self.steps = 0
        super().__init__(name=name)

    def describe(self) -> None:
        self.worker = self.add_worker(self._step, name="stopper", idle_poll=0.01)

    def _step(self) -> bool:
        self.steps += 1
        return False

    def on_quiesce(self) -> None:
        deadline = self.quiesce_deadline
        self.seen.append((deadline, self.quiesce_flush))
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not self.request_done.wait(left):
            raise QuiesceTimeoutError(f"{self.name}: the request in flight did not finish")

    def on_resume(self) -> None:
        self.resumed += 1


def _wait(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_the_budget_and_the_flush_reach_on_quiesce_and_are_cleared_after():
    with Stopper() as dev:
        dev.resume()
        t0 = time.monotonic()
        dev.quiesce(2.0, flush=True)
        deadline, flush = dev.seen[-1]
        assert deadline is not None and t0 + 2.0 <= deadline <= time.monotonic() + 2.0
        assert flush and dev.quiesced
        assert dev.quiesce_deadline is None and dev.quiesce_flush is False
        dev.resume()
        dev.quiesce()
        assert dev.seen[-1] == (None, False)  # no budget, no flush: the defaults


def test_a_quiesce_past_its_budget_leaves_the_device_running():
    with Stopper() as dev:
        dev.resume()
        _wait(lambda: dev.steps > 0)
        dev.request_done.clear()
        resumed = dev.resumed
        t0 = time.monotonic()
        with pytest.raises(QuiesceTimeoutError, match="did not finish"):
            dev.quiesce(0.2)
        assert 0.2 <= time.monotonic() - t0 < 3
        assert isinstance(QuiesceTimeoutError("x"), MigrationError)
        assert not dev.quiesced and dev.resumed == resumed + 1  # on_resume ran
        assert dev.quiesce_deadline is None
        steps = dev.steps
        dev.worker.kick()
        _wait(lambda: dev.steps > steps)  # the worker runs again
        dev.request_done.set()
        dev.quiesce(1.0)  # and a later quiesce works
        assert dev.quiesced


def test_the_vfs_a_failed_quiesce_stopped_run_again_and_share_the_budget():
    with Stopper("pf") as pf:
        vfs = [Stopper(f"vf{i}") for i in range(3)]
        pf.virtual_functions.extend(vfs)
        pf.resume()
        vfs[0].quiesce()  # already stopped by someone else: left so
        vfs[2].request_done.clear()  # the last VF is stuck
        with pytest.raises(QuiesceTimeoutError, match="vf2"):
            pf.quiesce(0.2, flush=True)
        assert vfs[0].quiesced and not vfs[1].quiesced and not vfs[2].quiesced and not pf.quiesced
        assert vfs[1].seen[-1][1] is True  # the flush request reached the VF
        vf_deadline = vfs[1].seen[-1][0]
        assert vf_deadline is not None and vf_deadline <= time.monotonic()
        vfs[2].request_done.set()
        pf.request_done.clear()  # now the PF itself is stuck: every VF runs again
        with pytest.raises(QuiesceTimeoutError, match="pf"):
            pf.quiesce(0.2)
        assert [v.quiesced for v in vfs] == [True, False, False] and not pf.quiesced
        pf.request_done.set()
        pf.quiesce(1.0)
        assert all(v.quiesced for v in vfs) and pf.quiesced


class TwoWorkers(Stopper):
    TYPE_NAME = "stopper2"

    def describe(self) -> None:
        super().describe()
        self.second = self.add_worker(self._step, name="second", idle_poll=0.01)


def test_the_workers_a_failed_quiesce_stopped_run_again(monkeypatch):
    """A worker that cannot be stopped (here: its quiesce raises) fails the quiesce, and
    the workers stopped before it step again (they stayed paused)."""
    with TwoWorkers() as dev:
        dev.resume()
        assert dev.worker.running and dev.second.running

        def broken() -> None:
            raise RuntimeError("cannot stop")

        monkeypatch.setattr(dev.second, "quiesce", broken)
        with pytest.raises(RuntimeError, match="cannot stop"):
            dev.quiesce(1.0)
        assert not dev.quiesced and dev.worker.running
        before = dev.steps
        dev.worker.kick()
        _wait(lambda: dev.steps > before)
        monkeypatch.undo()  # (closing the device stops the second worker too)
