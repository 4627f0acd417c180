"""File I/O without thread hand-offs: a Read or a non-durable Write on a buffered
``file`` namespace is first tried with ``RWF_NOWAIT`` on the submitting thread (a
page-cache hit completes before ``submit`` returns); what would block (EAGAIN), what
the file system does not support (EOPNOTSUPP, EINVAL) and what is left after a short
transfer goes to a worker. Data is checked byte for byte on every path."""

from __future__ import annotations

import errno
import os

import pytest
from fakes import FakeController, prp_for, rw

from pcidev_nvme.io import IoCommandSet, Opcode
from pcidev_nvme.namespace import make_namespace

NOWAIT = os.RWF_NOWAIT


def pattern(n: int, seed: int) -> bytes:
    return bytes(((i * 131 + seed * 7) >> 3) & 0xFF for i in range(n))


@pytest.fixture
def env(tmp_path):
    ctrl = FakeController()
    ctrl.namespaces[1] = make_namespace(1, f"file:path={tmp_path}/nw.img,size=1M")
    ios = IoCommandSet(ctrl)
    yield ctrl, ios
    ios.close()
    assert not ctrl.double, "a request was completed twice"
    ctrl.close()


def _buffer(ctrl, n: int) -> int:
    """A guest buffer starting 100 bytes into a page: the data pointer has three pieces."""
    return ctrl.alloc(n + 4096) + 100


