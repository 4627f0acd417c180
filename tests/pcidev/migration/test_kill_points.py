"""A destination killed at every step of the migration protocol leaves the source running
with nothing lost; the source's state is untouched until the ACK (killpoints.py builds the
dying destinations and derives the points from the channel's frames).

The source is an edu with its DMA engine running, served over the device link in this
process (so its state can be saved at each stop and at each resume), driven by the software
host with a verified copy workload (CRC-32C of every block, every descriptor completed
exactly once). Each case: the workload runs, a migration to a destination that dies at the
point (SIGKILLed process, abrupt close/RST, or a hang), then -- when the source kept the
device -- a migration to a healthy destination, and the workload verified to the end.
"""

from __future__ import annotations

import os
import struct
import threading
import time

import crc32c
import pytest
from killpoints import (
    BEFORE_STOP,
    DEATHS,
    PROTOCOL,
    DyingDestination,
    Point,
    RamEdu,
    ServedDestination,
    Zygote,
    defined,
    points,
    unlisted_frames,
)

from pcidev.devices.edu import DESC, STATUS_DONE, EduDevice
from pcidev.dma import alloc_memfd
from pcidev.errors import ConnectionLostError, MigrationError, PcidevError, TransportError
from pcidev.host import Machine
from pcidev.migration import channel, save_device_stream
from pcidev.transport.address import connect, listen
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.link.server import LinkServer

EDU_PROPS = "engine=on,chunk=1024,delay=0.0002"
#: the migration to a dying destination: each step's timeout (with commit: from the stop to
#: the ACK), long where the death ends the wait at once, short where a hang waits it out
TIMEOUTS = {"kill": 5.0, "reset": 5.0, "hang": 0.6}
#: a destination that hangs once it loaded the state needs the time to load it first
LOADED_HANG_TIMEOUT = 1.5
#: more descriptors than one frame carries (OFFER takes 253, an FDS frame the rest)
EXTRA_REGIONS = 300
RING = 512
BLOCK = 4096
BATCH = 16
CONSUMED = 0xC0DE  # the status the host writes into a descriptor it has verified


#: the channel streams memory (pre-copy): a RAM BAR moves over TCP, and its frames are kill points
PRECOPY = all(defined(step) for step in PROTOCOL if step.needs == "precopy")


class WatchedEdu(EduDevice):
    """An edu that saves its state at every stop and at every resume after it:
    ``pauses`` holds ``[stopped_at, stream, resumed_at, stream]`` (None until resumed)."""

    def __init__(self, *args, **kwargs):
        self.pauses: list[list] = []
        self.watching = False
        super().__init__(*args, **kwargs)

    def on_quiesce(self):
        super().on_quiesce()
        if self.watching:
            self.pauses.append([time.monotonic(), save_device_stream(self)[0], None, None])

    def on_resume(self):
        if self.pauses and self.pauses[-1][2] is None:
            self.pauses[-1][2:] = [time.monotonic(), save_device_stream(self)[0]]
        super().on_resume()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fds_back_to(count: int, timeout: float = 5.0) -> bool:
    """Whether the open descriptors come back to ``count`` within ``timeout``: the link
    server closes the pre-copy's connection when its loop sees the host's end of it, which
    on a busy machine may be a moment after the host's migrate() returned."""
    end = time.monotonic() + timeout
    while _open_fds() != count:
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


class WatchedRamEdu(RamEdu, WatchedEdu):
    """A RamEdu that saves its state at every stop and resume."""


class EduSource:
    """The source: a WatchedEdu served over the device link in a thread, plugged into ``machine``."""

    def __init__(self, tmp_path, machine: Machine, *, extra_regions: int = 0, ram: bool = False) -> None:
        self.device = WatchedRamEdu(EDU_PROPS) if ram else WatchedEdu(EDU_PROPS)
        self.endpoint = DeviceEndpoint(self.device)
        for i in range(extra_regions):  # small regions beyond RAM: one descriptor each
            fd = alloc_memfd(4096, f"extra{i}")  # (sealed against shrinking, as guest memory must be)
            self.endpoint.dma_map((1 << 32) + i * 0x10000, 4096, fd, name=f"extra{i}")
            os.close(fd)
        self.endpoint.start()
        listener = listen(f"unix:{tmp_path}/source.sock")
        self.listener = listener
        self.server = LinkServer(self.endpoint, listener.sock)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.pdev = machine.plug_remote(str(listener.address), timeout=10)
        self.pdev.enable_device()
        self.pdev.set_master()
        assert self.pdev.alloc_irq_vectors(1, 2) == 2

    def close(self) -> None:
        self.server.stop()
        self.thread.join(10)
        self.listener.close()
        self.endpoint.close()


