"""Side-by-side benchmark of two pcidev checkouts, alternating on the same machine.

Runs ``pcidev bench nvme --json`` and ``examples/bench_device_migration.py --json`` of a
BEFORE and an AFTER checkout (each with its own ``.venv``) in turn, ROUNDS times, and
prints the medians and their ratio (after / before). Alternating in one run is what makes
the figures comparable on a noisy machine: load that comes and goes hits both sides.

    .venv/bin/python examples/compare_checkouts.py --before ../old-checkout --after . --rounds 4

The NVMe figures are IOPS per CPU-second of the benchmark process (higher is better);
the migration figures are milliseconds (lower is better).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

NVME_KEYS = ("randread_4k_qd32_iops_per_cpu_s", "randwrite_4k_qd32_iops_per_cpu_s", "seqread_128k_qd8_iops_per_cpu_s")
MIGRATION_KEYS = ("save", "load", "save_load")


def _json(cmd: list[str], cwd: Path) -> dict:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {cwd} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def measure(checkout: Path, seconds: float, runs: int) -> dict[str, float]:
    """One NVMe benchmark and one migration benchmark of ``checkout``."""
    venv = checkout / ".venv" / "bin"
    nvme = _json([str(venv / "pcidev"), "bench", "nvme", "--json", "--seconds", str(seconds)], checkout)
    mig = _json([str(venv / "python"), "examples/bench_device_migration.py", "--runs", str(runs), "--json"], checkout)
    out = {k: float(nvme[k]) for k in NVME_KEYS}
    out |= {f"migration_{k}_ms": float(mig[k]["median_ms"]) for k in MIGRATION_KEYS}
    out["migration_stream_bytes"] = float(mig["stream_bytes"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout to compare against")
    parser.add_argument("--after", type=Path, required=True, help="checkout under test")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="run time of each NVMe job")
    parser.add_argument("--runs", type=int, default=300, help="save+load runs of the migration benchmark")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    samples: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for _ in range(args.rounds):
        for side, checkout in (("before", args.before), ("after", args.after)):
            for key, value in measure(checkout.resolve(), args.seconds, args.runs).items():
                samples[side].setdefault(key, []).append(value)
    result = {}
    for key in samples["before"]:
        b, a = statistics.median(samples["before"][key]), statistics.median(samples["after"][key])
        result[key] = {"before": b, "after": a, "ratio": a / b if b else None,
                       "before_samples": samples["before"][key], "after_samples": samples["after"][key]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, r in result.items():
            ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
            print(f"{key:36} before {r['before']:>12,.2f}  after {r['after']:>12,.2f}  ratio {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
