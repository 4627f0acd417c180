"""NBD servers that require TLS with a pre-shared key (nbdkit ``--tls=require --tls-psk``,
qemu-nbd ``--object tls-creds-psk``), the key file made by psktool (gnutls-bin): a plain
``nbd+unix://`` URI gets one clear error at start; an ``nbds+unix://`` URI naming the key
file (``tls-psk-file=``) is what libnbd takes, and the backend with it (the one local file a
URI may make libnbd read; checked to be a readable file at start)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from nbd_servers import NbdServer

from pcidev.errors import ConfigError
from pcidev_nvme.backends import create_backend
from pcidev_nvme.backends.nbd import load_nbd

MiB = 1 << 20
USER = "alice"


@pytest.fixture
def psk(nbd_tools: None, tmp_path: Path) -> Path:
    """``keys.psk`` (``alice:HEXKEY``) in a directory of its own (qemu's tls-creds-psk takes the directory)."""
    keys = tmp_path / "psk" / "keys.psk"
    keys.parent.mkdir()
    subprocess.run(["psktool", "-u", USER, "-p", str(keys)], check=True, capture_output=True, timeout=60)
    assert keys.read_text().startswith(f"{USER}:")
    return keys


def _tls_server(nbd_server, kind: str, keys: Path) -> NbdServer:
    if kind == "nbdkit":
        return nbd_server("nbdkit", size=4 * MiB, extra=("--tls=require", f"--tls-psk={keys}"))
    return nbd_server("qemu", size=4 * MiB, extra=(
        "--object", f"tls-creds-psk,id=tls0,endpoint=server,dir={keys.parent}", "--tls-creds", "tls0"))


def _tls_uri(server: NbdServer, keys: Path) -> str:
    return f"nbds+unix://{USER}@/{server.export}?socket={server.sock}&tls-psk-file={keys}"


@pytest.mark.parametrize("kind", ["nbdkit", "qemu"])
def test_a_plain_uri_to_a_server_requiring_tls_is_one_clear_error(nbd_server, psk, kind):
    server = _tls_server(nbd_server, kind, psk)
    with pytest.raises(ConfigError) as e:
        create_backend("nbd", {"uri": server.uri})
    msg = str(e.value)
    assert msg.startswith(f"nbd backend: cannot open {server.uri}: ") and "\n" not in msg
    assert "server requires TLS encryption first" in msg


@pytest.mark.parametrize("kind", ["nbdkit", "qemu"])
def test_libnbd_negotiates_tls_with_the_psk_uri(nbd_server, psk, kind):
    """The servers and the key file are right: libnbd itself, allowed to read the key file the
    URI names, connects with TLS negotiated and writes and reads."""
    nbd = load_nbd()
    server = _tls_server(nbd_server, kind, psk)
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(_tls_uri(server, psk))
    try:
        assert h.get_tls_negotiated() and h.get_size() == 4 * MiB
        h.pwrite(b"t" * 4096, 8192)
        assert h.pread(4096, 8192) == b"t" * 4096
    finally:
        h.shutdown()


@pytest.mark.parametrize("kind", ["nbdkit", "qemu"])
def test_a_psk_uri_reads_and_writes_through_the_controller(nbd_server, psk, kind):
    from pcidev.host import Machine
    from pcidev_nvme.controller import NvmeController
    from pcidev_nvme.testing import driver

    server = _tls_server(nbd_server, kind, psk)
    machine = Machine(ram_size=32 * MiB)
    ctrl = NvmeController(f"ns=nbd:uri={_tls_uri(server, psk)}")
    drv = driver.NvmeDriver.attach(machine, ctrl, io_queues=1, io_depth=8)
    try:
        lbs = drv.namespaces[1].lba_size
        drv.write(1, 3, b"s" * lbs, fua=True)
        assert drv.read(1, 3, 1) == b"s" * lbs
        conn = ctrl.namespaces[1].backend._conns[0]
        assert conn is not None and conn.handle.get_tls_negotiated()
    finally:
        drv.close()
        ctrl.close()


@pytest.mark.parametrize("name", ["missing.psk", "dir", "relative"])
def test_a_psk_file_that_cannot_be_read_is_one_clear_error_at_start(nbd_server, psk, tmp_path, name):
    server = _tls_server(nbd_server, "nbdkit", psk)
    (tmp_path / "dir").mkdir()
    path = "keys.psk" if name == "relative" else str(tmp_path / name)
    uri = f"nbds+unix://{USER}@/?socket={server.sock}&tls-psk-file={path}"
    with pytest.raises(ConfigError) as e:
        create_backend("nbd", {"uri": uri})
    msg = str(e.value)
    assert msg == f"nbd backend: tls-psk-file={path} in {uri} must be one readable file (an absolute path)"


def test_a_wrong_key_is_one_clear_error_at_start(nbd_server, psk, tmp_path):
    server = _tls_server(nbd_server, "nbdkit", psk)
    other = tmp_path / "other.psk"
    subprocess.run(["psktool", "-u", USER, "-p", str(other)], check=True, capture_output=True, timeout=60)
    with pytest.raises(ConfigError) as e:
        create_backend("nbd", {"uri": _tls_uri(server, other), "timeout": "10"})
    assert str(e.value).startswith("nbd backend: cannot open ") and "\n" not in str(e.value)
