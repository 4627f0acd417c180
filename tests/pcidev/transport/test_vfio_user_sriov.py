"""``pcidev serve --vfio-user SOCKET --sriov-vfs N`` (pcidev.transport.vfio_user.serving.VfSockets):
an NVMe primary controller served on SOCKET and its VFs on SOCKET.vf<k>, one vfio-user socket
per function as QEMU's vfio-user-pci attaches them. A client of the PF gives a secondary
controller resources and a namespace; a client of the VF's socket sees the VF as the kernel's
vfio-pci shows one (the PF's vendor, the VF Device ID, BARs that size like BARs), probes it
and does crc32c-verified I/O on its namespace while the PF does I/O too."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import time

import crc32c
import pytest

from pcidev.errors import MigrationError
from pcidev.host import Machine
from pcidev.pci import ids
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.handover import control_path, request_handover
from pcidev.transport.vfio_user.migration_client import mig_state, set_mig_state
from pcidev.transport.vfio_user.protocol import VfioUserError
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev_nvme.testing.driver import NvmeDriver

SPEC = ("nvme,serial=VFSRV,max_ioqpairs=8,msix_vectors=9,sriov_max_vfs=2,sriov_vq_flexible=6,"
        "sriov_vi_flexible=4,ns=mem:size=2M,ns=mem:size=2M")


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.fixture
def server(tmp_path):
    path = str(tmp_path / "nvme.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pcidev", "serve", "--vfio-user", path, "--once",
                             "--sriov-vfs", "2", SPEC], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for p in (path, path + ".vf0", path + ".vf1"):
            _wait_for(p, proc)
        yield path, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_vfs_are_served_on_sockets_of_their_own_and_do_verified_io(server):
    path, proc = server
    with Machine(ram_size=64 << 20) as machine, VfioUserDevice.connect(path) as pf, \
            VfioUserDevice.connect(path + ".vf0") as vf:
        pdrv = NvmeDriver.attach(machine, pf, io_queues=2)
        # secondary 1: 3 VQ, 2 VI, online, namespace 2 attached
        for cdw10, nr in ((0x8 | 1 << 16, 3), (0x8 | 1 << 8 | 1 << 16, 2), (0x9 | 1 << 16, 0)):
            pdrv.admin(0x1C, cdw10=cdw10, cdw11=nr)
        pdrv.admin(0x15, nsid=2, data=struct.pack("<HH", 1, 1).ljust(4096, b"\0"))
        # the VF as vfio-pci shows one: the PF's vendor, the VF Device ID
        assert vf.config_read(ids.VENDOR_ID, 4) == 0x0010_1B36
        vpdev = machine.plug(vf)
        assert vpdev.size_bars() == {0: (16384, "mem64")}
        vdrv = NvmeDriver(machine, vpdev, io_queues=2)
        vdrv.probe()
        assert struct.unpack_from("<H", vdrv.id_ctrl, 78)[0] == 1 and sorted(vdrv.namespaces) == [2]
        crcs = {}
        for i in range(32):
            for drv, nsid in ((vdrv, 2), (pdrv, 1)):
                data = os.urandom(4096)
                slba = (i * 8) % 4000
                drv.write(nsid, slba, data, qid=1 + i % 2)
                for b in range(8):
                    crcs[(nsid, slba + b)] = crc32c.crc32c(data[b * 512:(b + 1) * 512])
        for (nsid, lba), crc in crcs.items():
            assert crc32c.crc32c((vdrv if nsid == 2 else pdrv).read(nsid, lba, 1)) == crc
        # the PF reads what the VF wrote (one namespace)
        assert crc32c.crc32c(pdrv.read(2, 8, 1)) == crcs[(2, 8)]
        vdrv.close()
        pdrv.close()
    assert proc.wait(30) == 0  # --once: the PF's client left
    out = proc.stdout.read()
    assert "VF 0 served on" in out and "VF 1 served on" in out
    assert not os.path.exists(path + ".vf0")  # the VF sockets went with the server


def test_sriov_vfs_for_a_device_without_sriov_is_refused(tmp_path):
    path = str(tmp_path / "x.sock")
    proc = subprocess.run([sys.executable, "-m", "pcidev", "serve", "--vfio-user", path, "--sriov-vfs", "1",
                           "nvme,ns=mem:size=1M"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no SR-IOV capability" in proc.stderr
    assert not os.path.exists(path)


def test_a_handover_is_refused_while_vfs_are_served(server):
    path, proc = server
    with pytest.raises(MigrationError, match="VFs are served on sockets of their own"):
        request_handover(control_path(path), timeout=10)
    assert proc.poll() is None  # still serving
    with VfioUserDevice.connect(path + ".vf1") as vf:
        assert vf.config_read(ids.VENDOR_ID, 2) == 0x1B36


def test_vfs_the_pf_client_enables_get_sockets_and_lose_them_when_it_disables_them(tmp_path):
    path = str(tmp_path / "p.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pcidev", "serve", "--vfio-user", path, "--once", SPEC],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(path, proc)
        assert not os.path.exists(path + ".vf0")
        with Machine(ram_size=32 << 20) as machine, VfioUserDevice.connect(path) as pf:
            p = machine.plug(pf)
            p.enable_device()
            p.enable_sriov(1)  # a remote PF: its VFs live in the server's process
            _wait_for(path + ".vf0", proc)
            assert not os.path.exists(path + ".vf1")
            with VfioUserDevice.connect(path + ".vf0") as vf:
                assert vf.config_read(ids.DEVICE_ID, 2) == 0x0010
            p.disable_sriov()
            deadline = time.monotonic() + 10
            while os.path.exists(path + ".vf0"):
                assert time.monotonic() < deadline, "the VF socket stayed"
                time.sleep(0.05)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_vfio_user_migration_of_served_vfs_or_their_pf_is_refused(tmp_path):
    path = str(tmp_path / "f.sock")
    spec = SPEC.replace("ns=mem:size=2M,ns=mem:size=2M", f"ns=file:path={tmp_path / 'a.img'},size=2M")
    proc = subprocess.Popen([sys.executable, "-m", "pcidev", "serve", "--vfio-user", path, "--sriov-vfs", "1", spec],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for p in (path, path + ".vf0"):
            _wait_for(p, proc)
        with VfioUserDevice.connect(path) as pf, VfioUserDevice.connect(path + ".vf0") as vf:
            # the PF: its destination would rebuild the VFs other clients use
            for client in (pf.client, vf.client):
                with pytest.raises(VfioUserError) as exc:
                    set_mig_state(client, protocol.MIG_STATE_STOP_COPY)
                assert exc.value.errno == errno.EBUSY and mig_state(client) == protocol.MIG_STATE_RUNNING
            # a VF alone takes no state either (it would bypass the primary's records)
            with pytest.raises(VfioUserError) as exc:
                set_mig_state(vf.client, protocol.MIG_STATE_RESUMING)
            assert exc.value.errno == errno.EBUSY and mig_state(vf.client) == protocol.MIG_STATE_RUNNING
            assert vf.config_read(ids.VENDOR_ID, 2) == 0x1B36
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_vf_keeps_serving_its_client_when_the_pf_client_leaves(tmp_path):
    path = str(tmp_path / "q.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pcidev", "serve", "--vfio-user", path, "--sriov-vfs", "1", SPEC],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for p in (path, path + ".vf0"):
            _wait_for(p, proc)
        with Machine(ram_size=64 << 20) as machine, VfioUserDevice.connect(path + ".vf0") as vf:
            with VfioUserDevice.connect(path) as pf:
                pdrv = NvmeDriver.attach(machine, pf, io_queues=1)
                for cdw10, nr in ((0x8 | 1 << 16, 3), (0x8 | 1 << 8 | 1 << 16, 2), (0x9 | 1 << 16, 0)):
                    pdrv.admin(0x1C, cdw10=cdw10, cdw11=nr)
                pdrv.admin(0x15, nsid=2, data=struct.pack("<HH", 1, 1).ljust(4096, b"\0"))
                vdrv = NvmeDriver(machine, machine.plug(vf), io_queues=2)
                vdrv.probe()
                before = os.urandom(4096)
                vdrv.write(2, 0, before)
                pdrv.close()
            # the PF's client left (the PF is quiesced): the VF's client goes on
            after = os.urandom(4096)
            vdrv.write(2, 8, after, qid=2)
            assert crc32c.crc32c(vdrv.read(2, 0, 8)) == crc32c.crc32c(before)
            assert crc32c.crc32c(vdrv.read(2, 8, 8, qid=2)) == crc32c.crc32c(after)
            vdrv.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_after_a_handover_vfs_the_pf_client_enables_still_get_sockets(tmp_path):
    path = str(tmp_path / "h.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pcidev", "serve", "--vfio-user", path, SPEC],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    new_pid = None
    try:
        _wait_for(control_path(path), proc)
        report = request_handover(control_path(path), timeout=30)
        new_pid = report["new_pid"]
        assert proc.wait(30) == 0  # the old process handed over and ended
        with Machine(ram_size=32 << 20) as machine, VfioUserDevice.connect(path) as pf:
            p = machine.plug(pf)
            p.enable_device()
            p.enable_sriov(1)
            deadline = time.monotonic() + 10
            while not os.path.exists(path + ".vf0"):
                assert time.monotonic() < deadline, "no socket for the VF after the handover"
                time.sleep(0.05)
            with VfioUserDevice.connect(path + ".vf0") as vf:
                assert vf.config_read(ids.DEVICE_ID, 2) == 0x0010
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if new_pid is not None:
            try:
                os.kill(new_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 20
            while os.path.exists(f"/proc/{new_pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
