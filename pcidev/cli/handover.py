"""``pcidev handover --vfio-user SOCKET``: move a served device to a new process.

Asks the ``pcidev serve`` process serving ``SOCKET`` (through its control
endpoint ``SOCKET.ctl``, or ``--control PATH``) to hand its device and its live
client connection to a new ``pcidev serve`` process it starts (same device and
properties; ``--exec PYTHON`` runs the new one under another interpreter, e.g.
a virtual environment with a newer pcidev). See
:mod:`pcidev.transport.vfio_user.handover`.

On success it prints one line, ``pcidev: handover OLD -> NEW: downtime X ms,
state N KiB, F fds`` (``--json``: one object with ``downtime_ms``,
``state_bytes``, ``fds``, ``old_pid``, ``new_pid``, ``spawn_ms``, ``host_ms``...)
and exits 0. On any failure the old process keeps serving and it exits 1 with
the reason on one line.
"""

from __future__ import annotations

import argparse
import json

from pcidev.cli._command import CliContext, command
from pcidev.transport.vfio_user.handover import FAULTS, control_path, outcome_line, request_handover

__all__ = ["COMMAND"]


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vfio-user", metavar="SOCKET", required=True,
                        help="the vfio-user socket of the 'pcidev serve' process whose device moves")
    parser.add_argument("--control", metavar="PATH",
                        help="its handover control socket (default SOCKET.ctl)")
    parser.add_argument("--exec", dest="exec_path", metavar="PYTHON",
                        help="the Python interpreter of the new process (default: the server's own)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="seconds the new process may take to start and build its device (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the line")
    parser.add_argument("--fault", choices=FAULTS, help=argparse.SUPPRESS)


@command("handover", help="move a served device and its client to a new process "
                          "(pcidev handover --vfio-user SOCKET)", configure=_configure)
def COMMAND(args: argparse.Namespace, ctx: CliContext) -> int | None:
    """Ask the server for a handover and report it."""
    report = request_handover(args.control or control_path(args.vfio_user), exec_path=args.exec_path,
                              timeout=args.timeout, fault=args.fault)
    if args.json:
        keys = ("downtime_ms", "state_bytes", "fds", "old_pid", "new_pid", "spawn_ms", "host_ms", "same_clock",
                "new_version", "quiesced_ms", "acked_ms", "cut_at")
        print(json.dumps({k: report[k] for k in keys if k in report}, sort_keys=True))
    else:
        print(outcome_line(report))
    return 0
