"""A hostile vfio-user client cannot crash, hang, exhaust or corrupt the server (issue 12).

Each test is the reproducer of one finding: memory that shrinks under the device
(SIGBUS), interrupt fds that block the server, DMA maps without a limit, a VERSION
string nested deep enough to overflow a recursive parser, too many fds with one
message, and a client that stops in the middle of a message.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from hostile_peer import ServedVfioUser, Trickler
from hypothesis import given, settings
from hypothesis import strategies as st

from pcidev.cli.serve import child_args
from pcidev.devices.edu import DESC, EduDevice
from pcidev.dma import alloc_memfd
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import close_fds
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.conn import NofdMaps
from pcidev.transport.vfio_user.protocol import VfioUserError
from pcidev.transport.vfio_user.server import VfioUserServer
from pcidev.transport.vfio_user.serving import VfioUserService, listen_vfio_user
from pcidev_nvme.controller import NvmeController

RAM = 0x40000000
SIZE = 1 << 20


@pytest.fixture
def edu():
    with ServedVfioUser() as s:
        yield s.client, s.ep, s.server


def _refused(client: VfioUserClient, cmd: int, payload: bytes = b"", fds=()) -> int:
    with pytest.raises(VfioUserError) as info:
        client.request(cmd, payload, fds)
    assert not client.closed
    return info.value.errno


def _unsealed_memfd(size: int) -> int:
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _dma_map(addr: int, size: int, flags: int = 3) -> bytes:
    return protocol.DMA_MAP_S.pack(protocol.DMA_MAP_S.size, flags, 0, addr, size)


# -- finding 1: guest memory that can shrink under the device --------------------------------
def test_an_unsealed_memfd_is_refused_and_a_shrink_cannot_kill_the_server(tmp_path):
    """The attack: DMA_MAP a memfd without F_SEAL_SHRINK, put the edu ring in it, shrink
    the file and ring the doorbell. A server that mapped it dies of SIGBUS; this one
    refused the map (EINVAL, one line saying what the client must do) and still answers."""
    path = tmp_path / "edu.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pcidev", "serve", "--once", "--vfio-user", str(path), "edu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fd = _unsealed_memfd(SIZE)
    try:
        assert "listening on" in proc.stdout.readline()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        client = VfioUserClient(sock, timeout=20)
        client.version()
        err = None
        try:
            client.request(protocol.DMA_MAP, _dma_map(RAM, SIZE), [fd])
        except VfioUserError as exc:
            err = exc.errno
        mem = mmap.mmap(fd, SIZE)
        mem[0:32] = DESC.pack(RAM + 0x10000, RAM + 0x20000, 4096, 0, 0, 0)
        mem.close()
        os.ftruncate(fd, 0)  # the shrink
        client.write(protocol.CONFIG_REGION, 0x04, (0x6).to_bytes(2, "little"))
        client.write_int(0, 0x100, 8, RAM)  # RING_BASE
        client.write_int(0, 0x108, 4, 4)  # RING_SIZE
        client.write_int(0, 0x114, 4, 1)  # RING_CTRL: enable
        client.write_int(0, 0x10C, 4, 1)  # RING_TAIL: the doorbell
        time.sleep(0.2)
        # the server is alive and answers
        assert int.from_bytes(client.read(protocol.CONFIG_REGION, 0, 2), "little") == 0x1234
        assert err == errno.EINVAL
        # a sealed memfd (QEMU's memory-backend-memfd, seal=on by default) is accepted
        sealed = alloc_memfd(SIZE, "sealed")
        try:
            client.request(protocol.DMA_MAP, _dma_map(RAM, SIZE), [sealed])
        finally:
            os.close(sealed)
        sock.close()
        assert proc.wait(30) == 0
        out = proc.stdout.read()
        assert "F_SEAL_SHRINK" in out and "memory-backend-memfd" in out, out
    finally:
        os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dma_map_refuses_a_file_that_cannot_be_sealed(edu, tmp_path):
    client, ep, _server = edu
    f = tmp_path / "ram"
    f.write_bytes(b"\0" * 4096)
    fd = os.open(f, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert _refused(client, protocol.DMA_MAP, _dma_map(RAM, 4096), [fd]) == errno.EINVAL
        grow_only = os.memfd_create("grow-sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(grow_only, 4096)
        fcntl.fcntl(grow_only, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
        try:
            assert _refused(client, protocol.DMA_MAP, _dma_map(RAM, 4096), [grow_only]) == errno.EINVAL
        finally:
            os.close(grow_only)
        assert ep.memory.regions() == []
    finally:
        os.close(fd)


def test_unsealed_memory_for_a_trusted_client_is_an_explicit_choice():
    fd = _unsealed_memfd(4096)
    try:
        with ServedVfioUser(allow_unsealed_dma=True) as s:
            s.client.request(protocol.DMA_MAP, _dma_map(RAM, 4096), [fd])
            assert [r.gpa for r in s.ep.memory.regions()] == [RAM]
    finally:
        os.close(fd)


# -- finding 2: interrupt fds that block the server ------------------------------------------
def _set_irq_fd(client: VfioUserClient, index: int, fd: int) -> None:
    client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x24, index, 0, 1), [fd])


def test_set_irqs_refuses_what_is_not_an_eventfd(edu, tmp_path):
    client, ep, _server = edu
    r, w = os.pipe()
    f = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    try:
        for fd in (w, f):
            with pytest.raises(VfioUserError) as info:
                _set_irq_fd(client, protocol.IRQ_MSIX, fd)
            assert info.value.errno == errno.EINVAL
            with pytest.raises(VfioUserError) as info:
                _set_irq_fd(client, protocol.IRQ_INTX, fd)
            assert info.value.errno == errno.EINVAL
        assert ep.sink.vector_fds == {} and ep.sink.intx_fd is None
    finally:
        close_fds([r, w, f])


def test_a_saturated_eventfd_never_blocks_the_server(edu):
    """A blocking eventfd whose counter is at its maximum: a write would wait for a reader
    forever (under the interrupt lock). The signal is dropped: the vector is signalled already."""
    client, ep, _server = edu
    efd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking
    try:
        os.eventfd_write(efd, 0xFFFF_FFFF_FFFF_FFFE)  # the counter's maximum
        client.write(protocol.CONFIG_REGION, 0x04, (0x6).to_bytes(2, "little"))
        _set_irq_fd(client, protocol.IRQ_MSIX, efd)
        _set_irq_fd(client, protocol.IRQ_INTX, efd)
        # loopback triggers from the server, and an interrupt the device raises
        client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x21, protocol.IRQ_MSIX, 0, 1))
        client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x21, protocol.IRQ_INTX, 0, 1))
        client.write_int(0, 0x60, 4, 1)  # edu IRQ_RAISE: INTx asserted (MSI-X is not enabled)
        client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x11, protocol.IRQ_INTX, 0, 1))
        assert int.from_bytes(client.read(protocol.CONFIG_REGION, 0, 2), "little") == 0x1234
        assert ep.sink.saturated >= 2
        # a reader empties it: interrupts arrive again
        assert os.eventfd_read(efd) == 0xFFFF_FFFF_FFFF_FFFE
        client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x21, protocol.IRQ_MSIX, 0, 1))
        assert os.eventfd_read(efd) == 1
    finally:
        os.close(efd)


# -- finding 5: DMA maps without a limit -----------------------------------------------------
def test_dma_maps_are_capped_with_and_without_fds():
    fds = [alloc_memfd(4096, f"r{i}") for i in range(2)]
    try:
        with ServedVfioUser(max_dma_maps=8) as s:
            client, ep, server = s.client, s.ep, s.server
            for i in range(2):
                client.request(protocol.DMA_MAP, _dma_map(RAM + i * 0x10000, 4096), [fds[i]])
            for i in range(2, 8):
                client.request(protocol.DMA_MAP, _dma_map(RAM + i * 0x10000, 4096))
            assert _refused(client, protocol.DMA_MAP, _dma_map(RAM + 9 * 0x10000, 4096)) == errno.ENOSPC
            extra = alloc_memfd(4096)
            try:
                assert _refused(client, protocol.DMA_MAP, _dma_map(RAM + 9 * 0x10000, 4096), [extra]) == errno.ENOSPC
            finally:
                os.close(extra)
            # an unmap makes room
            client.request(protocol.DMA_UNMAP, protocol.DMA_UNMAP_S.pack(24, 0, RAM + 3 * 0x10000, 4096))
            client.request(protocol.DMA_MAP, _dma_map(RAM + 9 * 0x10000, 4096))
            assert len(server.nofd_maps) + len(ep.memory.regions()) == 8
    finally:
        close_fds(fds)


def test_dma_map_overlap_checks_with_many_maps(edu):
    """Overlaps are found among many fd-less maps and regions on both sides (bisect)."""
    client, ep, server = edu
    fd = alloc_memfd(0x2000)
    try:
        for i in range(0, 200, 2):
            client.request(protocol.DMA_MAP, _dma_map(i * 0x10000, 0x8000))
        client.request(protocol.DMA_MAP, _dma_map(0x10000 * 201, 0x2000), [fd])
        for addr, size in ((0x7000, 0x1000), (0x28000 - 0x1000, 0x2000), (0x10000 * 198 + 0x4000, 0x100000),
                           (0x10000 * 201 + 0x1FFF, 1), (0x10000 * 201 - 1, 2), (0, 1 << 40)):
            assert _refused(client, protocol.DMA_MAP, _dma_map(addr, size)) == errno.EEXIST, hex(addr)
        for addr, size in ((0x8000, 0x8000), (0x10000 * 201 + 0x2000, 0x1000), (0x10000 * 199, 0x10000)):
            client.request(protocol.DMA_MAP, _dma_map(addr, size))
        assert len(server.nofd_maps) == 103
    finally:
        os.close(fd)


# -- finding 8: a VERSION nested deep enough to overflow a recursive parser -------------------
@pytest.mark.parametrize("text", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                                  b'{"capabilities":' + b"[" * 5000 + b"]" * 5000 + b"}"])
def test_a_deeply_nested_version_is_refused_cleanly(edu, caplog, text):
    client, _ep, _server = edu
    with caplog.at_level(logging.INFO, logger="pcidev.transport.vfio_user.server"):
        err = _refused(client, protocol.VERSION, protocol.VERSION_HDR.pack(0, 0) + text + b"\0")
    assert err == errno.EINVAL
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text
    # an ordinary VERSION still works
    assert client.version()["max_msg_fds"] == 8


def test_the_client_refuses_a_deeply_nested_version_reply():
    """A hostile server's reply is bounded the same way (a clean TransportError)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = VfioUserClient(b, timeout=10)

    def server() -> None:
        hdr = a.recv(16)
        mid = protocol.HEADER.unpack(hdr)[0]
        size = protocol.HEADER.unpack(hdr)[2]
        a.recv(size - 16, socket.MSG_WAITALL)
        nested = b'{"capabilities": ' + b"[" * 3000 + b"]" * 3000 + b"}"
        a.sendall(protocol.reply(mid, protocol.VERSION, protocol.VERSION_HDR.pack(0, 0) + nested + b"\0"))

    t = threading.Thread(target=server, daemon=True)
    t.start()
    try:
        with pytest.raises(Exception) as info:
            client.version(caps={"pad": "x" * 7000})
        assert not isinstance(info.value, RecursionError)
        assert "VERSION" in str(info.value)
    finally:
        t.join(10)
        a.close()
        b.close()


