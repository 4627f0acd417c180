"""``pcidev bench nvme``: runs through the CLI, prints the documented JSON keys."""

from __future__ import annotations

import contextlib
import json

import pytest

from pcidev.cli import main as cli_main
from pcidev_nvme.testing.bench import JOBS, main, run_job


def test_bench_json_through_the_cli(capsys):
    rc = cli_main(["bench", "nvme", "--json", "--seconds", "0.2", "--size", "16M"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    for key in ("randread_4k_qd32_iops", "randwrite_4k_qd32_iops", "seqread_128k_qd8_mbps"):
        assert result[key] > 0
    for name, *_ in JOBS:
        assert result[f"{name}_errors"] == 0
        assert 0 < result[f"{name}_p50_us"] <= result[f"{name}_p99_us"]
    assert result["setup"]["backend"] == "mem"


def test_bench_table(capsys):
    assert main(["--seconds", "0.1", "--size", "16M"]) == 0
    out = capsys.readouterr().out
    assert "randread_4k_qd32" in out and "seqread_128k_qd8" in out and "p99 us" in out


def test_bench_listed_and_errors(capsys):
    assert cli_main(["bench"]) == 0
    assert "nvme" in capsys.readouterr().out
    assert cli_main(["bench", "no-such-bench"]) == 1
    assert "no-such-bench" in capsys.readouterr().err
    assert cli_main(["bench", "nvme", "--seconds", "0"]) == 1
    assert cli_main(["bench", "nvme", "--size", "lots"]) == 1


def test_run_job_rejects_unsuitable_block_size():
    from pcidev.errors import PcidevError
    from pcidev.host import Machine
    from pcidev_nvme.controller import NvmeController
    from pcidev_nvme.testing.driver import NvmeDriver

    machine = Machine(ram_size=64 << 20)
    ctrl = NvmeController("ns=mem:size=1M")
    drv = NvmeDriver.attach(machine, ctrl)
    try:
        with pytest.raises(PcidevError):
            run_job(drv, machine, name="x", opcode=2, block_size=1000, queue_depth=1, seconds=0.1)
        r = run_job(drv, machine, name="ok", opcode=2, block_size=4096, queue_depth=4, seconds=0.05)
        assert r.ios > 0 and r.errors == 0 and r.iops > 0
    finally:
        drv.close()
        ctrl.close()
        machine.close()


def test_bench_both_transports_in_one_run(capsys):
    """``--transport both``: the in-process keys unchanged, the vfio-user ones beside them,
    the server's CPU counted, data verified on both, and the server process gone."""
    # (--debug: a failure shows its traceback; one was seen twice on busy machines as a bare TypeError)
    rc = cli_main(["--debug", "bench", "nvme", "--json", "--transport", "both", "--seconds", "0.3", "--size", "16M"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    for name, *_ in JOBS:
        for prefix in ("", "vfio_user_"):
            assert result[f"{prefix}{name}_iops"] > 0 and result[f"{prefix}{name}_errors"] == 0
            assert result[f"{prefix}{name}_iops_per_cpu_s"] > 0
            assert 0 < result[f"{prefix}{name}_p50_us"] <= result[f"{prefix}{name}_p99_us"]
        assert result[f"vfio_user_{name}_server_cpu_us_per_io"] >= 0
        assert f"{name}_server_cpu_us_per_io" not in result
    assert result["vfio_user_vs_in_process_randread_4k_qd32"] > 0
    setup = result["setup"]
    assert setup["transport"] == "both"
    assert setup["verified_blocks"] == setup["vfio_user_verified_blocks"] == 64


def test_bench_vfio_user_reaps_its_server_on_ctrl_c(monkeypatch):
    from pcidev_nvme.testing import bench

    procs = []
    real = bench._serve_nvme

    @contextlib.contextmanager
    def recording(props):
        with real(props) as (path, proc):
            procs.append(proc)
            yield path, proc

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "_serve_nvme", recording)
    monkeypatch.setattr(bench, "_layout", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.run_vfio_user_benchmark(seconds=0.1, ns_size=16 << 20)
    assert len(procs) == 1 and procs[0].returncode is not None  # the server was reaped