class EduWork(threading.Thread):
    """The host's workload: batches of 16 copy descriptors, each block checked by CRC-32C,
    each descriptor marked consumed once verified (a second completion would overwrite it)."""

    def __init__(self, machine: Machine, pdev) -> None:
        super().__init__(daemon=True)
        self.machine, self.pdev = machine, pdev
        self.ring = machine.alloc(RING * 32)
        pdev.iowrite64(0, 0x100, self.ring)
        pdev.iowrite32(0, 0x108, RING)
        pdev.iowrite32(0, 0x114, 1)
        self.src, self.dst = machine.alloc(RING * BLOCK), machine.alloc(RING * BLOCK)
        self.payload = os.urandom(RING * BLOCK)
        machine.write(self.src, self.payload)
        self.batches = threading.Semaphore(0)
        self.halt = threading.Event()
        self.abandon = threading.Event()  # the device is gone: stop waiting for it
        self.posted = self.verified = self.mismatches = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        m = self.machine
        try:
            while not self.halt.is_set() and self.posted + BATCH < RING:
                first = self.posted
                for i in range(first, first + BATCH):
                    m.memory.write_struct(DESC, self.ring + 32 * i, self.src + i * BLOCK, self.dst + i * BLOCK,
                                          BLOCK, int(i == first + BATCH - 1), 0, 0)
                before = self.pdev.irq_count(0)
                self.posted += BATCH
                self.pdev.iowrite32(0, 0x10C, self.posted)
                deadline = time.monotonic() + 20
                while not self.pdev.recorder.wait(0, above=before, timeout=0.05):
                    if self.abandon.is_set():
                        return
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"descriptors {first}..{self.posted - 1}: no interrupt")
                for i in range(first, self.posted):
                    want = crc32c.crc32c(self.payload[i * BLOCK:(i + 1) * BLOCK])
                    st, crc = struct.unpack("<II", m.read(self.ring + 32 * i + 0x18, 8))
                    got = crc32c.crc32c(m.read(self.dst + i * BLOCK, BLOCK))
                    self.mismatches += (st, crc, got) != (STATUS_DONE, want, want)
                    m.write(self.ring + 32 * i + 0x18, struct.pack("<I", CONSUMED))
                    self.verified += 1
                self.batches.release()
        except BaseException as exc:
            self.error = exc
            self.batches.release()

    def wait_batches(self, n: int) -> None:
        for _ in range(n):
            assert self.batches.acquire(timeout=30), "the workload made no progress"
            assert self.error is None, self.error

    def finish(self, device: EduDevice) -> None:
        """Stop; every descriptor posted was completed once (the counter of ``device``, which
        runs it now) and verified, none twice (its consumed mark is intact)."""
        self.halt.set()
        self.join(30)
        completed = device.completed
        assert self.error is None, self.error
        assert self.mismatches == 0 and self.verified == self.posted
        assert completed == self.posted, f"{completed} completions for {self.posted} descriptors"
        statuses = [struct.unpack("<I", self.machine.read(self.ring + 32 * i + 0x18, 4))[0]
                    for i in range(self.posted)]
        assert statuses == [CONSUMED] * self.posted, "a descriptor completed twice"


def expected(point: Point, commit: bool, death: str, deferred: bool = False) -> str:
    """What becomes of the device when the destination dies at ``point``.

    A deferred migration (TCP over the device link) hands the device over only when the host
    resumed it at the destination, after the channel's last frame: the source, which awaits
    the host's commit, takes it back wherever on the channel the destination dies.


    * ``"kept"``: it dies before its RUNNING went out (it runs the device only after
      sending it), the source runs the device again;
    * ``"moved"``: the destination owns it (it may die with it: a crash of the process that
      runs the device); the source never runs it again. Without ``commit`` also a
      destination that hangs after COMMIT: it may run the device later, and nobody kills it;
    * ``"lost"``: with ``commit``, half a RUNNING: the destination may have run it, so the
      source never resumes, and the destination is killed (ConnectionLostError).
    """
    if deferred and not commit:
        return "kept"
    order = [s.name for s in PROTOCOL]
    until = order.index("RUNNING")  # the frame that hands the device over
    at = order.index(point.step.name)
    if not commit and death == "hang" and at >= order.index("COMMIT"):
        return "moved"
    if at != until:
        return "kept" if at < until else "moved"
    if point.phase == "mid":
        return "lost" if commit else "moved"
    return "kept" if point.phase == "before" else "moved"