# -- finding 10: more fds with one message than allowed ---------------------------------------
def test_too_many_fds_get_an_error_reply_and_the_connection_goes_on(edu):
    client, ep, server = edu
    efds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(server.max_msg_fds + 4)]
    before = len(os.listdir("/proc/self/fd"))
    try:
        assert _refused(client, protocol.DEVICE_SET_IRQS,
                        protocol.SET_IRQS_S.pack(20, 0x24, protocol.IRQ_MSIX, 0, len(efds)), efds) == errno.EINVAL
        # the connection goes on, and the server kept none of the fds
        assert int.from_bytes(client.read(protocol.CONFIG_REGION, 0, 2), "little") == 0x1234
        assert ep.sink.vector_fds == {}
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        close_fds(efds)


# -- deadlines: a client that stops in the middle of a message --------------------------------
@pytest.mark.parametrize("part", ["header", "body"])
def test_a_client_stopping_mid_message_is_dropped_after_the_deadline(part):
    with ServedVfioUser(message_timeout=0.5) as s:
        msg = protocol.message(1, protocol.REGION_READ, protocol.REGION_ACCESS_S.pack(0, 7, 4))
        s.client.sock.sendall(msg[:7] if part == "header" else msg[:20])
        s.thread.join(20)
        assert not s.thread.is_alive()
        assert "deadline" in s.result["reason"]


