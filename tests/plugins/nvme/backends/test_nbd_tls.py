"""NBD servers that require TLS, with a pre-shared key (nbdkit ``--tls=require --tls-psk``,
qemu-nbd ``--object tls-creds-psk``; the key file made by psktool) or with X.509
certificates of a test authority (nbdkit ``--tls-certificates``, qemu-nbd ``--object
tls-creds-x509``; made by certtool), both tools from gnutls-bin: a plain ``nbd+unix://`` URI
gets one clear error at start; an ``nbds+unix://`` URI naming the key file
(``tls-psk-file=``) or the client's certificates directory (``tls-certificates=``) is what
libnbd takes, and the backend with it (the only local files a URI may make libnbd read;
checked at start); a server whose certificate another authority signed is refused."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from nbd_servers import NbdServer

from pcidev.errors import ConfigError
from pcidev.host import Machine
from pcidev_nvme.backends import create_backend
from pcidev_nvme.backends.nbd import load_nbd
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing import driver

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


def _write_and_read_with_tls(uri: str, lba: int, fill: bytes) -> None:
    """Through the NVMe controller on an ``nbd`` namespace at ``uri``: a FUA write of one block
    of ``fill`` at ``lba`` reads back, and the connection negotiated TLS."""
    machine = Machine(ram_size=32 * MiB)
    ctrl = NvmeController(f"ns=nbd:uri={uri}")
    drv = driver.NvmeDriver.attach(machine, ctrl, io_queues=1, io_depth=8)
    try:
        lbs = drv.namespaces[1].lba_size
        drv.write(1, lba, fill * lbs, fua=True)
        assert drv.read(1, lba, 1) == fill * lbs
        conn = ctrl.namespaces[1].backend._conns[0]
        assert conn is not None and conn.handle.get_tls_negotiated()
    finally:
        drv.close()
        ctrl.close()


@pytest.mark.parametrize("kind", ["nbdkit", "qemu"])
def test_a_psk_uri_reads_and_writes_through_the_controller(nbd_server, psk, kind):
    server = _tls_server(nbd_server, kind, psk)
    _write_and_read_with_tls(_tls_uri(server, psk), 3, b"s")



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


# ------------------------------------------------------------------ X.509 certificates

_CA_TEMPLATE = "cn = pcidev test CA\nca\ncert_signing_key\nexpiration_days = 30\n"
_SERVER_TEMPLATE = ("organization = pcidev test\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n"
                    "tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 30\n")


def _certtool(*args: str, out: Path | None = None) -> None:
    run = subprocess.run(["certtool", *args], check=True, capture_output=True, timeout=60)
    if out is not None:
        out.write_bytes(run.stdout)


def _ca(where: Path) -> tuple[Path, Path]:
    """A certificate authority made by certtool (gnutls-bin): (its certificate, its key)."""
    where.mkdir(parents=True)
    key, cert, template = where / "ca-key.pem", where / "ca-cert.pem", where / "ca.info"
    template.write_text(_CA_TEMPLATE)
    _certtool("--generate-privkey", out=key)
    _certtool("--generate-self-signed", "--load-privkey", str(key), "--template", str(template),
              "--outfile", str(cert))
    return cert, key


@pytest.fixture
def certs(nbd_tools: None, tmp_path: Path) -> tuple[Path, Path]:
    """(the server's directory: ca-cert.pem, server-cert.pem, server-key.pem signed by a test
    CA; the client's: that CA's ca-cert.pem)."""
    ca_cert, ca_key = _ca(tmp_path / "ca")
    server, client = tmp_path / "server", tmp_path / "client"
    server.mkdir()
    client.mkdir()
    template = tmp_path / "server.info"
    template.write_text(_SERVER_TEMPLATE)
    _certtool("--generate-privkey", out=server / "server-key.pem")
    _certtool("--generate-certificate", "--load-ca-certificate", str(ca_cert), "--load-ca-privkey", str(ca_key),
              "--load-privkey", str(server / "server-key.pem"), "--template", str(template),
              "--outfile", str(server / "server-cert.pem"))
    for d in (server, client):
        (d / "ca-cert.pem").write_bytes(ca_cert.read_bytes())
    return server, client


def _x509_server(nbd_server, kind: str, server_dir: Path) -> NbdServer:
    if kind == "nbdkit":
        return nbd_server("nbdkit", size=4 * MiB, extra=("--tls=require", f"--tls-certificates={server_dir}"))
    return nbd_server("qemu", size=4 * MiB, extra=(
        # (verify-peer=off: the server asks no client certificate)
        "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={server_dir},verify-peer=off", "--tls-creds", "tls0"))


@pytest.mark.parametrize("kind", ["nbdkit", "qemu"])
def test_a_certificates_uri_reads_and_writes_through_the_controller(nbd_server, certs, kind):
    server_dir, client_dir = certs
    server = _x509_server(nbd_server, kind, server_dir)
    _write_and_read_with_tls(f"nbds+unix:///{server.export}?socket={server.sock}&tls-certificates={client_dir}",
                             5, b"x")


def test_a_server_certificate_from_another_authority_is_one_clear_error_at_start(nbd_tools, certs, tmp_path):
    """Over TCP libnbd verifies the server's certificate against the directory's ca-cert.pem
    (over a UNIX socket libnbd 1.14 does not: docs/nbd.md says so)."""
    server_dir, client_dir = certs
    other_ca, _ = _ca(tmp_path / "other")  # (a directory holding only another CA's ca-cert.pem)
    (tmp_path / "other" / "ca-key.pem").unlink()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "--tls=require",
                             f"--tls-certificates={server_dir}", "memory", str(4 * MiB)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "nbdkit did not listen"
                time.sleep(0.05)
        good = create_backend("nbd", {"uri": f"nbds://localhost:{port}/?tls-certificates={client_dir}"})
        good.close()
        uri = f"nbds://localhost:{port}/?tls-certificates={other_ca.parent}"
        with pytest.raises(ConfigError) as e:
            create_backend("nbd", {"uri": uri, "timeout": "10"})
        assert str(e.value).startswith(f"nbd backend: cannot open {uri}: ") and "\n" not in str(e.value)
        assert "certificate" in str(e.value)
    finally:
        proc.kill()
        proc.wait(30)


@pytest.mark.parametrize("name", ["missing", "empty", "relative"])
def test_a_certificates_directory_that_cannot_be_used_is_one_clear_error_at_start(nbd_server, certs, tmp_path,
                                                                                   name):
    server = _x509_server(nbd_server, "nbdkit", certs[0])
    (tmp_path / "empty").mkdir()
    path = "client" if name == "relative" else str(tmp_path / name)
    uri = f"nbds+unix:///?socket={server.sock}&tls-certificates={path}"
    with pytest.raises(ConfigError) as e:
        create_backend("nbd", {"uri": uri})
    assert str(e.value) == (f"nbd backend: tls-certificates={path} in {uri} must be one directory (an absolute "
                            "path) holding a readable ca-cert.pem")
