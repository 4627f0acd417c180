"""examples/howto/nvme_backend.py (docs/howto/nvme-backend.md): a third-party namespace
backend registered by a plugin, plugged into a controller and driven with the NVMe test
driver, and through ``pcidev serve``."""

from __future__ import annotations

import importlib
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pcidev.errors import ConfigError
from pcidev.host import Machine
from pcidev.migration import collect_blockers
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import NvmeDriver

ROOT = Path(__file__).resolve().parents[3]
HOWTO = ROOT / "examples" / "howto"
if str(HOWTO) not in sys.path:
    sys.path.insert(0, str(HOWTO))
nvme_backend = importlib.import_module("nvme_backend")

WRITE_ZEROES, DSM = 0x08, 0x09


def nuse(drv: NvmeDriver, nsid: int = 1) -> int:
    """Namespace Utilization (blocks) from Identify Namespace."""
    return int(struct.unpack_from("<Q", drv.identify(0x00, nsid=nsid), 16)[0])


# [test]
def test_a_controller_stores_its_namespace_in_the_sparse_backend() -> None:
    registry = load_registry(make_plugin_manager(plugins=[nvme_backend]))  # + the installed plugins
    ctrl = registry.create("nvme", "ns=sparse:size=1M")
    backend = ctrl.namespaces[1].backend
    assert isinstance(backend, nvme_backend.SparseBackend)
    with Machine(ram_size=64 << 20) as machine:
        drv = NvmeDriver.attach(machine, ctrl, io_queues=1)  # probes like Linux: MSI-X, queues
        assert nuse(drv) == 0
        drv.write(1, slba=8, data=b"\x5a" * 4096)  # blocks 8..15 (512-byte blocks)
        assert drv.read(1, slba=8, nlb=8) == b"\x5a" * 4096
        assert drv.read(1, slba=0, nlb=8) == bytes(4096)  # never written: zeros
        assert nuse(drv) == 8 and backend.allocated_bytes() == 4096
        drv.io(1, WRITE_ZEROES, nsid=1, cdw10=8, cdw12=7)  # 8 blocks from LBA 8
        assert drv.read(1, slba=8, nlb=8) == bytes(4096) and nuse(drv) == 0
        drv.close()
# [end test]


def test_deallocate_frees_chunks() -> None:
    registry = load_registry(make_plugin_manager(plugins=[nvme_backend]))
    ctrl = registry.create("nvme", "ns=sparse:size=1M")
    with Machine(ram_size=64 << 20) as machine:
        drv = NvmeDriver.attach(machine, ctrl, io_queues=1)
        drv.write(1, slba=0, data=b"\x01" * 8192)
        assert nuse(drv) == 16
        ranges = struct.pack("<IIQ", 0, 8, 0)  # one range: 8 blocks from LBA 0
        buf = machine.alloc(4096)
        machine.write(buf, ranges)
        drv.io(1, DSM, nsid=1, cdw10=0, cdw11=1 << 2, prp1=buf)  # NR=0 (one range), AD
        assert nuse(drv) == 8 and drv.read(1, slba=0, nlb=8) == bytes(4096)
        drv.close()


def test_a_full_backend_reports_capacity_exceeded() -> None:
    registry = load_registry(make_plugin_manager(plugins=[nvme_backend]))
    ctrl = registry.create("nvme", "ns=sparse:size=1M,max_chunks=1")
    with Machine(ram_size=64 << 20) as machine:
        drv = NvmeDriver.attach(machine, ctrl, io_queues=1)
        drv.write(1, slba=0, data=b"\x01" * 4096)
        buf = machine.alloc(8192)
        comp = drv.io(1, 0x01, nsid=1, cdw10=8, cdw12=7, prp1=buf, check=False)
        assert comp.code == Status.CAP_EXCEEDED
        drv.close()


def test_a_plugin_backend_blocks_migration() -> None:
    registry = load_registry(make_plugin_manager(plugins=[nvme_backend]))
    ctrl = registry.create("nvme", "ns=sparse:size=1M")
    ctrl.realize()
    assert "namespace 1: its backend (sparse) cannot follow the controller to another process" in (
        collect_blockers(ctrl))


def test_bad_options_are_one_clear_error() -> None:
    registry = load_registry(make_plugin_manager(plugins=[nvme_backend]))
    with pytest.raises(ConfigError, match="unknown option.*colour"):
        registry.create("nvme", "ns=sparse:size=1M,colour=red")
    with pytest.raises(ConfigError, match="size"):
        registry.create("nvme", "ns=sparse:size=1000")
    without = load_registry(make_plugin_manager())
    with pytest.raises(ConfigError, match="unknown NVMe namespace backend 'sparse'"):
        without.create("nvme", "ns=sparse:size=1M")


def test_served_over_vfio_user(tmp_path: Path, wait_listening: Callable[..., None]) -> None:
    """The command line of the how-to, driven as QEMU would (memfd RAM, MSI-X eventfds)."""
    sock = tmp_path / "nvme0.sock"
    env = dict(os.environ, PYTHONPATH=str(HOWTO))
    server = subprocess.Popen([sys.executable, "-m", "pcidev", "-p", "nvme_backend", "serve", "--once", "--vfio-user",
                               str(sock), "nvme,ns=sparse:size=64M"], env=env)
    try:
        wait_listening(sock, server)
        with Machine(ram_size=64 << 20) as machine, VfioUserDevice.connect(str(sock)) as ctrl:
            drv = NvmeDriver.attach(machine, ctrl, io_queues=1)
            drv.write(1, slba=0, data=b"\xa5" * 4096)
            assert drv.read(1, slba=0, nlb=8) == b"\xa5" * 4096 and nuse(drv) == 8
            drv.close()
        assert server.wait(10) == 0
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(10)
