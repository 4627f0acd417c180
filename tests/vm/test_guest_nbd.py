"""A Linux guest's NVMe namespace on network block storage (issue 13): pcidev's NVMe
controller, served over vfio-user to QEMU (TCG), keeps its namespace on an NBD export of
qemu-storage-daemon (a UNIX socket on the host; TCP behaves the same, tests/plugins/nvme/backends).

While the guest runs fio with crc32c verify of every block, a host thread kills the storage
server (SIGKILL), keeps it down ``OUTAGE`` seconds and starts it again on the same image, then
hands the device over to a new process (``pcidev handover``), which opens its own connection
to the export. Asserted: fio verified every block, the guest kernel logs no nvme timeout, reset
or abort (the outage is latency, not an error), the device process logged the lost connection
and its reconnection, and the handover succeeded. Reported into the tier's results.json: fio's
IOPS and its largest completion gap (the outage as the guest saw it).
"""

from __future__ import annotations

import re
import time

import pytest
import vm_guest
from nbd_servers import NbdServer, ensure_tools
from test_guest_handover import FIO_VERIFY, Handover, check_guest, handover, took_over
from test_guest_nvme import lines

OUTAGE = 3.0  # seconds the storage server is down
SIZE = 64 << 20


@pytest.fixture
def qsd(tmp_path_factory: pytest.TempPathFactory):
    """qemu-storage-daemon exporting a raw 64 MiB image as ``disk`` on a UNIX socket; stopped
    when the test ends (in a short path: sun_path holds 108 bytes)."""
    why = ensure_tools()
    if why is not None:
        pytest.fail(why, pytrace=False)
    d = tmp_path_factory.mktemp("nbd")
    image = d / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    sock = d / "qsd.sock"
    argv = ["qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=exp0,node-name=disk0,name=disk,writable=on"]
    server = NbdServer(argv, sock, "disk", image)
    yield server
    server.kill()


def outage_then_handover(server: NbdServer):
    """A ``during`` callable: 4 s after FIO-START the storage server is killed, restarted
    ``OUTAGE`` s later; 8 s after it is back, one handover. Returns (outage start, outage
    end, the handover or None)."""

    def during(host: vm_guest.Host) -> tuple[float, float, Handover | None]:
        start = host.wait_mark("FIO-START", 300)
        if start is None:
            return 0.0, 0.0, None
        while time.monotonic() < start.t + 4 and not host.done.is_set():
            time.sleep(0.05)
        down = time.monotonic()
        server.kill()
        time.sleep(OUTAGE)
        server.start()
        up = time.monotonic()
        while time.monotonic() < up + 8:
            if host.seen("FIO-END") or host.done.is_set():
                return down, up, None
            time.sleep(0.05)
        h = handover(host.sockets[0], pid_before=host.pid(0))
        if h.rc == 0:
            took_over(host, h)
        return down, up, h

    return during


def test_fio_verify_on_an_nbd_namespace_through_a_storage_outage_and_a_handover(boot, qsd: NbdServer) -> None:
    device = f"nvme,ns=nbd:uri={qsd.uri},queue_depth=32,timeout=60"
    r = boot(FIO_VERIFY.replace("RUNTIME", "30"), [device], markers=dict.fromkeys(("FIO-START", "FIO-END")),
             during=outage_then_handover(qsd), timeout=300)
    res = check_guest(r)  # every block verified, no nvme timeout/reset/abort in dmesg
    down, up, h = r.during_result
    assert up - down >= OUTAGE
    start, end = r.mark("FIO-START").t, r.mark("FIO-END").t
    assert start < down and up < end, "the outage fell outside fio's run"
    assert h is not None, "fio ended before the handover"
    assert h.rc == 0, f"handover failed (rc {h.rc}): {h.stderr.strip()}"
    assert h.new_alive
    log = r.servers[0]
    assert re.search(r"lost|reconnect", log, re.I), log[-3000:]  # the first process saw the outage
    vm_guest.record("nbd fio verify, storage outage + handover", {
        "write_iops": res.get("write_iops"), "read_iops": res.get("read_iops"),
        "maxgap_ms": res["maxgap_ms"], "outage_s": round(up - down, 2),
        "handover_downtime_ms": h.report.get("downtime_ms")})



def test_mixed_sizes_trim_and_write_zeroes_on_an_nbd_namespace(boot, qsd: NbdServer) -> None:
    """Linux's nvme driver and nvme-cli over an NBD namespace: block sizes 512 B..512 KiB (PRP
    lists, MDTS splits, requests split at the server's maximum) with crc32c verify at iodepth
    32, random trims (Dataset Management -> NBD holes), nvme-cli's Write Zeroes reading back
    zeros, and the namespace's utilization shrinking after a whole-device trim."""
    r = boot("""
fio --name=mix --filename=/dev/nvme0n1 --size=48M --rw=randwrite --bsrange=512-512k --iodepth=32 --direct=1 \
    --ioengine=io_uring --verify=crc32c --verify_fatal=1 && echo MIX-OK
fio --name=trim --filename=/dev/nvme0n1 --size=16M --rw=randtrim --bs=64k --iodepth=8 --direct=1 \
    --ioengine=io_uring --number_ios=200 && echo TRIM-OK
nvme write-zeroes /dev/nvme0n1 -s 64 -c 63 && echo WZ-OK
echo NONZERO=$(dd if=/dev/nvme0n1 bs=512 skip=64 count=64 iflag=direct 2>/dev/null | tr -d '\\0' | wc -c)
nvme id-ns /dev/nvme0n1 | grep -E '^nuse'
fio --name=all --filename=/dev/nvme0n1 --rw=trim --bs=1M --direct=1 --ioengine=psync && echo ALL-TRIM-OK
nvme id-ns /dev/nvme0n1 | grep -E '^nuse'
""", [f"nvme,ns=nbd:uri={qsd.uri},queue_depth=32"])
    assert r.ok, r.console[-4000:]
    got = lines(r.output)
    assert {"MIX-OK", "TRIM-OK", "WZ-OK", "NONZERO=0", "ALL-TRIM-OK"} <= got, r.output[-4000:]
    assert re.findall(r"err=\s*(\d+)", r.output) == ["0", "0", "0"]
    nuse = [int(v, 0) for v in re.findall(r"^nuse\s+:\s+(0x[0-9a-f]+|\d+)$", r.output, re.M)]
    assert len(nuse) == 2 and nuse[0] > 0 and nuse[1] == 0, r.output[-2000:]  # every block a hole again
    assert not re.search(r"^\[.*nvme.*timeout", r.output, re.M | re.I)