def _write_cmd(ctrl, slba: int, data: bytes, *, fua: bool = False):
    buf = _buffer(ctrl, len(data))
    ctrl.memory.write(buf, data)
    p1, p2 = prp_for(ctrl, buf, len(data))
    return rw(Opcode.WRITE, slba, len(data) // 512, prp1=p1, prp2=p2, fua=fua)


def _read_cmd(ctrl, slba: int, nlb: int):
    buf = _buffer(ctrl, nlb * 512)
    p1, p2 = prp_for(ctrl, buf, nlb * 512)
    return buf, rw(Opcode.READ, slba, nlb, prp1=p1, prp2=p2)


def _file_bytes(ctrl, offset: int, n: int) -> bytes:
    return os.pread(ctrl.namespaces[1].backend.fd, n, offset)


def _record(monkeypatch, *, read=None, write=None):
    """Wrap os.preadv / os.pwritev; ``read``/``write`` replace the RWF_NOWAIT calls."""
    calls = []
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def preadv(fd, bufs, offset, flags=0):
        calls.append(("preadv", flags))
        if flags & NOWAIT and read is not None:
            return read(real_preadv, fd, bufs, offset, flags)
        return real_preadv(fd, bufs, offset, flags)

    def pwritev(fd, bufs, offset, flags=0):
        calls.append(("pwritev", flags))
        if flags & NOWAIT and write is not None:
            return write(real_pwritev, fd, bufs, offset, flags)
        return real_pwritev(fd, bufs, offset, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pwritev", pwritev)
    return calls


def _nowait_write_supported(real, fd, bufs, offset, flags):
    """A file system that takes buffered RWF_NOWAIT writes (ext4 does not)."""
    return real(fd, bufs, offset, flags & ~NOWAIT)


def test_page_cache_hits_complete_on_the_submitting_thread(env, monkeypatch):
    ctrl, ios = env
    data = pattern(8192, 1)
    calls = _record(monkeypatch, write=_nowait_write_supported)
    req = _write_cmd(ctrl, 8, data)
    ios.submit(req)
    assert ctrl.results[id(req)][0] == 0  # completed before submit returned
    assert calls == [("pwritev", NOWAIT)]
    buf, req = _read_cmd(ctrl, 8, 16)
    ios.submit(req)
    assert ctrl.results[id(req)][0] == 0
    assert ctrl.memory.read(buf, 8192) == data
    assert calls[1:] == [("preadv", NOWAIT)]
    assert ios._pool is None  # no worker was needed
    assert ctrl.smart.host_read_commands == 1 and ctrl.smart.host_write_commands == 1


def test_file_system_without_nowait_writes_is_not_asked_again(env, monkeypatch):
    ctrl, ios = env

    def unsupported(real, fd, bufs, offset, flags):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    calls = _record(monkeypatch, write=unsupported)
    for slba, seed in ((0, 8), (16, 9)):
        req = _write_cmd(ctrl, slba, pattern(4096, seed))
        ios.submit(req)
        assert ctrl.wait(req)[0] == 0
        assert _file_bytes(ctrl, slba * 512, 4096) == pattern(4096, seed)
    assert calls == [("pwritev", NOWAIT), ("pwritev", 0), ("pwritev", 0)]
    # reads still go without waiting
    calls.clear()
    buf, req = _read_cmd(ctrl, 0, 8)
    ios.submit(req)
    assert ctrl.results[id(req)][0] == 0
    assert ctrl.memory.read(buf, 4096) == pattern(4096, 8)
    assert calls == [("preadv", NOWAIT)]


@pytest.mark.parametrize("err", [errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL])
def test_read_that_would_block_goes_to_a_worker(env, monkeypatch, err):
    ctrl, ios = env
    data = pattern(8192, 2)
    os.pwrite(ctrl.namespaces[1].backend.fd, data, 16 * 512)

    def refuse(real, fd, bufs, offset, flags):
        raise OSError(err, os.strerror(err)) if err != errno.EAGAIN else BlockingIOError(err, "would block")

    calls = _record(monkeypatch, read=refuse)
    buf, req = _read_cmd(ctrl, 16, 16)
    ios.submit(req)
    assert ctrl.wait(req)[0] == 0
    assert ctrl.memory.read(buf, 8192) == data
    assert calls == [("preadv", NOWAIT), ("preadv", 0)]
    # a file system without RWF_NOWAIT is not asked again; the others are
    calls.clear()
    buf, req = _read_cmd(ctrl, 16, 16)
    ios.submit(req)
    assert ctrl.wait(req)[0] == 0
    assert ctrl.memory.read(buf, 8192) == data
    expect = [("preadv", 0)] if err == errno.EOPNOTSUPP else [("preadv", NOWAIT), ("preadv", 0)]
    assert calls == expect


@pytest.mark.parametrize("first", [1, 3996, 3997, 5000, 8191])
def test_short_read_hands_the_rest_to_a_worker(env, monkeypatch, first):
    ctrl, ios = env
    data = pattern(8192, 3)
    os.pwrite(ctrl.namespaces[1].backend.fd, data, 32 * 512)
    rest_at = []

    def short(real, fd, bufs, offset, flags):
        # only the first ``first`` bytes are in the page cache
        mv = memoryview(bytearray(first))
        n = real(fd, [mv], offset, flags)
        pos = 0
        for b in bufs:
            take = min(len(b), n - pos)
            if take <= 0:
                break
            b[:take] = mv[pos:pos + take]
            pos += take
        return n

    real_preadv = os.preadv

    def spy(fd, bufs, offset, flags=0):
        if not flags & NOWAIT:
            rest_at.append((offset, sum(len(b) for b in bufs)))
        return real_preadv(fd, bufs, offset, flags)

    monkeypatch.setattr(os, "preadv", spy)
    _record(monkeypatch, read=short)
    buf, req = _read_cmd(ctrl, 32, 16)
    ctrl.memory.write(buf, b"\xEE" * 8192)
    ios.submit(req)
    assert ctrl.wait(req)[0] == 0
    assert ctrl.memory.read(buf, 8192) == data
    # only the rest, where it lies, from the first block not read whole (the block locks
    # keep a block whole: it is read again, in one piece)
    whole = first // 512 * 512
    assert rest_at == [(32 * 512 + whole, 8192 - whole)]


@pytest.mark.parametrize("first", [0, 1, 3996, 6000])
def test_short_or_refused_write_hands_the_rest_to_a_worker(env, monkeypatch, first):
    ctrl, ios = env
    data = pattern(8192, 4)
    os.pwrite(ctrl.namespaces[1].backend.fd, b"\x11" * 8192, 40 * 512)

    def short(real, fd, bufs, offset, flags):
        if not first:
            raise BlockingIOError(errno.EAGAIN, "would block")
        joined = b"".join(bytes(b) for b in bufs)[:first]
        return real(fd, [joined], offset, flags)

    calls = _record(monkeypatch, write=short)
    req = _write_cmd(ctrl, 40, data)
    ios.submit(req)
    assert ctrl.wait(req)[0] == 0
    assert _file_bytes(ctrl, 40 * 512, 8192) == data
    assert calls == [("pwritev", NOWAIT), ("pwritev", 0)]
    assert ctrl.smart.host_write_commands == 1


def test_durable_write_never_goes_without_waiting(env, monkeypatch):
    ctrl, ios = env
    calls = _record(monkeypatch)
    data = pattern(4096, 5)
    req = _write_cmd(ctrl, 48, data, fua=True)
    ios.submit(req)
    assert ctrl.wait(req)[0] == 0
    ctrl.volatile_write_cache = False  # Feature 06h WCE=0: every write is durable
    req = _write_cmd(ctrl, 56, data)
    ios.submit(req)
    assert ctrl.wait(req)[0] == 0
    assert calls == [("pwritev", os.RWF_DSYNC), ("pwritev", os.RWF_DSYNC)]
    assert _file_bytes(ctrl, 48 * 512, 4096) == data == _file_bytes(ctrl, 56 * 512, 4096)


def test_direct_and_read_only_images_do_not_try_nowait(tmp_path, monkeypatch):
    ctrl = FakeController()
    ctrl.namespaces[1] = make_namespace(1, f"file:path={tmp_path}/d.img,size=1M,direct=on")
    path = f"{tmp_path}/ro.img"
    with open(path, "wb") as f:
        f.write(pattern(4096, 6) + bytes((1 << 20) - 4096))
    ctrl.namespaces[2] = make_namespace(2, f"file:path={path},readonly=on")
    ios = IoCommandSet(ctrl)
    try:
        assert not ctrl.namespaces[1].backend.nowait
        calls = _record(monkeypatch)
        req = _write_cmd(ctrl, 0, pattern(4096, 7))
        ios.submit(req)
        assert ctrl.wait(req)[0] == 0
        assert all(not f & NOWAIT for _, f in calls)
        buf = _buffer(ctrl, 4096)
        p1, p2 = prp_for(ctrl, buf, 4096)
        req = rw(Opcode.READ, 0, 8, nsid=2, prp1=p1, prp2=p2)
        ios.submit(req)
        assert ctrl.wait(req)[0] == 0
        assert ctrl.memory.read(buf, 4096) == pattern(4096, 6)
        req = rw(Opcode.WRITE, 0, 8, nsid=2, prp1=p1, prp2=p2)
        ios.submit(req)
        assert ctrl.wait(req)[0] != 0  # refused, as before
    finally:
        ios.close()
        ctrl.close()
