"""``pcidev bench nvme --ns``: an NBD namespace (qemu-storage-daemon on a UNIX socket) next to
the memory backend in one run; figures reported for each (not a timing assertion)."""

from __future__ import annotations

import json

from pcidev.cli import main as cli_main

MiB = 1 << 20


def test_bench_reports_each_backend_side_by_side(nbd_server, capsys):
    server = nbd_server("qsd", size=8 * MiB, export="disk")
    rc = cli_main(["--debug", "bench", "nvme", "--json", "--seconds", "0.2", "--size", "4M",
                   "--job", "randread_4k_qd32", "--job", "randwrite_4k_qd32",
                   "--ns", "mem", "--ns", f"nbd:uri={server.uri},queue_depth=32"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    backends = result["backends"]
    assert [b["backend"] for b in backends] == ["mem", "nbd"]
    assert backends[1]["ns"] == f"nbd:uri={server.uri},queue_depth=32"
    for b in backends:
        assert set(b["jobs"]) == {"randread_4k_qd32", "randwrite_4k_qd32"}
        assert b["verified_blocks"] == 64
        for figures in b["jobs"].values():
            assert figures["iops"] > 0 and figures["iops_per_cpu_s"] > 0 and figures["errors"] == 0
            assert 0 < figures["p50_us"] <= figures["p99_us"]
            assert figures["vs_first_iops"] > 0 and figures["vs_first_iops_per_cpu_s"] > 0
    assert all(f["vs_first_iops"] == 1.0 for f in backends[0]["jobs"].values())


def test_bench_ns_table_and_bad_specs(nbd_server, capsys):
    server = nbd_server("qemu", size=4 * MiB)
    assert cli_main(["bench", "nvme", "--seconds", "0.1", "--size", "2M", "--job", "randread_4k_qd32",
                     "--ns", "file", "--ns", f"nbd:uri={server.uri}"]) == 0
    out = capsys.readouterr().out
    assert "1:file" in out and "2:nbd" in out and "vs 1st" in out
    assert cli_main(["bench", "nvme", "--ns", "nonsense"]) == 1
    assert "--ns" in capsys.readouterr().err
    assert cli_main(["bench", "nvme", "--ns", "mem", "--transport", "vfio-user"]) == 1
    assert cli_main(["bench", "nvme", "--ns", "nbd:uri=nbd+unix:///x?socket=/nonexistent/s"]) == 1