def test_an_idle_client_between_messages_is_not_dropped():
    with ServedVfioUser(message_timeout=0.3) as s:
        time.sleep(1.0)
        assert s.thread.is_alive()
        assert int.from_bytes(s.client.read(protocol.CONFIG_REGION, 0, 2), "little") == 0x1234


def test_a_client_that_reads_no_replies_is_dropped_after_the_deadline():
    """Replies fill the socket buffer of a client that never reads them: the send
    stalls, and the deadline ends the connection instead of holding the server."""
    with ServedVfioUser(message_timeout=0.5) as s:
        client, t = s.client, s.thread
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        req = protocol.message(1, protocol.REGION_READ, protocol.REGION_ACCESS_S.pack(0, 7, 4096))
        client.sock.setblocking(False)
        deadline = time.monotonic() + 20
        while t.is_alive() and time.monotonic() < deadline:
            try:
                client.sock.send(req)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.01)
        t.join(10)
        assert not t.is_alive()
        assert s.result["reason"].startswith("transport")


# -- handle_one(): the loop's deadlines for a caller that reads one message at a time -------------
def _read_config(mid: int = 1) -> bytes:
    return protocol.message(mid, protocol.REGION_READ, protocol.REGION_ACCESS_S.pack(0, protocol.CONFIG_REGION, 2))


