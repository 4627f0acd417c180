"""``pcidev bench nvme``: I/O benchmark of the NVMe controller through the software host.

An NVMe controller with one memory-backed namespace is plugged into an in-process
:class:`~pcidev.host.Machine` and driven by the host-side driver
(:class:`pcidev_nvme.testing.driver.NvmeDriver`) exactly as a guest driver would: SQEs and
PRP lists in guest RAM, SQ tail and CQ head doorbells through BAR0, completions
from the CQ, MSI-X interrupts. The namespace is written once in full first (as fio
lays out its file), then three jobs run, each on one I/O queue:

========================  =====  ===========  ===============
job                       block  queue depth  access
========================  =====  ===========  ===============
randread_4k_qd32          4 KiB  32           uniform random
randwrite_4k_qd32         4 KiB  32           uniform random
seqread_128k_qd8          128 K  8            sequential
========================  =====  ===========  ===============

For each: IOPS, MB/s (10^6 bytes) and the completion latency seen by the host
(from writing the SQE to reaping its CQE), median and 99th percentile, in
microseconds. ``--json`` prints one JSON object with, among others, the keys
``randread_4k_qd32_iops``, ``randwrite_4k_qd32_iops`` and ``seqread_128k_qd8_mbps``.

``--transport vfio-user`` runs the same jobs with the controller in a separate
``pcidev serve --vfio-user`` process on a temporary socket, driven through pcidev's
vfio-user client (:class:`~pcidev.transport.vfio_user.remote.VfioUserDevice`): guest
RAM is a memfd the server maps (``DMA_MAP``), the driver uses shadow doorbells,
doorbell writes are posted (``REGION_WRITE`` with ``NO_REPLY``) and interrupts come
through eventfds, so no command waits for a round trip. Its figures count the CPU of
both processes: the client's ``process_time`` and the server's ``utime + stime``
from ``/proc/PID/stat``. Its JSON keys start with ``vfio_user_``
(``vfio_user_randread_4k_qd32_iops``, ``..._iops_per_cpu_s``,
``..._server_cpu_us_per_io``); ``setup.transport`` names the transport;
``--transport both`` runs both in one run and adds
``vfio_user_vs_in_process_randread_4k_qd32`` (the IOPS ratio). Each run ends by
writing 64 blocks of a per-block pattern and reading them back
(``verified_blocks``, ``vfio_user_verified_blocks``).

``--ns SPEC`` (repeatable) benchmarks the namespaces it names instead, one after the other
in one run, in this process: ``mem`` or ``file`` (a memory namespace or a temporary image of
``--size`` bytes) or any spec the controller's ``ns=`` takes (``file:path=IMG``,
``nbd:uri=nbd://HOST:PORT/EXPORT,queue_depth=32``; only the first ``--size`` bytes of a larger
namespace are laid out and used). It prints, per backend and job, IOPS, IOPS per CPU-second,
p50/p99 latency and the ratios to the first backend; ``--json`` prints ``backends``, a list
of ``{"ns", "backend", "label", "jobs": {JOB: {"iops", "iops_per_cpu_s", "p50_us",
"p99_us", "errors", "vs_first_iops", "vs_first_iops_per_cpu_s", ...}}}``. ``--job NAME``
(repeatable) runs only the jobs named. See ``docs/nbd.md`` (Performance).

The host loop keeps ``qd`` commands outstanding: it reaps whatever completed,
resubmits one command per completion (each slot reuses its own buffer), and rings
the SQ tail doorbell once per batch, as Linux does with ``blk_mq`` plugging. The
controller runs in the same process and thread (the doorbell write processes the
queue), so the figures measure the device model's Python path, not a disk.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import attrs

from pcidev.cli import serve as serve_cli
from pcidev.errors import PcidevError
from pcidev.host import Machine
from pcidev.properties import parse_size
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import NvmeDriver

__all__ = ["JobResult", "TRANSPORTS", "main", "run_job", "run_benchmark", "run_vfio_user_benchmark"]

#: the values of ``--transport``
TRANSPORTS = ("in-process", "vfio-user", "both")

PAGE = 4096


@attrs.define
class JobResult:
    """Figures of one job.

    :ivar name: job name (``randread_4k_qd32``...).
    :ivar ios: commands completed.
    :ivar seconds: wall time.
    :ivar bytes: bytes transferred.
    :ivar p50_us: median completion latency, microseconds.
    :ivar p99_us: 99th percentile completion latency, microseconds.
    :ivar errors: commands that completed with a non-zero status.
    :ivar cpu_seconds: CPU time the process used meanwhile (the controller runs in
        the host's thread, so this is the whole cost; on a busy machine
        ``ios / cpu_seconds`` is the figure that does not depend on the neighbours).
    :ivar server_cpu_seconds: CPU time of the serving process meanwhile (vfio-user
        only; counted in :attr:`iops_per_cpu_second`).
    """

    name: str
    ios: int
    seconds: float
    bytes: int
    p50_us: float
    p99_us: float
    errors: int
    cpu_seconds: float = 0.0
    server_cpu_seconds: float = 0.0

    @property
    def iops(self) -> float:
        """Commands per second."""
        return self.ios / self.seconds if self.seconds else 0.0

    @property
    def iops_per_cpu_second(self) -> float:
        """Commands per second of CPU time (the client's and the server's)."""
        cpu = self.cpu_seconds + self.server_cpu_seconds
        return self.ios / cpu if cpu else 0.0

    @property
    def server_cpu_us_per_io(self) -> float:
        """CPU microseconds the serving process spent per command."""
        return self.server_cpu_seconds * 1e6 / self.ios if self.ios else 0.0

    @property
    def mbps(self) -> float:
        """Megabytes (10^6 bytes) per second."""
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0


def _percentile(sorted_values: list[int], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index] / 1000.0


def run_job(
    drv: Any,
    machine: Any,
    *,
    name: str,
    opcode: int,
    block_size: int,
    queue_depth: int,
    seconds: float,
    sequential: bool = False,
    nsid: int = 1,
    qid: int = 1,
    seed: int = 1,
    span: int | None = None,
) -> JobResult:
    """Run one job on I/O queue ``qid`` for about ``seconds``.

    :param drv: a probed :class:`~pcidev_nvme.testing.driver.NvmeDriver`.
    :param machine: its :class:`~pcidev.host.Machine` (buffers are allocated there).
    :param name: the job's name in the results.
    :param opcode: 0x02 (Read) or 0x01 (Write).
    :param block_size: bytes per command (a multiple of the namespace's block size).
    :param queue_depth: commands kept outstanding.
    :param seconds: run time.
    :param sequential: sequential LBAs instead of uniform random ones.
    :param nsid: namespace.
    :param qid: I/O queue.
    :param seed: random seed (the LBA sequence is reproducible).
    :param span: bytes at the start of the namespace the job uses (None: all of it).
    :returns: the figures.
    :raises PcidevError: the driver failed (timeout, controller fatal status).
    """
    info = drv.namespaces[nsid]
    nlb = block_size // info.lba_size
    blocks = info.nsze if span is None else min(info.nsze, span // info.lba_size)
    slots = blocks // nlb if nlb else 0
    if nlb < 1 or block_size % info.lba_size or slots < queue_depth:
        raise PcidevError(f"{name}: block size {block_size} does not suit namespace {nsid}")
    bufs = [machine.alloc(block_size, PAGE) for _ in range(queue_depth)]
    # Starting LBAs are drawn before the clock starts (fio's generator costs nothing
    # measurable; Python's would): a reproducible cycle of 64 Ki uniform picks.
    rnd = random.Random(seed)
    if sequential:
        lbas = [(i % slots) * nlb for i in range(min(slots, 1 << 16))]
    else:
        lbas = [rnd.randrange(slots) * nlb for _ in range(1 << 16)]
    nlbas = len(lbas)
    pick = 0
    submit = drv.submit_rw
    reap = drv.reap
    ring = drv.ring
    clock = time.perf_counter_ns
    started = [0] * queue_depth
    lat: list[int] = []
    record = lat.append
    errors = done = 0
    try:
        cpu0 = time.process_time()
        t0 = clock()
        deadline = t0 + int(seconds * 1e9)
        for slot in range(queue_depth):
            slba = lbas[pick]
            pick = (pick + 1) % nlbas
            started[slot] = clock()
            submit(qid, opcode, nsid=nsid, slba=slba, nlb=nlb, buf=bufs[slot], tag=slot, ring=False)
        ring(qid)
        outstanding = queue_depth
        while outstanding:
            comps = reap(qid, min_completions=1)
            now = clock()
            more = now < deadline
            for c in comps:
                slot = c.tag
                if slot is None:  # (a duplicate, or a completion of another job's command)
                    raise PcidevError(f"{name}: a completion for command {c.cid} on queue {qid}, which was not "
                                      f"outstanding (status {c.status:#x})")
                record(now - started[slot])
                done += 1
                if c.status:
                    errors += 1
                if more:
                    slba = lbas[pick]
                    pick += 1
                    if pick == nlbas:
                        pick = 0
                    started[slot] = now
                    submit(qid, opcode, nsid=nsid, slba=slba, nlb=nlb, buf=bufs[slot], tag=slot, ring=False)
                else:
                    outstanding -= 1
            if more:
                ring(qid)
        elapsed = (clock() - t0) / 1e9
        cpu = time.process_time() - cpu0
    finally:
        for b in bufs:
            machine.free(b)
    lat.sort()
    return JobResult(name, done, elapsed, done * block_size, _percentile(lat, 0.50), _percentile(lat, 0.99),
                     errors, cpu)


#: A job: (name, opcode, block size, queue depth, sequential).
Job = tuple[str, int, int, int, bool]

#: The standard jobs.
JOBS: tuple[Job, ...] = (
    ("randread_4k_qd32", 0x02, 4096, 32, False),
    ("randwrite_4k_qd32", 0x01, 4096, 32, False),
    ("seqread_128k_qd8", 0x02, 128 * 1024, 8, True),
)


def run_benchmark(
    *, seconds: float = 3.0, ns_size: int = 256 << 20, jobs: tuple[Job, ...] = JOBS, profile: str | None = None,
    ns_spec: str | None = None,
) -> tuple[list[JobResult], dict[str, Any]]:
    """Build the machine, controller and driver, lay out the namespace, run the jobs.

    :param seconds: run time of each job.
    :param ns_size: namespace size in bytes (memory backend); with ``ns_spec``, the bytes at
        the start of the namespace that are laid out and used (at most the namespace).
    :param jobs: the jobs to run (see :data:`JOBS`).
    :param profile: write a cProfile of the jobs to this file.
    :param ns_spec: the namespace, as in the controller's ``ns=`` property
        (``file:path=IMG``, ``nbd:uri=...``); None: ``mem:size=ns_size``.
    :returns: the job results and facts about the setup.
    """
    machine = Machine(ram_size=256 << 20)
    spec = ns_spec if ns_spec is not None else f"mem:size={ns_size}"
    ctrl = NvmeController(f"mdts=7,ns={spec}")
    drv = None
    try:
        drv = NvmeDriver.attach(machine, ctrl, io_queues=1, io_depth=256)
        info = drv.namespaces[1]
        used = min(ns_size, info.nsze * info.lba_size)
        setup = {
            "namespace_bytes": used,
            "lba_size": info.lba_size,
            "backend": spec.split(":", 1)[0],
            "ns": spec,
            "io_queues": 1,
            "python": sys.version.split()[0],
        }
        t = time.perf_counter()
        _layout(drv, machine, used)
        setup["layout_seconds"] = round(time.perf_counter() - t, 3)
        results = _run_jobs(drv, machine, jobs, seconds, profile, span=used)
        setup["verified_blocks"] = _verify(drv, machine, span=used)
        setup["transport"] = "in-process"
        return results, setup
    finally:
        if drv is not None:
            drv.close()
        ctrl.close()
        machine.close()


def _run_jobs(drv: Any, machine: Any, jobs: tuple[Job, ...], seconds: float, profile: str | None,
              server_cpu: Any = None, *, span: int | None = None) -> list[JobResult]:
    """Run ``jobs``; ``server_cpu()`` (if given) gives the serving process's CPU seconds."""
    results = []
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    try:
        for name, opcode, bs, qd, sequential in jobs:
            before = server_cpu() if server_cpu is not None else 0.0
            r = run_job(drv, machine, name=name, opcode=opcode, block_size=bs, queue_depth=qd,
                        seconds=seconds, sequential=sequential, span=span)
            if server_cpu is not None:
                r.server_cpu_seconds = server_cpu() - before
            results.append(r)
    finally:
        if prof is not None and profile:  # (prof exists only for a profile path)
            prof.disable()
            prof.dump_stats(profile)
    return results


#: blocks written with a per-block pattern and read back at the end of a run
VERIFY_BLOCKS = 64


def _verify(drv: Any, machine: Any, nsid: int = 1, *, span: int | None = None) -> int:
    """Write :data:`VERIFY_BLOCKS` 4 KiB blocks spread over the namespace (its first
    ``span`` bytes), each with its own pattern, read them back and compare.
    :returns: the blocks verified. :raises PcidevError: a block came back different."""
    info = drv.namespaces[nsid]
    nlb = 4096 // info.lba_size
    nsze = info.nsze if span is None else min(info.nsze, span // info.lba_size)
    stride = max(1, nsze // nlb // VERIFY_BLOCKS) * nlb
    rnd = random.Random(0x5EED)
    blocks = [(i * stride, rnd.randbytes(4096)) for i in range(min(VERIFY_BLOCKS, nsze // nlb))]
    for slba, data in blocks:
        drv.write(nsid, slba, data)
    for slba, data in blocks:
        if drv.read(nsid, slba, nlb) != data:
            raise PcidevError(f"verify: LBA {slba} read back different data")
    return len(blocks)


def _proc_cpu_seconds(pid: int) -> float:
    """CPU seconds (utime + stime) of process ``pid``, all its threads, from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serve_has_once() -> bool:
    """Whether ``pcidev serve`` has ``--once`` (exit when the client leaves)."""
    parser = argparse.ArgumentParser(add_help=False)
    if serve_cli.COMMAND.configure is not None:
        serve_cli.COMMAND.configure(parser)
    return "--once" in parser.format_help()


@contextlib.contextmanager
def _serve_nvme(props: str, *, start_timeout: float = 60.0) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``pcidev serve --vfio-user SOCK nvme,PROPS`` on a temporary socket, until the
    block ends; the process is always reaped (also on an error or Ctrl-C).

    :returns: a context manager yielding the socket path and the process.
    :raises PcidevError: the server did not start (with its output).
    """
    where = tempfile.mkdtemp(prefix="pcidev-bench-")
    path = os.path.join(where, "nvme.sock")
    argv = [sys.executable, "-m", "pcidev", "serve", "--vfio-user", path]
    if _serve_has_once():
        argv.append("--once")
    argv.append(f"nvme,{props}")
    lines: collections.deque[str] = collections.deque(maxlen=50)
    first = threading.Event()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)

    def drain() -> None:  # keeps the pipe from filling up, keeps the last lines for errors
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            first.set()
        first.set()

    reader = threading.Thread(target=drain, name="bench-serve-output", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not any("listening" in line for line in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                reader.join(1)
                raise PcidevError("pcidev serve did not start: " + " / ".join(lines))
            first.wait(0.05)
        yield path, proc
    finally:
        if proc.poll() is None:
            try:
                proc.wait(3)  # it ends when its client leaves
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        reader.join(5)
        shutil.rmtree(where, ignore_errors=True)


def run_vfio_user_benchmark(
    *, seconds: float = 3.0, ns_size: int = 256 << 20, jobs: tuple[Job, ...] = JOBS, profile: str | None = None
) -> tuple[list[JobResult], dict[str, Any]]:
    """:func:`run_benchmark` with the controller in a ``pcidev serve --vfio-user`` process.

    :param seconds: run time of each job.
    :param ns_size: namespace size in bytes (memory backend).
    :param jobs: the jobs to run.
    :param profile: write a cProfile of the jobs (the client side) to this file.
    :returns: the job results (with the server's CPU) and facts about the setup.
    :raises PcidevError: the server did not start or the driver failed.
    """
    with _serve_nvme(f"mdts=7,ns=mem:size={ns_size}") as (path, proc):
        machine = Machine(ram_size=256 << 20)
        drv = None
        remote = None
        try:
            remote = VfioUserDevice.connect(path)
            drv = NvmeDriver.attach(machine, remote, io_queues=1, io_depth=256)
            drv.doorbell_buffer_config()
            setup: dict[str, Any] = {
                "namespace_bytes": ns_size,
                "lba_size": drv.namespaces[1].lba_size,
                "backend": "mem",
                "io_queues": 1,
                "python": sys.version.split()[0],
                "transport": "vfio-user",
                "shadow_doorbells": True,
                "server_pid": proc.pid,
            }
            t = time.perf_counter()
            _layout(drv, machine, ns_size)
            setup["layout_seconds"] = round(time.perf_counter() - t, 3)
            results = _run_jobs(drv, machine, jobs, seconds, profile, lambda: _proc_cpu_seconds(proc.pid))
            setup["verified_blocks"] = _verify(drv, machine)
            return results, setup
        finally:
            try:
                if drv is not None:
                    drv.close()
            finally:
                if remote is not None:
                    remote.close()  # the server sees its client leave and ends
                machine.close()


def _layout(drv: Any, machine: Any, ns_size: int) -> int:
    """Write the whole namespace once with 128 KiB sequential writes at QD 8."""
    block = 128 * 1024
    count = ns_size // block
    nlb = block // drv.namespaces[1].lba_size
    qd = 8
    bufs = [machine.alloc(block, PAGE) for _ in range(qd)]
    try:
        for b in bufs:
            machine.memory.fill(b, block, 0x5A)
        nxt = 0
        outstanding = 0
        while nxt < count or outstanding:
            while outstanding < qd and nxt < count:
                drv.submit_rw(1, 0x01, nsid=1, slba=nxt * nlb, nlb=nlb, buf=bufs[nxt % qd], tag=nxt % qd,
                              ring=False)
                nxt += 1
                outstanding += 1
            drv.ring(1)
            for c in drv.reap(1, min_completions=1):
                if c.status:
                    raise PcidevError(f"layout write failed with status {c.status:#x}")
                outstanding -= 1
    finally:
        for b in bufs:
            machine.free(b)
    return count


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pcidev bench nvme",
        description="I/O benchmark of the NVMe controller through the software host (memory namespace, "
                    "or the backends --ns names, side by side).",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seconds", type=float, default=3.0, help="run time of each job (default 3)")
    p.add_argument("--size", default="256M",
                   help="namespace size (default 256M); with --ns, the bytes of each namespace used")
    p.add_argument("--profile", metavar="FILE",
                   help="write a cProfile of the jobs to FILE (with --ns: FILE.0, FILE.1, ...)")
    p.add_argument("--transport", choices=TRANSPORTS, default="in-process",
                   help="in-process (default): the controller in this process; vfio-user: in a "
                        "'pcidev serve --vfio-user' process driven through pcidev's client; both: one, then the other")
    p.add_argument("--ns", action="append", metavar="SPEC", default=[],
                   help="benchmark this namespace (repeatable: one after the other in one run, compared with "
                        "the first): a backend spec as in ns= (mem, file:path=IMG, nbd:uri=URI,queue_depth=32); "
                        "plain 'mem' or 'file' is one of --size (the file a temporary one)")
    p.add_argument("--job", action="append", metavar="NAME", default=[], choices=[j[0] for j in JOBS],
                   help="run only this job (repeatable; default: all)")
    return p


def _keys(results: list[JobResult], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in results:
        out[f"{prefix}{r.name}_iops"] = round(r.iops)
        out[f"{prefix}{r.name}_mbps"] = round(r.mbps, 1)
        out[f"{prefix}{r.name}_p50_us"] = round(r.p50_us, 1)
        out[f"{prefix}{r.name}_p99_us"] = round(r.p99_us, 1)
        out[f"{prefix}{r.name}_errors"] = r.errors
        out[f"{prefix}{r.name}_iops_per_cpu_s"] = round(r.iops_per_cpu_second)
        if prefix.startswith("vfio_user"):
            out[f"{prefix}{r.name}_server_cpu_us_per_io"] = round(r.server_cpu_us_per_io, 2)
            out[f"{prefix}{r.name}_client_cpu_us_per_io"] = round(r.cpu_seconds * 1e6 / r.ios, 2) if r.ios else 0.0
    return out


def _table(title: str, results: list[JobResult], seconds: float, *, server: bool) -> None:
    print(title)
    extra = f" {'srv us/IO':>9s}" if server else ""
    print(f"{'job':20s} {'IOPS':>9s} {'MB/s':>8s} {'p50 us':>8s} {'p99 us':>8s} {'errors':>6s} "
          f"{'CPU %':>6s} {'IOPS/CPU-s':>10s}{extra}")
    for r in results:
        cpu = r.cpu_seconds + r.server_cpu_seconds
        extra = f" {r.server_cpu_us_per_io:9.1f}" if server else ""
        print(f"{r.name:20s} {r.iops:9.0f} {r.mbps:8.1f} {r.p50_us:8.1f} {r.p99_us:8.1f} {r.errors:6d} "
              f"{100 * cpu / r.seconds:6.0f} {r.iops_per_cpu_second:10.0f}{extra}")


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def _expand(spec: str, size: int, where: str, index: int) -> str:
    """A ``--ns`` spec as the controller's ``ns=`` takes it: plain ``mem`` gets ``size=``,
    plain ``file`` a temporary image in ``where`` of ``size`` bytes."""
    if spec == "mem":
        return f"mem:size={size}"
    if spec == "file":
        return f"file:path={os.path.join(where, f'bench{index}.img')},size={size}"
    if ":" not in spec or any(c in spec for c in "\n\r"):
        raise PcidevError(f"--ns {spec!r}: expected mem, file or KIND:OPTIONS (file:path=IMG, nbd:uri=URI)")
    return spec


def _compare(specs: list[str], runs: list[list[JobResult]], seconds: float, as_json: bool,
             setups: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-backend figures of a ``--ns`` run, each job's ratio to the first backend's;
    printed as a table unless ``as_json`` (then returned as the JSON's ``backends``)."""
    first = {r.name: r for r in runs[0]}
    backends = []
    for i, (spec, results, setup) in enumerate(zip(specs, runs, setups, strict=True)):
        entry: dict[str, Any] = {"ns": spec, "backend": setup["backend"], "label": f"{i + 1}:{setup['backend']}",
                                 "jobs": {}}
        for r in results:
            base = first.get(r.name)
            figures = {k.removeprefix(f"{r.name}_"): v for k, v in _keys([r], "").items()}
            figures["vs_first_iops"] = _ratio(r.iops, base.iops) if base else 0.0
            figures["vs_first_iops_per_cpu_s"] = (_ratio(r.iops_per_cpu_second, base.iops_per_cpu_second)
                                                  if base else 0.0)
            entry["jobs"][r.name] = figures
        entry["verified_blocks"] = setup["verified_blocks"]
        entry["layout_seconds"] = setup["layout_seconds"]
        backends.append(entry)
    if not as_json:
        print(f"NVMe through the software host, one I/O queue, {seconds:g} s per job, backends one after the "
              f"other (CPU: this process, not an NBD server's)")
        print(f"{'backend':10s} {'job':20s} {'IOPS':>9s} {'IOPS/CPU-s':>10s} {'p50 us':>8s} {'p99 us':>8s} "
              f"{'errors':>6s} {'vs 1st':>7s} {'/CPU-s':>7s}")
        for entry in backends:
            for name, f in entry["jobs"].items():
                print(f"{entry['label']:10s} {name:20s} {f['iops']:9d} {f['iops_per_cpu_s']:10d} "
                      f"{f['p50_us']:8.1f} {f['p99_us']:8.1f} {f['errors']:6d} {f['vs_first_iops']:7.3f} "
                      f"{f['vs_first_iops_per_cpu_s']:7.3f}")
        for entry in backends:
            print(f"  {entry['label']}: {entry['ns']}")
    return {"backends": backends}


def _main_ns(args: argparse.Namespace, ns_size: int, jobs: tuple[Job, ...]) -> int:
    """``--ns``: each namespace in turn, in this process, compared with the first."""
    if args.transport != "in-process":
        raise PcidevError("--ns runs in-process only (not with --transport)")
    where = tempfile.mkdtemp(prefix="pcidev-bench-")
    try:
        specs = [_expand(spec, ns_size, where, i) for i, spec in enumerate(args.ns)]
        runs: list[list[JobResult]] = []
        setups: list[dict[str, Any]] = []
        for i, spec in enumerate(specs):
            results, setup = run_benchmark(seconds=args.seconds, ns_size=ns_size, jobs=jobs, ns_spec=spec,
                                           profile=f"{args.profile}.{i}" if args.profile else None)
            runs.append(results)
            setups.append(setup)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    out = _compare(specs, runs, args.seconds, args.json, setups)
    if args.json:
        out["setup"] = {"transport": "in-process", "io_queues": 1, "python": sys.version.split()[0],
                        "seconds": args.seconds, "bytes_used": ns_size}
        print(json.dumps(out))
    return 1 if any(r.errors for results in runs for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pcidev bench nvme``.

    :param argv: the arguments after ``nvme``.
    :returns: the exit status.
    """
    args = _parser().parse_args(argv)
    if args.seconds <= 0:
        raise PcidevError("--seconds must be positive")
    ns_size = parse_size(args.size, "--size")
    jobs = tuple(j for j in JOBS if j[0] in args.job) if args.job else JOBS
    if args.ns:
        return _main_ns(args, ns_size, jobs)
    local: list[JobResult] = []
    remote: list[JobResult] = []
    setup: dict[str, Any] = {}
    if args.transport in ("in-process", "both"):
        local, setup = run_benchmark(seconds=args.seconds, ns_size=ns_size, profile=args.profile, jobs=jobs)
    if args.transport in ("vfio-user", "both"):
        remote, vsetup = run_vfio_user_benchmark(seconds=args.seconds, ns_size=ns_size, jobs=jobs,
                                                 profile=None if local else args.profile)
        if setup:
            setup["vfio_user_verified_blocks"] = vsetup["verified_blocks"]
            setup["vfio_user_layout_seconds"] = vsetup["layout_seconds"]
        else:
            setup = vsetup
    setup["transport"] = args.transport
    if args.json:
        out = _keys(local, "")
        if remote:
            out.update(_keys(remote, "vfio_user_"))
        ratio_job = "randread_4k_qd32"
        lr = next((r for r in local if r.name == ratio_job), None)
        rr = next((r for r in remote if r.name == ratio_job), None)
        if lr is not None and rr is not None and lr.iops and lr.iops_per_cpu_second:
            out[f"vfio_user_vs_in_process_{ratio_job}"] = round(rr.iops / lr.iops, 3)
            out[f"vfio_user_vs_in_process_{ratio_job}_per_cpu_s"] = round(
                rr.iops_per_cpu_second / lr.iops_per_cpu_second, 3)
        out["setup"] = setup
        print(json.dumps(out))
    else:
        if local:
            _table(f"NVMe through the software host, memory namespace of {ns_size >> 20} MiB, "
                   f"{setup['lba_size']} B blocks, one I/O queue, {args.seconds:g} s per job", local, args.seconds,
                   server=False)
        if remote:
            _table(f"NVMe served over vfio-user by 'pcidev serve' (CPU: client + server), shadow doorbells, "
                   f"{args.seconds:g} s per job", remote, args.seconds, server=True)
    return 1 if any(r.errors for r in local + remote) else 0
