r"""Move a running NVMe device to a device process on another host, with its NBD storage,
while the software host's verified workload runs on it; then say what happened.

The device processes are yours (this script starts nothing and needs no privilege): the
source runs the device and serves it on ``--link``; each destination was started with the
same properties and ``--incoming tcp:HOST:PORT`` on the other host (see ``docs/nbd.md``,
"Moving a device between hosts", for the commands, and network namespaces to try it on one
machine). The script plugs the source into a software host (the device link is a UNIX
socket: guest RAM is shared with the device process, so the driving host must reach each
process's ``--link`` path), runs the NVMe verified workload (random writes and reads at
queue depth ``--qd`` on ``--queues`` I/O queues, a CRC-32C per block checked on every read,
every completion counted), and after ``--steps`` workload steps asks the device to migrate
to each ``--to`` address in turn, the workload running meanwhile; the host follows the
device to its new process. After ``--steps`` more steps the workload reads every block once
more.

Run::

    .venv/bin/python examples/move_between_hosts.py --link unix:/tmp/move/a.sock \\
        --to tcp:10.231.7.2:7000 [--to ADDR]... --props "$PROPS"
        [--queues N] [--qd N] [--steps N] [--seed N] [--timeout S] [--json]

``--props`` must be the device's properties (the workload learns the namespaces from them).
Exit status 0 when every move ran and every block checked out (zero mismatches, no lost or
duplicated completion), 1 with one line on standard error otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from pcidev.errors import PcidevError, one_line
from pcidev.host import Machine
from pcidev.testing import WorkloadContext
from pcidev.transport.address import parse_address
from pcidev.transport.link.remote import RemoteDevice
from pcidev_nvme.testing.workload import VerifiedIo


def build_parser() -> argparse.ArgumentParser:
    """The options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--link", required=True, help="the source device process's --link (unix:PATH)")
    ap.add_argument("--to", action="append", required=True, metavar="ADDR",
                    help="a destination's --incoming address (tcp:HOST:PORT); repeatable, moved to in order")
    ap.add_argument("--props", required=True, help="the device's properties, as given to its processes")
    ap.add_argument("--queues", type=int, default=2, help="I/O queues the workload drives (default 2)")
    ap.add_argument("--qd", type=int, default=8, help="commands in flight per queue (default 8)")
    ap.add_argument("--steps", type=int, default=4,
                    help="workload steps before each move and after the last (default 4)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the workload's random choices")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds for each move and each wait (default 60)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    return ap


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, in one line, or None."""
    for name in ("queues", "qd", "steps"):
        if getattr(args, name) < 1:
            return f"--{name} must be >= 1, not {getattr(args, name)}"
    if args.timeout <= 0:
        return f"--timeout must be > 0, not {args.timeout}"
    try:
        if parse_address(args.link).kind != "unix":
            return f"--link must be a unix:PATH address (the device link shares guest RAM), not {args.link}"
        for to in args.to:
            parse_address(to)
    except PcidevError as exc:
        return one_line(exc)
    return None


class _Steps(threading.Thread):
    """Steps the workload until asked to stop; counts the steps."""

    def __init__(self, work: VerifiedIo, ctx: WorkloadContext) -> None:
        super().__init__(name="move-workload", daemon=True)
        self.work, self.ctx = work, ctx
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def run(self) -> None:
        try:
            while not self.ctx.stopping.is_set():
                self.work.step(self.ctx)
                with self.cond:
                    self.ctx.iteration += 1
                    self.cond.notify_all()
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.ctx.ended.set()
            with self.cond:
                self.cond.notify_all()

    def wait_for(self, steps: int, timeout: float) -> None:
        """Until ``steps`` steps are done (or the workload failed).

        :raises TimeoutError: no step completed for ``timeout`` seconds.
        """
        with self.cond:
            last, deadline = self.ctx.iteration, time.monotonic() + timeout
            while self.ctx.iteration < steps and not self.ctx.ended.is_set():
                if self.ctx.iteration != last:
                    last, deadline = self.ctx.iteration, time.monotonic() + timeout
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no workload step completed in {timeout:g} s")
                self.cond.wait(0.5)


def move(args: argparse.Namespace) -> dict[str, Any]:
    """Run the workload, move the device to each ``--to`` and verify every block.

    :returns: ``moves`` (per move: destination, state size, descriptors, downtime, host
        pause, the process serving the device after it) and ``workload`` (the verified
        workload's report).
    :raises PcidevError: a move failed (the device runs on where it was).
    :raises RuntimeError: the workload failed.
    """
    work = VerifiedIo(qd=args.qd, queues=args.queues, seed=args.seed, properties=args.props)
    moves: list[dict[str, Any]] = []
    with Machine(ram_size=work.ram_size) as machine:
        pdev = machine.plug_remote(args.link, timeout=args.timeout)
        remote = pdev.device
        if not isinstance(remote, RemoteDevice):
            raise PcidevError(f"plug_remote gave a {type(remote).__name__}, not a RemoteDevice")
        ctx = WorkloadContext(machine, pdev)
        work.setup(ctx)
        steps = _Steps(work, ctx)
        steps.start()
        try:
            for k, to in enumerate(args.to, 1):
                steps.wait_for(k * args.steps, args.timeout)
                if steps.error is not None:
                    break
                work.before_migration(ctx, k)
                try:
                    report = remote.migrate(to, timeout=args.timeout)
                finally:
                    work.after_migration(ctx, None)
                ctx.migrations = k
                moves.append({"to": to, "state_size": int(report["state_size"]), "fds": int(report["fds"]),
                              "downtime": report.get("downtime"), "host_pause": float(report["host_pause"]),
                              "pid": ctx.pid, "link": ctx.link})
            if steps.error is None:
                steps.wait_for((len(args.to) + 1) * args.steps, args.timeout)
        finally:
            ctx.stopping.set()
            steps.join(args.timeout)
        if steps.error is not None:
            raise RuntimeError(f"the workload failed: {type(steps.error).__name__}: {steps.error}")
        if steps.is_alive():
            raise RuntimeError(f"the workload did not stop within {args.timeout:g} s")
        work.verify(ctx)
    return {"moves": moves, "workload": work.report(), "steps": ctx.iteration}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, move, print; 0 when everything checked out."""
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem is not None:
        print(f"move_between_hosts: {problem}", file=sys.stderr)
        return 2
    try:
        result = move(args)
    except (PcidevError, RuntimeError, TimeoutError, OSError) as exc:
        text = one_line(exc) if isinstance(exc, PcidevError) else f"{type(exc).__name__}: {exc}"
        print(f"move_between_hosts: {text}", file=sys.stderr)
        return 1
    report = result["workload"]
    bad = report["mismatches"] or report["lost_completions"] or report["duplicate_completions"]
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for k, m in enumerate(result["moves"], 1):
            down = "?" if m["downtime"] is None else f"{m['downtime'] * 1e3:.1f} ms"
            print(f"move {k} -> {m['to']}: downtime {down}, host pause {m['host_pause'] * 1e3:.1f} ms, "
                  f"state {m['state_size']} bytes, {m['fds']} descriptors; now process {m['pid']} at {m['link']}")
        print(f"{result['steps']} workload steps: {report['commands']} commands, {report['blocks_written']} blocks "
              f"written, {report['blocks_checked']} checked, {report['mismatches']} mismatches, "
              f"{report['lost_completions']} lost, {report['duplicate_completions']} duplicated completions")
    if bad:
        print("move_between_hosts: the workload found wrong data or completions", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