def _cases():
    configs = [("unix", False), ("tcp", False)]
    if PRECOPY:  # an edu with a RAM BAR over TCP: its contents stream before the state
        configs.append(("tcp", True))
    out = []
    for transport, ram in configs:
        for commit in (False, True):
            for point in points(fds=transport == "unix", commit=commit, deferred=transport == "tcp", precopy=ram):
                for death in DEATHS:
                    mode = "commit" if commit else "link"
                    out.append(pytest.param(transport, ram, commit, point, death,
                                            id=f"{transport}{'-ram' if ram else ''}-{mode}-{point.name}-{death}"))
    return out


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _edu(ram: bool) -> EduDevice:
    return RamEdu(EDU_PROPS) if ram else EduDevice(EDU_PROPS)


class _Dying:
    """One dying destination, a thread (reset, hang) or a process forked by the zygote (kill)."""

    def __init__(self, request, address: str, point: Point, death: str, commit: bool, ram: bool) -> None:
        self.death = death
        if death == "kill":
            self.zygote: Zygote = request.getfixturevalue("zygote")
            self.address = self.zygote.start(device="ram-edu" if ram else "edu", props=EDU_PROPS, address=address,
                                             point=point, commit=commit)
            self.thread = None
        else:
            self.thread = DyingDestination(address, lambda: _edu(ram), point, death, commit=commit, timeout=10)
            self.address = self.thread.address
        self.outcome: dict | None = None

    def end(self, stall: bool = False) -> dict:
        """End it (at once for the source's ``stall``; else it may take a while to end by
        itself) and report ``{reached, ran, trace}``."""
        if self.outcome is None:
            if self.thread is not None:
                self.thread.end()
                self.outcome = {"reached": self.thread.reached, "ran": self.thread.ran, "trace": self.thread.trace,
                                "error": self.thread.error}
            else:
                got = self.zygote.result(timeout=0.0 if stall else 10.0)
                self.outcome = {"reached": got.get("reached") is not None, "ran": bool(got.get("ran")),
                                "trace": got.get("trace"), "error": got.get("error"), "status": got["status"]}
        return self.outcome


@pytest.mark.parametrize(("transport", "ram", "commit", "point", "death"), _cases())
def test_a_destination_dying_at_each_step(request, tmp_path, transport, ram, commit, point, death):
    unix = transport == "unix"
    if death == "kill":
        request.getfixturevalue("zygote")  # started before the descriptors are counted
    dest_address = f"unix:{tmp_path}/dest.sock" if unix else "tcp:127.0.0.1:0"
    with Machine(ram_size=16 << 20) as machine:
        src = EduSource(tmp_path, machine, extra_regions=EXTRA_REGIONS if unix else 0, ram=ram)
        try:
            dev = src.device
            if ram:
                dev.ram.mem[:] = os.urandom(RamEdu.RAM_SIZE)
                ram_crc = crc32c.crc32c(dev.ram.mem)
            work = EduWork(machine, src.pdev)
            work.start()
            work.wait_batches(2)
            fds_before = _open_fds()
            dev.watching = True  # (the stops of DMA_MAP before change the state on purpose)
            dying = _Dying(request, dest_address, point, death, commit, ram)
            order = [s.name for s in PROTOCOL]
            loaded = order.index(point.step.name) >= order.index("ACK")
            timeout = LOADED_HANG_TIMEOUT if death == "hang" and loaded else TIMEOUTS[death]
            error = _attempt(src, dying, commit, timeout)
            outcome = dying.end()
            assert outcome["reached"], f"the destination never reached {point.name}: {outcome}"
            assert outcome.get("status", -9) == -9
            # one stop for the attempt (none if it failed in the pre-flight or the pre-copy, before the stop)
            assert len(dev.pauses) == 1 or (point.step.needs in BEFORE_STOP and not dev.pauses), dev.pauses
            stopped_at, at_stop, resumed_at, at_resume = dev.pauses[-1] if dev.pauses else [0.0, b"", 0.0, b""]
            fate = expected(point, commit, death, deferred=not unix)
            if fate == "kept":
                # stopped: "runs again"; refused in the pre-flight or while the pre-copy ran, before any
                # stop: "keeps running" (on the source; "here" when the link's pre-copy timeout ended it)
                said = "runs again on the source" if dev.pauses else "keeps running"
                assert isinstance(error, MigrationError) and said in str(error), error
                assert not dev.quiesced and not dev.migrated_out and dev.owns_state
                assert src.endpoint.state == "running"
                assert not outcome["ran"], "the destination ran a device the source kept"
                # the source's state is untouched until the ACK: the same at its resume as at its stop
                assert at_resume == at_stop
                assert not ram or crc32c.crc32c(dev.ram.mem) == ram_crc
                bound = 2 * timeout + 2.0
                assert resumed_at - stopped_at < bound, f"stopped {resumed_at - stopped_at:.2f} s"
                assert _fds_back_to(fds_before), f"descriptors leaked: {_open_fds()} open, {fds_before} before"
                assert src.pdev.device.info["pid"] == os.getpid()
                work.wait_batches(2)  # the workload goes on, on the source
                served = ServedDestination("tcp:127.0.0.1:0" if not unix else f"unix:{tmp_path}/healthy-in.sock",
                                           f"unix:{tmp_path}/healthy.sock", lambda: _edu(ram))
                try:
                    report = src.pdev.device.migrate(served.incoming, timeout=20)
                    assert report["deferred"] == (not unix)
                    work.wait_batches(2)  # and on the healthy destination
                    work.finish(served.endpoint.device)
                    assert dev.pauses[-1][2] is None and dev.migrated_out  # never resumed after the ACK
                    assert not ram or crc32c.crc32c(served.endpoint.device.ram.mem) == ram_crc
                finally:
                    served.close()
            else:
                # after the ACK (with commit: after RUNNING) the destination owns the device: the
                # source never resumes it, whatever becomes of the destination; half a RUNNING
                # (commit) may have been a destination that ran it: neither side runs it then
                assert resumed_at is None and dev.quiesced and dev.migrated_out and not dev.owns_state
                assert src.endpoint.state == "migrated"
                with pytest.raises(MigrationError, match="has migrated"):  # no access reaches it any more
                    src.endpoint.bar_read(0, 0x110, 4)
                if fate == "lost":
                    assert isinstance(error, ConnectionLostError), error
                    assert not outcome["ran"]
                elif commit:
                    assert error is None, error
                else:  # the host followed the device to a destination that died: it is lost
                    assert isinstance(error, TransportError) and "cannot connect" in str(error), error
                    # it died before it ran the device: at the latest just after its RUNNING
                    assert not outcome["ran"], outcome
                work.abandon.set()
                work.join(30)
                assert work.mismatches == 0
        finally:
            work.halt.set()
            src.close()
    assert sorted(p.name for p in tmp_path.glob("*.sock")) == []  # no socket file left behind


