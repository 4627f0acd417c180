"""The soak: 50 consecutive migrations of the NVMe controller between processes under
its standard verified workload (8 I/O queues x QD 32, CRC-32C per block, completions
counted per (SQ, CID)), over UNIX and over TCP, with a CPU hog spinning beside it.

Zero mismatches, zero lost and zero duplicated completions; at least one stop with a
full CQ (and parked completions) and one with AERs outstanding, as the migrations'
summaries of the stopped controller say. Marked ``slow``; the CI command (README's
quick start, ``.ci/run``) runs it: nothing deselects ``slow``.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pcidev.testing import migrate_under_load, standard_workload

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = 50


@pytest.fixture
def cpu_hog():
    """A process spinning on a CPU for the whole test (the machine is busy), killed at the end."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield hog
    finally:
        hog.kill()
        hog.wait(10)


# both transports: a mem and a file namespace (over TCP the mem one's contents travel:
# pre-copy while the workload runs, the rest at the stop)
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_soak_50_migrations_under_verified_io_beside_a_cpu_hog(transport, tmp_path, cpu_hog):
    work = standard_workload("nvme", workdir=tmp_path, queues=8, qd=32, transport=transport, seed=11)
    result = migrate_under_load("nvme", work, count=MIGRATIONS, every=2, transport=transport)
    assert cpu_hog.poll() is None, "the CPU hog ran beside the whole soak"
    report = work.report()
    assert len(result.migrations) == MIGRATIONS and not result.errors
    assert len({m.destination_pid for m in result.migrations}) == MIGRATIONS
    assert report["qd"] >= 32 and report["queues"] == 8
    assert (report["mismatches"], report["lost_completions"], report["duplicate_completions"]) == (0, 0, 0)
    assert report["error_completions"] == 0 and report["problems"] == []
    assert report["writes"] > 0 and report["reads"] > 0 and report["blocks_read"] > 0
    assert report["blocks_checked"] == 2 * (4 << 20) // 512  # every block once more at the end
    assert report["aer_events"] == 1  # an AER armed before the first migration completed after the last
    summaries = [m.summary for m in result.migrations]
    assert all(set(s) >= {"cqs_full", "cq_backlog", "sq_unfetched", "aers_outstanding"} for s in summaries)
    assert sum(s["cqs_full"] > 0 for s in summaries) >= 1, "no stop with a full CQ"
    assert sum(s["cq_backlog"] > 0 for s in summaries) >= 1, "no stop with parked completions"
    assert sum(s["aers_outstanding"] > 0 for s in summaries) >= 1, "no stop with AERs outstanding"
    assert report["cq_full_holds"] >= 1
    if transport == "tcp":
        assert all(m.fds == 0 for m in result.migrations)
        assert all(m.report["precopy"] is not None for m in result.migrations)  # the mem namespace's contents


def test_the_ci_command_runs_the_slow_tests():
    """The soak is in CI: the test command of the quick start selects no markers away."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        ini = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    assert "slow: " in " ".join(ini["markers"])
    assert "-m" not in ini["addopts"].split() and "not slow" not in ini["addopts"]
    readme = (ROOT / "README.md").read_text()
    ci = [line for line in readme.splitlines() if "python -m pytest" in line][0]
    assert "-m" not in ci.split("pytest", 1)[1].split()
