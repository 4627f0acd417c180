"""Boot the VM tier's guest under QEMU (TCG) with pcidev devices served over vfio-user.

Used by tests/vm and runnable by hand::

    python tests/vm/vm_guest.py 'nvme list; nvme id-ctrl /dev/nvme0 | head' --device nvme,ns=mem:size=64M

The chroot built by ``setup_vm.sh`` holds QEMU; ``$ROOT/vm`` holds the kernel, the
initramfs, the sockets and logs. Every process started here is killed by PID.

While the guest runs, the console is read line by line: a line that is exactly one of the
``markers`` names (the guest script prints it, e.g. ``echo FIO-START``) is timestamped, the
CPU time of every serving process is sampled (:class:`Mark`) and the marker's callback is
called. A ``during`` callable runs in a host thread with a :class:`Host`: the served sockets,
the PID serving each one (after a handover another process serves the socket, and ``during``
reports it with :meth:`Host.set_pid`), the marks seen so far and an event set when QEMU ends.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = Path(os.environ.get("PCIDEV_VM_ROOT", "/var/cache/pcidev-vm"))
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def setup(root: Path = ROOT) -> float:
    """Run setup_vm.sh (builds or reuses); returns its wall time. Raises on failure."""
    t0 = time.monotonic()
    proc = subprocess.run(["sh", str(HERE / "setup_vm.sh"), str(root)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"setup_vm.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.monotonic() - t0


def record(name: str, data: dict[str, Any], root: Path = ROOT) -> None:
    """Store one measurement under ``name`` in the tier's ``$ROOT/vm/results.json``."""
    path = root / "vm" / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = {}
    results[name] = data
    path.write_text(json.dumps(results, indent=1, sort_keys=True))


@contextlib.contextmanager
def mounted(root: Path = ROOT) -> Iterator[None]:
    """Bind /dev and /proc into the chroot for the duration (unmounted after)."""
    done = []
    try:
        for m in ("dev", "proc"):
            target = root / m
            if subprocess.run(["mountpoint", "-q", str(target)]).returncode != 0:
                subprocess.run(["mount", "--bind", f"/{m}", str(target)], check=True)
                done.append(target)
        yield
    finally:
        for target in reversed(done):
            if subprocess.run(["umount", str(target)]).returncode != 0:
                subprocess.run(["umount", "-l", str(target)])


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Make this process the child subreaper for the duration.

    A server spawned by another server (a handover) outlives its parent; it is then
    reparented here instead of to PID 1, so it can be killed and reaped by PID.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    old = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(old), 0, 0, 0)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, old.value, 0, 0, 0)


def process_cpu(pid: int) -> float | None:
    """CPU time (utime + stime) of process ``pid`` (all its threads), in seconds; None if it is gone.

    A zombie still reports its total, so a server that just exited can be read until reaped.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # fields from 3 (state) on
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime (14), stime (15)


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] not in "ZX"


def _kill(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
    except ProcessLookupError:
        pass


def _kill_pids(pids: Sequence[int], timeout: float = 5.0) -> None:
    """SIGTERM (then SIGKILL) processes that are no Popen, all at once, and reap our children."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in pids if _alive(p)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for pid in left:
                _reap(pid)
            left = [p for p in left if _alive(p)]
            time.sleep(0.02)
    for pid in pids:
        _reap(pid)


def _adopted_servers(sockets: Sequence[Path]) -> list[int]:
    """Children of this process (a subreaper) whose command line names one of ``sockets``."""
    me, found = os.getpid(), []
    names = [str(s).encode() for s in sockets]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == me and any(n in cmdline for n in names):
            found.append(int(entry.name))
    return found


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@dataclass
class Mark:
    """A marker line seen on the guest console."""

    name: str
    t: float  # time.monotonic() on the host when the line arrived
    cpu: list[float | None]  # CPU seconds of each device's server(s) so far (following handovers)