def _handle_one(server: VfioUserServer) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["reason"] = server.handle_one()
        except BaseException as exc:  # (reported to the test)
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("how", ["half-header-then-nothing", "trickled"])
def test_handle_one_ends_a_message_that_does_not_arrive_whole_in_time(how):
    """A client sending half a header and then nothing, or a message a byte every 0.1 s
    (each inside any per-read timeout), cannot hold handle_one() past ``message_timeout``."""
    with ServedVfioUser(loop=False, message_timeout=0.5) as s:
        msg = _read_config()
        t, out = _handle_one(s.server)
        if how == "trickled":
            with Trickler(s.client.sock, msg, every=0.1):
                t.join(20)
        else:
            s.client.sock.sendall(msg[:7])
            t.join(20)
        assert not t.is_alive()
        assert out == {"reason": "transport: deadline: a message did not arrive whole in 0.5s"}


def test_handle_one_answers_whole_messages_and_waits_for_an_idle_client():
    with ServedVfioUser(loop=False, message_timeout=0.3) as s:
        sock = s.client.sock
        t, out = _handle_one(s.server)
        time.sleep(1.0)  # idle between messages: no deadline
        assert t.is_alive()
        sock.sendall(_read_config(5)[:3])
        time.sleep(0.05)
        sock.sendall(_read_config(5)[3:] + _read_config(6))  # whole, and the next one too
        t.join(20)
        assert out == {"reason": None}
        for mid in (5, 6):
            if mid == 6:
                assert s.server.handle_one() is None  # already buffered: no read needed
            head = protocol.HEADER.unpack(sock.recv(protocol.HEADER.size, socket.MSG_WAITALL))
            body = sock.recv(head[2] - protocol.HEADER.size, socket.MSG_WAITALL)
            assert head[0] == mid and body[-2:] == (0x1234).to_bytes(2, "little")  # the vendor id
        sock.shutdown(socket.SHUT_WR)
        assert s.server.handle_one() == "eof"


