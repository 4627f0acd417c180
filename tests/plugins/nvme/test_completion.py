"""Completions made outside a doorbell batch (worker threads) are combined: the thread
that finds no poster running posts them all, with one interrupt per vector; a quiesce
waits for that poster."""

from __future__ import annotations

import threading

from _helpers import GatedBackend, attach_namespace, wait_until

from pcidev_nvme.completion import COMBINE_ROUNDS
from pcidev_nvme.testing.driver import READ, WRITE


def test_worker_completions_are_combined_one_interrupt_per_vector(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=2)  # (three MSI-X vectors)
    drv, ctrl = env.drv, env.ctrl
    gated = GatedBackend(4 << 20)
    attach_namespace(ctrl, 2, gated)
    drv.scan_namespaces()
    # two queue pairs whose CQs share one vector
    for qid in (1, 2):
        drv.delete_io_queue_pair(qid)
        drv.create_io_queue_pair(qid, 32, vector=1)
    data = bytes(range(256)) * 2
    region = 256  # blocks of a region of the block locks: one command per region, none waits for another
    for i in range(16):
        gated.data[512 * region * i:512 * (region * i + 1)] = data
    buf = env.machine.alloc(16 * 512)

    # the first completion's poster stops inside its post until ``go`` is set
    entered, go = threading.Event(), threading.Event()
    real = ctrl._complete_batch
    calls = []

    def slow_post(items, tls):
        calls.append(len(items))
        if len(calls) == 1:
            entered.set()
            assert go.wait(10)
        real(items, tls)

    ctrl._complete_batch = slow_post
    gated.hold()
    n = 16
    for i in range(n):
        qid = 1 + i % 2
        drv.submit(qid, READ if i % 4 else WRITE, nsid=2, cdw10=i * region, buf=buf + 512 * i, length=512,
                   ring=False, tag=i)
        if i % 4 == 0:
            env.machine.memory.write(buf + 512 * i, data)
    drv.ring(1)
    drv.ring(2)
    wait_until(lambda: gated.waiting >= 4, what="workers blocked")
    before = env.pdev.irq_count(1)
    gated.release(1)
    assert entered.wait(10)
    assert not ctrl.batches_idle()  # the poster counts as a batch: a quiesce waits for it
    gated.release()
    # every other worker hands its completion to the blocked poster and goes on
    wait_until(lambda: len(ctrl._combined) == n - 1, what="completions combined")
    assert env.pdev.irq_count(1) == before
    assert drv.poll(1) == [] and drv.poll(2) == []  # nothing posted yet
    go.set()
    wait_until(ctrl.batches_idle, what="the poster")
    assert calls == [1, n - 1]
    # one message per round of the poster (its first completion, then the 15 others),
    # for both CQs on the vector
    assert env.pdev.irq_count(1) == before + 2
    got = drv.poll(1) + drv.poll(2)
    assert sorted(c.tag for c in got) == list(range(n))
    assert all(c.ok for c in got)
    for i in range(n):
        assert env.machine.memory.read(buf + 512 * i, 512) == data
        assert gated.data[512 * region * i:512 * (region * i + 1)] == data
    assert ctrl.cq(1).reserved == 0 and ctrl.cq(2).reserved == 0
    assert not ctrl.sq(1).inflight and not ctrl.sq(2).inflight


def test_combined_completions_under_four_threads_lose_nothing(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=0)
    drv, ctrl = env.drv, env.ctrl
    gated = GatedBackend(4 << 20)
    attach_namespace(ctrl, 2, gated)
    drv.scan_namespaces()
    drv.create_io_queue_pair(1, 64, cq_size=16, vector=0)  # a small CQ: some completions wait in the backlog
    buf = env.machine.alloc(64 * 512)
    total = 0
    for rnd in range(5):
        gated.sem = threading.Semaphore(0)  # no permits left from the last round
        gated.hold()
        for i in range(48):
            drv.submit(1, READ, nsid=2, cdw10=i, buf=buf + 512 * i, length=512, ring=False, tag=(rnd, i))
        drv.ring(1)
        wait_until(lambda: gated.waiting >= 4, what="workers blocked")
        gated.release()
        got: list = []
        while len(got) < 48:
            got += drv.reap(1, min_completions=1)
        assert sorted(c.tag for c in got) == [(rnd, i) for i in range(48)]
        assert all(c.ok for c in got)
        total += len(got)
    wait_until(ctrl.batches_idle, what="posters")
    assert drv.poll(1) == []
    assert ctrl.smart.host_read_commands >= total
    cq = ctrl.cq(1)
    assert cq.reserved == 0 and not cq.backlog and not ctrl._combined