class ServedDevice:
    """One device socket and the process serving it; its CPU time follows PID changes.

    :param socket: host path of the vfio-user socket.
    :param pid: PID of the process serving it now.
    """

    def __init__(self, socket: Path, pid: int) -> None:
        self.socket = socket
        self._lock = threading.Lock()
        self._pid = pid
        self._retired_cpu = 0.0
        self.pids = [pid]

    @property
    def pid(self) -> int:
        return self._pid

    def set_pid(self, pid: int) -> None:
        """Another process serves the socket now: bank the old one's final CPU time."""
        with self._lock:
            if pid == self._pid:
                return
            self._retired_cpu += process_cpu(self._pid) or 0.0
            self._pid = pid
            self.pids.append(pid)

    def cpu(self) -> float | None:
        """CPU seconds spent serving this socket: retired servers plus the current one."""
        with self._lock:
            now = process_cpu(self._pid)
            return None if now is None else self._retired_cpu + now


class Host:
    """What a ``during`` callable gets: the served devices, the marks, and QEMU's end."""

    def __init__(self, devices: list[ServedDevice]) -> None:
        self.devices = devices
        self.done = threading.Event()
        self.marks: list[Mark] = []
        self._cond = threading.Condition()

    @property
    def sockets(self) -> list[Path]:
        return [d.socket for d in self.devices]

    def pid(self, index: int = 0) -> int:
        """PID serving device ``index`` now."""
        return self.devices[index].pid

    def set_pid(self, index: int, pid: int) -> None:
        """Report that ``pid`` serves device ``index`` now (after a handover)."""
        self.devices[index].set_pid(pid)

    def cpu(self) -> list[float | None]:
        return [d.cpu() for d in self.devices]

    def add_mark(self, name: str) -> Mark:
        mark = Mark(name, time.monotonic(), self.cpu())
        with self._cond:
            self.marks.append(mark)
            self._cond.notify_all()
        return mark

    def wait_mark(self, name: str, timeout: float) -> Mark | None:
        """The first mark called ``name``, waiting up to ``timeout`` s; None if QEMU ended first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.marks:
                    if m.name == name:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.done.is_set():
                    return None
                self._cond.wait(min(left, 0.2))

    def seen(self, name: str) -> bool:
        with self._cond:
            return any(m.name == name for m in self.marks)


@dataclass
class GuestRun:
    """Outcome of one boot."""

    console: str
    rc: int | None
    output: str
    qemu_rc: int | None
    servers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    marks: list[Mark] = field(default_factory=list)
    pids: list[list[int]] = field(default_factory=list)  # every PID that served each device, in order
    during_result: Any = None
    during_error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def mark(self, name: str) -> Mark:
        """The first mark called ``name`` (KeyError if the guest never printed it)."""
        for m in self.marks:
            if m.name == name:
                return m
        raise KeyError(name)

    def cpu_between(self, start: str, end: str, index: int = 0) -> float:
        """Server CPU seconds of device ``index`` between two marks."""
        a, b = self.mark(start).cpu[index], self.mark(end).cpu[index]
        if a is None or b is None:
            raise ValueError(f"server CPU not sampled at {start}/{end}")
        return b - a


Markers = Mapping[str, Callable[[Mark], None] | None]


class Console:
    """The guest console as it arrives: every line kept, marker lines turned into marks.

    :param host: where marks are recorded (with the servers' CPU time at that moment).
    :param markers: line → callback (or None); a line matches when it is exactly the name
        once stripped, so a ``sh -x`` trace (``+ echo FIO-START``) does not.
    """

    def __init__(self, host: Host, markers: Markers | None = None) -> None:
        self.host = host
        self.markers = dict(markers or {})
        self.chunks: list[bytes] = []
        self.error: BaseException | None = None  # the first exception a callback raised

    def feed(self, raw: bytes) -> None:
        """Take one line (with its line end) from QEMU's stdout."""
        self.chunks.append(raw)
        name = raw.decode("utf-8", "replace").strip()
        if name not in self.markers:
            return
        mark = self.host.add_mark(name)
        fn = self.markers[name]
        if fn is not None:
            try:
                fn(mark)
            except BaseException as exc:  # reported with the run, never lost
                if self.error is None:
                    self.error = exc

    def read(self, stream: Any) -> None:
        """Feed every line of ``stream`` until EOF (the reader thread's body)."""
        for raw in iter(stream.readline, b""):
            self.feed(raw)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace").replace("\r", "")


#: run_guest(kernel=...) -> (kernel, initramfs) inside the chroot (setup_vm.sh makes both)
KERNELS = {"default": ("/vm/vmlinuz", "/vm/initrd.gz"), "p2p": ("/vm/p2p/vmlinuz", "/vm/p2p/initrd.gz")}


def run_guest(script: str, devices: Sequence[str] = (), *, builtin_nvme: str | None = None,
              timeout: float = 240.0, mem_mb: int = 1024, root: Path = ROOT, tag: str = "t",
              msg_timeout_ms: int = 30000, kernel_args: str = "", nvme_args: str = "",
              markers: Markers | None = None, during: Callable[[Host], Any] | None = None,
              during_join: float = 90.0, kernel: str = "default") -> GuestRun:
    """Boot the guest, run ``script`` (busybox sh) in it, return the console and status.

    :param devices: pcidev device specs, each served by its own ``pcidev serve --vfio-user``.
    :param builtin_nvme: instead, QEMU's own nvme with a raw image of this size (e.g. "128M").
    :param kernel_args: extra guest kernel arguments (e.g. ``pci=nomsi`` for INTx).
    :param nvme_args: parameters for ``insmod nvme.ko``, comma-separated (e.g.
        ``io_queue_depth=2,poll_queues=1``); kernel command line module parameters do not
        reach ``insmod``.
    :param markers: console lines to watch for, each with a callback (or None) called with its
        :class:`Mark` in the console reader thread; every mark is in :attr:`GuestRun.marks`.
    :param during: called in a host thread with a :class:`Host` once QEMU has started; its
        return value or exception lands in :attr:`GuestRun.during_result` /
        :attr:`GuestRun.during_error`. It should return soon after ``host.done`` is set.
    :param during_join: seconds to wait for ``during`` after QEMU ended.
    :param kernel: ``"default"`` (Debian's kernel, the one every figure is measured with) or
        ``"p2p"`` (trixie-backports' newest, which has ``CONFIG_PCI_P2PDMA``: Linux's nvme
        driver then uses a Controller Memory Buffer for its submission queues).
    """
    vm = root / "vm"
    cmd_b64 = base64.b64encode(script.encode()).decode()
    if len(cmd_b64) > 1500:
        raise ValueError("guest script too long for the kernel command line")
    if not re.fullmatch(r"[\w=,.-]*", nvme_args):
        raise ValueError(f"nvme_args must be NAME=VALUE[,NAME=VALUE...]: {nvme_args!r}")
    servers: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    served: list[ServedDevice] = []
    host = Host(served)
    console = Console(host, markers)
    qemu: subprocess.Popen[bytes] | None = None
    reader: threading.Thread | None = None
    worker: threading.Thread | None = None
    outcome: dict[str, Any] = {}
    t0 = time.monotonic()
    append = f"console=ttyS0 quiet loglevel=5 panic=-1 {kernel_args} guest_cmd={cmd_b64}"
    if nvme_args:
        append += f" nvme_args={nvme_args}"
    qargs = ["chroot", str(root), "qemu-system-x86_64", "-accel", "tcg", "-smp", "1", "-m", f"{mem_mb}M",
             "-nographic", "-no-reboot", "-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
             "-machine", "q35,memory-backend=mem", "-kernel", KERNELS[kernel][0], "-initrd", KERNELS[kernel][1],
             "-append", append]

    def run_during() -> None:
        assert during is not None
        try:
            outcome["result"] = during(host)
        except BaseException as exc:
            outcome["error"] = exc

    with subreaper():
        try:
            for i, spec in enumerate(devices):
                sock = vm / f"{tag}-dev{i}.sock"
                log = vm / f"{tag}-dev{i}.log"
                logs.append(log)
                for stale in (sock, sock.with_name(sock.name + ".ctl")):  # .ctl: the handover endpoint
                    with contextlib.suppress(FileNotFoundError):
                        stale.unlink()
                fh = open(log, "w")
                servers.append(subprocess.Popen([PYTHON, "-m", "pcidev", "serve", "--vfio-user", str(sock), spec],
                                                stdout=fh, stderr=subprocess.STDOUT))
                fh.close()
                deadline = time.monotonic() + 30
                while not sock.exists():
                    if servers[-1].poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"server for {spec} did not start:\n{log.read_text()}")
                    time.sleep(0.05)
                served.append(ServedDevice(sock, servers[-1].pid))
                qargs += ["-device", f'{{"driver":"vfio-user-pci","id":"dev{i}","x-msg-timeout":{msg_timeout_ms},'
                                     f'"socket":{{"path":"/vm/{sock.name}","type":"unix"}}}}']
            if builtin_nvme:
                img = vm / f"{tag}-disk.img"
                with open(img, "wb") as f:
                    f.truncate(_size(builtin_nvme))
                qargs += ["-drive", f"file=/vm/{img.name},if=none,id=d0,format=raw",
                          "-device", "nvme,drive=d0,serial=pcidev0"]
            with mounted(root):
                qemu = subprocess.Popen(qargs, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
                reader = threading.Thread(target=console.read, args=(qemu.stdout,), daemon=True)
                reader.start()
                if during is not None:
                    worker = threading.Thread(target=run_during, daemon=True)
                    worker.start()
                try:
                    qemu.wait(timeout)
                except subprocess.TimeoutExpired:
                    _kill(qemu)
                    console.feed(b"\n@@HOST: timed out@@\n")
                reader.join(30)
        finally:
            host.done.set()
            if worker is not None:
                worker.join(during_join)
                if worker.is_alive():
                    outcome.setdefault("error", TimeoutError(f"during did not end {during_join} s after QEMU"))
            _kill(qemu)
            for s in servers:
                _kill(s)
            popen_pids = {s.pid for s in servers}
            _kill_pids([pid for d in served for pid in d.pids if pid not in popen_pids])
            _kill_pids(_adopted_servers([d.socket for d in served]))  # spawned by a server, never reported
    text = console.text()
    m = re.search(r"@@PCIDEV-RC=(\d+)@@", text)
    start = text.find("@@PCIDEV-START@@")
    end = text.find("@@PCIDEV-RC=")
    output = text[start + 16:end] if start >= 0 and end > start else text
    error = outcome.get("error", console.error)
    return GuestRun(console=text, rc=int(m.group(1)) if m else None, output=output,
                    qemu_rc=qemu.returncode if qemu else None,
                    servers=[p.read_text() for p in logs], seconds=time.monotonic() - t0,
                    marks=list(host.marks), pids=[list(d.pids) for d in served],
                    during_result=outcome.get("result"), during_error=error)


def _size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * mult[text[-1].upper()] if text[-1].upper() in mult else int(text)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("script")
    ap.add_argument("--device", action="append", default=[])
    ap.add_argument("--builtin-nvme")
    ap.add_argument("--kernel-args", default="")
    ap.add_argument("--nvme-args", default="", help="insmod nvme.ko parameters, e.g. io_queue_depth=2")
    ap.add_argument("--marker", action="append", default=[], help="console line to timestamp (with server CPU)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--setup", action="store_true")
    args = ap.parse_args(argv)
    if args.setup:
        print(f"setup: {setup():.1f} s", file=sys.stderr)
    run = run_guest(args.script, args.device, builtin_nvme=args.builtin_nvme, timeout=args.timeout, tag="cli",
                    kernel_args=args.kernel_args, nvme_args=args.nvme_args,
                    markers=dict.fromkeys(args.marker))
    print(run.console)
    for s in run.servers:
        print("--- server ---\n" + s[-4000:])
    for mk in run.marks:
        print(f"mark {mk.name}: t={mk.t - run.marks[0].t:.3f} s, server cpu {mk.cpu}")
    print(f"guest rc={run.rc} qemu rc={run.qemu_rc} in {run.seconds:.1f} s")
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
