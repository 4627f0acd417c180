"""A device-link process closes its device exactly once when it ends (shut down,
migrated away, or given up waiting for an incoming migration), and a device that
migrated away, or a destination's that never received one, is closed without
``owns_state`` (it persists nothing); DeviceEndpoint.close() closes the device."""

from __future__ import annotations

import os
import signal

import pytest

from pcidev.devices.edu import EduDevice
from pcidev.host import Machine
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.link.process import DeviceProcess

PLUGIN = '''
import os

from pcidev import hookimpl
from pcidev.devices.edu import EduDevice


class ClosingEdu(EduDevice):
    """edu that writes one line per on_close() call."""

    TYPE_NAME = "edu-closing"

    def on_close(self):
        super().on_close()
        with open(os.environ["PCIDEV_TEST_CLOSE_LOG"], "a") as f:
            f.write(f"{os.getpid()} {self.migrated_out} {self.owns_state}\\n")


@hookimpl
def pcidev_register_devices(registry):
    registry.add_device(ClosingEdu)
'''


@pytest.fixture
def close_log(tmp_path, monkeypatch):
    (tmp_path / "pcidev_closing_edu.py").write_text(PLUGIN)
    log = tmp_path / "closed.log"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PCIDEV_TEST_CLOSE_LOG", str(log))
    return log


def _lines(log) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _process(tmp_path, name, **kwargs) -> DeviceProcess:
    return DeviceProcess("edu-closing", f"unix:{tmp_path}/{name}.sock", options={"engine": True},
                         plugin_specs=["pcidev_closing_edu"], **kwargs)


def test_a_migrated_source_and_a_stopped_destination_each_close_once(tmp_path, close_log):
    src = _process(tmp_path, "src")
    dst = _process(tmp_path, "dst", incoming=f"unix:{tmp_path}/dst-in.sock")
    try:
        src.wait_event("ready")
        dst.wait_event("listening")
        with Machine(ram_size=16 << 20) as machine:
            pdev = machine.plug_remote(src.link, timeout=10)
            pdev.enable_device()
            pdev.iowrite32(0, 8, 5)
            pdev.device.migrate(dst.incoming, timeout=10)
            assert pdev.ioread32(0, 8) == 120  # the destination serves the device
            assert src.proc.wait(10) == 0
            assert _lines(close_log) == [f"{src.pid} True False"]  # migrated away: closed, persists nothing
        assert dst.stop() == 0  # SIGTERM: a clean end
        assert _lines(close_log) == [f"{src.pid} True False", f"{dst.pid} False True"]
    finally:
        src.stop()
        dst.stop()
    assert not list(tmp_path.glob("*.sock"))


def test_a_destination_that_gives_up_waiting_closes_its_device(tmp_path, close_log):
    dst = _process(tmp_path, "dst", incoming=f"unix:{tmp_path}/dst-in.sock")
    try:
        dst.wait_event("listening")
        dst.proc.send_signal(signal.SIGINT)
        assert dst.proc.wait(10) == 128 + signal.SIGINT
    finally:
        dst.stop()
    assert _lines(close_log) == [f"{dst.pid} False False"]  # it never ran: its state is nobody's
    assert not list(tmp_path.glob("*.sock"))


def test_endpoint_close_closes_the_device_once():
    closed: list[bool] = []

    class Recording(EduDevice):
        def on_close(self) -> None:
            closed.append((self.migrated_out, self.owns_state))

    dev = Recording(engine=True)
    ep = DeviceEndpoint(dev)
    ep.start()
    ep.close()
    ep.close()
    assert closed == [(False, True)] and dev.closed and not any(w.running for w in dev.workers)


def test_an_endpoint_that_never_ran_closes_its_device_without_its_state():
    dev = EduDevice(engine=True)
    DeviceEndpoint(dev).close()
    assert dev.closed and not dev.owns_state and not dev.migrated_out
