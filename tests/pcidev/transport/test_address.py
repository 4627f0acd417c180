"""Socket addresses parse strictly; listen replaces a stale UNIX socket; connect
failures are transport errors."""

from __future__ import annotations

import pytest

from pcidev.errors import TransportError
from pcidev.transport.address import Address, connect, listen, parse_address


@pytest.mark.parametrize("text, want", [
    ("/run/x.sock", Address("unix", path="/run/x.sock")),
    ("unix:/run/x.sock", Address("unix", path="/run/x.sock")),
    ("tcp:127.0.0.1:4000", Address("tcp", host="127.0.0.1", port=4000)),
    ("tcp:[::1]:0", Address("tcp", host="::1", port=0)),
])
def test_addresses(text, want):
    assert parse_address(text) == want
    assert parse_address(str(want)) == want


@pytest.mark.parametrize("text", ["", "unix:", "tcp:host", "tcp:host:port", "tcp::80", "tcp:h:99999", 5])
def test_bad_addresses(text):
    with pytest.raises(TransportError):
        parse_address(text)


def test_listen_connect_and_stale_socket(tmp_path):
    path = tmp_path / "s.sock"
    first = listen(f"unix:{path}")
    first.sock.close()  # leaves a stale socket file behind
    second = listen(f"unix:{path}")
    c = connect(second.address, timeout=1)
    c.close()
    second.close()
    assert not path.exists()  # the listener removes the socket file it bound
    with pytest.raises(TransportError, match="cannot connect"):
        connect(f"unix:{tmp_path}/none.sock", timeout=0.1)
    tcp = listen("tcp:127.0.0.1:0")
    assert tcp.address.port > 0 and not tcp.address.carries_fds and tcp.file is None
    connect(tcp.address).close()
    tcp.close()


def test_the_socket_listens_before_its_file_appears(tmp_path):
    """A client that connects the moment the socket file exists is never refused (the
    socket listens under a hidden name first and is then linked into place)."""
    import os
    import socket
    import threading

    from pcidev.transport.address import listen_unix

    refused = 0
    for i in range(200):
        path = str(tmp_path / f"s{i}.sock")
        box: list = []
        t = threading.Thread(target=lambda p=path, b=box: b.append(listen_unix(p)))
        t.start()
        while not os.path.exists(path):
            pass
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            c.connect(path)
        except ConnectionRefusedError:
            refused += 1
        finally:
            c.close()
        t.join()
        box[0].close()
    assert refused == 0
    assert os.listdir(tmp_path) == []  # no hidden name left behind, every socket file removed


def test_a_path_too_long_for_a_socket_is_one_clear_error(tmp_path):
    from pcidev.transport.address import MAX_UNIX_PATH, listen_unix

    path = str(tmp_path / ("x" * (MAX_UNIX_PATH + 1 - len(str(tmp_path)))))
    with pytest.raises(TransportError, match="longer than"):
        listen_unix(path)
    with pytest.raises(TransportError, match="exists and is a directory"):
        listen_unix(str(tmp_path))


@pytest.mark.parametrize("name", ["s", "ab", "vfio-user.sock"])
@pytest.mark.parametrize("room", [0, 1, 2, 3, 10, 20])
def test_every_path_a_socket_address_holds_can_listen(tmp_path, name, room):
    """Whatever the basename, a path up to the address limit listens (a hidden name is
    used where one fits, else the socket binds in place) and is removed on close."""
    import os

    from pcidev.transport.address import MAX_UNIX_PATH, connect, listen_unix

    pad = MAX_UNIX_PATH - room - len(str(tmp_path)) - 2 - len(name)
    directory = tmp_path / ("d" * pad)
    directory.mkdir()
    path = directory / name
    assert len(str(path)) == MAX_UNIX_PATH - room
    listener = listen_unix(str(path))
    connect(f"unix:{path}", timeout=1).close()
    listener.close()
    assert os.listdir(directory) == []
