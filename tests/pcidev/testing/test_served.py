"""pcidev.testing.served: a device served over vfio-user in its own process, for tests."""

from __future__ import annotations

import os

import pytest

from pcidev.errors import PcidevError
from pcidev.host import Machine
from pcidev.testing import probe, served
from pcidev.transport.vfio_user.remote import VfioUserDevice


def test_edu_served_and_driven_from_the_software_host(tmp_path):
    with served("edu", directory=tmp_path) as dev:
        assert "listening on" in dev.banner and os.path.exists(dev.path)
        with Machine() as machine, VfioUserDevice.connect(dev.path) as remote:
            pdev = machine.plug(remote)
            probe(pdev)
            pdev.iowrite32(0, 0x04, 0x12345678)  # edu's liveness register inverts
            assert pdev.ioread32(0, 0x04) == 0xEDCBA987
        assert dev.wait() == 0  # the server ends when its client leaves
        proc = dev.proc
    assert proc.returncode == 0 and proc.stdout.closed
    assert os.listdir(tmp_path) == []


def test_a_server_that_cannot_start_is_one_clear_error():
    with pytest.raises(PcidevError, match="did not start.*nope"), served("nope"):
        pass


def test_the_process_is_reaped_when_the_test_fails(tmp_path):
    with pytest.raises(RuntimeError), served("edu", directory=tmp_path) as dev:
        raise RuntimeError("the test failed")
    assert dev.proc.returncode is not None and not os.path.exists(dev.path)


def test_a_handover_is_followed_and_its_process_stopped_at_the_end(tmp_path):
    with served("edu", directory=tmp_path, once=False) as dev:
        with Machine() as machine, VfioUserDevice.connect(dev.path) as remote:
            pdev = machine.plug(remote)
            probe(pdev)
            pdev.iowrite32(0, 0x04, 0x12345678)
            report = dev.handover()
            assert report["old_pid"] == dev.proc.pid and dev.pid == report["new_pid"] != dev.proc.pid
            assert dev.pids == [report["old_pid"], report["new_pid"]]
            assert pdev.ioread32(0, 0x04) == 0xEDCBA987  # the same device, in the new process
            assert dev.proc.wait(20) == 0  # the old process ends once the new one serves
        new = dev.pid
        assert os.path.exists(f"/proc/{new}")
    assert not os.path.exists(f"/proc/{new}") or open(f"/proc/{new}/stat").read().split()[2] == "Z"
    assert os.listdir(tmp_path) == []