def test_handle_one_after_a_message_that_broke_the_framing_reads_no_more():
    lost = "a message whose size cannot be trusted (oversized, or below its header)"
    with ServedVfioUser(loop=False, message_timeout=5.0) as s:
        sock = s.client.sock
        sock.sendall(protocol.HEADER.pack(1, protocol.REGION_READ, 4, 0, 0))  # a size below the header
        assert s.server.handle_one() == lost
        mid, _cmd, _size, flags, err = protocol.HEADER.unpack(sock.recv(protocol.HEADER.size, socket.MSG_WAITALL))
        assert (mid, flags & protocol.FLAG_ERROR, err) == (1, protocol.FLAG_ERROR, errno.EINVAL)
        sock.sendall(_read_config())
        t, out = _handle_one(s.server)  # the stream is lost: nothing more is read (no spin, no hang)
        t.join(20)
        assert not t.is_alive() and out == {"reason": lost}


# -- the pieces ------------------------------------------------------------------------------
@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 8)), max_size=30),
       st.integers(0, 80), st.integers(1, 20))
@settings(max_examples=200, deadline=None)
def test_nofd_maps_find_overlaps_as_a_scan_does(maps, addr, size):
    table = NofdMaps()
    for a, s in maps:
        if table.overlapping(a, s) is None:
            table[a] = (s, 0)
    kept = table.items()
    assert [a for a, _ in kept] == sorted(a for a, _ in kept)
    scan = [a for a, (s, _f) in kept if a < addr + size and addr < a + s]
    found = table.overlapping(addr, size)
    assert (found is None) == (not scan) and (found is None or found in scan)
    for a, _ in kept[::2]:
        del table[a]
    assert table == dict(kept[1::2])


def test_parse_caps_bounds_size_and_depth():
    assert protocol.parse_caps(b"") == {} and protocol.parse_caps(b" \0") == {}
    assert protocol.parse_caps(b'{"capabilities":{"a":"[[[[{{{{"}}\0') == {"a": "[[[[{{{{"}
    deep = "[" * (protocol.MAX_VERSION_DEPTH - 2) + "]" * (protocol.MAX_VERSION_DEPTH - 2)  # + 2 objects
    assert protocol.parse_caps(b'{"capabilities":{"a":' + deep.encode() + b"}}\0")["a"]
    with pytest.raises(ValueError, match="deeper"):
        protocol.parse_caps(b'{"capabilities":{"a":[' + deep.encode() + b"]}}\0")
    with pytest.raises(ValueError, match="bytes"):
        protocol.parse_caps(b'{"x":"' + b"y" * protocol.MAX_VERSION_SIZE + b'"}\0')
    assert protocol.json_depth('["\\"[", {"a": "\\\\"}]') == 2
    for bad in (b"{", b"[1]\0", b'{"capabilities":[]}\0', b"\xff\0", b"{\0"):
        with pytest.raises(ValueError):
            protocol.parse_caps(bad)


def test_the_service_gives_each_client_its_server_options(tmp_path):
    ep = DeviceEndpoint(EduDevice())
    path = str(tmp_path / "edu.sock")
    service = VfioUserService(ep, listen_vfio_user(path), path, once=True, out=open(os.devnull, "w"),
                              signals=False, server_options={"max_dma_maps": 1})
    t = threading.Thread(target=service.run, daemon=True)
    t.start()
    try:
        with VfioUserClient.connect(path) as client:
            client.request(protocol.DMA_MAP, _dma_map(RAM, 4096))
            assert _refused(client, protocol.DMA_MAP, _dma_map(RAM + 0x10000, 4096)) == errno.ENOSPC
    finally:
        t.join(20)
        assert not t.is_alive()
        service.out.close()