def test_a_quiesce_waits_for_the_poster_and_finds_everything_posted(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    gated = GatedBackend(4 << 20)
    attach_namespace(ctrl, 2, gated)
    drv.scan_namespaces()
    buf = env.machine.alloc(8 * 512)
    entered, go = threading.Event(), threading.Event()
    real = ctrl._complete_batch

    def slow_post(items, tls):
        if not entered.is_set():
            entered.set()
            assert go.wait(10)
        real(items, tls)

    ctrl._complete_batch = slow_post
    gated.hold()
    for i in range(8):
        drv.submit(1, READ, nsid=2, cdw10=i, buf=buf + 512 * i, length=512, ring=False, tag=i)
    drv.ring(1)
    wait_until(lambda: gated.waiting >= 4, what="workers blocked")
    gated.release()
    assert entered.wait(10)
    # every other worker handed its completion to the poster (itself a worker, still busy)
    wait_until(lambda: ctrl.io.inflight == 1 and len(ctrl._combined) == 7, what="workers done")
    quiesced = threading.Event()
    t = threading.Thread(target=lambda: (ctrl.quiesce(), quiesced.set()))
    t.start()
    assert not quiesced.wait(0.2)  # the poster still holds completions: not consistent yet
    go.set()
    assert quiesced.wait(10)
    t.join()
    cq = ctrl.cq(1)
    assert cq.pending == 8 and not ctrl._combined and not ctrl.sq(1).inflight
    state = ctrl.get_device_state()  # saved with nothing in flight
    assert state is not None
    ctrl.resume()
    got = drv.reap(1, min_completions=8)
    assert sorted(c.tag for c in got) == list(range(8)) and all(c.ok for c in got)


def test_a_steady_stream_of_completions_neither_delays_interrupts_nor_keeps_the_poster(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    gated = GatedBackend(4 << 20)
    attach_namespace(ctrl, 2, gated)
    drv.scan_namespaces()
    n = 3 * COMBINE_ROUNDS
    buf = env.machine.alloc(n * 512)
    real, real_poster = ctrl._complete_batch, ctrl._post_combined
    local = threading.local()
    sessions: list[list[int]] = []  # per poster: the vector's messages when each round began

    def poster(tls):
        local.rounds = []
        sessions.append(local.rounds)
        try:
            real_poster(tls)
        finally:
            local.rounds = None

    def streaming_post(items, tls):
        rounds = getattr(local, "rounds", None)
        if rounds is not None:
            rounds.append(env.pdev.irq_count(1))
            if gated.waiting:  # one more completion arrives while this round is posted
                gated.release(1)
                wait_until(lambda: ctrl._combined or not ctrl._posting, what="the next completion")
        real(items, tls)

    ctrl._post_combined = poster
    ctrl._complete_batch = streaming_post
    gated.hold()
    for i in range(n):
        drv.submit(1, READ, nsid=2, cdw10=i, buf=buf + 512 * i, length=512, ring=False, tag=i)
    drv.ring(1)
    wait_until(lambda: gated.waiting >= 1, what="a worker blocked")
    gated.release(1)
    got = drv.reap(1, min_completions=n, timeout=10)
    assert sorted(c.tag for c in got) == list(range(n)) and all(c.ok for c in got)
    # the first poster posted COMBINE_ROUNDS rounds, then left the role to the next thread
    assert len(sessions[0]) == COMBINE_ROUNDS and len(sessions) > 1
    assert all(len(r) <= COMBINE_ROUNDS for r in sessions)
    # every round's interrupt was raised before the same poster's next round began
    for r in sessions:
        assert all(b > a for a, b in zip(r, r[1:], strict=False)), sessions
    wait_until(ctrl.batches_idle, what="the posters")
    assert not ctrl._combined and not ctrl.sq(1).inflight
