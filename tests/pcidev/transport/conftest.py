"""Fixtures of the transport tests: an edu device served over the device link."""

from __future__ import annotations

import threading

import pytest

from pcidev.devices.edu import EduDevice
from pcidev.transport.address import listen
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.link.server import LinkServer


@pytest.fixture
def served(tmp_path):
    """An edu endpoint served in a thread; yields (address, endpoint, server)."""
    dev = EduDevice()
    ep = DeviceEndpoint(dev)
    ep.start()
    listener = listen(f"unix:{tmp_path}/edu.sock")
    addr = listener.address
    server = LinkServer(ep, listener.sock, io_timeout=1.0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield str(addr), ep, server
    server.stop()
    t.join(5)
    ep.close()