# -- the limits from the command line ------------------------------------------------------------
def _serve_cli(path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pcidev", "-p", "no:nvme", "serve", "--once", "--vfio-user",
                             str(path), *args, "edu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_serve_takes_the_limits_from_its_command_line(tmp_path):
    """``--max-dma-maps 2``: the third DMA_MAP gets ENOSPC; ``--allow-unsealed-dma``: an
    unsealed memfd is mapped; a handover's new process gets the same options."""
    path = tmp_path / "edu.sock"
    proc = _serve_cli(path, "--max-dma-maps", "2", "--message-timeout", "7.5", "--allow-unsealed-dma")
    fd = _unsealed_memfd(4096)
    try:
        assert "listening on" in proc.stdout.readline()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        client = VfioUserClient(sock, timeout=20)
        client.version()
        client.request(protocol.DMA_MAP, _dma_map(RAM, 4096), [fd])  # unsealed: a trusted client
        client.request(protocol.DMA_MAP, _dma_map(RAM + 0x10000, 4096))
        assert _refused(client, protocol.DMA_MAP, _dma_map(RAM + 0x20000, 4096)) == errno.ENOSPC
        sock.close()
        assert proc.wait(30) == 0
    finally:
        os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    args = argparse.Namespace(vfio_user="/s", once=True, control=None, max_dma_maps=2, message_timeout=7.5,
                              allow_unsealed_dma=True)
    ctx = argparse.Namespace(plugin_specs=[])
    got = child_args(args, ctx, "edu")  # type: ignore[arg-type]
    assert got[got.index("--max-dma-maps") + 1] == "2" and got[got.index("--message-timeout") + 1] == "7.5"
    assert "--allow-unsealed-dma" in got and got[-1] == "edu"


@pytest.mark.parametrize("args, message", [
    (["--max-dma-maps", "0"], "--max-dma-maps 0: must be at least 1"),
    (["--message-timeout", "0"], "--message-timeout 0: must be from 0.001 to 86400 seconds"),
    (["--message-timeout", "nan"], "--message-timeout nan: must be from"),
    (["--message-timeout", "inf"], "--message-timeout inf: must be from"),
    (["--message-timeout", "1e-7"], "--message-timeout 1e-07: must be from"),
])
def test_bad_limits_on_the_command_line_are_one_line(tmp_path, args, message):
    proc = _serve_cli(tmp_path / "edu.sock", *args)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and message in out and "Traceback" not in out, out
    assert not (tmp_path / "edu.sock").exists()


def test_a_client_taking_a_large_reply_slowly_is_dropped_after_the_deadline():
    """A 1 MiB REGION_READ reply taken 64 KiB every 0.3 s (each ``send`` progresses inside
    ``SO_SNDTIMEO``): the reply as a whole gets ``message_timeout``, then the connection
    ends, instead of the ~5 s this client would hold the server thread."""
    dev = NvmeController("cmb_size=2,max_ioqpairs=2,msix_vectors=3,ns=mem:size=1M")
    with ServedVfioUser(dev, message_timeout=1.0) as s:
        client, t, result, sock = s.client, s.thread, s.result, s.client.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.version()
        n = 1 << 20
        sock.sendall(protocol.message(2, protocol.REGION_READ, protocol.REGION_ACCESS_S.pack(0, 2, n)))
        t0 = time.monotonic()
        got = 0
        sock.setblocking(False)
        while t.is_alive() and time.monotonic() - t0 < 20:
            time.sleep(0.3)
            try:
                data = sock.recv(64 * 1024)
            except BlockingIOError:
                continue
            if not data:
                break
            got += len(data)
        t.join(10)
        assert not t.is_alive() and time.monotonic() - t0 < 4.0
        assert got < n, got
        assert "in time (overall deadline" in str(result.get("reason")), result
