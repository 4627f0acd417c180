"""admin.AdminWorker: slow admin work on one background thread, a failure reported once."""

from __future__ import annotations

import threading

from pcidev_nvme.admin import AdminWorker


def test_work_runs_in_order_and_marker_waits_for_it():
    worker = AdminWorker("test-admin", lambda why: None)
    assert worker.marker() is None  # nothing ever ran
    gate, order = threading.Event(), []
    worker.submit(lambda: (gate.wait(5), order.append(1)))
    worker.submit(order.append, 2)
    marker = worker.marker()
    assert marker is not None and not marker.done()
    gate.set()
    marker.result(timeout=5)
    assert order == [1, 2]
    worker.shutdown()


def test_failure_is_reported_not_raised():
    failures = []
    worker = AdminWorker("test-admin", failures.append)

    def boom() -> None:
        raise RuntimeError("disk on fire")

    worker.submit(boom).result(timeout=5)
    worker.shutdown()
    assert failures == ["background work failed: disk on fire"]
