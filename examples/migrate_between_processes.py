"""Migrate a device between processes again and again while the software host runs
its standard verified workload on it, then say what happened.

The device (``--device``, NVMe by default) starts in a process of its own; the
software host plugs it over the device link and runs the workload its plugin
provides (:func:`pcidev.testing.standard_workload`). For NVMe that is random
writes and reads at queue depth ``--qd`` on ``--queues`` I/O queues (8 x 32), every
block carrying a CRC-32C checked on every read (as fio's ``verify=crc32c``),
every completion counted per (SQ, CID) so lost and duplicated ones show, a full
completion queue held at every second stop and Asynchronous Event Requests
outstanding throughout. Every ``--every`` workload steps the device moves to a
new process, started only when it is needed
(:func:`pcidev.testing.migrate_under_load`). At the end the workload reads every
block once more.

Run::

    .venv/bin/python examples/migrate_between_processes.py [--device nvme|edu|...]
        [--migrations N] [--tcp] [--queues N] [--qd N] [--every N] [--seed N]
        [--ns-size SIZE] [--ns-kind mem|file|both]
        [--max-downtime-ms MS] [--save-stream PATH [--force]] [--json] [-p no:NAME | -p MODULE]...

``--ns-size`` (``256M``, ``1G``, bytes without a suffix) and ``--ns-kind`` choose the
NVMe workload's namespaces (default: a 4 MiB ``mem`` and a 4 MiB ``file`` one); a
large ``mem`` namespace over ``--tcp`` is copied while the device runs (pre-copy).

Without ``--json`` a progress bar runs and a table ends the run (downtime median
and worst and where it went, pre-copy iterations, bytes and time, state size,
mismatches, lost and duplicated completions, the stops with a full CQ and with
AERs outstanding); ``--json`` prints one JSON object instead. ``--save-stream PATH``
also writes one migration's vmstate stream (``pcidev vmstate dump PATH`` shows it);
an existing file is replaced only with ``--force``. Exit status 0 when every migration ran and nothing was wrong, 1 with
one line on standard error otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pcidev.errors import PcidevError, one_line
from pcidev.properties import parse_size
from pcidev.testing import (
    MigrationRecord,
    MigrationRunResult,
    Workload,
    WorkloadContext,
    WorkloadError,
    migrate_under_load,
    standard_workload,
)


def build_parser() -> argparse.ArgumentParser:
    """The options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="nvme", help="registered device type with a standard workload (default nvme)")
    ap.add_argument("--migrations", type=int, default=10, help="how many times the device moves (default 10)")
    ap.add_argument("--tcp", action="store_true", help="migrate over TCP (localhost; no descriptors travel)")
    ap.add_argument("--queues", type=int, default=8, help="I/O queues the workload drives (default 8)")
    ap.add_argument("--qd", type=int, default=32, help="commands in flight per queue (default 32)")
    ap.add_argument("--every", type=int, default=2, help="workload steps before each migration (default 2)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the workload's random choices")
    ap.add_argument("--ns-size", metavar="SIZE", default=None,
                    help="NVMe: bytes of each namespace (256M, 1G; default 4 MiB)")
    ap.add_argument("--ns-kind", choices=NS_KINDS, default="both",
                    help="NVMe: the namespaces: a mem one, a file one or both (default)")
    ap.add_argument("--max-downtime-ms", type=float, default=None,
                    help="downtime budget of a pre-copy migration (needs a device link with pre-copy)")
    ap.add_argument("--save-stream", metavar="PATH", help="also write one migration's vmstate stream to PATH")
    ap.add_argument("--force", action="store_true", help="with --save-stream: replace an existing PATH")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the progress and table")
    ap.add_argument("-p", action="append", default=[], dest="plugin_specs", metavar="no:NAME|MODULE",
                    help="plugin selection of the device processes, as pcidev -p; repeatable")
    return ap


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, in one line, or None (``args.ns_bytes`` is set from
    ``--ns-size``)."""
    args.ns_bytes = None
    if args.ns_size is not None:
        try:
            args.ns_bytes = parse_size(args.ns_size)
        except (PcidevError, ValueError) as exc:
            return f"--ns-size: {one_line(exc) if isinstance(exc, PcidevError) else exc}"
        if args.ns_bytes <= 0 or args.ns_bytes % 4096:
            return f"--ns-size must be a positive multiple of 4 KiB, not {args.ns_size}"
    if args.migrations < 1:
        return f"--migrations must be >= 1, not {args.migrations}"
    for name in ("queues", "qd", "every"):
        if getattr(args, name) < 1:
            return f"--{name} must be >= 1, not {getattr(args, name)}"
    if args.max_downtime_ms is not None and args.max_downtime_ms <= 0:
        return f"--max-downtime-ms must be > 0, not {args.max_downtime_ms}"
    if args.save_stream:
        parent = os.path.dirname(os.path.abspath(args.save_stream))
        if not os.path.isdir(parent):
            return f"--save-stream: directory {parent} does not exist"
        if os.path.isdir(args.save_stream):
            return f"--save-stream: {args.save_stream} is a directory"
        if os.path.lexists(args.save_stream) and not args.force:
            return f"--save-stream: {args.save_stream} exists; give --force to replace it"
    if args.force and not args.save_stream:
        return "--force only goes with --save-stream"
    return None


#: ``--ns-kind``: the NVMe workload's ``namespaces`` option for each choice
NS_KINDS = {"both": "mem,file", "mem": "mem", "file": "file"}

#: the steps of a migration's downtime, in order (:func:`breakdown`)
PHASES = ("hold", "drain", "flush", "quiesce_other", "remainder", "save", "send", "receive", "load",
          "ack_resume", "follow")


def breakdown(report: Mapping[str, Any]) -> dict[str, float] | None:
    """Where one migration's time went, in milliseconds, from its report
    (:meth:`~pcidev.transport.link.RemoteDevice.migrate`): ``hold`` (the host holds its
    accesses until the device is stopped), ``drain`` and ``flush`` (the device's quiesce,
    where its plugin says: NVMe's commands in flight and ``fdatasync``),
    ``quiesce_other`` (the rest of the quiesce), ``remainder`` (the pre-copy's rest at the
    stop), ``save``, ``send`` (to the last byte of the state), ``receive`` (until the
    destination has it all), ``load``, ``ack_resume`` (from the load to running on the
    destination; over TCP that includes the host attaching its memory and eventfds),
    ``follow`` (until the host's accesses go to the destination). Their sum is the host's
    pause; from ``drain`` to ``ack_resume`` the downtime. None when the report has no
    steps or the clocks are not comparable.
    """
    ph = report.get("phases")
    held = report.get("held_at")
    running = report.get("running_at") or report.get("resumed_at")  # (over TCP the host's RESUME runs it)
    if not isinstance(ph, Mapping) or not report.get("same_clock") or not isinstance(held, float) \
            or not isinstance(running, float) or not all(k in ph for k in ("stopped", "quiesced", "saved", "sent")):
        return None
    summary = report.get("summary") if isinstance(report.get("summary"), Mapping) else {}
    drain = (summary.get("quiesce_drain_us") or 0) / 1e6
    flush = (summary.get("quiesce_flush_us") or 0) / 1e6
    precopy = report.get("precopy") if isinstance(report.get("precopy"), Mapping) else {}
    remainder = float(precopy.get("finish_seconds") or 0.0)
    received = ph.get("received", ph["sent"])
    loaded = ph.get("loaded", received)
    out = {
        "hold": ph["stopped"] - held, "drain": drain, "flush": flush,
        "quiesce_other": ph["quiesced"] - ph["stopped"] - drain - flush, "remainder": remainder,
        "save": ph["saved"] - ph["quiesced"] - remainder, "send": ph["sent"] - ph["saved"],
        "receive": received - ph["sent"], "load": loaded - received, "ack_resume": running - loaded,
        "follow": held + float(report.get("host_pause") or 0.0) - running,
    }
    return {k: v * 1e3 for k, v in out.items()}


def stream_migration(args: argparse.Namespace) -> int:
    """Which migration's stream --save-stream keeps: the second (a stop with a full CQ
    for NVMe), or the only one."""
    return min(2, int(args.migrations))


def summarize(args: argparse.Namespace, workload: Workload, result: MigrationRunResult | None,
              error: str | None, saved: str | None) -> dict[str, Any]:
    """The run as one JSON-ready object."""
    migrations: Sequence[MigrationRecord] = result.migrations if result is not None else ()
    report = workload.report()
    measured = [m.downtime * 1e3 for m in migrations if m.downtime is not None]
    bounds = [m.downtime_upper_bound * 1e3 for m in migrations]
    downtimes = measured if len(measured) == len(migrations) else bounds  # clocks not comparable: upper bounds
    sizes = [m.state_size for m in migrations]

    def stops(key: str) -> int:
        return sum(1 for m in migrations if (m.summary.get(key) or 0) > 0)

    def median(values: Sequence[float]) -> float | None:
        return statistics.median(values) if values else None

    parts = [b for b in (breakdown(m.report) for m in migrations) if b is not None]
    precopies = [m.report["precopy"] for m in migrations if isinstance(m.report.get("precopy"), Mapping)]
    first_phase = [float(m.report["precopy_seconds"]) for m in migrations
                   if isinstance(m.report.get("precopy_seconds"), float)]
    totals = [float(m.report.get("precopy_seconds") or 0.0) + m.host_pause for m in migrations]

    return {
        "device": args.device, "transport": "tcp" if args.tcp else "unix", "queues": args.queues, "qd": args.qd,
        "requested": args.migrations, "migrations": len(migrations),
        "mismatches": report.get("mismatches"), "lost_completions": report.get("lost_completions"),
        "duplicate_completions": report.get("duplicate_completions"),
        "downtime_ms_median": statistics.median(downtimes) if downtimes else None,
        "downtime_ms_max": max(downtimes, default=None),
        "downtime_measured": len(measured) == len(migrations),
        "host_pause_ms_median": statistics.median(m.host_pause * 1e3 for m in migrations) if migrations else None,
        "breakdown_ms_median": {k: statistics.median(b[k] for b in parts) for k in PHASES} if parts else None,
        "precopy_iterations_median": median([p["iterations"] for p in precopies]),
        "precopy_iterations_max": max((p["iterations"] for p in precopies), default=None),
        "precopy_bytes_median": median([sum(p["bytes_per_iteration"]) for p in precopies]),
        "precopy_remainder_bytes_median": median([p["remainder_bytes"] for p in precopies]),
        "precopy_seconds_median": median(first_phase),
        "total_seconds_median": median(totals),
        "total_seconds_max": max(totals, default=None),
        "ns_size": args.ns_bytes, "ns_kind": args.ns_kind,
        "state_bytes": max(sizes, default=None),
        "state_bytes_median": statistics.median(sizes) if sizes else None,
        "fds": max((m.fds for m in migrations), default=None),
        "cq_full_stops": stops("cqs_full"), "cq_backlog_stops": stops("cq_backlog"),
        "aer_stops": stops("aers_outstanding"),
        "iterations": result.iterations if result is not None else None,
        "seconds": result.seconds if result is not None else None,
        "workload": report,
        "stream_saved": saved,
        "error": error,
        "per_migration": [{
            "index": m.index, "source_pid": m.source_pid, "destination_pid": m.destination_pid,
            "iteration": m.iteration, "downtime_ms": None if m.downtime is None else m.downtime * 1e3,
            "downtime_upper_bound_ms": m.downtime_upper_bound * 1e3, "host_pause_ms": m.host_pause * 1e3,
            "state_bytes": m.state_size, "fds": m.fds, "summary": dict(m.summary),
            "breakdown_ms": breakdown(m.report), "precopy": m.report.get("precopy"),
            "precopy_seconds": m.report.get("precopy_seconds"),
        } for m in migrations],
    }


def missing_stops(out: dict[str, Any]) -> str | None:
    """For a device whose plugin reports full CQs and outstanding AERs (NVMe), the run must
    have stopped it so at least once (from the second migration on, the workload holds a CQ
    full at every second stop): what did not happen, or None."""
    summaries = [m["summary"] for m in out["per_migration"]]
    missing = []
    if out["migrations"] >= 2 and summaries and all("cqs_full" in s for s in summaries) and not out["cq_full_stops"]:
        missing.append("a full CQ")
    if summaries and all("aers_outstanding" in s for s in summaries) and not out["aer_stops"]:
        missing.append("AERs outstanding")
    return f"no migration stopped the device with {' or '.join(missing)}" if missing else None


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}{unit}"
    return f"{value}{unit}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def print_table(console: Console, out: dict[str, Any]) -> None:
    """The end-of-run table."""
    work = out["workload"]
    table = Table(title=f"{out['device']}: {out['migrations']} migrations over {out['transport']}", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    down = "downtime" if out["downtime_measured"] else "downtime (upper bound)"
    rows = [
        (f"{down} median / max", f"{_fmt(out['downtime_ms_median'], ' ms')} / {_fmt(out['downtime_ms_max'], ' ms')}"),
        ("host accesses held (median)", _fmt(out["host_pause_ms_median"], " ms")),
    ]
    if out["precopy_iterations_median"] is not None:
        mib = (out["precopy_bytes_median"] or 0) / (1 << 20)
        rows.append(("pre-copy: passes / copied / rest",
                     f"{out['precopy_iterations_median']:g} / {mib:.1f} MiB / "
                     f"{out['precopy_remainder_bytes_median'] or 0:g} bytes"))
    rows += [
        ("migration total (median / max)",
         f"{_fmt(_ms(out['total_seconds_median']), ' ms')} / {_fmt(_ms(out['total_seconds_max']), ' ms')}"),
        ("state size (largest)", f"{_fmt(out['state_bytes'], ' bytes')} + {_fmt(out['fds'])} fds"),
        ("workload steps", _fmt(out["iterations"])),
        ("blocks verified (reads, final check)",
         f"{_fmt(work.get('blocks_read'))}, {_fmt(work.get('blocks_checked'))}"),
        ("mismatches", _fmt(out["mismatches"])),
        ("lost completions", _fmt(out["lost_completions"])),
        ("duplicated completions", _fmt(out["duplicate_completions"])),
        ("stops with a full CQ", _fmt(out["cq_full_stops"])),
        ("stops with parked completions", _fmt(out["cq_backlog_stops"])),
        ("stops with AERs outstanding", _fmt(out["aer_stops"])),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    parts = out["breakdown_ms_median"]
    if parts:
        console.print("where the time went (median ms): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if abs(v) >= 0.005))
    if out["stream_saved"]:
        console.print(f"migration stream written to {out['stream_saved']} (pcidev vmstate dump shows it)")


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the migrations under load, report; returns the exit status."""
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    console = Console()
    workdir = tempfile.mkdtemp(prefix="pcidev-between-")
    result: MigrationRunResult | None = None
    error: str | None = None
    saved: str | None = None
    try:
        try:
            extra: dict[str, Any] = {"namespaces": NS_KINDS[args.ns_kind]}
            if args.ns_bytes is not None:
                extra["ns_size"] = args.ns_bytes
            workload = standard_workload(args.device, workdir=workdir, queues=args.queues, qd=args.qd,
                                         transport="tcp" if args.tcp else "unix", seed=args.seed,
                                         plugin_specs=args.plugin_specs, **extra)
        except PcidevError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 1
        progress = Progress(TextColumn("migrating {task.fields[device]}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=console,
                            disable=args.json)
        task = progress.add_task("", total=args.migrations, device=args.device, last="")

        def advance(record: MigrationRecord, ctx: WorkloadContext) -> None:
            down = record.downtime if record.downtime is not None else record.downtime_upper_bound
            progress.update(task, advance=1, last=f"last downtime {down * 1e3:.2f} ms")

        keep = stream_migration(args) if args.save_stream else None
        try:
            with progress:
                result = migrate_under_load(args.device, workload, count=args.migrations, every=args.every,
                                            transport="tcp" if args.tcp else "unix",
                                            plugin_specs=args.plugin_specs, on_migration=advance,
                                            max_downtime_ms=args.max_downtime_ms, keep_stream=keep)
        except WorkloadError as exc:
            error, result = one_line(exc), exc.result
        except (PcidevError, KeyboardInterrupt) as exc:
            error = one_line(exc) if isinstance(exc, PcidevError) else "interrupted"
        if result is not None and keep is not None and error is None:
            record = next((m for m in result.migrations if m.index == keep), None)
            if record is None or record.stream is None:
                error = f"migration {keep}'s stream was not kept"
            else:
                try:
                    with open(args.save_stream, "wb" if args.force else "xb") as f:
                        f.write(record.stream)
                    saved = args.save_stream
                except OSError as exc:
                    error = f"cannot write {args.save_stream}: {exc.strerror or exc}"
        out = summarize(args, workload, result, error, saved)
        if error is None and out["migrations"] != args.migrations:
            error = out["error"] = f"{out['migrations']} of {args.migrations} migrations ran"
        if error is None:
            error = out["error"] = missing_stops(out)
        if args.json:
            print(json.dumps(out, indent=1, default=str))
        elif result is not None and result.migrations:
            print_table(console, out)
        if error is not None:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
