"""The example of docs/virtio.md (literal-included from here, so it cannot drift)."""

from __future__ import annotations


def test_the_docs_example_runs():
    # [example: virtio-rng on the software host]
    from pcidev.host import Machine
    from pcidev.testing import plugged, roundtrip
    from pcidev_virtio.testing.driver import VirtioDriver

    with Machine() as machine:
        pdev = plugged(machine, "virtio-rng", "max_bytes=64,period=0.1")
        drv = VirtioDriver(machine, pdev)
        drv.init()                                  # ACKNOWLEDGE ... DRIVER_OK, MSI-X vectors
        q = drv.queues[0]
        for _ in range(3):
            q.add(in_lens=[64])                     # three requests, one kick
        q.kick(old_idx=0)
        assert pdev.device.queues[0].inflight()     # the rate limit keeps two in flight
        dev = roundtrip(pdev)                       # save -> load into a fresh device, in process
        done = q.wait(3, timeout=5)                 # the loaded device serves them
        assert [c.written for c in done] == [64, 64, 64]
        dev.close()
    # [end example]
