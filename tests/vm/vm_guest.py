"""Boot the VM tier's guest under QEMU (TCG) with pcidev devices served over vfio-user.

Used by tests/vm and runnable by hand::

    python tests/vm/vm_guest.py 'nvme list; nvme id-ctrl /dev/nvme0 | head' --device nvme,ns=mem:size=64M

The chroot built by ``setup_vm.sh`` holds QEMU; ``$ROOT/vm`` holds the kernel, the
initramfs, the sockets and logs. Every process started here is killed by PID.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = Path(os.environ.get("PCIDEV_VM_ROOT", "/var/cache/pcidev-vm"))
PYTHON = sys.executable


def setup(root: Path = ROOT) -> float:
    """Run setup_vm.sh (builds or reuses); returns its wall time. Raises on failure."""
    t0 = time.monotonic()
    proc = subprocess.run(["sh", str(HERE / "setup_vm.sh"), str(root)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"setup_vm.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.monotonic() - t0


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


def _kill(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
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


@dataclass
class GuestRun:
    """Outcome of one boot."""

    console: str
    rc: int | None
    output: str
    qemu_rc: int | None
    servers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rc == 0


def run_guest(script: str, devices: Sequence[str] = (), *, builtin_nvme: str | None = None,
              timeout: float = 240.0, mem_mb: int = 1024, root: Path = ROOT, tag: str = "t",
              msg_timeout_ms: int = 30000, kernel_args: str = "") -> GuestRun:
    """Boot the guest, run ``script`` (busybox sh) in it, return the console and status.

    :param devices: pcidev device specs, each served by its own ``pcidev serve --vfio-user``.
    :param builtin_nvme: instead, QEMU's own nvme with a raw image of this size (e.g. "128M").
    :param kernel_args: extra guest kernel arguments (e.g. ``pci=nomsi`` for INTx).
    """
    vm = root / "vm"
    cmd_b64 = base64.b64encode(script.encode()).decode()
    if len(cmd_b64) > 1500:
        raise ValueError("guest script too long for the kernel command line")
    servers: list[subprocess.Popen] = []
    logs: list[Path] = []
    qemu: subprocess.Popen | None = None
    t0 = time.monotonic()
    qargs = ["chroot", str(root), "qemu-system-x86_64", "-accel", "tcg", "-smp", "1", "-m", f"{mem_mb}M",
             "-nographic", "-no-reboot", "-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
             "-machine", "q35,memory-backend=mem", "-kernel", "/vm/vmlinuz", "-initrd", "/vm/initrd.gz",
             "-append", f"console=ttyS0 quiet loglevel=5 panic=-1 {kernel_args} guest_cmd={cmd_b64}"]
    try:
        for i, spec in enumerate(devices):
            sock = vm / f"{tag}-dev{i}.sock"
            log = vm / f"{tag}-dev{i}.log"
            logs.append(log)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            fh = open(log, "w")
            servers.append(subprocess.Popen([PYTHON, "-m", "pcidev", "serve", "--vfio-user", str(sock), spec],
                                            stdout=fh, stderr=subprocess.STDOUT))
            fh.close()
            deadline = time.monotonic() + 30
            while not sock.exists():
                if servers[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server for {spec} did not start:\n{log.read_text()}")
                time.sleep(0.05)
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
            try:
                out, _ = qemu.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(qemu)
                out, _ = qemu.communicate()
                out += b"\n@@HOST: timed out@@\n"
    finally:
        _kill(qemu)
        for s in servers:
            _kill(s)
    console = out.decode("utf-8", "replace").replace("\r", "")
    m = re.search(r"@@PCIDEV-RC=(\d+)@@", console)
    start = console.find("@@PCIDEV-START@@")
    end = console.find("@@PCIDEV-RC=")
    output = console[start + 16:end] if start >= 0 and end > start else console
    return GuestRun(console=console, rc=int(m.group(1)) if m else None, output=output,
                    qemu_rc=qemu.returncode if qemu else None,
                    servers=[p.read_text() for p in logs], seconds=time.monotonic() - t0)


def _size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * mult[text[-1].upper()] if text[-1].upper() in mult else int(text)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("script")
    ap.add_argument("--device", action="append", default=[])
    ap.add_argument("--builtin-nvme")
    ap.add_argument("--kernel-args", default="")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--setup", action="store_true")
    args = ap.parse_args(argv)
    if args.setup:
        print(f"setup: {setup():.1f} s", file=sys.stderr)
    run = run_guest(args.script, args.device, builtin_nvme=args.builtin_nvme, timeout=args.timeout, tag="cli",
                    kernel_args=args.kernel_args)
    print(run.console)
    for s in run.servers:
        print("--- server ---\n" + s[-4000:])
    print(f"guest rc={run.rc} qemu rc={run.qemu_rc} in {run.seconds:.1f} s")
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