def _attempt(src: EduSource, dying: _Dying, commit: bool, timeout: float) -> BaseException | None:
    """Migrate to the dying destination as the host would; returns what it raised."""
    try:
        if not commit:
            src.pdev.device.migrate(dying.address, timeout=timeout)
            return None
        remote = src.pdev.device
        with remote._access:  # the host's accesses wait, as during RemoteDevice.migrate
            sock = connect(dying.address, timeout=5)
            try:
                src.endpoint.hand_over(sock, timeout=timeout, running_timeout=timeout,
                                       stall=lambda: dying.end(stall=True))
            finally:
                sock.close()
        return None
    except PcidevError as exc:
        return exc


# -------------------------------------------------------------- the points follow the protocol
def test_every_frame_of_the_channel_is_a_step_or_named_as_none():
    """A frame type added to the channel must be placed in killpoints.PROTOCOL (one line),
    or named there as not part of an exchange: it then gets its kill points."""
    assert unlisted_frames() == []


def test_the_points_are_derived_from_the_frames():
    names = [p.name for p in points(fds=True, commit=True)]
    assert names == ["before-CHECK", "before-VERDICT", "mid-VERDICT", "before-OFFER", "before-FDS", "before-STATE",
                     "mid-STATE", "before-ACK", "mid-ACK", "before-COMMIT", "before-RUNNING", "mid-RUNNING",
                     "after-RUNNING"]
    assert [p.name for p in points(deferred=True, preflight=False)] == [
        "before-OFFER", "before-STATE", "mid-STATE", "before-ACK", "mid-ACK", "before-COMMIT", "before-RUNNING",
        "mid-RUNNING", "after-RUNNING"]
    assert [p.name for p in points(deferred=True, precopy=True)][:8] == [
        "before-CHECK", "before-VERDICT", "mid-VERDICT", "before-MEMORY", "before-CHUNK", "mid-CHUNK",
        "before-SYNC", "before-SYNCED"]
    precopy = [p.name for p in points(precopy=True)]
    for step in PROTOCOL:
        if step.needs == "precopy":  # pre-copy frames give points exactly when the channel has them
            assert (f"before-{step.name}" in precopy) == defined(step) == hasattr(channel, step.name)
