"""The ``nbd`` backend's asynchronous path (``submit_readv`` / ``submit_writev``) against real
NBD servers: a burst of replies is read in one wake-up of the dispatcher and completed in one
round inside the completer's batch, and a long mixed workload loses no wake-up, no completion
and no data."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import random
import termios
import threading
import time
from collections.abc import Iterator

from pcidev_nvme.backends import create_backend
from pcidev_nvme.backends.nbd import NbdBackend

MiB = 1 << 20
BLOCK = 4096


def backend(uri: str, **options: object) -> NbdBackend:
    b = create_backend("nbd", {"uri": uri, **{k: str(v) for k, v in options.items()}})
    assert isinstance(b, NbdBackend)
    return b


def unread_bytes(b: NbdBackend) -> int:
    """Bytes the server sent that the client has not read yet (its socket's receive queue)."""
    conn = b._conns[0]
    assert conn is not None and conn._sock is not None
    count = array.array("i", [0])
    fcntl.ioctl(conn._sock.fileno(), termios.FIONREAD, count)
    return count[0]


class Completer:
    """A ``done`` callable with the completer's ``batch`` (as the I/O command set's): counts the
    rounds, what each completion said, and on which thread; the first round waits (on the
    dispatcher thread) until ``hold()`` says go."""

    def __init__(self, hold: Iterator[None] | None = None) -> None:
        self.rounds: list[int] = []
        self.errors: list[int] = []
        self.threads: set[str] = set()
        self.inside = False
        self.outside = 0
        self.lock = threading.Lock()
        self.all_done = threading.Event()
        self.want = 0
        self.hold = hold

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        if self.hold is not None and not self.rounds:
            next(self.hold, None)
        self.rounds.append(0)
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def __call__(self, error: int) -> None:
        with self.lock:
            if self.inside:
                self.rounds[-1] += 1
            else:
                self.outside += 1
            self.errors.append(error)
            self.threads.add(threading.current_thread().name)
            if len(self.errors) == self.want:
                self.all_done.set()


def test_a_burst_of_replies_completes_in_one_round_inside_the_batch(nbd_server):
    """32 reads the server answers together (nbdkit's delay filter holds each for 1 s, with a
    thread per request): the dispatcher reads every reply there is per wake-up (libnbd takes
    one per notification) and settles them in one round of the completer's batch (one
    completion-queue update and one interrupt for the round). The first round is held on the
    dispatcher until the other replies wait in the socket, so the count hardly depends on
    timing. Before: one wake-up, one round and no batch per reply (32 rounds)."""
    server = nbd_server("nbdkit", size=4 * MiB, extra=("--threads=64", "--filter=delay"), params=("rdelay=1",))
    b = backend(server.uri, queue_depth=32)
    n = 32
    done: Completer

    def hold() -> Iterator[None]:
        # (on the dispatcher, inside the first round, whose replies libnbd read already: wait
        # until the others wait in the socket -- all but one partly read, and no more coming)
        conn = b._conns[0]
        assert conn is not None
        want = (n - len(conn.completed) - 1) * BLOCK
        deadline = time.monotonic() + 60
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now, unread = time.monotonic(), unread_bytes(b)
            if unread != last:
                last, since = unread, now
            elif unread >= want and now - since >= 0.3:
                break
            time.sleep(0.01)
        yield

    done = Completer(hold())
    done.want = n
    try:
        data = random.Random(3).randbytes(n * BLOCK)
        b.writev([memoryview(data)], 0)
        buf = bytearray(n * BLOCK)
        views = [memoryview(buf)[i * BLOCK:(i + 1) * BLOCK] for i in range(n)]
        for i in range(n):
            assert b.submit_readv([views[i]], i * BLOCK, done)
        assert done.all_done.wait(120)
        assert done.errors == [0] * n
        assert done.outside == 0 and sum(done.rounds) == n
        # (the held round, the rest together; a third when a late reply missed the second)
        assert len(done.rounds) <= 3, done.rounds
        assert done.threads == {"nbd-dispatch"}
        assert bytes(buf) == data
        assert b.inflight == 0
    finally:
        b.close()


def test_a_long_mixed_workload_loses_no_wake_up_completion_or_data(nbd_server):
    """4000 reads and writes of 4 KiB, 32 in flight, from two submitting threads, on qemu-nbd:
    every command completes exactly once and in time (a lost wake-up of the dispatcher, or a
    command libnbd holds back, would stall it), and every block reads back what was last
    written to it (each write carries its block number and a sequence number)."""
    server = nbd_server("qemu", size=4 * MiB)
    b = backend(server.uri, queue_depth=32)
    blocks = 64  # (each thread owns half: no two writes to one block in flight at once)
    ops = 2000
    try:
        b.writev([memoryview(bytes(blocks * BLOCK))], 0)
        last: dict[int, int] = {}
        failures: list[str] = []

        def worker(me: int) -> None:
            rnd = random.Random(me)
            slots = threading.Semaphore(16)
            busy: set[int] = set()
            lock = threading.Lock()
            seen: list[int] = []
            for seq in range(ops):
                if not slots.acquire(timeout=60):
                    failures.append(f"thread {me}: stalled at command {seq} ({len(busy)} in flight)")
                    return
                with lock:
                    free = [k for k in range(me, blocks, 2) if k not in busy]
                    block = rnd.choice(free)
                    busy.add(block)
                write = rnd.random() < 0.5
                buf = bytearray(BLOCK)
                if write:
                    buf[:16] = block.to_bytes(8, "little") + seq.to_bytes(8, "little")

                def end(error: int, block: int = block, write: bool = write, buf: bytearray = buf,
                        seq: int = seq) -> None:
                    with lock:
                        seen.append(seq)
                        if error:
                            failures.append(f"command {seq} failed with errno {error}")
                        elif write:
                            last[block] = seq
                        elif bytes(buf[:8]) not in (block.to_bytes(8, "little"), bytes(8)):
                            failures.append(f"block {block} read {bytes(buf[:16]).hex()}")
                        elif last.get(block, -1) >= 0 and int.from_bytes(buf[8:16], "little") != last[block]:
                            failures.append(f"block {block} read sequence {int.from_bytes(buf[8:16], 'little')}, "
                                            f"last written {last[block]}")
                        busy.discard(block)
                    slots.release()

                view = memoryview(buf)
                started = (b.submit_writev([view], block * BLOCK, end) if write
                           else b.submit_readv([view], block * BLOCK, end))
                assert started
            for _ in range(16):
                if not slots.acquire(timeout=60):
                    failures.append(f"thread {me}: the last commands never completed")
                    return
            if sorted(seen) != list(range(ops)):
                failures.append(f"thread {me}: completions {len(seen)} for {ops} commands, "
                                f"{len(set(seen))} distinct")

        threads = [threading.Thread(target=worker, args=(me,)) for me in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads)
        assert failures == []
        assert b.inflight == 0
        data = bytearray(blocks * BLOCK)
        b.readv([memoryview(data)], 0)
        for block, seq in last.items():
            at = block * BLOCK
            assert data[at:at + 16] == block.to_bytes(8, "little") + seq.to_bytes(8, "little")
    finally:
        b.close()


def one_delayed_read(nbd_server, seed: int, rdelay: str):
    """A backend on nbdkit holding every read ``rdelay``, its first connection, a block of
    random data written at offset 0, and a read of it started: (backend, connection, data,
    completer, read buffer)."""
    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=delay",), params=(f"rdelay={rdelay}",))
    b = backend(server.uri, queue_depth=4)
    data = random.Random(seed).randbytes(BLOCK)
    b.writev([memoryview(data)], 0)
    conn = b._conns[0]
    assert conn is not None
    done = Completer()
    done.want = 1
    buf = bytearray(BLOCK)
    return b, conn, data, done, buf


def test_a_dispatcher_that_breaks_off_leaves_no_command_unanswered(nbd_server):
    """The dispatcher thread ends on an unexpected error while a read is on the wire (nbdkit
    holds it 3 s; the dispatcher looks at deadlines within 1 s): nobody polls the handle any
    more, so libnbd would never retire the read and the guest's command would never
    complete. The connection is half-closed and the read settled as on a lost connection:
    sent again on a new connection, it completes with the data. Before: ``done`` never ran."""
    b, conn, data, done, buf = one_delayed_read(nbd_server, 5, "3")
    try:
        def broken() -> None:
            raise RuntimeError("a bug in the dispatcher")

        conn._check_deadlines = broken  # type: ignore[method-assign]  (runs while the read is pending)
        assert b.submit_readv([memoryview(buf)], 0, done)
        assert done.all_done.wait(60), "the read was never completed"
        assert done.errors == [0]
        assert bytes(buf) == data
        assert conn.dead and b._conns[0] is not conn, (conn.dead, b._conns)  # (a new connection served it)
        assert b.inflight == 0
    finally:
        b.close()


def test_a_command_found_unretired_by_two_threads_is_settled_once(nbd_server):
    """A command that two threads both settle as lost (the dispatcher's ``_strand`` as it ends
    and a submitter whose kick found it ended) is sent again once and completed once: the
    first settle claims it. Before: it was resent twice (a stale second copy of a write could
    land after a newer one) and ``inflight`` went below zero."""
    b, conn, data, done, buf = one_delayed_read(nbd_server, 9, "2")
    try:
        assert b.submit_readv([memoryview(buf)], 0, done)
        (cmd,) = list(conn.pending)
        retried: list[object] = []
        real_retry = b._retry

        def counting_retry(c: object) -> None:
            retried.append(c)
            real_retry(c)  # type: ignore[arg-type]

        b._retry = counting_retry  # type: ignore[method-assign]
        cmd.err = errno.ENOTCONN  # (as both threads would mark it)
        conn.completed.extend([cmd, cmd])
        threads = [threading.Thread(target=conn.settle) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert done.all_done.wait(60)
        time.sleep(0.5)  # (a second completion would come now)
        assert done.errors == [0] and bytes(buf) == data
        assert retried == [cmd]
        assert b.inflight == 0
    finally:
        b.close()
